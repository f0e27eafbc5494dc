//! Members leaving the vault's files: a removal wipes the keyslot and its
//! tokens, revokes the certificates, and makes the member's home root's; who
//! owns what on the data.

use super::*;

impl Shell {
    /// Wipes a removed member's keyslot and tokens, revokes their certificates, locks their home.
    pub(super) fn remove_member(&mut self, name: String, keyslot: u32) {
        let result = {
            let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
            let tokens: Vec<u32> = c
                .header()
                .metadata
                .tokens
                .iter()
                .filter(|(_, t)| token_binds(t, &name, keyslot))
                .map(|(id, _)| id.0)
                .collect();
            let mut r = c.remove_keyslot(keyslot, false);
            for id in tokens {
                if r.is_ok() {
                    r = c.remove_token(id);
                }
            }
            r
        };
        let fps: Vec<String> = self
            .control
            .certs
            .iter()
            .filter(|(_, m)| **m == name)
            .map(|(f, _)| f.clone())
            .collect();
        for fp in fps {
            self.control.certs.remove(&fp);
            self.control.revoked.push(fp);
        }
        self.control.totp.remove(&name);
        self.control.pinned.remove(&name);
        self.lock_removed_home(&name);
        self.nfs_update();
        match result {
            Ok(()) => self.system_audit(
                "member_remove",
                "ok",
                format!("keyslot {keyslot} of {name} wiped; certificate revoked"),
            ),
            Err(e) => self.system_audit(
                "member_remove",
                "failed",
                format!("keyslot {keyslot} of {name}: {e}; certificate revoked"),
            ),
        }
        self.persist();
    }

    /// A removed member's home becomes root's at once if the data is
    /// mounted (else at the next open), off the actor: the exposure's
    /// lock may be held by a read.
    pub(super) fn lock_removed_home(&self, name: &str) {
        let exposure = self.data.exposure.clone();
        let own = self.ownership();
        let tx = self.tx.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let g = exposure.lock().unwrap_or_else(|p| p.into_inner());
            let r = match g.as_ref() {
                Some(e) => e.reapply_ownership(&own),
                None => Ok(false),
            };
            drop(g);
            let (outcome, detail) = match r {
                Ok(true) => (
                    "locked",
                    format!(
                        "home/{name} is root's now (0700), kept; what {name}'s processes already hold open there stays open, and the team's group still gives what it gives"
                    ),
                ),
                Ok(false) => return,
                Err(e) => (
                    "failed",
                    format!(
                        "home/{name} could not be made root's now: {e} (the next open retries)"
                    ),
                ),
            };
            let _ = tx.send(Msg::SystemAudit {
                action: "member_home",
                outcome,
                detail,
            });
        });
    }

    pub(super) fn ownership(&self) -> coffre_data::Ownership {
        let a = &self.control.accounts;
        coffre_data::Ownership {
            team_gid: a.team_gid().unwrap_or(0),
            members: a
                .users
                .iter()
                .filter(|(n, _)| self.vault.members().contains_key(*n))
                .map(|(n, acc)| (n.clone(), acc.uid, acc.gid))
                .collect(),
            current: self.vault.members().keys().cloned().collect(),
        }
    }
}

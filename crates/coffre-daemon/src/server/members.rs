//! Members leaving the vault's files: a removal wipes the keyslot and its
//! tokens, revokes the certificates, and makes the member's home root's; who
//! owns what on the data.

use super::*;

impl Shell {
    /// Wipes a removed member's keyslot and tokens, revokes their certificates, locks their home.
    pub(super) fn remove_member(&mut self, name: String, keyslot: u32) {
        let result = self.wipe_keyslot(&name, keyslot);
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
            Err(e) => {
                // Tried again at every tick (and after a restart) until
                // the header takes it: the password must open nothing.
                self.control.wipe_pending.insert(keyslot, name.clone());
                self.system_audit(
                    "member_remove",
                    "failed",
                    format!(
                        "keyslot {keyslot} of {name}: {e}; certificate revoked; the wipe is tried again until it is done"
                    ),
                );
            }
        }
        self.persist();
    }

    /// Wipes `name`'s `keyslot` and the tokens that bind them to it.
    fn wipe_keyslot(&self, name: &str, keyslot: u32) -> Result<(), coffre_storage::Error> {
        let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
        let tokens: Vec<u32> = c
            .header()
            .metadata
            .tokens
            .iter()
            .filter(|(_, t)| token_binds(t, name, keyslot))
            .map(|(id, _)| id.0)
            .collect();
        // Already gone (a try whose tokens failed after it), and perhaps
        // given since to someone else, whose token binds it: only this
        // member's tokens are left to remove.
        let someone_else = c.header().metadata.tokens.values().any(|t| {
            t.get("member")
                .and_then(|m| m.as_str())
                .is_some_and(|m| m != name && token_binds(t, m, keyslot))
        });
        let present = !someone_else
            && c.header()
                .metadata
                .keyslots
                .contains_key(&coffre_luks2::metadata::Id(keyslot));
        let mut r = if present {
            c.remove_keyslot(keyslot, false)
        } else {
            Ok(())
        };
        for id in tokens {
            if r.is_ok() {
                r = c.remove_token(id);
            }
        }
        r
    }

    /// Each tick: the keyslot wipes that failed are tried again.
    pub(super) fn wipe_tick(&mut self) {
        if self.control.wipe_pending.is_empty() {
            return;
        }
        let pending: Vec<(u32, String)> = self
            .control
            .wipe_pending
            .iter()
            .map(|(k, n)| (*k, n.clone()))
            .collect();
        let mut done = false;
        for (keyslot, name) in pending {
            if self.wipe_keyslot(&name, keyslot).is_ok() {
                self.control.wipe_pending.remove(&keyslot);
                self.system_audit(
                    "member_remove",
                    "ok",
                    format!("keyslot {keyslot} of {name} wiped (after a failed try)"),
                );
                done = true;
            }
        }
        if done {
            self.persist();
        }
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

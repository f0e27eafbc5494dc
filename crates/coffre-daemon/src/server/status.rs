//! What `status` and the other reads show: the core's state, the data stack,
//! the workloads, the proposals.

use super::*;

pub(super) fn proposals_json(list: &[Proposal]) -> Value {
    json!(
        list.iter()
            .map(|p| json!({
                "id": p.id, "kind": p.change.kind(), "change": p.change,
                "description": p.description, "by": p.by, "created_ms": p.created.0,
                "expires_ms": p.expires.0, "approvals": p.approvals, "needed": p.needed,
            }))
            .collect::<Vec<_>>()
    )
}

impl Shell {
    pub(super) fn status_json(&self, member: &str) -> Value {
        let s = self.vault.status();
        json!({
            "ok": true,
            "you": member,
            "state": s.state,
            "lock": s.lock,
            "mode": s.mode,
            "mode_pending": s.mode_pending,
            "workloads": self.workloads_json(),
            "sessions": s.sessions.iter().map(|x| json!({
                "session": x.id.0, "member": x.member, "door": x.source.door, "from": x.source.addr,
                "since_ms": x.since.0, "last_seen_ms": x.last_seen.0,
            })).collect::<Vec<_>>(),
            "tasks": s.tasks.iter().map(|t| json!({
                "task_id": t.id.0, "task_name": t.name, "task_user": t.owner,
                "created_ms": t.created.0, "expires_ms": t.expires.0, "by": t.by,
            })).collect::<Vec<_>>(),
            "unlock_approvals": s.unlock_approvals,
            "unlock_quorum": s.unlock_quorum,
            "proposals": proposals_json(&s.proposals),
            "members": s.members,
            "key_held": self.key_held(),
            "control": {
                "saved": self.unsaved.is_none(),
                "error": self.unsaved,
            },
            "audit": {
                "writable": self.audit.error.is_none(),
                "error": self.audit.error,
                "waiting": self.audit.backlog.len(),
            },
            "data": self.data_json(),
            "gateway": self.gateway_json(),
            "network": self.network_json(),
            "nfs": self.nfs_json(),
            "directory": self.directory_json(),
            "source": self.source.as_ref().map(|s| s.json(now_ms().0)),
            "certificates": self.certificates_json(),
        })
    }

    /// The vault's own certificates (CA, door, gateway) as their files on
    /// the host hold them: what each is, when it ends, and whether that is
    /// within [`crate::pki::EXPIRY_WARNING_DAYS`].
    pub(super) fn certificates_json(&self) -> Value {
        let now = i64::try_from(now_ms().0 / 1000).unwrap_or(i64::MAX);
        let files = [
            ("ca", self.dir.ca_cert()),
            ("server", self.dir.server_cert()),
            ("gateway", self.dir.gateway_dir().join("server.pem")),
            // After a change of the CA's key: machines that pin the
            // previous CA trust the door through it until it ends.
            ("cross", self.dir.ca_cross_cert()),
        ];
        let rows: Vec<Value> = files
            .iter()
            .filter_map(|(what, path)| {
                let pem = self.dir.read(path).ok()?;
                let (end, subject) = crate::pki::pem_not_after(&pem)?;
                let days = (end - now).div_euclid(86_400);
                Some(json!({
                    "what": what, "subject": subject, "not_after": end, "days_left": days,
                    "expiring": days < crate::pki::EXPIRY_WARNING_DAYS,
                }))
            })
            .collect();
        Value::Array(rows)
    }

    pub(super) fn workloads_json(&self) -> Value {
        let rows = self
            .workloads
            .rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!(rows)
    }

    pub(super) fn data_json(&self) -> Value {
        let mut v = json!({
            "mountpoint": self.data.layout.mountpoint,
            "mounted": false,
        });
        match self.data.exposure.try_lock() {
            Ok(g) => {
                if let Some(e) = g.as_ref().filter(|e| !e.is_closed()) {
                    let st = e.status();
                    v["mounted"] = json!(true);
                    v["loop_device"] = json!(st.loop_device);
                    v["nbd_socket"] = json!(st.nbd_socket);
                    v["exports"] = json!(st.exports);
                    v["nbd_clients"] = json!(st.nbd_clients);
                }
            }
            Err(_) => v["changing"] = json!(true),
        }
        // The volume on a remote store: where, and the root kept locally
        // (its last manifest's epoch).
        if let Some(sc) = &self.config.storage {
            let root = std::fs::read_to_string(self.dir.storage_root())
                .ok()
                .and_then(|t| coffre_remote::Root::from_line(&t).ok());
            v["storage"] = json!({
                "url": sc.url,
                "endpoint": sc.endpoint,
                "root_epoch": root.map(|r| r.epoch),
                "chunk_size": sc.chunk_size,
                "cache_size": sc.cache_size,
            });
            // With mirrors, each store's standing as the device reports
            // it, while the data is mounted (else it is not current).
            if !sc.mirror.is_empty()
                && v["mounted"] == json!(true)
                && let Some(h) = crate::remote::read_health(&self.dir)
            {
                v["storage"]["stores"] = h["stores"].clone();
                v["storage"]["stores_at"] = h["at"].clone();
            }
        }
        v
    }
}

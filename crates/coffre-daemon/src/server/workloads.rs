//! The team's workloads as members reach them: who may use which, the logs
//! they may read, and the reaping of workloads that ended by themselves.

use super::*;

/// The team's workloads. Their operations block (freezes, stops), so
/// they run off the actor, in the open and close tasks.
pub(super) struct WorkloadState {
    pub(super) set: Arc<std::sync::Mutex<coffre_workload::Workloads>>,
    /// What status shows of them, readable at any time.
    pub(super) rows: Arc<RwLock<Vec<coffre_workload::Row>>>,
    /// Workloads a pause or a stop has handled so far (read without the
    /// lock: the daemon's stop counts them as progress).
    pub(super) handled: Arc<std::sync::atomic::AtomicU64>,
    /// Set while a reap runs off the actor.
    pub(super) reaping: Arc<std::sync::atomic::AtomicBool>,
    /// The members' numbers and groups they were last given.
    pub(super) members: Option<std::collections::BTreeMap<String, super::accounts::Ids>>,
}

impl WorkloadState {
    pub(super) fn new(workloads: coffre_workload::Workloads) -> Self {
        Self {
            handled: workloads.handled(),
            rows: workloads.view(),
            set: Arc::new(std::sync::Mutex::new(workloads)),
            reaping: Arc::default(),
            members: None,
        }
    }
}

impl Shell {
    /// Notices workloads that ended by themselves, off the actor (what
    /// they left in their cgroup is killed, which may take a moment), and
    /// finds the tasks that waited for them. Skipped while an open or a
    /// close is working on the workloads, or a reap is still running.
    pub(super) fn reap_workloads(&mut self) {
        if self
            .workloads
            .reaping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let bound: std::collections::BTreeSet<String> = self
            .vault
            .status()
            .tasks
            .into_iter()
            .filter_map(|t| t.workload)
            .collect();
        let workloads = self.workloads.set.clone();
        let reaping = self.workloads.reaping.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            // Cleared however this ends (a panic included).
            struct Done(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _done = Done(reaping);
            let found = workloads.try_lock().ok().map(|mut w| {
                let (lines, _) = w.reap();
                let ended: Vec<String> = bound.into_iter().filter(|n| !w.is_running(n)).collect();
                (lines, ended)
            });
            if let Some((lines, ended)) = found {
                let _ = tx.send(Msg::Reaped { lines, ended });
            }
        });
    }

    pub(super) fn reaped(&mut self, lines: Vec<coffre_workload::Line>, ended: Vec<String>) {
        self.workload_audit(lines);
        for name in ended {
            self.run(Event::WorkloadEnded { name });
        }
    }

    /// Whether `member` may use workload `name` (its members, or any
    /// superuser).
    pub(super) fn may_use(
        &self,
        member: &str,
        name: &str,
    ) -> Result<&coffre_workload::config::WorkloadConfig, Answer> {
        let Some(cfg) = self.config.workload.iter().find(|w| w.name == name) else {
            return Err((
                404,
                error_json(
                    ErrorCode::NoWorkload,
                    format!("no workload is called {name}"),
                ),
            ));
        };
        let superuser = self
            .vault
            .members()
            .get(member)
            .is_some_and(|m| m.role == Role::Superuser);
        if cfg.admits(member, superuser) {
            Ok(cfg)
        } else {
            Err((
                403,
                error_json(
                    ErrorCode::NotPermitted,
                    format!("you are not one of workload {name}'s members"),
                ),
            ))
        }
    }

    /// A task may wait for a running project workload its owner may use.
    pub(super) fn may_wait_for(&self, member: &str, name: &str) -> Result<(), Answer> {
        let cfg = self.may_use(member, name)?;
        let running = self
            .workloads
            .rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|r| r.name == name && r.state == coffre_workload::State::Running);
        if cfg.role != coffre_workload::config::Role::Project || !running {
            return Err((
                409,
                error_json(
                    ErrorCode::Invalid,
                    format!("workload {name} is not a running project workload"),
                ),
            ));
        }
        Ok(())
    }

    /// The end of a workload's log, read off the actor (a project log is
    /// on the data).
    pub(super) fn workload_logs(
        &mut self,
        member: &str,
        name: &str,
        bytes: Option<u64>,
        reply: oneshot::Sender<Answer>,
    ) {
        let project = match self.may_use(member, name) {
            Ok(c) => c.role == coffre_workload::config::Role::Project,
            Err(answer) => {
                let _ = reply.send(answer);
                return;
            }
        };
        // Each read of a log is audited: none while that cannot be.
        if let Some(why) = &self.audit.error {
            let _ = reply.send((
                503,
                error_json(
                    ErrorCode::AuditUnavailable,
                    format!(
                        "the audit log cannot be written ({why}): logs are not read until it can"
                    ),
                ),
            ));
            return;
        }
        if project && self.vault.status().state != "open" {
            let _ = reply.send((
                409,
                error_json(ErrorCode::Closed, "a project workload's log is inside the volume: it can be read while the vault is open"),
            ));
            return;
        }
        let path = self
            .workloads
            .set
            .try_lock()
            .ok()
            .and_then(|w| w.log_path(name));
        let Some(path) = path else {
            let _ = reply.send((
                503,
                error_json(
                    ErrorCode::Busy,
                    "the workloads are being paused or resumed; try again",
                ),
            ));
            return;
        };
        let max = bytes.unwrap_or(64 * 1024).clamp(1, 4 << 20);
        self.system_audit(
            "workload_logs",
            "requested",
            format!("{member} asked for the last {max} bytes of {name}'s log"),
        );
        let exposure = self.data.exposure.clone();
        tokio::task::spawn_blocking(move || {
            use base64::Engine;
            // Under the exposure's lock: a close waits for the read (an
            // open descriptor on the data would make its unmount fail),
            // and a read never lands on the bare mountpoint after one.
            let g = exposure.lock().unwrap_or_else(|p| p.into_inner());
            if project && g.as_ref().is_none_or(coffre_data::Exposure::is_closed) {
                let _ = reply.send((
                    409,
                    error_json(ErrorCode::Closed, "a project workload's log is inside the volume: it can be read while the vault is open"),
                ));
                return;
            }
            let answer = match coffre_workload::log::tail(&path, max) {
                Ok(b) => (
                    200,
                    json!({"ok": true, "log_b64": base64::engine::general_purpose::STANDARD.encode(b)}),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (200, json!({"ok": true, "log_b64": ""}))
                }
                Err(e) => (
                    500,
                    error_json(ErrorCode::Failure, format!("reading the log: {e}")),
                ),
            };
            drop(g);
            let _ = reply.send(answer);
        });
    }
}

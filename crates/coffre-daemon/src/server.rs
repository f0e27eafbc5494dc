//! `coffre serve`: the shell around the vault core. It turns connections
//! and timers into events, performs the core's effects in order (key
//! derivation in a memory-bounded pool, open, close, audit, persistence),
//! and answers over the mutual-TLS JSON API.

use crate::api::ApiCommand;
use crate::init::token_binds;
use crate::pki::fingerprint;
use crate::tls::server_config;
use crate::totp;
use crate::vaultdir::{Config, Control, DirError, VaultDir};
use coffre_audit::{AuditLog, HostKey};
use coffre_luks2::{Passphrase, VolumeKey};
use coffre_storage::Luks2Container;
use coffre_vault::*;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Vault directory.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The volume (busy, damaged...).
    #[error("the vault's volume: {0}")]
    Storage(#[from] coffre_storage::Error),
    /// The audit log does not verify or cannot be written.
    #[error("the audit log: {0} (run `coffre audit verify --dir DIR` to see what is wrong)")]
    Audit(#[from] coffre_audit::Error),
    /// TLS set-up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Listening socket.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

type Answer = (u16, Value);

#[path = "gateway_shell.rs"]
mod gateway_shell;

enum Msg {
    Api {
        fingerprint: Option<String>,
        addr: SocketAddr,
        cmd: ApiCommand,
        reply: oneshot::Sender<Answer>,
    },
    /// A keyslot check ended; `key` only when the core asked to keep it.
    KeyChecked {
        req: ReqId,
        ok: bool,
        key: Option<VolumeKey>,
    },
    Joined {
        joined: Joined,
        result: Result<u32, String>,
    },
    /// The data stack is up (or failed to come up), and what the
    /// workloads did.
    Exposed(Result<String, String>, Vec<coffre_workload::Line>),
    /// A close of the data stack finished (`close`: which one).
    Unexposed {
        close: u64,
        result: Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    },
    /// A forced close's deadline: if close `close` still runs, the engine
    /// is cut off and the key wiped.
    CloseDeadline(u64),
    /// From OpenVPN's management link.
    Link(crate::gateway::LinkEvent),
    /// The core's answer to a VPN client's `enter`.
    VpnAnswer(gateway_shell::VpnAnswer),
    /// Workloads that ended by themselves, and the bound tasks' workloads
    /// that are not running.
    Reaped {
        lines: Vec<coffre_workload::Line>,
        ended: Vec<String>,
    },
    /// A record from work done off the actor.
    SystemAudit {
        action: &'static str,
        outcome: &'static str,
        detail: String,
    },
    Tick,
    Shutdown(oneshot::Sender<()>),
}

/// Failed joins from one address (clients without a certificate).
#[derive(Default)]
struct JoinThrottle {
    failures: u32,
    until: Millis,
    /// Refusals since the last record that were counted, not logged.
    unlogged: u64,
}

/// Refused joins from one address logged one by one before they are
/// only counted (a summary record at each tick).
const JOIN_REFUSALS_LOGGED: u32 = 5;

/// A join whose keyslot is being made in the KDF pool.
struct Joined {
    name: String,
    role: Role,
    cert_pem: String,
    fingerprint: String,
    source: Option<Source>,
}

fn now_ms() -> Millis {
    Millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    )
}

struct Shell {
    dir: VaultDir,
    config: Config,
    control: Control,
    vault: Vault,
    audit: AuditLog,
    /// Records that could not be written yet (in order), and why the log
    /// fails: while it does, nothing that changes the vault is accepted
    /// but what reduces exposure, whose records wait here.
    audit_backlog: std::collections::VecDeque<AuditRecord>,
    audit_error: Option<String>,
    /// The open volume's cipher, revocable while its close hangs.
    cipher_slot: Option<Arc<coffre_storage::CipherSlot>>,
    /// Closes started so far (each one's number), and those abandoned at
    /// their deadline (their late report is ignored).
    closes_started: u64,
    closes_running: std::collections::HashSet<u64>,
    closes_abandoned: std::collections::HashSet<u64>,
    /// Joins without a certificate, per source address.
    join_throttle: HashMap<String, JoinThrottle>,
    container: Arc<RwLock<Luks2Container>>,
    passwords: HashMap<ReqId, Passphrase>,
    new_passwords: HashMap<ReqId, Passphrase>,
    joining: std::collections::HashSet<String>,
    join_replies: HashMap<String, oneshot::Sender<Answer>>,
    replies: HashMap<ReqId, oneshot::Sender<Answer>>,
    kept: HashMap<ReqId, VolumeKey>,
    open_key: Option<VolumeKey>,
    /// The mounted data while open. Behind a mutex because bringing it
    /// up and down runs off the actor (mounts and unmounts block).
    exposure: Arc<std::sync::Mutex<Option<coffre_data::Exposure>>>,
    layout: coffre_data::Layout,
    closes_in_flight: u32,
    /// Set while an open runs off the actor (a shutdown waits for it).
    opening: Arc<std::sync::atomic::AtomicBool>,
    /// `enter` replies held until the vault has finished opening.
    parked: Vec<(oneshot::Sender<Answer>, Value)>,
    last_open_error: Option<String>,
    kdf_pool: Arc<Semaphore>,
    kdf_cap: u32,
    tx: mpsc::UnboundedSender<Msg>,
    next_req: u64,
    /// OpenVPN's clients and the sessions they hold.
    vpn: gateway_shell::VpnState,
    /// Commands to OpenVPN's management link (if the vault has a gateway).
    gw_tx: Option<mpsc::UnboundedSender<crate::gateway::LinkCommand>>,
    /// The team's workloads. Their operations block (freezes, stops), so
    /// they run off the actor, in the open and close tasks.
    workloads: Arc<std::sync::Mutex<coffre_workload::Workloads>>,
    /// What status shows of them, readable at any time.
    workload_rows: Arc<RwLock<Vec<coffre_workload::Row>>>,
    /// The data as project workloads see it (if any is declared).
    cut: Option<Arc<coffre_data::cut::CutLayer>>,
    /// Set while a reap runs off the actor.
    reaping: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the vault is locked, for work that runs off the actor (a
    /// join between its temporary keyslot and its new keyslot).
    locked_flag: Arc<std::sync::atomic::AtomicBool>,
}

/// Why a join stopped: the vault was locked while it ran.
const JOIN_LOCKED: &str = "the vault was locked";

fn proposals_json(list: &[Proposal]) -> Value {
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

fn refusal_status(code: Refusal) -> u16 {
    match code {
        Refusal::Locked | Refusal::Busy => 409,
        Refusal::Throttled => 429,
        Refusal::Invalid | Refusal::NoTask => 400,
        Refusal::NoSession => 404,
        _ => 403,
    }
}

fn code_name(code: Refusal) -> String {
    code.as_str().to_string()
}

impl Shell {
    /// Appends a record, after any that wait. A failure keeps it (and the
    /// ones after it) for the next try, at every tick.
    fn record(&mut self, rec: AuditRecord) {
        self.audit_backlog.push_back(rec);
        self.flush_audit();
    }

    fn flush_audit(&mut self) {
        while let Some(rec) = self.audit_backlog.front().cloned() {
            let before = self.audit.len();
            match self.audit.append(rec) {
                Ok(_) => {
                    self.audit_backlog.pop_front();
                }
                Err(e) => {
                    // Its line may be in the log already (the sync or the
                    // head failed after it): never written twice.
                    if self.audit.len() > before {
                        self.audit_backlog.pop_front();
                    }
                    if self.audit_error.is_none() {
                        eprintln!("coffre: cannot append to the audit log: {e}");
                    }
                    self.audit_error = Some(e.to_string());
                    return;
                }
            }
        }
        if self.audit_error.take().is_some() {
            eprintln!("coffre: the audit log can be written again");
        }
    }

    /// "No audit, no action": while the log cannot be written, only what
    /// reduces exposure (lock, leave, heartbeats, ending a task) goes on.
    fn refused_for_audit(&self, command: &Command) -> Option<Answer> {
        let why = self.audit_error.as_ref()?;
        if matches!(
            command,
            Command::Lock { .. }
                | Command::Leave { .. }
                | Command::Heartbeat { .. }
                | Command::TaskCancel { .. }
        ) {
            return None;
        }
        Some((
            503,
            json!({"ok": false, "error": "audit_unavailable", "message": format!("the audit log cannot be written ({why}): nothing that changes the vault is done until it can; lock and leave still work")}),
        ))
    }

    /// One record per address for the refused joins that were only
    /// counted since the last tick; quiet addresses are forgotten.
    fn count_join_refusals(&mut self) {
        let now = now_ms();
        let mut counted = Vec::new();
        for (ip, t) in &mut self.join_throttle {
            if t.unlogged > 0 {
                counted.push((ip.clone(), t.unlogged));
                t.unlogged = 0;
            }
        }
        self.join_throttle
            .retain(|_, t| t.until.plus(600_000) > now || t.unlogged > 0);
        for (ip, n) in counted {
            self.record(AuditRecord {
                at: now,
                actor: "coffre".into(),
                source: Some(Source {
                    door: "join".into(),
                    addr: ip.clone(),
                }),
                action: "member_join".into(),
                result: "refused:counted".into(),
                detail: format!(
                    "{n} more join attempt(s) from {ip} refused or throttled, counted rather than logged one by one"
                ),
            });
        }
    }

    fn system_audit(&mut self, action: &str, result: &str, detail: String) {
        let rec = AuditRecord {
            at: now_ms(),
            actor: "coffre".into(),
            source: None,
            action: action.into(),
            result: result.into(),
            detail,
        };
        self.record(rec);
    }

    fn member_of(&self, fp: &str) -> Option<String> {
        if self.control.revoked.iter().any(|r| r == fp) {
            return None;
        }
        let name = self.control.certs.get(fp)?;
        self.vault
            .members()
            .contains_key(name)
            .then(|| name.clone())
    }

    fn status_json(&self, member: &str) -> Value {
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
                "created_ms": t.created.0, "expires_ms": t.expires.0,
            })).collect::<Vec<_>>(),
            "unlock_approvals": s.unlock_approvals,
            "unlock_quorum": s.unlock_quorum,
            "proposals": proposals_json(&s.proposals),
            "members": s.members,
            "key_held": self.open_key.is_some(),
            "audit": {
                "writable": self.audit_error.is_none(),
                "error": self.audit_error,
                "waiting": self.audit_backlog.len(),
            },
            "data": self.data_json(),
            "gateway": self.gateway_json(),
        })
    }

    fn workloads_json(&self) -> Value {
        let rows = self
            .workload_rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!(rows)
    }

    /// Notices workloads that ended by themselves, off the actor (what
    /// they left in their cgroup is killed, which may take a moment), and
    /// finds the tasks that waited for them. Skipped while an open or a
    /// close is working on the workloads, or a reap is still running.
    fn reap_workloads(&mut self) {
        if self.reaping.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let bound: std::collections::BTreeSet<String> = self
            .vault
            .status()
            .tasks
            .into_iter()
            .filter_map(|t| t.workload)
            .collect();
        let workloads = self.workloads.clone();
        let reaping = self.reaping.clone();
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

    fn reaped(&mut self, lines: Vec<coffre_workload::Line>, ended: Vec<String>) {
        self.workload_audit(lines);
        for name in ended {
            self.run(Event::WorkloadEnded { name });
        }
    }

    /// Whether `member` may use workload `name` (its members, or any
    /// superuser).
    fn may_use(
        &self,
        member: &str,
        name: &str,
    ) -> Result<&coffre_workload::config::WorkloadConfig, Answer> {
        let Some(cfg) = self.config.workload.iter().find(|w| w.name == name) else {
            return Err((
                404,
                json!({"ok": false, "error": "no_workload", "message": format!("no workload is called {name}")}),
            ));
        };
        let superuser = self
            .vault
            .members()
            .get(member)
            .is_some_and(|m| m.role == Role::Superuser);
        if cfg.members.is_empty() || superuser || cfg.members.iter().any(|m| m == member) {
            Ok(cfg)
        } else {
            Err((
                403,
                json!({"ok": false, "error": "not_permitted", "message": format!("you are not one of workload {name}'s members")}),
            ))
        }
    }

    /// A task may wait for a running project workload its owner may use.
    fn may_wait_for(&self, member: &str, name: &str) -> Result<(), Answer> {
        let cfg = self.may_use(member, name)?;
        let running = self
            .workload_rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|r| r.name == name && r.state == coffre_workload::State::Running);
        if cfg.role != coffre_workload::config::Role::Project || !running {
            return Err((
                409,
                json!({"ok": false, "error": "invalid", "message": format!("workload {name} is not a running project workload")}),
            ));
        }
        Ok(())
    }

    /// The end of a workload's log, read off the actor (a project log is
    /// on the data).
    fn workload_logs(
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
        if let Some(why) = &self.audit_error {
            let _ = reply.send((
                503,
                json!({"ok": false, "error": "audit_unavailable", "message": format!("the audit log cannot be written ({why}): logs are not read until it can")}),
            ));
            return;
        }
        if project && self.vault.status().state != "open" {
            let _ = reply.send((
                409,
                json!({"ok": false, "error": "closed", "message": "a project workload's log is inside the volume: it can be read while the vault is open"}),
            ));
            return;
        }
        let path = self
            .workloads
            .try_lock()
            .ok()
            .and_then(|w| w.log_path(name));
        let Some(path) = path else {
            let _ = reply.send((
                503,
                json!({"ok": false, "error": "busy", "message": "the workloads are being paused or resumed; try again"}),
            ));
            return;
        };
        let max = bytes.unwrap_or(64 * 1024).clamp(1, 4 << 20);
        self.system_audit(
            "workload_logs",
            "requested",
            format!("{member} asked for the last {max} bytes of {name}'s log"),
        );
        let exposure = self.exposure.clone();
        tokio::task::spawn_blocking(move || {
            use base64::Engine;
            // Under the exposure's lock: a close waits for the read (an
            // open descriptor on the data would make its unmount fail),
            // and a read never lands on the bare mountpoint after one.
            let g = exposure.lock().unwrap_or_else(|p| p.into_inner());
            if project && g.as_ref().is_none_or(coffre_data::Exposure::is_closed) {
                let _ = reply.send((
                    409,
                    json!({"ok": false, "error": "closed", "message": "a project workload's log is inside the volume: it can be read while the vault is open"}),
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
                    json!({"ok": false, "error": "failure", "message": format!("reading the log: {e}")}),
                ),
            };
            drop(g);
            let _ = reply.send(answer);
        });
    }

    fn data_json(&self) -> Value {
        let mut v = json!({
            "mountpoint": self.layout.mountpoint,
            "mounted": false,
        });
        match self.exposure.try_lock() {
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
        v
    }

    fn ownership(&self) -> coffre_data::Ownership {
        coffre_data::Ownership {
            team_gid: self.config.data.team_gid,
            members: self
                .config
                .data
                .members
                .iter()
                .filter(|(n, _)| self.vault.members().contains_key(*n))
                .map(|(n, ids)| (n.clone(), ids.uid, ids.gid))
                .collect(),
            current: self.vault.members().keys().cloned().collect(),
        }
    }

    /// A removed member's home becomes root's at once if the data is
    /// mounted (else at the next open), off the actor: the exposure's
    /// lock may be held by a read.
    fn lock_removed_home(&self, name: &str) {
        let exposure = self.exposure.clone();
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
                        "home/{name} is root's now (0700), kept; what {name}'s processes already hold open there stays open, and the host's groups (team_gid) still give what they give"
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

    /// Sends the `enter` replies that waited for the open, once it is
    /// decided.
    fn flush_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let state = self.vault.status().state;
        if state == "opening" || state == "closing" {
            return;
        }
        let mountpoint = self.layout.mountpoint.clone();
        let err = self.last_open_error.clone();
        for (tx, mut v) in self.parked.drain(..) {
            let answer = if state == "open" {
                v["data"] = json!(mountpoint);
                (200, v)
            } else {
                (
                    503,
                    json!({"ok": false, "error": "open_failed", "message": format!(
                        "the vault could not open: {}",
                        err.as_deref().unwrap_or("it closed again")
                    )}),
                )
            };
            let _ = tx.send(answer);
        }
    }

    fn api(
        &mut self,
        fp: Option<String>,
        addr: SocketAddr,
        cmd: ApiCommand,
        reply: oneshot::Sender<Answer>,
    ) {
        let Some(fp) = fp else {
            if let Some(why) = &self.audit_error {
                let _ = reply.send((
                    503,
                    json!({"ok": false, "error": "audit_unavailable", "message": format!("the audit log cannot be written ({why}): try again later")}),
                ));
                return;
            }
            // Without a client certificate, joining is the only thing to do.
            match cmd {
                ApiCommand::Join {
                    name,
                    code,
                    csr,
                    password,
                } => match self.join(&name, &code.0, &csr, &password.0, addr) {
                    Some(answer) => {
                        let _ = reply.send(answer);
                    }
                    None => {
                        self.join_replies.insert(name, reply);
                    }
                },
                _ => {
                    let _ = reply.send((403, json!({"ok": false, "error": "unknown_certificate", "message": "a member certificate is required"})));
                }
            }
            return;
        };
        let Some(member) = self.member_of(&fp) else {
            self.system_audit(
                "connect",
                "refused:unknown_certificate",
                format!(
                    "certificate {} from {addr} is not a member's (unknown, removed or revoked)",
                    &fp[..16]
                ),
            );
            let _ = reply.send((403, json!({"ok": false, "error": "unknown_certificate", "message": "this certificate belongs to no member of the vault"})));
            return;
        };
        // The IP only: throttling is per source host, not per connection.
        let source = Source {
            door: "cli".into(),
            addr: addr.ip().to_string(),
        };
        // While locked only superusers read (docs/security.md, "What each
        // state protects"); the core says who may.
        let is_read = matches!(
            cmd,
            ApiCommand::Status
                | ApiCommand::TaskList
                | ApiCommand::MemberList
                | ApiCommand::AuditShow { .. }
                | ApiCommand::AuditVerify
                | ApiCommand::WorkloadLogs { .. }
                | ApiCommand::GatewayProfile
                | ApiCommand::ProposalList
        );
        if is_read && let Err(code) = self.vault.may_read(&member) {
            let _ = reply.send((
                refusal_status(code),
                json!({"ok": false, "error": code_name(code), "message": "the vault is locked: only superusers can read its status and audit log until the quorum unlocks it"}),
            ));
            return;
        }
        // Commands that need them carry the password and the TOTP code.
        let (command, auth) = match cmd {
            ApiCommand::Status => {
                let _ = reply.send((200, self.status_json(&member)));
                return;
            }
            ApiCommand::TaskList => {
                let s = self.status_json(&member);
                let _ = reply.send((200, json!({"ok": true, "tasks": s["tasks"]})));
                return;
            }
            ApiCommand::ProposalList => {
                let p = proposals_json(&self.vault.status().proposals);
                let _ = reply.send((200, json!({"ok": true, "proposals": p})));
                return;
            }
            ApiCommand::Approve {
                id,
                password: p,
                totp,
            } => (Command::Approve { id }, Some((p, totp))),
            ApiCommand::InviteCancel {
                name,
                password: p,
                totp,
            } => {
                if !self.control.invitations.contains_key(&name) {
                    let _ = reply.send((
                        400,
                        json!({"ok": false, "error": "invalid", "message": format!("{name} has no pending invitation")}),
                    ));
                    return;
                }
                (Command::InviteCancel { name }, Some((p, totp)))
            }
            ApiCommand::MemberList => {
                let list: Vec<Value> = self
                    .vault
                    .members()
                    .values()
                    .map(|m| json!({"name": m.name, "role": m.role, "keyslot": m.keyslot}))
                    .collect();
                let _ = reply.send((200, json!({"ok": true, "members": list})));
                return;
            }
            ApiCommand::AuditShow { since } => {
                let answer = match coffre_audit::read_entries(&self.dir.root) {
                    Ok(entries) => (
                        200,
                        json!({"ok": true, "entries": entries.into_iter().filter(|e| e.seq > since.unwrap_or(0)).collect::<Vec<_>>()}),
                    ),
                    Err(e) => (
                        500,
                        json!({"ok": false, "error": "audit", "message": e.to_string()}),
                    ),
                };
                let _ = reply.send(answer);
                return;
            }
            ApiCommand::AuditVerify => {
                let answer = match coffre_audit::verify(
                    &self.dir.root,
                    &self.control.audit_public_key,
                ) {
                    Ok(r) => (
                        200,
                        json!({"ok": true, "records": r.records, "last_hash": r.last_hash}),
                    ),
                    Err(e) => (
                        200,
                        json!({"ok": false, "error": "audit_tampered", "message": e.to_string()}),
                    ),
                };
                let _ = reply.send(answer);
                return;
            }
            ApiCommand::WorkloadLogs {
                session,
                name,
                bytes,
            } => {
                if self.vault.session_member(SessionId(session)) != Some(member.as_str()) {
                    let _ = reply.send((
                        409,
                        json!({"ok": false, "error": "no_session", "message": "reading a workload's log needs your live session: run `coffre enter` first"}),
                    ));
                    return;
                }
                self.workload_logs(&member, &name, bytes, reply);
                return;
            }
            ApiCommand::GatewayProfile => {
                let answer = match crate::gateway::profile_settings(&self.dir, &self.config) {
                    Ok(p) => (
                        200,
                        json!({"ok": true, "vault": p.vault, "remote": p.remote, "port": p.port,
                               "proto": p.proto, "static_challenge": p.static_challenge,
                               "ca_pem": p.ca_pem, "tls_crypt": p.tls_crypt}),
                    ),
                    Err(msg) => (
                        404,
                        json!({"ok": false, "error": "no_gateway", "message": msg}),
                    ),
                };
                let _ = reply.send(answer);
                return;
            }
            ApiCommand::Enter { password: p, totp } => (Command::Enter, Some((p, totp))),
            ApiCommand::Leave { session } => (
                Command::Leave {
                    session: SessionId(session),
                },
                None,
            ),
            ApiCommand::Heartbeat { session } => (
                Command::Heartbeat {
                    session: SessionId(session),
                },
                None,
            ),
            ApiCommand::TaskAdd {
                session,
                task_name,
                task_user,
                task_expire,
                workload,
            } => {
                if let Some(name) = &workload
                    && let Err(answer) = self.may_wait_for(&member, name)
                {
                    let _ = reply.send(answer);
                    return;
                }
                (
                    Command::TaskAdd {
                        session: SessionId(session),
                        name: task_name,
                        claimed_owner: task_user,
                        duration_ms: task_expire.saturating_mul(1000),
                        workload,
                    },
                    None,
                )
            }
            ApiCommand::TaskCancel { session, task_id } => (
                Command::TaskCancel {
                    session: SessionId(session),
                    task: TaskId(task_id),
                },
                None,
            ),
            ApiCommand::Lock {
                reason,
                password: p,
                totp,
            } => (Command::Lock { reason }, Some((p, totp))),
            ApiCommand::Unlock { password: p, totp } => (Command::Unlock, Some((p, totp))),
            ApiCommand::Mode {
                mode,
                password: p,
                totp,
            } => (Command::SetMode { mode }, Some((p, totp))),
            ApiCommand::Quorum {
                quorum,
                password: p,
                totp,
            } => (Command::SetQuorum { quorum }, Some((p, totp))),
            ApiCommand::MemberRemove {
                name,
                password: p,
                totp,
            } => (Command::MemberRemove { name }, Some((p, totp))),
            ApiCommand::Invite {
                name,
                role,
                password: p,
                totp,
            } => {
                if let Err(msg) = crate::init::check_member_name(&name) {
                    let _ = reply.send((
                        400,
                        json!({"ok": false, "error": "invalid", "message": msg}),
                    ));
                    return;
                }
                if let Some(answer) = self.invitation_pending(&name) {
                    let _ = reply.send(answer);
                    return;
                }
                (Command::Invite { name, role }, Some((p, totp)))
            }
            ApiCommand::Passwd {
                password: p,
                new_password,
                totp,
            } => {
                if new_password.0.is_empty() {
                    let _ = reply.send((400, json!({"ok": false, "error": "invalid", "message": "the new password is empty"})));
                    return;
                }
                self.new_passwords.insert(
                    ReqId(self.next_req),
                    Passphrase::from_slice(new_password.0.as_bytes()),
                );
                (Command::Passwd, Some((p, totp)))
            }
            ApiCommand::Join { .. } => {
                let _ = reply.send((400, json!({"ok": false, "error": "invalid", "message": "this identity is already a member"})));
                return;
            }
        };
        let (password, totp_code) = match auth {
            Some((p, code)) => (Some(p), Some(code)),
            None => (None, None),
        };
        self.submit(
            member,
            source,
            command,
            password.as_ref().map(|p| p.0.as_str()),
            totp_code.as_deref(),
            reply,
        );
    }

    /// Hands an authenticated member's command to the core (from either
    /// door). `password` and `totp_code` come with the commands that need
    /// them; the password is kept only while the core waits for its check.
    fn submit(
        &mut self,
        member: String,
        source: Source,
        command: Command,
        password: Option<&str>,
        totp_code: Option<&str>,
        reply: oneshot::Sender<Answer>,
    ) {
        if let Some(answer) = self.refused_for_audit(&command) {
            let _ = reply.send(answer);
            return;
        }
        let totp = match totp_code {
            None => Totp::Missing,
            Some(code) => {
                let secret = self
                    .control
                    .totp
                    .get(&member)
                    .and_then(|s| totp::unbase32(s));
                let now_s = now_ms().0 / 1000;
                match secret.and_then(|s| totp::verify(&s, code, now_s, self.config.totp_period_s))
                {
                    Some(step) => Totp::Valid { step },
                    None => Totp::Invalid,
                }
            }
        };
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let has_password = password.is_some_and(|p| !p.is_empty());
        if let Some(p) = password
            && has_password
        {
            self.passwords
                .insert(req, Passphrase::from_slice(p.as_bytes()));
        }
        self.replies.insert(req, reply);
        self.run(Event::Request(Request {
            req,
            member,
            source,
            password: has_password,
            totp,
            command,
        }));
        // A request the core answered without a password check leaves no
        // password behind.
        if !self.vault_waits_for(req) {
            self.passwords.remove(&req);
            self.new_passwords.remove(&req);
        }
    }

    fn vault_waits_for(&self, req: ReqId) -> bool {
        self.replies.contains_key(&req)
    }

    fn run(&mut self, first: Event) {
        let mut queue = VecDeque::from([first]);
        while let Some(event) = queue.pop_front() {
            let effects = self.vault.handle(now_ms(), event);
            self.locked_flag
                .store(self.vault.is_locked(), std::sync::atomic::Ordering::SeqCst);
            for effect in effects {
                self.perform(effect, &mut queue);
            }
        }
        self.flush_parked();
    }

    fn keyslot_memory_kib(&self, keyslot: u32) -> u32 {
        let c = self.container.read().unwrap_or_else(|p| p.into_inner());
        c.header()
            .metadata
            .keyslots
            .get(&coffre_luks2::metadata::Id(keyslot))
            .and_then(|k| k.kdf().ok())
            .map_or(1, |k| k.memory_kib().max(1))
    }

    fn perform(&mut self, effect: Effect, queue: &mut VecDeque<Event>) {
        match effect {
            Effect::CheckPassword {
                req,
                member,
                keyslot,
                keep_key,
            } => {
                let bound = {
                    let c = self.container.read().unwrap_or_else(|p| p.into_inner());
                    c.header()
                        .metadata
                        .tokens
                        .values()
                        .any(|t| token_binds(t, &member, keyslot))
                };
                let Some(pass) = self.passwords.remove(&req) else {
                    queue.push_back(Event::PasswordChecked { req, ok: false });
                    return;
                };
                if !bound {
                    self.system_audit(
                        "keyslot",
                        "refused",
                        format!("no LUKS2 token binds {member} to keyslot {keyslot}"),
                    );
                    queue.push_back(Event::PasswordChecked { req, ok: false });
                    return;
                }
                let permits = self.keyslot_memory_kib(keyslot).min(self.kdf_cap);
                let pool = self.kdf_pool.clone();
                let container = self.container.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    // Bounded memory: a burst of attempts waits here instead
                    // of allocating argon2 memory all at once.
                    let permit = pool.acquire_many_owned(permits).await;
                    let result = tokio::task::spawn_blocking(move || {
                        let c = container.read().unwrap_or_else(|p| p.into_inner());
                        let r = c.unlock(&pass, Some(keyslot)).map(|(_, k)| k);
                        coffre_luks2::secret::scrub_stack();
                        r
                    })
                    .await;
                    drop(permit);
                    let key = match result {
                        Ok(Ok(k)) => Some(k),
                        _ => None,
                    };
                    let ok = key.is_some();
                    // A key nobody keeps (an unlock approval, a lock, a
                    // mode switch) is wiped here, before the result
                    // travels anywhere.
                    let key = key.filter(|_| keep_key);
                    let _ = tx.send(Msg::KeyChecked { req, ok, key });
                });
            }
            Effect::Open { req } => match self.kept.remove(&req) {
                Some(k) => {
                    let volume = {
                        let c = self.container.read().unwrap_or_else(|p| p.into_inner());
                        c.open_volume(&k)
                    };
                    match volume {
                        Ok(volume) => {
                            self.open_key = Some(k);
                            self.cipher_slot = Some(volume.cipher_slot());
                            self.last_open_error = None;
                            let slot = self.exposure.clone();
                            let layout = self.layout.clone();
                            let own = self.ownership();
                            let tx = self.tx.clone();
                            let opening = self.opening.clone();
                            let workloads = self.workloads.clone();
                            let cut = self.cut.clone();
                            opening.store(true, std::sync::atomic::Ordering::SeqCst);
                            tokio::task::spawn_blocking(move || {
                                // Held for the whole open: a shutdown or a
                                // close waits for it instead of missing it.
                                let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
                                let t = std::time::Instant::now();
                                let r = coffre_data::expose(volume, &layout, &own);
                                let mut lines = Vec::new();
                                let msg = match r {
                                    Ok(e) => {
                                        *g = Some(e);
                                        let detail = format!(
                                            "data mounted at {} in {} ms",
                                            layout.mountpoint.display(),
                                            t.elapsed().as_millis()
                                        );
                                        // Key, data, then workloads.
                                        lines =
                                            resume_workloads(&workloads, cut.as_deref(), &layout);
                                        Ok(detail)
                                    }
                                    Err(e) => Err(e.to_string()),
                                };
                                drop(g);
                                opening.store(false, std::sync::atomic::Ordering::SeqCst);
                                let _ = tx.send(Msg::Exposed(msg, lines));
                            });
                        }
                        Err(e) => queue.push_back(Event::Opened {
                            ok: false,
                            detail: format!("the volume: {e}"),
                        }),
                    }
                }
                None => queue.push_back(Event::Opened {
                    ok: false,
                    detail: "no key was kept for this open".into(),
                }),
            },
            Effect::DiscardKey { req } => {
                self.kept.remove(&req);
            }
            Effect::Close { force, mode } => {
                let nothing_up = self
                    .exposure
                    .try_lock()
                    .is_ok_and(|g| g.as_ref().is_none_or(coffre_data::Exposure::is_closed));
                if nothing_up && self.closes_in_flight == 0 {
                    self.wipe_key();
                    queue.push_back(Event::Closed {
                        ok: true,
                        detail: String::new(),
                    });
                    return;
                }
                self.closes_in_flight += 1;
                self.closes_started += 1;
                let close = self.closes_started;
                self.closes_running.insert(close);
                let slot = self.exposure.clone();
                let policy = coffre_data::ClosePolicy {
                    grace: Duration::from_secs(self.config.data.close_grace_s),
                    force,
                };
                let tx = self.tx.clone();
                if force {
                    // A lock finishes in bounded time, even on storage
                    // that stopped answering.
                    let tx = tx.clone();
                    let deadline = Duration::from_secs(self.config.data.close_deadline_s);
                    tokio::spawn(async move {
                        tokio::time::sleep(deadline).await;
                        let _ = tx.send(Msg::CloseDeadline(close));
                    });
                }
                let workloads = self.workloads.clone();
                let cut = self.cut.clone();
                tokio::task::spawn_blocking(move || {
                    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
                    // Workloads, then data, then key.
                    let lines = pause_workloads(&workloads, cut.as_deref(), mode);
                    let result = match g.as_mut() {
                        Some(e) => e.close(&policy).map_err(|(e, r)| (e.to_string(), r)),
                        None => Ok(coffre_data::CloseReport::default()),
                    };
                    // A forced close never leaves a stack behind for a later
                    // open to trip over (dropping it finishes the job).
                    if result.is_ok() || policy.force {
                        *g = None;
                    }
                    drop(g);
                    let _ = tx.send(Msg::Unexposed {
                        close,
                        result,
                        lines,
                    });
                });
            }
            Effect::Reply { req, outcome } => {
                if let Some(tx) = self.replies.remove(&req) {
                    let answer = match outcome {
                        Outcome::Ok(Reply::Entered { session }) => {
                            let v = json!({"ok": true, "session": session.0});
                            let state = self.vault.status().state;
                            if state == "opening" || state == "closing" {
                                // Answered once the data is there.
                                self.parked.push((tx, v));
                                return;
                            }
                            let mut v = v;
                            v["data"] = json!(self.layout.mountpoint);
                            (200, v)
                        }
                        Outcome::Ok(Reply::TaskAdded { task, expires }) => (
                            200,
                            json!({"ok": true, "task_id": task.0, "expires_ms": expires.0}),
                        ),
                        Outcome::Ok(Reply::UnlockApproved { remaining }) => {
                            (200, json!({"ok": true, "remaining": remaining}))
                        }
                        Outcome::Ok(Reply::Proposal {
                            id,
                            description,
                            remaining,
                        }) => (
                            200,
                            json!({"ok": true, "proposal": {"id": id, "description": description, "remaining": remaining}}),
                        ),
                        Outcome::Ok(Reply::Done) => (200, json!({"ok": true})),
                        Outcome::Refused { code, message } => (
                            refusal_status(code),
                            json!({"ok": false, "error": code_name(code), "message": message}),
                        ),
                    };
                    let _ = tx.send(answer);
                }
            }
            Effect::DropSession { session, .. } => {
                // CLI sessions learn it at their next heartbeat; VPN
                // clients are disconnected.
                self.vpn_drop_session(session);
            }
            Effect::RemoveMember { name, keyslot } => {
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
                self.lock_removed_home(&name);
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
            Effect::Audit(rec) => self.record(rec),
            Effect::Persist => self.persist(),
            Effect::CancelInvitations => {
                let names: Vec<String> = self.control.invitations.keys().cloned().collect();
                for name in names {
                    self.drop_invitation(&name, "cancelled");
                }
            }
            Effect::CancelInvitation { req, name } => {
                let had = self.control.invitations.contains_key(&name);
                self.drop_invitation(&name, "cancelled");
                let answer = if had {
                    (200, json!({"ok": true}))
                } else {
                    (
                        400,
                        json!({"ok": false, "error": "invalid", "message": format!("{name} has no pending invitation (used or expired meanwhile)")}),
                    )
                };
                if let Some(tx) = self.replies.remove(&req) {
                    let _ = tx.send(answer);
                }
            }
            Effect::Invite { req, name, role } => {
                let key = self.kept.remove(&req);
                // Checked again where the keyslot is made: a second
                // invitation would orphan the first one's keyslot.
                let answer = match self.invitation_pending(&name) {
                    Some(refusal) => {
                        drop(key);
                        self.system_audit(
                            "member_invite",
                            "refused",
                            format!("{name} already has a pending invitation"),
                        );
                        refusal
                    }
                    None => match key {
                        Some(k) => self.create_invitation(&k, &name, role),
                        None => (
                            500,
                            json!({"ok": false, "error": "failure", "message": "no key for the invitation"}),
                        ),
                    },
                };
                if let Some(tx) = self.replies.remove(&req) {
                    let _ = tx.send(answer);
                }
            }
            Effect::ChangePassword {
                req,
                member,
                keyslot,
            } => {
                let key = self.kept.remove(&req);
                let new = self.new_passwords.remove(&req);
                let answer = match (key, new) {
                    (Some(k), Some(new)) => {
                        let kdf = self.config.keyslot_kdf.params();
                        let r = self
                            .container
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .change_passphrase(keyslot, &k, &new, kdf);
                        match r {
                            Ok(()) => (200, json!({"ok": true})),
                            Err(e) => {
                                self.system_audit("passwd", "failed", format!("{member}: {e}"));
                                (
                                    500,
                                    json!({"ok": false, "error": "failure", "message": format!("password not changed: {e}")}),
                                )
                            }
                        }
                    }
                    _ => (
                        500,
                        json!({"ok": false, "error": "failure", "message": "password not changed"}),
                    ),
                };
                if let Some(tx) = self.replies.remove(&req) {
                    let _ = tx.send(answer);
                }
            }
        }
    }

    /// The refusal for a second invitation while `name` has one pending.
    fn invitation_pending(&self, name: &str) -> Option<Answer> {
        let inv = self.control.invitations.get(name)?;
        Some((
            400,
            json!({"ok": false, "error": "invalid", "message": format!(
                "{name} already has a pending invitation (expires at {} ms): cancel it first (`coffre member cancel-invitation {name}`), or wait until it is used or expires",
                inv.expires_ms
            )}),
        ))
    }

    fn free_token_id(&self) -> Option<u32> {
        let c = self.container.read().unwrap_or_else(|p| p.into_inner());
        (0..coffre_luks2::MAX_KEYSLOTS).find(|i| {
            !c.header()
                .metadata
                .tokens
                .contains_key(&coffre_luks2::metadata::Id(*i))
        })
    }

    fn invite_passphrase(&self, code: &[u8]) -> Option<Passphrase> {
        crate::init::invitation_passphrase(&self.control.invite_secret, code)
    }

    /// A temporary keyslot opened by the invitation code mixed with a
    /// secret only this host holds: a stolen invitation plus a stolen
    /// header is not enough.
    fn create_invitation(&mut self, key: &VolumeKey, name: &str, role: Role) -> Answer {
        let fail = |m: String| (500, json!({"ok": false, "error": "failure", "message": m}));
        let code = crate::init::invitation_code();
        let Some(pass) = self.invite_passphrase(code.as_ref()) else {
            return fail("no invitation secret in control data".into());
        };
        let Some(token_id) = self.free_token_id() else {
            return fail("no free LUKS2 token".into());
        };
        // The code carries 128 random bits, so a cheap KDF is enough.
        let kdf = coffre_luks2::kdf::KdfParams::Pbkdf2 {
            hash: coffre_luks2::hash::HashAlg::Sha256,
            iterations: 1000,
        };
        let slot = {
            let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
            let slot = match c.add_keyslot(key, &pass, None, kdf, Some(0)) {
                Ok(n) => n,
                Err(e) => return fail(format!("cannot add the invitation keyslot: {e}")),
            };
            if let Err(e) = c.set_token(token_id, json!({"type": crate::init::INVITE_TOKEN, "keyslots": [slot.to_string()], "member": name})) {
                let _ = c.remove_keyslot(slot, false);
                return fail(format!("cannot bind the invitation keyslot: {e}"));
            }
            slot
        };
        let expires_ms = now_ms().0 + self.config.invitation_ttl_s * 1000;
        let code_hex = crate::init::hex_secret(code.as_ref());
        self.control.invitations.insert(
            name.to_string(),
            crate::vaultdir::Invitation {
                keyslot: slot,
                role,
                expires_ms,
                code_sha256: crate::pki::fingerprint(code.as_ref()),
                by: String::new(),
            },
        );
        self.persist();
        self.system_audit(
            "member_invite",
            "ok",
            format!("invitation for {name}: temporary keyslot {slot}, expires at {expires_ms} ms"),
        );
        let ca_pem = self.dir.read(&self.dir.ca_cert()).unwrap_or_default();
        (
            200,
            json!({"ok": true, "invitation": {
                // The reply's JSON and HTTP buffers keep copies we cannot
                // wipe; the code opens nothing without the host's secret.
                "name": name, "role": role,
                "code": std::str::from_utf8(code_hex.expose()).unwrap_or_default(),
                "expires_ms": expires_ms,
                "server": self.config.listen, "ca_pem": ca_pem,
                "ca_fingerprint": ca_fingerprint(&ca_pem),
            }}),
        )
    }

    fn drop_invitation(&mut self, name: &str, why: &str) {
        let Some(inv) = self.control.invitations.remove(name) else {
            return;
        };
        let r = {
            let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
            let tokens: Vec<u32> = c
                .header()
                .metadata
                .tokens
                .iter()
                .filter(|(_, t)| {
                    t.get("type").and_then(|x| x.as_str()) == Some(crate::init::INVITE_TOKEN)
                        && t.get("member").and_then(|x| x.as_str()) == Some(name)
                })
                .map(|(id, _)| id.0)
                .collect();
            let mut r = c.remove_keyslot(inv.keyslot, false);
            for id in tokens {
                let _ = c.remove_token(id);
            }
            if matches!(
                r,
                Err(coffre_storage::Error::Luks2(
                    coffre_luks2::Error::KeyslotNotFound(_)
                ))
            ) {
                r = Ok(());
            }
            r
        };
        self.persist();
        match r {
            Ok(()) => self.system_audit(
                "member_invite",
                why,
                format!(
                    "invitation for {name} ended; temporary keyslot {} wiped",
                    inv.keyslot
                ),
            ),
            Err(e) => self.system_audit(
                "member_invite",
                "failed",
                format!("invitation for {name}: keyslot {}: {e}", inv.keyslot),
            ),
        }
    }

    fn expire_invitations(&mut self) {
        let now = now_ms().0;
        let expired: Vec<String> = self
            .control
            .invitations
            .iter()
            .filter(|(_, i)| i.expires_ms <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            self.drop_invitation(&name, "expired");
        }
    }

    fn join(
        &mut self,
        name: &str,
        code_hex: &str,
        csr: &str,
        password: &str,
        addr: SocketAddr,
    ) -> Option<Answer> {
        let ip = addr.ip().to_string();
        let source = Some(Source {
            door: "join".into(),
            addr: ip.clone(),
        });
        // Anyone can send a join: throttled per address like other
        // failures (never counted towards the auto-lock, which would hand
        // a lock to anyone on the network), and past a few refusals only
        // counted, so a flood neither fills the log nor keeps it busy.
        // A valid code is never throttled (codes are 128 random bits: the
        // throttle is against floods, not guesses).
        let now = now_ms();
        let refuse = |this: &mut Self, why: &str| {
            let pol = &this.vault.persistent().policy;
            let (base, max) = (pol.throttle_base_ms, pol.throttle_max_ms);
            let t = this.join_throttle.entry(ip.clone()).or_default();
            if t.until > now {
                t.unlogged += 1;
                let secs = (t.until.0 - now.0).div_ceil(1000);
                return (
                    429,
                    json!({"ok": false, "error": "throttled", "message": format!("too many failed attempts; try again in {secs} s")}),
                );
            }
            t.failures = t.failures.saturating_add(1);
            let shift = t.failures.saturating_sub(1).min(20);
            t.until = now.plus(base.saturating_mul(1u64 << shift).min(max));
            if t.failures <= JOIN_REFUSALS_LOGGED {
                let rec = AuditRecord {
                    at: now_ms(),
                    actor: name.to_string(),
                    source: source.clone(),
                    action: "member_join".into(),
                    result: "refused".into(),
                    detail: why.to_string(),
                };
                this.record(rec);
            } else {
                t.unlogged += 1;
            }
            (
                403,
                json!({"ok": false, "error": "invalid_invitation", "message": "this invitation is not valid (wrong, used, expired, or cancelled by a lock)"}),
            )
        };
        let Some(inv) = self.control.invitations.get(name).cloned() else {
            return Some(refuse(self, "no pending invitation"));
        };
        if inv.expires_ms <= now_ms().0 {
            self.drop_invitation(name, "expired");
            return Some(refuse(self, "invitation expired"));
        }
        let Some(code) = crate::totp::unhex(code_hex).map(zeroize::Zeroizing::new) else {
            return Some(refuse(self, "malformed code"));
        };
        if !coffre_luks2::hash::ct_eq(
            crate::pki::fingerprint(&code).as_bytes(),
            inv.code_sha256.as_bytes(),
        ) {
            return Some(refuse(self, "wrong invitation code"));
        }
        // A right code: whoever holds it is no flooder.
        self.join_throttle.remove(&ip);
        // Before the temporary keyslot is opened: while locked the volume
        // key must not come into memory, nor may anyone join. After the
        // code check, so that only the holder of a valid invitation learns
        // that the vault is locked (a lock cancels invitations, so this
        // answers a join that raced the lock).
        if self.vault.may_join().is_err() {
            let rec = AuditRecord {
                at: now_ms(),
                actor: name.to_string(),
                source: source.clone(),
                action: "member_join".into(),
                result: "refused:locked".into(),
                detail: "the vault is locked".into(),
            };
            self.record(rec);
            return Some((
                409,
                json!({"ok": false, "error": "locked", "message": "the vault is locked: invitations are cancelled by a lock; ask for a new one once it is unlocked"}),
            ));
        }
        if password.is_empty() {
            return Some((
                400,
                json!({"ok": false, "error": "invalid", "message": "the password is empty"}),
            ));
        }
        let Some(temp) = self.invite_passphrase(&code) else {
            return Some(refuse(self, "no invitation secret"));
        };
        let ca_key = match self.dir.read(&self.dir.ca_key()) {
            Ok(k) => k,
            Err(e) => {
                return Some((
                    500,
                    json!({"ok": false, "error": "failure", "message": e.to_string()}),
                ));
            }
        };
        let issued = match crate::pki::sign_csr(&self.config.name, &ca_key, csr, name) {
            Ok(i) => i,
            Err(e) => {
                return Some((
                    400,
                    json!({"ok": false, "error": "invalid", "message": format!("bad certificate request: {e}")}),
                ));
            }
        };
        if !self.joining.insert(name.to_string()) {
            return Some((
                409,
                json!({"ok": false, "error": "busy", "message": "this invitation is being used right now"}),
            ));
        }
        // The new keyslot's derivation runs in the KDF pool, off the actor,
        // so the daemon keeps answering while it takes its seconds.
        let kdf = self.config.keyslot_kdf.params();
        let permits = match kdf {
            coffre_luks2::kdf::KdfParams::Argon2id { memory_kib, .. } => {
                memory_kib.clamp(1, self.kdf_cap)
            }
            coffre_luks2::kdf::KdfParams::Pbkdf2 { .. } => 1,
        };
        let member_pass = Passphrase::from_slice(password.as_bytes());
        let container = self.container.clone();
        let pool = self.kdf_pool.clone();
        let tx = self.tx.clone();
        let temp_slot = inv.keyslot;
        let locked = self.locked_flag.clone();
        let joined = Joined {
            name: name.to_string(),
            role: inv.role,
            cert_pem: issued.cert_pem,
            fingerprint: issued.fingerprint,
            source,
        };
        tokio::spawn(async move {
            let permit = pool.acquire_many_owned(permits).await;
            let result = tokio::task::spawn_blocking(move || {
                let mut c = container.write().unwrap_or_else(|p| p.into_inner());
                let key = match c.unlock(&temp, Some(temp_slot)) {
                    Ok((_, k)) => k,
                    Err(e) => return Err(format!("temporary keyslot did not open: {e}")),
                };
                // A lock that landed while the temporary keyslot opened:
                // the key goes at once and no keyslot is added.
                if locked.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(key);
                    coffre_luks2::secret::scrub_stack();
                    return Err(JOIN_LOCKED.into());
                }
                let slot = c.add_keyslot(&key, &member_pass, None, kdf, None);
                drop(key);
                coffre_luks2::secret::scrub_stack();
                slot.map_err(|e| format!("cannot add the keyslot: {e}"))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            drop(permit);
            let _ = tx.send(Msg::Joined { joined, result });
        });
        None
    }

    fn join_finish(&mut self, j: Joined, result: Result<u32, String>) -> Answer {
        self.joining.remove(&j.name);
        let name = j.name.as_str();
        // Locked while the keyslot was made: it is wiped, nobody joins.
        if self.vault.may_join().is_err() {
            let detail = match &result {
                Ok(slot) => {
                    let r = self
                        .container
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove_keyslot(*slot, false);
                    match r {
                        Ok(()) => {
                            format!("the vault was locked while joining; new keyslot {slot} wiped")
                        }
                        Err(e) => {
                            format!("the vault was locked while joining; new keyslot {slot}: {e}")
                        }
                    }
                }
                Err(why) => format!("the vault was locked while joining: {why}"),
            };
            let rec = AuditRecord {
                at: now_ms(),
                actor: name.to_string(),
                source: j.source.clone(),
                action: "member_join".into(),
                result: "refused:locked".into(),
                detail,
            };
            self.record(rec);
            self.drop_invitation(name, "cancelled");
            return (
                409,
                json!({"ok": false, "error": "locked", "message": "the vault was locked while you were joining: ask for a new invitation once it is unlocked"}),
            );
        }
        let slot = match result {
            Ok(s) => s,
            Err(why) => {
                let rec = AuditRecord {
                    at: now_ms(),
                    actor: name.to_string(),
                    source: j.source.clone(),
                    action: "member_join".into(),
                    result: "failed".into(),
                    detail: why.clone(),
                };
                self.record(rec);
                return (
                    500,
                    json!({"ok": false, "error": "failure", "message": format!("joining failed: {why}")}),
                );
            }
        };
        self.drop_invitation(name, "used");
        let bound = self.free_token_id().map(|id| {
            self.container.write().unwrap_or_else(|p| p.into_inner()).set_token(id, json!({"type": crate::init::MEMBER_TOKEN, "keyslots": [slot.to_string()], "member": name}))
        });
        if !matches!(bound, Some(Ok(()))) {
            let _ = self
                .container
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove_keyslot(slot, false);
            return (
                500,
                json!({"ok": false, "error": "failure", "message": "cannot bind your keyslot"}),
            );
        }
        let mut secret = [0u8; totp::SECRET_LEN];
        coffre_luks2::secret::fill_random(&mut secret);
        self.control
            .totp
            .insert(name.to_string(), totp::base32(&secret));
        self.control
            .certs
            .insert(j.fingerprint.clone(), name.to_string());
        self.run(Event::MemberJoined {
            member: Member {
                name: name.to_string(),
                role: j.role,
                keyslot: slot,
                last_totp_step: None,
            },
        });
        self.persist();
        (
            200,
            json!({"ok": true, "cert_pem": j.cert_pem, "keyslot": slot,
            "otpauth": totp::otpauth_uri(&format!("coffre {}", self.config.name), name, &secret, self.config.totp_period_s)}),
        )
    }

    fn persist(&mut self) {
        self.control.vault = self.vault.persistent().clone();
        if let Err(e) = self.dir.save_control(&self.control) {
            eprintln!("coffre: cannot save control data: {e}");
        }
    }

    fn key_checked(&mut self, req: ReqId, ok: bool, key: Option<VolumeKey>) {
        if let Some(k) = key {
            self.kept.insert(req, k);
        }
        self.run(Event::PasswordChecked { req, ok });
    }

    fn workload_audit(&mut self, lines: Vec<coffre_workload::Line>) {
        for (action, result, detail) in lines {
            self.system_audit(&action, &result, detail);
        }
    }

    fn exposed(&mut self, r: Result<String, String>, lines: Vec<coffre_workload::Line>) {
        self.workload_audit(lines);
        match r {
            Ok(detail) => self.run(Event::Opened { ok: true, detail }),
            Err(detail) => {
                self.wipe_key();
                self.last_open_error = Some(detail.clone());
                self.run(Event::Opened { ok: false, detail });
            }
        }
    }

    /// Wipes the volume key everywhere the daemon holds it: its own copy,
    /// and the engine's key schedule (revoked, so a stack or a thread that
    /// still holds the volume keeps no key). Returns whether the engine
    /// still had one.
    fn wipe_key(&mut self) -> bool {
        // Dropping a VolumeKey zeroizes it.
        self.open_key = None;
        self.cipher_slot.take().is_some_and(|s| s.revoke())
    }

    /// A forced close still running at its deadline: the engine's cipher
    /// is revoked (no thread holds it across I/O, so this does not wait
    /// for the hung I/O), the key is wiped, and the core learns the vault
    /// is closed. The hung close is left behind, and its late report
    /// ignored.
    fn close_deadline(&mut self, close: u64) {
        if self.closes_started != close || self.closes_in_flight == 0 {
            return;
        }
        let revoked = self.wipe_key();
        self.kept.clear();
        // Every close still running is left behind (an earlier one may
        // be the one that hangs, holding the data stack).
        self.closes_abandoned.extend(self.closes_running.drain());
        self.closes_in_flight = 0;
        self.system_audit(
            "close",
            "deadline",
            format!(
                "the close did not finish within {} s (storage not answering?): {}the key wiped; \
                 left behind: the data stack and its hung I/O (the next daemon start cleans it; \
                 restart once the storage answers)",
                self.config.data.close_deadline_s,
                if revoked {
                    "the engine's cipher revoked, "
                } else {
                    ""
                }
            ),
        );
        self.run(Event::Closed {
            ok: true,
            detail: "past the close deadline".into(),
        });
    }

    fn unexposed(
        &mut self,
        result: Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    ) {
        self.workload_audit(lines);
        self.closes_in_flight = self.closes_in_flight.saturating_sub(1);
        let report = match &result {
            Ok(r) | Err((_, r)) => r.clone(),
        };
        for h in &report.killed {
            self.system_audit(
                "close",
                "killed",
                format!(
                    "{h}: it kept the data busy (SIGTERM, then SIGKILL after {} s)",
                    self.config.data.close_grace_s
                ),
            );
        }
        for n in &report.notes {
            self.system_audit("close", "note", n.clone());
        }
        if self.closes_in_flight > 0 {
            // A forced close queued behind this one decides.
            return;
        }
        match result {
            Ok(r) => {
                self.wipe_key();
                self.system_audit(
                    "data",
                    "unmounted",
                    format!(
                        "{} unmounted in {} ms; {} NBD client(s) dropped",
                        self.layout.mountpoint.display(),
                        r.elapsed.as_millis(),
                        r.nbd_clients
                    ),
                );
                self.run(Event::Closed {
                    ok: true,
                    detail: String::new(),
                });
            }
            Err((e, _)) => {
                // A forced close takes the stack down even when a step
                // failed: nothing holds the volume for a retry, so the
                // engine's key schedule goes too.
                if self
                    .exposure
                    .try_lock()
                    .is_ok_and(|g| g.as_ref().is_none_or(coffre_data::Exposure::is_closed))
                    && let Some(s) = self.cipher_slot.take()
                {
                    s.revoke();
                }
                self.run(Event::Closed {
                    ok: false,
                    detail: e,
                })
            }
        }
    }

    fn shutdown(&mut self) {
        let was = self.vault.status().state;
        // An open still on its way would mount after we looked: wait for it.
        let until = std::time::Instant::now() + Duration::from_secs(120);
        while self.opening.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let how = match self.vault.mode() {
            Mode::Fast => coffre_workload::Pause::Fast,
            Mode::Safe => coffre_workload::Pause::Safe,
        };
        let lines = self
            .workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(how);
        self.workload_audit(lines);
        if let Some(cut) = &self.cut {
            cut.cut();
        }
        let exposure = self
            .exposure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut e) = exposure {
            let policy = coffre_data::ClosePolicy {
                grace: Duration::from_secs(self.config.data.close_grace_s),
                force: true,
            };
            match e.close(&policy) {
                Ok(r) | Err((_, r)) => {
                    for h in &r.killed {
                        let line = format!("{h}: it kept the data busy at shutdown");
                        let rec = AuditRecord {
                            at: now_ms(),
                            actor: "coffre".into(),
                            source: None,
                            action: "close".into(),
                            result: "killed".into(),
                            detail: line,
                        };
                        self.record(rec);
                    }
                }
            }
        }
        self.wipe_key();
        self.kept.clear();
        self.passwords.clear();
        self.cut = None;
        self.system_audit(
            "stop",
            "closed",
            format!("daemon stopped cleanly (was {was}); key wiped"),
        );
        let _ = std::fs::remove_file(self.dir.running_marker());
    }
}

/// After the data is exposed: the workloads' view passes through to it
/// again, then the workloads start or thaw.
fn resume_workloads(
    workloads: &std::sync::Mutex<coffre_workload::Workloads>,
    cut: Option<&coffre_data::cut::CutLayer>,
    layout: &coffre_data::Layout,
) -> Vec<coffre_workload::Line> {
    let mut lines = Vec::new();
    if let Some(cut) = cut {
        match cut.restore(&layout.mountpoint) {
            Ok(r) if r.lost > 0 => lines.push((
                "workload".to_string(),
                "note".to_string(),
                format!(
                    "{} file(s) workloads kept open were reopened; {} no longer exist (their descriptors fail)",
                    r.reopened, r.lost
                ),
            )),
            Ok(_) => {}
            Err(e) => lines.push((
                "workload".to_string(),
                "failed".to_string(),
                format!("the workloads' view of the data: {e}"),
            )),
        }
    }
    lines.extend(workloads.lock().unwrap_or_else(|p| p.into_inner()).resume());
    lines
}

/// Before the data goes: workloads frozen or stopped, then the
/// workloads' view lets go of every file it holds on the data.
fn pause_workloads(
    workloads: &std::sync::Mutex<coffre_workload::Workloads>,
    cut: Option<&coffre_data::cut::CutLayer>,
    mode: Mode,
) -> Vec<coffre_workload::Line> {
    let how = match mode {
        Mode::Fast => coffre_workload::Pause::Fast,
        Mode::Safe => coffre_workload::Pause::Safe,
    };
    let lines = workloads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pause(how);
    if let Some(cut) = cut {
        cut.cut();
    }
    lines
}

fn ca_fingerprint(ca_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map(|d| fingerprint(d.as_ref()))
        .unwrap_or_default()
}

/// What every reply to a member carries: the audit log's current signed
/// head and the key that verifies it. Members remember the highest head
/// they saw and refuse a vault that shows them an older one (finding 3:
/// the log and its head can be put back together without any key).
#[derive(Clone)]
struct HeadForReplies {
    watch: coffre_audit::HeadWatch,
    key: String,
}

impl HeadForReplies {
    fn json(&self) -> Value {
        match self.watch.current() {
            Some(h) => {
                json!({"seq": h.seq, "hash": h.hash, "signature": h.signature, "key": self.key})
            }
            None => json!({"seq": 0, "hash": null, "signature": null, "key": self.key}),
        }
    }
}

/// The largest command body accepted. Commands are small JSON objects;
/// a bound keeps one client from making the daemon hold much memory, and
/// lets the buffer be allocated once (a growing buffer would leave
/// unwiped copies behind at each reallocation).
const MAX_REQUEST_BODY: usize = 64 * 1024;

enum BodyError {
    TooLarge,
    Transport(hyper::Error),
}

/// Reads a request body into one buffer of `limit` bytes that is wiped
/// when dropped: bodies carry passwords and invitation codes.
///
/// Each chunk hyper hands over is copied in and then wiped too when no
/// one else holds it. hyper's chunks usually share storage with its
/// connection read buffer, which we cannot wipe from here: what that
/// buffer (and rustls's plaintext buffers) keep is measured by the vault
/// test `scan::password_not_in_daemon_memory_after_leave` and written in
/// docs/security.md.
async fn read_body(
    mut body: Incoming,
    limit: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, BodyError> {
    let mut raw = zeroize::Zeroizing::new(Vec::with_capacity(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Transport)?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let fits = raw.len() + chunk.len() <= limit;
        if fits {
            raw.extend_from_slice(&chunk);
        }
        if let Ok(mut own) = chunk.try_into_mut() {
            zeroize::Zeroize::zeroize(own.as_mut());
        }
        if !fits {
            return Err(BodyError::TooLarge);
        }
    }
    Ok(raw)
}

async fn handle_http(
    req: hyper::Request<Incoming>,
    tx: mpsc::UnboundedSender<Msg>,
    fp: Option<String>,
    addr: SocketAddr,
    head: HeadForReplies,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let respond = |status: u16, v: Value| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&v).expect("json"),
            )))
            .expect("valid response")
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/command" {
        return Ok(respond(
            404,
            json!({"ok": false, "error": "not_found", "message": "POST /v1/command"}),
        ));
    }
    let raw = match read_body(req.into_body(), MAX_REQUEST_BODY).await {
        Ok(raw) => raw,
        Err(BodyError::TooLarge) => {
            return Ok(respond(
                413,
                json!({"ok": false, "error": "invalid", "message": "request too large"}),
            ));
        }
        Err(BodyError::Transport(e)) => return Err(e),
    };
    let parsed = serde_json::from_slice::<ApiCommand>(&raw);
    drop(raw);
    let cmd = match parsed {
        Ok(c) => c,
        Err(e) => {
            // serde's message never echoes field values.
            return Ok(respond(
                400,
                json!({"ok": false, "error": "invalid", "message": format!("bad command: {e}")}),
            ));
        }
    };
    let is_join = matches!(cmd, ApiCommand::Join { .. });
    let has_certificate = fp.is_some();
    let (rtx, rrx) = oneshot::channel();
    if tx
        .send(Msg::Api {
            fingerprint: fp,
            addr,
            cmd,
            reply: rtx,
        })
        .is_err()
    {
        return Ok(respond(
            503,
            json!({"ok": false, "error": "stopping", "message": "the daemon is stopping"}),
        ));
    }
    let (status, mut v) = rrx.await.unwrap_or((
        503,
        json!({"ok": false, "error": "stopping", "message": "the daemon is stopping"}),
    ));
    // Read after the answer, so it covers what the command recorded.
    // Members get it with every reply (refusals too); a joiner with the
    // reply that made them a member; strangers never.
    let member = has_certificate && v["error"] != "unknown_certificate";
    let joined = is_join && v["ok"] == true;
    if (member || joined)
        && let Some(o) = v.as_object_mut()
    {
        o.insert("audit_head".into(), head.json());
    }
    Ok(respond(status, v))
}

/// Runs the daemon for the vault in `dir` until SIGTERM or SIGINT.
/// `on_ready` gets the bound address once the daemon accepts connections.
pub async fn serve(
    dir: &Path,
    listen: Option<String>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    coffre_sys::return_large_allocations();
    coffre_sys::raise_open_files_limit();
    // Absolute and resolved: the mount table and sysfs speak in such paths,
    // and finding our own mounts after a crash depends on it.
    let dir = &dir.canonicalize().map_err(|source| DirError::Io {
        what: "resolve",
        path: dir.to_path_buf(),
        source,
    })?;
    let vd = VaultDir::new(dir);
    let config = vd.load_config()?;
    let control = vd.load_control()?;
    // Exclusive locks on the volume and its header for the daemon's life.
    let container = Luks2Container::open(&config.volume, Some(&config.header))?;
    let host_key = HostKey::load_or_create(&vd.host_key())?;
    let audit = AuditLog::open(dir, host_key)?;
    let head_for_replies = HeadForReplies {
        watch: audit.head_watch(),
        key: audit.public_hex(),
    };
    let unclean = vd.running_marker().exists();
    coffre_audit::write_atomic(
        &vd.running_marker(),
        std::process::id().to_string().as_bytes(),
        0o600,
    )?;

    let tls = server_config(
        &vd.read(&vd.ca_cert())?,
        &vd.read(&vd.server_cert())?,
        &vd.read(&vd.server_key())?,
    )?;
    let addr = listen.unwrap_or_else(|| config.listen.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: addr.clone(),
        source,
    })?;

    // The rules come from config.toml (the operator's file); the unlock
    // quorum is changed through `coffre quorum` (audited) and lives in the
    // control data.
    let mut persistent = control.vault.clone();
    let quorum = persistent.policy.unlock_quorum;
    persistent.policy = config.policy.clone();
    persistent.policy.unlock_quorum = quorum;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cap =
        u32::try_from(config.kdf_memory_cap_kib.clamp(1, u64::from(u32::MAX))).unwrap_or(u32::MAX);
    // A daemon killed while open leaves its mount, loop device, FUSE
    // file and socket behind: take them down before anything else.
    let layout = vd.data_layout(&config);
    let workloads = coffre_workload::Workloads::new(
        &config.workloads,
        &config.workload,
        coffre_workload::Paths {
            scope: coffre_workload::scope_of(dir),
            run: dir.join("run").join("workloads"),
            data: layout.mountpoint.clone(),
            view: dir.join("run").join("view"),
            cover: (layout.mountpoint.parent() == Some(dir.as_path())).then(|| dir.clone()),
            hide: coffre_data::system::vault_mounts,
            nbd_socket: layout.nbd_socket.clone(),
            vms: dir.join("run").join("vm"),
        },
    );
    // What a crashed daemon left running goes first (it may still be
    // using the data), then the data stack it left.
    let stale_workloads = workloads.cleanup_stale();
    let cleaned = tokio::task::spawn_blocking({
        let layout = layout.clone();
        let grace = Duration::from_secs(config.data.close_grace_s);
        move || coffre_data::cleanup_stale(&layout, grace)
    })
    .await
    .unwrap_or_default();
    let mut shell = Shell {
        dir: vd,
        vault: Vault::new(persistent),
        control,
        config,
        audit,
        audit_backlog: std::collections::VecDeque::new(),
        audit_error: None,
        cipher_slot: None,
        closes_started: 0,
        closes_running: std::collections::HashSet::new(),
        closes_abandoned: std::collections::HashSet::new(),
        join_throttle: HashMap::new(),
        container: Arc::new(RwLock::new(container)),
        passwords: HashMap::new(),
        new_passwords: HashMap::new(),
        joining: std::collections::HashSet::new(),
        join_replies: HashMap::new(),
        replies: HashMap::new(),
        kept: HashMap::new(),
        open_key: None,
        exposure: Arc::default(),
        layout,
        closes_in_flight: 0,
        opening: Arc::default(),
        parked: Vec::new(),
        last_open_error: None,
        kdf_pool: Arc::new(Semaphore::new(cap as usize)),
        kdf_cap: cap,
        tx: tx.clone(),
        next_req: 1,
        vpn: gateway_shell::VpnState::default(),
        gw_tx: None,
        workload_rows: workloads.view(),
        workloads: Arc::new(std::sync::Mutex::new(workloads)),
        cut: None,
        reaping: Arc::default(),
        locked_flag: Arc::default(),
    };
    if let Some(sock) = shell.dir.management_socket(&shell.config) {
        // The socket's directory protects the passwords it carries (the
        // link refuses a socket others could reach, and says why).
        if let Some(parent) = sock.parent() {
            let _ = crate::gateway::private_dir(parent);
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        shell.gw_tx = Some(cmd_tx);
        tokio::spawn(crate::gateway::run(sock, ev_tx, cmd_rx));
        let link_tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                if link_tx.send(Msg::Link(ev)).is_err() {
                    break;
                }
            }
        });
    }
    for line in cleaned {
        shell.system_audit("cleanup", "ok", line);
    }
    shell.workload_audit(stale_workloads);
    if shell
        .config
        .workload
        .iter()
        .any(|w| w.role == coffre_workload::config::Role::Project)
    {
        let at = shell.dir.root.join("run").join("view");
        match coffre_data::cut::CutLayer::mount(&at) {
            Ok(c) => shell.cut = Some(Arc::new(c)),
            Err(e) => shell.system_audit(
                "workload",
                "failed",
                format!("the workloads' view of the data at {}: {e}", at.display()),
            ),
        }
    }
    let lines = shell
        .workloads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .start_services();
    shell.workload_audit(lines);
    shell.run(Event::Boot { unclean });

    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let accept_tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = accept_tx.clone();
            let head = head_for_replies.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let fp = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| fingerprint(c.as_ref()));
                let svc = service_fn(move |req| {
                    handle_http(req, tx.clone(), fp.clone(), peer, head.clone())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let tick_tx = tx.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(500));
        loop {
            iv.tick().await;
            if tick_tx.send(Msg::Tick).is_err() {
                break;
            }
        }
    });
    let sig_tx = tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        let (done, _wait) = oneshot::channel();
        let _ = sig_tx.send(Msg::Shutdown(done));
    });
    on_ready(local);

    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Api {
                fingerprint,
                addr,
                cmd,
                reply,
            } => shell.api(fingerprint, addr, cmd, reply),
            Msg::KeyChecked { req, ok, key } => shell.key_checked(req, ok, key),
            Msg::Joined { joined, result } => {
                let name = joined.name.clone();
                let answer = shell.join_finish(joined, result);
                if let Some(tx) = shell.join_replies.remove(&name) {
                    let _ = tx.send(answer);
                }
            }
            Msg::Exposed(r, lines) => shell.exposed(r, lines),
            Msg::Unexposed {
                close,
                result,
                lines,
            } => {
                shell.closes_running.remove(&close);
                if !shell.closes_abandoned.remove(&close) {
                    shell.unexposed(result, lines);
                }
            }
            Msg::CloseDeadline(close) => shell.close_deadline(close),
            Msg::Link(ev) => shell.link_event(ev),
            Msg::VpnAnswer(a) => shell.vpn_answer(a),
            Msg::Reaped { lines, ended } => shell.reaped(lines, ended),
            Msg::SystemAudit {
                action,
                outcome,
                detail,
            } => shell.system_audit(action, outcome, detail),
            Msg::Tick => {
                shell.flush_audit();
                shell.count_join_refusals();
                shell.reap_workloads();
                shell.expire_invitations();
                shell.vpn_tick();
                shell.run(Event::Tick);
            }
            Msg::Shutdown(done) => {
                shell.shutdown();
                let _ = done.send(());
                break;
            }
        }
    }
    Ok(())
}

//! The VMs' shares over NFS: the server's process (`coffre nfs-server`,
//! in `coffre-nfs`), which the daemon starts when a workload has a
//! `share`, feeds with the exports, and drives through the vault's
//! transitions: at open, after the data is mounted and before the VMs
//! resume, it gets the handle key (derived from the volume key: one way)
//! and opens the shares; at close, after the VMs are paused or
//! suspended and before the data is unmounted, it lets go of every
//! descriptor and of the key. The daemon binds its sockets (on the vault
//! network's host address) and keeps them, so it can start it again
//! should it die; a restarted server is given the exports and, while the
//! vault is open, the key again.

use super::Shell;
use coffre_nfs::{ExportSpec, HandleKey};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How soon a server that died is started again.
pub(super) const RESTART_AFTER: Duration = Duration::from_secs(2);

/// How long the server may take to answer a command. One that does not
/// (a call stuck on storage that stopped answering holds the close) is
/// killed: its descriptors on the data go with it, and the close goes on.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// The server's process and what it must be told.
pub(super) struct NfsChild {
    sockets: Vec<OwnedFd>,
    proc_: Option<(Child, ChildStdin, mpsc::Receiver<String>)>,
    exports: Vec<ExportSpec>,
    /// The handle key while the vault is open (to restart a server).
    key: Option<HandleKey>,
    pub(super) log: PathBuf,
    started: Option<Instant>,
}

impl NfsChild {
    /// Binds the server's sockets on `addr` (NFS and MOUNT on 2049, the
    /// portmapper on 111, TCP and UDP).
    /// When port 111 is taken (the host runs its own rpcbind on every
    /// address), NFS is served without a portmapper and the note says so:
    /// clients then need `port=2049,mountport=2049`.
    pub(super) fn bind(
        addr: std::net::Ipv4Addr,
        log: PathBuf,
    ) -> Result<(Self, Option<String>), String> {
        let listen = |portmap_port| coffre_nfs::Listen {
            addr,
            nfs_port: 2049,
            portmap_port,
        };
        let (sockets, note) = match coffre_nfs::Sockets::bind(&listen(Some(111))) {
            Ok(s) => (s, None),
            Err(e) => {
                let s = coffre_nfs::Sockets::bind(&listen(None))
                    .map_err(|e| format!("binding NFS on {addr}:2049: {e}"))?;
                (
                    s,
                    Some(format!(
                        "no portmapper on {addr}:111 ({e}: is the host's rpcbind listening on every address?); VMs must mount with port=2049,mountport=2049"
                    )),
                )
            }
        };
        Ok((
            Self {
                sockets: sockets.into_fds(),
                proc_: None,
                exports: Vec::new(),
                key: None,
                log,
                started: None,
            },
            note,
        ))
    }

    /// Starts the process, then tells it the exports and (while open)
    /// the key.
    pub(super) fn start(&mut self) -> Result<u32, String> {
        let mut pass_fds = Vec::new();
        for (i, s) in self.sockets.iter().enumerate() {
            let n = i32::try_from(3 + i).unwrap_or(3);
            pass_fds.push((s.try_clone().map_err(|e| e.to_string())?, n));
        }
        // It stays uid 0 and drops every capability but the three it
        // needs itself, before serving anything; it must see the data
        // mount as the host has it.
        let n = self.sockets.len().to_string();
        let mut child = super::network::spawn_helper(
            &["nfs-server", "--sockets", &n],
            &self.log,
            pass_fds,
            Stdio::piped(),
        )?;
        let pid = child.id();
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no pipes to the NFS server".into());
        };
        // Its answers come through a thread, so that waiting for one has a
        // deadline.
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("nfs-answers".into())
            .spawn(move || read_answers(BufReader::new(stdout), &tx))
            .map_err(|e| e.to_string())?;
        self.proc_ = Some((child, stdin, rx));
        self.started = Some(Instant::now());
        let exports = self.exports.clone();
        self.send_exports(exports)?;
        if let Some(k) = self.key.clone() {
            self.send_open(&k)?;
        }
        Ok(pid)
    }

    /// One command, one answer. A server that does not answer is killed
    /// (it is started again by the next tick).
    fn command(&mut self, cmd: &Value) -> Result<Value, String> {
        let mut line = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.command_line(&line)
    }

    fn command_line(&mut self, line: &[u8]) -> Result<Value, String> {
        let Some((_, stdin, answers)) = self.proc_.as_mut() else {
            return Err("the NFS server is not running".into());
        };
        // An answer left over from a command that timed out is not ours.
        while answers.try_recv().is_ok() {}
        if stdin.write_all(line).and_then(|()| stdin.flush()).is_err() {
            self.stop();
            return Err("the NFS server ended".into());
        }
        match answers.recv_timeout(COMMAND_TIMEOUT) {
            Ok(answer) => {
                let v: Value = serde_json::from_str(&answer)
                    .map_err(|e| format!("the NFS server's answer: {e}"))?;
                if v["ok"] == true {
                    Ok(v)
                } else {
                    Err(format!("the NFS server: {}", v["error"]))
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.stop();
                Err(format!(
                    "the NFS server did not answer within {} s: killed",
                    COMMAND_TIMEOUT.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.stop();
                Err("the NFS server ended".into())
            }
        }
    }

    fn send_exports(&mut self, exports: Vec<ExportSpec>) -> Result<Vec<String>, String> {
        let v = self.command(&json!({"cmd": "exports", "exports": exports}))?;
        Ok(failures(&v))
    }

    fn send_open(&mut self, key: &HandleKey) -> Result<Vec<String>, String> {
        let hex = key.to_hex();
        let line = zeroize::Zeroizing::new(format!(
            "{{\"cmd\":\"open\",\"key\":\"{}\"}}\n",
            hex.as_str()
        ));
        let v = self.command_line(line.as_bytes())?;
        Ok(failures(&v))
    }

    /// New exports (a member removed, the daemon started): the server
    /// serves them at once. Returns the shares it could not open.
    pub(super) fn set_exports(&mut self, exports: Vec<ExportSpec>) -> Result<Vec<String>, String> {
        if exports == self.exports && self.proc_.is_some() {
            return Ok(Vec::new());
        }
        self.exports = exports.clone();
        if self.proc_.is_none() {
            return Ok(Vec::new());
        }
        self.send_exports(exports)
    }

    /// The vault is open: serve the shares with this key.
    pub(super) fn open(&mut self, key: HandleKey) -> Result<Vec<String>, String> {
        self.key = Some(key.clone());
        self.send_open(&key)
    }

    /// The vault closes: the server drops every descriptor on the data
    /// and its key, after the calls in flight.
    pub(super) fn close(&mut self) -> Result<(), String> {
        self.key = None;
        if self.proc_.is_none() {
            return Ok(());
        }
        self.command(&json!({"cmd": "close"})).map(drop)
    }

    /// Whether it died (and why), reaping it.
    pub(super) fn died(&mut self) -> Option<String> {
        let (c, _, _) = self.proc_.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.proc_ = None;
                Some(st.to_string())
            }
            _ => None,
        }
    }

    /// Whether it should be started (again) now.
    pub(super) fn due(&self) -> bool {
        self.proc_.is_none() && self.started.is_none_or(|t| t.elapsed() >= RESTART_AFTER)
    }

    /// Its process id, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.proc_.as_ref().map(|(c, _, _)| c.id())
    }

    /// Counters, for status.
    pub(super) fn stats(&mut self) -> Option<Value> {
        self.command(&json!({"cmd": "stats"})).ok()
    }

    pub(super) fn stop(&mut self) {
        if let Some((mut c, stdin, _)) = self.proc_.take() {
            drop(stdin);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Forwards the server's answers, one line each (at most 1 MiB).
fn read_answers(mut out: BufReader<ChildStdout>, tx: &mpsc::Sender<String>) {
    loop {
        let mut line = String::new();
        match std::io::Read::take(&mut out, 1 << 20).read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => {
                if tx.send(line).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

fn failures(v: &Value) -> Vec<String> {
    v["failed"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    format!(
                        "{}: {}",
                        f[0].as_str().unwrap_or("?"),
                        f[1].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The exports of `config`: one per workload with a `share` and an
/// address. Its user is a member's numbers when `share_user` names a
/// member in `[data.members]` (groups: theirs and the team's), else the
/// host account's; a member no longer in the vault gets an export that
/// refuses everything.
pub(super) fn exports(
    config: &crate::vaultdir::Config,
    mountpoint: &Path,
    is_member: impl Fn(&str) -> bool,
) -> (Vec<ExportSpec>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for w in &config.workload {
        let (Some(share), Some(user), Some(client)) = (&w.share, &w.share_user, w.address) else {
            continue;
        };
        let (uid, gid, groups, denied) = match config.data.members.get(user) {
            Some(ids) => {
                let groups = w
                    .share_groups
                    .clone()
                    .unwrap_or_else(|| vec![ids.gid, config.data.team_gid]);
                (ids.uid, ids.gid, groups, !is_member(user))
            }
            None => {
                match coffre_workload::config::share_identity(user, w.share_groups.as_deref()) {
                    Ok(id) => (id.uid, id.gid, id.groups, false),
                    Err(e) => {
                        problems.push(format!("workload {}: {e}", w.name));
                        continue;
                    }
                }
            }
        };
        let share_text = share.to_string_lossy().into_owned();
        out.push(ExportSpec {
            workload: w.name.clone(),
            client,
            path: mountpoint.join(share),
            share: share_text,
            uid,
            gid,
            groups,
            readonly: w.share_readonly,
            denied,
        });
    }
    (out, problems)
}

/// The server as the daemon's parts share it (the open and the close run
/// off the actor).
pub(super) type Shared = std::sync::Arc<std::sync::Mutex<NfsChild>>;

impl Shell {
    /// The NFS server, when a workload has a share.
    pub(super) fn nfs(&self) -> Option<Shared> {
        self.net.as_ref()?.nfs.clone()
    }

    fn nfs_exports(&self) -> (Vec<ExportSpec>, Vec<String>) {
        exports(&self.config, &self.data.layout.mountpoint, |m| {
            self.vault.members().contains_key(m)
        })
    }

    /// At start: the exports, then the process.
    pub(super) fn nfs_start(&mut self) {
        let Some(nfs) = self.nfs() else { return };
        let (exports, problems) = self.nfs_exports();
        for p in problems {
            self.system_audit("nfs", "failed", p);
        }
        let n = exports.len();
        let mut g = nfs.lock().unwrap_or_else(|p| p.into_inner());
        let _ = g.set_exports(exports);
        let r = g.start();
        let log = g.log.clone();
        drop(g);
        match r {
            Ok(pid) => self.system_audit(
                "nfs",
                "up",
                format!(
                    "NFS server (pid {pid}, uid 0 with CAP_DAC_READ_SEARCH, CAP_SETUID and CAP_SETGID only, no network of its own) for {n} share(s); closed until the vault opens"
                ),
            ),
            Err(e) => self.system_audit(
                "nfs",
                "failed",
                format!("the NFS server: {e}; see {}", log.display()),
            ),
        }
    }

    /// Membership changed: the exports again (a removed member's shares
    /// refuse everything at once). On the actor: if an open or a close
    /// holds the server just now, the next tick does it.
    pub(super) fn nfs_update(&mut self) {
        let Some(nfs) = self.nfs() else { return };
        let (exports, _) = self.nfs_exports();
        let Ok(mut g) = nfs.try_lock() else {
            if let Some(n) = self.net.as_mut() {
                n.nfs_dirty = true;
            }
            return;
        };
        if g.exports == exports {
            return;
        }
        let denied: Vec<String> = exports
            .iter()
            .filter(|e| e.denied)
            .map(|e| e.workload.clone())
            .collect();
        let r = g.set_exports(exports);
        drop(g);
        if let Some(n) = self.net.as_mut() {
            n.nfs_dirty = r.is_err();
        }
        match r {
            Ok(failed) if failed.is_empty() => {
                if !denied.is_empty() {
                    self.system_audit(
                        "nfs",
                        "ok",
                        format!(
                            "shares refused from now on (their user is no longer a member): {}",
                            denied.join(", ")
                        ),
                    );
                }
            }
            Ok(failed) => self.system_audit("nfs", "failed", failed.join("; ")),
            Err(e) => self.system_audit("nfs", "failed", e),
        }
    }

    /// The server died: say so, and start it again.
    pub(super) fn nfs_tick(&mut self) {
        let Some(nfs) = self.nfs() else { return };
        if self.net.as_ref().is_some_and(|n| n.nfs_dirty) {
            self.nfs_update();
        }
        // An open or a close holds it: never wait for them on the actor.
        let Ok(mut g) = nfs.try_lock() else { return };
        let mut notes = Vec::new();
        if let Some(why) = g.died() {
            notes.push((
                "failed",
                format!("the NFS server ended ({why}); see {}", g.log.display()),
            ));
        }
        if g.pid().is_none() && g.due() {
            match g.start() {
                Ok(pid) => notes.push(("ok", format!("NFS server started again (pid {pid})"))),
                Err(e) => notes.push(("failed", format!("the NFS server: {e}"))),
            }
        }
        drop(g);
        for (result, n) in notes {
            self.system_audit("nfs", result, n);
        }
    }

    /// `status`'s `nfs` object.
    pub(super) fn nfs_json(&self) -> Value {
        let Some(nfs) = self.nfs() else {
            return json!({"configured": false});
        };
        let (exports, _) = self.nfs_exports();
        let (pid, stats) = match nfs.try_lock() {
            Ok(mut g) => (g.pid(), g.stats()),
            // An open or a close is talking to it.
            Err(_) => (None, Some(json!({"busy": true}))),
        };
        json!({
            "configured": true,
            "pid": pid,
            "stats": stats,
            "exports": exports.iter().map(|e| json!({
                "workload": e.workload,
                "client": e.client.to_string(),
                "share": e.share,
                "uid": e.uid,
                "gid": e.gid,
                "readonly": e.readonly,
                "refused": e.denied,
            })).collect::<Vec<_>>(),
        })
    }
}

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
use super::helper::{Helper, counters, failures};
use coffre_nfs::{ExportSpec, HandleKey};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The server's process and what it must be told.
pub(super) struct NfsChild {
    helper: Helper,
    exports: Vec<ExportSpec>,
    /// The handle key while the vault is open (to restart a server).
    key: Option<HandleKey>,
    /// Where it is confined (`DIR/run/nfs`), holding its own mounts of
    /// the shares and nothing else.
    dir: PathBuf,
    /// Those mounts.
    shares: Vec<coffre_data::ShareView>,
    /// The user it becomes.
    user: (u32, u32),
    /// How many sockets it is given.
    sockets: usize,
    /// Whom it was started to act as (its filter's).
    acts: Option<coffre_sys::seccomp::Acts>,
}

impl NfsChild {
    /// Binds the server's sockets on `addr` (NFS and MOUNT on 2049, the
    /// portmapper on 111, TCP and UDP).
    /// When port 111 is taken (the host runs its own rpcbind on every
    /// address), NFS is served without a portmapper and the note says so:
    /// clients then need `port=2049,mountport=2049`.
    /// `dir` is where it is confined (made at each start), holding the
    /// mounts of `shares` (made at each open). `udp_mark` marks the
    /// portmapper's UDP socket for the vault's output rule.
    pub(super) fn bind(
        addr: std::net::Ipv4Addr,
        log: PathBuf,
        dir: &Path,
        shares: Vec<coffre_data::ShareView>,
        user: (u32, u32),
        udp_mark: u32,
    ) -> Result<(Self, Option<String>), String> {
        let listen = |portmap_port| coffre_nfs::Listen {
            addr,
            nfs_port: 2049,
            portmap_port,
            udp_mark: Some(udp_mark),
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
        let sockets = sockets.into_fds();
        let n = sockets.len();
        Ok((
            Self {
                helper: Helper::new("the NFS server", Vec::new(), sockets, log),
                exports: Vec::new(),
                key: None,
                dir: dir.to_path_buf(),
                shares,
                user,
                sockets: n,
                acts: None,
            },
            note,
        ))
    }

    /// Starts the process, then tells it the exports and (while open)
    /// the key.
    /// `acts`: whom it may act as on files, fixed for its life.
    pub(super) fn start(&mut self, acts: &coffre_sys::seccomp::Acts) -> Result<u32, String> {
        // It becomes `user` (the broker keeping CAP_DAC_READ_SEARCH, the
        // server it forks CAP_SETUID and CAP_SETGID),
        // then confines itself beneath `dir` (Landlock) and filters its
        // system calls (seccomp), before serving anything; it must see
        // the host's mounts as they are (the open mounts the shares in
        // `dir`).
        self.helper.set_args(vec![
            "nfs-server".to_string(),
            "--sockets".to_string(),
            self.sockets.to_string(),
            "--confine".to_string(),
            self.dir.to_string_lossy().into_owned(),
            "--uid".to_string(),
            self.user.0.to_string(),
            "--gid".to_string(),
            self.user.1.to_string(),
            "--acts-uids".to_string(),
            coffre_sys::seccomp::Acts::ranges_text(&acts.uids),
            "--acts-gids".to_string(),
            coffre_sys::seccomp::Acts::ranges_text(&acts.gids),
        ]);
        self.acts = Some(acts.clone());
        // What an older configuration's shares left goes (empty mount
        // points only).
        let left = coffre_data::nfs_dir(&self.dir, &self.shares)
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        if !left.is_empty() {
            return Err(format!(
                "{} holds more than the shares' mount points: {}",
                self.dir.display(),
                left.join("; ")
            ));
        }
        let pid = self.helper.spawn()?;
        let exports = self.exports.clone();
        self.send_exports(exports)?;
        if let Some(k) = self.key.clone() {
            self.send_open(&k)?;
        }
        Ok(pid)
    }

    fn send_exports(&mut self, exports: Vec<ExportSpec>) -> Result<Vec<String>, String> {
        let v = self
            .helper
            .command(&json!({"cmd": "exports", "exports": exports}))?;
        Ok(failures(&v))
    }

    fn send_open(&mut self, key: &HandleKey) -> Result<Vec<String>, String> {
        let hex = key.to_hex();
        let line = zeroize::Zeroizing::new(format!(
            "{{\"cmd\":\"open\",\"key\":\"{}\"}}\n",
            hex.as_str()
        ));
        let v = self.helper.command_line(line.as_bytes())?;
        Ok(failures(&v))
    }

    /// New exports (a member removed, the daemon started): the server
    /// serves them at once. Returns the shares it could not open.
    pub(super) fn set_exports(&mut self, exports: Vec<ExportSpec>) -> Result<Vec<String>, String> {
        if exports == self.exports && self.helper.running() {
            return Ok(Vec::new());
        }
        self.exports = exports.clone();
        if !self.helper.running() {
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
        if !self.helper.running() {
            return Ok(());
        }
        self.helper.command(&json!({"cmd": "close"})).map(drop)
    }

    /// Whether it died (and why), reaping it.
    pub(super) fn died(&mut self) -> Option<String> {
        self.helper.died()
    }

    /// Whether it should be started (again) now.
    pub(super) fn due(&self) -> bool {
        self.helper.due()
    }

    /// Its process id, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.helper.pid()
    }

    /// Its log file.
    pub(super) fn log(&self) -> &Path {
        &self.helper.log
    }

    /// Counters, for status.
    pub(super) fn stats(&mut self) -> Option<Value> {
        let v = self.helper.command(&json!({"cmd": "stats"})).ok()?;
        Some(counters(
            &v,
            &[
                "open", "confined", "filtered", "calls", "jukebox", "replayed", "refused",
            ],
        ))
    }

    pub(super) fn stop(&mut self) {
        self.helper.stop();
    }
}

impl Drop for NfsChild {
    /// The daemon ends: the server with it, then its directory's
    /// read-only mount (a share still mounted there goes too; the data's
    /// own close has taken them down before).
    fn drop(&mut self) {
        self.helper.stop();
        let _ = coffre_data::release_nfs_dir(&self.dir);
    }
}

/// Whom the NFS server may act as on files (its seccomp filter refuses
/// any other `setfsuid` or `setfsgid`, and root always): itself (`user`),
/// the vault's accounts' range, and the users of the exports (members'
/// imported numbers, the host users the shares name) outside it.
/// A host user's own files on the host are what a server taken over
/// could still change the modes of; the members' accounts own none
/// (made without a home).
pub(super) fn acts(
    config: &crate::vaultdir::Config,
    user: (u32, u32),
    exports: &[ExportSpec],
) -> coffre_sys::seccomp::Acts {
    let range = config.accounts.range();
    let outside = |id: u32| id < range.first || id > range.last;
    let mut uids = vec![(user.0, user.0), (range.first, range.last)];
    let mut gids = vec![(user.1, user.1), (range.first, range.last)];
    // The exports' users, as resolved (members' numbers imported from an
    // older vault may lie outside the range; host accounts do).
    for e in exports.iter().filter(|e| !e.denied) {
        if outside(e.uid) {
            uids.push((e.uid, e.uid));
        }
        if outside(e.gid) {
            gids.push((e.gid, e.gid));
        }
    }
    coffre_sys::seccomp::Acts {
        uids: coffre_sys::seccomp::Acts::merged(&uids),
        gids: coffre_sys::seccomp::Acts::merged(&gids),
    }
}

/// The exports of `config`: one per workload with a `share` and an
/// address, at the share's own mount for the server (`views`). Its
/// user is a member's numbers and groups when `share_user` names a
/// current member (`members`); a removed member (`retired`)
/// gets an export that refuses everything; any other name is a host
/// account.
pub(super) fn exports(
    config: &crate::vaultdir::Config,
    views: &[coffre_data::ShareView],
    members: &std::collections::BTreeMap<String, super::accounts::Ids>,
    retired: &dyn Fn(&str) -> bool,
) -> (Vec<ExportSpec>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for w in &config.workload {
        let (Some(share), Some(user), Some(client)) = (&w.share, &w.share_user, w.address) else {
            continue;
        };
        let (uid, gid, groups, denied) = if let Some((uid, gid, groups)) = members.get(user) {
            let groups = w.share_groups.clone().unwrap_or_else(|| groups.clone());
            (*uid, *gid, groups, false)
        } else if retired(user) {
            // Nobody's numbers: every call is refused.
            (u32::MAX - 1, u32::MAX - 1, Vec::new(), true)
        } else {
            match coffre_workload::config::share_identity(user, w.share_groups.as_deref()) {
                Ok(id) => (id.uid, id.gid, id.groups, false),
                Err(e) => {
                    problems.push(format!("workload {}: {e}", w.name));
                    continue;
                }
            }
        };
        let Some(view) = views.iter().find(|v| &v.share == share) else {
            problems.push(format!("workload {}: no mount for its share", w.name));
            continue;
        };
        let share_text = share.to_string_lossy().into_owned();
        out.push(ExportSpec {
            workload: w.name.clone(),
            client,
            path: view.at.clone(),
            mounted: true,
            share: share_text,
            uid,
            gid,
            groups,
            readonly: w.share_readonly,
            async_metadata: w.share_async,
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
        let retired = |n: &str| self.control.accounts.retired.iter().any(|(r, _)| r == n);
        exports(
            &self.config,
            &self.data.layout.nfs_shares,
            &self.member_ids(),
            &retired,
        )
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
        let who = acts(&self.config, g.user, &exports);
        let _ = g.set_exports(exports);
        let r = g.start(&who);
        let log = g.log().to_path_buf();
        drop(g);
        match r {
            Ok(pid) => self.system_audit(
                "nfs",
                "up",
                format!(
                    "NFS server (pid {pid}: its handle broker, user nobody with CAP_DAC_READ_SEARCH only, and the server it forks, nobody with CAP_SETUID and CAP_SETGID only; no network of their own, each confining itself beneath {}) for {n} share(s); closed until the vault opens",
                    self.dir.nfs_dir().display()
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
        if let Some(n) = self.net.as_mut() {
            n.nfs_dirty = false;
        }
        let denied: Vec<String> = exports
            .iter()
            .filter(|e| e.denied)
            .map(|e| e.workload.clone())
            .collect();
        // A share's user whom its filter does not allow (a member with
        // numbers imported from an older vault): the server starts again,
        // allowed them. Never for fewer users.
        let who = acts(&self.config, g.user, &exports);
        if g.pid().is_some() && !g.acts.as_ref().is_some_and(|a| a.covers(&who)) {
            g.stop();
            let _ = g.set_exports(exports);
            let r = g.start(&who);
            drop(g);
            match r {
                Ok(pid) => self.system_audit(
                    "nfs",
                    "ok",
                    format!(
                        "NFS server started again (pid {pid}) to act as a share's user it could not (a member's imported numbers)"
                    ),
                ),
                Err(e) => self.system_audit("nfs", "failed", format!("the NFS server: {e}")),
            }
            self.nfs_audit_denied(&denied);
            return;
        }
        if g.exports == exports {
            return;
        }
        let r = g.set_exports(exports);
        drop(g);
        if let Some(n) = self.net.as_mut() {
            n.nfs_dirty = r.is_err();
        }
        match r {
            Ok(failed) if failed.is_empty() => self.nfs_audit_denied(&denied),
            Ok(failed) => self.system_audit("nfs", "failed", failed.join("; ")),
            Err(e) => self.system_audit("nfs", "failed", e),
        }
    }

    fn nfs_audit_denied(&mut self, denied: &[String]) {
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
                format!("the NFS server ended ({why}); see {}", g.log().display()),
            ));
        }
        if g.pid().is_none() && g.due() {
            let who = acts(&self.config, g.user, &g.exports);
            match g.start(&who) {
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
                "async": e.async_metadata,
                "refused": e.denied,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    /// Each VM's export says what its workload asks: the share's user and
    /// groups, read-only, and whether names and attributes are synced
    /// before each reply (`share_async`).
    #[test]
    fn a_vms_export_follows_its_workloads_share_settings() {
        let config: crate::vaultdir::Config = toml::from_str(
            r#"name = "team"
listen = "127.0.0.1:7443"
volume = "volume.img"
header = "volume.hdr"

[keyslot_kdf]
pbkdf = "argon2id"
iterations = 4
memory_kib = 65536
lanes = 4

[[workload]]
name = "safe"
kind = "qemu"
address = "10.9.0.10"
share = "shared"
share_user = "alice"

[[workload]]
name = "quick"
kind = "qemu"
address = "10.9.0.11"
share = "shared"
share_user = "alice"
share_readonly = true
share_async = true
"#,
        )
        .unwrap();
        let views = [coffre_data::ShareView {
            share: "shared".into(),
            at: "/v/run/nfs/share-0".into(),
        }];
        let members = [("alice".to_string(), (5001, 5001, vec![5001, 4242]))].into();
        let (exports, problems) = super::exports(&config, &views, &members, &|_| false);
        assert!(problems.is_empty(), "{problems:?}");
        let by = |n: &str| exports.iter().find(|e| e.workload == n).unwrap();
        let (safe, quick) = (by("safe"), by("quick"));
        assert_eq!(
            (safe.uid, safe.gid, &safe.groups[..]),
            (5001, 5001, &[5001, 4242][..])
        );
        assert!(safe.mounted && !safe.readonly && !safe.async_metadata);
        assert!(quick.readonly && quick.async_metadata);
        assert_eq!(quick.path, std::path::Path::new("/v/run/nfs/share-0"));
    }
}

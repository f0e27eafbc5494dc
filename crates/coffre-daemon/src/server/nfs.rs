//! The VMs' shares over NFS: a server per VM with a share (`coffre
//! nfs-server`, in `coffre-nfs`: a handle broker and the server it
//! forks), which the daemon starts, feeds with that VM's export, and
//! drives through the vault's transitions: at open, after the data is
//! mounted and before the VMs resume, each gets the handle key (derived
//! from the volume key: one way) and opens its share; at close, after
//! the VMs are paused or suspended and before the data is unmounted,
//! each lets go of every descriptor and of the key. The daemon binds
//! each server's sockets (on the vault network's host address, taking
//! connections from that VM's link alone) and keeps them, so it can start
//! one again should it die; a restarted server is given its export and,
//! while the vault is open, the key again.
//!
//! A server per VM, not one for all: a server taken over by its guest
//! reaches that VM's share alone (its own mount of it, the only thing in
//! the directory it is confined beneath), acts as that VM's share user
//! alone (its seccomp filter), and answers no other VM (its sockets take
//! nothing from another link).

use super::Shell;
use super::helper::{Helper, counters, failures};
use coffre_nfs::{ExportSpec, HandleKey};
use coffre_sys::seccomp::Acts;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// One VM's server: its process, its sockets, what it is told.
struct VmServer {
    /// The workload it serves.
    workload: String,
    helper: Helper,
    /// How many sockets it is given.
    sockets: usize,
    /// Where it is confined (`DIR/run/nfs/NAME`): the VM's own directory,
    /// holding the server's mount of the share and nothing else.
    confine: PathBuf,
    /// Its VM's export.
    exports: Vec<ExportSpec>,
    /// Whom it was started to act as (its filter's).
    acts: Option<Acts>,
    /// The user it runs as: its own (`services`), no other server's.
    user: (u32, u32),
}

/// The VMs' NFS servers and what they must be told.
pub(super) struct NfsChild {
    servers: Vec<VmServer>,
    /// The handle key while the vault is open (to restart a server).
    key: Option<HandleKey>,
    /// The servers' directory (`DIR/run/nfs`), holding a directory per
    /// VM with its mount of the share, and nothing else.
    dir: PathBuf,
    /// Those mounts.
    shares: Vec<coffre_data::ShareView>,
}

/// Which servers [`NfsChild::start`] starts (of those not running).
#[derive(Clone, Copy)]
pub(super) enum Start<'a> {
    /// Every one (the daemon's start).
    All,
    /// Those whose restart delay has passed (the tick).
    Due,
    /// These VMs' (stopped for a start with another filter).
    These(&'a [String]),
}

/// A VM with a share: its workload's name and its link (the tap).
pub(super) struct VmLink {
    pub(super) workload: String,
    pub(super) link: String,
}

impl VmServer {
    /// Starts the process, then tells it the export and (while open) the
    /// key. `acts`: whom it may act as on files, fixed for its life.
    fn start(&mut self, acts: &Acts, key: Option<&HandleKey>) -> Result<u32, String> {
        // It becomes its user (the broker keeping CAP_DAC_READ_SEARCH, the
        // server it forks CAP_SETUID and CAP_SETGID), then confines itself
        // beneath its VM's directory (Landlock) and filters its system
        // calls (seccomp), before serving anything; it must see the host's
        // mounts as they are (the open mounts the share in its directory).
        let mut args = vec![
            "nfs-server".to_string(),
            "--sockets".to_string(),
            self.sockets.to_string(),
            "--confine".to_string(),
            self.confine.to_string_lossy().into_owned(),
            "--uid".to_string(),
            self.user.0.to_string(),
            "--gid".to_string(),
            self.user.1.to_string(),
            "--acts-uids".to_string(),
            Acts::ranges_text(&acts.uids),
            "--acts-gids".to_string(),
            Acts::ranges_text(&acts.gids),
        ];
        if let Some(g) = &acts.groups {
            args.push("--groups".to_string());
            args.push(g.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        }
        self.helper.set_args(args);
        self.acts = Some(acts.clone());
        let pid = self.helper.spawn()?;
        let exports = self.exports.clone();
        self.send_exports(exports)?;
        if let Some(k) = key {
            self.send_open(k)?;
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

    /// Its counters, for status.
    fn stats(&mut self) -> Option<Value> {
        let v = self.helper.command(&json!({"cmd": "stats"})).ok()?;
        Some(counters(
            &v,
            &[
                "open", "confined", "filtered", "calls", "jukebox", "replayed", "refused",
            ],
        ))
    }
}

impl NfsChild {
    /// Binds each VM's server's sockets on `addr` (NFS and MOUNT on
    /// 2049, the portmapper on 111, TCP and UDP), each set bound to its
    /// VM's link alone (`SO_BINDTODEVICE`): the same address and ports,
    /// a server per VM. When port 111 is taken (the host runs its own
    /// rpcbind on every address), NFS is served without a portmapper and
    /// the notes say so: clients then need `port=2049,mountport=2049`.
    /// A VM whose sockets cannot be bound is not served (said in the
    /// notes); none at all is an error.
    /// `dir` is where they are confined (a directory per VM, made at the
    /// first start), holding the mounts of `shares` (made at each open).
    /// `udp_mark` marks the portmapper's UDP sockets for the vault's
    /// output rule. Each server's log is `run/nfs-NAME.log`.
    pub(super) fn bind(
        addr: std::net::Ipv4Addr,
        vms: &[VmLink],
        run: &Path,
        dir: &Path,
        shares: Vec<coffre_data::ShareView>,
        users: &[(u32, u32)],
        udp_mark: u32,
    ) -> Result<(Self, Vec<String>), String> {
        let mut servers = Vec::new();
        let mut notes = Vec::new();
        for (vm, user) in vms.iter().zip(users) {
            let listen = |portmap_port| coffre_nfs::Listen {
                addr,
                nfs_port: 2049,
                portmap_port,
                udp_mark: Some(udp_mark),
                device: Some(vm.link.clone()),
            };
            let sockets = match coffre_nfs::Sockets::bind(&listen(Some(111))) {
                Ok(s) => s,
                Err(e) => match coffre_nfs::Sockets::bind(&listen(None)) {
                    Ok(s) => {
                        notes.push(format!(
                            "{}: no portmapper on {addr}:111 ({e}: is the host's rpcbind listening on every address?); it must mount with port=2049,mountport=2049",
                            vm.workload
                        ));
                        s
                    }
                    Err(e) => {
                        notes.push(format!(
                            "{}: NFS NOT SERVED: binding {addr}:2049 on {}: {e}",
                            vm.workload, vm.link
                        ));
                        continue;
                    }
                },
            };
            let sockets = sockets.into_fds();
            let n = sockets.len();
            servers.push(VmServer {
                workload: vm.workload.clone(),
                helper: Helper::new(
                    "the NFS server",
                    Vec::new(),
                    sockets,
                    run.join(format!("nfs-{}.log", vm.workload)),
                ),
                sockets: n,
                confine: dir.join(&vm.workload),
                exports: Vec::new(),
                acts: None,
                user: *user,
            });
        }
        if servers.is_empty() {
            notes.insert(0, "no VM's sockets could be bound".into());
            return Err(notes.join("; "));
        }
        Ok((
            Self {
                servers,
                key: None,
                dir: dir.to_path_buf(),
                shares,
            },
            notes,
        ))
    }

    /// Each VM's server's uid.
    pub(super) fn users(&self) -> std::collections::BTreeMap<String, u32> {
        self.servers
            .iter()
            .map(|s| (s.workload.clone(), s.user.0))
            .collect()
    }

    /// The VMs served (whose sockets are bound).
    pub(super) fn workloads(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.workload.as_str()).collect()
    }

    /// The servers' directory, mounted (once; kept while mounted).
    fn ready_dir(&self) -> Result<(), String> {
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
        Ok(())
    }

    /// Starts the servers that are not running: those of `which`, or all
    /// whose restart delay has passed; each allowed to act as `acts(its
    /// exports)`. Says what each start gave: the VM, then its broker's
    /// pid or why not.
    pub(super) fn start(&mut self, which: Start<'_>) -> Vec<(String, Result<u32, String>)> {
        let mut out = Vec::new();
        let key = self.key.clone();
        let wanted = |s: &VmServer| {
            s.helper.pid().is_none()
                && match which {
                    Start::All => true,
                    Start::Due => s.helper.due(),
                    Start::These(names) => names.contains(&s.workload),
                }
        };
        if !self.servers.iter().any(wanted) {
            return out;
        }
        let ready = self.ready_dir();
        for s in &mut self.servers {
            if !wanted(s) {
                continue;
            }
            let r = match &ready {
                Ok(()) => s.start(&acts(s.user, &s.exports), key.as_ref()),
                Err(e) => Err(e.clone()),
            };
            out.push((s.workload.clone(), r));
        }
        out
    }

    /// New exports (a member removed, the daemon started): each server
    /// serves its VM's at once. A server whose filter is not exactly the
    /// one its new export asks for is stopped, to be started again with
    /// it: a member who joined since (it could not act as them), or a
    /// member removed (it must no longer be able to). Returns the shares
    /// that could not be opened, and the VMs whose servers were stopped
    /// for a start.
    pub(super) fn set_exports(
        &mut self,
        exports: &[ExportSpec],
    ) -> Result<(Vec<String>, Vec<String>), String> {
        let mut failed = Vec::new();
        let mut stopped = Vec::new();
        let mut errors = Vec::new();
        for s in &mut self.servers {
            let mine: Vec<ExportSpec> = exports
                .iter()
                .filter(|e| e.workload == s.workload)
                .cloned()
                .collect();
            if mine == s.exports && s.helper.running() {
                continue;
            }
            s.exports = mine.clone();
            if !s.helper.running() {
                continue;
            }
            if s.acts.as_ref() != Some(&acts(s.user, &mine)) {
                s.helper.stop();
                stopped.push(s.workload.clone());
                continue;
            }
            match s.send_exports(mine) {
                Ok(f) => failed.extend(f),
                Err(e) => errors.push(format!("{}: {e}", s.workload)),
            }
        }
        if errors.is_empty() {
            Ok((failed, stopped))
        } else {
            Err(errors.join("; "))
        }
    }

    /// Whether the exports differ from what the servers were told.
    pub(super) fn exports_differ(&self, exports: &[ExportSpec]) -> bool {
        self.servers.iter().any(|s| {
            let mine = exports.iter().filter(|e| e.workload == s.workload);
            !mine.eq(s.exports.iter())
        })
    }

    /// `f` on every running server at once, each on a thread of its own:
    /// one that does not answer holds the others no longer than its own
    /// command's deadline (a close stuck on storage, for each VM, must not
    /// add up past the close's own deadline).
    fn each<T: Send>(&mut self, f: &(dyn Fn(&mut VmServer) -> T + Sync)) -> Vec<(String, T)> {
        let mut running: Vec<&mut VmServer> = self
            .servers
            .iter_mut()
            .filter(|s| s.helper.running())
            .collect();
        // What `f` left on a stack (the handle key's hex, its MAC state)
        // is scrubbed once it returns: a thread's stack is kept by glibc
        // for the next thread, unwiped.
        if let [one] = &mut running[..] {
            let r = f(one);
            coffre_luks2::secret::scrub_stack();
            return vec![(one.workload.clone(), r)];
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = running
                .into_iter()
                .map(|s| {
                    scope.spawn(move || {
                        let r = f(s);
                        coffre_luks2::secret::scrub_stack();
                        (s.workload.clone(), r)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }

    /// The vault is open: each server serves its share with this key.
    pub(super) fn open(&mut self, key: &HandleKey) -> Result<Vec<String>, String> {
        self.key = Some(key.clone());
        let mut failed = Vec::new();
        let mut errors = Vec::new();
        for (vm, r) in self.each(&|s: &mut VmServer| s.send_open(key)) {
            match r {
                Ok(f) => failed.extend(f),
                Err(e) => errors.push(format!("{vm}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(failed)
        } else {
            Err(errors.join("; "))
        }
    }

    /// The vault closes: each server drops every descriptor on the data
    /// and its key, after the calls in flight (one that does not answer
    /// in time is killed, and its descriptors go with it).
    pub(super) fn close(&mut self) -> Result<(), String> {
        self.key = None;
        let mut errors = Vec::new();
        let closed = self.each(&|s: &mut VmServer| s.helper.command(&json!({"cmd": "close"})));
        for (vm, r) in closed {
            if let Err(e) = r {
                errors.push(format!("{vm}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The servers that died (and why), reaped: the VM, the reason, its
    /// log.
    pub(super) fn died(&mut self) -> Vec<(String, String, PathBuf)> {
        self.servers
            .iter_mut()
            .filter_map(|s| {
                let why = s.helper.died()?;
                Some((s.workload.clone(), why, s.helper.log.clone()))
            })
            .collect()
    }

    /// Each server's VM, broker pid (while it runs) and counters (none
    /// from one that did not answer).
    pub(super) fn servers(&mut self) -> Vec<(String, Option<u32>, Option<Value>)> {
        let mut stats = self.each(&|s: &mut VmServer| s.stats());
        self.servers
            .iter()
            .map(|s| {
                let pid = s.helper.pid();
                let st = stats
                    .iter_mut()
                    .find(|(vm, _)| *vm == s.workload)
                    .and_then(|(_, st)| st.take())
                    .filter(|_| pid.is_some());
                (s.workload.clone(), pid, st)
            })
            .collect()
    }

    pub(super) fn stop(&mut self) {
        for s in &mut self.servers {
            s.helper.stop();
        }
    }
}

impl Drop for NfsChild {
    /// The daemon ends: the servers with it, then their directory's
    /// read-only mount (a share still mounted there goes too; the data's
    /// own close has taken them down before).
    fn drop(&mut self) {
        self.stop();
        let _ = coffre_data::release_nfs_dir(&self.dir);
    }
}

/// Whom a VM's NFS server may act as on files (its seccomp filter
/// refuses any other `setfsuid` or `setfsgid`, and root always): itself
/// (`user`) and its VM's share user (a member's numbers, or the host user
/// the share names), nobody else. A share whose user has no numbers yet
/// (a member not joined) adds none: when they come, the server is
/// started again allowed them. A host user's own files on the host are
/// what a server taken over could still change the modes of; the
/// members' accounts own none (made without a home).
/// Its groups too are fixed for its life, its share user's (none while
/// it has no user): set before its filter, which refuses any change (a
/// server taken over cannot take on another member's group). When they
/// change (a member given `_superusers`, say), it is started again.
pub(super) fn acts(user: (u32, u32), exports: &[ExportSpec]) -> Acts {
    let mut uids = vec![(user.0, user.0)];
    let mut gids = vec![(user.1, user.1)];
    let mut lists = Vec::new();
    for e in exports.iter().filter(|e| !e.denied) {
        uids.push((e.uid, e.uid));
        gids.push((e.gid, e.gid));
        let mut g = e.groups.clone();
        g.sort_unstable();
        g.dedup();
        lists.push(g);
    }
    lists.dedup();
    Acts {
        uids: Acts::merged(&uids),
        gids: Acts::merged(&gids),
        // Several users' groups (never, one export per VM): changed per
        // call, as the users' are.
        groups: match &lists[..] {
            [] => Some(Vec::new()),
            [one] => Some(one.clone()),
            _ => None,
        },
    }
}

/// The exports of `config`: one per workload with a `share` and an
/// address, at its VM's own mount of the share (`views`). Its
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
        // Its VM's own mount of the share (`NAME/share`).
        let own = Path::new(&w.name).join("share");
        let Some(view) = views
            .iter()
            .find(|v| &v.share == share && v.at.ends_with(&own))
        else {
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

    /// At start: the exports, then the servers.
    pub(super) fn nfs_start(&mut self) {
        let Some(nfs) = self.nfs() else { return };
        let (exports, problems) = self.nfs_exports();
        for p in problems {
            self.system_audit("nfs", "failed", p);
        }
        let mut g = nfs.lock().unwrap_or_else(|p| p.into_inner());
        let _ = g.set_exports(&exports);
        let started = g.start(Start::All);
        let users = g.users();
        drop(g);
        for (vm, r) in started {
            let uid = users.get(&vm).copied().unwrap_or_default();
            match r {
                Ok(pid) => self.system_audit(
                    "nfs",
                    "up",
                    format!(
                        "NFS server for {vm} (pid {pid}: its handle broker, uid {uid} (its own, of no account) with CAP_DAC_READ_SEARCH only, and the server it forks, the same uid with CAP_SETUID and CAP_SETGID only; limited to {} processes, {} MiB of data and {} files; no network of their own, taking connections from {vm}'s link alone, each confining itself beneath {}); closed until the vault opens",
                        coffre_nfs::control::LIMITS.processes,
                        coffre_nfs::control::LIMITS.data_bytes >> 20,
                        coffre_nfs::control::LIMITS.open_files,
                        self.dir.nfs_vm_dir(&vm).display()
                    ),
                ),
                Err(e) => self.system_audit(
                    "nfs",
                    "failed",
                    format!(
                        "the NFS server for {vm}: {e}; see {}",
                        self.dir.nfs_log(&vm).display()
                    ),
                ),
            }
        }
    }

    /// Membership changed: the exports again (a removed member's shares
    /// refuse everything at once). On the actor: if an open or a close
    /// holds the servers just now, the next tick does it.
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
        if !g.exports_differ(&exports) {
            return;
        }
        let denied: Vec<String> = exports
            .iter()
            .filter(|e| e.denied)
            .map(|e| e.workload.clone())
            .collect();
        // A server whose filter is not its share user's now (a member
        // who joined since it started, or one removed) is stopped and
        // started again at once, with the filter its export asks for.
        let r = g.set_exports(&exports);
        let started = match &r {
            Ok((_, stopped)) if !stopped.is_empty() => g.start(Start::These(stopped)),
            _ => Vec::new(),
        };
        drop(g);
        if let Some(n) = self.net.as_mut() {
            n.nfs_dirty = r.is_err();
        }
        for (vm, r) in started {
            match r {
                Ok(pid) => self.system_audit(
                    "nfs",
                    "ok",
                    format!(
                        "NFS server for {vm} started again (pid {pid}) to act as its share's user now, with their groups (a member who joined, was removed, or whose groups changed since)"
                    ),
                ),
                Err(e) => {
                    self.system_audit("nfs", "failed", format!("the NFS server for {vm}: {e}"));
                }
            }
        }
        match r {
            Ok((failed, _)) if failed.is_empty() => self.nfs_audit_denied(&denied),
            Ok((failed, _)) => self.system_audit("nfs", "failed", failed.join("; ")),
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

    /// A server died: say so, and start it again.
    pub(super) fn nfs_tick(&mut self) {
        let Some(nfs) = self.nfs() else { return };
        if self.net.as_ref().is_some_and(|n| n.nfs_dirty) {
            self.nfs_update();
        }
        // An open or a close holds them: never wait for them on the actor.
        let Ok(mut g) = nfs.try_lock() else { return };
        let mut notes = Vec::new();
        for (vm, why, log) in g.died() {
            notes.push((
                "failed",
                format!(
                    "the NFS server for {vm} ended ({why}); see {}",
                    log.display()
                ),
            ));
        }
        for (vm, r) in g.start(Start::Due) {
            match r {
                Ok(pid) => notes.push((
                    "ok",
                    format!("NFS server for {vm} started again (pid {pid})"),
                )),
                Err(e) => notes.push(("failed", format!("the NFS server for {vm}: {e}"))),
            }
        }
        drop(g);
        for (result, n) in notes {
            self.system_audit("nfs", result, n);
        }
    }

    /// `status`'s `nfs` object: each export with its VM's server (`pid`,
    /// its broker's, whose child is the server; `stats`), and `stats`
    /// over them all (counters summed; `open`, `confined` and `filtered`
    /// only when every running server is).
    pub(super) fn nfs_json(&self) -> Value {
        let Some(nfs) = self.nfs() else {
            return json!({"configured": false});
        };
        let (exports, _) = self.nfs_exports();
        let servers = match nfs.try_lock() {
            Ok(mut g) => Some(g.servers()),
            // An open or a close is talking to them.
            Err(_) => None,
        };
        let stats = match &servers {
            // A server that runs and did not say: the flags are unknown.
            Some(all) => total(
                all.iter()
                    .filter(|(_, pid, _)| pid.is_some())
                    .map(|(_, _, s)| s.as_ref()),
            ),
            None => json!({"busy": true}),
        };
        let of = |vm: &str| match &servers {
            Some(all) => all
                .iter()
                .find(|(w, _, _)| w == vm)
                .map_or((None, None), |(_, pid, st)| (*pid, st.clone())),
            None => (None, Some(json!({"busy": true}))),
        };
        json!({
            "configured": true,
            "stats": stats,
            "exports": exports.iter().map(|e| {
                let (pid, st) = of(&e.workload);
                json!({
                    "workload": e.workload,
                    "client": e.client.to_string(),
                    "share": e.share,
                    "uid": e.uid,
                    "gid": e.gid,
                    "readonly": e.readonly,
                    "async": e.async_metadata,
                    "refused": e.denied,
                    "pid": pid,
                    "stats": st,
                })
            }).collect::<Vec<_>>(),
        })
    }
}

/// The running servers' counters together: numbers summed; a flag true
/// only when it is in every one (and there is one). A server that did not
/// answer (`None`) leaves the flags unknown: left out.
fn total<'a>(each: impl Iterator<Item = Option<&'a Value>>) -> Value {
    let mut out = serde_json::Map::new();
    let mut any = false;
    let mut unknown = false;
    for s in each {
        any = true;
        let Some(o) = s.and_then(Value::as_object) else {
            unknown = true;
            continue;
        };
        for (k, v) in o {
            let merged = match (out.get(k), v) {
                (None, v) => v.clone(),
                (Some(Value::Bool(a)), Value::Bool(b)) => Value::Bool(*a && *b),
                (Some(Value::Number(a)), Value::Number(b)) => {
                    json!(
                        a.as_u64()
                            .unwrap_or(0)
                            .saturating_add(b.as_u64().unwrap_or(0))
                    )
                }
                (Some(a), _) => a.clone(),
            };
            out.insert(k.clone(), merged);
        }
    }
    if unknown {
        out.retain(|_, v| !v.is_boolean());
    }
    if any { Value::Object(out) } else { Value::Null }
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
        // Each VM's own mount of the share.
        let views = ["safe", "quick"].map(|vm| coffre_data::ShareView {
            share: "shared".into(),
            at: format!("/v/run/nfs/{vm}/share").into(),
        });
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
        assert_eq!(quick.path, std::path::Path::new("/v/run/nfs/quick/share"));
        assert_eq!(safe.path, std::path::Path::new("/v/run/nfs/safe/share"));
        // Each VM's server may act as itself and its share's user alone:
        // not as any other member of the vault's accounts.
        let nobody = (65534, 65534);
        let a = super::acts(nobody, std::slice::from_ref(safe));
        let allowed =
            |ids: &[(u32, u32)], id: u32| ids.iter().any(|(lo, hi)| (*lo..=*hi).contains(&id));
        for (id, yes) in [
            (65534, true),
            (5001, true),
            (5002, false),
            (5000, false),
            (0, false),
        ] {
            assert_eq!(allowed(&a.uids, id), yes, "uid {id}");
            assert_eq!(allowed(&a.gids, id), yes, "gid {id}");
        }
        // Its groups, fixed for its life: the share user's, sorted.
        assert_eq!(a.groups, Some(vec![4242, 5001]));
        // A refused share's user (a removed member) adds no one, and no
        // group.
        let mut gone = safe.clone();
        gone.denied = true;
        let g = super::acts(nobody, &[gone]);
        assert_eq!(g.uids, vec![(65534, 65534)]);
        assert_eq!(g.groups, Some(Vec::new()));
    }

    /// `status` sums the servers' counters and says confined or filtered
    /// only when every server is.
    #[test]
    fn the_servers_counters_add_up_and_flags_need_every_server() {
        use serde_json::json;
        let a = json!({"open": true, "confined": true, "filtered": true, "calls": 3});
        let b = json!({"open": true, "confined": false, "filtered": true, "calls": 4});
        let t = super::total([Some(&a), Some(&b)].into_iter());
        assert_eq!(
            t,
            json!({"open": true, "confined": false, "filtered": true, "calls": 7})
        );
        // One that did not answer: no flag can be said for all.
        let t = super::total([Some(&a), None].into_iter());
        assert_eq!(t, json!({"calls": 3}));
        assert_eq!(super::total(std::iter::empty()), serde_json::Value::Null);
    }
}

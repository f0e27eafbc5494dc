//! The team's workloads: processes in their own cgroups and QEMU virtual
//! machines, declared in `config.toml` (see [`config`]).
//!
//! Project workloads follow the vault: [`Workloads::resume`] starts or
//! thaws them once the data is exposed, [`Workloads::pause`] freezes them
//! (fast mode) or stops them (safe mode) before it goes. Service workloads
//! run all the time in a mount namespace where the data does not exist.
//!
//! Project processes never see the ext4 mount itself: in their own mount
//! namespace, the data's path is a FUSE layer the daemon cuts at close
//! (every file it holds on the volume closed) and restores at open, so a
//! frozen process keeps its open files without keeping the volume busy.
#![warn(missing_docs)]

pub mod cgroup;
pub mod config;
mod error;
pub mod log;
pub mod qmp;
mod vm;

use cgroup::{Group, Hierarchy};
use config::{Kind, Role, Settings, WorkloadConfig};
pub use error::WorkloadError;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a kill may take.
pub(crate) const KILL_WITHIN: Duration = Duration::from_secs(5);

/// The longest one of `workloads` may take to stop or suspend when
/// nothing hangs: a process its `stop_timeout_s`, then SIGKILL; a VM its
/// monitor's answers (suspended into the vault, then told to quit) on top.
pub fn stop_within(workloads: &[config::WorkloadConfig]) -> Duration {
    workloads
        .iter()
        .map(|w| {
            let own = Duration::from_secs(w.stop_timeout_s) + KILL_WITHIN;
            match w.kind {
                Kind::Qemu => own + qmp::ANSWER_WITHIN + vm::QUIT_WITHIN,
                Kind::Process => own,
            }
        })
        .max()
        .unwrap_or_default()
}

/// How the vault closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// Freeze in memory.
    Fast,
    /// Suspend into the volume (processes: stop).
    Safe,
}

/// Where things are.
#[derive(Clone, Debug)]
pub struct Paths {
    /// Names this vault's cgroups (`coffre-XXXX`).
    pub scope: String,
    /// Host-side run directory (service logs, pid files): `DIR/run/workloads`.
    pub run: PathBuf,
    /// The data's mountpoint.
    pub data: PathBuf,
    /// The cut layer's mountpoint (project processes see it at `data`).
    pub view: PathBuf,
    /// Hidden under an empty tmpfs in workloads' namespaces (the vault
    /// directory, when the data's mountpoint is directly in it): its
    /// files are none of theirs, and a member's workload must reach the
    /// data's path.
    pub cover: Option<PathBuf>,
    /// Mounts a workload's namespace must not keep a copy of (asked
    /// afresh at each start: other vaults on the host come and go).
    pub hide: fn() -> Vec<PathBuf>,
    /// The NBD socket VMs attach their disks through.
    pub nbd_socket: PathBuf,
    /// Where each VM's own run directory goes (`DIR/run/vm`, root's
    /// alone): `NAME/` holds its QMP socket and the NBD socket that serves
    /// its disks and no other's.
    pub vms: PathBuf,
}

/// A VM's run directory under `vms` (owned by the VM user, 0700).
pub fn vm_dir(vms: &Path, name: &str) -> PathBuf {
    vms.join(name)
}

/// The NBD socket serving a VM's own disks, in its run directory.
pub fn vm_nbd_socket(vms: &Path, name: &str) -> PathBuf {
    vm_dir(vms, name).join("nbd.sock")
}

/// The user VMs run as: (uid, gid, groups), or why not.
pub fn vm_credentials(settings: &Settings) -> Result<(u32, u32, Vec<u32>), WorkloadError> {
    let u = &settings.vm_user;
    let creds = coffre_sys::child::user(u)
        .map_err(|e| WorkloadError::User(format!("user {u}: {e}")))?
        .ok_or_else(|| {
            WorkloadError::User(format!(
                "the user {u} that VMs run as does not exist: `coffre init` creates it, or run \
                 `useradd --system --no-create-home --shell /usr/sbin/nologin {u}` (and add it \
                 to the kvm group for KVM), or name another with [workloads] vm_user"
            ))
        })?;
    if creds.0 == 0 {
        return Err(WorkloadError::User(format!(
            "VMs do not run as root: {u} has uid 0"
        )));
    }
    Ok(creds)
}

impl Paths {
    /// Log file of a project workload (inside the volume).
    pub fn project_log(&self, name: &str) -> PathBuf {
        self.data
            .join(".coffre")
            .join("logs")
            .join(format!("{name}.log"))
    }

    /// Log file of a service workload (on the host).
    pub fn service_log(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.log"))
    }
}

/// A workload's state, as `coffre status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Not started (or stopped at a close in safe mode).
    Stopped,
    /// Started and not held.
    Running,
    /// Frozen in memory (fast mode).
    Frozen,
    /// Its state is saved inside the volume (safe mode).
    SuspendedToVault,
    /// It ended by itself.
    Exited,
    /// Something went wrong; `note` says what.
    Failed,
}

impl State {
    /// The word status shows.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Running => "running",
            Self::Frozen => "frozen",
            Self::SuspendedToVault => "suspended-to-vault",
            Self::Exited => "exited",
            Self::Failed => "failed",
        }
    }
}

/// One row of `coffre status`.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The workload's name from config.toml.
    pub name: String,
    /// `process` or `qemu`.
    pub kind: &'static str,
    /// `project` or `service`.
    pub role: &'static str,
    /// Where it is in its lifecycle.
    pub state: State,
    /// Main process id while it has one.
    pub pid: Option<i32>,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
    /// What happened last, in words.
    pub note: String,
    /// Members who may use it (empty: everyone).
    pub members: Vec<String>,
}

/// A child that made its own mount namespace dropped the vault mounts the
/// host had when it was prepared; one that appeared between that listing
/// and the child's unshare (another vault opening, another vault's format)
/// is in its copy, where it would outlive that vault's close (whose
/// daemon would then stop this workload as a holder). Take such copies
/// out now, lazily, in the child's namespace only: later host mounts do
/// not propagate into it (its mounts are private).
pub(crate) fn sweep_copies(pid: u32, hide: fn() -> Vec<PathBuf>) {
    let hidden = hide();
    let host: Vec<(PathBuf, String, String)> = coffre_sys::proc::mountinfo()
        .into_iter()
        .filter(|m| hidden.contains(&m.mountpoint))
        .map(|m| (m.mountpoint, m.fstype, m.source))
        .collect();
    let mine = coffre_sys::proc::mountinfo_at(Path::new(&format!("/proc/{pid}")));
    for m in mine.iter().rev() {
        let key = (m.mountpoint.clone(), m.fstype.clone(), m.source.clone());
        if host.contains(&key) {
            let _ = coffre_sys::child::system_tool("nsenter")
                .args(["-t", &pid.to_string(), "-m", "--", "umount", "-l"])
                .arg(&m.mountpoint)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A workload's link to the vault network, made by the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// A VM's tap (host side name) and the MAC of the NIC on it.
    Tap {
        /// The tap's name.
        name: String,
        /// The guest NIC's MAC.
        mac: [u8; 6],
    },
    /// A process workload's network namespace (`/run/netns/NAME`).
    Namespace(PathBuf),
}

/// Something worth an audit record: (action, result, detail).
pub type Line = (String, String, String);

struct Running {
    child: Child,
    group: Group,
    /// The thread pumping its output into its log.
    pump: Option<std::thread::JoinHandle<()>>,
    /// QEMU's control connection.
    qmp: Option<qmp::Qmp>,
}

struct Entry {
    cfg: WorkloadConfig,
    state: State,
    since: u64,
    note: String,
    proc: Option<Running>,
    sink: log::Sink,
}

impl Entry {
    fn set(&mut self, state: State, note: impl Into<String>) {
        self.state = state;
        self.since = coffre_sys::time::now_ms();
        self.note = note.into();
    }

    fn row(&self) -> Row {
        Row {
            name: self.cfg.name.clone(),
            kind: match self.cfg.kind {
                Kind::Process => "process",
                Kind::Qemu => "qemu",
            },
            role: match self.cfg.role {
                Role::Project => "project",
                Role::Service => "service",
            },
            state: self.state.clone(),
            pid: self
                .proc
                .as_ref()
                .and_then(|p| i32::try_from(p.child.id()).ok()),
            since_ms: self.since,
            note: self.note.clone(),
            members: self.cfg.members.clone(),
        }
    }
}

/// All of a vault's workloads.
pub struct Workloads {
    settings: Settings,
    paths: Paths,
    /// Each workload's link to the vault network, by name (none when the
    /// vault has no `[network]`).
    links: std::collections::BTreeMap<String, Link>,
    /// Whether VMs run in an empty network namespace (the vault has a
    /// `[network]`: a VM's only way anywhere is the NIC it is given).
    vms_isolated: bool,
    hierarchy: Result<Hierarchy, WorkloadError>,
    entries: Vec<Entry>,
    published: Arc<RwLock<Vec<Row>>>,
    /// Workloads handled by a pause or a stop so far: whoever waits for
    /// one (the daemon's stop) sees it move without taking the lock.
    handled: Arc<std::sync::atomic::AtomicU64>,
    /// The vault's members' numbers (uid, gid, groups) by name: a
    /// workload's `user` that names a member runs with them.
    members: std::collections::BTreeMap<String, (u32, u32, Vec<u32>)>,
}

/// Milliseconds since `t`, to a tenth (pauses take well under one).
pub(crate) fn ms(t: Instant) -> String {
    format!("{:.1}", t.elapsed().as_secs_f64() * 1000.0)
}

pub(crate) fn line(action: &str, result: &str, detail: String) -> Line {
    (action.to_string(), result.to_string(), detail)
}

impl Workloads {
    /// Sets them up (nothing starts yet). `list` must have passed
    /// [`config::check_all`].
    pub fn new(settings: &Settings, list: &[WorkloadConfig], paths: Paths) -> Self {
        let mut entries: Vec<Entry> = list
            .iter()
            .map(|cfg| Entry {
                cfg: cfg.clone(),
                state: State::Stopped,
                since: coffre_sys::time::now_ms(),
                note: String::new(),
                proc: None,
                sink: log::Sink::default(),
            })
            .collect();
        entries.sort_by_key(|e| e.cfg.order);
        let hierarchy = if list.is_empty() {
            Err(WorkloadError::Cgroup("no workloads".into()))
        } else {
            Hierarchy::detect(settings.freezer)
        };
        for e in &mut entries {
            if e.cfg.kind == Kind::Qemu
                && paths.run.join(format!("{}.suspended", e.cfg.name)).exists()
            {
                e.state = State::SuspendedToVault;
                e.note = "its state is in the vault; it resumes when the vault opens".into();
            }
        }
        let w = Self {
            settings: settings.clone(),
            paths,
            links: Default::default(),
            vms_isolated: false,
            hierarchy,
            entries,
            published: Arc::default(),
            handled: Arc::default(),
            members: Default::default(),
        };
        w.publish();
        w
    }

    /// How many workloads a pause or a stop has handled so far (each is
    /// counted as it begins, once the one before has ended).
    pub fn handled(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.handled.clone()
    }

    fn count_handled(&self) {
        self.handled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Puts the workloads on the vault network: `links` by workload name
    /// (the daemon has made them); every VM then runs in an empty network
    /// namespace, its NIC (if it has a link) a tap descriptor.
    pub fn attach_network(&mut self, links: std::collections::BTreeMap<String, Link>) {
        self.links = links;
        self.vms_isolated = true;
    }

    /// The vault's members' numbers (uid, gid, groups) by name: a
    /// process workload whose `user` names a member runs with them from
    /// its next start.
    pub fn set_members(
        &mut self,
        members: std::collections::BTreeMap<String, (u32, u32, Vec<u32>)>,
    ) {
        self.members = members;
    }

    /// What status shows, readable without waiting for an operation.
    pub fn view(&self) -> Arc<RwLock<Vec<Row>>> {
        self.published.clone()
    }

    /// The freezer in use, or why there is none.
    pub fn freezer(&self) -> Result<cgroup::FreezerKind, WorkloadError> {
        self.hierarchy
            .as_ref()
            .map(|h| h.kind)
            .map_err(Clone::clone)
    }

    /// The declaration of `name`.
    pub fn config(&self, name: &str) -> Option<&WorkloadConfig> {
        self.entries.iter().map(|e| &e.cfg).find(|c| c.name == name)
    }

    /// The log file of `name`.
    pub fn log_path(&self, name: &str) -> Option<PathBuf> {
        let cfg = self.config(name)?;
        Some(match cfg.role {
            Role::Project => self.paths.project_log(name),
            Role::Service => self.paths.service_log(name),
        })
    }

    fn publish(&self) {
        let rows = self.entries.iter().map(Entry::row).collect();
        *self.published.write().unwrap_or_else(|p| p.into_inner()) = rows;
    }

    /// Kills what a previous daemon of this vault left running (its
    /// workloads' cgroups). Returns what it did, for the audit log.
    pub fn cleanup_stale(&self) -> Vec<Line> {
        let mut out = Vec::new();
        let Ok(h) = &self.hierarchy else {
            return out;
        };
        for g in h.groups(&self.paths.scope) {
            let name = g
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let frozen = g.is_frozen();
            match g.kill_all(KILL_WITHIN) {
                Ok(0) => g.remove(),
                Ok(n) => out.push(line(
                    "workload",
                    "killed",
                    format!(
                        "{name}: {n} process(es) left by a previous daemon{} killed",
                        if frozen { " (frozen)" } else { "" }
                    ),
                )),
                Err(e) => out.push(line("workload", "failed", format!("{name}: {e}"))),
            }
        }
        if let Ok(rd) = std::fs::read_dir(h.root.join(&self.paths.scope))
            && rd.count() == 0
        {
            let _ = std::fs::remove_dir(h.root.join(&self.paths.scope));
        }
        out
    }

    /// Starts the service workloads (at daemon start).
    pub fn start_services(&mut self) -> Vec<Line> {
        let mut out = Vec::new();
        for i in 0..self.entries.len() {
            if self.entries[i].cfg.role == Role::Service {
                self.start(i, &mut out);
            }
        }
        self.publish();
        out
    }

    /// The vault is open and its data exposed: project workloads start or
    /// thaw, in order.
    pub fn resume(&mut self) -> Vec<Line> {
        let mut out = Vec::new();
        let t = Instant::now();
        let mut n = 0;
        for i in 0..self.entries.len() {
            if self.entries[i].cfg.role != Role::Project {
                continue;
            }
            n += usize::from(self.entries[i].state != State::Running);
            let name = self.entries[i].cfg.name.clone();
            if let Err(e) = self.entries[i].sink.attach(&self.paths.project_log(&name)) {
                out.push(line("workload", "note", format!("{name}: log file: {e}")));
            }
            match self.entries[i].state {
                State::Frozen => {
                    let t = Instant::now();
                    let r = match self.entries[i].cfg.kind {
                        Kind::Process => self.entries[i]
                            .proc
                            .as_ref()
                            .map(|p| p.group.thaw())
                            .unwrap_or(Ok(()))
                            .map_err(|e| WorkloadError::Cgroup(e.to_string())),
                        Kind::Qemu => self.continue_vm(i),
                    };
                    match r {
                        Ok(()) => {
                            self.entries[i].set(State::Running, "thawed");
                            out.push(line(
                                "workload",
                                "thawed",
                                format!("{name} in {} ms", crate::ms(t)),
                            ));
                        }
                        Err(e) => {
                            self.kill(i, &format!("could not be thawed ({e})"), &mut out);
                        }
                    }
                }
                State::Running => {}
                _ => self.start(i, &mut out),
            }
        }
        if n > 0 {
            out.push(line(
                "workloads",
                "resumed",
                format!("{n} workload(s) in {} ms", crate::ms(t)),
            ));
        }
        self.publish();
        out
    }

    /// The vault is closing: project workloads are frozen (fast) or
    /// stopped (safe), in reverse order; one that fails is killed. Their
    /// log files are closed. Afterwards no workload of ours uses the data.
    pub fn pause(&mut self, mode: Pause) -> Vec<Line> {
        let mut out = Vec::new();
        let t = Instant::now();
        let mut n = 0;
        if mode == Pause::Fast {
            // Ask every group at once: the kernel freezes them in
            // parallel, and each wait below is then short.
            for e in self.entries.iter().rev() {
                if e.cfg.role == Role::Project
                    && e.state == State::Running
                    && e.cfg.kind == Kind::Process
                    && let Some(p) = e.proc.as_ref()
                {
                    let _ = p.group.request_freeze();
                }
            }
        }
        for i in (0..self.entries.len()).rev() {
            if self.entries[i].cfg.role != Role::Project {
                continue;
            }
            self.count_handled();
            self.reap_one(i, &mut out);
            let state = self.entries[i].state.clone();
            // A close that failed before may have frozen some already; if
            // the mode became safe meanwhile, they are stopped or
            // suspended now, as the mode in force says.
            if state == State::Running || (state == State::Frozen && mode == Pause::Safe) {
                n += 1;
                match (mode, self.entries[i].cfg.kind) {
                    (Pause::Fast, Kind::Process) => self.freeze(i, &mut out),
                    (Pause::Fast, Kind::Qemu) => self.pause_vm(i, &mut out),
                    (Pause::Safe, Kind::Process) => {
                        self.stop(i, "stopped at close (safe mode)", &mut out);
                    }
                    (Pause::Safe, Kind::Qemu) => self.suspend_vm(i, &mut out),
                }
            }
            self.entries[i].sink.detach();
        }
        if n > 0 {
            let how = match mode {
                Pause::Fast => "fast",
                Pause::Safe => "safe",
            };
            out.push(line(
                "workloads",
                "paused",
                format!("{n} workload(s) in {} ms ({how} mode)", crate::ms(t)),
            ));
        }
        self.publish();
        out
    }

    /// Notices workloads that ended by themselves; returns those lines
    /// (`workload`/`exited`), with the names of those that ended.
    pub fn reap(&mut self) -> (Vec<Line>, Vec<String>) {
        let mut out = Vec::new();
        let mut ended = Vec::new();
        for i in 0..self.entries.len() {
            if self.reap_one(i, &mut out) {
                ended.push(self.entries[i].cfg.name.clone());
            }
        }
        if !out.is_empty() {
            self.publish();
        }
        (out, ended)
    }

    /// Whether `name` is a running project workload (a task can wait for
    /// it).
    pub fn is_running(&self, name: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.cfg.name == name && e.state == State::Running)
    }

    /// Stops everything (daemon shutdown, data still exposed). In safe
    /// mode running VMs are suspended into the vault first, as at a close.
    /// Frozen workloads are killed: their memory would not survive the
    /// daemon anyway. Running processes are stopped.
    pub fn shutdown(&mut self, mode: Pause) -> Vec<Line> {
        let mut out = Vec::new();
        for i in (0..self.entries.len()).rev() {
            self.count_handled();
            let vm = self.entries[i].cfg.kind == Kind::Qemu;
            let project = self.entries[i].cfg.role == Role::Project;
            match self.entries[i].state {
                State::Running if vm && project && mode == Pause::Safe => {
                    self.suspend_vm(i, &mut out);
                }
                State::Running => self.stop(i, "stopped: the daemon stopped", &mut out),
                State::Frozen => self.kill(
                    i,
                    "killed: the daemon stopped while it was frozen (its memory is lost)",
                    &mut out,
                ),
                _ => {}
            }
            self.entries[i].sink.detach();
        }
        if let Ok(h) = &self.hierarchy {
            h.remove_scope(&self.paths.scope);
        }
        self.publish();
        out
    }

    fn reap_one(&mut self, i: usize, out: &mut Vec<Line>) -> bool {
        let e = &mut self.entries[i];
        let Some(p) = e.proc.as_mut() else {
            return false;
        };
        let Ok(Some(status)) = p.child.try_wait() else {
            return false;
        };
        // The main process is gone; whatever it left in its group goes too.
        let _ = p.group.kill_all(KILL_WITHIN);
        e.proc = None;
        let name = e.cfg.name.clone();
        let how = describe(status);
        if status.success() {
            e.set(State::Exited, how.clone());
        } else {
            e.set(State::Failed, how.clone());
        }
        out.push(line("workload", "exited", format!("{name}: {how}")));
        true
    }

    fn start(&mut self, i: usize, out: &mut Vec<Line>) {
        let name = self.entries[i].cfg.name.clone();
        let r = match self.entries[i].cfg.kind {
            Kind::Process => self.spawn_process(i).map(|p| (p, false)),
            Kind::Qemu => self.spawn_vm(i),
        };
        match r {
            Ok((pid, false)) => {
                self.entries[i].set(State::Running, "started");
                out.push(line("workload", "started", format!("{name} (pid {pid})")));
            }
            Ok((pid, true)) => {
                let note = std::mem::take(&mut self.entries[i].note);
                out.push(line(
                    "workload",
                    "resumed",
                    format!("{name} (pid {pid}): {note}"),
                ));
                self.entries[i].set(State::Running, note);
            }
            Err(e) => {
                self.entries[i].set(State::Failed, format!("could not start: {e}"));
                out.push(line(
                    "workload",
                    "failed",
                    format!("{name}: could not start: {e}"),
                ));
            }
        }
    }

    fn spawn_process(&mut self, i: usize) -> Result<u32, WorkloadError> {
        let h = self.hierarchy.as_ref().map_err(Clone::clone)?;
        let cfg = self.entries[i].cfg.clone();
        let group = h.group(&self.paths.scope, &cfg.name);
        // A group left from an earlier run of this workload goes first.
        group
            .kill_all(KILL_WITHIN)
            .map_err(|e| WorkloadError::Cgroup(format!("clearing its old cgroup: {e}")))?;
        let creds = credentials(&cfg, &self.members)?;
        let (cwd, binds) = match cfg.role {
            Role::Project => (
                Some(match &cfg.cwd {
                    Some(c) => self.paths.data.join(c),
                    None => self.paths.data.clone(),
                }),
                vec![coffre_sys::child::Bind {
                    from: self.paths.view.clone(),
                    to: self.paths.data.clone(),
                }],
            ),
            Role::Service => (cfg.cwd.clone().or_else(|| Some("/".into())), Vec::new()),
        };
        let cwd_shown = cwd.clone().unwrap_or_default();
        let mut hide = (self.paths.hide)();
        hide.push(self.paths.data.clone());
        if cfg.role == Role::Project {
            // Bound at the data's path below.
            hide.retain(|p| *p != self.paths.view);
        } else {
            hide.push(self.paths.view.clone());
        }
        let mut cmd = Command::new(&cfg.command[0]);
        cmd.args(&cfg.command[1..]);
        cmd.env_clear();
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        cmd.env("COFFRE_WORKLOAD", &cfg.name);
        if cfg.role == Role::Project {
            cmd.env("COFFRE_DATA", &self.paths.data);
        }
        if let Some(u) = &cfg.user {
            cmd.env("USER", u).env("LOGNAME", u);
        }
        cmd.envs(&cfg.env);
        let (reader, writer) =
            std::io::pipe().map_err(|e| WorkloadError::Setup(format!("pipe: {e}")))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| WorkloadError::Setup(format!("pipe: {e}")))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2));
        let network = match self.links.get(&cfg.name) {
            Some(Link::Namespace(path)) => coffre_sys::child::Network::Join(
                std::fs::File::open(path)
                    .map_err(|e| {
                        WorkloadError::Setup(format!(
                            "its network namespace {}: {e}",
                            path.display()
                        ))
                    })?
                    .into(),
            ),
            _ => coffre_sys::child::Network::Host,
        };
        let procs = group.create(cfg.memory_mb).map_err(|e| {
            WorkloadError::Cgroup(format!("cgroup {}: {e}", group.path().display()))
        })?;
        coffre_sys::child::prepare(
            &mut cmd,
            coffre_sys::child::ChildSetup {
                cgroup_procs: procs,
                credentials: Some(creds),
                detach: hide,
                binds,
                cover: (cfg.role == Role::Project)
                    .then(|| self.paths.cover.clone())
                    .flatten(),
                private_mounts: true,
                cwd,
                pass_fds: Vec::new(),
                network,
            },
        )
        .map_err(|e| {
            group.remove();
            WorkloadError::Spawn(e.to_string())
        })?;
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                group.remove();
                return Err(WorkloadError::Spawn(format!(
                    "{}: {e} (as {} in {})",
                    cfg.command[0],
                    cfg.user.as_deref().unwrap_or("root"),
                    cwd_shown.display()
                )));
            }
        };
        drop(cmd);
        sweep_copies(child.id(), self.paths.hide);
        let log = match cfg.role {
            Role::Project => self.paths.project_log(&cfg.name),
            Role::Service => self.paths.service_log(&cfg.name),
        };
        let e = &mut self.entries[i];
        if cfg.role == Role::Service {
            let _ = e.sink.attach(&log);
        }
        let pump = Some(e.sink.pump(reader));
        let pid = child.id();
        e.proc = Some(Running {
            child,
            group,
            pump,
            qmp: None,
        });
        Ok(pid)
    }

    fn freeze(&mut self, i: usize, out: &mut Vec<Line>) {
        let name = self.entries[i].cfg.name.clone();
        let Some(p) = self.entries[i].proc.as_ref() else {
            return;
        };
        let t = Instant::now();
        match p
            .group
            .freeze(Duration::from_millis(self.settings.freeze_timeout_ms))
        {
            Ok(()) => {
                self.entries[i].set(State::Frozen, "frozen at close (fast mode)");
                out.push(line(
                    "workload",
                    "frozen",
                    format!("{name} in {} ms", crate::ms(t)),
                ));
            }
            Err(e) => self.kill(i, &format!("did not freeze ({e}): killed at close"), out),
        }
    }

    /// SIGTERM to the whole group, SIGKILL after its timeout.
    fn stop(&mut self, i: usize, why: &str, out: &mut Vec<Line>) {
        let name = self.entries[i].cfg.name.clone();
        let timeout = Duration::from_secs(self.entries[i].cfg.stop_timeout_s);
        let Some(mut p) = self.entries[i].proc.take() else {
            return;
        };
        let t = Instant::now();
        p.group.signal(rustix::process::Signal::TERM);
        let _ = p.group.thaw();
        let mut forced = false;
        loop {
            let _ = p.child.try_wait();
            if p.group.pids().is_empty() {
                break;
            }
            if t.elapsed() >= timeout {
                forced = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let killed = p.group.kill_all(KILL_WITHIN);
        let _ = p.child.wait();
        // Only now is it reaped: an unreaped zombie keeps the group busy.
        p.group.remove();
        // Everything it wrote reaches its log before the log closes.
        join_pump(p.pump.take());
        let detail = match (forced, killed) {
            (_, Err(e)) => format!("{name}: {e}"),
            (true, _) => format!(
                "{name}: SIGKILL after {} s without exiting on SIGTERM",
                timeout.as_secs()
            ),
            (false, _) => format!("{name} in {} ms", crate::ms(t)),
        };
        self.entries[i].set(State::Stopped, why);
        out.push(line("workload", "stopped", detail));
    }

    fn kill(&mut self, i: usize, why: &str, out: &mut Vec<Line>) {
        let name = self.entries[i].cfg.name.clone();
        if let Some(mut p) = self.entries[i].proc.take() {
            let r = p.group.kill_all(KILL_WITHIN);
            let _ = p.child.wait();
            p.group.remove();
            if let Err(e) = r {
                out.push(line("workload", "failed", format!("{name}: {e}")));
            }
        }
        self.entries[i].set(State::Failed, why);
        out.push(line("workload", "killed", format!("{name}: {why}")));
    }
}

/// Waits for a log pump to reach the end of its pipe, a little: a
/// process outside the group (a descriptor passed away) may hold the pipe
/// open, and a close must not wait for it. An abandoned pump ends when the
/// pipe does.
pub(crate) fn join_pump(pump: Option<std::thread::JoinHandle<()>>) {
    let Some(h) = pump else {
        return;
    };
    let until = Instant::now() + Duration::from_secs(2);
    while !h.is_finished() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
    if h.is_finished() {
        let _ = h.join();
    }
}

pub(crate) fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// Who a process workload runs as: (uid, primary gid, groups). A
/// `user` that names a member of the vault is that member's numbers and
/// groups; any other name is a host account.
fn credentials(
    cfg: &WorkloadConfig,
    members: &std::collections::BTreeMap<String, (u32, u32, Vec<u32>)>,
) -> Result<(u32, u32, Vec<u32>), WorkloadError> {
    let u = cfg.user.as_deref().unwrap_or("root");
    let (uid, gid, mut groups) = match u.parse::<u32>() {
        Ok(uid) => (uid, uid, Vec::new()),
        Err(_) if members.contains_key(u) => members[u].clone(),
        Err(_) => coffre_sys::child::user(u)
            .map_err(|e| WorkloadError::User(format!("user {u}: {e}")))?
            .ok_or_else(|| WorkloadError::User(format!("no such user: {u}")))?,
    };
    let gid = cfg.gid.unwrap_or(gid);
    groups.extend(&cfg.groups);
    if !groups.contains(&gid) {
        groups.push(gid);
    }
    Ok((uid, gid, groups))
}

/// The cgroup scope name of the vault in `dir` (stable, short, distinct
/// per vault directory).
pub fn scope_of(dir: &Path) -> String {
    // FNV-1a: a name, not a secret.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("coffre-{:012x}", h & 0xffff_ffff_ffff)
}

//! One cgroup per workload, used to freeze it, count it and kill all of
//! it (children included: membership is inherited, so nothing forked
//! escapes). Works with the v2 freezer (`cgroup.freeze`, wherever the
//! unified hierarchy is mounted, hybrid hosts included) and the v1
//! freezer controller (`freezer.state`).

use crate::WorkloadError;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which freezer a host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezerKind {
    /// cgroup v2: `cgroup.freeze` and `cgroup.events`.
    V2,
    /// cgroup v1 freezer controller: `freezer.state`.
    V1,
}

/// Which freezer to use (`[workloads] freezer` in config.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezerChoice {
    /// v2 if the host has it, else v1.
    #[default]
    Auto,
    /// Only cgroup v2.
    V2,
    /// Only the v1 freezer controller.
    V1,
}

/// The cgroup mounts of this host.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    /// The freezer in use.
    pub kind: FreezerKind,
    /// The root of the hierarchy holding the freezer.
    pub root: PathBuf,
    /// A v1 memory controller root, for memory limits on v1 hosts.
    pub memory_v1: Option<PathBuf>,
}

/// Where the workloads' v2 groups go when a service manager delegated this
/// process's cgroup to it: set once, by [`enter_delegated_leaf`].
static DELEGATED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The unified (v2) hierarchy's mount point, if the host has one.
fn v2_mount(all: &[coffre_sys::proc::MountEntry]) -> Option<PathBuf> {
    all.iter()
        .find(|m| m.fstype == "cgroup2" && m.mountpoint.join("cgroup.procs").exists())
        .map(|m| m.mountpoint.clone())
}

/// This process's v2 cgroup (`/system.slice/coffre@team.service`), from
/// the `0::` line of `/proc/self/cgroup`.
fn own_v2_cgroup() -> Option<String> {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Whether a service manager delegated the cgroup `dir` to the processes
/// in it: systemd marks a `Delegate=yes` unit's cgroup with the extended
/// attribute `trusted.delegate` set to `1`. Only `trusted.` counts (only
/// root can set it): `user.delegate` is what a user's own manager sets on
/// groups that user owns, and a root daemon does not put its workloads
/// where a user could freeze or starve them.
fn is_delegated(dir: &Path) -> bool {
    let mut buf = [0u8; 8];
    rustix::fs::getxattr(dir, "trusted.delegate", &mut buf)
        .is_ok_and(|n| buf.get(..n) == Some(&b"1"[..]))
}

/// Under a service manager that delegated this process's v2 cgroup
/// (systemd's `Delegate=yes`): moves the whole process into a leaf
/// `daemon` of it, makes `workloads` beside the leaf with the memory
/// controller handed down (where the unit has it), and from then on
/// [`Hierarchy::detect`] puts the workloads' groups under `workloads`:
/// they stay inside the unit, are counted and stopped with it, and no
/// group is made at the hierarchy's root. A cgroup with processes of its
/// own cannot hand controllers down (cgroup v2's rule), hence the leaf.
///
/// Returns the workloads' root, or `None` where nothing was delegated (run
/// by hand, or a v1-only host): the groups then stay at the root, as
/// before. Call it before starting any child process.
pub fn enter_delegated_leaf() -> io::Result<Option<PathBuf>> {
    if let Some(w) = DELEGATED.get() {
        return Ok(Some(w.clone()));
    }
    let Some(root) = v2_mount(&coffre_sys::proc::mountinfo()) else {
        return Ok(None);
    };
    let Some(own) = own_v2_cgroup() else {
        return Ok(None);
    };
    let rel = own.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == "..") {
        return Ok(None);
    }
    let unit = root.join(rel);
    if !is_delegated(&unit) {
        return Ok(None);
    }
    let leaf = unit.join("daemon");
    fs::create_dir_all(&leaf)?;
    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    let workloads = unit.join("workloads");
    fs::create_dir_all(&workloads)?;
    let workloads = DELEGATED.get_or_init(|| workloads).clone();
    // Best effort, as for the groups themselves: without it, a memory
    // limit is refused when its workload starts, saying why.
    let offered = fs::read_to_string(unit.join("cgroup.controllers")).unwrap_or_default();
    if offered.split_whitespace().any(|c| c == "memory") {
        let _ = write(&unit.join("cgroup.subtree_control"), "+memory");
    }
    Ok(Some(workloads))
}

impl Hierarchy {
    /// Finds the freezer `choice` asks for, or says why there is none.
    /// The v2 groups go under the delegated cgroup once
    /// [`enter_delegated_leaf`] found one, else at the hierarchy's root.
    pub fn detect(choice: FreezerChoice) -> Result<Self, WorkloadError> {
        let all = coffre_sys::proc::mountinfo();
        let v2 = v2_mount(&all).map(|root| DELEGATED.get().cloned().unwrap_or(root));
        let v1 = |ctrl: &str| {
            all.iter()
                .find(|m| m.fstype == "cgroup" && m.has_option(ctrl))
                .map(|m| m.mountpoint.clone())
        };
        let memory_v1 = v1("memory");
        // The root cgroup has no cgroup.freeze; a child would (kernel
        // 5.2+): probe by making one.
        let v2_freezes = |root: &Path| {
            let probe = root.join(format!("coffre-probe-{}", std::process::id()));
            let ok = fs::create_dir(&probe).is_ok() && probe.join("cgroup.freeze").exists();
            let _ = fs::remove_dir(&probe);
            ok
        };
        match choice {
            FreezerChoice::V2 | FreezerChoice::Auto if v2.as_deref().is_some_and(v2_freezes) => {
                Ok(Self {
                    kind: FreezerKind::V2,
                    root: v2.unwrap_or_default(),
                    memory_v1,
                })
            }
            FreezerChoice::V1 | FreezerChoice::Auto if v1("freezer").is_some() => Ok(Self {
                kind: FreezerKind::V1,
                root: v1("freezer").unwrap_or_default(),
                memory_v1,
            }),
            FreezerChoice::V2 => Err(WorkloadError::Cgroup(
                "this host has no cgroup v2 freezer (cgroup.freeze)".into(),
            )),
            FreezerChoice::V1 => Err(WorkloadError::Cgroup(
                "this host has no cgroup v1 freezer controller".into(),
            )),
            FreezerChoice::Auto => Err(WorkloadError::Cgroup(
                "this host has no cgroup freezer (neither v2 nor v1)".into(),
            )),
        }
    }

    /// The group of workload `name` of vault `scope`.
    pub fn group(&self, scope: &str, name: &str) -> Group {
        Group {
            kind: self.kind,
            path: self.root.join(scope).join(name),
            memory: self.memory_v1.as_ref().map(|m| m.join(scope).join(name)),
        }
    }

    /// Removes a vault's (empty) groups and its scope directory.
    pub fn remove_scope(&self, scope: &str) {
        for g in self.groups(scope) {
            g.remove();
        }
        let _ = fs::remove_dir(self.root.join(scope));
        if let Some(m) = &self.memory_v1 {
            let _ = fs::remove_dir(m.join(scope));
        }
    }

    /// Every workload group a vault's daemon left (for the crash clean-up).
    pub fn groups(&self, scope: &str) -> Vec<Group> {
        let Ok(rd) = fs::read_dir(self.root.join(scope)) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| self.group(scope, &e.file_name().to_string_lossy()))
            .collect()
    }
}

/// One workload's cgroup.
#[derive(Clone, Debug)]
pub struct Group {
    kind: FreezerKind,
    path: PathBuf,
    memory: Option<PathBuf>,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Group {
    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates it (and its memory group when a limit is asked on a v1
    /// host); returns the `cgroup.procs` files a new process must join.
    pub fn create(&self, memory_mb: Option<u64>) -> io::Result<Vec<OwnedFd>> {
        if memory_mb.is_some() && self.kind == FreezerKind::V2 {
            // The memory controller must be handed down from the root to
            // the vault's scope for the group to have memory.max.
            if let Some(scope) = self.path.parent() {
                fs::create_dir_all(scope)?;
                if let Some(root) = scope.parent() {
                    let _ = fs::write(root.join("cgroup.subtree_control"), "+memory");
                }
                let _ = fs::write(scope.join("cgroup.subtree_control"), "+memory");
            }
        }
        fs::create_dir_all(&self.path)?;
        self.with_limits(memory_mb).inspect_err(|_| self.remove())
    }

    fn with_limits(&self, memory_mb: Option<u64>) -> io::Result<Vec<OwnedFd>> {
        let mut procs = vec![open_procs(&self.path)?];
        if let Some(mb) = memory_mb {
            let bytes = (mb * 1024 * 1024).to_string();
            match (self.kind, &self.memory) {
                (FreezerKind::V2, _) if self.path.join("memory.max").exists() => {
                    write(&self.path.join("memory.max"), &bytes)?;
                }
                (_, Some(m)) => {
                    fs::create_dir_all(m)?;
                    write(&m.join("memory.limit_in_bytes"), &bytes)?;
                    procs.push(open_procs(m)?);
                }
                _ => {
                    return Err(io::Error::other(
                        "memory_mb is set but this host has no memory controller to enforce it",
                    ));
                }
            }
        }
        Ok(procs)
    }

    /// The processes in it.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Whether it exists.
    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Asks the kernel to freeze it (without waiting).
    pub fn request_freeze(&self) -> io::Result<()> {
        match self.kind {
            FreezerKind::V2 => write(&self.path.join("cgroup.freeze"), "1"),
            FreezerKind::V1 => write(&self.path.join("freezer.state"), "FROZEN"),
        }
    }

    /// Freezes it and waits until every task is frozen.
    pub fn freeze(&self, within: Duration) -> io::Result<()> {
        self.request_freeze()?;
        let until = Instant::now() + within;
        loop {
            if self.is_frozen() {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("not frozen after {} ms", within.as_millis()),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether every task in it is frozen.
    pub fn is_frozen(&self) -> bool {
        match self.kind {
            FreezerKind::V2 => fs::read_to_string(self.path.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l == "frozen 1")),
            // Reading freezer.state also moves a FREEZING group along.
            FreezerKind::V1 => fs::read_to_string(self.path.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN"),
        }
    }

    /// Thaws it.
    pub fn thaw(&self) -> io::Result<()> {
        match self.kind {
            FreezerKind::V2 => write(&self.path.join("cgroup.freeze"), "0"),
            FreezerKind::V1 => write(&self.path.join("freezer.state"), "THAWED"),
        }
    }

    /// Sends `sig` to every process in it.
    pub fn signal(&self, sig: rustix::process::Signal) {
        // Frozen, no process of the group can exit, so no pid read from
        // cgroup.procs can be reused by someone else before the signal.
        let was_frozen = self.is_frozen();
        let _ = self.freeze(Duration::from_millis(500));
        for pid in self.pids() {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, sig);
            }
        }
        if !was_frozen {
            let _ = self.thaw();
        }
    }

    /// Kills everything in it and waits until it is empty, then removes
    /// it. Returns how many processes were killed. v2: `cgroup.kill` (the
    /// kernel kills the group, frozen or not, with no pid race); v1:
    /// signals while frozen, then a thaw (a v1-frozen task only dies once
    /// thawed).
    pub fn kill_all(&self, within: Duration) -> io::Result<usize> {
        if !self.exists() {
            return Ok(0);
        }
        let n = self.pids().len();
        let has_kill = self.kind == FreezerKind::V2 && self.path.join("cgroup.kill").exists();
        let until = Instant::now() + within;
        loop {
            if has_kill {
                write(&self.path.join("cgroup.kill"), "1")?;
            } else {
                self.signal(rustix::process::Signal::KILL);
                let _ = self.thaw();
            }
            if self.pids().is_empty() {
                break;
            }
            if Instant::now() >= until {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{}: processes left after SIGKILL", self.path.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.remove();
        Ok(n)
    }

    /// Removes the (empty) group directories.
    pub fn remove(&self) {
        let _ = fs::remove_dir(&self.path);
        if let Some(m) = &self.memory {
            let _ = fs::remove_dir(m);
        }
    }
}

fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    Ok(OwnedFd::from(f))
}

/// CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let s = coffre_sys::proc::stat(pid)?;
    Some(s.utime + s.stime)
}

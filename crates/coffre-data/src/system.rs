//! The kernel objects we stack: loop devices, mounts, and the processes
//! that hold files on a mount.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Runs a system tool, turning a failure into an error that names it.
pub(crate) fn run(tool: &str, args: &[&std::ffi::OsStr]) -> io::Result<String> {
    let out = coffre_sys::child::system_tool(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {tool}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{tool} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// The file it was attached to: a device number taken over by someone
    /// else after ours was released is not ours.
    pub backing: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device with `sector_size` logical
    /// blocks and direct I/O (the backing file has no page cache of its own).
    pub fn attach(file: &Path, sector_size: usize) -> io::Result<Self> {
        // Sysfs reports the backing file resolved.
        let file = &file.canonicalize()?;
        let ss = sector_size.to_string();
        let args: Vec<&std::ffi::OsStr> = vec![
            "--find".as_ref(),
            "--show".as_ref(),
            "--sector-size".as_ref(),
            ss.as_ref(),
            "--direct-io=on".as_ref(),
            file.as_os_str(),
        ];
        let dev = run("losetup", &args)?;
        if !dev.starts_with("/dev/loop") {
            return Err(io::Error::other(format!("losetup printed {dev:?}")));
        }
        Ok(Self {
            path: PathBuf::from(dev),
            backing: file.to_path_buf(),
        })
    }

    fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// Whether the device is still attached to our file.
    pub fn is_attached(&self) -> bool {
        std::fs::read_to_string(
            Path::new("/sys/block")
                .join(self.name())
                .join("loop/backing_file"),
        )
        .is_ok_and(|b| Path::new(b.trim_end_matches('\n')) == self.backing)
    }

    /// Detaches the device and waits (up to `wait`) until the kernel has
    /// let go of the backing file (a device still open is detached when
    /// its last user closes it).
    pub fn detach(&self, wait: Duration) -> io::Result<()> {
        if self.is_attached() {
            run("losetup", &["-d".as_ref(), self.path.as_os_str()])?;
        }
        let until = Instant::now() + wait;
        while self.is_attached() {
            if Instant::now() > until {
                return Err(io::Error::other(format!(
                    "{} is still attached (something keeps it open)",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Loop devices whose backing file is `file` (read from sysfs, so a
    /// dead FUSE file does not hang us).
    pub fn backed_by(file: &Path) -> Vec<LoopDevice> {
        let mut found = Vec::new();
        let Ok(dir) = std::fs::read_dir("/sys/block") else {
            return found;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(back) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            let back = back.trim_end_matches('\n');
            if Path::new(back) == file {
                found.push(LoopDevice {
                    path: Path::new("/dev").join(name),
                    backing: file.to_path_buf(),
                });
            }
        }
        found
    }
}

/// One line of a mountinfo table (parsed in [`coffre_sys::proc`]).
pub use coffre_sys::proc::MountEntry;

/// Our mount table.
pub fn mounts() -> Vec<MountEntry> {
    coffre_sys::proc::mountinfo()
}

/// Every mount of every coffre vault on this host, as seen from here:
/// volume files (FUSE `coffre`), workloads' views (FUSE `coffre-view`),
/// and the filesystems on loop devices backed by a volume file. A
/// workload's private mount namespace drops them all: a copy there would
/// keep that vault's data, and so its key, alive after its close.
pub fn vault_mounts() -> Vec<PathBuf> {
    let all = mounts();
    let is_fuse = |m: &MountEntry, src: &str| m.fstype.starts_with("fuse") && m.source == src;
    let files: Vec<&Path> = all
        .iter()
        .filter(|m| is_fuse(m, "coffre"))
        .map(|m| m.mountpoint.as_path())
        .collect();
    let loops: Vec<String> = files
        .iter()
        .flat_map(|f| LoopDevice::backed_by(f))
        .map(|l| l.path.to_string_lossy().into_owned())
        .collect();
    all.iter()
        .filter(|m| is_fuse(m, "coffre") || is_fuse(m, "coffre-view") || loops.contains(&m.source))
        .map(|m| m.mountpoint.clone())
        .collect()
}

/// The mount at exactly `path`, if any (the last one wins, as in the kernel).
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// A process that holds a file (or its working directory, root or a
/// mapping) on a mount, or has the mount in another mount namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    /// Process id.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
    /// What it holds (a path, or "mount namespace").
    pub what: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {}) holds {}", self.comm, self.pid, self.what)
    }
}

/// The mounts of one filesystem as one mount namespace sees them.
#[derive(Default)]
struct NsView {
    /// Mount ids (the first field of mountinfo, what `fdinfo` calls
    /// `mnt_id`).
    ids: HashSet<u64>,
    /// Where it is mounted there.
    points: Vec<PathBuf>,
}

fn ns_view(mounts: &[MountEntry], dev: &str) -> NsView {
    let mut v = NsView::default();
    for m in mounts.iter().filter(|m| m.dev == dev) {
        v.ids.insert(m.id);
        v.points.push(m.mountpoint.clone());
    }
    v
}

/// Every process (other than us) holding something on the filesystem
/// `dev` (`major:minor`, as in mountinfo) known here as `mountpoint`: an
/// open file, its working directory, root or executable, or a mapping.
/// With `namespaces`, also every process whose mount namespace has its own
/// copy of the mount (after our unmount, only private copies remain, and
/// each keeps the filesystem, and so the key, alive).
///
/// Nothing here stats a file: a hung network or FUSE mount elsewhere on
/// the host cannot block it.
pub fn holders(dev: &str, mountpoint: &Path, namespaces: bool) -> Vec<Holder> {
    let me = std::process::id();
    let our_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut views: HashMap<PathBuf, NsView> = HashMap::new();
    let mut found = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let maps_dev = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(me) || pid == 1 {
            continue;
        }
        let base = p.path();
        let Ok(ns) = std::fs::read_link(base.join("ns/mnt")) else {
            continue;
        };
        if !views.contains_key(&ns) {
            // Read from this process; if it just exited, the next process
            // of the namespace will tell.
            let Ok(mi) = std::fs::read_to_string(base.join("mountinfo")) else {
                continue;
            };
            views.insert(
                ns.clone(),
                ns_view(&coffre_sys::proc::parse_mountinfo(&mi), dev),
            );
        }
        let Some(view) = views.get(&ns) else {
            continue;
        };
        if view.ids.is_empty() {
            // This namespace does not have the filesystem at all.
            continue;
        }
        let comm = std::fs::read_to_string(base.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut hold = |what: String| {
            found.insert(Holder {
                pid,
                comm: comm.clone(),
                what,
            });
        };
        if namespaces && Some(&ns) != our_ns.as_ref() {
            hold(format!(
                "a copy of {} in its mount namespace",
                mountpoint.display()
            ));
            continue;
        }
        let inside = |t: &Path| view.points.iter().any(|mp| t.starts_with(mp));
        for link in ["cwd", "root", "exe"] {
            if let Ok(t) = std::fs::read_link(base.join(link))
                && inside(&t)
            {
                hold(format!("{link} {}", t.display()));
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fdinfo")) {
            for fd in fds.flatten() {
                let Ok(info) = std::fs::read_to_string(fd.path()) else {
                    continue;
                };
                let mnt = info
                    .lines()
                    .find_map(|l| l.strip_prefix("mnt_id:"))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if mnt.is_some_and(|m| view.ids.contains(&m)) {
                    let t = std::fs::read_link(base.join("fd").join(fd.file_name()))
                        .unwrap_or_default();
                    hold(format!("open file {}", t.display()));
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            for line in maps.lines() {
                let mut f = line.split_whitespace();
                let dev_field = f.nth(3).unwrap_or_default();
                let inode = f.next().unwrap_or("0");
                if inode != "0" && parse_maps_dev(dev_field) == maps_dev {
                    let path = f.next().unwrap_or("(unnamed)");
                    hold(format!("mapping {path}"));
                    break;
                }
            }
        }
    }
    found.into_iter().collect()
}

/// `/proc/PID/maps` writes devices as hexadecimal `major:minor`.
fn parse_maps_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((
        u32::from_str_radix(a, 16).ok()?,
        u32::from_str_radix(b, 16).ok()?,
    ))
}

/// The device (`major:minor`, as mountinfo writes it) of the mount at
/// exactly `path`, from our mount table (no stat).
pub fn device_of(path: &Path) -> Option<String> {
    mount_at(path).map(|m| m.dev)
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Whether `pid` still exists (a zombie counts as gone: it holds nothing).
pub fn alive(pid: i32) -> bool {
    coffre_sys::proc::stat(pid).is_some_and(|s| !s.is_gone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_devices_are_hex() {
        assert_eq!(parse_maps_dev("fd:0a"), Some((253, 10)));
        assert_eq!(parse_maps_dev("00:00"), Some((0, 0)));
        assert_eq!(parse_maps_dev("zz"), None);
    }
}

//! The kernel objects we stack: loop devices, mounts, and the processes
//! that hold files on a mount.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a system tool, turning a failure into an error that names it.
pub(crate) fn run(tool: &str, args: &[&std::ffi::OsStr]) -> io::Result<String> {
    let out = Command::new(tool)
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
}

impl LoopDevice {
    /// Attaches `file` to a free loop device with `sector_size` logical
    /// blocks and direct I/O (the backing file has no page cache of its own).
    pub fn attach(file: &Path, sector_size: usize) -> io::Result<Self> {
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
        })
    }

    fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// Whether the device still has a backing file.
    pub fn is_attached(&self) -> bool {
        Path::new("/sys/block")
            .join(self.name())
            .join("loop/backing_file")
            .exists()
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
                });
            }
        }
        found
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type (`ext4`, `fuse.coffre`...).
    pub fstype: String,
    /// Mount source (`/dev/loop3`, `coffre`...).
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a mountinfo table.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: (*f.get(2)?).to_string(),
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: (*r.first()?).to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// Our mount table.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
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

fn dev_of(meta: &std::fs::Metadata) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let d = meta.dev();
    (rustix::fs::major(d), rustix::fs::minor(d))
}

/// Every process (other than us) holding something on the filesystem
/// whose device is `major:minor`, mounted at `mountpoint`.
pub fn holders(dev: (u32, u32), mountpoint: &Path) -> Vec<Holder> {
    let me = std::process::id();
    let dev_s = format!("{}:{}", dev.0, dev.1);
    let our_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut found = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(me) {
            continue;
        }
        let base = p.path();
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
        for link in ["cwd", "root", "exe"] {
            let l = base.join(link);
            if std::fs::metadata(&l).is_ok_and(|m| dev_of(&m) == dev) {
                let target = std::fs::read_link(&l).unwrap_or_default();
                hold(format!("{link} {}", target.display()));
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                let target = std::fs::read_link(fd.path()).unwrap_or_default();
                // Only stat what looks like a path (not sockets, pipes...).
                if !target.is_absolute() {
                    continue;
                }
                if std::fs::metadata(fd.path()).is_ok_and(|m| dev_of(&m) == dev) {
                    hold(format!("open file {}", target.display()));
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            for line in maps.lines() {
                let mut f = line.split_whitespace();
                let dev_field = f.nth(3).unwrap_or_default();
                if parse_maps_dev(dev_field) == Some(dev) {
                    let path = f.nth(1).unwrap_or("(anonymous)");
                    hold(format!("mapping {path}"));
                    break;
                }
            }
        }
        // Another mount namespace with a copy of the mount keeps the
        // filesystem (and so the key) alive even after we unmount ours.
        let ns = std::fs::read_link(base.join("ns/mnt")).ok();
        if ns.is_some()
            && ns != our_ns
            && let Ok(mi) = std::fs::read_to_string(base.join("mountinfo"))
            && parse_mountinfo(&mi).iter().any(|m| m.dev == dev_s)
        {
            hold(format!(
                "a copy of {} in its mount namespace",
                mountpoint.display()
            ));
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

/// The device (`major`, `minor`) of the filesystem at `path`.
pub fn device_of(path: &Path) -> io::Result<(u32, u32)> {
    Ok(dev_of(&std::fs::metadata(path)?))
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Whether `pid` still exists (a zombie counts as gone: it holds nothing).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // The state follows the command name in parentheses.
            let state = s.rsplit_once(')').map(|(_, r)| r.trim_start());
            !state.is_some_and(|r| r.starts_with('Z') || r.starts_with('X'))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let t = "36 35 98:0 / /mnt/my\\040data rw,noatime master:1 - ext4 /dev/loop3 rw,errors=continue\n\
                 37 35 0:55 / /v/run/volume rw,nosuid,nodev shared:2 - fuse.coffre coffre rw,user_id=0\n\
                 garbage line\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, Path::new("/mnt/my data"));
        assert_eq!(m[0].dev, "98:0");
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[0].source, "/dev/loop3");
        assert_eq!(m[1].fstype, "fuse.coffre");
    }

    #[test]
    fn maps_devices_are_hex() {
        assert_eq!(parse_maps_dev("fd:0a"), Some((253, 10)));
        assert_eq!(parse_maps_dev("00:00"), Some((0, 0)));
        assert_eq!(parse_maps_dev("zz"), None);
    }
}

//! What coffre reads from `/proc`: mount tables, a process's state and CPU
//! time, the machine's memory. Each file has one parser here, a pure
//! function over its text (tested on samples), and a reader beside it.

use std::path::{Path, PathBuf};

/// One line of a `mountinfo` table (`/proc/PID/mountinfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (first field; what `fdinfo` calls `mnt_id`).
    pub id: u64,
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev`...).
    pub options: String,
    /// Filesystem type (`ext4`, `fuse.coffre`, `cgroup2`...).
    pub fstype: String,
    /// Mount source (`/dev/loop3`, `coffre`...).
    pub source: String,
    /// The filesystem's own options (for cgroup v1, its controllers).
    pub super_options: String,
}

impl MountEntry {
    /// Whether `name` is among the per-mount or the filesystem's options.
    pub fn has_option(&self, name: &str) -> bool {
        self.options
            .split(',')
            .chain(self.super_options.split(','))
            .any(|o| o == name)
    }
}

/// Undoes the kernel's octal escapes in mount tables (`\040` for a space,
/// `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0')
                .wrapping_mul(64)
                .wrapping_add((b[i + 2] - b'0') * 8)
                .wrapping_add(b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a mountinfo table; lines that do not have its shape are skipped.
/// Fields go by position (proc(5)): six, then optional fields up to a
/// lone `-`, then three; a path that reads ` - ` (a mount point named
/// `-`, escaped as the kernel escapes spaces) moves nothing.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = 6 + f.get(6..)?.iter().position(|x| *x == "-")?;
            let r = &f[dash + 1..];
            Some(MountEntry {
                id: f[0].parse().ok()?,
                dev: f[2].to_string(),
                mountpoint: PathBuf::from(unescape(f[4])),
                options: f[5].to_string(),
                fstype: (*r.first()?).to_string(),
                source: unescape(r.get(1)?),
                super_options: r.get(2).copied().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// This process's mount table (empty if `/proc` cannot be read).
pub fn mountinfo() -> Vec<MountEntry> {
    mountinfo_at(Path::new("/proc/self"))
}

/// The mount table of the process whose `/proc` directory is `proc_dir`
/// (`/proc/PID`), as its mount namespace sees it; empty if it is gone.
pub fn mountinfo_at(proc_dir: &Path) -> Vec<MountEntry> {
    std::fs::read_to_string(proc_dir.join("mountinfo"))
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// What coffre uses of `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `D`, `T`, `Z` for a zombie, `X` dead...).
    pub state: char,
    /// CPU time in user mode, clock ticks.
    pub utime: u64,
    /// CPU time in kernel mode, clock ticks.
    pub stime: u64,
}

impl Stat {
    /// Whether the process is gone for practical purposes (a zombie holds
    /// nothing and runs nothing).
    pub fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and
/// parentheses: fields count from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = text[text.rfind(')')? + 1..].trim_start();
    let f: Vec<&str> = rest.split(' ').collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
    })
}

/// `/proc/PID/stat` of `pid`, if it exists.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `MemTotal` out of `/proc/meminfo`, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The machine's RAM in bytes (`MemTotal`), if `/proc/meminfo` tells.
pub fn mem_total_bytes() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let t = "36 35 98:0 / /mnt/my\\040data rw,noatime master:1 - ext4 /dev/loop3 rw,errors=continue\n\
                 37 35 0:55 / /v/run/volume rw,nosuid,nodev shared:2 - fuse.coffre coffre rw,user_id=0\n\
                 38 35 0:33 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer\n\
                 garbage line\n\
                 x 35 0:1 / /bad rw - ext4 /dev/x rw\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].id, 36);
        assert_eq!(m[0].mountpoint, Path::new("/mnt/my data"));
        assert_eq!(m[0].dev, "98:0");
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[0].source, "/dev/loop3");
        assert_eq!(m[0].options, "rw,noatime");
        assert_eq!(m[1].fstype, "fuse.coffre");
        assert!(m[2].has_option("freezer") && m[2].has_option("nosuid"));
        assert!(!m[2].has_option("memory"));
        // Fields go by position: a path field that reads `-` is a path.
        let m = parse_mountinfo("39 35 0:56 - - rw shared:3 - tmpfs - rw\n");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mountpoint, Path::new("-"));
        assert_eq!((m[0].fstype.as_str(), m[0].source.as_str()), ("tmpfs", "-"));
    }

    #[test]
    fn escapes_and_truncated_escapes() {
        assert_eq!(unescape("a\\011b\\134c"), "a\tb\\c");
        assert_eq!(unescape("end\\04"), "end\\04");
        assert_eq!(unescape("end\\040"), "end ");
    }

    #[test]
    fn stat_counts_from_the_last_parenthesis() {
        let s = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!((st.utime, st.stime), (7, 3));
        assert!(parse_stat("42 (z) Z 1").is_none());
        assert!(parse_stat("no parenthesis").is_none());
        let me = stat(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(!me.is_gone());
    }

    #[test]
    fn mem_total_in_bytes() {
        let t = "MemFree:  10 kB\nMemTotal:       16314084 kB\n";
        assert_eq!(parse_mem_total(t), Some(16_314_084 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
        assert!(mem_total_bytes().is_some_and(|b| b > 0));
    }
}

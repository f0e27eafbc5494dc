//! `coffre doctor`: what this host and a vault directory lack, each
//! finding OK, WARN or FAIL with the fix. It reads; it changes nothing
//! (the cgroup probe makes and removes one empty group) and needs no key.

use crate::vaultdir::{Config, VaultDir};
use serde::Serialize;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How bad a finding is. Ordered: the worst of several is their maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// What the vault needs is there.
    Ok,
    /// It works, but less well or less safely than it could.
    Warn,
    /// Something the vault needs is missing or unsafe.
    Fail,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// What was checked (`fuse`, `control-file`...): stable, for scripts.
    pub check: String,
    /// How it went.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do about it (WARN and FAIL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &str, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            level: Level::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            level: Level::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    /// FAIL where the vault's config needs the thing, WARN otherwise.
    fn missing(check: &str, needed: bool, detail: String, fix: &str) -> Self {
        if needed {
            Self::fail(check, detail, fix)
        } else {
            Self::warn(check, detail, fix)
        }
    }
}

/// The worst level of `findings` (OK for none).
pub fn worst(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

/// What a vault's config asks of the host (all false without a vault).
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// `[gateway]`: OpenVPN 2.6.
    pub openvpn: bool,
    /// `[network]`: nftables.
    pub nftables: bool,
    /// A `kind = "qemu"` workload: QEMU.
    pub qemu: bool,
}

impl Needs {
    /// What `config` needs.
    pub fn of(config: &Config) -> Self {
        Self {
            openvpn: config.gateway.is_some(),
            nftables: config.network.is_some(),
            qemu: config
                .workload
                .iter()
                .any(|w| w.kind == coffre_workload::config::Kind::Qemu),
        }
    }
}

/// Days before a certificate's end from which it is reported.
pub use crate::pki::EXPIRY_WARNING_DAYS;

/// The host's checks. `qemu` is the QEMU binary the config names, if any.
pub fn host(needs: Needs, qemu: Option<&Path>) -> Vec<Finding> {
    vec![
        root(),
        char_device(
            "fuse",
            Path::new("/dev/fuse"),
            (10, 229),
            "the mounted data and the workloads' view are FUSE filesystems",
            "modprobe fuse (and, in a container, pass /dev/fuse through)",
        ),
        char_device(
            "loop",
            Path::new("/dev/loop-control"),
            (10, 237),
            "the data's ext4 and the VMs' disks are mounted through loop devices",
            "modprobe loop (and, in a container, pass /dev/loop-control and /dev/loop* through)",
        ),
        ext4_tools(),
        cgroups(),
        nftables(needs.nftables),
        qemu_binary(needs.qemu, qemu),
        kvm(),
        openvpn(needs.openvpn),
        suid_dumpable(),
        landlock(needs.nftables),
        seccomp(needs.nftables),
        swap(),
        clock(),
        halt_polling(),
        shared_mappings(&std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()),
    ]
}

/// A kernel release's first two numbers (`6.18.44-cloud-amd64`: 6, 18).
fn release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The workloads' view serves files without the page cache (direct
/// I/O, so no plaintext stays cached through a close); a program may map
/// such a file shared only from Linux 6.6 (`FUSE_DIRECT_IO_ALLOW_MMAP`).
/// Before, `mmap(MAP_SHARED)` of a file in the data fails (`ENODEV`) for
/// process workloads: sqlite's WAL, LMDB, Python's `mmap`.
fn shared_mappings(osrelease: &str) -> Finding {
    match release(osrelease) {
        Some(v) if v >= (6, 6) => Finding::ok(
            "shared-mappings",
            format!(
                "Linux {}.{}: process workloads may map files of the data shared (6.6 or later)",
                v.0, v.1
            ),
        ),
        Some(v) => Finding::warn(
            "shared-mappings",
            format!(
                "Linux {}.{}: process workloads cannot map files of the data shared (mmap MAP_SHARED fails with ENODEV before 6.6): sqlite in WAL mode, LMDB and the like fail there",
                v.0, v.1
            ),
            "a kernel of 6.6 or later",
        ),
        None => Finding::warn(
            "shared-mappings",
            format!("cannot read the kernel's release ({:?})", osrelease.trim()),
            "mount /proc",
        ),
    }
}

fn root() -> Finding {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|u| u.parse::<u32>().ok());
    match euid {
        Some(0) => Finding::ok("root", "running as root"),
        Some(u) => Finding::fail(
            "root",
            format!(
                "running as uid {u}: coffre serve mounts, attaches loop devices and makes cgroups"
            ),
            "run coffre serve (and this check) as root, e.g. from its systemd unit",
        ),
        None => Finding::fail(
            "root",
            "cannot read the effective uid from /proc/self/status",
            "mount /proc",
        ),
    }
}

/// A character device with the expected numbers, which opens read-write.
fn char_device(check: &str, path: &Path, numbers: (u64, u64), why: &str, fix: &str) -> Finding {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Finding::fail(check, format!("{}: {e} ({why})", path.display()), fix);
        }
    };
    let rdev = m.rdev();
    let (major, minor) = (
        ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff),
        ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff),
    );
    if !m.file_type().is_char_device() || (major, minor) != numbers {
        return Finding::fail(
            check,
            format!(
                "{} is not the kernel's device (expected character device {}:{}) ({why})",
                path.display(),
                numbers.0,
                numbers.1
            ),
            fix,
        );
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Finding::ok(check, format!("{} opens", path.display())),
        Err(e) => Finding::fail(check, format!("{}: {e} ({why})", path.display()), fix),
    }
}

/// The system's program directories. `doctor` runs as root: it looks
/// for programs here only, never on the caller's PATH (an empty entry, `.`
/// or a user's directory there would have root run what that user put).
use coffre_sys::child::SYSTEM_DIRS;

/// `name` in the system's program directories.
fn find_program(name: &str) -> Option<PathBuf> {
    SYSTEM_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// How a file or directory lets a user other than root change it, or
/// move what it holds.
#[derive(Debug, PartialEq, Eq)]
enum NotRootAlone {
    /// Another user owns it.
    Owner(u32),
    /// Group or others may write it (its mode); in a directory, replace
    /// what it holds.
    Writable(u32),
}

/// The rule every check of "root's alone" applies: owned by root and
/// writable by nobody else; a sticky directory others may write is
/// accepted if `sticky_ok` (there only an entry's owner may rename it:
/// root's stays root's, as in `/tmp`).
/// Writable by others is said first (the worse: anyone may change it).
fn root_alone(m: &std::fs::Metadata, sticky_ok: bool) -> Result<(), NotRootAlone> {
    let mode = m.permissions().mode() & 0o7777;
    let sticky = sticky_ok && m.is_dir() && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(NotRootAlone::Writable(mode));
    }
    if m.uid() != 0 {
        return Err(NotRootAlone::Owner(m.uid()));
    }
    Ok(())
}

/// Whether `path` and every directory above it are root's and writable
/// by nobody else (sticky ones neither: a program is not kept in `/tmp`):
/// only such a program is run (as root) to ask its version. Why not,
/// otherwise.
fn trusted_program(path: &Path) -> Result<(), String> {
    let path = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for p in path.ancestors() {
        let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if root_alone(&m, false).is_err() {
            return Err(format!(
                "{} is not root's alone (owner uid {}, mode {:04o}): not run",
                p.display(),
                m.uid(),
                m.permissions().mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Every entry the kernel goes through to reach `dir`, in order: each
/// component looked at without following it (a link's own metadata),
/// the links followed one component at a time as the kernel does (their
/// targets' entries too, `..` taken after the link, as resolved), the
/// last one the directory itself. At most 40 links.
fn entries_on_the_way(
    dir: &Path,
) -> Result<Vec<(PathBuf, std::fs::Metadata)>, (PathBuf, std::io::Error)> {
    use std::path::Component;
    let start = if dir.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().map_err(|e| (dir.to_path_buf(), e))?
    };
    let mut todo: std::collections::VecDeque<PathBuf> = dir
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut at = start;
    let mut out = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.components().next() {
            Some(Component::RootDir) => at = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                at.pop();
            }
            Some(Component::Normal(name)) => {
                let next = at.join(name);
                let m = std::fs::symlink_metadata(&next).map_err(|e| (next.clone(), e))?;
                if m.file_type().is_symlink() {
                    links += 1;
                    if links > 40 {
                        return Err((next, std::io::Error::other("more than 40 links on the way")));
                    }
                    let target = std::fs::read_link(&next).map_err(|e| (next.clone(), e))?;
                    for t in target.components().rev() {
                        todo.push_front(PathBuf::from(t.as_os_str()));
                    }
                    out.push((next, m));
                } else {
                    out.push((next.clone(), m));
                    at = next;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The directories and links the kernel goes through to reach the vault
/// directory (from `/`, as given, every link followed: the daemon takes
/// the same way at each start): whoever may rename an entry in one of
/// those directories, or replace such a link, can put a vault directory
/// of their own in its place (another config, another control file: the
/// daemon would run what they chose). FAIL if others may write one of
/// the directories (and it is not sticky), WARN if another user owns one
/// of them or of the links.
fn dirs_above_vault(dir: &Path) -> Finding {
    const CHECK: &str = "vault-dir-path";
    let unreadable = |p: &Path, e: std::io::Error| {
        Finding::fail(
            CHECK,
            format!("{}: {e}", p.display()),
            "give the vault directory by a path whose every directory root can reach",
        )
    };
    let real = match std::fs::canonicalize(dir) {
        Ok(p) => p,
        Err(e) => return unreadable(dir, e),
    };
    let mut entries = match entries_on_the_way(dir) {
        Ok(e) => e,
        Err((p, e)) => return unreadable(&p, e),
    };
    // The vault directory itself is `vault-dir`'s.
    entries.pop();
    let root = std::fs::metadata("/").map(|m| (PathBuf::from("/"), m));
    let mut owned = None;
    for (p, m) in root.into_iter().chain(entries) {
        if m.file_type().is_symlink() {
            if m.uid() != 0 {
                owned.get_or_insert((p, m.uid(), "a link"));
            }
            continue;
        }
        match root_alone(&m, true) {
            Ok(()) => {}
            Err(NotRootAlone::Writable(mode)) => {
                return Finding::fail(
                    CHECK,
                    format!(
                        "{} (on the way to the vault directory {}) has mode {mode:04o}: others can move the vault directory away and put another in its place",
                        p.display(),
                        real.display()
                    ),
                    format!(
                        "chmod go-w {}, or move the vault under directories only root can write (such as /var/lib/coffre)",
                        p.display()
                    ),
                );
            }
            Err(NotRootAlone::Owner(uid)) => {
                owned.get_or_insert((p, uid, "a directory"));
            }
        }
    }
    match owned {
        Some((p, uid, what)) => Finding::warn(
            CHECK,
            format!(
                "{} (on the way to the vault directory {}) is {what} of uid {uid}, not root's: that user can put another vault directory in its place",
                p.display(),
                real.display()
            ),
            format!(
                "chown -h root: {}, or give the vault by a path of directories and links of root's (such as /var/lib/coffre)",
                p.display()
            ),
        ),
        None => Finding::ok(
            CHECK,
            format!(
                "every directory above {} and on the way to it is root's alone (or sticky)",
                real.display()
            ),
        ),
    }
}

/// Remote storage's write journal: its directory and every one on the
/// way to it root's alone (the open refuses it otherwise).
fn journal_dir(d: &crate::vaultdir::VaultDir, sc: &crate::vaultdir::StorageConfig) -> Finding {
    const CHECK: &str = "journal-dir";
    let dir = crate::remote::journal_dir(sc, d);
    match crate::remote::journal_dir_secured(&dir, &d.root, false) {
        Ok(real) if !real.exists() => Finding::ok(
            CHECK,
            format!(
                "{} does not exist yet: made 0700 at the first open, under directories that are root's alone",
                real.display()
            ),
        ),
        Ok(real) => Finding::ok(
            CHECK,
            format!(
                "{} (the write journal's) and every directory on the way to it are root's alone",
                real.display()
            ),
        ),
        Err(why) => Finding::fail(
            CHECK,
            why,
            "give [storage] cache_dir a directory whose every directory on the way is root's and writable by nobody else, or fix their owner and mode",
        ),
    }
}

fn ext4_tools() -> Finding {
    let missing: Vec<&str> = ["mkfs.ext4", "e2fsck"]
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .collect();
    if missing.is_empty() {
        Finding::ok("ext4-tools", "mkfs.ext4 and e2fsck found")
    } else {
        Finding::fail(
            "ext4-tools",
            format!(
                "{} not found (a new vault's data is formatted ext4, and checked at open)",
                missing.join(" and ")
            ),
            "apt-get install e2fsprogs",
        )
    }
}

fn cgroups() -> Finding {
    use coffre_workload::cgroup::{FreezerChoice, FreezerKind, Hierarchy};
    match Hierarchy::detect(FreezerChoice::Auto) {
        Ok(h) => Finding::ok(
            "cgroups",
            format!(
                "{} freezer at {}",
                match h.kind {
                    FreezerKind::V2 => "cgroup v2",
                    FreezerKind::V1 => "cgroup v1",
                },
                h.root.display()
            ),
        ),
        Err(e) => Finding::fail(
            "cgroups",
            format!("{e} (workloads are paused with it when the vault closes)"),
            "mount the unified hierarchy (mount -t cgroup2 none /sys/fs/cgroup), or the v1 freezer controller",
        ),
    }
}

fn nftables(needed: bool) -> Finding {
    match find_program("nft") {
        Some(p) => Finding::ok("nftables", format!("{}", p.display())),
        None => Finding::missing(
            "nftables",
            needed,
            "nft not found (the vault's network and its firewall need it)".into(),
            "apt-get install nftables",
        ),
    }
}

/// The first line a trusted program prints for `--version` (with an
/// empty environment, within 10 s), or why there is none.
fn version_line(program: &Path) -> Result<String, String> {
    use std::io::Read;
    trusted_program(program)?;
    let mut child = coffre_sys::child::system_tool(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} --version did not answer within 10 s",
                program.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut out = String::new();
    if let Some(o) = child.stdout.take() {
        let _ = o.take(64 * 1024).read_to_string(&mut out);
    }
    out.lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{} --version printed nothing", program.display()))
}

fn qemu_binary(needed: bool, configured: Option<&Path>) -> Finding {
    let program = configured
        .map(Path::to_path_buf)
        .or_else(|| find_program("qemu-system-x86_64"));
    match program.as_deref().map(version_line) {
        Some(Ok(v)) => Finding::ok("qemu", v),
        Some(Err(why)) => Finding::missing(
            "qemu",
            needed,
            format!("{why} (VM workloads need QEMU)"),
            "apt-get install qemu-system-x86; a configured [workloads] qemu must be root's alone",
        ),
        None => Finding::missing(
            "qemu",
            needed,
            "qemu-system-x86_64 not found (VM workloads need it)".into(),
            "apt-get install qemu-system-x86",
        ),
    }
}

fn kvm() -> Finding {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) if Path::new("/sys/module/kvm_pvm").exists() => Finding::warn(
            "kvm",
            "/dev/kvm is PVM (kvm_pvm, a nested hypervisor): stock guest kernels hang under it and -cpu host aborts",
            "accel = \"tcg\" on each VM workload in config.toml (slower, but it boots)",
        ),
        Ok(_) => Finding::ok(
            "kvm",
            "/dev/kvm opens (whether it boots a guest is not tried)",
        ),
        Err(e) => Finding::warn(
            "kvm",
            format!("/dev/kvm: {e}: VMs run under TCG emulation, many times slower"),
            "enable virtualization in the firmware (or nested virtualization), modprobe kvm_intel or kvm_amd",
        ),
    }
}

/// `(major, minor)` of "OpenVPN 2.6.14 x86_64-pc-linux-gnu ...".
pub fn openvpn_version(line: &str) -> Option<(u32, u32)> {
    let v = line.strip_prefix("OpenVPN ")?.split_whitespace().next()?;
    let mut parts = v.split(['.', '_', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn openvpn(needed: bool) -> Finding {
    let line = find_program("openvpn").and_then(|p| version_line(&p).ok());
    match line.as_deref().map(|l| (l, openvpn_version(l))) {
        Some((l, Some(v))) if v >= (2, 6) => Finding::ok(
            "openvpn",
            l.split_whitespace().take(2).collect::<Vec<_>>().join(" "),
        ),
        Some((l, _)) => Finding::missing(
            "openvpn",
            needed,
            format!("{l}: the gateway needs OpenVPN 2.6 or later"),
            "install OpenVPN 2.6 (Debian 12: apt-get install openvpn)",
        ),
        None => Finding::missing(
            "openvpn",
            needed,
            "openvpn not found (the VPN gateway needs it)".into(),
            "apt-get install openvpn",
        ),
    }
}

/// Landlock, with which the vault network's helpers (the DHCP, LDAP and
/// NFS servers, which parse guests' bytes) confine themselves: to no
/// file, or (NFS) beneath the data's mount of their own.
fn landlock(network: bool) -> Finding {
    match coffre_sys::confine::abi() {
        Some(v) if v >= 6 => Finding::ok(
            "landlock",
            format!(
                "Landlock ABI {v}: the DHCP and LDAP servers confine themselves to no file, the NFS server to its mount of the data"
            ),
        ),
        Some(v) if network => Finding::warn(
            "landlock",
            format!(
                "Landlock ABI {v} (before Linux 6.12): the DHCP and LDAP servers open no file and the NFS server only the data, but they may signal processes of their user{}",
                if v < 4 {
                    ", bind and connect TCP sockets"
                } else {
                    ""
                }
            ),
            "a kernel of 6.12 or later",
        ),
        None if network => Finding::warn(
            "landlock",
            "no Landlock (not in this kernel, or refused by a seccomp filter): the DHCP and LDAP servers, which parse guests' bytes, reach what their user (nobody) may, and the NFS server every file on the host (CAP_DAC_READ_SEARCH)",
            "boot a kernel with CONFIG_SECURITY_LANDLOCK=y and landlock in its lsm= list",
        ),
        Some(v) => Finding::ok(
            "landlock",
            format!(
                "Landlock ABI {v} (only the vault network's helpers use it; none is configured)"
            ),
        ),
        None => Finding::ok(
            "landlock",
            "no Landlock (only the vault network's helpers use it; none is configured)",
        ),
    }
}

/// seccomp filters, with which the same helpers refuse themselves new
/// namespaces, mounts, bpf, io_uring, execve and the like
/// (`coffre_sys::seccomp`): the kernel must have filters and the two
/// actions the filter returns.
fn seccomp(network: bool) -> Finding {
    let avail = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail");
    let usable = avail.as_ref().is_ok_and(|a| {
        let a: Vec<&str> = a.split_whitespace().collect();
        a.contains(&"errno") && a.contains(&"kill_process")
    });
    match (usable, network) {
        (true, _) => Finding::ok(
            "seccomp",
            "seccomp filters: the DHCP, LDAP and NFS servers refuse themselves new namespaces, mounts, bpf, io_uring, execve and the like",
        ),
        (false, true) => Finding::warn(
            "seccomp",
            match &avail {
                Ok(a) => format!(
                    "seccomp lacks the actions the helpers' filter returns (errno, kill_process; this kernel has: {}): the DHCP, LDAP and NFS servers run unfiltered",
                    a.trim()
                ),
                Err(e) => format!(
                    "no seccomp filters here (/proc/sys/kernel/seccomp/actions_avail: {e}): the DHCP, LDAP and NFS servers run unfiltered"
                ),
            },
            "a kernel of 4.14 or later with CONFIG_SECCOMP_FILTER=y",
        ),
        (false, false) => Finding::ok(
            "seccomp",
            "no usable seccomp filters (only the vault network's helpers use them; none is configured)",
        ),
    }
}

fn suid_dumpable() -> Finding {
    let v = std::fs::read_to_string("/proc/sys/fs/suid_dumpable").unwrap_or_default();
    match v.trim() {
        "0" => Finding::ok("suid-dumpable", "fs.suid_dumpable = 0"),
        "2" => Finding::warn(
            "suid-dumpable",
            "fs.suid_dumpable = 2: the daemon makes itself undumpable, but a core of a process that changed identity is still written (root-only) where core_pattern says",
            "sysctl -w fs.suid_dumpable=0 (and in /etc/sysctl.d/)",
        ),
        "1" => Finding::fail(
            "suid-dumpable",
            "fs.suid_dumpable = 1 (debug): every process may dump core, the daemon with the volume key included",
            "sysctl -w fs.suid_dumpable=0 (and in /etc/sysctl.d/)",
        ),
        other => Finding::warn(
            "suid-dumpable",
            format!("fs.suid_dumpable reads {other:?}"),
            "mount /proc; set fs.suid_dumpable to 0",
        ),
    }
}

fn swap() -> Finding {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let active: Vec<&str> = swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if active.is_empty() {
        Finding::ok("swap", "no swap")
    } else {
        Finding::warn(
            "swap",
            format!(
                "swap is on ({}): while the vault is open, plaintext pages of the data can be written to it (the keys are locked in memory)",
                active.join(", ")
            ),
            "swapoff -a, or encrypt swap with a random key at each boot (crypttab: swap,cipher=aes-xts-plain64,size=512)",
        )
    }
}

fn clock() -> Finding {
    match coffre_sys::time::clock_synchronized() {
        Ok(true) => Finding::ok("clock", "synchronized"),
        Ok(false) => Finding::warn(
            "clock",
            "the kernel says the clock is not synchronized: TOTP codes are checked against it, and a drift of one time step refuses good codes",
            "run an NTP client (chrony, systemd-timesyncd)",
        ),
        Err(e) => Finding::warn("clock", format!("adjtimex: {e}"), "check the host's clock"),
    }
}

/// Where a VM guest's cpuidle driver and its halt-polling window are.
const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";
const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

fn halt_polling() -> Finding {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    judge_halt_polling(
        read(CPUIDLE_DRIVER).as_deref(),
        read(HALT_POLL_NS).as_deref(),
    )
}

/// On a KVM guest whose cpuidle driver is `haltpoll`, an idle vCPU polls
/// for up to `guest_halt_poll_ns` before it halts. With no polling every
/// wake-up of an idle vCPU goes through the hypervisor, and a request
/// through the vault's FUSE layers waits on several (docs/performance.md,
/// "Tried"). A trade the host's owner makes (polling burns host CPU while
/// idle), so a warning, with the figures.
fn judge_halt_polling(driver: Option<&str>, poll_ns: Option<&str>) -> Finding {
    const CHECK: &str = "cpu-idle";
    let driver = driver.map(str::trim).unwrap_or("none");
    if driver != "haltpoll" {
        return Finding::ok(CHECK, format!("cpuidle driver: {driver}"));
    }
    match poll_ns.map(str::trim).map(str::parse::<u64>) {
        Some(Ok(0)) => Finding::warn(
            CHECK,
            "this VM guest's vCPUs halt at once when idle (haltpoll, guest_halt_poll_ns = 0): each request through the vault's mount or the workloads' view waits for halted vCPUs to be woken through the hypervisor (measured on such a host, medians: random 4 KiB reads through the mount 34 us, 25 us with 200 us of polling; through the workloads' view 48 us and 39 us)",
            format!(
                "echo 200000 > {HALT_POLL_NS} (the kernel's default; haltpoll.guest_halt_poll_ns=200000 on the kernel command line to keep it): idle vCPUs then poll up to 200 us before halting, which costs the host CPU time"
            ),
        ),
        Some(Ok(ns)) => Finding::ok(
            CHECK,
            format!("haltpoll: idle vCPUs poll up to {ns} ns before halting"),
        ),
        _ => Finding::ok(CHECK, "haltpoll (its polling window unreadable)"),
    }
}

/// The vault directory's checks; also what its config needs of the host
/// and the QEMU it names (for [`host`]).
pub fn vault(dir: &Path) -> (Vec<Finding>, Needs, Option<PathBuf>) {
    let d = VaultDir::new(dir);
    let mut out = Vec::new();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            out.push(modes_of_dir(dir, &m));
            out.push(dirs_above_vault(dir));
        }
        Ok(_) => {
            out.push(Finding::fail(
                "vault-dir",
                format!("{} is not a directory", dir.display()),
                "give the directory coffre init made",
            ));
            return (out, Needs::default(), None);
        }
        Err(e) => {
            out.push(Finding::fail(
                "vault-dir",
                format!("{}: {e}", dir.display()),
                "give the directory coffre init made",
            ));
            return (out, Needs::default(), None);
        }
    }
    let config = match d.load_config() {
        Ok(c) => {
            out.push(Finding::ok(
                "config",
                format!("{} is valid", d.config().display()),
            ));
            Some(c)
        }
        Err(e) => {
            out.push(Finding::fail(
                "config",
                e.to_string(),
                "correct config.toml (docs/operations.md lists its settings)",
            ));
            None
        }
    };
    // The header's keyslots are what a password is guessed against.
    let header_file: Vec<PathBuf> = config.iter().map(|c| c.header.clone()).collect();
    out.insert(2, secret_files(&d, &header_file));
    out.push(match d.load_control() {
        Ok(_) => Finding::ok("control", format!("{} reads", d.control().display())),
        Err(e) => Finding::fail(
            "control",
            e.to_string(),
            "restore control.json from a backup of the vault directory",
        ),
    });
    if let Some(c) = &config {
        out.push(header(&c.header));
        if let Some(v) = &c.volume {
            out.push(volume_space(v));
        }
        if let Some(sc) = &c.storage {
            out.push(journal_dir(&d, sc));
        }
    }
    out.extend(certificates(dir, now_unix()));
    out.extend(key_pairs(&d));
    out.extend(ca_key_change(&d));
    let needs = config.as_ref().map(Needs::of).unwrap_or_default();
    let qemu = config.and_then(|c| c.workloads.qemu);
    (out, needs, qemu)
}

fn now_unix() -> i64 {
    i64::try_from(coffre_sys::time::now_ms() / 1000).unwrap_or(i64::MAX)
}

fn modes_of_dir(dir: &Path, m: &std::fs::Metadata) -> Finding {
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Finding::fail(
            "vault-dir",
            format!(
                "{} has mode {mode:04o}: others can list the vault's files",
                dir.display()
            ),
            format!("chmod 700 {}", dir.display()),
        );
    }
    if m.uid() != 0 {
        return Finding::warn(
            "vault-dir",
            format!(
                "{} belongs to uid {}, not root: that user can replace the vault's files",
                dir.display(),
                m.uid()
            ),
            format!("chown root: {}", dir.display()),
        );
    }
    Finding::ok(
        "vault-dir",
        format!("{} is root's, mode {mode:04o}", dir.display()),
    )
}

/// Files whose bytes are secrets, or whose change would let someone in:
/// none may be readable or writable by group or others.
fn secret_files(d: &VaultDir, extra: &[PathBuf]) -> Finding {
    let mut files = vec![
        d.control(),
        d.config(),
        d.ca_key(),
        d.ca_next_key(),
        d.server_key(),
        d.server_next_key(),
        d.host_key(),
        d.storage_key(),
        d.storage_root(),
        d.root.join("storage.credentials"),
    ];
    files.extend(extra.iter().cloned());
    if let Ok(entries) = std::fs::read_dir(d.gateway_dir()) {
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "key")),
        );
    }
    let mut open = Vec::new();
    for f in files {
        if let Ok(m) = std::fs::symlink_metadata(&f)
            && m.permissions().mode() & 0o077 != 0
        {
            open.push(format!(
                "{} ({:04o})",
                f.display(),
                m.permissions().mode() & 0o7777
            ));
        }
    }
    if open.is_empty() {
        Finding::ok(
            "control-file",
            "control.json, config.toml, the keys and the LUKS2 header are root's alone",
        )
    } else {
        Finding::fail(
            "control-file",
            format!(
                "readable or writable by others: {} (the control file holds the TOTP secrets)",
                open.join(", ")
            ),
            "chmod 600 on each, then check who may have read them: rotate what leaked",
        )
    }
}

/// Both copies of the LUKS2 header, read without taking its lock (a
/// running daemon holds it).
fn header(path: &Path) -> Finding {
    use std::os::unix::fs::FileExt;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            return Finding::fail(
                "header",
                format!("{}: {e}", path.display()),
                "restore the header file from its backup: without it the data is lost",
            );
        }
    };
    let mut read = |at: u64, len: usize| -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; len];
        match file.read_exact_at(&mut buf, at) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    };
    match coffre_luks2::header::load(&mut read) {
        Err(e) => Finding::fail(
            "header",
            format!("{}: {e}", path.display()),
            "check the disk; restore the header from its backup",
        ),
        Ok(Err(e)) => Finding::fail(
            "header",
            format!("{}: {e}", path.display()),
            "restore the header from its backup (cryptsetup luksHeaderRestore reads the same format)",
        ),
        Ok(Ok(l)) if l.is_consistent() => Finding::ok(
            "header",
            format!(
                "{}: LUKS2, both copies valid (seqid {}), {} keyslot(s)",
                path.display(),
                l.header.binary.seqid,
                l.header.metadata.keyslots.len()
            ),
        ),
        Ok(Ok(l)) => Finding::warn(
            "header",
            format!(
                "{}: one copy is not current (primary: {:?}; secondary: {:?}); nothing writes to it until it is repaired",
                path.display(),
                l.primary,
                l.secondary
            ),
            format!(
                "with the daemon stopped: coffre volume repair --header {} VOLUME",
                path.display()
            ),
        ),
    }
}

/// A sparse volume file still to be filled: the filesystem holds what it
/// lacks, or writes fail once it is full.
fn volume_space(path: &Path) -> Finding {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Finding::fail(
                "volume",
                format!("{}: {e}", path.display()),
                "restore the volume file, or correct `volume` in config.toml",
            );
        }
    };
    if !m.is_file() {
        return Finding::ok("volume", format!("{} (a device)", path.display()));
    }
    let unallocated = m.len().saturating_sub(m.blocks().saturating_mul(512));
    let free = path
        .parent()
        .and_then(|p| coffre_sys::fs::available_bytes(p).ok());
    match free {
        Some(free) if free < unallocated => Finding::warn(
            "volume",
            format!(
                "{}: {} MiB of the volume are not allocated yet and the filesystem has {} MiB free: writes fail once it is full",
                path.display(),
                unallocated >> 20,
                free >> 20
            ),
            "free space on that filesystem, or move the volume (coffre storage migrate)",
        ),
        Some(free) => Finding::ok(
            "volume",
            format!(
                "{}: {} MiB, {} MiB free beside it",
                path.display(),
                m.len() >> 20,
                free >> 20
            ),
        ),
        None => Finding::ok(
            "volume",
            format!("{}: {} MiB", path.display(), m.len() >> 20),
        ),
    }
}

/// Whether the door's and the gateway's certificates are for the keys
/// beside them (a renewal cut between its two writes leaves a pair that
/// is not).
/// A change of the CA's key (`coffre renew --ca --new-key`): interrupted
/// (the daemon does not start), or under way (finished by `--finish`).
fn ca_key_change(d: &VaultDir) -> Option<Finding> {
    let dir = d.root.display();
    if d.ca_next_cert().exists() {
        return Some(Finding::fail(
            "ca key change",
            format!(
                "{} is there: a change of the CA's key was interrupted, and the daemon does not start",
                d.ca_next_cert().display()
            ),
            format!("coffre renew --ca {dir} --new-key (it finishes that change)"),
        ));
    }
    match crate::renew::key_changed(d) {
        Ok(Some(_)) => Some(Finding::warn(
            "ca key change",
            "the CA's key was changed and the change is not finished: the door still trusts the previous CA, and members' machines that have not renewed pin it",
            format!("members renew (coffre renew), then: coffre renew --ca {dir} --finish"),
        )),
        Ok(None) | Err(_) => None,
    }
}

fn key_pairs(d: &VaultDir) -> Vec<Finding> {
    let gw = d.gateway_dir();
    [
        (d.ca_cert(), d.ca_key(), ""),
        (d.server_cert(), d.server_key(), "--server"),
        (gw.join("server.pem"), gw.join("server.key"), "--gateway"),
    ]
    .into_iter()
    .filter_map(|(cert, key, flag)| {
        if flag.is_empty() && d.ca_next_cert().exists() {
            // A change of the CA's key cut short: `ca_key_change` says it.
            return None;
        }
        let c = std::fs::read_to_string(&cert).ok()?;
        let k = zeroize::Zeroizing::new(std::fs::read_to_string(&key).ok()?);
        Some(if crate::pki::cert_matches_key(&c, &k) {
            Finding::ok(
                "key pair",
                format!("{} is for {}", cert.display(), key.display()),
            )
        } else {
            Finding::fail(
                "key pair",
                format!("{} is not for {}", cert.display(), key.display()),
                if flag.is_empty() {
                    // The CA's: what it signs would chain to nothing, and
                    // no renewal makes either anew.
                    "restore ca.pem and ca.key together from the vault directory's backup"
                        .to_string()
                } else {
                    format!("coffre renew {flag} {}", d.root.display())
                },
            )
        })
    })
    .collect()
}

/// How to renew the certificate in `file`.
fn renewal(dir: &Path, file: &Path) -> String {
    let d = dir.display();
    let changing = dir.join("ca.previous.pem").exists();
    match file.strip_prefix(dir).ok().and_then(Path::to_str) {
        // During a change of the CA's key OpenVPN's files hold the previous
        // CA and the cross certificate, which no renewal makes anew.
        Some("gateway/ca.pem" | "gateway/server.pem") if changing => format!(
            "it holds the previous CA or the cross certificate until the change of the CA's key is finished: coffre renew --ca {d} --finish before it ends (docs/operations.md, \"A new CA key\")"
        ),
        Some("server.pem") => format!("renew it: coffre renew --server {d}"),
        Some("gateway/server.pem") => {
            format!("renew it: coffre renew --gateway {d}, then restart OpenVPN")
        }
        Some("bus/vault.pem") => format!(
            "renew it: coffre bus broker-config {d} --listen HOST:PORT --out BROKER_DIR (it reissues the daemon's bus certificate within 30 days of its end), then restart the daemon"
        ),
        Some("ca.cross.pem" | "ca.previous.pem") => {
            "it ends with the CA before its key was changed: machines that still pin that CA stop trusting the door then (docs/operations.md, \"A new CA key\")".into()
        }
        Some("ca.pem" | "gateway/ca.pem") => format!(
            "renew it: coffre renew --ca {d} (same key; it says what to give the new one to)"
        ),
        _ => "renew it (members: coffre renew, from their machine)".into(),
    }
}

/// Every certificate in the vault directory, its gateway directory and its
/// bus directory (the daemon's own bus certificate):
/// expired, expiring within [`EXPIRY_WARNING_DAYS`], or fine.
pub fn certificates(dir: &Path, now: i64) -> Vec<Finding> {
    let mut files: Vec<PathBuf> = Vec::new();
    for d in [dir.to_path_buf(), dir.join("gateway"), dir.join("bus")] {
        if let Ok(entries) = std::fs::read_dir(&d) {
            let mut here: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pem" || x == "crt"))
                .collect();
            here.sort();
            files.extend(here);
        }
    }
    let mut out = Vec::new();
    for f in files {
        let Ok(bytes) = coffre_sys::fs::read_small(&f, 1 << 20) else {
            continue;
        };
        for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes).flatten() {
            if pem.label != "CERTIFICATE" {
                continue;
            }
            let Ok(cert) = pem.parse_x509() else {
                out.push(Finding::fail(
                    "certificate",
                    format!("{}: a certificate that does not parse", f.display()),
                    "replace the file",
                ));
                continue;
            };
            let subject = cert.subject().to_string();
            let end = cert.validity().not_after.timestamp();
            let days = (end - now).div_euclid(86_400);
            let what = format!(
                "{} ({subject}) ends {}",
                f.display(),
                cert.validity().not_after
            );
            out.push(if end <= now {
                Finding::fail("certificate", format!("{what}: expired"), renewal(dir, &f))
            } else if days < EXPIRY_WARNING_DAYS {
                Finding::warn(
                    "certificate",
                    format!("{what}: in {days} day(s)"),
                    renewal(dir, &f),
                )
            } else {
                Finding::ok("certificate", format!("{what}: in {days} days"))
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openvpn_versions_parse() {
        assert_eq!(
            openvpn_version("OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)]"),
            Some((2, 6))
        );
        assert_eq!(openvpn_version("OpenVPN 2.5_git x86_64"), Some((2, 5)));
        assert_eq!(openvpn_version("OpenVPN 3.0.1"), Some((3, 0)));
        assert_eq!(openvpn_version("openvpn: not found"), None);
        assert_eq!(openvpn_version("OpenVPN x.y"), None);
    }

    /// Only programs root alone can change are run: not one in a
    /// directory others may write, wherever the config points.
    #[test]
    fn a_program_others_can_change_is_not_run() {
        assert!(trusted_program(Path::new("/bin/sh")).is_ok());
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("qemu");
        std::fs::write(&p, "#!/bin/sh\necho owned > /tmp/coffre-doctor-ran\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = version_line(&p).unwrap_err();
        assert!(e.contains("not root's alone"), "{e}");
        assert!(!Path::new("/tmp/coffre-doctor-ran").exists());
        assert!(find_program("sh").is_some_and(|p| p.starts_with("/usr") || p.starts_with("/bin")));
    }

    /// A directory above the vault's that others may write fails (they
    /// could put another vault directory in its place), one another user
    /// owns warns, a sticky one (as `/tmp`) does not count; a link on the
    /// way that another user owns warns too. Owners need root to change:
    /// without it only the modes are judged.
    #[test]
    fn directories_above_the_vault_are_judged() {
        use std::os::unix::fs::PermissionsExt;
        let root = rustix::process::geteuid().is_root();
        let t = tempfile::tempdir().unwrap();
        let above = t.path().join("above");
        let vault = above.join("vault");
        std::fs::create_dir_all(&vault).unwrap();
        let mode =
            |m| std::fs::set_permissions(&above, std::fs::Permissions::from_mode(m)).unwrap();
        let names = |f: &Finding, p: &Path| {
            f.detail
                .starts_with(&format!("{} (on the way", p.display()))
        };
        mode(0o777);
        let f = dirs_above_vault(&vault);
        assert_eq!(f.level, Level::Fail, "{f:?}");
        assert!(
            names(&f, &above) && f.fix.as_deref().unwrap().contains("chmod go-w"),
            "{f:?}"
        );
        assert_eq!(f.check, "vault-dir-path");
        if !root {
            return;
        }
        mode(0o755);
        let f = dirs_above_vault(&vault);
        assert!(f.level != Level::Fail && !names(&f, &above), "{f:?}");
        mode(0o1777);
        let f = dirs_above_vault(&vault);
        assert!(f.level != Level::Fail && !names(&f, &above), "{f:?}");
        mode(0o755);
        std::os::unix::fs::chown(&above, Some(4321), None).unwrap();
        let f = dirs_above_vault(&vault);
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert!(names(&f, &above) && f.detail.contains("uid 4321"), "{f:?}");
        // Writable and another user's: the worse is said.
        mode(0o777);
        assert_eq!(dirs_above_vault(&vault).level, Level::Fail);
        mode(0o755);
        std::os::unix::fs::chown(&above, Some(0), None).unwrap();
        // A link to the vault that another user owns, judged as given.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&vault, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(4321), None).unwrap();
        let f = dirs_above_vault(&link);
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert!(names(&f, &link) && f.detail.contains("a link"), "{f:?}");
        // Given with a trailing slash (as shells complete a link to a
        // directory), and reached through a second link.
        let f = dirs_above_vault(&PathBuf::from(format!("{}/", link.display())));
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert!(names(&f, &link), "{f:?}");
        let first = t.path().join("first");
        std::os::unix::fs::symlink("link", &first).unwrap();
        let f = dirs_above_vault(&first);
        assert_eq!(f.level, Level::Warn, "{f:?}");
        assert!(names(&f, &link), "{f:?}");
        std::os::unix::fs::lchown(&link, Some(0), None).unwrap();
        let f = dirs_above_vault(&first);
        assert!(f.level != Level::Fail && !names(&f, &link), "{f:?}");
        // A directory others may write, reached through the link's
        // target only: still found.
        mode(0o777);
        let f = dirs_above_vault(&first);
        assert_eq!(f.level, Level::Fail, "{f:?}");
        assert!(names(&f, &above), "{f:?}");
        mode(0o755);
        // `..` as resolved: /above/vault/.. is `above`, judged; nothing
        // of a path's text that the kernel does not go through.
        let f = dirs_above_vault(&vault.join("..").join("vault"));
        assert!(f.level != Level::Fail, "{f:?}");
        // The same rule as programs', but for sticky directories.
        let m = |m| {
            std::fs::set_permissions(&above, std::fs::Permissions::from_mode(m)).unwrap();
            std::fs::metadata(&above).unwrap()
        };
        assert_eq!(root_alone(&m(0o1777), true), Ok(()));
        assert!(root_alone(&m(0o1777), false).is_err());
        assert_eq!(
            root_alone(&m(0o775), true),
            Err(NotRootAlone::Writable(0o775))
        );
    }

    #[test]
    fn halt_polling_off_on_a_vm_guest_is_a_warning() {
        let j = judge_halt_polling;
        let off = j(Some("haltpoll\n"), Some("0\n"));
        assert_eq!(off.level, Level::Warn, "{off:?}");
        assert!(off.fix.as_deref().unwrap().contains("guest_halt_poll_ns"));
        let on = j(Some("haltpoll\n"), Some("200000\n"));
        assert_eq!(on.level, Level::Ok);
        assert!(on.detail.contains("200000 ns"), "{on:?}");
        // Not a haltpoll guest (bare metal, another driver, no cpuidle):
        // nothing to say, whatever the module's parameter reads.
        for driver in [Some("intel_idle\n"), Some("acpi_idle"), None] {
            assert_eq!(j(driver, Some("0")).level, Level::Ok, "{driver:?}");
        }
        assert_eq!(j(Some("haltpoll"), Some("garbage")).level, Level::Ok);
        assert_eq!(j(Some("haltpoll"), None).level, Level::Ok);
        assert!(off.check == "cpu-idle" && on.check == "cpu-idle");
    }

    #[test]
    fn shared_mappings_need_linux_6_6() {
        assert_eq!(release("6.18.44-cloud-amd64\n"), Some((6, 18)));
        assert_eq!(release("5.15.0"), Some((5, 15)));
        assert_eq!(release("garbage"), None);
        assert_eq!(shared_mappings("6.6.0").level, Level::Ok);
        assert_eq!(shared_mappings("6.18.44-cloud-amd64").level, Level::Ok);
        assert_eq!(shared_mappings("6.1.0-28-amd64").level, Level::Warn);
        assert_eq!(shared_mappings("5.10.0").level, Level::Warn);
        assert_eq!(shared_mappings("").level, Level::Warn);
    }

    #[test]
    fn the_worst_level_wins() {
        let f = |level| Finding {
            check: "x".into(),
            level,
            detail: String::new(),
            fix: None,
        };
        assert_eq!(worst(&[]), Level::Ok);
        assert_eq!(worst(&[f(Level::Ok), f(Level::Warn)]), Level::Warn);
        assert_eq!(
            worst(&[f(Level::Fail), f(Level::Warn), f(Level::Ok)]),
            Level::Fail
        );
    }

    /// A certificate is OK, WARN within 30 days of its end, FAIL after.
    #[test]
    fn certificates_are_judged_by_their_end() {
        let t = tempfile::tempdir().unwrap();
        let ca = crate::pki::new_ca("doctor").unwrap();
        std::fs::write(t.path().join("ca.pem"), &ca.cert_pem).unwrap();
        let der = x509_parser::pem::Pem::iter_from_buffer(ca.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let end = der.parse_x509().unwrap().validity().not_after.timestamp();
        let at = |now: i64| {
            let f = certificates(t.path(), now);
            assert_eq!(f.len(), 1, "{f:?}");
            f[0].level
        };
        assert_eq!(at(end - 365 * 86_400), Level::Ok);
        assert_eq!(at(end - 10 * 86_400), Level::Warn);
        assert_eq!(at(end + 1), Level::Fail);
        std::fs::write(
            t.path().join("bad.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let f = certificates(t.path(), end - 365 * 86_400);
        assert!(
            f.iter()
                .any(|f| f.level == Level::Fail && f.detail.contains("bad.pem")),
            "{f:?}"
        );
        // The daemon's bus certificate is looked at too, with its own way
        // to renew it.
        std::fs::remove_file(t.path().join("bad.pem")).unwrap();
        std::fs::create_dir(t.path().join("bus")).unwrap();
        let comp =
            crate::pki::new_component_cert("doctor", &ca.key_pem, "coffre-bus:vault").unwrap();
        std::fs::write(t.path().join("bus").join("vault.pem"), &comp.cert_pem).unwrap();
        let f = certificates(t.path(), end + 1);
        let bus = f
            .iter()
            .find(|f| f.detail.contains("vault.pem"))
            .unwrap_or_else(|| panic!("{f:?}"));
        assert_eq!(bus.level, Level::Fail);
        assert!(
            bus.fix
                .as_deref()
                .unwrap_or("")
                .contains("coffre bus broker-config"),
            "{bus:?}"
        );
    }
}

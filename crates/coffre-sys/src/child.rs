//! What a workload's process does between `fork` and `exec`: join its
//! cgroup (before it can fork anything that would escape it), start its
//! own session, optionally leave the host's view of the vault's mounts,
//! and drop to its user. Only async-signal-safe system calls run in the
//! child: everything that allocates or reads files (user and group
//! lookups, path conversions) is done beforehand in the parent.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The system's program directories, in the order [`SYSTEM_PATH`] has
/// them.
pub const SYSTEM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Where [`system_tool`] looks for programs: [`SYSTEM_DIRS`].
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The command for a system tool the daemon runs as root (`ip`, `nft`,
/// `losetup`, `mkfs.ext4`, `nsenter`, `useradd`...), with an environment
/// of its own: [`SYSTEM_PATH`] and the C locale, nothing inherited. The
/// daemon's environment may hold secrets (an S3 secret key, by design);
/// no tool needs them, and a tool's output is parsed in the C locale.
pub fn system_tool(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env_clear().env("PATH", SYSTEM_PATH).env("LC_ALL", "C");
    c
}

/// A mount the child's private mount namespace gets instead of the host's.
#[derive(Debug, Clone)]
pub struct Bind {
    /// What to bind (a path in the host's namespace).
    pub from: PathBuf,
    /// Where (replacing whatever is mounted there).
    pub to: PathBuf,
}

/// At most this many descriptors are passed (the child allocates nothing;
/// the DHCP server gets one per VM).
const MAX_PASS_FDS: usize = 64;
/// Passed descriptors are first moved at or above this number, below
/// which their targets must lie.
const PASS_FDS_ABOVE: libc::c_int = 1024;

/// How the child is set up before it runs the command.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// `cgroup.procs` of the group to join, opened for writing.
    pub cgroup_procs: Vec<OwnedFd>,
    /// User, primary group and supplementary groups to run as.
    pub credentials: Option<(u32, u32, Vec<u32>)>,
    /// Give the child a private mount namespace with these mounts
    /// detached (lazily, in its namespace only)...
    pub detach: Vec<PathBuf>,
    /// ...and these bind mounts made afterwards.
    pub binds: Vec<Bind>,
    /// A fresh tmpfs mounted here (after the detaches, before the binds),
    /// hiding what the host has below it: a vault directory is root's
    /// alone, and a workload running as a member must still reach the
    /// data's path inside it. Bind targets under it are created.
    pub cover: Option<PathBuf>,
    /// Whether to make a private mount namespace at all.
    pub private_mounts: bool,
    /// Working directory, entered last (after the mounts, so it is the
    /// namespace's view of that path).
    pub cwd: Option<PathBuf>,
    /// Descriptors the command inherits, each at the number given (after
    /// everything else, so they never land on a descriptor the set-up
    /// still needs). The command can open them as `/proc/self/fd/N`, which
    /// needs no search right on the directories of the file's path.
    pub pass_fds: Vec<(OwnedFd, libc::c_int)>,
    /// Its network: the host's (default), a new empty one, or the one
    /// this descriptor (`/run/netns/NAME`, opened) names.
    pub network: Network,
}

/// The network namespace a child runs in.
#[derive(Debug, Default)]
pub enum Network {
    /// The parent's.
    #[default]
    Host,
    /// A new one with nothing in it but a loopback that is down: no way
    /// out, whatever the command's arguments ask for (a QEMU that gets its
    /// NIC as a descriptor opened in the host's namespace).
    Empty,
    /// An existing one (a process workload's, with its veth).
    Join(OwnedFd),
}

/// Writes `/proc/self/fd/FD` and a NUL into `buf`, without allocating.
fn proc_fd_path(buf: &mut [u8; 32], fd: libc::c_int) {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Arranges for `cmd`'s child to be set up as `setup` says. Errors in the
/// child make `spawn` fail with that error.
pub fn prepare(cmd: &mut Command, setup: ChildSetup) -> io::Result<()> {
    let detach: Vec<CString> = setup
        .detach
        .iter()
        .map(|p| cstring(p))
        .collect::<io::Result<_>>()?;
    // Bind sources are opened in the child's namespace (a descriptor from
    // the parent's would name a mount of another namespace), before a
    // cover hides their paths; their /proc paths are written into buffers
    // allocated here.
    let mut binds: Vec<(CString, [u8; 32], CString)> = Vec::new();
    for b in &setup.binds {
        binds.push((cstring(&b.from)?, [0u8; 32], cstring(&b.to)?));
    }
    let cover = setup.cover.as_deref().map(cstring).transpose()?;
    let tmpfs = cstring(Path::new("tmpfs"))?;
    let tmpfs_opts = cstring(Path::new("mode=0755,size=64k"))?;
    let root = cstring(Path::new("/"))?;
    let cwd = setup.cwd.as_deref().map(cstring).transpose()?;
    let procs = setup.cgroup_procs;
    let network = setup.network;
    let creds = setup.credentials;
    let private = setup.private_mounts;
    if setup.pass_fds.len() > MAX_PASS_FDS
        || setup
            .pass_fds
            .iter()
            .any(|(_, to)| !(3..PASS_FDS_ABOVE).contains(to))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors to pass: at most 64, at numbers from 3 to 1023",
        ));
    }
    let pass: Vec<(libc::c_int, libc::c_int)> = setup
        .pass_fds
        .iter()
        .map(|(fd, to)| (fd.as_raw_fd(), *to))
        .collect();
    // Kept open in the parent until the command is spawned.
    let keep = setup.pass_fds;
    let job = move || -> io::Result<()> {
        let _ = &keep;
        for fd in &procs {
            // "0" moves the writing process (this child) into the group.
            // SAFETY: write(2) on a valid open descriptor from a buffer of
            // the given length; async-signal-safe.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: setsid takes no arguments; async-signal-safe.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        match &network {
            Network::Host => {}
            // SAFETY: unshare takes a flag word.
            Network::Empty => check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?,
            // SAFETY: setns on a descriptor this process holds, with the
            // namespace type it must be.
            Network::Join(fd) => check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })?,
        }
        if private {
            // SAFETY: unshare takes a flag word.
            check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
            // Nothing we do here may propagate back to the host.
            // SAFETY: all pointers are NUL-terminated strings that live in
            // this closure, or null where mount(2) allows it.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })?;
            for p in &detach {
                // Not mounted (EINVAL) or absent (ENOENT) is fine.
                // SAFETY: a valid NUL-terminated path.
                let _ = unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
            }
            for (from, path, _) in &mut binds {
                // Kept open (close-on-exec) until the exec.
                // SAFETY: a valid NUL-terminated path; plain flags.
                let fd = unsafe {
                    libc::open(
                        from.as_ptr(),
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                proc_fd_path(path, fd);
            }
            if let Some(c) = &cover {
                // SAFETY: valid NUL-terminated strings that live in this
                // closure.
                check(unsafe {
                    libc::mount(
                        tmpfs.as_ptr(),
                        c.as_ptr(),
                        tmpfs.as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        tmpfs_opts.as_ptr().cast(),
                    )
                })?;
            }
            for (_, from, to) in &binds {
                if cover.is_some() {
                    // Under the cover the target does not exist yet (one
                    // level: the data's mountpoint is a direct child).
                    // SAFETY: a valid NUL-terminated path.
                    let _ = unsafe { libc::mkdir(to.as_ptr(), 0o755) };
                }
                // SAFETY: valid NUL-terminated paths, null type and data.
                check(unsafe {
                    libc::mount(
                        from.as_ptr().cast(),
                        to.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                })?;
            }
        }
        // Nothing it runs can gain privileges (setuid files, file
        // capabilities).
        // SAFETY: prctl with plain integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        if let Some((uid, gid, groups)) = &creds {
            // SAFETY: the slice is valid for its length.
            check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
            // SAFETY: plain integers.
            check(unsafe { libc::setgid(*gid) })?;
            // SAFETY: plain integer.
            check(unsafe { libc::setuid(*uid) })?;
        }
        if let Some(dir) = &cwd {
            // As the target user: a directory they cannot enter fails here.
            // SAFETY: a valid NUL-terminated path.
            check(unsafe { libc::chdir(dir.as_ptr()) })?;
        }
        // Two passes, so that a target never overwrites a source still to
        // be moved: every source first goes above all targets.
        let mut moved = [0 as libc::c_int; MAX_PASS_FDS];
        for (i, &(from, _)) in pass.iter().enumerate() {
            // SAFETY: fcntl on a descriptor this process holds.
            let fd = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, PASS_FDS_ABOVE) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            moved[i] = fd;
        }
        for (i, &(_, to)) in pass.iter().enumerate() {
            // dup2 leaves the new descriptor without close-on-exec.
            // SAFETY: dup2 on descriptors this process holds.
            if unsafe { libc::dup2(moved[i], to) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls on
    // data prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(job);
    }
    Ok(())
}

/// A user's uid, primary gid and supplementary groups (`getpwnam_r`,
/// `getgrouplist`); `None` if there is no such user.
pub fn user(name: &str) -> io::Result<Option<(u32, u32, Vec<u32>)>> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name with a NUL byte"))?;
    account(|pw, buf, out| {
        // SAFETY: every pointer is valid for the sizes given; `out` is set
        // to `pw` or null.
        unsafe { libc::getpwnam_r(c.as_ptr(), pw, buf.as_mut_ptr().cast(), buf.len(), out) }
    })
}

/// The same for the account that has uid `uid` (`getpwuid_r`,
/// `getgrouplist`); `None` if no account has it.
pub fn user_by_uid(uid: u32) -> io::Result<Option<(u32, u32, Vec<u32>)>> {
    account(|pw, buf, out| {
        // SAFETY: every pointer is valid for the sizes given; `out` is set
        // to `pw` or null.
        unsafe { libc::getpwuid_r(uid, pw, buf.as_mut_ptr().cast(), buf.len(), out) }
    })
}

/// Runs a `getpw*_r` lookup into a buffer of its own, then asks for the
/// account's groups by the name it found.
fn account(
    lookup: impl FnOnce(&mut libc::passwd, &mut [u8], &mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<(u32, u32, Vec<u32>)>> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data; all-zero is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = lookup(&mut pw, &mut buf, &mut out);
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if out.is_null() || pw.pw_name.is_null() {
        return Ok(None);
    }
    let (uid, gid) = (pw.pw_uid, pw.pw_gid);
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(64)];
        let mut count = n;
        // SAFETY: `pw_name` points at a NUL-terminated name in `buf`,
        // still alive; `groups` holds `count` entries; getgrouplist writes
        // at most that many and sets `count` to the number it needs.
        let rc = unsafe { libc::getgrouplist(pw.pw_name, gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(usize::try_from(count).unwrap_or(0));
            return Ok(Some((uid, gid, groups)));
        }
        if count <= n || count > 65536 {
            return Err(io::Error::other("getgrouplist failed"));
        }
        n = count;
    }
}

/// Which side of a [`fork`] this is.
#[derive(Debug, PartialEq, Eq)]
pub enum Forked {
    /// The parent, with the child's process id.
    Parent(u32),
    /// The child.
    Child,
}

/// `fork(2)`, only while this process runs one thread (checked: after a
/// fork the child has only the calling thread, and a lock another
/// thread held, the allocator's among them, would never be released).
pub fn fork() -> io::Result<Forked> {
    let threads = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_string()))
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))?;
    if threads != "1" {
        return Err(io::Error::other(format!(
            "fork with {threads} threads running (one only)"
        )));
    }
    // SAFETY: one thread runs (checked above), so the child's memory is
    // consistent: no lock is held by a thread that does not exist there.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(u32::try_from(pid).unwrap_or(0))),
    }
}

/// Kills (SIGKILL) every process of the process group `pgid`: a helper
/// started with its own session (see [`prepare`]) and whatever it forked
/// that did not leave the group (the helpers' seccomp filter refuses
/// `setsid` and `setpgid`). `ESRCH` (none left) is not an error.
pub fn kill_group(pgid: u32) -> io::Result<()> {
    let g = libc::pid_t::try_from(pgid)
        .ok()
        .filter(|g| *g > 1)
        .ok_or_else(|| io::Error::other(format!("no process group {pgid}")))?;
    // SAFETY: kill(2) with a negative pid (a group) and a signal number.
    if unsafe { libc::kill(-g, libc::SIGKILL) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Whether helper `c` (a group leader: see [`prepare`]) has ended; if it
/// has, its process group is killed (what it forked) before it is
/// reaped: until then its number, the group's, cannot be reused.
pub fn reap_group(c: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    // SAFETY: siginfo_t is plain data; waitid writes it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let pid = libc::id_t::from(c.id());
    // SAFETY: waitid on one pid, not reaping it (WNOWAIT), into `info`.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &raw mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is set by waitid (0 when nothing has ended).
    if r != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    let _ = kill_group(c.id());
    c.try_wait().ok().flatten()
}

/// Kills helper `c` and its process group, and reaps it.
pub fn stop_group(c: &mut std::process::Child) {
    let _ = kill_group(c.id());
    let _ = c.kill();
    let _ = c.wait();
}

/// Ends this process's group: SIGKILL to every process in it, this one
/// included (a helper and what it forked). Returns only if the signal
/// could not be sent, and then exits.
pub fn end_own_group() -> ! {
    // SAFETY: kill(2) with pid 0 (this process's group) and a signal.
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
    std::process::exit(1)
}

/// Puts `input` and `output` in place of standard input and output (the
/// descriptors they replace are closed; the close-on-exec flag is not
/// set on the new ones).
pub fn replace_stdio(input: impl AsFd, output: impl AsFd) -> io::Result<()> {
    for (from, to) in [
        (input.as_fd().as_raw_fd(), 0),
        (output.as_fd().as_raw_fd(), 1),
    ] {
        // SAFETY: dup2 with two descriptor numbers; `to` is 0 or 1, which
        // nothing else in this process owns as an OwnedFd.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Asks for SIGKILL when the parent (the daemon) dies, and exits at once
/// if it is already gone. Call it after [`become_user`]: a change of
/// credentials clears the setting.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: getppid takes no arguments.
    let parent = unsafe { libc::getppid() };
    // SAFETY: prctl with plain integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;
    // SAFETY: getppid takes no arguments.
    if unsafe { libc::getppid() } != parent {
        std::process::exit(0);
    }
    Ok(())
}

/// Takes descriptor `fd`, inherited from the parent that spawned this
/// process (see [`ChildSetup::pass_fds`]), after checking that it is open
/// and not one of stdin, stdout or stderr. Call it once per number.
pub fn inherited_fd(fd: libc::c_int) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors 0 to 2 are not passed descriptors",
        ));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (above), was passed to this process
    // to own, and the caller takes each number once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not inherited any further.
    // SAFETY: F_SETFD with a flag word on a descriptor we hold.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    Ok(owned)
}

/// Drops this process, started as root, to `uid`:`gid` with no
/// supplementary groups and no way back (every capability goes with the
/// uid; no-new-privileges stops setuid files). Fails unless the drop is
/// complete: a later `setuid(0)` is checked to fail.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    if uid == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "dropping privileges to root",
        ));
    }
    // SAFETY: an empty list, as setgroups(2) allows.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integers.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integers.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: prctl with plain integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: setuid with a plain integer; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other("still able to become root after the drop"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A helper that died leaves nothing it forked behind: its group is
    /// killed before it is reaped.
    #[test]
    fn a_dead_helpers_group_goes_with_it() {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        assert_eq!(super::reap_group(&mut c), None, "still running");
        // SAFETY: kill(2) of our own child with SIGKILL.
        unsafe { libc::kill(c.id().cast_signed(), libc::SIGKILL) };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let st = loop {
            if let Some(st) = super::reap_group(&mut c) {
                break st;
            }
            assert!(std::time::Instant::now() < until);
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(!st.success());
        // The sleep was killed: gone, or a zombie waiting for its reaper.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .map(|s| s.rsplit(')').next().unwrap_or("").trim().chars().next())
                .ok()
                .flatten();
            if matches!(state, None | Some('Z' | 'X')) {
                break;
            }
            assert!(std::time::Instant::now() < until, "{grandchild}: {state:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A fork while other threads run is refused (this test binary runs
    /// its tests on threads of their own).
    #[test]
    fn fork_refuses_a_process_with_threads() {
        let keep = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
        let e = super::fork().unwrap_err();
        assert!(e.to_string().contains("threads running"), "{e}");
        keep.join().unwrap();
    }

    /// A system tool sees its own environment only, whatever the
    /// daemon's holds (this test process has HOME, and more).
    #[test]
    fn system_tools_inherit_no_environment() {
        assert!(std::env::vars_os().count() > 0);
        let out = super::system_tool("env").output().unwrap();
        assert!(out.status.success());
        let mut seen: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                "LC_ALL=C".to_string(),
                format!("PATH={}", super::SYSTEM_PATH)
            ]
        );
        assert_eq!(super::SYSTEM_PATH, super::SYSTEM_DIRS.join(":"));
    }

    #[test]
    fn proc_paths_are_written_without_allocating() {
        for (fd, want) in [
            (0, "/proc/self/fd/0"),
            (7, "/proc/self/fd/7"),
            (1048575, "/proc/self/fd/1048575"),
        ] {
            let mut buf = [0xffu8; 32];
            super::proc_fd_path(&mut buf, fd);
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], want.as_bytes());
        }
    }

    #[test]
    fn an_account_is_found_by_name_and_by_uid_alike() {
        let by_name = super::user("root").unwrap().expect("a root account");
        assert_eq!(by_name.0, 0);
        assert!(by_name.2.contains(&by_name.1), "{by_name:?}");
        assert_eq!(super::user_by_uid(0).unwrap(), Some(by_name));
        assert_eq!(super::user("no-such-user-coffre").unwrap(), None);
        // Far above any allocated range (and not -1 or -2, which some
        // systems give names).
        assert_eq!(super::user_by_uid(3_999_999_999).unwrap(), None);
    }
}

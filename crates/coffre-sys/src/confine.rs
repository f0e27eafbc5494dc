//! Landlock for the helpers that parse guests' bytes: what a helper may
//! reach on the filesystem once it has what it needs, whatever its
//! uid and capabilities say.
//!
//! The LDAP and DHCP servers need no file at all after their start: they
//! are confined to nothing, so that one a guest took over cannot open
//! even what its user (one of its own, of no account) may read or write. A confined process
//! also cannot make TCP connections or bind TCP ports (its sockets were
//! bound before), signal a process outside its domain or reach an
//! abstract UNIX socket. What Landlock does not cover (with the rights
//! asked for here, ABI 6): calls on a path's metadata (stat, readlink,
//! chmod, chown, utimes, xattrs) and connecting to a UNIX socket by its
//! path (ABI 9 can refuse that; not asked for until tested on such a
//! kernel).
//!
//! The NFS server needs the shares, which are mounted and unmounted
//! under it at each open and close. A rule on a mount point does not
//! cover a filesystem mounted over it later (Landlock's walk up a path
//! skips a covered mount point), so each VM's server is confined beneath
//! its mount point's parent, `DIR/run/nfs/NAME`, which holds it and
//! nothing else (the daemon mounts the VM's share there for it), with a file server's
//! rights ([`to_files_beneath`]). A file it reaches by handle through a
//! share's mount but outside that share is checked, by this kernel's
//! Landlock (6.18), as if it were at the mount's root: it opens.
//!
//! Landlock restricts the calling thread and the threads and processes it
//! starts afterwards: confine before starting any thread. On a kernel
//! without Landlock (before 5.13, or not enabled at boot) nothing is
//! enforced and [`Confined::Not`] says so; the caller reports it.
#![deny(unsafe_code)]

use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use std::path::Path;

/// The newest Landlock ABI these rules were written and tested for
/// (Linux 6.12: scopes). A newer kernel enforces these rights; rights it
/// adds later are not asked for until this is raised and tested.
const TESTED: ABI = ABI::V6;

/// What the kernel enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confined {
    /// Every right asked for.
    Fully,
    /// Some (an older kernel: the filesystem rights it knows).
    Partly,
    /// Nothing: the kernel has no Landlock.
    Not,
}

impl Confined {
    /// As `status` and logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Confined::Fully => "fully",
            Confined::Partly => "partly",
            Confined::Not => "not",
        }
    }
}

/// The Landlock ABI this kernel has (1 for Linux 5.13, 6 for 6.12...),
/// or `None` without Landlock (not built, or not enabled at boot).
#[allow(unsafe_code)]
pub fn abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: with a null attribute, size 0 and the VERSION flag, the
    // system call only returns the ABI version (or an error); it reads
    // and writes no memory of ours.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// Confines the calling thread (and what it starts later) to `dirs`:
/// every filesystem right beneath each of them, none anywhere else; no
/// TCP bind or connect; no signal or abstract UNIX socket outside.
/// `dirs` empty: no file may be opened at all (what is already open
/// stays usable).
pub fn to_beneath(dirs: &[&Path]) -> Result<Confined, String> {
    confine(dirs, AccessFs::from_all(TESTED))
}

/// As [`to_beneath`], but beneath `dirs` only what a file server does:
/// read, write, make, link, rename and remove directories, regular files,
/// symbolic links, FIFOs and sockets' names (Landlock asks the right to
/// make a FIFO or a socket of a rename or a link of one too, and a
/// guest's programs bind their sockets on an NFS mount). Not execute,
/// nor make devices, nor device ioctls (refused everywhere).
pub fn to_files_beneath(dirs: &[&Path]) -> Result<Confined, String> {
    let not = AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev;
    confine(dirs, AccessFs::from_all(TESTED) & !not)
}

fn confine(dirs: &[&Path], beneath: landlock::BitFlags<AccessFs>) -> Result<Confined, String> {
    let fs = AccessFs::from_all(TESTED);
    let mut created = Ruleset::default()
        .handle_access(fs)
        .and_then(|r| r.handle_access(AccessNet::from_all(TESTED)))
        .and_then(|r| r.scope(Scope::from_all(TESTED)))
        .and_then(|r| r.create())
        .map_err(|e| format!("Landlock: {e}"))?;
    for d in dirs {
        let at = PathFd::new(d).map_err(|e| format!("Landlock: {}: {e}", d.display()))?;
        created = created
            .add_rule(PathBeneath::new(at, beneath))
            .map_err(|e| format!("Landlock: {}: {e}", d.display()))?;
    }
    let status = created
        .restrict_self()
        .map_err(|e| format!("Landlock: {e}"))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confined::Fully,
        RulesetStatus::PartiallyEnforced => Confined::Partly,
        RulesetStatus::NotEnforced => Confined::Not,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs this test binary's `name` again in a child process with
    /// `COFFRE_CONFINE_CHILD` set to `arg`: Landlock cannot be undone, so
    /// the confined part runs where it ends.
    fn in_child(name: &str, arg: &Path) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("COFFRE_CONFINE_CHILD", arg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("confined child ran"),
            "the child did not run its part: {said}"
        );
        // Only a kernel without Landlock excuses a child that was not
        // confined (not a filter that hid it).
        if said.contains("no Landlock here") {
            assert_eq!(abi(), None, "Landlock is there, yet nothing was enforced");
        }
    }

    /// Confined beneath a directory: what is inside opens, is made,
    /// renamed and removed; what is beside it does not open, even a file
    /// anyone may read.
    #[test]
    fn a_confined_process_reaches_beneath_its_directory_only() {
        match std::env::var_os("COFFRE_CONFINE_CHILD") {
            None => {
                let tmp = tempfile::tempdir().unwrap();
                let (inside, beside) = (tmp.path().join("data"), tmp.path().join("beside"));
                std::fs::create_dir_all(inside.join("share")).unwrap();
                std::fs::write(inside.join("share/a"), "in").unwrap();
                std::fs::write(&beside, "out").unwrap();
                in_child(
                    "confine::tests::a_confined_process_reaches_beneath_its_directory_only",
                    tmp.path(),
                );
                assert!(tmp.path().join("data/share/c").exists(), "made inside");
            }
            Some(at) => {
                let at = Path::new(&at);
                let inside = at.join("data");
                let got = to_beneath(&[&inside]).unwrap();
                if got == Confined::Not {
                    println!("confined child ran: no Landlock here");
                    std::fs::write(inside.join("share/c"), "").unwrap();
                    return;
                }
                assert_eq!(
                    std::fs::read_to_string(inside.join("share/a")).unwrap(),
                    "in"
                );
                std::fs::write(inside.join("share/b"), "new").unwrap();
                std::fs::rename(inside.join("share/b"), inside.join("share/c")).unwrap();
                std::fs::create_dir(inside.join("share/d")).unwrap();
                std::fs::remove_dir(inside.join("share/d")).unwrap();
                let denied = |r: std::io::Result<String>| {
                    r.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
                };
                assert!(denied(std::fs::read_to_string(at.join("beside"))));
                assert!(denied(std::fs::read_to_string("/proc/self/status")));
                assert!(std::fs::write(at.join("made"), "x").is_err());
                // TCP (ABI 4 and later): no bind.
                if abi() >= Some(4) {
                    assert!(std::net::TcpListener::bind("127.0.0.1:0").is_err());
                }
                println!("confined child ran: {}", got.as_str());
            }
        }
    }

    /// The NFS server's case: confined beneath its VM's directory, which
    /// holds a mount point, it reaches what is mounted there after it
    /// confined itself (by path and by handle), and nothing beside, not
    /// even by handle (`CAP_DAC_READ_SEARCH` is no way out): not another
    /// VM's share mounted beside its own, nor, by path, the rest of the
    /// filesystem the share is a directory of.
    #[test]
    #[ignore = "system: needs root"]
    fn a_mount_made_after_the_confinement_is_reachable_beneath_its_parent() {
        use std::io::{BufRead, Write};
        let Some(at) = std::env::var_os("COFFRE_CONFINE_CHILD") else {
            coffre_testkit::require(&[coffre_testkit::Need::Root]);
            let tmp = tempfile::tempdir().unwrap();
            // src/shared is mounted at nfs/a/share, as the daemon mounts VM
            // a's share; src/b at nfs/b/share, VM b's; src/other is the
            // rest of the data.
            let (view, src) = (
                tmp.path().join("nfs/a/share"),
                tmp.path().join("src/shared"),
            );
            let (sibling, src_b) = (tmp.path().join("nfs/b/share"), tmp.path().join("src/b"));
            std::fs::create_dir_all(&view).unwrap();
            std::fs::create_dir_all(&src).unwrap();
            std::fs::create_dir_all(&src_b).unwrap();
            std::fs::write(src_b.join("g"), "b's").unwrap();
            std::fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
            std::fs::write(src.join("f"), "in").unwrap();
            std::fs::write(tmp.path().join("src/other"), "not shared").unwrap();
            std::fs::write(tmp.path().join("secret"), "out").unwrap();
            let run = |args: &[&std::ffi::OsStr]| {
                let st = std::process::Command::new(args[0])
                    .args(&args[1..])
                    .status()
                    .unwrap();
                assert!(st.success(), "{args:?}");
            };
            // As the daemon makes it: nfs, a tmpfs of its own holding the
            // share's mount point, read-only. And a bind of a directory of
            // this filesystem elsewhere, as a host may have.
            let nfs = tmp.path().join("nfs");
            run(&[
                "mount".as_ref(),
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                "mode=0700,size=64k".as_ref(),
                "tmpfs".as_ref(),
                nfs.as_os_str(),
            ]);
            std::fs::create_dir_all(&view).unwrap();
            std::fs::create_dir_all(&sibling).unwrap();
            run(&[
                "mount".as_ref(),
                "-o".as_ref(),
                "remount,ro".as_ref(),
                nfs.as_os_str(),
            ]);
            let elsewhere = tmp.path().join("elsewhere");
            run(&[
                "mount".as_ref(),
                "--bind".as_ref(),
                tmp.path().join("src").as_os_str(),
                elsewhere.as_os_str(),
            ]);
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "confine::tests::a_mount_made_after_the_confinement_is_reachable_beneath_its_parent",
                    "--include-ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("COFFRE_CONFINE_CHILD", tmp.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut said = String::new();
            while !said.contains("confined, mount now") {
                let mut line = String::new();
                if out.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                said.push_str(&line);
            }
            // Mounted by the parent: a confined process may not mount.
            let mounted = said.contains("confined, mount now");
            if mounted {
                for (from, to) in [(&src, &view), (&src_b, &sibling)] {
                    run(&[
                        "mount".as_ref(),
                        "--bind".as_ref(),
                        from.as_os_str(),
                        to.as_os_str(),
                    ]);
                }
            }
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(b"go\n");
            drop(stdin);
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
            let status = child.wait().unwrap();
            if mounted {
                run(&["umount".as_ref(), "-l".as_ref(), view.as_os_str()]);
                run(&["umount".as_ref(), "-l".as_ref(), sibling.as_os_str()]);
            }
            run(&["umount".as_ref(), "-l".as_ref(), nfs.as_os_str()]);
            run(&["umount".as_ref(), "-l".as_ref(), elsewhere.as_os_str()]);
            said.push_str(&rest);
            assert!(status.success(), "{said}");
            assert!(said.contains("confined child ran"), "{said}");
            if said.contains("no Landlock here") {
                assert_eq!(abi(), None, "Landlock is there, yet nothing was enforced");
            }
            return;
        };
        let at = Path::new(&at);
        let view = at.join("nfs/a/share");
        // Opened before, as the server holds its sockets and logs.
        let top = std::fs::File::open(at).unwrap();
        let of = |dir: &std::fs::File, name: &str| {
            crate::handle::FileHandle::of(std::os::fd::AsFd::as_fd(dir), Path::new(name)).unwrap()
        };
        let secret = of(&top, "secret");
        let other = of(&std::fs::File::open(at.join("src")).unwrap(), "other");
        let bs = of(&std::fs::File::open(at.join("src/b")).unwrap(), "g");
        let nfs = std::fs::File::open(at.join("nfs")).unwrap();
        let elsewhere = std::fs::File::open(at.join("elsewhere")).unwrap();
        let got = to_files_beneath(&[&at.join("nfs/a")]).unwrap();
        if got == Confined::Not {
            println!("confined child ran: no Landlock here");
            return;
        }
        println!("confined, mount now");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        assert_eq!(go.trim(), "go");
        // By path, and by handle on the new mount.
        assert_eq!(std::fs::read_to_string(view.join("f")).unwrap(), "in");
        let root = std::fs::File::open(&view).unwrap();
        let h =
            crate::handle::FileHandle::of(std::os::fd::AsFd::as_fd(&root), Path::new("f")).unwrap();
        h.open(std::os::fd::AsFd::as_fd(&root), libc::O_RDONLY)
            .expect("a handle beneath the directory opens");
        // Nothing beside: by path, nor by handle, nor through /proc.
        let denied = |r: std::io::Result<String>| {
            r.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        };
        assert!(denied(std::fs::read_to_string(at.join("secret"))));
        assert!(denied(std::fs::read_to_string("/proc/self/status")));
        // Not the other VM's share beside its own: by path, nor by handle
        // through that share's mount, which it cannot open (an O_PATH
        // descriptor, which Landlock lets anyone take, is no mount
        // descriptor for a handle).
        assert!(denied(std::fs::read_to_string(at.join("nfs/b/share/g"))));
        let e = std::fs::File::open(at.join("nfs/b/share"))
            .expect_err("the other VM's share's mount opened");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        let sibling = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(at.join("nfs/b/share"))
                .unwrap()
        };
        assert!(
            bs.open(std::os::fd::AsFd::as_fd(&sibling), libc::O_RDONLY)
                .is_err(),
            "the other VM's share opened by handle"
        );
        // A file server's rights only: FIFOs and sockets' names are made,
        // renamed and linked beneath (a guest's agent binds its socket in
        // a home), never a device (this child is root: Landlock alone
        // refuses it).
        #[allow(unsafe_code)]
        let mknod = |p: &Path, mode: libc::mode_t, dev: libc::dev_t| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path that outlives the call.
            if unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        for (name, kind) in [("fifo", libc::S_IFIFO), ("sock", libc::S_IFSOCK)] {
            let made = view.join(name);
            mknod(&made, kind | 0o600, 0).unwrap_or_else(|e| panic!("{name} not made: {e}"));
            let moved = view.join(format!("{name}-moved"));
            std::fs::rename(&made, &moved).unwrap();
            std::fs::hard_link(&moved, &made).unwrap();
            std::fs::remove_file(&made).unwrap();
            std::fs::remove_file(&moved).unwrap();
        }
        let dev = mknod(
            &view.join("null"),
            libc::S_IFCHR | 0o600,
            libc::makedev(1, 3),
        )
        .expect_err("a device made beneath");
        // SAFETY: geteuid has no failure and touches no memory.
        #[allow(unsafe_code)]
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            assert_eq!(dev.raw_os_error(), Some(libc::EACCES), "{dev}");
        }
        std::fs::write(view.join("made"), "ok").unwrap();
        std::fs::remove_file(view.join("made")).unwrap();
        let e = secret
            .open(std::os::fd::AsFd::as_fd(&top), libc::O_RDONLY)
            .expect_err("a handle to a file beside opened");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        // Nor, by path, the rest of the filesystem the share is a
        // directory of. (By handle it is another matter: a handle to it,
        // decoded through the share's mount, is a "disconnected" file,
        // which Landlock (since Linux 6.18) checks as if it were at the
        // mount's root: it opens. docs/security.md says so.)
        assert!(denied(std::fs::read_to_string(at.join("src/other"))));
        // The directory is a filesystem of its own: nothing of this one
        // is behind it, and a handle of this one does not decode there.
        assert!(
            secret
                .open(std::os::fd::AsFd::as_fd(&nfs), libc::O_RDONLY)
                .is_err()
        );
        // Through a bind of a directory of this filesystem elsewhere, a
        // file outside that directory is "disconnected": Landlock checks
        // it as at that mount's root, which is not beneath the rule.
        let e = secret
            .open(std::os::fd::AsFd::as_fd(&elsewhere), libc::O_RDONLY)
            .expect_err("a handle opened through a bind elsewhere");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        // Through the share's own mount it is beneath the rule: the rest
        // of the share's filesystem opens by handle (6.18 here; if this
        // fails, the kernel now refuses it: docs/security.md must say so).
        other
            .open(std::os::fd::AsFd::as_fd(&root), libc::O_RDONLY)
            .expect("this kernel's Landlock checks a disconnected file at its mount's root");
        println!("confined child ran: {}", got.as_str());
    }

    /// Confined to nothing: no file opens, what was open stays usable.
    #[test]
    fn a_process_confined_to_nothing_opens_no_file() {
        match std::env::var_os("COFFRE_CONFINE_CHILD") {
            None => {
                let tmp = tempfile::tempdir().unwrap();
                std::fs::write(tmp.path().join("f"), "x").unwrap();
                in_child(
                    "confine::tests::a_process_confined_to_nothing_opens_no_file",
                    tmp.path(),
                );
            }
            Some(at) => {
                let at = Path::new(&at);
                let mut open = std::fs::File::open(at.join("f")).unwrap();
                let got = to_beneath(&[]).unwrap();
                if got == Confined::Not {
                    println!("confined child ran: no Landlock here");
                    return;
                }
                assert!(std::fs::File::open(at.join("f")).is_err());
                assert!(std::fs::read_dir(at).is_err());
                let mut s = String::new();
                std::io::Read::read_to_string(&mut open, &mut s).unwrap();
                assert_eq!(s, "x");
                println!("confined child ran: {}", got.as_str());
            }
        }
    }
}

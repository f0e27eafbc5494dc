//! Acting as another user on the filesystem, on this thread only: the
//! file-system uid and gid (`setfsuid`, `setfsgid`) and the supplementary
//! groups (the raw `setgroups` system call: glibc's wrapper would change
//! every thread of the process). A FUSE server running as root uses it to
//! create, link, rename and remove names as the process that asked, so
//! the kernel checks that process's rights and sets ownership as it would
//! for that process, atomically, with no window where a root-owned object
//! exists under a name someone else can swap.
//!
//! The kernel drops the file-system capabilities (`CAP_DAC_READ_SEARCH`
//! and the like) from the effective set when the fsuid leaves 0, and
//! raises them again when it comes back. A process that is not root (the
//! NFS server, its own user with `CAP_DAC_READ_SEARCH` kept) never crosses 0,
//! so the switch lowers them itself on this thread, and raises them back
//! on drop: the caller's rights are the kernel's only check either way.
//!
//! Every switch, there and back, re-asserts `PR_SET_DUMPABLE` 0: the kernel
//! resets that flag (process-wide) to `fs.suid_dumpable` at each fsuid
//! change. Between the switch and the re-assertion (two system calls) the
//! flag is briefly what the sysctl says.

use std::io;
use std::marker::PhantomData;

/// The thread's file-system identity, restored on drop. Not `Send`: it
/// must be dropped on the thread that made it.
#[must_use = "the identity goes back when this is dropped"]
pub struct AsCaller {
    /// The thread's groups before, to go back to; `None`: they were the
    /// caller's already, and were not changed (a server whose groups are
    /// fixed for its life may not call `setgroups` at all).
    groups: Option<Vec<libc::gid_t>>,
    fsuid: u32,
    fsgid: u32,
    /// File-system capabilities this switch took out of the thread's
    /// effective set itself (a process that is not root), to put back.
    lowered: u64,
    _thread: PhantomData<*const ()>,
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the raw system call reads `groups.len()` gids from a valid
    // slice; it changes only the calling thread's credentials.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the thread's fsuid and fsgid; returns the previous ones.
fn set_fs(uid: u32, gid: u32) -> io::Result<(u32, u32)> {
    // SAFETY: setfsgid/setfsuid take plain integers and act on this thread.
    // They report nothing on failure, so each is called twice: the second
    // call returns the value now in force.
    unsafe {
        let old_g = libc::setfsgid(gid);
        let old_u = libc::setfsuid(uid);
        let (g, u) = (libc::setfsgid(gid), libc::setfsuid(uid));
        // uid_t and gid_t come back as C ints: 2^31 and above read
        // negative.
        if g.cast_unsigned() != gid || u.cast_unsigned() != uid {
            // The identity may have moved anyway: the dumpable flag too.
            let _ = crate::forbid_dumps();
            return Err(io::Error::other("setfsuid/setfsgid did not take"));
        }
        // Any change of fsuid or fsgid makes the kernel reset the whole
        // process's dumpable flag to `fs.suid_dumpable` (commit_creds): with
        // 1 or 2 there, a core dump of the daemon, or ptrace and
        // /proc/PID/mem for root's other processes, would work again. This
        // process holds keys; it stays undumpable, whatever it was before.
        crate::forbid_dumps()?;
        Ok((old_u.cast_unsigned(), old_g.cast_unsigned()))
    }
}

/// The calling thread's effective capabilities (low 64 bits).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// The calling thread's capability sets.
fn thread_caps() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header fills two CapData structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

/// Sets the calling thread's effective set to `effective` (within its
/// permitted set), the rest unchanged.
fn set_effective(effective: u64) -> io::Result<()> {
    let mut data = thread_caps()?;
    data[0].effective = u32::try_from(effective & 0xffff_ffff).unwrap_or(0);
    data[1].effective = u32::try_from(effective >> 32).unwrap_or(0);
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: capset with a v3 header reads two CapData structs; pid 0
    // is the calling thread alone.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn effective_caps() -> io::Result<u64> {
    let data = thread_caps()?;
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// The capabilities that would let the thread skip the caller's checks:
/// CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID.
const FS_CAPS: u64 = 0b1_1111;

impl AsCaller {
    /// From now on this thread's file operations are checked and owned as
    /// `uid`, `gid` with `groups`. Fails (and changes nothing) if the
    /// kernel would still let the thread bypass those checks.
    pub fn new(uid: u32, gid: u32, groups: &[u32]) -> io::Result<Self> {
        // SAFETY: with a zero size getgroups only returns the count.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut saved = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(0)];
        // SAFETY: getgroups writes at most `saved.len()` gids into the
        // buffer and returns how many.
        let n = unsafe {
            libc::getgroups(
                libc::c_int::try_from(saved.len()).unwrap_or(0),
                saved.as_mut_ptr(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        saved.truncate(usize::try_from(n).unwrap_or(0));
        // What to go back to, even if the switch fails half-way: an
        // invalid id changes nothing and answers the current one.
        // SAFETY: plain integers.
        let (fsuid, fsgid) = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
        // Compared as sets: the kernel sorts a thread's groups (it keeps
        // repeats).
        let mut wanted: Vec<libc::gid_t> = groups.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut now = saved.clone();
        now.sort_unstable();
        now.dedup();
        let same = now == wanted;
        let mut guard = Self {
            groups: None,
            fsuid: fsuid.cast_unsigned(),
            fsgid: fsgid.cast_unsigned(),
            lowered: 0,
            _thread: PhantomData,
        };
        if !same {
            // A refused change changes nothing: only a change made is to
            // be undone (a server whose filter refuses it fails the call,
            // and serves on).
            set_groups(groups)?;
            guard.groups = Some(saved);
        }
        let (fsuid, fsgid) = set_fs(uid, gid)?;
        (guard.fsuid, guard.fsgid) = (fsuid, fsgid);
        // From a fsuid other than 0 the kernel left them: lower them here.
        let held = effective_caps()? & FS_CAPS;
        if uid != 0 && fsuid != 0 && held != 0 {
            set_effective(effective_caps()? & !held)?;
            guard.lowered = held;
        }
        // Leaving fsuid 0 drops those capabilities from the effective set,
        // unless securebits say otherwise: then acting "as the caller"
        // would check nothing.
        if uid != 0 && effective_caps()? & FS_CAPS != 0 {
            return Err(io::Error::other(
                "file-system capabilities stay in force after setfsuid; refusing to act as the caller",
            ));
        }
        Ok(guard)
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        // Back to what it was; if that failed the thread would serve the
        // next request with someone else's identity: that must not happen.
        if set_fs(self.fsuid, self.fsgid).is_err()
            || self.groups.as_ref().is_some_and(|g| set_groups(g).is_err())
        {
            std::process::abort();
        }
        if self.lowered != 0 {
            let back = effective_caps().and_then(|e| set_effective(e | self.lowered));
            if back.is_err() {
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root: a thread acting as uid 5001 cannot read a root-only file,
    /// and is root again afterwards; other threads never change.
    #[test]
    #[ignore = "system: needs root"]
    fn acts_as_the_caller_on_this_thread_only() {
        coffre_testkit::require(&[coffre_testkit::Need::Root]);
        let dir = std::env::temp_dir().join(format!("coffre-caller-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        // A thread that exists before the switch (a new one would inherit
        // the creator's credentials).
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tell, told) = std::sync::mpsc::channel();
        let other = std::thread::spawn({
            let s = secret.clone();
            move || {
                asked.recv().unwrap();
                tell.send(std::fs::read(s).is_ok()).unwrap();
            }
        });
        {
            let _me = AsCaller::new(5001, 5001, &[5001]).unwrap();
            assert!(std::fs::read(&secret).is_err());
            ask.send(()).unwrap();
            assert!(told.recv().unwrap(), "another thread stays root");
        }
        other.join().unwrap();
        assert!(std::fs::read(&secret).is_ok(), "root again");
        assert!(!crate::is_dumpable(), "undumpable after the switch back");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// As the NFS server is: not root, with CAP_DAC_READ_SEARCH kept.
    /// Acting as uid 5001 takes the capability away on this thread (a
    /// root-only file does not open), and gives it back after (it opens
    /// again).
    #[test]
    #[ignore = "system: needs root"]
    fn a_process_that_is_not_root_acts_as_the_caller_without_its_capabilities() {
        let Some(secret) = std::env::var_os("COFFRE_CALLER_CHILD") else {
            coffre_testkit::require(&[coffre_testkit::Need::Root]);
            let dir = std::env::temp_dir().join(format!("coffre-caller-nr-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let secret = dir.join("secret");
            std::fs::write(&secret, b"x").unwrap();
            std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "caller::tests::a_process_that_is_not_root_acts_as_the_caller_without_its_capabilities",
                    "--include-ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("COFFRE_CALLER_CHILD", &secret)
                .output()
                .unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(said.contains("not-root child ran"), "{said}");
            return;
        };
        const DAC_READ_SEARCH: u32 = 1 << 2;
        const SETUID_SETGID: u32 = (1 << 6) | (1 << 7);
        let keep = DAC_READ_SEARCH | SETUID_SETGID;
        // SAFETY: prctl and set*id with plain integers.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), 0);
            assert_eq!(libc::setresgid(65534, 65534, 65534), 0);
            assert_eq!(libc::setresuid(65534, 65534, 65534), 0);
        }
        let data = [
            CapData {
                effective: keep,
                permitted: keep,
                inheritable: 0,
            },
            CapData::default(),
        ];
        let mut header = CapHeader {
            version: CAP_V3,
            pid: 0,
        };
        // SAFETY: capset v3 with two CapData structs.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        assert!(
            std::fs::read(&secret).is_ok(),
            "CAP_DAC_READ_SEARCH reads it"
        );
        {
            let _as = AsCaller::new(5001, 5001, &[5001]).unwrap();
            assert_eq!(effective_caps().unwrap() & FS_CAPS, 0);
            assert!(std::fs::read(&secret).is_err(), "uid 5001 read root's file");
        }
        assert_eq!(effective_caps().unwrap(), u64::from(keep));
        assert!(std::fs::read(&secret).is_ok(), "the capability is back");
        println!("not-root child ran");
    }
}

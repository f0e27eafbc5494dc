//! Acting as another user on the filesystem, on this thread only: the
//! file-system uid and gid (`setfsuid`, `setfsgid`) and the supplementary
//! groups (the raw `setgroups` system call: glibc's wrapper would change
//! every thread of the process). A FUSE server running as root uses it to
//! create, link, rename and remove names as the process that asked, so
//! the kernel checks that process's rights and sets ownership as it would
//! for that process, atomically, with no window where a root-owned object
//! exists under a name someone else can swap.

use std::io;

/// The thread's file-system identity, restored on drop.
#[must_use = "the identity goes back to root when this is dropped"]
pub struct AsCaller {
    groups: Vec<libc::gid_t>,
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

fn set_fs(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setfsgid/setfsuid take plain integers and act on this thread.
    // They report nothing on failure, so each is called twice: the second
    // call returns the value now in force.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
        let (g, u) = (libc::setfsgid(gid), libc::setfsuid(uid));
        if u32::try_from(g).ok() != Some(gid) || u32::try_from(u).ok() != Some(uid) {
            return Err(io::Error::other("setfsuid/setfsgid did not take"));
        }
    }
    Ok(())
}

impl AsCaller {
    /// From now on this thread's file operations are checked and owned as
    /// `uid`, `gid` with `groups`.
    pub fn new(uid: u32, gid: u32, groups: &[u32]) -> io::Result<Self> {
        let mut saved = vec![0 as libc::gid_t; 256];
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
        let guard = Self { groups: saved };
        set_groups(groups)?;
        set_fs(uid, gid)?;
        Ok(guard)
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        // Back to root; if that failed the thread would be unusable for
        // the server, and that must not go unnoticed.
        if set_fs(0, 0).is_err() || set_groups(&self.groups).is_err() {
            std::process::abort();
        }
    }
}

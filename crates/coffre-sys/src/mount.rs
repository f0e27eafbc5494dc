//! What `rustix` does not wrap of the new mount API: setting a detached
//! mount's flags (`mount_setattr`) before it is attached, so that it is
//! never visible without them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Makes the mount `tree` (a descriptor from `open_tree` or `fsmount`)
/// `nosuid`, `nodev`, `noexec` and private (nothing mounted on it
/// propagates elsewhere), and, when `read_only`, read-only.
pub fn restrict(tree: BorrowedFd<'_>, read_only: bool) -> io::Result<()> {
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    set_attr(tree, set)
}

/// Makes the attached mount `mount` private: what is mounted on it later
/// propagates to no other mount namespace, whatever its parent's
/// propagation made it when it was attached.
pub fn make_private(mount: BorrowedFd<'_>) -> io::Result<()> {
    set_attr(mount, 0)
}

/// `mount_setattr` on `mount` itself: the flags `set`, and private.
fn set_attr(mount: BorrowedFd<'_>, set: u64) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: `attr` is a valid mount_attr of the size given; the path is
    // an empty C string with AT_EMPTY_PATH, so the call acts on `mount`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &raw const attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

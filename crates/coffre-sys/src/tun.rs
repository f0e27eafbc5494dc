//! Tap devices for VMs: the daemon opens the tap in the host's network
//! namespace and hands QEMU the descriptor, so QEMU needs no network
//! privilege and can run in an empty namespace of its own.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// linux/if_tun.h: _IOW('T', 202, int) and _IOW('T', 203, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the
/// rest of the union is unused here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens tap `name` (creating it if missing, persistent so that it and
/// its addresses outlive the QEMU that uses it, owned by root), with
/// virtio-net headers.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a link name has 1 to 15 bytes",
        ));
    }
    let path = c"/dev/net/tun";
    open_tun(path, name)
}

fn open_tun(path: &CStr, name: &str) -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated path and plain flags.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays
    // out (40 bytes), on a descriptor of /dev/net/tun.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Root's, every time it is opened: a persistent tap with no owner can
    // be attached by any user while its VM is down (and a QEMU holding
    // its descriptor could have made itself the owner).
    for (req, arg) in [(TUNSETOWNER, 0u64), (TUNSETGROUP, 0), (TUNSETPERSIST, 1)] {
        // SAFETY: these ioctls take an integer argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel() {
        assert!(super::open_tap("").is_err());
        assert!(super::open_tap("a-name-too-long-for-linux").is_err());
    }
}

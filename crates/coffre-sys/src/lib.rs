//! The single home of `unsafe` in coffre, and of the small helpers every
//! crate needs from the OS.
//!
//! Everything unsafe here is a thin, safe wrapper over one system call or
//! one C function; every `unsafe` block carries a `// SAFETY:` comment
//! saying why its preconditions hold. The rest of the workspace denies
//! unsafe code. The safe helpers have one home each: [`fs::write_atomic`]
//! (crash-safe file writes), [`time::now_ms`] (the wall clock) and
//! [`proc`] (the parsers of `/proc` files), [`shown::url`] (a URL in
//! an error, without its login), [`shown::told`] (what a less trusted
//! process said, as it may be shown) and [`helper`] (the daemon's
//! reading of its helpers' answers).
#![allow(unsafe_code)]
#![warn(missing_docs)]

pub mod alloc;
pub mod aws_lc;
pub mod caller;
pub mod child;
pub mod confine;
pub mod fs;
pub mod handle;
pub mod helper;
pub mod lines;
pub mod locked;
pub mod mount;
pub mod pipe;
pub mod proc;
pub mod seccomp;
pub mod shown;
pub mod stack;
pub mod time;
pub mod tun;
pub mod xts;

use std::io;

/// Locks `len` bytes at `ptr` into RAM so they are never written to swap.
///
/// Best effort: a process without `CAP_IPC_LOCK` and a small
/// `RLIMIT_MEMLOCK` gets an error, which callers may ignore (the memory is
/// still wiped on drop).
pub fn mlock(buf: &[u8]) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    // SAFETY: mlock only reads the address range; the slice guarantees the
    // range is valid for `buf.len()` bytes for the duration of the call.
    let rc = unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Undoes [`mlock`] for the same range: every page it touches, including
/// parts other buffers use. Secrets should use [`locked::lock_shared`] and
/// [`locked::unlock_shared`], which count users per page.
pub fn munlock(buf: &[u8]) {
    if buf.is_empty() {
        return;
    }
    // SAFETY: as for mlock; munlock on a range that was never locked is
    // harmless (it returns an error we deliberately ignore).
    let _ = unsafe { libc::munlock(buf.as_ptr().cast(), buf.len()) };
}

/// The size of a memory page.
pub fn page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf takes a plain integer and reads no memory.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// `mlock` on whole pages by address, for [`locked`].
fn mlock_raw(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock does not access the memory; it only changes the
    // residency of the pages in the range, which `locked` computes from
    // live buffers (the pages are mapped while those buffers are alive).
    let rc = unsafe { libc::mlock(addr as *const libc::c_void, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `munlock` on whole pages by address, for [`locked`].
fn munlock_raw(addr: usize, len: usize) {
    // SAFETY: as for mlock_raw; an error (a range never locked) is harmless
    // and ignored.
    let _ = unsafe { libc::munlock(addr as *const libc::c_void, len) };
}

/// Stops this process from ever writing a core dump, and makes its memory
/// unreadable to other unprivileged processes (`PR_SET_DUMPABLE` 0 also
/// guards `/proc/PID/mem` and ptrace from same-uid processes).
///
/// Called first thing by every binary that handles key material.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(io::Error::last_os_error());
    }
    forbid_dumps()
}

/// What a helper that parses guests' bytes may use, each a hard limit
/// (`setrlimit`, soft and hard alike: an unprivileged process can lower
/// its limits, never raise them again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Processes and threads of its user (`RLIMIT_NPROC`: counted per
    /// user, so each helper has a user of its own).
    pub processes: u64,
    /// Its writable private memory: heap, thread stacks, anonymous
    /// mappings (`RLIMIT_DATA`).
    pub data_bytes: u64,
    /// Open descriptors (`RLIMIT_NOFILE`).
    pub open_files: u64,
}

/// Sets `l` on this process, soft and hard, before it drops to its user:
/// inherited by what it forks, never raised again without
/// `CAP_SYS_RESOURCE`.
pub fn limit(l: &Limits) -> io::Result<()> {
    for (resource, v) in [
        (libc::RLIMIT_NPROC, l.processes),
        (libc::RLIMIT_DATA, l.data_bytes),
        (libc::RLIMIT_NOFILE, l.open_files),
    ] {
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit reads a valid, initialised rlimit struct.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets `PR_SET_DUMPABLE` 0 again: after any change of the process's
/// (or a thread's file-system) identity the kernel resets the flag to
/// `fs.suid_dumpable`.
pub fn forbid_dumps() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes a plain integer argument; no pointers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves this process into a mount namespace of its own, where nothing it
/// mounts propagates back to the host. Call it before any thread exists
/// (the kernel refuses otherwise). `coffre init` formats the team's file
/// system through a FUSE mount made there: no other process that makes a
/// namespace of its own at that moment (a workload, a guest's QEMU) can
/// take a copy of it that would outlive the unmount.
pub fn private_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare takes a flag word.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a NUL-terminated path, null type and data as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    detach_other_vaults();
    Ok(())
}

/// In a private mount namespace: detaches the copies of other vaults'
/// data it was born with (our FUSE mounts, named `coffre` and
/// `coffre-view`, and the file systems on loop devices backed by them). Holding them would keep
/// those vaults' data busy at their close, which kills the holder. Only
/// this namespace changes; failures are ignored.
fn detach_other_vaults() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // (mount point, file system type, source)
    let mounts: Vec<(String, String, String)> = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let (fstype, source) = (r.next()?, r.next()?);
            Some((unescape(point), fstype.to_string(), unescape(source)))
        })
        .collect();
    // Our FUSE mounts: named `coffre` (volume files) or `coffre-view`
    // (the workloads' views).
    let ours = |fstype: &str, source: &str| {
        (fstype == "fuse" || fstype.starts_with("fuse."))
            && matches!(source, "coffre" | "coffre-view")
    };
    let fuse: Vec<&String> = mounts
        .iter()
        .filter(|(_, t, src)| ours(t, src))
        .map(|(p, _, _)| p)
        .collect();
    if fuse.is_empty() {
        return;
    }
    let on_fuse = |path: &str| {
        fuse.iter()
            .any(|f| path == f.as_str() || path.starts_with(&format!("{f}/")))
    };
    let mut doomed: Vec<&String> = mounts
        .iter()
        .filter(|(point, fstype, source)| {
            if ours(fstype, source) {
                return true;
            }
            // A loop device whose file is on a coffre FUSE mount.
            let Some(dev) = source.strip_prefix("/dev/") else {
                return false;
            };
            dev.starts_with("loop")
                && std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
                    .is_ok_and(|b| on_fuse(b.trim()))
                && !point.is_empty()
        })
        .map(|(p, _, _)| p)
        .collect();
    // Deepest first.
    doomed.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in doomed {
        if let Ok(c) = std::ffi::CString::new(p.as_str()) {
            // SAFETY: a NUL-terminated path and a flag word.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// A mountinfo field with its `\ooo` escapes decoded.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether this process is dumpable (`PR_GET_DUMPABLE` is not 0).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// Blocks from this size up are mapped on their own by glibc and
/// unmapped when freed ([`return_large_allocations`]).
pub const MAP_FROM: usize = 4 << 20;

/// How much free memory glibc keeps at the top of a heap before it hands
/// it back to the kernel ([`return_large_allocations`]).
pub const KEEP_FREE: usize = 4 << 20;

/// Makes glibc serve every allocation of [`MAP_FROM`] (4 MiB) or more with
/// its own mapping, returned to the kernel on free, and keep up to
/// [`KEEP_FREE`] (4 MiB) of freed memory at the top of each heap for the
/// next smaller blocks.
///
/// Large blocks: glibc otherwise raises its mmap threshold after the first
/// large free, and each thread's arena then keeps freed KDF buffers
/// (argon2 needs tens to hundreds of MiB per derivation) resident: memory
/// would grow with the number of threads that ever derived a key, not with
/// the derivations running now, and the daemon's KDF memory cap would mean
/// nothing. Fixing the threshold also turns off that dynamic adjustment.
/// An argon2 keyslot of less than 4 MiB (the format allows 32 KiB; ours
/// use 64 MiB and more) has its buffer kept in an arena like any smaller
/// block.
///
/// Smaller blocks: the remote store's 1 MiB chunks are allocated and freed
/// at the rate of the data. With the threshold at 1 MiB (until 2026-12-04)
/// each was a mapping of its own: 256 page faults, a kernel zeroing and an
/// unmapping per chunk, besides our own wipe at free. Measured with
/// `scripts/bench-nbd`'s survey (3 rounds each, the same build, glibc's
/// tunables set to the old and the new values): reads from an NBD store
/// 1031-1399 MiB/s against 700-815, writes 513-718 against 257-322. The
/// trim threshold keeps heap tops from going back to the kernel (and
/// faulting in again) at each free (glibc's default once the threshold
/// is fixed is 128 KiB); 4 MiB did as well as 32 (reads 1165-1534 against
/// 1151-1173 MiB/s, 2 x 3 rounds). Each arena (glibc makes up to eight per core)
/// may keep that much. Nothing secret stays in what is kept: every freed
/// block is wiped whole (`alloc::WipeOnFree`; only blocks mapped on
/// their own are wiped sparsely).
pub fn return_large_allocations() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let (map, keep) = (
            libc::c_int::try_from(MAP_FROM).unwrap_or(libc::c_int::MAX),
            libc::c_int::try_from(KEEP_FREE).unwrap_or(libc::c_int::MAX),
        );
        // SAFETY: mallopt only changes allocator tunables; both take a
        // plain integer.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, map) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, keep) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The signals a daemon stops on, for [`die_of`].
pub use libc::{SIGINT, SIGTERM};

/// Ends the process as the default action of signal `sig` would, its
/// handler reset first: the parent sees it killed by that signal (which a
/// service manager takes as a clean stop for SIGTERM and SIGINT), not an
/// exit status. Falls back to exiting with 128 + `sig`.
pub fn die_of(sig: i32) -> ! {
    // SAFETY: signal(2) with SIG_DFL and raise(3) take no pointers; resetting
    // a disposition cannot break Rust's invariants.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    std::process::exit(128 + sig)
}

/// Raises the soft limit on open files to the hard one (a daemon serving
/// FUSE, NBD and TLS clients needs more than the usual 1024). Best effort.
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own; setrlimit
    // reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Whether core dumps are disabled for this process (`RLIMIT_CORE` is 0 and
/// the process is not dumpable).
pub fn core_dumps_disabled() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 1,
        rlim_max: 1,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    rc == 0 && lim.rlim_cur == 0 && dumpable == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/bad\\9"), "/bad\\9");
    }

    #[test]
    fn mlock_roundtrip_does_not_crash() {
        let buf = vec![7u8; 4096];
        // May fail without CAP_IPC_LOCK; must never crash.
        let _ = mlock(&buf);
        munlock(&buf);
        mlock(&[]).unwrap();
    }
}

//! Wiping the stack that finished calls left behind.
//!
//! A cipher kernel keeps its round keys and the blocks in flight in vector
//! registers, and the compiler spills some of them to the stack (1.3 KiB
//! of the XTS kernel's frame in a release build, all of it at opt-level 0).
//! A returning function does not clear its frame: the bytes stay below the
//! caller's stack pointer until a later call overwrites them, and a thread
//! that exits leaves its stack to glibc's cache of stacks, unread and
//! unwiped. Seen in the vault test
//! `scan::plaintext_not_in_daemon_memory_after_close`: about a hundred
//! bytes of a member's file in a dead FUSE worker's stack after the close.
//!
//! [`scrub`] called right after such work, from the frame that started it,
//! overwrites what the finished calls left below that frame.

/// How much of the stack [`scrub`] clears after a cipher call: in an
/// optimised build the VAES kernel's frame (1.3 KiB) and the RustCrypto
/// path's (its 4 KiB of tweaks, then the block cipher's calls) with room
/// to spare; the whole of an unoptimised call tree (every intrinsic a call
/// with its own frame). About half a microsecond per call at 16 KiB.
pub const AFTER_CIPHER: usize = if cfg!(debug_assertions) {
    64 << 10
} else {
    16 << 10
};

/// Overwrites the `N` bytes of stack just below the caller's frame with
/// zeros, in a way the compiler may not drop as dead stores.
#[inline(never)]
pub fn scrub<const N: usize>() {
    let mut area = [0u8; N];
    zeroize::Zeroize::zeroize(&mut area[..]);
    std::hint::black_box(&area);
}

/// Reads `len` bytes of this process's memory at `addr` through
/// `/proc/self/mem` (`file` open on it): the kernel copies them, so
/// reading a stack area no live Rust value owns is defined behaviour.
/// For tests of what a call left on the stack.
#[doc(hidden)]
pub fn peek(file: &std::fs::File, addr: usize, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, addr as u64)?;
    Ok(out)
}

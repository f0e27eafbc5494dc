//! Chunk buffers kept for the next chunk.
//!
//! The remote device takes and lets go of a chunk-sized buffer (1 MiB by
//! default) per chunk read or written: the NBD client receives each read
//! into a new one, and the device's buffer drops the oldest clean chunk
//! for each new one. Freed to the allocator, such a block goes back to the
//! kernel as soon as the free space at the top of its heap passes glibc's
//! trim threshold (`coffre_sys::KEEP_FREE`, 4 MiB, kept small for the
//! daemon's sake), and the next one is faulted in again page by page, each
//! page zeroed by the kernel: on NBD reads, `perf` showed the kernel's
//! page clearing as the largest single cost of the client's threads.
//!
//! So the device hands the chunks it drops to this pool ([`give`]), and the
//! NBD client's reads and the device's new chunks take from it ([`take`]).
//! It keeps at most [`KEEP_BYTES`] in all; what does not fit is freed.
//!
//! What a kept buffer still holds is a chunk of the volume as the stores
//! hold it: only the remote device gives buffers back (the functions that
//! give and take are the crate's own), and the device sits below the
//! volume's encryption: its chunks are the data segment's ciphertext (the
//! LUKS2 header is detached, in the control directory). A kept buffer is
//! never read before it is written (a taken one is empty: its length is
//! zero). [`clear`] frees them all (the device does when it is dropped),
//! each wiped by the daemon's allocator as any freed block.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The most the pool keeps, in bytes (32 chunks of 1 MiB: a read-ahead
/// window's worth and as many again).
pub const KEEP_BYTES: usize = 32 << 20;

/// Buffers smaller than this are not kept (cheap to allocate, and kept in
/// glibc's heap anyway).
pub const SMALLEST: usize = 64 << 10;

/// A pool of buffers; the process has one ([`take`], [`give`]...).
#[derive(Debug)]
pub(crate) struct Pool {
    bufs: Mutex<Vec<Vec<u8>>>,
    keep: usize,
    reused: AtomicU64,
    fresh: AtomicU64,
}

static POOL: Pool = Pool::new(KEEP_BYTES);

impl Pool {
    /// An empty pool that keeps at most `keep` bytes.
    pub(crate) const fn new(keep: usize) -> Self {
        Self {
            bufs: Mutex::new(Vec::new()),
            keep,
            reused: AtomicU64::new(0),
            fresh: AtomicU64::new(0),
        }
    }

    fn bufs(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.bufs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty buffer with room for `len` bytes: the last kept one that
    /// fits (at most twice as large; the last, the likeliest still in the
    /// CPU's caches), or a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= SMALLEST {
            let mut p = self.bufs();
            if let Some(i) = p
                .iter()
                .rposition(|v| v.capacity() >= len && v.capacity() / 2 <= len)
            {
                self.reused.fetch_add(1, Relaxed);
                return p.remove(i);
            }
            self.fresh.fetch_add(1, Relaxed);
        }
        Vec::with_capacity(len)
    }

    /// Keeps `v` for a later [`take`](Self::take) if it is chunk-sized
    /// and no larger than the pool; to make room, the buffers kept longest
    /// are freed (so that what is kept follows the sizes in use now).
    pub(crate) fn give(&self, mut v: Vec<u8>) {
        if v.capacity() < SMALLEST || v.capacity() > self.keep {
            return;
        }
        v.clear();
        let mut p = self.bufs();
        let mut kept: usize = p.iter().map(Vec::capacity).sum();
        let mut freed = Vec::new();
        while kept + v.capacity() > self.keep && !p.is_empty() {
            let old = p.remove(0);
            kept -= old.capacity();
            freed.push(old);
        }
        p.push(v);
        drop(p);
        // Freed (and wiped) outside the lock.
        drop(freed);
    }

    /// Frees every kept buffer.
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut *self.bufs());
        drop(all);
    }

    /// How many buffers and bytes are kept now.
    pub(crate) fn kept(&self) -> (usize, usize) {
        let p = self.bufs();
        (p.len(), p.iter().map(Vec::capacity).sum())
    }

    /// How many chunk-sized takes so far were served by a kept buffer, and
    /// how many by a new one.
    pub(crate) fn takes(&self) -> (u64, u64) {
        (self.reused.load(Relaxed), self.fresh.load(Relaxed))
    }
}

/// [`Pool::take`] from the process's pool.
pub(crate) fn take(len: usize) -> Vec<u8> {
    POOL.take(len)
}

/// A copy of `data` in a buffer from [`take`].
pub(crate) fn copy_of(data: &[u8]) -> Vec<u8> {
    let mut v = take(data.len());
    v.extend_from_slice(data);
    v
}

/// `len` zeroes in a buffer from [`take`].
pub(crate) fn zeroed(len: usize) -> Vec<u8> {
    let mut v = take(len);
    v.resize(len, 0);
    v
}

/// [`Pool::give`] to the process's pool.
pub(crate) fn give(v: Vec<u8>) {
    POOL.give(v)
}

/// Frees every buffer the process's pool keeps.
pub(crate) fn clear() {
    POOL.clear()
}

/// How many buffers and bytes the process's pool keeps now.
pub fn kept() -> (usize, usize) {
    POOL.kept()
}

/// [`Pool::takes`] of the process's pool.
pub fn takes() -> (u64, u64) {
    POOL.takes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_fit_and_bounded() {
        let mib = 1 << 20;
        let pool = Pool::new(KEEP_BYTES);
        // Taken, filled, given back: the next take of that size is the same
        // block, empty.
        let mut a = pool.take(mib + 4096);
        a.extend_from_slice(&vec![7u8; mib + 4096]);
        let at = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.kept(), (1, mib + 4096));
        let b = pool.take(mib);
        assert_eq!(b.as_ptr(), at, "the kept block");
        assert_eq!(pool.takes(), (1, 1));
        assert!(b.is_empty() && b.capacity() >= mib);
        assert_eq!(pool.kept(), (0, 0));
        // Too small to be kept.
        pool.give(vec![1u8; SMALLEST - 1]);
        assert_eq!(pool.kept(), (0, 0));
        // Not handed out for a size it is more than twice of.
        pool.give(b);
        assert_eq!(pool.take(mib / 4).capacity(), mib / 4);
        assert_eq!(pool.kept().0, 1);
        // At most its bytes in all; the newest kept, the oldest freed.
        let mut newest = Vec::new();
        for _ in 0..(KEEP_BYTES / mib) + 8 {
            let v = Vec::with_capacity(mib);
            newest.push(v.as_ptr());
            pool.give(v);
        }
        let (n, bytes) = pool.kept();
        assert!(
            bytes <= KEEP_BYTES && n >= KEEP_BYTES / mib - 2,
            "{n} {bytes}"
        );
        let last = pool.take(mib);
        assert_eq!(Some(&last.as_ptr()), newest.last(), "the newest is kept");
        // Larger than the whole pool: not kept.
        pool.clear();
        pool.give(Vec::with_capacity(KEEP_BYTES + 1));
        assert_eq!(pool.kept(), (0, 0));
        pool.clear();
        assert_eq!(pool.kept(), (0, 0));
    }

    /// Zeroed and copied buffers are what they say, whatever a kept block
    /// held before (the process's pool: other tests may take from it).
    #[test]
    fn what_is_taken_holds_what_was_asked() {
        let mib = 1 << 20;
        give(vec![9u8; mib]);
        let z = zeroed(mib);
        assert!(z.len() == mib && z.iter().all(|&x| x == 0));
        give(z);
        let c = copy_of(&vec![3u8; mib]);
        assert!(c.len() == mib && c.iter().all(|&x| x == 3));
        give(c);
        assert!(take(mib).is_empty());
    }
}

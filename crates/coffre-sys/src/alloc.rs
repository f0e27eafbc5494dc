//! A global allocator that wipes every block as it is freed.
//!
//! Passwords cross buffers we do not own: rustls keeps the decrypted
//! records, hyper its connection read buffer, serde its scratch space.
//! None of them wipes on drop, and a freed block keeps its bytes until the
//! allocator hands it out again and someone overwrites it. Measured on the
//! daemon (the vault test `scan::password_not_in_daemon_memory_after_leave`),
//! a whole HTTP request, password included, stayed in a freed block after
//! the member had left. Wiping at `dealloc` clears every freed block,
//! whoever allocated it; what live buffers hold (an open connection's) is
//! untouched.
//!
//! The cost is one `memset` per freed byte. Reallocation goes through
//! allocate, copy, free, so the old block is wiped too (glibc's in-place
//! growth is given up).

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, wiping each block before it goes back.
pub struct WipeOnFree;

/// Zeroes `len` bytes at `ptr` in a way the compiler may not drop as a
/// dead store before a free.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the caller guarantees `len` writable bytes at `ptr`;
    // explicit_bzero is memset that the compiler may not remove.
    unsafe {
        libc::explicit_bzero(ptr.cast(), len);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        // SAFETY: as above; the fence keeps the stores before the free.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Blocks of at least this size are wiped page by page, and only the
/// pages that are in memory.
const SPARSE_FROM: usize = 1 << 20;

/// Wipes a large block's pages that are in RAM, skipping those never
/// touched (or swapped out): a 16 MiB buffer of which a request used one
/// page (the FUSE library allocates such buffers) costs one page, not 16
/// MiB of page faults and zeroing (10 ms at each open of the vault, seen
/// in its audit log). A page that was never touched never held anything.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe_resident(ptr: *mut u8, len: usize) {
    let page = crate::page_size();
    let start = ptr as usize;
    // Offsets in the block of its first and last whole page.
    let first = start.next_multiple_of(page) - start;
    let last = (start + len) / page * page - start;
    if first >= last {
        // SAFETY: within the block.
        unsafe { wipe(ptr, len) };
        return;
    }
    // SAFETY (the three wipes below and the mincore): every range is
    // within the block; mincore only reads the page tables of the whole
    // pages from `first` to `last`, which belong to the block.
    unsafe {
        wipe(ptr, first);
        wipe(ptr.add(last), len - last);
    }
    let mut resident = [0u8; 512];
    let mut at = first;
    while at < last {
        let n = ((last - at) / page).min(resident.len());
        // SAFETY: n whole pages of the block from `at`, and a result
        // array of at least n bytes.
        let rc = unsafe { libc::mincore(ptr.add(at).cast(), n * page, resident.as_mut_ptr()) };
        if rc != 0 {
            // Cannot tell: wipe the rest whole.
            // SAFETY: from `at` to `last`, inside the block.
            unsafe { wipe(ptr.add(at), last - at) };
            return;
        }
        let mut i = 0;
        while i < n {
            if resident[i] & 1 == 0 {
                i += 1;
                continue;
            }
            let run = resident[i..n].iter().take_while(|r| *r & 1 != 0).count();
            // SAFETY: pages i..i+run of this window, inside the block.
            unsafe { wipe(ptr.add(at + i * page), run * page) };
            i += run;
        }
        at += n * page;
    }
}

// SAFETY: every method delegates to `System` with the same arguments, so
// System's guarantees (alignment, size, validity) hold. `dealloc` first
// writes zeros over the block, which the GlobalAlloc contract says was
// allocated by us with this `layout` and is no longer used by anyone.
// `realloc` is the trait's default (alloc, copy, dealloc), so it is built
// from these three.
unsafe impl GlobalAlloc for WipeOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees on `layout` are System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes that we
        // allocated; the caller no longer uses it.
        unsafe {
            if layout.size() >= SPARSE_FROM {
                wipe_resident(ptr, layout.size());
            } else {
                wipe(ptr, layout.size());
            }
            System.dealloc(ptr, layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_allocated_reallocated_and_freed() {
        let a = WipeOnFree;
        let layout = Layout::from_size_align(100, 8).unwrap();
        // SAFETY: a fresh block of `layout`, written within bounds, grown,
        // read back and freed once.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 7, 100);
            let q = a.realloc(p, layout, 5000);
            assert!(!q.is_null());
            assert!(std::slice::from_raw_parts(q, 100).iter().all(|&b| b == 7));
            a.dealloc(q, Layout::from_size_align(5000, 8).unwrap());
            let z = a.alloc_zeroed(layout);
            assert!(std::slice::from_raw_parts(z, 100).iter().all(|&b| b == 0));
            a.dealloc(z, layout);
        }
    }

    #[test]
    fn large_blocks_are_wiped_where_they_were_written() {
        // A 4 MiB block written in a few scattered places (and so partly
        // in memory): every written byte is zero after wipe_resident, and
        // the block is still readable.
        let a = WipeOnFree;
        let len = 4 << 20;
        let layout = Layout::from_size_align(len, 16).unwrap();
        // SAFETY: a fresh block of `layout`; writes and reads within it;
        // wipe_resident on the whole block; freed once.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            for off in [0, 1, 4095, 4096, 100_000, len / 2, len - 4097, len - 1] {
                *p.add(off) = 0xa5;
            }
            wipe_resident(p, len);
            let all = std::slice::from_raw_parts(p, len);
            assert!(all.iter().all(|&b| b == 0));
            a.dealloc(p, layout);
        }
    }
}

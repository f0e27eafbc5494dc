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
            wipe(ptr, layout.size());
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
}

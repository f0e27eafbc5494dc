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
//!
//! It also aligns every block of [`ALIGN_FROM`] bytes and more on a cache
//! line (but one size, below): the I/O buffers of the data path. glibc gives a large block 16
//! bytes past a page boundary, and on some CPUs (measured on an AMD EPYC
//! Zen 3) the kernel copies into such a buffer at a quarter of its speed:
//! `pread` of a file in the page cache into a 1 MiB buffer took 440 ms per
//! GiB 16 bytes past a cache line and 95 ms on one. Copies out of a buffer
//! (`pwrite`) do not care.
//!
//! One block is placed further: the FUSE library's request buffer
//! ([`FUSE_REQUEST_BUFFER`] bytes) starts [`FUSE_WRITE_PAYLOAD`] bytes
//! before a page boundary, so that a write request's data, which follows
//! its headers, lands on a page. The kernel then copies written data into
//! it at full speed, and the workloads' view can hand it to a file opened
//! for direct I/O (which wants the loop device's 512-byte alignment)
//! without copying it first.

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, wiping each block before it goes back.
pub struct WipeOnFree;

/// Blocks of at least this size are aligned on [`IO_ALIGN`] bytes.
pub const ALIGN_FROM: usize = 4096;

/// A cache line: what the kernel's copies into a buffer need to run at
/// full speed.
pub const IO_ALIGN: usize = 64;

/// The size of the buffer the FUSE library (`fuser` 0.18) reads each
/// request into: its largest write (16 MiB) and a page for the headers.
/// A test in `coffre-data` fails if a write's data no longer lands on a
/// page, e.g. after an upgrade of the library that changes this size.
pub const FUSE_REQUEST_BUFFER: usize = (16 << 20) + 4096;

/// Where a write request's data starts in that buffer: after the kernel's
/// `fuse_in_header` (40 bytes) and `fuse_write_in` (40 bytes).
pub const FUSE_WRITE_PAYLOAD: usize = 80;

/// Where a block we place ourselves starts: `residue` bytes past a
/// multiple of `modulus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placement {
    modulus: usize,
    residue: usize,
}

/// Large blocks: on a cache line.
const LINE: Placement = Placement {
    modulus: IO_ALIGN,
    residue: 0,
};

/// The FUSE library's request buffer: a write's data on a page.
const FUSE_REQUEST: Placement = Placement {
    modulus: 4096,
    residue: 4096 - FUSE_WRITE_PAYLOAD,
};

/// The system's alignment of every block (glibc: two words). Every
/// placement's residue is a multiple of it, so the distance from the
/// system's block to ours is too: at least 16 bytes, room for the two
/// bytes that record it.
const SYSTEM_ALIGN: usize = 2 * size_of::<usize>();

// What hand_out and taken_back rely on, checked when this compiles: every
// distance is a multiple of SYSTEM_ALIGN, at most 256 of them (it is
// recorded as one byte), and the FUSE buffer is a large block.
const _: () = assert!(
    FUSE_REQUEST.residue.is_multiple_of(SYSTEM_ALIGN)
        && LINE.residue.is_multiple_of(SYSTEM_ALIGN)
        && FUSE_REQUEST.modulus.is_multiple_of(SYSTEM_ALIGN)
        && LINE.modulus.is_multiple_of(SYSTEM_ALIGN)
        && FUSE_REQUEST.modulus / SYSTEM_ALIGN <= 256
        && LINE.modulus / SYSTEM_ALIGN <= 256
        && FUSE_REQUEST_BUFFER >= ALIGN_FROM
);

/// Whether a block of `layout` is one we place ourselves, and where: taken
/// from the system a placement's modulus larger, handed out from the first
/// address past its start where the placement puts blocks (a cache line;
/// for the FUSE library's buffer, 80 bytes before a page), the distance
/// kept in the two bytes just before. Only for alignments the placement
/// meets (at most 16 bytes for the FUSE buffer, below a cache line for the
/// others). Not through the system's aligned allocation: glibc has no aligned
/// `calloc`, and zeroing a large block by hand faults in every page of it
/// (the FUSE library's 16 MiB buffers, of which a request uses a page).
/// It depends only on `layout`, so `dealloc` undoes what `alloc` did.
fn realigned(layout: Layout) -> Option<(Layout, Placement)> {
    let place = if layout.size() == FUSE_REQUEST_BUFFER && layout.align() <= SYSTEM_ALIGN {
        FUSE_REQUEST
    } else if layout.size() >= ALIGN_FROM && layout.align() < IO_ALIGN {
        LINE
    } else {
        return None;
    };
    let raw = Layout::from_size_align(layout.size().checked_add(place.modulus)?, layout.align());
    raw.ok().map(|raw| (raw, place))
}

/// The first address past `raw` where `place` puts a block, with its
/// distance from `raw` (16 to `place.modulus`) recorded in the two bytes
/// just before it ([`record`]). The caller takes `raw` from the system
/// `place.modulus` bytes larger than the block it hands out, so the block
/// fits after it.
///
/// # Safety
/// `raw` must be null, or valid for writes of `place.modulus` bytes and
/// aligned as the system aligns every block ([`SYSTEM_ALIGN`]).
unsafe fn hand_out(raw: *mut u8, place: Placement) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    if !(raw as usize).is_multiple_of(SYSTEM_ALIGN) {
        // Not what glibc gives; nothing below would hold (no panic here:
        // unwinding allocates).
        std::process::abort();
    }
    // From 1 to modulus bytes in; with raw and the residue both on
    // SYSTEM_ALIGN, a multiple of it, so at least 16: room for the
    // record.
    let shift = match (place.residue + place.modulus - raw as usize % place.modulus) % place.modulus
    {
        0 => place.modulus,
        n => n,
    };
    // SAFETY: shift <= modulus, within the block; the two bytes before
    // the block are at raw + shift - 2 >= raw (shift >= SYSTEM_ALIGN).
    unsafe {
        let p = raw.add(shift);
        p.sub(2).cast::<[u8; 2]>().write(record(shift));
        p
    }
}

/// How a distance (a multiple of [`SYSTEM_ALIGN`], 16 to 4096) is kept:
/// its count of SYSTEM_ALIGN units less one, and that byte's complement,
/// so that a stray write over them is caught ([`recorded`]).
fn record(shift: usize) -> [u8; 2] {
    let units = (shift / SYSTEM_ALIGN).wrapping_sub(1).to_le_bytes()[0];
    [units, !units]
}

/// The distance [`record`] kept, or `None` if the two bytes disagree.
fn recorded(bytes: [u8; 2]) -> Option<usize> {
    (bytes[1] == !bytes[0]).then(|| (usize::from(bytes[0]) + 1) * SYSTEM_ALIGN)
}

/// The start of the system's block for a block `hand_out` gave.
///
/// # Safety
/// `p` must come from [`hand_out`] with the same `place`.
unsafe fn taken_back(p: *mut u8, place: Placement) -> *mut u8 {
    // SAFETY: hand_out recorded the distance in the two bytes before p.
    let kept = unsafe { p.sub(2).cast::<[u8; 2]>().read() };
    // The record sits where glibc keeps (and checks) a block's size for
    // its own blocks: a stray write there, from some other bug, would have
    // free() and the wipe take a wrong address. What hand_out can have
    // written is checked, and anything else stops the process (no panic:
    // unwinding allocates).
    let Some(shift) = recorded(kept).filter(|&s| shift_is_sound(p as usize, s, place)) else {
        std::process::abort();
    };
    // SAFETY: within the block hand_out was given, shift bytes before p.
    unsafe { p.sub(shift) }
}

/// Whether `shift` can be what [`hand_out`] wrote before the block at
/// address `p`: `p` where `place` puts blocks, the distance 1 to its
/// modulus, and the system's block it leads back to aligned as the system
/// aligns every block (two words).
fn shift_is_sound(p: usize, shift: usize, place: Placement) -> bool {
    p % place.modulus == place.residue
        && (1..=place.modulus).contains(&shift)
        && p.wrapping_sub(shift).is_multiple_of(SYSTEM_ALIGN)
}

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
/// pages that are in memory. Only blocks glibc maps on their own qualify
/// (when [`crate::return_large_allocations`] set it so): unmapping one
/// drops its pages that were not in memory (never touched, or swapped
/// out), where a heap block's swapped-out page would come back unwiped
/// with the block's next owner.
const SPARSE_FROM: usize = crate::MAP_FROM;

// The FUSE library's buffer is a mapping of its own: zeroed lazily by the
// kernel as its pages are touched, and wiped sparsely.
const _: () = assert!(FUSE_REQUEST_BUFFER >= crate::MAP_FROM && SPARSE_FROM >= crate::MAP_FROM);

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

// SAFETY: every method delegates to `System`, so System's guarantees
// (alignment, size, validity) hold; blocks `realigned` are taken their
// placement's modulus larger and handed out from inside, where the
// placement puts them (on a cache line, or for the FUSE buffer 16-byte
// aligned: `realigned` takes only alignments the placement meets), with
// `size` bytes after, and
// `dealloc` finds the system's block again by the same rule, which depends
// only on the layout the GlobalAlloc contract says is the block's.
// `dealloc` first writes zeros over the block, which the contract says is
// no longer used by anyone. `realloc` is the trait's default (alloc, copy,
// dealloc), so it is built from these three.
unsafe impl GlobalAlloc for WipeOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees on `layout` are System's, and a
        // larger size with the same alignment keeps them.
        unsafe {
            match realigned(layout) {
                Some((raw, place)) => hand_out(System.alloc(raw), place),
                None => System.alloc(layout),
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc; the whole system block is zeroed (lazily,
        // for blocks glibc maps), so what is handed out is too.
        unsafe {
            match realigned(layout) {
                Some((raw, place)) => hand_out(System.alloc_zeroed(raw), place),
                None => System.alloc_zeroed(layout),
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout` that we allocated; the
        // caller no longer uses it. A realigned one is the system block
        // `raw` found back by taken_back, `raw_layout.size()` bytes long.
        unsafe {
            let (ptr, layout) = match realigned(layout) {
                Some((raw_layout, place)) => (taken_back(ptr, place), raw_layout),
                None => (ptr, layout),
            };
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
    fn a_large_blocks_distance_byte_is_checked_before_it_is_trusted() {
        // What hand_out writes is found back, from every start the system
        // can give (two-word aligned) within a modulus, for both
        // placements.
        for place in [LINE, FUSE_REQUEST] {
            let m = place.modulus;
            let mut buf = vec![0u64; 3 * m / 8];
            let base = buf.as_mut_ptr().cast::<u8>();
            let first = m - base as usize % m;
            for offset in (0..m).step_by(SYSTEM_ALIGN) {
                // SAFETY: raw + m stays within buf (3 moduli).
                unsafe {
                    let raw = base.add(first % m + offset);
                    let p = hand_out(raw, place);
                    assert_eq!(p as usize % m, place.residue);
                    assert_eq!(taken_back(p, place), raw, "offset {offset}");
                }
            }
        }
        // What it cannot have written is refused (taken_back aborts).
        let line = 64 * IO_ALIGN;
        assert!(shift_is_sound(line, 16, LINE));
        assert!(shift_is_sound(line, IO_ALIGN, LINE));
        assert!(!shift_is_sound(line, 0, LINE), "no distance");
        assert!(
            !shift_is_sound(line, IO_ALIGN + 16, LINE),
            "past a cache line"
        );
        assert!(!shift_is_sound(line, 200, LINE), "past a cache line");
        assert!(
            !shift_is_sound(line, 5, LINE),
            "to a block the system never gives"
        );
        assert!(
            !shift_is_sound(line + 16, 16, LINE),
            "a block not handed out on a cache line"
        );
        // The record of every distance reads back; a byte changed does not.
        for shift in (SYSTEM_ALIGN..=4096).step_by(SYSTEM_ALIGN) {
            let r = record(shift);
            assert_eq!(recorded(r), Some(shift));
            assert_eq!(recorded([r[0], r[1] ^ 1]), None);
            assert_eq!(recorded([r[0] ^ 0x80, r[1]]), None);
        }
        let fuse = 16 * 4096 + FUSE_REQUEST.residue;
        assert!(shift_is_sound(fuse, 4096, FUSE_REQUEST));
        assert!(!shift_is_sound(fuse, 4112, FUSE_REQUEST), "past a page");
        assert!(
            !shift_is_sound(line, 16, FUSE_REQUEST),
            "not where it puts them"
        );
    }

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
    fn io_buffers_are_aligned_on_a_cache_line() {
        // What a Vec<u8> asks for (alignment 1): large blocks come back on
        // a cache line, whatever glibc would have given; small ones as
        // glibc does. Several sizes, each from both alloc and
        // alloc_zeroed, and across a reallocation.
        let a = WipeOnFree;
        // SAFETY: fresh blocks of each layout, grown once and freed once.
        unsafe {
            for size in [ALIGN_FROM, 65536, 128 << 10, 1 << 20, (1 << 20) + 3] {
                let layout = Layout::from_size_align(size, 1).unwrap();
                for zeroed in [false, true] {
                    if zeroed {
                        // Leave bytes that are not zero where glibc is
                        // likely to hand out the next block (freed
                        // without our wipe).
                        let (raw, _) = realigned(layout).unwrap();
                        let dirty = System.alloc(raw);
                        std::ptr::write_bytes(dirty, 0xff, raw.size());
                        System.dealloc(dirty, raw);
                    }
                    let p = if zeroed {
                        a.alloc_zeroed(layout)
                    } else {
                        a.alloc(layout)
                    };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % IO_ALIGN, 0, "{size} bytes");
                    let all = std::slice::from_raw_parts_mut(p, size);
                    if zeroed {
                        assert!(all.iter().all(|&b| b == 0));
                    }
                    all.fill(0xa5);
                    let q = a.realloc(p, layout, size * 2);
                    assert_eq!(q as usize % IO_ALIGN, 0, "{size} bytes grown");
                    assert!(
                        std::slice::from_raw_parts(q, size)
                            .iter()
                            .all(|&b| b == 0xa5)
                    );
                    a.dealloc(q, Layout::from_size_align(size * 2, 1).unwrap());
                }
            }
            // A large zeroed block is still zero without being touched
            // (calloc's fresh pages): 256 MiB asked, far less resident.
            let rss = || {
                let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
                statm.split(' ').nth(1).unwrap().parse::<usize>().unwrap() * crate::page_size()
            };
            let big = Layout::from_size_align(256 << 20, 1).unwrap();
            let before = rss();
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            assert!(
                rss() < before + (64 << 20),
                "a zeroed block was faulted in whole"
            );
            a.dealloc(p, big);
            // An alignment between glibc's and a cache line holds too, and
            // a block shrunk across the threshold is freed by the small
            // rule, grown back by the large one.
            let l32 = Layout::from_size_align(ALIGN_FROM, 32).unwrap();
            let p = a.alloc(l32);
            assert_eq!(p as usize % IO_ALIGN, 0);
            *p = 1;
            let q = a.realloc(p, l32, 100);
            assert_eq!(*q, 1);
            let r = a.realloc(q, Layout::from_size_align(100, 32).unwrap(), ALIGN_FROM);
            assert_eq!((*r, r as usize % IO_ALIGN), (1, 0));
            a.dealloc(r, l32);
            // Small blocks and those already aligned go to the system as
            // they are.
            assert!(realigned(Layout::from_size_align(100, 1).unwrap()).is_none());
            assert!(realigned(Layout::from_size_align(8192, 4096).unwrap()).is_none());
            // The FUSE library's request buffer: a write's data on a page,
            // from alloc and alloc_zeroed.
            let fuse = Layout::from_size_align(FUSE_REQUEST_BUFFER, 1).unwrap();
            for zeroed in [false, true] {
                let p = if zeroed {
                    a.alloc_zeroed(fuse)
                } else {
                    a.alloc(fuse)
                };
                assert_eq!((p as usize + FUSE_WRITE_PAYLOAD) % 4096, 0);
                *p = 1;
                *p.add(FUSE_REQUEST_BUFFER - 1) = 1;
                a.dealloc(p, fuse);
            }
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

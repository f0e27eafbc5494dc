//! Locking secrets into RAM page by page, with a count per page.
//!
//! `mlock` and `munlock` work on whole pages, and the kernel does not count:
//! one `munlock` unlocks a page however many `mlock`s covered it. Small
//! secrets share pages (the allocator packs a 32-byte passphrase next to a
//! 64-byte volume key), so unlocking the range of one secret as it is
//! dropped would unlock its neighbour too, and let the neighbour reach swap.
//! Here every page remembers how many live secrets use it; a page is locked
//! when its first user arrives and unlocked only when its last one leaves.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

/// How many live secrets use each page (by page number), and which pages
/// changed state. Pure bookkeeping, so it can be tested without the
/// kernel.
#[derive(Debug, Default)]
pub struct PageCounts {
    counts: BTreeMap<usize, usize>,
}

impl PageCounts {
    /// Adds one user to each page in `pages`; returns the runs of pages that
    /// had none before (the ones to lock now).
    pub fn acquire(&mut self, pages: Range<usize>) -> Vec<Range<usize>> {
        let mut fresh = Vec::new();
        for p in pages {
            let c = self.counts.entry(p).or_insert(0);
            *c += 1;
            if *c == 1 {
                push_page(&mut fresh, p);
            }
        }
        fresh
    }

    /// Removes one user from each page in `pages`; returns the runs of pages
    /// left with none (the ones to unlock now). A page that was never
    /// acquired is ignored.
    pub fn release(&mut self, pages: Range<usize>) -> Vec<Range<usize>> {
        let mut unused = Vec::new();
        for p in pages {
            if let Some(c) = self.counts.get_mut(&p) {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(&p);
                    push_page(&mut unused, p);
                }
            }
        }
        unused
    }

    /// How many secrets use page `page`.
    pub fn users(&self, page: usize) -> usize {
        self.counts.get(&page).copied().unwrap_or(0)
    }

    /// How many pages have at least one user.
    pub fn pages_in_use(&self) -> usize {
        self.counts.len()
    }
}

/// Appends page `p` to the last run when it continues it, else starts one.
fn push_page(runs: &mut Vec<Range<usize>>, p: usize) {
    match runs.last_mut() {
        Some(r) if r.end == p => r.end = p + 1,
        _ => runs.push(p..p + 1),
    }
}

fn registry() -> &'static Mutex<PageCounts> {
    static REGISTRY: OnceLock<Mutex<PageCounts>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(PageCounts::default()))
}

/// The page numbers that `buf` touches.
fn pages_of(buf: &[u8]) -> Range<usize> {
    let size = crate::page_size();
    let start = buf.as_ptr() as usize;
    start / size..(start + buf.len()).div_ceil(size)
}

fn run_bytes(run: &Range<usize>) -> (usize, usize) {
    let size = crate::page_size();
    (run.start * size, (run.end - run.start) * size)
}

/// Locks the pages under `buf` into RAM, counting `buf` as one more user of
/// each. Best effort like [`crate::mlock`]: an error (no `CAP_IPC_LOCK`, a
/// small `RLIMIT_MEMLOCK`) is returned, and the count is kept anyway, so a
/// later [`unlock_shared`] of the same `buf` stays balanced.
///
/// Every call must be matched by one [`unlock_shared`] of the same slice,
/// before the memory is freed.
pub fn lock_shared(buf: &[u8]) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    // The kernel calls run under the lock: otherwise a page could be
    // unlocked by a departing user after a new user counted it but before
    // it locked it.
    let mut reg = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut result = Ok(());
    for run in reg.acquire(pages_of(buf)) {
        let (addr, len) = run_bytes(&run);
        if let Err(e) = crate::mlock_raw(addr, len) {
            result = Err(e);
        }
    }
    result
}

/// Removes `buf` as a user of its pages, unlocking only the pages no other
/// live secret uses.
pub fn unlock_shared(buf: &[u8]) {
    if buf.is_empty() {
        return;
    }
    let mut reg = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for run in reg.release(pages_of(buf)) {
        let (addr, len) = run_bytes(&run);
        crate::munlock_raw(addr, len);
    }
}

/// How many secrets hold the page that contains `ptr` (for tests).
pub fn users_of_page(ptr: *const u8) -> usize {
    let page = ptr as usize / crate::page_size();
    registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .users(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_locked_by_its_first_user_and_unlocked_by_its_last() {
        let mut c = PageCounts::default();
        assert_eq!(c.acquire(10..12), vec![10..12]);
        // A second secret on pages 11..13: only page 12 is new.
        assert_eq!(c.acquire(11..13), vec![12..13]);
        assert_eq!(c.users(11), 2);
        // The first leaves: page 10 is free, 11 is still used.
        assert_eq!(c.release(10..12), vec![10..11]);
        assert_eq!(c.users(11), 1);
        assert_eq!(c.release(11..13), vec![11..13]);
        assert_eq!(c.pages_in_use(), 0);
    }

    #[test]
    fn runs_are_split_around_pages_still_in_use() {
        let mut c = PageCounts::default();
        assert_eq!(c.acquire(5..6), vec![5..6]);
        assert_eq!(c.acquire(3..9), vec![3..5, 6..9]);
        assert_eq!(c.release(3..9), vec![3..5, 6..9]);
        assert_eq!(c.users(5), 1);
        assert_eq!(c.release(5..6), vec![5..6]);
    }

    #[test]
    fn releasing_what_was_never_acquired_changes_nothing() {
        let mut c = PageCounts::default();
        c.acquire(1..2);
        assert!(c.release(7..8).is_empty());
        assert_eq!(c.users(1), 1);
    }

    #[test]
    fn two_buffers_on_one_page_count_twice() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        let _ = lock_shared(&a);
        let _ = lock_shared(&b);
        if pages_of(&a) == pages_of(&b) {
            assert!(users_of_page(a.as_ptr()) >= 2);
        }
        unlock_shared(&a);
        assert!(users_of_page(b.as_ptr()) >= 1);
        unlock_shared(&b);
    }
}

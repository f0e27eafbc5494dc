//! [`Written`]: which bytes of a chunk in the device's buffer were written
//! since it entered the buffer without being read from the store (a
//! partial write to a chunk the buffer did not hold). The rest of the
//! chunk is what the store holds, fetched only when something needs the
//! whole chunk (a read of a byte not written, an upload): a sequential
//! writer whose requests are smaller than a chunk (the loop device hands
//! the daemon 512 KiB at a time) covers the chunk before that, and the
//! fetch never happens.

use std::ops::Range;

/// Disjoint, sorted, non-adjacent ranges of written bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Written(Vec<Range<usize>>);

impl Written {
    /// Adds `r` (merged with the ranges it touches or overlaps).
    pub(crate) fn add(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        // The first range that ends at or after r's start, and the first
        // that starts after r's end: those between merge with r.
        let first = self.0.partition_point(|x| x.end < r.start);
        let last = self.0.partition_point(|x| x.start <= r.end);
        let mut merged = r;
        if first < last {
            merged.start = merged.start.min(self.0[first].start);
            merged.end = merged.end.max(self.0[last - 1].end);
        }
        self.0.splice(first..last, std::iter::once(merged));
    }

    /// Whether every byte of `r` was written.
    pub(crate) fn covers(&self, r: &Range<usize>) -> bool {
        if r.is_empty() {
            return true;
        }
        let i = self.0.partition_point(|x| x.end <= r.start);
        self.0
            .get(i)
            .is_some_and(|x| x.start <= r.start && r.end <= x.end)
    }

    /// The ranges of `0..len` not written.
    pub(crate) fn gaps(&self, len: usize) -> Vec<Range<usize>> {
        let mut gaps = Vec::new();
        let mut at = 0;
        for x in &self.0 {
            if x.start >= len {
                break;
            }
            if x.start > at {
                gaps.push(at..x.start);
            }
            at = at.max(x.end);
        }
        if at < len {
            gaps.push(at..len);
        }
        gaps
    }
}

#[cfg(test)]
mod tests {
    use super::Written;
    use proptest::prelude::*;

    proptest! {
        /// Against a byte map: what is covered, what the gaps are, and the
        /// ranges kept disjoint, sorted and apart.
        #[test]
        fn written_ranges_match_a_byte_map(
            adds in proptest::collection::vec((0usize..64, 0usize..24), 0..24),
            probe in (0usize..64, 0usize..24),
        ) {
            let len = 64;
            let mut w = Written::default();
            let mut map = [false; 88];
            for (start, n) in adds {
                w.add(start..start + n);
                for b in &mut map[start..start + n] {
                    *b = true;
                }
            }
            for pair in w.0.windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "{:?}", w);
            }
            prop_assert!(w.0.iter().all(|r| !r.is_empty()));
            let (start, n) = probe;
            prop_assert_eq!(w.covers(&(start..start + n)), map[start..start + n].iter().all(|b| *b));
            let mut from_map = Vec::new();
            let mut i = 0;
            while i < len {
                if map[i] {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < len && !map[i] {
                    i += 1;
                }
                from_map.push(s..i);
            }
            prop_assert_eq!(w.gaps(len), from_map);
        }
    }
}

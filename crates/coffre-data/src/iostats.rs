//! What the volume file serves, counted for the metrics endpoint: bytes,
//! requests and their latency (from the FUSE request to the reply: the
//! cipher and the storage), by direction. Process-wide: a daemon serves one
//! vault. Lock-free (atomics), so a request pays a few increments.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds (then +Inf).
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// A latency histogram: cumulative-free counts per bucket, their sum.
#[derive(Debug)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BOUNDS_US.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one request that took `d`.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Cumulative counts per bound (the last is +Inf: the total), and the
    /// sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        (cumulative, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// One direction's counters.
#[derive(Debug)]
pub struct Direction {
    /// Bytes served.
    pub bytes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Requests' latency (their count is the histogram's total).
    pub latency: Latency,
}

impl Direction {
    const fn new() -> Self {
        Self {
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Latency::new(),
        }
    }

    pub(crate) fn done(&self, bytes: Option<usize>, took: Duration) {
        match bytes {
            Some(n) => {
                self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            None => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency.observe(took);
    }
}

/// Reads and writes of the volume file (the data's ext4 above it).
#[derive(Debug)]
pub struct IoStats {
    /// Reads.
    pub read: Direction,
    /// Writes.
    pub write: Direction,
}

/// This process's counters.
pub static DATA_IO: IoStats = IoStats {
    read: Direction::new(),
    write: Direction::new(),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_adds_up() {
        let l = Latency::new();
        l.observe(Duration::from_micros(40));
        l.observe(Duration::from_micros(700));
        l.observe(Duration::from_secs(3));
        let (c, sum) = l.snapshot();
        assert_eq!(c.len(), LATENCY_BOUNDS_US.len() + 1);
        assert_eq!(c[0], 1, "50 us");
        assert_eq!(c[3], 1, "500 us");
        assert_eq!(c[4], 2, "1 ms");
        assert_eq!(c[LATENCY_BOUNDS_US.len() - 1], 2, "1 s");
        assert_eq!(*c.last().unwrap(), 3, "+Inf");
        assert!((sum - 3.00074).abs() < 1e-9, "{sum}");
    }
}

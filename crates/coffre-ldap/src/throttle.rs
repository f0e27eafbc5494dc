//! The per-(address, user) throttle on binds. A wrong password makes
//! that pair wait (1 s, doubling to 60 s) before the KDF runs for it
//! again; a right one clears it. Only the pair: a guest guessing one
//! member's password neither locks that member out elsewhere nor slows
//! another guest, and there is no lockout to abuse.
//!
//! While a check for a pair is queued or running, another bind for the
//! same pair is refused too: parallel connections cannot multiply the
//! guesses. And one address has at most [`CHECKS_PER_ADDRESS`] checks
//! queued or running: the KDF's queue is every workload's, and a guest
//! that sees many members could otherwise keep it full, so that other
//! workloads' right passwords got `busy`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The wait after the first wrong password.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Checks one address may have queued or running at once.
pub const CHECKS_PER_ADDRESS: usize = 2;

/// Pairs remembered at most (there are only clients × visible users of
/// them; this bounds a bug, not an attacker).
pub const MAX_PAIRS: usize = 16_384;

#[derive(Clone, Copy, Debug)]
struct State {
    until: Instant,
    backoff: Duration,
    checking: bool,
}

/// The throttle's state.
#[derive(Debug, Default)]
pub struct Throttle {
    pairs: HashMap<(IpAddr, String), State>,
}

impl Throttle {
    /// Whether a bind for `(ip, user)` may run the KDF now; if so the pair
    /// is marked as being checked until [`Throttle::record`].
    pub fn begin(&mut self, ip: IpAddr, user: &str, now: Instant) -> bool {
        let key = (ip, user.to_string());
        match self.pairs.get_mut(&key) {
            Some(s) if s.checking || now < s.until => false,
            Some(s) => {
                s.checking = true;
                true
            }
            None => {
                if self.pairs.len() >= MAX_PAIRS {
                    self.forget_old(now);
                    if self.pairs.len() >= MAX_PAIRS {
                        return false;
                    }
                }
                self.pairs.insert(
                    key,
                    State {
                        until: now,
                        backoff: Duration::ZERO,
                        checking: true,
                    },
                );
                true
            }
        }
    }

    /// Whether a check for `(ip, user)` is queued or running now (a bind
    /// beside it is answered `busy`: its password may well be right).
    pub fn checking(&self, ip: IpAddr, user: &str) -> bool {
        self.pairs
            .get(&(ip, user.to_string()))
            .is_some_and(|s| s.checking)
    }

    /// Whether `ip` has [`CHECKS_PER_ADDRESS`] checks queued or running
    /// (its next bind is answered `busy`, as when the queue is full: not
    /// a wrong password).
    pub fn address_busy(&self, ip: IpAddr) -> bool {
        self.pairs
            .iter()
            .filter(|((i, _), s)| *i == ip && s.checking)
            .count()
            >= CHECKS_PER_ADDRESS
    }

    /// The check begun for `(ip, user)` ended: `Some(true)` right password,
    /// `Some(false)` wrong, `None` not run (the queue was full).
    pub fn record(&mut self, ip: IpAddr, user: &str, right: Option<bool>, now: Instant) {
        let key = (ip, user.to_string());
        match right {
            Some(true) => {
                self.pairs.remove(&key);
            }
            Some(false) => {
                if let Some(s) = self.pairs.get_mut(&key) {
                    s.backoff = (s.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                    s.until = now + s.backoff;
                    s.checking = false;
                }
            }
            None => {
                if let Some(s) = self.pairs.get_mut(&key) {
                    s.checking = false;
                    if s.backoff.is_zero() {
                        self.pairs.remove(&key);
                    }
                }
            }
        }
    }

    /// Forgets pairs whose wait ended long ago (a full `MAX_BACKOFF`
    /// without a wrong password starts again at the first wait).
    fn forget_old(&mut self, now: Instant) {
        self.pairs
            .retain(|_, s| s.checking || now < s.until + MAX_BACKOFF);
    }

    /// How many pairs are remembered.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 10));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 11));

    #[test]
    fn wrong_passwords_double_the_wait_and_a_right_one_clears_it() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert!(t.begin(A, "alice", t0));
        assert!(!t.begin(A, "alice", t0), "one check at a time per pair");
        assert!(t.begin(B, "alice", t0), "another address is not held");
        assert!(t.begin(A, "bob", t0), "nor another user");
        t.record(A, "alice", Some(false), t0);
        assert!(!t.begin(A, "alice", t0 + Duration::from_millis(999)));
        assert!(t.begin(A, "alice", t0 + Duration::from_secs(1)));
        t.record(A, "alice", Some(false), t0 + Duration::from_secs(1));
        assert!(!t.begin(A, "alice", t0 + Duration::from_millis(2999)));
        let t3 = t0 + Duration::from_secs(3);
        assert!(t.begin(A, "alice", t3));
        t.record(A, "alice", Some(true), t3);
        assert!(t.begin(A, "alice", t3));
        t.record(A, "alice", None, t3);
        assert!(
            t.begin(A, "alice", t3),
            "a check that did not run leaves no wait"
        );
    }

    /// One address cannot keep the KDF's shared queue full: past its
    /// checks at once, its binds are refused, another address's are not;
    /// a check that ends makes room.
    #[test]
    fn one_address_has_a_few_checks_at_once() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert!(!t.address_busy(A));
        assert!(t.begin(A, "m1", now));
        assert!(t.checking(A, "m1") && !t.checking(A, "m2") && !t.checking(B, "m1"));
        assert!(t.begin(A, "m2", now));
        assert!(t.address_busy(A), "a third check from one address");
        assert!(!t.address_busy(B), "another address's");
        t.record(A, "m1", Some(true), now);
        assert!(!t.address_busy(A));
    }

    #[test]
    fn the_wait_stops_at_a_minute() {
        let mut t = Throttle::default();
        let mut now = Instant::now();
        for _ in 0..20 {
            assert!(t.begin(A, "alice", now));
            t.record(A, "alice", Some(false), now);
            now += MAX_BACKOFF;
        }
        assert!(!t.begin(A, "alice", now - Duration::from_millis(1)));
    }

    proptest! {
        /// Whatever happens, a pair never runs the KDF twice within its
        /// wait after a wrong password.
        #[test]
        fn no_check_within_the_wait(steps in proptest::collection::vec((0u64..5000, any::<bool>()), 1..40)) {
            let mut t = Throttle::default();
            let t0 = Instant::now();
            let mut now = t0;
            let mut last_wrong: Option<(Instant, Duration)> = None;
            let mut backoff = Duration::ZERO;
            for (dt, right) in steps {
                now += Duration::from_millis(dt);
                if t.begin(A, "alice", now) {
                    if let Some((at, wait)) = last_wrong {
                        prop_assert!(now >= at + wait);
                    }
                    t.record(A, "alice", Some(right), now);
                    if right {
                        backoff = Duration::ZERO;
                        last_wrong = None;
                    } else {
                        backoff = (backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                        last_wrong = Some((now, backoff));
                    }
                }
            }
        }
    }
}

//! Invitations and the join door, with no I/O.
//!
//! A superuser invites a name: the shell makes a temporary keyslot and
//! keeps an [`Invitation`] (one per name) until it is used, cancelled (by
//! a superuser, or by a lock) or expires. Anyone on the network can knock
//! at the join door with a name and a code, so [`JoinDoor::handle`] decides
//! what each attempt gets, with the time given as an argument:
//! - a right code for a pending, unexpired invitation is admitted, and
//!   never throttled (codes carry 128 random bits: the throttle is
//!   against floods, not guesses), which also clears its address;
//! - anything else is refused; an address that keeps failing waits longer
//!   and longer (doubling from the policy's base to its maximum), and
//!   past the first few refusals its records are only counted, so a flood
//!   neither fills the audit log nor keeps the daemon busy writing it;
//! - at each tick, counted refusals become one summary per address, quiet
//!   addresses are forgotten, and expired invitations are handed back to
//!   be cancelled.
//!
//! Nothing is lost on the way: every refusal is either recorded on its
//! own or counted in the next summary (a property test checks it).

use crate::{Millis, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A pending invitation, as the control data stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    /// The temporary keyslot its code opens (with the host's secret).
    pub keyslot: u32,
    /// The role the new member will have.
    pub role: Role,
    /// When it stops being valid, ms since the epoch.
    pub expires_ms: u64,
    /// SHA-256 of the one-time code, hex.
    pub code_sha256: String,
    /// Who invited (empty in control data written before it was kept).
    pub by: String,
}

/// The pending invitations, by name (one each).
pub type Pending = BTreeMap<String, Invitation>;

/// Why a join attempt is refused. A stranger hears one sentence for all of
/// them but [`JoinRefusal::Throttled`]: which part was wrong is for the
/// audit log only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    /// No invitation is pending for that name.
    NoInvitation,
    /// The invitation has expired.
    Expired,
    /// The code is not a code (not hex, wrong length).
    Malformed,
    /// The code is not this invitation's.
    WrongCode,
    /// This address failed too often: it waits `retry_s` more seconds.
    Throttled {
        /// Seconds until it may try again.
        retry_s: u64,
    },
}

impl JoinRefusal {
    /// What the audit record says.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRefusal::NoInvitation => "no pending invitation",
            JoinRefusal::Expired => "invitation expired",
            JoinRefusal::Malformed => "malformed code",
            JoinRefusal::WrongCode => "wrong invitation code",
            JoinRefusal::Throttled { .. } => "throttled",
        }
    }
}

/// A knock at the join door, or the clock.
#[derive(Clone, Copy, Debug)]
pub enum JoinEvent<'a> {
    /// Someone at `addr` presents `code_sha256` (the SHA-256 of the code
    /// they sent, hex; `None` if it did not decode) for `name`.
    Attempt {
        /// Source address (the throttle's key).
        addr: &'a str,
        /// The name invited.
        name: &'a str,
        /// The code's SHA-256, hex, if the code decoded.
        code_sha256: Option<&'a str>,
    },
    /// Periodic: summaries, forgetting, expiry.
    Tick,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinEffect {
    /// Go on with the join of `name`: open its temporary keyslot.
    Admit {
        /// The name invited.
        name: String,
        /// Its invitation, as it was when admitted.
        invitation: Invitation,
    },
    /// Refuse the attempt; `record` says whether this refusal gets its
    /// own audit record (else it is counted into the next summary).
    Refuse {
        /// Why.
        why: JoinRefusal,
        /// Whether to record this one on its own.
        record: bool,
    },
    /// Cancel `name`'s invitation: it has expired (wipe its keyslot).
    Expire {
        /// The name invited.
        name: String,
    },
    /// One summary record: `count` refusals from `addr` were counted, not
    /// recorded one by one, since the last tick.
    Counted {
        /// Source address.
        addr: String,
        /// How many.
        count: u64,
    },
}

/// The throttle's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// First wait after a failure, ms; doubles with each failure.
    pub base_ms: u64,
    /// Longest wait, ms.
    pub max_ms: u64,
    /// Refusals per address recorded one by one before they are only
    /// counted.
    pub recorded: u32,
    /// How long an address is remembered after its wait ends, ms.
    pub memory_ms: u64,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        ThrottlePolicy {
            base_ms: 1_000,
            max_ms: 60_000,
            recorded: 5,
            memory_ms: 600_000,
        }
    }
}

/// Failures from one address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Throttle {
    failures: u32,
    until: Millis,
    /// Refusals since the last summary that were counted, not recorded.
    counted: u64,
}

/// The join door: decides each attempt against the pending invitations,
/// and throttles addresses that keep failing.
#[derive(Clone, Debug, Default)]
pub struct JoinDoor {
    policy: ThrottlePolicy,
    throttle: BTreeMap<String, Throttle>,
}

impl JoinDoor {
    /// A door with these throttle settings.
    pub fn new(policy: ThrottlePolicy) -> Self {
        JoinDoor {
            policy,
            throttle: BTreeMap::new(),
        }
    }

    /// Changes the throttle settings (the vault's policy was reloaded).
    pub fn set_policy(&mut self, policy: ThrottlePolicy) {
        self.policy = policy;
    }

    /// How many addresses the door remembers.
    pub fn remembered(&self) -> usize {
        self.throttle.len()
    }

    /// Decides `event` at `now` against `pending`. Never changes
    /// `pending`: expiries and uses come back as effects.
    pub fn handle(
        &mut self,
        now: Millis,
        pending: &Pending,
        event: JoinEvent<'_>,
    ) -> Vec<JoinEffect> {
        match event {
            JoinEvent::Attempt {
                addr,
                name,
                code_sha256,
            } => vec![self.attempt(now, pending, addr, name, code_sha256)],
            JoinEvent::Tick => self.tick(now, pending),
        }
    }

    fn attempt(
        &mut self,
        now: Millis,
        pending: &Pending,
        addr: &str,
        name: &str,
        code_sha256: Option<&str>,
    ) -> JoinEffect {
        let why = match (pending.get(name), code_sha256) {
            (None, _) => JoinRefusal::NoInvitation,
            (Some(inv), _) if inv.expires_ms <= now.0 => JoinRefusal::Expired,
            (Some(_), None) => JoinRefusal::Malformed,
            (Some(inv), Some(code)) if ct_eq(code.as_bytes(), inv.code_sha256.as_bytes()) => {
                // A right code: whoever holds it is no flooder. What it
                // had counted still goes into the next summary.
                if let Some(t) = self.throttle.get_mut(addr) {
                    t.failures = 0;
                    t.until = Millis(0);
                }
                return JoinEffect::Admit {
                    name: name.to_string(),
                    invitation: inv.clone(),
                };
            }
            (Some(_), Some(_)) => JoinRefusal::WrongCode,
        };
        let p = self.policy;
        let t = self.throttle.entry(addr.to_string()).or_default();
        if t.until > now {
            t.counted += 1;
            return JoinEffect::Refuse {
                why: JoinRefusal::Throttled {
                    retry_s: (t.until.0 - now.0).div_ceil(1000),
                },
                record: false,
            };
        }
        t.failures = t.failures.saturating_add(1);
        let shift = t.failures.saturating_sub(1).min(20);
        t.until = now.plus(p.base_ms.saturating_mul(1u64 << shift).min(p.max_ms));
        let record = t.failures <= p.recorded;
        if !record {
            t.counted += 1;
        }
        JoinEffect::Refuse { why, record }
    }

    fn tick(&mut self, now: Millis, pending: &Pending) -> Vec<JoinEffect> {
        let mut out = Vec::new();
        for (addr, t) in &mut self.throttle {
            if t.counted > 0 {
                out.push(JoinEffect::Counted {
                    addr: addr.clone(),
                    count: t.counted,
                });
                t.counted = 0;
            }
        }
        let memory = self.policy.memory_ms;
        self.throttle.retain(|_, t| t.until.plus(memory) > now);
        out.extend(
            pending
                .iter()
                .filter(|(_, i)| i.expires_ms <= now.0)
                .map(|(name, _)| JoinEffect::Expire { name: name.clone() }),
        );
        out
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn invitation(expires_ms: u64, code: &str) -> Invitation {
        Invitation {
            keyslot: 3,
            role: Role::Member,
            expires_ms,
            code_sha256: code.into(),
            by: "alice".into(),
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Attempt { addr: u8, name: u8, code: u8 },
        Tick,
        Wait(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u8..4, 0u8..3, 0u8..4).prop_map(|(addr, name, code)| Step::Attempt { addr, name, code }),
            1 => Just(Step::Tick),
            2 => (0u64..90_000).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// Over any sequence of attempts, ticks and waits:
        /// - a right code for a pending, unexpired invitation is always
        ///   admitted, however throttled its address was;
        /// - an expired invitation is never admitted, and the first tick
        ///   after its expiry hands it back;
        /// - every refusal is recorded on its own or counted in the next
        ///   summary for its address, never both, never neither;
        /// - no address gets more refusals recorded one by one than the
        ///   policy allows between two admissions;
        /// - a throttled refusal never comes with a wait above the maximum.
        #[test]
        fn the_join_door_holds(steps in proptest::collection::vec(step(), 1..200)) {
            // Remembered for the whole run (forgetting has its own test).
            let policy = ThrottlePolicy { base_ms: 1_000, max_ms: 30_000, recorded: 3, memory_ms: u64::MAX / 4 };
            let mut door = JoinDoor::new(policy);
            let mut pending = Pending::new();
            // name 0: valid for a while; name 1: expires early; name 2: none.
            pending.insert("n0".into(), invitation(400_000, "c0"));
            pending.insert("n1".into(), invitation(20_000, "c1"));
            let mut now = Millis(0);
            let mut refused: BTreeMap<String, u64> = BTreeMap::new();
            let mut recorded: BTreeMap<String, u64> = BTreeMap::new();
            let mut summarised: BTreeMap<String, u64> = BTreeMap::new();
            let mut recorded_since_admit: BTreeMap<String, u32> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Wait(ms) => now = now.plus(ms),
                    Step::Tick => {
                        for e in door.handle(now, &pending, JoinEvent::Tick) {
                            match e {
                                JoinEffect::Counted { addr, count } => *summarised.entry(addr).or_default() += count,
                                JoinEffect::Expire { name } => {
                                    prop_assert!(pending[&name].expires_ms <= now.0);
                                    pending.remove(&name);
                                }
                                other => prop_assert!(false, "tick gave {other:?}"),
                            }
                        }
                    }
                    Step::Attempt { addr, name, code } => {
                        let addr = format!("10.0.0.{addr}");
                        let name = format!("n{name}");
                        let code_s = format!("c{code}");
                        let code_sha = (code < 3).then_some(code_s.as_str());
                        let right = pending.get(&name).is_some_and(|i| i.expires_ms > now.0 && Some(i.code_sha256.as_str()) == code_sha);
                        let effects = door.handle(now, &pending, JoinEvent::Attempt { addr: &addr, name: &name, code_sha256: code_sha });
                        prop_assert_eq!(effects.len(), 1);
                        match &effects[0] {
                            JoinEffect::Admit { name: n, invitation } => {
                                prop_assert!(right, "admitted a wrong or expired code");
                                prop_assert_eq!(n, &name);
                                prop_assert!(invitation.expires_ms > now.0);
                                recorded_since_admit.remove(&addr);
                            }
                            JoinEffect::Refuse { why, record } => {
                                prop_assert!(!right, "refused a right code: {:?}", why);
                                if let JoinRefusal::Throttled { retry_s } = why {
                                    prop_assert!(*retry_s * 1000 <= policy.max_ms + 999);
                                    prop_assert!(!record);
                                }
                                *refused.entry(addr.clone()).or_default() += 1;
                                if *record {
                                    *recorded.entry(addr.clone()).or_default() += 1;
                                    let r = recorded_since_admit.entry(addr.clone()).or_default();
                                    *r += 1;
                                    prop_assert!(*r <= policy.recorded);
                                }
                            }
                            other => prop_assert!(false, "attempt gave {other:?}"),
                        }
                    }
                }
            }
            // A last tick settles the counts.
            for e in door.handle(now, &pending, JoinEvent::Tick) {
                if let JoinEffect::Counted { addr, count } = e {
                    *summarised.entry(addr).or_default() += count;
                }
            }
            for (addr, n) in &refused {
                let r = recorded.get(addr).copied().unwrap_or(0);
                let c = summarised.get(addr).copied().unwrap_or(0);
                prop_assert_eq!(r + c, *n, "refusals from {} lost or doubled", addr);
            }
        }
    }

    #[test]
    fn a_flood_is_throttled_and_counted() {
        let mut door = JoinDoor::new(ThrottlePolicy::default());
        let pending = Pending::new();
        let now = Millis(1_000_000);
        let mut records = 0;
        for _ in 0..100 {
            let e = door.handle(
                now,
                &pending,
                JoinEvent::Attempt {
                    addr: "192.0.2.1",
                    name: "x",
                    code_sha256: Some("00"),
                },
            );
            if let [JoinEffect::Refuse { record: true, .. }] = e.as_slice() {
                records += 1;
            }
        }
        assert_eq!(records, 1, "one record, then throttled and counted");
        let tick = door.handle(now, &pending, JoinEvent::Tick);
        assert_eq!(
            tick,
            vec![JoinEffect::Counted {
                addr: "192.0.2.1".into(),
                count: 99
            }]
        );
        // Quiet long enough: forgotten.
        door.handle(now.plus(2_000_000), &pending, JoinEvent::Tick);
        assert_eq!(door.remembered(), 0);
    }

    #[test]
    fn serde_keeps_the_control_data_format() {
        let text = r#"{"keyslot":2,"role":"superuser","expires_ms":5,"code_sha256":"ab","by":""}"#;
        let inv: Invitation = serde_json::from_str(text).unwrap();
        assert_eq!(inv.role, Role::Superuser);
        assert_eq!(serde_json::to_string(&inv).unwrap(), text);
    }
}

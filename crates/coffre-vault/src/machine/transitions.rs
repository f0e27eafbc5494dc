//! Transitions of the phase: boot, open and close results, the close that
//! is retried then forced, the passing of time, and the OPEN rule applied
//! after every event.

use super::{Out, SYSTEM, Vault};
use crate::model::*;

/// The phase as the machine holds it: [`Phase`] with, while closing, what
/// the close in progress carries. [`Vault::phase`] shows the bare phase.
#[derive(Clone, Debug)]
pub(super) enum Stage {
    /// No key anywhere.
    Closed,
    /// Effects of an open are running.
    Opening,
    /// Key held, data available.
    Open,
    /// Effects of a close are running.
    Closing {
        /// The key goes whatever fails (a lock, a failed open, or a close
        /// that kept failing).
        forced: bool,
        /// When the last attempt failed, for the retry.
        failed_at: Option<Millis>,
        /// When this close first failed, to force it in the end.
        first_failed: Option<Millis>,
        /// When this close started, or last moved data: one that has not
        /// answered nor moved data for as long as a failing one is forced
        /// after is forced too (a close hung on storage that stopped
        /// answering never reports a failure; a slow one, suspending large
        /// VMs into the volume, moves data).
        started: Millis,
        /// When this close started, never moved: past
        /// [`CLOSE_CEILING`] times `close_force_after_ms` it is forced
        /// whatever data it moves.
        began: Millis,
        /// A key kept from an enter during the close, to reopen with.
        reopen: Option<ReqId>,
    },
}

/// A close running this many times `close_force_after_ms` is forced even
/// if it still moves data (something that writes for ever must not keep
/// the key with nobody inside).
pub const CLOSE_CEILING: u64 = 6;

impl Stage {
    /// A close starting `now`.
    pub(super) fn closing(forced: bool, now: Millis) -> Self {
        Stage::Closing {
            forced,
            failed_at: None,
            first_failed: None,
            started: now,
            began: now,
            reopen: None,
        }
    }

    /// The bare phase.
    pub(super) fn phase(&self) -> Phase {
        match self {
            Stage::Closed => Phase::Closed,
            Stage::Opening => Phase::Opening,
            Stage::Open => Phase::Open,
            Stage::Closing { .. } => Phase::Closing,
        }
    }
}

impl Vault {
    /// Starts a close of workloads, data and key; the close puts workloads
    /// away in the mode requested now, which is in force from then on.
    pub(super) fn close(&mut self, out: &mut Out, force: bool) {
        let mode = self.mode();
        if self.p.mode_in_force != Some(mode) {
            self.p.mode_in_force = Some(mode);
            out.effects.push(Effect::Persist);
        }
        out.effects.push(Effect::Close { force, mode });
    }

    pub(super) fn boot(&mut self, out: &mut Out, unclean: bool) {
        for (req, p) in std::mem::take(&mut self.pending) {
            if p.keep_key {
                out.effects.push(Effect::DiscardKey { req });
            }
        }
        self.phase = Stage::Closed;
        self.sessions.clear();
        self.tasks.clear();
        self.approvals.clear();
        self.proposals.clear();
        let state = if self.is_locked() { "locked" } else { "closed" };
        if self.is_locked() {
            // A crash between the lock and its cancellation must not leave
            // an invitation behind.
            out.effects.push(Effect::CancelInvitations);
        }
        out.audit(
            SYSTEM,
            None,
            "boot",
            state,
            if unclean {
                "daemon started after an unclean stop (crash or kill); sessions and tasks of the previous run are gone"
            } else {
                "daemon started"
            },
        );
    }

    pub(super) fn opened(&mut self, out: &mut Out, ok: bool, detail: &str) {
        if self.phase() != Phase::Opening {
            out.audit(
                SYSTEM,
                None,
                "state",
                "ignored",
                format!("open result while {:?}", self.phase()),
            );
            return;
        }
        if ok {
            self.phase = Stage::Open;
            for s in self.sessions.values_mut() {
                s.last_seen = out.now;
            }
            out.audit(SYSTEM, None, "state", "open", detail.to_string());
        } else {
            out.audit(
                SYSTEM,
                None,
                "state",
                "failed",
                format!("open failed: {detail}"),
            );
            self.drop_sessions(out, "ended: the vault failed to open", |_| true);
            self.cancel_tasks(out, "cancelled: the vault failed to open", |_| true);
            self.phase = Stage::closing(true, out.now);
            self.close(out, true);
        }
    }

    pub(super) fn closed(&mut self, out: &mut Out, ok: bool, detail: &str) {
        if self.phase() != Phase::Closing {
            out.audit(
                SYSTEM,
                None,
                "state",
                "ignored",
                format!("close result while {:?}", self.phase()),
            );
            return;
        }
        if !ok
            && let Stage::Closing {
                forced: false,
                failed_at,
                first_failed,
                ..
            } = &mut self.phase
        {
            *failed_at = Some(out.now);
            first_failed.get_or_insert(out.now);
            out.audit(
                SYSTEM,
                None,
                "state",
                "close_failed",
                format!("{detail}; retrying"),
            );
            return;
        }
        let reopen = match std::mem::replace(&mut self.phase, Stage::Closed) {
            Stage::Closing { reopen, .. } => reopen,
            _ => None,
        };
        let state = if self.is_locked() { "locked" } else { "closed" };
        let detail = if ok {
            "key wiped".to_string()
        } else {
            format!("key wiped; not flushed: {detail}")
        };
        out.audit(SYSTEM, None, "state", state, detail);
        if let Some(req) = reopen {
            if self.has_presence() && !self.is_locked() {
                self.phase = Stage::Opening;
                out.audit(
                    SYSTEM,
                    None,
                    "state",
                    "opening",
                    "reopened: someone entered while closing",
                );
                out.effects.push(Effect::Open { req });
            } else {
                out.effects.push(Effect::DiscardKey { req });
            }
        }
    }

    /// The close running moved data: it is not hung.
    pub(super) fn close_progress(&mut self, out: &mut Out) {
        if let Stage::Closing { started, .. } = &mut self.phase {
            *started = out.now;
        }
    }

    pub(super) fn tick(&mut self, out: &mut Out) {
        let now = out.now;
        let grace = self.p.policy.grace_ms;
        // Not while opening or closing: whoever entered then learns their
        // session only when the open ends (their reply waits for it), so
        // they cannot send heartbeats before; an open longer than the grace
        // (large VMs resumed, a remote journal replayed) dropped them, and
        // the vault closed as soon as it opened (a close, likewise, lost
        // the reopen of someone who entered during it). Their time starts
        // again at the open's end; the shell gives up an open whose every
        // waiting client went away.
        if !matches!(self.phase(), Phase::Opening | Phase::Closing) {
            self.drop_sessions(out, &format!("no heartbeat for {} s", grace / 1000), |s| {
                now.0.saturating_sub(s.last_seen.0) > grace
            });
        }
        let expired: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.expires <= now)
            .map(|t| t.id)
            .collect();
        for id in expired {
            if let Some(t) = self.tasks.remove(&id) {
                out.audit(
                    &t.owner,
                    None,
                    "task_expire",
                    "ok",
                    format!("task {} {:?}", id.0, t.name),
                );
            }
        }
        let window = self.p.policy.approval_window_ms;
        self.approvals
            .retain(|_, t| now.0.saturating_sub(t.0) < window);
        self.expire_proposals(out);
        let force_after = self.p.policy.close_force_after_ms;
        if let Stage::Closing {
            forced: forced @ false,
            failed_at: None,
            started,
            began,
            ..
        } = &mut self.phase
            && (now.0.saturating_sub(started.0) >= force_after
                || now.0.saturating_sub(began.0) >= force_after.saturating_mul(CLOSE_CEILING))
        {
            let ceiling = now.0.saturating_sub(started.0) < force_after;
            // Still running, unanswered, no data moved: hung (storage that
            // stopped answering). A forced close follows, with the shell's
            // deadline, so the key goes in bounded time with nobody inside.
            *forced = true;
            out.audit(
                SYSTEM,
                None,
                "state",
                "close_forced",
                if ceiling {
                    format!(
                        "the close has run for {} s, still writing: forcing it",
                        force_after.saturating_mul(CLOSE_CEILING) / 1000
                    )
                } else {
                    format!(
                        "the close has neither finished nor written to the storage for {} s: forcing it",
                        force_after / 1000
                    )
                },
            );
            self.close(out, true);
        }
        if let Stage::Closing {
            forced,
            failed_at,
            first_failed,
            ..
        } = &mut self.phase
            && let Some(at) = *failed_at
            && now.0.saturating_sub(at.0) >= self.p.policy.close_retry_ms
        {
            *failed_at = None;
            if !*forced
                && first_failed.is_some_and(|f| {
                    now.0.saturating_sub(f.0) >= self.p.policy.close_force_after_ms
                })
            {
                *forced = true;
                out.audit(
                    SYSTEM,
                    None,
                    "state",
                    "close_forced",
                    format!(
                        "the close kept failing for {} s: forcing it",
                        self.p.policy.close_force_after_ms / 1000
                    ),
                );
            }
            let force = *forced;
            self.close(out, force);
        }
    }

    /// Applies the OPEN rule after every event.
    pub(super) fn reevaluate(&mut self, out: &mut Out) {
        let should_be_open = self.has_presence() && !self.is_locked();
        if self.phase() == Phase::Open && !should_be_open {
            let force = self.is_locked();
            self.phase = Stage::closing(force, out.now);
            out.audit(
                SYSTEM,
                None,
                "state",
                "closing",
                if self.is_locked() {
                    "locked"
                } else {
                    "nobody inside"
                },
            );
            self.close(out, force);
        }
    }
}

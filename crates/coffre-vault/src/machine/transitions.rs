//! Transitions of the phase: boot, open and close results, the close that
//! is retried then forced, the passing of time, and the OPEN rule applied
//! after every event.

use super::{Out, SYSTEM, Vault};
use crate::model::*;

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
        self.phase = Phase::Closed;
        self.sessions.clear();
        self.tasks.clear();
        self.approvals.clear();
        self.proposals.clear();
        self.reopen_key = None;
        self.close_forced = false;
        self.close_failed_at = None;
        self.close_first_failed = None;
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
        if self.phase != Phase::Opening {
            out.audit(
                SYSTEM,
                None,
                "state",
                "ignored",
                format!("open result while {:?}", self.phase),
            );
            return;
        }
        if ok {
            self.phase = Phase::Open;
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
            self.phase = Phase::Closing;
            self.close_forced = true;
            self.close(out, true);
        }
    }

    pub(super) fn closed(&mut self, out: &mut Out, ok: bool, detail: &str) {
        if self.phase != Phase::Closing {
            out.audit(
                SYSTEM,
                None,
                "state",
                "ignored",
                format!("close result while {:?}", self.phase),
            );
            return;
        }
        if !ok && !self.close_forced {
            self.close_failed_at = Some(out.now);
            self.close_first_failed.get_or_insert(out.now);
            out.audit(
                SYSTEM,
                None,
                "state",
                "close_failed",
                format!("{detail}; retrying"),
            );
            return;
        }
        self.phase = Phase::Closed;
        self.close_forced = false;
        self.close_failed_at = None;
        self.close_first_failed = None;
        let state = if self.is_locked() { "locked" } else { "closed" };
        let detail = if ok {
            "key wiped".to_string()
        } else {
            format!("key wiped; not flushed: {detail}")
        };
        out.audit(SYSTEM, None, "state", state, detail);
        if let Some(req) = self.reopen_key.take() {
            if self.has_presence() && !self.is_locked() {
                self.phase = Phase::Opening;
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

    pub(super) fn tick(&mut self, out: &mut Out) {
        let now = out.now;
        let grace = self.p.policy.grace_ms;
        self.drop_sessions(out, &format!("no heartbeat for {} s", grace / 1000), |s| {
            now.0.saturating_sub(s.last_seen.0) > grace
        });
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
        if self.phase == Phase::Closing
            && let Some(at) = self.close_failed_at
            && now.0.saturating_sub(at.0) >= self.p.policy.close_retry_ms
        {
            self.close_failed_at = None;
            if !self.close_forced
                && self.close_first_failed.is_some_and(|f| {
                    now.0.saturating_sub(f.0) >= self.p.policy.close_force_after_ms
                })
            {
                self.close_forced = true;
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
            let force = self.close_forced;
            self.close(out, force);
        }
    }

    /// Applies the OPEN rule after every event.
    pub(super) fn reevaluate(&mut self, out: &mut Out) {
        let should_be_open = self.has_presence() && !self.is_locked();
        if self.phase == Phase::Open && !should_be_open {
            self.phase = Phase::Closing;
            self.close_forced = self.is_locked();
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
            let force = self.close_forced;
            self.close(out, force);
        }
    }
}

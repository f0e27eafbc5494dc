//! Lock and quorum: locking, unlock approvals, and the proposals that only
//! enough distinct superusers may carry out (quorum changes, superuser
//! invitations, removals, promotions and demotions) within the approval
//! window.

use super::{Out, SYSTEM, Stage, Vault};
use crate::model::*;
use std::collections::BTreeMap;

/// A proposal waiting for the quorum.
#[derive(Clone, Debug)]
pub(super) struct PendingProposal {
    pub(super) id: String,
    pub(super) change: Change,
    pub(super) by: String,
    pub(super) created: Millis,
    /// Superusers who approved, and when.
    pub(super) approvals: BTreeMap<String, Millis>,
}

/// FNV-1a, 64 bits: proposal ids (not a security boundary: an id only
/// has to name one proposal and its exact arguments, never another's).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Vault {
    pub(super) fn lock(&mut self, out: &mut Out, by: &str, reason: &str) {
        self.p.lock = Some(LockInfo {
            by: by.to_string(),
            reason: reason.to_string(),
            since: out.now,
        });
        self.approvals.clear();
        out.effects.push(Effect::Persist);
        out.audit(by, None, "lock", "ok", reason);
        out.effects.push(Effect::CancelInvitations);
        for (_, p) in std::mem::take(&mut self.proposals) {
            out.audit(
                by,
                None,
                "proposal",
                "cancelled",
                format!("{}: {}: cancelled by the lock", p.id, p.change.describe()),
            );
        }
        self.drop_sessions(out, "ended by the lock", |_| true);
        self.cancel_tasks(out, "cancelled by the lock", |_| true);
        if let Stage::Closing { reopen, .. } = &mut self.phase
            && let Some(req) = reopen.take()
        {
            out.effects.push(Effect::DiscardKey { req });
        }
        match &mut self.phase {
            Stage::Open => {
                self.phase = Stage::closing(true, out.now);
                out.audit(SYSTEM, None, "state", "closing", "locked");
                self.close(out, true);
            }
            Stage::Closing { forced, .. } if !*forced => {
                *forced = true;
                self.close(out, true);
            }
            // Opening: the close follows the open's completion.
            _ => {}
        }
    }

    pub(super) fn unlock(&mut self, out: &mut Out, r: &Request) {
        if !self.is_locked() {
            out.refuse(r, Refusal::Invalid, "the vault is not locked", "not locked");
            return;
        }
        if self.phase() != Phase::Closed {
            out.refuse(
                r,
                Refusal::Busy,
                "the vault is still closing; try again in a moment",
                "still closing",
            );
            return;
        }
        let window = self.p.policy.approval_window_ms;
        let now = out.now;
        self.approvals
            .retain(|_, t| now.0.saturating_sub(t.0) < window);
        self.approvals.insert(r.member.clone(), now);
        let have = u32::try_from(self.approvals.len()).unwrap_or(u32::MAX);
        let need = self.p.policy.unlock_quorum.max(1);
        if have >= need {
            let approvers: Vec<String> = self.approvals.keys().cloned().collect();
            self.approvals.clear();
            self.p.lock = None;
            self.failures.clear();
            out.effects.push(Effect::Persist);
            out.audit(
                &r.member,
                Some(&r.source),
                "unlock",
                "ok",
                format!("unlocked by {}", approvers.join(", ")),
            );
            out.audit(SYSTEM, None, "state", "closed", "unlocked");
            out.reply(r.req, Outcome::Ok(Reply::UnlockApproved { remaining: 0 }));
        } else {
            let remaining = need - have;
            out.audit(
                &r.member,
                Some(&r.source),
                "unlock",
                "approved",
                format!("{remaining} more approval(s) needed"),
            );
            out.reply(r.req, Outcome::Ok(Reply::UnlockApproved { remaining }));
        }
    }

    /// Proposals older than the approval window expire, audited (at every
    /// tick, and before an approval is looked up).
    pub(super) fn expire_proposals(&mut self, out: &mut Out) {
        let now = out.now;
        let window = self.p.policy.approval_window_ms;
        let expired: Vec<&'static str> = self
            .proposals
            .iter()
            .filter(|(_, p)| now.0.saturating_sub(p.created.0) >= window)
            .map(|(k, _)| *k)
            .collect();
        for kind in expired {
            if let Some(p) = self.proposals.remove(kind) {
                out.audit(
                    SYSTEM,
                    None,
                    "proposal",
                    "expired",
                    format!(
                        "{}: {} (approved by {} of {} within {} s)",
                        p.id,
                        p.change.describe(),
                        p.approvals.len(),
                        self.quorum(),
                        window / 1000
                    ),
                );
            }
        }
    }

    /// Approvals a proposal or an unlock needs.
    pub(super) fn quorum(&self) -> u32 {
        self.p.policy.unlock_quorum.max(1)
    }

    pub(super) fn proposal_by_id(&self, id: &str) -> Option<&PendingProposal> {
        self.proposals.values().find(|p| p.id == id)
    }

    pub(super) fn check_quorum(&self, quorum: u32) -> Result<(), String> {
        let supers = self.superusers();
        if quorum == 0 || quorum as usize > supers {
            return Err(format!(
                "the unlock quorum must be between 1 and the number of superusers ({supers})"
            ));
        }
        Ok(())
    }

    pub(super) fn apply_quorum(&mut self, out: &mut Out, r: &Request, quorum: u32) {
        if let Err(why) = self.check_quorum(quorum) {
            out.refuse(r, Refusal::Invalid, &why, format!("quorum {quorum}"));
            return;
        }
        self.p.policy.unlock_quorum = quorum;
        out.effects.push(Effect::Persist);
        out.audit(
            &r.member,
            Some(&r.source),
            "quorum",
            "ok",
            format!("unlock needs {quorum} superusers"),
        );
        out.reply(r.req, Outcome::Ok(Reply::Done));
    }

    /// The first superuser's command: a proposal with their approval.
    pub(super) fn propose(&mut self, out: &mut Out, r: &Request, change: Change) {
        let n = self.next_proposal;
        self.next_proposal += 1;
        let id = format!(
            "{:012x}",
            fnv1a(&format!("{}|{n}|{}|{change:?}", out.now.0, r.member)) >> 16
        );
        let kind = change.kind();
        if let Some(old) = self.proposals.remove(kind) {
            out.audit(
                &r.member,
                Some(&r.source),
                "proposal",
                "superseded",
                format!(
                    "{}: {} (by {}), superseded by {id}",
                    old.id,
                    old.change.describe(),
                    old.by
                ),
            );
        }
        let description = change.describe();
        let remaining = self.quorum() - 1;
        out.audit(
            &r.member,
            Some(&r.source),
            "proposal",
            "created",
            format!("{id}: {description}; {remaining} more approval(s) needed"),
        );
        self.proposals.insert(
            kind,
            PendingProposal {
                id: id.clone(),
                change,
                by: r.member.clone(),
                created: out.now,
                approvals: BTreeMap::from([(r.member.clone(), out.now)]),
            },
        );
        out.reply(
            r.req,
            Outcome::Ok(Reply::Proposal {
                id,
                description,
                remaining,
            }),
        );
    }

    /// An approval; the one that reaches the quorum carries the change out.
    pub(super) fn approve(&mut self, out: &mut Out, r: &Request, id: &str, keep_key: bool) {
        let discard = |out: &mut Out| {
            if keep_key {
                out.effects.push(Effect::DiscardKey { req: r.req });
            }
        };
        self.expire_proposals(out);
        let Some(kind) = self
            .proposals
            .iter()
            .find(|(_, p)| p.id == id)
            .map(|(k, _)| *k)
        else {
            discard(out);
            out.refuse(
                r,
                Refusal::Invalid,
                &format!("no pending proposal {id} (carried out, expired, superseded or cancelled: see `coffre proposal list`)"),
                format!("approve {id}: no such proposal"),
            );
            return;
        };
        let need = self.quorum();
        let supers: Vec<String> = self
            .p
            .members
            .values()
            .filter(|m| m.role == Role::Superuser)
            .map(|m| m.name.clone())
            .collect();
        let Some(p) = self.proposals.get_mut(kind) else {
            return;
        };
        p.approvals.insert(r.member.clone(), out.now);
        // Only superusers still in office count.
        p.approvals.retain(|name, _| supers.contains(name));
        let have = u32::try_from(p.approvals.len()).unwrap_or(u32::MAX);
        let description = p.change.describe();
        if have < need {
            discard(out);
            let remaining = need - have;
            out.audit(
                &r.member,
                Some(&r.source),
                "approve",
                "approved",
                format!("{id}: {description}; {remaining} more approval(s) needed"),
            );
            out.reply(
                r.req,
                Outcome::Ok(Reply::Proposal {
                    id: id.to_string(),
                    description,
                    remaining,
                }),
            );
            return;
        }
        let Some(p) = self.proposals.remove(kind) else {
            return;
        };
        let approvers: Vec<String> = p.approvals.keys().cloned().collect();
        out.audit(
            &r.member,
            Some(&r.source),
            "proposal",
            "approved",
            format!("{id}: {description}; approved by {}", approvers.join(", ")),
        );
        match p.change {
            Change::Quorum { quorum } => {
                discard(out);
                self.apply_quorum(out, r, quorum);
            }
            Change::RemoveSuperuser { name } => {
                discard(out);
                let by = self.p.members.get(&r.member).cloned();
                if let Some(by) = by {
                    self.remove_member(out, r, &by, &name);
                }
            }
            Change::Promote { name } => {
                discard(out);
                self.set_role(out, r, &name, Role::Superuser);
            }
            Change::Demote { name } => {
                discard(out);
                self.set_role(out, r, &name, Role::Member);
            }
            Change::InviteSuperuser { name } => {
                if !keep_key || self.p.members.contains_key(&name) {
                    discard(out);
                    out.refuse(
                        r,
                        Refusal::Invalid,
                        &format!("cannot invite {name} now (already a member?)"),
                        format!("invite {name}"),
                    );
                    return;
                }
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "member_invite",
                    "ok",
                    format!("{name} as superuser (proposal {id})"),
                );
                out.effects.push(Effect::Invite {
                    req: r.req,
                    name,
                    role: Role::Superuser,
                });
            }
        }
    }
}

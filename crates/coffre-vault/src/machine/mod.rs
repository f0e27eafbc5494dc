//! The state machine: the vault's state, the effects buffer every rule
//! writes to, the read-only views, and [`Vault::handle`], which routes each
//! event to the concern that owns it. The rules themselves live in the
//! submodules, one per concern.

mod admission;
mod members;
mod quorum;
mod sessions;
mod transitions;

use crate::model::*;
use quorum::PendingProposal;
use std::collections::BTreeMap;
use transitions::Stage;

/// A request waiting for its password check.
#[derive(Clone, Debug)]
struct Pending {
    request: Request,
    /// What it does once the password is checked.
    op: PasswordOp,
    keep_key: bool,
}

/// Who a failure is counted against: the member, and the address it came
/// from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ThrottleKey {
    Member(String),
    Source(String),
}

impl ThrottleKey {
    fn of(r: &Request) -> [ThrottleKey; 2] {
        [
            ThrottleKey::Member(r.member.clone()),
            ThrottleKey::Source(r.source.addr.clone()),
        ]
    }
}

/// One vault's state. Feed it events with [`Vault::handle`].
#[derive(Clone, Debug)]
pub struct Vault {
    p: Persistent,
    /// The phase, with what a close in progress carries.
    phase: Stage,
    sessions: BTreeMap<SessionId, Session>,
    tasks: BTreeMap<TaskId, Task>,
    approvals: BTreeMap<String, Millis>,
    pending: BTreeMap<ReqId, Pending>,
    /// Recent failed attempts (auto-lock).
    failures: Vec<Millis>,
    /// Per member (`m:NAME`) and per source (`s:ADDR`): failures in a row
    /// and the time before which attempts are refused.
    throttle: BTreeMap<ThrottleKey, (u32, Millis)>,
    next_session: u64,
    next_task: u64,
    /// Pending proposals, one per kind.
    proposals: BTreeMap<&'static str, PendingProposal>,
    next_proposal: u64,
}

const SYSTEM: &str = "coffre";

struct Out {
    now: Millis,
    effects: Vec<Effect>,
}

impl Out {
    fn audit(
        &mut self,
        actor: &str,
        source: Option<&Source>,
        action: &str,
        result: &str,
        detail: impl Into<String>,
    ) {
        self.effects.push(Effect::Audit(AuditRecord {
            at: self.now,
            actor: actor.to_string(),
            source: source.cloned(),
            action: action.to_string(),
            result: result.to_string(),
            detail: detail.into(),
        }));
    }
    fn reply(&mut self, req: ReqId, outcome: Outcome) {
        self.effects.push(Effect::Reply { req, outcome });
    }
    fn refuse(&mut self, r: &Request, code: Refusal, message: &str, detail: impl Into<String>) {
        let result = format!("refused:{}", code.as_str());
        self.audit(
            &r.member,
            Some(&r.source),
            r.command.name(),
            &result,
            detail,
        );
        self.reply(
            r.req,
            Outcome::Refused {
                code,
                message: message.to_string(),
            },
        );
    }
}

impl Vault {
    /// A vault from its persisted control data, in the state a fresh daemon
    /// starts in (CLOSED, or LOCKED if it was locked). Send
    /// [`Event::Boot`] first.
    pub fn new(p: Persistent) -> Self {
        Self {
            p,
            phase: Stage::Closed,
            sessions: BTreeMap::new(),
            tasks: BTreeMap::new(),
            approvals: BTreeMap::new(),
            pending: BTreeMap::new(),
            failures: Vec::new(),
            throttle: BTreeMap::new(),
            next_session: 1,
            next_task: 1,
            proposals: BTreeMap::new(),
            next_proposal: 1,
        }
    }

    /// What must be persisted.
    pub fn persistent(&self) -> &Persistent {
        &self.p
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.phase()
    }

    /// Whether the vault is locked.
    pub fn is_locked(&self) -> bool {
        self.p.lock.is_some()
    }

    /// Whether someone (a session or a task) keeps the vault open.
    pub fn has_presence(&self) -> bool {
        !self.sessions.is_empty() || !self.tasks.is_empty()
    }

    /// Whether a task keeps the vault open.
    pub fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// Live sessions.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// The member a session belongs to.
    pub fn session_member(&self, id: SessionId) -> Option<&str> {
        self.sessions.get(&id).map(|s| s.member.as_str())
    }

    /// Whether `member` has an approval that counts (an unlock's, a
    /// proposal's).
    pub fn has_approvals(&self, member: &str) -> bool {
        self.approvals.contains_key(member)
            || self
                .proposals
                .values()
                .any(|p| p.approvals.contains_key(member))
    }

    /// Members by name.
    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.p.members
    }

    /// The view `status` shows.
    pub fn status(&self) -> Status {
        let state = match (self.phase(), self.p.lock.is_some()) {
            (Phase::Closed, true) => "locked",
            (Phase::Closed, false) => "closed",
            (Phase::Opening, _) => "opening",
            (Phase::Open, _) => "open",
            (Phase::Closing, _) => "closing",
        };
        Status {
            state: state.into(),
            lock: self.p.lock.clone(),
            mode: self.mode_in_force(),
            mode_pending: Some(self.mode()).filter(|m| *m != self.mode_in_force()),
            sessions: self.sessions.values().cloned().collect(),
            tasks: self.tasks.values().cloned().collect(),
            unlock_approvals: self.approvals.keys().cloned().collect(),
            unlock_quorum: self.p.policy.unlock_quorum,
            proposals: self
                .proposals
                .values()
                .map(|p| Proposal {
                    id: p.id.clone(),
                    change: p.change.clone(),
                    description: p.change.describe(),
                    by: p.by.clone(),
                    created: p.created,
                    expires: p.created.plus(self.p.policy.approval_window_ms),
                    approvals: p.approvals.keys().cloned().collect(),
                    needed: self.quorum(),
                })
                .collect(),
            members: self.p.members.len(),
        }
    }

    /// The workload mode requested: the next close uses it.
    pub fn mode(&self) -> Mode {
        self.p.mode.unwrap_or(Mode::Fast)
    }

    /// The workload mode in force: the one the last close used.
    pub fn mode_in_force(&self) -> Mode {
        self.p.mode_in_force.unwrap_or_else(|| self.mode())
    }

    /// Handles one event at time `now`; returns the effects to perform, in
    /// order.
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Effect> {
        let mut out = Out {
            now,
            effects: Vec::new(),
        };
        match event {
            Event::Boot { unclean } => self.boot(&mut out, unclean),
            Event::Request(r) => self.request(&mut out, r),
            Event::PasswordChecked { req, ok } => self.password_checked(&mut out, req, ok),
            Event::Opened { ok, detail } => self.opened(&mut out, ok, &detail),
            Event::Closed { ok, detail } => self.closed(&mut out, ok, &detail),
            Event::MemberJoined { member } => self.member_joined(&mut out, member),
            Event::Tick => self.tick(&mut out),
            Event::CloseProgress => self.close_progress(&mut out),
            Event::WorkloadEnded { name } => self.workload_ended(&mut out, &name),
            Event::SourceRefused {
                req,
                unreachable,
                detail,
            } => self.source_refused(&mut out, req, unreachable, &detail),
            Event::Disqualified { member, reason } => self.disqualified(&mut out, &member, &reason),
            Event::ApprovalsWithdrawn { member, reason } => {
                self.withdraw_approvals(&mut out, &member, &reason)
            }
        }
        self.reevaluate(&mut out);
        out.effects
    }
}

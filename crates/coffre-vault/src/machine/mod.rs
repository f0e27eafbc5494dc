//! The state machine.

use crate::model::*;
use std::collections::BTreeMap;

/// A request waiting for its password check.
#[derive(Clone, Debug)]
struct Pending {
    request: Request,
    keep_key: bool,
}

/// A proposal waiting for the quorum.
#[derive(Clone, Debug)]
struct PendingProposal {
    id: String,
    change: Change,
    by: String,
    created: Millis,
    /// Superusers who approved, and when.
    approvals: BTreeMap<String, Millis>,
}

/// FNV-1a, 64 bits: proposal ids (not a security boundary: an id only
/// has to name one proposal and its exact arguments, never another's).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One vault's state. Feed it events with [`Vault::handle`].
#[derive(Clone, Debug)]
pub struct Vault {
    p: Persistent,
    phase: Phase,
    sessions: BTreeMap<SessionId, Session>,
    tasks: BTreeMap<TaskId, Task>,
    approvals: BTreeMap<String, Millis>,
    pending: BTreeMap<ReqId, Pending>,
    /// A key kept from an enter during CLOSING, to reopen with.
    reopen_key: Option<ReqId>,
    /// The close in progress must wipe the key whatever fails (lock).
    close_forced: bool,
    /// When the last close failed, for the retry.
    close_failed_at: Option<Millis>,
    /// When the current close first failed, to force it in the end.
    close_first_failed: Option<Millis>,
    /// Recent failed attempts (auto-lock).
    failures: Vec<Millis>,
    /// Per member (`m:NAME`) and per source (`s:ADDR`): failures in a row
    /// and the time before which attempts are refused.
    throttle: BTreeMap<String, (u32, Millis)>,
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
        let result = format!(
            "refused:{}",
            serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        );
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
            phase: Phase::Closed,
            sessions: BTreeMap::new(),
            tasks: BTreeMap::new(),
            approvals: BTreeMap::new(),
            pending: BTreeMap::new(),
            reopen_key: None,
            close_forced: false,
            close_failed_at: None,
            close_first_failed: None,
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
        self.phase
    }

    /// Whether the vault is locked.
    pub fn is_locked(&self) -> bool {
        self.p.lock.is_some()
    }

    /// Whether someone (a session or a task) keeps the vault open.
    pub fn has_presence(&self) -> bool {
        !self.sessions.is_empty() || !self.tasks.is_empty()
    }

    /// Live sessions.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// The member a session belongs to.
    pub fn session_member(&self, id: SessionId) -> Option<&str> {
        self.sessions.get(&id).map(|s| s.member.as_str())
    }

    /// Members by name.
    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.p.members
    }

    /// Why `command` is refused while the vault is locked, if it is.
    ///
    /// LOCKED is a state where nothing grows but an unlock: no quorum or
    /// role change, no invitation, no keyslot change, no enter. What
    /// reduces exposure stays allowed: another lock, an unlock approval
    /// (its keyslot check keeps no key), removing a member who is not a
    /// superuser (the stolen-laptop flow: lock, then remove), and a switch
    /// to safe mode (the next close suspends workloads into the volume
    /// instead of keeping them in memory). Removing a superuser would let
    /// fewer people reach the quorum: refused.
    pub fn refused_while_locked(&self, command: &Command) -> Option<&'static str> {
        match command {
            Command::Enter => Some("the vault is locked"),
            Command::SetQuorum { .. } => {
                Some("the vault is locked: the quorum cannot change until it is unlocked")
            }
            Command::SetMode { mode: Mode::Fast } => Some(
                "the vault is locked: only a switch to safe mode is allowed until it is unlocked",
            ),
            Command::Invite { .. } => {
                Some("the vault is locked: no invitation until it is unlocked")
            }
            Command::Passwd => {
                Some("the vault is locked: passwords cannot change until it is unlocked")
            }
            Command::Approve { .. } => Some(
                "the vault is locked: proposals were cancelled by the lock; propose again once it is unlocked",
            ),
            Command::MemberRemove { name }
                if self
                    .p
                    .members
                    .get(name)
                    .is_some_and(|m| m.role == Role::Superuser) =>
            {
                Some("the vault is locked: a superuser cannot be removed until it is unlocked")
            }
            _ => None,
        }
    }

    /// Whether `member` may read status, the member list, the audit log
    /// and their VPN profile now: any member while unlocked, superusers
    /// only while locked (a lock often means a member's machine is in the
    /// wrong hands; it learns nothing more until the quorum unlocks).
    pub fn may_read(&self, member: &str) -> Result<(), Refusal> {
        match self.p.members.get(member) {
            None => Err(Refusal::UnknownMember),
            Some(m) if self.is_locked() && m.role != Role::Superuser => Err(Refusal::Locked),
            Some(_) => Ok(()),
        }
    }

    /// Whether an invitation may be redeemed now (the shell asks before it
    /// opens the temporary keyslot, and again before it adds the member).
    pub fn may_join(&self) -> Result<(), Refusal> {
        if self.is_locked() {
            Err(Refusal::Locked)
        } else {
            Ok(())
        }
    }

    /// Requests waiting for a password check.
    pub fn pending_checks(&self) -> usize {
        self.pending.len()
    }

    /// The view `status` shows.
    pub fn status(&self) -> Status {
        let state = match (self.phase, self.p.lock.is_some()) {
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

    /// Starts a close of workloads, data and key; the close puts workloads
    /// away in the mode requested now, which is in force from then on.
    fn close(&mut self, out: &mut Out, force: bool) {
        let mode = self.mode();
        if self.p.mode_in_force != Some(mode) {
            self.p.mode_in_force = Some(mode);
            out.effects.push(Effect::Persist);
        }
        out.effects.push(Effect::Close { force, mode });
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
            Event::WorkloadEnded { name } => self.workload_ended(&mut out, &name),
        }
        self.reevaluate(&mut out);
        out.effects
    }

    fn boot(&mut self, out: &mut Out, unclean: bool) {
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

    fn superusers(&self) -> usize {
        self.p
            .members
            .values()
            .filter(|m| m.role == Role::Superuser)
            .count()
    }

    fn throttled_until(&self, r: &Request, now: Millis) -> Option<Millis> {
        [format!("m:{}", r.member), format!("s:{}", r.source.addr)]
            .iter()
            .filter_map(|k| self.throttle.get(k))
            .map(|(_, until)| *until)
            .filter(|until| *until > now)
            .max()
    }

    fn fail(&mut self, out: &mut Out, r: &Request) {
        let now = out.now;
        let pol = &self.p.policy;
        for key in [format!("m:{}", r.member), format!("s:{}", r.source.addr)] {
            let e = self.throttle.entry(key).or_insert((0, now));
            e.0 = e.0.saturating_add(1);
            let shift = e.0.saturating_sub(1).min(20);
            let delay = pol
                .throttle_base_ms
                .saturating_mul(1u64 << shift)
                .min(pol.throttle_max_ms);
            e.1 = now.plus(delay);
        }
        let window = pol.failure_window_ms;
        self.failures.retain(|t| now.0.saturating_sub(t.0) < window);
        self.failures.push(now);
        let limit = pol.auto_lock_failures;
        if limit > 0 && self.failures.len() >= limit as usize && !self.is_locked() {
            let reason = format!(
                "auto-lock: {} failed attempts within {} s (last: {} from {})",
                self.failures.len(),
                window / 1000,
                r.member,
                r.source.addr
            );
            self.lock(out, SYSTEM, &reason);
        }
    }

    fn request(&mut self, out: &mut Out, r: Request) {
        let Some(member) = self.p.members.get(&r.member).cloned() else {
            out.refuse(
                &r,
                Refusal::UnknownMember,
                "this certificate belongs to no member of the vault",
                "unknown or removed member",
            );
            self.fail(out, &r);
            return;
        };
        if r.command.superuser_only() && member.role != Role::Superuser {
            out.refuse(
                &r,
                Refusal::NotPermitted,
                "this needs a superuser",
                "not a superuser",
            );
            return;
        }
        if !r.command.needs_password() {
            self.session_command(out, &r, &member);
            return;
        }
        // Checks that come before any key derivation.
        if self.is_locked()
            && let Some(why) = self.refused_while_locked(&r.command)
        {
            out.refuse(
                &r,
                Refusal::Locked,
                why,
                format!("{} refused: vault locked", r.command.name()),
            );
            return;
        }
        if r.command == Command::Unlock && !self.is_locked() {
            out.refuse(
                &r,
                Refusal::Invalid,
                "the vault is not locked",
                "unlock refused: not locked",
            );
            return;
        }
        if let Some(until) = self.throttled_until(&r, out.now) {
            let secs = (until.0 - out.now.0).div_ceil(1000);
            out.refuse(
                &r,
                Refusal::Throttled,
                &format!("too many failed attempts; try again in {secs} s"),
                "throttled",
            );
            return;
        }
        match r.totp {
            Totp::Missing | Totp::Invalid => {
                out.refuse(
                    &r,
                    Refusal::WrongTotp,
                    "wrong TOTP code",
                    "wrong or missing TOTP code",
                );
                self.fail(out, &r);
                return;
            }
            Totp::Valid { step } => {
                if member.last_totp_step.is_some_and(|last| step <= last) {
                    out.refuse(
                        &r,
                        Refusal::TotpReplayed,
                        "this TOTP code was already used; wait for the next one",
                        "TOTP code replayed",
                    );
                    self.fail(out, &r);
                    return;
                }
                // Consumed now, whatever the password turns out to be.
                if let Some(m) = self.p.members.get_mut(&r.member) {
                    m.last_totp_step = Some(step);
                }
                out.effects.push(Effect::Persist);
            }
        }
        if !r.password {
            out.refuse(
                &r,
                Refusal::WrongPassword,
                "a password is required",
                "no password given",
            );
            self.fail(out, &r);
            return;
        }
        if let Command::Invite { name, .. } = &r.command
            && self.p.members.contains_key(name)
        {
            out.refuse(
                &r,
                Refusal::Invalid,
                &format!("{name} is already a member"),
                format!("invite {name}"),
            );
            return;
        }
        // Two invitations for one name would leave the first temporary
        // keyslot behind, unknown to anyone: one at a time.
        if let Command::Invite { name, .. } = &r.command
            && self
                .pending
                .values()
                .any(|p| matches!(&p.request.command, Command::Invite { name: n, .. } if n == name))
        {
            out.refuse(
                &r,
                Refusal::Invalid,
                &format!("an invitation for {name} is being made right now: once it is made, cancel it (`coffre member cancel-invitation {name}`) or wait until it is used or expires"),
                format!("invite {name}: another one in progress"),
            );
            return;
        }
        let mut keep_key = r.command.uses_key()
            || (r.command == Command::Enter
                && matches!(self.phase, Phase::Closed | Phase::Closing));
        if let Command::Approve { id } = &r.command {
            self.expire_proposals(out);
            match self.proposal_by_id(id) {
                None => {
                    out.refuse(
                        &r,
                        Refusal::Invalid,
                        &format!("no pending proposal {id} (carried out, expired, superseded or cancelled: see `coffre proposal list`)"),
                        format!("approve {id}: no such proposal"),
                    );
                    return;
                }
                // The approval that reaches the quorum makes the
                // invitation's keyslot with its own key; wiped otherwise.
                Some(p) => keep_key = matches!(p.change, Change::InviteSuperuser { .. }),
            }
        }
        out.effects.push(Effect::CheckPassword {
            req: r.req,
            member: member.name.clone(),
            keyslot: member.keyslot,
            keep_key,
        });
        self.pending.insert(
            r.req,
            Pending {
                request: r,
                keep_key,
            },
        );
    }

    fn session_command(&mut self, out: &mut Out, r: &Request, member: &Member) {
        let session = match &r.command {
            Command::Leave { session }
            | Command::Heartbeat { session }
            | Command::TaskAdd { session, .. }
            | Command::TaskCancel { session, .. } => *session,
            _ => unreachable!("password commands are handled elsewhere"),
        };
        if self
            .sessions
            .get(&session)
            .is_none_or(|s| s.member != r.member)
        {
            out.refuse(
                r,
                Refusal::NoSession,
                "no such session: enter first",
                "no live session",
            );
            return;
        }
        match &r.command {
            Command::Leave { session } => {
                self.sessions.remove(session);
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "leave",
                    "ok",
                    format!("session {} ended", session.0),
                );
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            Command::Heartbeat { session } => {
                if let Some(s) = self.sessions.get_mut(session) {
                    s.last_seen = out.now;
                }
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            Command::TaskAdd {
                name,
                claimed_owner,
                duration_ms,
                workload,
                ..
            } => {
                if claimed_owner.as_ref().is_some_and(|c| c != &r.member) {
                    out.refuse(
                        r,
                        Refusal::NotPermitted,
                        "task_user must be yourself",
                        format!("claimed owner {claimed_owner:?}"),
                    );
                    return;
                }
                let max = self.p.policy.task_max_ms;
                if *duration_ms == 0 || *duration_ms > max {
                    out.refuse(
                        r,
                        Refusal::Invalid,
                        &format!("task duration must be between 1 ms and {} s", max / 1000),
                        format!("duration {duration_ms} ms"),
                    );
                    return;
                }
                if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                    out.refuse(
                        r,
                        Refusal::Invalid,
                        "task names are 1 to 128 printable characters",
                        "bad task name",
                    );
                    return;
                }
                let id = TaskId(self.next_task);
                self.next_task += 1;
                let expires = out.now.plus(*duration_ms);
                self.tasks.insert(
                    id,
                    Task {
                        id,
                        name: name.clone(),
                        owner: member.name.clone(),
                        created: out.now,
                        expires,
                        workload: workload.clone(),
                    },
                );
                let bound = workload
                    .as_ref()
                    .map(|w| format!(" or until workload {w} ends"))
                    .unwrap_or_default();
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "task_add",
                    "ok",
                    format!("task {} {name:?} until {}{bound}", id.0, expires.0),
                );
                out.reply(r.req, Outcome::Ok(Reply::TaskAdded { task: id, expires }));
            }
            Command::TaskCancel { task, .. } => {
                let Some(t) = self.tasks.get(task) else {
                    out.refuse(
                        r,
                        Refusal::NoTask,
                        "no such task",
                        format!("task {}", task.0),
                    );
                    return;
                };
                if t.owner != r.member && member.role != Role::Superuser {
                    out.refuse(
                        r,
                        Refusal::NotPermitted,
                        "only the task's owner or a superuser can cancel it",
                        format!("task {} of {}", task.0, t.owner),
                    );
                    return;
                }
                self.tasks.remove(task);
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "task_cancel",
                    "ok",
                    format!("task {}", task.0),
                );
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            _ => unreachable!(),
        }
    }

    fn password_checked(&mut self, out: &mut Out, req: ReqId, ok: bool) {
        let Some(Pending {
            request: r,
            keep_key,
        }) = self.pending.remove(&req)
        else {
            if ok {
                out.effects.push(Effect::DiscardKey { req });
            }
            return;
        };
        if !ok {
            out.refuse(
                &r,
                Refusal::WrongPassword,
                "wrong password",
                "keyslot did not open",
            );
            self.fail(out, &r);
            return;
        }
        for key in [format!("m:{}", r.member), format!("s:{}", r.source.addr)] {
            self.throttle.remove(&key);
        }
        // The member may have been removed while their key was derived.
        let Some(member) = self.p.members.get(&r.member).cloned() else {
            if keep_key {
                out.effects.push(Effect::DiscardKey { req });
            }
            out.refuse(
                &r,
                Refusal::UnknownMember,
                "this certificate belongs to no member of the vault",
                "member removed during the check",
            );
            return;
        };
        // A lock may have landed while the key was derived: the check
        // ends in a refusal and its key is wiped at once.
        if self.is_locked()
            && let Some(why) = self.refused_while_locked(&r.command)
        {
            if keep_key {
                out.effects.push(Effect::DiscardKey { req });
            }
            out.refuse(
                &r,
                Refusal::Locked,
                why,
                "locked while the password was checked",
            );
            return;
        }
        match r.command.clone() {
            Command::Enter => self.enter(out, &r, keep_key),
            Command::Lock { reason } => {
                if self.is_locked() {
                    out.audit(&r.member, Some(&r.source), "lock", "ok", "already locked");
                } else {
                    self.lock(out, &r.member, &reason);
                }
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            Command::Unlock => self.unlock(out, &r),
            Command::SetMode { mode } => {
                // What holds now stays in force until the next close.
                self.p.mode_in_force = Some(self.mode_in_force());
                self.p.mode = Some(mode);
                out.effects.push(Effect::Persist);
                let word = format!("{mode:?}").to_lowercase();
                let detail = if mode == self.mode_in_force() {
                    format!("{word} (in force)")
                } else {
                    format!("{word} (takes effect at the next close)")
                };
                out.audit(&r.member, Some(&r.source), "mode", "ok", detail);
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            Command::SetQuorum { quorum } => {
                if let Err(why) = self.check_quorum(quorum) {
                    out.refuse(&r, Refusal::Invalid, &why, format!("quorum {quorum}"));
                    return;
                }
                if self.quorum() > 1 {
                    self.propose(out, &r, Change::Quorum { quorum });
                } else {
                    self.apply_quorum(out, &r, quorum);
                }
            }
            Command::MemberRemove { name }
                if self.quorum() > 1
                    && self
                        .p
                        .members
                        .get(&name)
                        .is_some_and(|m| m.role == Role::Superuser) =>
            {
                if let Err(why) = self.check_remove(&name) {
                    out.refuse(&r, Refusal::Invalid, &why, format!("remove {name}"));
                    return;
                }
                self.propose(out, &r, Change::RemoveSuperuser { name });
            }
            Command::MemberRemove { name } => self.remove_member(out, &r, &member, &name),
            Command::Invite {
                name,
                role: Role::Superuser,
            } if self.quorum() > 1 => {
                out.effects.push(Effect::DiscardKey { req });
                if self.p.members.contains_key(&name) {
                    out.refuse(
                        &r,
                        Refusal::Invalid,
                        &format!("{name} is already a member"),
                        format!("invite {name}"),
                    );
                    return;
                }
                self.propose(out, &r, Change::InviteSuperuser { name });
            }
            Command::Approve { id } => self.approve(out, &r, &id, keep_key),
            Command::InviteCancel { name } => {
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "member_invite_cancel",
                    "ok",
                    name.clone(),
                );
                out.effects.push(Effect::CancelInvitation { req, name });
            }
            Command::Invite { name, role } => {
                if self.p.members.contains_key(&name) {
                    out.effects.push(Effect::DiscardKey { req });
                    out.refuse(
                        &r,
                        Refusal::Invalid,
                        &format!("{name} is already a member"),
                        format!("invite {name}"),
                    );
                    return;
                }
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "member_invite",
                    "ok",
                    format!("{name} as {role:?}").to_lowercase(),
                );
                out.effects.push(Effect::Invite { req, name, role });
            }
            Command::Passwd => {
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "passwd",
                    "ok",
                    format!("keyslot {}", member.keyslot),
                );
                out.effects.push(Effect::ChangePassword {
                    req,
                    member: member.name.clone(),
                    keyslot: member.keyslot,
                });
            }
            Command::Leave { .. }
            | Command::Heartbeat { .. }
            | Command::TaskAdd { .. }
            | Command::TaskCancel { .. } => {
                unreachable!("session commands never wait for a password")
            }
        }
    }

    fn enter(&mut self, out: &mut Out, r: &Request, keep_key: bool) {
        if self.is_locked() {
            if keep_key {
                out.effects.push(Effect::DiscardKey { req: r.req });
            }
            out.refuse(
                r,
                Refusal::Locked,
                "the vault is locked",
                "locked while the password was checked",
            );
            return;
        }
        // Who will provide the key, if the vault is not open?
        let use_key = match self.phase {
            Phase::Open | Phase::Opening => {
                if keep_key {
                    out.effects.push(Effect::DiscardKey { req: r.req });
                }
                None
            }
            Phase::Closed => {
                if !keep_key {
                    out.refuse(
                        r,
                        Refusal::Busy,
                        "the vault closed while you were entering; enter again",
                        "closed during the check",
                    );
                    return;
                }
                Some(r.req)
            }
            Phase::Closing => {
                if keep_key && self.reopen_key.is_none() {
                    self.reopen_key = Some(r.req);
                } else if keep_key {
                    out.effects.push(Effect::DiscardKey { req: r.req });
                } else if self.reopen_key.is_none() {
                    out.refuse(
                        r,
                        Refusal::Busy,
                        "the vault is closing; enter again",
                        "closing during the check",
                    );
                    return;
                }
                None
            }
        };
        let id = SessionId(self.next_session);
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                id,
                member: r.member.clone(),
                source: r.source.clone(),
                since: out.now,
                last_seen: out.now,
            },
        );
        out.audit(
            &r.member,
            Some(&r.source),
            "enter",
            "ok",
            format!("session {} via {}", id.0, r.source.door),
        );
        out.reply(r.req, Outcome::Ok(Reply::Entered { session: id }));
        if let Some(req) = use_key {
            self.phase = Phase::Opening;
            out.audit(
                SYSTEM,
                None,
                "state",
                "opening",
                format!("opened by {}", r.member),
            );
            out.effects.push(Effect::Open { req });
        }
    }

    /// Ends every session `pick` selects: audited as dropped, and the
    /// transport told to disconnect it.
    fn drop_sessions(&mut self, out: &mut Out, why: &str, pick: impl Fn(&Session) -> bool) {
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| pick(s))
            .map(|s| s.id)
            .collect();
        for id in ids {
            if let Some(s) = self.sessions.remove(&id) {
                out.audit(
                    &s.member,
                    Some(&s.source),
                    "leave",
                    "dropped",
                    format!("session {}: {why}", id.0),
                );
                out.effects.push(Effect::DropSession {
                    session: id,
                    member: s.member,
                });
            }
        }
    }

    /// Cancels every task `pick` selects, audited.
    fn cancel_tasks(&mut self, out: &mut Out, why: &str, pick: impl Fn(&Task) -> bool) {
        let ids: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| pick(t))
            .map(|t| t.id)
            .collect();
        for id in ids {
            if let Some(t) = self.tasks.remove(&id) {
                out.audit(
                    &t.owner,
                    None,
                    "task_cancel",
                    "ok",
                    format!("task {}: {why}", id.0),
                );
            }
        }
    }

    fn lock(&mut self, out: &mut Out, by: &str, reason: &str) {
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
        if let Some(req) = self.reopen_key.take() {
            out.effects.push(Effect::DiscardKey { req });
        }
        match self.phase {
            Phase::Open => {
                self.phase = Phase::Closing;
                self.close_forced = true;
                out.audit(SYSTEM, None, "state", "closing", "locked");
                self.close(out, true);
            }
            Phase::Closing if !self.close_forced => {
                self.close_forced = true;
                self.close(out, true);
            }
            // Opening: the close follows the open's completion.
            _ => {}
        }
    }

    fn unlock(&mut self, out: &mut Out, r: &Request) {
        if !self.is_locked() {
            out.refuse(r, Refusal::Invalid, "the vault is not locked", "not locked");
            return;
        }
        if self.phase != Phase::Closed {
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
    fn expire_proposals(&mut self, out: &mut Out) {
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
    fn quorum(&self) -> u32 {
        self.p.policy.unlock_quorum.max(1)
    }

    fn proposal_by_id(&self, id: &str) -> Option<&PendingProposal> {
        self.proposals.values().find(|p| p.id == id)
    }

    fn check_quorum(&self, quorum: u32) -> Result<(), String> {
        let supers = self.superusers();
        if quorum == 0 || quorum as usize > supers {
            return Err(format!(
                "the unlock quorum must be between 1 and the number of superusers ({supers})"
            ));
        }
        Ok(())
    }

    fn check_remove(&self, name: &str) -> Result<(), String> {
        let Some(target) = self.p.members.get(name) else {
            return Err("no such member".into());
        };
        if target.role == Role::Superuser {
            let after = self.superusers() - 1;
            if after == 0 || (after as u64) < u64::from(self.p.policy.unlock_quorum) {
                return Err(format!(
                    "removing {name} would leave {after} superuser(s), fewer than the unlock quorum ({}); lower the quorum first",
                    self.p.policy.unlock_quorum
                ));
            }
        }
        Ok(())
    }

    fn apply_quorum(&mut self, out: &mut Out, r: &Request, quorum: u32) {
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
    fn propose(&mut self, out: &mut Out, r: &Request, change: Change) {
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
    fn approve(&mut self, out: &mut Out, r: &Request, id: &str, keep_key: bool) {
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

    fn remove_member(&mut self, out: &mut Out, r: &Request, _by: &Member, name: &str) {
        let Some(target) = self.p.members.get(name).cloned() else {
            out.refuse(
                r,
                Refusal::Invalid,
                "no such member",
                format!("remove {name}"),
            );
            return;
        };
        if let Err(why) = self.check_remove(name) {
            out.refuse(r, Refusal::Invalid, &why, format!("remove {name}"));
            return;
        }
        self.p.members.remove(name);
        self.approvals.remove(name);
        out.effects.push(Effect::RemoveMember {
            name: name.to_string(),
            keyslot: target.keyslot,
        });
        out.effects.push(Effect::Persist);
        out.audit(
            &r.member,
            Some(&r.source),
            "member_remove",
            "ok",
            name.to_string(),
        );
        self.drop_sessions(out, "ended: member removed", |s| s.member == name);
        self.cancel_tasks(out, "cancelled: owner removed", |t| t.owner == name);
        out.reply(r.req, Outcome::Ok(Reply::Done));
    }

    fn member_joined(&mut self, out: &mut Out, member: Member) {
        if self.is_locked() {
            out.audit(
                &member.name,
                None,
                "member_join",
                "refused:locked",
                format!(
                    "{}: the vault is locked; keyslot {} must be wiped",
                    member.name, member.keyslot
                ),
            );
            return;
        }
        let clash = self
            .p
            .members
            .values()
            .any(|m| m.keyslot == member.keyslot && m.name != member.name);
        if clash || self.p.members.contains_key(&member.name) {
            out.audit(
                SYSTEM,
                None,
                "member_join",
                "failed",
                format!(
                    "{}: name or keyslot {} already used",
                    member.name, member.keyslot
                ),
            );
            return;
        }
        out.audit(
            &member.name,
            None,
            "member_join",
            "ok",
            format!("{:?} with keyslot {}", member.role, member.keyslot).to_lowercase(),
        );
        self.p.members.insert(member.name.clone(), member);
        out.effects.push(Effect::Persist);
    }

    fn opened(&mut self, out: &mut Out, ok: bool, detail: &str) {
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

    fn closed(&mut self, out: &mut Out, ok: bool, detail: &str) {
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

    fn workload_ended(&mut self, out: &mut Out, name: &str) {
        let ended: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.workload.as_deref() == Some(name))
            .map(|t| t.id)
            .collect();
        for id in ended {
            if let Some(t) = self.tasks.remove(&id) {
                out.audit(
                    &t.owner,
                    None,
                    "task_end",
                    "ok",
                    format!("task {} {:?}: workload {name} ended", id.0, t.name),
                );
            }
        }
    }

    fn tick(&mut self, out: &mut Out) {
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
    fn reevaluate(&mut self, out: &mut Out) {
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

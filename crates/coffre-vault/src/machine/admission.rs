//! Admission: who may ask what, and when. Every request passes here first:
//! membership and role, what a lock refuses, throttling of failed attempts
//! (per member and per source) and the auto-lock they lead to, the TOTP
//! replay rule, then the password check and the dispatch of what it let in.

use super::{Out, Pending, SYSTEM, ThrottleKey, Vault};
use crate::model::*;

impl Vault {
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
            Command::Account { .. } => Some(
                "the vault is locked: accounts (SSH keys, workload passwords) cannot change until it is unlocked",
            ),
            Command::Approve { .. } => Some(
                "the vault is locked: proposals were cancelled by the lock; propose again once it is unlocked",
            ),
            Command::SetRole { .. } => {
                Some("the vault is locked: roles cannot change until it is unlocked")
            }
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

    /// The command of a request waiting for its password check: the shell
    /// asks the organisation's directory what it needs (superusers_group
    /// or not, an invitee's name) before the keyslot.
    pub fn pending_command(&self, req: ReqId) -> Option<&Command> {
        self.pending.get(&req).map(|p| &p.request.command)
    }

    /// The organisation's directory refused a request waiting for its
    /// check. A refusal reads as a wrong password (one message whichever
    /// check refused: the audit log has the detail) and counts as a
    /// failed attempt; an unreachable directory is refused as busy and
    /// does not count (nobody guessed anything).
    pub(super) fn source_refused(
        &mut self,
        out: &mut Out,
        req: ReqId,
        unreachable: bool,
        detail: &str,
    ) {
        let Some(Pending {
            request: r,
            keep_key,
            ..
        }) = self.pending.remove(&req)
        else {
            return;
        };
        if keep_key {
            out.effects.push(Effect::DiscardKey { req });
        }
        if unreachable {
            out.refuse(
                &r,
                Refusal::Busy,
                "the organisation's directory cannot be reached, so nobody can enter or change anything now (members inside stay for a while); try again later",
                format!("the organisation's directory: {detail}"),
            );
            return;
        }
        out.refuse(
            &r,
            Refusal::WrongPassword,
            "wrong password",
            format!("the organisation's directory: {detail}"),
        );
        self.fail(out, &r);
    }

    pub(super) fn throttled_until(&self, r: &Request, now: Millis) -> Option<Millis> {
        ThrottleKey::of(r)
            .iter()
            .filter_map(|k| self.throttle.get(k))
            .map(|(_, until)| *until)
            .filter(|until| *until > now)
            .max()
    }

    pub(super) fn fail(&mut self, out: &mut Out, r: &Request) {
        let now = out.now;
        let pol = &self.p.policy;
        for key in ThrottleKey::of(r) {
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

    pub(super) fn request(&mut self, out: &mut Out, r: Request) {
        let Some(member) = self.p.members.get(&r.member).cloned() else {
            out.refuse(
                &r,
                Refusal::UnknownMember,
                "this certificate belongs to no member of the vault",
                "unknown or removed member",
            );
            // A scheduler naming a member who left is not an attack on
            // anyone's password: it never counts towards the auto-lock.
            if r.source.door != Door::Bus {
                self.fail(out, &r);
            }
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
        let op = match r.command.needs() {
            Needs::Session(session, op) => {
                self.session_command(out, &r, &member, session, op);
                return;
            }
            Needs::Scheduled(op) => {
                self.scheduled_command(out, &r, op);
                return;
            }
            Needs::Password(op) => op,
        };
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
                && matches!(self.phase(), Phase::Closed | Phase::Closing));
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
                op,
                keep_key,
            },
        );
    }

    pub(super) fn password_checked(&mut self, out: &mut Out, req: ReqId, ok: bool) {
        let Some(Pending {
            request: r,
            op,
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
        for key in ThrottleKey::of(&r) {
            self.throttle.remove(&key);
        }
        // The member may have been removed while their key was derived.
        let Some(member) = self.p.members.get(&r.member).cloned() else {
            refuse_checked(
                out,
                (&r, keep_key),
                Refusal::UnknownMember,
                "this certificate belongs to no member of the vault",
                "member removed during the check",
            );
            return;
        };
        // Made a member while the key was derived: a superuser's command
        // is no longer theirs to give.
        if r.command.superuser_only() && member.role != Role::Superuser {
            refuse_checked(
                out,
                (&r, keep_key),
                Refusal::NotPermitted,
                "this needs a superuser",
                "no longer a superuser when the password was checked",
            );
            return;
        }
        // A lock may have landed while the key was derived: the check
        // ends in a refusal and its key is wiped at once.
        if self.is_locked()
            && let Some(why) = self.refused_while_locked(&r.command)
        {
            refuse_checked(
                out,
                (&r, keep_key),
                Refusal::Locked,
                why,
                "locked while the password was checked",
            );
            return;
        }
        match op {
            PasswordOp::Enter => self.enter(out, &r, keep_key),
            PasswordOp::Lock { reason } => {
                if self.is_locked() {
                    out.audit(&r.member, Some(&r.source), "lock", "ok", "already locked");
                } else {
                    self.lock(out, &r.member, &reason);
                }
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            PasswordOp::Unlock => self.unlock(out, &r),
            PasswordOp::SetMode { mode } => {
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
            PasswordOp::SetQuorum { quorum } => {
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
            PasswordOp::MemberRemove { name }
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
            PasswordOp::MemberRemove { name } => self.remove_member(out, &r, &member, &name),
            PasswordOp::SetRole { name, role } => {
                if let Err(why) = self.check_role(&name, role) {
                    out.refuse(&r, Refusal::Invalid, &why, format!("role of {name}"));
                    return;
                }
                if self.quorum() > 1 {
                    let change = match role {
                        Role::Superuser => Change::Promote { name },
                        Role::Member => Change::Demote { name },
                    };
                    self.propose(out, &r, change);
                } else {
                    self.set_role(out, &r, &name, role);
                }
            }
            PasswordOp::Invite {
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
            PasswordOp::Approve { id } => self.approve(out, &r, &id, keep_key),
            PasswordOp::InviteCancel { name } => {
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "member_invite_cancel",
                    "ok",
                    name.clone(),
                );
                out.effects.push(Effect::CancelInvitation { req, name });
            }
            PasswordOp::Invite { name, role } => {
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
            PasswordOp::Account { change } => {
                // Audited by the shell, which knows whether it could.
                out.effects.push(Effect::ChangeAccount {
                    req,
                    member: member.name.clone(),
                    change,
                });
            }
            PasswordOp::Passwd => {
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
        }
    }
}

/// A password check that ends refused after all (the member removed, made
/// a member, or the vault locked while the key was derived): the key it
/// gave, if kept for the command, is wiped at once.
fn refuse_checked(
    out: &mut Out,
    (r, keep_key): (&Request, bool),
    refusal: Refusal,
    message: &str,
    detail: &str,
) {
    if keep_key {
        out.effects.push(Effect::DiscardKey { req: r.req });
    }
    out.refuse(r, refusal, message, detail);
}

//! Members: who counts as a superuser, removing a member and changing a
//! role (and what the quorum forbids), and a member joining after an
//! invitation.

use super::{Out, SYSTEM, Vault};
use crate::model::*;

impl Vault {
    pub(super) fn superusers(&self) -> usize {
        self.p
            .members
            .values()
            .filter(|m| m.role == Role::Superuser)
            .count()
    }

    pub(super) fn check_remove(&self, name: &str) -> Result<(), String> {
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

    /// Whether `name` may be given `role` now: a member who has another
    /// role, and a superuser made a member only if enough remain for the
    /// unlock quorum (as for a removal).
    pub(super) fn check_role(&self, name: &str, role: Role) -> Result<(), String> {
        let Some(target) = self.p.members.get(name) else {
            return Err(format!("{name} is not a member"));
        };
        if target.role == role {
            return Err(match role {
                Role::Superuser => format!("{name} is already a superuser"),
                Role::Member => format!("{name} is not a superuser"),
            });
        }
        if role == Role::Member {
            let after = self.superusers() - 1;
            if after == 0 || (after as u64) < u64::from(self.p.policy.unlock_quorum) {
                return Err(format!(
                    "making {name} a member would leave {after} superuser(s), fewer than the unlock quorum ({}); lower the quorum first",
                    self.p.policy.unlock_quorum
                ));
            }
        }
        Ok(())
    }

    /// Gives `name` `role` (checked again: a proposal's approval may come
    /// after the members changed). A superuser made a member keeps their
    /// sessions and tasks; their approvals (an unlock's, a proposal's) no
    /// longer count.
    pub(super) fn set_role(&mut self, out: &mut Out, r: &Request, name: &str, role: Role) {
        if let Err(why) = self.check_role(name, role) {
            out.refuse(r, Refusal::Invalid, &why, format!("role of {name}"));
            return;
        }
        let Some(m) = self.p.members.get_mut(name) else {
            return;
        };
        m.role = role;
        out.effects.push(Effect::Persist);
        let word = match role {
            Role::Superuser => "superuser",
            Role::Member => "member",
        };
        out.audit(
            &r.member,
            Some(&r.source),
            "member_role",
            "ok",
            format!("{name}: {word}"),
        );
        if role == Role::Member {
            self.withdraw_approvals(out, name, "no longer a superuser");
        }
        out.reply(r.req, Outcome::Ok(Reply::Done));
    }

    pub(super) fn remove_member(&mut self, out: &mut Out, r: &Request, _by: &Member, name: &str) {
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
        // A proposal about them is about nobody now (and must not become
        // about a newcomer given the same name).
        let about: Vec<&'static str> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.change.member() == Some(name))
            .map(|(k, _)| *k)
            .collect();
        for kind in about {
            if let Some(p) = self.proposals.remove(kind) {
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "proposal",
                    "cancelled",
                    format!(
                        "{}: {}: cancelled, {name} was removed",
                        p.id,
                        p.change.describe()
                    ),
                );
            }
        }
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

    /// `name` no longer qualifies in the organisation's directory: their
    /// sessions end, their tasks are cancelled, and their approvals (an
    /// unlock's, a proposal's) no longer count. They stay a member (their
    /// keyslot is untouched): enter refuses them until the directory
    /// qualifies them again, and a superuser may remove them.
    pub(super) fn disqualified(&mut self, out: &mut Out, name: &str, reason: &str) {
        if !self.p.members.contains_key(name) {
            return;
        }
        out.audit(
            SYSTEM,
            None,
            "member_disqualified",
            "ok",
            format!("{name}: {reason}"),
        );
        let why = format!("ended: {name} no longer qualifies in the organisation's directory");
        self.drop_sessions(out, &why, |s| s.member == name);
        self.cancel_tasks(
            out,
            "cancelled: owner no longer qualifies in the organisation's directory",
            |t| t.owner == name,
        );
        self.withdraw_approvals(out, name, reason);
    }

    /// `name`'s approvals no longer count (audited when there were some).
    pub(super) fn withdraw_approvals(&mut self, out: &mut Out, name: &str, reason: &str) {
        if !self.has_approvals(name) {
            return;
        }
        self.approvals.remove(name);
        for p in self.proposals.values_mut() {
            p.approvals.remove(name);
        }
        out.audit(
            SYSTEM,
            None,
            "approvals_withdrawn",
            "ok",
            format!("{name}: {reason}"),
        );
    }

    pub(super) fn member_joined(&mut self, out: &mut Out, member: Member) {
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
}

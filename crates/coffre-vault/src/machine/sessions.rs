//! Sessions and tasks: entering (and who provides the key that opens),
//! heartbeats, leaving, scheduled tasks, and dropping or cancelling them.

use super::{Out, Phase, SYSTEM, Stage, Vault};
use crate::model::*;

impl Vault {
    pub(super) fn session_command(
        &mut self,
        out: &mut Out,
        r: &Request,
        member: &Member,
        session: SessionId,
        op: SessionOp,
    ) {
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
        let session = &session;
        match &op {
            SessionOp::Leave => {
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
            SessionOp::Heartbeat => {
                if let Some(s) = self.sessions.get_mut(session) {
                    s.last_seen = out.now;
                }
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
            SessionOp::TaskAdd {
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
                if let Err((message, detail)) = self.check_task(name, *duration_ms) {
                    out.refuse(r, Refusal::Invalid, &message, detail);
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
                        by: None,
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
            SessionOp::TaskCancel { task } => {
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
        }
    }

    /// A task's name and duration, as every door checks them.
    fn check_task(&self, name: &str, duration_ms: u64) -> Result<(), (String, String)> {
        let max = self.p.policy.task_max_ms;
        if duration_ms == 0 || duration_ms > max {
            return Err((
                format!("task duration must be between 1 ms and {} s", max / 1000),
                format!("duration {duration_ms} ms"),
            ));
        }
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err((
                "task names are 1 to 128 printable characters".into(),
                "bad task name".into(),
            ));
        }
        Ok(())
    }

    /// A scheduler's command (over the bus, for `r.member`).
    ///
    /// A scheduler holds at most [`MAX_TASKS_PER_SCHEDULER`] tasks.
    pub(super) fn scheduled_command(&mut self, out: &mut Out, r: &Request, op: ScheduledOp) {
        match op {
            ScheduledOp::TaskAdd {
                by,
                name,
                duration_ms,
            } => {
                if self.is_locked() {
                    out.refuse(
                        r,
                        Refusal::Locked,
                        "the vault is locked",
                        format!("by {by}"),
                    );
                    return;
                }
                if self.phase() != Phase::Open {
                    out.refuse(
                        r,
                        Refusal::Busy,
                        "the vault is not open: a scheduler keeps it open while it is, it never opens it (only a member's password can)",
                        format!("by {by}: the vault is {:?}", self.phase()),
                    );
                    return;
                }
                if let Err((message, detail)) = self.check_task(&name, duration_ms) {
                    out.refuse(r, Refusal::Invalid, &message, format!("by {by}: {detail}"));
                    return;
                }
                let held = self
                    .tasks
                    .values()
                    .filter(|t| t.by.as_deref() == Some(by.as_str()))
                    .count();
                if held >= MAX_TASKS_PER_SCHEDULER {
                    out.refuse(
                        r,
                        Refusal::Busy,
                        &format!("a scheduler holds {MAX_TASKS_PER_SCHEDULER} tasks at most"),
                        format!("by {by}: {held} tasks"),
                    );
                    return;
                }
                let id = TaskId(self.next_task);
                self.next_task += 1;
                let expires = out.now.plus(duration_ms);
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "task_add",
                    "ok",
                    format!(
                        "task {} {name:?} until {}, added by {by} for {}",
                        id.0, expires.0, r.member
                    ),
                );
                self.tasks.insert(
                    id,
                    Task {
                        id,
                        name,
                        owner: r.member.clone(),
                        created: out.now,
                        expires,
                        workload: None,
                        by: Some(by),
                    },
                );
                out.reply(r.req, Outcome::Ok(Reply::TaskAdded { task: id, expires }));
            }
            ScheduledOp::TaskCancel { by, task } => {
                if self
                    .tasks
                    .get(&task)
                    .is_none_or(|t| t.by.as_deref() != Some(by.as_str()) || t.owner != r.member)
                {
                    out.refuse(
                        r,
                        Refusal::NoTask,
                        "no such task of this scheduler",
                        format!("task {} by {by}", task.0),
                    );
                    return;
                }
                self.tasks.remove(&task);
                out.audit(
                    &r.member,
                    Some(&r.source),
                    "task_cancel",
                    "ok",
                    format!("task {}, by {by}", task.0),
                );
                out.reply(r.req, Outcome::Ok(Reply::Done));
            }
        }
    }

    pub(super) fn enter(&mut self, out: &mut Out, r: &Request, keep_key: bool) {
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
        let use_key = match &mut self.phase {
            Stage::Open | Stage::Opening => {
                if keep_key {
                    out.effects.push(Effect::DiscardKey { req: r.req });
                }
                None
            }
            Stage::Closed => {
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
            Stage::Closing { reopen, .. } => {
                if keep_key && reopen.is_none() {
                    *reopen = Some(r.req);
                } else if keep_key {
                    out.effects.push(Effect::DiscardKey { req: r.req });
                } else if reopen.is_none() {
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
            self.phase = Stage::Opening;
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
    pub(super) fn drop_sessions(
        &mut self,
        out: &mut Out,
        why: &str,
        pick: impl Fn(&Session) -> bool,
    ) {
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
    pub(super) fn cancel_tasks(&mut self, out: &mut Out, why: &str, pick: impl Fn(&Task) -> bool) {
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

    pub(super) fn workload_ended(&mut self, out: &mut Out, name: &str) {
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
}

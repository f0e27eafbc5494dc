//! What the shell writes to the audit log, and "no audit, no action": records
//! wait in a backlog while the log cannot be written, and only what reduces
//! exposure goes on meanwhile.

use super::*;

/// The audit log and the records that could not be written yet (in
/// order), with why the log fails: while it does, nothing that changes
/// the vault is accepted but what reduces exposure, whose records wait
/// here.
pub(super) struct AuditSink {
    pub(super) log: AuditLog,
    pub(super) backlog: VecDeque<AuditRecord>,
    pub(super) error: Option<String>,
}

impl AuditSink {
    pub(super) fn new(log: AuditLog) -> Self {
        Self {
            log,
            backlog: VecDeque::new(),
            error: None,
        }
    }
}

/// An audit record in the daemon's log, at the level its result says.
/// Every field is one line: control characters are escaped (`\n`), since
/// some come from outside (a join's name, a lock's reason) and a newline
/// would start a forged journal entry with a priority of its choosing.
fn log_record(rec: &AuditRecord) {
    use crate::log::one_line;
    use tracing::Level;
    let (action, result, actor, detail) = (
        one_line(&rec.action),
        one_line(&rec.result),
        one_line(&rec.actor),
        one_line(&rec.detail),
    );
    match crate::log::level_of(&result) {
        Level::ERROR => tracing::error!(%action, %result, %actor, "{detail}"),
        Level::WARN => tracing::warn!(%action, %result, %actor, "{detail}"),
        _ => tracing::info!(%action, %result, %actor, "{detail}"),
    }
}

impl Shell {
    /// Appends a record, after any that wait. A failure keeps it (and the
    /// ones after it) for the next try, at every tick.
    pub(super) fn record(&mut self, rec: AuditRecord) {
        self.metrics.on_record(&rec);
        log_record(&rec);
        self.audit.backlog.push_back(rec);
        self.flush_audit();
    }

    pub(super) fn flush_audit(&mut self) {
        while let Some(rec) = self.audit.backlog.front().cloned() {
            let before = self.audit.log.len();
            match self.audit.log.append(rec) {
                Ok(_) => {
                    self.audit.backlog.pop_front();
                }
                Err(e) => {
                    // Its line may be in the log already (the sync or the
                    // head failed after it): never written twice.
                    if self.audit.log.len() > before {
                        self.audit.backlog.pop_front();
                    }
                    if self.audit.error.is_none() {
                        tracing::error!("cannot append to the audit log: {e}");
                    }
                    self.audit.error = Some(e.to_string());
                    return;
                }
            }
        }
        if self.audit.error.take().is_some() {
            tracing::info!("the audit log can be written again");
        }
    }

    /// "No audit, no action": while the log cannot be written, only what
    /// reduces exposure (lock, leave, heartbeats, ending a task) goes on.
    pub(super) fn refused_for_audit(&self, command: &Command) -> Option<Answer> {
        let why = self.audit.error.as_ref()?;
        if matches!(
            command,
            Command::Lock { .. }
                | Command::Leave { .. }
                | Command::Heartbeat { .. }
                | Command::TaskCancel { .. }
                | Command::ScheduledTaskCancel { .. }
        ) {
            return None;
        }
        Some((
            503,
            error_json(
                ErrorCode::AuditUnavailable,
                format!(
                    "the audit log cannot be written ({why}): nothing that changes the vault is done until it can; lock and leave still work"
                ),
            ),
        ))
    }

    pub(super) fn system_audit(&mut self, action: &str, result: &str, detail: String) {
        let rec = AuditRecord {
            at: now_ms(),
            actor: "coffre".into(),
            source: None,
            action: action.into(),
            result: result.into(),
            detail,
        };
        self.record(rec);
    }

    pub(super) fn workload_audit(&mut self, lines: Vec<coffre_workload::Line>) {
        for (action, result, detail) in lines {
            self.system_audit(&action, &result, detail);
        }
    }
}

//! The organisation's directory as the source of who may be a member
//! (`[directory]` in config.toml; issue 16, part 2; docs/directory.md).
//!
//! The daemon asks it, through [`coffre_source::Directory`], off the actor:
//!
//! - **around every keyslot check** (enter by either door, and every other
//!   command with a password): after the core's throttle and TOTP checks,
//!   the account is looked up through the service account (it exists, is
//!   in `members_group`, and `superusers_group` for superusers' commands,
//!   and is not disabled); only then is the keyslot tried; only once it
//!   opened, with `check_password`, does the password bind as the account.
//!   The directory never sees a guess the keyslot refused, so it is never
//!   a guessing oracle and never locks a member's organisation account. A
//!   refusal reads as a wrong password; the audit log has the detail.
//! - **every `recheck_s`** (and soon after each VPN reauthorisation): one
//!   search for every member; whoever inside no longer qualifies is thrown
//!   out ([`coffre_vault::Event::Disqualified`]: sessions and tasks end,
//!   VPN clients are killed), and the vault closes by the usual rule;
//! - **at invite and at join**: the invitee must qualify;
//! - **at passwd**, with `check_password`: the new password must bind.
//!
//! Unreachable, it refuses new entries with a message that says so; members
//! inside stay up to `max_stale_s`. Lock, unlock approvals, removal and
//! invitation cancellation never wait for it: they go on when it cannot be
//! reached (a superuser it disables, when it answers, is refused like
//! anyone).

use super::*;
use coffre_source::{Directory, Found, SourceConfig, SourceError};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// The longest the daemon waits for one question to the directory (its
/// own limits are shorter: this is the floor under them).
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// A member's standing at the last check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// May be a member; `superuser`: may also be a superuser.
    Qualifies { superuser: bool },
    /// May not, and why.
    Refused(String),
}

/// The directory, and what the daemon knows of it.
pub(super) struct SourceState {
    pub(super) config: SourceConfig,
    directory: Arc<dyn Directory>,
    /// Every member's standing at the last check that answered.
    pub(super) verdicts: BTreeMap<String, Verdict>,
    /// When it last answered (the daemon's start until then).
    pub(super) last_ok_ms: u64,
    /// When the last periodic check began.
    pub(super) last_check_ms: Option<u64>,
    /// Since when it has not answered, and why.
    pub(super) failing: Option<(u64, String)>,
    /// A periodic check is under way.
    checking: bool,
    /// A check is wanted at the next tick (a VPN reauthorisation).
    check_soon: bool,
    /// Members inside were thrown out for staleness during this outage.
    stale_done: bool,
    /// Passwords to bind with once their keyslot opened
    /// (`check_password`), by request.
    binds: HashMap<ReqId, PendingBind>,
    /// With `ids = "directory"`: the numbers of members joining, from the
    /// directory, until their account is made.
    pub(super) numbers: BTreeMap<String, (u32, u32)>,
}

/// A `check_password` bind waiting for its keyslot check.
struct PendingBind {
    dn: String,
    password: Zeroizing<String>,
    /// The command goes on when the directory cannot be reached.
    safety: bool,
}

/// What the actor gets back from the directory.
pub(super) enum SourceMsg {
    /// The lookup before a keyslot check.
    Looked {
        req: ReqId,
        member: String,
        keyslot: u32,
        keep_key: bool,
        as_superuser: bool,
        safety: bool,
        password: Option<Zeroizing<String>>,
        result: Result<Option<coffre_source::Account>, SourceError>,
    },
    /// The bind after the keyslot opened.
    Bound {
        req: ReqId,
        result: Result<bool, SourceError>,
    },
    /// The periodic check of every member.
    Checked {
        result: Result<Vec<(String, Found)>, SourceError>,
    },
    /// An invitee's lookup.
    Invitee {
        req: ReqId,
        epoch: u64,
        name: String,
        role: Role,
        result: Result<Option<coffre_source::Account>, SourceError>,
    },
    /// A new password's bind (passwd with `check_password`).
    NewPassword {
        req: ReqId,
        epoch: u64,
        member: String,
        keyslot: u32,
        result: Result<bool, SourceError>,
    },
    /// A joining member's lookup.
    Joiner {
        join: Box<PendingJoin>,
        result: Result<Option<coffre_source::Account>, SourceError>,
    },
}

/// A join waiting for the directory's word on the name.
pub(super) struct PendingJoin {
    pub(super) name: String,
    pub(super) code_hex: Zeroizing<String>,
    pub(super) csr: String,
    pub(super) password: Zeroizing<String>,
    pub(super) addr: SocketAddr,
}

/// Commands that never wait for the directory: they reduce what is exposed
/// (a lock, a removal, an invitation cancelled) or restore what a lock took
/// (the quorum's approvals). When it cannot be reached they go on; when it
/// answers, its refusal counts as for any other command.
fn is_safety(command: Option<&Command>) -> bool {
    matches!(
        command,
        Some(
            Command::Lock { .. }
                | Command::Unlock
                | Command::Approve { .. }
                | Command::MemberRemove { .. }
                | Command::InviteCancel { .. }
        )
    )
}

/// Whether a failure is the directory not answering (as opposed to its
/// answer refusing the name: several accounts with it).
fn is_down(e: &SourceError) -> bool {
    !matches!(e, SourceError::Ambiguous { .. })
}

/// Why `found` may not be a member (or superuser), in words.
fn refusal(found: Option<&coffre_source::Account>, as_superuser: bool) -> Option<String> {
    match found {
        None => Some(coffre_source::Refusal::NoAccount.to_string()),
        Some(a) => a.refusal(as_superuser).map(|r| r.to_string()),
    }
}

async fn ask<T>(
    f: impl std::future::Future<Output = Result<T, SourceError>>,
    url: &str,
) -> Result<T, SourceError> {
    match tokio::time::timeout(ASK_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(SourceError::Unreachable {
            url: url.to_string(),
            reason: format!("no answer within {} s", ASK_TIMEOUT.as_secs()),
        }),
    }
}

impl SourceState {
    /// The directory `config` names, reading the service account's
    /// password (and CA) from the vault directory.
    pub(super) fn new(config: &SourceConfig, dir: &Path) -> Result<Self, String> {
        let directory =
            coffre_source::LdapDirectory::new(config.clone(), dir).map_err(|e| e.to_string())?;
        Ok(Self::with(config.clone(), Arc::new(directory)))
    }

    pub(super) fn with(config: SourceConfig, directory: Arc<dyn Directory>) -> Self {
        SourceState {
            config,
            directory,
            verdicts: BTreeMap::new(),
            last_ok_ms: coffre_sys::time::now_ms(),
            last_check_ms: None,
            failing: None,
            checking: false,
            check_soon: false,
            stale_done: false,
            binds: HashMap::new(),
            numbers: BTreeMap::new(),
        }
    }

    /// The status view.
    pub(super) fn json(&self, now: u64) -> Value {
        let refused: Vec<Value> = self
            .verdicts
            .iter()
            .filter_map(|(n, v)| match v {
                Verdict::Refused(why) => Some(json!({"member": n, "why": why})),
                Verdict::Qualifies { .. } => None,
            })
            .collect();
        json!({
            "url": self.config.url,
            "reachable": self.failing.is_none(),
            "last_answer_s_ago": now.saturating_sub(self.last_ok_ms) / 1000,
            "last_check_s_ago": self.last_check_ms.map(|t| now.saturating_sub(t) / 1000),
            "failing_since_ms": self.failing.as_ref().map(|f| f.0),
            "error": self.failing.as_ref().map(|f| f.1.clone()),
            "recheck_s": self.config.recheck_s,
            "max_stale_s": self.config.max_stale_s,
            "check_password": self.config.check_password,
            "refused": refused,
        })
    }

    /// What `member list` says of `name`.
    pub(super) fn standing(&self, name: &str) -> Value {
        match self.verdicts.get(name) {
            None => json!("unchecked"),
            Some(Verdict::Qualifies { superuser: true }) => json!("qualifies (superuser)"),
            Some(Verdict::Qualifies { superuser: false }) => json!("qualifies"),
            Some(Verdict::Refused(why)) => json!(format!("refused: {why}")),
        }
    }
}

impl Shell {
    /// Sets up the directory, when config.toml has a `[directory]`.
    pub(super) fn source_start(&mut self) -> Result<(), String> {
        if let Some(c) = &self.config.directory {
            let mut src = SourceState::new(c, &self.dir.root)?;
            // Its last word before the restart, until it answers again.
            src.verdicts = self
                .control
                .source_standing
                .iter()
                .map(|(n, s)| {
                    let v = match s {
                        crate::vaultdir::Standing::Qualifies { superuser } => Verdict::Qualifies {
                            superuser: *superuser,
                        },
                        crate::vaultdir::Standing::Refused { why } => Verdict::Refused(why.clone()),
                    };
                    (n.clone(), v)
                })
                .collect();
            self.source = Some(src);
            self.system_audit(
                "directory_source",
                "ok",
                format!(
                    "members must qualify in {} (members_group {}, check_password {}, recheck every {} s)",
                    c.url, c.members_group, c.check_password, c.recheck_s
                ),
            );
        }
        Ok(())
    }

    /// Before a keyslot check (the core's `CheckPassword`): the account is
    /// looked up first, through the service account.
    pub(super) fn source_check(
        &mut self,
        req: ReqId,
        member: String,
        keyslot: u32,
        keep_key: bool,
    ) {
        let Some(src) = &self.source else { return };
        let command = self.vault.pending_command(req);
        let safety = is_safety(command);
        let as_superuser = command.is_some_and(Command::superuser_only);
        // What never waits does not wait for a directory already known not
        // to answer: straight to the keyslot, unless its last answer
        // already refused the member.
        if safety && src.failing.is_some() {
            if let Some(why) = self.last_refusal(&member, as_superuser) {
                self.custody.passwords.remove(&req);
                self.run(Event::SourceRefused {
                    req,
                    unreachable: false,
                    detail: why,
                });
                return;
            }
            let mut queue = VecDeque::new();
            self.check_password(req, member, keyslot, keep_key, &mut queue);
            for e in queue {
                self.run(e);
            }
            return;
        }
        // passwd binds its new password, not the old one (which the
        // directory may already have replaced): source_passwd.
        let binds_old = !matches!(command, Some(Command::Passwd));
        let password = (src.config.check_password && binds_old).then(|| {
            let p = self.custody.passwords.get(&req);
            Zeroizing::new(
                p.map(|p| String::from_utf8_lossy(p.expose()).into_owned())
                    .unwrap_or_default(),
            )
        });
        let directory = src.directory.clone();
        let url = src.config.url.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = ask(directory.lookup(&member), &url).await;
            let _ = tx.send(Msg::Source(Box::new(SourceMsg::Looked {
                req,
                member,
                keyslot,
                keep_key,
                as_superuser,
                safety,
                password,
                result,
            })));
        });
    }

    pub(super) fn source_msg(&mut self, msg: SourceMsg) {
        match msg {
            SourceMsg::Looked {
                req,
                member,
                keyslot,
                keep_key,
                as_superuser,
                safety,
                password,
                result,
            } => self.source_looked(
                req,
                member,
                keyslot,
                keep_key,
                (as_superuser, safety),
                password,
                result,
            ),
            SourceMsg::Bound { req, result } => self.source_bound(req, result),
            SourceMsg::Checked { result } => self.source_checked(result),
            SourceMsg::Invitee {
                req,
                epoch,
                name,
                role,
                result,
            } => {
                if !self.source_locked_meanwhile(req, epoch, "member_invite") {
                    self.source_invitee(req, name, role, result)
                }
            }
            SourceMsg::NewPassword {
                req,
                epoch,
                member,
                keyslot,
                result,
            } => {
                if !self.source_locked_meanwhile(req, epoch, "passwd") {
                    self.source_new_password(req, member, keyslot, result)
                }
            }
            SourceMsg::Joiner { join, result } => self.source_joiner(*join, result),
        }
    }

    /// An invitation or a password change whose key waited for the
    /// directory while the vault was locked (even if unlocked since): the
    /// key goes (a lock already wiped it), nothing is made, and the member
    /// is told. Returns whether it was so.
    fn source_locked_meanwhile(&mut self, req: ReqId, epoch: u64, action: &'static str) -> bool {
        if !self.vault.is_locked() && epoch == self.lock_epoch {
            return false;
        }
        self.custody.kept.remove(&req);
        self.custody.new_passwords.remove(&req);
        self.system_audit(
            action,
            "refused:locked",
            "the vault was locked while the organisation's directory was asked; nothing made"
                .into(),
        );
        self.answer(
            req,
            (
                409,
                error_json(
                    ErrorCode::Locked,
                    "the vault was locked meanwhile: nothing was changed",
                ),
            ),
        );
        true
    }

    /// Notes an answer, or a failure to answer, for the status and the
    /// audit log (one record when it goes down, one when it comes back).
    fn source_health(&mut self, failure: Option<&SourceError>) {
        let now = now_ms().0;
        let Some(src) = self.source.as_mut() else {
            return;
        };
        match failure {
            None => {
                src.last_ok_ms = now;
                src.stale_done = false;
                if let Some((since, _)) = src.failing.take() {
                    let down = now.saturating_sub(since) / 1000;
                    self.system_audit(
                        "directory_source",
                        "ok",
                        format!("the organisation's directory answers again (after {down} s)"),
                    );
                }
            }
            Some(e) if is_down(e) => {
                if src.failing.is_none() {
                    src.failing = Some((now, e.to_string()));
                    self.system_audit(
                        "directory_source",
                        "failed",
                        format!("the organisation's directory does not answer: {e}"),
                    );
                } else if let Some(f) = src.failing.as_mut() {
                    f.1 = e.to_string();
                }
            }
            Some(_) => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn source_looked(
        &mut self,
        req: ReqId,
        member: String,
        keyslot: u32,
        keep_key: bool,
        (as_superuser, safety): (bool, bool),
        password: Option<Zeroizing<String>>,
        result: Result<Option<coffre_source::Account>, SourceError>,
    ) {
        self.source_health(result.as_ref().err());
        // Locked while the directory answered: the keyslot is still checked
        // (an unlock approval needs it), but no key is kept.
        let keep_key = keep_key && !self.vault.is_locked();
        let go_on = |this: &mut Self, bind: Option<PendingBind>| {
            if let (Some(b), Some(src)) = (bind, this.source.as_mut()) {
                src.binds.insert(req, b);
            }
            let mut queue = VecDeque::new();
            this.check_password(req, member.clone(), keyslot, keep_key, &mut queue);
            // Refused before any derivation (no token binds the member any
            // more): no bind will follow.
            if !queue.is_empty()
                && let Some(src) = this.source.as_mut()
            {
                src.binds.remove(&req);
            }
            for e in queue {
                this.run(e);
            }
        };
        let refused = |this: &mut Self, unreachable: bool, detail: String| {
            this.custody.passwords.remove(&req);
            this.run(Event::SourceRefused {
                req,
                unreachable,
                detail,
            });
        };
        match result {
            Ok(found) => match refusal(found.as_ref(), as_superuser) {
                Some(why) => refused(self, false, why),
                None => {
                    let bind = password.zip(found).map(|(password, a)| PendingBind {
                        dn: a.dn,
                        password,
                        safety,
                    });
                    go_on(self, bind);
                }
            },
            Err(e) if !is_down(&e) => refused(self, false, e.to_string()),
            Err(_) if safety => match self.last_refusal(&member, as_superuser) {
                Some(why) => refused(self, false, why),
                None => go_on(self, None),
            },
            Err(e) => refused(self, true, e.to_string()),
        }
    }

    /// After a keyslot check: with `check_password`, an opened keyslot
    /// waits for the bind before the core hears of it.
    pub(super) fn source_after_key(&mut self, req: ReqId, ok: bool) -> bool {
        let Some(src) = self.source.as_mut() else {
            return false;
        };
        let Some(bind) = src.binds.remove(&req) else {
            return false;
        };
        if !ok {
            return false;
        }
        let directory = src.directory.clone();
        let url = src.config.url.clone();
        let tx = self.tx.clone();
        let safety = bind.safety;
        tokio::spawn(async move {
            let result = ask(directory.check_password(&bind.dn, &bind.password), &url).await;
            // Unreachable for a command that never waits: it goes on.
            let result = match result {
                Err(e) if safety && is_down(&e) => Ok(true),
                r => r,
            };
            drop(bind);
            let _ = tx.send(Msg::Source(Box::new(SourceMsg::Bound { req, result })));
        });
        true
    }

    fn source_bound(&mut self, req: ReqId, result: Result<bool, SourceError>) {
        self.source_health(result.as_ref().err());
        let event = match result {
            Ok(true) => Event::PasswordChecked { req, ok: true },
            Ok(false) => Event::SourceRefused {
                req,
                unreachable: false,
                detail: "the password opened the keyslot but does not bind as the directory's account (check_password)".into(),
            },
            Err(e) => Event::SourceRefused {
                req,
                unreachable: is_down(&e),
                detail: e.to_string(),
            },
        };
        self.run(event);
    }

    /// Every tick: the periodic check when it is due, and members inside
    /// thrown out when the directory has been silent too long.
    pub(super) fn source_tick(&mut self) {
        let now = now_ms().0;
        let names: Vec<String> = self.vault.members().keys().cloned().collect();
        let Some(src) = self.source.as_mut() else {
            return;
        };
        let due = src
            .last_check_ms
            .is_none_or(|t| now.saturating_sub(t) >= src.config.recheck_s * 1000);
        if !src.checking && (due || src.check_soon) && !names.is_empty() {
            src.checking = true;
            src.check_soon = false;
            src.last_check_ms = Some(now);
            let directory = src.directory.clone();
            let url = src.config.url.clone();
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let result = ask(directory.lookup_many(&names), &url).await;
                let _ = tx.send(Msg::Source(Box::new(SourceMsg::Checked { result })));
            });
        }
        let stale_ms = src.config.max_stale_s * 1000;
        if src.failing.is_some() && !src.stale_done && now.saturating_sub(src.last_ok_ms) > stale_ms
        {
            src.stale_done = true;
            let reason = format!(
                "the organisation's directory has not answered for more than max_stale_s ({} s)",
                src.config.max_stale_s
            );
            for m in self.members_inside() {
                self.run(Event::Disqualified {
                    member: m,
                    reason: reason.clone(),
                });
            }
        }
    }

    /// Members with a live session or a task.
    fn members_inside(&self) -> std::collections::BTreeSet<String> {
        let s = self.vault.status();
        s.sessions
            .iter()
            .map(|x| x.member.clone())
            .chain(s.tasks.iter().map(|t| t.owner.clone()))
            .collect()
    }

    /// A scheduler's command (the bus checked its envelope and rights).
    /// A task for a member the organisation's directory refuses (its
    /// verdict at the last periodic check) is refused here, and so is any
    /// task while the directory does not answer (as an enter would be); a
    /// member who stops qualifying later is disqualified at the next
    /// check, their tasks with them.
    pub(super) fn scheduled(
        &mut self,
        member: String,
        by: String,
        command: Command,
        reply: oneshot::Sender<Answer>,
    ) {
        let source = Source {
            door: coffre_vault::Door::Bus,
            addr: by,
        };
        if let Some(answer) = self.refused_for_audit(&command) {
            let _ = reply.send(answer);
            return;
        }
        if let (Some(src), Command::ScheduledTaskAdd { .. }) = (self.source.as_ref(), &command) {
            // (what the audit log says, what the scheduler is told): the
            // directory's own error (its URL, the service account, the
            // server's message) is for the log only.
            let refusal = match (src.verdicts.get(&member), &src.failing) {
                (Some(Verdict::Refused(why)), _) => {
                    let why = format!("the organisation's directory refuses {member}: {why}");
                    Some((why.clone(), why))
                }
                (_, Some((_, error))) => Some((
                    format!(
                        "the organisation's directory does not answer ({error}): no scheduled task until it does"
                    ),
                    "the organisation's directory does not answer: no scheduled task until it does"
                        .to_string(),
                )),
                _ => None,
            };
            if let Some((logged, told)) = refusal {
                self.record(AuditRecord {
                    at: now_ms(),
                    actor: member,
                    detail: format!("{logged} (scheduled by {})", source.addr),
                    source: Some(source),
                    action: "task_add".into(),
                    result: "refused:not_permitted".into(),
                });
                let _ = reply.send((403, error_json(ErrorCode::NotPermitted, told)));
                return;
            }
        }
        self.submit(member, source, command, None, None, reply);
    }

    /// A VPN client renegotiated: the members inside are checked again
    /// at the next tick (the cached verdict answers until then).
    pub(super) fn source_reauth(&mut self, member: &str) -> Option<String> {
        let src = self.source.as_mut()?;
        src.check_soon = true;
        match src.verdicts.get(member) {
            Some(Verdict::Refused(why)) => Some(why.clone()),
            _ => None,
        }
    }

    fn source_checked(&mut self, result: Result<Vec<(String, Found)>, SourceError>) {
        if let Some(src) = self.source.as_mut() {
            src.checking = false;
        }
        self.source_health(result.as_ref().err());
        let Ok(found) = result else { return };
        let inside = self.members_inside();
        let mut out = Vec::new();
        let mut changes = Vec::new();
        let Some(src) = self.source.as_mut() else {
            return;
        };
        for (name, f) in found {
            if !self.vault.members().contains_key(&name) {
                continue;
            }
            let verdict = match f.refusal(false) {
                Some(r) => Verdict::Refused(r.to_string()),
                None => Verdict::Qualifies {
                    superuser: f.refusal(true).is_none(),
                },
            };
            if src.verdicts.get(&name) != Some(&verdict) {
                changes.push(match &verdict {
                    Verdict::Refused(why) => format!("{name}: refused ({why})"),
                    Verdict::Qualifies { superuser } => format!(
                        "{name}: qualifies{}",
                        if *superuser { " (superuser)" } else { "" }
                    ),
                });
            }
            match &verdict {
                Verdict::Refused(why) if inside.contains(&name) => {
                    out.push((name.clone(), why.clone(), true));
                }
                // Not inside, or no longer a superuser: an approval they
                // gave (perhaps while the directory did not answer) stops
                // counting toward the quorum.
                Verdict::Refused(why) if self.vault.has_approvals(&name) => {
                    out.push((name.clone(), why.clone(), false));
                }
                Verdict::Qualifies { superuser: false } if self.vault.has_approvals(&name) => {
                    out.push((
                        name.clone(),
                        "the account is not in superusers_group".into(),
                        false,
                    ));
                }
                _ => {}
            }
            src.verdicts.insert(name, verdict);
        }
        let members = self.vault.members().clone();
        src.verdicts.retain(|n, _| members.contains_key(n));
        let standing: BTreeMap<String, crate::vaultdir::Standing> = src
            .verdicts
            .iter()
            .map(|(n, v)| {
                let s = match v {
                    Verdict::Qualifies { superuser } => crate::vaultdir::Standing::Qualifies {
                        superuser: *superuser,
                    },
                    Verdict::Refused(why) => {
                        crate::vaultdir::Standing::Refused { why: why.clone() }
                    }
                };
                (n.clone(), s)
            })
            .collect();
        let save = standing != self.control.source_standing;
        self.control.source_standing = standing;
        if save {
            self.persist();
        }
        if !changes.is_empty() {
            self.system_audit("directory_source", "ok", changes.join("; "));
        }
        for (member, why, inside) in out {
            let reason = format!("the organisation's directory: {why}");
            self.run(if inside {
                Event::Disqualified { member, reason }
            } else {
                Event::ApprovalsWithdrawn { member, reason }
            });
        }
    }

    /// What the directory's last answer said against `member` (for a
    /// superuser's command: also out of `superusers_group`), for the
    /// commands that go on when it does not answer: a superuser it
    /// disabled is not let through by its outage.
    fn last_refusal(&self, member: &str, as_superuser: bool) -> Option<String> {
        let src = self.source.as_ref()?;
        match src.verdicts.get(member)? {
            Verdict::Refused(why) => Some(format!(
                "{why} (the directory's last answer; it does not answer now)"
            )),
            Verdict::Qualifies { superuser: false } if as_superuser => Some(
                "not in superusers_group (the directory's last answer; it does not answer now)"
                    .into(),
            ),
            Verdict::Qualifies { .. } => None,
        }
    }

    /// Whether `member`'s command may be answered with what the directory
    /// said of someone before any password check: only a superuser's, on
    /// an unlocked vault (anyone else is refused by the core anyway, and
    /// learns nothing here).
    pub(super) fn may_ask_directory(&self, member: &str) -> bool {
        !self.vault.is_locked()
            && self
                .vault
                .members()
                .get(member)
                .is_some_and(|m| m.role == Role::Superuser)
    }

    /// Before a promotion: with an organisation's directory, `name` must
    /// qualify as a superuser at its last check (the periodic one; a
    /// superuser it no longer qualifies loses their approvals there, and
    /// each of their superuser's commands is looked up again). Why not,
    /// if not.
    pub(super) fn source_refuses_superuser(&self, name: &str) -> Option<String> {
        let src = self.source.as_ref()?;
        match src.verdicts.get(name) {
            Some(Verdict::Qualifies { superuser: true }) => None,
            Some(Verdict::Qualifies { superuser: false }) => Some(format!(
                "{name} is not in the organisation's superusers group ({}): not made a superuser",
                src.config.superusers_group.as_deref().unwrap_or("none set")
            )),
            Some(Verdict::Refused(why)) => Some(format!(
                "{name} does not qualify in the organisation's directory ({why}): not made a superuser"
            )),
            None => Some(format!(
                "the organisation's directory has not been checked for {name} yet: try again in a moment"
            )),
        }
    }

    /// Before an invitation's keyslot is made: the invitee must qualify.
    pub(super) fn source_invite(&mut self, req: ReqId, name: String, role: Role) -> bool {
        let Some(src) = &self.source else {
            return false;
        };
        let directory = src.directory.clone();
        let url = src.config.url.clone();
        let tx = self.tx.clone();
        let epoch = self.lock_epoch;
        tokio::spawn(async move {
            let result = ask(directory.lookup(&name), &url).await;
            let _ = tx.send(Msg::Source(Box::new(SourceMsg::Invitee {
                req,
                epoch,
                name,
                role,
                result,
            })));
        });
        true
    }

    fn source_invitee(
        &mut self,
        req: ReqId,
        name: String,
        role: Role,
        result: Result<Option<coffre_source::Account>, SourceError>,
    ) {
        self.source_health(result.as_ref().err());
        let why = match &result {
            Ok(found) => refusal(found.as_ref(), role == Role::Superuser),
            Err(e) if !is_down(e) => Some(e.to_string()),
            Err(e) => {
                self.custody.kept.remove(&req);
                self.system_audit(
                    "member_invite",
                    "refused",
                    format!("{name}: the organisation's directory cannot be reached: {e}"),
                );
                self.answer(
                    req,
                    (
                        503,
                        error_json(
                            ErrorCode::Busy,
                            "the organisation's directory cannot be reached: no invitation now; try again later",
                        ),
                    ),
                );
                return;
            }
        };
        match why {
            None => self.invite(req, name, role),
            Some(why) => {
                self.custody.kept.remove(&req);
                self.system_audit(
                    "member_invite",
                    "refused",
                    format!("{name} does not qualify in the organisation's directory: {why}"),
                );
                self.answer(
                    req,
                    (
                        400,
                        error_json(
                            ErrorCode::Invalid,
                            format!(
                                "{name} does not qualify in the organisation's directory: {why}"
                            ),
                        ),
                    ),
                );
            }
        }
    }

    /// Before a new password's keyslot is made, with `check_password`: it
    /// must bind as the member's account (change it there first).
    pub(super) fn source_passwd(&mut self, req: ReqId, member: String, keyslot: u32) -> bool {
        let Some(src) = &self.source else {
            return false;
        };
        if !src.config.check_password {
            return false;
        }
        let Some(new) = self.custody.new_passwords.get(&req) else {
            return false;
        };
        let new = Zeroizing::new(String::from_utf8_lossy(new.expose()).into_owned());
        let directory = src.directory.clone();
        let url = src.config.url.clone();
        let tx = self.tx.clone();
        let epoch = self.lock_epoch;
        tokio::spawn(async move {
            let result = match ask(directory.lookup(&member), &url).await {
                Ok(Some(a)) => ask(directory.check_password(&a.dn, &new), &url).await,
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            drop(new);
            let _ = tx.send(Msg::Source(Box::new(SourceMsg::NewPassword {
                req,
                epoch,
                member,
                keyslot,
                result,
            })));
        });
        true
    }

    fn source_new_password(
        &mut self,
        req: ReqId,
        member: String,
        keyslot: u32,
        result: Result<bool, SourceError>,
    ) {
        self.source_health(result.as_ref().err());
        let answer = match result {
            Ok(true) => {
                self.change_password(req, member, keyslot);
                return;
            }
            Ok(false) => (
                400,
                error_json(
                    ErrorCode::Invalid,
                    "the new password is not your password in the organisation's directory (check_password is on): change it there first, then here",
                ),
            ),
            Err(e) => (
                503,
                error_json(
                    ErrorCode::Busy,
                    format!(
                        "the organisation's directory cannot check the new password ({e}): try again later"
                    ),
                ),
            ),
        };
        self.custody.kept.remove(&req);
        self.custody.new_passwords.remove(&req);
        self.system_audit(
            "passwd",
            "refused",
            format!("{member}: the new password does not bind to the organisation's directory"),
        );
        self.answer(req, answer);
    }

    /// A join whose invitation code was right: the name must qualify
    /// before its keyslot is made. `None`: the answer comes later.
    pub(super) fn source_join(&mut self, join: PendingJoin) -> Option<PendingJoin> {
        let Some(src) = &self.source else {
            return Some(join);
        };
        let directory = src.directory.clone();
        let url = src.config.url.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = ask(directory.lookup(&join.name), &url).await;
            let _ = tx.send(Msg::Source(Box::new(SourceMsg::Joiner {
                join: Box::new(join),
                result,
            })));
        });
        None
    }

    /// With `ids = "directory"`: why the directory's numbers for `name`
    /// cannot be theirs, if they cannot; else they are kept for when their
    /// account is made.
    fn directory_ids(
        &mut self,
        name: &str,
        found: Option<&coffre_source::Account>,
    ) -> Option<String> {
        let src = self.source.as_mut()?;
        if src.config.ids != coffre_source::Ids::Directory {
            return None;
        }
        let a = found?;
        let (Some(uid), Some(gid)) = (a.uid_number, a.gid_number) else {
            return Some(
                "ids = \"directory\" needs the account's uidNumber and gidNumber, and it has not both"
                    .into(),
            );
        };
        let range = self.config.accounts.range();
        let uses = super::accounts::host_uses();
        if let Some(why) = self
            .control
            .accounts
            .refuse_directory_ids(name, uid, gid, range, &uses)
        {
            return Some(why);
        }
        if let Some((other, _)) = src
            .numbers
            .iter()
            .find(|(n, (u, _))| n.as_str() != name && *u == uid)
        {
            return Some(format!("uidNumber {uid} is also {other}'s, who is joining"));
        }
        src.numbers.insert(name.to_string(), (uid, gid));
        None
    }

    fn source_joiner(
        &mut self,
        join: PendingJoin,
        result: Result<Option<coffre_source::Account>, SourceError>,
    ) {
        self.source_health(result.as_ref().err());
        let name = join.name.clone();
        let role = self
            .control
            .invitations
            .get(&name)
            .map(|i| i.role)
            .unwrap_or(Role::Member);
        let refused = match &result {
            Ok(found) => refusal(found.as_ref(), role == Role::Superuser)
                .or_else(|| self.directory_ids(&name, found.as_ref()))
                .map(|why| {
                    (
                        403,
                        format!("{name} does not qualify in the organisation's directory"),
                        why,
                    )
                }),
            Err(e) if !is_down(e) => Some((
                403,
                format!("{name} does not qualify in the organisation's directory"),
                e.to_string(),
            )),
            Err(e) => Some((
                503,
                "the organisation's directory cannot be reached: try joining again later".into(),
                e.to_string(),
            )),
        };
        let answer = match refused {
            None => self.join_admitted(join),
            Some((status, message, why)) => {
                let rec = AuditRecord {
                    at: now_ms(),
                    actor: name.clone(),
                    source: Some(Source {
                        door: coffre_vault::Door::Join,
                        addr: join.addr.ip().to_string(),
                    }),
                    action: "member_join".into(),
                    result: "refused".into(),
                    detail: format!("the organisation's directory: {why}"),
                };
                self.record(rec);
                let code = if status == 503 {
                    ErrorCode::Busy
                } else {
                    ErrorCode::NotPermitted
                };
                Some((status, error_json(code, message)))
            }
        };
        if let Some(answer) = answer {
            // Over: the invitation may be used again (join_admitted
            // released it already when it refused).
            self.joins.joining.remove(&name);
            if let Some(src) = self.source.as_mut() {
                src.numbers.remove(&name);
            }
            if let Some(tx) = self.joins.replies.remove(&name) {
                let _ = tx.send(answer);
            }
        }
    }
}

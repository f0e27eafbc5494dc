//! A simulated shell: performs the core's effects the way the daemon will,
//! with results that can be delayed so events interleave with transitions.

use coffre_vault::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub struct Sim {
    pub vault: Vault,
    pub now: Millis,
    /// The volume key is held (the volume is open or closing).
    pub key_held: bool,
    /// Keys kept for a pending open.
    pub kept: BTreeSet<ReqId>,
    /// Results not yet delivered.
    pub inbox: VecDeque<Event>,
    pub replies: BTreeMap<ReqId, Outcome>,
    pub audit: Vec<AuditRecord>,
    pub dropped: Vec<SessionId>,
    pub removed: Vec<String>,
    pub close_fails: bool,
    /// Closes that are not forced never answer (storage that stopped
    /// answering); forced ones do (the shell's deadline answers for them).
    pub close_hangs: bool,
    /// Opens do not answer (the test sends `Opened` itself).
    pub hold_opens: bool,
    /// The mode of each close, in order.
    pub close_modes: Vec<Mode>,
    /// How many times pending invitations were cancelled.
    pub invitations_cancelled: u32,
    /// Members whose account the shell was asked to change.
    pub accounts_changed: Vec<String>,
    next_req: u64,
    /// Password verdicts of requests in flight.
    passwords: BTreeMap<ReqId, bool>,
    /// TOTP steps used by each member (the shell's clock).
    pub step: u64,
}

pub fn source(addr: &str) -> Source {
    Source {
        door: coffre_vault::Door::Cli,
        addr: addr.into(),
    }
}

pub fn members(n_members: usize, n_supers: usize) -> Persistent {
    let mut p = Persistent::default();
    for i in 0..n_supers {
        let name = format!("su{i}");
        p.members.insert(
            name.clone(),
            Member {
                name,
                role: Role::Superuser,
                keyslot: u32::try_from(i).unwrap(),
                last_totp_step: None,
            },
        );
    }
    for i in 0..n_members {
        let name = format!("m{i}");
        p.members.insert(
            name.clone(),
            Member {
                name,
                role: Role::Member,
                keyslot: u32::try_from(10 + i).unwrap(),
                last_totp_step: None,
            },
        );
    }
    p
}

impl Sim {
    pub fn new(p: Persistent) -> Self {
        let mut s = Sim {
            vault: Vault::new(p),
            now: Millis(1_000_000),
            key_held: false,
            kept: BTreeSet::new(),
            inbox: VecDeque::new(),
            replies: BTreeMap::new(),
            audit: Vec::new(),
            dropped: Vec::new(),
            removed: Vec::new(),
            close_fails: false,
            close_hangs: false,
            hold_opens: false,
            close_modes: Vec::new(),
            invitations_cancelled: 0,
            accounts_changed: Vec::new(),
            next_req: 1,
            passwords: BTreeMap::new(),
            step: 1,
        };
        s.handle(Event::Boot { unclean: false });
        s
    }

    /// Feeds one event and performs its effects (results go to the inbox).
    pub fn handle(&mut self, e: Event) {
        let phase_before = self.vault.phase();
        let locked_before = self.vault.is_locked();
        let effects = self.vault.handle(self.now, e);
        let phase_after = self.vault.phase();
        if phase_before != phase_after || locked_before != self.vault.is_locked() {
            assert!(
                effects.iter().any(|f| matches!(f, Effect::Audit(a) if a.action == "state" || a.action == "lock" || a.action == "unlock")),
                "transition {phase_before:?} -> {phase_after:?} not audited: {effects:?}"
            );
        }
        if locked_before || self.vault.is_locked() {
            for f in &effects {
                assert!(
                    !matches!(
                        f,
                        Effect::CheckPassword { keep_key: true, .. }
                            | Effect::Open { .. }
                            | Effect::Invite { .. }
                            | Effect::ChangePassword { .. }
                            | Effect::ChangeAccount { .. }
                    ),
                    "an effect keeps, uses a key or changes an account while locked: {f:?}"
                );
            }
        }
        for f in effects {
            match f {
                Effect::CheckPassword { req, keep_key, .. } => {
                    let ok = self.passwords.remove(&req).unwrap_or(false);
                    if ok && keep_key {
                        self.kept.insert(req);
                    }
                    self.inbox.push_back(Event::PasswordChecked { req, ok });
                }
                Effect::Open { req } => {
                    assert!(self.kept.remove(&req), "open with a key nobody kept");
                    assert!(!self.key_held, "opened twice");
                    self.key_held = true;
                    if self.hold_opens {
                        continue;
                    }
                    self.inbox.push_back(Event::Opened {
                        ok: true,
                        detail: String::new(),
                    });
                }
                Effect::DiscardKey { req } => {
                    self.kept.remove(&req);
                }
                Effect::Close { force, mode } => {
                    self.close_modes.push(mode);
                    if self.close_hangs && !force {
                        // No answer.
                    } else if self.close_fails && !force {
                        self.inbox.push_back(Event::Closed {
                            ok: false,
                            detail: "busy".into(),
                        });
                    } else {
                        self.key_held = false;
                        self.inbox.push_back(Event::Closed {
                            ok: !self.close_fails,
                            detail: String::new(),
                        });
                    }
                }
                Effect::Reply { req, outcome } => {
                    self.replies.insert(req, outcome);
                }
                Effect::DropSession { session, .. } => self.dropped.push(session),
                Effect::RemoveMember { name, .. } => self.removed.push(name),
                Effect::Invite { req, .. } | Effect::ChangePassword { req, .. } => {
                    assert!(self.kept.remove(&req), "keyslot change without a kept key");
                    self.replies.insert(req, Outcome::Ok(Reply::Done));
                }
                Effect::ChangeAccount { req, member, .. } => {
                    assert!(!self.kept.contains(&req), "an account change keeps no key");
                    self.accounts_changed.push(member);
                    self.replies.insert(req, Outcome::Ok(Reply::Done));
                }
                Effect::CancelInvitations => self.invitations_cancelled += 1,
                Effect::CancelInvitation { req, .. } => {
                    self.invitations_cancelled += 1;
                    self.replies.insert(req, Outcome::Ok(Reply::Done));
                }
                Effect::Audit(a) => self.audit.push(a),
                Effect::Persist => {}
            }
        }
        self.check();
    }

    /// Invariants that hold at every instant.
    pub fn check(&self) {
        let phase = self.vault.phase();
        if self.key_held {
            assert!(
                matches!(phase, Phase::Opening | Phase::Open | Phase::Closing),
                "key held while {phase:?}"
            );
        }
        if self.vault.is_locked() {
            assert_ne!(phase, Phase::Open, "open while locked");
        }
    }

    /// Delivers one pending result.
    pub fn deliver(&mut self) -> bool {
        match self.inbox.pop_front() {
            Some(e) => {
                self.handle(e);
                true
            }
            None => false,
        }
    }

    /// Delivers everything, retrying failed closes, until nothing moves.
    pub fn settle(&mut self) {
        let mut rounds = 0;
        while self.deliver()
            || (self.vault.phase() == Phase::Closing && !self.close_fails && !self.close_hangs)
        {
            rounds += 1;
            assert!(rounds < 10_000, "no quiescence");
            if self.inbox.is_empty()
                && self.vault.phase() == Phase::Closing
                && !self.close_fails
                && !self.close_hangs
            {
                self.advance(60_000);
            }
        }
    }

    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus(ms);
        self.step = self.step.max(self.now.0 / 30_000);
        self.handle(Event::Tick);
    }

    /// Sends a request; returns its id. The reply may need `settle`.
    pub fn request(
        &mut self,
        member: &str,
        command: Command,
        password_ok: bool,
        totp: Totp,
    ) -> ReqId {
        let req = ReqId(self.next_req);
        self.next_req += 1;
        self.passwords.insert(req, password_ok);
        // A scheduler's command comes through the bus door, named by it.
        let from = match &command {
            Command::ScheduledTaskAdd { by, .. } | Command::ScheduledTaskCancel { by, .. } => {
                Source {
                    door: Door::Bus,
                    addr: by.clone(),
                }
            }
            _ => source(&format!("198.51.100.{}", member.len())),
        };
        self.handle(Event::Request(Request {
            req,
            member: member.into(),
            source: from,
            password: true,
            totp,
            command,
        }));
        req
    }

    /// A fresh TOTP step.
    pub fn fresh(&mut self) -> Totp {
        self.step += 1;
        Totp::Valid { step: self.step }
    }

    /// Request + settle + reply.
    pub fn run(&mut self, member: &str, command: Command) -> Outcome {
        let t = self.fresh();
        let req = self.request(member, command, true, t);
        self.settle();
        self.replies.remove(&req).expect("a reply")
    }

    pub fn enter(&mut self, member: &str) -> SessionId {
        match self.run(member, Command::Enter) {
            Outcome::Ok(Reply::Entered { session }) => session,
            other => panic!("enter {member}: {other:?}"),
        }
    }

    pub fn session_cmd(&mut self, member: &str, command: Command) -> Outcome {
        let req = self.request(member, command, false, Totp::Missing);
        self.settle();
        self.replies.remove(&req).expect("a reply")
    }

    /// Quiescent OPEN rule.
    pub fn check_open_rule(&self) {
        if self.inbox.is_empty() && !self.close_fails {
            let should = self.vault.has_presence() && !self.vault.is_locked();
            let open = self.vault.phase() == Phase::Open;
            assert_eq!(
                open,
                should,
                "OPEN rule broken: phase {:?}, presence {}, locked {}",
                self.vault.phase(),
                self.vault.has_presence(),
                self.vault.is_locked()
            );
            assert_eq!(
                self.key_held,
                open,
                "key held {} while {:?}",
                self.key_held,
                self.vault.phase()
            );
            assert!(self.kept.is_empty(), "keys left kept: {:?}", self.kept);
        }
    }
}

pub fn refused(o: &Outcome) -> Option<Refusal> {
    match o {
        Outcome::Refused { code, .. } => Some(*code),
        Outcome::Ok(_) => None,
    }
}

//! The binding of OpenVPN's clients to vault sessions, with no I/O.
//!
//! Connecting through the VPN is entering: a first connection carries the
//! password and TOTP code and becomes an `enter`; OpenVPN then hands the
//! client a token, and renegotiations and reconnections carry it: they
//! resume the session the token names, with no derivation, as long as
//! that session is alive. [`VpnBindings::handle`] takes what OpenVPN's
//! management link reported (and the clock) and says what to tell
//! OpenVPN and the vault core:
//! - an answer from the core is acted on only if it is for the very
//!   connection that asked (a ticket per connection: an answer for a
//!   client that left never authorises another that got its ids), and
//!   only if the vault is still unlocked and the session alive;
//! - a departure waits [`DEPARTURE_DELAY_MS`] before its session ends:
//!   OpenVPN reports every client as gone when it shuts down, just before
//!   its link closes, and a restart must not end everyone's session;
//! - while the link is up, the connected clients' sessions are kept
//!   alive (a heartbeat every [`HEARTBEAT_MS`]), and clients whose
//!   session ended some other way are disconnected;
//! - clients OpenVPN lists that the vault did not let in (a daemon before
//!   a crash did) are disconnected at the next tick, unless their own
//!   connection makes them ours meanwhile.
//!
//! The vault's side is read through [`SessionView`] (the core implements
//! it), so the rules run under test without OpenVPN or a daemon.

use crate::{Millis, SessionId};
use std::collections::BTreeMap;

/// How long a departure waits before its session ends.
pub const DEPARTURE_DELAY_MS: u64 = 2_000;

/// How often the connected clients' sessions are kept alive.
pub const HEARTBEAT_MS: u64 = 2_000;

/// What the bindings need to know of the vault.
pub trait SessionView {
    /// Whether the vault is locked.
    fn is_locked(&self) -> bool;
    /// Whose session `session` is, if it is alive.
    fn session_member(&self, session: SessionId) -> Option<&str>;
}

impl SessionView for crate::Vault {
    fn is_locked(&self) -> bool {
        crate::Vault::is_locked(self)
    }
    fn session_member(&self, session: SessionId) -> Option<&str> {
        crate::Vault::session_member(self, session)
    }
}

/// A client OpenVPN let in on the vault's word, and the session it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    /// The member.
    pub member: String,
    /// The vault session it holds.
    pub session: SessionId,
    /// Where it connects from (OpenVPN's `untrusted_ip`).
    pub addr: String,
}

/// How a reconnecting client shows its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// No token: a renegotiation of a client already let in.
    None,
    /// A token OpenVPN accepted (its id is the connection's `session_id`).
    Valid,
    /// A token OpenVPN says has expired or is invalid.
    Invalid,
}

/// What happened on the management link.
#[derive(Clone, Debug)]
pub enum VpnEvent {
    /// The link is (back) up; OpenVPN lists these clients (id, and who
    /// they are, for the audit log).
    LinkUp {
        /// OpenVPN's pid (another one than before: it restarted).
        pid: u32,
        /// Client id and description.
        listed: Vec<(u64, String)>,
    },
    /// OpenVPN says it restarts (`state` as it says it).
    Restarting {
        /// OpenVPN's word for it.
        state: String,
    },
    /// The link went down.
    LinkDown {
        /// Why.
        why: String,
    },
    /// A client's first connection, already checked by the shell
    /// (certificate, user name, credentials): its `enter` goes to the
    /// core with the ticket that comes back as [`VpnEffect::Enter`].
    Connect {
        /// Client id.
        cid: u64,
        /// Key id.
        kid: u64,
    },
    /// The core answered a connection's `enter`.
    Answered {
        /// Client id.
        cid: u64,
        /// Key id.
        kid: u64,
        /// The ticket [`VpnEffect::Enter`] gave.
        ticket: u64,
        /// The member.
        member: String,
        /// The auth token OpenVPN will hand the client (empty if none).
        token: String,
        /// Where it connects from.
        addr: String,
        /// The session, or the sentence the client is denied with.
        outcome: Result<SessionId, String>,
    },
    /// A renegotiation or a reconnection with a token, by `member`.
    Resume {
        /// Client id.
        cid: u64,
        /// Key id.
        kid: u64,
        /// The member the certificate names.
        member: String,
        /// How it shows its token.
        token: Token,
        /// OpenVPN's id for this connection's token (empty if none).
        session_id: String,
        /// Where it connects from.
        addr: String,
        /// A new connection (rather than a renegotiation).
        connect: bool,
    },
    /// OpenVPN says the client is gone.
    Disconnect {
        /// Client id.
        cid: u64,
    },
    /// The core dropped a session (lock, removal, expiry).
    SessionDropped {
        /// The session.
        session: SessionId,
    },
    /// Periodic.
    Tick,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VpnEffect {
    /// Send this connection's `enter` to the core; its answer comes back
    /// as [`VpnEvent::Answered`] with `ticket`.
    Enter {
        /// Client id.
        cid: u64,
        /// Ticket.
        ticket: u64,
    },
    /// Tell OpenVPN to let the client in (with `member`'s directives).
    Authorize {
        /// Client id.
        cid: u64,
        /// Key id.
        kid: u64,
        /// Whose directives.
        member: String,
    },
    /// Tell OpenVPN to refuse the client, with this sentence.
    Deny {
        /// Client id.
        cid: u64,
        /// Key id.
        kid: u64,
        /// Why (the client shows it).
        why: String,
    },
    /// Tell OpenVPN to disconnect the client (`halt`: and not come back
    /// on its own).
    Kill {
        /// Client id.
        cid: u64,
        /// Whether the client must not reconnect by itself.
        halt: bool,
    },
    /// Leave `session` on `member`'s behalf.
    Leave {
        /// The member.
        member: String,
        /// The session.
        session: SessionId,
        /// Where from.
        addr: String,
    },
    /// Keep `session` alive.
    Heartbeat {
        /// The member.
        member: String,
        /// The session.
        session: SessionId,
        /// Where from.
        addr: String,
    },
    /// An audit record from the vault itself.
    Audit {
        /// Action.
        action: &'static str,
        /// Result.
        result: &'static str,
        /// Detail.
        detail: String,
    },
}

/// What the vault knows of OpenVPN's clients.
#[derive(Clone, Debug, Default)]
pub struct VpnBindings {
    up: bool,
    pid: Option<u32>,
    clients: BTreeMap<u64, Client>,
    /// Connections waiting for the core's answer: client id → (key id,
    /// ticket).
    pending: BTreeMap<u64, (u64, u64)>,
    next_ticket: u64,
    /// Clients OpenVPN said are gone, and when their sessions end.
    departing: Vec<(Client, Millis)>,
    /// Tokens → the member and session they carry.
    tokens: BTreeMap<String, (String, SessionId)>,
    last_beat: Millis,
    down_why: Option<String>,
    /// Listed clients the vault did not let in, with how they were listed.
    suspects: Vec<(u64, String)>,
}

const LOCKED: &str = "the vault is locked (locked)";
const NO_SESSION: &str =
    "your vault session has ended: connect again with your password and TOTP code (no_session)";
const TOKEN_EXPIRED: &str =
    "your VPN token has expired: connect again with your password and TOTP code (no_session)";

impl VpnBindings {
    /// Whether the management link is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// OpenVPN's pid when last seen.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Why the link is down, if it is.
    pub fn down_why(&self) -> Option<&str> {
        self.down_why.as_deref()
    }

    /// The clients let in, by client id.
    pub fn clients(&self) -> &BTreeMap<u64, Client> {
        &self.clients
    }

    /// How many connections wait for the core's answer.
    pub fn authorizing(&self) -> usize {
        self.pending.len()
    }

    /// Decides `event` at `now`.
    pub fn handle(
        &mut self,
        now: Millis,
        vault: &impl SessionView,
        event: VpnEvent,
    ) -> Vec<VpnEffect> {
        let mut out = Vec::new();
        match event {
            VpnEvent::LinkUp { pid, listed } => self.link_up(vault, pid, &listed, &mut out),
            VpnEvent::Restarting { state } => {
                let n = self.clients.len() + self.departing.len();
                self.clients.clear();
                self.departing.clear();
                self.pending.clear();
                out.push(audit(
                    "gateway",
                    "restarting",
                    format!(
                        "OpenVPN says {state}: {n} client(s) must reconnect within the grace period"
                    ),
                ));
            }
            VpnEvent::LinkDown { why } => {
                if self.up {
                    let kept = self.departing.len();
                    let note = if kept > 0 {
                        format!(
                            "{why}; {kept} departure(s) reported as it went down: their sessions are kept for the grace period"
                        )
                    } else {
                        why.clone()
                    };
                    out.push(audit("gateway", "down", note));
                }
                self.departing.clear();
                self.up = false;
                self.down_why = Some(why);
                self.pending.clear();
                self.suspects.clear();
            }
            VpnEvent::Connect { cid, kid } => {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.pending.insert(cid, (kid, ticket));
                out.push(VpnEffect::Enter { cid, ticket });
            }
            VpnEvent::Answered {
                cid,
                kid,
                ticket,
                member,
                token,
                addr,
                outcome,
            } => self.answered(
                vault, cid, kid, ticket, member, token, addr, outcome, &mut out,
            ),
            VpnEvent::Resume {
                cid,
                kid,
                member,
                token,
                session_id,
                addr,
                connect,
            } => self.resume(
                vault, cid, kid, &member, token, session_id, addr, connect, &mut out,
            ),
            VpnEvent::Disconnect { cid } => {
                self.pending.remove(&cid);
                if let Some(c) = self.clients.remove(&cid) {
                    self.departing.push((c, now.plus(DEPARTURE_DELAY_MS)));
                }
            }
            VpnEvent::SessionDropped { session } => self.drop_session(session, &mut out),
            VpnEvent::Tick => self.tick(now, vault, &mut out),
        }
        out
    }

    fn link_up(
        &mut self,
        vault: &impl SessionView,
        pid: u32,
        listed: &[(u64, String)],
        out: &mut Vec<VpnEffect>,
    ) {
        let same = self.pid == Some(pid);
        let mut notes = Vec::new();
        if !same && !self.clients.is_empty() {
            // A new OpenVPN: client ids start again, the old ones mean
            // nothing. The sessions live on for the grace period, and
            // resume when their clients come back with their tokens.
            notes.push(format!(
                "OpenVPN restarted (pid {pid}): {} client(s) must reconnect within the grace period",
                self.clients.len()
            ));
            self.clients.clear();
        }
        if same {
            // The same OpenVPN: clients that left while we were away.
            let gone: Vec<u64> = self
                .clients
                .keys()
                .filter(|cid| !listed.iter().any(|(l, _)| l == *cid))
                .copied()
                .collect();
            for cid in gone {
                if let Some(c) = self.clients.remove(&cid) {
                    self.release(vault, c, out);
                }
            }
        }
        self.suspects = listed
            .iter()
            .filter(|(cid, _)| !self.clients.contains_key(cid))
            .cloned()
            .collect();
        self.up = true;
        self.pid = Some(pid);
        self.down_why = None;
        out.push(audit(
            "gateway",
            "up",
            format!(
                "connected to OpenVPN (pid {pid}), {} client(s) listed{}{}",
                listed.len(),
                if notes.is_empty() { "" } else { "; " },
                notes.join("; ")
            ),
        ));
    }

    #[allow(clippy::too_many_arguments)]
    fn answered(
        &mut self,
        vault: &impl SessionView,
        cid: u64,
        kid: u64,
        ticket: u64,
        member: String,
        token: String,
        addr: String,
        outcome: Result<SessionId, String>,
        out: &mut Vec<VpnEffect>,
    ) {
        if self.pending.get(&cid) != Some(&(kid, ticket)) {
            // The client left (or the link went down) while the core
            // checked: a session it got is left at once.
            if let Ok(session) = outcome {
                out.push(VpnEffect::Leave {
                    member,
                    session,
                    addr,
                });
            }
            return;
        }
        self.pending.remove(&cid);
        let session = match outcome {
            Ok(s) => s,
            Err(why) => {
                out.push(VpnEffect::Deny { cid, kid, why });
                return;
            }
        };
        // The core said yes, but a lock (or a removal) may have come in
        // since: the session must still be alive when OpenVPN is told.
        if vault.is_locked() || vault.session_member(session) != Some(member.as_str()) {
            let why = if vault.is_locked() {
                LOCKED
            } else {
                NO_SESSION
            };
            out.push(audit(
                "vpn_enter",
                "refused",
                format!("{member} from {addr}: {why}, after the password check"),
            ));
            out.push(VpnEffect::Deny {
                cid,
                kid,
                why: format!("coffre: {why}"),
            });
            return;
        }
        self.clients.insert(
            cid,
            Client {
                member: member.clone(),
                session,
                addr,
            },
        );
        if !token.is_empty() {
            self.tokens.insert(token, (member.clone(), session));
        }
        out.push(VpnEffect::Authorize { cid, kid, member });
    }

    #[allow(clippy::too_many_arguments)]
    fn resume(
        &mut self,
        vault: &impl SessionView,
        cid: u64,
        kid: u64,
        member: &str,
        token: Token,
        session_id: String,
        addr: String,
        connect: bool,
        out: &mut Vec<VpnEffect>,
    ) {
        let locked = vault.is_locked();
        // Which session: the token's, or for a renegotiation without a
        // token, the one this client already holds.
        let session = match token {
            Token::Valid => self
                .tokens
                .get(&session_id)
                .filter(|(m, _)| m == member)
                .map(|(_, s)| *s),
            Token::Invalid => None,
            Token::None => self
                .clients
                .get(&cid)
                .filter(|c| c.member == member)
                .map(|c| c.session),
        };
        let alive = session.filter(|s| !locked && vault.session_member(*s) == Some(member));
        let Some(session) = alive else {
            let why = if locked {
                LOCKED
            } else if token == Token::Invalid {
                TOKEN_EXPIRED
            } else {
                NO_SESSION
            };
            out.push(audit(
                "vpn_resume",
                "refused",
                format!("{member} from {addr}: {why}"),
            ));
            out.push(VpnEffect::Deny {
                cid,
                kid,
                why: format!("coffre: {why}"),
            });
            return;
        };
        // Keep the session alive now: a reconnection may come late in the
        // grace period.
        out.push(VpnEffect::Heartbeat {
            member: member.to_string(),
            session,
            addr: self.addr_of(session).unwrap_or_default(),
        });
        let fresh = !self.clients.contains_key(&cid);
        self.clients.insert(
            cid,
            Client {
                member: member.to_string(),
                session,
                addr: addr.clone(),
            },
        );
        if !session_id.is_empty() {
            self.tokens
                .insert(session_id, (member.to_string(), session));
        }
        if fresh || connect {
            out.push(audit(
                "vpn_resume",
                "ok",
                format!(
                    "{member} reconnected from {addr} with their token: session {} goes on",
                    session.0
                ),
            ));
        }
        out.push(VpnEffect::Authorize {
            cid,
            kid,
            member: member.to_string(),
        });
    }

    fn addr_of(&self, session: SessionId) -> Option<String> {
        self.clients
            .values()
            .find(|c| c.session == session)
            .map(|c| c.addr.clone())
    }

    /// A client is gone for good: its session ends unless another of its
    /// connections holds it.
    fn release(&mut self, vault: &impl SessionView, c: Client, out: &mut Vec<VpnEffect>) {
        if self.clients.values().any(|o| o.session == c.session) {
            return;
        }
        self.tokens.retain(|_, (_, s)| *s != c.session);
        if vault.session_member(c.session).is_some() {
            out.push(VpnEffect::Leave {
                member: c.member,
                session: c.session,
                addr: c.addr,
            });
        }
    }

    fn drop_session(&mut self, session: SessionId, out: &mut Vec<VpnEffect>) {
        let cids: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.session == session)
            .map(|(cid, _)| *cid)
            .collect();
        for cid in cids {
            self.clients.remove(&cid);
            out.push(VpnEffect::Kill { cid, halt: true });
        }
        self.tokens.retain(|_, (_, s)| *s != session);
    }

    fn tick(&mut self, now: Millis, vault: &impl SessionView, out: &mut Vec<VpnEffect>) {
        for (cid, who) in std::mem::take(&mut self.suspects) {
            if self.clients.contains_key(&cid) || self.pending.contains_key(&cid) {
                continue;
            }
            // Let in by someone else (a daemon before a crash): it holds
            // no session here. It may come back through us.
            out.push(audit(
                "gateway",
                "disconnected",
                format!("client {cid} ({who}) holds no vault session: disconnected"),
            ));
            out.push(VpnEffect::Kill { cid, halt: false });
        }
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.departing)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        self.departing = wait;
        for (c, _) in due {
            self.release(vault, c, out);
        }
        if !self.up || now.0 < self.last_beat.0.saturating_add(HEARTBEAT_MS) {
            return;
        }
        self.last_beat = now;
        let ended: Vec<SessionId> = self
            .clients
            .values()
            .map(|c| c.session)
            .filter(|s| vault.session_member(*s).is_none())
            .collect();
        for s in ended {
            self.drop_session(s, out);
        }
        let mut live: Vec<(String, SessionId)> = self
            .clients
            .values()
            .map(|c| (c.member.clone(), c.session))
            .collect();
        live.sort();
        live.dedup();
        for (member, session) in live {
            let addr = self.addr_of(session).unwrap_or_default();
            out.push(VpnEffect::Heartbeat {
                member,
                session,
                addr,
            });
        }
    }
}

fn audit(action: &'static str, result: &'static str, detail: String) -> VpnEffect {
    VpnEffect::Audit {
        action,
        result,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    /// The vault's side, simulated: sessions the core handed out, a lock.
    #[derive(Default)]
    struct FakeVault {
        locked: bool,
        sessions: HashMap<SessionId, String>,
    }

    impl SessionView for FakeVault {
        fn is_locked(&self) -> bool {
            self.locked
        }
        fn session_member(&self, s: SessionId) -> Option<&str> {
            self.sessions.get(&s).map(String::as_str)
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Connect(u8),
        /// Answer the n-th waiting enter (ok or not), perhaps with a
        /// stale ticket.
        Answer {
            which: u8,
            ok: bool,
            stale: bool,
        },
        Resume {
            cid: u8,
            token: u8,
        },
        Disconnect(u8),
        Lock(bool),
        EndSession(u8),
        LinkDown,
        LinkUp {
            same_pid: bool,
        },
        Wait(u64),
        Tick,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..4).prop_map(Step::Connect),
            3 => (0u8..4, any::<bool>(), prop::bool::weighted(0.2)).prop_map(|(which, ok, stale)| Step::Answer { which, ok, stale }),
            2 => (0u8..4, 0u8..3).prop_map(|(cid, token)| Step::Resume { cid, token }),
            2 => (0u8..4).prop_map(Step::Disconnect),
            1 => any::<bool>().prop_map(Step::Lock),
            1 => (0u8..6).prop_map(Step::EndSession),
            1 => Just(Step::LinkDown),
            1 => any::<bool>().prop_map(|same_pid| Step::LinkUp { same_pid }),
            2 => (0u64..3_000).prop_map(Step::Wait),
            3 => Just(Step::Tick),
        ]
    }

    fn member_of(cid: u64) -> String {
        format!("m{}", cid % 2)
    }

    proptest! {
        /// Over any history of connections, answers, reconnections,
        /// departures, locks, session ends, link drops and ticks:
        /// - nobody is let in while the vault is locked, nor on a session
        ///   that is not alive and theirs;
        /// - an answer with a stale ticket never lets anyone in;
        /// - a dropped session keeps no client, and each of its clients
        ///   is told to go and not come back;
        /// - a departure ends its session no sooner than the departure
        ///   delay, and not at all if the link went down meanwhile.
        #[test]
        fn bindings_hold(steps in proptest::collection::vec(step(), 1..150)) {
            let mut b = VpnBindings::default();
            let mut v = FakeVault::default();
            let mut now = Millis(1_000_000);
            let mut waiting: Vec<(u64, u64, u64)> = Vec::new(); // cid, kid, ticket
            let mut next_session = 1u64;
            let mut pid = 100u32;
            // Departures that may end their session: session → earliest time.
            let mut departed: HashMap<SessionId, Millis> = HashMap::new();
            let mut fx = b.handle(now, &v, VpnEvent::LinkUp { pid, listed: vec![] });
            for s in steps {
                let mut stale_answer = false;
                let effects = match s {
                    Step::Connect(c) => {
                        let cid = u64::from(c);
                        b.handle(now, &v, VpnEvent::Connect { cid, kid: 1 })
                    }
                    Step::Answer { which, ok, stale } => {
                        if waiting.is_empty() { continue; }
                        let (cid, kid, ticket) = waiting.remove(usize::from(which) % waiting.len());
                        let member = member_of(cid);
                        let outcome = if ok {
                            let s = SessionId(next_session);
                            next_session += 1;
                            if !v.locked { v.sessions.insert(s, member.clone()); }
                            Ok(s)
                        } else {
                            Err("coffre: wrong password (wrong_password)".to_string())
                        };
                        stale_answer = stale;
                        let ticket = if stale { ticket + 1000 } else { ticket };
                        b.handle(now, &v, VpnEvent::Answered {
                            cid, kid, ticket, member, token: format!("t{cid}"), addr: "198.51.100.1".into(), outcome,
                        })
                    }
                    Step::Resume { cid, token } => {
                        let cid = u64::from(cid);
                        let token = match token { 0 => Token::None, 1 => Token::Valid, _ => Token::Invalid };
                        b.handle(now, &v, VpnEvent::Resume {
                            cid, kid: 2, member: member_of(cid), token,
                            session_id: format!("t{cid}"), addr: "198.51.100.1".into(), connect: true,
                        })
                    }
                    Step::Disconnect(c) => {
                        let cid = u64::from(c);
                        if let Some(client) = b.clients().get(&cid) {
                            departed.entry(client.session).or_insert(now.plus(DEPARTURE_DELAY_MS));
                        }
                        b.handle(now, &v, VpnEvent::Disconnect { cid })
                    }
                    Step::Lock(on) => {
                        v.locked = on;
                        if !on { continue; }
                        // A lock drops every session.
                        let all: Vec<SessionId> = v.sessions.keys().copied().collect();
                        let mut out = Vec::new();
                        for s in all {
                            v.sessions.remove(&s);
                            out.extend(b.handle(now, &v, VpnEvent::SessionDropped { session: s }));
                        }
                        out
                    }
                    Step::EndSession(n) => {
                        let s = SessionId(u64::from(n) + 1);
                        if v.sessions.remove(&s).is_none() { continue; }
                        b.handle(now, &v, VpnEvent::SessionDropped { session: s })
                    }
                    Step::LinkDown => {
                        departed.clear();
                        b.handle(now, &v, VpnEvent::LinkDown { why: "gone".into() })
                    }
                    Step::LinkUp { same_pid } => {
                        if !same_pid { pid += 1; }
                        let listed = b.clients().keys().map(|c| (*c, "x".to_string())).collect();
                        b.handle(now, &v, VpnEvent::LinkUp { pid, listed })
                    }
                    Step::Wait(ms) => { now = now.plus(ms); continue; }
                    Step::Tick => b.handle(now, &v, VpnEvent::Tick),
                };
                fx.clear();
                for e in &effects {
                    match e {
                        VpnEffect::Enter { cid, ticket } => waiting.push((*cid, 1, *ticket)),
                        VpnEffect::Authorize { cid, member, .. } => {
                            prop_assert!(!v.locked, "let in while locked");
                            prop_assert!(!stale_answer, "a stale answer let {} in", cid);
                            let c = &b.clients()[cid];
                            prop_assert_eq!(&c.member, member);
                            prop_assert_eq!(v.session_member(c.session), Some(member.as_str()));
                        }
                        VpnEffect::Leave { session, .. } => {
                            // A session ended by a departure: not before its delay.
                            if let Some(at) = departed.get(session) {
                                prop_assert!(now >= *at, "a departure ended its session early");
                            }
                            // The core ends it.
                            v.sessions.remove(session);
                        }
                        VpnEffect::Kill { cid, halt: true } => {
                            prop_assert!(!b.clients().contains_key(cid));
                        }
                        _ => {}
                    }
                }
                // No client holds a dead session past a tick's heartbeat,
                // and none holds a session that was dropped.
                let live: BTreeSet<SessionId> = v.sessions.keys().copied().collect();
                if matches!(s, Step::Lock(true) | Step::EndSession(_)) {
                    for c in b.clients().values() {
                        prop_assert!(live.contains(&c.session), "a dropped session kept a client");
                    }
                }
            }
        }
    }

    #[test]
    fn a_restart_ends_no_session_but_a_departure_does() {
        let mut b = VpnBindings::default();
        let mut v = FakeVault::default();
        let t0 = Millis(10_000);
        b.handle(
            t0,
            &v,
            VpnEvent::LinkUp {
                pid: 1,
                listed: vec![],
            },
        );
        let fx = b.handle(t0, &v, VpnEvent::Connect { cid: 7, kid: 1 });
        assert_eq!(fx, vec![VpnEffect::Enter { cid: 7, ticket: 0 }]);
        v.sessions.insert(SessionId(1), "m1".into());
        let fx = b.handle(
            t0,
            &v,
            VpnEvent::Answered {
                cid: 7,
                kid: 1,
                ticket: 0,
                member: "m1".into(),
                token: "tok".into(),
                addr: "a".into(),
                outcome: Ok(SessionId(1)),
            },
        );
        assert!(matches!(
            fx.as_slice(),
            [VpnEffect::Authorize { cid: 7, .. }]
        ));
        // OpenVPN goes down: it reports the client gone, then the link closes.
        b.handle(t0, &v, VpnEvent::Disconnect { cid: 7 });
        b.handle(
            t0.plus(100),
            &v,
            VpnEvent::LinkDown {
                why: "restart".into(),
            },
        );
        let fx = b.handle(t0.plus(5_000), &v, VpnEvent::Tick);
        assert!(
            !fx.iter().any(|e| matches!(e, VpnEffect::Leave { .. })),
            "{fx:?}"
        );
        // Back up, the client resumes with its token.
        b.handle(
            t0.plus(6_000),
            &v,
            VpnEvent::LinkUp {
                pid: 2,
                listed: vec![],
            },
        );
        let fx = b.handle(
            t0.plus(6_000),
            &v,
            VpnEvent::Resume {
                cid: 1,
                kid: 0,
                member: "m1".into(),
                token: Token::Valid,
                session_id: "tok".into(),
                addr: "a".into(),
                connect: true,
            },
        );
        assert!(
            fx.iter()
                .any(|e| matches!(e, VpnEffect::Authorize { cid: 1, .. })),
            "{fx:?}"
        );
        // A real departure: the session ends after the delay, not before.
        b.handle(t0.plus(7_000), &v, VpnEvent::Disconnect { cid: 1 });
        let early = b.handle(t0.plus(7_000 + DEPARTURE_DELAY_MS - 1), &v, VpnEvent::Tick);
        assert!(!early.iter().any(|e| matches!(e, VpnEffect::Leave { .. })));
        let due = b.handle(t0.plus(7_000 + DEPARTURE_DELAY_MS), &v, VpnEvent::Tick);
        assert!(
            due.iter().any(|e| matches!(
                e,
                VpnEffect::Leave {
                    session: SessionId(1),
                    ..
                }
            )),
            "{due:?}"
        );
    }
}

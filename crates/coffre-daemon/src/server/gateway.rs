//! The vault's side of the OpenVPN gateway: OpenVPN's clients become
//! sessions of the core, exactly as `coffre enter` does.
//!
//! - A first connection (no auth token) carries the password and TOTP
//!   code: it is an `enter`, checked by the member's keyslot; the answer
//!   waits, like the CLI's, until the vault has opened.
//! - OpenVPN then hands the client an auth token (`auth-gen-token`, secret
//!   kept in the vault directory). Renegotiations and reconnections carry
//!   it: they resume the session the token names, with no keyslot
//!   derivation and no new TOTP code, as long as that session is alive.
//! - While a client is connected, the daemon keeps its session alive; a
//!   departure (`>CLIENT:DISCONNECT`) ends it. If OpenVPN restarts, its
//!   clients' sessions live on for the grace period and resume when the
//!   clients come back with their tokens.
//! - Lock, removal and expiry drop sessions: their clients are killed
//!   (`client-kill CID HALT`).

use super::{Answer, ErrorCode, Msg, Shell, error_json, now_ms};
use crate::gateway::LinkEvent;
use crate::openvpn::{self, ClientEnv, ClientEvent, Listed};
use coffre_vault::{Command, Millis, SessionId, Source};
use serde_json::{Value, json};
use std::collections::HashMap;
use tokio::sync::oneshot;

/// A client OpenVPN has let in, and the session it holds.
pub(super) struct VpnClient {
    member: String,
    session: SessionId,
    addr: String,
}

/// How long a departure waits before its session ends. OpenVPN reports
/// every client as disconnected when it shuts down, just before its
/// management socket closes: a departure followed by the link going down
/// within this delay is a restart, not members leaving.
const DEPARTURE_DELAY_MS: u64 = 2_000;

/// What the vault knows of OpenVPN's clients.
#[derive(Default)]
pub(super) struct VpnState {
    /// Whether the management link is up.
    up: bool,
    /// OpenVPN's pid when last seen (another pid: it restarted).
    pid: Option<u32>,
    /// Clients let in, by client id.
    clients: HashMap<u64, VpnClient>,
    /// Connections waiting for the vault's answer: client id → (key id,
    /// ticket). The ticket is unique to one CONNECT: an answer for a
    /// client that left never authorises another that got its ids.
    pending: HashMap<u64, (u64, u64)>,
    /// Next ticket.
    next_ticket: u64,
    /// The management connection commands are for.
    generation: u64,
    /// Clients OpenVPN said are gone, and when their sessions end.
    departing: Vec<(VpnClient, Millis)>,
    /// `auth-gen-token` session ids → the vault session they carry.
    tokens: HashMap<String, (String, SessionId)>,
    /// Last time the connected clients' sessions were refreshed.
    last_beat: Millis,
    /// Why the link is down, if it is.
    down_why: Option<String>,
    /// Clients OpenVPN listed that the vault did not let in, with how
    /// they were listed: disconnected at the next tick unless their own
    /// CONNECT (held until the list came) makes them ours meanwhile.
    suspects: Vec<(u64, String)>,
}

/// What comes back from the core for a VPN `enter`.
pub(super) struct VpnAnswer {
    pub cid: u64,
    pub kid: u64,
    pub ticket: u64,
    pub member: String,
    pub token: String,
    pub addr: String,
    pub answer: Answer,
}

fn source(env: &ClientEnv) -> Source {
    Source {
        door: "vpn".into(),
        addr: env.untrusted_ip.clone(),
    }
}

/// Test hook: how long to hold the core's answer to a VPN login before
/// acting on it (`COFFRE_TEST_VPN_ANSWER_DELAY_MS`), so a test can land a
/// lock in that window. It only delays; unset in production.
fn test_answer_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("COFFRE_TEST_VPN_ANSWER_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

/// The sentence a denied client shows, from the core's answer.
fn client_reason(answer: &Answer) -> String {
    let v = &answer.1;
    let code = v["error"].as_str().unwrap_or("refused");
    let msg = v["message"].as_str().unwrap_or("refused");
    format!("coffre: {msg} ({code})")
}

impl Shell {
    fn vpn_send(&self, cmd: String) {
        if let Some(tx) = &self.gw_tx {
            let _ = tx.send((self.vpn.generation, cmd));
        }
    }

    fn vpn_deny(&mut self, cid: u64, kid: u64, log: &str, client: &str) {
        self.vpn_send(openvpn::client_deny(cid, kid, log, client));
    }

    /// Directives for an authorised client: a fixed address if configured.
    fn vpn_directives(&self, member: &str) -> Vec<String> {
        let Some(g) = &self.config.gateway else {
            return Vec::new();
        };
        match (g.addresses.get(member), openvpn::Network::parse(&g.network)) {
            (Some(ip), Ok(net)) => vec![format!("ifconfig-push {ip} {}", net.mask())],
            _ => Vec::new(),
        }
    }

    pub(super) fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Up {
                pid,
                clients,
                generation,
            } => {
                self.vpn.generation = generation;
                self.vpn_up(pid, &clients);
            }
            LinkEvent::Restarting { state } => self.vpn_restarting(&state),
            LinkEvent::Down { why } => {
                if self.vpn.up {
                    let kept = self.vpn.departing.len();
                    let note = if kept > 0 {
                        format!(
                            "{why}; {kept} departure(s) reported as it went down: their sessions are kept for the grace period"
                        )
                    } else {
                        why.clone()
                    };
                    self.system_audit("gateway", "down", note);
                }
                self.vpn.departing.clear();
                self.vpn.up = false;
                self.vpn.down_why = Some(why);
                self.vpn.pending.clear();
                self.vpn.suspects.clear();
            }
            LinkEvent::Client {
                event,
                cid,
                kid,
                env,
            } => match event {
                ClientEvent::Connect | ClientEvent::Reauth => {
                    if let Some(kid) = kid {
                        self.vpn_authorize(event, cid, kid, &env);
                    }
                }
                ClientEvent::Established => {}
                ClientEvent::Disconnect => self.vpn_disconnect(cid),
            },
        }
    }

    /// OpenVPN restarts in place or exits: its clients will come back with
    /// new ids (and their tokens); their sessions live for the grace
    /// period.
    fn vpn_restarting(&mut self, state: &str) {
        let n = self.vpn.clients.len() + self.vpn.departing.len();
        self.vpn.clients.clear();
        self.vpn.departing.clear();
        self.vpn.pending.clear();
        self.system_audit(
            "gateway",
            "restarting",
            format!("OpenVPN says {state}: {n} client(s) must reconnect within the grace period"),
        );
    }

    /// The link is (back) up: rebuild our view from OpenVPN's own list.
    fn vpn_up(&mut self, pid: u32, listed: &[Listed]) {
        let same = self.vpn.pid == Some(pid);
        let mut notes = Vec::new();
        if !same && !self.vpn.clients.is_empty() {
            // A new OpenVPN: client ids start again, the old ones mean
            // nothing. The sessions live on for the grace period, and
            // resume when their clients come back with their tokens.
            notes.push(format!(
                "OpenVPN restarted (pid {pid}): {} client(s) must reconnect within the grace period",
                self.vpn.clients.len()
            ));
            self.vpn.clients.clear();
        }
        if same {
            // The same OpenVPN: clients that left while we were away.
            let gone: Vec<u64> = self
                .vpn
                .clients
                .keys()
                .filter(|cid| !listed.iter().any(|l| l.cid == **cid))
                .copied()
                .collect();
            for cid in gone {
                self.vpn_end(cid);
            }
        }
        self.vpn.suspects = listed
            .iter()
            .filter(|l| !self.vpn.clients.contains_key(&l.cid))
            .map(|l| (l.cid, format!("{} from {}", l.common_name, l.real_address)))
            .collect();
        self.vpn.up = true;
        self.vpn.pid = Some(pid);
        self.vpn.down_why = None;
        self.system_audit(
            "gateway",
            "up",
            format!(
                "connected to OpenVPN (pid {pid}), {} client(s) listed{}{}",
                listed.len(),
                if notes.is_empty() { "" } else { "; " },
                notes.join("; ")
            ),
        );
    }

    fn vpn_authorize(&mut self, event: ClientEvent, cid: u64, kid: u64, env: &ClientEnv) {
        let addr = env.untrusted_ip.clone();
        let Some(member) = self.member_of(&env.fingerprint) else {
            let fp: String = env.fingerprint.chars().take(16).collect();
            self.system_audit(
                "connect",
                "refused:unknown_certificate",
                format!(
                    "VPN certificate {fp} ({}) from {addr} is not a member's (unknown, removed or revoked)",
                    env.common_name
                ),
            );
            self.vpn_deny(
                cid,
                kid,
                "unknown certificate",
                "coffre: this certificate belongs to no member of the vault (unknown_certificate)",
            );
            return;
        };
        // OpenVPN 3 clients send their token with an empty user name;
        // OpenVPN flags that as `…EmptyUser`.
        let empty_user_token = env.session_state.ends_with("EmptyUser") && env.username.is_empty();
        if env.common_name != member || (env.username != member && !empty_user_token) {
            self.vpn_deny(
                cid,
                kid,
                "user name does not match the certificate",
                &format!(
                    "coffre: the user name must be {member}, as in your certificate (invalid)"
                ),
            );
            return;
        }
        // A renegotiation of a client already let in, or a reconnection
        // with a token: no password, no TOTP code, no keyslot.
        if env.has_token() || event == ClientEvent::Reauth {
            self.vpn_resume(event, cid, kid, &member, env);
            return;
        }
        let creds = match openvpn::split_credentials(&env.password) {
            Ok(c) => c,
            Err(why) => {
                self.vpn_deny(cid, kid, why, &format!("coffre: {why} (invalid)"));
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        let ticket = self.vpn.next_ticket;
        self.vpn.next_ticket += 1;
        self.vpn.pending.insert(cid, (kid, ticket));
        self.submit(
            member.clone(),
            source(env),
            Command::Enter,
            Some(creds.password.as_str()),
            creds.totp.as_deref(),
            tx,
        );
        let back = self.tx.clone();
        let token = env.session_id.clone();
        tokio::spawn(async move {
            let answer = rx
                .await
                .unwrap_or((503, error_json(ErrorCode::Busy, "the vault stopped")));
            if let Some(d) = test_answer_delay() {
                tokio::time::sleep(d).await;
            }
            let _ = back.send(Msg::VpnAnswer(VpnAnswer {
                cid,
                kid,
                ticket,
                member,
                token,
                addr,
                answer,
            }));
        });
    }

    fn vpn_resume(
        &mut self,
        event: ClientEvent,
        cid: u64,
        kid: u64,
        member: &str,
        env: &ClientEnv,
    ) {
        let locked = self.vault.is_locked();
        // Which session: the token's, or for a renegotiation without a
        // token, the one this client already holds.
        let token_valid = env.token_valid() || env.session_state == "AuthenticatedEmptyUser";
        let session = if token_valid {
            self.vpn
                .tokens
                .get(&env.session_id)
                .filter(|(m, _)| m == member)
                .map(|(_, s)| *s)
        } else if env.has_token() {
            None
        } else {
            self.vpn
                .clients
                .get(&cid)
                .filter(|c| c.member == member)
                .map(|c| c.session)
        };
        let alive = session.filter(|s| !locked && self.vault.session_member(*s) == Some(member));
        let Some(session) = alive else {
            let why = if locked {
                "the vault is locked (locked)"
            } else if env.has_token() && !token_valid {
                "your VPN token has expired: connect again with your password and TOTP code (no_session)"
            } else {
                "your vault session has ended: connect again with your password and TOTP code (no_session)"
            };
            self.system_audit(
                "vpn_resume",
                "refused",
                format!("{member} from {}: {why}", env.untrusted_ip),
            );
            self.vpn_deny(cid, kid, why, &format!("coffre: {why}"));
            return;
        };
        // Keep the session alive now: a reconnection may come late in
        // the grace period.
        self.vpn_heartbeat(member, session);
        let fresh = !self.vpn.clients.contains_key(&cid);
        self.vpn.clients.insert(
            cid,
            VpnClient {
                member: member.to_string(),
                session,
                addr: env.untrusted_ip.clone(),
            },
        );
        if !env.session_id.is_empty() {
            self.vpn
                .tokens
                .insert(env.session_id.clone(), (member.to_string(), session));
        }
        if fresh || event == ClientEvent::Connect {
            self.system_audit(
                "vpn_resume",
                "ok",
                format!(
                    "{member} reconnected from {} with their token: session {} goes on",
                    env.untrusted_ip, session.0
                ),
            );
        }
        let directives = self.vpn_directives(member);
        self.vpn_send(openvpn::client_auth(cid, kid, &directives));
    }

    pub(super) fn vpn_answer(&mut self, a: VpnAnswer) {
        let still_waiting = self.vpn.pending.get(&a.cid) == Some(&(a.kid, a.ticket));
        let session = a.answer.1["session"].as_u64().map(SessionId);
        if !still_waiting {
            // The client left (or the link went down) while we checked.
            if let Some(s) = session {
                self.vpn_leave(&a.member, s, &a.addr);
            }
            return;
        }
        self.vpn.pending.remove(&a.cid);
        // The core said yes, but a lock (or a removal) may have come in
        // since: the session must still be alive when OpenVPN is told.
        if let Some(s) = session.filter(|_| a.answer.0 == 200)
            && (self.vault.is_locked() || self.vault.session_member(s) != Some(a.member.as_str()))
        {
            let why = if self.vault.is_locked() {
                "the vault is locked (locked)"
            } else {
                "your vault session has ended: connect again with your password and TOTP code (no_session)"
            };
            self.system_audit(
                "vpn_enter",
                "refused",
                format!(
                    "{} from {}: {why}, after the password check",
                    a.member, a.addr
                ),
            );
            self.vpn_deny(a.cid, a.kid, why, &format!("coffre: {why}"));
            return;
        }
        match session.filter(|_| a.answer.0 == 200) {
            Some(session) => {
                self.vpn.clients.insert(
                    a.cid,
                    VpnClient {
                        member: a.member.clone(),
                        session,
                        addr: a.addr.clone(),
                    },
                );
                if !a.token.is_empty() {
                    self.vpn.tokens.insert(a.token, (a.member.clone(), session));
                }
                let directives = self.vpn_directives(&a.member);
                self.vpn_send(openvpn::client_auth(a.cid, a.kid, &directives));
            }
            None => {
                let reason = client_reason(&a.answer);
                self.vpn_deny(a.cid, a.kid, &reason, &reason);
            }
        }
    }

    fn vpn_disconnect(&mut self, cid: u64) {
        self.vpn.pending.remove(&cid);
        if let Some(c) = self.vpn.clients.remove(&cid) {
            let at = now_ms().plus(DEPARTURE_DELAY_MS);
            self.vpn.departing.push((c, at));
        }
    }

    /// Forgets a client at once; its session ends unless another of its
    /// connections holds it.
    fn vpn_end(&mut self, cid: u64) {
        if let Some(c) = self.vpn.clients.remove(&cid) {
            self.vpn_release(c);
        }
    }

    fn vpn_release(&mut self, c: VpnClient) {
        if self.vpn.clients.values().any(|o| o.session == c.session) {
            return;
        }
        if !self.session_alive(c.session) {
            // Already ended (lock, removal, expiry, a leave).
            self.vpn.tokens.retain(|_, (_, s)| *s != c.session);
            return;
        }
        self.vpn.tokens.retain(|_, (_, s)| *s != c.session);
        self.vpn_leave(&c.member, c.session, &c.addr);
    }

    /// A session command on the member's behalf; nobody waits for the
    /// answer (the core audits what it must).
    fn vpn_session_command(&mut self, member: &str, addr: String, command: Command) {
        let (tx, _rx) = oneshot::channel();
        let source = Source {
            door: "vpn".into(),
            addr,
        };
        self.submit(member.to_string(), source, command, None, None, tx);
    }

    fn vpn_leave(&mut self, member: &str, session: SessionId, addr: &str) {
        self.vpn_session_command(member, addr.to_string(), Command::Leave { session });
    }

    fn vpn_heartbeat(&mut self, member: &str, session: SessionId) {
        let addr = self
            .vpn
            .clients
            .values()
            .find(|c| c.session == session)
            .map(|c| c.addr.clone())
            .unwrap_or_default();
        self.vpn_session_command(member, addr, Command::Heartbeat { session });
    }

    /// The core dropped a session (lock, removal, expiry): its VPN clients
    /// are told to go and not come back on their own.
    pub(super) fn vpn_drop_session(&mut self, session: SessionId) {
        let cids: Vec<u64> = self
            .vpn
            .clients
            .iter()
            .filter(|(_, c)| c.session == session)
            .map(|(cid, _)| *cid)
            .collect();
        for cid in cids {
            self.vpn.clients.remove(&cid);
            self.vpn_send(openvpn::client_kill(cid, true));
        }
        self.vpn.tokens.retain(|_, (_, s)| *s != session);
    }

    fn session_alive(&self, session: SessionId) -> bool {
        self.vault.session_member(session).is_some()
    }

    /// Connected clients keep their sessions alive (only while OpenVPN is
    /// there to say they are connected); clients whose session ended some
    /// other way (a `leave` through the API) are disconnected.
    pub(super) fn vpn_tick(&mut self) {
        let now = now_ms();
        for (cid, who) in std::mem::take(&mut self.vpn.suspects) {
            if self.vpn.clients.contains_key(&cid) || self.vpn.pending.contains_key(&cid) {
                continue;
            }
            // Let in by someone else (a daemon before a crash): it holds
            // no session here. It may come back through us.
            self.system_audit(
                "gateway",
                "disconnected",
                format!("client {cid} ({who}) holds no vault session: disconnected"),
            );
            self.vpn_send(openvpn::client_kill(cid, false));
        }
        if self.vpn.departing.iter().any(|(_, at)| *at <= now) {
            let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.vpn.departing)
                .into_iter()
                .partition(|(_, at)| *at <= now);
            self.vpn.departing = wait;
            for (c, _) in due {
                self.vpn_release(c);
            }
        }
        if !self.vpn.up || now.0 < self.vpn.last_beat.0.saturating_add(2_000) {
            return;
        }
        self.vpn.last_beat = now;
        let ended: Vec<SessionId> = self
            .vpn
            .clients
            .values()
            .map(|c| c.session)
            .filter(|s| !self.session_alive(*s))
            .collect();
        for s in ended {
            self.vpn_drop_session(s);
        }
        let mut live: Vec<(String, SessionId)> = self
            .vpn
            .clients
            .values()
            .map(|c| (c.member.clone(), c.session))
            .collect();
        live.sort();
        live.dedup();
        for (member, session) in live {
            self.vpn_heartbeat(&member, session);
        }
    }

    pub(super) fn gateway_json(&self) -> Value {
        if self.config.gateway.is_none() {
            return json!({"configured": false});
        }
        let mut clients: Vec<Value> = self
            .vpn
            .clients
            .iter()
            .map(|(cid, c)| json!({"client_id": cid, "member": c.member, "session": c.session.0, "from": c.addr}))
            .collect();
        clients.sort_by_key(|c| c["client_id"].as_u64());
        json!({
            "configured": true,
            "openvpn_connected": self.vpn.up,
            "openvpn_pid": self.vpn.pid,
            "down_reason": self.vpn.down_why,
            "clients": clients,
            "authorizing": self.vpn.pending.len(),
        })
    }
}

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
use crate::openvpn::{self, ClientEnv, ClientEvent};
use coffre_vault::vpn::{Token, VpnBindings, VpnEffect, VpnEvent};
use coffre_vault::{Command, SessionId, Source};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// What the vault knows of OpenVPN's clients: the bindings (the rules,
/// in `coffre_vault::vpn`) and which management connection commands are
/// for.
#[derive(Default)]
pub(super) struct VpnState {
    bindings: VpnBindings,
    generation: u64,
    /// Each client's `enter` waiting for the core's answer (its ticket,
    /// and what ends the wait when dropped): dropped when the client goes,
    /// so that the core sees nobody waits (an open with nobody inside is
    /// given up; an answer nobody takes leaves its session). A later
    /// connection with the same id replaces (and so ends) an earlier wait.
    waiting: std::collections::BTreeMap<u64, (u64, oneshot::Sender<()>)>,
}

impl VpnState {
    /// The clients let in, each bound to a live session.
    pub(super) fn clients(&self) -> &std::collections::BTreeMap<u64, coffre_vault::vpn::Client> {
        self.bindings.clients()
    }
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
        door: coffre_vault::Door::Vpn,
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
        tracing::debug!(
            generation = self.vpn.generation,
            "to OpenVPN: {}",
            openvpn::summary(&cmd)
        );
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

    /// Hands `event` to the bindings and carries out what they say.
    fn vpn_event(&mut self, event: VpnEvent) {
        let effects = self.vpn.bindings.handle(now_ms(), &self.vault, event);
        // The firewall first: a client whose session ended loses its
        // access before OpenVPN is even told to drop it.
        self.net_reconcile();
        for effect in effects {
            match effect {
                VpnEffect::Enter { .. } => {}
                VpnEffect::Authorize { cid, kid, member } => {
                    let directives = self.vpn_directives(&member);
                    self.vpn_send(openvpn::client_auth(cid, kid, &directives));
                }
                VpnEffect::Deny { cid, kid, why } => self.vpn_deny(cid, kid, &why, &why),
                VpnEffect::Kill { cid, halt } => self.vpn_send(openvpn::client_kill(cid, halt)),
                VpnEffect::Leave {
                    member,
                    session,
                    addr,
                } => self.vpn_session_command(&member, addr, Command::Leave { session }),
                VpnEffect::Heartbeat {
                    member,
                    session,
                    addr,
                } => self.vpn_session_command(&member, addr, Command::Heartbeat { session }),
                VpnEffect::Audit {
                    action,
                    result,
                    detail,
                } => self.system_audit(action, result, detail),
            }
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
                // Client ids of an earlier OpenVPN (or connection) may
                // mean other clients now: their addresses are forgotten
                // until OpenVPN reports them again.
                if let Some(net) = self.net.as_mut() {
                    net.vpn_addrs = clients
                        .iter()
                        .filter_map(|l| l.virtual_address.map(|a| (l.cid, a)))
                        .collect();
                }
                self.net_vpn_up();
                let listed = clients
                    .iter()
                    .map(|l| (l.cid, format!("{} from {}", l.common_name, l.real_address)))
                    .collect();
                self.vpn_event(VpnEvent::LinkUp { pid, listed });
            }
            LinkEvent::Restarting { state } => {
                if let Some(net) = self.net.as_mut() {
                    net.vpn_addrs.clear();
                }
                self.vpn_stop_waiting(None);
                self.vpn_event(VpnEvent::Restarting { state })
            }
            LinkEvent::Down { why } => {
                if let Some(net) = self.net.as_mut() {
                    net.vpn_addrs.clear();
                }
                self.vpn_stop_waiting(None);
                self.vpn_event(VpnEvent::LinkDown { why })
            }
            LinkEvent::Address { cid, addr } => {
                if let Some(net) = self.net.as_mut() {
                    net.vpn_addrs.insert(cid, addr);
                }
                self.net_reconcile();
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
                ClientEvent::Disconnect => {
                    if let Some(net) = self.net.as_mut() {
                        net.vpn_addrs.remove(&cid);
                    }
                    self.vpn_stop_waiting(Some(cid));
                    self.vpn_event(VpnEvent::Disconnect { cid })
                }
            },
        }
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
            // The organisation's directory: the last check's word now, and
            // everyone inside checked again at the next tick.
            if let Some(why) = self.source_reauth(&member) {
                self.system_audit(
                    "vpn",
                    "refused",
                    format!("{member}: renegotiation refused: the organisation's directory: {why}"),
                );
                self.vpn_deny(
                    cid,
                    kid,
                    "not allowed by the organisation's directory",
                    "coffre: wrong password or not allowed (not_permitted)",
                );
                return;
            }
            let token_valid = env.token_valid() || env.session_state == "AuthenticatedEmptyUser";
            let token = if token_valid {
                Token::Valid
            } else if env.has_token() {
                Token::Invalid
            } else {
                Token::None
            };
            self.vpn_event(VpnEvent::Resume {
                cid,
                kid,
                member,
                token,
                session_id: env.session_id.clone(),
                addr,
                connect: event == ClientEvent::Connect,
            });
            return;
        }
        let creds = match openvpn::split_credentials(&env.password) {
            Ok(c) => c,
            Err(why) => {
                self.vpn_deny(cid, kid, why, &format!("coffre: {why} (invalid)"));
                return;
            }
        };
        let effects =
            self.vpn
                .bindings
                .handle(now_ms(), &self.vault, VpnEvent::Connect { cid, kid });
        let Some(ticket) = effects.iter().find_map(|e| match e {
            VpnEffect::Enter { ticket, .. } => Some(*ticket),
            _ => None,
        }) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
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
        // Dropped when the client goes: the wait for the core's answer
        // ends (an answer already there is still passed on).
        let (gone_tx, gone) = oneshot::channel::<()>();
        let mut rx = rx;
        tokio::spawn(async move {
            let stopped = || (503, error_json(ErrorCode::Busy, "the vault stopped"));
            let answer = tokio::select! {
                biased;
                a = &mut rx => a.unwrap_or_else(|_| stopped()),
                _ = gone => {
                    // Closed, then looked at once more: an answer that
                    // came in between is passed on (the bindings leave
                    // its session), never lost in a dropped receiver.
                    rx.close();
                    match rx.try_recv() {
                        Ok(a) => a,
                        Err(_) => return,
                    }
                }
            };
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
        self.vpn.waiting.insert(cid, (ticket, gone_tx));
    }

    /// The client's `enter` no longer waits: its client left, or OpenVPN
    /// went away with every client.
    fn vpn_stop_waiting(&mut self, cid: Option<u64>) {
        match cid {
            Some(cid) => {
                self.vpn.waiting.remove(&cid);
            }
            None => self.vpn.waiting.clear(),
        }
    }

    pub(super) fn vpn_answer(&mut self, a: VpnAnswer) {
        if self
            .vpn
            .waiting
            .get(&a.cid)
            .is_some_and(|(t, _)| *t == a.ticket)
        {
            self.vpn.waiting.remove(&a.cid);
        }
        let session = a.answer.1["session"].as_u64().map(SessionId);
        let outcome = match session.filter(|_| a.answer.0 == 200) {
            Some(s) => Ok(s),
            None => Err(client_reason(&a.answer)),
        };
        self.vpn_event(VpnEvent::Answered {
            cid: a.cid,
            kid: a.kid,
            ticket: a.ticket,
            member: a.member,
            token: a.token,
            addr: a.addr,
            outcome,
        });
    }

    /// A session command on the member's behalf; nobody waits for the
    /// answer (the core audits what it must).
    fn vpn_session_command(&mut self, member: &str, addr: String, command: Command) {
        let (tx, _rx) = oneshot::channel();
        let source = Source {
            door: coffre_vault::Door::Vpn,
            addr,
        };
        self.submit(member.to_string(), source, command, None, None, tx);
    }

    /// The core dropped a session (lock, removal, expiry): its VPN clients
    /// are told to go and not come back on their own.
    pub(super) fn vpn_drop_session(&mut self, session: SessionId) {
        self.vpn_event(VpnEvent::SessionDropped { session });
    }

    /// Departures due, suspects, and the connected clients' sessions kept
    /// alive (only while OpenVPN is there to say they are connected).
    pub(super) fn vpn_tick(&mut self) {
        self.vpn_event(VpnEvent::Tick);
    }

    pub(super) fn gateway_json(&self) -> Value {
        if self.config.gateway.is_none() {
            return json!({"configured": false});
        }
        let b = &self.vpn.bindings;
        let mut clients: Vec<Value> = b
            .clients()
            .iter()
            .map(|(cid, c)| json!({"client_id": cid, "member": c.member, "session": c.session.0, "from": c.addr}))
            .collect();
        clients.sort_by_key(|c| c["client_id"].as_u64());
        json!({
            "configured": true,
            "openvpn_connected": b.is_up(),
            "openvpn_pid": b.pid(),
            "down_reason": b.down_why(),
            "clients": clients,
            "authorizing": b.authorizing(),
        })
    }
}

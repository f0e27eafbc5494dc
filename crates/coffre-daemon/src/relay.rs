//! OpenVPN's management interface over the bus (docs/bus.md, "The
//! gateway relay"): the daemon's end ([`RelayLink`], one link per
//! connection to OpenVPN, driven by `gateway.rs` exactly as the local
//! socket is) and the VPN host's end ([`relay`], `coffre gateway relay`).
//!
//! The relay is deliberately dumb: it opens OpenVPN's socket when the
//! vault asks, seals every line it reads to the vault's X25519 key, and
//! writes the vault's signed commands to the socket. Every decision stays
//! in the vault; the broker sees neither passwords nor names, and cannot
//! forge, replay or reorder a line or a command without the link ending
//! (and the vault rebuilding its view from OpenVPN's `status`).

use crate::bus::{VAULT_COMPONENT, VaultKeys};
use crate::gateway::{SocketLink, Transport};
use base64::Engine as _;
use coffre_bus::envelope::{self, Expect, Signer};
use coffre_bus::relay::{
    ALIVE_EVERY_S, GATEWAY, KIND, RelayMsg, SILENT_S, TO_VAULT, TTL_MS, VAULT_QUEUE, relay_queue,
    sealed_aad, to_relay,
};
use coffre_bus::{Identity, Role, common_name};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use zeroize::Zeroizing;

/// Lines a sealed batch holds at most (bytes, before sealing).
const MAX_BATCH: usize = 60 << 10;
/// How long the relay has to answer an `Open`, seconds.
const OPEN_WITHIN_S: u64 = 15;
/// Lines waiting to be read by the link, at most.
const MAX_PENDING: usize = 10_000;

/// What the daemon needs to reach OpenVPN through a relay.
pub struct RelayConfig {
    /// The daemon's identity on the bus.
    pub id: Identity,
    /// The broker.
    pub url: String,
    /// The relay's component name.
    pub relay: String,
    /// The relay's public key (from `DIR/bus/components.json`).
    pub relay_key: String,
    /// The vault's signing and sealing keys.
    pub keys: Arc<VaultKeys>,
    /// Says a refused message (audited as `gateway` `refused`).
    pub refused: Box<dyn Fn(String) + Send + Sync>,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("url", &coffre_bus::conn::shown(&self.url))
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

fn lapin_err(e: lapin::Error) -> String {
    coffre_bus::conn::describe(&e)
}

/// The properties every relay message carries: not persistent, a short
/// life, the sender's broker user (the broker checks it, the receiver too).
fn props(sender: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(1)
        .with_expiration(TTL_MS.to_string().into())
        .with_user_id(common_name(sender).into())
        .with_content_type("application/json".into())
}

/// A queue of our own, for this connection's life, bound to `key`.
async fn own_queue(ch: &Channel, queue: &str, key: &str, tag: &str) -> Result<Consumer, String> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(lapin_err)?;
    ch.queue_bind(
        queue.into(),
        GATEWAY.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(lapin_err)?;
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(lapin_err)
}

/// The daemon's end of one link through the relay.
pub(crate) struct RelayLink<'a> {
    cfg: &'a RelayConfig,
    // Held: the channel and consumer live on it.
    _conn: Connection,
    ch: Channel,
    consumer: Consumer,
    link: String,
    seq_in: u64,
    seq_out: u64,
    pending: VecDeque<Zeroizing<String>>,
    heard: Instant,
}

impl<'a> RelayLink<'a> {
    /// Connects to the broker, asks the relay for a new link to OpenVPN and
    /// waits until it has one.
    pub(crate) async fn open(cfg: &'a RelayConfig) -> Result<RelayLink<'a>, String> {
        let conn = coffre_bus::connect(&cfg.url, &cfg.id)
            .await
            .map_err(|e| e.to_string())?;
        let ch = conn.create_channel().await.map_err(lapin_err)?;
        let consumer = own_queue(&ch, VAULT_QUEUE, TO_VAULT, "vault")
            .await
            .map_err(|e| format!("the vault's relay queue: {e}"))?;
        let mut l = RelayLink {
            cfg,
            _conn: conn,
            ch,
            consumer,
            link: envelope::new_nonce(),
            seq_in: 0,
            seq_out: 0,
            pending: VecDeque::new(),
            heard: Instant::now(),
        };
        let link = l.link.clone();
        l.publish(RelayMsg::Open { link: link.clone() }).await?;
        // The relay answers once connected to OpenVPN. An `Open` sent
        // while the relay was away is lost: its next sign of life without
        // our link brings it again. Anything else (another link's lines)
        // is dropped.
        let deadline = Instant::now() + Duration::from_secs(OPEN_WITHIN_S);
        loop {
            let m = tokio::time::timeout_at(deadline, l.next_msg())
                .await
                .map_err(|_| {
                    format!(
                        "the relay {} did not answer within {OPEN_WITHIN_S} s (is `coffre gateway relay` running on the VPN host?)",
                        cfg.relay
                    )
                })??;
            match m {
                RelayMsg::Opened { link: got } if got == link => return Ok(l),
                RelayMsg::Closed { link: got, why } if got == link => {
                    return Err(format!("the relay {}: {why}", cfg.relay));
                }
                RelayMsg::Alive { link: held } if held.as_deref() != Some(&link) => {
                    l.publish(RelayMsg::Open { link: link.clone() }).await?;
                }
                _ => {}
            }
        }
    }

    async fn publish(&self, msg: RelayMsg) -> Result<(), String> {
        let c = self.cfg;
        let h = envelope::header(
            &c.id.vault,
            VAULT_COMPONENT,
            &c.relay,
            KIND,
            u64::from(TTL_MS / 1000),
            msg.to_value(),
        );
        let bytes = c.keys.signer.seal_envelope(&h);
        self.ch
            .basic_publish(
                GATEWAY.into(),
                to_relay(&c.relay).into(),
                BasicPublishOptions::default(),
                &bytes,
                props(VAULT_COMPONENT),
            )
            .await
            .map_err(lapin_err)?;
        Ok(())
    }

    /// The next message from the relay that checks out; refused ones are
    /// reported and skipped. Cancel-safe: it only waits on the consumer.
    async fn next_msg(&mut self) -> Result<RelayMsg, String> {
        let c = self.cfg;
        loop {
            let d = tokio::time::timeout_at(
                self.heard + Duration::from_secs(SILENT_S),
                self.consumer.next(),
            )
            .await
            .map_err(|_| format!("the relay {} said nothing for {SILENT_S} s", c.relay))?
            .ok_or("the broker closed the connection")?
            .map_err(lapin_err)?;
            let user = d
                .properties
                .user_id()
                .as_ref()
                .map(|u| u.as_str().to_string());
            let expect = Expect {
                vault: &c.id.vault,
                to: VAULT_COMPONENT,
                now: envelope::now(),
            };
            let h = match envelope::open(&d.data, user.as_deref(), &expect, |from| {
                (from == c.relay).then(|| c.relay_key.clone())
            }) {
                Ok(h) if h.kind == KIND => h,
                Ok(h) => {
                    (c.refused)(format!(
                        "a {:?} message from {} on the relay's queue",
                        h.kind, h.from
                    ));
                    continue;
                }
                Err(r) => {
                    (c.refused)(format!("a message on the relay's queue: {r}"));
                    continue;
                }
            };
            match RelayMsg::from_value(h.body) {
                Ok(m) => {
                    self.heard = Instant::now();
                    return Ok(m);
                }
                Err(e) => (c.refused)(format!("a message from the relay {}: {e}", c.relay)),
            }
        }
    }
}

impl Transport for RelayLink<'_> {
    async fn line(&mut self) -> Result<Zeroizing<String>, String> {
        loop {
            if let Some(l) = self.pending.pop_front() {
                return Ok(l);
            }
            match self.next_msg().await? {
                RelayMsg::Lines { link, seq, sealed } if link == self.link => {
                    if seq != self.seq_in + 1 {
                        return Err(format!(
                            "message {} from the relay {} never came (got {seq}): the link starts again",
                            self.seq_in + 1,
                            self.cfg.relay
                        ));
                    }
                    self.seq_in = seq;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(sealed.as_bytes())
                        .map_err(|_| "the relay sent lines that are not base64".to_string())?;
                    let plain = self
                        .cfg
                        .keys
                        .opener
                        .open(&sealed_aad(&link, seq), &raw)
                        .map_err(|e| e.to_string())?;
                    for l in plain.split(|&b| b == b'\n') {
                        let mut l = l;
                        while let [rest @ .., b'\r'] = l {
                            l = rest;
                        }
                        if l.is_empty() {
                            continue;
                        }
                        if l.len() > crate::openvpn::MAX_LINE {
                            return Err("the relay sent an overlong line".into());
                        }
                        self.pending
                            .push_back(Zeroizing::new(String::from_utf8_lossy(l).into_owned()));
                    }
                    if self.pending.len() > MAX_PENDING {
                        return Err("the relay sent more lines than the vault keeps waiting".into());
                    }
                }
                RelayMsg::Closed { link, why } if link == self.link => {
                    return Err(format!("the relay {}: {why}", self.cfg.relay));
                }
                RelayMsg::Alive { link } if link.as_deref() != Some(&self.link) => {
                    return Err(format!(
                        "the relay {} no longer holds this link (it restarted?)",
                        self.cfg.relay
                    ));
                }
                _ => {}
            }
        }
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.seq_out += 1;
        self.publish(RelayMsg::Cmd {
            link: self.link.clone(),
            seq: self.seq_out,
            text: text.to_string(),
        })
        .await
    }
}

/// The VPN host's end: `coffre gateway relay`. Connects to the broker as
/// `id` (a gateway component), opens OpenVPN's management socket `sock`
/// whenever the vault asks, and carries lines and commands, for ever;
/// reconnects to the broker with backoff (1 s doubling to 30 s). Returns
/// only if the identity cannot be used. `say` reports each change.
pub async fn relay(
    id: Identity,
    url: String,
    sock: PathBuf,
    say: impl Fn(String),
) -> Result<std::convert::Infallible, String> {
    if id.role != Role::Gateway {
        return Err(format!(
            "{} is a {} identity: the relay needs a gateway one (`coffre bus identity DIR NAME --role gateway`)",
            id.name,
            id.role.as_str()
        ));
    }
    if id.vault_sign_key.is_empty() || id.vault_seal_key.is_empty() {
        return Err("the identity carries no vault keys: issue it again with this version".into());
    }
    let signer = Signer::from_pem(&id.key_pem).map_err(|e| e.to_string())?;
    let seal_to = envelope::unhex(&id.vault_seal_key).ok_or("bad vault sealing key")?;
    let mut delay = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let Err(why) = relay_session(&id, &url, &sock, &signer, &seal_to, &say).await;
        if started.elapsed() > Duration::from_secs(60) {
            delay = Duration::from_secs(1);
        }
        say(format!(
            "the broker at {}: {why}; trying again in {} s",
            coffre_bus::conn::shown(&url),
            delay.as_secs()
        ));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// OpenVPN's socket, held for one link.
struct Held {
    link: String,
    sock: SocketLink,
    seq_in: u64,
    seq_out: u64,
}

struct RelaySide<'a> {
    id: &'a Identity,
    signer: &'a Signer,
    ch: Channel,
}

impl RelaySide<'_> {
    async fn send(&self, msg: RelayMsg) -> Result<(), String> {
        let h = envelope::header(
            &self.id.vault,
            &self.id.name,
            VAULT_COMPONENT,
            KIND,
            u64::from(TTL_MS / 1000),
            msg.to_value(),
        );
        let bytes = self.signer.seal_envelope(&h);
        self.ch
            .basic_publish(
                GATEWAY.into(),
                TO_VAULT.into(),
                BasicPublishOptions::default(),
                &bytes,
                props(&self.id.name),
            )
            .await
            .map_err(lapin_err)?;
        Ok(())
    }
}

async fn relay_session(
    id: &Identity,
    url: &str,
    sock: &Path,
    signer: &Signer,
    seal_to: &[u8],
    say: &impl Fn(String),
) -> Result<std::convert::Infallible, String> {
    let conn = coffre_bus::connect(url, id)
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(lapin_err)?;
    let mut consumer = own_queue(&ch, &relay_queue(&id.name), &to_relay(&id.name), "relay").await?;
    let side = RelaySide { id, signer, ch };
    say(format!(
        "connected to the broker at {}; waiting for the vault",
        coffre_bus::conn::shown(url)
    ));
    let mut held: Option<Held> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(ALIVE_EVERY_S));
    loop {
        tokio::select! {
            d = consumer.next() => {
                let d = d.ok_or("the broker closed the connection")?.map_err(lapin_err)?;
                let user = d.properties.user_id().as_ref().map(|u| u.as_str().to_string());
                let expect = Expect { vault: &id.vault, to: &id.name, now: envelope::now() };
                let h = match envelope::open(&d.data, user.as_deref(), &expect, |from| {
                    (from == VAULT_COMPONENT).then(|| id.vault_sign_key.clone())
                }) {
                    Ok(h) if h.kind == KIND => h,
                    Ok(h) => { say(format!("ignored a {:?} message", h.kind)); continue; }
                    Err(r) => { say(format!("refused a message: {r}")); continue; }
                };
                let msg = match RelayMsg::from_value(h.body) {
                    Ok(m) => m,
                    Err(e) => { say(format!("refused a message from the vault: {e}")); continue; }
                };
                match msg {
                    RelayMsg::Open { link } => {
                        // A new link replaces the old one: OpenVPN sees a
                        // new management connection.
                        held = None;
                        match crate::gateway::connect_socket(sock).await {
                            Ok(s) => {
                                side.send(RelayMsg::Opened { link: link.clone() }).await?;
                                say(format!("the vault opened link {}", &link[..8.min(link.len())]));
                                held = Some(Held { link, sock: s, seq_in: 0, seq_out: 0 });
                            }
                            Err(why) => {
                                say(why.clone());
                                side.send(RelayMsg::Closed { link, why }).await?;
                            }
                        }
                    }
                    RelayMsg::Cmd { link, seq, text } => {
                        let Some(h) = held.as_mut().filter(|h| h.link == link) else { continue };
                        let r = if seq == h.seq_in + 1 {
                            h.seq_in = seq;
                            h.sock.send(&text).await
                        } else {
                            Err(format!("command {} from the vault never came (got {seq})", h.seq_in + 1))
                        };
                        if let Err(why) = r {
                            say(why.clone());
                            held = None;
                            side.send(RelayMsg::Closed { link, why }).await?;
                        }
                    }
                    _ => {}
                }
            }
            line = async {
                match held.as_mut() {
                    Some(h) => h.sock.line().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(h) = held.as_mut() else { continue };
                match line {
                    Ok(first) => {
                        // What is already here goes in the same message.
                        let mut batch = Zeroizing::new(String::with_capacity(MAX_BATCH + crate::openvpn::MAX_LINE + 2));
                        batch.push_str(&first);
                        batch.push('\n');
                        while batch.len() < MAX_BATCH
                            && let Some(l) = h.sock.ready_line()
                        {
                            batch.push_str(&l);
                            batch.push('\n');
                        }
                        h.seq_out += 1;
                        let sealed = envelope::seal(seal_to, &sealed_aad(&h.link, h.seq_out), batch.as_bytes())
                            .map_err(|e| e.to_string())?;
                        let sealed = base64::engine::general_purpose::STANDARD.encode(sealed);
                        side.send(RelayMsg::Lines { link: h.link.clone(), seq: h.seq_out, sealed }).await?;
                    }
                    Err(why) => {
                        let link = h.link.clone();
                        held = None;
                        say(why.clone());
                        side.send(RelayMsg::Closed { link, why }).await?;
                    }
                }
            }
            _ = tick.tick() => {
                side.send(RelayMsg::Alive { link: held.as_ref().map(|h| h.link.clone()) }).await?;
            }
        }
    }
}

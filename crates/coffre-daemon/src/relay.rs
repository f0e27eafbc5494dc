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
use coffre_bus::envelope::{self, Expect, Opener, Replays, Signer};
use coffre_bus::relay::{
    ALIVE_EVERY_S, GATEWAY, KIND, RelayMsg, SILENT_S, TTL_MS, VAULT_QUEUE, VAULT_QUEUE_MAX,
    batch_lines, cmd_aad, relay_queue, sealed_aad, to_relay, to_vault,
};
use coffre_bus::{Identity, Role, common_name};
use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
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
/// How long a publish or a write to OpenVPN may take: a broker that
/// blocks its publishers (a memory or disk alarm) ends the link instead of
/// freezing it.
const WRITE_WITHIN: Duration = Duration::from_secs(10);
/// Refusals on the relay's queue are audited at most this often (with a
/// count of those not said).
const REFUSAL_EVERY: Duration = Duration::from_secs(10);
/// Lines waiting to be read by the link, at most.
const MAX_PENDING: usize = 10_000;
/// The relay's longest wait between two tries at the broker.
const RECONNECT_AT_MOST: Duration = Duration::from_secs(4);

/// What the daemon needs to reach OpenVPN through a relay.
pub struct RelayConfig {
    /// The daemon's identity on the bus.
    pub id: Identity,
    /// The broker.
    pub url: String,
    /// The relay's component name.
    pub relay: String,
    /// The vault directory: the relay's keys are read from
    /// `DIR/bus/components.json` at each new link (a reissued or forgotten
    /// relay counts without a restart).
    pub dir: PathBuf,
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

/// Publishes within [`WRITE_WITHIN`].
async fn publish(ch: &Channel, key: &str, bytes: &[u8], sender: &str) -> Result<(), String> {
    let sent = ch.basic_publish(
        GATEWAY.into(),
        key.into(),
        BasicPublishOptions::default(),
        bytes,
        props(sender),
    );
    tokio::time::timeout(WRITE_WITHIN, sent)
        .await
        .map_err(|_| {
            format!(
                "the broker took no message for {} s",
                WRITE_WITHIN.as_secs()
            )
        })?
        .map_err(lapin_err)?;
    Ok(())
}

/// A queue of our own, for this connection's life, bound to `key`,
/// bounded (the broker refuses beyond), consumed with acknowledgements a
/// window at a time (so lapin never holds more than that in memory).
async fn own_queue(ch: &Channel, queue: &str, key: &str, tag: &str) -> Result<Consumer, String> {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongUInt(VAULT_QUEUE_MAX));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args.insert("x-message-ttl".into(), AMQPValue::LongUInt(TTL_MS));
    ch.basic_qos(64, BasicQosOptions::default())
        .await
        .map_err(lapin_err)?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        args,
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
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(lapin_err)
}

/// An [`Inbox`]'s source (`Sync`: a link is shared across its awaits).
type Deliveries<D> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<D, String>> + Send + Sync>>;

/// What an [`Inbox`] needs of a delivery: its acknowledgement.
trait Ack {
    /// Acknowledges it. An acknowledgement is under way from the first
    /// poll, and asked again after that it answers at once (lapin's acker
    /// acknowledges once: later calls give `Ok(false)`).
    fn ack(&self) -> BoxFuture<'_, Result<(), String>>;
}

impl Ack for lapin::message::Delivery {
    fn ack(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.acker
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(lapin_err)
        })
    }
}

/// A queue's deliveries, with a wait for the next one that is
/// cancel-safe: both ends wait on it inside `select!` (the daemon's link
/// against the vault's commands, the relay against OpenVPN's lines and
/// its tick), and a wait that is dropped must lose nothing. A delivery
/// taken from the broker stays here until it is handed over: dropping the
/// wait while its acknowledgement was on its way (a command for OpenVPN
/// taken, and gone when OpenVPN's answer to the previous command won the
/// `select!`) lost a lock's `client-kill` until the link timed out.
struct Inbox<D = lapin::message::Delivery> {
    deliveries: Deliveries<D>,
    taken: Option<D>,
}

impl Inbox {
    fn of(consumer: Consumer) -> Self {
        Inbox::new(Box::pin(consumer.map(|d| d.map_err(lapin_err))))
    }
}

impl<D: Ack> Inbox<D> {
    fn new(deliveries: Deliveries<D>) -> Self {
        Self {
            deliveries,
            taken: None,
        }
    }

    /// The next delivery, acknowledged at once (what it holds is judged
    /// after; a link lost meanwhile rebuilds from OpenVPN's status
    /// anyway).
    async fn next(&mut self) -> Result<D, String> {
        if self.taken.is_none() {
            let d = self
                .deliveries
                .next()
                .await
                .ok_or("the broker closed the connection")??;
            self.taken = Some(d);
        }
        if let Some(d) = &self.taken
            && let Err(e) = d.ack().await
        {
            // Not handed over unacknowledged by a later call: the broker
            // redelivers what was not acknowledged.
            self.taken = None;
            return Err(e);
        }
        self.taken
            .take()
            .ok_or_else(|| "a delivery handed over twice".to_string())
    }
}

/// A relay's keys as `DIR/bus/components.json` holds them now.
fn relay_keys(dir: &Path, relay: &str) -> Result<(String, Vec<u8>), String> {
    let comps =
        crate::bus::components(&crate::vaultdir::VaultDir::new(dir)).map_err(|e| e.to_string())?;
    let c = comps
        .iter()
        .find(|c| c.name == relay && c.role == Role::Gateway)
        .ok_or_else(|| {
            format!("the relay {relay:?} is not a gateway component (`coffre bus identity DIR {relay} --role gateway`)")
        })?;
    let seal = envelope::unhex(&c.seal_public).filter(|k| k.len() == 32);
    match (c.public_key.is_empty(), seal) {
        (false, Some(seal)) => Ok((c.public_key.clone(), seal)),
        _ => Err(format!(
            "the relay {relay:?} was issued by an older version: issue its identity again"
        )),
    }
}

/// The daemon's end of one link through the relay.
pub(crate) struct RelayLink<'a> {
    cfg: &'a RelayConfig,
    // Held: the channel and consumer live on it.
    _conn: Connection,
    ch: Channel,
    inbox: Inbox,
    link: String,
    seq_in: u64,
    seq_out: u64,
    pending: VecDeque<Zeroizing<String>>,
    heard: Instant,
    /// The relay's signing key (hex) and sealing key.
    relay_key: String,
    relay_seal: Vec<u8>,
    replays: Replays,
    /// Commands sent and not yet reported written by the relay.
    unacked: VecDeque<(u64, Instant)>,
    /// Refusals not audited yet, and when the last one was.
    refusals: (u64, Option<Instant>),
}

impl<'a> RelayLink<'a> {
    /// Connects to the broker, asks the relay for a new link to OpenVPN and
    /// waits until it has one.
    pub(crate) async fn open(cfg: &'a RelayConfig) -> Result<RelayLink<'a>, String> {
        let (relay_key, relay_seal) = relay_keys(&cfg.dir, &cfg.relay)?;
        let conn = coffre_bus::connect(&cfg.url, &cfg.id)
            .await
            .map_err(|e| e.to_string())?;
        let ch = conn.create_channel().await.map_err(lapin_err)?;
        let consumer = own_queue(&ch, VAULT_QUEUE, &to_vault(&cfg.relay), "vault")
            .await
            .map_err(|e| format!("the vault's relay queue: {e}"))?;
        let mut l = RelayLink {
            cfg,
            _conn: conn,
            ch,
            inbox: Inbox::of(consumer),
            link: envelope::new_nonce(),
            seq_in: 0,
            seq_out: 0,
            pending: VecDeque::new(),
            heard: Instant::now(),
            relay_key,
            relay_seal,
            replays: Replays::default(),
            unacked: VecDeque::new(),
            refusals: (0, None),
        };
        let link = l.link.clone();
        l.publish(RelayMsg::Open { link: link.clone() }).await?;
        // The relay answers once connected to OpenVPN. An `Open` sent
        // while the relay was away is lost: its next sign of life without
        // our link brings it again, and the relay then has the whole
        // OPEN_WITHIN_S to answer that one (counted from the first, a
        // relay that came up late, under load, was given too little and
        // the vault started over with a new link, again and again). A
        // relay alive that never takes the link is given up on after four
        // such waits. Anything else (another link's lines) is dropped.
        let within = Duration::from_secs(OPEN_WITHIN_S);
        let asked = Instant::now();
        let give_up = asked + 4 * within;
        let mut deadline = asked + within;
        loop {
            let m = tokio::time::timeout_at(deadline, l.next_msg())
                .await
                .map_err(|_| {
                    format!(
                        "the relay {} did not open a link in {} s (is `coffre gateway relay` running on the VPN host?)",
                        cfg.relay,
                        asked.elapsed().as_secs()
                    )
                })??;
            match m {
                RelayMsg::Opened { link: got } if got == link => return Ok(l),
                RelayMsg::Closed { link: got, why } if got == link => {
                    return Err(format!("the relay {}: {why}", cfg.relay));
                }
                RelayMsg::Alive { link: held, .. } if held.as_deref() != Some(&link) => {
                    l.publish(RelayMsg::Open { link: link.clone() }).await?;
                    deadline = (Instant::now() + within).min(give_up);
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
        publish(&self.ch, &to_relay(&c.relay), &bytes, VAULT_COMPONENT).await
    }

    /// Audits a refused message, at most once per [`REFUSAL_EVERY`].
    fn refused(&mut self, why: String) {
        let (n, last) = &mut self.refusals;
        *n += 1;
        if last.is_none_or(|t| t.elapsed() >= REFUSAL_EVERY) {
            let more = if *n > 1 {
                format!(" ({} more refused since the last record)", *n - 1)
            } else {
                String::new()
            };
            (self.cfg.refused)(format!("{why}{more}"));
            *n = 0;
            *last = Some(Instant::now());
        }
    }

    /// The next message from the relay that checks out; refused ones are
    /// reported and skipped. Cancel-safe: it only waits on the inbox.
    async fn next_msg(&mut self) -> Result<RelayMsg, String> {
        let c = self.cfg;
        loop {
            let d = tokio::time::timeout_at(
                self.heard + Duration::from_secs(SILENT_S),
                self.inbox.next(),
            )
            .await
            .map_err(|_| format!("the relay {} said nothing for {SILENT_S} s", c.relay))??;
            let user = d
                .properties
                .user_id()
                .as_ref()
                .map(|u| u.as_str().to_string());
            let now = envelope::now();
            let expect = Expect {
                vault: &c.id.vault,
                to: VAULT_COMPONENT,
                now,
            };
            let key = self.relay_key.clone();
            let h = match envelope::open(&d.data, user.as_deref(), &expect, |from| {
                (from == c.relay).then(|| key.clone())
            })
            .and_then(|h| self.replays.take(&h, now).map(|()| h))
            {
                Ok(h) if h.kind == KIND => h,
                Ok(h) => {
                    self.refused(format!(
                        "a {:?} message from {} on the relay's queue",
                        h.kind, h.from
                    ));
                    continue;
                }
                Err(r) => {
                    self.refused(format!("a message on the relay's queue: {r}"));
                    continue;
                }
            };
            match RelayMsg::from_value(h.body) {
                Ok(m) => {
                    self.heard = Instant::now();
                    return Ok(m);
                }
                Err(e) => self.refused(format!("a message from the relay {}: {e}", c.relay)),
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
                    self.pending
                        .extend(batch_lines(&plain, crate::openvpn::MAX_LINE)?);
                    if self.pending.len() > MAX_PENDING {
                        return Err("the relay sent more lines than the vault keeps waiting".into());
                    }
                }
                RelayMsg::Closed { link, why } if link == self.link => {
                    return Err(format!("the relay {}: {why}", self.cfg.relay));
                }
                RelayMsg::Alive { link, .. } if link.as_deref() != Some(&self.link) => {
                    return Err(format!(
                        "the relay {} no longer holds this link (it restarted?)",
                        self.cfg.relay
                    ));
                }
                RelayMsg::Alive { lines, cmds, .. } => {
                    // Messages from one sender arrive in order: lines it
                    // says it sent and that never came are lost.
                    if lines > self.seq_in {
                        return Err(format!(
                            "lines {}..{lines} from the relay {} never came: the link starts again",
                            self.seq_in + 1,
                            self.cfg.relay
                        ));
                    }
                    while self.unacked.front().is_some_and(|(seq, _)| *seq <= cmds) {
                        self.unacked.pop_front();
                    }
                    if self
                        .unacked
                        .front()
                        .is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(SILENT_S))
                    {
                        return Err(format!(
                            "command {} never reached the relay {}: the link starts again",
                            cmds + 1,
                            self.cfg.relay
                        ));
                    }
                }
                _ => {}
            }
        }
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.seq_out += 1;
        let sealed = envelope::seal(
            &self.relay_seal,
            &cmd_aad(&self.link, self.seq_out),
            text.as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        self.unacked.push_back((self.seq_out, Instant::now()));
        self.publish(RelayMsg::Cmd {
            link: self.link.clone(),
            seq: self.seq_out,
            sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
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
    if id.seal_key.is_empty() {
        return Err(
            "the identity carries no sealing key of its own: issue it again with this version"
                .into(),
        );
    }
    let opener = Opener::from_hex(&id.seal_key).map_err(|e| e.to_string())?;
    // Members' sessions ride on this link, and the vault keeps them only
    // for its grace period without news: after a broker restart the relay
    // must be back within seconds of it, not after a 16 s wait.
    let mut backoff = coffre_bus::conn::Backoff::up_to(RECONNECT_AT_MOST);
    // Kept across the broker's sessions: a broker that cuts the relay's
    // connection must not get the vault's messages taken again on the
    // next one.
    let mut replays = Replays::default();
    loop {
        let started = Instant::now();
        let keys = RelayKeys {
            signer: &signer,
            seal_to: &seal_to,
            opener: &opener,
        };
        let Err(why) = relay_session(&id, &url, &sock, (&keys, &mut replays), &say).await;
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        say(format!(
            "the broker at {}: {why}; trying again in {} s",
            coffre_bus::conn::shown(&url),
            backoff.next_wait().as_secs()
        ));
        backoff.wait().await;
    }
}

/// OpenVPN's socket, held for one link.
struct Held {
    link: String,
    sock: SocketLink,
    seq_in: u64,
    seq_out: u64,
}

/// The relay's keys: its own (signing, opening commands) and the vault's
/// (sealing lines).
struct RelayKeys<'a> {
    signer: &'a Signer,
    seal_to: &'a [u8],
    opener: &'a Opener,
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
        publish(&self.ch, &to_vault(&self.id.name), &bytes, &self.id.name).await
    }
}

async fn relay_session(
    id: &Identity,
    url: &str,
    sock: &Path,
    (keys, replays): (&RelayKeys<'_>, &mut Replays),
    say: &impl Fn(String),
) -> Result<std::convert::Infallible, String> {
    let (signer, seal_to) = (keys.signer, keys.seal_to);
    let conn = coffre_bus::connect(url, id)
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(lapin_err)?;
    let mut inbox =
        Inbox::of(own_queue(&ch, &relay_queue(&id.name), &to_relay(&id.name), "relay").await?);
    let side = RelaySide { id, signer, ch };
    say(format!(
        "connected to the broker at {}; waiting for the vault",
        coffre_bus::conn::shown(url)
    ));
    let mut held: Option<Held> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(ALIVE_EVERY_S));
    loop {
        tokio::select! {
            d = inbox.next() => {
                let d = d?;
                let user = d.properties.user_id().as_ref().map(|u| u.as_str().to_string());
                let now = envelope::now();
                let expect = Expect { vault: &id.vault, to: &id.name, now };
                let h = match envelope::open(&d.data, user.as_deref(), &expect, |from| {
                    (from == VAULT_COMPONENT).then(|| id.vault_sign_key.clone())
                })
                .and_then(|h| replays.take(&h, now).map(|()| h))
                {
                    Ok(h) if h.kind == KIND => h,
                    Ok(h) => { say(format!("ignored a {:?} message", h.kind)); continue; }
                    Err(r) => { say(format!("refused a message: {r}")); continue; }
                };
                let msg = match RelayMsg::from_value(h.body) {
                    Ok(m) => m,
                    Err(e) => { say(format!("refused a message from the vault: {e}")); continue; }
                };
                match msg {
                    RelayMsg::Open { link } if held.as_ref().is_some_and(|h| h.link == link) => {
                        // Asked again (our `Opened` crossed its resend):
                        // the link stands.
                        side.send(RelayMsg::Opened { link }).await?;
                    }
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
                    RelayMsg::Cmd { link, seq, sealed } => {
                        let Some(h) = held.as_mut().filter(|h| h.link == link) else { continue };
                        let r = if seq == h.seq_in + 1 {
                            h.seq_in = seq;
                            match base64::engine::general_purpose::STANDARD
                                .decode(sealed.as_bytes())
                                .map_err(|_| "a command that is not base64".to_string())
                                .and_then(|b| keys.opener.open(&cmd_aad(&link, seq), &b).map_err(|e| e.to_string()))
                                .and_then(|t| String::from_utf8(t.to_vec()).map(Zeroizing::new).map_err(|_| "a command that is not text".to_string()))
                            {
                                Ok(text) => {
                                    tracing::debug!(seq, "command to OpenVPN: {}", crate::openvpn::summary(&text));
                                    tokio::time::timeout(WRITE_WITHIN, h.sock.send(&text))
                                    .await
                                    .unwrap_or_else(|_| Err("OpenVPN took no command for 10 s".into()))
                                }
                                Err(e) => Err(e),
                            }
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
                let (link, lines, cmds) = held
                    .as_ref()
                    .map_or((None, 0, 0), |h| (Some(h.link.clone()), h.seq_out, h.seq_in));
                side.send(RelayMsg::Alive { link, lines, cmds }).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Ack, Inbox};
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A delivery whose acknowledgement takes a while the first time, and
    /// answers at once when asked again. This stands for lapin's acker
    /// (4.12): its `ack` sends at the first poll and marks itself used, and
    /// a second call returns `Ok(false)` at once without sending. If a
    /// lapin upgrade changes that, [`Ack`]'s impl for `Delivery` must keep
    /// it (a second ack of one delivery closes the channel).
    struct Slow(u32, AtomicBool);

    impl Ack for Slow {
        fn ack(&self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                if !self.1.swap(true, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(())
            })
        }
    }

    /// Every delivery comes out, in order, although each wait is dropped
    /// while its acknowledgement is on its way (another branch of the
    /// `select!` is ready first every time): taking a delivery and
    /// awaiting its ack in one future lost them all.
    #[test]
    fn a_wait_dropped_during_an_acknowledgement_loses_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let n = 50;
            let mut inbox = Inbox::new(Box::pin(futures::stream::iter(
                (0..n).map(|i| Ok(Slow(i, AtomicBool::new(false)))),
            )));
            let mut got = Vec::new();
            let mut waits = 0;
            while got.len() < n as usize && waits < 10 * n {
                waits += 1;
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    d = inbox.next() => got.push(d.unwrap().0),
                }
            }
            assert_eq!(got, (0..n).collect::<Vec<_>>());
            // Each delivery's first wait was dropped mid-ack, and its
            // second handed it over: the case under test really happened.
            assert_eq!(waits, 2 * n);
        });
    }

    /// A failed acknowledgement is an error, and the delivery is not
    /// handed over unacknowledged by the next call (the broker redelivers
    /// it): the next call takes the next delivery.
    #[test]
    fn a_failed_acknowledgement_hands_nothing_over() {
        struct Fails(u32);
        impl Ack for Fails {
            fn ack(&self) -> BoxFuture<'_, Result<(), String>> {
                let fails = self.0 == 0;
                Box::pin(async move {
                    if fails {
                        Err("channel closed".to_string())
                    } else {
                        Ok(())
                    }
                })
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut inbox = Inbox::new(Box::pin(futures::stream::iter(
                (0..2).map(|i| Ok(Fails(i))),
            )));
            assert_eq!(inbox.next().await.err().as_deref(), Some("channel closed"));
            assert_eq!(inbox.next().await.map(|d| d.0), Ok(1));
        });
    }
}

//! Commands over the bus, the vault's end (docs/bus.md, "Commands"):
//! schedulers' signed commands from the durable queue
//! [`coffre_bus::command::VAULT_QUEUE`], checked, handed to the core, and
//! answered.
//!
//! Order of checks: the envelope (signature by a scheduler's key as
//! `DIR/bus/components.json` holds it now, so a forgotten component is
//! refused at once; the broker's `user_id`; this vault; freshness), then
//! its nonce (never seen, seen ones kept on disk until they expire, so a
//! restart reopens no window), then the component's rights (the member,
//! the duration). Anything refused there is rejected into the dead letters
//! and audited (`bus_command`, `refused`); an authentic sender also gets
//! the reason. What passes goes to the core like a member's command, from
//! the door `bus`; its nonce is written to disk and only then is the
//! message acknowledged to the broker, and the answer published.

use crate::bus::{Component, VAULT_COMPONENT, VaultKeys};
use coffre_bus::command::{self, BusCommand, COMMANDS, REPLY_KIND, Reply, VAULT_QUEUE, to_reply};
use coffre_bus::envelope::{self, Expect, Header, Refusal};
use coffre_bus::{Identity, Role, common_name};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Nonces kept at most (each for at most an envelope's life): beyond,
/// commands are refused until old ones expire.
const MAX_NONCES: usize = 100_000;

/// What the command consumer needs.
pub struct CommandsConfig {
    /// The daemon's identity on the bus.
    pub id: Identity,
    /// The broker.
    pub url: String,
    /// The vault's signing key (replies).
    pub keys: Arc<VaultKeys>,
    /// The vault directory (components, nonces).
    pub dir: PathBuf,
}

/// Hands a command to the core: (member, component, command) → the
/// door's answer.
pub type Submit = Box<
    dyn Fn(String, String, coffre_vault::Command) -> oneshot::Receiver<(u16, Value)> + Send + Sync,
>;

/// Says something for the audit log (`bus_command`: outcome, detail).
pub type Report = Box<dyn Fn(&'static str, String) + Send + Sync>;

/// One applied command: until when its nonce counts, and the answer it
/// got (sent again if the broker delivers it again).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Applied {
    exp: u64,
    answer: Value,
}

/// The nonces of applied commands, with their answers, until they expire
/// (`DIR/bus/nonces.json`, 0600, rewritten atomically).
#[derive(Debug)]
pub struct Nonces {
    path: PathBuf,
    seen: BTreeMap<String, Applied>,
}

impl Nonces {
    /// Loads the file (none yet: empty). A file that does not parse is an
    /// error: commands are not served rather than replays let in.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("bus").join("nonces.json");
        let seen = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut n = Self { path, seen };
        let now = envelope::now();
        n.prune(now);
        // No command lives longer than this: an expiry beyond it is a
        // damaged file's, and would hold its place forever.
        let latest = now.saturating_add(envelope::MAX_LIFE_S + envelope::SKEW_S);
        n.seen.retain(|_, a| a.exp <= latest);
        Ok(n)
    }

    fn prune(&mut self, now: u64) {
        self.seen
            .retain(|_, a| a.exp.saturating_add(envelope::SKEW_S) >= now);
    }

    /// The answer `from`'s command `nonce` got, if it was applied: one
    /// sender never gets another's (a file written before answers were
    /// kept by sender holds bare nonces, for their short life).
    fn answer(&self, from: &str, nonce: &str) -> Option<&Value> {
        self.seen
            .get(&Self::key(from, nonce))
            .or_else(|| self.seen.get(nonce))
            .map(|a| &a.answer)
    }

    fn key(from: &str, nonce: &str) -> String {
        format!("{from} {nonce}")
    }

    /// Whether there is room for one more (after forgetting expired ones).
    fn full(&mut self, now: u64) -> bool {
        if self.seen.len() >= MAX_NONCES {
            self.prune(now);
        }
        self.seen.len() >= MAX_NONCES
    }

    /// Records `nonce` (valid until `exp`) with its answer, forgets
    /// expired ones, and writes the file before returning.
    fn record(
        &mut self,
        (from, nonce): (&str, &str),
        exp: u64,
        answer: Value,
        now: u64,
    ) -> Result<(), String> {
        self.prune(now);
        self.seen
            .insert(Self::key(from, nonce), Applied { exp, answer });
        let bytes = serde_json::to_vec(&self.seen).expect("nonces serialise");
        crate::vaultdir::write_atomic(&self.path, &bytes, 0o600).map_err(|e| e.to_string())
    }
}

/// What a delivery turned out to be.
enum Verdict {
    /// Refused before the core: why, and whom to tell (an authentic
    /// sender).
    Refused(String, Option<Header>),
    /// To apply.
    Apply(Header, BusCommand, Component),
    /// Applied already, and delivered again: its answer again, nothing
    /// applied. `true` when the broker did not say it was a redelivery (a
    /// replay, or a broker that dropped the answer: said in the audit
    /// log either way).
    Again(Header, Value, bool),
}

fn schedulers(dir: &Path) -> Vec<Component> {
    crate::bus::components(&crate::vaultdir::VaultDir::new(dir))
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.role == Role::Scheduler && !c.public_key.is_empty())
        .collect()
}

fn judge(
    cfg: &CommandsConfig,
    nonces: &mut Nonces,
    data: &[u8],
    user: Option<&str>,
    redelivered: bool,
) -> Verdict {
    let comps = schedulers(&cfg.dir);
    let now = envelope::now();
    let expect = Expect {
        vault: &cfg.id.vault,
        to: VAULT_COMPONENT,
        now,
    };
    let h = match envelope::open(data, user, &expect, |from| {
        comps
            .iter()
            .find(|c| c.name == from)
            .map(|c| c.public_key.clone())
    }) {
        Ok(h) => h,
        Err(r) => {
            // Only a signature that verified makes the sender worth an
            // answer.
            let authentic = matches!(
                r,
                Refusal::Misaddressed { .. } | Refusal::Stale(_) | Refusal::Replay(_)
            );
            let who = envelope::peek(data).ok().filter(|_| authentic);
            return Verdict::Refused(r.to_string(), who);
        }
    };
    let from = h.from.clone();
    if let Err(why) = command::check_header(&h) {
        return Verdict::Refused(why, Some(h));
    }
    // However it came back (the broker sets `redelivered`, and could drop
    // the first answer and hand back a copy): answered as the first time,
    // never applied again, never a refusal of what was applied.
    if let Some(answer) = nonces.answer(&h.from, &h.nonce) {
        let answer = answer.clone();
        return Verdict::Again(h, answer, !redelivered);
    }
    if nonces.full(now) {
        return Verdict::Refused("too many recent commands: try again later".into(), Some(h));
    }
    let cmd = match BusCommand::from_body(&h.body) {
        Ok(c) => c,
        Err(e) => return Verdict::Refused(format!("from {from}: {e}"), Some(h)),
    };
    let comp = comps
        .into_iter()
        .find(|c| c.name == from)
        .expect("the key came from this component");
    if !comp.members.iter().any(|m| m == cmd.member()) {
        return Verdict::Refused(
            format!("from {from}: may not act for {}", quoted_name(cmd.member())),
            Some(h),
        );
    }
    if let BusCommand::TaskAdd { task_expire, .. } = &cmd
        && *task_expire > comp.longest_s
    {
        return Verdict::Refused(
            format!(
                "from {from}: a task of {task_expire} s is longer than its {} s",
                comp.longest_s
            ),
            Some(h),
        );
    }
    Verdict::Apply(h, cmd, comp)
}

/// Serves commands for ever: reconnects with backoff (1 s doubling to
/// 30 s), reports each change of link once.
pub async fn serve(cfg: CommandsConfig, submit: Submit, report: Report) {
    let mut nonces = match Nonces::load(&cfg.dir) {
        Ok(n) => n,
        Err(e) => {
            report(
                "failed",
                format!("{e}: commands over the bus are not served"),
            );
            return;
        }
    };
    let mut backoff = coffre_bus::conn::Backoff::default();
    let mut down_reported = false;
    let mut refusals = Refusals::default();
    loop {
        let mut up = false;
        let why = match session(&cfg, &mut nonces, &submit, &report, &mut refusals, &mut up).await {
            Err(Ended::Lost(why)) => why,
            Err(Ended::Stop(why)) => {
                // Applied but not recorded: serving on could apply it
                // again at each redelivery.
                report(
                    "failed",
                    format!(
                        "{why}: commands over the bus are no longer served (restart the daemon once the disk is fixed)"
                    ),
                );
                return;
            }
        };
        if up {
            backoff.reset();
            down_reported = false;
        }
        if !down_reported {
            report(
                "failed",
                format!(
                    "the broker at {}: {why}; commands wait in its queue",
                    coffre_bus::conn::shown(&cfg.url)
                ),
            );
            down_reported = true;
        }
        backoff.wait().await;
    }
}

/// Sends `answer` (the door's JSON: its `ok` says done or refused) to the
/// sender of `to`, signed.
async fn reply(ch: &lapin::Channel, cfg: &CommandsConfig, to: &Header, answer: Value) {
    let seal = |answer: Value| {
        let body = Reply {
            in_reply_to: to.nonce.clone(),
            ok: answer["ok"] == true,
            answer,
        };
        let h = envelope::header(
            &cfg.id.vault,
            VAULT_COMPONENT,
            &to.from,
            REPLY_KIND,
            envelope::MAX_LIFE_S,
            serde_json::to_value(&body).expect("replies serialise"),
        );
        cfg.keys.signer.seal_envelope(&h)
    };
    let ok = answer["ok"] == true;
    let error = answer["error"].clone();
    let mut bytes = seal(answer);
    if bytes.len() > envelope::MAX_ENVELOPE {
        // An answer that quotes a sender's long field (a refusal naming
        // it): the broker would refuse it whole and close the channel, so
        // the sender gets its verdict without the quote.
        bytes = seal(json!({
            "ok": ok,
            "error": error,
            "message": "the answer was too long to send (it quoted the command)",
        }));
    }
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_user_id(common_name(VAULT_COMPONENT).into());
    // A lost answer is the sender's timeout; the command stands.
    let _ = ch
        .basic_publish(
            COMMANDS.into(),
            to_reply(&to.from).into(),
            BasicPublishOptions::default(),
            &bytes,
            props,
        )
        .await;
}

/// A name a command gave, quoted for a refusal (the audit log and the
/// answer): its first 64 characters, and its length when longer (a
/// sender may put anything there).
fn quoted_name(name: &str) -> String {
    const SHOWN: usize = 64;
    if name.chars().count() <= SHOWN {
        return format!("{name:?}");
    }
    let head: String = name.chars().take(SHOWN).collect();
    format!("{head:?}... ({} bytes)", name.len())
}

/// Why a session ended.
enum Ended {
    /// The broker went: connect again.
    Lost(String),
    /// A command was applied and its nonce could not be written: stop.
    Stop(String),
}

impl From<String> for Ended {
    fn from(s: String) -> Self {
        Ended::Lost(s)
    }
}

/// Refusals are audited one by one up to [`REFUSALS_PER_MINUTE`] a
/// minute; beyond, they are counted and the count goes with the next
/// record (a flood cannot fill the audit log).
#[derive(Default)]
struct Refusals {
    unsaid: u64,
    said: std::collections::VecDeque<std::time::Instant>,
}

/// Refusal records a minute, at most.
const REFUSALS_PER_MINUTE: usize = 20;

impl Refusals {
    fn say(&mut self, report: &Report, why: String) {
        let minute = Duration::from_secs(60);
        while self.said.front().is_some_and(|t| t.elapsed() >= minute) {
            self.said.pop_front();
        }
        if self.said.len() >= REFUSALS_PER_MINUTE {
            self.unsaid += 1;
            return;
        }
        let more = if self.unsaid > 0 {
            format!(
                " ({} more refused and not recorded one by one before this)",
                self.unsaid
            )
        } else {
            String::new()
        };
        report("refused", format!("{why}{more}"));
        self.unsaid = 0;
        self.said.push_back(std::time::Instant::now());
    }
}

async fn session(
    cfg: &CommandsConfig,
    nonces: &mut Nonces,
    submit: &Submit,
    report: &Report,
    refusals: &mut Refusals,
    up: &mut bool,
) -> Result<std::convert::Infallible, Ended> {
    let describe = |e: lapin::Error| coffre_bus::conn::describe(&e);
    let conn = coffre_bus::connect(&cfg.url, &cfg.id)
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(describe)?;
    // One at a time: each is applied, recorded and acknowledged in order.
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(describe)?;
    let mut consumer = ch
        .basic_consume(
            VAULT_QUEUE.into(),
            "vault".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(describe)?;
    *up = true;
    report(
        "ok",
        format!(
            "serving commands from {} at {}",
            VAULT_QUEUE,
            coffre_bus::conn::shown(&cfg.url)
        ),
    );
    while let Some(d) = consumer.next().await {
        let d = d.map_err(describe)?;
        let user = d
            .properties
            .user_id()
            .as_ref()
            .map(|u| u.as_str().to_string());
        match judge(cfg, nonces, &d.data, user.as_deref(), d.redelivered) {
            Verdict::Again(h, answer, replayed) => {
                if replayed {
                    refusals.say(
                        report,
                        format!(
                            "{} from {}: not applied again, answered as the first time",
                            Refusal::Replay(h.nonce.clone()),
                            h.from
                        ),
                    );
                }
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(describe)?;
                reply(&ch, cfg, &h, answer).await;
            }
            Verdict::Refused(why, who) => {
                refusals.say(report, why.clone());
                d.acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .map_err(describe)?;
                if let Some(h) = who {
                    let code = if why.contains("may not act") || why.contains("longer than") {
                        "not_permitted"
                    } else {
                        "invalid"
                    };
                    reply(
                        &ch,
                        cfg,
                        &h,
                        json!({"ok": false, "error": code, "message": why}),
                    )
                    .await;
                }
            }
            Verdict::Apply(h, cmd, comp) => {
                let core = match &cmd {
                    BusCommand::TaskAdd {
                        task_name,
                        task_expire,
                        ..
                    } => coffre_vault::Command::ScheduledTaskAdd {
                        by: comp.name.clone(),
                        name: task_name.clone(),
                        duration_ms: task_expire.saturating_mul(1000),
                    },
                    BusCommand::TaskCancel { task_id, .. } => {
                        coffre_vault::Command::ScheduledTaskCancel {
                            by: comp.name.clone(),
                            task: coffre_vault::TaskId(*task_id),
                        }
                    }
                };
                let rx = submit(cmd.member().to_string(), comp.name.clone(), core);
                // The daemon stopping: the command stays in the queue.
                let (_, answer) = rx.await.map_err(|_| "the daemon stops".to_string())?;
                nonces
                    .record((&h.from, &h.nonce), h.exp, answer.clone(), envelope::now())
                    .map_err(Ended::Stop)?;
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(describe)?;
                reply(&ch, cfg, &h, answer).await;
            }
        }
    }
    Err(Ended::Lost("the broker closed the connection".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An applied command's answer is kept by sender and nonce, through a
    /// restart: the same nonce from another sender gets nothing of it.
    #[test]
    fn answers_are_kept_by_sender_and_nonce() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("bus")).unwrap();
        let now = envelope::now();
        let mut n = Nonces::load(d.path()).unwrap();
        let answer = serde_json::json!({"ok": true, "task_id": 7});
        n.record(("sched1", "abc"), now + 30, answer.clone(), now)
            .unwrap();
        assert_eq!(n.answer("sched1", "abc"), Some(&answer));
        assert_eq!(n.answer("sched2", "abc"), None, "another sender's");
        let n = Nonces::load(d.path()).unwrap();
        assert_eq!(n.answer("sched1", "abc"), Some(&answer), "after a restart");
        assert_eq!(n.answer("sched2", "abc"), None);
    }
}

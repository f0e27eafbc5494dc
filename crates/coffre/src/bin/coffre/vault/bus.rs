//! `coffre bus …` (on the vault's host) and the bus's readers on other
//! hosts: `coffre audit witness` and `coffre audit follow`.

use super::audit::print_entries;
use super::client::runtime;
use super::*;
use crate::cli::{BusCommand, BusRoleChoice};
use anyhow::{Context, Result};
use coffre::exit;
use coffre_bus::chain::{Alarm, Seen, Witness, check_entry};
use coffre_bus::{EVENTS, Event, Identity, Role, common_name, witness_queue};
use coffre_daemon::bus as hostbus;
use coffre_daemon::vaultdir::VaultDir;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `coffre bus …`
pub fn bus(cmd: BusCommand) -> Result<u8> {
    match cmd {
        BusCommand::BrokerConfig { dir, listen, out } => {
            let vd = VaultDir::new(&dir);
            let r = hostbus::write_broker_config(&vd, &listen, &out)?;
            println!("wrote the broker's configuration in {}", r.out.display());
            println!("components connect to {}", r.url);
            println!("users the broker knows: {}", r.users.join(", "));
            println!(
                "next: run {} on the broker's host (as root or rabbitmq), then restart `coffre serve {}`",
                r.run.display(),
                dir.display()
            );
            Ok(exit::OK)
        }
        BusCommand::Identity {
            dir,
            name,
            role,
            for_members,
            longest,
            bus,
            out,
        } => {
            let vd = VaultDir::new(&dir);
            let role = match role {
                BusRoleChoice::Monitor => Role::Monitor,
                BusRoleChoice::Gateway => Role::Gateway,
                BusRoleChoice::Scheduler => Role::Scheduler,
            };
            let rights = hostbus::Rights {
                members: for_members,
                longest_s: longest.unwrap_or(0),
            };
            let broker = match bus {
                Some(b) => Some(b),
                None => vd.load_config()?.bus.map(|b| b.url),
            };
            let id = hostbus::issue_identity(&vd, &name, role, rights, broker)?;
            write_private(&out, &id.to_bytes())?;
            println!(
                "wrote {}'s identity ({}) to {} (keep it private: it holds its key)",
                name,
                role.as_str(),
                out.display()
            );
            println!(
                "next: `coffre bus broker-config {}` again and restart the broker, so that it knows {}",
                dir.display(),
                common_name(&name)
            );
            Ok(exit::OK)
        }
        BusCommand::Forget { dir, name } => {
            let vd = VaultDir::new(&dir);
            if hostbus::forget_component(&vd, &name)? {
                println!(
                    "forgot {name}: write the broker's configuration again (`coffre bus broker-config`) and restart the broker"
                );
                // Definitions loaded at boot add and update, never delete:
                // a user the broker already stored stays until deleted.
                println!(
                    "and on the broker's host, once, delete the user it already knows: \
                     HOME=BROKER_DIR/home rabbitmqctl -n NODE delete_user {}",
                    common_name(&name)
                );
                Ok(exit::OK)
            } else {
                Ok(fail(exit::FAILURE, &format!("no component named {name}")))
            }
        }
        BusCommand::Send {
            identity,
            bus,
            wait,
            command,
        } => send(identity, bus, wait, command),
        BusCommand::List { dir, json } => {
            let vd = VaultDir::new(&dir);
            let comps = hostbus::components(&vd)?;
            if json {
                print_json(&serde_json::to_value(&comps)?)?;
            } else if comps.is_empty() {
                println!("no components (the daemon itself is always `vault`)");
            } else {
                for c in comps {
                    let rights = if c.members.is_empty() {
                        String::new()
                    } else {
                        format!(" for {} up to {} s", c.members.join(","), c.longest_s)
                    };
                    println!(
                        "{:<24} {:<9} {}{rights}",
                        c.name,
                        c.role.as_str(),
                        c.fingerprint
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // A file left there (of any mode) is never reused for a key.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

fn load(identity: &Path, bus: Option<String>) -> Result<(Identity, String)> {
    let id = Identity::load(identity)?;
    if id.role != Role::Monitor {
        anyhow::bail!(
            "{}: this is a {} identity; reading events needs a monitor's",
            identity.display(),
            id.role.as_str()
        );
    }
    let url = id.broker_url(bus.as_deref())?;
    coffre_bus::conn::parse_url(&url)?;
    // An ended certificate fails in the TLS handshake, which looks like a
    // broker away: say it here instead of retrying for ever.
    if let Some((end, _)) = coffre_daemon::pki::pem_not_after(&id.cert_pem)
        && end < i64::try_from(coffre_sys::time::now_ms() / 1000).unwrap_or(i64::MAX)
    {
        anyhow::bail!(
            "{}: its certificate ended; issue it again on the vault's host (`coffre bus identity DIR {} --role {} --out FILE`)",
            identity.display(),
            id.name,
            id.role.as_str()
        );
    }
    Ok((id, url))
}

fn witness_code(a: &Alarm) -> u8 {
    match a {
        Alarm::Rollback { .. } | Alarm::Fork { .. } => exit::AUDIT_ROLLED_BACK,
        Alarm::Gap { .. } => exit::WITNESS_GAP,
        Alarm::Forged { .. } => exit::WITNESS_FORGED,
        Alarm::Store { .. } => exit::FAILURE,
    }
}

/// Why a session with the broker ended.
enum Ended {
    /// An alarm: stop.
    Alarm(Alarm),
    /// The broker refused this identity: stop.
    Refused(String),
    /// The link went: try again.
    Lost(String),
}

fn lost(e: impl std::fmt::Display) -> Ended {
    Ended::Lost(e.to_string())
}

/// `coffre audit witness`
pub fn witness(identity: PathBuf, bus: Option<String>, store: PathBuf) -> Result<u8> {
    let (id, url) = load(&identity, bus)?;
    let mut w = Witness::open(&store, &id.audit_key)?;
    match w.last() {
        Some((seq, _)) => eprintln!(
            "coffre: witness {} of vault {}: holding {} records up to {seq} in {}",
            id.name,
            id.vault,
            w.len(),
            store.display()
        ),
        None => eprintln!(
            "coffre: witness {} of vault {}: a new store in {}; the first record received starts the chain",
            id.name,
            id.vault,
            store.display()
        ),
    }
    runtime()?.block_on(async {
        let mut backoff = coffre_bus::conn::Backoff::default();
        loop {
            let mut up = false;
            match witness_session(&id, &url, &mut w, &mut up).await {
                Ended::Alarm(a) => {
                    eprintln!("coffre: ALARM: vault {}: {a}", id.vault);
                    return Ok(witness_code(&a));
                }
                Ended::Refused(why) => {
                    eprintln!("coffre: {why}");
                    return Ok(exit::UNREACHABLE);
                }
                Ended::Lost(why) => {
                    if up {
                        backoff.reset();
                    }
                    eprintln!(
                        "coffre: the broker: {why}; trying again in {} s",
                        backoff.next_wait().as_secs()
                    );
                    backoff.wait().await;
                }
            }
        }
    })
}

async fn witness_session(id: &Identity, url: &str, w: &mut Witness, up: &mut bool) -> Ended {
    let conn = match coffre_bus::connect(url, id).await {
        Ok(c) => c,
        Err(e) => {
            let s = e.to_string();
            return if coffre_bus::conn::is_refusal(&s) {
                Ended::Refused(s)
            } else {
                Ended::Lost(s)
            };
        }
    };
    let ch = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return lost(coffre_bus::conn::describe(&e)),
    };
    if let Err(e) = ch.basic_qos(256, BasicQosOptions::default()).await {
        return lost(e);
    }
    let queue = witness_queue(&id.name);
    let mut consumer = match ch
        .basic_consume(
            queue.as_str().into(),
            format!("witness {}", id.name).into(),
            // One witness per queue: a second would get every other
            // record and see gaps.
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Ended::Refused(coffre_bus::conn::describe(&e)),
    };
    *up = true;
    eprintln!(
        "coffre: witness {}: reading {queue} at {}",
        id.name,
        coffre_bus::conn::shown(url)
    );
    let vault_user = common_name(hostbus::VAULT_COMPONENT);
    while let Some(d) = consumer.next().await {
        let d = match d {
            Ok(d) => d,
            Err(e) => return lost(e),
        };
        let from_vault = d
            .properties
            .user_id()
            .as_ref()
            .is_some_and(|u| u.as_str() == vault_user);
        let entry = match Event::parse(&d.data) {
            Ok(Event::Audit { vault, entry, .. }) if from_vault && vault == id.vault => entry,
            Ok(_) | Err(_) => {
                // Not the vault's, or not an audit record: not ours to
                // judge; dropped, said once per message.
                eprintln!(
                    "coffre: witness {}: dropped a message that is not one of vault {}'s audit records",
                    id.name, id.vault
                );
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                continue;
            }
        };
        match w.accept(&entry) {
            Ok(Seen::Appended | Seen::Known) => {
                if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                    return lost(e);
                }
            }
            Err(alarm @ Alarm::Store { .. }) => {
                // Our own disk, not the vault: the record stays queued.
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                let _ = conn.close(200, "store".into()).await;
                return Ended::Alarm(alarm);
            }
            Err(alarm) => {
                // The record stays in the queue for whoever looks next.
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                let ev = Event::Witness {
                    v: 1,
                    vault: id.vault.clone(),
                    by: id.name.clone(),
                    alarm: alarm.kind().to_string(),
                    seq: alarm.seq(),
                    detail: alarm.to_string(),
                };
                let props = lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_user_id(common_name(&id.name).into());
                if let Ok(c) = ch
                    .basic_publish(
                        EVENTS.into(),
                        ev.routing_key().into(),
                        BasicPublishOptions::default(),
                        &ev.to_bytes(),
                        props,
                    )
                    .await
                {
                    let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
                }
                let _ = conn.close(200, "alarm".into()).await;
                return Ended::Alarm(alarm);
            }
        }
    }
    lost("the broker ended the subscription")
}

/// `s` without control characters (what a terminal would act on).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `coffre audit follow`
pub fn follow(identity: PathBuf, bus: Option<String>, json: bool, only: &[String]) -> Result<u8> {
    // The keys the queue is bound with: every event, or the actions asked
    // for and every alarm.
    let keys: Vec<String> = if only.is_empty() {
        vec!["#".into()]
    } else {
        only.iter()
            .map(|a| format!("audit.{a}"))
            .chain(std::iter::once("witness.#".to_string()))
            .collect()
    };
    let (id, url) = load(&identity, bus)?;
    runtime()?.block_on(async {
        let mut backoff = coffre_bus::conn::Backoff::default();
        loop {
            let mut up = false;
            match follow_session(&id, &url, json, &keys, &mut up).await {
                Ended::Refused(why) => {
                    eprintln!("coffre: {why}");
                    return Ok(exit::UNREACHABLE);
                }
                Ended::Alarm(_) => return Ok(exit::FAILURE),
                Ended::Lost(why) => {
                    if up {
                        backoff.reset();
                    }
                    eprintln!(
                        "coffre: the broker: {why}; trying again in {} s (events meanwhile are not shown: `coffre audit witness` keeps every one)",
                        backoff.next_wait().as_secs()
                    );
                    backoff.wait().await;
                }
            }
        }
    })
}

async fn follow_session(
    id: &Identity,
    url: &str,
    json: bool,
    keys: &[String],
    up: &mut bool,
) -> Ended {
    use std::io::Write;
    let conn = match coffre_bus::connect(url, id).await {
        Ok(c) => c,
        Err(e) => {
            let s = e.to_string();
            return if coffre_bus::conn::is_refusal(&s) {
                Ended::Refused(s)
            } else {
                Ended::Lost(s)
            };
        }
    };
    let ch = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return lost(coffre_bus::conn::describe(&e)),
    };
    // A queue of our own, gone when we are.
    let q = match ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => q,
        Err(e) => return Ended::Refused(coffre_bus::conn::describe(&e)),
    };
    for key in keys {
        if let Err(e) = ch
            .queue_bind(
                q.name().clone(),
                EVENTS.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            return Ended::Refused(coffre_bus::conn::describe(&e));
        }
    }
    let mut consumer = match ch
        .basic_consume(
            q.name().clone(),
            "follow".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Ended::Refused(coffre_bus::conn::describe(&e)),
    };
    *up = true;
    while let Some(d) = consumer.next().await {
        let d = match d {
            Ok(d) => d,
            Err(e) => return lost(e),
        };
        let sender = d
            .properties
            .user_id()
            .as_ref()
            .map(|u| u.as_str().to_string())
            .unwrap_or_default();
        let mut out = std::io::stdout().lock();
        match Event::parse(&d.data) {
            Ok(ev) => {
                let verified = match &ev {
                    Event::Audit { vault, entry, .. } => {
                        *vault == id.vault && check_entry(entry, &id.audit_key).is_ok()
                    }
                    _ => false,
                };
                if json {
                    let mut v = serde_json::to_value(&ev).unwrap_or_default();
                    v["verified"] = verified.into();
                    v["sender"] = sender.into();
                    let _ = writeln!(out, "{v}");
                } else {
                    match &ev {
                        Event::Audit { entry, .. } => {
                            let v = serde_json::to_value(entry).unwrap_or_default();
                            drop(out);
                            if !verified {
                                println!("UNVERIFIED (not signed by the vault's audit key):");
                            }
                            print_entries(&[v]);
                            continue;
                        }
                        Event::Witness {
                            by,
                            alarm,
                            seq,
                            detail,
                            ..
                        } => {
                            // The name the broker vouched for, not the one
                            // the message claims.
                            let claimed = if sender == common_name(by) {
                                String::new()
                            } else {
                                format!(" (claiming to be {})", printable(by))
                            };
                            let _ = writeln!(
                                out,
                                "ALARM from {}{claimed}: {} at record {seq}: {}",
                                printable(&sender),
                                printable(alarm),
                                printable(detail)
                            );
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "(a message from {sender:?} that is not an event: {e})");
            }
        }
        let _ = out.flush();
    }
    lost("the broker ended the subscription")
}

/// `coffre gateway relay`
pub fn relay(identity: PathBuf, bus: Option<String>, management: PathBuf) -> Result<u8> {
    let id = Identity::load(&identity)?;
    let url = id.broker_url(bus.as_deref())?;
    coffre_bus::conn::parse_url(&url)?;
    if let Some((end, _)) = coffre_daemon::pki::pem_not_after(&id.cert_pem)
        && end < i64::try_from(coffre_sys::time::now_ms() / 1000).unwrap_or(i64::MAX)
    {
        anyhow::bail!(
            "{}: its certificate ended; issue it again on the vault's host (`coffre bus identity DIR {} --role gateway --out FILE`)",
            identity.display(),
            id.name
        );
    }
    runtime()?.block_on(async {
        let say = |m: String| eprintln!("coffre relay: {}", m.replace(char::is_control, " "));
        match coffre_daemon::relay::relay(id, url, management, say).await {
            Ok(never) => match never {},
            Err(e) => Err(anyhow::anyhow!(e)),
        }
    })
}

/// `coffre bus send`
fn send(identity: PathBuf, bus: Option<String>, wait: u64, command: Option<String>) -> Result<u8> {
    use coffre_bus::command::{self as bc, BusCommand as Cmd, Reply};
    use coffre_bus::envelope::{self, Expect, Signer};
    use std::io::Read;
    let id = Identity::load(&identity)?;
    if id.role != Role::Scheduler {
        anyhow::bail!(
            "{}: this is a {} identity; commands need a scheduler's (`coffre bus identity DIR NAME --role scheduler --for MEMBERS --longest 8h`)",
            identity.display(),
            id.role.as_str()
        );
    }
    if id.vault_sign_key.is_empty() {
        anyhow::bail!(
            "{}: it carries no vault signing key (issued by an older version): issue it again",
            identity.display()
        );
    }
    let text = match command.as_deref() {
        Some(c) if c != "-" => c.to_string(),
        _ => {
            let mut t = String::new();
            std::io::stdin()
                .take(64 << 10)
                .read_to_string(&mut t)
                .context("reading the command from stdin")?;
            t
        }
    };
    let cmd: Cmd = serde_json::from_str(&text).with_context(|| {
        "not a command: expected {\"command\": \"task_add\", \"task_name\": ..., \"task_user\": ..., \"task_expire\": SECONDS} or {\"command\": \"task_cancel\", \"task_id\": N, \"task_user\": ...}"
    })?;
    let url = id.broker_url(bus.as_deref())?;
    coffre_bus::conn::parse_url(&url)?;
    let signer = Signer::from_pem(&id.key_pem)?;
    runtime()?.block_on(async {
        let describe = |e: lapin::Error| coffre_bus::conn::describe(&e);
        let conn = match coffre_bus::connect(&url, &id).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("coffre: error: {e}");
                return Ok(exit::UNREACHABLE);
            }
        };
        let ch = conn.create_channel().await.map_err(|e| anyhow::anyhow!(describe(e)))?;
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!(describe(e)))?;
        let mut replies = ch
            .basic_consume(
                bc::reply_queue(&id.name).as_str().into(),
                "send".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!(describe(e)))?;
        let h = envelope::header(
            &id.vault,
            &id.name,
            hostbus::VAULT_COMPONENT,
            bc::KIND,
            bc::LIFE_S,
            serde_json::to_value(&cmd).expect("commands serialise"),
        );
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_user_id(common_name(&id.name).into());
        let confirm = ch
            .basic_publish(
                bc::COMMANDS.into(),
                bc::TO_VAULT.into(),
                BasicPublishOptions::default(),
                &signer.seal_envelope(&h),
                props,
            )
            .await
            .map_err(|e| anyhow::anyhow!(describe(e)))?
            .await
            .map_err(|e| anyhow::anyhow!(describe(e)))?;
        if confirm.is_nack() {
            anyhow::bail!("the broker did not take the command");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
        let mut passed = std::collections::HashMap::new();
        loop {
            // Checked here too: `timeout_at` takes a message already
            // waiting even after the deadline, and other senders' answers
            // put back may keep one waiting.
            let next = if tokio::time::Instant::now() >= deadline {
                Err(())
            } else {
                tokio::time::timeout_at(deadline, replies.next())
                    .await
                    .map_err(|_| ())
            };
            let d = match next {
                Err(()) => {
                    eprintln!(
                        "coffre: error: no answer within {wait} s (the command waits in the vault's queue; it is applied when the vault reads it, if it is still fresh)"
                    );
                    return Ok(exit::UNREACHABLE);
                }
                Ok(None) => anyhow::bail!("the broker closed the connection"),
                Ok(Some(d)) => d.map_err(|e| anyhow::anyhow!(describe(e)))?,
            };
            let user = d.properties.user_id().as_ref().map(|u| u.as_str().to_string());
            let expect = Expect {
                vault: &id.vault,
                to: &id.name,
                now: envelope::now(),
            };
            let got = match envelope::open(&d.data, user.as_deref(), &expect, |from| {
                (from == hostbus::VAULT_COMPONENT).then(|| id.vault_sign_key.clone())
            }) {
                Ok(g) if g.kind == bc::REPLY_KIND => g,
                Ok(_) => {
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    continue;
                }
                Err(e) => {
                    // Expired answers end here too: nobody waits for them.
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    eprintln!("coffre: ignored a message on the reply queue: {e}");
                    continue;
                }
            };
            let Ok(r) = serde_json::from_value::<Reply>(got.body) else {
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                continue;
            };
            if r.in_reply_to != h.nonce {
                // Another `bus send` with this identity waits for it (the
                // reply queue is the component's, shared by its processes):
                // put it back, slower each time it comes round again, until
                // its sender takes it or it expires.
                let seen = passed.entry(r.in_reply_to).or_insert(0u32);
                *seen += 1;
                if *seen > 1 {
                    let pause = Duration::from_millis(50 * u64::from((*seen).min(10)));
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
                }
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
                continue;
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            println!("{}", r.answer);
            return Ok(if r.ok {
                exit::OK
            } else {
                exit::code_for_refusal(r.answer["error"].as_str().unwrap_or(""))
            });
        }
    })
}

//! Talking to the daemon: the identity and session files, the mutual-TLS
//! call, and the signed audit head every reply carries, checked against
//! the highest one this machine has seen.

use crate::cli::{AuthArgs, IdentityArg};
use crate::secrets;
use anyhow::{Context, Result, bail};
use coffre::exit;
use coffre_daemon::api::{ApiCommand, ApiSecret};
use coffre_daemon::client;
use coffre_daemon::vaultdir::Identity;
use coffre_daemon::witness::{
    self, Assessment, HeadStore, SeenHead, ShownHead, VaultId, WitnessError,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub(super) fn identity_path(a: &IdentityArg) -> Result<PathBuf> {
    if let Some(p) = &a.identity {
        return Ok(p.clone());
    }
    let found: Vec<PathBuf> = std::fs::read_dir(".")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "identity"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no identity: give --identity FILE or set COFFRE_IDENTITY"),
        _ => bail!("several *.identity files here: choose one with --identity FILE"),
    }
}

pub(super) fn load_identity(a: &IdentityArg) -> Result<(PathBuf, Identity)> {
    let p = identity_path(a)?;
    let mut id = Identity::load(&p).with_context(|| format!("reading identity {}", p.display()))?;
    if let Some(s) = &a.server {
        id.server = s.clone();
    }
    Ok((p, id))
}

pub(super) fn session_file(identity: &Path) -> PathBuf {
    let mut s = identity.as_os_str().to_owned();
    s.push(".session");
    PathBuf::from(s)
}

pub(super) fn read_password(path: &Path) -> Result<ApiSecret> {
    let p = secrets::passphrase(path)?;
    // Checked before the copy: a failed `String::from_utf8` would carry the
    // bytes away in its error.
    let s = std::str::from_utf8(p.expose()).context("passwords must be UTF-8 text")?;
    Ok(ApiSecret(s.to_owned()))
}

/// Sends a command; maps refusals to exit codes with the daemon's message.
/// Every reply carries the vault's signed audit head, checked against the
/// highest one this machine has seen (`check_audit_head`). Every request
/// names the CA key this machine pins (`client::PINNED_CA_KEY_HEADER`).
pub(super) async fn call(
    id: &Identity,
    cmd: &ApiCommand,
) -> Result<std::result::Result<Value, (u8, String)>> {
    let pinned = VaultId::of_ca(&id.ca_pem).map(|v| v.key);
    match client::call(id, cmd, pinned.as_deref()).await {
        Ok(v) => {
            if let Err(refusal) = check_audit_head(id, &v).await {
                // Do not stay inside a vault whose log was cut back.
                let session = match cmd {
                    ApiCommand::Enter { .. } => v["session"].as_u64(),
                    ApiCommand::Heartbeat { session } => Some(*session),
                    _ => None,
                };
                if let Some(session) = session {
                    let _ =
                        client::call(id, &ApiCommand::Leave { session }, pinned.as_deref()).await;
                }
                return Ok(Err(refusal));
            }
            if v["ok"] == true {
                return Ok(Ok(v));
            }
            let err = v["error"].as_str().unwrap_or("failure").to_string();
            let msg = v["message"].as_str().unwrap_or("refused").to_string();
            Ok(Err((exit::code_for_refusal(&err), msg)))
        }
        Err(client::ClientError::Tls { msg, .. }) => Ok(Err((
            exit::NOT_A_MEMBER,
            format!("the vault refused this identity ({msg})"),
        ))),
        Err(e @ client::ClientError::Unreachable { .. }) => {
            Ok(Err((exit::UNREACHABLE, e.to_string())))
        }
        Err(e) => Err(e.into()),
    }
}

/// This vault's name on this machine: its CA's key (and, for what was
/// remembered before, its CA certificate's fingerprint).
pub(super) fn vault_key(ca_pem: &str) -> std::result::Result<VaultId, (u8, String)> {
    VaultId::of_ca(ca_pem).ok_or_else(|| (exit::FAILURE, "the vault's CA is not PEM".to_string()))
}

pub(super) fn witness_refusal(e: WitnessError) -> (u8, String) {
    match e {
        WitnessError::State(m) => (exit::FAILURE, m),
        e => (exit::AUDIT_ROLLED_BACK, e.to_string()),
    }
}

/// Finding 3: checks the signed audit head a reply carries against the
/// highest one this machine remembers for the vault (same key, not older,
/// and, when further on, linked to it by the records in between), then
/// remembers it.
pub(super) async fn check_audit_head(
    id: &Identity,
    reply: &Value,
) -> std::result::Result<(), (u8, String)> {
    let vault = vault_key(&id.ca_pem)?;
    let store = HeadStore::from_env().map_err(witness_refusal)?;
    let seen = store.load_id(&vault).map_err(witness_refusal)?;
    let Some(shown) = ShownHead::from_reply(reply) else {
        // Only a daemon from before this check answers a member without
        // its head; once one was seen, a success without it is refused.
        if seen.is_some() && reply["ok"] == true {
            return Err((
                exit::AUDIT_ROLLED_BACK,
                "the vault's reply carries no audit head although this machine saw one: the daemon was replaced by an older one, or the reply was not the vault's".into(),
            ));
        }
        return Ok(());
    };
    match witness::assess(seen.as_ref(), &shown).map_err(witness_refusal)? {
        Assessment::Same => Ok(()),
        Assessment::FirstUse => {
            eprintln!(
                "coffre: first contact with this vault's audit log from this machine: trusting its head (record {}) and key {}… and remembering them in {}",
                shown.seq,
                shown.key.chars().take(16).collect::<String>(),
                store.dir().display()
            );
            store
                .remember(&SeenHead::from_shown(&vault.key, &shown))
                .map_err(witness_refusal)
        }
        Assessment::Ahead { since } => {
            let seen = seen.expect("ahead of a seen head");
            let cmd = ApiCommand::AuditShow { since: Some(since) };
            match client::call(id, &cmd, Some(&vault.key)).await {
                Ok(r) if r["ok"] == true => {
                    let entries: Vec<coffre_audit::Entry> =
                        serde_json::from_value(r["entries"].clone()).map_err(|e| {
                            (exit::FAILURE, format!("unreadable audit records: {e}"))
                        })?;
                    witness::check_chain(&seen, &shown, &entries).map_err(witness_refusal)?;
                    store
                        .remember(&SeenHead::from_shown(&vault.key, &shown))
                        .map_err(witness_refusal)
                }
                // A member who may not read the log (while locked only
                // superusers do) cannot tell progress from a fork: the head
                // is not older, and it is not remembered either.
                _ => Ok(()),
            }
        }
    }
}

pub(super) fn simple(
    ida: &IdentityArg,
    cmd: ApiCommand,
) -> Result<std::result::Result<Value, (u8, String)>> {
    let (_, id) = load_identity(ida)?;
    runtime()?.block_on(call(&id, &cmd))
}

pub(super) fn authed(
    ida: &IdentityArg,
    auth: &AuthArgs,
    make: impl FnOnce(ApiSecret, String) -> ApiCommand,
) -> Result<std::result::Result<Value, (u8, String)>> {
    let password = read_password(&auth.password_file)?;
    simple(ida, make(password, auth.totp.clone()))
}

//! The audit log: listing and verifying it, against the daemon or a vault
//! directory, and against the head this machine remembers.

use super::client::*;
use super::*;
use crate::cli::AuditCommand;
use anyhow::{Result, bail};
use coffre::exit;
use coffre_daemon::api::ApiCommand;
use coffre_daemon::vaultdir::VaultDir;
use coffre_daemon::witness::{self, Assessment, HeadStore, ShownHead};
use coffre_sys::shown::told;
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// Checks the vault directory's own head against what this machine
/// remembers (`coffre audit verify --dir`); remembers nothing.
pub(super) fn check_dir_against_seen(
    dir: &Path,
    entries_ok: bool,
) -> Result<std::result::Result<(), String>> {
    let vd = VaultDir::new(dir);
    let vault = match vault_key(&vd.read(&vd.ca_cert())?) {
        Ok(v) => v,
        Err((_, m)) => bail!(m),
    };
    let store = HeadStore::from_env()?;
    let Some(seen) = store.load_id(&vault)? else {
        return Ok(Ok(()));
    };
    let control = vd.load_control()?;
    let head = coffre_audit::read_head(dir)?;
    let shown = ShownHead {
        seq: head.as_ref().map_or(0, |h| h.seq),
        hash: head.as_ref().map(|h| h.hash.clone()),
        signature: head.as_ref().map(|h| h.signature.clone()),
        key: control.audit_public_key,
    };
    let checked = witness::assess(Some(&seen), &shown).and_then(|a| match a {
        Assessment::Ahead { since } if entries_ok => {
            let entries: Vec<_> = coffre_audit::read_entries(dir)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.seq > since)
                .collect();
            witness::check_chain(&seen, &shown, &entries)
        }
        _ => Ok(()),
    });
    Ok(checked.map_err(|e| e.to_string()))
}

pub(super) fn print_entries(entries: &[Value]) {
    for e in entries {
        println!("{}", entry_line(e));
    }
}

/// One record as a line. A record's texts may carry what outsiders said
/// (a name a VPN client gave, a storage host's error): each is shown with
/// its control characters escaped, so that no record can forge another
/// line or send a terminal its escapes.
fn entry_line(e: &Value) -> String {
    let r = &e["record"];
    let text = |v: &Value| told(v.as_str().unwrap_or(""), usize::MAX);
    format!(
        "{:>5} {} {:<8} {:<14} {:<24} {}{}",
        // A number, so that the column is padded (a JSON value is not).
        e["seq"].as_u64().unwrap_or(0),
        iso(r["at"].as_u64().unwrap_or(0)),
        text(&r["actor"]),
        text(&r["action"]),
        text(&r["result"]),
        text(&r["detail"]),
        r["source"]["addr"]
            .as_str()
            .map(|a| format!(" [{}]", told(a, usize::MAX)))
            .unwrap_or_default()
    )
}

pub fn audit(cmd: AuditCommand) -> Result<u8> {
    match cmd {
        AuditCommand::Show { id, dir, json } => {
            let entries: Vec<Value> = match dir {
                Some(d) => coffre_audit::read_entries(&d)?
                    .into_iter()
                    .map(|e| serde_json::to_value(e).expect("json"))
                    .collect(),
                None => match simple(&id, ApiCommand::AuditShow { since: None })? {
                    Ok(v) => v["entries"].as_array().cloned().unwrap_or_default(),
                    Err((code, msg)) => return Ok(fail(code, &msg)),
                },
            };
            if json {
                print_json(&Value::Array(entries))?;
            } else {
                print_entries(&entries);
            }
            Ok(exit::OK)
        }
        AuditCommand::Verify { id, dir } => {
            let result = match dir {
                Some(d) => {
                    let control = VaultDir::new(&d).load_control()?;
                    let local = coffre_audit::verify(&d, &control.audit_public_key)
                        .map(|r| r.records)
                        .map_err(|e| (exit::FAILURE, e.to_string()));
                    // Intact on its own, but is it what members saw?
                    match check_dir_against_seen(&d, local.is_ok())? {
                        Ok(()) => local,
                        Err(m) => Err((exit::AUDIT_ROLLED_BACK, m)),
                    }
                }
                None => match simple(&id, ApiCommand::AuditVerify)? {
                    Ok(v) => Ok(v["records"].as_u64().unwrap_or(0)),
                    Err((code @ (exit::FAILURE | exit::AUDIT_ROLLED_BACK), msg)) => {
                        Err((code, msg))
                    }
                    Err((code, msg)) => return Ok(fail(code, &msg)),
                },
            };
            match result {
                Ok(n) => {
                    println!(
                        "audit log verified: {n} records, chain intact, head signed by the host key and not behind what this machine saw"
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => {
                    println!("AUDIT LOG TAMPERED: {msg}");
                    Ok(code)
                }
            }
        }
        AuditCommand::Witness {
            identity,
            bus,
            store,
        } => super::bus::witness(identity, bus, store),
        AuditCommand::Follow {
            identity,
            bus,
            json,
            only,
        } => super::bus::follow(identity, bus, json, &only),
        AuditCommand::Export { id, since, json } => {
            let (_, ident) = load_identity(&id)?;
            let v = match runtime()?
                .block_on(call(&ident, &ApiCommand::AuditShow { since: Some(since) }))?
            {
                Ok(v) => v,
                Err((code, msg)) => return Ok(fail(code, &msg)),
            };
            let vault = vault_key(&ident.ca_pem).map_err(|(_, m)| anyhow::anyhow!(m))?;
            let entries = v["entries"].as_array().cloned().unwrap_or_default();
            let head = v["audit_head"].clone();
            let mut out = std::io::stdout().lock();
            if json {
                let doc = serde_json::json!({
                    "vault": vault.key, "since": since, "head": head, "entries": entries,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
            } else {
                // audit.log's own lines, then the signed head.
                for e in &entries {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"vault": vault.key, "audit_head": head})
                )?;
            }
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_line_without_a_terminals_escapes() {
        let e = serde_json::json!({"seq": 7, "record": {
            "at": 0, "actor": "gateway", "action": "vpn_login", "result": "failed",
            "detail": "user \"x\u{1b}[2J\nforged\" refused", "source": {"addr": "10.0.0.2\r"},
        }});
        let line = entry_line(&e);
        assert!(!line.chars().any(coffre_sys::shown::unshown), "{line:?}");
        assert!(
            line.ends_with("user \"x\\u{1b}[2J\\nforged\" refused [10.0.0.2\\r]"),
            "{line}"
        );
        assert!(
            line.starts_with("    7 1970-01-01T00:00:00.000Z gateway "),
            "{line}"
        );
    }
}

//! Hosting a vault: `init` (a new vault directory and its first superuser)
//! and `serve` (the daemon).

use super::client::*;
use super::*;
use crate::cli::InitArgs;
use crate::secrets;
use anyhow::{Context, Result, bail};
use coffre::exit;
use coffre_sys::shown::{told_all, told_lines};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

pub fn init(a: InitArgs) -> Result<u8> {
    let password = match &a.password_file {
        Some(p) => Some(secrets::passphrase(p)?),
        None => None,
    };
    let key_len = 64;
    let kdf = crate::volume::kdf_params(&a.pbkdf, key_len)?;
    let policy = coffre_vault::Policy {
        grace_ms: a.grace.saturating_mul(1000),
        ..coffre_vault::Policy::default()
    };
    let identity_out = a
        .identity_out
        .unwrap_or_else(|| PathBuf::from(format!("{}.identity", a.admin)));
    if identity_out.exists() {
        bail!(
            "{} exists; choose another --identity-out",
            identity_out.display()
        );
    }
    let report = coffre_daemon::init::init(coffre_daemon::init::InitOptions {
        dir: a.dir.clone(),
        admin: a.admin.clone(),
        password,
        invite_out: a.invite.clone(),
        size: a.size,
        listen: a.listen.clone(),
        identity_out,
        kdf,
        digest_iterations: coffre_luks2::digest::benchmark_iterations(
            coffre_luks2::hash::HashAlg::Sha256,
        )?,
        totp_period_s: a.totp_period,
        policy,
        storage: a.storage.as_ref().map(|url| {
            (
                coffre_daemon::vaultdir::StorageConfig {
                    endpoint: a.storage_endpoint.clone(),
                    region: a.storage_region.clone(),
                    allow_http: a.storage_allow_http,
                    mirror: a
                        .mirror
                        .iter()
                        .map(|m| coffre_daemon::vaultdir::MirrorConfig {
                            url: m.clone(),
                            endpoint: a
                                .mirror_endpoint
                                .clone()
                                .or_else(|| a.storage_endpoint.clone()),
                            region: a.storage_region.clone(),
                            allow_http: a.storage_allow_http,
                            credentials_file: None,
                            ca_file: None,
                            tls_name: None,
                        })
                        .collect(),
                    chunk_size: a
                        .storage_chunk_size
                        .map_or(1 << 20, |c| u32::try_from(c).unwrap_or(u32::MAX)),
                    ..coffre_daemon::vaultdir::StorageConfig::new(url.clone())
                },
                a.storage_credentials.clone(),
            )
        }),
    })?;
    println!("vault created in {}", a.dir.display());
    if a.invite.is_some() {
        println!(
            "invitation for the first superuser {}: {} (mode 0600; expires in 72 h)",
            a.admin,
            report.identity.display()
        );
        println!("CA fingerprint (sha256): {}", report.ca_fingerprint);
        println!("{}", report.vm_user);
        println!(
            "next: coffre serve {}   then, on {}'s machine: coffre join {} --password-file F",
            a.dir.display(),
            a.admin,
            report.identity.display()
        );
        return Ok(exit::OK);
    }
    println!("first superuser: {} (keyslot 0)", a.admin);
    println!(
        "identity file: {} (mode 0600; move it to {}'s own machine)",
        report.identity.display(),
        a.admin
    );
    println!("CA fingerprint (sha256): {}", report.ca_fingerprint);
    println!("{}", report.vm_user);
    println!("TOTP enrollment, shown once; add it to an authenticator app now:");
    println!("  {}", report.otpauth);
    if std::io::stdout().is_terminal() {
        print_qr(&report.otpauth);
    }
    println!(
        "next: coffre serve {}   then: coffre enter --identity {} --password-file F --totp CODE",
        a.dir.display(),
        report.identity.display()
    );
    Ok(exit::OK)
}

pub fn serve(dir: PathBuf, listen: Option<String>) -> Result<u8> {
    // Before any thread or child: under systemd (Delegate=yes) the
    // workloads' cgroups go under the unit's own.
    match coffre_daemon::workload::cgroup::enter_delegated_leaf() {
        Ok(Some(w)) => eprintln!(
            "coffre: in a delegated cgroup: the daemon moved into a leaf, workloads go under {}",
            w.display()
        ),
        Ok(None) => {}
        Err(e) => eprintln!(
            "coffre: warning: a delegated cgroup, but the daemon could not move into a leaf of it ({e}); workloads' cgroups stay at the hierarchy's root"
        ),
    }
    let rt = runtime()?;
    let served = rt.block_on(coffre_daemon::server::serve(&dir, listen, |addr| {
        println!("coffre: vault {} listening on {addr}", dir.display());
        let _ = std::io::stdout().flush();
    }));
    // Work still running off the actor is an open or a close hung on the
    // storage (the stop left it, its key wiped): dropping the runtime
    // would wait for it without end, and the service manager would have
    // to kill the daemon. The process ends, and its mounts go at the next
    // start.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    served.with_context(|| format!("serving {}", dir.display()))?;
    eprintln!("coffre: stopped; the vault is closed");
    Ok(exit::OK)
}

/// A progress line on a terminal: done of total chunks.
fn chunk_progress() -> impl FnMut(u64, u64) {
    use std::io::IsTerminal;
    let show = std::io::stderr().is_terminal();
    let mut last = std::time::Instant::now();
    move |done, total| {
        if show && (done == total || last.elapsed() > std::time::Duration::from_millis(200)) {
            last = std::time::Instant::now();
            eprint!(
                "\r{:5.1}%  {done}/{total} chunks ",
                100.0 * done as f64 / total.max(1) as f64
            );
            if done == total {
                eprintln!();
            }
        }
    }
}

pub fn storage(c: crate::cli::StorageCommand) -> Result<u8> {
    use crate::cli::StorageCommand as S;
    match c {
        S::Migrate {
            dir,
            to,
            endpoint,
            region,
            allow_http,
            credentials,
            password_file,
        } => {
            let password = secrets::passphrase(&password_file)?;
            let target = coffre_daemon::vaultdir::StorageConfig {
                endpoint,
                region,
                allow_http,
                ..coffre_daemon::vaultdir::StorageConfig::new(to.clone())
            };
            match coffre_daemon::remote::migrate_volume(
                &dir,
                &password,
                target,
                credentials.as_deref(),
                chunk_progress(),
            ) {
                Ok(m) => {
                    println!(
                        "migrated to {to}: {} chunk(s) uploaded, {} already there, {} of zeros not stored; {} read back and compared",
                        m.imported.uploaded, m.imported.already, m.imported.zero, m.verified
                    );
                    println!(
                        "config.toml names the store; the local file is kept as volume.img.migrated: remove it once the vault opens"
                    );
                    Ok(exit::OK)
                }
                Err(e) => {
                    eprintln!("coffre: storage migrate: {e}");
                    Ok(exit::FAILURE)
                }
            }
        }
        S::Status { dir, json } => {
            let mut v = match coffre_daemon::remote::status(&dir) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("coffre: storage status: {}", told_lines(&e.to_string()));
                    return Ok(exit::FAILURE);
                }
            };
            if !json {
                // What storage hosts said, with its control characters
                // escaped.
                told_all(&mut v);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v["backend"] == "file" {
                println!(
                    "backend: a local file, {}",
                    v["volume"].as_str().unwrap_or("?")
                );
            } else {
                println!(
                    "backend: {}{}",
                    v["url"].as_str().unwrap_or("?"),
                    v["endpoint"]
                        .as_str()
                        .map(|e| format!(" at {e}"))
                        .unwrap_or_default()
                );
                println!("local root epoch: {}", v["local_root_epoch"]);
                if let Some(n) = v["journal_bytes"].as_u64().filter(|n| *n > 0) {
                    println!(
                        "write journal: {n} bytes a stopped daemon took, not yet on the store (replayed and flushed at the next open)"
                    );
                } else if let Some(e) = v["journal_error"].as_str() {
                    println!(
                        "write journal: CANNOT BE READ: {e} (if the daemon cannot read it either, the next open is refused until it is repaired or removed)"
                    );
                }
                let stores = v["stores"].as_array().cloned().unwrap_or_default();
                for (i, st) in stores.iter().enumerate() {
                    let who = if i == 0 {
                        "store".to_string()
                    } else {
                        format!("mirror {}", st["url"].as_str().unwrap_or("?"))
                    };
                    match st["error"].as_str() {
                        Some(e) => println!("{who}: cannot be read: {e}"),
                        None => println!(
                            "{who}: manifest epoch {} (as it claims; verified at the next open): {}",
                            st["store_epoch_claimed"],
                            st["standing"].as_str().unwrap_or("?")
                        ),
                    }
                }
                if let Some(h) = v["last_known_while_open"]["stores"].as_array() {
                    println!("while the vault was last open:");
                    for st in h {
                        println!(
                            "  {}: {}{}",
                            st["name"].as_str().unwrap_or("?"),
                            if st["in_step"] == true {
                                "in step".to_string()
                            } else {
                                format!(
                                    "STALE ({}), {} epoch(s) behind, {} object(s) to copy",
                                    st["reason"].as_str().unwrap_or("?"),
                                    st["behind"],
                                    st["to_copy"]
                                )
                            },
                            match st["repaired"].as_u64() {
                                Some(n) if n > 0 => format!(", {n} object(s) repaired"),
                                _ => String::new(),
                            }
                        );
                    }
                }
            }
            let stores = v["stores"].as_array().cloned().unwrap_or_default();
            let bad = stores.iter().any(|st| {
                st["reachable"] == false
                    || st["standing"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("BEHIND") || s.starts_with("NO LOCAL ROOT"))
            });
            Ok(if bad { exit::FAILURE } else { exit::OK })
        }
        S::Sweep {
            dir,
            password_file,
            min_age,
            force,
            dry_run,
            json,
        } => {
            if min_age < 3600 && !force {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "error": "--min-age under 1h needs --force" })
                    );
                }
                eprintln!(
                    "coffre: storage sweep: --min-age under 1h needs --force: only the age keeps a sweep off the objects of a writer on another host that has not flushed yet"
                );
                return Ok(exit::USAGE);
            }
            let password = secrets::passphrase(&password_file)?;
            let age = std::time::Duration::from_secs(min_age);
            match coffre_daemon::remote::sweep_store(&dir, &password, age, dry_run) {
                Ok(swept) => {
                    let whole = swept.unjudged.is_empty()
                        && (dry_run || swept.deleted == swept.orphans.len());
                    if json {
                        let unjudged: Vec<serde_json::Value> = swept
                            .unjudged
                            .iter()
                            .map(|(store, why)| serde_json::json!({"store": store, "reason": why}))
                            .collect();
                        println!(
                            "{}",
                            serde_json::json!({
                                "orphans": swept.orphans,
                                "deleted": swept.deleted,
                                "unjudged": unjudged,
                                "partial": swept.partial,
                                "dry_run": dry_run,
                                "min_age_s": min_age,
                            })
                        );
                    } else {
                        if dry_run {
                            for n in &swept.orphans {
                                println!("{n}");
                            }
                            println!(
                                "{} orphaned object(s) would go (named by no manifest, last written {min_age} s ago or earlier); nothing deleted",
                                swept.orphans.len()
                            );
                        } else {
                            println!(
                                "{} of {} orphaned object(s) deleted (named by no manifest, last written {min_age} s ago or earlier)",
                                swept.deleted,
                                swept.orphans.len()
                            );
                        }
                        for (store, why) in &swept.unjudged {
                            eprintln!(
                                "coffre: storage sweep: {store} not swept: {}",
                                told_lines(why)
                            );
                        }
                        for store in &swept.partial {
                            eprintln!(
                                "coffre: storage sweep: {store} holds more objects than one sweep lists: the rest at the next"
                            );
                        }
                    }
                    Ok(if whole { exit::OK } else { exit::FAILURE })
                }
                Err(e) => {
                    if json {
                        println!("{}", serde_json::json!({ "error": e }));
                    }
                    eprintln!("coffre: storage sweep: {e}");
                    Ok(exit::FAILURE)
                }
            }
        }
        S::Trust {
            dir,
            password_file,
            older,
        } => {
            let password = secrets::passphrase(&password_file)?;
            match coffre_daemon::remote::trust_store(&dir, &password, older) {
                Ok((was, now)) => {
                    println!(
                        "the local root was {}; it is the store's now: epoch {now} (manifest and pages verified). The rollback check holds again from here.",
                        was.map_or("missing".to_string(), |e| format!("epoch {e}"))
                    );
                    Ok(exit::OK)
                }
                Err(e) => {
                    eprintln!("coffre: storage trust: {e}");
                    Ok(exit::FAILURE)
                }
            }
        }
        S::Export {
            dir,
            out,
            password_file,
            store,
            trust_store_epoch,
        } => {
            let password = secrets::passphrase(&password_file)?;
            let from = coffre_daemon::remote::ExportFrom {
                store: store.as_deref(),
                trust_store_epoch,
            };
            match coffre_daemon::remote::export_volume(
                &dir,
                &password,
                &out,
                from,
                chunk_progress(),
            ) {
                Ok(()) => {
                    println!(
                        "exported to {}: open it with cryptsetup and the detached header {}",
                        out.display(),
                        dir.join("volume.hdr").display()
                    );
                    Ok(exit::OK)
                }
                Err(e) => {
                    eprintln!("coffre: storage export: {e}");
                    Ok(exit::FAILURE)
                }
            }
        }
    }
}

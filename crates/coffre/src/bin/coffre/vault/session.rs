//! Being inside: `enter` (in the foreground or detached), `leave`, and the
//! tasks that keep the vault open without a session.

use super::client::*;
use super::*;
use crate::cli::{AuthArgs, IdentityArg, TaskCommand};
use crate::secrets;
use anyhow::{Context, Result, bail};
use coffre::exit;
use coffre_daemon::api::ApiCommand;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// `enter --detach`: a child `coffre enter` holds the session in the
/// background; this returns once it is inside.
pub fn enter_detached(ida: IdentityArg, auth: AuthArgs, heartbeat: u64) -> Result<u8> {
    use std::os::unix::process::CommandExt;
    let (path, _) = load_identity(&ida)?;
    let password = secrets::passphrase(&auth.password_file)?;
    let sfile = session_file(&path);
    let _ = std::fs::remove_file(&sfile);
    let log = {
        let mut s = path.as_os_str().to_owned();
        s.push(".agent.log");
        PathBuf::from(s)
    };
    let logf = std::fs::File::create(&log)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    // The code by the environment, not argv: the agent lives on, and its
    // argv is anyone's to read in `ps` (its environment is its user's).
    cmd.args([
        "enter",
        "--password-file",
        "-",
        "--heartbeat",
        &heartbeat.to_string(),
    ])
    .env("COFFRE_TOTP", &auth.totp)
    .arg("--identity")
    .arg(&path)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(logf)
    .process_group(0);
    if let Some(s) = &ida.server {
        cmd.args(["--server", s]);
    }
    let mut child = cmd.spawn()?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(password.expose())?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if sfile.exists() {
            eprintln!(
                "coffre: entered; agent pid {} holds the session (log: {}). `coffre leave` to leave.",
                child.id(),
                log.display()
            );
            return Ok(exit::OK);
        }
        if let Some(status) = child.try_wait()? {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            eprint!("{msg}");
            return Ok(u8::try_from(status.code().unwrap_or(1)).unwrap_or(exit::FAILURE));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("the background agent did not enter within 2 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn enter(ida: IdentityArg, auth: AuthArgs, heartbeat: u64) -> Result<u8> {
    let (path, id) = load_identity(&ida)?;
    let password = read_password(&auth.password_file)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let r = call(&id, &ApiCommand::Enter { password, totp: auth.totp }).await?;
        let v = match r {
            Ok(v) => v,
            Err((code, msg)) => return Ok(fail(code, &msg)),
        };
        let session = v["session"].as_u64().context("no session in the reply")?;
        let sfile = session_file(&path);
        coffre_sys::fs::write_atomic(&sfile, serde_json::json!({"session": session, "pid": std::process::id()}).to_string().as_bytes(), 0o600)?;
        let st = call(&id, &ApiCommand::Status).await?.ok();
        let state = st.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("?").to_string();
        eprintln!("coffre: {} entered (session {session}); the vault is {state}. Ctrl-C or `coffre leave` to leave.", id.member);
        if let Some(data) = v["data"].as_str() {
            eprintln!("coffre: the data is at {data} on the vault's host");
        }
        let tty = std::io::stderr().is_terminal();
        let mut iv = tokio::time::interval(std::time::Duration::from_secs(heartbeat.max(1)));
        iv.tick().await;
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("signal handler");
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        };
        tokio::pin!(stop);
        let mut unreachable_since: Option<std::time::Instant> = None;
        let code = loop {
            tokio::select! {
                _ = &mut stop => {
                    let _ = call(&id, &ApiCommand::Leave { session }).await;
                    eprintln!("\ncoffre: left the vault");
                    break exit::OK;
                }
                _ = iv.tick() => {
                    if !session_is(&sfile, session) {
                        // `coffre leave` from another shell ended it.
                        eprintln!("coffre: left the vault");
                        break exit::OK;
                    }
                    match call(&id, &ApiCommand::Heartbeat { session }).await? {
                        Ok(_) => {
                            unreachable_since = None;
                            if tty
                                && let Ok(Ok(s)) = call(&id, &ApiCommand::Status).await {
                                    eprint!("\r[coffre] {} inside; vault {}, {} session(s), {} task(s)   ", id.member, s["state"].as_str().unwrap_or("?"), s["sessions"].as_array().map_or(0, Vec::len), s["tasks"].as_array().map_or(0, Vec::len));
                                }
                        }
                        Err((exit::UNREACHABLE, msg)) => {
                            unreachable_since.get_or_insert_with(std::time::Instant::now);
                            if unreachable_since.is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(120)) {
                                eprintln!("\ncoffre: the vault has been unreachable for 2 minutes; giving up the session");
                                break exit::UNREACHABLE;
                            }
                            eprintln!("coffre: heartbeat failed: {msg}; retrying");
                        }
                        Err((exit::AUDIT_ROLLED_BACK, msg)) => {
                            eprintln!("\ncoffre: left the vault: {msg}");
                            break exit::AUDIT_ROLLED_BACK;
                        }
                        Err((code, msg)) => {
                            if !session_is(&sfile, session) {
                                // `coffre leave` ended it meanwhile.
                                eprintln!("coffre: left the vault");
                                break exit::OK;
                            }
                            eprintln!("\ncoffre: the vault ended this session: {msg}");
                            break code;
                        }
                    }
                }
            }
        };
        // Only our own session file: a newer `enter` may have replaced it.
        if session_is(&sfile, session) {
            let _ = std::fs::remove_file(&sfile);
        }
        Ok(code)
    })
}

/// Whether the session file names `session`.
pub(super) fn session_is(sfile: &Path, session: u64) -> bool {
    std::fs::read_to_string(sfile)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["session"].as_u64())
        == Some(session)
}

pub(super) fn current_session(path: &Path) -> Result<u64> {
    let sfile = session_file(path);
    let text = std::fs::read_to_string(&sfile).with_context(|| {
        format!(
            "no session for this identity ({} missing): run `coffre enter` first",
            sfile.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)?;
    v["session"].as_u64().context("bad session file")
}

pub fn leave(ida: IdentityArg) -> Result<u8> {
    let (path, id) = load_identity(&ida)?;
    let session = current_session(&path)?;
    let rt = runtime()?;
    // The file goes first: an `enter` holding this session then knows the
    // end is ours (not the vault's) whenever its next heartbeat lands.
    let _ = std::fs::remove_file(session_file(&path));
    let r = rt.block_on(call(&id, &ApiCommand::Leave { session }))?;
    match r {
        Ok(_) => {
            eprintln!("coffre: left the vault (session {session})");
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

pub fn task(cmd: TaskCommand) -> Result<u8> {
    match cmd {
        TaskCommand::Add {
            name,
            duration,
            workload,
            id,
        } => {
            let (path, ident) = load_identity(&id)?;
            let session = current_session(&path)?;
            let cmd = ApiCommand::TaskAdd {
                session,
                task_name: name,
                task_user: Some(ident.member.clone()),
                task_expire: duration,
                workload: workload.clone(),
            };
            match runtime()?.block_on(call(&ident, &cmd))? {
                Ok(v) => {
                    println!("{}", v["task_id"]);
                    match workload {
                        Some(w) => eprintln!(
                            "coffre: task {} keeps the vault open until workload {w} ends (at most {duration} s)",
                            v["task_id"]
                        ),
                        None => eprintln!(
                            "coffre: task {} keeps the vault open for {duration} s",
                            v["task_id"]
                        ),
                    }
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
        TaskCommand::List { id, json } => match simple(&id, ApiCommand::TaskList)? {
            Ok(v) => {
                if json {
                    print_json(&v["tasks"])?;
                } else {
                    for t in v["tasks"].as_array().into_iter().flatten() {
                        println!(
                            "{}\t{}\t{}\t{}",
                            t["task_id"],
                            t["task_user"].as_str().unwrap_or(""),
                            t["expires_ms"],
                            t["task_name"].as_str().unwrap_or("")
                        );
                    }
                }
                Ok(exit::OK)
            }
            Err((code, msg)) => Ok(fail(code, &msg)),
        },
        TaskCommand::Cancel { task_id, id } => {
            let (path, ident) = load_identity(&id)?;
            let session = current_session(&path)?;
            match runtime()?.block_on(call(&ident, &ApiCommand::TaskCancel { session, task_id }))? {
                Ok(_) => Ok(exit::OK),
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
    }
}

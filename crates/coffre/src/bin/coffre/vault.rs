//! The vault commands: `init`, `serve`, and the client commands that talk
//! to the daemon over mutual TLS.

use crate::cli::{
    AuditCommand, AuthArgs, GatewayCommand, IdentityArg, InitArgs, MemberCommand, ModeChoice,
    ProposalCommand, ProtoChoice, RoleChoice, TaskCommand, WorkloadCommand,
};
use crate::secrets;
use anyhow::{Context, Result, bail};
use coffre::exit;
use coffre_daemon::api::{ApiCommand, ApiSecret};
use coffre_daemon::client;
use coffre_daemon::vaultdir::{Identity, VaultDir};
use coffre_daemon::witness::{self, Assessment, HeadStore, SeenHead, ShownHead, WitnessError};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn identity_path(a: &IdentityArg) -> Result<PathBuf> {
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

fn load_identity(a: &IdentityArg) -> Result<(PathBuf, Identity)> {
    let p = identity_path(a)?;
    let mut id = Identity::load(&p).with_context(|| format!("reading identity {}", p.display()))?;
    if let Some(s) = &a.server {
        id.server = s.clone();
    }
    Ok((p, id))
}

fn session_file(identity: &Path) -> PathBuf {
    let mut s = identity.as_os_str().to_owned();
    s.push(".session");
    PathBuf::from(s)
}

/// The fields of an invitation file `join` uses; the code is wiped when
/// dropped.
#[derive(serde::Deserialize)]
struct InvitationFile {
    name: String,
    code: ApiSecret,
    ca_pem: String,
    ca_fingerprint: String,
    server: Option<String>,
}

fn read_password(path: &Path) -> Result<ApiSecret> {
    let p = secrets::passphrase(path)?;
    // Checked before the copy: a failed `String::from_utf8` would carry the
    // bytes away in its error.
    let s = std::str::from_utf8(p.expose()).context("passwords must be UTF-8 text")?;
    Ok(ApiSecret(s.to_owned()))
}

/// Sends a command; maps refusals to exit codes with the daemon's message.
/// Every reply carries the vault's signed audit head, checked against the
/// highest one this machine has seen (`check_audit_head`).
async fn call(id: &Identity, cmd: &ApiCommand) -> Result<std::result::Result<Value, (u8, String)>> {
    match client::call(id, cmd).await {
        Ok(v) => {
            if let Err(refusal) = check_audit_head(id, &v).await {
                // Do not stay inside a vault whose log was cut back.
                let session = match cmd {
                    ApiCommand::Enter { .. } => v["session"].as_u64(),
                    ApiCommand::Heartbeat { session } => Some(*session),
                    _ => None,
                };
                if let Some(session) = session {
                    let _ = client::call(id, &ApiCommand::Leave { session }).await;
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

/// This vault's name on this machine: its CA's fingerprint.
fn vault_key(ca_pem: &str) -> std::result::Result<String, (u8, String)> {
    coffre_daemon::pki::pem_fingerprint(ca_pem)
        .ok_or_else(|| (exit::FAILURE, "the vault's CA is not PEM".to_string()))
}

fn witness_refusal(e: WitnessError) -> (u8, String) {
    match e {
        WitnessError::State(m) => (exit::FAILURE, m),
        e => (exit::AUDIT_ROLLED_BACK, e.to_string()),
    }
}

/// Finding 3: checks the signed audit head a reply carries against the
/// highest one this machine remembers for the vault (same key, not older,
/// and, when further on, linked to it by the records in between), then
/// remembers it.
async fn check_audit_head(id: &Identity, reply: &Value) -> std::result::Result<(), (u8, String)> {
    let vault = vault_key(&id.ca_pem)?;
    let store = HeadStore::from_env().map_err(witness_refusal)?;
    let seen = store.load(&vault).map_err(witness_refusal)?;
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
                .remember(&SeenHead::from_shown(&vault, &shown))
                .map_err(witness_refusal)
        }
        Assessment::Ahead { since } => {
            let seen = seen.expect("ahead of a seen head");
            let cmd = ApiCommand::AuditShow { since: Some(since) };
            match client::call(id, &cmd).await {
                Ok(r) if r["ok"] == true => {
                    let entries: Vec<coffre_audit::Entry> =
                        serde_json::from_value(r["entries"].clone()).map_err(|e| {
                            (exit::FAILURE, format!("unreadable audit records: {e}"))
                        })?;
                    witness::check_chain(&seen, &shown, &entries).map_err(witness_refusal)?;
                    store
                        .remember(&SeenHead::from_shown(&vault, &shown))
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

/// Checks the vault directory's own head against what this machine
/// remembers (`coffre audit verify --dir`); remembers nothing.
fn check_dir_against_seen(dir: &Path, entries_ok: bool) -> Result<std::result::Result<(), String>> {
    let vd = VaultDir::new(dir);
    let vault = match vault_key(&vd.read(&vd.ca_cert())?) {
        Ok(v) => v,
        Err((_, m)) => bail!(m),
    };
    let store = HeadStore::from_env()?;
    let Some(seen) = store.load(&vault)? else {
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

fn fail(code: u8, msg: &str) -> u8 {
    eprintln!("coffre: {msg}");
    code
}

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
    let rt = runtime()?;
    rt.block_on(coffre_daemon::server::serve(&dir, listen, |addr| {
        println!("coffre: vault {} listening on {addr}", dir.display());
        let _ = std::io::stdout().flush();
    }))
    .with_context(|| format!("serving {}", dir.display()))?;
    eprintln!("coffre: stopped; the vault is closed");
    Ok(exit::OK)
}

/// Prints an otpauth URI as a QR code an authenticator app can scan.
fn print_qr(uri: &str) {
    if let Ok(code) = qrcode::QrCode::new(uri.as_bytes()) {
        let w = code.width();
        let dark = |x: usize, y: usize| x < w && y < w && code[(x, y)] == qrcode::Color::Dark;
        // Two modules per character cell, with a quiet zone of 2.
        for y in (0..w + 4).step_by(2) {
            let mut line = String::new();
            for x in 0..w + 4 {
                let top = x >= 2 && y >= 2 && dark(x - 2, y - 2);
                let bottom = x >= 2 && y + 1 >= 2 && dark(x - 2, y - 1);
                line.push(match (top, bottom) {
                    (true, true) => ' ',
                    (true, false) => '\u{2584}',
                    (false, true) => '\u{2580}',
                    (false, false) => '\u{2588}',
                });
            }
            println!("  {line}");
        }
    }
}

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
    cmd.args([
        "enter",
        "--password-file",
        "-",
        "--totp",
        &auth.totp,
        "--heartbeat",
        &heartbeat.to_string(),
    ])
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
fn session_is(sfile: &Path, session: u64) -> bool {
    std::fs::read_to_string(sfile)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["session"].as_u64())
        == Some(session)
}

fn current_session(path: &Path) -> Result<u64> {
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

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn simple(ida: &IdentityArg, cmd: ApiCommand) -> Result<std::result::Result<Value, (u8, String)>> {
    let (_, id) = load_identity(ida)?;
    runtime()?.block_on(call(&id, &cmd))
}

pub fn status(ida: IdentityArg, json: bool) -> Result<u8> {
    match simple(&ida, ApiCommand::Status)? {
        Ok(v) => {
            if json {
                print_json(&v)?;
            } else {
                println!("state:   {}", v["state"].as_str().unwrap_or("?"));
                if v["audit"]["writable"] == false {
                    println!(
                        "audit:   CANNOT BE WRITTEN ({}); {} record(s) waiting; only lock and leave are accepted",
                        v["audit"]["error"].as_str().unwrap_or("?"),
                        v["audit"]["waiting"]
                    );
                }
                if let Some(l) = v["lock"].as_object() {
                    println!(
                        "locked by {} : {}",
                        l["by"].as_str().unwrap_or("?"),
                        l["reason"].as_str().unwrap_or("")
                    );
                    println!(
                        "unlock:  {} of {} approval(s)",
                        v["unlock_approvals"].as_array().map_or(0, Vec::len),
                        v["unlock_quorum"]
                    );
                }
                match v["mode_pending"].as_str() {
                    Some(p) => println!(
                        "mode:    {} in force; {p} from the next close",
                        v["mode"].as_str().unwrap_or("?")
                    ),
                    None => println!("mode:    {}", v["mode"].as_str().unwrap_or("?")),
                }
                let d = &v["data"];
                if d["mounted"].as_bool() == Some(true) {
                    println!(
                        "data:    {} (mounted from {})",
                        d["mountpoint"].as_str().unwrap_or("?"),
                        d["loop_device"].as_str().unwrap_or("?")
                    );
                    println!(
                        "nbd:     {} ({} client(s)); exports: {}",
                        d["nbd_socket"].as_str().unwrap_or("?"),
                        d["nbd_clients"],
                        d["exports"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(", "))
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "none".into())
                    );
                } else if let Some(mp) = d["mountpoint"].as_str() {
                    println!("data:    {mp} (not mounted)");
                }
                println!("members: {}", v["members"]);
                for p in v["proposals"].as_array().into_iter().flatten() {
                    println!(
                        "proposal: {} {} by {} ({}/{} approvals; `coffre approve {}`)",
                        p["id"].as_str().unwrap_or("?"),
                        p["description"].as_str().unwrap_or("?"),
                        p["by"].as_str().unwrap_or("?"),
                        p["approvals"].as_array().map_or(0, Vec::len),
                        p["needed"],
                        p["id"].as_str().unwrap_or("?"),
                    );
                }
                for s in v["sessions"].as_array().into_iter().flatten() {
                    println!(
                        "inside:  {} via {} from {} since {} (session {})",
                        s["member"].as_str().unwrap_or("?"),
                        s["door"].as_str().unwrap_or("?"),
                        s["from"].as_str().unwrap_or("?"),
                        iso(s["since_ms"].as_u64().unwrap_or(0)),
                        s["session"]
                    );
                }
                let g = &v["gateway"];
                if g["configured"].as_bool() == Some(true) {
                    if g["openvpn_connected"].as_bool() == Some(true) {
                        println!(
                            "vpn:     OpenVPN (pid {}) connected, {} client(s)",
                            g["openvpn_pid"],
                            g["clients"].as_array().map_or(0, Vec::len)
                        );
                    } else {
                        println!(
                            "vpn:     OpenVPN not reachable: {}",
                            g["down_reason"].as_str().unwrap_or("not connected yet")
                        );
                    }
                }
                for w in v["workloads"].as_array().into_iter().flatten() {
                    println!("workload: {}", workload_line(w));
                }
                for t in v["tasks"].as_array().into_iter().flatten() {
                    println!(
                        "task:    {} {:?} by {} until {} ms",
                        t["task_id"],
                        t["task_name"].as_str().unwrap_or(""),
                        t["task_user"].as_str().unwrap_or("?"),
                        t["expires_ms"]
                    );
                }
            }
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

/// One workload as status and `workload list` show it.
fn workload_line(w: &serde_json::Value) -> String {
    let pid = w["pid"]
        .as_i64()
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default();
    let note = w["note"].as_str().filter(|n| !n.is_empty());
    format!(
        "{} [{} {}] {}{pid} since {}{}",
        w["name"].as_str().unwrap_or("?"),
        w["role"].as_str().unwrap_or("?"),
        w["kind"].as_str().unwrap_or("?"),
        w["state"].as_str().unwrap_or("?"),
        iso(w["since_ms"].as_u64().unwrap_or(0)),
        note.map(|n| format!(": {n}")).unwrap_or_default()
    )
}

pub fn workload(cmd: WorkloadCommand) -> Result<u8> {
    match cmd {
        WorkloadCommand::List { id, json } => match simple(&id, ApiCommand::Status)? {
            Ok(v) => {
                if json {
                    print_json(&v["workloads"])?;
                } else {
                    match v["mode_pending"].as_str() {
                        Some(p) => println!(
                            "mode: {} in force; {p} from the next close",
                            v["mode"].as_str().unwrap_or("?")
                        ),
                        None => println!("mode: {}", v["mode"].as_str().unwrap_or("?")),
                    }
                    for w in v["workloads"].as_array().into_iter().flatten() {
                        println!("{}", workload_line(w));
                    }
                }
                Ok(exit::OK)
            }
            Err((code, msg)) => Ok(fail(code, &msg)),
        },
        WorkloadCommand::Logs { name, bytes, id } => {
            let (path, ident) = load_identity(&id)?;
            let session = current_session(&path)?;
            let cmd = ApiCommand::WorkloadLogs {
                session,
                name,
                bytes,
            };
            match runtime()?.block_on(call(&ident, &cmd))? {
                Ok(v) => {
                    use base64::Engine;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(v["log_b64"].as_str().unwrap_or_default())
                        .unwrap_or_default();
                    use std::io::Write;
                    std::io::stdout().write_all(&raw)?;
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
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

fn authed(
    ida: &IdentityArg,
    auth: &AuthArgs,
    make: impl FnOnce(ApiSecret, String) -> ApiCommand,
) -> Result<std::result::Result<Value, (u8, String)>> {
    let password = read_password(&auth.password_file)?;
    simple(ida, make(password, auth.totp.clone()))
}

pub fn lock(ida: IdentityArg, auth: AuthArgs, reason: String) -> Result<u8> {
    match authed(&ida, &auth, |password, totp| ApiCommand::Lock {
        reason,
        password,
        totp,
    })? {
        Ok(_) => {
            eprintln!("coffre: the vault is locked");
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

pub fn unlock(ida: IdentityArg, auth: AuthArgs) -> Result<u8> {
    match authed(&ida, &auth, |password, totp| ApiCommand::Unlock {
        password,
        totp,
    })? {
        Ok(v) => {
            match v["remaining"].as_u64() {
                Some(0) | None => {
                    eprintln!("coffre: unlocked; the vault is closed and can be entered")
                }
                Some(n) => {
                    eprintln!("coffre: approval recorded; {n} more superuser approval(s) needed")
                }
            }
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

pub fn mode(ida: IdentityArg, auth: AuthArgs, mode: ModeChoice) -> Result<u8> {
    let m = match mode {
        ModeChoice::Fast => coffre_vault::Mode::Fast,
        ModeChoice::Safe => coffre_vault::Mode::Safe,
    };
    match authed(&ida, &auth, |password, totp| ApiCommand::Mode {
        mode: m,
        password,
        totp,
    })? {
        Ok(_) => {
            if let Ok(Ok(v)) = simple(&ida, ApiCommand::Status) {
                match v["mode_pending"].as_str() {
                    Some(p) => println!(
                        "coffre: {p} mode takes effect at the next close ({} is in force until then)",
                        v["mode"].as_str().unwrap_or("?")
                    ),
                    None => println!(
                        "coffre: {} mode in force",
                        v["mode"].as_str().unwrap_or("?")
                    ),
                }
            }
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

pub fn quorum(ida: IdentityArg, auth: AuthArgs, quorum: u32) -> Result<u8> {
    match authed(&ida, &auth, |password, totp| ApiCommand::Quorum {
        quorum,
        password,
        totp,
    })? {
        Ok(v) => {
            say_proposal(&v);
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

/// A command that made or approved a proposal says where it stands.
fn say_proposal(v: &Value) {
    let p = &v["proposal"];
    if p.is_null() {
        return;
    }
    let id = p["id"].as_str().unwrap_or("?");
    let what = p["description"].as_str().unwrap_or("?");
    match p["remaining"].as_u64() {
        Some(0) | None => eprintln!("coffre: proposal {id} carried out: {what}"),
        Some(n) => eprintln!(
            "coffre: proposal {id} ({what}) needs {n} more superuser approval(s): `coffre approve {id}` within the approval window"
        ),
    }
}

/// `coffre approve ID`
pub fn approve(
    ida: IdentityArg,
    auth: AuthArgs,
    proposal: String,
    out: Option<PathBuf>,
) -> Result<u8> {
    if let Some(o) = &out
        && o.exists()
    {
        bail!("{} exists; choose another --out", o.display());
    }
    match authed(&ida, &auth, |password, totp| ApiCommand::Approve {
        id: proposal.clone(),
        password,
        totp,
    })? {
        Ok(v) => {
            if v["invitation"].is_object() {
                let inv = &v["invitation"];
                let name = inv["name"].as_str().unwrap_or("member");
                let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.invitation")));
                if out.exists() {
                    bail!(
                        "{} exists: the invitation was made but cannot be written; it expires by itself (or lock to cancel it)",
                        out.display()
                    );
                }
                coffre_sys::fs::write_atomic(
                    &out,
                    zeroize::Zeroizing::new(serde_json::to_string_pretty(inv)?).as_bytes(),
                    0o600,
                )?;
                eprintln!(
                    "coffre: proposal {proposal} carried out: invitation for {name} written to {} (expires at {}); hand it over privately",
                    out.display(),
                    iso(inv["expires_ms"].as_u64().unwrap_or(0)),
                );
            } else if v["proposal"].is_object() {
                say_proposal(&v);
            } else {
                eprintln!("coffre: proposal {proposal} carried out");
            }
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

/// `coffre proposal list`
pub fn proposal(cmd: ProposalCommand) -> Result<u8> {
    match cmd {
        ProposalCommand::List { id, json } => match simple(&id, ApiCommand::ProposalList)? {
            Ok(v) => {
                let list = v["proposals"].as_array().cloned().unwrap_or_default();
                if json {
                    print_json(&Value::Array(list))?;
                } else if list.is_empty() {
                    println!("no pending proposal");
                } else {
                    for p in &list {
                        let approvals: Vec<&str> = p["approvals"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        println!(
                            "{}  {}  by {}  approved by {} ({}/{})  expires {}",
                            p["id"].as_str().unwrap_or("?"),
                            p["description"].as_str().unwrap_or("?"),
                            p["by"].as_str().unwrap_or("?"),
                            approvals.join(", "),
                            approvals.len(),
                            p["needed"],
                            iso(p["expires_ms"].as_u64().unwrap_or(0)),
                        );
                    }
                }
                Ok(exit::OK)
            }
            Err((code, msg)) => Ok(fail(code, &msg)),
        },
    }
}

/// `coffre gateway …`
pub fn gateway(cmd: GatewayCommand) -> Result<u8> {
    match cmd {
        GatewayCommand::OpenvpnConfig(a) => {
            let mut g = coffre_daemon::vaultdir::GatewayConfig::new(a.remote);
            g.port = a.port;
            g.proto = match a.proto {
                ProtoChoice::Udp => coffre_daemon::openvpn::Proto::Udp,
                ProtoChoice::Tcp => coffre_daemon::openvpn::Proto::Tcp,
            };
            g.network = a.network;
            g.keepalive = [a.keepalive_interval, a.keepalive_timeout];
            g.reneg_s = a.reneg_sec;
            g.token_lifetime_s = a.token_lifetime;
            g.static_challenge = !a.totp_suffix;
            g.drop_privileges = !a.keep_root;
            for pair in &a.addresses {
                let (name, ip) = pair
                    .split_once('=')
                    .with_context(|| format!("--address {pair}: expected NAME=ADDRESS"))?;
                let ip = ip
                    .parse()
                    .with_context(|| format!("--address {pair}: {ip:?} is not an IPv4 address"))?;
                g.addresses.insert(name.to_string(), ip);
            }
            let vd = VaultDir::new(&a.dir);
            let r = coffre_daemon::gateway::write_openvpn_config(&vd, g)?;
            println!("wrote {}", r.server_conf.display());
            if r.new_tls_crypt {
                println!(
                    "made a new tls-crypt key: members need their profile (`coffre member profile NAME`)"
                );
            } else {
                println!("kept the existing tls-crypt key: members' profiles stay valid");
            }
            println!(
                "next: restart `coffre serve {}`, then run: openvpn --config {}",
                a.dir.display(),
                r.server_conf.display()
            );
            println!(
                "the daemon talks to OpenVPN through {} (root only)",
                r.management.display()
            );
            Ok(exit::OK)
        }
    }
}

pub fn member(cmd: MemberCommand) -> Result<u8> {
    match cmd {
        MemberCommand::Profile {
            name,
            out,
            totp_suffix,
            id,
        } => {
            let (_, ident) = load_identity(&id)?;
            if ident.member != name {
                bail!(
                    "this identity is {}'s: a profile holds its member's private key, so {name} writes theirs on their own machine",
                    ident.member
                );
            }
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.ovpn")));
            match runtime()?.block_on(call(&ident, &ApiCommand::GatewayProfile))? {
                Ok(v) => {
                    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                    let p = coffre_daemon::openvpn::ProfileSettings {
                        vault: s("vault"),
                        remote: s("remote"),
                        port: v["port"]
                            .as_u64()
                            .and_then(|p| u16::try_from(p).ok())
                            .unwrap_or(1194),
                        // What the daemon sends is `udp` or `tcp`; an
                        // older or odd answer means OpenVPN's default.
                        proto: s("proto").parse().unwrap_or_default(),
                        static_challenge: v["static_challenge"].as_bool().unwrap_or(true)
                            && !totp_suffix,
                        ca_pem: s("ca_pem"),
                        tls_crypt: s("tls_crypt"),
                    };
                    let text = zeroize::Zeroizing::new(coffre_daemon::openvpn::profile(
                        &p,
                        &name,
                        &ident.cert_pem,
                        &ident.key_pem,
                    ));
                    coffre_sys::fs::write_atomic(&out, text.as_bytes(), 0o600)?;
                    eprintln!(
                        "coffre: profile written to {} (mode 0600: it holds your private key); user name {name}, password {}",
                        out.display(),
                        if p.static_challenge {
                            "your vault password, then the TOTP code when asked"
                        } else {
                            "your vault password followed by the 6-digit TOTP code"
                        }
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
        MemberCommand::List { id, json } => match simple(&id, ApiCommand::MemberList)? {
            Ok(v) => {
                if json {
                    print_json(&v["members"])?;
                } else {
                    for m in v["members"].as_array().into_iter().flatten() {
                        println!(
                            "{}\t{}\tkeyslot {}",
                            m["name"].as_str().unwrap_or(""),
                            m["role"].as_str().unwrap_or(""),
                            m["keyslot"]
                        );
                    }
                }
                Ok(exit::OK)
            }
            Err((code, msg)) => Ok(fail(code, &msg)),
        },
        MemberCommand::Invite {
            name,
            role,
            out,
            id,
            auth,
        } => {
            let role = match role {
                RoleChoice::Member => coffre_vault::Role::Member,
                RoleChoice::Superuser => coffre_vault::Role::Superuser,
            };
            if out.exists() {
                bail!("{} exists; choose another --out", out.display());
            }
            match authed(&id, &auth, |password, totp| ApiCommand::Invite {
                name: name.clone(),
                role,
                password,
                totp,
            })? {
                Ok(v) if v["proposal"].is_object() => {
                    say_proposal(&v);
                    Ok(exit::OK)
                }
                Ok(v) => {
                    let inv = &v["invitation"];
                    coffre_sys::fs::write_atomic(
                        &out,
                        zeroize::Zeroizing::new(serde_json::to_string_pretty(inv)?).as_bytes(),
                        0o600,
                    )?;
                    eprintln!(
                        "coffre: invitation for {name} written to {} (expires at {}); hand it over privately; `coffre join {}` on their machine",
                        out.display(),
                        iso(inv["expires_ms"].as_u64().unwrap_or(0)),
                        out.display()
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
        MemberCommand::CancelInvitation { name, id, auth } => {
            match authed(&id, &auth, |password, totp| ApiCommand::InviteCancel {
                name: name.clone(),
                password,
                totp,
            })? {
                Ok(_) => {
                    eprintln!(
                        "coffre: the invitation for {name} is cancelled; its keyslot is wiped"
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
        MemberCommand::Remove { name, id, auth } => {
            match authed(&id, &auth, |password, totp| ApiCommand::MemberRemove {
                name,
                password,
                totp,
            })? {
                Ok(v) => {
                    say_proposal(&v);
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn iso(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

fn print_entries(entries: &[Value]) {
    for e in entries {
        let r = &e["record"];
        println!(
            "{:>5} {} {:<8} {:<14} {:<24} {}{}",
            e["seq"],
            iso(r["at"].as_u64().unwrap_or(0)),
            r["actor"].as_str().unwrap_or(""),
            r["action"].as_str().unwrap_or(""),
            r["result"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or(""),
            r["source"]["addr"]
                .as_str()
                .map(|a| format!(" [{a}]"))
                .unwrap_or_default()
        );
    }
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
                    "vault": vault, "since": since, "head": head, "entries": entries,
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
                    serde_json::json!({"vault": vault, "audit_head": head})
                )?;
            }
            Ok(exit::OK)
        }
    }
}

pub fn join(
    invitation: &Path,
    password_file: &Path,
    identity_out: Option<PathBuf>,
    server: Option<String>,
) -> Result<u8> {
    let text = zeroize::Zeroizing::new(
        std::fs::read(invitation).with_context(|| format!("reading {}", invitation.display()))?,
    );
    let inv: InvitationFile =
        serde_json::from_slice(&text).context("this is not an invitation file")?;
    drop(text);
    let InvitationFile {
        name,
        code,
        ca_pem,
        ca_fingerprint: pinned,
        server: named_server,
    } = inv;
    // Pin the CA the invitation names: a substituted CA is refused here.
    let found = coffre_daemon::pki::pem_fingerprint(&ca_pem).context("invitation CA is not PEM")?;
    if found != pinned {
        bail!(
            "the invitation's CA does not match its pinned fingerprint; do not use this invitation"
        );
    }
    let server = server
        .or(named_server)
        .context("invitation without a server")?;
    let out = identity_out.unwrap_or_else(|| PathBuf::from(format!("{name}.identity")));
    if out.exists() {
        bail!("{} exists; choose another --identity-out", out.display());
    }
    let password = read_password(password_file)?;
    let (csr, key_pem) = coffre_daemon::pki::new_request(&name)?;
    let cmd = ApiCommand::Join {
        name: name.clone(),
        code,
        csr,
        password,
    };
    let v = runtime()?.block_on(client::call_join(&ca_pem, &server, &cmd))?;
    if v["ok"] != true {
        return Ok(fail(
            exit::code_for_refusal(v["error"].as_str().unwrap_or("")),
            v["message"].as_str().unwrap_or("refused"),
        ));
    }
    // The audit key and head are learned here, from the reply that made
    // this machine a member, over TLS to the CA the invitation pins.
    if let Some(shown) = ShownHead::from_reply(&v) {
        let store = HeadStore::from_env()?;
        let vault = vault_key(&ca_pem).map_err(|(_, m)| anyhow::anyhow!(m))?;
        witness::assess(store.load(&vault)?.as_ref(), &shown)?;
        store.remember(&SeenHead::from_shown(&vault, &shown))?;
    }
    let identity = Identity {
        member: name.clone(),
        server,
        ca_pem,
        cert_pem: v["cert_pem"]
            .as_str()
            .context("no certificate in the reply")?
            .to_string(),
        key_pem,
    };
    identity.save(&out)?;
    println!("joined as {name} (keyslot {})", v["keyslot"]);
    println!(
        "identity file: {} (mode 0600; your private key never left this machine)",
        out.display()
    );
    println!("TOTP enrollment, shown once; add it to an authenticator app now:");
    println!("  {}", v["otpauth"].as_str().unwrap_or(""));
    if std::io::stdout().is_terminal() {
        print_qr(v["otpauth"].as_str().unwrap_or(""));
    }
    Ok(exit::OK)
}

pub fn passwd(ida: IdentityArg, auth: AuthArgs, new_password_file: &Path) -> Result<u8> {
    secrets::one_stdin(&[&auth.password_file, new_password_file])?;
    let new_password = read_password(new_password_file)?;
    match authed(&ida, &auth, |password, totp| ApiCommand::Passwd {
        password,
        new_password,
        totp,
    })? {
        Ok(_) => {
            eprintln!("coffre: password changed");
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

//! Governing the vault: lock and unlock, mode and quorum, proposals and
//! their approval, members (invitations, joining, removal, profiles,
//! passwords) and the VPN gateway's configuration.

use super::client::*;
use super::*;
use crate::cli::{
    AuthArgs, GatewayCommand, IdentityArg, MemberCommand, ModeChoice, ProposalCommand, ProtoChoice,
    RoleChoice, SshKeyCommand,
};
use crate::secrets;
use anyhow::{Context, Result, bail};
use coffre::exit;
use coffre_daemon::api::{ApiCommand, ApiSecret};
use coffre_daemon::client;
use coffre_daemon::vaultdir::{Identity, VaultDir};
use coffre_daemon::witness::{self, HeadStore, SeenHead, ShownHead};
use serde_json::Value;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
pub(super) fn say_proposal(v: &Value) {
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
        GatewayCommand::Relay {
            identity,
            bus,
            management,
        } => super::bus::relay(identity, bus, management),
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
            if let Some(r) = a.relay {
                g.relay = Some(r);
                g.via = coffre_daemon::vaultdir::GatewayVia::Bus;
            }
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
            let vpn_host = a.out.map(|o| (o, a.management));
            let r = coffre_daemon::gateway::write_openvpn_config(&vd, g, vpn_host.as_ref())?;
            println!("wrote {}", r.server_conf.display());
            if r.new_tls_crypt {
                println!(
                    "made a new tls-crypt key: members need their profile (`coffre member profile NAME`)"
                );
            } else {
                println!("kept the existing tls-crypt key: members' profiles stay valid");
            }
            match (&r.vpn_host, &r.relay) {
                (Some(out), Some(relay)) => {
                    println!(
                        "wrote what the VPN host needs to {} (keep it private: it holds keys)",
                        out.display()
                    );
                    println!(
                        "next: restart `coffre serve {}`; on the VPN host run `openvpn --cd {} --config server.conf` and `coffre gateway relay --identity {relay}.identity --management {}`",
                        a.dir.display(),
                        out.display(),
                        r.management.display()
                    );
                }
                (None, Some(relay)) => println!(
                    "next: restart `coffre serve {}`, run `openvpn --config {}`, and `coffre gateway relay --identity {relay}.identity --management {}`",
                    a.dir.display(),
                    r.server_conf.display(),
                    r.management.display()
                ),
                _ => {
                    println!(
                        "next: restart `coffre serve {}`, then run: openvpn --config {}",
                        a.dir.display(),
                        r.server_conf.display()
                    );
                    println!(
                        "the daemon talks to OpenVPN through {} (root only)",
                        r.management.display()
                    );
                }
            }
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
                        ca_pem: profile_ca(&ident.ca_pem, &s("ca_pem")),
                        chain_pem: s("chain_pem"),
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
                            "{}\t{}\tkeyslot {}\tuid {}\tgid {}\t{} ssh key(s)\tworkload password {}",
                            m["name"].as_str().unwrap_or(""),
                            m["role"].as_str().unwrap_or(""),
                            m["keyslot"],
                            m["uid"],
                            m["gid"],
                            m["ssh_keys"],
                            if m["workload_password"] == true {
                                "set"
                            } else {
                                "not set"
                            },
                        );
                        // With a [directory]: whether the organisation's
                        // directory lets this member in.
                        if let Some(standing) = m["source"].as_str() {
                            println!("\torganisation's directory: {standing}");
                        }
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
        MemberCommand::Role {
            name,
            role,
            id,
            auth,
        } => {
            let (role, word) = match role {
                RoleChoice::Member => (coffre_vault::Role::Member, "a member"),
                RoleChoice::Superuser => (coffre_vault::Role::Superuser, "a superuser"),
            };
            match authed(&id, &auth, |password, totp| ApiCommand::MemberRole {
                name: name.clone(),
                role,
                password,
                totp,
            })? {
                Ok(v) if v["proposal"].is_object() => {
                    say_proposal(&v);
                    Ok(exit::OK)
                }
                Ok(_) => {
                    eprintln!("coffre: {name} is now {word}");
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
        MemberCommand::SshKey(cmd) => ssh_key(cmd),
        MemberCommand::WorkloadPassword {
            new_password_file,
            clear,
            id,
            auth,
        } => {
            let change = match new_password_file {
                Some(f) => {
                    secrets::one_stdin(&[&auth.password_file, &f])?;
                    let p = secrets::passphrase(&f)?;
                    let verifier = coffre_api::verifier::make(p.expose())?;
                    coffre_vault::AccountChange::WorkloadPassword { verifier }
                }
                None if clear => coffre_vault::AccountChange::WorkloadPasswordClear,
                None => bail!("give --new-password-file FILE, or --clear"),
            };
            match account(&id, &auth, change)? {
                Ok(_) => {
                    eprintln!(
                        "coffre: workload password {}",
                        if clear {
                            "removed"
                        } else {
                            "set: it logs you in to the workloads you may use, while you are inside"
                        }
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
    }
}

/// A change to one's own account (password and TOTP).
fn account(
    id: &IdentityArg,
    auth: &AuthArgs,
    change: coffre_vault::AccountChange,
) -> Result<std::result::Result<serde_json::Value, (u8, String)>> {
    authed(id, auth, |password, totp| ApiCommand::Account {
        change: change.clone(),
        password,
        totp,
    })
}

/// `coffre member ssh-key ...`.
fn ssh_key(cmd: SshKeyCommand) -> Result<u8> {
    use coffre_vault::AccountChange as C;
    match cmd {
        SshKeyCommand::Add { file, id, auth } => {
            let key = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if key.contains("PRIVATE KEY") {
                bail!(
                    "{} is a private key: give the .pub file (the private key never leaves this machine)",
                    file.display()
                );
            }
            match account(&id, &auth, C::SshKeyAdd { key })? {
                Ok(v) => {
                    eprintln!(
                        "coffre: SSH key {} {}",
                        v["fingerprint"].as_str().unwrap_or("?"),
                        if v["added"] == true {
                            "added"
                        } else {
                            "was already there"
                        }
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
        SshKeyCommand::List { json, id, auth } => match account(&id, &auth, C::SshKeyList)? {
            Ok(v) => {
                if json {
                    print_json(&v["keys"])?;
                } else {
                    for k in v["keys"].as_array().into_iter().flatten() {
                        println!(
                            "{}\t{}\t{}",
                            k["fingerprint"].as_str().unwrap_or(""),
                            k["type"].as_str().unwrap_or(""),
                            k["comment"].as_str().unwrap_or("")
                        );
                    }
                }
                Ok(exit::OK)
            }
            Err((code, msg)) => Ok(fail(code, &msg)),
        },
        SshKeyCommand::Remove { key, id, auth } => {
            // A .pub file, or a fingerprint as `list` prints it.
            let key = match std::fs::read_to_string(&key) {
                Ok(text) if !key.starts_with("SHA256:") => text,
                _ => key,
            };
            match account(&id, &auth, C::SshKeyRemove { key })? {
                Ok(v) => {
                    eprintln!(
                        "coffre: SSH key {} removed",
                        v["fingerprint"].as_str().unwrap_or("?")
                    );
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
    }
}

/// The fields of an invitation file `join` uses; the code is wiped when
/// dropped.
#[derive(serde::Deserialize)]
pub(super) struct InvitationFile {
    name: String,
    code: ApiSecret,
    ca_pem: String,
    ca_fingerprint: String,
    server: Option<String>,
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
        witness::assess(store.load_id(&vault)?.as_ref(), &shown)?;
        store.remember(&SeenHead::from_shown(&vault.key, &shown))?;
    }
    let identity = Identity {
        member: name.clone(),
        server,
        ca_pem,
        cert_pem: v["cert_pem"]
            .as_str()
            .context("no certificate in the reply")?
            .to_string(),
        key_pem: zeroize::Zeroizing::new(key_pem),
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

/// `coffre renew`: a member's own certificate through the door, or the
/// door's or the gateway's on the host.
pub fn renew(
    server: Option<PathBuf>,
    gateway: Option<PathBuf>,
    ca: Option<PathBuf>,
    (new_key, finish, force): (bool, bool, bool),
    ida: IdentityArg,
    (password_file, totp, trust_ca): (Option<PathBuf>, Option<String>, Option<String>),
) -> Result<u8> {
    use coffre_daemon::renew::{self, Which};
    if let Some(dir) = ca.as_ref().filter(|_| new_key) {
        return new_ca_key(dir);
    }
    if let Some(dir) = ca.as_ref().filter(|_| finish) {
        let done = renew::finish_ca_key(&VaultDir::new(dir), force)?;
        println!(
            "the change of the CA's key is finished: the door trusts the new CA alone from the daemon's next start, OpenVPN (if the vault has a gateway) from its next start; {} certificate(s) of the previous CA revoked",
            done.revoked.len()
        );
        if !done.shut_out.is_empty() {
            println!(
                "shut out, as asked: {} (remove them and invite them again: coffre member remove NAME, coffre member invite NAME)",
                done.shut_out.join(", ")
            );
        }
        if done.list_missing {
            println!(
                "ca.previous.certs.json was missing: no certificate was revoked by its fingerprint; the previous CA's certificates get in nowhere once the door trusts the new CA alone"
            );
        }
        if !done.stranded.is_empty() {
            println!(
                "stranded, as asked: the machine of {} pins the previous CA and trusts the door no more (remove them and invite them again)",
                done.stranded.join(", ")
            );
        }
        return Ok(exit::OK);
    }
    let host = server
        .map(|d| (d, Which::Server))
        .or(gateway.map(|d| (d, Which::Gateway)))
        .or(ca.map(|d| (d, Which::Ca)));
    if let Some((dir, which)) = host {
        let r = renew::renew(&VaultDir::new(&dir), which)?;
        println!(
            "renewed {}: valid until {}, fingerprint {}",
            r.cert.display(),
            iso(u64::try_from(r.not_after).unwrap_or(0) * 1000),
            r.fingerprint
        );
        println!(
            "{}",
            match which {
                Which::Server =>
                    "the daemon serves it from its next start (under systemd: systemctl restart coffre@NAME once the vault is closed)",
                Which::Gateway =>
                    "OpenVPN serves it from its next start (restart it once nobody is connected)",
                Which::Ca =>
                    "same key and name: every certificate the vault issued chains to it, nothing is reissued and members' identity files need nothing.\n\
                     Before the old one ends, give it to what checks a CA's own dates (OpenSSL):\n\
                     - OpenVPN on this host: restart it (it reads gateway/ca.pem, rewritten);\n\
                     - OpenVPN on a VPN host behind a relay: copy the new ca.pem there, restart it;\n\
                     - members' VPN profiles: each member makes theirs anew (coffre member profile NAME);\n\
                     - the bus broker: coffre bus broker-config again, then restart it;\n\
                     - the vault directory (LDAP) sends the CA read at the daemon's start: restart the daemon once closed;\n\
                     - an NBD storage host over TLS that keeps the CA: give it the new file.\n\
                     See docs/operations.md, \"Certificates\".",
            }
        );
        return Ok(exit::OK);
    }
    let auth = AuthArgs {
        password_file: password_file.context("--password-file is needed")?,
        totp: totp
            .or_else(|| std::env::var("COFFRE_TOTP").ok())
            .context("--totp (or COFFRE_TOTP in the environment) is needed")?,
    };
    let (path, id) = load_identity(&ida)?;
    let (csr, key_pem) = coffre_daemon::pki::new_request(&id.member)?;
    let key_pem = zeroize::Zeroizing::new(key_pem);
    match account(
        &ida,
        &auth,
        coffre_vault::AccountChange::Certificate { csr },
    )? {
        Ok(v) => {
            let cert = v["cert_pem"]
                .as_str()
                .context("no certificate in the vault's reply")?;
            if !coffre_daemon::pki::cert_matches_key(cert, &key_pem) {
                bail!(
                    "the vault's reply holds a certificate for another key; {} is left as it was",
                    path.display()
                );
            }
            // The file as it is on disk (not with an --address given for
            // this run), with the new certificate and key.
            drop(id);
            let mut renewed = Identity::load(&path)?;
            renewed.cert_pem = cert.to_string();
            renewed.key_pem = key_pem.clone();
            let moved = adopt_new_ca(&mut renewed, &v, cert, trust_ca.as_deref());
            renewed.save(&path)?;
            if moved {
                report_new_pin(&renewed, &ida);
            }
            eprintln!(
                "coffre: certificate renewed, valid until {}; {} rewritten (the certificate you renewed with works until it ends or your next renewal)",
                iso(v["not_after"].as_u64().unwrap_or(0) * 1000),
                path.display()
            );
            eprintln!(
                "coffre: a VPN profile holds a copy of your certificate: make it anew (coffre member profile NAME) before your next renewal revokes the old one"
            );
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

/// The CA a VPN profile trusts: the one the vault serves if it has the key
/// of the one this identity pins (its newest dates), else the pinned one. A
/// CA of another key is trusted only once this machine pins it (`coffre
/// renew --trust-ca`): the gateway's certificate, signed by a new key,
/// reaches the pinned CA through the cross certificate it sends.
fn profile_ca(pinned: &str, served: &str) -> String {
    let key = coffre_daemon::pki::pem_key_fingerprint;
    if key(served).is_some_and(|k| key(pinned) == Some(k)) {
        served.to_string()
    } else {
        pinned.to_string()
    }
}

/// After a renewal: the CA the vault names in its reply, pinned in place
/// of `id`'s if that one certified it (the same key, or a new key through
/// the cross certificate: `pki::ca_succeeds`), with the audit head this
/// machine remembers carried over to it. Anything else keeps the CA pinned
/// here, with a warning. True if it moved to a CA with another key.
fn adopt_new_ca(id: &mut Identity, reply: &Value, cert: &str, trust: Option<&str>) -> bool {
    let Some(offered) = reply["ca_pem"].as_str().filter(|c| *c != id.ca_pem) else {
        return false;
    };
    let cross = reply["cross_pem"].as_str().unwrap_or("");
    let fp = |pem: &str| {
        coffre_daemon::pki::pem_key_fingerprint(pem)
            .map_or_else(|| "?".into(), |f| f[..16.min(f.len())].to_string())
    };
    if !coffre_daemon::pki::ca_succeeds(&id.ca_pem, offered, cross, cert) {
        eprintln!(
            "coffre: warning: the vault names another CA ({}…) than the one pinned here ({}…), which did not certify it: this machine keeps the one it pins",
            fp(offered),
            fp(&id.ca_pem)
        );
        return false;
    }
    if let (Some(old), Some(new)) = (
        witness::VaultId::of_ca(&id.ca_pem),
        witness::VaultId::of_ca(offered),
    ) && old.key != new.key
    {
        // A new key: the cross certificate proves only that the previous
        // key signed it, and the previous key may be the one that leaked
        // (whoever holds it could sit between this machine and the door).
        // So the member confirms the new key's fingerprint, given to them
        // by another channel.
        let given = trust.map(|t| t.replace(':', "").to_ascii_lowercase());
        if given.as_deref() != Some(new.key.as_str()) {
            eprintln!(
                "coffre: warning: the vault's CA has a new key ({}); this machine keeps the CA it pins until you confirm it: ask your superuser for the new CA's key fingerprint by another channel than the vault, then renew again with --trust-ca FINGERPRINT",
                new.key
            );
            return false;
        }
        let carried = HeadStore::from_env().and_then(|store| match store.load_id(&old)? {
            Some(mut seen) => {
                seen.vault = new.key;
                store.remember(&seen)
            }
            None => Ok(()),
        });
        if let Err(e) = carried {
            // Without it, the next command would take any log as at first
            // contact: keep the CA pinned here instead.
            eprintln!(
                "coffre: warning: the audit head this machine remembers could not be carried over to the vault's new CA ({e}): this machine keeps the CA it pins"
            );
            return false;
        }
        eprintln!(
            "coffre: the vault's CA has a new key ({}…, certified by the one pinned here): this machine pins it from now on",
            fp(offered)
        );
        id.ca_pem = offered.to_string();
        return true;
    }
    id.ca_pem = offered.to_string();
    false
}

/// After a move to the CA's new key: one command through it, which checks
/// that this machine reaches the door with it, and tells the vault that
/// this machine pins it (`coffre renew --ca DIR --finish` waits for that).
/// A refusal after the door took the request (a locked vault refuses a
/// member's `status`) still told it.
fn report_new_pin(id: &Identity, ida: &IdentityArg) {
    let mut id = id.clone();
    if let Some(s) = &ida.server {
        id.server = s.clone();
    }
    let told = runtime()
        .and_then(|rt| rt.block_on(call(&id, &ApiCommand::Status)))
        .map_err(|e| e.to_string())
        .and_then(|r| match r {
            Err((exit::UNREACHABLE | exit::NOT_A_MEMBER, msg)) => Err(msg),
            _ => Ok(()),
        });
    match told {
        Ok(()) => eprintln!("coffre: the vault knows this machine pins its new CA"),
        Err(msg) => eprintln!(
            "coffre: warning: the vault could not be told this machine pins its new CA ({msg}): run coffre status once it can be reached, before your superuser finishes the change"
        ),
    }
}

/// `coffre renew --ca DIR --new-key`.
fn new_ca_key(dir: &Path) -> Result<u8> {
    let vd = VaultDir::new(dir);
    let r = coffre_daemon::renew::new_ca_key(&vd);
    // What this machine remembers of the vault's audit log is filed under
    // its CA's key (`coffre audit verify --dir`): carried over to the new
    // one, or the next check would be a first contact and take any log.
    // After any run that finds the key changed (a refused re-run too),
    // and at worst with a warning: the change itself is made.
    if let Err(e) = carry_seen_head(&vd) {
        eprintln!(
            "coffre: warning: the audit head this machine remembers was not carried over to the new CA key ({e}); the next `coffre audit verify --dir` will trust the log as at first contact"
        );
    }
    let done = r?;
    if done.resumed {
        println!("an interrupted change of the CA's key was finished");
    }
    println!(
        "the CA has a new key: {} (certificate fingerprint {}), valid until {}",
        dir.join("ca.pem").display(),
        done.fingerprint,
        iso(u64::try_from(done.not_after).unwrap_or(0) * 1000)
    );
    println!(
        "the new CA's key fingerprint, for members to confirm when they renew (coffre renew ... --trust-ca FINGERPRINT); give it to them by another channel than the vault:\n  {}",
        coffre_daemon::pki::pem_key_fingerprint(&done.ca_pem).unwrap_or_default()
    );
    if done.gateway {
        println!(
            "OpenVPN: restart it (it keeps trusting the previous CA alone, gateway/ca.pem, and sends the cross certificate after its new certificate); members who renewed make their VPN profile anew (coffre member profile NAME), whose certificate is followed by the cross certificate"
        );
    }
    println!(
        "the door keeps trusting what the previous CA signed, and sends the cross certificate with its own (new) certificate, until {}:\n\
         - start the daemon again (systemctl start coffre@NAME);\n\
         - members' identity files pin the previous CA and keep working unchanged; certificates signed from now on (renewals, joins) are the new key's, and invitations carry the new CA;\n\
         - ask every member to renew with the fingerprint above (coffre renew ... --trust-ca FINGERPRINT): their machine then moves to the new CA; until it does, whoever holds the previous key can still pose as the door to it (not as a member);\n\
         - workloads that keep a copy of the CA (LDAP clients of the vault's directory) need the new ca.pem.\n\
         See docs/operations.md, \"A new CA key\".",
        iso(u64::try_from(done.cross_not_after).unwrap_or(0) * 1000)
    );
    Ok(exit::OK)
}

/// Files the audit head remembered under the previous CA's key under the
/// new one too, if the vault's key was changed.
fn carry_seen_head(vd: &VaultDir) -> Result<()> {
    let Some(previous) = coffre_daemon::renew::key_changed(vd)? else {
        return Ok(());
    };
    let now = vd.read(&vd.ca_cert())?;
    let (Some(old), Some(new)) = (
        witness::VaultId::of_ca(&previous),
        witness::VaultId::of_ca(&now),
    ) else {
        return Ok(());
    };
    let store = HeadStore::from_env()?;
    if let Some(mut seen) = store.load_id(&old)? {
        seen.vault = new.key;
        store.remember(&seen)?;
    }
    Ok(())
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

//! The vault's directory for its workloads: the LDAP server's process
//! (`coffre ldap-server`, in `coffre-ldap`), which the daemon starts on
//! the vault network's host address (389 with StartTLS, 636 LDAPS) and
//! keeps current: the members' accounts and groups, which workload (by
//! its address) sees whom, who has a live session and whether the vault
//! is locked. It runs whether the vault is open or closed (nothing in it
//! decrypts anything), as a user of its own (`services`: of no account,
//! its own limits), with no volume key and no CA key:
//! only the key of its own certificate, issued by the daemon from the
//! vault's CA for the host address (never the door's name).
//!
//! A workload password bind is checked there (argon2id, one at a time);
//! the daemon drains its bind events each tick into the audit log, one
//! record per (workload, outcome) a minute at most, the rest counted,
//! after checking what the server says (it parses guests' bytes: it may
//! lie).

use super::*;
use coffre_ldap::{Client, DirectorySpec, Group, Live, User};
use coffre_vault::accounts::{SUPERUSERS_GROUP, TEAM_GROUP, workload_group};
use helper::Helper;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// At most one audit record a minute per (workload, outcome): the rest
/// are counted.
const BIND_AUDIT_EVERY_MS: u64 = 60_000;

/// What a bind event's outcome may be (`coffre_ldap::Outcome`).
const BIND_OUTCOMES: [&str; 8] = [
    "ok",
    "wrong_password",
    "not_permitted",
    "no_session",
    "locked",
    "no_password",
    "throttled",
    "busy",
];

/// The LDAP server's process and what it was last told.
pub(super) struct LdapChild {
    helper: Helper,
    /// Its certificate chain and key (PEM), to give it again at a restart.
    tls: (String, zeroize::Zeroizing<String>),
    spec: Option<DirectorySpec>,
    live: Option<Live>,
    /// The address it serves on.
    pub(super) addr: Ipv4Addr,
    /// The uid it runs as.
    pub(super) uid: u32,
    /// Bind records waiting: (workload, outcome, member named or "")
    /// → (last written, counted since). By member: a bind as one member
    /// must not hide the next minute's binds as another (a guess at a
    /// password behind a decoy). Bounded: the members each workload sees.
    binds: BTreeMap<(String, String, String), (u64, u64)>,
    /// Events lost or not believed since the last record of them, and
    /// when that record was written.
    dropped: u64,
    dropped_written: u64,
    /// Its counters, as of the last tick.
    stats: Value,
}

impl LdapChild {
    /// Binds 389 and 636 on `addr` and issues the server's certificate
    /// for that address from the vault's CA.
    pub(super) fn bind(
        addr: Ipv4Addr,
        vault: &str,
        ca_key_pem: &str,
        ca_pem: &str,
        log: PathBuf,
        user: (u32, u32),
    ) -> Result<Self, String> {
        let mut sockets = Vec::new();
        for port in [389, 636] {
            let l = coffre_ldap::server::bind_listener((addr, port).into())
                .map_err(|e| format!("binding LDAP on {addr}:{port}: {e}"))?;
            sockets.push(std::os::fd::OwnedFd::from(l));
        }
        let issued =
            crate::pki::new_directory_cert(vault, ca_key_pem, addr).map_err(|e| e.to_string())?;
        let chain = format!("{}{}", issued.cert_pem, ca_pem);
        let args = vec![
            "ldap-server".to_string(),
            "--uid".to_string(),
            user.0.to_string(),
            "--gid".to_string(),
            user.1.to_string(),
        ];
        Ok(Self {
            helper: Helper::new("the LDAP server", args, sockets, log),
            tls: (chain, issued.key_pem),
            spec: None,
            live: None,
            addr,
            uid: user.0,
            binds: BTreeMap::new(),
            dropped: 0,
            dropped_written: 0,
            stats: Value::Null,
        })
    }

    /// Starts the process and tells it everything it was told before.
    fn start(&mut self) -> Result<u32, String> {
        let pid = self.helper.spawn()?;
        // The key goes from its own buffer into the line's, measured first
        // so that the line never grows (a grown buffer leaves a copy
        // behind), and no copy of it is made on the way (a `json!` value
        // would be one).
        #[derive(serde::Serialize)]
        struct Tls<'a> {
            cmd: &'static str,
            chain_pem: &'a str,
            key_pem: &'a str,
        }
        /// Counts what is written to it.
        struct Measure(usize);
        impl std::io::Write for Measure {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let tls = Tls {
            cmd: "tls",
            chain_pem: &self.tls.0,
            key_pem: self.tls.1.as_str(),
        };
        let mut size = Measure(0);
        serde_json::to_writer(&mut size, &tls).map_err(|e| e.to_string())?;
        let mut line = zeroize::Zeroizing::new(Vec::with_capacity(size.0 + 1));
        let room = line.capacity();
        serde_json::to_writer(&mut *line, &tls).map_err(|e| e.to_string())?;
        line.push(b'\n');
        if line.capacity() != room {
            return Err("the TLS key's line grew (a copy may be left)".into());
        }
        self.helper.command_line(&line)?;
        if let Some(spec) = self.spec.clone() {
            self.helper
                .command(&json!({"cmd": "directory", "spec": spec}))?;
        }
        if let Some(live) = self.live.clone() {
            self.helper.command(&json!({"cmd": "live", "live": live}))?;
        }
        Ok(pid)
    }

    /// A new directory: sent if it changed. Returns the users it refused.
    fn set_spec(&mut self, spec: DirectorySpec) -> Result<Vec<String>, String> {
        if self.spec.as_ref() == Some(&spec) {
            return Ok(Vec::new());
        }
        self.spec = Some(spec.clone());
        if !self.helper.running() {
            return Ok(Vec::new());
        }
        let v = self
            .helper
            .command(&json!({"cmd": "directory", "spec": spec}))?;
        Ok(helper::failures(&v))
    }

    /// Kills the process (the daemon stops).
    pub(super) fn stop(&mut self) {
        self.helper.stop();
    }

    /// Who is inside and whether the vault is locked: sent if it changed.
    fn set_live(&mut self, live: Live) -> Result<(), String> {
        if self.live.as_ref() == Some(&live) {
            return Ok(());
        }
        self.live = Some(live.clone());
        if !self.helper.running() {
            return Ok(());
        }
        self.helper
            .command(&json!({"cmd": "live", "live": live}))
            .map(drop)
    }
}

/// The base DN of a vault's directory: `dc=NAME,dc=coffre`, NAME the
/// vault's name in lower case with anything but letters, digits and `-`
/// made a `-`.
pub(crate) fn base_dn(vault: &str) -> String {
    let mut n: String = vault
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    n = n.trim_matches('-').to_string();
    if n.is_empty() {
        n = "vault".into();
    }
    format!("dc={n},dc=coffre")
}

impl Shell {
    /// The directory as the LDAP server serves it: every current
    /// member's account and groups, and which workload (by address) sees
    /// whom: the members it admits, their private groups, the team's,
    /// the superusers' and its own.
    pub(super) fn directory_spec(&self) -> DirectorySpec {
        let a = &self.control.accounts;
        let acc = &self.config.accounts;
        let members = self.vault.members();
        let mut users = Vec::new();
        let mut groups = Vec::new();
        for name in members.keys() {
            let Some(u) = a.users.get(name) else { continue };
            users.push(User {
                name: name.clone(),
                uid: u.uid,
                gid: u.gid,
                gecos: name.clone(),
                home: format!("{}/{name}", acc.home.trim_end_matches('/')),
                shell: acc.shell.clone(),
                ssh_keys: u.ssh_keys.clone(),
                verifier: u.workload_password.clone(),
            });
            groups.push(Group {
                name: name.clone(),
                gid: u.gid,
                members: vec![name.clone()],
            });
        }
        let named = |g: &str, who: &[&String]| {
            a.groups.get(g).map(|gid| Group {
                name: g.to_string(),
                gid: *gid,
                members: who.iter().map(|n| (*n).clone()).collect(),
            })
        };
        let all: Vec<&String> = members
            .keys()
            .filter(|n| a.users.contains_key(*n))
            .collect();
        let supers: Vec<&String> = all
            .iter()
            .copied()
            .filter(|n| members[*n].role == Role::Superuser)
            .collect();
        groups.extend(named(TEAM_GROUP, &all));
        groups.extend(named(SUPERUSERS_GROUP, &supers));
        let mut clients = Vec::new();
        for w in &self.config.workload {
            let admitted: Vec<&String> = all
                .iter()
                .copied()
                .filter(|n| w.admits(n, members[*n].role == Role::Superuser))
                .collect();
            groups.extend(named(&workload_group(&w.name), &admitted));
            let Some(addr) = w.address else { continue };
            let mut seen: Vec<String> = admitted.iter().map(|n| (*n).clone()).collect();
            seen.extend([
                TEAM_GROUP.to_string(),
                SUPERUSERS_GROUP.to_string(),
                workload_group(&w.name),
            ]);
            clients.push(Client {
                address: addr.into(),
                workload: w.name.clone(),
                users: admitted.iter().map(|n| (*n).clone()).collect(),
                groups: seen,
            });
        }
        DirectorySpec {
            base: base_dn(&self.config.name),
            users,
            groups,
            clients,
        }
    }

    /// Who has a live session, and whether the vault is locked.
    fn directory_live(&self) -> Live {
        let mut present: Vec<String> = self.vault.sessions().map(|s| s.member.clone()).collect();
        present.sort_unstable();
        present.dedup();
        Live {
            locked: self.vault.is_locked(),
            present,
        }
    }

    fn ldap(&mut self) -> Option<&mut LdapChild> {
        self.net.as_mut()?.ldap.as_mut()
    }

    /// At start: the directory, then the process.
    pub(super) fn directory_start(&mut self) {
        let spec = self.directory_spec();
        let live = self.directory_live();
        let Some(l) = self.ldap() else { return };
        let _ = l.set_spec(spec);
        let _ = l.set_live(live);
        let (addr, uid) = (l.addr, l.uid);
        let r = l.start();
        match r {
            Ok(pid) => self.system_audit(
                "directory",
                "started",
                format!(
                    "LDAP server (pid {pid}, uid {uid}: its own, of no account; limited to {} processes, {} MiB of data and {} files; no volume key, no CA key) serves the vault's directory on {addr}:389 (StartTLS) and {addr}:636 (LDAPS) to the workloads",
                    coffre_ldap::control::LIMITS.processes,
                    coffre_ldap::control::LIMITS.data_bytes >> 20,
                    coffre_ldap::control::LIMITS.open_files
                ),
            ),
            Err(e) => self.system_audit("directory", "failed", e),
        }
    }

    /// After every change: the server gets what changed at once (a
    /// removal, a lock, a session that ended).
    pub(super) fn directory_sync(&mut self) {
        if self.net.as_ref().is_none_or(|n| n.ldap.is_none()) {
            return;
        }
        let spec = self.directory_spec();
        let live = self.directory_live();
        let Some(l) = self.ldap() else { return };
        let failed = l.set_spec(spec);
        let live = l.set_live(live);
        match failed {
            Ok(f) => {
                for f in f {
                    self.system_audit("directory", "refused", f);
                }
            }
            Err(e) => self.system_audit("directory", "failed", e),
        }
        if let Err(e) = live {
            self.system_audit("directory", "failed", e);
        }
    }

    /// Each tick: a server that died is started again; its bind events
    /// go to the audit log.
    pub(super) fn directory_tick(&mut self) {
        let Some(l) = self.ldap() else { return };
        if let Some(why) = l.helper.died() {
            let log = l.helper.log.display().to_string();
            self.system_audit(
                "directory",
                "failed",
                format!("the LDAP server ended ({why}); see {log}"),
            );
            return;
        }
        if l.helper.due() {
            self.directory_start();
            return;
        }
        // On the actor each tick: a server that does not answer within
        // 2 s is killed (and started again), never waited for longer.
        let Ok(v) = l
            .helper
            .command_within(&json!({"cmd": "events"}), std::time::Duration::from_secs(2))
        else {
            return;
        };
        l.stats = helper::counters(
            &v["stats"],
            &["connections", "refused_addresses", "searches", "binds"],
        );
        let now = now_ms().0;
        // What the server says is checked before it is written: it parses
        // guests' bytes, so it may lie. A workload that is configured, an
        // outcome it can have, a member that workload may see (else no
        // name at all).
        let members = self.vault.members().clone();
        let config = &self.config;
        let known = |w: &str| {
            config
                .workload
                .iter()
                .find(|c| c.name == w && c.address.is_some())
        };
        let Some(l) = self.net.as_mut().and_then(|n| n.ldap.as_mut()) else {
            return;
        };
        let mut records = Vec::new();
        let mut ignored = 0u64;
        for ev in v["events"].as_array().into_iter().flatten() {
            let s = |k: &str| ev[k].as_str().unwrap_or("").to_string();
            let (workload, outcome) = (s("workload"), s("outcome"));
            let Some(w) = known(&workload) else {
                ignored += 1;
                continue;
            };
            if !BIND_OUTCOMES.contains(&outcome.as_str()) {
                ignored += 1;
                continue;
            }
            let user = s("user");
            let seen = members
                .get(&user)
                .is_some_and(|m| w.admits(&user, m.role == Role::Superuser));
            let user = if seen { user } else { String::new() };
            if outcome == "ok" && user.is_empty() {
                ignored += 1;
                continue;
            }
            // One record a minute per (workload, outcome, member); the rest
            // counted.
            let entry = l
                .binds
                .entry((workload.clone(), outcome.clone(), user.clone()))
                .or_insert((0, 0));
            if entry.0 == 0 || now >= entry.0 + BIND_AUDIT_EVERY_MS {
                entry.0 = now;
                records.push((workload, outcome, user, 1));
            } else {
                entry.1 += 1;
            }
        }
        l.dropped = l
            .dropped
            .saturating_add(v["dropped"].as_u64().unwrap_or(0))
            .saturating_add(ignored);
        let mut stale = Vec::new();
        for ((workload, outcome, user), (last, counted)) in &mut l.binds {
            if now >= *last + BIND_AUDIT_EVERY_MS {
                if *counted > 0 {
                    records.push((workload.clone(), outcome.clone(), user.clone(), *counted));
                    *counted = 0;
                    *last = now;
                } else {
                    stale.push((workload.clone(), outcome.clone(), user.clone()));
                }
            }
        }
        for k in stale {
            l.binds.remove(&k);
        }
        let dropped = if l.dropped > 0 && now >= l.dropped_written + BIND_AUDIT_EVERY_MS {
            l.dropped_written = now;
            std::mem::take(&mut l.dropped)
        } else {
            0
        };
        for (workload, outcome, user, n) in records {
            let who = if user.is_empty() {
                "an entry this workload does not see".to_string()
            } else {
                user
            };
            let detail = if n == 1 {
                format!("workload password bind as {who} from workload {workload}: {outcome}")
            } else {
                format!(
                    "{n} more workload password bind(s) as {who} from workload {workload}: {outcome}, counted rather than logged one by one"
                )
            };
            self.record(AuditRecord {
                at: Millis(now),
                actor: "coffre".into(),
                source: None,
                action: "directory_bind".into(),
                result: outcome,
                detail,
            });
        }
        if dropped > 0 {
            self.system_audit(
                "directory_bind",
                "counted",
                format!("{dropped} bind event(s) lost or not believed in the last minute (a flood, or a server saying what it cannot): not logged one by one"),
            );
        }
    }

    /// For status: the server's pid and address.
    pub(super) fn directory_json(&self) -> Value {
        let Some(l) = self.net.as_ref().and_then(|n| n.ldap.as_ref()) else {
            return Value::Null;
        };
        json!({
            "pid": l.helper.pid(),
            "address": l.addr.to_string(),
            "base": base_dn(&self.config.name),
            "ldaps": format!("ldaps://{}/", l.addr),
            "stats": l.stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::base_dn;

    #[test]
    fn base_dns_come_from_the_vault_name() {
        assert_eq!(base_dn("team"), "dc=team,dc=coffre");
        assert_eq!(base_dn("My Vault.2"), "dc=my-vault-2,dc=coffre");
        assert_eq!(base_dn("+,="), "dc=vault,dc=coffre");
    }
}

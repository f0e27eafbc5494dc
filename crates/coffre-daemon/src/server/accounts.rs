//! The members' numbers on the host and in the workloads: given by the
//! vault from `[accounts]`'s range (`coffre_vault::accounts`), checked
//! against the host's own ranges at start, imported once from an older
//! vault's `[data.members]`, kept in the control data. They own
//! `home/NAME` and `shared/`, and a workload's `user = "alice"` (or
//! `share_user`) means the member's numbers.

use super::*;
use coffre_vault::accounts::{Accounts, Range, SUPERUSERS_GROUP, TEAM_GROUP, workload_group};
use std::collections::BTreeMap;

/// A member's numbers as processes get them: (uid, gid, groups).
pub(crate) type Ids = (u32, u32, Vec<u32>);

/// Ranges the host keeps for itself, from `login.defs`, `/etc/subuid`
/// and `/etc/subgid` texts: (what, range).
pub(crate) fn host_ranges(login_defs: &str, subuid: &str, subgid: &str) -> Vec<(String, Range)> {
    let mut defs = BTreeMap::new();
    for line in login_defs.lines() {
        let mut words = line.split_whitespace();
        if let (Some(k), Some(v)) = (words.next(), words.next())
            && !k.starts_with('#')
            && let Ok(v) = v.parse::<u32>()
        {
            defs.insert(k.to_string(), v);
        }
    }
    let get = |k: &str, d: u32| defs.get(k).copied().unwrap_or(d);
    let mut out = Vec::new();
    for (kind, min, max, sys_min, sys_max) in [
        ("UID", "UID_MIN", "UID_MAX", "SYS_UID_MIN", "SYS_UID_MAX"),
        ("GID", "GID_MIN", "GID_MAX", "SYS_GID_MIN", "SYS_GID_MAX"),
    ] {
        let first = get(min, 1000);
        out.push((
            format!("the host's ordinary accounts ({kind} {min}-{max} in /etc/login.defs)"),
            Range {
                first,
                last: get(max, 60000),
            },
        ));
        out.push((
            format!("the host's system accounts ({sys_min}-{sys_max})"),
            Range {
                first: get(sys_min, 101),
                last: get(sys_max, first.saturating_sub(1)),
            },
        ));
    }
    for (file, text) in [("/etc/subuid", subuid), ("/etc/subgid", subgid)] {
        for line in text.lines() {
            let f: Vec<&str> = line.trim().split(':').collect();
            if let [who, start, count] = f[..]
                && let (Ok(start), Ok(count)) = (start.parse::<u32>(), count.parse::<u32>())
                && count > 0
            {
                out.push((
                    format!("{who}'s subordinate ids in {file}"),
                    Range {
                        first: start,
                        last: start.saturating_add(count - 1),
                    },
                ));
            }
        }
    }
    out
}

/// Group ids in `/etc/group`'s text.
fn group_ids(text: &str) -> std::collections::BTreeSet<u32> {
    text.lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// Whether the host has a user or a group with this id (NSS for users,
/// `/etc/group` for groups).
/// `/etc/group` is read at the first question, not before: most
/// reconciliations give no number and ask none.
pub(crate) fn host_uses() -> impl Fn(u32) -> bool {
    let groups = std::cell::OnceCell::new();
    move |id| {
        groups
            .get_or_init(|| group_ids(&std::fs::read_to_string("/etc/group").unwrap_or_default()))
            .contains(&id)
            || matches!(coffre_sys::child::user_by_uid(id), Ok(Some(_)))
    }
}

/// At start, before anything is served: checks the range against the
/// host's, imports an older vault's `[data.members]` once (and refuses
/// it after), gives numbers to members and groups that have none, and
/// refuses a workload user that is both a member and a host account.
/// Returns what it did, for the audit log.
pub(super) fn prepare(
    config: &Config,
    control: &mut Control,
    now_ms: u64,
) -> Result<Vec<String>, String> {
    let range = config.accounts.range();
    range.check().map_err(|e| format!("[accounts]: {e}"))?;
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    for (what, r) in host_ranges(
        &read("/etc/login.defs"),
        &read("/etc/subuid"),
        &read("/etc/subgid"),
    ) {
        if range.overlaps(&r) {
            return Err(format!(
                "[accounts] ids {range} overlap {what} ({r}): choose first_id and last_id outside it"
            ));
        }
    }
    let mut notes = Vec::new();
    let old = &config.data;
    let legacy = !old.members.is_empty() || old.team_gid != 0;
    let a = &mut control.accounts;
    if legacy {
        if let Some(at) = a.imported_at_ms {
            return Err(format!(
                "config.toml still has [data.members] or [data] team_gid, which were imported into the vault's accounts (at {at} ms since the epoch): the vault gives and keeps the numbers now, and two sources would disagree. Remove them from config.toml (`coffre member list` shows the numbers kept)"
            ));
        }
        if !a.users.is_empty() {
            return Err(
                "config.toml has [data.members] or [data] team_gid, but the vault already gives its own numbers: remove them from config.toml (`coffre member list` shows the numbers)"
                    .into(),
            );
        }
        let members: BTreeMap<String, (u32, u32)> = old
            .members
            .iter()
            .map(|(n, ids)| (n.clone(), (ids.uid, ids.gid)))
            .collect();
        // Served to every workload from now on: no root, no number twice.
        let mut uids = std::collections::BTreeSet::new();
        for (n, (uid, gid)) in &members {
            if *uid == 0 || *gid == 0 {
                return Err(format!(
                    "[data.members.{n}] has uid or gid 0 (root's): it cannot be imported as a member's number; give another"
                ));
            }
            if !uids.insert(*uid) {
                return Err(format!(
                    "[data.members] gives uid {uid} to two names ({n} is the second): each member needs a number of their own"
                ));
            }
            if *uid < 1000 {
                notes.push(format!(
                    "warning: [data.members.{n}] uid {uid} is in the host's system range; imported as it is"
                ));
            }
        }
        let current = &control.vault.members;
        a.import(&members, &|n| current.contains_key(n), old.team_gid, now_ms);
        notes.push(format!(
            "imported {} member number(s) and team gid {} from [data.members]; kept as they were (no chown). Remove [data.members] and team_gid from config.toml: the next start refuses them",
            members.len(),
            old.team_gid
        ));
    }
    let uses = host_uses();
    notes.extend(
        reconcile(a, &control.vault.members, config, &uses, &|_| None)
            .map_err(|e| e.to_string())?,
    );
    for (what, id) in a.clashes(&uses) {
        notes.push(format!(
            "warning: {what}'s id {id} is also used by the host (made after the vault gave it): files show the host's name for it"
        ));
    }
    // A workload user named like a member is that member; if the host
    // also has that name, which one was meant cannot be told.
    for w in &config.workload {
        for name in [&w.user, &w.share_user].into_iter().flatten() {
            if a.users.contains_key(name) && matches!(coffre_sys::child::user(name), Ok(Some(_))) {
                return Err(format!(
                    "workload {}: {name:?} is both a member of the vault and an account on this host: rename the host account, or give a numeric uid",
                    w.name
                ));
            }
        }
    }
    Ok(notes)
}

/// Numbers for members and groups that have none; removed members'
/// accounts retired (their numbers are never given again). Returns one
/// line per change.
pub(super) fn reconcile(
    a: &mut Accounts,
    members: &BTreeMap<String, Member>,
    config: &Config,
    host_uses: &dyn Fn(u32) -> bool,
    from_directory: &dyn Fn(&str) -> Option<(u32, u32)>,
) -> Result<Vec<String>, coffre_vault::accounts::AccountError> {
    let range = config.accounts.range();
    let mut done = Vec::new();
    // Superusers first: `init`'s first superuser gets the first number.
    let mut order: Vec<&Member> = members.values().collect();
    order.sort_by_key(|m| (m.role != Role::Superuser, m.keyslot));
    for m in order {
        if a.users.contains_key(&m.name) {
            continue;
        }
        // With ids = "directory", a member who joined brings the numbers
        // the directory gave them (checked at join).
        if let Some((uid, gid)) = from_directory(&m.name)
            && a.refuse_directory_ids(&m.name, uid, gid, range, host_uses)
                .is_none()
        {
            a.adopt(&m.name, uid, gid);
            done.push(format!(
                "{} gets the directory's uid {uid} and gid {gid}",
                m.name
            ));
            continue;
        }
        let uid = a.ensure_user(&m.name, range, host_uses)?.uid;
        done.push(format!("{} gets uid {uid} (and group {uid})", m.name));
    }
    let gone: Vec<String> = a
        .users
        .keys()
        .filter(|n| !members.contains_key(*n))
        .cloned()
        .collect();
    for n in gone {
        if let Some(acc) = a.retire(&n) {
            done.push(format!("{n}'s uid {} retired: never given again", acc.uid));
        }
    }
    let mut groups = vec![TEAM_GROUP.to_string(), SUPERUSERS_GROUP.to_string()];
    groups.extend(config.workload.iter().map(|w| workload_group(&w.name)));
    for g in groups {
        if !a.groups.contains_key(&g) {
            let gid = a.ensure_group(&g, range, host_uses)?;
            done.push(format!("group {g} gets gid {gid}"));
        }
    }
    Ok(done)
}

/// The groups `name` is in: their own, the team's, the superusers' (if
/// one), and each workload's they may use.
pub(crate) fn member_groups(
    a: &Accounts,
    config: &Config,
    name: &str,
    superuser: bool,
) -> Vec<u32> {
    let mut out = Vec::new();
    if let Some(acc) = a.users.get(name) {
        out.push(acc.gid);
    }
    out.extend(a.groups.get(TEAM_GROUP));
    if superuser {
        out.extend(a.groups.get(SUPERUSERS_GROUP));
    }
    for w in &config.workload {
        if w.admits(name, superuser) {
            out.extend(a.groups.get(&workload_group(&w.name)));
        }
    }
    out.dedup();
    out
}

impl Shell {
    /// Every 10 s (and at the first tick): the vault's own certificates
    /// on the host, against what the control data remembers. A renewal
    /// made beside the daemon (`coffre renew --ca|--server|--gateway`) is
    /// audited here, as `certificate_renew` by `coffre`; the first sight
    /// of a file (a new vault, a gateway just made) only records it.
    pub(super) fn host_certificates_tick(&mut self) {
        let now = now_ms().0;
        if now < self.host_certs_next_ms {
            return;
        }
        self.host_certs_next_ms = now + 10_000;
        let mut changed = false;
        // What a command did on the host while the daemon was stopped.
        // The record is dated now; when it was done is in its detail.
        for note in std::mem::take(&mut self.control.host_notes) {
            let detail = format!(
                "{} (done on the host at {} Unix ms, the daemon stopped)",
                note.detail, note.at
            );
            self.system_audit(&note.action, "ok", detail);
            changed = true;
        }
        for (file, what) in [
            ("ca.pem", "the CA's"),
            ("server.pem", "the door's"),
            ("gateway/server.pem", "the VPN gateway's"),
        ] {
            let Ok(bytes) = coffre_sys::fs::read_small(&self.dir.root.join(file), 1 << 20) else {
                continue;
            };
            let pem = String::from_utf8_lossy(&bytes);
            let Some(fp) = crate::pki::pem_fingerprint(&pem) else {
                continue;
            };
            let seen = self.control.host_certificates.get(file).cloned();
            if seen.as_deref() == Some(fp.as_str()) {
                continue;
            }
            if let Some(old) = seen {
                let not_after = crate::pki::pem_not_after(&pem).map_or(0, |(t, _)| t);
                // The CA's certificate it replaced kept as the previous
                // CA: a change of key, not a renewal for the same one.
                let new_key = file == "ca.pem"
                    && self
                        .dir
                        .read_if_present(&self.dir.ca_previous_cert())
                        .ok()
                        .flatten()
                        .and_then(|p| crate::pki::pem_fingerprint(&p))
                        .is_some_and(|p| p == old);
                let how = if new_key {
                    "was given a new key on the host (coffre renew --ca --new-key)"
                } else {
                    "was renewed on the host"
                };
                self.system_audit(
                    "certificate_renew",
                    "ok",
                    format!(
                        "{what} certificate ({file}) {how}: now {} valid until {not_after} (Unix s), was {}",
                        &fp[..16],
                        &old[..old.len().min(16)]
                    ),
                );
            }
            self.control.host_certificates.insert(file.to_string(), fp);
            changed = true;
        }
        if changed {
            self.persist();
        }
    }

    /// Every current member's numbers, for workloads' `user` and the
    /// NFS server's `share_user`.
    pub(super) fn member_ids(&self) -> BTreeMap<String, Ids> {
        let a = &self.control.accounts;
        self.vault
            .members()
            .values()
            .filter_map(|m| {
                let acc = a.users.get(&m.name)?;
                let su = m.role == Role::Superuser;
                Some((
                    m.name.clone(),
                    (
                        acc.uid,
                        acc.gid,
                        member_groups(a, &self.config, &m.name, su),
                    ),
                ))
            })
            .collect()
    }

    /// Gives numbers to new members and retires removed ones; tells the
    /// workloads and the NFS server when something changed.
    pub(super) fn reconcile_accounts(&mut self) {
        let uses = host_uses();
        let members = self.vault.members().clone();
        let numbers = self
            .source
            .as_ref()
            .map(|s| s.numbers.clone())
            .unwrap_or_default();
        let from_directory = |name: &str| numbers.get(name).copied();
        let result = reconcile(
            &mut self.control.accounts,
            &members,
            &self.config,
            &uses,
            &from_directory,
        );
        if let Some(src) = self.source.as_mut() {
            src.numbers
                .retain(|n, _| !self.control.accounts.users.contains_key(n));
        }
        match result {
            Ok(done) => {
                for d in done {
                    self.system_audit("accounts", "ok", d);
                }
            }
            Err(e) => self.system_audit("accounts", "failed", e.to_string()),
        }
        // Numbers given or retired, or a role changed (a superuser's
        // groups are not a member's).
        self.accounts_changed();
    }

    /// What follows a change of accounts or roles: workloads resolve
    /// members' names with the new numbers and groups (told only when
    /// they changed).
    pub(super) fn accounts_changed(&mut self) {
        let ids = self.member_ids();
        if self.workloads.members.as_ref() == Some(&ids) {
            return;
        }
        // Never waited for on the actor: a close holds the workloads for
        // as long as it takes (a lock and its deadline must not wait
        // behind it). Tried again at the next tick.
        let mut g = match self.workloads.set.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        g.set_members(ids.clone());
        drop(g);
        self.workloads.members = Some(ids);
    }
}

/// Names of accounts guest images and hosts commonly have: a member so
/// named would be that account in a workload (sshd asks the directory
/// for the keys of whatever local user is logging in).
const RESERVED_NAMES: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "nogroup",
    "sshd",
    "messagebus",
    "syslog",
    "admin",
    "administrator",
    "ubuntu",
    "debian",
    "ec2-user",
    "cloud-user",
    "centos",
    "fedora",
    "core",
    "alpine",
    "arch",
    "opc",
    "azureuser",
    "pi",
    "vagrant",
    "git",
    "postgres",
    "mysql",
    "redis",
    "nslcd",
    "openldap",
    "coffre-vm",
];

/// Why a new member may not be called `name`: an account guests or this
/// host have (a member is served to workloads under that name, and a
/// workload's `user` naming them means the member).
pub(crate) fn name_taken(name: &str) -> Option<String> {
    if RESERVED_NAMES.contains(&name) || name.starts_with("systemd-") {
        return Some(format!(
            "{name:?} is an account that guest systems or hosts have: as a member name it would be that account in workloads; choose another name"
        ));
    }
    if matches!(coffre_sys::child::user(name), Ok(Some(_))) {
        return Some(format!(
            "{name:?} is an account on the vault's host: a workload `user = \"{name}\"` could no longer be told from the member; choose another name"
        ));
    }
    None
}

/// At most this many SSH keys per member.
const MAX_SSH_KEYS: usize = 32;

pub(crate) use coffre_ldap::spec::check_ssh_key;

/// The least a workload password verifier must cost: OWASP's argon2id
/// minimum (19 MiB, 2 passes).
const VERIFIER_MIN_MEMORY_KIB: u32 = 19 * 1024;
const VERIFIER_MIN_PASSES: u32 = 2;
/// The most: twice what `coffre member workload-password` makes (64 MiB,
/// 3 passes, 1 lane), well under what the directory's pool would take,
/// so that one member's verifier cannot make every check slow for the
/// others (checks run one at a time).
const VERIFIER_MAX_MEMORY_KIB: u32 = 128 * 1024;
const VERIFIER_MAX_PASSES: u32 = 6;
const VERIFIER_MAX_LANES: u32 = 4;

/// A workload password verifier, checked: one the directory accepts
/// (argon2id PHC string, costs at most its bounds) that costs at least
/// the minimum. Returns its costs for the audit log.
pub(crate) fn check_verifier(phc: &str) -> Result<String, String> {
    let (m, t, p) = coffre_ldap::spec::verifier_costs(phc)
        .map_err(|e| format!("the workload password's verifier: {e}"))?;
    if m < VERIFIER_MIN_MEMORY_KIB || t < VERIFIER_MIN_PASSES {
        return Err(format!(
            "the workload password's verifier: costs m={m} t={t} below m={VERIFIER_MIN_MEMORY_KIB} t={VERIFIER_MIN_PASSES}"
        ));
    }
    if m > VERIFIER_MAX_MEMORY_KIB || t > VERIFIER_MAX_PASSES || p > VERIFIER_MAX_LANES {
        return Err(format!(
            "the workload password's verifier: costs m={m} t={t} p={p} above m={VERIFIER_MAX_MEMORY_KIB} t={VERIFIER_MAX_PASSES} p={VERIFIER_MAX_LANES}"
        ));
    }
    Ok(format!("argon2id m={m} KiB t={t} p={p}"))
}

impl Shell {
    /// A member's change to their own account, once their password and
    /// TOTP code were checked.
    pub(super) fn change_account(
        &mut self,
        req: ReqId,
        member: String,
        change: coffre_vault::AccountChange,
    ) {
        use coffre_vault::AccountChange as C;
        // The core checked who and from where (its records say so);
        // these say what changed.
        let source = None;
        let Some(acc) = self.control.accounts.users.get_mut(&member) else {
            self.answer(
                req,
                (
                    500,
                    error_json(
                        ErrorCode::Failure,
                        format!("{member} has no account (no id left?): see the audit log"),
                    ),
                ),
            );
            return;
        };
        let result: Result<(Value, String), String> = match &change {
            C::SshKeyList => {
                let keys: Vec<Value> = acc
                    .ssh_keys
                    .iter()
                    .filter_map(|k| {
                        let (_, fp) = check_ssh_key(k).ok()?;
                        let mut f = k.splitn(3, ' ');
                        Some(json!({
                            "fingerprint": fp, "type": f.next(),
                            "comment": f.nth(1).unwrap_or(""), "key": k,
                        }))
                    })
                    .collect();
                let _ = self.replies_answer(req, json!({"ok": true, "keys": keys}));
                return;
            }
            C::SshKeyAdd { key } => match check_ssh_key(key) {
                Err(e) => Err(e),
                Ok((line, fp)) => {
                    let have = acc
                        .ssh_keys
                        .iter()
                        .any(|k| check_ssh_key(k).is_ok_and(|(_, f)| f == fp));
                    if have {
                        Ok((
                            json!({"ok": true, "fingerprint": fp, "added": false}),
                            format!("ssh key {fp} already there"),
                        ))
                    } else if acc.ssh_keys.len() >= MAX_SSH_KEYS {
                        Err(format!("at most {MAX_SSH_KEYS} SSH keys; remove one first"))
                    } else {
                        acc.ssh_keys.push(line);
                        Ok((
                            json!({"ok": true, "fingerprint": fp, "added": true}),
                            format!("ssh key {fp} added"),
                        ))
                    }
                }
            },
            C::SshKeyRemove { key } => {
                let want = check_ssh_key(key)
                    .map(|(_, fp)| fp)
                    .unwrap_or_else(|_| key.trim().to_string());
                let before = acc.ssh_keys.len();
                acc.ssh_keys
                    .retain(|k| check_ssh_key(k).map_or(true, |(_, fp)| fp != want));
                if acc.ssh_keys.len() == before {
                    Err(format!(
                        "no SSH key {want} (see `coffre member ssh-key list`)"
                    ))
                } else {
                    Ok((
                        json!({"ok": true, "fingerprint": want}),
                        format!("ssh key {want} removed"),
                    ))
                }
            }
            C::WorkloadPassword { verifier } => match check_verifier(&verifier.0) {
                Err(e) => Err(e),
                Ok(costs) => {
                    acc.workload_password = Some(verifier.0.clone());
                    Ok((
                        json!({"ok": true}),
                        format!("workload password set ({costs} verifier)"),
                    ))
                }
            },
            C::WorkloadPasswordClear => {
                acc.workload_password = None;
                Ok((json!({"ok": true}), "workload password removed".into()))
            }
            C::Certificate { csr } => {
                let kept = self.renewing.remove(&req);
                self.renew_certificate(req, member, csr, kept);
                return;
            }
        };
        match result {
            Ok((answer, detail)) => {
                self.persist();
                self.record(AuditRecord {
                    at: now_ms(),
                    actor: member,
                    source,
                    action: "account".into(),
                    result: "ok".into(),
                    detail,
                });
                let _ = self.replies_answer(req, answer);
            }
            Err(e) => {
                self.record(AuditRecord {
                    at: now_ms(),
                    actor: member,
                    source,
                    action: "account".into(),
                    result: "refused:invalid".into(),
                    detail: format!("{}: {e}", change.describe()),
                });
                self.answer(req, (400, error_json(ErrorCode::Invalid, e)));
            }
        }
    }

    /// A renewal that could not be done: recorded, and answered 500.
    fn renewal_failed(&mut self, req: ReqId, member: String, why: String) {
        self.record(AuditRecord {
            at: now_ms(),
            actor: member,
            source: None,
            action: "certificate_renew".into(),
            result: "failed".into(),
            detail: why.clone(),
        });
        self.answer(req, (500, error_json(ErrorCode::Failure, why)));
    }

    /// A member's new client certificate, for a key made on their machine,
    /// once their password and TOTP code were checked. The certificate the
    /// request came with stays valid beside the new one (a reply lost on
    /// the way can be asked again) until it ends or the next renewal; any
    /// other of theirs is revoked now. Their keyslot is untouched.
    fn renew_certificate(&mut self, req: ReqId, member: String, csr: &str, kept: Option<String>) {
        let issued = self
            .dir
            .read(&self.dir.ca_key())
            .map(zeroize::Zeroizing::new)
            .map_err(|e| e.to_string())
            .and_then(|ca_key| {
                crate::pki::sign_csr(&self.config.name, &ca_key, csr, &member)
                    .map_err(|e| e.to_string())
            });
        let issued = match issued {
            Ok(i) => i,
            Err(e) => return self.renewal_failed(req, member, e),
        };
        let older: Vec<String> = self
            .control
            .certs
            .iter()
            .filter(|(f, m)| **m == member && Some(*f) != kept.as_ref())
            .map(|(f, _)| f.clone())
            .collect();
        let before = (self.control.certs.clone(), self.control.revoked.clone());
        for f in &older {
            self.control.certs.remove(f);
            self.control.revoked.push(f.clone());
        }
        self.control
            .certs
            .insert(issued.fingerprint.clone(), member.clone());
        let not_after = crate::pki::pem_not_after(&issued.cert_pem).map_or(0, |(t, _)| t);
        if let Err(e) = self.try_persist() {
            // Not on disk: a restart would forget the new certificate
            // while the member's file held only it. Nothing changes.
            (self.control.certs, self.control.revoked) = before;
            let msg = format!("cannot save the control data ({e}): nothing was renewed");
            return self.renewal_failed(req, member, msg);
        }
        self.record(AuditRecord {
            at: now_ms(),
            actor: member,
            source: None,
            action: "certificate_renew".into(),
            result: "ok".into(),
            detail: format!(
                "new certificate {} valid until {} (Unix s); renewed with {}, kept until it ends; {} older one(s) revoked{}",
                &issued.fingerprint[..16],
                not_after,
                kept.as_deref().map_or("?", |k| &k[..k.len().min(16)]),
                older.len(),
                if older.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        older
                            .iter()
                            .map(|f| &f[..f.len().min(16)])
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ),
        });
        // The CA that signed it, and after a change of the CA's key the
        // cross certificate: the member's machine moves to the new CA if
        // the one it pins certified it (`pki::ca_succeeds`).
        let ca_pem = self.dir.read(&self.dir.ca_cert()).ok();
        let cross_pem = self
            .dir
            .read_if_present(&self.dir.ca_cross_cert())
            .ok()
            .flatten();
        let _ = self.replies_answer(
            req,
            json!({"ok": true, "cert_pem": issued.cert_pem, "fingerprint": issued.fingerprint,
                   "not_after": not_after, "revoked": older.len(),
                   "ca_pem": ca_pem, "cross_pem": cross_pem}),
        );
    }

    fn replies_answer(&mut self, req: ReqId, v: Value) -> bool {
        let had = self.replies.contains_key(&req);
        self.answer(req, (200, v));
        had
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ranges_come_from_login_defs_and_subordinate_ids() {
        let defs = "# comment\nUID_MIN 1000\nUID_MAX   60000\n#SYS_UID_MAX 999\nGID_MIN 1000\nGID_MAX 60000\nUMASK 022\n";
        let r = host_ranges(
            defs,
            "alice:100000:65536\nbad line\n",
            "alice:165536:65536\n",
        );
        let has = |first, last| r.iter().any(|(_, x)| *x == Range { first, last });
        assert!(has(1000, 60000));
        assert!(has(101, 999));
        assert!(has(100000, 165535));
        assert!(has(165536, 231071));
        let d = coffre_vault::accounts::DEFAULT_RANGE;
        assert!(
            r.iter().all(|(_, x)| !x.overlaps(&d)),
            "the default range is clear of Debian's defaults: {r:?}"
        );
        let r = host_ranges("UID_MAX 70000\n", "", "");
        assert!(
            r.iter()
                .any(|(what, x)| x.overlaps(&d) && what.contains("UID_MIN-UID_MAX"))
        );
    }

    #[test]
    fn verifiers_are_argon2id_with_bounded_costs() {
        let salt = data_encoding::BASE64_NOPAD.encode(&[1u8; 16]);
        let hash = data_encoding::BASE64_NOPAD.encode(&[2u8; 32]);
        let v = |params: &str| format!("$argon2id$v=19${params}${salt}${hash}");
        assert!(
            check_verifier(&v("m=65536,t=3,p=1"))
                .unwrap()
                .contains("65536")
        );
        for bad in [
            "m=1024,t=3,p=1",
            "m=65536,t=1,p=1",
            "m=4194304,t=3,p=1",
            "m=65536,t=3,x=2",
        ] {
            assert!(check_verifier(&v(bad)).is_err(), "{bad}");
        }
        assert!(check_verifier(&v("m=65536,t=3,p=1").replace("argon2id", "argon2i")).is_err());
        assert!(check_verifier("$argon2id$v=19$m=65536,t=3,p=1$c2FsdA$aGFzaA").is_err());
        // What a member's machine makes passes.
        let made = coffre_api::verifier::make(b"a workload password").unwrap();
        check_verifier(&made.0).unwrap();
    }

    #[test]
    fn members_are_not_named_like_guests_or_hosts_accounts() {
        for n in ["root", "ubuntu", "ec2-user", "systemd-network", "nobody"] {
            assert!(name_taken(n).is_some(), "{n}");
        }
        assert!(name_taken("coffre-no-such-account-7").is_none());
    }

    #[test]
    fn group_ids_are_read() {
        let g = group_ids("root:x:0:\nteam:x:1234:alice,bob\nbroken\n");
        assert!(g.contains(&0) && g.contains(&1234) && g.len() == 2);
    }
}

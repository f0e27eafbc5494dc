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
pub(crate) fn host_uses() -> impl Fn(u32) -> bool {
    let groups = group_ids(&std::fs::read_to_string("/etc/group").unwrap_or_default());
    move |id| groups.contains(&id) || matches!(coffre_sys::child::user_by_uid(id), Ok(Some(_)))
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
        let current = &control.vault.members;
        a.import(&members, &|n| current.contains_key(n), old.team_gid, now_ms);
        notes.push(format!(
            "imported {} member number(s) and team gid {} from [data.members]; kept as they were (no chown). Remove [data.members] and team_gid from config.toml: the next start refuses them",
            members.len(),
            old.team_gid
        ));
    }
    let uses = host_uses();
    notes.extend(reconcile(a, &control.vault.members, config, &uses).map_err(|e| e.to_string())?);
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
) -> Result<Vec<String>, coffre_vault::accounts::AccountError> {
    let range = config.accounts.range();
    let mut done = Vec::new();
    // Superusers first: `init`'s first superuser gets the first number.
    let mut order: Vec<&Member> = members.values().collect();
    order.sort_by_key(|m| (m.role != Role::Superuser, m.keyslot));
    for m in order {
        if !a.users.contains_key(&m.name) {
            let uid = a.ensure_user(&m.name, range, host_uses)?.uid;
            done.push(format!("{} gets uid {uid} (and group {uid})", m.name));
        }
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
        match reconcile(&mut self.control.accounts, &members, &self.config, &uses) {
            Ok(done) if done.is_empty() => {}
            Ok(done) => {
                for d in done {
                    self.system_audit("accounts", "ok", d);
                }
                self.accounts_changed();
            }
            Err(e) => self.system_audit("accounts", "failed", e.to_string()),
        }
    }

    /// What follows a change of accounts: workloads resolve members'
    /// names with the new numbers.
    pub(super) fn accounts_changed(&mut self) {
        let ids = self.member_ids();
        self.workloads
            .set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_members(ids);
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
    fn group_ids_are_read() {
        let g = group_ids("root:x:0:\nteam:x:1234:alice,bob\nbroken\n");
        assert!(g.contains(&0) && g.contains(&1234) && g.len() == 2);
    }
}

//! The vault's numbers: each member's uid (with a private group of the
//! same number), and the gids of the team, the superusers and each
//! workload's members. No I/O: the shell says which numbers the host
//! already uses, and persists the result.
//!
//! Rules:
//! - numbers come from one configured range (default
//!   [`DEFAULT_RANGE`]), lowest free first, skipping any number the host
//!   already has as a user or group;
//! - a number once given is never given again, to anyone, even after its
//!   member's removal (files they left keep meaning "theirs", never a
//!   newcomer's);
//! - numbers imported from an older vault (`[data.members]`, `team_gid`)
//!   are kept as they were, in or out of the range (no chown);
//! - group names start with `_`, which member names cannot, so a member
//!   and a group never share a name.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The team's group.
pub const TEAM_GROUP: &str = "_team";
/// The superusers' group.
pub const SUPERUSERS_GROUP: &str = "_superusers";

/// The group of a workload's members.
pub fn workload_group(workload: &str) -> String {
    format!("_wl-{workload}")
}

/// Default numbers: 65536 to 99999.
///
/// Below: Debian's ordinary accounts (1000 to 59999, `login.defs`), its
/// static system range (60000 to 64999), systemd's dynamic users (61184
/// to 65519), `nobody` (65534) and 65535 (`(uint16_t) -1`). Above: the
/// subordinate ids `useradd` hands out for user namespaces (from 100000,
/// 65536 per account, `/etc/subuid`). 34464 numbers, more than a team
/// needs in its lifetime.
pub const DEFAULT_RANGE: Range = Range {
    first: 65536,
    last: 99999,
};

/// An inclusive range of ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First id.
    pub first: u32,
    /// Last id (included).
    pub last: u32,
}

impl Range {
    /// Whether `id` is in it.
    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// Whether it shares an id with `other`.
    pub fn overlaps(&self, other: &Range) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// Checks it is usable: ordered, away from root and `nobody`'s
    /// 16-bit neighbours.
    pub fn check(&self) -> Result<(), String> {
        if self.first > self.last {
            return Err(format!(
                "the id range {}-{} is empty (first after last)",
                self.first, self.last
            ));
        }
        if self.first < 1000 {
            return Err(format!(
                "the id range starts at {}: below 1000 are the host's system accounts",
                self.first
            ));
        }
        if self.last >= u32::MAX - 1 {
            return Err("the id range ends at (uid_t) -1 or -2, which mean \"none\"".into());
        }
        for special in [65534, 65535] {
            if self.contains(special) {
                return Err(format!(
                    "the id range {}-{} holds {special} (nobody, or (uint16_t) -1)",
                    self.first, self.last
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Where a member's numbers came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Given by the vault from its range.
    Vault,
    /// Imported from `[data.members]` of an older vault.
    Imported,
    /// The organisation's directory's `uidNumber` and `gidNumber`, taken
    /// when the member joined (`[directory] ids = "directory"`).
    Directory,
}

/// A member's account.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// User id.
    pub uid: u32,
    /// Primary group (their private group: the same number, unless
    /// imported).
    pub gid: u32,
    /// Where the numbers came from.
    pub origin: Origin,
    /// SSH public keys, one line each (`TYPE BASE64 [COMMENT]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// The argon2id verifier (PHC string) of their workload password:
    /// what workloads' LDAP binds check, never their vault password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_password: Option<String>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("origin", &self.origin)
            .field("ssh_keys", &self.ssh_keys.len())
            .field(
                "workload_password",
                &self.workload_password.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

/// Every number the vault gave, persisted with the control data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounts {
    /// Current members' accounts.
    #[serde(default)]
    pub users: BTreeMap<String, Account>,
    /// Groups by name (`_team`, `_superusers`, `_wl-NAME`): their gid.
    #[serde(default)]
    pub groups: BTreeMap<String, u32>,
    /// Every id ever given (users, groups, imported): never given again.
    #[serde(default)]
    pub used: BTreeSet<u32>,
    /// Removed members' numbers, for the record (name, uid).
    #[serde(default)]
    pub retired: Vec<(String, u32)>,
    /// Imported numbers of names that were not members yet: theirs when
    /// they join.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub awaiting: BTreeMap<String, (u32, u32)>,
    /// When `[data.members]` was imported (ms since the epoch), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_at_ms: Option<u64>,
}

/// Why a number could not be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountError {
    /// The range has no number left.
    Exhausted(Range),
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::Exhausted(r) => write!(
                f,
                "no id left in the range {r} (every number in it was given once, or the host uses it): widen [accounts] range"
            ),
        }
    }
}

impl std::error::Error for AccountError {}

impl Accounts {
    /// The lowest id of `range` never given and not in use on the host.
    fn take(&mut self, range: Range, host_uses: &dyn Fn(u32) -> bool) -> Result<u32, AccountError> {
        let mut id = range.first;
        loop {
            if !self.used.contains(&id) && !host_uses(id) {
                self.used.insert(id);
                return Ok(id);
            }
            if id == range.last {
                return Err(AccountError::Exhausted(range));
            }
            id += 1;
        }
    }

    /// `name`'s account, made if they have none: a new uid whose number
    /// is also their private group's. `host_uses(id)` says whether the
    /// host has a user or a group with that id.
    pub fn ensure_user(
        &mut self,
        name: &str,
        range: Range,
        host_uses: &dyn Fn(u32) -> bool,
    ) -> Result<&Account, AccountError> {
        if let Some((uid, gid)) = self.awaiting.remove(name) {
            self.users.insert(
                name.to_string(),
                Account {
                    uid,
                    gid,
                    origin: Origin::Imported,
                    ssh_keys: Vec::new(),
                    workload_password: None,
                },
            );
        }
        if !self.users.contains_key(name) {
            let uid = self.take(range, host_uses)?;
            self.users.insert(
                name.to_string(),
                Account {
                    uid,
                    gid: uid,
                    origin: Origin::Vault,
                    ssh_keys: Vec::new(),
                    workload_password: None,
                },
            );
        }
        Ok(&self.users[name])
    }

    /// Why the organisation's directory's numbers (`uid`, `gid`) cannot be
    /// `name`'s, if they cannot: 0 (root's), inside the vault's own
    /// range (they would meet numbers the vault gives), a uid another
    /// member has, or one the host uses (`host_uses`).
    pub fn refuse_directory_ids(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
        range: Range,
        host_uses: &dyn Fn(u32) -> bool,
    ) -> Option<String> {
        if uid == 0 || gid == 0 {
            return Some("uidNumber and gidNumber must not be 0 (root's)".into());
        }
        if let Some(id) = [uid, gid].into_iter().find(|id| range.contains(*id)) {
            return Some(format!(
                "{id} is inside the vault's own range {range}: move [accounts] range away from the directory's numbers"
            ));
        }
        if let Some((other, _)) = self
            .users
            .iter()
            .find(|(n, a)| n.as_str() != name && a.uid == uid)
        {
            return Some(format!("uidNumber {uid} is already {other}'s"));
        }
        if host_uses(uid) {
            return Some(format!("uidNumber {uid} is a user or group of this host"));
        }
        None
    }

    /// `name`'s account with the organisation's directory's numbers
    /// (checked with [`Accounts::refuse_directory_ids`] first).
    pub fn adopt(&mut self, name: &str, uid: u32, gid: u32) -> &Account {
        self.used.insert(uid);
        self.used.insert(gid);
        self.users.insert(
            name.to_string(),
            Account {
                uid,
                gid,
                origin: Origin::Directory,
                ssh_keys: Vec::new(),
                workload_password: None,
            },
        );
        &self.users[name]
    }

    /// Group `name`'s gid, given if it has none.
    pub fn ensure_group(
        &mut self,
        name: &str,
        range: Range,
        host_uses: &dyn Fn(u32) -> bool,
    ) -> Result<u32, AccountError> {
        if let Some(g) = self.groups.get(name) {
            return Ok(*g);
        }
        let gid = self.take(range, host_uses)?;
        self.groups.insert(name.to_string(), gid);
        Ok(gid)
    }

    /// Removes `name`'s account; their numbers stay given (never reused).
    /// Returns the account, if there was one.
    pub fn retire(&mut self, name: &str) -> Option<Account> {
        let a = self.users.remove(name)?;
        self.retired.push((name.to_string(), a.uid));
        Some(a)
    }

    /// Imports an older vault's numbers once, as they were: each listed
    /// name's uid and gid (a name not yet a member, `is_member` false,
    /// gets them when they join), and the team's gid (when not 0: root's
    /// group is never the team's; a new one is given instead).
    pub fn import(
        &mut self,
        members: &BTreeMap<String, (u32, u32)>,
        is_member: &dyn Fn(&str) -> bool,
        team_gid: u32,
        now_ms: u64,
    ) {
        for (name, (uid, gid)) in members {
            self.used.insert(*uid);
            self.used.insert(*gid);
            if !is_member(name) {
                self.awaiting.insert(name.clone(), (*uid, *gid));
                continue;
            }
            self.users.insert(
                name.clone(),
                Account {
                    uid: *uid,
                    gid: *gid,
                    origin: Origin::Imported,
                    ssh_keys: Vec::new(),
                    workload_password: None,
                },
            );
        }
        if team_gid != 0 {
            self.used.insert(team_gid);
            self.groups.insert(TEAM_GROUP.to_string(), team_gid);
        }
        self.imported_at_ms = Some(now_ms);
    }

    /// The team's gid, if given.
    pub fn team_gid(&self) -> Option<u32> {
        self.groups.get(TEAM_GROUP).copied()
    }

    /// Numbers of current accounts and groups that the host also uses
    /// (a host account made after the vault gave the number): (what,
    /// id), for a warning.
    pub fn clashes(&self, host_uses: &dyn Fn(u32) -> bool) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for (n, a) in &self.users {
            if a.origin == Origin::Vault && host_uses(a.uid) {
                out.push((format!("member {n}"), a.uid));
            }
        }
        for (n, g) in &self.groups {
            if host_uses(*g) {
                out.push((format!("group {n}"), *g));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: Range = Range {
        first: 70000,
        last: 70009,
    };

    fn none(_: u32) -> bool {
        false
    }

    #[test]
    fn the_directorys_numbers_are_checked_then_kept() {
        let mut a = Accounts::default();
        a.ensure_user("alice", R, &none).unwrap();
        let host = |id: u32| id == 1000;
        let refuse = |a: &Accounts, uid, gid| a.refuse_directory_ids("bob", uid, gid, R, &host);
        assert!(refuse(&a, 0, 5000).unwrap().contains("root"));
        assert!(refuse(&a, 5000, 0).unwrap().contains("root"));
        assert!(
            refuse(&a, 70003, 5000)
                .unwrap()
                .contains("vault's own range")
        );
        assert!(
            refuse(&a, 5000, 70003)
                .unwrap()
                .contains("vault's own range")
        );
        assert!(refuse(&a, 1000, 5000).unwrap().contains("host"));
        assert_eq!(
            refuse(&a, 5000, 100),
            None,
            "a shared primary group is fine"
        );
        let acc = a.adopt("bob", 5000, 100).clone();
        assert_eq!(
            (acc.uid, acc.gid, acc.origin),
            (5000, 100, Origin::Directory)
        );
        // Never given by the vault, and nobody else's.
        assert!(a.used.contains(&5000));
        let other = a.refuse_directory_ids("carol", 5000, 100, R, &none);
        assert!(other.unwrap().contains("bob's"));
        assert_eq!(a.refuse_directory_ids("bob", 5000, 100, R, &none), None);
    }

    #[test]
    fn the_first_member_gets_the_first_number_and_their_group_the_same() {
        let mut a = Accounts::default();
        let u = a.ensure_user("alice", R, &none).unwrap().clone();
        assert_eq!((u.uid, u.gid), (70000, 70000));
        assert_eq!(a.ensure_group(TEAM_GROUP, R, &none).unwrap(), 70001);
        // Asking again changes nothing.
        assert_eq!(a.ensure_user("alice", R, &none).unwrap().uid, 70000);
        assert_eq!(a.ensure_group(TEAM_GROUP, R, &none).unwrap(), 70001);
    }

    #[test]
    fn numbers_the_host_uses_are_skipped() {
        let mut a = Accounts::default();
        let host = |id: u32| id == 70000 || id == 70002;
        assert_eq!(a.ensure_user("alice", R, &host).unwrap().uid, 70001);
        assert_eq!(a.ensure_user("bob", R, &host).unwrap().uid, 70003);
    }

    #[test]
    fn a_full_range_is_a_clear_error() {
        let mut a = Accounts::default();
        let r = Range {
            first: 70000,
            last: 70001,
        };
        a.ensure_user("a", r, &none).unwrap();
        a.ensure_user("b", r, &none).unwrap();
        let e = a.ensure_user("c", r, &none).unwrap_err();
        assert!(e.to_string().contains("70000-70001"), "{e}");
        assert!(!a.users.contains_key("c"));
    }

    #[test]
    fn an_import_keeps_the_numbers_and_never_makes_root_the_team() {
        let mut a = Accounts::default();
        let m = BTreeMap::from([
            ("alice".to_string(), (1000, 1000)),
            ("bob".to_string(), (1001, 1001)),
        ]);
        a.import(&m, &|n| n == "alice", 0, 5);
        assert!(!a.users.contains_key("bob"));
        // Bob's numbers wait for him, and nobody else gets them.
        assert_eq!(
            a.ensure_user(
                "carol",
                Range {
                    first: 1001,
                    last: 1002
                },
                &none
            )
            .unwrap()
            .uid,
            1002
        );
        let b = a.ensure_user("bob", R, &none).unwrap();
        assert_eq!((b.uid, b.origin), (1001, Origin::Imported));
        assert_eq!(a.users["alice"].uid, 1000);
        assert_eq!(a.users["alice"].origin, Origin::Imported);
        assert_eq!(a.team_gid(), None);
        assert_eq!(a.ensure_group(TEAM_GROUP, R, &none).unwrap(), 70000);
        let mut b = Accounts::default();
        b.import(&m, &|_| true, 1234, 5);
        assert_eq!(b.team_gid(), Some(1234));
        assert_eq!(b.imported_at_ms, Some(5));
    }

    #[test]
    fn ranges_are_checked() {
        DEFAULT_RANGE.check().unwrap();
        assert!(Range { first: 5, last: 4 }.check().is_err());
        assert!(Range { first: 0, last: 4 }.check().is_err());
        assert!(
            Range {
                first: 60000,
                last: 70000
            }
            .check()
            .unwrap_err()
            .contains("65534")
        );
        assert!(R.overlaps(&Range {
            first: 70009,
            last: 80000
        }));
        assert!(!R.overlaps(&Range {
            first: 70010,
            last: 80000
        }));
    }

    #[test]
    fn debug_hides_the_verifier() {
        let mut a = Accounts::default();
        a.ensure_user("alice", R, &none).unwrap();
        a.users.get_mut("alice").unwrap().workload_password =
            Some("$argon2id$v=19$m=65536,t=3,p=1$c2FsdA$aGFzaA".into());
        let d = format!("{a:?}");
        assert!(!d.contains("argon2id"), "{d}");
        assert!(d.contains("<set>"), "{d}");
    }

    proptest! {
        /// Whatever the sequence of joins and removals, no id is ever
        /// given twice, every given id is in the range, and current
        /// members' uids are distinct from every group's gid.
        #[test]
        fn no_number_is_ever_given_twice(ops in proptest::collection::vec((0u8..3, 0u8..6), 0..40)) {
            let mut a = Accounts::default();
            let range = Range { first: 70000, last: 70100 };
            let mut given = Vec::new();
            for (op, who) in ops {
                let name = format!("m{who}");
                match op {
                    0 => {
                        let had = a.users.contains_key(&name);
                        let uid = a.ensure_user(&name, range, &none).unwrap().uid;
                        if !had { given.push(uid); }
                    }
                    1 => { a.retire(&name); }
                    _ => {
                        let g = format!("_wl-{who}");
                        let had = a.groups.contains_key(&g);
                        let gid = a.ensure_group(&g, range, &none).unwrap();
                        if !had { given.push(gid); }
                    }
                }
            }
            let mut sorted = given.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), given.len());
            prop_assert!(given.iter().all(|id| range.contains(*id)));
            let gids: BTreeSet<u32> = a.groups.values().copied().collect();
            prop_assert!(a.users.values().all(|u| !gids.contains(&u.uid)));
        }
    }
}

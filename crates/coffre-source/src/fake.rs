//! [`FakeDirectory`]: an in-memory [`Directory`] for the daemon's tests.
//!
//! Accounts keep their attributes as a server would, and are judged by
//! the same code as real entries ([`flags::disabled`](crate::flags::disabled)),
//! so a test that locks an account with [`FakeDirectory::lock`] goes
//! through the same reading of `pwdAccountLockedTime` as production.
//! Names match without regard to ASCII case, as `uid` does. It can be
//! made unreachable, and counts what was asked of it: each `lookup` or
//! `lookup_many` is one search, each password check that got past the
//! empty-password refusal one bind.

use crate::escape::normalise_dn;
use crate::flags::Attributes;
use crate::query::{self, Entry, Members};
use crate::{Account, BoxFuture, Directory, Found, SourceError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::SystemTime;

/// The base the fake's accounts are named under.
pub const PEOPLE: &str = "ou=people,dc=example,dc=org";

#[derive(Default)]
struct State {
    /// By lower-case name.
    accounts: BTreeMap<String, (String, Attributes, Option<String>)>,
    members: BTreeSet<String>,
    superusers: BTreeSet<String>,
    unreachable: bool,
    searches: u64,
    binds: u64,
}

/// An in-memory directory.
#[derive(Default)]
pub struct FakeDirectory {
    state: Mutex<State>,
}

impl std::fmt::Debug for FakeDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDirectory").finish_non_exhaustive()
    }
}

impl FakeDirectory {
    /// An empty directory, reachable.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding it leaves the state usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with_account(&self, name: &str, f: impl FnOnce(&mut Attributes)) {
        if let Some((_, attrs, _)) = self.state().accounts.get_mut(&name.to_ascii_lowercase()) {
            f(attrs);
        }
    }

    /// Adds (or replaces) the account NAME, `uid=NAME,`[`PEOPLE`], with
    /// `password` (`None`: binds always fail), in no group.
    pub fn add(&self, name: &str, password: Option<&str>) {
        let dn = format!("uid={},{PEOPLE}", crate::escape::dn_value(name));
        let mut attrs = Attributes::new();
        attrs.insert("uid".into(), vec![name.to_string()]);
        self.state().accounts.insert(
            name.to_ascii_lowercase(),
            (dn, attrs, password.map(str::to_string)),
        );
    }

    /// Removes the account (group memberships stay, as a dangling
    /// `memberUid` would).
    pub fn remove(&self, name: &str) {
        self.state().accounts.remove(&name.to_ascii_lowercase());
    }

    /// Sets an attribute's values (`uidNumber`, `shadowExpire`,
    /// `userAccountControl`, ...); no values removes it.
    pub fn set_attribute(&self, name: &str, attribute: &str, values: &[&str]) {
        self.with_account(name, |a| {
            let key = attribute.to_ascii_lowercase();
            if values.is_empty() {
                a.remove(&key);
            } else {
                a.insert(key, values.iter().map(|v| (*v).to_string()).collect());
            }
        });
    }

    /// Locks the account as ppolicy does for good
    /// (`pwdAccountLockedTime: 000001010000Z`).
    pub fn lock(&self, name: &str) {
        self.set_attribute(name, "pwdAccountLockedTime", &["000001010000Z"]);
    }

    /// Removes the ppolicy lock.
    pub fn unlock(&self, name: &str) {
        self.set_attribute(name, "pwdAccountLockedTime", &[]);
    }

    /// Sets or clears the account's password.
    pub fn set_password(&self, name: &str, password: Option<&str>) {
        if let Some(a) = self.state().accounts.get_mut(&name.to_ascii_lowercase()) {
            a.2 = password.map(str::to_string);
        }
    }

    /// Puts NAME in (or out of) `members_group`.
    pub fn set_member(&self, name: &str, member: bool) {
        let mut s = self.state();
        let key = name.to_ascii_lowercase();
        if member {
            s.members.insert(key);
        } else {
            s.members.remove(&key);
        }
    }

    /// Puts NAME in (or out of) `superusers_group`.
    pub fn set_superuser(&self, name: &str, superuser: bool) {
        let mut s = self.state();
        let key = name.to_ascii_lowercase();
        if superuser {
            s.superusers.insert(key);
        } else {
            s.superusers.remove(&key);
        }
    }

    /// Makes every call fail with [`SourceError::Unreachable`] (or work
    /// again).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().unreachable = unreachable;
    }

    /// Searches answered so far (one per `lookup` or `lookup_many`).
    pub fn searches(&self) -> u64 {
        self.state().searches
    }

    /// Binds tried so far (empty passwords are refused before).
    pub fn binds(&self) -> u64 {
        self.state().binds
    }

    fn reach(s: &mut State) -> Result<(), SourceError> {
        if s.unreachable {
            return Err(SourceError::Unreachable {
                url: "fake:".into(),
                reason: "set unreachable by the test".into(),
            });
        }
        Ok(())
    }

    fn answer(s: &State, names: &[String]) -> Vec<(String, Found)> {
        let unique: BTreeSet<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        let entries: Vec<Entry> = unique
            .iter()
            .filter_map(|n| s.accounts.get(n))
            .map(|(dn, attrs, _)| Entry {
                dn: dn.clone(),
                attrs: attrs.clone(),
            })
            .collect();
        let group = |set: &BTreeSet<String>| {
            Members::from_accounts(
                &entries
                    .iter()
                    .filter(|e| {
                        e.attrs
                            .get("uid")
                            .into_iter()
                            .flatten()
                            .any(|u| set.contains(&u.to_ascii_lowercase()))
                    })
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        let (members, superusers) = (group(&s.members), group(&s.superusers));
        query::found(
            crate::Flavour::OpenLdap,
            names,
            &entries,
            &members,
            Some(&superusers),
            SystemTime::now(),
        )
    }
}

impl Directory for FakeDirectory {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Account>, SourceError>> {
        Box::pin(async move {
            let mut s = self.state();
            Self::reach(&mut s)?;
            s.searches += 1;
            match Self::answer(&s, &[name.to_string()]).pop().map(|(_, f)| f) {
                Some(Found::Account(a)) => Ok(Some(a)),
                _ => Ok(None),
            }
        })
    }

    fn lookup_many<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, Found)>, SourceError>> {
        Box::pin(async move {
            let mut s = self.state();
            Self::reach(&mut s)?;
            s.searches += 1;
            Ok(Self::answer(&s, names))
        })
    }

    fn bind<'a>(
        &'a self,
        dn: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<bool, SourceError>> {
        Box::pin(async move {
            let mut s = self.state();
            Self::reach(&mut s)?;
            s.binds += 1;
            let want = normalise_dn(dn);
            Ok(s.accounts.values().any(|(d, attrs, pw)| {
                want.is_some()
                    && normalise_dn(d) == want
                    && pw.as_deref() == Some(password)
                    // ppolicy refuses binds of a locked account.
                    && !attrs.contains_key("pwdaccountlockedtime")
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block<T>(f: BoxFuture<'_, T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn team() -> FakeDirectory {
        let d = FakeDirectory::new();
        for n in ["alice", "bob", "carol"] {
            d.add(n, Some(&format!("{n}'s password")));
        }
        d.set_member("alice", true);
        d.set_member("bob", true);
        d.set_superuser("alice", true);
        d.set_attribute("alice", "uidNumber", &["70001"]);
        d
    }

    #[test]
    fn lookups_report_groups_numbers_and_marks() {
        let d = team();
        let a = block(d.lookup("alice")).unwrap().unwrap();
        assert_eq!(a.dn, "uid=alice,ou=people,dc=example,dc=org");
        assert!(a.in_members_group && a.in_superusers_group && a.disabled.is_none());
        assert_eq!(a.uid_number, Some(70_001));
        assert_eq!(a.refusal(true), None);
        let b = block(d.lookup("BOB")).unwrap().unwrap();
        assert_eq!(b.refusal(true), Some(crate::Refusal::NotInSuperusersGroup));
        let c = block(d.lookup("carol")).unwrap().unwrap();
        assert_eq!(c.refusal(false), Some(crate::Refusal::NotInMembersGroup));
        assert_eq!(block(d.lookup("nobody")).unwrap(), None);
        assert_eq!(block(d.lookup("*")).unwrap(), None);
        d.lock("bob");
        let b = block(d.lookup("bob")).unwrap().unwrap();
        assert!(matches!(b.disabled, Some(crate::Disabled::Locked { .. })));
        d.unlock("bob");
        d.set_attribute("bob", "shadowExpire", &["1"]);
        assert!(matches!(
            block(d.lookup("bob")).unwrap().unwrap().disabled,
            Some(crate::Disabled::Expired { .. })
        ));
        d.remove("bob");
        assert_eq!(block(d.lookup("bob")).unwrap(), None);
        assert_eq!(d.searches(), 8);
    }

    #[test]
    fn lookup_many_is_one_search() {
        let d = team();
        let names: Vec<String> = ["carol", "alice", "zed", "alice"]
            .map(String::from)
            .to_vec();
        let before = d.searches();
        let f = block(d.lookup_many(&names)).unwrap();
        assert_eq!(d.searches(), before + 1);
        assert_eq!(
            f.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["carol", "alice", "zed", "alice"]
        );
        assert_eq!(f[2].1, Found::NoAccount);
        assert_eq!(f[1].1.refusal(true), None);
        assert_eq!(
            f[0].1.refusal(false),
            Some(crate::Refusal::NotInMembersGroup)
        );
        assert_eq!(f[1], f[3]);
    }

    #[test]
    fn passwords() {
        let d = team();
        let dn = "uid=alice,ou=people,dc=example,dc=org";
        assert!(block(d.check_password(dn, "alice's password")).unwrap());
        assert!(
            block(d.check_password("UID=Alice, ou=people,dc=example,dc=org", "alice's password"))
                .unwrap()
        );
        assert!(!block(d.check_password(dn, "wrong")).unwrap());
        assert_eq!(d.binds(), 3);
        assert!(!block(d.check_password(dn, "")).unwrap());
        assert!(!block(d.check_password("", "alice's password")).unwrap());
        assert_eq!(d.binds(), 3, "empty passwords never reach the directory");
        d.lock("alice");
        assert!(!block(d.check_password(dn, "alice's password")).unwrap());
        d.unlock("alice");
        d.set_password("alice", None);
        assert!(!block(d.check_password(dn, "alice's password")).unwrap());
    }

    #[test]
    fn unreachable_fails_everything() {
        let d = team();
        d.set_unreachable(true);
        assert!(block(d.lookup("alice")).unwrap_err().is_unreachable());
        assert!(
            block(d.lookup_many(&["alice".into()]))
                .unwrap_err()
                .is_unreachable()
        );
        assert!(
            block(d.check_password("uid=alice,ou=people,dc=example,dc=org", "x"))
                .unwrap_err()
                .is_unreachable()
        );
        assert_eq!((d.searches(), d.binds()), (0, 0));
        d.set_unreachable(false);
        assert!(block(d.lookup("alice")).unwrap().is_some());
    }
}

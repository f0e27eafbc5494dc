//! The filters sent, and what is made of the entries that come back:
//! everything of [`LdapDirectory`](crate::LdapDirectory) that is not
//! network, so that it is tested without a server.

use crate::config::Flavour;
use crate::escape::{filter_value, normalise_dn};
use crate::flags::{self, Attributes};
use crate::{Account, Found};
use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// Active Directory's LDAP_MATCHING_RULE_IN_CHAIN: `memberOf` through
/// any depth of nested groups.
pub(crate) const IN_CHAIN: &str = "1.2.840.113556.1.4.1941";

/// The longest name looked up; longer ones are nobody's.
pub(crate) const MAX_NAME: usize = 256;

/// Whether `name` can be anyone's: not empty, not absurdly long, no NUL.
/// (Any other character is escaped; member names are restricted long
/// before they get here.)
pub(crate) fn usable(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.contains('\0')
}

/// An entry read from a search answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub dn: String,
    pub attrs: Attributes,
}

/// The class every account of the flavour has.
fn account_class(flavour: Flavour) -> Option<&'static str> {
    match flavour {
        // Any entry with the uid: inetOrgPerson, account, posixAccount.
        Flavour::OpenLdap => None,
        // Excludes contacts; computer accounts (also class user) end
        // in `$`, which no member name has.
        Flavour::ActiveDirectory => Some("(objectClass=user)"),
    }
}

fn name_equals(flavour: Flavour, name: &str) -> String {
    format!("({}={})", flavour.name_attribute(), filter_value(name))
}

/// The filter for one account.
pub(crate) fn account_filter(flavour: Flavour, name: &str) -> String {
    match account_class(flavour) {
        None => name_equals(flavour, name),
        Some(c) => format!("(&{c}{})", name_equals(flavour, name)),
    }
}

fn any_name(flavour: Flavour, names: &[&str]) -> String {
    let mut f = String::from("(|");
    for n in names {
        f.push_str(&name_equals(flavour, n));
    }
    f.push(')');
    f
}

/// The filter for all of `names` at once (not empty).
pub(crate) fn accounts_filter(flavour: Flavour, names: &[&str]) -> String {
    let any = any_name(flavour, names);
    match account_class(flavour) {
        None => any,
        Some(c) => format!("(&{c}{any})"),
    }
}

/// OpenLDAP: a base search on the group with this filter finds it if the
/// account is a member, whichever way the group lists members.
pub(crate) fn group_has(account_dn: &str, name: &str) -> String {
    let dn = filter_value(account_dn);
    format!(
        "(|(member={dn})(uniqueMember={dn})(memberUid={}))",
        filter_value(name)
    )
}

/// Active Directory: a base search on the account with this filter finds
/// it if it is in `group_dn`, directly or through nested groups. The plain
/// `memberOf` equality beside the in-chain rule changes nothing on AD (the
/// chain includes direct membership) and keeps direct membership working
/// on a server that does not know the rule (Samba before 4.x, OpenLDAP
/// with AD's schema): there the rule is Undefined and the OR falls back.
pub(crate) fn in_chain(group_dn: &str) -> String {
    let g = filter_value(group_dn);
    format!("(|(memberOf={g})(memberOf:{IN_CHAIN}:={g}))")
}

/// Active Directory: which of `names` are in `group_dn`, nested included.
pub(crate) fn accounts_in_chain(names: &[&str], group_dn: &str) -> String {
    format!(
        "(&(objectClass=user){}{})",
        any_name(Flavour::ActiveDirectory, names),
        in_chain(group_dn)
    )
}

/// The attributes asked for on accounts.
pub(crate) fn account_attributes(flavour: Flavour) -> Vec<&'static str> {
    let mut a = vec![flavour.name_attribute(), "uidNumber", "gidNumber"];
    a.extend(flags::DISABLE_ATTRIBUTES);
    a
}

/// The attributes of an OpenLDAP group that list its members.
pub(crate) const GROUP_MEMBER_ATTRIBUTES: [&str; 3] = ["member", "uniqueMember", "memberUid"];

/// The members of a group, as read from its entry (OpenLDAP), or the
/// accounts found in it (Active Directory).
#[derive(Clone, Debug, Default)]
pub(crate) struct Members {
    /// Normalised DNs.
    dns: HashSet<String>,
    /// `memberUid` values, as written (case-exact, as RFC 2307 matches
    /// them).
    uids: HashSet<String>,
}

impl Members {
    /// From a group entry's `member`, `uniqueMember` and `memberUid`.
    pub fn from_group(entry: &Entry) -> Self {
        let mut m = Members::default();
        for attr in ["member", "uniquemember"] {
            for v in entry.attrs.get(attr).into_iter().flatten() {
                // uniqueMember may carry an `#'0101'B` unique-id suffix.
                let dn = if attr == "uniquemember" {
                    v.rsplit_once("#'").map_or(v.as_str(), |(d, _)| d)
                } else {
                    v
                };
                if let Some(n) = normalise_dn(dn) {
                    m.dns.insert(n);
                }
            }
        }
        for v in entry.attrs.get("memberuid").into_iter().flatten() {
            m.uids.insert(v.clone());
        }
        m
    }

    /// From the accounts an in-chain search found.
    pub fn from_accounts(entries: &[Entry]) -> Self {
        Members {
            dns: entries.iter().filter_map(|e| normalise_dn(&e.dn)).collect(),
            uids: HashSet::new(),
        }
    }

    pub fn contains(&self, dn: &str, name: &str) -> bool {
        normalise_dn(dn).is_some_and(|n| self.dns.contains(&n)) || self.uids.contains(name)
    }
}

/// An [`Account`] from its entry.
pub(crate) fn account(
    name: &str,
    entry: &Entry,
    members: bool,
    superusers: bool,
    now: SystemTime,
) -> Account {
    Account {
        name: name.to_string(),
        dn: entry.dn.clone(),
        disabled: flags::disabled(&entry.attrs, now),
        in_members_group: members,
        in_superusers_group: superusers,
        uid_number: flags::number(&entry.attrs, "uidnumber"),
        gid_number: flags::number(&entry.attrs, "gidnumber"),
    }
}

/// Which entries carry `name` as their naming attribute (matched without
/// regard to ASCII case, as `uid` and `sAMAccountName` are).
pub(crate) fn entries_named<'e>(
    flavour: Flavour,
    entries: &'e [Entry],
    name: &str,
) -> Vec<&'e Entry> {
    let attr = flavour.name_attribute().to_ascii_lowercase();
    entries
        .iter()
        .filter(|e| {
            e.attrs
                .get(&attr)
                .into_iter()
                .flatten()
                .any(|v| v.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// The answer to a lookup of `names` from one search's entries and the
/// groups' members.
pub(crate) fn found(
    flavour: Flavour,
    names: &[String],
    entries: &[Entry],
    members: &Members,
    superusers: Option<&Members>,
    now: SystemTime,
) -> Vec<(String, Found)> {
    // Entries by each (lower-cased) value of their naming attribute, so
    // that a re-check of many names stays linear.
    let attr = flavour.name_attribute().to_ascii_lowercase();
    let mut by_name: HashMap<String, Vec<&Entry>> = HashMap::new();
    for e in entries {
        let mut seen = HashSet::new();
        for v in e.attrs.get(&attr).into_iter().flatten() {
            let key = v.to_ascii_lowercase();
            if seen.insert(key.clone()) {
                by_name.entry(key).or_default().push(e);
            }
        }
    }
    let mut memo: HashMap<&str, Found> = HashMap::new();
    names
        .iter()
        .map(|name| {
            let f = memo
                .entry(name.as_str())
                .or_insert_with(|| {
                    if !usable(name) {
                        return Found::NoAccount;
                    }
                    let named = by_name
                        .get(&name.to_ascii_lowercase())
                        .map_or(&[][..], Vec::as_slice);
                    match named {
                        [] => Found::NoAccount,
                        [e] => Found::Account(account(
                            name,
                            e,
                            members.contains(&e.dn, name),
                            superusers.is_some_and(|s| s.contains(&e.dn, name)),
                            now,
                        )),
                        many => Found::Ambiguous {
                            entries: many.len(),
                        },
                    }
                })
                .clone();
            (name.clone(), f)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escape::testparse::{Filter, parse};
    use proptest::prelude::*;

    fn eq(a: &str, v: &str) -> Filter {
        Filter::Equal(a.into(), v.as_bytes().to_vec())
    }

    fn entry(dn: &str, pairs: &[(&str, &str)]) -> Entry {
        let mut attrs = Attributes::new();
        for (k, v) in pairs {
            attrs
                .entry(k.to_ascii_lowercase())
                .or_default()
                .push((*v).into());
        }
        Entry {
            dn: dn.into(),
            attrs,
        }
    }

    #[test]
    fn filters_read_as_meant() {
        assert_eq!(account_filter(Flavour::OpenLdap, "alice"), "(uid=alice)");
        assert_eq!(
            account_filter(Flavour::ActiveDirectory, "alice"),
            "(&(objectClass=user)(sAMAccountName=alice))"
        );
        assert_eq!(
            in_chain("cn=Team (all),dc=x"),
            "(|(memberOf=cn=Team\\20\\28all\\29,dc=x)(memberOf:1.2.840.113556.1.4.1941:=cn=Team\\20\\28all\\29,dc=x))"
        );
        let f = parse(&group_has("uid=a*,dc=x", "a*")).unwrap();
        assert_eq!(
            f,
            Filter::Or(vec![
                eq("member", "uid=a*,dc=x"),
                eq("uniqueMember", "uid=a*,dc=x"),
                eq("memberUid", "a*")
            ])
        );
        let f = parse(&accounts_in_chain(&["a", "b"], "cn=g,dc=x")).unwrap();
        assert_eq!(
            f,
            Filter::And(vec![
                eq("objectClass", "user"),
                Filter::Or(vec![eq("sAMAccountName", "a"), eq("sAMAccountName", "b")]),
                Filter::Or(vec![
                    eq("memberOf", "cn=g,dc=x"),
                    Filter::Extensible(format!("memberOf:{IN_CHAIN}"), b"cn=g,dc=x".to_vec()),
                ]),
            ])
        );
    }

    #[test]
    fn membership_by_dn_or_uid() {
        let g = entry(
            "cn=team,dc=x",
            &[
                ("member", "UID=Alice, ou=people,dc=x"),
                ("uniqueMember", "uid=bob,ou=people,dc=x#'0101'B"),
                ("memberUid", "carol"),
            ],
        );
        let m = Members::from_group(&g);
        assert!(m.contains("uid=alice,ou=people,dc=x", "alice"));
        assert!(m.contains("uid=bob,ou=people,dc=x", "bob"));
        assert!(m.contains("uid=carol,ou=people,dc=x", "carol"));
        assert!(!m.contains("uid=dave,ou=people,dc=x", "dave"));
        // A DN that only looks like a member's name is not one.
        assert!(!m.contains("uid=alice,ou=people,dc=y", "alice2"));
    }

    #[test]
    fn found_per_name() {
        let now = SystemTime::now();
        let entries = vec![
            entry(
                "uid=alice,ou=p,dc=x",
                &[("uid", "alice"), ("uidNumber", "70001")],
            ),
            entry("uid=bob,ou=p,dc=x", &[("uid", "Bob")]),
            entry("uid=twin,ou=p,dc=x", &[("uid", "twin")]),
            entry("uid=twin,ou=q,dc=x", &[("uid", "twin")]),
            entry(
                "uid=dave,ou=p,dc=x",
                &[("uid", "dave"), ("pwdAccountLockedTime", "000001010000Z")],
            ),
        ];
        let members = Members::from_group(&entry(
            "cn=team",
            &[("member", "uid=alice,ou=p,dc=x"), ("memberUid", "dave")],
        ));
        let supers = Members::from_accounts(&entries[1..2]);
        let names: Vec<String> = ["alice", "bob", "twin", "nobody", "dave", "alice", ""]
            .map(String::from)
            .to_vec();
        let f = found(
            Flavour::OpenLdap,
            &names,
            &entries,
            &members,
            Some(&supers),
            now,
        );
        assert_eq!(f.len(), names.len());
        let Found::Account(a) = &f[0].1 else {
            panic!("{f:?}")
        };
        assert!(a.in_members_group && !a.in_superusers_group && a.disabled.is_none());
        assert_eq!(a.uid_number, Some(70_001));
        let Found::Account(b) = &f[1].1 else { panic!() };
        assert!(!b.in_members_group && b.in_superusers_group);
        assert_eq!(f[2].1, Found::Ambiguous { entries: 2 });
        assert_eq!(f[3].1, Found::NoAccount);
        let Found::Account(d) = &f[4].1 else { panic!() };
        assert!(d.in_members_group && d.disabled.is_some());
        assert_eq!(f[5], f[0]);
        assert_eq!(f[6].1, Found::NoAccount);
    }

    proptest! {
        #[test]
        fn one_equality_per_name(names in proptest::collection::vec("\\PC{1,12}|[*()\\\\=|&!]{1,6}", 1..40)) {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            for flavour in [Flavour::OpenLdap, Flavour::ActiveDirectory] {
                let attr = flavour.name_attribute();
                let any = Filter::Or(names.iter().map(|n| eq(attr, n)).collect());
                let want = match flavour {
                    Flavour::OpenLdap => any,
                    Flavour::ActiveDirectory => Filter::And(vec![eq("objectClass", "user"), any]),
                };
                prop_assert_eq!(parse(&accounts_filter(flavour, &refs)), Some(want));
                let one = parse(&account_filter(flavour, &names[0])).unwrap();
                let leaf = match one {
                    Filter::And(ref l) => l[l.len() - 1].clone(),
                    f => f,
                };
                prop_assert_eq!(leaf, eq(attr, &names[0]));
            }
        }

        #[test]
        fn group_filters_hold_any_dn(dn in "\\PC{0,40}", name in "\\PC{1,12}") {
            prop_assert_eq!(
                parse(&group_has(&dn, &name)),
                Some(Filter::Or(vec![eq("member", &dn), eq("uniqueMember", &dn), eq("memberUid", &name)]))
            );
            prop_assert_eq!(
                parse(&in_chain(&dn)),
                Some(Filter::Or(vec![
                    eq("memberOf", &dn),
                    Filter::Extensible(format!("memberOf:{IN_CHAIN}"), dn.as_bytes().to_vec()),
                ]))
            );
        }
    }
}

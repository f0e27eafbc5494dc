//! The tree one client sees, built from the directory for each
//! operation (so a change of directory shows at the next one):
//!
//! ```text
//! BASE                         top, dcObject, organization
//! ├── ou=people                top, organizationalUnit
//! │   └── uid=NAME             top, account, posixAccount, ldapPublicKey
//! └── ou=groups                top, organizationalUnit
//!     └── cn=NAME              top, posixGroup (memberUid: only users it sees)
//! ```
//!
//! and the root DSE (the empty name), which says what the server does.

use crate::dn::Dn;
use crate::eval::{self, Entry, Tri};
use crate::spec::{Directory, canonical_ip};
use ldap3_proto::proto::{LdapFilter, LdapSearchScope};
use std::net::IpAddr;

/// The simple paged results control (RFC 2696).
pub const OID_PAGED: &str = "1.2.840.113556.1.4.319";
/// StartTLS (RFC 4511 §4.14).
pub const OID_STARTTLS: &str = "1.3.6.1.4.1.1466.20037";
/// Who am I? (RFC 4532).
pub const OID_WHOAMI: &str = "1.3.6.1.4.1.4203.1.11.3";
/// The notice of disconnection (RFC 4511 §4.4.1).
pub const OID_NOTICE_OF_DISCONNECTION: &str = "1.3.6.1.4.1.1466.20036";

/// One client's tree: entries in tree order (each after its parent).
pub struct Tree {
    entries: Vec<(Dn, Entry)>,
}

/// Why a search found no base.
#[derive(Debug, PartialEq, Eq)]
pub struct NoSuchObject {
    /// The longest existing ancestor of the base (RFC 4511 §4.1.9).
    pub matched: String,
}

/// Why a search is not run.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its base is not in the tree.
    NoBase(NoSuchObject),
    /// Its filter over the entries in its scope is more work than
    /// [`MAX_SEARCH_WORK`].
    TooCostly,
}

/// The most work one search may take: the entries in its scope times its
/// filter's size ([`filter_cost`]). A workload's searches run on the
/// server's threads, which every workload shares: a filter of thousands
/// of substring items over every entry, pipelined on a few connections,
/// would keep the host's cores busy. What directory clients send (a few
/// items) over a team's entries is far below.
pub const MAX_SEARCH_WORK: usize = 200_000;

/// A filter's size: its items, a substring item counting each of its
/// parts, and every item its assertion's bytes too (one more per 64: a
/// value is folded and compared against every value of every entry, so a
/// 30 KB substring costs what hundreds of small items do).
pub fn filter_cost(f: &LdapFilter) -> usize {
    let bytes = |n: usize| n / 64;
    match f {
        LdapFilter::And(fs) | LdapFilter::Or(fs) => {
            fs.iter().map(filter_cost).fold(1, usize::saturating_add)
        }
        LdapFilter::Not(f) => filter_cost(f).saturating_add(1),
        LdapFilter::Substring(_, sub) => {
            let parts = sub.initial.iter().chain(&sub.any).chain(&sub.final_);
            parts.fold(1, |c, p| c.saturating_add(1 + bytes(p.len())))
        }
        LdapFilter::Equality(_, v)
        | LdapFilter::Approx(_, v)
        | LdapFilter::GreaterOrEqual(_, v)
        | LdapFilter::LessOrEqual(_, v) => 1 + bytes(v.len()),
        _ => 1,
    }
}

fn s(v: &str) -> Vec<String> {
    vec![v.to_string()]
}

/// The root DSE for a tree under `base`.
pub fn root_dse(base: &Dn) -> Entry {
    Entry::new(String::new())
        .with("objectClass", s("top"))
        .with("namingContexts", s(&base.to_string()))
        .with("supportedLDAPVersion", s("3"))
        .with("supportedControl", s(OID_PAGED))
        .with(
            "supportedExtension",
            vec![OID_STARTTLS.into(), OID_WHOAMI.into()],
        )
        .with("vendorName", s("coffre"))
}

impl Directory {
    /// The tree a connection from `ip` sees (`None`: no such client),
    /// as built when the directory came.
    pub fn tree(&self, ip: IpAddr) -> Option<std::sync::Arc<Tree>> {
        self.trees.get(&canonical_ip(ip)).cloned()
    }

    /// Builds the tree a connection from `ip` sees.
    pub(crate) fn build_tree(&self, ip: IpAddr) -> Option<Tree> {
        let view = self.views.get(&canonical_ip(ip))?;
        let base = &self.base;
        let first = base.0.first().map(|r| r.value.clone()).unwrap_or_default();
        let mut entries = vec![(
            base.clone(),
            Entry::new(base.to_string())
                .with(
                    "objectClass",
                    ["top", "dcObject", "organization"]
                        .map(String::from)
                        .to_vec(),
                )
                .with("dc", s(&first))
                .with("o", s(&first)),
        )];
        let ou = |name: &str| {
            let dn = base.child("ou", name);
            let e = Entry::new(dn.to_string())
                .with(
                    "objectClass",
                    ["top", "organizationalUnit"].map(String::from).to_vec(),
                )
                .with("ou", s(name));
            (dn, e)
        };
        let (people, pe) = ou("people");
        entries.push((people.clone(), pe));
        for name in &view.users {
            let Some(u) = self.accounts.get(name) else {
                continue;
            };
            let dn = people.child("uid", &u.name);
            let mut e = Entry::new(dn.to_string())
                .with(
                    "objectClass",
                    ["top", "account", "posixAccount", "ldapPublicKey"]
                        .map(String::from)
                        .to_vec(),
                )
                .with("uid", s(&u.name))
                .with("cn", s(&u.name))
                .with("uidNumber", s(&u.uid.to_string()))
                .with("gidNumber", s(&u.gid.to_string()))
                .with("homeDirectory", s(&u.home))
                .with("loginShell", s(&u.shell));
            if !u.gecos.is_empty() {
                e = e.with("gecos", s(&u.gecos));
            }
            e = e.with("sshPublicKey", u.ssh_keys.clone());
            entries.push((dn, e));
        }
        let (groups, ge) = ou("groups");
        entries.push((groups.clone(), ge));
        for name in &view.groups {
            let Some(g) = self.groups.get(name) else {
                continue;
            };
            let dn = groups.child("cn", &g.name);
            let mut members: Vec<String> = g
                .members
                .iter()
                .filter(|m| view.users.contains(*m))
                .cloned()
                .collect();
            members.sort();
            members.dedup();
            let e = Entry::new(dn.to_string())
                .with(
                    "objectClass",
                    ["top", "posixGroup"].map(String::from).to_vec(),
                )
                .with("cn", s(&g.name))
                .with("gidNumber", s(&g.gid.to_string()))
                .with("memberUid", members);
            entries.push((dn, e));
        }
        Some(Tree { entries })
    }

    /// The name of user `name` if `ip` sees it, from a bind DN:
    /// `uid=NAME,ou=people,BASE` however spelled.
    pub fn bind_name(&self, dn: &Dn) -> Option<String> {
        let n = self.base.0.len();
        if dn.0.len() != n + 2 || !dn.is_within(&self.base) {
            return None;
        }
        let (leaf, ou) = (&dn.0[0], &dn.0[1]);
        if ou.attr != "ou" || ou.norm != "people" || leaf.attr != "uid" {
            return None;
        }
        Some(leaf.norm.clone())
    }

    /// Whether a connection from `ip` sees user `name`.
    pub fn sees(&self, ip: IpAddr, name: &str) -> bool {
        self.views
            .get(&canonical_ip(ip))
            .is_some_and(|v| v.users.contains(name))
    }

    /// The workload at `ip` (for the events).
    pub fn workload(&self, ip: IpAddr) -> String {
        self.views
            .get(&canonical_ip(ip))
            .map(|v| v.workload.clone())
            .unwrap_or_default()
    }
}

impl Tree {
    /// The entry named `dn`.
    pub fn get(&self, dn: &Dn) -> Option<&Entry> {
        self.entries.iter().find(|(d, _)| d == dn).map(|(_, e)| e)
    }

    /// The names of the entries in `scope` of `base` that `filter`
    /// matches, in tree order, or why there are none.
    pub fn search(
        &self,
        base: &Dn,
        scope: &LdapSearchScope,
        filter: &LdapFilter,
    ) -> Result<Vec<&Entry>, Refused> {
        if self.get(base).is_none() {
            let matched = self
                .entries
                .iter()
                .filter(|(d, _)| base.is_within(d))
                .max_by_key(|(d, _)| d.0.len())
                .map(|(d, _)| d.to_string())
                .unwrap_or_default();
            return Err(Refused::NoBase(NoSuchObject { matched }));
        }
        let depth = base.0.len();
        let in_scope = |d: &Dn| {
            d.is_within(base)
                && match scope {
                    LdapSearchScope::Base => d.0.len() == depth,
                    LdapSearchScope::OneLevel => d.0.len() == depth + 1,
                    LdapSearchScope::Subtree => true,
                    LdapSearchScope::Children => d.0.len() > depth,
                }
        };
        let n = self.entries.iter().filter(|(d, _)| in_scope(d)).count();
        if n.saturating_mul(filter_cost(filter)) > MAX_SEARCH_WORK {
            return Err(Refused::TooCostly);
        }
        Ok(self
            .entries
            .iter()
            .filter(|(d, _)| in_scope(d))
            .filter(|(_, e)| eval::eval(filter, e) == Tri::True)
            .map(|(_, e)| e)
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::tests::user;
    use crate::spec::{Client, DirectorySpec, Group};
    use ldap3_proto::parse_ldap_filter_str;

    pub fn directory() -> Directory {
        Directory::new(spec()).unwrap().0
    }

    /// alice and bob seen from 10.9.0.10, carol from 10.9.0.11.
    pub fn spec() -> DirectorySpec {
        let mut alice = user("alice", 5301);
        alice.ssh_keys = vec!["ssh-ed25519 AAAA a".into(), "ssh-rsa BBBB b".into()];
        alice.gecos = "Alice".into();
        DirectorySpec {
            base: "dc=team,dc=coffre".into(),
            users: vec![alice, user("bob", 5302), user("carol", 5303)],
            groups: vec![
                Group {
                    name: "team".into(),
                    gid: 5300,
                    members: vec!["alice".into(), "bob".into(), "carol".into()],
                },
                Group {
                    name: "ops".into(),
                    gid: 5310,
                    members: vec!["carol".into()],
                },
            ],
            clients: vec![
                Client {
                    address: "10.9.0.10".parse().unwrap(),
                    workload: "vm1".into(),
                    users: vec!["alice".into(), "bob".into()],
                    groups: vec!["team".into()],
                },
                Client {
                    address: "10.9.0.11".parse().unwrap(),
                    workload: "vm2".into(),
                    users: vec!["carol".into()],
                    groups: vec!["team".into(), "ops".into()],
                },
            ],
        }
    }

    fn names(t: &Tree, base: &str, scope: LdapSearchScope, f: &str) -> Vec<String> {
        t.search(
            &Dn::parse(base).unwrap(),
            &scope,
            &parse_ldap_filter_str(f).unwrap(),
        )
        .unwrap()
        .into_iter()
        .map(|e| e.dn.clone())
        .collect()
    }

    #[test]
    fn each_client_sees_its_own() {
        let d = directory();
        let t1 = d.tree("10.9.0.10".parse().unwrap()).unwrap();
        assert_eq!(
            names(
                &t1,
                "dc=team,dc=coffre",
                LdapSearchScope::Subtree,
                "(objectClass=posixAccount)"
            ),
            [
                "uid=alice,ou=people,dc=team,dc=coffre",
                "uid=bob,ou=people,dc=team,dc=coffre"
            ]
        );
        let team = t1
            .get(&Dn::parse("cn=team,ou=groups,dc=team,dc=coffre").unwrap())
            .unwrap();
        assert_eq!(
            team.attrs.iter().find(|a| a.0 == "memberUid").unwrap().1,
            ["alice", "bob"]
        );
        let t2 = d.tree("10.9.0.11".parse().unwrap()).unwrap();
        assert_eq!(
            names(
                &t2,
                "ou=people,dc=team,dc=coffre",
                LdapSearchScope::OneLevel,
                "(uid=*)"
            ),
            ["uid=carol,ou=people,dc=team,dc=coffre"]
        );
        assert!(
            t2.get(&Dn::parse("uid=alice,ou=people,dc=team,dc=coffre").unwrap())
                .is_none()
        );
        assert!(d.tree("10.9.0.12".parse().unwrap()).is_none());
    }

    #[test]
    fn scopes_and_missing_bases() {
        let t = directory().tree("10.9.0.10".parse().unwrap()).unwrap();
        let all = "(objectClass=*)";
        assert_eq!(
            names(&t, "dc=team,dc=coffre", LdapSearchScope::Base, all).len(),
            1
        );
        assert_eq!(
            names(&t, "dc=team,dc=coffre", LdapSearchScope::OneLevel, all).len(),
            2
        );
        assert_eq!(
            names(&t, "DC=Team, DC=Coffre", LdapSearchScope::Subtree, all).len(),
            6
        );
        assert_eq!(
            names(&t, "dc=team,dc=coffre", LdapSearchScope::Children, all).len(),
            5
        );
        let f = parse_ldap_filter_str(all).unwrap();
        let missing = Dn::parse("uid=zed,ou=people,dc=team,dc=coffre").unwrap();
        let matched = |dn: &Dn| match t.search(dn, &LdapSearchScope::Base, &f) {
            Err(Refused::NoBase(n)) => n.matched,
            other => panic!("{:?}", other.map(|v| v.len())),
        };
        assert_eq!(matched(&missing), "ou=people,dc=team,dc=coffre");
        let outside = Dn::parse("dc=other").unwrap();
        assert_eq!(matched(&outside), "");
    }

    /// A filter whose work over the entries in scope passes the bound is
    /// refused before any is evaluated; the same over one entry, or a
    /// usual filter over all, runs.
    #[test]
    fn a_search_too_costly_is_refused() {
        let d = directory();
        let t = d.tree("10.9.0.10".parse().unwrap()).unwrap();
        let big = format!("(|{})", "(cn=*x*y*)".repeat(MAX_SEARCH_WORK / 4));
        let f = parse_ldap_filter_str(&big).unwrap();
        assert!(filter_cost(&f) > MAX_SEARCH_WORK / 2);
        let base = Dn::parse("dc=team,dc=coffre").unwrap();
        assert_eq!(
            t.search(&base, &LdapSearchScope::Subtree, &f)
                .map(|v| v.len()),
            Err(Refused::TooCostly)
        );
        assert!(t.search(&base, &LdapSearchScope::Base, &f).is_ok());
        let usual = parse_ldap_filter_str("(&(objectClass=posixAccount)(uid=alice))").unwrap();
        assert_eq!(filter_cost(&usual), 3);
        assert!(t.search(&base, &LdapSearchScope::Subtree, &usual).is_ok());
        // A few items, each carrying a long value, cost what many small
        // ones do.
        let long = "x".repeat(30_000);
        let f = parse_ldap_filter_str(&format!("(|(cn=*{long}*)(gecos=*{long}*))")).unwrap();
        assert!(filter_cost(&f) > 900, "{}", filter_cost(&f));
    }

    #[test]
    fn bind_names() {
        let d = directory();
        let n = |s: &str| d.bind_name(&Dn::parse(s).unwrap());
        assert_eq!(
            n("uid=alice,ou=people,dc=team,dc=coffre").as_deref(),
            Some("alice")
        );
        assert_eq!(
            n("UID=Alice , OU=People,DC=team,dc=COFFRE").as_deref(),
            Some("alice")
        );
        assert_eq!(n("cn=alice,ou=people,dc=team,dc=coffre"), None);
        assert_eq!(n("uid=alice,ou=groups,dc=team,dc=coffre"), None);
        assert_eq!(n("uid=alice,ou=people,dc=other,dc=coffre"), None);
        assert_eq!(n("uid=alice,dc=team,dc=coffre"), None);
        assert!(d.sees("10.9.0.10".parse().unwrap(), "alice"));
        assert!(!d.sees("10.9.0.11".parse().unwrap(), "alice"));
    }
}

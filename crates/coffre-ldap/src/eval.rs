//! Search filters against entries (RFC 4511 §4.5.1.7), pure: no I/O, no
//! state, so that it can be tested on its own.
//!
//! Filters have three values: an item whose attribute type or matching
//! rule the server does not know is *Undefined*, not FALSE, and `!`
//! keeps it Undefined, so `(!(foo=x))` does not return every entry. An
//! entry is returned only when the whole filter is TRUE.
//!
//! Matching follows the schema of the attributes served: integers
//! (`uidNumber`, `gidNumber`) by value, `sshPublicKey` exactly, every
//! other attribute caseIgnore. Approximate match is equality; extensible
//! match is Undefined (we implement no matching rule by OID).

use crate::dn::fold;
use ldap3_proto::proto::{LdapFilter, LdapPartialAttribute, LdapSubstringFilter};

/// A filter's truth value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tri {
    /// Matches.
    True,
    /// Does not match.
    False,
    /// Cannot be decided (unknown attribute, no such matching rule).
    Undefined,
}

impl Tri {
    fn not(self) -> Tri {
        match self {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Undefined => Tri::Undefined,
        }
    }
    fn of(b: bool) -> Tri {
        if b { Tri::True } else { Tri::False }
    }
}

/// How an attribute's values compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// caseIgnoreMatch, caseIgnoreSubstringsMatch, caseIgnoreOrderingMatch.
    CaseIgnore,
    /// Exact bytes (octetStringMatch).
    CaseExact,
    /// integerMatch, integerOrderingMatch; no substrings.
    Integer,
}

/// The attribute types this server knows: canonical name (lowercase),
/// the name it is served under, and its syntax.
const SCHEMA: &[(&str, &str, Syntax)] = &[
    ("objectclass", "objectClass", Syntax::CaseIgnore),
    ("dc", "dc", Syntax::CaseIgnore),
    ("o", "o", Syntax::CaseIgnore),
    ("ou", "ou", Syntax::CaseIgnore),
    ("uid", "uid", Syntax::CaseIgnore),
    ("cn", "cn", Syntax::CaseIgnore),
    ("uidnumber", "uidNumber", Syntax::Integer),
    ("gidnumber", "gidNumber", Syntax::Integer),
    ("homedirectory", "homeDirectory", Syntax::CaseIgnore),
    ("loginshell", "loginShell", Syntax::CaseIgnore),
    ("gecos", "gecos", Syntax::CaseIgnore),
    ("sshpublickey", "sshPublicKey", Syntax::CaseExact),
    ("memberuid", "memberUid", Syntax::CaseIgnore),
    ("userpassword", "userPassword", Syntax::CaseExact),
    ("description", "description", Syntax::CaseIgnore),
    ("namingcontexts", "namingContexts", Syntax::CaseIgnore),
    (
        "supportedldapversion",
        "supportedLDAPVersion",
        Syntax::Integer,
    ),
    ("supportedcontrol", "supportedControl", Syntax::CaseIgnore),
    (
        "supportedextension",
        "supportedExtension",
        Syntax::CaseIgnore,
    ),
    ("vendorname", "vendorName", Syntax::CaseIgnore),
];

/// The canonical (lowercase) name and syntax of an attribute
/// description, or `None` for one this server does not know (options
/// such as `;binary` included: none of ours has any).
pub fn attribute(desc: &str) -> Option<(&'static str, &'static str, Syntax)> {
    // The common case without an allocation: a name of ours, any case.
    let t = desc.trim();
    if let Some(&(c, n, s)) = SCHEMA.iter().find(|(c, _, _)| c.eq_ignore_ascii_case(t)) {
        return Some((c, n, s));
    }
    let canon = crate::dn::canonical_attr(desc)?;
    SCHEMA
        .iter()
        .find(|(c, _, _)| *c == canon)
        .map(|&(c, n, s)| (c, n, s))
}

/// An entry as served: its name and its attributes (served names, in
/// order, values as text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The distinguished name, as sent.
    pub dn: String,
    /// `(served name, values)`; each name once.
    pub attrs: Vec<(&'static str, Vec<String>)>,
}

impl Entry {
    /// An entry with no attribute yet.
    pub fn new(dn: String) -> Self {
        Self {
            dn,
            attrs: Vec::new(),
        }
    }

    /// Adds `name` with `values` (nothing if there are none).
    pub fn with(mut self, name: &'static str, values: Vec<String>) -> Self {
        if !values.is_empty() {
            self.attrs.push((name, values));
        }
        self
    }

    fn values(&self, canon: &str) -> Option<&[String]> {
        self.attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(canon))
            .map(|(_, v)| v.as_slice())
    }
}

/// How `filter` evaluates on `entry`.
pub fn eval(filter: &LdapFilter, entry: &Entry) -> Tri {
    match filter {
        LdapFilter::And(fs) => {
            let mut out = Tri::True;
            for f in fs {
                match eval(f, entry) {
                    Tri::False => return Tri::False,
                    Tri::Undefined => out = Tri::Undefined,
                    Tri::True => {}
                }
            }
            out
        }
        LdapFilter::Or(fs) => {
            let mut out = Tri::False;
            for f in fs {
                match eval(f, entry) {
                    Tri::True => return Tri::True,
                    Tri::Undefined => out = Tri::Undefined,
                    Tri::False => {}
                }
            }
            out
        }
        LdapFilter::Not(f) => eval(f, entry).not(),
        LdapFilter::Present(a) => match attribute(a) {
            Some((c, _, _)) => Tri::of(entry.values(c).is_some()),
            None => Tri::False,
        },
        LdapFilter::Equality(a, v) | LdapFilter::Approx(a, v) => compare(entry, a, v, equal),
        LdapFilter::GreaterOrEqual(a, v) => compare(entry, a, v, |s, x, y| {
            order(s, x, y).map(|o| o != std::cmp::Ordering::Less)
        }),
        LdapFilter::LessOrEqual(a, v) => compare(entry, a, v, |s, x, y| {
            order(s, x, y).map(|o| o != std::cmp::Ordering::Greater)
        }),
        LdapFilter::Substring(a, sub) => compare(entry, a, "", |s, x, _| substrings(s, x, sub)),
        LdapFilter::Extensible(_) => Tri::Undefined,
    }
}

/// An assertion on attribute `a`: Undefined if the attribute or its rule
/// is unknown or the assertion value is not of its syntax; otherwise TRUE
/// if one of the entry's values matches.
fn compare(
    entry: &Entry,
    a: &str,
    v: &str,
    rule: impl Fn(Syntax, &str, &str) -> Option<bool>,
) -> Tri {
    let Some((canon, _, syntax)) = attribute(a) else {
        return Tri::Undefined;
    };
    if syntax == Syntax::Integer && !v.is_empty() && parse_int(v).is_none() {
        return Tri::Undefined;
    }
    let Some(values) = entry.values(canon) else {
        // A known attribute the entry lacks still needs a rule to say
        // FALSE: substrings of an integer stay Undefined.
        return match rule(syntax, "0", v) {
            Some(_) => Tri::False,
            None => Tri::Undefined,
        };
    };
    let mut out = Tri::False;
    for x in values {
        match rule(syntax, x, v) {
            Some(true) => return Tri::True,
            Some(false) => {}
            None => out = Tri::Undefined,
        }
    }
    out
}

fn parse_int(s: &str) -> Option<i128> {
    let t = s.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    if digits.is_empty() || digits.len() > 30 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// Whether `t` folds to itself but for ASCII case: ASCII, no space at
/// either end, no two in a row.
fn plain(t: &str) -> bool {
    t.is_ascii() && !t.starts_with(' ') && !t.ends_with(' ') && !t.contains("  ")
}

/// caseIgnore equality; without an allocation in the common case (every
/// value this server holds is plain ASCII).
fn fold_eq(x: &str, v: &str) -> bool {
    if plain(x) && plain(v) {
        x.eq_ignore_ascii_case(v)
    } else {
        fold(x) == fold(v)
    }
}

fn equal(s: Syntax, x: &str, v: &str) -> Option<bool> {
    match s {
        Syntax::CaseIgnore => Some(fold_eq(x, v)),
        Syntax::CaseExact => Some(x == v),
        Syntax::Integer => Some(parse_int(x)? == parse_int(v)?),
    }
}

fn order(s: Syntax, x: &str, v: &str) -> Option<std::cmp::Ordering> {
    match s {
        Syntax::CaseIgnore => Some(fold(x).cmp(&fold(v))),
        // No ordering rule for octet strings in this schema.
        Syntax::CaseExact => None,
        Syntax::Integer => Some(parse_int(x)?.cmp(&parse_int(v)?)),
    }
}

fn substrings(s: Syntax, x: &str, sub: &LdapSubstringFilter) -> Option<bool> {
    let norm = |t: &str| match s {
        Syntax::CaseIgnore => Some(fold(t)),
        Syntax::CaseExact => Some(t.to_string()),
        Syntax::Integer => None,
    };
    let value = norm(x)?;
    let mut rest: &str = &value;
    if let Some(i) = &sub.initial {
        let i = norm(i)?;
        match rest.strip_prefix(i.as_str()) {
            Some(r) => rest = r,
            None => return Some(false),
        }
    }
    let fin = match &sub.final_ {
        Some(f) => Some(norm(f)?),
        None => None,
    };
    for a in &sub.any {
        let a = norm(a)?;
        match rest.find(a.as_str()) {
            Some(at) => rest = &rest[at + a.len()..],
            None => return Some(false),
        }
    }
    Some(match fin {
        Some(f) => rest.ends_with(f.as_str()),
        None => true,
    })
}

/// Which attributes a search asked for (RFC 4511 §4.5.1.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    all_user: bool,
    all_operational: bool,
    named: Vec<&'static str>,
}

impl Selection {
    /// From the request's list: empty or `*` is every user attribute,
    /// `+` every operational one, `1.1` alone none; unknown names are
    /// ignored.
    pub fn new(attrs: &[String]) -> Self {
        let mut s = Selection {
            all_user: attrs.is_empty(),
            all_operational: false,
            named: Vec::new(),
        };
        for a in attrs {
            match a.trim() {
                "*" => s.all_user = true,
                "+" => s.all_operational = true,
                "1.1" => {}
                a => {
                    if let Some((c, _, _)) = attribute(a)
                        && !s.named.contains(&c)
                    {
                        s.named.push(c);
                    }
                }
            }
        }
        s
    }

    /// The attributes of `entry` to send. `operational`: the entry's
    /// attributes are all operational (the root DSE's), sent for `+`, by
    /// name, and (as most servers do, for clients that ask for nothing
    /// in particular) for `*`.
    pub fn apply(
        &self,
        entry: &Entry,
        operational: bool,
        types_only: bool,
    ) -> Vec<LdapPartialAttribute> {
        entry
            .attrs
            .iter()
            .filter(|(n, _)| {
                self.named.iter().any(|c| n.eq_ignore_ascii_case(c))
                    || self.all_user
                    || (operational && self.all_operational)
            })
            .map(|(n, v)| LdapPartialAttribute {
                atype: (*n).to_string(),
                vals: if types_only {
                    Vec::new()
                } else {
                    v.iter().map(|s| s.as_bytes().to_vec()).collect()
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3_proto::parse_ldap_filter_str;
    use proptest::prelude::*;

    fn alice() -> Entry {
        Entry::new("uid=alice,ou=people,dc=team,dc=coffre".into())
            .with(
                "objectClass",
                ["top", "account", "posixAccount", "ldapPublicKey"]
                    .map(String::from)
                    .to_vec(),
            )
            .with("uid", vec!["alice".into()])
            .with("cn", vec!["alice".into()])
            .with("uidNumber", vec!["5301".into()])
            .with("gidNumber", vec!["5300".into()])
            .with("homeDirectory", vec!["/home/Alice".into()])
            .with("gecos", vec!["Alice  Liddell".into()])
            .with("sshPublicKey", vec!["ssh-ed25519 AAAAC3Nz alice@x".into()])
    }

    fn f(s: &str) -> LdapFilter {
        parse_ldap_filter_str(s).unwrap()
    }

    fn ev(s: &str) -> Tri {
        eval(&f(s), &alice())
    }

    #[test]
    fn equality_follows_each_attributes_rule() {
        assert_eq!(ev("(uid=ALICE)"), Tri::True);
        assert_eq!(ev("(UID=alice)"), Tri::True);
        assert_eq!(ev("(objectclass=POSIXACCOUNT)"), Tri::True);
        let eq = |a: &str, v: &str| eval(&LdapFilter::Equality(a.into(), v.into()), &alice());
        assert_eq!(eq("gecos", " alice   LIDDELL"), Tri::True, "spaces fold");
        assert_eq!(ev("(uidNumber=05301)"), Tri::True, "integers by value");
        assert_eq!(ev("(uidNumber=5302)"), Tri::False);
        assert_eq!(ev("(uidNumber=abc)"), Tri::Undefined);
        assert_eq!(
            eq("sshPublicKey", "ssh-ed25519 AAAAC3Nz alice@x"),
            Tri::True
        );
        assert_eq!(
            eq("sshPublicKey", "ssh-ed25519 aaaac3nz alice@x"),
            Tri::False
        );
        assert_eq!(ev("(loginShell=/bin/sh)"), Tri::False, "known, absent");
        assert_eq!(ev("(frobnicate=1)"), Tri::Undefined, "unknown");
        assert_eq!(ev("(uid~=alice)"), Tri::True);
    }

    #[test]
    fn three_valued_logic() {
        assert_eq!(ev("(!(frobnicate=1))"), Tri::Undefined);
        assert_eq!(ev("(|(frobnicate=1)(uid=alice))"), Tri::True);
        assert_eq!(ev("(|(frobnicate=1)(uid=bob))"), Tri::Undefined);
        assert_eq!(ev("(&(frobnicate=1)(uid=bob))"), Tri::False);
        assert_eq!(ev("(&(frobnicate=1)(uid=alice))"), Tri::Undefined);
        assert_eq!(ev("(!(uid=bob))"), Tri::True);
        assert_eq!(eval(&LdapFilter::And(vec![]), &alice()), Tri::True);
        assert_eq!(eval(&LdapFilter::Or(vec![]), &alice()), Tri::False);
    }

    #[test]
    fn presence_ordering_substrings() {
        assert_eq!(ev("(objectClass=*)"), Tri::True);
        assert_eq!(ev("(loginShell=*)"), Tri::False);
        assert_eq!(ev("(frobnicate=*)"), Tri::False);
        assert_eq!(ev("(uidNumber>=5000)"), Tri::True);
        assert_eq!(ev("(uidNumber>=10000)"), Tri::False, "not as text");
        assert_eq!(ev("(uidNumber<=10000)"), Tri::True);
        assert_eq!(ev("(uid>=b)"), Tri::False);
        assert_eq!(ev("(uid<=B)"), Tri::True);
        assert_eq!(ev("(sshPublicKey>=a)"), Tri::Undefined);
        assert_eq!(ev("(uid=AL*)"), Tri::True);
        assert_eq!(ev("(uid=*IC*)"), Tri::True);
        assert_eq!(ev("(uid=a*i*e)"), Tri::True);
        assert_eq!(ev("(uid=a*e*i)"), Tri::False);
        assert_eq!(ev("(uid=ali*ic*)"), Tri::False, "pieces do not overlap");
        assert_eq!(ev("(homeDirectory=/home/a*)"), Tri::True);
        assert_eq!(ev("(uidNumber=53*)"), Tri::Undefined, "no substrings rule");
        assert_eq!(ev("(sshPublicKey=ssh-ed25519*)"), Tri::True);
        assert_eq!(ev("(sshPublicKey=SSH*)"), Tri::False);
    }

    #[test]
    fn extensible_match_is_undefined() {
        assert_eq!(ev("(uid:caseExactMatch:=alice)"), Tri::Undefined);
    }

    #[test]
    fn selections() {
        let e = alice();
        let names = |sel: &[&str], op: bool| {
            Selection::new(&sel.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .apply(&e, op, false)
                .into_iter()
                .map(|a| a.atype)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&[], false).len(), e.attrs.len());
        assert_eq!(names(&["*"], false).len(), e.attrs.len());
        assert!(names(&["1.1"], false).is_empty());
        assert_eq!(names(&["UIDNUMBER", "nothing"], false), vec!["uidNumber"]);
        assert_eq!(names(&["1.1", "uid"], false), vec!["uid"]);
        assert!(
            names(&["+"], false).is_empty(),
            "users have no operational attribute"
        );
        assert_eq!(names(&["+"], true).len(), e.attrs.len());
        let typed = Selection::new(&[]).apply(&e, false, true);
        assert!(typed.iter().all(|a| a.vals.is_empty()));
    }

    fn arb_filter() -> impl Strategy<Value = LdapFilter> {
        let attr = prop_oneof![
            Just("uid".to_string()),
            Just("uidNumber".to_string()),
            Just("sshPublicKey".to_string()),
            Just("loginShell".to_string()),
            Just("frob".to_string()),
        ];
        let val = prop_oneof![
            Just("alice".to_string()),
            Just("5301".to_string()),
            Just("x".to_string())
        ];
        let leaf = prop_oneof![
            (attr.clone(), val.clone()).prop_map(|(a, v)| LdapFilter::Equality(a, v)),
            (attr.clone(), val.clone()).prop_map(|(a, v)| LdapFilter::GreaterOrEqual(a, v)),
            (attr.clone(), val).prop_map(|(a, v)| LdapFilter::LessOrEqual(a, v)),
            attr.prop_map(LdapFilter::Present),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(LdapFilter::And),
                proptest::collection::vec(inner.clone(), 0..4).prop_map(LdapFilter::Or),
                inner.prop_map(|f| LdapFilter::Not(Box::new(f))),
            ]
        })
    }

    proptest! {
        /// The allocation-free equality is caseIgnore's, spaces and
        /// non-ASCII included.
        #[test]
        fn fold_eq_is_folded_equality(x in "[ aAbBéÉ1]{0,8}", v in "[ aAbBéÉ1]{0,8}") {
            prop_assert_eq!(super::fold_eq(&x, &v), fold(&x) == fold(&v));
            prop_assert!(super::fold_eq(&x, &x.to_uppercase()) || !x.is_ascii());
        }

        /// De Morgan holds in three values, and `!!f` is `f`.
        #[test]
        fn de_morgan(a in arb_filter(), b in arb_filter()) {
            let e = alice();
            let not = |f: LdapFilter| LdapFilter::Not(Box::new(f));
            let lhs = not(LdapFilter::And(vec![a.clone(), b.clone()]));
            let rhs = LdapFilter::Or(vec![not(a.clone()), not(b.clone())]);
            prop_assert_eq!(eval(&lhs, &e), eval(&rhs, &e));
            prop_assert_eq!(eval(&not(not(a.clone())), &e), eval(&a, &e));
        }

        /// `(|f (!f))` is never FALSE, `(&f (!f))` never TRUE.
        #[test]
        fn excluded_middle_in_three_values(a in arb_filter()) {
            let e = alice();
            let n = LdapFilter::Not(Box::new(a.clone()));
            prop_assert_ne!(eval(&LdapFilter::Or(vec![a.clone(), n.clone()]), &e), Tri::False);
            prop_assert_ne!(eval(&LdapFilter::And(vec![a, n]), &e), Tri::True);
        }

        /// A substring filter made of cut pieces of a value matches it,
        /// whatever the case.
        #[test]
        fn cut_values_match_their_substrings(v in "[a-zA-Z0-9 /]{0,20}", cuts in proptest::collection::vec(0usize..20, 0..3)) {
            let e = Entry::new("cn=x".into()).with("gecos", vec![v.clone()]);
            let folded = fold(&v);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(folded.len())).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.iter().chain(std::iter::once(&folded.len())) {
                pieces.push(folded[at..*c].to_uppercase());
                at = *c;
            }
            // Pieces made of spaces only fold differently; skip them.
            prop_assume!(pieces.iter().all(|p| p.trim() == p.as_str() && !p.contains("  ")));
            let sub = LdapSubstringFilter {
                initial: Some(pieces[0].clone()).filter(|p| !p.is_empty()),
                any: pieces.iter().skip(1).take(pieces.len().saturating_sub(2)).filter(|p| !p.is_empty()).cloned().collect(),
                final_: if pieces.len() > 1 { Some(pieces[pieces.len()-1].clone()).filter(|p| !p.is_empty()) } else { None },
            };
            prop_assert_eq!(eval(&LdapFilter::Substring("gecos".into(), sub), &e), Tri::True);
        }
    }
}

//! Distinguished names (RFC 4514), parsed and normalised so that two
//! spellings of one name compare equal: attribute types lowercase with
//! their long names mapped to the short ones (`commonName` → `cn`),
//! values unescaped, trimmed, inner runs of spaces collapsed and
//! lowercased (every naming attribute here is caseIgnore).
//!
//! Multi-valued RDNs (`cn=a+uid=b`) and BER-encoded values (`#04...`)
//! name nothing in this tree; they are refused as a syntax we do not
//! take, which a client sees as invalidDNSyntax.

use std::fmt;

/// One `type=value` pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rdn {
    /// The attribute type, canonical (lowercase, short name).
    pub attr: String,
    /// The value as written, unescaped and trimmed (for display).
    pub value: String,
    /// The value normalised (for comparison).
    pub norm: String,
}

/// A parsed name, most specific RDN first, as written.
#[derive(Clone, Debug, Default)]
pub struct Dn(pub Vec<Rdn>);

impl PartialEq for Dn {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.attr == b.attr && a.norm == b.norm)
    }
}
impl Eq for Dn {}

/// Why a name did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a distinguished name: {0}")]
pub struct DnError(&'static str);

/// The longest name we parse (a tree this shallow needs far less).
pub const MAX_DN_LEN: usize = 1024;

/// The canonical name of an attribute type, or `None` if it is not a
/// valid type name (RFC 4512 `descr` or `numericoid`).
pub fn canonical_attr(t: &str) -> Option<String> {
    let t = t.trim();
    let descr = t.starts_with(|c: char| c.is_ascii_alphabetic())
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let oid = !t.is_empty()
        && t.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !descr && !oid {
        return None;
    }
    let lower = t.to_ascii_lowercase();
    Some(
        match lower.as_str() {
            "commonname" | "2.5.4.3" => "cn",
            "userid" | "0.9.2342.19200300.100.1.1" => "uid",
            "domaincomponent" | "0.9.2342.19200300.100.1.25" => "dc",
            "organizationalunitname" | "2.5.4.11" => "ou",
            "organizationname" | "2.5.4.10" => "o",
            "2.5.4.0" => "objectclass",
            other => other,
        }
        .to_string(),
    )
}

/// caseIgnore normalisation (RFC 4518, simplified to what a directory of
/// POSIX names needs): trimmed, runs of spaces as one, lowercase.
pub fn fold(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for word in v.split(' ').filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

impl Dn {
    /// Parses `s` (the empty string is the root DSE's empty name).
    pub fn parse(s: &str) -> Result<Dn, DnError> {
        if s.len() > MAX_DN_LEN {
            return Err(DnError("too long"));
        }
        if s.trim().is_empty() {
            return Ok(Dn(Vec::new()));
        }
        let mut rdns = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        loop {
            // type
            let start = i;
            while i < b.len() && b[i] != b'=' {
                if matches!(b[i], b',' | b'+' | b'\\') {
                    return Err(DnError("an RDN without '='"));
                }
                i += 1;
            }
            if i == b.len() {
                return Err(DnError("an RDN without '='"));
            }
            let attr = canonical_attr(&s[start..i]).ok_or(DnError("a bad attribute type"))?;
            i += 1;
            // value: bytes until an unescaped ',' (or the end)
            let mut raw = Vec::new();
            // Where trailing spaces stop being trimmable (escaped ones stay).
            let mut keep = 0;
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
            if i < b.len() && b[i] == b'#' {
                return Err(DnError("BER-encoded values are not taken"));
            }
            while i < b.len() && b[i] != b',' {
                match b[i] {
                    b'\\' => {
                        let c = *b.get(i + 1).ok_or(DnError("a trailing '\\'"))?;
                        if let Some(h) = hex_pair(b.get(i + 1..i + 3)) {
                            raw.push(h);
                            i += 3;
                        } else if b" \"#+,;<=>\\".contains(&c) {
                            raw.push(c);
                            i += 2;
                        } else {
                            return Err(DnError("a bad escape"));
                        }
                        keep = raw.len();
                    }
                    b'+' => return Err(DnError("multi-valued RDNs are not taken")),
                    b'"' | b';' | b'<' | b'>' | b'=' | 0 => {
                        return Err(DnError("a character that must be escaped"));
                    }
                    c => {
                        raw.push(c);
                        if c != b' ' {
                            keep = raw.len();
                        }
                        i += 1;
                    }
                }
            }
            raw.truncate(keep);
            let value = String::from_utf8(raw).map_err(|_| DnError("a value that is not UTF-8"))?;
            if value.is_empty() {
                return Err(DnError("an empty value"));
            }
            rdns.push(Rdn {
                norm: fold(&value),
                attr,
                value,
            });
            if i == b.len() {
                break;
            }
            i += 1; // the ','
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
        }
        Ok(Dn(rdns))
    }

    /// The root DSE's name.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `self` is `ancestor` or below it.
    pub fn is_within(&self, ancestor: &Dn) -> bool {
        let (a, s) = (ancestor.0.len(), self.0.len());
        s >= a && Dn(self.0[s - a..].to_vec()) == *ancestor
    }

    /// The parent's name (the root's parent is the root).
    pub fn parent(&self) -> Dn {
        Dn(self.0.iter().skip(1).cloned().collect())
    }

    /// `rdn` under `self`.
    pub fn child(&self, attr: &str, value: &str) -> Dn {
        let mut v = vec![Rdn {
            attr: attr.to_string(),
            value: value.to_string(),
            norm: fold(value),
        }];
        v.extend(self.0.iter().cloned());
        Dn(v)
    }
}

fn hex_pair(b: Option<&[u8]>) -> Option<u8> {
    let b = b?;
    let d = |c: u8| (c as char).to_digit(16);
    let (h, l) = (d(b[0])?, d(b[1])?);
    u8::try_from(h * 16 + l).ok()
}

impl fmt::Display for Dn {
    /// The RFC 4514 string form, values escaped as needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, r) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}=", r.attr)?;
            let last = r.value.chars().count().saturating_sub(1);
            for (k, c) in r.value.chars().enumerate() {
                let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\' | '=')
                    || (k == 0 && (c == ' ' || c == '#'))
                    || (k == last && c == ' ');
                if c == '\0' {
                    f.write_str("\\00")?;
                } else {
                    if special {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spellings_of_one_name_compare_equal() {
        let a = Dn::parse("uid=alice,ou=people,dc=team,dc=coffre").unwrap();
        for s in [
            "UID=Alice, OU=People, DC=Team, DC=Coffre",
            "userid=alice ,ou=people,  domainComponent=team,dc=coffre",
            "0.9.2342.19200300.100.1.1=alice,ou=people,dc=team,dc=coffre",
            "uid=\\61lice,ou=people,dc=team,dc=coffre",
        ] {
            assert_eq!(Dn::parse(s).unwrap(), a, "{s}");
        }
        assert_ne!(
            Dn::parse("uid=alice2,ou=people,dc=team,dc=coffre").unwrap(),
            a
        );
        assert_ne!(
            Dn::parse("cn=alice,ou=people,dc=team,dc=coffre").unwrap(),
            a
        );
    }

    #[test]
    fn escapes_and_spaces() {
        let d = Dn::parse("cn=a\\,b\\ ,o=x").unwrap();
        assert_eq!(d.0[0].value, "a,b ");
        assert_eq!(d.to_string(), "cn=a\\,b\\ ,o=x");
        assert_eq!(Dn::parse("cn=  a   b  ,o=x").unwrap().0[0].norm, "a b");
    }

    #[test]
    fn bad_names_are_refused() {
        for s in [
            "uid",
            "=x",
            "uid=",
            "uid=a,",
            "uid=a+cn=b,o=x",
            "cn=#04",
            "cn=a\\",
            "cn=a\\zz",
            "1uid=a",
            "cn=a\"b",
            "cn=\\ff",
        ] {
            assert!(Dn::parse(s).is_err(), "{s}");
        }
        assert!(Dn::parse(&"a".repeat(2000)).is_err());
        assert!(Dn::parse("").unwrap().is_root());
    }

    #[test]
    fn ancestry() {
        let base = Dn::parse("dc=team,dc=coffre").unwrap();
        let u = Dn::parse("uid=a,ou=people,dc=team,dc=coffre").unwrap();
        assert!(u.is_within(&base));
        assert!(base.is_within(&base));
        assert!(!base.is_within(&u));
        assert!(!Dn::parse("dc=coffre").unwrap().is_within(&base));
        assert_eq!(u.parent().parent(), base);
        assert_eq!(
            base.child("ou", "People"),
            Dn::parse("ou=people,dc=team,dc=coffre").unwrap()
        );
    }

    proptest! {
        /// Whatever the values, printing and parsing again gives the
        /// same name.
        #[test]
        fn display_round_trips(values in proptest::collection::vec("[ -~é]{1,12}", 1..5)) {
            let mut dn = Dn::default();
            for v in values.iter().rev() {
                dn = dn.child("cn", v);
            }
            let again = Dn::parse(&dn.to_string()).unwrap();
            prop_assert_eq!(again, dn);
        }

        /// The parser never panics, whatever it is given.
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = Dn::parse(&s);
        }
    }
}

//! Values put into LDAP filters (RFC 4515) and DNs (RFC 4514), and DNs
//! read back for comparison.
//!
//! Member names are restricted before they reach this crate, but the
//! escaping does not rely on it: any string, escaped here, stays one
//! assertion value in a filter and one attribute value in a DN. Both
//! escape with the `\XX` hex form, which each grammar accepts for any
//! octet, so what the server unescapes is exactly the input's bytes.

use std::fmt::Write as _;

/// `value` as an assertion value in a search filter (RFC 4515 section 3).
///
/// The grammar forbids NUL, `(`, `)`, `*` and `\` unescaped; controls and
/// space are escaped too, so that a filter printed in a log is unambiguous.
/// Multi-byte UTF-8 is kept as is, as the grammar allows.
pub fn filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_ascii() && !c.is_ascii_graphic() || matches!(c, '(' | ')' | '*' | '\\') {
            hex(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// `value` as an attribute value in a distinguished name (RFC 4514
/// section 2.4): `"`, `+`, `,`, `;`, `<`, `>`, `\`, `=` and NUL escaped
/// anywhere, a leading space or `#` and a trailing space escaped, and the
/// other ASCII controls escaped so that a DN in a log is unambiguous.
pub fn dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\' | '=');
        let edge = (i == 0 && matches!(c, ' ' | '#')) || (i == last && c == ' ');
        if special || edge || c.is_ascii_control() {
            hex(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

fn hex(out: &mut String, c: char) {
    let mut buf = [0; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, "\\{b:02x}");
    }
}

/// One attribute type and value of a relative distinguished name, the
/// value unescaped (or, for a `#` hex value, as written).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ava {
    /// The attribute type as written (`uid`, `CN`, `2.5.4.3`).
    pub attribute: String,
    /// The value's octets.
    pub value: Vec<u8>,
}

/// A DN's relative distinguished names, leftmost first.
pub type Rdns = Vec<Vec<Ava>>;

/// Parses an RFC 4514 string. Lenient where servers are (spaces around
/// separators, as RFC 2253's predecessors allowed); `None` if it is not a
/// DN. The empty string is the root DN (no RDN).
pub fn parse_dn(dn: &str) -> Option<Rdns> {
    let b = dn.as_bytes();
    let mut rdns = Vec::new();
    if dn.trim().is_empty() {
        return Some(rdns);
    }
    let mut i = 0;
    let mut rdn = Vec::new();
    loop {
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'.') {
            i += 1;
        }
        let attribute = &dn[start..i];
        let first = *attribute.as_bytes().first()?;
        let valid = if first.is_ascii_digit() {
            attribute.bytes().all(|c| c.is_ascii_digit() || c == b'.')
        } else {
            first.is_ascii_alphabetic() && !attribute.contains('.')
        };
        if !valid {
            return None;
        }
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        if b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        let mut value = Vec::new();
        if b.get(i) == Some(&b'#') {
            // A BER value in hex: kept as written, compared as text.
            let s = i;
            i += 1;
            while i < b.len() && b[i].is_ascii_hexdigit() {
                i += 1;
            }
            if (i - s - 1) % 2 != 0 || i - s == 1 {
                return None;
            }
            value.extend(dn[s..i].to_ascii_lowercase().bytes());
            while b.get(i) == Some(&b' ') {
                i += 1;
            }
        } else {
            // Unescaped trailing spaces are not part of the value.
            let mut kept = 0;
            while i < b.len() && !matches!(b[i], b',' | b'+') {
                match b[i] {
                    b'\\' => {
                        let n = *b.get(i + 1)?;
                        if n.is_ascii_hexdigit() {
                            value.push(u8::from_str_radix(dn.get(i + 1..i + 3)?, 16).ok()?);
                            i += 3;
                        } else if matches!(
                            n,
                            b' ' | b'"' | b'#' | b'+' | b',' | b';' | b'<' | b'=' | b'>' | b'\\'
                        ) {
                            value.push(n);
                            i += 2;
                        } else {
                            return None;
                        }
                        kept = value.len();
                    }
                    b'"' | b';' | b'<' | b'>' | 0 => return None,
                    c => {
                        value.push(c);
                        if c != b' ' {
                            kept = value.len();
                        }
                        i += 1;
                    }
                }
            }
            value.truncate(kept);
        }
        rdn.push(Ava {
            attribute: attribute.to_string(),
            value,
        });
        match b.get(i) {
            None => {
                rdns.push(rdn);
                return Some(rdns);
            }
            Some(b',') => {
                rdns.push(std::mem::take(&mut rdn));
                i += 1;
            }
            Some(b'+') => i += 1, // another AVA of the same RDN
            Some(_) => return None,
        }
    }
}

/// A DN in a form for comparing two spellings of the same name: types and
/// values in ASCII lower case (the naming attributes in use, `uid`, `cn`,
/// `ou`, `dc`, match case-insensitively), AVAs of an RDN sorted, spaces
/// around separators gone, every value escaped one way. `None` if `dn` is
/// not a DN. Attribute types spelt as OIDs (`2.5.4.3` for `cn`) are not
/// mapped to their names.
pub fn normalise_dn(dn: &str) -> Option<String> {
    let rdns = parse_dn(dn)?;
    let mut out = String::with_capacity(dn.len());
    for (n, rdn) in rdns.into_iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let mut avas: Vec<Ava> = rdn
            .into_iter()
            .map(|a| Ava {
                attribute: a.attribute.to_ascii_lowercase(),
                value: a.value.to_ascii_lowercase(),
            })
            .collect();
        avas.sort();
        for (k, a) in avas.iter().enumerate() {
            if k > 0 {
                out.push('+');
            }
            out.push_str(&a.attribute);
            out.push('=');
            for &c in &a.value {
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'@') {
                    out.push(char::from(c));
                } else {
                    let _ = write!(out, "\\{c:02x}");
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod testparse {
    //! A small RFC 4515 filter parser, for the tests: what a server would
    //! see in a filter string.

    /// A parsed filter.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Filter {
        And(Vec<Filter>),
        Or(Vec<Filter>),
        Not(Box<Filter>),
        Equal(String, Vec<u8>),
        Present(String),
        Substrings(String),
        Other(String, String, Vec<u8>),
        Extensible(String, Vec<u8>),
    }

    /// The whole string as one filter; `None` on any error or trailing
    /// input.
    pub fn parse(s: &str) -> Option<Filter> {
        let (f, rest) = filter(s.as_bytes())?;
        rest.is_empty().then_some(f)
    }

    fn filter(b: &[u8]) -> Option<(Filter, &[u8])> {
        let b = b.strip_prefix(b"(")?;
        let (f, b) = match *b.first()? {
            b'&' => list(&b[1..]).map(|(l, r)| (Filter::And(l), r))?,
            b'|' => list(&b[1..]).map(|(l, r)| (Filter::Or(l), r))?,
            b'!' => filter(&b[1..]).map(|(f, r)| (Filter::Not(Box::new(f)), r))?,
            _ => item(b)?,
        };
        Some((f, b.strip_prefix(b")")?))
    }

    fn list(mut b: &[u8]) -> Option<(Vec<Filter>, &[u8])> {
        let mut l = Vec::new();
        while b.first() == Some(&b'(') {
            let (f, r) = filter(b)?;
            l.push(f);
            b = r;
        }
        (!l.is_empty()).then_some((l, b))
    }

    fn item(b: &[u8]) -> Option<(Filter, &[u8])> {
        let end = b.iter().position(|&c| c == b')')?;
        let (body, rest) = b.split_at(end);
        let eq = body.iter().position(|&c| c == b'=')?;
        let (lhs, value) = (&body[..eq], &body[eq + 1..]);
        if lhs.is_empty() || lhs.iter().any(|&c| matches!(c, b'(' | b'*' | b'\\')) {
            return None;
        }
        let lhs = std::str::from_utf8(lhs).ok()?.to_string();
        if let Some(attr) = lhs.strip_suffix(':') {
            return Some((Filter::Extensible(attr.into(), unescape(value)?), rest));
        }
        if let Some(op) = lhs.strip_suffix(['~', '>', '<']) {
            let kind = lhs[op.len()..].to_string();
            return Some((Filter::Other(op.into(), kind, unescape(value)?), rest));
        }
        if value == b"*" {
            return Some((Filter::Present(lhs), rest));
        }
        if value.contains(&b'*') {
            for part in value.split(|&c| c == b'*') {
                unescape(part)?;
            }
            return Some((Filter::Substrings(lhs), rest));
        }
        Some((Filter::Equal(lhs, unescape(value)?), rest))
    }

    fn unescape(v: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < v.len() {
            match v[i] {
                b'\\' => {
                    let h = std::str::from_utf8(v.get(i + 1..i + 3)?).ok()?;
                    out.push(u8::from_str_radix(h, 16).ok()?);
                    i += 3;
                }
                b'(' | b')' | b'*' | 0 => return None,
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::testparse::{Filter, parse};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filter_escapes_the_metacharacters() {
        assert_eq!(filter_value("alice"), "alice");
        assert_eq!(filter_value("*)(uid=*"), "\\2a\\29\\28uid=\\2a");
        assert_eq!(filter_value("a\\b\0"), "a\\5cb\\00");
        assert_eq!(filter_value("é ü"), "é\\20ü");
    }

    #[test]
    fn dn_escapes_separators_and_edges() {
        assert_eq!(dn_value("alice"), "alice");
        assert_eq!(dn_value("a,b+c=d"), "a\\2cb\\2bc\\3dd");
        assert_eq!(dn_value(" #x "), "\\20#x\\20");
        assert_eq!(dn_value("#"), "\\23");
        assert_eq!(dn_value("x#"), "x#");
        assert_eq!(dn_value("Ærø"), "Ærø");
    }

    #[test]
    fn dns_parse_and_normalise() {
        let a = normalise_dn("UID=Alice , ou=People,DC=example,dc=org").unwrap();
        let b = normalise_dn("uid=alice,ou=people,dc=example,dc=org").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            normalise_dn("cn=A\\,B,dc=x"),
            normalise_dn("cn=a\\2cb,dc=x")
        );
        assert_eq!(
            normalise_dn("cn=a+sn=b,dc=x"),
            normalise_dn("sn=b+cn=a,dc=x")
        );
        assert_ne!(normalise_dn("cn=a,dc=x"), normalise_dn("cn=a,dc=y"));
        assert_eq!(parse_dn("").unwrap(), Vec::<Vec<Ava>>::new());
        for bad in [
            "uid", "=a", "uid=a;b", "uid=a,", "uid=\\zz", "1a=b", "uid=a\"", "cn=#abc",
        ] {
            assert!(parse_dn(bad).is_none(), "{bad}");
        }
        assert!(parse_dn("cn=#04024869").is_some());
        assert!(parse_dn("cn=#0402 , dc=x").is_some());
        // Found by the fuzzer: what follows a hex value must be a
        // separator (it was taken for a `+`).
        assert!(parse_dn("cn=#4000x,dc=x").is_none());
        assert!(parse_dn("sn=#4000\u{fffd}x1").is_none());
    }

    #[test]
    fn the_test_parser_sees_structure() {
        assert_eq!(
            parse("(|(uid=a)(uid=*))"),
            Some(Filter::Or(vec![
                Filter::Equal("uid".into(), b"a".to_vec()),
                Filter::Present("uid".into())
            ]))
        );
        assert_eq!(parse("(uid=*)(uid=*"), None);
        // The classic injection, unescaped, does add structure.
        let injected = format!("(&(uid={})(objectClass=person))", "*)(uid=*");
        assert_ne!(
            parse(&injected).map(|f| matches!(f, Filter::And(ref l) if l.len() == 2)),
            Some(true)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn an_escaped_filter_value_is_one_equality(s in "\\PC*|[()*\\\\\\x00 =&|!:~<>]*") {
            let f = format!("(uid={})", filter_value(&s));
            prop_assert_eq!(parse(&f), Some(Filter::Equal("uid".into(), s.as_bytes().to_vec())));
            // ldap3's own parser (the one a filter string goes through
            // before it is sent) accepts it too.
            prop_assert!(ldap3::parse_filter(&f).is_ok());
        }

        #[test]
        fn escaped_values_never_add_filter_structure(names in proptest::collection::vec("\\PC*|[()*\\\\\\x00 =&|]*", 1..8)) {
            let f = format!(
                "(|{})",
                names.iter().map(|n| format!("(uid={})", filter_value(n))).collect::<String>()
            );
            let want = Filter::Or(names.iter().map(|n| Filter::Equal("uid".into(), n.as_bytes().to_vec())).collect());
            prop_assert_eq!(parse(&f), Some(want));
        }

        #[test]
        fn an_escaped_dn_value_is_one_attribute_value(s in "\\PC*|[ #,+=;<>\"\\\\\\x00]*") {
            let dn = format!("uid={},ou=people,dc=example", dn_value(&s));
            let rdns = parse_dn(&dn).expect("parses");
            prop_assert_eq!(rdns.len(), 3);
            prop_assert_eq!(rdns[0].len(), 1);
            prop_assert_eq!(&rdns[0][0].attribute, "uid");
            prop_assert_eq!(&rdns[0][0].value, &s.as_bytes().to_vec());
            prop_assert_eq!(&rdns[1][0].value, &b"people".to_vec());
        }

        #[test]
        fn any_string_parses_or_not_without_panic(s in "\\PC{0,40}|[a-z=,+\\\\# \"0-9a-f]{0,40}") {
            let _ = parse_dn(&s);
            if let Some(n) = normalise_dn(&s) {
                prop_assert_eq!(normalise_dn(&n), Some(n.clone()));
            }
        }

        #[test]
        fn normalising_is_idempotent(s in "\\PC{0,12}") {
            let dn = format!("cn={},dc=x", dn_value(&s));
            let n = normalise_dn(&dn).expect("parses");
            prop_assert_eq!(normalise_dn(&n), Some(n.clone()));
        }
    }
}

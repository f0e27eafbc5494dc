//! How outside text is shown in errors and logs.
#![deny(unsafe_code)]

/// `url` without its login: everything between the scheme's `://` (or the
/// start, if it has none) and the last `@` goes, so that a password typed
/// into a URL (`s3://KEY:SECRET@bucket`, `ldaps://svc:pw@host`) never
/// reaches an error, a log or the audit log. A secret may hold `/`, `?` or
/// `@`: cutting at the last `@` can take part of a path with it, never
/// leave part of a password.
pub fn url(url: &str) -> String {
    let start = url.find("://").map_or(0, |s| s + 3);
    match url[start..].rfind('@') {
        Some(at) => format!("{}…@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_string(),
    }
}

/// Whether `c` is kept out of told text: control characters (a
/// terminal's escapes, new lines that would forge a log line), the line
/// and paragraph separators, and the marks that reorder text on screen.
pub fn unshown(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text a less trusted process told us (a helper's error, a name it
/// reports), as it may be shown: each [`unshown`] character escaped
/// (`\n`, `\r`, `\t`, `\u{1b}`), and at most `max` characters, the last
/// one `…` if it was cut (`max` 0 shows just that `…`).
pub fn told(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let piece = match c {
            '\n' => "\\n".to_string(),
            '\r' => "\\r".to_string(),
            '\t' => "\\t".to_string(),
            c if unshown(c) => format!("\\u{{{:x}}}", u32::from(c)),
            c => c.to_string(),
        };
        let len = piece.chars().count();
        // Room for this piece, and for `…` after it unless it is the last.
        let room = if chars.peek().is_some() {
            max.saturating_sub(1)
        } else {
            max
        };
        if n + len > room {
            out.push('…');
            return out;
        }
        n += len;
        out.push_str(&piece);
    }
    out
}

/// Every string in `v` made [`told`] text, uncut (for a command's human
/// output of what the daemon said, which carries what outsiders said: a
/// storage host's error, a directory's entry).
pub fn told_all(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) if s.chars().any(unshown) => *s = told(s, usize::MAX),
        Value::Array(a) => a.iter_mut().for_each(told_all),
        Value::Object(o) => o.values_mut().for_each(told_all),
        _ => {}
    }
}

/// A message of several lines as [`told`] text, each line uncut.
pub fn told_lines(text: &str) -> String {
    text.split('\n')
        .map(|l| told(l, usize::MAX))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::{told, url};

    #[test]
    fn logins_are_never_shown() {
        assert_eq!(url("s3://bucket/team"), "s3://bucket/team");
        assert_eq!(url("s3://AKIA:se/cr@et@bucket/x"), "s3://…@bucket/x");
        assert_eq!(url("ldaps://svc:pw@host:636"), "ldaps://…@host:636");
        assert_eq!(url("AKIA:secret@bucket"), "…@bucket");
        assert_eq!(url("nbd+unix:///run/x.sock"), "nbd+unix:///run/x.sock");
        assert_eq!(url(""), "");
        for secret in ["pw", "p/w", "p@w", "p?w#", "é@"] {
            let shown = url(&format!("ldap://u:{secret}@h/"));
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn whole_answers_and_messages_are_told_too() {
        let mut v = serde_json::json!({"state": "open", "mirrors": [
            {"reason": "HTTP 500: \u{1b}[31mboom", "behind": 3}], "n": null});
        super::told_all(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"state": "open", "mirrors": [
                {"reason": "HTTP 500: \\u{1b}[31mboom", "behind": 3}], "n": null})
        );
        assert_eq!(
            super::told_lines("first\nsecond \u{7}\r"),
            "first\nsecond \\u{7}\\r"
        );
    }

    #[test]
    fn told_text_is_cut_and_shows_no_control() {
        assert_eq!(told("plain é text", 40), "plain é text");
        assert_eq!(told("abcde", 5), "abcde");
        assert_eq!(told("abcdef", 5), "abcd…");
        assert_eq!(told("abcd\n", 5), "abcd…");
        assert_eq!(
            told("a\nb\x1b[2J\u{202e}c\t", 40),
            "a\\nb\\u{1b}[2J\\u{202e}c\\t"
        );
        assert_eq!(told("", 1), "");
        assert_eq!(told("ab", 1), "…");
        assert_eq!(told("ab", 0), "…");
        for s in ["\u{85}x", "\u{2028}", "\u{7f}", "x\u{2066}y", "\u{61c}"] {
            let t = told(s, 20);
            assert!(!t.chars().any(super::unshown), "{t:?}");
        }
    }
}

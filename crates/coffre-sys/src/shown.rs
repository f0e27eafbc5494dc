//! How outside text is shown in errors and logs.

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

#[cfg(test)]
mod tests {
    use super::url;

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
}

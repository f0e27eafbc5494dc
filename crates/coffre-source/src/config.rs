//! The `[directory]` table of `config.toml`.
//!
//! ```toml
//! [directory]
//! url = "ldaps://ldap.example.org"     # or ldap:// with starttls = true, or ldapi://
//! # starttls = false
//! # ca_file = "org-ca.pem"             # default: the system's roots
//! bind_dn = "cn=coffre,ou=services,dc=example,dc=org"
//! bind_password_file = "ldap.pw"       # relative to DIR, 0600, the daemon's
//! people = "ou=people,dc=example,dc=org"
//! members_group = "cn=team,ou=groups,dc=example,dc=org"
//! superusers_group = "cn=team-admins,ou=groups,dc=example,dc=org"   # optional
//! check_password = false
//! recheck_s = 60
//! max_stale_s = 3600
//! ids = "vault"                        # or "directory"
//! flavour = "openldap"                 # or "active-directory"
//! ```

use crate::SourceError;
use crate::escape::parse_dn;
use serde::{Deserialize, Serialize};
use std::io::Read as _;
use std::path::{Component, Path, PathBuf};
use zeroize::Zeroizing;

/// The organisation's directory, as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `ldaps://HOST[:PORT]`, `ldap://HOST[:PORT]` with [`starttls`], or
    /// `ldapi://PERCENT-ENCODED-SOCKET-PATH`.
    ///
    /// [`starttls`]: SourceConfig::starttls
    pub url: String,
    /// StartTLS on an `ldap://` URL (required there: the service
    /// account's password, and with `check_password` the members', go
    /// over this connection).
    #[serde(default)]
    pub starttls: bool,
    /// PEM file of the CA certificates to trust for the directory's
    /// certificate, relative to the vault directory unless absolute;
    /// default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The service account's DN, for the searches.
    pub bind_dn: String,
    /// The file holding the service account's password, relative to the
    /// vault directory, mode 0600 and the daemon's own.
    pub bind_password_file: PathBuf,
    /// The subtree holding members' accounts: NAME is the account whose
    /// `uid` (OpenLDAP) or `sAMAccountName` (Active Directory) is NAME.
    pub people: String,
    /// The group whose members may be members of the vault.
    pub members_group: String,
    /// The group whose members may be the vault's superusers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superusers_group: Option<String>,
    /// Whether the vault password must also bind as the account (only
    /// ever tried after the keyslot opened).
    #[serde(default)]
    pub check_password: bool,
    /// Seconds between checks of the members inside.
    #[serde(default = "default_recheck_s")]
    pub recheck_s: u64,
    /// Seconds members inside stay while the directory cannot be reached.
    #[serde(default = "default_max_stale_s")]
    pub max_stale_s: u64,
    /// Where members' numbers come from.
    #[serde(default)]
    pub ids: Ids,
    /// Which kind of server: decides the naming attribute and how nested
    /// groups are found.
    #[serde(default)]
    pub flavour: Flavour,
}

fn default_recheck_s() -> u64 {
    60
}

fn default_max_stale_s() -> u64 {
    3600
}

/// Where members' uid and gid numbers come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ids {
    /// The vault allocates them (its own range).
    #[default]
    Vault,
    /// `uidNumber` and `gidNumber` from the directory.
    Directory,
}

/// The kind of directory server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Flavour {
    /// OpenLDAP and RFC 2307 directories: accounts by `uid`; groups
    /// `groupOfNames`/`groupOfUniqueNames` (`member`, `uniqueMember`) or
    /// `posixGroup` (`memberUid`), not nested.
    #[default]
    #[serde(rename = "openldap")]
    OpenLdap,
    /// Active Directory: accounts by `sAMAccountName`; groups nested,
    /// through the LDAP_MATCHING_RULE_IN_CHAIN rule.
    #[serde(rename = "active-directory")]
    ActiveDirectory,
}

impl Flavour {
    /// The attribute naming an account.
    pub fn name_attribute(self) -> &'static str {
        match self {
            Flavour::OpenLdap => "uid",
            Flavour::ActiveDirectory => "sAMAccountName",
        }
    }
}

/// How the connection is made, from the URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TLS from the first byte.
    Ldaps,
    /// Plain TCP, then StartTLS.
    StartTls,
    /// A local Unix socket (no TLS: the kernel is the channel).
    Ldapi,
}

/// The longest `recheck_s`: a day.
pub const MAX_RECHECK_S: u64 = 86_400;
/// The longest `max_stale_s`: a week.
pub const MAX_STALE_S: u64 = 7 * 86_400;

impl SourceConfig {
    /// Checks what can be checked without the network, saying what to
    /// change.
    pub fn check(&self) -> Result<Transport, SourceError> {
        let transport = self.transport()?;
        match (transport, &self.ca_file) {
            (Transport::Ldapi, Some(_)) => {
                return Err(cfg(
                    "ca_file is for TLS; an ldapi:// socket has none: remove ca_file",
                ));
            }
            (_, Some(p)) if p.as_os_str().is_empty() => {
                return Err(cfg(
                    "ca_file is empty: give the CA's PEM file or remove ca_file",
                ));
            }
            _ => {}
        }
        for (field, dn) in [
            ("bind_dn", Some(&self.bind_dn)),
            ("people", Some(&self.people)),
            ("members_group", Some(&self.members_group)),
            ("superusers_group", self.superusers_group.as_ref()),
        ] {
            let Some(dn) = dn else { continue };
            match parse_dn(dn) {
                Some(rdns) if !rdns.is_empty() => {}
                _ => {
                    return Err(cfg(format!(
                        "{field} = {dn:?} is not a distinguished name (like \"cn=team,ou=groups,dc=example,dc=org\")"
                    )));
                }
            }
        }
        let pw = &self.bind_password_file;
        if pw.as_os_str().is_empty()
            || pw.is_absolute()
            || pw.components().any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(cfg(format!(
                "bind_password_file = {:?} must be a file name inside the vault directory (like \"ldap.pw\"), without .. or a leading /",
                pw.display().to_string()
            )));
        }
        if !(5..=MAX_RECHECK_S).contains(&self.recheck_s) {
            return Err(cfg(format!(
                "recheck_s = {} is out of range: give 5 to {MAX_RECHECK_S} seconds",
                self.recheck_s
            )));
        }
        if self.max_stale_s < self.recheck_s || self.max_stale_s > MAX_STALE_S {
            return Err(cfg(format!(
                "max_stale_s = {} is out of range: give recheck_s ({}) to {MAX_STALE_S} seconds",
                self.max_stale_s, self.recheck_s
            )));
        }
        Ok(transport)
    }

    /// The transport the URL and `starttls` ask for.
    pub fn transport(&self) -> Result<Transport, SourceError> {
        let url = url::Url::parse(&self.url).map_err(|e| {
            cfg(format!(
                "url = {:?} is not a URL ({e}): give ldaps://HOST, ldap://HOST with starttls = true, or ldapi://SOCKET",
                coffre_sys::shown::url(&self.url)
            ))
        })?;
        if !url.username().is_empty()
            || url.password().is_some()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(cfg(format!(
                "url = {:?} has more than a scheme, host and port: the DNs go in people and members_group, the account in bind_dn",
                coffre_sys::shown::url(&self.url)
            )));
        }
        let host = url.host_str().unwrap_or("");
        let t = match (url.scheme(), self.starttls) {
            ("ldaps", false) => Transport::Ldaps,
            ("ldaps", true) => {
                return Err(cfg(
                    "starttls = true with an ldaps:// url: it is TLS already; remove starttls",
                ));
            }
            ("ldap", true) => Transport::StartTls,
            ("ldap", false) => {
                return Err(cfg(
                    "url is ldap:// without starttls: the service account's password would cross the network in clear; use ldaps:// or set starttls = true",
                ));
            }
            ("ldapi", false) => Transport::Ldapi,
            ("ldapi", true) => {
                return Err(cfg(
                    "starttls = true with an ldapi:// socket: remove starttls",
                ));
            }
            (s, _) => {
                return Err(cfg(format!(
                    "url scheme {s}:// is not an LDAP one: give ldaps://, ldap:// with starttls = true, or ldapi://"
                )));
            }
        };
        if host.is_empty() {
            return Err(cfg(format!(
                "url = {:?} names no host (or socket)",
                self.url
            )));
        }
        if t == Transport::Ldapi && url.port().is_some() {
            return Err(cfg("an ldapi:// url is a socket path: no port"));
        }
        Ok(t)
    }

    /// The CA file's path, if any: relative paths are taken from `dir`.
    pub fn ca_path(&self, dir: &Path) -> Option<PathBuf> {
        self.ca_file.as_ref().map(|p| dir.join(p))
    }

    /// Reads the service account's password from
    /// `dir/bind_password_file`, which must be a regular file (not a
    /// link) owned by this process's user with no permission for group or
    /// others. One trailing newline is dropped.
    pub fn load_password(&self, dir: &Path) -> Result<Zeroizing<String>, SourceError> {
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let path = dir.join(&self.bind_password_file);
        let shown = path.display();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| cfg(format!("bind_password_file {shown}: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| cfg(format!("bind_password_file {shown}: {e}")))?;
        if !meta.is_file() {
            return Err(cfg(format!(
                "bind_password_file {shown} is not a regular file"
            )));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(cfg(format!(
                "bind_password_file {shown} is {}:{:o}: it must be owned by uid {me} with mode 0600 (chown {me} {shown}; chmod 600 {shown})",
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(256));
        (&mut file)
            .take(4097)
            .read_to_end(&mut buf)
            .map_err(|e| cfg(format!("bind_password_file {shown}: {e}")))?;
        if buf.len() > 4096 {
            return Err(cfg(format!(
                "bind_password_file {shown} is over 4096 bytes: it holds one password"
            )));
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        if buf.is_empty() {
            return Err(cfg(format!("bind_password_file {shown} is empty")));
        }
        if buf.iter().any(|&c| c == 0 || c == b'\n' || c == b'\r') {
            return Err(cfg(format!(
                "bind_password_file {shown} holds more than one line (or a NUL): it holds the password alone"
            )));
        }
        let bytes = std::mem::take(&mut *buf);
        match String::from_utf8(bytes) {
            Ok(s) => Ok(Zeroizing::new(s)),
            Err(e) => {
                drop(Zeroizing::new(e.into_bytes()));
                Err(cfg(format!("bind_password_file {shown} is not UTF-8")))
            }
        }
    }
}

fn cfg(msg: impl Into<String>) -> SourceError {
    SourceError::Config(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt as _;

    const FULL: &str = r#"
url = "ldaps://ldap.example.org"
bind_dn = "cn=coffre,ou=services,dc=example,dc=org"
bind_password_file = "ldap.pw"
people = "ou=people,dc=example,dc=org"
members_group = "cn=team,ou=groups,dc=example,dc=org"
superusers_group = "cn=team-admins,ou=groups,dc=example,dc=org"
check_password = false
recheck_s = 60
max_stale_s = 3600
ids = "vault"
flavour = "openldap"
"#;

    fn parse(text: &str) -> Result<SourceConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn with(extra: &str, drop: &[&str]) -> String {
        let mut lines: Vec<&str> = FULL
            .lines()
            .filter(|l| !drop.iter().any(|d| l.starts_with(&format!("{d} "))))
            .collect();
        lines.push(extra);
        lines.join("\n")
    }

    fn check(text: &str) -> Result<Transport, String> {
        parse(text)?.check().map_err(|e| e.to_string())
    }

    #[test]
    fn the_issue_s_table_parses_and_checks() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.check().unwrap(), Transport::Ldaps);
        assert_eq!(c.ids, Ids::Vault);
        assert_eq!(c.flavour, Flavour::OpenLdap);
        assert_eq!(
            c.superusers_group.as_deref(),
            Some("cn=team-admins,ou=groups,dc=example,dc=org")
        );
    }

    #[test]
    fn defaults() {
        let c = parse(&with(
            "",
            &[
                "superusers_group",
                "check_password",
                "recheck_s",
                "max_stale_s",
                "ids",
                "flavour",
            ],
        ))
        .unwrap();
        assert_eq!((c.recheck_s, c.max_stale_s), (60, 3600));
        assert!(!c.check_password && !c.starttls);
        assert_eq!(
            (c.ids, c.flavour, c.superusers_group, c.ca_file),
            (Ids::Vault, Flavour::OpenLdap, None, None)
        );
        let ad = parse(&with(
            "flavour = \"active-directory\"\nids = \"directory\"",
            &["flavour", "ids"],
        ))
        .unwrap();
        assert_eq!(
            (ad.flavour, ad.ids),
            (Flavour::ActiveDirectory, Ids::Directory)
        );
        assert_eq!(ad.flavour.name_attribute(), "sAMAccountName");
    }

    #[test]
    fn unknown_and_misspelt_keys_are_refused() {
        assert!(
            parse(&with("bind_pasword_file = \"x\"", &[]))
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(parse(&with("flavour = \"ad\"", &["flavour"])).is_err());
        assert!(parse(&with("ids = \"both\"", &["ids"])).is_err());
        assert!(
            parse(&with("", &["members_group"]))
                .unwrap_err()
                .contains("members_group")
        );
    }

    #[test]
    fn transports() {
        let url = |u: &str, extra: &str| check(&with(&format!("url = \"{u}\"\n{extra}"), &["url"]));
        assert_eq!(
            url("ldap://ldap.example.org:389", "starttls = true"),
            Ok(Transport::StartTls)
        );
        assert_eq!(
            url("ldapi://%2Frun%2Fslapd%2Fldapi", ""),
            Ok(Transport::Ldapi)
        );
        assert_eq!(url("ldaps://127.0.0.1:6360/", ""), Ok(Transport::Ldaps));
        assert!(
            url("ldap://ldap.example.org", "")
                .unwrap_err()
                .contains("in clear")
        );
        assert!(
            url("ldaps://ldap.example.org", "starttls = true")
                .unwrap_err()
                .contains("remove starttls")
        );
        assert!(url("ldapi://%2Frun%2Fx", "starttls = true").is_err());
        assert!(
            url("ldapi://%2Frun%2Fx", "ca_file = \"ca.pem\"")
                .unwrap_err()
                .contains("ca_file")
        );
        assert!(
            url("https://ldap.example.org", "")
                .unwrap_err()
                .contains("not an LDAP one")
        );
        assert!(url("ldaps://", "").is_err());
        assert!(
            url("ldaps://ldap.example.org/dc=example,dc=org?uid", "")
                .unwrap_err()
                .contains("more than")
        );
        // A login in the URL is refused, and never shown back.
        for login in [
            "ldaps://svc:Secr3t@ldap.example.org",
            "ldaps://svc:Sec ret@h",
        ] {
            let e = url(login, "").unwrap_err();
            assert!(!e.contains("Secr3t") && !e.contains("Sec ret"), "{e}");
        }
        assert!(
            url("ldap.example.org", "")
                .unwrap_err()
                .contains("not a URL")
        );
    }

    #[test]
    fn fields_are_checked() {
        let field = |k: &str, v: &str| check(&with(&format!("{k} = {v}"), &[k]));
        assert!(
            field("people", "\"people\"")
                .unwrap_err()
                .contains("people")
        );
        assert!(
            field("members_group", "\"\"")
                .unwrap_err()
                .contains("members_group")
        );
        assert!(
            field("superusers_group", "\"cn=a;b\"")
                .unwrap_err()
                .contains("superusers_group")
        );
        assert!(
            field("bind_dn", "\"coffre\"")
                .unwrap_err()
                .contains("bind_dn")
        );
        for bad in ["\"/etc/ldap.pw\"", "\"../ldap.pw\"", "\"\"", "\"./x/../y\""] {
            assert!(
                field("bind_password_file", bad)
                    .unwrap_err()
                    .contains("inside the vault directory"),
                "{bad}"
            );
        }
        assert!(field("bind_password_file", "\"secrets/ldap.pw\"").is_ok());
        assert!(field("recheck_s", "0").unwrap_err().contains("recheck_s"));
        assert!(field("recheck_s", "100000").is_err());
        assert!(
            field("max_stale_s", "30")
                .unwrap_err()
                .contains("max_stale_s")
        );
        assert!(field("max_stale_s", "100000000").is_err());
        assert!(check(&with("ca_file = \"\"", &[])).is_err());
    }

    #[test]
    fn the_password_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = parse(FULL).unwrap();
        let path = dir.path().join("ldap.pw");
        let missing = c.load_password(dir.path()).unwrap_err().to_string();
        assert!(missing.contains("ldap.pw"), "{missing}");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = c.load_password(dir.path()).unwrap_err().to_string();
        assert!(e.contains("mode 0600") && e.contains("644"), "{e}");
        assert!(!e.contains("s3cret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.load_password(dir.path()).unwrap().as_str(), "s3cret");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        assert_eq!(c.load_password(dir.path()).unwrap().as_str(), "s3cret");
        std::fs::write(&path, "two\nlines\n").unwrap();
        assert!(c.load_password(dir.path()).is_err());
        std::fs::write(&path, "\n").unwrap();
        assert!(
            c.load_password(dir.path())
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        assert!(c.load_password(dir.path()).is_err());
        std::fs::write(&path, b"\xff\xfe").unwrap();
        assert!(
            c.load_password(dir.path())
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
        // A link to a private file is refused: the file itself must be there.
        let real = dir.path().join("real.pw");
        std::fs::write(&real, "s3cret").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&real, &path).unwrap();
        assert!(c.load_password(dir.path()).is_err());
    }

    proptest! {
        #[test]
        fn any_toml_string_url_checks_without_panic(u in "\\PC{0,40}") {
            let mut c = parse(FULL).unwrap();
            c.url = u;
            let _ = c.check();
        }

        #[test]
        fn serialised_configs_read_back(recheck in 5u64..86_400, extra in 0u64..1000, ad in any::<bool>(), su in any::<bool>()) {
            let mut c = parse(FULL).unwrap();
            c.recheck_s = recheck;
            c.max_stale_s = recheck + extra;
            c.flavour = if ad { Flavour::ActiveDirectory } else { Flavour::OpenLdap };
            if !su { c.superusers_group = None; }
            let text = toml::to_string(&c).unwrap();
            prop_assert_eq!(parse(&text).unwrap(), c.clone());
            prop_assert!(c.check().is_ok());
        }
    }
}

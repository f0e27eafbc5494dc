//! What the daemon sends: the directory (who exists, which VM sees whom)
//! and the live state (locked, whose session is live), and their
//! validation on receipt.

use crate::dn::Dn;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

/// The whole directory, replaced at once by each `directory` command.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DirectorySpec {
    /// The naming context, e.g. `dc=team,dc=coffre`.
    pub base: String,
    /// Every member a VM may see.
    pub users: Vec<User>,
    /// Every group a VM may see.
    pub groups: Vec<Group>,
    /// Who sees what: one entry per VM address.
    pub clients: Vec<Client>,
}

/// A member, as a POSIX account.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login name.
    pub name: String,
    /// uidNumber.
    pub uid: u32,
    /// gidNumber (the primary group).
    pub gid: u32,
    /// gecos (omitted when empty).
    #[serde(default)]
    pub gecos: String,
    /// homeDirectory.
    pub home: String,
    /// loginShell.
    pub shell: String,
    /// sshPublicKey, one value per key.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// The argon2id PHC string of the member's workload password (never
    /// logged, never served).
    #[serde(default)]
    pub verifier: Option<String>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("gecos", &self.gecos)
            .field("home", &self.home)
            .field("shell", &self.shell)
            .field("ssh_keys", &self.ssh_keys)
            .field("verifier", &self.verifier.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A POSIX group.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The group's name.
    pub name: String,
    /// gidNumber.
    pub gid: u32,
    /// Its members' names.
    #[serde(default)]
    pub members: Vec<String>,
}

/// What one VM sees.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// The VM's address on the vault network.
    pub address: IpAddr,
    /// The workload's name (for the events).
    pub workload: String,
    /// The users it sees.
    #[serde(default)]
    pub users: Vec<String>,
    /// The groups it sees (their members filtered to `users`).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The live state: binds succeed only for members with a live session
/// while the vault is open.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Live {
    /// The vault is locked: every bind is refused.
    pub locked: bool,
    /// Members with a live session.
    #[serde(default)]
    pub present: Vec<String>,
}

/// The most a verifier may ask of the KDF: the server checks one
/// password at a time and must not be made to spend minutes or
/// gigabytes on one.
pub const MAX_M_KIB: u32 = 262_144;
/// Passes.
pub const MAX_T: u32 = 16;
/// Lanes.
pub const MAX_P: u32 = 8;

/// Why a spec was refused whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The base is not a usable DN.
    #[error("the base {0:?} is not a distinguished name (e.g. dc=team,dc=coffre): {1}")]
    Base(String, String),
}

/// Whether `n` is a name we serve: `[A-Za-z0-9_][A-Za-z0-9_.-]*`, 64
/// bytes at most (members' names are lower case and may start with a
/// digit; workloads' groups carry the workload's name, which may have
/// capitals).
pub fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Values served as attribute text must not carry control characters (a
/// newline in a shell or a key would be a second line in a client's
/// files).
fn clean(s: &str) -> bool {
    s.len() <= 8192 && !s.chars().any(char::is_control)
}

/// A verifier the server accepts: argon2id within the bounds.
pub fn check_verifier(phc: &str) -> Result<(), String> {
    verifier_costs(phc).map(drop)
}

/// SSH key types a member may add (what OpenSSH's sshd accepts today).
pub const SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// An SSH public key line, checked: `TYPE BASE64 [COMMENT]`, a known
/// type, a blob that names the same type, a short printable comment,
/// nothing that could end a line (it goes into LDAP values and
/// `authorized_keys` output). Returns the line as kept and its
/// fingerprint (`SHA256:...`, as `ssh-keygen -l` prints it).
pub fn check_ssh_key(line: &str) -> Result<(String, String), String> {
    let line = line.trim();
    if line.chars().any(|c| c.is_control()) {
        return Err("an SSH public key is one line, without control characters".into());
    }
    let mut parts = line.splitn(3, ' ');
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("an SSH public key reads `TYPE BASE64 [COMMENT]` (the .pub file)".into());
    };
    let comment = parts.next().unwrap_or("").trim();
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "SSH key type {kind:?} is not one of {} (is this the .pub file?)",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    // The directory serves values of at most 8 KiB (a 16384-bit RSA key
    // is under 3 KiB of base64).
    if line.len() > 8000 {
        return Err("this SSH key is too long (8000 bytes at most)".into());
    }
    let blob = data_encoding::BASE64
        .decode(b64.as_bytes())
        .map_err(|_| "the SSH key's second field is not base64".to_string())?;
    let named = blob
        .get(..4)
        .and_then(|n| usize::try_from(u32::from_be_bytes([n[0], n[1], n[2], n[3]])).ok())
        .and_then(|n| blob.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        return Err(format!("the SSH key's data is not a {kind} key"));
    }
    if comment.len() > 256 || !comment.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err("the SSH key's comment: at most 256 printable ASCII characters".into());
    }
    let fp = format!(
        "SHA256:{}",
        data_encoding::BASE64_NOPAD.encode(&<sha2::Sha256 as sha2::Digest>::digest(&blob))
    );
    let kept = if comment.is_empty() {
        format!("{kind} {b64}")
    } else {
        format!("{kind} {b64} {comment}")
    };
    Ok((kept, fp))
}

/// A verifier's argon2id costs (memory KiB, passes, lanes), if it is one
/// the server accepts: a PHC string, argon2id, a salt and a hash, costs
/// at most [`MAX_M_KIB`], [`MAX_T`], [`MAX_P`].
pub fn verifier_costs(phc: &str) -> Result<(u32, u32, u32), String> {
    use argon2::PasswordHash;
    let h = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    if h.algorithm.as_str() != "argon2id" {
        return Err(format!("{} is not argon2id", h.algorithm.as_str()));
    }
    let p = argon2::Params::try_from(&h).map_err(|e| format!("bad parameters: {e}"))?;
    if p.m_cost() > MAX_M_KIB || p.t_cost() > MAX_T || p.p_cost() > MAX_P {
        return Err(format!(
            "parameters m={} t={} p={} above m={MAX_M_KIB} t={MAX_T} p={MAX_P}",
            p.m_cost(),
            p.t_cost(),
            p.p_cost()
        ));
    }
    if h.salt.is_none() || h.hash.is_none() {
        return Err("no salt or no hash".into());
    }
    Ok((p.m_cost(), p.t_cost(), p.p_cost()))
}

/// What a client sees, resolved.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub workload: String,
    pub users: BTreeSet<String>,
    pub groups: BTreeSet<String>,
}

/// A validated directory, indexed.
#[derive(Clone)]
pub struct Directory {
    pub(crate) base: Dn,
    /// Users by name; a verifier only if it passed [`check_verifier`].
    pub(crate) accounts: BTreeMap<String, User>,
    pub(crate) groups: BTreeMap<String, Group>,
    pub(crate) views: HashMap<IpAddr, View>,
    /// Each client's tree, built once per directory (a search reads it,
    /// never rebuilds it).
    pub(crate) trees: HashMap<IpAddr, std::sync::Arc<crate::tree::Tree>>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("base", &self.base.to_string())
            .field("users", &self.accounts.keys().collect::<Vec<_>>())
            .field("groups", &self.groups.keys().collect::<Vec<_>>())
            .field("clients", &self.views.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The address a connection is known by: IPv4-mapped IPv6 as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Directory {
    /// An empty directory: no client, so every connection is refused.
    pub fn empty() -> Self {
        Self {
            base: Dn::default(),
            accounts: BTreeMap::new(),
            groups: BTreeMap::new(),
            views: HashMap::new(),
            trees: HashMap::new(),
        }
    }

    /// Validates `spec`. What cannot be served is left out and listed as
    /// `(name, why)`: a bad name drops its user, group or client; a bad
    /// verifier drops only the password (the account stays, binds fail).
    pub fn new(spec: DirectorySpec) -> Result<(Self, Vec<(String, String)>), SpecError> {
        let base =
            Dn::parse(&spec.base).map_err(|e| SpecError::Base(spec.base.clone(), e.to_string()))?;
        if base.is_root() {
            return Err(SpecError::Base(spec.base, "empty".into()));
        }
        let mut failed = Vec::new();
        let mut accounts = BTreeMap::new();
        for mut u in spec.users {
            if !valid_name(&u.name) {
                failed.push((u.name.clone(), "not a valid user name".into()));
                continue;
            }
            if accounts.contains_key(&u.name) {
                failed.push((u.name.clone(), "listed twice".into()));
                continue;
            }
            if ![&u.gecos, &u.home, &u.shell]
                .into_iter()
                .chain(&u.ssh_keys)
                .all(|s| clean(s))
                || u.ssh_keys.len() > 64
            {
                failed.push((
                    u.name.clone(),
                    "a control character or an over-long value".into(),
                ));
                continue;
            }
            if let Some(v) = &u.verifier
                && let Err(why) = check_verifier(v)
            {
                failed.push((u.name.clone(), format!("no password: {why}")));
                u.verifier = None;
            }
            accounts.insert(u.name.clone(), u);
        }
        let mut groups = BTreeMap::new();
        for g in spec.groups {
            if !valid_name(&g.name) {
                failed.push((g.name.clone(), "not a valid group name".into()));
                continue;
            }
            if groups.contains_key(&g.name) {
                failed.push((g.name.clone(), "listed twice".into()));
                continue;
            }
            groups.insert(g.name.clone(), g);
        }
        let mut views = HashMap::new();
        for c in spec.clients {
            let ip = canonical_ip(c.address);
            if views.contains_key(&ip) {
                failed.push((c.workload.clone(), format!("{ip} listed twice")));
                continue;
            }
            let mut view = View {
                workload: c.workload.clone(),
                users: BTreeSet::new(),
                groups: BTreeSet::new(),
            };
            for u in c.users {
                if accounts.contains_key(&u) {
                    view.users.insert(u);
                } else {
                    failed.push((c.workload.clone(), format!("no user {u:?}")));
                }
            }
            for g in c.groups {
                if groups.contains_key(&g) {
                    view.groups.insert(g);
                } else {
                    failed.push((c.workload.clone(), format!("no group {g:?}")));
                }
            }
            views.insert(ip, view);
        }
        let mut d = Self {
            base,
            accounts,
            groups,
            views,
            trees: HashMap::new(),
        };
        d.trees = d
            .views
            .keys()
            .filter_map(|ip| Some((*ip, std::sync::Arc::new(d.build_tree(*ip)?))))
            .collect();
        Ok((d, failed))
    }

    /// Whether a connection from `ip` is served.
    pub fn knows(&self, ip: IpAddr) -> bool {
        self.views.contains_key(&canonical_ip(ip))
    }

    /// The naming context.
    pub fn base(&self) -> &Dn {
        &self.base
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn ssh_keys_are_checked_and_fingerprinted_like_ssh_keygen() {
        // `ssh-keygen -l` of this key: SHA256:lT1uZlvbHL8hjoEbNpeQw6hJ19IJb0zQTd/hWK4Bzco
        let blob = {
            let mut b = Vec::new();
            b.extend(11u32.to_be_bytes());
            b.extend(b"ssh-ed25519");
            b.extend(32u32.to_be_bytes());
            b.extend([7u8; 32]);
            b
        };
        let b64 = data_encoding::BASE64.encode(&blob);
        let (kept, fp) = check_ssh_key(&format!("ssh-ed25519 {b64} alice@laptop\n")).unwrap();
        assert_eq!(kept, format!("ssh-ed25519 {b64} alice@laptop"));
        assert!(fp.starts_with("SHA256:") && !fp.ends_with('='), "{fp}");
        for bad in [
            format!("ssh-rsa {b64}"),
            format!("ssh-ed25519 {b64} x\ncommand=\"sh\" ssh-ed25519 {b64}"),
            "ssh-ed25519 !!!".to_string(),
            "ssh-dss AAAA".to_string(),
            format!("ssh-ed25519 {b64} caf\u{e9}"),
            String::new(),
        ] {
            assert!(check_ssh_key(&bad).is_err(), "{bad:?}");
        }
    }

    /// A verifier for `pw`, cheap to check (tests only).
    pub fn verifier(pw: &str) -> String {
        use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
        let a = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(64, 1, 1, None).unwrap(),
        );
        a.hash_password_with_salt(pw.as_bytes(), b"saltsaltsalt")
            .unwrap()
            .to_string()
    }

    pub fn user(name: &str, uid: u32) -> User {
        User {
            name: name.into(),
            uid,
            gid: 5300,
            gecos: String::new(),
            home: format!("/home/{name}"),
            shell: "/bin/bash".into(),
            ssh_keys: vec![],
            verifier: None,
        }
    }

    #[test]
    fn names() {
        for n in [
            "alice",
            "_svc",
            "a.b-c_9",
            "9a",
            "_wl-Desk",
            &"a".repeat(64),
        ] {
            assert!(valid_name(n), "{n}");
        }
        for n in ["", "-a", ".a", "a b", "a,b", "a=b", "é", &"a".repeat(65)] {
            assert!(!valid_name(n), "{n}");
        }
    }

    #[test]
    fn verifiers_are_bounded_argon2id() {
        assert!(check_verifier(&verifier("pw")).is_ok());
        let heavy = "$argon2id$v=19$m=524288,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(check_verifier(heavy).unwrap_err().contains("above"));
        let many = "$argon2id$v=19$m=64,t=17,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(check_verifier(many).is_err());
        let argon2i = verifier("pw").replace("argon2id", "argon2i");
        assert!(check_verifier(&argon2i).is_err());
        assert!(check_verifier("plain").is_err());
        assert!(check_verifier("$pbkdf2-sha256$i=1$c2FsdA$AAAA").is_err());
    }

    #[test]
    fn validation_drops_what_it_cannot_serve() {
        let mut bad_pw = user("carol", 3);
        bad_pw.verifier = Some("$argon2i$nope".into());
        let mut newline = user("dave", 4);
        newline.shell = "/bin/sh\nroot::0:0".into();
        let spec = DirectorySpec {
            base: "dc=team,dc=coffre".into(),
            users: vec![
                user("alice", 1),
                user("bob smith", 2),
                bad_pw,
                newline,
                user("alice", 5),
            ],
            groups: vec![Group {
                name: "team".into(),
                gid: 5300,
                members: vec!["alice".into()],
            }],
            clients: vec![Client {
                address: "::ffff:10.9.0.10".parse().unwrap(),
                workload: "vm".into(),
                users: vec!["alice".into(), "bob".into()],
                groups: vec!["team".into(), "nope".into()],
            }],
        };
        let (d, failed) = Directory::new(spec).unwrap();
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bob smith", "carol", "dave", "alice", "vm", "vm"]);
        assert!(d.accounts["carol"].verifier.is_none());
        assert!(
            d.knows("10.9.0.10".parse().unwrap()),
            "mapped addresses are IPv4"
        );
        assert_eq!(
            d.views[&"10.9.0.10".parse::<IpAddr>().unwrap()].users.len(),
            1
        );
        assert!(
            Directory::new(DirectorySpec {
                base: "dc=".into(),
                ..Default::default()
            })
            .is_err()
        );
        assert!(Directory::new(DirectorySpec::default()).is_err());
    }

    #[test]
    fn verifiers_never_show_in_debug() {
        let mut u = user("alice", 1);
        u.verifier = Some(verifier("secret"));
        let s = format!("{u:?}");
        assert!(!s.contains("argon2") && s.contains("redacted"));
    }

    #[test]
    fn the_contract_parses() {
        let j = r#"{"base":"dc=team,dc=coffre","users":[{"name":"alice","uid":5301,"gid":5300,"gecos":"","home":"/home/alice","shell":"/bin/bash","ssh_keys":["ssh-ed25519 AAAA"],"verifier":null}],"groups":[{"name":"team","gid":5300,"members":["alice"]}],"clients":[{"address":"10.9.0.10","workload":"vm","users":["alice"],"groups":["team"]}]}"#;
        let s: DirectorySpec = serde_json::from_str(j).unwrap();
        assert_eq!(s.users[0].ssh_keys.len(), 1);
        let l: Live = serde_json::from_str(r#"{"locked":false,"present":["alice"]}"#).unwrap();
        assert_eq!(l.present, ["alice"]);
    }
}

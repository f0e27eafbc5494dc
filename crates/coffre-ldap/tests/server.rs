//! The server against OpenLDAP's own clients (`ldapsearch`,
//! `ldapwhoami` from ldap-utils), over ldaps:// and ldap:// with
//! StartTLS, with a test CA the clients are told to demand.
//!
//! The clients run on loopback, where every connection comes from
//! 127.0.0.1 (ldapsearch cannot choose its source address): the
//! directory names 127.0.0.1 as `vm1` (alice and bob, group `team`) and
//! another address as `vm2` (carol); other views are had by changing
//! what the directory says of 127.0.0.1.

use coffre_ldap::spec::{Client, DirectorySpec, Group, Live, User};
use coffre_ldap::{Outcome, Server};
use coffre_testkit::Need;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const NEEDS: &[Need] = &[Need::LdapClient];
const BASE: &str = "dc=team,dc=coffre";

struct Lab {
    dir: PathBuf,
    server: Arc<Server>,
    plain: u16,
    ldaps: u16,
}

fn verifier(pw: &str) -> String {
    use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(8192, 1, 1, None).unwrap(),
    )
    .hash_password_with_salt(pw.as_bytes(), b"labsaltlabsalt")
    .unwrap()
    .to_string()
}

fn user(name: &str, uid: u32) -> User {
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

/// vm1 at 127.0.0.1 sees alice and bob; vm2 elsewhere sees carol.
fn spec() -> DirectorySpec {
    let mut alice = user("alice", 5301);
    alice.gecos = "Alice Liddell".into();
    alice.ssh_keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@laptop".into(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISecond alice@desk".into(),
    ];
    alice.verifier = Some(verifier("right horse battery"));
    let mut carol = user("carol", 5303);
    carol.verifier = Some(verifier("carol's"));
    DirectorySpec {
        base: BASE.into(),
        users: vec![alice, user("bob", 5302), carol],
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
                address: "127.0.0.1".parse().unwrap(),
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

impl Lab {
    fn new(name: &str) -> Self {
        coffre_testkit::require(NEEDS);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("ldap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A CA the clients demand, and the server's certificate for
        // 127.0.0.1 from it.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "coffre test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();

        let server = Arc::new(Server::new().unwrap());
        server.set_tls(&cert.pem(), &key.serialize_pem()).unwrap();
        assert!(server.set_directory(spec()).unwrap().is_empty());
        server.set_live(Live {
            locked: false,
            present: vec!["alice".into(), "carol".into()],
        });
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let ldaps = TcpListener::bind("127.0.0.1:0").unwrap();
        let (p, l) = (
            plain.local_addr().unwrap().port(),
            ldaps.local_addr().unwrap().port(),
        );
        let s = Arc::clone(&server);
        std::thread::spawn(move || s.serve(plain, ldaps));
        Lab {
            dir,
            server,
            plain: p,
            ldaps: l,
        }
    }

    fn ldaps_uri(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.ldaps)
    }

    fn ldap_uri(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.plain)
    }

    /// An OpenLDAP tool with the test CA demanded, and no host or user
    /// configuration read.
    fn tool(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = Command::new(tool);
        c.args(args)
            .current_dir(&self.dir)
            .env("LDAPTLS_CACERT", self.dir.join("ca.pem"))
            .env("LDAPTLS_REQCERT", "demand")
            .env("LDAPCONF", "/dev/null")
            .env("LDAPRC", "no-such-ldaprc")
            .env("HOME", &self.dir);
        c
    }

    /// Runs it: exit code, stdout, stderr.
    fn run(&self, tool: &str, args: &[&str]) -> (i32, String, String) {
        let out = self.tool(tool, args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn search(&self, uri: &str, extra: &[&str], filter: &str) -> (i32, String, String) {
        let mut args = vec!["-H", uri, "-x", "-LLL", "-o", "ldif-wrap=no", "-b", BASE];
        args.extend_from_slice(extra);
        args.push(filter);
        self.run("ldapsearch", &args)
    }

    fn whoami(&self, name: &str, password: &str) -> (i32, String, String) {
        let dn = format!("uid={name},ou=people,{BASE}");
        self.run(
            "ldapwhoami",
            &["-H", &self.ldaps_uri(), "-x", "-D", &dn, "-w", password],
        )
    }
}

fn dns(ldif: &str) -> Vec<&str> {
    ldif.lines()
        .filter_map(|l| l.strip_prefix("dn: "))
        .collect()
}

fn check_vm1_view(out: &str) {
    assert!(
        out.contains("dn: uid=alice,ou=people,dc=team,dc=coffre"),
        "{out}"
    );
    assert!(
        out.contains("dn: uid=bob,ou=people,dc=team,dc=coffre"),
        "{out}"
    );
    assert!(!out.contains("carol"), "vm1 does not see carol: {out}");
    assert!(out.contains("uidNumber: 5301"), "{out}");
    assert!(out.contains("gidNumber: 5300"), "{out}");
    assert!(out.contains("sshPublicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@laptop"));
    assert!(out.contains("sshPublicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISecond alice@desk"));
    assert!(
        out.contains("dn: cn=team,ou=groups,dc=team,dc=coffre"),
        "{out}"
    );
    assert!(!out.contains("cn=ops"), "vm1 does not see ops: {out}");
    assert!(out.contains("memberUid: alice") && out.contains("memberUid: bob"));
    assert!(!out.to_lowercase().contains("userpassword"));
    assert!(!out.contains("argon2"));
}

#[test]
#[ignore = "system: needs ldap-utils"]
fn ldaps_and_starttls_find_this_vms_users_and_groups() {
    let lab = Lab::new("views");
    let filter = "(|(objectClass=posixAccount)(objectClass=posixGroup))";
    let (code, out, err) = lab.search(&lab.ldaps_uri(), &[], filter);
    assert_eq!(code, 0, "{err}");
    check_vm1_view(&out);
    let (code, out, err) = lab.search(&lab.ldap_uri(), &["-ZZ"], filter);
    assert_eq!(code, 0, "{err}");
    check_vm1_view(&out);
    // A filter on numbers compares numbers.
    let (code, out, _) = lab.search(&lab.ldaps_uri(), &[], "(uidNumber>=5302)");
    assert_eq!(code, 0);
    assert_eq!(dns(&out), ["uid=bob,ou=people,dc=team,dc=coffre"]);
    // The root DSE says what the server does.
    let (code, out, err) = lab.run(
        "ldapsearch",
        &[
            "-H",
            &lab.ldaps_uri(),
            "-x",
            "-LLL",
            "-s",
            "base",
            "-b",
            "",
            "+",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("namingContexts: dc=team,dc=coffre"), "{out}");
    assert!(
        out.contains("supportedControl: 1.2.840.113556.1.4.319"),
        "{out}"
    );

    // The same address, now given vm2's view: carol and ops only.
    let mut s = spec();
    s.clients[1].address = "127.0.0.1".parse().unwrap();
    s.clients.remove(0);
    lab.server.set_directory(s).unwrap();
    let (code, out, err) = lab.search(&lab.ldaps_uri(), &[], filter);
    assert_eq!(code, 0, "{err}");
    let mut got = dns(&out);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "cn=ops,ou=groups,dc=team,dc=coffre",
            "cn=team,ou=groups,dc=team,dc=coffre",
            "uid=carol,ou=people,dc=team,dc=coffre",
        ]
    );
    assert!(out.contains("memberUid: carol") && !out.contains("memberUid: alice"));
}

#[test]
#[ignore = "system: needs ldap-utils"]
fn nothing_is_answered_in_clear_nor_to_unknown_addresses() {
    let lab = Lab::new("clear");
    let (code, out, err) = lab.search(&lab.ldap_uri(), &[], "(uid=*)");
    assert_eq!(code, 13, "confidentialityRequired: {out} {err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("Confidentiality required"), "{err}");
    let (code, _, _) = lab.run(
        "ldapwhoami",
        &[
            "-H",
            &lab.ldap_uri(),
            "-x",
            "-D",
            &format!("uid=alice,ou=people,{BASE}"),
            "-w",
            "right horse battery",
        ],
    );
    assert_eq!(code, 13, "no bind in clear either");

    // 127.0.0.1 no longer in the directory: closed at accept.
    let mut s = spec();
    s.clients.remove(0);
    lab.server.set_directory(s).unwrap();
    let before = lab.server.stats.refused_addresses.load(Ordering::Relaxed);
    let (code, out, err) = lab.search(&lab.ldaps_uri(), &[], "(uid=*)");
    assert_ne!(code, 0, "{out} {err}");
    assert!(out.is_empty());
    assert_eq!(
        lab.server.stats.refused_addresses.load(Ordering::Relaxed),
        before + 1
    );
}

#[test]
#[ignore = "system: needs ldap-utils"]
fn the_workload_password_binds_only_while_present_and_unlocked() {
    let lab = Lab::new("whoami");
    let (code, out, err) = lab.whoami("alice", "right horse battery");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "dn:uid=alice,ou=people,dc=team,dc=coffre");
    // Over StartTLS too.
    let (code, out, err) = lab.run(
        "ldapwhoami",
        &[
            "-H",
            &lab.ldap_uri(),
            "-ZZ",
            "-x",
            "-D",
            &format!("uid=alice,ou=people,{BASE}"),
            "-w",
            "right horse battery",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "dn:uid=alice,ou=people,dc=team,dc=coffre");

    lab.server.set_live(Live {
        locked: false,
        present: vec![],
    });
    let (code, _, err) = lab.whoami("alice", "right horse battery");
    assert_eq!(code, 49, "no session: {err}");
    assert!(err.contains("Invalid credentials"), "{err}");
    lab.server.set_live(Live {
        locked: true,
        present: vec!["alice".into()],
    });
    assert_eq!(lab.whoami("alice", "right horse battery").0, 49, "locked");
    lab.server.set_live(Live {
        locked: false,
        present: vec!["alice".into(), "bob".into(), "carol".into()],
    });
    assert_eq!(lab.whoami("bob", "anything").0, 49, "no password");
    assert_eq!(lab.whoami("carol", "carol's").0, 49, "not this VM's");
    assert_eq!(
        lab.whoami("alice", "right horse battery").0,
        0,
        "refusals without the KDF throttle nothing"
    );
    // Anonymous.
    let (code, out, _) = lab.run("ldapwhoami", &["-H", &lab.ldaps_uri(), "-x"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "anonymous");

    let (events, _) = lab.server.drain_events();
    let got: Vec<(&str, Outcome)> = events
        .iter()
        .map(|e| (e.user.as_str(), e.outcome))
        .collect();
    assert_eq!(
        got,
        [
            ("alice", Outcome::Ok),
            ("alice", Outcome::Ok),
            ("alice", Outcome::NoSession),
            ("alice", Outcome::Locked),
            ("bob", Outcome::NoPassword),
            ("carol", Outcome::NotPermitted),
            ("alice", Outcome::Ok),
        ]
    );
}

#[test]
#[ignore = "system: needs ldap-utils"]
fn wrong_passwords_are_refused_then_throttled() {
    let lab = Lab::new("throttle");
    let (code, _, err) = lab.whoami("alice", "wrong");
    assert_eq!(code, 49, "{err}");
    let t = Instant::now();
    let (code, _, _) = lab.whoami("alice", "right horse battery");
    assert_eq!(code, 49, "within the wait, even the right password");
    // After the wait, the right password works.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(t.elapsed()));
    let (code, _, err) = lab.whoami("alice", "right horse battery");
    assert_eq!(code, 0, "{err}");
    let outcomes: Vec<Outcome> = lab
        .server
        .drain_events()
        .0
        .iter()
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [Outcome::WrongPassword, Outcome::Throttled, Outcome::Ok]
    );
}

#[test]
#[ignore = "system: needs ldap-utils"]
fn a_user_removed_disappears_on_an_open_connection() {
    let lab = Lab::new("removed");
    // ldapsearch -f runs one search per line of a file, on one
    // connection: a FIFO lets the test change the directory between two.
    let fifo = lab.dir.join("filters");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // Counted before the client starts: once the FIFO opens it may
    // connect at any moment.
    let connections = lab.server.stats.connections.load(Ordering::Relaxed);
    let searches = lab.server.stats.searches.load(Ordering::Relaxed);
    let child = lab
        .tool(
            "ldapsearch",
            &[
                "-H",
                &lab.ldaps_uri(),
                "-x",
                "-LLL",
                "-b",
                BASE,
                "-f",
                fifo.to_str().unwrap(),
                "(uid=%s)",
                "uid",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writeln!(w, "bob").unwrap();
    w.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.server.stats.searches.load(Ordering::Relaxed) == searches {
        assert!(Instant::now() < deadline, "the first search never came");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = spec();
    s.clients[0].users.retain(|u| u != "bob");
    lab.server.set_directory(s).unwrap();
    writeln!(w, "bob").unwrap();
    drop(w);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        dns(&stdout),
        ["uid=bob,ou=people,dc=team,dc=coffre"],
        "bob once, before the change: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lab.server.stats.searches.load(Ordering::Relaxed),
        searches + 2
    );
    assert_eq!(
        lab.server.stats.connections.load(Ordering::Relaxed),
        connections + 1,
        "both searches on one connection"
    );
}

#[test]
#[ignore = "system: needs ldap-utils"]
fn pages_of_two_return_every_entry() {
    let lab = Lab::new("paging");
    let searches = lab.server.stats.searches.load(Ordering::Relaxed);
    let (code, out, err) = lab.search(
        &lab.ldaps_uri(),
        &["-E", "pr=2/noprompt"],
        "(objectClass=*)",
    );
    assert_eq!(code, 0, "{err}");
    let mut got = dns(&out);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "cn=team,ou=groups,dc=team,dc=coffre",
            "dc=team,dc=coffre",
            "ou=groups,dc=team,dc=coffre",
            "ou=people,dc=team,dc=coffre",
            "uid=alice,ou=people,dc=team,dc=coffre",
            "uid=bob,ou=people,dc=team,dc=coffre",
        ]
    );
    assert!(
        lab.server.stats.searches.load(Ordering::Relaxed) >= searches + 3,
        "six entries in pages of two take three searches"
    );
    // A size limit below the count: what fits, and the code that says so.
    let (code, out, _) = lab.search(&lab.ldaps_uri(), &["-z", "2"], "(objectClass=*)");
    assert_eq!(code, 4, "sizeLimitExceeded");
    assert_eq!(dns(&out).len(), 2);
}

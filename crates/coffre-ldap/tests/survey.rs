//! Benchmark (a survey, not a test: `scripts/bench-directory` runs it):
//! getent-style lookups from a workload, the vault's LDAP server against
//! slapd serving the same entries, same run, same client. One
//! `ldapsearch -f` per run: one LDAPS connection, then one search per
//! name, one after the other, as nslcd asks (latency-bound, like a
//! login).

use coffre_ldap::Server;
use coffre_ldap::spec::{Client, DirectorySpec, Group, Live, User};
use coffre_testkit::process::free_port;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BASE: &str = "dc=bench,dc=coffre";
const USERS: u32 = 200;
const TEAM_GID: u32 = 69_999;

fn name(i: u32) -> String {
    format!("u{i:03}")
}

fn spec() -> DirectorySpec {
    let mut users = Vec::new();
    let mut groups = Vec::new();
    for i in 0..USERS {
        let n = name(i);
        users.push(User {
            name: n.clone(),
            uid: 70_000 + i,
            gid: 70_000 + i,
            gecos: n.clone(),
            home: format!("/home/{n}"),
            shell: "/bin/sh".into(),
            ssh_keys: vec![],
            verifier: None,
        });
        groups.push(Group {
            name: n.clone(),
            gid: 70_000 + i,
            members: vec![n],
        });
    }
    groups.push(Group {
        name: "_team".into(),
        gid: TEAM_GID,
        members: (0..USERS).map(name).collect(),
    });
    let all_groups = groups.iter().map(|g| g.name.clone()).collect();
    DirectorySpec {
        base: BASE.into(),
        clients: vec![Client {
            address: "127.0.0.1".parse().unwrap(),
            workload: "bench".into(),
            users: (0..USERS).map(name).collect(),
            groups: all_groups,
        }],
        users,
        groups,
    }
}

/// The same entries as LDIF, for slapd.
fn ldif() -> String {
    let mut s = format!(
        "dn: {BASE}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\ndc: bench\no: bench\n\n\
         dn: ou=people,{BASE}\nobjectClass: top\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,{BASE}\nobjectClass: top\nobjectClass: organizationalUnit\nou: groups\n\n"
    );
    let spec = spec();
    for u in &spec.users {
        s.push_str(&format!(
            "dn: uid={n},ou=people,{BASE}\nobjectClass: top\nobjectClass: account\nobjectClass: posixAccount\n\
             uid: {n}\ncn: {n}\nuidNumber: {}\ngidNumber: {}\nhomeDirectory: {}\nloginShell: {}\ngecos: {}\n\n",
            u.uid,
            u.gid,
            u.home,
            u.shell,
            u.gecos,
            n = u.name
        ));
    }
    for g in &spec.groups {
        s.push_str(&format!(
            "dn: cn={n},ou=groups,{BASE}\nobjectClass: top\nobjectClass: posixGroup\ncn: {n}\ngidNumber: {}\n",
            g.gid,
            n = g.name
        ));
        for m in &g.members {
            s.push_str(&format!("memberUid: {m}\n"));
        }
        s.push('\n');
    }
    s
}

struct Slapd(Child);

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_slapd(dir: &Path, cert: &Path, key: &Path) -> (Slapd, u16) {
    let db = dir.join("db");
    std::fs::create_dir_all(&db).unwrap();
    let conf = dir.join("slapd.conf");
    std::fs::write(
        &conf,
        format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/nis.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n\
             pidfile {d}/slapd.pid\nTLSCertificateFile {c}\nTLSCertificateKeyFile {k}\n\
             database mdb\nmaxsize 104857600\nsuffix \"{BASE}\"\nrootdn \"cn=admin,{BASE}\"\n\
             directory {db}\nindex objectClass eq\nindex uid,memberUid,cn eq\n\
             access to * by * read\n",
            d = dir.display(),
            c = cert.display(),
            k = key.display(),
            db = db.display(),
        ),
    )
    .unwrap();
    let ldif_file = dir.join("init.ldif");
    std::fs::write(&ldif_file, ldif()).unwrap();
    let out = Command::new("slapadd")
        .args(["-q", "-f"])
        .arg(&conf)
        .arg("-l")
        .arg(&ldif_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "slapadd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let child = Command::new("slapd")
        .arg("-f")
        .arg(&conf)
        .args(["-h", &format!("ldaps://127.0.0.1:{port}/"), "-d", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Slapd(child), port)
}

/// One run: `lines` searches on one connection; the time it took.
fn run(ca: &Path, port: u16, names: &Path, filter: &str) -> Duration {
    let t = Instant::now();
    let out = Command::new("ldapsearch")
        .env("LDAPCONF", "/dev/null")
        .env("LDAPRC", "/dev/null")
        .env("LDAPTLS_CACERT", ca)
        .env("LDAPTLS_REQCERT", "demand")
        .args([
            "-x",
            "-LLL",
            "-H",
            &format!("ldaps://127.0.0.1:{port}"),
            "-b",
            BASE,
            "-f",
        ])
        .arg(names)
        .arg(filter)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "ldapsearch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found = String::from_utf8_lossy(&out.stdout)
        .matches("\ndn: ")
        .count()
        + 1;
    assert!(found >= 100, "only {found} entries found");
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "survey: a benchmark against slapd (scripts/bench-directory)"]
fn survey_directory_lookups_against_slapd() {
    coffre_testkit::require(&[coffre_testkit::Need::LdapClient]);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ldap-survey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "coffre bench CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    // The vault's server, in this process (the test profile is optimised).
    let server = Arc::new(Server::new().unwrap());
    server.set_tls(&cert.pem(), &key.serialize_pem()).unwrap();
    assert!(server.set_directory(spec()).unwrap().is_empty());
    server.set_live(Live::default());
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let ldaps = TcpListener::bind("127.0.0.1:0").unwrap();
    let coffre_port = ldaps.local_addr().unwrap().port();
    let s = Arc::clone(&server);
    std::thread::spawn(move || s.serve(plain, ldaps));

    let (_slapd, slapd_port) = start_slapd(&dir, &cert_file, &key_file);
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", slapd_port)).is_err() {
        assert!(Instant::now() < until, "slapd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let lookups: usize = std::env::var("COFFRE_BENCH_LOOKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let names = dir.join("names");
    let text: String = (0..lookups)
        .map(|i| format!("{}\n", name(u32::try_from(i).unwrap() * 7 % USERS)))
        .collect();
    std::fs::write(&names, text).unwrap();
    println!(
        "directory benchmark: {lookups} lookups per run on one LDAPS connection, {USERS} accounts, ldapsearch -f; 5 runs each, alternated; medians"
    );
    for (what, filter) in [
        ("passwd by name  ", "(&(objectClass=posixAccount)(uid=%s))"),
        (
            "groups of a user",
            "(&(objectClass=posixGroup)(memberUid=%s))",
        ),
    ] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        run(&ca_file, coffre_port, &names, filter);
        run(&ca_file, slapd_port, &names, filter);
        for _ in 0..5 {
            ours.push(lookups as f64 / run(&ca_file, coffre_port, &names, filter).as_secs_f64());
            theirs.push(lookups as f64 / run(&ca_file, slapd_port, &names, filter).as_secs_f64());
        }
        let (o, t) = (median(ours.clone()), median(theirs.clone()));
        let spread = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0f64), |(a, b), x| (a.min(*x), b.max(*x)));
            format!("{lo:.0}-{hi:.0}")
        };
        println!(
            "  {what}: coffre {o:.0}/s ({}), slapd {t:.0}/s ({}): x{:.2}",
            spread(&ours),
            spread(&theirs),
            o / t
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

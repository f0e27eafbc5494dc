//! The vault's directory: members' numbers given by the vault (and
//! imported once from an older vault's `[data.members]`), the files and
//! workloads that carry them, and the LDAP server the workloads ask, with
//! real OpenLDAP clients (`ldapsearch`, `ldapwhoami`) and nslcd resolving
//! `getent passwd` in a workload's network namespace.

use crate::harness::*;
use crate::network::{Lab, nsenter};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A project workload running as the member alice: it writes who it
/// runs as into the team's `shared/`, then waits.
const AS_ALICE: &str = r#"
[[workload]]
name = "as-alice"
kind = "process"
user = "alice"
command = ["/bin/sh", "-c", "echo \"$(id -u) $(id -g) $(id -G)\" > shared/as-alice.txt; exec sleep 1000"]
"#;

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `coffre serve` that must refuse to start: its stderr.
fn refused_start(v: &Vault) -> String {
    let mut c = v
        .bin()
        .args(["serve", v.dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while c.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = c.kill();
            let _ = c.wait();
            panic!("the daemon started when it should have refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = c.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn members_get_the_vaults_numbers_and_a_workload_runs_as_its_member() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.set_workloads("auto", AS_ALICE);
    v.start();
    v.add_member("alice", "bob", false);
    // Not a name guests' or the host's own accounts have: in a workload
    // the member would be that account.
    let inv = v.tmp.path().join("ubuntu.invitation");
    let out = v.authed(
        "alice",
        &["member", "invite", "ubuntu", "--out", inv.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("guest systems"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (au, ag) = v.ids_of("alice");
    let (bu, bg) = v.ids_of("bob");
    let team = v.team_gid();
    // From the default range, each with a private group of the same
    // number; init's superuser first, then the groups, then bob.
    for id in [au, bu, team] {
        assert!((65536..=99999).contains(&id), "{id}");
    }
    assert_eq!((au, bu), (ag, bg));
    assert!(au < team && team < bu, "{au} {team} {bu}");

    let mut enter = v.enter_bg("alice", &[]);
    let mp = v.layout().mountpoint;
    assert_eq!(owner_mode(&mp.join("home/alice")), (au, ag, 0o700));
    assert_eq!(owner_mode(&mp.join("home/bob")), (bu, bg, 0o700));
    assert_eq!(owner_mode(&mp.join("shared")), (0, team, 0o2770));
    // The workload's `user = "alice"` is the member: her uid, her group,
    // the team's and the superusers' groups; its files are hers.
    let file = mp.join("shared/as-alice.txt");
    wait_for("the workload's file", Duration::from_secs(20), || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.ends_with('\n'))
    });
    let ids = std::fs::read_to_string(&file).unwrap();
    let f: Vec<u32> = ids.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!((f[0], f[1]), (au, ag), "{ids}");
    assert!(f[2..].contains(&team), "{ids}");
    assert_eq!(owner_mode(&file).0, au);
    // `member list` shows the numbers.
    let out = v.cli("bob", &["member", "list", "--json"]);
    ok(&out);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bob = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "bob")
        .unwrap();
    assert_eq!(
        (bob["uid"].as_u64(), bob["gid"].as_u64()),
        (Some(bu.into()), Some(bg.into()))
    );

    // Removed: his home is root's at once, his number is never given
    // again.
    ok(&v.authed("alice", &["member", "remove", "bob"]));
    wait_for("bob's home to be root's", Duration::from_secs(10), || {
        owner_mode(&mp.join("home/bob")) == (0, 0, 0o700)
    });
    let a = v.accounts();
    assert!(a["users"]["bob"].is_null(), "{a}");
    assert_eq!(a["retired"][0], serde_json::json!(["bob", bu]));
    v.add_member("alice", "carol", false);
    let (cu, _) = v.ids_of("carol");
    assert!(cu > bu, "carol {cu} after bob {bu}");
    ok(&v.cli("alice", &["leave"]));
    assert_eq!(wait_exit(&mut enter, Duration::from_secs(30)), Some(0));
    v.stop();

    // A `[data.members]` section next to the vault's own numbers: refused,
    // saying why.
    let cfg = v.dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[data.members.alice]\nuid = 5001\ngid = 5001\n"),
    )
    .unwrap();
    let err = refused_start(&v);
    assert!(
        err.contains("[data.members]") && err.contains("remove them"),
        "{err}"
    );
    std::fs::write(&cfg, text).unwrap();
    v.start();
    assert_eq!(v.ids_of("alice"), (au, ag));
    v.stop();
}

#[test]
#[ignore = "system: needs root"]
fn an_older_vaults_numbers_are_imported_once_and_the_section_then_refused() {
    require(&[Need::Root]);
    let mut v = Vault::init(&[]);
    v.set_data(4242, 1, &[("alice", 5001, 5002), ("bob", 5003, 5003)]);
    v.start();
    assert_eq!(v.ids_of("alice"), (5001, 5002));
    assert_eq!(v.team_gid(), 4242);
    let a = v.accounts();
    assert_eq!(a["users"]["alice"]["origin"], "imported", "{a}");
    assert!(a["imported_at_ms"].is_u64(), "{a}");
    // Bob was listed but not a member yet: his numbers wait for him.
    v.add_member("alice", "bob", false);
    assert_eq!(v.ids_of("bob"), (5003, 5003));
    v.stop();
    // The next start refuses the section (kept in config.toml by hand).
    let err = refused_start(&v);
    assert!(
        err.contains("imported") && err.contains("[data.members]"),
        "{err}"
    );
    // Taken out (as the message says), the numbers stay.
    v.forget_imported_data();
    v.start();
    assert_eq!(v.ids_of("alice"), (5001, 5002));
    assert_eq!(v.team_gid(), 4242);
    v.stop();
}

/// The OpenLDAP clients, in namespace `ns`, trusting only the vault's
/// CA, with no configuration file of the host.
fn ldap_tool(ns: &str, ca: &Path, tool: &str, args: &[&str]) -> Output {
    nsenter(ns)
        .args(["env", "LDAPCONF=/dev/null", "LDAPRC=/dev/null"])
        .arg(format!("LDAPTLS_CACERT={}", ca.display()))
        .args(["LDAPTLS_REQCERT=demand", tool])
        .args(args)
        .output()
        .unwrap()
}

/// `ldapsearch` from `ns` over `url`: the entries, each as
/// (attribute, value) pairs.
fn search(ns: &str, ca: &Path, url: &str, base: &str, filter: &str) -> Vec<Vec<(String, String)>> {
    let mut args = vec!["-LLL", "-o", "ldif-wrap=no", "-x", "-H", url, "-b", base];
    if url.starts_with("ldap://") {
        args.push("-ZZ");
    }
    args.push(filter);
    let out = ldap_tool(ns, ca, "ldapsearch", &args);
    assert!(
        out.status.success(),
        "ldapsearch {url} {filter}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .filter_map(|l| l.split_once(": "))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn values<'a>(e: &'a [(String, String)], attr: &str) -> Vec<&'a str> {
    e.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn uids(entries: &[Vec<(String, String)>]) -> Vec<String> {
    let mut u: Vec<String> = entries
        .iter()
        .flat_map(|e| values(e, "uid").into_iter().map(str::to_string))
        .collect();
    u.sort();
    u
}

/// `ldapwhoami` from `ns` as `name` with `password`: Ok(the DN it says)
/// or Err(its error).
fn whoami(ns: &str, ca: &Path, base: &str, name: &str, password: &str) -> Result<String, String> {
    let dn = format!("uid={name},ou=people,{base}");
    let out = ldap_tool(
        ns,
        ca,
        "ldapwhoami",
        &["-x", "-H", "ldaps://10.9.0.1", "-D", &dn, "-w", password],
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A service workload on the vault network that only sleeps: its
/// namespace holds its address.
fn desk(name: &str, member: &str, last: u8) -> String {
    format!(
        r#"
[[workload]]
name = "{name}"
kind = "process"
role = "service"
members = ["{member}"]
user = "nobody"
network = true
address = "10.9.0.{last}"
command = ["/bin/sleep", "100000"]
"#
    )
}

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBAUJ6Uj2v7UrN1ZkCkqPS7Zp0o0Jv9yP4aZl8+jvG5o alice@laptop";

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces, nft, ldap-utils, nslcd"]
fn workloads_find_their_members_in_the_vaults_directory() {
    require(&[Need::LdapClient, Need::Nslcd]);
    let workloads = format!(
        "{}{}",
        desk("desk-a", "bob", 10),
        desk("desk-b", "alice", 20)
    );
    let mut lab = Lab::new(r#"subnet = "10.9.0.0/24""#, &workloads);
    let v = &mut lab.gw.vault;
    let st = v.status("alice");
    let base = st["directory"]["base"]
        .as_str()
        .expect("a directory")
        .to_string();
    assert!(base.ends_with(",dc=coffre"), "{base}");
    // The CA, where nslcd (its own user) can read it too.
    let pub_dir = tempfile::Builder::new()
        .prefix("coffre-ca")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        pub_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ca = pub_dir.path().join("ca.pem");
    std::fs::copy(v.dir.join("ca.pem"), &ca).unwrap();

    // Alice's SSH key and workload password, from her machine.
    let key_file = v.tmp.path().join("alice.pub");
    std::fs::write(&key_file, format!("{ED25519}\n")).unwrap();
    ok(&v.authed(
        "alice",
        &["member", "ssh-key", "add", key_file.to_str().unwrap()],
    ));
    let wpw = v.tmp.path().join("alice.wpw");
    std::fs::write(&wpw, "alice's workload password").unwrap();
    ok(&v.authed(
        "alice",
        &[
            "member",
            "workload-password",
            "--new-password-file",
            wpw.to_str().unwrap(),
        ],
    ));
    let listed = v.authed("alice", &["member", "ssh-key", "list", "--json"]);
    ok(&listed);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("alice@laptop"));
    let (au, _) = v.ids_of("alice");
    let (bu, _) = v.ids_of("bob");
    let team = v.team_gid();

    let id = std::fs::canonicalize(&v.dir).unwrap();
    let ns = |w: &str| coffre_net::names::netns(id.to_str().unwrap(), w);
    let (na, nb) = (ns("desk-a"), ns("desk-b"));
    wait_for("the workloads' namespaces", Duration::from_secs(20), || {
        Path::new(&format!("/run/netns/{na}")).exists()
            && Path::new(&format!("/run/netns/{nb}")).exists()
    });
    // desk-a is bob's: it sees bob and alice (a superuser may use every
    // workload); desk-b is alice's alone. Over LDAPS and StartTLS alike.
    for url in ["ldaps://10.9.0.1", "ldap://10.9.0.1"] {
        let people = search(&na, &ca, url, &base, "(objectClass=posixAccount)");
        assert_eq!(uids(&people), ["alice", "bob"], "{people:?}");
        let people = search(&nb, &ca, url, &base, "(objectClass=posixAccount)");
        assert_eq!(uids(&people), ["alice"], "{people:?}");
    }
    let alice = search(&nb, &ca, "ldaps://10.9.0.1", &base, "(uid=alice)");
    assert_eq!(alice.len(), 1);
    let e = &alice[0];
    assert_eq!(values(e, "uidNumber"), [au.to_string()]);
    assert_eq!(values(e, "gidNumber"), [au.to_string()]);
    assert_eq!(values(e, "sshPublicKey"), [ED25519]);
    assert!(values(e, "userPassword").is_empty());
    // Groups: desk-b sees the team with alice only in it, never bob.
    let groups = search(
        &nb,
        &ca,
        "ldaps://10.9.0.1",
        &base,
        "(objectClass=posixGroup)",
    );
    let team_entry = groups
        .iter()
        .find(|g| values(g, "cn") == ["_team"])
        .expect("the team's group");
    assert_eq!(values(team_entry, "gidNumber"), [team.to_string()]);
    assert_eq!(values(team_entry, "memberUid"), ["alice"]);
    assert!(!format!("{groups:?}").contains("bob"), "{groups:?}");
    // The LDAP server that answered opens no file (Landlock: fully on a
    // kernel of 6.12 or later, as here and in CI).
    let ldap_log = std::fs::read_to_string(v.dir.join("run/ldap.log")).unwrap();
    assert!(
        ldap_log.contains("confined to no file (fully by Landlock)"),
        "{ldap_log}"
    );
    assert!(ldap_log.contains("seccomp filter on ("), "{ldap_log}");
    // As a user of its own, within its limits.
    let ldap_pid = v.status("alice")["directory"]["pid"]
        .as_u64()
        .expect("the LDAP server's pid in status");
    own_user_and_limits(
        u32::try_from(ldap_pid).unwrap(),
        &coffre_ldap::control::LIMITS,
    );
    // `coffre status` says where it is and what it served.
    let text = v.cli("alice", &["status"]);
    ok(&text);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains(&format!(
            "directory: ldaps://10.9.0.1/ and ldap://10.9.0.1/ with StartTLS, base {base}, for the workloads; server pid"
        )),
        "{text}"
    );
    wait_for(
        "the server's counters in status",
        Duration::from_secs(5),
        || v.status("alice")["directory"]["stats"]["searches"].as_u64() >= Some(6),
    );
    // Without TLS: refused.
    let plain = ldap_tool(
        &na,
        &ca,
        "ldapsearch",
        &[
            "-LLL",
            "-x",
            "-H",
            "ldap://10.9.0.1",
            "-b",
            &base,
            "(uid=*)",
        ],
    );
    assert!(
        !plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stdout)
    );
    // The workload password binds only while alice is inside: she
    // comes in through the VPN.
    let pw = "alice's workload password";
    assert!(
        whoami(&nb, &ca, &base, "alice", pw).is_err(),
        "outside: refused"
    );
    // A decoy (see the flood of guesses below).
    assert!(whoami(&na, &ca, &base, "alice", pw).is_err());
    let _alice_vpn = lab.gw.connect("alice", 0);
    let dn = format!("dn:uid=alice,ou=people,{base}");
    wait_for("alice's bind", Duration::from_secs(10), || {
        whoami(&nb, &ca, &base, "alice", pw).as_deref() == Ok(dn.as_str())
    });
    // From her VPN address the directory is out of reach (the firewall),
    // though the vault network's workloads are routed to her.
    let vpn = ldap_tool(
        lab.client(0),
        &ca,
        "ldapsearch",
        &[
            "-LLL",
            "-x",
            "-o",
            "nettimeout=3",
            "-H",
            "ldaps://10.9.0.1",
            "-b",
            &base,
        ],
    );
    assert!(
        !vpn.status.success(),
        "{}",
        String::from_utf8_lossy(&vpn.stdout)
    );
    let v = &mut lab.gw.vault;
    // Her vault password is not her workload password.
    let e = whoami(&nb, &ca, &base, "alice", "alice's password").unwrap_err();
    assert!(
        e.contains("Invalid credentials") || e.contains("(49)"),
        "{e}"
    );

    // nslcd in desk-b's network namespace, in a mount namespace of its
    // own (its socket directory, its nsswitch.conf), resolves her.
    let conf_dir = tempfile::Builder::new()
        .prefix("coffre-nslcd")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        conf_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let nslcd_conf = conf_dir.path().join("nslcd.conf");
    std::fs::write(
        &nslcd_conf,
        format!(
            "uid nslcd\ngid nslcd\nuri ldaps://10.9.0.1/\nbase {base}\ntls_reqcert demand\ntls_cacertfile {}\n",
            ca.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &nslcd_conf,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let nsswitch = conf_dir.path().join("nsswitch.conf");
    // `files` first: nslcd looks its own user up.
    std::fs::write(&nsswitch, "passwd: files ldap\ngroup: files ldap\n").unwrap();
    let script = format!(
        r#"set -e
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/nslcd && chown nslcd:nslcd /run/nslcd
mount --bind {conf} /etc/nslcd.conf
mount --bind {nss} /etc/nsswitch.conf
nslcd -d 2>{dir}/nslcd.log &
pid=$!
i=0; while [ ! -S /run/nslcd/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
getent passwd alice || echo "getent failed"
getent group _team || echo "getent failed"
getent passwd bob || echo "no bob"
kill $pid
"#,
        conf = nslcd_conf.display(),
        nss = nsswitch.display(),
        dir = conf_dir.path().display(),
    );
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{nb}"))
        .args([
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(conf_dir.path().join("nslcd.log")).unwrap_or_default();
    assert!(
        // nslcd shows `*` for a password it was not given.
        text.contains(&format!("alice:*:{au}:{au}:alice:/home/alice:/bin/sh")),
        "{text}\n{}\nnslcd: {log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("_team:*:{team}:alice\n")), "{text}");
    assert!(text.contains("no bob"), "{text}");

    // A flood of wrong binds from a workload: refused, throttled, and the
    // vault neither locks nor slows bob's enter. The decoy above (a bind
    // as alice from desk-a while she was outside, the same outcome as
    // these, within the minute) does not keep bob's name out of the
    // audit log.
    for _ in 0..40 {
        let _ = whoami(&na, &ca, &base, "bob", "guess");
    }
    let st = v.status("alice");
    assert_eq!(st["state"], "open", "{st}");
    let mut bob_in = v.enter_bg("bob", &[]);
    ok(&v.cli("bob", &["leave"]));
    assert_eq!(wait_exit(&mut bob_in, Duration::from_secs(30)), Some(0));
    // Audited, counted rather than one record per guess.
    let audit = v.cli("alice", &["audit", "show", "--json"]);
    ok(&audit);
    let records: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let binds: Vec<&serde_json::Value> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["record"])
        .filter(|r| r["action"] == "directory_bind")
        .collect();
    assert!(
        binds.iter().any(|r| r["result"] == "ok"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("as alice from workload desk-b"))),
        "{binds:?}"
    );
    assert!(
        binds.iter().any(|r| r["result"] == "no_session"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("as bob from workload desk-a"))),
        "the guesses at bob's password went unnamed: {binds:?}"
    );
    // The server's word never makes a member the actor of a record.
    assert!(binds.iter().all(|r| r["actor"] == "coffre"), "{binds:?}");
    assert!(binds.len() < 20, "one record per guess: {}", binds.len());
    assert!(!format!("{binds:?}").contains("guess"));

    // Removed: gone from the directory at once.
    ok(&v.authed("alice", &["member", "remove", "bob"]));
    wait_for(
        "bob gone from the directory",
        Duration::from_secs(2),
        || {
            uids(&search(
                &na,
                &ca,
                "ldaps://10.9.0.1",
                &base,
                "(objectClass=posixAccount)",
            )) == ["alice"]
        },
    );
    assert!(
        search(
            &na,
            &ca,
            "ldaps://10.9.0.1",
            &base,
            &format!("(uidNumber={bu})")
        )
        .is_empty()
    );

    // Locked: alice's workload password no longer binds.
    ok(&v.authed("alice", &["lock", "--reason", "drill"]));
    wait_for("the lock at the directory", Duration::from_secs(10), || {
        whoami(&nb, &ca, &base, "alice", pw).is_err()
    });
}

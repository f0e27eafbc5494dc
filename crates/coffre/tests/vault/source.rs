//! The organisation's directory as the source of members (issue 16, part
//! 2), against a real slapd with the ppolicy overlay: who may enter, be
//! invited and join; what a change in the directory does to members
//! inside; what an unreachable directory refuses and what it never
//! blocks.

use crate::harness::*;
use std::time::{Duration, Instant};

pub(crate) const BASE: &str = "dc=example,dc=org";
const PEOPLE: &str = "ou=people,dc=example,dc=org";
const TEAM: &str = "cn=team,ou=groups,dc=example,dc=org";
const ADMINS: &str = "cn=admins,ou=groups,dc=example,dc=org";
const SERVICE: &str = "cn=coffre,ou=services,dc=example,dc=org";

fn dn(name: &str) -> String {
    format!("uid={name},{PEOPLE}")
}

/// alice (superuser), bob, erin, frank, hank and gina in the team (their
/// passwords are the vault's test passwords, "NAME's password", except
/// frank's); carol outside it; alice alone in admins. Numbers from 70001
/// (inside the vault's default range), gina's from 120001 (outside).
pub(crate) fn ldif() -> String {
    let mut l = format!(
        "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n\
         dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n\n\
         dn: ou=policies,{BASE}\nobjectClass: organizationalUnit\nou: policies\n\n\
         dn: {SERVICE}\nobjectClass: person\ncn: coffre\nsn: coffre\nuserPassword: service secret\n\n\
         dn: cn=default,ou=policies,{BASE}\nobjectClass: person\nobjectClass: pwdPolicy\ncn: default\nsn: default\n\
         pwdAttribute: userPassword\npwdLockout: TRUE\npwdMaxFailure: 3\n\n"
    );
    for (i, name) in ["alice", "bob", "carol", "erin", "frank", "hank", "gina"]
        .iter()
        .enumerate()
    {
        let pw = if *name == "frank" {
            "frank's other password".to_string()
        } else {
            format!("{name}'s password")
        };
        l += &format!(
            "dn: {}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\nobjectClass: shadowAccount\n\
             uid: {name}\ncn: {name}\nsn: {name}\nuidNumber: {n}\ngidNumber: {n}\nhomeDirectory: /home/{name}\n\
             userPassword: {pw}\n\n",
            dn(name),
            n = if *name == "gina" { 120001 } else { 70001 + i }
        );
    }
    l += &format!("dn: {TEAM}\nobjectClass: groupOfNames\ncn: team\n");
    for n in ["alice", "bob", "erin", "frank", "hank", "gina"] {
        l += &format!("member: {}\n", dn(n));
    }
    l += &format!(
        "\ndn: {ADMINS}\nobjectClass: groupOfNames\ncn: admins\nmember: {}\n\n",
        dn("alice")
    );
    l
}

/// Adds `[directory]` to the vault's config.toml, with the service
/// account's password in DIR/ldap.pw (0600).
pub(crate) fn configure(v: &Vault, slapd: &coffre_testkit::slapd::Slapd, extra: &str) {
    use std::os::unix::fs::PermissionsExt;
    let pw = v.dir.join("ldap.pw");
    std::fs::write(&pw, "service secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = v.dir.join("config.toml");
    let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
    let mut d: toml::Table = format!(
        "url = {:?}\nca_file = {:?}\nbind_dn = {SERVICE:?}\nbind_password_file = \"ldap.pw\"\n\
         people = {PEOPLE:?}\nmembers_group = {TEAM:?}\nsuperusers_group = {ADMINS:?}\n\
         recheck_s = 5\nmax_stale_s = 12\n{extra}",
        slapd.ldaps_url(),
        slapd.ca_pem().display().to_string()
    )
    .parse()
    .unwrap();
    if let Some(old) = t.get("directory").and_then(|x| x.as_table()) {
        for (k, val) in old {
            d.entry(k.clone()).or_insert(val.clone());
        }
    }
    t.insert("directory".into(), toml::Value::Table(d));
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An audit record with this action whose result starts with `result`
/// and whose detail has `needle`, waited for.
pub(crate) fn wait_audit(v: &Vault, action: &str, result: &str, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let hit = v.audit().iter().any(|e| {
            let r = &e["record"];
            r["action"] == action
                && r["result"].as_str().is_some_and(|x| x.starts_with(result))
                && r["detail"].as_str().is_some_and(|d| d.contains(needle))
        });
        if hit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {action} {result} record with {needle:?}: {:#?}",
            v.audit()
                .iter()
                .rev()
                .take(12)
                .map(|e| e["record"].clone())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn set_locked(slapd: &coffre_testkit::slapd::Slapd, name: &str, locked: bool) {
    let change = if locked {
        "add: pwdAccountLockedTime\npwdAccountLockedTime: 000001010000Z"
    } else {
        "delete: pwdAccountLockedTime"
    };
    slapd.modify(&format!("dn: {}\nchangetype: modify\n{change}\n", dn(name)));
}

fn set_in_team(slapd: &coffre_testkit::slapd::Slapd, name: &str, member: bool) {
    let op = if member { "add" } else { "delete" };
    slapd.modify(&format!(
        "dn: {TEAM}\nchangetype: modify\n{op}: member\nmember: {}\n",
        dn(name)
    ));
}

/// Enter once (and leave): the exit code and what was said.
fn enter_once(v: &mut Vault, name: &str) -> (i32, String) {
    let out = v.authed(name, &["enter", "--detach", "--heartbeat", "1"]);
    let c = code(&out);
    if c == 0 {
        let l = v.cli(name, &["leave"]);
        assert_eq!(code(&l), 0, "{}", stderr(&l));
    }
    (c, stderr(&out))
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, slapd, ldap-utils"]
fn who_may_enter_be_invited_and_join() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Slapd,
        Need::LdapClient,
    ]);
    let slapd = coffre_testkit::slapd::Slapd::start(BASE, &ldif());
    let mut v = Vault::init(&[]);
    v.set_policy("throttle_base_ms", 1);
    v.set_policy("throttle_max_ms", 1);
    configure(&v, &slapd, "");
    v.start();
    let st = v.status("alice");
    assert_eq!(st["source"]["reachable"], true, "{}", st["source"]);

    // Invitations: the invitee must qualify (carol is outside the team;
    // zed has no account), bob and erin do.
    let inv = v.tmp.path().join("carol.invitation");
    let out = v.authed(
        "alice",
        &["member", "invite", "carol", "--out", inv.to_str().unwrap()],
    );
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("does not qualify in the organisation's directory"),
        "{}",
        stderr(&out)
    );
    assert!(!inv.exists());
    let zed = v.tmp.path().join("zed.invitation");
    let out = v.authed(
        "alice",
        &["member", "invite", "zed", "--out", zed.to_str().unwrap()],
    );
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("no account"), "{}", stderr(&out));
    v.add_member("alice", "bob", false);
    v.add_member("alice", "erin", false);
    // A superuser invitation needs superusers_group: frank qualifies only
    // as a member.
    let su = v.tmp.path().join("frank-su.invitation");
    let out = v.authed(
        "alice",
        &[
            "member",
            "invite",
            "frank",
            "--role",
            "superuser",
            "--out",
            su.to_str().unwrap(),
        ],
    );
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("superusers_group"),
        "{}",
        stderr(&out)
    );

    // At join too: frank's invitation made while he qualified, used after
    // he left the team.
    let inv = v.tmp.path().join("frank.invitation");
    let out = v.authed(
        "alice",
        &["member", "invite", "frank", "--out", inv.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    set_in_team(&slapd, "frank", false);
    let out = v.join("frank", &inv);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("does not qualify"),
        "{}",
        stderr(&out)
    );
    set_in_team(&slapd, "frank", true);
    let out = v.join("frank", &inv);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    v.members.push(Member {
        name: "frank".into(),
        identity: v.tmp.path().join("frank.identity"),
        password: v.tmp.path().join("frank.pw"),
        secret: secret_from(&String::from_utf8(out.stdout).unwrap()),
        last_step: 0,
    });

    // Enter: a qualified account goes in.
    assert_eq!(enter_once(&mut v, "bob").0, 0);
    // A locked account: refused as a wrong password; the audit log says
    // why.
    set_locked(&slapd, "bob", true);
    let (c, e) = enter_once(&mut v, "bob");
    assert_eq!(c, 2, "{e}");
    assert!(e.contains("wrong password"), "{e}");
    wait_audit(
        &v,
        "enter",
        "refused:wrong_password",
        "locked",
        Duration::from_secs(5),
    );
    set_locked(&slapd, "bob", false);
    assert_eq!(enter_once(&mut v, "bob").0, 0);
    // Outside the group.
    set_in_team(&slapd, "bob", false);
    let (c, e) = enter_once(&mut v, "bob");
    assert_eq!(c, 2, "{e}");
    wait_audit(
        &v,
        "enter",
        "refused:wrong_password",
        "members_group",
        Duration::from_secs(5),
    );
    // Nor renew his certificate (a command with a password like any
    // other): refused as a wrong password, his identity file untouched.
    let identity = v.member("bob").identity.clone();
    let before = std::fs::read(&identity).unwrap();
    let refusals = |v: &Vault| {
        v.audit()
            .iter()
            .filter(|e| {
                e["record"]["result"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("refused"))
                    && e["record"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("members_group"))
            })
            .count()
    };
    let refused_before = refusals(&v);
    let out = v.authed("bob", &["renew"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(std::fs::read(&identity).unwrap(), before);
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusals(&v) == refused_before {
        assert!(Instant::now() < deadline, "no audit record of the refusal");
        std::thread::sleep(Duration::from_millis(200));
    }
    set_in_team(&slapd, "bob", true);
    // Back in the team, he renews.
    let out = v.authed("bob", &["renew"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_ne!(std::fs::read(&identity).unwrap(), before);
    // No account any more.
    slapd.modify(&format!("dn: {}\nchangetype: delete\n", dn("erin")));
    let (c, e) = enter_once(&mut v, "erin");
    assert_eq!(c, 2, "{e}");
    wait_audit(
        &v,
        "enter",
        "refused:wrong_password",
        "no account",
        Duration::from_secs(5),
    );
    // member list and status say who does not qualify, once checked.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = v.cli("alice", &["member", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let erin = list
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "erin")
            .unwrap()
            .clone();
        if erin["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("refused"))
        {
            let bob = list
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == "bob")
                .unwrap();
            assert_eq!(bob["source"], "qualifies");
            break;
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let text = String::from_utf8(v.cli("alice", &["status"]).stdout).unwrap();
    assert!(text.contains("erin does not qualify"), "{text}");

    // check_password: the password must also bind, only after the
    // keyslot opened. frank's vault password is not his directory one.
    v.stop();
    configure(&v, &slapd, "check_password = true\n");
    v.start();
    assert_eq!(enter_once(&mut v, "bob").0, 0);
    let (c, e) = enter_once(&mut v, "frank");
    assert_eq!(c, 2, "{e}");
    wait_audit(
        &v,
        "enter",
        "refused:wrong_password",
        "does not bind",
        Duration::from_secs(5),
    );
    // A wrong vault password never reaches the directory: bob's binds do
    // not move, and his organisation account is not locked by guesses
    // (the policy locks after 3 failures).
    let binds = slapd.binds_of(&dn("bob"));
    let bad = v.tmp.path().join("bad.pw");
    std::fs::write(&bad, "not bob's password").unwrap();
    for _ in 0..4 {
        let t = v.totp("bob");
        let out = v.cli(
            "bob",
            &[
                "enter",
                "--password-file",
                bad.to_str().unwrap(),
                "--totp",
                &t,
            ],
        );
        assert_eq!(code(&out), 2, "{}", stderr(&out));
    }
    assert_eq!(
        slapd.binds_of(&dn("bob")),
        binds,
        "guesses reached the directory"
    );
    assert_eq!(
        enter_once(&mut v, "bob").0,
        0,
        "bob's account is not locked"
    );
    // passwd: the new password must be the directory's.
    let new = v.tmp.path().join("bob.new");
    std::fs::write(&new, "bob's new password").unwrap();
    let out = v.authed(
        "bob",
        &["passwd", "--new-password-file", new.to_str().unwrap()],
    );
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("change it there first"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        enter_once(&mut v, "bob").0,
        0,
        "the old password still opens"
    );
    // The right order: the directory's password first, then the vault's.
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: userPassword\nuserPassword: bob's new password\n",
        dn("bob")
    ));
    let out = v.authed(
        "bob",
        &["passwd", "--new-password-file", new.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let pw = v.member("bob").password.clone();
    std::fs::write(&pw, "bob's new password").unwrap();
    assert_eq!(
        enter_once(&mut v, "bob").0,
        0,
        "the new password opens and binds"
    );

    // A promotion needs superusers_group at the last check: refused for
    // bob, then allowed once the check has him in admins.
    let out = v.authed("alice", &["member", "role", "bob", "superuser"]);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("superusers group"),
        "{}",
        stderr(&out)
    );
    let set_admin = |slapd: &coffre_testkit::slapd::Slapd, name: &str, admin: bool| {
        let op = if admin { "add" } else { "delete" };
        slapd.modify(&format!(
            "dn: {ADMINS}\nchangetype: modify\n{op}: member\nmember: {}\n",
            dn(name)
        ));
    };
    let member_field = |v: &Vault, name: &str, field: &str| {
        let out = v.cli("alice", &["member", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m[field].clone())
            .unwrap_or_else(|| panic!("{name} is not in {list}"))
    };
    let wait_standing = |v: &Vault, name: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while member_field(v, name, "source") != want {
            assert!(
                Instant::now() < deadline,
                "{name}: {}",
                member_field(v, name, "source")
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    set_admin(&slapd, "bob", true);
    wait_standing(&v, "bob", "qualifies (superuser)");
    let out = v.authed("alice", &["member", "role", "bob", "superuser"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Under a quorum of 2 the approval that carries a promotion out is
    // checked too: frank is in admins when alice proposes it, out of it
    // when bob approves (refused, he stays a member), back in it when
    // bob approves again (carried out).
    ok(&v.authed("alice", &["quorum", "2"]));
    set_admin(&slapd, "frank", true);
    wait_standing(&v, "frank", "qualifies (superuser)");
    ok(&v.authed("alice", &["member", "role", "frank", "superuser"]));
    let proposals = v.status("alice")["proposals"].clone();
    let id = proposals[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no proposal: {proposals}"))
        .to_string();
    assert_eq!(member_field(&v, "frank", "role"), "member");
    set_admin(&slapd, "frank", false);
    wait_standing(&v, "frank", "qualifies");
    let out = v.authed("bob", &["approve", &id]);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("superusers group"),
        "{}",
        stderr(&out)
    );
    assert_eq!(member_field(&v, "frank", "role"), "member");
    set_admin(&slapd, "frank", true);
    wait_standing(&v, "frank", "qualifies (superuser)");
    ok(&v.authed("bob", &["approve", &id]));
    assert_eq!(member_field(&v, "frank", "role"), "superuser");
    // As before: frank a member again, the quorum 1 (each a proposal
    // carried out by bob's approval).
    for cmd in [&["member", "role", "frank", "member"][..], &["quorum", "1"]] {
        ok(&v.authed("alice", cmd));
        let id = v.status("alice")["proposals"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        ok(&v.authed("bob", &["approve", &id]));
    }
    assert_eq!(member_field(&v, "frank", "role"), "member");
    assert_eq!(v.status("alice")["unlock_quorum"], 1);
    set_admin(&slapd, "frank", false);
    // A member asking for a promotion learns nothing from the directory:
    // the core's refusal (not a superuser) comes first.
    let out = v.authed("frank", &["member", "role", "frank", "superuser"]);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs a superuser"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("superusers group"),
        "{}",
        stderr(&out)
    );
    // Out of admins again (a superuser the organisation demoted), then
    // the directory stops answering: its last word still holds, and the
    // commands that never wait for it do not let him through.
    set_admin(&slapd, "bob", false);
    wait_standing(&v, "bob", "qualifies");

    // Unreachable: nobody enters, with a message that says why; a lock
    // and the unlock go on.
    let mut slapd = slapd;
    slapd.stop();
    let out = v.authed("bob", &["lock", "--reason", "not his to lock"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(v.state(), "closed");
    wait_audit(
        &v,
        "lock",
        "refused",
        "not in superusers_group (the directory's last answer",
        Duration::from_secs(5),
    );
    // Its last word outlives a restart of the daemon during the outage.
    v.stop();
    v.start();
    let out = v.authed("bob", &["lock", "--reason", "after a restart"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(v.state(), "closed");
    let (c, e) = enter_once(&mut v, "bob");
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("cannot be reached"), "{e}");
    let st = v.status("alice");
    assert_eq!(st["source"]["reachable"], false, "{}", st["source"]);
    let out = v.authed("alice", &["lock", "--reason", "drill"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    v.wait_state("locked", Duration::from_secs(30));
    // Locked, what the directory said of a name is told to nobody: a
    // superuser's promotion gets the core's refusal (locked), not the
    // directory's word on frank; and a member's never gets it either.
    let out = v.authed("alice", &["member", "role", "frank", "superuser"]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("superusers group"),
        "{}",
        stderr(&out)
    );
    let out = v.authed("alice", &["unlock"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    v.wait_state("closed", Duration::from_secs(30));
    slapd.run();
    assert_eq!(enter_once(&mut v, "bob").0, 0, "back once it answers");
    wait_audit(
        &v,
        "directory_source",
        "ok",
        "answers again",
        Duration::from_secs(10),
    );

    // ids = "directory": who joins now brings the directory's numbers;
    // members keep theirs (no chown).
    let bob_ids = v.ids_of("bob");
    v.stop();
    configure(&v, &slapd, "ids = \"directory\"\n");
    v.start();
    v.add_member("alice", "gina", false);
    assert_eq!(v.ids_of("gina"), (120001, 120001));
    assert_eq!(v.ids_of("bob"), bob_ids);
    assert_eq!(v.accounts()["users"]["gina"]["origin"], "directory");
    // hank's directory numbers fall inside the vault's own range: his
    // join is refused, saying why in the audit log.
    let inv = v.tmp.path().join("hank.invitation");
    let out = v.authed(
        "alice",
        &["member", "invite", "hank", "--out", inv.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = v.join("hank", &inv);
    assert_ne!(code(&out), 0);
    wait_audit(
        &v,
        "member_join",
        "refused",
        "inside the vault's own range",
        Duration::from_secs(5),
    );
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, slapd, ldap-utils"]
fn members_inside_are_checked_again() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Slapd,
        Need::LdapClient,
    ]);
    let mut slapd = coffre_testkit::slapd::Slapd::start(BASE, &ldif());
    let mut v = Vault::init(&[]);
    configure(&v, &slapd, "");
    v.start();
    v.add_member("alice", "bob", false);
    let mut alice = v.enter_bg("alice", &[]);
    let mut bob = v.enter_bg("bob", &[]);
    assert_eq!(v.state(), "open");
    // bob's account is locked while he is inside: out within recheck_s
    // (5 s) and a heartbeat; alice stays, and so does the data.
    set_locked(&slapd, "bob", true);
    let t = Instant::now();
    assert_eq!(wait_exit(&mut bob, Duration::from_secs(20)), Some(12));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(12), "{took:?}");
    wait_audit(
        &v,
        "member_disqualified",
        "ok",
        "bob",
        Duration::from_secs(5),
    );
    wait_audit(
        &v,
        "leave",
        "dropped",
        "no longer qualifies",
        Duration::from_secs(5),
    );
    assert_eq!(v.state(), "open");
    // The directory goes away: alice stays up to max_stale_s (12 s), then
    // she is out too and the vault closes by the usual rule.
    slapd.stop();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(v.state(), "open", "members inside stay a while");
    assert_eq!(wait_exit(&mut alice, Duration::from_secs(30)), Some(12));
    v.wait_state("closed", Duration::from_secs(30));
    wait_audit(
        &v,
        "member_disqualified",
        "ok",
        "max_stale_s",
        Duration::from_secs(5),
    );
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, slapd, ldap-utils, OpenVPN, network namespaces"]
fn through_the_vpn_a_disqualified_client_is_killed() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Slapd,
        Need::LdapClient,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let slapd = coffre_testkit::slapd::Slapd::start(BASE, &ldif());
    let v = Vault::init(&["--totp-period", "3"]);
    configure(&v, &slapd, "");
    let mut gw = crate::gateway::Gw::with_vault(v, &["bob"], 1, &[]);
    // The VPN's enter asks the directory too.
    let before = slapd.searches_with("(uid=bob)");
    let mut bob = gw.connect("bob", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    assert!(
        slapd.searches_with("(uid=bob)") > before,
        "{}",
        slapd.log_text()
    );
    // Out of the team while connected: killed within recheck_s.
    set_in_team(&slapd, "bob", false);
    assert!(bob.exited_within(Duration::from_secs(25)), "{}", bob.text());
    wait_audit(
        &gw.vault,
        "member_disqualified",
        "ok",
        "members_group",
        Duration::from_secs(5),
    );
    gw.vault.wait_state("closed", Duration::from_secs(20));
    // And refused at the next connection, as a wrong password.
    let auth = gw.auth_file("bob", None, false);
    let mut c = gw.client("bob", 0, &auth, &[]);
    assert!(c.exited_within(Duration::from_secs(30)), "{}", c.text());
    assert!(c.text().contains("AUTH_FAILED"), "{}", c.text());
    assert!(!c.text().contains(crate::gateway::UP));
}

/// Enter (the vault already open, so a keyslot check and a session) with
/// and without the organisation's directory, same run: what the source
/// adds is one search round trip, and one bind with check_password.
#[test]
#[ignore = "bench: needs root, FUSE, loop, mkfs.ext4, slapd, ldap-utils"]
fn survey_enter_with_and_without_the_source() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Slapd,
        Need::LdapClient,
    ]);
    let slapd = coffre_testkit::slapd::Slapd::start(BASE, &ldif());
    let mut v = Vault::init(&[]);
    v.start();
    v.add_member("alice", "bob", false);
    let rounds = 10;
    let measure = |v: &mut Vault| {
        let mut bob = v.enter_bg("bob", &[]);
        let mut times = Vec::new();
        for _ in 0..rounds {
            let totp = v.totp("alice");
            let pw = v.member("alice").password.clone();
            let t = Instant::now();
            let out = v.cli(
                "alice",
                &[
                    "enter",
                    "--detach",
                    "--heartbeat",
                    "1",
                    "--password-file",
                    pw.to_str().unwrap(),
                    "--totp",
                    &totp,
                ],
            );
            times.push(t.elapsed());
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            ok(&v.cli("alice", &["leave"]));
        }
        ok(&v.cli("bob", &["leave"]));
        wait_child(&mut bob, Duration::from_secs(10));
        times.sort();
        times[times.len() / 2]
    };
    let without = measure(&mut v);
    v.stop();
    configure(&v, &slapd, "check_password = true\n");
    v.start();
    let searches = slapd.searches_with("filter=\"(uid=alice)\"");
    let binds = slapd.binds_of(&dn("alice"));
    let with = measure(&mut v);
    let per_enter = |n: usize| n as f64 / rounds as f64;
    println!(
        "bench: enter (open vault, CLI, median of {rounds}) without the source {without:?}, with it and check_password {with:?}: ratio {:.2}, +{:?}; per enter the directory saw {:.1} account search(es) and {:.1} bind(s) as the member",
        with.as_secs_f64() / without.as_secs_f64(),
        with.saturating_sub(without),
        per_enter(slapd.searches_with("filter=\"(uid=alice)\"") - searches),
        per_enter(slapd.binds_of(&dn("alice")) - binds),
    );
    v.stop();
}

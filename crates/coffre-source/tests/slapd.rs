//! [`LdapDirectory`] against a real OpenLDAP server.
//!
//! Each test starts its own slapd ([`coffre_testkit::slapd`]: loopback
//! and a Unix socket, ppolicy, its own CA), loaded with this file's
//! entries. slapd logs every search it answered: the tests count searches
//! there as well as in the client's own counters.

use coffre_source::config::{Flavour, Ids, SourceConfig};
use coffre_source::{
    Directory, Disabled, FakeDirectory, Found, LdapDirectory, Limits, Refusal, SourceError,
};
use coffre_testkit::Need;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const NEEDS: &[Need] = &[Need::Slapd];
const BASE: &str = "dc=example,dc=org";
const PEOPLE: &str = "ou=people,dc=example,dc=org";
const TEAM: &str = "cn=team,ou=groups,dc=example,dc=org";
const ADMINS: &str = "cn=admins,ou=groups,dc=example,dc=org";
const SERVICE: &str = "cn=coffre,ou=services,dc=example,dc=org";
const SERVICE_PW: &str = "service secret";
/// Accounts u00..u31, all in the team, for the re-check of everyone.
const MANY: usize = 32;

fn person(name: &str, number: u32, extra: &str) -> String {
    person_in(name, number, PEOPLE, extra)
}

fn person_in(name: &str, number: u32, parent: &str, extra: &str) -> String {
    format!(
        "dn: uid={name},{parent}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\nobjectClass: shadowAccount\n\
         uid: {name}\ncn: {name}\nsn: {name}\nuidNumber: {number}\ngidNumber: {number}\n\
         homeDirectory: /home/{name}\nuserPassword: {name} password\n{extra}\n"
    )
}

fn ldif() -> String {
    let mut l = format!(
        "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n\
         dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n\n\
         dn: ou=policies,{BASE}\nobjectClass: organizationalUnit\nou: policies\n\n\
         dn: {SERVICE}\nobjectClass: person\ncn: coffre\nsn: coffre\nuserPassword: {SERVICE_PW}\n\n\
         dn: cn=default,ou=policies,{BASE}\nobjectClass: person\nobjectClass: pwdPolicy\ncn: default\nsn: default\n\
         pwdAttribute: userPassword\npwdLockout: TRUE\npwdMaxFailure: 3\n\n"
    );
    l += &person("alice", 70001, "");
    l += "\n";
    l += &person("bob", 70002, "");
    l += "\n";
    l += &person("carol", 70003, "");
    l += "\n";
    l += &person("dave", 70004, "pwdAccountLockedTime: 000001010000Z");
    l += "\n";
    l += &person("erin", 70005, "shadowExpire: 1");
    l += "\n";
    l += &person("frank", 70006, "");
    l += "\n";
    for i in 0..MANY {
        l += &person(&format!("u{i:02}"), 71000 + u32::try_from(i).unwrap(), "");
        l += "\n";
    }
    // A continuation reference inside people: every subtree search there
    // answers it, and it must be ignored, never chased.
    l += &format!(
        "dn: ou=elsewhere,{PEOPLE}\nobjectClass: referral\nobjectClass: extensibleObject\nou: elsewhere\n\
         ref: ldap://elsewhere.invalid/ou=people,dc=example,dc=org\n\n"
    );
    // Names more than one account has, in sub-units of people.
    for ou in ["a", "b", "c"] {
        l += &format!("dn: ou={ou},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou}\n\n");
    }
    for (n, ous) in [("twin", &["a", "b"][..]), ("trip", &["a", "b", "c"][..])] {
        for (k, ou) in ous.iter().enumerate() {
            l += &person_in(
                n,
                72000 + u32::try_from(k).unwrap(),
                &format!("ou={ou},{PEOPLE}"),
                "",
            );
            l += "\n";
        }
    }
    // An account one level down: its DN is not the one guessed.
    l += &person_in("oscar", 72100, &format!("ou=c,{PEOPLE}"), "");
    l += "\n";
    l += &format!("dn: {TEAM}\nobjectClass: groupOfNames\ncn: team\n");
    for n in ["alice", "bob", "dave", "erin"] {
        l += &format!("member: uid={n},{PEOPLE}\n");
    }
    l += &format!("member: uid=oscar,ou=c,{PEOPLE}\n");
    for i in 0..MANY {
        l += &format!("member: UID=u{i:02}, ou=People,{BASE}\n");
    }
    l += &format!(
        "\ndn: {ADMINS}\nobjectClass: posixGroup\ncn: admins\ngidNumber: 70100\nmemberUid: alice\nmemberUid: frank\n\n"
    );
    l += &ad_ldif();
    l
}

/// Active Directory's shapes: accounts of class `user` named by
/// `sAMAccountName` under a CN, `userAccountControl`, groups of class
/// `group`, with AD's own OIDs and matching rules. (Debian's
/// msuser.schema declares `sAMAccountName` without an equality rule, so no
/// server loaded with it can find an account by name, as every AD client
/// does; these few lines are what AD publishes for the attributes coffre
/// reads.) slapd maintains no `memberOf` and knows no in-chain matching
/// rule: the entries carry `memberOf` as AD shows it (direct groups).
const AD_SCHEMA: &str = "\
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.102 NAME 'memberOf' EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
objectclass ( 1.2.840.113556.1.5.9 NAME 'user' SUP organizationalPerson STRUCTURAL MAY ( sAMAccountName $ userAccountControl $ memberOf $ userPassword ) )
objectclass ( 1.2.840.113556.1.5.8 NAME 'group' SUP top STRUCTURAL MUST cn MAY ( member $ sAMAccountName $ memberOf ) )
";
const AD: &str = "ou=ad,dc=example,dc=org";
const AD_TEAM: &str = "cn=AD Team,ou=ad,dc=example,dc=org";

fn ad_ldif() -> String {
    let mut l = format!("dn: {AD}\nobjectClass: organizationalUnit\nou: ad\n\n");
    for (cn, sam, uac, member) in [
        ("Ada Lovelace", "ada", 512, true),
        ("Bo Disabled", "bo", 514, true),
        ("Cy Outside", "cy", 66048, false),
    ] {
        l += &format!(
            "dn: cn={cn},{AD}\nobjectClass: user\ncn: {cn}\nsn: {sam}\nsAMAccountName: {sam}\n\
             userAccountControl: {uac}\nuserPassword: {sam} password\n"
        );
        if member {
            l += &format!("memberOf: {AD_TEAM}\n");
        }
        l += "\n";
    }
    l += &format!(
        "dn: {AD_TEAM}\nobjectClass: group\ncn: AD Team\n\
         member: cn=Ada Lovelace,{AD}\nmember: cn=Bo Disabled,{AD}\n\n"
    );
    l
}

/// The shared slapd guard, loaded with this file's entries.
struct Slapd(coffre_testkit::slapd::Slapd);

impl std::ops::Deref for Slapd {
    type Target = coffre_testkit::slapd::Slapd;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Slapd {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Slapd {
    fn start() -> Slapd {
        coffre_testkit::require(NEEDS);
        Slapd(coffre_testkit::slapd::Slapd::start_with(
            BASE,
            &ldif(),
            AD_SCHEMA,
        ))
    }

    fn config(&self, url: String, starttls: bool) -> SourceConfig {
        SourceConfig {
            url,
            starttls,
            ca_file: Some(self.ca_pem()),
            bind_dn: SERVICE.into(),
            bind_password_file: "ldap.pw".into(),
            people: PEOPLE.into(),
            members_group: TEAM.into(),
            superusers_group: Some(ADMINS.into()),
            check_password: true,
            recheck_s: 60,
            max_stale_s: 3600,
            ids: Ids::Vault,
            flavour: Flavour::OpenLdap,
        }
    }

    fn ldaps_config(&self) -> SourceConfig {
        self.config(self.ldaps_url(), false)
    }

    fn directory(&self, config: SourceConfig) -> LdapDirectory {
        LdapDirectory::with_password(
            config,
            self.dir(),
            Zeroizing::new(SERVICE_PW.to_string()),
            Limits::default(),
        )
        .unwrap()
    }
}

fn account(rt: &tokio::runtime::Runtime, d: &LdapDirectory, name: &str) -> coffre_source::Account {
    rt.block_on(d.lookup(name))
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not found"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
#[ignore = "system: slapd"]
fn a_qualified_account_and_why_others_are_not() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();

    let alice = account(&rt, &d, "alice");
    assert_eq!(alice.dn, format!("uid=alice,{PEOPLE}"));
    assert!(
        alice.in_members_group && alice.in_superusers_group,
        "{alice:?}"
    );
    assert_eq!(alice.disabled, None);
    assert_eq!(
        (alice.uid_number, alice.gid_number),
        (Some(70001), Some(70001))
    );
    assert_eq!(alice.refusal(true), None);

    let bob = account(&rt, &d, "bob");
    assert_eq!(bob.refusal(false), None);
    assert_eq!(bob.refusal(true), Some(Refusal::NotInSuperusersGroup));

    // Not in the team; frank is a superuser by posixGroup memberUid alone.
    assert_eq!(
        account(&rt, &d, "carol").refusal(false),
        Some(Refusal::NotInMembersGroup)
    );
    let frank = account(&rt, &d, "frank");
    assert!(!frank.in_members_group && frank.in_superusers_group);

    // Unknown.
    assert_eq!(rt.block_on(d.lookup("zed")).unwrap(), None);

    // Locked by ppolicy; expired by shadowExpire.
    let dave = account(&rt, &d, "dave");
    assert!(dave.in_members_group);
    assert_eq!(
        dave.disabled,
        Some(Disabled::Locked {
            since: "000001010000Z".into()
        })
    );
    let erin = account(&rt, &d, "erin");
    assert_eq!(erin.disabled, Some(Disabled::Expired { shadow_expire: 1 }));

    // The same connection served them all.
    assert_eq!(d.stats().connects, 1);
}

#[test]
#[ignore = "system: slapd"]
fn active_directory_accounts_names_and_disabled_marks() {
    let slapd = Slapd::start();
    let mut c = slapd.ldaps_config();
    c.flavour = Flavour::ActiveDirectory;
    c.people = AD.into();
    c.members_group = AD_TEAM.into();
    c.superusers_group = None;
    let d = slapd.directory(c);
    let rt = rt();
    // Found by sAMAccountName under its CN; in the team directly (the
    // in-chain rule, unknown to slapd, falls back to memberOf).
    let ada = account(&rt, &d, "ada");
    assert_eq!(ada.dn, format!("cn=Ada Lovelace,{AD}"));
    assert_eq!(ada.refusal(false), None, "{ada:?}");
    // userAccountControl 514 has ACCOUNTDISABLE.
    let bo = account(&rt, &d, "bo");
    assert!(
        matches!(
            bo.refusal(false),
            Some(Refusal::Disabled(Disabled::AccountDisabled { .. }))
        ),
        "{bo:?}"
    );
    // 66048 (normal, password never expires) is not disabled; cy is
    // outside the team.
    let cy = account(&rt, &d, "cy");
    assert_eq!(cy.disabled, None);
    assert_eq!(cy.refusal(false), Some(Refusal::NotInMembersGroup));
    // The same, in one search for all.
    let names: Vec<String> = ["ada", "bo", "cy", "zed"].map(String::from).into();
    let found = rt.block_on(d.lookup_many(&names)).unwrap();
    let refusals: Vec<Option<Refusal>> = found.iter().map(|(_, f)| f.refusal(false)).collect();
    assert_eq!(refusals[0], None);
    assert!(matches!(refusals[1], Some(Refusal::Disabled(_))));
    assert_eq!(refusals[2], Some(Refusal::NotInMembersGroup));
    assert_eq!(refusals[3], Some(Refusal::NoAccount));
    // A password binds as the account's DN.
    assert!(
        rt.block_on(d.check_password(&ada.dn, "ada password"))
            .unwrap()
    );
    assert!(!rt.block_on(d.check_password(&ada.dn, "not ada's")).unwrap());
}

#[test]
#[ignore = "system: slapd"]
fn a_lookup_sends_its_group_checks_with_the_account_search() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();
    account(&rt, &d, "alice");
    // alice is directly under people: the group checks sent with the
    // account search (for the DN she most likely has) were the right
    // ones: three searches, one round trip.
    let before = d.stats().searches;
    let alice = account(&rt, &d, "alice");
    assert!(alice.in_members_group && alice.in_superusers_group);
    assert_eq!(d.stats().searches - before, 3);
    // oscar is one level down: the guess was wrong, the checks are asked
    // again with his DN, and the answer is still right.
    let before = d.stats().searches;
    let oscar = account(&rt, &d, "oscar");
    assert_eq!(oscar.dn, format!("uid=oscar,ou=c,{PEOPLE}"));
    assert!(
        oscar.in_members_group && !oscar.in_superusers_group,
        "{oscar:?}"
    );
    assert_eq!(d.stats().searches - before, 5);
    // carol, guessed right, is outside the team: the guess answers no.
    assert_eq!(
        account(&rt, &d, "carol").refusal(false),
        Some(Refusal::NotInMembersGroup)
    );
}

#[test]
#[ignore = "system: slapd"]
fn a_name_several_accounts_have_is_nobody_s() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();
    let e = rt.block_on(d.lookup("twin")).unwrap_err();
    assert!(
        matches!(&e, SourceError::Ambiguous { entries: 2, .. }),
        "{e}"
    );
    // Past the size limit of a lookup (2): as ambiguous.
    let e = rt.block_on(d.lookup("trip")).unwrap_err();
    assert!(
        matches!(&e, SourceError::Ambiguous { entries: 3, .. }),
        "{e}"
    );
    let names: Vec<String> = ["twin", "trip", "alice"].map(String::from).to_vec();
    let f = rt.block_on(d.lookup_many(&names)).unwrap();
    assert_eq!(f[0].1, Found::Ambiguous { entries: 2 });
    assert_eq!(f[1].1, Found::Ambiguous { entries: 3 });
    assert_eq!(f[2].1.refusal(true), None);
}

#[test]
#[ignore = "system: slapd"]
fn filter_metacharacters_find_nothing_and_break_nothing() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();
    for name in [
        "*)(uid=*",
        "*",
        "alice)(uid=*",
        "a*",
        "alice\\",
        "(|(uid=*))",
        "alice\0",
        "*)(|(objectClass=*",
    ] {
        assert_eq!(rt.block_on(d.lookup(name)).unwrap(), None, "{name:?}");
    }
    let names: Vec<String> = ["*)(uid=*", "*", "alice"].map(String::from).to_vec();
    let f = rt.block_on(d.lookup_many(&names)).unwrap();
    assert_eq!(f[0].1, Found::NoAccount);
    assert_eq!(f[1].1, Found::NoAccount);
    assert!(matches!(f[2].1, Found::Account(_)));
    // What reached slapd was escaped.
    assert!(
        slapd.searches_with("(uid=\\2a\\29\\28uid=\\2a)") >= 1,
        "{}",
        slapd.log_text()
    );
}

#[test]
#[ignore = "system: slapd"]
fn passwords_right_wrong_empty_and_locked() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();
    let alice = account(&rt, &d, "alice");
    let binds = d.stats().binds;
    assert!(
        rt.block_on(d.check_password(&alice.dn, "alice password"))
            .unwrap()
    );
    assert!(
        !rt.block_on(d.check_password(&alice.dn, "alice passwor"))
            .unwrap()
    );
    assert_eq!(d.stats().binds, binds + 2);
    let before = d.stats();
    assert!(!rt.block_on(d.check_password(&alice.dn, "")).unwrap());
    assert!(!rt.block_on(d.check_password("", "alice password")).unwrap());
    assert_eq!(d.stats(), before, "an empty password sends nothing");
    // ppolicy refuses the locked account's right password.
    let dave = account(&rt, &d, "dave");
    assert!(
        !rt.block_on(d.check_password(&dave.dn, "dave password"))
            .unwrap()
    );
    // The shared connection is still the service account's.
    assert!(rt.block_on(d.lookup("bob")).unwrap().is_some());
}

#[test]
#[ignore = "system: slapd"]
fn lookup_many_is_one_search_for_all_accounts() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();
    let mut names: Vec<String> = (0..MANY).map(|i| format!("u{i:02}")).collect();
    names.push("carol".into());
    names.push("nobody".into());
    // Warm: the connection and bind are not what is measured.
    rt.block_on(d.lookup("alice")).unwrap();
    let before = d.stats();
    let logged = slapd.searches_with("(|(uid=");
    let f = rt.block_on(d.lookup_many(&names)).unwrap();
    let after = d.stats();
    assert_eq!(f.len(), MANY + 2);
    for (i, (name, found)) in f.iter().take(MANY).enumerate() {
        assert_eq!(name, &format!("u{i:02}"));
        let Found::Account(a) = found else {
            panic!("{name}: {found:?}")
        };
        assert_eq!(a.refusal(false), None, "{name}");
        assert_eq!(a.uid_number, Some(71000 + u32::try_from(i).unwrap()));
    }
    assert_eq!(f[MANY].1.refusal(false), Some(Refusal::NotInMembersGroup));
    assert_eq!(f[MANY + 1].1, Found::NoAccount);
    // One search for the accounts, one read of each group entry.
    assert_eq!(after.searches - before.searches, 3);
    assert_eq!(after.connects, before.connects);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        slapd.searches_with("(|(uid=") - logged,
        1,
        "{}",
        slapd.log_text()
    );
}

#[test]
#[ignore = "system: slapd"]
fn pages_of_five() {
    let slapd = Slapd::start();
    let limits = Limits {
        page_size: 5,
        ..Limits::default()
    };
    let d = LdapDirectory::with_password(
        slapd.ldaps_config(),
        slapd.dir(),
        Zeroizing::new(SERVICE_PW.into()),
        limits,
    )
    .unwrap();
    let rt = rt();
    let mut names: Vec<String> = (0..MANY).map(|i| format!("u{i:02}")).collect();
    names.push("carol".into());
    names.push("nobody".into());
    let before = d.stats();
    let f = rt.block_on(d.lookup_many(&names)).unwrap();
    // 33 accounts match: 6 pages of 5 and one of 3, each a request.
    assert_eq!(d.stats().searches - before.searches, 7 + 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(slapd.searches_with("(|(uid="), 7, "{}", slapd.log_text());
    assert!(
        f.iter().take(MANY).all(|(_, f)| f.refusal(false).is_none()),
        "{f:?}"
    );
    assert_eq!(f[MANY].1.refusal(false), Some(Refusal::NotInMembersGroup));
    assert_eq!(f[MANY + 1].1, Found::NoAccount);
}

#[test]
#[ignore = "system: slapd"]
fn over_a_unix_socket() {
    let slapd = Slapd::start();
    let mut c = slapd.config(slapd.ldapi_url(), false);
    c.ca_file = None;
    let d = slapd.directory(c);
    let rt = rt();
    let alice = account(&rt, &d, "alice");
    assert!(alice.in_members_group && alice.in_superusers_group);
    assert!(
        rt.block_on(d.check_password(&alice.dn, "alice password"))
            .unwrap()
    );
    assert!(!rt.block_on(d.check_password(&alice.dn, "nope")).unwrap());
    assert!(
        slapd.log_text().contains("ACCEPT from PATH="),
        "{}",
        slapd.log_text()
    );
}

#[test]
#[ignore = "system: slapd"]
fn starttls_and_an_untrusted_certificate() {
    let slapd = Slapd::start();
    let rt = rt();
    let d = slapd.directory(slapd.config(format!("ldap://127.0.0.1:{}", slapd.plain), true));
    assert!(account(&rt, &d, "alice").in_members_group);
    assert!(
        slapd.log_text().contains("EXT oid=1.3.6.1.4.1.1466.20037"),
        "StartTLS was used"
    );

    // Another CA: refused as TLS, not as unreachable.
    let other = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(
        other.path().join("ca.pem"),
        p.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let mut c = slapd.ldaps_config();
    c.ca_file = Some(other.path().join("ca.pem"));
    let d = slapd.directory(c);
    let e = rt.block_on(d.lookup("alice")).unwrap_err();
    assert!(matches!(e, SourceError::Tls { .. }), "{e}");
    assert!(e.is_unreachable());
}

#[test]
#[ignore = "system: slapd"]
fn a_wrong_service_password_says_so_without_saying_it() {
    let slapd = Slapd::start();
    let d = LdapDirectory::with_password(
        slapd.ldaps_config(),
        slapd.dir(),
        Zeroizing::new("not the service secret".into()),
        Limits::default(),
    )
    .unwrap();
    let rt = rt();
    let e = rt.block_on(d.lookup("alice")).unwrap_err();
    assert!(
        matches!(e, SourceError::ServiceBind { code: 49, .. }),
        "{e}"
    );
    let text = format!("{e} {e:?}");
    assert!(!text.contains("not the service secret"), "{text}");
    assert!(text.contains("bind_password_file"));
    // Asked again at once, the refusal is remembered, not tried again: a
    // wrong password file must not lock the service account.
    let again = rt.block_on(d.lookup_many(&["alice".into()])).unwrap_err();
    assert_eq!(again, e);
    assert_eq!(d.stats().binds, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        slapd.log_text().matches("BIND dn=\"cn=coffre,").count(),
        1,
        "{}",
        slapd.log_text()
    );
}

#[test]
#[ignore = "system: slapd"]
fn unreachable_quickly_and_back_after_a_restart() {
    let mut slapd = Slapd::start();
    let rt = rt();
    let limits = Limits {
        connect: Duration::from_millis(500),
        operation: Duration::from_secs(2),
        ..Limits::default()
    };
    let d = LdapDirectory::with_password(
        slapd.ldaps_config(),
        slapd.dir(),
        Zeroizing::new(SERVICE_PW.into()),
        limits,
    )
    .unwrap();
    assert!(account(&rt, &d, "alice").in_members_group);

    // The server goes away: the next lookup says unreachable, at once.
    slapd.stop();
    let t = Instant::now();
    let e = rt.block_on(d.lookup("alice")).unwrap_err();
    assert!(matches!(e, SourceError::Unreachable { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Back on the same port: a fresh connection, no restart of ours.
    slapd.run();
    assert!(account(&rt, &d, "alice").in_members_group);
    assert!(d.stats().connects >= 2);

    // A port nobody listens on, and one that accepts and never answers.
    let mut c = slapd.ldaps_config();
    c.url = format!("ldaps://127.0.0.1:{}", coffre_testkit::process::free_port());
    let closed =
        LdapDirectory::with_password(c.clone(), slapd.dir(), Zeroizing::new("x".into()), limits)
            .unwrap();
    let t = Instant::now();
    assert!(
        rt.block_on(closed.lookup("alice"))
            .unwrap_err()
            .is_unreachable()
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    c.url = format!("ldaps://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let mute =
        LdapDirectory::with_password(c, slapd.dir(), Zeroizing::new("x".into()), limits).unwrap();
    let t = Instant::now();
    let e = rt
        .block_on(mute.lookup_many(&["alice".into()]))
        .unwrap_err();
    assert!(matches!(e, SourceError::Unreachable { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(silent);
}

#[test]
#[ignore = "system: slapd"]
fn referrals_are_never_chased() {
    let slapd = Slapd::start();
    let rt = rt();
    // people holds a reference to another server: ignored.
    let d = slapd.directory(slapd.ldaps_config());
    assert!(account(&rt, &d, "alice").in_members_group);
    assert_eq!(rt.block_on(d.lookup("zed")).unwrap(), None);
    let f = rt
        .block_on(d.lookup_many(&["alice".into(), "zed".into()]))
        .unwrap();
    assert!(matches!(f[0].1, Found::Account(_)) && f[1].1 == Found::NoAccount);
    // people outside the server's naming context: its default referral
    // is an error, not a hop.
    let mut c = slapd.ldaps_config();
    c.people = "ou=people,dc=elsewhere,dc=org".into();
    let d = slapd.directory(c);
    let e = rt.block_on(d.lookup("alice")).unwrap_err();
    assert!(
        matches!(&e, SourceError::Protocol(m) if m.contains("referral")),
        "{e}"
    );
    assert_eq!(d.stats().connects, 1);
}

#[test]
#[ignore = "system: slapd"]
fn many_lookups_at_once_share_one_connection() {
    let slapd = Slapd::start();
    let d = std::sync::Arc::new(slapd.directory(slapd.ldaps_config()));
    let rt = rt();
    let found = rt.block_on(async {
        let tasks: Vec<_> = (0..MANY)
            .map(|i| {
                let d = d.clone();
                tokio::spawn(async move { d.lookup(&format!("u{i:02}")).await })
            })
            .collect();
        let mut found = 0;
        for t in tasks {
            let a = t.await.unwrap().unwrap().unwrap();
            assert_eq!(a.refusal(false), None);
            found += 1;
        }
        found
    });
    assert_eq!(found, MANY);
    assert_eq!(d.stats().connects, 1);
    assert_eq!(d.stats().binds, 1);
}

#[test]
#[ignore = "system: slapd"]
fn a_missing_group_is_a_configuration_error() {
    let slapd = Slapd::start();
    let mut c = slapd.ldaps_config();
    c.members_group = format!("cn=nope,ou=groups,{BASE}");
    let d = slapd.directory(c);
    let rt = rt();
    let e = rt.block_on(d.lookup("alice")).unwrap_err();
    assert!(
        matches!(&e, SourceError::Config(m) if m.contains("members_group")),
        "{e}"
    );
    let e = rt.block_on(d.lookup_many(&["alice".into()])).unwrap_err();
    assert!(
        matches!(&e, SourceError::Config(m) if m.contains("members_group")),
        "{e}"
    );
}

/// Benchmark (a survey, not a test: `scripts/bench-source` runs it;
/// `scripts/test` skips it): what a re-check of everyone costs, 32 real
/// accounts on slapd (over LDAPS, the connection warm) against the same
/// 32 looked up one by one, same run; and 1,000 synthetic ones on the
/// fake (the cost of this crate's own work, without a network).
#[test]
#[ignore = "system: slapd (benchmark)"]
fn survey_lookup_many() {
    let slapd = Slapd::start();
    let d = slapd.directory(slapd.ldaps_config());
    let rt = rt();
    let names: Vec<String> = (0..MANY).map(|i| format!("u{i:02}")).collect();
    rt.block_on(d.lookup_many(&names)).unwrap();
    let rounds = 50;
    let t = Instant::now();
    for _ in 0..rounds {
        let f = rt.block_on(d.lookup_many(&names)).unwrap();
        assert_eq!(f.len(), MANY);
    }
    let many = t.elapsed() / rounds;
    let t = Instant::now();
    for _ in 0..5 {
        for n in &names {
            rt.block_on(d.lookup(n)).unwrap().unwrap();
        }
    }
    let singly = t.elapsed() / 5;
    // One account, as at enter: guessed right (one round trip) and wrong
    // (two), same run.
    let time = |name: &str| {
        let t = Instant::now();
        for _ in 0..200 {
            rt.block_on(d.lookup(name)).unwrap().unwrap();
        }
        t.elapsed() / 200
    };
    let (flat, deep) = (time("alice"), time("oscar"));
    let t = Instant::now();
    for _ in 0..50 {
        assert!(
            rt.block_on(d.check_password(&format!("uid=alice,{PEOPLE}"), "alice password"))
                .unwrap()
        );
    }
    println!(
        "bench: slapd check_password (a connection of its own: TCP, TLS, bind) {:?}",
        t.elapsed() / 50
    );
    println!(
        "bench: slapd lookup at enter {flat:?} (one round trip) vs {deep:?} for an account the guess misses (two): ratio {:.2}",
        flat.as_secs_f64() / deep.as_secs_f64()
    );
    println!(
        "bench: slapd lookup_many({MANY}) {many:?} per re-check; {MANY} lookups one by one {singly:?} (ratio {:.1}x)",
        singly.as_secs_f64() / many.as_secs_f64()
    );

    let fake = FakeDirectory::new();
    let names: Vec<String> = (0..1000).map(|i| format!("m{i:04}")).collect();
    for n in &names {
        fake.add(n, None);
        fake.set_member(n, true);
    }
    let t = Instant::now();
    for _ in 0..rounds {
        let f = rt.block_on(fake.lookup_many(&names)).unwrap();
        assert!(f.iter().all(|(_, f)| f.refusal(false).is_none()));
    }
    println!(
        "bench: fake lookup_many(1000) {:?} per re-check",
        t.elapsed() / rounds
    );
}

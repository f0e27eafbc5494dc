//! A TCP stream from a guest, through the LDAP server's framing, the
//! codec (ldap3_proto) and the server's request handling against a fixed
//! directory, with no network. The first byte says whether TLS is on
//! (LDAPS) or not (the plain port, where only StartTLS is answered).
//! Nothing may panic, every answer must encode, in clear no entry is
//! ever sent, and nothing of carol (whom this client does not see: her
//! name, her number) is ever in an answer unless the request itself
//! carried it. Seeds: requests as ldapsearch and ldapwhoami send them
//! (a paged search with a filter, a simple bind and WhoAmI, StartTLS,
//! the root DSE). Also the member's SSH key lines and verifiers the
//! directory serves (`check_ssh_key`, `verifier_costs`).
#![no_main]

use coffre_ldap::ldap3_proto::proto::LdapOp;
use coffre_ldap::server::{Input, encode};
use coffre_ldap::spec::{Client, DirectorySpec, Group, Live, User};
use coffre_ldap::{After, Server, Session};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let s = Server::new().unwrap();
        let user = |name: &str, uid: u32, verifier: Option<&str>| User {
            name: name.into(),
            uid,
            gid: 5300,
            gecos: "A Person".into(),
            home: format!("/home/{name}"),
            shell: "/bin/bash".into(),
            ssh_keys: vec!["ssh-ed25519 AAAA k".into()],
            verifier: verifier.map(String::from),
        };
        // The cheapest argon2id there is: the fuzzer is not here to wait.
        let v =
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$7ZwFpHeGLdAc3t9Mfd8pM9RzqL8HLVJ6Vd6Q3RfFg2M";
        s.set_directory(DirectorySpec {
            base: "dc=team,dc=coffre".into(),
            users: vec![
                user("alice", 5301, Some(v)),
                user("bob", 5302, None),
                user("carol", 5303, None),
            ],
            groups: vec![Group {
                name: "team".into(),
                gid: 5300,
                members: vec!["alice".into(), "bob".into(), "carol".into()],
            }],
            clients: vec![Client {
                address: "10.9.0.10".parse().unwrap(),
                workload: "vm".into(),
                users: vec!["alice".into(), "bob".into()],
                groups: vec!["team".into()],
            }],
        })
        .unwrap();
        s.set_live(Live {
            locked: false,
            present: vec!["alice".into()],
        });
        s
    })
}

fuzz_target!(|data: &[u8]| {
    // What a member sends for the directory to serve (through the API):
    // an SSH key line and a workload password verifier. What is kept
    // is one line, and kept again as it is.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((kept, fp)) = coffre_ldap::spec::check_ssh_key(text) {
            assert!(!kept.contains(['\n', '\r', '\0']));
            assert_eq!(
                coffre_ldap::spec::check_ssh_key(&kept),
                Ok((kept.clone(), fp))
            );
        }
        if let Ok((m, t, p)) = coffre_ldap::spec::verifier_costs(text) {
            assert!(m > 0 && t > 0 && p > 0);
        }
    }
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let server = server();
    let mut session = Session::new("10.9.0.10".parse().unwrap(), first & 1 == 1);
    let mut input = Input::new();
    if input.push(stream).is_err() {
        return;
    }
    let sent = |needle: &[u8]| {
        stream
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    let hidden: Vec<&[u8]> = [&b"carol"[..], b"5303"]
        .into_iter()
        .filter(|n| !sent(n))
        .collect();
    while let Ok(Some(m)) = input.decode() {
        let clear = !session.tls;
        let (out, after) = server.handle(&mut session, m, !input.is_empty());
        for r in out {
            if clear {
                assert!(
                    !matches!(r.op, LdapOp::SearchResultEntry(_)),
                    "an entry sent in clear"
                );
            }
            let bytes = encode(r).expect("every answer encodes");
            for n in &hidden {
                assert!(
                    !bytes.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n)),
                    "an answer shows what this client does not see"
                );
            }
        }
        match after {
            After::Continue => {}
            After::StartTls => session.tls = true,
            After::Close => break,
        }
    }
});

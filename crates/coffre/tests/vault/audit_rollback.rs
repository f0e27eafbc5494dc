//! Finding 3: the signed head covered (seq, hash) only and nothing off the
//! host remembered it, so an older `audit.head` put back with `audit.log`
//! cut to match verified as intact. Members now remember the highest
//! head they saw and refuse a vault that shows them less, or another
//! history.

use crate::harness::*;
use std::path::Path;

const ROLLED_BACK: i32 = 13;

/// The head the client of `home` remembers for its only vault.
fn seen_seq(home: &Path) -> u64 {
    let dir = home.join(".local/state/coffre");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    v["seq"].as_u64().unwrap()
}

fn head_seq(dir: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("audit.head")).unwrap()).unwrap();
    v["seq"].as_u64().unwrap()
}

/// A copy of the log and its head, to put back later.
struct Copy {
    head: Vec<u8>,
    len: u64,
}

fn copy(dir: &Path) -> Copy {
    Copy {
        head: std::fs::read(dir.join("audit.head")).unwrap(),
        len: std::fs::metadata(dir.join("audit.log")).unwrap().len(),
    }
}

/// What the attacker does: the older head back, the log cut to match.
fn put_back(dir: &Path, c: &Copy) {
    std::fs::write(dir.join("audit.head"), &c.head).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("audit.log"))
        .unwrap();
    f.set_len(c.len).unwrap();
}

/// Some audited activity: an enter and a leave.
fn activity(v: &mut Vault) {
    let mut enter = v.enter_bg("alice", &[]);
    v.leave_closed("alice", &mut enter);
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_rolled_back_log_is_refused_by_a_member_who_saw_more() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.start();
    let out = v.cli("alice", &["status"]);
    ok(&out);
    assert!(stderr(&out).contains("first contact"), "{}", stderr(&out));
    v.stop();
    let older = copy(&v.dir);
    v.start();
    activity(&mut v);
    ok(&v.cli("alice", &["status"]));
    let saw = seen_seq(&v.home("alice"));
    assert!(saw > 0);
    v.stop();

    put_back(&v.dir, &older);
    // On the host alone the cut log verifies: nothing there remembers more
    // (a witness that never connected, here root's own check).
    let dir = v.dir.to_str().unwrap().to_string();
    let nobody = v.tmp.path().join("home-nobody");
    let out = v.cli_at("alice", &nobody, &["audit", "verify", "--dir", &dir]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));

    v.start();
    let shows = head_seq(&v.dir);
    assert!(
        shows < saw,
        "the restart alone must not catch up: {shows} vs {saw}"
    );
    let out = v.cli("alice", &["status"]);
    assert_eq!(code(&out), ROLLED_BACK, "{}", stderr(&out));
    let want = format!(
        "the vault's audit log was rolled back: it shows record {shows}, this machine saw {saw}"
    );
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    // And again: what was seen is not forgotten by a refusal.
    let out = v.cli("alice", &["member", "list"]);
    assert_eq!(code(&out), ROLLED_BACK, "{}", stderr(&out));

    // `audit verify`, through the daemon and on the host's directory.
    for args in [
        vec!["audit", "verify"],
        vec!["audit", "verify", "--dir", &dir],
    ] {
        let out = v.cli("alice", &args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(code(&out), ROLLED_BACK, "{args:?}: {text}{}", stderr(&out));
        assert!(
            text.contains("TAMPERED") && text.contains("rolled back"),
            "{args:?}: {text}"
        );
    }
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_rewritten_log_as_long_or_longer_is_refused_as_a_fork() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.start();
    ok(&v.cli("alice", &["status"]));
    v.stop();
    let older = copy(&v.dir);
    v.start();
    activity(&mut v);
    ok(&v.cli("alice", &["status"]));
    let saw = seen_seq(&v.home("alice"));
    v.stop();

    // Another history from the older copy, signed by the same host key
    // (the daemon itself writes it), grown past what alice saw, by a
    // machine that never saw the first one.
    put_back(&v.dir, &older);
    v.start();
    let elsewhere = v.tmp.path().join("home-elsewhere");
    let mut n = 0;
    while head_seq(&v.dir) <= saw {
        n += 1;
        assert!(n < 50, "no records appended");
        // Each stop and start is recorded.
        v.stop();
        v.start();
    }
    // A machine that never saw the first history trusts this one.
    let out = v.cli_at("alice", &elsewhere, &["status"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let out = v.cli("alice", &["status"]);
    assert_eq!(code(&out), ROLLED_BACK, "{}", stderr(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains("audit log was rewritten") && msg.contains(&format!("record {saw}")),
        "{msg}"
    );
    let out = v.cli("alice", &["audit", "verify"]);
    assert_eq!(code(&out), ROLLED_BACK);
    let dir = v.dir.to_str().unwrap().to_string();
    let out = v.cli("alice", &["audit", "verify", "--dir", &dir]);
    assert_eq!(
        code(&out),
        ROLLED_BACK,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn members_follow_a_growing_log_and_export_it() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.start();
    ok(&v.cli("alice", &["status"]));
    let first = seen_seq(&v.home("alice"));
    activity(&mut v);
    ok(&v.cli("alice", &["status"]));
    assert!(seen_seq(&v.home("alice")) > first);
    let out = v.cli("alice", &["audit", "verify"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));

    // A member who joined learned the key and head at join: no first use.
    v.add_member("alice", "bob", false);
    assert!(seen_seq(&v.home("bob")) > 0);
    let out = v.cli("bob", &["status"]);
    ok(&out);
    assert!(!stderr(&out).contains("first contact"), "{}", stderr(&out));

    let out = v.cli("alice", &["audit", "export", "--since", "2", "--json"]);
    ok(&out);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = doc["entries"].as_array().unwrap();
    assert_eq!(entries[0]["seq"], 3);
    assert!(
        doc["head"]["seq"].as_u64().unwrap() >= entries.last().unwrap()["seq"].as_u64().unwrap()
    );
    assert!(doc["head"]["signature"].is_string() && doc["head"]["key"].is_string());
    let out = v.cli("alice", &["audit", "export"]);
    ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["seq"], 1);
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(last["audit_head"]["seq"].as_u64().unwrap() >= (lines.len() - 1) as u64);
}

//! The volume key is gone from the daemon's memory once the vault closes.

use crate::harness::*;
use std::time::Duration;

fn volume_key(v: &Vault) -> Vec<u8> {
    let out_file = v.tmp.path().join("vk");
    let out = std::process::Command::new("cryptsetup")
        .args([
            "-q",
            "luksDump",
            "--dump-volume-key",
            "--volume-key-file",
            out_file.to_str().unwrap(),
        ])
        .args(["--header", v.dir.join("volume.hdr").to_str().unwrap()])
        .args(["--key-file", v.members[0].password.to_str().unwrap()])
        .arg(v.dir.join("volume.img"))
        .output()
        .expect("cryptsetup (scripts/test installs cryptsetup-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(out_file).unwrap()
}

#[test]
fn no_copy_of_the_volume_key_after_close() {
    let mut v = Vault::init(&[]);
    // Before the daemon starts: cryptsetup honours the daemon's lock on
    // the header and would wait for it.
    let key = volume_key(&v);
    v.start();
    assert_eq!(key.len(), 64);
    let pid = v.pid();
    assert!(!memory_contains(pid, &key), "key in memory while CLOSED");
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    // Positive control: the scan does find the key while the vault is open.
    assert!(
        memory_contains(pid, &key),
        "the scan cannot see the held key"
    );
    v.cli("alice", &["leave"]);
    wait_exit(&mut enter, Duration::from_secs(10));
    v.wait_state("closed", Duration::from_secs(30));
    assert!(
        !memory_contains(pid, &key),
        "a copy of the volume key survived the close"
    );
    // And after a lock.
    let mut enter = v.enter_bg("alice", &[]);
    assert!(memory_contains(pid, &key));
    v.authed("alice", &["lock", "--reason", "memory test"]);
    v.wait_state("locked", Duration::from_secs(30));
    wait_exit(&mut enter, Duration::from_secs(10));
    assert!(
        !memory_contains(pid, &key),
        "a copy of the volume key survived the lock"
    );
}

//! The volume key is gone from the daemon's memory once the vault closes.

use crate::harness::*;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::time::Duration;

/// Whether `needle` appears in any readable mapping of process `pid`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    let maps = std::fs::File::open(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in std::io::BufReader::new(maps).lines() {
        let line = line.unwrap();
        let mut parts = line.split_whitespace();
        let range = parts.next().unwrap();
        let perms = parts.next().unwrap();
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

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

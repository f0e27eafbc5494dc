//! Passwords do not outlive their use in the daemon's memory: a unique
//! password given at `enter` is found nowhere in the daemon's readable
//! mappings (/proc/PID/maps and /proc/PID/mem) once the member has left.

use crate::harness::*;
use std::time::{Duration, Instant};

/// A password no other part of the system could contain.
fn unique_password() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("scan-{}-{nanos:09}-never-elsewhere", std::process::id())
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn password_not_in_daemon_memory_after_leave() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let password = unique_password();
    // A costly keyslot: the daemon holds the password for the seconds its
    // check takes, which gives the positive control time to see it.
    let mut v = Vault::init_as(&["--pbkdf-force-iterations", "300"], &password);
    v.start();
    let pid = v.pid();
    let needle = password.as_bytes();
    assert!(
        !memory_contains(pid, needle),
        "the daemon has the password before anyone sent it"
    );

    // Positive control: while `enter` is being checked, the scan sees the
    // password (in the request and in the passphrase waiting for the KDF).
    // If the scan could not read the daemon's memory, this fails.
    let mut enter = v.enter_start("alice", &[]);
    let sfile = session_file(&v.member("alice").identity);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = false;
    while !sfile.exists() {
        assert!(Instant::now() < deadline, "enter did not complete");
        if memory_contains(pid, needle) {
            seen = true;
            break;
        }
    }
    assert!(
        seen,
        "positive control: the scan never saw the password while enter was checked"
    );
    while !sfile.exists() {
        assert!(Instant::now() < deadline, "enter did not complete");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(v.state(), "open");
    let while_open = memory_hits(pid, needle);
    // A measurement, not a failure: what still holds it while the session
    // is open (docs/security.md, "Secrets in memory").
    eprintln!(
        "while open: {} place(s)\n{}",
        while_open.len(),
        while_open.join("\n")
    );

    v.leave_closed("alice", &mut enter);
    // The client's connections are gone; give the daemon a moment to see
    // them close and drop their buffers.
    std::thread::sleep(Duration::from_millis(500));
    let hits = memory_hits(pid, needle);
    assert!(
        hits.is_empty(),
        "the password survived leave at {} place(s):\n{}\n(while open: {} place(s):\n{})",
        hits.len(),
        hits.join("\n"),
        while_open.len(),
        while_open.join("\n")
    );
}

/// The same over the VPN: the password reaches the daemon through
/// OpenVPN's management link (a long-lived connection, read line by
/// line), and is gone once the member's client has left.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn password_over_the_vpn_not_in_daemon_memory_after_leave() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    use crate::gateway::{Gw, UP};
    let password = unique_password();
    let vault = Vault::init_as(
        &["--totp-period", "3", "--pbkdf-force-iterations", "300"],
        &password,
    );
    let mut gw = Gw::with_vault(vault, &[], 1, &[]);
    let pid = gw.vault.pid();
    let needle = password.as_bytes();
    assert!(!memory_contains(pid, needle));

    let auth = gw.auth_file("alice", None, false);
    let mut alice = gw.client("alice", 0, &auth, &[]);
    // Positive control, as for the door.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = false;
    while !alice.text().contains(UP) {
        assert!(Instant::now() < deadline, "alice did not get in");
        if memory_contains(pid, needle) {
            seen = true;
            break;
        }
    }
    assert!(
        seen,
        "positive control: the scan never saw the password while the VPN login was checked"
    );
    assert!(alice.wait_for(UP, &["AUTH_FAILED"], Duration::from_secs(60)));
    gw.vault.wait_state("open", Duration::from_secs(10));
    let while_open = memory_hits(pid, needle);
    // A measurement, not a failure: what still holds it while the session
    // is open (docs/security.md, "Secrets in memory").
    eprintln!(
        "while open: {} place(s)\n{}",
        while_open.len(),
        while_open.join("\n")
    );

    alice.stop();
    gw.vault.wait_state("closed", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let hits = memory_hits(pid, needle);
    assert!(
        hits.is_empty(),
        "the password survived the VPN leave at {} place(s):\n{}\n(while open: {} place(s):\n{})",
        hits.len(),
        hits.join("\n"),
        while_open.len(),
        while_open.join("\n")
    );
}

/// The data's plaintext does not outlive a close in the daemon's memory:
/// the buffers that held it (the FUSE library's request buffers, each
/// worker's decrypted reads, the volume commands') are wiped when they go,
/// and they go at close. A unique marker written through the mount and
/// read back with direct I/O (so it crosses the daemon both ways) is seen
/// by the scan while the vault is open (positive control) and found
/// nowhere once it is closed.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn plaintext_not_in_daemon_memory_after_close() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.start();
    let file = v.layout().mountpoint.join("shared/marked.bin");
    marker_gone_after_close(&mut v, &file);
}

/// The same through the process workloads' view (the cut layer), which
/// stays mounted while the vault is closed, and its FUSE workers with it:
/// what a workload wrote must not wait in their request buffers.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn plaintext_written_through_the_view_not_in_daemon_memory_after_close() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    // A project workload: the daemon mounts the view for it.
    v.set_workloads(
        "auto",
        r#"
[[workload]]
name = "idle"
kind = "process"
user = "root"
command = ["/bin/sleep", "1000"]
"#,
    );
    v.start();
    let file = v.dir.join("run/view/shared/marked.bin");
    marker_gone_after_close(&mut v, &file);
}

/// Writes 2 MiB of a unique marker to `file` (on the open vault's data)
/// and reads it back with direct I/O, checks that the daemon's memory
/// holds it (positive control), closes the vault and checks that it
/// holds it nowhere.
fn marker_gone_after_close(v: &mut Vault, file: &std::path::Path) {
    let pid = v.pid();
    let marker = unique_password()
        .replace("scan-", "plaintext-")
        .into_bytes();
    assert!(!memory_contains(pid, &marker));
    let mut enter = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(30));
    // 2 MiB of the marker, each copy at its own offset so any request's
    // buffer holds whole copies.
    let data = marker.repeat((2 << 20) / marker.len());
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &data).unwrap();
    let dd = |args: &[&str]| {
        let out = std::process::Command::new("dd")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (src, dst) = (
        format!("if={}", tmp.path().display()),
        format!("of={}", file.display()),
    );
    dd(&[&src, &dst, "bs=1M", "oflag=direct", "conv=fsync"]);
    dd(&[
        &format!("if={}", file.display()),
        "of=/dev/null",
        "bs=1M",
        "iflag=direct",
    ]);
    let while_open = memory_hits(pid, &marker);
    assert!(
        !while_open.is_empty(),
        "positive control: the scan never saw the plaintext while the vault was open"
    );
    v.leave_closed("alice", &mut enter);
    let hits = memory_hits(pid, &marker);
    assert!(
        hits.is_empty(),
        "the plaintext survived the close at {} place(s):\n{}\n(while open: {} place(s))",
        hits.len(),
        hits.join("\n"),
        while_open.len()
    );
}

//! QEMU workloads: a real guest under TCG (a Debian cloud kernel and a
//! busybox initramfs that `scripts/guest-image` builds) counting on its
//! serial console and writing the count to a disk served over our NBD
//! socket. Fast mode pauses it across a close; safe mode suspends it into
//! the volume, across a daemon restart too.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Builds (once; later calls are a stamp check) the guest kernel and
/// initramfs.
fn guest() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("target/guest");
    let st = Command::new(root.join("scripts/guest-image"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "scripts/guest-image failed");
    (out.join("vmlinuz"), out.join("initrd.gz"))
}

/// The guest kernel's release, from what `scripts/guest-image` recorded
/// (`... (6.1.0-56-cloud-amd64), modules: ...`).
fn guest_release() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let stamp = std::fs::read_to_string(root.join("target/guest/stamp")).unwrap();
    let line = stamp.lines().nth(1).unwrap_or_default();
    let release = line
        .split_once(" (")
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(r, _)| r.to_string())
        .unwrap_or_default();
    assert!(release.len() > 3, "no kernel release in {stamp:?}");
    release
}

/// The uid of the user VMs run as (`coffre init` made it).
fn vm_user_uid() -> u32 {
    let out = Command::new("id")
        .args(["-u", "coffre-vm"])
        .output()
        .unwrap();
    assert!(out.status.success(), "no coffre-vm user");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn vm_config(memory_mb: u32) -> String {
    let (kernel, initrd) = guest();
    format!(
        r#"
[[workload]]
name = "counter"
kind = "qemu"
memory_mb = {memory_mb}
accel = "tcg"
kernel = "{}"
initrd = "{}"
append = "console=ttyS0 quiet"
disks = ["counter"]
disk_size_mb = 4
"#,
        kernel.display(),
        initrd.display()
    )
}

/// The ticks the guest printed so far (from its log, inside the volume).
fn ticks(v: &Vault) -> Vec<u64> {
    let log = v.layout().mountpoint.join(".coffre/logs/counter.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

fn last_disk_write(v: &Vault) -> Option<u64> {
    let log = v.layout().mountpoint.join(".coffre/logs/counter.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("disk ")?.trim().parse().ok())
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vm_state(v: &Vault) -> (String, Option<u32>) {
    let st = v.status("alice");
    let w = &st["workloads"][0];
    (
        w["state"].as_str().unwrap_or_default().to_string(),
        w["pid"].as_u64().map(|p| u32::try_from(p).unwrap()),
    )
}

/// The disk's first sector, as the guest wrote it (`tick N`).
fn disk_tick(v: &Vault) -> u64 {
    let img = std::fs::read(v.layout().mountpoint.join("disks/counter.img")).unwrap();
    let text = String::from_utf8_lossy(&img[..32]).to_string();
    text.trim_end_matches('\0')
        .trim()
        .strip_prefix("tick ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sector 0: {text:?}"))
}

fn leave(v: &Vault, enter: &mut std::process::Child) {
    ok(&v.cli("alice", &["leave"]));
    assert_eq!(wait_exit(enter, Duration::from_secs(60)), Some(0));
    v.wait_state("closed", Duration::from_secs(120));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, libnbd, QEMU"]
fn a_vm_pauses_across_a_close_and_suspends_into_the_vault() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Nbd,
        Need::Qemu,
    ]);
    let mut v = Vault::init(&["--size", "256M"]);
    v.set_data(4242, 2, &[]);
    v.set_workloads("auto", &vm_config(128));
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    // Booted, counting, and writing to its NBD disk.
    wait_for("the guest's disk writes", Duration::from_secs(180), || {
        last_disk_write(&v).is_some_and(|n| n >= 20)
    });
    let (state, qemu) = vm_state(&v);
    assert_eq!(state, "running");
    let qemu = qemu.unwrap();
    assert!(disk_tick(&v) >= 20);
    // In its namespace the vault directory is an empty tmpfs with only
    // the VM's own run directory in it: no data, no view, no volume.
    let ns = std::fs::read_to_string(format!("/proc/{qemu}/mountinfo")).unwrap();
    let dir = v.dir.to_str().unwrap();
    let mut seen: Vec<(String, String)> = ns
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            f.get(4)
                .filter(|m| m.starts_with(dir))
                .map(|m| (m.to_string(), fstype.to_string()))
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(),
        vec![dir.to_string(), format!("{dir}/vm")],
        "QEMU's view of the vault directory: {ns}"
    );
    assert_eq!(seen[0].1, "tmpfs");

    // QEMU runs as the VM user, with no capability, no way to gain
    // privileges, and seccomp filtering (-sandbox).
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let vm_uid = vm_user_uid();
    assert_eq!(field("Uid"), vec![vm_uid.to_string(); 4]);
    assert!(field("Gid").iter().all(|g| g != "0"), "no root group");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(caps), vec!["0000000000000000"], "{caps}");
    }
    assert_eq!(field("NoNewPrivs"), vec!["1"]);
    assert_eq!(field("Seccomp"), vec!["2"]);

    // Its own NBD socket, in its own directory, serves its disk and no
    // other image in the data.
    let vm_dir = v.dir.join("run/vm/counter");
    let meta = std::fs::metadata(&vm_dir).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), vm_uid);
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&meta) & 0o777, 0o700);
    let sock = vm_dir.join("nbd.sock");
    let other = v.layout().mountpoint.join("disks/other.img");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    let list = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", sock.display()))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains("export=\"counter\""), "{list}");
    assert!(!list.contains("other"), "{list}");
    let st = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///other?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(!st.status.success(), "the VM's socket served another disk");
    // The vault's own socket (root's alone) still serves both.
    let st = Command::new("nbdinfo")
        .arg(format!(
            "nbd+unix:///other?socket={}",
            v.layout().nbd_socket.display()
        ))
        .output()
        .unwrap();
    assert!(st.status.success());
    std::fs::remove_file(&other).unwrap();

    // Fast mode: paused across the close. The guest's own pace (TCG on a
    // shared machine) is measured first.
    let (r0, t) = (*ticks(&v).last().unwrap(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let rate = (*ticks(&v).last().unwrap() - r0) as f64 / t.elapsed().as_secs_f64();
    assert!(rate > 2.0, "the guest counts {rate:.1} per second");
    let before = *ticks(&v).last().unwrap();
    let t0 = Instant::now();
    leave(&v, &mut enter);
    let st = v.status("alice");
    assert_eq!(st["key_held"], false);
    assert_eq!(st["data"]["mounted"], false);
    assert_eq!(vm_state(&v), ("frozen".to_string(), Some(qemu)));
    let closed_at = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let closed_for = closed_at.elapsed().as_secs_f64();
    let mut enter = v.enter_bg("alice", &[]);
    let after_open = ticks(&v);
    let elapsed = t0.elapsed().as_secs_f64();
    let progress = after_open.last().unwrap() - before;
    // Running all along it would have counted `rate` per second; paused
    // while closed, at least half the closed time's worth is missing (a
    // margin for a pace that varies).
    assert!(
        (progress as f64) < rate * (elapsed - closed_for / 2.0),
        "{progress} ticks in {elapsed:.1} s at {rate:.1}/s, {closed_for:.1} s closed: it ran while closed"
    );
    // The same guest carries on, and its disk works again.
    wait_for(
        "disk writes after the open",
        Duration::from_secs(30),
        || last_disk_write(&v).is_some_and(|n| n > before + 10),
    );
    let all = ticks(&v);
    assert_eq!(
        all,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "no restart, no gap"
    );
    assert!(disk_tick(&v) > before);
    assert_eq!(vm_state(&v), ("running".to_string(), Some(qemu)));

    // Safe mode: suspended into the volume; QEMU exits.
    ok(&v.authed("alice", &["mode", "safe"]));
    let before = *ticks(&v).last().unwrap();
    leave(&v, &mut enter);
    assert_eq!(vm_state(&v), ("suspended-to-vault".to_string(), None));
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists() || {
            let s = std::fs::read_to_string(format!("/proc/{qemu}/stat")).unwrap_or_default();
            s.contains(") Z ")
        }
    );
    let done = v.audit_details("workload", "suspended");
    assert_eq!(done.len(), 1, "{done:?}");
    // The state is only in the encrypted volume: the guest's memory (the
    // kernel's banner is in it) appears nowhere in the vault directory.
    let banner = format!("Linux version {}", guest_release());
    for e in walk(&v.dir) {
        let bytes = std::fs::read(&e).unwrap();
        assert!(
            !contains(&bytes, banner.as_bytes()),
            "{} holds guest memory",
            e.display()
        );
    }

    // Even a daemon restart: the next open resumes it from the vault.
    v.stop();
    v.start();
    assert_eq!(vm_state(&v).0, "suspended-to-vault");
    let mut enter = v.enter_bg("alice", &[]);
    wait_for("ticks after the resume", Duration::from_secs(60), || {
        ticks(&v).last().is_some_and(|&n| n > before + 5)
    });
    let all = ticks(&v);
    assert_eq!(
        all,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "it continued its count"
    );
    let (state, new) = vm_state(&v);
    assert_eq!(state, "running");
    assert_ne!(new, Some(qemu));
    assert!(
        !v.layout()
            .mountpoint
            .join(".coffre/vm/counter.state")
            .exists()
    );
    wait_for(
        "disk writes after the resume",
        Duration::from_secs(30),
        || last_disk_write(&v).is_some_and(|n| n > before + 10),
    );
    ok(&v.authed("alice", &["mode", "fast"]));
    leave(&v, &mut enter);
    v.stop();
}

/// Every regular file under `dir`, not crossing into mounts.
fn walk(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).unwrap().dev();
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// A VM that cannot be suspended (its state does not fit in the volume)
/// does not keep the data exposed: it is killed, the vault closes, and
/// status and the audit log say why. The next open boots it afresh.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, QEMU"]
fn a_vm_that_cannot_be_suspended_is_killed_and_the_vault_still_closes() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::Qemu]);
    let mut v = Vault::init(&["--size", "32M"]);
    v.set_data(4242, 2, &[]);
    v.set_workloads("auto", &vm_config(128));
    v.start();
    ok(&v.authed("alice", &["mode", "safe"]));
    let mut enter = v.enter_bg("alice", &[]);
    wait_for("the guest's ticks", Duration::from_secs(180), || {
        ticks(&v).len() >= 10
    });
    let qemu = vm_state(&v).1.unwrap();
    leave(&v, &mut enter);
    let st = v.status("alice");
    assert_eq!(st["key_held"], false);
    assert_eq!(st["data"]["mounted"], false);
    let w = &st["workloads"][0];
    assert_eq!(w["state"], "failed", "{st}");
    assert!(
        w["note"]
            .as_str()
            .unwrap()
            .contains("could not be suspended into the vault"),
        "{w}"
    );
    let killed = v.audit_details("workload", "killed");
    assert!(killed.iter().any(|d| d.contains("counter")), "{killed:?}");
    let s = std::fs::read_to_string(format!("/proc/{qemu}/stat")).unwrap_or_default();
    assert!(s.is_empty() || s.contains(") Z "), "QEMU still runs");
    // Nothing half-written is left to resume from; it boots again.
    let mut enter = v.enter_bg("alice", &[]);
    let vm_dir = v.layout().mountpoint.join(".coffre/vm");
    let left: Vec<_> = std::fs::read_dir(&vm_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    wait_for("a fresh boot", Duration::from_secs(180), || {
        std::fs::read_to_string(v.layout().mountpoint.join(".coffre/logs/counter.log"))
            .unwrap_or_default()
            .matches("guest up")
            .count()
            == 2
    });
    ok(&v.authed("alice", &["mode", "fast"]));
    leave(&v, &mut enter);
    v.stop();
}

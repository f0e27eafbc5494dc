//! Open means usable: the team's mount (FUSE file, loop, ext4), NBD
//! exports of disk images, the close order, busy mounts, crashes. Real
//! kernel parts; needs root, /dev/fuse, loop devices, and libnbd-bin.

use crate::harness::*;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn leave(v: &Vault, name: &str, enter: &mut std::process::Child) {
    ok(&v.cli(name, &["leave"]));
    assert_eq!(wait_exit(enter, Duration::from_secs(30)), Some(0));
}

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_be_bytes()[4]
        })
        .collect()
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn members_share_files_with_owners_and_modes_and_nothing_stays_in_clear() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.set_data(4242, 2, &[("alice", 5001, 5001), ("bob", 5002, 5002)]);
    v.start();
    v.add_member("alice", "bob", false);
    let mut enter = v.enter_bg("alice", &[]);
    let st = v.status("alice");
    assert_eq!(st["state"], "open");
    assert_eq!(st["data"]["mounted"], true, "{st}");
    let mp = v.layout().mountpoint;
    assert_eq!(st["data"]["mountpoint"], mp.to_str().unwrap());
    assert!(coffre_data::system::mount_at(&mp).is_some());
    assert_eq!(owner_mode(&mp.join("home/alice")), (5001, 5001, 0o700));
    assert_eq!(owner_mode(&mp.join("home/bob")), (5002, 5002, 0o700));
    assert_eq!(owner_mode(&mp.join("shared")), (0, 4242, 0o2770));
    assert_eq!(owner_mode(&mp), (0, 4242, 0o3770));
    // A member (in the team's group) can write in shared/ but cannot move
    // what the vault made (the sticky bit): no symlink games.
    let as_alice = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=5001", "--regid=5001", "--groups=4242", "--"])
            .args(args)
            .current_dir(&mp)
            .output()
            .unwrap()
    };
    ok(&as_alice(&["touch", "shared/by-alice"]));
    assert_eq!(owner_mode(&mp.join("shared/by-alice")).0, 5001);
    assert!(!as_alice(&["mv", "shared", "elsewhere"]).status.success());
    assert!(!as_alice(&["ls", "home/bob"]).status.success());

    // Files with their owners and modes, and content we can search for.
    let marker = b"PARTNER-CONFIDENTIAL-7f3a9c";
    let mut report = marker.repeat(100);
    report.extend_from_slice(b"\nend of report\n");
    let big = pseudo_random(3 << 20, 42);
    let files: Vec<(String, Vec<u8>, u32, u32, u32)> = vec![
        (
            "shared/report.txt".into(),
            report.clone(),
            5001,
            4242,
            0o640,
        ),
        ("home/alice/big.bin".into(), big.clone(), 5001, 5001, 0o600),
        (
            "home/bob/todo".into(),
            b"read alice's report\n".to_vec(),
            5002,
            5002,
            0o604,
        ),
    ];
    for (rel, bytes, uid, gid, mode) in &files {
        let p = mp.join(rel);
        std::fs::write(&p, bytes).unwrap();
        std::os::unix::fs::chown(&p, Some(*uid), Some(*gid)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode)).unwrap();
    }
    std::os::unix::fs::symlink("../shared/report.txt", mp.join("home/alice/link")).unwrap();
    leave(&v, "alice", &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    assert!(
        std::fs::read_dir(&mp).unwrap().next().is_none(),
        "the mount point is empty once closed"
    );
    let st = v.status("alice");
    assert_eq!(st["data"]["mounted"], false);
    let audit = v.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["record"]["action"] == "data" && e["record"]["result"] == "unmounted")
    );

    // Bob comes in later and finds everything.
    let mut enter = v.enter_bg("bob", &[]);
    for (rel, bytes, uid, gid, mode) in &files {
        let p = mp.join(rel);
        assert_eq!(&std::fs::read(&p).unwrap(), bytes, "{rel}");
        assert_eq!(owner_mode(&p), (*uid, *gid, *mode), "{rel}");
    }
    assert_eq!(
        std::fs::read_link(mp.join("home/alice/link")).unwrap(),
        Path::new("../shared/report.txt")
    );
    leave(&v, "bob", &mut enter);
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());

    // The storage holds ciphertext only.
    let raw = std::fs::read(v.dir.join("volume.img")).unwrap();
    assert!(!raw.windows(marker.len()).any(|w| w == marker));
    assert!(!raw.windows(64).any(|w| w == &big[1 << 20..(1 << 20) + 64]));
    // And the filesystem is clean.
    let img = v.tmp.path().join("clear.img");
    v.decrypt_volume(&img);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    ok(&fsck);
}

/// A raw NBD client for the malformed cases.
struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut hello = [0u8; 18];
        r.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }
    /// Reads option replies until an ACK or an error; returns the types.
    fn replies(&mut self) -> Vec<u32> {
        let mut kinds = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0; len as usize];
            self.0.read_exact(&mut d).unwrap();
            kinds.push(kind);
            if kind == 1 || kind & 0x8000_0000 != 0 {
                return kinds;
            }
        }
    }
    fn go(&mut self, name: &str) -> Vec<u32> {
        let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        self.replies()
    }
    fn request(&mut self, magic: u32, kind: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut m = magic.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&0x1234u64.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }
    /// The error of a simple reply (no payload expected).
    fn error(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&h[8..16], &0x1234u64.to_be_bytes());
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn nbd_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, libnbd"]
fn disk_images_are_served_over_nbd_and_bad_clients_get_errors() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::Nbd]);
    let mut v = Vault::init(&["--size", "48M"]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let l = v.layout();
    let disks = l.disks();
    let image = pseudo_random(4 << 20, 7);
    std::fs::write(disks.join("vm1.img"), &image).unwrap();
    std::fs::write(disks.join("scratch.img"), vec![0u8; 1 << 20]).unwrap();
    let st = v.status("alice");
    assert_eq!(st["data"]["nbd_socket"], l.nbd_socket.to_str().unwrap());
    assert_eq!(st["data"]["exports"], serde_json::json!(["scratch", "vm1"]));
    let mode = std::fs::metadata(l.nbd_socket.parent().unwrap())
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);

    // Real clients: listing, reading, writing.
    let out = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", l.nbd_socket.display()))
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vm1") && text.contains("scratch"), "{text}");
    let copy = v.tmp.path().join("vm1.copy");
    ok(&Command::new("nbdcopy")
        .arg(nbd_uri(&l.nbd_socket, "vm1"))
        .arg(&copy)
        .output()
        .unwrap());
    assert!(std::fs::read(&copy).unwrap() == image, "read through NBD");
    let new = pseudo_random(1 << 20, 99);
    let src = v.tmp.path().join("new.bin");
    std::fs::write(&src, &new).unwrap();
    ok(&Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(nbd_uri(&l.nbd_socket, "scratch"))
        .output()
        .unwrap());
    assert!(
        std::fs::read(disks.join("scratch.img")).unwrap() == new,
        "written through NBD, seen on the mount"
    );

    // Malformed requests: errors, never a dead daemon.
    let mut r = Raw::connect(&l.nbd_socket);
    assert_eq!(r.go("no-such-disk"), vec![0x8000_0006]);
    assert_eq!(r.go("../vault/volume"), vec![0x8000_0006]);
    assert_eq!(r.go("vm1"), vec![3, 1]);
    r.request(0x2560_9513, 0, (4 << 20) - 512, 4096, &[]);
    assert_eq!(r.error(), 22, "read past the end: EINVAL");
    r.request(0x2560_9513, 0, u64::MAX - 10, 4096, &[]);
    assert_eq!(r.error(), 22, "offset overflow: EINVAL");
    r.request(0x2560_9513, 0, 0, u32::MAX, &[]);
    assert_eq!(r.error(), 75, "oversized read: EOVERFLOW");
    r.request(0x2560_9513, 1, 8 << 20, 512, &[0xAA; 512]);
    assert_eq!(r.error(), 28, "write past the end: ENOSPC");
    r.request(0x2560_9513, 99, 0, 0, &[]);
    assert_eq!(r.error(), 22, "unknown command: EINVAL");
    r.request(0xdead_beef, 0, 0, 512, &[]);
    assert!(r.closed(), "a bad magic ends the connection");
    // A client that disconnects in the middle of a write.
    let mut r = Raw::connect(&l.nbd_socket);
    assert_eq!(r.go("vm1"), vec![3, 1]);
    r.request(0x2560_9513, 1, 0, 65536, &[0x55; 1000]);
    drop(r);
    // Garbage instead of a handshake.
    let mut s = UnixStream::connect(&l.nbd_socket).unwrap();
    let _ = s.write_all(&[0xff; 64]);
    drop(s);
    // Still serving, and the image was not touched by the torn write.
    ok(&Command::new("nbdcopy")
        .arg(nbd_uri(&l.nbd_socket, "vm1"))
        .arg(&copy)
        .output()
        .unwrap());
    assert!(std::fs::read(&copy).unwrap() == image);

    // A client still connected at close is dropped; the vault closes.
    let mut idle = Raw::connect(&l.nbd_socket);
    assert_eq!(idle.go("vm1"), vec![3, 1]);
    leave(&v, "alice", &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    assert!(idle.closed(), "the close drops NBD clients");
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    assert!(!l.nbd_socket.exists());
}

/// A writer that appends numbered records, fsyncs each, and only then
/// records it as acknowledged in a file outside the vault.
fn writer(target: &Path, acks: &Path) -> std::process::Child {
    let script = r#"
import os, sys
f = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
a = open(sys.argv[2], "w")
i = 0
while True:
    os.write(f, (b"record %08d " % i) + b"x" * 4000 + b"\n")
    os.fsync(f)
    a.write("%d\n" % i); a.flush()
    i += 1
"#;
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(target)
        .arg(acks)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn last_ack(acks: &Path) -> u64 {
    std::fs::read_to_string(acks)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .max()
        .expect("the writer acknowledged something")
}

fn records_present(file: &Path, upto: u64) {
    let text = std::fs::read(file).unwrap();
    let text = String::from_utf8_lossy(&text);
    let mut next = 0u64;
    for line in text.lines() {
        if let Some(n) = line
            .strip_prefix("record ")
            .and_then(|r| r.get(..8))
            .and_then(|n| n.parse::<u64>().ok())
        {
            assert_eq!(n, next, "records in order, none missing");
            next += 1;
        }
    }
    assert!(
        next > upto,
        "acknowledged up to {upto}, found {next} records"
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_busy_close_names_and_stops_the_holders_and_loses_nothing_acknowledged() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&["--size", "48M"]);
    v.set_data(0, 1, &[]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let mp = v.layout().mountpoint;
    let mut sleeper = Command::new("sleep")
        .arg("1000")
        .current_dir(mp.join("shared"))
        .spawn()
        .unwrap();
    let acks = v.tmp.path().join("acks");
    let mut w = writer(&mp.join("shared/journal"), &acks);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&acks)
        .unwrap_or_default()
        .lines()
        .count()
        < 20
    {
        assert!(Instant::now() < deadline, "the writer makes no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    leave(&v, "alice", &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(
        sleeper.wait().unwrap().code().is_none(),
        "killed by a signal"
    );
    assert!(w.wait().unwrap().code().is_none(), "killed by a signal");
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    let killed = v.audit_details("close", "killed");
    assert!(
        killed.iter().any(|d| d.starts_with("sleep (pid")),
        "{killed:?}"
    );
    assert!(
        killed.iter().any(|d| d.starts_with("python3 (pid")),
        "{killed:?}"
    );
    let acked = last_ack(&acks);
    let mut enter = v.enter_bg("alice", &[]);
    records_present(&mp.join("shared/journal"), acked);
    leave(&v, "alice", &mut enter);
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_daemon_killed_while_writing_leaves_nothing_behind_after_restart() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&["--size", "48M"]);
    v.set_data(0, 1, &[]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let l = v.layout();
    let acks = v.tmp.path().join("acks");
    let mut w = writer(&l.mountpoint.join("shared/journal"), &acks);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&acks)
        .unwrap_or_default()
        .lines()
        .count()
        < 50
    {
        assert!(Instant::now() < deadline, "the writer makes no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    v.crash();
    // The writer fails or blocks; whatever it acknowledged must survive.
    std::thread::sleep(Duration::from_millis(300));
    let acked = last_ack(&acks);
    assert!(!v.leftovers().is_empty(), "the crash left the mount");
    v.start();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    let _ = w.kill();
    let _ = w.wait();
    let cleanup = v.audit_details("cleanup", "ok");
    assert!(
        cleanup.iter().any(|d| d.contains("unmounted")),
        "{cleanup:?}"
    );
    // The client from before the crash holds a session the new daemon
    // does not know.
    let _ = enter.kill();
    let _ = enter.wait();
    let _ = std::fs::remove_file(session_file(&v.members[0].identity));
    let mut enter = v.enter_bg("alice", &[]);
    records_present(&l.mountpoint.join("shared/journal"), acked);
    leave(&v, "alice", &mut enter);
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    let img = v.tmp.path().join("clear.img");
    v.decrypt_volume(&img);
    ok(&Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap());
}

/// `coffre init` formats in a mount namespace of its own, born with a
/// copy of every mount: another vault's open data among them, which that
/// vault's close would find busy (and kill the init). The init detaches
/// those copies first: sampled while it runs in its own namespace, it
/// never holds the open vault's data.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn an_init_never_holds_another_open_vaults_data() {
    let mut a = Vault::init(&[]);
    a.start();
    let mut enter = a.enter_bg("alice", &[]);
    let data = a.layout().mountpoint.display().to_string();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    // A larger volume: its format runs long enough to be sampled.
    let init = std::thread::spawn(|| Vault::init(&["--size", "2G"]));
    let (mut sampled, mut held) = (0, Vec::new());
    // When each init was first seen in its own namespace: it detaches the
    // other vaults' copies right after making it, and a sample within that
    // instant can see them (a CI run on a loaded host did). Samples from
    // half a second on count: a copy held then would be held for good.
    let mut first_seen = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !init.is_finished() && Instant::now() < deadline {
        for d in std::fs::read_dir("/proc").unwrap().flatten() {
            let p = d.path();
            let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let is_init = args.len() > 1 && args[0].ends_with(b"coffre") && args[1] == b"init";
            // Only once it is in its own namespace (not in its first
            // instants, before it made one).
            let own_ns = std::fs::read_link(p.join("ns/mnt")).is_ok_and(|n| n != ours);
            if is_init && own_ns {
                let since = *first_seen.entry(p.clone()).or_insert_with(Instant::now);
                if since.elapsed() < Duration::from_millis(500) {
                    continue;
                }
                let mi = std::fs::read_to_string(p.join("mountinfo")).unwrap_or_default();
                if mi.is_empty() {
                    continue;
                }
                sampled += 1;
                held.extend(mi.lines().filter(|l| l.contains(&data)).map(String::from));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _b = init.join().unwrap();
    assert!(sampled > 0, "the init was never seen in its namespace");
    assert!(
        held.is_empty(),
        "the init held the open vault's data: {held:?}"
    );
    leave(&a, "alice", &mut enter);
    a.wait_state("closed", Duration::from_secs(30));
    assert!(a.audit_details("close", "killed").is_empty());
    a.stop();
    assert!(a.leftovers().is_empty(), "{:?}", a.leftovers());
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, network namespaces"]
fn a_copy_of_the_mount_in_another_namespace_does_not_keep_the_vault_open() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::NetNs]);
    let mut v = Vault::init(&[]);
    v.set_data(0, 1, &[]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    // A process in its own mount namespace, made while the vault is open:
    // it has its own copy of the mount, which our unmount does not touch.
    let mut ns = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "1000"])
        .spawn()
        .unwrap();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", ns.id())).unwrap_or_default();
        let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", ns.id())).ok();
        if comm.trim() == "sleep" && theirs.is_some_and(|t| t != ours) {
            break;
        }
        assert!(Instant::now() < deadline, "unshare did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    leave(&v, "alice", &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    assert!(ns.wait().unwrap().code().is_none(), "stopped by a signal");
    let killed = v.audit_details("close", "killed");
    assert!(
        killed
            .iter()
            .any(|d| d.starts_with("sleep (pid") && d.contains("mount namespace")),
        "{killed:?}"
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_failed_open_says_why_and_leaves_nothing_behind() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    // The mount point is taken by a file: the open cannot complete.
    std::fs::write(v.dir.join("data"), b"not a directory").unwrap();
    v.start();
    let out = v.authed("alice", &["enter"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not open") && err.contains("mount point"),
        "{err}"
    );
    v.wait_state("closed", Duration::from_secs(30));
    assert_eq!(v.status("alice")["key_held"], false);
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    // Fixed, it opens.
    std::fs::remove_file(v.dir.join("data")).unwrap();
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.status("alice")["data"]["mounted"], true);
    leave(&v, "alice", &mut enter);
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_symlink_planted_in_the_data_is_refused_not_followed() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.set_data(4242, 1, &[]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let mp = v.layout().mountpoint;
    // What a member with root somewhere would try: shared/ pointing out
    // of the vault, so the next open chowns and chmods the target.
    let target = v.tmp.path().join("outside");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(mp.join("shared"), mp.join("shared.old")).unwrap();
    std::os::unix::fs::symlink(&target, mp.join("shared")).unwrap();
    leave(&v, "alice", &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    let out = v.authed("alice", &["enter"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a plain directory"), "{err}");
    assert_eq!(
        owner_mode(&target),
        (0, 0, 0o755),
        "the target was not touched"
    );
    v.wait_state("closed", Duration::from_secs(30));
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_lock_wipes_the_key_even_when_the_data_cannot_be_unmounted() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&["--size", "48M"]);
    v.set_data(0, 1, &[]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let mp = v.layout().mountpoint;
    std::fs::write(
        mp.join("shared/kept.txt"),
        b"written and synced before the lock\n",
    )
    .unwrap();
    std::fs::File::open(mp.join("shared/kept.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    // A holder no signal can stop: a loop device on a file in the mount.
    let inner = mp.join("shared/inner.img");
    std::fs::write(&inner, vec![0u8; 4 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&inner)
        .output()
        .unwrap();
    ok(&out);
    let inner_dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = v.authed("alice", &["lock", "--reason", "drill"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    v.wait_state("locked", Duration::from_secs(60));
    let _ = wait_exit(&mut enter, Duration::from_secs(10));
    assert_eq!(v.status("alice")["key_held"], false);
    assert_eq!(v.status("alice")["data"]["mounted"], false);
    assert!(
        coffre_data::system::mount_at(&mp).is_none(),
        "nothing at the mount point"
    );
    let notes = v.audit_details("close", "note");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("FUSE connection aborted") && n.contains("dropped its key")),
        "{notes:?}"
    );
    assert!(!notes.iter().any(|n| n.contains("still held")), "{notes:?}");
    // Once the holder goes, nothing of the stack is left.
    ok(&Command::new("losetup")
        .args(["-d", &inner_dev])
        .output()
        .unwrap());
    // (The volume's loop device, on the lazily detached FUSE file, shows
    // "/" as its backing file in sysfs; it clears itself.)
    let detached_loops = || {
        std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("loop/backing_file"))
                    .is_ok_and(|b| b.trim() == "/")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !v.leftovers().is_empty() || detached_loops() > 0 {
        assert!(Instant::now() < deadline, "{:?}", v.leftovers());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Unlocked, the vault opens again with what was synced.
    let out = v.authed("alice", &["unlock"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    v.wait_state("closed", Duration::from_secs(30));
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(
        std::fs::read(mp.join("shared/kept.txt")).unwrap(),
        b"written and synced before the lock\n"
    );
    leave(&v, "alice", &mut enter);
}

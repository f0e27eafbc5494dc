//! The vault on an S3 store (issue 17, first wiring): `coffre init
//! --storage s3://...` against moto on loopback, the data mounted over the
//! store at each open and flushed at each close, no plaintext in any
//! object, and a bucket rolled back to an older, consistent state refused
//! at open with the vault left closed.

use crate::harness::*;
use coffre_testkit::moto::Moto;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as ObjPath;
use std::collections::BTreeMap;
use std::time::Duration;

/// `coffre storage status DIR --json`: its exit code and what it printed.
fn storage_status(v: &Vault) -> (i32, serde_json::Value) {
    let out = v
        .bin()
        .args(["storage", "status", v.dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (code(&out), j)
}

/// alice asks the vault to open; it stays closed. Whether an audit
/// record's detail says every one of `words`.
fn refused_open_says(v: &mut Vault, words: &[&str]) -> bool {
    let _ = v.authed("alice", &["enter", "--detach", "--heartbeat", "1"]);
    v.wait_state("closed", Duration::from_secs(30));
    v.audit().iter().any(|r| {
        r["record"]["detail"]
            .as_str()
            .is_some_and(|d| words.iter().all(|w| d.contains(w)))
    })
}

fn bucket(moto: &Moto, name: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(name)
        .with_region("us-east-1")
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id("AKIATESTCOFFRE")
        .with_secret_access_key("test-secret")
        .build()
        .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every object of the bucket.
fn snapshot(s: &object_store::aws::AmazonS3) -> BTreeMap<String, Vec<u8>> {
    rt().block_on(async {
        let mut out = BTreeMap::new();
        let mut list = s.list(None);
        while let Some(meta) = list.next().await {
            let meta = meta.unwrap();
            let b = s.get(&meta.location).await.unwrap().bytes().await.unwrap();
            out.insert(meta.location.to_string(), b.to_vec());
        }
        out
    })
}

/// The bucket made exactly `snap` again.
fn restore(s: &object_store::aws::AmazonS3, snap: &BTreeMap<String, Vec<u8>>) {
    let now = snapshot(s);
    rt().block_on(async {
        for k in now.keys().filter(|k| !snap.contains_key(*k)) {
            s.delete(&ObjPath::from(k.as_str())).await.unwrap();
        }
        for (k, v) in snap {
            s.put(&ObjPath::from(k.as_str()), v.clone().into())
                .await
                .unwrap();
        }
    });
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, moto (PyPI moto[server])"]
fn a_vault_on_s3_keeps_its_data_there_and_refuses_a_rolled_back_bucket() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::Moto]);
    let moto = Moto::start();
    moto.bucket("team-vault");
    let endpoint = moto.endpoint();
    let creds = moto.credentials();
    let mut v = Vault::init(&[
        "--storage",
        "s3://team-vault/v1",
        "--storage-endpoint",
        &endpoint,
        "--storage-allow-http",
        "--storage-credentials",
        creds.to_str().unwrap(),
    ]);
    // No local data file; the credentials copied into the control
    // directory, 0600.
    assert!(!v.dir.join("volume.img").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(v.dir.join("storage.credentials"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let s3 = bucket(&moto, "team-vault");
    assert!(snapshot(&s3).keys().any(|k| k == "v1/manifest"));
    v.start();

    // Open over the store, write, close: flushed there.
    let mut e = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    let secret = b"the team's secret formula, 42 and counting";
    let file = v.layout().mountpoint.join("shared").join("formula.txt");
    std::fs::write(&file, secret).unwrap();
    v.leave_closed("alice", &mut e);
    let yesterday = snapshot(&s3);
    assert!(yesterday.len() > 3, "{:?}", yesterday.keys());
    for (k, bytes) in &yesterday {
        assert!(!contains(bytes, secret), "plaintext in {k}");
    }

    // Again: the file is there, read through the store; a second write,
    // and the daemon stopped (SIGTERM) while the vault is open: the close
    // flushes to the store from the daemon's own thread.
    let mut e = v.enter_bg("alice", &[]);
    assert_eq!(std::fs::read(&file).unwrap(), secret);
    let today = v.layout().mountpoint.join("shared").join("today.txt");
    std::fs::write(&today, b"today").unwrap();
    v.stop();
    wait_exit(&mut e, Duration::from_secs(10));
    assert!(
        !v.daemon_stderr().contains("panicked"),
        "{}",
        v.daemon_stderr()
    );
    v.start();
    // (The stopped session's file may still be there: wait for the open
    // itself.)
    let _ = std::fs::remove_file(session_file(&v.member("alice").identity));
    let mut e = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(30));
    assert!(
        std::fs::read(&today).is_ok_and(|b| b == b"today"),
        "lost at the stop: {}\n{:#?}",
        v.daemon_stderr(),
        v.audit()
            .iter()
            .rev()
            .take(25)
            .map(|r| format!(
                "{} {} {}",
                r["record"]["action"], r["record"]["result"], r["record"]["detail"]
            ))
            .collect::<Vec<_>>()
    );
    v.leave_closed("alice", &mut e);

    let text = String::from_utf8(v.cli("alice", &["status"]).stdout).unwrap();
    assert!(text.contains("storage: s3://team-vault/v1"), "{text}");
    let (c, j) = storage_status(&v);
    assert_eq!(c, 0, "{j}");
    assert_eq!(j["standing"], "in step", "{j}");
    assert_eq!(j["local_root_epoch"], j["store_epoch_claimed"]);

    // The provider serves yesterday's bucket: consistent, authentic,
    // older. The open fails, says why, and the vault stays closed.
    v.stop();
    restore(&s3, &yesterday);
    let (c, j) = storage_status(&v);
    assert_eq!(c, 1, "{j}");
    assert!(j["standing"].as_str().unwrap().starts_with("BEHIND"), "{j}");
    v.start();
    let out = v.authed("alice", &["enter", "--detach", "--heartbeat", "1"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    v.wait_state("closed", Duration::from_secs(30));
    let records = v.audit();
    let failed = records.iter().any(|r| {
        r["record"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rolled back"))
    });
    assert!(
        failed,
        "no audit record of the rollback: {said}\n{records:#?}"
    );
    assert_eq!(v.status("alice")["key_held"], false);
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    // `coffre storage trust` of a store behind the local root is what a
    // rollback looks like: refused without --older, the root unchanged.
    let root = v.dir.join("storage.root");
    let kept = std::fs::read(&root).unwrap();
    let out = v
        .bin()
        .args([
            "storage",
            "trust",
            v.dir.to_str().unwrap(),
            "--password-file",
        ])
        .arg(&v.member("alice").password)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 1, "{said}");
    assert!(said.contains("behind the local root"), "{said}");
    assert_eq!(std::fs::read(&root).unwrap(), kept, "the root moved");
    // Without the root kept locally, nothing would tell yesterday from
    // today: its loss is said, and the next open is refused.
    std::fs::remove_file(v.dir.join("storage.root")).unwrap();
    let (c, j) = storage_status(&v);
    assert_eq!(c, 1, "{j}");
    assert!(
        j["standing"].as_str().unwrap().starts_with("NO LOCAL ROOT"),
        "{j}"
    );
    v.start();
    assert!(
        refused_open_says(&mut v, &["storage.root"]),
        "the refused open names the missing root"
    );
    v.stop();
    // Recovery, when the operator knows the store is current: `coffre
    // storage trust` verifies it with the integrity key and keeps its
    // root; the vault opens (at yesterday's state, which is what the
    // store holds), and the rollback check holds again from there.
    let pw = v.member("alice").password.clone();
    let trust = |v: &Vault| {
        v.bin()
            .args([
                "storage",
                "trust",
                v.dir.to_str().unwrap(),
                "--password-file",
            ])
            .arg(&pw)
            .output()
            .unwrap()
    };
    let out = trust(&v);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("was missing"));
    let (c, j) = storage_status(&v);
    assert_eq!((c, j["standing"].as_str()), (0, Some("in step")), "{j}");
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(30));
    assert_eq!(std::fs::read(&file).unwrap(), secret);
    v.leave_closed("alice", &mut e);
    v.stop();
    // Orphans: a chunk of the volume's layout that no manifest names (as
    // an upload a crash cut short leaves one), beside an object of another
    // kind in the store's folder. `coffre storage sweep` lists it with
    // --dry-run and deletes nothing; then deletes it (and the versions the
    // stopped daemons had not yet collected), never the manifest nor the
    // other object; the vault opens and reads as before.
    let now = snapshot(&s3);
    let (chunk, bytes) = now.iter().find(|(k, _)| k.starts_with("v1/c/")).unwrap();
    let planted = format!("{}ffffffffffffffff", &chunk[..chunk.len() - 16]);
    rt().block_on(async {
        for (k, b) in [
            (planted.as_str(), bytes.clone()),
            ("v1/readme.txt", b"hi".to_vec()),
        ] {
            s3.put(&ObjPath::from(k), b.into()).await.unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(2100));
    let sweep = |v: &Vault, more: &[&str]| {
        let out = v
            .bin()
            .args(["storage", "sweep", v.dir.to_str().unwrap(), "--json"])
            .args(["--min-age", "2s", "--force", "--password-file"])
            .arg(&pw)
            .args(more)
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let before = snapshot(&s3);
    let j = sweep(&v, &["--dry-run"]);
    let listed: Vec<String> = j["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("v1/{}", n.as_str().unwrap()))
        .collect();
    assert!(listed.contains(&planted), "{j}");
    assert!(
        listed
            .iter()
            .all(|n| n.starts_with("v1/c/") || n.starts_with("v1/p/")),
        "{j}"
    );
    assert_eq!(j["deleted"], 0);
    assert_eq!(snapshot(&s3), before, "a dry run deletes nothing");
    let j = sweep(&v, &[]);
    assert_eq!(j["deleted"].as_u64(), Some(listed.len() as u64), "{j}");
    let after = snapshot(&s3);
    assert!(!after.contains_key(&planted));
    assert!(after.contains_key("v1/readme.txt") && after.contains_key("v1/manifest"));
    assert!(
        before
            .keys()
            .all(|k| after.contains_key(k) || listed.contains(k))
    );
    assert_eq!(sweep(&v, &[])["deleted"], 0, "nothing left");
    assert_eq!(j["unjudged"].as_array().map(Vec::len), Some(0), "{j}");
    // Without --force, an age under an hour is refused (only the age keeps
    // a sweep off another host's unflushed objects).
    let out = v
        .bin()
        .args([
            "storage",
            "sweep",
            v.dir.to_str().unwrap(),
            "--min-age",
            "2s",
        ])
        .args(["--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    assert_eq!(code(&out), 64, "{}", String::from_utf8_lossy(&out.stderr));
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(30));
    assert_eq!(std::fs::read(&file).unwrap(), secret);
    v.leave_closed("alice", &mut e);
    v.stop();
    // A store whose data does not verify is not trusted.
    let mut bad = snapshot(&s3);
    let m = bad.get_mut("v1/manifest").unwrap();
    let last = m.len() - 1;
    m[last] ^= 1;
    restore(&s3, &bad);
    let out = trust(&v);
    assert_eq!(code(&out), 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not verify"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, moto (PyPI moto[server])"]
fn a_local_vault_migrates_to_s3_and_exports_back_byte_identical() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::Moto]);
    let moto = Moto::start();
    moto.bucket("migrated-vault");
    let mut v = Vault::init(&[]);
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    let file = v.layout().mountpoint.join("shared").join("before.txt");
    std::fs::write(&file, b"written while the volume was a local file").unwrap();
    v.leave_closed("alice", &mut e);
    // While the daemon runs, the volume is its: refused, and said so.
    let pw = v.member("alice").password.clone();
    let endpoint = moto.endpoint();
    let creds = moto.credentials();
    let migrate = |v: &Vault| {
        v.bin()
            .args(["storage", "migrate", v.dir.to_str().unwrap()])
            .args(["--to", "s3://migrated-vault/team", "--endpoint", &endpoint])
            .args(["--allow-http", "--credentials", creds.to_str().unwrap()])
            .args(["--password-file", pw.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = migrate(&v);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop the vault's daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    v.stop();
    let out = migrate(&v);
    ok(&out);
    let migrated = v.dir.join("volume.img.migrated");
    assert!(migrated.exists() && !v.dir.join("volume.img").exists());
    let cfg = std::fs::read_to_string(v.dir.join("config.toml")).unwrap();
    assert!(
        cfg.contains("[storage]") && !cfg.contains("volume = "),
        "{cfg}"
    );
    // Exported back, it is the local volume byte for byte.
    let export = v.tmp.path().join("export.img");
    let out = v
        .bin()
        .args(["storage", "export", v.dir.to_str().unwrap()])
        .args(["--out", export.to_str().unwrap()])
        .args(["--password-file", pw.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&out);
    assert!(std::fs::read(&export).unwrap() == std::fs::read(&migrated).unwrap());
    // The vault opens on the store, with its data.
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"written while the volume was a local file"
    );
    v.leave_closed("alice", &mut e);
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
}

/// The volume key, from the header alone (cryptsetup takes the header
/// file as the device), with alice's password.
fn volume_key_of(v: &Vault) -> Vec<u8> {
    let out_file = v.tmp.path().join("vk");
    let out = std::process::Command::new("cryptsetup")
        .args(["-q", "--disable-locks", "luksDump", "--dump-volume-key"])
        .args(["--volume-key-file", out_file.to_str().unwrap()])
        .args(["--key-file", v.members[0].password.to_str().unwrap()])
        .arg(v.dir.join("volume.hdr"))
        .output()
        .unwrap();
    ok(&out);
    let key = std::fs::read(&out_file).unwrap();
    std::fs::remove_file(&out_file).unwrap();
    key
}

/// A lock over a store that stops answering (moto stopped with SIGSTOP:
/// connections accepted, nothing answered) finishes in bounded time: past
/// `[data] close_deadline_s` the engine's cipher is revoked and the key
/// wiped, while the flush to the store still hangs.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup, moto (PyPI moto[server])"]
fn a_lock_over_a_store_that_stops_answering_wipes_the_key_in_bounded_time() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
        Need::Moto,
    ]);
    let moto = Moto::start();
    moto.bucket("hanging-store");
    let endpoint = moto.endpoint();
    let creds = moto.credentials();
    let mut v = Vault::init(&[
        "--storage",
        "s3://hanging-store/v",
        "--storage-endpoint",
        &endpoint,
        "--storage-allow-http",
        "--storage-credentials",
        creds.to_str().unwrap(),
    ]);
    let key = volume_key_of(&v);
    let cfg = v.dir.join("config.toml");
    let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
    t.entry("data")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert("close_deadline_s".into(), toml::Value::Integer(3));
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    v.start();
    let pid = v.pid();
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    assert!(
        memory_contains(pid, &key),
        "the scan cannot see the held key"
    );
    // Unflushed changes, then the store stops answering.
    let data = v.layout().mountpoint.join("shared");
    std::fs::write(data.join("unsaved.bin"), vec![0x5a; 4 << 20]).unwrap();
    unsafe_kill(moto.pid(), "STOP");
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            unsafe_kill(self.0, "CONT");
        }
    }
    let resume = Resume(moto.pid());
    ok(&v.authed("alice", &["lock", "--reason", "store gone"]));
    v.wait_key_gone(Duration::from_secs(30));
    assert_eq!(v.state(), "locked");
    assert!(
        !memory_contains(pid, &key),
        "the volume key outlived the deadline"
    );
    assert!(
        v.audit()
            .iter()
            .any(|e| e["record"]["action"] == "close" && e["record"]["result"] == "deadline"),
        "the audit log says the close was abandoned"
    );
    // The store answers again: what hung finishes and goes away.
    drop(resume);
    wait_exit(&mut enter, Duration::from_secs(30));
    v.wait_no_leftovers(
        Duration::from_secs(120),
        "the abandoned close never finished",
    );
    v.stop();
}

/// Mirrors, end to end, against two moto servers (two providers): every
/// object on both; the mirror stops answering while the vault is open and
/// a file is fsynced: the fsync returns after the degrade timeout, the
/// mirror is shown stale and audited; it answers again and is brought back
/// in the background; then the primary is gone for good and the vault
/// opens from the mirror alone, with every file.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, moto (PyPI moto[server])"]
fn a_mirrored_vault_survives_either_store_and_brings_the_lagging_one_back() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::Moto]);
    let primary = Moto::start();
    let mirror = Moto::start();
    primary.bucket("provider-a");
    mirror.bucket("provider-b");
    let creds = primary.credentials();
    let mut v = Vault::init(&[
        "--storage",
        "s3://provider-a/team",
        "--storage-endpoint",
        &primary.endpoint(),
        "--storage-allow-http",
        "--storage-credentials",
        creds.to_str().unwrap(),
        "--mirror",
        "s3://provider-b/copy",
        "--mirror-endpoint",
        &mirror.endpoint(),
    ]);
    let cfg = v.dir.join("config.toml");
    let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
    let storage = t["storage"].as_table_mut().unwrap();
    assert_eq!(
        storage["mirror"].as_array().unwrap().len(),
        1,
        "{storage:?}"
    );
    storage.insert("degrade_after_s".into(), toml::Value::Integer(2));
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    let (a, b) = (
        bucket(&primary, "provider-a"),
        bucket(&mirror, "provider-b"),
    );
    let relative = |snap: BTreeMap<String, Vec<u8>>, prefix: &str| -> BTreeMap<String, Vec<u8>> {
        snap.into_iter()
            .map(|(k, x)| (k.strip_prefix(prefix).unwrap().to_string(), x))
            .collect()
    };
    v.start();

    let mut e = v.enter_bg("alice", &[]);
    let shared = v.layout().mountpoint.join("shared");
    let first = b"written while both stores answered";
    std::fs::write(shared.join("first.txt"), first).unwrap();
    v.leave_closed("alice", &mut e);
    let (sa, sb) = (
        relative(snapshot(&a), "team/"),
        relative(snapshot(&b), "copy/"),
    );
    assert_eq!(sa, sb, "the mirror holds exactly the primary's objects");
    for (k, bytes) in &sb {
        assert!(!contains(bytes, first), "plaintext in {k}");
    }

    // The mirror hangs while a file is written and fsynced.
    let mut e = v.enter_bg("alice", &[]);
    unsafe_kill(mirror.pid(), "STOP");
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            unsafe_kill(self.0, "CONT");
        }
    }
    let resume = Resume(mirror.pid());
    let second = b"written while the mirror hung";
    {
        use std::io::Write;
        let mut f = std::fs::File::create(shared.join("second.txt")).unwrap();
        f.write_all(second).unwrap();
        f.sync_all().unwrap();
    }
    let stores = |v: &Vault| v.status("alice")["data"]["storage"]["stores"].clone();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while stores(&v)[1]["in_step"] != false {
        assert!(std::time::Instant::now() < until, "{}", stores(&v));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(stores(&v)[0]["in_step"], true);
    assert!(
        !v.audit_details("storage_degraded", "stale").is_empty(),
        "the audit log says the mirror was left behind"
    );
    let text = String::from_utf8(v.cli("alice", &["status"]).stdout).unwrap();
    assert!(text.contains("STALE"), "{text}");

    // It answers again: brought back in the background, while open.
    drop(resume);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while stores(&v)[1]["in_step"] != true {
        assert!(
            std::time::Instant::now() < until,
            "{}\n{}",
            stores(&v),
            v.daemon_stderr()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!v.audit_details("storage_resynced", "ok").is_empty());
    v.leave_closed("alice", &mut e);
    let (c, j) = storage_status(&v);
    assert_eq!(c, 0, "{j}");
    for st in j["stores"].as_array().unwrap() {
        assert_eq!(st["standing"], "in step", "{j}");
    }

    // The primary's provider is gone for good: the mirror alone opens the
    // vault, with everything.
    drop(primary);
    let mut e = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(60));
    assert_eq!(std::fs::read(shared.join("first.txt")).unwrap(), first);
    assert_eq!(std::fs::read(shared.join("second.txt")).unwrap(), second);
    assert_eq!(stores(&v)[0]["in_step"], false, "{}", stores(&v));
    std::fs::write(shared.join("third.txt"), b"on the mirror alone").unwrap();
    v.leave_closed("alice", &mut e);
    assert!(
        !v.daemon_stderr().contains("panicked"),
        "{}",
        v.daemon_stderr()
    );
    v.stop();

    // Disaster recovery from the replica alone, read-only: the export
    // writes nothing to the mirror, and cryptsetup with the detached
    // header decrypts it into the team's filesystem, every file there.
    let before = snapshot(&b);
    let export = v.tmp.path().join("from-mirror.img");
    let pw = v.member("alice").password.clone();
    let out = v
        .bin()
        .args(["storage", "export", v.dir.to_str().unwrap()])
        .args(["--store", "s3://provider-b/copy"])
        .args(["--out", export.to_str().unwrap()])
        .args(["--password-file", pw.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(snapshot(&b), before, "the export wrote to the replica");
    let hdr = v.tmp.path().join("hdr-copy");
    std::fs::copy(v.dir.join("volume.hdr"), &hdr).unwrap();
    let out = std::process::Command::new("cryptsetup")
        .args(["-q", "reencrypt", "--decrypt", "--force-offline-reencrypt"])
        .args(["--key-file", pw.to_str().unwrap(), "--header"])
        .args([&hdr, &export])
        .output()
        .unwrap();
    ok(&out);
    for (name, want) in [
        ("first.txt", &first[..]),
        ("second.txt", &second[..]),
        ("third.txt", &b"on the mirror alone"[..]),
    ] {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat /shared/{name}")])
            .arg(&export)
            .output()
            .unwrap();
        assert_eq!(
            out.stdout,
            want,
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A store that is not in config.toml is refused by name.
    let out = v
        .bin()
        .args(["storage", "export", v.dir.to_str().unwrap()])
        .args(["--store", "s3://elsewhere/x", "--out"])
        .arg(v.tmp.path().join("nope.img"))
        .args(["--password-file", pw.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither the store nor a mirror"));
}

/// The mounted vault on S3 (moto on loopback), against raw `object_store`
/// puts and gets of 1 MiB objects with 16 in flight on the same server,
/// same run: sequential writes (fio, 1 MiB, direct, fsync at the end) and
/// reads (after a reopen: nothing cached), the same writes again (after
/// another reopen: over chunks on the store, none in the buffer), and
/// random 4 KiB writes each followed by an fsync (every journal commit
/// uploads chunks, pages and the manifest) against raw conditional puts
/// one after another. `scripts/bench-remote` runs it.
#[test]
#[ignore = "survey: needs root, FUSE, loop, mkfs.ext4, moto (PyPI moto[server]), fio"]
fn survey_the_mounted_vault_on_s3() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4, Need::Moto]);
    for chunk in ["1M", "256K", "64K"] {
        mounted_vault_on_s3(chunk);
    }
}

fn mounted_vault_on_s3(chunk: &str) {
    let moto = Moto::start();
    moto.bucket("bench-vault");
    moto.bucket("bench-raw");
    let creds = moto.credentials();
    let mut v = Vault::init(&[
        "--size",
        "512M",
        "--storage",
        "s3://bench-vault/v",
        "--storage-endpoint",
        &moto.endpoint(),
        "--storage-allow-http",
        "--storage-credentials",
        creds.to_str().unwrap(),
        "--storage-chunk-size",
        chunk,
    ]);
    v.start();
    let mib = 128usize;
    // Raw: the same bytes as objects of the chunk size, 16 in flight.
    let raw = bucket(&moto, "bench-raw");
    let object = usize::try_from(coffre::size::parse_size(chunk).unwrap()).unwrap();
    let objects = (mib << 20) / object;
    let data = vec![0x5au8; object];
    let t = std::time::Instant::now();
    rt().block_on(async {
        for batch in (0..objects).collect::<Vec<_>>().chunks(16) {
            let puts = batch.iter().map(|i| {
                let (raw, d) = (&raw, data.clone());
                async move { raw.put(&ObjPath::from(format!("raw/{i}")), d.into()).await }
            });
            for r in futures::future::join_all(puts).await {
                r.unwrap();
            }
        }
    });
    let raw_put = t.elapsed();
    let t = std::time::Instant::now();
    rt().block_on(async {
        for batch in (0..objects).collect::<Vec<_>>().chunks(16) {
            let gets = batch.iter().map(|i| {
                let raw = &raw;
                async move {
                    raw.get(&ObjPath::from(format!("raw/{i}")))
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap()
                }
            });
            for b in futures::future::join_all(gets).await {
                assert_eq!(b.len(), object);
            }
        }
    });
    let raw_get = t.elapsed();
    // Raw conditional puts, one after another, for 5 s.
    let t = std::time::Instant::now();
    let mut cond = 0u32;
    rt().block_on(async {
        let p = ObjPath::from("raw/manifest");
        let mut tag = raw.put(&p, vec![1u8; 4096].into()).await.unwrap();
        while t.elapsed() < Duration::from_secs(5) {
            tag = raw
                .put_opts(
                    &p,
                    vec![2u8; 4096].into(),
                    object_store::PutMode::Update(object_store::UpdateVersion {
                        e_tag: tag.e_tag.clone(),
                        version: tag.version.clone(),
                    })
                    .into(),
                )
                .await
                .unwrap();
            cond += 1;
        }
    });
    let cond_per_s = f64::from(cond) / t.elapsed().as_secs_f64();

    let mut e = v.enter_bg("alice", &[]);
    let dir = v.layout().mountpoint.join("shared");
    let size = format!("--size={mib}M");
    let write_mbs = fio_mibs(
        &fio(&dir, &["--rw=write", "--bs=1M", &size, "--end_fsync=1"]),
        "write",
    );
    // Reopened: the device's buffer is empty, every chunk comes from the
    // store.
    v.leave_closed("alice", &mut e);
    let mut e = v.enter_bg("alice", &[]);
    let read_mbs = fio_mibs(&fio(&dir, &["--rw=read", "--bs=1M", &size]), "read");
    // The same file written again, reopened first: every chunk is on the
    // store and none in the buffer, and the loop device hands the daemon
    // each 1 MiB in two halves of 512 KiB (a chunk written in parts is
    // fetched only if the parts do not cover it: not here).
    v.leave_closed("alice", &mut e);
    let mut e = v.enter_bg("alice", &[]);
    let over_mbs = fio_mibs(
        &fio(&dir, &["--rw=write", "--bs=1M", &size, "--end_fsync=1"]),
        "write",
    );
    let f = fio(
        &dir,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--fsync=1",
            "--time_based",
            "--runtime=8",
        ],
    );
    let fsync_iops = f["jobs"][0]["write"]["iops"].as_f64().unwrap();
    v.leave_closed("alice", &mut e);
    v.stop();
    let raw_put_mbs = mib as f64 / raw_put.as_secs_f64();
    let raw_get_mbs = mib as f64 / raw_get.as_secs_f64();
    println!(
        "bench: mounted vault on s3 (moto, loopback), chunks of {chunk}, {mib} MiB: seq write {write_mbs:.0} MiB/s against raw puts of {chunk} objects x16 {raw_put_mbs:.0} MiB/s (ratio {:.2}); seq read {read_mbs:.0} MiB/s against raw gets x16 {raw_get_mbs:.0} MiB/s (ratio {:.2}); seq overwrite {over_mbs:.0} MiB/s (ratio {:.2} to raw puts); random 4 KiB writes with fsync {fsync_iops:.1}/s against raw conditional puts {cond_per_s:.1}/s (ratio {:.2})",
        write_mbs / raw_put_mbs,
        read_mbs / raw_get_mbs,
        over_mbs / raw_put_mbs,
        fsync_iops / cond_per_s,
    );
}

/// fio's JSON report of one job in `dir` (direct I/O, one request in
/// flight) with `args`.
fn fio(dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("fio")
        .args([
            "--name=bench",
            "--direct=1",
            "--ioengine=psync",
            "--output-format=json",
        ])
        .arg(format!("--directory={}", dir.display()))
        .args(args)
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap()
}

/// MiB/s of fio's report, `rw` "read" or "write".
fn fio_mibs(report: &serde_json::Value, rw: &str) -> f64 {
    report["jobs"][0][rw]["bw_bytes"].as_f64().unwrap() / f64::from(1u32 << 20)
}

/// The mounted vault on an NBD export (nbdkit's memory plugin on a unix
/// socket, 1 MiB chunks), against `nbdcopy` writing and reading the same
/// number of bytes to and from an export of the same kind, same run, each
/// side writing over what it wrote before: fio through the mount writes
/// the file once, untimed; then each round, sequential 1 MiB direct
/// writes over it (fsync at the end) and reads, each after a reopen
/// (nothing in the device's buffer).
/// The loop device hands the daemon much of each 1 MiB in two or three
/// pieces; the overwrite is where a chunk written in parts used to be
/// fetched first. `scripts/bench-nbd` runs it.
#[test]
#[ignore = "survey: needs root, FUSE, loop, mkfs.ext4, nbdkit, nbdcopy, fio"]
fn survey_the_mounted_vault_on_nbd() {
    use coffre_testkit::nbdserver::NbdServer;
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::NbdServers,
        Need::Nbd,
    ]);
    let env = |k: &str, d: usize| std::env::var(k).map_or(d, |v| v.parse().unwrap());
    let rounds = env("SURVEY_ROUNDS", 3);
    let mib = env("SURVEY_MIB", 256).min(384);
    // Two slots a chunk, and room for the layout's tables.
    let export = format!("{}M", 2 * 512 + 64);
    let kit = NbdServer::nbdkit(&["memory", &export]);
    let base = NbdServer::nbdkit(&[
        "--filter=truncate",
        "memory",
        &export,
        &format!("truncate={mib}M"),
    ]);
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("data.bin");
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    std::fs::write(&file, &data).unwrap();
    let nbdcopy = |from: &str, to: &str| {
        let t = std::time::Instant::now();
        let out = std::process::Command::new("nbdcopy")
            .args([from, to])
            .output()
            .unwrap();
        ok(&out);
        mib as f64 / t.elapsed().as_secs_f64()
    };
    nbdcopy(file.to_str().unwrap(), &base.url(""));
    let mut v = Vault::init(&[
        "--size",
        "512M",
        "--storage",
        &kit.url("team"),
        "--storage-chunk-size",
        "1M",
    ]);
    v.start();
    let dir = v.layout().mountpoint.join("shared");
    let size = format!("--size={mib}M");
    let write = ["--rw=write", "--bs=1M", size.as_str(), "--end_fsync=1"];
    // Written once untimed: every timed write is an overwrite, as
    // nbdcopy's are.
    let mut e = v.enter_bg("alice", &[]);
    fio(&dir, &write);
    v.leave_closed("alice", &mut e);
    for _ in 0..rounds {
        let copy_write = nbdcopy(file.to_str().unwrap(), &base.url(""));
        let copy_read = nbdcopy(&base.url(""), "null:");
        let mut e = v.enter_bg("alice", &[]);
        let over = fio_mibs(&fio(&dir, &write), "write");
        v.leave_closed("alice", &mut e);
        let mut e = v.enter_bg("alice", &[]);
        let read = fio_mibs(&fio(&dir, &["--rw=read", "--bs=1M", size.as_str()]), "read");
        v.leave_closed("alice", &mut e);
        println!("nbd-mount-round: {copy_write:.0} {over:.0} {copy_read:.0} {read:.0}");
    }
    v.stop();
}

/// A vault made on an NBD export: nbdkit serving a 48 MiB image file (a
/// 16 MiB volume takes two slots per chunk) as export `team`, chunks of
/// `chunk`.
fn nbd_vault(
    chunk: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    coffre_testkit::nbdserver::NbdServer,
    Vault,
) {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::NbdServers,
    ]);
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("export.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let kit =
        coffre_testkit::nbdserver::NbdServer::nbdkit(&["file", &format!("file={}", img.display())]);
    let v = Vault::init(&["--storage", &kit.url("team"), "--storage-chunk-size", chunk]);
    (scratch, img, kit, v)
}

/// The vault on an NBD export (the original design's iSCSI, served by
/// nbdkit on the storage host): `init --storage nbd+unix://...`, the data
/// mounted over it at each open and flushed at each close, no plaintext
/// on the export, and the export moved to another server (qemu-nbd, the
/// same image) and opened there.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, nbdkit, qemu-nbd"]
fn a_vault_on_an_nbd_export_keeps_its_data_there_and_moves_to_another_server() {
    use coffre_testkit::nbdserver::NbdServer;
    let (_scratch, img, mut kit, mut v) = nbd_vault("256K");
    let url = kit.url("team");
    assert!(!v.dir.join("volume.img").exists());
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    let secret = b"the partner's drawings, revision 7, on the storage host";
    let file_in = v.layout().mountpoint.join("shared").join("drawings.txt");
    std::fs::write(&file_in, secret).unwrap();
    v.leave_closed("alice", &mut e);
    let raw = std::fs::read(&img).unwrap();
    assert!(raw.starts_with(b"coffre-blocks-1\0"));
    assert!(!contains(&raw, secret), "plaintext on the export");
    let (c, j) = storage_status(&v);
    assert_eq!(c, 0, "{j}");
    assert_eq!(j["backend"], "nbd", "{j}");
    assert_eq!(j["standing"], "in step", "{j}");
    v.stop();
    kit.stop();

    // The storage host now serves the same image with qemu-nbd.
    let q = NbdServer::qemu_nbd(&img);
    let cfg = std::fs::read_to_string(v.dir.join("config.toml")).unwrap();
    assert!(cfg.contains(&url), "{cfg}");
    std::fs::write(
        v.dir.join("config.toml"),
        cfg.replace(&url, &q.url("coffre")),
    )
    .unwrap();
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    assert_eq!(std::fs::read(&file_in).unwrap(), secret);
    v.leave_closed("alice", &mut e);
    v.stop();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
}

/// A write the data took and no flush made durable yet (a direct
/// overwrite of an allocated block: no journal commit, no cache flush)
/// survives a crash of the daemon (SIGKILL): the device's write journal
/// on local disk keeps it, and the next open replays it, verified, onto
/// the store (audited).
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, nbdkit"]
fn a_write_not_yet_flushed_survives_a_daemon_crash_through_the_journal() {
    let (_scratch, _img, _kit, mut v) = nbd_vault("64K");
    v.start();
    let mut e = v.enter_bg("alice", &[]);
    let file = v.layout().mountpoint.join("shared").join("ledger.txt");
    std::fs::write(&file, vec![b'o'; 4096]).unwrap();
    ok(&std::process::Command::new("sync")
        .arg(&file)
        .output()
        .unwrap());
    // Overwritten in place, directly: the block goes down to the device
    // with no flush after it.
    let new = v.tmp.path().join("new.bin");
    std::fs::write(&new, vec![b'n'; 4096]).unwrap();
    ok(&std::process::Command::new("dd")
        .arg(format!("if={}", new.display()))
        .arg(format!("of={}", file.display()))
        .args(["bs=4096", "count=1", "conv=notrunc", "oflag=direct"])
        .output()
        .unwrap());
    v.crash();
    let _ = e.kill();
    let _ = e.wait();
    let journal = v.dir.join("cache").join("journal");
    let held = |v: &Vault| {
        let (c, j) = storage_status(v);
        assert_eq!(c, 0, "{j}");
        j["journal_bytes"].as_u64().unwrap()
    };
    // What its records claim (the file is written over in place: its
    // length says less).
    let claimed = held(&v);
    assert!(claimed > 4096, "the write is not in the journal: {claimed}");
    assert!(claimed <= std::fs::metadata(&journal).unwrap().len());
    v.start();
    let _ = std::fs::remove_file(session_file(&v.member("alice").identity));
    let mut e = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(30));
    let got = std::fs::read(&file).unwrap();
    assert!(
        got == vec![b'n'; 4096],
        "the write was lost: the file starts {:?}",
        String::from_utf8_lossy(&got[..got.len().min(16)])
    );
    let replayed = v.audit_details("storage", "ok");
    assert!(
        replayed.iter().any(|d| d.contains("write journal held")),
        "{replayed:?}"
    );
    v.leave_closed("alice", &mut e);
    // A clean close leaves it empty.
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    assert_eq!(held(&v), 0);
    // A journal that cannot be read is said so, not shown as empty.
    std::fs::remove_file(&journal).unwrap();
    std::fs::create_dir(&journal).unwrap();
    let (c, j) = storage_status(&v);
    assert_eq!(c, 0, "{j}");
    assert!(j["journal_bytes"].is_null(), "{j}");
    let why = j["journal_error"].as_str().unwrap_or_default();
    assert!(why.contains("not a regular file"), "{j}");
    let out = v
        .bin()
        .args(["storage", "status", v.dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("write journal: CANNOT BE READ"), "{text}");
    std::fs::remove_dir(&journal).unwrap();
    v.stop();
    // A journal's directory under one that others can write: `coffre
    // doctor` says so, and the open is refused with why (audited).
    use std::os::unix::fs::PermissionsExt;
    let shared = v.tmp.path().join("shared-by-all");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg_path = v.dir.join("config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains("[storage]\n"), "{cfg}");
    let cache = shared.join("cache");
    std::fs::write(
        &cfg_path,
        cfg.replace(
            "[storage]\n",
            &format!("[storage]\ncache_dir = {:?}\n", cache.to_str().unwrap()),
        ),
    )
    .unwrap();
    // Said before the directory is made, as after.
    for made in [false, true] {
        if made {
            std::fs::create_dir(&cache).unwrap();
        }
        let out = v
            .bin()
            .args(["doctor", v.dir.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            report["vault"]["findings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| {
                    f["check"] == "journal-dir"
                        && f["level"] == "FAIL"
                        && f["detail"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("shared-by-all")
                }),
            "made {made}: {report}"
        );
    }
    std::fs::remove_dir(&cache).unwrap();
    v.start();
    assert!(
        refused_open_says(&mut v, &["is not root's alone", "shared-by-all"]),
        "the refused open says why"
    );
    assert!(!cache.exists(), "made under a directory all can write");
    v.stop();
    std::fs::write(&cfg_path, &cfg).unwrap();
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
}

//! The volume key is gone from the daemon's memory once the vault closes.

use crate::harness::*;
use std::time::Duration;

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn no_copy_of_the_volume_key_after_close() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
    ]);
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

/// `name`'s password command, in the background.
fn spawn_authed(v: &mut Vault, name: &str, args: &[&str]) -> std::process::Child {
    let code = v.totp(name);
    let pw = v.member(name).password.clone();
    let identity = v.member(name).identity.clone();
    v.bin()
        .args(args)
        .args(["--password-file", pw.to_str().unwrap(), "--totp", &code])
        .env("COFFRE_IDENTITY", identity)
        .env("HOME", v.home(name))
        .env_remove("XDG_STATE_HOME")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A key waiting in the KDF pool for its job (here an invitation's, queued
/// behind other members' slow keyslot checks) is wiped by a lock, not
/// kept until the job's turn comes: while locked the volume key is
/// nowhere, even with the vault closed and a queue of derivations.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_lock_wipes_a_key_waiting_in_the_kdf_pool() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
    ]);
    let mut v = Vault::init(&[]);
    let key = volume_key(&v);
    v.set_policy("auto_lock_failures", 1);
    // New members' keyslots take seconds to check (64 MiB, many passes),
    // and the pool holds one such derivation at a time.
    let cfg = v.dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "iterations = 4\nmemory_kib = 8192",
            "iterations = 100\nmemory_kib = 65536",
        )
        .replace("kdf_memory_cap_kib = 2097152", "kdf_memory_cap_kib = 65536");
    assert!(
        text.contains("iterations = 100") && text.contains("kdf_memory_cap_kib = 65536"),
        "{text}"
    );
    std::fs::write(&cfg, text).unwrap();
    v.start();
    v.add_member("alice", "bob", false);
    v.add_member("alice", "dave", false);
    let pid = v.pid();
    assert!(!memory_contains(pid, &key), "key in memory while CLOSED");
    // Bob's check holds the whole pool; alice's invitation check waits
    // behind it, then dave's check; alice's invitation keyslot, sealed
    // with the volume key her check gave, waits behind dave's. The vault
    // stays closed: an account change keeps no key.
    let clear = ["member", "workload-password", "--clear"];
    let mut bob = spawn_authed(&mut v, "bob", &clear);
    std::thread::sleep(Duration::from_millis(300));
    let inv = v.tmp.path().join("carol.invitation");
    let alice = spawn_authed(
        &mut v,
        "alice",
        &["member", "invite", "carol", "--out", inv.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut dave = spawn_authed(&mut v, "dave", &clear);
    // Positive control: once bob's check is done (its key went with it)
    // and alice's (a fast keyslot) after it, her key waits for the pool
    // in the daemon's memory, and stays there while dave's check runs:
    // the vault is closed, no other copy.
    wait_exit(&mut bob, Duration::from_secs(60));
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !memory_contains(pid, &key) {
        assert!(
            std::time::Instant::now() < until,
            "the invitation's key never showed: the test proves nothing"
        );
        assert!(
            dave.try_wait().unwrap().is_none(),
            "dave's check ended before the key was seen waiting: too fast a host for this test"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(v.state(), "closed");
    // The auto-lock (a wrong code: no keyslot check, no wait for the pool).
    let pw = v.member("alice").password.clone();
    let out = v.cli(
        "alice",
        &[
            "lock",
            "--reason",
            "x",
            "--password-file",
            pw.to_str().unwrap(),
            "--totp",
            "000000",
        ],
    );
    assert_eq!(code(&out), 7);
    assert_eq!(v.state(), "locked");
    assert!(
        !memory_contains(pid, &key),
        "the invitation's key outlived the lock while it waited for the pool"
    );
    assert!(
        dave.try_wait().unwrap().is_none(),
        "dave's check ended before the scan: the key might have gone with its job"
    );
    let alice = alice.wait_with_output().unwrap();
    assert_eq!(
        alice.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&alice.stderr)
    );
    assert!(!inv.exists(), "an invitation made across the lock");
    wait_exit(&mut dave, Duration::from_secs(60));
    assert!(!memory_contains(pid, &key));
    v.stop();
}

/// A file served over FUSE from a backing file, whose writes and syncs
/// block while `hang` is set: storage that stops answering; or that
/// answer one at a time, each after `trickle_ms`: storage that trickles.
mod hangfs {
    use fuser::{
        Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
        MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyOpen, ReplyWrite, Request,
        WriteFlags,
    };
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, SystemTime};

    pub struct HangFile {
        pub backing: std::fs::File,
        pub hang: Arc<AtomicBool>,
        /// Attribute requests (the file's size) hang too.
        pub hang_attr: Arc<AtomicBool>,
        /// Milliseconds before each write or sync, one at a time (0: none).
        pub trickle_ms: Arc<AtomicU64>,
        pub one_at_a_time: Mutex<()>,
    }

    impl HangFile {
        fn wait(&self) {
            while self.hang.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        /// [`HangFile::wait`], then the trickle, if any.
        fn paced(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
            self.wait();
            let every = self.trickle_ms.load(Ordering::SeqCst);
            (every > 0).then(|| {
                let one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
                std::thread::sleep(Duration::from_millis(every));
                one
            })
        }
    }

    impl Filesystem for HangFile {
        fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
            if ino != INodeNo::ROOT {
                reply.error(Errno::ENOENT);
                return;
            }
            if self.hang_attr.load(Ordering::SeqCst) {
                self.wait();
            }
            let size = self.backing.metadata().map(|m| m.len()).unwrap_or(0);
            let t = SystemTime::UNIX_EPOCH;
            reply.attr(
                &Duration::ZERO,
                &FileAttr {
                    ino: INodeNo::ROOT,
                    size,
                    blocks: size.div_ceil(512),
                    atime: t,
                    mtime: t,
                    ctime: t,
                    crtime: t,
                    kind: FileType::RegularFile,
                    perm: 0o600,
                    nlink: 1,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 4096,
                    flags: 0,
                },
            );
        }

        fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }

        fn read(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            offset: u64,
            size: u32,
            _flags: OpenFlags,
            _lock_owner: Option<LockOwner>,
            reply: ReplyData,
        ) {
            let mut buf = vec![0u8; size as usize];
            match self.backing.read_at(&mut buf, offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(_) => reply.error(Errno::EIO),
            }
        }

        fn write(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            offset: u64,
            data: &[u8],
            _write_flags: WriteFlags,
            _flags: OpenFlags,
            _lock_owner: Option<LockOwner>,
            reply: ReplyWrite,
        ) {
            let _one = self.paced();
            match self.backing.write_all_at(data, offset) {
                Ok(()) => reply.written(u32::try_from(data.len()).unwrap()),
                Err(_) => reply.error(Errno::EIO),
            }
        }

        fn flush(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            _lock_owner: LockOwner,
            reply: ReplyEmpty,
        ) {
            reply.ok();
        }

        fn fsync(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            _datasync: bool,
            reply: ReplyEmpty,
        ) {
            let _one = self.paced();
            match self.backing.sync_data() {
                Ok(()) => reply.ok(),
                Err(_) => reply.error(Errno::EIO),
            }
        }
    }

    /// Mounts it over the regular file `at`.
    /// The vault's volume file moved behind a FUSE file whose writes
    /// hang while `hang` is set. Dropped: unhung first (so the session
    /// can end), then unmounted. Declare it before the vault, so that it
    /// outlives the daemon.
    pub struct Hanging {
        pub hang: Arc<AtomicBool>,
        pub hang_attr: Arc<AtomicBool>,
        pub trickle_ms: Arc<AtomicU64>,
        _session: fuser::BackgroundSession,
    }

    impl Drop for Hanging {
        fn drop(&mut self) {
            self.trickle_ms.store(0, Ordering::SeqCst);
            self.hang.store(false, Ordering::SeqCst);
        }
    }

    /// Unhangs the storage (and ends its trickle) when dropped. Declared
    /// after the vault, it is dropped before it: a test that fails while
    /// the storage hangs stops its daemon instead of waiting on it for
    /// ever.
    pub struct Unhang(Arc<AtomicBool>, Arc<AtomicU64>);

    impl Unhang {
        pub fn of(storage: &Hanging) -> Self {
            Self(storage.hang.clone(), storage.trickle_ms.clone())
        }
    }

    impl Drop for Unhang {
        fn drop(&mut self) {
            self.1.store(0, Ordering::SeqCst);
            self.0.store(false, Ordering::SeqCst);
        }
    }

    pub fn behind(v: &crate::harness::Vault) -> Hanging {
        let img = v.dir.join("volume.img");
        let backing = v.tmp.path().join("backing.img");
        std::fs::rename(&img, &backing).unwrap();
        std::fs::write(&img, b"").unwrap();
        let hang = Arc::new(AtomicBool::new(false));
        let hang_attr = Arc::new(AtomicBool::new(false));
        let trickle_ms = Arc::new(AtomicU64::new(0));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&backing)
            .unwrap();
        Hanging {
            _session: mount(
                &img,
                HangFile {
                    backing: file,
                    hang: hang.clone(),
                    hang_attr: hang_attr.clone(),
                    trickle_ms: trickle_ms.clone(),
                    one_at_a_time: Mutex::new(()),
                },
            ),
            hang,
            hang_attr,
            trickle_ms,
        }
    }

    pub fn mount(at: &std::path::Path, file: HangFile) -> fuser::BackgroundSession {
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("hangfs".into())];
        config.n_threads = Some(4);
        fuser::Session::new(file, at, &config)
            .unwrap()
            .spawn()
            .unwrap()
    }
}

/// Sets `[table] key` in the vault's configuration.
fn set_config(v: &Vault, table: &str, key: &str, value: i64) {
    let cfg = v.dir.join("config.toml");
    let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
    t.entry(table)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert(key.into(), toml::Value::Integer(value));
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
}

/// Sets `[data] close_deadline_s`.
fn set_close_deadline(v: &Vault, seconds: i64) {
    set_config(v, "data", "close_deadline_s", seconds);
}

/// No copy of `key`, nor of either half, in process `pid`'s memory.
fn assert_key_gone(pid: u32, key: &[u8], when: &str) {
    for (what, needle) in [
        ("key", key),
        ("first half", &key[..32]),
        ("second half", &key[32..]),
    ] {
        assert!(
            !memory_contains(pid, needle),
            "the volume key's {what} is in the daemon's memory {when}"
        );
    }
}

/// A 1 MiB file of 0x3c bytes in `data`, synced: what a stop that gives
/// up must not lose.
fn kept_synced(data: &std::path::Path) -> std::path::PathBuf {
    let kept = data.join("kept.bin");
    let mut f = std::fs::File::create(&kept).unwrap();
    std::io::Write::write_all(&mut f, &[0x3c; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    kept
}

/// After a stop left things behind (`enter`: the member's client): the
/// daemon stopped for good, started again, cleans up, opens, and `kept`
/// ([`kept_synced`] before the storage `went` wrong) is intact.
fn kept_after_the_next_start(
    v: &mut Vault,
    enter: &mut std::process::Child,
    kept: &std::path::Path,
    went: &str,
) {
    v.stop();
    wait_exit(enter, Duration::from_secs(30));
    v.start();
    v.wait_no_leftovers(Duration::from_secs(30), "the next start did not clean up");
    let mut again = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    assert_eq!(
        std::fs::read(kept).unwrap(),
        vec![0x3c; 1 << 20],
        "data synced before the storage {went} was lost"
    );
    ok(&v.cli("alice", &["leave"]));
    wait_exit(&mut again, Duration::from_secs(30));
    v.stop();
}

/// Nothing of the data is mounted at `mountpoint` (`when`: for the
/// message).
fn assert_data_detached(mountpoint: &std::path::Path, when: &str) {
    let at = coffre_data::system::mount_at(mountpoint);
    assert!(
        at.as_ref()
            .is_none_or(|m| !m.source.starts_with("/dev/loop")),
        "the data stays mounted {when}: {at:?}"
    );
}

/// Waits until the audit log has an `action`/`result` record; `never`
/// says what it means if none comes `within`.
fn wait_audit(v: &Vault, action: &str, result: &str, within: Duration, never: &str) {
    let until = std::time::Instant::now() + within;
    while v.audit_details(action, result).is_empty() {
        assert!(std::time::Instant::now() < until, "{never}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A vault whose volume file is behind [`hangfs`], configured by
/// `configure`, started. Its fields drop in this order: the storage is
/// unhung (a test that fails while it hangs stops its daemon instead of
/// waiting on it for ever), the daemon stopped, then the FUSE file
/// unmounted.
struct HungLab {
    _unhang: hangfs::Unhang,
    v: Vault,
    storage: hangfs::Hanging,
    /// The volume key, to scan the daemon's memory for.
    key: Vec<u8>,
    pid: u32,
}

fn hung_lab(configure: impl FnOnce(&mut Vault)) -> HungLab {
    hung_lab_with(&[], configure)
}

/// [`hung_lab`], the vault made with `init` (`coffre init`'s options).
fn hung_lab_with(init: &[&str], configure: impl FnOnce(&mut Vault)) -> HungLab {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
    ]);
    let mut v = Vault::init(init);
    let key = volume_key(&v);
    configure(&mut v);
    let storage = hangfs::behind(&v);
    let unhang = hangfs::Unhang::of(&storage);
    v.start();
    let pid = v.pid();
    HungLab {
        _unhang: unhang,
        v,
        storage,
        key,
        pid,
    }
}

/// Waits until the vault is opening, and still is a moment later (the
/// open waits on the storage, or the test proves nothing).
fn wait_opening(v: &Vault) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while v.state() != "opening" {
        assert!(std::time::Instant::now() < until, "never opening");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        v.state(),
        "opening",
        "the open did not wait on the storage: the test proves nothing"
    );
}

/// Finding 8 of issue 12: a lock finishes in bounded time even when the
/// storage stops answering writes. Past `[data] close_deadline_s` the
/// engine's cipher is revoked and the key wiped: `key_held` is false and
/// no copy of the key (nor of either half) is in the daemon's memory,
/// while the close still hangs; the audit log says what was left behind.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_lock_wipes_the_key_when_the_storage_stops_answering() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|v| {
        set_close_deadline(v, 3);
    });
    let (key, pid, hang) = (lab.key.clone(), lab.pid, lab.storage.hang.clone());
    let v = &mut lab.v;
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    assert!(
        memory_contains(pid, &key),
        "the scan cannot see the held key"
    );
    // The storage stops answering; the team's data has unwritten changes.
    hang.store(true, Ordering::SeqCst);
    let mountpoint = v.layout().mountpoint;
    let data = mountpoint.join("shared");
    std::fs::write(data.join("unsaved.bin"), vec![0x5a; 4 << 20]).unwrap();
    ok(&v.authed("alice", &["lock", "--reason", "storage gone"]));
    v.wait_key_gone(Duration::from_secs(30));
    assert_eq!(v.state(), "locked");
    assert_key_gone(pid, &key, "after the deadline");
    // While the storage still hangs, the filesystem's page cache (the
    // plaintext of what was written) is no longer reachable by path.
    assert_data_detached(&mountpoint, "after the deadline");
    assert!(
        std::fs::read(data.join("unsaved.bin")).is_err(),
        "the plaintext written before the lock is still readable at its path"
    );
    assert!(
        v.audit()
            .iter()
            .any(|e| e["record"]["action"] == "close" && e["record"]["result"] == "deadline"),
        "the audit log says the close was abandoned"
    );
    // The storage answers again: what hung finishes and goes away.
    hang.store(false, Ordering::SeqCst);
    wait_exit(&mut enter, Duration::from_secs(30));
    v.wait_no_leftovers(
        Duration::from_secs(60),
        "the abandoned close never finished",
    );
    v.stop();
}

/// A lock that lands while the vault opens (here the data's mount waits
/// on storage that stopped answering): once the mount is up, no workload
/// starts and no NFS server opens; the vault closes at once and the key
/// goes.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_lock_during_the_open_starts_no_workload() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|v| {
        v.set_workloads(
            "auto",
            r#"
[[workload]]
name = "marker"
kind = "process"
user = "root"
command = ["/bin/sleep", "1000"]
"#,
        );
    });
    let (key, pid, hang) = (lab.key.clone(), lab.pid, lab.storage.hang.clone());
    let v = &mut lab.v;
    // The storage stops answering writes; alice enters: the open mounts
    // the data, whose superblock write waits.
    hang.store(true, Ordering::SeqCst);
    let mut enter = v.enter_start("alice", &[]);
    wait_opening(v);
    ok(&v.authed("alice", &["lock", "--reason", "during the open"]));
    hang.store(false, Ordering::SeqCst);
    v.wait_state("locked", Duration::from_secs(60));
    v.wait_key_gone(Duration::from_secs(30));
    wait_exit(&mut enter, Duration::from_secs(30));
    let audit = v.audit();
    let records: Vec<&serde_json::Value> = audit.iter().map(|e| &e["record"]).collect();
    assert!(
        !records
            .iter()
            .any(|r| r["action"] == "workload" && r["result"] == "started"),
        "a workload started after the lock: {records:#?}"
    );
    assert!(
        records.iter().any(|r| r["action"] == "open"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("locked while it opened"))),
        "{records:#?}"
    );
    assert!(!memory_contains(pid, &key), "key kept after the lock");
    assert!(v.leftovers().is_empty(), "{:?}", v.leftovers());
    v.stop();
}

/// A lock that lands while the open hangs on storage that stopped
/// answering, and the storage does not come back: past `[data]
/// close_deadline_s` the open's key is wiped and its engine's cipher
/// revoked, and the vault is locked, while the mount still hangs. Before,
/// the close waited for the open to finish, and the key stayed for as long
/// as the storage hung. Once the storage answers, what the open mounted
/// is taken down, and nothing starts.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_lock_during_a_hung_open_wipes_the_key_at_its_deadline() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|v| {
        set_close_deadline(v, 3);
    });
    let (key, pid, hang) = (lab.key.clone(), lab.pid, lab.storage.hang.clone());
    let v = &mut lab.v;
    // The storage stops answering writes and questions about the file's
    // size: the open waits when it sizes the volume (its key no longer
    // needed by then), or later when it mounts.
    lab.storage.hang_attr.store(true, Ordering::SeqCst);
    hang.store(true, Ordering::SeqCst);
    let mut enter = v.enter_start("alice", &[]);
    wait_opening(v);
    assert_eq!(
        v.status("alice")["key_held"],
        true,
        "an open under way holds the key"
    );
    ok(&v.authed("alice", &["lock", "--reason", "during a hung open"]));
    v.wait_state("locked", Duration::from_secs(30));
    assert_eq!(v.status("alice")["key_held"], false);
    assert_eq!(
        v.state(),
        "locked",
        "the storage still hangs: the open never finished"
    );
    assert_key_gone(pid, &key, "while the open still hangs");
    let audit = v.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["record"]["action"] == "open" && e["record"]["result"] == "deadline"),
        "the audit log says the open was given up"
    );
    // The storage answers again: the open ends, what it mounted goes,
    // and nothing started.
    hang.store(false, Ordering::SeqCst);
    wait_exit(&mut enter, Duration::from_secs(30));
    v.wait_no_leftovers(Duration::from_secs(60), "what the open mounted stayed");
    assert_eq!(v.state(), "locked");
    assert_eq!(v.status("alice")["key_held"], false);
    v.stop();
}

/// The last member leaves while the storage hangs: the close never
/// reports a failure, and is forced all the same after `[policy]
/// close_force_after_ms`, then given up at `[data] close_deadline_s`: the
/// key goes with nobody inside. Before, only a close that reported a
/// failure was forced, and a hung one kept the key until someone locked.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_close_that_hangs_is_forced_and_the_key_goes() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|v| {
        set_close_deadline(v, 3);
        set_config(v, "policy", "close_force_after_ms", 2000);
    });
    let (key, pid, hang) = (lab.key.clone(), lab.pid, lab.storage.hang.clone());
    let v = &mut lab.v;
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    // The storage stops answering; the team's data has unwritten changes.
    hang.store(true, Ordering::SeqCst);
    let data = v.layout().mountpoint.join("shared");
    std::fs::write(data.join("unsaved.bin"), vec![0x5a; 4 << 20]).unwrap();
    ok(&v.cli("alice", &["leave"]));
    v.wait_state("closed", Duration::from_secs(60));
    assert_eq!(v.status("alice")["key_held"], false);
    assert_key_gone(pid, &key, "once the hung close was forced");
    let audit = v.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["record"]["action"] == "state" && e["record"]["result"] == "close_forced"),
        "the audit log says the close was forced"
    );
    hang.store(false, Ordering::SeqCst);
    wait_exit(&mut enter, Duration::from_secs(30));
    v.wait_no_leftovers(
        Duration::from_secs(60),
        "the abandoned close never finished",
    );
    v.stop();
}

/// An open that hangs on storage that stopped answering while the member
/// who entered goes away (their `coffre enter` killed): nobody is inside,
/// so past `[policy] close_force_after_ms` plus `[data] close_deadline_s`
/// the open is given up and its key wiped, without a lock. Before, the
/// member's session could not expire while the vault opened, and the key
/// stayed for as long as the storage hung.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_hung_open_whose_member_went_away_lets_the_key_go() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|v| {
        set_close_deadline(v, 3);
        set_config(v, "policy", "close_force_after_ms", 2000);
    });
    let (key, pid, hang) = (lab.key.clone(), lab.pid, lab.storage.hang.clone());
    let v = &mut lab.v;
    lab.storage.hang_attr.store(true, Ordering::SeqCst);
    hang.store(true, Ordering::SeqCst);
    let mut enter = v.enter_start("alice", &[]);
    wait_opening(v);
    assert_eq!(v.status("alice")["key_held"], true);
    let _ = enter.kill();
    let _ = enter.wait();
    v.wait_state("closed", Duration::from_secs(60));
    assert_eq!(v.status("alice")["key_held"], false);
    assert_key_gone(pid, &key, "while the open still hangs");
    assert!(
        v.audit().iter().any(|e| e["record"]["action"] == "open"
            && e["record"]["result"] == "deadline"
            && e["record"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("nobody inside"))),
        "the audit log says the open was given up with nobody inside"
    );
    hang.store(false, Ordering::SeqCst);
    v.wait_no_leftovers(Duration::from_secs(60), "what the open mounted stayed");
    v.stop();
}

/// A stop while the vault is open and the storage hangs: the stop's own
/// close has the close's deadline. Past it the key is wiped and the data
/// cut off from its paths, and the daemon's stop goes on instead of
/// waiting on the storage for ever (before, it never ended). What was
/// synced before the storage hung is there at the next start, which
/// cleans what the stop left.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_stop_while_the_storage_hangs_wipes_the_key_and_ends() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|v| {
        set_close_deadline(v, 3);
    });
    let (pid, hang) = (lab.pid, lab.storage.hang.clone());
    let v = &mut lab.v;
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    let mountpoint = v.layout().mountpoint;
    let data = mountpoint.join("shared");
    let kept = kept_synced(&data);
    hang.store(true, Ordering::SeqCst);
    std::fs::write(data.join("unsaved.bin"), vec![0x5a; 4 << 20]).unwrap();
    unsafe_kill(pid, "TERM");
    wait_audit(
        v,
        "stop",
        "closed",
        Duration::from_secs(60),
        "the stop never ended while the storage hung",
    );
    let stopped = v.audit_details("stop", "closed");
    assert!(
        stopped.iter().any(|d| d.contains("left behind")),
        "{stopped:?}"
    );
    assert!(
        v.audit_details("close", "deadline")
            .iter()
            .any(|d| d.contains("at the stop")),
        "the audit log says the stop's close was given up"
    );
    // The daemon ends at once after that (its memory goes with it, so a
    // scan here would prove nothing): the audit log says the key was
    // wiped at the deadline, before the data was cut off.
    assert!(
        v.audit_details("close", "deadline")
            .iter()
            .any(|d| d.contains("at the stop") && d.contains("the key wiped")),
        "the stop's deadline did not wipe the key"
    );
    assert_data_detached(&mountpoint, "after the stop");
    // The storage answers again: the daemon's last threads end with it.
    hang.store(false, Ordering::SeqCst);
    kept_after_the_next_start(v, &mut enter, &kept, "hung");
}

/// A provider that completes a write now and then (here one a second,
/// well under the close deadline) keeps each of the stop's waits going;
/// the stop's own deadline (`[data] stop_deadline_s`) still ends it: the
/// key is wiped and the data cut off, as on storage that stopped
/// answering. Before, the stop lasted as long as the provider pleased,
/// until the service manager killed the daemon and left the mount, with
/// its cache, behind.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_stop_on_a_trickling_storage_ends_at_its_deadline() {
    use std::sync::atomic::Ordering;
    // The close deadline above the stop's: only the stop's can end it.
    let mut lab = hung_lab_with(&["--size", "64M"], |v| {
        set_close_deadline(v, 30);
        set_config(v, "data", "stop_deadline_s", 10);
    });
    let (pid, trickle) = (lab.pid, lab.storage.trickle_ms.clone());
    let v = &mut lab.v;
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    let mountpoint = v.layout().mountpoint;
    let data = mountpoint.join("shared");
    let kept = kept_synced(&data);
    trickle.store(1000, Ordering::SeqCst);
    // At one write a second, far more than the stop's deadline allows.
    std::fs::write(data.join("unsaved.bin"), vec![0x5a; 40 << 20]).unwrap();
    unsafe_kill(pid, "TERM");
    wait_audit(
        v,
        "stop",
        "closed",
        Duration::from_secs(30),
        "the stop did not end at its deadline while the storage trickled",
    );
    let given_up = v.audit_details("close", "deadline");
    assert!(
        given_up.iter().any(|d| d.contains("at the stop")
            && d.contains("stop_deadline_s")
            && d.contains("the key wiped")),
        "the stop's deadline did not wipe the key: {given_up:?}"
    );
    assert_data_detached(&mountpoint, "after the stop");
    trickle.store(0, Ordering::SeqCst);
    kept_after_the_next_start(v, &mut enter, &kept, "trickled");
}

/// A member whose `enter` went away while the vault opened (here the
/// open waits on the storage a moment) never learns their session: once
/// the open ends, that session is left at once, as the client would have,
/// and the vault closes again. Before, it stayed open until the session's
/// missing heartbeats were noticed (`heartbeat_grace_ms`, 30 s).
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_member_gone_before_the_open_ended_is_left_at_once() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|_| {});
    let hang = lab.storage.hang.clone();
    let v = &mut lab.v;
    hang.store(true, Ordering::SeqCst);
    let mut enter = v.enter_start("alice", &[]);
    wait_opening(v);
    enter.kill().unwrap();
    enter.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    hang.store(false, Ordering::SeqCst);
    let opened = std::time::Instant::now();
    v.wait_state("closed", Duration::from_secs(20));
    assert!(
        v.audit_details("state", "open").len() == 1,
        "the open did not complete: the test proves nothing"
    );
    let left = v.audit_details("leave", "note");
    assert!(
        left.iter()
            .any(|d| d.contains("alice") && d.contains("client gone")),
        "{left:?}"
    );
    eprintln!("closed {:?} after the storage answered", opened.elapsed());
    v.stop();
}

/// As above for a member who came in over the VPN: OpenVPN says the
/// client disconnected while the open hangs, the gateway stops waiting
/// for the core's answer, and the open, with nobody inside, is given up.
/// Before, the gateway's wait counted as someone inside until a lock.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup, OpenVPN, network namespaces"]
fn a_vpn_member_gone_during_a_hung_open_lets_the_key_go() {
    use std::sync::atomic::Ordering;
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let v = Vault::init(&["--totp-period", "3"]);
    let key = volume_key(&v);
    set_close_deadline(&v, 3);
    set_config(&v, "policy", "close_force_after_ms", 2000);
    let storage = hangfs::behind(&v);
    let mut gw = crate::gateway::Gw::with_vault(v, &[], 1, &[]);
    let _unhang = hangfs::Unhang::of(&storage);
    let pid = gw.vault.pid();
    storage.hang_attr.store(true, Ordering::SeqCst);
    storage.hang.store(true, Ordering::SeqCst);
    let auth = gw.auth_file("alice", None, false);
    let mut alice = gw.client("alice", 0, &auth, &[]);
    wait_opening(&gw.vault);
    assert_eq!(gw.vault.status("alice")["key_held"], true);
    alice.stop();
    gw.vault.wait_state("closed", Duration::from_secs(90));
    assert_eq!(gw.vault.status("alice")["key_held"], false);
    assert_key_gone(pid, &key, "while the open still hangs");
    let given_up = gw.vault.audit_details("open", "deadline");
    assert!(
        given_up.iter().any(|d| d.contains("nobody inside")),
        "{given_up:?}\n{}",
        gw.story()
    );
    storage.hang.store(false, Ordering::SeqCst);
    storage.hang_attr.store(false, Ordering::SeqCst);
    gw.vault
        .wait_no_leftovers(Duration::from_secs(60), "what the open mounted stayed");
}

/// A member who enters while the vault closes (here the close waits on
/// the storage) and whose `enter` goes away before the close ends is left
/// then: once the close ends, the vault does not open again for nobody.
/// Before, it reopened (data mounted, workloads resumed, the key back)
/// and closed again.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_member_gone_during_a_slow_close_gets_no_reopen() {
    use std::sync::atomic::Ordering;
    let mut lab = hung_lab(|_| {});
    let hang = lab.storage.hang.clone();
    let v = &mut lab.v;
    let mut first = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    hang.store(true, Ordering::SeqCst);
    let data = v.layout().mountpoint.join("shared");
    std::fs::write(data.join("unsaved.bin"), vec![0x5a; 4 << 20]).unwrap();
    ok(&v.cli("alice", &["leave"]));
    wait_exit(&mut first, Duration::from_secs(30));
    v.wait_state("closing", Duration::from_secs(10));
    let mut again = v.enter_start("alice", &[]);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while v.status("alice")["sessions"]
        .as_array()
        .is_none_or(|s| s.is_empty())
    {
        assert!(
            std::time::Instant::now() < until,
            "the second enter never got in"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        v.state(),
        "closing",
        "the close did not wait on the storage"
    );
    again.kill().unwrap();
    again.wait().unwrap();
    wait_audit(
        v,
        "leave",
        "note",
        Duration::from_secs(10),
        "the gone member was not left during the close",
    );
    hang.store(false, Ordering::SeqCst);
    v.wait_state("closed", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(v.state(), "closed");
    assert_eq!(
        v.audit_details("state", "open").len(),
        1,
        "the vault opened again for nobody"
    );
    v.stop();
}

/// With storage that answers, a stop waits for the workloads' own stop
/// timeouts, however much longer than the close deadline (which is for
/// storage that stopped answering), and stops cleanly: no key wiped early,
/// no data cut off.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cryptsetup"]
fn a_stop_waits_for_a_slow_workload_when_the_storage_answers() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
    ]);
    let mut v = Vault::init(&[]);
    set_close_deadline(&v, 2);
    v.set_workloads(
        "auto",
        r#"
[[workload]]
name = "stubborn"
kind = "process"
user = "root"
stop_timeout_s = 5
command = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]
"#,
    );
    v.start();
    let mut alice = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    let started = std::time::Instant::now();
    v.stop();
    let took = started.elapsed();
    let stopped = v.audit_details("stop", "closed");
    assert!(
        stopped.iter().any(|d| d.contains("stopped cleanly")),
        "{stopped:?} (after {took:?})"
    );
    assert!(
        v.audit_details("close", "deadline").is_empty(),
        "the stop gave up on healthy storage: {:?}",
        v.audit_details("close", "deadline")
    );
    let _ = alice.kill();
    let _ = alice.wait();
}

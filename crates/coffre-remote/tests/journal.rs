//! The device's write journal on local disk: writes a dead daemon took
//! (not yet flushed) are replayed at the next open, verified, and made
//! durable; a torn or altered record is not replayed, nor anything after
//! it; an old journal (its writes already durable) never rolls newer data
//! back; the journal stays bounded by flushing.

use coffre_remote::objects::{BoxFuture, Put, StoreError, Tag};
use coffre_remote::{ChunkStore, ObjectStoreObjects, Objects, RemoteDevice, Root};
use coffre_storage::BlockDevice;
use object_store::memory::InMemory;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

mod common;
use common::*;

/// A record's head: magic, cycle, epoch, sequence, offset, length, MAC.
const HEAD: usize = 72;

fn objects(mem: &Arc<InMemory>) -> Arc<dyn Objects> {
    Arc::new(ObjectStoreObjects::new(mem.clone()))
}

/// A device on the store at `root` (or a new one), keeping each root it
/// makes durable in `roots`.
fn device(
    mem: &Arc<InMemory>,
    keys: &Keyring,
    root: Option<Root>,
    roots: &Arc<Mutex<Vec<Root>>>,
) -> RemoteDevice {
    device_on(objects(mem), keys, root, roots)
}

/// [`device`] on any objects.
fn device_on(
    objects: Arc<dyn Objects>,
    keys: &Keyring,
    root: Option<Root>,
    roots: &Arc<Mutex<Vec<Root>>>,
) -> RemoteDevice {
    let rt = rt();
    let store = match root {
        None => {
            rt.block_on(ChunkStore::create(
                objects,
                PREFIX,
                VAULT,
                keys.key(),
                geometry(),
            ))
            .unwrap()
            .0
        }
        Some(r) => rt.block_on(opened(objects, keys, r)).unwrap(),
    };
    let r2 = roots.clone();
    RemoteDevice::new(
        store,
        1 << 20,
        Box::new(move |r| {
            r2.lock().unwrap().push(r);
            Ok(())
        }),
    )
    .unwrap()
}

/// What most tests start from: a store in memory, its keys, a journal's
/// path in a directory of its own, and the roots the devices make
/// durable.
struct Fixture {
    mem: Arc<InMemory>,
    keys: Keyring,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    roots: Arc<Mutex<Vec<Root>>>,
}

impl Fixture {
    fn new() -> Self {
        let _dir = tempfile::tempdir().unwrap();
        Fixture {
            mem: Arc::new(InMemory::new()),
            keys: Keyring::new(),
            path: _dir.path().join("journal"),
            _dir,
            roots: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

#[test]
fn writes_a_dead_daemon_took_are_replayed_and_made_durable_at_the_next_open() {
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache").join("journal");
    let roots = Arc::new(Mutex::new(Vec::new()));
    let dev = device(&mem, &keys, None, &roots);
    let root0 = dev.root();
    assert!(dev.attach_journal(&path).unwrap().replayed == 0);
    dev.write_at(4096, &[7u8; 8192]).unwrap();
    dev.write_at(3 * 65536 + 100, &[9u8; 50]).unwrap();
    // The daemon dies: no flush.
    drop(dev);
    assert!(std::fs::metadata(&path).unwrap().len() > 8192);
    let dev = device(&mem, &keys, Some(root0), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 2);
    assert_eq!(found.ignored_bytes, 0);
    // Durable on the store now, and the journal empty (its end mark
    // only), and emptied as the device closes.
    let root1 = dev.root();
    assert!(root1.epoch > root0.epoch);
    assert_eq!(coffre_remote::journal::held(&path).unwrap(), 0);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), HEAD as u64);
    drop(dev);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    let dev = device(&mem, &keys, Some(root1), &roots);
    let mut b = vec![0u8; 8192];
    dev.read_at(4096, &mut b).unwrap();
    assert_eq!(b, vec![7u8; 8192]);
    let mut b = vec![0u8; 50];
    dev.read_at(3 * 65536 + 100, &mut b).unwrap();
    assert_eq!(b, vec![9u8; 50]);
}

#[test]
fn a_torn_or_altered_record_is_not_replayed_nor_anything_after_it() {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let dev = device(&mem, &keys, None, &roots);
    let root0 = dev.root();
    dev.attach_journal(&path).unwrap();
    dev.write_at(0, &[1u8; 4096]).unwrap();
    dev.write_at(65536, &[2u8; 4096]).unwrap();
    dev.write_at(2 * 65536, &[3u8; 4096]).unwrap();
    drop(dev);
    let mut bytes = std::fs::read(&path).unwrap();
    let record = HEAD + 4096;
    // Three records and the end mark.
    assert_eq!(bytes.len(), 3 * record + HEAD);
    // The second record's data altered (as if put there while closed).
    bytes[record + HEAD + 10] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let dev = device(&mem, &keys, Some(root0), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 1);
    assert_eq!(found.ignored_bytes, (2 * record + HEAD) as u64);
    assert_eq!(found.stale_bytes, 0);
    let mut b = vec![0u8; 4096];
    dev.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![1u8; 4096]);
    for at in [65536, 2 * 65536] {
        dev.read_at(at, &mut b).unwrap();
        assert_eq!(b, vec![0u8; 4096], "offset {at}");
    }
    drop(dev);
    // Torn: cut in the middle of the only record.
    let dev = device(
        &mem,
        &keys,
        Some(roots.lock().unwrap().last().copied().unwrap()),
        &roots,
    );
    let root = dev.root();
    dev.attach_journal(&path).unwrap();
    dev.write_at(0, &[5u8; 4096]).unwrap();
    drop(dev);
    let bytes = std::fs::read(&path).unwrap();
    // Its last byte (the end mark after it gone too).
    let torn = bytes.len() - HEAD - 1;
    std::fs::write(&path, &bytes[..torn]).unwrap();
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 0);
    assert_eq!(found.ignored_bytes, torn as u64);
    dev.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![1u8; 4096]);
}

#[test]
fn an_old_journal_never_rolls_newer_data_back_and_the_journal_stays_bounded() {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let dev = device(&mem, &keys, None, &roots);
    dev.attach_journal(&path).unwrap();
    dev.write_at(0, &[1u8; 4096]).unwrap();
    let old = std::fs::read(&path).unwrap();
    dev.flush().unwrap();
    dev.write_at(0, &[2u8; 4096]).unwrap();
    dev.flush().unwrap();
    let root = dev.root();
    drop(dev);
    // The first journal put back (a crash between a manifest and the
    // emptying of the journal, or a copy): its writes are durable already.
    std::fs::write(&path, &old).unwrap();
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 0);
    assert_eq!(found.older, 1);
    let mut b = vec![0u8; 4096];
    dev.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![2u8; 4096]);
    // Bounded: past the cache's size (1 MiB here), a write flushes.
    let before = roots.lock().unwrap().len();
    for i in 0..24u64 {
        dev.write_at((i % 8) * 65536, &[3u8; 65536]).unwrap();
    }
    assert!(
        roots.lock().unwrap().len() > before,
        "no flush bounded the journal"
    );
    // Written over in place from each flush on: never longer than one
    // cycle's records (the last of them past the bound) and an end mark.
    assert!(std::fs::metadata(&path).unwrap().len() <= (1 << 20) + 2 * HEAD as u64);
}

/// The write that fills the journal to its bound flushes what came before
/// and is journaled itself: a crash right after it loses nothing.
#[test]
fn the_write_that_fills_the_journal_is_journaled_after_the_flush() {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let dev = device(&mem, &keys, None, &roots);
    dev.attach_journal(&path).unwrap();
    let mut last = None;
    for i in 0..64u64 {
        let before = roots.lock().unwrap().len();
        let fill = u8::try_from(i + 1).unwrap();
        dev.write_at((i % 8) * 65536, &[fill; 65536]).unwrap();
        if roots.lock().unwrap().len() > before {
            last = Some((i, fill));
            break;
        }
    }
    let (i, fill) = last.expect("no write reached the journal's bound");
    let root = *roots.lock().unwrap().last().unwrap();
    // The daemon dies right after that write.
    drop(dev);
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 1);
    let mut b = vec![0u8; 65536];
    dev.read_at((i % 8) * 65536, &mut b).unwrap();
    assert_eq!(b, vec![fill; 65536]);
}

/// A store made before keyed-BLAKE3 MACs journals `CFJ3` records
/// (HMAC-SHA256), a new one `CFJ4` (keyed BLAKE3); each replays its own.
/// A record of the other kind is not replayed (nor what follows), even
/// with a MAC of that kind that verifies: nothing legitimate writes one.
#[test]
fn journal_records_carry_the_stores_kind_of_mac_and_each_store_replays_its_own() {
    use coffre_remote::integrity::ChunkMac;
    for (how, magic) in [(ChunkMac::HmacSha256, b"CFJ3"), (ChunkMac::Blake3, b"CFJ4")] {
        let mem = Arc::new(InMemory::new());
        let keys = Keyring::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let roots = Arc::new(Mutex::new(Vec::new()));
        let (store, root0) = rt().block_on(created_with(objects(&mem), &keys, geometry(), how));
        let dev = RemoteDevice::new(store, 1 << 20, Box::new(|_| Ok(()))).unwrap();
        dev.attach_journal(&path).unwrap();
        dev.write_at(0, &[1u8; 4096]).unwrap();
        dev.write_at(65536, &[2u8; 4096]).unwrap();
        drop(dev);
        let bytes = std::fs::read(&path).unwrap();
        let record = HEAD + 4096;
        assert_eq!(bytes.len(), 2 * record + HEAD);
        for at in [0, record, 2 * record] {
            assert_eq!(&bytes[at..at + 4], magic, "{how:?} at {at}");
        }
        // The second record claimed to be of the other kind: it and what
        // follows are not replayed.
        let s0 = rt().block_on(opened(objects(&mem), &keys, root0)).unwrap();
        let other = match how {
            ChunkMac::HmacSha256 => ChunkMac::Blake3,
            ChunkMac::Blake3 => ChunkMac::HmacSha256,
        };
        let field = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let (cycle, base, seq, offset) = (
            field(record + 4),
            field(record + 12),
            field(record + 20),
            field(record + 28),
        );
        let data = &bytes[record + HEAD..2 * record];
        assert_eq!((seq, offset, data.len()), (1, 65536, 4096));
        assert_eq!(cycle, field(4), "one cycle");
        let mut switched = bytes.clone();
        switched[record + 3] ^= b'3' ^ b'4';
        for forged in [false, true] {
            if forged {
                let mac = s0.journal_mac(other, Some(cycle), (base, seq, offset), data);
                switched[record + 40..record + 72].copy_from_slice(&mac);
            }
            let (found, _) = coffre_remote::journal::parse(&switched, &s0);
            assert_eq!(found.replayed, 1, "{how:?}, forged {forged}");
            assert_eq!(found.ignored_bytes, (record + HEAD) as u64);
        }
        // As written: both replayed, through the device.
        let dev = device(&mem, &keys, Some(root0), &roots);
        let found = dev.attach_journal(&path).unwrap();
        assert_eq!(found.replayed, 2, "{how:?}");
        assert_eq!((found.ignored_bytes, found.stale_bytes), (0, HEAD as u64));
        let mut b = vec![0u8; 4096];
        dev.read_at(65536, &mut b).unwrap();
        assert_eq!(b, vec![2u8; 4096]);
    }
}

/// A journal of the first format (`CFJ1`, `CFJ2`: records without a
/// cycle, no end mark), as a daemon before cycles left it, is replayed by
/// this one, and its next journal is of the new format.
#[test]
fn a_journal_of_the_first_format_is_still_replayed() {
    use coffre_remote::integrity::ChunkMac;
    for (how, magic) in [(ChunkMac::HmacSha256, b"CFJ1"), (ChunkMac::Blake3, b"CFJ2")] {
        let mem = Arc::new(InMemory::new());
        let keys = Keyring::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let roots = Arc::new(Mutex::new(Vec::new()));
        let (store, root0) = rt().block_on(created_with(objects(&mem), &keys, geometry(), how));
        // The first format: magic, epoch, sequence, offset, length, MAC
        // (over the first three and the bytes), the bytes.
        let mut old = Vec::new();
        for (seq, (offset, fill)) in [(0u64, 1u8), (65536, 2u8)].into_iter().enumerate() {
            let (seq, data) = (seq as u64, vec![fill; 4096]);
            let mac = store.journal_mac(how, None, (root0.epoch, seq, offset), &data);
            old.extend_from_slice(magic);
            for n in [root0.epoch, seq, offset] {
                old.extend_from_slice(&n.to_be_bytes());
            }
            old.extend_from_slice(&4096u32.to_be_bytes());
            old.extend_from_slice(&mac);
            old.extend_from_slice(&data);
        }
        drop(store);
        std::fs::write(&path, &old).unwrap();
        assert_eq!(
            coffre_remote::journal::held(&path).unwrap(),
            old.len() as u64
        );
        let dev = device(&mem, &keys, Some(root0), &roots);
        let found = dev.attach_journal(&path).unwrap();
        assert_eq!(found.replayed, 2, "{how:?}");
        assert_eq!((found.ignored_bytes, found.stale_bytes), (0, 0));
        assert_eq!(read(&dev, 0, 4096), vec![1u8; 4096]);
        assert_eq!(read(&dev, 65536, 4096), vec![2u8; 4096]);
        dev.write_at(0, &[3u8; 4096]).unwrap();
        let new = std::fs::read(&path).unwrap();
        assert_eq!(
            &new[..4],
            if how == ChunkMac::Blake3 {
                b"CFJ4"
            } else {
                b"CFJ3"
            }
        );
    }
}

/// The journal is written over in place from one flush to the next (not
/// truncated), and a record an earlier cycle left is never replayed, even
/// where the next record of this cycle would go, with the sequence number
/// it would have and a MAC that verifies: here the first cycle wrote 1 at
/// 0 then 2 at 64 KiB, the second 3 at 64 KiB, the third 4 at 0, and the
/// daemon dies with the first cycle's second record put back after the
/// third cycle's first (as the host's disk could hold them had the end
/// mark not been written). Replayed, it would roll 3 back to 2.
#[test]
fn a_record_an_earlier_cycle_left_is_never_replayed() {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let dev = device(&mem, &keys, None, &roots);
    dev.attach_journal(&path).unwrap();
    let record = HEAD + 4096;
    dev.write_at(0, &[1u8; 4096]).unwrap();
    dev.write_at(65536, &[2u8; 4096]).unwrap();
    let first = std::fs::read(&path).unwrap();
    assert_eq!(first.len(), 2 * record + HEAD);
    dev.flush().unwrap();
    // Not truncated: the next cycle's end mark at the beginning, the last
    // cycle's records after it.
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), first.len());
    assert_eq!(after[HEAD..], first[HEAD..]);
    assert_eq!(coffre_remote::journal::held(&path).unwrap(), 0);
    dev.write_at(65536, &[3u8; 4096]).unwrap();
    dev.flush().unwrap();
    dev.write_at(0, &[4u8; 4096]).unwrap();
    let third = std::fs::read(&path).unwrap();
    let root = dev.root();
    drop(dev);
    // As the daemon left it (a dead one does not empty it): the third
    // cycle's record, its end mark, the first cycle's second record.
    assert_eq!(third.len(), first.len());
    assert_eq!(&third[record..record + 4], b"CFJ4");
    assert_eq!(third[2 * record..], first[2 * record..]);
    // The first cycle's second record where the third cycle's end mark
    // was: the sequence number the next record would have, and its MAC
    // verifies (under its own cycle). Not replayed, nor taken as this
    // cycle's: the record before it is, so that the epoch would not keep
    // it out.
    let store = rt().block_on(opened(objects(&mem), &keys, root)).unwrap();
    let mut spliced = third.clone();
    spliced[record..2 * record].copy_from_slice(&first[record..2 * record]);
    let (found, records) = coffre_remote::journal::parse(&spliced, &store);
    assert_eq!(found.replayed, 1);
    assert_eq!(records[0].data, vec![4u8; 4096]);
    assert_eq!(found.ignored_bytes, (record + HEAD) as u64);
    // The same record made to name this cycle: its MAC binds the cycle
    // it was written in, so it does not verify.
    let mut renamed = spliced.clone();
    renamed[record + 4..record + 12].copy_from_slice(&third[4..12]);
    let (found, _) = coffre_remote::journal::parse(&renamed, &store);
    assert_eq!(found.replayed, 1);
    assert_eq!(found.ignored_bytes, (record + HEAD) as u64);
    drop(store);
    // As the daemon left it, replayed.
    std::fs::write(&path, &third).unwrap();
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 1);
    assert_eq!(
        (found.ignored_bytes, found.stale_bytes),
        (0, (record + HEAD) as u64)
    );
    assert_eq!(read(&dev, 0, 4096), vec![4u8; 4096]);
    assert_eq!(read(&dev, 65536, 4096), vec![3u8; 4096]);
}

/// A cycle with a record written while a manifest put went unanswered is
/// cut off at the flush that ends it (the file emptied, then its end
/// mark): those records are replayed over the next manifest, and a part
/// of them a dead host kept without the end mark before them would roll
/// the later ones back. A cycle without one is written over in place.
#[test]
fn a_cycle_with_a_record_after_an_unanswered_put_is_cut_off_at_its_end() {
    let AfterUnanswered {
        path, dev, _dir, ..
    } = unanswered_flush(FAIL);
    let before = std::fs::metadata(&path).unwrap().len();
    dev.write_at(65536, &[2u8; 4096]).unwrap();
    dev.flush().unwrap();
    assert!(before > HEAD as u64);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), HEAD as u64);
    dev.write_at(65536, &[3u8; 8192]).unwrap();
    dev.flush().unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        (2 * HEAD + 8192) as u64,
        "written over in place"
    );
    drop(dev);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

/// The next manifest put's answer lost ([`LOSE`]: it landed) or an error
/// before it reached the store ([`FAIL`]): the writer cannot tell which.
/// [`LOSE_HIDDEN`]: it landed, and the next read of the manifest still
/// gives the one before (a store answering from a stale replica), so that
/// its settling says it did not land.
struct Unanswered {
    inner: Arc<dyn Objects>,
    next: AtomicU8,
    hidden: Mutex<Option<(bytes::Bytes, Tag)>>,
}
const LOSE: u8 = 1;
const FAIL: u8 = 2;
const LOSE_HIDDEN: u8 = 3;

impl Unanswered {
    fn new(inner: Arc<dyn Objects>) -> Arc<Self> {
        Arc::new(Unanswered {
            inner,
            next: AtomicU8::new(0),
            hidden: Mutex::new(None),
        })
    }
}

impl Objects for Unanswered {
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: bytes::Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(async move {
            let what = if key.ends_with("manifest") {
                self.next.swap(0, Ordering::SeqCst)
            } else {
                0
            };
            if what == FAIL {
                return Err(StoreError::Other("injected: reset before the store".into()));
            }
            if what == LOSE_HIDDEN {
                *self.hidden.lock().unwrap() = self.inner.get(key, 16 << 20).await?;
            }
            let r = self.inner.put(key, data, mode).await;
            if what == LOSE || what == LOSE_HIDDEN {
                return Err(StoreError::Other("injected: reply lost".into()));
            }
            r
        })
    }
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(bytes::Bytes, Tag)>, StoreError>> {
        Box::pin(async move {
            if key.ends_with("manifest")
                && let Some(old) = self.hidden.lock().unwrap().take()
            {
                return Ok(Some(old));
            }
            self.inner.get(key, max).await
        })
    }
    common::forward!(delete, list, durable, prepare, opened);
}

fn read(dev: &RemoteDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(offset, &mut b).unwrap();
    b
}

/// A device with its journal, one write taken, then a flush whose
/// manifest put goes unanswered (`what`).
struct AfterUnanswered {
    mem: Arc<InMemory>,
    keys: Keyring,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    roots: Arc<Mutex<Vec<Root>>>,
    dev: RemoteDevice,
    root0: Root,
}

fn unanswered_flush(what: u8) -> AfterUnanswered {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let faulty = Unanswered::new(objects(&mem));
    let dev = device_on(faulty.clone(), &keys, None, &roots);
    let root0 = dev.root();
    dev.attach_journal(&path).unwrap();
    dev.write_at(0, &[1u8; 4096]).unwrap();
    faulty.next.store(what, Ordering::SeqCst);
    assert!(dev.flush().is_err(), "an unanswered flush ({what})");
    AfterUnanswered {
        mem,
        keys,
        _dir,
        path,
        roots,
        dev,
        root0,
    }
}

/// A flush whose manifest put's answer is lost, then a write large enough
/// to start an upload, which settles that put first (it landed, or not),
/// and the daemon dies before the next flush: the write is replayed at the
/// next open either way. Before, its record carried the epoch before the
/// settled manifest, and was dropped as already durable when it had
/// landed.
#[test]
fn a_write_taken_while_a_manifest_put_is_unsettled_is_replayed_whichever_way_it_went() {
    for (what, landed) in [(LOSE, true), (FAIL, false)] {
        let AfterUnanswered {
            mem,
            keys,
            _dir,
            path,
            roots,
            dev,
            root0,
        } = unanswered_flush(what);
        // A quarter of the 1 MiB buffer: this very write starts an upload.
        dev.write_at(65536, &[2u8; 256 << 10]).unwrap();
        drop(dev);
        let dev = device(&mem, &keys, Some(root0), &roots);
        assert_eq!(dev.root().epoch, root0.epoch + u64::from(landed));
        let found = dev.attach_journal(&path).unwrap();
        assert_eq!(
            (found.replayed, found.older),
            if landed { (1, 1) } else { (2, 0) },
            "landed {landed}"
        );
        assert_eq!(read(&dev, 0, 4096), vec![1u8; 4096], "landed {landed}");
        assert_eq!(
            read(&dev, 65536, 256 << 10),
            vec![2u8; 256 << 10],
            "landed {landed}: the write taken after the unanswered flush"
        );
    }
}

/// Once a record may not be covered by the store's manifest, it and every
/// record after it are replayed, in order, even those the manifest covers:
/// a write replayed alone would undo the later ones over the same bytes.
/// Here the unanswered put did not land, so a write after it is marked,
/// the writes after the settling are not, and the next flush lands with
/// all of them; the daemon dies before the journal is emptied.
#[test]
fn from_the_first_record_to_replay_on_every_record_is_replayed_in_order() {
    let AfterUnanswered {
        mem,
        keys,
        _dir,
        path,
        roots,
        dev,
        ..
    } = unanswered_flush(FAIL);
    // Marked, and settles the put (it did not land).
    dev.write_at(65536, &[2u8; 256 << 10]).unwrap();
    // Not marked: the same bytes again.
    dev.write_at(65536, &[3u8; 4096]).unwrap();
    let journal = std::fs::read(&path).unwrap();
    dev.flush().unwrap();
    let root = dev.root();
    drop(dev);
    // The daemon died between the manifest and the emptying.
    std::fs::write(&path, &journal).unwrap();
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!((found.replayed, found.older), (2, 1));
    assert_eq!(read(&dev, 65536, 4096), vec![3u8; 4096]);
    assert_eq!(read(&dev, 65536 + 4096, 4096), vec![2u8; 4096]);
}

/// A settle can be wrong (here the store answers its read with the
/// manifest before the put, which had landed): a write journaled after it
/// is still marked, until a flush succeeds, and so replayed over the
/// manifest that landed. Before, it was journaled unmarked, under the
/// epoch before that manifest, and dropped at replay as durable.
#[test]
fn a_write_journaled_after_a_wrong_settle_is_still_replayed() {
    use coffre_remote::journal::Journal;
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let faulty = Unanswered::new(objects(&mem));
    rt.block_on(async {
        let mut s = created(faulty.clone(), &keys).await;
        let root0 = s.root();
        let mut j = Journal::create(&path, &s).unwrap();
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        faulty.next.store(LOSE_HIDDEN, Ordering::SeqCst);
        assert!(s.flush().await.is_err());
        // Settled (wrongly) as not landed by the next upload.
        s.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        assert_eq!(s.root(), root0);
        assert!(s.unanswered_since_flush());
        j.append(&s, 3 * 65536, &[3u8; 4096]).unwrap();
        drop(j);
        // The daemon dies; at the next open the store holds the manifest
        // that landed.
        let s2 = opened(objects(&mem), &keys, root0).await.unwrap();
        assert_eq!(s2.root().epoch, root0.epoch + 1);
        let (found, records) = coffre_remote::journal::parse(&std::fs::read(&path).unwrap(), &s2);
        assert_eq!(
            (found.replayed, found.older),
            (1, 0),
            "the write after the settle"
        );
        assert_eq!(records[0].data, vec![3u8; 4096]);
    });
}

/// A journal opened at a path where an earlier one still lives (a device
/// not yet gone) has a file of its own: what the earlier one does as it
/// goes (it empties its file) never reaches the new one's records.
#[test]
fn an_earlier_journal_at_the_same_path_never_touches_the_new_one() {
    use coffre_remote::journal::Journal;
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    rt.block_on(async {
        let s = created(objects(&mem), &keys).await;
        let old = Journal::create(&path, &s).unwrap();
        let mut new = Journal::create(&path, &s).unwrap();
        new.append(&s, 65536, &[7u8; 4096]).unwrap();
        drop(old);
        let (found, records) = coffre_remote::journal::parse(&std::fs::read(&path).unwrap(), &s);
        assert_eq!(found.replayed, 1);
        assert_eq!(records[0].data, vec![7u8; 4096]);
        drop(new);
    });
}

/// The process's peak resident memory so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// A journal as large as one may be (8 GiB: its records, then what the
/// host's disk holds after them, here a hole) is replayed a record at a
/// time, and a status reads its heads a window at a time: neither holds
/// the file in memory (before, the open read all of it into one buffer,
/// and a copy of each record besides). A file larger than that is refused
/// at open, and left as it is.
#[test]
fn a_journal_of_any_size_is_replayed_a_record_at_a_time() {
    const MAX: u64 = 8 << 30;
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let dev = device(&mem, &keys, None, &roots);
    let root0 = dev.root();
    dev.attach_journal(&path).unwrap();
    for i in 0..4u8 {
        dev.write_at(u64::from(i) * 65536, &vec![i + 1; 65536])
            .unwrap();
    }
    drop(dev);
    let records = 4 * (HEAD as u64 + 65536);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // The end mark gone, and a hole up to the largest journal.
    f.set_len(records).unwrap();
    f.set_len(MAX).unwrap();
    drop(f);
    let before = peak_rss();
    assert_eq!(coffre_remote::journal::held(&path).unwrap(), records);
    let dev = device(&mem, &keys, Some(root0), &roots);
    let found = dev.attach_journal(&path).unwrap();
    let grew = peak_rss().saturating_sub(before);
    assert_eq!((found.replayed, found.replayed_bytes), (4, 4 * 65536));
    assert_eq!(found.ignored_bytes, MAX - records);
    assert!(
        grew < 256 << 20,
        "the replay of an 8 GiB journal took {} MiB more memory",
        grew >> 20
    );
    for i in 0..4u8 {
        assert_eq!(read(&dev, u64::from(i) * 65536, 65536), vec![i + 1; 65536]);
    }
    let root1 = dev.root();
    drop(dev);
    // One byte more than a journal ever holds: refused, and the file left.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(MAX + 1).unwrap();
    drop(f);
    assert!(coffre_remote::journal::held(&path).is_err());
    let dev = device(&mem, &keys, Some(root1), &roots);
    let e = dev.attach_journal(&path).unwrap_err();
    assert!(
        e.to_string().contains("more than a journal ever holds"),
        "{e}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MAX + 1);
}

/// A journal is attached once: a second attach is refused, and the
/// writes the first holds (not yet flushed) stay in its file.
#[test]
fn a_second_journal_is_refused_and_the_first_keeps_its_writes() {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let dev = device(&mem, &keys, None, &roots);
    let root0 = dev.root();
    dev.attach_journal(&path).unwrap();
    dev.write_at(65536, &[6u8; 4096]).unwrap();
    let e = dev.attach_journal(&path).unwrap_err();
    assert!(e.to_string().contains("already attached"), "{e}");
    let other = path.with_file_name("other");
    assert!(dev.attach_journal(&other).is_err());
    assert!(!other.exists());
    drop(dev);
    let dev = device(&mem, &keys, Some(root0), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, 1);
    assert_eq!(read(&dev, 65536, 4096), vec![6u8; 4096]);
}

/// With the write journal (as the daemon runs), a part of a chunk the
/// store can no longer give back (its object gone): writes to other
/// chunks go on until the journal's cycle is full, then fail (each
/// changing nothing), since the flush they want first cannot make the
/// part durable. The daemon dies; an open while the object is still gone
/// fails its replay and keeps the journal; once it is back, the next open
/// replays it, and the volume reads as every write that returned.
#[test]
fn a_part_whose_chunk_cannot_be_fetched_stays_in_the_journal_until_it_can() {
    use object_store::ObjectStore;
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let c = u64::from(CHUNK);
    let cu = CHUNK as usize;
    let chunks = u8::try_from(SIZE / c).unwrap();
    let mut model: Vec<u8> = (0..chunks).flat_map(chunk).collect();
    let dev = device(&mem, &keys, None, &roots);
    dev.write_at(0, &model).unwrap();
    dev.flush().unwrap();
    let root = dev.root();
    drop(dev);
    // Counting the fetches of chunk 2.
    let gets = Arc::new(ChunkGets {
        inner: objects(&mem),
        chunk: "c/000000000002/",
        asked: 0.into(),
    });
    let dev = device_on(gets.clone(), &keys, Some(root), &roots);
    dev.attach_journal(&path).unwrap();
    let (name, bytes) = rt().block_on(async {
        snapshot(&mem)
            .await
            .into_iter()
            .find(|(k, _)| k.contains("c/000000000002/"))
            .unwrap()
    });
    let object = object_store::path::Path::from(name.as_str());
    rt().block_on(mem.delete(&object)).unwrap();
    dev.write_at(2 * c + 10, &[0xaa; 20]).unwrap();
    model[2 * cu + 10..2 * cu + 30].fill(0xaa);
    // The buffer (and so the journal's cycle) is 1 MiB: 32 chunks of
    // 64 KiB pass it.
    let mut failed = 0;
    let start = std::time::Instant::now();
    for k in 0..32u8 {
        let i = 4 + usize::from(k % 4);
        let data = chunk(0x80 | k);
        match dev.write_at((i * cu) as u64, &data) {
            Ok(()) => model[i * cu..(i + 1) * cu].copy_from_slice(&data),
            Err(e) => {
                failed += 1;
                assert!(e.to_string().contains("chunk 2"), "{e}");
            }
        }
    }
    assert!(failed > 0 && failed < 32, "{failed} of 32 writes failed");
    // Not fetched again by each write that failed: once per pause at most.
    let pauses = (start.elapsed().as_millis() / 1000) as usize;
    let asked = gets.asked.load(Ordering::SeqCst);
    assert!(
        asked <= 1 + pauses,
        "chunk 2 fetched {asked} times by {failed} failed writes in {} ms",
        start.elapsed().as_millis()
    );
    // The daemon dies.
    drop(dev);
    let root = *roots.lock().unwrap().last().unwrap();
    assert_eq!(
        root,
        roots.lock().unwrap()[0],
        "a manifest moved past the part"
    );
    let dev = device(&mem, &keys, Some(root), &roots);
    assert!(dev.attach_journal(&path).is_err());
    drop(dev);
    assert!(coffre_remote::journal::held(&path).unwrap() > 0);
    rt().block_on(mem.put(&object, bytes.into())).unwrap();
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert!(found.replayed > 1, "{found:?}");
    let mut all = vec![0u8; model.len()];
    dev.read_at(0, &mut all).unwrap();
    assert!(all == model, "the volume is not every write that returned");
}

/// Counts the gets of the objects whose names hold `chunk`.
struct ChunkGets {
    inner: Arc<dyn Objects>,
    chunk: &'static str,
    asked: std::sync::atomic::AtomicUsize,
}

impl Objects for ChunkGets {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(bytes::Bytes, Tag)>, StoreError>> {
        if key.contains(self.chunk) {
            self.asked.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key, max)
    }
    common::forward!(put, delete, list, durable, prepare, opened);
}

/// Fails every put of a chunk while `on` (a store that takes nothing new
/// for a while).
struct ChunkPutsFail {
    inner: Arc<dyn Objects>,
    on: std::sync::atomic::AtomicBool,
}

impl Objects for ChunkPutsFail {
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: bytes::Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(async move {
            if key.contains("c/") && self.on.load(Ordering::SeqCst) {
                return Err(StoreError::Other("injected: chunk puts refused".into()));
            }
            self.inner.put(key, data, mode).await
        })
    }
    common::forward!(get, delete, list, durable, prepare, opened);
}

/// A write that fails for want of room (the buffer full of chunks that
/// cannot be uploaded: small writes to many chunks, each a chunk in the
/// buffer and a few bytes in the journal) leaves no record in the journal
/// either: after a crash, the replay gives back the writes that returned
/// and not the one that failed. (Before 2026-12-07 its record was
/// appended before room was made, and replayed.)
#[test]
fn a_write_that_fails_for_want_of_room_leaves_nothing_to_replay() {
    let Fixture {
        mem,
        keys,
        _dir,
        path,
        roots,
    } = Fixture::new();
    let puts = Arc::new(ChunkPutsFail {
        inner: objects(&mem),
        on: false.into(),
    });
    let (store, root) = rt()
        .block_on(ChunkStore::create(
            puts.clone(),
            PREFIX,
            VAULT,
            keys.key(),
            geometry(),
        ))
        .unwrap();
    let r2 = roots.clone();
    // The smallest buffer: two chunks.
    let dev = RemoteDevice::new(
        store,
        0,
        Box::new(move |r| {
            r2.lock().unwrap().push(r);
            Ok(())
        }),
    )
    .unwrap();
    dev.attach_journal(&path).unwrap();
    puts.on.store(true, Ordering::SeqCst);
    let c = u64::from(CHUNK);
    let mut taken = Vec::new();
    let mut failed = None;
    for i in 0..4u8 {
        let held = coffre_remote::journal::held(&path).unwrap();
        if dev.write_at(u64::from(i) * c + 8, &[0x70 | i; 16]).is_ok() {
            taken.push(i);
        } else {
            assert_eq!(
                coffre_remote::journal::held(&path).unwrap(),
                held,
                "a write that failed left a record"
            );
            failed = Some(i);
            break;
        }
    }
    let failed = failed.expect("no write failed for want of room");
    // The daemon dies; the store takes chunks again.
    drop(dev);
    puts.on.store(false, Ordering::SeqCst);
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.replayed, taken.len(), "{found:?}");
    for i in taken {
        assert_eq!(read(&dev, u64::from(i) * c + 8, 16), [0x70 | i; 16]);
    }
    assert_eq!(
        read(&dev, u64::from(failed) * c + 8, 16),
        [0u8; 16],
        "the failed write was replayed"
    );
}

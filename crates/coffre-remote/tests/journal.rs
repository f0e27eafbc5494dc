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
        Some(r) => {
            rt.block_on(ChunkStore::open(
                objects,
                PREFIX,
                VAULT,
                keys.key(),
                Some(r),
                false,
            ))
            .unwrap()
            .0
        }
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

#[test]
fn writes_a_dead_daemon_took_are_replayed_and_made_durable_at_the_next_open() {
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache").join("journal");
    let roots = Arc::new(Mutex::new(Vec::new()));
    let dev = device(&mem, &keys, None, &roots);
    let root0 = dev.root();
    assert!(dev.attach_journal(&path).unwrap().records.is_empty());
    dev.write_at(4096, &[7u8; 8192]).unwrap();
    dev.write_at(3 * 65536 + 100, &[9u8; 50]).unwrap();
    // The daemon dies: no flush.
    drop(dev);
    assert!(std::fs::metadata(&path).unwrap().len() > 8192);
    let dev = device(&mem, &keys, Some(root0), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.records.len(), 2);
    assert_eq!(found.ignored_bytes, 0);
    // Durable on the store now, and the journal empty.
    let root1 = dev.root();
    assert!(root1.epoch > root0.epoch);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    drop(dev);
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
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let roots = Arc::new(Mutex::new(Vec::new()));
    let dev = device(&mem, &keys, None, &roots);
    let root0 = dev.root();
    dev.attach_journal(&path).unwrap();
    dev.write_at(0, &[1u8; 4096]).unwrap();
    dev.write_at(65536, &[2u8; 4096]).unwrap();
    dev.write_at(2 * 65536, &[3u8; 4096]).unwrap();
    drop(dev);
    let mut bytes = std::fs::read(&path).unwrap();
    let record = bytes.len() / 3;
    // The second record's data altered (as if put there while closed).
    bytes[record + 64 + 10] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let dev = device(&mem, &keys, Some(root0), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert_eq!(found.records.len(), 1);
    assert_eq!(found.ignored_bytes, 2 * record as u64);
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
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let dev = device(&mem, &keys, Some(root), &roots);
    let found = dev.attach_journal(&path).unwrap();
    assert!(found.records.is_empty());
    assert_eq!(found.ignored_bytes, bytes.len() as u64 - 1);
    dev.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![1u8; 4096]);
}

#[test]
fn an_old_journal_never_rolls_newer_data_back_and_the_journal_stays_bounded() {
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let roots = Arc::new(Mutex::new(Vec::new()));
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
    assert!(found.records.is_empty());
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
    assert!(std::fs::metadata(&path).unwrap().len() <= (1 << 20) + 65536 + 64);
}

/// The write that fills the journal to its bound flushes what came before
/// and is journaled itself: a crash right after it loses nothing.
#[test]
fn the_write_that_fills_the_journal_is_journaled_after_the_flush() {
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let roots = Arc::new(Mutex::new(Vec::new()));
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
    assert_eq!(found.records.len(), 1);
    let mut b = vec![0u8; 65536];
    dev.read_at((i % 8) * 65536, &mut b).unwrap();
    assert_eq!(b, vec![fill; 65536]);
}

/// A store made before keyed-BLAKE3 MACs journals `CFJ1` records
/// (HMAC-SHA256), a new one `CFJ2` (keyed BLAKE3); each replays its own.
/// A record of the other kind is not replayed (nor what follows), even
/// with a MAC of that kind that verifies: nothing legitimate writes one.
#[test]
fn journal_records_carry_the_stores_kind_of_mac_and_each_store_replays_its_own() {
    use coffre_remote::integrity::ChunkMac;
    for (how, magic) in [(ChunkMac::HmacSha256, b"CFJ1"), (ChunkMac::Blake3, b"CFJ2")] {
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
        let record = bytes.len() / 2;
        assert_eq!(&bytes[..4], magic, "{how:?}");
        assert_eq!(&bytes[record..record + 4], magic, "{how:?}");
        // The second record claimed to be of the other kind: it and what
        // follows are not replayed.
        let (s0, _) = rt()
            .block_on(ChunkStore::open(
                objects(&mem),
                PREFIX,
                VAULT,
                keys.key(),
                Some(root0),
                false,
            ))
            .unwrap();
        let other = match how {
            ChunkMac::HmacSha256 => ChunkMac::Blake3,
            ChunkMac::Blake3 => ChunkMac::HmacSha256,
        };
        let field = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let (base, seq, offset) = (field(record + 4), field(record + 12), field(record + 20));
        let data = &bytes[record + 64..];
        assert_eq!((seq, offset, data.len()), (1, 65536, 4096));
        let mut switched = bytes.clone();
        switched[record + 3] ^= b'1' ^ b'2';
        for forged in [false, true] {
            if forged {
                let mac = s0.journal_mac(other, (base, seq, offset), data);
                switched[record + 32..record + 64].copy_from_slice(&mac);
            }
            let found = coffre_remote::journal::parse(&switched, &s0);
            assert_eq!(found.records.len(), 1, "{how:?}, forged {forged}");
            assert_eq!(found.ignored_bytes, record as u64);
        }
        // As written: both replayed, through the device.
        let dev = device(&mem, &keys, Some(root0), &roots);
        let found = dev.attach_journal(&path).unwrap();
        assert_eq!(found.records.len(), 2, "{how:?}");
        let mut b = vec![0u8; 4096];
        dev.read_at(65536, &mut b).unwrap();
        assert_eq!(b, vec![2u8; 4096]);
    }
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
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let roots = Arc::new(Mutex::new(Vec::new()));
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
        _dir: dir,
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
            (found.records.len(), found.older),
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
    assert_eq!((found.records.len(), found.older), (2, 1));
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
        let mut j = Journal::create(&path, root0.epoch).unwrap();
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
        let found = Journal::read(&path, &s2).unwrap();
        assert_eq!(
            (found.records.len(), found.older),
            (1, 0),
            "the write after the settle"
        );
        assert_eq!(found.records[0].data, vec![3u8; 4096]);
    });
}

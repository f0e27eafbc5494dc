//! Mirrors, against `object_store`'s in-memory stores (real store
//! implementations, in process) behind a switch that makes one fail or
//! hang: every write reaches every store; a store lost mid-write is marked
//! stale while the other goes on, and is brought back, verified; a chunk
//! that does not verify on one store is read from the other and repaired
//! there; the newest authentic store wins at open, a rollback of all of
//! them is still refused; a new mirror added to a volume is filled; the
//! device brings a stale mirror back on its own thread.

// Offsets and sizes here are small constants (a 512 KiB volume).
#![allow(clippy::cast_possible_truncation)]

use bytes::Bytes;
use coffre_remote::objects::{BoxFuture, Objects, Put, StoreError, Tag};
use coffre_remote::{
    Backend, ChunkStore, MirrorSettings, ObjectStoreObjects, RemoteDevice, RemoteError, Root,
    StoreEvent,
};
use coffre_storage::BlockDevice;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::*;

const UP: u8 = 0;
const DOWN: u8 = 1;
const HUNG: u8 = 2;
const SLOW: u8 = 3;
/// Reads answer; puts and deletes never do.
const WRITES_HUNG: u8 = 4;
/// Puts of the manifest land, and their answer is lost.
const MANIFEST_ANSWER_LOST: u8 = 5;

/// A store that can be made to fail every request, or never answer.
struct Switch {
    mem: Arc<InMemory>,
    inner: ObjectStoreObjects,
    mode: AtomicU8,
}

impl Switch {
    fn new() -> Arc<Self> {
        let mem = Arc::new(InMemory::new());
        Arc::new(Switch {
            inner: ObjectStoreObjects::new(mem.clone()),
            mem,
            mode: AtomicU8::new(UP),
        })
    }
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
    async fn gate(&self) -> Result<(), StoreError> {
        self.gate_for(false).await
    }
    async fn gate_for(&self, write: bool) -> Result<(), StoreError> {
        match self.mode.load(Ordering::SeqCst) {
            WRITES_HUNG if write => {
                futures::future::pending::<()>().await;
                unreachable!()
            }
            DOWN => Err(StoreError::Other("injected: connection refused".into())),
            HUNG => {
                futures::future::pending::<()>().await;
                unreachable!()
            }
            SLOW => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Objects for Switch {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(async move {
            self.gate().await?;
            self.inner.get(key, max).await
        })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(async move {
            self.gate_for(true).await?;
            let r = self.inner.put(key, data, mode).await;
            if key.ends_with("manifest") && self.mode.load(Ordering::SeqCst) == MANIFEST_ANSWER_LOST
            {
                return Err(StoreError::Other("injected: reply lost".into()));
            }
            r
        })
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.gate_for(true).await?;
            self.inner.delete(key).await
        })
    }
    common::forward!(durable, prepare, opened, list);
}

fn backends(stores: &[&Arc<Switch>]) -> Vec<Backend> {
    stores
        .iter()
        .enumerate()
        .map(|(i, s)| Backend {
            name: format!("store-{i}"),
            objects: (*s).clone(),
        })
        .collect()
}

/// A new volume on `stores`, with [`quick`] settings.
async fn mirrored(stores: &[&Arc<Switch>], keys: &Keyring) -> (ChunkStore, Root) {
    ChunkStore::create_mirrored(
        backends(stores),
        quick(),
        PREFIX,
        (VAULT, keys.key()),
        geometry(),
    )
    .await
    .unwrap()
}

fn quick() -> MirrorSettings {
    MirrorSettings {
        degrade_after: Duration::from_millis(300),
        retry_after: Duration::ZERO,
        read_only: false,
    }
}

async fn open_one(store: &Arc<Switch>, keys: &Keyring, local: Root) -> ChunkStore {
    ChunkStore::open(store.clone(), PREFIX, VAULT, keys.key(), Some(local), false)
        .await
        .unwrap()
        .0
}

async fn resync_until_in_step(s: &mut ChunkStore) -> usize {
    for steps in 1..100 {
        if !s.resync(2).await.unwrap() {
            return steps;
        }
    }
    panic!("never back in step: {:?}", s.status());
}

#[test]
fn every_write_reaches_every_store_and_either_alone_reads_it_back() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks(vec![(1, chunk(1)), (6, chunk(6))])
            .await
            .unwrap();
        let root = s.flush().await.unwrap().unwrap();
        assert!(s.status().iter().all(|r| r.in_step && r.behind == Some(0)));
        // The same objects on both, byte for byte.
        assert_eq!(snapshot(&a.mem).await, snapshot(&b.mem).await);
        for store in [&a, &b] {
            let one = open_one(store, &keys, root).await;
            assert_eq!(one.read_chunk(1).await.unwrap(), chunk(1));
            assert_eq!(one.read_chunk(6).await.unwrap(), chunk(6));
            assert_eq!(one.read_chunk(2).await.unwrap(), chunk(0));
        }
        // A create over either is refused, naming it.
        let again = ChunkStore::create_mirrored(
            backends(&[&Switch::new(), &b]),
            quick(),
            PREFIX,
            (VAULT, keys.key()),
            geometry(),
        )
        .await;
        assert!(
            matches!(&again, Err(RemoteError::Config(m)) if m.contains("store-1")),
            "{again:?}"
        );
    });
}

/// One store lost in the middle of writing (failing, then hanging): the
/// other takes the flushes alone, the lost one is marked stale with the
/// epoch it holds, and once it answers again it is brought back, verified,
/// and holds the volume on its own.
#[test]
fn a_store_lost_mid_write_goes_stale_and_is_brought_back() {
    for lost in [DOWN, HUNG] {
        let rt = rt();
        let (a, b) = (Switch::new(), Switch::new());
        let keys = Keyring::new();
        rt.block_on(async {
            let (mut s, _) = mirrored(&[&a, &b], &keys).await;
            kept(&mut s, vec![(0, chunk(10))]).await;
            let _ = s.take_events();
            // The mirror goes away between a chunk's write and the flush.
            s.write_chunks(vec![(1, chunk(11))]).await.unwrap();
            b.set(lost);
            let r2 = kept(&mut s, vec![(2, chunk(12)), (7, chunk(17))]).await;
            assert_eq!(r2.epoch, 2);
            let st = s.status();
            assert!(st[0].in_step);
            assert!(!st[1].in_step, "{st:?}");
            assert_eq!(st[1].synced_epoch, Some(1), "{st:?}");
            assert_eq!(st[1].behind, Some(1));
            let ev = s.take_events();
            assert!(
                matches!(&ev[..], [StoreEvent::Stale { name, synced: 1, .. }] if name == "store-1"),
                "{ev:?}"
            );
            // Degraded, it goes on: more writes and a flush on one store.
            let r3 = kept(&mut s, vec![(0, chunk(20))]).await;
            // While it is away, a resync gets nowhere and says why.
            assert!(s.resync(64).await.unwrap());
            assert!(s.status()[1].reason.is_some());
            // Back: brought up to date a few objects at a time.
            b.set(UP);
            let steps = resync_until_in_step(&mut s).await;
            assert!(steps > 1, "a budget of 2 objects takes several steps");
            let st = s.status();
            assert!(st[1].in_step && st[1].behind == Some(0), "{st:?}");
            assert!(st[1].copied >= 5, "{st:?}");
            let ev = s.take_events();
            assert!(
                ev.iter().any(|e| matches!(e, StoreEvent::InStep { .. })),
                "{ev:?}"
            );
            // The mirror alone is the volume now.
            let one = open_one(&b, &keys, r3).await;
            for (i, want) in [(0, 20), (1, 11), (2, 12), (7, 17), (3, 0)] {
                assert_eq!(one.read_chunk(i).await.unwrap(), chunk(want), "chunk {i}");
            }
            // And it takes every write again.
            s.write_chunks(vec![(5, chunk(25))]).await.unwrap();
            let r4 = s.flush().await.unwrap().unwrap();
            let one = open_one(&b, &keys, r4).await;
            assert_eq!(one.read_chunk(5).await.unwrap(), chunk(25));
        });
    }
}

#[test]
fn a_chunk_that_does_not_verify_on_one_store_is_read_from_the_other_and_repaired() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks(vec![(3, chunk(3)), (4, chunk(4))])
            .await
            .unwrap();
        let root = s.flush().await.unwrap().unwrap();
        let snap = snapshot(&a.mem).await;
        let c3 = snap
            .keys()
            .find(|k| k.starts_with("team/c/000000000003/"))
            .unwrap()
            .clone();
        let c4 = snap
            .keys()
            .find(|k| k.starts_with("team/c/000000000004/"))
            .unwrap()
            .clone();
        // The primary flips a byte of one chunk and loses another.
        let mut bad = chunk(3);
        bad[7] ^= 0x80;
        a.mem
            .put(&Path::from(c3.as_str()), PutPayload::from(bad))
            .await
            .unwrap();
        a.mem.delete(&Path::from(c4.as_str())).await.unwrap();
        let s = open_one(&a, &keys, root).await;
        assert!(matches!(
            s.read_chunk(3).await,
            Err(RemoteError::Tampered(_))
        ));
        // Mirrored, both read right, and the primary is repaired.
        let (s, _) = ChunkStore::open_mirrored(
            backends(&[&a, &b]),
            quick(),
            PREFIX,
            (VAULT, keys.key()),
            (Some(root), false),
        )
        .await
        .unwrap();
        assert_eq!(s.read_chunk(3).await.unwrap(), chunk(3));
        assert_eq!(s.read_chunk(4).await.unwrap(), chunk(4));
        assert_eq!(s.status()[0].repaired, 2);
        let ev = s.take_events();
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, StoreEvent::Repaired { name, .. } if name == "store-0"))
                .count(),
            2,
            "{ev:?}"
        );
        assert_eq!(snapshot(&a.mem).await, snapshot(&b.mem).await);
        // Bad on both: an error, never the altered bytes.
        for m in [&a.mem, &b.mem] {
            m.put(&Path::from(c3.as_str()), PutPayload::from(chunk(9)))
                .await
                .unwrap();
        }
        assert!(matches!(
            s.read_chunk(3).await,
            Err(RemoteError::Tampered(_))
        ));
    });
}

/// Opened read-only (an export, a sweep's dry run), the stores are only
/// read: a page missing from one is read from the other and not put back
/// there, a new mirror is not probed (the probe writes); opened to write,
/// the same page is repaired.
#[test]
fn opened_read_only_the_stores_are_only_read() {
    let rt = rt();
    let (a, b, c) = (Switch::new(), Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks(vec![(3, chunk(3)), (4, chunk(4))])
            .await
            .unwrap();
        let root = s.flush().await.unwrap().unwrap();
        drop(s);
        let snap = snapshot(&a.mem).await;
        let page = snap
            .keys()
            .find(|k| k.starts_with("team/p/"))
            .unwrap()
            .clone();
        a.mem.delete(&Path::from(page.as_str())).await.unwrap();
        let (a_before, c_before) = (snapshot(&a.mem).await, snapshot(&c.mem).await);
        let (s, _) = ChunkStore::open_mirrored(
            backends(&[&a, &b, &c]),
            MirrorSettings {
                read_only: true,
                ..quick()
            },
            PREFIX,
            (VAULT, keys.key()),
            (Some(root), false),
        )
        .await
        .unwrap();
        assert_eq!(s.read_chunk(3).await.unwrap(), chunk(3));
        assert_eq!(s.read_chunk(4).await.unwrap(), chunk(4));
        let st = s.status();
        assert!(
            st[2].reason.as_deref().unwrap().contains("not probed"),
            "{st:?}"
        );
        drop(s);
        assert_eq!(snapshot(&a.mem).await, a_before, "a store was written");
        assert_eq!(
            snapshot(&c.mem).await,
            c_before,
            "the new mirror was probed"
        );
        // Opened to write: the page is put back.
        let (s, _) = ChunkStore::open_mirrored(
            backends(&[&a, &b]),
            quick(),
            PREFIX,
            (VAULT, keys.key()),
            (Some(root), false),
        )
        .await
        .unwrap();
        drop(s);
        assert!(snapshot(&a.mem).await.contains_key(&page), "not repaired");
    });
}

#[test]
fn the_newest_store_wins_at_open_and_a_rollback_of_all_is_refused() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks(vec![(1, chunk(1))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        let (old_a, old_b) = (snapshot(&a.mem).await, snapshot(&b.mem).await);
        s.write_chunks(vec![(1, chunk(2)), (2, chunk(2))])
            .await
            .unwrap();
        let root = s.flush().await.unwrap().unwrap();
        drop(s);
        // The primary's provider serves yesterday's bucket: the mirror
        // holds the newest authentic state, and the primary is behind.
        restore(&a.mem, &old_a).await;
        let open = |local| {
            ChunkStore::open_mirrored(
                backends(&[&a, &b]),
                quick(),
                PREFIX,
                (VAULT, keys.key()),
                (Some(local), false),
            )
        };
        let (mut s, opened) = open(root).await.unwrap();
        assert_eq!(opened.root, root);
        assert_eq!(s.read_chunk(1).await.unwrap(), chunk(2));
        let st = s.status();
        // Its epoch 1 is not a root this writer knows (the local root is
        // epoch 2): what it holds is checked object by object.
        assert!(!st[0].in_step && st[0].synced_epoch == Some(0), "{st:?}");
        assert!(
            st[0].reason.as_deref().unwrap().contains("behind"),
            "{st:?}"
        );
        resync_until_in_step(&mut s).await;
        drop(s);
        let one = open_one(&a, &keys, root).await;
        assert_eq!(one.read_chunk(2).await.unwrap(), chunk(2));
        // The primary unreachable: the mirror alone opens (after the
        // degrade timeout), and the primary waits to be brought back.
        a.set(DOWN);
        let (s, _) = open(root).await.unwrap();
        assert_eq!(s.read_chunk(2).await.unwrap(), chunk(2));
        let st = s.status();
        assert!(!st[0].in_step && st[0].synced_epoch.is_none(), "{st:?}");
        assert!(st[1].in_step);
        drop(s);
        a.set(UP);
        // Both rolled back: refused, as a lone store's rollback is.
        restore(&a.mem, &old_a).await;
        restore(&b.mem, &old_b).await;
        let r = open(root).await;
        assert!(
            matches!(r, Err(RemoteError::Rollback { store: 1, local: 2 })),
            "{:?}",
            r.err()
        );
    });
}

#[test]
fn a_new_mirror_added_to_a_volume_is_filled_and_then_holds_it_alone() {
    let rt = rt();
    let (a, c) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = ChunkStore::create(a.clone(), PREFIX, VAULT, keys.key(), geometry())
            .await
            .unwrap();
        s.write_chunks((0..8).map(|i| (i, chunk(i as u8 + 1))).collect())
            .await
            .unwrap();
        let root = s.flush().await.unwrap().unwrap();
        drop(s);
        let (mut s, _) = ChunkStore::open_mirrored(
            backends(&[&a, &c]),
            quick(),
            PREFIX,
            (VAULT, keys.key()),
            (Some(root), false),
        )
        .await
        .unwrap();
        let st = s.status();
        assert!(
            !st[1].in_step && st[1].reason.as_deref().unwrap().contains("no volume"),
            "{st:?}"
        );
        resync_until_in_step(&mut s).await;
        assert_eq!(s.status()[1].copied, 9, "8 chunks and a page");
        let one = open_one(&c, &keys, root).await;
        for i in 0..8 {
            assert_eq!(one.read_chunk(i).await.unwrap(), chunk(i as u8 + 1));
        }
    });
}

/// The device: a mirror that hangs mid-write costs one degrade timeout,
/// then writes and flushes go on; the device's own thread brings it back
/// once it answers, and says so.
#[test]
fn the_device_goes_on_without_a_hung_mirror_and_brings_it_back() {
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    let (s, _) = rt().block_on(mirrored(&[&a, &b], &keys));
    let roots = Arc::new(Mutex::new(Vec::new()));
    let events = Arc::new(Mutex::new(Vec::new()));
    let (r2, e2) = (roots.clone(), events.clone());
    let dev = RemoteDevice::with_changes(
        s,
        1 << 20,
        Box::new(move |r| {
            r2.lock().unwrap().push(r);
            Ok(())
        }),
        Some(Box::new(move |ev, _st| {
            e2.lock().unwrap().extend(ev.iter().cloned())
        })),
    )
    .unwrap();
    dev.write_at(0, &[7u8; 100_000]).unwrap();
    dev.flush().unwrap();
    b.set(HUNG);
    dev.write_at(300_000, &[8u8; 70_000]).unwrap();
    dev.flush().unwrap();
    assert!(!dev.status()[1].in_step);
    b.set(UP);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !dev.status()[1].in_step {
        assert!(std::time::Instant::now() < deadline, "{:?}", dev.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let ev = events.lock().unwrap().clone();
    assert!(
        matches!(ev.first(), Some(StoreEvent::Stale { .. })),
        "{ev:?}"
    );
    assert!(
        matches!(ev.last(), Some(StoreEvent::InStep { .. })),
        "{ev:?}"
    );
    // Chunk 0 written again: its older version is garbage once the new
    // manifest is durable, deleted from both stores.
    dev.write_at(0, &[9u8; 65536]).unwrap();
    dev.flush().unwrap();
    let before = rt().block_on(snapshot(&b.mem)).len();
    assert!(
        dev.collect_garbage(Duration::ZERO).unwrap() >= 2,
        "a chunk and a page"
    );
    assert!(rt().block_on(snapshot(&b.mem)).len() < before);
    assert_eq!(
        rt().block_on(snapshot(&a.mem)),
        rt().block_on(snapshot(&b.mem))
    );
    let root = *roots.lock().unwrap().last().unwrap();
    drop(dev);
    let one = rt().block_on(open_one(&b, &keys, root));
    // 70,000 bytes at 300,000: the end of chunk 4, the start of chunk 5.
    let c4 = rt().block_on(one.read_chunk(4)).unwrap();
    let c5 = rt().block_on(one.read_chunk(5)).unwrap();
    let within = 300_000 - 4 * 65536;
    assert!(c4[within..].iter().all(|b| *b == 8));
    assert!(c5[..70_000 - (65536 - within)].iter().all(|b| *b == 8));
    let c0 = rt().block_on(one.read_chunk(0)).unwrap();
    assert_eq!(&c0[..65536], &[9u8; 65536][..]);
    let c1 = rt().block_on(one.read_chunk(1)).unwrap();
    assert_eq!(&c1[..100_000 - 65536], &[7u8; 100_000 - 65536][..]);
}

/// A store holding a manifest of another history (its epoch 2 landed, the
/// process died before the root was kept, and the vault then went on from
/// the mirror at epoch 1 to its own epochs 2 and 3): its epoch is not
/// believed; what it holds is checked name by name, and once brought back
/// it holds the volume alone.
#[test]
fn a_store_from_another_history_is_checked_object_by_object() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        let root1 = s.flush().await.unwrap().unwrap();
        // Epoch 2 lands on the primary only; the root is never kept.
        b.set(DOWN);
        s.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        drop(s);
        // The next open finds the primary down and goes on from the mirror.
        a.set(DOWN);
        b.set(UP);
        let (mut s, _) = ChunkStore::open_mirrored(
            backends(&[&a, &b]),
            quick(),
            PREFIX,
            (VAULT, keys.key()),
            (Some(root1), false),
        )
        .await
        .unwrap();
        s.write_chunks(vec![(1, chunk(22)), (2, chunk(23))])
            .await
            .unwrap();
        s.flush().await.unwrap().unwrap();
        s.write_chunks(vec![(3, chunk(24))]).await.unwrap();
        let root3 = s.flush().await.unwrap().unwrap();
        a.set(UP);
        resync_until_in_step(&mut s).await;
        drop(s);
        let one = open_one(&a, &keys, root3).await;
        for (i, want) in [(0, 1), (1, 22), (2, 23), (3, 24)] {
            assert_eq!(one.read_chunk(i).await.unwrap(), chunk(want), "chunk {i}");
        }
    });
}

/// Writes go on while dirty chunks upload in the background; a chunk
/// written again during its upload stays dirty and is uploaded again, so
/// the newest bytes are what the flush makes durable.
#[test]
fn a_chunk_written_again_during_its_background_upload_is_not_lost() {
    let a = Switch::new();
    let keys = Keyring::new();
    let (s, _) = rt()
        .block_on(ChunkStore::create(
            a.clone(),
            PREFIX,
            VAULT,
            keys.key(),
            geometry(),
        ))
        .unwrap();
    let roots = Arc::new(Mutex::new(Vec::new()));
    let r2 = roots.clone();
    let dev = RemoteDevice::new(
        s,
        8 * CHUNK as usize,
        Box::new(move |r| {
            r2.lock().unwrap().push(r);
            Ok(())
        }),
    )
    .unwrap();
    a.set(SLOW);
    // Four chunks: half the buffer, past the quarter that starts an
    // upload in the background.
    for i in 0..4u64 {
        dev.write_at(i * u64::from(CHUNK), &chunk(i as u8 + 1))
            .unwrap();
    }
    // Written again while it uploads (partly: the rest of the chunk is
    // the first write's).
    dev.write_at(100, &[0xee; 1000]).unwrap();
    dev.write_at(5 * u64::from(CHUNK), &chunk(6)).unwrap();
    a.set(UP);
    dev.flush().unwrap();
    let root = *roots.lock().unwrap().last().unwrap();
    drop(dev);
    let one = rt().block_on(open_one(&a, &keys, root));
    let mut want0 = chunk(1);
    want0[100..1100].fill(0xee);
    assert_eq!(rt().block_on(one.read_chunk(0)).unwrap(), want0);
    for (i, fill) in [(1, 2), (2, 3), (3, 4), (5, 6), (4, 0)] {
        assert_eq!(
            rt().block_on(one.read_chunk(i)).unwrap(),
            chunk(fill),
            "chunk {i}"
        );
    }
}

/// Sequential reads through the device go through its read-ahead (the
/// window fetched and verified in the background): an altered chunk in
/// the window is an I/O error when it is read, never its bytes, and the
/// chunks around it read right.
#[test]
fn an_altered_chunk_in_the_read_ahead_window_is_an_error_not_bytes() {
    let a = Switch::new();
    let keys = Keyring::new();
    let (s, _) = rt()
        .block_on(ChunkStore::create(
            a.clone(),
            PREFIX,
            VAULT,
            keys.key(),
            geometry(),
        ))
        .unwrap();
    let root = Arc::new(Mutex::new(None));
    let r2 = root.clone();
    let keep = move |r| {
        *r2.lock().unwrap() = Some(r);
        Ok(())
    };
    let dev = RemoteDevice::new(s, 8 * CHUNK as usize, Box::new(keep)).unwrap();
    for i in 0..8u64 {
        dev.write_at(i * u64::from(CHUNK), &chunk(i as u8 + 1))
            .unwrap();
    }
    dev.flush().unwrap();
    drop(dev);
    let snap = rt().block_on(snapshot(&a.mem));
    let c5 = snap
        .keys()
        .find(|k| k.starts_with("team/c/000000000005/"))
        .unwrap()
        .clone();
    let mut bad = chunk(6);
    bad[10] ^= 1;
    rt().block_on(a.mem.put(&Path::from(c5.as_str()), PutPayload::from(bad)))
        .unwrap();
    let local = root.lock().unwrap().unwrap();
    let s = rt().block_on(open_one(&a, &keys, local));
    // A buffer of 8 chunks: windows of 2.
    let dev = RemoteDevice::new(s, 8 * CHUNK as usize, Box::new(|_| Ok(()))).unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    for off in (0..u64::from(CHUNK) * 8).step_by(buf.len()) {
        let r = dev.read_at(off, &mut buf);
        let index = off / u64::from(CHUNK);
        if index == 5 {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        } else {
            r.unwrap();
            assert!(buf.iter().all(|b| *b == index as u8 + 1), "chunk {index}");
        }
    }
}

/// A store in step that serves a chunk that does not verify is repaired,
/// and then left out of writes and reads until every object it should
/// hold has been read back and verified: another chunk altered there,
/// never read, is found and rewritten before it takes writes again.
#[test]
fn a_store_that_served_bad_data_is_demoted_and_read_back_whole() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks((0..6).map(|i| (i, chunk(i as u8 + 1))).collect())
            .await
            .unwrap();
        s.flush().await.unwrap().unwrap();
        let snap = snapshot(&a.mem).await;
        let name = |i: u64| {
            snap.keys()
                .find(|k| k.starts_with(&format!("team/c/{i:012}/")))
                .unwrap()
                .clone()
        };
        for i in [3, 5] {
            a.mem
                .put(&Path::from(name(i).as_str()), PutPayload::from(chunk(0xee)))
                .await
                .unwrap();
        }
        assert_eq!(s.read_chunk(3).await.unwrap(), chunk(4));
        assert_eq!(s.demote_bad(), 1);
        let st = s.status();
        assert!(!st[0].in_step && st[1].in_step, "{st:?}");
        assert!(st[0].reason.as_deref().unwrap().contains("did not verify"));
        // Writes go on without it.
        s.write_chunks(vec![(6, chunk(7))]).await.unwrap();
        let root = s.flush().await.unwrap().unwrap();
        resync_until_in_step(&mut s).await;
        assert_eq!(s.demote_bad(), 0);
        drop(s);
        // The primary alone now holds every chunk as written, chunk 5 too.
        let one = open_one(&a, &keys, root).await;
        for i in 0..7u64 {
            assert_eq!(
                one.read_chunk(i).await.unwrap(),
                chunk(i as u8 + 1),
                "chunk {i}"
            );
        }
    });
}

/// While a manifest put is to be settled, a store that served bad data is
/// repaired but stays in step: the settle asks the stores in step, and the
/// one taken out might be the one holding the put. The next flush settles
/// it, and the store goes then.
#[test]
fn a_store_that_served_bad_data_stays_in_step_until_an_unanswered_put_is_settled() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks((0..4).map(|i| (i, chunk(i as u8 + 1))).collect())
            .await
            .unwrap();
        s.flush().await.unwrap().unwrap();
        let snap = snapshot(&a.mem).await;
        let three = snap
            .keys()
            .find(|k| k.starts_with("team/c/000000000003/"))
            .unwrap()
            .clone();
        a.mem
            .put(&Path::from(three.as_str()), PutPayload::from(chunk(0xee)))
            .await
            .unwrap();
        a.set(MANIFEST_ANSWER_LOST);
        b.set(MANIFEST_ANSWER_LOST);
        s.write_chunks(vec![(4, chunk(5))]).await.unwrap();
        assert!(s.flush().await.is_err(), "the manifest put went unanswered");
        a.set(UP);
        b.set(UP);
        assert_eq!(s.read_chunk(3).await.unwrap(), chunk(4));
        assert_eq!(s.demote_bad(), 0, "taken out while the put is unsettled");
        assert!(s.status().iter().all(|r| r.in_step), "{:?}", s.status());
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.demote_bad(), 1, "once settled");
        let st = s.status();
        assert!(!st[0].in_step && st[1].in_step, "{st:?}");
    });
}

/// A manifest a store altered, lost or rolled back is the store's fault,
/// not a second writer: that store goes stale and the others go on (one
/// provider cannot stop the vault). A manifest only a holder of the
/// integrity key could have written still fences.
#[test]
fn a_store_that_spoils_its_manifest_goes_stale_and_only_another_writer_fences() {
    let rt = rt();
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, _) = mirrored(&[&a, &b], &keys).await;
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        let old = snapshot(&b.mem).await["team/manifest"].clone();
        s.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        // The mirror puts back the first manifest; the primary's is
        // replaced by garbage.
        b.mem
            .put(&Path::from("team/manifest"), PutPayload::from(old))
            .await
            .unwrap();
        s.write_chunks(vec![(2, chunk(3))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        let st = s.status();
        assert!(st[0].in_step && !st[1].in_step, "{st:?}");
        assert!(
            st[1].reason.as_deref().unwrap().contains("manifest"),
            "{st:?}"
        );
        resync_until_in_step(&mut s).await;
        a.mem
            .put(
                &Path::from("team/manifest"),
                PutPayload::from(vec![0x5a; 300]),
            )
            .await
            .unwrap();
        s.write_chunks(vec![(3, chunk(4))]).await.unwrap();
        let root = s.flush().await.unwrap().unwrap();
        assert!(!s.is_fenced());
        let st = s.status();
        assert!(!st[0].in_step && st[1].in_step, "{st:?}");
        resync_until_in_step(&mut s).await;
        // A second writer (the same key, another host) opens both and
        // flushes first: the first is fenced.
        let (mut other, _) = ChunkStore::open_mirrored(
            backends(&[&a, &b]),
            quick(),
            PREFIX,
            (VAULT, keys.key()),
            (Some(root), false),
        )
        .await
        .unwrap();
        other.write_chunks(vec![(4, chunk(5))]).await.unwrap();
        other.flush().await.unwrap().unwrap();
        s.write_chunks(vec![(4, chunk(6))]).await.unwrap();
        assert_eq!(s.flush().await, Err(RemoteError::Fenced));
    });
}

/// Bringing a stale mirror back never holds the device: with a mirror
/// that answers reads but never a write (and a timeout of an hour),
/// writes and flushes go on while its copies hang.
#[test]
fn a_mirror_that_hangs_while_brought_back_holds_up_no_write() {
    let (a, b) = (Switch::new(), Switch::new());
    let keys = Keyring::new();
    let (s, _) = rt().block_on(async {
        ChunkStore::create_mirrored(
            backends(&[&a, &b]),
            MirrorSettings {
                degrade_after: Duration::from_secs(3600),
                retry_after: Duration::ZERO,
                read_only: false,
            },
            PREFIX,
            (VAULT, keys.key()),
            geometry(),
        )
        .await
        .unwrap()
    });
    let dev = Arc::new(RemoteDevice::new(s, 1 << 20, Box::new(|_| Ok(()))).unwrap());
    dev.write_at(0, &[7u8; 100_000]).unwrap();
    dev.flush().unwrap();
    b.set(DOWN);
    dev.write_at(200_000, &[8u8; 10_000]).unwrap();
    dev.flush().unwrap();
    assert!(!dev.status()[1].in_step);
    // It answers its manifest's read, and its copies hang.
    b.set(WRITES_HUNG);
    std::thread::sleep(Duration::from_secs(2));
    let (tx, rx) = std::sync::mpsc::channel();
    let d2 = dev.clone();
    std::thread::spawn(move || {
        for k in 0..5u8 {
            d2.write_at(u64::from(k) * 65536, &[k; 4096]).unwrap();
            d2.flush().unwrap();
        }
        let mut back = vec![0u8; 4096];
        d2.read_at(4 * 65536, &mut back).unwrap();
        let _ = tx.send(back);
    });
    let back = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("a write or flush waited on the hung mirror");
    assert_eq!(back, vec![4u8; 4096]);
    assert!(!dev.status()[1].in_step);
    drop(dev);
}

//! The chunk store against `object_store`'s in-memory store (a real store
//! implementation, in process): round trips, tampering, rollbacks of the
//! whole store and of one chunk, a second writer fenced, a manifest put
//! whose outcome is lost, garbage collection; and, as a property, random
//! histories of writes, flushes, crashes and store failures, where what
//! reads back is always what was last flushed (or an error).

// Offsets and sizes here are small constants (a 512 KiB volume).
#![allow(clippy::cast_possible_truncation)]

use bytes::Bytes;
use coffre_remote::objects::{BoxFuture, Keep, Listing, Objects, Put, StoreError, Tag, keep_all};
use coffre_remote::{
    ChunkStore, IntegrityKey, ObjectStoreObjects, RemoteDevice, RemoteError, Root,
};
use coffre_storage::BlockDevice;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::*;

/// The one object whose name starts with `start` (names end with the
/// writer's random session).
async fn named(mem: &InMemory, start: &str) -> Path {
    let found: Vec<String> = snapshot(mem)
        .await
        .into_keys()
        .filter(|k| k.starts_with(start))
        .collect();
    assert_eq!(found.len(), 1, "{start}: {found:?}");
    Path::from(found[0].as_str())
}

fn objects(mem: &Arc<InMemory>) -> Arc<dyn Objects> {
    Arc::new(ObjectStoreObjects::new(mem.clone()))
}

#[test]
fn chunks_round_trip_and_never_written_ones_read_as_zeros() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let (mut s, root0) =
            ChunkStore::create(objects(&mem), PREFIX, VAULT, keys.key(), geometry())
                .await
                .unwrap();
        assert_eq!(root0.epoch, 0);
        s.write_chunks(vec![(1, chunk(1)), (5, chunk(5))])
            .await
            .unwrap();
        // Written, not yet durable: visible to this writer.
        assert_eq!(s.read_chunk(5).await.unwrap(), chunk(5));
        let root = s.flush().await.unwrap().unwrap();
        assert_eq!(root.epoch, 1);
        // Offered until the caller says it kept it.
        assert_eq!(s.flush().await.unwrap(), Some(root));
        s.root_kept(root);
        assert_eq!(s.flush().await.unwrap(), None, "nothing changed since");
        // A fresh open sees the same, verified.
        let (s2, opened) =
            ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false)
                .await
                .unwrap();
        assert_eq!(opened.ahead_by, 0);
        for i in 0..8 {
            let want = match i {
                1 => chunk(1),
                5 => chunk(5),
                _ => chunk(0),
            };
            assert_eq!(s2.read_chunk(i).await.unwrap(), want, "chunk {i}");
        }
        assert!(s2.read_chunk(8).await.is_err());
        // The store holds the chunks as given (ciphertext in, ciphertext
        // stored), the pages and the manifest: nothing else.
        let snap = snapshot(&mem).await;
        let c1 = named(&mem, "team/c/000000000001/0000000000000001.").await;
        assert_eq!(snap[c1.as_ref()], Bytes::from(chunk(1)));
        named(&mem, "team/p/00000000/0000000000000001.").await;
        assert!(snap.contains_key("team/manifest"));
        assert_eq!(snap.len(), 4, "{:?}", snap.keys().collect::<Vec<_>>());
        // Creating again over it is refused.
        let again = ChunkStore::create(objects(&mem), PREFIX, VAULT, keys.key(), geometry()).await;
        assert!(matches!(again, Err(RemoteError::Config(_))), "{again:?}");
    });
}

/// An upload's MACs are made while its chunks are put (`Upload::run`):
/// what it records verifies on a fresh open, and an upload whose run did
/// not end records nothing (the chunk reads as before, and can be written
/// again).
#[test]
fn an_upload_records_what_it_put_with_macs_that_verify_or_nothing() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        s.write_chunks(vec![(1, chunk(1))]).await.unwrap();
        let up = s.prepare_chunks(vec![(1, chunk(2))]).await.unwrap();
        let stopped = up.failed("stopped by the test");
        let e = s.finish_chunks(up, stopped).unwrap_err();
        assert!(e.to_string().contains("stopped by the test"), "{e}");
        assert_eq!(s.read_chunk(1).await.unwrap(), chunk(1), "nothing recorded");
        let chunks: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i, chunk(i as u8 + 10))).collect();
        let up = s.prepare_chunks(chunks).await.unwrap();
        assert_eq!(up.indices().collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        let landed = up.run().await;
        s.finish_chunks(up, landed).unwrap();
        let root = s.flush().await.unwrap().unwrap();
        let fresh = opened(objects(&mem), &keys, root).await.unwrap();
        for i in 0..8u64 {
            assert_eq!(
                fresh.read_chunk(i).await.unwrap(),
                chunk(i as u8 + 10),
                "chunk {i}"
            );
        }
    });
}

/// A sweep deletes orphans: objects of the volume's layout that nothing
/// names (here an upload that a crash cut short and a stray probe). What
/// the table names (flushed or not), a superseded version waiting out its
/// grace, the manifest, other prefixes' and layouts' objects, and anything
/// younger than the age asked are never touched.
#[test]
fn a_sweep_deletes_orphans_and_nothing_else() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        kept(&mut s, vec![(1, chunk(1)), (2, chunk(2))]).await;
        let superseded = named(&mem, "team/c/000000000002/0000000000000001.").await;
        kept(&mut s, vec![(2, chunk(3))]).await;
        // Put, never recorded: the writer crashed before.
        let cut = s.prepare_chunks(vec![(3, chunk(4))]).await.unwrap();
        let orphan = cut.names().next().unwrap().clone();
        drop(cut.run().await);
        drop(cut);
        // Written, not flushed: only the table names it.
        s.write_chunks(vec![(4, chunk(5))]).await.unwrap();
        let put = |name: &str| {
            let mem = mem.clone();
            let name = name.to_string();
            async move {
                mem.put(&Path::from(name), PutPayload::from(vec![9u8; 10]))
                    .await
                    .unwrap();
            }
        };
        put("team/probe/00000000000000aa").await;
        put("team/notes.txt").await;
        put("team/c/1/0000000000000001.0000000000000001").await;
        put("other/c/000000000001/0000000000000001.0000000000000001").await;
        // Names of the layout no writer of this history can have made: a
        // chunk past the volume's end, a version past the next epoch.
        put("team/c/0000000000ff/0000000000000001.0000000000000001").await;
        put("team/c/000000000001/00000000000000ff.0000000000000001").await;
        let before = snapshot(&mem).await;
        assert!(before.contains_key(&orphan));
        let young = s.sweep(Duration::from_secs(3600)).await.unwrap();
        assert_eq!((young.orphans.len(), young.deleted), (0, 0));
        assert_eq!(snapshot(&mem).await, before, "nothing is an hour old");
        let swept = s.sweep(Duration::ZERO).await.unwrap();
        assert!(swept.unjudged.is_empty(), "{:?}", swept.unjudged);
        assert_eq!(swept.deleted, 2);
        let after = snapshot(&mem).await;
        let gone: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        assert_eq!(
            gone,
            vec![&orphan, &"team/probe/00000000000000aa".to_string()]
        );
        assert!(after.contains_key(superseded.as_ref()), "its grace runs");
        assert!(
            s.take_events()
                .contains(&coffre_remote::StoreEvent::Swept { orphans: 2 })
        );
        assert_eq!(
            s.sweep(Duration::ZERO).await.unwrap().deleted,
            0,
            "nothing left"
        );
        // An upload on its way while the device's thread sweeps: its
        // objects landed before the listing, and are named only by the
        // upload, which the thread passes as kept.
        let live = s.prepare_chunks(vec![(5, chunk(6))]).await.unwrap();
        let landed = live.run().await;
        let names: Vec<String> = live.names().cloned().collect();
        let sweep = s.prepare_sweep(Duration::ZERO).unwrap();
        let listed = sweep.run().await;
        let kept = s.finish_sweep(&sweep, listed, &names).unwrap();
        assert_eq!(kept.orphans, Vec::<String>::new());
        let listed = sweep.run().await;
        let unkept = s.finish_sweep(&sweep, listed, &[]).unwrap();
        assert_eq!(unkept.orphans, names, "without it, an orphan");
        s.finish_chunks(live, landed).unwrap();
        let root = s.flush().await.unwrap().unwrap();
        let fresh = opened(objects(&mem), &keys, root).await.unwrap();
        assert_eq!(fresh.read_chunk(5).await.unwrap(), chunk(6));
        for (i, want) in [(1, chunk(1)), (2, chunk(3)), (3, chunk(0)), (4, chunk(5))] {
            assert_eq!(fresh.read_chunk(i).await.unwrap(), want, "chunk {i}");
        }
    });
}

/// A store that counts what its listings saw and what they held.
struct Counted {
    inner: Arc<dyn Objects>,
    listed: AtomicUsize,
    held: AtomicUsize,
}

impl Objects for Counted {
    common::forward!(get, put, delete, durable, prepare, opened);
    fn list<'a>(&'a self, prefix: &'a str, max: usize, keep: Keep<'a>) -> BoxFuture<'a, Listing> {
        Box::pin(async move {
            let found = self.inner.list(prefix, max, keep).await?;
            if let Some(f) = &found {
                self.listed.fetch_add(f.listed, Ordering::Relaxed);
                self.held.fetch_add(f.names.len(), Ordering::Relaxed);
            }
            Ok(found)
        })
    }
}

/// A sweep holds what may be an orphan, never every live chunk: the
/// listing sees them all and keeps none of them (a store of ten million
/// chunks would have held a gigabyte of names).
#[test]
fn a_sweep_holds_its_candidates_and_not_the_live_chunks() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let counted = Arc::new(Counted {
            inner: objects(&mem),
            listed: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        });
        let g = coffre_remote::layout::Geometry::new(CHUNK, 96 * u64::from(CHUNK)).unwrap();
        let (mut s, _) = created_with(
            counted.clone(),
            &keys,
            g,
            coffre_remote::integrity::ChunkMac::Blake3,
        )
        .await;
        kept(&mut s, (0..80).map(|i| (i, chunk(i as u8))).collect()).await;
        let cut = s.prepare_chunks(vec![(90, chunk(1))]).await.unwrap();
        let orphan = cut.names().next().unwrap().clone();
        drop(cut.run().await);
        drop(cut);
        let swept = s.sweep(Duration::ZERO).await.unwrap();
        assert_eq!(swept.orphans, std::slice::from_ref(&orphan));
        assert_eq!(swept.deleted, 1);
        assert!(!snapshot(&mem).await.contains_key(&orphan));
        assert!(counted.listed.load(Ordering::Relaxed) >= 81, "all seen");
        assert_eq!(
            counted.held.load(Ordering::Relaxed),
            1,
            "the orphan alone held"
        );
        for i in [0, 41, 79] {
            assert_eq!(s.read_chunk(i).await.unwrap(), chunk(i as u8));
        }
    });
}

/// The same through a store under a folder of a bucket (as mirrors in one
/// bucket are): what it lists is under its folder only, named as it names
/// them.
#[test]
fn a_sweep_through_a_prefixed_store_sees_its_folder_only() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let inner = objects(&mem);
        let folder: Arc<dyn Objects> = Arc::new(coffre_remote::objects::Prefixed::new(
            inner.clone(),
            "site-a",
        ));
        let mut s = created(folder.clone(), &keys).await;
        let root = kept(&mut s, vec![(1, chunk(1))]).await;
        let cut = s.prepare_chunks(vec![(2, chunk(2))]).await.unwrap();
        let orphan = format!("site-a/{}", cut.names().next().unwrap());
        drop(cut.run().await);
        drop(cut);
        // The same name in the bucket's root: another volume's.
        let elsewhere = orphan.strip_prefix("site-a/").unwrap().to_string();
        mem.put(
            &Path::from(elsewhere.as_str()),
            PutPayload::from(vec![1u8; 4]),
        )
        .await
        .unwrap();
        let listed = folder
            .list("team/", 1000, &keep_all)
            .await
            .unwrap()
            .unwrap();
        assert!(
            listed.names.iter().all(|(n, _)| n.starts_with("team/")),
            "{listed:?}"
        );
        assert_eq!(listed.listed, listed.names.len());
        let bounded = folder.list("team/", 2, &keep_all).await.unwrap().unwrap();
        assert_eq!(bounded.names.len(), 2, "no more than asked");
        // Only what is kept is held; everything listed is counted.
        let one = listed.names[0].0.clone();
        let only = |n: &str, _| n == one;
        let kept = folder.list("team/", 1000, &only).await.unwrap().unwrap();
        assert_eq!(kept.names.len(), 1);
        assert_eq!(kept.names[0].0, listed.names[0].0);
        assert_eq!(kept.listed, listed.listed);
        assert_eq!(s.sweep(Duration::ZERO).await.unwrap().deleted, 1);
        let after = snapshot(&mem).await;
        assert!(!after.contains_key(&orphan));
        assert!(after.contains_key(&elsewhere));
        let fresh = opened(folder, &keys, root).await.unwrap();
        assert_eq!(fresh.read_chunk(1).await.unwrap(), chunk(1));
    });
}

/// A writer that another has taken the volume from, and that does not
/// know it yet (idle: it learns so at its next flush), judges nothing: the
/// other's chunks and pages are not in its table, and would all look like
/// orphans. A store that fails while it lists is not judged either, and
/// says so.
#[test]
fn a_sweep_judges_no_store_whose_manifest_is_another_writers() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut idle = created(objects(&mem), &keys).await;
        let root = kept(&mut idle, vec![(1, chunk(1))]).await;
        let mut other = opened(objects(&mem), &keys, root).await.unwrap();
        other
            .write_chunks(vec![(2, chunk(2)), (1, chunk(3))])
            .await
            .unwrap();
        let theirs = other.flush().await.unwrap().unwrap();
        let before = snapshot(&mem).await;
        let swept = idle.sweep(Duration::ZERO).await.unwrap();
        assert_eq!((swept.orphans.len(), swept.deleted), (0, 0));
        assert_eq!(swept.unjudged.len(), 1);
        assert!(
            swept.unjudged[0].1.contains("another writer"),
            "{:?}",
            swept.unjudged
        );
        assert!(
            idle.take_events()
                .iter()
                .any(|e| matches!(e, coffre_remote::StoreEvent::Unswept { .. }))
        );
        assert_eq!(snapshot(&mem).await, before);
        let fresh = opened(objects(&mem), &keys, theirs).await.unwrap();
        assert_eq!(fresh.read_chunk(1).await.unwrap(), chunk(3));
        assert_eq!(fresh.read_chunk(2).await.unwrap(), chunk(2));
        // Its next flush finds the other writer.
        idle.write_chunks(vec![(3, chunk(4))]).await.unwrap();
        assert!(matches!(idle.flush().await, Err(RemoteError::Fenced)));
    });
    let mem = Arc::new(InMemory::new());
    let faulty = Faulty::new(objects(&mem));
    rt.block_on(async {
        let mut s = created(faulty.clone(), &keys).await;
        kept(&mut s, vec![(1, chunk(1))]).await;
        faulty.fail_before.store(1, Ordering::SeqCst);
        let swept = s.sweep(Duration::ZERO).await.unwrap();
        assert_eq!(swept.deleted, 0);
        assert_eq!(swept.unjudged.len(), 1, "{:?}", swept.unjudged);
        assert!(
            swept.unjudged[0].1.contains("injected"),
            "{:?}",
            swept.unjudged
        );
    });
}

/// With mirrors, a name judged an orphan is deleted only on the stores
/// judged: a store left unjudged (here one whose manifest is another
/// writer's, who took the volume over on it alone) keeps it.
#[test]
fn a_sweep_deletes_only_on_the_stores_it_judged() {
    let rt = rt();
    let (m1, m2) = (Arc::new(InMemory::new()), Arc::new(InMemory::new()));
    let keys = Keyring::new();
    let settings = coffre_remote::MirrorSettings {
        degrade_after: Duration::from_secs(5),
        retry_after: Duration::ZERO,
        read_only: false,
    };
    let backends = vec![
        coffre_remote::Backend {
            name: "s1".into(),
            objects: objects(&m1),
        },
        coffre_remote::Backend {
            name: "s2".into(),
            objects: objects(&m2),
        },
    ];
    rt.block_on(async {
        let (mut a, _) = ChunkStore::create_mirrored(
            backends,
            settings,
            PREFIX,
            (VAULT, keys.key()),
            geometry(),
        )
        .await
        .unwrap();
        let root = kept(&mut a, vec![(1, chunk(1))]).await;
        // The other writer's chunk landed on both stores, its manifest on
        // s2 only.
        let mut b = opened(objects(&m2), &keys, root).await.unwrap();
        b.write_chunks(vec![(2, chunk(2))]).await.unwrap();
        let theirs = b.flush().await.unwrap().unwrap();
        let name = named(&m2, "team/c/000000000002/").await;
        let bytes = snapshot(&m2).await[name.as_ref()].clone();
        m1.put(&name, PutPayload::from(bytes)).await.unwrap();
        let swept = a.sweep(Duration::ZERO).await.unwrap();
        let unjudged: Vec<&str> = swept.unjudged.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(unjudged, vec!["s2"]);
        assert_eq!(swept.orphans, vec![name.to_string()]);
        assert_eq!(swept.deleted, 1);
        assert!(
            !snapshot(&m1).await.contains_key(name.as_ref()),
            "gone from s1"
        );
        let fresh = opened(objects(&m2), &keys, theirs).await.unwrap();
        assert_eq!(fresh.read_chunk(2).await.unwrap(), chunk(2), "kept on s2");
    });
}

/// A store whose listings say every object was written `older` earlier
/// than its inner store says.
struct Aged {
    inner: Arc<dyn Objects>,
    older: Duration,
}

impl Objects for Aged {
    common::forward!(get, put, delete, durable, prepare, opened);
    fn list<'a>(&'a self, prefix: &'a str, max: usize, keep: Keep<'a>) -> BoxFuture<'a, Listing> {
        Box::pin(async move {
            let aged = |n: &str, t| keep(n, t - self.older);
            let listed = self.inner.list(prefix, max, &aged).await?;
            Ok(listed.map(|mut found| {
                for (_, t) in &mut found.names {
                    *t -= self.older;
                }
                found
            }))
        })
    }
}

/// With mirrors, an orphan is deleted on each store judged only where
/// that store listed it old enough: a copy that is young there (a resync
/// brought it over a moment ago) stays until a later sweep finds it old.
#[test]
fn a_sweep_deletes_an_orphan_only_where_it_is_old_enough() {
    let rt = rt();
    let (m1, m2) = (Arc::new(InMemory::new()), Arc::new(InMemory::new()));
    let keys = Keyring::new();
    let old: Arc<dyn Objects> = Arc::new(Aged {
        inner: objects(&m1),
        older: Duration::from_secs(7200),
    });
    let backends = vec![
        coffre_remote::Backend {
            name: "old".into(),
            objects: old,
        },
        coffre_remote::Backend {
            name: "young".into(),
            objects: objects(&m2),
        },
    ];
    rt.block_on(async {
        let (mut s, _) = ChunkStore::create_mirrored(
            backends,
            coffre_remote::MirrorSettings::default(),
            PREFIX,
            (VAULT, keys.key()),
            geometry(),
        )
        .await
        .unwrap();
        let root = kept(&mut s, vec![(1, chunk(1))]).await;
        // Put on both stores, never recorded.
        let cut = s.prepare_chunks(vec![(2, chunk(2))]).await.unwrap();
        let orphan = cut.names().next().unwrap().clone();
        drop(cut.run().await);
        drop(cut);
        assert!(snapshot(&m1).await.contains_key(&orphan));
        assert!(snapshot(&m2).await.contains_key(&orphan));
        let swept = s.sweep(Duration::from_secs(3600)).await.unwrap();
        assert!(swept.unjudged.is_empty(), "{:?}", swept.unjudged);
        assert_eq!(swept.orphans, vec![orphan.clone()]);
        assert_eq!(swept.deleted, 1, "gone from where it was judged");
        assert!(!snapshot(&m1).await.contains_key(&orphan), "old there");
        assert!(snapshot(&m2).await.contains_key(&orphan), "young there");
        // Once old everywhere, it goes everywhere.
        let swept = s.sweep(Duration::ZERO).await.unwrap();
        assert_eq!((swept.orphans.len(), swept.deleted), (1, 1));
        assert!(!snapshot(&m2).await.contains_key(&orphan));
        let fresh = opened(objects(&m2), &keys, root).await.unwrap();
        assert_eq!(fresh.read_chunk(1).await.unwrap(), chunk(1));
    });
}

/// A store is judged by the durable root when the sweep was prepared, or
/// one made durable since (this writer flushed between the listing and the
/// judgement: what the flush wrote is kept); not by an older root of this
/// writer's history that the store serves back.
#[test]
fn a_sweep_judges_by_the_durable_root_only() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        kept(&mut s, vec![(1, chunk(1))]).await;
        let old = snapshot(&mem).await["team/manifest"].clone();
        // A flush between the listing and the judgement.
        let sweep = s.prepare_sweep(Duration::ZERO).unwrap();
        let listed = sweep.run().await;
        let root = kept(&mut s, vec![(1, chunk(2)), (2, chunk(3))]).await;
        let mut swept = s.finish_sweep(&sweep, listed, &[]).unwrap();
        assert!(swept.unjudged.is_empty(), "{:?}", swept.unjudged);
        if let Some(g) = swept.garbage.take() {
            let done = g.run().await;
            s.finish_orphans(g, &done);
        }
        let fresh = opened(objects(&mem), &keys, root).await.unwrap();
        assert_eq!(fresh.read_chunk(1).await.unwrap(), chunk(2));
        assert_eq!(fresh.read_chunk(2).await.unwrap(), chunk(3));
        // Two flushes between the preparation and the judgement, the
        // store's manifest read between them: judged by the first.
        let sweep = s.prepare_sweep(Duration::ZERO).unwrap();
        kept(&mut s, vec![(3, chunk(4))]).await;
        let listed = sweep.run().await;
        kept(&mut s, vec![(3, chunk(5))]).await;
        let swept = s.finish_sweep(&sweep, listed, &[]).unwrap();
        assert!(swept.unjudged.is_empty(), "{:?}", swept.unjudged);
        // The store serves an older manifest back: not judged by it.
        mem.put(&Path::from("team/manifest"), PutPayload::from(old))
            .await
            .unwrap();
        let swept = s.sweep(Duration::ZERO).await.unwrap();
        assert_eq!(swept.unjudged.len(), 1, "{:?}", swept.orphans);
        assert!(
            swept.unjudged[0].1.contains("older one"),
            "{:?}",
            swept.unjudged
        );
        assert_eq!(swept.deleted, 0);
    });
}

#[test]
fn altered_swapped_or_missing_objects_never_read_back() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        s.write_chunks(vec![(1, chunk(1)), (2, chunk(2))])
            .await
            .unwrap();
        let root = s.flush().await.unwrap().unwrap();
        let c1 = named(&mem, "team/c/000000000001/0000000000000001.").await;
        let c2 = named(&mem, "team/c/000000000002/0000000000000001.").await;
        // One flipped byte.
        let mut bad = chunk(1);
        bad[100] ^= 1;
        mem.put(&c1, PutPayload::from(bad)).await.unwrap();
        assert!(matches!(
            s.read_chunk(1).await,
            Err(RemoteError::Tampered(_))
        ));
        // Chunk 2's bytes served as chunk 1.
        mem.put(&c1, PutPayload::from(chunk(2))).await.unwrap();
        assert!(matches!(
            s.read_chunk(1).await,
            Err(RemoteError::Tampered(_))
        ));
        // Far too large: refused before its body is read.
        mem.put(&c1, PutPayload::from(vec![1u8; 10 * CHUNK as usize]))
            .await
            .unwrap();
        let e = s.read_chunk(1).await.unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        // Missing.
        mem.delete(&c2).await.unwrap();
        assert!(matches!(
            s.read_chunk(2).await,
            Err(RemoteError::Tampered(_))
        ));
        // A page or the manifest altered: the open is refused.
        let page = named(&mem, "team/p/00000000/0000000000000001.").await;
        let mut p = mem
            .get(&page)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        p[30] ^= 1;
        mem.put(&page, PutPayload::from(p)).await.unwrap();
        let r = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false).await;
        assert!(matches!(r, Err(RemoteError::Tampered(_))), "{r:?}");
        let m = Path::from("team/manifest");
        let mut b = mem.get(&m).await.unwrap().bytes().await.unwrap().to_vec();
        b[40] ^= 1;
        mem.put(&m, PutPayload::from(b)).await.unwrap();
        let r = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false).await;
        assert!(matches!(r, Err(RemoteError::Tampered(_))), "{r:?}");
        // Another vault's key: nothing verifies.
        let other = IntegrityKey::generate().unwrap();
        let r = ChunkStore::open(objects(&mem), PREFIX, VAULT, other, None, false).await;
        assert!(matches!(r, Err(RemoteError::Tampered(_))), "{r:?}");
    });
}

/// Stores made before keyed-BLAKE3 chunk MACs (HMAC-SHA256, manifest
/// `CFRMANI1`) open, read, take writes and stay what they are; new ones
/// are made with keyed BLAKE3 (`CFRMANI2`). Each verifies its chunks its
/// own way: a flipped byte is caught in both.
#[test]
fn stores_made_with_hmac_chunk_macs_keep_them_and_new_ones_use_blake3() {
    use coffre_remote::integrity::ChunkMac;
    let rt = rt();
    let keys = Keyring::new();
    rt.block_on(async {
        for (how, magic) in [
            (ChunkMac::HmacSha256, b"CFRMANI1"),
            (ChunkMac::Blake3, b"CFRMANI2"),
        ] {
            let mem = Arc::new(InMemory::new());
            let manifest = async |mem: &InMemory| {
                let m = Path::from("team/manifest");
                mem.get(&m).await.unwrap().bytes().await.unwrap().to_vec()
            };
            let (mut s, _) = if how == ChunkMac::NEW {
                ChunkStore::create(objects(&mem), PREFIX, VAULT, keys.key(), geometry())
                    .await
                    .unwrap()
            } else {
                created_with(objects(&mem), &keys, geometry(), how).await
            };
            assert_eq!(s.chunk_mac(), how);
            s.write_chunks(vec![(1, chunk(1)), (2, chunk(2))])
                .await
                .unwrap();
            let root = s.flush().await.unwrap().unwrap();
            let m = manifest(&mem).await;
            assert_eq!(&m[..8], magic);
            // The table lists, for chunk 1, the MAC of this kind (and not
            // of the other) over its bytes where they are stored.
            let (decoded, _) =
                coffre_remote::layout::Manifest::decode(&m, &keys.key(), &VAULT).unwrap();
            let page = named(&mem, "team/p/00000000/").await;
            let page = mem.get(&page).await.unwrap().bytes().await.unwrap();
            let page = coffre_remote::layout::Page::decode(
                &page,
                &keys.key(),
                &VAULT,
                (0, geometry().chunks() as usize),
                &decoded.pages[0],
            )
            .unwrap();
            let e = page.entries[1];
            let other = match how {
                ChunkMac::HmacSha256 => ChunkMac::Blake3,
                ChunkMac::Blake3 => ChunkMac::HmacSha256,
            };
            let key = keys.key();
            assert_eq!(
                e.mac,
                key.chunk_mac(how, &VAULT, (1, e.version, e.session), &chunk(1))
            );
            assert_ne!(
                e.mac,
                key.chunk_mac(other, &VAULT, (1, e.version, e.session), &chunk(1))
            );
            // Opened again: the same kind, the chunks verify, and what it
            // writes next keeps it.
            let (mut s, _) =
                ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false)
                    .await
                    .unwrap();
            assert_eq!(s.chunk_mac(), how);
            assert_eq!(s.read_chunk(1).await.unwrap(), chunk(1));
            s.write_chunks(vec![(3, chunk(3))]).await.unwrap();
            let root = s.flush().await.unwrap().unwrap();
            assert_eq!(&manifest(&mem).await[..8], magic);
            let (s, _) =
                ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false)
                    .await
                    .unwrap();
            assert_eq!(s.read_chunk(3).await.unwrap(), chunk(3));
            assert_eq!(s.read_chunk(2).await.unwrap(), chunk(2));
            let c2 = named(&mem, "team/c/000000000002/0000000000000001.").await;
            let mut bad = chunk(2);
            bad[CHUNK as usize - 1] ^= 0x80;
            mem.put(&c2, PutPayload::from(bad)).await.unwrap();
            assert!(
                matches!(s.read_chunk(2).await, Err(RemoteError::Tampered(_))),
                "{how:?}"
            );
        }
    });
}

#[test]
fn a_whole_store_rolled_back_is_refused_at_open() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        s.flush().await.unwrap();
        // Yesterday's bucket: consistent, authentic, older.
        let yesterday = snapshot(&mem).await;
        s.write_chunks(vec![(0, chunk(2))]).await.unwrap();
        let today = s.flush().await.unwrap().unwrap();
        assert_eq!(today.epoch, 2);
        restore(&mem, &yesterday).await;
        let r =
            ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(today), false).await;
        assert_eq!(
            r.as_ref().err(),
            Some(&RemoteError::Rollback { store: 1, local: 2 })
        );
        assert!(r.err().unwrap().to_string().contains("rolled back"));
        // Without the local root (a lost control directory) it would open:
        // that is what the root protects. --trust-store-epoch opens it
        // knowingly.
        let (s1, opened) =
            ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(today), true)
                .await
                .unwrap();
        assert_eq!(opened.root.epoch, 1);
        assert_eq!(s1.read_chunk(0).await.unwrap(), chunk(1));
        // The same epoch with another manifest: a fork.
        let forged = Root {
            epoch: 1,
            mac: [9; 32],
        };
        let r = ChunkStore::open(
            objects(&mem),
            PREFIX,
            VAULT,
            keys.key(),
            Some(forged),
            false,
        )
        .await;
        assert_eq!(r.err(), Some(RemoteError::Forked { epoch: 1 }));
        // An empty bucket where the vault wrote: said so.
        restore(&mem, &BTreeMap::new()).await;
        let r =
            ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(today), false).await;
        assert_eq!(r.err(), Some(RemoteError::Empty { local: Some(2) }));
    });
}

#[test]
fn one_chunk_rolled_back_is_refused_on_read() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        s.write_chunks(vec![(3, chunk(1))]).await.unwrap();
        s.flush().await.unwrap();
        let old = mem
            .get(&named(&mem, "team/c/000000000003/0000000000000001.").await)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        s.write_chunks(vec![(3, chunk(2))]).await.unwrap();
        let root = s.flush().await.unwrap().unwrap();
        // The provider serves the old version under the new name.
        mem.put(
            &named(&mem, "team/c/000000000003/0000000000000002.").await,
            PutPayload::from(old),
        )
        .await
        .unwrap();
        let (s2, _) = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false)
            .await
            .unwrap();
        assert!(matches!(
            s2.read_chunk(3).await,
            Err(RemoteError::Tampered(_))
        ));
        // And an old page under the new page's name fails the open.
        let p1 = mem
            .get(&named(&mem, "team/p/00000000/0000000000000001.").await)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        mem.put(
            &named(&mem, "team/p/00000000/0000000000000002.").await,
            PutPayload::from(p1),
        )
        .await
        .unwrap();
        let r = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false).await;
        assert!(matches!(r, Err(RemoteError::Tampered(_))), "{r:?}");
    });
}

#[test]
fn a_second_writer_is_fenced() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut a = created(objects(&mem), &keys).await;
        a.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        let ra = a.flush().await.unwrap().unwrap();
        // B opens after A's manifest (another host with the same vault),
        // writes and flushes first.
        let (mut b, _) =
            ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(ra), false)
                .await
                .unwrap();
        b.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        let rb = b.flush().await.unwrap().unwrap();
        // A's next flush finds B's manifest: fenced, loudly, for good.
        a.write_chunks(vec![(2, chunk(3))]).await.unwrap();
        assert_eq!(a.flush().await, Err(RemoteError::Fenced));
        assert!(a.is_fenced());
        assert_eq!(
            a.write_chunks(vec![(2, chunk(3))]).await,
            Err(RemoteError::Fenced)
        );
        // B's state is what the store holds; A's last chunk never counted.
        let (s, _) = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(rb), false)
            .await
            .unwrap();
        assert_eq!(s.read_chunk(1).await.unwrap(), chunk(2));
        assert_eq!(s.read_chunk(2).await.unwrap(), chunk(0));
    });
}

/// Faults around a real store: the next `fail_before` operations fail
/// before reaching it; with `lose_manifest_reply`, the next manifest put
/// reaches it and its answer is lost.
struct Faulty {
    inner: Arc<dyn Objects>,
    fail_before: AtomicU32,
    lose_manifest_reply: AtomicU32,
    /// The next manifest put lands and answers "precondition failed" (a
    /// client retry of a put that had landed).
    refuse_after_landing: AtomicU32,
    /// Every name put so far, but the manifest's and the probe's, and its
    /// bytes: none may be put twice with other bytes (a mirror being
    /// brought back, or repaired, is given the same bytes again).
    names: Mutex<BTreeMap<String, Bytes>>,
}

impl Faulty {
    fn new(inner: Arc<dyn Objects>) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            fail_before: AtomicU32::new(0),
            lose_manifest_reply: AtomicU32::new(0),
            refuse_after_landing: AtomicU32::new(0),
            names: Mutex::new(BTreeMap::new()),
        })
    }
    fn failing(&self) -> bool {
        self.fail_before
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl Objects for Faulty {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(async move {
            if self.failing() {
                return Err(StoreError::Other("injected: connection reset".into()));
            }
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
            if self.failing() {
                return Err(StoreError::Other("injected: 503".into()));
            }
            if !key.ends_with("manifest") && !key.contains("/probe/") {
                let before = self
                    .names
                    .lock()
                    .unwrap()
                    .insert(key.to_string(), data.clone());
                assert!(
                    before.is_none_or(|b| b == data),
                    "{key} put twice with other bytes: a late or retried put could land on it"
                );
            }
            let r = self.inner.put(key, data, mode).await;
            if key.ends_with("manifest")
                && r.is_ok()
                && self
                    .refuse_after_landing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(StoreError::Precondition);
            }
            if key.ends_with("manifest")
                && self
                    .lose_manifest_reply
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(StoreError::Other("injected: reply lost".into()));
            }
            r
        })
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if self.failing() {
                return Err(StoreError::Other("injected: timeout".into()));
            }
            self.inner.delete(key).await
        })
    }
    fn list<'a>(&'a self, prefix: &'a str, max: usize, keep: Keep<'a>) -> BoxFuture<'a, Listing> {
        Box::pin(async move {
            if self.failing() {
                return Err(StoreError::Other("injected: 500".into()));
            }
            self.inner.list(prefix, max, keep).await
        })
    }
    common::forward!(durable, prepare, opened);
}

#[test]
fn a_manifest_put_whose_answer_is_lost_is_settled_before_anything_else() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let faulty = Faulty::new(objects(&mem));
    rt.block_on(async {
        let mut s = created(faulty.clone(), &keys).await;
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        faulty.lose_manifest_reply.store(1, Ordering::SeqCst);
        assert!(matches!(s.flush().await, Err(RemoteError::Store(_))));
        // It did happen: the next write settles that first, and writes
        // under the next epoch (never over a chunk the store's manifest
        // names).
        s.write_chunks(vec![(0, chunk(2))]).await.unwrap();
        let root = s.flush().await.unwrap().unwrap();
        assert_eq!(root.epoch, 2);
        let (s2, _) = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false)
            .await
            .unwrap();
        assert_eq!(s2.read_chunk(0).await.unwrap(), chunk(2));
        // A put that failed before reaching the store: retried as is.
        s.write_chunks(vec![(1, chunk(3))]).await.unwrap();
        faulty.fail_before.store(1, Ordering::SeqCst);
        assert!(s.flush().await.is_err());
        let root = s.flush().await.unwrap().unwrap();
        assert_eq!(root.epoch, 3);
        // A manifest put that landed and was retried by the client, the
        // retry refused: our own manifest, not another writer's.
        s.write_chunks(vec![(2, chunk(4))]).await.unwrap();
        faulty.refuse_after_landing.store(1, Ordering::SeqCst);
        let root = s.flush().await.unwrap().unwrap();
        assert_eq!(root.epoch, 4);
        assert!(!s.is_fenced());
        // One index twice in one write is refused.
        assert!(matches!(
            s.write_chunks(vec![(3, chunk(1)), (3, chunk(2))]).await,
            Err(RemoteError::Config(_))
        ));
    });
}

#[test]
fn superseded_versions_are_deleted_after_the_grace_period() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        for fill in 1..=3 {
            s.write_chunks(vec![(0, chunk(fill))]).await.unwrap();
            s.flush().await.unwrap();
        }
        let before = snapshot(&mem).await.len();
        // Within the grace period nothing goes.
        assert_eq!(
            s.collect_garbage(Duration::from_secs(3600)).await.unwrap(),
            0
        );
        assert_eq!(snapshot(&mem).await.len(), before);
        // Then the two older chunk versions and two older pages go.
        assert_eq!(s.collect_garbage(Duration::ZERO).await.unwrap(), 4);
        let names: Vec<String> = snapshot(&mem).await.into_keys().collect();
        assert_eq!(names.len(), 3, "{names:?}");
        named(&mem, "team/c/000000000000/0000000000000003.").await;
        named(&mem, "team/p/00000000/0000000000000003.").await;
        let (s2, _) = ChunkStore::open(
            objects(&mem),
            PREFIX,
            VAULT,
            keys.key(),
            Some(s.root()),
            false,
        )
        .await
        .unwrap();
        assert_eq!(s2.read_chunk(0).await.unwrap(), chunk(3));
    });
}

/// A store that says yes to everything, conditions included: refused.
struct Unconditional(Mutex<BTreeMap<String, Bytes>>);

impl Objects for Unconditional {
    fn get<'a>(
        &'a self,
        key: &'a str,
        _max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(async move {
            Ok(self.0.lock().unwrap().get(key).map(|b| {
                (
                    b.clone(),
                    Tag {
                        e_tag: Some("x".into()),
                        version: None,
                    },
                )
            }))
        })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        _mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(async move {
            self.0.lock().unwrap().insert(key.to_string(), data);
            Ok(Tag {
                e_tag: Some("x".into()),
                version: None,
            })
        })
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.0.lock().unwrap().remove(key);
            Ok(())
        })
    }
    fn durable(&self, _names: &mut dyn Iterator<Item = coffre_remote::layout::Name>) {}
    fn prepare<'a>(
        &'a self,
        _geometry: &'a coffre_remote::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async { Ok(()) })
    }
    fn opened<'a>(
        &'a self,
        _geometry: &'a coffre_remote::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async { Ok(()) })
    }
    fn list<'a>(
        &'a self,
        _prefix: &'a str,
        _max: usize,
        _keep: Keep<'a>,
    ) -> BoxFuture<'a, Listing> {
        Box::pin(async { Ok(None) })
    }
}

#[test]
fn a_store_without_conditional_writes_is_refused() {
    let rt = rt();
    let keys = Keyring::new();
    let store: Arc<dyn Objects> = Arc::new(Unconditional(Mutex::new(BTreeMap::new())));
    let r = rt.block_on(ChunkStore::create(
        store,
        PREFIX,
        VAULT,
        keys.key(),
        geometry(),
    ));
    assert!(
        matches!(r, Err(RemoteError::NoConditionalWrites(_))),
        "{r:?}"
    );
    // The in-memory store honours them.
    let mem = Arc::new(InMemory::new());
    rt.block_on(coffre_remote::store::check_conditional_writes(
        objects(&mem).as_ref(),
        &coffre_remote::layout::Keys::new(PREFIX),
    ))
    .unwrap();
    assert!(
        rt.block_on(snapshot(&mem)).is_empty(),
        "the probe is cleaned up"
    );
}

#[test]
fn the_device_reads_what_was_written_across_chunks_and_keeps_its_root() {
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let store = rt()
        .block_on(ChunkStore::create(
            objects(&mem),
            PREFIX,
            VAULT,
            keys.key(),
            geometry(),
        ))
        .unwrap()
        .0;
    let roots = Arc::new(Mutex::new(Vec::new()));
    let kept = roots.clone();
    // A buffer of two chunks: writes spill to the store before the flush.
    let dev = RemoteDevice::new(
        store,
        2 * CHUNK as usize,
        Box::new(move |r| {
            kept.lock().unwrap().push(r);
            Ok(())
        }),
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let writes: [(u64, usize, u8); 5] = [
        (100, 10, 1),
        (65530, 20, 2),
        (3 * 65536, 65536, 3),
        (5 * 65536 - 4096, 3 * 4096, 4),
        (SIZE - 512, 512, 5),
    ];
    for (off, len, fill) in writes {
        let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
        dev.write_at(off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let mut all = vec![0u8; SIZE as usize];
    dev.read_at(0, &mut all).unwrap();
    assert!(all == model);
    assert!(dev.write_at(SIZE - 1, &[0, 0]).is_err(), "past the end");
    dev.flush().unwrap();
    let root = *roots.lock().unwrap().last().unwrap();
    assert_eq!(root, dev.root());
    // What the store holds now, opened afresh, is the model.
    drop(dev);
    let store = rt().block_on(opened(objects(&mem), &keys, root)).unwrap();
    let dev = RemoteDevice::new(store, 1 << 20, Box::new(|_| Ok(()))).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    dev.read_at(0, &mut all).unwrap();
    assert!(all == model);
}

/// The device's thread sweeps on its own (here at once, objects of any
/// age, where the daemon waits 10 minutes and a day): an upload a crash
/// cut short goes, the sweep is reported, the volume reads whole.
#[test]
fn the_device_thread_sweeps_orphans_on_its_own() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let (store, orphan) = rt.block_on(async {
        let mut s = created(objects(&mem), &keys).await;
        kept(&mut s, vec![(1, chunk(1))]).await;
        let cut = s.prepare_chunks(vec![(2, chunk(2))]).await.unwrap();
        let orphan = cut.names().next().unwrap().clone();
        drop(cut.run().await);
        drop(cut);
        (s, orphan)
    });
    assert!(rt.block_on(snapshot(&mem)).contains_key(&orphan));
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let hk = coffre_remote::Housekeeping {
        sweep_first: Duration::ZERO,
        sweep_min_age: Duration::ZERO,
        ..coffre_remote::Housekeeping::default()
    };
    let dev = RemoteDevice::with_housekeeping(
        store,
        1 << 20,
        Box::new(|_| Ok(())),
        Some(Box::new(move |ev, _| {
            seen.lock().unwrap().extend(ev.iter().cloned());
        })),
        hk,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !events
        .lock()
        .unwrap()
        .contains(&coffre_remote::StoreEvent::Swept { orphans: 1 })
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no sweep: {:?}",
            events.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!rt.block_on(snapshot(&mem)).contains_key(&orphan));
    let mut all = vec![0u8; 3 * CHUNK as usize];
    dev.read_at(0, &mut all).unwrap();
    assert_eq!(all, [chunk(0), chunk(1), chunk(0)].concat());
}

#[test]
fn a_root_that_could_not_be_kept_is_offered_again() {
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let store = rt()
        .block_on(ChunkStore::create(
            objects(&mem),
            PREFIX,
            VAULT,
            keys.key(),
            geometry(),
        ))
        .unwrap()
        .0;
    let kept = Arc::new(Mutex::new(Vec::new()));
    let fail = Arc::new(AtomicU32::new(1));
    let (k, f) = (kept.clone(), fail.clone());
    let dev = RemoteDevice::new(
        store,
        1 << 20,
        Box::new(move |r| {
            if f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(std::io::Error::other("disk full"));
            }
            k.lock().unwrap().push(r);
            Ok(())
        }),
    )
    .unwrap();
    dev.write_at(0, &[1; 4096]).unwrap();
    // Durable on the store, but not kept locally: the flush fails...
    assert!(dev.flush().is_err());
    assert!(kept.lock().unwrap().is_empty());
    // ...and the next one, with nothing new to write, keeps it.
    dev.flush().unwrap();
    assert_eq!(*kept.lock().unwrap(), vec![dev.root()]);
    assert_eq!(dev.root().epoch, 1);
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: usize,
        fill: u8,
    },
    Flush,
    Crash,
    Fail(u32),
    /// With a mirror: it fails the next requests.
    FailMirror(u32),
    LoseManifestReply,
    RefuseAfterLanding,
    /// Orphans swept at once (no age asked).
    Sweep,
    /// The whole volume read and checked (after every step too, unless
    /// the history leaves partly written chunks for the flushes).
    Read,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE, 1..100_000usize, any::<u8>()).prop_map(|(off, len, fill)| {
            let len = len.min((SIZE - off) as usize);
            Op::Write { off, len, fill }
        }),
        3 => Just(Op::Flush),
        1 => Just(Op::Crash),
        2 => (1..4u32).prop_map(Op::Fail),
        2 => (1..12u32).prop_map(Op::FailMirror),
        1 => Just(Op::LoseManifestReply),
        1 => Just(Op::RefuseAfterLanding),
        2 => Just(Op::Sweep),
        1 => Just(Op::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random histories over a store that fails: after a crash (the
    /// process gone, its buffer lost) the volume reads back as it was at
    /// the last flush that returned, or at a flush that failed since
    /// (its manifest put landed, the answer was lost); before a crash, as
    /// written by the writes that returned (one that fails changes
    /// nothing). A read never returns other bytes.
    #[test]
    fn reads_are_what_was_flushed_or_an_error(ops in proptest::collection::vec(op(), 1..40)) {
        history(ops, false, true)?;
    }

    /// The same without a read after every step: a chunk written in part
    /// is left for a flush, a spill or a read to fetch (a read after
    /// every step fetches it at once).
    #[test]
    fn parts_left_for_the_flush_read_back_as_written(ops in proptest::collection::vec(op(), 1..40)) {
        history(ops, false, false)?;
    }

    /// The same over a primary and a mirror that both fail at random: the
    /// mirror goes stale and is brought back by the device's thread, and
    /// nothing read back is ever other than what was written or flushed.
    #[test]
    fn with_a_mirror_reads_are_what_was_flushed_or_an_error(ops in proptest::collection::vec(op(), 1..40)) {
        history(ops, true, true)?;
    }

    /// With a mirror, without a read after every step.
    #[test]
    fn with_a_mirror_parts_left_for_the_flush_read_back_as_written(ops in proptest::collection::vec(op(), 1..40)) {
        history(ops, true, false)?;
    }
}

fn history(ops: Vec<Op>, mirrored: bool, read_each_step: bool) -> Result<(), TestCaseError> {
    {
        let mem = Arc::new(InMemory::new());
        let keys = Keyring::new();
        let faulty = Faulty::new(objects(&mem));
        let mirror = Faulty::new(objects(&Arc::new(InMemory::new())));
        let backends = || {
            let mut b = vec![coffre_remote::Backend {
                name: "primary".into(),
                objects: faulty.clone(),
            }];
            if mirrored {
                b.push(coffre_remote::Backend {
                    name: "mirror".into(),
                    objects: mirror.clone(),
                });
            }
            b
        };
        let settings = coffre_remote::MirrorSettings {
            degrade_after: Duration::from_secs(5),
            retry_after: Duration::ZERO,
            read_only: false,
        };
        let store = rt()
            .block_on(ChunkStore::create_mirrored(
                backends(),
                settings,
                PREFIX,
                (VAULT, keys.key()),
                geometry(),
            ))
            .unwrap()
            .0;
        let root = Arc::new(Mutex::new(store.root()));
        let mut dev = RemoteDevice::new(store, 3 * CHUNK as usize, keeping(&root)).unwrap();
        // What was written (the device's view), what the last returned
        // flush made durable, and what each flush that failed since may
        // have made durable (its manifest put reached the store and the
        // answer was lost).
        let mut written = vec![0u8; SIZE as usize];
        let mut durable = written.clone();
        let mut maybe: Vec<Vec<u8>> = Vec::new();
        // Each history ends with a crash: what a fresh open reads is
        // checked (an object deleted that the store needed shows there).
        for op in ops.into_iter().chain([Op::Crash]) {
            match op {
                Op::Write { off, len, fill } => {
                    let data = vec![fill; len];
                    // A write that fails changes nothing.
                    if dev.write_at(off, &data).is_ok() {
                        written[off as usize..off as usize + len].copy_from_slice(&data);
                    }
                }
                Op::Flush => match dev.flush() {
                    Ok(()) => {
                        durable = written.clone();
                        maybe.clear();
                    }
                    Err(_) => maybe.push(written.clone()),
                },
                Op::Read => {}
                Op::Fail(n) => faulty.fail_before.store(n, Ordering::SeqCst),
                Op::FailMirror(n) => mirror.fail_before.store(n, Ordering::SeqCst),
                Op::LoseManifestReply => faulty.lose_manifest_reply.store(1, Ordering::SeqCst),
                Op::RefuseAfterLanding => faulty.refuse_after_landing.store(1, Ordering::SeqCst),
                // It may fail (the stores fail at random); whatever it
                // deleted, every read after, and the state after the
                // crash that ends each history, must be as before.
                Op::Sweep => {
                    // Judged everywhere unless a store failed (or a
                    // manifest put's outcome is unknown): never another
                    // reason.
                    if let Ok(swept) = dev.sweep(Duration::ZERO) {
                        for (store, why) in &swept.unjudged {
                            prop_assert!(
                                why.contains("injected")
                                    || why.contains("unknown")
                                    || why.contains("in step"),
                                "{store} not judged: {why}"
                            );
                        }
                    }
                }
                Op::Crash => {
                    faulty.fail_before.store(0, Ordering::SeqCst);
                    faulty.lose_manifest_reply.store(0, Ordering::SeqCst);
                    faulty.refuse_after_landing.store(0, Ordering::SeqCst);
                    mirror.fail_before.store(0, Ordering::SeqCst);
                    drop(dev);
                    let local = *root.lock().unwrap();
                    let (store, opened) = rt()
                        .block_on(ChunkStore::open_mirrored(
                            backends(),
                            settings,
                            PREFIX,
                            (VAULT, keys.key()),
                            (Some(local), false),
                        ))
                        .unwrap();
                    prop_assert!(opened.ahead_by <= 1);
                    *root.lock().unwrap() = opened.root;
                    dev = RemoteDevice::new(store, 3 * CHUNK as usize, keeping(&root)).unwrap();
                    let mut now = vec![0u8; SIZE as usize];
                    dev.read_at(0, &mut now).unwrap();
                    let ok = now == durable || maybe.contains(&now);
                    prop_assert!(
                        ok,
                        "after a crash the volume is neither the last flushed state nor the one whose flush answer was lost"
                    );
                    durable = now.clone();
                    written = now;
                    maybe.clear();
                }
            }
            // Whatever happened, a read never returns other bytes than the
            // device's own view.
            if read_each_step || matches!(op, Op::Read) {
                let mut now = vec![0u8; SIZE as usize];
                if dev.read_at(0, &mut now).is_ok() {
                    prop_assert!(now == written);
                }
            }
        }
    }
    Ok(())
}

/// A data segment with some chunks of zeros, some of a pattern.
fn local_image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("volume.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, fill) in [(0u64, 7u8), (2, 9), (3, 0), (6, 1)] {
        let data: Vec<u8> = (0..CHUNK as usize)
            .map(|k| fill.wrapping_mul((k % 251) as u8))
            .collect();
        f.write_all_at(&data, i * u64::from(CHUNK)).unwrap();
    }
    // A few bytes in the middle of an otherwise empty chunk.
    f.write_all_at(b"tail", 5 * u64::from(CHUNK) + 1000)
        .unwrap();
    path
}

#[test]
fn migrate_then_export_is_byte_identical_and_a_resumed_migration_skips_what_is_there() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let src = local_image(dir.path());
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let faulty = Faulty::new(objects(&mem));
    rt.block_on(async {
        let mut s = created(faulty.clone(), &keys).await;
        let file = std::fs::File::open(&src).unwrap();
        // Interrupted: the store fails after the first few puts.
        let mut seen = Vec::new();
        s.write_chunks(vec![(0, {
            let mut d = vec![0u8; CHUNK as usize];
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut d, 0).unwrap();
            d
        })])
        .await
        .unwrap();
        s.flush().await.unwrap();
        faulty.fail_before.store(1, Ordering::SeqCst);
        assert!(
            coffre_remote::transfer::import(&mut s, &file, |_, _| ())
                .await
                .is_err()
        );
        // Run again: what is there already is skipped (checked by MAC):
        // chunk 0, and chunks 5 and 6, which went up in the batch whose
        // first put (chunk 2's) failed; chunks of zeros (1, 3, 4, 7) are
        // not stored; chunk 2 goes up.
        let done = coffre_remote::transfer::import(&mut s, &file, |d, t| seen.push((d, t)))
            .await
            .unwrap();
        assert_eq!(
            done,
            coffre_remote::transfer::Imported {
                uploaded: 1,
                already: 3,
                zero: 4
            }
        );
        assert_eq!(seen.last(), Some(&(8, 8)));
        // Nothing of the zeros on the store.
        let snap = snapshot(&mem).await;
        assert!(!snap.keys().any(|k| k.starts_with("team/c/000000000003/")));
        // Export: the same bytes as the local segment.
        let root = s.root();
        let (s2, _) = ChunkStore::open(objects(&mem), PREFIX, VAULT, keys.key(), Some(root), false)
            .await
            .unwrap();
        let out_path = dir.path().join("export.img");
        let out = std::fs::File::create(&out_path).unwrap();
        coffre_remote::transfer::export(&s2, &out, |_, _| ())
            .await
            .unwrap();
        assert!(std::fs::read(&out_path).unwrap() == std::fs::read(&src).unwrap());
        // An export never writes what does not verify.
        let c6 = named(&mem, "team/c/000000000006/").await;
        mem.put(&c6, PutPayload::from(chunk(6))).await.unwrap();
        let out = std::fs::File::create(dir.path().join("bad.img")).unwrap();
        assert!(matches!(
            coffre_remote::transfer::export(&s2, &out, |_, _| ()).await,
            Err(RemoteError::Tampered(_))
        ));
    });
}

/// Counts the gets of chunks: how many were asked for, and the most at
/// once (each held a little, as a remote store would).
struct Counting {
    inner: Arc<dyn Objects>,
    asked: std::sync::atomic::AtomicUsize,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl Objects for Counting {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(async move {
            if !key.contains("/c/") {
                return self.inner.get(key, max).await;
            }
            self.asked.fetch_add(1, Ordering::SeqCst);
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = self.inner.get(key, max).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            r
        })
    }
    common::forward!(put, delete, durable, prepare, opened, list);
}

/// Sequential reads keep the read-ahead window (16 chunks here) on its
/// way, one more chunk leaving as each is read: never more than the window
/// ahead of the reader, never more than the window at once, and each chunk
/// fetched once. (Fetched a window at a time, as before 2026-12-04, the
/// reader at a window's first chunk had two windows asked for.)
/// Both kinds of chunk MAC: a read-ahead that verified with the wrong one
/// would fetch every chunk twice.
#[test]
fn sequential_reads_keep_the_read_ahead_window_full_and_no_more() {
    use coffre_remote::integrity::ChunkMac;
    for how in [ChunkMac::HmacSha256, ChunkMac::Blake3] {
        read_ahead_shape(how);
    }
}

fn read_ahead_shape(how: coffre_remote::integrity::ChunkMac) {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let chunks = 64u64;
    let g = coffre_remote::Geometry::new(CHUNK, chunks * u64::from(CHUNK)).unwrap();
    let root = rt.block_on(async {
        let (mut s, _) = created_with(objects(&mem), &keys, g, how).await;
        s.write_chunks(
            (0..chunks)
                .map(|i| (i, chunk(u8::try_from(i).unwrap())))
                .collect(),
        )
        .await
        .unwrap();
        s.flush().await.unwrap().unwrap()
    });
    let (counting, store) = counting_store(&rt, &mem, &keys, root);
    // A buffer that holds every chunk (nothing is fetched twice for want
    // of room); the window is 16 chunks.
    let dev = RemoteDevice::new(
        store,
        (chunks * u64::from(CHUNK)) as usize,
        Box::new(|_| Ok(())),
    )
    .unwrap();
    let window = 16;
    let mut buf = vec![0u8; CHUNK as usize];
    for k in 0..chunks {
        dev.read_at(k * u64::from(CHUNK), &mut buf).unwrap();
        assert_eq!(buf, chunk(u8::try_from(k).unwrap()), "chunk {k}");
        let asked = counting.asked.load(Ordering::SeqCst) as u64;
        assert!(
            asked <= k + 1 + window,
            "after chunk {k}: {asked} chunks asked for, more than the window ahead"
        );
    }
    drop(dev);
    assert_eq!(
        counting.asked.load(Ordering::SeqCst) as u64,
        chunks,
        "{how:?}"
    );
    // The chunk read and the window after it (at least half of it at
    // once: on a loaded machine a task may start after others ended).
    let most = counting.most.load(Ordering::SeqCst) as u64;
    assert!(
        (window / 2..=window + 1).contains(&most),
        "{how:?}: {most} chunks asked for at once"
    );
}

/// Chunks written in part are fetched ahead of sequential reads as the
/// others are (before, each was fetched on its own when read): each once,
/// several at a time, and what reads back is each part over what the
/// store held.
#[test]
fn parts_are_fetched_ahead_of_sequential_reads() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let chunks = 16u64;
    let c = u64::from(CHUNK);
    let cu = CHUNK as usize;
    let root = stored(&rt, &mem, &keys, chunks);
    let (counting, store) = counting_store(&rt, &mem, &keys, root);
    // A buffer of 64 chunks: a window of 16, and no background upload (it
    // would fetch the parts) before 16 chunks are dirty. Every chunk but
    // the last is written in part: what is fetched ahead is parts.
    let dev = RemoteDevice::new(store, 64 * cu, Box::new(|_| Ok(()))).unwrap();
    let parts = chunks - 1;
    let mut model: Vec<u8> = (0..parts).flat_map(|i| chunk(i as u8)).collect();
    for i in 0..parts {
        dev.write_at(i * c + 100, &[0xa0 | i as u8; 30]).unwrap();
        model[(i * c) as usize + 100..(i * c) as usize + 130].fill(0xa0 | i as u8);
    }
    assert_eq!(counting.asked.load(Ordering::SeqCst), 0);
    let mut buf = vec![0u8; cu];
    for i in 0..parts {
        dev.read_at(i * c, &mut buf).unwrap();
        assert!(
            buf[..] == model[(i * c) as usize..((i + 1) * c) as usize],
            "chunk {i}"
        );
    }
    // Each chunk once: the parts and the last chunk, fetched ahead.
    let asked = counting.asked.load(Ordering::SeqCst) as u64;
    assert_eq!(asked, chunks, "chunks asked for to read {parts} parts");
    let most = counting.most.load(Ordering::SeqCst);
    assert!(most >= 4, "parts fetched {most} at a time");
}

/// A chunk written (and made durable, then pushed out of the buffer) while
/// its read-ahead was on its way is read as written: the bytes fetched
/// ahead were of the version before, and are dropped when they land.
#[test]
fn a_chunk_rewritten_while_its_read_ahead_is_on_its_way_reads_as_rewritten() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let chunks = 64u64;
    let c = u64::from(CHUNK);
    let g = coffre_remote::Geometry::new(CHUNK, chunks * c).unwrap();
    let root = rt.block_on(async {
        let (mut s, _) = ChunkStore::create(objects(&mem), PREFIX, VAULT, keys.key(), g)
            .await
            .unwrap();
        s.write_chunks((0..4).map(|i| (i, chunk(0x10 + i as u8))).collect())
            .await
            .unwrap();
        s.flush().await.unwrap().unwrap()
    });
    let (counting, store) = counting_store(&rt, &mem, &keys, root);
    // A buffer of 8 chunks: a read-ahead window of 2.
    let dev = RemoteDevice::new(store, 8 * CHUNK as usize, Box::new(|_| Ok(()))).unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    dev.read_at(0, &mut buf).unwrap();
    dev.read_at(c, &mut buf).unwrap();
    assert_eq!(buf, chunk(0x11));
    // Chunks 2 and 3 are on their way (20 ms each). Chunk 2 is rewritten
    // and made durable, then pushed out of the buffer by other chunks.
    dev.write_at(2 * c, &chunk(0xee)).unwrap();
    dev.flush().unwrap();
    for i in 40..56u64 {
        dev.write_at(i * c, &chunk(i as u8)).unwrap();
        dev.flush().unwrap();
    }
    let asked = counting.asked.load(Ordering::SeqCst);
    dev.read_at(2 * c, &mut buf).unwrap();
    assert!(
        buf == chunk(0xee),
        "the version fetched ahead was served (bytes {:#x})",
        buf[0]
    );
    assert_eq!(
        counting.asked.load(Ordering::SeqCst),
        asked + 1,
        "chunk 2 was read from the store again (it had left the buffer)"
    );
    dev.read_at(3 * c, &mut buf).unwrap();
    assert_eq!(buf, chunk(0x13));
}

/// The store at `root` opened through a [`Counting`] wrapper.
fn counting_store(
    rt: &tokio::runtime::Runtime,
    mem: &Arc<InMemory>,
    keys: &Keyring,
    root: Root,
) -> (Arc<Counting>, ChunkStore) {
    let counting = Arc::new(Counting {
        inner: objects(mem),
        asked: 0.into(),
        now: 0.into(),
        most: 0.into(),
    });
    let store = rt.block_on(opened(counting.clone(), keys, root)).unwrap();
    (counting, store)
}

/// A chunk written in parts is never fetched when the parts cover it
/// before anything needs the rest: a sequential writer whose requests are
/// half a chunk (as the loop device hands the daemon 512 KiB of a 1 MiB
/// write) over a volume already on the store reads nothing back. A part
/// whose chunk is then read, or uploaded, before the rest is written is
/// fetched once (the bytes written read back without it), and what reads
/// back, and what the store keeps, is the part over what was there.
#[test]
fn chunks_written_in_parts_are_fetched_only_when_their_rest_is_needed() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let chunks = 16u64;
    let c = u64::from(CHUNK);
    let cu = CHUNK as usize;
    let root = stored(&rt, &mem, &keys, chunks);
    let root = Arc::new(Mutex::new(root));
    // A device at the last root kept, through a store that counts the
    // chunks fetched; a buffer of 8 chunks (background uploads start at 2
    // dirty chunks, and the buffer spills while the halves come in).
    let device = || {
        let (counting, store) = counting_store(&rt, &mem, &keys, *root.lock().unwrap());
        let dev = RemoteDevice::new(store, 8 * cu, keeping(&root)).unwrap();
        (counting, dev)
    };
    let asked = |counting: &Counting| counting.asked.load(Ordering::SeqCst);
    let mut model: Vec<u8> = (0..chunks)
        .flat_map(|i| (0..cu).map(move |k| (i as u8) ^ (k as u8) ^ 0x5a))
        .collect();

    let (counting, dev) = device();
    for i in 0..chunks as usize {
        let (a, b) = model[i * cu..(i + 1) * cu].split_at(cu / 2);
        dev.write_at((i * cu) as u64, a).unwrap();
        dev.write_at((i * cu + cu / 2) as u64, b).unwrap();
    }
    dev.flush().unwrap();
    assert_eq!(
        asked(&counting),
        0,
        "a chunk written in two halves was fetched"
    );
    drop(dev);

    // A part, then reads: of the bytes written, without the store; of the
    // whole chunk, fetched once.
    let (counting, dev) = device();
    dev.write_at(3 * c + 100, &[0xee; 50]).unwrap();
    model[3 * cu + 100..3 * cu + 150].fill(0xee);
    let mut buf = vec![0u8; cu];
    dev.read_at(3 * c + 110, &mut buf[..20]).unwrap();
    assert_eq!(buf[..20], [0xee; 20]);
    assert_eq!(
        asked(&counting),
        0,
        "bytes written were read from the store"
    );
    drop(dev);
    let (counting, dev) = device();
    dev.write_at(3 * c + 100, &[0xee; 50]).unwrap();
    dev.read_at(3 * c, &mut buf).unwrap();
    assert!(buf[..] == model[3 * cu..4 * cu]);
    assert_eq!(asked(&counting), 1);
    dev.flush().unwrap();
    drop(dev);

    // Parts of three chunks (one write across two), then a flush: each
    // fetched once.
    let (counting, dev) = device();
    dev.write_at(5 * c + 7, &[0x11; 3]).unwrap();
    dev.write_at(10 * c - 2, &[0x22, 0x22, 0x33, 0x33]).unwrap();
    model[5 * cu + 7..5 * cu + 10].fill(0x11);
    model[10 * cu - 2..10 * cu + 2].copy_from_slice(&[0x22, 0x22, 0x33, 0x33]);
    dev.flush().unwrap();
    assert_eq!(asked(&counting), 3);
    drop(dev);

    // What the store holds, opened afresh.
    let (_, dev) = device();
    let mut all = vec![0u8; (chunks * c) as usize];
    dev.read_at(0, &mut all).unwrap();
    assert!(
        all == model,
        "the store does not hold the parts over what was there"
    );
}

/// A chunk written in part that the store can no longer give back (its
/// object gone) fails the flush, and only that: the writes to other
/// chunks go on, past the buffer's size (what is whole goes up and makes
/// room; parts of other chunks are fetched for it while this one waits
/// out its pause), reads of them too; once the object is back, the flush makes
/// everything durable, the part over what the chunk held.
#[test]
fn a_part_whose_chunk_cannot_be_fetched_fails_the_flush_and_holds_up_nothing_else() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let chunks = 16u64;
    let cu = CHUNK as usize;
    let root = stored(&rt, &mem, &keys, chunks);
    let mut model: Vec<u8> = (0..chunks).flat_map(|i| chunk(i as u8)).collect();
    let store = rt.block_on(opened(objects(&mem), &keys, root)).unwrap();
    let kept = Arc::new(Mutex::new(root));
    // A buffer of 4 chunks.
    let dev = RemoteDevice::new(store, 4 * cu, keeping(&kept)).unwrap();
    let (name, bytes) = rt.block_on(async {
        snapshot(&mem)
            .await
            .into_iter()
            .find(|(k, _)| k.contains("c/000000000002/"))
            .unwrap()
    });
    let path = Path::from(name.as_str());
    rt.block_on(mem.delete(&path)).unwrap();
    dev.write_at(2 * u64::from(CHUNK) + 10, &[0xaa; 20])
        .unwrap();
    model[2 * cu + 10..2 * cu + 30].fill(0xaa);
    assert!(
        dev.flush().is_err(),
        "a flush without chunk 2's rest returned"
    );
    for i in 4..12u64 {
        let data = chunk(0x80 | i as u8);
        dev.write_at(i * u64::from(CHUNK), &data).unwrap();
        model[i as usize * cu..(i as usize + 1) * cu].copy_from_slice(&data);
    }
    // Parts of other chunks, while chunk 2 waits: fetched and uploaded
    // to make room (chunk 2's pause holds up only chunk 2).
    for i in 12..16u64 {
        let at = i as usize * cu + 5;
        dev.write_at(at as u64, &[0x5a; 10]).unwrap();
        model[at..at + 10].fill(0x5a);
    }
    let mut buf = vec![0u8; cu];
    dev.read_at(5 * u64::from(CHUNK), &mut buf).unwrap();
    assert_eq!(buf, chunk(0x85));
    // The bytes written of chunk 2 read back; the rest cannot.
    dev.read_at(2 * u64::from(CHUNK) + 12, &mut buf[..8])
        .unwrap();
    assert_eq!(buf[..8], [0xaa; 8]);
    assert!(dev.read_at(2 * u64::from(CHUNK), &mut buf).is_err());
    assert!(dev.flush().is_err());
    rt.block_on(mem.put(&path, PutPayload::from(bytes)))
        .unwrap();
    dev.flush().unwrap();
    drop(dev);
    let store = rt
        .block_on(opened(objects(&mem), &keys, *kept.lock().unwrap()))
        .unwrap();
    let dev = RemoteDevice::new(store, 1 << 20, Box::new(|_| Ok(()))).unwrap();
    let mut all = vec![0u8; model.len()];
    dev.read_at(0, &mut all).unwrap();
    assert!(all == model);
}

/// A buffer full of chunks written in part that the store will not give
/// back fails the writes that need room, but does not have each of them
/// fetch every partial chunk again (a store refusing chunks would turn
/// each write into a buffer's worth of requests): the writes set off one
/// round of fetches per pause at most, a flush asked for tries at once,
/// and once the chunks are back everything is made durable.
#[test]
fn a_buffer_of_parts_the_store_refuses_is_not_fetched_again_on_every_write() {
    let rt = rt();
    let mem = Arc::new(InMemory::new());
    let keys = Keyring::new();
    let chunks = 16u64;
    let c = u64::from(CHUNK);
    let cu = CHUNK as usize;
    let root = stored(&rt, &mem, &keys, chunks);
    let mut model: Vec<u8> = (0..chunks).flat_map(|i| chunk(i as u8)).collect();
    let kept = Arc::new(Mutex::new(root));
    let (counting, store) = counting_store(&rt, &mem, &keys, root);
    // A buffer of 4 chunks.
    let dev = RemoteDevice::new(store, 4 * cu, keeping(&kept)).unwrap();
    let gone: Vec<(Path, Bytes)> = rt.block_on(async {
        let mut gone = Vec::new();
        for (name, bytes) in snapshot(&mem).await {
            if (0..6).any(|i| name.contains(&format!("c/{i:012}/"))) {
                let path = Path::from(name.as_str());
                mem.delete(&path).await.unwrap();
                gone.push((path, bytes));
            }
        }
        gone
    });
    assert_eq!(gone.len(), 6);
    let asked = || counting.asked.load(Ordering::SeqCst);
    // Five parts: the buffer's size and one more chunk.
    for i in 0..5u64 {
        dev.write_at(i * c + 10, &[0xa0 | i as u8; 20]).unwrap();
        model[(i * c) as usize + 10..(i * c) as usize + 30].fill(0xa0 | i as u8);
    }
    // A flush asked for tries at once: one round of fetches.
    let before = asked();
    assert!(
        dev.flush().is_err(),
        "a flush without the parts' rest returned"
    );
    let round = asked() - before;
    assert!(
        round >= 5,
        "the flush fetched {round} chunks, not the 5 parts"
    );
    // Writes that need room fail, each changing nothing, and fetch at most
    // one round per pause between them.
    let before = asked();
    let start = std::time::Instant::now();
    let attempts = 20;
    for _ in 0..attempts {
        assert!(dev.write_at(5 * c + 10, &[0xee; 20]).is_err());
    }
    let pauses = (start.elapsed().as_millis() / 1000) as usize;
    let fetched = asked() - before;
    assert!(
        fetched <= round * (1 + pauses),
        "{attempts} writes fetched {fetched} chunks in {} ms (one round is {round})",
        start.elapsed().as_millis()
    );
    // Back on the store: a flush makes the parts whole and durable, and
    // the writes go on.
    rt.block_on(async {
        for (path, bytes) in gone {
            mem.put(&path, PutPayload::from(bytes)).await.unwrap();
        }
    });
    dev.flush().unwrap();
    dev.write_at(5 * c + 10, &[0xee; 20]).unwrap();
    model[5 * cu + 10..5 * cu + 30].fill(0xee);
    dev.flush().unwrap();
    drop(dev);
    let store = rt
        .block_on(opened(objects(&mem), &keys, *kept.lock().unwrap()))
        .unwrap();
    let dev = RemoteDevice::new(store, 1 << 20, Box::new(|_| Ok(()))).unwrap();
    let mut all = vec![0u8; model.len()];
    dev.read_at(0, &mut all).unwrap();
    assert!(
        all == model,
        "the store does not hold the parts over what was there"
    );
}

/// A device's `on_root` that keeps each root it makes durable in `root`.
fn keeping(root: &Arc<Mutex<Root>>) -> coffre_remote::device::OnRoot {
    let r = root.clone();
    Box::new(move |new| {
        *r.lock().unwrap() = new;
        Ok(())
    })
}

/// A store of `chunks` chunks in `mem`, chunk `i` all bytes `i`, flushed:
/// its root.
fn stored(rt: &tokio::runtime::Runtime, mem: &Arc<InMemory>, keys: &Keyring, chunks: u64) -> Root {
    let g = coffre_remote::Geometry::new(CHUNK, chunks * u64::from(CHUNK)).unwrap();
    rt.block_on(async {
        let (mut s, _) = ChunkStore::create(objects(mem), PREFIX, VAULT, keys.key(), g)
            .await
            .unwrap();
        s.write_chunks((0..chunks).map(|i| (i, chunk(i as u8))).collect())
            .await
            .unwrap();
        s.flush().await.unwrap().unwrap()
    })
}

//! The chunk store on a block device, in the slot layout (over a block
//! device in memory here; over nbdkit and qemu-nbd in tests/nbd.rs): the
//! same guarantees as on an object store. Round trip; a new version never
//! overwrites the durable one before a newer manifest names its
//! successor; a torn manifest leaves the one before; a whole-device
//! rollback refused at open; one chunk rolled back (its header forged)
//! refused on read; a second writer fenced.

// Sizes and chunk numbers here are small constants.
#![allow(clippy::cast_possible_truncation)]

use coffre_remote::blocks::{BlockObjects, MemBlocks};
use coffre_remote::store::{Backend, MirrorSettings};
use coffre_remote::{ChunkStore, Objects, RemoteError, Root};
use std::sync::Arc;

mod common;
use common::*;

/// A device in memory, large enough for the test volume's slots.
fn device() -> Arc<MemBlocks> {
    Arc::new(MemBlocks::new(2 * SIZE as usize + (4 << 20)))
}

async fn formatted(dev: &Arc<MemBlocks>) -> Arc<BlockObjects> {
    let o = Arc::new(BlockObjects::new(dev.clone()));
    o.format(&geometry()).await.unwrap();
    o
}

async fn open(dev: &Arc<MemBlocks>, keys: &Keyring, root: Root) -> Result<ChunkStore, RemoteError> {
    opened(Arc::new(BlockObjects::new(dev.clone())), keys, root).await
}

/// Where `needle` (a chunk's bytes) sits on the device.
fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    (0..=hay.len() - needle.len())
        .step_by(4096)
        .filter(|i| &hay[*i..*i + needle.len()] == needle)
        .collect()
}

#[test]
fn the_chunk_store_round_trips_on_slots_and_never_overwrites_what_is_durable() {
    let rt = rt();
    let dev = device();
    let keys = Keyring::new();
    rt.block_on(async {
        let o = formatted(&dev).await;
        let mut s = created(o, &keys).await;
        s.write_chunks(vec![(0, chunk(1)), (5, chunk(2))])
            .await
            .unwrap();
        let r1 = s.flush().await.unwrap().unwrap();
        assert_eq!(s.read_chunk(0).await.unwrap(), chunk(1));
        assert_eq!(s.read_chunk(3).await.unwrap(), vec![0; CHUNK as usize]);
        // Chunk 0 rewritten, not yet durable: a crash now (the device as
        // it is) reopens at the first manifest with chunk 0's old bytes.
        s.write_chunks(vec![(0, chunk(3))]).await.unwrap();
        let crashed = Arc::new(MemBlocks::new(0));
        crashed.poke_all(dev.bytes());
        let before = open(&crashed, &keys, r1).await.unwrap();
        assert_eq!(before.read_chunk(0).await.unwrap(), chunk(1));
        // Rewritten again at the same epoch: the earlier attempt's slot is
        // reused (both versions on the device: the durable and the last).
        s.write_chunks(vec![(0, chunk(4))]).await.unwrap();
        let r2 = s.flush().await.unwrap().unwrap();
        let bytes = dev.bytes();
        assert_eq!(find(&bytes, &chunk(1)).len(), 1);
        assert!(find(&bytes, &chunk(3)).is_empty());
        assert_eq!(find(&bytes, &chunk(4)).len(), 1);
        drop(s);
        let s = open(&dev, &keys, r2).await.unwrap();
        assert_eq!(s.read_chunk(0).await.unwrap(), chunk(4));
        assert_eq!(s.read_chunk(5).await.unwrap(), chunk(2));
    });
}

#[test]
fn a_torn_manifest_leaves_the_one_before_and_rollbacks_are_refused() {
    let rt = rt();
    let dev = device();
    let keys = Keyring::new();
    rt.block_on(async {
        let o = formatted(&dev).await;
        let mut s = created(o, &keys).await;
        s.write_chunks(vec![(2, chunk(1))]).await.unwrap();
        let r1 = s.flush().await.unwrap().unwrap();
        let old = dev.bytes();
        s.write_chunks(vec![(2, chunk(2))]).await.unwrap();
        let r2 = s.flush().await.unwrap().unwrap();
        drop(s);
        // The whole device put back as it was: refused at open.
        let rolled = Arc::new(MemBlocks::new(0));
        rolled.poke_all(old.clone());
        assert!(matches!(
            open(&rolled, &keys, r2).await,
            Err(RemoteError::Rollback { .. })
        ));
        // One chunk put back, its header rewritten to claim the new
        // version: refused on read.
        let now = dev.bytes();
        let at_new = find(&now, &chunk(2))[0];
        let forged = Arc::new(MemBlocks::new(0));
        forged.poke_all(now.clone());
        forged.poke(at_new, &chunk(1));
        let s = open(&forged, &keys, r2).await.unwrap();
        assert!(matches!(
            s.read_chunk(2).await,
            Err(RemoteError::Tampered(_))
        ));
        // The newest manifest torn (a crash in its write, before the root
        // was kept): the one before stands.
        let torn = Arc::new(MemBlocks::new(0));
        torn.poke_all(now.clone());
        let manifest = find_manifest_body(&now, &old);
        torn.poke(manifest, &[0xff; 16]);
        let s = open(&torn, &keys, r1).await.unwrap();
        assert_eq!(s.root(), r1);
        assert_eq!(s.read_chunk(2).await.unwrap(), chunk(1));
    });
}

/// The first 4 KiB-aligned place where `now` and `old` differ after the
/// chunks: the newest manifest's slot (header and body).
fn find_manifest_body(now: &[u8], old: &[u8]) -> usize {
    // The manifest's slots come right after the probe's (4 KiB of
    // superblock, two probe slots of 8 KiB); the newest differs.
    let base = 4096 + 2 * 8192;
    let slot = (now.len() - base).min(1 << 20);
    (base..base + slot)
        .step_by(4096)
        .find(|i| {
            now[*i..*i + 4096] != old[*i..*i + 4096]
                && now[*i + 4096..*i + 8192] != old[*i + 4096..*i + 8192]
        })
        .map(|i| i + 4096)
        .unwrap()
}

#[test]
fn a_second_writer_on_the_same_device_is_fenced() {
    let rt = rt();
    let dev = device();
    let keys = Keyring::new();
    rt.block_on(async {
        let o = formatted(&dev).await;
        let mut a = created(o, &keys).await;
        a.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        let ra = a.flush().await.unwrap().unwrap();
        let mut b = open(&dev, &keys, ra).await.unwrap();
        b.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        b.flush().await.unwrap().unwrap();
        a.write_chunks(vec![(2, chunk(3))]).await.unwrap();
        assert_eq!(a.flush().await, Err(RemoteError::Fenced));
    });
}

#[test]
fn a_device_too_small_or_laid_out_for_another_volume_is_refused() {
    let rt = rt();
    rt.block_on(async {
        let small = Arc::new(MemBlocks::new(SIZE as usize));
        let e = BlockObjects::new(small)
            .format(&geometry())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("two slots per chunk"), "{e}");
        let dev = device();
        formatted(&dev).await;
        let other = coffre_remote::Geometry::new(CHUNK, SIZE / 2).unwrap();
        let e = BlockObjects::new(dev.clone())
            .format(&other)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("another volume"), "{e}");
        // The same geometry again is fine (the chunk store then refuses a
        // device that holds a volume).
        formatted(&dev).await;
        // Unformatted: a clear error at the first use.
        let blank: Arc<dyn Objects> = Arc::new(BlockObjects::new(device()));
        let e = ChunkStore::open(blank, PREFIX, VAULT, Keyring::new().key(), None, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no coffre layout"), "{e}");
    });
}

/// A version a crashed session put and never made durable stays in a
/// slot; the next session's version of that chunk must not go over the
/// durable one (the chunk store names it to the device), or a crash
/// before its manifest would leave the chunk missing.
#[test]
fn a_leftover_of_a_crashed_session_never_displaces_the_durable_version() {
    let rt = rt();
    let dev = device();
    let keys = Keyring::new();
    rt.block_on(async {
        let o = formatted(&dev).await;
        let mut s = created(o, &keys).await;
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        let r1 = s.flush().await.unwrap().unwrap();
        // Uploaded, never made durable: the session dies.
        s.write_chunks(vec![(0, chunk(2))]).await.unwrap();
        drop(s);
        let mut s = open(&dev, &keys, r1).await.unwrap();
        s.write_chunks(vec![(5, chunk(5))]).await.unwrap();
        let r2 = s.flush().await.unwrap().unwrap();
        // Version 3 of chunk 0, and the session dies again.
        s.write_chunks(vec![(0, chunk(3))]).await.unwrap();
        drop(s);
        let s = open(&dev, &keys, r2).await.unwrap();
        assert_eq!(s.read_chunk(0).await.unwrap(), chunk(1));
        assert_eq!(s.read_chunk(5).await.unwrap(), chunk(5));
    });
}

/// Blocks that can be made unreachable.
struct Switchable {
    inner: Arc<MemBlocks>,
    up: std::sync::atomic::AtomicBool,
}

impl Switchable {
    fn new(inner: &Arc<MemBlocks>) -> Arc<Self> {
        Arc::new(Switchable {
            inner: inner.clone(),
            up: std::sync::atomic::AtomicBool::new(true),
        })
    }
    fn up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
    fn check(&self) -> Result<(), coffre_remote::objects::StoreError> {
        if self.up.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(coffre_remote::objects::StoreError::Other(
                "injected: connection refused".into(),
            ))
        }
    }
}

impl coffre_remote::blocks::Blocks for Switchable {
    fn size(
        &self,
    ) -> coffre_remote::objects::BoxFuture<'_, Result<u64, coffre_remote::objects::StoreError>>
    {
        Box::pin(async move {
            self.check()?;
            self.inner.size().await
        })
    }
    fn read(
        &self,
        offset: u64,
        len: usize,
    ) -> coffre_remote::objects::BoxFuture<
        '_,
        Result<bytes::Bytes, coffre_remote::objects::StoreError>,
    > {
        Box::pin(async move {
            self.check()?;
            self.inner.read(offset, len).await
        })
    }
    fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> coffre_remote::objects::BoxFuture<'_, Result<(), coffre_remote::objects::StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.write(offset, data, fua).await
        })
    }
    fn flush(
        &self,
    ) -> coffre_remote::objects::BoxFuture<'_, Result<(), coffre_remote::objects::StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.flush().await
        })
    }
}

/// A superblock for another geometry on the export (altered by the store,
/// or another volume's copied over it; it is only checksummed) is refused
/// at open with what it says, where before the open went through and every
/// read failed its MAC; on a mirror it makes that store stale, and the
/// volume opens from the other.
#[test]
fn a_superblock_that_is_not_the_volumes_is_refused_at_open() {
    let rt = rt();
    let keys = Keyring::new();
    rt.block_on(async {
        let (a, b) = (device(), device());
        let open_mirrored = |backends, root| {
            ChunkStore::open_mirrored(
                backends,
                MirrorSettings::default(),
                PREFIX,
                (VAULT, keys.key()),
                (Some(root), false),
            )
        };
        let backend = |name: &str, dev: &Arc<MemBlocks>| Backend {
            name: name.into(),
            objects: Arc::new(BlockObjects::new(dev.clone())),
        };
        let (mut s, _) = ChunkStore::create_mirrored(
            vec![backend("a", &a), backend("b", &b)],
            MirrorSettings::default(),
            PREFIX,
            (VAULT, keys.key()),
            geometry(),
        )
        .await
        .unwrap();
        s.write_chunks(vec![(0, chunk(1))]).await.unwrap();
        let root = s.flush().await.unwrap().unwrap();
        drop(s);
        assert_eq!(
            open(&a, &keys, root)
                .await
                .unwrap()
                .read_chunk(0)
                .await
                .unwrap(),
            chunk(1)
        );
        // Another volume's layout: twice the chunk size.
        let other = device();
        BlockObjects::new(other.clone())
            .format(&coffre_remote::Geometry::new(CHUNK * 2, SIZE).unwrap())
            .await
            .unwrap();
        a.poke(0, &other.bytes()[..4096]);
        let e = open(&a, &keys, root).await.unwrap_err();
        assert!(matches!(e, RemoteError::Tampered(_)), "{e}");
        assert!(e.to_string().contains("superblock"), "{e}");
        // Mirrored: the volume opens from b, a is stale with the reason.
        let (s, _) = open_mirrored(vec![backend("a", &a), backend("b", &b)], root)
            .await
            .unwrap();
        let st = s.status();
        assert!(!st[0].in_step && st[1].in_step, "{st:?}");
        assert!(
            st[0].reason.as_deref().unwrap_or("").contains("superblock"),
            "{st:?}"
        );
        assert_eq!(s.read_chunk(0).await.unwrap(), chunk(1));
        // Never written through the wrong layout: writes, flushes and the
        // steps that would bring it back leave it as it is, stale.
        let mut s = s;
        let before = a.bytes();
        s.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        s.flush().await.unwrap();
        for _ in 0..3 {
            let _ = s.resync(64).await;
        }
        assert!(
            a.bytes() == before,
            "a slot written through the wrong layout"
        );
        let st = s.status();
        assert!(!st[0].in_step, "{st:?}");
        let root = s.root();
        drop(s);
        // Down at open (its superblock not read then): held to the
        // volume's geometry at its first use.
        let down = Switchable::new(&a);
        down.up(false);
        let down_a = Backend {
            name: "a".into(),
            objects: Arc::new(BlockObjects::new(down.clone())),
        };
        let (mut s, _) = open_mirrored(vec![down_a, backend("b", &b)], root)
            .await
            .unwrap();
        down.up(true);
        let before = a.bytes();
        for _ in 0..3 {
            let _ = s.resync(64).await;
        }
        s.write_chunks(vec![(2, chunk(3))]).await.unwrap();
        s.flush().await.unwrap();
        assert!(
            a.bytes() == before,
            "a slot written through the wrong layout"
        );
        assert!(!s.status()[0].in_step, "{:?}", s.status());
        drop(s);
        // Both altered: refused, the primary's reason first.
        b.poke(0, &other.bytes()[..4096]);
        let e = open_mirrored(vec![backend("a", &a), backend("b", &b)], root)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("superblock"), "{e}");
    });
}

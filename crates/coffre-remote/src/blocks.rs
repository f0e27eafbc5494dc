//! coffre's objects on a block device (an NBD export): the chunk store's
//! names mapped to fixed slots, so that the same chunk store, with the
//! same MACs, versions and manifest, runs on a disk that has no names.
//!
//! ```text
//! 0          superblock (4 KiB): the layout, checksummed
//! 4 KiB      probe: 2 slots       (the conditional-write probe)
//!            manifest: 2 slots    (written in turn, the newest valid one wins)
//!            pages: 2 slots each
//!            chunks: 2 slots each
//! ```
//!
//! A slot is a 4 KiB header space and the body. The header names what the
//! slot holds (kind, index, version, session, length) with a checksum: a
//! torn or foreign header reads as an empty slot. Each chunk and page has
//! two slots: a new version goes to the slot that does not hold the
//! latest durable one (the one with the same version if an earlier
//! attempt at this epoch is there, else the older), so the durable
//! version is never overwritten before a newer manifest names its
//! successor. The store thus takes about twice the volume's size.
//!
//! The manifest's slots also carry a hash of the body and a generation:
//! the current manifest is the valid slot of the highest generation, and
//! a put writes the other slot, after a flush (every chunk and page
//! written before is durable first), with FUA. A conditional put reads
//! the current generation just before it writes: a second writer that
//! opens after the first's manifest is fenced, as on S3; a block device
//! has no compare-and-swap, so two writers racing within the same
//! instant are not excluded (export the volume to one client: qemu-nbd
//! serves one at a time by default).
//!
//! Nothing here is trusted for integrity: the chunk store verifies every
//! chunk, page and manifest it reads with its MACs. A store that alters
//! headers or the superblock can only make reads fail.

use crate::RemoteError;
use crate::layout::{Geometry, Keys, Manifest, Name, Page};
use crate::nbd::NbdClient;
use crate::objects::{BoxFuture, Keep, Listing, Objects, Put, StoreError, Tag};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the slots need of a block device.
pub trait Blocks: Send + Sync {
    /// Its size.
    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, StoreError>>;
    /// Writes `data` at `offset` (durable at the next flush, or at once
    /// with `fua`).
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Writes `parts`, one after the other, at `offset`: as [`write`]
    /// of their concatenation, which this default makes (a client that
    /// can send them as they are does so, without that copy).
    ///
    /// [`write`]: Blocks::write
    fn write_parts(
        &self,
        offset: u64,
        parts: Vec<Bytes>,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(offset, crate::nbd::concat(&parts), fua)
    }
    /// Every write acknowledged before is durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// `len` bytes at `offset` are no longer needed (nothing by default).
    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }
}

impl Blocks for NbdClient {
    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move { Ok(self.info().await?.size) })
    }
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, StoreError>> {
        Box::pin(NbdClient::read(self, offset, len))
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(NbdClient::write(self, offset, data, fua))
    }
    fn write_parts(
        &self,
        offset: u64,
        parts: Vec<Bytes>,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(NbdClient::write_parts(self, offset, parts, fua))
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(NbdClient::flush(self))
    }
    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(NbdClient::trim(self, offset, len))
    }
}

/// A block device in memory, for tests (the unit and property tests of
/// the slot layout; the real one is an NBD export).
#[derive(Debug, Default)]
pub struct MemBlocks(Mutex<Vec<u8>>);

impl MemBlocks {
    /// `size` zero bytes.
    pub fn new(size: usize) -> Self {
        MemBlocks(Mutex::new(vec![0; size]))
    }
    /// A copy of every byte.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Replaces every byte (the device's size with them).
    pub fn poke_all(&self, bytes: Vec<u8>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
    }
    /// Puts `data` at `offset` behind the store's back.
    pub fn poke(&self, offset: usize, data: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner())[offset..offset + data.len()]
            .copy_from_slice(data);
    }
}

impl Blocks for MemBlocks {
    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let n = self.0.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        Box::pin(async move { Ok(n) })
    }
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, StoreError>> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let r = usize::try_from(offset)
            .ok()
            .and_then(|o| g.get(o..o.checked_add(len)?))
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| StoreError::Other("read past the end".into()));
        Box::pin(async move { r })
    }
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let r = usize::try_from(offset)
            .ok()
            .and_then(|o| g.get_mut(o..o.checked_add(data.len())?))
            .map(|d| d.copy_from_slice(&data))
            .ok_or_else(|| StoreError::Other("write past the end".into()));
        Box::pin(async move { r })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

const SUPER_MAGIC: &[u8; 16] = b"coffre-blocks-1\0";
const SLOT_MAGIC: &[u8; 8] = b"CFSLOT01";
/// A slot's header space.
const HEAD: u64 = 4096;
/// The same, as a length.
const HEAD_SPACE: usize = 4096;
/// A header's bytes: magic, kind, index, version, session, length, body
/// hash, then the checksum of all that.
const HEAD_LEN: usize = 8 + 8 + 8 + 8 + 8 + 8 + 16 + 16;
/// A deleted single object.
const TOMBSTONE: u64 = u64::MAX;
/// The probe's body capacity.
const PROBE_CAP: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Probe = 1,
    Manifest = 2,
    Page = 3,
    Chunk = 4,
}

/// Where everything is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    chunk_cap: u64,
    chunks: u64,
    page_cap: u64,
    pages: u64,
    manifest_cap: u64,
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

impl Layout {
    /// The layout for a volume of `geometry`.
    pub fn for_geometry(g: &Geometry) -> Self {
        Layout {
            chunk_cap: u64::from(g.chunk_size),
            chunks: g.chunks(),
            page_cap: round_up(Page::max_len() as u64),
            pages: g.pages(),
            manifest_cap: round_up(Manifest::len_for(g.pages())),
        }
    }

    /// The bytes the export must have.
    pub fn size(&self) -> u64 {
        self.base(Kind::Chunk) + 2 * self.chunks * (HEAD + self.chunk_cap)
    }

    fn cap(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Probe => PROBE_CAP,
            Kind::Manifest => self.manifest_cap,
            Kind::Page => self.page_cap,
            Kind::Chunk => self.chunk_cap,
        }
    }

    fn count(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Probe | Kind::Manifest => 1,
            Kind::Page => self.pages,
            Kind::Chunk => self.chunks,
        }
    }

    fn base(&self, kind: Kind) -> u64 {
        let probe = 4096;
        let manifest = probe + 2 * (HEAD + PROBE_CAP);
        let pages = manifest + 2 * (HEAD + self.manifest_cap);
        let chunks = pages + 2 * self.pages * (HEAD + self.page_cap);
        match kind {
            Kind::Probe => probe,
            Kind::Manifest => manifest,
            Kind::Page => pages,
            Kind::Chunk => chunks,
        }
    }

    /// Where slot `k` (0 or 1) of object `index` of `kind` starts.
    fn slot(&self, kind: Kind, index: u64, k: usize) -> u64 {
        let k = u64::from(k != 0);
        self.base(kind) + (2 * index + k) * (HEAD + self.cap(kind))
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(SUPER_MAGIC);
        for v in [
            self.chunk_cap,
            self.chunks,
            self.page_cap,
            self.pages,
            self.manifest_cap,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let sum = digest(&b);
        b.extend_from_slice(&sum);
        b.resize(4096, 0);
        b
    }

    /// A superblock's layout; `None` if there is none (or it is torn).
    fn decode(b: &[u8]) -> Option<Self> {
        let body = b.get(..16 + 5 * 8)?;
        if &body[..16] != SUPER_MAGIC || b.get(56..72)? != digest(body) {
            return None;
        }
        let v = |i: usize| {
            u64::from_be_bytes(body[16 + 8 * i..24 + 8 * i].try_into().unwrap_or_default())
        };
        let l = Layout {
            chunk_cap: v(0),
            chunks: v(1),
            page_cap: v(2),
            pages: v(3),
            manifest_cap: v(4),
        };
        // Sane, so that no offset overflows.
        let sane = l.chunk_cap.is_power_of_two()
            && l.chunk_cap <= u64::from(crate::layout::MAX_CHUNK)
            && l.chunks <= crate::layout::MAX_CHUNKS
            && l.pages <= l.chunks
            && l.page_cap <= 1 << 24
            && l.manifest_cap <= (16 << 20) + 4096;
        sane.then_some(l)
    }
}

/// What a layout that is not the volume's says, against what it needs.
fn mismatch(l: &Layout, want: &Layout) -> String {
    format!(
        "the export's superblock lays it out for chunks of {} bytes, {} chunks and {} pages, \
         where the volume's manifest says chunks of {} bytes, {} chunks and {} pages: \
         altered, or another volume's",
        l.chunk_cap, l.chunks, l.pages, want.chunk_cap, want.chunks, want.pages
    )
}

/// The first 16 bytes of SHA-256.
fn digest(b: &[u8]) -> [u8; 16] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    kind: u8,
    index: u64,
    /// The version (chunks, pages) or the generation (single objects).
    version: u64,
    session: u64,
    /// The body's length ([`TOMBSTONE`]: deleted).
    len: u64,
    hash: [u8; 16],
}

impl Head {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEAD_LEN);
        b.extend_from_slice(SLOT_MAGIC);
        b.extend_from_slice(&u64::from(self.kind).to_be_bytes());
        for v in [self.index, self.version, self.session, self.len] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&self.hash);
        let sum = digest(&b);
        b.extend_from_slice(&sum);
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let body = b.get(..HEAD_LEN - 16)?;
        if &body[..8] != SLOT_MAGIC || b.get(HEAD_LEN - 16..HEAD_LEN)? != digest(body) {
            return None;
        }
        let v = |i: usize| {
            u64::from_be_bytes(body[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default())
        };
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&body[48..64]);
        Some(Head {
            kind: u8::try_from(v(0)).ok()?,
            index: v(1),
            version: v(2),
            session: v(3),
            len: v(4),
            hash,
        })
    }
}

/// Each chunk's and page's two slots' headers.
type Heads = HashMap<(Kind, u64), [Option<Head>; 2]>;

/// [`Objects`] on a block device, in the slot layout.
pub struct BlockObjects {
    blocks: Arc<dyn Blocks>,
    layout: tokio::sync::OnceCell<Layout>,
    /// The layout its volume needs, once opened ([`Self::check_layout`]).
    expected: std::sync::OnceLock<Layout>,
    /// What each chunk's and page's two slots hold, as last read or
    /// written (`None`: empty, or being written).
    heads: Mutex<Heads>,
    /// One conditional put at a time.
    single: tokio::sync::Mutex<()>,
    /// Each chunk's and page's version that the durable manifest names
    /// (version, session), as the chunk store says: its slot is never
    /// written over.
    durable: Mutex<HashMap<(Kind, u64), (u64, u64)>>,
    /// Locks of the slots, by index.
    slot_locks: Vec<tokio::sync::Mutex<()>>,
}

/// Slot locks (an index maps to one of them).
const SLOT_LOCKS: usize = 64;

impl std::fmt::Debug for BlockObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockObjects")
            .field("layout", &self.layout.get())
            .finish_non_exhaustive()
    }
}

fn other(e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(e.to_string())
}

impl BlockObjects {
    /// Objects on `blocks` (its superblock is read at the first use).
    pub fn new(blocks: Arc<dyn Blocks>) -> Self {
        BlockObjects {
            blocks,
            layout: tokio::sync::OnceCell::new(),
            expected: std::sync::OnceLock::new(),
            heads: Mutex::new(HashMap::new()),
            single: tokio::sync::Mutex::new(()),
            durable: Mutex::new(HashMap::new()),
            slot_locks: (0..SLOT_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// Lays the slots out for a volume of `geometry` (at `init`): refused
    /// if the device is too small, or holds a layout for another
    /// geometry. A layout for the same geometry is kept (the chunk store
    /// then refuses a device that already holds a volume).
    pub async fn format(&self, geometry: &Geometry) -> Result<(), RemoteError> {
        let want = Layout::for_geometry(geometry);
        let size = self
            .blocks
            .size()
            .await
            .map_err(|e| RemoteError::Store(e.to_string()))?;
        if size < want.size() {
            return Err(RemoteError::Config(format!(
                "the export has {size} bytes; a volume of {} bytes in chunks of {} needs {} (two slots per chunk)",
                geometry.size,
                geometry.chunk_size,
                want.size()
            )));
        }
        let sb = self
            .blocks
            .read(0, 4096)
            .await
            .map_err(|e| RemoteError::Store(e.to_string()))?;
        match Layout::decode(&sb) {
            Some(l) if l == want => {}
            Some(_) => {
                return Err(RemoteError::Config(
                    "the export already holds a coffre layout for another volume: wipe it or use another export".into(),
                ));
            }
            None => {
                self.blocks
                    .write(0, Bytes::from(want.encode()), true)
                    .await
                    .map_err(|e| RemoteError::Store(e.to_string()))?;
            }
        }
        let _ = self.layout.set(want);
        Ok(())
    }

    /// The export is to hold a volume of `geometry` (the manifest's, at
    /// open): from now on every use of it checks that its layout is that
    /// geometry's, and refuses it otherwise (never a slot written through
    /// the wrong layout: a mirror so laid out stays stale). Its superblock
    /// is only checksummed: one the store altered, or another volume's
    /// copied over it, would put every slot elsewhere, and every read
    /// would then fail its MAC. Checked at once when the superblock was
    /// read already (its manifest was read through it), with no I/O
    /// otherwise (a store down at open is checked at its first use).
    pub fn check_layout(&self, geometry: &Geometry) -> Result<(), RemoteError> {
        let want = Layout::for_geometry(geometry);
        if self.expected.get().is_some_and(|e| *e != want) {
            return Err(RemoteError::Config(
                "this export was opened for two volumes of different geometries".into(),
            ));
        }
        let _ = self.expected.set(want);
        match self.layout.get() {
            Some(l) if *l != want => Err(RemoteError::Tampered(mismatch(l, &want))),
            _ => Ok(()),
        }
    }

    /// The export's layout: read once, then checked at every use against
    /// the one its volume needs, once known.
    async fn layout(&self) -> Result<Layout, StoreError> {
        let l = self
            .layout
            .get_or_try_init(|| async {
                let sb = self.blocks.read(0, 4096).await?;
                let l = Layout::decode(&sb).ok_or_else(|| {
                    other("the export holds no coffre layout (made by init --storage nbd://...)")
                })?;
                let size = self.blocks.size().await?;
                if size < l.size() {
                    return Err(other(format!(
                        "the export has {size} bytes, its layout needs {}",
                        l.size()
                    )));
                }
                Ok(l)
            })
            .await
            .copied()?;
        match self.expected.get() {
            Some(want) if *want != l => Err(other(mismatch(&l, want))),
            _ => Ok(l),
        }
    }

    async fn read_head(
        &self,
        l: &Layout,
        kind: Kind,
        index: u64,
        k: usize,
    ) -> Result<Option<Head>, StoreError> {
        // Whole 4 KiB blocks, for servers with a minimum block size.
        let b = self.blocks.read(l.slot(kind, index, k), HEAD_SPACE).await?;
        Ok(Head::decode(&b).filter(|h| {
            h.kind == kind as u8 && h.index == index && (h.len <= l.cap(kind) || h.len == TOMBSTONE)
        }))
    }

    /// `len` bytes of a body at `at`, read in whole 4 KiB blocks (a
    /// slot's capacity is a multiple of 4 KiB).
    async fn read_body(&self, at: u64, len: usize) -> Result<Bytes, StoreError> {
        let whole = len.div_ceil(HEAD_SPACE) * HEAD_SPACE;
        let mut b = self.blocks.read(at, whole).await?;
        b.truncate(len);
        Ok(b)
    }

    /// A slot's header and body, padded to whole 4 KiB blocks.
    fn slot_bytes(head: &Head, data: &[u8]) -> Bytes {
        let whole = (HEAD_SPACE + data.len()).div_ceil(HEAD_SPACE) * HEAD_SPACE;
        let mut buf = BytesMut::with_capacity(whole);
        buf.extend_from_slice(&head.encode());
        buf.resize(HEAD_SPACE, 0);
        buf.extend_from_slice(data);
        buf.resize(whole, 0);
        buf.freeze()
    }

    /// What [`slot_bytes`](Self::slot_bytes) gives, as parts: the header
    /// space, `data` itself (not copied), the zeros that end its last
    /// `HEAD_SPACE`.
    fn slot_parts(head: &Head, data: Bytes) -> Vec<Bytes> {
        let whole = (HEAD_SPACE + data.len()).div_ceil(HEAD_SPACE) * HEAD_SPACE;
        let mut first = BytesMut::with_capacity(HEAD_SPACE);
        first.extend_from_slice(&head.encode());
        first.resize(HEAD_SPACE, 0);
        let pad = whole - HEAD_SPACE - data.len();
        let mut parts = vec![first.freeze()];
        if !data.is_empty() {
            parts.push(data);
        }
        if pad > 0 {
            parts.push(Bytes::from(vec![0u8; pad]));
        }
        parts
    }

    /// The lock of a chunk's or page's two slots: a put and a deletion of
    /// the same index never interleave.
    fn slot_lock(&self, kind: Kind, index: u64) -> &tokio::sync::Mutex<()> {
        let k = usize::try_from((index ^ ((kind as u64) << 40)) % SLOT_LOCKS as u64).unwrap_or(0);
        &self.slot_locks[k]
    }

    /// Both slots' headers of a chunk or page (cached).
    async fn heads(
        &self,
        l: &Layout,
        kind: Kind,
        index: u64,
    ) -> Result<[Option<Head>; 2], StoreError> {
        if let Some(h) = self.lock_heads().get(&(kind, index)) {
            return Ok(*h);
        }
        let (a, b) = futures::future::join(
            self.read_head(l, kind, index, 0),
            self.read_head(l, kind, index, 1),
        )
        .await;
        let h = [a?, b?];
        Ok(*self.lock_heads().entry((kind, index)).or_insert(h))
    }

    fn lock_heads(&self) -> std::sync::MutexGuard<'_, Heads> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_durable(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, u64), (u64, u64)>> {
        self.durable.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current single object of `kind` (probe, manifest): the valid
    /// slot of the highest generation, with its body (read afresh).
    async fn current(
        &self,
        l: &Layout,
        kind: Kind,
    ) -> Result<Option<(usize, Head, Bytes)>, StoreError> {
        let mut best: Option<(usize, Head, Bytes)> = None;
        for k in 0..2 {
            let Some(h) = self.read_head(l, kind, 0, k).await? else {
                continue;
            };
            let body = if h.len == TOMBSTONE {
                Bytes::new()
            } else {
                let len = usize::try_from(h.len).map_err(other)?;
                let b = self.read_body(l.slot(kind, 0, k) + HEAD, len).await?;
                if digest(&b) != h.hash {
                    // Torn: the other slot stands.
                    continue;
                }
                b
            };
            if best.as_ref().is_none_or(|(_, b, _)| h.version > b.version) {
                best = Some((k, h, body));
            }
        }
        Ok(best)
    }

    fn kind_index(l: &Layout, name: &Name) -> Result<(Kind, u64, u64, u64), StoreError> {
        let (kind, index, version, session) = match *name {
            Name::Chunk(i, v, s) => (Kind::Chunk, i, v, s),
            Name::Page(i, v, s) => (Kind::Page, i, v, s),
            Name::Manifest => (Kind::Manifest, 0, 0, 0),
            Name::Probe(n) => (Kind::Probe, 0, 0, n),
        };
        if index >= l.count(kind) {
            return Err(other(format!("{name:?} is past the export's layout")));
        }
        Ok((kind, index, version, session))
    }

    async fn get_named(&self, name: &str, max: usize) -> Result<Option<(Bytes, Tag)>, StoreError> {
        let l = self.layout().await?;
        let parsed =
            Keys::parse(name).ok_or_else(|| other(format!("{name}: not a name of this layout")))?;
        let (kind, index, version, session) = Self::kind_index(&l, &parsed)?;
        match kind {
            Kind::Manifest | Kind::Probe => {
                let Some((_, h, body)) = self.current(&l, kind).await? else {
                    return Ok(None);
                };
                if h.len == TOMBSTONE || h.session != session {
                    return Ok(None);
                }
                if body.len() > max {
                    return Err(other(format!("{name} is larger than {max} bytes")));
                }
                Ok(Some((body, gen_tag(h.version))))
            }
            Kind::Chunk | Kind::Page => {
                let heads = self.heads(&l, kind, index).await?;
                let Some(k) = (0..2usize).find(|k| {
                    heads[*k].is_some_and(|h| {
                        h.version == version && h.session == session && h.len != TOMBSTONE
                    })
                }) else {
                    return Ok(None);
                };
                let h = heads[k].unwrap_or(Head {
                    kind: 0,
                    index,
                    version,
                    session,
                    len: 0,
                    hash: [0; 16],
                });
                let len = usize::try_from(h.len).map_err(other)?;
                if len > max {
                    return Err(other(format!("{name} is larger than {max} bytes")));
                }
                let body = self.read_body(l.slot(kind, index, k) + HEAD, len).await?;
                Ok(Some((body, gen_tag(version))))
            }
        }
    }

    async fn put_named(&self, name: &str, data: Bytes, mode: Put) -> Result<Tag, StoreError> {
        let l = self.layout().await?;
        let parsed =
            Keys::parse(name).ok_or_else(|| other(format!("{name}: not a name of this layout")))?;
        let (kind, index, version, session) = Self::kind_index(&l, &parsed)?;
        if data.len() as u64 > l.cap(kind) {
            return Err(other(format!(
                "{name}: {} bytes do not fit its slot of {}",
                data.len(),
                l.cap(kind)
            )));
        }
        match kind {
            Kind::Manifest | Kind::Probe => self.put_single(&l, kind, session, data, &mode).await,
            Kind::Chunk | Kind::Page => {
                if mode != Put::Overwrite {
                    return Err(StoreError::Unsupported(format!(
                        "{name}: conditional puts of chunks and pages"
                    )));
                }
                let _slots = self.slot_lock(kind, index).lock().await;
                let heads = self.heads(&l, kind, index).await?;
                let durable = self.lock_durable().get(&(kind, index)).copied();
                let k = choose(&heads, version, session, durable);
                let head = Head {
                    kind: kind as u8,
                    index,
                    version,
                    session,
                    len: data.len() as u64,
                    hash: [0; 16],
                };
                // Empty while it is written: a failed write leaves it so.
                self.set_head(kind, index, k, None);
                self.blocks
                    .write_parts(l.slot(kind, index, k), Self::slot_parts(&head, data), false)
                    .await?;
                self.set_head(kind, index, k, Some(head));
                Ok(gen_tag(version))
            }
        }
    }

    fn set_head(&self, kind: Kind, index: u64, k: usize, h: Option<Head>) {
        if let Some(e) = self.lock_heads().get_mut(&(kind, index)) {
            e[k] = h;
        }
    }

    /// A conditional put of the manifest or the probe: the current
    /// generation checked just before, the other slot written after a
    /// flush, with FUA.
    async fn put_single(
        &self,
        l: &Layout,
        kind: Kind,
        session: u64,
        data: Bytes,
        mode: &Put,
    ) -> Result<Tag, StoreError> {
        let _one = self.single.lock().await;
        let current = self.current(l, kind).await?;
        let live = current
            .as_ref()
            .filter(|(_, h, _)| h.len != TOMBSTONE && h.session == session);
        match mode {
            Put::Overwrite => {}
            Put::Create => {
                if live.is_some() {
                    return Err(StoreError::AlreadyExists);
                }
            }
            Put::Update(tag) => {
                if live.is_none_or(|(_, h, _)| gen_tag(h.version) != *tag) {
                    return Err(StoreError::Precondition);
                }
            }
        }
        let (k, generation) = match &current {
            Some((k, h, _)) => (1 - *k, h.version + 1),
            None => (0, 1),
        };
        let head = Head {
            kind: kind as u8,
            index: 0,
            version: generation,
            session,
            len: data.len() as u64,
            hash: digest(&data),
        };
        // Everything written before (chunks, pages) is durable before the
        // manifest that names it.
        self.blocks.flush().await?;
        self.blocks
            .write(l.slot(kind, 0, k), Self::slot_bytes(&head, &data), true)
            .await?;
        Ok(gen_tag(generation))
    }

    async fn delete_named(&self, name: &str) -> Result<(), StoreError> {
        let l = self.layout().await?;
        let parsed =
            Keys::parse(name).ok_or_else(|| other(format!("{name}: not a name of this layout")))?;
        let (kind, index, version, session) = Self::kind_index(&l, &parsed)?;
        match kind {
            Kind::Manifest | Kind::Probe => {
                let _one = self.single.lock().await;
                let Some((k, h, _)) = self.current(&l, kind).await? else {
                    return Ok(());
                };
                if h.len == TOMBSTONE || h.session != session {
                    return Ok(());
                }
                let head = Head {
                    len: TOMBSTONE,
                    version: h.version + 1,
                    hash: [0; 16],
                    ..h
                };
                self.blocks
                    .write(l.slot(kind, 0, 1 - k), Self::slot_bytes(&head, &[]), true)
                    .await
            }
            Kind::Chunk | Kind::Page => {
                let _slots = self.slot_lock(kind, index).lock().await;
                let heads = self.heads(&l, kind, index).await?;
                for (k, h) in heads.iter().enumerate() {
                    if h.is_some_and(|h| h.version == version && h.session == session) {
                        self.set_head(kind, index, k, None);
                        let at = l.slot(kind, index, k);
                        // With FUA: durable when answered (a restarted
                        // server cannot have lost it).
                        self.blocks
                            .write(at, Bytes::from(vec![0u8; HEAD_SPACE]), true)
                            .await?;
                        // The body's space goes back to the storage host.
                        self.blocks.trim(at + HEAD, l.cap(kind)).await?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// For the fuzz target: a slot header, a superblock and an object name
/// read from what a block device could hold; whatever decodes must
/// encode back to the same bytes. Whether a header and a layout decoded
/// (a test holds the harness to reaching past the digests).
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) -> (bool, bool) {
    let mut decoded = (false, false);
    // The digests are unkeyed: the storage host can make them match
    // whatever it writes, so each decoder also sees `data` with its digest
    // made right (else only the exact seeds would get past it).
    let mut fixed = data.to_vec();
    if fixed.len() >= HEAD_LEN {
        let sum = digest(&fixed[..HEAD_LEN - 16]);
        fixed[HEAD_LEN - 16..HEAD_LEN].copy_from_slice(&sum);
    }
    for b in [data, &fixed] {
        if let Some(h) = Head::decode(b) {
            assert_eq!(&h.encode()[..], &b[..HEAD_LEN]);
            decoded.0 = true;
        }
    }
    let mut fixed = data.to_vec();
    if fixed.len() >= 72 {
        let sum = digest(&fixed[..56]);
        fixed[56..72].copy_from_slice(&sum);
    }
    for b in [data, &fixed] {
        if let Some(l) = Layout::decode(b) {
            assert_eq!(&l.encode()[..72], &b[..72]);
            let _ = l.size();
            decoded.1 = true;
        }
    }
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = Keys::parse(name);
    }
    decoded
}

fn gen_tag(generation: u64) -> Tag {
    Tag {
        e_tag: Some(format!("\"{generation:x}\"")),
        version: None,
    }
}

/// The slot a new version goes to: the one holding this very object (a
/// retry); else never the one holding the durable version (`durable`, as
/// the chunk store says); else one holding the same version (an earlier
/// attempt at this epoch, never durable), else an empty one, else the
/// older.
fn choose(
    heads: &[Option<Head>; 2],
    version: u64,
    session: u64,
    durable: Option<(u64, u64)>,
) -> usize {
    let live = |k: usize| heads[k].filter(|h| h.len != TOMBSTONE);
    if let Some(k) =
        (0..2).find(|k| live(*k).is_some_and(|h| h.version == version && h.session == session))
    {
        return k;
    }
    if let Some((v, s)) = durable
        && let Some(k) = (0..2).find(|k| live(*k).is_some_and(|h| h.version == v && h.session == s))
    {
        return 1 - k;
    }
    if let Some(k) = (0..2).find(|k| live(*k).is_some_and(|h| h.version == version)) {
        return k;
    }
    if let Some(k) = (0..2).find(|k| live(*k).is_none()) {
        return k;
    }
    let v = |k: usize| live(k).map_or(0, |h| h.version);
    if v(0) <= v(1) { 0 } else { 1 }
}

impl Objects for BlockObjects {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(self.get_named(key, max))
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(self.put_named(key, data, mode))
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.delete_named(key))
    }
    /// Never: its slots are reused, nothing is left behind to sweep.
    fn list<'a>(
        &'a self,
        _prefix: &'a str,
        _max: usize,
        _keep: Keep<'a>,
    ) -> BoxFuture<'a, Listing> {
        Box::pin(async { Ok(None) })
    }
    fn prepare<'a>(&'a self, geometry: &'a Geometry) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(self.format(geometry))
    }
    fn opened<'a>(&'a self, geometry: &'a Geometry) -> BoxFuture<'a, Result<(), RemoteError>> {
        let r = self.check_layout(geometry);
        Box::pin(async move { r })
    }
    fn durable(&self, names: &mut dyn Iterator<Item = Name>) {
        let mut d = self.lock_durable();
        for n in names {
            match n {
                Name::Chunk(i, v, s) => d.insert((Kind::Chunk, i), (v, s)),
                Name::Page(i, v, s) => d.insert((Kind::Page, i), (v, s)),
                Name::Manifest | Name::Probe(_) => None,
            };
        }
    }
    fn exists<'a>(&'a self, key: &'a str, max: usize) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let l = self.layout().await?;
            let parsed = Keys::parse(key)
                .ok_or_else(|| other(format!("{key}: not a name of this layout")))?;
            match Self::kind_index(&l, &parsed)? {
                (kind @ (Kind::Chunk | Kind::Page), index, version, session) => {
                    let heads = self.heads(&l, kind, index).await?;
                    Ok(heads.iter().flatten().any(|h| {
                        h.version == version && h.session == session && h.len != TOMBSTONE
                    }))
                }
                _ => Ok(self.get_named(key, max).await?.is_some()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz harness gets past the unkeyed digests, as a storage host
    /// can: a header and a superblock whose fields were changed decode
    /// (their digests made right), and every length short of whole is
    /// refused without a panic.
    #[test]
    fn the_fuzz_harness_reaches_past_the_digests() {
        let head = Head {
            kind: Kind::Chunk as u8,
            index: 3,
            version: 2,
            session: 1,
            len: 77,
            hash: [5; 16],
        }
        .encode();
        let mut changed = head.clone();
        changed[20] ^= 1;
        assert!(Head::decode(&changed).is_none(), "the digest holds");
        assert_eq!(fuzz_decode(&changed), (true, false));
        let layout = Layout {
            chunk_cap: 1 << 16,
            chunks: 8,
            page_cap: 4096,
            pages: 1,
            manifest_cap: 8192,
        }
        .encode();
        let mut changed = layout.clone();
        changed[30] ^= 1;
        assert!(Layout::decode(&changed).is_none(), "the digest holds");
        assert!(fuzz_decode(&changed).1);
        for n in 0..100 {
            let _ = fuzz_decode(&head[..n.min(head.len())]);
            let _ = fuzz_decode(&layout[..n]);
        }
    }

    /// The parts a chunk's slot is written in are, end to end, the bytes
    /// of the slot in one buffer, whatever the data's length.
    #[test]
    fn slot_parts_are_the_slot_bytes() {
        let head = Head {
            kind: Kind::Chunk as u8,
            index: 7,
            version: 3,
            session: 0x1234,
            len: 0,
            hash: [9; 16],
        };
        for n in [0, 1, HEAD_SPACE - 1, HEAD_SPACE, 1 << 20, (1 << 20) + 13] {
            let data: Vec<u8> = (0..n).map(|i| u8::try_from(i % 253).unwrap()).collect();
            let one = BlockObjects::slot_bytes(&head, &data);
            let parts = BlockObjects::slot_parts(&head, Bytes::from(data));
            let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(joined, one.to_vec(), "{n} bytes");
            assert!(
                parts.iter().all(|p| !p.is_empty()),
                "{n} bytes: an empty part"
            );
        }
    }

    fn head(version: u64, session: u64) -> Option<Head> {
        Some(Head {
            kind: Kind::Chunk as u8,
            index: 0,
            version,
            session,
            len: 1,
            hash: [0; 16],
        })
    }

    #[test]
    fn a_new_version_never_goes_over_the_newest_durable_one() {
        // Empty: the first slot.
        assert_eq!(choose(&[None, None], 1, 1, None), 0);
        // The durable version 3 in slot 0: version 4 goes to slot 1.
        assert_eq!(choose(&[head(3, 1), None], 4, 2, None), 1);
        assert_eq!(choose(&[head(3, 1), head(2, 9)], 4, 2, None), 1);
        assert_eq!(choose(&[head(2, 9), head(3, 1)], 4, 2, None), 0);
        // An earlier attempt at version 4 (never durable) is replaced.
        assert_eq!(choose(&[head(3, 1), head(4, 7)], 4, 8, None), 1);
        assert_eq!(choose(&[head(4, 7), head(3, 1)], 4, 8, None), 0);
        // A leftover of a crashed session (version 5, never durable) and
        // the durable version 3: version 7 never goes over version 3.
        assert_eq!(choose(&[head(3, 1), head(5, 9)], 7, 2, Some((3, 1))), 1);
        assert_eq!(choose(&[head(5, 9), head(3, 1)], 7, 2, Some((3, 1))), 0);
        // A retry of the same object goes where it is.
        assert_eq!(choose(&[head(3, 1), head(4, 8)], 4, 8, None), 1);
    }

    #[test]
    fn headers_and_superblocks_round_trip_and_torn_ones_are_empty() {
        let h = head(5, 6).unwrap();
        let b = h.encode();
        assert_eq!(Head::decode(&b), Some(h));
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 1;
            assert_eq!(Head::decode(&t), None, "byte {i}");
        }
        let g = Geometry::new(1 << 16, 10 << 20).unwrap();
        let l = Layout::for_geometry(&g);
        assert_eq!(Layout::decode(&l.encode()), Some(l));
        let mut t = l.encode();
        t[20] ^= 1;
        assert_eq!(Layout::decode(&t), None);
        assert!(l.size() > 2 * g.size);
        assert!(l.size() < 2 * g.size + (8 << 20));
    }
}

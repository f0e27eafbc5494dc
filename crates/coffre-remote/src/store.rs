//! [`ChunkStore`]: the volume's chunks on an object store, each read
//! verified, each flush a new manifest written last with a conditional put.

use crate::RemoteError;
use crate::integrity::IntegrityKey;
use crate::layout::{ENTRIES_PER_PAGE, Entry, Geometry, Keys, Manifest, Page, Root};
use crate::objects::{Objects, Put, StoreError, Tag};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many object requests one call keeps in flight.
pub const IN_FLIGHT: usize = 16;

/// What [`ChunkStore::open`] found, besides the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The store's root (its manifest's epoch and MAC).
    pub root: Root,
    /// How many epochs the store is ahead of the local root: 0 normally; 1
    /// after a crash between a manifest's put and the local root's update;
    /// more only if another holder of the integrity key wrote.
    pub ahead_by: u64,
}

/// The volume on a store.
pub struct ChunkStore {
    objects: Arc<dyn Objects>,
    keys: Keys,
    vault: [u8; 16],
    key: IntegrityKey,
    geometry: Geometry,
    /// Every chunk's entry: the durable manifest's, with changes since.
    table: Vec<Entry>,
    /// Every page's epoch, session and MAC, as the next manifest will
    /// list them.
    pages: Vec<Entry>,
    /// The root the caller last said it kept.
    kept: Root,
    /// Pages changed since the durable manifest.
    dirty_pages: BTreeSet<u64>,
    /// The durable manifest's epoch; what changes since carries epoch + 1.
    epoch: u64,
    /// The durable manifest's version, for the next conditional put.
    manifest_tag: Tag,
    root: Root,
    /// Another writer's manifest replaced ours: nothing more is written.
    fenced: bool,
    /// A manifest put whose outcome is unknown (an error after the
    /// request left): its bytes, resolved before anything else is written.
    uncertain: Option<Vec<u8>>,
    /// Objects no durable manifest will name once the epoch in the pair is
    /// durable.
    superseded: Vec<(String, u64)>,
    /// Objects no durable manifest names, and since when.
    garbage: Vec<(String, Instant)>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("keys", &self.keys)
            .field("geometry", &self.geometry)
            .field("epoch", &self.epoch)
            .field("dirty_pages", &self.dirty_pages.len())
            .field("fenced", &self.fenced)
            .finish_non_exhaustive()
    }
}

fn store_err(what: &str, e: StoreError) -> RemoteError {
    RemoteError::Store(format!("{what}: {e}"))
}

/// A random number: the probe's name, and each object's nonce (the
/// "session" part of its name: every put goes to a name never used
/// before, so no late or retried put can land on a name a manifest
/// names with other bytes, and a second writer can never write over the
/// first's names).
fn random_u64() -> Result<u64, RemoteError> {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| RemoteError::Crypto("no randomness".into()))?;
    Ok(u64::from_be_bytes(b))
}

/// The most a manifest may be (a 16 TiB volume in 1 MiB chunks has a
/// 192 KiB manifest; MAX_CHUNKS bounds it).
const MAX_MANIFEST: usize = 16 << 20;

/// Whether the store honours conditional puts: a create over an existing
/// object and an update of a version that is not the current one must both
/// be refused. A store that does not cannot fence a second writer, nor
/// keep a manifest from being overwritten by an older one: it is refused.
pub async fn check_conditional_writes(
    objects: &dyn Objects,
    keys: &Keys,
) -> Result<(), RemoteError> {
    let probe = keys.probe(random_u64()?);
    let refuse = |why: String| {
        RemoteError::NoConditionalWrites(format!(
            "{why}: coffre needs If-None-Match and If-Match on puts to fence a second writer"
        ))
    };
    let data = Bytes::from_static(b"coffre conditional-write probe");
    let first = objects
        .put(&probe, data.clone(), Put::Create)
        .await
        .map_err(|e| match e {
            StoreError::Unsupported(why) => refuse(why),
            e => store_err("the conditional-write probe", e),
        })?;
    let result = async {
        match objects.put(&probe, data.clone(), Put::Create).await {
            Err(StoreError::AlreadyExists | StoreError::Precondition) => {}
            Ok(_) => return Err(refuse("a create over an existing object succeeded".into())),
            Err(e) => return Err(store_err("the conditional-write probe", e)),
        }
        if first.e_tag.is_none() && first.version.is_none() {
            return Err(refuse("the store gives puts no ETag".into()));
        }
        let stale = Tag {
            e_tag: Some("\"coffre-not-this-version\"".into()),
            version: first
                .version
                .as_ref()
                .map(|_| "coffre-not-this-version".into()),
        };
        match objects.put(&probe, data.clone(), Put::Update(stale)).await {
            Err(StoreError::Precondition | StoreError::AlreadyExists) => {}
            Ok(_) => return Err(refuse("an update of a stale version succeeded".into())),
            Err(StoreError::Unsupported(why)) => return Err(refuse(why)),
            Err(e) => return Err(store_err("the conditional-write probe", e)),
        }
        match objects
            .put(&probe, data.clone(), Put::Update(first.clone()))
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Unsupported(why)) => Err(refuse(why)),
            Err(e) => Err(refuse(format!(
                "an update of the current version was refused ({e})"
            ))),
        }
    }
    .await;
    let _ = objects.delete(&probe).await;
    result
}

/// Runs `jobs` with at most [`IN_FLIGHT`] at once, in order of results.
async fn bounded<T, F>(jobs: Vec<F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let mut out = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter();
    loop {
        let batch: Vec<F> = jobs.by_ref().take(IN_FLIGHT).collect();
        if batch.is_empty() {
            return out;
        }
        out.extend(futures::future::join_all(batch).await);
    }
}

impl ChunkStore {
    /// Makes a new, empty volume on the store under `prefix`: refused if
    /// the store does not honour conditional writes, or if a manifest is
    /// already there (another vault's, or this one's).
    pub async fn create(
        objects: Arc<dyn Objects>,
        prefix: &str,
        vault: [u8; 16],
        key: IntegrityKey,
        geometry: Geometry,
    ) -> Result<(Self, Root), RemoteError> {
        let keys = Keys::new(prefix);
        check_conditional_writes(objects.as_ref(), &keys).await?;
        let pages = vec![Entry::EMPTY; usize::try_from(geometry.pages()).unwrap_or(0)];
        let manifest = Manifest {
            geometry,
            epoch: 0,
            pages: pages.clone(),
        };
        let (bytes, root) = manifest.encode(&key, &vault);
        let tag = match objects
            .put(&keys.manifest(), Bytes::from(bytes), Put::Create)
            .await
        {
            Ok(t) => t,
            Err(StoreError::AlreadyExists | StoreError::Precondition) => {
                return Err(RemoteError::Config(format!(
                    "{} already holds a volume: choose another prefix, or open it",
                    keys.manifest()
                )));
            }
            Err(e) => return Err(store_err("writing the first manifest", e)),
        };
        let table = vec![Entry::EMPTY; usize::try_from(geometry.chunks()).unwrap_or(0)];
        let store = ChunkStore::assemble(
            (objects, keys, vault, key),
            (geometry, table, pages),
            (0, tag, root),
        );
        Ok((store, root))
    }

    /// Opens the volume under `prefix`, verifying the manifest and every
    /// page against the integrity key, and the manifest's epoch against
    /// `local` (the root the control directory keeps): an older epoch is a
    /// rollback, refused unless `trust_store_epoch` (recovery after the
    /// control directory was lost or restored from an older backup).
    pub async fn open(
        objects: Arc<dyn Objects>,
        prefix: &str,
        vault: [u8; 16],
        key: IntegrityKey,
        local: Option<Root>,
        trust_store_epoch: bool,
    ) -> Result<(Self, Opened), RemoteError> {
        let keys = Keys::new(prefix);
        let Some((bytes, tag)) = objects
            .get(&keys.manifest(), MAX_MANIFEST)
            .await
            .map_err(|e| store_err("reading the manifest", e))?
        else {
            return Err(RemoteError::Empty {
                local: local.map(|r| r.epoch),
            });
        };
        let (manifest, root) = Manifest::decode(&bytes, &key, &vault)?;
        let ahead_by = match local {
            None => 0,
            Some(l) if root.epoch < l.epoch && !trust_store_epoch => {
                return Err(RemoteError::Rollback {
                    store: root.epoch,
                    local: l.epoch,
                });
            }
            Some(l)
                if root.epoch == l.epoch
                    && !IntegrityKey::verify(&l.mac, &root.mac)
                    && !trust_store_epoch =>
            {
                return Err(RemoteError::Forked { epoch: root.epoch });
            }
            Some(l) => root.epoch.saturating_sub(l.epoch),
        };
        let geometry = manifest.geometry;
        let mut table = vec![Entry::EMPTY; usize::try_from(geometry.chunks()).unwrap_or(0)];
        let wanted: Vec<(u64, Entry)> = manifest
            .pages
            .iter()
            .enumerate()
            .filter(|(_, e)| e.version > 0)
            .map(|(i, e)| (i as u64, *e))
            .collect();
        let fetched = bounded(
            wanted
                .iter()
                .map(|(p, e)| {
                    let name = keys.page(*p, e.version, e.session);
                    let objects = objects.clone();
                    async move { objects.get(&name, Page::max_len()).await }
                })
                .collect(),
        )
        .await;
        for ((p, e), got) in wanted.iter().zip(fetched) {
            let bytes = match got.map_err(|err| store_err("reading a page", err))? {
                Some((b, _)) => b,
                None => {
                    return Err(RemoteError::Tampered(format!(
                        "page {p} at epoch {}, which the manifest lists, is missing from the store",
                        e.version
                    )));
                }
            };
            let page = Page::decode(&bytes, &key, &vault, (*p, geometry.page_len(*p)), e)?;
            let start = usize::try_from(p * ENTRIES_PER_PAGE).unwrap_or(usize::MAX);
            table[start..start + page.entries.len()].copy_from_slice(&page.entries);
        }
        let store = ChunkStore::assemble(
            (objects, keys, vault, key),
            (geometry, table, manifest.pages),
            (manifest.epoch, tag, root),
        );
        Ok((store, Opened { root, ahead_by }))
    }

    /// A store as the durable manifest `(epoch, tag, root)` left it.
    fn assemble(
        (objects, keys, vault, key): (Arc<dyn Objects>, Keys, [u8; 16], IntegrityKey),
        (geometry, table, pages): (Geometry, Vec<Entry>, Vec<Entry>),
        (epoch, manifest_tag, root): (u64, Tag, Root),
    ) -> Self {
        ChunkStore {
            objects,
            keys,
            vault,
            key,
            geometry,
            table,
            pages,
            kept: root,
            dirty_pages: BTreeSet::new(),
            epoch,
            manifest_tag,
            root,
            fenced: false,
            uncertain: None,
            superseded: Vec::new(),
            garbage: Vec::new(),
        }
    }

    /// The volume's shape.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The durable manifest's root.
    pub fn root(&self) -> Root {
        self.root
    }

    /// Whether another writer fenced this one off.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether changes wait for a flush.
    pub fn is_dirty(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    fn check_index(&self, index: u64) -> Result<usize, RemoteError> {
        usize::try_from(index)
            .ok()
            .filter(|i| *i < self.table.len())
            .ok_or_else(|| RemoteError::Config(format!("chunk {index} is past the volume's end")))
    }

    /// Whether chunk `index` was never written (it reads as zeros).
    pub fn is_empty_chunk(&self, index: u64) -> bool {
        self.check_index(index)
            .is_ok_and(|i| self.table[i].version == 0)
    }

    /// Whether the store's chunk `index` is `data` (by its MAC: no
    /// download).
    pub fn holds(&self, index: u64, data: &[u8]) -> bool {
        let Ok(i) = self.check_index(index) else {
            return false;
        };
        let e = self.table[i];
        e.version != 0
            && IntegrityKey::verify(
                &e.mac,
                &self
                    .key
                    .chunk_mac(&self.vault, (index, e.version, e.session), data),
            )
    }

    /// Chunk `index`'s ciphertext, verified (zeros if never written).
    pub async fn read_chunk(&self, index: u64) -> Result<Vec<u8>, RemoteError> {
        let i = self.check_index(index)?;
        let entry = self.table[i];
        let len = self.geometry.chunk_len(index);
        if entry.version == 0 {
            return Ok(vec![0; len]);
        }
        let name = self.keys.chunk(index, entry.version, entry.session);
        let Some((bytes, _)) = self
            .objects
            .get(&name, len)
            .await
            .map_err(|e| store_err("reading a chunk", e))?
        else {
            return Err(RemoteError::Tampered(format!(
                "chunk {index} version {} is missing from the store",
                entry.version
            )));
        };
        let mac = self
            .key
            .chunk_mac(&self.vault, (index, entry.version, entry.session), &bytes);
        if bytes.len() != len || !IntegrityKey::verify(&entry.mac, &mac) {
            return Err(RemoteError::Tampered(format!(
                "chunk {index} version {} does not verify (altered, an older version, or another chunk's)",
                entry.version
            )));
        }
        Ok(bytes.to_vec())
    }

    /// Settles a manifest put whose outcome was unknown: it happened if
    /// the store now holds exactly those bytes.
    async fn resolve(&mut self) -> Result<(), RemoteError> {
        let Some(attempt) = self.uncertain.take() else {
            return Ok(());
        };
        let got = self
            .objects
            .get(&self.keys.manifest(), MAX_MANIFEST)
            .await
            .map_err(|e| {
                store_err(
                    "reading the manifest after a put whose outcome is unknown",
                    e,
                )
            });
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                self.uncertain = Some(attempt);
                return Err(e);
            }
        };
        match got {
            Some((bytes, tag)) if bytes.as_ref() == attempt.as_slice() => {
                let (m, root) = Manifest::decode(&bytes, &self.key, &self.vault)?;
                self.durable(m.epoch, tag, root);
                Ok(())
            }
            // Still the version this writer last saw (compared by ETag,
            // the conditional puts' own test): the put did not happen.
            Some((_, tag)) if tag.e_tag.is_some() && tag.e_tag == self.manifest_tag.e_tag => Ok(()),
            _ => {
                self.fenced = true;
                Err(RemoteError::Fenced)
            }
        }
    }

    fn writable(&self) -> Result<(), RemoteError> {
        if self.fenced {
            return Err(RemoteError::Fenced);
        }
        Ok(())
    }

    /// Writes chunks (index, full ciphertext): each under the next epoch's
    /// version, several in flight. Durable at the next [`flush`].
    ///
    /// [`flush`]: ChunkStore::flush
    pub async fn write_chunks(&mut self, chunks: Vec<(u64, Vec<u8>)>) -> Result<(), RemoteError> {
        self.writable()?;
        self.resolve().await?;
        let version = self.epoch + 1;
        let mut jobs = Vec::with_capacity(chunks.len());
        let mut done = Vec::with_capacity(chunks.len());
        let mut seen = BTreeSet::new();
        if let Some((index, _)) = chunks.iter().find(|(i, _)| !seen.insert(*i)) {
            return Err(RemoteError::Config(format!(
                "chunk {index} is twice in one write"
            )));
        }
        for (index, data) in chunks {
            let i = self.check_index(index)?;
            if data.len() != self.geometry.chunk_len(index) {
                return Err(RemoteError::Config(format!(
                    "chunk {index} is {} bytes, not {}",
                    data.len(),
                    self.geometry.chunk_len(index)
                )));
            }
            let session = random_u64()?;
            let mac = self
                .key
                .chunk_mac(&self.vault, (index, version, session), &data);
            let name = self.keys.chunk(index, version, session);
            done.push((
                i,
                index,
                Entry {
                    version,
                    session,
                    mac,
                },
            ));
            let objects = self.objects.clone();
            jobs.push(async move { objects.put(&name, Bytes::from(data), Put::Overwrite).await });
        }
        let results = bounded(jobs).await;
        let mut first_error = None;
        for ((i, index, entry), r) in done.into_iter().zip(results) {
            match r {
                Ok(_) => {
                    let old = self.table[i];
                    if old.version != 0
                        && (old.version, old.session) != (entry.version, entry.session)
                    {
                        self.superseded.push((
                            self.keys.chunk(index, old.version, old.session),
                            entry.version,
                        ));
                    }
                    self.table[i] = entry;
                    self.dirty_pages.insert(index / ENTRIES_PER_PAGE);
                }
                Err(e) if first_error.is_none() => {
                    first_error = Some(store_err("writing a chunk", e))
                }
                Err(_) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn durable(&mut self, epoch: u64, tag: Tag, root: Root) {
        self.epoch = epoch;
        self.manifest_tag = tag;
        self.root = root;
        self.dirty_pages.clear();
        let now = Instant::now();
        let (gone, kept): (Vec<_>, Vec<_>) =
            self.superseded.drain(..).partition(|(_, e)| *e <= epoch);
        self.superseded = kept;
        self.garbage.extend(gone.into_iter().map(|(k, _)| (k, now)));
    }

    /// Makes every chunk written so far durable: the changed pages, then
    /// the manifest, with a conditional put on the version this writer
    /// last saw. Returns the new root (to keep locally), or `None` when
    /// nothing changed. Another writer's manifest fences this one off
    /// ([`RemoteError::Fenced`]): nothing more is written.
    pub async fn flush(&mut self) -> Result<Option<Root>, RemoteError> {
        self.writable()?;
        self.resolve().await?;
        if self.dirty_pages.is_empty() {
            // A manifest whose put was settled as done since the caller
            // last heard: its root is news.
            return Ok(self.new_root());
        }
        let epoch = self.epoch + 1;
        let mut jobs = Vec::new();
        let mut written = Vec::new();
        for p in &self.dirty_pages {
            let start = usize::try_from(p * ENTRIES_PER_PAGE).unwrap_or(usize::MAX);
            let n = self.geometry.page_len(*p);
            let session = random_u64()?;
            let page = Page {
                index: *p,
                epoch,
                session,
                entries: self.table[start..start + n].to_vec(),
            };
            let (bytes, mac) = page.encode(&self.key, &self.vault);
            written.push((*p, session, mac));
            let name = self.keys.page(*p, epoch, session);
            let objects = self.objects.clone();
            jobs.push(async move { objects.put(&name, Bytes::from(bytes), Put::Overwrite).await });
        }
        for r in bounded(jobs).await {
            r.map_err(|e| store_err("writing a page", e))?;
        }
        let mut pages = self.pages.clone();
        for (p, session, mac) in &written {
            let i = usize::try_from(*p).unwrap_or(usize::MAX);
            let old = pages[i];
            // The durable manifest's page goes once this one is durable (a
            // page of an earlier attempt at this epoch was never durable:
            // an orphan, left behind).
            if old.version != 0 && old.version != epoch {
                self.superseded
                    .push((self.keys.page(*p, old.version, old.session), epoch));
            }
            pages[i] = Entry {
                version: epoch,
                session: *session,
                mac: *mac,
            };
        }
        let manifest = Manifest {
            geometry: self.geometry,
            epoch,
            pages: pages.clone(),
        };
        let (bytes, root) = manifest.encode(&self.key, &self.vault);
        let put = self
            .objects
            .put(
                &self.keys.manifest(),
                Bytes::from(bytes.clone()),
                Put::Update(self.manifest_tag.clone()),
            )
            .await;
        match put {
            Ok(tag) => {
                self.pages = pages;
                self.durable(epoch, tag, root);
                Ok(self.new_root())
            }
            // Refused: another writer's manifest, or our own (the client
            // library retried a put that had landed): settled by reading
            // it back.
            Err(StoreError::Precondition | StoreError::AlreadyExists) => {
                self.pages = pages;
                self.uncertain = Some(bytes);
                self.resolve().await?;
                if self.epoch == epoch {
                    Ok(self.new_root())
                } else {
                    self.fenced = true;
                    Err(RemoteError::Fenced)
                }
            }
            Err(e) => {
                // It may have happened: find out before writing anything
                // under this epoch again.
                self.pages = pages;
                self.uncertain = Some(bytes);
                Err(store_err("writing the manifest", e))
            }
        }
    }

    /// The durable root, if it is not the one the caller last said it
    /// kept ([`root_kept`](ChunkStore::root_kept)): after a flush, or a
    /// write or failed flush that settled an earlier manifest put as done.
    /// It is offered again until kept.
    pub fn new_root(&self) -> Option<Root> {
        (self.root != self.kept).then_some(self.root)
    }

    /// The caller kept `root` (in the control directory).
    pub fn root_kept(&mut self, root: Root) {
        self.kept = root;
    }

    /// Deletes what no durable manifest has named for `grace` or longer
    /// (older chunk versions, older pages). Returns how many objects went.
    pub async fn collect_garbage(&mut self, grace: Duration) -> Result<usize, RemoteError> {
        self.writable()?;
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self
            .garbage
            .drain(..)
            .partition(|(_, since)| now.duration_since(*since) >= grace);
        self.garbage = later;
        let names: Vec<String> = due.into_iter().map(|(k, _)| k).collect();
        let results = bounded(
            names
                .iter()
                .map(|n| {
                    let objects = self.objects.clone();
                    let n = n.clone();
                    async move { objects.delete(&n).await }
                })
                .collect(),
        )
        .await;
        let mut gone = 0;
        for (n, r) in names.into_iter().zip(results) {
            match r {
                Ok(()) => gone += 1,
                Err(_) => self.garbage.push((n, now)),
            }
        }
        Ok(gone)
    }
}

//! [`ChunkStore`]: the volume's chunks on one object store or several
//! (mirrors), each read verified, each flush a new manifest written last
//! with a conditional put.
//!
//! With mirrors, every write goes to every store in step. A store that
//! fails, or does not answer within the degrade timeout, is marked stale
//! and the others go on (degraded mode); a flush is durable once the
//! stores in step hold it. A stale store is brought back in the
//! background ([`ChunkStore::resync`]): what changed since the epoch it
//! last held is copied to it, verified, and it rejoins. Reads come from
//! the stores in step, the one with the fewest failures first; a chunk
//! that does not verify on one is read from another and repaired.

use crate::RemoteError;
use crate::integrity::{ChunkMac, IntegrityKey, Mac};
use crate::layout::{ENTRIES_PER_PAGE, Entry, Geometry, Keys, Manifest, Name, Page, Root};
use crate::objects::{Objects, Put, StoreError, Tag};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How many object requests one call keeps in flight.
pub const IN_FLIGHT: usize = 16;

/// A stale store to ask whether it answers: its index and the store.
pub type Probe = (usize, Arc<dyn Objects>);

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

/// One of the stores a volume is written to: the first is the primary,
/// the others its mirrors.
#[derive(Clone)]
pub struct Backend {
    /// What status shows (its URL).
    pub name: String,
    /// The store.
    pub objects: Arc<dyn Objects>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("name", &self.name).finish()
    }
}

/// How mirrors degrade and come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorSettings {
    /// A store that has not answered within this is marked stale and the
    /// others go on (only with more than one store in step: a lone store
    /// is waited for, as a disk is).
    pub degrade_after: Duration,
    /// How long a stale store is left alone after a failure before the
    /// next attempt to bring it back.
    pub retry_after: Duration,
    /// Only read the stores, from the open on (an export, a sweep's dry
    /// run): nothing repaired, no mirror probed for conditional writes.
    pub read_only: bool,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        MirrorSettings {
            degrade_after: Duration::from_secs(30),
            retry_after: Duration::from_secs(30),
            read_only: false,
        }
    }
}

/// A store's standing, for status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStatus {
    /// Its name (URL).
    pub name: String,
    /// Whether it takes every write (else: stale, being brought back).
    pub in_step: bool,
    /// The epoch up to which it holds everything (`None`: not known yet).
    pub synced_epoch: Option<u64>,
    /// Epochs it lags behind the durable manifest.
    pub behind: Option<u64>,
    /// Why it is stale.
    pub reason: Option<String>,
    /// Since when it is stale (seconds since the epoch).
    pub stale_since: Option<u64>,
    /// Objects still to copy to it (as of the last resync step).
    pub to_copy: Option<u64>,
    /// Objects copied to it while bringing it back.
    pub copied: u64,
    /// Chunks it served that did not verify and were rewritten from
    /// another store.
    pub repaired: u64,
    /// Reads from it that got no answer (it is read after the others).
    pub read_errors: u64,
}

/// What a store's manifest is, as this writer knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Held {
    /// None there (a new mirror): the next manifest put is a create.
    Absent,
    /// This version: the next manifest put is conditional on it.
    At(Tag),
    /// Not known (a manifest put whose outcome is unknown, an unreachable
    /// store at open): read before anything is decided.
    Unknown,
}

struct Stale {
    reason: String,
    since: SystemTime,
    retry_at: Instant,
    to_copy: Option<u64>,
}

struct Replica {
    name: String,
    objects: Arc<dyn Objects>,
    manifest: Held,
    /// Every object a manifest of this writer's up to this epoch named is
    /// on this store (meaningless while `manifest` is `Unknown`).
    synced: u64,
    /// Whether `synced` is known to be of this writer's history (its
    /// manifest's root is one this writer made or opened). Else what it
    /// holds is checked object by object before anything is copied.
    trusted: bool,
    stale: Option<Stale>,
    /// Names copied to it since it went stale.
    copied: BTreeSet<String>,
    copied_total: u64,
    /// Every object it should hold is read back and verified before it
    /// comes back (it served bad data, or a sampled object did not
    /// verify).
    suspect: bool,
    /// Names looked at and found missing or bad since it went stale (to
    /// copy; not looked at again).
    looked: BTreeSet<String>,
    /// It served a chunk or page that did not verify, or lacked one it
    /// should hold (see [`ChunkStore::demote_bad`]).
    served_bad: std::sync::atomic::AtomicBool,
    repaired: AtomicU64,
    read_errors: AtomicU64,
}

impl Replica {
    fn new(b: Backend, manifest: Held, synced: u64) -> Self {
        Replica {
            name: b.name,
            objects: b.objects,
            manifest,
            synced,
            trusted: true,
            stale: None,
            copied: BTreeSet::new(),
            copied_total: 0,
            suspect: false,
            looked: BTreeSet::new(),
            served_bad: std::sync::atomic::AtomicBool::new(false),
            repaired: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
        }
    }
}

/// The volume on its stores.
pub struct ChunkStore {
    replicas: Vec<Replica>,
    settings: MirrorSettings,
    keys: Keys,
    vault: [u8; 16],
    key: Arc<IntegrityKey>,
    /// How chunks are authenticated (the manifest says).
    chunk_mac: ChunkMac,
    geometry: Geometry,
    /// Every chunk's entry: the durable manifest's, with changes since.
    table: Vec<Entry>,
    /// Every page's epoch, session and MAC, as the durable manifest lists
    /// them (or the manifest whose put is uncertain).
    pages: Vec<Entry>,
    /// The root the caller last said it kept.
    kept: Root,
    /// Pages changed since the durable manifest.
    dirty_pages: BTreeSet<u64>,
    /// The durable manifest's epoch; what changes since carries epoch + 1.
    epoch: u64,
    root: Root,
    /// Another writer's manifest replaced ours: nothing more is written.
    fenced: bool,
    /// A manifest put whose outcome is unknown on every store in step (an
    /// error after the request left): its bytes, resolved before anything
    /// else is written.
    uncertain: Option<Vec<u8>>,
    /// A manifest put went unanswered since the last flush that succeeded
    /// (set with `uncertain`, cleared only by a flush's success).
    unanswered: bool,
    /// Objects no durable manifest will name once the epoch in the pair is
    /// durable.
    superseded: Vec<(String, u64)>,
    /// Objects no durable manifest names, and since when.
    garbage: Vec<(String, Instant)>,
    /// Things worth a record (a store gone stale, back in step, a chunk
    /// repaired), taken by [`ChunkStore::take_events`].
    events: std::sync::Mutex<Vec<StoreEvent>>,
    /// Roots of this writer's history: the one opened, the local one, and
    /// each made durable since. A stale store whose manifest has one of
    /// them holds everything up to its epoch; another (an older session's,
    /// or another writer's) is checked object by object.
    known: Vec<Root>,
    /// Nothing is ever written (a replica opened for recovery).
    read_only: bool,
}

/// Something about the stores worth an audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// A store stopped taking writes: the others go on.
    Stale {
        /// The store.
        name: String,
        /// Why.
        reason: String,
        /// The epoch up to which it holds everything.
        synced: u64,
    },
    /// A stale store was brought back and takes every write again.
    InStep {
        /// The store.
        name: String,
        /// Objects copied to it.
        copied: u64,
    },
    /// A chunk or page that did not verify on a store was rewritten there
    /// from another.
    Repaired {
        /// The store.
        name: String,
        /// The object.
        object: String,
    },
    /// A sweep deleted objects that nothing named (left by a crash, a
    /// fenced writer, a failed flush or an interrupted import).
    Swept {
        /// How many.
        orphans: usize,
    },
    /// A sweep could not judge a store.
    Unswept {
        /// The store.
        name: String,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("keys", &self.keys)
            .field("stores", &self.replicas.len())
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
/// be refused, and of a dozen racing updates of one version only one may
/// succeed, in each of three rounds (a store that checks, then writes,
/// lets several through). A store that does not cannot fence a second
/// writer, nor keep a manifest from being overwritten by an older one: it
/// is refused. The race is a probe, not a proof: a store that is not
/// atomic can come out of three rounds with one winner each, by chance.
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
        let current = match objects
            .put(&probe, data.clone(), Put::Update(first.clone()))
            .await
        {
            Ok(t) => t,
            Err(StoreError::Unsupported(why)) => return Err(refuse(why)),
            Err(e) => {
                return Err(refuse(format!(
                    "an update of the current version was refused ({e})"
                )));
            }
        };
        // Atomic: of racing updates of one version, one wins. A store
        // that checks and then writes lets several through, and a second
        // writer racing the first would not be fenced. A race can come out
        // serialized by chance (a loaded host, a small pool), so it is run
        // a few times, each on the version the last one left.
        // Each update's body is its own (an ETag is often the body's hash,
        // and an update that leaves the ETag as it was would let the next
        // one through on a store that is atomic).
        let mut current = current;
        for round in 0..RACE_ROUNDS {
            let racing = futures::future::join_all((0..RACERS).map(|k| {
                let (probe, current) = (&probe, current.clone());
                async move {
                    let body = format!("coffre conditional-write race {round}.{k}");
                    objects
                        .put(probe, Bytes::from(body), Put::Update(current))
                        .await
                }
            }))
            .await;
            // A racer loses only by the store's refusal; any other error
            // ends the probe (a store that fails is not one that fences).
            let mut won: Vec<Tag> = Vec::new();
            for r in racing {
                match r {
                    Ok(tag) => won.push(tag),
                    Err(StoreError::Precondition | StoreError::AlreadyExists) => {}
                    Err(StoreError::Unsupported(why)) => return Err(refuse(why)),
                    Err(e) => return Err(store_err("the conditional-write probe", e)),
                }
            }
            match won.len() {
                0 => {
                    return Err(refuse(format!(
                        "none of {RACERS} racing updates of the current version succeeded"
                    )));
                }
                1 => current = won.into_iter().next().unwrap_or(current),
                n => {
                    return Err(refuse(format!(
                        "its conditional puts are not atomic: {n} of {RACERS} racing updates of one version succeeded"
                    )));
                }
            }
        }
        Ok(())
    }
    .await;
    let _ = objects.delete(&probe).await;
    result
}

/// Racing updates in each round of the conditional-write probe.
const RACERS: usize = 12;

/// Rounds of racing updates in the conditional-write probe.
const RACE_ROUNDS: usize = 3;

/// [`check_conditional_writes`] within a time limit (four requests, then
/// three races of a dozen).
async fn conditional_writes(
    objects: &dyn Objects,
    keys: &Keys,
    limit: Option<Duration>,
) -> Result<(), RemoteError> {
    match limit {
        None => check_conditional_writes(objects, keys).await,
        Some(d) => tokio::time::timeout(10 * d, check_conditional_writes(objects, keys))
            .await
            .unwrap_or_else(|_| {
                Err(RemoteError::Store(format!(
                    "the conditional-write probe: no answer within {} s",
                    (10 * d).as_secs_f64()
                )))
            }),
    }
}

/// Runs `jobs`, at most `n` at once, their results in the jobs' order.
/// A sliding window: the next job starts as soon as any one ends (where
/// batches of `n` each waited for their slowest before the next began).
async fn bounded<T, F>(jobs: Vec<F>, n: usize) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    use futures::StreamExt;
    let count = jobs.len();
    // Unordered (an ordered buffer counts the jobs done behind a slow
    // first one as still running), put back in order after.
    let mut done: Vec<(usize, T)> = futures::stream::iter(
        jobs.into_iter()
            .enumerate()
            .map(|(i, f)| async move { (i, f.await) }),
    )
    .buffer_unordered(n.max(1))
    .collect()
    .await;
    done.sort_unstable_by_key(|(i, _)| *i);
    debug_assert_eq!(done.len(), count);
    done.into_iter().map(|(_, t)| t).collect()
}

/// Runs `jobs`, laid out object by object and, within each, store by
/// store (`stores` of them), at most [`IN_FLIGHT`] at once on each store
/// (a slow store's jobs never take a fast one's places, nor wait past
/// their limit behind more than that); results in the jobs' order.
async fn bounded_per_store<T, F>(jobs: Vec<F>, stores: usize) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let stores = stores.max(1);
    let count = jobs.len();
    let mut lanes: Vec<Vec<F>> = (0..stores).map(|_| Vec::new()).collect();
    for (k, job) in jobs.into_iter().enumerate() {
        lanes[k % stores].push(job);
    }
    let mut done: Vec<std::vec::IntoIter<T>> =
        futures::future::join_all(lanes.into_iter().map(|l| bounded(l, IN_FLIGHT)))
            .await
            .into_iter()
            .map(Vec::into_iter)
            .collect();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.div_ceil(stores) {
        for lane in &mut done {
            out.extend(lane.next());
        }
    }
    out
}

/// `f`, or a store error once `limit` has passed.
async fn timed<T>(
    limit: Option<Duration>,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f).await.unwrap_or_else(|_| {
            Err(StoreError::Other(format!(
                "no answer within {} s",
                d.as_secs_f64()
            )))
        }),
    }
}

/// How one store's manifest looked at open.
enum Seen {
    Manifest(Box<Manifest>, Root, Tag),
    Empty,
    Bad(RemoteError, Tag),
    Down(StoreError),
}

/// Puts of objects on the stores in step, to run without the store.
pub struct Puts {
    stores: Vec<Arc<dyn Objects>>,
    targets: Vec<usize>,
    limit: Option<Duration>,
    objects: Vec<(String, Bytes)>,
    what: &'static str,
}

impl Puts {
    /// Runs every put ([`IN_FLIGHT`] per store at once); a result per
    /// object and store, in that order.
    pub async fn run(&self) -> Vec<Result<Tag, StoreError>> {
        let mut jobs = Vec::with_capacity(self.objects.len() * self.stores.len());
        for (name, bytes) in &self.objects {
            for o in &self.stores {
                let (name, bytes, limit) = (name.clone(), bytes.clone(), self.limit);
                jobs.push(async move { timed(limit, o.put(&name, bytes, Put::Overwrite)).await });
            }
        }
        bounded_per_store(jobs, self.stores.len()).await
    }

    /// How many puts: one per object and store.
    pub fn count(&self) -> usize {
        self.objects.len() * self.stores.len()
    }
}

/// Chunks named by [`ChunkStore::prepare_chunks`], to put and MAC
/// ([`Upload::run`]) and record ([`ChunkStore::finish_chunks`]).
pub struct Upload {
    epoch: u64,
    /// Each chunk's place in the table, index and entry (its MAC made by
    /// [`Upload::run`]), in the order of the puts' objects.
    done: Vec<(usize, u64, Entry)>,
    puts: Puts,
    /// To MAC the chunks while they are put.
    key: Arc<IntegrityKey>,
    chunk_mac: ChunkMac,
    vault: [u8; 16],
}

/// What [`Upload::run`] did: a result per put, as [`Puts::run`] gives
/// them, and each chunk's MAC (or why they could not be made).
pub struct Landed {
    results: Vec<Result<Tag, StoreError>>,
    macs: Result<Vec<Mac>, String>,
}

impl Upload {
    /// The chunks' indices.
    pub fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.done.iter().map(|(_, index, _)| *index)
    }

    /// The objects' names (for a sweep while it runs).
    pub fn names(&self) -> impl Iterator<Item = &String> + '_ {
        self.puts.objects.iter().map(|(name, _)| name)
    }

    /// Puts the chunks, and makes their MACs meanwhile on threads of their
    /// own: the puts do not need them (the MACs go to the table, at
    /// [`ChunkStore::finish_chunks`]), so the stores are not left idle
    /// while they are made. The MACs cover the very bytes put: both are
    /// the same shared, immutable `Bytes`.
    pub async fn run(&self) -> Landed {
        let items: Vec<((u64, u64, u64), Bytes)> = self
            .done
            .iter()
            .zip(&self.puts.objects)
            .map(|((_, index, e), (_, data))| ((*index, e.version, e.session), data.clone()))
            .collect();
        let (key, how, vault) = (self.key.clone(), self.chunk_mac, self.vault);
        let macs = tokio::task::spawn_blocking(move || {
            spread(&items, |(place, data)| {
                key.chunk_mac(how, &vault, *place, data)
            })
        });
        let results = self.puts.run().await;
        Landed {
            results,
            // A panic while making them keeps its message.
            macs: macs.await.map_err(|e| e.to_string()),
        }
    }

    /// What a run that did not end gives: every put failed with `why`.
    pub fn failed(&self, why: &str) -> Landed {
        Landed {
            results: vec![Err(StoreError::Other(why.to_owned())); self.puts.count()],
            macs: Err(why.to_owned()),
        }
    }
}

/// Chunks to fetch without the store ([`ChunkStore::prepare_reads`]):
/// read-ahead in the background.
pub struct Reads {
    items: Vec<(u64, Entry, String, usize)>,
    stores: Vec<Arc<dyn Objects>>,
    /// Which store each of `stores` is.
    order: Vec<usize>,
    /// Stores (by index) that served bytes that did not verify, and for
    /// which item.
    bad: std::sync::Mutex<BTreeSet<(usize, usize)>>,
    limit: Option<Duration>,
    /// To verify each chunk as it arrives (not under the device's lock).
    key: Arc<IntegrityKey>,
    chunk_mac: ChunkMac,
    vault: [u8; 16],
}

impl Reads {
    /// Fetches each chunk from the first store that has bytes that
    /// verify against the entry the chunk had when the reads were
    /// prepared ([`ChunkStore::finish_reads`] keeps only those whose entry
    /// is still the same); `None` where none did (the read then goes the
    /// usual way, with its fallbacks and repairs).
    pub async fn run(self: &Arc<Self>) -> Vec<Option<Bytes>> {
        // A task each: the chunks are verified on every worker thread.
        let tasks: Vec<_> = (0..self.items.len())
            .map(|k| {
                let me = self.clone();
                tokio::spawn(async move { me.fetch_one(k).await })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.ok().flatten());
        }
        out
    }

    async fn fetch_one(&self, k: usize) -> Option<Bytes> {
        let (index, entry, name, len) = self.items.get(k)?;
        if entry.version == 0 {
            return Some(Bytes::from(crate::bufpool::zeroed(*len)));
        }
        for (o, i) in self.stores.iter().zip(&self.order) {
            match timed(self.limit, o.get(name, *len)).await {
                Ok(Some((b, _)))
                    if chunk_verifies(
                        (&self.key, self.chunk_mac, &self.vault),
                        (*index, entry, *len),
                        &b,
                    ) =>
                {
                    return Some(b);
                }
                // Bad bytes (not a missing object: its put may
                // still be on its way).
                Ok(Some(_)) => {
                    self.bad
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((*i, k));
                }
                Ok(None) | Err(_) => {}
            }
        }
        None
    }
}

/// `f` of each item, on up to four threads when there are several (the
/// MAC is most of the CPU a write of a chunk costs).
fn spread<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if items.len() < 2 || threads < 2 {
        return items.iter().map(&f).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Whether `bytes` are chunk `index` as `entry` lists it (`len` bytes,
/// its MAC over the vault, index, version and session).
fn chunk_verifies(
    (key, how, vault): (&IntegrityKey, ChunkMac, &[u8; 16]),
    (index, entry, len): (u64, &Entry, usize),
    bytes: &[u8],
) -> bool {
    bytes.len() == len
        && IntegrityKey::verify(
            &entry.mac,
            &key.chunk_mac(how, vault, (index, entry.version, entry.session), bytes),
        )
}

/// An object to copy to a stale store, and how to check it.
#[derive(Clone, Copy)]
enum Check {
    Chunk(u64, Entry),
    Page(u64, Entry),
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
        Self::create_mirrored(
            vec![Backend {
                name: "the store".into(),
                objects,
            }],
            MirrorSettings::default(),
            prefix,
            (vault, key),
            geometry,
        )
        .await
    }

    /// [`create`](ChunkStore::create) on every store of `backends` (the
    /// primary, then its mirrors): each must honour conditional writes and
    /// hold no volume under `prefix`.
    pub async fn create_mirrored(
        backends: Vec<Backend>,
        settings: MirrorSettings,
        prefix: &str,
        vault_key: ([u8; 16], IntegrityKey),
        geometry: Geometry,
    ) -> Result<(Self, Root), RemoteError> {
        Self::create_with_chunk_mac(
            backends,
            settings,
            prefix,
            vault_key,
            (geometry, ChunkMac::NEW),
        )
        .await
    }

    /// [`create_mirrored`](ChunkStore::create_mirrored) with chunks
    /// authenticated `chunk_mac`'s way: for the tests, a store as made
    /// before keyed BLAKE3 ([`ChunkMac::HmacSha256`]).
    #[doc(hidden)]
    pub async fn create_with_chunk_mac(
        backends: Vec<Backend>,
        settings: MirrorSettings,
        prefix: &str,
        (vault, key): ([u8; 16], IntegrityKey),
        (geometry, chunk_mac): (Geometry, ChunkMac),
    ) -> Result<(Self, Root), RemoteError> {
        if backends.is_empty() {
            return Err(RemoteError::Config(
                "no store to create the volume on".into(),
            ));
        }
        let keys = Keys::new(prefix);
        let many = backends.len() > 1;
        for b in &backends {
            b.objects
                .prepare(&geometry)
                .await
                .map_err(|e| at(many, &b.name, e))?;
            check_conditional_writes(b.objects.as_ref(), &keys)
                .await
                .map_err(|e| at(many, &b.name, e))?;
        }
        let pages = vec![Entry::EMPTY; usize::try_from(geometry.pages()).unwrap_or(0)];
        let manifest = Manifest {
            geometry,
            epoch: 0,
            pages: pages.clone(),
            chunk_mac,
        };
        let (bytes, root) = manifest.encode(&key, &vault);
        let mut replicas = Vec::with_capacity(backends.len());
        for b in backends {
            let tag = match b
                .objects
                .put(&keys.manifest(), Bytes::from(bytes.clone()), Put::Create)
                .await
            {
                Ok(t) => t,
                Err(StoreError::AlreadyExists | StoreError::Precondition) => {
                    return Err(RemoteError::Config(format!(
                        "{}{} already holds a volume: choose another prefix, or open it",
                        if many {
                            format!("{}: ", b.name)
                        } else {
                            String::new()
                        },
                        keys.manifest()
                    )));
                }
                Err(e) => {
                    return Err(at(
                        many,
                        &b.name,
                        store_err("writing the first manifest", e),
                    ));
                }
            };
            replicas.push(Replica::new(b, Held::At(tag), 0));
        }
        let table = vec![Entry::EMPTY; usize::try_from(geometry.chunks()).unwrap_or(0)];
        let store = ChunkStore::assemble(
            (replicas, settings, keys, vault, key),
            (geometry, chunk_mac, table, pages),
            (0, root),
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
        Self::open_mirrored(
            vec![Backend {
                name: "the store".into(),
                objects,
            }],
            MirrorSettings::default(),
            prefix,
            (vault, key),
            (local, trust_store_epoch),
        )
        .await
    }

    /// [`open`](ChunkStore::open) over several stores: the newest
    /// authentic manifest among them is the volume (checked against
    /// `local` as a lone store's is); the stores that hold it are in step,
    /// the others (behind, empty, unreachable, or whose manifest does not
    /// verify) stale, to be brought back by [`resync`](ChunkStore::resync).
    /// Two stores with different manifests at the same epoch are two
    /// histories: refused.
    pub async fn open_mirrored(
        backends: Vec<Backend>,
        settings: MirrorSettings,
        prefix: &str,
        (vault, key): ([u8; 16], IntegrityKey),
        (local, trust_store_epoch): (Option<Root>, bool),
    ) -> Result<(Self, Opened), RemoteError> {
        if backends.is_empty() {
            return Err(RemoteError::Config(
                "no store to open the volume from".into(),
            ));
        }
        let keys = Keys::new(prefix);
        let many = backends.len() > 1;
        let limit = many.then_some(settings.degrade_after);
        let name = keys.manifest();
        let got = futures::future::join_all(
            backends
                .iter()
                .map(|b| timed(limit, b.objects.get(&name, MAX_MANIFEST))),
        )
        .await;
        let seen: Vec<Seen> = got
            .into_iter()
            .map(|g| match g {
                Err(e) => Seen::Down(e),
                Ok(None) => Seen::Empty,
                Ok(Some((bytes, tag))) => match Manifest::decode(&bytes, &key, &vault) {
                    Ok((m, root)) => Seen::Manifest(Box::new(m), root, tag),
                    Err(e) => Seen::Bad(e, tag),
                },
            })
            .collect();
        // A block device's layout is its volume's: else every read of it
        // would fail its MAC. A store whose layout is not its manifest's
        // geometry is as one whose manifest does not verify (a mirror is
        // stale, the volume opened from another; alone, refused).
        let layouts =
            futures::future::join_all(backends.iter().zip(&seen).map(|(b, s)| async move {
                match s {
                    Seen::Manifest(m, ..) => {
                        timed(limit, async { Ok(b.objects.opened(&m.geometry).await) })
                            .await
                            .unwrap_or_else(|e| Err(store_err("reading its layout", e)))
                    }
                    _ => Ok(()),
                }
            }))
            .await;
        let seen: Vec<Seen> = seen
            .into_iter()
            .zip(layouts)
            .map(|(s, layout)| match (s, layout) {
                (Seen::Manifest(_, _, tag), Err(e)) => Seen::Bad(e, tag),
                (s, _) => s,
            })
            .collect();
        let best = seen
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Seen::Manifest(m, root, _) => Some((i, m.epoch, *root)),
                _ => None,
            })
            .fold(None, |acc: Option<(usize, u64, Root)>, x| match acc {
                Some(a) if a.1 >= x.1 => Some(a),
                _ => Some(x),
            });
        let Some((best_i, _, root)) = best else {
            // Nothing authentic anywhere: say why, the primary's reason
            // first.
            for (b, s) in backends.iter().zip(&seen) {
                match s {
                    Seen::Bad(e, _) => return Err(at(many, &b.name, e.clone())),
                    Seen::Down(e) => {
                        return Err(at(
                            many,
                            &b.name,
                            store_err("reading the manifest", e.clone()),
                        ));
                    }
                    _ => {}
                }
            }
            return Err(RemoteError::Empty {
                local: local.map(|r| r.epoch),
            });
        };
        for s in &seen {
            if let Seen::Manifest(m, r, _) = s
                && m.epoch == root.epoch
                && *r != root
            {
                return Err(RemoteError::Forked { epoch: root.epoch });
            }
        }
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
        let Seen::Manifest(manifest, _, _) = &seen[best_i] else {
            unreachable!("the best store holds a manifest")
        };
        let manifest = (**manifest).clone();
        // The others are to hold this volume too: a block device down now,
        // or empty, is held to its geometry from its first use on (never
        // written through another layout). Nothing to say yet.
        for (b, s) in backends.iter().zip(&seen) {
            if !matches!(s, Seen::Manifest(..)) {
                let _ = timed(limit, async {
                    Ok(b.objects.opened(&manifest.geometry).await)
                })
                .await;
            }
        }
        let now = Instant::now();
        let mut replicas = Vec::with_capacity(backends.len());
        for (b, s) in backends.into_iter().zip(seen) {
            let (held, synced, reason) = match s {
                Seen::Manifest(m, r, tag) if r == root => (Held::At(tag), m.epoch, None),
                Seen::Manifest(m, r, tag) => (
                    Held::At(tag),
                    if local.is_some_and(|l| l == r) {
                        m.epoch
                    } else {
                        0
                    },
                    Some(format!(
                        "behind: it holds epoch {}, the volume is at {}",
                        m.epoch, root.epoch
                    )),
                ),
                // Not probed when only reading: the probe writes.
                Seen::Empty if settings.read_only => (
                    Held::Unknown,
                    0,
                    Some("it holds no volume (not probed: opened read-only)".to_string()),
                ),
                Seen::Empty => match conditional_writes(b.objects.as_ref(), &keys, limit).await {
                    Ok(()) => (
                        Held::Absent,
                        0,
                        Some("it holds no volume yet (a new mirror)".to_string()),
                    ),
                    // Checked again (and refused again) before it is used.
                    Err(e) => (Held::Unknown, 0, Some(e.to_string())),
                },
                Seen::Bad(e, tag) => (Held::At(tag), 0, Some(e.to_string())),
                Seen::Down(e) => (Held::Unknown, 0, Some(e.to_string())),
            };
            // A store behind at a root not of this history (an older
            // session's) is checked object by object.
            let trusted = synced > 0 || reason.is_none() || held == Held::Absent;
            let mut r = Replica::new(b, held, synced);
            r.trusted = trusted;
            if let Some(reason) = reason {
                r.stale = Some(Stale {
                    reason,
                    since: SystemTime::now(),
                    retry_at: now,
                    to_copy: None,
                });
            }
            replicas.push(r);
        }
        let geometry = manifest.geometry;
        let table = vec![Entry::EMPTY; usize::try_from(geometry.chunks()).unwrap_or(0)];
        let read_only = settings.read_only;
        let mut store = ChunkStore::assemble(
            (replicas, settings, keys, vault, key),
            (geometry, manifest.chunk_mac, table, manifest.pages.clone()),
            (manifest.epoch, root),
        );
        if let Some(l) = local
            && l != root
        {
            store.known.push(l);
        }
        // From the first page read on: a page bad on one store is not
        // put back there.
        store.read_only = read_only;
        store.load_pages().await?;
        store.hint_durable(0);
        for r in &store.replicas {
            if let Some(s) = &r.stale {
                store.event(StoreEvent::Stale {
                    name: r.name.clone(),
                    reason: s.reason.clone(),
                    synced: r.synced,
                });
            }
        }
        Ok((store, Opened { root, ahead_by }))
    }

    /// Tells every store which chunks and pages the durable manifest names
    /// (those written after epoch `after`): a block device never writes
    /// over them.
    fn hint_durable(&self, after: u64) {
        let epoch = self.epoch;
        for r in &self.replicas {
            let chunks = self
                .table
                .iter()
                .enumerate()
                .filter(|(_, e)| e.version > after && e.version <= epoch)
                .map(|(i, e)| Name::Chunk(i as u64, e.version, e.session));
            let pages = self
                .pages
                .iter()
                .enumerate()
                .filter(|(_, e)| e.version > after && e.version <= epoch)
                .map(|(p, e)| Name::Page(p as u64, e.version, e.session));
            r.objects.durable(&mut chunks.chain(pages));
        }
    }

    /// Reads and verifies every page the manifest lists into the table.
    async fn load_pages(&mut self) -> Result<(), RemoteError> {
        let wanted: Vec<(u64, Entry)> = self
            .pages
            .iter()
            .enumerate()
            .filter(|(_, e)| e.version > 0)
            .map(|(i, e)| (i as u64, *e))
            .collect();
        let fetched = bounded(
            wanted
                .iter()
                .map(|(p, e)| self.fetch_page(*p, *e))
                .collect(),
            IN_FLIGHT,
        )
        .await;
        for ((p, _), page) in wanted.iter().zip(fetched) {
            let page = page?;
            let start = usize::try_from(p * ENTRIES_PER_PAGE).unwrap_or(usize::MAX);
            self.table[start..start + page.entries.len()].copy_from_slice(&page.entries);
        }
        Ok(())
    }

    async fn fetch_page(&self, p: u64, e: Entry) -> Result<Page, RemoteError> {
        let name = self.keys.page(p, e.version, e.session);
        let order = self.read_order(e.version);
        self.fetch(
            &order,
            &name,
            Page::max_len(),
            &format!("page {p} at epoch {}, which the manifest lists,", e.version),
            |bytes| self.check_page(p, &e, bytes),
        )
        .await
    }

    fn check_page(&self, p: u64, e: &Entry, bytes: &[u8]) -> Result<Page, RemoteError> {
        Page::decode(
            bytes,
            &self.key,
            &self.vault,
            (p, self.geometry.page_len(p)),
            e,
        )
    }

    /// A store as the durable manifest `(epoch, root)` left it.
    fn assemble(
        (replicas, settings, keys, vault, key): (
            Vec<Replica>,
            MirrorSettings,
            Keys,
            [u8; 16],
            IntegrityKey,
        ),
        (geometry, chunk_mac, table, pages): (Geometry, ChunkMac, Vec<Entry>, Vec<Entry>),
        (epoch, root): (u64, Root),
    ) -> Self {
        ChunkStore {
            replicas,
            settings,
            keys,
            vault,
            key: Arc::new(key),
            chunk_mac,
            geometry,
            table,
            pages,
            kept: root,
            dirty_pages: BTreeSet::new(),
            epoch,
            root,
            fenced: false,
            uncertain: None,
            unanswered: false,
            superseded: Vec::new(),
            garbage: Vec::new(),
            events: std::sync::Mutex::new(Vec::new()),
            known: vec![root],
            read_only: false,
        }
    }

    /// The volume's shape.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// How the store's chunks are authenticated.
    pub fn chunk_mac(&self) -> ChunkMac {
        self.chunk_mac
    }

    /// The durable manifest's root.
    pub fn root(&self) -> Root {
        self.root
    }

    /// Whether a manifest put went unanswered since the last flush that
    /// succeeded: the next epoch's manifest may be durable, whatever its
    /// settling said (a store demoted meanwhile was not asked; a put the
    /// client gave up on may land after the settle's read).
    pub fn unanswered_since_flush(&self) -> bool {
        self.unanswered
    }

    /// Whether another writer fenced this one off.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether changes wait for a flush.
    pub fn is_dirty(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// From now on nothing is written to any store: no write, flush,
    /// repair, resync or garbage collection (a replica opened for
    /// disaster recovery, an export). Reads still verify everything.
    pub fn set_read_only(&mut self) {
        self.read_only = true;
    }

    /// How many stores the volume is written to.
    pub fn stores(&self) -> usize {
        self.replicas.len()
    }

    /// Each store's standing.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .map(|r| {
                let known = r.manifest != Held::Unknown;
                ReplicaStatus {
                    name: r.name.clone(),
                    in_step: r.stale.is_none(),
                    synced_epoch: known.then_some(r.synced),
                    behind: known.then(|| self.epoch.saturating_sub(r.synced)),
                    reason: r.stale.as_ref().map(|s| s.reason.clone()),
                    stale_since: r.stale.as_ref().map(|s| {
                        s.since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs())
                    }),
                    to_copy: r.stale.as_ref().and_then(|s| s.to_copy),
                    copied: r.copied_total,
                    repaired: r.repaired.load(Ordering::Relaxed),
                    read_errors: r.read_errors.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// What happened to the stores since the last call.
    pub fn take_events(&self) -> Vec<StoreEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn event(&self, e: StoreEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// The stores taking every write.
    fn in_step(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|i| self.replicas[*i].stale.is_none())
            .collect()
    }

    /// A store is waited for at most the degrade timeout when another in
    /// step can go on without it.
    fn limit(&self, stores: usize) -> Option<Duration> {
        (stores > 1).then_some(self.settings.degrade_after)
    }

    /// Where to read an object written at `version` from: the stores in
    /// step, fewest failed reads first (the primary first among equals),
    /// then the stale ones known to hold it.
    fn read_order(&self, version: u64) -> Vec<usize> {
        let mut order = self.in_step();
        order.sort_by_key(|i| self.replicas[*i].read_errors.load(Ordering::Relaxed));
        order.extend((0..self.replicas.len()).filter(|i| {
            let r = &self.replicas[*i];
            r.stale.is_some() && r.manifest != Held::Unknown && r.synced >= version
        }));
        order
    }

    /// Store `i` stops taking writes.
    fn mark_stale(&mut self, i: usize, reason: String) {
        let retry_at = Instant::now() + self.settings.retry_after;
        let r = &mut self.replicas[i];
        if let Some(s) = &mut r.stale {
            s.reason = reason;
            s.retry_at = retry_at;
            return;
        }
        r.stale = Some(Stale {
            reason: reason.clone(),
            since: SystemTime::now(),
            retry_at,
            to_copy: None,
        });
        r.copied.clear();
        r.looked.clear();
        let e = StoreEvent::Stale {
            name: r.name.clone(),
            reason,
            synced: r.synced,
        };
        self.event(e);
    }

    /// Reads `name` from the stores in `order` until one gives bytes that
    /// `verify` accepts. A store that lacked them or gave bad ones is
    /// rewritten from the good bytes (the same name, the same bytes).
    async fn fetch<T>(
        &self,
        order: &[usize],
        name: &str,
        max: usize,
        what: &str,
        verify: impl Fn(&Bytes) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        let limit = self.limit(order.len());
        let mut bad: Vec<usize> = Vec::new();
        let mut tampered = None;
        let mut failed = None;
        for &i in order {
            let r = &self.replicas[i];
            let got = timed(limit, r.objects.get(name, max)).await;
            let miss = match got {
                Ok(Some((bytes, _))) => match verify(&bytes) {
                    Ok(t) => {
                        for &j in &bad {
                            self.replicas[j].served_bad.store(true, Ordering::Relaxed);
                        }
                        if !self.read_only {
                            for j in bad {
                                self.repair(j, name, bytes.clone(), limit).await;
                            }
                        }
                        return Ok(t);
                    }
                    Err(e) => e,
                },
                Ok(None) => RemoteError::Tampered(format!("{what} is missing from the store")),
                // Only failures to answer put a store behind the others
                // for reads: bad data is repaired at once.
                Err(e) => {
                    r.read_errors.fetch_add(1, Ordering::Relaxed);
                    failed.get_or_insert_with(|| store_err(&format!("reading {what}"), e));
                    continue;
                }
            };
            bad.push(i);
            tampered.get_or_insert(miss);
        }
        Err(tampered
            .or(failed)
            .unwrap_or_else(|| RemoteError::Store("no store holds it".into())))
    }

    async fn repair(&self, i: usize, name: &str, bytes: Bytes, limit: Option<Duration>) {
        let r = &self.replicas[i];
        if timed(limit, r.objects.put(name, bytes, Put::Overwrite))
            .await
            .is_ok()
        {
            r.repaired.fetch_add(1, Ordering::Relaxed);
            self.event(StoreEvent::Repaired {
                name: r.name.clone(),
                object: name.to_string(),
            });
        }
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
                &self.key.chunk_mac(
                    self.chunk_mac,
                    &self.vault,
                    (index, e.version, e.session),
                    data,
                ),
            )
    }

    fn verify_chunk(&self, index: u64, entry: &Entry, bytes: &[u8]) -> Result<(), RemoteError> {
        let len = self.geometry.chunk_len(index);
        if !chunk_verifies(
            (&self.key, self.chunk_mac, &self.vault),
            (index, entry, len),
            bytes,
        ) {
            return Err(RemoteError::Tampered(format!(
                "chunk {index} version {} does not verify (altered, an older version, or another chunk's)",
                entry.version
            )));
        }
        Ok(())
    }

    /// Chunk `index`'s ciphertext, verified (zeros if never written); from
    /// another store when one does not verify (and repaired there).
    pub async fn read_chunk(&self, index: u64) -> Result<Vec<u8>, RemoteError> {
        let i = self.check_index(index)?;
        let entry = self.table[i];
        let len = self.geometry.chunk_len(index);
        if entry.version == 0 {
            return Ok(crate::bufpool::zeroed(len));
        }
        let name = self.keys.chunk(index, entry.version, entry.session);
        let order = self.read_order(entry.version);
        self.fetch(
            &order,
            &name,
            len,
            &format!("chunk {index} version {}", entry.version),
            |bytes| {
                self.verify_chunk(index, &entry, bytes)?;
                Ok(bytes.clone())
            },
        )
        .await
        // Without a copy where the buffer is not shared.
        .map(Vec::from)
    }

    /// Chunks to fetch in the background ([`Reads::run`]), from the
    /// stores in step.
    pub fn prepare_reads(&self, indices: &[u64]) -> Reads {
        let order = self.read_order(u64::MAX);
        Reads {
            items: indices
                .iter()
                .filter_map(|i| {
                    let k = self.check_index(*i).ok()?;
                    let e = self.table[k];
                    Some((
                        *i,
                        e,
                        self.keys.chunk(*i, e.version, e.session),
                        self.geometry.chunk_len(*i),
                    ))
                })
                .collect(),
            limit: self.limit(order.len()),
            key: self.key.clone(),
            chunk_mac: self.chunk_mac,
            vault: self.vault,
            stores: order
                .iter()
                .map(|i| self.replicas[*i].objects.clone())
                .collect(),
            order,
            bad: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    /// What [`Reads::run`] fetched and verified, kept where the table
    /// still lists the entry it was verified against: a chunk written
    /// since is left out (read again the usual way if wanted).
    pub fn finish_reads(&self, reads: &Reads, got: Vec<Option<Bytes>>) -> Vec<(u64, Vec<u8>)> {
        // Bad bytes for an entry the table still lists are the store's
        // fault (for one rewritten since, they may be a reused slot's).
        for (i, k) in reads.bad.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let unchanged = reads.items.get(*k).is_some_and(|(index, entry, _, _)| {
                self.check_index(*index)
                    .is_ok_and(|t| self.table[t] == *entry)
            });
            if unchanged && let Some(r) = self.replicas.get(*i) {
                r.served_bad.store(true, Ordering::Relaxed);
            }
        }
        reads
            .items
            .iter()
            .zip(got)
            .filter_map(|((index, entry, _, _), bytes)| {
                let bytes = bytes?;
                let k = self.check_index(*index).ok()?;
                let now = self.table[k];
                if now != *entry {
                    return None;
                }
                // Verified by `run`, against this same entry; handed over
                // without a copy where the buffer is not shared.
                Some((*index, Vec::from(bytes)))
            })
            .collect()
    }

    /// Several chunks, as [`read_chunk`](ChunkStore::read_chunk) reads
    /// each, [`IN_FLIGHT`] at once.
    pub async fn read_chunks(&self, indices: &[u64]) -> Vec<Result<Vec<u8>, RemoteError>> {
        bounded(
            indices.iter().map(|i| self.read_chunk(*i)).collect(),
            IN_FLIGHT,
        )
        .await
    }

    /// Settles a manifest put whose outcome was unknown on every store in
    /// step: it happened where a store now holds exactly those bytes.
    async fn resolve(&mut self) -> Result<(), RemoteError> {
        let Some(attempt) = self.uncertain.take() else {
            return Ok(());
        };
        let targets = self.in_step();
        let limit = self.limit(targets.len());
        let name = self.keys.manifest();
        let got = futures::future::join_all(
            targets
                .iter()
                .map(|i| timed(limit, self.replicas[*i].objects.get(&name, MAX_MANIFEST))),
        )
        .await;
        let mut landed = Vec::new();
        let mut not_landed = Vec::new();
        let mut unknown = None;
        for (&i, g) in targets.iter().zip(got) {
            match g {
                Ok(Some((bytes, tag))) if bytes.as_ref() == attempt.as_slice() => {
                    landed.push((i, tag));
                }
                // Not done there (the version this writer last saw, or the
                // store's doing): not another writer's.
                Ok(found) if !self.another_writer(found.as_ref().map(|(b, _)| b.as_ref())) => {
                    not_landed.push(i);
                }
                Ok(_) => {
                    self.fenced = true;
                    return Err(RemoteError::Fenced);
                }
                Err(e) => {
                    unknown.get_or_insert((
                        i,
                        store_err(
                            "reading the manifest after a put whose outcome is unknown",
                            e,
                        ),
                    ));
                }
            }
        }
        if landed.is_empty() {
            if let Some((_, e)) = unknown {
                self.uncertain = Some(attempt);
                return Err(e);
            }
            return Ok(());
        }
        let (m, root) = Manifest::decode(&attempt, &self.key, &self.vault)?;
        self.landed(m.epoch, root, landed);
        for i in not_landed.into_iter().chain(unknown.map(|(i, _)| i)) {
            self.replicas[i].manifest = Held::Unknown;
            self.mark_stale(i, "its manifest put did not land".into());
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), RemoteError> {
        if self.fenced {
            return Err(RemoteError::Fenced);
        }
        if self.read_only {
            return Err(RemoteError::Config(
                "the volume was opened read-only: nothing is written".into(),
            ));
        }
        Ok(())
    }

    /// Puts each `(name, bytes)` on every store in step: the stores that
    /// took them all go on; the others are marked stale if at least one
    /// took them all. Returns which `(name)`s are on every store still in
    /// step, and the first error when none took them all.
    async fn put_everywhere(
        &mut self,
        objects: Vec<(String, Bytes)>,
        what: &'static str,
    ) -> (Vec<bool>, Option<RemoteError>) {
        let puts = self.puts(objects, what);
        let results = puts.run().await;
        self.settle_puts(&puts, results)
    }

    /// The puts of `objects` on every store in step, to run without the
    /// store (see [`Puts::run`]).
    fn puts(&self, objects: Vec<(String, Bytes)>, what: &'static str) -> Puts {
        let targets = self.in_step();
        Puts {
            stores: targets
                .iter()
                .map(|i| self.replicas[*i].objects.clone())
                .collect(),
            limit: self.limit(targets.len()),
            targets,
            objects,
            what,
        }
    }

    /// What the puts did: see [`put_everywhere`](ChunkStore::put_everywhere).
    fn settle_puts(
        &mut self,
        puts: &Puts,
        results: Vec<Result<Tag, StoreError>>,
    ) -> (Vec<bool>, Option<RemoteError>) {
        let (targets, what) = (&puts.targets, puts.what);
        if targets.is_empty() {
            return (
                vec![false; puts.objects.len()],
                Some(RemoteError::Store("no store is in step".into())),
            );
        }
        let mut ok = vec![true; puts.objects.len()];
        let mut errors: Vec<Option<StoreError>> = vec![None; targets.len()];
        for (k, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                ok[k / targets.len()] = false;
                errors[k % targets.len()].get_or_insert(e);
            }
        }
        if errors.iter().all(Option::is_none) {
            return (ok, None);
        }
        // Survivors that are still in step (one may have been left behind
        // while the puts ran).
        let survivors = targets
            .iter()
            .zip(&errors)
            .filter(|(t, e)| e.is_none() && self.replicas[**t].stale.is_none())
            .count();
        if survivors > 0 {
            for (t, e) in targets.iter().zip(errors) {
                if let Some(e) = e {
                    self.mark_stale(*t, format!("{what}: {e}"));
                }
            }
            return (vec![true; puts.objects.len()], None);
        }
        let first = errors.into_iter().flatten().next();
        (
            ok,
            first.map(|e| at(targets.len() > 1, "every store", store_err(what, e))),
        )
    }

    /// Writes chunks (index, full ciphertext): each under the next epoch's
    /// version, several in flight, on every store in step. Durable at the
    /// next [`flush`].
    ///
    /// [`flush`]: ChunkStore::flush
    pub async fn write_chunks<D: Into<Bytes>>(
        &mut self,
        chunks: Vec<(u64, D)>,
    ) -> Result<(), RemoteError> {
        let upload = self.prepare_chunks(chunks).await?;
        let landed = upload.run().await;
        self.finish_chunks(upload, landed)
    }

    /// [`write_chunks`](ChunkStore::write_chunks) in three steps, so that
    /// the puts run without the store (the device uploads in the
    /// background while writes go on): this one names the chunks;
    /// [`Upload::run`] then puts them and makes their MACs; [`finish_chunks`]
    /// records what landed. Nothing else may change the store in between: no
    /// write, flush, resync or collection (the device settles an upload
    /// before any of them).
    ///
    /// [`finish_chunks`]: ChunkStore::finish_chunks
    pub async fn prepare_chunks<D: Into<Bytes>>(
        &mut self,
        chunks: Vec<(u64, D)>,
    ) -> Result<Upload, RemoteError> {
        self.writable()?;
        self.resolve().await?;
        let version = self.epoch + 1;
        let mut done = Vec::with_capacity(chunks.len());
        let mut objects = Vec::with_capacity(chunks.len());
        let mut seen = BTreeSet::new();
        if let Some((index, _)) = chunks.iter().find(|(i, _)| !seen.insert(*i)) {
            return Err(RemoteError::Config(format!(
                "chunk {index} is twice in one write"
            )));
        }
        for (index, data) in chunks {
            // Bytes shared with the caller (the device's buffer), not
            // copied.
            let data: Bytes = data.into();
            let i = self.check_index(index)?;
            if data.len() != self.geometry.chunk_len(index) {
                return Err(RemoteError::Config(format!(
                    "chunk {index} is {} bytes, not {}",
                    data.len(),
                    self.geometry.chunk_len(index)
                )));
            }
            let session = random_u64()?;
            done.push((
                i,
                index,
                Entry {
                    version,
                    session,
                    // Made by `Upload::run`, while the chunk is put.
                    mac: [0; 32],
                },
            ));
            objects.push((self.keys.chunk(index, version, session), data));
        }
        Ok(Upload {
            epoch: self.epoch,
            done,
            puts: self.puts(objects, "writing a chunk"),
            key: self.key.clone(),
            chunk_mac: self.chunk_mac,
            vault: self.vault,
        })
    }

    /// Records what an [`Upload`] put: the chunks on every store in step
    /// are in the table (durable at the next flush).
    ///
    /// A chunk not recorded stays dirty in the caller's buffer, to be
    /// written again under a new name; whatever of it landed is an orphan
    /// that no manifest can name (each put's name has a fresh random
    /// session), due for the next garbage collection.
    pub fn finish_chunks(&mut self, upload: Upload, landed: Landed) -> Result<(), RemoteError> {
        if upload.epoch != self.epoch {
            self.abandon_chunks(&upload);
            return Err(RemoteError::Config(
                "an upload was finished after a flush: its chunks are written again".into(),
            ));
        }
        let (ok, error) = self.settle_puts(&upload.puts, landed.results);
        // Without their MACs the chunks put are not recorded.
        let macs = match landed.macs {
            Ok(m) if m.len() == upload.done.len() => m,
            other => {
                let why = match other {
                    Ok(m) => format!("{} for {} chunks", m.len(), upload.done.len()),
                    Err(why) => why,
                };
                self.abandon_chunks(&upload);
                return Err(macs_missing(error, &why));
            }
        };
        for ((((i, index, mut entry), mac), ok), (name, _)) in upload
            .done
            .into_iter()
            .zip(macs)
            .zip(ok)
            .zip(&upload.puts.objects)
        {
            if !ok {
                self.orphaned(std::iter::once(name));
                continue;
            }
            entry.mac = mac;
            let old = self.table[i];
            if old.version != 0 && (old.version, old.session) != (entry.version, entry.session) {
                self.superseded.push((
                    self.keys.chunk(index, old.version, old.session),
                    entry.version,
                ));
            }
            self.table[i] = entry;
            self.dirty_pages.insert(index / ENTRIES_PER_PAGE);
        }
        error.map_or(Ok(()), Err)
    }

    /// Gives up an [`Upload`] that cannot be finished (its task still
    /// shares it): nothing of it is recorded, and whatever of it landed,
    /// or lands later, is collected (or swept) as an orphan.
    pub fn abandon_chunks(&mut self, upload: &Upload) {
        self.orphaned(upload.puts.objects.iter().map(|(name, _)| name));
    }

    /// Objects put that no manifest will name: collected as superseded
    /// ones are, after the grace (deleting one that never landed is
    /// harmless).
    fn orphaned<'a>(&mut self, names: impl Iterator<Item = &'a String>) {
        let now = Instant::now();
        self.garbage.extend(names.map(|n| (n.clone(), now)));
    }

    /// The manifest at `epoch` with `root` is durable on the stores
    /// `landed` (with their new versions).
    fn landed(&mut self, epoch: u64, root: Root, landed: Vec<(usize, Tag)>) {
        for (i, tag) in landed {
            self.replicas[i].manifest = Held::At(tag);
            self.replicas[i].synced = epoch;
        }
        self.epoch = epoch;
        self.root = root;
        self.known.push(root);
        self.dirty_pages.clear();
        self.hint_durable(epoch - 1);
        let now = Instant::now();
        let (gone, kept): (Vec<_>, Vec<_>) =
            self.superseded.drain(..).partition(|(_, e)| *e <= epoch);
        self.superseded = kept;
        self.garbage.extend(gone.into_iter().map(|(k, _)| (k, now)));
    }

    /// Makes every chunk written so far durable: the changed pages, then
    /// the manifest, on every store in step, each with a conditional put
    /// on the version this writer last saw there. Returns the new root (to
    /// keep locally), or `None` when nothing changed. Another writer's
    /// manifest fences this one off ([`RemoteError::Fenced`]): nothing
    /// more is written.
    pub async fn flush(&mut self) -> Result<Option<Root>, RemoteError> {
        self.writable()?;
        self.resolve().await?;
        if self.dirty_pages.is_empty() {
            // Everything written is durable (a manifest whose put was
            // settled as done since the caller last heard: its root is
            // news).
            self.unanswered = false;
            return Ok(self.new_root());
        }
        let epoch = self.epoch + 1;
        let mut objects = Vec::new();
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
            objects.push((self.keys.page(*p, epoch, session), Bytes::from(bytes)));
        }
        let (_, error) = self.put_everywhere(objects, "writing a page").await;
        if let Some(e) = error {
            return Err(e);
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
            chunk_mac: self.chunk_mac,
        };
        let (bytes, root) = manifest.encode(&self.key, &self.vault);
        let targets = self.in_step();
        let limit = self.limit(targets.len());
        let name = self.keys.manifest();
        let puts = futures::future::join_all(targets.iter().map(|&i| {
            let r = &self.replicas[i];
            let mode = match &r.manifest {
                Held::At(t) => Put::Update(t.clone()),
                Held::Absent | Held::Unknown => Put::Create,
            };
            let (name, bytes) = (&name, Bytes::from(bytes.clone()));
            async move {
                match timed(limit, r.objects.put(name, bytes.clone(), mode)).await {
                    // Refused: another writer's manifest, or our own (the
                    // client library retried a put that had landed), or
                    // the store's doing: settled by reading it back.
                    Err(StoreError::Precondition | StoreError::AlreadyExists) => {
                        match timed(limit, r.objects.get(name, MAX_MANIFEST)).await {
                            Ok(Some((b, tag))) if b == bytes => Ok(tag),
                            Ok(found) => Err(Err(found.map(|(b, _)| b))),
                            Err(e) => Err(Ok(e)),
                        }
                    }
                    Ok(tag) => Ok(tag),
                    Err(e) => Err(Ok(e)),
                }
            }
        }))
        .await;
        let mut landed = Vec::new();
        let mut unknown = Vec::new();
        let mut refused = Vec::new();
        for (&i, r) in targets.iter().zip(puts) {
            match r {
                Ok(tag) => landed.push((i, tag)),
                Err(Err(found)) => {
                    if self.another_writer(found.as_deref()) {
                        self.pages = pages;
                        self.fenced = true;
                        return Err(RemoteError::Fenced);
                    }
                    refused.push(i);
                }
                Err(Ok(e)) => unknown.push((i, e)),
            }
        }
        self.pages = pages;
        if landed.is_empty() && !refused.is_empty() {
            // No store took it, and one holds a manifest that is not
            // ours: nothing more is written.
            self.fenced = true;
            return Err(RemoteError::Fenced);
        }
        if landed.is_empty() {
            // It may have happened: find out before writing anything under
            // this epoch again.
            self.uncertain = Some(bytes);
            self.unanswered = true;
            let e = unknown
                .into_iter()
                .next()
                .map(|(_, e)| e)
                .unwrap_or_else(|| StoreError::Other("no store is in step".into()));
            return Err(at(
                targets.len() > 1,
                "every store",
                store_err("writing the manifest", e),
            ));
        }
        self.landed(epoch, root, landed);
        self.unanswered = false;
        for (i, e) in unknown {
            self.replicas[i].manifest = Held::Unknown;
            self.mark_stale(i, format!("writing the manifest: {e}"));
        }
        for i in refused {
            self.replicas[i].manifest = Held::Unknown;
            self.mark_stale(
                i,
                "its manifest is neither the one this writer left there nor another writer's \
                 (the store lost, altered or rolled it back)"
                    .into(),
            );
        }
        Ok(self.new_root())
    }

    /// Whether a manifest found where this writer's was expected is
    /// another writer's: one that verifies under the integrity key, is of
    /// no root of this writer's history, and is not older than the
    /// durable epoch. Anything else (none, altered bytes, an old manifest
    /// put back) is the store's doing: that store goes stale and the
    /// others go on, where one that took the manifest remains.
    fn another_writer(&self, found: Option<&[u8]>) -> bool {
        match found.map(|b| Manifest::decode(b, &self.key, &self.vault)) {
            Some(Ok((m, root))) => !self.known.contains(&root) && m.epoch >= self.epoch,
            _ => false,
        }
    }

    /// The durable root, if it is not the one the caller last said it
    /// kept ([`root_kept`](ChunkStore::root_kept)): after a flush, or a
    /// write or failed flush that settled an earlier manifest put as done.
    /// It is offered again until kept.
    pub fn new_root(&self) -> Option<Root> {
        (self.root != self.kept).then_some(self.root)
    }

    /// The MAC of a record of the device's write journal: `data` written
    /// at `offset`, the `seq`th record since the durable manifest of
    /// `base` epoch, in the journal's `cycle` (`None`: a record of the
    /// first format, which had none).
    pub fn journal_mac(
        &self,
        how: ChunkMac,
        cycle: Option<u64>,
        (base, seq, offset): (u64, u64, u64),
        data: &[u8],
    ) -> Mac {
        use crate::integrity::Domain;
        match cycle {
            Some(c) => self.key.placed_mac(
                how,
                Domain::JournalCycle,
                &self.vault,
                &[c, base, seq, offset],
                data,
            ),
            None => self.key.placed_mac(
                how,
                Domain::Journal,
                &self.vault,
                &[base, seq, offset],
                data,
            ),
        }
    }

    /// Whether `mac` is [`journal_mac`](ChunkStore::journal_mac)'s.
    pub fn journal_verifies(
        &self,
        how: ChunkMac,
        cycle: Option<u64>,
        at: (u64, u64, u64),
        data: &[u8],
        mac: &Mac,
    ) -> bool {
        IntegrityKey::verify(mac, &self.journal_mac(how, cycle, at, data))
    }

    /// The caller kept `root` (in the control directory).
    pub fn root_kept(&mut self, root: Root) {
        self.kept = root;
    }

    /// Deletes what no durable manifest has named for `grace` or longer
    /// (older chunk versions, older pages), on every store in step.
    /// Returns how many objects went (a deletion that failed on a store in
    /// step is tried again later; a stale store is left as it is).
    pub async fn collect_garbage(&mut self, grace: Duration) -> Result<usize, RemoteError> {
        let Some(g) = self.prepare_garbage(grace)? else {
            return Ok(0);
        };
        let results = g.run().await;
        Ok(self.finish_garbage(g, &results))
    }

    /// The deletions [`collect_garbage`](ChunkStore::collect_garbage)
    /// would make, to run without the store ([`Garbage::run`]) and record
    /// ([`finish_garbage`](ChunkStore::finish_garbage)); `None` when
    /// nothing is due.
    pub fn prepare_garbage(&mut self, grace: Duration) -> Result<Option<Garbage>, RemoteError> {
        self.writable()?;
        let targets = self.in_step();
        if targets.is_empty() {
            // No store to delete on: it all waits.
            return Ok(None);
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self
            .garbage
            .drain(..)
            .partition(|(_, since)| now.duration_since(*since) >= grace);
        self.garbage = later;
        if due.is_empty() {
            return Ok(None);
        }
        Ok(Some(Garbage {
            stores: targets
                .iter()
                .map(|i| self.replicas[*i].objects.clone())
                .collect(),
            limit: self.limit(targets.len()).unwrap_or(GC_LIMIT).min(GC_LIMIT),
            targets,
            names: due,
            skip: Vec::new(),
        }))
    }

    /// Finds and deletes orphans: objects of the volume's layout that
    /// nothing names (not the table, the pages, nor what waits for
    /// collection), last written `min_age` or longer ago, on the stores in
    /// step that can list and whose manifest is this writer's durable one
    /// (see [`finish_sweep`](ChunkStore::finish_sweep)). Orphans are
    /// what a crashed or fenced writer, a failed flush or an interrupted
    /// import left; no manifest names them. The manifest, anything outside
    /// the layout's folders, and anything younger are never touched. A
    /// store that could not be judged is said in [`Swept::unjudged`].
    pub async fn sweep(&mut self, min_age: Duration) -> Result<Swept, RemoteError> {
        let mut swept = self.orphans(min_age).await?;
        if let Some(g) = swept.garbage.take() {
            let done = g.run().await;
            swept.deleted = self.finish_orphans(g, &done);
        }
        Ok(swept)
    }

    /// What [`sweep`](ChunkStore::sweep) would delete, deleting nothing
    /// (in [`Swept::orphans`]).
    pub async fn orphans(&mut self, min_age: Duration) -> Result<Swept, RemoteError> {
        if !self.read_only {
            self.resolve().await?;
        }
        let sweep = self.sweep_plan(min_age);
        let listed = sweep.run().await;
        self.finish_sweep(&sweep, listed, &[])
    }

    /// Records what a sweep's deletions ([`Garbage::run`] of
    /// [`Swept::garbage`]) did: how many names went from every store they
    /// were judged on, with a [`StoreEvent::Swept`] if any. One whose
    /// deletion failed is not queued for collection (which deletes on
    /// every store in step, judged or not): the next sweep judges it
    /// again.
    pub fn finish_orphans(&mut self, g: Garbage, results: &[bool]) -> usize {
        let n = g.targets.len();
        if n == 0 {
            return 0;
        }
        let gone = (0..g.names.len())
            .filter(|k| (0..n).all(|t| results.get(k * n + t).copied().unwrap_or(false)))
            .count();
        if gone > 0 {
            self.event(StoreEvent::Swept { orphans: gone });
        }
        gone
    }

    /// The listings [`sweep`](ChunkStore::sweep) needs, to run without the
    /// store ([`Sweep::run`]).
    pub fn prepare_sweep(&self, min_age: Duration) -> Result<Sweep, RemoteError> {
        self.writable()?;
        Ok(self.sweep_plan(min_age))
    }

    /// What a sweep would judge (the listing alone writes nothing: a dry
    /// run's store may be opened read-only).
    fn sweep_plan(&self, min_age: Duration) -> Sweep {
        let targets = self.in_step();
        let written = self.table.iter().filter(|e| e.version != 0).count();
        Sweep {
            stores: targets
                .iter()
                .map(|i| self.replicas[*i].objects.clone())
                .collect(),
            names: targets
                .iter()
                .map(|i| self.replicas[*i].name.clone())
                .collect(),
            targets,
            keys: self.keys.clone(),
            key: self.key.clone(),
            vault: self.vault,
            // Every version a chunk or page written could have left, four
            // times over, and room for probes.
            max: 4 * (written + self.pages.len() + self.superseded.len() + self.garbage.len())
                + 10_000,
            min_age,
            chunks: self.table.len() as u64,
            pages: self.pages.len() as u64,
            // No writer of this history has written a later version yet.
            newest: self.epoch + 1,
            root: self.root,
            known_from: self.known.len(),
            named: Named {
                chunks: self.table.iter().map(Named::print).collect(),
                pages: self.pages.iter().map(Named::print).collect(),
            },
        }
    }

    /// Judges what [`Sweep::run`] found against what the store names now
    /// (and `also_kept`: an upload on its way), and gives the orphans'
    /// deletions to run ([`Garbage::run`], then
    /// [`finish_orphans`](ChunkStore::finish_orphans)) in
    /// [`Swept::garbage`]. The judgement is made after the listings on
    /// purpose: an object listed was put before, so whatever names it
    /// names it by now. A store is judged only if the manifest it held
    /// after its listing is this writer's durable root when the sweep was
    /// prepared, or one it made durable since: an idle writer that another
    /// has taken the volume from (it learns so at its next flush) must not
    /// judge the other's objects by its own table, nor an old manifest
    /// served back judge by superseded versions nobody tracks. Orphans are
    /// deleted on the stores judged only. Each store not judged is an
    /// [`StoreEvent::Unswept`].
    pub fn finish_sweep(
        &mut self,
        sweep: &Sweep,
        listed: Vec<Result<Option<Listed>, String>>,
        also_kept: &[String],
    ) -> Result<Swept, RemoteError> {
        // Judging writes nothing (the deletions are handed back to run):
        // a dry run's store, opened read-only, may judge.
        if self.fenced || !self.read_only {
            self.writable()?;
        }
        let mut swept = Swept::default();
        // Each orphan, and the stores judged (by their place in `judged`)
        // that listed it old enough.
        let mut orphans: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut judged = Vec::new();
        let kept: BTreeSet<&str> = also_kept
            .iter()
            .chain(self.superseded.iter().map(|(n, _)| n))
            .chain(self.garbage.iter().map(|(n, _)| n))
            .map(String::as_str)
            .collect();
        // The durable root when the sweep was prepared, and those made
        // durable since (a flush between a store's manifest read and now):
        // what they named and this writer no longer does waits in
        // `superseded` or `garbage`. An older root of this writer's history
        // (a store serving an old manifest back) is not judged by: what it
        // named was superseded in a session whose lists are gone.
        let ours = |r: &Root| {
            *r == self.root
                || *r == sweep.root
                || self
                    .known
                    .get(sweep.known_from..)
                    .is_some_and(|k| k.contains(r))
        };
        for ((t, name), found) in sweep.targets.iter().zip(&sweep.names).zip(listed) {
            let why = match found {
                // It cannot list (an NBD export: its slots are reused,
                // nothing is left behind): nothing to judge.
                Ok(None) => continue,
                Err(why) => Err(why),
                // Its pages may be durable: nothing is judged until it is
                // settled.
                Ok(Some(_)) if self.uncertain.is_some() => {
                    Err("a manifest put's outcome is unknown".to_string())
                }
                Ok(Some(_)) if self.replicas[*t].stale.is_some() => {
                    Err("it left the stores in step".to_string())
                }
                Ok(Some(f)) if !ours(&f.root) => Err(
                    "its manifest is not this writer's durable one (another writer may have taken the volume over, or the store serves an older one)"
                        .to_string(),
                ),
                Ok(Some(f)) => Ok(f),
            };
            let found = match why {
                Ok(f) => f,
                Err(why) => {
                    self.event(StoreEvent::Unswept {
                        name: name.clone(),
                        reason: why.clone(),
                    });
                    swept.unjudged.push((name.clone(), why));
                    continue;
                }
            };
            if found.partial {
                swept.partial.push(name.clone());
            }
            judged.push(*t);
            for (n, parsed) in found.names {
                let named = match parsed {
                    Name::Chunk(i, v, s) => usize::try_from(i)
                        .ok()
                        .and_then(|i| self.table.get(i))
                        .is_some_and(|e| (e.version, e.session) == (v, s)),
                    Name::Page(i, v, s) => usize::try_from(i)
                        .ok()
                        .and_then(|i| self.pages.get(i))
                        .is_some_and(|e| (e.version, e.session) == (v, s)),
                    Name::Probe(_) => false,
                    Name::Manifest => true,
                };
                if !named && !kept.contains(n.as_str()) {
                    orphans.entry(n).or_default().push(judged.len() - 1);
                }
            }
        }
        swept.orphans = orphans.keys().cloned().collect();
        if orphans.is_empty() {
            return Ok(swept);
        }
        // Deleted only on the stores judged (a name that is an orphan here
        // may be another writer's on a store not judged), and on each only
        // if it listed the name old enough: a copy a resync made an hour
        // ago, or one beyond a partial listing, waits for a later sweep.
        let at = Instant::now();
        let n = judged.len();
        let mut skip = vec![true; orphans.len() * n];
        for (k, on) in orphans.values().enumerate() {
            for &j in on {
                skip[k * n + j] = false;
            }
        }
        swept.garbage = Some(Garbage {
            stores: judged
                .iter()
                .map(|i| self.replicas[*i].objects.clone())
                .collect(),
            limit: self.limit(n).unwrap_or(GC_LIMIT).min(GC_LIMIT),
            targets: judged,
            names: orphans.into_keys().map(|n| (n, at)).collect(),
            skip,
        });
        Ok(swept)
    }

    /// Records what [`Garbage::run`] did: a name whose deletion failed on
    /// a store still in step stays due.
    pub fn finish_garbage(&mut self, g: Garbage, results: &[bool]) -> usize {
        let n = g.targets.len();
        let mut gone = 0;
        for (k, (name, since)) in g.names.into_iter().enumerate() {
            let failed_in_step = (0..n).any(|t| {
                !results.get(k * n + t).copied().unwrap_or(false)
                    && self
                        .replicas
                        .get(g.targets[t])
                        .is_some_and(|r| r.stale.is_none())
            });
            if failed_in_step {
                self.garbage.push((name, since));
            } else {
                gone += 1;
            }
        }
        gone
    }

    /// Brings stale stores back, a step at a time (see
    /// [`prepare_resync`](ChunkStore::prepare_resync)), each store due
    /// once. Returns whether a store is still stale. The device runs the
    /// same steps on its own thread, without holding the store while a
    /// stale store is asked anything.
    pub async fn resync(&mut self, budget: usize) -> Result<bool, RemoteError> {
        self.writable()?;
        self.resolve().await?;
        for i in 0..self.replicas.len() {
            if let Some(step) = self.prepare_resync(i, budget) {
                let outcome = step.run().await;
                self.finish_resync(step, outcome)?;
            }
        }
        Ok(self.replicas.iter().any(|r| r.stale.is_some()))
    }

    /// The stale stores due for an attempt to bring them back, with the
    /// name to ask each for (its manifest) and how long to wait: a caller
    /// asks without holding the device, and runs [`resync`] only if one
    /// answered (else [`postpone_resync`]), so that a store that is down
    /// never holds up reads and writes.
    ///
    /// [`resync`]: ChunkStore::resync
    /// [`postpone_resync`]: ChunkStore::postpone_resync
    pub fn resync_probes(&self) -> (Vec<Probe>, String, Duration) {
        let now = Instant::now();
        let due = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(&r.stale, Some(s) if s.retry_at <= now))
            .map(|(i, r)| (i, r.objects.clone()))
            .collect();
        (due, self.keys.manifest(), self.settings.degrade_after)
    }

    /// The stale stores `which` did not answer (or could not be brought
    /// back): tried again after the retry delay.
    pub fn postpone_resync(&mut self, which: &[usize], reason: &str) {
        for &i in which {
            if i < self.replicas.len() && self.replicas[i].stale.is_some() {
                self.mark_stale(i, reason.to_string());
            }
        }
    }

    /// Stores in step that served a chunk or page that did not verify (or
    /// lacked one): repaired at once, and now left out of writes and
    /// reads until every object they should hold has been read back and
    /// verified. The last store in step is kept. Returns how many went.
    pub fn demote_bad(&mut self) -> usize {
        // Not while a manifest put is to be settled: the settle asks the
        // stores in step, and one taken out of step now might hold it.
        if self.uncertain.is_some() {
            return 0;
        }
        let mut n = 0;
        for i in 0..self.replicas.len() {
            let bad = self.replicas[i].served_bad.swap(false, Ordering::Relaxed);
            if !bad || self.replicas[i].stale.is_some() || self.in_step().len() < 2 {
                continue;
            }
            self.mark_stale(
                i,
                "it served data that did not verify (altered, older or missing): \
                 everything on it is read back and checked"
                    .into(),
            );
            let r = &mut self.replicas[i];
            r.synced = 0;
            r.trusted = false;
            r.suspect = true;
            n += 1;
        }
        n
    }

    /// The next step of bringing stale store `i` back, if it is due: read
    /// its manifest (when its state is not known), look at which of the
    /// objects it lacks it holds (when what it holds is not known: a HEAD
    /// each, a sample read back and verified, every one when it served
    /// bad data), copy up to `budget` of the objects it lacks from the
    /// stores in step (each verified on the way), and last, once it lacks
    /// nothing, give it the durable manifest and every write again.
    ///
    /// Every step but the last runs without the store
    /// ([`ResyncStep::run`]) and is recorded by
    /// [`finish_resync`](ChunkStore::finish_resync); the last must run
    /// with no write in between ([`ResyncStep::is_last`]: the device holds
    /// itself for it, one manifest put).
    pub fn prepare_resync(&mut self, i: usize, budget: usize) -> Option<ResyncStep> {
        let now = Instant::now();
        let due = matches!(self.replicas.get(i).and_then(|r| r.stale.as_ref()),
            Some(s) if s.retry_at <= now);
        if !due || self.in_step().is_empty() || self.uncertain.is_some() || self.writable().is_err()
        {
            return None;
        }
        let budget = budget.max(1);
        let r = &self.replicas[i];
        let task = if r.manifest == Held::Unknown {
            Task::Manifest
        } else {
            let mut needed: Vec<(String, Check)> = Vec::new();
            for (k, e) in self.table.iter().enumerate() {
                if e.version > r.synced {
                    let index = k as u64;
                    needed.push((
                        self.keys.chunk(index, e.version, e.session),
                        Check::Chunk(index, *e),
                    ));
                }
            }
            for (p, e) in self.pages.iter().enumerate() {
                if e.version > r.synced {
                    let p = p as u64;
                    needed.push((self.keys.page(p, e.version, e.session), Check::Page(p, *e)));
                }
            }
            needed.retain(|(n, _)| !r.copied.contains(n));
            if let Some(s) = &mut self.replicas[i].stale {
                s.to_copy = Some(needed.len() as u64);
            }
            let r = &self.replicas[i];
            let unlooked: Vec<(String, Check)> = if r.trusted {
                Vec::new()
            } else {
                needed
                    .iter()
                    .filter(|(n, _)| !r.looked.contains(n))
                    .take(budget * 8)
                    .cloned()
                    .collect()
            };
            if !unlooked.is_empty() {
                Task::Look(unlooked)
            } else if needed.is_empty() {
                if !self.dirty_pages.is_empty() {
                    // Pages not yet durable: after the next flush.
                    return None;
                }
                let (bytes, root) = Manifest {
                    geometry: self.geometry,
                    epoch: self.epoch,
                    pages: self.pages.clone(),
                    chunk_mac: self.chunk_mac,
                }
                .encode(&self.key, &self.vault);
                if root != self.root {
                    return None;
                }
                let mode = match &r.manifest {
                    Held::At(t) => Put::Update(t.clone()),
                    _ => Put::Create,
                };
                Task::Last(Bytes::from(bytes), mode, self.epoch)
            } else {
                needed.truncate(budget);
                Task::Copy(needed)
            }
        };
        let limit = self.settings.degrade_after;
        Some(ResyncStep {
            i,
            target: self.replicas[i].objects.clone(),
            sources: self
                .in_step()
                .iter()
                .map(|j| self.replicas[*j].objects.clone())
                .collect(),
            limit: if matches!(task, Task::Last(..)) {
                limit.min(LAST_STEP_LIMIT)
            } else {
                limit
            },
            task,
            suspect: self.replicas[i].suspect,
            manifest: self.keys.manifest(),
            keys: self.keys.clone(),
            key: self.key.clone(),
            chunk_mac: self.chunk_mac,
            vault: self.vault,
            geometry: self.geometry,
        })
    }

    /// Records what a resync step did; a failure leaves the store stale
    /// until its next retry. A manifest there that only another holder of
    /// the integrity key could have written fences this writer.
    pub fn finish_resync(
        &mut self,
        step: ResyncStep,
        outcome: ResyncOutcome,
    ) -> Result<(), RemoteError> {
        let i = step.i;
        if self.replicas.get(i).is_none_or(|r| r.stale.is_none()) {
            return Ok(());
        }
        let failed = match (step.task, outcome) {
            (Task::Manifest, ResyncOutcome::Manifest(got)) => match got {
                Err(e) => Some(e),
                Ok(got) => {
                    let (held, synced) = match got {
                        None => (Held::Absent, 0),
                        Some((bytes, tag)) => {
                            match Manifest::decode(&bytes, &self.key, &self.vault) {
                                // A root of this history: it holds everything
                                // up to its epoch.
                                Ok((m, root)) if self.known.contains(&root) => {
                                    (Held::At(tag), m.epoch)
                                }
                                // Older, of another session or writer: checked
                                // object by object.
                                Ok((m, _)) if m.epoch < self.epoch => (Held::At(tag), 0),
                                Ok(_) => {
                                    self.fenced = true;
                                    self.mark_stale(
                                    i,
                                    "it holds a manifest this writer did not write (another writer?)"
                                        .into(),
                                );
                                    return Err(RemoteError::Fenced);
                                }
                                Err(_) => (Held::At(tag), 0),
                            }
                        }
                    };
                    let r = &mut self.replicas[i];
                    r.trusted = !r.suspect && (synced > 0 || held == Held::Absent);
                    r.manifest = held;
                    r.synced = synced;
                    // What was copied before is not known to be there now.
                    r.copied.clear();
                    r.looked.clear();
                    None
                }
            },
            (Task::Look(names), ResyncOutcome::Look(results)) => {
                let mut first = None;
                let mut bad = false;
                for ((n, _), r) in names.iter().zip(results) {
                    match r {
                        Ok(Looked::There) => {
                            self.replicas[i].copied.insert(n.clone());
                        }
                        Ok(Looked::Missing) => {
                            self.replicas[i].looked.insert(n.clone());
                        }
                        Ok(Looked::Bad) => {
                            self.replicas[i].looked.insert(n.clone());
                            bad = true;
                        }
                        Err(e) => {
                            first.get_or_insert(e);
                        }
                    }
                }
                let r = &mut self.replicas[i];
                if bad && !r.suspect {
                    // A sampled object did not verify: what its HEADs
                    // said is not believed, and every object is read
                    // back from now on.
                    r.suspect = true;
                    r.copied.clear();
                    r.looked.clear();
                }
                first
            }
            (Task::Copy(names), ResyncOutcome::Copy(results)) => {
                let mut first = None;
                for ((n, _), r) in names.iter().zip(results) {
                    match r {
                        Ok(()) => {
                            let r = &mut self.replicas[i];
                            r.copied.insert(n.clone());
                            r.copied_total += 1;
                        }
                        Err(e) => {
                            first.get_or_insert(e);
                        }
                    }
                }
                first
            }
            (Task::Last(_, _, epoch), ResyncOutcome::Last(put)) => match put {
                Ok(tag) if epoch == self.epoch && self.dirty_pages.is_empty() => {
                    let r = &mut self.replicas[i];
                    r.manifest = Held::At(tag);
                    r.synced = self.epoch;
                    r.trusted = true;
                    r.suspect = false;
                    r.stale = None;
                    r.copied.clear();
                    r.looked.clear();
                    let e = StoreEvent::InStep {
                        name: r.name.clone(),
                        copied: r.copied_total,
                    };
                    self.event(e);
                    None
                }
                Ok(tag) => {
                    // Written to since: it holds everything up to that
                    // manifest's epoch, and catches up from there.
                    let r = &mut self.replicas[i];
                    r.manifest = Held::At(tag);
                    r.synced = epoch;
                    r.trusted = true;
                    r.suspect = false;
                    r.copied.clear();
                    r.looked.clear();
                    None
                }
                Err(e) => {
                    self.replicas[i].manifest = Held::Unknown;
                    Some(format!("writing its manifest: {e}"))
                }
            },
            _ => Some("a resync step's outcome does not match it".into()),
        };
        if let Some(reason) = failed {
            self.mark_stale(i, reason);
        }
        Ok(())
    }
}

/// How long garbage collection waits for a deletion.
const GC_LIMIT: Duration = Duration::from_secs(10);

/// How long the last step of a resync (one manifest put, with the device
/// held) waits.
const LAST_STEP_LIMIT: Duration = Duration::from_secs(5);

/// How long a store may stall while it lists (between two of its
/// answers).
pub const LIST_STALL: Duration = Duration::from_secs(60);

/// The listings of a [`ChunkStore::sweep`], to run without the store.
pub struct Sweep {
    stores: Vec<Arc<dyn Objects>>,
    targets: Vec<usize>,
    names: Vec<String>,
    keys: Keys,
    key: Arc<IntegrityKey>,
    vault: [u8; 16],
    max: usize,
    min_age: Duration,
    /// Bounds no name of this writer's history is beyond: the chunks, the
    /// pages, the newest version.
    chunks: u64,
    pages: u64,
    newest: u64,
    /// The durable root when prepared, and how many roots this writer
    /// knew then.
    root: Root,
    known_from: usize,
    /// What the table named when the sweep was prepared.
    named: Named,
}

/// The version and session of each chunk and page a table named, as a
/// fingerprint (8 bytes each, a sixth of the table's entry; made with
/// the device held, one pass over the table): what a listing need not
/// keep. A name named then is no orphan now (or it waits in the
/// superseded or garbage lists), so a listing holds only what may be
/// one, not every live chunk. Two fingerprints that collide (sessions
/// are random: about one chance in 2^64 for a name) keep an orphan until
/// that chunk is written again; they never delete a live object.
struct Named {
    chunks: Vec<u64>,
    pages: Vec<u64>,
}

impl Named {
    fn print(e: &Entry) -> u64 {
        Self::of(e.version, e.session)
    }

    fn of(version: u64, session: u64) -> u64 {
        version.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(31) ^ session
    }

    /// Whether `name` was named then.
    fn names(&self, name: &Name) -> bool {
        let at = |v: &[u64], i: u64| usize::try_from(i).ok().and_then(|i| v.get(i).copied());
        match *name {
            Name::Chunk(i, v, s) => at(&self.chunks, i) == Some(Self::of(v, s)),
            Name::Page(i, v, s) => at(&self.pages, i) == Some(Self::of(v, s)),
            Name::Probe(_) | Name::Manifest => false,
        }
    }
}

/// What [`Sweep::run`] found on one store: the root of the manifest it held
/// after its listing, and its candidates (exact names of the layout, in
/// its bounds, old enough), to judge.
pub struct Listed {
    root: Root,
    names: Vec<(String, Name)>,
    /// It had more than the bound: what was listed is judged, the rest
    /// at a later sweep (each deletion makes room).
    partial: bool,
}

/// What a sweep found and did.
#[derive(Default)]
pub struct Swept {
    /// The orphans (as each store names them).
    pub orphans: Vec<String>,
    /// How many went.
    pub deleted: usize,
    /// Stores not judged, and why.
    pub unjudged: Vec<(String, String)>,
    /// Stores judged on part of what they hold (more objects than the
    /// listing's bound).
    pub partial: Vec<String>,
    /// The deletions to run ([`ChunkStore::finish_sweep`]'s).
    pub garbage: Option<Garbage>,
}

impl Sweep {
    /// On each store: the layout's folders listed (chunks, pages,
    /// probes: nothing else in the store's folder), and then its manifest
    /// read and verified. The names are sorted out here, without the
    /// store held.
    pub async fn run(&self) -> Vec<Result<Option<Listed>, String>> {
        futures::future::join_all(self.stores.iter().map(|o| self.one(o.as_ref()))).await
    }

    async fn one(&self, o: &dyn Objects) -> Result<Option<Listed>, String> {
        let now = SystemTime::now();
        let mut names = Vec::new();
        let mut left = self.max;
        let mut partial = false;
        // Kept: old enough (young, or written in the store's future: not
        // judged), exactly a name of the layout, and not named when the
        // sweep was prepared.
        let keep = |n: &str, written: SystemTime| {
            now.duration_since(written)
                .is_ok_and(|age| age >= self.min_age)
                && self.candidate(n).is_some_and(|p| !self.named.names(&p))
        };
        // The small folders first: a chunk folder over the bound leaves
        // the pages and probes judged.
        for folder in ["probe/", "p/", "c/"] {
            if left == 0 {
                partial = true;
                break;
            }
            let at = format!("{}{folder}", self.keys.prefix());
            let Some(found) = o.list(&at, left, &keep).await.map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            partial |= found.listed >= left;
            left = left.saturating_sub(found.listed);
            names.extend(
                found
                    .names
                    .into_iter()
                    .filter_map(|(n, _)| self.candidate(&n).map(|p| (n, p))),
            );
        }
        let manifest = tokio::time::timeout(LIST_STALL, o.get(&self.keys.manifest(), MAX_MANIFEST))
            .await
            .map_err(|_| "its manifest did not come".to_string())?
            .map_err(|e| format!("its manifest: {e}"))?
            .ok_or("it holds no manifest")?;
        let (_, root) = Manifest::decode(&manifest.0, &self.key, &self.vault)
            .map_err(|e| format!("its manifest: {e}"))?;
        Ok(Some(Listed {
            root,
            names,
            partial,
        }))
    }

    /// Whether `name` is a chunk, page or probe exactly as this volume's
    /// layout names one, within the bounds of its history.
    fn candidate(&self, name: &str) -> Option<Name> {
        let parsed = Keys::parse(name)?;
        let exact = match parsed {
            Name::Chunk(i, v, s) => {
                i < self.chunks && v <= self.newest && self.keys.chunk(i, v, s) == name
            }
            Name::Page(i, v, s) => {
                i < self.pages && v <= self.newest && self.keys.page(i, v, s) == name
            }
            Name::Probe(n) => self.keys.probe(n) == name,
            Name::Manifest => false,
        };
        exact.then_some(parsed)
    }
}

/// Deletions: of superseded objects on the stores in step
/// ([`ChunkStore::prepare_garbage`]), or of a sweep's orphans on the stores
/// it judged ([`ChunkStore::finish_sweep`]); to run without the store.
pub struct Garbage {
    stores: Vec<Arc<dyn Objects>>,
    targets: Vec<usize>,
    limit: Duration,
    names: Vec<(String, Instant)>,
    /// Per name and store (`names.len() * stores.len()`, or empty: none):
    /// a deletion not to make there.
    skip: Vec<bool>,
}

impl Garbage {
    /// The names it deletes.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.names.iter().map(|(n, _)| n.as_str())
    }

    /// Deletes each name on each store (but where a sweep did not judge
    /// it there) ([`IN_FLIGHT`] per store at once); whether each deletion
    /// was done (or not to be made), per name and store. The first
    /// deletion that fails or times out stops the rest (left for the
    /// next collection).
    pub async fn run(&self) -> Vec<bool> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut jobs = Vec::with_capacity(self.names.len() * self.stores.len());
        for (k, (name, _)) in self.names.iter().enumerate() {
            for (t, o) in self.stores.iter().enumerate() {
                let stop = &stop;
                let skip = self
                    .skip
                    .get(k * self.stores.len() + t)
                    .copied()
                    .unwrap_or(false);
                jobs.push(async move {
                    if skip {
                        return true;
                    }
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    let ok = timed(Some(self.limit), o.delete(name)).await.is_ok();
                    if !ok {
                        stop.store(true, Ordering::Relaxed);
                    }
                    ok
                });
            }
        }
        bounded_per_store(jobs, self.stores.len()).await
    }
}

/// What a resync step does to a stale store.
enum Task {
    /// Read its manifest.
    Manifest,
    /// Look at which of these objects it holds.
    Look(Vec<(String, Check)>),
    /// Copy these to it.
    Copy(Vec<(String, Check)>),
    /// Put the durable manifest (of this epoch) on it.
    Last(Bytes, Put, u64),
}

/// Whether a stale store holds an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Looked {
    /// It does (its HEAD answered, or it was read back and verified).
    There,
    /// It does not.
    Missing,
    /// It has bytes there that do not verify.
    Bad,
}

/// A step of bringing a stale store back
/// ([`ChunkStore::prepare_resync`]).
pub struct ResyncStep {
    i: usize,
    target: Arc<dyn Objects>,
    sources: Vec<Arc<dyn Objects>>,
    limit: Duration,
    task: Task,
    suspect: bool,
    manifest: String,
    keys: Keys,
    key: Arc<IntegrityKey>,
    chunk_mac: ChunkMac,
    vault: [u8; 16],
    geometry: Geometry,
}

/// What a [`ResyncStep`] did.
pub enum ResyncOutcome {
    /// The store's manifest (`None`: none there, and the store honours
    /// conditional writes).
    Manifest(Result<Option<(Bytes, Tag)>, String>),
    /// Whether it holds each object looked at.
    Look(Vec<Result<Looked, String>>),
    /// Each copy.
    Copy(Vec<Result<(), String>>),
    /// The manifest put.
    Last(Result<Tag, String>),
}

impl ResyncStep {
    /// The store it works on.
    pub fn store(&self) -> usize {
        self.i
    }

    /// Whether this is the last step (the manifest put), which must run
    /// with no write to the store in between.
    pub fn is_last(&self) -> bool {
        matches!(self.task, Task::Last(..))
    }

    fn verifies(&self, check: &Check, bytes: &[u8]) -> bool {
        match *check {
            Check::Chunk(index, e) => chunk_verifies(
                (&self.key, self.chunk_mac, &self.vault),
                (index, &e, self.geometry.chunk_len(index)),
                bytes,
            ),
            Check::Page(p, e) => Page::decode(
                bytes,
                &self.key,
                &self.vault,
                (p, self.geometry.page_len(p)),
                &e,
            )
            .is_ok(),
        }
    }

    fn max_len(&self, check: &Check) -> usize {
        match *check {
            Check::Chunk(index, _) => self.geometry.chunk_len(index),
            Check::Page(..) => Page::max_len(),
        }
    }

    /// Runs the step (not under the store's lock). The first request to
    /// fail or time out stops the others.
    pub async fn run(&self) -> ResyncOutcome {
        let limit = Some(self.limit);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let stopped = || "stopped after another request failed".to_string();
        match &self.task {
            Task::Manifest => {
                let got = match timed(limit, self.target.get(&self.manifest, MAX_MANIFEST)).await {
                    Ok(None) => conditional_writes(self.target.as_ref(), &self.keys, limit)
                        .await
                        .map(|()| None)
                        .map_err(|e| e.to_string()),
                    Ok(Some(got)) => Ok(Some(got)),
                    Err(e) => Err(e.to_string()),
                };
                ResyncOutcome::Manifest(got)
            }
            Task::Look(names) => {
                // Which are read back: every one on a store that served
                // bad data, else one in eight (from a random start).
                let start = usize::try_from(random_u64().unwrap_or(0) % 8).unwrap_or(0);
                let stop = &stop;
                let jobs = names
                    .iter()
                    .enumerate()
                    .map(|(k, (n, check))| async move {
                        if stop.load(Ordering::Relaxed) {
                            return Err(stopped());
                        }
                        let r = if self.suspect || k % 8 == start {
                            timed(limit, self.target.get(n, self.max_len(check)))
                                .await
                                .map(|got| match got {
                                    None => Looked::Missing,
                                    Some((b, _)) if self.verifies(check, &b) => Looked::There,
                                    Some(_) => Looked::Bad,
                                })
                        } else {
                            timed(limit, self.target.exists(n, self.max_len(check)))
                                .await
                                .map(|there| {
                                    if there {
                                        Looked::There
                                    } else {
                                        Looked::Missing
                                    }
                                })
                        };
                        r.map_err(|e| {
                            stop.store(true, Ordering::Relaxed);
                            e.to_string()
                        })
                    })
                    .collect();
                ResyncOutcome::Look(bounded(jobs, IN_FLIGHT).await)
            }
            Task::Copy(names) => {
                let stop = &stop;
                let jobs = names
                    .iter()
                    .map(|(n, check)| async move {
                        if stop.load(Ordering::Relaxed) {
                            return Err(stopped());
                        }
                        let r = self.copy(n, check).await;
                        if r.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                    .collect();
                ResyncOutcome::Copy(bounded(jobs, IN_FLIGHT).await)
            }
            Task::Last(bytes, mode, _) => ResyncOutcome::Last(
                timed(
                    limit,
                    self.target.put(&self.manifest, bytes.clone(), mode.clone()),
                )
                .await
                .map_err(|e| e.to_string()),
            ),
        }
    }

    /// Reads `name` from the first store in step whose bytes verify, and
    /// puts them on the stale store.
    async fn copy(&self, name: &str, check: &Check) -> Result<(), String> {
        let limit = Some(self.limit);
        let mut last = format!("reading {name} to copy it: no store in step has it");
        for o in &self.sources {
            match timed(limit, o.get(name, self.max_len(check))).await {
                Ok(Some((b, _))) if self.verifies(check, &b) => {
                    return timed(limit, self.target.put(name, b, Put::Overwrite))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                }
                Ok(Some(_)) => last = format!("reading {name} to copy it: it does not verify"),
                Ok(None) => {}
                Err(e) => last = format!("reading {name} to copy it: {e}"),
            }
        }
        Err(last)
    }
}

/// `e`, naming the store it came from when there are several.
fn at(many: bool, name: &str, e: RemoteError) -> RemoteError {
    if !many {
        return e;
    }
    match e {
        RemoteError::Store(s) => RemoteError::Store(format!("{name}: {s}")),
        RemoteError::Tampered(s) => RemoteError::Tampered(format!("{name}: {s}")),
        RemoteError::NoConditionalWrites(s) => {
            RemoteError::NoConditionalWrites(format!("{name}: {s}"))
        }
        other => other,
    }
}

/// Why an upload's chunks were not recorded when their MACs were missing:
/// the puts' own error if any failed, else why the MACs are missing.
fn macs_missing(puts: Option<RemoteError>, why: &str) -> RemoteError {
    puts.unwrap_or_else(|| {
        RemoteError::Crypto(format!("the chunks' MACs could not be made: {why}"))
    })
}

#[cfg(test)]
mod probe_tests {
    //! The conditional-write probe against stores made to behave well or
    //! badly, deterministically: a put that checks, yields, then writes
    //! lets racers through in the window, as a store that checks then
    //! writes does under load.
    use super::*;
    use crate::objects::{BoxFuture, Objects, Put, StoreError, Tag};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// In memory; versions are numbers. `racy_after`: puts from this one
    /// on check, yield, then write; `fail_after`: puts from this one fail.
    #[derive(Default)]
    struct Fake {
        objects: Mutex<HashMap<String, u64>>,
        next: AtomicUsize,
        puts: AtomicUsize,
        racy_after: Option<usize>,
        fail_after: Option<usize>,
    }

    fn tag(v: u64) -> Tag {
        Tag {
            e_tag: Some(format!("\"{v}\"")),
            version: None,
        }
    }

    impl Objects for Fake {
        fn get<'a>(
            &'a self,
            key: &'a str,
            _max: usize,
        ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
            let v = self.objects.lock().unwrap().get(key).copied();
            Box::pin(async move { Ok(v.map(|v| (Bytes::new(), tag(v)))) })
        }
        fn put<'a>(
            &'a self,
            key: &'a str,
            _data: Bytes,
            mode: Put,
        ) -> BoxFuture<'a, Result<Tag, StoreError>> {
            Box::pin(async move {
                let n = self.puts.fetch_add(1, Ordering::SeqCst);
                if self.fail_after.is_some_and(|f| n >= f) {
                    return Err(StoreError::Other("503 Slow Down".into()));
                }
                let check = |objects: &HashMap<String, u64>| match (&mode, objects.get(key)) {
                    (Put::Create, Some(_)) => Err(StoreError::AlreadyExists),
                    (Put::Update(t), Some(v)) if *t != tag(*v) => Err(StoreError::Precondition),
                    (Put::Update(_), None) => Err(StoreError::Precondition),
                    _ => Ok(()),
                };
                check(&self.objects.lock().unwrap())?;
                if self.racy_after.is_some_and(|r| n >= r) {
                    tokio::task::yield_now().await;
                } else {
                    // Atomic: checked again with the write, under one lock.
                    check(&self.objects.lock().unwrap())?;
                }
                let v = u64::try_from(self.next.fetch_add(1, Ordering::SeqCst)).unwrap() + 1;
                self.objects.lock().unwrap().insert(key.to_owned(), v);
                Ok(tag(v))
            })
        }
        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
            self.objects.lock().unwrap().remove(key);
            Box::pin(async { Ok(()) })
        }

        fn durable(&self, _names: &mut dyn Iterator<Item = crate::layout::Name>) {}
        fn prepare<'a>(
            &'a self,
            _geometry: &'a crate::layout::Geometry,
        ) -> BoxFuture<'a, Result<(), RemoteError>> {
            Box::pin(async { Ok(()) })
        }
        fn opened<'a>(
            &'a self,
            _geometry: &'a crate::layout::Geometry,
        ) -> BoxFuture<'a, Result<(), RemoteError>> {
            Box::pin(async { Ok(()) })
        }
        fn list<'a>(
            &'a self,
            _prefix: &'a str,
            _max: usize,
            _keep: crate::objects::Keep<'a>,
        ) -> BoxFuture<'a, crate::objects::Listing> {
            Box::pin(async { Ok(None) })
        }
    }

    fn probe(f: &Fake) -> Result<(), RemoteError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(check_conditional_writes(f, &Keys::new("v")))
    }

    #[test]
    fn an_atomic_store_passes_and_the_probe_is_removed() {
        let f = Fake::default();
        probe(&f).unwrap();
        // Four single puts, then three rounds of racers.
        assert_eq!(f.puts.load(Ordering::SeqCst), 4 + 3 * RACERS);
        assert!(f.objects.lock().unwrap().is_empty());
    }

    #[test]
    fn a_store_that_checks_then_writes_is_refused() {
        let f = Fake {
            racy_after: Some(0),
            ..Fake::default()
        };
        let e = probe(&f).unwrap_err().to_string();
        assert!(e.contains("not atomic"), "{e}");
    }

    /// The first round came out serialized (as a loaded host can make
    /// it); a later one shows the store for what it is.
    #[test]
    fn a_race_serialized_once_is_caught_in_a_later_round() {
        let f = Fake {
            racy_after: Some(4 + RACERS),
            ..Fake::default()
        };
        let e = probe(&f).unwrap_err().to_string();
        assert!(e.contains("not atomic"), "{e}");
    }

    /// Racers that fail for another reason than the store's refusal do
    /// not count as losers: the probe fails, it does not pass.
    #[test]
    fn a_store_that_fails_the_race_does_not_pass() {
        let f = Fake {
            fail_after: Some(4),
            ..Fake::default()
        };
        let e = probe(&f).unwrap_err();
        assert!(!matches!(e, RemoteError::NoConditionalWrites(_)), "{e}");
        assert!(e.to_string().contains("503"), "{e}");
    }
}

#[cfg(test)]
mod bounded_tests {
    use super::bounded;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// At most `n` jobs at once, and the next starts as soon as any one
    /// ends: here the first job ends only once the last has started,
    /// which batches of `n` (each waiting for its slowest) never reach.
    /// The results come in the jobs' order.
    #[test]
    fn keeps_its_window_full_and_the_results_in_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let (release, wait) = (Mutex::new(Some(release)), Mutex::new(Some(wait)));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..7usize)
            .map(|i| {
                let (running, most) = (running.clone(), most.clone());
                let (release, wait) = (&release, &wait);
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    if i == 0 {
                        let w = wait.lock().unwrap().take().unwrap();
                        w.await.unwrap();
                    } else {
                        tokio::task::yield_now().await;
                        if i == 6 {
                            let r = release.lock().unwrap().take().unwrap();
                            r.send(()).unwrap();
                        }
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    i * 10
                }
            })
            .collect();
        let out = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), bounded(jobs, 3)).await
            })
            .expect("the window waited for its slowest job");
        assert_eq!(out, vec![0, 10, 20, 30, 40, 50, 60]);
        assert_eq!(most.load(Ordering::SeqCst), 3, "at most 3 at once");
    }

    /// Per store: at most IN_FLIGHT at once on each, and a store whose
    /// requests hang does not hold back the other's (here the first
    /// store's end only once the second's are all done, which one window
    /// shared by both never reaches: the hanging ones fill it).
    #[test]
    fn each_store_has_its_own_window() {
        use super::{IN_FLIGHT, bounded_per_store};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let per_store = IN_FLIGHT + 5;
        let fast_done = Arc::new(tokio::sync::Semaphore::new(0));
        let running = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let most = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let jobs: Vec<_> = (0..2 * per_store)
            .map(|k| {
                let store = k % 2;
                let (running, most) = (running[store].clone(), most[store].clone());
                let fast_done = fast_done.clone();
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    if store == 0 {
                        let all = u32::try_from(per_store).unwrap();
                        drop(fast_done.acquire_many(all).await.unwrap());
                    } else {
                        tokio::task::yield_now().await;
                        fast_done.add_permits(1);
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    k
                }
            })
            .collect();
        let out = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), bounded_per_store(jobs, 2)).await
            })
            .expect("a hanging store held back the other");
        assert_eq!(out, (0..2 * per_store).collect::<Vec<_>>());
        for (store, m) in most.iter().enumerate() {
            assert_eq!(m.load(Ordering::SeqCst), IN_FLIGHT, "store {store}");
        }
    }
}

#[cfg(test)]
mod upload_tests {
    use super::{ChunkStore, RemoteError};
    use crate::layout::Geometry;
    use crate::{IntegrityKey, ObjectStoreObjects, Objects};
    use futures::StreamExt;
    use object_store::memory::InMemory;
    use std::sync::Arc;
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn chunk(fill: u8) -> Vec<u8> {
        vec![fill; 64 * 1024]
    }

    /// A store in memory of four 64 KiB chunks, chunk 1 written.
    async fn store() -> (ChunkStore, Arc<InMemory>) {
        let inner = Arc::new(InMemory::new());
        let mem: Arc<dyn Objects> = Arc::new(ObjectStoreObjects::new(inner.clone()));
        let g = Geometry::new(64 * 1024, 4 * 64 * 1024).unwrap();
        let key = IntegrityKey::generate().unwrap();
        let (mut s, _) = ChunkStore::create(mem, "team", [7; 16], key, g)
            .await
            .unwrap();
        s.write_chunks(vec![(1, chunk(1))]).await.unwrap();
        (s, inner)
    }

    /// How many objects it holds.
    async fn count(inner: &InMemory) -> usize {
        object_store::ObjectStore::list(inner, None).count().await
    }

    /// Puts that landed but whose MACs could not be made (a panic on the
    /// blocking pool) record nothing, and the error says why: the chunk
    /// reads as before, what landed is collected, and writing it again
    /// works.
    #[test]
    fn puts_that_landed_without_their_macs_record_nothing() {
        rt().block_on(async {
            let (mut s, inner) = store().await;
            let count = || count(&inner);
            let before = count().await;
            let up = s.prepare_chunks(vec![(1, chunk(2))]).await.unwrap();
            let mut landed = up.run().await;
            assert_eq!(count().await, before + 1, "the put landed");
            assert!(landed.results.iter().all(Result::is_ok), "the puts landed");
            landed.macs = Err("task panicked: the test's".into());
            let e = s.finish_chunks(up, landed).unwrap_err();
            assert!(matches!(e, RemoteError::Crypto(_)), "{e:?}");
            assert!(e.to_string().contains("the test's"), "{e}");
            assert_eq!(s.read_chunk(1).await.unwrap(), chunk(1), "nothing recorded");
            // The orphan goes at the next collection.
            assert_eq!(s.collect_garbage(Duration::ZERO).await.unwrap(), 1);
            assert_eq!(count().await, before);
            s.write_chunks(vec![(1, chunk(3))]).await.unwrap();
            assert_eq!(s.read_chunk(1).await.unwrap(), chunk(3));
        });
    }
    /// An upload given up (its task still shares it, so it cannot be
    /// finished) records nothing, and what it put is collected.
    #[test]
    fn an_abandoned_upload_records_nothing_and_is_collected() {
        rt().block_on(async {
            let (mut s, inner) = store().await;
            let count = || count(&inner);
            let before = count().await;
            let up = Arc::new(
                s.prepare_chunks(vec![(1, chunk(2)), (2, chunk(2))])
                    .await
                    .unwrap(),
            );
            let still = up.clone();
            drop(up.run().await);
            assert_eq!(count().await, before + 2, "the puts landed");
            s.abandon_chunks(&still);
            assert_eq!(s.read_chunk(1).await.unwrap(), chunk(1), "nothing recorded");
            assert_eq!(s.read_chunk(2).await.unwrap(), chunk(0));
            assert_eq!(s.collect_garbage(Duration::ZERO).await.unwrap(), 2);
            assert_eq!(count().await, before);
        });
    }
}

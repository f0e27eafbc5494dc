//! [`RemoteDevice`]: a block device on a [`ChunkStore`], for the data
//! path (the LUKS2 engine reads and writes sectors; this turns them into
//! chunks).
//!
//! Writes go to a buffer of chunks in memory (ciphertext only) and are
//! uploaded when it fills or at [`flush`](BlockDevice::flush), which then
//! writes the manifest and keeps its root (through `on_root`) before it
//! returns: a flush that returned is durable on the store and recorded
//! locally. What was written and not flushed is in the write journal on
//! local disk once one is attached ([`RemoteDevice::attach_journal`], as
//! the daemon always does): a daemon that dies leaves it, and the next
//! open replays it. Without it, such writes are lost if the process
//! dies, as a disk's cache is (ext4 flushes at each journal commit and
//! fsync).
//!
//! Every method blocks on the device's own runtime: call it from a
//! thread, never from inside an async task.
//!
//! With mirrors, a thread of the device's own brings stale stores back
//! between requests ([`ChunkStore::resync`], a bounded step at a time),
//! and every change of the stores' standing is handed to `on_change`
//! (for the audit log and status).

use crate::RemoteError;
use crate::journal::{Found, Journal, Replay};
use crate::layout::Root;
use crate::store::{
    ChunkStore, Garbage, Landed, Listed, Reads, ReplicaStatus, StoreEvent, Sweep, Swept, Upload,
};
use crate::written::Written;
use coffre_storage::BlockDevice;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Called with each new root, before a flush returns: keep it in the
/// control directory.
pub type OnRoot = Box<dyn Fn(Root) -> io::Result<()> + Send + Sync>;

/// Called with what happened to the stores (a store stale, back in step,
/// a chunk repaired; possibly nothing) and every store's standing, after
/// each request that touched them and each step of a resync.
pub type OnChange = Box<dyn Fn(&[StoreEvent], &[ReplicaStatus]) + Send + Sync>;

/// How often the resync thread looks for a stale store to bring back.
const RESYNC_EVERY: Duration = Duration::from_millis(500);

/// Objects copied per resync step (the device waits for a step).
const RESYNC_BUDGET: usize = 32;

/// How long after a background upload failed the next one starts (the
/// dirty chunks wait in the buffer; a flush uploads them at once); also
/// how long a partial chunk whose fetch failed waits before what reads
/// and writes set off fetches it again (a flush tries at once).
const UPLOAD_RETRY: Duration = Duration::from_secs(1);

/// Chunks fetched together when reads are sequential (at most a quarter
/// of the buffer).
const READ_AHEAD: u64 = 16;

/// Partial chunks fetched together to be made whole.
const FETCH_TOGETHER: usize = 16;

/// Whether partial chunks whose fetch failed less than [`UPLOAD_RETRY`]
/// ago are fetched again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// At once: a flush that was asked for.
    Now,
    /// Not before the pause: what writes set off (making room, a
    /// background upload, the journal's full cycle).
    Paced,
}

/// When the device's thread collects and sweeps ([`Housekeeping::default`]
/// is what the daemon uses; tests shorten it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Housekeeping {
    /// How often superseded objects are deleted (60 s)...
    pub gc_every: Duration,
    /// ...and how long after a newer manifest made them so (10 min: a
    /// reader that opened the older manifest, a recovery export, has that
    /// long to finish its reads).
    pub gc_grace: Duration,
    /// The first sweep for orphans, after the device starts (10 min)...
    pub sweep_first: Duration,
    /// ...then one a day...
    pub sweep_every: Duration,
    /// ...or within the hour after a sweep that could not judge every
    /// store, judged one on part of its objects, failed a deletion, or
    /// failed.
    pub sweep_retry: Duration,
    /// Only objects last written this long ago (by the store's clock) are
    /// judged (a day): an object of a writer that took over the store
    /// while the listing ran is younger; the judgement itself, made after
    /// the listing against what the device names, is what keeps live
    /// objects safe.
    pub sweep_min_age: Duration,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Self {
            gc_every: Duration::from_secs(60),
            gc_grace: Duration::from_secs(600),
            sweep_first: Duration::from_secs(600),
            sweep_every: Duration::from_secs(24 * 3600),
            sweep_retry: Duration::from_secs(3600),
            sweep_min_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// The resync thread: its stop signal and its exit.
struct Resyncer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    /// Cancels a step in flight (before the runtime goes: a step's timers
    /// must not outlive it).
    cancel: Arc<tokio::sync::Notify>,
    exited: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// A block device on an object store.
pub struct RemoteDevice {
    /// Its own runtime (taken at drop, shut down in the background: a
    /// device may be dropped inside another runtime, the daemon's).
    rt: Option<tokio::runtime::Runtime>,
    state: Arc<Mutex<State>>,
    on_root: OnRoot,
    on_change: Option<Arc<OnChange>>,
    resyncer: Option<Resyncer>,
    size: u64,
    chunk: u64,
    /// Set by the first [`attach_journal`](RemoteDevice::attach_journal),
    /// before its replay: a second is refused at once.
    journal_taken: std::sync::atomic::AtomicBool,
}

struct Cached {
    /// Shared with an upload on its way, if any (copied on the next write
    /// to it then: the upload keeps the bytes it MACed).
    data: Arc<Vec<u8>>,
    dirty: bool,
    used: u64,
    /// When it was last written (the clock): an upload of an older copy
    /// leaves it dirty.
    written: u64,
    /// A chunk a partial write brought into the buffer without reading it
    /// from the store: which bytes were written. The others are not the
    /// chunk's (zeros in the buffer) until [`RemoteDevice::complete`]
    /// fetches it: never read before that, and the chunk never uploaded.
    /// `None`: every byte is the chunk's.
    partial: Option<Written>,
}

/// A chunk fetched (and verified) in the background ahead of sequential
/// reads.
struct Prefetch {
    reads: Arc<Reads>,
    task: tokio::task::JoinHandle<Vec<Option<bytes::Bytes>>>,
}

/// Dirty chunks uploading in the background while writes go on.
struct InFlight {
    upload: Arc<Upload>,
    task: tokio::task::JoinHandle<Landed>,
    /// Each chunk and when the copy uploading was written.
    copies: Vec<(u64, u64)>,
}

struct State {
    store: ChunkStore,
    cache: BTreeMap<u64, Cached>,
    bytes: usize,
    limit: usize,
    clock: u64,
    /// An upload in the background.
    in_flight: Option<InFlight>,
    /// Chunks on their way ahead of sequential reads, by index: as many
    /// as the window holds, one more started as each is read.
    prefetch: BTreeMap<u64, Prefetch>,
    /// No background upload starts before this (one failed).
    upload_after: Option<std::time::Instant>,
    /// Partial chunks whose fetch failed, each with when what writes set
    /// off may fetch it again (a flush asked for tries at once).
    refused: BTreeMap<u64, std::time::Instant>,
    /// The chunk the last read ended in: a read that starts a miss at the
    /// next one is sequential, and the chunks after it are fetched with it.
    last_read: Option<u64>,
    /// The chunk the last write ended in: if it is partial, the next write
    /// likely covers the rest of it, so a background upload leaves it.
    last_write: Option<u64>,
    /// The stores' standing last handed to `on_change`.
    reported: Vec<ReplicaStatus>,
    /// The write journal on local disk, once attached.
    journal: Option<Journal>,
}

impl std::fmt::Debug for RemoteDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDevice")
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A chunk's bytes in the buffer, for an upload: shared, not copied.
fn shared(data: &Arc<Vec<u8>>) -> bytes::Bytes {
    /// The owner `Bytes` keeps: the buffer's `Arc`.
    struct Owner(Arc<Vec<u8>>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    bytes::Bytes::from_owner(Owner(data.clone()))
}

/// Chunk `i`, as the store has it, into the buffer: the newest used.
fn insert_clean(s: &mut State, i: u64, data: Vec<u8>) {
    s.clock += 1;
    s.bytes += data.len();
    let used = s.clock;
    s.cache.insert(
        i,
        Cached {
            data: Arc::new(data),
            dirty: false,
            used,
            written: 0,
            partial: None,
        },
    );
}

/// Chunk `i` as the store has it (`fetched`), under what was written of
/// it, if the buffer holds it partial: it is whole then. The fetched
/// buffer goes back to the pool.
fn fill(s: &mut State, i: u64, fetched: Vec<u8>) -> io::Result<()> {
    let r = match s.cache.get_mut(&i) {
        Some(c) if c.partial.is_some() => {
            if fetched.len() == c.data.len() {
                let written = c.partial.take().unwrap_or_default();
                let data = Arc::make_mut(&mut c.data);
                for gap in written.gaps(data.len()) {
                    data[gap.clone()].copy_from_slice(&fetched[gap]);
                }
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "chunk {i} came back {} bytes long, not {}",
                    fetched.len(),
                    c.data.len()
                )))
            }
        }
        _ => Ok(()),
    };
    crate::bufpool::give(fetched);
    r
}

/// What a background upload's task gave back.
type UploadResults = Result<Landed, tokio::task::JoinError>;

/// Records an upload that ran in the background: the chunks not written
/// since are clean. A failed upload leaves them dirty, and the next one
/// waits [`UPLOAD_RETRY`].
fn finish_upload(
    s: &mut State,
    upload: Arc<Upload>,
    copies: Vec<(u64, u64)>,
    results: UploadResults,
) -> io::Result<()> {
    let results = results.unwrap_or_else(|e| upload.failed(&format!("the upload stopped: {e}")));
    let upload = match Arc::try_unwrap(upload) {
        Ok(u) => u,
        Err(shared) => {
            // Its chunks stay dirty (written again under new names); what
            // it put is collected.
            s.store.abandon_chunks(&shared);
            s.upload_after = Some(std::time::Instant::now() + UPLOAD_RETRY);
            return Err(io::Error::other("an upload is still shared after its task"));
        }
    };
    if s.store.finish_chunks(upload, results).is_ok() {
        for (i, written) in copies {
            if let Some(c) = s.cache.get_mut(&i)
                && c.written == written
            {
                c.dirty = false;
            }
        }
    } else {
        s.upload_after = Some(std::time::Instant::now() + UPLOAD_RETRY);
    }
    Ok(())
}

/// Runs a step of the device's thread to its end (its output), or until
/// the device is dropped (`None`: the step is dropped at its next await,
/// before the runtime goes).
fn step<T>(
    handle: &tokio::runtime::Handle,
    cancel: &tokio::sync::Notify,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    handle.block_on(async {
        tokio::select! {
            v = f => Some(v),
            () = cancel.notified() => None,
        }
    })
}

/// One sweep for orphans ([`ChunkStore::sweep`]) while the device is in
/// use: the listings (`list`) and the deletions (`delete`) run without the
/// device held, so that reads and writes go on; what is an orphan is
/// judged with it held, after the listings, against what the device names
/// then, an upload on its way included. `None`: the device's thread was
/// stopped.
fn sweep_device(
    state: &Mutex<State>,
    on_change: Option<&OnChange>,
    min_age: Duration,
    list: impl FnOnce(&Sweep) -> Option<Vec<Result<Option<Listed>, String>>>,
    delete: impl FnOnce(&Garbage) -> Option<Vec<bool>>,
) -> Option<Result<Swept, RemoteError>> {
    let sweep = match lock(state).store.prepare_sweep(min_age) {
        Ok(sweep) => sweep,
        Err(e) => return Some(Err(e)),
    };
    let listed = list(&sweep)?;
    let judged = {
        let mut s = lock(state);
        let uploading: Vec<String> = s
            .in_flight
            .as_ref()
            .map(|f| f.upload.names().cloned().collect())
            .unwrap_or_default();
        let r = s.store.finish_sweep(&sweep, listed, &uploading);
        report(&mut s, on_change);
        r
    };
    let mut swept = match judged {
        Ok(swept) => swept,
        Err(e) => return Some(Err(e)),
    };
    if let Some(g) = swept.garbage.take() {
        let done = delete(&g)?;
        let mut s = lock(state);
        swept.deleted = s.store.finish_orphans(g, &done);
        report(&mut s, on_change);
    }
    Some(Ok(swept))
}

/// Hands what happened to the stores to `on_change`: events, or a change
/// in their standing (with mirrors). Nothing new, nothing called.
fn report(s: &mut State, on_change: Option<&OnChange>) {
    let events = s.store.take_events();
    let Some(f) = on_change else {
        return;
    };
    let status = s.store.status();
    let changed = s.store.stores() > 1 && status != s.reported;
    if !events.is_empty() || changed || s.reported.is_empty() {
        f(&events, &status);
        s.reported = status;
    }
}

impl RemoteDevice {
    /// A device on `store`, keeping at most `cache_limit` bytes of chunks
    /// in memory (at least two chunks).
    pub fn new(store: ChunkStore, cache_limit: usize, on_root: OnRoot) -> io::Result<Self> {
        Self::with_changes(store, cache_limit, on_root, None)
    }

    /// [`new`](RemoteDevice::new), telling `on_change` what happens to
    /// the stores; with mirrors, a thread brings stale stores back.
    pub fn with_changes(
        store: ChunkStore,
        cache_limit: usize,
        on_root: OnRoot,
        on_change: Option<OnChange>,
    ) -> io::Result<Self> {
        Self::with_housekeeping(
            store,
            cache_limit,
            on_root,
            on_change,
            Housekeeping::default(),
        )
    }

    /// [`with_changes`](RemoteDevice::with_changes), its thread collecting
    /// and sweeping on `housekeeping`'s times.
    pub fn with_housekeeping(
        store: ChunkStore,
        cache_limit: usize,
        on_root: OnRoot,
        on_change: Option<OnChange>,
        housekeeping: Housekeeping,
    ) -> io::Result<Self> {
        let g = store.geometry();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coffre-remote")
            .enable_all()
            .build()?;
        let chunk = u64::from(g.chunk_size);
        let floor = usize::try_from(2 * chunk).unwrap_or(usize::MAX);
        let mut dev = RemoteDevice {
            rt: Some(rt),
            state: Arc::new(Mutex::new(State {
                store,
                cache: BTreeMap::new(),
                bytes: 0,
                limit: cache_limit.max(floor),
                clock: 0,
                last_read: None,
                last_write: None,
                in_flight: None,
                prefetch: BTreeMap::new(),
                upload_after: None,
                refused: BTreeMap::new(),
                reported: Vec::new(),
                journal: None,
            })),
            on_root,
            on_change: on_change.map(Arc::new),
            resyncer: None,
            size: g.size,
            chunk,
            journal_taken: std::sync::atomic::AtomicBool::new(false),
        };
        // What open found (a mirror behind or unreachable) is news.
        report(&mut lock(&dev.state), dev.on_change.as_deref());
        dev.resyncer = Some(dev.start_resync(housekeeping)?);
        Ok(dev)
    }

    /// The device's thread: it brings stale stores back, a step at a
    /// time, while no request holds the device, and deletes superseded
    /// objects and sweeps for orphans on `hk`'s times.
    fn start_resync(&self, hk: Housekeeping) -> io::Result<Resyncer> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, exited) = std::sync::mpsc::channel();
        let handle = self
            .rt
            .as_ref()
            .map(|rt| rt.handle().clone())
            .ok_or_else(|| io::Error::other("no runtime"))?;
        let (state, on_change, stop2) = (self.state.clone(), self.on_change.clone(), stop.clone());
        let cancel = Arc::new(tokio::sync::Notify::new());
        let cancel2 = cancel.clone();
        std::thread::Builder::new()
            .name("coffre-resync".into())
            .spawn(move || {
                let mut last_gc = std::time::Instant::now();
                let mut next_sweep = std::time::Instant::now() + hk.sweep_first;
                loop {
                    {
                        let (m, cv) = &*stop2;
                        let g = m.lock().unwrap_or_else(|p| p.into_inner());
                        let (g, _) = cv
                            .wait_timeout_while(g, RESYNC_EVERY, |stop| !*stop)
                            .unwrap_or_else(|p| p.into_inner());
                        if *g {
                            break;
                        }
                    }
                    // Nothing changes the store while an upload runs in
                    // the background: the next tick.
                    // An upload that ended in the background is recorded
                    // here too (writes may have stopped); one still running
                    // keeps the store as it is: the next tick.
                    {
                        let mut s = lock(&state);
                        if s.in_flight.as_ref().is_some_and(|f| f.task.is_finished())
                            && let Some(f) = s.in_flight.take()
                        {
                            let results = handle.block_on(f.task);
                            let _ = finish_upload(&mut s, f.upload, f.copies, results);
                            report(&mut s, on_change.as_deref());
                        }
                    }
                    // A store that served bad data leaves the stores in
                    // step (no request to a store here).
                    {
                        let mut s = lock(&state);
                        // Not while an upload runs: it chose its stores.
                        if s.in_flight.is_none() && s.store.demote_bad() > 0 {
                            report(&mut s, on_change.as_deref());
                        }
                    }
                    // The deletions run without the device held: a store
                    // that is slow to delete holds up nothing.
                    if last_gc.elapsed() >= hk.gc_every {
                        let garbage = {
                            let mut s = lock(&state);
                            // An upload running: collection waits for a
                            // later tick (resync still gets this one).
                            if s.in_flight.is_some() {
                                Ok(None)
                            } else {
                                last_gc = std::time::Instant::now();
                                s.store.prepare_garbage(hk.gc_grace)
                            }
                        };
                        if let Ok(Some(g)) = garbage {
                            let Some(done) = step(&handle, &cancel2, g.run()) else {
                                break;
                            };
                            lock(&state).store.finish_garbage(g, &done);
                        }
                    }
                    // Orphans: see `sweep_device`. A sweep that could not
                    // judge every store is tried again sooner.
                    if std::time::Instant::now() >= next_sweep {
                        let r = sweep_device(
                            &state,
                            on_change.as_deref(),
                            hk.sweep_min_age,
                            |sw| step(&handle, &cancel2, sw.run()),
                            |g| step(&handle, &cancel2, g.run()),
                        );
                        let Some(r) = r else { break };
                        let whole = r.is_ok_and(|s| {
                            s.unjudged.is_empty()
                                && s.partial.is_empty()
                                && s.deleted == s.orphans.len()
                        });
                        next_sweep = std::time::Instant::now()
                            + if whole {
                                hk.sweep_every
                            } else {
                                hk.sweep_retry
                            };
                    }
                    // Asked without the device held: a store that is down
                    // holds up nothing.
                    let (probes, name, wait) = lock(&state).store.resync_probes();
                    if probes.is_empty() {
                        continue;
                    }
                    let asked = futures::future::join_all(probes.iter().map(|(_, o)| async {
                        tokio::time::timeout(wait, o.get(&name, 16 << 20))
                            .await
                            .is_ok_and(|r| r.is_ok())
                    }));
                    let Some(answers) = step(&handle, &cancel2, asked) else {
                        break;
                    };
                    let (answered, silent): (Vec<_>, Vec<_>) =
                        probes.iter().zip(&answers).partition(|(_, a)| **a);
                    let silent: Vec<usize> = silent.into_iter().map(|((i, _), _)| *i).collect();
                    lock(&state)
                        .store
                        .postpone_resync(&silent, "it does not answer");
                    // Only the stores that answered are worked on, a step
                    // each, without the device held; but for the last
                    // step (one manifest put, bounded in time), which no
                    // write may come between.
                    let mut stopped = false;
                    for ((i, _), _) in answered {
                        let mut s = lock(&state);
                        if s.in_flight.is_some() {
                            break;
                        }
                        let Some(work) = s.store.prepare_resync(*i, RESYNC_BUDGET) else {
                            continue;
                        };
                        let held = if work.is_last() {
                            Some(s)
                        } else {
                            drop(s);
                            None
                        };
                        let Some(outcome) = step(&handle, &cancel2, work.run()) else {
                            stopped = true;
                            break;
                        };
                        let mut s = held.unwrap_or_else(|| lock(&state));
                        // Fenced: the next write says so.
                        let _ = s.store.finish_resync(work, outcome);
                        report(&mut s, on_change.as_deref());
                    }
                    if stopped {
                        break;
                    }
                }
                let _ = tx.send(());
            })?;
        Ok(Resyncer {
            cancel,
            stop,
            exited: Mutex::new(exited),
        })
    }

    /// Deletes what no durable manifest has named for `grace` (the
    /// device's thread does it every minute with a grace of ten).
    pub fn collect_garbage(&self, grace: Duration) -> io::Result<usize> {
        let mut s = lock(&self.state);
        self.settle(&mut s)?;
        self.block_on(s.store.collect_garbage(grace))
            .map_err(RemoteError::into_io)
    }

    /// Deletes the orphans: objects of the volume's layout that nothing
    /// names and that were last written `min_age` or longer ago, on the
    /// stores it could judge ([`ChunkStore::sweep`], [`Swept`]). The
    /// device's thread does it on its [`Housekeeping`] times (10 minutes
    /// after the start, then daily, hourly after a sweep left something
    /// undone, objects a day old).
    pub fn sweep(&self, min_age: Duration) -> io::Result<Swept> {
        sweep_device(
            &self.state,
            self.on_change.as_deref(),
            min_age,
            |sw| Some(self.block_on(sw.run())),
            |g| Some(self.block_on(g.run())),
        )
        .unwrap_or_else(|| Err(RemoteError::Store("the sweep was stopped".into())))
        .map_err(RemoteError::into_io)
    }

    /// Every store's standing.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        lock(&self.state).store.status()
    }

    /// Runs `f` to its end on the device's runtime. From inside another
    /// runtime (the daemon closes the data on its own thread at shutdown)
    /// a runtime cannot be entered: the work then runs on a thread of its
    /// own, this one waiting.
    fn block_on<F: std::future::Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        let Some(rt) = &self.rt else {
            unreachable!("the runtime is only taken at drop")
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(f);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| rt.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The durable root.
    pub fn root(&self) -> Root {
        lock(&self.state).store.root()
    }

    fn range_check(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} are past the volume's end ({})",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Hands a root the store made durable to `on_root`; marked kept only
    /// once that succeeded (else it is offered again at the next flush).
    fn keep_new_root(&self, s: &mut State) -> io::Result<()> {
        if let Some(root) = s.store.new_root() {
            (self.on_root)(root)?;
            s.store.root_kept(root);
        }
        Ok(())
    }

    /// Every write so far durable on the store (the journal emptied).
    /// `when` says whether partial chunks whose fetch failed a moment ago
    /// are tried again at once (a flush asked for) or after the pause
    /// (one the journal's full cycle forces on a write).
    fn flush_locked(&self, s: &mut State, when: Fetch) -> io::Result<()> {
        self.upload(s, when)?;
        let r = self.block_on(s.store.flush());
        report(s, self.on_change.as_deref());
        // Kept before the flush returns (a failed flush may still have
        // settled an earlier manifest as done).
        self.keep_new_root(s)?;
        r.map_err(RemoteError::into_io)?;
        let State { journal, store, .. } = &mut *s;
        if let Some(j) = journal {
            j.reset(store)?;
        }
        Ok(())
    }

    /// Attaches the write journal at `path`: what a daemon that died left
    /// there is replayed first, one record at a time (each verified;
    /// records already durable, or that do not verify, are not) and
    /// flushed to the store; then every write is journaled until the next
    /// flush. Call it once, before the device is used. A replay that fails
    /// (reading the file, or its flush) leaves the journal as it was (for
    /// the next open) and is an error.
    pub fn attach_journal(&self, path: &std::path::Path) -> io::Result<Found> {
        if self
            .journal_taken
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // A second journal would replace the first, whose file holds
            // writes not yet flushed (and its replay write old records
            // over newer data).
            return Err(io::Error::other("a write journal is already attached"));
        }
        let mut replay = Replay::open(path)?;
        loop {
            let next = replay.next(&lock(&self.state).store)?;
            let Some((offset, data)) = next else { break };
            self.write_at(offset, data)?;
        }
        let found = replay.found();
        if found.replayed > 0 {
            self.flush()?;
        }
        let mut s = lock(&self.state);
        s.journal = Some(Journal::create(path, &s.store)?);
        Ok(found)
    }

    /// Fetches the partial chunks `indices` (16 at a time) and makes each
    /// whole under what was written of it. One that cannot be fetched
    /// stays partial (and dirty), and is an error.
    fn complete(&self, s: &mut State, indices: &[u64]) -> io::Result<()> {
        // A read-ahead on its way brings what they lack (and a second
        // fetch would be for nothing).
        for i in indices {
            self.land_prefetch(s, *i)?;
        }
        let indices: Vec<u64> = indices
            .iter()
            .copied()
            .filter(|i| s.cache.get(i).is_some_and(|c| c.partial.is_some()))
            .collect();
        let mut failed = None;
        // A batch at a time: what is fetched and not yet put under its
        // part is memory the buffer's limit does not count.
        for batch in indices.chunks(FETCH_TOGETHER) {
            let got = self.block_on(s.store.read_chunks(batch));
            report(s, self.on_change.as_deref());
            for (i, r) in batch.iter().zip(got) {
                let r = r
                    .map_err(RemoteError::into_io)
                    .and_then(|data| fill(s, *i, data));
                if let Err(e) = r {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The partial chunks in the buffer, but `except`.
    fn partial_chunks(s: &State, except: Option<u64>) -> Vec<u64> {
        s.cache
            .iter()
            .filter(|(i, c)| c.partial.is_some() && Some(**i) != except)
            .map(|(i, _)| *i)
            .collect()
    }

    /// Makes the partial chunks but `except` whole. A chunk whose fetch
    /// failed is not fetched again by a [`Fetch::Paced`] call for
    /// [`UPLOAD_RETRY`] after that failure (the others are): a store that
    /// refuses chunks written in part must not have each write fetch them
    /// all again. An error if one could not be fetched, or waits.
    fn complete_partials(&self, s: &mut State, except: Option<u64>, when: Fetch) -> io::Result<()> {
        let partial = Self::partial_chunks(s, except);
        // Only chunks still partial are remembered.
        let State { refused, cache, .. } = &mut *s;
        refused.retain(|i, _| cache.get(i).is_some_and(|c| c.partial.is_some()));
        if partial.is_empty() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let (waiting, fetch): (Vec<u64>, Vec<u64>) = partial
            .into_iter()
            .partition(|i| when == Fetch::Paced && s.refused.get(i).is_some_and(|t| now < *t));
        let r = if fetch.is_empty() {
            Ok(())
        } else {
            self.complete(s, &fetch)
        };
        // Timed from the failure's end: a store slow to refuse still gets
        // its pause. (A read-ahead that landed wrong fails `complete`
        // before it fetched: the chunks not tried wait too, as after a
        // store's refusal.)
        let again = std::time::Instant::now() + UPLOAD_RETRY;
        for i in fetch {
            if s.cache.get(&i).is_some_and(|c| c.partial.is_some()) {
                s.refused.insert(i, again);
            } else {
                s.refused.remove(&i);
            }
        }
        r?;
        if waiting.is_empty() {
            return Ok(());
        }
        let mut named: Vec<String> = waiting.iter().take(4).map(u64::to_string).collect();
        let (what, wait, its) = if waiting.len() == 1 {
            ("chunk", "waits", "its")
        } else {
            ("chunks", "wait", "their")
        };
        if waiting.len() > 4 {
            named.push(format!("and {} more", waiting.len() - 4));
        }
        Err(io::Error::other(format!(
            "{what} {} (written in part) {wait} for the rest of {its} bytes, which the \
             store did not give back a moment ago (fetched again within {} s, or at \
             the next flush)",
            named.join(", "),
            UPLOAD_RETRY.as_secs()
        )))
    }

    /// Uploads every dirty chunk (not yet durable: see `flush`), the
    /// partial ones made whole first (`when`: see
    /// [`complete_partials`](Self::complete_partials)). A partial chunk
    /// that cannot be fetched stays dirty and is an error, after the others
    /// went up (one chunk the stores cannot give back does not hold up the
    /// rest: the buffer can still make room).
    fn upload(&self, s: &mut State, when: Fetch) -> io::Result<()> {
        self.settle(s)?;
        let fetched = self.complete_partials(s, None, when);
        let dirty: Vec<(u64, bytes::Bytes)> = s
            .cache
            .iter()
            .filter(|(_, c)| c.dirty && c.partial.is_none())
            .map(|(i, c)| (*i, shared(&c.data)))
            .collect();
        if dirty.is_empty() {
            return fetched;
        }
        let indices: Vec<u64> = dirty.iter().map(|(i, _)| *i).collect();
        let r = self.block_on(s.store.write_chunks(dirty));
        report(s, self.on_change.as_deref());
        self.keep_new_root(s)?;
        r.map_err(RemoteError::into_io)?;
        for i in indices {
            if let Some(c) = s.cache.get_mut(&i) {
                c.dirty = false;
            }
        }
        fetched
    }

    /// Waits for the upload in the background, if any, and records it:
    /// the chunks not written since are clean. A failed upload leaves
    /// them dirty (uploaded again; a flush reports what fails then).
    fn settle(&self, s: &mut State) -> io::Result<()> {
        let Some(f) = s.in_flight.take() else {
            return Ok(());
        };
        let results = self.block_on(f.task);
        finish_upload(s, f.upload, f.copies, results)?;
        report(s, self.on_change.as_deref());
        self.keep_new_root(s)
    }

    /// Starts uploading the dirty chunks in the background once they are
    /// a quarter of the buffer (one upload at a time): the writes that
    /// follow go on meanwhile. Partial chunks are fetched first, the
    /// write that called waiting for them.
    fn write_behind(&self, s: &mut State) {
        if let Some(f) = &s.in_flight {
            if !f.task.is_finished() {
                return;
            }
            if self.settle(s).is_err() {
                return;
            }
        }
        if s.bytes < s.limit / 4
            || s.upload_after
                .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        let dirty: usize = s
            .cache
            .values()
            .filter(|c| c.dirty)
            .map(|c| c.data.len())
            .sum();
        if dirty < s.limit / 4 {
            return;
        }
        // Partial chunks made whole first (fetched 16 at a time, the
        // writer waiting), but the one the last write ended in: the next
        // write likely covers it. One that cannot be fetched stays
        // partial, for the flush (what writes set off does not fetch it
        // again for a second); the rest go up.
        let fetched = self.complete_partials(s, s.last_write, Fetch::Paced);
        let copies: Vec<(u64, u64)> = s
            .cache
            .iter()
            .filter(|(_, c)| c.dirty && c.partial.is_none())
            .map(|(i, c)| (*i, c.written))
            .collect();
        if copies.is_empty() {
            if fetched.is_err() {
                s.upload_after = Some(std::time::Instant::now() + UPLOAD_RETRY);
            }
            return;
        }
        let chunks: Vec<(u64, bytes::Bytes)> = copies
            .iter()
            .filter_map(|(i, _)| s.cache.get(i).map(|c| (*i, shared(&c.data))))
            .collect();
        let Ok(upload) = self.block_on(s.store.prepare_chunks(chunks)) else {
            return;
        };
        let Some(rt) = &self.rt else { return };
        let upload = Arc::new(upload);
        let task = {
            let upload = upload.clone();
            rt.spawn(async move { upload.run().await })
        };
        s.in_flight = Some(InFlight {
            upload,
            task,
            copies,
        });
    }

    /// Keeps the buffer under its limit: clean chunks go first, least
    /// recently used first; dirty ones are uploaded when nothing clean is
    /// left to drop (partial ones fetched for that).
    fn shrink(&self, s: &mut State) -> io::Result<()> {
        while s.bytes > s.limit {
            let victim = s
                .cache
                .iter()
                .filter(|(_, c)| !c.dirty)
                .min_by_key(|(_, c)| c.used)
                .map(|(i, _)| *i);
            match victim {
                Some(i) => {
                    if let Some(c) = s.cache.remove(&i) {
                        s.bytes -= c.data.len();
                        // For the next chunk (unless an upload still
                        // holds it).
                        if let Ok(v) = Arc::try_unwrap(c.data) {
                            crate::bufpool::give(v);
                        }
                    }
                }
                // The upload in the background first, then the rest.
                None if s.in_flight.is_some() => self.settle(s)?,
                None => {
                    // What went up makes room even if a partial chunk
                    // could not be fetched.
                    let r = self.upload(s, Fetch::Paced);
                    if r.is_err() && s.cache.values().all(|c| c.dirty) {
                        return r;
                    }
                }
            }
        }
        Ok(())
    }

    /// How many chunks a read-ahead keeps on their way: [`READ_AHEAD`], at
    /// most a quarter of the buffer (so that what arrives never pushes out
    /// much of it).
    fn window(&self, s: &State) -> u64 {
        let room = u64::try_from(s.limit / 4).unwrap_or(u64::MAX) / self.chunk;
        READ_AHEAD.min(room.max(1))
    }

    /// Sequential reads at `index`: each chunk of the window after it that
    /// is neither in the buffer nor on its way is fetched in the
    /// background, on its own. As the reads move on by a chunk, one more
    /// starts: the window stays full, where fetching it whole, then the
    /// next, left the cores idle while each window's last chunks came in.
    fn prefetch_after(&self, s: &mut State, index: u64) {
        let w = self.window(s);
        let chunks = self.size.div_ceil(self.chunk);
        if w < 2 {
            return;
        }
        let Some(rt) = &self.rt else { return };
        for next in index + 1..(index + 1 + w).min(chunks) {
            // Never more than a window on its way (reads that jump from one
            // sequential run to another leave the first run's to land).
            if u64::try_from(s.prefetch.len()).unwrap_or(u64::MAX) >= w {
                return;
            }
            // A chunk written in part is fetched ahead too (its rest is
            // put under the part when it lands, or when it is read).
            let whole = s.cache.get(&next).is_some_and(|c| c.partial.is_none());
            if whole || s.prefetch.contains_key(&next) {
                continue;
            }
            let reads = Arc::new(s.store.prepare_reads(&[next]));
            let task = {
                let reads = reads.clone();
                rt.spawn(async move { reads.run().await })
            };
            s.prefetch.insert(next, Prefetch { reads, task });
        }
    }

    /// Waits for chunk `index`'s read-ahead, if it is on its way, and
    /// keeps it if it verified against the table as it is now (never
    /// over a chunk the buffer holds: that one is newer or the same; a
    /// partial one takes what it lacks from it), then makes room.
    fn settle_prefetch(&self, s: &mut State, index: u64) -> io::Result<()> {
        self.land_prefetch(s, index)?;
        self.shrink(s)
    }

    /// [`settle_prefetch`](Self::settle_prefetch) without making room
    /// after it.
    fn land_prefetch(&self, s: &mut State, index: u64) -> io::Result<()> {
        let Some(p) = s.prefetch.remove(&index) else {
            return Ok(());
        };
        let got = self.block_on(p.task).unwrap_or_default();
        for (i, data) in s.store.finish_reads(&p.reads, got) {
            match s.cache.get(&i) {
                None => insert_clean(s, i, data),
                // What a partial chunk lacked.
                Some(c) if c.partial.is_some() => fill(s, i, data)?,
                Some(_) => crate::bufpool::give(data),
            }
        }
        Ok(())
    }

    /// Keeps the read-aheads that have landed (without waiting).
    fn settle_landed(&self, s: &mut State) -> io::Result<()> {
        let landed: Vec<u64> = s
            .prefetch
            .iter()
            .filter(|(_, p)| p.task.is_finished())
            .map(|(i, _)| *i)
            .collect();
        for i in landed {
            self.settle_prefetch(s, i)?;
        }
        Ok(())
    }

    /// Chunk `index` in the buffer (read from the store if absent). It
    /// may be partial: the caller reads only bytes it covers.
    fn chunk_mut<'s>(&self, s: &'s mut State, index: u64) -> io::Result<&'s mut Cached> {
        s.clock += 1;
        let now = s.clock;
        if !s.cache.contains_key(&index) {
            let data = self.block_on(s.store.read_chunk(index));
            report(s, self.on_change.as_deref());
            let data = data.map_err(RemoteError::into_io)?;
            s.bytes += data.len();
            s.cache.insert(
                index,
                Cached {
                    data: Arc::new(data),
                    dirty: false,
                    used: now,
                    written: 0,
                    partial: None,
                },
            );
        }
        let c = s
            .cache
            .get_mut(&index)
            .ok_or_else(|| io::Error::other("chunk vanished from the buffer"))?;
        c.used = now;
        Ok(c)
    }
}

impl BlockDevice for RemoteDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.range_check(offset, buf.len())?;
        let mut s = lock(&self.state);
        // Room first (the read may add what it reads: one request's worth).
        self.shrink(&mut s)?;
        self.settle_landed(&mut s)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.chunk;
            let within = usize::try_from(pos % self.chunk).unwrap_or(0);
            let sequential = s.last_read.is_some_and(|l| l + 1 == index || l == index);
            if !s.cache.contains_key(&index) {
                self.settle_prefetch(&mut s, index)?;
            }
            // A sequential miss: the window after it goes on its way
            // before this chunk is read (a failure is left to the read of
            // each chunk to report, with its fallbacks and repairs).
            let whole = s.cache.get(&index).is_some_and(|c| c.partial.is_none());
            if !whole && sequential {
                self.prefetch_after(&mut s, index);
            }
            let c = self.chunk_mut(&mut s, index)?;
            let n = (c.data.len() - within).min(buf.len() - done);
            // Bytes of a partial chunk that were not written: fetched now.
            if c.partial
                .as_ref()
                .is_some_and(|w| !w.covers(&(within..within + n)))
            {
                self.complete(&mut s, &[index])?;
            }
            let c = self.chunk_mut(&mut s, index)?;
            buf[done..done + n].copy_from_slice(&c.data[within..within + n]);
            done += n;
            s.last_read = Some(index);
            if sequential {
                self.prefetch_after(&mut s, index);
            }
        }
        Ok(())
    }

    /// All or nothing: room is made before any byte of the buffer or the
    /// journal changes, so a write that fails (the store unreachable)
    /// changed nothing. A partial write to a chunk the buffer does not
    /// hold reads nothing: the chunk is kept partial (what was written),
    /// and fetched only if a read or an upload needs the rest before
    /// writes cover it.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.range_check(offset, buf.len())?;
        let mut s = lock(&self.state);
        // Room first: a write that fails for want of it leaves no record
        // in the journal either (a crash would replay a write that
        // failed). Before the journal's checks: making room may upload,
        // and an upload may settle an uncertain manifest (below).
        self.shrink(&mut s)?;
        // On local disk before it is taken: a dead daemon's writes are
        // replayed at the next open.
        // A flush first when the journal would pass the cache's size, or
        // when the durable epoch moved without one (an uncertain manifest
        // settled as done): its records must follow the durable epoch. A
        // record written while a manifest put is unsettled is marked so
        // (`journal::AFTER_UNCERTAIN`), and replayed whichever way it is
        // settled, even by this very write's upload.
        let flush_first = s.journal.as_ref().is_some_and(|j| {
            j.bytes() + buf.len() as u64 > (s.limit as u64).min(crate::journal::MAX_CYCLE)
                || j.base() != s.store.root().epoch
        });
        if flush_first {
            self.flush_locked(&mut s, Fetch::Paced)?;
        }
        {
            let State { journal, store, .. } = &mut *s;
            if let Some(j) = journal {
                j.append(store, offset, buf)?;
            }
        }
        // The pieces: (chunk, offset within it, bytes of buf).
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.chunk;
            let within = usize::try_from(pos % self.chunk).unwrap_or(0);
            let len = s.store.geometry().chunk_len(index);
            let n = (len - within).min(buf.len() - done);
            pieces.push((index, within, done..done + n, len));
            done += n;
        }
        for (index, _, range, len) in &pieces {
            // Part of a chunk never written: the rest is zeros, without
            // the store.
            let part = range.len() < *len;
            if part && !s.cache.contains_key(index) && s.store.is_empty_chunk(*index) {
                self.chunk_mut(&mut s, *index)?;
            }
        }
        let last = pieces.last().map(|(index, ..)| *index);
        for (index, within, range, len) in pieces {
            s.clock += 1;
            let used = s.clock;
            match s.cache.get_mut(&index) {
                Some(c) => {
                    let at = within..within + range.len();
                    // A copy first only if an upload still holds these
                    // bytes.
                    Arc::make_mut(&mut c.data)[at.clone()].copy_from_slice(&buf[range]);
                    c.dirty = true;
                    c.used = used;
                    c.written = used;
                    if let Some(w) = &mut c.partial {
                        w.add(at);
                        if w.covers(&(0..len)) {
                            c.partial = None;
                        }
                    }
                }
                None => {
                    // Nothing to read of what it replaces: a whole chunk,
                    // or the part written of one (the rest fetched if
                    // needed before writes cover it).
                    let whole = range.len() == len;
                    let data = if whole {
                        crate::bufpool::copy_of(&buf[range.clone()])
                    } else {
                        let mut v = crate::bufpool::take(len);
                        v.resize(within, 0);
                        v.extend_from_slice(&buf[range.clone()]);
                        v.resize(len, 0);
                        v
                    };
                    let partial = (!whole).then(|| {
                        let mut w = Written::default();
                        w.add(within..within + range.len());
                        w
                    });
                    s.bytes += len;
                    s.cache.insert(
                        index,
                        Cached {
                            data: Arc::new(data),
                            dirty: true,
                            used,
                            written: used,
                            partial,
                        },
                    );
                }
            }
        }
        s.last_write = last;
        self.write_behind(&mut s);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        self.flush_locked(&mut s, Fetch::Now)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        // The resync thread first: told to stop, and waited for a moment
        // (a step in flight ends when the runtime goes).
        let resyncer = self.resyncer.take();
        if let Some(r) = &resyncer {
            let (m, cv) = &*r.stop;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
            // A step in flight is dropped at its next await (one permit:
            // kept if no step is waiting yet).
            r.cancel.notify_one();
            let exited = r.exited.lock().unwrap_or_else(|p| p.into_inner());
            let _ = exited.recv_timeout(Duration::from_secs(5));
        }
        // Allowed anywhere, inside another runtime too.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        drop(resyncer);
        // The journal goes now, not with the last reference to the state
        // (a resync thread that did not stop in time holds one): a clean
        // close empties its file before the device is gone. Not waited
        // for if that thread still holds the lock (it goes with it then).
        let journal = match self.state.try_lock() {
            Ok(mut s) => s.journal.take(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().journal.take(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        drop(journal);
        // The chunks kept for reuse go with the device (another device's
        // next chunks are then allocated anew).
        crate::bufpool::clear();
    }
}

//! [`RemoteDevice`]: a block device on a [`ChunkStore`], for the data
//! path (the LUKS2 engine reads and writes sectors; this turns them into
//! chunks).
//!
//! Writes go to a buffer of chunks in memory (ciphertext only) and are
//! uploaded when it fills or at [`flush`](BlockDevice::flush), which then
//! writes the manifest and keeps its root (through `on_root`) before it
//! returns: a flush that returned is durable on the store and recorded
//! locally. What was written and not flushed is lost if the process dies,
//! as a disk's cache is (ext4 flushes at each journal commit and fsync).
//! A write-back cache on local disk that survives a crash is the next
//! step (issue 17).
//!
//! Every method blocks on the device's own runtime: call it from a
//! thread, never from inside an async task.
//!
//! With mirrors, a thread of the device's own brings stale stores back
//! between requests ([`ChunkStore::resync`], a bounded step at a time),
//! and every change of the stores' standing is handed to `on_change`
//! (for the audit log and status).

use crate::RemoteError;
use crate::layout::Root;
use crate::store::{ChunkStore, ReplicaStatus, StoreEvent};
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

/// How often superseded objects are deleted, and how long after a newer
/// manifest made them so (a reader that opened the older manifest, a
/// recovery export, has that long to finish its reads).
const GC_EVERY: Duration = Duration::from_secs(60);
const GC_GRACE: Duration = Duration::from_secs(600);

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
}

struct Cached {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

struct State {
    store: ChunkStore,
    cache: BTreeMap<u64, Cached>,
    bytes: usize,
    limit: usize,
    clock: u64,
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

/// Runs a step of the device's thread to its end (true), or until the
/// device is dropped (false: the step is dropped at its next await, before
/// the runtime goes).
fn step(
    handle: &tokio::runtime::Handle,
    cancel: &tokio::sync::Notify,
    f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>,
) -> bool {
    handle.block_on(async {
        tokio::select! {
            () = f => true,
            () = cancel.notified() => false,
        }
    })
}

/// Hands what happened to the stores to `on_change`.
fn report(s: &State, on_change: Option<&OnChange>) {
    let events = s.store.take_events();
    if let Some(f) = on_change
        && (!events.is_empty() || s.store.stores() > 1)
    {
        f(&events, &s.store.status());
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
            })),
            on_root,
            on_change: on_change.map(Arc::new),
            resyncer: None,
            size: g.size,
            chunk,
        };
        // What open found (a mirror behind or unreachable) is news.
        report(&lock(&dev.state), dev.on_change.as_deref());
        dev.resyncer = Some(dev.start_resync()?);
        Ok(dev)
    }

    /// The device's thread: it brings stale stores back, a step at a
    /// time, while no request holds the device, and deletes superseded
    /// objects every [`GC_EVERY`].
    fn start_resync(&self) -> io::Result<Resyncer> {
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
                    if last_gc.elapsed() >= GC_EVERY {
                        last_gc = std::time::Instant::now();
                        let mut s = lock(&state);
                        if !step(
                            &handle,
                            &cancel2,
                            Box::pin(async {
                                let _ = s.store.collect_garbage(GC_GRACE).await;
                            }),
                        ) {
                            break;
                        }
                    }
                    // Asked without the device held: a store that is down
                    // holds up nothing.
                    let (probes, name, wait) = lock(&state).store.resync_probes();
                    if probes.is_empty() {
                        continue;
                    }
                    let mut answers = Vec::new();
                    if !step(
                        &handle,
                        &cancel2,
                        Box::pin(async {
                            answers =
                                futures::future::join_all(probes.iter().map(|(_, o)| async {
                                    tokio::time::timeout(wait, o.get(&name, 16 << 20))
                                        .await
                                        .is_ok_and(|r| r.is_ok())
                                }))
                                .await;
                        }),
                    ) {
                        break;
                    }
                    let silent: Vec<usize> = probes
                        .iter()
                        .zip(&answers)
                        .filter(|(_, a)| !**a)
                        .map(|((i, _), _)| *i)
                        .collect();
                    let mut s = lock(&state);
                    // Only the stores that answered are worked on.
                    s.store.postpone_resync(&silent, "it does not answer");
                    let mut result = Ok(false);
                    if silent.len() < probes.len()
                        && !step(
                            &handle,
                            &cancel2,
                            Box::pin(async {
                                result = s.store.resync(RESYNC_BUDGET).await;
                            }),
                        )
                    {
                        break;
                    }
                    if let Err(e) = result {
                        // Fenced, or nothing in step to copy from: not
                        // tried again before the retry delay.
                        let all: Vec<usize> = probes.iter().map(|(i, _)| *i).collect();
                        s.store.postpone_resync(&all, &e.to_string());
                    }
                    report(&s, on_change.as_deref());
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
        self.block_on(s.store.collect_garbage(grace))
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

    /// Uploads every dirty chunk (not yet durable: see `flush`).
    fn upload(&self, s: &mut State) -> io::Result<()> {
        let dirty: Vec<(u64, Vec<u8>)> = s
            .cache
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(i, c)| (*i, c.data.clone()))
            .collect();
        if dirty.is_empty() {
            return Ok(());
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
        Ok(())
    }

    /// Keeps the buffer under its limit: clean chunks go first, least
    /// recently used first; dirty ones are uploaded when nothing clean is
    /// left to drop.
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
                    }
                }
                None => self.upload(s)?,
            }
        }
        Ok(())
    }

    /// Chunk `index` in the buffer (read from the store if absent).
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
                    data,
                    dirty: false,
                    used: now,
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
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.chunk;
            let within = usize::try_from(pos % self.chunk).unwrap_or(0);
            let c = self.chunk_mut(&mut s, index)?;
            let n = (c.data.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&c.data[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// All or nothing: room is made and every chunk a partial write needs
    /// is read before any byte of the buffer changes, so a write that
    /// fails (the store unreachable) changed nothing.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.range_check(offset, buf.len())?;
        let mut s = lock(&self.state);
        self.shrink(&mut s)?;
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
        for (index, within, range, len) in &pieces {
            if !(*within == 0 && range.len() == *len) {
                self.chunk_mut(&mut s, *index)?;
            }
        }
        for (index, within, range, len) in pieces {
            s.clock += 1;
            let used = s.clock;
            match s.cache.get_mut(&index) {
                Some(c) => {
                    c.data[within..within + range.len()].copy_from_slice(&buf[range]);
                    c.dirty = true;
                    c.used = used;
                }
                None => {
                    // A whole chunk: nothing to read of what it replaces.
                    s.bytes += len;
                    s.cache.insert(
                        index,
                        Cached {
                            data: buf[range].to_vec(),
                            dirty: true,
                            used,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        self.upload(&mut s)?;
        let r = self.block_on(s.store.flush());
        report(&s, self.on_change.as_deref());
        // Kept before the flush returns (a failed flush may still have
        // settled an earlier manifest as done).
        self.keep_new_root(&mut s)?;
        r.map(|_| ()).map_err(RemoteError::into_io)
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
    }
}

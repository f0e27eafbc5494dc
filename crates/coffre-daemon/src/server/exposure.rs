//! The data while open: opening (key check, engine, mount, workloads resumed)
//! and closing (workloads paused, data unmounted, key wiped) off the actor,
//! the close deadline, and the shutdown.

use super::*;

/// The data stack and its transitions.
pub(super) struct DataState {
    /// The mounted data while open. Behind a mutex because bringing it
    /// up and down runs off the actor (mounts and unmounts block).
    pub(super) exposure: Arc<std::sync::Mutex<Option<coffre_data::Exposure>>>,
    pub(super) layout: coffre_data::Layout,
    /// Closes started so far (each one's number), those still running,
    /// and those abandoned at their deadline (their late report is
    /// ignored).
    pub(super) closes_started: u64,
    pub(super) closes_running: std::collections::HashSet<u64>,
    pub(super) closes_abandoned: std::collections::HashSet<u64>,
    pub(super) closes_in_flight: u32,
    /// Opens running off the actor (a shutdown waits for them): one given
    /// up at a lock's deadline may still run beside a later one.
    pub(super) opening: Arc<std::sync::atomic::AtomicUsize>,
    /// Cut-offs still running off the actor (see [`sever`]): an open
    /// waits for them, or a late one could take down its mounts.
    pub(super) severing: Arc<std::sync::atomic::AtomicUsize>,
    /// The key and the engine of the open running off the actor, where a
    /// lock's deadline can reach them; and when a lock landed during it.
    pub(super) open_hold: Option<OpenHold>,
    pub(super) open_locked_at: Option<std::time::Instant>,
    /// Since when an open has run with nobody inside (everyone left, or
    /// their sessions ended, while it waits on the storage).
    pub(super) open_unattended_since: Option<std::time::Instant>,
    /// The storage writes the engine had completed at the last tick of a
    /// close (a close whose writes complete is slow, not hung).
    pub(super) close_written_seen: Option<u64>,
    /// The I/O the open's engine had completed at the last tick.
    pub(super) open_io_seen: u64,
    /// Opens started so far; those given up at a lock's deadline (their
    /// late report is ignored), and whether one of those still runs.
    pub(super) opens_started: u64,
    pub(super) opens_abandoned: std::collections::HashSet<u64>,
    /// How many opens have taken the data stack so far: a close that was
    /// given up at its deadline and takes the stack after a later open did
    /// nothing (the stack is that open's).
    pub(super) opens_taken: Arc<std::sync::atomic::AtomicU64>,
    /// `enter` replies held until the vault has finished opening.
    pub(super) parked: Vec<(oneshot::Sender<Answer>, Value)>,
    pub(super) last_open_error: Option<String>,
    /// The data as project workloads see it (if any is declared).
    pub(super) cut: Option<Arc<coffre_data::cut::CutLayer>>,
}

impl DataState {
    pub(super) fn new(layout: coffre_data::Layout) -> Self {
        Self {
            exposure: Arc::default(),
            layout,
            closes_started: 0,
            closes_running: std::collections::HashSet::new(),
            closes_abandoned: std::collections::HashSet::new(),
            closes_in_flight: 0,
            opening: Arc::default(),
            severing: Arc::default(),
            open_hold: None,
            open_locked_at: None,
            open_unattended_since: None,
            close_written_seen: None,
            open_io_seen: 0,
            opens_started: 0,
            opens_abandoned: std::collections::HashSet::new(),
            opens_taken: Arc::default(),
            parked: Vec::new(),
            last_open_error: None,
            cut: None,
        }
    }
}

/// The key and the engine of an open running off the actor. The open
/// borrows the key only for the steps that need it (its check, the
/// engine's key schedule, the NFS handle key: computations, and reads of a
/// remote store, which have their own timeouts), never across the mount,
/// which waits on the storage. So a lock that lands while the open hangs
/// on storage that stopped answering reaches both at its deadline: the key
/// is wiped here and the engine's cipher revoked, as for a close.
#[derive(Clone)]
pub(super) struct OpenHold {
    pub(super) n: u64,
    key: Arc<std::sync::Mutex<Option<VolumeKey>>>,
    cipher: Arc<std::sync::Mutex<Option<Arc<coffre_storage::CipherSlot>>>>,
}

impl OpenHold {
    fn new(n: u64, key: VolumeKey) -> Self {
        OpenHold {
            n,
            key: Arc::new(std::sync::Mutex::new(Some(key))),
            cipher: Arc::default(),
        }
    }

    /// `f` with the key, if it was not wiped.
    fn with_key<R>(&self, f: impl FnOnce(&VolumeKey) -> R) -> Option<R> {
        self.key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(f)
    }

    /// The key, out of reach of the deadline, if it was not wiped; the
    /// engine leaves the hold with it (the open hands both to the actor:
    /// a later give-up must not revoke an engine the vault now runs on).
    fn take_key(&self) -> Option<VolumeKey> {
        let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        let key = k.take();
        if key.is_some() {
            self.cipher.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        key
    }

    /// The storage I/O its engine has completed so far (0 before it has
    /// one).
    fn completed(&self) -> u64 {
        self.cipher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |c| c.completed())
    }

    /// The engine's cipher, where the deadline can revoke it; false (and
    /// nothing kept) if the key was wiped already. Under the key's lock, as
    /// [`OpenHold::give_up`] takes them: the deadline never misses a
    /// cipher published.
    fn publish(&self, cipher: Arc<coffre_storage::CipherSlot>) -> bool {
        let k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if k.is_none() {
            return false;
        }
        *self.cipher.lock().unwrap_or_else(|p| p.into_inner()) = Some(cipher);
        true
    }

    /// Whether the key is still here (or in use by the open now).
    pub(super) fn holds_key(&self) -> bool {
        match self.key.try_lock() {
            Ok(g) => g.is_some(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().is_some(),
            Err(std::sync::TryLockError::WouldBlock) => true,
        }
    }

    /// Wipes the key and revokes the engine's cipher; `None` when the open
    /// is using the key this instant (a computation, or a remote read with
    /// its timeout): try again a moment later.
    pub(super) fn give_up(&self) -> Option<bool> {
        let mut k = match self.key.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        // Dropping a VolumeKey zeroizes it.
        *k = None;
        let c = self.cipher.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(k);
        Some(c.is_some_and(|c| c.revoke()))
    }
}

/// How long the engine has completed no storage write: what bounds each
/// wait of a stop (one that still moves data, dirty pages synced to a
/// slow store or VMs suspended into the volume, is left to finish).
struct Quiet {
    /// The engine the stop began with (kept: a wipe of the key takes the
    /// custody's, and a revoked engine completes no more writes).
    slot: Option<Arc<coffre_storage::CipherSlot>>,
    /// Another count of progress (workloads stopped), if any.
    also: Option<Arc<std::sync::atomic::AtomicU64>>,
    seen: (Option<u64>, u64),
    since: std::time::Instant,
    limit: Duration,
    /// The stop's own end (`[data] stop_deadline_s`), however the storage
    /// moves.
    until: std::time::Instant,
}

impl Quiet {
    fn new(
        slot: Option<Arc<coffre_storage::CipherSlot>>,
        limit: Duration,
        until: std::time::Instant,
    ) -> Self {
        Self {
            seen: (slot.as_ref().map(|s| s.written()), 0),
            slot,
            also: None,
            since: std::time::Instant::now(),
            limit,
            until,
        }
    }

    /// Why the wait is over, if it is: no write completed (nor other
    /// progress was made) for the limit, or the stop's deadline passed.
    fn over(&mut self) -> Option<StopWait> {
        if std::time::Instant::now() >= self.until {
            return Some(StopWait::Deadline);
        }
        let now = (
            self.slot.as_ref().map(|s| s.written()),
            self.also
                .as_ref()
                .map_or(0, |a| a.load(std::sync::atomic::Ordering::Relaxed)),
        );
        if now != self.seen {
            self.seen = now;
            self.since = std::time::Instant::now();
        }
        (self.since.elapsed() >= self.limit).then_some(StopWait::Quiet)
    }
}

/// Why a step of the stop was not waited for.
#[derive(Debug, Clone)]
enum StopWait {
    /// No storage write completed for the deadline.
    Quiet,
    /// The stop's own deadline passed (storage that still moved, slowly).
    Deadline,
    /// Its thread panicked.
    Panicked,
    /// No thread could start.
    NoThread(String),
}

impl std::fmt::Display for StopWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopWait::Quiet => f.write_str(
                "no storage write completed within the close deadline: storage not answering?",
            ),
            StopWait::Deadline => {
                f.write_str("the stop's deadline (stop_deadline_s) passed while it still ran")
            }
            StopWait::Panicked => f.write_str("an internal error (a panic)"),
            StopWait::NoThread(e) => write!(f, "no thread for it: {e}"),
        }
    }
}

/// After the data is exposed: the workloads' view passes through to it
/// again, then the workloads start or thaw.
pub(super) fn resume_workloads(
    workloads: &std::sync::Mutex<coffre_workload::Workloads>,
    cut: Option<&coffre_data::cut::CutLayer>,
    layout: &coffre_data::Layout,
) -> Vec<coffre_workload::Line> {
    let mut lines = Vec::new();
    if let Some(cut) = cut {
        match cut.restore(&layout.mountpoint) {
            Ok(r) if r.lost > 0 => lines.push((
                "workload".to_string(),
                "note".to_string(),
                format!(
                    "{} file(s) workloads kept open were reopened; {} were not (gone, or not reopened this time and tried again at the next open; their descriptors fail meanwhile)",
                    r.reopened, r.lost
                ),
            )),
            Ok(_) => {}
            Err(e) => lines.push((
                "workload".to_string(),
                "failed".to_string(),
                format!("the workloads' view of the data: {e}"),
            )),
        }
    }
    lines.extend(workloads.lock().unwrap_or_else(|p| p.into_inner()).resume());
    lines
}

/// Before the data goes: workloads frozen or stopped, then the
/// workloads' view lets go of every file it holds on the data.
pub(super) fn pause_workloads(
    workloads: &std::sync::Mutex<coffre_workload::Workloads>,
    cut: Option<&coffre_data::cut::CutLayer>,
    mode: Mode,
) -> Vec<coffre_workload::Line> {
    let how = match mode {
        Mode::Fast => coffre_workload::Pause::Fast,
        Mode::Safe => coffre_workload::Pause::Safe,
    };
    let mut lines = workloads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pause(how);
    if let Some(cut) = cut
        && let (_, Err(e)) = cut.cut()
    {
        // Audited: what workloads wrote last may stay in the daemon's
        // memory while closed.
        lines.push((
            "workload".to_string(),
            "failed".to_string(),
            format!("the workloads' view: {e}"),
        ));
    }
    lines
}

/// The NFS server serves the shares with the handle key (derived from
/// the volume key, one way).
/// The key is borrowed for the derivation only, not across the servers'
/// commands (up to [`super::helper::COMMAND_TIMEOUT`] each); `None` when
/// it was wiped (a lock's deadline).
fn nfs_open(nfs: &super::nfs::Shared, hold: &OpenHold) -> Option<coffre_workload::Line> {
    let t = std::time::Instant::now();
    let handle_key = hold.with_key(|key| coffre_nfs::HandleKey::derive(key.expose()))?;
    // HMAC copied the volume key into a block on this stack.
    coffre_luks2::secret::scrub_stack();
    // Lent, not moved: the key is wiped where it lies when it goes (a
    // move leaves its bytes behind in this frame), and what the call left
    // deeper on this stack is scrubbed.
    let r = nfs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .open(&handle_key);
    drop(handle_key);
    coffre_luks2::secret::scrub_stack();
    let (result, detail) = match r {
        Ok(failed) if failed.is_empty() => (
            "ok",
            format!(
                "NFS shares served again in {:.2} ms",
                t.elapsed().as_secs_f64() * 1000.0
            ),
        ),
        Ok(failed) => (
            "failed",
            format!("NFS shares not served: {}", failed.join("; ")),
        ),
        Err(e) => ("failed", format!("NFS: {e}")),
    };
    Some(("nfs".into(), result.into(), detail))
}

/// [`coffre_data::sever`] from a thread of its own, waited for a moment
/// only: it never waits on the storage, but its unmounts take the mount
/// table's lock, which something else could hold. Lines for the audit log.
///
/// The workloads' view is cut on the same thread afterwards (not waited
/// for: its requests in flight end once the data is cut off): a close
/// that hung before it reached the cut would leave the view passing
/// workloads through to the detached filesystem.
fn sever(
    layout: &coffre_data::Layout,
    cut: Option<Arc<coffre_data::cut::CutLayer>>,
    severing: &Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    let layout = layout.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    severing.fetch_add(1, Ordering::SeqCst);
    let running = severing.clone();
    let spawned = std::thread::Builder::new()
        .name("sever".into())
        .spawn(move || {
            let _ = tx.send(coffre_data::sever(&layout));
            if let Some(cut) = cut {
                let _ = cut.cut();
            }
            running.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        severing.fetch_sub(1, Ordering::SeqCst);
        return vec!["could not start a thread to cut the data off from its paths".into()];
    }
    rx.recv_timeout(Duration::from_secs(2)).unwrap_or_else(|_| {
        vec!["cutting the data off from its paths did not finish within 2 s".into()]
    })
}

/// The NFS server lets go of the data and the key (calls in flight
/// finish first; calls then wait, JUKEBOX, until the next open).
fn nfs_close(nfs: &super::nfs::Shared) -> coffre_workload::Line {
    let t = std::time::Instant::now();
    let r = nfs.lock().unwrap_or_else(|p| p.into_inner()).close();
    let (result, detail) = match r {
        Ok(()) => (
            "ok",
            format!(
                "NFS server let go of the data and its key in {:.2} ms",
                t.elapsed().as_secs_f64() * 1000.0
            ),
        ),
        Err(e) => ("failed", format!("NFS at close: {e}")),
    };
    ("nfs".into(), result.into(), detail)
}

/// What an open sends back: its result, its audit lines, and the key and
/// engine to hold while open.
type Opened = (
    Result<String, String>,
    Vec<coffre_workload::Line>,
    Option<(VolumeKey, Arc<coffre_storage::CipherSlot>)>,
);

/// The open, off the actor: the volume (its key checked, its engine),
/// the mount, then the VMs' shares and the workloads, unless a lock came
/// meanwhile.
#[allow(clippy::too_many_arguments)]
fn open_data(
    hold: &OpenHold,
    opener: &coffre_storage::VolumeOpener,
    remote: Option<&(crate::vaultdir::StorageConfig, VaultDir, String)>,
    tx: &mpsc::UnboundedSender<Msg>,
    slot: &std::sync::Mutex<Option<coffre_data::Exposure>>,
    taken: &std::sync::atomic::AtomicU64,
    layout: &coffre_data::Layout,
    own: &coffre_data::Ownership,
    is_locked: &dyn Fn() -> bool,
    nfs: Option<&super::nfs::Shared>,
    workloads: &std::sync::Mutex<coffre_workload::Workloads>,
    cut: Option<&coffre_data::cut::CutLayer>,
    severing: &std::sync::atomic::AtomicUsize,
) -> Opened {
    // Held for the whole open: a shutdown or a close waits for it
    // instead of missing it.
    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
    // A cut-off of an earlier stack still running works by path and cuts
    // the view: it ends before this open mounts anything there (it never
    // waits on the storage; its view's cut waits for requests the cut-off
    // made fail).
    while severing.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Given up while it waited for the stack (behind a close that hung):
    // it touches nothing (what is up now may be a later open's).
    if hold.with_key(|_| ()).is_none() {
        return (
            Err("the vault was locked while it opened: its key is gone".into()),
            Vec::new(),
            None,
        );
    }
    taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut lines = Vec::new();
    if let Some(mut left) = g.take() {
        // A stack an abandoned close did not take down: it goes first (a
        // new stack over its mounts would be unmounted with it).
        let policy = coffre_data::ClosePolicy {
            grace: Duration::from_secs(5),
            force: true,
        };
        if let Err((e, _)) = left.close(&policy) {
            lines.push((
                "close".into(),
                "note".into(),
                format!("the data stack an earlier close left: {e}"),
            ));
        }
    }
    let gone = || "the vault was locked while it opened: its key is gone".to_string();
    let t = std::time::Instant::now();
    // The engine first, under the key: the key's check against the digest
    // and the key schedule, computations only. Published at once, so a
    // lock's deadline can revoke it whatever waits on the storage next.
    let engine = hold
        .with_key(|key| {
            opener
                .engine(key, coffre_luks2::cipher::Provider::Auto)
                .map_err(|e| format!("the volume: {e}"))
        })
        .unwrap_or_else(|| Err(gone()));
    // The key's check and the key schedule left copies on this stack,
    // below the frames that may wait on storage for long.
    coffre_luks2::secret::scrub_stack();
    let engine = match engine {
        Ok(e) => e,
        Err(e) => return (Err(e), lines, None),
    };
    let cipher = engine.slot();
    if !hold.publish(cipher.clone()) {
        cipher.revoke();
        return (Err(gone()), lines, None);
    }
    let volume = match remote {
        None => opener
            .open_engine(engine)
            .map_err(|e| format!("the volume: {e}")),
        // A remote store: its integrity key is unsealed under the volume
        // key (a computation), its reads run without it.
        Some((c, vd, uuid)) => hold
            .with_key(|key| {
                crate::remote::store_keys(vd, key, uuid)
                    .map_err(|e| format!("the volume's store: {e}"))
            })
            .unwrap_or_else(|| Err(gone()))
            .and_then(|keys| {
                // The unsealing's HMAC left copies of the volume key on
                // this stack, below the store's reads that may wait long.
                coffre_luks2::secret::scrub_stack();
                crate::remote::open(
                    c,
                    vd,
                    keys,
                    Some(crate::remote::on_change(vd, {
                        // Records from the device's threads reach the
                        // audit log through the actor.
                        let tx = tx.clone();
                        move |action, outcome, detail| {
                            let _ = tx.send(Msg::SystemAudit {
                                action,
                                outcome,
                                detail,
                            });
                        }
                    })),
                )
                .map_err(|e| format!("the volume's store: {e}"))
            })
            .and_then(|(dev, ahead, replayed)| {
                // A lock while the store was read (a slow store can take
                // seconds): nothing opens after it.
                if is_locked() || !hold.holds_key() {
                    return Err("the vault was locked (or the open given up) while its store was read".into());
                }
                if let Some(r) = replayed {
                    lines.push(("storage".into(), "ok".into(), r));
                }
                if ahead > 0 {
                    lines.push((
                        "storage".into(),
                        "ok".into(),
                        format!(
                            "the store was {ahead} epoch(s) ahead of the local root (a crash between a manifest and its root, or another writer with the vault's keys): its root is kept now"
                        ),
                    ));
                }
                opener
                    .open_engine_over(engine, dev)
                    .map_err(|e| format!("the volume: {e}"))
            }),
    };
    coffre_luks2::secret::scrub_stack();
    let opened = t.elapsed();
    let volume = match volume {
        Err(e) => {
            cipher.revoke();
            return (Err(e), lines, None);
        }
        Ok(v) => v,
    };
    let e = match coffre_data::expose(volume, layout, own) {
        Ok(e) => e,
        Err(e) => {
            // Nothing keeps the engine: its key schedule goes with the key.
            cipher.revoke();
            return (Err(e.to_string()), lines, None);
        }
    };
    let mounted = t.elapsed();
    let phases = e.phases();
    // A share that could not be mounted for the NFS server: its export
    // is not served.
    for (share, why) in e.share_failures() {
        lines.push((
            "nfs".into(),
            "failed".into(),
            format!(
                "share {} not mounted for the NFS server: {}",
                share.display(),
                coffre_sys::shown::told(why, 300)
            ),
        ));
    }
    *g = Some(e);
    // A lock while the data was mounted: nothing more starts (no NFS
    // server, no workload resumed); the open is reported, and the core
    // closes it at once as for a lock while open (forced, with its
    // deadline and the cipher's revocation). Asked again before each
    // step: the shares' and the workloads' starts take seconds.
    let stopped = || {
        (
            "open".to_string(),
            "note".to_string(),
            "the vault was locked while it opened: no NFS server, no workload resumed; it closes now"
                .to_string(),
        )
    };
    if is_locked() || !hold.holds_key() {
        lines.push(stopped());
    } else {
        // Key, data, the VMs' shares, then workloads.
        if let Some(nfs) = nfs
            && let Some(line) = nfs_open(nfs, hold)
        {
            lines.push(line);
        }
        // Locked, or given up (nobody inside) while the shares were told.
        if is_locked() || !hold.holds_key() {
            lines.push(stopped());
        } else {
            lines.extend(resume_workloads(workloads, cut, layout));
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let detail = format!(
        "data mounted at {} in {:.0} ms (volume {:.1} ms, {phases}); open in {:.0} ms with the shares and workloads",
        layout.mountpoint.display(),
        ms(mounted),
        ms(opened),
        ms(t.elapsed()),
    );
    match hold.take_key() {
        Some(key) => (Ok(detail), lines, Some((key, cipher))),
        None => {
            // Given up at a lock's deadline: the engine was revoked.
            cipher.revoke();
            (Err(gone()), lines, None)
        }
    }
}

impl Shell {
    /// Opens the vault with the key kept for `req`.
    pub(super) fn open_kept(&mut self, req: ReqId, queue: &mut VecDeque<Event>) {
        let Some(k) = self.custody.kept.remove(&req) else {
            queue.push_back(Event::Opened {
                ok: false,
                detail: "no key was kept for this open".into(),
            });
            return;
        };
        let opener = {
            let c = self.container.read().unwrap_or_else(|p| p.into_inner());
            match &self.config.storage {
                // The data on a remote store: opened over its device.
                Some(_) => Ok(c.segment_opener()),
                None => c.volume_opener(),
            }
        };
        match opener {
            Ok(opener) => self.open(opener, k),
            Err(e) => queue.push_back(Event::Opened {
                ok: false,
                detail: format!("the volume: {e}"),
            }),
        }
    }

    /// Opens the data off the actor: the key's check against the digest
    /// (a derivation), the engine, the mount, then the workloads. The key
    /// comes back with the result, to be held while the vault is open.
    pub(super) fn open(&mut self, opener: coffre_storage::VolumeOpener, key: VolumeKey) {
        self.data.last_open_error = None;
        self.data.opens_started += 1;
        let hold = OpenHold::new(self.data.opens_started, key);
        self.data.open_hold = Some(hold.clone());
        self.data.open_locked_at = None;
        let taken = self.data.opens_taken.clone();
        let slot = self.data.exposure.clone();
        let layout = self.data.layout.clone();
        let own = self.ownership();
        let tx = self.tx.clone();
        let opening = self.data.opening.clone();
        let severing = self.data.severing.clone();
        let workloads = self.workloads.set.clone();
        let cut = self.data.cut.clone();
        let nfs = self.nfs();
        let remote = self.config.storage.clone().map(|c| {
            let uuid = self
                .container
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .header()
                .binary
                .uuid
                .clone();
            (c, self.dir.clone(), uuid)
        });
        let locked = self.locked_flag.clone();
        let is_locked = move || locked.load(std::sync::atomic::Ordering::SeqCst);
        opening.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            // A panic anywhere in the open is reported as a failed open
            // (the core would wait in OPENING for ever, and a lock could
            // not close it): the actor then wipes the key and revokes the
            // engine through the hold.
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                open_data(
                    &hold,
                    &opener,
                    remote.as_ref(),
                    &tx,
                    &slot,
                    &taken,
                    &layout,
                    &own,
                    &is_locked,
                    nfs.as_ref(),
                    &workloads,
                    cut.as_deref(),
                    &severing,
                )
            }));
            let (result, lines, held) = opened.unwrap_or_else(|_| {
                (
                    Err(
                        "the open failed: an internal error (a panic); see the daemon's log"
                            .to_string(),
                    ),
                    Vec::new(),
                    None,
                )
            });
            // A panic poisoned the stack's lock: what it guards is
            // checked by whoever takes it next (the close).
            slot.clear_poison();
            opening.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = tx.send(Msg::Exposed {
                open: hold.n,
                result,
                lines,
                held: held.map(Box::new),
            });
        });
    }

    /// Whether the volume key is in this process: held while open, or by
    /// an open under way.
    pub(super) fn key_held(&self) -> bool {
        self.custody.open_key.is_some()
            || self
                .data
                .open_hold
                .as_ref()
                .is_some_and(OpenHold::holds_key)
    }

    /// A lock landed while an open runs: past `[data] close_deadline_s`
    /// (checked every tick), the open's key is wiped and its engine's
    /// cipher revoked, as at a close's deadline, and the core learns the
    /// open failed (it closes, forced; nothing is up to close but what the
    /// hung open may still mount, which the close takes down when it can).
    ///
    /// An open that runs with nobody inside (everyone left while it waits
    /// on the storage) is given up the same way once that has lasted as
    /// long as a hung close is forced after (`[policy]
    /// close_force_after_ms`) plus the deadline: the key does not stay
    /// with nobody inside.
    pub(super) fn open_deadline_tick(&mut self) {
        let Some(hold) = &self.data.open_hold else {
            self.data.open_unattended_since = None;
            return;
        };
        let deadline = Duration::from_secs(self.config.data.close_deadline_s);
        // Those inside while it opens are those whose `enter` waits for
        // it (their sessions cannot expire meanwhile: they learn them only
        // at the end): once the client of every live session went away
        // (the door's; a VPN client's wait is the gateway's), and no task
        // keeps the vault open, nobody is inside. An open that still moves
        // data (large VMs resumed) is slow, not hung: its time restarts.
        let parked = &self.data.parked;
        let all_gone = !self.vault.has_tasks()
            && self.vault.sessions().all(|s| {
                parked
                    .iter()
                    .any(|(tx, v)| v["session"] == s.id.0 && tx.is_closed())
            });
        let io = hold.completed();
        let moved = io != self.data.open_io_seen;
        self.data.open_io_seen = io;
        if (self.vault.has_presence() && !all_gone) || moved {
            self.data.open_unattended_since = None;
        } else {
            self.data
                .open_unattended_since
                .get_or_insert_with(std::time::Instant::now);
        }
        let locked_out = self
            .data
            .open_locked_at
            .is_some_and(|at| at.elapsed() >= deadline);
        let unattended = self.data.open_unattended_since.is_some_and(|at| {
            at.elapsed()
                >= deadline
                    + Duration::from_millis(self.vault.persistent().policy.close_force_after_ms)
        });
        if !locked_out && !unattended {
            return;
        }
        // The open is using the key this instant: at the next tick.
        let Some(revoked) = hold.give_up() else {
            return;
        };
        let n = hold.n;
        self.data.open_hold = None;
        self.data.open_locked_at = None;
        self.data.open_unattended_since = None;
        self.data.opens_abandoned.insert(n);
        // What it mounted so far is cut off from its paths, and the I/O
        // it waits on through the engine fails.
        for line in sever(
            &self.data.layout,
            self.data.cut.clone(),
            &self.data.severing,
        ) {
            self.system_audit("open", "note", line);
        }
        self.system_audit(
            "open",
            "deadline",
            format!(
                "{}, and the open did not finish (storage not answering?): the key wiped{}; \
                 left behind: what it mounts, taken down once the storage answers (or at the next daemon start)",
                if locked_out {
                    format!("locked while it opened, {} s ago", deadline.as_secs())
                } else {
                    "nobody inside while it opened".to_string()
                },
                if revoked {
                    ", the engine's cipher revoked"
                } else {
                    ""
                }
            ),
        );
        let why = if locked_out {
            "locked while it opened"
        } else {
            "nobody inside while it opened"
        };
        self.data.last_open_error = Some(why.into());
        self.run(Event::Opened {
            ok: false,
            detail: format!("{why}; given up"),
        });
    }

    /// While a close runs, whether its engine moved data since the last
    /// tick: the core forces only a close that neither answers nor moves
    /// data (hung), never a slow one.
    pub(super) fn close_progress_tick(&mut self) {
        if self.vault.phase() != Phase::Closing {
            self.data.close_written_seen = None;
            return;
        }
        let Some(written) = self.custody.cipher_slot.as_ref().map(|s| s.written()) else {
            return;
        };
        let moved = self
            .data
            .close_written_seen
            .is_some_and(|seen| seen != written);
        self.data.close_written_seen = Some(written);
        if moved {
            self.run(Event::CloseProgress);
        }
    }

    /// Closes the data stack off the actor: workloads, then data, then key (a forced close has a deadline).
    pub(super) fn close(&mut self, force: bool, mode: Mode, queue: &mut VecDeque<Event>) {
        let nothing_up = self
            .data
            .exposure
            .try_lock()
            .is_ok_and(|g| g.as_ref().is_none_or(coffre_data::Exposure::is_closed));
        if nothing_up && self.data.closes_in_flight == 0 {
            self.wipe_key();
            queue.push_back(Event::Closed {
                ok: true,
                detail: String::new(),
            });
            return;
        }
        self.data.closes_in_flight += 1;
        self.data.closes_started += 1;
        let close = self.data.closes_started;
        self.data.closes_running.insert(close);
        let slot = self.data.exposure.clone();
        let policy = coffre_data::ClosePolicy {
            grace: Duration::from_secs(self.config.data.close_grace_s),
            force,
        };
        let tx = self.tx.clone();
        if force {
            // A lock finishes in bounded time, even on storage
            // that stopped answering. An open given up at its deadline
            // holds the stack while it hangs: its key and engine are gone
            // already, so nothing is waited for.
            let tx = tx.clone();
            let deadline = if self.data.opens_abandoned.is_empty() {
                Duration::from_secs(self.config.data.close_deadline_s)
            } else {
                Duration::ZERO
            };
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                let _ = tx.send(Msg::CloseDeadline(close));
            });
        }
        let workloads = self.workloads.set.clone();
        let cut = self.data.cut.clone();
        let nfs = self.nfs();
        let taken = self.data.opens_taken.clone();
        let opens_before = taken.load(std::sync::atomic::Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
                if taken.load(std::sync::atomic::Ordering::SeqCst) != opens_before {
                    // An open took the stack since this close started: it
                    // was given up at its deadline, and what is up now is
                    // that open's (its workloads, its mount).
                    return (
                        Ok(coffre_data::CloseReport::default()),
                        vec![(
                            "close".to_string(),
                            "note".to_string(),
                            "a close given up at its deadline ended without effect: the vault opened again since".to_string(),
                        )],
                    );
                }
                // Workloads, the VMs' shares, then data, then key.
                let mut lines = pause_workloads(&workloads, cut.as_deref(), mode);
                if let Some(nfs) = &nfs {
                    lines.push(nfs_close(nfs));
                }
                let result = match g.as_mut() {
                    Some(e) => e.close(&policy).map_err(|(e, r)| (e.to_string(), r)),
                    None => Ok(coffre_data::CloseReport::default()),
                };
                // A forced close never leaves a stack behind for a later
                // open to trip over (dropping it finishes the job).
                if result.is_ok() || policy.force {
                    *g = None;
                }
                (result, lines)
            }));
            slot.clear_poison();
            // A panic is a failed close (the core retries it, then forces
            // it), never one that never ends.
            let (result, lines) = closed.unwrap_or_else(|_| {
                (
                    Err((
                        "an internal error (a panic); see the daemon's log".to_string(),
                        coffre_data::CloseReport::default(),
                    )),
                    Vec::new(),
                )
            });
            let _ = tx.send(Msg::Unexposed {
                close,
                result,
                lines,
            });
        });
    }

    pub(super) fn exposed(
        &mut self,
        open: u64,
        r: Result<String, String>,
        lines: Vec<coffre_workload::Line>,
        held: Option<(VolumeKey, Arc<coffre_storage::CipherSlot>)>,
    ) {
        if self.data.opens_abandoned.remove(&open) {
            // Given up at a lock's deadline, and reported then: what it
            // kept goes (the hold wiped its key; the close the core asked
            // for takes down what it mounted).
            if let Some((key, cipher)) = held {
                drop(key);
                cipher.revoke();
            }
            self.workload_audit(lines);
            self.system_audit(
                "open",
                "late",
                format!(
                    "an open given up at a lock's deadline ended: {}",
                    match &r {
                        Ok(_) => "it had mounted the data".to_string(),
                        Err(e) => e.clone(),
                    }
                ),
            );
            return;
        }
        // Its key is in custody now (or gone): the hold goes.
        let hold = self.data.open_hold.take_if(|h| h.n == open);
        self.data.open_locked_at = None;
        if held.is_none()
            && let Some(h) = hold
        {
            // A panicked open: the key and the engine it published.
            let _ = h.give_up();
        }
        if let Some((key, cipher)) = held {
            self.custody.open_key = Some(key);
            self.custody.cipher_slot = Some(cipher);
        }
        self.workload_audit(lines);
        match r {
            Ok(detail) => self.run(Event::Opened { ok: true, detail }),
            Err(detail) => {
                self.wipe_key();
                self.data.last_open_error = Some(detail.clone());
                self.run(Event::Opened { ok: false, detail });
            }
        }
    }

    /// A forced close still running at its deadline: the engine's cipher
    /// is revoked (no thread holds it across I/O, so this does not wait
    /// for the hung I/O), the key is wiped, and the core learns the vault
    /// is closed. The hung close is left behind, and its late report
    /// ignored.
    pub(super) fn close_deadline(&mut self, close: u64) {
        if self.data.closes_started != close || self.data.closes_in_flight == 0 {
            return;
        }
        let revoked = self.wipe_key();
        self.custody.wipe_waiting();
        // What hangs is cut off from its paths: the plaintext in the
        // filesystem's page cache is no longer reachable at the mount
        // while the storage hangs, and the close goes on, as does
        // whatever waited on the data (an NFS server too).
        for line in sever(
            &self.data.layout,
            self.data.cut.clone(),
            &self.data.severing,
        ) {
            self.system_audit("close", "note", line);
        }
        // The NFS server lets go of the data and its key, or is killed,
        // unless the hung close holds it. Off the actor: one stuck on the
        // storage dies only once its I/O ends, and the actor never waits
        // for that.
        // The thread takes the servers (or finds them held) before the
        // core hears of the close: a later open waits for it.
        if let Some(nfs) = self.nfs() {
            let (took, taken) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("nfs-close".into())
                .spawn(move || {
                    let g = nfs.try_lock();
                    let _ = took.send(());
                    if let Ok(mut g) = g {
                        let _ = g.close();
                    }
                });
            match spawned {
                Ok(_) => {
                    // A try_lock: never long. Waited for whatever it takes,
                    // or a late one could close a later open's server.
                    let _ = taken.recv();
                }
                Err(e) => {
                    self.system_audit("close", "note", format!("the NFS server not closed: {e}"));
                }
            }
        }
        // Every close still running is left behind (an earlier one may
        // be the one that hangs, holding the data stack).
        self.data
            .closes_abandoned
            .extend(self.data.closes_running.drain());
        self.data.closes_in_flight = 0;
        self.system_audit(
            "close",
            "deadline",
            format!(
                "the close did not finish within {} s (storage not answering?): {}the key wiped; \
                 left behind: the data stack and its hung I/O (the next daemon start cleans it; \
                 restart once the storage answers)",
                self.config.data.close_deadline_s,
                if revoked {
                    "the engine's cipher revoked, "
                } else {
                    ""
                }
            ),
        );
        self.run(Event::Closed {
            ok: true,
            detail: "past the close deadline".into(),
        });
    }

    /// What a close did to the workloads and to the processes that held
    /// the data, for the audit log.
    fn close_report_audit(
        &mut self,
        result: &Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    ) {
        self.workload_audit(lines);
        let (Ok(report) | Err((_, report))) = result;
        for h in &report.killed {
            self.system_audit(
                "close",
                "killed",
                format!(
                    "{h}: it kept the data busy (SIGTERM, then SIGKILL after {} s)",
                    self.config.data.close_grace_s
                ),
            );
        }
        for n in &report.notes {
            self.system_audit("close", "note", n.clone());
        }
    }

    /// A close given up at its deadline ended (its storage answered, or
    /// the data was cut off from it): what it did is said all the same
    /// (the processes it stopped above all); the core heard of the close
    /// at the deadline.
    pub(super) fn late_close(
        &mut self,
        result: Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    ) {
        self.close_report_audit(&result, lines);
        self.system_audit(
            "close",
            "late",
            match &result {
                Ok(_) => "a close given up at its deadline ended".into(),
                Err((e, _)) => format!("a close given up at its deadline ended: {e}"),
            },
        );
    }

    pub(super) fn unexposed(
        &mut self,
        result: Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    ) {
        self.data.closes_in_flight = self.data.closes_in_flight.saturating_sub(1);
        self.close_report_audit(&result, lines);
        if self.data.closes_in_flight > 0 {
            // A forced close queued behind this one decides.
            return;
        }
        match result {
            Ok(r) => {
                self.wipe_key();
                self.system_audit(
                    "data",
                    "unmounted",
                    format!(
                        "{} unmounted in {} ms; {} NBD client(s) dropped",
                        self.data.layout.mountpoint.display(),
                        r.elapsed.as_millis(),
                        r.nbd_clients
                    ),
                );
                self.run(Event::Closed {
                    ok: true,
                    detail: String::new(),
                });
            }
            Err((e, _)) => {
                // A forced close takes the stack down even when a step
                // failed: nothing holds the volume for a retry, so the
                // engine's key schedule goes too.
                if self
                    .data
                    .exposure
                    .try_lock()
                    .is_ok_and(|g| g.as_ref().is_none_or(coffre_data::Exposure::is_closed))
                    && let Some(s) = self.custody.cipher_slot.take()
                {
                    s.revoke();
                }
                self.run(Event::Closed {
                    ok: false,
                    detail: e,
                });
                // A forced close that failed (a step, or a panic) ends the
                // core's close all the same: the key goes with it (it
                // stayed, with the vault said closed or locked).
                if self.vault.phase() != Phase::Closing {
                    self.wipe_key();
                }
            }
        }
    }

    /// Runs `f` on a thread of its own and waits for it while the storage
    /// moves data (see [`Quiet`]); given up, the wait's receiver comes
    /// back (a late result can still be had from it).
    fn off_actor<T: Send + 'static>(
        name: &str,
        mut quiet: Quiet,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, (StopWait, Option<std::sync::mpsc::Receiver<T>>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = tx.send(f());
            })
            .map_err(|e| (StopWait::NoThread(e.to_string()), None))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(v) => return Ok(v),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err((StopWait::Panicked, None));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(why) = quiet.over() {
                // Done just now: not given up.
                return match rx.try_recv() {
                    Ok(v) => Ok(v),
                    Err(_) => Err((why, Some(rx))),
                };
            }
        }
    }

    /// A step of the stop waited on the storage past the deadline (or
    /// could not run): the key goes and the data is cut off from its
    /// paths, once, and what hung is left behind.
    fn give_up_at_stop(&mut self, what: &str, why: &StopWait, gave_up: &mut bool) {
        if *gave_up {
            return;
        }
        *gave_up = true;
        let revoked = self.wipe_key();
        self.system_audit(
            "close",
            "deadline",
            format!(
                "at the stop: {what} ({why}): the key wiped{}; left behind: what hung on the storage (the next start cleans it)",
                if revoked {
                    ", the engine's cipher revoked"
                } else {
                    ""
                }
            ),
        );
        for line in sever(
            &self.data.layout,
            self.data.cut.clone(),
            &self.data.severing,
        ) {
            self.system_audit("close", "note", format!("at the stop: {line}"));
        }
    }

    pub(super) fn shutdown(&mut self) {
        let was = self.vault.status().state;
        // However the storage moves, the stop ends by then (see below).
        let stop_by = std::time::Instant::now()
            .checked_add(Duration::from_secs(self.config.data.stop_deadline_s))
            .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(540));
        // An open still on its way would mount after we looked: wait for it.
        let until = (std::time::Instant::now() + Duration::from_secs(120)).min(stop_by);
        while self.data.opening.load(std::sync::atomic::Ordering::SeqCst) > 0
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // One that still waits on the storage: its key and engine go now
        // (it may be using the key this instant: a moment later).
        if let Some(h) = self.data.open_hold.take() {
            for _ in 0..100 {
                if h.give_up().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Keys waiting for an effect, passwords: nothing uses them now.
        self.custody.wipe_waiting();
        self.custody.passwords.clear();
        self.custody.new_passwords.clear();
        let how = match self.vault.mode() {
            Mode::Fast => coffre_workload::Pause::Fast,
            Mode::Safe => coffre_workload::Pause::Safe,
        };
        // Each step that may wait on the storage (the workloads' stop, the
        // view's cut, a close hung on the storage holding the stack, the
        // stack's own close) runs off the actor and is waited for, each
        // afresh, while the engine completes storage writes, until it has
        // completed none for `close_deadline_s` (the workloads' stop has
        // their own stop timeouts on top), or until the stop's own
        // deadline, `stop_deadline_s` (a provider that completes a write
        // now and then keeps every wait going): then the key is wiped, the
        // data cut off (what waited on the storage fails), and the daemon
        // still stops, what hung left behind for the next start to clean.
        // Past that deadline, each later step still has 2 s (cut off, what
        // waited on the storage ends at once).
        let slot = self.custody.cipher_slot.clone();
        let deadline = Duration::from_secs(self.config.data.close_deadline_s);
        let quiet = |limit| {
            let until = stop_by.max(std::time::Instant::now() + Duration::from_secs(2));
            Quiet::new(slot.clone(), limit, until)
        };
        // Whether a step was given up (the key wiped and the data cut off
        // then, once), and whether anything was left behind.
        let mut gave_up = false;
        let mut left_behind = false;
        let set = self.workloads.set.clone();
        // Each workload paused or stopped (by this stop, or by a close
        // that holds them) counts as progress too, and one may take its
        // own stop time on top of the deadline (storage untouched).
        let within = coffre_workload::stop_within(&self.config.workload);
        let mut waiting = quiet(deadline + within);
        waiting.also = Some(self.workloads.handled.clone());
        let lines = match Self::off_actor("stop-workloads", waiting, move || {
            set.lock().unwrap_or_else(|p| p.into_inner()).shutdown(how)
        }) {
            Ok(lines) => lines,
            Err((StopWait::Panicked, _)) => {
                // Some may still run: the next start cleans up.
                left_behind = true;
                vec![(
                    "workload".to_string(),
                    "failed".to_string(),
                    "at the stop: an internal error (a panic) while the workloads stopped; see the daemon's log".to_string(),
                )]
            }
            Err((why, _)) => {
                self.give_up_at_stop("the workloads did not stop", &why, &mut gave_up);
                vec![(
                    "workload".to_string(),
                    "failed".to_string(),
                    format!("at the stop: the workloads did not stop ({why}); left as they are"),
                )]
            }
        };
        self.workload_audit(lines);
        if let Some(cut) = self.data.cut.clone() {
            match Self::off_actor("stop-cut", quiet(deadline), move || cut.cut()) {
                Ok((_, Ok(()))) => {}
                Ok((_, Err(e))) => eprintln!("coffre: the workloads' view: {e}"),
                Err((StopWait::Panicked, _)) => {
                    eprintln!("coffre: the workloads' view: a panic at the stop's cut");
                }
                Err((why, _)) => self.give_up_at_stop(
                    "the workloads' view did not let go of the data",
                    &why,
                    &mut gave_up,
                ),
            }
        }
        // The stack, unless an open or a close hung on the storage holds
        // it: then it is left (its key and engine are revoked, as at a
        // close's deadline), and the daemon still stops.
        let stack = self.data.exposure.clone();
        let mut waiting = quiet(deadline);
        let exposure = loop {
            match stack.try_lock() {
                Ok(mut g) => break g.take(),
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().take(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if let Some(why) = waiting.over() {
                self.give_up_at_stop(
                    "the data stack is held by an open or a close hung on the storage",
                    &why,
                    &mut gave_up,
                );
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(e) = exposure {
            // The VMs' NFS server lets go of the data before the unmount
            // (or it would be killed as a holder), on the close's thread.
            let nfs = self.nfs();
            let policy = coffre_data::ClosePolicy {
                grace: Duration::from_secs(self.config.data.close_grace_s),
                force: true,
            };
            // If no thread can start, the stack is left as it is (never
            // closed on the actor, where it could hang).
            let e = std::mem::ManuallyDrop::new(e);
            let closing = Self::off_actor("stop-close", quiet(deadline), move || {
                let mut e = std::mem::ManuallyDrop::into_inner(e);
                let line = nfs.as_ref().map(nfs_close);
                let r = e.close(&policy);
                // The stack goes here, not on the actor: if the close
                // hung, dropping it could too.
                drop(e);
                (line, r.map_err(|(e, r)| (e.to_string(), r)))
            });
            let closed = match closing {
                Ok((line, r)) => {
                    self.workload_audit(line.into_iter().collect());
                    r
                }
                Err((StopWait::Panicked, _)) => {
                    left_behind = true;
                    Err((
                        "an internal error (a panic); see the daemon's log".to_string(),
                        coffre_data::CloseReport::default(),
                    ))
                }
                Err((why, late)) => {
                    self.give_up_at_stop("the close did not finish", &why, &mut gave_up);
                    // Cut off, the close may end now: its report (the
                    // processes it stopped) if so.
                    match late.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok()) {
                        Some((line, r)) => {
                            self.workload_audit(line.into_iter().collect());
                            r
                        }
                        None => Ok(coffre_data::CloseReport::default()),
                    }
                }
            };
            if let Err((why, _)) = &closed {
                // Said, not hidden: what did not close cleanly at a stop
                // (a flush to the store that failed, say).
                self.system_audit("close", "failed", format!("at the stop: {why}"));
            }
            match closed {
                Ok(r) | Err((_, r)) => {
                    for n in &r.notes {
                        self.system_audit("close", "note", format!("at the stop: {n}"));
                    }
                    for h in &r.killed {
                        let line = format!("{h}: it kept the data busy at shutdown");
                        let rec = AuditRecord {
                            at: now_ms(),
                            actor: "coffre".into(),
                            source: None,
                            action: "close".into(),
                            result: "killed".into(),
                            detail: line,
                        };
                        self.record(rec);
                    }
                }
            }
        }
        self.wipe_key();
        self.custody.kept.clear();
        self.custody.passwords.clear();
        self.custody.new_passwords.clear();
        self.data.cut = None;
        if left_behind || gave_up {
            // Kept: the next start sees an unclean stop and cleans up.
            self.system_audit(
                "stop",
                "closed",
                format!(
                    "daemon stopped (was {was}); key wiped; what hung on the storage was left behind"
                ),
            );
        } else {
            self.system_audit(
                "stop",
                "closed",
                format!("daemon stopped cleanly (was {was}); key wiped"),
            );
            let _ = std::fs::remove_file(self.dir.running_marker());
        }
    }
}

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
    /// Set while an open runs off the actor (a shutdown waits for it).
    pub(super) opening: Arc<std::sync::atomic::AtomicBool>,
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
            parked: Vec::new(),
            last_open_error: None,
            cut: None,
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
    let lines = workloads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pause(how);
    if let Some(cut) = cut {
        cut.cut();
    }
    lines
}

/// The NFS server serves the shares with the handle key (derived from
/// the volume key, one way).
fn nfs_open(nfs: &super::nfs::Shared, key: &VolumeKey) -> coffre_workload::Line {
    let t = std::time::Instant::now();
    let handle_key = coffre_nfs::HandleKey::derive(key.expose());
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
    ("nfs".into(), result.into(), detail)
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
        let slot = self.data.exposure.clone();
        let layout = self.data.layout.clone();
        let own = self.ownership();
        let tx = self.tx.clone();
        let opening = self.data.opening.clone();
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
        opening.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            // Held for the whole open: a shutdown or a close waits for it
            // instead of missing it.
            let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
            let t = std::time::Instant::now();
            let mut lines = Vec::new();
            let mut held = None;
            let volume = match &remote {
                None => opener.open(&key).map_err(|e| format!("the volume: {e}")),
                Some((c, vd, uuid)) => crate::remote::open(
                    c,
                    vd,
                    &key,
                    uuid,
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
                    .and_then(|(dev, ahead, replayed)| {
                        // A lock while the store was read (a slow store can
                        // take seconds): nothing opens after it.
                        if locked.load(std::sync::atomic::Ordering::SeqCst) {
                            return Err("the vault was locked while its store was read".into());
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
                            .open_over(&key, dev, coffre_luks2::cipher::Provider::Auto)
                            .map_err(|e| format!("the volume: {e}"))
                    }),
            };
            let opened = t.elapsed();
            let result = match volume {
                Err(e) => Err(e),
                Ok(volume) => {
                    let cipher = volume.cipher_slot();
                    match coffre_data::expose(volume, &layout, &own) {
                        Ok(e) => {
                            let mounted = t.elapsed();
                            let phases = e.phases();
                            // A share that could not be mounted for the
                            // NFS server: its export is not served.
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
                            // A lock while the data was mounted: nothing
                            // more starts (no NFS server, no workload
                            // resumed); the open is reported, and the core
                            // closes it at once as for a lock while open
                            // (forced, with its deadline and the cipher's
                            // revocation).
                            if locked.load(std::sync::atomic::Ordering::SeqCst) {
                                lines.push((
                                    "open".into(),
                                    "note".into(),
                                    "the vault was locked while it opened: no NFS server, no workload resumed; it closes now".into(),
                                ));
                            } else {
                                // Key, data, the VMs' shares, then workloads.
                                if let Some(nfs) = &nfs {
                                    lines.push(nfs_open(nfs, &key));
                                }
                                lines.extend(resume_workloads(&workloads, cut.as_deref(), &layout));
                            }
                            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                            let detail = format!(
                                "data mounted at {} in {:.0} ms (volume {:.1} ms, {phases}); open in {:.0} ms with the shares and workloads",
                                layout.mountpoint.display(),
                                ms(mounted),
                                ms(opened),
                                ms(t.elapsed()),
                            );
                            held = Some((key, cipher));
                            Ok(detail)
                        }
                        Err(e) => {
                            // Nothing keeps the engine: its key schedule
                            // goes with the key.
                            cipher.revoke();
                            Err(e.to_string())
                        }
                    }
                }
            };
            drop(g);
            opening.store(false, std::sync::atomic::Ordering::SeqCst);
            let _ = tx.send(Msg::Exposed {
                result,
                lines,
                held: held.map(Box::new),
            });
        });
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
            // that stopped answering.
            let tx = tx.clone();
            let deadline = Duration::from_secs(self.config.data.close_deadline_s);
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                let _ = tx.send(Msg::CloseDeadline(close));
            });
        }
        let workloads = self.workloads.set.clone();
        let cut = self.data.cut.clone();
        let nfs = self.nfs();
        tokio::task::spawn_blocking(move || {
            let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
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
            drop(g);
            let _ = tx.send(Msg::Unexposed {
                close,
                result,
                lines,
            });
        });
    }

    pub(super) fn exposed(
        &mut self,
        r: Result<String, String>,
        lines: Vec<coffre_workload::Line>,
        held: Option<(VolumeKey, Arc<coffre_storage::CipherSlot>)>,
    ) {
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
        // The NFS server too: killed if the hung close holds it (its
        // descriptors on the data and its key go with it).
        if let Some(nfs) = self.nfs()
            && let Ok(mut g) = nfs.try_lock()
        {
            let _ = g.close();
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

    pub(super) fn unexposed(
        &mut self,
        result: Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    ) {
        self.workload_audit(lines);
        self.data.closes_in_flight = self.data.closes_in_flight.saturating_sub(1);
        let report = match &result {
            Ok(r) | Err((_, r)) => r.clone(),
        };
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
                })
            }
        }
    }

    pub(super) fn shutdown(&mut self) {
        let was = self.vault.status().state;
        // An open still on its way would mount after we looked: wait for it.
        let until = std::time::Instant::now() + Duration::from_secs(120);
        while self.data.opening.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let how = match self.vault.mode() {
            Mode::Fast => coffre_workload::Pause::Fast,
            Mode::Safe => coffre_workload::Pause::Safe,
        };
        let lines = self
            .workloads
            .set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(how);
        self.workload_audit(lines);
        if let Some(cut) = &self.data.cut {
            cut.cut();
        }
        let exposure = self
            .data
            .exposure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The VMs' NFS server lets go of the data before the unmount (or
        // it would be killed as a holder).
        if let (Some(nfs), Some(_)) = (self.nfs(), &exposure) {
            let line = nfs_close(&nfs);
            self.workload_audit(vec![line]);
        }
        if let Some(mut e) = exposure {
            let policy = coffre_data::ClosePolicy {
                grace: Duration::from_secs(self.config.data.close_grace_s),
                force: true,
            };
            let closed = e.close(&policy);
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
        self.system_audit(
            "stop",
            "closed",
            format!("daemon stopped cleanly (was {was}); key wiped"),
        );
        let _ = std::fs::remove_file(self.dir.running_marker());
    }
}

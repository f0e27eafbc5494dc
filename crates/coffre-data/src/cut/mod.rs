//! The data as project workloads see it: a FUSE layer over the ext4 mount
//! that the daemon can cut and restore.
//!
//! A frozen process keeps its open files and working directory. If those
//! were on the ext4 mount, the mount could not go at close, and the key
//! would have to stay. So workloads see the data through this layer
//! instead (bind-mounted at the data's path in their own mount
//! namespace). The layer names every file by its file handle (ext4: inode
//! number and generation), which survives closing every descriptor and
//! remounting. At [`CutLayer::cut`] it closes everything it holds on the
//! mount; at [`CutLayer::restore`] it reopens the files its clients still
//! have open, by handle, on the new mount. Nothing is cached in the kernel
//! (direct I/O, zero entry and attribute lifetimes), so no plaintext stays
//! in the page cache while the vault is closed.
//!
//! While cut, every request fails with `EIO` (frozen workloads send none),
//! except the daemon's own: the wipe of the workers' request buffers
//! ([`CutLayer::wipe_request_buffers`]) and the root's attributes it needs
//! to reach the wipe files.
//!
//! Here: the public API ([`CutLayer`], [`Restored`]): mount, cut, restore.
//! The layer's state is in `state`, the filesystem requests in
//! `filesystem`.

mod filesystem;
mod state;
#[cfg(test)]
mod tests;

use fuser::{Config, INodeNo, MountOption, SessionACL};
pub use state::Caps;
use state::{Layer, Live, State, WORKERS};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// The largest write request the layer accepts (its `max_write`).
pub(crate) const MAX_WRITE: u32 = 1 << 20;

/// What a restore found.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    /// Files reopened by handle.
    pub reopened: usize,
    /// Open files not reopened; their descriptors fail with `EIO`. For
    /// good when the file no longer exists (deleted, or unlinked while
    /// open before the close); tried again at the next restore when the
    /// reopen failed otherwise (out of descriptors).
    pub lost: usize,
}

/// The layer, mounted.
pub struct CutLayer {
    layer: Arc<State>,
    /// Wipe writes not answered yet.
    stuck_wipes: Arc<std::sync::atomic::AtomicUsize>,
    session: Option<fuser::BackgroundSession>,
    notifier: fuser::Notifier,
    at: PathBuf,
}

impl CutLayer {
    /// Mounts the layer at `at` (created if missing), cut: it passes
    /// nothing through until [`restore`](Self::restore). Its clients may
    /// take what [`Caps::for_this_process`] allows.
    pub fn mount(at: &Path) -> std::io::Result<Self> {
        Self::mount_with(at, Caps::for_this_process())
    }

    /// [`CutLayer::mount`] with the given caps.
    pub fn mount_with(at: &Path, caps: Caps) -> std::io::Result<Self> {
        // A crashed daemon's layer is still mounted there, dead.
        let _ = rustix::mount::unmount(at, rustix::mount::UnmountFlags::DETACH);
        std::fs::create_dir_all(at)?;
        let layer = Arc::new(State {
            live: RwLock::new(None),
            maps: Mutex::default(),
            caps,
            wipe: state::Wipe::default(),
        });
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("coffre-view".into()),
            MountOption::Subtype("coffre".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(WORKERS);
        let at = at.canonicalize()?;
        let session = fuser::Session::new(Layer(layer.clone()), &at, &config)?.spawn()?;
        Ok(Self {
            layer,
            stuck_wipes: Arc::default(),
            notifier: session.notifier(),
            session: Some(session),
            at,
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.at
    }

    /// Passes through to the filesystem mounted at `data` again, and
    /// reopens the files clients kept open.
    pub fn restore(&self, data: &Path) -> std::io::Result<Restored> {
        let root = Arc::new(OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(data)?,
        ));
        let root_ino = rustix::fs::fstat(&*root)
            .map_err(std::io::Error::from)?
            .st_ino;
        let mut live = self.layer.live.write().unwrap_or_else(|p| p.into_inner());
        let mut maps = self.layer.maps.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Restored::default();
        for open in maps.files.values_mut() {
            if open.lost {
                continue;
            }
            match state::open_served(&open.handle, root.as_fd(), open.flags) {
                Ok(fd) => {
                    open.file = Some(Arc::new(File::from(fd)));
                    out.reopened += 1;
                }
                Err(e) => {
                    // Gone for good only when the file is (its handle no
                    // longer resolves); anything else (out of descriptors,
                    // of memory) is tried again at the next restore, and
                    // the file answers EIO meanwhile.
                    if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) {
                        open.lost = true;
                    }
                    out.lost += 1;
                }
            }
        }
        *live = Some(Live { root, root_ino });
        Ok(out)
    }

    /// Closes everything the layer holds on the data (after requests in
    /// flight finish), then overwrites what workloads' requests left in
    /// the FUSE workers' buffers (see [`CutLayer::wipe_request_buffers`]).
    /// Returns how many open files it let go of, and whether the wipe
    /// failed (the cut itself always happens).
    pub fn cut(&self) -> (usize, std::io::Result<()>) {
        let n = self.cut_only();
        (n, self.wipe_request_buffers())
    }

    /// Overwrites the FUSE workers' request buffers with zeroes.
    ///
    /// The FUSE library reads each request into its worker's buffer and
    /// keeps that buffer for the worker's life, which is the layer's (it
    /// stays mounted while the vault is closed): a request overwrites only
    /// as many bytes as it is long, so the data of a worker's largest
    /// recent write would stay there, plaintext, after a close. Here one
    /// write per worker, of the largest size a request can have, from the
    /// daemon's own threads to a file only they can open: the kernel
    /// copies its zeroes over everything earlier requests wrote, and the
    /// workers hold each write until every worker has one (so each takes
    /// exactly one). Bounded: an error after a few seconds if a worker
    /// does not come (busy elsewhere, or the connection is gone).
    pub fn wipe_request_buffers(&self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        // Writes of an earlier wipe still waiting (the workers are gone
        // and the connection with them): more would only pile up.
        if self.stuck_wipes.load(Ordering::SeqCst) > 0 {
            return Err(std::io::Error::other(
                "its request buffers may keep data: an earlier wipe never finished",
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..WORKERS {
            let path = self.at.join(state::wipe_name(i));
            let tx = tx.clone();
            let stuck = self.stuck_wipes.clone();
            stuck.fetch_add(1, Ordering::SeqCst);
            // Detached: a write stuck on a dead connection must not hold
            // the close.
            let spawned = std::thread::Builder::new()
                .name("coffre-view-wipe".into())
                .spawn(move || {
                    // On a page, so that the kernel sends the whole write
                    // as one request of MAX_WRITE bytes.
                    let zeros = vec![0u8; MAX_WRITE as usize + 4096];
                    let at = zeros.as_ptr().align_offset(4096);
                    // Not following a link: were the view not mounted, the
                    // name would be looked up in the directory below.
                    let r = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .and_then(|f| f.write_all_at(&zeros[at..at + MAX_WRITE as usize], 0));
                    stuck.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(r);
                });
            if let Err(e) = spawned {
                self.stuck_wipes.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        }
        drop(tx);
        let until = std::time::Instant::now() + state::WIPE_WAIT * 2;
        for _ in 0..WORKERS {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("its request buffers may keep data: {e}"),
                    ));
                }
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "its request buffers may keep data: a wipe write did not finish",
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`CutLayer::cut`] without the wipe.
    fn cut_only(&self) -> usize {
        // Direct I/O keeps reads and writes out of the page cache, but not
        // executables and private mappings: drop whatever the kernel
        // cached of every file we know (dirty shared pages are written
        // back first, so this runs while we still pass through).
        let inos: Vec<u64> = {
            let maps = self.layer.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.nodes.keys().copied().collect()
        };
        for ino in inos {
            let _ = self.notifier.inval_inode(INodeNo(ino), 0, 0);
        }
        let mut live = self.layer.live.write().unwrap_or_else(|p| p.into_inner());
        let mut maps = self.layer.maps.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for open in maps.files.values_mut() {
            if open.file.take().is_some() {
                n += 1;
            }
        }
        // Listings read before the cut: their names go (a read from the
        // start after a restore reads the directory again).
        let emptied: Vec<(u32, usize)> = maps
            .dirs
            .values_mut()
            .map(|d| {
                (d.list, d.served) = (Vec::new(), true);
                (d.uid, std::mem::replace(&mut d.bytes, state::DIR_BYTES))
            })
            .collect();
        for (uid, had) in emptied {
            let _ = maps.charge_listing(&self.layer.caps, uid, had, state::DIR_BYTES);
        }
        let stale: Vec<u64> = maps.dirs.keys().copied().collect();
        maps.stale_dirs.extend(stale);
        *live = None;
        n
    }
}

impl Drop for CutLayer {
    fn drop(&mut self) {
        self.cut_only();
        if let Some(s) = self.session.take() {
            // Lazily: workloads' namespaces may still have it bound.
            let _ = rustix::mount::unmount(&self.at, rustix::mount::UnmountFlags::DETACH);
            drop(s);
        }
    }
}

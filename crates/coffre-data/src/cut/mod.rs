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
//! While cut, every request fails with `EIO` (frozen workloads send none).
//!
//! Here: the public API ([`CutLayer`], [`Restored`]): mount, cut, restore.
//! The layer's state is in `state`, the filesystem requests in
//! `filesystem`.

mod filesystem;
mod state;
#[cfg(test)]
mod tests;

use fuser::{Config, INodeNo, MountOption, SessionACL};
use state::{Layer, Live, State};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// What a restore found.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    /// Files reopened by handle.
    pub reopened: usize,
    /// Open files that no longer exist (deleted, or unlinked while open
    /// before the close); their descriptors now fail with `EIO`.
    pub lost: usize,
}

/// The layer, mounted.
pub struct CutLayer {
    layer: Arc<State>,
    session: Option<fuser::BackgroundSession>,
    notifier: fuser::Notifier,
    at: PathBuf,
}

impl CutLayer {
    /// Mounts the layer at `at` (created if missing), cut: it passes
    /// nothing through until [`restore`](Self::restore).
    pub fn mount(at: &Path) -> std::io::Result<Self> {
        // A crashed daemon's layer is still mounted there, dead.
        let _ = rustix::mount::unmount(at, rustix::mount::UnmountFlags::DETACH);
        std::fs::create_dir_all(at)?;
        let layer = Arc::new(State {
            live: RwLock::new(None),
            maps: Mutex::default(),
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
        config.n_threads = Some(4);
        let at = at.canonicalize()?;
        let session = fuser::Session::new(Layer(layer.clone()), &at, &config)?.spawn()?;
        Ok(Self {
            layer,
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
            match open.handle.open(root.as_fd(), open.flags) {
                Ok(fd) => {
                    open.file = Some(Arc::new(File::from(fd)));
                    out.reopened += 1;
                }
                Err(_) => {
                    open.lost = true;
                    out.lost += 1;
                }
            }
        }
        *live = Some(Live { root, root_ino });
        Ok(out)
    }

    /// Closes everything the layer holds on the data (after requests in
    /// flight finish). Returns how many open files it let go of.
    pub fn cut(&self) -> usize {
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
        *live = None;
        n
    }
}

impl Drop for CutLayer {
    fn drop(&mut self) {
        self.cut();
        if let Some(s) = self.session.take() {
            // Lazily: workloads' namespaces may still have it bound.
            let _ = rustix::mount::unmount(&self.at, rustix::mount::UnmountFlags::DETACH);
            drop(s);
        }
    }
}

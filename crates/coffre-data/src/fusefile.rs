//! The decrypted volume as one regular file, served through FUSE.
//!
//! The FUSE filesystem is mounted over a regular file (its root inode is
//! that file), so the kernel sees an ordinary file the loop driver can
//! attach to. Every read decrypts and every write encrypts in our
//! userspace engine; nothing is cached on this side.

use coffre_storage::EncryptedVolume;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, SessionACL, WriteFlags,
};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Largest request we accept from the kernel (the kernel's own FUSE limit
/// is 256 pages; it negotiates down).
const MAX_REQUEST: u32 = 1 << 20;

/// Where the workers find the volume. Closing empties it: from then on
/// every request fails and the key is gone, whatever became of the workers.
pub(crate) type Slot = Arc<RwLock<Option<Arc<EncryptedVolume>>>>;

/// The filesystem: one inode, the volume.
pub(crate) struct VolumeFile {
    slot: Slot,
    size: u64,
    sector_size: usize,
    /// Read-modify-write of partial sectors takes it exclusively; aligned
    /// writes (the loop device only sends those) take it shared.
    rmw: RwLock<()>,
    /// Owner of the file (root: only the daemon's loop device uses it).
    started: SystemTime,
}

impl VolumeFile {
    pub(crate) fn new(slot: Slot) -> Self {
        let (size, sector_size) = slot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or((0, 4096), |v| (v.size(), v.sector_size()));
        Self {
            slot,
            size,
            sector_size,
            rmw: RwLock::new(()),
            started: SystemTime::now(),
        }
    }

    /// The volume, unless the close has taken it away.
    fn volume(&self) -> Result<Arc<EncryptedVolume>, Errno> {
        self.slot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Errno::EIO)
    }

    fn attr(&self) -> FileAttr {
        let size = self.size;
        FileAttr {
            ino: INodeNo::ROOT,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: u32::try_from(self.sector_size).unwrap_or(4096),
            flags: 0,
        }
    }

    /// Decrypts `len` bytes at `offset` (clipped at the end of the
    /// volume) and hands them to `reply`, through a buffer reused by the
    /// thread (wiped when the thread ends).
    fn read_range(&self, offset: u64, len: usize, reply: impl FnOnce(&[u8])) -> Result<(), Errno> {
        let volume = self.volume()?;
        let size = self.size;
        if offset >= size {
            reply(&[]);
            return Ok(());
        }
        let len = usize::try_from((size - offset).min(len as u64)).map_err(|_| Errno::EINVAL)?;
        let ss = self.sector_size as u64;
        let start = offset / ss * ss;
        let end = (offset + len as u64).div_ceil(ss) * ss;
        let n = usize::try_from(end - start).map_err(|_| Errno::EINVAL)?;
        let skip = usize::try_from(offset - start).map_err(|_| Errno::EINVAL)?;
        READ_BUF.with_borrow_mut(|buf| {
            fit(buf, n);
            buf.resize(n, 0);
            volume.read_at(start, &mut buf[..n]).map_err(io_errno)?;
            reply(&buf[skip..skip + len]);
            Ok(())
        })
    }

    fn write_range(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let volume = self.volume()?;
        let size = self.size;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > size {
            // The volume cannot grow.
            return Err(Errno::ENOSPC);
        }
        let ss = self.sector_size as u64;
        if offset.is_multiple_of(ss) && (data.len() as u64).is_multiple_of(ss) {
            // Shared: aligned writes run in parallel, but never in the
            // middle of a read-modify-write.
            let _g = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            volume.write_at(offset, data).map_err(io_errno)?;
            return Ok(data.len());
        }
        // Partial sectors: read, patch, write back, alone.
        let _g = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let start = offset / ss * ss;
        let stop = end.div_ceil(ss) * ss;
        let n = usize::try_from(stop - start).map_err(|_| Errno::EINVAL)?;
        let mut buf = zeroize::Zeroizing::new(vec![0u8; n]);
        volume.read_at(start, &mut buf).map_err(io_errno)?;
        let skip = usize::try_from(offset - start).map_err(|_| Errno::EINVAL)?;
        buf[skip..skip + data.len()].copy_from_slice(data);
        volume.write_at(start, &buf).map_err(io_errno)?;
        Ok(data.len())
    }
}

fn io_errno(e: coffre_storage::Error) -> Errno {
    match e {
        coffre_storage::Error::Range(_) => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

const TTL: Duration = Duration::from_secs(3600);

/// Makes room for `n` bytes without a reallocation that would leave a
/// copy of the old content in freed memory: a new buffer replaces the old
/// one, which is wiped as it drops.
pub(crate) fn fit(buf: &mut zeroize::Zeroizing<Vec<u8>>, n: usize) {
    if buf.capacity() < n {
        *buf = zeroize::Zeroizing::new(Vec::with_capacity(n));
    }
}

thread_local! {
    /// Each FUSE worker's buffer for decrypted reads.
    static READ_BUF: std::cell::RefCell<zeroize::Zeroizing<Vec<u8>>> =
        std::cell::RefCell::new(zeroize::Zeroizing::new(Vec::new()));
}

impl Filesystem for VolumeFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_readahead(MAX_REQUEST);
        // Parallel direct I/O from the loop driver.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
            return;
        }
        reply.attr(&TTL, &self.attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
            return;
        }
        // No page cache on this file: the ext4 above has its own, and a
        // second copy would only cost memory and hide flush ordering.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let start = std::time::Instant::now();
        let mut reply = Some(reply);
        let mut served = None;
        if let Err(e) = self.read_range(offset, size as usize, |d| {
            served = Some(d.len());
            if let Some(r) = reply.take() {
                r.data(d);
            }
        }) {
            served = None;
            if let Some(r) = reply.take() {
                r.error(e);
            }
        }
        crate::iostats::DATA_IO.read.done(served, start.elapsed());
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let start = std::time::Instant::now();
        match self.write_range(offset, data) {
            Ok(n) => {
                reply.written(u32::try_from(n).unwrap_or(u32::MAX));
                crate::iostats::DATA_IO.write.done(Some(n), start.elapsed());
            }
            Err(e) => {
                reply.error(e);
                crate::iostats::DATA_IO.write.done(None, start.elapsed());
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self
            .volume()
            .and_then(|v| v.flush().map_err(|_| Errno::EIO))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = u32::try_from(self.sector_size).unwrap_or(4096);
        let blocks = self.size / u64::from(bsize);
        reply.statfs(blocks, 0, 0, 1, 0, bsize, 255, bsize);
    }

    fn destroy(&mut self) {
        if let Ok(v) = self.volume() {
            let _ = v.flush();
        }
    }
}

/// A mounted volume file; unmounting ends the session.
pub(crate) struct FuseFile {
    session: Option<fuser::BackgroundSession>,
    slot: Slot,
    at: std::path::PathBuf,
    /// The kernel's id for this FUSE connection
    /// (`/sys/fs/fuse/connections/ID`).
    conn: Option<u32>,
    /// Whether the file is still mounted at `at` (by us).
    mounted: bool,
}

/// FUSE worker threads (each one decrypts or encrypts a request; large
/// requests are further split across cores by the volume).
const FUSE_THREADS: usize = 4;

impl FuseFile {
    /// Mounts `volume` over the regular file `at` (created if missing).
    pub(crate) fn mount(volume: Arc<EncryptedVolume>, at: &Path) -> std::io::Result<Self> {
        let slot: Slot = Arc::new(RwLock::new(Some(volume)));
        if !at.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(at)?;
        }
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("coffre".into()),
            MountOption::Subtype("coffre".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let at = &at.canonicalize()?;
        let session = fuser::Session::new(VolumeFile::new(slot.clone()), at, &config)?;
        // From the mount table: a stat of the file would wait for a worker
        // that is not running yet.
        let conn = crate::system::device_of(at)
            .and_then(|d| d.split_once(':').and_then(|(_, m)| m.parse().ok()));
        Ok(Self {
            session: Some(session.spawn()?),
            slot,
            at: at.to_path_buf(),
            conn,
            mounted: true,
        })
    }

    /// Unmounts (not lazily: fails if something still uses the file),
    /// makes sure the connection has ended, and waits for the workers.
    pub(crate) fn unmount(&mut self) -> std::io::Result<()> {
        use rustix::mount::{UnmountFlags, unmount};
        if !self.mounted {
            return self.join();
        }
        // The loop device lets go of the file a moment after it reports
        // detached: a short EBUSY is not a holder.
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match unmount(&self.at, UnmountFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {
                    self.mounted = false;
                    break;
                }
                Err(rustix::io::Errno::BUSY) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Unmounting ends the connection, unless a copy of the mount
        // elsewhere keeps it. Then the workers linger: take the volume away
        // from them (every request fails, the key goes) and let them be.
        let until = Instant::now() + Duration::from_secs(2);
        while self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
        {
            if Instant::now() > until {
                self.revoke();
                self.session = None;
                return Err(std::io::Error::other(
                    "the FUSE connection outlives its mount (a copy elsewhere?): the volume and its key were taken away from its workers, \
                     but their last requests' data stays in their buffers until the copy goes",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.join()
    }

    /// The workers' handle on the volume.
    pub(crate) fn slot(&self) -> Slot {
        self.slot.clone()
    }

    /// Takes the volume (and its key) away from the workers.
    pub(crate) fn revoke(&self) {
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Waits (boundedly) for the workers to stop.
    fn join(&mut self) -> std::io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !s.guard.is_finished() {
            if Instant::now() > until {
                self.session = Some(s);
                return Err(std::io::Error::other("the FUSE workers did not stop"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        s.join()
    }

    fn abort_by_id(&mut self) -> bool {
        let ours = crate::system::device_of(&self.at)
            .and_then(|d| d.split_once(':').and_then(|(_, m)| m.parse::<u32>().ok()));
        self.conn.take().is_some_and(|c| {
            ours == Some(c)
                && std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1").is_ok()
        })
    }

    /// Whether the workers are gone (after an abort).
    pub(crate) fn aborted(&self) -> bool {
        self.session.is_none()
    }

    /// Detaches the mount lazily (forced close, after [`FuseFile::abort`]:
    /// nothing can be served through it any more).
    pub(crate) fn detach(&mut self) {
        use rustix::mount::{UnmountFlags, unmount};
        if self.mounted && unmount(&self.at, UnmountFlags::DETACH).is_ok() {
            self.mounted = false;
        }
    }

    /// Ends the FUSE connection while the file is still mounted (forced
    /// close): every request fails from now on and the workers stop,
    /// dropping the volume and its key. Returns whether the workers are
    /// gone.
    pub(crate) fn abort(&mut self) -> bool {
        use rustix::mount::{UnmountFlags, unmount};
        if self.session.is_none() {
            return true;
        }
        // MNT_FORCE makes FUSE abort the connection even when the unmount
        // itself fails as busy; no need for fusectl.
        if self.mounted && unmount(&self.at, UnmountFlags::FORCE).is_ok() {
            self.mounted = false;
        }
        let until = Instant::now() + Duration::from_millis(500);
        while self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
        {
            if Instant::now() > until {
                // Only while our mount still holds the connection's id: once
                // unmounted, the kernel may give that id to another FUSE
                // mount, and aborting it by id would end someone else's
                // connection (seen in CI: a forced close beside another
                // test's `coffre init` aborted its fresh connection, and
                // mkfs's unmount failed with ECONNABORTED).
                if self.mounted {
                    self.abort_by_id();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.join().is_ok()
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffre_testkit::{Need, require, volume as support};
    use std::os::unix::fs::FileExt;

    /// Unaligned reads and writes through the kernel's FUSE (what mkfs
    /// does), checked against a plain model of the bytes.
    #[test]
    #[ignore = "system: needs root, FUSE"]
    fn unaligned_io_through_fuse_matches_a_model() {
        require(&[Need::Root, Need::Fuse]);
        let t = tempfile::tempdir().unwrap();
        let (c, key) = support::scratch_volume(t.path(), 1 << 20);
        let volume = Arc::new(c.open_volume(&key).unwrap());
        let size = usize::try_from(volume.size()).unwrap();
        // Start from known content.
        volume.write_at(0, &vec![0u8; size]).unwrap();
        let at = t.path().join("file");
        let mut fuse = FuseFile::mount(volume.clone(), &at).unwrap();
        let mut model = vec![0u8; size];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&at)
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), size as u64);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            usize::try_from(x % m as u64).unwrap()
        };
        for i in 0..200 {
            let off = next(size);
            let len = 1 + next(20_000).min(size - off - 1);
            if i % 2 == 0 {
                let data: Vec<u8> = (0..len)
                    .map(|j| u8::try_from((i + j) % 251).unwrap())
                    .collect();
                f.write_all_at(&data, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&data);
            } else {
                let mut got = vec![0u8; len];
                f.read_exact_at(&mut got, off as u64).unwrap();
                assert_eq!(got, &model[off..off + len], "read {off}+{len}");
            }
        }
        // Past the end: a short read, and a write that cannot grow it.
        let mut tail = [0u8; 100];
        assert_eq!(f.read_at(&mut tail, size as u64 - 10).unwrap(), 10);
        assert!(f.write_at(&[1u8; 10], size as u64).is_err());
        f.sync_all().unwrap();
        drop(f);
        fuse.unmount().unwrap();
        let mut all = vec![0u8; size];
        volume.read_at(0, &mut all).unwrap();
        assert!(all == model, "what the engine stored is what was written");
    }
}

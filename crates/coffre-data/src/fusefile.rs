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
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Largest request we accept from the kernel (the kernel's own FUSE limit
/// is 256 pages; it negotiates down).
const MAX_REQUEST: u32 = 1 << 20;

/// The filesystem: one inode, the volume.
pub(crate) struct VolumeFile {
    volume: Arc<EncryptedVolume>,
    /// Serialises read-modify-write of partial sectors against each other
    /// (aligned requests, the common case, never take it).
    rmw: Mutex<()>,
    /// Owner of the file (root: only the daemon's loop device uses it).
    started: SystemTime,
}

impl VolumeFile {
    pub(crate) fn new(volume: Arc<EncryptedVolume>) -> Self {
        Self {
            volume,
            rmw: Mutex::new(()),
            started: SystemTime::now(),
        }
    }

    fn attr(&self) -> FileAttr {
        let size = self.volume.size();
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
            blksize: u32::try_from(self.volume.sector_size()).unwrap_or(4096),
            flags: 0,
        }
    }

    fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let size = self.volume.size();
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = usize::try_from((size - offset).min(len as u64)).map_err(|_| Errno::EINVAL)?;
        let ss = self.volume.sector_size() as u64;
        let start = offset / ss * ss;
        let end = (offset + len as u64).div_ceil(ss) * ss;
        let mut buf = vec![0u8; usize::try_from(end - start).map_err(|_| Errno::EINVAL)?];
        self.volume.read_at(start, &mut buf).map_err(io_errno)?;
        let skip = usize::try_from(offset - start).map_err(|_| Errno::EINVAL)?;
        if skip == 0 && buf.len() == len {
            return Ok(buf);
        }
        Ok(buf[skip..skip + len].to_vec())
    }

    fn write_range(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let size = self.volume.size();
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > size {
            // The volume cannot grow.
            return Err(Errno::ENOSPC);
        }
        let ss = self.volume.sector_size() as u64;
        if offset.is_multiple_of(ss) && (data.len() as u64).is_multiple_of(ss) {
            self.volume.write_at(offset, data).map_err(io_errno)?;
            return Ok(data.len());
        }
        // Partial sectors: read, patch, write back, under the lock.
        let _g = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        let start = offset / ss * ss;
        let stop = end.div_ceil(ss) * ss;
        let mut buf = vec![0u8; usize::try_from(stop - start).map_err(|_| Errno::EINVAL)?];
        self.volume.read_at(start, &mut buf).map_err(io_errno)?;
        let skip = usize::try_from(offset - start).map_err(|_| Errno::EINVAL)?;
        buf[skip..skip + data.len()].copy_from_slice(data);
        self.volume.write_at(start, &buf).map_err(io_errno)?;
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
        match self.read_range(offset, size as usize) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
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
        match self.write_range(offset, data) {
            Ok(n) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
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
        match self.volume.flush() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = u32::try_from(self.volume.sector_size()).unwrap_or(4096);
        let blocks = self.volume.size() / u64::from(bsize);
        reply.statfs(blocks, 0, 0, 1, 0, bsize, 255, bsize);
    }

    fn destroy(&mut self) {
        let _ = self.volume.flush();
    }
}

/// A mounted volume file; unmounting ends the session.
pub(crate) struct FuseFile {
    session: Option<fuser::BackgroundSession>,
    at: std::path::PathBuf,
}

/// FUSE worker threads (each one decrypts or encrypts a request; large
/// requests are further split across cores by the volume).
const FUSE_THREADS: usize = 4;

impl FuseFile {
    /// Mounts `volume` over the regular file `at` (created if missing).
    pub(crate) fn mount(volume: Arc<EncryptedVolume>, at: &Path) -> std::io::Result<Self> {
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
        let session = fuser::Session::new(VolumeFile::new(volume), at, &config)?;
        Ok(Self {
            session: Some(session.spawn()?),
            at: at.to_path_buf(),
        })
    }

    /// Unmounts (not lazily: fails if something still uses the file) and
    /// waits for the session's threads.
    pub(crate) fn unmount(&mut self) -> std::io::Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        // Our own plain umount(2): EBUSY if the loop device still holds
        // the file, and then the session stays as it was.
        match rustix::mount::unmount(&self.at, rustix::mount::UnmountFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(s) = self.session.take() {
            // The kernel ends the connection at unmount; the workers see
            // it and stop.
            s.join()?;
        }
        Ok(())
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

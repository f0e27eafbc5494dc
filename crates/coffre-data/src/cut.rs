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

use coffre_sys::handle::FileHandle;
use fuser::{
    Config, Errno, FileAttr, FileType, Filesystem, FopenFlags, Generation, INodeNo, MountOption,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL,
};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::ZERO;

struct Node {
    handle: FileHandle,
    lookups: u64,
}

struct Open {
    handle: FileHandle,
    flags: i32,
    /// `None` while cut, or when it could not be reopened (`lost`).
    file: Option<Arc<File>>,
    lost: bool,
}

#[derive(Default)]
struct Maps {
    nodes: HashMap<u64, Node>,
    files: HashMap<u64, Open>,
    dirs: HashMap<u64, Vec<(u64, FileType, std::ffi::OsString)>>,
    next_fh: u64,
}

/// The mount the layer passes through to, while live.
struct Live {
    /// The mount's root, opened for reading: `open_by_handle_at` refuses
    /// an `O_PATH` descriptor as its mount.
    root: Arc<OwnedFd>,
    root_ino: u64,
}

struct State {
    /// Requests hold it shared; cut and restore take it exclusively, so
    /// they wait for requests in flight.
    live: RwLock<Option<Live>>,
    maps: Mutex<Maps>,
}

/// The filesystem fuser owns; the daemon keeps the same state to cut it.
struct Layer(Arc<State>);

impl std::ops::Deref for Layer {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

fn errno(e: impl Into<std::io::Error>) -> Errno {
    Errno::from(e.into())
}

fn rerr(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(s: i64, ns: u64) -> SystemTime {
    let ns = u32::try_from(ns.min(999_999_999)).unwrap_or(0);
    match u64::try_from(s) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, ns),
        Err(_) => UNIX_EPOCH,
    }
}

impl Layer {
    fn ino(&self, live: &Live, st_ino: u64) -> u64 {
        if st_ino == live.root_ino { 1 } else { st_ino }
    }

    fn attr(&self, live: &Live, st: &rustix::fs::Stat) -> FileAttr {
        #[allow(clippy::useless_conversion)]
        let (size, blocks, blksize) = (
            u64::try_from(st.st_size).unwrap_or(0),
            u64::try_from(st.st_blocks).unwrap_or(0),
            u32::try_from(st.st_blksize).unwrap_or(4096),
        );
        #[allow(clippy::useless_conversion)]
        let (a, m, c) = (
            time(st.st_atime, u64::try_from(st.st_atime_nsec).unwrap_or(0)),
            time(st.st_mtime, u64::try_from(st.st_mtime_nsec).unwrap_or(0)),
            time(st.st_ctime, u64::try_from(st.st_ctime_nsec).unwrap_or(0)),
        );
        #[allow(clippy::useless_conversion)]
        FileAttr {
            ino: INodeNo(self.ino(live, st.st_ino)),
            size,
            blocks,
            atime: a,
            mtime: m,
            ctime: c,
            crtime: c,
            kind: kind_of(st.st_mode),
            perm: u16::try_from(st.st_mode & 0o7777).unwrap_or(0),
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: u32::try_from(st.st_rdev).unwrap_or(0),
            blksize,
            flags: 0,
        }
    }

    /// The `O_PATH` descriptor of inode `ino`.
    fn fd(&self, live: &Live, ino: u64) -> Result<Arc<OwnedFd>, Errno> {
        if ino == 1 {
            return Ok(live.root.clone());
        }
        // Opened for each request, not kept: the kernel forgets inodes
        // late, and a descriptor per file a workload ever looked at would
        // run the daemon out of descriptors.
        let handle = {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.nodes.get(&ino).ok_or(Errno::ESTALE)?.handle.clone()
        };
        Ok(Arc::new(
            handle
                .open(live.root.as_fd(), libc::O_PATH | libc::O_NOFOLLOW)
                .map_err(errno)?,
        ))
    }

    /// Looks `name` up in `parent` and counts one kernel reference to it.
    /// The name is resolved once: the attributes and the handle both come
    /// from the descriptor that resolution gave, so a rename between the
    /// two can never pair one file's attributes with another's handle.
    fn entry(&self, live: &Live, parent: &OwnedFd, name: &OsStr) -> Result<(FileAttr, u64), Errno> {
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(rerr)?;
        self.node(live, fd)
    }

    /// Counts one kernel reference to the file `fd` refers to; returns its
    /// attributes and generation.
    fn node(&self, live: &Live, fd: OwnedFd) -> Result<(FileAttr, u64), Errno> {
        let st = rustix::fs::fstat(&fd).map_err(rerr)?;
        let attr = self.attr(live, &st);
        if attr.ino.0 == 1 {
            return Ok((attr, 0));
        }
        let handle = FileHandle::of(fd.as_fd(), Path::new("")).map_err(errno)?;
        let generation = handle.fingerprint();
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let node = maps.nodes.entry(attr.ino.0).or_insert(Node {
            handle: handle.clone(),
            lookups: 0,
        });
        if node.handle != handle {
            // The inode number was reused by a new file. The count goes on:
            // the kernel will still forget the old inode's lookups under
            // this number.
            node.handle = handle;
        }
        node.lookups += 1;
        Ok((attr, generation))
    }

    fn with_live<T>(&self, f: impl FnOnce(&Live) -> Result<T, Errno>) -> Result<T, Errno> {
        let g = self.live.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(live) => f(live),
            None => Err(Errno::EIO),
        }
    }

    fn file(&self, fh: u64) -> Result<Arc<File>, Errno> {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let open = maps.files.get(&fh).ok_or(Errno::EBADF)?;
        open.file.clone().ok_or(Errno::EIO)
    }

    /// This thread acts as the requesting process on the filesystem until
    /// the guard drops: the kernel checks its rights and makes new files
    /// its own (the directory's group when setgid), atomically.
    fn as_caller(req: &Request) -> Result<coffre_sys::caller::AsCaller, Errno> {
        coffre_sys::caller::AsCaller::new(
            req.uid(),
            req.gid(),
            &caller_groups(req.pid(), req.uid(), req.gid()),
        )
        .map_err(errno)
    }

    fn proc_path(fd: &OwnedFd) -> PathBuf {
        Layer::proc_path_of(fd)
    }

    fn proc_path_of(fd: &impl std::os::fd::AsRawFd) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }
}

impl Filesystem for Layer {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Shared mappings of direct-I/O files (kernel 6.6+): programs that
        // mmap their files work; those pages are dropped at every cut.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            self.entry(live, &p, name)
        }) {
            Ok((a, g)) => reply.entry(&TTL, &a, Generation(g)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = maps.nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            if n.lookups == 0 {
                maps.nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        let r = self.with_live(|live| {
            let st = match fh.map(|f| self.file(f.0)) {
                Some(Ok(f)) => rustix::fs::fstat(&*f),
                _ => rustix::fs::fstat(&*self.fd(live, ino.0)?),
            }
            .map_err(rerr)?;
            Ok(self.attr(live, &st))
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<fuser::FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.with_live(|live| {
            let fd = self.fd(live, ino.0)?;
            let path = Layer::proc_path(&fd);
            if let Some(m) = mode {
                rustix::fs::chmod(&path, Mode::from_raw_mode(m & 0o7777)).map_err(rerr)?;
            }
            if uid.is_some() || gid.is_some() {
                rustix::fs::chownat(
                    &*fd,
                    "",
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(rerr)?;
            }
            if let Some(n) = size {
                match fh.map(|f| self.file(f.0)) {
                    Some(Ok(f)) => f.set_len(n).map_err(errno)?,
                    _ => std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(n))
                        .map_err(errno)?,
                }
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<fuser::TimeOrNow>| match t {
                    None => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_OMIT,
                    },
                    Some(fuser::TimeOrNow::Now) => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_NOW,
                    },
                    Some(fuser::TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        rustix::fs::Timespec {
                            tv_sec: i64::try_from(d.as_secs()).unwrap_or(0),
                            tv_nsec: i64::from(d.subsec_nanos()),
                        }
                    }
                };
                let times = rustix::fs::Timestamps {
                    last_access: ts(atime),
                    last_modification: ts(mtime),
                };
                rustix::fs::utimensat(rustix::fs::CWD, &path, &times, AtFlags::empty())
                    .map_err(rerr)?;
            }
            let st = rustix::fs::fstat(&*fd).map_err(rerr)?;
            Ok(self.attr(live, &st))
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with_live(|live| {
            let fd = self.fd(live, ino.0)?;
            rustix::fs::readlinkat(&*fd, "", Vec::new()).map_err(rerr)
        }) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            let want = mode & !umask & 0o7777;
            {
                let _me = Layer::as_caller(req)?;
                rustix::fs::mkdirat(&*p, name, Mode::from_raw_mode(want)).map_err(rerr)?;
                // The daemon's own umask applied too; setgid comes from the
                // parent. The directory is reached without following a
                // symlink (someone may swap the name), and as the caller.
                let d = rustix::fs::openat(
                    &*p,
                    name,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(rerr)?;
                let st = rustix::fs::fstat(&d).map_err(rerr)?;
                let keep = st.st_mode & libc::S_ISGID;
                if st.st_mode & 0o7777 != want | keep {
                    rustix::fs::chmod(Layer::proc_path(&d), Mode::from_raw_mode(want | keep))
                        .map_err(rerr)?;
                }
            }
            self.entry(live, &p, name)
        }) {
            Ok((a, g)) => reply.entry(&TTL, &a, Generation(g)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            let _me = Layer::as_caller(req)?;
            rustix::fs::unlinkat(&*p, name, AtFlags::empty()).map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            let _me = Layer::as_caller(req)?;
            rustix::fs::unlinkat(&*p, name, AtFlags::REMOVEDIR).map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            {
                let _me = Layer::as_caller(req)?;
                rustix::fs::symlinkat(target, &*p, link_name).map_err(rerr)?;
            }
            self.entry(live, &p, link_name)
        }) {
            Ok((a, g)) => reply.entry(&TTL, &a, Generation(g)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            let np = self.fd(live, newparent.0)?;
            let f = rustix::fs::RenameFlags::from_bits(flags.bits()).ok_or(Errno::EINVAL)?;
            let _me = Layer::as_caller(req)?;
            rustix::fs::renameat_with(&*p, name, &*np, newname, f).map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.with_live(|live| {
            let fd = self.fd(live, ino.0)?;
            let np = self.fd(live, newparent.0)?;
            {
                // Through /proc (no capability needed), as the caller: the
                // kernel's hard-link protections apply to them.
                let _me = Layer::as_caller(req)?;
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    Layer::proc_path(&fd),
                    &*np,
                    newname,
                    AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(rerr)?;
            }
            self.entry(live, &np, newname)
        }) {
            Ok((a, g)) => reply.entry(&TTL, &a, Generation(g)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let keep =
            libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;
        let flags = flags.0 & keep;
        match self.with_live(|live| {
            let handle = if ino.0 == 1 {
                FileHandle::of(live.root.as_fd(), Path::new("")).map_err(errno)?
            } else {
                let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
                maps.nodes.get(&ino.0).ok_or(Errno::ESTALE)?.handle.clone()
            };
            let file = File::from(handle.open(live.root.as_fd(), flags).map_err(errno)?);
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.next_fh += 1;
            let fh = maps.next_fh;
            maps.files.insert(
                fh,
                Open {
                    handle,
                    flags,
                    file: Some(Arc::new(file)),
                    lost: false,
                },
            );
            Ok(fh)
        }) {
            Ok(fh) => reply.opened(fuser::FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.with_live(|_| {
            let f = self.file(fh.0)?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        }) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with_live(|_| {
            let f = self.file(fh.0)?;
            f.write_all_at(data, offset).map_err(errno)?;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with_live(|_| {
            let f = self.file(fh.0)?;
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
            .map_err(errno)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is read at once: no directory stays open on the
        // mount between calls.
        match self.with_live(|live| {
            let fd = self.fd(live, ino.0)?;
            let mut list = vec![
                (ino.0, FileType::Directory, ".".into()),
                (1, FileType::Directory, "..".into()),
            ];
            for e in std::fs::read_dir(Layer::proc_path(&fd)).map_err(errno)? {
                let e = e.map_err(errno)?;
                use std::os::unix::fs::DirEntryExt;
                let kind = match e.file_type() {
                    Ok(t) if t.is_dir() => FileType::Directory,
                    Ok(t) if t.is_symlink() => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                list.push((self.ino(live, e.ino()), kind, e.file_name()));
            }
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.next_fh += 1;
            let fh = maps.next_fh;
            maps.dirs.insert(fh, list);
            Ok(fh)
        }) {
            Ok(fh) => reply.opened(fuser::FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = maps.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(start) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirs
            .remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with_live(|live| rustix::fs::fstatvfs(&*live.root).map_err(rerr)) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                u32::try_from(s.f_bsize).unwrap_or(4096),
                u32::try_from(s.f_namemax).unwrap_or(255),
                u32::try_from(s.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_TRUNC;
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            let want = mode & !umask & 0o7777;
            let base = (flags & keep) | libc::O_CLOEXEC | libc::O_NOFOLLOW;
            let oflags =
                |extra: i32| OFlags::from_bits_retain(u32::try_from(base | extra).unwrap_or(0));
            let fd = {
                let _me = Layer::as_caller(req)?;
                // Always exclusive: the file we hand back is the one this
                // call made. If the name appeared since the kernel's
                // lookup, open it as the caller (unless they asked O_EXCL).
                match rustix::fs::openat(
                    &*p,
                    name,
                    oflags(libc::O_CREAT | libc::O_EXCL),
                    Mode::from_raw_mode(want),
                ) {
                    Ok(fd) => {
                        // The daemon's umask applied too.
                        rustix::fs::fchmod(&fd, Mode::from_raw_mode(want)).map_err(rerr)?;
                        fd
                    }
                    Err(rustix::io::Errno::EXIST) if flags & libc::O_EXCL == 0 => {
                        // Never block on a FIFO swapped in, never hand back
                        // anything but a regular file.
                        let fd =
                            rustix::fs::openat(&*p, name, oflags(libc::O_NONBLOCK), Mode::empty())
                                .map_err(rerr)?;
                        let st = rustix::fs::fstat(&fd).map_err(rerr)?;
                        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                            return Err(Errno::EEXIST);
                        }
                        let fl = rustix::fs::fcntl_getfl(&fd).map_err(rerr)?;
                        rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK).map_err(rerr)?;
                        fd
                    }
                    Err(e) => return Err(rerr(e)),
                }
            };
            let handle = FileHandle::of(fd.as_fd(), Path::new("")).map_err(errno)?;
            let path = rustix::fs::openat(
                rustix::fs::CWD,
                Layer::proc_path_of(&fd),
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(rerr)?;
            let (attr, generation) = self.node(live, path)?;
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.next_fh += 1;
            let fh = maps.next_fh;
            maps.files.insert(
                fh,
                Open {
                    handle,
                    flags: flags
                        & (libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC),
                    file: Some(Arc::new(File::from(fd))),
                    lost: false,
                },
            );
            Ok((attr, generation, fh))
        }) {
            Ok((a, g, fh)) => reply.created(
                &TTL,
                &a,
                Generation(g),
                fuser::FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// The supplementary groups of process `pid` (from `/proc/PID/status`);
/// none if it is gone.
fn caller_groups(pid: u32, uid: u32, gid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let field = |key: &str, n: usize| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().nth(n)?.parse().ok())
    };
    // The file-system ids (4th column) must be the request's: otherwise
    // the pid was reused, and its groups are someone else's.
    if field("Uid:", 3) != Some(uid) || field("Gid:", 3) != Some(gid) {
        return Vec::new();
    }
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("Groups:").map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

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
        config.n_threads = Some(2);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::process::Command;

    use coffre_testkit::{Need, require};

    fn run(cmd: &mut Command) {
        coffre_testkit::run_ok(cmd);
    }

    const NEEDS: &[Need] = &[Need::Root, Need::Fuse, Need::Loop, Need::Ext4];

    /// A file held open through the layer survives the ext4 mount going
    /// away (which it no longer keeps busy) and coming back.
    #[test]
    #[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
    fn open_files_survive_a_cut_and_an_unmount() {
        require(NEEDS);
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("fs.img");
        let mnt = t.path().join("mnt");
        let view = t.path().join("view");
        std::fs::create_dir(&mnt).unwrap();
        File::create(&img).unwrap().set_len(32 << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        let layer = CutLayer::mount(&view).unwrap();
        layer.restore(&mnt).unwrap();

        std::fs::create_dir(view.join("dir")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(view.join("dir/count"))
            .unwrap();
        f.write_all(b"before ").unwrap();
        std::fs::write(view.join("gone"), b"x").unwrap();
        let mut g = File::open(view.join("gone")).unwrap();
        assert_eq!(std::fs::read(mnt.join("dir/count")).unwrap(), b"before ");

        assert_eq!(layer.cut(), 2);
        // The layer holds nothing on the mount: it unmounts.
        run(Command::new("umount").arg(&mnt));
        let mut buf = Vec::new();
        assert!(g.read_to_end(&mut buf).is_err(), "reads fail while cut");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        std::fs::remove_file(mnt.join("gone")).unwrap();

        let r = layer.restore(&mnt).unwrap();
        assert_eq!((r.reopened, r.lost), (1, 1));
        f.write_all(b"after").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "before after");
        assert_eq!(
            std::fs::read(mnt.join("dir/count")).unwrap(),
            b"before after"
        );
        assert!(
            g.read_to_end(&mut buf).is_err(),
            "a file deleted while cut stays lost"
        );
        drop((f, g));

        // Programs that map their files work (shared, writable mappings).
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import mmap; f = open('{}', 'w+b'); f.write(b'0' * 4096); f.flush(); m = mmap.mmap(f.fileno(), 4096); m[0:5] = b'mmap!'; m.flush(); m.close(); f.close()",
                view.join("mapped").display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&std::fs::read(mnt.join("mapped")).unwrap()[..5], b"mmap!");

        // A member (uid 5001, in the team's group 4242) works through the
        // layer as themselves: the kernel checks their rights, new files
        // are theirs, the setgid directory's group is kept, their umask is
        // honoured and the daemon's is not added.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let shared = mnt.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::os::unix::fs::chown(&shared, Some(0), Some(4242)).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2770)).unwrap();
        std::fs::write(shared.join("root-only"), b"secret").unwrap();
        std::fs::set_permissions(
            shared.join("root-only"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let member = |script: &str| {
            Command::new("setpriv")
                .args([
                    "--reuid=5001",
                    "--regid=5001",
                    "--groups=4242",
                    "--",
                    "sh",
                    "-c",
                ])
                .arg(format!(
                    "umask 002; cd {} && {script}",
                    view.join("shared").display()
                ))
                .output()
                .unwrap()
        };
        let out = member("mkdir d && echo hi > d/f && ln -s f d/l && ln d/f d/hard && mv d/f d/g");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta = |p: &str| std::fs::symlink_metadata(shared.join(p)).unwrap();
        assert_eq!(
            (meta("d").uid(), meta("d").gid(), meta("d").mode() & 0o7777),
            (5001, 4242, 0o2775)
        );
        assert_eq!(
            (
                meta("d/g").uid(),
                meta("d/g").gid(),
                meta("d/g").mode() & 0o7777
            ),
            (5001, 4242, 0o664)
        );
        assert_eq!((meta("d/l").uid(), meta("d/l").gid()), (5001, 4242));
        assert_eq!(meta("d/hard").ino(), meta("d/g").ino());
        // What they may not do, they cannot do through the layer either.
        let out = member("cat root-only");
        assert!(!out.status.success());
        let out = member("chmod 644 root-only || chown 5001 root-only");
        assert!(!out.status.success());
        assert_eq!(meta("root-only").mode() & 0o777, 0o600);
        let out = member("rm -r d");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!shared.join("d").exists());

        drop(layer);
        run(Command::new("umount").arg(&mnt));
    }

    /// `fs.suid_dumpable` set to a value for the life of the guard, then put
    /// back.
    struct SuidDumpable(String);

    impl SuidDumpable {
        const PATH: &str = "/proc/sys/fs/suid_dumpable";
        fn set(value: &str) -> Self {
            let old = std::fs::read_to_string(Self::PATH).unwrap();
            std::fs::write(Self::PATH, value).unwrap();
            Self(old.trim().to_owned())
        }
    }

    impl Drop for SuidDumpable {
        fn drop(&mut self) {
            let _ = std::fs::write(Self::PATH, &self.0);
        }
    }

    /// With `fs.suid_dumpable` 2, every fsuid switch would make the process
    /// dumpable again (mode 2, "root only"): a member's file operation
    /// through the layer leaves it undumpable, as the daemon set it at start.
    #[test]
    #[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
    fn a_member_operation_leaves_the_process_undumpable() {
        require(NEEDS);
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("fs.img");
        let mnt = t.path().join("mnt");
        let view = t.path().join("view");
        std::fs::create_dir(&mnt).unwrap();
        File::create(&img).unwrap().set_len(16 << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        let dir = mnt.join("home");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(5002), Some(5002)).unwrap();
        let layer = CutLayer::mount(&view).unwrap();
        layer.restore(&mnt).unwrap();

        let sysctl = SuidDumpable::set("2");
        coffre_sys::forbid_dumps().unwrap();
        assert!(!coffre_sys::is_dumpable());
        let out = Command::new("setpriv")
            .args(["--reuid=5002", "--regid=5002", "--clear-groups", "--"])
            .arg("sh")
            .arg("-c")
            .arg(format!("echo x > {}/mine", view.join("home").display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(dir.join("mine")).unwrap().uid(), 5002);
        }
        let dumpable = coffre_sys::is_dumpable();
        // Put everything back before any assertion can fail.
        drop(sysctl);
        drop(layer);
        run(Command::new("umount").arg(&mnt));
        assert!(!dumpable, "the identity switch left the process dumpable");
    }
}

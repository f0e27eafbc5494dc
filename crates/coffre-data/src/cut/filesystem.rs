//! The filesystem itself (fuser's `Filesystem`): every request passes
//! through to the live mount by file handle, as the caller, or fails with
//! `EIO` while cut.

use super::state::*;
use coffre_sys::handle::FileHandle;
use fuser::{
    Errno, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request,
};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

thread_local! {
    /// Each worker's buffer for reads and direct writes (plaintext: the
    /// bytes a request used are wiped as soon as it is answered).
    static VIEW_BUF: std::cell::RefCell<zeroize::Zeroizing<Vec<u8>>> =
        std::cell::RefCell::new(zeroize::Zeroizing::new(Vec::new()));
}

/// Alignment of direct I/O buffers (a page: more than any sector size).
const DIRECT_ALIGN: usize = 4096;

/// Direct writes that had to be copied into an aligned buffer first (their
/// data was not on a page in the FUSE library's buffer): none with our
/// allocator, which the tests check.
pub(crate) static COPIED_DIRECT_WRITES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Makes room in `buf` for `n` bytes starting at a page boundary; returns
/// where they start.
fn aligned(buf: &mut zeroize::Zeroizing<Vec<u8>>, n: usize) -> usize {
    crate::fusefile::fit(buf, n + DIRECT_ALIGN);
    if buf.len() < n + DIRECT_ALIGN {
        buf.resize(n + DIRECT_ALIGN, 0);
    }
    buf.as_ptr().align_offset(DIRECT_ALIGN)
}

/// What a write by anyone without `CAP_FSETID` does on any Linux
/// filesystem, before the data changes: the setuid bit goes, and the
/// setgid bit where it means execution (group-executable). The view's
/// writes are the daemon's own, which keeps them: without this, a member
/// of a file's group could change another's setuid program and keep the
/// bit (a VM mounting the share without `nosuid` runs it as its owner).
/// Anyone but root is taken to lack `CAP_FSETID`.
fn kill_suid_sgid(f: &File) -> Result<(), Errno> {
    let m = rustix::fs::fstat(f).map_err(rerr)?.st_mode;
    let mut kill = m & libc::S_ISUID;
    if m & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        kill |= libc::S_ISGID;
    }
    if kill != 0 {
        rustix::fs::fchmod(f, Mode::from_raw_mode(m & 0o7777 & !kill)).map_err(rerr)?;
    }
    Ok(())
}

/// After a `mkdir` or `mknod` as the caller: the mode asked (`want`) set
/// again, since the daemon's own umask applied too, keeping the `keep`
/// bits the object got (setgid from the parent), on what is at `name`
/// now if it is still of the `kind` made (reached without following a
/// link: someone may swap the name), as the caller.
fn set_made_mode(
    dir: &std::os::fd::OwnedFd,
    name: &OsStr,
    kind: u32,
    want: u32,
    keep: u32,
) -> Result<(), Errno> {
    let made = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(rerr)?;
    let st = rustix::fs::fstat(&made).map_err(rerr)?;
    let mode = want | (st.st_mode & keep);
    if st.st_mode & libc::S_IFMT == kind && st.st_mode & 0o7777 != mode {
        rustix::fs::chmod(Layer::proc_path(&made), Mode::from_raw_mode(mode)).map_err(rerr)?;
    }
    Ok(())
}

/// The kernel's largest extended attribute value.
const XATTR_SIZE_MAX: usize = 1 << 16;

/// Whether `name` is in the `user.` namespace, the only one the view
/// serves.
fn user_xattr(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().starts_with(b"user.")
}

/// A `getxattr` answer: the size asked for, or the value.
enum XattrAnswer {
    Size(usize),
    Data(Vec<u8>),
}

impl XattrAnswer {
    fn send(self, reply: ReplyXattr) {
        match self {
            XattrAnswer::Size(n) => reply.size(u32::try_from(n).unwrap_or(u32::MAX)),
            XattrAnswer::Data(v) => reply.data(&v),
        }
    }
}

impl Layer {
    /// The path that names inode `ino` for an extended attribute call:
    /// its descriptor's `/proc` link, followed to the inode itself. Only
    /// for a regular file or a directory (the only ones `user.` takes):
    /// a symbolic link would be followed further, in the daemon's view of
    /// the host, so anything else gets `otherwise`.
    /// Directory `ino`'s entries, `.` and `..` first, each with its own
    /// type: a program that trusts it (`find -type f`, Python's
    /// `scandir`) must not open a FIFO or a socket as a file.
    ///
    /// With what it takes of the daemon's memory ([`DIR_BYTES`] and its
    /// entries), charged to `uid` as it grows (ahead of the entries, a
    /// step at a time): `ENOMEM` as soon as that passes the user's (or
    /// everyone's) room, counting the listings other workers are reading
    /// at the same time. On success the charge is exactly what it
    /// returns; on an error nothing stays charged.
    fn listing(&self, live: &Live, ino: u64, uid: u32) -> Result<(Listing, usize), Errno> {
        let mut charged = 0;
        let r = self.read_listing(live, ino, uid, &mut charged);
        let mut maps = self.lock_maps();
        let settled = r.as_ref().map_or(0, |(_, bytes)| *bytes);
        // Down to what is kept (or nothing): never refused.
        let _ = maps.charge_listing(&self.caps, uid, charged, settled);
        r
    }

    fn read_listing(
        &self,
        live: &Live,
        ino: u64,
        uid: u32,
        charged: &mut usize,
    ) -> Result<(Listing, usize), Errno> {
        use std::os::unix::fs::{DirEntryExt, FileTypeExt};
        let charge = |bytes: usize, charged: &mut usize| -> Result<(), Errno> {
            if bytes <= *charged {
                return Ok(());
            }
            let mut maps = self.lock_maps();
            let room = maps.listing_room(&self.caps, uid, *charged);
            if bytes > room {
                return Err(Errno::ENOMEM);
            }
            let ahead = bytes.next_multiple_of(LISTING_STEP).min(room);
            maps.charge_listing(&self.caps, uid, *charged, ahead)?;
            *charged = ahead;
            Ok(())
        };
        let fd = self.fd(live, ino)?;
        let mut list: Listing = vec![
            (ino, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        let mut bytes = DIR_BYTES + entry_bytes(".".as_ref()) + entry_bytes("..".as_ref());
        charge(bytes, charged)?;
        for e in std::fs::read_dir(Layer::proc_path(&fd)).map_err(errno)? {
            let e = e.map_err(errno)?;
            bytes += entry_bytes(&e.file_name());
            charge(bytes, charged)?;
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                Ok(t) if t.is_symlink() => FileType::Symlink,
                Ok(t) if t.is_fifo() => FileType::NamedPipe,
                Ok(t) if t.is_socket() => FileType::Socket,
                Ok(t) if t.is_char_device() => FileType::CharDevice,
                Ok(t) if t.is_block_device() => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            list.push((self.ino(live, e.ino()), kind, e.file_name()));
        }
        // What is charged is what is kept: not the vector's spare room.
        list.shrink_to_fit();
        Ok((list, bytes))
    }

    /// The descriptor comes back with the path: the path is good only
    /// while it is open.
    fn xattr_target(
        &self,
        live: &Live,
        ino: u64,
        otherwise: Errno,
    ) -> Result<(Arc<std::os::fd::OwnedFd>, PathBuf), Errno> {
        let fd = self.fd(live, ino)?;
        let kind = rustix::fs::fstat(&*fd).map_err(rerr)?.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            return Err(otherwise);
        }
        let at = Layer::proc_path(&fd);
        Ok((fd, at))
    }
}

impl Filesystem for Layer {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Shared mappings of direct-I/O files (kernel 6.6+): programs that
        // mmap their files work; those pages are dropped at every cut.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.set_max_write(super::MAX_WRITE);
        // A workload's asynchronous direct I/O (several requests in
        // flight) reaches the workers in parallel.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1
            && let Some(i) = wipe_of_name(name)
            && from_us(req.pid())
        {
            reply.entry(&TTL, &wipe_attr(i), Generation(0));
            return;
        }
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
        req: &Request,
        ino: INodeNo,
        fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        if let Some(i) = wipe_of_ino(ino.0) {
            reply.attr(&TTL, &wipe_attr(i));
            return;
        }
        if ino.0 == 1
            && self
                .live
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
            && from_us(req.pid())
        {
            // The daemon's way to the wipe file while cut: the kernel
            // checks the root's permissions first.
            reply.attr(&TTL, &cut_root_attr());
            return;
        }
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
                    // Before 1970 too (an archive's old files).
                    Some(fuser::TimeOrNow::SpecificTime(t)) => setattr_timespec(t),
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
                // Setgid comes from the parent.
                set_made_mode(&p, name, libc::S_IFDIR, want, libc::S_ISGID)?;
            }
            self.entry(live, &p, name)
        }) {
            Ok((a, g)) => reply.entry(&TTL, &a, Generation(g)),
            Err(e) => reply.error(e),
        }
    }

    /// FIFOs and sockets' names (a workload's `mkfifo`, a program
    /// binding its UNIX socket in the data); once made, the kernel serves
    /// them itself. No device (a workload has no business making one, and
    /// the data is mounted `nodev`); regular files come through `create`.
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = mode & libc::S_IFMT;
        let ftype = match kind {
            libc::S_IFIFO => rustix::fs::FileType::Fifo,
            libc::S_IFSOCK => rustix::fs::FileType::Socket,
            _ => return reply.error(Errno::EPERM),
        };
        match self.with_live(|live| {
            let p = self.fd(live, parent.0)?;
            let want = mode & !umask & 0o7777;
            {
                let _me = Layer::as_caller(req)?;
                rustix::fs::mknodat(&*p, name, ftype, Mode::from_raw_mode(want), 0)
                    .map_err(rerr)?;
                set_made_mode(&p, name, kind, want, 0)?;
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

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if wipe_of_ino(ino.0).is_some() {
            if from_us(req.pid()) {
                // Parallel: the workers hold the writes until all have one.
                reply.opened(
                    fuser::FileHandle(WIPE_FH),
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
                );
            } else {
                reply.error(Errno::EACCES);
            }
            return;
        }
        // O_DIRECT too: a workload's direct I/O stays direct below (same
        // path, same alignment rules as on the mount, and none of its
        // data in the page cache of the data's files).
        let keep = libc::O_ACCMODE
            | libc::O_APPEND
            | libc::O_SYNC
            | libc::O_DSYNC
            | libc::O_NOATIME
            | libc::O_DIRECT;
        let flags = flags.0 & keep;
        // Counted before the open, given back if it fails.
        let uid = req.uid();
        if let Err(e) = self.lock_maps().take_file(&self.caps, uid) {
            reply.error(e);
            return;
        }
        match self.with_live(|live| {
            let handle = if ino.0 == 1 {
                FileHandle::of(live.root.as_fd(), Path::new("")).map_err(errno)?
            } else {
                let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
                maps.nodes.get(&ino.0).ok_or(Errno::ESTALE)?.handle.clone()
            };
            let file = File::from(open_served(&handle, live.root.as_fd(), flags).map_err(errno)?);
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.next_fh += 1;
            let fh = maps.next_fh;
            maps.files.insert(
                fh,
                Open {
                    handle,
                    uid,
                    flags,
                    file: Some(Arc::new(file)),
                    lost: false,
                },
            );
            Ok(fh)
        }) {
            Ok(fh) => reply.opened(fuser::FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => {
                self.lock_maps().give_file(uid);
                reply.error(e);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        // Each worker reads into its own buffer, reused (an allocation per
        // request cost more than the copy: zeroed, then wiped when freed),
        // and wiped when the worker ends.
        VIEW_BUF.with_borrow_mut(|buf| {
            let size = size as usize;
            match self.with_live(|live| {
                let (f, _) = self.file_now(live, fh.0, (flags.0, libc::O_DIRECT))?;
                let at = aligned(buf, size);
                let buf = &mut buf[at..at + size];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            // What was read before the error is plaintext
                            // too.
                            zeroize::Zeroize::zeroize(&mut buf[..got]);
                            return Err(errno(e));
                        }
                    }
                }
                Ok((at, got))
            }) {
                Ok((at, n)) => {
                    reply.data(&buf[at..at + n]);
                    // The layer's workers live as long as the daemon: no
                    // plaintext may wait in their buffers for the next
                    // request (or past a close).
                    zeroize::Zeroize::zeroize(&mut buf[at..at + n]);
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        now: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        if fh.0 == WIPE_FH {
            // The kernel copied this write's zeroes over what earlier
            // requests left in this worker's buffer; holding the worker
            // until all have one makes each take exactly one.
            if self.wipe.meet() {
                reply.written(u32::try_from(data.len()).unwrap_or(0));
            } else {
                reply.error(Errno::ETIMEDOUT);
            }
            return;
        }
        match self.with_live(|live| {
            // A writeback of a shared mapping's pages carries no file
            // flags (page-sized and aligned: the descriptor as opened).
            let (f, flags) = if write_flags.contains(fuser::WriteFlags::FUSE_WRITE_CACHE) {
                // At its page's offset, never at the end.
                let (_, opened) = self.file_and_flags(fh.0)?;
                self.file_now(live, fh.0, (opened & !libc::O_APPEND, libc::O_APPEND))?
            } else {
                let (f, flags) =
                    self.file_now(live, fh.0, (now.0, libc::O_DIRECT | libc::O_APPEND))?;
                // The file is written by the daemon, which keeps the bits
                // a write by its caller would have cleared.
                if req.uid() != 0 {
                    kill_suid_sgid(&f)?;
                }
                (f, flags)
            };
            if flags & libc::O_DIRECT != 0 && !data.as_ptr().addr().is_multiple_of(DIRECT_ALIGN) {
                // Direct I/O wants an aligned buffer; the request's data
                // sits after its headers in the library's buffer, which
                // our allocator places so that it lands on a page
                // (`coffre_sys::alloc::FUSE_REQUEST_BUFFER`). Where it does
                // not (another allocator), through an aligned copy.
                COPIED_DIRECT_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                VIEW_BUF
                    .with_borrow_mut(|buf| {
                        let at = aligned(buf, data.len());
                        buf[at..at + data.len()].copy_from_slice(data);
                        let r = f.write_all_at(&buf[at..at + data.len()], offset);
                        // As for reads: nothing left behind.
                        zeroize::Zeroize::zeroize(&mut buf[at..at + data.len()]);
                        r
                    })
                    .map_err(errno)?;
            } else {
                f.write_all_at(data, offset).map_err(errno)?;
            }
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    /// Preallocation, hole punching and zeroing, done by the filesystem
    /// below on the workload's file (the kernel passes on the modes FUSE
    /// knows: keep size, punch hole, zero range). Without it, databases
    /// and disk images lost their preallocation, and `posix_fallocate`
    /// fell back to writing zeroes block by block.
    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.with_live(|_| {
            let f = self.file(fh.0)?;
            let mode = rustix::fs::FallocateFlags::from_bits_retain(mode.cast_unsigned());
            rustix::fs::fallocate(f.as_fd(), mode, offset, length).map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// `SEEK_DATA` and `SEEK_HOLE` (the kernel answers the other kinds
    /// itself), from the file below: sparse files stay sparse through
    /// `cp`, `tar` and disk-image tools.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.with_live(|_| {
            let f = self.file(fh.0)?;
            let from = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let to = match whence {
                libc::SEEK_DATA => rustix::fs::SeekFrom::Data(from),
                libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(from),
                _ => return Err(Errno::EINVAL),
            };
            // Only the result matters: reads and writes are positional,
            // so the descriptor's own offset is nobody's.
            let at = rustix::fs::seek(f.as_fd(), to).map_err(rerr)?;
            i64::try_from(at).map_err(|_| Errno::EOVERFLOW)
        }) {
            Ok(at) => reply.offset(at),
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
        let mut maps = self.lock_maps();
        if let Some(open) = maps.files.remove(&fh.0) {
            maps.give_file(open.uid);
        }
        drop(maps);
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

    /// A directory's `fsync` reaches the ext4 below (the names made,
    /// renamed or removed in it made durable, as databases and `rename`
    /// dances expect); without it, FUSE answers success and syncs
    /// nothing.
    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: fuser::FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with_live(|live| {
            let fd = self.fd(live, ino.0)?;
            let dir = rustix::fs::open(
                Layer::proc_path(&fd),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(rerr)?;
            if datasync {
                rustix::fs::fdatasync(&dir)
            } else {
                rustix::fs::fsync(&dir)
            }
            .map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Extended attributes of the `user.` namespace, read as the caller
    /// (ext4 checks its right to read the file). Other namespaces read as
    /// absent: `trusted.` needs a privilege the daemon has and the caller
    /// has not, `security.` and POSIX ACLs (`system.`) are not served
    /// through the view (its permission checks are the mode's, and the
    /// ext4 below enforces an ACL anyway).
    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !user_xattr(name) {
            return reply.error(Errno::NO_XATTR);
        }
        match self.with_live(|live| {
            let (_fd, at) = self.xattr_target(live, ino.0, Errno::NO_XATTR)?;
            let _me = Layer::as_caller(req)?;
            if size == 0 {
                return rustix::fs::getxattr_query(&at, name)
                    .map(XattrAnswer::Size)
                    .map_err(rerr);
            }
            let mut value = vec![0u8; (size as usize).min(XATTR_SIZE_MAX)];
            let n = rustix::fs::getxattr(&at, name, &mut value[..]).map_err(rerr)?;
            value.truncate(n);
            Ok(XattrAnswer::Data(value))
        }) {
            Ok(a) => a.send(reply),
            Err(e) => reply.error(e),
        }
    }

    /// The names of the `user.` extended attributes (the others are not
    /// served, see `getxattr`).
    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.with_live(|live| {
            let Ok((_fd, at)) = self.xattr_target(live, ino.0, Errno::NO_XATTR) else {
                return Ok(Vec::new());
            };
            let _me = Layer::as_caller(req)?;
            let mut all = vec![0u8; rustix::fs::listxattr_query(&at).map_err(rerr)?];
            let n = rustix::fs::listxattr(&at, &mut all[..]).map_err(rerr)?;
            all.truncate(n);
            Ok(all
                .split_inclusive(|b| *b == 0)
                .filter(|n| n.starts_with(b"user."))
                .flatten()
                .copied()
                .collect::<Vec<u8>>())
        }) {
            Ok(list) if size == 0 => reply.size(u32::try_from(list.len()).unwrap_or(u32::MAX)),
            Ok(list) if list.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(list) => reply.data(&list),
            Err(e) => reply.error(e),
        }
    }

    /// Sets a `user.` extended attribute as the caller (ext4 checks its
    /// right to write the file, and the sticky directory rule); any
    /// other namespace is refused (`EOPNOTSUPP`).
    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !user_xattr(name) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.with_live(|live| {
            let (_fd, at) = self.xattr_target(live, ino.0, Errno::EPERM)?;
            let flags =
                rustix::fs::XattrFlags::from_bits(flags.cast_unsigned()).ok_or(Errno::EINVAL)?;
            let _me = Layer::as_caller(req)?;
            rustix::fs::setxattr(&at, name, value, flags).map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Removes a `user.` extended attribute as the caller.
    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !user_xattr(name) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.with_live(|live| {
            let (_fd, at) = self.xattr_target(live, ino.0, Errno::EPERM)?;
            let _me = Layer::as_caller(req)?;
            rustix::fs::removexattr(&at, name).map_err(rerr)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is read at once: no directory stays open on the
        // mount between calls. Within the caller's room for listings.
        let uid = req.uid();
        match self.with_live(|live| {
            let (list, bytes) = self.listing(live, ino.0, uid)?;
            let mut maps = self.lock_maps();
            maps.next_fh += 1;
            let fh = maps.next_fh;
            maps.dirs.insert(
                fh,
                Dir {
                    list,
                    served: false,
                    uid,
                    bytes,
                },
            );
            Ok(fh)
        }) {
            Ok(fh) => reply.opened(fuser::FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // One look at the layer for the whole call: a cut cannot land
        // between a listing's refresh and its serving. Only while live: a
        // listing read before a cut is not served after it (its names are
        // the data's).
        let guard = self.live.read().unwrap_or_else(|p| p.into_inner());
        let Some(live) = guard.as_ref() else {
            reply.error(Errno::EIO);
            return;
        };
        let (again, stale) = {
            let maps = self.lock_maps();
            (
                // From the start again (`rewinddir`): the directory as it
                // is now, within its owner's room (giving back what it
                // takes now).
                match maps.dirs.get(&fh.0) {
                    Some(d) if offset == 0 && d.served => Some(d.uid),
                    _ => None,
                },
                maps.stale_dirs.contains(&fh.0),
            )
        };
        if stale && offset > 0 {
            // Cut while it was read: what is left would seem the end.
            reply.error(Errno::EIO);
            return;
        }
        if let Some(uid) = again {
            // The old listing goes first (as at a cut: the handle is stale
            // until the new one is in), so that a large directory can be
            // read again within its owner's room.
            let old = {
                let mut maps = self.lock_maps();
                let old = maps.dirs.get_mut(&fh.0).map(|d| {
                    let had = std::mem::replace(&mut d.bytes, DIR_BYTES);
                    (std::mem::take(&mut d.list), had)
                });
                if let Some((_, had)) = &old {
                    let _ = maps.charge_listing(&self.caps, uid, *had, DIR_BYTES);
                    maps.stale_dirs.insert(fh.0);
                }
                old
            };
            // Freed outside the lock (it may be large).
            drop(old);
            match self.listing(live, ino.0, uid) {
                Ok((list, bytes)) => {
                    let mut maps = self.lock_maps();
                    // Charged apart: what the handle held (or, released
                    // meanwhile, the new listing) goes.
                    let had = match maps.dirs.get_mut(&fh.0) {
                        Some(d) => {
                            let had = d.bytes;
                            (d.list, d.bytes) = (list, bytes);
                            had
                        }
                        None => bytes,
                    };
                    let _ = maps.charge_listing(&self.caps, uid, had, 0);
                    maps.stale_dirs.remove(&fh.0);
                }
                Err(e) => return reply.error(e),
            }
        }
        let mut maps = self.lock_maps();
        if offset > 0 && maps.stale_dirs.contains(&fh.0) {
            // Emptied since the look above (a rewind beside this read).
            reply.error(Errno::EIO);
            return;
        }
        let Some(d) = maps.dirs.get_mut(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        if offset == 0 {
            d.served = true;
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in d.list.iter().enumerate().skip(start) {
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
        let mut maps = self.lock_maps();
        if let Some(d) = maps.dirs.remove(&fh.0) {
            let _ = maps.charge_listing(&self.caps, d.uid, d.bytes, 0);
        }
        maps.stale_dirs.remove(&fh.0);
        drop(maps);
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
        // O_DIRECT kept, as in open.
        let keep = libc::O_ACCMODE
            | libc::O_APPEND
            | libc::O_SYNC
            | libc::O_DSYNC
            | libc::O_TRUNC
            | libc::O_DIRECT;
        // Counted before the file is made, given back if this fails.
        let uid = req.uid();
        if let Err(e) = self.lock_maps().take_file(&self.caps, uid) {
            reply.error(e);
            return;
        }
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
                    uid,
                    flags: flags
                        & (libc::O_ACCMODE
                            | libc::O_APPEND
                            | libc::O_SYNC
                            | libc::O_DSYNC
                            | libc::O_DIRECT),
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
            Err(e) => {
                self.lock_maps().give_file(uid);
                reply.error(e);
            }
        }
    }
}

//! The layer's state: which inodes and open files it knows, by file handle,
//! and the mount it passes through to while live (none while cut); with
//! the helpers that resolve them and the caller's credentials.

use coffre_sys::handle::FileHandle;
use fuser::{Errno, FileAttr, FileType, INodeNo, Request};
use rustix::fs::{Mode, OFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(super) const TTL: Duration = Duration::ZERO;

pub(super) struct Node {
    pub(super) handle: FileHandle,
    pub(super) lookups: u64,
}

pub(super) struct Open {
    pub(super) handle: FileHandle,
    /// Whose it is (counted in their [`Held`]).
    pub(super) uid: u32,
    pub(super) flags: i32,
    /// `None` while cut, or when it could not be reopened (`lost`).
    pub(super) file: Option<Arc<File>>,
    pub(super) lost: bool,
}

/// A directory's entries: inode, type, name.
pub(super) type Listing = Vec<(u64, FileType, std::ffi::OsString)>;

/// What one entry of a [`Listing`] takes of the daemon's memory, about:
/// the tuple, the name, the allocator's rounding.
pub(super) fn entry_bytes(name: &OsStr) -> usize {
    std::mem::size_of::<(u64, FileType, std::ffi::OsString)>() + name.len() + 16
}

/// What an open directory takes besides its entries (its place in the map).
pub(super) const DIR_BYTES: usize = 128;

/// What a listing being read is charged ahead of its entries, a step at
/// a time (so that listings read at once by several workers count
/// against the caps as they grow, not once each is whole).
pub(super) const LISTING_STEP: usize = 64 << 10;

/// An open directory: its listing, read at the open.
pub(super) struct Dir {
    pub(super) list: Listing,
    /// Served from its start already (a read from the start again, after
    /// `rewinddir`, reads the directory again).
    pub(super) served: bool,
    /// Whose it is, and what it is charged to them (entries and
    /// [`DIR_BYTES`]).
    pub(super) uid: u32,
    pub(super) bytes: usize,
}

/// How much of the daemon the layer lets its clients take. The layer runs
/// in the daemon, so every file a workload opens through it is one of the
/// daemon's descriptors, and every open directory's listing is in the
/// daemon's memory (charged to no workload's cgroup): without caps one
/// workload user could leave the daemon no descriptor to answer a member,
/// write the audit log or close the vault. Each user (the uid a request
/// carries) is capped, and so are all of them together; past a cap an open
/// fails with `EMFILE` (the user's cap) or `ENFILE` (everyone's), an
/// `opendir` with `ENOMEM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Files one user may hold open through the layer.
    pub files_per_user: usize,
    /// Files all users together may hold open.
    pub files: usize,
    /// Bytes of directory listings one user's open directories may take.
    pub listing_bytes_per_user: usize,
    /// Bytes of listings all open directories together may take.
    pub listing_bytes: usize,
}

impl Caps {
    /// Caps for this process: half its descriptors (`RLIMIT_NOFILE`, the
    /// soft limit) for workloads' files, a quarter of that for one user
    /// (at most 16384); 512 MiB of listings, 128 MiB for one user (about
    /// two million names: a larger directory cannot be listed through the
    /// view).
    pub fn for_this_process() -> Caps {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let files = usize::try_from(soft / 2).unwrap_or(usize::MAX).max(64);
        Caps {
            files_per_user: (files / 4).clamp(16, 16384),
            files,
            listing_bytes_per_user: 128 << 20,
            listing_bytes: 512 << 20,
        }
    }
}

/// What one user holds in the layer, or all of them together.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) files: usize,
    pub(super) listing_bytes: usize,
}

#[derive(Default)]
pub(super) struct Maps {
    pub(super) nodes: HashMap<u64, Node>,
    pub(super) files: HashMap<u64, Open>,
    /// Each open directory's listing, and whether it was served from its
    /// start already (a read from the start again, after `rewinddir`,
    /// reads the directory again).
    pub(super) dirs: HashMap<u64, Dir>,
    /// Open directories whose listing a cut emptied: only a read from the
    /// start reads them again (read on, they would seem to end early).
    pub(super) stale_dirs: std::collections::HashSet<u64>,
    pub(super) next_fh: u64,
    /// What each user holds (no entry for one who holds nothing), and all
    /// of them together.
    pub(super) held: HashMap<u32, Held>,
    pub(super) total: Held,
}

impl Maps {
    /// Counts one more open file for `uid`, if the caps allow it.
    pub(super) fn take_file(&mut self, caps: &Caps, uid: u32) -> Result<(), Errno> {
        let mine = self.held.get(&uid).copied().unwrap_or_default();
        if mine.files >= caps.files_per_user {
            return Err(Errno::EMFILE);
        }
        if self.total.files >= caps.files {
            return Err(Errno::ENFILE);
        }
        self.held.entry(uid).or_default().files += 1;
        self.total.files += 1;
        Ok(())
    }

    /// Counts one open file of `uid`'s less.
    pub(super) fn give_file(&mut self, uid: u32) {
        self.total.files = self.total.files.saturating_sub(1);
        self.give(uid, |h| h.files = h.files.saturating_sub(1));
    }

    /// How many bytes a listing of `uid`'s may take, giving back the
    /// `had` it takes now.
    pub(super) fn listing_room(&self, caps: &Caps, uid: u32, had: usize) -> usize {
        let mine = self.held.get(&uid).map_or(0, |h| h.listing_bytes);
        let user = caps
            .listing_bytes_per_user
            .saturating_sub(mine.saturating_sub(had));
        let all = caps
            .listing_bytes
            .saturating_sub(self.total.listing_bytes.saturating_sub(had));
        user.min(all)
    }

    /// Charges `uid` with `now` bytes of listings where it had `had`.
    /// Within the room [`Maps::listing_room`] gave, checked again: another
    /// open may have taken some since.
    pub(super) fn charge_listing(
        &mut self,
        caps: &Caps,
        uid: u32,
        had: usize,
        now: usize,
    ) -> Result<(), Errno> {
        if now > had && now > self.listing_room(caps, uid, had) {
            return Err(Errno::ENOMEM);
        }
        self.total.listing_bytes = (self.total.listing_bytes + now).saturating_sub(had);
        self.held.entry(uid).or_default();
        self.give(uid, |h| {
            h.listing_bytes = (h.listing_bytes + now).saturating_sub(had)
        });
        Ok(())
    }

    fn give(&mut self, uid: u32, f: impl FnOnce(&mut Held)) {
        if let Some(h) = self.held.get_mut(&uid) {
            f(h);
            if *h == Held::default() {
                self.held.remove(&uid);
            }
        }
    }
}

/// The mount the layer passes through to, while live.
pub(super) struct Live {
    /// The mount's root, opened for reading: `open_by_handle_at` refuses
    /// an `O_PATH` descriptor as its mount.
    pub(super) root: Arc<OwnedFd>,
    pub(super) root_ino: u64,
}

pub(super) struct State {
    /// Requests hold it shared; cut and restore take it exclusively, so
    /// they wait for requests in flight.
    pub(super) live: RwLock<Option<Live>>,
    pub(super) maps: Mutex<Maps>,
    pub(super) caps: Caps,
    /// Where the workers meet to have their request buffers overwritten.
    pub(super) wipe: Wipe,
}

impl State {
    pub(super) fn lock_maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The layer's FUSE workers (each has its own request buffer).
pub(super) const WORKERS: usize = 4;

/// The names, in the layer's root, of the files whose writes overwrite
/// the workers' request buffers (one per worker, followed by its number:
/// a file each, so that no two writes wait on one inode's lock). Only the
/// daemon's own threads see them; for anyone else they pass through like
/// any other name.
pub(super) const WIPE_PREFIX: &str = ".coffre-wipe-request-buffers-";

/// The inode number of wipe file `i` (ext4's fit in 32 bits; 1 is the
/// root).
pub(super) fn wipe_ino(i: usize) -> u64 {
    u64::MAX - 1 - i as u64
}

/// Which wipe file `ino` is, if one.
pub(super) fn wipe_of_ino(ino: u64) -> Option<usize> {
    let i = usize::try_from((u64::MAX - 1).checked_sub(ino)?).ok()?;
    (i < WORKERS).then_some(i)
}

/// The name of wipe file `i`.
pub(super) fn wipe_name(i: usize) -> String {
    format!("{WIPE_PREFIX}{i}")
}

/// Which wipe file `name` names, if one.
pub(super) fn wipe_of_name(name: &OsStr) -> Option<usize> {
    let i: usize = name.to_str()?.strip_prefix(WIPE_PREFIX)?.parse().ok()?;
    (i < WORKERS && name.to_str() == Some(&wipe_name(i))).then_some(i)
}

/// Its file handle (ours count up from 1).
pub(super) const WIPE_FH: u64 = u64::MAX;

/// How long a worker holding a wipe write waits for the others (the
/// daemon waits twice as long for its writes).
pub(super) const WIPE_WAIT: Duration = Duration::from_secs(2);

/// The meeting point of the wipe writes: a worker that holds one waits
/// until every worker holds one, so each takes exactly one (a worker
/// cannot take a second request while it waits on the first).
#[derive(Default)]
pub(super) struct Wipe {
    /// Workers waiting, and how many meetings have completed.
    met: Mutex<(usize, u64)>,
    all_here: std::sync::Condvar,
    /// The threads that took a wipe write, in order (tests check that
    /// every worker takes one).
    #[cfg(test)]
    pub(super) takers: Mutex<Vec<std::thread::ThreadId>>,
}

impl Wipe {
    /// Waits for the other workers; false if they did not all come within
    /// [`WIPE_WAIT`] (one is busy elsewhere, or gone).
    pub(super) fn meet(&self) -> bool {
        #[cfg(test)]
        self.takers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::thread::current().id());
        let mut g = self.met.lock().unwrap_or_else(|p| p.into_inner());
        let round = g.1;
        g.0 += 1;
        if g.0 == WORKERS {
            *g = (0, round.wrapping_add(1));
            self.all_here.notify_all();
            return true;
        }
        let until = std::time::Instant::now() + WIPE_WAIT;
        while g.1 == round {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                g.0 -= 1;
                return false;
            }
            g = self
                .all_here
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Whether a request comes from one of this process's threads (the FUSE
/// header carries the thread's id, in the daemon's pid namespace).
pub(super) fn from_us(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/self/task/{pid}")).exists()
}

/// The root's attributes while cut, for the daemon's own threads.
pub(super) fn cut_root_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(1),
        size: 0,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        ..wipe_attr(0)
    }
}

/// Wipe file `i`'s attributes: write-only, root's, as long as a write
/// (the kernel takes the inode's lock exclusively for a write that would
/// extend a file).
pub(super) fn wipe_attr(i: usize) -> FileAttr {
    FileAttr {
        ino: INodeNo(wipe_ino(i)),
        size: super::MAX_WRITE.into(),
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o200,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The filesystem fuser owns; the daemon keeps the same state to cut it.
pub(super) struct Layer(pub(super) Arc<State>);

impl std::ops::Deref for Layer {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

/// Opens the file behind `handle` (beneath `root`) to serve a workload's
/// open with `flags`: without ever blocking (opened non-blocking, the flag
/// taken off again unless asked), and only a regular file or a directory.
/// The kernel opens FIFOs itself, never through the layer: an inode
/// number a FIFO took over between a lookup and this open is refused, not
/// opened as root to wait for a writer while holding the layer (a cut
/// would wait on it for ever).
pub(super) fn open_served(
    handle: &FileHandle,
    root: std::os::fd::BorrowedFd<'_>,
    flags: i32,
) -> std::io::Result<OwnedFd> {
    let fd = handle.open(root, flags | libc::O_NONBLOCK)?;
    let kind = rustix::fs::fstat(&fd)?.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
    }
    if flags & libc::O_NONBLOCK == 0 {
        let now = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, now - OFlags::NONBLOCK)?;
    }
    Ok(fd)
}

pub(super) fn errno(e: impl Into<std::io::Error>) -> Errno {
    Errno::from(e.into())
}

pub(super) fn rerr(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

pub(super) fn kind_of(mode: u32) -> FileType {
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

/// A `stat` time (seconds, possibly before 1970, and nanoseconds).
pub(super) fn time(s: i64, ns: u64) -> SystemTime {
    let ns = Duration::from_nanos(ns.min(999_999_999));
    let at = match u64::try_from(s) {
        Ok(s) => UNIX_EPOCH.checked_add(Duration::from_secs(s)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(s.unsigned_abs())),
    };
    at.and_then(|t| t.checked_add(ns)).unwrap_or(UNIX_EPOCH)
}

/// The `timespec` the kernel sent in a SETATTR, from the time fuser made
/// of it. Before 1970 fuser 0.18 makes `(sec, nsec)` into the epoch
/// minus `|sec|` minus `nsec` (its own "TODO") where it is `sec` plus
/// `nsec`: since `nsec` is below a second, the whole seconds and the
/// fraction of that distance are `|sec|` and `nsec`, which this takes
/// back (`times_before_1970_pass_through_the_view` pins it, and fails if
/// fuser changes).
pub(super) fn setattr_timespec(t: SystemTime) -> rustix::fs::Timespec {
    let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            i64::from(d.subsec_nanos()),
        ),
        Err(before) => {
            let d = before.duration();
            (
                -i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_nanos()),
            )
        }
    };
    rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

impl Layer {
    pub(super) fn ino(&self, live: &Live, st_ino: u64) -> u64 {
        if st_ino == live.root_ino { 1 } else { st_ino }
    }

    pub(super) fn attr(&self, live: &Live, st: &rustix::fs::Stat) -> FileAttr {
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
    pub(super) fn fd(&self, live: &Live, ino: u64) -> Result<Arc<OwnedFd>, Errno> {
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
    pub(super) fn entry(
        &self,
        live: &Live,
        parent: &OwnedFd,
        name: &OsStr,
    ) -> Result<(FileAttr, u64), Errno> {
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
    pub(super) fn node(&self, live: &Live, fd: OwnedFd) -> Result<(FileAttr, u64), Errno> {
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

    pub(super) fn with_live<T>(
        &self,
        f: impl FnOnce(&Live) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let g = self.live.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(live) => f(live),
            None => Err(Errno::EIO),
        }
    }

    pub(super) fn file(&self, fh: u64) -> Result<Arc<File>, Errno> {
        self.file_and_flags(fh).map(|(f, _)| f)
    }

    /// The open file and the flags it was opened with (`O_DIRECT` among
    /// them when the workload asked for it).
    pub(super) fn file_and_flags(&self, fh: u64) -> Result<(Arc<File>, i32), Errno> {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let open = maps.files.get(&fh).ok_or(Errno::EBADF)?;
        Ok((open.file.clone().ok_or(Errno::EIO)?, open.flags))
    }

    /// The file to serve a read or write of `fh` with, and its flags,
    /// given the flags the request carries (the file's flags now): a
    /// process may have turned `O_DIRECT` off with `fcntl` since its open
    /// (GNU dd does, for a last partial block), which the kernel does not
    /// tell the layer; then a descriptor opened again without it, for this
    /// request (the same file, by handle), or the write would fail with
    /// `EINVAL` where the mount accepts it. For writes `O_APPEND` too
    /// (`matters`): turned off since the open, or a writeback of a shared
    /// mapping's pages, must write where asked, and `pwrite` on a
    /// descriptor opened with it writes at the end whatever the offset.
    pub(super) fn file_now(
        &self,
        live: &Live,
        fh: u64,
        (now, matters): (i32, i32),
    ) -> Result<(Arc<File>, i32), Errno> {
        let (f, flags) = self.file_and_flags(fh)?;
        let off = flags & !now & matters;
        if off == 0 {
            return Ok((f, flags));
        }
        let handle = {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.files.get(&fh).ok_or(Errno::EBADF)?.handle.clone()
        };
        let now = flags & !off;
        let fd = open_served(&handle, live.root.as_fd(), now).map_err(errno)?;
        Ok((Arc::new(File::from(fd)), now))
    }

    /// This thread acts as the requesting process on the filesystem until
    /// the guard drops: the kernel checks its rights and makes new files
    /// its own (the directory's group when setgid), atomically.
    pub(super) fn as_caller(req: &Request) -> Result<coffre_sys::caller::AsCaller, Errno> {
        coffre_sys::caller::AsCaller::new(
            req.uid(),
            req.gid(),
            &caller_groups(req.pid(), req.uid(), req.gid()),
        )
        .map_err(errno)
    }

    pub(super) fn proc_path(fd: &OwnedFd) -> PathBuf {
        Layer::proc_path_of(fd)
    }

    pub(super) fn proc_path_of(fd: &impl std::os::fd::AsRawFd) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }
}

/// The supplementary groups of process `pid` (from `/proc/PID/status`);
/// none if it is gone.
pub(super) fn caller_groups(pid: u32, uid: u32, gid: u32) -> Vec<u32> {
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

#[cfg(test)]
mod wipe_names {
    use super::*;

    #[test]
    fn names_and_inodes_map_both_ways_and_nothing_else_matches() {
        for i in 0..WORKERS {
            assert_eq!(wipe_of_name(OsStr::new(&wipe_name(i))), Some(i));
            assert_eq!(wipe_of_ino(wipe_ino(i)), Some(i));
        }
        for other in [
            WIPE_PREFIX.to_string(),
            format!("{WIPE_PREFIX}{WORKERS}"),
            format!("{WIPE_PREFIX}01"),
            format!("{WIPE_PREFIX}+1"),
            format!("x{WIPE_PREFIX}0"),
        ] {
            assert_eq!(wipe_of_name(OsStr::new(&other)), None, "{other}");
        }
        for ino in [0, 1, u64::from(u32::MAX), u64::MAX, wipe_ino(WORKERS)] {
            assert_eq!(wipe_of_ino(ino), None, "{ino}");
        }
    }
}

//! The handle broker: the only part of the NFS service that may open a
//! file by handle.
//!
//! Opening a file by handle needs `CAP_DAC_READ_SEARCH`, and that
//! capability checks nothing of where the file lies: a server holding it
//! could open any file of the data by its inode number (an ext4 handle
//! with a zero generation skips even the generation check), whatever its
//! Landlock domain (this kernel checks such a "disconnected" file as if
//! it were at the mount's root). So the server that parses guests' bytes
//! holds neither the capability nor the handle key. A second process,
//! the broker, holds both, parses nothing of a guest's but a handle's
//! fixed layout, and does five things for the server over
//! `SOCK_SEQPACKET` pairs, each served by a thread of its own ([`Handles`]):
//!
//! - **root**: the export's root directory, `O_PATH`;
//! - **mint**: the NFS handle of a descriptor the server passes, which
//!   must lie beneath that export's root when it is asked (its path, and
//!   that path looked up again from the root). The server reaches files
//!   only by path beneath the shares' mounts (Landlock, no capability to
//!   get around it), and only a file of the export gets its handle;
//! - **open**: a handle's object, `O_PATH`, once its MAC checks out
//!   under the key and the export, on the data's filesystem, a directory
//!   only while it lies under the export's root;
//! - **read as owner**: knfsd's owner override for reading (a regular
//!   file of the export's user, opened read-only by the broker);
//! - **sync**: `fsync` of a directory or regular file the server changed
//!   (the user may write in a directory it cannot read).
//!
//! The broker is the process the daemon starts: it reads the daemon's
//! commands, keeps the key, and passes the rest on to the server, its
//! child ([`crate::control`]). [`Keeper`] is the broker's side; in a
//! test it also serves a [`crate::Server`] in the same process.
//!
//! Messages, at most [`MAX_MSG`] bytes, one descriptor at most each way:
//! request `[1: op][8: export tag][1: n][n: bytes]`, reply
//! `[4: status, BE][1: n][n: bytes]` (status 0 is success; otherwise an
//! NFSv3 status).

use crate::fs::{self, ExportSpec};
use crate::handle::{self, HandleError, HandleKey};
use crate::proto::status;
use coffre_sys::handle::FileHandle;
use rustix::fs::{Mode, OFlags, Stat};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, RwLock};

type Res = Result<(), u32>;

/// Largest message either way.
pub const MAX_MSG: usize = 1 + 8 + 1 + handle::MAX_FH;

/// What the server asks of the broker.
pub trait Handles: Send + Sync {
    /// The export's root directory (`O_PATH`).
    fn root(&self, tag: [u8; 8]) -> Result<OwnedFd, u32>;
    /// The NFS handle of `fd`, an object of the export `tag`.
    fn mint(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Result<Vec<u8>, u32>;
    /// The object behind the NFS handle `nfs` (`O_PATH`).
    fn open(&self, tag: [u8; 8], nfs: &[u8]) -> Result<OwnedFd, u32>;
    /// `fd` opened read-only by the broker, when it is a regular file of
    /// the export's user (knfsd's owner override).
    fn read_as_owner(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Result<OwnedFd, u32>;
    /// `fsync` of `fd` (a directory or a regular file; anything else is
    /// left).
    fn sync(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Res;
    /// The exports changed while open: what could not be opened
    /// (workload, why). The broker's side opens them before the server
    /// hears of it, so a [`Client`] has nothing to do.
    fn exports(&self, specs: &[ExportSpec]) -> Vec<(String, String)>;
}

/// The operations, on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// [`Handles::root`].
    Root = 1,
    /// [`Handles::mint`] (a descriptor comes with it).
    Mint = 2,
    /// [`Handles::open`].
    Open = 3,
    /// [`Handles::read_as_owner`] (a descriptor comes with it).
    ReadAsOwner = 4,
    /// [`Handles::sync`] (a descriptor comes with it).
    Sync = 5,
}

impl Op {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Root,
            2 => Self::Mint,
            3 => Self::Open,
            4 => Self::ReadAsOwner,
            5 => Self::Sync,
            _ => return None,
        })
    }

    /// Whether the request carries a descriptor.
    pub fn takes_fd(self) -> bool {
        matches!(self, Self::Mint | Self::ReadAsOwner | Self::Sync)
    }
}

/// A request, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// What is asked.
    pub op: Op,
    /// Of which export.
    pub tag: [u8; 8],
    /// The handle, for [`Op::Open`]; empty otherwise.
    pub bytes: &'a [u8],
}

/// Parses a request's bytes (from the server: a server taken over sends
/// anything). `None` for anything but the exact layout.
pub fn parse_request(msg: &[u8]) -> Option<Request<'_>> {
    let (&op, rest) = msg.split_first()?;
    let op = Op::from_u8(op)?;
    let tag: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let (&n, bytes) = rest.get(8..)?.split_first()?;
    let n = usize::from(n);
    if n > handle::MAX_FH || bytes.len() != n || (op != Op::Open && n != 0) {
        return None;
    }
    Some(Request { op, tag, bytes })
}

/// A request's bytes.
pub fn encode_request(op: Op, tag: [u8; 8], bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(10 + bytes.len());
    m.push(op as u8);
    m.extend_from_slice(&tag);
    m.push(u8::try_from(bytes.len()).unwrap_or(0));
    m.extend_from_slice(bytes);
    m
}

/// Parses a reply: its status and bytes.
pub fn parse_reply(msg: &[u8]) -> Option<(u32, &[u8])> {
    let st = u32::from_be_bytes(msg.get(..4)?.try_into().ok()?);
    let (&n, bytes) = msg.get(4..)?.split_first()?;
    if usize::from(n) != bytes.len() || bytes.len() > handle::MAX_FH {
        return None;
    }
    Some((st, bytes))
}

/// A reply's bytes.
pub fn encode_reply(st: u32, bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(5 + bytes.len());
    m.extend_from_slice(&st.to_be_bytes());
    m.push(u8::try_from(bytes.len()).unwrap_or(0));
    m.extend_from_slice(bytes);
    m
}

/// Sends one message, with `fd` when given.
fn send(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for the descriptor"));
        }
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != msg.len() {
        return Err(io::Error::other("a short message"));
    }
    Ok(())
}

/// Receives one message into `buf`: its length (0 at the end) and the
/// descriptor that came with it. More than one descriptor, or a message
/// cut short, is an error (and what came is closed).
fn recv(sock: BorrowedFd<'_>, buf: &mut [u8; MAX_MSG + 1]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(f) = m {
            fds.extend(f);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) || fds.len() > 1 {
        return Err(io::Error::other("more than one descriptor"));
    }
    if got.bytes > MAX_MSG || got.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(io::Error::other("a message too long"));
    }
    Ok((got.bytes, fds.pop()))
}

/// One export's root, on the broker's side.
struct Root {
    /// Open for reading (`open_by_handle_at` needs a real descriptor).
    fd: OwnedFd,
    /// Its path, as the kernel names it (`/proc/self/fd`).
    path: Vec<u8>,
    dev: u64,
    ino: u64,
    /// The export's user.
    uid: u32,
}

/// The broker's side: the key and the exports' roots. Held only while
/// the vault is open.
pub struct Keeper {
    key: HandleKey,
    roots: RwLock<HashMap<[u8; 8], Root>>,
}

impl Keeper {
    /// Opens the exports' roots; returns the keeper and the exports that
    /// could not be opened (workload, why).
    pub fn open(key: HandleKey, specs: &[ExportSpec]) -> (Self, Vec<(String, String)>) {
        let k = Self {
            key,
            roots: RwLock::new(HashMap::new()),
        };
        let failed = k.exports(specs);
        (k, failed)
    }

    fn with_root<T>(
        &self,
        tag: [u8; 8],
        f: impl FnOnce(&Root) -> Result<T, u32>,
    ) -> Result<T, u32> {
        let roots = self.roots.read().unwrap_or_else(|p| p.into_inner());
        f(roots.get(&tag).ok_or(status::STALE)?)
    }
}

fn fstat(fd: BorrowedFd<'_>) -> Result<Stat, u32> {
    rustix::fs::fstat(fd).map_err(|e| crate::proto::from_errno(&io::Error::from(e)))
}

fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd, u32> {
    use std::os::fd::AsRawFd;
    rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| crate::proto::from_errno(&io::Error::from(e)))
}

fn is_type(st: &Stat, t: u32) -> bool {
    st.st_mode & libc::S_IFMT == t
}

/// The path the kernel gives a descriptor (`/proc/self/fd/N`).
fn fd_path(fd: BorrowedFd<'_>) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
        .map(|p| p.as_os_str().as_bytes().to_vec())
}

/// Whether `fd` lies beneath the root now: its path starts with the
/// root's, and that path, looked up again from the root (never leaving
/// it, no link, no other mount), is the same inode.
fn beneath(root: &Root, fd: BorrowedFd<'_>) -> Result<bool, u32> {
    let st = fstat(fd)?;
    if st.st_dev != root.dev {
        return Ok(false);
    }
    if st.st_ino == root.ino {
        return Ok(true);
    }
    let Some(p) = fd_path(fd) else {
        return Ok(false);
    };
    let Some(rel) = p
        .strip_prefix(root.path.as_slice())
        .and_then(|r| r.strip_prefix(b"/"))
        .filter(|r| !r.is_empty() && !root.path.is_empty())
    else {
        return Ok(false);
    };
    let Ok(again) = rustix::fs::openat2(
        &root.fd,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        rustix::fs::ResolveFlags::BENEATH
            | rustix::fs::ResolveFlags::NO_SYMLINKS
            | rustix::fs::ResolveFlags::NO_XDEV,
    ) else {
        return Ok(false);
    };
    let a = fstat(again.as_fd())?;
    Ok(a.st_dev == st.st_dev && a.st_ino == st.st_ino)
}

/// Whether a directory lies under the root (a directory moved out of
/// the share by someone else is no longer served). Walks `..`, by the
/// broker's own right to search.
fn under(root: &Root, dir: BorrowedFd<'_>, st: &Stat) -> bool {
    let is_root = |s: &Stat| s.st_dev == root.dev && s.st_ino == root.ino;
    if is_root(st) {
        return true;
    }
    let up = |d: BorrowedFd<'_>| {
        rustix::fs::openat(
            d,
            c"..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let Ok(mut cur) = up(dir) else { return false };
    for _ in 0..4096 {
        let Ok(st) = rustix::fs::fstat(&cur) else {
            return false;
        };
        if is_root(&st) {
            return true;
        }
        let Ok(next) = up(cur.as_fd()) else {
            return false;
        };
        let Ok(nst) = rustix::fs::fstat(&next) else {
            return false;
        };
        if nst.st_ino == st.st_ino && nst.st_dev == st.st_dev {
            return false; // the filesystem's root, and not ours
        }
        cur = next;
    }
    false
}

impl Handles for Keeper {
    fn root(&self, tag: [u8; 8]) -> Result<OwnedFd, u32> {
        self.with_root(tag, |r| {
            rustix::fs::openat(
                &r.fd,
                c".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|_| status::SERVERFAULT)
        })
    }

    fn mint(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Result<Vec<u8>, u32> {
        self.with_root(tag, |r| {
            // Only what lies beneath that export's root now: the server's
            // other descriptors (its log, its sockets) and files of
            // another export, or moved out of this one, get no handle.
            if !beneath(r, fd)? {
                // On the data but not beneath the root now (renamed away
                // since the server found it): STALE, which a client
                // looks up again; anything else is no file of ours.
                return Err(if fstat(fd)?.st_dev == r.dev {
                    status::STALE
                } else {
                    status::SERVERFAULT
                });
            }
            let fh =
                FileHandle::of(fd, std::path::Path::new("")).map_err(|_| status::SERVERFAULT)?;
            handle::encode(&self.key, tag, &fh).ok_or(status::SERVERFAULT)
        })
    }

    fn open(&self, tag: [u8; 8], nfs: &[u8]) -> Result<OwnedFd, u32> {
        let fh = handle::decode(&self.key, tag, nfs).map_err(|e| match e {
            HandleError::Bad => status::BADHANDLE,
            HandleError::OtherExport => status::STALE,
        })?;
        self.with_root(tag, |r| {
            let fd = fh
                .open(r.fd.as_fd(), libc::O_PATH | libc::O_NOFOLLOW)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ESTALE | libc::ENOENT) => status::STALE,
                    _ => crate::proto::from_errno(&e),
                })?;
            let st = fstat(fd.as_fd())?;
            if st.st_dev != r.dev || (is_type(&st, libc::S_IFDIR) && !under(r, fd.as_fd(), &st)) {
                return Err(status::STALE);
            }
            Ok(fd)
        })
    }

    fn read_as_owner(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Result<OwnedFd, u32> {
        self.with_root(tag, |r| {
            let st = fstat(fd)?;
            if st.st_dev != r.dev || st.st_uid != r.uid || !is_type(&st, libc::S_IFREG) {
                return Err(status::ACCES);
            }
            // Never waits (a lease the server took as the owner would
            // hold the broker, and a close behind it): JUKEBOX, retried.
            use std::os::fd::AsRawFd;
            rustix::fs::open(
                format!("/proc/self/fd/{}", fd.as_raw_fd()),
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                rustix::io::Errno::AGAIN => status::JUKEBOX,
                e => crate::proto::from_errno(&io::Error::from(e)),
            })
        })
    }

    fn sync(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Res {
        self.with_root(tag, |r| {
            let st = fstat(fd)?;
            if st.st_dev != r.dev {
                return Err(status::SERVERFAULT);
            }
            let flags = if is_type(&st, libc::S_IFDIR) {
                OFlags::RDONLY | OFlags::DIRECTORY
            } else if is_type(&st, libc::S_IFREG) {
                OFlags::RDONLY | OFlags::NONBLOCK
            } else {
                return Ok(());
            };
            let f = reopen(fd, flags)?;
            rustix::fs::fsync(&f).map_err(|e| crate::proto::from_errno(&io::Error::from(e)))
        })
    }

    fn exports(&self, specs: &[ExportSpec]) -> Vec<(String, String)> {
        let mut roots = HashMap::new();
        let mut failed = Vec::new();
        for s in specs {
            match fs::open_root(s) {
                Ok(fd) => match rustix::fs::fstat(&fd) {
                    Ok(st) => {
                        roots.insert(
                            handle::export_tag(&s.workload, &s.share),
                            Root {
                                path: fd_path(fd.as_fd()).unwrap_or_default(),
                                fd,
                                dev: st.st_dev,
                                ino: st.st_ino,
                                uid: s.uid,
                            },
                        );
                    }
                    Err(e) => failed.push((s.workload.clone(), e.to_string())),
                },
                Err(e) => failed.push((s.workload.clone(), e.to_string())),
            }
        }
        *self.roots.write().unwrap_or_else(|p| p.into_inner()) = roots;
        failed
    }
}

/// The server's side: asks the broker over its socket, one request at a
/// time.
/// Several connections, each served by a thread of the broker, so that
/// one slow request (an `fsync` of a directory) does not hold the
/// others' calls.
pub struct Client {
    socks: Vec<Mutex<OwnedFd>>,
    next: std::sync::atomic::AtomicUsize,
    /// The broker's threads, when they are in this process
    /// ([`on_a_thread`]): joined when the client is dropped.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Client {
    /// Hangs up, then waits for the broker's threads of this process, if
    /// any: once dropped, no descriptor of theirs (the exports' roots)
    /// is left on the data, which may then be unmounted at once.
    fn drop(&mut self) {
        self.socks.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How many connections the server has to its broker.
pub const CONNECTIONS: usize = 4;

impl Client {
    /// The server's ends of the pairs (at least one).
    pub fn new(socks: Vec<OwnedFd>) -> Self {
        Self {
            socks: socks.into_iter().map(Mutex::new).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
            threads: Vec::new(),
        }
    }

    /// A connection no other call is using, or (all busy) the next one
    /// in turn.
    fn connection(&self) -> Option<std::sync::MutexGuard<'_, OwnedFd>> {
        let n = self.socks.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..n {
            if let Ok(g) = self.socks[(start + i) % n].try_lock() {
                return Some(g);
            }
        }
        self.socks
            .get(start % n.max(1))
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn ask(
        &self,
        op: Op,
        tag: [u8; 8],
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Vec<u8>, Option<OwnedFd>), u32> {
        let sock = self.connection().ok_or(status::SERVERFAULT)?;
        send(sock.as_fd(), &encode_request(op, tag, bytes), fd).map_err(|_| status::SERVERFAULT)?;
        let mut buf = [0u8; MAX_MSG + 1];
        let (n, got) = recv(sock.as_fd(), &mut buf).map_err(|_| status::SERVERFAULT)?;
        drop(sock);
        let (st, bytes) = parse_reply(&buf[..n]).ok_or(status::SERVERFAULT)?;
        if st != 0 {
            return Err(st);
        }
        Ok((bytes.to_vec(), got))
    }

    fn ask_fd(
        &self,
        op: Op,
        tag: [u8; 8],
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<OwnedFd, u32> {
        self.ask(op, tag, bytes, fd)?.1.ok_or(status::SERVERFAULT)
    }
}

impl Handles for Client {
    fn root(&self, tag: [u8; 8]) -> Result<OwnedFd, u32> {
        self.ask_fd(Op::Root, tag, &[], None)
    }

    fn mint(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Result<Vec<u8>, u32> {
        Ok(self.ask(Op::Mint, tag, &[], Some(fd))?.0)
    }

    fn open(&self, tag: [u8; 8], nfs: &[u8]) -> Result<OwnedFd, u32> {
        if nfs.len() > handle::MAX_FH {
            return Err(status::BADHANDLE);
        }
        self.ask_fd(Op::Open, tag, nfs, None)
    }

    fn read_as_owner(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Result<OwnedFd, u32> {
        self.ask_fd(Op::ReadAsOwner, tag, &[], Some(fd))
    }

    fn sync(&self, tag: [u8; 8], fd: BorrowedFd<'_>) -> Res {
        self.ask(Op::Sync, tag, &[], Some(fd)).map(drop)
    }

    fn exports(&self, _specs: &[ExportSpec]) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The broker's state: the keeper while open.
pub type State = RwLock<Option<Keeper>>;

/// Answers one request with `keeper` (none while closed: `JUKEBOX`).
fn answer(
    keeper: Option<&Keeper>,
    req: &Request<'_>,
    fd: Option<OwnedFd>,
) -> (Vec<u8>, Option<OwnedFd>) {
    let Some(k) = keeper else {
        return (encode_reply(status::JUKEBOX, &[]), None);
    };
    let need = || fd.as_ref().map(AsFd::as_fd).ok_or(status::SERVERFAULT);
    let r: Result<(Vec<u8>, Option<OwnedFd>), u32> = match req.op {
        Op::Root => k.root(req.tag).map(|f| (Vec::new(), Some(f))),
        Op::Mint => need().and_then(|f| k.mint(req.tag, f)).map(|h| (h, None)),
        Op::Open => k.open(req.tag, req.bytes).map(|f| (Vec::new(), Some(f))),
        Op::ReadAsOwner => need()
            .and_then(|f| k.read_as_owner(req.tag, f))
            .map(|f| (Vec::new(), Some(f))),
        Op::Sync => need()
            .and_then(|f| k.sync(req.tag, f))
            .map(|()| (Vec::new(), None)),
    };
    match r {
        Ok((bytes, out)) => (encode_reply(0, &bytes), out),
        Err(st) => (encode_reply(st, &[]), None),
    }
}

/// Serves the server on `sock` until it hangs up. A message that does
/// not parse, or a descriptor where none belongs (or none where one
/// does), ends the service: the server is not speaking the protocol.
///
/// What the MAC's keyed state left on this thread's stack is scrubbed
/// after the first answer, or the first idle second, after a close (the
/// thread wakes every second to look). A server that does not read its
/// answers for 5 s ends the service too.
pub fn serve(sock: &OwnedFd, state: &State) -> io::Result<()> {
    rustix::net::sockopt::set_socket_timeout(
        sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(1)),
    )?;
    // A server that stops reading ends the service, not holds it.
    rustix::net::sockopt::set_socket_timeout(
        sock,
        rustix::net::sockopt::Timeout::Send,
        Some(std::time::Duration::from_secs(5)),
    )?;
    let mut buf = [0u8; MAX_MSG + 1];
    let mut keyed = false;
    loop {
        let (n, fd) = match recv(sock.as_fd(), &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if keyed && state.read().unwrap_or_else(|p| p.into_inner()).is_none() {
                    coffre_luks2::secret::scrub_stack();
                    keyed = false;
                }
                continue;
            }
            r => r?,
        };
        if n == 0 {
            return Ok(());
        }
        let Some(req) = parse_request(&buf[..n]) else {
            return Err(io::Error::other("a request that does not parse"));
        };
        if req.op.takes_fd() != fd.is_some() {
            return Err(io::Error::other("a descriptor where none belongs, or none"));
        }
        let (msg, out) = {
            let st = state.read().unwrap_or_else(|p| p.into_inner());
            keyed |= st.is_some();
            answer(st.as_ref(), &req, fd)
        };
        send(sock.as_fd(), &msg, out.as_ref().map(AsFd::as_fd))?;
        if keyed && state.read().unwrap_or_else(|p| p.into_inner()).is_none() {
            coffre_luks2::secret::scrub_stack();
            keyed = false;
        }
    }
}

/// One connection between the server and the broker: a `SOCK_SEQPACKET`
/// pair (message boundaries kept, a descriptor carried with a message).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A broker serving `keeper` on threads of this process (one per
/// connection, as in the broker's process), and the client that asks
/// it: the same protocol as between the two processes, for tests. The
/// threads end when the client is dropped (its keeper with them); it
/// does not follow a change of exports.
pub fn on_a_thread(keeper: Keeper) -> io::Result<Client> {
    let state = std::sync::Arc::new(RwLock::new(Some(keeper)));
    let mut theirs = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..CONNECTIONS {
        let (ours, t) = pair()?;
        let state = std::sync::Arc::clone(&state);
        threads.push(
            std::thread::Builder::new()
                .name("nfs-broker".into())
                .spawn(move || {
                    let _ = serve(&ours, &state);
                })?,
        );
        theirs.push(t);
    }
    // The last reference to the keeper is the threads'.
    drop(state);
    let mut c = Client::new(theirs);
    c.threads = threads;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_only_in_their_exact_layout() {
        let tag = [7; 8];
        let m = encode_request(Op::Open, tag, &[1, 2, 3]);
        assert_eq!(
            parse_request(&m),
            Some(Request {
                op: Op::Open,
                tag,
                bytes: &[1, 2, 3]
            })
        );
        let m = encode_request(Op::Mint, tag, &[]);
        assert_eq!(parse_request(&m).map(|r| r.op), Some(Op::Mint));
        // Bytes only with OPEN; lengths must add up; unknown ops.
        assert_eq!(parse_request(&encode_request(Op::Mint, tag, &[1])), None);
        let mut long = encode_request(Op::Open, tag, &[1, 2, 3]);
        long.push(0);
        assert_eq!(parse_request(&long), None);
        assert_eq!(parse_request(&m[..9]), None);
        let mut bad = m.clone();
        bad[0] = 9;
        assert_eq!(parse_request(&bad), None);
        assert_eq!(
            parse_request(&encode_request(Op::Open, tag, &[0; 65])),
            None
        );
        assert_eq!(parse_request(&[]), None);
    }

    /// Over the wire: while closed every request is JUKEBOX; a request
    /// without the descriptor it needs, or bytes out of the protocol,
    /// end the service.
    #[test]
    fn the_service_answers_jukebox_while_closed_and_ends_on_nonsense() {
        let pair = || pair().unwrap();
        let serving = |ours: OwnedFd| {
            std::thread::spawn(move || {
                let state: State = RwLock::new(None);
                serve(&ours, &state)
            })
        };
        let (ours, theirs) = pair();
        let t = serving(ours);
        let c = Client::new(vec![theirs]);
        assert_eq!(c.open([1; 8], &[1, 2, 3]).err(), Some(status::JUKEBOX));
        let dir = std::fs::File::open("/").unwrap();
        assert_eq!(c.sync([1; 8], dir.as_fd()).err(), Some(status::JUKEBOX));
        drop(c);
        assert!(t.join().unwrap().is_ok(), "ends when the server hangs up");
        // A MINT without its descriptor.
        let (ours, theirs) = pair();
        let t = serving(ours);
        send(theirs.as_fd(), &encode_request(Op::Mint, [1; 8], &[]), None).unwrap();
        assert!(t.join().unwrap().is_err());
        // Bytes out of the protocol.
        let (ours, theirs) = pair();
        let t = serving(ours);
        send(theirs.as_fd(), b"GET / HTTP/1.0", None).unwrap();
        assert!(t.join().unwrap().is_err());
    }

    /// A call waiting on one connection (a slow fsync) does not hold
    /// another: the next call takes a free connection.
    #[test]
    fn a_slow_request_holds_only_its_own_connection() {
        use std::sync::mpsc;
        let pair = || pair().unwrap();
        let ((slow, c0), (fast, c1)) = (pair(), pair());
        let (got, got_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        // The slow connection: answers once told to.
        let slow_t = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_MSG + 1];
            let (n, _) = recv(slow.as_fd(), &mut buf).unwrap();
            assert!(n > 0);
            got.send(()).unwrap();
            go_rx.recv().unwrap();
            send(slow.as_fd(), &encode_reply(0, &[]), None).unwrap();
        });
        let fast_t = std::thread::spawn(move || {
            let state: State = RwLock::new(None);
            serve(&fast, &state)
        });
        let c = std::sync::Arc::new(Client::new(vec![c0, c1]));
        let dir = std::fs::File::open("/").unwrap();
        let waiting = {
            let (c, dir) = (std::sync::Arc::clone(&c), dir.try_clone().unwrap());
            std::thread::spawn(move || c.sync([1; 8], dir.as_fd()))
        };
        got_rx.recv().unwrap();
        // Connection 0 is taken and unanswered: this call goes to 1.
        assert_eq!(c.sync([1; 8], dir.as_fd()).err(), Some(status::JUKEBOX));
        go.send(()).unwrap();
        assert_eq!(waiting.join().unwrap(), Ok(()));
        slow_t.join().unwrap();
        drop(c);
        assert!(fast_t.join().unwrap().is_ok());
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply(&encode_reply(0, &[1, 2])),
            Some((0, &[1u8, 2][..]))
        );
        assert_eq!(parse_reply(&encode_reply(70, &[])), Some((70, &[][..])));
        assert_eq!(parse_reply(&[0, 0, 0]), None);
        assert_eq!(parse_reply(&[0, 0, 0, 0, 2, 1]), None);
    }
}

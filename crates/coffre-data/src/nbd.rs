//! A small NBD server: the fixed newstyle handshake (export names,
//! listing, `NBD_OPT_INFO`/`NBD_OPT_GO`), simple replies, and read, write,
//! flush, trim, write-zeroes and FUA, over a unix socket only.
//!
//! Everything the client sends is checked before it is used: a bad magic
//! ends the connection, an out-of-range or oversized request gets an error
//! reply and the connection goes on, an unknown export is refused. A
//! connection never takes more than [`MAX_REQUEST`] bytes of memory.
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use coffre_storage::nbd_wire::*;

/// The largest read or write payload we serve (clients learn it from
/// `NBD_INFO_BLOCK_SIZE`).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Clients served at once (each has a thread and up to [`MAX_REQUEST`]
/// bytes of buffer).
const MAX_CONNECTIONS: usize = 64;
/// A connection silent for this long is dropped (QEMU reconnects).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// The largest option payload we read during the handshake.
const MAX_OPTION: u32 = 16 << 10;
/// Export names are at most this long (the protocol's own limit).
const MAX_NAME: usize = 4096;

/// One disk behind an export.
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every write so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Releases `len` bytes at `offset` (reads return zeroes after).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Where exports come from.
pub trait Catalog: Send + Sync {
    /// Names of the exports, sorted.
    fn list(&self) -> Vec<String>;
    /// Opens an export for one connection.
    fn open(&self, name: &str) -> Option<Box<dyn Disk>>;
}

/// A disk image file (an ordinary file on the vault's ext4).
#[derive(Debug)]
pub struct FileDisk {
    file: std::fs::File,
    size: u64,
}

impl FileDisk {
    /// Opens `name` in the directory `dir` read-write, following a
    /// symlink neither for the directory nor for the file.
    pub fn open_in(dir: &Path, name: &str) -> io::Result<Self> {
        use rustix::fs::{CWD, Mode, OFlags, openat};
        let nofollow = OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let d = openat(
            CWD,
            dir,
            OFlags::DIRECTORY | OFlags::RDONLY | nofollow,
            Mode::empty(),
        )?;
        let fd = openat(&d, name, OFlags::RDWR | nofollow, Mode::empty())?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(Self {
            file,
            size: meta.len(),
        })
    }
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }
}

/// An in-memory disk, for tests and fuzzing.
#[derive(Debug)]
pub struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self(Mutex::new(vec![0; size]))
    }
    fn range(&self, offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::Error::other("range"))?;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(|| io::Error::other("range"))?;
        Ok(start..end)
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let r = self.range(offset, buf.len(), v.len())?;
        buf.copy_from_slice(&v[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let n = v.len();
        let r = self.range(offset, buf.len(), n)?;
        v[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let n = v.len();
        let len = usize::try_from(len).map_err(|_| io::Error::other("range"))?;
        let r = self.range(offset, len, n)?;
        v[r].fill(0);
        Ok(())
    }
}

/// In-memory exports sharing their disks between connections (tests and
/// fuzzing).
#[derive(Default)]
pub struct MemCatalog(pub HashMap<String, Arc<MemDisk>>);

struct Shared(Arc<MemDisk>);
impl Disk for Shared {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, o: u64, b: &mut [u8]) -> io::Result<()> {
        self.0.read_at(o, b)
    }
    fn write_at(&self, o: u64, b: &[u8]) -> io::Result<()> {
        self.0.write_at(o, b)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, o: u64, l: u64) -> io::Result<()> {
        self.0.trim(o, l)
    }
}

impl Catalog for MemCatalog {
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.keys().cloned().collect();
        v.sort();
        v
    }
    fn open(&self, name: &str) -> Option<Box<dyn Disk>> {
        self.0
            .get(name)
            .map(|d| Box::new(Shared(d.clone())) as Box<dyn Disk>)
    }
}

/// The disk images in a directory: `NAME.img` is the export `NAME`.
#[derive(Debug, Clone)]
pub struct ImageDir {
    dir: PathBuf,
}

impl ImageDir {
    /// Exports the images in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

/// Export names we accept: what a file name can safely be.
pub fn valid_export_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Catalog for ImageDir {
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| {
                        let n = e.file_name().to_str()?.to_string();
                        let stem = n.strip_suffix(".img")?.to_string();
                        valid_export_name(&stem).then_some(stem)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
    fn open(&self, name: &str) -> Option<Box<dyn Disk>> {
        if !valid_export_name(name) {
            return None;
        }
        FileDisk::open_in(&self.dir, &format!("{name}.img"))
            .ok()
            .map(|d| Box::new(d) as Box<dyn Disk>)
    }
}

/// Some of the images in a directory: a VM's own disks, and no other's.
#[derive(Debug, Clone)]
pub struct Only {
    images: ImageDir,
    names: Vec<String>,
}

impl Only {
    /// The images `names` in `dir`.
    pub fn new(dir: impl Into<PathBuf>, names: Vec<String>) -> Self {
        Self {
            images: ImageDir::new(dir),
            names,
        }
    }
}

impl Catalog for Only {
    fn list(&self) -> Vec<String> {
        let mut v = self.images.list();
        v.retain(|n| self.names.contains(n));
        v
    }
    fn open(&self, name: &str) -> Option<Box<dyn Disk>> {
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        self.images.open(name)
    }
}

/// What one connection did, for tests and the audit log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnStats {
    /// The export it used, if it got that far.
    pub export: Option<String>,
    /// Requests served.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn proto(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    let len = u32::try_from(data.len()).map_err(|_| proto("reply too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(data)
}

fn tflags() -> u16 {
    TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
}

/// Parses the payload of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name and
/// the information requests. `None` if it does not add up.
pub fn parse_go(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(n)?)?;
    let rest = &data[4 + n..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let reqs = rest.get(2..)?;
    if reqs.len() != count * 2 {
        return None;
    }
    let name = std::str::from_utf8(name).ok()?.to_string();
    let reqs = reqs
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, reqs))
}

/// Serves one connection until the client disconnects, breaks the
/// protocol, or the stream is shut down. `reader` and `writer` are the two
/// halves of the same stream.
pub fn serve_connection(
    reader: impl Read,
    writer: impl Write,
    catalog: &dyn Catalog,
) -> io::Result<ConnStats> {
    let mut r = BufReader::with_capacity(64 << 10, reader);
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let mut stats = ConnStats::default();
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let cflags = rd_u32(&mut r)?;
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(proto("unknown client flags"));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let disk = loop {
        if rd_u64(&mut r)? != IHAVEOPT {
            return Err(proto("bad option magic"));
        }
        let opt = rd_u32(&mut r)?;
        let len = rd_u32(&mut r)?;
        if len > MAX_OPTION {
            return Err(proto("option too long"));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).to_string();
                // This old option has no way to say no: hang up.
                let Some(disk) = catalog.open(&name) else {
                    return Err(proto("unknown export"));
                };
                w.write_all(&disk.size().to_be_bytes())?;
                w.write_all(&tflags().to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0; 124])?;
                }
                w.flush()?;
                stats.export = Some(name);
                break disk;
            }
            OPT_ABORT => {
                opt_reply(&mut w, opt, REP_ACK, &[])?;
                w.flush()?;
                return Ok(stats);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(&mut w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    for name in catalog.list() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        opt_reply(&mut w, opt, REP_SERVER, &d)?;
                    }
                    opt_reply(&mut w, opt, REP_ACK, &[])?;
                }
                w.flush()?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, reqs)) = parse_go(&data).filter(|(n, _)| n.len() <= MAX_NAME)
                else {
                    opt_reply(&mut w, opt, REP_ERR_INVALID, b"malformed request")?;
                    w.flush()?;
                    continue;
                };
                let Some(disk) = catalog.open(&name) else {
                    opt_reply(&mut w, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    w.flush()?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&disk.size().to_be_bytes());
                info.extend_from_slice(&tflags().to_be_bytes());
                opt_reply(&mut w, opt, REP_INFO, &info)?;
                if reqs.contains(&INFO_BLOCK_SIZE) {
                    let mut b = Vec::with_capacity(14);
                    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    opt_reply(&mut w, opt, REP_INFO, &b)?;
                }
                opt_reply(&mut w, opt, REP_ACK, &[])?;
                w.flush()?;
                if opt == OPT_GO {
                    stats.export = Some(name);
                    break disk;
                }
            }
            _ => {
                opt_reply(&mut w, opt, REP_ERR_UNSUP, b"not supported")?;
                w.flush()?;
            }
        }
    };
    transmission(&mut r, &mut w, disk.as_ref(), &mut stats)?;
    Ok(stats)
}

fn reply(w: &mut impl Write, err: u32, cookie: u64, data: &[u8]) -> io::Result<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&err.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => ENOSPC,
        _ => EIO,
    }
}

/// Reads and throws away `len` bytes (the payload of a refused write).
fn discard(r: &mut impl Read, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn transmission(
    r: &mut impl Read,
    w: &mut impl Write,
    disk: &dyn Disk,
    stats: &mut ConnStats,
) -> io::Result<()> {
    let size = disk.size();
    let mut buf = Vec::new();
    loop {
        let magic = match rd_u32(r) {
            Ok(m) => m,
            // A client that hangs up between requests is done.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(proto("bad request magic"));
        }
        let flags = rd_u16(r)?;
        let kind = rd_u16(r)?;
        let cookie = rd_u64(r)?;
        let offset = rd_u64(r)?;
        let len = rd_u32(r)?;
        stats.requests += 1;
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|e| e <= size);
        let err = match kind {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if len > MAX_REQUEST {
                    EOVERFLOW
                } else if !in_range {
                    EINVAL
                } else {
                    buf.resize(len as usize, 0);
                    match disk.read_at(offset, &mut buf) {
                        Ok(()) => {
                            reply(w, 0, cookie, &buf)?;
                            continue;
                        }
                        Err(e) => errno_of(&e),
                    }
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    discard(r, u64::from(len))?;
                    EOVERFLOW
                } else if !in_range {
                    // Never buffered: a lie about the length costs no memory.
                    discard(r, u64::from(len))?;
                    ENOSPC
                } else {
                    buf.resize(len as usize, 0);
                    r.read_exact(&mut buf)?;
                    {
                        match disk.write_at(offset, &buf).and_then(|()| {
                            if flags & CMD_FLAG_FUA != 0 {
                                disk.flush()
                            } else {
                                Ok(())
                            }
                        }) {
                            Ok(()) => 0,
                            Err(e) => errno_of(&e),
                        }
                    }
                }
            }
            CMD_FLUSH => match disk.flush() {
                Ok(()) => 0,
                Err(e) => errno_of(&e),
            },
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !in_range {
                    if kind == CMD_TRIM { EINVAL } else { ENOSPC }
                } else {
                    let done = if len == 0 {
                        Ok(())
                    } else if kind == CMD_TRIM {
                        disk.trim(offset, u64::from(len))
                    } else {
                        // Zeroes, written for real (a hole is zeroes too,
                        // but NO_HOLE asks for allocation).
                        write_zeroes(disk, offset, len)
                    };
                    match done.and_then(|()| {
                        if flags & CMD_FLAG_FUA != 0 {
                            disk.flush()
                        } else {
                            Ok(())
                        }
                    }) {
                        Ok(()) => 0,
                        Err(e) => errno_of(&e),
                    }
                }
            }
            // Unknown commands: the protocol says EINVAL.
            _ => EINVAL,
        };
        if err != 0 {
            stats.errors += 1;
        }
        reply(w, err, cookie, &[])?;
    }
}

fn write_zeroes(disk: &dyn Disk, offset: u64, len: u32) -> io::Result<()> {
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < u64::from(len) {
        let n = (u64::from(len) - done).min(zeros.len() as u64);
        disk.write_at(offset + done, &zeros[..usize::try_from(n).unwrap_or(0)])?;
        done += n;
    }
    Ok(())
}

/// Open connections: our copy of each socket (to shut it down at close)
/// and its thread.
type Connections = Arc<Mutex<HashMap<u64, (UnixStream, JoinHandle<()>)>>>;

/// A running server: a listening unix socket and one thread per client.
pub struct NbdServer {
    socket: PathBuf,
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    conns: Connections,
    accept: Option<JoinHandle<()>>,
    served: Arc<AtomicU64>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Listens on `socket` (in a directory only we can enter; a stale
    /// socket file left by a dead predecessor is replaced).
    pub fn start(socket: &Path, catalog: Arc<dyn Catalog>) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = Arc::new(UnixListener::bind(socket)?);
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns: Connections = Arc::default();
        let served = Arc::new(AtomicU64::new(0));
        let accept = {
            let listener = listener.clone();
            let stopping = stopping.clone();
            let conns = conns.clone();
            let served = served.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || {
                    let mut next = 0u64;
                    for stream in listener.incoming() {
                        if stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else {
                            // Out of descriptors or the like: do not spin.
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            continue;
                        };
                        if conns.lock().map(|t| t.len()).unwrap_or(0) >= MAX_CONNECTIONS {
                            // Hang up at once: the client sees no greeting.
                            continue;
                        }
                        // A client gets this long for its handshake and
                        // each request header; a paused VM reconnects.
                        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
                        let Ok(writer) = stream.try_clone() else {
                            continue;
                        };
                        let Ok(handle) = stream.try_clone() else {
                            continue;
                        };
                        let id = next;
                        next += 1;
                        let catalog = catalog.clone();
                        let conns2 = conns.clone();
                        let served = served.clone();
                        let mut table = conns.lock().unwrap_or_else(|p| p.into_inner());
                        let t = std::thread::Builder::new().name(format!("nbd-{id}")).spawn(
                            move || {
                                let _ = serve_connection(&stream, writer, catalog.as_ref());
                                served.fetch_add(1, Ordering::Relaxed);
                                // Dropping the entry closes our copy of the socket.
                                let mut t = conns2.lock().unwrap_or_else(|p| p.into_inner());
                                t.remove(&id);
                            },
                        );
                        if let Ok(t) = t {
                            table.insert(id, (handle, t));
                        }
                    }
                })?
        };
        Ok(Self {
            socket: socket.to_path_buf(),
            listener,
            stopping,
            conns,
            accept: Some(accept),
            served,
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Hands the socket to one unprivileged user: owned by them, mode
    /// 0600, moved to `to` (in a directory of theirs, made 0700 if
    /// missing). The socket must have been started in a directory only
    /// root can enter, so that nobody can swap it while its owner
    /// changes; the rename replaces whatever is at `to` without following
    /// it.
    pub fn publish(&mut self, to: &Path, uid: u32, gid: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = to
            .parent()
            .ok_or_else(|| io::Error::other("a socket path without a directory"))?;
        if let Some(up) = dir.parent() {
            std::fs::create_dir_all(up)?;
        }
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::lchown(&self.socket, Some(uid), Some(gid))?;
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))?;
        // The directory is its user's: whatever they left at the name goes
        // (a directory would make the rename fail); neither removal
        // follows a link.
        if std::fs::symlink_metadata(to).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(to)?;
        }
        std::fs::rename(&self.socket, to)?;
        self.socket = to.to_path_buf();
        Ok(())
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        self.conns.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Connections served to their end so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Drops every client, closes every image and removes the socket.
    /// Returns how many clients were connected.
    pub fn stop(&mut self) -> usize {
        let Some(accept) = self.accept.take() else {
            return 0;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop: shutting a listening socket down makes
        // accept(2) fail at once.
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both);
        // In case it did not: one connection of our own.
        let _ = UnixStream::connect(&self.socket);
        let _ = accept.join();
        let drained: Vec<(UnixStream, JoinHandle<()>)> = {
            let mut t = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            t.drain().map(|(_, v)| v).collect()
        };
        let n = drained.len();
        for (s, _) in &drained {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for (_, t) in drained {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        n
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_payload_parses_and_rejects_lies() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_go(&d), Some(("disk".into(), vec![3])));
        let mut lie = d.clone();
        lie[3] = 200;
        assert_eq!(parse_go(&lie), None);
        assert_eq!(parse_go(&d[..d.len() - 1]), None);
        assert_eq!(parse_go(&[]), None);
    }

    #[test]
    fn export_names_are_file_names() {
        assert!(valid_export_name("vm-1.root"));
        assert!(!valid_export_name("../x"));
        assert!(!valid_export_name(".hidden"));
        assert!(!valid_export_name(""));
        assert!(!valid_export_name("a/b"));
    }
}

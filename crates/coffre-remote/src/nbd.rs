//! A client of NBD servers (nbdkit, qemu-nbd, nbd-server): the fixed
//! newstyle handshake with `NBD_OPT_GO`, TLS by `NBD_OPT_STARTTLS`, and
//! read, write (with FUA), flush and trim with several requests in flight
//! on one connection. A connection that fails is replaced at the next
//! request (the requests it carried fail: the layer above retries).
//!
//! Everything the server sends is checked before it is used: magics,
//! cookies that match a request in flight, read replies of exactly the
//! length asked, option replies of bounded length. A server cannot make
//! the client allocate more than the largest request it made.
//!
//! URLs: `nbd://HOST[:PORT]/EXPORT`, `nbds://...` (TLS),
//! `nbd+unix:///EXPORT?socket=PATH`, `nbds+unix:///...` (the NBD URI
//! standard's forms).
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>

use crate::RemoteError;
use crate::objects::StoreError;
use bytes::{Bytes, BytesMut};
use coffre_storage::nbd_wire::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// The NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// The most one request carries: larger reads and writes are split.
const MAX_PAYLOAD: u32 = 16 << 20;

/// The most an option reply may be.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Requests queued to a connection's writer at once.
const QUEUE: usize = 64;

/// Connections to a server that allows several (`CAN_MULTI_CONN`: a
/// flush on one covers the writes answered on all), as nbdcopy opens.
const CONNECTIONS: usize = 4;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP, host and port.
    Tcp(String, u16),
    /// A unix socket.
    Unix(PathBuf),
}

/// An NBD export and how to reach it.
#[derive(Clone)]
pub struct NbdSettings {
    /// The server.
    pub addr: NbdAddr,
    /// The export's name.
    pub export: String,
    /// TLS (`nbds`): the client's configuration (the roots that sign the
    /// server's certificate, a client certificate if the server asks) and
    /// the name the server's certificate must carry.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
    /// How long a request (or the handshake) may take before the
    /// connection is given up.
    pub timeout: Duration,
}

impl std::fmt::Debug for NbdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdSettings")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish_non_exhaustive()
    }
}

/// What an `nbd://` URL names: the server, the export, and whether TLS is
/// asked for.
pub fn parse_url(url: &str) -> Result<(NbdAddr, String, bool), RemoteError> {
    let bad = |why: &str| {
        RemoteError::Config(format!(
            "{:?} is not an NBD URL: {why}",
            coffre_sys::shown::url(url)
        ))
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("it must start with nbd://, nbds://, nbd+unix:// or nbds+unix://"))?;
    let (tls, unix) = match scheme {
        "nbd" => (false, false),
        "nbds" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        _ => return Err(bad("unknown scheme")),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') {
        return Err(bad(
            "a login in the URL: NBD takes none (nbds:// authenticates the storage host by its certificate)",
        ));
    }
    let (export, query) = path.split_once('?').unwrap_or((path, ""));
    if export.len() > 4096 || export.contains('\0') {
        return Err(bad("the export name is too long or has a NUL"));
    }
    let export = percent_decode(export).ok_or_else(|| bad("bad %-escape in the export"))?;
    if unix {
        if !authority.is_empty() {
            return Err(bad(
                "a unix URL has no host (nbd+unix:///EXPORT?socket=PATH)",
            ));
        }
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| bad("socket=PATH is missing"))?;
        let socket = percent_decode(socket).ok_or_else(|| bad("bad %-escape in the socket"))?;
        if !socket.starts_with('/') {
            return Err(bad("the socket path must be absolute"));
        }
        return Ok((NbdAddr::Unix(PathBuf::from(socket)), export, tls));
    }
    if !query.is_empty() {
        return Err(bad("a TCP URL takes no query"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        // [v6]:port
        Some(v6) => {
            let (h, rest) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match rest.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if rest.is_empty() => DEFAULT_PORT,
                None => return Err(bad("junk after ]")),
            };
            (h.to_string(), port)
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_string(), DEFAULT_PORT),
        },
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b))
    {
        return Err(bad("the host is not a name or an address"));
    }
    Ok((NbdAddr::Tcp(host, port), export, tls))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its size in bytes.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
    /// The most one request may carry.
    pub max_payload: u32,
}

impl ExportInfo {
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    /// Whether FUA is supported.
    pub fn fua(&self) -> bool {
        self.flags & TFLAG_SEND_FUA != 0
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

struct Request {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    /// A write's bytes: its parts, sent one after the other.
    data: Vec<Bytes>,
    reply: oneshot::Sender<Result<Bytes, Failure>>,
}

type Pending = Arc<Mutex<HashMap<u64, (u16, u32, oneshot::Sender<Result<Bytes, Failure>>)>>>;

/// Why a request failed: the server said so (the connection goes on), or
/// the connection failed (it is given up).
enum Failure {
    Server(StoreError),
    Connection(StoreError),
}

/// One connection in transmission: a writer task sends requests, a
/// reader task hands each reply to its request.
struct Conn {
    tx: mpsc::Sender<Request>,
    info: ExportInfo,
    dead: Arc<AtomicBool>,
    /// Which set of connections it belongs to (all are made again
    /// together).
    generation: u64,
    /// Its reader and writer tasks, stopped when it is given up (so that
    /// nothing queued is sent late).
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Conn {
    /// Given up: nothing more is sent on it, and its socket closes.
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A client of one export. Cheap to share; connects at the first request
/// and again after a failure.
pub struct NbdClient {
    settings: NbdSettings,
    /// One connection, or several when the server says they see one
    /// another's writes (`CAN_MULTI_CONN`): requests go round them.
    conns: tokio::sync::Mutex<Vec<Arc<Conn>>>,
    next: std::sync::atomic::AtomicUsize,
    /// Sets of connections made so far.
    generation: std::sync::atomic::AtomicU64,
    /// Writes and trims sent since the last flush that covered them: the
    /// generation each went on, and its number.
    unflushed: Mutex<Vec<(u64, u64)>>,
    sent: std::sync::atomic::AtomicU64,
    /// Writes went on connections that were lost before a flush covered
    /// them: the server may have dropped them, or may still apply them
    /// late, so no flush is ever reported done again.
    lost: AtomicBool,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("NBD {what}: {e}"))
}

impl NbdClient {
    /// A client of the export `settings` names (nothing is sent yet).
    pub fn new(settings: NbdSettings) -> Self {
        NbdClient {
            settings,
            conns: tokio::sync::Mutex::new(Vec::new()),
            next: std::sync::atomic::AtomicUsize::new(0),
            generation: std::sync::atomic::AtomicU64::new(0),
            unflushed: Mutex::new(Vec::new()),
            sent: std::sync::atomic::AtomicU64::new(0),
            lost: AtomicBool::new(false),
        }
    }

    /// The export's size and flags (connecting if need be).
    pub async fn info(&self) -> Result<ExportInfo, StoreError> {
        Ok(self.conn().await?.info)
    }

    async fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        let mut g = self.conns.lock().await;
        let alive = |c: &Arc<Conn>| !c.dead.load(Ordering::SeqCst) && !c.tx.is_closed();
        if !g.is_empty() && g.iter().all(alive) {
            let k = self.next.fetch_add(1, Ordering::Relaxed) % g.len();
            return Ok(g[k].clone());
        }
        // One failed: all are made again (a server restarted drops them
        // all), the old ones stopped.
        for c in g.drain(..) {
            c.kill();
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let first = Arc::new(self.connect_one(generation).await?);
        g.push(first.clone());
        if first.info.flags & TFLAG_CAN_MULTI_CONN != 0 {
            for _ in 1..CONNECTIONS {
                match self.connect_one(generation).await {
                    Ok(c) => g.push(Arc::new(c)),
                    Err(_) => break,
                }
            }
        }
        Ok(first)
    }

    async fn connect_one(&self, generation: u64) -> Result<Conn, StoreError> {
        tokio::time::timeout(self.settings.timeout, connect(&self.settings, generation))
            .await
            .map_err(|_| {
                err(
                    "handshake",
                    format!("no answer within {} s", self.settings.timeout.as_secs()),
                )
            })?
    }

    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Vec<Bytes>,
    ) -> Result<Bytes, StoreError> {
        self.request_on(cmd, flags, offset, len, data)
            .await
            .map(|(b, _)| b)
    }

    /// A request and its reply, with the generation of the connection it
    /// went on; the whole of it (queueing included) within the timeout.
    async fn request_on(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Vec<Bytes>,
    ) -> Result<(Bytes, u64), StoreError> {
        let c = self.conn().await?;
        // Writes a restarted server could lose: not FUA (durable when
        // answered), not trims (losing one loses nothing).
        if matches!(cmd, CMD_WRITE | CMD_WRITE_ZEROES) && flags & CMD_FLAG_FUA == 0 {
            let n = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
            self.unflushed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((c.generation, n));
        }
        let (reply, rx) = oneshot::channel();
        let req = Request {
            cmd,
            flags,
            offset,
            len,
            data,
            reply,
        };
        let exchange = async {
            if c.tx.send(req).await.is_err() {
                return Err(Failure::Connection(err(
                    "request",
                    "the connection is gone (reconnecting)",
                )));
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(Failure::Connection(err(
                    "request",
                    "the connection closed before the reply",
                ))),
            }
        };
        match tokio::time::timeout(self.settings.timeout, exchange).await {
            Ok(Ok(b)) => Ok((b, c.generation)),
            // The server refused it: the connection goes on.
            Ok(Err(Failure::Server(e))) => Err(e),
            Ok(Err(Failure::Connection(e))) => {
                c.kill();
                Err(e)
            }
            Err(_) => {
                // A server that does not answer: this connection is given
                // up (nothing queued on it is sent later), a new one next
                // time.
                c.kill();
                Err(err(
                    "request",
                    format!("no reply within {} s", self.settings.timeout.as_secs()),
                ))
            }
        }
    }

    fn check_range(info: &ExportInfo, offset: u64, len: u64) -> Result<(), StoreError> {
        if offset.checked_add(len).is_none_or(|end| end > info.size) {
            return Err(err(
                "request",
                format!(
                    "{len} bytes at {offset} are past the export's end ({})",
                    info.size
                ),
            ));
        }
        Ok(())
    }

    /// `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let info = self.info().await?;
        Self::check_range(&info, offset, len as u64)?;
        let step = info.max_payload as usize;
        if len <= step {
            let n = u32::try_from(len).map_err(|e| err("read", e))?;
            return self.request(CMD_READ, 0, offset, n, Vec::new()).await;
        }
        let parts = (0..len).step_by(step).map(|at| {
            let n = step.min(len - at);
            async move {
                let n32 = u32::try_from(n).map_err(|e| err("read", e))?;
                self.request(CMD_READ, 0, offset + at as u64, n32, Vec::new())
                    .await
            }
        });
        let mut out = crate::bufpool::take(len);
        for p in futures::future::join_all(parts).await {
            out.extend_from_slice(&p?);
        }
        Ok(Bytes::from(out))
    }

    /// Writes `data` at `offset`; with `fua`, durable before it returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        let info = self.info().await?;
        if info.read_only() {
            return Err(StoreError::Other("the NBD export is read-only".into()));
        }
        Self::check_range(&info, offset, data.len() as u64)?;
        let flags = if fua && info.fua() { CMD_FLAG_FUA } else { 0 };
        let step = info.max_payload as usize;
        let parts = (0..data.len().max(1)).step_by(step).map(|at| {
            let part = data.slice(at..data.len().min(at + step));
            async move {
                let n = u32::try_from(part.len()).map_err(|e| err("write", e))?;
                self.request(CMD_WRITE, flags, offset + at as u64, n, vec![part])
                    .await
                    .map(|_| ())
            }
        });
        for p in futures::future::join_all(parts).await {
            p?;
        }
        if fua && !info.fua() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes `parts`, one after the other, at `offset`, as
    /// [`write`](Self::write) does their concatenation: in one request
    /// that carries them as they are (no copy into one buffer) when they
    /// fit in one.
    pub async fn write_parts(
        &self,
        offset: u64,
        parts: Vec<Bytes>,
        fua: bool,
    ) -> Result<(), StoreError> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        let info = self.info().await?;
        if parts.len() < 2 || len > info.max_payload as usize {
            return self.write(offset, concat(&parts), fua).await;
        }
        if info.read_only() {
            return Err(StoreError::Other("the NBD export is read-only".into()));
        }
        Self::check_range(&info, offset, len as u64)?;
        let flags = if fua && info.fua() { CMD_FLAG_FUA } else { 0 };
        let n = u32::try_from(len).map_err(|e| err("write", e))?;
        self.request(CMD_WRITE, flags, offset, n, parts).await?;
        if fua && !info.fua() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Every write acknowledged before is durable. Refused, for good,
    /// once writes went on a connection that was lost before a flush
    /// covered them (a restarted server may have dropped them; a late one
    /// may still apply them): the device must be opened again, and the
    /// vault's write journal replays them.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let lost = || {
            err(
                "flush",
                "writes went on a connection that was lost before a flush covered them: they may be lost on the server; reopen the vault (its write journal replays them)",
            )
        };
        if self.lost.load(Ordering::SeqCst) {
            return Err(lost());
        }
        let before = self.sent.load(Ordering::SeqCst);
        let (_, generation) = self.request_on(CMD_FLUSH, 0, 0, 0, Vec::new()).await?;
        let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        if u.iter().any(|(g, _)| *g != generation) {
            self.lost.store(true, Ordering::SeqCst);
            return Err(lost());
        }
        u.retain(|(_, n)| *n > before);
        Ok(())
    }

    /// Tells the server `len` bytes at `offset` are no longer needed (they
    /// may read back as anything); nothing when it does not trim.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let info = self.info().await?;
        if info.flags & TFLAG_SEND_TRIM == 0 || info.read_only() || len == 0 {
            return Ok(());
        }
        Self::check_range(&info, offset, len)?;
        let step = u64::from(info.max_payload);
        let mut at = 0;
        while at < len {
            let n = u32::try_from(step.min(len - at)).map_err(|e| err("trim", e))?;
            self.request(CMD_TRIM, 0, offset + at, n, Vec::new())
                .await?;
            at += u64::from(n);
        }
        Ok(())
    }
}

/// Connects, negotiates and starts the connection's tasks.
async fn connect(s: &NbdSettings, generation: u64) -> Result<Conn, StoreError> {
    let stream: Box<dyn Stream> = match &s.addr {
        NbdAddr::Tcp(host, port) => {
            let t = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| err("connect", format!("{host}:{port}: {e}")))?;
            let _ = t.set_nodelay(true);
            Box::new(t)
        }
        NbdAddr::Unix(p) => Box::new(
            tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| err("connect", format!("{}: {e}", p.display())))?,
        ),
    };
    let (stream, info) = handshake(stream, s).await?;
    Ok(start(stream, info, generation))
}

/// Starts a connection's reader and writer tasks.
fn start(stream: Box<dyn Stream>, info: ExportInfo, generation: u64) -> Conn {
    let (mut rd, wr) = tokio::io::split(stream);
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let dead = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel(QUEUE);
    let reader = {
        let (pending, dead) = (pending.clone(), dead.clone());
        tokio::spawn(async move {
            let e = read_replies(&mut rd, &pending).await;
            dead.store(true, Ordering::SeqCst);
            fail_all(&pending, &e);
        })
    };
    let reader_abort = reader.abort_handle();
    let writer = {
        let (pending, dead) = (pending.clone(), dead.clone());
        tokio::spawn(async move {
            let e = write_requests(wr, rx, &pending).await;
            dead.store(true, Ordering::SeqCst);
            reader.abort();
            fail_all(&pending, &e);
        })
    };
    Conn {
        tx,
        info,
        dead,
        generation,
        tasks: vec![reader_abort, writer.abort_handle()],
    }
}

/// For the fuzz target: the handshake against a server whose words are
/// `data`, then, if it gets through, a read, a write and a flush whose
/// replies are the rest of `data`. Never panics, never allocates more
/// than the requests asked for. How far it got: `None`, the handshake
/// failed; else whether the read was answered (a test holds the harness
/// to reaching it).
///
/// The server speaks when spoken to, as a real one does (a reply sent
/// before its request is a different, and uninteresting, failure): the
/// greeting at once; after the client's option, option replies (each a
/// 20-byte header from `data` and as much of its announced length) until
/// an acknowledgement or an error; after each request, a 16-byte reply
/// header and, for a read, the length asked. What `data` lacks ends the
/// connection there.
#[doc(hidden)]
pub fn fuzz_server(data: &[u8]) -> Option<bool> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return None;
    };
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let script = data.to_vec();
        let server = tokio::spawn(fuzz_serve(server, script));
        let settings = NbdSettings {
            addr: NbdAddr::Unix(PathBuf::from("/nonexistent/coffre-fuzz.sock")),
            export: "fuzz".into(),
            tls: None,
            timeout: Duration::from_secs(5),
        };
        let Ok((stream, info)) = handshake(Box::new(client), &settings).await else {
            server.abort();
            return None;
        };
        let c = NbdClient::new(settings);
        *c.conns.lock().await = vec![Arc::new(start(stream, info, 0))];
        let n = usize::try_from(info.size.min(8192)).unwrap_or(0);
        let read = c.read(0, n).await.is_ok();
        let _ = c.write(0, Bytes::from(vec![0u8; n]), true).await;
        let half = n / 2;
        let _ = c
            .write_parts(
                0,
                vec![
                    Bytes::from(vec![1u8; half]),
                    Bytes::from(vec![2u8; n - half]),
                ],
                false,
            )
            .await;
        let _ = c.flush().await;
        server.abort();
        Some(read)
    })
}

/// The fuzz harness's server (see [`fuzz_server`]): `script` said in
/// turn, paced by the client's words.
async fn fuzz_serve(mut s: tokio::io::DuplexStream, script: Vec<u8>) {
    /// Says the script's next `n` bytes; `Err` once it has run out (the
    /// connection ends there).
    async fn say(
        s: &mut tokio::io::DuplexStream,
        rest: &mut &[u8],
        n: usize,
    ) -> std::io::Result<Vec<u8>> {
        let (part, after) = rest.split_at(n.min(rest.len()));
        *rest = after;
        s.write_all(part).await?;
        if part.len() < n || rest.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(part.to_vec())
    }
    let mut rest: &[u8] = &script;
    let said = async {
        say(&mut s, &mut rest, 18).await?;
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).await?;
        let mut option = [0u8; 16];
        s.read_exact(&mut option).await?;
        let len = u32::from_be_bytes([option[12], option[13], option[14], option[15]]);
        let mut body = vec![0u8; usize::try_from(len.min(4096)).unwrap_or(0)];
        s.read_exact(&mut body).await?;
        loop {
            let head = say(&mut s, &mut rest, 20).await?;
            let kind = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
            let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
            if len > 0 {
                say(
                    &mut s,
                    &mut rest,
                    usize::try_from(len).unwrap_or(usize::MAX),
                )
                .await?;
            }
            if kind == REP_ACK || kind & REP_FLAG_ERROR != 0 {
                break;
            }
        }
        loop {
            let mut h = [0u8; 28];
            s.read_exact(&mut h).await?;
            let cmd = u16::from_be_bytes([h[6], h[7]]);
            let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if cmd == CMD_WRITE {
                let mut payload = vec![0u8; len.min(1 << 20)];
                s.read_exact(&mut payload).await?;
            }
            let reply = say(&mut s, &mut rest, 16).await?;
            // An error's reply carries no data.
            if cmd == CMD_READ && len > 0 && reply[4..8] == [0; 4] {
                say(&mut s, &mut rest, len).await?;
            }
        }
    };
    let _: std::io::Result<()> = said.await;
    // The script is said: end of file.
    let _ = s.shutdown().await;
}

/// `parts` in one buffer (one part: itself, no copy).
pub(crate) fn concat(parts: &[Bytes]) -> Bytes {
    if let [one] = parts {
        return one.clone();
    }
    let mut whole = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in parts {
        whole.extend_from_slice(p);
    }
    whole.freeze()
}

fn fail_all(pending: &Pending, e: &StoreError) {
    let all: Vec<_> = pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (_, (_, _, reply)) in all {
        let _ = reply.send(Err(Failure::Connection(e.clone())));
    }
}

async fn write_requests(
    wr: tokio::io::WriteHalf<Box<dyn Stream>>,
    mut rx: mpsc::Receiver<Request>,
    pending: &Pending,
) -> StoreError {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, wr);
    let mut cookie = 0u64;
    loop {
        let Some(r) = rx.recv().await else {
            // The client is gone: a clean goodbye.
            let mut h = [0u8; 28];
            encode_request(&mut h, CMD_DISC, 0, 0, 0, 0);
            let _ = w.write_all(&h).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
            return err("connection", "closed");
        };
        cookie = cookie.wrapping_add(1);
        let mut h = [0u8; 28];
        encode_request(&mut h, r.cmd, r.flags, cookie, r.offset, r.len);
        let parts = r.data;
        // Known before the request leaves: its reply can come at once.
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, (r.cmd, r.len, r.reply));
        let sent = async {
            w.write_all(&h).await?;
            for p in &parts {
                w.write_all(p).await?;
            }
            if rx.is_empty() {
                w.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = sent {
            return err("send", e);
        }
    }
}

fn encode_request(h: &mut [u8; 28], cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
}

/// Reads replies until the connection fails; returns why.
async fn read_replies(
    rd: &mut tokio::io::ReadHalf<Box<dyn Stream>>,
    pending: &Pending,
) -> StoreError {
    loop {
        let mut h = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut h).await {
            return err("receive", e);
        }
        let (magic, error, cookie) = match parse_simple_reply(&h) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let _ = magic;
        let Some((cmd, len, reply)) = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie)
        else {
            return err(
                "receive",
                format!("a reply to no request (cookie {cookie})"),
            );
        };
        if error != 0 {
            let _ = reply.send(Err(Failure::Server(err(
                "request",
                format!("the server answered error {error} ({})", errno_name(error)),
            ))));
            continue;
        }
        if cmd == CMD_READ {
            // Filled as it comes, never zeroed first, in a kept block
            // (`bufpool`: no page faults).
            let mut buf = crate::bufpool::take(len as usize);
            while buf.len() < len as usize {
                let mut part = (&mut *rd).take((len as usize - buf.len()) as u64);
                match part.read_buf(&mut buf).await {
                    Ok(0) => {
                        let e = err("receive", "end of stream in a read reply");
                        let _ = reply.send(Err(Failure::Connection(e.clone())));
                        return e;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let e = err("receive", e);
                        let _ = reply.send(Err(Failure::Connection(e.clone())));
                        return e;
                    }
                }
            }
            let _ = reply.send(Ok(Bytes::from(buf)));
        } else {
            let _ = reply.send(Ok(Bytes::new()));
        }
    }
}

/// A simple reply's header: its magic, error and cookie. Anything else (a
/// structured reply, which is never asked for) ends the connection.
fn parse_simple_reply(h: &[u8; 16]) -> Result<(u32, u32, u64), StoreError> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(err("receive", format!("bad reply magic {magic:#x}")));
    }
    let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let cookie = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    Ok((magic, error, cookie))
}

fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        EIO => "EIO",
        12 => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown",
    }
}

async fn send_option(
    w: &mut (impl AsyncWrite + Unpin),
    opt: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).await?;
    w.flush().await
}

/// One option reply: its type and data.
async fn option_reply(
    r: &mut (impl AsyncRead + Unpin),
    opt: u32,
) -> Result<(u32, Vec<u8>), StoreError> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)
        .await
        .map_err(|e| err("handshake", e))?;
    let (magic, got, kind, len) = parse_option_reply(&h);
    if magic != REPLY_MAGIC {
        return Err(err(
            "handshake",
            format!("bad option reply magic {magic:#x}"),
        ));
    }
    if got != opt {
        return Err(err(
            "handshake",
            format!("a reply to option {got}, not {opt}"),
        ));
    }
    if len > MAX_OPTION_REPLY {
        return Err(err("handshake", format!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)
        .await
        .map_err(|e| err("handshake", e))?;
    Ok((kind, data))
}

/// An option reply's header: magic, option, type, length.
pub fn parse_option_reply(h: &[u8; 20]) -> (u64, u32, u32, u32) {
    let magic = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    (magic, opt, kind, len)
}

fn option_error(kind: u32, data: &[u8], what: &str) -> StoreError {
    let msg = String::from_utf8_lossy(&data[..data.len().min(512)]).into_owned();
    let why = match kind {
        REP_ERR_UNSUP => "not supported by the server",
        REP_ERR_POLICY => "refused by the server's policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_TLS_REQD => "the server requires TLS (use nbds://)",
        REP_ERR_UNKNOWN => "no such export",
        _ => "refused",
    };
    err(
        "handshake",
        format!(
            "{what}: {why}{}",
            if msg.is_empty() {
                String::new()
            } else {
                format!(" ({msg})")
            }
        ),
    )
}

/// Reads what `NBD_OPT_GO`'s `REP_INFO` replies say, until its ACK.
pub fn parse_info(data: &[u8], info: &mut ExportInfo) -> Result<(), StoreError> {
    let bad = || err("handshake", "a malformed export information reply");
    let kind = u16::from_be_bytes(
        data.get(0..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    match kind {
        INFO_EXPORT => {
            let d = data.get(2..12).ok_or_else(bad)?;
            info.size = u64::from_be_bytes(d[0..8].try_into().map_err(|_| bad())?);
            info.flags = u16::from_be_bytes([d[8], d[9]]);
        }
        INFO_BLOCK_SIZE => {
            let d = data.get(2..14).ok_or_else(bad)?;
            let max = u32::from_be_bytes(d[8..12].try_into().map_err(|_| bad())?);
            if max >= 4096 {
                info.max_payload = info.max_payload.min(max);
            }
        }
        _ => {}
    }
    Ok(())
}

async fn handshake(
    mut s: Box<dyn Stream>,
    settings: &NbdSettings,
) -> Result<(Box<dyn Stream>, ExportInfo), StoreError> {
    let mut h = [0u8; 18];
    s.read_exact(&mut h)
        .await
        .map_err(|e| err("handshake", e))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let newstyle = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(err("handshake", "not an NBD server"));
    }
    if newstyle != IHAVEOPT {
        return Err(err(
            "handshake",
            "the server speaks the old protocol, not newstyle",
        ));
    }
    let flags = u16::from_be_bytes([h[16], h[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(err(
            "handshake",
            "the server does not speak the fixed newstyle",
        ));
    }
    let mut client = CLIENT_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= CLIENT_NO_ZEROES;
    }
    s.write_all(&client.to_be_bytes())
        .await
        .map_err(|e| err("handshake", e))?;
    if let Some((config, name)) = &settings.tls {
        send_option(&mut s, OPT_STARTTLS, &[])
            .await
            .map_err(|e| err("handshake", e))?;
        let (kind, data) = option_reply(&mut s, OPT_STARTTLS).await?;
        if kind != REP_ACK {
            return Err(option_error(kind, &data, "STARTTLS"));
        }
        let server = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| err("TLS", format!("{name:?}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(server, s)
            .await
            .map_err(|e| err("TLS", e))?;
        s = Box::new(tls);
    }
    let name = settings.export.as_bytes();
    let mut go = Vec::with_capacity(8 + name.len());
    go.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(&mut s, OPT_GO, &go)
        .await
        .map_err(|e| err("handshake", e))?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        max_payload: MAX_PAYLOAD,
    };
    let mut got_export = false;
    loop {
        let (kind, data) = option_reply(&mut s, OPT_GO).await?;
        match kind {
            REP_INFO => {
                parse_info(&data, &mut info)?;
                got_export |= data.get(0..2) == Some(&INFO_EXPORT.to_be_bytes()[..]);
            }
            REP_ACK => break,
            k if k & REP_FLAG_ERROR != 0 => {
                return Err(option_error(
                    k,
                    &data,
                    &format!("export {:?}", settings.export),
                ));
            }
            // Other replies are for other options' information: skipped.
            _ => {}
        }
    }
    if !got_export {
        return Err(err(
            "handshake",
            "the server did not give the export's size",
        ));
    }
    if info.flags & TFLAG_SEND_FLUSH == 0 && info.flags & TFLAG_READ_ONLY == 0 {
        return Err(err(
            "handshake",
            "the export cannot flush: its writes could never be known durable",
        ));
    }
    Ok((s, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's harness reaches past the handshake: the seed
    /// transcript (a greeting, option replies, then a read's reply) gets
    /// its read answered; cut anywhere in the handshake, it fails cleanly.
    #[test]
    fn the_fuzz_harness_reaches_the_replies() {
        let seed = include_bytes!("../../../fuzz/seeds/nbd_client/transcript");
        assert_eq!(fuzz_server(seed), Some(true));
        assert_eq!(fuzz_server(&seed[..17]), None);
        assert_eq!(fuzz_server(&seed[..60]), None);
    }

    #[test]
    fn urls() {
        for login in [
            "nbd://user:hunter2@host/x",
            "nbd://user:hunter2@host:10809/x",
            "nbds://user:hunter2@[::1]:10809/x",
        ] {
            let e = parse_url(login).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        assert!(parse_url("nbd://ho st/x").is_err());
        assert_eq!(
            parse_url("nbd://store.example:10900/team").unwrap(),
            (
                NbdAddr::Tcp("store.example".into(), 10900),
                "team".into(),
                false
            )
        );
        assert_eq!(
            parse_url("nbds://10.0.0.2/a%20b").unwrap(),
            (
                NbdAddr::Tcp("10.0.0.2".into(), DEFAULT_PORT),
                "a b".into(),
                true
            )
        );
        assert_eq!(
            parse_url("nbd://[::1]:99/").unwrap(),
            (NbdAddr::Tcp("::1".into(), 99), String::new(), false)
        );
        assert_eq!(
            parse_url("nbd+unix:///x?socket=/run/nbd.sock").unwrap(),
            (NbdAddr::Unix("/run/nbd.sock".into()), "x".into(), false)
        );
        for bad in [
            "nbd:/x",
            "http://x/y",
            "nbd://",
            "nbd://h:port/x",
            "nbd://h/x?socket=/s",
            "nbd+unix://h/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=rel",
            "nbd://h/%zz",
            "nbd://[::1/x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_are_checked() {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_simple_reply(&h).unwrap().2, 7);
        h[0] ^= 1;
        assert!(parse_simple_reply(&h).is_err());
        let mut info = ExportInfo {
            size: 0,
            flags: 0,
            max_payload: MAX_PAYLOAD,
        };
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&(1u64 << 30).to_be_bytes());
        d.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
        parse_info(&d, &mut info).unwrap();
        assert_eq!(info.size, 1 << 30);
        assert!(parse_info(&d[..5], &mut info).is_err());
        assert!(parse_info(&[], &mut info).is_err());
    }
}

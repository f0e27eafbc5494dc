//! The serving side: the two listeners (plain with StartTLS, and
//! LDAPS), a thread per connection within caps, TLS, the framing of
//! requests, and the state the daemon drives (directory, live state,
//! TLS configuration), the bind throttle, the KDF pool and the events.

use crate::kdf::KdfPool;
use crate::session::Session;
use crate::spec::{Directory, DirectorySpec, Live, SpecError, canonical_ip};
use crate::throttle::Throttle;
use crate::tree::OID_STARTTLS;
use bytes::BytesMut;
use ldap3_proto::proto::{LdapMsg, LdapOp};
use ldap3_proto::{DEFAULT_MAX_BER_SIZE, LdapCodec};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::codec::{Decoder, Encoder};
use zeroize::{Zeroize, Zeroizing};

/// Connections one address may hold at once.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 16;
/// Connections in all.
pub const MAX_CONNECTIONS: usize = 256;
/// A TLS handshake must end within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection silent this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// A client that does not read its answers within this loses its
/// connection (it must not hold a thread).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request (the codec's own limit).
pub const MAX_REQUEST: usize = DEFAULT_MAX_BER_SIZE;
/// Bind events kept until the daemon drains them.
pub const MAX_EVENTS: usize = 1000;

/// What became of a bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Bound.
    Ok,
    /// The KDF ran and the password was not the member's.
    WrongPassword,
    /// No such user for this client (or a name that is no user's).
    NotPermitted,
    /// The member has no live session.
    NoSession,
    /// The vault is locked.
    Locked,
    /// The member has no (valid) workload password.
    NoPassword,
    /// Within the wait after a wrong password.
    Throttled,
    /// The KDF's queue was full.
    Busy,
}

/// One bind, for the daemon's audit log. Never a password; `user` is a
/// known user's name or empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The client's address.
    pub client: String,
    /// Its workload.
    pub workload: String,
    /// The user it bound as (a known name, or "").
    pub user: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections served.
    pub connections: AtomicU64,
    /// Connections closed at accept: an address with no client entry.
    pub refused_addresses: AtomicU64,
    /// Searches answered.
    pub searches: AtomicU64,
    /// Binds answered.
    pub binds: AtomicU64,
}

/// The live state, as kept.
#[derive(Debug)]
pub(crate) struct LiveState {
    pub locked: bool,
    pub present: HashSet<String>,
}

#[derive(Default)]
pub(crate) struct Events {
    queue: VecDeque<Event>,
    dropped: u64,
}

/// A connection's place in the per-address count, given back when it is
/// dropped (the connection ended, or its thread panicked).
struct Slot<'a> {
    server: &'a Server,
    ip: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server.disconnected(self.ip);
    }
}

/// The server's shared state.
pub struct Server {
    directory: RwLock<Arc<Directory>>,
    live: RwLock<Arc<LiveState>>,
    tls: RwLock<Option<Arc<ServerConfig>>>,
    pub(crate) kdf: KdfPool,
    pub(crate) throttle: Mutex<Throttle>,
    events: Mutex<Events>,
    conns: Mutex<HashMap<IpAddr, usize>>,
    /// What it has done.
    pub stats: Stats,
}

/// Why a TLS configuration was refused.
#[derive(Debug, thiserror::Error)]
#[error("the LDAP server's TLS configuration: {0}")]
pub struct TlsError(String);

impl Server {
    /// A server with no directory (every connection refused), locked, no
    /// TLS configuration.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            directory: RwLock::new(Arc::new(Directory::empty())),
            live: RwLock::new(Arc::new(LiveState {
                locked: true,
                present: HashSet::new(),
            })),
            tls: RwLock::new(None),
            kdf: KdfPool::new()?,
            throttle: Mutex::new(Throttle::default()),
            events: Mutex::new(Events::default()),
            conns: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        })
    }

    /// Replaces the directory (at once, for every connection's next
    /// operation). Returns what was left out, with why.
    pub fn set_directory(&self, spec: DirectorySpec) -> Result<Vec<(String, String)>, SpecError> {
        let (d, failed) = Directory::new(spec)?;
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(d);
        Ok(failed)
    }

    /// Replaces the live state.
    pub fn set_live(&self, live: Live) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(LiveState {
            locked: live.locked,
            present: live.present.into_iter().collect(),
        });
    }

    /// Sets the certificate chain and key new connections use.
    pub fn set_tls(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let config = tls_config(chain_pem, key_pem)?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(config));
        Ok(())
    }

    pub(crate) fn directory(&self) -> Arc<Directory> {
        Arc::clone(&self.directory.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn live(&self) -> Arc<LiveState> {
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn tls_config(&self) -> Option<Arc<ServerConfig>> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn event(&self, ip: IpAddr, workload: String, user: &str, outcome: Outcome) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if ev.queue.len() >= MAX_EVENTS {
            ev.dropped += 1;
            return;
        }
        ev.queue.push_back(Event {
            at_ms,
            client: ip.to_string(),
            workload,
            user: user.to_string(),
            outcome,
        });
    }

    /// The bind events since the last call, and how many did not fit.
    pub fn drain_events(&self) -> (Vec<Event>, u64) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut ev.dropped);
        (ev.queue.drain(..).collect(), dropped)
    }

    /// Serves on `plain` (StartTLS required) and `ldaps` (TLS from the
    /// first byte) until the process ends.
    pub fn serve(self: &Arc<Self>, plain: TcpListener, ldaps: TcpListener) -> io::Result<()> {
        let s = Arc::clone(self);
        std::thread::Builder::new()
            .name("ldaps-accept".into())
            .spawn(move || s.accept(&ldaps, true))?;
        self.accept(&plain, false);
        Ok(())
    }

    fn accept(self: &Arc<Self>, l: &TcpListener, ldaps: bool) {
        for conn in l.incoming() {
            let Ok(conn) = conn else {
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let Ok(peer) = conn.peer_addr() else { continue };
            let ip = canonical_ip(peer.ip());
            // Only the VMs the directory names; the firewall says the same.
            if !self.directory().knows(ip) {
                self.stats.refused_addresses.fetch_add(1, Ordering::Relaxed);
                let _ = conn.shutdown(Shutdown::Both);
                continue;
            }
            let Some(config) = self.tls_config() else {
                // Nothing is served in clear: without a certificate, nothing.
                let _ = conn.shutdown(Shutdown::Both);
                continue;
            };
            {
                let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                let total: usize = conns.values().sum();
                let mine = conns.entry(ip).or_insert(0);
                if *mine >= MAX_CONNECTIONS_PER_ADDRESS || total >= MAX_CONNECTIONS {
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                *mine += 1;
            }
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let s = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("ldap-conn".into())
                .spawn(move || {
                    // Given back however the connection ends, a panic
                    // included.
                    let _slot = Slot { server: &s, ip };
                    let _ = s.connection(conn, ip, ldaps, config);
                });
            if spawned.is_err() {
                self.disconnected(ip);
            }
        }
    }

    /// Gives back a connection's slot in the per-address count.
    fn disconnected(&self, ip: IpAddr) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = conns.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&ip);
            }
        }
    }

    fn connection(
        &self,
        sock: TcpStream,
        ip: IpAddr,
        ldaps: bool,
        config: Arc<ServerConfig>,
    ) -> io::Result<()> {
        let _ = sock.set_nodelay(true);
        sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let mut stream = if ldaps {
            Stream::Tls(Box::new(handshake(sock, Arc::clone(&config))?))
        } else {
            sock.set_read_timeout(Some(IDLE_TIMEOUT))?;
            Stream::Plain(sock)
        };
        let mut session = Session::new(ip, ldaps);
        let mut input = Input::new();
        loop {
            let msg = match input.next(&mut stream) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(Malformed) => {
                    let _ =
                        write_msgs(&mut stream, vec![crate::session::notice_of_disconnection()]);
                    break;
                }
            };
            let starttls = matches!(&msg.op, LdapOp::ExtendedRequest(r) if r.name == OID_STARTTLS);
            // Bytes after a StartTLS request would be read as if they came
            // through TLS (the plaintext injection of CVE-2011-0411): look
            // for any before answering.
            let pipelined = starttls && (!input.is_empty() || stream.has_more(&mut input));
            let (replies, after) = self.handle(&mut session, msg, pipelined);
            write_msgs(&mut stream, replies)?;
            match after {
                crate::session::After::Continue => {}
                crate::session::After::Close => break,
                crate::session::After::StartTls => {
                    let Stream::Plain(sock) = stream else { break };
                    let config = self.tls_config().unwrap_or_else(|| Arc::clone(&config));
                    stream = Stream::Tls(Box::new(handshake(sock, config)?));
                    session.tls = true;
                }
            }
        }
        if let Stream::Tls(t) = &mut stream {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        let _ = stream.sock().shutdown(Shutdown::Both);
        Ok(())
    }
}

/// A listening socket on `addr` for the daemon to bind before it starts
/// the server (port 389 or 636 need privileges the server lacks). Bound
/// even if the address is not up yet: it is on the VMs' links, which may
/// come later.
pub fn bind_listener(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(64)?;
    Ok(s.into())
}

fn tls_config(chain_pem: &str, key_pem: &str) -> Result<ServerConfig, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let e = |x: &dyn std::fmt::Display| TlsError(x.to_string());
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|x| e(&x))?;
    if chain.is_empty() {
        return Err(TlsError("no certificate in chain_pem".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|x| e(&x))?;
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|x| e(&x))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|x| e(&x))
}

/// A TLS server connection on `sock`, handshaken within
/// [`HANDSHAKE_TIMEOUT`].
fn handshake(
    sock: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<StreamOwned<ServerConnection, TcpStream>> {
    handshake_within(sock, config, HANDSHAKE_TIMEOUT)
}

/// A socket whose every read and write must end by `deadline`: rustls's
/// `complete_io` reads on in its own loop while the handshake lasts, so a
/// timeout set once per call let a client trickling one byte at a time
/// keep a handshake (and its connection slot) for hours.
struct Deadlined<'a> {
    sock: &'a mut TcpStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> io::Result<Duration> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"))
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.sock.set_write_timeout(Some(left))?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

fn handshake_within(
    mut sock: TcpStream,
    config: Arc<ServerConfig>,
    within: Duration,
) -> io::Result<StreamOwned<ServerConnection, TcpStream>> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let deadline = Instant::now() + within;
    while conn.is_handshaking() {
        let mut io = Deadlined {
            sock: &mut sock,
            deadline,
        };
        io.left()?;
        let (r, w) = conn.complete_io(&mut io)?;
        if r == 0 && w == 0 && conn.is_handshaking() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "TLS handshake",
            ));
        }
    }
    sock.set_read_timeout(Some(IDLE_TIMEOUT))?;
    sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(StreamOwned::new(conn, sock))
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    fn sock(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }

    /// Whether the client already sent more (reads it into `input`).
    fn has_more(&mut self, input: &mut Input) -> bool {
        let Stream::Plain(s) = self else { return false };
        if s.set_nonblocking(true).is_err() {
            return true;
        }
        let got = input.fill(s);
        let restored = s.set_nonblocking(false).is_ok();
        !matches!(got, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock) || !restored
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// `m` as sent on the wire.
pub fn encode(m: LdapMsg) -> io::Result<Vec<u8>> {
    let mut buf = BytesMut::new();
    LdapCodec::default().encode(m, &mut buf)?;
    Ok(buf.to_vec())
}

fn write_msgs(w: &mut impl Write, msgs: Vec<LdapMsg>) -> io::Result<()> {
    let mut codec = LdapCodec::default();
    let mut buf = BytesMut::new();
    for m in msgs {
        codec.encode(m, &mut buf)?;
        // Written as it goes: a big search result is not held twice.
        if buf.len() >= 64 * 1024 {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)?;
    w.flush()
}

/// A request that is not LDAP (or over [`MAX_REQUEST`]): the connection
/// ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// The bytes a connection has sent and not yet been decoded, in a buffer
/// of fixed capacity (never reallocated, wiped as it is consumed: bind
/// requests carry passwords).
pub struct Input {
    buf: Zeroizing<Vec<u8>>,
}

const CHUNK: usize = 16 * 1024;

impl Default for Input {
    fn default() -> Self {
        Self::new()
    }
}

impl Input {
    /// An empty buffer.
    pub fn new() -> Self {
        Self {
            buf: Zeroizing::new(Vec::with_capacity(MAX_REQUEST + CHUNK)),
        }
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends what `src` has (one read).
    fn fill(&mut self, src: &mut impl Read) -> io::Result<usize> {
        let mut chunk = Zeroizing::new([0u8; CHUNK]);
        let room = (MAX_REQUEST + CHUNK - self.buf.len()).min(CHUNK);
        let n = src.read(&mut chunk[..room])?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Appends `bytes` (for tests and the fuzz target); `Malformed` if
    /// they do not fit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), Malformed> {
        if self.buf.len() + bytes.len() > MAX_REQUEST + CHUNK {
            return Err(Malformed);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next request from what is buffered: `Ok(None)` if it is not
    /// all there yet.
    pub fn decode(&mut self) -> Result<Option<LdapMsg>, Malformed> {
        let Some(len) = frame_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < len {
            return Ok(None);
        }
        let mut pdu = BytesMut::with_capacity(len);
        pdu.extend_from_slice(&self.buf[..len]);
        let rest = self.buf.len() - len;
        self.buf.copy_within(len.., 0);
        self.buf[rest..].zeroize();
        self.buf.truncate(rest);
        let decoded = LdapCodec::default().decode(&mut pdu);
        let whole = pdu.is_empty();
        // The codec cleared it (it took the whole request): wipe it all.
        pdu.clear();
        pdu.resize(pdu.capacity(), 0);
        match decoded {
            Ok(Some(m)) if whole => Ok(Some(m)),
            _ => Err(Malformed),
        }
    }

    /// The next request from `src`; `Ok(None)` at its end (or a timeout,
    /// or a read error: the connection is over either way).
    fn next(&mut self, src: &mut impl Read) -> Result<Option<LdapMsg>, Malformed> {
        loop {
            if let Some(m) = self.decode()? {
                return Ok(Some(m));
            }
            match self.fill(src) {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }
}

/// The length of the BER element at the start of `b` (an LDAPMessage is
/// a SEQUENCE with a definite length), once its header is there.
pub fn frame_len(b: &[u8]) -> Result<Option<usize>, Malformed> {
    let Some(&tag) = b.first() else {
        return Ok(None);
    };
    if tag != 0x30 {
        return Err(Malformed);
    }
    let Some(&first) = b.get(1) else {
        return Ok(None);
    };
    if first < 0x80 {
        return Ok(Some(2 + usize::from(first)));
    }
    let n = usize::from(first & 0x7f);
    // 0x80 is the indefinite form, which LDAP forbids (RFC 4511 §5.1).
    if n == 0 || n > 4 {
        return Err(Malformed);
    }
    let Some(digits) = b.get(2..2 + n) else {
        return Ok(None);
    };
    let len = digits
        .iter()
        .fold(0usize, |a, &d| (a << 8) | usize::from(d));
    let total = 2 + n + len;
    if total > MAX_REQUEST {
        return Err(Malformed);
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose thread panics gives its slot back (else an
    /// address would lose one of its few connections for good).
    #[test]
    fn a_panicking_connection_gives_its_slot_back() {
        let server = Server::new().unwrap();
        let ip = IpAddr::from([10, 9, 0, 10]);
        server.conns.lock().unwrap().insert(ip, 2);
        std::thread::scope(|sc| {
            let t = sc.spawn(|| {
                let _slot = Slot {
                    server: &server,
                    ip,
                };
                panic!("a bug in a connection");
            });
            assert!(t.join().is_err());
        });
        assert_eq!(server.conns.lock().unwrap().get(&ip), Some(&1));
    }

    /// A client that trickles its ClientHello a byte at a time loses its
    /// connection at the handshake's deadline (before, each byte gave it
    /// a new read timeout).
    #[test]
    fn a_trickled_handshake_ends_at_its_deadline() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = Arc::new(tls_config(&cert.pem(), &key.serialize_pem()).unwrap());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(at).unwrap();
            // A handshake record of 512 bytes, sent one byte at a time.
            let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(100));
                if c.write_all(&[0]).is_err() {
                    return;
                }
            }
        });
        let (sock, _) = l.accept().unwrap();
        let t = Instant::now();
        let Err(e) = handshake_within(sock, config, Duration::from_millis(800)) else {
            panic!("a handshake that never completes completed");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        client.join().unwrap();
    }

    #[test]
    fn frames() {
        assert_eq!(frame_len(&[]), Ok(None));
        assert_eq!(frame_len(&[0x30]), Ok(None));
        assert_eq!(frame_len(&[0x30, 5]), Ok(Some(7)));
        assert_eq!(frame_len(&[0x30, 0x82, 1]), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x82, 1, 0]), Ok(Some(260)));
        assert_eq!(frame_len(&[0x30, 0x80]), Err(Malformed));
        assert_eq!(frame_len(&[0x31, 5]), Err(Malformed));
        assert_eq!(
            frame_len(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(Malformed)
        );
    }

    #[test]
    fn requests_split_anywhere_decode_once_and_leave_nothing() {
        let bind = [
            0x30, 0x0c, 0x02, 0x01, 0x01, 0x60, 0x07, 0x02, 0x01, 0x03, 0x04, 0x00, 0x80, 0x00,
        ];
        let unbind = [0x30, 0x05, 0x02, 0x01, 0x02, 0x42, 0x00];
        let all: Vec<u8> = bind.iter().chain(&unbind).copied().collect();
        for cut in 0..all.len() {
            let mut input = Input::new();
            let mut got = Vec::new();
            input.push(&all[..cut]).unwrap();
            while let Some(m) = input.decode().unwrap() {
                got.push(m.msgid);
            }
            input.push(&all[cut..]).unwrap();
            while let Some(m) = input.decode().unwrap() {
                got.push(m.msgid);
            }
            assert_eq!(got, [1, 2], "cut at {cut}");
            assert!(input.is_empty());
        }
        let mut input = Input::new();
        input.push(&[0x30, 0x03, 0x02, 0x01]).unwrap();
        input.push(&[0x01]).unwrap();
        assert_eq!(input.decode(), Err(Malformed), "no operation");
    }
}

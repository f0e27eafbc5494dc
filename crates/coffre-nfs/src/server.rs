//! The serving side: listeners (NFS and MOUNT on one TCP port, the
//! portmapper on TCP and UDP), a bounded pool of worker threads (each
//! call runs on one, which takes the export's identity for it), the
//! duplicate-request cache, and the open/closed state the daemon drives.
//!
//! While the vault is closed there is no key and no descriptor on the
//! data: NFS calls are answered `NFS3ERR_JUKEBOX` (the Linux client
//! waits and retries; applications see nothing) and MOUNT calls are held
//! until the vault opens.

use crate::broker::{Handles, Keeper};
use crate::fs::{Export, ExportSpec, failure_body};
use crate::handle::HandleKey;
use crate::proto::{self, Mount, Nfs, status};
use crate::rpc::{self, Accept, PROG_MOUNT, PROG_NFS, PROG_PORTMAP};
use crate::xdr::Writer;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

/// Connections one address may hold at once (the Linux client uses one
/// per mount, plus one for MOUNT).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 8;
/// Connections in all.
pub const MAX_CONNECTIONS: usize = 256;
/// Calls one address may have in the workers' hands at once: a guest
/// cannot take every worker from the others.
pub const MAX_IN_FLIGHT_PER_ADDRESS: usize = 6;
/// Non-idempotent replies kept per address in the duplicate-request
/// cache (a guest cannot flush another's).
pub const DRC_PER_ADDRESS: usize = 1024;
/// A reply the client does not read within this long ends its
/// connection (a guest that stops reading must not hold a worker).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle this long is closed (the client reconnects).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where the server listens.
#[derive(Clone, Debug)]
pub struct Listen {
    /// The vault network's host address.
    pub addr: Ipv4Addr,
    /// NFS and MOUNT (TCP), normally 2049.
    pub nfs_port: u16,
    /// The portmapper (TCP and UDP), normally 111; `None`: none.
    pub portmap_port: Option<u16>,
    /// The mark (SO_MARK) on the portmapper's UDP socket, by which the
    /// vault's firewall keeps its packets to the workloads' links.
    pub udp_mark: Option<u32>,
    /// The one link whose connections these sockets take
    /// (`SO_BINDTODEVICE`): each VM's server listens on its VM's tap
    /// alone, so that the same address and ports serve every VM, each by
    /// a server of its own. `None`: any link.
    pub device: Option<String>,
}

/// The listening sockets, bound (before privileges are dropped).
pub struct Sockets {
    nfs: TcpListener,
    portmap: Option<(TcpListener, UdpSocket)>,
    nfs_port: u16,
}

fn bind_tcp(addr: SocketAddr, device: Option<&str>) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes()))?;
    }
    // The address is on the workloads' links, which may come later.
    s.set_freebind_v4(true)?;
    s.bind(&addr.into())?;
    s.listen(64)?;
    Ok(s.into())
}

impl Sockets {
    /// Binds every listener.
    pub fn bind(l: &Listen) -> io::Result<Self> {
        let device = l.device.as_deref();
        let nfs = bind_tcp(SocketAddr::new(IpAddr::V4(l.addr), l.nfs_port), device)?;
        let nfs_port = nfs.local_addr()?.port();
        let portmap = match l.portmap_port {
            Some(p) => {
                let t = bind_tcp(SocketAddr::new(IpAddr::V4(l.addr), p), device)?;
                let u = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
                u.set_freebind_v4(true)?;
                if let Some(d) = device {
                    u.bind_device(Some(d.as_bytes()))?;
                }
                if let Some(m) = l.udp_mark {
                    u.set_mark(m)?;
                }
                u.bind(&t.local_addr()?.into())?;
                Some((t, u.into()))
            }
            None => None,
        };
        Ok(Self {
            nfs,
            portmap,
            nfs_port,
        })
    }

    /// The NFS port actually bound (for tests that ask for port 0).
    pub fn nfs_port(&self) -> u16 {
        self.nfs_port
    }

    /// The descriptors, to hand to the server's process: NFS, then the
    /// portmapper's TCP and UDP sockets when there are.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        let mut v = vec![OwnedFd::from(self.nfs)];
        if let Some((t, u)) = self.portmap {
            v.push(OwnedFd::from(t));
            v.push(OwnedFd::from(u));
        }
        v
    }

    /// The sockets back from descriptors made by [`Sockets::into_fds`].
    pub fn from_fds(fds: Vec<OwnedFd>) -> io::Result<Self> {
        let mut it = fds.into_iter();
        let nfs = TcpListener::from(it.next().ok_or_else(|| io::Error::other("no NFS socket"))?);
        let portmap = match (it.next(), it.next()) {
            (Some(t), Some(u)) => Some((TcpListener::from(t), UdpSocket::from(u))),
            _ => None,
        };
        let nfs_port = nfs.local_addr()?.port();
        Ok(Self {
            nfs,
            portmap,
            nfs_port,
        })
    }
}

/// The open vault, as the server sees it.
struct Live {
    /// The handle broker (the key lies behind it).
    handles: Arc<dyn Handles>,
    /// This open's WRITE verifier ([`crate::fs::write_verifier`]).
    verifier: [u8; 8],
    exports: HashMap<Ipv4Addr, Export>,
}

/// Counters, for the daemon's status and the tests.
#[derive(Default, Debug)]
pub struct Stats {
    /// Calls answered.
    pub calls: AtomicU64,
    /// Calls answered JUKEBOX because the vault was closed.
    pub jukebox: AtomicU64,
    /// Retransmissions answered from the duplicate-request cache.
    pub replayed: AtomicU64,
    /// Connections refused (an address no export has).
    pub refused: AtomicU64,
}

/// The server's shared state.
pub struct Server {
    specs: RwLock<HashMap<Ipv4Addr, ExportSpec>>,
    live: RwLock<Option<Live>>,
    opened: (Mutex<u64>, Condvar),
    drc: Mutex<Drc>,
    nfs_port: AtomicU64,
    /// Connections by address.
    conns: Mutex<HashMap<Ipv4Addr, usize>>,
    /// Calls in the workers' hands, by address.
    in_flight: (Mutex<HashMap<Ipv4Addr, usize>>, Condvar),
    /// Bumped at each close: workers then scrub their stacks.
    closes: AtomicU64,
    /// What it has done.
    pub stats: Stats,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with no export, closed.
    pub fn new() -> Self {
        Self {
            specs: RwLock::new(HashMap::new()),
            live: RwLock::new(None),
            opened: (Mutex::new(0), Condvar::new()),
            drc: Mutex::new(Drc::new(DRC_PER_ADDRESS)),
            nfs_port: AtomicU64::new(2049),
            conns: Mutex::new(HashMap::new()),
            in_flight: (Mutex::new(HashMap::new()), Condvar::new()),
            closes: AtomicU64::new(0),
            stats: Stats::default(),
        }
    }

    /// Replaces the exports. While open, their directories are opened
    /// anew; returns the workloads whose directory could not be opened.
    pub fn set_exports(&self, specs: Vec<ExportSpec>) -> Vec<(String, String)> {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        *self.specs.write().unwrap_or_else(|p| p.into_inner()) =
            specs.iter().map(|s| (s.client, s.clone())).collect();
        match live.as_mut() {
            Some(l) => {
                // The broker first (a Keeper in this process; the
                // broker's process has done it before telling us).
                let mut failed = l.handles.exports(&specs);
                let (exports, more) = open_all(&specs, &*l.handles);
                l.exports = exports;
                merge(&mut failed, more);
                failed
            }
            None => Vec::new(),
        }
    }

    /// The exports, as last set.
    fn specs(&self) -> Vec<ExportSpec> {
        self.specs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The vault opened: serve through this broker (which holds the key).
    /// Returns the exports whose directory could not be opened (their
    /// calls get STALE).
    pub fn open(&self, handles: Arc<dyn Handles>) -> Vec<(String, String)> {
        let specs = self.specs();
        let (exports, failed) = open_all(&specs, &*handles);
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(Live {
            handles,
            verifier: crate::fs::write_verifier(),
            exports,
        });
        let (m, cv) = &self.opened;
        *m.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cv.notify_all();
        failed
    }

    /// The vault opened, its handles kept in this process (a [`Keeper`]
    /// of its own: tests, and a server with no broker process).
    pub fn open_in_process(&self, key: HandleKey) -> Vec<(String, String)> {
        let specs = self.specs();
        let (keeper, mut failed) = Keeper::open(key, &specs);
        merge(&mut failed, self.open(Arc::new(keeper)));
        failed
    }

    /// The vault closes: waits for the calls in flight, then drops every
    /// descriptor on the data and the key.
    pub fn close(&self) {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        *live = None;
        drop(live);
        self.closes.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the server holds the key and the exports' directories.
    pub fn is_open(&self) -> bool {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Serves on `sockets` with `workers` threads, until the process
    /// ends.
    pub fn serve(self: &Arc<Self>, sockets: Sockets, workers: usize) -> io::Result<()> {
        self.nfs_port
            .store(u64::from(sockets.nfs_port), Ordering::Relaxed);
        let (tx, rx) = sync_channel::<Job>(workers * 4);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let (s, rx) = (Arc::clone(self), Arc::clone(&rx));
            std::thread::Builder::new()
                .name("nfs-worker".into())
                .spawn(move || s.work(&rx))?;
        }
        if let Some((t, u)) = sockets.portmap {
            let (s, tx2) = (Arc::clone(self), tx.clone());
            std::thread::Builder::new()
                .name("portmap-tcp".into())
                .spawn(move || s.accept(&t, &tx2))?;
            let s = Arc::clone(self);
            std::thread::Builder::new()
                .name("portmap-udp".into())
                .spawn(move || s.portmap_udp(&u))?;
        }
        self.accept(&sockets.nfs, &tx);
        Ok(())
    }

    fn accept(self: &Arc<Self>, l: &TcpListener, tx: &SyncSender<Job>) {
        for conn in l.incoming() {
            let Ok(conn) = conn else {
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let Ok(SocketAddr::V4(peer)) = conn.peer_addr() else {
                continue;
            };
            let ip = *peer.ip();
            let known = self
                .specs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&ip);
            // Only workloads with a share; the firewall says the same.
            if !known {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let _ = conn.shutdown(std::net::Shutdown::Both);
                continue;
            }
            {
                let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                let total: usize = conns.values().sum();
                let mine = conns.entry(ip).or_insert(0);
                if *mine >= MAX_CONNECTIONS_PER_ADDRESS || total >= MAX_CONNECTIONS {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                *mine += 1;
            }
            let _ = conn.set_nodelay(true);
            let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
            let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
            let (s, tx) = (Arc::clone(self), tx.clone());
            let spawned = std::thread::Builder::new()
                .name("nfs-conn".into())
                .spawn(move || {
                    // Given back however the connection ends, a panic
                    // included.
                    let _slot = Slot { server: &s, ip };
                    s.connection(conn, ip, &tx);
                });
            if spawned.is_err() {
                self.disconnected(ip);
            }
        }
    }

    /// Gives back a connection's slot in the per-address count.
    fn disconnected(&self, ip: Ipv4Addr) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = conns.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&ip);
            }
        }
    }

    /// Waits for a free slot among `ip`'s calls in flight.
    fn begin_call(&self, ip: Ipv4Addr) {
        let (m, cv) = &self.in_flight;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        while g.get(&ip).copied().unwrap_or(0) >= MAX_IN_FLIGHT_PER_ADDRESS {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        *g.entry(ip).or_insert(0) += 1;
    }

    fn end_call(&self, ip: Ipv4Addr) {
        let (m, cv) = &self.in_flight;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(&ip);
            }
        }
        cv.notify_all();
    }

    fn connection(self: &Arc<Self>, conn: TcpStream, ip: Ipv4Addr, tx: &SyncSender<Job>) {
        let Ok(writer) = conn.try_clone() else { return };
        // Replies go out through a thread of their own, so a client that
        // does not read them stalls only itself: workers hand a reply
        // over and go on. Its calls in flight are released as their
        // replies are written (or dropped, once the connection failed).
        let (out, replies) = sync_channel::<Option<Vec<u8>>>(MAX_IN_FLIGHT_PER_ADDRESS + 2);
        let s = Arc::clone(self);
        let Ok(writer_thread) = std::thread::Builder::new()
            .name("nfs-replies".into())
            .spawn(move || s.write_replies(writer, ip, &replies))
        else {
            return;
        };
        let mut reader = io::BufReader::with_capacity(256 * 1024, &conn);
        loop {
            let mut rec = Vec::new();
            match rpc::read_record(&mut reader, &mut rec, rpc::MAX_RECORD) {
                Ok(true) => {}
                _ => break,
            }
            // This connection stops reading while its address has its
            // share of the workers: the client's own window then holds it.
            self.begin_call(ip);
            let job = Job {
                ip,
                record: rec,
                out: out.clone(),
            };
            if tx.send(job).is_err() {
                self.end_call(ip);
                break;
            }
        }
        drop(out);
        let _ = conn.shutdown(std::net::Shutdown::Read);
        let _ = writer_thread.join();
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }

    fn write_replies(&self, mut w: TcpStream, ip: Ipv4Addr, replies: &Receiver<Option<Vec<u8>>>) {
        let mut broken = false;
        while let Ok(reply) = replies.recv() {
            if let (Some(r), false) = (reply, broken) {
                // A client that does not read its replies loses its
                // connection after WRITE_TIMEOUT.
                if w.write_all(&r).is_err() {
                    broken = true;
                    let _ = w.shutdown(std::net::Shutdown::Both);
                }
            }
            self.end_call(ip);
        }
    }

    fn work(&self, rx: &Mutex<Receiver<Job>>) {
        let mut scrubbed = self.closes.load(Ordering::SeqCst);
        loop {
            let job = {
                let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                rx.recv_timeout(Duration::from_secs(1))
            };
            // After a close, what the last calls left on this stack (the
            // MAC's keyed state) goes.
            let closes = self.closes.load(Ordering::SeqCst);
            if closes != scrubbed {
                coffre_luks2::secret::scrub_stack();
                scrubbed = closes;
            }
            let job = match job {
                Ok(j) => j,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let reply = self.answer(job.ip, &job.record);
            // Never blocks: the connection's queue has room for all of
            // its address's calls in flight.
            if job.out.send(reply).is_err() {
                self.end_call(job.ip);
            }
        }
    }

    /// The reply to one record from `ip`, or `None` to send nothing (not
    /// a call, or a retransmission of a call still running).
    pub fn answer(&self, ip: Ipv4Addr, record: &[u8]) -> Option<Vec<u8>> {
        let (call, args) = match rpc::parse_call(record) {
            Ok(c) => c,
            Err(rpc::RpcError::Version(xid, _)) => return Some(rpc::frame(rpc::rpc_mismatch(xid))),
            Err(_) => return None,
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let reply = match (call.prog, call.vers) {
            (PROG_NFS, 3) => return self.nfs(ip, call.xid, call.proc_, args),
            (PROG_NFS, _) => rpc::accepted(call.xid, Accept::ProgMismatch(3, 3)),
            (PROG_MOUNT, 3) => self.mount(ip, call.xid, call.proc_, args)?,
            (PROG_MOUNT, _) => rpc::accepted(call.xid, Accept::ProgMismatch(3, 3)),
            (PROG_PORTMAP, 2) => self.portmap(call.xid, call.proc_, args),
            (PROG_PORTMAP, _) => rpc::accepted(call.xid, Accept::ProgMismatch(2, 2)),
            _ => rpc::accepted(call.xid, Accept::ProgUnavail),
        };
        Some(rpc::frame(reply))
    }

    fn nfs(&self, ip: Ipv4Addr, xid: u32, proc_: u32, args: &[u8]) -> Option<Vec<u8>> {
        let call = match proto::decode_nfs(proc_, args) {
            Ok(Some(c)) => c,
            Ok(None) => return Some(rpc::frame(rpc::accepted(xid, Accept::ProcUnavail))),
            Err(_) => return Some(rpc::frame(rpc::accepted(xid, Accept::GarbageArgs))),
        };
        if matches!(call, Nfs::Null) {
            return Some(rpc::frame(rpc::accepted(xid, Accept::Success)));
        }
        let cached = !call.is_idempotent();
        let key = DrcKey {
            ip,
            xid,
            digest: digest(proc_, args),
        };
        if cached {
            match self.drc_lookup(&key) {
                Some(Some(reply)) => {
                    self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                    return Some(reply);
                }
                Some(None) => return None, // still running: its reply will come
                None => {}
            }
        }
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let mut w = rpc::accepted(xid, Accept::Success);
        let done = match live.as_ref() {
            None => {
                self.stats.jukebox.fetch_add(1, Ordering::Relaxed);
                w.u32(status::JUKEBOX);
                failure_body(&call, &mut w);
                false
            }
            Some(l) => {
                match l.exports.get(&ip) {
                    None => {
                        // Its directory could not be opened (or the export
                        // went): every handle is stale, for now.
                        w.u32(status::STALE);
                        failure_body(&call, &mut w);
                        false
                    }
                    Some(e) => {
                        let mark = w.len();
                        match e.call(&*l.handles, l.verifier, &call, &mut w) {
                            Ok(()) => true,
                            Err(s) => {
                                w.buf.truncate(mark);
                                w.u32(s);
                                failure_body(&call, &mut w);
                                // A fault of ours is no answer to remember.
                                s != status::SERVERFAULT
                            }
                        }
                    }
                }
            }
        };
        drop(live);
        let reply = rpc::frame(w);
        if cached {
            let mut drc = self.drc.lock().unwrap_or_else(|p| p.into_inner());
            if done {
                drc.finish(key, reply.clone());
            } else {
                // JUKEBOX is not an answer to remember: the retry must run.
                drc.forget(&key);
            }
        }
        Some(reply)
    }

    /// `Some(Some(reply))`: answered before; `Some(None)`: running now;
    /// `None`: new (and now marked running).
    fn drc_lookup(&self, key: &DrcKey) -> Option<Option<Vec<u8>>> {
        let mut drc = self.drc.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = drc.map.get(key) {
            return Some(e.clone());
        }
        drc.start(key.clone());
        None
    }

    /// `None`: no answer (a MNT held past its limit while the vault
    /// stays closed: the client asks again).
    fn mount(&self, ip: Ipv4Addr, xid: u32, proc_: u32, args: &[u8]) -> Option<Writer> {
        let call = match proto::decode_mount(proc_, args) {
            Ok(Some(c)) => c,
            Ok(None) => return Some(rpc::accepted(xid, Accept::ProcUnavail)),
            Err(_) => return Some(rpc::accepted(xid, Accept::GarbageArgs)),
        };
        let mut w = rpc::accepted(xid, Accept::Success);
        let spec = self
            .specs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned();
        match call {
            Mount::Null | Mount::Umnt(_) | Mount::Umntall => {}
            Mount::Dump => {
                w.bool(false);
            }
            Mount::Export => {
                if let Some(s) = spec {
                    w.bool(true).opaque(format!("/{}", s.share).as_bytes());
                    w.bool(true)
                        .opaque(s.client.to_string().as_bytes())
                        .bool(false);
                }
                w.bool(false);
            }
            Mount::Mnt(path) => {
                let Some(spec) = spec else {
                    w.u32(13); // MNT3ERR_ACCES
                    return Some(w);
                };
                // Held while the vault is closed: a mount waits for it.
                let live = self.wait_open(Duration::from_secs(60));
                if live.is_none() {
                    return None;
                }
                let root = live.as_ref().and_then(|l| {
                    l.exports
                        .get(&ip)
                        .map(|e| e.mount_handle(&*l.handles, path))
                });
                match root {
                    _ if spec.denied => {
                        w.u32(13); // MNT3ERR_ACCES
                    }
                    Some(Ok(h)) => {
                        w.u32(0).opaque(&h);
                        w.u32(1).u32(1); // AUTH_UNIX
                    }
                    Some(Err(s)) => {
                        // mountstat3 has a few of nfsstat3's numbers.
                        w.u32(match s {
                            status::PERM
                            | status::NOENT
                            | status::ACCES
                            | status::NOTDIR
                            | status::INVAL
                            | status::NAMETOOLONG => s,
                            _ => 5, // MNT3ERR_IO
                        });
                    }
                    None => {
                        w.u32(5); // MNT3ERR_IO: not open, or its directory missing
                    }
                }
            }
        }
        Some(w)
    }

    /// The live state once the vault is open (waiting up to `limit`).
    fn wait_open(&self, limit: Duration) -> std::sync::RwLockReadGuard<'_, Option<Live>> {
        let (m, cv) = &self.opened;
        let deadline = std::time::Instant::now() + limit;
        loop {
            {
                let g = self.live.read().unwrap_or_else(|p| p.into_inner());
                if g.is_some() {
                    return g;
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return self.live.read().unwrap_or_else(|p| p.into_inner());
            }
            let g = m.lock().unwrap_or_else(|p| p.into_inner());
            let _ = cv.wait_timeout(g, (deadline - now).min(Duration::from_millis(500)));
        }
    }

    fn portmap(&self, xid: u32, proc_: u32, args: &[u8]) -> Writer {
        match proc_ {
            0 => rpc::accepted(xid, Accept::Success),
            3 => match proto::decode_getport(args) {
                Ok((prog, vers, prot)) => {
                    let mut w = rpc::accepted(xid, Accept::Success);
                    let ours = matches!((prog, vers), (PROG_NFS, 3) | (PROG_MOUNT, 3)) && prot == 6;
                    let port = if ours {
                        u32::try_from(self.nfs_port.load(Ordering::Relaxed)).unwrap_or(0)
                    } else {
                        0
                    };
                    w.u32(port);
                    w
                }
                Err(_) => rpc::accepted(xid, Accept::GarbageArgs),
            },
            _ => rpc::accepted(xid, Accept::ProcUnavail),
        }
    }

    fn portmap_udp(&self, u: &UdpSocket) {
        let mut buf = vec![0u8; 1500];
        loop {
            let Ok((n, from)) = u.recv_from(&mut buf) else {
                continue;
            };
            let known = match from {
                SocketAddr::V4(a) => self
                    .specs
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(a.ip()),
                SocketAddr::V6(_) => false,
            };
            if !known {
                continue;
            }
            let Ok((call, args)) = rpc::parse_call(&buf[..n]) else {
                continue;
            };
            let reply = if call.prog == PROG_PORTMAP && call.vers == 2 {
                self.portmap(call.xid, call.proc_, args)
            } else {
                rpc::accepted(call.xid, Accept::ProgUnavail)
            };
            // UDP carries no record mark.
            let _ = u.send_to(&reply.buf[4..], from);
        }
    }
}

fn open_all(
    specs: &[ExportSpec],
    handles: &dyn Handles,
) -> (HashMap<Ipv4Addr, Export>, Vec<(String, String)>) {
    let mut exports = HashMap::new();
    let mut failed = Vec::new();
    for s in specs {
        match Export::open(s.clone(), handles) {
            Ok(e) => {
                exports.insert(s.client, e);
            }
            Err(e) => failed.push((s.workload.clone(), e.to_string())),
        }
    }
    (exports, failed)
}

/// A connection's place in the per-address count, given back when it is
/// dropped (the connection ended, or its thread panicked).
struct Slot<'a> {
    server: &'a Server,
    ip: Ipv4Addr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server.disconnected(self.ip);
    }
}

/// Adds to `failed` what `more` says of other workloads (the first word
/// on a workload is the broker's, which says why).
pub fn merge(failed: &mut Vec<(String, String)>, more: Vec<(String, String)>) {
    for (w, why) in more {
        if !failed.iter().any(|(f, _)| *f == w) {
            failed.push((w, why));
        }
    }
}

struct Job {
    ip: Ipv4Addr,
    record: Vec<u8>,
    out: SyncSender<Option<Vec<u8>>>,
}

fn digest(proc_: u32, args: &[u8]) -> u64 {
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = STATE.get_or_init(Default::default).build_hasher();
    proc_.hash(&mut h);
    args.hash(&mut h);
    h.finish()
}

/// A call, as the duplicate-request cache knows it: the client's
/// address (not its port: a reconnecting client comes from another),
/// its transaction id, and a digest of the procedure and arguments (an
/// xid reused for another call is not a retransmission).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DrcKey {
    ip: Ipv4Addr,
    xid: u32,
    digest: u64,
}

/// The replies to the last non-idempotent calls (REMOVE, RENAME,
/// CREATE...), so that a client resending one after a lost reply gets
/// the first answer instead of running it twice. In memory: it survives
/// closes (the server process stays), not a daemon restart.
struct Drc {
    map: HashMap<DrcKey, Option<Vec<u8>>>,
    order: HashMap<Ipv4Addr, VecDeque<DrcKey>>,
    cap: usize,
}

impl Drc {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: HashMap::new(),
            cap,
        }
    }

    fn start(&mut self, k: DrcKey) {
        let order = self.order.entry(k.ip).or_default();
        while order.len() >= self.cap {
            if let Some(old) = order.pop_front() {
                self.map.remove(&old);
            }
        }
        order.push_back(k.clone());
        self.map.insert(k, None);
    }

    fn finish(&mut self, k: DrcKey, reply: Vec<u8>) {
        if let Some(e) = self.map.get_mut(&k) {
            *e = Some(reply);
        }
    }

    fn forget(&mut self, k: &DrcKey) {
        self.map.remove(k);
        if let Some(order) = self.order.get_mut(&k.ip) {
            order.retain(|x| x != k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose thread panics gives its slot back (else an
    /// address would lose one of its few connections for good).
    #[test]
    fn a_panicking_connection_gives_its_slot_back() {
        let server = Server::new();
        let ip = Ipv4Addr::new(10, 9, 0, 10);
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

    fn call(prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(77).u32(0).u32(2).u32(prog).u32(vers).u32(proc_);
        w.u32(0).u32(0).u32(0).u32(0);
        w.buf.extend_from_slice(args);
        w.buf
    }

    /// The reply's words after the record mark.
    fn words(reply: &[u8]) -> Vec<u32> {
        reply[4..]
            .chunks(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn the_portmapper_points_nfs_and_mount_over_tcp_at_the_nfs_port() {
        let s = Server::new();
        let ip = Ipv4Addr::new(10, 9, 0, 10);
        let ask = |prog: u32, vers: u32, prot: u32| {
            let mut a = Writer::default();
            a.u32(prog).u32(vers).u32(prot).u32(0);
            let r = s.answer(ip, &call(PROG_PORTMAP, 2, 3, &a.buf)).unwrap();
            // xid, REPLY, ACCEPTED, verifier (2), SUCCESS, port
            words(&r)[6]
        };
        assert_eq!(ask(PROG_NFS, 3, 6), 2049);
        assert_eq!(ask(PROG_MOUNT, 3, 6), 2049);
        assert_eq!(ask(PROG_NFS, 3, 17), 0, "no NFS over UDP");
        assert_eq!(ask(100_021, 4, 6), 0, "no lock manager");
        assert_eq!(ask(PROG_NFS, 4, 6), 0, "no NFSv4");
    }

    #[test]
    fn unknown_programs_and_versions_are_answered_not_dropped() {
        let s = Server::new();
        let ip = Ipv4Addr::new(10, 9, 0, 10);
        // NFS_ACL, which the Linux client asks for: PROG_UNAVAIL.
        let r = s.answer(ip, &call(100_227, 3, 0, &[])).unwrap();
        assert_eq!(words(&r)[5], 1);
        // NFSv4: PROG_MISMATCH 3..3.
        let r = s.answer(ip, &call(PROG_NFS, 4, 0, &[])).unwrap();
        assert_eq!(&words(&r)[5..8], &[2, 3, 3]);
        // While closed, a GETATTR waits (JUKEBOX), and NULL still answers.
        let mut a = Writer::default();
        a.opaque(&[0; 38]);
        let r = s.answer(ip, &call(PROG_NFS, 3, 1, &a.buf)).unwrap();
        assert_eq!(words(&r)[6], status::JUKEBOX);
        let r = s.answer(ip, &call(PROG_NFS, 3, 0, &[])).unwrap();
        assert_eq!(words(&r).len(), 6);
        // Garbage arguments: GARBAGE_ARGS, not a dropped connection.
        let r = s.answer(ip, &call(PROG_NFS, 3, 1, &[0, 0, 1])).unwrap();
        assert_eq!(words(&r)[5], 4);
    }
}

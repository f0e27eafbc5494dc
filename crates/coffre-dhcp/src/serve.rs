//! The sockets: bound by the daemon as root ([`bind_socket`]), served by an
//! unprivileged child ([`serve`]), one thread per interface.
//!
//! Rate limiting is a token bucket per interface. When a guest floods, its
//! thread sleeps until the next token instead of reading and dropping
//! datagrams as fast as they come, so the child's CPU stays bounded by the
//! rate whatever the guest sends; the kernel drops the excess at the
//! socket's small receive buffer ([`RECV_BUFFER`]), which also keeps the
//! backlog of stale flood packets short once the flood stops. Each
//! interface has its own thread and bucket, so one guest cannot starve
//! another.

use crate::{DhcpError, Interface, Lease, ReplyKind, ServerConfig, Spec, answer, mac_text};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest datagram we read: a DHCP message on an Ethernet link fits in one
/// 1500-byte frame (RFC 2131 §2 only asks for 576); anything longer is
/// dropped unread.
pub const MAX_DATAGRAM: usize = 1500;

/// Datagrams served per second per interface. A DHCP client sends a
/// handful per minute; answering one costs microseconds.
pub const PACKETS_PER_SEC: u32 = 50;

/// Datagrams served back to back before the rate applies.
pub const PACKET_BURST: u32 = 50;

/// Log lines per minute per interface (leases handed out or refused,
/// dropped packets); past it, lines are counted and the count is logged
/// with the next line that passes. A guest that keeps sending what gets
/// logged must not fill the host's disk: at this rate a flood for a day
/// writes a few hundred KiB (at 2 a second, as before 2026-12-06, about
/// 17 MB).
pub const LOG_PER_MINUTE: u32 = 2;

/// Log lines back to back before [`LOG_PER_MINUTE`] applies.
pub const LOG_BURST: u32 = 10;

/// The receive buffer asked for on each socket (the kernel doubles it for
/// its bookkeeping). Small on purpose: while a flooding guest's thread is
/// rate limited, the kernel drops its excess here, and after the flood at
/// most a few dozen stale datagrams wait ahead of a real client.
pub const RECV_BUFFER: usize = 16 * 1024;

/// Root side (in the daemon): a UDP socket on 0.0.0.0:67 bound to device
/// `ifname` (SO_BINDTODEVICE, SO_REUSEADDR, SO_BROADCAST), nonblocking.
///
/// The device binding is what makes one socket per tap work: every
/// workload's server listens on the same port, each socket only receives
/// what arrived on its own tap, and its broadcasts leave through that tap
/// even though the host side has only a /32 there. SO_REUSEADDR lets those
/// sockets share port 67. The socket is nonblocking for the daemon;
/// [`serve`] makes it blocking again, which changes the flag for every
/// copy of the descriptor, so the daemon should close its copy once the
/// child has it.
pub fn bind_socket(ifname: &str) -> io::Result<OwnedFd> {
    if ifname.is_empty() || ifname.len() >= 16 || ifname.contains(['\0', '/']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ifname:?} is not an interface name"),
        ));
    }
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_cloexec(true)?;
    socket.bind_device(Some(ifname.as_bytes()))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.set_recv_buffer_size(RECV_BUFFER)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, crate::SERVER_PORT).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Child side: serve forever on the given sockets (already bound), one per
/// interface; rate limited per interface (a flood from one guest costs
/// bounded CPU and does not starve other interfaces); returns only on a
/// fatal error. Logs one line per lease handed out or refused on stderr
/// (no more than [`LOG_PER_MINUTE`] lines per minute per interface, after a
/// burst of [`LOG_BURST`]).
///
/// Before serving, every socket is checked against its [`Interface`]: same
/// descriptor number, bound to that device, and the config and lease valid.
/// A mix-up here would hand one workload's address to another.
///
/// Each interface runs in its own thread. The first fatal error is
/// returned; the other threads are left blocked in `recv`, so the caller
/// should exit (the child process has nothing else to do).
pub fn serve(spec: Spec, sockets: Vec<OwnedFd>) -> Result<(), DhcpError> {
    spec.config.validate()?;
    if spec.interfaces.len() != sockets.len() {
        return Err(DhcpError::Spec(format!(
            "{} interfaces but {} sockets",
            spec.interfaces.len(),
            sockets.len()
        )));
    }
    if spec.interfaces.is_empty() {
        return Err(DhcpError::Spec("no interfaces to serve".into()));
    }
    let mut work = Vec::with_capacity(sockets.len());
    for (iface, fd) in spec.interfaces.into_iter().zip(sockets) {
        iface.lease.validate()?;
        if fd.as_raw_fd() != iface.fd {
            return Err(DhcpError::Spec(format!(
                "{}: spec says fd {}, socket is fd {}",
                iface.ifname,
                iface.fd,
                fd.as_raw_fd()
            )));
        }
        let socket = Socket::from(fd);
        let io_err = |source| DhcpError::Io {
            ifname: iface.ifname.clone(),
            source,
        };
        let device = socket.device().map_err(io_err)?;
        if device.as_deref() != Some(iface.ifname.as_bytes()) {
            return Err(DhcpError::Spec(format!(
                "fd {} is bound to device {:?}, not {}",
                iface.fd,
                device.map(|d| String::from_utf8_lossy(&d).into_owned()),
                iface.ifname
            )));
        }
        socket.set_nonblocking(false).map_err(io_err)?;
        work.push((iface, UdpSocket::from(OwnedFd::from(socket))));
    }

    let (tx, rx) = mpsc::channel();
    for (iface, socket) in work {
        let tx = tx.clone();
        let config = spec.config.clone();
        let name = format!("dhcp-{}", iface.ifname);
        // A small stack: thread stacks count in the server's memory limit
        // (RLIMIT_DATA), and a thread only parses one packet at a time.
        let spawned = std::thread::Builder::new()
            .name(name)
            .stack_size(256 << 10)
            .spawn(move || {
                let err = serve_one(&config, &iface, &socket);
                let _ = tx.send(err);
            });
        if let Err(source) = spawned {
            return Err(DhcpError::Io {
                ifname: "(thread)".into(),
                source,
            });
        }
    }
    drop(tx);
    match rx.recv() {
        Ok(err) => Err(err),
        // Every thread ended without an error: cannot happen, serve_one
        // only returns with one.
        Err(_) => Ok(()),
    }
}

/// One interface's loop; returns its fatal error.
fn serve_one(cfg: &ServerConfig, iface: &Interface, socket: &UdpSocket) -> DhcpError {
    let mut packets = Bucket::new(PACKETS_PER_SEC, PACKET_BURST);
    let mut log = Log::new(&iface.ifname);
    // One more byte than we accept, to tell a datagram of exactly
    // MAX_DATAGRAM bytes from a longer one that the kernel truncated.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        if let Some(wait) = packets.take(Instant::now()) {
            std::thread::sleep(wait);
            continue;
        }
        let len = match socket.recv_from(&mut buf) {
            Ok((len, _from)) => len,
            Err(e) if transient(&e) => continue,
            Err(source) => {
                return DhcpError::Io {
                    ifname: iface.ifname.clone(),
                    source,
                };
            }
        };
        if len > MAX_DATAGRAM {
            log.line(format_args!("dropped a datagram over {MAX_DATAGRAM} bytes"));
            continue;
        }
        let Some(packet) = buf.get(..len) else {
            continue;
        };
        match answer(cfg, &iface.lease, packet) {
            Ok(Some(reply)) => {
                let lease = &iface.lease;
                match (socket.send_to(&reply.bytes, reply.to), reply.kind) {
                    // Every lease starts with an offer; the ACK that follows
                    // is the line worth reading.
                    (Ok(_), ReplyKind::Offer) => {}
                    (Ok(_), ReplyKind::Ack) => log.line(format_args!(
                        "leased {} to {}",
                        lease.addr,
                        mac_text(&lease.mac)
                    )),
                    (Ok(_), ReplyKind::Nak) => log.line(format_args!(
                        "refused (NAK) {} another address than {}",
                        mac_text(&lease.mac),
                        lease.addr
                    )),
                    // The tap may be going away with its VM, or the
                    // queue be full: the client asks again.
                    (Err(e), _) => log.line(format_args!("sending to {}: {e}", reply.to)),
                }
            }
            Ok(None) => log_ignored(&mut log, &iface.lease, packet),
            // Never the packet's content: the log is read by people and
            // the bytes are the guest's.
            Err(e @ (DhcpError::Malformed(_) | DhcpError::TooLarge(_))) => {
                log.line(format_args!("dropped: {e}"));
            }
            Err(e) => return e,
        }
    }
}

/// A DISCOVER or REQUEST from another MAC is worth a line (a guest with
/// the wrong NIC configured gets no address); the rest is noise.
fn log_ignored(log: &mut Log, lease: &Lease, packet: &[u8]) {
    // op 1 (BOOTREQUEST), htype 1, hlen 6; chaddr at offset 28.
    if let (Some([1, 1, 6]), Some(chaddr)) = (packet.get(..3), packet.get(28..34))
        && let Ok(mac) = <[u8; 6]>::try_from(chaddr)
        && mac != lease.mac
    {
        log.line(format_args!(
            "refused a client with MAC {} (expected {})",
            mac_text(&mac),
            mac_text(&lease.mac)
        ));
    }
}

/// Errors after which the next `recv` may work.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::OutOfMemory
    ) || e.raw_os_error() == Some(105) // ENOBUFS
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct Bucket {
    rate: f64,
    burst: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket::per_second(f64::from(rate.max(1)), burst)
    }

    fn per_minute(rate: u32, burst: u32) -> Bucket {
        Bucket::per_second(f64::from(rate.max(1)) / 60.0, burst)
    }

    fn per_second(rate: f64, burst: u32) -> Bucket {
        Bucket {
            rate,
            burst: burst.max(1),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Rate-limited lines on stderr, prefixed with the interface.
struct Log {
    prefix: String,
    bucket: Bucket,
    suppressed: u64,
}

impl Log {
    fn new(ifname: &str) -> Log {
        Log {
            prefix: format!("coffre-dhcp {ifname}"),
            bucket: Bucket::per_minute(LOG_PER_MINUTE, LOG_BURST),
            suppressed: 0,
        }
    }

    fn line(&mut self, what: std::fmt::Arguments<'_>) {
        if self.bucket.take(Instant::now()).is_some() {
            self.suppressed = self.suppressed.saturating_add(1);
            return;
        }
        let mut err = io::stderr().lock();
        // A closed stderr is no reason to stop serving.
        let _ = if self.suppressed > 0 {
            writeln!(
                err,
                "{}: {what} ({} lines suppressed)",
                self.prefix, self.suppressed
            )
        } else {
            writeln!(err, "{}: {what}", self.prefix)
        };
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log's bucket: after its burst, a line every 30 s whatever a
    /// guest sends (two a second filled the host's disk over weeks).
    #[test]
    fn the_log_passes_its_burst_then_two_lines_a_minute() {
        let start = Instant::now();
        let mut b = Bucket::per_minute(LOG_PER_MINUTE, LOG_BURST);
        let mut passed = 0;
        // A line tried every 100 ms for ten minutes.
        for i in 0..6000u64 {
            if b.take(start + Duration::from_millis(100 * i)).is_none() {
                passed += 1;
            }
        }
        assert!(
            (LOG_BURST as usize + 19..=LOG_BURST as usize + 21).contains(&passed),
            "{passed}"
        );
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = Bucket::new(10, 3);
        for _ in 0..3 {
            assert_eq!(b.take(start), None);
        }
        let wait = b.take(start).expect("empty after the burst");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // 100 ms later one token is back, not two.
        let later = start + Duration::from_millis(100);
        assert_eq!(b.take(later), None);
        assert!(b.take(later).is_some());
        // Idle for a minute: no more than the burst is saved up.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(much_later), None);
        }
        assert!(b.take(much_later).is_some());
    }

    #[test]
    fn bind_socket_refuses_bad_names() {
        for name in ["", "a/b", "0123456789abcdefg", "a\0b"] {
            assert_eq!(
                bind_socket(name).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{name:?}"
            );
        }
    }

    #[test]
    fn serve_checks_the_spec_against_the_sockets() {
        let spec = Spec {
            config: crate::tests::config(),
            interfaces: vec![],
        };
        assert!(matches!(
            serve(spec.clone(), vec![]),
            Err(DhcpError::Spec(_))
        ));
        // A socket bound to no device is refused, whatever the spec says.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = OwnedFd::from(socket);
        let spec = Spec {
            interfaces: vec![Interface {
                ifname: "lo".into(),
                fd: fd.as_raw_fd(),
                lease: crate::tests::lease(),
            }],
            ..spec
        };
        let err = serve(spec, vec![fd]).unwrap_err();
        assert!(
            matches!(err, DhcpError::Spec(ref m) if m.contains("bound to device")),
            "{err}"
        );
    }
}

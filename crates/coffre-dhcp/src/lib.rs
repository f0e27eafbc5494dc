//! A DHCPv4 server for the vault's private network: each QEMU workload has
//! its own tap device (routed, one /32 per workload, the host side holding
//! the gateway address) and gets exactly one address, only for its own
//! fixed MAC.
//!
//! Bytes from guests are the least trusted input the vault reads, so the
//! work is split in three:
//!
//! - [`answer`] is a pure function from one datagram to the reply bytes
//!   (fuzz target `dhcp_packet`): it never panics, and it never puts any
//!   address other than the interface's [`Lease::addr`] into a reply, nor
//!   sends one anywhere but the limited broadcast or that address.
//! - [`bind_socket`] runs in the daemon, as root: a UDP socket on port 67
//!   bound to one device.
//! - [`serve`] runs in an unprivileged child process that inherits those
//!   sockets and reads its [`Spec`] from stdin; it rate-limits every
//!   interface on its own, so a flooding guest costs bounded CPU and does
//!   not starve the others.
//!
//! The protocol is RFC 2131 (options in RFC 2132), cut down to what a
//! point-to-point link with one known client needs: DISCOVER gets an
//! OFFER, REQUEST an ACK or a NAK, and everything else is ignored. Relays
//! (`giaddr`) are not served: a guest is never a relay, and honouring one
//! would let it pick where our replies go.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddrV4};

mod serve;

pub use serve::{
    LOG_BURST, LOG_PER_MINUTE, MAX_DATAGRAM, PACKET_BURST, PACKETS_PER_SEC, RECV_BUFFER,
    bind_socket, serve,
};

/// The DHCP server's port (RFC 2131 §4.1).
pub const SERVER_PORT: u16 = 67;

/// The DHCP client's port.
pub const CLIENT_PORT: u16 = 68;

/// The fixed part of a BOOTP message before the options (RFC 2131 §2:
/// 236 bytes of fields, then the 4-byte magic cookie).
const FIXED_LEN: usize = 240;

/// RFC 2131 §3: the options field starts with 99.130.83.99; a message
/// without it is BOOTP or garbage.
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Longest host or domain name we send: a DHCP option's length is one
/// byte, and a longer one would have to be split (RFC 3396), which old
/// clients do not join.
pub const MAX_NAME: usize = 255;

/// Everything that can go wrong: a packet we could not read, a
/// configuration we refuse, or a socket that died.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DhcpError {
    /// The datagram is not a DHCP message (short, bad cookie, bad option
    /// encoding). It is dropped; nothing needs doing.
    #[error("malformed DHCP packet: {0}")]
    Malformed(&'static str),
    /// The datagram is longer than any DHCP message we accept
    /// ([`MAX_DATAGRAM`]); it is dropped.
    #[error("DHCP datagram of {0} bytes is over the {max} byte limit", max = MAX_DATAGRAM)]
    TooLarge(usize),
    /// The server configuration or a lease cannot be served; fix the
    /// workload's network settings.
    #[error("DHCP configuration: {0}")]
    Config(String),
    /// The sockets handed to [`serve`] do not match its [`Spec`]; this is a
    /// bug in the daemon's spawn code.
    #[error("DHCP spec: {0}")]
    Spec(String),
    /// A socket failed in a way that retrying will not fix; the child exits
    /// and the daemon should restart it.
    #[error("DHCP socket on {ifname}: {source}")]
    Io {
        /// The interface whose socket failed.
        ifname: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// One workload's expected client on one interface.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    /// The guest NIC's MAC address: only this client gets an answer.
    pub mac: [u8; 6],
    /// The one address this interface ever hands out.
    pub addr: Ipv4Addr,
    /// Sent as option 12 (omitted when empty).
    pub hostname: String,
}

/// What every interface's server says about the network.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerConfig {
    /// The host side's address on every tap (the gateway, e.g. 10.9.0.1):
    /// the server identifier and the router.
    pub server: Ipv4Addr,
    /// The subnet mask sent to guests, as a prefix length (0 to 32).
    pub prefix_len: u8,
    /// Lease time in seconds.
    pub lease_secs: u32,
    /// A DNS server to announce (option 6).
    pub dns: Option<Ipv4Addr>,
    /// A domain name to announce (option 15).
    pub domain: Option<String>,
}

/// What the child gets on stdin (JSON): the config and one entry per
/// inherited socket, in fd order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Shared by every interface.
    pub config: ServerConfig,
    /// One per socket passed to [`serve`], in the same order.
    pub interfaces: Vec<Interface>,
}

/// One tap device, its inherited socket and its one client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Interface {
    /// The device the socket is bound to (checked by [`serve`]).
    pub ifname: String,
    /// The inherited descriptor number (checked by [`serve`]).
    pub fd: i32,
    /// The client expected on it.
    pub lease: Lease,
}

/// A reply to send from the interface's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The encoded DHCP message.
    pub bytes: Vec<u8>,
    /// `255.255.255.255:68`, or `lease.addr:68` when the client already
    /// has that address (renewal, `ciaddr` set).
    pub to: SocketAddrV4,
    /// What was decided, for the log.
    pub kind: ReplyKind,
}

/// Which reply, for logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// The lease offered in answer to a DISCOVER.
    Offer,
    /// The lease handed out in answer to a REQUEST.
    Ack,
    /// A REQUEST for another address, refused.
    Nak,
}

impl ServerConfig {
    /// Checks what [`answer`] relies on: a prefix length of at most 32 and
    /// a domain that fits in one option.
    pub fn validate(&self) -> Result<(), DhcpError> {
        if self.prefix_len > 32 {
            return Err(DhcpError::Config(format!(
                "prefix length {} is over 32",
                self.prefix_len
            )));
        }
        if let Some(domain) = &self.domain {
            check_name("domain", domain)?;
        }
        Ok(())
    }

    /// The subnet mask for [`ServerConfig::prefix_len`] (0 to 32).
    fn mask(&self) -> Ipv4Addr {
        let len = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0))
    }
}

impl Lease {
    /// Checks that the lease can be served: a unicast MAC, an address that
    /// is neither unspecified nor broadcast, a hostname that fits in one
    /// option.
    pub fn validate(&self) -> Result<(), DhcpError> {
        // The I/G bit: a multicast MAC is no NIC's address.
        if self.mac[0] & 1 != 0 {
            return Err(DhcpError::Config(format!(
                "MAC {} is a multicast address",
                mac_text(&self.mac)
            )));
        }
        if self.addr.is_unspecified() || self.addr.is_broadcast() {
            return Err(DhcpError::Config(format!("{} cannot be leased", self.addr)));
        }
        if !self.hostname.is_empty() {
            check_name("hostname", &self.hostname)?;
        }
        Ok(())
    }
}

fn check_name(what: &str, name: &str) -> Result<(), DhcpError> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(DhcpError::Config(format!(
            "{what} must be 1 to {MAX_NAME} bytes without NUL"
        )));
    }
    Ok(())
}

/// `52:54:00:12:34:56`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Pure decision: the reply bytes for one datagram that arrived on the
/// interface whose expected client is `lease`, or `None` (ignored). Never
/// panics on any input.
///
/// A DISCOVER from `lease.mac` gets an OFFER of `lease.addr`; a REQUEST
/// from it gets an ACK when it asks for `lease.addr` (requested address
/// option, or `ciaddr` when renewing) and a NAK when it asks for anything
/// else. Other MACs, BOOTREPLYs, relayed messages, REQUESTs meant for
/// another server and other message types are ignored. A datagram that is
/// not a DHCP message is an error (dropped by [`serve`]).
pub fn answer(
    cfg: &ServerConfig,
    lease: &Lease,
    packet: &[u8],
) -> Result<Option<Reply>, DhcpError> {
    cfg.validate()?;
    lease.validate()?;
    let req = Request::read(packet)?;

    if req.op != BOOTREQUEST || req.htype != HTYPE_ETHERNET || req.hlen != 6 {
        return Ok(None);
    }
    if req.chaddr.get(..6) != Some(&lease.mac[..]) {
        return Ok(None);
    }
    if !req.giaddr.is_unspecified() {
        return Ok(None);
    }

    let kind = match req.msg_type {
        Some(DISCOVER) => ReplyKind::Offer,
        Some(REQUEST) => {
            // RFC 2131 §4.3.2: a REQUEST naming another server means the
            // client chose that server's offer; we stay silent.
            if req.server_id.is_some_and(|id| id != cfg.server) {
                return Ok(None);
            }
            let ciaddr = req.ciaddr;
            // SELECTING and INIT-REBOOT name the address in option 50;
            // RENEWING and REBINDING have it in ciaddr.
            match req
                .requested
                .or((!ciaddr.is_unspecified()).then_some(ciaddr))
            {
                Some(ip)
                    if ip == lease.addr && (ciaddr.is_unspecified() || ciaddr == lease.addr) =>
                {
                    ReplyKind::Ack
                }
                Some(_) => ReplyKind::Nak,
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(build(cfg, lease, &req, kind)))
}

const BOOTREQUEST: u8 = 1;
const HTYPE_ETHERNET: u8 = 1;
const DISCOVER: u8 = 1;
const REQUEST: u8 = 3;

/// The fields of a client's message that [`answer`] looks at.
///
/// Read here rather than with dhcproto's decoder: that decoder is written
/// for messages from servers and relays one trusts, and some of its option
/// readers `debug_assert!` on lengths the sender chose (a panic in debug
/// builds, an underflowing `len - 1` in release). We need three options;
/// walking them takes a few lines that can be read in full, with every
/// index checked.
#[derive(Debug)]
struct Request {
    op: u8,
    htype: u8,
    hlen: u8,
    xid: u32,
    flags: u16,
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: [u8; 16],
    /// Option 53.
    msg_type: Option<u8>,
    /// Option 50.
    requested: Option<Ipv4Addr>,
    /// Option 54.
    server_id: Option<Ipv4Addr>,
}

impl Request {
    /// RFC 2131 §2 for the fixed fields, RFC 2132 §2 for the options: code,
    /// length, value; Pad (0) and End (255) have no length. Options in
    /// `sname` and `file` (overload, option 52) are not read: the three we
    /// use are always in the options field of a client's message. An
    /// option we use that comes twice, or with the wrong length, makes the
    /// message malformed rather than guessing which one counts.
    fn read(packet: &[u8]) -> Result<Request, DhcpError> {
        if packet.len() > MAX_DATAGRAM {
            return Err(DhcpError::TooLarge(packet.len()));
        }
        let Some(fixed) = packet.first_chunk::<FIXED_LEN>() else {
            return Err(DhcpError::Malformed("shorter than the fixed header"));
        };
        if fixed[236..] != MAGIC_COOKIE {
            return Err(DhcpError::Malformed("no DHCP magic cookie"));
        }
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&fixed[at..at + 4]);
            u32::from_be_bytes(b)
        };
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&fixed[28..44]);
        let mut req = Request {
            op: fixed[0],
            htype: fixed[1],
            hlen: fixed[2],
            xid: u32_at(4),
            flags: u16::from_be_bytes([fixed[10], fixed[11]]),
            ciaddr: Ipv4Addr::from(u32_at(12)),
            giaddr: Ipv4Addr::from(u32_at(24)),
            chaddr,
            msg_type: None,
            requested: None,
            server_id: None,
        };
        let mut rest = &packet[FIXED_LEN..];
        loop {
            match rest {
                [] | [255, ..] => break,
                [0, tail @ ..] => rest = tail,
                [code, len, tail @ ..] => {
                    let Some((value, tail)) = tail.split_at_checked(usize::from(*len)) else {
                        return Err(DhcpError::Malformed("an option runs past the end"));
                    };
                    match (*code, value) {
                        (53, [t]) => set_once(&mut req.msg_type, *t)?,
                        (50, [a, b, c, d]) => {
                            set_once(&mut req.requested, Ipv4Addr::new(*a, *b, *c, *d))?;
                        }
                        (54, [a, b, c, d]) => {
                            set_once(&mut req.server_id, Ipv4Addr::new(*a, *b, *c, *d))?;
                        }
                        (50 | 53 | 54, _) => {
                            return Err(DhcpError::Malformed("an option has the wrong length"));
                        }
                        _ => {}
                    }
                    rest = tail;
                }
                [_] => return Err(DhcpError::Malformed("an option has no length")),
            }
        }
        Ok(req)
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), DhcpError> {
    if slot.replace(value).is_some() {
        return Err(DhcpError::Malformed("an option comes twice"));
    }
    Ok(())
}

const BOOTREPLY: u8 = 2;
const OFFER: u8 = 2;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// RFC 2132 option codes we send.
mod opt {
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN: u8 = 15;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const MESSAGE: u8 = 56;
    pub const END: u8 = 255;
}

/// The shortest reply we send: RFC 1542 §2.1 has relays and clients accept
/// no BOOTP message under 300 bytes, so common servers pad to it.
const MIN_REPLY: usize = 300;

/// What a NAK says in option 56.
const NAK_TEXT: &str = "requested address is not this client's";

/// The reply to `req` (already checked to come from `lease.mac`).
///
/// Encoded here, like [`Request`] is read here: a reply is a fixed header
/// and at most nine options, and a general DHCP library would bring a DNS
/// stack, IDNA and an RNG into the daemon to write them. The tests decode
/// every reply with dhcproto, independently of this code.
fn build(cfg: &ServerConfig, lease: &Lease, req: &Request, kind: ReplyKind) -> Reply {
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
    let (yiaddr, ciaddr, to) = match kind {
        // RFC 2131 §4.3.2: a NAK is broadcast when giaddr is zero, since
        // the client's address is the one being refused.
        ReplyKind::Nak => (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, broadcast),
        // A renewing client already holds the address and answers ARP for
        // it, so its ACK goes to it directly (RFC 2131 §4.1). Every other
        // reply is broadcast: unicasting to a client that has no address
        // yet would need an ARP entry we cannot add without privileges,
        // and busybox udhcpc, dhclient and systemd-networkd all accept
        // broadcast replies. answer() only ACKs a set ciaddr when it is
        // lease.addr, so the destination is never chosen by the guest.
        ReplyKind::Ack if req.ciaddr == lease.addr => (
            lease.addr,
            lease.addr,
            SocketAddrV4::new(lease.addr, CLIENT_PORT),
        ),
        ReplyKind::Offer | ReplyKind::Ack => (lease.addr, Ipv4Addr::UNSPECIFIED, broadcast),
    };

    // RFC 2131 §2, table 1: the fixed fields. siaddr, giaddr, sname and
    // file stay zero; secs and hops are zero in a server's reply.
    let mut b = vec![0u8; FIXED_LEN];
    b[0] = BOOTREPLY;
    b[1] = HTYPE_ETHERNET;
    b[2] = 6; // hlen
    b[4..8].copy_from_slice(&req.xid.to_be_bytes());
    // The client's flags (RFC 2131 table 3), broadcast bit included.
    b[10..12].copy_from_slice(&req.flags.to_be_bytes());
    b[12..16].copy_from_slice(&ciaddr.octets());
    b[16..20].copy_from_slice(&yiaddr.octets());
    b[28..34].copy_from_slice(&lease.mac);
    b[236..240].copy_from_slice(&MAGIC_COOKIE);

    let msg_type = match kind {
        ReplyKind::Offer => OFFER,
        ReplyKind::Ack => ACK,
        ReplyKind::Nak => NAK,
    };
    put(&mut b, opt::MESSAGE_TYPE, &[msg_type]);
    put(&mut b, opt::SERVER_ID, &cfg.server.octets());
    if kind == ReplyKind::Nak {
        put(&mut b, opt::MESSAGE, NAK_TEXT.as_bytes());
    } else {
        put(&mut b, opt::LEASE_TIME, &cfg.lease_secs.to_be_bytes());
        put(&mut b, opt::SUBNET_MASK, &cfg.mask().octets());
        put(&mut b, opt::ROUTER, &cfg.server.octets());
        if let Some(dns) = cfg.dns {
            put(&mut b, opt::DNS, &dns.octets());
        }
        if let Some(domain) = &cfg.domain {
            put(&mut b, opt::DOMAIN, domain.as_bytes());
        }
        if !lease.hostname.is_empty() {
            put(&mut b, opt::HOSTNAME, lease.hostname.as_bytes());
        }
    }
    b.push(opt::END);
    // Pad options (0) after End up to the BOOTP minimum.
    if b.len() < MIN_REPLY {
        b.resize(MIN_REPLY, 0);
    }
    Reply { bytes: b, to, kind }
}

/// Appends one option: code, length, value. Every value is at most 255
/// bytes: addresses and numbers are fixed-size, and the domain and
/// hostname are checked against [`MAX_NAME`] by [`ServerConfig::validate`]
/// and [`Lease::validate`] before [`build`] runs. A longer one is cut
/// rather than encoded with a wrong length byte.
fn put(b: &mut Vec<u8>, code: u8, value: &[u8]) {
    let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
    b.push(code);
    b.push(len);
    b.extend_from_slice(&value[..usize::from(len)]);
}

#[cfg(test)]
mod tests;

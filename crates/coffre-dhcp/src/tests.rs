use super::*;
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable as _, Decoder, Encodable as _, Encoder};
use proptest::prelude::*;

pub(crate) fn config() -> ServerConfig {
    ServerConfig {
        server: Ipv4Addr::new(10, 9, 0, 1),
        prefix_len: 24,
        lease_secs: 3600,
        dns: Some(Ipv4Addr::new(10, 9, 0, 53)),
        domain: Some("vault.internal".into()),
    }
}

pub(crate) fn lease() -> Lease {
    Lease {
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        addr: Ipv4Addr::new(10, 9, 0, 7),
        hostname: "builder".into(),
    }
}

const OTHER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 8);

/// A client message as a DHCP client would send it.
fn client(kind: MessageType, mac: &[u8], ciaddr: Ipv4Addr, opts: &[DhcpOption]) -> Vec<u8> {
    let mut msg = Message::new_with_id(
        0x1234_5678,
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        mac,
    );
    msg.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        msg.opts_mut().insert(o.clone());
    }
    let mut buf = Vec::new();
    msg.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

pub(crate) fn discover(mac: &[u8]) -> Vec<u8> {
    client(MessageType::Discover, mac, Ipv4Addr::UNSPECIFIED, &[])
}

pub(crate) fn request(mac: &[u8], ip: Ipv4Addr) -> Vec<u8> {
    client(
        MessageType::Request,
        mac,
        Ipv4Addr::UNSPECIFIED,
        &[
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::ServerIdentifier(config().server),
        ],
    )
}

fn decode(reply: &Reply) -> Message {
    Message::decode(&mut Decoder::new(&reply.bytes)).unwrap()
}

fn reply(packet: &[u8]) -> Reply {
    answer(&config(), &lease(), packet)
        .unwrap()
        .expect("a reply")
}

const BROADCAST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);

#[test]
fn discover_gets_an_offer_with_every_option() {
    let r = reply(&discover(&lease().mac));
    assert_eq!(r.kind, ReplyKind::Offer);
    assert_eq!(r.to, BROADCAST);
    let m = decode(&r);
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 0x1234_5678);
    assert_eq!(m.chaddr(), lease().mac);
    assert_eq!(m.yiaddr(), lease().addr);
    assert_eq!(m.ciaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(&r.bytes[236..240], MAGIC_COOKIE);
    let o = m.opts();
    assert_eq!(o.msg_type(), Some(MessageType::Offer));
    let get = |code| o.get(code).cloned();
    assert_eq!(
        get(OptionCode::SubnetMask),
        Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        get(OptionCode::Router),
        Some(DhcpOption::Router(vec![config().server]))
    );
    assert_eq!(
        get(OptionCode::ServerIdentifier),
        Some(DhcpOption::ServerIdentifier(config().server))
    );
    assert_eq!(
        get(OptionCode::AddressLeaseTime),
        Some(DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        get(OptionCode::Hostname),
        Some(DhcpOption::Hostname("builder".into()))
    );
    assert_eq!(
        get(OptionCode::DomainNameServer),
        Some(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 9, 0, 53
        )]))
    );
    assert_eq!(
        get(OptionCode::DomainName),
        Some(DhcpOption::DomainName("vault.internal".into()))
    );
}

#[test]
fn unset_dns_domain_and_hostname_are_left_out() {
    let cfg = ServerConfig {
        dns: None,
        domain: None,
        ..config()
    };
    let lease = Lease {
        hostname: String::new(),
        ..lease()
    };
    let r = answer(&cfg, &lease, &discover(&lease.mac))
        .unwrap()
        .unwrap();
    let m = decode(&r);
    for code in [
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::Hostname,
    ] {
        assert!(!m.opts().contains(code), "{code:?}");
    }
}

#[test]
fn the_broadcast_flag_is_echoed() {
    let mut packet = discover(&lease().mac);
    packet[10] = 0x80;
    let m = decode(&reply(&packet));
    assert!(m.flags().broadcast());
    let m = decode(&reply(&discover(&lease().mac)));
    assert!(!m.flags().broadcast());
}

#[test]
fn masks_from_prefix_lengths() {
    for (len, mask) in [
        (0, [0, 0, 0, 0]),
        (8, [255, 0, 0, 0]),
        (24, [255, 255, 255, 0]),
        (31, [255, 255, 255, 254]),
        (32, [255, 255, 255, 255]),
    ] {
        let cfg = ServerConfig {
            prefix_len: len,
            ..config()
        };
        assert_eq!(cfg.mask(), Ipv4Addr::from(mask), "/{len}");
    }
    let cfg = ServerConfig {
        prefix_len: 33,
        ..config()
    };
    assert!(matches!(
        answer(&cfg, &lease(), &discover(&lease().mac)),
        Err(DhcpError::Config(_))
    ));
}

#[test]
fn request_for_the_lease_gets_an_ack() {
    let r = reply(&request(&lease().mac, lease().addr));
    assert_eq!(r.kind, ReplyKind::Ack);
    assert_eq!(r.to, BROADCAST);
    let m = decode(&r);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), lease().addr);
    assert!(m.opts().contains(OptionCode::Router));
    assert!(m.opts().contains(OptionCode::AddressLeaseTime));
}

#[test]
fn init_reboot_request_without_server_id_gets_an_ack() {
    let packet = client(
        MessageType::Request,
        &lease().mac,
        Ipv4Addr::UNSPECIFIED,
        &[DhcpOption::RequestedIpAddress(lease().addr)],
    );
    assert_eq!(reply(&packet).kind, ReplyKind::Ack);
}

#[test]
fn renewal_is_acked_to_the_client_directly() {
    let packet = client(MessageType::Request, &lease().mac, lease().addr, &[]);
    let r = reply(&packet);
    assert_eq!(r.kind, ReplyKind::Ack);
    assert_eq!(r.to, SocketAddrV4::new(lease().addr, 68));
    assert_eq!(decode(&r).ciaddr(), lease().addr);
}

#[test]
fn request_for_another_address_gets_a_broadcast_nak() {
    for packet in [
        request(&lease().mac, OTHER),
        client(MessageType::Request, &lease().mac, OTHER, &[]),
        // The right address asked for, from another one.
        client(
            MessageType::Request,
            &lease().mac,
            OTHER,
            &[DhcpOption::RequestedIpAddress(lease().addr)],
        ),
    ] {
        let r = reply(&packet);
        assert_eq!(r.kind, ReplyKind::Nak);
        assert_eq!(r.to, BROADCAST);
        let m = decode(&r);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(!m.opts().contains(OptionCode::Router));
        assert!(!m.opts().contains(OptionCode::AddressLeaseTime));
    }
}

#[test]
fn request_for_another_server_or_no_address_is_ignored() {
    let other_server = client(
        MessageType::Request,
        &lease().mac,
        Ipv4Addr::UNSPECIFIED,
        &[
            DhcpOption::RequestedIpAddress(lease().addr),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 2)),
        ],
    );
    let nothing = client(
        MessageType::Request,
        &lease().mac,
        Ipv4Addr::UNSPECIFIED,
        &[],
    );
    for packet in [other_server, nothing] {
        assert_eq!(answer(&config(), &lease(), &packet).unwrap(), None);
    }
}

#[test]
fn other_macs_are_ignored() {
    let mut mac = lease().mac;
    mac[5] ^= 1;
    for packet in [discover(&mac), request(&mac, lease().addr)] {
        assert_eq!(answer(&config(), &lease(), &packet).unwrap(), None);
    }
    // The right six bytes with another length, or another hardware type.
    let mut long = lease().mac.to_vec();
    long.push(0);
    assert_eq!(answer(&config(), &lease(), &discover(&long)).unwrap(), None);
    let mut packet = discover(&lease().mac);
    packet[1] = 6; // IEEE 802
    assert_eq!(answer(&config(), &lease(), &packet).unwrap(), None);
}

#[test]
fn replies_relays_and_other_types_are_ignored() {
    let mac = lease().mac;
    let mut bootreply = discover(&mac);
    bootreply[0] = 2;
    let mut relayed = discover(&mac);
    relayed[24..28].copy_from_slice(&[192, 0, 2, 1]);
    let others = [
        MessageType::Offer,
        MessageType::Ack,
        MessageType::Nak,
        MessageType::Decline,
        MessageType::Release,
        MessageType::Inform,
    ]
    .map(|t| client(t, &mac, Ipv4Addr::UNSPECIFIED, &[]));
    for packet in others.iter().chain([&bootreply, &relayed]) {
        assert_eq!(answer(&config(), &lease(), packet).unwrap(), None);
    }
    // No message type at all: BOOTP, not served.
    let mut bootp = discover(&mac);
    bootp.truncate(240);
    bootp.push(255);
    assert_eq!(answer(&config(), &lease(), &bootp).unwrap(), None);
}

#[test]
fn an_hlen_over_16_is_ignored_not_a_panic() {
    // dhcproto's chaddr() slices by hlen.
    let mut packet = discover(&lease().mac);
    packet[2] = 200;
    assert_eq!(answer(&config(), &lease(), &packet).unwrap(), None);
}

#[test]
fn truncated_and_garbage_packets_are_errors() {
    let good = discover(&lease().mac);
    for len in 0..good.len() {
        // Cut inside the fixed part or inside an option: malformed. Cut
        // between options, it still reads (End is optional in practice),
        // and must still answer correctly or not at all.
        let r = answer(&config(), &lease(), &good[..len]);
        if len < FIXED_LEN {
            assert!(matches!(r, Err(DhcpError::Malformed(_))), "{len}: {r:?}");
        }
        if let Ok(Some(r)) = r {
            check_reply(&config(), &lease(), &r);
        }
    }
    let mut no_cookie = good.clone();
    no_cookie[236] = 0;
    assert!(matches!(
        answer(&config(), &lease(), &no_cookie),
        Err(DhcpError::Malformed(_))
    ));
    // An option whose length runs past the end.
    let mut bad_opt = good[..240].to_vec();
    bad_opt.extend_from_slice(&[53, 1, 1, 12, 200, b'x']);
    assert!(answer(&config(), &lease(), &bad_opt).is_err());
    // Twice the message type, or one of the wrong length.
    for opts in [
        &[53, 1, 1, 53, 1, 3][..],
        &[53, 2, 1, 1],
        &[53, 1, 1, 50, 3, 1, 2, 3],
        &[53],
    ] {
        let mut p = good[..240].to_vec();
        p.extend_from_slice(opts);
        assert!(
            matches!(
                answer(&config(), &lease(), &p),
                Err(DhcpError::Malformed(_))
            ),
            "{opts:?}"
        );
    }
    assert!(matches!(
        answer(&config(), &lease(), &vec![1u8; MAX_DATAGRAM + 1]),
        Err(DhcpError::TooLarge(_))
    ));
    assert!(answer(&config(), &lease(), &[0xff; 600]).is_err_or_none());
}

#[test]
fn replies_are_laid_out_like_common_servers() {
    let mut packet = request(&lease().mac, lease().addr);
    packet[3] = 1; // hops
    packet[8..10].copy_from_slice(&[0, 9]); // secs
    packet[44] = b'x'; // sname
    packet[108] = b'y'; // file
    for packet in [discover(&lease().mac), packet, request(&lease().mac, OTHER)] {
        let r = reply(&packet);
        let b = &r.bytes;
        // At least the BOOTP minimum; these small replies are exactly it.
        assert_eq!(b.len(), 300);
        assert_eq!(&b[..4], &[2, 1, 6, 0]);
        assert_eq!(&b[4..8], &packet[4..8]);
        assert_eq!(&b[8..10], &[0, 0]);
        assert!(b[20..28].iter().all(|&x| x == 0), "siaddr, giaddr");
        assert!(
            b[34..236].iter().all(|&x| x == 0),
            "chaddr pad, sname, file"
        );
        assert_eq!(&b[236..240], &MAGIC_COOKIE);
        // The message type first, then the server identifier.
        let kind = match r.kind {
            ReplyKind::Offer => 2,
            ReplyKind::Ack => 5,
            ReplyKind::Nak => 6,
        };
        assert_eq!(&b[240..249], &[53, 1, kind, 54, 4, 10, 9, 0, 1]);
        let end = b.iter().rposition(|&x| x != 0).unwrap();
        assert_eq!(b[end], 255, "End, then only Pad");
        let m = decode(&r);
        assert_eq!(m.hops(), 0);
        assert_eq!(m.secs(), 0);
        assert!(m.sname().is_none() && m.fname().is_none());
    }
}

#[test]
fn a_nak_says_why() {
    let m = decode(&reply(&request(&lease().mac, OTHER)));
    assert_eq!(
        m.opts().get(OptionCode::Message),
        Some(&DhcpOption::Message(
            "requested address is not this client's".into()
        ))
    );
    for code in [
        OptionCode::SubnetMask,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::Hostname,
    ] {
        assert!(!m.opts().contains(code), "{code:?}");
    }
}

#[test]
fn longest_names_fit_and_decode() {
    let cfg = ServerConfig {
        domain: Some("d".repeat(MAX_NAME)),
        ..config()
    };
    let lease = Lease {
        hostname: "h".repeat(MAX_NAME),
        ..lease()
    };
    let r = answer(&cfg, &lease, &discover(&lease.mac))
        .unwrap()
        .unwrap();
    assert_eq!(r.bytes.last(), Some(&255), "no padding past 300");
    let m = decode(&r);
    assert_eq!(
        m.opts().get(OptionCode::Hostname),
        Some(&DhcpOption::Hostname(lease.hostname.clone()))
    );
    assert_eq!(
        m.opts().get(OptionCode::DomainName),
        Some(&DhcpOption::DomainName(cfg.domain.clone().unwrap()))
    );
}

#[test]
fn bad_leases_are_refused() {
    let bad = [
        Lease {
            mac: [1, 0, 0, 0, 0, 1],
            ..lease()
        },
        Lease {
            addr: Ipv4Addr::UNSPECIFIED,
            ..lease()
        },
        Lease {
            addr: Ipv4Addr::BROADCAST,
            ..lease()
        },
        Lease {
            hostname: "x".repeat(256),
            ..lease()
        },
    ];
    for l in bad {
        let r = answer(&config(), &l, &discover(&l.mac));
        assert!(matches!(r, Err(DhcpError::Config(_))), "{l:?}: {r:?}");
    }
}

#[test]
fn spec_round_trips_through_json() {
    let spec = Spec {
        config: config(),
        interfaces: vec![Interface {
            ifname: "tap-w1".into(),
            fd: 3,
            lease: lease(),
        }],
    };
    let text = serde_json::to_string(&spec).unwrap();
    let back: Spec = serde_json::from_str(&text).unwrap();
    assert_eq!(back.config, spec.config);
    assert_eq!(back.interfaces[0].lease, spec.interfaces[0].lease);
    assert_eq!(back.interfaces[0].fd, 3);
}

trait ErrOrNone {
    fn is_err_or_none(&self) -> bool;
}

impl ErrOrNone for Result<Option<Reply>, DhcpError> {
    fn is_err_or_none(&self) -> bool {
        !matches!(self, Ok(Some(_)))
    }
}

/// The invariant the fuzz target checks too: whatever came in, a reply
/// names no address but the lease's (and the server's own), and goes
/// nowhere but the broadcast or the lease's address.
pub(crate) fn check_reply(cfg: &ServerConfig, lease: &Lease, r: &Reply) {
    assert!(
        r.to == SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
            || r.to == SocketAddrV4::new(lease.addr, 68),
        "{:?}",
        r.to
    );
    let m = decode(r);
    let ok = |ip: Ipv4Addr| ip.is_unspecified() || ip == lease.addr;
    assert!(ok(m.yiaddr()) && ok(m.ciaddr()), "{m:?}");
    assert!(m.siaddr().is_unspecified() && m.giaddr().is_unspecified());
    assert_eq!(m.chaddr(), lease.mac);
    assert_eq!(m.opcode(), Opcode::BootReply);
    if let Some(DhcpOption::Router(r)) = m.opts().get(OptionCode::Router) {
        assert_eq!(r, &vec![cfg.server]);
    }
}

/// A message close enough to a valid one that the decoder gets far: the
/// lease's MAC, a cookie and random options.
fn near_valid() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 12]>(),
        any::<[u8; 16]>(),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::bool::ANY,
        0u8..9,
        prop::option::of(prop_oneof![
            Just(lease().addr),
            any::<u32>().prop_map(Ipv4Addr::from)
        ]),
    )
        .prop_map(|(head, addrs, tail, right_mac, msg_type, requested)| {
            let mut p = vec![0u8; 240];
            p[..12].copy_from_slice(&head);
            p[0] = 1;
            p[1] = 1;
            p[2] = 6;
            p[12..28].copy_from_slice(&addrs);
            if right_mac {
                p[28..34].copy_from_slice(&lease().mac);
            }
            p[236..240].copy_from_slice(&MAGIC_COOKIE);
            p.extend_from_slice(&[53, 1, msg_type]);
            if let Some(ip) = requested {
                p.extend_from_slice(&[50, 4]);
                p.extend_from_slice(&ip.octets());
            }
            p.extend_from_slice(&tail);
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1600)) {
        if let Ok(Some(r)) = answer(&config(), &lease(), &bytes) {
            check_reply(&config(), &lease(), &r);
        }
    }

    #[test]
    fn near_valid_packets_only_ever_get_the_lease(packet in near_valid()) {
        if let Ok(Some(r)) = answer(&config(), &lease(), &packet) {
            check_reply(&config(), &lease(), &r);
        }
    }

    #[test]
    fn every_config_decodes_to_what_was_configured(
        server in any::<u32>().prop_map(Ipv4Addr::from),
        prefix_len in 0u8..=32,
        lease_secs in any::<u32>(),
        dns in prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
        domain in prop::option::of("[a-z0-9.-]{1,255}"),
        hostname in "[a-z0-9-]{0,255}",
        xid in any::<u32>(),
        flags in any::<u16>(),
    ) {
        let cfg = ServerConfig { server, prefix_len, lease_secs, dns, domain };
        let lease = Lease { hostname, ..lease() };
        let mut packet = discover(&lease.mac);
        packet[4..8].copy_from_slice(&xid.to_be_bytes());
        packet[10..12].copy_from_slice(&flags.to_be_bytes());
        let r = answer(&cfg, &lease, &packet).unwrap().unwrap();
        prop_assert!(r.bytes.len() >= 300);
        let m = decode(&r);
        prop_assert_eq!(m.xid(), xid);
        prop_assert_eq!(u16::from(m.flags()), flags);
        prop_assert_eq!(m.yiaddr(), lease.addr);
        let o = m.opts();
        prop_assert_eq!(o.msg_type(), Some(MessageType::Offer));
        prop_assert_eq!(o.get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(server)));
        prop_assert_eq!(o.get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(lease_secs)));
        prop_assert_eq!(o.get(OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(cfg.mask())));
        prop_assert_eq!(o.get(OptionCode::Router), Some(&DhcpOption::Router(vec![server])));
        prop_assert_eq!(o.get(OptionCode::DomainNameServer).cloned(), dns.map(|d| DhcpOption::DomainNameServer(vec![d])));
        prop_assert_eq!(o.get(OptionCode::DomainName).cloned(), cfg.domain.clone().map(DhcpOption::DomainName));
        prop_assert_eq!(
            o.get(OptionCode::Hostname).cloned(),
            (!lease.hostname.is_empty()).then(|| DhcpOption::Hostname(lease.hostname.clone()))
        );
    }

    #[test]
    fn any_requested_address_but_the_lease_is_refused(
        ip in any::<u32>().prop_map(Ipv4Addr::from),
        ciaddr in prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
    ) {
        let packet = client(
            MessageType::Request,
            &lease().mac,
            ciaddr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            &[DhcpOption::RequestedIpAddress(ip)],
        );
        let r = answer(&config(), &lease(), &packet).unwrap().unwrap();
        check_reply(&config(), &lease(), &r);
        let ciaddr_ok = ciaddr.is_none_or(|c| c.is_unspecified() || c == lease().addr);
        let want = if ip == lease().addr && ciaddr_ok { ReplyKind::Ack } else { ReplyKind::Nak };
        prop_assert_eq!(r.kind, want);
    }
}

//! A datagram from a guest on its tap, through the DHCP server's decision.
//! Nothing may panic, and whatever arrives, a reply goes only to the
//! lease's MAC, names no address but the lease's, and is sent nowhere but
//! the limited broadcast or the lease's address (a guest must not be able
//! to make the server hand out, or aim packets at, another address).
//! The seeds are a DISCOVER and a REQUEST captured from busybox udhcpc
//! (MAC 52:54:00:77:60:02) and REQUESTs derived from them.
#![no_main]

use coffre_dhcp::{Lease, ServerConfig, answer};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};

fuzz_target!(|data: &[u8]| {
    let cfg = ServerConfig {
        server: Ipv4Addr::new(10, 77, 96, 1),
        prefix_len: 24,
        lease_secs: 600,
        dns: Some(Ipv4Addr::new(10, 77, 96, 1)),
        domain: Some("vault.test".into()),
    };
    let lease = Lease {
        mac: [0x52, 0x54, 0x00, 0x77, 0x60, 0x02],
        addr: Ipv4Addr::new(10, 77, 96, 2),
        hostname: "guest0".into(),
    };
    let Ok(Some(reply)) = answer(&cfg, &lease, data) else {
        return;
    };
    // Only a BOOTREQUEST over Ethernet from the lease's MAC is answered.
    assert_eq!(data.get(..3), Some(&[1u8, 1, 6][..]));
    assert_eq!(data.get(28..34), Some(&lease.mac[..]));
    assert!(
        reply.to == SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
            || reply.to == SocketAddrV4::new(lease.addr, 68),
        "{:?}",
        reply.to
    );
    let b = &reply.bytes;
    assert!(b.len() >= 240 && b.len() <= 576, "{}", b.len());
    // op BOOTREPLY, Ethernet, 6-byte chaddr, the lease's MAC.
    assert_eq!(&b[..3], &[2, 1, 6]);
    assert_eq!(&b[28..34], &lease.mac);
    let addr = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
    // ciaddr and yiaddr: the lease's or none; siaddr and giaddr: none.
    for at in [12, 16] {
        assert!(
            addr(at).is_unspecified() || addr(at) == lease.addr,
            "{}",
            addr(at)
        );
    }
    assert!(addr(20).is_unspecified() && addr(24).is_unspecified());
    assert_eq!(&b[236..240], &[99, 130, 83, 99]);
});

//! The addresses config.toml names: the vault's subnet, a workload's
//! declared ports, and the destinations traffic may leave for (egress).
//! Each is parsed from its text form and written back the same way.

use crate::NetError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The vault's private IPv4 network (`10.9.0.0/24`); the host is its first
/// address (`.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    base: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The network address.
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// The prefix length (16 to 29).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The netmask (`255.255.255.0`).
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The host's address on the vault network, which is every
    /// workload's router: the first one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.base)
    }

    /// Whether `ip` may be given to a workload: inside, and neither the
    /// network, the broadcast nor the gateway address.
    pub fn holds_workload(&self, ip: Ipv4Addr) -> bool {
        let (a, base) = (u32::from(ip), u32::from(self.base));
        let last = base | !self.mask_bits();
        self.contains(ip) && a > base + 1 && a < last
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let m = self.mask_bits() & other.mask_bits();
        u32::from(self.base) & m == u32::from(other.base) & m
    }
}

impl FromStr for Subnet {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = |why: String| NetError::Config(format!("subnet {s:?}: {why}"));
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX, e.g. 10.9.0.0/24".into()))?;
        let base: Ipv4Addr = a
            .parse()
            .map_err(|_| bad(format!("{a:?} is not an IPv4 address")))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| bad(format!("{p:?} is not a prefix length")))?;
        if !(16..=29).contains(&prefix) {
            return Err(bad(format!("/{prefix}: use /16 to /29")));
        }
        let n = Self { base, prefix };
        if u32::from(base) & !n.mask_bits() != 0 {
            let fixed = Ipv4Addr::from(u32::from(base) & n.mask_bits());
            return Err(bad(format!(
                "host bits are set (did you mean {fixed}/{prefix}?)"
            )));
        }
        if !(base.is_private() || base.octets()[0] == 100 && base.octets()[1] & 0xc0 == 64) {
            return Err(bad(
                "use a private range (10/8, 172.16/12, 192.168/16 or 100.64/10): the vault network is never routed outside the host".into(),
            ));
        }
        Ok(n)
    }
}

impl TryFrom<String> for Subnet {
    type Error = NetError;
    fn try_from(s: String) -> Result<Self, NetError> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// A transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`, as nftables names them.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A declared port of a workload (`tcp/3389`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Port {
    /// TCP or UDP.
    pub proto: Proto,
    /// The port number (1 to 65535).
    pub port: u16,
}

fn parse_proto(p: &str) -> Option<Proto> {
    match p {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    }
}

fn parse_port(p: &str) -> Option<u16> {
    p.parse::<u16>().ok().filter(|n| *n != 0)
}

impl FromStr for Port {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || {
            NetError::Config(format!(
                "port {s:?}: write tcp/PORT or udp/PORT, e.g. tcp/3389"
            ))
        };
        let (p, n) = s.split_once('/').ok_or_else(bad)?;
        Ok(Port {
            proto: parse_proto(p).ok_or_else(bad)?,
            port: parse_port(n).ok_or_else(bad)?,
        })
    }
}

impl TryFrom<String> for Port {
    type Error = NetError;
    fn try_from(s: String) -> Result<Self, NetError> {
        s.parse()
    }
}

impl From<Port> for String {
    fn from(p: Port) -> String {
        p.to_string()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto.as_str(), self.port)
    }
}

/// A destination outside the vault network that traffic may reach
/// (`203.0.113.5:443`: TCP and UDP; `tcp/203.0.113.5:443`: TCP only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Egress {
    /// TCP, UDP, or both (`None`).
    pub proto: Option<Proto>,
    /// The destination address.
    pub addr: Ipv4Addr,
    /// The destination port.
    pub port: u16,
}

impl Egress {
    /// The protocols it opens.
    pub fn protos(&self) -> Vec<Proto> {
        match self.proto {
            Some(p) => vec![p],
            None => vec![Proto::Tcp, Proto::Udp],
        }
    }
}

impl FromStr for Egress {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || {
            NetError::Config(format!(
                "egress {s:?}: write ADDRESS:PORT (TCP and UDP) or tcp/ADDRESS:PORT, e.g. 203.0.113.5:443"
            ))
        };
        let (proto, rest) = match s.split_once('/') {
            Some((p, rest)) => (Some(parse_proto(p).ok_or_else(bad)?), rest),
            None => (None, s),
        };
        let (a, p) = rest.rsplit_once(':').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(bad());
        }
        Ok(Egress {
            proto,
            addr,
            port: parse_port(p).ok_or_else(bad)?,
        })
    }
}

impl TryFrom<String> for Egress {
    type Error = NetError;
    fn try_from(s: String) -> Result<Self, NetError> {
        s.parse()
    }
}

impl From<Egress> for String {
    fn from(e: Egress) -> String {
        e.to_string()
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.proto {
            write!(f, "{}/", p.as_str())?;
        }
        write!(f, "{}:{}", self.addr, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subnets() {
        let s: Subnet = "10.9.0.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(s.holds_workload(Ipv4Addr::new(10, 9, 0, 10)));
        for no in [[10, 9, 0, 0], [10, 9, 0, 1], [10, 9, 0, 255], [10, 9, 1, 2]] {
            assert!(!s.holds_workload(Ipv4Addr::from(no)), "{no:?}");
        }
        for bad in [
            "10.9.0.1/24",
            "10.9.0.0",
            "10.9.0.0/8",
            "10.9.0.0/30",
            "8.8.8.0/24",
            "10.9.0.0/x",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert!(s.overlaps(&"10.9.0.128/25".parse().unwrap()));
        assert!(!s.overlaps(&"10.8.0.0/24".parse().unwrap()));
        assert!("100.64.3.0/24".parse::<Subnet>().is_ok());
    }

    #[test]
    fn ports_and_egress() {
        assert_eq!(
            "tcp/3389".parse::<Port>().unwrap(),
            Port {
                proto: Proto::Tcp,
                port: 3389
            }
        );
        for bad in ["3389", "tcp/0", "sctp/1", "tcp/65536", "tcp/", "/22"] {
            assert!(bad.parse::<Port>().is_err(), "{bad}");
        }
        let e: Egress = "203.0.113.5:443".parse().unwrap();
        assert_eq!(e.protos(), vec![Proto::Tcp, Proto::Udp]);
        let e: Egress = "udp/203.0.113.5:53".parse().unwrap();
        assert_eq!(e.protos(), vec![Proto::Udp]);
        for bad in [
            "203.0.113.5",
            "0.0.0.0:1",
            "host:443",
            "203.0.113.5:0",
            "x/1.2.3.4:5",
        ] {
            assert!(bad.parse::<Egress>().is_err(), "{bad}");
        }
    }

    proptest! {
        /// What is written back reads the same.
        #[test]
        fn round_trips(a: [u8; 4], port in 1u16.., tcp: bool, both: bool) {
            let proto = if tcp { Proto::Tcp } else { Proto::Udp };
            let p = Port { proto, port };
            prop_assert_eq!(p.to_string().parse::<Port>().unwrap(), p);
            let addr = Ipv4Addr::from(a);
            if !(addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast()) {
                let e = Egress { proto: (!both).then_some(proto), addr, port };
                prop_assert_eq!(e.to_string().parse::<Egress>().unwrap(), e);
            }
        }

        /// Arbitrary text never panics the parsers.
        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = s.parse::<Subnet>();
            let _ = s.parse::<Port>();
            let _ = s.parse::<Egress>();
        }
    }
}

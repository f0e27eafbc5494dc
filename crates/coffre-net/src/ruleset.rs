//! The vault's firewall: one nftables table (family `inet`) that the vault
//! owns, written in nftables' JSON (`nft -j -f -`, see libnftables-json(5))
//! and replaced in one transaction, never flushed and rebuilt rule by rule.
//!
//! Default deny in every direction that touches the vault's links (its
//! workloads' taps and veths) or the VPN's tun; the rest of the host's
//! traffic is not this table's business (its chains accept, so the host's
//! own rules still decide). A drop in any table is final, so a host rule
//! that accepts cannot open what this table drops.
//!
//! - A VPN client reaches a workload's declared ports only while its
//!   address is in that workload's `clients_N` set; the daemon adds a
//!   member's address when OpenVPN reports it and removes it when the
//!   session ends. Both directions check the set, so replies stop too:
//!   an established connection does not outlive a revocation.
//! - No client-to-client traffic; clients reach only ICMP echo on the
//!   host's VPN address.
//! - Workloads reach each other's declared ports, the host's DHCP server,
//!   and the `egress` destinations (with source NAT on the way out); those
//!   with a share of the data, the host's NFS server too; nothing else. A
//!   workload's link accepts only its own MAC and address (no spoofing),
//!   except a DHCP request before it has an address.
//! - Routing, not bridging: each link is a point-to-point route (a /32
//!   and proxy ARP), so every packet between workloads crosses the host's
//!   `forward` hook whether or not `br_netfilter` is loaded.

use crate::addr::{Egress, Port, Proto, Subnet};
use crate::names::mac_text;
use serde_json::{Value, json};
use std::net::Ipv4Addr;

/// A workload on the vault network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The workload's name.
    pub name: String,
    /// Its address on the vault network.
    pub addr: Ipv4Addr,
    /// The host side of its link (tap or veth).
    pub link: String,
    /// The MAC it must send from.
    pub mac: [u8; 6],
    /// What members (over the VPN) and other workloads may reach.
    pub ports: Vec<Port>,
    /// Where it may send outside the vault network, besides the vault's
    /// own `egress`.
    pub egress: Vec<Egress>,
    /// Whether it mounts a share of the data from the host's NFS server
    /// (a VM with `share`): it may reach [`NFS_PORTS`] on the gateway
    /// address.
    pub nfs: bool,
}

/// What a workload with a share reaches on the gateway address: the NFS
/// server (2049) and the portmapper a client asks for its port (111).
pub const NFS_PORTS: [Port; 3] = [
    Port {
        proto: Proto::Tcp,
        port: 2049,
    },
    Port {
        proto: Proto::Tcp,
        port: 111,
    },
    Port {
        proto: Proto::Udp,
        port: 111,
    },
];

/// What every workload reaches on the gateway address: the vault's
/// directory, LDAP (StartTLS required) and LDAPS.
pub const LDAP_PORTS: [Port; 2] = [
    Port {
        proto: Proto::Tcp,
        port: 389,
    },
    Port {
        proto: Proto::Tcp,
        port: 636,
    },
];

/// The OpenVPN gateway as the firewall sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vpn {
    /// Its tun device.
    pub link: String,
    /// The host's address on the VPN (clients may ping it).
    pub gateway: Ipv4Addr,
    /// The VPN's address space: packets from it come only through the tun.
    pub network: Subnet,
}

/// Everything the table is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The table's name ([`crate::names::table`]).
    pub table: String,
    /// The vault network.
    pub subnet: Subnet,
    /// The gateway, if the vault has one.
    pub vpn: Option<Vpn>,
    /// The workloads on the network.
    pub endpoints: Vec<Endpoint>,
    /// Destinations every workload may reach.
    pub egress: Vec<Egress>,
    /// Links whose forwarding the vault turned on for egress replies
    /// (they did not forward before): through them only those replies
    /// are forwarded.
    pub uplinks: Vec<String>,
}

const FAMILY: &str = "inet";

fn mtch(left: Value, op: &str, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn set(name: &str) -> Value {
    Value::String(format!("@{name}"))
}

fn ct_state(states: &[&str]) -> Value {
    mtch(json!({"ct": {"key": "state"}}), "in", json!(states))
}

fn accept() -> Value {
    json!({"accept": null})
}

fn drop_() -> Value {
    json!({"drop": null})
}

fn counter() -> Value {
    json!({"counter": null})
}

fn jump(target: &str) -> Value {
    json!({"jump": {"target": target}})
}

fn icmp_echo() -> Value {
    mtch(payload("icmp", "type"), "==", json!("echo-request"))
}

/// `meta l4proto . th dport { tcp . 22, ... }`
fn ports_match(ports: &[Port]) -> Value {
    let elems: Vec<Value> = ports
        .iter()
        .map(|p| json!({"concat": [p.proto.as_str(), p.port]}))
        .collect();
    mtch(
        json!({"concat": [meta("l4proto"), payload("th", "dport")]}),
        "==",
        json!({"set": elems}),
    )
}

/// The name of the set of VPN addresses that may reach endpoint `i`.
pub fn clients_set(i: usize) -> String {
    format!("clients_{i}")
}

impl Policy {
    fn table_obj(&self) -> Value {
        json!({"family": FAMILY, "name": self.table})
    }

    fn set_obj(&self, name: &str, ty: Value, elems: Vec<Value>, comment: &str) -> Value {
        let mut s = json!({
            "family": FAMILY, "table": self.table, "name": name, "type": ty,
            "comment": comment,
        });
        if !elems.is_empty() {
            s["elem"] = Value::Array(elems);
        }
        json!({"add": {"set": s}})
    }

    fn chain(&self, name: &str, hook: Option<(&str, &str, i32)>) -> Value {
        let mut c = json!({"family": FAMILY, "table": self.table, "name": name});
        if let Some((ty, hook, prio)) = hook {
            c["type"] = json!(ty);
            c["hook"] = json!(hook);
            c["prio"] = json!(prio);
            // Not ours: what does not touch the vault is left to the
            // host's own rules.
            c["policy"] = json!("accept");
        }
        json!({"add": {"chain": c}})
    }

    fn rule(&self, chain: &str, expr: Vec<Value>) -> Value {
        json!({"add": {"rule": {
            "family": FAMILY, "table": self.table, "chain": chain, "expr": expr,
        }}})
    }

    /// The whole table, as one `nft -j -f -` batch that replaces whatever
    /// table of that name is there in a single transaction (add, so the
    /// delete cannot fail; delete; add anew). Client sets start empty.
    pub fn ruleset(&self) -> Value {
        let mut cmds = vec![
            json!({"add": {"table": self.table_obj()}}),
            json!({"delete": {"table": self.table_obj()}}),
            json!({"add": {"table": self.table_obj()}}),
        ];
        let links: Vec<Value> = self.endpoints.iter().map(|e| json!(e.link)).collect();
        let vpn_links: Vec<Value> = self.vpn.iter().map(|v| json!(v.link)).collect();
        cmds.push(self.set_obj(
            "workload_links",
            json!("ifname"),
            links,
            "the host side of every workload's link",
        ));
        cmds.push(self.set_obj(
            "vpn_links",
            json!("ifname"),
            vpn_links,
            "the OpenVPN gateway's tun",
        ));
        let uplinks: Vec<Value> = self.uplinks.iter().map(|l| json!(l)).collect();
        cmds.push(self.set_obj(
            "opened_uplinks",
            json!("ifname"),
            uplinks,
            "links the vault turned forwarding on for, for egress replies only",
        ));
        let sources = self
            .endpoints
            .iter()
            .map(|e| json!({"concat": [e.link, mac_text(&e.mac), e.addr.to_string()]}))
            .collect();
        cmds.push(self.set_obj(
            "sources",
            json!(["ifname", "ether_addr", "ipv4_addr"]),
            sources,
            "what each link may send from: its workload's MAC and address",
        ));
        let macs = self
            .endpoints
            .iter()
            .map(|e| json!({"concat": [e.link, mac_text(&e.mac)]}))
            .collect();
        cmds.push(self.set_obj(
            "macs",
            json!(["ifname", "ether_addr"]),
            macs,
            "each link's MAC, for DHCP before an address",
        ));
        for (i, e) in self.endpoints.iter().enumerate() {
            cmds.push(self.set_obj(
                &clients_set(i),
                json!("ipv4_addr"),
                vec![],
                &format!("VPN addresses of the members who may use {}", e.name),
            ));
        }
        let nfs_clients = self
            .endpoints
            .iter()
            .filter(|e| e.nfs)
            .map(|e| json!(e.addr.to_string()))
            .collect();
        cmds.push(self.set_obj(
            "nfs_clients",
            json!("ipv4_addr"),
            nfs_clients,
            "the workloads that mount a share of the data from the host",
        ));
        let egress = self
            .egress
            .iter()
            .flat_map(|g| {
                g.protos()
                    .into_iter()
                    .map(move |p| json!({"concat": [g.addr.to_string(), p.as_str(), g.port]}))
            })
            .collect();
        cmds.push(self.set_obj(
            "egress",
            json!(["ipv4_addr", "inet_proto", "inet_service"]),
            egress,
            "where every workload may send outside the vault network",
        ));
        let egress_from = self
            .endpoints
            .iter()
            .flat_map(|e| {
                e.egress.iter().flat_map(move |g| {
                    g.protos().into_iter().map(move |p| {
                        json!({"concat": [e.addr.to_string(), g.addr.to_string(), p.as_str(), g.port]})
                    })
                })
            })
            .collect();
        cmds.push(self.set_obj(
            "egress_from",
            json!(["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"]),
            egress_from,
            "where one workload may send outside the vault network",
        ));

        // Anti-spoofing, before anything else looks at the packet.
        cmds.push(self.chain("prerouting", Some(("filter", "prerouting", -300))));
        cmds.push(self.chain("from_workload_link", None));
        cmds.push(self.rule(
            "prerouting",
            vec![
                mtch(meta("iifname"), "==", set("workload_links")),
                jump("from_workload_link"),
            ],
        ));
        // The vault's and the VPN's addresses come only from their own
        // links (or the host itself): from anywhere else (the uplink's
        // LAN) they are forged, and would pass for a workload or a member.
        let subnet = json!({"prefix": {"addr": self.subnet.base().to_string(), "len": self.subnet.prefix()}});
        cmds.push(self.rule(
            "prerouting",
            vec![
                mtch(payload("ip", "saddr"), "==", subnet.clone()),
                mtch(meta("iifname"), "!=", set("workload_links")),
                mtch(meta("iifname"), "!=", json!("lo")),
                counter(),
                drop_(),
            ],
        ));
        if let Some(v) = &self.vpn {
            cmds.push(self.rule(
                "prerouting",
                vec![
                    mtch(
                        payload("ip", "saddr"),
                        "==",
                        json!({"prefix": {"addr": v.network.base().to_string(), "len": v.network.prefix()}}),
                    ),
                    mtch(meta("iifname"), "!=", set("vpn_links")),
                    mtch(meta("iifname"), "!=", json!("lo")),
                    counter(),
                    drop_(),
                ],
            ));
        }
        let w = "from_workload_link";
        cmds.push(self.rule(
            w,
            vec![
                mtch(meta("nfproto"), "==", json!("ipv6")),
                counter(),
                drop_(),
            ],
        ));
        cmds.push(self.rule(
            w,
            vec![
                mtch(
                    json!({"concat": [meta("iifname"), payload("ether", "saddr"), payload("ip", "saddr")]}),
                    "==",
                    set("sources"),
                ),
                json!({"return": null}),
            ],
        ));
        cmds.push(self.rule(
            w,
            vec![
                mtch(payload("ip", "saddr"), "==", json!("0.0.0.0")),
                mtch(payload("ip", "daddr"), "==", json!("255.255.255.255")),
                mtch(payload("udp", "sport"), "==", json!(68)),
                mtch(payload("udp", "dport"), "==", json!(67)),
                mtch(
                    json!({"concat": [meta("iifname"), payload("ether", "saddr")]}),
                    "==",
                    set("macs"),
                ),
                json!({"return": null}),
            ],
        ));
        cmds.push(self.rule(w, vec![counter(), drop_()]));

        // The host itself.
        cmds.push(self.chain("input", Some(("filter", "input", 0))));
        cmds.push(self.chain("input_from_workload", None));
        cmds.push(self.chain("input_from_vpn", None));
        cmds.push(self.rule(
            "input",
            vec![
                mtch(meta("iifname"), "==", set("workload_links")),
                jump("input_from_workload"),
            ],
        ));
        cmds.push(self.rule(
            "input",
            vec![
                mtch(meta("iifname"), "==", set("vpn_links")),
                jump("input_from_vpn"),
            ],
        ));
        let gw = self.subnet.gateway().to_string();
        let gw = json!(gw);
        cmds.push(self.rule(
            "input_from_workload",
            vec![
                mtch(
                    payload("ip", "daddr"),
                    "==",
                    json!({"set": [gw.clone(), "255.255.255.255"]}),
                ),
                mtch(payload("udp", "sport"), "==", json!(68)),
                mtch(payload("udp", "dport"), "==", json!(67)),
                accept(),
            ],
        ));
        cmds.push(self.rule(
            "input_from_workload",
            vec![
                mtch(payload("ip", "daddr"), "==", gw.clone()),
                icmp_echo(),
                accept(),
            ],
        ));
        // The source was checked against the link in prerouting, so it
        // names the workload. Replies leave by `output_to_workload`'s
        // established rule.
        cmds.push(self.rule(
            "input_from_workload",
            vec![
                mtch(payload("ip", "saddr"), "==", set("nfs_clients")),
                mtch(payload("ip", "daddr"), "==", gw.clone()),
                ports_match(&NFS_PORTS),
                accept(),
            ],
        ));
        // The vault's directory (LDAP with StartTLS, LDAPS): every
        // workload may ask it; it shows each only its own members.
        cmds.push(self.rule(
            "input_from_workload",
            vec![
                mtch(payload("ip", "daddr"), "==", gw.clone()),
                ports_match(&LDAP_PORTS),
                accept(),
            ],
        ));
        cmds.push(self.rule("input_from_workload", vec![counter(), drop_()]));
        if let Some(v) = &self.vpn {
            cmds.push(self.rule(
                "input_from_vpn",
                vec![
                    mtch(payload("ip", "daddr"), "==", json!(v.gateway.to_string())),
                    icmp_echo(),
                    accept(),
                ],
            ));
        }
        cmds.push(self.rule("input_from_vpn", vec![counter(), drop_()]));

        cmds.push(self.chain("output", Some(("filter", "output", 0))));
        cmds.push(self.chain("output_to_workload", None));
        cmds.push(self.chain("output_to_vpn", None));
        // The NFS server's portmapper answers over a UDP socket bound in
        // the host's namespace: it may send to the workloads' links only
        // (taken over, it would reach the host's own UDP services). Known
        // by the mark the daemon set on it, not by its address or port,
        // which a sender may choose (IP_PKTINFO).
        cmds.push(self.rule(
            "output",
            vec![
                mtch(
                    meta("mark"),
                    "==",
                    json!(crate::names::nfs_mark(&self.table)),
                ),
                mtch(meta("oifname"), "!=", set("workload_links")),
                counter(),
                drop_(),
            ],
        ));
        cmds.push(self.rule(
            "output",
            vec![
                mtch(meta("oifname"), "==", set("workload_links")),
                jump("output_to_workload"),
            ],
        ));
        cmds.push(self.rule(
            "output",
            vec![
                mtch(meta("oifname"), "==", set("vpn_links")),
                jump("output_to_vpn"),
            ],
        ));
        cmds.push(self.rule(
            "output_to_workload",
            vec![
                mtch(payload("udp", "sport"), "==", json!(67)),
                mtch(payload("udp", "dport"), "==", json!(68)),
                accept(),
            ],
        ));
        for c in ["output_to_workload", "output_to_vpn"] {
            cmds.push(self.rule(c, vec![ct_state(&["established", "related"]), accept()]));
            cmds.push(self.rule(c, vec![counter(), drop_()]));
        }

        // Between the VPN, the workloads and the world.
        cmds.push(self.chain("forward", Some(("filter", "forward", 0))));
        for (dir, set_name, chain) in [
            ("iifname", "vpn_links", "from_vpn"),
            ("oifname", "vpn_links", "to_vpn"),
            ("iifname", "workload_links", "from_workload"),
            ("oifname", "workload_links", "to_workload"),
        ] {
            cmds.push(self.chain(chain, None));
            cmds.push(self.rule(
                "forward",
                vec![mtch(meta(dir), "==", set(set_name)), jump(chain)],
            ));
        }
        // An uplink that forwards only because of the vault forwards
        // nothing but the vault's egress replies (handled above).
        cmds.push(self.rule(
            "forward",
            vec![
                mtch(meta("iifname"), "==", set("opened_uplinks")),
                counter(),
                drop_(),
            ],
        ));
        for (i, e) in self.endpoints.iter().enumerate() {
            let clients = clients_set(i);
            let addr = json!(e.addr.to_string());
            if !e.ports.is_empty() {
                cmds.push(self.rule(
                    "from_vpn",
                    vec![
                        mtch(payload("ip", "saddr"), "==", set(&clients)),
                        mtch(payload("ip", "daddr"), "==", addr.clone()),
                        ports_match(&e.ports),
                        accept(),
                    ],
                ));
                cmds.push(self.rule(
                    "from_vpn",
                    vec![
                        mtch(payload("ip", "saddr"), "==", set(&clients)),
                        mtch(payload("ip", "daddr"), "==", addr.clone()),
                        icmp_echo(),
                        accept(),
                    ],
                ));
            }
            cmds.push(self.rule(
                "to_vpn",
                vec![
                    mtch(meta("iifname"), "==", set("workload_links")),
                    mtch(payload("ip", "saddr"), "==", addr.clone()),
                    mtch(payload("ip", "daddr"), "==", set(&clients)),
                    ct_state(&["established", "related"]),
                    accept(),
                ],
            ));
        }
        cmds.push(self.rule("from_vpn", vec![counter(), drop_()]));
        cmds.push(self.rule("to_vpn", vec![counter(), drop_()]));

        cmds.push(self.rule(
            "from_workload",
            vec![
                mtch(meta("oifname"), "==", set("workload_links")),
                ct_state(&["established", "related"]),
                accept(),
            ],
        ));
        for e in self.endpoints.iter().filter(|e| !e.ports.is_empty()) {
            cmds.push(self.rule(
                "from_workload",
                vec![
                    mtch(meta("oifname"), "==", set("workload_links")),
                    mtch(payload("ip", "daddr"), "==", json!(e.addr.to_string())),
                    ports_match(&e.ports),
                    accept(),
                ],
            ));
        }
        cmds.push(self.rule(
            "from_workload",
            vec![
                mtch(
                    json!({"concat": [payload("ip", "daddr"), meta("l4proto"), payload("th", "dport")]}),
                    "==",
                    set("egress"),
                ),
                accept(),
            ],
        ));
        cmds.push(self.rule(
            "from_workload",
            vec![
                mtch(
                    json!({"concat": [payload("ip", "saddr"), payload("ip", "daddr"), meta("l4proto"), payload("th", "dport")]}),
                    "==",
                    set("egress_from"),
                ),
                accept(),
            ],
        ));
        cmds.push(self.rule("from_workload", vec![counter(), drop_()]));
        // From elsewhere to a workload: only the replies to what a
        // workload started (its egress).
        cmds.push(self.rule(
            "to_workload",
            vec![
                ct_state(&["established", "related"]),
                mtch(json!({"ct": {"key": "direction"}}), "==", json!("reply")),
                mtch(
                    json!({"ct": {"key": "ip saddr", "dir": "original"}}),
                    "==",
                    subnet.clone(),
                ),
                accept(),
            ],
        ));
        cmds.push(self.rule("to_workload", vec![counter(), drop_()]));

        // Egress leaves with the host's address.
        cmds.push(self.chain("postrouting", None));
        if let Some(Value::Object(c)) = cmds
            .last_mut()
            .and_then(|v| v.get_mut("add"))
            .and_then(|v| v.get_mut("chain"))
        {
            c.insert("type".into(), json!("nat"));
            c.insert("hook".into(), json!("postrouting"));
            c.insert("prio".into(), json!(100));
            c.insert("policy".into(), json!("accept"));
        }
        cmds.push(self.rule(
            "postrouting",
            vec![
                mtch(
                    payload("ip", "saddr"),
                    "==",
                    json!({"prefix": {"addr": self.subnet.base().to_string(), "len": self.subnet.prefix()}}),
                ),
                mtch(meta("iifname"), "==", set("workload_links")),
                mtch(meta("oifname"), "!=", set("workload_links")),
                mtch(meta("oifname"), "!=", set("vpn_links")),
                json!({"masquerade": null}),
            ],
        ));
        json!({"nftables": cmds})
    }

    /// A batch that lets VPN address `addr` reach the endpoints at
    /// `indexes` (one transaction).
    pub fn grant(&self, addr: Ipv4Addr, indexes: &[usize]) -> Value {
        self.elements("add", addr, indexes)
    }

    /// The batch that makes every client set exactly `grants` (address →
    /// endpoint indexes), whatever it holds now: each set is flushed and
    /// filled in the same transaction, so no packet sees it empty, and a
    /// failed or lost update is healed by the next one.
    pub fn grants(&self, grants: &std::collections::BTreeMap<Ipv4Addr, Vec<usize>>) -> Value {
        let mut cmds = Vec::new();
        for i in 0..self.endpoints.len() {
            let name = clients_set(i);
            cmds.push(json!({"flush": {"set": {
                "family": FAMILY, "table": self.table, "name": name,
            }}}));
            let elems: Vec<Value> = grants
                .iter()
                .filter(|(_, idx)| idx.contains(&i))
                .map(|(a, _)| json!(a.to_string()))
                .collect();
            if !elems.is_empty() {
                cmds.push(json!({"add": {"element": {
                    "family": FAMILY, "table": self.table, "name": name, "elem": elems,
                }}}));
            }
        }
        json!({"nftables": cmds})
    }

    /// The batch that takes it back. Every element must be there (nftables
    /// 1.0.6 has no `destroy`): the caller removes what it added.
    pub fn revoke(&self, addr: Ipv4Addr, indexes: &[usize]) -> Value {
        self.elements("delete", addr, indexes)
    }

    fn elements(&self, verb: &str, addr: Ipv4Addr, indexes: &[usize]) -> Value {
        let cmds: Vec<Value> = indexes
            .iter()
            .map(|i| {
                json!({verb: {"element": {
                    "family": FAMILY, "table": self.table, "name": clients_set(*i),
                    "elem": [addr.to_string()],
                }}})
            })
            .collect();
        json!({"nftables": cmds})
    }

    /// The batch that removes the table (when the vault stops having a
    /// network).
    pub fn removal(table: &str) -> Value {
        let t = json!({"family": FAMILY, "name": table});
        json!({"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Policy {
        Policy {
            table: "coffre_test".into(),
            subnet: "10.9.0.0/24".parse().unwrap(),
            vpn: Some(Vpn {
                link: "cvtest".into(),
                gateway: Ipv4Addr::new(10, 8, 0, 1),
                network: "10.8.0.0/24".parse().unwrap(),
            }),
            endpoints: vec![
                Endpoint {
                    name: "desktop".into(),
                    addr: Ipv4Addr::new(10, 9, 0, 10),
                    link: "cwdesk".into(),
                    mac: [2, 0, 0, 0, 0, 10],
                    ports: vec!["tcp/3389".parse().unwrap(), "tcp/22".parse().unwrap()],
                    egress: vec![],
                    nfs: true,
                },
                Endpoint {
                    name: "forge".into(),
                    addr: Ipv4Addr::new(10, 9, 0, 20),
                    link: "cwforge".into(),
                    mac: [2, 0, 0, 0, 0, 20],
                    ports: vec!["tcp/3000".parse().unwrap()],
                    egress: vec!["198.51.100.7:443".parse().unwrap()],
                    nfs: false,
                },
            ],
            egress: vec!["tcp/203.0.113.5:443".parse().unwrap()],
            uplinks: vec!["eth9".into()],
        }
    }

    fn rules(v: &Value) -> Vec<String> {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("rule")))
            .map(|r| format!("{}: {}", r["chain"], r["expr"]))
            .collect()
    }

    #[test]
    fn replaces_the_table_in_one_batch() {
        let v = sample().ruleset();
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "inet", "name": "coffre_test"}}})
        );
        assert_eq!(
            cmds[1],
            json!({"delete": {"table": {"family": "inet", "name": "coffre_test"}}})
        );
        // No flush, no delete of anything else.
        assert_eq!(
            cmds.iter()
                .filter(|c| c.get("delete").is_some() || c.get("flush").is_some())
                .count(),
            1
        );
    }

    #[test]
    fn every_chain_that_touches_the_vault_ends_in_drop() {
        let v = sample().ruleset();
        let rs = rules(&v);
        for chain in [
            "from_workload_link",
            "input_from_workload",
            "input_from_vpn",
            "output_to_workload",
            "output_to_vpn",
            "from_vpn",
            "to_vpn",
            "from_workload",
            "to_workload",
        ] {
            let last = rs
                .iter()
                .rfind(|r| r.starts_with(&format!("\"{chain}\":")))
                .unwrap_or_else(|| panic!("no rule in {chain}"));
            assert!(last.ends_with(r#"{"drop":null}]"#), "{chain}: {last}");
        }
    }

    /// The portmapper's UDP answers leave by the workloads' links only.
    #[test]
    fn the_portmappers_udp_socket_reaches_the_workloads_only() {
        let rs = rules(&sample().ruleset());
        let first = rs
            .iter()
            .find(|r| r.starts_with("\"output\":"))
            .expect("an output rule");
        let mark = format!(r#""right":{}"#, crate::names::nfs_mark("coffre_test"));
        for part in [
            r#""key":"mark""#,
            mark.as_str(),
            r#""op":"!=""#,
            r#""right":"@workload_links""#,
            r#"{"drop":null}"#,
        ] {
            assert!(first.contains(part), "{part}: {first}");
        }
    }

    #[test]
    fn member_rules_go_through_sets_not_addresses() {
        let p = sample();
        let v = p.ruleset();
        // Rules on VPN traffic name the clients' side by a set, never by
        // an address: a member's address is only ever a set element.
        for r in v["nftables"].as_array().unwrap() {
            let Some(rule) = r.get("add").and_then(|a| a.get("rule")) else {
                continue;
            };
            let (chain, side) = match rule["chain"].as_str().unwrap() {
                "from_vpn" => ("from_vpn", "saddr"),
                "to_vpn" => ("to_vpn", "daddr"),
                _ => continue,
            };
            for e in rule["expr"].as_array().unwrap() {
                if e["match"]["left"] == payload("ip", side) {
                    let right = e["match"]["right"].as_str().unwrap_or("");
                    assert!(right.starts_with("@clients_"), "{chain}: {e}");
                }
            }
        }
        let g = p.grant(Ipv4Addr::new(10, 8, 0, 6), &[0, 1]);
        assert_eq!(g["nftables"].as_array().unwrap().len(), 2);
        assert_eq!(g["nftables"][1]["add"]["element"]["name"], "clients_1");
        let r = p.revoke(Ipv4Addr::new(10, 8, 0, 6), &[1]);
        assert_eq!(r["nftables"][0]["delete"]["element"]["elem"][0], "10.8.0.6");
    }

    #[test]
    fn grants_replace_every_set_in_one_batch() {
        let p = sample();
        let mut g = std::collections::BTreeMap::new();
        g.insert(Ipv4Addr::new(10, 8, 0, 6), vec![0, 1]);
        g.insert(Ipv4Addr::new(10, 8, 0, 7), vec![1]);
        let v = p.grants(&g);
        let cmds = v["nftables"].as_array().unwrap();
        // Each set: flushed, then filled (the empty one only flushed).
        assert_eq!(cmds[0]["flush"]["set"]["name"], "clients_0");
        assert_eq!(cmds[1]["add"]["element"]["elem"], json!(["10.8.0.6"]));
        assert_eq!(cmds[2]["flush"]["set"]["name"], "clients_1");
        assert_eq!(
            cmds[3]["add"]["element"]["elem"],
            json!(["10.8.0.6", "10.8.0.7"])
        );
        let none = p.grants(&Default::default());
        assert_eq!(none["nftables"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn forged_vault_and_vpn_sources_are_dropped_unless_on_their_own_links() {
        let rs = rules(&sample().ruleset());
        let pre: Vec<&String> = rs
            .iter()
            .filter(|r| r.starts_with("\"prerouting\""))
            .collect();
        for net in ["10.9.0.0", "10.8.0.0"] {
            assert!(
                pre.iter().any(|r| r.contains(net)
                    && r.contains("\"!=\"")
                    && r.ends_with(r#"{"drop":null}]"#)),
                "{net}: {pre:?}"
            );
        }
        // Masquerade only what comes from a workload's link.
        let nat = rs
            .iter()
            .find(|r| r.starts_with("\"postrouting\""))
            .unwrap();
        assert!(
            nat.contains(r#"{"meta":{"key":"iifname"}},"right":"@workload_links"}"#),
            "{nat}"
        );
        // Into a workload from elsewhere: replies to what it started only.
        let to_w = rs
            .iter()
            .find(|r| r.starts_with("\"to_workload\""))
            .unwrap();
        assert!(
            to_w.contains("direction") && to_w.contains("original"),
            "{to_w}"
        );
    }

    #[test]
    fn the_rule_count_does_not_grow_with_members() {
        let p = sample();
        let n = rules(&p.ruleset()).len();
        let mut q = sample();
        q.endpoints.push(Endpoint {
            name: "third".into(),
            addr: Ipv4Addr::new(10, 9, 0, 30),
            link: "cwthird".into(),
            mac: [2, 0, 0, 0, 0, 30],
            ports: vec![],
            egress: vec![],
            nfs: true,
        });
        // A workload without ports adds one reply rule, not one per member
        // (and none for its share: it is a set element).
        assert_eq!(rules(&q.ruleset()).len(), n + 1);
    }

    #[test]
    fn only_workloads_with_a_share_reach_the_nfs_server_on_the_gateway() {
        let v = sample().ruleset();
        let set = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("set")))
            .find(|s| s["name"] == "nfs_clients")
            .expect("an nfs_clients set");
        assert_eq!(set["type"], "ipv4_addr");
        // desktop has a share, forge has none.
        assert_eq!(set["elem"], json!(["10.9.0.10"]));

        let input: Vec<String> = rules(&v)
            .into_iter()
            .filter(|r| r.starts_with("\"input_from_workload\""))
            .collect();
        let nfs: Vec<&String> = input.iter().filter(|r| r.contains("2049")).collect();
        assert_eq!(nfs.len(), 1, "{input:?}");
        let expr = json!([
            mtch(payload("ip", "saddr"), "==", json!("@nfs_clients")),
            mtch(payload("ip", "daddr"), "==", json!("10.9.0.1")),
            mtch(
                json!({"concat": [meta("l4proto"), payload("th", "dport")]}),
                "==",
                json!({"set": [
                    {"concat": ["tcp", 2049]},
                    {"concat": ["tcp", 111]},
                    {"concat": ["udp", 111]},
                ]}),
            ),
            {"accept": null},
        ]);
        assert_eq!(*nfs[0], format!("\"input_from_workload\": {expr}"));
        // The directory (LDAP, LDAPS) is open to every workload, on the
        // gateway address only.
        let ldap: Vec<&String> = input.iter().filter(|r| r.contains("636")).collect();
        assert_eq!(ldap.len(), 1, "{input:?}");
        let expr = json!([
            mtch(payload("ip", "daddr"), "==", json!("10.9.0.1")),
            mtch(
                json!({"concat": [meta("l4proto"), payload("th", "dport")]}),
                "==",
                json!({"set": [{"concat": ["tcp", 389]}, {"concat": ["tcp", 636]}]}),
            ),
            {"accept": null},
        ]);
        assert_eq!(*ldap[0], format!("\"input_from_workload\": {expr}"));
        // Nothing else on the host opens for a workload: no other accept
        // names a TCP port, and the only UDP one is DHCP.
        for r in input
            .iter()
            .filter(|r| r.contains("accept") && *r != nfs[0] && *r != ldap[0])
        {
            assert!(!r.contains("\"tcp\""), "{r}");
            assert!(!r.contains("\"udp\"") || r.contains("67"), "{r}");
        }
        // The replies leave by the established rule.
        assert!(
            rules(&v)
                .iter()
                .any(|r| r.starts_with("\"output_to_workload\"")
                    && r.contains("established")
                    && r.ends_with(r#"{"accept":null}]"#)),
        );

        let mut none = sample();
        for e in &mut none.endpoints {
            e.nfs = false;
        }
        let v = none.ruleset();
        let set = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("set")))
            .find(|s| s["name"] == "nfs_clients")
            .unwrap();
        assert!(set.get("elem").is_none(), "{set}");
    }
}

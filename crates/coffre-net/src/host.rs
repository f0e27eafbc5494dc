//! The host's side: running `nft` and `ip`, and the per-interface kernel
//! settings, in the host's network namespace (the daemon) or in a named
//! one (tests that stand in for a host).
//!
//! The links are routed, never bridged: the host side of each workload's
//! link holds the gateway address as a /32, a /32 route points at the
//! workload, and proxy ARP answers for the other addresses of the subnet,
//! so workload-to-workload packets are forwarded by the host's IP layer
//! and cross the firewall's `forward` hook (a bridge would need
//! `br_netfilter`, which a stock host may not have loaded).

use crate::NetError;
use serde_json::Value;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where commands run.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// A network namespace (`/run/netns/NAME`) to run in instead of the
    /// caller's.
    pub netns: Option<PathBuf>,
}

impl Host {
    /// The caller's own network namespace.
    pub fn here() -> Self {
        Self::default()
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => coffre_sys::child::system_tool(program),
            Some(ns) => {
                let mut c = coffre_sys::child::system_tool("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(program);
                c
            }
        }
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, NetError> {
        let mut c = self.command(program);
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{program} {}", args.join(" "));
        let mut child = c.spawn().map_err(|e| NetError::Tool {
            what: what.clone(),
            msg: format!("{e} (is {program} installed? scripts/install-deps installs it)"),
        })?;
        if let Some(bytes) = stdin
            && let Some(mut i) = child.stdin.take()
        {
            i.write_all(bytes).map_err(|e| NetError::Tool {
                what: what.clone(),
                msg: e.to_string(),
            })?;
        }
        let out = child.wait_with_output().map_err(|e| NetError::Tool {
            what: what.clone(),
            msg: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(NetError::Tool {
                what,
                msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs one nftables JSON batch: one transaction, all or nothing.
    pub fn nft(&self, batch: &Value) -> Result<(), NetError> {
        self.run(
            "nft",
            &["-j", "-f", "-"],
            Some(batch.to_string().as_bytes()),
        )
        .map(|_| ())
    }

    /// The table as nftables lists it (JSON), or `None` when it is absent.
    pub fn nft_table(&self, table: &str) -> Result<Option<Value>, NetError> {
        match self.run("nft", &["-j", "list", "table", "inet", table], None) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| NetError::Tool {
                    what: "nft -j list table".into(),
                    msg: e.to_string(),
                }),
            Err(NetError::Tool { msg, .. }) if msg.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The addresses in one of the table's sets.
    pub fn nft_set(&self, table: &str, set: &str) -> Result<Vec<String>, NetError> {
        let text = self.run("nft", &["-j", "list", "set", "inet", table, set], None)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| NetError::Tool {
            what: "nft -j list set".into(),
            msg: e.to_string(),
        })?;
        let mut out = Vec::new();
        for o in v["nftables"].as_array().into_iter().flatten() {
            for e in o["set"]["elem"].as_array().into_iter().flatten() {
                if let Some(s) = e.as_str() {
                    out.push(s.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Runs `ip ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        self.run("ip", args, None)
    }

    /// Sets `/proc/sys/net/...` key `key` (dotted, e.g.
    /// `net.ipv4.conf.cw0.proxy_arp`) in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        if key.contains("..") || key.contains('/') || !key.starts_with("net.") {
            return Err(NetError::Config(format!("sysctl {key:?}")));
        }
        match &self.netns {
            None => {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::write(&path, value).map_err(|e| NetError::Tool {
                    what: format!("write {path}"),
                    msg: e.to_string(),
                })
            }
            Some(_) => self
                .run("sysctl", &["-q", "-w", &format!("{key}={value}")], None)
                .map(|_| ()),
        }
    }

    /// Reads `/proc/sys/net/...` key `key` (dotted) in this namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String, NetError> {
        if key.contains("..") || key.contains('/') || !key.starts_with("net.") {
            return Err(NetError::Config(format!("sysctl {key:?}")));
        }
        match &self.netns {
            None => {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::read_to_string(&path)
                    .map(|v| v.trim().to_string())
                    .map_err(|e| NetError::Tool {
                        what: format!("read {path}"),
                        msg: e.to_string(),
                    })
            }
            Some(_) => self
                .run("sysctl", &["-n", key], None)
                .map(|v| v.trim().to_string()),
        }
    }

    /// Whether link `name` exists here.
    pub fn link_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).is_ok()
    }

    /// Sets up the host side of a workload's link (tap or veth), which
    /// must exist: the gateway address as a /32, a route to the workload's
    /// address, proxy ARP (so the workload reaches the rest of the subnet
    /// through the host), forwarding on this link only, no IPv6 (nothing
    /// on the vault network speaks it; a link-local address would be a way
    /// around the IPv4 rules), and the link up.
    pub fn route_link(
        &self,
        link: &str,
        gateway: Ipv4Addr,
        workload: Ipv4Addr,
    ) -> Result<(), NetError> {
        check_name(link)?;
        self.sysctl(&format!("net.ipv6.conf.{link}.disable_ipv6"), "1")?;
        self.sysctl(&format!("net.ipv4.conf.{link}.proxy_arp"), "1")?;
        self.sysctl(&format!("net.ipv4.conf.{link}.forwarding"), "1")?;
        // Strict reverse-path filtering: a packet from this link must
        // come from the address routed to it.
        self.sysctl(&format!("net.ipv4.conf.{link}.rp_filter"), "1")?;
        self.ip(&["addr", "replace", &format!("{gateway}/32"), "dev", link])?;
        self.ip(&["link", "set", "dev", link, "up"])?;
        self.ip(&[
            "route",
            "replace",
            &format!("{workload}/32"),
            "dev",
            link,
            "src",
            &gateway.to_string(),
        ])?;
        Ok(())
    }

    /// A network namespace for a process workload, with a veth whose host
    /// end is `link` and whose other end is `eth0` there with `addr`,
    /// `mac`, and the gateway as its default route. Made anew (a
    /// namespace left by an earlier daemon is deleted first).
    pub fn veth_namespace(
        &self,
        netns: &str,
        link: &str,
        mac: &[u8; 6],
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        check_name(link)?;
        check_name(netns)?;
        let _ = self.ip(&["netns", "delete", netns]);
        let _ = self.ip(&["link", "delete", "dev", link]);
        self.ip(&["netns", "add", netns])?;
        self.ip(&[
            "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        let mac = crate::names::mac_text(mac);
        let cidr = format!("{addr}/{prefix}");
        let gw = gateway.to_string();
        for args in [
            vec!["link", "set", "dev", "lo", "up"],
            vec!["link", "set", "dev", "eth0", "address", &mac],
            vec!["addr", "add", &cidr, "dev", "eth0"],
            vec!["link", "set", "dev", "eth0", "up"],
            vec![
                "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
            ],
        ] {
            let mut a = vec!["-n", netns];
            a.extend(args);
            self.ip(&a)?;
        }
        self.route_link(link, gateway, addr)
    }

    /// Removes a process workload's namespace (its veth goes with it)
    /// and, if named, a host-side link.
    pub fn remove_namespace(&self, netns: &str, link: &str) {
        if !link.is_empty() {
            let _ = self.ip(&["link", "delete", "dev", link]);
        }
        let _ = self.ip(&["netns", "delete", netns]);
    }
}

/// A link or namespace name we make: letters, digits, `-`, `_`, at most
/// 15 bytes for a link.
fn check_name(n: &str) -> Result<(), NetError> {
    if n.is_empty()
        || n.len() > 64
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(NetError::Config(format!("link or namespace name {n:?}")));
    }
    Ok(())
}

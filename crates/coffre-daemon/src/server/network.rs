//! The vault's own network (`[network]` in config.toml): the links the
//! workloads sit on, the firewall's table, and which VPN addresses may
//! reach which workload.
//!
//! - At start, before any workload runs, the links are made (a persistent
//!   tap per VM, a namespace and veth per process workload with
//!   `network = true`) and the table is replaced in one transaction, its
//!   client sets empty: whatever a daemon that died had granted is gone,
//!   and there is no moment without the rules.
//! - Grants follow identity: a VPN client's address (OpenVPN's
//!   `>CLIENT:ADDRESS`) is in a workload's set while that client holds a
//!   live vault session of a member who may use the workload. The grants
//!   are recomputed from the gateway's bindings after every change there,
//!   before its effects (a kill) are carried out: a session ended by a
//!   lock, a removal or a departure loses access at once.
//! - The table stays when the daemon stops or dies (fail closed).

use super::Shell;
use crate::vaultdir::Config;
use coffre_net::{Endpoint, Host, Policy, Vpn, names};
use coffre_workload::Link;
use coffre_workload::config::Kind;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The network as the daemon runs it.
pub(super) struct NetState {
    pub policy: Policy,
    host: Host,
    /// Who may reach endpoint `i` (empty: every member). Superusers are
    /// not special here: reaching a desktop is not administering the
    /// vault.
    reach: Vec<Vec<String>>,
    /// What the client sets hold now: VPN address → endpoint indexes.
    granted: BTreeMap<Ipv4Addr, Vec<usize>>,
    /// VPN addresses OpenVPN reported, by client id.
    pub vpn_addrs: BTreeMap<u64, Ipv4Addr>,
    /// Links whose kernel forwarding the daemon turned on.
    pub forwarding: Vec<String>,
    /// The DHCP server for the VMs' taps (none without VMs).
    dhcp: Option<Dhcp>,
    /// The NFS server for the VMs' shares (none without a share).
    pub nfs: Option<super::nfs::Shared>,
    /// Its exports could not be updated (it was busy): retried each tick.
    pub nfs_dirty: bool,
    /// The vault's directory for the workloads (none if its ports were
    /// taken).
    pub ldap: Option<super::directory::LdapChild>,
    /// The kernel's sets may differ from `granted` (an update failed).
    dirty: bool,
    /// The process workloads' network namespaces.
    namespaces: Vec<String>,
    /// When the table was last checked to be there.
    checked: Instant,
}

/// The DHCP server: a child process of its own that holds no key and no
/// privilege (it parses bytes from guests). The daemon binds its sockets
/// and keeps them, so it can start it again should it die.
struct Dhcp {
    spec: coffre_dhcp::Spec,
    sockets: Vec<OwnedFd>,
    child: Option<Child>,
    started: Option<Instant>,
    log: PathBuf,
    /// The unprivileged user it runs as.
    user: (u32, u32),
}

/// How often the daemon checks that its table is still in the kernel.
const TABLE_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How soon a DHCP server that died is started again.
const DHCP_RESTART_AFTER: Duration = Duration::from_secs(2);

/// Starts `coffre ARGS...` as one of the daemon's helper processes (the
/// DHCP server, the NFS server): this program again, with no
/// environment, stdin piped, stderr appended to `log`, in `/`, holding
/// `pass_fds`, in an empty network namespace (its sockets were bound in
/// the host's; it can make no other that goes anywhere), and with the
/// host's mounts as they are (a private copy would outlive the data's
/// unmount, or another vault's). Credentials are its own business: it
/// drops what it does not need itself, before it reads a byte from guests.
pub(super) fn spawn_helper(
    args: &[&str],
    log: &Path,
    pass_fds: Vec<(OwnedFd, i32)>,
    stdout: Stdio,
) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(log_file);
    coffre_sys::child::prepare(
        &mut cmd,
        coffre_sys::child::ChildSetup {
            credentials: None,
            private_mounts: false,
            cwd: Some("/".into()),
            pass_fds,
            network: coffre_sys::child::Network::Empty,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    cmd.spawn().map_err(|e| format!("starting it: {e}"))
}

impl Dhcp {
    fn start(&mut self) -> Result<u32, String> {
        let mut pass_fds = Vec::new();
        for (s, i) in self.sockets.iter().zip(&self.spec.interfaces) {
            pass_fds.push((s.try_clone().map_err(|e| e.to_string())?, i.fd));
        }
        // It drops to its own user itself (its binary may be where that
        // user cannot reach), before reading anything; as that user it
        // cannot pass the vault directory, so it needs no mount namespace.
        let uid = self.user.0.to_string();
        let gid = self.user.1.to_string();
        let mut child = spawn_helper(
            &["dhcp-server", "--uid", &uid, "--gid", &gid],
            &self.log,
            pass_fds,
            Stdio::null(),
        )?;
        let spec = serde_json::to_vec(&self.spec).map_err(|e| e.to_string())?;
        // Within a deadline, as every command to a helper (this runs on
        // the daemon's actor): one that does not read is stopped.
        let written = child.stdin.take().map(|mut stdin| {
            coffre_sys::pipe::set_nonblocking(&stdin).and_then(|()| {
                coffre_sys::pipe::write_within(
                    &mut stdin,
                    &spec,
                    Instant::now() + super::helper::COMMAND_TIMEOUT,
                )
            })
        });
        if let Some(Err(e)) = written {
            coffre_sys::child::stop_group(&mut child);
            return Err(format!("handing it its interfaces: {e}"));
        }
        let pid = child.id();
        self.child = Some(child);
        self.started = Some(Instant::now());
        Ok(pid)
    }

    /// Whether it died (and why), reaping it (and killing whatever it
    /// forked: its process group).
    fn died(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        let st = coffre_sys::child::reap_group(c)?;
        self.child = None;
        Some(st.to_string())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            coffre_sys::child::stop_group(&mut c);
        }
    }
}

/// The vault's identity on this host (names its table and links).
fn vault_id(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The gateway's tun, as `server.conf` names it (`dev NAME`).
pub fn vpn_link(dir: &Path) -> String {
    names::vpn_link(&vault_id(dir))
}

/// What [`bring_up`] made: the state, what the workloads attach to, and
/// lines for the audit log.
pub(super) struct Up {
    pub state: NetState,
    pub links: BTreeMap<String, Link>,
    pub notes: Vec<String>,
}

/// Replaces the table, then makes the links (so no link forwards before
/// the rules are there).
pub(super) fn bring_up(config: &Config, dir: &Path) -> Result<Up, String> {
    let net = config.network.as_ref().ok_or("no [network] section")?;
    let id = vault_id(dir);
    let host = Host::here();
    let gw = net.subnet.gateway();
    let mut endpoints = Vec::new();
    let mut reach = Vec::new();
    let mut kinds = Vec::new();
    for w in &config.workload {
        let Some(addr) = w.address else { continue };
        endpoints.push(Endpoint {
            name: w.name.clone(),
            addr,
            link: names::link(&id, &w.name),
            mac: names::mac(&config.name, &w.name),
            ports: w.ports.clone(),
            egress: w.egress.clone(),
            nfs: w.share.is_some(),
        });
        reach.push(w.members.clone());
        kinds.push(w.kind);
    }
    let vpn = match &config.gateway {
        None => None,
        Some(g) => {
            let n: coffre_net::Subnet = g.network.parse().map_err(|e| {
                format!(
                    "[gateway] network {:?} with a vault network: {e}",
                    g.network
                )
            })?;
            Some(Vpn {
                link: names::vpn_link(&id),
                gateway: n.gateway(),
                network: n,
            })
        }
    };
    // Replies to egress come in on the uplink: it must forward too. Where
    // it did not, the vault turns it on, and the table lets through it
    // only those replies.
    let mut uplinks = Vec::new();
    let all_egress = net
        .egress
        .iter()
        .chain(endpoints.iter().flat_map(|e| e.egress.iter()));
    for e in all_egress {
        let out = host
            .ip(&["-j", "route", "get", &e.addr.to_string()])
            .map_err(|err| format!("route to egress {e}: {err}"))?;
        let dev = serde_json::from_str::<Value>(&out)
            .ok()
            .and_then(|v| v[0]["dev"].as_str().map(str::to_string));
        if let Some(dev) = dev
            && !uplinks.contains(&dev)
            && host
                .sysctl_get(&format!("net.ipv4.conf.{dev}.forwarding"))
                .map_err(|err| err.to_string())?
                == "0"
        {
            uplinks.push(dev);
        }
    }
    let policy = Policy {
        table: names::table(&id),
        subnet: net.subnet,
        vpn,
        endpoints,
        egress: net.egress.clone(),
        uplinks,
    };
    host.nft(&policy.ruleset())
        .map_err(|e| format!("the firewall's table {}: {e}", policy.table))?;

    let mut links = BTreeMap::new();
    let mut notes = Vec::new();
    let mut interfaces = Vec::new();
    let mut sockets = Vec::new();
    let mut namespaces = Vec::new();
    for (e, kind) in policy.endpoints.iter().zip(&kinds) {
        let (link, mac, addr) = (&e.link, e.mac, e.addr);
        match kind {
            Kind::Qemu => {
                // Made (persistent, root's) now, so its address and route
                // are in place before QEMU first opens it, and stay while
                // closed.
                drop(
                    coffre_sys::tun::open_tap(link)
                        .map_err(|err| format!("tap {link} for {}: {err}", e.name))?,
                );
                host.route_link(link, gw, addr)
                    .map_err(|err| format!("{}: {err}", e.name))?;
                sockets.push(
                    coffre_dhcp::bind_socket(link)
                        .map_err(|err| format!("DHCP socket on {link} for {}: {err}", e.name))?,
                );
                interfaces.push(coffre_dhcp::Interface {
                    ifname: link.clone(),
                    fd: 3 + i32::try_from(interfaces.len()).unwrap_or(0),
                    lease: coffre_dhcp::Lease {
                        mac,
                        addr,
                        hostname: e.name.clone(),
                    },
                });
                links.insert(
                    e.name.clone(),
                    Link::Tap {
                        name: link.clone(),
                        mac,
                    },
                );
            }
            Kind::Process => {
                let ns = names::netns(&id, &e.name);
                host.veth_namespace(&ns, link, &mac, addr, net.subnet.prefix(), gw)
                    .map_err(|err| format!("{}: {err}", e.name))?;
                namespaces.push(ns.clone());
                links.insert(
                    e.name.clone(),
                    Link::Namespace(PathBuf::from("/run/netns").join(&ns)),
                );
            }
        }
        notes.push(format!(
            "{} at {addr} on {link} (MAC {}), ports {}",
            e.name,
            names::mac_text(&mac),
            if e.ports.is_empty() {
                "none".to_string()
            } else {
                e.ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        ));
    }
    for dev in &policy.uplinks {
        host.sysctl(&format!("net.ipv4.conf.{dev}.forwarding"), "1")
            .map_err(|err| format!("forwarding on {dev} for egress: {err}"))?;
    }
    let forwarding = policy.uplinks.clone();
    notes.insert(
        0,
        format!(
            "table inet {} in place (default deny on the vault's links{}); forwarding on {}",
            policy.table,
            policy
                .vpn
                .as_ref()
                .map(|v| format!(" and the VPN's {}", v.link))
                .unwrap_or_default(),
            if forwarding.is_empty() {
                "the vault's links only".to_string()
            } else {
                format!(
                    "the vault's links and {} (turned on for egress replies only)",
                    forwarding.join(", ")
                )
            }
        ),
    );
    // The helpers' own ids (one each, of no account).
    let ids = super::services::ServiceIds::new(&config.accounts, &id);
    let id_of = |s| ids.as_ref().map_err(Clone::clone).and_then(|ids| ids.of(s));
    let mut dhcp = None;
    if !interfaces.is_empty() {
        let (uid, gid) = id_of(super::services::Service::Dhcp)
            .map_err(|e| format!("the DHCP server's user: {e}"))?;
        let mut d = Dhcp {
            spec: coffre_dhcp::Spec {
                config: coffre_dhcp::ServerConfig {
                    server: gw,
                    prefix_len: net.subnet.prefix(),
                    lease_secs: 3600,
                    dns: None,
                    domain: Some("vault".into()),
                },
                interfaces,
            },
            sockets,
            child: None,
            started: None,
            log: dir.join("run").join("dhcp.log"),
            user: (uid, gid),
        };
        let _ = std::fs::create_dir_all(dir.join("run"));
        let pid = d.start().map_err(|e| format!("the DHCP server: {e}"))?;
        notes.push(format!(
            "DHCP server (pid {pid}, uid {uid}: its own, of no account; no network of its own) serves {} VM link(s)",
            d.spec.interfaces.len()
        ));
        dhcp = Some(d);
    }
    let nfs = if config.has_shares() {
        let _ = std::fs::create_dir_all(dir.join("run"));
        // Without NFS the vault still works (the VMs' mounts wait): a port
        // taken is said loudly, not a reason to refuse to start.
        let vd = crate::vaultdir::VaultDir::new(dir);
        // A server per VM with a share, on its own link.
        let vms: Vec<super::nfs::VmLink> = config
            .workload
            .iter()
            .filter(|w| w.share.is_some() && w.address.is_some())
            .filter_map(|w| match links.get(&w.name) {
                Some(Link::Tap { name, .. }) => Some(super::nfs::VmLink {
                    workload: w.name.clone(),
                    link: name.clone(),
                }),
                _ => {
                    notes.push(format!(
                        "{}: NFS NOT SERVED: it has a share but no tap of its own",
                        w.name
                    ));
                    None
                }
            })
            .collect();
        // Each VM's server its own user (its number among them: the
        // configuration's order).
        let users: Result<Vec<(u32, u32)>, String> = (0..vms.len())
            .map(|k| id_of(super::services::Service::Nfs(k)))
            .collect();
        let bound = match users {
            Err(e) => Err(format!("the NFS servers' users: {e}")),
            Ok(users) => super::nfs::NfsChild::bind(
                gw,
                &vms,
                &dir.join("run"),
                &vd.nfs_dir(),
                vd.nfs_shares(config),
                &users,
                names::nfs_mark(&names::table(&vault_id(dir))),
            ),
        };
        match bound {
            Ok((n, warnings)) => {
                notes.push(format!(
                    "NFS (tcp/2049, and its portmapper on 111 unless said below) on {gw}, a server per VM with a share ({}), each taking connections from its VM's link alone",
                    n.workloads().join(", ")
                ));
                notes.extend(warnings);
                Some(std::sync::Arc::new(std::sync::Mutex::new(n)))
            }
            Err(e) => {
                notes.push(format!(
                    "NFS NOT SERVED: {e}; the VMs' shares will not mount"
                ));
                None
            }
        }
    } else {
        None
    };
    let ldap = {
        let vd = crate::vaultdir::VaultDir::new(dir);
        let log = dir.join("run").join("ldap.log");
        let r = id_of(super::services::Service::Ldap)
            .map_err(|e| format!("its user: {e}"))
            .and_then(|user| {
                let ca_key =
                    zeroize::Zeroizing::new(vd.read(&vd.ca_key()).map_err(|e| e.to_string())?);
                let ca = vd.read(&vd.ca_cert()).map_err(|e| e.to_string())?;
                super::directory::LdapChild::bind(gw, &config.name, &ca_key, &ca, log, user)
            });
        match r {
            Ok(l) => {
                notes.push(format!(
                    "the vault's directory (LDAP tcp/389 with StartTLS, LDAPS tcp/636) on {gw}, for the workloads"
                ));
                Some(l)
            }
            Err(e) => {
                notes.push(format!(
                    "DIRECTORY NOT SERVED: {e}; workloads cannot look members up"
                ));
                None
            }
        }
    };
    Ok(Up {
        state: NetState {
            nfs,
            nfs_dirty: false,
            ldap,
            policy,
            host,
            reach,
            granted: BTreeMap::new(),
            vpn_addrs: BTreeMap::new(),
            forwarding,
            dhcp,
            dirty: false,
            checked: Instant::now(),
            namespaces,
        },
        links,
        notes,
    })
}

impl NetState {
    /// The endpoints `member` may reach.
    fn reachable(&self, member: &str) -> Vec<usize> {
        self.reach
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_empty() || m.iter().any(|x| x == member))
            .map(|(i, _)| i)
            .collect()
    }

    /// Brings the sets to `want` (VPN address → endpoints) in one
    /// transaction. On failure nothing changed in the kernel and the
    /// record keeps what is really there.
    fn apply(&mut self, want: BTreeMap<Ipv4Addr, Vec<usize>>) -> Result<Vec<String>, String> {
        if want == self.granted && !self.dirty {
            return Ok(Vec::new());
        }
        let mut notes = Vec::new();
        for (addr, had) in &self.granted {
            let keep = want.get(addr).cloned().unwrap_or_default();
            let gone: Vec<usize> = had.iter().copied().filter(|i| !keep.contains(i)).collect();
            if !gone.is_empty() {
                notes.push(format!("{addr} no longer reaches {}", self.names(&gone)));
            }
        }
        for (addr, now) in &want {
            let had = self.granted.get(addr).cloned().unwrap_or_default();
            let new: Vec<usize> = now.iter().copied().filter(|i| !had.contains(i)).collect();
            if !new.is_empty() {
                notes.push(format!("{addr} reaches {}", self.names(&new)));
            }
        }
        // Every set rewritten whole, in one transaction: idempotent, so a
        // failed update (the record then says "dirty") is healed by the
        // next one, and an address the kernel still holds by mistake goes.
        let t = Instant::now();
        if let Err(e) = self.host.nft(&self.policy.grants(&want)) {
            self.dirty = true;
            return Err(e.to_string());
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        for n in &mut notes {
            n.push_str(&format!(" (firewall updated in {ms:.1} ms)"));
        }
        self.granted = want;
        self.dirty = false;
        Ok(notes)
    }

    fn names(&self, idx: &[usize]) -> String {
        idx.iter()
            .map(|i| self.policy.endpoints[*i].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Shell {
    /// The DHCP server died: say so, and start it again (not more often
    /// than every [`DHCP_RESTART_AFTER`]).
    pub(super) fn net_tick(&mut self) {
        self.net_check_table();
        let Some(d) = self.net.as_mut().and_then(|n| n.dhcp.as_mut()) else {
            return;
        };
        let mut notes = Vec::new();
        if let Some(why) = d.died() {
            notes.push((
                "failed",
                format!("the DHCP server ended ({why}); see {}", d.log.display()),
            ));
        }
        if d.child.is_none() && d.started.is_none_or(|t| t.elapsed() >= DHCP_RESTART_AFTER) {
            match d.start() {
                Ok(pid) => notes.push(("ok", format!("DHCP server started again (pid {pid})"))),
                Err(e) => notes.push(("failed", format!("the DHCP server: {e}"))),
            }
        }
        for (result, n) in notes {
            self.system_audit("network", result, n);
        }
    }

    /// Every few seconds: is the table still there? Someone may have
    /// flushed the ruleset (a `systemctl restart nftables` does), which
    /// would leave the vault's links forwarding with no rule at all. Put it
    /// back with the grants, and say so loudly. A failed grant update is
    /// retried here too.
    fn net_check_table(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if net.checked.elapsed() < TABLE_CHECK_EVERY {
            return;
        }
        net.checked = Instant::now();
        let mut record = None;
        match net.host.nft_table(&net.policy.table) {
            Ok(Some(_)) => {}
            Ok(None) => {
                record = Some(match net.host.nft(&net.policy.ruleset()) {
                    Ok(()) => (
                        "failed",
                        format!(
                            "the firewall's table {} was gone (someone flushed the ruleset?): put back",
                            net.policy.table
                        ),
                    ),
                    Err(e) => (
                        "failed",
                        format!(
                            "the firewall's table {} is gone and could not be put back: {e}",
                            net.policy.table
                        ),
                    ),
                });
                // Its sets came back empty.
                net.dirty = true;
            }
            Err(e) => {
                record = Some(("failed", format!("checking the firewall's table: {e}")));
            }
        }
        let dirty = net.dirty;
        if let Some((result, detail)) = record {
            self.system_audit("network", result, detail);
        }
        if dirty {
            self.net_reconcile();
        }
    }

    /// At the daemon's stop: the DHCP server goes; the table and links
    /// stay (fail closed).
    pub(super) fn net_stop(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if let Some(d) = net.dhcp.as_mut() {
            d.stop();
        }
        if let Some(n) = &net.nfs {
            // A close given up on hung storage may still hold the servers
            // in their own close: they are left then (they hold no key;
            // the next start cleans up), not waited for without bound.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                match n.try_lock() {
                    Ok(mut g) => break g.stop(),
                    Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().stop(),
                    Err(std::sync::TryLockError::WouldBlock) => {}
                }
                if std::time::Instant::now() >= until {
                    eprintln!("coffre: the NFS servers are still held by a close: left");
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if let Some(l) = net.ldap.as_mut() {
            l.stop();
        }
        // The process workloads are stopped by now: their namespaces (and
        // veths) go; the next start makes them again. Taps stay (a VM
        // suspended into the vault resumes on the same one).
        for ns in &net.namespaces {
            net.host.remove_namespace(ns, "");
        }
    }

    /// Recomputes the grants from the gateway's clients (each bound to a
    /// live session) and the addresses OpenVPN gave them.
    pub(super) fn net_reconcile(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        let mut want: BTreeMap<Ipv4Addr, Vec<usize>> = BTreeMap::new();
        for (cid, c) in self.vpn.clients() {
            if let Some(addr) = net.vpn_addrs.get(cid) {
                let r = net.reachable(&c.member);
                if !r.is_empty() {
                    want.entry(*addr).or_default().extend(r);
                }
            }
        }
        for v in want.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        match net.apply(want) {
            Ok(notes) => {
                for n in notes {
                    self.system_audit("network", "ok", n);
                }
            }
            Err(e) => {
                // The kernel refused: nobody gains access, but a grant that
                // should have gone may still be there. Say so loudly; the
                // next change retries from what is really there.
                self.system_audit(
                    "network",
                    "failed",
                    format!("updating the firewall's client sets: {e}"),
                );
            }
        }
    }

    /// OpenVPN has (re)started its tun: forwarding on it, no IPv6.
    pub(super) fn net_vpn_up(&mut self) {
        let Some(net) = self.net.as_ref() else { return };
        let Some(vpn) = net.policy.vpn.clone() else {
            return;
        };
        let r = net
            .host
            .sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", vpn.link), "1")
            .and_then(|()| {
                net.host
                    .sysctl(&format!("net.ipv4.conf.{}.forwarding", vpn.link), "1")
            });
        if let Err(e) = r {
            self.system_audit(
                "network",
                "failed",
                format!(
                    "forwarding on the VPN's {} (is server.conf's `dev` {0}? run `coffre gateway openvpn-config` again): {e}",
                    vpn.link
                ),
            );
        }
    }

    /// `coffre network show`: who reaches what.
    pub(super) fn network_json(&self) -> Value {
        let Some(net) = self.net.as_ref() else {
            return json!({"configured": false});
        };
        let p = &net.policy;
        let workloads: Vec<Value> = p
            .endpoints
            .iter()
            .zip(&net.reach)
            .map(|(e, r)| {
                let connected: Vec<Value> = net
                    .granted
                    .iter()
                    .filter(|(_, idx)| idx.iter().any(|i| p.endpoints[*i].name == e.name))
                    .map(|(a, _)| json!(a.to_string()))
                    .collect();
                json!({
                    "name": e.name, "address": e.addr.to_string(), "link": e.link,
                    "mac": names::mac_text(&e.mac),
                    "ports": e.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "egress": e.egress.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "nfs": e.nfs,
                    "members": if r.is_empty() { json!("every member") } else { json!(r) },
                    "vpn_addresses_now": connected,
                })
            })
            .collect();
        let clients: Vec<Value> = self
            .vpn
            .clients()
            .iter()
            .map(|(cid, c)| {
                let addr = net.vpn_addrs.get(cid);
                json!({
                    "member": c.member,
                    "vpn_address": addr.map(ToString::to_string),
                    "reaches": addr
                        .and_then(|a| net.granted.get(a))
                        .map(|idx| idx.iter().map(|i| p.endpoints[*i].name.clone()).collect::<Vec<_>>())
                        .unwrap_or_default(),
                })
            })
            .collect();
        json!({
            "configured": true,
            "subnet": p.subnet.to_string(),
            "gateway": p.subnet.gateway().to_string(),
            "table": format!("inet {}", p.table),
            "vpn_link": p.vpn.as_ref().map(|v| v.link.clone()),
            "egress": p.egress.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "forwarding_on": net.forwarding,
            "workloads": workloads,
            "clients": clients,
        })
    }
}

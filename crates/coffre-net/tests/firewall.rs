//! The firewall against the real kernel: a network namespace stands in for
//! the vault's host (the table, the routed links, IP forwarding on as a
//! router has it), workloads are namespaces behind veths (as process
//! workloads with `network = true` are), the VPN's clients sit behind a
//! link named as the gateway's tun, and "the internet" is one more
//! namespace. Every check is a real TCP connection or ping.

use coffre_net::{Egress, Endpoint, Host, Policy, Vpn, names};
use coffre_testkit::{Need, require};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Answers every connection with `hello from NAME PORT`, then echoes; on
/// a port written `uPORT`, every UDP datagram with `hello from NAME udp
/// PORT`.
const SERVER: &str = r#"
import socket, sys, threading
name = sys.argv[1]
def serve_udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        _, a = s.recvfrom(100)
        s.sendto(f"hello from {name} udp {port}\n".encode(), a)
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept()
        def talk(c=c):
            try:
                c.sendall(f"hello from {name} {port}\n".encode())
                while True:
                    d = c.recv(100)
                    if not d: break
                    c.sendall(d)
            except OSError: pass
        threading.Thread(target=talk, daemon=True).start()
for p in sys.argv[2:]:
    f = serve_udp if p.startswith("u") else serve
    threading.Thread(target=f, args=(int(p.lstrip("u")),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Connects (from `src` if given), prints the greeting line or `fail`.
const CLIENT: &str = r#"
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    s = socket.create_connection((dst, port), timeout=1.5,
        source_address=(src, 0) if src != "-" else None)
    print(s.makefile().readline().strip())
except OSError:
    print("fail")
"#;

/// Sends one UDP datagram, prints the answer or `fail`.
const UDP_CLIENT: &str = r#"
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.5)
try:
    s.connect((dst, port)); s.send(b"?")
    print(s.recv(100).decode().strip())
except OSError:
    print("fail")
"#;

struct Lab {
    tag: String,
    host_ns: PathBuf,
    host: Host,
    namespaces: Vec<String>,
    servers: Vec<Child>,
    policy: Policy,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for n in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "delete", n]).status();
        }
    }
}

fn ns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

fn sh(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns_path(ns).display()))
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(ns: &str, args: &[&str]) {
    let out = sh(ns, args);
    assert!(
        out.status.success(),
        "{ns}: {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// `which` tells apart the tests of one run (they share a process).
    fn new(which: &str) -> Self {
        let tag = format!("cn{}{which}", std::process::id() % 100_000);
        let mut lab = Lab {
            host_ns: ns_path(&format!("{tag}-host")),
            host: Host::default(),
            namespaces: vec![],
            servers: vec![],
            tag: tag.clone(),
            policy: Policy {
                table: names::table(&tag),
                subnet: "10.9.0.0/24".parse().unwrap(),
                vpn: Some(Vpn {
                    link: names::vpn_link(&tag),
                    gateway: Ipv4Addr::new(10, 8, 0, 1),
                    network: "10.8.0.0/24".parse().unwrap(),
                }),
                endpoints: vec![],
                egress: vec![],
                uplinks: vec![],
            },
        };
        for n in ["host", "clients", "internet"] {
            let name = format!("{tag}-{n}");
            let _ = Command::new("ip").args(["netns", "delete", &name]).output();
            assert!(
                Command::new("ip")
                    .args(["netns", "add", &name])
                    .status()
                    .unwrap()
                    .success()
            );
            lab.namespaces.push(name);
        }
        lab.host = Host {
            netns: Some(lab.host_ns.clone()),
        };
        let h = lab.ns("host");
        // A router: forwarding on for every interface, as a host that
        // routes for others would have it.
        ok(&h, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        ok(&h, &["ip", "link", "set", "lo", "up"]);
        // The VPN's side: both clients' addresses behind the tun's name.
        let vpn = lab.policy.vpn.clone().unwrap();
        let c = lab.ns("clients");
        ok(
            &h,
            &[
                "ip", "link", "add", &vpn.link, "type", "veth", "peer", "name", "tun0", "netns", &c,
            ],
        );
        ok(&h, &["ip", "addr", "add", "10.8.0.1/24", "dev", &vpn.link]);
        ok(&h, &["ip", "link", "set", &vpn.link, "up"]);
        for a in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", "10.8.0.6/24", "dev", "tun0"],
            vec!["ip", "addr", "add", "10.8.0.7/24", "dev", "tun0"],
            vec!["ip", "link", "set", "tun0", "up"],
            vec!["ip", "route", "add", "10.9.0.0/24", "via", "10.8.0.1"],
            vec!["ip", "route", "add", "198.51.100.0/24", "via", "10.8.0.1"],
        ] {
            ok(&c, &a);
        }
        // The internet: 198.51.100.7 behind the host's uplink.
        let i = lab.ns("internet");
        ok(
            &h,
            &[
                "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", &i,
            ],
        );
        ok(
            &h,
            &["ip", "addr", "add", "198.51.100.1/24", "dev", "uplink"],
        );
        ok(&h, &["ip", "link", "set", "uplink", "up"]);
        for a in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", "198.51.100.7/24", "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
        ] {
            ok(&i, &a);
        }
        // Two workloads; w1 mounts a share of the data from the host.
        for (name, last) in [("w1", 10u8), ("w2", 20)] {
            let netns = format!("{tag}-{name}");
            let link = names::link(&tag, name);
            let mac = names::mac(&tag, name);
            let addr = Ipv4Addr::new(10, 9, 0, last);
            lab.namespaces.push(netns.clone());
            lab.host
                .veth_namespace(&netns, &link, &mac, addr, 24, Ipv4Addr::new(10, 9, 0, 1))
                .unwrap();
            lab.policy.endpoints.push(Endpoint {
                name: name.into(),
                addr,
                link,
                mac,
                ports: vec!["tcp/80".parse().unwrap()],
                egress: vec![],
                nfs: name == "w1",
            });
        }
        // A service on the host, on every address; the internet's server.
        lab.serve("host", "host", &["9000"]);
        lab.serve("internet", "internet", &["80", "81"]);
        for w in ["w1", "w2"] {
            lab.serve(w, w, &["80", "8080"]);
        }
        lab.host.nft(&lab.policy.ruleset()).unwrap();
        lab
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.tag)
    }

    fn serve(&mut self, ns: &str, name: &str, ports: &[&str]) {
        let mut c = Command::new("nsenter")
            .arg(format!("--net={}", ns_path(&self.ns(ns)).display()))
            .args(["--", "python3", "-c", SERVER, name])
            .args(ports)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        self.servers.push(c);
    }

    /// What `from` (a namespace, from address `src`) gets at `dst:port`.
    fn tcp(&self, from: &str, src: &str, dst: &str, port: u16) -> String {
        let out = sh(
            &self.ns(from),
            &["python3", "-c", CLIENT, src, dst, &port.to_string()],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// As [`Lab::tcp`], tried up to three times until it gives `want`: a
    /// connection that should pass may meet a loaded machine (the 1.5 s
    /// limit is for the ones that must fail).
    fn tcp_until(&self, from: &str, src: &str, dst: &str, port: u16, want: &str) -> String {
        let mut got = String::new();
        for _ in 0..3 {
            got = self.tcp(from, src, dst, port);
            if got == want {
                break;
            }
        }
        got
    }

    /// What `from` gets back for a datagram to `dst:port`.
    fn udp(&self, from: &str, dst: &str, port: u16) -> String {
        let out = sh(
            &self.ns(from),
            &["python3", "-c", UDP_CLIENT, dst, &port.to_string()],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn ping(&self, from: &str, src: &str, dst: &str) -> bool {
        sh(
            &self.ns(from),
            &["ping", "-c", "1", "-W", "1", "-I", src, dst],
        )
        .status
        .success()
    }

    fn grant(&self, addr: [u8; 4], to: &[usize]) {
        self.host
            .nft(&self.policy.grant(Ipv4Addr::from(addr), to))
            .unwrap();
    }

    fn revoke(&self, addr: [u8; 4], to: &[usize]) {
        self.host
            .nft(&self.policy.revoke(Ipv4Addr::from(addr), to))
            .unwrap();
    }
}

const ALICE: &str = "10.8.0.6";
const BOB: &str = "10.8.0.7";

#[test]
#[ignore = "system: needs root, network namespaces, nft, python3"]
fn the_firewall_lets_each_member_reach_their_workload_and_nothing_else() {
    require(&[Need::Root, Need::NetNs, Need::Nft]);
    let lab = Lab::new("a");

    // No grant yet: nobody reaches anything.
    assert_eq!(lab.tcp("clients", ALICE, "10.9.0.10", 80), "fail");

    // Alice may use w1, Bob w2.
    lab.grant([10, 8, 0, 6], &[0]);
    lab.grant([10, 8, 0, 7], &[1]);
    assert_eq!(
        lab.tcp_until("clients", ALICE, "10.9.0.10", 80, "hello from w1 80"),
        "hello from w1 80"
    );
    assert_eq!(
        lab.tcp_until("clients", BOB, "10.9.0.20", 80, "hello from w2 80"),
        "hello from w2 80"
    );
    assert!(lab.ping("clients", ALICE, "10.9.0.10"));
    // Not the other's workload, not an undeclared port.
    assert_eq!(lab.tcp("clients", ALICE, "10.9.0.20", 80), "fail");
    assert_eq!(lab.tcp("clients", BOB, "10.9.0.10", 80), "fail");
    assert_eq!(lab.tcp("clients", ALICE, "10.9.0.10", 8080), "fail");
    // Not the host's own services, on any of its addresses; only a ping
    // of the gateway.
    for addr in ["10.8.0.1", "10.9.0.1", "198.51.100.1"] {
        assert_eq!(lab.tcp("clients", ALICE, addr, 9000), "fail", "{addr}");
    }
    assert!(lab.ping("clients", ALICE, "10.8.0.1"));
    assert!(!lab.ping("clients", ALICE, "10.9.0.1"));
    // Not the world through the vault.
    assert_eq!(lab.tcp("clients", ALICE, "198.51.100.7", 80), "fail");

    // Workloads reach each other's declared ports and nothing else.
    assert_eq!(
        lab.tcp_until("w1", "-", "10.9.0.20", 80, "hello from w2 80"),
        "hello from w2 80"
    );
    assert_eq!(lab.tcp("w1", "-", "10.9.0.20", 8080), "fail");
    assert_eq!(lab.tcp("w1", "-", "10.9.0.1", 9000), "fail");
    assert_eq!(lab.tcp("w1", "-", "10.8.0.6", 22), "fail");
    assert!(!lab.ping("w1", "10.9.0.10", "10.9.0.20"));
    // No egress unless listed.
    assert_eq!(lab.tcp("w1", "-", "198.51.100.7", 80), "fail");
}

#[test]
#[ignore = "system: needs root, network namespaces, nft, python3"]
fn egress_spoofing_revocation_and_reapplying() {
    require(&[Need::Root, Need::NetNs, Need::Nft]);
    let mut lab = Lab::new("b");

    // Egress, vault-wide and for one workload; it leaves with the
    // uplink's address.
    lab.policy.egress = vec!["tcp/198.51.100.7:80".parse::<Egress>().unwrap()];
    lab.policy.endpoints[1].egress = vec!["198.51.100.7:81".parse().unwrap()];
    lab.host.nft(&lab.policy.ruleset()).unwrap();
    assert_eq!(
        lab.tcp_until("w1", "-", "198.51.100.7", 80, "hello from internet 80"),
        "hello from internet 80"
    );
    assert_eq!(lab.tcp("w1", "-", "198.51.100.7", 81), "fail");
    assert_eq!(
        lab.tcp_until("w2", "-", "198.51.100.7", 81, "hello from internet 81"),
        "hello from internet 81"
    );
    // The internet cannot come in, even to a declared port.
    assert_eq!(lab.tcp("internet", "-", "10.9.0.10", 80), "fail");

    // A workload that sends from another address or MAC gets nothing.
    let w1 = lab.ns("w1");
    ok(&w1, &["ip", "addr", "add", "10.9.0.99/32", "dev", "eth0"]);
    assert_eq!(lab.tcp("w1", "10.9.0.99", "10.9.0.20", 80), "fail");
    assert_eq!(
        lab.tcp_until("w1", "10.9.0.10", "10.9.0.20", 80, "hello from w2 80"),
        "hello from w2 80"
    );
    ok(
        &w1,
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"],
    );
    assert_eq!(lab.tcp("w1", "10.9.0.10", "10.9.0.20", 80), "fail");
    let mac = names::mac_text(&names::mac(&lab.tag, "w1"));
    ok(&w1, &["ip", "link", "set", "eth0", "address", &mac]);
    assert_eq!(
        lab.tcp_until("w1", "10.9.0.10", "10.9.0.20", 80, "hello from w2 80"),
        "hello from w2 80"
    );

    // The internet cannot pass for a member or a workload: a member's
    // address, or a workload's, forged on the uplink, gets nowhere (not
    // even to a port the member may reach, nor out through the NAT).
    lab.grant([10, 8, 0, 6], &[0]);
    let inet = lab.ns("internet");
    ok(
        &lab.ns("host"),
        &[
            "ip",
            "route",
            "add",
            "10.8.0.0/24",
            "dev",
            "uplink",
            "metric",
            "500",
        ],
    );
    ok(&inet, &["ip", "addr", "add", "10.8.0.6/32", "dev", "eth0"]);
    ok(&inet, &["ip", "addr", "add", "10.9.0.20/32", "dev", "eth0"]);
    ok(
        &inet,
        &[
            "ip",
            "route",
            "add",
            "10.9.0.0/24",
            "via",
            "198.51.100.1",
            "src",
            "10.8.0.6",
        ],
    );
    assert_eq!(lab.tcp("internet", "10.8.0.6", "10.9.0.10", 80), "fail");
    assert_eq!(lab.tcp("internet", "10.9.0.20", "10.9.0.10", 80), "fail");
    lab.revoke([10, 8, 0, 6], &[0]);

    // An established connection stops carrying data in both directions
    // the moment its member's grant is revoked.
    lab.grant([10, 8, 0, 6], &[0]);
    let mut session = Command::new("nsenter")
        .arg(format!("--net={}", ns_path(&lab.ns("clients")).display()))
        .args([
            "--",
            "python3",
            "-c",
            r#"
import socket, sys
s = socket.create_connection(("10.9.0.10", 80), timeout=1.5, source_address=("10.8.0.6", 0))
f = s.makefile()
print(f.readline().strip(), flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode()); print("echo", f.readline().strip(), flush=True)
    except OSError:
        print("cut", flush=True)
"#,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(session.stdout.take().unwrap());
    let mut input = session.stdin.take().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "hello from w1 80");
    writeln!(input, "one").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "echo one");
    let t = Instant::now();
    lab.revoke([10, 8, 0, 6], &[0]);
    let revoke_ms = t.elapsed().as_millis();
    writeln!(input, "two").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "cut", "data flowed after the revocation");
    drop(input);
    let _ = session.kill();
    let _ = session.wait();
    eprintln!("revocation took {revoke_ms} ms (nft, one transaction)");

    // Reapplying the table (a daemon's restart) empties the grants in
    // the same transaction that brings the rules back: no moment without
    // them, and nobody keeps access from before.
    lab.grant([10, 8, 0, 7], &[1]);
    assert_eq!(
        lab.tcp_until("clients", BOB, "10.9.0.20", 80, "hello from w2 80"),
        "hello from w2 80"
    );
    lab.host.nft(&lab.policy.ruleset()).unwrap();
    assert_eq!(lab.tcp("clients", BOB, "10.9.0.20", 80), "fail");
    assert!(
        lab.host
            .nft_set(&lab.policy.table, "clients_1")
            .unwrap()
            .is_empty()
    );
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
#[ignore = "system: needs root, network namespaces, nft, python3"]
fn only_a_workload_with_a_share_reaches_the_nfs_server() {
    require(&[Need::Root, Need::NetNs, Need::Nft]);
    let mut lab = Lab::new("c");
    lab.serve("host", "nfs", &["2049", "111", "u111", "2050"]);

    // w1 has a share: the NFS server and the portmapper on the gateway
    // address, and the replies come back.
    assert_eq!(
        lab.tcp_until("w1", "-", "10.9.0.1", 2049, "hello from nfs 2049"),
        "hello from nfs 2049"
    );
    assert_eq!(
        lab.tcp_until("w1", "-", "10.9.0.1", 111, "hello from nfs 111"),
        "hello from nfs 111"
    );
    assert_eq!(lab.udp("w1", "10.9.0.1", 111), "hello from nfs udp 111");
    // Nothing else on the host: not another port, not the same port on
    // another of the host's addresses.
    assert_eq!(lab.tcp("w1", "-", "10.9.0.1", 2050), "fail");
    assert_eq!(lab.tcp("w1", "-", "10.9.0.1", 9000), "fail");
    assert_eq!(lab.udp("w1", "10.9.0.1", 2049), "fail");
    assert_eq!(lab.tcp("w1", "-", "198.51.100.1", 2049), "fail");
    assert_eq!(lab.tcp("w1", "-", "10.8.0.1", 2049), "fail");

    // w2 has none.
    assert_eq!(lab.tcp("w2", "-", "10.9.0.1", 2049), "fail");
    assert_eq!(lab.tcp("w2", "-", "10.9.0.1", 111), "fail");
    assert_eq!(lab.udp("w2", "10.9.0.1", 111), "fail");
    // Nor can it pass for w1: w1's address on w2's link is dropped first.
    ok(
        &lab.ns("w2"),
        &["ip", "addr", "add", "10.9.0.10/32", "dev", "eth0"],
    );
    assert_eq!(lab.tcp("w2", "10.9.0.10", "10.9.0.1", 2049), "fail");
    // A member over the VPN does not reach it either, even one granted w1.
    lab.grant([10, 8, 0, 6], &[0]);
    assert_eq!(lab.tcp("clients", ALICE, "10.9.0.1", 2049), "fail");
    assert_eq!(lab.tcp("clients", ALICE, "10.8.0.1", 2049), "fail");

    // w1's share removed (the table applied again): closed.
    lab.policy.endpoints[0].nfs = false;
    lab.host.nft(&lab.policy.ruleset()).unwrap();
    assert_eq!(lab.tcp("w1", "-", "10.9.0.1", 2049), "fail");
    assert_eq!(lab.udp("w1", "10.9.0.1", 111), "fail");
}

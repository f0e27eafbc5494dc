//! The team's network, end to end: the daemon and OpenVPN run in a
//! namespace standing in for the vault's host (IP forwarding on, as a
//! router has it), members' OpenVPN clients each in their own namespace,
//! the workloads on the vault network behind the vault's firewall, and a
//! namespace for "the internet". Every check is a real connection.

use crate::gateway::{Gw, Net};
use crate::harness::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Answers every connection with `hello from NAME PORT`.
const SERVER: &str = r#"
import socket, sys, threading
name = sys.argv[1]
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept()
        try: c.sendall(f"hello from {name} {port}\n".encode())
        except OSError: pass
        c.close()
for p in sys.argv[2:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Connects, prints the greeting line or `fail`.
const CLIENT: &str = r#"
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((dst, port), timeout=1.5)
    print(s.makefile().readline().strip())
except OSError:
    print("fail")
"#;

fn nsenter(ns: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--");
    c
}

/// What a connection from namespace `ns` to `dst:port` gets.
fn tcp(ns: &str, dst: &str, port: u16) -> String {
    let out = nsenter(ns)
        .args(["python3", "-c", CLIENT, dst, &port.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn ping(ns: &str, dst: &str) -> bool {
    nsenter(ns)
        .args(["ping", "-c", "1", "-W", "1", dst])
        .output()
        .unwrap()
        .status
        .success()
}

/// Retries `tcp` until it gets `want` (the workload may still be
/// starting), within `within`.
fn eventually(ns: &str, dst: &str, port: u16, want: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let got = tcp(ns, dst, port);
        if got == want {
            return;
        }
        assert!(Instant::now() < until, "{ns} → {dst}:{port}: {got}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A server (SERVER) in namespace `ns`, killed when dropped.
struct Listener(Child);

impl Listener {
    fn start(ns: &str, name: &str, ports: &[&str]) -> Listener {
        let mut c = nsenter(ns)
            .args(["python3", "-c", SERVER, name])
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
        Listener(c)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(ns: &str, args: &[&str]) {
    let out = nsenter(ns).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{ns}: {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The vault, its gateway and the namespaces around it.
struct Lab {
    gw: Gw,
    internet: String,
    _listeners: Vec<Listener>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.internet])
            .status();
    }
}

const NEEDS_NETWORK: &[Need] = &[
    Need::Root,
    Need::Fuse,
    Need::Loop,
    Need::Ext4,
    Need::OpenVpn,
    Need::NetNs,
    Need::Nft,
];

impl Lab {
    /// A vault whose config.toml gets `[network]` and `workloads`, alice
    /// and bob as members, OpenVPN up, two client namespaces.
    fn new(network: &str, workloads: &str) -> Lab {
        require(NEEDS_NETWORK);
        let net = Net::new(2);
        let mut vault = Vault::init(&["--totp-period", "3"]);
        vault.netns = Some(net.server.clone());
        vault.set_policy("throttle_base_ms", 10);
        vault.set_workloads("auto", &format!("[network]\n{network}\n{workloads}"));
        let host = net.server.clone();
        // A router: forwarding on for every interface.
        sh(&host, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        // The internet, behind the host's uplink.
        let internet = format!("{host}i");
        let _ = Command::new("ip")
            .args(["netns", "delete", &internet])
            .status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", &internet])
                .status()
                .unwrap()
                .success()
        );
        sh(
            &host,
            &[
                "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns",
                &internet,
            ],
        );
        sh(
            &host,
            &["ip", "addr", "add", "198.51.100.1/24", "dev", "uplink"],
        );
        sh(&host, &["ip", "link", "set", "uplink", "up"]);
        sh(
            &internet,
            &["ip", "addr", "add", "198.51.100.7/24", "dev", "eth0"],
        );
        sh(&internet, &["ip", "link", "set", "eth0", "up"]);
        sh(&internet, &["ip", "link", "set", "lo", "up"]);
        let listeners = vec![
            Listener::start(&internet, "internet", &["80"]),
            // A service on the vault's host, on every address.
            Listener::start(&host, "host", &["9001"]),
            // And one on bob's machine, on every address (his VPN one too).
            Listener::start(&net.clients[1], "bob's machine", &["9000"]),
        ];
        let d = vault.dir.to_str().unwrap().to_string();
        let out = vault
            .bin()
            .args([
                "gateway",
                "openvpn-config",
                &d,
                "--remote",
                "192.0.2.1",
                "--keepalive-interval",
                "1",
                "--keepalive-timeout",
                "6",
                "--totp-suffix",
            ])
            .output()
            .unwrap();
        ok(&out);
        let conf = std::fs::read_to_string(vault.dir.join("gateway/server.conf")).unwrap();
        assert!(
            conf.contains("push \"route 10.9.0.0 255.255.255.0\""),
            "{conf}"
        );
        vault.start();
        vault.add_member("alice", "bob", false);
        let dir = vault.tmp.path().to_path_buf();
        let mut gw = Gw {
            vault,
            net,
            server: None,
            dir,
        };
        gw.start_server();
        for name in ["alice", "bob"] {
            let p = gw.profile_path(name);
            ok(&gw.vault.cli(
                name,
                &["member", "profile", name, "--out", p.to_str().unwrap()],
            ));
        }
        Lab {
            gw,
            internet,
            _listeners: listeners,
        }
    }

    fn host(&self) -> &str {
        &self.gw.net.server
    }

    fn client(&self, i: usize) -> &str {
        &self.gw.net.clients[i]
    }

    fn show(&self) -> serde_json::Value {
        let out = self.gw.vault.cli("alice", &["network", "show", "--json"]);
        assert!(
            out.status.success(),
            "network show: {}\ndaemon:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.gw.vault.daemon_stderr()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `member`'s VPN address, once the daemon knows it.
    fn vpn_address(&self, member: &str) -> String {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self.show();
            if let Some(a) = n["clients"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["member"] == member)
                .and_then(|c| c["vpn_address"].as_str())
            {
                return a.to_string();
            }
            assert!(Instant::now() < until, "no VPN address for {member}: {n}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The namespace of process workload `name`.
    fn workload_ns(&self, name: &str) -> String {
        let id = std::fs::canonicalize(&self.gw.vault.dir).unwrap();
        coffre_net::names::netns(id.to_str().unwrap(), name)
    }

    /// The table, as the host's nft lists it (None: absent).
    fn table(&self) -> Option<String> {
        let id = std::fs::canonicalize(&self.gw.vault.dir).unwrap();
        let table = coffre_net::names::table(id.to_str().unwrap());
        let out = nsenter(self.host())
            .args(["nft", "list", "table", "inet", &table])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A process workload on the vault network serving SERVER.
fn web(name: &str, member: &str, last: u8, extra: &str) -> String {
    format!(
        r#"
[[workload]]
name = "{name}"
kind = "process"
members = ["{member}"]
user = "root"
network = true
address = "10.9.0.{last}"
ports = ["tcp/8000"]
command = ["/usr/bin/python3", "-c", '''{SERVER}''', "{name}", "8000", "8081"]
{extra}
"#
    )
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces, nft"]
fn members_reach_their_own_workload_over_the_vpn_and_nothing_else() {
    let workloads = format!(
        "{}{}",
        web("desk-a", "alice", 10, r#"egress = ["198.51.100.7:80"]"#),
        web("desk-b", "bob", 20, "")
    );
    let mut lab = Lab::new(r#"subnet = "10.9.0.0/24""#, &workloads);
    let n = lab.show();
    assert_eq!(n["configured"], true, "{n}");
    assert_eq!(n["workloads"][0]["members"], serde_json::json!(["alice"]));
    assert_eq!(
        n["table"].as_str().unwrap(),
        format!(
            "inet {}",
            coffre_net::names::table(
                std::fs::canonicalize(&lab.gw.vault.dir)
                    .unwrap()
                    .to_str()
                    .unwrap()
            )
        )
    );
    let table = lab
        .table()
        .expect("the table is there before anyone enters");
    assert!(table.contains("drop"), "{table}");

    // Alice comes in through the VPN: the vault opens, her desktop
    // answers her.
    let mut alice = lab.gw.connect("alice", 0);
    let (a0, b0) = (lab.client(0).to_string(), lab.client(1).to_string());
    eventually(
        &a0,
        "10.9.0.10",
        8000,
        "hello from desk-a 8000",
        Duration::from_secs(30),
    );
    assert!(ping(&a0, "10.9.0.10"));
    let mut bob = lab.gw.connect("bob", 1);
    eventually(
        &b0,
        "10.9.0.20",
        8000,
        "hello from desk-b 8000",
        Duration::from_secs(20),
    );
    let alice_vpn = lab.vpn_address("alice");
    let bob_vpn = lab.vpn_address("bob");

    // Not the other's workload, not an undeclared port, not the other
    // client, not the host's services.
    assert_eq!(tcp(&a0, "10.9.0.20", 8000), "fail");
    assert_eq!(tcp(&b0, "10.9.0.10", 8000), "fail");
    assert_eq!(tcp(&a0, "10.9.0.10", 8081), "fail");
    assert_eq!(tcp(&a0, &bob_vpn, 9000), "fail", "client to client");
    for addr in ["10.8.0.1", "10.9.0.1"] {
        assert_eq!(tcp(&a0, addr, 9001), "fail", "host service at {addr}");
    }
    assert!(ping(&a0, "10.8.0.1"), "the gateway answers a ping");
    // Not the world through the vault.
    assert_eq!(tcp(&a0, "198.51.100.7", 80), "fail");

    // Between workloads: declared ports only; egress only where listed.
    let (wa, wb) = (lab.workload_ns("desk-a"), lab.workload_ns("desk-b"));
    assert_eq!(tcp(&wa, "10.9.0.20", 8000), "hello from desk-b 8000");
    assert_eq!(tcp(&wa, "10.9.0.20", 8081), "fail");
    assert_eq!(tcp(&wa, "10.9.0.1", 9001), "fail");
    assert_eq!(tcp(&wa, &alice_vpn, 9000), "fail");
    assert_eq!(tcp(&wa, "198.51.100.7", 80), "hello from internet 80");
    assert_eq!(tcp(&wb, "198.51.100.7", 80), "fail");

    // `network show` says who reaches what.
    let text = lab.gw.vault.cli("alice", &["network", "show"]);
    ok(&text);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("desk-a at 10.9.0.10: ports tcp/8000 reachable by alice"),
        "{text}"
    );
    assert!(
        text.contains(&format!("client alice at {alice_vpn} reaches desk-a")),
        "{text}"
    );

    // Removal cuts bob off at once.
    ok(&lab.gw.vault.authed("alice", &["member", "remove", "bob"]));
    assert_eq!(tcp(&b0, "10.9.0.20", 8000), "fail", "bob after his removal");
    // A lock cuts alice off at once (before OpenVPN drops her).
    ok(&lab.gw.vault.authed("alice", &["lock", "--reason", "drill"]));
    assert_eq!(tcp(&a0, "10.9.0.10", 8000), "fail", "alice after the lock");
    assert!(
        lab.gw
            .vault
            .audit_details("network", "ok")
            .iter()
            .any(|d| d.contains(&format!("{alice_vpn} no longer reaches desk-a"))),
        "{:?}",
        lab.gw.vault.audit_details("network", "ok")
    );
    alice.stop();
    bob.stop();

    // A daemon killed leaves the rules; its restart replaces them in one
    // transaction, with nobody granted.
    lab.gw.vault.crash();
    let left = lab.table().unwrap_or_default();
    assert!(
        left.contains("drop"),
        "the rules went with the daemon:\n{left}"
    );
    lab.gw.vault.start();
    let n = lab.show();
    assert!(
        n["workloads"][0]["vpn_addresses_now"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

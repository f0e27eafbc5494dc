//! The server against a real client: busybox udhcpc in its own network
//! namespace, on a veth pair whose host end carries the gateway as a /32,
//! as a workload's tap does. The server runs in this process (host
//! namespace) with [`bind_socket`] and [`serve`], exactly as the child
//! would after inheriting the sockets.
//!
//! All traffic stays on the veth pairs the tests make: broadcasts to
//! 255.255.255.255 and the 10.77.x.0/24 addresses that exist only there.

use coffre_dhcp::{Interface, Lease, ServerConfig, Spec, bind_socket, serve};
use coffre_testkit::{Need, require};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

const NEEDS: &[Need] = &[Need::Root, Need::NetNs];

/// The gate, and busybox's udhcpc (no [`Need`] of its own yet).
fn gate() {
    require(NEEDS);
    let udhcpc = Command::new("busybox").args(["udhcpc", "--help"]).output();
    assert!(
        udhcpc.is_ok(),
        "busybox: not found; install busybox-static (scripts/install-deps does)"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_arg(mac: &[u8; 6]) -> String {
    coffre_dhcp::mac_text(mac)
}

/// One client namespace per link, each with a veth pair: the host end in
/// this namespace with the gateway as a /32 and a /32 route to the lease
/// (how the daemon sets up a tap), the other end in the namespace.
/// Everything is deleted on drop, panics included.
struct Net {
    id: String,
    subnet: u8,
    links: Vec<Link>,
}

struct Link {
    ns: String,
    host: String,
    guest: String,
    lease: Lease,
}

impl Net {
    fn new(links: usize) -> Net {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{:05}{n}", pid % 100_000);
        // Unique per test in this run; another run at the same time would
        // need the same pid modulo 50 and the same counter.
        let subnet = u8::try_from((pid % 50) * 5 + n % 5 + 1).unwrap();
        let mut net = Net {
            id: id.clone(),
            subnet,
            links: Vec::new(),
        };
        for i in 0..links {
            let i8 = u8::try_from(i).unwrap();
            let link = Link {
                ns: format!("coffre-dhcp-{id}-{i}"),
                host: format!("dh{id}h{i}"),
                guest: format!("dh{id}g{i}"),
                lease: Lease {
                    mac: [0x52, 0x54, 0x00, 0x77, subnet, 2 + i8],
                    addr: Ipv4Addr::new(10, 77, subnet, 2 + i8),
                    hostname: format!("guest{i}"),
                },
            };
            ip(&["netns", "add", &link.ns]);
            // Pushed before the veth exists, so a failure below still
            // deletes the namespace.
            net.links.push(link);
            let link = net.links.last().unwrap();
            ip(&[
                "link",
                "add",
                &link.host,
                "type",
                "veth",
                "peer",
                "name",
                &link.guest,
            ]);
            ip(&["link", "set", &link.guest, "netns", &link.ns]);
            let gw = format!("{}/32", net.server());
            ip(&["addr", "add", &gw, "dev", &link.host]);
            ip(&["link", "set", &link.host, "up"]);
            let route = format!("{}/32", link.lease.addr);
            ip(&["route", "add", &route, "dev", &link.host]);
            ip(&["-n", &link.ns, "link", "set", "lo", "up"]);
            ip(&["-n", &link.ns, "link", "set", &link.guest, "up"]);
            net.set_guest_mac(i, &link.lease.mac.clone());
        }
        net
    }

    fn server(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    fn config(&self) -> ServerConfig {
        ServerConfig {
            server: self.server(),
            prefix_len: 24,
            lease_secs: 600,
            dns: Some(self.server()),
            domain: Some("vault.test".into()),
        }
    }

    fn set_guest_mac(&self, i: usize, mac: &[u8; 6]) {
        let link = &self.links[i];
        ip(&[
            "-n",
            &link.ns,
            "link",
            "set",
            &link.guest,
            "address",
            &mac_arg(mac),
        ]);
    }

    /// Binds one socket per link and serves them all from a thread.
    fn serve(&self) -> JoinHandle<coffre_dhcp::DhcpError> {
        let mut sockets = Vec::new();
        let mut interfaces = Vec::new();
        for link in &self.links {
            let fd = bind_socket(&link.host).unwrap();
            interfaces.push(Interface {
                ifname: link.host.clone(),
                fd: fd.as_raw_fd(),
                lease: link.lease.clone(),
            });
            sockets.push(fd);
        }
        let spec = Spec {
            config: self.config(),
            interfaces,
        };
        std::thread::spawn(move || serve(spec, sockets).unwrap_err())
    }

    fn dir(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("coffre-dhcp-{}", self.id));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs udhcpc in link `i`'s namespace until it has a lease or gives
    /// up (`tries` DISCOVERs one second apart); what the lease script saw
    /// on `bound`, if anything.
    fn udhcpc(&self, i: usize, tries: u32) -> (Option<String>, Output) {
        let link = &self.links[i];
        let dir = self.dir();
        let out = dir.join(format!("lease{i}"));
        let _ = std::fs::remove_file(&out);
        let script = dir.join(format!("script{i}"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip router=$router subnet=$subnet \
                 hostname=$hostname domain=$domain dns=$dns\" > {}\nexit 0\n",
                out.display()
            ),
        )
        .unwrap();
        chmod_x(&script);
        let output = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", link.ns))
            .args(["busybox", "udhcpc", "-i", &link.guest, "-n", "-q", "-f"])
            .args(["-t", &tries.to_string(), "-T", "1"])
            .arg("-s")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (std::fs::read_to_string(&out).ok(), output)
    }

    /// Sends `count` DISCOVERs with `mac` from link `i`'s namespace as
    /// fast as python3 can, to the broadcast address, for at most `secs`
    /// seconds; prints how many were sent.
    fn flood(&self, i: usize, mac: &[u8; 6], count: u32, secs: f64) -> std::process::Child {
        let link = &self.links[i];
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", link.ns))
            .args(["python3", "-c", FLOOD, &link.guest, &hex])
            .args([count.to_string(), secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// A minimal DISCOVER (fixed part, cookie, option 53, end) sent over UDP
/// from 0.0.0.0:68 bound to the guest's device, which has no address.
const FLOOD: &str = r#"
import socket, sys, time
ifname, mac, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 68))
sent = 0
for i in range(count):
    if i % 256 == 0 and time.monotonic() > deadline:
        break
    pkt = (bytes([1, 1, 6, 0]) + i.to_bytes(4, "big") + bytes(20) + mac + bytes(10)
           + bytes(192) + bytes([99, 130, 83, 99, 53, 1, 1, 255]))
    try:
        s.sendto(pkt, ("255.255.255.255", 67))
        sent += 1
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno != 105:  # ENOBUFS: the queue is full, go on
            raise
print(sent)
"#;

fn chmod_x(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl Drop for Net {
    fn drop(&mut self) {
        for link in &self.links {
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &link.ns])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            // Deleting either end deletes the pair; the namespace takes
            // the guest end with it, the host end is deleted in case the
            // move into the namespace never happened.
            let _ = Command::new("ip")
                .args(["link", "del", &link.host])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip").args(["netns", "del", &link.ns]).status();
        }
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

fn assert_bound(net: &Net, i: usize, seen: Option<String>, out: &Output) {
    let lease = &net.links[i].lease;
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "udhcpc got no lease on {}: {}\n{}",
            net.links[i].guest,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let want = format!(
        "ip={} router={} subnet=255.255.255.0 hostname={} domain=vault.test dns={}",
        lease.addr,
        net.server(),
        lease.hostname,
        net.server()
    );
    assert_eq!(seen.trim(), want);
    assert!(out.status.success(), "{out:?}");
}

/// CPU time (user + system, in clock ticks) of this process's thread
/// named `name`.
fn thread_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the ")" closing the command name: state is
            // field 3, utime 14 and stime 15.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            return Some(utime + stime);
        }
    }
    None
}

#[test]
#[ignore = "system: needs root, network namespaces, busybox udhcpc"]
fn udhcpc_gets_its_lease() {
    gate();
    let net = Net::new(1);
    let server = net.serve();
    let (seen, out) = net.udhcpc(0, 5);
    assert_bound(&net, 0, seen, &out);
    assert!(!server.is_finished());
}

#[test]
#[ignore = "system: needs root, network namespaces, busybox udhcpc"]
fn another_mac_gets_nothing_and_the_server_stays_up() {
    gate();
    let net = Net::new(1);
    let server = net.serve();
    let mut other = net.links[0].lease.mac;
    other[5] ^= 0x80;
    net.set_guest_mac(0, &other);
    let (seen, out) = net.udhcpc(0, 2);
    assert_eq!(seen, None, "{out:?}");
    assert!(!out.status.success(), "udhcpc -n exits 1 without a lease");
    assert!(!server.is_finished());
    // The same guest with the right MAC is served by the same server.
    net.set_guest_mac(0, &net.links[0].lease.mac.clone());
    let (seen, out) = net.udhcpc(0, 5);
    assert_bound(&net, 0, seen, &out);
    assert!(!server.is_finished());
}

#[test]
#[ignore = "system: needs root, network namespaces, busybox udhcpc"]
fn a_flood_starves_neither_another_interface_nor_the_guest_afterwards() {
    gate();
    let net = Net::new(2);
    let server = net.serve();
    let flooder = net.links[0].lease.mac;
    // The kernel keeps 15 bytes of a thread's name.
    let mut thread = format!("dhcp-{}", net.links[0].host);
    thread.truncate(15);
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = loop {
        if let Some(t) = thread_ticks(&thread) {
            break t;
        }
        assert!(Instant::now() < deadline, "no thread {thread}");
        std::thread::sleep(Duration::from_millis(20));
    };

    // Link 0's guest floods with its own MAC for 3 seconds, so every
    // DISCOVER would cost an OFFER; link 1's guest asks meanwhile, and
    // gets its lease as fast as without the flood.
    let started = Instant::now();
    let mut flood = net.flood(0, &flooder, 10_000_000, 3.0);
    std::thread::sleep(Duration::from_millis(300));
    let (seen, out) = net.udhcpc(1, 5);
    let asked = started.elapsed();
    let flooding_still = flood.try_wait().unwrap().is_none();
    assert_bound(&net, 1, seen, &out);
    assert!(flooding_still, "the flood ended before udhcpc did");
    assert!(asked < Duration::from_secs(2), "{asked:?}");
    let sent = flood.wait_with_output().unwrap();
    assert!(sent.status.success(), "the flood script failed");
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    // Then the 2000 DISCOVERs of a shorter, sharper flood.
    let flood = net.flood(0, &flooder, 2000, 10.0);
    let burst = flood.wait_with_output().unwrap();
    assert!(burst.status.success());
    assert_eq!(String::from_utf8_lossy(&burst.stdout).trim(), "2000");
    let flooding = started.elapsed();

    // The flooded thread was rate limited: its CPU time is bounded by the
    // rate, not the flood (a generous 1 s of CPU, at 100 ticks a second).
    let ticks = thread_ticks(&thread).unwrap() - before;
    assert!(
        ticks < 100,
        "{ticks} ticks over {flooding:?} ({sent} + 2000 DISCOVERs)"
    );
    eprintln!("{ticks} ticks of CPU over {flooding:?} for {sent} + 2000 DISCOVERs");

    // Once the flood stops, the guest gets its lease within a few tries.
    let t = Instant::now();
    let (seen, out) = net.udhcpc(0, 6);
    assert_bound(&net, 0, seen, &out);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert!(!server.is_finished());
}

//! The OpenVPN gateway, end to end: the real OpenVPN 2.6 server and
//! clients, each in its own network namespace (a bridge in the server's,
//! one veth pair per client, 192.0.2.0/24 inside the namespaces only),
//! driven by the real daemon through OpenVPN's management socket.

use crate::harness::{Need, Vault, code, ok, require, unsafe_kill, wait_exit};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server namespace with a bridge at 192.0.2.1, and client namespaces
/// at 192.0.2.11, .12, …
pub struct Net {
    pub server: String,
    pub clients: Vec<String>,
}

impl Net {
    pub fn new(clients: usize) -> Net {
        let id = format!(
            "{}{}",
            std::process::id() % 10_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let server = format!("cfs{id}");
        ip(&["netns", "add", &server]);
        let net = Net {
            server: server.clone(),
            clients: (0..clients).map(|i| format!("cfc{id}x{i}")).collect(),
        };
        ip(&["-n", &server, "link", "set", "lo", "up"]);
        ip(&["-n", &server, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &server, "addr", "add", "192.0.2.1/24", "dev", "br0"]);
        ip(&["-n", &server, "link", "set", "br0", "up"]);
        for (i, ns) in net.clients.iter().enumerate() {
            ip(&["netns", "add", ns]);
            let (a, b) = (format!("cv{id}x{i}"), format!("cp{id}x{i}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &server]);
            ip(&["link", "set", &b, "netns", ns]);
            ip(&["-n", &server, "link", "set", &a, "master", "br0", "up"]);
            let addr = format!("192.0.2.{}/24", 11 + i);
            ip(&["-n", ns, "addr", "add", &addr, "dev", &b]);
            ip(&["-n", ns, "link", "set", &b, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn client_ip(i: usize) -> String {
        format!("192.0.2.{}", 11 + i)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.clients.iter().chain([&self.server]) {
            // Whatever still runs in there (OpenVPN) goes first.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// An OpenVPN process (server or client) in a namespace, logging to a file.
pub struct Ovpn {
    pub child: Child,
    pub log: PathBuf,
}

impl Ovpn {
    pub fn spawn(ns: &str, log: &Path, args: &[&str]) -> Ovpn {
        let _ = std::fs::remove_file(log);
        // Only the network namespace: `ip netns exec` would also give
        // OpenVPN a private copy of the mount table, with the data of
        // whichever vault another test has open, and that vault's close
        // would stop it as a holder of its data.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("openvpn")
            .args(args)
            .args(["--log", log.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Ovpn {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `want` (true) or the process exits or a
    /// line with one of `fail` appears (false).
    pub fn wait_for(&mut self, want: &str, fail: &[&str], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let t = self.text();
            if t.contains(want) {
                return true;
            }
            if fail.iter().any(|f| t.contains(f)) {
                return false;
            }
            if self.child.try_wait().unwrap().is_some() {
                return self.text().contains(want);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGTERM (a client says goodbye: explicit-exit-notify) and wait.
    pub fn stop(&mut self) {
        unsafe_kill(self.child.id(), "TERM");
        if wait_exit(&mut self.child, Duration::from_secs(15)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn exited_within(&mut self, within: Duration) -> bool {
        wait_exit(&mut self.child, within).is_some()
    }
}

impl Drop for Ovpn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const UP: &str = "Initialization Sequence Completed";

/// A vault with its gateway: the daemon, OpenVPN in its namespace, and
/// profiles for its members.
pub struct Gw {
    pub vault: Vault,
    pub net: Net,
    pub server: Option<Ovpn>,
    pub dir: PathBuf,
    /// OpenVPN on the "VPN host" with its relay (`coffre gateway relay`).
    pub relay: Option<Relay>,
}

/// The VPN host's side when the gateway is relayed over the bus: the
/// directory `openvpn-config --out` wrote, the relay's identity, the
/// management socket there, and the relay's process.
pub struct Relay {
    pub vpnhost: PathBuf,
    pub identity: PathBuf,
    pub management: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Relay {
    /// Starts `coffre gateway relay` in namespace `ns`.
    pub fn spawn(&mut self, ns: &str) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(crate::harness::BIN)
            .args(["gateway", "relay", "--identity"])
            .arg(&self.identity)
            .arg("--management")
            .arg(&self.management)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Gw {
    /// `members` beyond alice are added (bob a member, others too);
    /// `gateway` are extra `openvpn-config` flags.
    pub fn new(members: &[&str], clients: usize, gateway: &[&str]) -> Gw {
        Gw::with_vault(
            Vault::init(&["--totp-period", "3"]),
            members,
            clients,
            gateway,
        )
    }

    /// As [`Gw::new`], around a vault made by the caller (not started).
    pub fn with_vault(vault: Vault, members: &[&str], clients: usize, gateway: &[&str]) -> Gw {
        Gw::around(vault, Net::new(clients), members, gateway)
    }

    /// The gateway of `vault` (not started; its daemon runs wherever
    /// `vault.netns` says) with OpenVPN in `net`'s server namespace.
    pub fn around(vault: Vault, net: Net, members: &[&str], gateway: &[&str]) -> Gw {
        Gw::around_relayed(vault, net, members, gateway, None)
    }

    /// As [`Gw::around`]; with `relay`, OpenVPN runs from the VPN host's
    /// directory and the daemon reaches it through the relay (`gateway`
    /// must then hold `--relay NAME --out DIR --management PATH`).
    pub fn around_relayed(
        mut vault: Vault,
        net: Net,
        members: &[&str],
        gateway: &[&str],
        relay: Option<Relay>,
    ) -> Gw {
        // Refusals are part of the tests: keep the throttle short.
        vault.set_policy("throttle_base_ms", 10);
        let dir = vault.tmp.path().to_path_buf();
        let d = vault.dir.to_str().unwrap().to_string();
        let mut args = vec![
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
        ];
        args.extend(gateway);
        let out = vault.bin().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "openvpn-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        vault.start();
        for m in members {
            vault.add_member("alice", m, false);
        }
        let mut gw = Gw {
            vault,
            net,
            server: None,
            dir,
            relay,
        };
        gw.start_server();
        for name in std::iter::once(&"alice").chain(members) {
            let p = gw.profile_path(name);
            let out = gw.vault.cli(
                name,
                &["member", "profile", name, "--out", p.to_str().unwrap()],
            );
            assert!(
                out.status.success(),
                "profile: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        gw
    }

    pub fn profile_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ovpn"))
    }

    /// Starts OpenVPN and waits until the daemon is connected to it.
    pub fn start_server(&mut self) {
        let log = self.dir.join("server.log");
        let mut s = match &self.relay {
            None => {
                let conf = self.vault.dir.join("gateway/server.conf");
                Ovpn::spawn(
                    &self.net.server,
                    &log,
                    &["--config", conf.to_str().unwrap()],
                )
            }
            Some(r) => Ovpn::spawn(
                &self.net.server,
                &log,
                &[
                    "--cd",
                    r.vpnhost.to_str().unwrap(),
                    "--config",
                    "server.conf",
                ],
            ),
        };
        assert!(
            s.wait_for(UP, &["Exiting due to fatal error"], Duration::from_secs(20)),
            "OpenVPN server did not start:\n{}",
            s.text()
        );
        self.server = Some(s);
        let ns = self.net.server.clone();
        if let Some(r) = self.relay.as_mut()
            && r.child.is_none()
        {
            r.spawn(&ns);
        }
        self.wait_gateway(true);
    }

    pub fn wait_gateway(&self, up: bool) {
        // A bound on liveness, not a measure: through a relay the link
        // crosses the broker twice, and three tests run at once.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let s = self.vault.status("alice");
            if s["gateway"]["openvpn_connected"].as_bool() == Some(up) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway never {up}: {s}\nrelay:\n{}\naudit: {:?}",
                self.relay.as_ref().map(Relay::text).unwrap_or_default(),
                self.vault
                    .audit()
                    .iter()
                    .filter(|e| e["record"]["action"] == "gateway" || e["record"]["action"] == "bus")
                    .map(|e| e["record"].clone())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The password file a client reads: NAME, then the password with a
    /// fresh TOTP code after it (`scrv1`: in the static-challenge form).
    pub fn auth_file(&mut self, name: &str, password: Option<&str>, scrv1: bool) -> PathBuf {
        let pw = match password {
            Some(p) => p.to_string(),
            None => std::fs::read_to_string(&self.vault.member(name).password).unwrap(),
        };
        let code = self.vault.totp(name);
        let line = if scrv1 {
            use base64::Engine as _;
            let b = base64::engine::general_purpose::STANDARD;
            format!("SCRV1:{}:{}", b.encode(&pw), b.encode(&code))
        } else {
            format!("{pw}{code}")
        };
        let f = self.dir.join(format!("{name}.auth"));
        std::fs::write(&f, format!("{name}\n{line}\n")).unwrap();
        f
    }

    /// Starts a client for `name` in client namespace `i`.
    pub fn client(&self, name: &str, i: usize, auth: &Path, extra: &[&str]) -> Ovpn {
        let log = self.dir.join(format!("client-{name}-{i}.log"));
        let p = self.profile_path(name);
        let mut args = vec![
            "--config",
            p.to_str().unwrap(),
            "--auth-user-pass",
            auth.to_str().unwrap(),
            "--verb",
            "3",
        ];
        args.extend(extra);
        Ovpn::spawn(&self.net.clients[i], &log, &args)
    }

    /// A client that must get in.
    pub fn connect(&mut self, name: &str, i: usize) -> Ovpn {
        let auth = self.auth_file(name, None, false);
        let mut c = self.client(name, i, &auth, &[]);
        assert!(
            c.wait_for(UP, &["AUTH_FAILED"], Duration::from_secs(30)),
            "{name} did not get in:\n{}\nserver:\n{}",
            c.text(),
            self.server.as_ref().map(Ovpn::text).unwrap_or_default()
        );
        c
    }

    /// What a failed assertion about clients shows: the ends of
    /// OpenVPN's and the relay's logs, and the vault's gateway, bus, lock
    /// and session records.
    pub fn story(&self) -> String {
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        let audit: Vec<serde_json::Value> = self
            .vault
            .audit()
            .iter()
            .map(|e| e["record"].clone())
            .filter(|r| {
                ["gateway", "bus", "lock", "enter", "leave", "open", "close"]
                    .iter()
                    .any(|a| r["action"] == *a)
            })
            .collect();
        format!(
            "server:\n{}\nrelay:\n{}\naudit: {audit:#?}",
            tail(self.server.as_ref().map(Ovpn::text).unwrap_or_default()),
            tail(self.relay.as_ref().map(Relay::text).unwrap_or_default()),
        )
    }

    pub fn sessions(&self) -> Vec<serde_json::Value> {
        self.vault.status("alice")["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn audit_count(&self, action: &str, result: &str) -> usize {
        self.vault
            .audit()
            .iter()
            .filter(|e| e["record"]["action"] == action && e["record"]["result"] == result)
            .count()
    }
}

/// The line a refused client shows.
fn auth_failed_line(c: &Ovpn) -> String {
    c.text()
        .lines()
        .find(|l| l.contains("AUTH_FAILED"))
        .unwrap_or("")
        .to_string()
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn first_connection_opens_the_vault_and_the_last_departure_closes_it() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&["bob"], 2, &["--address", "bob=10.8.0.50"]);
    assert_eq!(gw.vault.state(), "closed");

    // The files OpenVPN reads: secrets root-only.
    use std::os::unix::fs::PermissionsExt;
    for (f, mode) in [
        ("gateway", 0o700),
        ("gateway/server.key", 0o600),
        ("gateway/tls-crypt.key", 0o600),
        ("gateway/auth-token.key", 0o600),
        ("run/gateway", 0o700),
    ] {
        let m = std::fs::metadata(gw.vault.dir.join(f)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, mode, "{f}");
    }
    let m = std::fs::metadata(gw.profile_path("alice")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);

    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    let s = gw.sessions();
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["member"], "alice");
    assert_eq!(s[0]["door"], "vpn");
    assert_eq!(s[0]["from"], Net::client_ip(0));
    assert_eq!(gw.vault.status("alice")["data"]["mounted"], true);
    let text = String::from_utf8(gw.vault.cli("alice", &["status"]).stdout).unwrap();
    assert!(
        text.contains("alice via vpn from 192.0.2.11 since"),
        "{text}"
    );
    assert!(text.contains("vpn:     OpenVPN (pid"), "{text}");

    // Bob sends his code the way OpenVPN's static challenge does, and gets
    // his fixed address.
    let auth = gw.auth_file("bob", None, true);
    let mut bob = gw.client("bob", 1, &auth, &[]);
    assert!(
        bob.wait_for(UP, &["AUTH_FAILED"], Duration::from_secs(30)),
        "{}",
        bob.text()
    );
    assert!(bob.text().contains("10.8.0.50"), "{}", bob.text());
    let s = gw.sessions();
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(gw.audit_count("enter", "ok"), 2);

    // Alice leaves: bob is still inside.
    alice.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.sessions().len() != 1 {
        assert!(
            Instant::now() < deadline,
            "alice never left: {:?}\n{}\n{}",
            gw.sessions(),
            alice.text(),
            gw.server.as_ref().unwrap().text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(gw.vault.state(), "open");
    // Bob leaves: the vault closes, the key is gone.
    bob.stop();
    gw.vault.wait_state("closed", Duration::from_secs(20));
    let st = gw.vault.status("alice");
    assert_eq!(st["key_held"], false);
    assert_eq!(st["data"]["mounted"], false);
    assert_eq!(gw.audit_count("leave", "ok"), 2);
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn wrong_password_wrong_code_removed_member_and_foreign_certificate_are_refused() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&["bob", "carol"], 1, &[]);

    // A wrong password: the keyslot does not open.
    let auth = gw.auth_file("bob", Some("not bob's password"), false);
    let mut c = gw.client("bob", 0, &auth, &[]);
    assert!(c.exited_within(Duration::from_secs(30)), "{}", c.text());
    let line = auth_failed_line(&c);
    assert!(line.contains("wrong_password"), "{}", c.text());
    assert!(!c.text().contains(UP));

    // A wrong TOTP code.
    let pw = std::fs::read_to_string(&gw.vault.member("bob").password).unwrap();
    let f = gw.dir.join("bad-code.auth");
    std::fs::write(&f, format!("bob\n{pw}000000\n")).unwrap();
    let mut c = gw.client("bob", 0, &f, &[]);
    assert!(c.exited_within(Duration::from_secs(30)), "{}", c.text());
    assert!(
        auth_failed_line(&c).contains("totp"),
        "{}",
        auth_failed_line(&c)
    );
    // A code used once is refused the second time.
    let code = gw.vault.totp("bob");
    std::fs::write(&f, format!("bob\n{pw}{code}\n")).unwrap();
    let mut c = gw.client("bob", 0, &f, &[]);
    assert!(c.wait_for(UP, &["AUTH_FAILED"], Duration::from_secs(30)));
    c.stop();
    gw.vault.wait_state("closed", Duration::from_secs(20));
    let mut c = gw.client("bob", 0, &f, &[]);
    assert!(c.exited_within(Duration::from_secs(30)), "{}", c.text());
    assert!(auth_failed_line(&c).contains("totp"), "{}", c.text());

    // A user name that is not the certificate's.
    let auth = gw.auth_file("bob", None, false);
    let text = std::fs::read_to_string(&auth).unwrap();
    std::fs::write(&auth, text.replacen("bob", "alice", 1)).unwrap();
    let mut c = gw.client("bob", 0, &auth, &[]);
    assert!(c.exited_within(Duration::from_secs(30)));
    assert!(
        auth_failed_line(&c).contains("user name must be bob"),
        "{}",
        c.text()
    );

    // A removed member: their certificate no longer opens anything.
    let out = gw.vault.authed("alice", &["member", "remove", "carol"]);
    ok(&out);
    let auth = gw.auth_file("carol", None, false);
    let mut c = gw.client("carol", 0, &auth, &[]);
    assert!(c.exited_within(Duration::from_secs(30)));
    assert!(
        auth_failed_line(&c).contains("belongs to no member"),
        "{}",
        c.text()
    );

    // A certificate of another vault, with this vault's profile around
    // it: OpenVPN refuses it during TLS, the vault never hears of it.
    let other = Vault::init(&[]);
    let id: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&other.members[0].identity).unwrap()).unwrap();
    let mine = std::fs::read_to_string(gw.profile_path("alice")).unwrap();
    let swap = |text: &str, tag: &str, with: &str| {
        let (a, rest) = text.split_once(&format!("<{tag}>\n")).unwrap();
        let (_, b) = rest.split_once(&format!("</{tag}>")).unwrap();
        format!("{a}<{tag}>\n{}\n</{tag}>{b}", with.trim_end())
    };
    let forged = swap(
        &swap(&mine, "cert", id["cert_pem"].as_str().unwrap()),
        "key",
        id["key_pem"].as_str().unwrap(),
    );
    let p = gw.dir.join("foreign.ovpn");
    std::fs::write(&p, forged).unwrap();
    let connects_before = gw.audit_count("connect", "refused:unknown_certificate");
    let enters_before = gw.vault.audit().len();
    let auth = gw.auth_file("alice", None, false);
    let log = gw.dir.join("foreign.log");
    let mut c = Ovpn::spawn(
        &gw.net.clients[0],
        &log,
        &[
            "--config",
            p.to_str().unwrap(),
            "--auth-user-pass",
            auth.to_str().unwrap(),
            "--connect-retry-max",
            "1",
        ],
    );
    std::thread::sleep(Duration::from_secs(8));
    assert!(!c.text().contains(UP), "{}", c.text());
    let server = gw.server.as_ref().unwrap().text();
    assert!(
        server.contains("certificate verify failed") || server.contains("TLS Error"),
        "{server}"
    );
    c.stop();
    assert_eq!(gw.vault.state(), "closed");
    assert_eq!(
        gw.audit_count("connect", "refused:unknown_certificate"),
        connects_before
    );
    // Nothing was recorded: the daemon never saw the client.
    assert_eq!(gw.vault.audit().len(), enters_before);
    assert_eq!(gw.audit_count("enter", "ok"), 1);
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn renegotiation_keeps_the_session_without_a_new_code() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&[], 1, &["--reneg-sec", "10"]);
    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    let session = gw.sessions()[0]["session"].clone();
    // Wait for two renegotiations (the server renegotiates every 10 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let server = gw.server.as_ref().unwrap().text();
        if server.matches("TLS: soft reset").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no renegotiation:\n{server}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Still connected, in the same session, with one enter (the code in
    // the client's file was used once: a second check would refuse it).
    assert!(alice.child.try_wait().unwrap().is_none());
    assert!(!alice.text().contains("AUTH_FAILED"), "{}", alice.text());
    assert_eq!(alice.text().matches(UP).count(), 1, "{}", alice.text());
    let s = gw.sessions();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["session"], session);
    assert_eq!(gw.vault.state(), "open");
    assert_eq!(gw.audit_count("enter", "ok"), 1);
    assert_eq!(gw.audit_count("vpn_resume", "refused"), 0);
    assert!(
        gw.vault.audit().iter().all(|e| !e["record"]["result"]
            .as_str()
            .unwrap_or("")
            .starts_with("refused")),
        "{:?}",
        gw.vault.audit()
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn a_lock_disconnects_every_client_and_refuses_them_until_unlock() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&["bob"], 2, &[]);
    let mut alice = gw.connect("alice", 0);
    let mut bob = gw.connect("bob", 1);
    gw.vault.wait_state("open", Duration::from_secs(10));
    let out = gw.vault.authed("alice", &["lock", "--reason", "incident"]);
    ok(&out);
    gw.vault.wait_state("locked", Duration::from_secs(20));
    // Told to go and not come back on their own (client-kill HALT).
    assert!(
        alice.exited_within(Duration::from_secs(20)),
        "{}",
        alice.text()
    );
    assert!(bob.exited_within(Duration::from_secs(20)), "{}", bob.text());
    assert_eq!(gw.vault.status("alice")["key_held"], false);
    // Right password, fresh code: refused while locked.
    let auth = gw.auth_file("bob", None, false);
    let mut again = gw.client("bob", 1, &auth, &[]);
    assert!(again.exited_within(Duration::from_secs(30)));
    assert!(
        auth_failed_line(&again).contains("locked"),
        "{}",
        again.text()
    );
    assert_eq!(gw.vault.state(), "locked");
    // Unlocked: bob comes in again.
    let out = gw.vault.authed("alice", &["unlock"]);
    ok(&out);
    gw.vault.wait_state("closed", Duration::from_secs(10));
    let mut bob = gw.connect("bob", 1);
    gw.vault.wait_state("open", Duration::from_secs(10));
    bob.stop();
    gw.vault.wait_state("closed", Duration::from_secs(20));
}

/// Finding 5 of issue 12: a VPN login whose password check ends just
/// before a lock is refused, never let in (the daemon holds the core's
/// answer for a while through a test hook, and the lock lands then).
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn a_vpn_login_racing_a_lock_is_refused() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&["bob"], 1, &[]);
    gw.vault.stop();
    gw.vault.daemon_env = vec![("COFFRE_TEST_VPN_ANSWER_DELAY_MS".into(), "8000".into())];
    gw.vault.start();
    let auth = gw.auth_file("bob", None, false);
    let mut bob = gw.client("bob", 0, &auth, &[]);
    // The check passed (the vault opened for bob); the answer is held.
    gw.vault.wait_state("open", Duration::from_secs(30));
    ok(&gw.vault.authed("alice", &["lock", "--reason", "race"]));
    gw.vault.wait_state("locked", Duration::from_secs(20));
    assert!(bob.exited_within(Duration::from_secs(30)), "{}", bob.text());
    assert!(auth_failed_line(&bob).contains("locked"), "{}", bob.text());
    assert!(
        !bob.text().contains("Initialization Sequence Completed"),
        "bob was let in after the lock: {}",
        bob.text()
    );
    assert!(
        gw.vault
            .audit()
            .iter()
            .any(|e| e["record"]["action"] == "vpn_enter" && e["record"]["result"] == "refused"),
        "the refusal is audited"
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn removing_a_member_disconnects_them() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&["bob"], 1, &[]);
    let mut bob = gw.connect("bob", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    let out = gw.vault.authed("alice", &["member", "remove", "bob"]);
    ok(&out);
    assert!(bob.exited_within(Duration::from_secs(20)), "{}", bob.text());
    gw.vault.wait_state("closed", Duration::from_secs(20));
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn openvpn_restarting_does_not_close_the_vault() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&[], 1, &[]);
    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    let session = gw.sessions()[0]["session"].clone();
    let mut server = gw.server.take().unwrap();
    server.stop();
    gw.wait_gateway(false);
    gw.start_server();
    // The client reconnects by itself with its token, into the same
    // session; the vault never closed, no new password check happened.
    let back_in_the_same_session = |gw: &Gw, alice: &Ovpn, connections: usize| {
        let deadline = Instant::now() + Duration::from_secs(40);
        while alice.text().matches(UP).count() < connections {
            assert!(
                Instant::now() < deadline,
                "no reconnection:\n{}\nserver:\n{}",
                alice.text(),
                gw.server.as_ref().unwrap().text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let s = gw.sessions();
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0]["session"], session);
        assert_eq!(gw.vault.state(), "open");
        assert_eq!(gw.audit_count("state", "closing"), 0);
        assert_eq!(gw.audit_count("enter", "ok"), 1);
    };
    back_in_the_same_session(&gw, &alice, 2);
    assert_eq!(gw.audit_count("vpn_resume", "ok"), 1);

    // A soft restart (SIGUSR1) restarts OpenVPN in place: same pid, same
    // management connection, new client ids. (SIGHUP cannot work once
    // OpenVPN runs as nobody: it re-reads a configuration only root reads.)
    let pid = gw.server.as_ref().unwrap().child.id();
    unsafe_kill(pid, "USR1");
    back_in_the_same_session(&gw, &alice, 3);
    // Its client keeps being counted as present (heartbeats resume).
    std::thread::sleep(Duration::from_secs(3));
    back_in_the_same_session(&gw, &alice, 3);
    assert!(gw.audit_count("gateway", "restarting") >= 1);
    assert_eq!(
        gw.vault.status("alice")["gateway"]["clients"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    alice.stop();
    gw.vault.wait_state("closed", Duration::from_secs(20));
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn a_client_killed_without_notice_is_dropped_after_the_keepalive() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&[], 1, &[]);
    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    let t = Instant::now();
    let _ = alice.child.kill();
    let _ = alice.child.wait();
    // keepalive timeout 6 s, then the departure delay.
    gw.vault.wait_state("closed", Duration::from_secs(30));
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(3), "closed after {took:?}");
    assert_eq!(gw.audit_count("leave", "ok"), 1);
    assert_eq!(code(&gw.vault.cli("alice", &["status"])), 0);
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn the_daemon_talks_only_to_a_management_socket_that_root_alone_can_reach() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    use std::os::unix::fs::PermissionsExt;
    let mut gw = Gw::new(&[], 1, &[]);
    let mut server = gw.server.take().unwrap();
    server.stop();
    gw.wait_gateway(false);
    // The socket carries passwords in clear: a directory others can enter
    // is refused, and the refusal says why.
    let run = gw.vault.dir.join("run/gateway");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = gw.vault.dir.join("gateway/server.conf");
    let mut s = Ovpn::spawn(
        &gw.net.server,
        &gw.dir.join("server2.log"),
        &["--config", conf.to_str().unwrap()],
    );
    assert!(
        s.wait_for(UP, &["fatal"], Duration::from_secs(20)),
        "{}",
        s.text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = gw.vault.status("alice");
        let why = st["gateway"]["down_reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if why.contains("mode 0700") {
            assert_eq!(st["gateway"]["openvpn_connected"], false);
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !s.text().contains("MANAGEMENT: Client connected"),
        "{}",
        s.text()
    );
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    gw.wait_gateway(true);
    gw.server = Some(s);
    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    alice.stop();
    gw.vault.wait_state("closed", Duration::from_secs(20));
    // The password went through the socket in clear, and nowhere else:
    // not into the vault directory (audit log, control data, logs).
    let pw = std::fs::read(&gw.vault.member("alice").password).unwrap();
    let mut stack = vec![gw.vault.dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let bytes = std::fs::read(e.path()).unwrap();
                assert!(
                    !bytes.windows(pw.len()).any(|w| w == &pw[..]),
                    "the password is in {}",
                    e.path().display()
                );
            }
        }
    }
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn a_daemon_crash_neither_lets_old_clients_in_nor_opens_the_vault() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&[], 1, &[]);
    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    // OpenVPN keeps alice connected while the daemon dies.
    gw.vault.crash();
    gw.vault.start();
    gw.wait_gateway(true);
    // The new daemon finds a client it never let in: it is disconnected,
    // its token names no live session, and the vault stays closed.
    assert!(
        alice.exited_within(Duration::from_secs(30)),
        "{}",
        alice.text()
    );
    assert!(
        auth_failed_line(&alice).contains("session has ended"),
        "{}",
        alice.text()
    );
    assert_eq!(gw.vault.state(), "closed");
    let gone = gw.vault.audit_details("gateway", "disconnected");
    assert!(
        gone.iter().any(|d| d.contains("holds no vault session")),
        "{gone:?}"
    );
    // With the password and a fresh code, alice comes in again.
    let mut alice = gw.connect("alice", 0);
    gw.vault.wait_state("open", Duration::from_secs(10));
    alice.stop();
    gw.vault.wait_state("closed", Duration::from_secs(20));
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces"]
fn a_new_ca_key_keeps_vpn_profiles_working_through_the_cross_certificate() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::OpenVpn,
        Need::NetNs,
    ]);
    let mut gw = Gw::new(&["bob"], 1, &[]);
    let dir = gw.vault.dir.to_str().unwrap().to_string();
    let vdir = gw.vault.dir.clone();
    let file = |name: &str| std::fs::read_to_string(vdir.join(name)).unwrap();
    let certs_in = |pem: &str| pem.matches("BEGIN CERTIFICATE").count();
    let ca1 = file("ca.pem");
    // A member's profile gets in (opening the vault), and out (closing it).
    let gets_in = |gw: &mut Gw, name: &str| {
        let mut c = gw.connect(name, 0);
        gw.vault.wait_state("open", Duration::from_secs(10));
        c.stop();
        gw.vault.wait_state("closed", Duration::from_secs(20));
    };
    let gw_cert1 = file("gateway/server.pem");
    assert_eq!(certs_in(&gw_cert1), 1);

    // The change, with the daemon and OpenVPN stopped.
    gw.server.take().unwrap().stop();
    gw.vault.stop();
    let out = gw
        .vault
        .bin()
        .args(["renew", "--ca", &dir, "--new-key"])
        .env("HOME", gw.vault.home("alice"))
        .env_remove("XDG_STATE_HOME")
        .output()
        .unwrap();
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("OpenVPN: restart it"));
    let ca2 = file("ca.pem");
    let cross = file("ca.cross.pem");
    assert_ne!(ca1, ca2);
    // OpenVPN trusts the previous CA alone, and sends X after its own
    // certificate, which the new key signed; OpenSSL chains it both ways.
    assert_eq!(file("gateway/ca.pem"), ca1);
    let gw_cert2 = file("gateway/server.pem");
    assert_eq!(certs_in(&gw_cert2), 2);
    assert!(gw_cert2.trim_end().ends_with(cross.trim_end()));
    let own = gw.dir.join("gateway-own.pem");
    std::fs::write(
        &own,
        gw_cert2
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    let verify = |ca: &str, untrusted: Option<&str>| {
        let mut c = Command::new("openssl");
        c.args(["verify", "-CAfile"]).arg(vdir.join(ca));
        if let Some(u) = untrusted {
            c.arg("-untrusted").arg(vdir.join(u));
        }
        c.arg(&own).output().unwrap().status.success()
    };
    assert!(verify("ca.previous.pem", Some("ca.cross.pem")));
    assert!(verify("ca.pem", None));
    assert!(!verify("ca.previous.pem", None));
    assert!(
        coffre_daemon::pki::cert_matches_key(&gw_cert2, &file("gateway/server.key")),
        "the gateway's certificate is for its key"
    );

    gw.vault.start();
    gw.start_server();
    // Bob's profile, made before the change (his certificate signed by the
    // previous CA, which his profile pins), gets in: the gateway's
    // certificate reaches that CA through X.
    gets_in(&mut gw, "bob");

    // Alice renews, confirming the new key's fingerprint: her machine pins
    // the new CA, and her new profile trusts it, with her certificate
    // (the new key's) followed by X for a gateway that trusts the previous
    // CA alone.
    let ca2_key = coffre_daemon::pki::pem_key_fingerprint(&ca2).unwrap();
    ok(&gw.vault.authed("alice", &["renew", "--trust-ca", &ca2_key]));
    let profile = |gw: &Gw, name: &str| {
        let p = gw.profile_path(name);
        ok(&gw.vault.cli(
            name,
            &["member", "profile", name, "--out", p.to_str().unwrap()],
        ));
        std::fs::read_to_string(p).unwrap()
    };
    let section = |text: &str, tag: &str| {
        let open = format!("<{tag}>\n");
        let start = text.find(&open).unwrap() + open.len();
        let end = text.find(&format!("</{tag}>")).unwrap();
        text[start..end].to_string()
    };
    let alice_profile = profile(&gw, "alice");
    assert_eq!(section(&alice_profile, "ca").trim_end(), ca2.trim_end());
    let alice_cert = section(&alice_profile, "cert");
    assert_eq!(certs_in(&alice_cert), 2);
    assert!(alice_cert.trim_end().ends_with(cross.trim_end()));
    gets_in(&mut gw, "alice");
    // Bob has not renewed: a profile he makes now trusts the CA his machine
    // pins (the previous one), not the one the vault serves; he gets in.
    let bob_profile = profile(&gw, "bob");
    assert_eq!(section(&bob_profile, "ca").trim_end(), ca1.trim_end());
    gets_in(&mut gw, "bob");

    // The finish (Bob shut out, as asked): OpenVPN trusts the new CA alone
    // and sends its own certificate alone. Alice's profile still gets in;
    // Bob's does not. Here the list of the previous CA's certificates was
    // lost (a restore from an older backup): nothing is revoked by its
    // fingerprint, and Bob is still named, by what his machine pins.
    gw.server.take().unwrap().stop();
    gw.vault.stop();
    std::fs::remove_file(vdir.join("ca.previous.certs.json")).unwrap();
    let finish = |force: bool| {
        let mut c = gw.vault.bin();
        c.args(["renew", "--ca", &dir, "--finish"]);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let out = finish(false);
    assert_eq!(code(&out), 1);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("machine of bob") && !said.contains("alice"),
        "{said}"
    );
    let out = finish(true);
    ok(&out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("ca.previous.certs.json was missing"),
        "{said}"
    );
    assert!(
        said.contains("stranded, as asked: the machine of bob"),
        "{said}"
    );
    assert_eq!(file("gateway/ca.pem"), ca2);
    let gw_cert3 = file("gateway/server.pem");
    assert_eq!(certs_in(&gw_cert3), 1);
    assert!(gw_cert2.starts_with(&gw_cert3));
    gw.vault.start();
    gw.start_server();
    gets_in(&mut gw, "alice");
    let auth = gw.auth_file("bob", None, false);
    let mut bob = gw.client("bob", 0, &auth, &[]);
    assert!(
        !bob.wait_for(
            UP,
            &["VERIFY ERROR", "AUTH_FAILED"],
            Duration::from_secs(20)
        ),
        "bob got in:\n{}",
        bob.text()
    );
    bob.stop();
    assert_eq!(
        code(&gw.vault.cli("bob", &["status"])),
        8,
        "bob is no member now"
    );
}

//! The OpenVPN gateway: the daemon's link to OpenVPN's management socket,
//! and the files `coffre gateway openvpn-config` writes.
//!
//! OpenVPN runs on its own (`openvpn --config DIR/gateway/server.conf`);
//! the daemon connects to its management socket, and reconnects whenever
//! that link or OpenVPN itself restarts. Every connection is authorised
//! by the vault (see `server.rs`): OpenVPN checks the certificate chain,
//! the vault checks the rest. The socket carries passwords in clear, so
//! the daemon only talks to it when its directory is reachable by root
//! alone and the peer at the other end runs as root.

use crate::openvpn::{self, ClientEnv, ClientEvent, Listed, Notice, Reader};
use crate::vaultdir::{Config, DirError, GatewayConfig, VaultDir};
use std::collections::VecDeque;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use zeroize::{Zeroize, Zeroizing};

/// What the management link reports to the vault.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected: OpenVPN's pid and the clients it has now.
    Up {
        /// OpenVPN's process id (a different one means it restarted).
        pid: u32,
        /// Its clients (`status 3`).
        clients: Vec<Listed>,
        /// This connection's number: commands must carry it (a command
        /// meant for an earlier connection is dropped, never sent to a
        /// new OpenVPN whose client ids mean other clients).
        generation: u64,
    },
    /// A client notification.
    Client {
        /// What kind of notification (CONNECT, REAUTH, ESTABLISHED, DISCONNECT...).
        event: ClientEvent,
        /// Client id.
        cid: u64,
        /// Key id.
        kid: Option<u64>,
        /// Its variables.
        env: ClientEnv,
    },
    /// OpenVPN gave a client its (primary, IPv4) VPN address.
    Address {
        /// Client id.
        cid: u64,
        /// The address.
        addr: std::net::Ipv4Addr,
    },
    /// OpenVPN restarts in place (SIGHUP, SIGUSR1) or exits: its clients
    /// are all going, and their ids will mean other clients.
    Restarting {
        /// OpenVPN's state line.
        state: String,
    },
    /// The link is gone (OpenVPN stopped, or a protocol error).
    Down {
        /// Why, for the audit log.
        why: String,
    },
}

/// Hands a client notice to the daemon, or keeps it until OpenVPN has
/// listed its clients (the daemon must know them first), within bounds.
fn deliver(
    up: bool,
    early: &mut Vec<LinkEvent>,
    events: &mpsc::UnboundedSender<LinkEvent>,
    ev: LinkEvent,
) -> Result<(), String> {
    if up {
        let _ = events.send(ev);
    } else if early.len() < MAX_EARLY {
        early.push(ev);
    } else {
        return Err("too many client notices before OpenVPN listed its clients".into());
    }
    Ok(())
}

/// A command for OpenVPN, for the connection of that generation.
pub type LinkCommand = (u64, String);

/// Whether the management socket's directory is root's alone: the socket
/// carries passwords in clear.
pub fn check_socket_dir(sock: &Path) -> Result<(), String> {
    let dir = sock
        .parent()
        .ok_or_else(|| format!("{}: no directory", sock.display()))?;
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if m.uid() != 0 || m.mode() & 0o077 != 0 {
        return Err(format!(
            "{} must be owned by root with mode 0700 (it is {}:{:o}): OpenVPN's management socket carries passwords",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

enum Expect {
    Pid,
    Status(Vec<String>),
    Ack,
}

/// Client notices held until the view is rebuilt, at most.
const MAX_EARLY: usize = 1024;

/// Where the management interface is.
#[derive(Debug)]
pub enum Via {
    /// OpenVPN's socket on this host.
    Socket(PathBuf),
    /// The relay on the VPN host, over the bus.
    Relay(Box<crate::relay::RelayConfig>),
}

/// One connection to the management interface: lines in, commands out.
pub(crate) trait Transport {
    /// The next line, `\r\n` removed. Cancel-safe (it runs in `select!`).
    async fn line(&mut self) -> Result<Zeroizing<String>, String>;
    /// Writes whole command lines.
    async fn send(&mut self, text: &str) -> Result<(), String>;
}

/// Runs the management link forever: connects (retrying every second),
/// reports [`LinkEvent`]s, and writes the commands it receives.
pub async fn run(
    via: Via,
    events: mpsc::UnboundedSender<LinkEvent>,
    mut commands: mpsc::UnboundedReceiver<LinkCommand>,
) {
    let mut last_err = String::new();
    let mut generation = 0u64;
    loop {
        generation += 1;
        let mut was_up = false;
        let r = match &via {
            Via::Socket(sock) => match connect_socket(sock).await {
                Ok(t) => link(t, &events, &mut commands, generation, &mut was_up).await,
                Err(e) => Err(e),
            },
            Via::Relay(cfg) => match crate::relay::RelayLink::open(cfg).await {
                Ok(t) => link(t, &events, &mut commands, generation, &mut was_up).await,
                Err(e) => Err(e),
            },
        };
        let why = match r {
            Ok(why) | Err(why) => why,
        };
        if events.is_closed() {
            return;
        }
        if was_up || why != last_err {
            // Reported once per distinct reason while OpenVPN is away,
            // not every second; always after a connection.
            let _ = events.send(LinkEvent::Down { why: why.clone() });
            last_err = why;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// OpenVPN's socket on this host.
pub(crate) struct SocketLink {
    rd: LineReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl SocketLink {
    /// A line already read in full, if any (never waits).
    pub(crate) fn ready_line(&mut self) -> Option<Zeroizing<String>> {
        self.rd.ready_line()
    }
}

impl Transport for SocketLink {
    async fn line(&mut self) -> Result<Zeroizing<String>, String> {
        self.rd.line().await
    }
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.wr
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("writing to OpenVPN: {e}"))
    }
}

/// Connects to OpenVPN's management socket `sock`, if only root can reach
/// it and root is behind it.
pub(crate) async fn connect_socket(sock: &Path) -> Result<SocketLink, String> {
    check_socket_dir(sock)?;
    let stream = tokio::net::UnixStream::connect(sock).await.map_err(|e| {
        format!(
            "cannot reach OpenVPN's management socket {}: {e}",
            sock.display()
        )
    })?;
    let cred = stream.peer_cred().map_err(|e| e.to_string())?;
    if cred.uid() != 0 {
        return Err(format!(
            "the process behind {} runs as uid {}, not root: not talking to it",
            sock.display(),
            cred.uid()
        ));
    }
    let (rd, wr) = stream.into_split();
    Ok(SocketLink {
        rd: LineReader::new(rd),
        wr,
    })
}

async fn link<T: Transport>(
    mut t: T,
    events: &mpsc::UnboundedSender<LinkEvent>,
    commands: &mut mpsc::UnboundedReceiver<LinkCommand>,
    generation: u64,
    up: &mut bool,
) -> Result<String, String> {
    let mut reader = Reader::new();
    // `state on`: OpenVPN says when it restarts in place or exits.
    let mut expect: VecDeque<Expect> =
        VecDeque::from([Expect::Ack, Expect::Pid, Expect::Status(Vec::new())]);
    t.send("state on\npid\nstatus 3\n").await?;
    let mut pid: Option<u32> = None;
    // Client notices that come before our view is rebuilt wait for it.
    let mut early: Vec<LinkEvent> = Vec::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some((gen_of, cmd)) = cmd else { return Ok("the daemon stops".into()) };
                if gen_of != generation || !*up {
                    continue;
                }
                t.send(&cmd).await?;
                expect.push_back(Expect::Ack);
            }
            n = t.line() => {
                let line = n?;
                let Some(notice) = reader.line(&line).map_err(|e| e.to_string())? else { continue };
                match notice {
                    Notice::Client { event, cid, kid, env } => {
                        deliver(*up, &mut early, events, LinkEvent::Client { event, cid, kid, env })?;
                    }
                    Notice::Success(text) | Notice::Error(text) => match expect.pop_front() {
                        Some(Expect::Pid) => {
                            pid = text.strip_prefix("pid=").and_then(|p| p.trim().parse().ok());
                            if pid.is_none() {
                                return Err(format!("OpenVPN did not give its pid ({text:.60})"));
                            }
                        }
                        Some(Expect::Status(_)) => {
                            return Err(format!("OpenVPN refused `status 3` ({text:.60})"));
                        }
                        Some(Expect::Ack) | None => {}
                    },
                    Notice::Output(l) => {
                        if let Some(Expect::Status(lines)) = expect.front_mut()
                            && lines.len() < 10_000
                        {
                            lines.push(l);
                        }
                    }
                    Notice::End => {
                        if let Some(Expect::Status(lines)) = expect.front() {
                            let clients = openvpn::parse_status3(lines).map_err(|e| e.to_string())?;
                            expect.pop_front();
                            let Some(pid) = pid else {
                                return Err("status before pid".into());
                            };
                            let _ = events.send(LinkEvent::Up { pid, clients, generation });
                            *up = true;
                            for ev in early.drain(..) { let _ = events.send(ev); }
                        }
                    }
                    // The vault's firewall follows clients by address;
                    // only a primary IPv4 address is one of ours.
                    Notice::ClientAddress { cid, addr: openvpn::ClientAddr::V4(addr), primary: true } => {
                        deliver(*up, &mut early, events, LinkEvent::Address { cid, addr })?;
                    }
                    Notice::ClientAddress { .. } => {}
                    Notice::Other(l) => {
                        if l.starts_with(">FATAL:") {
                            return Err(format!("OpenVPN: {l:.200}"));
                        }
                        // >STATE:time,NAME,...
                        if let Some(state) = l.strip_prefix(">STATE:")
                            && let Some(name) = state.split(',').nth(1)
                            && matches!(name, "RECONNECTING" | "EXITING")
                        {
                            let _ = events.send(LinkEvent::Restarting { state: state.chars().take(120).collect() });
                        }
                    }
                }
            }
        }
    }
}

/// Reads management lines into one fixed buffer, wiping each line's bytes
/// as it is taken out: lines carry passwords, and the link lives as long
/// as the daemon (a `BufReader` would keep them in its own buffer until
/// later lines happen to overwrite them, and a growing line buffer leaves
/// copies at each reallocation).
///
/// Cancel-safe: [`LineReader::line`] runs inside `select!`; a line that
/// arrived in part stays here until the rest comes.
pub(crate) struct LineReader<R> {
    rd: R,
    buf: Zeroizing<Vec<u8>>,
    end: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(rd: R) -> Self {
        Self {
            rd,
            // At most MAX_LINE bytes, then `\r\n`.
            buf: Zeroizing::new(vec![0; openvpn::MAX_LINE + 2]),
            end: 0,
        }
    }

    /// The next line, `\r\n` removed.
    pub(crate) async fn line(&mut self) -> Result<Zeroizing<String>, String> {
        loop {
            if let Some(line) = self.ready_line() {
                return Ok(line);
            }
            if self.end == self.buf.len() {
                return Err("OpenVPN sent an overlong line".into());
            }
            let n = self
                .rd
                .read(&mut self.buf[self.end..])
                .await
                .map_err(|e| format!("reading from OpenVPN: {e}"))?;
            if n == 0 {
                return Err("OpenVPN closed its management socket".into());
            }
            self.end += n;
        }
    }

    /// A line already here in full, if any (never waits).
    pub(crate) fn ready_line(&mut self) -> Option<Zeroizing<String>> {
        let nl = self.buf[..self.end].iter().position(|&b| b == b'\n')?;
        let mut raw = &self.buf[..nl];
        while let [rest @ .., b'\r'] = raw {
            raw = rest;
        }
        // The protocol is text; anything else is replaced, not trusted.
        let line = Zeroizing::new(String::from_utf8_lossy(raw).into_owned());
        let left = self.end - (nl + 1);
        self.buf.copy_within(nl + 1..self.end, 0);
        self.buf[left..self.end].zeroize();
        self.end = left;
        Some(line)
    }
}

/// What `coffre gateway openvpn-config` did.
#[derive(Debug)]
pub struct ConfigReport {
    /// The OpenVPN configuration written.
    pub server_conf: PathBuf,
    /// The management socket it will create.
    pub management: PathBuf,
    /// Whether the tls-crypt key was made now (false: the existing one was
    /// kept, so members' profiles stay valid).
    pub new_tls_crypt: bool,
    /// The relay's component name, with `via = "bus"`.
    pub relay: Option<String>,
    /// The VPN host's directory, if written.
    pub vpn_host: Option<PathBuf>,
}

/// Errors of `coffre gateway openvpn-config`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The vault directory.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// A setting.
    #[error("[gateway] {0}")]
    Invalid(String),
    /// Issuing the gateway's certificate failed.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// Writing or reading one of the gateway's files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GatewayError + '_ {
    move |source| GatewayError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` if needed, root's alone (0700): the gateway's files, and
/// the management socket's directory.
pub fn private_dir(path: &Path) -> Result<(), GatewayError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), GatewayError> {
    coffre_sys::fs::write_atomic(path, text.as_bytes(), mode)
        .map_err(|e| GatewayError::Invalid(e.to_string()))
}

/// Writes the gateway's certificate, keys and OpenVPN configuration under
/// `DIR/gateway/`, and the `[gateway]` section of config.toml. Existing
/// `tls-crypt` and token keys are kept; the certificate is issued anew.
///
/// `vpn_host` (`--out DIR`, `--management PATH`): also writes what OpenVPN
/// needs on another host into `DIR`, with paths relative to it (run
/// `openvpn --cd DIR --config server.conf`), its management socket at
/// `PATH` there.
pub fn write_openvpn_config(
    dir: &VaultDir,
    settings: GatewayConfig,
    vpn_host: Option<&(PathBuf, PathBuf)>,
) -> Result<ConfigReport, GatewayError> {
    let config = dir.load_config()?;
    let net = settings.check().map_err(GatewayError::Invalid)?;
    if dir.ca_next_cert().exists() {
        // `ca.key` may be the new key already, `ca.pem` not yet.
        return Err(GatewayError::Invalid(format!(
            "{} is there: a change of the CA's key was interrupted; run coffre renew --ca DIR --new-key to finish it first",
            dir.ca_next_cert().display()
        )));
    }
    if settings.via == crate::vaultdir::GatewayVia::Bus && config.bus.is_none() {
        return Err(GatewayError::Invalid(format!(
            "a relay talks to the vault over the bus, which this vault has not: run `coffre bus broker-config {} --listen HOST:PORT --out DIR` first",
            dir.root.display()
        )));
    }
    if let Some((_, m)) = vpn_host
        && !m.is_absolute()
    {
        return Err(GatewayError::Invalid(format!(
            "--management {}: an absolute path on the VPN host",
            m.display()
        )));
    }
    let gw = dir.gateway_dir();
    private_dir(&gw)?;
    let mgmt = dir.root.join(&settings.management);
    if let Some(parent) = mgmt.parent() {
        private_dir(parent)?;
    }
    let ca_key = dir.read(&dir.ca_key())?;
    let cert =
        crate::pki::new_gateway_cert(&config.name, &ca_key, &openvpn::gateway_cn(&config.name))?;
    let (ca, crt, key, tc, tok) = (
        gw.join("ca.pem"),
        gw.join("server.pem"),
        gw.join("server.key"),
        gw.join("tls-crypt.key"),
        gw.join("auth-token.key"),
    );
    let (trusted, chain) = openvpn_trust(dir)?;
    write_file(&ca, &trusted, 0o644)?;
    write_file(&crt, &openvpn::with_chain(&cert.cert_pem, &chain), 0o644)?;
    write_file(&key, &cert.key_pem, 0o600)?;
    let new_tls_crypt = !tc.exists();
    if new_tls_crypt {
        write_file(&tc, &openvpn::new_static_key(), 0o600)?;
    }
    if !tok.exists() {
        write_file(&tok, &openvpn::new_auth_token_key(), 0o600)?;
    }
    for p in [&ca, &crt, &key, &tc, &tok, &mgmt] {
        openvpn::config_path(p).map_err(GatewayError::Invalid)?;
    }
    let s = openvpn::ServerSettings {
        vault: config.name.clone(),
        port: settings.port,
        proto: settings.proto,
        network: net,
        // The vault network's route, and a tun name the firewall knows.
        vault_network: config
            .network
            .as_ref()
            .map(|n| (n.subnet.base(), n.subnet.prefix())),
        dev: config
            .network
            .as_ref()
            .map(|_| crate::server::vpn_link(&dir.root)),
        keepalive: (settings.keepalive[0], settings.keepalive[1]),
        reneg_s: settings.reneg_s,
        token_lifetime_s: settings.token_lifetime_s,
        ca: ca.display().to_string(),
        cert: crt.display().to_string(),
        key: key.display().to_string(),
        tls_crypt: tc.display().to_string(),
        token_secret: tok.display().to_string(),
        management: mgmt.display().to_string(),
        drop_privileges: settings.drop_privileges,
    };
    let conf = gw.join("server.conf");
    write_file(&conf, &openvpn::server_config(&s), 0o600)?;
    let mut management = mgmt;
    if let Some((out, remote_mgmt)) = vpn_host {
        private_dir(out)?;
        for p in [&ca, &crt, &key, &tc, &tok] {
            let name = p.file_name().expect("a file name");
            let text = dir.read(p)?;
            let mode = if name == "ca.pem" || name == "server.pem" {
                0o644
            } else {
                0o600
            };
            write_file(&out.join(name), &text, mode)?;
        }
        openvpn::config_path(remote_mgmt).map_err(GatewayError::Invalid)?;
        let name = |p: &Path| {
            p.file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        };
        let there = openvpn::ServerSettings {
            ca: name(&ca),
            cert: name(&crt),
            key: name(&key),
            tls_crypt: name(&tc),
            token_secret: name(&tok),
            management: remote_mgmt.display().to_string(),
            // The tun device is the VPN host's: no name the vault's
            // firewall knows.
            dev: None,
            ..s
        };
        write_file(
            &out.join("server.conf"),
            &openvpn::server_config(&there),
            0o600,
        )?;
        management = remote_mgmt.clone();
    }
    set_gateway_section(dir, &settings)?;
    Ok(ConfigReport {
        server_conf: conf,
        management,
        new_tls_crypt,
        relay: settings.relay.clone(),
        vpn_host: vpn_host.map(|(o, _)| o.clone()),
    })
}

/// What OpenVPN trusts (`gateway/ca.pem`) and sends after its own
/// certificate (in `gateway/server.pem`, after it): the vault's CA and
/// nothing; while a change of the CA's key is not finished, the previous
/// CA alone and the cross certificate. OpenSSL picks an issuer by name
/// and key identifier without checking its signature, so two CAs of one
/// name in one `ca` would break leaves without a key identifier; with the
/// previous CA alone, a leaf the new one signed chains through the cross
/// certificate its holder sends (members' profiles: `cert` is leaf and
/// cross), and machines that pin the previous CA trust the gateway's
/// certificate, signed by the new one, through the one it sends.
///
/// Without the cross certificate (`--finish` cut short after removing it,
/// and after writing OpenVPN's files for the new CA alone): the new CA.
pub fn openvpn_trust(dir: &VaultDir) -> Result<(String, String), DirError> {
    if let Some(previous) = crate::renew::key_changed(dir)?
        && let Some(cross) = dir.read_if_present(&dir.ca_cross_cert())?
    {
        return Ok((previous, cross));
    }
    Ok((dir.read(&dir.ca_cert())?, String::new()))
}

/// The first PEM certificate of `pem` (a gateway's own, without the chain
/// after it).
pub fn first_certificate(pem: &str) -> &str {
    const END: &str = "-----END CERTIFICATE-----";
    pem.find(END).map_or(pem, |i| &pem[..i + END.len()])
}

/// Replaces `[gateway]` in config.toml, leaving the rest as written.
fn set_gateway_section(dir: &VaultDir, settings: &GatewayConfig) -> Result<(), GatewayError> {
    let path = dir.config();
    let text = dir.read(&path)?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| GatewayError::Invalid(e.to_string()))?;
    let value =
        toml::Value::try_from(settings).map_err(|e| GatewayError::Invalid(e.to_string()))?;
    table.insert("gateway".into(), value);
    let out = toml::to_string_pretty(&table).map_err(|e| GatewayError::Invalid(e.to_string()))?;
    write_file(&path, &out, 0o600)?;
    // What the daemon will read must still be a valid configuration.
    dir.load_config()?;
    Ok(())
}

/// The public part of a member's profile, as the daemon serves it.
pub fn profile_settings(
    dir: &VaultDir,
    config: &Config,
) -> Result<openvpn::ProfileSettings, String> {
    let g = config
        .gateway
        .as_ref()
        .ok_or("this vault has no VPN gateway (a superuser runs `coffre gateway openvpn-config` on its host)")?;
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()));
    Ok(openvpn::ProfileSettings {
        vault: config.name.clone(),
        remote: g.remote.clone(),
        port: g.port,
        proto: g.proto,
        static_challenge: g.static_challenge,
        ca_pem: read(dir.ca_cert())?,
        chain_pem: openvpn_trust(dir).map_err(|e| e.to_string())?.1,
        tls_crypt: read(dir.gateway_dir().join("tls-crypt.key"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn management_lines_are_wiped_once_taken_out() {
        block_on(async {
            let input: &[u8] = b">CLIENT:ENV,password=hunter2\r\nEND\nSUCC";
            let mut r = LineReader::new(input);
            assert_eq!(&*r.line().await.unwrap(), ">CLIENT:ENV,password=hunter2");
            assert!(
                !r.buf.windows(7).any(|w| w == b"hunter2"),
                "the line is still in the buffer"
            );
            assert_eq!(&*r.line().await.unwrap(), "END");
            // A line in part is kept until the rest comes (here: never).
            assert_eq!(
                r.line().await.unwrap_err(),
                "OpenVPN closed its management socket"
            );
            assert_eq!(&r.buf[..r.end], b"SUCC");
            assert!(r.buf[r.end..].iter().all(|&b| b == 0));
        });
    }

    /// Gives `chunks` one read at a time (as a socket may cut them).
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl tokio::io::AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut c) = self.0.pop_front() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    self.0.push_front(c.split_off(n));
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    proptest::proptest! {
        /// Whatever OpenVPN sends, cut anywhere: each whole line comes out
        /// as sent (its `\r`s at the end removed, bytes that are not UTF-8
        /// replaced), a line longer than the bound is refused there, and
        /// the end of the stream is said.
        #[test]
        fn management_lines_come_out_whole_however_they_are_cut(
            lines in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                 proptest::prop_oneof![proptest::strategy::Just(0usize), proptest::strategy::Just(openvpn::MAX_LINE - 1), proptest::strategy::Just(openvpn::MAX_LINE + 2)],
                 proptest::bool::ANY),
                0..6,
            ),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..30),
            cuts in proptest::collection::vec(1usize..5000, 1..20),
        ) {
            let mut input = Vec::new();
            let mut want: Vec<Result<String, String>> = Vec::new();
            for (bytes, pad, cr) in &lines {
                let mut l: Vec<u8> = bytes.iter().copied().filter(|&b| b != b'\n').collect();
                l.extend(std::iter::repeat_n(b'x', *pad));
                if *cr {
                    l.push(b'\r');
                }
                l.push(b'\n');
                if want.last().is_some_and(Result::is_err) {
                    continue;
                }
                if l.len() > openvpn::MAX_LINE + 2 {
                    want.push(Err("OpenVPN sent an overlong line".into()));
                } else {
                    let mut raw = &l[..l.len() - 1];
                    while let [rest @ .., b'\r'] = raw {
                        raw = rest;
                    }
                    want.push(Ok(String::from_utf8_lossy(raw).into_owned()));
                }
                input.extend(l);
            }
            let tail: Vec<u8> = tail.into_iter().filter(|&b| b != b'\n').collect();
            input.extend(&tail);
            if !want.last().is_some_and(Result::is_err) {
                want.push(Err("OpenVPN closed its management socket".into()));
            }
            let mut chunks = std::collections::VecDeque::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= input.len() {
                    break;
                }
                let end = (at + c).min(input.len());
                chunks.push_back(input[at..end].to_vec());
                at = end;
            }
            let got = block_on(async {
                let mut r = LineReader::new(Chunks(chunks));
                let mut got = Vec::new();
                loop {
                    let l = r.line().await.map(|l| (*l).clone());
                    let end = l.is_err();
                    got.push(l);
                    if end {
                        break got;
                    }
                }
            });
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn overlong_management_lines_are_refused() {
        block_on(async {
            let input = vec![b'x'; openvpn::MAX_LINE + 10];
            let mut r = LineReader::new(&input[..]);
            assert_eq!(r.line().await.unwrap_err(), "OpenVPN sent an overlong line");
        });
    }
}

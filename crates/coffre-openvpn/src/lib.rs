//! OpenVPN 2.6 as the vault's gateway: its management protocol (what the
//! server tells us about clients, and how we answer), the credentials its
//! clients send, and the configuration files we write for the server and
//! for members.
//!
//! Everything here is pure (no I/O other than the OS random generator for
//! new keys) so that the bytes OpenVPN sends can be fuzzed (fuzz target
//! `openvpn_management`); the daemon's `gateway.rs` drives the socket. The protocol is described in
//! OpenVPN's `management-notes.txt`: lines, real-time notifications start
//! with `>`, a `>CLIENT:` notification is followed by `>CLIENT:ENV,` lines
//! up to `>CLIENT:ENV,END`, and every command is answered by `SUCCESS:`,
//! `ERROR:` or, for multi-line output, lines ending with `END`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use zeroize::Zeroizing;

/// Longest management line we accept (OpenVPN's own password buffer is 4 KiB,
/// tokens and certificate subjects are shorter).
pub const MAX_LINE: usize = 16 * 1024;

/// Most `>CLIENT:ENV,` lines in one notification (OpenVPN sends about 50).
pub const MAX_ENV: usize = 512;

/// Longest address a `>CLIENT:ADDRESS` notification may carry (OpenVPN
/// prints it into a 64-byte buffer).
pub const MAX_CLIENT_ADDR: usize = 64;

/// A protocol violation: the daemon drops the management connection and
/// connects again.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("OpenVPN management protocol: {0}")]
pub struct ProtocolError(pub String);

fn bad(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// What OpenVPN tells us about one client: only the variables we use are
/// kept; the password (or auth token) is a secret and never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientEnv {
    /// The certificate's common name.
    pub common_name: String,
    /// The user name the client sent.
    pub username: String,
    /// The password the client sent (or its auth token on reconnection).
    pub password: Zeroizing<String>,
    /// `auth-gen-token` session id (stable across renegotiations,
    /// reconnections and server restarts).
    pub session_id: String,
    /// `Initial`, `Authenticated`, `Expired`, `Invalid`,
    /// `AuthenticatedEmptyUser`, `ExpiredEmptyUser`.
    pub session_state: String,
    /// Where the client connects from.
    pub untrusted_ip: String,
    /// Its source port.
    pub untrusted_port: String,
    /// SHA-256 of the client certificate, lowercase hex without colons.
    pub fingerprint: String,
}

impl fmt::Debug for ClientEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientEnv")
            .field("common_name", &self.common_name)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("session_id", &self.session_id)
            .field("session_state", &self.session_state)
            .field("untrusted_ip", &self.untrusted_ip)
            .field("untrusted_port", &self.untrusted_port)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl ClientEnv {
    fn set(&mut self, name: &str, value: &str) {
        match name {
            "common_name" => self.common_name = value.to_string(),
            "username" => self.username = value.to_string(),
            "password" => self.password = Zeroizing::new(value.to_string()),
            "session_id" => self.session_id = value.to_string(),
            "session_state" => self.session_state = value.to_string(),
            "untrusted_ip" => self.untrusted_ip = value.to_string(),
            "untrusted_port" => self.untrusted_port = value.to_string(),
            "tls_digest_sha256_0" => self.fingerprint = normalize_fingerprint(value),
            _ => {}
        }
    }

    /// Whether OpenVPN found a valid, unexpired auth token for this user.
    pub fn token_valid(&self) -> bool {
        self.session_state == "Authenticated"
    }

    /// Whether the client presented a token at all (valid or not).
    pub fn has_token(&self) -> bool {
        !self.session_state.is_empty() && self.session_state != "Initial"
    }
}

/// `fe:62:0f:…` → `fe620f…` (how the vault stores fingerprints).
pub fn normalize_fingerprint(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Which kind of `>CLIENT:` notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A new connection asks to be authorised.
    Connect,
    /// A TLS renegotiation asks to be authorised.
    Reauth,
    /// An authorised client is up.
    Established,
    /// A client is gone.
    Disconnect,
}

/// An address OpenVPN gave or learnt for a client (`>CLIENT:ADDRESS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAddr {
    /// An IPv4 host address (`10.8.0.2`; also an IPv4-mapped IPv6 one,
    /// which OpenVPN prints dotted).
    V4(Ipv4Addr),
    /// An IPv6 host address (`fd00::2`).
    V6(Ipv6Addr),
    /// Any other form OpenVPN prints, checked for its shape and at most
    /// [`MAX_CLIENT_ADDR`] bytes: an `iroute` subnet (`10.0.0.0/255.255.255.0`,
    /// `10.0.0.0/24`, `fd00:1::/64`), a MAC in TAP mode with or without
    /// its VLAN id (`02:00:5e:10:00:01@0`), or `UNKNOWN`.
    Other(String),
}

impl ClientAddr {
    /// Reads the ADDR field of `>CLIENT:ADDRESS`.
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        if s.len() > MAX_CLIENT_ADDR {
            return Err(bad(format!("a client address of {} bytes", s.len())));
        }
        if let Ok(a) = s.parse::<Ipv4Addr>() {
            return Ok(Self::V4(a));
        }
        if let Ok(a) = s.parse::<Ipv6Addr>() {
            return Ok(Self::V6(a));
        }
        let prefix = |p: &str, max: u8| {
            p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u8>().is_ok_and(|n| n <= max)
        };
        let ok = match s.split_once('/') {
            Some((a, m)) if a.parse::<Ipv4Addr>().is_ok() => {
                prefix(m, 32) || m.parse::<Ipv4Addr>().is_ok_and(is_netmask)
            }
            Some((a, m)) => a.parse::<Ipv6Addr>().is_ok() && prefix(m, 128),
            None => s == "UNKNOWN" || is_mac(s),
        };
        if !ok {
            return Err(bad(format!("not a client address: {s:.32}")));
        }
        Ok(Self::Other(s.to_string()))
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(a) => a.fmt(f),
            Self::V6(a) => a.fmt(f),
            Self::Other(s) => f.write_str(s),
        }
    }
}

/// A contiguous netmask (`255.255.255.0`).
fn is_netmask(m: Ipv4Addr) -> bool {
    let m = u32::from(m);
    m.leading_ones() + m.trailing_zeros() == 32
}

/// `02:00:5e:10:00:01`, optionally followed by `@VLAN-ID`.
fn is_mac(s: &str) -> bool {
    let (mac, vid) = match s.split_once('@') {
        Some((mac, vid)) => (mac, Some(vid)),
        None => (s, None),
    };
    let vid_ok = vid.is_none_or(|v| {
        !v.is_empty()
            && v.len() <= 5
            && v.bytes().all(|b| b.is_ascii_digit())
            && v.parse::<u16>().is_ok()
    });
    let octets: Vec<&str> = mac.split(':').collect();
    vid_ok
        && octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One thing the management interface said.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// A client notification with its environment (complete).
    Client {
        /// What kind of notification (CONNECT, REAUTH, ESTABLISHED, DISCONNECT...).
        event: ClientEvent,
        /// Client id.
        cid: u64,
        /// Key id (CONNECT and REAUTH only).
        kid: Option<u64>,
        /// Its variables.
        env: ClientEnv,
    },
    /// A client got an address (`>CLIENT:ADDRESS,CID,ADDR,PRI`, one line,
    /// sent once the client is established and for each `iroute`).
    ClientAddress {
        /// Client id.
        cid: u64,
        /// The address.
        addr: ClientAddr,
        /// Whether it is the client's primary (VPN) address.
        primary: bool,
    },
    /// A command succeeded.
    Success(String),
    /// A command failed.
    Error(String),
    /// A line of a multi-line command output (`END` excluded).
    Output(String),
    /// The end of a multi-line command output.
    End,
    /// Another real-time notification (`>INFO:`, `>LOG:`, `>STATE:`…).
    Other(String),
}

/// Turns management lines into [`Notice`]s, gathering `>CLIENT:` blocks.
#[derive(Debug, Default)]
pub struct Reader {
    open: Option<(ClientEvent, u64, Option<u64>, ClientEnv, usize)>,
}

fn number(s: &str) -> Result<u64, ProtocolError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("not a client or key id: {s:.32}")));
    }
    s.parse().map_err(|_| bad("id out of range"))
}

/// The fields of `>CLIENT:ADDRESS,CID,ADDR,PRI`.
fn client_address(args: &str) -> Result<Notice, ProtocolError> {
    let mut f = args.split(',');
    let cid = number(f.next().unwrap_or(""))?;
    let addr = ClientAddr::parse(f.next().unwrap_or(""))?;
    let primary = match f.next() {
        Some("1") => true,
        Some("0") => false,
        Some(p) => return Err(bad(format!("CLIENT:ADDRESS primary flag {p:.32}"))),
        None => return Err(bad("CLIENT:ADDRESS without its primary flag")),
    };
    if f.next().is_some() {
        return Err(bad("extra fields in a CLIENT:ADDRESS notification"));
    }
    Ok(Notice::ClientAddress { cid, addr, primary })
}

impl Reader {
    /// A new reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a `>CLIENT:` block is open (more `ENV` lines expected).
    pub fn in_block(&self) -> bool {
        self.open.is_some()
    }

    /// Feeds one line (without its line ending). Returns a notice when one
    /// is complete.
    pub fn line(&mut self, line: &str) -> Result<Option<Notice>, ProtocolError> {
        if line.len() > MAX_LINE {
            return Err(bad(format!("line of {} bytes", line.len())));
        }
        if let Some((event, cid, kid, env, count)) = &mut self.open {
            // The block is atomic: nothing else can come in between.
            let Some(var) = line.strip_prefix(">CLIENT:ENV,") else {
                return Err(bad("a CLIENT notification ended without ENV,END"));
            };
            if var == "END" {
                let (event, cid, kid, env) = (*event, *cid, *kid, std::mem::take(env));
                self.open = None;
                return Ok(Some(Notice::Client {
                    event,
                    cid,
                    kid,
                    env,
                }));
            }
            *count += 1;
            if *count > MAX_ENV {
                return Err(bad("too many ENV lines"));
            }
            if let Some((name, value)) = var.split_once('=') {
                env.set(name, value);
            }
            return Ok(None);
        }
        if let Some(rest) = line.strip_prefix(">CLIENT:") {
            let (kind, args) = rest.split_once(',').unwrap_or((rest, ""));
            let event = match kind {
                "CONNECT" => ClientEvent::Connect,
                "REAUTH" => ClientEvent::Reauth,
                "ESTABLISHED" => ClientEvent::Established,
                "DISCONNECT" => ClientEvent::Disconnect,
                "ENV" => return Err(bad("an ENV line outside a CLIENT notification")),
                // ADDRESS is a single line; CR_RESPONSE has ENV lines too,
                // but we never ask for one: treat it as an error.
                "ADDRESS" => return client_address(args).map(Some),
                other => return Err(bad(format!("unknown CLIENT notification {other:.32}"))),
            };
            let mut ids = args.split(',');
            let cid = number(ids.next().unwrap_or(""))?;
            let kid = match event {
                ClientEvent::Connect | ClientEvent::Reauth => {
                    Some(number(ids.next().unwrap_or(""))?)
                }
                _ => None,
            };
            if ids.next().is_some() {
                return Err(bad("extra fields in a CLIENT notification"));
            }
            self.open = Some((event, cid, kid, ClientEnv::default(), 0));
            return Ok(None);
        }
        if line.starts_with('>') {
            return Ok(Some(Notice::Other(line.to_string())));
        }
        if let Some(t) = line.strip_prefix("SUCCESS:") {
            return Ok(Some(Notice::Success(t.trim().to_string())));
        }
        if let Some(t) = line.strip_prefix("ERROR:") {
            return Ok(Some(Notice::Error(t.trim().to_string())));
        }
        if line == "END" {
            return Ok(Some(Notice::End));
        }
        Ok(Some(Notice::Output(line.to_string())))
    }
}

/// A client as `status 3` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Client id.
    pub cid: u64,
    /// Certificate common name.
    pub common_name: String,
    /// `IP:port` it connects from.
    pub real_address: String,
    /// Connected since (Unix seconds).
    pub since: u64,
    /// Its VPN address (`Virtual Address`), when it has an IPv4 one.
    pub virtual_address: Option<Ipv4Addr>,
}

/// The `CLIENT_LIST` rows of a `status 3` output, read by the column names
/// its `HEADER` line gives (so a version that adds columns still parses).
pub fn parse_status3(lines: &[String]) -> Result<Vec<Listed>, ProtocolError> {
    let mut cols: Option<Vec<&str>> = None;
    let mut out = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        match f.first().copied() {
            Some("HEADER") if f.get(1) == Some(&"CLIENT_LIST") => cols = Some(f[1..].to_vec()),
            Some("CLIENT_LIST") => {
                let Some(cols) = &cols else {
                    return Err(bad("CLIENT_LIST before its HEADER"));
                };
                let get = |name: &str| {
                    cols.iter()
                        .position(|c| *c == name)
                        .and_then(|i| f.get(i).copied())
                };
                let cid = number(get("Client ID").unwrap_or(""))?;
                out.push(Listed {
                    cid,
                    common_name: get("Common Name").unwrap_or("").to_string(),
                    real_address: get("Real Address").unwrap_or("").to_string(),
                    since: get("Connected Since (time_t)")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    virtual_address: get("Virtual Address").and_then(|s| s.parse().ok()),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// What a client's password field carried: the member's password and,
/// separately, their TOTP code.
pub struct Credentials {
    /// The password (secret).
    pub password: Zeroizing<String>,
    /// The TOTP code, if there was one.
    pub totp: Option<String>,
}

/// Splits what a client sent as its password.
///
/// - OpenVPN's static challenge (`static-challenge` in the profile):
///   `SCRV1:base64(password):base64(response)`.
/// - Otherwise the code is typed after the password: its last six
///   characters, if they are digits.
pub fn split_credentials(sent: &str) -> Result<Credentials, &'static str> {
    if let Some(rest) = sent.strip_prefix("SCRV1:") {
        let (p, r) = rest
            .split_once(':')
            .ok_or("a static-challenge answer without its response")?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let p = Zeroizing::new(
            b64.decode(p)
                .map_err(|_| "a static-challenge password that is not base64")?,
        );
        let r = b64
            .decode(r)
            .map_err(|_| "a static-challenge response that is not base64")?;
        let p = String::from_utf8(p.to_vec()).map_err(|_| "a password that is not UTF-8")?;
        let r = String::from_utf8(r).map_err(|_| "a TOTP code that is not UTF-8")?;
        let code: String = r.chars().filter(|c| !c.is_whitespace()).collect();
        return Ok(Credentials {
            password: Zeroizing::new(p),
            totp: (!code.is_empty()).then_some(code),
        });
    }
    let n = sent.len();
    if n > 6 && sent.is_char_boundary(n - 6) && sent[n - 6..].bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Credentials {
            password: Zeroizing::new(sent[..n - 6].to_string()),
            totp: Some(sent[n - 6..].to_string()),
        });
    }
    Ok(Credentials {
        password: Zeroizing::new(sent.to_string()),
        totp: None,
    })
}

/// A reason as one quoted management-command argument: OpenVPN's lexer
/// takes `\` and `"` as escapes, so they are dropped with control
/// characters; the length is bounded.
pub fn quote(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .take(200)
        .collect();
    format!("\"{clean}\"")
}

/// The command that authorises a connection, with its client-connect
/// directives (e.g. `ifconfig-push`).
pub fn client_auth(cid: u64, kid: u64, directives: &[String]) -> String {
    // Without directives, the one-line form: OpenVPN acts on it at once,
    // while a block is sometimes only seen at its next timer tick.
    if directives.iter().all(|d| d.contains(['\n', '\r'])) {
        return format!("client-auth-nt {cid} {kid}\n");
    }
    let mut s = format!("client-auth {cid} {kid}\n");
    for d in directives {
        // One directive a line; a directive cannot smuggle a line break.
        if !d.contains(['\n', '\r']) {
            s.push_str(d);
            s.push('\n');
        }
    }
    s.push_str("END\n");
    s
}

/// The command that refuses a connection: `log` goes to OpenVPN's log,
/// `client` to the client (it shows it after `AUTH_FAILED`).
pub fn client_deny(cid: u64, kid: u64, log: &str, client: &str) -> String {
    format!("client-deny {cid} {kid} {} {}\n", quote(log), quote(client))
}

/// The command that ends a client: `HALT` tells it not to come back.
pub fn client_kill(cid: u64, halt: bool) -> String {
    if halt {
        format!("client-kill {cid} HALT\n")
    } else {
        format!("client-kill {cid}\n")
    }
}

/// What a trace may say of a management command: its verb and the
/// client's id (`client-kill 4`), never the rest (a refusal's reason, or
/// the directives of a `client-auth`, which may grow).
pub fn summary(cmd: &str) -> String {
    let mut words = cmd.lines().next().unwrap_or("").split_whitespace();
    let verb = words.next().unwrap_or("");
    match words.next() {
        Some(cid) if cid.bytes().all(|b| b.is_ascii_digit()) => format!("{verb} {cid}"),
        _ => verb.to_string(),
    }
}

/// An IPv4 network for the VPN (`10.8.0.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length (16 to 29).
    pub prefix: u8,
}

impl Network {
    /// Parses `A.B.C.D/N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX, e.g. 10.8.0.0/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        if !(16..=29).contains(&prefix) {
            return Err(format!("prefix /{prefix}: use /16 to /29"));
        }
        let n = Self { addr, prefix };
        if u32::from(addr) & !n.mask_bits() != 0 {
            return Err(format!(
                "{s}: host bits are set (did you mean {}?)",
                n.base()
            ));
        }
        Ok(n)
    }

    fn mask_bits(&self) -> u32 {
        prefix_mask(self.prefix)
    }

    /// The netmask.
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask_bits())
    }

    /// Whether `ip` is a usable client address: inside, not the network,
    /// broadcast or server (`.1`) address.
    pub fn holds_client(&self, ip: Ipv4Addr) -> bool {
        let (a, base) = (u32::from(ip), u32::from(self.base()));
        let last = base | !self.mask_bits();
        a & self.mask_bits() == base && a > base + 1 && a < last
    }
}

/// The netmask of a prefix length (`24` → `0xffffff00`); above 32 is 32.
fn prefix_mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// Fills `buf` from the OS random number generator (a failing generator
/// is not something to go on from).
fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random number generator failed");
}

/// The transport OpenVPN runs over (`proto` in config.toml and in the
/// server configuration and profiles). Anything else is refused at load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// UDP, OpenVPN's default and the better choice over lossy links.
    #[default]
    Udp,
    /// TCP, for networks that only let TCP through.
    Tcp,
}

impl Proto {
    /// The name OpenVPN and config.toml use (`udp`, `tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "udp" => Ok(Self::Udp),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!("proto {other:?}: udp or tcp")),
        }
    }
}

/// A new `tls-crypt` key (OpenVPN static key V1 format, 2048 bits).
pub fn new_static_key() -> Zeroizing<String> {
    let mut k = Zeroizing::new([0u8; 256]);
    fill_random(&mut k[..]);
    let mut s = Zeroizing::new(String::from(
        "#\n# 2048 bit OpenVPN static key (tls-crypt), written by coffre\n#\n\
         -----BEGIN OpenVPN Static key V1-----\n",
    ));
    let mut row_hex = Zeroizing::new([0u8; 32]);
    for row in k.chunks(16) {
        let out = &mut row_hex[..row.len() * 2];
        data_encoding::HEXLOWER.encode_mut(row, out);
        s.push_str(std::str::from_utf8(out).unwrap_or(""));
        s.push('\n');
    }
    s.push_str("-----END OpenVPN Static key V1-----\n");
    s
}

/// A new `auth-gen-token-secret` (OpenVPN's PEM-like format, as
/// `openvpn --genkey auth-token` writes it).
pub fn new_auth_token_key() -> Zeroizing<String> {
    let mut k = Zeroizing::new([0u8; 128]);
    fill_random(&mut k[..]);
    let b = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&k[..]));
    let mut s = Zeroizing::new(String::from(
        "-----BEGIN OpenVPN auth-token server key-----\n",
    ));
    for row in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(row).unwrap_or(""));
        s.push('\n');
    }
    s.push_str("-----END OpenVPN auth-token server key-----\n");
    s
}

/// What the server configuration needs.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Vault name (comments, certificate names).
    pub vault: String,
    /// UDP or TCP port.
    pub port: u16,
    /// The transport.
    pub proto: Proto,
    /// The VPN's address space.
    pub network: Network,
    /// The vault's private network clients must reach (`10.9.0.0`, 24):
    /// pushed to clients as a route. Host bits are ignored; a prefix
    /// longer than 32 is read as 32.
    pub vault_network: Option<(Ipv4Addr, u8)>,
    /// The tun device's name (`dev NAME`, `dev-type tun`), so the vault's
    /// firewall knows it; `None`: OpenVPN picks `tunN`. Letters, digits,
    /// `-` and `_`, at most 15 bytes (anything else falls back to `None`).
    pub dev: Option<String>,
    /// `keepalive` interval and timeout, seconds.
    pub keepalive: (u32, u32),
    /// TLS renegotiation period, seconds (also the token renewal period).
    pub reneg_s: u32,
    /// How long a token may carry a session without a password, seconds.
    pub token_lifetime_s: u32,
    /// Files, absolute.
    pub ca: String,
    /// The gateway's certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
    /// `tls-crypt` key.
    pub tls_crypt: String,
    /// `auth-gen-token-secret`.
    pub token_secret: String,
    /// The management socket.
    pub management: String,
    /// Drop privileges to nobody/nogroup after start.
    pub drop_privileges: bool,
}

/// A path as one quoted OpenVPN configuration argument. Paths with
/// quotes, backslashes or control characters are refused: a line break
/// would add a directive to a configuration root runs.
pub fn config_path(p: &std::path::Path) -> Result<String, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", p.display()))?;
    if s.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err(format!("{s:?}: a path OpenVPN's configuration cannot hold"));
    }
    Ok(format!("\"{s}\""))
}

/// Modern AEAD data-channel ciphers only.
pub const DATA_CIPHERS: &str = "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305";

/// The common name of the gateway's certificate (profiles pin it).
pub fn gateway_cn(vault: &str) -> String {
    format!("coffre gateway {vault}")
}

/// The OpenVPN server configuration.
pub fn server_config(s: &ServerSettings) -> String {
    let udp = s.proto == Proto::Udp;
    let q = |p: &str| config_path(std::path::Path::new(p)).unwrap_or_else(|_| "\"\"".into());
    let mut c = format!(
        "# The OpenVPN gateway of vault {vault}, written by `coffre gateway openvpn-config`.\n\
         # Run it with: openvpn --config THIS_FILE\n\
         # Every connection is authorised by the vault daemon through the\n\
         # management socket: member certificate (fingerprint), password\n\
         # (it must open the member's keyslot) and TOTP code.\n\
         port {port}\n\
         proto {proto}\n\
         {dev}\
         topology subnet\n\
         server {net} {mask}\n\
         # No client-to-client: members reach the vault, not each other.\n\
         max-clients 64\n\
         ca {ca}\n\
         cert {cert}\n\
         key {key}\n\
         dh none\n\
         tls-version-min 1.2\n\
         tls-cert-profile preferred\n\
         tls-crypt {tls_crypt}\n\
         remote-cert-eku \"TLS Web Client Authentication\"\n\
         verify-client-cert require\n\
         data-ciphers {DATA_CIPHERS}\n\
         keepalive {ka} {kt}\n\
         reneg-sec {reneg}\n\
         auth-gen-token {life} {renew} external-auth\n\
         auth-gen-token-secret {token}\n\
         management {mgmt} unix\n\
         management-client-user root\n\
         management-client-auth\n\
         persist-key\n\
         persist-tun\n\
         verb 3\n",
        vault = s.vault,
        port = s.port,
        proto = s.proto,
        dev = match s.dev.as_deref().filter(|d| {
            !d.is_empty()
                && d.len() <= 15
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        }) {
            Some(d) => format!("dev {d}\ndev-type tun\n"),
            None => "dev tun\n".to_string(),
        },
        net = s.network.base(),
        mask = s.network.mask(),
        ca = q(&s.ca),
        cert = q(&s.cert),
        key = q(&s.key),
        tls_crypt = q(&s.tls_crypt),
        ka = s.keepalive.0,
        kt = s.keepalive.1,
        reneg = s.reneg_s,
        // OpenVPN wants at least twice its 60 s hand-window here.
        renew = s.reneg_s.max(120),
        life = s.token_lifetime_s,
        token = q(&s.token_secret),
        mgmt = q(&s.management),
    );
    if let Some((addr, prefix)) = s.vault_network {
        // Members reach the vault's network through the gateway (and
        // still not each other: no client-to-client, ever).
        let mask = Ipv4Addr::from(prefix_mask(prefix));
        let net = Ipv4Addr::from(u32::from(addr) & u32::from(mask));
        c.push_str(&format!("push \"route {net} {mask}\"\n"));
    }
    if udp {
        // Tell clients to reconnect at once when the server restarts.
        c.push_str("explicit-exit-notify 1\n");
    }
    if s.drop_privileges {
        c.push_str("user nobody\ngroup nogroup\n");
    }
    c
}

/// What a member's profile needs (all public except the member's own key,
/// which only their machine has).
#[derive(Clone, Debug)]
pub struct ProfileSettings {
    /// Vault name.
    pub vault: String,
    /// Host name or address clients connect to.
    pub remote: String,
    /// The port they connect to.
    pub port: u16,
    /// The transport.
    pub proto: Proto,
    /// Ask the TOTP code with OpenVPN's static challenge (otherwise it is
    /// typed after the password).
    pub static_challenge: bool,
    /// The vault CA (PEM).
    pub ca_pem: String,
    /// Certificates sent after the member's own (PEM, empty for none):
    /// the cross certificate while a change of the CA's key is not
    /// finished, so that a gateway trusting the previous CA alone takes a
    /// certificate the new one signed.
    pub chain_pem: String,
    /// The `tls-crypt` key.
    pub tls_crypt: String,
}

/// `cert_pem` followed by `chain` (PEM certificates; empty for none): what
/// a `cert` file or `<cert>` block holds when the peer must be sent more
/// than its own certificate. OpenVPN reads the first certificate as its
/// own and sends the ones after it to complete the chain.
pub fn with_chain(cert_pem: &str, chain: &str) -> String {
    if chain.trim().is_empty() {
        cert_pem.to_string()
    } else {
        format!("{}\n{}\n", cert_pem.trim_end(), chain.trim_end())
    }
}

/// A member's `.ovpn` profile with their certificate and key inline.
pub fn profile(p: &ProfileSettings, member: &str, cert_pem: &str, key_pem: &str) -> String {
    let proto = if p.proto == Proto::Tcp {
        "tcp-client"
    } else {
        "udp"
    };
    let mut c = format!(
        "# coffre: {member}'s profile for the VPN of vault {vault}.\n\
         # The user name is {member}; the password is your vault password{how}.\n\
         client\n\
         dev tun\n\
         proto {proto}\n\
         remote {remote} {port}\n\
         nobind\n\
         persist-key\n\
         persist-tun\n\
         remote-cert-tls server\n\
         verify-x509-name {cn} name\n\
         tls-version-min 1.2\n\
         data-ciphers {DATA_CIPHERS}\n\
         auth-user-pass\n\
         auth-nocache\n\
         auth-retry none\n",
        vault = p.vault,
        remote = p.remote,
        port = p.port,
        cn = quote(&gateway_cn(&p.vault)),
        how = if p.static_challenge {
            "; the TOTP code is asked separately"
        } else {
            ", followed by the 6-digit TOTP code"
        },
    );
    if p.static_challenge {
        c.push_str("static-challenge \"TOTP code\" 1\n");
    }
    if p.proto != Proto::Tcp {
        c.push_str("explicit-exit-notify 2\n");
    }
    let cert = with_chain(cert_pem, &p.chain_pem);
    for (tag, body) in [
        ("ca", p.ca_pem.as_str()),
        ("cert", cert.as_str()),
        ("key", key_pem),
        ("tls-crypt", p.tls_crypt.as_str()),
    ] {
        c.push_str(&format!("<{tag}>\n{}\n</{tag}>\n", body.trim_end()));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Reader, lines: &[&str]) -> Vec<Notice> {
        lines
            .iter()
            .filter_map(|l| r.line(l).expect("valid line"))
            .collect()
    }

    #[test]
    fn a_connect_block_is_gathered_with_its_secret_kept_out_of_debug() {
        let mut r = Reader::new();
        let n = feed(
            &mut r,
            &[
                ">CLIENT:CONNECT,3,1",
                ">CLIENT:ENV,password=SCRV1:cGFzcw==:MTIzNDU2",
                ">CLIENT:ENV,session_id=iVtYFIOBqSqhfnza",
                ">CLIENT:ENV,session_state=Initial",
                ">CLIENT:ENV,untrusted_ip=192.0.2.2",
                ">CLIENT:ENV,common_name=alice",
                ">CLIENT:ENV,username=alice",
                ">CLIENT:ENV,tls_digest_sha256_0=FE:62:0f",
                ">CLIENT:ENV,tls_digest_sha256_1=99:99",
                ">CLIENT:ENV,junk-without-equals",
                ">CLIENT:ENV,END",
            ],
        );
        let [
            Notice::Client {
                event,
                cid,
                kid,
                env,
            },
        ] = &n[..]
        else {
            panic!("{n:?}")
        };
        assert_eq!((*event, *cid, *kid), (ClientEvent::Connect, 3, Some(1)));
        assert_eq!(env.common_name, "alice");
        assert_eq!(env.fingerprint, "fe620f");
        assert_eq!(env.session_id, "iVtYFIOBqSqhfnza");
        assert!(!env.has_token());
        assert_eq!(&*env.password, "SCRV1:cGFzcw==:MTIzNDU2");
        let dbg = format!("{env:?}");
        assert!(
            !dbg.contains("SCRV1") && dbg.contains("<redacted>"),
            "{dbg}"
        );
        assert!(!r.in_block());
    }

    #[test]
    fn disconnect_success_output_and_end() {
        let mut r = Reader::new();
        let n = feed(
            &mut r,
            &[
                ">CLIENT:DISCONNECT,7",
                ">CLIENT:ENV,common_name=bob",
                ">CLIENT:ENV,END",
                "SUCCESS: pid=42",
                "ERROR: unknown command",
                "TITLE\tOpenVPN",
                "END",
                ">INFO:OpenVPN Management Interface Version 5",
                ">CLIENT:ADDRESS,0,10.8.0.2,1",
            ],
        );
        assert!(matches!(
            &n[0],
            Notice::Client { event: ClientEvent::Disconnect, cid: 7, kid: None, env } if env.common_name == "bob"
        ));
        assert_eq!(n[1], Notice::Success("pid=42".into()));
        assert_eq!(n[2], Notice::Error("unknown command".into()));
        assert_eq!(n[3], Notice::Output("TITLE\tOpenVPN".into()));
        assert_eq!(n[4], Notice::End);
        assert!(matches!(&n[5], Notice::Other(_)));
        assert_eq!(
            n[6],
            Notice::ClientAddress {
                cid: 0,
                addr: ClientAddr::V4(Ipv4Addr::new(10, 8, 0, 2)),
                primary: true
            }
        );
    }

    fn address(line: &str) -> Result<Option<Notice>, ProtocolError> {
        let mut r = Reader::new();
        let n = r.line(line);
        assert!(!r.in_block(), "ADDRESS is a single line: {line}");
        n
    }

    #[test]
    fn client_address_forms_are_typed() {
        let other = |s: &str| ClientAddr::Other(s.into());
        for (line, cid, addr, primary) in [
            (
                ">CLIENT:ADDRESS,3,10.8.0.2,1",
                3,
                ClientAddr::V4(Ipv4Addr::new(10, 8, 0, 2)),
                true,
            ),
            (
                ">CLIENT:ADDRESS,18446744073709551615,fd00:8::1000,0",
                u64::MAX,
                ClientAddr::V6("fd00:8::1000".parse().unwrap()),
                false,
            ),
            // An IPv4-mapped IPv6 address is printed dotted.
            (
                ">CLIENT:ADDRESS,4,192.0.2.7,0",
                4,
                ClientAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
                false,
            ),
            // TAP: a MAC with its VLAN id, and without.
            (
                ">CLIENT:ADDRESS,5,02:00:5e:10:00:01@0,1",
                5,
                other("02:00:5e:10:00:01@0"),
                true,
            ),
            (
                ">CLIENT:ADDRESS,5,02:AB:5e:10:00:01,1",
                5,
                other("02:AB:5e:10:00:01"),
                true,
            ),
            // iroutes: OpenVPN prints IPv4 subnets with a netmask, IPv6
            // ones with a prefix length; a prefix length is taken for IPv4 too.
            (
                ">CLIENT:ADDRESS,6,10.0.0.0/255.255.255.0,0",
                6,
                other("10.0.0.0/255.255.255.0"),
                false,
            ),
            (
                ">CLIENT:ADDRESS,6,10.0.0.0/24,0",
                6,
                other("10.0.0.0/24"),
                false,
            ),
            (
                ">CLIENT:ADDRESS,6,fd00:1::/64,0",
                6,
                other("fd00:1::/64"),
                false,
            ),
            (">CLIENT:ADDRESS,7,UNKNOWN,0", 7, other("UNKNOWN"), false),
        ] {
            let n = address(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(
                n,
                Some(Notice::ClientAddress {
                    cid,
                    addr: addr.clone(),
                    primary
                }),
                "{line}"
            );
            // What it prints is what OpenVPN sent (canonical forms).
            assert_eq!(
                format!(">CLIENT:ADDRESS,{cid},{addr},{}", u8::from(primary)),
                line
            );
        }
    }

    #[test]
    fn malformed_client_addresses_are_protocol_errors() {
        let long = format!(">CLIENT:ADDRESS,1,{},1", "a".repeat(MAX_CLIENT_ADDR + 1));
        let long_v6 = format!(">CLIENT:ADDRESS,1,{}::1,1", "0:".repeat(40));
        for line in [
            ">CLIENT:ADDRESS",
            ">CLIENT:ADDRESS,",
            ">CLIENT:ADDRESS,1",
            ">CLIENT:ADDRESS,1,10.8.0.2",
            ">CLIENT:ADDRESS,1,,1",
            ">CLIENT:ADDRESS,,10.8.0.2,1",
            ">CLIENT:ADDRESS,x,10.8.0.2,1",
            ">CLIENT:ADDRESS,-1,10.8.0.2,1",
            ">CLIENT:ADDRESS,99999999999999999999999,10.8.0.2,1",
            ">CLIENT:ADDRESS,1,10.8.0.2,2",
            ">CLIENT:ADDRESS,1,10.8.0.2,",
            ">CLIENT:ADDRESS,1,10.8.0.2,true",
            ">CLIENT:ADDRESS,1,10.8.0.2,01",
            ">CLIENT:ADDRESS,1,10.8.0.2,1,",
            ">CLIENT:ADDRESS,1,10.8.0.2,1,extra",
            ">CLIENT:ADDRESS,1,10.8.0.999,1",
            ">CLIENT:ADDRESS,1, 10.8.0.2,1",
            ">CLIENT:ADDRESS,1,10.0.0.0/33,1",
            ">CLIENT:ADDRESS,1,10.0.0.0/255.0.255.0,1",
            ">CLIENT:ADDRESS,1,10.0.0.0/,1",
            ">CLIENT:ADDRESS,1,fd00::/129,1",
            ">CLIENT:ADDRESS,1,fd00::/255.255.0.0,1",
            ">CLIENT:ADDRESS,1,02:00:5e:10:00,1",
            ">CLIENT:ADDRESS,1,02:00:5e:10:00:0g,1",
            ">CLIENT:ADDRESS,1,02:00:5e:10:00:01@,1",
            ">CLIENT:ADDRESS,1,02:00:5e:10:00:01@65536,1",
            ">CLIENT:ADDRESS,1,unknown,1",
            ">CLIENT:ADDRESS,1,alice;rm -rf,1",
            &long,
            &long_v6,
        ] {
            assert!(address(line).is_err(), "{line}");
        }
        assert!(ClientAddr::parse(&"1".repeat(MAX_CLIENT_ADDR + 1)).is_err());
        // Inside a CLIENT block it is an interleaving, refused as before.
        let mut r = Reader::new();
        r.line(">CLIENT:CONNECT,1,1").unwrap();
        assert!(r.line(">CLIENT:ADDRESS,1,10.8.0.2,1").is_err());
    }

    fn server_settings(vault_network: Option<(Ipv4Addr, u8)>) -> ServerSettings {
        ServerSettings {
            vault: "acme".into(),
            port: 1194,
            proto: Proto::Udp,
            network: Network::parse("10.8.0.0/24").unwrap(),
            vault_network,
            dev: None,
            keepalive: (10, 60),
            reneg_s: 3600,
            token_lifetime_s: 43200,
            ca: "/etc/coffre/ca.pem".into(),
            cert: "/etc/coffre/server.pem".into(),
            key: "/etc/coffre/server.key".into(),
            tls_crypt: "/etc/coffre/tls-crypt.key".into(),
            token_secret: "/etc/coffre/auth-token.key".into(),
            management: "/run/coffre/openvpn.sock".into(),
            drop_privileges: true,
        }
    }

    /// The directives of a configuration (comments left out).
    fn directives(conf: &str) -> Vec<&str> {
        conf.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
            .collect()
    }

    #[test]
    fn server_config_names_the_tun_when_asked_and_only_with_a_safe_name() {
        let mut s = server_settings(None);
        assert!(directives(&server_config(&s)).contains(&"dev tun"));
        s.dev = Some("cv0123456789".into());
        let conf = server_config(&s);
        let d = directives(&conf);
        assert!(
            d.contains(&"dev cv0123456789") && d.contains(&"dev-type tun"),
            "{conf}"
        );
        for bad in ["", "a\nscript-security 3", "x".repeat(16).as_str(), "a b"] {
            s.dev = Some(bad.to_string());
            let conf = server_config(&s);
            assert!(directives(&conf).contains(&"dev tun"), "{bad:?}: {conf}");
            assert!(!conf.contains("script-security"), "{conf}");
        }
    }

    #[test]
    fn server_config_pushes_the_vault_route_only_when_set_and_never_client_to_client() {
        for (vault_network, push) in [
            (None, None),
            (
                Some((Ipv4Addr::new(10, 9, 0, 0), 24)),
                Some("push \"route 10.9.0.0 255.255.255.0\""),
            ),
            // Host bits are dropped; /32 is one host; above 32 reads as 32.
            (
                Some((Ipv4Addr::new(10, 9, 0, 77), 16)),
                Some("push \"route 10.9.0.0 255.255.0.0\""),
            ),
            (
                Some((Ipv4Addr::new(192, 0, 2, 9), 32)),
                Some("push \"route 192.0.2.9 255.255.255.255\""),
            ),
            (
                Some((Ipv4Addr::new(192, 0, 2, 9), 200)),
                Some("push \"route 192.0.2.9 255.255.255.255\""),
            ),
        ] {
            for proto in [Proto::Udp, Proto::Tcp] {
                let mut s = server_settings(vault_network);
                s.proto = proto;
                let conf = server_config(&s);
                let d = directives(&conf);
                assert!(!d.iter().any(|l| l.contains("client-to-client")), "{conf}");
                let pushes: Vec<&str> = d
                    .iter()
                    .copied()
                    .filter(|l| l.starts_with("push"))
                    .collect();
                assert_eq!(pushes, push.into_iter().collect::<Vec<_>>(), "{conf}");
                // The rest of the configuration is unchanged by the route.
                let without = server_config(&ServerSettings {
                    vault_network: None,
                    dev: None,
                    ..s.clone()
                });
                let rest: Vec<&str> = d
                    .iter()
                    .copied()
                    .filter(|l| !l.starts_with("push"))
                    .collect();
                assert_eq!(rest, directives(&without));
            }
        }
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(1), 0x8000_0000);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(u8::MAX), u32::MAX);
    }

    #[test]
    fn protocol_violations_are_errors() {
        for bad_lines in [
            &[">CLIENT:ENV,a=b"][..],
            &[">CLIENT:CONNECT,1"],
            &[">CLIENT:CONNECT,x,1"],
            &[">CLIENT:CONNECT,1,2,3"],
            &[">CLIENT:REAUTH,99999999999999999999999,1"],
            &[">CLIENT:WHAT,1"],
            &[">CLIENT:CONNECT,1,1", "SUCCESS: interleaved"],
        ] {
            let mut r = Reader::new();
            let res: Result<Vec<_>, _> = bad_lines.iter().map(|l| r.line(l)).collect();
            assert!(res.is_err(), "{bad_lines:?}");
        }
        let mut r = Reader::new();
        assert!(r.line(&"x".repeat(MAX_LINE + 1)).is_err());
        r.line(">CLIENT:CONNECT,1,1").unwrap();
        let mut failed = false;
        for _ in 0..=MAX_ENV {
            if r.line(">CLIENT:ENV,a=b").is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "ENV lines must be bounded");
    }

    #[test]
    fn status3_rows_are_read_by_column_name() {
        let lines: Vec<String> = [
            "TITLE\tOpenVPN 2.6.14",
            "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher",
            "CLIENT_LIST\talice\t192.0.2.2:39307\t10.8.0.2\t\t3000\t2000\t2026-11-29 08:01:19\t1795939279\talice\t4\t0\tAES-256-GCM",
            "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name",
            "ROUTING_TABLE\t10.8.0.2\talice",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let l = parse_status3(&lines).unwrap();
        assert_eq!(
            l,
            vec![Listed {
                cid: 4,
                common_name: "alice".into(),
                real_address: "192.0.2.2:39307".into(),
                since: 1795939279,
                virtual_address: Some(Ipv4Addr::new(10, 8, 0, 2)),
            }]
        );
        assert!(parse_status3(&lines[2..3]).is_err());
    }

    #[test]
    fn credentials_static_challenge_and_suffix() {
        let c = split_credentials("SCRV1:cGFzcw==:MTIzNDU2").unwrap();
        assert_eq!(
            (c.password.as_str(), c.totp.as_deref()),
            ("pass", Some("123456"))
        );
        let c = split_credentials("correct horse123456").unwrap();
        assert_eq!(
            (c.password.as_str(), c.totp.as_deref()),
            ("correct horse", Some("123456"))
        );
        let c = split_credentials("no code here").unwrap();
        assert_eq!((c.password.as_str(), c.totp), ("no code here", None));
        assert!(split_credentials("SCRV1:!!!:MTIz").is_err());
        assert!(split_credentials("SCRV1:cGFzcw==").is_err());
        // Multi-byte characters before the code do not split inside them.
        let c = split_credentials("é123456").unwrap();
        assert_eq!(
            (c.password.as_str(), c.totp.as_deref()),
            ("é", Some("123456"))
        );
    }

    #[test]
    fn commands_cannot_be_smuggled() {
        assert_eq!(
            client_deny(1, 2, "x\"\nclient-kill 0", "a\\b"),
            "client-deny 1 2 \"xclient-kill 0\" \"ab\"\n"
        );
        assert_eq!(
            client_auth(
                1,
                0,
                &["ifconfig-push 10.8.0.9 255.255.255.0".into(), "a\nb".into()]
            ),
            "client-auth 1 0\nifconfig-push 10.8.0.9 255.255.255.0\nEND\n"
        );
        assert_eq!(client_kill(4, true), "client-kill 4 HALT\n");
        assert_eq!(client_auth(3, 1, &[]), "client-auth-nt 3 1\n");
    }

    #[test]
    fn a_command_summary_names_the_verb_and_the_client_only() {
        assert_eq!(summary(&client_kill(4, true)), "client-kill 4");
        assert_eq!(
            summary(&client_deny(2, 0, "a reason", "secret")),
            "client-deny 2"
        );
        let auth = client_auth(1, 0, &["ifconfig-push 10.8.0.9 255.255.255.0".into()]);
        assert_eq!(summary(&auth), "client-auth 1");
        assert_eq!(summary("status 3\n"), "status 3");
        assert_eq!(summary("password \"x\""), "password");
        assert_eq!(summary(""), "");
    }

    #[test]
    fn networks() {
        let n = Network::parse("10.8.0.0/24").unwrap();
        assert_eq!(n.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(n.holds_client("10.8.0.10".parse().unwrap()));
        assert!(!n.holds_client("10.8.0.1".parse().unwrap()));
        assert!(!n.holds_client("10.8.0.255".parse().unwrap()));
        assert!(!n.holds_client("10.9.0.10".parse().unwrap()));
        assert!(Network::parse("10.8.0.1/24").is_err());
        assert!(Network::parse("10.8.0.0/8").is_err());
        assert!(Network::parse("10.8.0.0").is_err());
    }

    #[test]
    fn key_files_have_openvpn_shapes() {
        let k = new_static_key();
        let hex: Vec<&str> = k
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        assert_eq!(hex.len(), 16);
        assert!(hex.iter().all(|l| l.len() == 32));
        let t = new_auth_token_key();
        assert!(t.starts_with("-----BEGIN OpenVPN auth-token server key-----\n"));
        assert_ne!(*new_static_key(), *k);
    }
}

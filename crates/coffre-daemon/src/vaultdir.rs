//! The vault directory: configuration, control data, PKI files, the
//! detached header and (by default) the volume.

use coffre_vault::{Persistent, Policy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors about the vault directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    /// File trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done (`read`, `write`...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// Bad content.
    #[error("{path}: {msg}")]
    Bad {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Crash-safe write failed.
    #[error(transparent)]
    Audit(#[from] coffre_audit::Error),
}

/// Writes a file of the vault directory crash-safely
/// ([`coffre_sys::fs::write_atomic`]), failures as [`DirError::Io`].
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DirError> {
    coffre_sys::fs::write_atomic(path, bytes, mode).map_err(|source| DirError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// `[storage]`: the volume's ciphertext on an S3 store or an NBD export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `s3://BUCKET/PREFIX`, `nbd://HOST[:PORT]/EXPORT`, `nbds://...`
    /// (TLS), `nbd+unix:///EXPORT?socket=PATH`.
    pub url: String,
    /// The endpoint of a store that is not AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region (default us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Plain HTTP to the endpoint (test servers on loopback only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// A 0600 file of `aws_access_key_id=`/`aws_secret_access_key=` lines,
    /// relative to DIR; default: the AWS environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Bytes per chunk (power of two, 64 KiB to 64 MiB).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// Bytes of chunks kept in memory (written ones until uploaded), and
    /// the most the write journal holds before a write flushes it.
    #[serde(default = "default_cache_size")]
    pub cache_size: u64,
    /// Where the write journal lives (ciphertext only, MACed): relative
    /// to DIR, or absolute. Default: `DIR/cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Other stores every write also goes to (`[[storage.mirror]]`),
    /// under the same names: the volume survives the loss of all but one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror: Vec<MirrorConfig>,
    /// With mirrors: seconds a store may take to answer before it is
    /// marked stale and the others go on without it (it is brought back
    /// in the background once it answers).
    #[serde(default = "default_degrade_after_s")]
    pub degrade_after_s: u64,
    /// `nbds`: the PEM file of the CA that signs the storage host's
    /// certificate (in DIR, or absolute); default: the vault's own CA
    /// (`DIR/ca.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `nbds`: the name the storage host's certificate must carry;
    /// default: the URL's host (required for a unix socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
}

impl StorageConfig {
    /// A store at `url`, with the defaults.
    pub fn new(url: String) -> Self {
        StorageConfig {
            url,
            endpoint: None,
            region: None,
            allow_http: false,
            credentials_file: None,
            chunk_size: default_chunk_size(),
            cache_size: default_cache_size(),
            cache_dir: None,
            mirror: Vec::new(),
            degrade_after_s: default_degrade_after_s(),
            ca_file: None,
            tls_name: None,
        }
    }

    /// Every credentials file named (the primary's, the mirrors').
    /// Every store's URL and endpoint (the primary's, then the mirrors').
    fn addresses(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str())
            .chain(self.endpoint.as_deref())
            .chain(
                self.mirror
                    .iter()
                    .flat_map(|m| std::iter::once(m.url.as_str()).chain(m.endpoint.as_deref())),
            )
    }

    fn credentials_files(&self) -> impl Iterator<Item = &PathBuf> {
        self.credentials_file.iter().chain(
            self.mirror
                .iter()
                .filter_map(|m| m.credentials_file.as_ref()),
        )
    }
}

/// `[[storage.mirror]]`: another store (S3 or NBD) the volume is written
/// to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Its URL, as `[storage] url`.
    pub url: String,
    /// Its endpoint, when it is not AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Its region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Plain HTTP to its endpoint (test servers on loopback only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// Its credentials file in DIR (0600); default: the AWS environment
    /// variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// `nbds`: as `[storage] ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `nbds`: as `[storage] tls_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
}

fn default_degrade_after_s() -> u64 {
    30
}

fn default_chunk_size() -> u32 {
    1 << 20
}

fn default_cache_size() -> u64 {
    64 << 20
}

/// `config.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Vault name (shown in the CA and TOTP issuer).
    pub name: String,
    /// Address the daemon listens on.
    pub listen: String,
    /// Data file or device (ciphertext only); absent when the volume is
    /// on a remote store (`[storage]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<PathBuf>,
    /// The volume on a remote store (docs/storage.md), instead of `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageConfig>,
    /// Detached LUKS2 header.
    pub header: PathBuf,
    /// TOTP time step in seconds (30 for authenticator apps).
    #[serde(default = "default_period")]
    pub totp_period_s: u64,
    /// Memory all concurrent keyslot derivations may use together, KiB.
    #[serde(default = "default_kdf_cap")]
    pub kdf_memory_cap_kib: u64,
    /// KDF costs of members' keyslots.
    pub keyslot_kdf: KeyslotKdf,
    /// How long an invitation stays valid, seconds.
    #[serde(default = "default_invite_ttl")]
    pub invitation_ttl_s: u64,
    /// Vault rules.
    #[serde(default)]
    pub policy: Policy,
    /// Where and how the data is shown while the vault is open.
    #[serde(default)]
    pub data: DataConfig,
    /// `[accounts]`: the members' numbers and what the vault's directory
    /// says of them.
    #[serde(default)]
    pub accounts: AccountsConfig,
    /// The OpenVPN gateway, if the vault has one (`coffre gateway
    /// openvpn-config` writes this section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayConfig>,
    /// `[network]`: the vault's own network, where members reach their
    /// workloads over the VPN behind the vault's firewall. Without it,
    /// nothing on the host's network changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// The organisation's directory as the source of who may be a member
    /// (`[directory]`, docs/directory.md): absent, the vault's own member
    /// list is the only source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<coffre_source::SourceConfig>,
    /// `[bus]`: the broker the daemon publishes its events to
    /// (docs/bus.md); `coffre bus broker-config` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<crate::bus::BusConfig>,
    /// `[log]`: the daemon's log level (default `info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
    /// `[metrics]`: the Prometheus endpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `[workloads]`: settings for the team's workloads.
    #[serde(default)]
    pub workloads: coffre_workload::config::Settings,
    /// `[[workload]]`: the team's workloads.
    #[serde(default, rename = "workload", skip_serializing_if = "Vec::is_empty")]
    pub workload: Vec<coffre_workload::config::WorkloadConfig>,
}

/// `[log]` in config.toml: the daemon's own log on stderr (the journal
/// under systemd). `COFFRE_LOG` overrides the level.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info` (the default) or `debug`, or a filter
    /// such as `warn,coffre_daemon=info`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".into()
}

/// `[metrics]` in config.toml: the Prometheus endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address (`127.0.0.1:9477`) or `unix:/path`.
    pub listen: String,
    /// Whether members' names may appear in labels (who is inside).
    #[serde(default)]
    pub member_names: bool,
}

impl Config {
    /// Whether VMs have shares: the vault then runs an NFS server (on its
    /// network) and mounts the data a second time for it.
    pub fn has_shares(&self) -> bool {
        self.network.is_some()
            && self
                .workload
                .iter()
                .any(|w| w.share.is_some() && w.address.is_some())
    }
}

impl MetricsConfig {
    /// Where to listen, checked. Members' names only on a unix socket:
    /// a loopback port is open to every local user.
    pub fn addr(&self) -> Result<MetricsAddr, String> {
        let a = parse_listen(&self.listen)?;
        if self.member_names && matches!(a, MetricsAddr::Tcp(_)) {
            return Err(format!(
                "[metrics] member_names = true needs a unix socket (listen = \"unix:/run/coffre/NAME/metrics.sock\"): {} is open to every local user",
                self.listen
            ));
        }
        Ok(a)
    }
}

/// Where `[metrics] listen` says to listen: a loopback address, or a
/// unix socket (`unix:/path`). Anything else is refused: the endpoint has
/// no authentication.
#[derive(Debug, PartialEq)]
pub enum MetricsAddr {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A unix socket's path.
    Unix(std::path::PathBuf),
}

/// Parses and checks `[metrics] listen`.
pub fn parse_listen(listen: &str) -> Result<MetricsAddr, String> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let p = std::path::PathBuf::from(path);
        if !p.is_absolute() {
            return Err(format!(
                "[metrics] listen: {listen:?}: a unix socket needs an absolute path"
            ));
        }
        return Ok(MetricsAddr::Unix(p));
    }
    let addr: SocketAddr = listen.parse().map_err(|e| {
        format!("[metrics] listen: {listen:?}: {e} (a loopback address such as 127.0.0.1:9477, or unix:/path)")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "[metrics] listen: {listen:?} is not a loopback address: the endpoint has no authentication (scrape it through a unix socket or a local agent)"
        ));
    }
    Ok(MetricsAddr::Tcp(addr))
}

/// `[network]` in config.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The vault's private network; the host is its first address.
    pub subnet: coffre_net::Subnet,
    /// Destinations outside it every workload may reach (nothing else
    /// leaves): `ADDRESS:PORT` (TCP and UDP) or `tcp/ADDRESS:PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<coffre_net::Egress>,
}

/// `[gateway]` in config.toml: OpenVPN in front of the vault.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// OpenVPN's management socket (relative to the vault directory unless
    /// absolute); its directory must be reachable by root only.
    #[serde(default = "default_management")]
    pub management: PathBuf,
    /// Host name or address members' profiles connect to.
    pub remote: String,
    /// The port OpenVPN listens on and profiles connect to (UDP or TCP after `proto`).
    #[serde(default = "default_vpn_port")]
    pub port: u16,
    /// `udp` or `tcp`; anything else is an error at load.
    #[serde(default)]
    pub proto: crate::openvpn::Proto,
    /// The VPN's address space.
    #[serde(default = "default_vpn_network")]
    pub network: String,
    /// `keepalive` interval and timeout, seconds: a client that vanishes
    /// without notice is dropped after the timeout.
    #[serde(default = "default_keepalive")]
    pub keepalive: [u32; 2],
    /// TLS renegotiation period, seconds.
    #[serde(default = "default_reneg")]
    pub reneg_s: u32,
    /// How long OpenVPN's auth token may carry a session before the
    /// password and a TOTP code are asked again, seconds.
    #[serde(default = "default_token_lifetime")]
    pub token_lifetime_s: u32,
    /// Profiles ask for the TOTP code separately (OpenVPN's static
    /// challenge); `false`: it is typed after the password.
    #[serde(default = "default_true")]
    pub static_challenge: bool,
    /// OpenVPN drops to nobody/nogroup once started.
    #[serde(default = "default_true")]
    pub drop_privileges: bool,
    /// Fixed VPN addresses, by member.
    #[serde(default)]
    pub addresses: BTreeMap<String, std::net::Ipv4Addr>,
    /// How the daemon reaches OpenVPN's management interface: `local` (the
    /// socket on this host) or `bus` (through the relay on the VPN host,
    /// over `[bus]`).
    #[serde(default, skip_serializing_if = "GatewayVia::is_local")]
    pub via: GatewayVia,
    /// With `via = "bus"`: the relay's component name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

/// Where OpenVPN's management interface is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayVia {
    /// The socket on this host.
    #[default]
    Local,
    /// Through the relay on the VPN host, over the bus.
    Bus,
}

impl GatewayVia {
    fn is_local(&self) -> bool {
        *self == GatewayVia::Local
    }
}

fn default_management() -> PathBuf {
    PathBuf::from("run/gateway/management.sock")
}
fn default_vpn_port() -> u16 {
    1194
}
fn default_vpn_network() -> String {
    "10.8.0.0/24".into()
}
fn default_keepalive() -> [u32; 2] {
    [10, 60]
}
fn default_reneg() -> u32 {
    3600
}
fn default_token_lifetime() -> u32 {
    12 * 3600
}
fn default_true() -> bool {
    true
}

impl GatewayConfig {
    /// Defaults, connecting to `remote`.
    pub fn new(remote: String) -> Self {
        Self {
            management: default_management(),
            remote,
            port: default_vpn_port(),
            proto: crate::openvpn::Proto::default(),
            network: default_vpn_network(),
            keepalive: default_keepalive(),
            reneg_s: default_reneg(),
            token_lifetime_s: default_token_lifetime(),
            static_challenge: true,
            drop_privileges: true,
            addresses: BTreeMap::new(),
            via: GatewayVia::Local,
            relay: None,
        }
    }

    /// Checks what OpenVPN would otherwise refuse later, or worse, accept.
    pub fn check(&self) -> Result<crate::openvpn::Network, String> {
        let net = crate::openvpn::Network::parse(&self.network)?;
        if self.remote.is_empty() || self.remote.contains(char::is_whitespace) {
            return Err(format!("remote {:?}: a host name or address", self.remote));
        }
        let [every, timeout] = self.keepalive;
        if every == 0 || timeout < 2 * every {
            return Err("keepalive: the timeout must be at least twice the interval".into());
        }
        if self.reneg_s < 10 {
            return Err("reneg_s: at least 10 seconds".into());
        }
        if self.via == GatewayVia::Bus && self.relay.is_none() {
            return Err("via = \"bus\" needs relay = NAME (the relay's component name)".into());
        }
        if let Some(r) = &self.relay {
            coffre_bus::check_component_name(r)?;
        }
        if self.token_lifetime_s == 0 {
            // OpenVPN reads 0 as "never expires".
            return Err("token_lifetime_s: at least 1 second (0 would mean forever)".into());
        }
        for (name, ip) in &self.addresses {
            if !net.holds_client(*ip) {
                return Err(format!(
                    "{name}'s address {ip} is not a client address of {}",
                    self.network
                ));
            }
        }
        Ok(net)
    }
}

/// `[data]` in config.toml: the team's mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Mount point of the team's filesystem (relative to the vault
    /// directory unless absolute).
    #[serde(default = "default_mountpoint")]
    pub mountpoint: PathBuf,
    /// Before the vault had its own numbers: the group that owned the
    /// top directory and `shared/`. Imported once into the vault's
    /// accounts (`_team`), then refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub team_gid: u32,
    /// Seconds between SIGTERM and SIGKILL for processes that keep the
    /// data busy when the vault closes.
    #[serde(default = "default_close_grace")]
    pub close_grace_s: u64,
    /// A forced close (lock, failed open) that has not finished after this
    /// many seconds (storage that stopped answering) is abandoned: the
    /// engine's cipher is revoked and the key wiped, whatever still hangs.
    #[serde(default = "default_close_deadline")]
    pub close_deadline_s: u64,
    /// A stop (SIGTERM) still waiting on the storage after this many
    /// seconds, however it moves (a provider that answers one write now
    /// and then keeps each of the stop's waits going), is given up: the
    /// key is wiped and the data cut off from its paths. Below the
    /// service manager's own stop timeout (the packaged unit's
    /// `TimeoutStopSec` is 10 min), which kills the daemon without
    /// either.
    #[serde(default = "default_stop_deadline")]
    pub stop_deadline_s: u64,
    /// Before the vault had its own numbers: each member's uid and gid
    /// on the host. Imported once into the vault's accounts, then
    /// refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, MemberIds>,
}

/// A member's ids on the host.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberIds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// `[accounts]` in config.toml: the numbers the vault gives its members
/// and groups, and their entries in the vault's directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    /// First id given (see `coffre_vault::accounts::DEFAULT_RANGE` for
    /// why 65536 to 99999).
    #[serde(default = "default_first_id")]
    pub first_id: u32,
    /// Last id given.
    #[serde(default = "default_last_id")]
    pub last_id: u32,
    /// Members' home directories in workloads: `HOME/NAME`.
    #[serde(default = "default_home")]
    pub home: String,
    /// Members' login shell in workloads.
    #[serde(default = "default_shell")]
    pub shell: String,
    /// The first of the 1024 ids the vault's helpers run as (DHCP, LDAP,
    /// each VM's NFS server: one each, of no account). Default: a block
    /// from 2 000 000 000 on that the vault's directory picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_first_id: Option<u32>,
}

fn default_first_id() -> u32 {
    coffre_vault::accounts::DEFAULT_RANGE.first
}
fn default_last_id() -> u32 {
    coffre_vault::accounts::DEFAULT_RANGE.last
}
fn default_home() -> String {
    "/home".into()
}
fn default_shell() -> String {
    "/bin/sh".into()
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            first_id: default_first_id(),
            last_id: default_last_id(),
            home: default_home(),
            shell: default_shell(),
            service_first_id: None,
        }
    }
}

impl AccountsConfig {
    /// The range of ids.
    pub fn range(&self) -> coffre_vault::accounts::Range {
        coffre_vault::accounts::Range {
            first: self.first_id,
            last: self.last_id,
        }
    }
}

fn default_close_deadline() -> u64 {
    30
}

fn default_stop_deadline() -> u64 {
    540
}

fn default_mountpoint() -> PathBuf {
    PathBuf::from("data")
}

fn default_close_grace() -> u64 {
    10
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            mountpoint: default_mountpoint(),
            team_gid: 0,
            close_grace_s: default_close_grace(),
            close_deadline_s: default_close_deadline(),
            stop_deadline_s: default_stop_deadline(),
            members: BTreeMap::new(),
        }
    }
}

fn default_invite_ttl() -> u64 {
    72 * 3600
}

/// The key derivation function of new keyslots (`pbkdf` in config.toml).
/// Any other name is an error when the configuration loads (it used to
/// become argon2id silently).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pbkdf {
    /// Argon2id: memory-hard, LUKS2's default.
    Argon2id,
    /// PBKDF2-HMAC-SHA256, for machines with little memory.
    Pbkdf2,
}

/// KDF costs for new keyslots, as written in config.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyslotKdf {
    /// `"argon2id"` or `"pbkdf2"`.
    pub pbkdf: Pbkdf,
    /// argon2 passes or pbkdf2 iterations.
    pub iterations: u32,
    /// argon2 memory, KiB.
    #[serde(default)]
    pub memory_kib: u32,
    /// argon2 lanes.
    #[serde(default)]
    pub lanes: u32,
}

impl KeyslotKdf {
    /// From LUKS2 parameters.
    pub fn from_params(p: coffre_luks2::kdf::KdfParams) -> Self {
        match p {
            coffre_luks2::kdf::KdfParams::Pbkdf2 { iterations, .. } => Self {
                pbkdf: Pbkdf::Pbkdf2,
                iterations,
                memory_kib: 0,
                lanes: 0,
            },
            coffre_luks2::kdf::KdfParams::Argon2id {
                time,
                memory_kib,
                lanes,
            } => Self {
                pbkdf: Pbkdf::Argon2id,
                iterations: time,
                memory_kib,
                lanes,
            },
        }
    }

    /// To LUKS2 parameters.
    pub fn params(&self) -> coffre_luks2::kdf::KdfParams {
        match self.pbkdf {
            Pbkdf::Pbkdf2 => coffre_luks2::kdf::KdfParams::Pbkdf2 {
                hash: coffre_luks2::hash::HashAlg::Sha256,
                iterations: self.iterations,
            },
            Pbkdf::Argon2id => coffre_luks2::kdf::KdfParams::Argon2id {
                time: self.iterations,
                memory_kib: self.memory_kib,
                lanes: self.lanes,
            },
        }
    }
}

pub use coffre_vault::invitations::Invitation;

fn default_period() -> u64 {
    30
}

fn default_kdf_cap() -> u64 {
    2 * 1024 * 1024
}

/// `control.json` (mode 0600): what survives restarts besides the audit log.
/// Its `Debug` leaves the secrets out.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Control {
    /// Format version.
    pub version: u32,
    /// The core's persistent state (members, lock, mode, policy).
    pub vault: Persistent,
    /// TOTP secrets by member, base32. Secret.
    pub totp: BTreeMap<String, String>,
    /// Certificate fingerprint (hex SHA-256) to member name.
    pub certs: BTreeMap<String, String>,
    /// Revoked certificate fingerprints.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// The audit host key's public half, hex (also in the head's checks).
    pub audit_public_key: String,
    /// Server-side secret mixed into invitation codes (hex). Secret: with
    /// it, an invitation file plus a header copy would open the volume.
    #[serde(default)]
    pub invite_secret: String,
    /// Pending invitations by member name.
    #[serde(default)]
    pub invitations: BTreeMap<String, Invitation>,
    /// The members' numbers, SSH keys and workload password verifiers.
    #[serde(default)]
    pub accounts: coffre_vault::accounts::Accounts,
    /// The vault's own certificates as the daemon last saw them on the
    /// host (`ca.pem`, `server.pem`, `gateway/server.pem`): file to
    /// fingerprint. `coffre renew --ca|--server|--gateway` runs beside
    /// the daemon; the daemon audits the change when it sees it.
    #[serde(default)]
    pub host_certificates: BTreeMap<String, String>,
    /// What a command did on the host while the daemon was stopped (`coffre
    /// renew --ca --finish`): audited at the daemon's next start, then
    /// cleared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_notes: Vec<HostNote>,
    /// Member name to the CA key (hex SHA-256 of its public key) their
    /// machine said it pins, with its last command: after a change of the
    /// CA's key, which machines have moved to the new one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pinned: BTreeMap<String, String>,
    /// Keyslots of removed members whose wipe failed (the header could
    /// not be written): keyslot number to the member it was bound to,
    /// wiped again at every tick until it is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wipe_pending: BTreeMap<u32, String>,
    /// Each member's standing in the organisation's directory at its last
    /// answer: kept so that a restart while it does not answer still
    /// knows whom it refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_standing: BTreeMap<String, Standing>,
}

/// A member's standing in the organisation's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// May be a member; `superuser`: a superuser too.
    Qualifies {
        /// In `superusers_group` (or none is set).
        superuser: bool,
    },
    /// May not, and why.
    Refused {
        /// Why, in words.
        why: String,
    },
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The TOTP secrets, the invitation secret, pending invitations and
        // accounts' verifiers stay out; who has what is enough to debug.
        f.debug_struct("Control")
            .field("version", &self.version)
            .field("vault", &self.vault)
            .field("totp", &self.totp.keys().collect::<Vec<_>>())
            .field("certs", &self.certs)
            .field("revoked", &self.revoked)
            .field("invitations", &self.invitations.keys().collect::<Vec<_>>())
            .field("host_certificates", &self.host_certificates)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

/// A change made on the host with the daemon stopped, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNote {
    /// When (Unix ms).
    pub at: u64,
    /// The audit record's action.
    pub action: String,
    /// Its detail.
    pub detail: String,
}

/// Paths inside a vault directory.
#[derive(Clone, Debug)]
pub struct VaultDir {
    /// The directory.
    pub root: PathBuf,
}

impl VaultDir {
    /// Wraps a path.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `control.json`.
    pub fn control(&self) -> PathBuf {
        self.root.join("control.json")
    }
    /// CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// The remote store's integrity key, sealed under the volume key.
    pub fn storage_key(&self) -> PathBuf {
        self.root.join("storage.key")
    }
    /// The remote store's root (its last manifest's epoch and MAC).
    pub fn storage_root(&self) -> PathBuf {
        self.root.join("storage.root")
    }
    /// CA key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// After a change of the CA's key (`coffre renew --ca --new-key`):
    /// the CA before it, which the door keeps trusting for the
    /// certificates it signed (its key is gone).
    pub fn ca_previous_cert(&self) -> PathBuf {
        self.root.join("ca.previous.pem")
    }
    /// The cross certificate: the new CA's key, signed by the previous
    /// CA. The door sends it after its own certificate, so that machines
    /// that still pin the previous CA trust the door.
    pub fn ca_cross_cert(&self) -> PathBuf {
        self.root.join("ca.cross.pem")
    }
    /// The new CA's certificate while its key is being changed: present
    /// only until the change is complete, it marks one that was
    /// interrupted (the daemon does not start; the command finishes it).
    pub fn ca_next_cert(&self) -> PathBuf {
        self.root.join("ca.next.pem")
    }
    /// The new CA's key while the change is under way.
    pub fn ca_next_key(&self) -> PathBuf {
        self.root.join("ca.next.key")
    }
    /// The fingerprints of the member certificates the previous CA signed
    /// (every one there was at the change of key): what finishing the
    /// change revokes.
    pub fn ca_previous_certs(&self) -> PathBuf {
        self.root.join("ca.previous.certs.json")
    }
    /// The door's certificate under the new CA, while the change is under
    /// way.
    pub fn server_next_cert(&self) -> PathBuf {
        self.root.join("server.next.pem")
    }
    /// Its key.
    pub fn server_next_key(&self) -> PathBuf {
        self.root.join("server.next.key")
    }
    /// Server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.pem")
    }
    /// Server key.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    /// Audit signing key.
    pub fn host_key(&self) -> PathBuf {
        self.root.join("host.key")
    }
    /// Where the open vault's data goes: the FUSE volume file, the team's
    /// mount and the NBD socket.
    pub fn data_layout(&self, config: &Config) -> coffre_data::Layout {
        // Each VM with disks gets its own NBD socket for them, owned by
        // the user VMs run as (none while that user is missing: the VM
        // then does not start, and says why).
        let vms = self.vm_run();
        let vm_exports = match coffre_workload::vm_credentials(&config.workloads) {
            Ok((uid, gid, _)) => config
                .workload
                .iter()
                .filter(|w| w.kind == coffre_workload::config::Kind::Qemu && !w.disks.is_empty())
                .map(|w| coffre_data::VmExport {
                    socket: coffre_workload::vm_nbd_socket(&vms, &w.name),
                    disks: w.disks.clone(),
                    uid,
                    gid,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        coffre_data::Layout {
            mountpoint: self.root.join(&config.data.mountpoint),
            nfs_shares: self.nfs_shares(config),
            vm_exports,
            ..coffre_data::Layout::under(&self.root)
        }
    }

    /// The NFS servers' directory: it holds a directory per VM with a
    /// share, each holding that VM's server's own mount of its share
    /// (`NAME/share`) and nothing else (root's alone).
    pub fn nfs_dir(&self) -> PathBuf {
        self.root.join("run").join("nfs")
    }

    /// VM `name`'s NFS server's log (`run/nfs-NAME.log`).
    pub fn nfs_log(&self, name: &str) -> PathBuf {
        self.root.join("run").join(format!("nfs-{name}.log"))
    }

    /// The directory VM `name`'s NFS server is confined beneath: its
    /// share's mount point and nothing else.
    pub fn nfs_vm_dir(&self, name: &str) -> PathBuf {
        self.nfs_dir().join(name)
    }

    /// Each VM's share and where it is mounted for that VM's NFS server
    /// (`DIR/run/nfs/NAME/share`: a share two VMs use is mounted twice,
    /// so that neither server reaches the other's mount); none without a
    /// network.
    pub fn nfs_shares(&self, config: &Config) -> Vec<coffre_data::ShareView> {
        if !config.has_shares() {
            return Vec::new();
        }
        config
            .workload
            .iter()
            .filter(|w| w.address.is_some())
            .filter_map(|w| {
                Some(coffre_data::ShareView {
                    share: w.share.clone()?,
                    at: self.nfs_vm_dir(&w.name).join("share"),
                })
            })
            .collect()
    }

    /// Where each VM's run directory goes (root's alone).
    pub fn vm_run(&self) -> PathBuf {
        self.root.join("run").join("vm")
    }

    /// The gateway's files: certificate, keys, OpenVPN configuration
    /// (root only).
    pub fn gateway_dir(&self) -> PathBuf {
        self.root.join("gateway")
    }

    /// OpenVPN's management socket, if the vault has a gateway.
    pub fn management_socket(&self, config: &Config) -> Option<PathBuf> {
        config
            .gateway
            .as_ref()
            .map(|g| self.root.join(&g.management))
    }

    /// Present while a daemon runs; found at start, it means an unclean stop.
    pub fn running_marker(&self) -> PathBuf {
        self.root.join("daemon.running")
    }

    /// Reads `config.toml`, resolving relative paths against the directory.
    pub fn load_config(&self) -> Result<Config, DirError> {
        let path = self.config();
        let text = std::fs::read_to_string(&path).map_err(|source| DirError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        self.parse_config(&text)
    }

    /// Parses and checks the text of `config.toml` (an operator's typo
    /// gets an error naming the file, never a panic: fuzzed,
    /// `vault_config`), resolving relative paths against the directory.
    pub fn parse_config(&self, text: &str) -> Result<Config, DirError> {
        let path = self.config();
        let mut c: Config = toml::from_str(text).map_err(|e| DirError::Bad {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if let Some(m) = &c.metrics {
            m.addr().map_err(|msg| DirError::Bad {
                path: path.clone(),
                msg,
            })?;
        }
        match (&c.volume, &c.storage) {
            (Some(_), Some(_)) => {
                return Err(DirError::Bad {
                    path,
                    msg: "volume and [storage] both name where the data is: keep one".into(),
                });
            }
            (None, None) => {
                return Err(DirError::Bad {
                    path,
                    msg: "no volume and no [storage]: say where the data is".into(),
                });
            }
            _ => {}
        }
        if let Some(f) = c
            .storage
            .iter()
            .flat_map(|s| s.credentials_files())
            .find(|f| {
                f.components().count() != 1
                    || !matches!(f.components().next(), Some(std::path::Component::Normal(_)))
            })
        {
            return Err(DirError::Bad {
                path,
                msg: format!(
                    "[storage] credentials_file = {:?} must be a file name in the vault directory (like \"storage.credentials\")",
                    f.display().to_string()
                ),
            });
        }
        // A login in a store's address would be shown in status, errors
        // and audit records; the keys go in credentials_file. Any `@`: a
        // secret may hold a `/`, so the authority cannot be told apart.
        if let Some(a) = c
            .storage
            .iter()
            .flat_map(|s| s.addresses())
            .find(|a| a.contains('@'))
        {
            return Err(DirError::Bad {
                path,
                msg: format!(
                    "[storage] {:?} carries a login (or an @): addresses take none; S3 keys go in credentials_file, an NBD storage host is authenticated by its certificate",
                    coffre_sys::shown::url(a)
                ),
            });
        }
        if let Some(v) = &c.volume
            && v.is_relative()
        {
            c.volume = Some(self.root.join(v));
        }
        if c.header.is_relative() {
            c.header = self.root.join(&c.header);
        }
        // Deadlines are added to the clock: a day (a week for a stop) at
        // most, and never 0 (that would give up at once).
        for (name, v, max) in [
            ("[data] close_deadline_s", c.data.close_deadline_s, 86_400),
            ("[data] stop_deadline_s", c.data.stop_deadline_s, 7 * 86_400),
        ] {
            if !(1..=max).contains(&v) {
                return Err(DirError::Bad {
                    path,
                    msg: format!("{name} must be between 1 and {max} seconds"),
                });
            }
        }
        if c.totp_period_s == 0 {
            return Err(DirError::Bad {
                path,
                msg: "totp_period_s must be at least 1".into(),
            });
        }
        if let Err(msg) = coffre_workload::config::check_all(&c.workload) {
            return Err(DirError::Bad {
                path,
                msg: msg.to_string(),
            });
        }
        if let Err(msg) = coffre_workload::config::check_network(
            &c.workload,
            c.network.as_ref().map(|n| &n.subnet),
        ) {
            return Err(DirError::Bad {
                path,
                msg: msg.to_string(),
            });
        }
        if let Some(n) = &c.network {
            if let Some(e) = n.egress.iter().find(|e| n.subnet.contains(e.addr)) {
                return Err(DirError::Bad {
                    path,
                    msg: format!("[network] egress {e} is inside the vault network"),
                });
            }
            if let Some(g) = &c.gateway
                && let Ok(vpn) = g.network.parse::<coffre_net::Subnet>()
                && vpn.overlaps(&n.subnet)
            {
                return Err(DirError::Bad {
                    path,
                    msg: format!(
                        "[network] subnet {} overlaps the VPN's network {vpn}: choose two separate ranges",
                        n.subnet
                    ),
                });
            }
        }
        if let Some(d) = &c.directory
            && let Err(e) = d.check()
        {
            return Err(DirError::Bad {
                path,
                msg: e.to_string(),
            });
        }
        if let Some(g) = &c.gateway
            && g.via == GatewayVia::Bus
        {
            let why = if c.bus.is_none() {
                Some(
                    "[gateway] via = \"bus\" needs [bus] url (`coffre bus broker-config`)"
                        .to_string(),
                )
            } else if g.relay.is_none() {
                Some("[gateway] via = \"bus\" needs relay = NAME".to_string())
            } else {
                None
            };
            if let Some(msg) = why {
                return Err(DirError::Bad { path, msg });
            }
        }
        Ok(c)
    }

    /// Reads `control.json` (its bytes, secrets included, wiped after).
    pub fn load_control(&self) -> Result<Control, DirError> {
        let path = self.control();
        let bytes = std::fs::read(&path)
            .map(zeroize::Zeroizing::new)
            .map_err(|source| DirError::Io {
                what: "read",
                path: path.clone(),
                source,
            })?;
        let c: Control = serde_json::from_slice(&bytes).map_err(|e| DirError::Bad {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if c.version != 1 {
            return Err(DirError::Bad {
                path,
                msg: format!("control data version {} (this coffre reads 1)", c.version),
            });
        }
        Ok(c)
    }

    /// Writes `control.json` crash-safely, mode 0600.
    pub fn save_control(&self, c: &Control) -> Result<(), DirError> {
        let bytes =
            zeroize::Zeroizing::new(serde_json::to_vec_pretty(c).expect("control data serialises"));
        write_atomic(&self.control(), &bytes, 0o600)?;
        Ok(())
    }

    /// The CAs whose certificates the door accepts, as one PEM text:
    /// `ca.pem`, and after a change of the CA's key the previous CA, which
    /// signed the certificates members hold until they renew them.
    pub fn door_roots(&self) -> Result<String, DirError> {
        let mut pem = self.read(&self.ca_cert())?;
        if let Some(previous) = self.read_if_present(&self.ca_previous_cert())?
            && previous != pem
        {
            pem = format!("{}\n{previous}", pem.trim_end());
        }
        Ok(pem)
    }

    /// What the door sends: its certificate, and after a change of the
    /// CA's key the cross certificate, through which machines that pin
    /// the previous CA trust it.
    pub fn door_chain(&self) -> Result<String, DirError> {
        let mut pem = self.read(&self.server_cert())?;
        if let Some(cross) = self.read_if_present(&self.ca_cross_cert())? {
            pem = format!("{}\n{cross}", pem.trim_end());
        }
        Ok(pem)
    }

    /// Reads a file as text; `None` if it does not exist.
    pub fn read_if_present(&self, path: &Path) -> Result<Option<String>, DirError> {
        match std::fs::read_to_string(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DirError::Io {
                what: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Reads a file as text.
    pub fn read(&self, path: &Path) -> Result<String, DirError> {
        std::fs::read_to_string(path).map_err(|source| DirError::Io {
            what: "read",
            path: path.to_path_buf(),
            source,
        })
    }
}

pub use coffre_api::Identity;

#[cfg(test)]
mod tests {
    use super::*;

    /// config.toml exactly as `coffre init` (argon2id keyslots) and
    /// `coffre gateway openvpn-config` wrote it before `pbkdf` and `proto`
    /// were typed.
    const WRITTEN_BY_INIT: &str = r#"name = "team"
listen = "127.0.0.1:7443"
volume = "volume.img"
header = "volume.hdr"
totp_period_s = 30
kdf_memory_cap_kib = 2097152
invitation_ttl_s = 259200

[keyslot_kdf]
pbkdf = "argon2id"
iterations = 4
memory_kib = 1048576
lanes = 4

[policy]
grace_ms = 30000
task_max_ms = 604800000
unlock_quorum = 1
approval_window_ms = 900000
auto_lock_failures = 20
failure_window_ms = 600000
throttle_base_ms = 1000
throttle_max_ms = 60000
close_retry_ms = 2000
close_force_after_ms = 300000

[data]
mountpoint = "data"
team_gid = 0
close_grace_s = 10
close_deadline_s = 30
stop_deadline_s = 540

[data.members]

[gateway]
management = "run/gateway/management.sock"
remote = "vpn.example.org"
port = 1194
proto = "udp"
network = "10.8.0.0/24"
keepalive = [
    10,
    60,
]
reneg_s = 3600
token_lifetime_s = 43200
static_challenge = true
drop_privileges = true

[gateway.addresses]

[workloads]
freezer = "auto"
freeze_timeout_ms = 5000
vm_user = "coffre-vm"
"#;

    fn load(text: &str) -> Result<Config, DirError> {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.toml"), text).unwrap();
        VaultDir::new(tmp.path()).load_config()
    }

    /// The example the Debian package ships loads as it is, and with its
    /// commented sections switched on.
    #[test]
    fn the_packaged_example_config_loads() {
        let text = include_str!("../../../dist/examples/config.toml");
        let c = load(text).unwrap();
        assert_eq!(c.name, "team");
        assert!(c.network.is_none() && c.workload.is_empty());
        let on: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.starts_with('[') || r.contains(" = "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = load(&on).unwrap();
        assert!(c.network.is_some());
        assert_eq!(c.workload.len(), 1);
    }

    /// Deadlines of 0 (giving up at once) or past what the clock can add
    /// are refused at load, naming the setting.
    #[test]
    fn deadlines_are_bounded() {
        let with = |k: &str, v: &str| {
            load(&WRITTEN_BY_INIT.replace(
                &format!("{k} = {}\n", if k == "stop_deadline_s" { 540 } else { 30 }),
                &format!("{k} = {v}\n"),
            ))
        };
        with("stop_deadline_s", "600").unwrap();
        for (k, v) in [
            ("stop_deadline_s", "0"),
            ("stop_deadline_s", "9223372036854775807"),
            ("close_deadline_s", "0"),
            ("close_deadline_s", "100000"),
        ] {
            let e = with(k, v).unwrap_err().to_string();
            assert!(e.contains(k), "{k} = {v}: {e}");
        }
        assert_eq!(
            with("close_deadline_s", "5").unwrap().data.close_deadline_s,
            5
        );
    }

    /// A store's URL or endpoint with a login is refused, and the
    /// refusal does not show it.
    #[test]
    fn store_addresses_take_no_login() {
        let base = WRITTEN_BY_INIT.replace("volume = \"volume.img\"\n", "");
        let with = |storage: &str| load(&format!("{base}\n[storage]\n{storage}\n"));
        with("url = \"s3://team-bucket/v1\"\nendpoint = \"https://s3.example:9000\"").unwrap();
        for (storage, secret) in [
            // A secret longer than a temporary directory's random part
            // (".tmp" and six characters, in the path the error names):
            // "pw" was found once in "/tmp/.tmpwjqY6r".
            ("url = \"nbd://svc:1234/Zq9secret@host/team\"", "Zq9secret"),
            (
                "url = \"s3://team-bucket/v1\"\nendpoint = \"https://K:s/e@s3.example\"",
                "s/e",
            ),
            (
                "url = \"s3://team-bucket/v1\"\n[[storage.mirror]]\nurl = \"nbds://u:hunter2@h/x\"",
                "hunter2",
            ),
        ] {
            let e = with(storage).unwrap_err().to_string();
            assert!(e.contains("carries a login") && !e.contains(secret), "{e}");
        }
    }

    #[test]
    fn only_loopback_or_a_unix_socket_is_accepted() {
        assert_eq!(
            parse_listen("127.0.0.1:9477"),
            Ok(MetricsAddr::Tcp("127.0.0.1:9477".parse().unwrap()))
        );
        assert!(parse_listen("[::1]:9477").is_ok());
        assert_eq!(
            parse_listen("unix:/run/coffre/team.metrics"),
            Ok(MetricsAddr::Unix("/run/coffre/team.metrics".into()))
        );
        assert!(
            parse_listen("0.0.0.0:9477")
                .unwrap_err()
                .contains("loopback")
        );
        assert!(parse_listen("unix:relative").is_err());
        assert!(parse_listen("localhost").is_err());
        let names_on = |listen: &str| MetricsConfig {
            listen: listen.into(),
            member_names: true,
        };
        assert!(
            names_on("127.0.0.1:9477")
                .addr()
                .unwrap_err()
                .contains("unix socket")
        );
        assert!(names_on("unix:/run/coffre/t/metrics.sock").addr().is_ok());
    }

    #[test]
    fn a_config_written_by_init_still_loads() {
        let c = load(WRITTEN_BY_INIT).unwrap();
        assert_eq!(c.keyslot_kdf.pbkdf, Pbkdf::Argon2id);
        assert_eq!(
            c.keyslot_kdf.params(),
            coffre_luks2::kdf::KdfParams::Argon2id {
                time: 4,
                memory_kib: 1_048_576,
                lanes: 4
            }
        );
        let g = c.gateway.unwrap();
        assert_eq!(g.proto, crate::openvpn::Proto::Udp);
        g.check().unwrap();
        // What init writes today is that same text, but for the
        // pre-accounts keys (an empty `[data.members]`, `team_gid = 0`),
        // no longer written, and `[accounts]` with its defaults.
        let mut again: Config = toml::from_str(WRITTEN_BY_INIT).unwrap();
        again.gateway = Some(GatewayConfig::new("vpn.example.org".into()));
        let expected = WRITTEN_BY_INIT
            .replace("team_gid = 0\n", "")
            .replace("\n[data.members]\n", "")
            .replace(
                "\n[gateway]",
                "\n[accounts]\nfirst_id = 65536\nlast_id = 99999\nhome = \"/home\"\nshell = \"/bin/sh\"\n\n[gateway]",
            );
        assert_eq!(toml::to_string_pretty(&again).unwrap(), expected);
    }

    #[test]
    fn a_relayed_gateway_needs_the_bus_and_a_relay_name() {
        let relayed = WRITTEN_BY_INIT.replace("\n[gateway]\n", "\n[gateway]\nvia = \"bus\"\n");
        let e = load(&relayed).unwrap_err().to_string();
        assert!(e.contains("[bus]"), "{e}");
        let bus = "\n[bus]\nurl = \"amqps://10.0.0.5:5671\"\n";
        let e = load(&format!("{relayed}{bus}")).unwrap_err().to_string();
        assert!(e.contains("relay = NAME"), "{e}");
        let named = relayed.replace("via = \"bus\"\n", "via = \"bus\"\nrelay = \"gw1\"\n");
        let with_bus = format!("{named}{bus}");
        let g = load(&with_bus).unwrap().gateway.unwrap();
        assert_eq!((g.via, g.relay.as_deref()), (GatewayVia::Bus, Some("gw1")));
        let odd = with_bus.replace("via = \"bus\"", "via = \"carrier-pigeon\"");
        assert!(load(&odd).is_err());
    }

    #[test]
    fn pbkdf2_and_tcp_load_and_a_missing_proto_is_udp() {
        let text = WRITTEN_BY_INIT
            .replace(
                "pbkdf = \"argon2id\"\niterations = 4\nmemory_kib = 1048576\nlanes = 4\n",
                "pbkdf = \"pbkdf2\"\niterations = 1000\n",
            )
            .replace("proto = \"udp\"", "proto = \"tcp\"");
        let c = load(&text).unwrap();
        assert!(matches!(
            c.keyslot_kdf.params(),
            coffre_luks2::kdf::KdfParams::Pbkdf2 {
                iterations: 1000,
                ..
            }
        ));
        assert_eq!(c.gateway.unwrap().proto, crate::openvpn::Proto::Tcp);
        let c = load(&WRITTEN_BY_INIT.replace("proto = \"udp\"\n", "")).unwrap();
        assert_eq!(c.gateway.unwrap().proto, crate::openvpn::Proto::Udp);
    }

    #[test]
    fn a_typo_in_pbkdf_or_proto_fails_at_load_naming_the_choices() {
        // Before: "argon2" became argon2id (and "pbkdf-2" too), with
        // whatever memory the file said, 0 if none.
        let e = load(&WRITTEN_BY_INIT.replace("\"argon2id\"", "\"argon2\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("argon2") && e.contains("argon2id") && e.contains("pbkdf2"),
            "{e}"
        );
        let e = load(&WRITTEN_BY_INIT.replace("\"udp\"", "\"UDP\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("UDP") && e.contains("`udp`") && e.contains("`tcp`"),
            "{e}"
        );
    }
}

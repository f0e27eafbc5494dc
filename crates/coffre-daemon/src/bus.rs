//! The bus on the vault's host (docs/bus.md): the broker's configuration
//! (`coffre bus broker-config`), the components' identities (`coffre bus
//! identity`), and the daemon's publisher of events.
//!
//! The publisher reads the audit log itself, from the last record the
//! broker confirmed: while the broker is down or slow, events wait in the
//! log (never in memory, never dropped), and the publisher catches up when
//! it is back. The number of the last confirmed record is kept in
//! `DIR/bus/published`, so a restart publishes only what the broker has
//! not confirmed (a witness recognises what it already holds).

use crate::pki::{self, PkiError};
use crate::vaultdir::{DirError, VaultDir, write_atomic};
use coffre_audit::{Entry, HeadWatch, LOG_FILE};
use coffre_bus::{
    BusError, EVENTS, Event, Identity, Role, VHOST, command, common_name, relay, witness_queue,
};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `[bus]` in config.toml: the broker the daemon publishes to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// `amqps://HOST:PORT`.
    pub url: String,
}

/// Bus set-up errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusSetupError {
    /// What was asked cannot be done.
    #[error("{0}")]
    Invalid(String),
    /// The vault directory.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The bus itself.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The daemon's own component name on the bus.
pub const VAULT_COMPONENT: &str = "vault";
/// How many messages a witness's queue keeps while its witness is away
/// (beyond, the oldest go and the witness reports a gap).
pub const WITNESS_QUEUE_MAX: u64 = 1_000_000;

/// Commands (and dead letters) the broker keeps at most.
pub const COMMAND_QUEUE_MAX: u64 = 10_000;
/// How long a reply waits for its scheduler, milliseconds.
pub const REPLY_TTL_MS: u64 = 3_600_000;

/// One component the broker knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Its name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Its certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    /// Its certificate's public key (P-256 point, hex): what its signed
    /// envelopes verify with.
    #[serde(default)]
    pub public_key: String,
    /// A gateway: its X25519 public key (hex), what the vault seals
    /// commands to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub seal_public: String,
    /// A scheduler: the members it may add tasks for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// A scheduler: the longest task it may add, seconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub longest_s: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a scheduler may do: add tasks for these members, this long at most.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rights {
    /// The members it acts for.
    pub members: Vec<String>,
    /// The longest task, seconds.
    pub longest_s: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Components {
    components: Vec<Component>,
}

fn bus_dir(vd: &VaultDir) -> PathBuf {
    vd.root.join("bus")
}

fn load_components(vd: &VaultDir) -> Result<Components, BusSetupError> {
    let path = bus_dir(vd).join("components.json");
    if !path.exists() {
        return Ok(Components::default());
    }
    let text = vd.read(&path)?;
    serde_json::from_str(&text)
        .map_err(|e| BusSetupError::Invalid(format!("{}: {e}", path.display())))
}

fn save_components(vd: &VaultDir, c: &Components) -> Result<(), BusSetupError> {
    let dir = bus_dir(vd);
    make_private_dir(&dir)?;
    let text = serde_json::to_vec_pretty(c).expect("components serialise");
    write_atomic(&dir.join("components.json"), &text, 0o600)?;
    Ok(())
}

fn make_private_dir(dir: &Path) -> Result<(), BusSetupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| BusSetupError::Invalid(format!("{}: {e}", dir.display())))
}

/// The components the broker must know (the vault first).
pub fn components(vd: &VaultDir) -> Result<Vec<Component>, BusSetupError> {
    Ok(load_components(vd)?.components)
}

/// Issues `name`'s identity with `role` (a new key and certificate from
/// the vault's CA) and records the component, for the broker's next
/// configuration. Issuing again for a known name replaces its certificate.
pub fn issue_identity(
    vd: &VaultDir,
    name: &str,
    role: Role,
    rights: Rights,
    broker: Option<String>,
) -> Result<Identity, BusSetupError> {
    match (role, rights.members.is_empty()) {
        (Role::Scheduler, true) => {
            return Err(BusSetupError::Invalid(
                "a scheduler acts for members: name them (--for alice,bob)".into(),
            ));
        }
        (Role::Scheduler, false) if rights.longest_s == 0 => {
            return Err(BusSetupError::Invalid(
                "a scheduler's tasks need a longest duration (--longest)".into(),
            ));
        }
        (Role::Scheduler, false) => {}
        (_, false) => {
            return Err(BusSetupError::Invalid(
                "only a scheduler acts for members".into(),
            ));
        }
        (_, true) => {}
    }
    for m in &rights.members {
        crate::init::check_member_name(m).map_err(BusSetupError::Invalid)?;
    }
    coffre_bus::check_component_name(name).map_err(BusSetupError::Invalid)?;
    if name == VAULT_COMPONENT {
        return Err(BusSetupError::Invalid(format!(
            "{name:?} is the vault daemon's own name on the bus"
        )));
    }
    if role == Role::Vault {
        return Err(BusSetupError::Invalid(
            "only the vault daemon has the vault role".into(),
        ));
    }
    if let Some(url) = &broker {
        coffre_bus::conn::parse_url(url)?;
    }
    let config = vd.load_config()?;
    let ca_key = zeroize::Zeroizing::new(vd.read(&vd.ca_key())?);
    let issued = pki::new_component_cert(&config.name, &ca_key, &common_name(name))?;
    let public_key = coffre_bus::envelope::Signer::from_pem(&issued.key_pem)?.public_hex();
    let keys = VaultKeys::load_or_create(vd)?;
    // A gateway gets a sealing key of its own: the vault's commands to it
    // are for it alone.
    let (seal_key, seal_public) = if role == Role::Gateway {
        let private = coffre_bus::envelope::Opener::generate_hex();
        let public = coffre_bus::envelope::Opener::from_hex(&private)?.public_hex();
        (private.to_string(), public)
    } else {
        (String::new(), String::new())
    };
    let mut all = load_components(vd)?;
    all.components.retain(|c| c.name != name);
    all.components.push(Component {
        name: name.to_string(),
        role,
        fingerprint: issued.fingerprint.clone(),
        public_key,
        seal_public,
        members: rights.members,
        longest_s: rights.longest_s,
    });
    save_components(vd, &all)?;
    Ok(Identity {
        v: 1,
        vault: config.name,
        name: name.to_string(),
        role,
        ca_pem: vd.read(&vd.ca_cert())?,
        cert_pem: issued.cert_pem.clone(),
        key_pem: (*issued.key_pem).clone(),
        audit_key: audit_key(vd)?,
        vault_sign_key: keys.signer.public_hex(),
        vault_seal_key: keys.opener.public_hex(),
        seal_key,
        broker,
    })
}

/// The vault's own keys on the bus: what signs its envelopes
/// (`DIR/bus/sign.key`, ECDSA P-256) and what components seal secrets to
/// (`DIR/bus/seal.key`, X25519). Both root's alone (0600), made on first
/// need, kept across certificate renewals (identity files carry their
/// public halves).
#[derive(Debug)]
pub struct VaultKeys {
    /// Signs the vault's envelopes.
    pub signer: coffre_bus::envelope::Signer,
    /// Opens what components sealed to the vault.
    pub opener: coffre_bus::envelope::Opener,
}

impl VaultKeys {
    /// Reads the keys, making any that is missing (when an identity is
    /// issued, or the broker configured).
    pub fn load_or_create(vd: &VaultDir) -> Result<Self, BusSetupError> {
        use coffre_bus::envelope::{Opener, Signer};
        let dir = bus_dir(vd);
        make_private_dir(&dir)?;
        create_new_key(&dir.join("sign.key"), Signer::generate_pem().as_bytes())?;
        create_new_key(&dir.join("seal.key"), Opener::generate_hex().as_bytes())?;
        Self::load(vd)
    }

    /// Reads the keys; never makes them (the daemon: new keys would
    /// orphan every identity already issued).
    pub fn load(vd: &VaultDir) -> Result<Self, BusSetupError> {
        use coffre_bus::envelope::{Opener, Signer};
        let dir = bus_dir(vd);
        let (sign, seal) = (dir.join("sign.key"), dir.join("seal.key"));
        for p in [&sign, &seal] {
            if !p.exists() {
                return Err(BusSetupError::Invalid(format!(
                    "{} is missing: the vault's bus keys are made by `coffre bus broker-config` or `coffre bus identity` (restored from a backup without it? the identities issued before need it)",
                    p.display()
                )));
            }
        }
        let text = zeroize::Zeroizing::new(vd.read(&sign)?);
        let signer = Signer::from_pem(&text)?;
        let text = zeroize::Zeroizing::new(vd.read(&seal)?);
        let opener = Opener::from_hex(&text)?;
        Ok(Self { signer, opener })
    }
}

/// Writes a key file that does not exist yet (0600, created exclusively:
/// two runs at once never leave one's key under the other's identities).
fn create_new_key(path: &Path, bytes: &[u8]) -> Result<(), BusSetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |e: std::io::Error| BusSetupError::Invalid(format!("{}: {e}", path.display()));
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(bad(e)),
    };
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(bad)
}

/// Forgets component `name`: the broker refuses it from its next
/// configuration. Returns whether it was known.
pub fn forget_component(vd: &VaultDir, name: &str) -> Result<bool, BusSetupError> {
    let mut all = load_components(vd)?;
    let before = all.components.len();
    all.components.retain(|c| c.name != name);
    let known = all.components.len() != before;
    if known {
        save_components(vd, &all)?;
    }
    Ok(known)
}

fn audit_key(vd: &VaultDir) -> Result<String, BusSetupError> {
    let key = coffre_audit::HostKey::load_or_create(&vd.host_key())
        .map_err(|e| BusSetupError::Invalid(e.to_string()))?;
    Ok(key.public_hex())
}

/// The daemon's identity on the bus (`DIR/bus/vault.pem` and `.key`,
/// written by `coffre bus broker-config`).
pub fn daemon_identity(vd: &VaultDir, broker: &str) -> Result<Identity, BusSetupError> {
    let dir = bus_dir(vd);
    let cert = dir.join("vault.pem");
    if !cert.exists() {
        return Err(BusSetupError::Invalid(format!(
            "{} is missing: run `coffre bus broker-config {} --listen HOST:PORT --out DIR`",
            cert.display(),
            vd.root.display()
        )));
    }
    let config = vd.load_config()?;
    Ok(Identity {
        v: 1,
        vault: config.name,
        name: VAULT_COMPONENT.into(),
        role: Role::Vault,
        ca_pem: vd.read(&vd.ca_cert())?,
        cert_pem: vd.read(&cert)?,
        key_pem: vd.read(&dir.join("vault.key"))?,
        audit_key: audit_key(vd)?,
        vault_sign_key: String::new(),
        vault_seal_key: String::new(),
        seal_key: String::new(),
        broker: Some(broker.to_string()),
    })
}

/// What `coffre bus broker-config` wrote.
#[derive(Debug)]
pub struct BrokerReport {
    /// The directory.
    pub out: PathBuf,
    /// The script that starts the broker.
    pub run: PathBuf,
    /// The address components connect to.
    pub url: String,
    /// The users the broker knows.
    pub users: Vec<String>,
}

/// Splits `HOST:PORT` (an IPv4 address or a name).
fn split_listen(listen: &str) -> Result<(String, u16), BusSetupError> {
    let bad = || {
        BusSetupError::Invalid(format!(
            "--listen {listen:?}: expected HOST:PORT, such as 10.0.0.5:5671"
        ))
    };
    if let Ok(sa) = listen.parse::<std::net::SocketAddr>() {
        if sa.is_ipv6() {
            // The AMQP address parser turns an IPv6 host into "localhost".
            return Err(BusSetupError::Invalid(format!(
                "--listen {listen:?}: IPv6 addresses are not supported yet; use an IPv4 address or a host name"
            )));
        }
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !ok || port == 0 {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Writes the broker's configuration for this vault into `out`, issues
/// the broker's certificate for `listen`'s host, the daemon's own bus
/// certificate (kept if it exists), and sets `[bus] url` in config.toml.
pub fn write_broker_config(
    vd: &VaultDir,
    listen: &str,
    out: &Path,
) -> Result<BrokerReport, BusSetupError> {
    let (host, port) = split_listen(listen)?;
    let ip = host.parse::<std::net::IpAddr>().ok();
    let url = match ip {
        Some(std::net::IpAddr::V6(v6)) => format!("amqps://[{v6}]:{port}"),
        _ => format!("amqps://{host}:{port}"),
    };
    let config = vd.load_config()?;
    let ca_key = zeroize::Zeroizing::new(vd.read(&vd.ca_key())?);
    let ca_pem = vd.read(&vd.ca_cert())?;

    // The daemon's own certificate, kept across runs.
    let dir = bus_dir(vd);
    make_private_dir(&dir)?;
    let vault_cert = dir.join("vault.pem");
    let near_end = std::fs::read_to_string(&vault_cert)
        .ok()
        .and_then(|pem| pki::pem_not_after(&pem))
        .is_none_or(|(end, _)| {
            end - time::OffsetDateTime::now_utc().unix_timestamp()
                < pki::EXPIRY_WARNING_DAYS * 86_400
        });
    if near_end {
        let issued = pki::new_component_cert(&config.name, &ca_key, &common_name(VAULT_COMPONENT))?;
        write_atomic(&dir.join("vault.key"), issued.key_pem.as_bytes(), 0o600)?;
        write_atomic(&vault_cert, issued.cert_pem.as_bytes(), 0o600)?;
    }
    // The daemon signs and opens with these (made once, kept).
    VaultKeys::load_or_create(vd)?;
    let broker = pki::new_broker_cert(&config.name, &ca_key, &host)?;

    // The broker's user must reach the directory; its key is the only
    // secret in it (0600, or 0640 to the broker's group once `run` ran).
    if !out.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(out)
            .and_then(|()| std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| BusSetupError::Invalid(format!("{}: {e}", out.display())))?;
    }
    let out = std::fs::canonicalize(out)
        .map_err(|e| BusSetupError::Invalid(format!("{}: {e}", out.display())))?;
    write_atomic(&out.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    write_atomic(&out.join("broker.pem"), broker.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&out.join("broker.key"), broker.key_pem.as_bytes(), 0o600)?;
    let listener = match ip {
        Some(std::net::IpAddr::V6(v6)) => format!("listeners.ssl.1 = [{v6}]:{port}"),
        Some(v4) => format!("listeners.ssl.1 = {v4}:{port}"),
        // A name: listen on every address of the host, on that port.
        None => format!("listeners.ssl.default = {port}"),
    };
    write_atomic(
        &out.join("rabbitmq.conf.in"),
        rabbitmq_conf(&listener).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &out.join("enabled_plugins"),
        b"[rabbitmq_auth_mechanism_ssl].\n",
        0o644,
    )?;
    let comps = load_components(vd)?.components;
    let defs = definitions(&comps);
    write_atomic(
        &out.join("definitions.json"),
        &serde_json::to_vec_pretty(&defs).expect("definitions serialise"),
        0o644,
    )?;
    let run = out.join("run");
    write_atomic(&run, run_script(&config.name).as_bytes(), 0o755)?;
    set_bus_section(vd, &url)?;
    let mut users = vec![common_name(VAULT_COMPONENT)];
    users.extend(comps.iter().map(|c| common_name(&c.name)));
    Ok(BrokerReport {
        out,
        run,
        url,
        users,
    })
}

fn rabbitmq_conf(listener: &str) -> String {
    format!(
        "# RabbitMQ for a coffre vault (written by `coffre bus broker-config`).\n\
         # `run` makes rabbitmq.conf from this file with @DIR@ set to its directory.\n\
         # TLS 1.3 only, a certificate from the vault's CA required, and the\n\
         # certificate's common name as the login (no passwords at all).\n\
         listeners.tcp = none\n\
         {listener}\n\
         ssl_options.cacertfile = @DIR@/ca.pem\n\
         ssl_options.certfile = @DIR@/broker.pem\n\
         ssl_options.keyfile = @DIR@/broker.key\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n\
         ssl_options.depth = 1\n\
         ssl_options.versions.1 = tlsv1.3\n\
         auth_mechanisms.1 = EXTERNAL\n\
         ssl_cert_login_from = common_name\n\
         load_definitions = @DIR@/definitions.json\n\
         # Nothing larger than an envelope: a component cannot make the\n\
         # vault's AMQP client (which reads a message whole) hold more.\n\
         max_message_size = {max}\n\
         management_agent.disable_metrics_collector = true\n\
         log.console = true\n\
         log.console.level = info\n\
         log.file = false\n",
        max = coffre_bus::envelope::MAX_ENVELOPE
    )
}

fn run_script(vault: &str) -> String {
    format!(
        r#"#!/bin/sh
# Starts RabbitMQ for the coffre vault "{vault}" in the foreground, from this
# directory alone (its data in ./mnesia). Environment you may set:
#   RABBITMQ_NODENAME (default coffre@localhost), RABBITMQ_DIST_PORT,
#   ERL_EPMD_PORT (the Erlang port mapper; stop it after the broker),
#   RABBITMQ_SERVER (default /usr/lib/rabbitmq/bin/rabbitmq-server).
# As root, it runs the broker as the rabbitmq user.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
umask 022
# Made anew, never through a link someone left in its place.
rm -f "$here/rabbitmq.conf"
sed -e "s|@DIR@|$here|g" "$here/rabbitmq.conf.in" > "$here/rabbitmq.conf"
mkdir -p "$here/mnesia" "$here/log" "$here/home"
export RABBITMQ_CONFIG_FILE="$here/rabbitmq.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$here/enabled_plugins"
export RABBITMQ_MNESIA_BASE="$here/mnesia"
export RABBITMQ_LOG_BASE="$here/log"
export RABBITMQ_NODENAME="${{RABBITMQ_NODENAME:-coffre@localhost}}"
export RABBITMQ_PID_FILE="$here/rabbitmq.pid"
export HOME="$here/home"
server="${{RABBITMQ_SERVER:-/usr/lib/rabbitmq/bin/rabbitmq-server}}"
if [ ! -x "$server" ]; then
    server=$(command -v rabbitmq-server || true)
    [ -n "$server" ] || {{ echo "run: rabbitmq-server is not installed" >&2; exit 1; }}
fi
if [ "$(id -u)" = 0 ]; then
    if ! id rabbitmq >/dev/null 2>&1; then
        echo "run: no rabbitmq user to run the broker as (install rabbitmq-server); not running it as root" >&2
        exit 1
    fi
    # Root keeps this directory and its files (this script among them);
    # the broker's user gets its data, and reads its key through its group.
    chown -R rabbitmq:rabbitmq "$here/mnesia" "$here/log" "$here/home"
    chown root:rabbitmq "$here/broker.key"
    chmod 0640 "$here/broker.key"
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- "$server"
fi
exec "$server"
"#
    )
}

/// The broker's definitions: the vault's virtual host, one user per
/// component (no password: EXTERNAL only), what each may do, the events
/// exchange, and one queue per monitor for its witness.
fn definitions(comps: &[Component]) -> serde_json::Value {
    use serde_json::json;
    let esc = |s: &str| s.replace('.', "\\.");
    let vault = common_name(VAULT_COMPONENT);
    let mut users = vec![json!({"name": vault, "password_hash": "", "tags": []})];
    let gw_q = esc(relay::VAULT_QUEUE);
    let gw_x = esc(relay::GATEWAY);
    // The vault publishes events and relay commands, and reads relays'
    // messages from a queue it declares for its connection's life.
    let cmd_x = esc(command::COMMANDS);
    let cmd_q = esc(command::VAULT_QUEUE);
    let mut permissions = vec![json!({
        "user": vault, "vhost": VHOST,
        "configure": format!("^{gw_q}$"),
        "write": format!("^({}|{gw_x}|{gw_q}|{cmd_x})$", esc(EVENTS)),
        "read": format!("^({gw_x}|{gw_q}|{cmd_q})$"),
    })];
    let mut topic_permissions = vec![
        json!({
            "user": vault, "vhost": VHOST, "exchange": EVENTS,
            "write": "^audit\\.", "read": "^$"
        }),
        json!({
            "user": vault, "vhost": VHOST, "exchange": relay::GATEWAY,
            "write": "^relay\\.", "read": "^vault\\."
        }),
        json!({
            "user": vault, "vhost": VHOST, "exchange": command::COMMANDS,
            "write": "^reply\\.", "read": "^$"
        }),
    ];
    // Commands wait in a durable queue until the vault applied them;
    // what it refuses goes to the dead letters.
    let mut queues = vec![
        json!({
            "name": command::VAULT_QUEUE, "vhost": VHOST, "durable": true, "auto_delete": false,
            "arguments": {
                "x-dead-letter-exchange": command::DEAD,
                "x-max-length": COMMAND_QUEUE_MAX, "x-overflow": "reject-publish"
            }
        }),
        json!({
            "name": command::DEAD_QUEUE, "vhost": VHOST, "durable": true, "auto_delete": false,
            "arguments": {"x-max-length": COMMAND_QUEUE_MAX, "x-overflow": "drop-head"}
        }),
    ];
    let mut bindings = vec![
        json!({
            "source": command::COMMANDS, "vhost": VHOST, "destination": command::VAULT_QUEUE,
            "destination_type": "queue", "routing_key": command::TO_VAULT, "arguments": {}
        }),
        json!({
            "source": command::DEAD, "vhost": VHOST, "destination": command::DEAD_QUEUE,
            "destination_type": "queue", "routing_key": "", "arguments": {}
        }),
    ];
    for c in comps {
        let user = common_name(&c.name);
        users.push(json!({"name": user, "password_hash": "", "tags": []}));
        if c.role == Role::Gateway {
            // Its own queue (for its connection's life), messages to the
            // vault only.
            let q = esc(&relay::relay_queue(&c.name));
            permissions.push(json!({
                "user": user, "vhost": VHOST,
                "configure": format!("^{q}$"),
                "write": format!("^({gw_x}|{q})$"),
                "read": format!("^({gw_x}|{q})$"),
            }));
            topic_permissions.push(json!({
                "user": user, "vhost": VHOST, "exchange": relay::GATEWAY,
                "write": format!("^{}$", esc(&relay::to_vault(&c.name))),
                "read": format!("^{}$", esc(&relay::to_relay(&c.name))),
            }));
        }
        if c.role == Role::Scheduler {
            // Commands to the vault; its own replies, nothing else.
            let q = command::reply_queue(&c.name);
            permissions.push(json!({
                "user": user, "vhost": VHOST,
                "configure": "^$",
                "write": format!("^{cmd_x}$"),
                "read": format!("^{}$", esc(&q)),
            }));
            topic_permissions.push(json!({
                "user": user, "vhost": VHOST, "exchange": command::COMMANDS,
                "write": format!("^{}$", command::TO_VAULT), "read": "^$"
            }));
            queues.push(json!({
                "name": q, "vhost": VHOST, "durable": true, "auto_delete": false,
                "arguments": {"x-message-ttl": REPLY_TTL_MS, "x-max-length": 1000, "x-overflow": "drop-head"}
            }));
            bindings.push(json!({
                "source": command::COMMANDS, "vhost": VHOST, "destination": q,
                "destination_type": "queue", "routing_key": command::to_reply(&c.name), "arguments": {}
            }));
        }
        if c.role == Role::Monitor {
            let q = witness_queue(&c.name);
            permissions.push(json!({
                "user": user, "vhost": VHOST,
                "configure": "^amq\\.gen-.*$",
                "write": format!("^(amq\\.gen-.*|{})$", esc(EVENTS)),
                "read": format!("^(amq\\.gen-.*|{}|{})$", esc(EVENTS), esc(&q)),
            }));
            topic_permissions.push(json!({
                "user": user, "vhost": VHOST, "exchange": EVENTS,
                "write": "^witness\\.", "read": ".*"
            }));
            queues.push(json!({
                "name": q, "vhost": VHOST, "durable": true, "auto_delete": false,
                "arguments": {"x-max-length": WITNESS_QUEUE_MAX, "x-overflow": "drop-head"}
            }));
            bindings.push(json!({
                "source": EVENTS, "vhost": VHOST, "destination": q,
                "destination_type": "queue", "routing_key": "audit.#", "arguments": {}
            }));
        }
    }
    json!({
        "users": users,
        "vhosts": [{"name": VHOST}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "exchanges": [
            {
                "name": EVENTS, "vhost": VHOST, "type": "topic",
                "durable": true, "auto_delete": false, "internal": false, "arguments": {}
            },
            {
                "name": relay::GATEWAY, "vhost": VHOST, "type": "topic",
                "durable": true, "auto_delete": false, "internal": false, "arguments": {}
            },
            {
                "name": command::COMMANDS, "vhost": VHOST, "type": "topic",
                "durable": true, "auto_delete": false, "internal": false, "arguments": {}
            },
            {
                "name": command::DEAD, "vhost": VHOST, "type": "fanout",
                "durable": true, "auto_delete": false, "internal": true, "arguments": {}
            }
        ],
        "queues": queues,
        "bindings": bindings,
    })
}

/// Replaces `[bus]` in config.toml, leaving the rest as written.
fn set_bus_section(vd: &VaultDir, url: &str) -> Result<(), BusSetupError> {
    let path = vd.config();
    let text = vd.read(&path)?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| BusSetupError::Invalid(e.to_string()))?;
    let value = toml::Value::try_from(BusConfig {
        url: url.to_string(),
    })
    .map_err(|e| BusSetupError::Invalid(e.to_string()))?;
    table.insert("bus".into(), value);
    let out = toml::to_string_pretty(&table).map_err(|e| BusSetupError::Invalid(e.to_string()))?;
    write_atomic(&path, out.as_bytes(), 0o600)?;
    vd.load_config()?;
    Ok(())
}

/// How much of the log the publisher reads at once.
const READ_CHUNK: u64 = 1 << 20;

/// Where the publisher is in the audit log.
struct Cursor {
    /// The last record the broker confirmed.
    seq: u64,
    /// The byte offset just after it in `audit.log`.
    offset: u64,
}

fn published_file(dir: &Path) -> PathBuf {
    dir.join("bus").join("published")
}

impl Cursor {
    /// From `DIR/bus/published`, never beyond the log's head (a log cut
    /// back is published again from where it now ends: a witness then
    /// sees records it holds with another content).
    fn load(dir: &Path, head: u64) -> Self {
        let saved = std::fs::read_to_string(published_file(dir))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut c = Cursor { seq: 0, offset: 0 };
        c.seek(dir, saved.min(head));
        c
    }

    /// Finds the offset just after record `seq` by reading the log.
    fn seek(&mut self, dir: &Path, seq: u64) {
        self.seq = 0;
        self.offset = 0;
        if seq == 0 {
            return;
        }
        let Ok(bytes) = std::fs::read(dir.join(LOG_FILE)) else {
            return;
        };
        let mut off = 0u64;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            off += line.len() as u64;
            if let Ok(e) = serde_json::from_slice::<Entry>(line) {
                self.seq = e.seq;
                self.offset = off;
                if e.seq >= seq {
                    break;
                }
            }
        }
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        let p = published_file(dir);
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", self.seq))?;
        std::fs::rename(&tmp, &p)
    }

    /// The complete records after the cursor, with the offset after each.
    fn read_new(&mut self, dir: &Path) -> std::io::Result<Vec<(Entry, u64)>> {
        let mut f = std::fs::File::open(dir.join(LOG_FILE))?;
        let len = f.metadata()?.len();
        if len < self.offset {
            // The log is shorter than what was published: it was cut back.
            let seq = self.seq;
            self.seek(dir, seq);
            return Ok(Vec::new());
        }
        f.seek(SeekFrom::Start(self.offset))?;
        // A bounded piece at a time: after a long outage the log's tail
        // may be large, and the log is the only buffer.
        let mut bytes = Vec::new();
        let want = (len - self.offset).min(READ_CHUNK);
        f.take(want).read_to_end(&mut bytes)?;
        if want == READ_CHUNK && !bytes.contains(&b'\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "audit.log after record {}: a line longer than {READ_CHUNK} bytes",
                    self.seq
                ),
            ));
        }
        let mut out = Vec::new();
        let mut off = self.offset;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            off += line.len() as u64;
            let e: Entry = serde_json::from_slice(line).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("audit.log after record {}: {e}", self.seq),
                )
            })?;
            out.push((e, off));
        }
        Ok(out)
    }
}

/// What the publisher tells the vault (audited as `bus`).
pub type Report = Box<dyn Fn(&'static str, String) + Send + Sync>;

/// Publishes the vault's audit records to the broker at `url`, for ever:
/// reconnects with backoff (1 s doubling to 30 s), reports each change of
/// link once.
pub async fn publish(dir: PathBuf, id: Identity, url: String, head: HeadWatch, report: Report) {
    let mut cursor = Cursor::load(&dir, head.current().map_or(0, |h| h.seq));
    let mut backoff = coffre_bus::conn::Backoff::default();
    let mut down_reported = false;
    loop {
        let mut up = false;
        let why = match session(&dir, &id, &url, &head, &mut cursor, &report, &mut up).await {
            Ok(never) => match never {},
            Err(why) if why.starts_with("the broker at") => why,
            Err(why) => format!("the broker at {}: {why}", coffre_bus::conn::shown(&url)),
        };
        if up {
            // It was connected: this is a new outage.
            backoff.reset();
            down_reported = false;
        }
        if !down_reported {
            report(
                "failed",
                format!(
                    "{why}; events wait in the audit log from record {} and follow when it is back",
                    cursor.seq + 1
                ),
            );
            down_reported = true;
        }
        backoff.wait().await;
    }
}

async fn session(
    dir: &Path,
    id: &Identity,
    url: &str,
    head: &HeadWatch,
    cursor: &mut Cursor,
    report: &Report,
    up: &mut bool,
) -> Result<std::convert::Infallible, String> {
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = coffre_bus::connect(url, id)
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| coffre_bus::conn::describe(&e))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| coffre_bus::conn::describe(&e))?;
    // The link counts as up (and is audited as such) once a record was
    // confirmed or it held for a while: a broker that accepts the login
    // and then refuses every message must not fill the log with records.
    let since = std::time::Instant::now();
    let first = cursor.seq + 1;
    let announce = |up: &mut bool| {
        if !*up {
            *up = true;
            report(
                "ok",
                format!(
                    "connected to the broker at {}; publishing from record {first}",
                    coffre_bus::conn::shown(url)
                ),
            );
        }
    };
    let user = common_name(VAULT_COMPONENT);
    loop {
        if since.elapsed() > Duration::from_secs(30) {
            announce(up);
        }
        let top = head.current().map_or(0, |h| h.seq);
        if top < cursor.seq {
            // The log was cut back under a running daemon: start again
            // from its end (a witness will say what it saw).
            let seq = top;
            cursor.seek(dir, seq);
        }
        if top > cursor.seq {
            let batch = cursor.read_new(dir).map_err(|e| e.to_string())?;
            let mut confirms = Vec::with_capacity(batch.len());
            for (entry, off) in batch {
                if entry.seq > top {
                    break;
                }
                let seq = entry.seq;
                let ev = Event::audit(&id.vault, entry);
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_user_id(user.clone().into())
                    .with_app_id("coffre".into())
                    .with_message_id(format!("{}:{seq}", id.vault).into());
                let confirm = ch
                    .basic_publish(
                        EVENTS.into(),
                        ev.routing_key().into(),
                        BasicPublishOptions::default(),
                        &ev.to_bytes(),
                        props,
                    )
                    .await
                    .map_err(|e| coffre_bus::conn::describe(&e))?;
                confirms.push((seq, off, confirm));
            }
            for (seq, off, confirm) in confirms {
                let c = confirm.await.map_err(|e| coffre_bus::conn::describe(&e))?;
                if c.is_nack() {
                    return Err(format!("the broker refused record {seq}"));
                }
                cursor.seq = seq;
                cursor.offset = off;
            }
            cursor
                .save(dir)
                .map_err(|e| format!("{}: {e}", published_file(dir).display()))?;
            announce(up);
        }
        if !conn.status().connected() {
            return Err("the connection closed".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_checked() {
        assert_eq!(
            split_listen("10.0.0.5:5671").unwrap(),
            ("10.0.0.5".into(), 5671)
        );
        assert_eq!(
            split_listen("Broker.example.org:5671").unwrap(),
            ("broker.example.org".into(), 5671)
        );
        for bad in [
            "5671",
            "host:",
            "host:0",
            "a b:5671",
            ":5671",
            "h:99999",
            "[::1]:5671",
        ] {
            assert!(split_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_component_gets_only_its_rights() {
        let comps = vec![
            Component {
                name: "mon1".into(),
                role: Role::Monitor,
                fingerprint: "ab".into(),
                public_key: String::new(),
                seal_public: String::new(),
                members: vec![],
                longest_s: 0,
            },
            Component {
                name: "gw1".into(),
                role: Role::Gateway,
                fingerprint: "cd".into(),
                public_key: String::new(),
                seal_public: String::new(),
                members: vec![],
                longest_s: 0,
            },
        ];
        let d = definitions(&comps);
        let users: Vec<&str> = d["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            users,
            ["coffre-bus:vault", "coffre-bus:mon1", "coffre-bus:gw1"]
        );
        assert!(
            d["users"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| u["password_hash"] == "")
        );
        let perm = |u: &str| {
            d["permissions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["user"] == u)
                .unwrap()
                .clone()
        };
        // The vault writes events and reads only relays' messages and
        // commands; the monitor reads its own queue, never another's.
        assert_eq!(
            perm("coffre-bus:vault")["read"],
            "^(coffre\\.gateway|coffre\\.gateway\\.vault|coffre\\.cmd\\.vault)$"
        );
        let re = perm("coffre-bus:mon1")["read"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(re.contains("coffre\\.witness\\.mon1"), "{re}");
        assert!(!re.contains(".*|coffre\\.witness\\.") && !re.contains("witness\\..*"));
        let q = d["queues"]
            .as_array()
            .unwrap()
            .iter()
            .position(|q| q["name"] == "coffre.witness.mon1")
            .expect("the witness's queue");
        let b = d["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["destination"] == "coffre.witness.mon1")
            .unwrap();
        assert_eq!(b["routing_key"], "audit.#");
        assert!(q > 0, "after the commands' queues");
        // Refused commands go to the dead letters.
        assert_eq!(
            d["queues"][0]["arguments"]["x-dead-letter-exchange"],
            "coffre.dead"
        );
        // The relay reads its own queue and writes to the vault alone.
        let gw = perm("coffre-bus:gw1");
        assert_eq!(
            gw["read"],
            "^(coffre\\.gateway|coffre\\.gateway\\.relay\\.gw1)$"
        );
        let topic = d["topic_permissions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user"] == "coffre-bus:gw1")
            .unwrap();
        assert_eq!(topic["write"], "^vault\\.gw1$");
        assert_eq!(topic["read"], "^relay\\.gw1$");
    }
}

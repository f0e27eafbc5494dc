//! The vault's message bus: RabbitMQ between the vault and its parts on
//! other hosts (docs/bus.md).
//!
//! Only components log in to the broker, each with a certificate from the
//! vault's CA (RabbitMQ's EXTERNAL mechanism, the certificate's common
//! name as the user name); members keep using the door. The connector
//! here trusts the vault's CA alone (never the system's roots) and speaks
//! TLS 1.3 only.
//!
//! What travels today: the vault's audit records, each signed by the
//! host's audit key, published to the topic exchange [`EVENTS`] with
//! publisher confirms, from the audit log itself (so a broker down or slow
//! delays events and never loses one). [`chain::Witness`] is what an
//! off-host witness keeps of them, and how it tells a gap, a rollback or a
//! forgery from the continuation it expects.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chain;
pub mod command;
pub mod conn;
pub mod envelope;
pub mod event;
pub mod identity;
pub mod relay;

pub use conn::{EVENTS, VHOST, connect};
pub use event::Event;
pub use identity::{Identity, Role};

/// Bus errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// An identity file that cannot be used.
    #[error("bus identity {path}: {why}")]
    Identity {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A broker address that cannot be used.
    #[error("bus address {url:?}: {why}")]
    Url {
        /// The address as given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// TLS set-up.
    #[error("bus TLS: {0}")]
    Tls(String),
    /// The broker refused us or went away.
    #[error("the broker at {url}: {why}")]
    Broker {
        /// Where.
        url: String,
        /// What it said.
        why: String,
    },
    /// A message that is not an event of ours.
    #[error("bad event: {0}")]
    BadEvent(String),
    /// File trouble (the witness's store).
    #[error("{what} {path}: {source}")]
    Io {
        /// What we did.
        what: &'static str,
        /// Which file.
        path: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// The common name (and so the RabbitMQ user name) of component `name`.
/// Members' names cannot contain `:`, so no member's certificate can log
/// in as a component.
pub fn common_name(name: &str) -> String {
    format!("coffre-bus:{name}")
}

/// Component names: as members' (1 to 32 of a-z 0-9 - _ . starting with a
/// letter or digit); `vault` is the daemon's own.
pub fn check_component_name(name: &str) -> Result<(), String> {
    coffre_vault::check_name("component", name)
}

/// The durable queue a monitor's witness reads (declared by the broker's
/// definitions, bound to every event).
pub fn witness_queue(name: &str) -> String {
    format!("coffre.witness.{name}")
}

//! The vault's own network: the addresses config.toml names, the names of
//! the host's links, the firewall (one nftables table the vault owns,
//! written as JSON and replaced atomically) and the host's side of the
//! links (routed taps and veths, network namespaces).
//!
//! Nothing here holds a key or parses bytes from guests: the DHCP server
//! that does runs in its own unprivileged process (`coffre-dhcp`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod host;
pub mod names;
pub mod ruleset;

pub use addr::{Egress, Port, Proto, Subnet};
pub use host::Host;
pub use ruleset::{Endpoint, LDAP_PORTS, NFS_PORTS, Policy, Vpn};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A value in the configuration.
    #[error("{0}")]
    Config(String),
    /// `nft`, `ip` or a kernel setting refused.
    #[error("{what}: {msg}")]
    Tool {
        /// What was run.
        what: String,
        /// What it said.
        msg: String,
    },
}

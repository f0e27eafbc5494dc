//! The vault daemon (`coffre serve`) and its adapters: the mutual-TLS JSON
//! API and its client, the vault's PKI, TOTP, the vault directory and its
//! crash-safe control data, and `coffre init`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use coffre_api::command as api;
pub use coffre_api::{client, tls, totp};
pub mod bus;
pub mod buscmd;
pub mod doctor;
pub mod gateway;
pub mod init;
pub mod log;
pub mod relay;
pub mod remote;
pub mod renew;
pub mod sd_notify;
pub mod server;
pub mod vaultdir;
pub mod witness;

/// The OpenVPN management codec, credentials and configuration files (the
/// `coffre-openvpn` crate), kept at its old path `coffre_daemon::openvpn`.
pub use coffre_openvpn as openvpn;
pub use coffre_pki as pki;
pub use coffre_workload as workload;

//! The vault's API as both ends see it, and what a member's machine needs
//! to use it: the JSON [`command`]s a client sends (over HTTPS now, a
//! message bus later), the [`ErrorCode`]s of the daemon's refusals (which
//! the client turns into its exit codes), the member's [`identity`] file,
//! the mutual-TLS settings ([`tls`]), the HTTPS [`client`] and [`totp`]. One definition for both ends, so that a code one side
//! sends and the other does not know is a compile error in this
//! workspace, and an explicit [`ErrorCode::Unknown`] across versions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod command;
mod error;
pub mod identity;
pub mod tls;
pub mod totp;
pub mod verifier;

pub use command::{ApiCommand, ApiSecret};
pub use error::ErrorCode;
pub use identity::{Identity, IdentityError};

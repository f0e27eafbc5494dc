//! The vault's API as both ends see it: the JSON [`command`]s a member's
//! client sends (over HTTPS now, a message bus later) and the
//! [`ErrorCode`]s of the daemon's refusals, which the client turns into
//! its exit codes. One definition for both ends, so that a code one side
//! sends and the other does not know is a compile error in this
//! workspace, and an explicit [`ErrorCode::Unknown`] across versions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod command;
mod error;

pub use command::{ApiCommand, ApiSecret};
pub use error::ErrorCode;

//! The vault core: every rule of the strongroom, with no I/O.
//!
//! [`Vault::handle`] takes an [`Event`] and the current time and returns the
//! [`Effect`]s the shell must carry out (derive a key, open or close the
//! volume, drop a connection, append an audit record, persist). Time comes
//! in as an argument and nothing here reads a clock, a file or a socket, so
//! a whole day of a vault runs in milliseconds under test.
//!
//! The rules (from the coffre-fort design):
//! - the vault is OPEN exactly while someone is inside (a member session or
//!   a scheduled task) and it is not locked; otherwise it is CLOSED and no
//!   volume key is held;
//! - every member who enters proves their keyslot opens the volume; the
//!   first one's key opens it;
//! - a lock drops everyone, cancels tasks, closes (the key is wiped even if
//!   a closing step fails) and refuses every enter until enough distinct
//!   superusers approve an unlock within a time window;
//! - failed attempts are throttled per member and per source, and too many
//!   in a window lock the vault;
//! - a TOTP time step is never accepted twice for a member.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
pub mod invitations;
mod machine;
mod model;
pub mod vpn;

pub use machine::Vault;
pub use model::*;

//! The vault's NFSv3 server for its VMs.
//!
//! VMs reach the team's files over NFS (the design's way of letting a
//! paused VM come back as if nothing happened: its server simply
//! returns). Each VM with a `share` is an export: one directory of the
//! data, reachable only from that VM's address on the vault network,
//! where every call is performed as the VM's `share_user`.
//!
//! - [`xdr`], [`rpc`], [`proto`]: our own codec of ONC RPC, NFSv3, MOUNT v3
//!   and the portmapper's GETPORT: pure, bounded, fuzzed.
//! - [`handle`]: file handles bound to an export and authenticated, that
//!   survive closes and restarts.
//! - [`fs`]: the operations, as the export's user.
//! - [`broker`]: the only part that opens files by handle, in a process
//!   of its own that holds the handle key; the server asks it.
//! - [`server`]: listeners, workers, the duplicate-request cache, the
//!   open/closed state (JUKEBOX while closed).
//! - [`control`]: the process the daemon starts and drives.

pub mod broker;
pub mod control;
pub mod fs;
pub mod handle;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod xdr;

pub use broker::{Client, Handles, Keeper};
pub use fs::ExportSpec;
pub use handle::HandleKey;
pub use server::{Listen, Server, Sockets};

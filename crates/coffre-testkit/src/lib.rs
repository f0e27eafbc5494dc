//! What coffre's tests share, used only as a dev-dependency:
//!
//! - [`require`] and [`Need`]: the one way to gate a system test (one that
//!   needs root, FUSE, loop devices, cryptsetup, OpenVPN, QEMU...). Such a
//!   test is marked `#[ignore = "system: needs ..."]`, so a plain
//!   `cargo test` lists it as ignored with the reason; run with
//!   `--include-ignored` (as `scripts/test` does), it calls [`require`]
//!   first, which fails the test, naming what is missing, never skips it.
//! - [`kdf`]: the cheap KDF costs for throw-away keyslots, as numbers and
//!   as command-line flags.
//! - [`volume`]: scratch LUKS2 volumes and temporary directories.
//! - [`process`]: running commands and asserting their success, waiting
//!   for children, signals, free ports, scanning a process's memory.
//! - [`slapd`]: a real OpenLDAP server on loopback, for the organisation's
//!   directory; [`moto`]: an S3 server on loopback, for remote storage;
//!   [`rabbitmq`]: a RabbitMQ broker on loopback, for the bus.

pub mod gate;
pub mod kdf;
pub mod moto;
pub mod nbdserver;
pub mod process;
pub mod rabbitmq;
pub mod s3sfs;
pub mod slapd;
pub mod tls;
pub mod volume;

pub use gate::{Need, require};
pub use process::{ok, run_ok};

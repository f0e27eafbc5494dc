//! Library side of the `coffre` binary: shared helpers its subcommands use
//! and its integration tests reach.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod exit;
pub mod size;

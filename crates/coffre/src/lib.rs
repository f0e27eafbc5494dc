//! Library side of the `coffre` binary: shared helpers its subcommands use
//! and its integration tests reach.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod exit;
pub mod size;

/// What `coffre dhcp-server` may use: a thread per VM link (a vault's
/// helpers have 1024 ids, so no more VMs than that), each with a stack of
/// 256 KiB (thread stacks count in `RLIMIT_DATA`), and little else.
pub const DHCP_LIMITS: coffre_sys::Limits = coffre_sys::Limits {
    processes: 1040,
    data_bytes: 512 << 20,
    open_files: 1100,
};

//! A whole NBD session from arbitrary client bytes (handshake, options,
//! requests) against an in-memory export: the server answers or hangs up,
//! never panics, and never touches bytes outside the export.
#![no_main]

use coffre_data::nbd::{MemCatalog, MemDisk, serve_connection};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let disk = Arc::new(MemDisk::new(64 * 1024));
    let mut catalog = MemCatalog::default();
    catalog.0.insert("disk".into(), disk.clone());
    let mut out = Vec::new();
    let _ = serve_connection(data, &mut out, &catalog);
    assert!(out.starts_with(b"NBDMAGICIHAVEOPT"));
    use coffre_data::nbd::Disk;
    assert_eq!(disk.size(), 64 * 1024);
});

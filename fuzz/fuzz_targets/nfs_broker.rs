//! The NFS handle broker's requests, as a server taken over may send
//! them: any bytes. Nothing may panic; what parses is exactly what the
//! encoder makes of it, and the broker's answer while closed is
//! JUKEBOX, with no descriptor. Replies (from the broker) are parsed by
//! the same rules.
#![no_main]

use coffre_nfs::broker::{self, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(r) = broker::parse_request(data) {
        assert_eq!(broker::encode_request(r.op, r.tag, r.bytes), data);
        assert!(r.op == Op::Open || r.bytes.is_empty());
        assert!(r.bytes.len() <= coffre_nfs::handle::MAX_FH);
    }
    if let Some((st, bytes)) = broker::parse_reply(data) {
        assert_eq!(broker::encode_reply(st, bytes), data);
    }
});

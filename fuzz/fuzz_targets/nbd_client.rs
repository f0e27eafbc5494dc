//! What an NBD server (the storage host, untrusted) could send our client:
//! the handshake's greeting and option replies, then replies to a read, a
//! write and a flush; what a block device could hold for the slot layout
//! (headers, the superblock, names); and a write journal as the host's
//! disk could hold it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = coffre_remote::nbd::fuzz_server(data);
    let _ = coffre_remote::blocks::fuzz_decode(data);
    coffre_remote::journal::fuzz_journal(data);
});

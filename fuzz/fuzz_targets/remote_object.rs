//! What an untrusted object store could hand back, through coffre-remote's
//! readers: a manifest, a page of the version table (with the listing the
//! manifest would give it), and the root line kept in the control
//! directory. Only objects this vault's integrity key made verify (the
//! seeds are made with the fixed fuzz key); whatever verifies must encode
//! back to the same bytes. The first byte chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coffre_remote::layout::fuzz_object(data);
});

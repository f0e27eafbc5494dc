//! File handles as a guest may send them: any bytes, decoded under a
//! fixed key for a fixed export. Nothing may panic; what decodes is
//! exactly what the key encodes, and a flipped bit never decodes.
#![no_main]

use coffre_nfs::handle::{self, HandleKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = HandleKey::new([9; 32]);
    let tag = handle::export_tag("desktop", "home/alice");
    if let Ok(fh) = handle::decode(&key, tag, data) {
        let again = handle::encode(&key, tag, &fh).expect("it fitted once");
        assert_eq!(again, data);
        let mut flipped = again.clone();
        let i = data.len() / 2;
        flipped[i] ^= 0x10;
        assert!(handle::decode(&key, tag, &flipped).is_err());
    }
    // A genuine handle with the fuzzer's bytes as the inner handle.
    if let Some(fh) = coffre_sys::handle::FileHandle::from_parts(1, data) {
        if let Some(h) = handle::encode(&key, tag, &fh) {
            assert!(h.len() <= handle::MAX_FH);
            assert_eq!(handle::decode(&key, tag, &h), Ok(fh));
            let other = handle::export_tag("desktop", "shared");
            assert!(handle::decode(&key, other, &h).is_err());
        }
    }
});

//! The JSON metadata alone (most of the parser's surface), with a
//! round trip: parse, serialise, parse gives the same.
#![no_main]

use coffre_luks2::metadata::Metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for hdr_size in [0x4000u64, 0x8000] {
        if let Ok(m) = Metadata::from_json(data, hdr_size) {
            let text = m.to_json().expect("serialises");
            let again = Metadata::from_json(&text, hdr_size).expect("round trip parses");
            assert_eq!(again, m);
            // Typed views never panic on a validated header.
            let _ = m.segment();
            for k in m.keyslots.values() {
                let _ = k.kdf();
                let _ = k.material_len();
            }
        }
    }
});

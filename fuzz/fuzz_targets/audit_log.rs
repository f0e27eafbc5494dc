//! An audit log from arbitrary bytes (the log and the head): parsing and
//! verification answer with an error, never a panic; a log that verifies
//! has a consistent chain.
#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fuzz_target!(|data: &[u8]| {
    // The first line, if any, plays audit.head; the rest the log.
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (head, log) = data.split_at(split);
    let Ok(entries) = coffre_audit::parse_entries(log) else {
        return;
    };
    for head in [None, Some(head)] {
        if let Ok(r) = coffre_audit::verify_entries(&entries, head, KEY) {
            assert_eq!(r.records, entries.len() as u64);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.seq, i as u64 + 1);
                assert_eq!(coffre_audit::entry_hash(e.seq, &e.prev, &e.record), e.hash);
            }
        }
    }
});

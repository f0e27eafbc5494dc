//! An audit log from arbitrary bytes (the log and the head): parsing and
//! verification answer with an error, never a panic; a log that verifies
//! has a consistent chain. The same records as a member's CLI checks them
//! against a head it saw (`verify_extension`), and the same bytes as a
//! crash could leave them on disk, recovered as the daemon does at start
//! (`fuzz_recover`: what recovery accepts must verify).
#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fuzz_target!(|data: &[u8]| {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    coffre_audit::fuzz_recover(
        DIR.get_or_init(|| coffre_sys::fs::fuzz_workdir("audit")),
        data,
    );
    // The first line, if any, plays audit.head; the rest the log.
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (head, log) = data.split_at(split);
    let Ok(entries) = coffre_audit::parse_entries(log) else {
        return;
    };
    if let Ok(to) = serde_json::from_slice::<coffre_audit::Head>(head) {
        if coffre_audit::verify_extension(0, coffre_audit::GENESIS, &entries, &to).is_ok() {
            let n = usize::try_from(to.seq).unwrap();
            assert!(n <= entries.len());
            if n > 0 {
                assert_eq!(entries[n - 1].hash, to.hash);
            }
        }
    }
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

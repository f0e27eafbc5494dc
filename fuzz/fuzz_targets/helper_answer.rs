//! What a helper (the NFS or LDAP server, which parse guests' bytes and
//! so may be a guest's) answers the root daemon, from arbitrary lines:
//! an answer, its failures and its counters keep their bounds, and told
//! text (errors, names) is cut and shows no control character.
#![no_main]

use coffre_sys::shown::{told, unshown};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The daemon reads answers as text: a line that is not UTF-8 ends it.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    coffre_sys::helper::fuzz_check(line);
    let max = 1 + usize::from(data.first().copied().unwrap_or(0) % 64);
    let shown = told(line, max);
    assert!(shown.chars().count() <= max, "{shown:?} is over {max}");
    assert!(!shown.chars().any(unshown), "{shown:?}");
    if line.chars().count() <= max && !line.chars().any(unshown) {
        assert_eq!(shown, line, "plain short text is shown as it is");
    }
});

//! What the organisation's directory could answer, through coffre-source's
//! readers: a search entry (BER) read without panicking and judged (the
//! disabled marks, group members, the per-name answer), a paged-results
//! control's cookie, and text through the DN and generalized-time parsers
//! and both escapes (an escaped value always parses back to itself). The
//! first byte chooses. Seeds: an entry with every mark, a cookie, a DN
//! with escapes and spaces, the classic filter injection, a time with a
//! fraction and an offset.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coffre_source::ldap::fuzz_answer(data);
});

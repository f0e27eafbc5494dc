//! The PEM a member sends to renew (a certificate request) and the PEM the
//! client reads back (a certificate): an error or a value, never a panic.
#![no_main]

use coffre_pki as pki;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = pki::check_csr(text);
    let _ = pki::pem_not_after(text);
    let _ = pki::cert_matches_key(text, text);
    // A renewal's reply: the CA the vault names, its cross certificate and
    // the new certificate, against the CA pinned here.
    let mut parts = text.splitn(4, '\0');
    let (a, b, c, d) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let _ = pki::ca_succeeds(a, b, c, d);
});

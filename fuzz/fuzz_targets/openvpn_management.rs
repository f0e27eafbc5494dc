//! OpenVPN's management socket: arbitrary lines through the reader (CLIENT
//! blocks, CLIENT:ADDRESS lines, command output), `status 3` tables and the
//! password field of a client. Nothing may panic; a completed CLIENT block
//! never prints its password in Debug output; credentials split back into
//! what was sent; a client address prints back to the same notice.
#![no_main]

use coffre_openvpn::{self as openvpn, Notice, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut reader = Reader::new();
    let mut output = Vec::new();
    for line in text.split('\n') {
        match reader.line(line.trim_end_matches('\r')) {
            Ok(Some(Notice::Client { env, .. })) => {
                // Debug output does not depend on the password at all.
                let mut other = env.clone();
                other.password = Default::default();
                assert_eq!(format!("{env:?}"), format!("{other:?}"));
                // Whatever the client sent as its password splits without
                // panicking, and the suffix form gives the input back.
                if let Ok(c) = openvpn::split_credentials(&env.password) {
                    if !env.password.starts_with("SCRV1:") {
                        let back = format!("{}{}", *c.password, c.totp.as_deref().unwrap_or(""));
                        assert_eq!(back, *env.password);
                    }
                }
            }
            Ok(Some(Notice::ClientAddress { cid, addr, primary })) => {
                // Bounded, one field, and printed back it reads the same.
                let shown = addr.to_string();
                assert!(shown.len() <= openvpn::MAX_CLIENT_ADDR);
                assert!(!shown.contains([',', '\n', '\r']));
                let again = format!(">CLIENT:ADDRESS,{cid},{shown},{}", u8::from(primary));
                assert_eq!(
                    Reader::new().line(&again),
                    Ok(Some(Notice::ClientAddress { cid, addr, primary }))
                );
            }
            Ok(Some(Notice::Output(l))) => output.push(l),
            Ok(Some(Notice::End)) => {
                let _ = openvpn::parse_status3(&output);
                output.clear();
            }
            Ok(_) => {}
            Err(_) => reader = Reader::new(),
        }
    }
    // Replies built from client-controlled text stay one command each.
    let deny = openvpn::client_deny(1, 2, &text, &text);
    assert_eq!(deny.matches('\n').count(), 1);
    assert!(deny.ends_with('\n'));
});

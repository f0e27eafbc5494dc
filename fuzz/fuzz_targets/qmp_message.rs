//! QEMU's QMP messages: arbitrary lines through the parser. Nothing may
//! panic, and what parses as a result parses the same once re-encoded.
#![no_main]

use coffre_workload::qmp::{Message, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if line.len() > coffre_workload::qmp::MAX_LINE {
            continue;
        }
        match parse(line) {
            Ok(Message::Return(v)) => {
                let again = serde_json::json!({ "return": v }).to_string();
                assert_eq!(parse(again.as_bytes()).unwrap(), Message::Return(v));
            }
            Ok(Message::Error { class, desc }) => {
                let again = serde_json::json!({"error": {"class": class, "desc": desc}}).to_string();
                assert_eq!(
                    parse(again.as_bytes()).unwrap(),
                    Message::Error { class, desc }
                );
            }
            Ok(_) | Err(_) => {}
        }
    }
});

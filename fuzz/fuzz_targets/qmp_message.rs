//! QEMU's QMP messages: arbitrary lines through the parser. Nothing may
//! panic, and what parses as a result parses the same once re-encoded
//! (exactly, unless it holds floating-point numbers: serde_json's default
//! float parsing is fast, not correctly rounded, so those may move in the
//! last bit; QMP's numbers are integers).
#![no_main]

use coffre_workload::qmp::{Message, parse};
use libfuzzer_sys::fuzz_target;

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if line.len() > coffre_workload::qmp::MAX_LINE {
            continue;
        }
        match parse(line) {
            Ok(Message::Return(v)) => {
                let again = serde_json::json!({ "return": v }).to_string();
                match parse(again.as_bytes()).unwrap() {
                    Message::Return(w) if has_float(&v) => assert!(has_float(&w)),
                    m => assert_eq!(m, Message::Return(v)),
                }
            }
            Ok(Message::Error { class, desc }) => {
                let again =
                    serde_json::json!({"error": {"class": class, "desc": desc}}).to_string();
                assert_eq!(
                    parse(again.as_bytes()).unwrap(),
                    Message::Error { class, desc }
                );
            }
            Ok(_) | Err(_) => {}
        }
    }
});

//! The JSON command model from arbitrary bytes (what clients send): an
//! error or a command, and a command survives a round trip.
#![no_main]

use coffre_api::command::ApiCommand;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = serde_json::from_slice::<ApiCommand>(data) else {
        return;
    };
    let text = serde_json::to_vec(&cmd).expect("commands serialise");
    let again: ApiCommand = serde_json::from_slice(&text).expect("round trip parses");
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&cmd).unwrap()
    );
});

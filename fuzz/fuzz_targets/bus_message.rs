//! What arrives from the bus (an event) or is carried to a component's host
//! (its identity file), from arbitrary bytes: parsing answers with an
//! error, never a panic; an audit event is judged by a witness without a
//! panic, and nothing unsigned by the vault's key is ever taken in.
#![no_main]

use coffre_bus::chain::{Seen, Witness};
use coffre_bus::{Event, Identity};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = Identity::parse(data, "fuzz") {
        assert!(coffre_bus::check_component_name(&id.name).is_ok());
    }
    let Ok(ev) = Event::parse(data) else {
        return;
    };
    let again = Event::parse(&ev.to_bytes()).expect("what we write, we read");
    assert_eq!(again, ev);
    let _ = ev.routing_key();
    if let Event::Audit { entry, .. } = &ev {
        let mut w = Witness::in_memory(KEY);
        // Nobody but the holder of the key signs: the witness refuses it.
        assert!(!matches!(w.accept(entry), Ok(Seen::Appended)));
        assert!(w.is_empty());
    }
});

//! What a component or the vault receives on the bus as a signed envelope
//! (commands, the gateway relay's lines and answers), from arbitrary
//! bytes: reading answers with an error, never a panic; nothing that was
//! not signed by the expected key is ever believed; a sealed batch that
//! was not sealed to our key never opens.
#![no_main]

use coffre_bus::envelope::{self, Expect, Opener, Refusal};
use coffre_bus::relay::RelayMsg;
use libfuzzer_sys::fuzz_target;

/// A P-256 public key (the curve's generator): the fuzzer cannot make
/// an ECDSA signature, whatever the key.
const KEY: &str = "04\
6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
/// An X25519 key of this target's own (its public half is not used).
const SEAL: &str = "a8abababababababababababababababababababababababababababababab6b";

fuzz_target!(|data: &[u8]| {
    let expect = Expect {
        vault: "team",
        to: "vault",
        now: 1_800_000_000,
    };
    let r = envelope::open(data, Some("coffre-bus:gw1"), &expect, |from| {
        (from == "gw1").then(|| KEY.to_string())
    });
    // The fuzzer cannot sign with a key it does not hold.
    assert!(
        !matches!(r, Ok(_)),
        "an envelope was believed without a valid signature"
    );
    if data.len() > envelope::MAX_ENVELOPE {
        assert!(matches!(r, Err(Refusal::Malformed(_))));
    }
    if let Ok(h) = envelope::peek(data)
        && let Ok(m) = RelayMsg::from_value(h.body)
    {
        let again = RelayMsg::from_value(m.to_value()).expect("what we write, we read");
        assert_eq!(again, m);
    }
    let opener = Opener::from_hex(SEAL).expect("a valid key");
    assert!(
        opener.open(b"coffre-relay lines x 1", data).is_err(),
        "bytes nobody sealed opened"
    );
});

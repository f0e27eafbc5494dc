//! What a component or the vault receives on the bus as a signed envelope
//! (commands, the gateway relay's lines and answers), from arbitrary
//! bytes: reading answers with an error, never a panic; nothing that was
//! not signed by the expected key is ever believed; a sealed batch that
//! was not sealed to our key never opens.
//!
//! Past the signature too: each input that reads as a header is signed by
//! a key of this process's own (made at its start; signatures are
//! randomised, the outcome is not) and opened as the vault opens a
//! scheduler's command or a relay's message. What `open` then vouches for
//! holds every rule it checks, and the relay link's replay cache takes it
//! once (commands' nonces are kept on disk by the daemon, not here); a
//! command and a relay message read from the body survive a round trip;
//! and the input is split as a batch of OpenVPN lines the relay sealed,
//! whose lines keep the batch's promises.
#![no_main]

use coffre_bus::command::{self, BusCommand};
use coffre_bus::envelope::{self, Expect, Header, Opener, Refusal, Replays, Signer};
use coffre_bus::relay::{self, RelayMsg};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// A P-256 public key (the curve's generator): the fuzzer cannot make
/// an ECDSA signature, whatever the key.
const KEY: &str = "04\
6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
/// An X25519 key of this target's own (its public half is not used).
const SEAL: &str = "a8abababababababababababababababababababababababababababababab6b";
/// Now, for every check of time.
const NOW: u64 = 1_800_000_000;
/// A line limit small enough for the fuzzer to cross.
const MAX_LINE: usize = 64;

/// The key that signs what reads as a header, and its public half.
fn signer() -> &'static (Signer, String) {
    static S: OnceLock<(Signer, String)> = OnceLock::new();
    S.get_or_init(|| {
        let s = Signer::from_pem(&Signer::generate_pem()).expect("a key we made");
        let public = s.public_hex();
        (s, public)
    })
}

fuzz_target!(|data: &[u8]| {
    let expect = Expect {
        vault: "team",
        to: "vault",
        now: NOW,
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
    signed(data, &expect);
    lines(data);
});

/// The input as a header, signed by a key we hold: opened as the vault
/// opens what the scheduler `ci` or the relay `gw1` sends.
fn signed(data: &[u8], expect: &Expect<'_>) {
    let Ok(sent) = serde_json::from_slice::<Header>(data) else {
        return;
    };
    let (signer, public) = signer();
    let bytes = signer.seal_envelope(&sent);
    let known = |from: &str| matches!(from, "ci" | "gw1").then(|| public.clone());
    let user = coffre_bus::common_name(&sent.from);
    let r = envelope::open(&bytes, Some(&user), expect, known);
    // The broker's word on the sender counts: another user is refused
    // (only `ci` and `gw1` have keys, and neither is `someone`).
    let other = envelope::open(&bytes, Some("coffre-bus:someone"), expect, known);
    assert!(other.is_err(), "believed from another broker user");
    assert!(
        envelope::open(&bytes, None, expect, known).is_err(),
        "believed without the broker's word on the sender"
    );
    let Ok(h) = r else {
        return;
    };
    // What was signed is the header as written (numbers as JSON says them).
    let written = serde_json::to_string(&sent).expect("headers serialise");
    let signed: Header = serde_json::from_str(&written).expect("what we write, we read");
    assert_eq!(h, signed, "open vouches for what was signed, as it was");
    assert!(matches!(h.from.as_str(), "ci" | "gw1"), "an unknown sender");
    assert_eq!(h.v, 1);
    assert_eq!((h.vault.as_str(), h.to.as_str()), ("team", "vault"));
    assert!(h.iat <= NOW + envelope::SKEW_S, "issued in the future");
    assert!(h.exp >= NOW, "expired");
    assert!(h.iat <= h.exp && h.exp - h.iat <= envelope::MAX_LIFE_S);
    assert!(h.nonce.len() == 32 && envelope::unhex(&h.nonce).is_some());
    // Taken once, then a replay.
    let mut seen = Replays::default();
    assert!(seen.take(&h, NOW).is_ok());
    assert!(matches!(seen.take(&h, NOW), Err(Refusal::Replay(_))));

    if command::check_header(&h).is_ok() {
        assert_eq!(h.kind, command::KIND);
        assert!(h.exp - h.iat <= command::LIFE_S);
        if let Ok(c) = BusCommand::from_body(&h.body) {
            let v = serde_json::to_value(&c).expect("commands serialise");
            assert_eq!(
                BusCommand::from_body(&v).expect("what we write, we read"),
                c
            );
            assert!(matches!(c.name(), "task_add" | "task_cancel"));
        }
    }
    if h.kind == relay::KIND
        && let Ok(m) = RelayMsg::from_value(h.body)
    {
        assert_eq!(RelayMsg::from_value(m.to_value()).expect("round trip"), m);
    }
}

/// The input as an opened batch of OpenVPN lines.
fn lines(data: &[u8]) {
    match relay::batch_lines(data, MAX_LINE) {
        Ok(lines) => {
            assert!(lines.len() <= data.iter().filter(|&&b| b == b'\n').count() + 1);
            for l in &lines {
                assert!(!l.is_empty(), "an empty line kept");
                assert!(
                    !l.contains('\n') && !l.ends_with('\r'),
                    "{l:?} is not a line"
                );
                // Replacement characters are 3 bytes for 1 to 3 replaced.
                assert!(
                    l.chars().count() <= MAX_LINE,
                    "{} characters kept",
                    l.chars().count()
                );
            }
        }
        Err(_) => assert!(
            data.split(|&b| b == b'\n').any(|l| l
                .iter()
                .rposition(|&b| b != b'\r')
                .is_some_and(|i| i >= MAX_LINE)),
            "refused a batch whose lines are all short"
        ),
    }
}

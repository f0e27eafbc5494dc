//! Signed envelopes and sealed payloads: what travels between the vault
//! and its components when the broker must not be trusted with it.
//!
//! An envelope is `{"signed": TEXT, "sig": HEX}`: `TEXT` is the JSON of a
//! [`Header`] and its body, exactly as the sender wrote it, and `sig` an
//! ECDSA P-256 signature (SHA-256, ASN.1) by the sender's key over
//! [`DOMAIN`] then those bytes. Components sign with their certificate's
//! key; the vault with its bus signing key (`DIR/bus/sign.key`), whose
//! public half every identity file carries. The receiver checks the
//! signature before it believes anything in the header, then the vault,
//! the recipient, and the time window.
//!
//! Sealing (for what the broker must not read, such as the lines OpenVPN's
//! management interface sends, passwords among them): an ephemeral X25519
//! key agreed with the recipient's static X25519 key, HKDF-SHA256, and
//! AES-256-GCM under that one-time key, bound to associated data naming
//! the message. The output is the ephemeral public key then the
//! ciphertext and tag.

use crate::BusError;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, X25519};
use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// What every signature covers first: a signature made for anything else
/// (a TLS handshake, another protocol) is never a valid envelope.
pub const DOMAIN: &[u8] = b"coffre-bus envelope v1\0";
/// The largest envelope accepted.
pub const MAX_ENVELOPE: usize = 256 << 10;
/// How far a sender's clock may be ahead of ours, seconds.
pub const SKEW_S: u64 = 30;
/// The longest life an envelope may claim, seconds.
pub const MAX_LIFE_S: u64 = 600;

/// Who sent what to whom, when, and until when it counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Format version (1).
    pub v: u32,
    /// The vault's name.
    pub vault: String,
    /// The sender's component name (`vault` for the daemon).
    pub from: String,
    /// The recipient's component name.
    pub to: String,
    /// What the body is.
    pub kind: String,
    /// 128 random bits, hex: no two envelopes share one.
    pub nonce: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Not valid after, Unix seconds.
    pub exp: u64,
    /// The body, as its kind says.
    pub body: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    signed: String,
    sig: String,
}

/// Why an envelope was refused (said in the audit log; never carries the
/// body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not an envelope at all.
    #[error("not a signed envelope: {0}")]
    Malformed(String),
    /// The sender is not one we know (or not one allowed to send here).
    #[error("from {0:?}: not a component that may send here")]
    UnknownSender(String),
    /// The signature does not verify with the sender's key.
    #[error("from {0:?}: the signature does not verify")]
    BadSignature(String),
    /// For another vault or another recipient.
    #[error("addressed to {to:?} of vault {vault:?}, not to us")]
    Misaddressed {
        /// The vault it names.
        vault: String,
        /// The recipient it names.
        to: String,
    },
    /// Outside its time window.
    #[error("{0}")]
    Stale(String),
    /// The broker's `user_id` is not the sender's.
    #[error("sent by broker user {user:?}, but signed as {from:?}")]
    WrongUser {
        /// Who the broker says sent it.
        user: String,
        /// Who it says it is from.
        from: String,
    },
    /// Already seen.
    #[error("nonce {0} was already used: a replay")]
    Replay(String),
}

/// Now, Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 128 random bits, hex.
pub fn new_nonce() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("the system's random generator");
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes hex (lower or upper case).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A signing key (ECDSA P-256): a component's certificate key, or the
/// vault's bus signing key.
pub struct Signer {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// From a PKCS#8 PEM key (as identity files and `sign.key` hold).
    pub fn from_pem(pem: &str) -> Result<Self, BusError> {
        let bad = || BusError::Tls("the signing key is not an ECDSA P-256 PKCS#8 key".into());
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad())?;
        let PrivateKeyDer::Pkcs8(p8) = der else {
            return Err(bad());
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, p8.secret_pkcs8_der())
            .map_err(|_| bad())?;
        Ok(Self {
            pair,
            rng: SystemRandom::new(),
        })
    }

    /// A new key, as PKCS#8 PEM.
    pub fn generate_pem() -> Zeroizing<String> {
        use base64::Engine as _;
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .expect("ECDSA key generation");
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(doc.as_ref()));
        let mut pem = Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// The public key (uncompressed point), hex.
    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    /// Signs `header` (its body included) into the bytes to publish.
    pub fn seal_envelope(&self, header: &Header) -> Vec<u8> {
        let signed = serde_json::to_string(header).expect("headers serialise");
        let mut msg = Vec::with_capacity(DOMAIN.len() + signed.len());
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(signed.as_bytes());
        let sig = self
            .pair
            .sign(&self.rng, &msg)
            .expect("ECDSA signing with a valid key");
        serde_json::to_vec(&Wire {
            signed,
            sig: hex(sig.as_ref()),
        })
        .expect("envelopes serialise")
    }
}

/// Reads the header of an envelope without believing it: what
/// [`open`] checks, and what a caller needs to pick the sender's key.
pub fn peek(bytes: &[u8]) -> Result<Header, Refusal> {
    Ok(split(bytes)?.1)
}

fn split(bytes: &[u8]) -> Result<(Wire, Header), Refusal> {
    if bytes.len() > MAX_ENVELOPE {
        return Err(Refusal::Malformed(format!(
            "{} bytes (at most {MAX_ENVELOPE})",
            bytes.len()
        )));
    }
    let wire: Wire = serde_json::from_slice(bytes).map_err(malformed)?;
    let header: Header = serde_json::from_str(&wire.signed).map_err(malformed)?;
    Ok((wire, header))
}

/// Why bytes did not parse, short and printable: serde's message quotes
/// the value it did not expect, which is the sender's, of any size and
/// any bytes (it goes into the audit log and, from there, to the bus).
fn malformed(e: serde_json::Error) -> Refusal {
    let text: String = e
        .to_string()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MALFORMED_SAID)
        .collect();
    Refusal::Malformed(format!("{text} (line {}, column {})", e.line(), e.column()))
}

/// The most of a parse error's message a refusal repeats (characters).
const MALFORMED_SAID: usize = 160;

/// What the receiver expects of an envelope.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// Our vault's name.
    pub vault: &'a str,
    /// Our component name.
    pub to: &'a str,
    /// Unix seconds now.
    pub now: u64,
}

/// Checks an envelope: the sender's key (`key_of(from)`, hex, `None` if
/// the sender may not send here), its signature, the broker's `user_id`
/// (must be the sender's common name), the vault, the recipient and the
/// time window. Returns the header it vouches for.
pub fn open(
    bytes: &[u8],
    user_id: Option<&str>,
    expect: &Expect<'_>,
    key_of: impl Fn(&str) -> Option<String>,
) -> Result<Header, Refusal> {
    let (wire, h) = split(bytes)?;
    if h.from != "vault" && crate::check_component_name(&h.from).is_err() {
        // Never echoed: it is whatever the sender wrote.
        return Err(Refusal::Malformed(
            "the sender is not a component name".into(),
        ));
    }
    let key = key_of(&h.from).ok_or_else(|| Refusal::UnknownSender(h.from.clone()))?;
    let key = unhex(&key).ok_or_else(|| Refusal::UnknownSender(h.from.clone()))?;
    let sig = unhex(&wire.sig).ok_or_else(|| Refusal::BadSignature(h.from.clone()))?;
    let mut msg = Vec::with_capacity(DOMAIN.len() + wire.signed.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(wire.signed.as_bytes());
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key)
        .verify(&msg, &sig)
        .map_err(|_| Refusal::BadSignature(h.from.clone()))?;
    let cn = crate::common_name(&h.from);
    if user_id != Some(cn.as_str()) {
        return Err(Refusal::WrongUser {
            user: user_id.unwrap_or("(none)").to_string(),
            from: h.from,
        });
    }
    if h.v != 1 {
        return Err(Refusal::Malformed(format!("format version {}", h.v)));
    }
    if h.vault != expect.vault || h.to != expect.to {
        return Err(Refusal::Misaddressed {
            vault: h.vault,
            to: h.to,
        });
    }
    if h.iat > expect.now + SKEW_S {
        return Err(Refusal::Stale(format!(
            "issued {} s in the future (clocks apart?)",
            h.iat - expect.now
        )));
    }
    if h.exp < expect.now {
        return Err(Refusal::Stale(format!(
            "expired {} s ago",
            expect.now - h.exp
        )));
    }
    if h.exp < h.iat || h.exp - h.iat > MAX_LIFE_S {
        return Err(Refusal::Stale(format!(
            "claims a life of {} s (at most {MAX_LIFE_S})",
            h.exp.saturating_sub(h.iat)
        )));
    }
    if h.nonce.len() != 32 || unhex(&h.nonce).is_none() {
        return Err(Refusal::Malformed(
            "the nonce is not 128 bits of hex".into(),
        ));
    }
    Ok(h)
}

/// The nonces of envelopes already taken, until they expire (in memory:
/// for links that end with the process; commands keep theirs on disk).
#[derive(Debug, Default)]
pub struct Replays {
    seen: std::collections::HashMap<String, u64>,
}

/// Nonces a [`Replays`] keeps at most.
const MAX_REPLAYS: usize = 100_000;

impl Replays {
    /// Takes `h` once: a nonce seen before is a replay; a full cache refuses
    /// (an envelope lives [`MAX_LIFE_S`] at most, so room comes back).
    pub fn take(&mut self, h: &Header, now: u64) -> Result<(), Refusal> {
        if self.seen.len() >= MAX_REPLAYS {
            self.seen.retain(|_, exp| exp.saturating_add(SKEW_S) >= now);
        }
        if self.seen.contains_key(&h.nonce) {
            return Err(Refusal::Replay(h.nonce.clone()));
        }
        if self.seen.len() >= MAX_REPLAYS {
            return Err(Refusal::Stale("too many recent messages".into()));
        }
        self.seen.insert(h.nonce.clone(), h.exp);
        Ok(())
    }
}

/// A header from `from` to `to` about `kind`, valid for `life_s` seconds.
pub fn header(
    vault: &str,
    from: &str,
    to: &str,
    kind: &str,
    life_s: u64,
    body: serde_json::Value,
) -> Header {
    let iat = now();
    Header {
        v: 1,
        vault: vault.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        kind: kind.to_string(),
        nonce: new_nonce(),
        iat,
        exp: iat + life_s.min(MAX_LIFE_S),
        body,
    }
}

const SEAL_INFO: &[u8] = b"coffre-bus seal v1";

fn seal_key(shared: &[u8], eph: &[u8], recipient: &[u8]) -> Result<LessSafeKey, ()> {
    use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
    let salt = Salt::new(HKDF_SHA256, SEAL_INFO);
    let prk = salt.extract(shared);
    let info = [eph, recipient];
    let okm = prk.expand(&info, &AES_256_GCM).map_err(|_| ())?;
    let key: UnboundKey = okm.into();
    Ok(LessSafeKey::new(key))
}

/// Seals `plain` to the X25519 public key `recipient` (32 bytes), bound to
/// `aad`.
pub fn seal(recipient: &[u8], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, BusError> {
    let bad = |w: &str| BusError::Tls(format!("sealing: {w}"));
    if recipient.len() != 32 {
        return Err(bad("the recipient's key is not an X25519 key"));
    }
    let eph = agreement::PrivateKey::generate(&X25519).map_err(|_| bad("key generation"))?;
    let eph_pub = eph
        .compute_public_key()
        .map_err(|_| bad("key generation"))?;
    let peer = agreement::UnparsedPublicKey::new(&X25519, recipient);
    let key = agreement::agree(&eph, peer, aws_lc_rs::error::Unspecified, |shared| {
        seal_key(shared, eph_pub.as_ref(), recipient).map_err(|()| aws_lc_rs::error::Unspecified)
    })
    .map_err(|_| bad("key agreement"))?;
    let mut out = Vec::with_capacity(32 + plain.len() + 16);
    out.extend_from_slice(eph_pub.as_ref());
    let mut body = Zeroizing::new(plain.to_vec());
    // One key per message: a fixed nonce never repeats under a key.
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::from(aad),
        &mut *body,
    )
    .map_err(|_| bad("encryption"))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// The recipient's static X25519 key (the vault's `DIR/bus/seal.key`).
pub struct Opener {
    key: agreement::PrivateKey,
    public: Vec<u8>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("public", &hex(&self.public))
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// From the key file's text (64 hex digits).
    pub fn from_hex(text: &str) -> Result<Self, BusError> {
        let bad = || BusError::Tls("the sealing key is not 32 bytes of hex".into());
        let raw = Zeroizing::new(unhex(text.trim()).ok_or_else(bad)?);
        let key = agreement::PrivateKey::from_private_key(&X25519, &raw).map_err(|_| bad())?;
        let public = key
            .compute_public_key()
            .map_err(|_| bad())?
            .as_ref()
            .to_vec();
        Ok(Self { key, public })
    }

    /// A new key, as the key file's text.
    pub fn generate_hex() -> Zeroizing<String> {
        let key = agreement::PrivateKey::generate(&X25519).expect("X25519 key generation");
        let raw: aws_lc_rs::encoding::Curve25519SeedBin<'static> =
            key.as_be_bytes().expect("X25519 key bytes");
        Zeroizing::new(hex(raw.as_ref()))
    }

    /// The public key, hex (what identity files carry).
    pub fn public_hex(&self) -> String {
        hex(&self.public)
    }

    /// Opens what [`seal`] made for this key with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, BusError> {
        let bad = || {
            BusError::Tls(
                "a sealed message does not open (tampered with, or not for this vault)".into(),
            )
        };
        if sealed.len() < 32 + 16 {
            return Err(bad());
        }
        let (eph, ct) = sealed.split_at(32);
        let peer = agreement::UnparsedPublicKey::new(&X25519, eph);
        let key = agreement::agree(&self.key, peer, aws_lc_rs::error::Unspecified, |shared| {
            seal_key(shared, eph, &self.public).map_err(|()| aws_lc_rs::error::Unspecified)
        })
        .map_err(|_| bad())?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let n = key
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| bad())?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> String {
        crate::common_name(name)
    }

    /// A refusal never repeats the sender's bytes at length: serde's
    /// message quotes the value it did not expect, and a header of 200 KiB
    /// of control characters, said in the audit log, once made a record of
    /// about 1.4 MiB (each escaped), too long for the bus's publisher.
    #[test]
    fn a_malformed_envelope_is_refused_in_a_few_printable_words() {
        let junk = "\u{7f}".repeat(200 << 10);
        let signed = serde_json::json!({ "v": junk }).to_string();
        let wire = serde_json::json!({ "signed": signed, "sig": "" }).to_string();
        assert!(wire.len() < MAX_ENVELOPE);
        let Err(Refusal::Malformed(why)) = split(wire.as_bytes()) else {
            panic!("a header whose v is a string parsed");
        };
        assert!(why.len() <= 300, "{} bytes: {}", why.len(), &why[..300]);
        assert!(!why.chars().any(char::is_control), "{why:?}");
        assert!(why.contains("line 1"), "{why}");
        let wire = serde_json::json!({ "signed": "{}", "sig": junk }).to_string();
        let e = split(wire.as_bytes())
            .err()
            .expect("an empty header parsed");
        assert!(e.to_string().len() <= 300, "{} bytes", e.to_string().len());
    }

    #[test]
    fn an_envelope_opens_only_for_its_recipient_with_the_senders_key() {
        let gw = Signer::from_pem(&Signer::generate_pem()).unwrap();
        let other = Signer::from_pem(&Signer::generate_pem()).unwrap();
        let h = header(
            "team",
            "gw1",
            "vault",
            "lines",
            30,
            serde_json::json!({"x": 1}),
        );
        let bytes = gw.seal_envelope(&h);
        let exp = Expect {
            vault: "team",
            to: "vault",
            now: now(),
        };
        let key = gw.public_hex();
        let got = open(&bytes, Some(&user("gw1")), &exp, |f| {
            (f == "gw1").then(|| key.clone())
        })
        .unwrap();
        assert_eq!(got, h);
        // Another key, another sender, another user, another vault.
        let okey = other.public_hex();
        assert!(matches!(
            open(&bytes, Some(&user("gw1")), &exp, |_| Some(okey.clone())),
            Err(Refusal::BadSignature(_))
        ));
        assert!(matches!(
            open(&bytes, Some(&user("gw1")), &exp, |_| None),
            Err(Refusal::UnknownSender(_))
        ));
        assert!(matches!(
            open(&bytes, Some(&user("mon1")), &exp, |_| Some(key.clone())),
            Err(Refusal::WrongUser { .. })
        ));
        assert!(matches!(
            open(&bytes, None, &exp, |_| Some(key.clone())),
            Err(Refusal::WrongUser { .. })
        ));
        let elsewhere = Expect {
            vault: "other",
            ..exp.clone()
        };
        assert!(matches!(
            open(&bytes, Some(&user("gw1")), &elsewhere, |_| Some(
                key.clone()
            )),
            Err(Refusal::Misaddressed { .. })
        ));
        let later = Expect {
            now: now() + 31,
            ..exp.clone()
        };
        assert!(matches!(
            open(&bytes, Some(&user("gw1")), &later, |_| Some(key.clone())),
            Err(Refusal::Stale(_))
        ));
        // One byte changed in what was signed.
        let text = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("lines", "linex");
        assert!(matches!(
            open(text.as_bytes(), Some(&user("gw1")), &exp, |_| Some(
                key.clone()
            )),
            Err(Refusal::BadSignature(_))
        ));
        assert!(matches!(
            open(b"{}", None, &exp, |_| None),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn sealed_bytes_open_only_with_the_key_and_the_same_binding() {
        let k = Opener::from_hex(&Opener::generate_hex()).unwrap();
        let pk = unhex(&k.public_hex()).unwrap();
        let s = seal(&pk, b"link:1", b"password=hunter2").unwrap();
        assert!(!s.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&**k.open(b"link:1", &s).unwrap(), b"password=hunter2");
        assert!(k.open(b"link:2", &s).is_err());
        let other = Opener::from_hex(&Opener::generate_hex()).unwrap();
        assert!(other.open(b"link:1", &s).is_err());
        let mut t = s.clone();
        t[40] ^= 1;
        assert!(k.open(b"link:1", &t).is_err());
        assert!(k.open(b"link:1", &s[..20]).is_err());
        assert!(!format!("{k:?}").contains(&Opener::generate_hex()[..8]));
    }
}

//! The JSON metadata area, as a typed model that keeps everything it does
//! not interpret.
//!
//! Every object carries a flattened `extra` map, and tokens are kept as raw
//! JSON values, so fields added by cryptsetup (or by a later LUKS2 version)
//! survive every rewrite unchanged in meaning. What coffre does not
//! understand is refused in [`Metadata::from_json`] before anything is
//! interpreted.

use crate::cipher::check_spec;
use crate::digest::Pbkdf2Digest;
use crate::hash::HashAlg;
use crate::kdf::{Argon2Variant, Kdf};
use crate::{BINARY_HEADER_SIZE, Error, KEYSLOT_SECTOR_SIZE, MAX_KEYSLOTS, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Alignment of keyslot areas and of the keyslots area size.
pub const AREA_ALIGN: u64 = 4096;

/// Parses the strict decimal form LUKS2 uses for u64 values and object
/// keys: digits only, no sign, no leading zeros.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

macro_rules! string_number {
    ($name:ident, $int:ty, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $int);

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a decimal number in a string")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<$name, E> {
                        parse_decimal(v)
                            .and_then(|n| <$int>::try_from(n).ok())
                            .map($name)
                            .ok_or_else(|| E::custom(format!("bad number {v:?}")))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

string_number!(
    Id,
    u32,
    "An object id (`\"0\"`, `\"1\"`...), as keys and in reference lists."
);
string_number!(
    U64s,
    u64,
    "A u64 written as a JSON string, as LUKS2 does for offsets and sizes."
);

/// A segment size: fixed, or `"dynamic"` (up to the end of the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentSize {
    /// Runs to the end of the data device.
    Dynamic,
    /// This many bytes.
    Bytes(u64),
}

impl Serialize for SegmentSize {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Dynamic => s.serialize_str("dynamic"),
            Self::Bytes(n) => s.collect_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for SegmentSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "dynamic" {
            return Ok(Self::Dynamic);
        }
        parse_decimal(&s)
            .map(Self::Bytes)
            .ok_or_else(|| de::Error::custom(format!("bad segment size {s:?}")))
    }
}

/// The whole metadata object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Keyslots by id.
    pub keyslots: BTreeMap<Id, Keyslot>,
    /// Tokens by id, kept verbatim.
    pub tokens: BTreeMap<Id, Value>,
    /// Data segments by id.
    pub segments: BTreeMap<Id, Segment>,
    /// Volume-key digests by id.
    pub digests: BTreeMap<Id, DigestEntry>,
    /// Global configuration.
    pub config: Config,
    /// Unknown top-level fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One keyslot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Keyslot {
    /// `"luks2"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Size of the key this slot holds, in bytes.
    pub key_size: u32,
    /// Anti-forensic splitter.
    pub af: AfEntry,
    /// Where the encrypted split key lives.
    pub area: Area,
    /// How the area key is derived from the passphrase.
    pub kdf: KdfEntry,
    /// 0 ignore, 1 normal (usually absent), 2 prefer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The AF object of a keyslot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AfEntry {
    /// `"luks1"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Number of stripes (4000).
    pub stripes: u32,
    /// Diffusion hash.
    pub hash: String,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The area object of a keyslot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Area {
    /// `"raw"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Byte offset in the header device.
    pub offset: U64s,
    /// Byte size.
    pub size: U64s,
    /// Cipher of the area.
    pub encryption: String,
    /// Key size of the area cipher, bytes.
    pub key_size: u32,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The KDF object of a keyslot (fields depend on the type).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KdfEntry {
    /// `"pbkdf2"`, `"argon2i"` or `"argon2id"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// pbkdf2 hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// pbkdf2 iterations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    /// argon2 passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<u32>,
    /// argon2 memory, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u32>,
    /// argon2 lanes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Base64 salt.
    pub salt: String,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A data segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// `"crypt"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Byte offset of the data on the data device.
    pub offset: U64s,
    /// Byte size or dynamic.
    pub size: SegmentSize,
    /// IV offset, in 512-byte sectors.
    pub iv_tweak: U64s,
    /// dm-crypt cipher spec (`aes-xts-plain64`).
    pub encryption: String,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Integrity parameters (unsupported if present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<Value>,
    /// Segment flags (present only during reencryption: unsupported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A digest entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DigestEntry {
    /// `"pbkdf2"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Keyslots whose key this digest checks.
    pub keyslots: Vec<Id>,
    /// Segments encrypted with that key.
    pub segments: Vec<Id>,
    /// Hash of the PBKDF2 HMAC (`sha256`...).
    pub hash: String,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Base64 salt.
    pub salt: String,
    /// Base64 digest.
    pub digest: String,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The config object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Size of the JSON area (hdr_size - 4096).
    pub json_size: U64s,
    /// Size of the keyslots area after the two header copies.
    pub keyslots_size: U64s,
    /// Activation flags (`allow-discards`...), kept as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    /// Requirements; any mandatory one is unsupported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Value>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn b64(s: &str, what: &str) -> Result<Vec<u8>> {
    B64.decode(s)
        .map_err(|_| Error::corrupt(format!("{what} is not valid base64")))
}

/// Encodes bytes as LUKS2 does (standard base64 with padding).
pub fn to_b64(b: &[u8]) -> String {
    B64.encode(b)
}

/// Refuses what coffre does not implement, looking at the raw JSON so the
/// error names the feature rather than a missing field.
fn refuse_unsupported(v: &Value) -> Result<()> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::corrupt("JSON metadata is not an object"))?;
    if let Some(req) = obj
        .get("config")
        .and_then(|c| c.get("requirements"))
        .and_then(|r| r.get("mandatory"))
        .and_then(Value::as_array)
        && !req.is_empty()
    {
        let names: Vec<String> = req.iter().map(|r| r.to_string()).collect();
        let reenc = names.iter().any(|n| n.contains("reencrypt"));
        return Err(Error::unsupported(format!(
            "mandatory requirement {}{}",
            names.join(", "),
            if reenc {
                " (a reencryption is in progress)"
            } else {
                ""
            }
        )));
    }
    if let Some(ks) = obj.get("keyslots").and_then(Value::as_object) {
        for (id, k) in ks {
            // cryptsetup takes any value here and treats what it does not
            // know as "normal"; coffre reads only what it writes.
            if let Some(p) = k.get("priority")
                && p.as_u64().is_none_or(|p| p > 2)
            {
                return Err(Error::unsupported(format!("keyslot {id} priority {p}")));
            }
            match k.get("type").and_then(Value::as_str) {
                Some("luks2") => {}
                Some("reencrypt") => {
                    return Err(Error::unsupported(format!(
                        "keyslot {id} is a reencryption keyslot (a reencryption is in progress)"
                    )));
                }
                other => {
                    return Err(Error::unsupported(format!(
                        "keyslot {id} of type {other:?}"
                    )));
                }
            }
        }
    }
    if let Some(segs) = obj.get("segments").and_then(Value::as_object) {
        if segs.len() > 1 {
            return Err(Error::unsupported(
                "more than one data segment (a reencryption is in progress)",
            ));
        }
        for (id, s) in segs {
            let kind = s.get("type").and_then(Value::as_str);
            if kind != Some("crypt") {
                return Err(Error::unsupported(format!("segment {id} of type {kind:?}")));
            }
            if s.get("integrity").is_some() {
                return Err(Error::unsupported(format!(
                    "segment {id} uses authenticated encryption (dm-integrity)"
                )));
            }
            if s.get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty())
            {
                return Err(Error::unsupported(format!(
                    "segment {id} has flags {} (reencryption backup)",
                    s["flags"]
                )));
            }
            if let Some(enc) = s.get("encryption").and_then(Value::as_str)
                && enc != crate::cipher::SUPPORTED_ENCRYPTION
            {
                return Err(Error::unsupported(format!("segment cipher {enc:?}")));
            }
        }
    }
    if let Some(ds) = obj.get("digests").and_then(Value::as_object) {
        for (id, d) in ds {
            let kind = d.get("type").and_then(Value::as_str);
            if kind != Some("pbkdf2") {
                return Err(Error::unsupported(format!("digest {id} of type {kind:?}")));
            }
        }
    }
    Ok(())
}

fn round_up(n: u64, align: u64) -> Option<u64> {
    n.checked_add(align - 1).map(|v| v / align * align)
}

impl Keyslot {
    /// The KDF with its decoded salt.
    pub fn kdf(&self) -> Result<Kdf> {
        let k = &self.kdf;
        let salt = b64(&k.salt, "kdf salt")?;
        let kdf = match k.kind.as_str() {
            "pbkdf2" => Kdf::Pbkdf2 {
                hash: HashAlg::from_name(k.hash.as_deref().unwrap_or(""))?,
                iterations: k
                    .iterations
                    .ok_or_else(|| Error::corrupt("pbkdf2 keyslot without iterations"))?,
                salt,
            },
            "argon2i" | "argon2id" => Kdf::Argon2 {
                variant: if k.kind == "argon2i" {
                    Argon2Variant::I
                } else {
                    Argon2Variant::Id
                },
                time: k
                    .time
                    .ok_or_else(|| Error::corrupt("argon2 keyslot without time"))?,
                memory_kib: k
                    .memory
                    .ok_or_else(|| Error::corrupt("argon2 keyslot without memory"))?,
                lanes: k
                    .cpus
                    .ok_or_else(|| Error::corrupt("argon2 keyslot without cpus"))?,
                salt,
            },
            other => return Err(Error::unsupported(format!("keyslot KDF {other:?}"))),
        };
        kdf.validate()?;
        Ok(kdf)
    }

    /// Builds the JSON form of a KDF.
    pub fn kdf_entry(kdf: &Kdf) -> KdfEntry {
        match kdf {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => KdfEntry {
                kind: "pbkdf2".into(),
                hash: Some(hash.name().into()),
                iterations: Some(*iterations),
                time: None,
                memory: None,
                cpus: None,
                salt: to_b64(salt),
                extra: Map::new(),
            },
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                lanes,
                salt,
            } => KdfEntry {
                kind: variant.name().into(),
                hash: None,
                iterations: None,
                time: Some(*time),
                memory: Some(*memory_kib),
                cpus: Some(*lanes),
                salt: to_b64(salt),
                extra: Map::new(),
            },
        }
    }

    /// Bytes of split key material (a whole number of 512-byte sectors).
    pub fn material_len(&self) -> Result<u64> {
        let raw = u64::from(self.key_size)
            .checked_mul(u64::from(self.af.stripes))
            .ok_or_else(|| Error::corrupt("keyslot material size overflows"))?;
        round_up(raw, KEYSLOT_SECTOR_SIZE as u64)
            .ok_or_else(|| Error::corrupt("keyslot material size overflows"))
    }

    /// The AF hash.
    pub fn af_hash(&self) -> Result<HashAlg> {
        HashAlg::from_name(&self.af.hash)
    }

    /// Effective priority: 0 ignore, 1 normal, 2 prefer.
    pub fn priority(&self) -> u32 {
        self.priority.unwrap_or(1)
    }
}

impl DigestEntry {
    /// The decoded digest.
    pub fn to_pbkdf2(&self) -> Result<Pbkdf2Digest> {
        Ok(Pbkdf2Digest {
            hash: HashAlg::from_name(&self.hash)?,
            iterations: self.iterations,
            salt: b64(&self.salt, "digest salt")?,
            digest: b64(&self.digest, "digest")?,
        })
    }

    /// JSON form of a digest bound to `keyslots` and `segments`.
    pub fn from_pbkdf2(d: &Pbkdf2Digest, keyslots: Vec<Id>, segments: Vec<Id>) -> Self {
        Self {
            kind: "pbkdf2".into(),
            keyslots,
            segments,
            hash: d.hash.name().into(),
            iterations: d.iterations,
            salt: to_b64(&d.salt),
            digest: to_b64(&d.digest),
            extra: Map::new(),
        }
    }
}

/// Geometry of the metadata: the two header copies and the keyslots area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Size of one header copy.
    pub hdr_size: u64,
    /// Size of the keyslots area.
    pub keyslots_size: u64,
}

impl Layout {
    /// Start of the keyslots area (after both copies).
    pub fn keyslots_start(&self) -> u64 {
        2 * self.hdr_size
    }
    /// End of all metadata.
    pub fn metadata_end(&self) -> u64 {
        self.keyslots_start() + self.keyslots_size
    }
}

impl Metadata {
    /// Parses and fully validates the JSON text of a header whose copy size
    /// is `hdr_size`, as if it were followed by NUL padding to the end of
    /// the JSON area.
    pub fn from_json(text: &[u8], hdr_size: u64) -> Result<Self> {
        let len = usize::try_from(hdr_size)
            .ok()
            .and_then(|h| h.checked_sub(BINARY_HEADER_SIZE))
            .ok_or_else(|| Error::corrupt("header size below 4096"))?;
        if text.len() >= len {
            return Err(Error::corrupt(format!(
                "the JSON metadata ({} bytes) does not fit a {len}-byte JSON area",
                text.len()
            )));
        }
        let mut area = text.to_vec();
        area.resize(len, 0);
        Self::from_area(&area, hdr_size)
    }

    /// Parses and validates a whole JSON area (JSON text and NUL padding).
    ///
    /// Two steps: cryptsetup's load rules on the raw text and tree
    /// ([`crate::rules`]: what fails there is damage, or unsupported where
    /// cryptsetup's reading cannot be told), then coffre's own model. A
    /// header that passed the first step is one cryptsetup loads, so
    /// whatever coffre's model refuses after it is unsupported, never
    /// damaged.
    pub fn from_area(area: &[u8], hdr_size: u64) -> Result<Self> {
        let v = crate::rules::check_area(area, hdr_size)?;
        Self::interpret(v, hdr_size).map_err(|e| match e {
            Error::Corrupt(m) | Error::Invalid(m) => Error::Unsupported(m),
            other => other,
        })
    }

    fn interpret(v: Value, hdr_size: u64) -> Result<Self> {
        refuse_unsupported(&v)?;
        let m: Metadata =
            serde_json::from_value(v).map_err(|e| Error::corrupt(format!("JSON metadata: {e}")))?;
        m.validate(hdr_size)?;
        Ok(m)
    }

    /// Serialises to JSON text.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::invalid(format!("JSON encoding: {e}")))
    }

    /// The metadata geometry.
    pub fn layout(&self, hdr_size: u64) -> Layout {
        Layout {
            hdr_size,
            keyslots_size: self.config.keyslots_size.0,
        }
    }

    /// The single data segment.
    pub fn segment(&self) -> Result<(Id, &Segment)> {
        let mut it = self.segments.iter();
        match (it.next(), it.next()) {
            (Some((id, s)), None) => Ok((*id, s)),
            (None, _) => Err(Error::corrupt("no data segment")),
            _ => Err(Error::unsupported("more than one data segment")),
        }
    }

    /// The digest bound to the data segment.
    pub fn segment_digest(&self) -> Result<(Id, &DigestEntry)> {
        let (sid, _) = self.segment()?;
        self.digests
            .iter()
            .find(|(_, d)| d.segments.contains(&sid))
            .map(|(id, d)| (*id, d))
            .ok_or_else(|| Error::corrupt("no digest for the data segment"))
    }

    /// The digest a keyslot belongs to, if any.
    pub fn digest_of_keyslot(&self, slot: Id) -> Option<(Id, &DigestEntry)> {
        self.digests
            .iter()
            .find(|(_, d)| d.keyslots.contains(&slot))
            .map(|(id, d)| (*id, d))
    }

    /// Checks every rule coffre relies on. A header that passes can be used
    /// and rewritten without losing anything.
    pub fn validate(&self, hdr_size: u64) -> Result<()> {
        let c = &self.config;
        let json_size = hdr_size
            .checked_sub(BINARY_HEADER_SIZE as u64)
            .ok_or_else(|| Error::corrupt("header size below 4096"))?;
        if c.json_size.0 != json_size {
            return Err(Error::corrupt(format!(
                "config.json_size {} does not match header size {hdr_size}",
                c.json_size.0
            )));
        }
        if !c.keyslots_size.0.is_multiple_of(AREA_ALIGN) {
            return Err(Error::corrupt("keyslots_size is not 4096-aligned"));
        }
        let ks_start = 2 * hdr_size;
        let ks_end = ks_start
            .checked_add(c.keyslots_size.0)
            .ok_or_else(|| Error::corrupt("keyslots area overflows"))?;
        // Keyslots.
        let mut areas: Vec<(u64, u64, Id)> = Vec::new();
        for (id, k) in &self.keyslots {
            if id.0 >= MAX_KEYSLOTS {
                return Err(Error::corrupt(format!("keyslot id {} out of range", id.0)));
            }
            let ctx = |m: &str| Error::corrupt(format!("keyslot {}: {m}", id.0));
            if k.af.kind != "luks1" {
                return Err(Error::unsupported(format!(
                    "keyslot {} AF type {:?}",
                    id.0, k.af.kind
                )));
            }
            if k.af.stripes == 0 {
                return Err(ctx("zero AF stripes"));
            }
            k.af_hash()?;
            if k.key_size == 0 || k.key_size > 512 {
                return Err(ctx("key size out of range"));
            }
            if k.area.kind != "raw" {
                return Err(Error::unsupported(format!(
                    "keyslot {} area type {:?}",
                    id.0, k.area.kind
                )));
            }
            check_spec(&k.area.encryption, k.area.key_size as usize)?;
            let (off, size) = (k.area.offset.0, k.area.size.0);
            let end = off
                .checked_add(size)
                .ok_or_else(|| ctx("area offset + size overflows"))?;
            if off % AREA_ALIGN != 0 {
                return Err(ctx("area offset is not 4096-aligned"));
            }
            if off < ks_start || end > ks_end {
                return Err(ctx("area lies outside the keyslots area"));
            }
            if size < k.material_len()? {
                return Err(ctx("area is smaller than the split key"));
            }
            if k.priority() > 2 {
                return Err(ctx("priority out of range"));
            }
            k.kdf().map_err(|e| match e {
                Error::Unsupported(_) => e,
                other => ctx(&other.to_string()),
            })?;
            areas.push((off, end, *id));
        }
        areas.sort();
        for w in areas.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(Error::corrupt(format!(
                    "keyslots {} and {} overlap",
                    w[0].2.0, w[1].2.0
                )));
            }
        }
        // Segments.
        let (sid, seg) = self.segment()?;
        let ss = seg.sector_size;
        if !matches!(ss, 512 | 1024 | 2048 | 4096) {
            return Err(Error::corrupt(format!("segment sector size {ss}")));
        }
        let ss = u64::from(ss);
        if seg.offset.0 % ss != 0 {
            return Err(Error::corrupt("segment offset is not sector-aligned"));
        }
        // The end may lie past u64 (cryptsetup allows the largest size
        // the format can say); the volume checks it against the device
        // when it opens.
        if let SegmentSize::Bytes(n) = seg.size
            && n % ss != 0
        {
            return Err(Error::corrupt(
                "segment size is not a whole number of sectors",
            ));
        }
        // Digests.
        let mut seen_slots = std::collections::BTreeSet::new();
        for (id, d) in &self.digests {
            let p = d.to_pbkdf2()?;
            if p.digest.is_empty() || p.digest.len() > 64 || p.iterations == 0 {
                return Err(Error::corrupt(format!("digest {} is empty", id.0)));
            }
            for s in &d.keyslots {
                if !self.keyslots.contains_key(s) {
                    return Err(Error::corrupt(format!(
                        "digest {} names missing keyslot {}",
                        id.0, s.0
                    )));
                }
                if !seen_slots.insert(*s) {
                    return Err(Error::corrupt(format!("keyslot {} has two digests", s.0)));
                }
            }
            for s in &d.segments {
                if !self.segments.contains_key(s) {
                    return Err(Error::corrupt(format!(
                        "digest {} names missing segment {}",
                        id.0, s.0
                    )));
                }
            }
        }
        self.segment_digest()?;
        // Keys bound to the segment must fit its cipher.
        let (_, sd) = self.segment_digest()?;
        for s in &sd.keyslots {
            check_spec(&seg.encryption, self.keyslots[s].key_size as usize)?;
        }
        let _ = sid;
        // Tokens.
        for (id, t) in &self.tokens {
            if id.0 >= MAX_KEYSLOTS {
                return Err(Error::corrupt(format!("token id {} out of range", id.0)));
            }
            let obj = t
                .as_object()
                .ok_or_else(|| Error::corrupt(format!("token {} is not an object", id.0)))?;
            if !obj.get("type").is_some_and(Value::is_string) {
                return Err(Error::corrupt(format!("token {} has no type", id.0)));
            }
            let slots = obj
                .get("keyslots")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::corrupt(format!("token {} has no keyslots list", id.0)))?;
            for s in slots {
                let n = s
                    .as_str()
                    .and_then(parse_decimal)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| Error::corrupt(format!("token {} keyslot id", id.0)))?;
                if !self.keyslots.contains_key(&Id(n)) {
                    return Err(Error::corrupt(format!(
                        "token {} names missing keyslot {n}",
                        id.0
                    )));
                }
            }
        }
        if let Some(flags) = &c.flags {
            // Activation flags do not change the on-disk format; they are
            // kept verbatim. Anything else in config.requirements was
            // refused above.
            let _ = flags;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_numbers() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("16777216"), Some(16777216));
        assert_eq!(parse_decimal("01"), None);
        assert_eq!(parse_decimal("-1"), None);
        assert_eq!(parse_decimal("+1"), None);
        assert_eq!(parse_decimal(""), None);
        assert_eq!(parse_decimal("18446744073709551616"), None);
    }
}

//! cryptsetup's load-time rules for the JSON area, checked on the raw JSON
//! tree before coffre interprets anything.
//!
//! The promise of the volume layer is that cryptsetup is always the way
//! out, so coffre must never accept (nor repair into) a header cryptsetup
//! refuses. The split is:
//!
//! - this module refuses exactly what cryptsetup 2.6 refuses when it loads
//!   a header ([`Error::Corrupt`], exit 4), rule by rule; each rule carries
//!   the identifier of its row in `docs/luks2-validation.md`;
//! - where it cannot tell what cryptsetup would do (text that only json-c's
//!   lenient parser reads, strings with NUL characters, numbers that
//!   `serde_json` can only hold as floats), it says
//!   [`Error::Unsupported`] (exit 5);
//! - whatever passes here, cryptsetup loads; anything coffre's own model
//!   then refuses is a value coffre does not support, not damage
//!   ([`crate::metadata::Metadata::from_area`] turns such refusals into
//!   [`Error::Unsupported`]).
//!
//! Written from cryptsetup's documented behaviour and tests against the
//! real binary; no code of it is used here.

use crate::binary::VALID_HDR_SIZES;
use crate::{BINARY_HEADER_SIZE, Error, Result};
use serde_json::error::Category;
use serde_json::{Map, Value};

/// Deepest nesting json-c parses (a scalar counts as a level).
const MAX_DEPTH: usize = 32;
/// Largest keyslots area cryptsetup loads.
pub const MAX_KEYSLOTS_SIZE: u64 = 128 * 1024 * 1024;
/// Alignment cryptsetup asks of segment offsets and sizes.
const SECTOR: u64 = 512;

fn corrupt(m: impl Into<String>) -> Error {
    Error::Corrupt(m.into())
}

fn unsupported(m: impl Into<String>) -> Error {
    Error::Unsupported(m.into())
}

/// Checks the whole JSON area of a copy whose header size is `hdr_size`
/// and returns the metadata tree cryptsetup would use: unknown members of
/// keyslot KDF objects dropped, as cryptsetup's own repair drops them in
/// memory before it validates again (rule E2).
pub fn check_area(area: &[u8], hdr_size: u64) -> Result<Value> {
    // D2: cryptsetup looks at the first byte before it parses.
    if area.first() != Some(&b'{') {
        return Err(corrupt(match area.first() {
            None => "the JSON area is empty".to_string(),
            Some(b) => format!("the JSON area begins with byte {b:#04x}, not '{{'"),
        }));
    }
    // D4: at least one NUL must follow the text; D8: a NUL inside the
    // object ends the text early, which the parse below reports.
    let nul = area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| corrupt("the JSON area has no NUL byte after the JSON text"))?;
    let text = &area[..nul];
    let mut stream = serde_json::Deserializer::from_slice(text).into_iter::<Value>();
    let mut v = match stream.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) if e.classify() == Category::Eof => {
            return Err(corrupt(format!("the JSON metadata is cut short ({e})")));
        }
        Some(Err(e)) => {
            return Err(unsupported(format!(
                "JSON metadata that is not strict JSON ({e}); json-c, which cryptsetup uses, \
                 reads some such text"
            )));
        }
        None => return Err(corrupt("the JSON area holds no JSON text")),
    };
    // D3: json-c takes the whitespace after the object as part of it.
    let rest = &text[stream.byte_offset()..];
    if let Some(b) = rest
        .iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        if b == b'/' {
            return Err(unsupported(
                "a comment after the JSON object (json-c reads comments; coffre does not)",
            ));
        }
        return Err(corrupt(format!(
            "byte {b:#04x} after the JSON object: only NUL padding may follow it"
        )));
    }
    // D5: the padding is NUL to the end of the area.
    if let Some(i) = area[nul..].iter().position(|&b| b != 0) {
        return Err(corrupt(format!(
            "byte {:#04x} in the NUL padding of the JSON area, {} bytes after the JSON text",
            area[nul + i],
            i
        )));
    }
    // D9
    if depth(&v) > MAX_DEPTH {
        return Err(corrupt(format!(
            "the JSON metadata is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    // D7: cryptsetup compares strings as C strings; coffre would not.
    if has_nul(&v) {
        return Err(unsupported("a JSON string with a NUL character in it"));
    }
    strip_kdf_extras(&mut v);
    check_tree(&v, hdr_size)?;
    Ok(v)
}

/// Nesting depth as json-c counts it: a scalar or an empty container is
/// one level.
fn depth(v: &Value) -> usize {
    let inner = match v {
        Value::Object(m) => m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    };
    1 + inner
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Array(a) => a.iter().any(has_nul),
        _ => false,
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Object(m) => m.values().any(has_float),
        Value::Array(a) => a.iter().any(has_float),
        _ => false,
    }
}

/// E2: the members a luks2 keyslot's KDF may have, by KDF type.
fn kdf_members(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "pbkdf2" => Some(&["type", "hash", "iterations", "salt"]),
        "argon2i" | "argon2id" => Some(&["type", "time", "memory", "cpus", "salt"]),
        _ => None,
    }
}

fn strip_kdf_extras(v: &mut Value) {
    let Some(ks) = v.get_mut("keyslots").and_then(Value::as_object_mut) else {
        return;
    };
    for k in ks.values_mut() {
        if k.get("type").and_then(Value::as_str) != Some("luks2") {
            continue;
        }
        let Some(kdf) = k.get_mut("kdf").and_then(Value::as_object_mut) else {
            continue;
        };
        let Some(allowed) = kdf
            .get("type")
            .and_then(Value::as_str)
            .and_then(kdf_members)
        else {
            continue;
        };
        kdf.retain(|name, _| allowed.contains(&name.as_str()));
    }
}

/// F1: digits only (the empty string passes, as in cryptsetup).
fn numbered(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

/// F2/F3: `strtoull` in base 10, the whole string consumed, no overflow:
/// leading white space and a sign are accepted, and a minus wraps.
fn strtoull(s: &str) -> Option<u64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !numbered(digits) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(if neg { n.wrapping_neg() } else { n })
}

/// A numbered string within u64 (F1 + F2).
fn numbered_u64(s: &str) -> Option<u64> {
    if numbered(s) { strtoull(s) } else { None }
}

/// E3/E5: a member that must be an object.
fn object<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Map<String, Value>> {
    v.get(key)
        .and_then(Value::as_object)
        .ok_or_else(|| corrupt(format!("{what} has no \"{key}\" object")))
}

/// E5: a member that must be a non-empty string.
fn string<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str> {
    match v.get(key).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(corrupt(format!("{what} has no \"{key}\" string"))),
    }
}

fn array<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Vec<Value>> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| corrupt(format!("{what} has no \"{key}\" array")))
}

/// F7: a JSON integer. A float may have been an integer json-c would
/// have kept (serde_json turns integers past 64 bits into floats), so it
/// is not called damage.
fn integer(v: &Value, key: &str, what: &str) -> Result<i128> {
    match v.get(key) {
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                Err(unsupported(format!(
                    "{what}: \"{key}\" is a number coffre cannot read as an integer ({n})"
                )))
            }
        }
        _ => Err(corrupt(format!("{what} has no integer \"{key}\""))),
    }
}

/// F6: an integer from 0 to 2^32 - 1.
fn uint32(v: &Value, key: &str, what: &str) -> Result<u32> {
    let n = integer(v, key, what)?;
    u32::try_from(n).map_err(|_| corrupt(format!("{what}: \"{key}\" {n} is out of range")))
}

/// String array whose elements name members of `of` that are objects.
fn references(list: &[Value], of: &Map<String, Value>, what: &str, kind: &str) -> Result<()> {
    for (i, r) in list.iter().enumerate() {
        let r = r.as_str().ok_or_else(|| {
            corrupt(format!(
                "{what}: element {i} of its {kind} list is not a string"
            ))
        })?;
        if !of.get(r).is_some_and(Value::is_object) {
            return Err(corrupt(format!(
                "{what} names {kind} {r:?}, which does not exist"
            )));
        }
    }
    Ok(())
}

fn is_backup(seg: &Value) -> bool {
    seg.get("flags").and_then(Value::as_array).is_some_and(|f| {
        f.iter()
            .any(|x| x.as_str().is_some_and(|s| s.starts_with("backup-")))
    })
}

/// H3: the requirement names that announce an online reencryption.
fn reencrypt_candidate(s: &str) -> bool {
    s == "online-reencrypt"
        || s.strip_prefix("online-reencrypt-v")
            .is_some_and(|v| !v.is_empty() && numbered(v))
}

fn check_tree(v: &Value, hdr_size: u64) -> Result<()> {
    // E3: the five sections.
    let top = "the JSON metadata";
    let keyslots = object(v, "keyslots", top)?;
    let tokens = object(v, "tokens", top)?;
    let digests = object(v, "digests", top)?;
    let segments = object(v, "segments", top)?;
    let config = object(v, "config", top)?;
    let config_v = &v["config"];

    // H1-H3: requirements.
    let mut candidates = 0;
    if let Some(r) = config.get("requirements") {
        let r = r
            .as_object()
            .ok_or_else(|| corrupt("config.requirements is not an object"))?;
        if let Some(m) = r.get("mandatory") {
            let m = m
                .as_array()
                .ok_or_else(|| corrupt("config.requirements.mandatory is not an array"))?;
            for x in m {
                let s = x.as_str().ok_or_else(|| {
                    corrupt("config.requirements.mandatory holds something other than a string")
                })?;
                if reencrypt_candidate(s) {
                    candidates += 1;
                }
            }
        }
    }
    if candidates > 1 {
        return Err(corrupt("several online-reencryption requirements"));
    }
    // H7/H8: a reencryption keyslot goes with its requirement.
    let reencrypt_slots = keyslots
        .values()
        .filter(|k| k.get("type").and_then(Value::as_str) == Some("reencrypt"))
        .count();
    if reencrypt_slots > 1 {
        return Err(corrupt("more than one reencryption keyslot"));
    }
    if reencrypt_slots == 1 && candidates == 0 {
        return Err(corrupt(
            "a reencryption keyslot without an online-reencrypt requirement",
        ));
    }

    // O1-O3: tokens.
    for (id, t) in tokens {
        let what = format!("token {id:?}");
        if !numbered(id) {
            return Err(corrupt(format!("{what}: its id is not a number")));
        }
        if !t.is_object() {
            return Err(corrupt(format!("{what} is not an object")));
        }
        string(t, "type", &what)?;
        references(array(t, "keyslots", &what)?, keyslots, &what, "keyslot")?;
    }

    // M1-M5: digests.
    for (id, d) in digests {
        let what = format!("digest {id:?}");
        if !numbered(id) {
            return Err(corrupt(format!("{what}: its id is not a number")));
        }
        if !d.is_object() {
            return Err(corrupt(format!("{what} is not an object")));
        }
        string(d, "type", &what)?;
        references(array(d, "keyslots", &what)?, keyslots, &what, "keyslot")?;
        references(array(d, "segments", &what)?, segments, &what, "segment")?;
    }

    // N1-N13: segments.
    if segments.is_empty() {
        return Err(corrupt("no data segment"));
    }
    for (id, s) in segments {
        let what = format!("segment {id:?}");
        if !numbered(id) {
            return Err(corrupt(format!("{what}: its id is not a number")));
        }
        if !s.is_object() {
            return Err(corrupt(format!("{what} is not an object")));
        }
        let kind = string(s, "type", &what)?;
        let offset = numbered_u64(string(s, "offset", &what)?)
            .ok_or_else(|| corrupt(format!("{what}: bad offset")))?;
        let size = match string(s, "size", &what)? {
            "dynamic" => None,
            other => match numbered_u64(other) {
                Some(n) if n != 0 => Some(n),
                _ => return Err(corrupt(format!("{what}: bad size {other:?}"))),
            },
        };
        if !offset.is_multiple_of(SECTOR) {
            return Err(corrupt(format!(
                "{what}: offset {offset} is not a multiple of 512"
            )));
        }
        if size.is_some_and(|n| !n.is_multiple_of(SECTOR)) {
            return Err(corrupt(format!("{what}: size is not a multiple of 512")));
        }
        if let Some(f) = s.get("flags") {
            let ok = f.as_array().is_some_and(|a| a.iter().all(Value::is_string));
            if !ok {
                return Err(corrupt(format!("{what}: flags is not an array of strings")));
            }
        }
        if kind == "crypt" {
            numbered_u64(string(s, "iv_tweak", &what)?)
                .ok_or_else(|| corrupt(format!("{what}: bad iv_tweak")))?;
            string(s, "encryption", &what)?;
            let ss = u64::from(uint32(s, "sector_size", &what)?);
            if ss == 0 || !ss.is_multiple_of(SECTOR) {
                return Err(corrupt(format!("{what}: sector size {ss}")));
            }
            if size.is_some_and(|n| !n.is_multiple_of(ss)) {
                return Err(corrupt(format!(
                    "{what}: size is not a whole number of {ss}-byte sectors"
                )));
            }
            if let Some(i) = s.get("integrity") {
                let w = format!("{what} integrity");
                if !i.is_object() {
                    return Err(corrupt(format!("{w} is not an object")));
                }
                for key in ["type", "journal_encryption", "journal_integrity"] {
                    string(i, key, &w)?;
                }
            }
            let bound = digests.values().any(|d| {
                d.get("segments")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(id)))
            });
            if !bound {
                return Err(corrupt(format!("{what} has no digest")));
            }
        }
    }
    // N10: ids 0..n-1, canonical.
    for i in 0..segments.len() {
        if !segments.contains_key(&i.to_string()) {
            return Err(corrupt(format!("segment {i} is missing (gap in the ids)")));
        }
    }
    // N7-N9, N11 (backup segments, several regular segments) only matter
    // for headers coffre refuses as unsupported anyway.

    // I1-I5, J: keyslots.
    for (id, k) in keyslots {
        let what = format!("keyslot {id:?}");
        if !numbered(id) {
            return Err(corrupt(format!("{what}: its id is not a number")));
        }
        if !k.is_object() {
            return Err(corrupt(format!("{what} is not an object")));
        }
        let kind = string(k, "type", &what)?;
        uint32(k, "key_size", &what)?;
        if kind != "luks2" {
            continue;
        }
        // I5: cryptsetup looks the slot up by the decimal form of its
        // number, so "07" is never found.
        let n: Option<u64> = if id.is_empty() {
            Some(0)
        } else {
            id.parse().ok()
        };
        if let Some(n) = n.filter(|&n| n <= i32::MAX as u64) {
            let name = n.to_string();
            let count = digests
                .values()
                .filter(|d| {
                    d.get("keyslots")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&name)))
                })
                .count();
            if count != 1 {
                return Err(corrupt(format!(
                    "{what} belongs to {count} digests (it must belong to exactly one)"
                )));
            }
        }
        // J1-J7.
        let kdf = &k["kdf"];
        object(k, "kdf", &what)?;
        object(k, "af", &what)?;
        object(k, "area", &what)?;
        let kw = format!("{what} kdf");
        match string(kdf, "type", &kw)? {
            "pbkdf2" => {
                string(kdf, "hash", &kw)?;
                integer(kdf, "iterations", &kw)?;
                string(kdf, "salt", &kw)?;
            }
            "argon2i" | "argon2id" => {
                for key in ["time", "memory", "cpus"] {
                    integer(kdf, key, &kw)?;
                }
                string(kdf, "salt", &kw)?;
            }
            _ => {}
        }
        let af = &k["af"];
        let aw = format!("{what} af");
        if string(af, "type", &aw)? != "luks1" {
            return Err(corrupt(format!("{aw}: type is not \"luks1\"")));
        }
        string(af, "hash", &aw)?;
        integer(af, "stripes", &aw)?;
        let area = &k["area"];
        let rw = format!("{what} area");
        if string(area, "type", &rw)? != "raw" {
            return Err(corrupt(format!("{rw}: type is not \"raw\"")));
        }
        string(area, "encryption", &rw)?;
        integer(area, "key_size", &rw)?;
    }

    // G1-G9: config.
    let json_size = strtoull(string(config_v, "json_size", "config")?)
        .ok_or_else(|| corrupt("config.json_size is not a number"))?;
    let keyslots_size = strtoull(string(config_v, "keyslots_size", "config")?)
        .ok_or_else(|| corrupt("config.keyslots_size is not a number"))?;
    let metadata_size = json_size
        .checked_add(BINARY_HEADER_SIZE as u64)
        .filter(|m| VALID_HDR_SIZES.contains(m))
        .ok_or_else(|| {
            corrupt(format!(
                "config.json_size {json_size} is not one LUKS2 allows"
            ))
        })?;
    if !keyslots_size.is_multiple_of(4096) || keyslots_size > MAX_KEYSLOTS_SIZE {
        return Err(corrupt(format!(
            "config.keyslots_size {keyslots_size} is not a multiple of 4096 up to 128 MiB"
        )));
    }
    let areas_end = 2 * metadata_size + keyslots_size;
    let data_offset = segments
        .values()
        .filter(|s| !is_backup(s))
        .filter_map(|s| {
            s.get("offset")
                .and_then(Value::as_str)
                .and_then(numbered_u64)
        })
        .min()
        .unwrap_or(0);
    if data_offset != 0 && data_offset < areas_end {
        return Err(corrupt(format!(
            "the data segment starts at {data_offset}, inside the metadata (which ends at {areas_end})"
        )));
    }
    if let Some(f) = config.get("flags") {
        let ok = f.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            return Err(corrupt("config.flags is not an array of strings"));
        }
    }
    if metadata_size != hdr_size {
        return Err(corrupt(format!(
            "config.json_size {json_size} does not match the binary header's size {hdr_size}"
        )));
    }

    // L1-L6: keyslot areas, for keyslots of every type.
    let mut areas = Vec::new();
    for (id, k) in keyslots {
        let what = format!("keyslot {id:?} area");
        let area = k
            .get("area")
            .filter(|a| a.is_object())
            .ok_or_else(|| corrupt(format!("keyslot {id:?} has no \"area\" object")))?;
        string(area, "type", &what)?;
        let offset = numbered_u64(string(area, "offset", &what)?)
            .ok_or_else(|| corrupt(format!("{what}: bad offset")))?;
        let size = numbered_u64(string(area, "size", &what)?)
            .ok_or_else(|| corrupt(format!("{what}: bad size")))?;
        if offset < 2 * metadata_size {
            return Err(corrupt(format!(
                "{what} starts at {offset}, inside the header copies"
            )));
        }
        if size == 0 {
            return Err(corrupt(format!("{what} is empty")));
        }
        let end = offset
            .checked_add(size)
            .ok_or_else(|| corrupt(format!("{what}: offset + size overflows")))?;
        if end > areas_end {
            return Err(corrupt(format!(
                "{what} ends at {end}, past the keyslots area (which ends at {areas_end})"
            )));
        }
        areas.push((offset, end, id));
    }
    areas.sort();
    for w in areas.windows(2) {
        if w[0].1 > w[1].0 {
            return Err(corrupt(format!(
                "keyslots {:?} and {:?} overlap",
                w[0].2, w[1].2
            )));
        }
    }

    // Q1: what cryptsetup writes back must fit the area.
    let compact = serde_json::to_vec(v).map_err(|e| corrupt(e.to_string()))?;
    if compact.len() as u64 > json_size {
        if has_float(v) {
            return Err(unsupported(
                "JSON metadata near the area's size with numbers coffre reads as floats",
            ));
        }
        return Err(corrupt(format!(
            "the JSON metadata takes {} bytes written compactly, more than the {json_size}-byte area",
            compact.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtoull_is_as_lenient_as_c() {
        assert_eq!(strtoull("12288"), Some(12288));
        assert_eq!(strtoull(" 12288"), Some(12288));
        assert_eq!(strtoull("+12288"), Some(12288));
        assert_eq!(strtoull("0012288"), Some(12288));
        assert_eq!(strtoull("-1"), Some(u64::MAX));
        assert_eq!(strtoull("18446744073709551615"), Some(u64::MAX));
        assert_eq!(strtoull("18446744073709551616"), None);
        assert_eq!(strtoull("12288 "), None);
        assert_eq!(strtoull("+"), None);
        assert_eq!(strtoull(""), None);
        assert_eq!(strtoull("0x10"), None);
    }

    #[test]
    fn depth_counts_scalars() {
        let mut v = Value::Object(Map::new());
        for _ in 0..31 {
            v = serde_json::json!({ "a": v });
        }
        assert_eq!(depth(&v), 32);
        let mut v = serde_json::json!(1);
        for _ in 0..32 {
            v = serde_json::json!({ "a": v });
        }
        assert_eq!(depth(&v), 33);
    }

    /// The header fuzz target's seeds named `rejected-*` are structures
    /// cryptsetup refuses, `accepted-*` ones it reads (checked against it
    /// when they were made): coffre gives each the same verdict.
    #[test]
    fn fuzz_seeds_get_the_verdict_their_names_say() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/luks2_header");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap();
            let mut read = |off: u64, len: usize| -> std::result::Result<Option<Vec<u8>>, ()> {
                let off = usize::try_from(off).unwrap();
                Ok(bytes.get(off..off.saturating_add(len)).map(<[u8]>::to_vec))
            };
            let r = crate::header::load(&mut read).unwrap();
            if name.starts_with("rejected-") {
                assert!(
                    matches!(r, Err(Error::NoValidHeader { .. } | Error::Corrupt(_))),
                    "{name}: {:?}",
                    r.map(|_| ())
                );
                seen += 1;
            } else if name.starts_with("accepted-") {
                assert!(r.is_ok(), "{name}: {:?}", r.err());
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} seeds");
    }

    #[test]
    fn reencrypt_candidates() {
        assert!(reencrypt_candidate("online-reencrypt"));
        assert!(reencrypt_candidate("online-reencrypt-v2"));
        assert!(reencrypt_candidate("online-reencrypt-v10"));
        assert!(!reencrypt_candidate("online-reencrypt-v"));
        assert!(!reencrypt_candidate("online-reencrypt-vx"));
        assert!(!reencrypt_candidate("offline-reencrypt"));
    }
}

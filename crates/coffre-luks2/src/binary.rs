//! The 4096-byte binary header that starts each LUKS2 header copy.
//!
//! Layout (all integers big-endian), from the LUKS2 specification:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | magic: `LUKS\xba\xbe` (primary) or `SKUL\xba\xbe` (secondary) |
//! | 6 | 2 | version (2) |
//! | 8 | 8 | hdr_size: binary header + JSON area, in bytes |
//! | 16 | 8 | seqid, bumped on every write |
//! | 24 | 48 | label |
//! | 72 | 32 | checksum_alg (`"sha256"`) |
//! | 104 | 64 | salt |
//! | 168 | 40 | uuid |
//! | 208 | 48 | subsystem |
//! | 256 | 8 | hdr_offset: where this copy starts |
//! | 264 | 184 | padding |
//! | 448 | 64 | checksum of the whole copy with this field zeroed |
//! | 512 | 3584 | padding |

use crate::hash::HashAlg;
use crate::{BINARY_HEADER_SIZE, Error, Result};

/// Magic of the primary copy.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary copy.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";

/// The header sizes the specification allows (binary + JSON), in bytes.
pub const VALID_HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];

const OFF_VERSION: usize = 6;
const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_LABEL: usize = 24;
const OFF_CSUM_ALG: usize = 72;
const OFF_SALT: usize = 104;
const OFF_UUID: usize = 168;
const OFF_SUBSYSTEM: usize = 208;
const OFF_HDR_OFFSET: usize = 256;
const OFF_CSUM: usize = 448;
const CSUM_LEN: usize = 64;

/// Which of the two copies a binary header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    /// At offset 0.
    Primary,
    /// At offset `hdr_size`.
    Secondary,
}

/// The fields of a binary header that mean something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryHeader {
    /// Total size of one copy (binary header + JSON area).
    pub hdr_size: u64,
    /// Sequence number; the copy with the higher one wins.
    pub seqid: u64,
    /// Label (up to 47 bytes, NUL-padded on disk).
    pub label: String,
    /// Checksum algorithm name.
    pub checksum_alg: String,
    /// Per-copy salt (random, part of the checksummed area).
    pub salt: [u8; 64],
    /// Volume UUID in text form.
    pub uuid: String,
    /// Subsystem (up to 47 bytes).
    pub subsystem: String,
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// A text field as cryptsetup reads it: up to the first NUL, and never its
/// last byte (cryptsetup forces that one to NUL in memory, so a field with
/// no NUL is read cut short, not refused).
fn c_string(field: &[u8], what: &str) -> Result<String> {
    let field = &field[..field.len() - 1];
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec())
        .map_err(|_| Error::unsupported(format!("a {what} that is not UTF-8 text")))
}

fn put_c_string(field: &mut [u8], s: &str, what: &str) -> Result<()> {
    if s.len() >= field.len() || s.as_bytes().contains(&0) {
        return Err(Error::invalid(format!(
            "{what} must be shorter than {} bytes and contain no NUL",
            field.len()
        )));
    }
    field.fill(0);
    field[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

/// The checksum algorithm named in a header, if we implement it.
pub fn checksum_hash(name: &str) -> Result<HashAlg> {
    HashAlg::from_name(name)
        .map_err(|_| Error::unsupported(format!("header checksum algorithm {name:?}")))
}

/// Reads the first 4096 bytes of a copy. Checks the magic, version,
/// header size and offset, but not the checksum (which covers the JSON area
/// too: see [`verify_checksum`]).
pub fn parse(bytes: &[u8], expect: Copy, at_offset: u64) -> Result<BinaryHeader> {
    if bytes.len() < BINARY_HEADER_SIZE {
        return Err(Error::NotLuks2(format!(
            "only {} bytes, a LUKS2 binary header has {BINARY_HEADER_SIZE}",
            bytes.len()
        )));
    }
    let magic = match expect {
        Copy::Primary => MAGIC_PRIMARY,
        Copy::Secondary => MAGIC_SECONDARY,
    };
    if bytes[..6] != magic {
        return Err(Error::NotLuks2("bad magic".into()));
    }
    let version = u16::from_be_bytes([bytes[OFF_VERSION], bytes[OFF_VERSION + 1]]);
    if version != 2 {
        return Err(Error::NotLuks2(format!(
            "version {version} (coffre reads LUKS version 2 only)"
        )));
    }
    let hdr_size = be_u64(bytes, OFF_HDR_SIZE);
    // B4: the binary check is a range; the exact sizes are checked with
    // the JSON area's config.json_size (G4, G9).
    if !(VALID_HDR_SIZES[0]..=VALID_HDR_SIZES[VALID_HDR_SIZES.len() - 1]).contains(&hdr_size) {
        return Err(Error::corrupt(format!("invalid header size {hdr_size}")));
    }
    let hdr_offset = be_u64(bytes, OFF_HDR_OFFSET);
    if hdr_offset != at_offset {
        return Err(Error::corrupt(format!(
            "header copy found at offset {at_offset} says it belongs at {hdr_offset}"
        )));
    }
    if expect == Copy::Secondary && hdr_offset != hdr_size {
        return Err(Error::corrupt(format!(
            "secondary header at {hdr_offset} but header size is {hdr_size}"
        )));
    }
    let mut salt = [0u8; 64];
    salt.copy_from_slice(&bytes[OFF_SALT..OFF_SALT + 64]);
    Ok(BinaryHeader {
        hdr_size,
        seqid: be_u64(bytes, OFF_SEQID),
        label: c_string(&bytes[OFF_LABEL..OFF_LABEL + 48], "label")?,
        checksum_alg: c_string(&bytes[OFF_CSUM_ALG..OFF_CSUM_ALG + 32], "checksum_alg")?,
        salt,
        uuid: c_string(&bytes[OFF_UUID..OFF_UUID + 40], "uuid")?,
        subsystem: c_string(&bytes[OFF_SUBSYSTEM..OFF_SUBSYSTEM + 48], "subsystem")?,
    })
}

/// Checks the checksum of a whole copy (`area` is `hdr_size` bytes).
pub fn verify_checksum(area: &[u8], alg: &str) -> Result<()> {
    let hash = checksum_hash(alg)?;
    let mut stored = [0u8; CSUM_LEN];
    stored.copy_from_slice(&area[OFF_CSUM..OFF_CSUM + CSUM_LEN]);
    let computed = compute_checksum(area, hash);
    // B8: only the digest's own bytes count; cryptsetup ignores the rest
    // of the field.
    let n = hash.output_len();
    if stored[..n] != computed[..n] {
        return Err(Error::corrupt("checksum mismatch"));
    }
    Ok(())
}

fn compute_checksum(area: &[u8], hash: HashAlg) -> [u8; CSUM_LEN] {
    let zeros = [0u8; CSUM_LEN];
    let mut out = [0u8; CSUM_LEN];
    hash.hash_into(
        &[&area[..OFF_CSUM], &zeros, &area[OFF_CSUM + CSUM_LEN..]],
        &mut out[..hash.output_len()],
    );
    out
}

impl BinaryHeader {
    /// Encodes this header as `copy` into the first 4096 bytes of `area`
    /// (which must be `hdr_size` long and already hold the JSON area), then
    /// writes the checksum over the whole area.
    pub fn encode_into(&self, copy: Copy, area: &mut [u8]) -> Result<()> {
        let size = usize::try_from(self.hdr_size)
            .map_err(|_| Error::invalid("header size does not fit in memory"))?;
        if area.len() != size || !VALID_HDR_SIZES.contains(&self.hdr_size) {
            return Err(Error::invalid("header area size mismatch"));
        }
        let hash = checksum_hash(&self.checksum_alg)?;
        let b = &mut area[..BINARY_HEADER_SIZE];
        b.fill(0);
        let (magic, offset) = match copy {
            Copy::Primary => (MAGIC_PRIMARY, 0),
            Copy::Secondary => (MAGIC_SECONDARY, self.hdr_size),
        };
        b[..6].copy_from_slice(&magic);
        b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&2u16.to_be_bytes());
        b[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&self.hdr_size.to_be_bytes());
        b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&self.seqid.to_be_bytes());
        put_c_string(&mut b[OFF_LABEL..OFF_LABEL + 48], &self.label, "label")?;
        put_c_string(
            &mut b[OFF_CSUM_ALG..OFF_CSUM_ALG + 32],
            &self.checksum_alg,
            "checksum_alg",
        )?;
        b[OFF_SALT..OFF_SALT + 64].copy_from_slice(&self.salt);
        put_c_string(&mut b[OFF_UUID..OFF_UUID + 40], &self.uuid, "uuid")?;
        put_c_string(
            &mut b[OFF_SUBSYSTEM..OFF_SUBSYSTEM + 48],
            &self.subsystem,
            "subsystem",
        )?;
        b[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&offset.to_be_bytes());
        let csum = compute_checksum(area, hash);
        area[OFF_CSUM..OFF_CSUM + CSUM_LEN].copy_from_slice(&csum);
        Ok(())
    }
}

/// A new random UUID (version 4) in text form.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    crate::secret::fill_random(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = data_encoding::HEXLOWER.encode(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

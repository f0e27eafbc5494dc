//! What a store holds, and how each object is written and read.
//!
//! Under the vault's prefix:
//!
//! - `c/IIIIIIIIIIII/VVVVVVVVVVVVVVVV.SSSSSSSSSSSSSSSS`: chunk `I` (hex)
//!   at version `V`, written by session `S`: the chunk's ciphertext,
//!   nothing else (an export is their concatenation). A chunk's version is
//!   the epoch of the manifest that first listed it; the session is a
//!   random number each writer draws when it opens the store, so that a
//!   second writer, before it is fenced, never writes over a name the
//!   durable manifest uses. A chunk never written is not stored: it reads
//!   as zero bytes of ciphertext, as a sparse local file does.
//! - `p/PPPPPPPP/EEEEEEEEEEEEEEEE.SSSSSSSSSSSSSSSS`: page `P` of the
//!   version table at epoch `E`, by session `S`: for [`ENTRIES_PER_PAGE`]
//!   chunks each, their version, session and MAC.
//! - `manifest`: the geometry, the epoch, and each page's epoch and MAC,
//!   with a MAC over all of it. Written last, with a conditional put.
//!
//! The root of trust is the manifest's epoch and MAC ([`Root`]), kept
//! locally next to the detached header: a store that serves an older
//! manifest (an older, consistent state of the whole bucket) is caught at
//! open; one that serves an older page or chunk is caught because the
//! manifest, or the page, names the version and MAC it must have.

use crate::RemoteError;
use crate::integrity::{ChunkMac, Domain, IntegrityKey, Mac};

/// Chunks per page of the version table (48 bytes each: 192 KiB a page).
pub const ENTRIES_PER_PAGE: u64 = 4096;
/// The smallest chunk.
pub const MIN_CHUNK: u32 = 64 * 1024;
/// The largest chunk.
pub const MAX_CHUNK: u32 = 64 * 1024 * 1024;
/// The default chunk: 1 MiB.
pub const DEFAULT_CHUNK: u32 = 1024 * 1024;
/// The most chunks a volume has (the table is in memory, 48 bytes a
/// chunk: 768 MiB at most; 16 TiB in 1 MiB chunks, 1 PiB in 64 MiB ones).
pub const MAX_CHUNKS: u64 = 1 << 24;

const PAGE_MAGIC: &[u8; 8] = b"CFRPAGE1";
/// The manifest of a store whose chunks carry HMAC-SHA256 MACs.
const MANIFEST_MAGIC: &[u8; 8] = b"CFRMANI1";
/// The manifest of a store whose chunks carry keyed-BLAKE3 MACs (the rest
/// is the same).
const MANIFEST_MAGIC_BLAKE3: &[u8; 8] = b"CFRMANI2";

fn manifest_magic(how: ChunkMac) -> &'static [u8; 8] {
    match how {
        ChunkMac::HmacSha256 => MANIFEST_MAGIC,
        ChunkMac::Blake3 => MANIFEST_MAGIC_BLAKE3,
    }
}

fn chunk_mac_of_magic(magic: &[u8]) -> Option<ChunkMac> {
    [ChunkMac::HmacSha256, ChunkMac::Blake3]
        .into_iter()
        .find(|h| magic == &manifest_magic(*h)[..])
}
const ENTRY_LEN: usize = 8 + 8 + 32;

/// The volume's shape on the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per chunk (a power of two).
    pub chunk_size: u32,
    /// The volume's size in bytes.
    pub size: u64,
}

impl Geometry {
    /// Checks the numbers.
    pub fn new(chunk_size: u32, size: u64) -> Result<Self, RemoteError> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(RemoteError::Config(format!(
                "chunk_size {chunk_size} must be a power of two from {MIN_CHUNK} to {MAX_CHUNK} bytes"
            )));
        }
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(RemoteError::Config(format!(
                "the volume's size {size} must be a positive multiple of 4096 bytes"
            )));
        }
        let g = Geometry { chunk_size, size };
        if g.chunks() > MAX_CHUNKS {
            return Err(RemoteError::Config(format!(
                "{size} bytes in chunks of {chunk_size} make {} chunks, more than {MAX_CHUNKS}: choose larger chunks",
                g.chunks()
            )));
        }
        Ok(g)
    }

    /// How many chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// How many pages of the version table.
    pub fn pages(&self) -> u64 {
        self.chunks().div_ceil(ENTRIES_PER_PAGE)
    }

    /// Chunk `index`'s length (the last may be short).
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index.saturating_mul(u64::from(self.chunk_size));
        let len = self
            .size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size));
        usize::try_from(len).unwrap_or(0)
    }

    /// How many entries page `page` has (the last may be short).
    pub fn page_len(&self, page: u64) -> usize {
        let start = page.saturating_mul(ENTRIES_PER_PAGE);
        let len = self.chunks().saturating_sub(start).min(ENTRIES_PER_PAGE);
        usize::try_from(len).unwrap_or(0)
    }
}

/// Object names under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix` (a `/` is added if it has none; empty: the
    /// bucket's root).
    pub fn new(prefix: &str) -> Self {
        let p = prefix.trim_matches('/');
        Keys {
            prefix: if p.is_empty() {
                String::new()
            } else {
                format!("{p}/")
            },
        }
    }

    /// The folder every name is under (`team/`; empty: the bucket's root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Chunk `index` at `version`, by `session`.
    pub fn chunk(&self, index: u64, version: u64, session: u64) -> String {
        format!(
            "{}c/{index:012x}/{version:016x}.{session:016x}",
            self.prefix
        )
    }

    /// Page `page` at `epoch`, by `session`.
    pub fn page(&self, page: u64, epoch: u64, session: u64) -> String {
        format!("{}p/{page:08x}/{epoch:016x}.{session:016x}", self.prefix)
    }

    /// The manifest.
    pub fn manifest(&self) -> String {
        format!("{}manifest", self.prefix)
    }

    /// A name for the conditional-write probe.
    pub fn probe(&self, nonce: u64) -> String {
        format!("{}probe/{nonce:016x}", self.prefix)
    }

    /// What a name made by these methods names, whatever its prefix;
    /// `None` for any other name.
    pub fn parse(name: &str) -> Option<Name> {
        let hex = |s: &str, digits: usize| {
            (s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        };
        let parts: Vec<&str> = name.rsplitn(4, '/').collect();
        match parts.as_slice() {
            ["manifest", ..] => Some(Name::Manifest),
            [nonce, "probe", ..] => Some(Name::Probe(hex(nonce, 16)?)),
            [vs, index, kind @ ("c" | "p"), ..] => {
                let (v, s) = vs.split_once('.')?;
                let (v, s) = (hex(v, 16)?, hex(s, 16)?);
                if *kind == "c" {
                    Some(Name::Chunk(hex(index, 12)?, v, s))
                } else {
                    Some(Name::Page(hex(index, 8)?, v, s))
                }
            }
            _ => None,
        }
    }
}

/// What an object's name says ([`Keys::parse`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    /// Chunk (index, version, session).
    Chunk(u64, u64, u64),
    /// Page (index, epoch, session).
    Page(u64, u64, u64),
    /// The manifest.
    Manifest,
    /// A conditional-write probe, by its nonce.
    Probe(u64),
}

/// One chunk's entry in the version table (and one page's in the
/// manifest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 0: never written (reads as zeros, not stored).
    pub version: u64,
    /// The session that wrote it.
    pub session: u64,
    /// Its MAC (zeros when never written).
    pub mac: Mac,
}

impl Entry {
    /// A chunk never written.
    pub const EMPTY: Entry = Entry {
        version: 0,
        session: 0,
        mac: [0; 32],
    };
}

/// A page of the version table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Which page.
    pub index: u64,
    /// The epoch it was written at.
    pub epoch: u64,
    /// The session that wrote it.
    pub session: u64,
    /// Its chunks' entries.
    pub entries: Vec<Entry>,
}

/// The manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The volume's shape.
    pub geometry: Geometry,
    /// Its epoch: one more at every flush that changed something.
    pub epoch: u64,
    /// Each page's epoch (as `version`), session and MAC (epoch 0: never
    /// written, all chunks empty).
    pub pages: Vec<Entry>,
    /// How the store's chunks are authenticated (its magic says which).
    pub chunk_mac: ChunkMac,
}

/// What the control directory keeps to catch a store that rolls back:
/// the last manifest's epoch and MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    /// The epoch.
    pub epoch: u64,
    /// The manifest's MAC.
    pub mac: Mac,
}

impl Root {
    /// As a line of text: `EPOCH HEXMAC`.
    pub fn to_line(&self) -> String {
        let hex: String = self.mac.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {hex}\n", self.epoch)
    }

    /// From [`Root::to_line`]'s text.
    pub fn from_line(text: &str) -> Result<Self, RemoteError> {
        let bad = || RemoteError::Config("the storage root file is damaged".into());
        let mut parts = text.split_whitespace();
        let epoch = parts.next().and_then(|e| e.parse().ok()).ok_or_else(bad)?;
        let hex = parts.next().ok_or_else(bad)?;
        if hex.len() != 64 || parts.next().is_some() {
            return Err(bad());
        }
        let mut mac = [0u8; 32];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Root { epoch, mac })
    }
}

/// A reader of outside bytes that never panics.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (a, b) = self.bytes.split_at(n);
        self.bytes = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    }
    fn mac(&mut self) -> Option<Mac> {
        self.take(32).and_then(|b| b.try_into().ok())
    }
    fn entry(&mut self) -> Option<Entry> {
        Some(Entry {
            version: self.u64()?,
            session: self.u64()?,
            mac: self.mac()?,
        })
    }
}

fn push_entry(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(&e.version.to_be_bytes());
    out.extend_from_slice(&e.session.to_be_bytes());
    out.extend_from_slice(&e.mac);
}

fn tampered(what: String) -> RemoteError {
    RemoteError::Tampered(what)
}

impl Page {
    /// The most bytes a page has.
    pub fn max_len() -> usize {
        // 4096: ENTRIES_PER_PAGE (checked by a test).
        8 + 8 + 8 + 8 + 4 + 4096 * ENTRY_LEN + 32
    }

    /// The page's bytes, its MAC last.
    pub fn encode(&self, key: &IntegrityKey, vault: &[u8; 16]) -> (Vec<u8>, Mac) {
        let mut out = Vec::with_capacity(8 + 8 + 8 + 4 + self.entries.len() * ENTRY_LEN + 32);
        out.extend_from_slice(PAGE_MAGIC);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&u32::try_from(self.entries.len()).unwrap_or(0).to_be_bytes());
        for e in &self.entries {
            push_entry(&mut out, e);
        }
        let mac = key.mac(Domain::Page, vault, &[&out]);
        out.extend_from_slice(&mac);
        (out, mac)
    }

    /// Page `index` from its bytes, if they are the page the manifest
    /// lists (`listed`: its epoch, session and MAC) and it has `count`
    /// entries.
    pub fn decode(
        bytes: &[u8],
        key: &IntegrityKey,
        vault: &[u8; 16],
        (index, count): (u64, usize),
        listed: &Entry,
    ) -> Result<Self, RemoteError> {
        let (epoch, session, expected) = (listed.version, listed.session, &listed.mac);
        let what = || format!("page {index} at epoch {epoch}");
        let body_len = bytes
            .len()
            .checked_sub(32)
            .ok_or_else(|| tampered(format!("{}: too short", what())))?;
        let (body, trailer) = bytes.split_at(body_len);
        let mac = key.mac(Domain::Page, vault, &[body]);
        if !IntegrityKey::verify(expected, &mac)
            || !IntegrityKey::verify(&mac, &trailer.try_into().unwrap_or([0; 32]))
        {
            return Err(tampered(format!(
                "{}: its MAC is not the one the manifest lists (altered, older, or another vault's)",
                what()
            )));
        }
        // Authentic from here: what follows only fails on a bug of ours.
        let mut r = Reader { bytes: body };
        let bad = || tampered(format!("{}: malformed", what()));
        if r.take(8) != Some(&PAGE_MAGIC[..]) {
            return Err(bad());
        }
        if r.u64() != Some(index) || r.u64() != Some(epoch) || r.u64() != Some(session) {
            return Err(bad());
        }
        let n = r.u32().ok_or_else(bad)?;
        if usize::try_from(n).ok() != Some(count) || r.bytes.len() != count * ENTRY_LEN {
            return Err(bad());
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let e = r.entry().ok_or_else(bad)?;
            if e.version > epoch {
                return Err(bad());
            }
            entries.push(e);
        }
        Ok(Page {
            index,
            epoch,
            session,
            entries,
        })
    }
}

impl Manifest {
    /// How many bytes the manifest of a volume of `pages` pages has.
    pub fn len_for(pages: u64) -> u64 {
        (8 + 16 + 4 + 8 + 8 + 4 + 32) + pages * ENTRY_LEN as u64
    }

    /// The manifest's bytes, its MAC last, and the root it makes.
    pub fn encode(&self, key: &IntegrityKey, vault: &[u8; 16]) -> (Vec<u8>, Root) {
        let mut out =
            Vec::with_capacity(8 + 16 + 4 + 8 + 8 + 4 + self.pages.len() * ENTRY_LEN + 32);
        out.extend_from_slice(manifest_magic(self.chunk_mac));
        out.extend_from_slice(vault);
        out.extend_from_slice(&self.geometry.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.geometry.size.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&u32::try_from(self.pages.len()).unwrap_or(0).to_be_bytes());
        for e in &self.pages {
            push_entry(&mut out, e);
        }
        let mac = key.mac(Domain::Manifest, vault, &[&out]);
        out.extend_from_slice(&mac);
        (
            out,
            Root {
                epoch: self.epoch,
                mac,
            },
        )
    }

    /// The manifest in `bytes`, if this vault's integrity key made it.
    pub fn decode(
        bytes: &[u8],
        key: &IntegrityKey,
        vault: &[u8; 16],
    ) -> Result<(Self, Root), RemoteError> {
        let body_len = bytes
            .len()
            .checked_sub(32)
            .ok_or_else(|| tampered("the manifest: too short".into()))?;
        let (body, trailer) = bytes.split_at(body_len);
        let mac = key.mac(Domain::Manifest, vault, &[body]);
        if !IntegrityKey::verify(&mac, &trailer.try_into().unwrap_or([0; 32])) {
            return Err(tampered(
                "the manifest does not verify with this vault's integrity key (altered, or another vault's)".into(),
            ));
        }
        let bad = || tampered("the manifest: malformed".into());
        let mut r = Reader { bytes: body };
        let chunk_mac = r.take(8).and_then(chunk_mac_of_magic).ok_or_else(bad)?;
        if r.take(16) != Some(&vault[..]) {
            return Err(bad());
        }
        let chunk_size = r.u32().ok_or_else(bad)?;
        let size = r.u64().ok_or_else(bad)?;
        let geometry = Geometry::new(chunk_size, size).map_err(|_| bad())?;
        let epoch = r.u64().ok_or_else(bad)?;
        let n = r.u32().ok_or_else(bad)?;
        if u64::from(n) != geometry.pages() || r.bytes.len() != (n as usize) * ENTRY_LEN {
            return Err(bad());
        }
        let mut pages = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let e = r.entry().ok_or_else(bad)?;
            if e.version > epoch {
                return Err(bad());
            }
            pages.push(e);
        }
        Ok((
            Manifest {
                geometry,
                epoch,
                pages,
                chunk_mac,
            },
            Root { epoch, mac },
        ))
    }
}

impl Manifest {
    /// The epoch a manifest's bytes claim, unverified (for a status that
    /// holds no key: the open verifies it).
    pub fn claimed_epoch(bytes: &[u8]) -> Option<u64> {
        let mut r = Reader { bytes };
        chunk_mac_of_magic(r.take(8)?)?;
        r.take(16 + 4 + 8)?;
        r.u64()
    }
}

/// The fuzz target's fixed integrity key and vault id (its seeds are
/// objects made with them).
#[doc(hidden)]
pub fn fuzz_key() -> (IntegrityKey, [u8; 16]) {
    (
        IntegrityKey::from_bytes(zeroize::Zeroizing::new([0x5a; 32])),
        [7u8; 16],
    )
}

/// The fuzz target's seeds: a manifest, a page (with its listing as the
/// first 48 bytes) and a root line, made with [`fuzz_key`].
#[doc(hidden)]
pub fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (key, vault) = fuzz_key();
    let geometry = Geometry::new(MIN_CHUNK, 4 * 65536).unwrap_or(Geometry {
        chunk_size: MIN_CHUNK,
        size: 4 * 65536,
    });
    let entry = Entry {
        version: 1,
        session: 2,
        mac: [3; 32],
    };
    let page = Page {
        index: 0,
        epoch: 1,
        session: 2,
        entries: vec![entry, Entry::EMPTY, entry, Entry::EMPTY],
    };
    let (page_bytes, page_mac) = page.encode(&key, &vault);
    let listed = Entry {
        version: 1,
        session: 2,
        mac: page_mac,
    };
    let mut manifest = Manifest {
        geometry,
        epoch: 1,
        pages: vec![listed],
        chunk_mac: ChunkMac::HmacSha256,
    };
    let (manifest_bytes, root) = manifest.encode(&key, &vault);
    manifest.chunk_mac = ChunkMac::Blake3;
    let mut m2 = vec![0u8];
    m2.extend_from_slice(&manifest.encode(&key, &vault).0);
    let mut page_seed = vec![1u8];
    let mut l = Vec::new();
    push_entry(&mut l, &listed);
    page_seed.extend_from_slice(&l);
    page_seed.extend_from_slice(&page_bytes);
    let mut m = vec![0u8];
    m.extend_from_slice(&manifest_bytes);
    let mut r = vec![2u8];
    r.extend_from_slice(root.to_line().as_bytes());
    vec![
        ("manifest", m),
        ("page", page_seed),
        ("root", r),
        ("manifest-blake3", m2),
    ]
}

/// For the fuzz target `remote_object`: the first byte chooses: 0, the
/// rest as a manifest; 1, the next 48 bytes as a page's listing in the
/// manifest and the rest as the page; else the rest as a root line.
/// Whatever verifies must encode back to the same bytes. Panics only on a
/// broken invariant.
#[doc(hidden)]
pub fn fuzz_object(data: &[u8]) {
    let (key, vault) = fuzz_key();
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    match first {
        0 => {
            let claimed = Manifest::claimed_epoch(rest);
            if let Ok((m, root)) = Manifest::decode(rest, &key, &vault) {
                assert_eq!(claimed, Some(m.epoch));
                let (again, r2) = m.encode(&key, &vault);
                assert_eq!(again, rest);
                assert_eq!(root, r2);
            }
        }
        1 => {
            let mut r = Reader { bytes: rest };
            let (Some(listed), body) = (r.entry(), r.bytes) else {
                return;
            };
            for count in [0, 1, 4, 4096] {
                if let Ok(p) = Page::decode(body, &key, &vault, (0, count), &listed) {
                    let (again, mac) = p.encode(&key, &vault);
                    assert_eq!(again, body);
                    assert_eq!(mac, listed.mac);
                }
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(root) = Root::from_line(text)
            {
                assert_eq!(Root::from_line(&root.to_line()).ok(), Some(root));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VAULT: [u8; 16] = *b"vault-id-0123456";

    #[test]
    fn geometry() {
        let g = Geometry::new(DEFAULT_CHUNK, 100 * 1024 * 1024 * 1024).unwrap();
        assert_eq!(g.chunks(), 102_400);
        assert_eq!(g.pages(), 25);
        assert_eq!(g.page_len(24), 102_400 - 24 * 4096);
        let g = Geometry::new(MIN_CHUNK, 3 * 65536 + 4096).unwrap();
        assert_eq!(g.chunks(), 4);
        assert_eq!(g.chunk_len(3), 4096);
        assert_eq!(g.chunk_len(4), 0);
        for (c, s) in [(3000, 4096), (1 << 27, 4096), (65536, 0), (65536, 100)] {
            assert!(Geometry::new(c, s).is_err(), "{c} {s}");
        }
    }

    #[test]
    fn names() {
        let k = Keys::new("/team/");
        assert_eq!(
            k.chunk(10, 3, 0xab),
            "team/c/00000000000a/0000000000000003.00000000000000ab"
        );
        assert_eq!(
            k.page(1, 255, 1),
            "team/p/00000001/00000000000000ff.0000000000000001"
        );
        assert_eq!(k.manifest(), "team/manifest");
        assert_eq!(Keys::new("").manifest(), "manifest");
    }

    #[test]
    fn roots_as_lines() {
        let r = Root {
            epoch: 42,
            mac: [0xab; 32],
        };
        assert_eq!(Root::from_line(&r.to_line()).unwrap(), r);
        for bad in [
            "",
            "42",
            "x abab",
            "42 abab",
            &format!("42 {} extra", "ab".repeat(32)),
        ] {
            assert!(Root::from_line(bad).is_err(), "{bad}");
        }
    }

    fn page(index: u64, epoch: u64, n: usize) -> Page {
        Page {
            index,
            epoch,
            session: 5,
            entries: (0..n)
                .map(|i| Entry {
                    version: (i as u64) % (epoch + 1),
                    session: 5,
                    mac: [u8::try_from(i % 251).unwrap(); 32],
                })
                .collect(),
        }
    }

    fn listed(epoch: u64, session: u64, mac: Mac) -> Entry {
        Entry {
            version: epoch,
            session,
            mac,
        }
    }

    #[test]
    fn pages_verify_against_the_manifests_mac_only() {
        let key = IntegrityKey::generate().unwrap();
        assert_eq!(ENTRIES_PER_PAGE, 4096, "Page::max_len counts 4096");
        let full = page(0, 1, 4096).encode(&key, &VAULT).0;
        assert_eq!(full.len(), Page::max_len());
        let p = page(2, 9, 100);
        let (bytes, mac) = p.encode(&key, &VAULT);
        let l = listed(9, 5, mac);
        assert_eq!(Page::decode(&bytes, &key, &VAULT, (2, 100), &l).unwrap(), p);
        // Another page, epoch, session, count or MAC; a flip.
        assert!(Page::decode(&bytes, &key, &VAULT, (3, 100), &l).is_err());
        assert!(Page::decode(&bytes, &key, &VAULT, (2, 100), &listed(8, 5, mac)).is_err());
        assert!(Page::decode(&bytes, &key, &VAULT, (2, 100), &listed(9, 6, mac)).is_err());
        assert!(Page::decode(&bytes, &key, &VAULT, (2, 99), &l).is_err());
        assert!(Page::decode(&bytes, &key, &VAULT, (2, 100), &listed(9, 5, [1; 32])).is_err());
        let older = page(2, 8, 100).encode(&key, &VAULT);
        assert!(Page::decode(&older.0, &key, &VAULT, (2, 100), &l).is_err());
        let mut flipped = bytes.clone();
        flipped[40] ^= 0x10;
        assert!(matches!(
            Page::decode(&flipped, &key, &VAULT, (2, 100), &l),
            Err(RemoteError::Tampered(_))
        ));
        assert!(Page::decode(&bytes[..10], &key, &VAULT, (2, 100), &l).is_err());
    }

    #[test]
    fn manifests_verify_with_the_key_and_the_vault() {
        let key = IntegrityKey::generate().unwrap();
        let g = Geometry::new(MIN_CHUNK, 10 * 4096 * 65536).unwrap();
        let mut m = Manifest {
            geometry: g,
            epoch: 12,
            pages: (0..g.pages())
                .map(|i| listed(i, 3, [u8::try_from(i % 256).unwrap(); 32]))
                .collect(),
            chunk_mac: ChunkMac::HmacSha256,
        };
        // Both kinds of store round-trip, and say which they are (in the
        // bytes the manifest's MAC covers: a store cannot switch one for
        // the other).
        let (old, _) = m.encode(&key, &VAULT);
        assert_eq!(&old[..8], b"CFRMANI1");
        m.chunk_mac = ChunkMac::Blake3;
        let (bytes, root) = m.encode(&key, &VAULT);
        assert_eq!(&bytes[..8], b"CFRMANI2");
        assert_eq!(old[8..old.len() - 32], bytes[8..bytes.len() - 32]);
        for b in [&old, &bytes] {
            let (back, _) = Manifest::decode(b, &key, &VAULT).unwrap();
            assert_eq!(
                back.chunk_mac,
                if b[7] == b'1' {
                    ChunkMac::HmacSha256
                } else {
                    ChunkMac::Blake3
                }
            );
            let mut switched = b.clone();
            switched[7] ^= b'1' ^ b'2';
            assert!(matches!(
                Manifest::decode(&switched, &key, &VAULT),
                Err(RemoteError::Tampered(_))
            ));
            let mut unknown = b.clone();
            unknown[7] = b'3';
            assert!(Manifest::decode(&unknown, &key, &VAULT).is_err());
        }
        let (back, r2) = Manifest::decode(&bytes, &key, &VAULT).unwrap();
        assert_eq!((back, r2), (m.clone(), root));
        assert!(Manifest::decode(&bytes, &key, b"another-vault-id").is_err());
        assert!(Manifest::decode(&bytes, &IntegrityKey::generate().unwrap(), &VAULT).is_err());
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(Manifest::decode(&flipped, &key, &VAULT).is_err());
        // A page epoch after the manifest's: refused even when signed.
        let mut future = m.clone();
        future.pages[0].version = 13;
        let (bytes, _) = future.encode(&key, &VAULT);
        assert!(Manifest::decode(&bytes, &key, &VAULT).is_err());
    }

    #[test]
    fn the_fuzz_seeds_verify() {
        let (key, vault) = fuzz_key();
        let seeds = fuzz_seeds();
        let m = &seeds[0].1;
        assert!(Manifest::decode(&m[1..], &key, &vault).is_ok());
        let p = &seeds[1].1;
        let listed = Reader { bytes: &p[1..49] }.entry().unwrap();
        assert!(Page::decode(&p[49..], &key, &vault, (0, 4), &listed).is_ok());
        assert!(Root::from_line(std::str::from_utf8(&seeds[2].1[1..]).unwrap()).is_ok());
        for (_, s) in seeds {
            fuzz_object(&s);
        }
        // The committed seeds are these.
        // (COFFRE_WRITE_SEEDS=1 cargo test -p coffre-remote seeds writes
        // them again.)
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/remote_object");
        if std::env::var_os("COFFRE_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in fuzz_seeds() {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        for (name, bytes) in fuzz_seeds() {
            let on_disk = std::fs::read(dir.join(name)).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "fuzz/seeds/remote_object/{name} is stale: regenerate it"
            );
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_refused_or_round_trip(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz_object(&data);
        }
    }
}

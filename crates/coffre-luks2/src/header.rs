//! Both header copies together: loading (the valid copy with the higher
//! seqid wins, damage is reported), encoding, and the pure keyslot and
//! format operations on a header.

use crate::binary::{self, BinaryHeader, Copy, VALID_HDR_SIZES};
use crate::digest::Pbkdf2Digest;
use crate::hash::HashAlg;
use crate::kdf::KdfParams;
use crate::keyslot;
use crate::metadata::{
    AREA_ALIGN, AfEntry, Area, Config, DigestEntry, Id, Keyslot, Layout, Metadata, Segment,
    SegmentSize, U64s,
};
use crate::{
    BINARY_HEADER_SIZE, Error, KEYSLOT_SECTOR_SIZE, MAX_KEYSLOTS, Passphrase, Result, SecretBytes,
    VolumeKey,
};
use serde_json::Map;
use std::collections::BTreeMap;

/// What was found at one copy's place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    /// Valid and current.
    Valid {
        /// Its seqid.
        seqid: u64,
    },
    /// Valid but older than the other copy (an interrupted write).
    Stale {
        /// Its seqid.
        seqid: u64,
    },
    /// Unusable, with the reason.
    Damaged(String),
}

impl CopyState {
    /// Whether this copy is valid and current.
    pub fn is_valid(&self) -> bool {
        matches!(self, CopyState::Valid { .. })
    }
}

/// A complete, validated LUKS2 header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Binary fields (of the winning copy).
    pub binary: BinaryHeader,
    /// The salt of the other copy, kept so rewrites change only what they
    /// mean to.
    pub secondary_salt: [u8; 64],
    /// JSON metadata.
    pub metadata: Metadata,
}

/// The area a keyslot for a `key_len`-byte key takes (4096-aligned).
fn area_size_for(key_len: usize) -> Result<u64> {
    let raw = u64::try_from(key_len)
        .ok()
        .and_then(|l| l.checked_mul(u64::from(AF_STRIPES)))
        .ok_or_else(|| Error::invalid("key too large"))?;
    let material = raw.div_ceil(KEYSLOT_SECTOR_SIZE as u64) * KEYSLOT_SECTOR_SIZE as u64;
    Ok(material.div_ceil(AREA_ALIGN) * AREA_ALIGN)
}

/// A keyslot sealed for a volume key and a passphrase, not yet placed in
/// any header (no area, no number): see [`Header::seal_keyslot`]. Its
/// material is secret until written, and wiped when dropped.
pub struct SealedKeyslot {
    keyslot: Keyslot,
    material: SecretBytes,
    /// The segment digest (salt, digest) it was checked against: which
    /// volume key it holds.
    digest: (String, String),
}

impl std::fmt::Debug for SealedKeyslot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedKeyslot")
            .field("kdf", &self.keyslot.kdf.kind)
            .finish_non_exhaustive()
    }
}

/// A header as loaded, with the state of each copy.
#[derive(Clone, Debug)]
pub struct LoadedHeader {
    /// The header to use.
    pub header: Header,
    /// State of the primary copy.
    pub primary: CopyState,
    /// State of the secondary copy.
    pub secondary: CopyState,
}

impl LoadedHeader {
    /// Whether both copies are valid and current (safe to write).
    pub fn is_consistent(&self) -> bool {
        self.primary.is_valid() && self.secondary.is_valid()
    }
}

/// How one copy reads, in the terms cryptsetup decides by (rules C1-C8).
enum CopyRead {
    /// Binary header, checksum and JSON area valid.
    Good(BinaryHeader, Box<Metadata>),
    /// Binary header and checksum valid, JSON area not: the copy names its
    /// size (the first field), so no other place is searched for the
    /// secondary.
    BadJson(u64, Error),
    /// Binary header or checksum invalid, or the copy could not be read.
    Bad(Error),
}

impl CopyRead {
    fn into_result(self) -> Result<(BinaryHeader, Metadata)> {
        match self {
            CopyRead::Good(b, m) => Ok((b, *m)),
            CopyRead::BadJson(_, e) | CopyRead::Bad(e) => Err(e),
        }
    }
    fn unsupported(&self) -> Option<&Error> {
        match self {
            CopyRead::BadJson(_, e @ Error::Unsupported(_))
            | CopyRead::Bad(e @ Error::Unsupported(_)) => Some(e),
            _ => None,
        }
    }
}

fn classify(area: &[u8], copy: Copy, at: u64) -> CopyRead {
    let bin = match binary::parse(area, copy, at) {
        Ok(b) => b,
        Err(e) => return CopyRead::Bad(e),
    };
    let size = usize::try_from(bin.hdr_size).unwrap_or(usize::MAX);
    if area.len() < size {
        return CopyRead::Bad(Error::corrupt(format!(
            "truncated: {} of {size} header bytes",
            area.len()
        )));
    }
    let area = &area[..size];
    if let Err(e) = binary::verify_checksum(area, &bin.checksum_alg) {
        return CopyRead::Bad(e);
    }
    let hdr_size = bin.hdr_size;
    match Metadata::from_area(&area[BINARY_HEADER_SIZE..], hdr_size) {
        Ok(meta) => CopyRead::Good(bin, Box::new(meta)),
        Err(e) => CopyRead::BadJson(hdr_size, e),
    }
}

/// Parses one copy, `area` being exactly `hdr_size` bytes read at `at`.
pub fn parse_copy(area: &[u8], copy: Copy, at: u64) -> Result<(BinaryHeader, Metadata)> {
    classify(area, copy, at).into_result()
}

/// Reads `len` bytes at `offset`; `Ok(None)` when the device is too short.
pub type ReadFn<'a, E> = dyn FnMut(u64, usize) -> std::result::Result<Option<Vec<u8>>, E> + 'a;

fn read_copy<E>(read: &mut ReadFn<'_, E>, copy: Copy, at: u64) -> std::result::Result<CopyRead, E> {
    let Some(first) = read(at, BINARY_HEADER_SIZE)? else {
        return Ok(CopyRead::Bad(Error::corrupt(
            "device too short for a header",
        )));
    };
    let bin = match binary::parse(&first, copy, at) {
        Ok(b) => b,
        Err(e) => return Ok(CopyRead::Bad(e)),
    };
    let size = usize::try_from(bin.hdr_size).unwrap_or(usize::MAX);
    let Some(area) = read(at, size)? else {
        return Ok(CopyRead::Bad(Error::corrupt(
            "device too short for its header",
        )));
    };
    Ok(classify(&area, copy, at))
}

/// Loads a header through `read`, trying both copies as cryptsetup does.
///
/// I/O errors from `read` come back in the outer `Err`; format problems in
/// the inner one.
pub fn load<E>(read: &mut ReadFn<'_, E>) -> std::result::Result<Result<LoadedHeader>, E> {
    // A1-A4: cryptsetup's type detection reads the primary's version
    // before anything else: LUKS1, or a version above 2, ends the load
    // there whatever the secondary holds.
    if let Some(first) = read(0, 8)?
        && first[..6] == binary::MAGIC_PRIMARY
    {
        match u16::from_be_bytes([first[6], first[7]]) {
            1 => {
                return Ok(Err(Error::NotLuks2(
                    "a LUKS1 header (coffre reads LUKS2 only)".into(),
                )));
            }
            v if v > 2 => return Ok(Err(Error::NotLuks2(format!("LUKS version {v}")))),
            _ => {}
        }
    }
    let primary = read_copy(read, Copy::Primary, 0)?;
    let secondary = match &primary {
        // C2: a primary whose binary header holds names the secondary's
        // place; nothing else is searched.
        CopyRead::Good(b, _) => read_copy(read, Copy::Secondary, b.hdr_size)?,
        CopyRead::BadJson(at, _) => read_copy(read, Copy::Secondary, *at)?,
        // C3: otherwise every size the format allows, and the first place
        // whose binary header and checksum hold is the secondary, even if
        // its JSON area then fails.
        CopyRead::Bad(_) => {
            let mut found = CopyRead::Bad(Error::corrupt("no secondary header found"));
            let mut telling = false;
            for at in VALID_HDR_SIZES {
                let r = read_copy(read, Copy::Secondary, at)?;
                match r {
                    CopyRead::Bad(Error::NotLuks2(_)) => {}
                    CopyRead::Bad(_) => {
                        if !telling {
                            found = r;
                            telling = true;
                        }
                    }
                    _ => {
                        found = r;
                        break;
                    }
                }
            }
            found
        }
    };
    // Never go near a volume we only half understand.
    for r in [&primary, &secondary] {
        if let Some(Error::Unsupported(m)) = r.unsupported() {
            return Ok(Err(Error::Unsupported(m.clone())));
        }
    }
    // P1 (the device holds all the metadata) is the storage layer's to
    // check: it knows the device.
    Ok(choose(primary.into_result(), secondary.into_result()))
}

fn choose(
    primary: Result<(BinaryHeader, Metadata)>,
    secondary: Result<(BinaryHeader, Metadata)>,
) -> Result<LoadedHeader> {
    match (primary, secondary) {
        (Err(p), Err(s)) => Err(
            if matches!(p, Error::NotLuks2(_))
                && matches!(s, Error::NotLuks2(_) | Error::Corrupt(_))
                && !matches!(s, Error::Corrupt(ref m) if m != "no secondary header found")
            {
                p
            } else {
                Error::NoValidHeader {
                    primary: p.to_string(),
                    secondary: s.to_string(),
                }
            },
        ),
        (Ok((pb, pm)), Err(s)) => Ok(LoadedHeader {
            primary: CopyState::Valid { seqid: pb.seqid },
            secondary: CopyState::Damaged(s.to_string()),
            header: Header {
                secondary_salt: fresh_salt(),
                binary: pb,
                metadata: pm,
            },
        }),
        (Err(p), Ok((sb, sm))) => Ok(LoadedHeader {
            primary: CopyState::Damaged(p.to_string()),
            secondary: CopyState::Valid { seqid: sb.seqid },
            header: Header {
                secondary_salt: sb.salt,
                binary: BinaryHeader {
                    salt: fresh_salt(),
                    ..sb
                },
                metadata: sm,
            },
        }),
        (Ok((pb, pm)), Ok((sb, sm))) => {
            let (ps, ss) = (pb.seqid, sb.seqid);
            if ss > ps {
                Ok(LoadedHeader {
                    primary: CopyState::Stale { seqid: ps },
                    secondary: CopyState::Valid { seqid: ss },
                    header: Header {
                        secondary_salt: sb.salt,
                        binary: BinaryHeader {
                            salt: pb.salt,
                            ..sb
                        },
                        metadata: sm,
                    },
                })
            } else {
                let secondary = if ss < ps {
                    CopyState::Stale { seqid: ss }
                } else if pm != sm || pb.hdr_size != sb.hdr_size || pb.uuid != sb.uuid {
                    CopyState::Damaged("differs from the primary copy with the same seqid".into())
                } else {
                    CopyState::Valid { seqid: ss }
                };
                Ok(LoadedHeader {
                    primary: CopyState::Valid { seqid: ps },
                    secondary,
                    header: Header {
                        secondary_salt: sb.salt,
                        binary: pb,
                        metadata: pm,
                    },
                })
            }
        }
    }
}

fn fresh_salt() -> [u8; 64] {
    let mut s = [0u8; 64];
    crate::secret::fill_random(&mut s);
    s
}

/// Options for a new volume.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Volume key size in bytes (32 or 64).
    pub key_size: usize,
    /// Data sector size.
    pub sector_size: u32,
    /// KDF costs for keyslot 0.
    pub kdf: KdfParams,
    /// pbkdf2 iterations for the volume-key digest.
    pub digest_iterations: u32,
    /// LUKS2 label (`cryptsetup --label`), at most 47 bytes.
    pub label: String,
    /// LUKS2 subsystem (`cryptsetup --subsystem`), at most 47 bytes.
    pub subsystem: String,
    /// Size of one header copy (16 KiB by default).
    pub hdr_size: u64,
    /// Size of the keyslots area.
    pub keyslots_size: u64,
    /// Data offset on the data device (0 for a detached header).
    pub data_offset: u64,
    /// Fixed segment size, or dynamic.
    pub segment_size: Option<u64>,
}

/// cryptsetup's default: 16 KiB header copies, 16 MiB of metadata.
pub const DEFAULT_HDR_SIZE: u64 = 16 * 1024;
/// Total metadata cryptsetup reserves by default (header copies and keyslots).
pub const DEFAULT_METADATA_SIZE: u64 = 16 * 1024 * 1024;
/// Stripes of the AF splitter.
pub const AF_STRIPES: u32 = 4000;

impl Header {
    /// Geometry of the metadata.
    pub fn layout(&self) -> Layout {
        self.metadata.layout(self.binary.hdr_size)
    }

    /// Data segment parameters: (offset, size, sector size, first IV).
    pub fn segment(&self) -> Result<&Segment> {
        Ok(self.metadata.segment()?.1)
    }

    /// Volume key size in bytes.
    pub fn key_size(&self) -> Result<usize> {
        let (_, d) = self.metadata.segment_digest()?;
        let slot = d
            .keyslots
            .first()
            .ok_or_else(|| Error::corrupt("the data segment has no keyslot"))?;
        Ok(self.metadata.keyslots[slot].key_size as usize)
    }

    /// Keyslots to try for a passphrase, best first: `prefer`, then
    /// `normal`; `ignore` only when asked for by number.
    pub fn keyslots_to_try(&self, only: Option<u32>) -> Result<Vec<u32>> {
        let (_, d) = self.metadata.segment_digest()?;
        if let Some(n) = only {
            if !d.keyslots.contains(&Id(n)) {
                return Err(Error::KeyslotNotFound(n));
            }
            return Ok(vec![n]);
        }
        let mut ids: Vec<(u32, u32)> = d
            .keyslots
            .iter()
            .map(|id| (self.metadata.keyslots[id].priority(), id.0))
            .filter(|(p, _)| *p > 0)
            .collect();
        ids.sort_by_key(|(p, id)| (std::cmp::Reverse(*p), *id));
        Ok(ids.into_iter().map(|(_, id)| id).collect())
    }

    /// Where keyslot `n`'s material lives on the header device (offset,
    /// length to read).
    pub fn keyslot_material_range(&self, n: u32) -> Result<(u64, usize)> {
        let k = self
            .metadata
            .keyslots
            .get(&Id(n))
            .ok_or(Error::KeyslotNotFound(n))?;
        let len = usize::try_from(k.material_len()?)
            .map_err(|_| Error::corrupt("keyslot material too large"))?;
        Ok((k.area.offset.0, len))
    }

    /// Opens keyslot `n` with `passphrase`, given its material bytes, and
    /// checks the result against the segment digest.
    pub fn unlock_keyslot(
        &self,
        n: u32,
        passphrase: &Passphrase,
        material: &[u8],
    ) -> Result<VolumeKey> {
        let k = self
            .metadata
            .keyslots
            .get(&Id(n))
            .ok_or(Error::KeyslotNotFound(n))?;
        let candidate = keyslot::open(k, passphrase, material)?;
        let (_, d) = self
            .metadata
            .digest_of_keyslot(Id(n))
            .ok_or_else(|| Error::corrupt(format!("keyslot {n} has no digest")))?;
        let digest = d.to_pbkdf2()?;
        let matches = digest.verify(&candidate);
        crate::secret::scrub_stack();
        if matches? {
            Ok(candidate.verified_by(digest))
        } else {
            Err(Error::WrongPassphrase)
        }
    }

    /// Checks that `key` is this volume's key.
    pub fn verify_volume_key(&self, key: &VolumeKey) -> Result<()> {
        let (_, d) = self.metadata.segment_digest()?;
        if key.len() != self.key_size()? {
            return Err(Error::WrongVolumeKey);
        }
        let digest = d.to_pbkdf2()?;
        // A key from one of this header's keyslots was checked against
        // this very digest when it was unlocked: the derivation would give
        // the same answer.
        if key.was_verified_by(&digest) {
            return Ok(());
        }
        let matches = digest.verify(key);
        crate::secret::scrub_stack();
        if !matches? {
            return Err(Error::WrongVolumeKey);
        }
        Ok(())
    }

    /// The lowest free keyslot number.
    pub fn free_keyslot(&self) -> Result<u32> {
        (0..MAX_KEYSLOTS)
            .find(|n| !self.metadata.keyslots.contains_key(&Id(*n)))
            .ok_or_else(|| Error::NoRoom("all 32 keyslots are in use".into()))
    }

    /// Finds a free, 4096-aligned stretch of the keyslots area of `len`
    /// bytes, avoiding every existing area and `also_avoid`.
    fn allocate_area(&self, len: u64, also_avoid: Option<(u64, u64)>) -> Result<u64> {
        let layout = self.layout();
        let mut used: Vec<(u64, u64)> = self
            .metadata
            .keyslots
            .values()
            .map(|k| (k.area.offset.0, k.area.offset.0 + k.area.size.0))
            .chain(also_avoid)
            .collect();
        used.sort();
        let mut at = layout.keyslots_start();
        for (s, e) in used {
            if at + len <= s {
                return Ok(at);
            }
            at = at.max(e.div_ceil(AREA_ALIGN) * AREA_ALIGN);
        }
        if at + len <= layout.metadata_end() {
            Ok(at)
        } else {
            Err(Error::NoRoom("the keyslots area is full".into()))
        }
    }

    /// Seals `key` for `passphrase` into a keyslot that belongs to no
    /// header yet: the slow part of adding or replacing a keyslot (the
    /// KDF), done from a copy of the header so that nobody holds the real
    /// one meanwhile. [`Header::add_sealed`] or
    /// [`Header::replace_with_sealed`] then places it, after checking it
    /// still fits the header they are given.
    pub fn seal_keyslot(
        &self,
        key: &VolumeKey,
        passphrase: &Passphrase,
        kdf: KdfParams,
        priority: Option<u32>,
    ) -> Result<SealedKeyslot> {
        self.verify_volume_key(key)?;
        self.seal_unchecked(key, passphrase, kdf, priority)
    }

    /// [`Header::seal_keyslot`] without checking `key` against the digest.
    fn seal_unchecked(
        &self,
        key: &VolumeKey,
        passphrase: &Passphrase,
        kdf: KdfParams,
        priority: Option<u32>,
    ) -> Result<SealedKeyslot> {
        kdf.validate()?;
        let (_, digest) = self.metadata.segment_digest()?;
        let encryption = self.segment()?.encryption.clone();
        let key_size = u32::try_from(key.len()).map_err(|_| Error::invalid("key too large"))?;
        let mut ks = Keyslot {
            kind: "luks2".into(),
            key_size,
            af: AfEntry {
                kind: "luks1".into(),
                stripes: AF_STRIPES,
                hash: HashAlg::Sha256.name().into(),
                extra: Map::new(),
            },
            area: Area {
                kind: "raw".into(),
                offset: U64s(0),
                size: U64s(0),
                encryption,
                key_size,
                extra: Map::new(),
            },
            kdf: Keyslot::kdf_entry(&kdf.with_fresh_salt()),
            priority,
            extra: Map::new(),
        };
        ks.area.size = U64s(ks.material_len()?.div_ceil(AREA_ALIGN) * AREA_ALIGN);
        // The material does not depend on where the area will be: its IVs
        // count from the area's first sector.
        let material = keyslot::seal(&ks, key, passphrase)?;
        Ok(SealedKeyslot {
            keyslot: ks,
            material,
            digest: (digest.salt.clone(), digest.digest.clone()),
        })
    }

    /// Refuses a sealed keyslot made for another volume key (the header
    /// was re-keyed or replaced since it was sealed).
    fn check_sealed(&self, sealed: &SealedKeyslot) -> Result<()> {
        let (_, d) = self.metadata.segment_digest()?;
        let same_key = d.salt == sealed.digest.0 && d.digest == sealed.digest.1;
        if !same_key || self.segment()?.encryption != sealed.keyslot.area.encryption {
            return Err(Error::WrongVolumeKey);
        }
        Ok(())
    }

    /// Places a sealed keyslot as keyslot `slot` (the lowest free one if
    /// `None`) in a free area. Returns the slot number, the area offset
    /// and the material to write there *before* writing the header.
    pub fn add_sealed(
        &mut self,
        slot: Option<u32>,
        sealed: SealedKeyslot,
    ) -> Result<(u32, u64, SecretBytes)> {
        self.check_sealed(&sealed)?;
        let n = match slot {
            Some(n) if n >= MAX_KEYSLOTS => {
                return Err(Error::invalid(format!(
                    "keyslot numbers go from 0 to {}",
                    MAX_KEYSLOTS - 1
                )));
            }
            Some(n) if self.metadata.keyslots.contains_key(&Id(n)) => {
                return Err(Error::KeyslotInUse(n));
            }
            Some(n) => n,
            None => self.free_keyslot()?,
        };
        let SealedKeyslot {
            keyslot: mut ks,
            material,
            ..
        } = sealed;
        ks.area.offset = U64s(self.allocate_area(ks.area.size.0, None)?);
        let offset = ks.area.offset.0;
        self.metadata.keyslots.insert(Id(n), ks);
        let (did, _) = self.metadata.segment_digest()?;
        let d = self.metadata.digests.get_mut(&did).expect("digest exists");
        d.keyslots.push(Id(n));
        d.keyslots.sort();
        self.metadata.validate(self.binary.hdr_size)?;
        Ok((n, offset, material))
    }

    /// Adds a keyslot holding `key` (which must be this volume's key) for
    /// `passphrase`: [`Header::seal_keyslot`] then [`Header::add_sealed`].
    pub fn add_keyslot(
        &mut self,
        slot: Option<u32>,
        key: &VolumeKey,
        passphrase: &Passphrase,
        kdf: KdfParams,
        priority: Option<u32>,
    ) -> Result<(u32, u64, SecretBytes)> {
        // Cheap refusals before the KDF's seconds.
        if let Some(n) = slot
            && self.metadata.keyslots.contains_key(&Id(n))
        {
            return Err(Error::KeyslotInUse(n));
        }
        if slot.is_none() {
            self.free_keyslot()?;
        }
        self.allocate_area(area_size_for(key.len())?, None)?;
        let sealed = self.seal_keyslot(key, passphrase, kdf, priority)?;
        self.add_sealed(slot, sealed)
    }

    /// Puts a sealed keyslot in place of keyslot `n`, in a different area
    /// (so the old material stays intact until the new header is
    /// written); `n` keeps its priority and extra fields. Refuses when `n`
    /// no longer exists: a keyslot removed meanwhile is never brought
    /// back. Returns (new offset, material, old area to wipe).
    pub fn replace_with_sealed(
        &mut self,
        n: u32,
        sealed: SealedKeyslot,
    ) -> Result<(u64, SecretBytes, (u64, u64))> {
        self.check_sealed(&sealed)?;
        let old = self
            .metadata
            .keyslots
            .get(&Id(n))
            .ok_or(Error::KeyslotNotFound(n))?
            .clone();
        if self.metadata.digest_of_keyslot(Id(n)).is_none() {
            return Err(Error::KeyslotNotFound(n));
        }
        let old_area = (old.area.offset.0, old.area.size.0);
        let SealedKeyslot {
            keyslot: mut ks,
            material,
            ..
        } = sealed;
        ks.priority = old.priority;
        ks.extra = old.extra;
        ks.area.offset =
            U64s(self.allocate_area(ks.area.size.0, Some((old_area.0, old_area.0 + old_area.1)))?);
        let offset = ks.area.offset.0;
        self.metadata.keyslots.insert(Id(n), ks);
        self.metadata.validate(self.binary.hdr_size)?;
        Ok((offset, material, old_area))
    }

    /// Replaces keyslot `n` with a new one for `passphrase`:
    /// [`Header::seal_keyslot`] then [`Header::replace_with_sealed`].
    pub fn replace_keyslot(
        &mut self,
        n: u32,
        key: &VolumeKey,
        passphrase: &Passphrase,
        kdf: KdfParams,
    ) -> Result<(u64, SecretBytes, (u64, u64))> {
        let old = self
            .metadata
            .keyslots
            .get(&Id(n))
            .ok_or(Error::KeyslotNotFound(n))?;
        let old_end = old.area.offset.0 + old.area.size.0;
        self.allocate_area(
            area_size_for(key.len())?,
            Some((old.area.offset.0, old_end)),
        )?;
        let sealed = self.seal_keyslot(key, passphrase, kdf, None)?;
        self.replace_with_sealed(n, sealed)
    }

    /// Removes keyslot `n` from the metadata (and from digests and tokens
    /// that name it). Returns its area (offset, size), to be wiped after the
    /// new header is written. Refuses to remove the last keyslot of the data
    /// segment unless `allow_last`.
    pub fn remove_keyslot(&mut self, n: u32, allow_last: bool) -> Result<(u64, u64)> {
        let k = self
            .metadata
            .keyslots
            .get(&Id(n))
            .ok_or(Error::KeyslotNotFound(n))?;
        let area = (k.area.offset.0, k.area.size.0);
        let (_, d) = self.metadata.segment_digest()?;
        if !allow_last && d.keyslots == [Id(n)] {
            return Err(Error::invalid(format!(
                "keyslot {n} is the last one that opens the data; removing it would lose the data for good"
            )));
        }
        self.metadata.keyslots.remove(&Id(n));
        for d in self.metadata.digests.values_mut() {
            d.keyslots.retain(|s| *s != Id(n));
        }
        let name = n.to_string();
        for t in self.metadata.tokens.values_mut() {
            if let Some(list) = t.get_mut("keyslots").and_then(|l| l.as_array_mut()) {
                list.retain(|v| v.as_str() != Some(name.as_str()));
            }
        }
        self.metadata.validate(self.binary.hdr_size)?;
        Ok(area)
    }

    /// Sets keyslot `n`'s priority (0 ignore, 1 normal, 2 prefer).
    pub fn set_priority(&mut self, n: u32, priority: u32) -> Result<()> {
        if priority > 2 {
            return Err(Error::invalid(
                "priority is 0 (ignore), 1 (normal) or 2 (prefer)",
            ));
        }
        let k = self
            .metadata
            .keyslots
            .get_mut(&Id(n))
            .ok_or(Error::KeyslotNotFound(n))?;
        // cryptsetup leaves "normal" implicit.
        k.priority = if priority == 1 { None } else { Some(priority) };
        Ok(())
    }

    /// Sets (or replaces) token `id`; the token must name existing
    /// keyslots and have a `type`, as LUKS2 requires.
    pub fn set_token(&mut self, id: u32, token: serde_json::Value) -> Result<()> {
        if id >= MAX_KEYSLOTS {
            return Err(Error::invalid(format!(
                "token ids go from 0 to {}",
                MAX_KEYSLOTS - 1
            )));
        }
        let before = self.metadata.tokens.insert(Id(id), token);
        if let Err(e) = self.metadata.validate(self.binary.hdr_size) {
            match before {
                Some(t) => self.metadata.tokens.insert(Id(id), t),
                None => self.metadata.tokens.remove(&Id(id)),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes token `id` (no error if absent).
    pub fn remove_token(&mut self, id: u32) {
        self.metadata.tokens.remove(&Id(id));
    }

    /// Encodes both copies (primary, secondary), each `hdr_size` bytes, and
    /// parses them back: a header we could not read again is never
    /// returned for writing.
    pub fn encode(&self) -> Result<[Vec<u8>; 2]> {
        let size = usize::try_from(self.binary.hdr_size)
            .map_err(|_| Error::invalid("header size does not fit in memory"))?;
        let json = self.metadata.to_json()?;
        if json.len() >= size - BINARY_HEADER_SIZE {
            return Err(Error::NoRoom(format!(
                "the JSON metadata ({} bytes) does not fit the {}-byte JSON area",
                json.len(),
                size - BINARY_HEADER_SIZE
            )));
        }
        let mut out = [vec![0u8; size], vec![0u8; size]];
        for (i, copy) in [Copy::Primary, Copy::Secondary].into_iter().enumerate() {
            let area = &mut out[i];
            area[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + json.len()].copy_from_slice(&json);
            let bin = match copy {
                Copy::Primary => self.binary.clone(),
                Copy::Secondary => BinaryHeader {
                    salt: self.secondary_salt,
                    ..self.binary.clone()
                },
            };
            bin.encode_into(copy, area)?;
            let at = if i == 0 { 0 } else { self.binary.hdr_size };
            let (b2, m2) = parse_copy(area, copy, at).map_err(|e| {
                Error::invalid(format!(
                    "refusing to write a header that does not read back: {e}"
                ))
            })?;
            if m2 != self.metadata || b2.seqid != self.binary.seqid {
                return Err(Error::invalid(
                    "refusing to write a header that does not read back identically",
                ));
            }
        }
        Ok(out)
    }

    /// Builds a new header and keyslot 0. Returns the header and the
    /// keyslot material to write at its area offset.
    pub fn format(
        opts: &FormatOptions,
        key: &VolumeKey,
        passphrase: &Passphrase,
    ) -> Result<(Header, u64, SecretBytes)> {
        crate::cipher::check_spec(crate::cipher::SUPPORTED_ENCRYPTION, opts.key_size)?;
        if key.len() != opts.key_size {
            return Err(Error::invalid("volume key size does not match"));
        }
        if !VALID_HDR_SIZES.contains(&opts.hdr_size) {
            return Err(Error::invalid("invalid header size"));
        }
        if opts.data_offset != 0 && opts.data_offset < 2 * opts.hdr_size + opts.keyslots_size {
            return Err(Error::invalid("the data offset overlaps the metadata"));
        }
        let digest = Pbkdf2Digest::create(key, HashAlg::Sha256, opts.digest_iterations);
        let segment = Segment {
            kind: "crypt".into(),
            offset: U64s(opts.data_offset),
            size: opts
                .segment_size
                .map_or(SegmentSize::Dynamic, SegmentSize::Bytes),
            iv_tweak: U64s(0),
            encryption: crate::cipher::SUPPORTED_ENCRYPTION.into(),
            sector_size: opts.sector_size,
            integrity: None,
            flags: None,
            extra: Map::new(),
        };
        let mut segments = BTreeMap::new();
        segments.insert(Id(0), segment);
        let mut digests = BTreeMap::new();
        digests.insert(
            Id(0),
            DigestEntry::from_pbkdf2(&digest, vec![], vec![Id(0)]),
        );
        let mut header = Header {
            binary: BinaryHeader {
                hdr_size: opts.hdr_size,
                seqid: 1,
                label: opts.label.clone(),
                checksum_alg: "sha256".into(),
                salt: fresh_salt(),
                uuid: binary::new_uuid(),
                subsystem: opts.subsystem.clone(),
            },
            secondary_salt: fresh_salt(),
            metadata: Metadata {
                keyslots: BTreeMap::new(),
                tokens: BTreeMap::new(),
                segments,
                digests,
                config: Config {
                    json_size: U64s(opts.hdr_size - BINARY_HEADER_SIZE as u64),
                    keyslots_size: U64s(opts.keyslots_size),
                    flags: None,
                    requirements: None,
                    extra: Map::new(),
                },
                extra: Map::new(),
            },
        };
        // The digest was just made from `key`: nothing to check it against.
        let sealed = header.seal_unchecked(key, passphrase, opts.kdf, None)?;
        let (_, offset, material) = header.add_sealed(Some(0), sealed)?;
        header.encode()?;
        Ok((header, offset, material))
    }
}

//! A LUKS2 volume on its devices, before and around unlocking: header
//! loading, keyslot changes in a crash-safe order, repair, and format.

use crate::{BlockDevice, EncryptedVolume, Engine, Error, FileDevice, Result};
use coffre_luks2::binary::Copy;
use coffre_luks2::cipher::{Provider, select};
use coffre_luks2::header::{self, FormatOptions, SealedKeyslot};
use coffre_luks2::kdf::KdfParams;
use coffre_luks2::{CopyState, Header, LoadedHeader, Passphrase, SecretBytes, VolumeKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An opened (locked against other processes) but not yet unlocked LUKS2
/// volume.
pub struct Luks2Container {
    data: Arc<FileDevice>,
    /// The header device: the data device itself, or a detached file.
    header_dev: Arc<FileDevice>,
    detached: bool,
    /// A detached header given alone: its data segment starts at 0 on the
    /// device that holds it, so the data is elsewhere.
    header_only: bool,
    loaded: LoadedHeader,
}

impl std::fmt::Debug for Luks2Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Luks2Container")
            .field("data", &self.data.path())
            .field("header", &self.header_dev.path())
            .finish_non_exhaustive()
    }
}

/// What `repair` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairAction {
    /// Both copies were fine.
    NothingToDo,
    /// The primary copy was rewritten from the secondary.
    RewrotePrimary(String),
    /// The secondary copy was rewritten from the primary.
    RewroteSecondary(String),
}

/// Parameters of `format` beyond the LUKS2 options.
#[derive(Debug, Clone)]
pub struct FormatRequest {
    /// LUKS2 options (the data offset is filled in from `detached`).
    pub options: FormatOptions,
    /// Size of the data area to create, for a new or growing file.
    pub data_size: Option<u64>,
    /// Overwrite an existing LUKS header.
    pub force: bool,
}

fn load_from(dev: &FileDevice) -> Result<LoadedHeader> {
    let mut read = |off: u64, len: usize| dev.read_exact_or_short(off, len);
    header::load(&mut read)?.map_err(Error::from)
}

impl Luks2Container {
    /// Opens the volume at `data_path`, with its header in `header_path` if
    /// detached. Takes exclusive locks on both.
    pub fn open(data_path: &Path, header_path: Option<&Path>) -> Result<Self> {
        let data = Arc::new(FileDevice::open_locked(data_path, false)?);
        let (header_dev, detached) = match header_path {
            Some(h) if !same_file(h, data_path) => {
                (Arc::new(FileDevice::open_locked(h, false)?), true)
            }
            _ => (data.clone(), false),
        };
        let loaded = load_from(&header_dev)?;
        let mut c = Self {
            data,
            header_dev,
            detached,
            header_only: false,
            loaded,
        };
        c.check_geometry()?;
        Ok(c)
    }

    fn check_geometry(&mut self) -> Result<()> {
        let h = self.header();
        let seg = h.segment()?;
        let end = h.layout().metadata_end();
        // A segment at 0 on the header's own device is a detached header
        // given alone (cryptsetup reads it so too): its header can be read
        // and changed, its data is elsewhere. A segment inside the
        // metadata at any other offset fails cryptsetup's rules already.
        self.header_only = !self.detached && seg.offset.0 < end;
        let hsize = self
            .header_dev
            .size()
            .map_err(|e| Error::io("size of", self.header_dev.path(), e))?;
        if hsize < end {
            // As cryptsetup: the device holds all the metadata the header
            // describes, keyslots area included, or the header is not used.
            return Err(coffre_luks2::Error::Corrupt(format!(
                "{} holds {hsize} bytes, less than the {end} bytes of metadata its header describes",
                self.header_dev.path().display()
            ))
            .into());
        }
        Ok(())
    }

    /// The current header.
    pub fn header(&self) -> &Header {
        &self.loaded.header
    }

    /// State of the (primary, secondary) copies.
    pub fn copies(&self) -> (&CopyState, &CopyState) {
        (&self.loaded.primary, &self.loaded.secondary)
    }

    /// Whether the header is detached from the data.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// Path of the data device.
    pub fn data_path(&self) -> &Path {
        self.data.path()
    }

    /// Path of the header device.
    pub fn header_path(&self) -> &Path {
        self.header_dev.path()
    }

    fn read_material(&self, slot: u32) -> Result<SecretBytes> {
        let (off, len) = self.header().keyslot_material_range(slot)?;
        let mut buf = SecretBytes::zeroed(len);
        self.header_dev
            .read_at(off, buf.expose_mut())
            .map_err(|e| Error::io("read keyslot from", self.header_dev.path(), e))?;
        Ok(buf)
    }

    /// Finds the keyslot `passphrase` opens (only `slot` if given) and
    /// returns it with the volume key. Tries keyslots by priority.
    pub fn unlock(&self, passphrase: &Passphrase, slot: Option<u32>) -> Result<(u32, VolumeKey)> {
        self.keyslots_snapshot(slot)?.unlock(passphrase)
    }

    /// What an unlock needs, read now: a copy of the header and the
    /// material of the keyslots to try (only `slot` if given). Its
    /// [`KeyslotSnapshot::unlock`] runs the KDF without the container, so
    /// a caller that shares the container behind a lock holds it only
    /// for these reads, never across a derivation.
    pub fn keyslots_snapshot(&self, slot: Option<u32>) -> Result<KeyslotSnapshot> {
        let header = self.header().clone();
        let materials = header
            .keyslots_to_try(slot)?
            .into_iter()
            .map(|n| Ok((n, self.read_material(n)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyslotSnapshot { header, materials })
    }

    /// Opens the data segment with `key` (checked against the digest).
    pub fn open_volume(&self, key: &VolumeKey) -> Result<EncryptedVolume> {
        self.open_volume_with(key, Provider::Auto)
    }

    /// As [`Luks2Container::open_volume`], with a chosen cipher provider.
    pub fn open_volume_with(&self, key: &VolumeKey, provider: Provider) -> Result<EncryptedVolume> {
        self.volume_opener()?.open_with(key, provider)
    }

    /// What opening the data segment needs, taken now: a copy of the
    /// header and the data device. Its [`VolumeOpener::open`] checks the
    /// key against the digest (a derivation) without the container, so a
    /// caller that shares the container behind a lock does not hold it
    /// meanwhile.
    pub fn volume_opener(&self) -> Result<VolumeOpener> {
        if self.header_only {
            return Err(Error::Refused(format!(
                "{} is a detached LUKS2 header (its data segment starts at 0): \
                 give the data device and this file with --header",
                self.header_dev.path().display()
            )));
        }
        Ok(VolumeOpener {
            header: self.header().clone(),
            data: Some(self.data.clone()),
        })
    }

    /// What opening the data segment over another device needs (see
    /// [`VolumeOpener::open_over`]): a copy of the header; works on a
    /// header given alone, whose data lives elsewhere.
    pub fn segment_opener(&self) -> VolumeOpener {
        VolumeOpener {
            header: self.header().clone(),
            data: (!self.header_only).then(|| self.data.clone()),
        }
    }

    /// Opens the data segment with `key` over `device` rather than a local
    /// data file: the ciphertext kept elsewhere (a remote store's block
    /// device), for a detached header whose segment starts at 0. Works on
    /// a header given alone.
    pub fn open_volume_over(
        &self,
        key: &VolumeKey,
        device: Arc<dyn BlockDevice>,
        provider: Provider,
    ) -> Result<EncryptedVolume> {
        open_over(self.header(), key, device, provider)
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.loaded.is_consistent() {
            return Ok(());
        }
        Err(Error::NeedsRepair {
            path: self.header_dev.path().to_path_buf(),
            detail: describe_copies(&self.loaded.primary, &self.loaded.secondary),
        })
    }

    fn write_at_sync(&self, off: u64, bytes: &[u8], what: &'static str) -> Result<()> {
        self.header_dev
            .write_at(off, bytes)
            .map_err(|e| Error::io(what, self.header_dev.path(), e))?;
        self.header_dev
            .flush()
            .map_err(|e| Error::io("sync", self.header_dev.path(), e))
    }

    /// Writes `h` as the new header (seqid bumped), secondary copy first:
    /// if we crash in between, the secondary wins on the next load, so the
    /// new state is never half-visible.
    fn commit(&mut self, mut h: Header) -> Result<()> {
        h.binary.seqid = h
            .binary
            .seqid
            .checked_add(1)
            .ok_or_else(|| Error::Refused("header seqid exhausted".into()))?;
        let [primary, secondary] = h.encode()?;
        self.write_at_sync(h.binary.hdr_size, &secondary, "write secondary header to")?;
        self.write_at_sync(0, &primary, "write primary header to")?;
        let seqid = h.binary.seqid;
        self.loaded = LoadedHeader {
            header: h,
            primary: CopyState::Valid { seqid },
            secondary: CopyState::Valid { seqid },
        };
        Ok(())
    }

    fn wipe_area(&self, offset: u64, size: u64) -> Result<()> {
        let len = usize::try_from(size).map_err(|_| Error::Refused("area too large".into()))?;
        let noise = SecretBytes::random(len);
        self.write_at_sync(offset, noise.expose(), "wipe keyslot area in")
    }

    /// Places a keyslot sealed off the header (see
    /// [`Header::seal_keyslot`]) as keyslot `slot` (the lowest free one if
    /// `None`): a short write, checked against the header as it is now.
    /// The material is written and synced before the header that points
    /// to it.
    pub fn add_sealed(&mut self, sealed: SealedKeyslot, slot: Option<u32>) -> Result<u32> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        let (n, off, material) = h.add_sealed(slot, sealed)?;
        self.write_at_sync(off, material.expose(), "write keyslot to")?;
        self.commit(h)?;
        Ok(n)
    }

    /// Puts a sealed keyslot in place of keyslot `n`, atomically (as
    /// [`Luks2Container::change_passphrase`]). Refuses if `n` is gone: a
    /// keyslot removed since the sealing began is not brought back.
    pub fn replace_sealed(&mut self, n: u32, sealed: SealedKeyslot) -> Result<()> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        let (off, material, (old_off, old_size)) = h.replace_with_sealed(n, sealed)?;
        self.write_at_sync(off, material.expose(), "write keyslot to")?;
        self.commit(h)?;
        self.wipe_area(old_off, old_size)
    }

    /// Adds a keyslot for `new_passphrase` holding `key`. The key material
    /// is written and synced before the header that points to it.
    pub fn add_keyslot(
        &mut self,
        key: &VolumeKey,
        new_passphrase: &Passphrase,
        slot: Option<u32>,
        kdf: KdfParams,
        priority: Option<u32>,
    ) -> Result<u32> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        let (n, off, material) = h.add_keyslot(slot, key, new_passphrase, kdf, priority)?;
        self.write_at_sync(off, material.expose(), "write keyslot to")?;
        self.commit(h)?;
        Ok(n)
    }

    /// Removes keyslot `n`: the header stops naming it first, then its area
    /// is overwritten with random bytes.
    pub fn remove_keyslot(&mut self, n: u32, allow_last: bool) -> Result<()> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        let (off, size) = h.remove_keyslot(n, allow_last)?;
        self.commit(h)?;
        self.wipe_area(off, size)
    }

    /// Gives keyslot `n` a new passphrase, atomically: the new material
    /// goes to a free area, one header write switches to it, then the old
    /// area is wiped. At every instant exactly one passphrase opens slot n.
    pub fn change_passphrase(
        &mut self,
        n: u32,
        key: &VolumeKey,
        new_passphrase: &Passphrase,
        kdf: KdfParams,
    ) -> Result<()> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        let (off, material, (old_off, old_size)) =
            h.replace_keyslot(n, key, new_passphrase, kdf)?;
        self.write_at_sync(off, material.expose(), "write keyslot to")?;
        self.commit(h)?;
        self.wipe_area(old_off, old_size)
    }

    /// Sets a keyslot's priority (0 ignore, 1 normal, 2 prefer).
    pub fn set_priority(&mut self, n: u32, priority: u32) -> Result<()> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        h.set_priority(n, priority)?;
        self.commit(h)
    }

    /// Sets (or replaces) LUKS2 token `id`.
    pub fn set_token(&mut self, id: u32, token: serde_json::Value) -> Result<()> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        h.set_token(id, token)?;
        self.commit(h)
    }

    /// Removes LUKS2 token `id`.
    pub fn remove_token(&mut self, id: u32) -> Result<()> {
        self.ensure_writable()?;
        let mut h = self.header().clone();
        h.remove_token(id);
        self.commit(h)
    }

    /// What `repair` would do, without doing it.
    pub fn repair_plan(&self) -> RepairAction {
        match (&self.loaded.primary, &self.loaded.secondary) {
            (CopyState::Valid { .. }, CopyState::Valid { .. }) => RepairAction::NothingToDo,
            (CopyState::Valid { .. }, s) => RepairAction::RewroteSecondary(describe(s)),
            (p, _) => RepairAction::RewrotePrimary(describe(p)),
        }
    }

    /// Rewrites the damaged or stale copy from the good one (same seqid and
    /// content), leaving the good copy untouched.
    pub fn repair(&mut self) -> Result<RepairAction> {
        let plan = self.repair_plan();
        if plan == RepairAction::NothingToDo {
            return Ok(plan);
        }
        // Read the copy we repair from again, as it is on the disk, and
        // hold it to cryptsetup's rules once more: never copy a header
        // cryptsetup would refuse over the other copy.
        let h = self.header().clone();
        let (from, copy) = match &plan {
            RepairAction::RewroteSecondary(_) => (0, Copy::Primary),
            _ => (h.binary.hdr_size, Copy::Secondary),
        };
        let size = usize::try_from(h.binary.hdr_size)
            .map_err(|_| coffre_luks2::Error::Corrupt("header too large".into()))?;
        let raw = self
            .header_dev
            .read_exact_or_short(from, size)?
            .ok_or_else(|| coffre_luks2::Error::Corrupt("the device is too short".into()))?;
        if let Err(e) = header::parse_copy(&raw, copy, from) {
            return Err(Error::Refused(format!(
                "refusing to repair from a copy that does not validate: {e}"
            )));
        }
        let [primary, secondary] = h.encode()?;
        match &plan {
            RepairAction::NothingToDo => return Ok(plan),
            RepairAction::RewroteSecondary(_) => {
                self.write_at_sync(h.binary.hdr_size, &secondary, "repair secondary header in")?
            }
            RepairAction::RewrotePrimary(_) => {
                self.write_at_sync(0, &primary, "repair primary header in")?
            }
        }
        // Read back from disk rather than trusting what we meant to write.
        self.loaded = load_from(&self.header_dev)?;
        self.check_geometry()?;
        if !self.loaded.is_consistent() {
            return Err(Error::Refused(format!(
                "repair did not take: {}",
                describe_copies(&self.loaded.primary, &self.loaded.secondary)
            )));
        }
        Ok(plan)
    }

    /// Creates a new volume. With `header_path`, the header goes there and
    /// the data device holds ciphertext only, from offset 0.
    pub fn format(
        data_path: &Path,
        header_path: Option<&Path>,
        req: &FormatRequest,
        passphrase: &Passphrase,
    ) -> Result<(Self, VolumeKey)> {
        let data = Arc::new(FileDevice::open_locked(data_path, true)?);
        let detached = header_path.is_some_and(|h| !same_file(h, data_path));
        let header_dev = match header_path {
            Some(h) if detached => Arc::new(FileDevice::open_locked(h, true)?),
            _ => data.clone(),
        };
        if !req.force {
            for dev in [&data, &header_dev] {
                if looks_like_luks(dev) {
                    return Err(Error::Refused(format!(
                        "{} already holds a LUKS header; formatting would destroy that volume (use --force to do it anyway)",
                        dev.path().display()
                    )));
                }
            }
        }
        let mut opts = req.options.clone();
        let metadata_end = 2 * opts.hdr_size + opts.keyslots_size;
        opts.data_offset = if detached { 0 } else { metadata_end };
        let needed = opts.data_offset + req.data_size.unwrap_or(0);
        let data_size = data
            .size()
            .map_err(|e| Error::io("size of", data.path(), e))?;
        if let Some(sz) = req.data_size {
            if data.is_regular_file() {
                data.set_len(opts.data_offset + sz)?;
            } else if data_size < needed {
                return Err(Error::Range(format!(
                    "{} has {data_size} bytes, fewer than the {needed} requested",
                    data.path().display()
                )));
            }
        } else if data_size <= opts.data_offset {
            return Err(Error::Range(format!(
                "{} is empty or too small for data; give --size",
                data.path().display()
            )));
        }
        if detached && header_dev.is_regular_file() {
            header_dev.set_len(metadata_end)?;
        }
        // Clear the whole metadata area so no stale keyslot survives.
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < metadata_end {
            let n = usize::try_from((metadata_end - at).min(zeros.len() as u64)).expect("fits");
            header_dev
                .write_at(at, &zeros[..n])
                .map_err(|e| Error::io("clear metadata of", header_dev.path(), e))?;
            at += n as u64;
        }
        let key = VolumeKey::generate(opts.key_size);
        let (h, off, material) = Header::format(&opts, &key, passphrase)?;
        let [primary, secondary] = h.encode()?;
        let mut c = Self {
            data,
            header_dev,
            detached,
            header_only: false,
            loaded: LoadedHeader {
                primary: CopyState::Valid {
                    seqid: h.binary.seqid,
                },
                secondary: CopyState::Valid {
                    seqid: h.binary.seqid,
                },
                header: h.clone(),
            },
        };
        c.write_at_sync(off, material.expose(), "write keyslot to")?;
        c.write_at_sync(h.binary.hdr_size, &secondary, "write secondary header to")?;
        c.write_at_sync(0, &primary, "write primary header to")?;
        c.loaded = load_from(&c.header_dev)?;
        c.data
            .flush()
            .map_err(|e| Error::io("sync", c.data.path(), e))?;
        Ok((c, key))
    }
}

fn looks_like_luks(dev: &FileDevice) -> bool {
    matches!(dev.read_exact_or_short(0, 6), Ok(Some(m)) if m == b"LUKS\xba\xbe")
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => canon(a) == canon(b),
    }
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn describe(s: &CopyState) -> String {
    match s {
        CopyState::Valid { seqid } => format!("valid (seqid {seqid})"),
        CopyState::Stale { seqid } => format!("stale (seqid {seqid}, an interrupted write)"),
        CopyState::Damaged(why) => format!("damaged: {why}"),
    }
}

/// One line about both copies, for messages.
pub fn describe_copies(p: &CopyState, s: &CopyState) -> String {
    format!("primary {}; secondary {}", describe(p), describe(s))
}

/// Keyslots read for an unlock: see [`Luks2Container::keyslots_snapshot`].
pub struct KeyslotSnapshot {
    header: Header,
    materials: Vec<(u32, SecretBytes)>,
}

impl KeyslotSnapshot {
    /// Finds the keyslot `passphrase` opens among those read, by
    /// priority, and returns it with the volume key.
    pub fn unlock(&self, passphrase: &Passphrase) -> Result<(u32, VolumeKey)> {
        for (n, material) in &self.materials {
            match self
                .header
                .unlock_keyslot(*n, passphrase, material.expose())
            {
                Ok(k) => return Ok((*n, k)),
                Err(coffre_luks2::Error::WrongPassphrase) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(coffre_luks2::Error::WrongPassphrase.into())
    }
}

impl std::fmt::Debug for KeyslotSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyslotSnapshot")
            .field(
                "keyslots",
                &self.materials.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn open_over(
    header: &Header,
    key: &VolumeKey,
    device: Arc<dyn BlockDevice>,
    provider: Provider,
) -> Result<EncryptedVolume> {
    header.verify_volume_key(key)?;
    let seg = header.segment()?;
    if seg.offset.0 != 0 {
        return Err(Error::Refused(format!(
            "the data segment starts at {} on its device: only a detached header's segment (at 0) can live on another device",
            seg.offset.0
        )));
    }
    let cipher = select(&seg.encryption, key.expose(), provider)?;
    EncryptedVolume::new(device, seg, cipher)
}

/// The segment's engine for `key`, checked against the digest: no I/O.
fn engine(header: &Header, key: &VolumeKey, provider: Provider) -> Result<Engine> {
    header.verify_volume_key(key)?;
    let seg = header.segment()?;
    Ok(Engine::new(select(
        &seg.encryption,
        key.expose(),
        provider,
    )?))
}

/// The data segment, ready to open: see [`Luks2Container::volume_opener`].
#[derive(Debug)]
pub struct VolumeOpener {
    header: Header,
    /// The local data device (none for a header given alone).
    data: Option<Arc<FileDevice>>,
}

impl VolumeOpener {
    /// Opens the data segment with `key` (checked against the digest).
    pub fn open(&self, key: &VolumeKey) -> Result<EncryptedVolume> {
        self.open_with(key, Provider::Auto)
    }

    /// As [`Luks2Container::open_volume_over`].
    pub fn open_over(
        &self,
        key: &VolumeKey,
        device: Arc<dyn BlockDevice>,
        provider: Provider,
    ) -> Result<EncryptedVolume> {
        open_over(&self.header, key, device, provider)
    }

    /// The engine for `key` (checked against the digest, its key
    /// schedule made): computations only, no I/O. Then
    /// [`VolumeOpener::open_engine`] or [`VolumeOpener::open_engine_over`],
    /// which may wait on the storage with the engine already revocable and
    /// the key no longer needed.
    pub fn engine(&self, key: &VolumeKey, provider: Provider) -> Result<Engine> {
        engine(&self.header, key, provider)
    }

    /// Opens the local data segment with `engine`.
    pub fn open_engine(&self, engine: Engine) -> Result<EncryptedVolume> {
        let Some(data) = &self.data else {
            return Err(Error::Refused(
                "this detached LUKS2 header's data segment is not a local file: open it over its device"
                    .into(),
            ));
        };
        EncryptedVolume::with_engine(
            data.clone() as Arc<dyn BlockDevice>,
            self.header.segment()?,
            engine,
        )
    }

    /// Opens the data segment on `device` with `engine` (as
    /// [`VolumeOpener::open_over`]).
    pub fn open_engine_over(
        &self,
        engine: Engine,
        device: Arc<dyn BlockDevice>,
    ) -> Result<EncryptedVolume> {
        let seg = self.header.segment()?;
        if seg.offset.0 != 0 {
            return Err(Error::Refused(format!(
                "the data segment starts at {} on its device: only a detached header's segment (at 0) can live on another device",
                seg.offset.0
            )));
        }
        EncryptedVolume::with_engine(device, seg, engine)
    }

    /// As [`VolumeOpener::open`], with a chosen cipher provider.
    pub fn open_with(&self, key: &VolumeKey, provider: Provider) -> Result<EncryptedVolume> {
        let Some(data) = &self.data else {
            return Err(Error::Refused(
                "this detached LUKS2 header's data segment is not a local file: open it over its device"
                    .into(),
            ));
        };
        self.header.verify_volume_key(key)?;
        let seg = self.header.segment()?;
        let cipher = select(&seg.encryption, key.expose(), provider)?;
        EncryptedVolume::new(data.clone() as Arc<dyn BlockDevice>, seg, cipher)
    }
}

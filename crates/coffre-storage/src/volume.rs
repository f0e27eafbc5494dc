//! The decrypted view of a LUKS2 data segment.

use crate::{BlockDevice, Error, Result};
use coffre_luks2::cipher::SectorCipher;
use coffre_luks2::metadata::{Segment, SegmentSize};
use rayon::prelude::*;
use std::sync::Arc;

thread_local! {
    /// Each thread's staging buffer for encryption.
    static SCRATCH: std::cell::RefCell<zeroize::Zeroizing<Vec<u8>>> =
        std::cell::RefCell::new(zeroize::Zeroizing::new(Vec::new()));
}

/// Requests larger than this are split across all cores. Below it, one
/// core does the request: measured through the mount (fio, 1 MiB writes,
/// one in flight), handing 1 MiB to two cores lost about 10% to the
/// wake-ups against encrypting it on the FUSE thread (29 GiB/s, ~35 µs).
const PARALLEL_THRESHOLD: usize = 4 << 20;
/// Size of each parallel piece.
const PARALLEL_CHUNK: usize = 64 * 1024;

/// The volume's cipher (its key schedule), behind a handle that can be
/// revoked from outside while I/O hangs.
///
/// Threads hold it only while they encrypt or decrypt a buffer in memory,
/// never across device I/O (a request encrypts into a buffer, lets go,
/// then writes; reads, then takes it to decrypt). So [`CipherSlot::revoke`]
/// waits at most for one buffer's worth of CPU work, even while a write to
/// storage that stopped answering blocks forever: the key schedule is
/// dropped (wiped) then, and every request after fails.
pub struct CipherSlot {
    cipher: std::sync::RwLock<Option<Box<dyn SectorCipher>>>,
    name: String,
    /// Writes and flushes the storage has completed so far.
    written: std::sync::atomic::AtomicU64,
    /// Reads the storage has completed so far.
    read: std::sync::atomic::AtomicU64,
}

impl CipherSlot {
    fn new(cipher: Box<dyn SectorCipher>) -> Arc<Self> {
        Arc::new(CipherSlot {
            name: cipher.name(),
            cipher: std::sync::RwLock::new(Some(cipher)),
            written: std::sync::atomic::AtomicU64::new(0),
            read: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Drops the cipher and its key schedule now. Returns whether it was
    /// still there.
    pub fn revoke(&self) -> bool {
        let mut g = self.cipher.write().unwrap_or_else(|p| p.into_inner());
        g.take().is_some()
    }

    /// Whether the cipher was revoked.
    pub fn is_revoked(&self) -> bool {
        self.cipher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// How many writes and flushes through it the storage has completed:
    /// it grows while a close's data reaches the storage (a slow close is
    /// making progress); not while the storage does not take writes, and
    /// never for reads (which may still work when writes hang).
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many reads, writes and flushes the storage has completed
    /// through it (an open that reads, resuming large VMs, is slow, not
    /// hung).
    pub fn completed(&self) -> u64 {
        self.written()
            .wrapping_add(self.read.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn hold(&self) -> std::sync::RwLockReadGuard<'_, Option<Box<dyn SectorCipher>>> {
        self.cipher.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// A volume's engine before its volume: the key checked against the
/// digest and the cipher's key schedule made (computations only, no I/O),
/// revocable from then on. See [`crate::VolumeOpener::engine`].
pub struct Engine {
    pub(crate) slot: Arc<CipherSlot>,
}

impl Engine {
    pub(crate) fn new(cipher: Box<dyn SectorCipher>) -> Self {
        Engine {
            slot: CipherSlot::new(cipher),
        }
    }

    /// The handle that revokes it.
    pub fn slot(&self) -> Arc<CipherSlot> {
        self.slot.clone()
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cipher", &self.slot.name)
            .finish()
    }
}

impl std::fmt::Debug for CipherSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CipherSlot")
            .field("revoked", &self.is_revoked())
            .finish()
    }
}

/// A LUKS2 data segment opened with its volume key: reads decrypt, writes
/// encrypt, all in whole sectors at sector-aligned offsets.
pub struct EncryptedVolume {
    device: Arc<dyn BlockDevice>,
    cipher: Arc<CipherSlot>,
    cipher_name: String,
    /// Byte offset of the segment on the device.
    offset: u64,
    /// Segment size in bytes.
    size: u64,
    sector_size: usize,
    /// IV of the first sector: iv_tweak, in 512-byte units like every
    /// LUKS2 IV.
    iv_base: u64,
}

impl std::fmt::Debug for EncryptedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedVolume")
            .field("cipher", &self.cipher_name)
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("sector_size", &self.sector_size)
            .finish_non_exhaustive()
    }
}

impl EncryptedVolume {
    /// Builds the view of `segment` on `device` with `cipher`.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        segment: &Segment,
        cipher: Box<dyn SectorCipher>,
    ) -> Result<Self> {
        Self::with_engine(device, segment, Engine::new(cipher))
    }

    /// Builds the view of `segment` on `device` with `engine` (the
    /// device is sized: I/O, which may wait on the storage while the
    /// engine is already revocable).
    pub fn with_engine(
        device: Arc<dyn BlockDevice>,
        segment: &Segment,
        engine: Engine,
    ) -> Result<Self> {
        let ss = u64::from(segment.sector_size);
        let dev_size = device.size().map_err(|source| Error::Device {
            op: "sizing",
            source,
        })?;
        let offset = segment.offset.0;
        let size = match segment.size {
            SegmentSize::Dynamic => {
                let avail = dev_size.checked_sub(offset).ok_or_else(|| {
                    Error::Range(format!(
                        "the data device ({dev_size} bytes) is smaller than the data offset ({offset})"
                    ))
                })?;
                avail / ss * ss
            }
            SegmentSize::Bytes(n) => {
                if offset.checked_add(n).is_none_or(|end| end > dev_size) {
                    return Err(Error::Range(format!(
                        "the data device ({dev_size} bytes) is smaller than the segment ({n} bytes at {offset})"
                    )));
                }
                n
            }
        };
        let iv_base = segment.iv_tweak.0;
        Ok(Self {
            device,
            cipher_name: engine.slot.name.clone(),
            cipher: engine.slot,
            offset,
            size,
            sector_size: usize::try_from(segment.sector_size).expect("sector size fits"),
            iv_base,
        })
    }

    /// Size of the decrypted volume in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    /// Which cipher implementation serves this volume.
    pub fn cipher_name(&self) -> String {
        self.cipher_name.clone()
    }

    /// The handle that revokes this volume's cipher (for a close that
    /// must wipe the key while I/O still hangs).
    pub fn cipher_slot(&self) -> Arc<CipherSlot> {
        self.cipher.clone()
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64> {
        let ss = self.sector_size as u64;
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(self.sector_size) {
            return Err(Error::Range(format!(
                "I/O at {offset}+{len} is not aligned to {ss}-byte sectors"
            )));
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(Error::Range(format!(
                "I/O at {offset}+{len} goes past the end of the volume ({} bytes)",
                self.size
            )));
        }
        Ok(self.iv_base.wrapping_add(offset / 512))
    }

    /// Encrypts or decrypts a buffer in memory, holding the cipher only
    /// for that; `split` lets a large buffer be shared out among the cores
    /// (callers that run their own threads say no).
    fn crypt_split(&self, first_iv: u64, buf: &mut [u8], encrypt: bool, split: bool) -> Result<()> {
        let ss = self.sector_size;
        let guard = self.cipher.hold();
        let cipher = guard.as_ref().ok_or(Error::Revoked)?;
        let run = |iv: u64, b: &mut [u8]| {
            if encrypt {
                cipher.encrypt(iv, ss, b)
            } else {
                cipher.decrypt(iv, ss, b)
            }
        };
        if !split || buf.len() < PARALLEL_THRESHOLD {
            return Ok(run(first_iv, buf)?);
        }
        let chunk = PARALLEL_CHUNK.max(ss);
        let ivs_per_chunk = (chunk / 512) as u64;
        buf.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, b)| run(first_iv.wrapping_add(i as u64 * ivs_per_chunk), b))?;
        Ok(())
    }

    /// Encrypts `src` into `dst` (out of place: one pass where the cipher
    /// can), holding the cipher only for that; large buffers are shared
    /// out among the cores.
    fn encrypt_into(&self, first_iv: u64, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let ss = self.sector_size;
        let guard = self.cipher.hold();
        let cipher = guard.as_ref().ok_or(Error::Revoked)?;
        if src.len() < PARALLEL_THRESHOLD {
            return Ok(cipher.encrypt_to(first_iv, ss, src, dst)?);
        }
        let chunk = PARALLEL_CHUNK.max(ss);
        let ivs_per_chunk = (chunk / 512) as u64;
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .enumerate()
            .try_for_each(|(i, (d, s))| {
                cipher.encrypt_to(first_iv.wrapping_add(i as u64 * ivs_per_chunk), ss, s, d)
            })?;
        Ok(())
    }

    /// Reads and decrypts `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_split(offset, buf, true)
    }

    /// As [`Self::read_at`], decrypting on the calling thread only: for
    /// callers that run one request per core themselves.
    pub fn read_at_here(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_split(offset, buf, false)
    }

    fn read_split(&self, offset: u64, buf: &mut [u8], split: bool) -> Result<()> {
        let iv = self.check(offset, buf.len())?;
        self.device
            .read_at(self.offset + offset, buf)
            .map_err(|source| Error::Device {
                op: "reading",
                source,
            })?;
        self.cipher
            .read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.crypt_split(iv, buf, false, split)
    }

    /// Encrypts `buf` in place, on the calling thread, for writing at
    /// `offset` with [`Self::write_sealed`]: no copy, for callers that own
    /// their buffers and run their own threads (one encrypts while another
    /// writes). `buf` holds ciphertext afterwards.
    pub fn seal(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let iv = self.check(offset, buf.len())?;
        self.crypt_split(iv, buf, true, false)
    }

    /// Writes at `offset` what [`Self::seal`] encrypted for that offset.
    pub fn write_sealed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        self.device
            .write_at(self.offset + offset, buf)
            .map_err(|source| Error::Device {
                op: "writing",
                source,
            })?;
        self.wrote();
        Ok(())
    }

    /// Counts a write or flush the storage completed.
    fn wrote(&self) {
        self.cipher
            .written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Encrypts and writes `buf` at `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let iv = self.check(offset, buf.len())?;
        // One buffer per thread, reused: a fresh allocation per request
        // costs page faults and zeroing for large writes (the daemon keeps
        // allocations of 1 MiB and more out of its heap). Wiped when the
        // thread ends.
        SCRATCH.with_borrow_mut(|tmp| {
            if tmp.capacity() < buf.len() {
                // A fresh buffer rather than a reallocation: the old one is
                // wiped as it drops instead of lingering in freed memory.
                *tmp = zeroize::Zeroizing::new(Vec::with_capacity(buf.len()));
            }
            // Ciphertext only: never worth wiping byte by byte first.
            tmp.resize(buf.len(), 0);
            self.encrypt_into(iv, buf, tmp)?;
            self.device
                .write_at(self.offset + offset, tmp)
                .map_err(|source| Error::Device {
                    op: "writing",
                    source,
                })
        })?;
        self.wrote();
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.device.flush().map_err(|source| Error::Device {
            op: "flushing",
            source,
        })?;
        self.wrote();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A device whose writes block until released.
    struct Stuck {
        data: std::sync::Mutex<Vec<u8>>,
        hang: Arc<AtomicBool>,
    }

    impl BlockDevice for Stuck {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let d = self.data.lock().unwrap();
            let o = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
            while self.hang.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let mut d = self.data.lock().unwrap();
            let o = usize::try_from(offset).unwrap();
            d[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
    }

    /// The cipher can be revoked while a write hangs on the device: the
    /// revocation does not wait for the write, and every request after it
    /// fails without the key.
    /// A 1 MiB volume on a [`Stuck`] device, whose writes hang while the
    /// flag returned is set (`hang` at first).
    fn stuck_volume(hang: bool) -> (Arc<EncryptedVolume>, Arc<AtomicBool>) {
        let hang = Arc::new(AtomicBool::new(hang));
        let dev = Arc::new(Stuck {
            data: std::sync::Mutex::new(vec![0u8; 1 << 20]),
            hang: hang.clone(),
        });
        let seg: Segment = serde_json::from_value(serde_json::json!({
            "type": "crypt", "offset": "0", "size": "dynamic", "iv_tweak": "0",
            "encryption": "aes-xts-plain64", "sector_size": 512
        }))
        .unwrap();
        let cipher = coffre_luks2::cipher::select(
            "aes-xts-plain64",
            &[7u8; 64],
            coffre_luks2::cipher::Provider::Auto,
        )
        .unwrap();
        (
            Arc::new(EncryptedVolume::new(dev, &seg, cipher).unwrap()),
            hang,
        )
    }

    #[test]
    fn the_cipher_is_revoked_while_a_write_hangs() {
        let (vol, hang) = stuck_volume(true);
        let slot = vol.cipher_slot();
        let writer = {
            let vol = vol.clone();
            std::thread::spawn(move || vol.write_at(0, &[1u8; 4096]))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t = std::time::Instant::now();
        assert!(slot.revoke(), "the cipher was there");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(slot.is_revoked());
        let mut buf = [0u8; 512];
        assert!(matches!(vol.read_at(0, &mut buf), Err(Error::Revoked)));
        hang.store(false, Ordering::SeqCst);
        // The hung write had encrypted before it blocked: it completes.
        writer.join().unwrap().unwrap();
        assert!(matches!(vol.write_at(0, &[1u8; 512]), Err(Error::Revoked)));
    }

    /// The engine counts the writes and flushes the storage completed
    /// (how the daemon tells a slow close from a hung one), never reads,
    /// nor a write still hanging.
    #[test]
    fn only_completed_writes_count_as_progress() {
        let (vol, hang) = stuck_volume(false);
        let slot = vol.cipher_slot();
        let mut buf = [0u8; 4096];
        for _ in 0..10 {
            vol.read_at(0, &mut buf).unwrap();
        }
        assert_eq!(slot.written(), 0, "reads");
        assert_eq!(slot.completed(), 10, "reads are I/O completed");
        vol.write_at(0, &buf).unwrap();
        vol.flush().unwrap();
        assert_eq!(slot.written(), 2);
        hang.store(true, Ordering::SeqCst);
        let writer = {
            let vol = vol.clone();
            std::thread::spawn(move || vol.write_at(4096, &[1u8; 4096]))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        vol.read_at(0, &mut buf).unwrap();
        assert_eq!(slot.written(), 2, "a write that hangs");
        hang.store(false, Ordering::SeqCst);
        writer.join().unwrap().unwrap();
        assert_eq!(slot.written(), 3);
    }
}

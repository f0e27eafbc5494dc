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

/// Requests larger than this are split across all cores.
const PARALLEL_THRESHOLD: usize = 256 * 1024;
/// Size of each parallel piece.
const PARALLEL_CHUNK: usize = 64 * 1024;

/// A LUKS2 data segment opened with its volume key: reads decrypt, writes
/// encrypt, all in whole sectors at sector-aligned offsets.
pub struct EncryptedVolume {
    device: Arc<dyn BlockDevice>,
    cipher: Box<dyn SectorCipher>,
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
            .field("cipher", &self.cipher.name())
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
            cipher,
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
        self.cipher.name()
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

    fn crypt(&self, first_iv: u64, buf: &mut [u8], encrypt: bool) -> Result<()> {
        let ss = self.sector_size;
        let run = |iv: u64, b: &mut [u8]| {
            if encrypt {
                self.cipher.encrypt(iv, ss, b)
            } else {
                self.cipher.decrypt(iv, ss, b)
            }
        };
        if buf.len() < PARALLEL_THRESHOLD {
            return Ok(run(first_iv, buf)?);
        }
        let chunk = PARALLEL_CHUNK.max(ss);
        let ivs_per_chunk = (chunk / 512) as u64;
        buf.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, b)| run(first_iv.wrapping_add(i as u64 * ivs_per_chunk), b))?;
        Ok(())
    }

    /// Reads and decrypts `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let iv = self.check(offset, buf.len())?;
        self.device
            .read_at(self.offset + offset, buf)
            .map_err(|source| Error::Device {
                op: "reading",
                source,
            })?;
        self.crypt(iv, buf, false)
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
            tmp.clear();
            tmp.extend_from_slice(buf);
            self.crypt(iv, tmp, true)?;
            self.device
                .write_at(self.offset + offset, tmp)
                .map_err(|source| Error::Device {
                    op: "writing",
                    source,
                })
        })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.device.flush().map_err(|source| Error::Device {
            op: "flushing",
            source,
        })
    }
}

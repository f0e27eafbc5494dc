//! Block devices: what an encrypted volume stores its ciphertext on.

use crate::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Random-access storage addressed in bytes. Callers (the encrypted volume)
/// only issue sector-aligned requests; backends may rely on it.
pub trait BlockDevice: Send + Sync {
    /// Fills `buf` from `offset`; a short device is an `UnexpectedEof`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
}

/// A local file or block device, with positioned I/O and an exclusive
/// `flock` held for as long as it is open.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
}

impl FileDevice {
    /// Opens `path` read-write and takes an exclusive lock on it, failing
    /// with [`Error::Busy`] if another process holds it (for more than a
    /// quarter of a second).
    pub fn open_locked(path: &Path, create: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        // A lock we dropped a moment ago can still be held by a child that
        // another thread of ours forked and has not yet exec'd (it shares
        // the open file description until then): a holder that lets go
        // within a quarter second is not "busy".
        let until = std::time::Instant::now() + std::time::Duration::from_millis(250);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => return Err(Error::Busy(path.to_path_buf())),
                Err(TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a regular file (which can be grown).
    pub fn is_regular_file(&self) -> bool {
        self.file.metadata().map(|m| m.is_file()).unwrap_or(false)
    }

    /// Grows (or shrinks) a regular file.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("resize", &self.path, e))
    }

    /// Reads `len` bytes at `offset`, or `None` if the device ends first.
    pub fn read_exact_or_short(&self, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let size = self
            .size()
            .map_err(|e| Error::io("size of", &self.path, e))?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > size) {
            return Ok(None);
        }
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)
            .map_err(|e| Error::io("read", &self.path, e))?;
        Ok(Some(buf))
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        // metadata().len() is 0 for block devices; seeking to the end works
        // for both. Positioned I/O never uses the file position.
        (&self.file).seek(SeekFrom::End(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vol");
        let a = FileDevice::open_locked(&p, true).unwrap();
        match FileDevice::open_locked(&p, false) {
            Err(Error::Busy(path)) => assert_eq!(path, p),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(a);
        FileDevice::open_locked(&p, false).unwrap();
    }

    #[test]
    fn positioned_io_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::open_locked(&dir.path().join("f"), true).unwrap();
        d.set_len(8192).unwrap();
        d.write_at(4096, b"abc").unwrap();
        let mut b = [0u8; 3];
        d.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(d.size().unwrap(), 8192);
        assert!(d.read_exact_or_short(8190, 4).unwrap().is_none());
    }
}

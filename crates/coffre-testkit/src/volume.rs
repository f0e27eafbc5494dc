//! Throw-away volumes and directories. Never for real data.

use crate::kdf;
use coffre_luks2::hash::HashAlg;
use coffre_luks2::header::FormatOptions;
use coffre_luks2::kdf::KdfParams;
use coffre_luks2::{Passphrase, VolumeKey};
use coffre_storage::{FormatRequest, Luks2Container};
use std::path::{Path, PathBuf};

/// Formats `DIR/volume.img` (`size` bytes of data) with its header in
/// `DIR/volume.hdr` and a cheap PBKDF2 keyslot (passphrase `scratch`),
/// and returns it with its volume key.
pub fn scratch_volume(dir: &Path, size: u64) -> (Luks2Container, VolumeKey) {
    let req = FormatRequest {
        options: FormatOptions {
            key_size: 64,
            sector_size: 4096,
            kdf: KdfParams::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: kdf::PBKDF2_ITERATIONS,
            },
            digest_iterations: kdf::PBKDF2_ITERATIONS,
            label: "scratch".into(),
            subsystem: String::new(),
            hdr_size: 16384,
            keyslots_size: 1 << 20,
            data_offset: 0,
            segment_size: None,
        },
        data_size: Some(size),
        force: true,
    };
    Luks2Container::format(
        &dir.join("volume.img"),
        Some(&dir.join("volume.hdr")),
        &req,
        &Passphrase::from_slice(b"scratch"),
    )
    .expect("format a scratch volume")
}

/// A temporary directory, removed when dropped.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Default for Dir {
    fn default() -> Self {
        Self::new()
    }
}

impl Dir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes a passphrase file (no trailing newline) and returns its path.
    pub fn pass(&self, name: &str, pass: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, pass).unwrap();
        p
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Random hex, for unique names.
pub fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    coffre_luks2::secret::fill_random(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

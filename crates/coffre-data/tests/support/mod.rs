//! A throw-away LUKS2 volume with a cheap KDF, for the tests, the unit
//! tests (through `#[path]`) and the benchmark helper. Never for real data.

use coffre_luks2::hash::HashAlg;
use coffre_luks2::header::FormatOptions;
use coffre_luks2::kdf::KdfParams;
use coffre_luks2::{Passphrase, VolumeKey};
use coffre_storage::{FormatRequest, Luks2Container};
use std::path::Path;

/// Formats `DIR/volume.img` (`size` bytes of data) with its header in
/// `DIR/volume.hdr`, and returns it with its volume key.
pub fn scratch_volume(dir: &Path, size: u64) -> (Luks2Container, VolumeKey) {
    let req = FormatRequest {
        options: FormatOptions {
            key_size: 64,
            sector_size: 4096,
            kdf: KdfParams::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 1000,
            },
            digest_iterations: 1000,
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

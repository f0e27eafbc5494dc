//! Sealing and opening one keyslot's material: KDF, area cipher (512-byte
//! sectors, IVs from 0 at the start of the area), AF split.

use crate::cipher::{Provider, select};
use crate::metadata::Keyslot;
use crate::{Error, KEYSLOT_SECTOR_SIZE, Passphrase, Result, SecretBytes, VolumeKey, af};

/// Recovers the candidate key from keyslot material. The caller checks it
/// against the digest.
pub fn open(k: &Keyslot, passphrase: &Passphrase, material: &[u8]) -> Result<VolumeKey> {
    let len = usize::try_from(k.material_len()?)
        .map_err(|_| Error::corrupt("keyslot material too large"))?;
    if material.len() < len {
        return Err(Error::corrupt("keyslot material truncated"));
    }
    let kdf = k.kdf()?;
    let area_key = kdf.derive(passphrase, k.area.key_size as usize)?;
    let cipher = select(&k.area.encryption, area_key.expose(), Provider::Auto)?;
    let mut buf = SecretBytes::from_slice(&material[..len]);
    cipher.decrypt(0, KEYSLOT_SECTOR_SIZE, buf.expose_mut())?;
    let key = af::merge(
        buf.expose(),
        k.key_size as usize,
        k.af.stripes,
        k.af_hash()?,
    )?;
    Ok(VolumeKey::new(key))
}

/// Encrypts `key` for `passphrase` per keyslot `k` (whose KDF salt and
/// area are already set). Returns the material, a whole number of sectors.
pub fn seal(k: &Keyslot, key: &VolumeKey, passphrase: &Passphrase) -> Result<SecretBytes> {
    let len = usize::try_from(k.material_len()?)
        .map_err(|_| Error::invalid("keyslot material too large"))?;
    let split = af::split(key.expose(), k.af.stripes, k.af_hash()?)?;
    let mut buf = SecretBytes::zeroed(len);
    buf.expose_mut()[..split.len()].copy_from_slice(split.expose());
    let area_key = k.kdf()?.derive(passphrase, k.area.key_size as usize)?;
    let cipher = select(&k.area.encryption, area_key.expose(), Provider::Auto)?;
    cipher.encrypt(0, KEYSLOT_SECTOR_SIZE, buf.expose_mut())?;
    Ok(buf)
}

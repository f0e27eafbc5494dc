//! The volume-key digest (`"type": "pbkdf2"`): how LUKS2 recognises the
//! right volume key without storing it.

use crate::hash::{HashAlg, ct_eq};
use crate::{Error, Result, VolumeKey};
use std::time::Duration;

/// A pbkdf2 digest of the volume key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pbkdf2Digest {
    /// Hash for HMAC.
    pub hash: HashAlg,
    /// PBKDF2 iterations (at least 1000).
    pub iterations: u32,
    /// The digest's salt (32 bytes from cryptsetup and coffre).
    pub salt: Vec<u8>,
    /// Expected output (not secret: it is what the header stores).
    pub digest: Vec<u8>,
}

/// cryptsetup spends about 125 ms on the digest (`LUKS_MKD_ITERATIONS_MS`).
pub const DIGEST_TIME: Duration = Duration::from_millis(125);

impl Pbkdf2Digest {
    /// Computes the digest of `key` with a fresh salt.
    pub fn create(key: &VolumeKey, hash: HashAlg, iterations: u32) -> Self {
        let mut salt = vec![0u8; 32];
        crate::secret::fill_random(&mut salt);
        let mut digest = vec![0u8; hash.output_len()];
        hash.pbkdf2(key.expose(), &salt, iterations, &mut digest);
        Self {
            hash,
            iterations,
            salt,
            digest,
        }
    }

    /// Whether `key` is the volume key this digest was made from.
    pub fn verify(&self, key: &VolumeKey) -> Result<bool> {
        if self.digest.is_empty() || self.digest.len() > 64 || self.iterations == 0 {
            return Err(Error::corrupt("digest with no output or iterations"));
        }
        let mut out = vec![0u8; self.digest.len()];
        self.hash
            .pbkdf2(key.expose(), &self.salt, self.iterations, &mut out);
        Ok(ct_eq(&out, &self.digest))
    }
}

/// Iterations of pbkdf2 that take about [`DIGEST_TIME`], never fewer than
/// 1000.
pub fn benchmark_iterations(hash: HashAlg) -> Result<u32> {
    match crate::kdf::benchmark_pbkdf2(hash, DIGEST_TIME, hash.output_len())? {
        crate::kdf::KdfParams::Pbkdf2 { iterations, .. } => Ok(iterations),
        crate::kdf::KdfParams::Argon2id { .. } => unreachable!("pbkdf2 benchmark"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_recognises_its_key_only() {
        let k = VolumeKey::generate(64);
        let d = Pbkdf2Digest::create(&k, HashAlg::Sha256, 1000);
        assert_eq!(d.digest.len(), 32);
        assert!(d.verify(&k).unwrap());
        assert!(!d.verify(&VolumeKey::generate(64)).unwrap());
    }
}

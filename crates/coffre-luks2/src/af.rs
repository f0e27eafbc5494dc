//! The anti-forensic information splitter (AF, "luks1" type), which spreads
//! a key over `stripes` blocks so that destroying any part of the keyslot
//! area destroys the key. Same algorithm as cryptsetup's `lib/luks1/af.c`.

use crate::SecretBytes;
use crate::hash::HashAlg;
use crate::secret::fill_random;
use crate::{Error, Result};
use zeroize::Zeroize;

/// The diffusion function: each digest-sized chunk `i` of `buf` is replaced
/// by `H(be32(i) || chunk)`, the last partial chunk by a truncated hash.
fn diffuse(buf: &mut [u8], hash: HashAlg) {
    let ds = hash.output_len();
    for (i, chunk) in buf.chunks_mut(ds).enumerate() {
        let iv = u32::try_from(i)
            .expect("AF blocks are at most 512 bytes, so fewer than 2^32 chunks")
            .to_be_bytes();
        let mut out = [0u8; 64];
        hash.hash_into(&[&iv, chunk], &mut out[..chunk.len()]);
        chunk.copy_from_slice(&out[..chunk.len()]);
        out.zeroize();
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Size in bytes of the split material for a key of `key_len` bytes.
pub fn split_len(key_len: usize, stripes: u32) -> Result<usize> {
    usize::try_from(stripes)
        .ok()
        .and_then(|s| key_len.checked_mul(s))
        .ok_or_else(|| Error::invalid("AF split size overflows"))
}

/// Splits `key` into `stripes` blocks.
pub fn split(key: &[u8], stripes: u32, hash: HashAlg) -> Result<SecretBytes> {
    if stripes == 0 {
        return Err(Error::invalid("AF stripes must be at least 1"));
    }
    let n = key.len();
    let mut out = SecretBytes::zeroed(split_len(n, stripes)?);
    let mut acc = SecretBytes::zeroed(n);
    let dst = out.expose_mut();
    let last = dst.len() - n;
    fill_random(&mut dst[..last]);
    for block in dst[..last].chunks(n) {
        xor_into(acc.expose_mut(), block);
        diffuse(acc.expose_mut(), hash);
    }
    let tail = &mut dst[last..];
    tail.copy_from_slice(acc.expose());
    xor_into(tail, key);
    Ok(out)
}

/// Recombines split material into a key of `key_len` bytes.
pub fn merge(material: &[u8], key_len: usize, stripes: u32, hash: HashAlg) -> Result<SecretBytes> {
    let need = split_len(key_len, stripes)?;
    if stripes == 0 || key_len == 0 || material.len() < need {
        return Err(Error::corrupt("keyslot material shorter than its AF split"));
    }
    let mut acc = SecretBytes::zeroed(key_len);
    let last = need - key_len;
    for block in material[..last].chunks(key_len) {
        xor_into(acc.expose_mut(), block);
        diffuse(acc.expose_mut(), hash);
    }
    xor_into(acc.expose_mut(), &material[last..need]);
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn split_merge_roundtrip(key in proptest::collection::vec(any::<u8>(), 1..80), stripes in 1u32..50, h in 0usize..3) {
            let hash = [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512][h];
            let m = split(&key, stripes, hash).unwrap();
            prop_assert_eq!(m.len(), key.len() * stripes as usize);
            let k = merge(m.expose(), key.len(), stripes, hash).unwrap();
            prop_assert_eq!(k.expose(), &key[..]);
        }
    }

    #[test]
    fn any_stripe_damage_destroys_key() {
        let key = [0x5Au8; 64];
        let mut m = split(&key, 4000, HashAlg::Sha256).unwrap();
        m.expose_mut()[1234] ^= 1;
        let k = merge(m.expose(), 64, 4000, HashAlg::Sha256).unwrap();
        assert_ne!(k.expose(), &key[..]);
    }

    #[test]
    fn short_material_is_an_error() {
        assert!(merge(&[0u8; 10], 64, 4000, HashAlg::Sha256).is_err());
    }
}

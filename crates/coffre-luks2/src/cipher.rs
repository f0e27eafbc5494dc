//! The sector cipher: `aes-xts-plain64` as dm-crypt does it.
//!
//! Each sector is one XTS data unit; its tweak is the sector's position as
//! a 64-bit little-endian integer padded to 16 bytes (`plain64`). LUKS2
//! always counts that position in 512-byte units, whatever the sector size
//! (dm-crypt's `iv_large_sectors` is for plain mode only), so a 4096-byte
//! sector `k` has IV `8k`. The key is
//! the data key followed by the tweak key, so a 512-bit LUKS key means
//! AES-256-XTS and a 256-bit key AES-128-XTS.
//!
//! Two providers sit behind [`SectorCipher`]:
//! - [`RustXts`]: RustCrypto `aes` (runtime AES-NI / VAES dispatch), whole
//!   sectors at once through `encrypt_blocks`, never block by block;
//! - [`AwsLcXts`]: aws-lc's AES-256-XTS, which has a VAES-512 path.
//!
//! [`select`] picks the fastest correct one for a key at open time.

use crate::{Error, Result, SecretBytes};
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256};
use std::sync::Mutex;

/// Encrypts and decrypts runs of whole sectors.
pub trait SectorCipher: Send + Sync {
    /// A short human name, e.g. `"aws-lc aes-256-xts"`.
    fn name(&self) -> String;

    /// Encrypts `data` (a whole number of `sector_size` sectors) in place;
    /// the first sector's IV is `first_iv` and each next one is
    /// `sector_size / 512` further (IVs count 512-byte units).
    fn encrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()>;

    /// Decrypts, as [`SectorCipher::encrypt`].
    fn decrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()>;

    /// Encrypts `src` into `dst` (the same length), as
    /// [`SectorCipher::encrypt`]. Providers that can read one buffer and
    /// write another in one pass do; the others copy, then encrypt in
    /// place.
    fn encrypt_to(
        &self,
        first_iv: u64,
        sector_size: usize,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::invalid("XTS out of place needs equal lengths"));
        }
        dst.copy_from_slice(src);
        self.encrypt(first_iv, sector_size, dst)
    }
}

/// The cipher specifications coffre understands.
pub const SUPPORTED_ENCRYPTION: &str = "aes-xts-plain64";

/// Checks a LUKS2 `encryption` string and key size (bytes).
pub fn check_spec(encryption: &str, key_size: usize) -> Result<()> {
    if encryption != SUPPORTED_ENCRYPTION {
        return Err(Error::unsupported(format!(
            "cipher {encryption:?} (only {SUPPORTED_ENCRYPTION} is implemented)"
        )));
    }
    if key_size != 32 && key_size != 64 {
        return Err(Error::unsupported(format!(
            "{SUPPORTED_ENCRYPTION} with a {}-bit key (256 or 512 only)",
            key_size * 8
        )));
    }
    Ok(())
}

/// IV distance between consecutive sectors.
fn iv_step(sector_size: usize) -> u64 {
    (sector_size / 512).max(1) as u64
}

fn check_layout(sector_size: usize, data: &[u8]) -> Result<()> {
    if sector_size < 512
        || !sector_size.is_multiple_of(512)
        || !data.len().is_multiple_of(sector_size)
    {
        return Err(Error::invalid(format!(
            "XTS needs whole sectors: {} bytes is not a multiple of {sector_size}",
            data.len()
        )));
    }
    Ok(())
}

fn plain64_iv(sector: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&sector.to_le_bytes());
    iv
}

/// Multiplication by the primitive element alpha in GF(2^128), with the
/// little-endian convention of IEEE 1619.
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    let carry = t >> 127;
    (t << 1) ^ (carry * 0x87)
}

enum AesKey {
    A128(Box<Aes128>),
    A256(Box<Aes256>),
}

impl AesKey {
    fn new(key: &[u8]) -> Result<Self> {
        match key.len() {
            16 => Ok(Self::A128(Box::new(
                Aes128::new_from_slice(key).map_err(|_| Error::invalid("bad AES key"))?,
            ))),
            32 => Ok(Self::A256(Box::new(
                Aes256::new_from_slice(key).map_err(|_| Error::invalid("bad AES key"))?,
            ))),
            n => Err(Error::invalid(format!("no AES with {n}-byte keys"))),
        }
    }

    fn encrypt_blocks(&self, b: &mut [Array<u8, aes::cipher::consts::U16>]) {
        match self {
            Self::A128(k) => k.encrypt_blocks(b),
            Self::A256(k) => k.encrypt_blocks(b),
        }
    }

    fn decrypt_blocks(&self, b: &mut [Array<u8, aes::cipher::consts::U16>]) {
        match self {
            Self::A128(k) => k.decrypt_blocks(b),
            Self::A256(k) => k.decrypt_blocks(b),
        }
    }
}

/// Pure-Rust XTS over RustCrypto `aes`.
pub struct RustXts {
    data: AesKey,
    tweak: AesKey,
    /// AES key size in bits (half the XTS key).
    bits: usize,
}

/// Blocks processed per batch: a 4096-byte sector in one go.
const BATCH_BLOCKS: usize = 256;

impl RustXts {
    /// `key` is data key || tweak key (32 or 64 bytes).
    pub fn new(key: &[u8]) -> Result<Self> {
        if key.len() != 32 && key.len() != 64 {
            return Err(Error::invalid("XTS keys are 256 or 512 bits"));
        }
        let half = key.len() / 2;
        Ok(Self {
            data: AesKey::new(&key[..half])?,
            tweak: AesKey::new(&key[half..])?,
            bits: key.len() * 4,
        })
    }

    /// Not inlined: [`scrubbed`] wipes its frame and everything below.
    #[inline(never)]
    fn process(&self, first_iv: u64, sector_size: usize, data: &mut [u8], enc: bool) -> Result<()> {
        check_layout(sector_size, data)?;
        let mut tweaks = [0u128; BATCH_BLOCKS];
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let sector_no = first_iv.wrapping_add(i as u64 * iv_step(sector_size));
            let mut t = Array::from(plain64_iv(sector_no));
            self.tweak.encrypt_blocks(std::slice::from_mut(&mut t));
            let mut tw = u128::from_le_bytes(t.into());
            let (blocks, rest) = Array::slice_as_chunks_mut(sector);
            debug_assert!(rest.is_empty());
            for batch in blocks.chunks_mut(BATCH_BLOCKS) {
                for (b, slot) in batch.iter_mut().zip(tweaks.iter_mut()) {
                    *slot = tw;
                    let v = u128::from_le_bytes((*b).into()) ^ tw;
                    *b = Array::from(v.to_le_bytes());
                    tw = mul_alpha(tw);
                }
                if enc {
                    self.data.encrypt_blocks(batch);
                } else {
                    self.data.decrypt_blocks(batch);
                }
                for (b, slot) in batch.iter_mut().zip(tweaks.iter()) {
                    let v = u128::from_le_bytes((*b).into()) ^ slot;
                    *b = Array::from(v.to_le_bytes());
                }
            }
        }
        tweaks.fill(0);
        Ok(())
    }
}

/// Which AES instructions the RustCrypto backend can use on this CPU.
pub fn rust_aes_backend() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return "vaes-512";
        }
        if std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("avx2")
        {
            return "vaes-256";
        }
        if std::arch::is_x86_feature_detected!("aes") {
            return "aes-ni";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes") {
            return "armv8-aes";
        }
    }
    "soft (constant-time bitsliced)"
}

impl SectorCipher for RustXts {
    fn name(&self) -> String {
        format!("rust aes-{}-xts ({})", self.bits, rust_aes_backend())
    }
    fn encrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()> {
        scrubbed(|| self.process(first_iv, sector_size, data, true))
    }
    fn decrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()> {
        scrubbed(|| self.process(first_iv, sector_size, data, false))
    }
}

/// Runs a cipher call, then wipes the stack below this frame: the blocks
/// and round keys the call spilled there (see `coffre_sys::stack`). The
/// VAES kernel does the same inside `coffre_sys::xts`.
#[inline(always)]
fn scrubbed(f: impl FnOnce() -> Result<()>) -> Result<()> {
    let r = f();
    coffre_sys::stack::scrub::<{ coffre_sys::stack::AFTER_CIPHER }>();
    r
}

/// aws-lc's AES-256-XTS (512-bit LUKS keys only).
pub struct AwsLcXts {
    key: SecretBytes,
    // EVP contexts carry the IV, so each call borrows one from a pool
    // instead of sharing one between threads.
    enc: Mutex<Vec<coffre_sys::aws_lc::Xts256>>,
    dec: Mutex<Vec<coffre_sys::aws_lc::Xts256>>,
}

impl AwsLcXts {
    /// `key` must be 64 bytes (data key then tweak key).
    pub fn new(key: &[u8]) -> Result<Self> {
        let probe = coffre_sys::aws_lc::Xts256::new(key, true)
            .map_err(|e| Error::invalid(e.to_string()))?;
        Ok(Self {
            key: SecretBytes::from_slice(key),
            enc: Mutex::new(vec![probe]),
            dec: Mutex::new(Vec::new()),
        })
    }

    /// Not inlined: [`scrubbed`] wipes its frame and everything below.
    #[inline(never)]
    fn process(&self, first_iv: u64, sector_size: usize, data: &mut [u8], enc: bool) -> Result<()> {
        check_layout(sector_size, data)?;
        let pool = if enc { &self.enc } else { &self.dec };
        let taken = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut ctx = match taken {
            Some(c) => c,
            None => coffre_sys::aws_lc::Xts256::new(self.key.expose(), enc)
                .map_err(|e| Error::invalid(e.to_string()))?,
        };
        let mut result = Ok(());
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let iv = plain64_iv(first_iv.wrapping_add(i as u64 * iv_step(sector_size)));
            if let Err(e) = ctx.process_unit(&iv, sector) {
                result = Err(Error::invalid(e.to_string()));
                break;
            }
        }
        pool.lock().unwrap_or_else(|p| p.into_inner()).push(ctx);
        result
    }
}

impl SectorCipher for AwsLcXts {
    fn name(&self) -> String {
        "aws-lc aes-256-xts".to_string()
    }
    fn encrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()> {
        scrubbed(|| self.process(first_iv, sector_size, data, true))
    }
    fn decrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()> {
        scrubbed(|| self.process(first_iv, sector_size, data, false))
    }
}

/// AES-XTS with VAES (both key sizes; see `coffre_sys::xts`): the
/// 512-bit kernel with AVX-512, the 256-bit one with AVX2 only.
pub struct VaesXts(Box<coffre_sys::xts::Xts>);

impl VaesXts {
    /// `key` is data key || tweak key (32 or 64 bytes), with the widest
    /// kernel this CPU runs. Fails on a CPU without VAES, VPCLMULQDQ and
    /// AVX2.
    pub fn new(key: &[u8]) -> Result<Self> {
        let width = coffre_sys::xts::Width::best()
            .ok_or_else(|| Error::unsupported("VAES XTS on this CPU"))?;
        Self::with_width(key, width)
    }

    /// As [`VaesXts::new`] with the kernel `width` (benchmarks and tests
    /// of the narrower one on a CPU that runs both).
    pub fn with_width(key: &[u8], width: coffre_sys::xts::Width) -> Result<Self> {
        if key.len() != 32 && key.len() != 64 {
            return Err(Error::invalid("XTS keys are 256 or 512 bits"));
        }
        let x = coffre_sys::xts::Xts::with_width(key, width);
        // The expansion's spills.
        crate::secret::scrub_stack();
        x.map(Self)
            .ok_or_else(|| Error::unsupported(format!("VAES-{} XTS on this CPU", width.bits())))
    }
}

impl SectorCipher for VaesXts {
    fn name(&self) -> String {
        format!(
            "coffre aes-{}-xts (vaes-{})",
            self.0.bits(),
            self.0.width().bits()
        )
    }
    fn encrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()> {
        check_layout(sector_size, data)?;
        self.0
            .encrypt(first_iv, iv_step(sector_size), sector_size, data);
        Ok(())
    }
    fn decrypt(&self, first_iv: u64, sector_size: usize, data: &mut [u8]) -> Result<()> {
        check_layout(sector_size, data)?;
        self.0
            .decrypt(first_iv, iv_step(sector_size), sector_size, data);
        Ok(())
    }
    fn encrypt_to(
        &self,
        first_iv: u64,
        sector_size: usize,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        check_layout(sector_size, src)?;
        if src.len() != dst.len() {
            return Err(Error::invalid("XTS out of place needs equal lengths"));
        }
        self.0
            .encrypt_to(first_iv, iv_step(sector_size), sector_size, src, dst);
        Ok(())
    }
}

/// A provider choice, for benchmarks and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// The fastest correct one for the key (see [`select`]).
    Auto,
    /// RustCrypto `aes`.
    Rust,
    /// aws-lc (512-bit keys only).
    AwsLc,
    /// Our VAES kernel, the widest this CPU runs (CPUs with VAES and
    /// AVX2 or AVX-512).
    Vaes,
}

/// Builds the sector cipher for `encryption` and `key`.
///
/// With [`Provider::Auto`], a CPU with VAES gets our kernel for both key
/// sizes (faster than aws-lc's AES-256-XTS here, and aws-lc has no
/// AES-128-XTS); elsewhere 512-bit keys go to aws-lc and 256-bit keys to
/// the Rust path, which also takes any key aws-lc refuses (equal halves).
/// All give identical results (tested against each other and IEEE 1619).
pub fn select(encryption: &str, key: &[u8], provider: Provider) -> Result<Box<dyn SectorCipher>> {
    let c = build(encryption, key, provider);
    // What the key schedules' construction left on the stack (RustCrypto
    // builds a schedule there before it is moved to the heap).
    crate::secret::scrub_stack();
    c
}

#[inline(never)]
fn build(encryption: &str, key: &[u8], provider: Provider) -> Result<Box<dyn SectorCipher>> {
    check_spec(encryption, key.len())?;
    match provider {
        Provider::Rust => Ok(Box::new(RustXts::new(key)?)),
        Provider::AwsLc => Ok(Box::new(AwsLcXts::new(key)?)),
        Provider::Vaes => Ok(Box::new(VaesXts::new(key)?)),
        Provider::Auto => {
            if let Ok(c) = VaesXts::new(key) {
                return Ok(Box::new(c));
            }
            if key.len() == 64
                && let Ok(c) = AwsLcXts::new(key)
            {
                return Ok(Box::new(c));
            }
            Ok(Box::new(RustXts::new(key)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through every provider this CPU has: after encrypt and decrypt
    /// return, the stack below the caller holds neither the data key nor
    /// a block of the plaintext (read through /proc/self/mem, as in
    /// `coffre_sys::xts`'s test: the read's own calls overwrite the top
    /// few hundred bytes first, so this can miss a leftover there, never
    /// invent one).
    #[test]
    fn no_provider_leaves_the_key_or_plaintext_on_the_stack() {
        for provider in [Provider::Rust, Provider::AwsLc, Provider::Vaes] {
            let t = std::thread::spawn(move || {
                let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(13) ^ 0x5c).collect();
                let Ok(c) = select("aes-xts-plain64", &key, provider) else {
                    eprintln!("{provider:?}: not on this CPU");
                    return;
                };
                let block: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(31) ^ 0x96).collect();
                let plain = block.repeat(4096 * 2 / 16);
                let mut buf = plain.clone();
                let mem = std::fs::File::open("/proc/self/mem").unwrap();
                c.encrypt(5, 4096, &mut buf).unwrap();
                c.decrypt(5, 4096, &mut buf).unwrap();
                assert_eq!(buf, plain);
                let here = 0u8;
                let top = std::hint::black_box(&here) as *const u8 as usize;
                let span = coffre_sys::stack::AFTER_CIPHER;
                let below = coffre_sys::stack::peek(&mem, top - span, span).unwrap();
                let found = |needle: &[u8]| below.windows(needle.len()).any(|w| w == needle);
                assert!(
                    !found(&key[..16]),
                    "{provider:?}: the data key is on the stack"
                );
                assert!(
                    !found(&key[32..48]),
                    "{provider:?}: the tweak key is on the stack"
                );
                assert!(
                    !found(&block),
                    "{provider:?}: a plaintext block is on the stack"
                );
            });
            t.join().unwrap();
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .unwrap()
    }

    // IEEE 1619-2007 Annex B, vector 4 (AES-128-XTS, 512-byte unit,
    // data unit sequence number 0) and vector 10 (AES-256-XTS, unit 0xff).
    const V4_KEY: &str = "27182818284590452353602874713526 31415926535897932384626433832795";
    const V10_KEY: &str = "2718281828459045235360287471352662497757247093699959574966967627 3141592653589793238462643383279502884197169399375105820974944592";

    fn vec_plain() -> Vec<u8> {
        (0..512u32).map(|i| i.to_le_bytes()[0]).collect()
    }

    const V4_CT_HEAD: &str = "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c";
    const V4_CT_TAIL: &str = "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568";

    /// Every provider that can take `key` on this machine.
    fn providers(key: &[u8]) -> Vec<Box<dyn SectorCipher>> {
        let mut all: Vec<Box<dyn SectorCipher>> = vec![Box::new(RustXts::new(key).unwrap())];
        if let Ok(c) = AwsLcXts::new(key) {
            all.push(Box::new(c));
        }
        for w in [coffre_sys::xts::Width::Zmm, coffre_sys::xts::Width::Ymm] {
            if let Ok(c) = VaesXts::with_width(key, w) {
                all.push(Box::new(c));
            }
        }
        all
    }

    #[test]
    fn ieee1619_vector4_every_provider() {
        let key = hex(V4_KEY);
        for c in providers(&key) {
            let mut buf = vec_plain();
            c.encrypt(0, 512, &mut buf).unwrap();
            assert_eq!(&buf[..32], &hex(V4_CT_HEAD)[..], "{}", c.name());
            assert_eq!(&buf[480..], &hex(V4_CT_TAIL)[..], "{}", c.name());
            c.decrypt(0, 512, &mut buf).unwrap();
            assert_eq!(buf, vec_plain(), "{}", c.name());
        }
    }

    #[test]
    fn vaes_is_tested_where_the_cpu_has_it() {
        // The cross-checks below compare against VaesXts only where it
        // exists; on a CPU that has the instructions it must be built.
        assert_eq!(
            VaesXts::new(&[9u8; 32]).is_ok(),
            coffre_sys::xts::available()
        );
    }

    #[test]
    fn every_provider_agrees_with_the_reference() {
        // Random keys, sector sizes, runs and first IVs (near the top of
        // the 64-bit range too): every provider gives the Rust path's
        // bytes both ways. Random tweaks exercise every carry out of the
        // GF(2^128) doublings.
        let mut seed = [0u8; 8];
        for round in 0..300 {
            crate::secret::fill_random(&mut seed);
            let r = u64::from_le_bytes(seed);
            let key_len = if round % 2 == 0 { 32 } else { 64 };
            let mut key = vec![0u8; key_len];
            crate::secret::fill_random(&mut key);
            let sector_size = [512usize, 1024, 2048, 4096][(r % 4) as usize];
            let sectors = 1 + (r >> 8) as usize % 5;
            let first_iv = if round % 3 == 0 {
                u64::MAX - (r >> 32) % 40
            } else {
                r >> 3
            };
            let mut orig = vec![0u8; sector_size * sectors];
            crate::secret::fill_random(&mut orig);
            let reference = RustXts::new(&key).unwrap();
            let mut want = orig.clone();
            reference.encrypt(first_iv, sector_size, &mut want).unwrap();
            for c in providers(&key) {
                let mut got = orig.clone();
                c.encrypt(first_iv, sector_size, &mut got).unwrap();
                assert_eq!(got, want, "{} encrypting", c.name());
                let mut out = vec![0u8; orig.len()];
                c.encrypt_to(first_iv, sector_size, &orig, &mut out)
                    .unwrap();
                assert_eq!(out, want, "{} encrypting out of place", c.name());
                c.decrypt(first_iv, sector_size, &mut got).unwrap();
                assert_eq!(got, orig, "{} decrypting", c.name());
            }
        }
    }

    const V10_CT_HEAD: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b";

    #[test]
    fn ieee1619_vector10_every_provider() {
        let key = hex(V10_KEY);
        assert_eq!(key.len(), 64);
        for c in providers(&key) {
            let mut buf = vec_plain();
            c.encrypt(0xff, 512, &mut buf).unwrap();
            assert_eq!(&buf[..32], &hex(V10_CT_HEAD)[..], "{}", c.name());
            c.decrypt(0xff, 512, &mut buf).unwrap();
            assert_eq!(buf, vec_plain(), "{}", c.name());
        }
    }

    /// Long runs in one call (nine sectors, IVs that wrap): every
    /// provider, both key sizes, gives the Rust path's bytes both ways.
    #[test]
    fn providers_agree_on_many_sectors() {
        for key_len in [64, 32] {
            let mut key = vec![0u8; key_len];
            crate::secret::fill_random(&mut key);
            let rust = RustXts::new(&key).unwrap();
            for sector_size in [512usize, 4096] {
                let mut orig = vec![0u8; sector_size * 9];
                crate::secret::fill_random(&mut orig);
                let mut want = orig.clone();
                rust.encrypt(u64::MAX - 3, sector_size, &mut want).unwrap();
                assert_ne!(want, orig);
                for c in providers(&key) {
                    let mut got = orig.clone();
                    c.encrypt(u64::MAX - 3, sector_size, &mut got).unwrap();
                    assert_eq!(got, want, "{} encrypting", c.name());
                    c.decrypt(u64::MAX - 3, sector_size, &mut got).unwrap();
                    assert_eq!(got, orig, "{} decrypting", c.name());
                }
            }
        }
    }

    #[test]
    fn auto_selection() {
        let mut key = [0u8; 64];
        crate::secret::fill_random(&mut key);
        let (big, small) = if coffre_sys::xts::available() {
            ("coffre aes-256", "coffre aes-128")
        } else {
            ("aws-lc", "rust aes-128")
        };
        let name = select("aes-xts-plain64", &key, Provider::Auto)
            .unwrap()
            .name();
        assert!(name.contains(big), "{name}");
        let name = select("aes-xts-plain64", &key[..32], Provider::Auto)
            .unwrap()
            .name();
        assert!(name.contains(small), "{name}");
        assert!(select("aes-cbc-essiv:sha256", &key, Provider::Auto).is_err());
        // Equal halves (IEEE 1619 vector 1 style): whichever provider is
        // chosen, the result matches the Rust reference.
        let same = [7u8; 64];
        let mut a = vec![3u8; 4096];
        let mut b = a.clone();
        select("aes-xts-plain64", &same, Provider::Auto)
            .unwrap()
            .encrypt(5, 4096, &mut a)
            .unwrap();
        RustXts::new(&same)
            .unwrap()
            .encrypt(5, 4096, &mut b)
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn partial_sectors_are_refused() {
        let c = RustXts::new(&[1u8; 32]).unwrap();
        let mut b = vec![0u8; 700];
        assert!(c.encrypt(0, 512, &mut b).is_err());
    }
}

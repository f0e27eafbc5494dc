//! AES-XTS over whole disk sectors with VAES and VPCLMULQDQ: sixteen AES
//! blocks in flight, the tweaks of several blocks computed at once. Two
//! kernels: four blocks per instruction on CPUs with AVX-512
//! ([`Width::Zmm`]), two on those with only AVX2 ([`Width::Ymm`]: Intel
//! from Alder Lake, AMD Zen 3).
//!
//! This exists because the fast providers we can link stop short: aws-lc
//! has AES-256-XTS only (no AES-128-XTS, which a 256-bit LUKS key means),
//! and RustCrypto `aes` encrypts blocks fast but leaves XTS's tweak chain
//! to the caller, one block after another. Both key sizes are served here;
//! the callers cross-check it against the other providers and the IEEE 1619
//! vectors.
//!
//! Only on x86-64 CPUs with VAES, VPCLMULQDQ, AES-NI and AVX-512 (F, BW) or AVX2,
//! checked at run time ([`Xts::new`] returns `None` elsewhere). The key
//! schedules are wiped when the value drops.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Which kernel: the vector registers it works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 512-bit registers, four blocks each (AVX-512F and BW).
    Zmm,
    /// 256-bit registers, two blocks each (AVX2).
    Ymm,
}

impl Width {
    /// Whether this CPU can run this kernel.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let base = std::arch::is_x86_feature_detected!("vaes")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
                && std::arch::is_x86_feature_detected!("aes");
            base && match self {
                // Every CPU with VAES and AVX-512 has BW too (Intel from
                // Ice Lake, AMD from Zen 4); the kernel's byte shifts need it.
                Width::Zmm => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                }
                Width::Ymm => std::arch::is_x86_feature_detected!("avx2"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// The widest kernel this CPU runs, if any.
    pub fn best() -> Option<Width> {
        [Width::Zmm, Width::Ymm].into_iter().find(|w| w.runs_here())
    }

    /// Its register width in bits.
    pub fn bits(self) -> usize {
        match self {
            Width::Zmm => 512,
            Width::Ymm => 256,
        }
    }
}

/// Whether this CPU can run [`Xts`] (either kernel).
pub fn available() -> bool {
    Width::best().is_some()
}

/// Round keys: at most 15 (AES-256), 16 bytes each. Neither Copy nor
/// Clone: a schedule lives in one place, on the heap (see [`Xts::new`]).
#[repr(C, align(16))]
struct Schedule([[u8; 16]; 15]);

/// AES-XTS with a 256-bit (AES-128) or 512-bit (AES-256) key, for whole
/// sectors whose IV is a 64-bit little-endian sector number (`plain64`).
pub struct Xts {
    enc: Schedule,
    dec: Schedule,
    tweak: Schedule,
    rounds: usize,
    width: Width,
}

impl Drop for Xts {
    fn drop(&mut self) {
        for s in [&mut self.enc, &mut self.dec, &mut self.tweak] {
            zeroize::Zeroize::zeroize(s.0.as_flattened_mut());
        }
    }
}

impl Xts {
    /// Builds the key schedules for `key` (data key then tweak key, 32 or
    /// 64 bytes), in place on the heap: the schedules are never moved, so
    /// no copy of them is left behind (the caller scrubs the stack the
    /// expansion used). `None` if the CPU lacks the instructions or the
    /// key has another length.
    pub fn new(key: &[u8]) -> Option<Box<Self>> {
        Self::with_width(key, Width::best()?)
    }

    /// As [`Xts::new`] with the kernel `width` (for tests and benchmarks
    /// of the narrower one); `None` if this CPU cannot run it.
    pub fn with_width(key: &[u8], width: Width) -> Option<Box<Self>> {
        if !width.runs_here() || (key.len() != 32 && key.len() != 64) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let half = key.len() / 2;
            let mut x = Box::new(Self {
                enc: Schedule([[0; 16]; 15]),
                dec: Schedule([[0; 16]; 15]),
                tweak: Schedule([[0; 16]; 15]),
                rounds: if half == 16 { 10 } else { 14 },
                width,
            });
            // SAFETY: runs_here() checked AES-NI, the only feature the key
            // expansion needs.
            unsafe {
                expand(&key[..half], &mut x.enc);
                expand(&key[half..], &mut x.tweak);
                invert(&x.enc, &mut x.dec, x.rounds);
            }
            Some(x)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// AES key size in bits (half the XTS key).
    pub fn bits(&self) -> usize {
        if self.rounds == 10 { 128 } else { 256 }
    }

    /// The kernel it runs.
    pub fn width(&self) -> Width {
        self.width
    }

    /// Encrypts `data` in place: whole sectors of `sector_size` bytes (a
    /// multiple of 256), the first with IV `first_iv`, each next one
    /// `iv_step` further. Panics if `data` is not whole sectors.
    pub fn encrypt(&self, first_iv: u64, iv_step: u64, sector_size: usize, data: &mut [u8]) {
        let len = data.len();
        let p = data.as_mut_ptr();
        self.run(first_iv, iv_step, sector_size, p, p, len, true);
    }

    /// Decrypts, as [`Xts::encrypt`].
    pub fn decrypt(&self, first_iv: u64, iv_step: u64, sector_size: usize, data: &mut [u8]) {
        let len = data.len();
        let p = data.as_mut_ptr();
        self.run(first_iv, iv_step, sector_size, p, p, len, false);
    }

    /// Encrypts `src` into `dst` (the same length), as [`Xts::encrypt`]:
    /// one pass over the bytes where a copy then an encryption in place
    /// would take two.
    pub fn encrypt_to(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: &[u8],
        dst: &mut [u8],
    ) {
        assert_eq!(src.len(), dst.len(), "XTS out of place needs equal lengths");
        let len = dst.len();
        self.run(
            first_iv,
            iv_step,
            sector_size,
            src.as_ptr(),
            dst.as_mut_ptr(),
            len,
            true,
        );
    }

    /// Decrypts `src` into `dst`, as [`Xts::encrypt_to`].
    pub fn decrypt_to(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: &[u8],
        dst: &mut [u8],
    ) {
        assert_eq!(src.len(), dst.len(), "XTS out of place needs equal lengths");
        let len = dst.len();
        self.run(
            first_iv,
            iv_step,
            sector_size,
            src.as_ptr(),
            dst.as_mut_ptr(),
            len,
            false,
        );
    }

    /// `src` and `dst` are either the same buffer or two that do not
    /// overlap, `len` bytes each (the public methods take them from
    /// slices).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        enc: bool,
    ) {
        assert!(
            sector_size >= 256
                && sector_size.is_multiple_of(256)
                && len.is_multiple_of(sector_size),
            "XTS needs whole sectors of a multiple of 256 bytes"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a value exists only if its width runs here (see
        // with_width), so the CPU has every feature that kernel is
        // compiled for; the
        // sizes were checked just above; src and dst come from slices of
        // len bytes that are either the same or disjoint (Rust's borrow
        // rules for the two public forms).
        unsafe {
            let k = Kernel {
                first_iv,
                iv_step,
                sector_size,
                src,
                dst,
                len,
            };
            match (self.width, self.rounds, enc) {
                (Width::Zmm, 10, true) => sectors::<10, true>(self, &k),
                (Width::Zmm, 10, false) => sectors::<10, false>(self, &k),
                (Width::Zmm, _, true) => sectors::<14, true>(self, &k),
                (Width::Zmm, _, false) => sectors::<14, false>(self, &k),
                (Width::Ymm, 10, true) => sectors_ymm::<10, true>(self, &k),
                (Width::Ymm, 10, false) => sectors_ymm::<10, false>(self, &k),
                (Width::Ymm, _, true) => sectors_ymm::<14, true>(self, &k),
                (Width::Ymm, _, false) => sectors_ymm::<14, false>(self, &k),
            }
        }
        // The kernel's spills (round keys, blocks in flight) below this
        // frame.
        crate::stack::scrub::<{ crate::stack::AFTER_CIPHER }>();
    }
}

/// One call of the kernel: the sectors' IVs and where the bytes are.
#[cfg(target_arch = "x86_64")]
struct Kernel {
    first_iv: u64,
    iv_step: u64,
    sector_size: usize,
    src: *const u8,
    dst: *mut u8,
    len: usize,
}

/// One AES-128 key expansion step (FIPS 197 5.2 with AES-NI's helper).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
fn step128(prev: __m128i, assist: __m128i) -> __m128i {
    let assist = _mm_shuffle_epi32::<0xff>(assist);
    let mut k = prev;
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, assist)
}

/// The second half of an AES-256 expansion step (SubWord without RotWord).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
fn step256b(prev: __m128i, other: __m128i) -> __m128i {
    let assist = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(other));
    let mut k = prev;
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, assist)
}

/// Expands a 16- or 32-byte AES key into its round keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn expand(key: &[u8], out: &mut Schedule) {
    let mut rk = [_mm_setzero_si128(); 15];
    // SAFETY (both loads): key holds 16 or 32 bytes (checked by Xts::new);
    // unaligned loads.
    let k0 = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
    rk[0] = k0;
    macro_rules! r128 {
        ($i:expr, $rcon:expr) => {
            rk[$i] = step128(rk[$i - 1], _mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
        };
    }
    macro_rules! r256 {
        ($i:expr, $rcon:expr) => {
            rk[$i] = step128(rk[$i - 2], _mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
        };
        ($i:expr, $rcon:expr, odd) => {
            r256!($i, $rcon);
            rk[$i + 1] = step256b(rk[$i - 1], rk[$i]);
        };
    }
    if key.len() == 16 {
        r128!(1, 0x01);
        r128!(2, 0x02);
        r128!(3, 0x04);
        r128!(4, 0x08);
        r128!(5, 0x10);
        r128!(6, 0x20);
        r128!(7, 0x40);
        r128!(8, 0x80);
        r128!(9, 0x1b);
        r128!(10, 0x36);
    } else {
        // SAFETY: a 32-byte key here; unaligned load of its second half.
        rk[1] = unsafe { _mm_loadu_si128(key.as_ptr().add(16).cast()) };
        r256!(2, 0x01, odd);
        r256!(4, 0x02, odd);
        r256!(6, 0x04, odd);
        r256!(8, 0x08, odd);
        r256!(10, 0x10, odd);
        r256!(12, 0x20, odd);
        r256!(14, 0x40);
    }
    for (o, k) in out.0.iter_mut().zip(rk.iter()) {
        // SAFETY: o is 16 writable bytes; unaligned store.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), *k) };
    }
    rk.fill(_mm_setzero_si128());
    // Keeps the wipe from being optimised away as a dead store.
    std::hint::black_box(&rk);
}

/// The equivalent inverse cipher's round keys (FIPS 197 5.3.5).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn invert(enc: &Schedule, dec: &mut Schedule, rounds: usize) {
    dec.0[0] = enc.0[rounds];
    dec.0[rounds] = enc.0[0];
    for i in 1..rounds {
        // SAFETY: 16-byte arrays, unaligned load and store.
        unsafe {
            let k = _mm_loadu_si128(enc.0[rounds - i].as_ptr().cast());
            _mm_storeu_si128(dec.0[i].as_mut_ptr().cast(), _mm_aesimc_si128(k));
        }
    }
}

/// Multiplies each 128-bit lane by x^K in GF(2^128) (IEEE 1619's
/// little-endian convention, reduction by x^128 + x^7 + x^2 + x + 1).
/// `R` must be `64 - K`, with `K` at most 56 so the reduction fits in the
/// low 64 bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,vpclmulqdq")]
fn mul_xk<const K: u32, const R: u32>(t: __m512i) -> __m512i {
    debug_assert_eq!(K + R, 64);
    let shifted = _mm512_slli_epi64::<K>(t);
    // Each quadword's top K bits, and the other quadword's beside them.
    let carries = _mm512_shuffle_epi32::<0x4e>(_mm512_srli_epi64::<R>(t));
    // The low quadword's carry moves into the high quadword unchanged...
    let up = _mm512_maskz_mov_epi64(0xaa, carries);
    // ...and the high quadword's, beyond x^127, is reduced into the low.
    let reduced = _mm512_clmulepi64_epi128::<0x00>(carries, _mm512_set1_epi64(0x87));
    _mm512_ternarylogic_epi64::<0x96>(shifted, up, reduced)
}

/// Multiplies each 128-bit lane by x^16, as [`mul_xk`] does, in fewer
/// instructions: a shift by whole bytes crosses the lane's two quadwords
/// by itself, so only the sixteen bits beyond x^127 need reducing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x16(t: __m512i) -> __m512i {
    let shifted = _mm512_bslli_epi128::<2>(t);
    let top = _mm512_bsrli_epi128::<14>(t);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(top, _mm512_set1_epi64(0x87));
    _mm512_xor_si512(shifted, reduced)
}

/// Encrypts the 16-byte block `block` with `rounds` rounds of `keys`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn encrypt_block(keys: &Schedule, rounds: usize, block: [u8; 16]) -> __m128i {
    // SAFETY: 16-byte arrays, unaligned loads.
    unsafe {
        let mut b = _mm_xor_si128(
            _mm_loadu_si128(block.as_ptr().cast()),
            _mm_loadu_si128(keys.0[0].as_ptr().cast()),
        );
        for k in &keys.0[1..rounds] {
            b = _mm_aesenc_si128(b, _mm_loadu_si128(k.as_ptr().cast()));
        }
        _mm_aesenclast_si128(b, _mm_loadu_si128(keys.0[rounds].as_ptr().cast()))
    }
}

/// Sector `i`'s first two tweaks, T (its IV encrypted with the tweak key)
/// and T·x, in the low and high lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,aes,sse2")]
unsafe fn first_tweaks<const NR: usize>(x: &Xts, k: &Kernel, i: usize) -> __m256i {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&k.first_iv.wrapping_add(i as u64 * k.iv_step).to_le_bytes());
    // SAFETY: the tweak schedule has NR + 1 keys.
    let t = unsafe { encrypt_block(&x.tweak, NR, iv) };
    let hi = _mm_srli_epi64::<63>(t);
    let up = _mm_slli_si128::<8>(hi);
    let red = _mm_and_si128(
        _mm_shuffle_epi32::<0x4e>(_mm_sub_epi64(_mm_setzero_si128(), hi)),
        _mm_set_epi64x(0, 0x87),
    );
    let t1 = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi64::<1>(t), up), red);
    _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(t), t1)
}

/// [`mul_xk`] on two lanes, without AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_xk_ymm<const K: i32, const R: i32>(t: __m256i) -> __m256i {
    debug_assert_eq!(K + R, 64);
    let shifted = _mm256_slli_epi64::<K>(t);
    // Each quadword's top K bits, in place.
    let carries = _mm256_srli_epi64::<R>(t);
    // The high quadword of each lane takes the low one's carry...
    let up = _mm256_bslli_epi128::<8>(carries);
    // ...and the low quadword the high one's, reduced (0x01: the high
    // quadword of `carries` times the low one of the constant).
    let reduced = _mm256_clmulepi64_epi128::<0x01>(carries, _mm256_set1_epi64x(0x87));
    _mm256_xor_si256(_mm256_xor_si256(shifted, up), reduced)
}

/// Multiplies each 128-bit lane by x^16, as [`mul_xk_ymm`] does, in fewer
/// instructions: a shift by whole bytes crosses the lane's two quadwords
/// by itself, so only the sixteen bits beyond x^127 need reducing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_x16_ymm(t: __m256i) -> __m256i {
    let shifted = _mm256_bslli_epi128::<2>(t);
    let top = _mm256_bsrli_epi128::<14>(t);
    let reduced = _mm256_clmulepi64_epi128::<0x00>(top, _mm256_set1_epi64x(0x87));
    _mm256_xor_si256(shifted, reduced)
}

/// One AES round (`vaesenc` or `vaesdec`) with `key` on the eight
/// registers of `b`, in that order. Written out because, with sixteen
/// vector registers for eight blocks, their tweaks and the round keys, the
/// compiler otherwise runs each block through all its rounds before the
/// next: chains of dependent instructions that left the AES units idle
/// about half the time.
#[cfg(target_arch = "x86_64")]
macro_rules! round8 {
    ($op:literal, $b:ident, $key:expr) => {
        // SAFETY: register-only AES instructions (no memory, no stack, no
        // flags). The enclosing kernel enables AVX2 (the ymm registers) and
        // VAES; that the CPU has them is its callers' contract (checked at
        // run time in Xts::with_width).
        unsafe {
            std::arch::asm!(
                concat!($op, " {0}, {0}, {k}"),
                concat!($op, " {1}, {1}, {k}"),
                concat!($op, " {2}, {2}, {k}"),
                concat!($op, " {3}, {3}, {k}"),
                concat!($op, " {4}, {4}, {k}"),
                concat!($op, " {5}, {5}, {k}"),
                concat!($op, " {6}, {6}, {k}"),
                concat!($op, " {7}, {7}, {k}"),
                inout(ymm_reg) $b[0],
                inout(ymm_reg) $b[1],
                inout(ymm_reg) $b[2],
                inout(ymm_reg) $b[3],
                inout(ymm_reg) $b[4],
                inout(ymm_reg) $b[5],
                inout(ymm_reg) $b[6],
                inout(ymm_reg) $b[7],
                k = in(ymm_reg) $key,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// The XTS kernel on 256-bit registers (AVX2 and VAES, no AVX-512): as
/// [`sectors`], sixteen blocks in flight in eight registers of two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,sse2")]
unsafe fn sectors_ymm<const NR: usize, const ENC: bool>(x: &Xts, k: &Kernel) {
    let schedule = if ENC { &x.enc } else { &x.dec };
    let mut rk = [_mm256_setzero_si256(); 15];
    for (r, k) in rk.iter_mut().zip(schedule.0.iter()).take(NR + 1) {
        // SAFETY: 16-byte array, unaligned load.
        *r = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(k.as_ptr().cast()) });
    }
    // Each sector's first tweaks are computed a sector ahead: an AES
    // chain of one block, whose latency would otherwise stall the start of
    // every sector.
    // SAFETY: the tweak schedule has NR + 1 keys.
    let mut next = unsafe { first_tweaks::<NR>(x, k, 0) };
    for (i, at) in (0..k.len).step_by(k.sector_size).enumerate() {
        let tw = next;
        if at + k.sector_size < k.len {
            // SAFETY: as above.
            next = unsafe { first_tweaks::<NR>(x, k, i + 1) };
        }
        // The sixteen tweaks of the sector's first 256 bytes; each next
        // 256 bytes' are these times x^16.
        let mut t = [
            tw,
            mul_xk_ymm::<2, 62>(tw),
            mul_xk_ymm::<4, 60>(tw),
            mul_xk_ymm::<6, 58>(tw),
            mul_xk_ymm::<8, 56>(tw),
            mul_xk_ymm::<10, 54>(tw),
            mul_xk_ymm::<12, 52>(tw),
            mul_xk_ymm::<14, 50>(tw),
        ];
        for off in (at..at + k.sector_size).step_by(256) {
            let mut b = [_mm256_setzero_si256(); 8];
            for (j, v) in b.iter_mut().enumerate() {
                // SAFETY: off + 256 <= len: eight unaligned 32-byte loads.
                let l = unsafe { _mm256_loadu_si256(k.src.add(off + 32 * j).cast()) };
                *v = _mm256_xor_si256(_mm256_xor_si256(l, t[j]), rk[0]);
            }
            for key in &rk[1..NR] {
                if ENC {
                    round8!("vaesenc", b, *key);
                } else {
                    round8!("vaesdec", b, *key);
                }
            }
            for (j, v) in b.iter_mut().enumerate() {
                // The last round key and the tweak in one, as in sectors.
                let last = _mm256_xor_si256(rk[NR], t[j]);
                *v = if ENC {
                    _mm256_aesenclast_epi128(*v, last)
                } else {
                    _mm256_aesdeclast_epi128(*v, last)
                };
                // SAFETY: as for the loads, into dst.
                unsafe { _mm256_storeu_si256(k.dst.add(off + 32 * j).cast(), *v) };
            }
            for v in &mut t {
                *v = mul_x16_ymm(*v);
            }
        }
    }
    rk.fill(_mm256_setzero_si256());
    std::hint::black_box(&rk);
    // The round keys, tweaks and blocks left in the vector registers
    // (a return clears only their upper halves).
    _mm256_zeroall();
}

/// The XTS kernel: every sector from `k.src` to `k.dst`, sixteen blocks
/// at a time (each group of sixteen is loaded before it is stored, so the
/// same buffer in and out is fine).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,sse2")]
unsafe fn sectors<const NR: usize, const ENC: bool>(x: &Xts, k: &Kernel) {
    let schedule = if ENC { &x.enc } else { &x.dec };
    let mut rk = [_mm512_setzero_si512(); 15];
    for (r, k) in rk.iter_mut().zip(schedule.0.iter()).take(NR + 1) {
        // SAFETY: 16-byte array, unaligned load.
        *r = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(k.as_ptr().cast()) });
    }
    // Each sector's first tweaks a sector ahead, as in sectors_ymm.
    // SAFETY: the tweak schedule has NR + 1 keys.
    let mut next = unsafe { first_tweaks::<NR>(x, k, 0) };
    for (i, at) in (0..k.len).step_by(k.sector_size).enumerate() {
        let pair = next;
        if at + k.sector_size < k.len {
            // SAFETY: as above.
            next = unsafe { first_tweaks::<NR>(x, k, i + 1) };
        }
        // The first four tweaks T, Tx, Tx^2, Tx^3, one per lane.
        let pair2 = {
            // x^2 on both lanes of the pair.
            let p = _mm512_castsi256_si512(pair);
            _mm512_castsi512_si256(mul_xk::<2, 62>(p))
        };
        let tw = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(pair), pair2);
        // The sixteen tweaks of the sector's first 256 bytes; each next
        // 256 bytes' are these times x^16.
        let mut t = [
            tw,
            mul_xk::<4, 60>(tw),
            mul_xk::<8, 56>(tw),
            mul_xk::<12, 52>(tw),
        ];
        for off in (at..at + k.sector_size).step_by(256) {
            let [t0, t1, t2, t3] = t;
            t = [mul_x16(t0), mul_x16(t1), mul_x16(t2), mul_x16(t3)];
            // SAFETY: off + 256 <= len: four unaligned 64-byte loads.
            let p = unsafe { k.src.add(off) };
            let (mut a, mut b, mut c, mut d) = unsafe {
                (
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(64).cast()),
                    _mm512_loadu_si512(p.add(128).cast()),
                    _mm512_loadu_si512(p.add(192).cast()),
                )
            };
            a = _mm512_ternarylogic_epi64::<0x96>(a, t0, rk[0]);
            b = _mm512_ternarylogic_epi64::<0x96>(b, t1, rk[0]);
            c = _mm512_ternarylogic_epi64::<0x96>(c, t2, rk[0]);
            d = _mm512_ternarylogic_epi64::<0x96>(d, t3, rk[0]);
            for k in &rk[1..NR] {
                if ENC {
                    a = _mm512_aesenc_epi128(a, *k);
                    b = _mm512_aesenc_epi128(b, *k);
                    c = _mm512_aesenc_epi128(c, *k);
                    d = _mm512_aesenc_epi128(d, *k);
                } else {
                    a = _mm512_aesdec_epi128(a, *k);
                    b = _mm512_aesdec_epi128(b, *k);
                    c = _mm512_aesdec_epi128(c, *k);
                    d = _mm512_aesdec_epi128(d, *k);
                }
            }
            // aesenclast(x, k ^ t) = aesenclast(x, k) ^ t: the last round
            // key and the tweak in one.
            let (ka, kb, kc, kd) = (
                _mm512_xor_si512(rk[NR], t0),
                _mm512_xor_si512(rk[NR], t1),
                _mm512_xor_si512(rk[NR], t2),
                _mm512_xor_si512(rk[NR], t3),
            );
            if ENC {
                a = _mm512_aesenclast_epi128(a, ka);
                b = _mm512_aesenclast_epi128(b, kb);
                c = _mm512_aesenclast_epi128(c, kc);
                d = _mm512_aesenclast_epi128(d, kd);
            } else {
                a = _mm512_aesdeclast_epi128(a, ka);
                b = _mm512_aesdeclast_epi128(b, kb);
                c = _mm512_aesdeclast_epi128(c, kc);
                d = _mm512_aesdeclast_epi128(d, kd);
            }
            // SAFETY: as for the loads, into dst.
            unsafe {
                let p = k.dst.add(off);
                _mm512_storeu_si512(p.cast(), a);
                _mm512_storeu_si512(p.add(64).cast(), b);
                _mm512_storeu_si512(p.add(128).cast(), c);
                _mm512_storeu_si512(p.add(192).cast(), d);
            }
        }
    }
    rk.fill(_mm512_setzero_si512());
    std::hint::black_box(&rk);
    // The round keys, tweaks and blocks left in the vector registers:
    // zmm0-15 by VZEROALL, zmm16-31 (which it leaves) one by one.
    _mm256_zeroall();
    // SAFETY: only zeroes registers it declares as clobbered; no memory,
    // no stack, no flags. AVX-512F is enabled for this function.
    unsafe {
        std::arch::asm!(
            "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20", "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23",
            "vpxord zmm24, zmm24, zmm24", "vpxord zmm25, zmm25, zmm25",
            "vpxord zmm26, zmm26, zmm26", "vpxord zmm27, zmm27, zmm27",
            "vpxord zmm28, zmm28, zmm28", "vpxord zmm29, zmm29, zmm29",
            "vpxord zmm30, zmm30, zmm30", "vpxord zmm31, zmm31, zmm31",
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nomem, nostack, preserves_flags),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible stream of test values (xorshift64).
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// After a call returns, the stack below the caller's frame holds
    /// neither the data key (round key 0 is the key itself) nor a block
    /// of the plaintext: the kernel's spills were wiped. Read through
    /// /proc/self/mem; the read's own calls overwrite the top few hundred
    /// bytes first, so this can miss a leftover there, never invent one.
    #[test]
    fn the_stack_keeps_no_key_or_plaintext_after_a_call() {
        for width in [Width::Zmm, Width::Ymm] {
            stack_after_a_call(width);
        }
    }

    fn stack_after_a_call(width: Width) {
        let t = std::thread::spawn(move || {
            let key: Vec<u8> = (0..64u8).map(|i| i ^ 0xa7).collect();
            let Some(x) = Xts::with_width(&key, width) else {
                eprintln!("no {width:?} kernel on this CPU: nothing to test");
                return;
            };
            let block: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(29) ^ 0xc3).collect();
            let plain = block.repeat(4096 * 4 / 16);
            let mut buf = plain.clone();
            let mem = std::fs::File::open("/proc/self/mem").unwrap();
            x.encrypt(9, 8, 4096, &mut buf);
            x.decrypt(9, 8, 4096, &mut buf);
            assert_eq!(buf, plain);
            let here = 0u8;
            let top = std::hint::black_box(&here) as *const u8 as usize;
            let span = crate::stack::AFTER_CIPHER;
            let below = crate::stack::peek(&mem, top - span, span).unwrap();
            let found = |needle: &[u8]| below.windows(needle.len()).position(|w| w == needle);
            assert_eq!(found(&key[..16]), None, "the data key is left on the stack");
            assert_eq!(
                found(&key[32..48]),
                None,
                "the tweak key is left on the stack"
            );
            assert_eq!(
                found(&block),
                None,
                "a plaintext block is left on the stack"
            );
        });
        t.join().unwrap();
    }

    /// Both kernels' multiplication by x^16 with whole-byte shifts gives
    /// what the bit shifts give, on every lane.
    #[test]
    fn the_byte_shift_multiplies_as_the_bit_shift() {
        let (ymm, zmm) = (Width::Ymm.runs_here(), Width::Zmm.runs_here());
        if !ymm && !zmm {
            eprintln!("no VAES kernel on this CPU");
            return;
        }
        // Which kernels this host checks (the AVX-512 one needs a CPU that
        // has it: run the tests there too).
        eprintln!("x^16 by byte shifts checked for: AVX2 {ymm}, AVX-512 {zmm}");
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for round in 0..10_000 {
            // A few fixed top quadwords (the bits the reduction folds
            // back), then random ones.
            let q = if round < 4 {
                [u64::MAX, 1 << 63, 0, 1u64 << 48][round]
            } else {
                next()
            };
            let v = [next(), q, next(), !q, next(), next(), q ^ 1, next()];
            if ymm {
                // SAFETY: AVX2 and VPCLMULQDQ checked above
                // (Ymm.runs_here); 32-byte arrays, unaligned loads and
                // stores.
                let (a, b) = unsafe {
                    let t = _mm256_loadu_si256(v.as_ptr().cast());
                    let (mut a, mut b) = ([0u64; 4], [0u64; 4]);
                    _mm256_storeu_si256(a.as_mut_ptr().cast(), mul_x16_ymm(t));
                    _mm256_storeu_si256(b.as_mut_ptr().cast(), mul_xk_ymm::<16, 48>(t));
                    (a, b)
                };
                assert_eq!(a, b, "{v:x?}");
            }
            if zmm {
                // SAFETY: AVX-512F and BW and VPCLMULQDQ checked above
                // (Zmm.runs_here); 64-byte arrays, unaligned loads and
                // stores.
                let (a, b) = unsafe {
                    let t = _mm512_loadu_si512(v.as_ptr().cast());
                    let (mut a, mut b) = ([0u64; 8], [0u64; 8]);
                    _mm512_storeu_si512(a.as_mut_ptr().cast(), mul_x16(t));
                    _mm512_storeu_si512(b.as_mut_ptr().cast(), mul_xk::<16, 48>(t));
                    (a, b)
                };
                assert_eq!(a, b, "{v:x?}");
            }
        }
    }

    /// The two kernels give the same bytes, both ways, in place and out
    /// of place, for both key sizes, every sector size and IVs whose
    /// tweaks carry (the wide one is checked against IEEE 1619 and the
    /// other providers by coffre-luks2).
    #[test]
    fn both_widths_agree() {
        if !(Width::Zmm.runs_here() && Width::Ymm.runs_here()) {
            eprintln!("this CPU runs one kernel at most: nothing to compare");
            return;
        }
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for round in 0..200 {
            let len = if round % 2 == 0 { 32 } else { 64 };
            let key: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            let wide = Xts::with_width(&key, Width::Zmm).unwrap();
            let narrow = Xts::with_width(&key, Width::Ymm).unwrap();
            assert_eq!(narrow.width(), Width::Ymm);
            let sector = [256usize, 512, 4096][round % 3];
            let data: Vec<u8> = (0..sector * (1 + round % 4))
                .map(|_| next().to_le_bytes()[0])
                .collect();
            let iv = if round % 5 == 0 { u64::MAX - 2 } else { next() };
            let step = (sector / 512).max(1) as u64;
            let mut a = data.clone();
            let mut b = data.clone();
            wide.encrypt(iv, step, sector, &mut a);
            narrow.encrypt(iv, step, sector, &mut b);
            assert_eq!(a, b, "round {round}: encryption");
            let mut out = vec![0u8; data.len()];
            narrow.encrypt_to(iv, step, sector, &data, &mut out);
            assert_eq!(out, a, "round {round}: out of place");
            narrow.decrypt(iv, step, sector, &mut b);
            assert_eq!(b, data, "round {round}: decryption");
            let mut back = vec![0u8; data.len()];
            narrow.decrypt_to(iv, step, sector, &a, &mut back);
            assert_eq!(back, data, "round {round}: decryption out of place");
        }
    }

    #[test]
    fn round_trips_and_differs() {
        for len in [32u8, 64] {
            let key: Vec<u8> = (0..len).map(|i| i.wrapping_mul(7) ^ 3).collect();
            let Some(x) = Xts::new(&key) else {
                eprintln!("no VAES-512 on this CPU: nothing to test");
                return;
            };
            let orig: Vec<u8> = (0..4096 * 3u32)
                .map(|i| i.to_le_bytes()[0] ^ 0x5a)
                .collect();
            let mut buf = orig.clone();
            x.encrypt(17, 8, 4096, &mut buf);
            assert_ne!(buf, orig);
            x.decrypt(17, 8, 4096, &mut buf);
            assert_eq!(buf, orig);
            // Out of place gives the same bytes both ways.
            let mut inplace = orig.clone();
            x.encrypt(17, 8, 4096, &mut inplace);
            let mut out = vec![0u8; orig.len()];
            x.encrypt_to(17, 8, 4096, &orig, &mut out);
            assert_eq!(out, inplace);
            let mut back = vec![0u8; orig.len()];
            x.decrypt_to(17, 8, 4096, &out, &mut back);
            assert_eq!(back, orig);
        }
    }
}

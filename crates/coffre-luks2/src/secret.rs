//! Buffers for key material: zeroized on drop, locked in RAM while alive,
//! and never printed.

use std::fmt;
use zeroize::Zeroize;

/// A heap buffer of secret bytes.
///
/// - its pages are `mlock`ed (best effort) so they never reach swap, and
///   unlocked only when no other live secret uses them;
/// - it is overwritten with zeros when dropped;
/// - `Debug` shows only its length; there is no `Display` and no `Clone`.
pub struct SecretBytes {
    buf: Box<[u8]>,
}

impl SecretBytes {
    /// A zero-filled secret buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len].into_boxed_slice();
        // Best effort: without CAP_IPC_LOCK the limit may be small. The
        // buffer is still zeroized on drop. Counted per page: small secrets
        // share pages, and dropping one must not unlock its neighbours.
        let _ = coffre_sys::locked::lock_shared(&buf);
        Self { buf }
    }

    /// Copies `bytes` into a new secret buffer. The caller remains
    /// responsible for wiping its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut s = Self::zeroed(bytes.len());
        s.buf.copy_from_slice(bytes);
        s
    }

    /// Takes ownership of `v`, moving it into locked memory and wiping the
    /// original allocation.
    pub fn from_vec(mut v: Vec<u8>) -> Self {
        let s = Self::from_slice(&v);
        v.zeroize();
        s
    }

    /// `len` bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Self {
        let mut s = Self::zeroed(len);
        fill_random(&mut s.buf);
        s
    }

    /// The secret bytes. Keep the borrow short.
    pub fn expose(&self) -> &[u8] {
        &self.buf
    }

    /// The secret bytes, writable.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// An explicit copy; cloning a secret should be visible in the code.
    pub fn duplicate(&self) -> Self {
        Self::from_slice(&self.buf)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.buf.zeroize();
        coffre_sys::locked::unlock_shared(&self.buf);
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.buf.len())
    }
}

/// Overwrites the 64 KiB of stack below the caller's frame with zeros.
///
/// Crypto libraries copy keys into stack buffers we cannot reach (HMAC
/// copies a 64-byte key into its block as it is, and the volume-key digest
/// is an HMAC keyed with the volume key). Calling this right after such
/// work, from the frame that started it, wipes what the finished calls
/// left below it.
#[inline(always)]
pub fn scrub_stack() {
    coffre_sys::stack::scrub::<{ 64 * 1024 }>();
}

/// Fills `buf` from the OS CSPRNG. Panics only if the kernel has no
/// entropy source at all, in which case nothing safe can be done.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random number generator failed");
}

/// The key that encrypts the data segment. It exists only while a volume is
/// open; dropping it wipes it.
///
/// A key that came out of a keyslot remembers the digest it was checked
/// against (public data: salt, iterations, expected output), so opening
/// the volume with it does not run the same 125 ms derivation a second
/// time. Only this crate sets it, after a check that passed.
#[derive(Debug)]
pub struct VolumeKey(SecretBytes, Option<Box<crate::digest::Pbkdf2Digest>>);

impl VolumeKey {
    /// Wraps raw key bytes.
    pub fn new(bytes: SecretBytes) -> Self {
        Self(bytes, None)
    }
    /// A fresh random key of `len` bytes.
    pub fn generate(len: usize) -> Self {
        Self(SecretBytes::random(len), None)
    }
    /// Records that `digest` was computed over this key and matched.
    pub(crate) fn verified_by(mut self, digest: crate::digest::Pbkdf2Digest) -> Self {
        self.1 = Some(Box::new(digest));
        self
    }
    /// Whether this key already matched `digest`.
    pub(crate) fn was_verified_by(&self, digest: &crate::digest::Pbkdf2Digest) -> bool {
        self.1.as_deref() == Some(digest)
    }
    /// The key bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }
    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether the key is empty (never true for a real key).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// An explicit copy, for handing to a second owner.
    pub fn duplicate(&self) -> Self {
        Self(self.0.duplicate(), self.1.clone())
    }
}

/// A passphrase, as bytes (cryptsetup treats key files as raw bytes).
#[derive(Debug)]
pub struct Passphrase(SecretBytes);

impl Passphrase {
    /// Wraps raw passphrase bytes.
    pub fn new(bytes: SecretBytes) -> Self {
        Self(bytes)
    }
    /// Copies a passphrase from a slice (tests, or bytes already protected).
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(SecretBytes::from_slice(bytes))
    }
    /// The passphrase bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let s = SecretBytes::from_slice(b"hunter2-very-secret");
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"), "{d}");
        let p = Passphrase::from_slice(b"hunter2-very-secret");
        assert!(!format!("{p:?}").contains("hunter2"));
        let k = VolumeKey::new(SecretBytes::from_slice(&[0xAB; 32]));
        assert!(!format!("{k:?}").to_lowercase().contains("ab, ab"));
    }

    #[test]
    fn random_is_not_zero() {
        let s = SecretBytes::random(64);
        assert!(s.expose().iter().any(|&b| b != 0));
    }
}

//! AES-256-XTS from aws-lc (`EVP_aes_256_xts`), which has AES-NI, VAES-256
//! and VAES-512 code paths selected at run time.
//!
//! aws-lc treats each `EVP_*Update` call as one XTS data unit using the IV
//! set last, which is exactly a disk sector with a `plain64` IV.

use aws_lc_sys as ffi;
use std::ptr;

/// Errors from aws-lc; it gives no detail we could usefully pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsLcError;

impl std::fmt::Display for AwsLcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("aws-lc refused the AES-256-XTS operation")
    }
}

impl std::error::Error for AwsLcError {}

/// One direction of AES-256-XTS with a fixed 64-byte key.
///
/// Not `Sync`: an `EVP_CIPHER_CTX` carries the current IV, so each thread
/// owns its own context (see `Xts256::try_clone`).
pub struct Xts256 {
    ctx: *mut ffi::EVP_CIPHER_CTX,
    encrypt: bool,
}

// SAFETY: the context is owned exclusively by this value and aws-lc keeps
// no thread-local state tied to it, so moving it to another thread is fine.
unsafe impl Send for Xts256 {}

impl Xts256 {
    /// Builds a context for `key` (64 bytes: data key then tweak key).
    /// Fails if aws-lc refuses the key (it rejects equal halves).
    pub fn new(key: &[u8], encrypt: bool) -> Result<Self, AwsLcError> {
        if key.len() != 64 {
            return Err(AwsLcError);
        }
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; it returns null
        // on allocation failure, which we check.
        let ctx = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return Err(AwsLcError);
        }
        let this = Self { ctx, encrypt };
        let iv = [0u8; 16];
        // SAFETY: ctx is a fresh valid context; EVP_aes_256_xts returns a
        // static cipher; key is 64 readable bytes (checked above), the size
        // EVP_aes_256_xts expects, and iv 16 bytes. aws-lc copies both.
        let ok = unsafe {
            if encrypt {
                ffi::EVP_EncryptInit_ex(
                    ctx,
                    ffi::EVP_aes_256_xts(),
                    ptr::null_mut(),
                    key.as_ptr(),
                    iv.as_ptr(),
                )
            } else {
                ffi::EVP_DecryptInit_ex(
                    ctx,
                    ffi::EVP_aes_256_xts(),
                    ptr::null_mut(),
                    key.as_ptr(),
                    iv.as_ptr(),
                )
            }
        };
        if ok != 1 {
            return Err(AwsLcError);
        }
        Ok(this)
    }

    /// Encrypts or decrypts `data` in place as one XTS data unit with the
    /// 16-byte tweak `iv`. `data` must be a whole number of 16-byte blocks
    /// and at least one block long.
    pub fn process_unit(&mut self, iv: &[u8; 16], data: &mut [u8]) -> Result<(), AwsLcError> {
        if data.is_empty() || !data.len().is_multiple_of(16) {
            return Err(AwsLcError);
        }
        let len = libc::c_int::try_from(data.len()).map_err(|_| AwsLcError)?;
        let mut out_len: libc::c_int = 0;
        // SAFETY: ctx was initialised with a key in `new`; passing null
        // cipher and key keeps them and only replaces the IV (16 bytes,
        // readable). XTS in aws-lc supports in-place operation (out == in),
        // and data is valid for reads and writes of `len` bytes.
        let ok = unsafe {
            if self.encrypt {
                ffi::EVP_EncryptInit_ex(
                    self.ctx,
                    ptr::null(),
                    ptr::null_mut(),
                    ptr::null(),
                    iv.as_ptr(),
                ) == 1
                    && ffi::EVP_EncryptUpdate(
                        self.ctx,
                        data.as_mut_ptr(),
                        &mut out_len,
                        data.as_ptr(),
                        len,
                    ) == 1
            } else {
                ffi::EVP_DecryptInit_ex(
                    self.ctx,
                    ptr::null(),
                    ptr::null_mut(),
                    ptr::null(),
                    iv.as_ptr(),
                ) == 1
                    && ffi::EVP_DecryptUpdate(
                        self.ctx,
                        data.as_mut_ptr(),
                        &mut out_len,
                        data.as_ptr(),
                        len,
                    ) == 1
            }
        };
        if ok && out_len == len {
            Ok(())
        } else {
            Err(AwsLcError)
        }
    }
}

impl Drop for Xts256 {
    fn drop(&mut self) {
        // SAFETY: ctx came from EVP_CIPHER_CTX_new and is freed exactly
        // once; EVP_CIPHER_CTX_free cleanses the expanded key schedule.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.ctx) };
    }
}

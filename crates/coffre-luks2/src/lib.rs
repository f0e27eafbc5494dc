//! The LUKS2 on-disk format, as pure functions over bytes.
//!
//! This crate knows the layout that cryptsetup and dm-crypt use (the LUKS2
//! specification, "LUKS2 On-Disk Format Specification" version 1.1.x) and the
//! cryptography around it: keyslot key derivation (argon2i, argon2id,
//! pbkdf2), the anti-forensic splitter, the volume-key digest and the
//! `aes-xts-plain64` sector cipher. It does no I/O: the storage layer reads
//! bytes, hands them here, and writes back what this crate encodes.
//!
//! Anything it does not fully understand (reencryption in progress,
//! integrity, other ciphers, mandatory requirement flags) is refused with
//! [`Error::Unsupported`], so a header is never rewritten from a partial
//! understanding.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod af;
pub mod binary;
pub mod cipher;
pub mod digest;
mod error;
pub mod hash;
pub mod header;
pub mod kdf;
pub mod keyslot;
pub mod metadata;
pub mod rules;
pub mod secret;

pub use error::Error;
pub use header::{CopyState, Header, LoadedHeader};
pub use secret::{Passphrase, SecretBytes, VolumeKey};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Size of a LUKS2 binary header, in bytes.
pub const BINARY_HEADER_SIZE: usize = 4096;

/// Size of an encrypted sector in the keyslot area (always 512 in LUKS2).
pub const KEYSLOT_SECTOR_SIZE: usize = 512;

/// Greatest number of keyslots (and of tokens) LUKS2 allows.
pub const MAX_KEYSLOTS: u32 = 32;

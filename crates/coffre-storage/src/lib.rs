//! Storage: the [`BlockDevice`] trait and its backends, and the LUKS2
//! [`EncryptedVolume`] over them.
//!
//! [`Luks2Container`] is a volume whose key is not known yet: its header
//! (attached or detached), locked against every other opener, with the
//! keyslot operations that read and write the header device in a
//! crash-safe order. Unlocking it yields an [`EncryptedVolume`], the
//! decrypted view of the data segment.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod container;
mod device;
mod error;
pub mod nbd_wire;
mod volume;

pub use coffre_luks2::header::SealedKeyslot;
pub use container::{FormatRequest, KeyslotSnapshot, Luks2Container, RepairAction, VolumeOpener};
pub use device::{BlockDevice, FileDevice};
pub use error::Error;
pub use volume::{CipherSlot, EncryptedVolume, Engine};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The vault's ciphertext on an untrusted object store (issue 17).
//!
//! The storage provider is not trusted: it sees only ciphertext (the LUKS2
//! data segment; the header stays in the control directory), and it must
//! not be able to change what the vault reads without the vault noticing,
//! whether by altering bytes, swapping objects, or serving an older,
//! consistent state of the whole bucket. Tools in this space (s3backer,
//! ZeroFS, rclone crypt) detect altered blocks at best; none detects the
//! last.
//!
//! - The volume is cut into fixed-size chunks ([`layout::Geometry`]), each
//!   stored under a versioned name with a MAC over (vault, index, version,
//!   ciphertext) under an integrity key of its own ([`integrity`]).
//! - A version table, in pages, lists every chunk's version and MAC; a
//!   manifest lists every page's epoch and MAC, with a MAC of its own. The
//!   manifest is written last, with a conditional put on the version this
//!   writer last saw: a second writer is fenced off.
//! - The manifest's epoch and MAC ([`layout::Root`]) are kept locally: a
//!   store whose manifest is older is refused at open
//!   ([`RemoteError::Rollback`]); an older page or chunk fails its MAC.
//!
//! [`ChunkStore`] is the store, async; [`RemoteDevice`] a block device on
//! it (a write-back buffer, a flush that makes it durable), for the
//! daemon's data path.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blocks;
pub mod bufpool;
pub mod device;
pub mod integrity;
pub mod journal;
pub mod layout;
pub mod nbd;
pub mod objects;
pub mod s3;
pub mod store;
pub mod transfer;
mod written;

pub use device::{Housekeeping, RemoteDevice};
pub use integrity::IntegrityKey;
pub use layout::{Geometry, Root};
pub use objects::{ObjectStoreObjects, Objects};
pub use store::{Backend, ChunkStore, MirrorSettings, Opened, ReplicaStatus, StoreEvent};

/// What went wrong with the volume on a store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The store failed (network, server error, permissions): worth a
    /// retry.
    #[error("the store: {0}")]
    Store(String),
    /// An object does not verify: altered, an older version, another
    /// chunk's or another vault's, or missing. Never read back.
    #[error("the store's data does not verify: {0}")]
    Tampered(String),
    /// The store's manifest is older than the one this vault last wrote.
    #[error(
        "the store serves epoch {store}, older than the epoch {local} this vault last wrote: it was rolled back (or restored from an older copy); the vault stays closed. If it is the control directory that is old (restored from a backup), see `coffre storage trust`"
    )]
    Rollback {
        /// The store's epoch.
        store: u64,
        /// The local root's epoch.
        local: u64,
    },
    /// The store's manifest has the local epoch but another MAC: two
    /// histories.
    #[error(
        "the store's manifest at epoch {epoch} is not the one this vault wrote at that epoch: another writer with this vault's keys, or a restored copy"
    )]
    Forked {
        /// The epoch.
        epoch: u64,
    },
    /// Another writer replaced the manifest: this one stops writing.
    #[error(
        "another writer changed the store's manifest: this one is fenced off and writes nothing more (is the vault open on another host?)"
    )]
    Fenced,
    /// The store has no manifest.
    #[error("the store holds no volume here{}", match .local { Some(e) => format!(" (this vault last wrote epoch {e} to it: wrong URL, or the bucket was emptied)"), None => String::new() })]
    Empty {
        /// The local root's epoch, if there is one.
        local: Option<u64>,
    },
    /// The store does not honour conditional writes.
    #[error("the store does not honour conditional writes ({0})")]
    NoConditionalWrites(String),
    /// Sealing or unsealing the integrity key.
    #[error("the integrity key: {0}")]
    Crypto(String),
    /// A wrong setting or argument.
    #[error("{0}")]
    Config(String),
}

impl RemoteError {
    /// As an I/O error for the block layer: data that does not verify is
    /// `InvalidData` (ext4 sees an I/O error, never altered bytes).
    pub fn into_io(self) -> std::io::Error {
        let kind = match &self {
            RemoteError::Tampered(_) => std::io::ErrorKind::InvalidData,
            RemoteError::Fenced => std::io::ErrorKind::PermissionDenied,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, self)
    }
}

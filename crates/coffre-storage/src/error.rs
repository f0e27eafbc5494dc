use std::path::PathBuf;
use thiserror::Error;

/// Storage errors. None of them ever carries key material.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error on the data device of an open volume.
    #[error("{op} the data device: {source}")]
    Device {
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the volume.
    #[error(
        "{0} is in use by another coffre process (a running vault or another command); stop it first"
    )]
    Busy(PathBuf),
    /// A LUKS2 format or crypto error.
    #[error(transparent)]
    Luks2(#[from] coffre_luks2::Error),
    /// A header copy is damaged or stale, so we refuse to write.
    #[error(
        "the LUKS2 header of {path} needs repair ({detail}); nothing was written. Run `coffre volume repair` first"
    )]
    NeedsRepair {
        /// Header file.
        path: PathBuf,
        /// Which copy and why.
        detail: String,
    },
    /// A request outside the volume or not sector-aligned.
    #[error("{0}")]
    Range(String),
    /// Refusal to overwrite something that looks valuable.
    #[error("{0}")]
    Refused(String),
    /// The volume's key was wiped (a close past its deadline): no more
    /// I/O through it.
    #[error("the volume's key was wiped: no more I/O through it")]
    Revoked,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

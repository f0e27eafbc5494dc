//! A member's identity file: the vault's address and CA, the member's
//! certificate and private key (mode 0600).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Reading or writing an identity file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{what} identity {}: {source}", path.display())]
    Io {
        /// Read or write.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an identity.
    #[error("{}: not a coffre identity: {msg}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
}

/// A member's identity file: how a client finds and proves itself to the
/// daemon. Mode 0600; holds the member's private key.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    /// Member name.
    pub member: String,
    /// Daemon address.
    pub server: String,
    /// The vault CA (pinned).
    pub ca_pem: String,
    /// The member's certificate.
    pub cert_pem: String,
    /// The member's private key. Secret: wiped when dropped.
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("member", &self.member)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads an identity file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        // The file's bytes hold the key too: wiped once parsed.
        let bytes = std::fs::read(path)
            .map(zeroize::Zeroizing::new)
            .map_err(|source| IdentityError::Io {
                what: "read",
                path: path.to_path_buf(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|e| IdentityError::Bad {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Writes it with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec_pretty(self).expect("serialises"));
        coffre_sys::fs::write_atomic(path, &bytes, 0o600).map_err(|source| IdentityError::Io {
            what: "write",
            path: path.to_path_buf(),
            source,
        })
    }
}

//! Renewing the vault's own certificates on its host: the door's
//! (`coffre renew --server DIR`), the VPN gateway's (`--gateway`) and the
//! CA's (`--ca`). A member renews their own from their machine, through
//! the door (see `AccountChange::Certificate`).
//!
//! The door's and the gateway's are signed by the vault's CA with a new
//! key; clients check the CA and the name, never the server certificate
//! itself, so nothing changes for them. The daemon serves the new door
//! certificate from its next start, OpenVPN the gateway's from its next
//! start.
//!
//! The CA's is made anew for the same key and name ([`pki::renew_ca`]):
//! every certificate it signed chains to either, so identities keep
//! working and nothing is reissued. What checks the CA's own dates
//! (OpenSSL: OpenVPN, members' VPN profiles, the broker) must be given the
//! new one before the old one ends; rustls (the door, `coffre` clients,
//! bus components) does not read a trust anchor's dates.

use crate::pki::{self, PkiError};
use crate::vaultdir::{DirError, VaultDir, write_atomic};
use std::path::PathBuf;

/// Which certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The door's (`server.pem`, `server.key`).
    Server,
    /// The VPN gateway's (`gateway/server.pem`, `gateway/server.key`).
    Gateway,
    /// The CA's (`ca.pem`, and its copy `gateway/ca.pem` for OpenVPN),
    /// for the key it has (`ca.key` is not touched).
    Ca,
}

/// Why a renewal failed; nothing was replaced.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The vault directory.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Signing.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// `--gateway` on a vault without one.
    #[error(
        "{0} does not exist: this vault has no VPN gateway (coffre gateway openvpn-config makes one)"
    )]
    NoGateway(PathBuf),
}

/// What was renewed.
#[derive(Debug)]
pub struct Renewed {
    /// The certificate file.
    pub cert: PathBuf,
    /// Its SHA-256 fingerprint.
    pub fingerprint: String,
    /// When it ends (Unix seconds).
    pub not_after: i64,
}

/// Issues `which` anew and replaces its files. The door's and the
/// gateway's: a new key, [`pki::Lifetime::Server`], the key then the
/// certificate, each atomically: a crash between the two leaves the new
/// key with the old certificate, a pair that does not match (`coffre
/// doctor` says so; renew again). The CA's: see [`Which::Ca`].
pub fn renew(dir: &VaultDir, which: Which) -> Result<Renewed, RenewError> {
    let config = dir.load_config()?;
    let (cert, key) = match which {
        Which::Ca => return renew_ca(dir, &config.name),
        Which::Server => (dir.server_cert(), dir.server_key()),
        Which::Gateway => {
            let gw = dir.gateway_dir();
            let cert = gw.join("server.pem");
            if !cert.exists() {
                return Err(RenewError::NoGateway(cert));
            }
            (cert, gw.join("server.key"))
        }
    };
    let ca_key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
    let issued = if which == Which::Gateway {
        pki::new_gateway_cert(
            &config.name,
            &ca_key,
            &crate::openvpn::gateway_cn(&config.name),
        )?
    } else {
        pki::new_server_cert(&config.name, &ca_key)?
    };
    drop(ca_key);
    let key_pem = zeroize::Zeroizing::new(issued.key_pem);
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    let not_after = pki::pem_not_after(&issued.cert_pem).map_or(0, |(t, _)| t);
    Ok(Renewed {
        cert,
        fingerprint: issued.fingerprint,
        not_after,
    })
}

/// `ca.pem` made anew for `ca.key`, then its copy for OpenVPN when the
/// vault has a gateway, each atomically. A crash between the two leaves
/// OpenVPN's copy the old certificate of the same key: it keeps working
/// until the old one ends, and renewing again rewrites both.
fn renew_ca(dir: &VaultDir, vault: &str) -> Result<Renewed, RenewError> {
    let ca_key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
    let old = dir.read(&dir.ca_cert())?;
    let issued = pki::renew_ca(vault, &ca_key, &old)?;
    drop(ca_key);
    let cert = dir.ca_cert();
    write_atomic(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    let copy = dir.gateway_dir().join("ca.pem");
    if copy.exists() {
        write_atomic(&copy, issued.cert_pem.as_bytes(), 0o644)?;
    }
    let not_after = pki::pem_not_after(&issued.cert_pem).map_or(0, |(t, _)| t);
    Ok(Renewed {
        cert,
        fingerprint: issued.fingerprint,
        not_after,
    })
}

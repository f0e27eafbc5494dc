//! rustls configurations: TLS 1.3 only, the vault CA as the only root on
//! both sides, client certificates required.

use crate::identity::Identity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::sync::Arc;

/// TLS set-up errors.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// The name the daemon's certificate carries and clients ask for.
pub const SERVER_NAME: &str = "coffre";

fn e(x: impl std::fmt::Display) -> TlsError {
    TlsError(x.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.map_err(e)?).map_err(e)?;
    }
    if roots.is_empty() {
        return Err(TlsError("no CA certificate".into()));
    }
    Ok(roots)
}

fn chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)
}

/// The daemon's configuration: its certificate, and client certificates
/// that chain to the vault CA required.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, TlsError> {
    let verifier =
        // Clients without a certificate get through TLS so that invited
        // people can join; every other command needs a member's certificate.
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .allow_unauthenticated()
            .build()
            .map_err(e)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(e)?;
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(e)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(cert_pem)?, key)
        .map_err(e)
}

/// A joining client's configuration: the CA pinned from the invitation, no
/// client certificate yet.
pub fn join_config(ca_pem: &str) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(e)?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth())
}

/// A client's configuration from its identity file: the vault CA pinned,
/// the member's certificate presented.
pub fn client_config(id: &Identity) -> Result<ClientConfig, TlsError> {
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(e)?;
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(e)?
        .with_root_certificates(roots(&id.ca_pem)?)
        .with_client_auth_cert(chain(&id.cert_pem)?, key)
        .map_err(e)
}

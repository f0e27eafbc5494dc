//! The vault's own PKI: a CA that signs the server's certificate and each
//! member's. Members are recognised by their certificate's SHA-256
//! fingerprint, bound to their name in the control data.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// PKI errors.
#[derive(Debug, thiserror::Error)]
#[error("certificate: {0}")]
pub struct PkiError(String);

fn e(x: impl std::fmt::Display) -> PkiError {
    PkiError(x.to_string())
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    /// The certificate (public).
    pub cert_pem: String,
    /// Private key (PKCS#8). Secret.
    pub key_pem: String,
    /// SHA-256 of the certificate's DER, hex.
    pub fingerprint: String,
}

/// The name the server certificate carries and clients check.
pub use coffre_api::tls::SERVER_NAME;

/// SHA-256 of DER bytes, hex.
pub fn fingerprint(der: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(der))
}

fn ca_params(vault: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("coffre CA {vault}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Creates a CA for vault `vault`.
pub fn new_ca(vault: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let cert = ca_params(vault)?.self_signed(&key).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn issuer(vault: &str, ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(e)?;
    Ok(Issuer::new(ca_params(vault)?, key))
}

/// `p` with a new key `key`, signed by the vault's CA.
fn signed(
    p: &CertificateParams,
    key: KeyPair,
    vault: &str,
    ca_key_pem: &str,
) -> Result<Issued, PkiError> {
    let cert = p.signed_by(&key, &issuer(vault, ca_key_pem)?).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues the server certificate (DNS name [`SERVER_NAME`] and `localhost`).
pub fn new_server_cert(vault: &str, ca_key_pem: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(vec![SERVER_NAME.to_string(), "localhost".to_string()])
        .map_err(e)?;
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::V4(
            std::net::Ipv4Addr::LOCALHOST,
        )));
    p.distinguished_name
        .push(DnType::CommonName, format!("coffre server {vault}"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    signed(&p, key, vault, ca_key_pem)
}

/// Issues the VPN gateway's certificate (OpenVPN server): common name
/// `cn`, which members' profiles pin, and the key usages OpenVPN's
/// `remote-cert-tls server` checks.
pub fn new_gateway_cert(vault: &str, ca_key_pem: &str, cn: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, cn.to_string());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    signed(&p, key, vault, ca_key_pem)
}

/// Issues the vault directory's certificate (the LDAP server for the
/// workloads): its only name is the host's address on the vault network
/// `addr`, never the door's name, so it cannot stand in for the door.
pub fn new_directory_cert(
    vault: &str,
    ca_key_pem: &str,
    addr: std::net::Ipv4Addr,
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::V4(addr)));
    p.distinguished_name.push(
        DnType::CommonName,
        format!("coffre directory {vault} {addr}"),
    );
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    signed(&p, key, vault, ca_key_pem)
}

/// Signs a joining member's certificate request: their key pair was made
/// on their machine and never leaves it. The subject is set to `member`
/// whatever the request says.
pub fn sign_csr(
    vault: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    member: &str,
) -> Result<Issued, PkiError> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, member.to_string());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    csr.params = p;
    let cert = csr.signed_by(&issuer(vault, ca_key_pem)?).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: String::new(),
    })
}

/// A key pair and a certificate request for `member`, made on the
/// joining machine. Returns (request PEM, private key PEM).
pub fn new_request(member: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, member.to_string());
    let csr = p.serialize_request(&key).map_err(e)?;
    Ok((csr.pem().map_err(e)?, key.serialize_pem()))
}

/// Issues a member's client certificate. (Joining members make their key
/// on their own machine; `coffre init` makes the first superuser's for a
/// quick start, to be moved off the host.)
pub fn new_member_cert(vault: &str, ca_key_pem: &str, member: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, member.to_string());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    signed(&p, key, vault, ca_key_pem)
}

/// The SHA-256 fingerprint of the first certificate in `pem`.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|d| fingerprint(d.as_ref()))
}

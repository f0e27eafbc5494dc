//! The vault's own PKI: a CA that signs the server's certificate and each
//! member's. Members are recognised by their certificate's SHA-256
//! fingerprint, bound to their name in the control data.
//!
//! Every certificate has a finite life ([`Lifetime`]): long enough that
//! renewing is a yearly chore, short enough that a lost key stops working
//! by itself. `coffre doctor` and `coffre status` warn
//! [`EXPIRY_WARNING_DAYS`] days ahead; `coffre renew` renews (a member's
//! own certificate from their machine; the server's, the gateway's and
//! the CA's on the host).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
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
    /// Private key (PKCS#8). Secret: wiped when dropped.
    pub key_pem: zeroize::Zeroizing<String>,
    /// SHA-256 of the certificate's DER, hex.
    pub fingerprint: String,
}

/// The name the server certificate carries and clients check.
pub use coffre_api::tls::SERVER_NAME;

/// SHA-256 of DER bytes, hex.
pub fn fingerprint(der: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(der))
}

/// How long a certificate the vault issues is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// The CA: ten years (`coffre renew --ca` makes it anew for the same
    /// key, see docs/operations.md).
    Ca,
    /// The door's and the VPN gateway's server certificates: two years.
    Server,
    /// A member's client certificate: one year.
    Member,
    /// The vault directory's LDAP certificate, made anew at each start:
    /// one year.
    Directory,
}

impl Lifetime {
    /// In days.
    pub fn days(self) -> i64 {
        match self {
            Lifetime::Ca => 3650,
            Lifetime::Server => 730,
            Lifetime::Member | Lifetime::Directory => 365,
        }
    }
}

/// How many days before a certificate ends doctor and status warn.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Valid from an hour ago (clocks that lag a little still accept it) for
/// `life`.
fn valid_for(p: &mut CertificateParams, life: Lifetime) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(life.days());
}

/// When the first certificate in `pem` ends (Unix seconds), and its
/// subject.
pub fn pem_not_after(pem: &str) -> Option<(i64, String)> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = block.parse_x509().ok()?;
    Some((
        cert.validity().not_after.timestamp(),
        cert.subject().to_string(),
    ))
}

/// Whether the certificate in `cert_pem` is for the private key in
/// `key_pem` (the same public key).
pub fn cert_matches_key(cert_pem: &str, key_pem: &str) -> bool {
    let Ok(key) = KeyPair::from_pem(key_pem) else {
        return false;
    };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return false;
    };
    let Ok(cert) = block.parse_x509() else {
        return false;
    };
    cert.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
}

fn ca_params(vault: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("coffre CA {vault}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // The CA's key identifier, and so what every certificate it signs
    // names as its authority's (see `signed`): rcgen 0.14's default, with
    // which every vault's CA was made, written out so a new default cannot
    // part the two.
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// A random serial number (RFC 5280 4.1.2.2: unique per issuer). rcgen's
/// default derives it from the key, which a CA renewed for its own key
/// would repeat.
fn random_serial(p: &mut CertificateParams) -> Result<(), PkiError> {
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(e)?;
    // Positive and without a leading zero byte, as DER wants.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(())
}

/// Creates a CA for vault `vault`.
pub fn new_ca(vault: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = ca_params(vault)?;
    valid_for(&mut p, Lifetime::Ca);
    random_serial(&mut p)?;
    let cert = p.self_signed(&key).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
    })
}

/// The CA certificate made anew for the CA's own key (`ca_key_pem`) and
/// name, valid for another [`Lifetime::Ca`]: what `coffre renew --ca`
/// writes. Everything the old one signed chains to it (same name, same
/// key), and everything signed from now on chains to the old one, so
/// nobody has to move at once. Refused when `old_ca_pem` is not this
/// key's certificate or not for this vault's name (the config's `name`
/// was changed since the CA was made): the new certificate would not be
/// the issuer of what exists.
pub fn renew_ca(vault: &str, ca_key_pem: &str, old_ca_pem: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(e)?;
    check_vaults_ca(vault, ca_key_pem, old_ca_pem, "nothing renewed")?;
    let mut p = ca_params(vault)?;
    valid_for(&mut p, Lifetime::Ca);
    random_serial(&mut p)?;
    let cert = p.self_signed(&key).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(String::new()),
    })
}

/// The subject (DER) of the first certificate in `pem`.
fn pem_subject(pem: &str) -> Option<Vec<u8>> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = block.parse_x509().ok()?;
    Some(cert.subject().as_raw().to_vec())
}

/// Checks that `ca_pem` is the certificate of `ca_key_pem` and carries
/// the name this vault's CA has: what renewing it, or giving it a new
/// key, starts from.
/// `nothing` says what was not done, for the error.
fn check_vaults_ca(
    vault: &str,
    ca_key_pem: &str,
    ca_pem: &str,
    nothing: &str,
) -> Result<(), PkiError> {
    if !cert_matches_key(ca_pem, ca_key_pem) {
        return Err(PkiError(format!(
            "ca.pem is not the certificate of ca.key: {nothing}"
        )));
    }
    // The name as the vault's CA certificate is written, made with a
    // throw-away key.
    let probe = ca_params(vault)?
        .self_signed(&KeyPair::generate().map_err(e)?)
        .map_err(e)?;
    let ours = pem_subject(&probe.pem());
    if ours.is_none() || pem_subject(ca_pem) != ours {
        return Err(PkiError(format!(
            "ca.pem's name is not \"coffre CA {vault}\" (was the config's name changed?): a CA under another name would not be the issuer of the vault's certificates; {nothing}"
        )));
    }
    Ok(())
}

/// A new key for the vault's CA, and the certificate that carries the
/// trust placed in the old one over to it. See docs/operations.md, "A new
/// CA key", for the transition these make.
pub struct NewCaKey {
    /// The new CA: a new key, the old one's name, self-signed, valid for
    /// [`Lifetime::Ca`]. What members renewed from now on pin.
    pub ca: Issued,
    /// The cross certificate: the new CA's name and key, signed by the old
    /// CA, ending when the old CA does. Sent after every certificate the
    /// new CA signs, it lets whoever still trusts the old CA alone (a
    /// member's machine not yet renewed, OpenVPN's `ca`) build the path
    /// leaf -> cross -> old CA. Under the same name, so OpenSSL takes it
    /// as self-issued and the old CA's path length of 0 still holds.
    pub cross_pem: String,
}

/// Makes a new key for the vault's CA, whose certificate is `old_ca_pem`
/// and key `old_ca_key_pem` (the key lost its secrecy, or is too weak):
/// the new CA and the cross certificate, see [`NewCaKey`]. Refused on a CA
/// that is not this vault's (as [`renew_ca`]), and on one ending within
/// [`EXPIRY_WARNING_DAYS`]: the cross certificate ends with it, which
/// would leave members no time to move (renew it first, same key).
pub fn new_ca_key(
    vault: &str,
    old_ca_pem: &str,
    old_ca_key_pem: &str,
) -> Result<NewCaKey, PkiError> {
    check_vaults_ca(vault, old_ca_key_pem, old_ca_pem, "nothing changed")?;
    let old_key = KeyPair::from_pem(old_ca_key_pem).map_err(e)?;
    let (old_end, _) =
        pem_not_after(old_ca_pem).ok_or_else(|| PkiError("ca.pem: not a certificate".into()))?;
    let old_end = time::OffsetDateTime::from_unix_timestamp(old_end).map_err(e)?;
    let now = time::OffsetDateTime::now_utc();
    if old_end < now + time::Duration::days(EXPIRY_WARNING_DAYS) {
        return Err(PkiError(format!(
            "the CA's certificate ends in less than {EXPIRY_WARNING_DAYS} days, and the certificate that carries trust over to a new key would end with it: renew the CA's certificate for its own key first (`coffre renew --ca`); nothing changed"
        )));
    }
    let key = KeyPair::generate().map_err(e)?;
    let mut p = ca_params(vault)?;
    valid_for(&mut p, Lifetime::Ca);
    random_serial(&mut p)?;
    let ca = p.self_signed(&key).map_err(e)?;
    // The cross certificate: the new key under the same name, issued by
    // the old CA, with an authority key identifier (without one OpenSSL
    // would take it, subject and issuer alike, for self-signed and stop
    // there), no extended key usage, ending with the old CA.
    let mut x = ca_params(vault)?;
    valid_for(&mut x, Lifetime::Ca);
    x.not_after = x.not_after.min(old_end);
    random_serial(&mut x)?;
    x.use_authority_key_identifier_extension = true;
    let cross = x
        .signed_by(&key, &Issuer::new(ca_params(vault)?, old_key))
        .map_err(e)?;
    Ok(NewCaKey {
        ca: Issued {
            fingerprint: fingerprint(ca.der()),
            cert_pem: ca.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        },
        cross_pem: cross.pem(),
    })
}

fn issuer(vault: &str, ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(e)?;
    Ok(Issuer::new(ca_params(vault)?, key))
}

/// `p` with a new key `key`, signed by the vault's CA. Every certificate
/// the CA signs names its key (an authority key identifier): when two CA
/// certificates share the vault's name, during a move to a new CA key,
/// that is how OpenSSL picks the right one.
fn signed(
    p: &CertificateParams,
    key: KeyPair,
    vault: &str,
    ca_key_pem: &str,
) -> Result<Issued, PkiError> {
    let mut p = p.clone();
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer(vault, ca_key_pem)?).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
    })
}

/// Whether a member's machine that pins the CA `pinned_pem` may pin
/// `new_ca_pem` in its place, as the vault tells it with the member's
/// renewed certificate `leaf_pem` and the cross certificate `cross_pem`
/// (empty if none): the same key under the same name (a renewal, see
/// [`renew_ca`]), or a new key that the pinned CA certified. For the
/// second: the cross certificate carries the new CA's key and name, the
/// new CA's name is the pinned one's, and rustls' verifier trusts the leaf
/// as a member's both through leaf -> cross -> pinned CA and from the new
/// CA alone (so the new key signed it, and the pinned key the cross
/// certificate).
pub fn ca_succeeds(pinned_pem: &str, new_ca_pem: &str, cross_pem: &str, leaf_pem: &str) -> bool {
    let key_and_name = |pem: &str| -> Option<(Vec<u8>, String)> {
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
        let c = block.parse_x509().ok()?;
        Some((c.public_key().raw.to_vec(), c.subject().to_string()))
    };
    let (Some(pinned), Some(new)) = (key_and_name(pinned_pem), key_and_name(new_ca_pem)) else {
        return false;
    };
    if pinned == new {
        return true;
    }
    let Some(cross) = key_and_name(cross_pem) else {
        return false;
    };
    cross == new
        && new.1 == pinned.1
        && trusted_as_member(&[pinned_pem], leaf_pem, &[cross_pem])
        && trusted_as_member(&[new_ca_pem], leaf_pem, &[])
}

/// Whether rustls' verifier (the door's) trusts `leaf` as a member's
/// certificate, sent with `intermediates`, given the roots `roots`.
fn trusted_as_member(roots: &[&str], leaf: &str, intermediates: &[&str]) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).ok();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        if der(r).is_none_or(|d| store.add(d).is_err()) {
            return false;
        }
    }
    let Some(leaf) = der(leaf) else {
        return false;
    };
    let Some(chain) = intermediates
        .iter()
        .map(|p| der(p))
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(store),
        provider,
    )
    .build()
    .is_ok_and(|v| v.verify_client_cert(&leaf, &chain, UnixTime::now()).is_ok())
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
    valid_for(&mut p, Lifetime::Server);
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
    valid_for(&mut p, Lifetime::Server);
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
    valid_for(&mut p, Lifetime::Directory);
    signed(&p, key, vault, ca_key_pem)
}

/// Issues the bus broker's certificate (RabbitMQ's server side): its only
/// name is the address components connect to (`host`, an IP address or a
/// DNS name), never the door's name, so it cannot stand in for the door.
pub fn new_broker_cert(vault: &str, ca_key_pem: &str, host: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => p.subject_alt_names.push(SanType::IpAddress(ip)),
        Err(_) => {
            if host == SERVER_NAME {
                return Err(PkiError(format!(
                    "{host:?} is the door's name: give the broker's own address"
                )));
            }
            p = CertificateParams::new(vec![host.to_string()]).map_err(e)?;
        }
    }
    p.distinguished_name
        .push(DnType::CommonName, format!("coffre broker {vault} {host}"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    valid_for(&mut p, Lifetime::Server);
    signed(&p, key, vault, ca_key_pem)
}

/// Issues a bus component's client certificate: common name `cn`
/// (`coffre-bus:NAME`, which no member's name can be).
pub fn new_component_cert(vault: &str, ca_key_pem: &str, cn: &str) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, cn.to_string());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    valid_for(&mut p, Lifetime::Member);
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
    valid_for(&mut p, Lifetime::Member);
    // As every certificate the CA signs (see `signed`).
    p.use_authority_key_identifier_extension = true;
    csr.params = p;
    let cert = csr.signed_by(&issuer(vault, ca_key_pem)?).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(String::new()),
    })
}

/// Checks that `csr_pem` is a certificate request whose signature holds
/// (bad input is refused before any password check).
pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map(drop)
        .map_err(|x| PkiError(format!("bad certificate request: {x}")))
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
    valid_for(&mut p, Lifetime::Member);
    signed(&p, key, vault, ca_key_pem)
}

/// SHA-256 of the public key (SubjectPublicKeyInfo DER) of the first
/// certificate in `pem`, hex: what stays when a certificate is made anew
/// for the same key (`renew_ca`).
pub fn pem_key_fingerprint(pem: &str) -> Option<String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = block.parse_x509().ok()?;
    Some(fingerprint(cert.public_key().raw))
}

/// The SHA-256 fingerprint of the first certificate in `pem`.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|d| fingerprint(d.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days_left(pem: &str) -> i64 {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        (pem_not_after(pem).unwrap().0 - now) / 86_400
    }

    /// Every certificate the vault issues ends: the CA in ten years,
    /// servers in two, members in one.
    #[test]
    fn certificates_have_finite_lives() {
        let ca = new_ca("life").unwrap();
        assert!((3649..=3650).contains(&days_left(&ca.cert_pem)));
        let server = new_server_cert("life", &ca.key_pem).unwrap();
        assert!((729..=730).contains(&days_left(&server.cert_pem)));
        let gw = new_gateway_cert("life", &ca.key_pem, "gw").unwrap();
        assert!((729..=730).contains(&days_left(&gw.cert_pem)));
        let member = new_member_cert("life", &ca.key_pem, "alice").unwrap();
        assert!((364..=365).contains(&days_left(&member.cert_pem)));
        let (csr, _) = new_request("bob").unwrap();
        let signed = sign_csr("life", &ca.key_pem, &csr, "bob").unwrap();
        assert!((364..=365).contains(&days_left(&signed.cert_pem)));
        assert!(pem_not_after(&signed.cert_pem).unwrap().1.contains("bob"));
    }

    /// Verifies `leaf` as the door's certificate against `ca_pem` alone,
    /// with rustls' own verifier (what members' clients run).
    fn door_trusts(ca_pem: &str, leaf_pem: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(SERVER_NAME).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    /// A renewed CA has the same key and name and ten more years: what the
    /// old one signed is trusted through the new one and the other way
    /// round; another vault's CA trusts neither. A CA whose name or key do
    /// not match is refused.
    #[test]
    fn a_renewed_ca_trusts_what_the_old_one_signed_and_back() {
        let ca1 = new_ca("renewal").unwrap();
        let before = new_server_cert("renewal", &ca1.key_pem).unwrap();
        let ca2 = renew_ca("renewal", &ca1.key_pem, &ca1.cert_pem).unwrap();
        assert_ne!(ca1.fingerprint, ca2.fingerprint);
        assert!(ca2.key_pem.is_empty(), "the key stays where it is");
        assert!(cert_matches_key(&ca2.cert_pem, &ca1.key_pem));
        // One issuer, two certificates: two serial numbers (RFC 5280).
        let serial = |pem: &str| {
            let (_, b) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            b.parse_x509().unwrap().raw_serial().to_vec()
        };
        assert_ne!(serial(&ca1.cert_pem), serial(&ca2.cert_pem));
        // What names the vault on members' machines stays.
        assert_eq!(
            pem_key_fingerprint(&ca1.cert_pem),
            pem_key_fingerprint(&ca2.cert_pem)
        );
        assert_ne!(
            pem_key_fingerprint(&ca1.cert_pem),
            pem_key_fingerprint(&new_ca("renewal").unwrap().cert_pem)
        );
        assert!((3649..=3650).contains(&days_left(&ca2.cert_pem)));
        let after = new_server_cert("renewal", &ca1.key_pem).unwrap();
        for ca in [&ca1.cert_pem, &ca2.cert_pem] {
            assert!(door_trusts(ca, &before.cert_pem));
            assert!(door_trusts(ca, &after.cert_pem));
        }
        let other = new_ca("renewal").unwrap();
        assert!(!door_trusts(&other.cert_pem, &before.cert_pem));
        // rustls does not read a trust anchor's dates: a member's identity
        // that pins a CA certificate which has ended still trusts the door
        // (OpenSSL does read them: the system test checks that side).
        let key = KeyPair::from_pem(&ca1.key_pem).unwrap();
        let mut p = ca_params("renewal").unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(3650);
        p.not_after = now - time::Duration::days(1);
        let ended = p.self_signed(&key).unwrap().pem();
        assert!(door_trusts(&ended, &after.cert_pem));
        let ca3 = renew_ca("renewal", &ca1.key_pem, &ended).unwrap();
        assert!(door_trusts(&ca3.cert_pem, &before.cert_pem));
        // Another key, another name: refused, with what to look at.
        let err = renew_ca("renewal", &other.key_pem, &ca1.cert_pem)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not the certificate of ca.key"), "{err}");
        let err = renew_ca("renamed", &ca1.key_pem, &ca1.cert_pem)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config's name"), "{err}");
    }

    /// Whether rustls' verifier (the door's for members, members'
    /// clients' for the door) trusts `leaf`, sent with `intermediates`,
    /// given the roots `roots`.
    fn trusted(roots: &[&str], leaf: &str, intermediates: &[&str], member: bool) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(der(r)).unwrap();
        }
        let store = std::sync::Arc::new(store);
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain: Vec<_> = intermediates.iter().map(|p| der(p)).collect();
        if member {
            rustls::server::WebPkiClientVerifier::builder_with_provider(store, provider)
                .build()
                .unwrap()
                .verify_client_cert(&der(leaf), &chain, UnixTime::now())
                .is_ok()
        } else {
            rustls::client::WebPkiServerVerifier::builder_with_provider(store, provider)
                .build()
                .unwrap()
                .verify_server_cert(
                    &der(leaf),
                    &chain,
                    &ServerName::try_from(SERVER_NAME).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .is_ok()
        }
    }

    /// Whether `openssl verify` (OpenVPN's side) trusts `leaf` for
    /// `purpose` (sslclient, sslserver), given the trusted `ca` and the
    /// untrusted `extra` certificates a peer sends with it.
    fn openssl_verifies(ca: &str, extra: &[&str], leaf: &str, purpose: &str) -> bool {
        let d = tempfile::tempdir().unwrap();
        let file = |name: &str, pem: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let mut cmd = std::process::Command::new("openssl");
        cmd.arg("verify").arg("-purpose").arg(purpose);
        cmd.arg("-CAfile").arg(file("ca.pem", ca));
        if !extra.is_empty() {
            cmd.arg("-untrusted")
                .arg(file("extra.pem", &extra.concat()));
        }
        let out = cmd.arg(file("leaf.pem", leaf)).output().expect("openssl");
        out.status.success()
    }

    /// A certificate the CA signed before certificates named its key (no
    /// authority key identifier): what vaults made before hold.
    fn legacy_cert(vault: &str, ca_key_pem: &str, server: bool) -> String {
        let key = KeyPair::generate().unwrap();
        let (names, eku) = if server {
            (
                vec![SERVER_NAME.to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        } else {
            (Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
        };
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, "old");
        p.extended_key_usages = vec![eku];
        valid_for(&mut p, Lifetime::Member);
        p.signed_by(&key, &issuer(vault, ca_key_pem).unwrap())
            .unwrap()
            .pem()
    }

    /// The key identifiers of the first certificate in `pem`: (subject's,
    /// authority's).
    fn key_ids(pem: &str) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        use x509_parser::extensions::ParsedExtension;
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = block.parse_x509().unwrap();
        let (mut ski, mut aki) = (None, None);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => {}
            }
        }
        (ski, aki)
    }

    /// Every certificate the CA signs names the CA's key, as the CA's own
    /// certificate does: through a renewal for the same key too.
    #[test]
    fn issued_certificates_name_the_cas_key() {
        let ca = new_ca("aki").unwrap();
        let (ca_ski, _) = key_ids(&ca.cert_pem);
        assert!(ca_ski.is_some(), "the CA names its own key");
        let (csr, _) = new_request("bob").unwrap();
        let renewed = renew_ca("aki", &ca.key_pem, &ca.cert_pem).unwrap();
        for pem in [
            new_server_cert("aki", &ca.key_pem).unwrap().cert_pem,
            new_gateway_cert("aki", &ca.key_pem, "gw").unwrap().cert_pem,
            new_member_cert("aki", &ca.key_pem, "alice")
                .unwrap()
                .cert_pem,
            new_component_cert("aki", &ca.key_pem, "coffre-bus:relay")
                .unwrap()
                .cert_pem,
            new_directory_cert("aki", &ca.key_pem, std::net::Ipv4Addr::new(10, 9, 0, 1))
                .unwrap()
                .cert_pem,
            new_broker_cert("aki", &ca.key_pem, "127.0.0.1")
                .unwrap()
                .cert_pem,
            sign_csr("aki", &ca.key_pem, &csr, "bob").unwrap().cert_pem,
        ] {
            assert_eq!(key_ids(&pem).1, ca_ski);
            assert!(openssl_verifies(&ca.cert_pem, &[], &pem, "any"));
            assert!(openssl_verifies(&renewed.cert_pem, &[], &pem, "any"));
        }
        assert_eq!(key_ids(&renewed.cert_pem).0, ca_ski);
    }

    /// After a new CA key: what the new CA signs is trusted by whoever
    /// trusts the old CA when the cross certificate comes with it (rustls
    /// and OpenSSL, as a member and as a server), and by whoever trusts the
    /// new CA, with it or without; what the old CA signed before (no key
    /// identifier) is trusted by a door that trusts both.
    #[test]
    fn a_member_machine_moves_to_a_ca_its_pinned_one_certified_and_no_other() {
        let v = "succession";
        let ca1 = new_ca(v).unwrap();
        // The same key, made anew: always.
        let renewed = renew_ca(v, &ca1.key_pem, &ca1.cert_pem).unwrap();
        let leaf1 = new_member_cert(v, &ca1.key_pem, "alice").unwrap();
        assert!(ca_succeeds(
            &ca1.cert_pem,
            &renewed.cert_pem,
            "",
            &leaf1.cert_pem
        ));
        // A new key, with the cross certificate and a leaf it signed.
        let n = new_ca_key(v, &ca1.cert_pem, &ca1.key_pem).unwrap();
        let leaf2 = new_member_cert(v, &n.ca.key_pem, "alice").unwrap();
        assert!(ca_succeeds(
            &ca1.cert_pem,
            &n.ca.cert_pem,
            &n.cross_pem,
            &leaf2.cert_pem
        ));
        // Without the cross certificate, or with one from another CA: no.
        assert!(!ca_succeeds(
            &ca1.cert_pem,
            &n.ca.cert_pem,
            "",
            &leaf2.cert_pem
        ));
        let stranger = new_ca(v).unwrap();
        let m = new_ca_key(v, &stranger.cert_pem, &stranger.key_pem).unwrap();
        let leaf3 = new_member_cert(v, &m.ca.key_pem, "alice").unwrap();
        assert!(!ca_succeeds(
            &ca1.cert_pem,
            &m.ca.cert_pem,
            &m.cross_pem,
            &leaf3.cert_pem
        ));
        // The cross certificate for one key, another CA offered with it.
        assert!(!ca_succeeds(
            &ca1.cert_pem,
            &m.ca.cert_pem,
            &n.cross_pem,
            &leaf3.cert_pem
        ));
        // A leaf the offered CA did not sign.
        assert!(!ca_succeeds(
            &ca1.cert_pem,
            &n.ca.cert_pem,
            &n.cross_pem,
            &leaf1.cert_pem
        ));
        // Garbage.
        assert!(!ca_succeeds(
            &ca1.cert_pem,
            "not a certificate",
            &n.cross_pem,
            &leaf2.cert_pem
        ));
    }

    #[test]
    fn a_new_ca_key_is_trusted_through_the_cross_certificate() {
        let v = "rekey";
        let ca1 = new_ca(v).unwrap();
        let old_member = legacy_cert(v, &ca1.key_pem, false);
        let old_server = legacy_cert(v, &ca1.key_pem, true);
        let n = new_ca_key(v, &ca1.cert_pem, &ca1.key_pem).unwrap();
        let (ca2, x) = (&n.ca, n.cross_pem.as_str());
        assert_ne!(
            pem_key_fingerprint(&ca1.cert_pem),
            pem_key_fingerprint(&ca2.cert_pem)
        );
        assert_eq!(pem_subject(&ca1.cert_pem), pem_subject(&ca2.cert_pem));
        assert_eq!(pem_subject(x), pem_subject(&ca2.cert_pem));
        assert!(cert_matches_key(&ca2.cert_pem, &ca2.key_pem));
        assert!(cert_matches_key(x, &ca2.key_pem));
        assert!(pem_not_after(x).unwrap().0 <= pem_not_after(&ca1.cert_pem).unwrap().0);
        assert!((3649..=3650).contains(&days_left(&ca2.cert_pem)));
        assert_eq!(key_ids(x).1, key_ids(&ca1.cert_pem).0, "X names CA1's key");
        assert_eq!(key_ids(x).0, key_ids(&ca2.cert_pem).0, "X is CA2's key");
        {
            use x509_parser::extensions::ParsedExtension;
            let (_, block) = x509_parser::pem::parse_x509_pem(x.as_bytes()).unwrap();
            let cert = block.parse_x509().unwrap();
            let bc = cert.basic_constraints().unwrap().unwrap().value;
            assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
            assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
            assert!(
                !cert
                    .extensions()
                    .iter()
                    .any(|e| matches!(e.parsed_extension(), ParsedExtension::ExtendedKeyUsage(_))),
                "no extended key usage"
            );
        }

        let (ca1p, ca2p) = (ca1.cert_pem.as_str(), ca2.cert_pem.as_str());
        let server = new_server_cert(v, &ca2.key_pem).unwrap().cert_pem;
        let member = new_member_cert(v, &ca2.key_pem, "alice").unwrap().cert_pem;
        let (csr, _) = new_request("bob").unwrap();
        let bob = sign_csr(v, &ca2.key_pem, &csr, "bob").unwrap().cert_pem;
        for (leaf, m) in [(&server, false), (&member, true), (&bob, true)] {
            assert!(trusted(&[ca1p], leaf, &[x], m), "old CA, through X");
            assert!(!trusted(&[ca1p], leaf, &[], m), "old CA, without X");
            assert!(trusted(&[ca2p], leaf, &[x], m), "new CA, X sent anyway");
            assert!(trusted(&[ca2p], leaf, &[], m), "new CA");
            assert!(trusted(&[ca1p, ca2p], leaf, &[x], m), "both");
            let purpose = if m { "sslclient" } else { "sslserver" };
            assert!(
                openssl_verifies(ca1p, &[x], leaf, purpose),
                "OpenSSL, old CA, through X"
            );
            assert!(
                !openssl_verifies(ca1p, &[], leaf, purpose),
                "OpenSSL, old CA, no X"
            );
            assert!(
                openssl_verifies(ca2p, &[x], leaf, purpose),
                "OpenSSL, new CA, X sent"
            );
            assert!(
                openssl_verifies(ca2p, &[], leaf, purpose),
                "OpenSSL, new CA"
            );
        }
        // What the old CA signed before: trusted where the old CA is.
        assert!(trusted(&[ca1p, ca2p], &old_member, &[], true));
        assert!(trusted(&[ca2p, ca1p], &old_server, &[], false));
        assert!(!trusted(&[ca2p], &old_member, &[], true));
        assert!(openssl_verifies(ca1p, &[x], &old_member, "sslclient"));
        // The cross certificate is a CA under the old one, not an anchor:
        // OpenSSL does not stop at it (webpki would, given it as a root,
        // but nothing gives it as one).
        assert!(!openssl_verifies(x, &[], &member, "sslclient"));
        // Another vault's CA trusts none of it.
        let other = new_ca(v).unwrap();
        assert!(!trusted(&[&other.cert_pem], &member, &[x], true));
    }

    #[test]
    fn a_new_ca_key_starts_from_this_vaults_ca_and_not_at_its_end() {
        let ca = new_ca("move").unwrap();
        let other = new_ca("move").unwrap();
        let err = |r: Result<NewCaKey, PkiError>| r.err().unwrap().to_string();
        let m = err(new_ca_key("move", &ca.cert_pem, &other.key_pem));
        assert!(m.contains("not the certificate of ca.key"), "{m}");
        let m = err(new_ca_key("renamed", &ca.cert_pem, &ca.key_pem));
        assert!(m.contains("config's name"), "{m}");
        // A CA certificate that ends in ten days: renew it first.
        let key = KeyPair::from_pem(&ca.key_pem).unwrap();
        let mut p = ca_params("move").unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(3640);
        p.not_after = now + time::Duration::days(10);
        let ending = p.self_signed(&key).unwrap().pem();
        let m = err(new_ca_key("move", &ending, &ca.key_pem));
        assert!(m.contains("coffre renew --ca"), "{m}");
        let renewed = renew_ca("move", &ca.key_pem, &ending).unwrap();
        assert!(new_ca_key("move", &renewed.cert_pem, &ca.key_pem).is_ok());
    }

    #[test]
    fn a_certificate_matches_its_own_key_only() {
        let ca = new_ca("pair").unwrap();
        let a = new_server_cert("pair", &ca.key_pem).unwrap();
        let b = new_server_cert("pair", &ca.key_pem).unwrap();
        assert!(cert_matches_key(&a.cert_pem, &a.key_pem));
        assert!(!cert_matches_key(&a.cert_pem, &b.key_pem));
        assert!(!cert_matches_key("not a certificate", &a.key_pem));
        let (csr, key) = new_request("carol").unwrap();
        let signed = sign_csr("pair", &ca.key_pem, &csr, "carol").unwrap();
        assert!(cert_matches_key(&signed.cert_pem, &key));
    }

    #[test]
    fn requests_are_checked_before_anything_else() {
        let (csr, _) = new_request("dave").unwrap();
        assert!(check_csr(&csr).is_ok());
        assert!(
            check_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .is_err()
        );
        // A request whose signature does not hold: one byte of the
        // signature flipped.
        let der = x509_parser::pem::parse_x509_pem(csr.as_bytes())
            .unwrap()
            .1
            .contents;
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            data_encoding::BASE64.encode(&bad)
        );
        assert!(check_csr(&pem).is_err());
    }
}

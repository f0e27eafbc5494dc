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
        key_pem: key.serialize_pem(),
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
    if !cert_matches_key(old_ca_pem, ca_key_pem) {
        return Err(PkiError(
            "ca.pem is not the certificate of ca.key: nothing renewed".into(),
        ));
    }
    let mut p = ca_params(vault)?;
    valid_for(&mut p, Lifetime::Ca);
    random_serial(&mut p)?;
    let cert = p.self_signed(&key).map_err(e)?;
    let subject = |der: &[u8]| -> Option<Vec<u8>> {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(c.subject().as_raw().to_vec())
    };
    let (_, old) = x509_parser::pem::parse_x509_pem(old_ca_pem.as_bytes()).map_err(e)?;
    if subject(&old.contents).is_none() || subject(&old.contents) != subject(cert.der()) {
        return Err(PkiError(format!(
            "ca.pem's name is not \"coffre CA {vault}\" (was the config's name changed?): a CA under another name would not be the issuer of the vault's certificates; nothing renewed"
        )));
    }
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: String::new(),
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
    csr.params = p;
    let cert = csr.signed_by(&issuer(vault, ca_key_pem)?).map_err(e)?;
    Ok(Issued {
        fingerprint: fingerprint(cert.der()),
        cert_pem: cert.pem(),
        key_pem: String::new(),
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

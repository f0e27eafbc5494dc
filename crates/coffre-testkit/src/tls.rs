//! A test PKI: a CA and a server certificate it signs, as PEM.

/// PEM of a new CA, a certificate for `names` (DNS names or IP
/// addresses) it signs, and that certificate's key.
pub struct TestPki {
    /// The CA's certificate.
    pub ca: String,
    /// The server's certificate.
    pub cert: String,
    /// The server's key.
    pub key: String,
}

impl TestPki {
    /// A CA named `cn`, and a certificate for `names`.
    pub fn new(cn: &str, names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
        TestPki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

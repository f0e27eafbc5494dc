//! The workload password's verifier, made on the member's machine: the
//! vault (and the directory that checks workload logins) only ever sees
//! this argon2id hash, never the password.

use coffre_vault::Verifier;
use zeroize::Zeroizing;

/// argon2id costs of a new verifier: 64 MiB, 3 passes, 1 lane (RFC 9106's
/// second recommended option). One check costs the directory that much,
/// one at a time.
pub const MEMORY_KIB: u32 = 64 * 1024;
/// Passes.
pub const PASSES: u32 = 3;
/// Lanes.
pub const LANES: u32 = 1;

/// Why a verifier could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// An empty password.
    #[error("the workload password is empty")]
    Empty,
    /// No randomness, or argon2 refused its parameters.
    #[error("making the verifier: {0}")]
    Hash(String),
}

/// The argon2id PHC string of `password` with a fresh 16-byte salt.
pub fn make(password: &[u8]) -> Result<Verifier, VerifierError> {
    if password.is_empty() {
        return Err(VerifierError::Empty);
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| VerifierError::Hash(e.to_string()))?;
    let params = argon2::Params::new(MEMORY_KIB, PASSES, LANES, Some(32))
        .map_err(|e| VerifierError::Hash(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(password, &salt, out.as_mut())
        .map_err(|e| VerifierError::Hash(e.to_string()))?;
    let b64 = |b: &[u8]| data_encoding::BASE64_NOPAD.encode(b);
    Ok(Verifier(format!(
        "$argon2id$v=19$m={MEMORY_KIB},t={PASSES},p={LANES}${}${}",
        b64(&salt),
        b64(out.as_ref())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_are_salted_argon2id_phc_strings() {
        let a = make(b"correct horse").unwrap();
        let b = make(b"correct horse").unwrap();
        assert!(
            a.0.starts_with("$argon2id$v=19$m=65536,t=3,p=1$"),
            "{}",
            a.0
        );
        assert_ne!(a.0, b.0, "a fresh salt each time");
        assert!(!a.0.contains("correct horse"));
        assert!(matches!(make(b""), Err(VerifierError::Empty)));
        // The same hash again from the PHC string's salt: what a check
        // computes.
        let f: Vec<&str> = a.0.split('$').collect();
        let salt = data_encoding::BASE64_NOPAD.decode(f[4].as_bytes()).unwrap();
        let params = argon2::Params::new(MEMORY_KIB, PASSES, LANES, Some(32)).unwrap();
        let h = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        h.hash_password_into(b"correct horse", &salt, &mut out)
            .unwrap();
        assert_eq!(data_encoding::BASE64_NOPAD.encode(&out), f[5]);
    }
}

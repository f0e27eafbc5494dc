//! TOTP (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 6 digits, the time step
//! configurable (30 s by default, as every authenticator app expects).

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// Secret length in bytes (160 bits, RFC 4226's recommendation).
pub const SECRET_LEN: usize = 20;

/// The HOTP value of `secret` at `counter`, 6 digits.
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let mut mac =
        <Hmac<Sha1> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let off = usize::from(h[19] & 0x0f);
    let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
    bin % 1_000_000
}

/// The time step at `unix_secs`.
pub fn step_at(unix_secs: u64, period: u64) -> u64 {
    unix_secs / period.max(1)
}

/// The code a member's app shows at `unix_secs`, as 6 digits.
pub fn code_at(secret: &[u8], unix_secs: u64, period: u64) -> String {
    format!("{:06}", hotp(secret, step_at(unix_secs, period)))
}

/// Checks `code` against the current step and one step either side (clock
/// drift). Returns the matching step, which the vault core then refuses to
/// accept twice.
pub fn verify(secret: &[u8], code: &str, unix_secs: u64, period: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let want: u32 = code.parse().ok()?;
    let now = step_at(unix_secs, period);
    let mut found = None;
    // Compare every candidate, each in constant time, to keep the timing
    // independent of which one matches and of how close a guess was.
    for step in [now.saturating_sub(1), now, now + 1] {
        if bool::from(hotp(secret, step).ct_eq(&want)) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// RFC 4648 base32 without padding, as otpauth URIs use.
pub fn base32(data: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(data)
}

/// Decodes [`base32`]: either case, padding or not (authenticator apps
/// and people write both); `None` for anything else.
/// The decoded secret is wiped when dropped.
pub fn unbase32(s: &str) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let upper = zeroize::Zeroizing::new(s.trim_end_matches('=').to_ascii_uppercase());
    data_encoding::BASE32_NOPAD
        .decode(upper.as_bytes())
        .ok()
        .map(zeroize::Zeroizing::new)
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
}

/// The `otpauth://` URI an authenticator app enrolls from.
pub fn otpauth_uri(issuer: &str, member: &str, secret: &[u8], period: u64) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits=6&period={period}",
        enc(issuer),
        enc(member),
        base32(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA1 seed, 8 digits there; we take the last 6.
        let seed = b"12345678901234567890";
        assert_eq!(code_at(seed, 59, 30), "287082");
        assert_eq!(code_at(seed, 1111111109, 30), "081804");
        assert_eq!(code_at(seed, 1234567890, 30), "005924");
        assert_eq!(code_at(seed, 2000000000, 30), "279037");
    }

    #[test]
    fn verify_window_and_format() {
        let seed = b"12345678901234567890";
        let now = 1234567890;
        let c = code_at(seed, now, 30);
        assert_eq!(verify(seed, &c, now, 30), Some(now / 30));
        assert_eq!(verify(seed, &c, now + 30, 30), Some(now / 30));
        assert_eq!(verify(seed, &c, now + 90, 30), None);
        assert_eq!(verify(seed, "12345", now, 30), None);
        assert_eq!(verify(seed, "abcdef", now, 30), None);
    }

    #[test]
    fn base32_roundtrip() {
        assert_eq!(
            base32(b"12345678901234567890"),
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
        );
        assert_eq!(
            unbase32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
                .unwrap()
                .as_slice(),
            b"12345678901234567890"
        );
    }
}

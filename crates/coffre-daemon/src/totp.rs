//! TOTP (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 6 digits, the time step
//! configurable (30 s by default, as every authenticator app expects).

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

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
    // Compare every candidate to keep the timing independent of which one
    // matches.
    for step in [now.saturating_sub(1), now, now + 1] {
        if hotp(secret, step) == want && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// RFC 4648 base32 without padding, as otpauth URIs use.
pub fn base32(data: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buf: u32 = 0;
    let mut bits = 0;
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(A[((buf >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(A[((buf << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes [`base32`].
pub fn unbase32(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf: u32 = 0;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        buf = (buf << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((buf >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
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
            unbase32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap(),
            b"12345678901234567890"
        );
    }
}

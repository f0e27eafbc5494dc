//! NFS file handles: the filesystem's own handle (ext4: inode and
//! generation, from `name_to_handle_at`), bound to one export and
//! authenticated with a MAC under a key derived from the vault's key
//! material. They carry no server state, so they stay valid across
//! closes, opens, daemon restarts and safe-mode suspensions; a guest
//! cannot make one up, nor take one from another export.
//!
//! Layout (at most 64 bytes, NFSv3's limit):
//! `[1: version 1][8: export tag][4: handle type, BE][1: n][n: handle][16: MAC]`
//! where the tag is the first 8 bytes of SHA-256 of the export's identity
//! and the MAC is HMAC-SHA-256 over everything before it, truncated to 16
//! bytes.

use coffre_sys::handle::FileHandle;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 4 + 1;
const MAC_LEN: usize = 16;
/// NFSv3's largest file handle.
pub const MAX_FH: usize = 64;
const MAX_INNER: usize = MAX_FH - HEADER - MAC_LEN;

/// The key that authenticates handles. Derived by the daemon from the
/// volume key (one way: it reveals nothing of it), held by the server
/// only while the vault is open. The MAC's keyed state is computed once,
/// so the worker threads never copy the key itself onto their stacks;
/// both are wiped when it is dropped.
#[derive(Clone)]
pub struct HandleKey {
    raw: Raw,
    keyed: Hmac<Sha256>,
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Raw([u8; 32]);

impl std::fmt::Debug for HandleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandleKey(..)")
    }
}

impl HandleKey {
    /// A key from its 32 bytes. HMAC copies the key into a block on
    /// the stack as it keys itself: callers that care scrub their stack
    /// afterwards (`coffre_luks2::secret::scrub_stack`).
    pub fn new(bytes: [u8; 32]) -> Self {
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self {
            raw: Raw(bytes),
            keyed,
        }
    }

    /// The handle key of a vault: HMAC-SHA-256 of a fixed label under the
    /// volume key. The same volume key gives the same handles, so a
    /// guest's handles outlive any number of closes.
    pub fn derive(volume_key: &[u8]) -> Self {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(volume_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(b"coffre nfs file handles v1");
        let mut bytes: [u8; 32] = m.finalize().into_bytes().into();
        let key = Self::new(bytes);
        bytes.zeroize();
        key
    }

    /// The key as 64 hex digits, for the daemon's pipe to the server
    /// (wiped when dropped).
    pub fn to_hex(&self) -> zeroize::Zeroizing<String> {
        let mut s = zeroize::Zeroizing::new(String::with_capacity(64));
        for &b in &self.raw.0 {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        s
    }

    fn mac(&self, bytes: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.keyed.clone();
        m.update(bytes);
        let full = m.finalize().into_bytes();
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }
}

/// The tag of an export: which workload and which directory. A handle
/// made for one export does not open another.
pub fn export_tag(workload: &str, share: &str) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(workload.as_bytes());
    h.update([0]);
    h.update(share.as_bytes());
    let d = h.finalize();
    let mut t = [0; 8];
    t.copy_from_slice(&d[..8]);
    t
}

/// Why a handle is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// Not a handle this server makes, or one whose MAC fails:
    /// `NFS3ERR_BADHANDLE`.
    #[error("not a handle of this server")]
    Bad,
    /// A genuine-looking handle of another export: `NFS3ERR_STALE`.
    #[error("a handle of another export")]
    OtherExport,
}

/// The NFS handle for `fh` in the export `tag`. `None` when the
/// filesystem's handle is too long to fit (not ext4's).
pub fn encode(key: &HandleKey, tag: [u8; 8], fh: &FileHandle) -> Option<Vec<u8>> {
    let inner = fh.bytes();
    if inner.len() > MAX_INNER {
        return None;
    }
    let mut out = Vec::with_capacity(HEADER + inner.len() + MAC_LEN);
    out.push(VERSION);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&fh.kind().to_be_bytes());
    out.push(u8::try_from(inner.len()).ok()?);
    out.extend_from_slice(inner);
    let mac = key.mac(&out);
    out.extend_from_slice(&mac);
    Some(out)
}

/// The filesystem handle inside an NFS handle of the export `tag`.
pub fn decode(key: &HandleKey, tag: [u8; 8], nfs: &[u8]) -> Result<FileHandle, HandleError> {
    let (header, rest) = parse(nfs)?;
    let n = usize::from(header[13]);
    let (body, mac) = nfs.split_at(HEADER + n);
    if !bool::from(key.mac(body).ct_eq(mac)) {
        return Err(HandleError::Bad);
    }
    if header[1..9] != tag {
        return Err(HandleError::OtherExport);
    }
    let kind = i32::from_be_bytes([header[9], header[10], header[11], header[12]]);
    FileHandle::from_parts(kind, &rest[..n]).ok_or(HandleError::Bad)
}

/// The header and what follows it, once the lengths add up.
fn parse(nfs: &[u8]) -> Result<(&[u8], &[u8]), HandleError> {
    if nfs.len() < HEADER + MAC_LEN || nfs.len() > MAX_FH || nfs[0] != VERSION {
        return Err(HandleError::Bad);
    }
    let n = usize::from(nfs[13]);
    if n > MAX_INNER || nfs.len() != HEADER + n + MAC_LEN {
        return Err(HandleError::Bad);
    }
    Ok(nfs.split_at(HEADER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fh() -> FileHandle {
        FileHandle::from_parts(1, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap()
    }

    #[test]
    fn a_handle_opens_only_in_its_export_and_only_under_its_key() {
        let key = HandleKey::derive(b"volume key");
        let a = export_tag("desktop", "shared");
        let b = export_tag("desktop", "home/alice");
        let h = encode(&key, a, &fh()).unwrap();
        assert!(h.len() <= MAX_FH);
        assert_eq!(decode(&key, a, &h), Ok(fh()));
        assert_eq!(decode(&key, b, &h), Err(HandleError::OtherExport));
        let other = HandleKey::derive(b"another vault");
        assert_eq!(decode(&other, a, &h), Err(HandleError::Bad));
        // The same key material gives the same handle: handles survive.
        assert_eq!(encode(&HandleKey::derive(b"volume key"), a, &fh()), Some(h));
    }

    #[test]
    fn a_forged_tag_is_caught_by_the_mac() {
        let key = HandleKey::derive(b"k");
        let a = export_tag("vm", "shared");
        let b = export_tag("vm", "home/bob");
        let mut h = encode(&key, a, &fh()).unwrap();
        h[1..9].copy_from_slice(&b);
        assert_eq!(decode(&key, b, &h), Err(HandleError::Bad));
    }

    #[test]
    fn debug_shows_no_key() {
        assert_eq!(format!("{:?}", HandleKey::new([7; 32])), "HandleKey(..)");
    }

    proptest! {
        /// Any change to a handle is refused; nothing panics.
        #[test]
        fn any_altered_handle_is_refused(pos in 0usize..38, bit in 0u8..8) {
            let key = HandleKey::derive(b"k");
            let tag = export_tag("vm", "shared");
            let mut h = encode(&key, tag, &fh()).unwrap();
            prop_assume!(pos < h.len());
            h[pos] ^= 1 << bit;
            prop_assert!(decode(&key, tag, &h).is_err());
        }

        #[test]
        fn random_bytes_never_decode(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let key = HandleKey::derive(b"k");
            prop_assert!(decode(&key, export_tag("vm", "shared"), &bytes).is_err());
        }
    }
}

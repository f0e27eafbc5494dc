//! What a member's machine remembers of each vault's audit log: the
//! highest signed head it has seen and the key that signs it, so that a
//! log put back to an older state (an old `audit.head` with `audit.log`
//! cut to match verifies on the host, since nothing there remembers
//! more) or rewritten into another history is refused by the next client
//! command (docs/security.md, "Audit").
//!
//! One file per vault, named by the vault CA's fingerprint, in the
//! member's own state directory (`$XDG_STATE_HOME/coffre/` or
//! `$HOME/.local/state/coffre/`, 0700), written atomically. The key is
//! learned at `coffre join`; an identity made before this existed (or
//! used first on this machine) trusts the first head it sees.

use coffre_audit::{Entry, Head};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why the head a vault shows is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// The vault shows an older head than this machine saw.
    #[error(
        "the vault's audit log was rolled back: it shows record {shown}, this machine saw {saw}. Do not use this vault until its superusers have compared the log with an off-host copy (`coffre audit export`)"
    )]
    RolledBack {
        /// The head the vault shows.
        shown: u64,
        /// The highest head this machine saw.
        saw: u64,
    },
    /// The vault's log is not the continuation of what this machine saw.
    #[error(
        "the vault's audit log was rewritten: it shows record {shown}, but its history does not contain record {saw} as this machine saw it ({why}). Do not use this vault until its superusers have compared the log with an off-host copy (`coffre audit export`)"
    )]
    Forked {
        /// The head the vault shows.
        shown: u64,
        /// The highest head this machine saw.
        saw: u64,
        /// What did not link.
        why: String,
    },
    /// The head is signed by another key than the one learned.
    #[error(
        "the vault's audit log is signed by a different key than the one this machine learned ({learned}…, now {shown}…): the log or the host was replaced. Do not use this vault until its superusers have checked it"
    )]
    OtherKey {
        /// The key remembered (prefix).
        learned: String,
        /// The key shown (prefix).
        shown: String,
    },
    /// The head's signature does not verify.
    #[error("the vault's audit head does not verify: {0}")]
    BadHead(String),
    /// The state directory cannot be used.
    #[error("{0}")]
    State(String),
}

/// A vault's signed audit head as a reply carries it (`audit_head`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownHead {
    /// Last record covered (0: empty log).
    pub seq: u64,
    /// Its hash (hex); `None` for an empty log.
    pub hash: Option<String>,
    /// Ed25519 signature (hex) of the head; `None` for an empty log.
    pub signature: Option<String>,
    /// The audit verification key (hex).
    pub key: String,
}

impl ShownHead {
    /// Reads `audit_head` from a reply.
    pub fn from_reply(v: &serde_json::Value) -> Option<Self> {
        serde_json::from_value(v.get("audit_head")?.clone()).ok()
    }

    fn head(&self) -> Option<Head> {
        Some(Head {
            seq: self.seq,
            hash: self.hash.clone()?,
            signature: self.signature.clone()?,
        })
    }
}

/// How this machine names a vault in its [`HeadStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultId {
    /// SHA-256 of the vault's CA public key: the same across `coffre
    /// renew --ca`, which makes the CA's certificate anew for its key.
    pub key: String,
    /// SHA-256 of the CA certificate: what heads were filed under before.
    pub legacy: String,
}

impl VaultId {
    /// The vault whose CA certificate is `ca_pem`; `None` if it is not one.
    pub fn of_ca(ca_pem: &str) -> Option<Self> {
        Some(Self {
            key: crate::pki::pem_key_fingerprint(ca_pem)?,
            legacy: crate::pki::pem_fingerprint(ca_pem)?,
        })
    }
}

/// What this machine remembers of one vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenHead {
    /// The vault: [`VaultId::key`] (SHA-256 of its CA's public key), or
    /// for heads remembered before that, of its CA certificate.
    pub vault: String,
    /// The audit verification key (hex).
    pub key: String,
    /// The highest record seen.
    pub seq: u64,
    /// Its hash (hex; empty for an empty log).
    pub hash: String,
    /// The head's signature (hex; empty for an empty log).
    pub signature: String,
}

/// What to do with a head that passed the first checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assessment {
    /// Nothing remembered yet: trust it (first use) and remember it.
    FirstUse,
    /// The head this machine saw.
    Same,
    /// Further on: fetch the records after `since` and check that they
    /// link the remembered head to the new one.
    Ahead {
        /// The remembered head's record.
        since: u64,
    },
}

/// Checks a shown head against what was seen: same key, a valid
/// signature, not older, and the same record at the same number.
pub fn assess(seen: Option<&SeenHead>, shown: &ShownHead) -> Result<Assessment, WitnessError> {
    let key = seen.map_or(shown.key.as_str(), |s| s.key.as_str());
    if shown.key != key {
        return Err(WitnessError::OtherKey {
            learned: key.chars().take(16).collect(),
            shown: shown.key.chars().take(16).collect(),
        });
    }
    if shown.seq > 0 {
        let head = shown
            .head()
            .ok_or_else(|| WitnessError::BadHead("no hash or signature".into()))?;
        coffre_audit::verify_head(&head, key).map_err(|e| WitnessError::BadHead(e.to_string()))?;
    }
    let Some(seen) = seen else {
        return Ok(Assessment::FirstUse);
    };
    if shown.seq < seen.seq {
        return Err(WitnessError::RolledBack {
            shown: shown.seq,
            saw: seen.seq,
        });
    }
    if shown.seq == seen.seq {
        if shown.seq > 0 && shown.hash.as_deref() != Some(seen.hash.as_str()) {
            return Err(WitnessError::Forked {
                shown: shown.seq,
                saw: seen.seq,
                why: format!("another record {} under the same key", seen.seq),
            });
        }
        return Ok(Assessment::Same);
    }
    Ok(Assessment::Ahead { since: seen.seq })
}

/// Checks that `entries` (the records after the remembered head) lead
/// from `seen` to `shown`.
pub fn check_chain(
    seen: &SeenHead,
    shown: &ShownHead,
    entries: &[Entry],
) -> Result<(), WitnessError> {
    let head = shown
        .head()
        .ok_or_else(|| WitnessError::BadHead("no hash or signature".into()))?;
    let from = if seen.seq == 0 {
        "0".repeat(64)
    } else {
        seen.hash.clone()
    };
    coffre_audit::verify_extension(seen.seq, &from, entries, &head).map_err(|e| {
        WitnessError::Forked {
            shown: shown.seq,
            saw: seen.seq,
            why: match e {
                coffre_audit::Error::Tampered(m) => m,
                e => e.to_string(),
            },
        }
    })
}

/// The files that remember heads, one per vault.
#[derive(Clone, Debug)]
pub struct HeadStore {
    dir: PathBuf,
}

impl HeadStore {
    /// A store in `dir` (made 0700 when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The member's state directory: `$XDG_STATE_HOME/coffre` (when
    /// absolute, as the XDG specification requires) or
    /// `$HOME/.local/state/coffre`.
    pub fn from_env() -> Result<Self, WitnessError> {
        let xdg = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from);
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Self::from_vars(xdg.as_deref(), home.as_deref())
    }

    fn from_vars(xdg: Option<&Path>, home: Option<&Path>) -> Result<Self, WitnessError> {
        if let Some(x) = xdg.filter(|x| x.is_absolute()) {
            return Ok(Self::new(x.join("coffre")));
        }
        match home.filter(|h| h.is_absolute()) {
            Some(h) => Ok(Self::new(h.join(".local/state/coffre"))),
            None => Err(WitnessError::State(
                "neither HOME nor XDG_STATE_HOME is set: this machine cannot remember the vault's audit head (set HOME)".into(),
            )),
        }
    }

    /// Where it is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, vault: &str) -> PathBuf {
        // The fingerprint is hex: nothing in it can leave the directory.
        let safe: String = vault.chars().filter(char::is_ascii_hexdigit).collect();
        self.dir.join(format!("audit-head-{safe}.json"))
    }

    /// What was remembered for the vault `id`: under its CA's key, or
    /// else under its CA certificate's fingerprint (how heads were filed
    /// before a CA's certificate could be renewed).
    pub fn load_id(&self, id: &VaultId) -> Result<Option<SeenHead>, WitnessError> {
        match self.load(&id.key)? {
            Some(h) => Ok(Some(h)),
            None => self.load(&id.legacy),
        }
    }

    /// What was remembered for `vault` (CA fingerprint), if anything.
    pub fn load(&self, vault: &str) -> Result<Option<SeenHead>, WitnessError> {
        let path = self.path(vault);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<SeenHead>(&b)
                .map(Some)
                .map_err(|e| {
                    WitnessError::State(format!(
                        "{} is damaged ({e}); it remembers this vault's audit head: look at it before removing it",
                        path.display()
                    ))
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(WitnessError::State(format!(
                "read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Remembers `head` unless a higher one is already remembered (two
    /// commands may run at once).
    pub fn remember(&self, head: &SeenHead) -> Result<(), WitnessError> {
        if let Some(old) = self.load(&head.vault)?
            && old.key == head.key
            && old.seq >= head.seq
        {
            return Ok(());
        }
        self.make_dir()?;
        let bytes = serde_json::to_vec_pretty(head).expect("heads serialise");
        coffre_sys::fs::write_atomic(&self.path(&head.vault), &bytes, 0o600)
            .map_err(|e| WitnessError::State(e.to_string()))
    }

    fn make_dir(&self) -> Result<(), WitnessError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let err =
            |e: std::io::Error| WitnessError::State(format!("create {}: {e}", self.dir.display()));
        if let Some(parent) = self.dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(err)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
        // Whatever the umask or an older version made of it.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
    }
}

impl SeenHead {
    /// What to remember of `shown` for `vault`.
    pub fn from_shown(vault: &str, shown: &ShownHead) -> Self {
        Self {
            vault: vault.to_string(),
            key: shown.key.clone(),
            seq: shown.seq,
            hash: shown.hash.clone().unwrap_or_default(),
            signature: shown.signature.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffre_audit::{AuditLog, HostKey};
    use coffre_vault::{AuditRecord, Millis};
    use std::os::unix::fs::PermissionsExt;

    fn rec(i: u64) -> AuditRecord {
        AuditRecord {
            at: Millis(i),
            actor: "alice".into(),
            source: None,
            action: "enter".into(),
            result: "ok".into(),
            detail: format!("n{i}"),
        }
    }

    /// A log of `n` records; returns its directory, key and log.
    fn make_log(n: u64) -> (tempfile::TempDir, String, AuditLog) {
        let d = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let pk = key.public_hex();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        for i in 1..=n {
            log.append(rec(i)).unwrap();
        }
        (d, pk, log)
    }

    fn shown(log: &AuditLog, key: &str) -> ShownHead {
        let h = log.head_watch().current().unwrap();
        ShownHead {
            seq: h.seq,
            hash: Some(h.hash),
            signature: Some(h.signature),
            key: key.into(),
        }
    }

    #[test]
    fn state_dir_honours_xdg_then_home() {
        let s = HeadStore::from_vars(Some(Path::new("/x/state")), Some(Path::new("/home/a")));
        assert_eq!(s.unwrap().dir(), Path::new("/x/state/coffre"));
        // A relative XDG_STATE_HOME is ignored, as the specification says.
        let s = HeadStore::from_vars(Some(Path::new("rel")), Some(Path::new("/home/a")));
        assert_eq!(s.unwrap().dir(), Path::new("/home/a/.local/state/coffre"));
        let s = HeadStore::from_vars(None, Some(Path::new("/home/a")));
        assert_eq!(s.unwrap().dir(), Path::new("/home/a/.local/state/coffre"));
        assert!(HeadStore::from_vars(None, None).is_err());
    }

    #[test]
    fn state_file_is_private_atomic_and_per_vault() {
        let home = tempfile::tempdir().unwrap();
        let store = HeadStore::from_vars(None, Some(home.path())).unwrap();
        assert_eq!(store.load("aa").unwrap(), None);
        let a = SeenHead {
            vault: "aa".into(),
            key: "k1".into(),
            seq: 5,
            hash: "h5".into(),
            signature: "s5".into(),
        };
        let b = SeenHead {
            vault: "bb".into(),
            seq: 2,
            ..a.clone()
        };
        store.remember(&a).unwrap();
        store.remember(&b).unwrap();
        assert_eq!(store.load("aa").unwrap().unwrap(), a);
        assert_eq!(store.load("bb").unwrap().unwrap(), b);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        let files: Vec<String> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // Written through a temporary file renamed into place: none left.
        assert_eq!(files.len(), 2, "{files:?}");
        for f in &files {
            assert_eq!(mode(&store.dir().join(f)), 0o600);
        }
        // A lower head never replaces a higher one.
        store
            .remember(&SeenHead {
                seq: 3,
                ..a.clone()
            })
            .unwrap();
        assert_eq!(store.load("aa").unwrap().unwrap().seq, 5);
        // A name is a fingerprint: nothing else reaches the path.
        assert_eq!(
            store.path("../../etc/aa"),
            store.dir().join("audit-head-ecaa.json")
        );
        // A damaged file is not silently replaced.
        std::fs::write(store.path("aa"), b"{").unwrap();
        assert!(store.load("aa").is_err());
        assert!(store.remember(&a).is_err());
    }

    /// A vault is filed under its CA's key, which `renew --ca` keeps; a
    /// head filed before under the CA certificate's fingerprint is still
    /// found, and the key's own entry wins once there is one.
    #[test]
    fn a_vault_is_found_by_its_cas_key_then_its_old_name() {
        let home = tempfile::tempdir().unwrap();
        let store = HeadStore::from_vars(None, Some(home.path())).unwrap();
        let ca = crate::pki::new_ca("named").unwrap();
        let key = ca.key_pem.clone();
        let renewed = crate::pki::renew_ca("named", &key, &ca.cert_pem).unwrap();
        let (old, new) = (
            VaultId::of_ca(&ca.cert_pem).unwrap(),
            VaultId::of_ca(&renewed.cert_pem).unwrap(),
        );
        assert_eq!(old.key, new.key);
        assert_ne!(old.legacy, new.legacy);
        assert_eq!(store.load_id(&old).unwrap(), None);
        let head = |vault: &str, seq| SeenHead {
            vault: vault.to_string(),
            key: "k".into(),
            seq,
            hash: String::new(),
            signature: String::new(),
        };
        // Remembered by an older client, under the certificate.
        store.remember(&head(&old.legacy, 7)).unwrap();
        assert_eq!(store.load_id(&old).unwrap().unwrap().seq, 7);
        // Found through the renewed CA too: same key.
        let legacy_only = VaultId {
            key: new.key.clone(),
            legacy: old.legacy.clone(),
        };
        assert_eq!(store.load_id(&legacy_only).unwrap().unwrap().seq, 7);
        store.remember(&head(&new.key, 9)).unwrap();
        assert_eq!(store.load_id(&new).unwrap().unwrap().seq, 9);
        assert_eq!(store.load_id(&old).unwrap().unwrap().seq, 9);
    }

    #[test]
    fn first_use_is_trusted_then_held_to() {
        let (d, pk, mut log) = make_log(3);
        let first = shown(&log, &pk);
        assert_eq!(assess(None, &first).unwrap(), Assessment::FirstUse);
        let seen = SeenHead::from_shown("aa", &first);
        assert_eq!(assess(Some(&seen), &first).unwrap(), Assessment::Same);
        log.append(rec(4)).unwrap();
        log.append(rec(5)).unwrap();
        let later = shown(&log, &pk);
        assert_eq!(
            assess(Some(&seen), &later).unwrap(),
            Assessment::Ahead { since: 3 }
        );
        let after: Vec<Entry> = coffre_audit::read_entries(d.path())
            .unwrap()
            .into_iter()
            .filter(|e| e.seq > 3)
            .collect();
        check_chain(&seen, &later, &after).unwrap();
        // Back to the first head after seeing the later one: rolled back.
        let seen = SeenHead::from_shown("aa", &later);
        let e = assess(Some(&seen), &first).unwrap_err();
        assert_eq!(
            e.to_string().split('.').next().unwrap(),
            "the vault's audit log was rolled back: it shows record 3, this machine saw 5"
        );
    }

    #[test]
    fn other_key_bad_signature_and_forks_are_refused() {
        let (d, pk, log) = make_log(3);
        let seen = SeenHead::from_shown("aa", &shown(&log, &pk));
        // Another key (another host key, a replaced vault).
        let (_o, other_pk, other) = make_log(3);
        let theirs = shown(&other, &other_pk);
        assert!(matches!(
            assess(Some(&seen), &theirs),
            Err(WitnessError::OtherKey { .. })
        ));
        // Their head presented under our key: the signature fails.
        let forged = ShownHead {
            key: pk.clone(),
            ..theirs.clone()
        };
        assert!(matches!(
            assess(Some(&seen), &forged),
            Err(WitnessError::BadHead(_))
        ));
        // Same key, same number, another record: a fork.
        let mut seen_other = seen.clone();
        seen_other.hash = "00".repeat(32);
        assert!(matches!(
            assess(Some(&seen_other), &shown(&log, &pk)),
            Err(WitnessError::Forked { .. })
        ));
        // A longer history that does not contain the record seen.
        let mut earlier = seen.clone();
        earlier.seq = 1;
        earlier.hash = "11".repeat(32);
        let entries = coffre_audit::read_entries(d.path()).unwrap();
        let e = check_chain(&earlier, &shown(&log, &pk), &entries[1..]).unwrap_err();
        assert!(e.to_string().contains("rewritten"), "{e}");
    }
}

//! What an off-host witness keeps of the vault's audit chain, and how it
//! judges each record it receives.
//!
//! Every record must carry a valid hash and the host key's signature; it
//! must then be the next link of the chain the witness holds, or a copy
//! of a link it holds (a redelivery, or the vault publishing again after
//! a restart). Anything else is an alarm:
//! - **gap**: a record beyond the next one (records the witness never
//!   received: its queue overflowed, or it was down longer than the
//!   broker kept its messages);
//! - **rollback**: a record whose number the witness already holds with
//!   another content (the log on the host was cut back and written again);
//! - **fork**: the next record does not follow the last one held (the
//!   history was rewritten);
//! - **forged**: a record whose hash or signature does not hold.
//!
//! The first record a new witness receives is trusted if its signature
//! holds (there is nothing to compare it with); the chain starts there.
//! The store is `witness.log` in the witness's directory, in the format of
//! the vault's `audit.log` (one entry per line).

use crate::BusError;
use coffre_audit::{Entry, Head, entry_hash, verify_head};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The witness's file in its store directory.
pub const STORE_FILE: &str = "witness.log";

/// What happened to a record the witness accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next link: kept.
    Appended,
    /// A link already held (or older than the first one held): nothing to do.
    Known,
}

/// Why a record is refused: the alarm a witness raises.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Alarm {
    /// Records were missed.
    #[error(
        "gap: record {got} arrived but the last one held is {last}: records {}..{} never reached this witness",
        last + 1,
        got - 1
    )]
    Gap {
        /// The last record held.
        last: u64,
        /// The record that arrived.
        got: u64,
    },
    /// A record already held came back with another content.
    #[error(
        "rollback: record {seq} arrived with another content than the one this witness holds: the vault's log was cut back and written again"
    )]
    Rollback {
        /// The record.
        seq: u64,
    },
    /// The next record does not follow the last one held.
    #[error(
        "fork: record {seq} does not follow record {} as this witness holds it: the vault's history was rewritten",
        seq - 1
    )]
    Fork {
        /// The record.
        seq: u64,
    },
    /// A record that does not verify.
    #[error("forged: record {seq}: {why}")]
    Forged {
        /// The record.
        seq: u64,
        /// What does not hold.
        why: String,
    },
    /// The witness cannot keep a record (its own disk): nothing about the
    /// vault, but it cannot go on.
    #[error("cannot keep record {seq}: {why}")]
    Store {
        /// The record.
        seq: u64,
        /// The error.
        why: String,
    },
}

impl Alarm {
    /// The alarm's name in events (`gap`, `rollback`, `fork`, `forged`).
    pub fn kind(&self) -> &'static str {
        match self {
            Alarm::Gap { .. } => "gap",
            Alarm::Rollback { .. } => "rollback",
            Alarm::Fork { .. } => "fork",
            Alarm::Forged { .. } => "forged",
            Alarm::Store { .. } => "store",
        }
    }

    /// The record it is about.
    pub fn seq(&self) -> u64 {
        match self {
            Alarm::Gap { got: seq, .. }
            | Alarm::Rollback { seq }
            | Alarm::Fork { seq }
            | Alarm::Forged { seq, .. }
            | Alarm::Store { seq, .. } => *seq,
        }
    }
}

/// Checks an entry's own hash and signature against the host key.
pub fn check_entry(e: &Entry, key_hex: &str) -> Result<(), Alarm> {
    let forged = |why: &str| Alarm::Forged {
        seq: e.seq,
        why: why.to_string(),
    };
    if entry_hash(e.seq, &e.prev, &e.record) != e.hash {
        return Err(forged("its hash does not match its content"));
    }
    let Some(sig) = &e.sig else {
        return Err(forged("it carries no signature"));
    };
    let head = Head {
        seq: e.seq,
        hash: e.hash.clone(),
        signature: sig.clone(),
    };
    verify_head(&head, key_hex).map_err(|_| forged("its signature is not the vault's audit key's"))
}

/// The chain a witness holds.
pub struct Witness {
    key: String,
    /// Hash of every record held, by number.
    held: BTreeMap<u64, String>,
    store: Option<PathBuf>,
}

impl Witness {
    /// A witness for the vault whose audit key is `key_hex`, holding
    /// nothing and storing nothing (for `coffre audit follow`, and tests).
    pub fn in_memory(key_hex: &str) -> Self {
        Witness {
            key: key_hex.to_string(),
            held: BTreeMap::new(),
            store: None,
        }
    }

    /// Opens (or starts) the store in `dir`; what it holds is checked
    /// again (hashes, signatures, links) before anything is added.
    pub fn open(dir: &Path, key_hex: &str) -> Result<Self, BusError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |source| BusError::Io { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        // What it holds says what the vault did: as private as the log.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("protect", dir))?;
        let path = dir.join(STORE_FILE);
        let mut w = Witness::in_memory(key_hex);
        match std::fs::read(&path) {
            Ok(mut bytes) => {
                // A line cut short by a crash or a full disk: it was never
                // accepted (accept returns after the write); drop it.
                let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                if whole < bytes.len() {
                    bytes.truncate(whole);
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(whole as u64))
                        .map_err(io("repair", &path))?;
                }
                let entries = coffre_audit::parse_entries(&bytes).map_err(|e| BusError::Io {
                    what: "read",
                    path: path.display().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                })?;
                for e in &entries {
                    w.accept(e).map_err(|a| BusError::Io {
                        what: "check",
                        path: path.display().to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("this witness's own store does not verify: {a}"),
                        ),
                    })?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read", &path)(e)),
        }
        w.store = Some(path);
        Ok(w)
    }

    /// The last record held: (number, hash).
    pub fn last(&self) -> Option<(u64, &str)> {
        self.held.iter().next_back().map(|(s, h)| (*s, h.as_str()))
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Judges `e` (see the module's description); an appended record is
    /// written to the store before this returns.
    pub fn accept(&mut self, e: &Entry) -> Result<Seen, Alarm> {
        check_entry(e, &self.key)?;
        let Some((last, last_hash)) = self.last() else {
            return self.append(e);
        };
        if e.seq <= last {
            return match self.held.get(&e.seq) {
                Some(h) if *h == e.hash => Ok(Seen::Known),
                Some(_) => Err(Alarm::Rollback { seq: e.seq }),
                // Older than the first record held: nothing to compare.
                None => Ok(Seen::Known),
            };
        }
        if e.seq > last.saturating_add(1) {
            return Err(Alarm::Gap { last, got: e.seq });
        }
        if e.prev != last_hash {
            return Err(Alarm::Fork { seq: e.seq });
        }
        self.append(e)
    }

    fn append(&mut self, e: &Entry) -> Result<Seen, Alarm> {
        if let Some(path) = &self.store {
            let mut line = serde_json::to_vec(e).expect("entries serialise");
            line.push(b'\n');
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| {
                    f.write_all(&line)?;
                    f.sync_data()
                });
            if let Err(err) = written {
                // Not an alarm about the vault, but the witness cannot
                // go on without keeping what it saw.
                return Err(Alarm::Store {
                    seq: e.seq,
                    why: format!("{}: {err}", path.display()),
                });
            }
        }
        self.held.insert(e.seq, e.hash.clone());
        Ok(Seen::Appended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffre_audit::{AuditLog, HostKey};
    use coffre_vault::{AuditRecord, Millis};

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

    /// A real log of `n` records in a fresh directory.
    fn log(n: u64) -> (tempfile::TempDir, String, Vec<Entry>) {
        let d = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        let entries = (1..=n).map(|i| log.append(rec(i)).unwrap()).collect();
        let key = log.public_hex();
        (d, key, entries)
    }

    #[test]
    fn a_witness_follows_the_chain_and_survives_redelivery_and_restart() {
        let (_d, key, entries) = log(5);
        let store = tempfile::tempdir().unwrap();
        let mut w = Witness::open(store.path(), &key).unwrap();
        for e in &entries[..3] {
            assert_eq!(w.accept(e), Ok(Seen::Appended));
        }
        assert_eq!(w.accept(&entries[1]), Ok(Seen::Known));
        drop(w);
        let mut w = Witness::open(store.path(), &key).unwrap();
        assert_eq!(w.last().unwrap().0, 3);
        assert_eq!(w.accept(&entries[3]), Ok(Seen::Appended));
        assert_eq!(w.accept(&entries[4]), Ok(Seen::Appended));
        assert_eq!(w.len(), 5);
    }

    #[test]
    fn a_new_witness_starts_where_it_joins() {
        let (_d, key, entries) = log(4);
        let mut w = Witness::in_memory(&key);
        assert_eq!(w.accept(&entries[2]), Ok(Seen::Appended));
        assert_eq!(w.accept(&entries[0]), Ok(Seen::Known));
        assert_eq!(w.accept(&entries[3]), Ok(Seen::Appended));
    }

    #[test]
    fn gaps_rollbacks_forks_and_forgeries_raise_their_alarms() {
        let (d, key, entries) = log(4);
        let mut w = Witness::in_memory(&key);
        w.accept(&entries[0]).unwrap();
        w.accept(&entries[1]).unwrap();
        let a = w.accept(&entries[3]).unwrap_err();
        assert_eq!(a, Alarm::Gap { last: 2, got: 4 });
        assert_eq!((a.kind(), a.seq()), ("gap", 4));

        // The same key writes another history after record 1: the host
        // cut its log back and went on (what a rollback looks like).
        let other = tempfile::tempdir().unwrap();
        std::fs::copy(d.path().join("host.key"), other.path().join("host.key")).unwrap();
        let hk = HostKey::load_or_create(&other.path().join("host.key")).unwrap();
        let mut log2 = AuditLog::open(other.path(), hk).unwrap();
        let first = log2.append(rec(1)).unwrap();
        assert_eq!(first.hash, entries[0].hash, "same record, same link");
        let mut r = rec(2);
        r.detail = "another second record".into();
        let second = log2.append(r).unwrap();
        let a = w.accept(&second).unwrap_err();
        assert_eq!(a, Alarm::Rollback { seq: 2 });
        assert_eq!(a.kind(), "rollback");
        let third = log2.append(rec(3)).unwrap();
        assert_eq!(w.accept(&third).unwrap_err(), Alarm::Fork { seq: 3 });

        let mut edited = entries[2].clone();
        edited.record.detail = "edited".into();
        assert!(matches!(w.accept(&edited), Err(Alarm::Forged { .. })));
        let mut unsigned = entries[2].clone();
        unsigned.sig = None;
        assert!(matches!(w.accept(&unsigned), Err(Alarm::Forged { .. })));
        // Signed by another host key.
        let (_d3, _k3, foreign) = log(3);
        let e = w.accept(&foreign[2]).unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        assert_eq!(e.kind(), "forged");
        // Nothing refused was taken in.
        assert_eq!(w.accept(&entries[2]), Ok(Seen::Appended));
    }

    #[test]
    fn a_line_cut_short_in_the_store_is_dropped_and_the_chain_goes_on() {
        let (_d, key, entries) = log(3);
        let store = tempfile::tempdir().unwrap();
        let mut w = Witness::open(store.path(), &key).unwrap();
        w.accept(&entries[0]).unwrap();
        w.accept(&entries[1]).unwrap();
        drop(w);
        let p = store.path().join(STORE_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&p, bytes).unwrap();
        let mut w = Witness::open(store.path(), &key).unwrap();
        assert_eq!(w.last().unwrap().0, 1);
        assert_eq!(w.accept(&entries[1]), Ok(Seen::Appended));
        assert_eq!(w.accept(&entries[2]), Ok(Seen::Appended));
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
            assert_eq!(
                std::fs::metadata(store.path()).unwrap().mode() & 0o777,
                0o700
            );
        }
    }

    #[test]
    fn a_store_edited_on_disk_is_refused() {
        let (_d, key, entries) = log(3);
        let store = tempfile::tempdir().unwrap();
        let mut w = Witness::open(store.path(), &key).unwrap();
        for e in &entries {
            w.accept(e).unwrap();
        }
        let p = store.path().join(STORE_FILE);
        let s = std::fs::read_to_string(&p).unwrap().replace("n2", "n9");
        std::fs::write(&p, s).unwrap();
        let e = Witness::open(store.path(), &key).err().unwrap().to_string();
        assert!(e.contains("does not verify"), "{e}");
    }
}

//! The audit log: one JSON record per line in `audit.log`, each carrying
//! the SHA-256 of the previous one, and `audit.head`, the last record's
//! sequence number and hash signed with the host's Ed25519 key.
//!
//! Editing a record breaks its hash; removing or reordering records breaks
//! the sequence and the chain; cutting the tail or appending forged records
//! disagrees with the signed head. [`verify`] names the first bad record.
//! Records never contain secrets (the vault core writes them).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use coffre_vault::AuditRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Audit log errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// File trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we did.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The log does not verify.
    #[error("audit log does not verify: {0}")]
    Tampered(String),
    /// A key problem.
    #[error("audit key: {0}")]
    Key(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One line of `audit.log`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// 1, 2, 3...
    pub seq: u64,
    /// Hash of the previous entry (hex), zeros for the first.
    pub prev: String,
    /// The record.
    pub record: AuditRecord,
    /// This entry's hash (hex).
    pub hash: String,
    /// The host key's signature over `(seq, hash)`, the same message the
    /// head signs: after a crash between this line and the head, the head
    /// is recovered from it. Absent in entries written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// The signed head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Last sequence number covered.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
    /// Ed25519 signature (hex) over `head_message(seq, hash)`.
    pub signature: String,
}

/// What the first record's `prev` is: no record before it.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

/// Decodes hex in either case (what older heads or hand edits may hold).
fn unhex(s: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
}

/// The hash of an entry: SHA-256 over a domain tag, the sequence number,
/// the previous hash and the canonical JSON of the record.
pub fn entry_hash(seq: u64, prev: &str, record: &AuditRecord) -> String {
    let mut h = Sha256::new();
    h.update(b"coffre-audit-v1\n");
    h.update(seq.to_be_bytes());
    h.update(prev.as_bytes());
    h.update(serde_json::to_vec(record).expect("records serialise"));
    hex(&h.finalize())
}

fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = b"coffre-audit-head-v1\n".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

/// The host's audit signing key (Ed25519, PKCS#8 in `host.key`, 0600).
pub struct HostKey {
    pair: Ed25519KeyPair,
}

impl HostKey {
    /// Loads `path`, or creates it if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, Error> {
        if !path.exists() {
            let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
                .map_err(|e| Error::Key(e.to_string()))?;
            write_atomic(path, doc.as_ref(), 0o600)?;
        }
        let bytes = std::fs::read(path).map_err(io("read", path))?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| Error::Key(e.to_string()))?;
        Ok(Self { pair })
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    fn sign(&self, msg: &[u8]) -> String {
        hex(self.pair.sign(msg).as_ref())
    }
}

/// Writes a file crash-safely: [`coffre_sys::fs::write_atomic`], with
/// this crate's error type.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    coffre_sys::fs::write_atomic(path, bytes, mode).map_err(io("write", path))
}

/// An open audit log for appending.
pub struct AuditLog {
    log_path: PathBuf,
    head_path: PathBuf,
    file: File,
    key: HostKey,
    seq: u64,
    last: String,
    /// Length of the log up to its last complete line.
    complete_len: u64,
    /// A failed write may have left part of a line past `len`.
    torn: bool,
    /// The last head written, shared with whoever answers clients.
    published: HeadWatch,
}

/// The log's current signed head, readable from other threads (the
/// daemon puts it in every reply to a member, so that members notice a
/// log that was cut back; see docs/security.md, "Audit").
#[derive(Clone, Debug, Default)]
pub struct HeadWatch(Arc<Mutex<Option<Head>>>);

impl HeadWatch {
    /// The head as last written (`None` while the log is empty).
    pub fn current(&self) -> Option<Head> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, head: Head) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(head);
    }
}

/// Re-reads the log in `dir` for appending after a crash: drops an
/// incomplete last line, and rebuilds the head when the records after it
/// carry their own valid signatures. Anything else that does not verify
/// is refused. Returns the records, the last hash, the log's length and
/// what was repaired.
fn recover(dir: &Path, key: &HostKey) -> Result<(u64, String, u64, Vec<String>), Error> {
    let log_path = dir.join(LOG_FILE);
    let head_path = dir.join(HEAD_FILE);
    let pk = key.public_hex();
    let mut bytes = std::fs::read(&log_path).map_err(io("read", &log_path))?;
    let mut notes = Vec::new();
    // An append is one write of a whole line: a line without its end was
    // torn by a crash and never acknowledged. It is cut off once the rest
    // is known to verify.
    let mut torn = false;
    if bytes.last().is_some_and(|b| *b != b'\n') {
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let dropped = bytes.len() - keep;
        bytes.truncate(keep);
        torn = true;
        notes.push(format!(
            "an incomplete last line ({dropped} bytes) left by an interrupted append was dropped"
        ));
    }
    let cut = |len: u64| -> Result<(), Error> {
        if torn {
            let f = OpenOptions::new()
                .write(true)
                .open(&log_path)
                .map_err(io("open", &log_path))?;
            f.set_len(len).map_err(io("truncate", &log_path))?;
            f.sync_all().map_err(io("sync", &log_path))?;
        }
        Ok(())
    };
    let entries = parse_entries(&bytes)?;
    let head = match std::fs::read(&head_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("read", &head_path)(e)),
    };
    let len = bytes.len() as u64;
    let err = match verify_entries(&entries, head.as_deref(), &pk) {
        Ok(r) => {
            cut(len)?;
            return Ok((r.records, r.last_hash, len, notes));
        }
        Err(e) => e,
    };
    // Records after the head: recovered only if the head covers what it
    // claims and the last record's own signature vouches for the chain up
    // to it (a record appended without the host key has none that
    // verifies).
    let covered = head
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Head>(b).ok())
        .map_or(0, |h| h.seq);
    let Some(last) = entries.last() else {
        return Err(err);
    };
    let Some(sig) = last.sig.clone() else {
        return Err(err);
    };
    if covered >= last.seq
        || usize::try_from(covered).map_or(true, |c| c > entries.len())
        || verify_entries(
            &entries[..usize::try_from(covered).unwrap_or(0)],
            head.as_deref(),
            &pk,
        )
        .is_err()
    {
        return Err(err);
    }
    let rebuilt = Head {
        seq: last.seq,
        hash: last.hash.clone(),
        signature: sig,
    };
    let rebuilt = serde_json::to_vec(&rebuilt).expect("head serialises");
    let report = verify_entries(&entries, Some(&rebuilt), &pk).map_err(|_| err)?;
    cut(len)?;
    write_atomic(&head_path, &rebuilt, 0o644)?;
    let first = covered + 1;
    notes.push(if first == last.seq {
        format!("record {first} was written but its head was not (a crash or a failed write in between); its own signature vouches for it: head restored")
    } else {
        format!("records {first}..{} were written but not covered by the head (a crash or failed writes in between); the last one's signature vouches for them: head restored", last.seq)
    });
    Ok((report.records, report.last_hash, len, notes))
}

/// For the fuzz target: a crash's leftovers as the disk could hold them
/// (the first line of `data` plays `audit.head`, absent if empty; the rest
/// the log), written in `dir` and recovered as [`AuditLog::open`] does,
/// with RFC 8032's first test key as the host key (the seeds were signed
/// with it). A head that parses is also tried signed by that key (the
/// daemon's own head over a log it did not finish writing), else only an
/// empty log would get past its signature. What recovery accepts must
/// then verify as it stands on disk. Returns how many times it recovered
/// a log (a test holds the harness to reaching it). Only in fuzz and test
/// builds.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub fn fuzz_recover(dir: &Path, data: &[u8]) -> usize {
    static KEY: std::sync::OnceLock<HostKey> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(test_key);
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (head, log) = data.split_at(split);
    let log = log.get(1..).unwrap_or_default();
    let signed = serde_json::from_slice::<Head>(head).ok().map(|h| {
        let signature = key.sign(&head_message(h.seq, &h.hash));
        serde_json::to_vec(&Head { signature, ..h }).expect("head serialises")
    });
    let mut recovered = 0;
    for head in std::iter::once(head).chain(signed.as_deref()) {
        let (log_path, head_path) = (dir.join(LOG_FILE), dir.join(HEAD_FILE));
        if std::fs::write(&log_path, log).is_err() {
            return recovered;
        }
        let _ = std::fs::remove_file(&head_path);
        if !head.is_empty() && std::fs::write(&head_path, head).is_err() {
            return recovered;
        }
        if let Ok((records, last, len, _)) = recover(dir, key) {
            let report = verify(dir, &key.public_hex()).expect("what recovery accepts verifies");
            assert_eq!((report.records, report.last_hash), (records, last));
            assert_eq!(
                std::fs::metadata(&log_path).map(|m| m.len()).ok(),
                Some(len)
            );
            recovered += 1;
        }
    }
    recovered
}

/// RFC 8032's first test key: a well-known key, only in fuzz and test
/// builds, and private.
#[cfg(any(test, fuzzing))]
fn test_key() -> HostKey {
    // PKCS#8 v1: the Ed25519 algorithm, then the 32-byte seed.
    let mut pkcs8 = b"\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20".to_vec();
    pkcs8.extend_from_slice(&[
        0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c,
        0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae,
        0x7f, 0x60,
    ]);
    HostKey {
        pair: Ed25519KeyPair::from_pkcs8(&pkcs8).expect("the test key"),
    }
}

/// File names inside the control directory.
pub const LOG_FILE: &str = "audit.log";
/// The signed head.
pub const HEAD_FILE: &str = "audit.head";

impl AuditLog {
    /// Opens (creating if needed) the log in `dir`, after verifying what
    /// is there. A log that does not verify is refused: the operator must
    /// look at it (`coffre audit verify`) before the vault runs again.
    pub fn open(dir: &Path, key: HostKey) -> Result<Self, Error> {
        let log_path = dir.join(LOG_FILE);
        let head_path = dir.join(HEAD_FILE);
        let (seq, last, len, notes) = if log_path.exists() {
            recover(dir, &key)?
        } else {
            (0, GENESIS.to_string(), 0, Vec::new())
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io("open", &log_path))?;
        let published = HeadWatch::default();
        if seq > 0 {
            // Ed25519 is deterministic: the same signature as on disk.
            published.set(Head {
                seq,
                hash: last.clone(),
                signature: key.sign(&head_message(seq, &last)),
            });
        }
        let mut log = Self {
            log_path,
            head_path,
            file,
            key,
            seq,
            last,
            complete_len: len,
            torn: false,
            published,
        };
        if !notes.is_empty() {
            log.append(AuditRecord {
                at: coffre_vault::Millis(coffre_sys::time::now_ms()),
                actor: "coffre".into(),
                source: None,
                action: "audit".into(),
                result: "recovered".into(),
                detail: notes.join("; "),
            })?;
        }
        Ok(log)
    }

    /// Appends a record, syncs it, and signs the new head.
    ///
    /// A record whose line is in the log keeps its sequence number even
    /// if syncing it or writing the head fails (the error says so; the
    /// next append's head covers it). A line that could not be written
    /// whole is cut off before anything else is appended.
    pub fn append(&mut self, mut record: AuditRecord) -> Result<Entry, Error> {
        // Bounded, whatever a caller passes on (a sender's bytes in a
        // refusal's reason): a record stays well within what readers and
        // the bus's publisher take.
        cut(&mut record.detail, MAX_DETAIL);
        cut(&mut record.result, MAX_RESULT);
        if self.torn {
            self.file
                .set_len(self.complete_len)
                .map_err(io("cut a torn line from", &self.log_path))?;
            self.torn = false;
        }
        let seq = self.seq + 1;
        let hash = entry_hash(seq, &self.last, &record);
        let signature = self.key.sign(&head_message(seq, &hash));
        let entry = Entry {
            seq,
            prev: self.last.clone(),
            record,
            hash: hash.clone(),
            sig: Some(signature.clone()),
        };
        let mut line = serde_json::to_vec(&entry).expect("entries serialise");
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            self.torn = self.file.set_len(self.complete_len).is_err();
            return Err(io("append to", &self.log_path)(e));
        }
        // The line is in the log from here on: its number is spent.
        self.seq = seq;
        self.last = hash.clone();
        self.complete_len += line.len() as u64;
        self.file.sync_data().map_err(io("sync", &self.log_path))?;
        let head = Head {
            seq,
            hash,
            signature,
        };
        write_atomic(
            &self.head_path,
            &serde_json::to_vec(&head).expect("head serialises"),
            0o644,
        )?;
        // Published only once it is on disk: a client never learns a head
        // that a crash could take back.
        self.published.set(head);
        Ok(entry)
    }

    /// A view of the current signed head for other threads.
    pub fn head_watch(&self) -> HeadWatch {
        self.published.clone()
    }

    /// Records so far.
    pub fn len(&self) -> u64 {
        self.seq
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// The public key that verifies the head.
    pub fn public_hex(&self) -> String {
        self.key.public_hex()
    }
}

/// The most of a record's detail kept, in bytes; more is cut, and the cut
/// said. Escaped in JSON, control characters grow sixfold: with the
/// result's bound, a line stays under 128 KiB.
pub const MAX_DETAIL: usize = 16 << 10;

/// The most of a record's result kept (`ok`, `refused:CODE`, a state).
pub const MAX_RESULT: usize = 1 << 10;

/// `text` cut to `max` bytes at most (on a character's boundary), with
/// how much went.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut at = max.saturating_sub(64);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let gone = text.len() - at;
    text.truncate(at);
    text.push_str(&format!(" [{gone} more bytes cut]"));
}

/// What a successful verification found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records in the log.
    pub records: u64,
    /// Hash of the last one.
    pub last_hash: String,
}

/// Reads every entry of the log in `dir` (without verifying).
pub fn read_entries(dir: &Path) -> Result<Vec<Entry>, Error> {
    let path = dir.join(LOG_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("read", &path)(e)),
    };
    parse_entries(&bytes)
}

/// Parses the lines of an `audit.log` (outside bytes: every malformed line
/// is an error naming it).
pub fn parse_entries(bytes: &[u8]) -> Result<Vec<Entry>, Error> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::Tampered(format!(
            "the log is not UTF-8 text (byte {})",
            e.valid_up_to()
        ))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let e: Entry = serde_json::from_str(line)
            .map_err(|e| Error::Tampered(format!("line {}: not an audit entry ({e})", i + 1)))?;
        out.push(e);
    }
    Ok(out)
}

/// Verifies the chain and the signed head in `dir` with the host's public
/// key (hex). The error names the first record that fails.
pub fn verify(dir: &Path, public_hex: &str) -> Result<Report, Error> {
    let entries = read_entries(dir)?;
    let head_path = dir.join(HEAD_FILE);
    let head = match std::fs::read(&head_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("read", &head_path)(e)),
    };
    verify_entries(&entries, head.as_deref(), public_hex)
}

/// Verifies parsed entries against the bytes of `audit.head` (`None` if it
/// is missing) and the host's public key (hex).
pub fn verify_entries(
    entries: &[Entry],
    head: Option<&[u8]>,
    public_hex: &str,
) -> Result<Report, Error> {
    let mut prev = GENESIS.to_string();
    for (i, e) in entries.iter().enumerate() {
        let want = i as u64 + 1;
        let line = i + 1;
        if e.seq != want {
            return Err(Error::Tampered(format!(
                "line {line}: record {} where record {want} should be (records removed or reordered)",
                e.seq
            )));
        }
        if e.prev != prev {
            return Err(Error::Tampered(format!(
                "record {want} (line {line}): does not follow record {} (chain broken)",
                want - 1
            )));
        }
        if entry_hash(e.seq, &e.prev, &e.record) != e.hash {
            return Err(Error::Tampered(format!(
                "record {want} (line {line}) was edited: its hash does not match its content"
            )));
        }
        prev = e.hash.clone();
    }
    let records = entries.len() as u64;
    let head: Head = match head {
        Some(b) => serde_json::from_slice(b)
            .map_err(|e| Error::Tampered(format!("{HEAD_FILE} unreadable: {e}")))?,
        None if records == 0 => {
            return Ok(Report {
                records,
                last_hash: prev,
            });
        }
        None => {
            return Err(Error::Tampered(format!(
                "{HEAD_FILE} is missing: nothing vouches for these {records} records"
            )));
        }
    };
    let pk = unhex(public_hex).ok_or_else(|| Error::Key("public key is not hex".into()))?;
    let sig = unhex(&head.signature)
        .ok_or_else(|| Error::Tampered("head signature is not hex".into()))?;
    UnparsedPublicKey::new(&signature::ED25519, &pk)
        .verify(&head_message(head.seq, &head.hash), &sig)
        .map_err(|_| {
            Error::Tampered(format!(
                "{HEAD_FILE}: signature does not verify with the host key"
            ))
        })?;
    if head.seq > records {
        return Err(Error::Tampered(format!(
            "the signed head covers {} records but the log has {records}: records {}..{} were removed",
            head.seq,
            records + 1,
            head.seq
        )));
    }
    let at_head = entries
        .get(
            usize::try_from(head.seq)
                .unwrap_or(usize::MAX)
                .wrapping_sub(1),
        )
        .map_or(GENESIS, |e| e.hash.as_str());
    if at_head != head.hash {
        return Err(Error::Tampered(format!(
            "record {} does not match the signed head",
            head.seq
        )));
    }
    if head.seq < records {
        return Err(Error::Tampered(format!(
            "records {}..{records} are not covered by the signed head (appended by someone without the host key, or a crash during an append)",
            head.seq + 1
        )));
    }
    Ok(Report {
        records,
        last_hash: prev,
    })
}

/// Checks that `head` is signed by the key `public_hex` (hex).
pub fn verify_head(head: &Head, public_hex: &str) -> Result<(), Error> {
    let pk = unhex(public_hex).ok_or_else(|| Error::Key("public key is not hex".into()))?;
    let sig = unhex(&head.signature)
        .ok_or_else(|| Error::Tampered("head signature is not hex".into()))?;
    UnparsedPublicKey::new(&signature::ED25519, &pk)
        .verify(&head_message(head.seq, &head.hash), &sig)
        .map_err(|_| {
            Error::Tampered(format!(
                "the head of record {} is not signed by the audit key",
                head.seq
            ))
        })
}

/// Checks that the records after `(from_seq, from_hash)` lead to `to`:
/// `entries` start with record `from_seq + 1` (more after `to.seq` are
/// ignored), each links to the one before and hashes to what it says, and
/// record `to.seq` is the one `to` signs. This is how a client tells a log
/// that grew from the head it saw from one that was rewritten (a fork).
/// The signature of `to` is checked separately ([`verify_head`]).
pub fn verify_extension(
    from_seq: u64,
    from_hash: &str,
    entries: &[Entry],
    to: &Head,
) -> Result<(), Error> {
    if to.seq < from_seq {
        return Err(Error::Tampered(format!(
            "record {} comes before record {from_seq}",
            to.seq
        )));
    }
    let mut prev = from_hash.to_string();
    let mut seq = from_seq;
    for e in entries {
        if seq == to.seq {
            break;
        }
        let want = seq + 1;
        if e.seq != want {
            return Err(Error::Tampered(format!(
                "record {} where record {want} should be",
                e.seq
            )));
        }
        if e.prev != prev {
            return Err(Error::Tampered(format!(
                "record {want} does not follow record {seq} as it was seen before (a different history)"
            )));
        }
        if entry_hash(e.seq, &e.prev, &e.record) != e.hash {
            return Err(Error::Tampered(format!(
                "record {want} was edited: its hash does not match its content"
            )));
        }
        prev = e.hash.clone();
        seq = want;
    }
    if seq != to.seq {
        return Err(Error::Tampered(format!(
            "records {}..{} are missing",
            seq + 1,
            to.seq
        )));
    }
    if prev != to.hash {
        return Err(Error::Tampered(format!(
            "record {seq} is not the one the signed head names (a different history)"
        )));
    }
    Ok(())
}

/// Reads the signed head in `dir` (`None` if there is none).
pub fn read_head(dir: &Path) -> Result<Option<Head>, Error> {
    let path = dir.join(HEAD_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Tampered(format!("{HEAD_FILE} unreadable: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffre_vault::Millis;

    /// The fuzz harness recovers a log signed by its key (as the seed
    /// `signed` is: `COFFRE_FUZZ_SEED_OUT=PATH` writes it there), and one
    /// torn by a crash mid-append; a record edited is not recovered.
    #[test]
    fn the_fuzz_harness_reaches_recovery() {
        let d = tempfile::tempdir().unwrap();
        let key = test_key();
        assert_eq!(
            key.public_hex(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let mut log = AuditLog::open(d.path(), key).unwrap();
        log.append(rec(1)).unwrap();
        log.append(rec(2)).unwrap();
        let two = std::fs::read(d.path().join(HEAD_FILE)).unwrap();
        log.append(rec(3)).unwrap();
        drop(log);
        let scratch = tempfile::tempdir().unwrap();
        let mut input = std::fs::read(d.path().join(HEAD_FILE)).unwrap();
        input.push(b'\n');
        input.extend(std::fs::read(d.path().join(LOG_FILE)).unwrap());
        if let Some(out) = std::env::var_os("COFFRE_FUZZ_SEED_OUT") {
            std::fs::write(out, &input).unwrap();
        }
        assert_eq!(
            fuzz_recover(scratch.path(), &input),
            2,
            "as it is, and signed again"
        );
        // The third record's line torn by a crash, before its head.
        let mut torn = two;
        torn.extend_from_slice(&input[input.iter().position(|&b| b == b'\n').unwrap()..]);
        torn.truncate(torn.len() - 20);
        assert!(fuzz_recover(scratch.path(), &torn) >= 1, "torn");
        let text = String::from_utf8(input).unwrap();
        let edited = text.replace("\"n2\"", "\"n9\"");
        assert_ne!(edited, text);
        assert_eq!(fuzz_recover(scratch.path(), edited.as_bytes()), 0, "edited");
    }

    /// A record's detail of any size (a sender's bytes in a refusal's
    /// reason) is cut: the line stays bounded, the log verifies, and the
    /// cut is said.
    #[test]
    fn a_detail_of_any_size_is_cut_to_a_bounded_line() {
        let d = tempfile::tempdir().unwrap();
        let key = test_key();
        let public = key.public_hex();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        let mut r = rec(1);
        r.detail = format!("é{}", "\u{1}".repeat(1 << 20));
        r.result = "\u{1}".repeat(1 << 20);
        let e = log.append(r).unwrap();
        assert!(
            e.record.detail.len() <= MAX_DETAIL,
            "{}",
            e.record.detail.len()
        );
        assert!(e.record.detail.ends_with("more bytes cut]"));
        assert!(
            e.record.result.len() <= MAX_RESULT,
            "{}",
            e.record.result.len()
        );
        let mut small = rec(2);
        small.detail = "é".repeat(100);
        assert_eq!(log.append(small.clone()).unwrap().record, small);
        drop(log);
        let text = std::fs::read_to_string(d.path().join(LOG_FILE)).unwrap();
        let longest = text.lines().map(str::len).max().unwrap();
        assert!(longest < 128 << 10, "a line of {longest} bytes");
        assert_eq!(verify(d.path(), &public).unwrap().records, 2);
    }

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

    fn setup(n: u64) -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let pk = key.public_hex();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        for i in 1..=n {
            log.append(rec(i)).unwrap();
        }
        (d, pk)
    }

    fn lines(d: &Path) -> Vec<String> {
        std::fs::read_to_string(d.join(LOG_FILE))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn put(d: &Path, l: &[String]) {
        std::fs::write(d.join(LOG_FILE), l.join("\n") + "\n").unwrap();
    }

    #[test]
    fn intact_log_verifies_and_reopens() {
        let (d, pk) = setup(5);
        assert_eq!(verify(d.path(), &pk).unwrap().records, 5);
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        log.append(rec(6)).unwrap();
        assert_eq!(verify(d.path(), &pk).unwrap().records, 6);
    }

    #[test]
    fn edited_record_is_named() {
        let (d, pk) = setup(5);
        let mut l = lines(d.path());
        l[2] = l[2].replace("\"alice\"", "\"mallory\"");
        put(d.path(), &l);
        let e = verify(d.path(), &pk).unwrap_err().to_string();
        assert!(e.contains("record 3") && e.contains("edited"), "{e}");
    }

    #[test]
    fn removed_and_reordered_records_are_named() {
        let (d, pk) = setup(5);
        let mut l = lines(d.path());
        l.remove(1);
        put(d.path(), &l);
        let e = verify(d.path(), &pk).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("record 3"), "{e}");
        let (d, pk) = setup(5);
        let mut l = lines(d.path());
        l.swap(3, 4);
        put(d.path(), &l);
        let e = verify(d.path(), &pk).unwrap_err().to_string();
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn truncation_and_forged_tail_are_caught() {
        let (d, pk) = setup(5);
        let mut l = lines(d.path());
        l.truncate(3);
        put(d.path(), &l);
        let e = verify(d.path(), &pk).unwrap_err().to_string();
        assert!(e.contains("removed"), "{e}");
        // A forged, correctly chained record appended without the key.
        let (d, pk) = setup(2);
        let entries = read_entries(d.path()).unwrap();
        let last = entries.last().unwrap();
        let r = rec(99);
        let forged = Entry {
            seq: 3,
            prev: last.hash.clone(),
            hash: entry_hash(3, &last.hash, &r),
            record: r,
            sig: None,
        };
        let mut l = lines(d.path());
        l.push(serde_json::to_string(&forged).unwrap());
        put(d.path(), &l);
        let e = verify(d.path(), &pk).unwrap_err().to_string();
        assert!(e.contains("not covered by the signed head"), "{e}");
        // And a log that does not verify is not reopened for appending.
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        assert!(AuditLog::open(d.path(), key).is_err());
        // Nor with a signature borrowed from a genuine record: it signs
        // another (seq, hash), so the head is not rebuilt from it.
        let mut forged = forged;
        forged.sig = last.sig.clone();
        let mut l = lines(d.path());
        l.pop();
        l.push(serde_json::to_string(&forged).unwrap());
        put(d.path(), &l);
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        assert!(AuditLog::open(d.path(), key).is_err());
        assert_eq!(
            read_entries(d.path()).unwrap().len(),
            3,
            "nothing rewritten"
        );
    }

    /// Finding 4: a head write that failed after the line was written left
    /// the next record with the same sequence number; the log no longer
    /// verified and the daemon refused to start.
    #[test]
    fn failed_head_write_never_reuses_a_sequence_number() {
        let d = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let pk = key.public_hex();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        log.append(rec(1)).unwrap();
        // The head cannot be replaced (a directory where the file goes).
        let head = d.path().join(HEAD_FILE);
        std::fs::remove_file(&head).unwrap();
        std::fs::create_dir(&head).unwrap();
        assert!(log.append(rec(2)).is_err());
        std::fs::remove_dir(&head).unwrap();
        log.append(rec(3)).unwrap();
        let seqs: Vec<u64> = read_entries(d.path())
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(verify(d.path(), &pk).unwrap().records, 3);
    }

    /// A crash between a record's line and its head: the restart recovers
    /// the head from the log (the line carries its own signature) and says
    /// so in the log.
    #[test]
    fn restart_after_a_crash_between_line_and_head_recovers_the_head() {
        let (d, pk) = setup(2);
        let old_head = std::fs::read(d.path().join(HEAD_FILE)).unwrap();
        {
            let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
            let mut log = AuditLog::open(d.path(), key).unwrap();
            log.append(rec(3)).unwrap();
        }
        // As if the daemon died before the head was written.
        std::fs::write(d.path().join(HEAD_FILE), &old_head).unwrap();
        assert!(verify(d.path(), &pk).is_err());
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        log.append(rec(5)).unwrap();
        let entries = read_entries(d.path()).unwrap();
        assert_eq!(verify(d.path(), &pk).unwrap().records, 5);
        assert_eq!(entries[2].record, rec(3), "the record is kept");
        assert_eq!(entries[3].record.result, "recovered");
        assert!(
            entries[3].record.detail.contains("record 3"),
            "{}",
            entries[3].record.detail
        );
    }

    /// A crash in the middle of a line: the incomplete line (never
    /// acknowledged) is dropped at the restart, and the log says so.
    #[test]
    fn restart_after_a_torn_line_drops_it() {
        let (d, pk) = setup(2);
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(LOG_FILE))
            .unwrap();
        f.write_all(br#"{"seq":3,"prev":"ab"#).unwrap();
        drop(f);
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        AuditLog::open(d.path(), key).unwrap();
        let entries = read_entries(d.path()).unwrap();
        assert_eq!(verify(d.path(), &pk).unwrap().records, 3);
        assert!(entries[2].record.detail.contains("incomplete"));
    }

    #[test]
    fn head_watch_follows_appends_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let pk = key.public_hex();
        let mut log = AuditLog::open(d.path(), key).unwrap();
        let watch = log.head_watch();
        assert_eq!(watch.current(), None);
        log.append(rec(1)).unwrap();
        log.append(rec(2)).unwrap();
        let h = watch.current().unwrap();
        assert_eq!(h.seq, 2);
        assert_eq!(read_head(d.path()).unwrap().unwrap(), h);
        verify_head(&h, &pk).unwrap();
        drop(log);
        let key = HostKey::load_or_create(&d.path().join("host.key")).unwrap();
        let log = AuditLog::open(d.path(), key).unwrap();
        assert_eq!(
            log.head_watch().current().unwrap(),
            h,
            "same head after a restart"
        );
    }

    #[test]
    fn extensions_link_and_forks_do_not() {
        let (d, pk) = setup(5);
        let entries = read_entries(d.path()).unwrap();
        let head = read_head(d.path()).unwrap().unwrap();
        let h2 = entries[1].hash.clone();
        verify_extension(2, &h2, &entries[2..], &head).unwrap();
        verify_extension(0, GENESIS, &entries, &head).unwrap();
        verify_extension(5, &head.hash, &[], &head).unwrap();
        // Later records than the head are ignored.
        let h3 = Head {
            seq: 3,
            hash: entries[2].hash.clone(),
            signature: String::new(),
        };
        verify_extension(2, &h2, &entries[2..], &h3).unwrap();
        // Missing records.
        let e = verify_extension(2, &h2, &entries[3..], &head).unwrap_err();
        assert!(e.to_string().contains("record 4 where record 3"), "{e}");
        let e = verify_extension(2, &h2, &entries[2..4], &head).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        // Another log (other records, another key), same length: a fork.
        let other = tempfile::tempdir().unwrap();
        let key = HostKey::load_or_create(&other.path().join("host.key")).unwrap();
        let other_pk = key.public_hex();
        let mut log = AuditLog::open(other.path(), key).unwrap();
        for i in 1..=5 {
            log.append(rec(i + 100)).unwrap();
        }
        let theirs = read_entries(other.path()).unwrap();
        let their_head = read_head(other.path()).unwrap().unwrap();
        let e = verify_extension(2, &h2, &theirs[2..], &their_head).unwrap_err();
        assert!(e.to_string().contains("different history"), "{e}");
        assert!(verify_head(&their_head, &pk).is_err());
        verify_head(&their_head, &other_pk).unwrap();
    }

    #[test]
    fn another_hosts_key_does_not_verify() {
        let (d, _) = setup(2);
        let other = tempfile::tempdir().unwrap();
        let k = HostKey::load_or_create(&other.path().join("k")).unwrap();
        assert!(verify(d.path(), &k.public_hex()).is_err());
    }
}

//! The device's write journal on local disk: every write the device takes
//! is appended here before it is acknowledged, and the file is emptied
//! once a flush has made those writes durable on the store. A daemon that
//! dies between the two (killed, crashed) leaves the journal behind; the
//! next open replays it, each record verified, and flushes it to the
//! store. Only ciphertext is written (the device is below the encryption
//! engine), each record MACed under the integrity key: a record altered
//! or put there while the vault was closed is never replayed.
//!
//! A record: `CFJ2` (its MAC keyed BLAKE3, for a store whose chunks are
//! MACed so) or `CFJ1` (HMAC-SHA256, for a store made before), the epoch
//! of the durable manifest it follows, its sequence number, the offset,
//! the length, the MAC, the bytes. A store takes only records of its own
//! kind (nothing writes the other).
//!
//! A record written after a manifest put went unanswered (a flush whose
//! answer was lost: the next epoch's manifest may have landed, or not),
//! until the next flush that succeeds, carries [`AFTER_UNCERTAIN`] in the
//! top bit of its epoch, even once that put was settled (a settle may be
//! wrong: a store demoted meanwhile was not asked, a put the client gave
//! up on may land after the settle's read): it is replayed whether the
//! store's manifest turns out to be that epoch's or the next one's. Records of an older epoch are covered by a manifest
//! that landed (a crash between the manifest and the emptying of the
//! journal): they are dropped, never replayed over newer data. Coverage is
//! a prefix of the journal (a manifest covers every write before it was
//! made), so from the first record that may not be covered on, every
//! record is replayed, in order: replaying a write the manifest already
//! holds is harmless when everything written after it is replayed too.

use crate::integrity::{ChunkMac, Mac};
use crate::store::ChunkStore;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A record MACed with HMAC-SHA256.
const MAGIC: &[u8; 4] = b"CFJ1";
/// A record MACed with keyed BLAKE3.
const MAGIC_BLAKE3: &[u8; 4] = b"CFJ2";

fn magic(how: ChunkMac) -> &'static [u8; 4] {
    match how {
        ChunkMac::HmacSha256 => MAGIC,
        ChunkMac::Blake3 => MAGIC_BLAKE3,
    }
}
/// In a record's epoch: written while the manifest of the epoch after it
/// was put with an unknown outcome (it may be durable).
pub const AFTER_UNCERTAIN: u64 = 1 << 63;
const HEAD: usize = 4 + 8 + 8 + 8 + 4 + 32;
/// The largest record (a write is at most this; larger ones are split).
pub const MAX_RECORD: usize = 16 << 20;
/// The most a journal file may be read (it is bounded by the cache's size
/// and one write).
const MAX_JOURNAL: u64 = 8 << 30;

/// An open journal, appended to.
pub struct Journal {
    file: File,
    path: PathBuf,
    /// The durable epoch its records follow.
    base: u64,
    seq: u64,
    bytes: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("base", &self.base)
            .field("seq", &self.seq)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// One verified record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the bytes go.
    pub offset: u64,
    /// The bytes (ciphertext).
    pub data: Vec<u8>,
}

/// What a journal held at open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The records to replay, in order.
    pub records: Vec<Record>,
    /// Records of an older epoch (already durable): dropped.
    pub older: usize,
    /// Records of a newer epoch than the store's manifest (a store rolled
    /// back, its older state trusted): not of this history, dropped.
    pub ahead: usize,
    /// Bytes at the end that did not verify (a record torn by the crash,
    /// or altered): not replayed, nor anything after them.
    pub ignored_bytes: u64,
}

fn head(how: ChunkMac, (base, seq, offset): (u64, u64, u64), len: u32, mac: &Mac) -> [u8; HEAD] {
    let mut h = [0u8; HEAD];
    h[0..4].copy_from_slice(magic(how));
    h[4..12].copy_from_slice(&base.to_be_bytes());
    h[12..20].copy_from_slice(&seq.to_be_bytes());
    h[20..28].copy_from_slice(&offset.to_be_bytes());
    h[28..32].copy_from_slice(&len.to_be_bytes());
    h[32..64].copy_from_slice(mac);
    h
}

/// The records of `bytes` that verify under `store`'s integrity key and
/// follow its durable epoch, up to the first that does not verify.
pub fn parse(bytes: &[u8], store: &ChunkStore) -> Found {
    parse_with(bytes, store.root().epoch, |how, at, data, mac| {
        how == store.chunk_mac() && store.journal_verifies(how, at, data, mac)
    })
}

/// [`parse`], with `verify` for the MAC of each record.
fn parse_with(
    bytes: &[u8],
    epoch: u64,
    verify: impl Fn(ChunkMac, (u64, u64, u64), &[u8], &Mac) -> bool,
) -> Found {
    let mut found = Found::default();
    let mut at = 0usize;
    let mut next_seq = None;
    let mut replaying = false;
    while at < bytes.len() {
        let Some(h) = bytes.get(at..at + HEAD) else {
            break;
        };
        let Some(how) = [ChunkMac::HmacSha256, ChunkMac::Blake3]
            .into_iter()
            .find(|how| h[0..4] == magic(*how)[..])
        else {
            break;
        };
        let num = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[8 - r.len()..].copy_from_slice(&h[r]);
            u64::from_be_bytes(b)
        };
        let (base, seq, offset) = (num(4..12), num(12..20), num(20..28));
        let Ok(len) = usize::try_from(num(28..32)) else {
            break;
        };
        if len > MAX_RECORD {
            break;
        }
        let Some(data) = bytes.get(at + HEAD..at + HEAD + len) else {
            break;
        };
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&h[32..64]);
        // In sequence, from the first record on: nothing left out, nothing
        // put in between.
        if next_seq.is_some_and(|n| n != seq) || (next_seq.is_none() && seq != 0) {
            break;
        }
        if !verify(how, (base, seq, offset), data, &mac) {
            break;
        }
        next_seq = Some(seq + 1);
        let (of, uncertain) = (base & !AFTER_UNCERTAIN, base & AFTER_UNCERTAIN != 0);
        if of > epoch {
            found.ahead += 1;
        } else if replaying || of == epoch || (uncertain && of + 1 == epoch) {
            // From here on, everything (see the module's documentation).
            replaying = true;
            found.records.push(Record {
                offset,
                data: data.to_vec(),
            });
        } else {
            found.older += 1;
        }
        at += HEAD + len;
    }
    found.ignored_bytes = (bytes.len() - at) as u64;
    found
}

impl Journal {
    /// Reads what the journal at `path` holds (nothing if there is none),
    /// for replay. A file that is not a regular one is refused.
    pub fn read(path: &Path, store: &ChunkStore) -> io::Result<Found> {
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::default()),
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if meta.len() > MAX_JOURNAL {
            return Err(io::Error::other(format!(
                "{} is {} bytes, more than a journal ever holds ({MAX_JOURNAL})",
                path.display(),
                meta.len()
            )));
        }
        let mut bytes = Vec::new();
        f.take(MAX_JOURNAL).read_to_end(&mut bytes)?;
        Ok(parse(&bytes, store))
    }

    /// Opens the journal at `path` empty (mode 0600), its records to
    /// follow the durable epoch `base`.
    pub fn create(path: &Path, base: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.sync_all()?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            base,
            seq: 0,
            bytes: 0,
        })
    }

    /// Appends `data` written at `offset` (no sync: a dead daemon's writes
    /// are in the kernel's cache of the file; a dead host loses them, as
    /// it loses a disk's cache, and ext4's journal copes). Marked
    /// [`AFTER_UNCERTAIN`] once a manifest put went unanswered, until a
    /// flush succeeds.
    pub fn append(&mut self, store: &ChunkStore, offset: u64, data: &[u8]) -> io::Result<()> {
        let (seq, bytes) = (self.seq, self.bytes);
        let base = if store.unanswered_since_flush() {
            self.base | AFTER_UNCERTAIN
        } else {
            self.base
        };
        let r = (|| {
            for (k, part) in data.chunks(MAX_RECORD).enumerate() {
                let at = offset + (k * MAX_RECORD) as u64;
                // The store's kind of MAC.
                let how = store.chunk_mac();
                let mac = store.journal_mac(how, (base, self.seq, at), part);
                let len = u32::try_from(part.len()).map_err(io::Error::other)?;
                let h = head(how, (base, self.seq, at), len, &mac);
                self.file.write_all(&h)?;
                self.file.write_all(part)?;
                self.seq += 1;
                self.bytes += (HEAD + part.len()) as u64;
            }
            Ok(())
        })();
        if r.is_err() {
            // Nothing half written stays in the middle (a later record
            // would never be replayed past it).
            self.seq = seq;
            self.bytes = bytes;
            let _ = self.file.set_len(bytes);
            let _ = self.file.seek(SeekFrom::Start(bytes));
        }
        r
    }

    /// The durable epoch its records follow.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Empties it: every write so far is durable on the store, whose
    /// durable epoch is now `base`.
    pub fn reset(&mut self, base: u64) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.base = base;
        self.seq = 0;
        self.bytes = 0;
        Ok(())
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// For the fuzz target: a journal file as the host's disk could hold it,
/// read with every MAC accepted (so that the parsing past it is reached)
/// and then with none: never more records or bytes than there are.
#[doc(hidden)]
pub fn fuzz_journal(data: &[u8]) {
    let epoch = data.first().map_or(0, |b| u64::from(*b % 4));
    let all = parse_with(data, epoch, |_, _, _, _| true);
    let used: usize = all.records.iter().map(|r| HEAD + r.data.len()).sum();
    // What was applied and what was ignored never add up to more than
    // the file (records of an older epoch are the rest).
    assert!(used + usize::try_from(all.ignored_bytes).unwrap_or(usize::MAX) <= data.len());
    let none = parse_with(data, epoch, |_, _, _, _| false);
    assert!(none.records.is_empty() && none.older == 0 && none.ahead == 0);
    assert_eq!(none.ignored_bytes, data.len() as u64);
}

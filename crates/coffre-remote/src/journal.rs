//! The device's write journal on local disk: every write the device takes
//! is appended here before it is acknowledged, and the journal is
//! emptied once a flush has made those writes durable on the store. A daemon that
//! dies between the two (killed, crashed) leaves the journal behind; the
//! next open replays it, each record verified, and flushes it to the
//! store. Only ciphertext is written (the device is below the encryption
//! engine), each record MACed under the integrity key: a record altered
//! or put there while the vault was closed is never replayed.
//!
//! A record: `CFJ4` (its MAC keyed BLAKE3, for a store whose chunks are
//! MACed so) or `CFJ3` (HMAC-SHA256, for a store made before), the
//! journal's cycle, the epoch of the durable manifest it follows, its
//! sequence number, the offset, the length, the MAC (over all of them and
//! the bytes), the bytes. A store takes only records of its own kind
//! (nothing writes the other). `CFJ2` and `CFJ1` are the same records
//! without the cycle, as written before there were cycles: a journal of
//! them is still replayed.
//!
//! A cycle runs from an open or an emptying (a flush that succeeded) to
//! the next emptying, and its number is drawn at random. The file is not
//! truncated at an emptying (but for a cycle with a record marked
//! [`AFTER_UNCERTAIN`]: see [`Journal::reset`]): the new cycle is written
//! over the last one from the file's beginning, into pages the kernel
//! already holds (the truncation freed them and the next cycle took
//! fresh ones). After the cycle's last record
//! comes its end mark (a record of no bytes, offset `u64::MAX`, MACed
//! like the others), and what earlier cycles left after it is not read.
//! The first record fixes the cycle: a record of another one, or out of
//! sequence, ends the journal, so that a record an earlier cycle left,
//! even where the next one of this cycle would go with the sequence
//! number it would have, is never replayed over newer data. A record goes
//! over the end mark before it, its bytes and its own end mark first, its
//! head last: a daemon that dies in the middle leaves the last end mark
//! in place (the head's write is not torn by a signal unless it crosses
//! a page: then its MAC fails, and the write it was for was not yet
//! acknowledged). An open and a clean close empty the file: after
//! either, no record (each write's offset and ciphertext, several
//! versions of a sector among them) stays readable in it while the vault
//! is closed. A daemon that dies leaves the file as it was, earlier
//! cycles after the end mark included (up to the largest cycle's
//! extent), until the next open.
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
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The kinds of record: the store's kind of MAC, and whether the record
/// names its cycle (the first format did not; it is still replayed, no
/// longer written).
const KINDS: [(&[u8; 4], ChunkMac, bool); 4] = [
    (b"CFJ1", ChunkMac::HmacSha256, false),
    (b"CFJ2", ChunkMac::Blake3, false),
    (b"CFJ3", ChunkMac::HmacSha256, true),
    (b"CFJ4", ChunkMac::Blake3, true),
];

fn magic(how: ChunkMac) -> &'static [u8; 4] {
    match how {
        ChunkMac::HmacSha256 => KINDS[2].0,
        ChunkMac::Blake3 => KINDS[3].0,
    }
}
/// In a record's epoch: written while the manifest of the epoch after it
/// was put with an unknown outcome (it may be durable).
pub const AFTER_UNCERTAIN: u64 = 1 << 63;
/// A record's head in the first format: magic, epoch, sequence, offset,
/// length, MAC.
const HEAD_V1: usize = 4 + 8 + 8 + 8 + 4 + 32;
/// A record's head: magic, cycle, epoch, sequence, offset, length, MAC.
/// (Padded to 128 bytes, so that the bytes of 1 MiB writes land 64-byte
/// aligned in the file's pages, the daemon's path on NBD ran no faster:
/// 1085 against 1084 MiB/s, medians of 9 rounds each, 2026-12-06.)
const HEAD: usize = 4 + 8 + HEAD_V1 - 4;
/// The offset an end mark names (with no bytes): no write goes there.
const END: u64 = u64::MAX;
/// The largest record (a write is at most this; larger ones are split).
pub const MAX_RECORD: usize = 16 << 20;
/// The most a journal file may be read.
const MAX_JOURNAL: u64 = 8 << 30;
/// The most a cycle holds before a flush (with a cache larger than this,
/// the device flushes sooner): a cycle and one write stay well within
/// [`MAX_JOURNAL`], so that a journal a daemon left is never too large
/// to replay.
pub const MAX_CYCLE: u64 = 4 << 30;

/// An open journal, appended to.
pub struct Journal {
    file: File,
    path: PathBuf,
    /// The durable epoch its records follow.
    base: u64,
    /// This cycle's number (random, drawn at each emptying).
    cycle: u64,
    seq: u64,
    /// The bytes of this cycle's records (where the next one goes).
    bytes: u64,
    /// Whether a record of this cycle carries [`AFTER_UNCERTAIN`].
    uncertain: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("base", &self.base)
            .field("cycle", &self.cycle)
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
    /// Bytes at the end that did not verify, or not as the next record
    /// of the cycle (a record torn by the crash, altered, or left by an
    /// earlier cycle where no end mark came before it): not replayed,
    /// nor anything after them.
    pub ignored_bytes: u64,
    /// The cycle's end mark and what earlier cycles left after it (the
    /// file is written over in place): not read.
    pub stale_bytes: u64,
}

/// A record's head as the file holds it (nothing verified yet).
struct Head {
    how: ChunkMac,
    /// `None` in the first format.
    cycle: Option<u64>,
    base: u64,
    seq: u64,
    offset: u64,
    len: usize,
    mac: Mac,
    /// The head's own length.
    size: usize,
}

impl Head {
    /// The head `bytes` begin with, if they hold one whose length is
    /// within bounds.
    fn parse(bytes: &[u8]) -> Option<Head> {
        let (_, how, cycled) = KINDS
            .into_iter()
            .find(|(m, _, _)| bytes.get(0..4) == Some(&m[..]))?;
        let size = if cycled { HEAD } else { HEAD_V1 };
        let h = bytes.get(..size)?;
        let num = |at: usize, n: usize| {
            let mut b = [0u8; 8];
            b[8 - n..].copy_from_slice(&h[at..at + n]);
            u64::from_be_bytes(b)
        };
        let (cycle, at) = if cycled {
            (Some(num(4, 8)), 12)
        } else {
            (None, 4)
        };
        let len = usize::try_from(num(at + 24, 4)).ok()?;
        if len > MAX_RECORD {
            return None;
        }
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&h[at + 28..at + 60]);
        Some(Head {
            how,
            cycle,
            base: num(at, 8),
            seq: num(at + 8, 8),
            offset: num(at + 16, 8),
            len,
            mac,
            size,
        })
    }

    /// Whether it marks the end of its cycle's records.
    fn is_end(&self) -> bool {
        self.cycle.is_some() && self.len == 0 && self.offset == END
    }
}

fn head(
    how: ChunkMac,
    cycle: u64,
    (base, seq, offset): (u64, u64, u64),
    len: u32,
    mac: &Mac,
) -> [u8; HEAD] {
    let mut h = [0u8; HEAD];
    h[0..4].copy_from_slice(magic(how));
    h[4..12].copy_from_slice(&cycle.to_be_bytes());
    h[12..20].copy_from_slice(&base.to_be_bytes());
    h[20..28].copy_from_slice(&seq.to_be_bytes());
    h[28..36].copy_from_slice(&offset.to_be_bytes());
    h[36..40].copy_from_slice(&len.to_be_bytes());
    h[40..72].copy_from_slice(mac);
    h
}

/// The records of `bytes` that verify under `store`'s integrity key and
/// follow its durable epoch, up to the first that does not verify or the
/// cycle's end mark.
pub fn parse(bytes: &[u8], store: &ChunkStore) -> Found {
    parse_with(bytes, store.root().epoch, |how, cycle, at, data, mac| {
        how == store.chunk_mac() && store.journal_verifies(how, cycle, at, data, mac)
    })
}

/// [`parse`], with `verify` for the MAC of each record.
fn parse_with(
    bytes: &[u8],
    epoch: u64,
    verify: impl Fn(ChunkMac, Option<u64>, (u64, u64, u64), &[u8], &Mac) -> bool,
) -> Found {
    let mut found = Found::default();
    let mut at = 0usize;
    // The first record's cycle (`None`: the first format): every record
    // after it is of that format and cycle, in sequence (nothing left
    // out, nothing put in between, nothing of another cycle). The kind of
    // MAC is `verify`'s to check.
    let mut first: Option<Option<u64>> = None;
    let mut next_seq = 0u64;
    let mut replaying = false;
    let mut ended = false;
    while at < bytes.len() {
        let Some(h) = Head::parse(&bytes[at..]) else {
            break;
        };
        let Some(data) = bytes.get(at + h.size..at + h.size + h.len) else {
            break;
        };
        if first.is_some_and(|c| c != h.cycle) || h.seq != next_seq {
            break;
        }
        if !verify(h.how, h.cycle, (h.base, h.seq, h.offset), data, &h.mac) {
            break;
        }
        first = Some(h.cycle);
        if h.is_end() {
            ended = true;
            break;
        }
        at += h.size + h.len;
        next_seq = h.seq + 1;
        let (of, uncertain) = (h.base & !AFTER_UNCERTAIN, h.base & AFTER_UNCERTAIN != 0);
        if of > epoch {
            found.ahead += 1;
        } else if replaying || of == epoch || (uncertain && of + 1 == epoch) {
            // From here on, everything (see the module's documentation).
            replaying = true;
            found.records.push(Record {
                offset: h.offset,
                data: data.to_vec(),
            });
        } else {
            found.older += 1;
        }
    }
    let rest = (bytes.len() - at) as u64;
    if ended {
        found.stale_bytes = rest;
    } else {
        found.ignored_bytes = rest;
    }
    found
}

/// How many bytes of the journal at `path` its cycle's records claim,
/// read head by head, nothing verified (without the vault's key: for a
/// status while it is closed; records already durable count too, which
/// the next open drops). 0 if there is none.
pub fn held(path: &Path) -> io::Result<u64> {
    let f = match open_existing(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    Ok(held_with(len, |at, buf| f.read_exact_at(buf, at).is_ok()))
}

/// [`held`] over a file of `len` bytes that `read` reads (false: could
/// not).
fn held_with(len: u64, read: impl Fn(u64, &mut [u8]) -> bool) -> u64 {
    let mut at = 0u64;
    let mut first: Option<Option<u64>> = None;
    let mut next_seq = 0u64;
    let mut buf = [0u8; HEAD];
    loop {
        let n = usize::try_from(len.saturating_sub(at))
            .unwrap_or(usize::MAX)
            .min(HEAD);
        if n < HEAD_V1 || !read(at, &mut buf[..n]) {
            return at;
        }
        let Some(h) = Head::parse(&buf[..n]) else {
            return at;
        };
        let end = at + (h.size + h.len) as u64;
        if end > len || first.is_some_and(|c| c != h.cycle) || h.seq != next_seq {
            return at;
        }
        if h.is_end() {
            return at;
        }
        first = Some(h.cycle);
        next_seq = h.seq + 1;
        at = end;
    }
}

fn open_existing(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
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
    Ok(f)
}

/// A cycle's number: random, so that no record left by an earlier cycle
/// (of this daemon or one before it) is taken for one of this cycle.
fn new_cycle() -> io::Result<u64> {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| io::Error::other("no randomness"))?;
    Ok(u64::from_be_bytes(b))
}

impl Journal {
    /// Reads what the journal at `path` holds (nothing if there is none),
    /// for replay. A file that is not a regular one is refused.
    pub fn read(path: &Path, store: &ChunkStore) -> io::Result<Found> {
        let f = match open_existing(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::default()),
            Err(e) => return Err(e),
        };
        // On the disk as read before anything is replayed from it: a host
        // that dies after the replay's flush, before the next journal
        // replaced this one, then finds all of it again (replayed again
        // whole, which is harmless), never a part the kernel had not
        // written back (a part of a cycle marked after an unanswered put,
        // replayed alone, would roll later writes back).
        f.sync_all()?;
        let mut bytes = Vec::new();
        f.take(MAX_JOURNAL).read_to_end(&mut bytes)?;
        Ok(parse(&bytes, store))
    }

    /// Opens the journal at `path` empty (mode 0600), its records to
    /// follow `store`'s durable epoch: a new cycle, its end mark at the
    /// beginning, synced (what [`read`](Journal::read) gave must have
    /// been replayed and flushed first). A file of its own (the one
    /// there is unlinked first), so that nothing an earlier journal at
    /// `path` still does reaches this one.
    pub fn create(path: &Path, store: &ChunkStore) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let j = Journal {
            file,
            path: path.to_path_buf(),
            base: store.root().epoch,
            cycle: new_cycle()?,
            seq: 0,
            bytes: 0,
            uncertain: false,
        };
        j.mark_end(store, j.base)?;
        j.file.sync_all()?;
        Ok(j)
    }

    /// Writes the cycle's end mark where its next record goes, with the
    /// next record's sequence number.
    fn mark_end(&self, store: &ChunkStore, base: u64) -> io::Result<()> {
        let how = store.chunk_mac();
        let at = (base, self.seq, END);
        let mac = store.journal_mac(how, Some(self.cycle), at, &[]);
        self.file
            .write_all_at(&head(how, self.cycle, at, 0, &mac), self.bytes)
    }

    /// Appends `data` written at `offset` (no sync: a dead daemon's writes
    /// are in the kernel's cache of the file; a dead host loses them, as
    /// it loses a disk's cache, and ext4's journal copes). Marked
    /// [`AFTER_UNCERTAIN`] once a manifest put went unanswered, until a
    /// flush succeeds.
    ///
    /// Each record goes over the end mark of the records before it, its
    /// own end mark after it: the mark and the bytes first, the head last,
    /// so that a daemon that dies in between leaves the end mark before
    /// it where it was.
    pub fn append(&mut self, store: &ChunkStore, offset: u64, data: &[u8]) -> io::Result<()> {
        let (seq, bytes) = (self.seq, self.bytes);
        let uncertain = store.unanswered_since_flush();
        let base = if uncertain {
            self.base | AFTER_UNCERTAIN
        } else {
            self.base
        };
        let r = (|| {
            for (k, part) in data.chunks(MAX_RECORD).enumerate() {
                let at = offset + (k * MAX_RECORD) as u64;
                // The store's kind of MAC.
                let how = store.chunk_mac();
                let mac = store.journal_mac(how, Some(self.cycle), (base, self.seq, at), part);
                let len = u32::try_from(part.len()).map_err(io::Error::other)?;
                let h = head(how, self.cycle, (base, self.seq, at), len, &mac);
                let here = self.bytes;
                self.seq += 1;
                self.bytes += (HEAD + part.len()) as u64;
                self.mark_end(store, base)?;
                self.file.write_all_at(part, here + HEAD as u64)?;
                self.file.write_all_at(&h, here)?;
                self.uncertain |= uncertain;
            }
            Ok(())
        })();
        if r.is_err() {
            // Nothing half written stays in the middle (a later record
            // would never be replayed past it): the end mark back where
            // it was.
            self.seq = seq;
            self.bytes = bytes;
            let _ = self.file.set_len(bytes);
            let _ = self.mark_end(store, self.base);
        }
        r
    }

    /// The durable epoch its records follow.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Empties it: every write so far is durable on the store, whose
    /// durable epoch is now `store`'s. A new cycle starts at the file's
    /// beginning, written over what the last one left (pages the kernel
    /// already holds), its end mark first.
    ///
    /// A cycle with a record marked [`AFTER_UNCERTAIN`] is cut off
    /// instead (the file emptied): such records are replayed over the
    /// manifest after their epoch, and a host that died could keep a part
    /// of them without the end mark before them (the kernel writes a
    /// file's pages back in any order), which replayed would roll the
    /// later ones back. The truncation is synced before anything of the
    /// next cycle is written.
    pub fn reset(&mut self, store: &ChunkStore) -> io::Result<()> {
        let cycle = new_cycle()?;
        if self.uncertain {
            self.file.set_len(0)?;
            // Empty now, whatever fails next: the next record goes at
            // its beginning (a failed sync leaves the epoch behind, and
            // the device flushes again before the next write).
            self.seq = 0;
            self.bytes = 0;
            self.file.sync_all()?;
        }
        self.base = store.root().epoch;
        self.cycle = cycle;
        self.seq = 0;
        self.bytes = 0;
        self.uncertain = false;
        self.mark_end(store, self.base)
    }

    /// The bytes of its records since the last flush.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Journal {
    /// A clean close (no write waits in it) empties the file; otherwise
    /// what earlier cycles left after the end mark goes.
    fn drop(&mut self) {
        let keep = if self.bytes == 0 {
            0
        } else {
            self.bytes + HEAD as u64
        };
        let _ = self.file.set_len(keep);
    }
}

/// For the fuzz target: a journal file as the host's disk could hold it,
/// read with every MAC accepted (so that the parsing past it is reached)
/// and then with none: never more records or bytes than there are; and
/// read head by head as a status reads it, which claims what the parse
/// with every MAC accepted took.
#[doc(hidden)]
pub fn fuzz_journal(data: &[u8]) {
    let epoch = data.first().map_or(0, |b| u64::from(*b % 4));
    let all = parse_with(data, epoch, |_, _, _, _, _| true);
    let rest = all.ignored_bytes + all.stale_bytes;
    assert!(all.ignored_bytes == 0 || all.stale_bytes == 0);
    let taken = data.len() as u64 - rest;
    let used: usize = all.records.iter().map(|r| HEAD_V1 + r.data.len()).sum();
    // What was applied and what was left never add up to more than the
    // file (records of an older epoch are the rest).
    assert!(used as u64 + rest <= data.len() as u64);
    let len = data.len() as u64;
    let read = |at: u64, buf: &mut [u8]| {
        let Ok(at) = usize::try_from(at) else {
            return false;
        };
        match data.get(at..at + buf.len()) {
            Some(b) => {
                buf.copy_from_slice(b);
                true
            }
            None => false,
        }
    };
    assert_eq!(held_with(len, read), taken);
    let none = parse_with(data, epoch, |_, _, _, _, _| false);
    assert!(none.records.is_empty() && none.older == 0 && none.ahead == 0);
    assert_eq!(none.ignored_bytes, data.len() as u64);
}

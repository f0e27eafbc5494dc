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
use std::io;
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

/// What a journal held at open, and what its replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The records replayed, in order.
    pub replayed: usize,
    /// Their bytes.
    pub replayed_bytes: u64,
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

/// What can be read at an offset: the journal's file, or its bytes.
trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, at)
    }
}

impl ReadAt for &[u8] {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let from = usize::try_from(at).map_err(io::Error::other)?;
        let b = from
            .checked_add(buf.len())
            .and_then(|to| self.get(from..to))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(b);
        Ok(())
    }
}

/// A journal's bytes read through a window: heads and small records come
/// from one read of up to the window's size, a large record's bytes
/// straight into the caller's buffer. Never more than the window and one
/// record in memory, whatever the file's size.
struct Windowed<R> {
    inner: R,
    len: u64,
    window: Vec<u8>,
    /// Where the window's bytes begin in the file, and how many it holds.
    start: u64,
    filled: usize,
}

/// The window of a replay (which reads every record's bytes).
const REPLAY_WINDOW: usize = 256 << 10;
/// The window of [`held`] (which reads heads only: a head of large records
/// costs one read of this, small records' heads come several at a time).
const HEADS_WINDOW: usize = 4 << 10;

impl<R: ReadAt> Windowed<R> {
    fn new(inner: R, len: u64, size: usize) -> Self {
        Windowed {
            inner,
            len,
            window: vec![0; size],
            start: 0,
            filled: 0,
        }
    }

    /// Reads `buf.len()` bytes at `at`, all within the length given.
    fn read(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = self.start + self.filled as u64;
        // What the window holds from `at` on.
        let have = if (self.start..end).contains(&at) {
            usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(buf.len())
        } else {
            0
        };
        if have < buf.len() && buf.len() < self.window.len() {
            let n = usize::try_from(self.len.saturating_sub(at))
                .unwrap_or(usize::MAX)
                .min(self.window.len());
            if n < buf.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.filled = 0;
            self.inner.read_exact_at(&mut self.window[..n], at)?;
            (self.start, self.filled) = (at, n);
            buf.copy_from_slice(&self.window[..buf.len()]);
            return Ok(());
        }
        if have > 0 {
            let skip = usize::try_from(at - self.start).unwrap_or(0);
            buf[..have].copy_from_slice(&self.window[skip..skip + have]);
        }
        if have < buf.len() {
            self.inner
                .read_exact_at(&mut buf[have..], at + have as u64)?;
        }
        Ok(())
    }
}

/// How a walk checks a record's MAC: `None` reads heads only (every
/// record taken as it claims to be, its bytes not read).
type Verify<'a> = Option<&'a dyn Fn(ChunkMac, Option<u64>, (u64, u64, u64), &[u8], &Mac) -> bool>;

/// A walk through a journal's records, one at a time.
struct Walk<R> {
    src: Windowed<R>,
    /// Where the next record's head is.
    at: u64,
    /// The first record's cycle (`None` inside: the first format): every
    /// record after it is of that format and cycle, in sequence (nothing
    /// left out, nothing put in between, nothing of another cycle). The
    /// kind of MAC is the verifier's to check.
    first: Option<Option<u64>>,
    next_seq: u64,
    /// From the first record that may not be covered by the store's
    /// manifest on, every record is replayed.
    replaying: bool,
    done: bool,
    /// The last record's bytes (reused).
    data: Vec<u8>,
    found: Found,
}

impl<R: ReadAt> Walk<R> {
    fn new(src: Windowed<R>) -> Self {
        Walk {
            src,
            at: 0,
            first: None,
            next_seq: 0,
            replaying: false,
            done: false,
            data: Vec::new(),
            found: Found::default(),
        }
    }

    /// The next record to replay (its offset; its bytes in `data`), or
    /// `None` once the journal's records end (`found` is then whole).
    /// Records already durable, or of a newer history, are counted and
    /// passed over. An error reading the file is one (never taken for the
    /// journal's end).
    fn next(&mut self, epoch: u64, verify: Verify<'_>) -> io::Result<Option<u64>> {
        while !self.done {
            match self.step(epoch, verify)? {
                Some(offset) => return Ok(Some(offset)),
                None if self.done => break,
                None => {}
            }
        }
        Ok(None)
    }

    /// One record: `Some(offset)` to replay it; `None` when passed over,
    /// or at the end (then `done`).
    fn step(&mut self, epoch: u64, verify: Verify<'_>) -> io::Result<Option<u64>> {
        let len = self.src.len;
        let n = usize::try_from(len - self.at)
            .unwrap_or(usize::MAX)
            .min(HEAD);
        let mut buf = [0u8; HEAD];
        let h = if n < HEAD_V1 {
            None
        } else {
            self.src.read(self.at, &mut buf[..n])?;
            Head::parse(&buf[..n])
        };
        let next = h.as_ref().and_then(|h| {
            let end = self.at.checked_add((h.size + h.len) as u64)?;
            (end <= len && self.first.is_none_or(|c| c == h.cycle) && h.seq == self.next_seq)
                .then_some(end)
        });
        let (Some(h), Some(end)) = (h, next) else {
            return Ok(self.end(false));
        };
        if let Some(verify) = verify {
            self.data.resize(h.len, 0);
            self.src.read(self.at + h.size as u64, &mut self.data)?;
            if !verify(
                h.how,
                h.cycle,
                (h.base, h.seq, h.offset),
                &self.data,
                &h.mac,
            ) {
                return Ok(self.end(false));
            }
        }
        self.first = Some(h.cycle);
        if h.is_end() {
            return Ok(self.end(true));
        }
        self.at = end;
        self.next_seq = h.seq + 1;
        let (of, uncertain) = (h.base & !AFTER_UNCERTAIN, h.base & AFTER_UNCERTAIN != 0);
        if of > epoch {
            self.found.ahead += 1;
        } else if self.replaying || of == epoch || (uncertain && of + 1 == epoch) {
            // From here on, everything (see the module's documentation).
            self.replaying = true;
            self.found.replayed += 1;
            self.found.replayed_bytes += h.len as u64;
            return Ok(Some(h.offset));
        } else {
            self.found.older += 1;
        }
        Ok(None)
    }

    /// The records end here: what follows is stale (after an end mark) or
    /// ignored.
    fn end(&mut self, ended: bool) -> Option<u64> {
        let rest = self.src.len - self.at;
        if ended {
            self.found.stale_bytes = rest;
        } else {
            self.found.ignored_bytes = rest;
        }
        self.done = true;
        None
    }
}

/// The records of `bytes` that verify under `store`'s integrity key and
/// follow its durable epoch, up to the first that does not verify or the
/// cycle's end mark (all of them in memory: for journals already read).
pub fn parse(bytes: &[u8], store: &ChunkStore) -> (Found, Vec<Record>) {
    let verify = |how, cycle, at, data: &[u8], mac: &Mac| {
        how == store.chunk_mac() && store.journal_verifies(how, cycle, at, data, mac)
    };
    parse_with(bytes, store.root().epoch, Some(&verify), REPLAY_WINDOW)
}

/// [`parse`], with `verify` for the MAC of each record, through a window
/// of `window` bytes.
fn parse_with(bytes: &[u8], epoch: u64, verify: Verify<'_>, window: usize) -> (Found, Vec<Record>) {
    let mut walk = Walk::new(Windowed::new(bytes, bytes.len() as u64, window));
    let mut records = Vec::new();
    // Reading a slice within its length does not fail: an error would be
    // the window's (a bug), not the journal's end.
    while let Some(offset) = walk
        .next(epoch, verify)
        .expect("a slice is read within its length")
    {
        records.push(Record {
            offset,
            data: walk.data.clone(),
        });
    }
    (walk.found, records)
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
    held_in(Windowed::new(f, len, HEADS_WINDOW))
}

/// [`held`] through `src`.
fn held_in<R: ReadAt>(src: Windowed<R>) -> io::Result<u64> {
    let len = src.len;
    let mut walk = Walk::new(src);
    loop {
        match walk.next(0, None) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(len - walk.found.ignored_bytes - walk.found.stale_bytes),
            // Shorter than it was (an open vault's device emptied it
            // meanwhile): what was read.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(walk.at),
            Err(e) => return Err(e),
        }
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

/// A journal a daemon left, replayed one record at a time: never more
/// than one record of it in memory, whatever its size.
pub struct Replay {
    /// `None`: there is no journal.
    walk: Option<Walk<File>>,
    /// The store's durable epoch when the replay began.
    epoch: Option<u64>,
}

impl Replay {
    /// Opens the journal at `path` for replay (an empty one if there is
    /// none). A file that is not a regular one, or larger than a journal
    /// ever is, is refused.
    pub fn open(path: &Path) -> io::Result<Replay> {
        let f = match open_existing(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Replay {
                    walk: None,
                    epoch: None,
                });
            }
            Err(e) => return Err(e),
        };
        // On the disk as read before anything is replayed from it: a host
        // that dies after the replay's flush, before the next journal
        // replaced this one, then finds all of it again (replayed again
        // whole, which is harmless), never a part the kernel had not
        // written back (a part of a cycle marked after an unanswered put,
        // replayed alone, would roll later writes back).
        f.sync_all()?;
        let len = f.metadata()?.len();
        Ok(Replay {
            walk: Some(Walk::new(Windowed::new(f, len, REPLAY_WINDOW))),
            epoch: None,
        })
    }

    /// The next record to replay (where its bytes go, and the bytes),
    /// verified under `store`'s integrity key, following the durable
    /// epoch the store had at the first call; `None` once the records
    /// end. An error reading the file is one: the replay stops there
    /// (what it gave so far is a prefix of the journal, which an open
    /// that fails leaves as it is for the next).
    pub fn next(&mut self, store: &ChunkStore) -> io::Result<Option<(u64, &[u8])>> {
        let Some(walk) = &mut self.walk else {
            return Ok(None);
        };
        let epoch = *self.epoch.get_or_insert(store.root().epoch);
        let verify = |how, cycle, at, data: &[u8], mac: &Mac| {
            how == store.chunk_mac() && store.journal_verifies(how, cycle, at, data, mac)
        };
        Ok(walk
            .next(epoch, Some(&verify))?
            .map(|offset| (offset, &walk.data[..])))
    }

    /// What the journal held, and what was replayed (whole once
    /// [`next`](Replay::next) gave `None`).
    pub fn found(&self) -> Found {
        self.walk
            .as_ref()
            .map(|w| w.found.clone())
            .unwrap_or_default()
    }
}

impl Journal {
    /// Opens the journal at `path` empty (mode 0600), its records to
    /// follow `store`'s durable epoch: a new cycle, its end mark at the
    /// beginning, synced (what a [`Replay`] of it gave must have
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

/// The walk as it was written first, over the whole journal in memory
/// (before the replay read a record at a time): the reference the fuzz
/// target holds [`Walk`] to.
#[cfg(any(test, fuzzing))]
fn reference_parse(
    bytes: &[u8],
    epoch: u64,
    verify: impl Fn(ChunkMac, Option<u64>, (u64, u64, u64), &[u8], &Mac) -> bool,
) -> (Found, Vec<Record>) {
    let mut found = Found::default();
    let mut records = Vec::new();
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
            found.replayed += 1;
            found.replayed_bytes += h.len as u64;
            records.push(Record {
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
    (found, records)
}

/// [`held`] as it was first written, a `read` per head (false: could
/// not): the reference for the fuzz target.
#[cfg(any(test, fuzzing))]
fn reference_held(len: u64, read: impl Fn(u64, &mut [u8]) -> bool) -> u64 {
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

/// For the fuzz target: a journal file as the host's disk could hold it,
/// read with every MAC accepted (so that the parsing past it is reached)
/// and then with none: never more records or bytes than there are; read
/// through a window of any size (smaller than a head too), the same
/// records as the first implementation, which held the whole file in
/// memory; and read head by head as a status reads it, which claims what
/// the parse with every MAC accepted took, as the first implementation of
/// that did.
#[doc(hidden)]
#[cfg(any(test, fuzzing))]
pub fn fuzz_journal(data: &[u8]) {
    let epoch = data.first().map_or(0, |b| u64::from(*b % 4));
    let small = 1 + data.get(1).map_or(0, |b| usize::from(*b) % 160);
    check_journal(data, epoch, small);
}

/// [`fuzz_journal`] with the store's epoch and a small window given.
#[cfg(any(test, fuzzing))]
fn check_journal(data: &[u8], epoch: u64, small: usize) {
    let any = |_, _, _, _: &[u8], _: &Mac| true;
    let (all, records) = parse_with(data, epoch, Some(&any), REPLAY_WINDOW);
    let rest = all.ignored_bytes + all.stale_bytes;
    assert!(all.ignored_bytes == 0 || all.stale_bytes == 0);
    let taken = data.len() as u64 - rest;
    let used: usize = records.iter().map(|r| HEAD_V1 + r.data.len()).sum();
    // What was applied and what was left never add up to more than the
    // file (records of an older epoch are the rest).
    assert!(used as u64 + rest <= data.len() as u64);
    assert_eq!(all.replayed, records.len());
    assert_eq!(all.replayed_bytes, (used - HEAD_V1 * records.len()) as u64);
    let reference = reference_parse(data, epoch, |_, _, _, _, _| true);
    assert_eq!((&all, &records), (&reference.0, &reference.1));
    assert_eq!(
        parse_with(data, epoch, Some(&any), small),
        (all, records),
        "window {small}"
    );
    let len = data.len() as u64;
    let read = |at: u64, buf: &mut [u8]| data.read_exact_at(buf, at).is_ok();
    assert_eq!(reference_held(len, read), taken);
    for window in [small, HEADS_WINDOW] {
        let held = held_in(Windowed::new(data, len, window));
        assert_eq!(held.ok(), Some(taken), "window {window}");
    }
    let refuse = |_, _, _, _: &[u8], _: &Mac| false;
    let (none, records) = parse_with(data, epoch, Some(&refuse), small);
    assert!(records.is_empty() && none.older == 0 && none.ahead == 0);
    assert_eq!(none.ignored_bytes, data.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record as the walk sees it: of this cycle or another, its
    /// sequence number as expected or off by some, its epoch (with
    /// [`AFTER_UNCERTAIN`] or not), its length; or an end mark.
    #[derive(Clone, Debug)]
    struct Rec {
        other_cycle: bool,
        seq_off: u8,
        base: u64,
        len: u16,
        end: bool,
    }

    fn rec() -> impl Strategy<Value = Rec> {
        (
            prop::bool::weighted(0.1),
            prop_oneof![4 => Just(0u8), 1 => 1u8..3],
            (0u64..4, prop::bool::weighted(0.3)),
            0u16..3000,
            prop::bool::weighted(0.1),
        )
            .prop_map(|(other_cycle, seq_off, (b, u), len, end)| Rec {
                other_cycle,
                seq_off,
                base: if u { b | AFTER_UNCERTAIN } else { b },
                len,
                end,
            })
    }

    /// The bytes of `recs` as a journal holds them (MACs of zeroes: the
    /// check accepts every MAC), then `tail`.
    fn journal(recs: &[Rec], tail: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, r) in (0u64..).zip(recs) {
            let cycle = if r.other_cycle { 2 } else { 1 };
            let seq = seq + u64::from(r.seq_off);
            let (offset, len) = if r.end { (END, 0) } else { (seq * 4096, r.len) };
            let at = (r.base, seq, offset);
            out.extend_from_slice(&head(ChunkMac::Blake3, cycle, at, u32::from(len), &[0; 32]));
            out.extend((0..len).map(|i| (i % 251) as u8));
        }
        out.extend_from_slice(tail);
        out
    }

    proptest! {
        /// The walk (through windows of every size, as the replay and the
        /// status read the file) takes the very records the first
        /// implementation did, and reads nothing past what it holds.
        #[test]
        fn the_walk_takes_what_the_first_implementation_took(
            recs in prop::collection::vec(rec(), 0..12),
            tail in prop::collection::vec(any::<u8>(), 0..200),
            cut in any::<prop::sample::Index>(),
            epoch in 0u64..4,
            small in 1usize..200,
        ) {
            let bytes = journal(&recs, &tail);
            check_journal(&bytes, epoch, small);
            // Cut anywhere (a torn record, a file shorter than it was).
            let cut = cut.index(bytes.len() + 1);
            check_journal(&bytes[..cut], epoch, small);
        }
    }

    /// A file read through its window comes out as it is, whatever the
    /// sizes of the reads and of the window.
    #[test]
    fn a_window_reads_the_bytes_as_they_are() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        for window in [1, 7, 64, 72, 4096, 1 << 20] {
            let mut w = Windowed::new(&data[..], data.len() as u64, window);
            let mut at = 0usize;
            for n in (0..).map(|k: usize| (k * 37) % 3000).take(40) {
                let n = n.min(data.len() - at);
                let mut buf = vec![0u8; n];
                w.read(at as u64, &mut buf).unwrap();
                assert_eq!(buf, &data[at..at + n], "window {window} at {at} n {n}");
                at = (at + n / 2 + 1) % (data.len() - 3000);
            }
            let mut past = [0u8; 2];
            assert!(w.read(data.len() as u64 - 1, &mut past).is_err());
        }
    }
}

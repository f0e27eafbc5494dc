//! `coffre volume ...`: the LUKS2 volume, without a daemon.

use crate::cli::{PbkdfArgs, PbkdfChoice, Target, VolumeCommand};
use crate::secrets;
use anyhow::{Context, Result, bail};
use coffre::exit;
use coffre_luks2::hash::HashAlg;
use coffre_luks2::header::{DEFAULT_HDR_SIZE, DEFAULT_METADATA_SIZE, FormatOptions};
use coffre_luks2::kdf::{self, BenchTarget, KdfParams};
use coffre_luks2::metadata::SegmentSize;
use coffre_storage::{EncryptedVolume, FormatRequest, Luks2Container, RepairAction};
use serde_json::json;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// Chooses KDF costs for a new keyslot from the flags.
pub fn kdf_params(a: &PbkdfArgs, key_len: usize) -> Result<KdfParams> {
    let p = match (a.pbkdf, a.pbkdf_force_iterations) {
        (PbkdfChoice::Pbkdf2, Some(iterations)) => KdfParams::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations,
        },
        (PbkdfChoice::Pbkdf2, None) => {
            let t = Duration::from_millis(a.iter_time.unwrap_or(2000));
            kdf::benchmark_pbkdf2(HashAlg::Sha256, t, key_len)?
        }
        (PbkdfChoice::Argon2id, Some(time)) => KdfParams::Argon2id {
            time,
            memory_kib: a.pbkdf_memory.unwrap_or(1024 * 1024),
            lanes: a.pbkdf_parallel.unwrap_or_else(kdf::default_lanes),
        },
        (PbkdfChoice::Argon2id, None) => {
            let mut target = BenchTarget {
                ram_bytes: coffre_sys::proc::mem_total_bytes(),
                ..BenchTarget::default()
            };
            if let Some(ms) = a.iter_time {
                target.time = Duration::from_millis(ms);
            }
            if let Some(m) = a.pbkdf_memory {
                target.max_memory_kib = m;
            }
            if let Some(p) = a.pbkdf_parallel {
                target.lanes = p;
            }
            if std::io::stderr().is_terminal() {
                eprintln!(
                    "coffre: benchmarking argon2id for a {} ms unlock...",
                    target.time.as_millis()
                );
            }
            kdf::benchmark_argon2id(target, key_len)?
        }
    };
    p.validate()?;
    Ok(p)
}

fn open(t: &Target) -> Result<Luks2Container> {
    Luks2Container::open(&t.path, t.header.as_deref())
        .with_context(|| format!("opening {}", t.path.display()))
}

fn unlock_volume(
    t: &Target,
    key_file: &std::path::Path,
) -> Result<(Luks2Container, EncryptedVolume)> {
    let c = open(t)?;
    let pass = secrets::passphrase(key_file)?;
    let (_, key) = c.unlock(&pass, None)?;
    let v = c.open_volume(&key)?;
    Ok((c, v))
}

/// Runs a volume subcommand; returns the exit code.
pub fn run(cmd: VolumeCommand) -> Result<u8> {
    match cmd {
        VolumeCommand::Format {
            target,
            size,
            key_file,
            sector_size,
            key_size,
            pbkdf,
            label,
            force,
        } => {
            let pass = secrets::passphrase(&key_file)?;
            let key_len = key_size / 8;
            let params = kdf_params(&pbkdf, key_len)?;
            let req = FormatRequest {
                options: FormatOptions {
                    key_size: key_len,
                    sector_size,
                    kdf: params,
                    digest_iterations: coffre_luks2::digest::benchmark_iterations(HashAlg::Sha256)?,
                    label,
                    subsystem: String::new(),
                    hdr_size: DEFAULT_HDR_SIZE,
                    keyslots_size: DEFAULT_METADATA_SIZE - 2 * DEFAULT_HDR_SIZE,
                    data_offset: 0,
                    segment_size: None,
                },
                data_size: size,
                force,
            };
            let (c, _key) =
                Luks2Container::format(&target.path, target.header.as_deref(), &req, &pass)
                    .with_context(|| format!("formatting {}", target.path.display()))?;
            eprintln!(
                "coffre: formatted {} (LUKS2, uuid {}, {}){}",
                target.path.display(),
                c.header().binary.uuid,
                describe_kdf(&params),
                if c.is_detached() {
                    format!(
                        "; header in {} -- back it up, the data is lost without it",
                        c.header_path().display()
                    )
                } else {
                    String::new()
                }
            );
            Ok(exit::OK)
        }
        VolumeCommand::Dump { target, json } => {
            let c = open(&target)?;
            let v = dump_json(&c)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_dump(&c);
            }
            Ok(exit::OK)
        }
        VolumeCommand::CheckKey {
            target,
            key_file,
            key_slot,
        } => {
            let c = open(&target)?;
            let pass = secrets::passphrase(&key_file)?;
            match c.unlock(&pass, key_slot) {
                Ok((n, _key)) => {
                    eprintln!("coffre: keyslot {n} opens with this passphrase");
                    Ok(exit::OK)
                }
                Err(coffre_storage::Error::Luks2(coffre_luks2::Error::WrongPassphrase)) => {
                    eprintln!("coffre: no keyslot opens with this passphrase");
                    Ok(exit::WRONG_PASSPHRASE)
                }
                Err(e) => Err(e.into()),
            }
        }
        VolumeCommand::AddKey {
            target,
            key_file,
            volume_key_file,
            new_keyfile,
            key_slot,
            priority,
            pbkdf,
        } => {
            let mut paths = vec![new_keyfile.as_path()];
            paths.extend(key_file.as_deref());
            paths.extend(volume_key_file.as_deref());
            secrets::one_stdin(&paths)?;
            let mut c = open(&target)?;
            let key = match (&key_file, &volume_key_file) {
                (Some(k), _) => c.unlock(&secrets::passphrase(k)?, None)?.1,
                (None, Some(vk)) => {
                    let key = secrets::volume_key(vk)?;
                    c.header().verify_volume_key(&key)?;
                    key
                }
                (None, None) => bail!("give --key-file or --volume-key-file"),
            };
            let new = secrets::passphrase(&new_keyfile)?;
            let params = kdf_params(&pbkdf, key.len())?;
            let n = c.add_keyslot(&key, &new, key_slot, params, priority.map(|p| p.value()))?;
            eprintln!("coffre: keyslot {n} added ({})", describe_kdf(&params));
            Ok(exit::OK)
        }
        VolumeCommand::RemoveKey {
            target,
            key_slot,
            key_file,
            force,
        } => {
            let mut c = open(&target)?;
            c.unlock(&secrets::passphrase(&key_file)?, None)?;
            c.remove_keyslot(key_slot, force)?;
            eprintln!("coffre: keyslot {key_slot} removed and its key material wiped");
            Ok(exit::OK)
        }
        VolumeCommand::ChangeKey {
            target,
            key_file,
            new_keyfile,
            key_slot,
            pbkdf,
        } => {
            secrets::one_stdin(&[&key_file, &new_keyfile])?;
            let mut c = open(&target)?;
            let (n, key) = c.unlock(&secrets::passphrase(&key_file)?, key_slot)?;
            let new = secrets::passphrase(&new_keyfile)?;
            let params = kdf_params(&pbkdf, key.len())?;
            c.change_passphrase(n, &key, &new, params)?;
            eprintln!("coffre: keyslot {n} now opens with the new passphrase");
            Ok(exit::OK)
        }
        VolumeCommand::Config {
            target,
            key_slot,
            priority,
        } => {
            let mut c = open(&target)?;
            c.set_priority(key_slot, priority.value())?;
            Ok(exit::OK)
        }
        VolumeCommand::Repair { target, batch_mode } => repair(&target, batch_mode),
        VolumeCommand::Read {
            target,
            key_file,
            offset,
            length,
        } => {
            let (_c, v) = unlock_volume(&target, &key_file)?;
            read_out(&v, offset, length)
        }
        VolumeCommand::Write {
            target,
            key_file,
            offset,
        } => {
            if key_file == std::path::Path::new("-") {
                bail!("standard input carries the data; give the passphrase in a file");
            }
            let (_c, v) = unlock_volume(&target, &key_file)?;
            write_in(&v, offset)
        }
        VolumeCommand::Bench {
            size,
            volume,
            header,
            key_file,
            json,
        } => crate::bench::run(size, volume, header, key_file, json),
    }
}

fn describe_kdf(p: &KdfParams) -> String {
    match p {
        KdfParams::Pbkdf2 { hash, iterations } => {
            format!("pbkdf2-{} with {iterations} iterations", hash.name())
        }
        KdfParams::Argon2id {
            time,
            memory_kib,
            lanes,
        } => format!("argon2id: {time} passes, {memory_kib} KiB, {lanes} lanes"),
    }
}

fn repair(target: &Target, batch: bool) -> Result<u8> {
    let mut c = open(target)?;
    let plan = c.repair_plan();
    let what = match &plan {
        RepairAction::NothingToDo => {
            eprintln!("coffre: both header copies are valid; nothing to repair");
            return Ok(exit::OK);
        }
        RepairAction::RewrotePrimary(why) => {
            format!(
                "the primary header copy is {why}; it will be rewritten from the secondary copy"
            )
        }
        RepairAction::RewroteSecondary(why) => {
            format!(
                "the secondary header copy is {why}; it will be rewritten from the primary copy"
            )
        }
    };
    eprintln!("coffre: {what}");
    if !batch {
        if !std::io::stdin().is_terminal() {
            bail!("not a terminal: re-run with --batch-mode to repair");
        }
        eprint!("Type 'yes' to repair: ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if line.trim() != "yes" {
            eprintln!("coffre: nothing written");
            return Ok(exit::FAILURE);
        }
    }
    c.repair()?;
    eprintln!("coffre: repaired; both header copies are valid");
    Ok(exit::OK)
}

/// What each worker reads and decrypts (or encrypts and writes) at a time:
/// large enough that system calls cost nothing, small enough that the
/// bytes are still in the core's cache when the cipher runs over them.
const IO_CHUNK: usize = 1 << 20;

/// One worker per core (two at least, so reading and writing overlap with
/// the cipher even on one core; four at most).
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Standard output or input as a plain file: no line buffering, and
/// usable from several threads.
fn std_file(fd: std::os::fd::BorrowedFd<'_>) -> Result<std::fs::File> {
    Ok(std::fs::File::from(fd.try_clone_to_owned()?))
}

struct Progress {
    total: u64,
    done: u64,
    last: Instant,
    start: Instant,
    show: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        Self {
            total,
            done: 0,
            last: Instant::now(),
            start: Instant::now(),
            show: std::io::stderr().is_terminal() && total > 64 << 20,
        }
    }
    fn add(&mut self, n: u64) {
        self.done += n;
        if self.show && self.last.elapsed() > Duration::from_millis(200) {
            self.last = Instant::now();
            let mib = self.done as f64 / 1048576.0;
            let rate = mib / self.start.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\r{:5.1}%  {mib:.0} MiB  {rate:.0} MiB/s ",
                100.0 * self.done as f64 / self.total.max(1) as f64
            );
        }
    }
    fn finish(&self) {
        if self.show {
            eprintln!();
        }
    }
}

/// The output side of `volume read`: chunk k goes out after chunk k - 1.
struct Output {
    out: std::fs::File,
    next: u64,
    stop: bool,
    error: Option<anyhow::Error>,
    progress: Progress,
}

/// `volume read`: every core reads and decrypts its own chunks; the
/// chunks go to standard output in order as they are ready.
fn read_out(v: &EncryptedVolume, offset: u64, length: Option<u64>) -> Result<u8> {
    use std::os::fd::AsFd;
    let size = v.size();
    if offset > size {
        bail!("--offset {offset} is past the end of the volume ({size} bytes)");
    }
    let end = match length {
        Some(l) => offset
            .checked_add(l)
            .filter(|e| *e <= size)
            .with_context(|| {
                format!("--offset + --length goes past the end of the volume ({size} bytes)")
            })?,
        None => size,
    };
    let ss = v.sector_size() as u64;
    let first = offset / ss * ss;
    let last = (end.div_ceil(ss) * ss).min(size);
    let chunk = IO_CHUNK as u64;
    let chunks = (last - first).div_ceil(chunk);
    let shared = std::sync::Mutex::new(Output {
        out: std_file(std::io::stdout().as_fd())?,
        next: 0,
        stop: false,
        error: None,
        progress: Progress::new(end - offset),
    });
    let turn = std::sync::Condvar::new();
    let taken = std::sync::atomic::AtomicU64::new(0);
    let work = || {
        // A worker that panics stops the others (they would wait for its
        // chunk forever); the scope then passes the panic on.
        let _stop = StopOnPanic {
            shared: &shared,
            turn: &turn,
        };
        // Plaintext: wiped when the worker ends.
        let mut buf = zeroize::Zeroizing::new(vec![0u8; IO_CHUNK]);
        loop {
            let k = taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k >= chunks {
                return;
            }
            let pos = first + k * chunk;
            let n = usize::try_from((last - pos).min(chunk)).expect("bounded by the chunk");
            let read = v.read_at_here(pos, &mut buf[..n]);
            let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
            while g.next != k && !g.stop {
                g = turn.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if g.stop {
                return;
            }
            let from = usize::try_from(offset.saturating_sub(pos)).expect("within the chunk");
            let to = usize::try_from((end - pos).min(n as u64)).expect("within the chunk");
            let written = read
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(g.out.write_all(&buf[from..to])?));
            match written {
                Ok(()) => {
                    g.progress.add((to - from) as u64);
                    g.next += 1;
                }
                Err(e) => {
                    g.stop = true;
                    // A reader that went away (`| head`) is not an error.
                    let gone = e
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
                    if !gone {
                        g.error = Some(e);
                    }
                }
            }
            turn.notify_all();
        }
    };
    run_workers(work);
    let g = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = g.error {
        return Err(e);
    }
    g.progress.finish();
    Ok(exit::OK)
}

/// Sets `stop` and wakes every waiting worker when a worker of
/// `volume read` unwinds.
struct StopOnPanic<'a> {
    shared: &'a std::sync::Mutex<Output>,
    turn: &'a std::sync::Condvar,
}

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
            self.turn.notify_all();
        }
    }
}

/// Runs `work` on every worker thread and waits for them all.
fn run_workers(work: impl Fn() + Sync) {
    std::thread::scope(|s| {
        for _ in 0..workers() {
            s.spawn(&work);
        }
    });
}

fn fill(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The input side of `volume write`: whoever holds it reads the next chunk.
struct Input {
    input: std::fs::File,
    pos: u64,
    done: bool,
    error: Option<anyhow::Error>,
    progress: Progress,
}

/// `volume write`: each core takes its turn reading the next chunk of
/// standard input into its own buffer, then encrypts it in place and
/// writes it while another core reads. (Measured: one writer fed by the
/// other cores lost to this, its buffers crossing between cores' caches;
/// one thread alone leaves the cipher's time uncovered.)
fn write_in(v: &EncryptedVolume, offset: u64) -> Result<u8> {
    use std::os::fd::AsFd;
    let size = v.size();
    let ss = v.sector_size();
    let ss64 = ss as u64;
    let mut input = std_file(std::io::stdin().as_fd())?;
    let mut pos = offset;
    let mut progress = Progress::new(size.saturating_sub(offset));
    // Unaligned head: read-modify-write the first sector.
    if !pos.is_multiple_of(ss64) {
        let mut buf = zeroize::Zeroizing::new(vec![0u8; ss]);
        let mut sector = zeroize::Zeroizing::new(vec![0u8; ss]);
        let base = pos / ss64 * ss64;
        let skip = usize::try_from(pos - base).expect("below sector size");
        let want = ss - skip;
        let n = fill(&mut input, &mut buf[..want])?;
        if n > 0 {
            v.read_at(base, &mut sector)?;
            sector[skip..skip + n].copy_from_slice(&buf[..n]);
            v.write_at(base, &sector)?;
            pos += n as u64;
            progress.add(n as u64);
        }
        if n < want {
            v.flush()?;
            return Ok(exit::OK);
        }
    }
    let shared = std::sync::Mutex::new(Input {
        input,
        pos,
        done: false,
        error: None,
        progress,
    });
    let fail = |e: anyhow::Error| {
        let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
        g.done = true;
        g.error.get_or_insert(e);
    };
    let work = || {
        // Plaintext, then ciphertext: wiped when the worker ends.
        let mut buf = zeroize::Zeroizing::new(vec![0u8; IO_CHUNK]);
        let mut sector = zeroize::Zeroizing::new(vec![0u8; ss]);
        loop {
            let (pos, n) = {
                let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
                if g.done {
                    return;
                }
                let n = match fill(&mut g.input, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        g.done = true;
                        g.error.get_or_insert(e.into());
                        return;
                    }
                };
                g.done = n < buf.len();
                if n == 0 {
                    return;
                }
                if g.pos + n as u64 > size {
                    g.done = true;
                    let e = anyhow::anyhow!(
                        "the input runs past the end of the volume ({size} bytes): nothing from the chunk that crosses it on was written; the {} bytes before that chunk were (unless another error follows)",
                        g.pos - offset
                    );
                    g.error.get_or_insert(e);
                    return;
                }
                let at = g.pos;
                g.pos += n as u64;
                g.progress.add(n as u64);
                (at, n)
            };
            let whole = n / ss * ss;
            let mut done = v
                .seal(pos, &mut buf[..whole])
                .and_then(|()| v.write_sealed(pos, &buf[..whole]));
            if done.is_ok() && whole < n {
                // Unaligned tail: read-modify-write the last sector.
                let tail = pos + whole as u64;
                done = v.read_at_here(tail, &mut sector).and_then(|()| {
                    sector[..n - whole].copy_from_slice(&buf[whole..n]);
                    v.seal(tail, &mut sector)?;
                    v.write_sealed(tail, &sector)
                });
            }
            if let Err(e) = done {
                return fail(e.into());
            }
        }
    };
    run_workers(work);
    let g = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = g.error {
        return Err(e);
    }
    v.flush()?;
    g.progress.finish();
    Ok(exit::OK)
}

fn copy_state(s: &coffre_luks2::CopyState) -> serde_json::Value {
    match s {
        coffre_luks2::CopyState::Valid { seqid } => json!({"state": "valid", "seqid": seqid}),
        coffre_luks2::CopyState::Stale { seqid } => json!({"state": "stale", "seqid": seqid}),
        coffre_luks2::CopyState::Damaged(why) => json!({"state": "damaged", "reason": why}),
    }
}

fn dump_json(c: &Luks2Container) -> Result<serde_json::Value> {
    let h = c.header();
    let seg = h.segment()?;
    let (p, s) = c.copies();
    let keyslots: Vec<serde_json::Value> = h
        .metadata
        .keyslots
        .iter()
        .map(|(id, k)| {
            let kdf = serde_json::to_value(&k.kdf).unwrap_or_default();
            json!({
                "id": id.0,
                "key_bits": k.key_size * 8,
                "priority": match k.priority() { 0 => "ignore", 2 => "prefer", _ => "normal" },
                "kdf": kdf,
                "af": {"stripes": k.af.stripes, "hash": k.af.hash},
                "area": {"offset": k.area.offset.0, "size": k.area.size.0, "encryption": k.area.encryption},
            })
        })
        .collect();
    Ok(json!({
        "version": 2,
        "uuid": h.binary.uuid,
        "label": h.binary.label,
        "subsystem": h.binary.subsystem,
        "seqid": h.binary.seqid,
        "header_size": h.binary.hdr_size,
        "metadata_size": h.layout().metadata_end(),
        "detached_header": c.is_detached(),
        "header_path": c.header_path(),
        "copies": {"primary": copy_state(p), "secondary": copy_state(s)},
        "data_segment": {
            "offset": seg.offset.0,
            "size": match seg.size { SegmentSize::Dynamic => json!("dynamic"), SegmentSize::Bytes(n) => json!(n) },
            "sector_size": seg.sector_size,
            "iv_tweak": seg.iv_tweak.0,
            "encryption": seg.encryption,
            "key_bits": h.key_size()? * 8,
        },
        "keyslots": keyslots,
        "tokens": h.metadata.tokens.iter().map(|(id, t)| (id.0.to_string(), t.clone())).collect::<serde_json::Map<_, _>>(),
        "config": serde_json::to_value(&h.metadata.config)?,
    }))
}

fn print_dump(c: &Luks2Container) {
    let h = c.header();
    let (p, s) = c.copies();
    println!("LUKS header information");
    println!("Version:       \t2");
    println!("Epoch:         \t{}", h.binary.seqid);
    println!("Metadata area: \t{} [bytes]", h.binary.hdr_size - 4096);
    println!(
        "Keyslots area: \t{} [bytes]",
        h.metadata.config.keyslots_size.0
    );
    println!("UUID:          \t{}", h.binary.uuid);
    println!(
        "Label:         \t{}",
        if h.binary.label.is_empty() {
            "(no label)"
        } else {
            &h.binary.label
        }
    );
    println!(
        "Header:        \t{}{}",
        c.header_path().display(),
        if c.is_detached() { " (detached)" } else { "" }
    );
    println!("Header copies: \t{}", coffre_storage_describe(p, s));
    if let Ok(seg) = h.segment() {
        println!("\nData segment:");
        println!("\toffset: {} [bytes]", seg.offset.0);
        match seg.size {
            SegmentSize::Dynamic => println!("\tlength: (whole device)"),
            SegmentSize::Bytes(n) => println!("\tlength: {n} [bytes]"),
        }
        println!("\tcipher: {}", seg.encryption);
        println!("\tsector: {} [bytes]", seg.sector_size);
        if let Ok(k) = h.key_size() {
            println!("\tkey:    {} bits", k * 8);
        }
    }
    println!("\nKeyslots:");
    for (id, k) in &h.metadata.keyslots {
        println!("  {}: luks2", id.0);
        println!("\tKey:        {} bits", k.key_size * 8);
        println!(
            "\tPriority:   {}",
            match k.priority() {
                0 => "ignore",
                2 => "prefer",
                _ => "normal",
            }
        );
        match k.kdf() {
            Ok(coffre_luks2::kdf::Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                lanes,
                ..
            }) => {
                println!("\tPBKDF:      {}", variant.name());
                println!("\tTime cost:  {time}");
                println!("\tMemory:     {memory_kib}");
                println!("\tThreads:    {lanes}");
            }
            Ok(coffre_luks2::kdf::Kdf::Pbkdf2 {
                hash, iterations, ..
            }) => {
                println!("\tPBKDF:      pbkdf2");
                println!("\tHash:       {}", hash.name());
                println!("\tIterations: {iterations}");
            }
            Err(e) => println!("\tPBKDF:      ({e})"),
        }
        println!("\tAF stripes: {} ({})", k.af.stripes, k.af.hash);
        println!("\tArea offset:{} [bytes]", k.area.offset.0);
        println!("\tArea length:{} [bytes]", k.area.size.0);
    }
    println!("Tokens:");
    for (id, t) in &h.metadata.tokens {
        println!(
            "  {}: {}",
            id.0,
            t.get("type").and_then(|v| v.as_str()).unwrap_or("?")
        );
    }
}

fn coffre_storage_describe(p: &coffre_luks2::CopyState, s: &coffre_luks2::CopyState) -> String {
    let one = |c: &coffre_luks2::CopyState| match c {
        coffre_luks2::CopyState::Valid { seqid } => format!("valid (seqid {seqid})"),
        coffre_luks2::CopyState::Stale { seqid } => format!("STALE (seqid {seqid})"),
        coffre_luks2::CopyState::Damaged(why) => format!("DAMAGED ({why})"),
    };
    format!("primary {}, secondary {}", one(p), one(s))
}

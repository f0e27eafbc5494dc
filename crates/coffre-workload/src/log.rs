//! A workload's output: one pipe for stdout and stderr, pumped by a
//! thread into the log file. A project workload's log lives inside the
//! volume, so the file is closed when the vault closes (it must not keep
//! the data busy) and reopened when it opens; what arrives in between is
//! kept in memory, up to a bound.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Output kept in memory while the log file is closed.
const PENDING_MAX: usize = 1 << 20;
/// A log file larger than this is renamed to `NAME.log.1` at the next
/// reopen.
const ROTATE_AT: u64 = 16 << 20;

#[derive(Default)]
struct Inner {
    file: Option<File>,
    pending: VecDeque<u8>,
    dropped: u64,
}

/// Where a workload's output goes.
#[derive(Clone, Default)]
pub struct Sink(Arc<Mutex<Inner>>);

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (or reopens) the log file, writing what waited in memory.
    pub fn attach(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::metadata(path).is_ok_and(|m| m.len() > ROTATE_AT) {
            let mut old = path.as_os_str().to_owned();
            old.push(".1");
            let _ = std::fs::rename(path, PathBuf::from(old));
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let mut g = self.lock();
        if g.dropped > 0 {
            let _ = writeln!(
                f,
                "[coffre: {} bytes of output were dropped while the vault was closed]",
                g.dropped
            );
            g.dropped = 0;
        }
        let (a, b) = g.pending.as_slices();
        f.write_all(a)?;
        f.write_all(b)?;
        g.pending.clear();
        g.file = Some(f);
        Ok(())
    }

    /// Closes the log file (the vault is closing).
    pub fn detach(&self) {
        let mut g = self.lock();
        if let Some(f) = g.file.take() {
            let _ = f.sync_data();
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut g = self.lock();
        if let Some(f) = g.file.as_mut()
            && f.write_all(bytes).is_ok()
        {
            return;
        }
        let room = PENDING_MAX.saturating_sub(g.pending.len());
        let take = bytes.len().min(room);
        g.pending.extend(&bytes[..take]);
        g.dropped += (bytes.len() - take) as u64;
    }

    /// Pumps `pipe` into the sink until every writer has closed it.
    pub fn pump(&self, mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<()> {
        let sink = self.clone();
        std::thread::Builder::new()
            .name("coffre-workload-log".into())
            .spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => sink.push(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
            .unwrap_or_else(|_| std::thread::spawn(|| {}))
    }
}

/// The last `max` bytes of a log file (starting at a line boundary when
/// one is in reach).
pub fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    if start > 0
        && let Some(i) = out.iter().position(|&b| b == b'\n')
    {
        out.drain(..=i);
    }
    Ok(out)
}

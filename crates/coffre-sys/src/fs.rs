//! Files written so that a crash leaves either the old or the new content,
//! and small files read without following a link or reading without end.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` crash-safely: a temporary file beside it
/// (`NAME.tmpPID`, created with `mode`), fsync, rename over `path`, fsync
/// of the directory. Errors say which step failed on which file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ctx = |what: &str, p: &Path| {
        let p = p.display().to_string();
        let what = what.to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {p}: {e}"))
    };
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(ctx("create", &tmp))?;
        f.write_all(bytes).map_err(ctx("write", &tmp))?;
        f.sync_all().map_err(ctx("sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(ctx("rename", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx("sync", dir))?;
    Ok(())
}

/// The content of `path` if it is a regular file (not followed if it is
/// a symbolic link) of at most `max` bytes; an error otherwise.
pub fn read_small(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", path.display()),
        ));
    }
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} grew past {max} bytes", path.display()),
        ));
    }
    Ok(out)
}

/// Bytes an unprivileged writer may still use on the filesystem holding
/// `path` (`statvfs`: available blocks times the fragment size).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated string and `st` a writable statvfs,
    // both alive for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// For fuzz targets that work on real files: the directory
/// `$TMPDIR/coffre-fuzz-KIND-PID`, made empty, after removing those of
/// processes gone (libFuzzer ends with `exit()`: nothing of theirs runs
/// then to clean up). Only in fuzz and test builds.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub fn fuzz_workdir(kind: &str) -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    let prefix = format!("coffre-fuzz-{kind}-");
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(&prefix)
            && !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory for the fuzz target");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_content_with_the_mode_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("coffre-sys-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.toml");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let e = write_atomic(&dir.join("no/such/dir"), b"", 0o600).unwrap_err();
        assert!(e.to_string().starts_with("create "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_a_small_regular_file_and_refuses_links_fifos_and_big_ones() {
        let dir = std::env::temp_dir().join(format!("coffre-sys-small-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.json");
        std::fs::write(&p, b"{}").unwrap();
        assert_eq!(read_small(&p, 2).unwrap(), b"{}");
        assert!(read_small(&p, 1).is_err());
        std::os::unix::fs::symlink(&p, dir.join("link")).unwrap();
        assert!(read_small(&dir.join("link"), 100).is_err());
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = read_small(&dir.join("fifo"), 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

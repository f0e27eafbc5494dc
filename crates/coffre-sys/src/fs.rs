//! Files written so that a crash leaves either the old or the new content.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
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
}

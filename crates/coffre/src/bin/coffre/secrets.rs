//! Reading secrets: from files or standard input, never from argv.

use anyhow::{Context, Result, bail};
use coffre_luks2::{Passphrase, SecretBytes, VolumeKey};
use std::io::Read;
use std::path::Path;

/// cryptsetup's default limit for key files.
const MAX_KEY_FILE: u64 = 8 * 1024 * 1024;

fn read_secret(path: &Path) -> Result<SecretBytes> {
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_KEY_FILE + 1)
            .read_to_end(&mut buf)
            .context("reading the passphrase from standard input")?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("opening key file {}", path.display()))?
            .take(MAX_KEY_FILE + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading key file {}", path.display()))?;
    }
    let s = SecretBytes::from_vec(buf);
    if s.len() as u64 > MAX_KEY_FILE {
        bail!("key file {} is larger than 8 MiB", path.display());
    }
    if s.is_empty() {
        bail!("key file {} is empty", path.display());
    }
    Ok(s)
}

/// Reads a passphrase file.
pub fn passphrase(path: &Path) -> Result<Passphrase> {
    Ok(Passphrase::new(read_secret(path)?))
}

/// Reads a raw volume key file.
pub fn volume_key(path: &Path) -> Result<VolumeKey> {
    Ok(VolumeKey::new(read_secret(path)?))
}

/// Refuses two secrets from the same standard input.
pub fn one_stdin(paths: &[&Path]) -> Result<()> {
    if paths.iter().filter(|p| **p == Path::new("-")).count() > 1 {
        bail!("only one secret can come from standard input");
    }
    Ok(())
}

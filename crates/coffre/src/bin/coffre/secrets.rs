//! Reading secrets: from files or standard input, never from argv.

use anyhow::{Context, Result, bail};
use coffre_luks2::{Passphrase, SecretBytes, VolumeKey};
use std::io::Read;
use std::path::Path;

/// cryptsetup's default limit for key files.
const MAX_KEY_FILE: u64 = 8 * 1024 * 1024;

/// All of `r` (up to `limit` and a little more), in a buffer that grows
/// without leaving copies behind: each outgrown buffer is wiped (where
/// `read_to_end` would leave every reallocation's old bytes in freed
/// memory).
fn read_wiped(mut r: impl Read, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 4096]);
    let mut n = 0;
    loop {
        if n == buf.len() {
            if n as u64 > limit {
                break;
            }
            let mut bigger = zeroize::Zeroizing::new(vec![0u8; buf.len() * 2]);
            bigger[..n].copy_from_slice(&buf[..n]);
            buf = bigger;
        }
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(std::mem::take(&mut *buf))
}

fn read_secret(path: &Path) -> Result<SecretBytes> {
    let buf = if path == Path::new("-") {
        read_wiped(std::io::stdin().take(MAX_KEY_FILE + 1), MAX_KEY_FILE)
            .context("reading the passphrase from standard input")?
    } else {
        let f = std::fs::File::open(path)
            .with_context(|| format!("opening key file {}", path.display()))?;
        read_wiped(f.take(MAX_KEY_FILE + 1), MAX_KEY_FILE)
            .with_context(|| format!("reading key file {}", path.display()))?
    };
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

#[cfg(test)]
mod tests {
    use super::read_wiped;

    #[test]
    fn secrets_are_read_whole_across_growth() {
        for len in [0, 1, 4095, 4096, 4097, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            // A reader that gives 1000 bytes at a time, as a pipe may.
            let r = std::io::Read::chain(&data[..len.min(1000)], &data[len.min(1000)..]);
            assert_eq!(read_wiped(r, 1 << 20).unwrap(), data, "{len}");
        }
        let big = vec![7u8; 50_000];
        assert!(
            read_wiped(&big[..], 10_000).unwrap().len() > 10_000,
            "past the limit: said"
        );
    }
}

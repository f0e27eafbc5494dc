//! Moving a volume's ciphertext onto a store and back: what `coffre
//! storage migrate` and `coffre storage export` are made of.
//!
//! - [`import`] copies a local data segment into a fresh or partly filled
//!   volume on a store, chunk by chunk, several in flight, with a flush
//!   (a manifest) every so often: interrupted, it is run again and skips
//!   every chunk the store already holds with the same bytes (checked by
//!   MAC, so a resumed import is also a verified one). Chunks of zeros are
//!   not stored: they read back as zeros.
//! - [`export`] writes the store's chunks, each verified, into a local
//!   file: a plain LUKS2 data segment again, byte for byte what the local
//!   volume would hold, readable by cryptsetup with the detached header.

use crate::RemoteError;
use crate::store::{ChunkStore, IN_FLIGHT};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// How many chunks an import writes between two manifests.
pub const CHUNKS_PER_FLUSH: u64 = 256;

/// What an import did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Chunks uploaded.
    pub uploaded: u64,
    /// Chunks the store already had with these bytes (a resumed import).
    pub already: u64,
    /// Chunks of zeros (not stored).
    pub zero: u64,
}

fn io(what: &str, e: std::io::Error) -> RemoteError {
    RemoteError::Config(format!("{what}: {e}"))
}

/// Copies `source` (a local data segment the size of the volume) into
/// `store`, calling `progress(done, total)` in chunks. Returns what it did
/// and leaves everything flushed.
pub async fn import(
    store: &mut ChunkStore,
    source: &File,
    mut progress: impl FnMut(u64, u64),
) -> Result<Imported, RemoteError> {
    let g = store.geometry();
    let len = source.metadata().map_err(|e| io("the source", e))?.len();
    if len != g.size {
        return Err(RemoteError::Config(format!(
            "the source is {len} bytes and the volume {} bytes: they must be the same size",
            g.size
        )));
    }
    let total = g.chunks();
    let mut done = Imported::default();
    let mut batch = Vec::new();
    let mut since_flush = 0u64;
    for index in 0..total {
        let mut data = vec![0u8; g.chunk_len(index)];
        source
            .read_exact_at(&mut data, index * u64::from(g.chunk_size))
            .map_err(|e| io("reading the source", e))?;
        if store.holds(index, &data) {
            done.already += 1;
        } else if data.iter().all(|b| *b == 0) && store.is_empty_chunk(index) {
            done.zero += 1;
        } else {
            batch.push((index, data));
        }
        if batch.len() >= IN_FLIGHT || index + 1 == total {
            let n = batch.len() as u64;
            store.write_chunks(std::mem::take(&mut batch)).await?;
            done.uploaded += n;
            since_flush += n;
            if since_flush >= CHUNKS_PER_FLUSH {
                store.flush().await?;
                since_flush = 0;
            }
        }
        progress(index + 1, total);
    }
    store.flush().await?;
    Ok(done)
}

/// Writes the volume on `store` into `out` (created or truncated to the
/// volume's size), every chunk verified; chunks never written stay holes.
pub async fn export(
    store: &ChunkStore,
    out: &File,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), RemoteError> {
    let g = store.geometry();
    out.set_len(0).map_err(|e| io("the export", e))?;
    out.set_len(g.size).map_err(|e| io("the export", e))?;
    let total = g.chunks();
    let mut index = 0;
    while index < total {
        let end = (index + IN_FLIGHT as u64).min(total);
        let reads: Vec<_> = (index..end)
            .filter(|i| !store.is_empty_chunk(*i))
            .map(|i| async move { (i, store.read_chunk(i).await) })
            .collect();
        for (i, data) in futures::future::join_all(reads).await {
            out.write_all_at(&data?, i * u64::from(g.chunk_size))
                .map_err(|e| io("writing the export", e))?;
        }
        progress(end, total);
        index = end;
    }
    out.sync_all().map_err(|e| io("the export", e))?;
    Ok(())
}

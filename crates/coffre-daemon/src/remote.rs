//! The volume on a remote store (`[storage]`; docs/storage.md): the block
//! device the engine runs over, built once the volume key is known (the
//! integrity key is sealed under it), and the store made at `init`.

use crate::vaultdir::{StorageConfig, VaultDir, write_atomic};
use coffre_luks2::VolumeKey;
use coffre_remote::{ChunkStore, Geometry, IntegrityKey, RemoteDevice, RemoteError, Root};
use coffre_storage::BlockDevice;
use std::sync::Arc;

/// The vault's id on the store: its LUKS2 header's UUID.
pub fn vault_id(uuid: &str) -> [u8; 16] {
    let hex: String = uuid.chars().filter(char::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    id
}

fn objects(
    c: &StorageConfig,
    vd: &VaultDir,
) -> Result<(Arc<dyn coffre_remote::Objects>, String), RemoteError> {
    let creds = c
        .credentials_file
        .as_ref()
        .map(|f| coffre_remote::s3::Credentials::load(&vd.root.join(f)))
        .transpose()?;
    coffre_remote::s3::open(
        &coffre_remote::s3::S3Settings {
            url: c.url.clone(),
            endpoint: c.endpoint.clone(),
            region: c.region.clone(),
            allow_http: c.allow_http,
        },
        creds.as_ref(),
    )
}

fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RemoteError::Config(format!("a runtime: {e}")))
}

fn keep_root(vd: &VaultDir) -> coffre_remote::device::OnRoot {
    let path = vd.storage_root();
    Box::new(move |root: Root| {
        write_atomic(&path, root.to_line().as_bytes(), 0o600)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
}

/// Makes the store for a new vault (`init`): checks it honours
/// conditional writes, writes the empty manifest, keeps the sealed
/// integrity key and the root in the control directory. Returns the
/// device the filesystem is made on.
pub fn create(
    c: &StorageConfig,
    vd: &VaultDir,
    key: &VolumeKey,
    uuid: &str,
    size: u64,
) -> Result<Arc<dyn BlockDevice>, RemoteError> {
    let (objects, prefix) = objects(c, vd)?;
    let vault = vault_id(uuid);
    let ikey = IntegrityKey::generate()?;
    let sealed = ikey.seal(key.expose(), &vault)?;
    let io = |e: crate::vaultdir::DirError| RemoteError::Config(e.to_string());
    write_atomic(&vd.storage_key(), &sealed, 0o600).map_err(io)?;
    let g = Geometry::new(c.chunk_size, size)?;
    let (store, root) =
        runtime()?.block_on(ChunkStore::create(objects, &prefix, vault, ikey, g))?;
    write_atomic(&vd.storage_root(), root.to_line().as_bytes(), 0o600).map_err(io)?;
    let cache = usize::try_from(c.cache_size).unwrap_or(usize::MAX);
    let dev = RemoteDevice::new(store, cache, keep_root(vd))
        .map_err(|e| RemoteError::Config(e.to_string()))?;
    Ok(Arc::new(dev))
}

/// Opens the store at an open of the vault: the manifest and every page
/// verified, its epoch checked against the root the control directory
/// keeps (an older one is a rollback: the open fails). Returns the device
/// and how many epochs the store was ahead (1 after a crash between a
/// manifest and its root; more: another writer with the vault's keys).
pub fn open(
    c: &StorageConfig,
    vd: &VaultDir,
    key: &VolumeKey,
    uuid: &str,
) -> Result<(Arc<dyn BlockDevice>, u64), RemoteError> {
    let (objects, prefix) = objects(c, vd)?;
    let vault = vault_id(uuid);
    let sealed = std::fs::read(vd.storage_key()).map_err(|e| {
        RemoteError::Config(format!(
            "{}: {e} (the sealed integrity key: restore it from the control directory's backup)",
            vd.storage_key().display()
        ))
    })?;
    let ikey = IntegrityKey::unseal(&sealed, key.expose(), &vault)?;
    let local = match std::fs::read_to_string(vd.storage_root()) {
        Ok(text) => Some(Root::from_line(&text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(RemoteError::Config(format!("the storage root: {e}"))),
    };
    let (store, opened) = runtime()?.block_on(ChunkStore::open(
        objects, &prefix, vault, ikey, local, false,
    ))?;
    let cache = usize::try_from(c.cache_size).unwrap_or(usize::MAX);
    let dev = RemoteDevice::new(store, cache, keep_root(vd))
        .map_err(|e| RemoteError::Config(e.to_string()))?;
    if opened.ahead_by > 0 {
        // The store's newer root becomes the local one now.
        keep_root(vd)(opened.root).map_err(|e| RemoteError::Config(e.to_string()))?;
    }
    Ok((Arc::new(dev), opened.ahead_by))
}

#[cfg(test)]
mod tests {
    #[test]
    fn vault_ids_come_from_the_uuid() {
        assert_eq!(
            super::vault_id("01234567-89ab-cdef-0123-456789abcdef"),
            [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]
        );
    }
}

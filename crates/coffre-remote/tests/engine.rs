//! The LUKS2 engine over the remote block device: a detached header (as a
//! vault has), its data segment on the in-memory object store. The
//! ciphertext the store holds is, byte for byte, what the same writes make
//! in a local data file; the plaintext reads back after a reopen.

use coffre_luks2::cipher::Provider;
use coffre_remote::{ChunkStore, Geometry, IntegrityKey, ObjectStoreObjects, RemoteDevice};
use coffre_storage::BlockDevice;
use object_store::memory::InMemory;
use std::sync::{Arc, Mutex};

const VAULT: [u8; 16] = *b"engine-vault-id1";
const SIZE: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i % 253).unwrap()))
        .collect()
}

#[test]
fn the_engine_over_the_store_writes_what_a_local_file_would_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (container, key) = coffre_testkit::volume::scratch_volume(dir.path(), SIZE);
    let local = container.open_volume(&key).unwrap();
    let mem = Arc::new(InMemory::new());
    let objects: Arc<dyn coffre_remote::Objects> = Arc::new(ObjectStoreObjects::new(mem.clone()));
    // The integrity key, sealed under the volume key as the control
    // directory keeps it.
    let sealed = IntegrityKey::generate()
        .unwrap()
        .seal(key.expose(), &VAULT)
        .unwrap();
    let ikey = || IntegrityKey::unseal(&sealed, key.expose(), &VAULT).unwrap();
    let g = Geometry::new(65536, SIZE).unwrap();
    let store = rt()
        .block_on(ChunkStore::create(objects.clone(), "v", VAULT, ikey(), g))
        .unwrap()
        .0;
    let root = Arc::new(Mutex::new(store.root()));
    let r = root.clone();
    let dev = Arc::new(
        RemoteDevice::new(
            store,
            4 * 65536,
            Box::new(move |new| {
                *r.lock().unwrap() = new;
                Ok(())
            }),
        )
        .unwrap(),
    );
    let remote = container
        .open_volume_over(&key, dev.clone() as Arc<dyn BlockDevice>, Provider::Auto)
        .unwrap();
    assert_eq!(remote.size(), local.size());
    // The same plaintext writes on both: aligned, across chunks, spanning
    // the buffer's size.
    for (off, len, seed) in [
        (0u64, 4096usize, 1u8),
        (61440, 8192, 2),
        (200_704, 400_000 - 400_000 % 4096, 3),
        (SIZE - 4096, 4096, 4),
    ] {
        let data = pattern(len, seed);
        local.write_at(off, &data).unwrap();
        remote.write_at(off, &data).unwrap();
    }
    local.flush().unwrap();
    remote.flush().unwrap();
    // The store's ciphertext is the local file's.
    let kept = *root.lock().unwrap();
    let rt = rt();
    let (reopened, _) = rt
        .block_on(ChunkStore::open(
            objects.clone(),
            "v",
            VAULT,
            ikey(),
            Some(kept),
            false,
        ))
        .unwrap();
    let out = dir.path().join("export.img");
    rt.block_on(coffre_remote::transfer::export(
        &reopened,
        &std::fs::File::create(&out).unwrap(),
        |_, _| (),
    ))
    .unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(dir.path().join("volume.img")).unwrap());
    // Reopened, the plaintext reads back through the engine.
    let dev2 = Arc::new(RemoteDevice::new(reopened, 1 << 20, Box::new(|_| Ok(()))).unwrap());
    let again = container
        .open_volume_over(&key, dev2 as Arc<dyn BlockDevice>, Provider::Auto)
        .unwrap();
    let mut buf = vec![0u8; 8192];
    again.read_at(61440, &mut buf).unwrap();
    assert!(buf == pattern(8192, 2));
    // Another key does not open it.
    let wrong = coffre_luks2::VolumeKey::new(coffre_luks2::SecretBytes::random(64));
    assert!(
        container
            .open_volume_over(&wrong, dev as Arc<dyn BlockDevice>, Provider::Auto)
            .is_err()
    );
}

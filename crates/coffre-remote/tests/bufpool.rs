//! The remote device reuses its chunk buffers (`coffre_remote::bufpool`):
//! the chunks it drops from its buffer serve the NBD client's next reads
//! and its next whole-chunk writes, instead of fresh blocks that the kernel
//! faults in and zeroes page by page. A test binary of its own: the pool is
//! the process's, and other tests running beside it would take from it.

use coffre_remote::bufpool;
use coffre_storage::BlockDevice;
use coffre_testkit::nbdserver::NbdServer;

mod common;
use common::*;

#[test]
#[ignore = "system: nbdkit"]
fn chunks_dropped_from_the_buffer_serve_the_next_reads_and_writes() {
    let mib = 1usize << 20;
    let chunks = 48;
    let g = coffre_remote::Geometry::new(1 << 20, (chunks * mib) as u64).unwrap();
    let export = coffre_remote::blocks::Layout::for_geometry(&g)
        .size()
        .to_string();
    let kit = NbdServer::nbdkit(&["memory", &export]);
    let keys = Keyring::new();
    // The client's connection runs on this runtime's threads while the
    // device blocks on its own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = nbd_client(&kit.url(""), None);
    let (_, mut root) = rt
        .block_on(coffre_remote::ChunkStore::create(
            nbd_objects(&c),
            PREFIX,
            VAULT,
            keys.key(),
            g,
        ))
        .unwrap();
    // A buffer of 8 chunks: most of the 48 go through it and out. Every
    // chunk after the buffer's first 8, the one being written and the
    // read-ahead's 2 (a quarter of the buffer) should reuse a kept buffer:
    // 39 and 38 of 48 here; a few fewer allowed.
    let device = |root| {
        let store = rt.block_on(opened(nbd_objects(&c), &keys, root)).unwrap();
        coffre_remote::RemoteDevice::new(store, 8 * mib, Box::new(|_| Ok(()))).unwrap()
    };
    let data: Vec<u8> = (0..chunks * mib)
        .map(|i| u8::try_from((i * 13 + i / 4096) % 251).unwrap())
        .collect();

    // Whole chunks written: each is a copy in a buffer taken from the
    // pool once uploaded chunks have been dropped from the device's.
    let dev = device(root);
    let (reused, fresh) = bufpool::takes();
    for (i, block) in data.chunks(mib).enumerate() {
        dev.write_at((i * mib) as u64, block).unwrap();
    }
    dev.flush().unwrap();
    let (r, f) = bufpool::takes();
    let (written_reused, written_fresh) = (r - reused, f - fresh);
    println!("writes: {written_reused} buffers reused, {written_fresh} new");
    assert!(
        written_reused >= (chunks - 12) as u64,
        "writes: {written_reused} buffers reused, {written_fresh} new"
    );
    assert!(bufpool::kept().1 <= bufpool::KEEP_BYTES);
    root = dev.root();
    drop(dev);
    assert_eq!(bufpool::kept(), (0, 0), "freed with the device");

    // Read back through a fresh device: every chunk comes over NBD into a
    // buffer the client takes, most of them kept ones.
    let dev = device(root);
    let (reused, fresh) = bufpool::takes();
    let mut buf = vec![0u8; mib];
    for i in 0..chunks {
        dev.read_at((i * mib) as u64, &mut buf).unwrap();
        assert!(buf[..] == data[i * mib..(i + 1) * mib], "chunk {i}");
    }
    let (r, f) = bufpool::takes();
    let (read_reused, read_fresh) = (r - reused, f - fresh);
    println!("reads: {read_reused} buffers reused, {read_fresh} new");
    assert!(
        read_reused >= (chunks - 12) as u64,
        "reads: {read_reused} buffers reused, {read_fresh} new"
    );
    assert!(bufpool::kept().1 <= bufpool::KEEP_BYTES);
    drop(dev);
    assert_eq!(bufpool::kept(), (0, 0), "freed with the device");
}

//! The chunk store on real NBD servers, through our client: nbdkit (file
//! and memory plugins; its error filter injects faults) and qemu-nbd, on
//! unix sockets started by each test. The same volume written through
//! nbdkit reads back through qemu-nbd; a server restarted under the
//! client is reconnected to; a server that fails gives errors, never
//! bytes, and nothing acknowledged is lost; TLS with the vault's CA.

// Chunk numbers here are small constants.
#![allow(clippy::cast_possible_truncation)]

// As the daemon: every freed block is wiped, and I/O buffers are aligned
// (both are part of the survey's figures).
#[global_allocator]
static ALLOC: coffre_sys::alloc::WipeOnFree = coffre_sys::alloc::WipeOnFree;

use coffre_remote::blocks::Layout;
use coffre_remote::nbd::NbdClient;
use coffre_remote::{ChunkStore, Objects, RemoteError};
use coffre_testkit::nbdserver::NbdServer;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("volume.nbd");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(Layout::for_geometry(&geometry()).size()).unwrap();
    p
}

#[test]
#[ignore = "system: nbdkit, qemu-nbd"]
fn on_nbdkit_and_qemu_nbd_the_volume_round_trips_and_a_restarted_server_is_reconnected() {
    let scratch = tempfile::tempdir().unwrap();
    let img = image(scratch.path());
    let file = format!("file={}", img.display());
    let mut kit = NbdServer::nbdkit(&["file", &file]);
    let keys = Keyring::new();
    let rt = rt();
    let c = nbd_client(&kit.url("team"), None);
    let root = rt.block_on(async {
        let info = c.info().await.unwrap();
        assert_eq!(info.size, Layout::for_geometry(&geometry()).size());
        let o = nbd_objects(&c);
        o.format(&geometry()).await.unwrap();
        let mut s = created(o, &keys).await;
        s.write_chunks((0..8).map(|i| (i, chunk(i as u8 + 1))).collect())
            .await
            .unwrap();
        s.flush().await.unwrap().unwrap();
        s
    });
    // The server killed and started again under the client: the next
    // requests go over a new connection.
    kit.restart_nbdkit(&["file", &file]);
    let mut s = root;
    let root = rt.block_on(async {
        let mut last = None;
        for _ in 0..3 {
            match s.read_chunk(3).await {
                Ok(b) => {
                    last = Some(b);
                    break;
                }
                // The request that found the connection gone.
                Err(RemoteError::Store(_)) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(last.unwrap(), chunk(4));
        s.write_chunks(vec![(3, chunk(33))]).await.unwrap();
        s.flush().await.unwrap().unwrap()
    });
    drop(s);
    kit.stop();
    // The same image through qemu-nbd.
    let q = NbdServer::qemu_nbd(&img);
    rt.block_on(async {
        let c = nbd_client(&q.url("coffre"), None);
        let o: Arc<dyn Objects> = nbd_objects(&c);
        let s = opened(o, &keys, root).await.unwrap();
        for i in 0..8u64 {
            let want = if i == 3 {
                chunk(33)
            } else {
                chunk(i as u8 + 1)
            };
            assert_eq!(s.read_chunk(i).await.unwrap(), want, "chunk {i}");
        }
    });
    // No plaintext marker needed here: the chunks are what the caller
    // gives (ciphertext in the vault); what matters is that the bytes on
    // the export are the slots, not a sparse copy of the volume.
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk.starts_with(b"coffre-blocks-1\0"));
}

#[test]
#[ignore = "system: nbdkit"]
fn a_failing_server_gives_errors_never_bytes_and_nothing_acknowledged_is_lost() {
    let size = Layout::for_geometry(&geometry()).size().to_string();
    let trigger_dir = tempfile::tempdir().unwrap();
    let trigger = trigger_dir.path().join("fail");
    let error_file = format!("error-file={}", trigger.display());
    let kit = NbdServer::nbdkit(&[
        "--filter=error",
        "memory",
        &size,
        "error=EIO",
        "error-rate=100%",
        &error_file,
    ]);
    let keys = Keyring::new();
    rt().block_on(async {
        let c = nbd_client(&kit.url(""), None);
        let o = nbd_objects(&c);
        o.format(&geometry()).await.unwrap();
        let mut s = created(o, &keys).await;
        let r1 = kept(&mut s, vec![(0, chunk(1))]).await;
        std::fs::write(&trigger, b"").unwrap();
        match s.read_chunk(0).await {
            Err(RemoteError::Store(e)) => assert!(e.contains("EIO"), "{e}"),
            other => panic!("{other:?}"),
        }
        // A write refused by the server: not acknowledged, and the
        // durable state is unchanged.
        assert!(s.write_chunks(vec![(1, chunk(2))]).await.is_err());
        let f = s.flush().await;
        assert!(matches!(f, Ok(None) | Err(_)), "{f:?}");
        assert_eq!(s.root(), r1);
        std::fs::remove_file(&trigger).unwrap();
        s.write_chunks(vec![(1, chunk(2))]).await.unwrap();
        let r2 = s.flush().await.unwrap().unwrap();
        assert!(r2.epoch > r1.epoch);
        drop(s);
        let o: Arc<dyn Objects> = nbd_objects(&c);
        let s = opened(o, &keys, r2).await.unwrap();
        assert_eq!(s.read_chunk(0).await.unwrap(), chunk(1));
        assert_eq!(s.read_chunk(1).await.unwrap(), chunk(2));
    });
}

/// Writes acknowledged on a connection the server then lost (restarted,
/// its cache gone) are never covered by a flush on the next connection:
/// every flush is refused from then on (the device must be reopened; the
/// vault's write journal replays what was lost).
#[test]
#[ignore = "system: nbdkit"]
fn a_flush_after_a_lost_connection_with_unflushed_writes_is_refused() {
    let size = "64M";
    let mut kit = NbdServer::nbdkit(&["memory", size]);
    rt().block_on(async {
        let c = nbd_client(&kit.url(""), None);
        c.write(0, bytes::Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
        c.write(4096, bytes::Bytes::from(vec![8u8; 4096]), false)
            .await
            .unwrap();
        // The server restarts: what it had not flushed is gone.
        kit.restart_nbdkit(&["memory", size]);
        let mut refused = None;
        for _ in 0..3 {
            match c.flush().await {
                Err(e) if e.to_string().contains("lost") => {
                    refused = Some(e);
                    break;
                }
                // The request that found the old connection gone.
                Err(_) => continue,
                Ok(()) => panic!("a flush covered writes the server lost"),
            }
        }
        assert!(refused.is_some());
        // For good: a write and a flush on the new connection are refused
        // too.
        c.write(0, bytes::Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        assert!(c.flush().await.is_err());
    });
}

/// A deleted version's slot goes back to the storage host (trimmed): on
/// nbdkit's memory plugin its bytes read back as zeros, while the
/// version the manifest names stays.
#[test]
#[ignore = "system: nbdkit"]
fn a_deleted_version_is_trimmed_on_the_export() {
    let size = Layout::for_geometry(&geometry()).size().to_string();
    let kit = NbdServer::nbdkit(&["memory", &size]);
    let keys = Keyring::new();
    rt().block_on(async {
        let c = nbd_client(&kit.url(""), None);
        let info = c.info().await.unwrap();
        assert!(
            info.flags & coffre_storage::nbd_wire::TFLAG_SEND_TRIM != 0,
            "nbdkit's memory plugin trims"
        );
        let mut s = created(nbd_objects(&c), &keys).await;
        s.write_chunks(vec![(1, chunk(0x11))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        s.write_chunks(vec![(1, chunk(0x22))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        let whole = |c: Arc<NbdClient>| async move {
            let n = usize::try_from(c.info().await.unwrap().size).unwrap();
            c.read(0, n).await.unwrap()
        };
        let before = whole(c.clone()).await;
        let has = |b: &[u8], fill: u8| {
            b.windows(4096)
                .step_by(4096)
                .any(|w| w.iter().all(|x| *x == fill))
        };
        assert!(has(&before, 0x11) && has(&before, 0x22));
        // The first version is garbage: collected, its slot trimmed.
        assert!(s.collect_garbage(Duration::ZERO).await.unwrap() >= 1);
        let after = whole(c.clone()).await;
        assert!(
            !has(&after, 0x11),
            "the deleted version is still on the export"
        );
        assert!(has(&after, 0x22));
        assert_eq!(s.read_chunk(1).await.unwrap(), chunk(0x22));
    });
}

#[test]
#[ignore = "system: nbdkit"]
fn tls_with_the_vaults_ca_and_a_server_that_requires_it() {
    let pki = coffre_testkit::tls::TestPki::new("coffre test vault CA", &["storage.test"]);
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("ca-cert.pem"), &pki.ca).unwrap();
    std::fs::write(certs.path().join("server-cert.pem"), &pki.cert).unwrap();
    std::fs::write(certs.path().join("server-key.pem"), &pki.key).unwrap();
    let size = Layout::for_geometry(&geometry()).size().to_string();
    let tls_dir = format!("--tls-certificates={}", certs.path().display());
    let kit = NbdServer::nbdkit(&["--tls=require", &tls_dir, "memory", &size]);
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&pki.ca) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let keys = Keyring::new();
    rt().block_on(async {
        // Without TLS: refused, and said why.
        let plain = nbd_client(&kit.url(""), None);
        let e = plain.info().await.unwrap_err().to_string();
        assert!(e.contains("requires TLS"), "{e}");
        // With a name the certificate does not carry: refused.
        let wrong = nbd_client(&kit.url(""), Some((config.clone(), "other.test".into())));
        assert!(wrong.info().await.is_err());
        let c = nbd_client(&kit.url(""), Some((config.clone(), "storage.test".into())));
        let o = nbd_objects(&c);
        o.format(&geometry()).await.unwrap();
        let mut s = created(o, &keys).await;
        s.write_chunks(vec![(2, chunk(7))]).await.unwrap();
        s.flush().await.unwrap().unwrap();
        assert_eq!(s.read_chunk(2).await.unwrap(), chunk(7));
    });
}

/// A write in parts lands as the write of their concatenation: in one
/// request when they fit (nbdkit's log shows one write of the whole
/// length), and still right when they do not (split after one copy).
/// Bytes around it are untouched.
#[test]
#[ignore = "system: nbdkit"]
fn a_write_in_parts_lands_as_their_concatenation_in_one_request() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("requests.log");
    let logfile = format!("logfile={}", log.display());
    let kit = NbdServer::nbdkit(&["--filter=log", "memory", "64M", &logfile]);
    let max = rt().block_on(async {
        let c = nbd_client(&kit.url(""), None);
        let max = c.info().await.unwrap().max_payload as usize;
        c.write(0, bytes::Bytes::from(vec![0xeeu8; 3 << 20]), false)
            .await
            .unwrap();
        let parts = vec![
            bytes::Bytes::from(vec![1u8; 4096]),
            bytes::Bytes::from(
                (0..(1usize << 20) + 13)
                    .map(|i| (i % 251) as u8)
                    .collect::<Vec<_>>(),
            ),
            bytes::Bytes::from(vec![3u8; 4096 - 13]),
        ];
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        c.write_parts(8192, parts, false).await.unwrap();
        c.flush().await.unwrap();
        let back = c.read(0, 3 << 20).await.unwrap();
        assert!(back[..8192].iter().all(|b| *b == 0xee), "before it");
        assert_eq!(back[8192..8192 + whole.len()], whole[..]);
        assert!(
            back[8192 + whole.len()..].iter().all(|b| *b == 0xee),
            "after it"
        );
        // More than one request can carry: split (after one copy), the
        // same bytes.
        assert!(max + 4096 <= 64 << 20, "the export holds the split write");
        let big = vec![
            bytes::Bytes::from(vec![5u8; max]),
            bytes::Bytes::from(vec![6u8; 4096]),
        ];
        c.write_parts(0, big, false).await.unwrap();
        let back = c.read(0, max + 4096).await.unwrap();
        assert!(back[..max].iter().all(|b| *b == 5));
        assert!(back[max..].iter().all(|b| *b == 6));
        max
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let writes = |want: String| {
        text.lines()
            .filter(|l| l.contains("Write") && l.contains(&format!("{want} ")))
            .count()
    };
    let one = format!("offset=0x2000 count=0x{:x}", (1usize << 20) + 8192);
    assert_eq!(
        writes(one),
        1,
        "the parts went as one write request: {text}"
    );
    // The split: the payload limit, then the rest.
    assert_eq!(writes(format!("offset=0x0 count=0x{max:x}")), 1, "{text}");
    assert_eq!(
        writes(format!("offset=0x{max:x} count=0x1000")),
        1,
        "{text}"
    );
}

/// `nbdcopy FROM TO`, which must succeed.
fn nbdcopy(from: impl AsRef<std::ffi::OsStr>, to: impl AsRef<std::ffi::OsStr>) {
    let out = std::process::Command::new("nbdcopy")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The certificates in a PEM text.
fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

/// Survey (not a test): sequential writes and reads through the device
/// (chunk store, slot layout, our client) on nbdkit's memory plugin,
/// against `nbdcopy` writing and reading the same bytes to and from the
/// same kind of export, interleaved in rounds (`SURVEY_ROUNDS`, 5; size
/// `SURVEY_MIB`, 256). Each round prints a line `nbd-round: copy_write
/// ours_write copy_read ours_read ours_journal_write` in MiB/s, which
/// `scripts/bench-nbd` turns into medians and ratios (we ask at least
/// 0.8 of nbdcopy of the first two; the last is the daemon's own path,
/// the same writes with the write journal on local disk, which the
/// daemon always keeps). Our reads are timed in the device's `read_at`
/// alone (the check of the bytes read is not), on a device opened afresh
/// each round.
/// A line `nbd-cpu: write read journal_write` per round gives this
/// process's CPU time (all its threads) per GiB in each.
#[test]
#[ignore = "survey: nbdkit, nbdcopy"]
fn survey_nbd_throughput_against_nbdcopy() {
    use coffre_storage::BlockDevice;
    use std::time::Instant;
    // As the daemon sets glibc (which blocks it maps, what it keeps);
    // with GLIBC_TUNABLES set, as they say instead (to compare settings).
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        assert!(coffre_sys::return_large_allocations());
    }
    let env = |k: &str, d: u64| std::env::var(k).map_or(d, |v| v.parse().unwrap());
    let rounds = env("SURVEY_ROUNDS", 5);
    let n = env("SURVEY_MIB", 256);
    let mib = 1usize << 20;
    let g = coffre_remote::Geometry::new(1 << 20, n * mib as u64).unwrap();
    let export = Layout::for_geometry(&g).size().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("data.bin");
    let data: Vec<u8> = (0..n as usize * mib)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 251).unwrap())
        .collect();
    std::fs::write(&file, &data).unwrap();
    // The baselines: nbdcopy into an export of the same kind, and out of
    // one that holds the same number of bytes (nbdcopy reads a whole
    // export: the truncate filter limits one to them).
    // nbdkit's memory plugin allocates on the first write to a place
    // (its sparse array, the default): `SURVEY_NBDKIT_ALLOCATOR` chooses
    // another for every export of the survey (`malloc,mlock=true`: all of
    // it in memory from the start, every write an overwrite).
    let allocator = std::env::var("SURVEY_NBDKIT_ALLOCATOR")
        .map(|a| format!("allocator={a}"))
        .unwrap_or_else(|_| "allocator=sparse".into());
    let base = NbdServer::nbdkit(&["memory", &export, &allocator]);
    let part = NbdServer::nbdkit(&[
        "--filter=truncate",
        "memory",
        &export,
        &allocator,
        &format!("truncate={}", n as usize * mib),
    ]);
    nbdcopy(&file, part.url(""));

    let kit = NbdServer::nbdkit(&["memory", &export, &allocator]);
    let keys = Keyring::new();
    let rt = rt();
    let c = nbd_client(&kit.url(""), None);
    // Our client alone, 16 requests of 1 MiB in flight (no chunk store).
    let t = Instant::now();
    rt.block_on(async {
        for batch in data.chunks(16 * mib).enumerate() {
            let (b, part) = batch;
            let puts = part.chunks(mib).enumerate().map(|(i, block)| {
                let at = ((b * 16 + i) * mib) as u64;
                c.write(at, bytes::Bytes::copy_from_slice(block), false)
            });
            for r in futures::future::join_all(puts).await {
                r.unwrap();
            }
        }
        c.flush().await.unwrap();
    });
    let client_write = t.elapsed();
    let t = Instant::now();
    rt.block_on(async {
        for b in 0..(n as usize / 16) {
            let gets = (0..16).map(|i| c.read(((b * 16 + i) * mib) as u64, mib));
            for r in futures::future::join_all(gets).await {
                assert_eq!(r.unwrap().len(), mib);
            }
        }
    });
    let client_read = t.elapsed();
    let key = keys.key();
    let mac_alone = |how| {
        let t = Instant::now();
        for block in data.chunks(mib) {
            std::hint::black_box(key.chunk_mac(how, &VAULT, (1, 2, 3), block));
        }
        t.elapsed()
    };
    let mac = mac_alone(coffre_remote::integrity::ChunkMac::NEW);
    let hmac = mac_alone(coffre_remote::integrity::ChunkMac::HmacSha256);
    let mbps = |d: Duration| (n as f64) / d.as_secs_f64();
    println!(
        "nbd survey, parts: our client alone writes {:.0} MiB/s, reads {:.0} MiB/s; the chunk MAC alone {:.0} MiB/s (one thread; HMAC-SHA256, older stores' MAC: {:.0} MiB/s)",
        mbps(client_write),
        mbps(client_read),
        mbps(mac),
        mbps(hmac)
    );
    let mut root = rt
        .block_on(ChunkStore::create(
            nbd_objects(&c),
            PREFIX,
            VAULT,
            keys.key(),
            g,
        ))
        .unwrap()
        .1;
    let device = |root: coffre_remote::Root| {
        let store = rt.block_on(opened(nbd_objects(&c), &keys, root)).unwrap();
        coffre_remote::RemoteDevice::new(store, 64 * mib, Box::new(|_| Ok(()))).unwrap()
    };
    // The whole volume in writes of `req` bytes, then a flush.
    let write_in = |dev: &coffre_remote::RemoteDevice, req: usize| {
        for (i, block) in data.chunks(req).enumerate() {
            dev.write_at((i * req) as u64, block).unwrap();
        }
        dev.flush().unwrap();
    };
    let write_all = |dev: &coffre_remote::RemoteDevice| write_in(dev, mib);
    println!(
        "nbd survey, {n} MiB sequential, 1 MiB requests and chunks, nbdkit memory, every timed write an overwrite on both sides, {rounds} rounds (MiB/s):"
    );
    // This process's CPU time (every thread of ours; nbdkit's is its own).
    let clock = |c| {
        let t = rustix::time::clock_gettime(c);
        Duration::new(
            u64::try_from(t.tv_sec).unwrap(),
            u32::try_from(t.tv_nsec).unwrap(),
        )
    };
    let cpu = || clock(rustix::time::ClockId::ProcessCPUTime);
    // Every timed write an overwrite, on both sides. A chunk has two
    // slots on the export and each version goes to the one the last did
    // not take, so in the first two rounds about half of our writes went
    // to places nbdkit had never allocated (the client's own pass above
    // wrote the first 256 MiB of the export, both slots of the first
    // chunks), where nbdcopy wrote fresh places in its first round only
    // (round 2: 581 against 2153 MiB/s on a freshly booted host). So,
    // untimed, nbdcopy writes once and ours twice first.
    let journal = scratch.path().join("journal");
    nbdcopy(&file, base.url(""));
    for _ in 0..2 {
        let dev = device(root);
        write_all(&dev);
        root = dev.root();
    }
    for _ in 0..rounds {
        let t = Instant::now();
        nbdcopy(&file, base.url(""));
        let copy_write = t.elapsed();
        let dev = device(root);
        let c0 = cpu();
        let t = Instant::now();
        write_all(&dev);
        let ours_write = t.elapsed();
        let cpu_write = cpu() - c0;
        root = dev.root();
        drop(dev);
        // The daemon's path: the same writes, each appended to the write
        // journal on local disk first (attached as at an open, untimed).
        let dev = device(root);
        dev.attach_journal(&journal).unwrap();
        let c0 = cpu();
        let t = Instant::now();
        write_all(&dev);
        let ours_journal = t.elapsed();
        let cpu_journal = cpu() - c0;
        root = dev.root();
        drop(dev);
        // The same writes in 512 KiB requests, as the loop device hands
        // the daemon a sequential writer's 1 MiB (its 128 segments): each
        // chunk arrives in two halves, over a chunk already on the store.
        let dev = device(root);
        let t = Instant::now();
        write_in(&dev, mib / 2);
        let ours_halves = t.elapsed();
        root = dev.root();
        drop(dev);
        let t = Instant::now();
        nbdcopy(part.url(""), "null:");
        let copy_read = t.elapsed();
        let dev = device(root);
        // Into one buffer, as a reader above would; the CPU time is the
        // whole loop's (the read-ahead's threads run between the calls
        // too) less this thread's in the checks of the bytes.
        let mut buf = vec![0u8; mib];
        let mut ours_read = Duration::ZERO;
        let mut checks = Duration::ZERO;
        let c0 = cpu();
        for i in 0..n as usize {
            let t = Instant::now();
            dev.read_at(i as u64 * mib as u64, &mut buf).unwrap();
            ours_read += t.elapsed();
            let k0 = clock(rustix::time::ClockId::ThreadCPUTime);
            assert!(buf[..] == data[i * mib..(i + 1) * mib], "MiB {i}");
            checks += clock(rustix::time::ClockId::ThreadCPUTime) - k0;
        }
        let cpu_read = (cpu() - c0).saturating_sub(checks);
        drop(dev);
        // CPU milliseconds per GiB, ours, writing, reading, and writing
        // with the journal.
        let per_gib = |d: Duration| d.as_secs_f64() * 1e3 * 1024.0 / n as f64;
        println!(
            "nbd-cpu: {:.0} {:.0} {:.0}",
            per_gib(cpu_write),
            per_gib(cpu_read),
            per_gib(cpu_journal)
        );
        println!(
            "nbd-round: {:.0} {:.0} {:.0} {:.0} {:.0} {:.0}",
            mbps(copy_write),
            mbps(ours_write),
            mbps(copy_read),
            mbps(ours_read),
            mbps(ours_journal),
            mbps(ours_halves)
        );
    }
    let (reused, fresh) = coffre_remote::bufpool::takes();
    println!("nbd survey: chunk buffers taken from the pool {reused}, allocated {fresh}");
}

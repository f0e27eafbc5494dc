//! Benchmark helper: formats a throw-away LUKS2 volume in DIR, exposes it
//! (FUSE file, loop, ext4 mount at DIR/data, the NBD server for VM disks),
//! prints the times and where the NBD socket and the disks are, waits for
//! a line on stdin, then closes it and prints the close time.
//!
//! `cargo run --release -p coffre-data --example expose -- DIR SIZE_MIB`

use coffre_data::{ClosePolicy, Layout, Ownership, expose, format_ext4};

// As the daemon: every freed block is wiped (its cost is part of the
// figures).
#[global_allocator]
static ALLOC: coffre_sys::alloc::WipeOnFree = coffre_sys::alloc::WipeOnFree;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() {
    // As the daemon does: allocations of 4 MiB and more are never kept in
    // the heap; up to 4 MiB of freed smaller ones are, per arena.
    coffre_sys::return_large_allocations();
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[1]);
    let size: u64 = args[2].parse::<u64>().expect("size in MiB") << 20;
    std::fs::create_dir_all(&dir).unwrap();
    let (c, key) = coffre_testkit::volume::scratch_volume(&dir, size);
    let l = Layout::under(&dir);
    let t = Instant::now();
    format_ext4(c.open_volume(&key).unwrap(), &l.volume_file).unwrap();
    eprintln!("format_ms {}", t.elapsed().as_millis());
    let t = Instant::now();
    let mut e = expose(c.open_volume(&key).unwrap(), &l, &Ownership::default()).unwrap();
    println!("open_ms {:.1}", t.elapsed().as_secs_f64() * 1e3);
    // The process workloads' view of the data (the cut layer), as the
    // daemon mounts it, over the data.
    let view = dir.join("view");
    let cut = coffre_data::cut::CutLayer::mount(&view).unwrap();
    cut.restore(&l.mountpoint).unwrap();
    println!("view {}", view.display());
    println!("nbd_socket {}", l.nbd_socket.display());
    println!("disks {}", l.disks().display());
    println!("ready {}", l.mountpoint.display());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let t = Instant::now();
    let _ = cut.cut();
    // The view's cut: closing what it holds, and wiping its workers'
    // request buffers.
    println!("cut_ms {:.1}", t.elapsed().as_secs_f64() * 1e3);
    drop(cut);
    let t = Instant::now();
    e.close(&ClosePolicy {
        grace: Duration::from_secs(1),
        force: false,
    })
    .unwrap();
    println!("close_ms {:.1}", t.elapsed().as_secs_f64() * 1e3);
    // What the volume file served: requests, bytes and the time spent in
    // them, by direction.
    for (name, d) in [
        ("read", &coffre_data::iostats::DATA_IO.read),
        ("write", &coffre_data::iostats::DATA_IO.write),
    ] {
        let (counts, busy) = d.latency.snapshot();
        println!(
            "{name}_served {} {} {busy:.3}",
            counts.last().copied().unwrap_or(0),
            d.bytes.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}

//! A whole NBD session from arbitrary client bytes (handshake, options,
//! requests), against an in-memory export and then against a directory
//! of images as VMs are served (`ImageDir`: the export name the client
//! chooses becomes a file name there): the server answers or hangs up,
//! never panics, and never touches bytes outside the export: a disk keeps
//! its size, and an image beside the directory, reachable only through a
//! symlink or a `..`, is never written.
#![no_main]

use coffre_data::nbd::{Disk, ImageDir, MemCatalog, MemDisk, serve_connection};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const SIZE: u64 = 64 * 1024;
const OUTSIDE: &[u8] = b"not a guest's disk";

/// A directory of images (`disk.img`, and `link.img`, a symlink to an
/// image outside it), made once per process.
fn images() -> &'static (PathBuf, PathBuf) {
    static DIR: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let top = coffre_sys::fs::fuzz_workdir("nbd");
        let dir = top.join("images");
        std::fs::create_dir_all(&dir).unwrap();
        let outside = top.join("outside.img");
        std::fs::write(&outside, OUTSIDE).unwrap();
        std::fs::File::create(dir.join("disk.img"))
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        std::os::unix::fs::symlink("../outside.img", dir.join("link.img")).unwrap();
        (dir, outside)
    })
}

fuzz_target!(|data: &[u8]| {
    let disk = Arc::new(MemDisk::new(64 * 1024));
    let mut catalog = MemCatalog::default();
    catalog.0.insert("disk".into(), disk.clone());
    let mut out = Vec::new();
    let _ = serve_connection(data, &mut out, &catalog);
    assert!(out.starts_with(b"NBDMAGICIHAVEOPT"));
    assert_eq!(disk.size(), SIZE);

    let (dir, outside) = images();
    let mut out = Vec::new();
    let _ = serve_connection(data, &mut out, &ImageDir::new(dir));
    assert!(out.starts_with(b"NBDMAGICIHAVEOPT"));
    assert_eq!(std::fs::metadata(dir.join("disk.img")).unwrap().len(), SIZE);
    assert_eq!(
        std::fs::read(outside).unwrap(),
        OUTSIDE,
        "an image outside was written"
    );
    assert_eq!(
        std::fs::read_dir(dir).unwrap().count(),
        2,
        "an image was made"
    );
});

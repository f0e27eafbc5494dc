//! A guest's NFS calls answered by the real server on a real export (a
//! directory under a temporary one), as the share's user: what the
//! decoders let through reaches the calls that act on files (lookups,
//! creates, renames, links, symlinks, directory reads, MOUNT's path walk).
//! A guest's handles are keyed, so the fuzzer names the export's root with
//! the 8 bytes `ROOTFH!!` as an XDR opaque, and the harness puts the
//! genuine handle there. Nothing may panic, and nothing may appear or
//! change beside the export (no `..`, link or rename gets out of it).
//! Seeds: `fuzz/seeds/nfs_export/` (made by `scripts/lib/nfs-seeds.py`).
#![no_main]

use coffre_nfs::handle::{self, HandleKey};
use coffre_nfs::server::Server;
use coffre_nfs::{ExportSpec, rpc};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MARKER: &[u8] = b"\0\0\0\x08ROOTFH!!";

struct Setup {
    server: Server,
    jail: PathBuf,
    export: PathBuf,
    root: Vec<u8>,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let jail = coffre_sys::fs::fuzz_workdir("nfs");
        let export = jail.join("shared");
        std::fs::create_dir_all(&export).unwrap();
        // Beside the export: what must never change.
        std::fs::write(jail.join("outside"), b"not the guest's").unwrap();
        // As root, the share belongs to an ordinary user, as in a vault.
        let (uid, gid) = if std::fs::metadata(&export).unwrap().uid() == 0 {
            std::os::unix::fs::chown(&export, Some(65534), Some(65534)).unwrap();
            (65534, 65534)
        } else {
            let m = std::fs::metadata(&export).unwrap();
            (m.uid(), m.gid())
        };
        let spec = ExportSpec {
            workload: "vm".into(),
            client: GUEST,
            share: "shared".into(),
            path: export.clone(),
            uid,
            gid,
            groups: vec![],
            readonly: false,
            denied: false,
            mounted: false,
            async_metadata: false,
        };
        let server = Server::new();
        server.set_exports(vec![spec]);
        let key = [3u8; 32];
        assert!(server.open_in_process(HandleKey::new(key)).is_empty());
        let dir = std::fs::File::open(&export).unwrap();
        let fh = coffre_sys::handle::FileHandle::of(std::os::fd::AsFd::as_fd(&dir), Path::new(""))
            .unwrap();
        let root = handle::encode(
            &HandleKey::new(key),
            handle::export_tag("vm", "shared"),
            &fh,
        )
        .unwrap();
        Setup {
            server,
            jail,
            export,
            root,
        }
    })
}

/// The record with each marker replaced by the root's handle (as XDR:
/// its length, the bytes, padding).
fn with_root(rec: &[u8], root: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rec.len() + 64);
    let mut i = 0;
    while i < rec.len() {
        if rec[i..].starts_with(MARKER) {
            out.extend_from_slice(&u32::try_from(root.len()).unwrap().to_be_bytes());
            out.extend_from_slice(root);
            out.resize(out.len().next_multiple_of(4), 0);
            i += MARKER.len();
        } else {
            out.push(rec[i]);
            i += 1;
        }
    }
    out
}

/// What is beside the export, as it must stay: each entry's name and
/// inode; the export's own size and times change with what the guest
/// does in it, the rest's mode, times, size and bytes must not.
fn beside(jail: &Path) -> Vec<(String, u64, Option<(u32, i64, i64, Vec<u8>)>)> {
    let mut v: Vec<_> = std::fs::read_dir(jail)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rest = (name != "shared").then(|| {
                let bytes = if m.is_file() {
                    std::fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (
                    m.mode(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000,
                    m.ctime(),
                    bytes,
                )
            });
            (name, m.ino(), rest)
        })
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let before = beside(&s.jail);
    let mut src = data;
    let mut rec = Vec::new();
    let mut calls = 0;
    while let Ok(true) = rpc::read_record(&mut src, &mut rec, rpc::MAX_RECORD) {
        calls += 1;
        if calls > 64 {
            break;
        }
        let rec = with_root(&rec, &s.root);
        if let Some(reply) = s.server.answer(GUEST, &rec) {
            assert!(reply.len() <= rpc::MAX_RECORD + 4);
        }
    }
    assert_eq!(
        beside(&s.jail),
        before,
        "something changed beside the export"
    );
    // Each input starts from an empty export (its root kept: the handle),
    // as it was made.
    let _ = std::fs::set_permissions(
        &s.export,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    for e in std::fs::read_dir(&s.export).unwrap() {
        let p = e.unwrap().path();
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::set_permissions(
                    &p,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                );
                let _ = std::fs::remove_dir_all(&p);
            }
            _ => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
});

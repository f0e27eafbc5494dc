//! The FUSE library's request buffer, allocated by our allocator as the
//! daemon's is, puts a write request's data on a page
//! (`coffre_sys::alloc::FUSE_REQUEST_BUFFER`): the kernel then copies
//! written data into it at full speed, and the workloads' view hands it to
//! a file opened for direct I/O without copying it first. This fails if a
//! change of the library (its buffer's size, or where the data sits in it)
//! undoes that. Needs root and /dev/fuse.

use coffre_testkit::{Need, require};
use fuser::{
    Config, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyOpen, ReplyWrite, Request, SessionACL, WriteFlags,
};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

#[global_allocator]
static ALLOCATOR: coffre_sys::alloc::WipeOnFree = coffre_sys::alloc::WipeOnFree;

/// Where each write's data started, as an offset in its page.
static SEEN: Mutex<Vec<usize>> = Mutex::new(Vec::new());

const SIZE: u64 = 4 << 20;

struct OneFile;

fn attr() -> FileAttr {
    FileAttr {
        ino: INodeNo::ROOT,
        size: SIZE,
        blocks: SIZE / 512,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o600,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for OneFile {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }
    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::from_secs(1), &attr());
    }
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        SEEN.lock().unwrap().push(data.as_ptr().addr() % 4096);
        reply.written(u32::try_from(data.len()).unwrap());
    }
}

#[test]
#[ignore = "system: needs root and FUSE"]
fn a_write_requests_data_lands_on_a_page() {
    require(&[Need::Root, Need::Fuse]);
    let t = tempfile::tempdir().unwrap();
    let at = t.path().join("file");
    std::fs::write(&at, b"").unwrap();
    let mut config = Config::default();
    config.acl = SessionACL::Owner;
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = fuser::Session::new(OneFile, &at, &config)
        .unwrap()
        .spawn()
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&at).unwrap();
    for (off, len) in [(0u64, 4096usize), (1 << 20, 1 << 20), (8192, 100)] {
        f.write_all_at(&vec![0xa5; len], off).unwrap();
    }
    drop(f);
    drop(session);
    let seen = SEEN.lock().unwrap().clone();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen.iter().all(|&o| o == 0),
        "write data at these offsets in a page: {seen:?}"
    );
}

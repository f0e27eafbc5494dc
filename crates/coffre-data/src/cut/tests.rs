//! System tests of the layer (they need root and FUSE): open files survive
//! a cut and an unmount of the ext4 below, and a member operation leaves
//! the process undumpable.

use super::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

use coffre_testkit::{Need, require};

fn run(cmd: &mut Command) {
    coffre_testkit::run_ok(cmd);
}

const NEEDS: &[Need] = &[Need::Root, Need::Fuse, Need::Loop, Need::Ext4];

/// Unmounts the ext4 below the layer once the layer is dropped. Its
/// workers let go of their descriptors a moment after the drop: a short
/// "busy" is waited out (seen once in a full run), a lasting one fails.
fn umount(mnt: &std::path::Path) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = Command::new("umount").arg(mnt).output().unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "umount {}: {}",
            mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A test's directory, whose `mnt` is lazily unmounted when it is dropped
/// still mounted (a test that panicked before its own unmount): no loop
/// mount is left behind.
struct Scratch {
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        Scratch { dir, mnt }
    }
    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(4) == self.mnt.to_str()));
        if mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A fresh 32 MiB ext4 on a loop device, mounted, with the layer over it
/// (restored): the temporary directory, the image, the mount point, the
/// view and the layer.
fn viewed_ext4() -> (
    Scratch,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    CutLayer,
) {
    let t = Scratch::new();
    let img = t.path().join("fs.img");
    let mnt = t.mnt.clone();
    let view = t.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    File::create(&img).unwrap().set_len(32 << 20).unwrap();
    // No fast commits: an fsync then always commits a transaction.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^fast_commit"])
        .arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let layer = CutLayer::mount(&view).unwrap();
    layer.restore(&mnt).unwrap();
    (t, img, mnt, view, layer)
}

/// What workloads write through the view does not stay in the FUSE
/// workers' request buffers after a cut (the view stays mounted while the
/// vault is closed, and so do its workers): data written through it is
/// found in this process's memory before the cut, nowhere after. Also:
/// the wipe file is the daemon's alone; for anyone else its name is an
/// ordinary one.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_cut_leaves_no_written_data_in_the_request_buffers() {
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    // Kept inverted: only the bytes written carry the marker itself.
    let mut inverted = [0u8; 48];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut inverted)
        .unwrap();
    // As long as a request can be: the end of the largest is checked too.
    let mut data = zeroize::Zeroizing::new(vec![0u8; super::MAX_WRITE as usize]);
    for (i, b) in data.iter_mut().enumerate() {
        *b = !inverted[i % inverted.len()];
    }
    let f = File::create(view.join("secret")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
    drop(f);
    zeroize::Zeroize::zeroize(&mut *data);
    let me = std::process::id();
    assert!(
        !coffre_testkit::process::memory_hits_inverted(me, &inverted).is_empty(),
        "the scan finds what a worker's request buffer holds (else it proves nothing)"
    );

    // Another process: the name is an ordinary file's, in the data.
    let name = super::state::wipe_name(0);
    let other = view.join(&name);
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > '{}'", other.display())));
    assert_eq!(std::fs::read(mnt.join(&name)).unwrap(), b"x\n");

    layer.cut().1.unwrap();
    let hits = coffre_testkit::process::memory_hits_inverted(me, &inverted);
    assert!(hits.is_empty(), "after the cut: {hits:#?}");
    // Each worker took one wipe write: every request buffer was
    // overwritten, whichever worker the data went through.
    let takers = std::mem::take(&mut *layer.layer.wipe.takers.lock().unwrap());
    let distinct: std::collections::HashSet<_> = takers.iter().collect();
    assert_eq!(
        (takers.len(), distinct.len()),
        (super::state::WORKERS, super::state::WORKERS),
        "the wipe writes' takers: {takers:?}"
    );
    // While cut, the name is nobody else's way in either.
    assert!(
        !Command::new("sh")
            .arg("-c")
            .arg(format!("echo y > '{}'", other.display()))
            .status()
            .unwrap()
            .success(),
        "another process wrote through the view while cut"
    );
    // And again, while cut (the daemon's way to the file needs no data),
    // again by every worker.
    layer.wipe_request_buffers().unwrap();
    let takers = std::mem::take(&mut *layer.layer.wipe.takers.lock().unwrap());
    let distinct: std::collections::HashSet<_> = takers.iter().collect();
    assert_eq!(distinct.len(), super::state::WORKERS, "{takers:?}");
    drop(layer);
}

/// A file held open through the layer survives the ext4 mount going
/// away (which it no longer keeps busy) and coming back.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn open_files_survive_a_cut_and_an_unmount() {
    require(NEEDS);
    let (_t, img, mnt, view, layer) = viewed_ext4();

    std::fs::create_dir(view.join("dir")).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(view.join("dir/count"))
        .unwrap();
    f.write_all(b"before ").unwrap();
    std::fs::write(view.join("gone"), b"x").unwrap();
    let mut g = File::open(view.join("gone")).unwrap();
    assert_eq!(std::fs::read(mnt.join("dir/count")).unwrap(), b"before ");

    assert_eq!(layer.cut().0, 2);
    // The layer holds nothing on the mount: it unmounts.
    // Strict: after a cut the layer holds nothing on the data, at once.
    run(Command::new("umount").arg(&mnt));
    let mut buf = Vec::new();
    assert!(g.read_to_end(&mut buf).is_err(), "reads fail while cut");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    std::fs::remove_file(mnt.join("gone")).unwrap();

    let r = layer.restore(&mnt).unwrap();
    assert_eq!((r.reopened, r.lost), (1, 1));
    f.write_all(b"after").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before after");
    assert_eq!(
        std::fs::read(mnt.join("dir/count")).unwrap(),
        b"before after"
    );
    assert!(
        g.read_to_end(&mut buf).is_err(),
        "a file deleted while cut stays lost"
    );
    drop((f, g));

    // Programs that map their files work (shared, writable mappings).
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import mmap; f = open('{}', 'w+b'); f.write(b'0' * 4096); f.flush(); m = mmap.mmap(f.fileno(), 4096); m[0:5] = b'mmap!'; m.flush(); m.close(); f.close()",
            view.join("mapped").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&std::fs::read(mnt.join("mapped")).unwrap()[..5], b"mmap!");

    // A member (uid 5001, in the team's group 4242) works through the
    // layer as themselves: the kernel checks their rights, new files
    // are theirs, the setgid directory's group is kept, their umask is
    // honoured and the daemon's is not added.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let shared = mnt.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::os::unix::fs::chown(&shared, Some(0), Some(4242)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2770)).unwrap();
    std::fs::write(shared.join("root-only"), b"secret").unwrap();
    std::fs::set_permissions(
        shared.join("root-only"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let member = |script: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=5001",
                "--regid=5001",
                "--groups=4242",
                "--",
                "sh",
                "-c",
            ])
            .arg(format!(
                "umask 002; cd {} && {script}",
                view.join("shared").display()
            ))
            .output()
            .unwrap()
    };
    let out = member("mkdir d && echo hi > d/f && ln -s f d/l && ln d/f d/hard && mv d/f d/g");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = |p: &str| std::fs::symlink_metadata(shared.join(p)).unwrap();
    assert_eq!(
        (meta("d").uid(), meta("d").gid(), meta("d").mode() & 0o7777),
        (5001, 4242, 0o2775)
    );
    assert_eq!(
        (
            meta("d/g").uid(),
            meta("d/g").gid(),
            meta("d/g").mode() & 0o7777
        ),
        (5001, 4242, 0o664)
    );
    assert_eq!((meta("d/l").uid(), meta("d/l").gid()), (5001, 4242));
    assert_eq!(meta("d/hard").ino(), meta("d/g").ino());
    // What they may not do, they cannot do through the layer either.
    let out = member("cat root-only");
    assert!(!out.status.success());
    let out = member("chmod 644 root-only || chown 5001 root-only");
    assert!(!out.status.success());
    assert_eq!(meta("root-only").mode() & 0o777, 0o600);
    let out = member("rm -r d");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!shared.join("d").exists());

    drop(layer);
    umount(&mnt);
}

/// `fs.suid_dumpable` set to a value for the life of the guard, then put
/// back.
struct SuidDumpable(String);

impl SuidDumpable {
    const PATH: &str = "/proc/sys/fs/suid_dumpable";
    fn set(value: &str) -> Self {
        let old = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, value).unwrap();
        Self(old.trim().to_owned())
    }
}

impl Drop for SuidDumpable {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// With `fs.suid_dumpable` 2, every fsuid switch would make the process
/// dumpable again (mode 2, "root only"): a member's file operation
/// through the layer leaves it undumpable, as the daemon set it at start.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_member_operation_leaves_the_process_undumpable() {
    require(NEEDS);
    let t = Scratch::new();
    let img = t.path().join("fs.img");
    let mnt = t.mnt.clone();
    let view = t.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    // No fast commits: an fsync then always commits a transaction.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^fast_commit"])
        .arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let dir = mnt.join("home");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(5002), Some(5002)).unwrap();
    let layer = CutLayer::mount(&view).unwrap();
    layer.restore(&mnt).unwrap();

    let sysctl = SuidDumpable::set("2");
    coffre_sys::forbid_dumps().unwrap();
    assert!(!coffre_sys::is_dumpable());
    let out = Command::new("setpriv")
        .args(["--reuid=5002", "--regid=5002", "--clear-groups", "--"])
        .arg("sh")
        .arg("-c")
        .arg(format!("echo x > {}/mine", view.join("home").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(dir.join("mine")).unwrap().uid(), 5002);
    }
    let dumpable = coffre_sys::is_dumpable();
    // Put everything back before any assertion can fail.
    drop(sysctl);
    drop(layer);
    umount(&mnt);
    assert!(!dumpable, "the identity switch left the process dumpable");
}

/// A workload's direct I/O stays direct through the layer: aligned O_DIRECT
/// writes and reads through the view reach the ext4 file (and come back)
/// across a cut and a restore (the file is reopened O_DIRECT), none of it
/// left in the page cache of the file below, and handed to ext4 without a
/// copy; an unaligned direct write is refused as ext4 refuses it.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn direct_io_stays_direct_through_the_layer() {
    require(NEEDS);
    let (t, _img, mnt, view, layer) = viewed_ext4();
    let dd = |args: &[&str]| Command::new("dd").args(args).output().unwrap();
    // `dd bs=1M oflag=direct` from `from` to `to`, which must succeed.
    let dd_direct = |from: &std::path::Path, to: &std::path::Path| {
        let out = dd(&[
            &format!("if={}", from.display()),
            &format!("of={}", to.display()),
            "bs=1M",
            "oflag=direct",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data = coffre_testkit::volume::pattern(2 << 20, 5);
    let src = t.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let copied =
        || super::filesystem::COPIED_DIRECT_WRITES.load(std::sync::atomic::Ordering::Relaxed);
    let copied_before = copied();
    dd_direct(&src, &view.join("direct.bin"));
    // Straight from the FUSE library's buffer, where our allocator puts
    // a write's data on a page: no copy first.
    assert_eq!(
        copied(),
        copied_before,
        "aligned direct writes through the view were copied first"
    );
    let cached = Command::new("fincore")
        .args(["--noheadings", "--output", "PAGES"])
        .arg(mnt.join("direct.bin"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cached.stdout).trim(),
        "0",
        "direct writes through the view left pages in the cache below"
    );
    assert!(std::fs::read(mnt.join("direct.bin")).unwrap() == data);
    // Held open O_DIRECT across a cut and a restore, then read back.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(view.join("direct.bin"))
        .unwrap();
    assert_eq!(layer.cut().0, 1);
    let r = layer.restore(&mnt).unwrap();
    assert_eq!((r.reopened, r.lost), (1, 0));
    let back = dd(&[
        &format!("if={}", view.join("direct.bin").display()),
        "bs=1M",
        "iflag=direct",
    ]);
    assert!(back.status.success());
    assert!(back.stdout == data, "direct reads through the view differ");
    // An unaligned direct write fails, as on ext4 itself.
    f.seek(SeekFrom::Start(1)).unwrap();
    assert!(
        f.write_all(&data[..100]).is_err(),
        "an unaligned O_DIRECT write went through"
    );
    // Unless the process turned O_DIRECT off since (GNU dd does for a
    // last partial block): then it goes through, as on ext4 itself.
    let fl = rustix::fs::fcntl_getfl(&f).unwrap();
    rustix::fs::fcntl_setfl(&f, fl - rustix::fs::OFlags::DIRECT).unwrap();
    f.seek(SeekFrom::Start(1)).unwrap();
    f.write_all(&data[..100]).unwrap();
    let mut back = [0u8; 100];
    f.seek(SeekFrom::Start(1)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert_eq!(back, data[..100]);
    // A file whose length is no multiple of a block, with dd's
    // oflag=direct, as on the mount.
    let odd = t.path().join("odd.bin");
    std::fs::write(&odd, &data[..(1 << 20) + 1000]).unwrap();
    dd_direct(&odd, &view.join("odd.bin"));
    assert!(std::fs::read(mnt.join("odd.bin")).unwrap() == data[..(1 << 20) + 1000]);
    drop(f);
    drop(layer);
    umount(&mnt);
}

/// Preallocation, hole punching and `SEEK_DATA`/`SEEK_HOLE` through the
/// view reach the ext4 below (they failed with `EOPNOTSUPP`, and seeking
/// a hole found none); while cut, they fail like every other request.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn preallocation_and_holes_pass_through() {
    use rustix::fs::{FallocateFlags, SeekFrom as At, fallocate, seek};
    use std::os::unix::fs::{FileExt, MetadataExt};
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    const MIB: u64 = 1 << 20;
    let mib = 1usize << 20;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(view.join("pre"))
        .unwrap();
    let below = || std::fs::metadata(mnt.join("pre")).unwrap();

    // Allocated and sized, as seen below and through the view.
    fallocate(&f, FallocateFlags::empty(), 0, 8 * MIB).unwrap();
    assert_eq!(below().len(), 8 * MIB);
    assert!(
        below().blocks() * 512 >= 8 * MIB,
        "{} blocks",
        below().blocks()
    );
    assert_eq!(f.metadata().unwrap().len(), 8 * MIB);
    // Beyond the end, keeping the size.
    fallocate(&f, FallocateFlags::KEEP_SIZE, 8 * MIB, 4 * MIB).unwrap();
    assert_eq!(below().len(), 8 * MIB);
    assert!(
        below().blocks() * 512 >= 12 * MIB,
        "{} blocks",
        below().blocks()
    );

    // Data over all of it, then a hole punched in the middle: the data
    // around it stays, the hole reads as zeroes, its blocks are freed.
    f.write_all_at(&vec![0xAB; 8 * mib], 0).unwrap();
    f.sync_all().unwrap();
    let before = below().blocks();
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        2 * MIB,
        2 * MIB,
    )
    .unwrap();
    assert!(
        below().blocks() * 512 <= before * 512 - 2 * MIB,
        "{before} -> {} blocks",
        below().blocks()
    );
    let mut back = vec![0u8; 8 * mib];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back[..2 * mib].iter().all(|b| *b == 0xAB));
    assert!(back[2 * mib..4 * mib].iter().all(|b| *b == 0));
    assert!(back[4 * mib..].iter().all(|b| *b == 0xAB));
    // The hole is where it is below.
    assert_eq!(seek(&f, At::Hole(0)).unwrap(), 2 * MIB);
    assert_eq!(seek(&f, At::Data(2 * MIB)).unwrap(), 4 * MIB);

    // While cut: refused, nothing changed below.
    layer.cut().1.unwrap();
    assert!(fallocate(&f, FallocateFlags::empty(), 0, 16 * MIB).is_err());
    assert!(seek(&f, At::Hole(0)).is_err());
    assert_eq!(below().len(), 8 * MIB);
    drop(f);
    drop(layer);
    umount(&mnt);
}

/// FIFOs and UNIX sockets made through the view (a workload's `mkfifo`,
/// a program binding its socket in the data) are made below, with the
/// mode asked, and work: bytes pass through the FIFO and the socket. They
/// can be renamed and linked; a device cannot be made; while cut, nothing
/// can.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn fifos_and_sockets_are_made_and_work_through_the_view() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::os::unix::net::{UnixListener, UnixStream};
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    let mknod = |p: &std::path::Path, kind: rustix::fs::FileType, mode: u32| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            kind,
            rustix::fs::Mode::from_raw_mode(mode),
            0,
        )
    };
    // A FIFO: made below with its mode, bytes pass through it.
    mknod(&view.join("fifo"), rustix::fs::FileType::Fifo, 0o640).unwrap();
    let below = std::fs::symlink_metadata(mnt.join("fifo")).unwrap();
    assert!(below.file_type().is_fifo(), "{:?}", below.file_type());
    assert_eq!(below.mode() & 0o7777, 0o640 & !current_umask());
    let reader = {
        let at = view.join("fifo");
        std::thread::spawn(move || std::fs::read_to_string(at).unwrap())
    };
    std::fs::write(view.join("fifo"), "through the fifo").unwrap();
    assert_eq!(reader.join().unwrap(), "through the fifo");
    // Renamed and linked like any file.
    std::fs::rename(view.join("fifo"), view.join("fifo-moved")).unwrap();
    std::fs::hard_link(view.join("fifo-moved"), view.join("fifo")).unwrap();
    assert_eq!(std::fs::metadata(mnt.join("fifo")).unwrap().nlink(), 2);
    // A socket bound in the view: a socket below, and a connection works.
    let listener = UnixListener::bind(view.join("sock")).unwrap();
    assert!(
        std::fs::symlink_metadata(mnt.join("sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let mut client = UnixStream::connect(view.join("sock")).unwrap();
    client.write_all(b"through the socket").unwrap();
    drop(client);
    let (mut server, _) = listener.accept().unwrap();
    let mut got = String::new();
    server.read_to_string(&mut got).unwrap();
    assert_eq!(got, "through the socket");
    // A listing says what each entry is (readdir's own types, not a
    // stat): `find -type f` and `scandir` must not take them for files.
    let kinds: std::collections::BTreeMap<String, std::fs::FileType> = std::fs::read_dir(&view)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), e.file_type().unwrap())
        })
        .collect();
    assert!(kinds["fifo"].is_fifo(), "{kinds:?}");
    assert!(kinds["fifo-moved"].is_fifo(), "{kinds:?}");
    assert!(kinds["sock"].is_socket(), "{kinds:?}");
    // Never a device.
    let dev = rustix::fs::mknodat(
        rustix::fs::CWD,
        view.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    );
    assert_eq!(dev, Err(rustix::io::Errno::PERM));
    assert!(!mnt.join("null").exists());
    // While cut: nothing is made.
    layer.cut().1.unwrap();
    assert!(mknod(&view.join("later"), rustix::fs::FileType::Fifo, 0o600).is_err());
    drop(listener);
    drop(server);
    drop(layer);
    assert!(!mnt.join("later").exists());
    umount(&mnt);
}

/// This process's umask (from /proc: setting it to read it would race
/// the other tests' files).
fn current_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap();
    u32::from_str_radix(field.trim(), 8).unwrap()
}

/// A directory's fsync through the view commits the ext4 below (a
/// journal transaction), where FUSE alone would answer success and sync
/// nothing. The ext4's periodic commit is pushed out of the way.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_directorys_fsync_reaches_the_ext4_below() {
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    run(Command::new("mount")
        .args(["-o", "remount,commit=600"])
        .arg(&mnt));
    let dev = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == mnt.to_str())
        .and_then(|l| l.split(" - ").nth(1)?.split(' ').nth(1).map(str::to_owned))
        .unwrap();
    let info = format!("/proc/fs/jbd2/{}-8/info", dev.trim_start_matches("/dev/"));
    let transactions = || -> u64 {
        let text = std::fs::read_to_string(&info).unwrap();
        text.split_whitespace().next().unwrap().parse().unwrap()
    };
    std::fs::create_dir(view.join("d")).unwrap();
    std::fs::File::open(view.join("d"))
        .unwrap()
        .sync_all()
        .unwrap();
    let before = transactions();
    std::fs::write(view.join("d/new"), b"x").unwrap();
    std::fs::rename(view.join("d/new"), view.join("d/renamed")).unwrap();
    std::fs::File::open(view.join("d"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert!(
        transactions() > before,
        "no journal commit for the directory's fsync ({info})"
    );
    drop(layer);
    umount(&mnt);
}

/// A write through the view by someone other than the file's owner
/// (a member of its group) clears its setuid bit, and setgid where it
/// means execution, as any Linux filesystem does: a member must not be
/// able to change another's setuid program and keep the bit (a VM
/// mounting the share without `nosuid` would run it as the owner).
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_write_by_another_clears_setuid_and_setgid() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    // The view's parent must be reachable by the writer.
    open_to_others(&view);
    for (name, mode, left) in [
        ("suid", 0o4775, 0o775),
        ("sgid", 0o2775, 0o775),
        ("sgid-noexec", 0o2764, 0o2764),
    ] {
        let f = mnt.join(name);
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::chown(&f, Some(6001), Some(6000)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        let st = Command::new("dd")
            .arg(format!("of={}", view.join(name).display()))
            .args(["conv=notrunc", "oflag=append", "status=none"])
            .stdin(std::process::Stdio::piped())
            .uid(6002)
            .gid(6000)
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(b"echo changed\n")?;
                c.wait()
            })
            .unwrap();
        assert!(st.success(), "{name}: the group member could not write");
        let got = std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
        assert_eq!(got, left, "{name}: {got:o}");
    }
    drop(layer);
    umount(&mnt);
}

/// Extended attributes of the `user.` namespace pass through the view,
/// as the caller: set, read, listed and removed, seen below; a user who
/// may not write the file may not set one. The other namespaces are not
/// served: `trusted.` (which the daemon could set and read, not the
/// caller), `security.` and ACLs are refused to set, and read as absent.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn user_extended_attributes_pass_through_the_view_as_the_caller() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    let f = view.join("f");
    std::fs::write(&f, b"x").unwrap();
    rustix::fs::setxattr(&f, "user.origin", b"forge", rustix::fs::XattrFlags::empty()).unwrap();
    let mut v = [0u8; 64];
    let n = rustix::fs::getxattr(mnt.join("f"), "user.origin", &mut v[..]).unwrap();
    assert_eq!(&v[..n], b"forge", "set below");
    assert_eq!(rustix::fs::getxattr_query(&f, "user.origin").unwrap(), 5);
    let n = rustix::fs::getxattr(&f, "user.origin", &mut v[..]).unwrap();
    assert_eq!(&v[..n], b"forge");
    assert_eq!(
        rustix::fs::getxattr(&f, "user.origin", &mut v[..2]),
        Err(rustix::io::Errno::RANGE)
    );
    // Below, a trusted. attribute: never listed nor read through the view.
    rustix::fs::setxattr(
        mnt.join("f"),
        "trusted.secret",
        b"host",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut list = [0u8; 256];
    let n = rustix::fs::listxattr(&f, &mut list[..]).unwrap();
    assert_eq!(&list[..n], b"user.origin\0");
    assert_eq!(
        rustix::fs::getxattr(&f, "trusted.secret", &mut v[..]),
        Err(rustix::io::Errno::NODATA)
    );
    for name in [
        "trusted.x",
        "security.capability",
        "system.posix_acl_access",
        "security.x",
    ] {
        // Refused by the view (EOPNOTSUPP), or by the kernel before it
        // for a value it checks itself (EINVAL); never set below.
        let set = rustix::fs::setxattr(&f, name, b"\x02\0\0\0", rustix::fs::XattrFlags::empty());
        assert!(
            matches!(
                set,
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL)
            ),
            "{name}: {set:?}"
        );
        assert_eq!(
            rustix::fs::getxattr(mnt.join("f"), name, &mut v[..]),
            Err(rustix::io::Errno::NODATA),
            "{name} set below"
        );
    }
    // Another user, who may read the file and not write it.
    open_to_others(&view);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other = |code: &str| {
        Command::new("/usr/bin/python3")
            .args(["-c", code, f.to_str().unwrap()])
            .uid(6002)
            .gid(6002)
            .output()
            .unwrap()
    };
    let read = other("import os,sys; print(os.getxattr(sys.argv[1], 'user.origin').decode())");
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        "forge",
        "{read:?}"
    );
    let write = other("import os,sys; os.setxattr(sys.argv[1], 'user.other', b'no')");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Permission denied"),
        "{write:?}"
    );
    // Removed, and nothing is served while cut.
    rustix::fs::removexattr(&f, "user.origin").unwrap();
    assert_eq!(
        rustix::fs::getxattr(mnt.join("f"), "user.origin", &mut v[..]),
        Err(rustix::io::Errno::NODATA)
    );
    layer.cut().1.unwrap();
    assert!(rustix::fs::setxattr(&f, "user.later", b"1", rustix::fs::XattrFlags::empty()).is_err());
    drop(layer);
    assert_eq!(
        rustix::fs::getxattr(mnt.join("f"), "user.later", &mut v[..]),
        Err(rustix::io::Errno::NODATA)
    );
    umount(&mnt);
}

/// Times before 1970 (an archive's old files, `touch -d 1960-01-01`)
/// are kept through the view, both ways, to the nanosecond.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn times_before_1970_pass_through_the_view() {
    use std::os::unix::fs::MetadataExt;
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    let f = view.join("old");
    std::fs::write(&f, b"x").unwrap();
    let at = |sec: i64, nsec: i64| rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    // 1960-01-01 plus a quarter second; and a time after 1970.
    let times = rustix::fs::Timestamps {
        last_access: at(1_000_000, 5),
        last_modification: at(-315_619_200, 250_000_000),
    };
    rustix::fs::utimensat(rustix::fs::CWD, &f, &times, rustix::fs::AtFlags::empty()).unwrap();
    let below = std::fs::metadata(mnt.join("old")).unwrap();
    assert_eq!(
        (below.mtime(), below.mtime_nsec()),
        (-315_619_200, 250_000_000)
    );
    assert_eq!((below.atime(), below.atime_nsec()), (1_000_000, 5));
    let through = std::fs::metadata(&f).unwrap();
    assert_eq!(
        (through.mtime(), through.mtime_nsec()),
        (-315_619_200, 250_000_000)
    );
    drop(layer);
    umount(&mnt);
}

/// Lets other users through the directories from the test's own
/// temporary directory down to `dir` (o+x), and no higher.
fn open_to_others(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let top = std::env::temp_dir();
    let mut p = dir.to_path_buf();
    while let Some(up) = p.parent() {
        if !up.starts_with(&top) || up == top {
            break;
        }
        let m = std::fs::metadata(up).unwrap().permissions().mode();
        std::fs::set_permissions(up, std::fs::Permissions::from_mode(m | 0o001)).unwrap();
        p = up.to_path_buf();
    }
}

/// A directory read again from its start (`rewinddir`) through the same
/// descriptor shows it as it is now, not as it was when opened.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_rewound_directory_is_read_again() {
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    std::fs::write(view.join("first"), b"1").unwrap();
    let fd = rustix::fs::open(
        &view,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let mut dir = rustix::fs::Dir::read_from(&fd).unwrap();
    let names = |dir: &mut rustix::fs::Dir| {
        let mut v: Vec<String> = std::iter::from_fn(|| dir.read())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != ".." && n != "lost+found")
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&mut dir), ["first"]);
    std::fs::write(view.join("second"), b"2").unwrap();
    dir.rewind();
    assert_eq!(names(&mut dir), ["first", "second"]);
    drop(dir);
    drop(fd);
    drop(layer);
    umount(&mnt);
}

/// A file opened with `O_APPEND` through the view is written where asked
/// once appending no longer applies: a shared mapping's pages (written
/// back at their offset) and a `pwrite` after `fcntl` turned `O_APPEND`
/// off. Before, the daemon's descriptor, opened with `O_APPEND`, put those
/// bytes at the end of the file. An append still appends.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, python3"]
fn writes_land_where_asked_once_appending_no_longer_applies() {
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    std::fs::write(mnt.join("f"), vec![b'a'; 8192]).unwrap();
    let script = r#"
import fcntl, mmap, os, sys
p = sys.argv[1]
fd = os.open(p, os.O_RDWR | os.O_APPEND)
m = mmap.mmap(fd, 4096)
m[0:5] = b"MAPPD"
m.flush()
m.close()
fl = fcntl.fcntl(fd, fcntl.F_GETFL)
fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_APPEND)
os.pwrite(fd, b"PWRT", 4096)
os.close(fd)
fd = os.open(p, os.O_WRONLY | os.O_APPEND)
os.write(fd, b"END")
os.close(fd)
"#;
    run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(view.join("f")));
    let below = std::fs::read(mnt.join("f")).unwrap();
    assert_eq!(
        below.len(),
        8192 + 3,
        "past the end: {:?}",
        String::from_utf8_lossy(&below[8192.min(below.len())..])
            .chars()
            .take(48)
            .collect::<String>()
    );
    assert_eq!(&below[..5], b"MAPPD", "the mapping's page");
    assert_eq!(&below[4096..4100], b"PWRT", "the pwrite");
    assert_eq!(&below[8192..], b"END", "the append");
    drop(layer);
    umount(&mnt);
}

/// A directory listing read before a cut is not served after it (its
/// names are the data's): reading on gets an error. After the restore, a
/// new listing is the directory as it is.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_listing_read_before_a_cut_is_not_served_after_it() {
    require(NEEDS);
    let (_t, _img, mnt, view, layer) = viewed_ext4();
    for n in ["secret-a", "secret-b"] {
        std::fs::write(mnt.join(n), b"x").unwrap();
    }
    // Opened: the layer reads the whole listing now.
    let mut rd = std::fs::read_dir(&view).unwrap();
    layer.cut().1.unwrap();
    let got = rd.next();
    assert!(matches!(got, Some(Err(_))), "served after the cut: {got:?}");
    drop(rd);
    layer.restore(&mnt).unwrap();
    let names: Vec<std::ffi::OsString> = std::fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().any(|n| n == "secret-a"), "{names:?}");
    // Half read when the cut came: reading on after the restore is an
    // error, never an early end that would look like the whole directory
    // (an `ls` or a backup resumed after a close would skip names).
    for i in 0..1500 {
        std::fs::write(mnt.join(format!("{i:04}-{}", "n".repeat(40))), b"").unwrap();
    }
    let mut rd = std::fs::read_dir(&view).unwrap();
    assert!(rd.next().unwrap().is_ok());
    layer.cut().1.unwrap();
    layer.restore(&mnt).unwrap();
    let rest: Vec<std::io::Result<std::fs::DirEntry>> = rd.collect();
    assert!(
        rest.iter().any(Result::is_err) || rest.len() >= 1500,
        "the listing ended early after {} names, without an error",
        rest.len() + 1
    );
    drop(layer);
    umount(&mnt);
}

/// The layer's own opens never block and never open a FIFO: the kernel
/// opens FIFOs itself, so a FIFO behind a handle the layer is asked to
/// open is an inode number reused since the lookup, refused at once
/// (opened as root, it would wait for a writer with the layer held, and a
/// cut would wait on it). A regular file opens, blocking as asked.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn the_layer_never_opens_a_fifo_nor_blocks() {
    use std::os::fd::AsFd;
    require(NEEDS);
    let (_t, _img, mnt, _view, layer) = viewed_ext4();
    run(Command::new("mkfifo").arg(mnt.join("fifo")));
    std::fs::write(mnt.join("f"), b"x").unwrap();
    let root = File::open(&mnt).unwrap();
    let fifo = coffre_sys::handle::FileHandle::of(root.as_fd(), Path::new("fifo")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = root.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = tx.send(super::state::open_served(&fifo, dir.as_fd(), libc::O_RDONLY).is_err());
    });
    let refused = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the open of a FIFO blocked");
    assert!(refused, "a FIFO was opened");
    let f = coffre_sys::handle::FileHandle::of(root.as_fd(), Path::new("f")).unwrap();
    let fd = super::state::open_served(&f, root.as_fd(), libc::O_RDWR).unwrap();
    let fl = rustix::fs::fcntl_getfl(&fd).unwrap();
    assert!(!fl.contains(rustix::fs::OFlags::NONBLOCK), "{fl:?}");
    drop((fd, root));
    drop(layer);
    umount(&mnt);
}

/// Runs `python3` as `uid` in `dir`: it opens each argument (a file to
/// read; `+name` made anew; `d:name` a directory listed), prints `ok` or
/// the error's name for each, and keeps its files open until its stdin
/// closes. Returns the process and what it printed.
fn holder(uid: u32, dir: &Path, args: &[&str]) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let script = r#"
import errno, os, sys
held = []
for a in sys.argv[1:]:
    try:
        if a.startswith("+"):
            held.append(os.open(a[1:], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        elif a.startswith("d:"):
            os.listdir(a[2:])
        else:
            held.append(os.open(a, os.O_RDONLY))
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
sys.stdin.readline()
"#;
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "/usr/bin/python3", "-c", script])
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let said = (0..args.len())
        .map(|_| {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            l.trim().to_string()
        })
        .collect();
    (child, said)
}

/// Lets `holder`'s process go, and waits for it.
fn release(mut child: std::process::Child) {
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

/// One workload user cannot take the daemon's descriptors or memory
/// through the view (the layer runs in the daemon): past their cap of
/// open files an open or a create fails with `EMFILE` (and makes no
/// file), past everyone's with `ENFILE`, a listing larger than their room
/// with `ENOMEM`; what they close is theirs to open again, and nothing
/// stays counted once everything is closed, across a cut.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, python3, setpriv"]
fn a_user_cannot_take_the_daemons_descriptors_or_memory() {
    use std::os::unix::fs::PermissionsExt;
    require(NEEDS);
    let t = Scratch::new();
    let img = t.path().join("fs.img");
    let mnt = t.mnt.clone();
    let view = t.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    File::create(&img).unwrap().set_len(32 << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let caps = Caps {
        files_per_user: 4,
        files: 6,
        listing_bytes_per_user: 8 << 10,
        listing_bytes: 12 << 10,
    };
    let layer = CutLayer::mount_with(&view, caps).unwrap();
    layer.restore(&mnt).unwrap();
    open_to_others(&view);
    for i in 0..10 {
        std::fs::write(mnt.join(format!("f{i}")), b"x").unwrap();
    }
    std::fs::create_dir(mnt.join("w")).unwrap();
    std::fs::set_permissions(mnt.join("w"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::create_dir(mnt.join("small")).unwrap();
    std::fs::create_dir(mnt.join("big")).unwrap();
    for i in 0..200 {
        std::fs::write(
            mnt.join("big").join(format!("{i:03}-{}", "n".repeat(40))),
            b"",
        )
        .unwrap();
    }

    // Their cap: the fifth open and a create fail, and the create made
    // nothing; the small directory lists, the big one does not.
    let (a, said) = holder(
        5001,
        &view,
        &["f0", "f1", "f2", "f3", "f4", "+w/new", "d:small", "d:big"],
    );
    assert_eq!(
        said,
        ["ok", "ok", "ok", "ok", "EMFILE", "EMFILE", "ok", "ENOMEM"]
    );
    assert!(
        !mnt.join("w/new").exists(),
        "a refused create made its file"
    );
    // Everyone's cap: another user gets two of the six.
    let (b, said) = holder(5002, &view, &["f5", "f6", "f7"]);
    assert_eq!(said, ["ok", "ok", "ENFILE"]);
    release(b);
    // What the first closes is theirs again; a cut and a restore while
    // they hold files count nothing twice.
    layer.cut().1.unwrap();
    layer.restore(&mnt).unwrap();
    release(a);
    let (a, said) = holder(5001, &view, &["f0", "f1", "f2", "+w/new", "d:small"]);
    assert_eq!(said, ["ok", "ok", "ok", "ok", "ok"]);
    release(a);
    // The kernel sends RELEASE after close returns: wait for it.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (held, total) = {
            let maps = layer.layer.lock_maps();
            (maps.held.len(), maps.total)
        };
        if held == 0 && total == state::Held::default() {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "still counted once everything is closed: {held} users, {total:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(layer);
    umount(&mnt);
}

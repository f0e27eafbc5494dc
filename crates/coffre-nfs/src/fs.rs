//! The filesystem behind the server: one export per workload, a
//! directory of the vault's data, where every call is performed as the
//! export's user.
//!
//! There is no kernel permission check in front of this server, so the
//! kernel's own checks are brought in: a handle is opened `O_PATH` by the
//! broker ([`crate::broker`]: `open_by_handle_at` needs
//! `CAP_DAC_READ_SEARCH`, which the server does not hold), which grants
//! nothing by itself, and everything that reads, writes or
//! changes a name or an attribute runs on this thread as the export's
//! user and groups (`setfsuid`, `setfsgid`, the thread's own groups), so
//! ext4 decides and owns new files to that user (the directory's group
//! when it is setgid). Symbolic links are never followed on the server:
//! the client resolves them. `..` at the export's root is the root.

use crate::broker::Handles;
use crate::handle;
use crate::proto::{self, Attr, CreateHow, MknodWhat, Nfs, Sattr, SetTime, Time, status};
use crate::xdr::Writer;
use coffre_sys::caller::AsCaller;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// Largest READ and WRITE (also told to clients by FSINFO).
pub const IO_MAX: u32 = 1 << 20;

/// What the daemon says of one export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// The workload's name.
    pub workload: String,
    /// The only address this export answers (the workload's).
    pub client: Ipv4Addr,
    /// The share, relative to the data root (`shared`, `home/alice`).
    pub share: String,
    /// The directory on the host (the data mount point joined with the
    /// share).
    pub path: PathBuf,
    /// The user every call acts as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// No call changes anything.
    #[serde(default)]
    pub readonly: bool,
    /// Every call is refused (its user is no longer a member).
    #[serde(default)]
    pub denied: bool,
    /// `path` must be the root of a mount (the daemon's own mount of the
    /// share for this server): an empty directory where that mount
    /// failed is never served.
    #[serde(default)]
    pub mounted: bool,
    /// A call that changes a name or an attribute is answered before it
    /// is on stable storage (knfsd's `async`; by default it is synced).
    #[serde(default)]
    pub async_metadata: bool,
}

/// One export, open: its root directory held (`O_PATH`, from the
/// broker).
pub struct Export {
    /// What it is.
    pub spec: ExportSpec,
    tag: [u8; 8],
    root: OwnedFd,
    root_dev: u64,
    root_ino: u64,
    files: Mutex<Files>,
}

type Res = Result<(), u32>;

/// Regular files whose handles this export opened or made lately, so
/// that the calls that follow (a WRITE after a CREATE, the READs of one
/// file) do not each ask the broker again. Only regular files: a
/// directory is asked of the broker each time, which checks that it
/// still lies under the export's root. A file unlinked since is not
/// served from here (the broker then answers STALE); REMOVE, RMDIR and
/// RENAME empty it, so that it pins no removed file's blocks; it is
/// dropped with the export (at each close).
#[derive(Default)]
struct Files {
    by_handle: HashMap<Vec<u8>, OwnedFd>,
    order: VecDeque<Vec<u8>>,
}

/// How many files [`Files`] keeps open (`O_PATH`).
const FILES_KEPT: usize = 256;

impl Files {
    fn get(&self, nfs: &[u8]) -> Option<OwnedFd> {
        self.by_handle.get(nfs).and_then(|f| f.try_clone().ok())
    }

    fn put(&mut self, nfs: &[u8], fd: &OwnedFd) {
        if self.by_handle.contains_key(nfs) {
            return;
        }
        let Ok(f) = fd.try_clone() else { return };
        if self.order.len() >= FILES_KEPT
            && let Some(old) = self.order.pop_front()
        {
            self.by_handle.remove(&old);
        }
        self.order.push_back(nfs.to_vec());
        self.by_handle.insert(nfs.to_vec(), f);
    }

    fn forget(&mut self, nfs: &[u8]) {
        if self.by_handle.remove(nfs).is_some() {
            self.order.retain(|h| h != nfs);
        }
    }

    fn clear(&mut self) {
        self.by_handle.clear();
        self.order.clear();
    }
}

fn errno(e: rustix::io::Errno) -> u32 {
    proto::from_errno(&io::Error::from(e))
}

fn nfs_err(e: io::Error) -> u32 {
    proto::from_errno(&e)
}

fn t(sec: i64, nsec: u64) -> Time {
    Time {
        sec: u32::try_from(sec).unwrap_or(0),
        nsec: u32::try_from(nsec).unwrap_or(0),
    }
}

/// The filesystem id every export reports. Not the device's number: the
/// data is mounted on whichever loop device is free at each open, and a
/// client that sees a directory's fsid change takes it for another
/// filesystem mounted there (an automounted submount: `EXDEV` on rename,
/// `find -xdev` stopping). An export is one share of one filesystem, so
/// one constant does (knfsd's `fsid=` option, the same idea).
pub const FSID: u64 = u64::from_be_bytes(*b"coffre\0\x01");

/// NFS attributes of a `stat`.
pub fn attr(st: &Stat) -> Attr {
    let fmt = st.st_mode & libc::S_IFMT;
    Attr {
        ftype: match fmt {
            libc::S_IFREG => 1,
            libc::S_IFDIR => 2,
            libc::S_IFBLK => 3,
            libc::S_IFCHR => 4,
            libc::S_IFLNK => 5,
            libc::S_IFSOCK => 6,
            _ => 7,
        },
        mode: st.st_mode & 0o7777,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        size: u64::try_from(st.st_size).unwrap_or(0),
        used: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
        rdev: (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev)),
        fsid: FSID,
        fileid: st.st_ino,
        atime: t(st.st_atime, st.st_atime_nsec),
        mtime: t(st.st_mtime, st.st_mtime_nsec),
        ctime: t(st.st_ctime, st.st_ctime_nsec),
    }
}

fn fstat(fd: &OwnedFd) -> Result<Stat, u32> {
    rustix::fs::fstat(fd).map_err(errno)
}

fn open_path(dir: &OwnedFd, name: &CString) -> Result<OwnedFd, u32> {
    rustix::fs::openat(
        dir,
        name.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)
}

/// The path that reopens `fd` (an `O_PATH` descriptor) with the calling
/// thread's identity: the kernel checks the rights on the inode.
fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn reopen(fd: &OwnedFd, flags: OFlags) -> Result<OwnedFd, u32> {
    rustix::fs::open(proc_path(fd), flags | OFlags::CLOEXEC, Mode::empty()).map_err(errno)
}

/// Held while a mode is changed for a moment (owner override) or for
/// good (SETATTR), so that one never puts back a mode the other set.
static MODES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_reg(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

fn is_link(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// A name that may be created or looked up in a directory.
fn entry_name(n: &[u8]) -> Result<CString, u32> {
    if n.is_empty() || n.contains(&b'/') || n.contains(&0) {
        return Err(status::INVAL);
    }
    if n.len() > proto::NAME_MAX {
        return Err(status::NAMETOOLONG);
    }
    CString::new(n).map_err(|_| status::INVAL)
}

/// A name for the calls that make or remove one: never `.` or `..`.
fn new_name(n: &[u8]) -> Result<CString, u32> {
    if n == b"." || n == b".." {
        return Err(status::EXIST);
    }
    entry_name(n)
}

/// What a failed call of each procedure carries after its status: as
/// many "absent" markers as its failure body has optional parts.
pub fn failure_body(call: &Nfs<'_>, w: &mut Writer) {
    let n = match call {
        Nfs::Null | Nfs::Getattr(_) => 0,
        Nfs::Lookup(..)
        | Nfs::Access(..)
        | Nfs::Readlink(_)
        | Nfs::Read(..)
        | Nfs::Readdir { .. }
        | Nfs::Readdirplus { .. }
        | Nfs::Fsstat(_)
        | Nfs::Fsinfo(_)
        | Nfs::Pathconf(_) => 1,
        Nfs::Setattr(..)
        | Nfs::Write { .. }
        | Nfs::Create(..)
        | Nfs::Mkdir(..)
        | Nfs::Symlink(..)
        | Nfs::Mknod(..)
        | Nfs::Remove(..)
        | Nfs::Rmdir(..)
        | Nfs::Commit(_) => 2,
        Nfs::Link(..) => 3,
        Nfs::Rename(..) => 4,
    };
    for _ in 0..n {
        w.bool(false);
    }
}

/// A WRITE verifier, made at each open of the vault (from the boot, this
/// process and the moment). What the server acknowledged unstable sits
/// in the page cache of an ext4 whose blocks go through the daemon's
/// engine: a reboot loses it, so does a daemon that dies while open (the
/// server dies with it), and so does a close whose flush failed (the
/// engine was stopped anyway). The server's process lives across closes:
/// a verifier per open makes clients send again, after each open, what
/// they had not seen committed (and costs them only that resend when
/// nothing was lost).
pub fn write_verifier() -> [u8; 8] {
    use sha2::Digest;
    let now = |c| {
        let t = rustix::time::clock_gettime(c);
        (t.tv_sec.cast_unsigned() << 30) ^ t.tv_nsec.cast_unsigned()
    };
    let mut h = sha2::Sha256::new();
    h.update(boot_id());
    h.update(std::process::id().to_le_bytes());
    h.update(now(rustix::time::ClockId::Monotonic).to_le_bytes());
    h.update(now(rustix::time::ClockId::Realtime).to_le_bytes());
    let mut v = [0; 8];
    v.copy_from_slice(&h.finalize()[..8]);
    v
}

/// The boot's id, read once (a confined server cannot read it later).
fn boot_id() -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .as_bytes()
            .to_vec()
    })
}

/// Whether `dir` is the root of a mount (`STATX_ATTR_MOUNT_ROOT`, Linux
/// 5.8; an older kernel that cannot say is taken for "no").
fn is_mount_root(dir: &OwnedFd) -> io::Result<bool> {
    use rustix::fs::{StatxAttributes, StatxFlags};
    let r = rustix::fs::statx(dir, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)?;
    Ok(r.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
        && r.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
}

/// Opens an export's directory, for the broker (no symbolic link
/// anywhere on its path is followed: the vault's layout has none on the
/// way to a share). Not `O_PATH`: `open_by_handle_at` needs a real
/// descriptor on the filesystem.
pub fn open_root(spec: &ExportSpec) -> io::Result<OwnedFd> {
    let root = rustix::fs::openat2(
        rustix::fs::CWD,
        &spec.path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )?;
    if spec.mounted && !is_mount_root(&root)? {
        return Err(io::Error::other(format!(
            "{} is not mounted (the share's directory could not be mounted at this open: see the audit log)",
            spec.share
        )));
    }
    Ok(root)
}

impl Export {
    /// The export, its root from the broker.
    pub fn open(spec: ExportSpec, hs: &dyn Handles) -> io::Result<Self> {
        let tag = handle::export_tag(&spec.workload, &spec.share);
        let root = hs.root(tag).map_err(|st| {
            io::Error::other(format!(
                "{}: its directory is not open (NFS status {st})",
                spec.share
            ))
        })?;
        let st = rustix::fs::fstat(&root)?;
        Ok(Self {
            tag,
            spec,
            root,
            root_dev: st.st_dev,
            root_ino: st.st_ino,
            files: Mutex::new(Files::default()),
        })
    }

    /// The export root's NFS handle.
    pub fn root_handle(&self, hs: &dyn Handles) -> Result<Vec<u8>, u32> {
        hs.mint(self.tag, self.root.as_fd())
    }

    /// The handle MOUNT gives for `path`: `/` (or empty) is the export's
    /// root, `/SHARE` too (the share's own name, as `showmount` would
    /// suggest it); a deeper path is looked up below it, as the user,
    /// one name at a time (no `..`, no link followed).
    pub fn mount_handle(&self, hs: &dyn Handles, path: &[u8]) -> Result<Vec<u8>, u32> {
        let share = format!("/{}", self.spec.share);
        let rest = path.strip_prefix(share.as_bytes()).unwrap_or(path);
        let mut cur = self.root.try_clone().map_err(nfs_err)?;
        for part in rest.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            if part == b"." || part == b".." {
                return Err(status::NOENT);
            }
            let name = entry_name(part)?;
            let _u = self.as_user()?;
            let next = open_path(&cur, &name)?;
            if !is_dir(&fstat(&next)?) {
                return Err(status::NOTDIR);
            }
            cur = next;
        }
        self.nfs_handle(hs, &cur)
    }

    fn nfs_handle(&self, hs: &dyn Handles, fd: &OwnedFd) -> Result<Vec<u8>, u32> {
        let h = hs.mint(self.tag, fd.as_fd())?;
        if rustix::fs::fstat(fd).is_ok_and(|st| is_reg(&st)) {
            self.files().put(&h, fd);
        }
        Ok(h)
    }

    fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn as_user(&self) -> Result<AsCaller, u32> {
        AsCaller::new(self.spec.uid, self.spec.gid, &self.spec.groups)
            .map_err(|_| status::SERVERFAULT)
    }

    /// As knfsd: the owner of a regular file may always read and write
    /// it, whatever its mode. On NFS the mode is checked when the client
    /// opens, not at each call, so a program goes on using a file whose
    /// mode says otherwise (`git` writes the object it made 0444, `tar`
    /// the read-only file it unpacks, a program the file it `fchmod`ed).
    /// Whether `fd` (pinned by its descriptor) is such a file of the
    /// export's user.
    fn owned(&self, fd: &OwnedFd) -> Result<Stat, u32> {
        let st = fstat(fd)?;
        if st.st_uid != self.spec.uid || !is_reg(&st) {
            return Err(status::ACCES);
        }
        Ok(st)
    }

    /// Reading for the owner the mode refused: opened by the broker
    /// (it may read any file, and checks the owner again), nothing
    /// changed. Called outside the user's identity.
    fn owner_reads(&self, hs: &dyn Handles, fd: &OwnedFd) -> Result<OwnedFd, u32> {
        self.owned(fd)?;
        hs.read_as_owner(self.tag, fd.as_fd())
    }

    /// Writing for the owner the mode refused: the owner's own write bit
    /// is added for the open, as the owner (no right beyond what the
    /// owner has: it could change the mode itself), then taken off the
    /// mode as it is then (a change made meanwhile stays). Refused where
    /// the owner's `chmod` would drop the setgid bit (a group it is not
    /// in). Called as the user.
    fn owner_writes(&self, fd: &OwnedFd) -> Result<OwnedFd, u32> {
        let _m = MODES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = self.owned(fd)?;
        let mode = st.st_mode & 0o7777;
        if mode & 0o200 != 0 {
            // Changed since, or refused for another reason: as it is now.
            return reopen(fd, OFlags::WRONLY);
        }
        if mode & libc::S_ISGID != 0
            && st.st_gid != self.spec.gid
            && !self.spec.groups.contains(&st.st_gid)
        {
            return Err(status::ACCES);
        }
        rustix::fs::chmod(proc_path(fd), Mode::from_raw_mode(mode | 0o200)).map_err(errno)?;
        let opened = reopen(fd, OFlags::WRONLY);
        let now = fstat(fd).map(|st| st.st_mode & 0o7777 & !0o200);
        let back = now
            .and_then(|m| rustix::fs::chmod(proc_path(fd), Mode::from_raw_mode(m)).map_err(errno));
        let f = opened?;
        back?;
        Ok(f)
    }

    /// Applies `s` to a non-link object, as the calling thread's identity
    /// (the export's user).
    fn apply(&self, fd: &OwnedFd, s: &Sattr) -> Res {
        chown(fd, s.uid, s.gid)?;
        if let Some(mode) = s.mode {
            let _m = MODES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rustix::fs::chmod(proc_path(fd), Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
        }
        if let Some(size) = s.size {
            // Opening for writing checks the user's right to change it
            // (the owner's always, as knfsd).
            let f = match reopen(fd, OFlags::WRONLY) {
                Err(status::ACCES) => self.owner_writes(fd)?,
                r => r?,
            };
            rustix::fs::ftruncate(&f, size).map_err(errno)?;
        }
        set_times(fd, s.atime, s.mtime)
    }

    /// Commits a change of names or attributes to stable storage before
    /// the reply, as RFC 1813 asks of CREATE, MKDIR, SYMLINK, MKNOD,
    /// REMOVE, RMDIR, RENAME, LINK and SETATTR, and as knfsd's default
    /// (`sync`) exports do: the Linux client's `fsync` of a directory
    /// sends nothing and counts on it (a database in a VM removing its
    /// journal, a `rename` over a file). `fd` is the directory changed
    /// (for SETATTR, the object), synced by the broker (the user may write
    /// in a directory it cannot read); a FIFO, socket or link is never
    /// opened (SETATTR on one is not synced). Unless the export is
    /// `async_metadata`.
    fn durable(&self, hs: &dyn Handles, fd: &OwnedFd) -> Res {
        if self.spec.async_metadata {
            Ok(())
        } else {
            // The change is made: whatever failed, the answer is IO, which
            // the duplicate-request cache keeps (a SERVERFAULT would make
            // a retransmission run the change again).
            hs.sync(self.tag, fd.as_fd()).map_err(|_| status::IO)
        }
    }

    fn writable(&self) -> Res {
        if self.spec.readonly {
            Err(status::ROFS)
        } else {
            Ok(())
        }
    }

    /// The object behind an NFS handle, opened `O_PATH` by the broker
    /// (which checks the MAC, the filesystem, and that a directory lies
    /// under the export's root), with its attributes.
    fn resolve(&self, hs: &dyn Handles, nfs: &[u8]) -> Result<(OwnedFd, Stat), u32> {
        let kept = self.files().get(nfs);
        if let Some(fd) = kept {
            let st = fstat(&fd)?;
            if st.st_nlink > 0 {
                return Ok((fd, st));
            }
            self.files().forget(nfs);
        }
        let fd = hs.open(self.tag, nfs)?;
        let st = fstat(&fd)?;
        if st.st_dev != self.root_dev {
            return Err(status::STALE);
        }
        if is_reg(&st) {
            self.files().put(nfs, &fd);
        }
        Ok((fd, st))
    }

    fn is_root(&self, st: &Stat) -> bool {
        st.st_dev == self.root_dev && st.st_ino == self.root_ino
    }

    fn attrs(fd: &OwnedFd) -> Option<Attr> {
        rustix::fs::fstat(fd).ok().map(|s| attr(&s))
    }

    /// Runs one NFSv3 call. Writes the status and the results on
    /// success; on failure returns the status (the caller writes the
    /// failure body after it).
    /// Answers one call, under the handle `key` and the WRITE verifier
    /// `verf` of this open.
    pub fn call(&self, hs: &dyn Handles, verf: [u8; 8], c: &Nfs<'_>, w: &mut Writer) -> Res {
        if self.spec.denied && !matches!(c, Nfs::Null) {
            return Err(status::ACCES);
        }
        match *c {
            Nfs::Null => Ok(()),
            Nfs::Getattr(f) => {
                let (_, st) = self.resolve(hs, f)?;
                w.u32(status::OK);
                proto::fattr(w, &attr(&st));
                Ok(())
            }
            Nfs::Setattr(f, ref s, guard) => self.setattr(hs, f, s, guard, w),
            Nfs::Lookup(d, n) => self.lookup(hs, d, n, w),
            Nfs::Access(f, want) => self.access(hs, f, want, w),
            Nfs::Readlink(f) => {
                let (fd, st) = self.resolve(hs, f)?;
                if !is_link(&st) {
                    return Err(status::INVAL);
                }
                let target = rustix::fs::readlinkat(&fd, c"", Vec::new()).map_err(errno)?;
                w.u32(status::OK);
                proto::post_op(w, Some(&attr(&st)));
                w.opaque(target.as_bytes());
                Ok(())
            }
            Nfs::Read(f, offset, count) => self.read(hs, f, offset, count, w),
            Nfs::Write {
                fh,
                offset,
                stable,
                data,
            } => {
                self.write(hs, fh, offset, stable, data, w)?;
                w.fixed(&verf);
                Ok(())
            }
            Nfs::Create(d, n, how) => self.create(hs, d, n, how, w),
            Nfs::Mkdir(d, n, ref s) => self.make(hs, d, n, w, |dir, name| {
                let mode = Mode::from_raw_mode(s.mode.unwrap_or(0o755) & 0o7777);
                rustix::fs::mkdirat(dir, name.as_c_str(), mode)
            }),
            Nfs::Symlink(d, n, _, target) => {
                let target = CString::new(target).map_err(|_| status::INVAL)?;
                self.make(hs, d, n, w, |dir, name| {
                    rustix::fs::symlinkat(target.as_c_str(), dir, name.as_c_str())
                })
            }
            // FIFOs and sockets' names (a guest's program binds its socket
            // on the share: an agent in a home); never a device.
            Nfs::Mknod(d, n, what) => {
                let (ftype, s) = match what {
                    MknodWhat::Fifo(s) => (rustix::fs::FileType::Fifo, s),
                    MknodWhat::Socket(s) => (rustix::fs::FileType::Socket, s),
                    // A device: not made here (EPERM in the guest, where
                    // BADTYPE would read "Unknown error 527").
                    MknodWhat::Device => return Err(status::PERM),
                    MknodWhat::Other => return Err(status::BADTYPE),
                };
                let mode = Mode::from_raw_mode(s.mode.unwrap_or(0o644) & 0o7777);
                self.make(hs, d, n, w, |dir, name| {
                    rustix::fs::mknodat(dir, name.as_c_str(), ftype, mode, 0)
                })
            }
            // Emptied before (what it holds is not served meanwhile) and
            // after (what a call running beside it put back).
            Nfs::Remove(d, n) => {
                self.files().clear();
                let r = self.unlink(hs, d, n, AtFlags::empty(), w);
                self.files().clear();
                r
            }
            Nfs::Rmdir(d, n) => {
                self.files().clear();
                let r = self.unlink(hs, d, n, AtFlags::REMOVEDIR, w);
                self.files().clear();
                r
            }
            Nfs::Rename(fd, fname, td, tname) => {
                self.files().clear();
                self.writable()?;
                let (from, _) = self.resolve(hs, fd)?;
                let (to, _) = self.resolve(hs, td)?;
                let a = new_name(fname)?;
                let b = new_name(tname)?;
                {
                    let _u = self.as_user()?;
                    let r = rustix::fs::renameat(&from, a.as_c_str(), &to, b.as_c_str());
                    self.files().clear();
                    r.map_err(errno)?;
                }
                self.durable(hs, &to)?;
                if fstat(&from)?.st_ino != fstat(&to)?.st_ino {
                    self.durable(hs, &from)?;
                }
                w.u32(status::OK);
                proto::wcc(w, Self::attrs(&from).as_ref());
                proto::wcc(w, Self::attrs(&to).as_ref());
                Ok(())
            }
            Nfs::Link(f, d, n) => {
                self.writable()?;
                let (file, _) = self.resolve(hs, f)?;
                let (dir, _) = self.resolve(hs, d)?;
                let name = new_name(n)?;
                {
                    let _u = self.as_user()?;
                    // The /proc link names the inode itself: the documented
                    // way to link an O_PATH descriptor without
                    // CAP_DAC_READ_SEARCH; the kernel checks the user's
                    // rights (and protected_hardlinks).
                    rustix::fs::linkat(
                        rustix::fs::CWD,
                        proc_path(&file),
                        &dir,
                        name.as_c_str(),
                        AtFlags::SYMLINK_FOLLOW,
                    )
                    .map_err(errno)?;
                }
                self.durable(hs, &dir)?;
                w.u32(status::OK);
                proto::post_op(w, Self::attrs(&file).as_ref());
                proto::wcc(w, Self::attrs(&dir).as_ref());
                Ok(())
            }
            Nfs::Readdir { dir, cookie, count } => {
                self.readdir(hs, dir, cookie, (count, count), false, w)
            }
            Nfs::Readdirplus {
                dir,
                cookie,
                dircount,
                maxcount,
            } => self.readdir(hs, dir, cookie, (dircount, maxcount), true, w),
            Nfs::Fsstat(f) => {
                let (fd, st) = self.resolve(hs, f)?;
                let s = rustix::fs::fstatvfs(&fd).map_err(errno)?;
                let frs = s.f_frsize;
                w.u32(status::OK);
                proto::post_op(w, Some(&attr(&st)));
                w.u64(s.f_blocks.saturating_mul(frs))
                    .u64(s.f_bfree.saturating_mul(frs))
                    .u64(s.f_bavail.saturating_mul(frs))
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u64(s.f_favail)
                    .u32(0);
                Ok(())
            }
            Nfs::Fsinfo(f) => {
                let (_, st) = self.resolve(hs, f)?;
                w.u32(status::OK);
                proto::post_op(w, Some(&attr(&st)));
                w.u32(IO_MAX).u32(IO_MAX).u32(4096);
                w.u32(IO_MAX).u32(IO_MAX).u32(4096);
                w.u32(64 * 1024).u64(i64::MAX as u64).u32(0).u32(1);
                // LINK | SYMLINK | HOMOGENEOUS | CANSETTIME
                w.u32(0x1b);
                Ok(())
            }
            Nfs::Pathconf(f) => {
                let (_, st) = self.resolve(hs, f)?;
                w.u32(status::OK);
                proto::post_op(w, Some(&attr(&st)));
                w.u32(65000).u32(255);
                w.bool(true).bool(true).bool(false).bool(true);
                Ok(())
            }
            Nfs::Commit(f) => {
                let (fd, st) = self.resolve(hs, f)?;
                if is_reg(&st) {
                    // As the user, who wrote it: for reading, or for
                    // writing when the file is write-only to them.
                    let file = {
                        let _u = self.as_user()?;
                        reopen(&fd, OFlags::RDONLY).or_else(|_| reopen(&fd, OFlags::WRONLY))
                    };
                    let file = match file {
                        Err(status::ACCES) => self.owner_reads(hs, &fd)?,
                        r => r?,
                    };
                    rustix::fs::fsync(&file).map_err(errno)?;
                }
                w.u32(status::OK);
                proto::wcc(w, Self::attrs(&fd).as_ref());
                w.fixed(&verf);
                Ok(())
            }
        }
    }

    fn lookup(&self, hs: &dyn Handles, d: &[u8], n: &[u8], w: &mut Writer) -> Res {
        let (dir, dst) = self.resolve(hs, d)?;
        if !is_dir(&dst) {
            return Err(status::NOTDIR);
        }
        let obj = {
            let _u = self.as_user()?;
            if n == b"." || (n == b".." && self.is_root(&dst)) {
                check_search(&dir)?;
                if n == b"." {
                    dir.try_clone().map_err(nfs_err)?
                } else {
                    self.root.try_clone().map_err(nfs_err)?
                }
            } else {
                open_path(&dir, &entry_name_or_dotdot(n)?)?
            }
        };
        let st = fstat(&obj)?;
        let h = self.nfs_handle(hs, &obj)?;
        w.u32(status::OK);
        w.opaque(&h);
        proto::post_op(w, Some(&attr(&st)));
        proto::post_op(w, Self::attrs(&dir).as_ref());
        Ok(())
    }

    fn access(&self, hs: &dyn Handles, f: &[u8], want: u32, w: &mut Writer) -> Res {
        const READ: u32 = 1;
        const LOOKUP: u32 = 2;
        const MODIFY: u32 = 4;
        const EXTEND: u32 = 8;
        const DELETE: u32 = 0x10;
        const EXECUTE: u32 = 0x20;
        use rustix::fs::Access;
        let (fd, st) = self.resolve(hs, f)?;
        let mut granted = 0;
        if is_link(&st) {
            granted = want & READ;
        } else {
            let _u = self.as_user()?;
            let p = proc_path(&fd);
            let may = |a: Access| {
                rustix::fs::accessat(rustix::fs::CWD, p.as_str(), a, AtFlags::EACCESS).is_ok()
            };
            if want & READ != 0 && may(Access::READ_OK) {
                granted |= READ;
            }
            let write = want & (MODIFY | EXTEND | DELETE) != 0 && may(Access::WRITE_OK);
            if is_dir(&st) {
                if want & LOOKUP != 0 && may(Access::EXEC_OK) {
                    granted |= LOOKUP;
                }
                if write {
                    granted |= want & (MODIFY | EXTEND | DELETE);
                }
            } else {
                if write {
                    granted |= want & (MODIFY | EXTEND);
                }
                if want & EXECUTE != 0 && may(Access::EXEC_OK) {
                    granted |= EXECUTE;
                }
            }
        }
        if self.spec.readonly {
            granted &= !(MODIFY | EXTEND | DELETE);
        }
        w.u32(status::OK);
        proto::post_op(w, Some(&attr(&st)));
        w.u32(granted);
        Ok(())
    }

    fn regular(&self, hs: &dyn Handles, f: &[u8]) -> Result<OwnedFd, u32> {
        let (fd, st) = self.resolve(hs, f)?;
        if is_dir(&st) {
            return Err(status::ISDIR);
        }
        if !is_reg(&st) {
            return Err(status::INVAL);
        }
        Ok(fd)
    }

    fn read(&self, hs: &dyn Handles, f: &[u8], offset: u64, count: u32, w: &mut Writer) -> Res {
        let fd = self.regular(hs, f)?;
        let file = {
            let opened = {
                let _u = self.as_user()?;
                reopen(&fd, OFlags::RDONLY)
            };
            std::fs::File::from(match opened {
                Err(status::ACCES) => self.owner_reads(hs, &fd)?,
                r => r?,
            })
        };
        let count = count.min(IO_MAX) as usize;
        // Read straight into the reply, after room for its header.
        let st = fstat(&fd)?;
        let head = w.len();
        w.u32(status::OK);
        proto::post_op(w, Some(&attr(&st)));
        w.u32(0).bool(false).u32(0);
        let data = w.len();
        w.buf.resize(data + count, 0);
        let mut got = 0;
        while got < count {
            match file.read_at(&mut w.buf[data + got..], offset.saturating_add(got as u64)) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    w.buf.truncate(head);
                    return Err(nfs_err(e));
                }
            }
        }
        w.buf.truncate(data + got);
        w.buf.extend_from_slice(&[0; 3][..crate::xdr::pad(got)]);
        // Attributes after the read (size for EOF), then the counts.
        let st = fstat(&fd).unwrap_or(st);
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let eof = offset.saturating_add(got as u64) >= size;
        let mut fix = Writer::with_capacity(100);
        fix.u32(status::OK);
        proto::post_op(&mut fix, Some(&attr(&st)));
        let n = u32::try_from(got).unwrap_or(0);
        fix.u32(n).bool(eof).u32(n);
        w.buf[head..data].copy_from_slice(&fix.buf);
        Ok(())
    }

    fn write(
        &self,
        hs: &dyn Handles,
        f: &[u8],
        offset: u64,
        stable: u32,
        data: &[u8],
        w: &mut Writer,
    ) -> Res {
        self.writable()?;
        let fd = self.regular(hs, f)?;
        let file = {
            let _u = self.as_user()?;
            std::fs::File::from(match reopen(&fd, OFlags::WRONLY) {
                Err(status::ACCES) => self.owner_writes(&fd)?,
                r => r?,
            })
        };
        file.write_all_at(data, offset).map_err(nfs_err)?;
        if stable != 0 {
            file.sync_data().map_err(nfs_err)?;
        }
        w.u32(status::OK);
        proto::wcc(w, Self::attrs(&fd).as_ref());
        w.u32(u32::try_from(data.len()).unwrap_or(0))
            .u32(if stable == 0 { 0 } else { 2 });
        // (The verifier follows: the caller's.)
        Ok(())
    }

    fn create(&self, hs: &dyn Handles, d: &[u8], n: &[u8], how: CreateHow, w: &mut Writer) -> Res {
        self.writable()?;
        let (dir, dst) = self.resolve(hs, d)?;
        if !is_dir(&dst) {
            return Err(status::NOTDIR);
        }
        let name = new_name(n)?;
        let file = {
            let _u = self.as_user()?;
            // Always O_EXCL: an existing name is looked at with O_PATH,
            // never opened (a FIFO would block the thread, a device would
            // be touched). O_NONBLOCK for the same reason.
            let excl = OFlags::RDONLY
                | OFlags::NOFOLLOW
                | OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NONBLOCK
                | OFlags::CLOEXEC;
            let create = |mode: u32| {
                rustix::fs::openat(&dir, name.as_c_str(), excl, Mode::from_raw_mode(mode))
            };
            let existing = || -> Result<OwnedFd, u32> {
                let f = open_path(&dir, &name)?;
                let st = fstat(&f)?;
                if is_dir(&st) {
                    return Err(status::ISDIR);
                }
                if !is_reg(&st) {
                    return Err(status::EXIST);
                }
                Ok(f)
            };
            match how {
                CreateHow::Unchecked(s) | CreateHow::Guarded(s) => {
                    let f = match create(s.mode.unwrap_or(0o600) & 0o7777) {
                        Ok(f) => f,
                        Err(rustix::io::Errno::EXIST) if matches!(how, CreateHow::Unchecked(_)) => {
                            existing()?
                        }
                        Err(e) => return Err(errno(e)),
                    };
                    let rest = Sattr { mode: None, ..s };
                    if rest != Sattr::NONE {
                        self.apply(&f, &rest)?;
                    }
                    f
                }
                CreateHow::Exclusive(verf) => {
                    let t = verifier_time(verf);
                    match create(0o600) {
                        Ok(f) => {
                            set_times(&f, SetTime::To(t), SetTime::To(t))?;
                            f
                        }
                        Err(rustix::io::Errno::EXIST) => {
                            // A retransmission finds the file it made.
                            let f = existing()?;
                            let st = fstat(&f)?;
                            if attr(&st).mtime != t {
                                return Err(status::EXIST);
                            }
                            f
                        }
                        Err(e) => return Err(errno(e)),
                    }
                }
            }
        };
        self.durable(hs, &dir)?;
        let h = self.nfs_handle(hs, &file)?;
        w.u32(status::OK);
        w.bool(true).opaque(&h);
        proto::post_op(w, Self::attrs(&file).as_ref());
        proto::wcc(w, Self::attrs(&dir).as_ref());
        Ok(())
    }

    /// MKDIR, SYMLINK and MKNOD: `make` creates the name as the user,
    /// then the new object's handle is returned.
    fn make(
        &self,
        hs: &dyn Handles,
        d: &[u8],
        n: &[u8],
        w: &mut Writer,
        make: impl FnOnce(&OwnedFd, &CString) -> rustix::io::Result<()>,
    ) -> Res {
        self.writable()?;
        let (dir, dst) = self.resolve(hs, d)?;
        if !is_dir(&dst) {
            return Err(status::NOTDIR);
        }
        let name = new_name(n)?;
        let obj = {
            let _u = self.as_user()?;
            make(&dir, &name).map_err(errno)?;
            open_path(&dir, &name)?
        };
        self.durable(hs, &dir)?;
        let h = self.nfs_handle(hs, &obj)?;
        w.u32(status::OK);
        w.bool(true).opaque(&h);
        proto::post_op(w, Self::attrs(&obj).as_ref());
        proto::wcc(w, Self::attrs(&dir).as_ref());
        Ok(())
    }

    fn unlink(&self, hs: &dyn Handles, d: &[u8], n: &[u8], flags: AtFlags, w: &mut Writer) -> Res {
        self.writable()?;
        let (dir, dst) = self.resolve(hs, d)?;
        if !is_dir(&dst) {
            return Err(status::NOTDIR);
        }
        if n == b"." || n == b".." {
            return Err(if flags.is_empty() {
                status::ACCES
            } else {
                status::INVAL
            });
        }
        let name = entry_name(n)?;
        {
            let _u = self.as_user()?;
            rustix::fs::unlinkat(&dir, name.as_c_str(), flags).map_err(errno)?;
        }
        self.durable(hs, &dir)?;
        w.u32(status::OK);
        proto::wcc(w, Self::attrs(&dir).as_ref());
        Ok(())
    }

    fn setattr(
        &self,
        hs: &dyn Handles,
        f: &[u8],
        s: &Sattr,
        guard: Option<Time>,
        w: &mut Writer,
    ) -> Res {
        self.writable()?;
        let (fd, st) = self.resolve(hs, f)?;
        if let Some(g) = guard
            && attr(&st).ctime != g
        {
            return Err(status::NOT_SYNC);
        }
        if s.size.is_some() && !is_reg(&st) {
            return Err(if is_dir(&st) {
                status::ISDIR
            } else {
                status::INVAL
            });
        }
        {
            let _u = self.as_user()?;
            if is_link(&st) {
                // Links have no mode of their own and their times are
                // left alone; their owner may change.
                chown(&fd, s.uid, s.gid)?;
            } else {
                self.apply(&fd, s)?;
            }
        }
        self.durable(hs, &fd)?;
        w.u32(status::OK);
        proto::wcc(w, Self::attrs(&fd).as_ref());
        Ok(())
    }

    /// READDIR and READDIRPLUS. Cookies are the directory's own offsets
    /// (ext4: hash positions), valid as long as the directory exists, so
    /// the verifier is always zero.
    fn readdir(
        &self,
        hs: &dyn Handles,
        d: &[u8],
        cookie: u64,
        (dircount, maxcount): (u32, u32),
        plus: bool,
        w: &mut Writer,
    ) -> Res {
        let (dirp, dst) = self.resolve(hs, d)?;
        if !is_dir(&dst) {
            return Err(status::NOTDIR);
        }
        let at_root = self.is_root(&dst);
        let _u = self.as_user()?;
        let dir = reopen(&dirp, OFlags::RDONLY | OFlags::DIRECTORY)?;
        rustix::fs::seek(&dir, rustix::fs::SeekFrom::Start(cookie))
            .map_err(|_| status::BAD_COOKIE)?;
        let maxcount = (maxcount as usize).min(IO_MAX as usize);
        let dircount = (dircount as usize).max(512);
        let mut body = Writer::with_capacity(maxcount.min(64 * 1024));
        // The reply's own parts (status, attributes, verifier, the two
        // closing booleans).
        let fixed = 4 + 88 + 4 + 8 + 8;
        let mut used_dir = 0usize;
        let mut any = false;
        let mut eof = true;
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 32 * 1024];
        let mut entries = rustix::fs::RawDir::new(&dir, &mut buf);
        while let Some(ent) = entries.next() {
            let ent = ent.map_err(errno)?;
            let name = ent.file_name().to_bytes();
            let fileid = if name == b".." && at_root {
                self.root_ino
            } else {
                ent.ino()
            };
            let mut e = Writer::with_capacity(64 + name.len());
            e.bool(true)
                .u64(fileid)
                .opaque(name)
                .u64(ent.next_entry_cookie());
            let dir_part = e.len();
            if plus {
                self.entry_plus(hs, &dirp, &dir, name, at_root, &mut e);
            }
            if used_dir + dir_part > dircount || fixed + body.len() + e.len() > maxcount {
                if !any {
                    return Err(status::TOOSMALL);
                }
                eof = false;
                break;
            }
            used_dir += dir_part;
            body.buf.extend_from_slice(&e.buf);
            any = true;
        }
        w.u32(status::OK);
        proto::post_op(w, Some(&attr(&dst)));
        w.fixed(&[0; 8]);
        w.buf.extend_from_slice(&body.buf);
        w.bool(false).bool(eof);
        Ok(())
    }

    /// READDIRPLUS's attributes and handle of one entry (absent when the
    /// user may not look it up).
    fn entry_plus(
        &self,
        hs: &dyn Handles,
        dirp: &OwnedFd,
        dir: &OwnedFd,
        name: &[u8],
        at_root: bool,
        e: &mut Writer,
    ) {
        let obj = if name == b"." {
            dirp.try_clone().ok()
        } else if name == b".." && at_root {
            self.root.try_clone().ok()
        } else {
            CString::new(name)
                .ok()
                .and_then(|n| open_path(dir, &n).ok())
        };
        let st = obj.as_ref().and_then(Self::attrs);
        proto::post_op(e, st.as_ref());
        // Not kept in `files`: a listing would push out the files in use.
        match obj.and_then(|o| hs.mint(self.tag, o.as_fd()).ok()) {
            Some(h) => {
                e.bool(true).opaque(&h);
            }
            None => {
                e.bool(false);
            }
        }
    }
}

/// `..` is looked up like any name below the export's root (the root's
/// own `..` is handled before).
fn entry_name_or_dotdot(n: &[u8]) -> Result<CString, u32> {
    if n == b".." {
        return Ok(CString::from(c".."));
    }
    entry_name(n)
}

fn check_search(dir: &OwnedFd) -> Res {
    rustix::fs::accessat(
        rustix::fs::CWD,
        proc_path(dir).as_str(),
        rustix::fs::Access::EXEC_OK,
        AtFlags::EACCESS,
    )
    .map_err(errno)
}

fn chown(fd: &OwnedFd, uid: Option<u32>, gid: Option<u32>) -> Res {
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    rustix::fs::chownat(
        fd,
        c"",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
}

fn set_times(fd: &OwnedFd, atime: SetTime, mtime: SetTime) -> Res {
    if atime == SetTime::Keep && mtime == SetTime::Keep {
        return Ok(());
    }
    let spec = |t: SetTime| match t {
        SetTime::Keep => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        SetTime::Now => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        SetTime::To(t) => rustix::fs::Timespec {
            tv_sec: i64::from(t.sec),
            tv_nsec: t.nsec.min(999_999_999).into(),
        },
    };
    let times = rustix::fs::Timestamps {
        last_access: spec(atime),
        last_modification: spec(mtime),
    };
    rustix::fs::utimensat(rustix::fs::CWD, proc_path(fd), &times, AtFlags::empty()).map_err(errno)
}

/// The time an exclusive CREATE's verifier is kept in (mtime and atime),
/// so that its retransmission recognises the file.
fn verifier_time(v: [u8; 8]) -> Time {
    Time {
        sec: u32::from_be_bytes([v[0], v[1], v[2], v[3]]) & 0x7fff_ffff,
        nsec: u32::from_be_bytes([v[4], v[5], v[6], v[7]]) % 1_000_000_000,
    }
}

/// Reads, once, what the server needs from outside the data (the boot's
/// id, for the WRITE verifiers): a confined server can no longer read it.
pub fn prime() {
    boot_id();
}

#[cfg(test)]
mod tests {
    /// The fsid a client sees does not follow the loop device the data
    /// happens to be on at this open.
    #[test]
    fn the_fsid_is_the_same_on_any_device() {
        let here = rustix::fs::stat(".").unwrap();
        let root = rustix::fs::stat("/proc").unwrap();
        assert_ne!(here.st_dev, root.st_dev);
        assert_eq!(super::attr(&here).fsid, super::FSID);
        assert_eq!(super::attr(&root).fsid, super::FSID);
    }

    /// A verifier is made for each open, not once per boot: two made one
    /// after the other differ (that one open keeps its own is tested with
    /// the server, `the_write_verifier_changes_at_each_open`).
    #[test]
    fn each_open_has_its_own_write_verifier() {
        let a = super::write_verifier();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = super::write_verifier();
        assert_ne!(a, b);
        assert_ne!(a, [0; 8]);
    }
}

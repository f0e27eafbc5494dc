//! NFSv3 (RFC 1813), MOUNT v3 and portmapper v2 messages: the
//! procedures' arguments decoded into plain values (pure, fuzzed), the
//! status codes, and the attribute encodings the replies share.

use crate::xdr::{Reader, Writer, XdrError};

/// NFSv3 status codes (`nfsstat3`) this server sends.
#[allow(missing_docs)]
pub mod status {
    pub const OK: u32 = 0;
    pub const PERM: u32 = 1;
    pub const NOENT: u32 = 2;
    pub const IO: u32 = 5;
    pub const NXIO: u32 = 6;
    pub const ACCES: u32 = 13;
    pub const EXIST: u32 = 17;
    pub const XDEV: u32 = 18;
    pub const NODEV: u32 = 19;
    pub const NOTDIR: u32 = 20;
    pub const ISDIR: u32 = 21;
    pub const INVAL: u32 = 22;
    pub const FBIG: u32 = 27;
    pub const NOSPC: u32 = 28;
    pub const ROFS: u32 = 30;
    pub const MLINK: u32 = 31;
    pub const NAMETOOLONG: u32 = 63;
    pub const NOTEMPTY: u32 = 66;
    pub const DQUOT: u32 = 69;
    pub const STALE: u32 = 70;
    pub const BADHANDLE: u32 = 10001;
    pub const NOT_SYNC: u32 = 10002;
    pub const BAD_COOKIE: u32 = 10003;
    pub const NOTSUPP: u32 = 10004;
    pub const TOOSMALL: u32 = 10005;
    pub const SERVERFAULT: u32 = 10006;
    pub const BADTYPE: u32 = 10007;
    pub const JUKEBOX: u32 = 10008;
}

/// The NFS status for an error of the filesystem.
pub fn from_errno(e: &std::io::Error) -> u32 {
    use status::*;
    match e.raw_os_error().unwrap_or(0) {
        libc::EPERM => PERM,
        libc::ENOENT => NOENT,
        libc::EIO => IO,
        libc::ENXIO => NXIO,
        libc::EACCES => ACCES,
        libc::EEXIST => EXIST,
        libc::EXDEV => XDEV,
        libc::ENODEV => NODEV,
        libc::ENOTDIR => NOTDIR,
        libc::EISDIR => ISDIR,
        libc::EINVAL => INVAL,
        libc::EFBIG => FBIG,
        libc::ENOSPC => NOSPC,
        libc::EROFS => ROFS,
        libc::EMLINK => MLINK,
        libc::ENAMETOOLONG => NAMETOOLONG,
        libc::ENOTEMPTY => NOTEMPTY,
        libc::EDQUOT => DQUOT,
        libc::ESTALE => STALE,
        libc::ELOOP => INVAL,
        // The filesystem does not do it (a guest's program falls back):
        // not a fault of the server's.
        libc::EOPNOTSUPP => NOTSUPP,
        _ => SERVERFAULT,
    }
}

/// Longest file name (ext4's).
pub const NAME_MAX: usize = 255;
/// Longest symbolic link target.
pub const PATH_MAX: u32 = 4096;

/// A time as NFS carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    /// Seconds since the epoch.
    pub sec: u32,
    /// Nanoseconds.
    pub nsec: u32,
}

/// How SETATTR (and the creating calls) set a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// Leave it.
    Keep,
    /// The server's clock.
    Now,
    /// This time.
    To(Time),
}

/// `sattr3`: what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sattr {
    /// New mode bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// Access time.
    pub atime: SetTime,
    /// Modification time.
    pub mtime: SetTime,
}

impl Sattr {
    /// Nothing to change.
    pub const NONE: Sattr = Sattr {
        mode: None,
        uid: None,
        gid: None,
        size: None,
        atime: SetTime::Keep,
        mtime: SetTime::Keep,
    };
}

/// How CREATE creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateHow {
    /// Create or truncate as the attributes say.
    Unchecked(Sattr),
    /// Fail if the name exists.
    Guarded(Sattr),
    /// Exactly once, recognised again by this verifier.
    Exclusive([u8; 8]),
}

/// What MKNOD makes (`mknoddata3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MknodWhat {
    /// A FIFO (`NF3FIFO`), with its attributes.
    Fifo(Sattr),
    /// A UNIX socket's name (`NF3SOCK`), with its attributes: what a
    /// guest's program binds on an NFS mount (an agent's socket in a
    /// home).
    Socket(Sattr),
    /// A character or block device (`NF3CHR`, `NF3BLK`): never made.
    Device,
    /// A type MKNOD does not make (`NF3REG`, `NF3DIR`, `NF3LNK`).
    Other,
}

/// One NFSv3 call, decoded. Handles are borrowed from the message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Nfs<'a> {
    Null,
    Getattr(&'a [u8]),
    Setattr(&'a [u8], Sattr, Option<Time>),
    Lookup(&'a [u8], &'a [u8]),
    Access(&'a [u8], u32),
    Readlink(&'a [u8]),
    Read(&'a [u8], u64, u32),
    Write {
        fh: &'a [u8],
        offset: u64,
        stable: u32,
        data: &'a [u8],
    },
    Create(&'a [u8], &'a [u8], CreateHow),
    Mkdir(&'a [u8], &'a [u8], Sattr),
    Symlink(&'a [u8], &'a [u8], Sattr, &'a [u8]),
    Mknod(&'a [u8], &'a [u8], MknodWhat),
    Remove(&'a [u8], &'a [u8]),
    Rmdir(&'a [u8], &'a [u8]),
    Rename(&'a [u8], &'a [u8], &'a [u8], &'a [u8]),
    Link(&'a [u8], &'a [u8], &'a [u8]),
    Readdir {
        dir: &'a [u8],
        cookie: u64,
        count: u32,
    },
    Readdirplus {
        dir: &'a [u8],
        cookie: u64,
        dircount: u32,
        maxcount: u32,
    },
    Fsstat(&'a [u8]),
    Fsinfo(&'a [u8]),
    Pathconf(&'a [u8]),
    Commit(&'a [u8]),
}

impl Nfs<'_> {
    /// Whether running it twice differs from running it once: such calls
    /// go through the duplicate-request cache.
    pub fn is_idempotent(&self) -> bool {
        !matches!(
            self,
            Nfs::Setattr(..)
                | Nfs::Create(..)
                | Nfs::Mkdir(..)
                | Nfs::Symlink(..)
                | Nfs::Mknod(..)
                | Nfs::Remove(..)
                | Nfs::Rmdir(..)
                | Nfs::Rename(..)
                | Nfs::Link(..)
        )
    }
}

fn fh<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], XdrError> {
    r.opaque(64)
}

/// File names: longer than NAME_MAX ones decode (and get NAMETOOLONG
/// later); beyond 1024 bytes the message is garbage.
fn name<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], XdrError> {
    r.opaque(1024)
}

fn time(r: &mut Reader<'_>) -> Result<Time, XdrError> {
    Ok(Time {
        sec: r.u32()?,
        nsec: r.u32()?,
    })
}

fn set_time(r: &mut Reader<'_>) -> Result<SetTime, XdrError> {
    match r.u32()? {
        0 => Ok(SetTime::Keep),
        1 => Ok(SetTime::Now),
        2 => Ok(SetTime::To(time(r)?)),
        v => Err(XdrError::BadValue(v)),
    }
}

fn opt_u32(r: &mut Reader<'_>) -> Result<Option<u32>, XdrError> {
    Ok(if r.bool()? { Some(r.u32()?) } else { None })
}

fn sattr(r: &mut Reader<'_>) -> Result<Sattr, XdrError> {
    Ok(Sattr {
        mode: opt_u32(r)?,
        uid: opt_u32(r)?,
        gid: opt_u32(r)?,
        size: if r.bool()? { Some(r.u64()?) } else { None },
        atime: set_time(r)?,
        mtime: set_time(r)?,
    })
}

/// Decodes the arguments of NFSv3 procedure `proc_`. `Ok(None)`: no such
/// procedure.
pub fn decode_nfs(proc_: u32, args: &[u8]) -> Result<Option<Nfs<'_>>, XdrError> {
    let r = &mut Reader::new(args);
    Ok(Some(match proc_ {
        0 => Nfs::Null,
        1 => Nfs::Getattr(fh(r)?),
        2 => {
            let f = fh(r)?;
            let s = sattr(r)?;
            let guard = if r.bool()? { Some(time(r)?) } else { None };
            Nfs::Setattr(f, s, guard)
        }
        3 => Nfs::Lookup(fh(r)?, name(r)?),
        4 => Nfs::Access(fh(r)?, r.u32()?),
        5 => Nfs::Readlink(fh(r)?),
        6 => Nfs::Read(fh(r)?, r.u64()?, r.u32()?),
        7 => {
            let f = fh(r)?;
            let offset = r.u64()?;
            let count = r.u32()?;
            let stable = r.u32()?;
            if stable > 2 {
                return Err(XdrError::BadValue(stable));
            }
            let data = r.opaque(crate::fs::IO_MAX)?;
            if data.len() != count as usize {
                return Err(XdrError::BadValue(count));
            }
            Nfs::Write {
                fh: f,
                offset,
                stable,
                data,
            }
        }
        8 => {
            let d = fh(r)?;
            let n = name(r)?;
            let how = match r.u32()? {
                0 => CreateHow::Unchecked(sattr(r)?),
                1 => CreateHow::Guarded(sattr(r)?),
                2 => {
                    let mut v = [0; 8];
                    v.copy_from_slice(r.fixed(8)?);
                    CreateHow::Exclusive(v)
                }
                v => return Err(XdrError::BadValue(v)),
            };
            Nfs::Create(d, n, how)
        }
        9 => Nfs::Mkdir(fh(r)?, name(r)?, sattr(r)?),
        10 => {
            let d = fh(r)?;
            let n = name(r)?;
            let s = sattr(r)?;
            Nfs::Symlink(d, n, s, r.opaque(PATH_MAX)?)
        }
        11 => {
            let d = fh(r)?;
            let n = name(r)?;
            let what = match r.u32()? {
                3 | 4 => {
                    sattr(r)?;
                    r.fixed(8)?; // specdata3: major, minor
                    MknodWhat::Device
                }
                6 => MknodWhat::Socket(sattr(r)?),
                7 => MknodWhat::Fifo(sattr(r)?),
                1 | 2 | 5 => MknodWhat::Other,
                v => return Err(XdrError::BadValue(v)),
            };
            Nfs::Mknod(d, n, what)
        }
        12 => Nfs::Remove(fh(r)?, name(r)?),
        13 => Nfs::Rmdir(fh(r)?, name(r)?),
        14 => Nfs::Rename(fh(r)?, name(r)?, fh(r)?, name(r)?),
        15 => Nfs::Link(fh(r)?, fh(r)?, name(r)?),
        16 => {
            let dir = fh(r)?;
            let cookie = r.u64()?;
            r.fixed(8)?;
            Nfs::Readdir {
                dir,
                cookie,
                count: r.u32()?,
            }
        }
        17 => {
            let dir = fh(r)?;
            let cookie = r.u64()?;
            r.fixed(8)?;
            Nfs::Readdirplus {
                dir,
                cookie,
                dircount: r.u32()?,
                maxcount: r.u32()?,
            }
        }
        18 => Nfs::Fsstat(fh(r)?),
        19 => Nfs::Fsinfo(fh(r)?),
        20 => Nfs::Pathconf(fh(r)?),
        21 => {
            let f = fh(r)?;
            r.u64()?;
            r.u32()?;
            Nfs::Commit(f)
        }
        _ => return Ok(None),
    }))
}

/// One MOUNT v3 call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount<'a> {
    /// Ping.
    Null,
    /// The root handle of this path.
    Mnt(&'a [u8]),
    /// Who mounted what (this server answers: nobody).
    Dump,
    /// Forget a mount.
    Umnt(&'a [u8]),
    /// Forget all mounts of the caller.
    Umntall,
    /// The export list.
    Export,
}

/// Decodes a MOUNT v3 call. `Ok(None)`: no such procedure.
pub fn decode_mount(proc_: u32, args: &[u8]) -> Result<Option<Mount<'_>>, XdrError> {
    let r = &mut Reader::new(args);
    Ok(Some(match proc_ {
        0 => Mount::Null,
        1 => Mount::Mnt(r.opaque(1024)?),
        2 => Mount::Dump,
        3 => Mount::Umnt(r.opaque(1024)?),
        4 => Mount::Umntall,
        5 => Mount::Export,
        _ => return Ok(None),
    }))
}

/// A portmapper GETPORT question: program, version, protocol (6 TCP, 17
/// UDP). `Ok(None)` for NULL.
pub fn decode_getport(args: &[u8]) -> Result<(u32, u32, u32), XdrError> {
    let r = &mut Reader::new(args);
    let prog = r.u32()?;
    let vers = r.u32()?;
    let prot = r.u32()?;
    r.u32()?;
    Ok((prog, vers, prot))
}

/// A file's attributes, as `fattr3` carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    /// NF3REG 1, NF3DIR 2, NF3BLK 3, NF3CHR 4, NF3LNK 5, NF3SOCK 6, NF3FIFO 7.
    pub ftype: u32,
    /// Permission bits (and setuid, setgid, sticky).
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Bytes allocated.
    pub used: u64,
    /// Device numbers (major, minor) of a device file.
    pub rdev: (u32, u32),
    /// The filesystem.
    pub fsid: u64,
    /// The inode number.
    pub fileid: u64,
    /// Access time.
    pub atime: Time,
    /// Modification time.
    pub mtime: Time,
    /// Change time.
    pub ctime: Time,
}

/// `fattr3`.
pub fn fattr(w: &mut Writer, a: &Attr) {
    w.u32(a.ftype)
        .u32(a.mode)
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid)
        .u64(a.size)
        .u64(a.used)
        .u32(a.rdev.0)
        .u32(a.rdev.1)
        .u64(a.fsid)
        .u64(a.fileid);
    for t in [a.atime, a.mtime, a.ctime] {
        w.u32(t.sec).u32(t.nsec);
    }
}

/// `post_op_attr`.
pub fn post_op(w: &mut Writer, st: Option<&Attr>) {
    match st {
        Some(st) => {
            w.bool(true);
            fattr(w, st);
        }
        None => {
            w.bool(false);
        }
    }
}

/// `wcc_data` with no pre-operation attributes (the client then drops
/// its caches for the object, which is always correct).
pub fn wcc(w: &mut Writer, after: Option<&Attr>) {
    w.bool(false);
    post_op(w, after);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_write_and_checks_its_count() {
        let mut w = Writer::default();
        w.opaque(&[9; 38]).u64(4096).u32(3).u32(2).opaque(b"abc");
        match decode_nfs(7, &w.buf).unwrap().unwrap() {
            Nfs::Write {
                fh,
                offset,
                stable,
                data,
            } => {
                assert_eq!((fh.len(), offset, stable, data), (38, 4096, 2, &b"abc"[..]));
            }
            other => panic!("{other:?}"),
        }
        let mut w = Writer::default();
        w.opaque(&[9; 38]).u64(0).u32(4).u32(0).opaque(b"abc");
        assert!(decode_nfs(7, &w.buf).is_err());
    }

    #[test]
    fn decodes_sattr_and_create_modes() {
        let mut w = Writer::default();
        w.opaque(&[1; 20]).opaque(b"f");
        w.u32(1); // GUARDED
        w.bool(true)
            .u32(0o640)
            .bool(false)
            .bool(false)
            .bool(true)
            .u64(0);
        w.u32(2).u32(5).u32(6).u32(1);
        let c = decode_nfs(8, &w.buf).unwrap().unwrap();
        assert_eq!(
            c,
            Nfs::Create(
                &[1; 20],
                b"f",
                CreateHow::Guarded(Sattr {
                    mode: Some(0o640),
                    uid: None,
                    gid: None,
                    size: Some(0),
                    atime: SetTime::To(Time { sec: 5, nsec: 6 }),
                    mtime: SetTime::Now,
                })
            )
        );
        assert!(!c.is_idempotent());
        assert_eq!(decode_nfs(22, &[]), Ok(None));
        assert!(
            decode_nfs(1, &[0, 0, 0, 65]).is_err(),
            "handle over 64 bytes"
        );
    }

    #[test]
    fn filesystem_errors_get_their_status() {
        let st = |e: i32| from_errno(&std::io::Error::from_raw_os_error(e));
        assert_eq!(st(libc::EACCES), status::ACCES);
        assert_eq!(st(libc::EOPNOTSUPP), status::NOTSUPP);
        assert_eq!(st(libc::ENOTSUP), status::NOTSUPP);
        assert_eq!(st(libc::ELOOP), status::INVAL);
        assert_eq!(st(libc::ENOMEM), status::SERVERFAULT);
    }

    #[test]
    fn decodes_mknod_by_its_type() {
        let args = |ftype: u32, tail: &dyn Fn(&mut Writer)| {
            let mut w = Writer::default();
            w.opaque(&[1; 20]).opaque(b"p").u32(ftype);
            tail(&mut w);
            w.buf
        };
        let mode = |w: &mut Writer| {
            w.bool(true)
                .u32(0o600)
                .bool(false)
                .bool(false)
                .bool(false)
                .u32(0)
                .u32(0);
        };
        let s = Sattr {
            mode: Some(0o600),
            ..Sattr::NONE
        };
        let fifo = args(7, &mode);
        let c = decode_nfs(11, &fifo).unwrap().unwrap();
        assert_eq!(c, Nfs::Mknod(&[1; 20], b"p", MknodWhat::Fifo(s)));
        assert!(!c.is_idempotent());
        let sock = args(6, &mode);
        assert_eq!(
            decode_nfs(11, &sock).unwrap().unwrap(),
            Nfs::Mknod(&[1; 20], b"p", MknodWhat::Socket(s))
        );
        // A device's numbers are read (and it is never made); without
        // them the message is short.
        let chr = args(4, &|w| {
            mode(w);
            w.u32(1).u32(3);
        });
        assert_eq!(
            decode_nfs(11, &chr).unwrap().unwrap(),
            Nfs::Mknod(&[1; 20], b"p", MknodWhat::Device)
        );
        assert!(decode_nfs(11, &args(3, &mode)).is_err());
        let reg = args(1, &|_| {});
        assert_eq!(
            decode_nfs(11, &reg).unwrap().unwrap(),
            Nfs::Mknod(&[1; 20], b"p", MknodWhat::Other)
        );
        assert!(decode_nfs(11, &args(8, &|_| {})).is_err(), "no type 8");
        assert!(decode_nfs(11, &args(7, &|_| {})).is_err(), "no attributes");
    }
}

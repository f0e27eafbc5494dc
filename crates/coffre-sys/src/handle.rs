//! File handles (`name_to_handle_at`, `open_by_handle_at`): a name for a
//! file that survives closing every descriptor and remounting its
//! filesystem (ext4 encodes the inode number and generation), so a layer
//! can let go of a filesystem and find the same files again afterwards.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const MAX: usize = 128;
/// The same, as the kernel's field type.
const MAX_BYTES: libc::c_uint = 128;

/// The kernel's `struct file_handle` with room for the largest handle.
#[repr(C)]
struct Raw {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX],
}

/// An opaque handle to one file of one filesystem.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileHandle {
    kind: i32,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileHandle(type {}, {} bytes)",
            self.kind,
            self.bytes.len()
        )
    }
}

impl FileHandle {
    /// The handle of `name` relative to `dir` (the empty name means `dir`
    /// itself). Symbolic links are not followed.
    pub fn of(dir: BorrowedFd<'_>, name: &Path) -> io::Result<Self> {
        let c = CString::new(name.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name with a NUL byte"))?;
        let mut raw = Raw {
            handle_bytes: MAX_BYTES,
            handle_type: 0,
            f_handle: [0; MAX],
        };
        let mut mount_id: libc::c_int = 0;
        let flags = if name.as_os_str().is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
        // SAFETY: `raw` is a file_handle with `handle_bytes` bytes of room
        // after its header; the path is NUL-terminated; `mount_id` is a
        // valid int.
        let rc = unsafe {
            libc::name_to_handle_at(
                dir.as_raw_fd(),
                c.as_ptr(),
                (&raw mut raw).cast(),
                &mut mount_id,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (raw.handle_bytes as usize).min(MAX);
        Ok(Self {
            kind: raw.handle_type,
            bytes: raw.f_handle[..n].to_vec(),
        })
    }

    /// A handle from its parts, as [`FileHandle::kind`] and
    /// [`FileHandle::bytes`] gave them (e.g. carried inside an NFS file
    /// handle). `None` when longer than any handle the kernel makes.
    pub fn from_parts(kind: i32, bytes: &[u8]) -> Option<Self> {
        (bytes.len() <= MAX).then(|| Self {
            kind,
            bytes: bytes.to_vec(),
        })
    }

    /// The filesystem's handle type (ext4: 1, inode and generation).
    pub fn kind(&self) -> i32 {
        self.kind
    }

    /// The handle's opaque bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A 64-bit digest of the handle (FNV-1a; not a secret): differs
    /// between two files that had the same inode number in turn.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.kind.to_le_bytes().iter().chain(&self.bytes) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Opens the file again through any descriptor on its filesystem
    /// (needs `CAP_DAC_READ_SEARCH`). `ESTALE` means it no longer exists.
    pub fn open(&self, mount: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
        let mut raw = Raw {
            handle_bytes: libc::c_uint::try_from(self.bytes.len()).unwrap_or(0),
            handle_type: self.kind,
            f_handle: [0; MAX],
        };
        raw.f_handle[..self.bytes.len()].copy_from_slice(&self.bytes);
        // SAFETY: `raw` is a valid file_handle; flags are plain bits.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&raw mut raw).cast(),
                flags | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this descriptor; nobody else owns
        // it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

//! The volume on a remote store (`[storage]`; docs/storage.md): the block
//! device the engine runs over, built once the volume key is known (the
//! integrity key is sealed under it), and the store made at `init`.

use crate::vaultdir::{StorageConfig, VaultDir, write_atomic};
use coffre_luks2::VolumeKey;
use coffre_remote::{
    Backend, ChunkStore, Geometry, IntegrityKey, MirrorSettings, RemoteDevice, RemoteError, Root,
};
use coffre_storage::BlockDevice;
use std::sync::Arc;

/// The vault's id on the store: its LUKS2 header's UUID (32 hex digits;
/// the MACs and the sealed integrity key are bound to it, so a header
/// whose UUID changed no longer opens its store).
pub fn vault_id(uuid: &str) -> Result<[u8; 16], RemoteError> {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RemoteError::Config(format!(
            "the header's UUID {uuid:?} is not 32 hex digits"
        )));
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| RemoteError::Config("the header's UUID".into()))?;
    }
    Ok(id)
}

/// The longest an open may take to read and verify the store (the
/// manifest and every page): past it the open fails rather than hold the
/// key while a lock waits.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The root the control directory keeps: required once the vault is on a
/// store (without it, any authentic state of the store would open,
/// yesterday's included).
fn local_root(vd: &VaultDir) -> Result<Root, RemoteError> {
    let path = vd.storage_root();
    let text = std::fs::read_to_string(&path).map_err(|e| {
        RemoteError::Config(format!(
            "{}: {e}: the rollback check needs it; restore it from the control directory's backup",
            path.display()
        ))
    })?;
    Root::from_line(&text)
}

/// One store's settings: the primary's or a mirror's.
struct StoreSettings<'a> {
    url: &'a str,
    endpoint: &'a Option<String>,
    region: &'a Option<String>,
    allow_http: bool,
    credentials_file: &'a Option<std::path::PathBuf>,
    ca_file: &'a Option<std::path::PathBuf>,
    tls_name: &'a Option<String>,
}

/// Every store of `c`: the primary, then the mirrors.
fn store_settings(c: &StorageConfig) -> Vec<StoreSettings<'_>> {
    let mut out = vec![StoreSettings {
        url: &c.url,
        endpoint: &c.endpoint,
        region: &c.region,
        allow_http: c.allow_http,
        credentials_file: &c.credentials_file,
        ca_file: &c.ca_file,
        tls_name: &c.tls_name,
    }];
    out.extend(c.mirror.iter().map(|m| StoreSettings {
        url: &m.url,
        endpoint: &m.endpoint,
        region: &m.region,
        allow_http: m.allow_http,
        credentials_file: &m.credentials_file,
        ca_file: &m.ca_file,
        tls_name: &m.tls_name,
    }));
    out
}

/// Whether `url` names an NBD export.
pub fn is_nbd(url: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| url.starts_with(p))
}

/// The backend's kind, for status.
fn backend_kind(url: &str) -> &'static str {
    if is_nbd(url) { "nbd" } else { "s3" }
}

/// An NBD export as a store: our client, the slot layout on it, TLS with
/// the vault's CA (or `ca_file`) for `nbds`.
fn nbd_backend(
    s: &StoreSettings<'_>,
    vd: &VaultDir,
    timeout: std::time::Duration,
) -> Result<Arc<dyn coffre_remote::Objects>, RemoteError> {
    use coffre_remote::nbd::{NbdAddr, NbdClient, NbdSettings};
    let (addr, export, tls) = coffre_remote::nbd::parse_url(s.url)?;
    let tls = if tls {
        let ca = s
            .ca_file
            .as_ref()
            .map_or_else(|| vd.ca_cert(), |f| vd.root.join(f));
        let pem = std::fs::read_to_string(&ca).map_err(|e| {
            RemoteError::Config(format!(
                "{}: {e} (the CA of the storage host)",
                ca.display()
            ))
        })?;
        // Trusts that CA alone; no client certificate.
        let config = coffre_api::tls::join_config(&pem)
            .map_err(|e| RemoteError::Config(format!("{}: {e}", ca.display())))?;
        let name = match (s.tls_name, &addr) {
            (Some(n), _) => n.clone(),
            (None, NbdAddr::Tcp(host, _)) => host.clone(),
            (None, NbdAddr::Unix(_)) => {
                return Err(RemoteError::Config(format!(
                    "{}: over a unix socket, say which name the storage host's certificate carries (tls_name)",
                    s.url
                )));
            }
        };
        Some((Arc::new(config), name))
    } else {
        None
    };
    let client = NbdClient::new(NbdSettings {
        addr,
        export,
        tls,
        timeout,
    });
    Ok(Arc::new(coffre_remote::blocks::BlockObjects::new(
        Arc::new(client),
    )))
}

/// The stores: the primary, then the mirrors; an S3 store under its own
/// prefix (the chunk store's names are relative to it), an NBD export in
/// the slot layout.
fn backends(c: &StorageConfig, vd: &VaultDir) -> Result<Vec<Backend>, RemoteError> {
    let timeout = std::time::Duration::from_secs(c.degrade_after_s.max(30));
    let one = |s: &StoreSettings<'_>| -> Result<Backend, RemoteError> {
        if is_nbd(s.url) {
            return Ok(Backend {
                name: s.url.to_string(),
                objects: nbd_backend(s, vd, timeout)?,
            });
        }
        let creds = s
            .credentials_file
            .as_ref()
            .map(|f| coffre_remote::s3::Credentials::load(&vd.root.join(f)))
            .transpose()?;
        let (objects, prefix) = coffre_remote::s3::open(
            &coffre_remote::s3::S3Settings {
                url: s.url.to_string(),
                endpoint: s.endpoint.clone(),
                region: s.region.clone(),
                allow_http: s.allow_http,
            },
            creds.as_ref(),
        )?;
        Ok(Backend {
            name: s.url.to_string(),
            objects: Arc::new(coffre_remote::objects::Prefixed::new(objects, &prefix)),
        })
    };
    store_settings(c).iter().map(one).collect()
}

fn settings(c: &StorageConfig) -> MirrorSettings {
    MirrorSettings {
        degrade_after: std::time::Duration::from_secs(c.degrade_after_s.max(1)),
        retry_after: std::time::Duration::from_secs(c.degrade_after_s.clamp(1, 30)),
        read_only: false,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RemoteError::Config(format!("a runtime: {e}")))
}

/// The write journal's file: `[storage] cache_dir` (default `DIR/cache`,
/// made 0700) / `journal`, its directory judged first (see
/// [`journal_dir_secured`]).
pub fn journal_path(c: &StorageConfig, vd: &VaultDir) -> Result<std::path::PathBuf, RemoteError> {
    let real =
        journal_dir_secured(&journal_dir(c, vd), &vd.root, true).map_err(RemoteError::Config)?;
    Ok(real.join("journal"))
}

/// The write journal's directory, as configured (nothing made or checked).
pub fn journal_dir(c: &StorageConfig, vd: &VaultDir) -> std::path::PathBuf {
    match &c.cache_dir {
        Some(d) => vd.root.join(d),
        None => vd.root.join("cache"),
    }
}

/// The journal's directory `dir` (made if missing, 0700, when `make`),
/// walked from `/` one directory at a time through descriptors, no link
/// followed, the vault taken at its real path (a `dir` under the vault's
/// path as named is moved under its real one; `..` is taken lexically).
/// Each directory the walk goes through, or makes one in, is judged
/// first: root's (or this process's user's) and writable by nobody else,
/// or sticky (as `/tmp`). The journal's own directory must be ours and
/// writable by nobody else (made 0700 if others may read it), and never
/// the vault directory or one above it. Else a `cache_dir` under a
/// directory others can write could be swapped for a link to a place of
/// theirs, or to a directory of root's of their choosing, where each
/// write's offset and ciphertext would land, and a file named `journal`
/// would be unlinked as root. Nothing is made or changed in a directory
/// not yet judged. The vault directory and those above it are the
/// vault's own exposure (who can write them can replace its
/// `config.toml`): not judged here. Returns the path (without links, so
/// that the journal's open resolves it as judged; when `make` is false
/// and the directory is missing, the path it will have). Why not,
/// otherwise.
pub fn journal_dir_secured(
    dir: &std::path::Path,
    vault: &std::path::Path,
    make: bool,
) -> Result<std::path::PathBuf, String> {
    use rustix::fs::{Mode, OFlags};
    use rustix::io::Errno;
    use std::path::{Component, Path, PathBuf};
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| format!("{}: {e}", p.display())
    };
    // The vault's real path (as the daemon holds it): the same judgement
    // whichever way the vault was named (`init ../team`, a link).
    let typed = std::path::absolute(vault).map_err(at(vault))?;
    let vault = std::fs::canonicalize(&typed).map_err(at(&typed))?;
    let dir = std::path::absolute(dir).map_err(at(dir))?;
    let dir = match dir.strip_prefix(&typed) {
        Ok(rest) => vault.join(rest),
        Err(_) => dir,
    };
    // `..` taken lexically: on the vault's real path that is where it
    // leads; elsewhere the walk follows no link, so the path judged is the
    // path used.
    let dir = {
        let mut n = PathBuf::from("/");
        for c in dir.components() {
            match c {
                Component::Normal(x) => n.push(x),
                Component::ParentDir => {
                    n.pop();
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        n
    };
    if vault.starts_with(&dir) {
        return Err(format!(
            "{} is the vault directory or one above it: give [storage] cache_dir a directory of its own",
            dir.display()
        ));
    }
    let names: Vec<&std::ffi::OsStr> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let errno = |p: &Path| {
        let p = p.to_path_buf();
        move |e: Errno| format!("{}: {}", p.display(), std::io::Error::from(e))
    };
    let strict = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut here = PathBuf::from("/");
    let mut fd = rustix::fs::open("/", strict, Mode::empty()).map_err(errno(&here))?;
    let flags = strict | OFlags::NOFOLLOW;
    for name in names {
        let next = here.join(name);
        if !vault.starts_with(&here) {
            judge(&fd, &here, &dir)?;
        }
        let opened = match rustix::fs::openat(&fd, name, flags, Mode::empty()) {
            Err(Errno::NOENT) if !make => return Ok(dir),
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(errno(&next)(e)),
                }
                rustix::fs::openat(&fd, name, flags, Mode::empty())
            }
            r => r,
        };
        fd = match opened {
            Ok(f) => f,
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(format!(
                    "{} is a link or not a directory: give [storage] cache_dir as a path without links (the write journal's directory: {})",
                    next.display(),
                    dir.display()
                ));
            }
            Err(e) => return Err(errno(&next)(e)),
        };
        here = next;
    }
    // The journal's own: ours, writable by nobody else; read by nobody
    // else either (ciphertext only, but nobody's business).
    let st = rustix::fs::fstat(&fd).map_err(errno(&here))?;
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} (the write journal's directory, mode {mode:04o}) is writable by others: make it 0700, or give [storage] cache_dir another",
            here.display()
        ));
    }
    judge(&fd, &here, &dir)?;
    if make && mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(errno(&here))?;
    }
    Ok(dir)
}

/// Whether the directory `fd` (at `path`) is root's (or this process's
/// user's) and writable by nobody else, or sticky (the journal's own
/// directory `dir` is refused writable by others before). Why not,
/// otherwise.
fn judge(
    fd: &std::os::fd::OwnedFd,
    path: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), String> {
    let st = rustix::fs::fstat(fd)
        .map_err(|e| format!("{}: {}", path.display(), std::io::Error::from(e)))?;
    let me = rustix::process::geteuid().as_raw();
    let mode = st.st_mode & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if (st.st_uid != 0 && st.st_uid != me) || (mode & 0o022 != 0 && !sticky) {
        return Err(format!(
            "{} (owner uid {}, mode {mode:04o}) is not root's alone: the write journal's directory ({}) and every directory on the way to it must be writable by root alone (a sticky one above it, such as /tmp, excepted); choose another [storage] cache_dir",
            path.display(),
            st.st_uid,
            dir.display()
        ));
    }
    Ok(())
}

/// What [`open`] gives: the device, how many epochs the store was ahead
/// of the local root, and what the write journal's replay did (for the
/// audit log).
pub type Opened = (Arc<dyn BlockDevice>, u64, Option<String>);

/// Attaches the write journal to `dev`, replaying what a dead daemon
/// left there; what happened, for the audit log.
fn attach_journal(
    dev: &RemoteDevice,
    c: &StorageConfig,
    vd: &VaultDir,
) -> Result<Option<String>, RemoteError> {
    let path = journal_path(c, vd)?;
    let found = dev.attach_journal(&path).map_err(|e| {
        RemoteError::Store(format!(
            "the write journal {}: {e} (left as it is for the next open)",
            path.display()
        ))
    })?;
    let held = found.replayed > 0 || found.older > 0 || found.ahead > 0;
    // The bytes earlier cycles left after the end mark are no news.
    Ok((held || found.ignored_bytes > 0).then(|| {
        format!(
            "the write journal held {} write(s) ({} bytes) a stopped daemon had taken: replayed, verified, and flushed to the store; {} already durable, dropped; {} written after a newer manifest than the store's (a store rolled back), dropped; {} byte(s) at its end did not verify (a record torn by the crash or by a failed write, or altered), not replayed",
            found.replayed,
            found.replayed_bytes,
            found.older,
            found.ahead,
            found.ignored_bytes
        )
    }))
}

fn keep_root(vd: &VaultDir) -> coffre_remote::device::OnRoot {
    let path = vd.storage_root();
    Box::new(move |root: Root| {
        write_atomic(&path, root.to_line().as_bytes(), 0o600)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
}

/// Makes the store for a new vault (`init`): checks it honours
/// conditional writes, writes the empty manifest, keeps the sealed
/// integrity key and the root in the control directory. Returns the
/// device the filesystem is made on.
pub fn create(
    c: &StorageConfig,
    vd: &VaultDir,
    key: &VolumeKey,
    uuid: &str,
    size: u64,
) -> Result<Arc<dyn BlockDevice>, RemoteError> {
    let backends = backends(c, vd)?;
    // The journal's directory judged before anything is written: a
    // refusal leaves no half-made vault.
    journal_path(c, vd)?;
    let vault = vault_id(uuid)?;
    let ikey = IntegrityKey::generate()?;
    let sealed = ikey.seal(key.expose(), &vault)?;
    let io = |e: crate::vaultdir::DirError| RemoteError::Config(e.to_string());
    write_atomic(&vd.storage_key(), &sealed, 0o600).map_err(io)?;
    let g = Geometry::new(c.chunk_size, size)?;
    let (store, root) = runtime()?.block_on(ChunkStore::create_mirrored(
        backends,
        settings(c),
        "",
        (vault, ikey),
        g,
    ))?;
    write_atomic(&vd.storage_root(), root.to_line().as_bytes(), 0o600).map_err(io)?;
    let cache = usize::try_from(c.cache_size).unwrap_or(usize::MAX);
    let dev = RemoteDevice::new(store, cache, keep_root(vd))
        .map_err(|e| RemoteError::Config(e.to_string()))?;
    attach_journal(&dev, c, vd)?;
    Ok(Arc::new(dev))
}

/// The vault's id and the store's integrity key, unsealed with the volume
/// key (a local file read and a computation: no storage I/O).
pub fn store_keys(
    vd: &VaultDir,
    key: &VolumeKey,
    uuid: &str,
) -> Result<([u8; 16], IntegrityKey), RemoteError> {
    let vault = vault_id(uuid)?;
    let sealed = std::fs::read(vd.storage_key()).map_err(|e| {
        RemoteError::Config(format!(
            "{}: {e} (the sealed integrity key: restore it from the control directory's backup)",
            vd.storage_key().display()
        ))
    })?;
    let ikey = IntegrityKey::unseal(&sealed, key.expose(), &vault)?;
    Ok((vault, ikey))
}

/// Opens the store at an open of the vault: the manifest and every page
/// verified, its epoch checked against the root the control directory
/// keeps (an older one is a rollback: the open fails). Returns the device
/// and how many epochs the store was ahead (1 after a crash between a
/// manifest and its root; more: another writer with the vault's keys).
///
/// `keys` from [`store_keys`]: the volume key is not needed past them (a
/// lock's deadline can wipe it while the store's reads wait).
pub fn open(
    c: &StorageConfig,
    vd: &VaultDir,
    keys: ([u8; 16], IntegrityKey),
    on_change: Option<coffre_remote::device::OnChange>,
) -> Result<Opened, RemoteError> {
    let backends = backends(c, vd)?;
    let (vault, ikey) = keys;
    let local = local_root(vd)?;
    let (store, opened) = runtime()?
        .block_on(async {
            tokio::time::timeout(
                OPEN_TIMEOUT,
                ChunkStore::open_mirrored(
                    backends,
                    settings(c),
                    "",
                    (vault, ikey),
                    (Some(local), false),
                ),
            )
            .await
        })
        .map_err(|_| {
            RemoteError::Store(format!(
                "the manifest and pages were not read within {} s",
                OPEN_TIMEOUT.as_secs()
            ))
        })??;
    // One epoch ahead: a crash between a manifest and its root. More: a
    // writer this vault does not know of, with its keys.
    if opened.ahead_by > 1 {
        return Err(RemoteError::Forked {
            epoch: opened.root.epoch,
        });
    }
    let cache = usize::try_from(c.cache_size).unwrap_or(usize::MAX);
    let dev = RemoteDevice::with_changes(store, cache, keep_root(vd), on_change)
        .map_err(|e| RemoteError::Config(e.to_string()))?;
    if opened.ahead_by > 0 {
        // The store's newer root becomes the local one now.
        keep_root(vd)(opened.root).map_err(|e| RemoteError::Config(e.to_string()))?;
    }
    let replayed = attach_journal(&dev, c, vd)?;
    Ok((Arc::new(dev), opened.ahead_by, replayed))
}

#[cfg(test)]
mod tests {
    /// A journal's directory under one others can write is refused (it
    /// could be swapped for a link), nothing made under it; under a sticky
    /// one, as `/tmp`, not; no link is followed past the vault's own path;
    /// the vault directory's own trust is not judged again.
    #[test]
    fn the_journal_directory_and_those_on_the_way_are_roots_alone() {
        use super::journal_dir_secured as secured;
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let perms =
            |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let tmp = tempfile::tempdir().unwrap();
        // Its real path: the walk follows no link (a TMPDIR through one).
        let t = tmp.path().canonicalize().unwrap();
        let vault = t.join("vault");
        std::fs::create_dir(&vault).unwrap();
        mode(&vault, 0o700);
        let open = t.as_path().join("open");
        std::fs::create_dir(&open).unwrap();
        mode(&open, 0o755);
        let dir = open.join("a").join("cache");
        // Missing: said so by the doctor's look (make: false), nothing made.
        assert_eq!(secured(&dir, &vault, false).unwrap(), dir);
        assert!(!open.join("a").exists());
        // Made (0700, both levels) under trusted directories.
        assert_eq!(secured(&dir, &vault, true).unwrap(), dir);
        assert_eq!((perms(&dir), perms(&open.join("a"))), (0o700, 0o700));
        // Readable by others, ours: made 0700 by the open; writable by
        // others: refused, left as it is.
        mode(&dir, 0o755);
        secured(&dir, &vault, false).unwrap();
        assert_eq!(perms(&dir), 0o755);
        secured(&dir, &vault, true).unwrap();
        assert_eq!(perms(&dir), 0o700);
        mode(&dir, 0o777);
        let e = secured(&dir, &vault, true).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        assert_eq!(perms(&dir), 0o777);
        mode(&dir, 0o700);
        // A directory on the way that all can write: refused, and nothing
        // made under it.
        mode(&open, 0o777);
        let e = secured(&dir, &vault, true).unwrap_err();
        assert!(
            e.contains("is not root's alone") && e.contains("/open "),
            "{e}"
        );
        let fresh = open.join("b").join("cache");
        assert!(secured(&fresh, &vault, true).is_err());
        assert!(secured(&fresh, &vault, false).is_err());
        assert!(
            !open.join("b").exists(),
            "made under an untrusted directory"
        );
        // Sticky: allowed above.
        mode(&open, 0o1777);
        secured(&dir, &vault, true).unwrap();
        secured(&fresh, &vault, true).unwrap();
        // ... but what another put there is not followed (a link) nor
        // taken (a directory of theirs).
        let planted = open.join("planted");
        std::os::unix::fs::symlink(&vault, &planted).unwrap();
        let e = secured(&planted.join("cache"), &vault, true).unwrap_err();
        assert!(e.contains("is a link"), "{e}");
        assert!(!vault.join("cache").exists());
        if rustix::process::geteuid().is_root() {
            let theirs = open.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = secured(&theirs.join("cache"), &vault, true).unwrap_err();
            assert!(e.contains("owner uid 65534"), "{e}");
            assert!(!theirs.join("cache").exists());
        }
        mode(&open, 0o755);
        // A link past the vault's own path, even in a trusted directory
        // and to a trusted place: refused.
        let link = t.as_path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let e = secured(&link.join("a").join("cache"), &vault, true).unwrap_err();
        assert!(e.contains("is a link"), "{e}");
        // A vault named through a link, or with `..`: taken at its real
        // path, and what is above the vault is its own exposure: only the
        // journal's directory is judged.
        let vault_link = t.as_path().join("vault-link");
        std::os::unix::fs::symlink(&vault, &vault_link).unwrap();
        let real = vault.canonicalize().unwrap();
        mode(t.as_path(), 0o777);
        assert_eq!(
            secured(&vault_link.join("cache"), &vault_link, true).unwrap(),
            real.join("cache")
        );
        let dotted = open.join("..").join("vault");
        assert_eq!(
            secured(&dotted.join("cache"), &dotted, true).unwrap(),
            real.join("cache")
        );
        assert_eq!(perms(&vault.join("cache")), 0o700);
        mode(t.as_path(), 0o700);
        // `..` in cache_dir, lexically: beside the vault here.
        assert_eq!(
            secured(&vault.join("..").join("beside"), &vault, true).unwrap(),
            real.parent().unwrap().join("beside")
        );
        // Never the vault directory or one above it (not `/` here: a
        // mistake would make it 0700).
        for d in [vault.clone(), t.clone(), vault.join("..")] {
            let e = secured(&d, &vault, true).unwrap_err();
            assert!(e.contains("the vault directory or one above it"), "{e}");
        }
        // Another user's directory on the way.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&open, Some(65534), None).unwrap();
            let e = secured(&dir, &vault, true).unwrap_err();
            assert!(e.contains("owner uid 65534"), "{e}");
        }
    }

    #[test]
    fn vault_ids_come_from_the_uuid() {
        assert!(super::vault_id("0123").is_err());
        assert!(super::vault_id("01234567-89ab-cdef-0123-456789abcdeg").is_err());
        assert_eq!(
            super::vault_id("01234567-89ab-cdef-0123-456789abcdef").unwrap(),
            [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]
        );
    }
}

/// The header, locked (the daemon, while it runs, holds the lock: these
/// commands run with the vault's daemon stopped), and the volume key
/// `password` opens.
fn unlock(
    header: &std::path::Path,
    data: Option<&std::path::Path>,
    password: &coffre_luks2::Passphrase,
) -> Result<(coffre_storage::Luks2Container, VolumeKey), String> {
    let c = match data {
        Some(d) => coffre_storage::Luks2Container::open(d, Some(header)),
        None => coffre_storage::Luks2Container::open(header, None),
    }
    .map_err(|e| format!("{e} (stop the vault's daemon first: it holds the volume)"))?;
    let (_, key) = c
        .unlock(password, None)
        .map_err(|e| format!("the password opens no keyslot ({e})"))?;
    Ok((c, key))
}

/// What the storage commands that run with the daemon stopped work with:
/// the vault's store, its backends, and the integrity key (unsealed with
/// the volume key a member's password opens, which is dropped at once).
struct Offline {
    vd: VaultDir,
    sc: StorageConfig,
    backends: Vec<Backend>,
    vault: [u8; 16],
    ikey: IntegrityKey,
    /// The volume's header, held until the command ends (its lock keeps
    /// a daemon from starting meanwhile).
    _header: coffre_storage::Luks2Container,
}

/// [`Offline`] for the vault at `dir`; `local` is the error when its
/// volume is a local file.
fn offline(
    dir: &std::path::Path,
    password: &coffre_luks2::Passphrase,
    local: &str,
) -> Result<Offline, String> {
    let vd = VaultDir::new(dir);
    let config = vd.load_config().map_err(|e| e.to_string())?;
    let Some(sc) = config.storage.clone() else {
        return Err(local.to_string());
    };
    let (c, key) = unlock(&config.header, None, password)?;
    let uuid = c.header().binary.uuid.clone();
    let backends = backends(&sc, &vd).map_err(|e| e.to_string())?;
    let vault = vault_id(&uuid).map_err(|e| e.to_string())?;
    let sealed = std::fs::read(vd.storage_key())
        .map_err(|e| format!("{}: {e}", vd.storage_key().display()))?;
    let ikey = IntegrityKey::unseal(&sealed, key.expose(), &vault).map_err(|e| e.to_string())?;
    drop(key);
    Ok(Offline {
        vd,
        sc,
        backends,
        vault,
        ikey,
        _header: c,
    })
}

/// How `coffre storage export` reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExportFrom<'a> {
    /// Only this store (the primary's or a mirror's URL): a replica read
    /// for disaster recovery. Default: every store, the newest winning.
    pub store: Option<&'a str>,
    /// Accept a store older than the local root (a mirror that was left
    /// behind when the primary was lost): the newest state it has.
    pub trust_store_epoch: bool,
}

/// `coffre storage export`: the store's volume, every chunk verified, into
/// `out`: a plain LUKS2 data segment again, for cryptsetup with the
/// detached header. Read-only: nothing is written to any store (no
/// repair). The daemon must be stopped.
pub fn export_volume(
    dir: &std::path::Path,
    password: &coffre_luks2::Passphrase,
    out: &std::path::Path,
    from: ExportFrom<'_>,
    progress: impl FnMut(u64, u64),
) -> Result<(), String> {
    let Offline {
        vd,
        sc,
        mut backends,
        vault,
        ikey,
        _header,
    } = offline(
        dir,
        password,
        "this vault's volume is a local file (volume in config.toml): copy it, with the vault closed",
    )?;
    if let Some(only) = from.store {
        backends.retain(|b| b.name == only);
        if backends.is_empty() {
            return Err(format!(
                "{only} is neither the store nor a mirror in config.toml"
            ));
        }
    }
    let local = local_root(&vd).ok();
    if local.is_none() && !from.trust_store_epoch {
        return Err(format!(
            "{}: missing: the rollback check needs it (--trust-store-epoch takes what the store has)",
            vd.storage_root().display()
        ));
    }
    let rt = runtime().map_err(|e| e.to_string())?;
    let (mut store, _) = rt
        .block_on(ChunkStore::open_mirrored(
            backends,
            MirrorSettings {
                read_only: true,
                ..settings(&sc)
            },
            "",
            (vault, ikey),
            (local, from.trust_store_epoch),
        ))
        .map_err(|e| e.to_string())?;
    store.set_read_only();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let r = rt
        .block_on(coffre_remote::transfer::export(&store, &file, progress))
        .map_err(|e| e.to_string());
    if r.is_err() {
        // No file that looks complete and is not.
        drop(file);
        let _ = std::fs::remove_file(out);
    }
    r
}

/// `coffre storage trust` (`--trust-store-epoch`): the store's manifest
/// and pages verified with the integrity key, its root then kept as the
/// local one, whatever the local root said (lost, or older after a
/// restore from backup). Returns the local epoch before and the store's.
/// A store behind the local root (or at its epoch with another manifest)
/// is what a rollback looks like: refused unless `older` says the
/// operator means it. The daemon must be stopped.
pub fn trust_store(
    dir: &std::path::Path,
    password: &coffre_luks2::Passphrase,
    older: bool,
) -> Result<(Option<u64>, u64), String> {
    let o = offline(
        dir,
        password,
        "this vault's volume is a local file: there is no store to trust",
    )?;
    let was = local_root(&o.vd).ok();
    let (_, opened) = runtime()
        .map_err(|e| e.to_string())?
        .block_on(ChunkStore::open_mirrored(
            o.backends,
            settings(&o.sc),
            "",
            (o.vault, o.ikey),
            (was, true),
        ))
        .map_err(|e| e.to_string())?;
    if let Some(w) = was
        && !older
    {
        let now = &opened.root;
        if now.epoch < w.epoch {
            return Err(format!(
                "the store is at epoch {}, behind the local root's {}: that is what a rollback by the provider looks like, and trusting it would lose every write since. Nothing changed. If you restored the store itself from an older backup on purpose, run again with --older",
                now.epoch, w.epoch
            ));
        }
        if now.epoch == w.epoch && !coffre_remote::IntegrityKey::verify(&w.mac, &now.mac) {
            return Err(format!(
                "the store's epoch {} has another manifest than the local root's: two histories (a fork). Nothing changed. Run again with --older only if the store's is the one to keep",
                now.epoch
            ));
        }
    }
    write_atomic(
        &o.vd.storage_root(),
        opened.root.to_line().as_bytes(),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    Ok((was.map(|r| r.epoch), opened.root.epoch))
}

/// `coffre storage sweep`: the orphans on the stores in step (objects of
/// the volume's layout that nothing names, last written `min_age` or
/// longer ago: left by a crash, a fenced writer, a failed flush or an
/// interrupted import), deleted unless `dry_run`. Returns them (names as
/// each store names them under its folder), how many went, and the
/// stores that could not be judged. The store is opened with the rollback
/// check, and refused more than one epoch ahead of the local root (a
/// writer this vault does not know of: its sweep would judge this vault's
/// last state by the other's). Nothing else is written. The daemon must
/// be stopped (a running daemon's unflushed chunks are named only in its
/// memory: its own thread sweeps daily).
pub fn sweep_store(
    dir: &std::path::Path,
    password: &coffre_luks2::Passphrase,
    min_age: std::time::Duration,
    dry_run: bool,
) -> Result<coffre_remote::store::Swept, String> {
    let o = offline(
        dir,
        password,
        "this vault's volume is a local file: there is no store to sweep",
    )?;
    let local = local_root(&o.vd).map_err(|e| e.to_string())?;
    let rt = runtime().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (mut store, opened) = ChunkStore::open_mirrored(
            o.backends,
            MirrorSettings {
                read_only: dry_run,
                ..settings(&o.sc)
            },
            "",
            (o.vault, o.ikey),
            (Some(local), false),
        )
        .await
        .map_err(|e| e.to_string())?;
        if opened.ahead_by > 1 {
            return Err(RemoteError::Forked {
                epoch: opened.root.epoch,
            }
            .to_string());
        }
        if dry_run {
            let mut swept = store.orphans(min_age).await.map_err(|e| e.to_string())?;
            swept.garbage = None;
            Ok(swept)
        } else {
            store.sweep(min_age).await.map_err(|e| e.to_string())
        }
    })
}

/// What `coffre storage migrate` did.
#[derive(Clone, Copy, Debug)]
pub struct Migrated {
    /// The import's counts.
    pub imported: coffre_remote::transfer::Imported,
    /// Chunks read back from the store and compared with the local file.
    pub verified: u64,
}

/// `coffre storage migrate`: a vault's local volume onto a store,
/// resumable (run again after an interruption, it skips what is there),
/// every chunk then read back and compared; config.toml then names the
/// store, and the local file is kept as `volume.img.migrated` until the
/// operator removes it. The daemon must be stopped.
pub fn migrate_volume(
    dir: &std::path::Path,
    password: &coffre_luks2::Passphrase,
    mut target: StorageConfig,
    credentials: Option<&std::path::Path>,
    progress: impl FnMut(u64, u64),
) -> Result<Migrated, String> {
    let vd = VaultDir::new(dir);
    let config = vd.load_config().map_err(|e| e.to_string())?;
    let Some(volume) = config.volume.clone() else {
        return Err("this vault's volume is already on a store ([storage] in config.toml)".into());
    };
    let (c, key) = unlock(&config.header, Some(&volume), password)?;
    let uuid = c.header().binary.uuid.clone();
    let io = |e: crate::vaultdir::DirError| e.to_string();
    if let Some(src) = credentials {
        let bytes = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
        write_atomic(&vd.root.join("storage.credentials"), &bytes, 0o600).map_err(io)?;
        target.credentials_file = Some(std::path::PathBuf::from("storage.credentials"));
    }
    let size = std::fs::metadata(&volume)
        .map_err(|e| format!("{}: {e}", volume.display()))?
        .len();
    let backends = backends(&target, &vd).map_err(|e| e.to_string())?;
    let vault = vault_id(&uuid).map_err(|e| e.to_string())?;
    let rt = runtime().map_err(|e| e.to_string())?;
    // A first run seals the key first, then makes the store; a run after
    // an interruption (the sealed key is there) goes on with the store,
    // from its root if one was kept (none: the store was just made, and
    // nothing uses it yet).
    let mut store = if vd.storage_key().exists() {
        let sealed = std::fs::read(vd.storage_key()).map_err(|e| e.to_string())?;
        let unseal =
            || IntegrityKey::unseal(&sealed, key.expose(), &vault).map_err(|e| e.to_string());
        let local = local_root(&vd).ok();
        match rt.block_on(ChunkStore::open_mirrored(
            backends.clone(),
            settings(&target),
            "",
            (vault, unseal()?),
            (local, false),
        )) {
            Ok((store, _)) => store,
            Err(RemoteError::Empty { .. }) => {
                let g = Geometry::new(target.chunk_size, size).map_err(|e| e.to_string())?;
                let (store, root) = rt
                    .block_on(ChunkStore::create_mirrored(
                        backends,
                        settings(&target),
                        "",
                        (vault, unseal()?),
                        g,
                    ))
                    .map_err(|e| e.to_string())?;
                write_atomic(&vd.storage_root(), root.to_line().as_bytes(), 0o600).map_err(io)?;
                store
            }
            Err(e) => return Err(e.to_string()),
        }
    } else {
        let ikey = IntegrityKey::generate().map_err(|e| e.to_string())?;
        let sealed = ikey.seal(key.expose(), &vault).map_err(|e| e.to_string())?;
        write_atomic(&vd.storage_key(), &sealed, 0o600).map_err(io)?;
        let g = Geometry::new(target.chunk_size, size).map_err(|e| e.to_string())?;
        let (store, root) = rt
            .block_on(ChunkStore::create_mirrored(
                backends,
                settings(&target),
                "",
                (vault, ikey),
                g,
            ))
            .map_err(|e| e.to_string())?;
        write_atomic(&vd.storage_root(), root.to_line().as_bytes(), 0o600).map_err(io)?;
        store
    };
    drop(key);
    let file = std::fs::File::open(&volume).map_err(|e| format!("{}: {e}", volume.display()))?;
    let result = rt.block_on(coffre_remote::transfer::import(&mut store, &file, progress));
    // Whatever became durable is the root now (a rerun goes on from it).
    if let Some(root) = store.new_root() {
        write_atomic(&vd.storage_root(), root.to_line().as_bytes(), 0o600).map_err(io)?;
        store.root_kept(root);
    }
    let imported = result.map_err(|e| format!("{e} (run the same command again: it goes on)"))?;
    // Every chunk read back, verified, and compared with the file.
    let g = store.geometry();
    let mut verified = 0;
    use std::os::unix::fs::FileExt;
    for index in 0..g.chunks() {
        let got = rt
            .block_on(store.read_chunk(index))
            .map_err(|e| e.to_string())?;
        let mut want = vec![0u8; g.chunk_len(index)];
        file.read_exact_at(&mut want, index * u64::from(g.chunk_size))
            .map_err(|e| e.to_string())?;
        if got != want {
            return Err(format!(
                "chunk {index} on the store differs from the local volume: not switched"
            ));
        }
        verified += 1;
    }
    // config.toml names the store now; the file stays, renamed.
    let text = std::fs::read_to_string(vd.config()).map_err(|e| e.to_string())?;
    let mut t: toml::Table = text.parse().map_err(|e| format!("config.toml: {e}"))?;
    t.remove("volume");
    let storage = toml::Value::try_from(&target).map_err(|e| e.to_string())?;
    t.insert("storage".into(), storage);
    // The config first (a failure here leaves the vault on its file, as
    // it was), then the file renamed; the header's lock held until done.
    write_atomic(
        &vd.config(),
        toml::to_string(&t).map_err(|e| e.to_string())?.as_bytes(),
        0o600,
    )
    .map_err(io)?;
    let kept = volume.with_extension("img.migrated");
    std::fs::rename(&volume, &kept).map_err(|e| {
        format!(
            "{}: {e} (config.toml names the store already: move the file away by hand)",
            volume.display()
        )
    })?;
    drop(c);
    Ok(Migrated { imported, verified })
}

/// What the daemon last knew of each store while the vault was open
/// (`DIR/storage.health`, written at each change): stale or in step, why,
/// how much is left to copy.
pub fn health_path(vd: &VaultDir) -> std::path::PathBuf {
    vd.root.join("storage.health")
}

/// `DIR/storage.health` as the device last wrote it, if it is a regular
/// file of at most 1 MiB holding JSON.
pub fn read_health(vd: &VaultDir) -> Option<serde_json::Value> {
    let bytes = coffre_sys::fs::read_small(&health_path(vd), 1 << 20).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The callback that keeps `DIR/storage.health` and hands each event to
/// `audit` (action, outcome, detail).
pub fn on_change(
    vd: &VaultDir,
    audit: impl Fn(&'static str, &'static str, String) + Send + Sync + 'static,
) -> coffre_remote::device::OnChange {
    let path = health_path(vd);
    Box::new(move |events, status| {
        for e in events {
            match e {
                coffre_remote::StoreEvent::Stale {
                    name,
                    reason,
                    synced,
                } => audit(
                    "storage_degraded",
                    "stale",
                    format!(
                        "{name} left behind (it holds epoch {synced}): {reason}; the other stores go on"
                    ),
                ),
                coffre_remote::StoreEvent::InStep { name, copied } => audit(
                    "storage_resynced",
                    "ok",
                    format!("{name} is in step again ({copied} object(s) copied to it)"),
                ),
                coffre_remote::StoreEvent::Repaired { name, object } => audit(
                    "storage_repaired",
                    "ok",
                    format!(
                        "{object} did not verify on {name}: rewritten there from another store"
                    ),
                ),
                coffre_remote::StoreEvent::Unswept { name, reason } => audit(
                    "storage_swept",
                    "skipped",
                    format!("{name} not swept for orphans: {reason}"),
                ),
                coffre_remote::StoreEvent::Swept { orphans } => audit(
                    "storage_swept",
                    "ok",
                    format!(
                        "{orphans} orphaned object(s) deleted (named by no manifest: left by a crash, a fenced writer, a failed flush or an interrupted import)"
                    ),
                ),
            }
        }
        let doc = serde_json::json!({
            "at": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "stores": status,
        });
        let _ = write_atomic(&path, doc.to_string().as_bytes(), 0o600);
    })
}

/// One store's manifest epoch as it claims it (unverified: no key), or
/// why it cannot be read.
fn claimed_epoch(b: &Backend) -> Result<Option<u64>, String> {
    let name = coffre_remote::layout::Keys::new("").manifest();
    let rt = runtime().map_err(|e| e.to_string())?;
    let got = rt
        .block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                b.objects.get(&name, 16 << 20),
            )
            .await
        })
        .map_err(|_| "no answer within 20 s".to_string())?;
    match got {
        Ok(Some((bytes, _))) => Ok(coffre_remote::layout::Manifest::claimed_epoch(&bytes)),
        Ok(None) => Err("no manifest at that prefix".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `coffre storage status`: where the volume is, the root kept locally,
/// what each store says now (its manifest's epoch, unverified: no key
/// here; the next open verifies it), and what the daemon last knew of
/// each while open.
pub fn status(dir: &std::path::Path) -> Result<serde_json::Value, String> {
    let vd = VaultDir::new(dir);
    let config = vd.load_config().map_err(|e| e.to_string())?;
    let Some(sc) = &config.storage else {
        return Ok(serde_json::json!({
            "backend": "file",
            "volume": config.volume,
        }));
    };
    let local = std::fs::read_to_string(vd.storage_root())
        .ok()
        .and_then(|t| Root::from_line(&t).ok())
        .map(|r| r.epoch);
    let stores: Vec<serde_json::Value> = match backends(sc, &vd) {
        Err(e) => vec![serde_json::json!({
            "url": sc.url,
            "reachable": false,
            "error": e.to_string(),
            "standing": "unknown",
        })],
        Ok(backends) => backends
            .iter()
            .map(|b| {
                let (claimed, error) = match claimed_epoch(b) {
                    Ok(c) => (c, None),
                    Err(e) => (None, Some(e)),
                };
                let standing = match (claimed, local) {
                    (_, None) => {
                        "NO LOCAL ROOT: the next open is refused until DIR/storage.root is restored"
                    }
                    (Some(s), Some(l)) if s == l => "in step",
                    (Some(s), Some(l)) if s > l => {
                        "ahead of the local root (a crash after a manifest, or another writer): the next open takes it"
                    }
                    (Some(_), Some(_)) => {
                        "BEHIND the local root: rolled back, or a mirror left behind (brought back at the next open)"
                    }
                    _ => "unknown",
                };
                serde_json::json!({
                    "url": b.name,
                    "store_epoch_claimed": claimed,
                    "reachable": error.is_none(),
                    "error": error,
                    "standing": standing,
                })
            })
            .collect(),
    };
    let health = read_health(&vd);
    let primary = stores[0].clone();
    // Writes a stopped daemon took and no flush made durable: they are
    // replayed at the next open (0 after a clean close). What the
    // journal's records claim, read without the key: the next open
    // verifies them. Null, with the error beside it, if the file cannot
    // be read here (the next open may not read it either).
    // The path the daemon would use, judged as it would (without making
    // anything): a directory it would refuse is said so.
    let journal = journal_dir_secured(&journal_dir(sc, &vd), &vd.root, false)
        .map_err(std::io::Error::other)
        .and_then(|d| coffre_remote::journal::held(&d.join("journal")));
    Ok(serde_json::json!({
        "backend": backend_kind(&sc.url),
        "url": sc.url,
        "endpoint": sc.endpoint,
        "chunk_size": sc.chunk_size,
        "cache_size": sc.cache_size,
        "degrade_after_s": sc.degrade_after_s,
        "local_root_epoch": local,
        "store_epoch_claimed": primary["store_epoch_claimed"],
        "reachable": primary["reachable"],
        "error": primary["error"],
        "standing": primary["standing"],
        "stores": stores,
        "last_known_while_open": health,
        "journal_bytes": journal.as_ref().ok(),
        "journal_error": journal.as_ref().err().map(|e| e.to_string()),
    }))
}

//! What an open vault shows: its decrypted volume as a FUSE file, a loop
//! device on that file, the ext4 filesystem on the loop device mounted for
//! the team, and the disk images inside it served over NBD on a unix
//! socket. [`expose`] builds the stack bottom-up; [`Exposure::close`] takes
//! it down top-down, in an order that leaves nothing acknowledged unwritten
//! and nothing holding the key; [`cleanup_stale`] removes what a daemon
//! killed while open left behind.
//!
//! The kernel never sees a key: decryption stays in our userspace engine
//! (`coffre-storage`), so this works on hosts without device-mapper.

/// The unit tests run with the daemon's allocator: where it places the
/// FUSE library's buffers decides the workloads' view's direct-write path.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: coffre_sys::alloc::WipeOnFree = coffre_sys::alloc::WipeOnFree;

pub mod cut;
mod fusefile;
pub mod iostats;
pub mod nbd;
pub mod system;

use coffre_storage::EncryptedVolume;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use system::{Holder, LoopDevice};

/// Something in the stack failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A step failed; `step` says which.
    #[error("{step}: {source}")]
    Step {
        /// The step (`mount the volume file`, `unmount the data`...).
        step: &'static str,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// The data stays mounted because processes hold it.
    #[error("{} is busy: {}", mountpoint.display(), holders.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Busy {
        /// The mount.
        mountpoint: PathBuf,
        /// Who holds it.
        holders: Vec<Holder>,
    },
}

fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Step { step, source }
}

/// Where things go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The regular file the decrypted volume is mounted over (FUSE).
    pub volume_file: PathBuf,
    /// Where the team's ext4 filesystem is mounted.
    pub mountpoint: PathBuf,
    /// The VMs' shares, each mounted again (a bind mount of its
    /// directory, made after the data and taken down before it) for its
    /// VM's NFS server alone: `DIR/run/nfs/NAME/share`. Its parent holds
    /// it and nothing else, so that VM's server confines itself
    /// (Landlock) to that parent before the vault first opens, and reaches
    /// by path its share and nothing else of the data (a rule on a mount point would
    /// not cover what is mounted over it later; by handle, see
    /// docs/security.md). Made `nosuid,nodev,noexec`, private.
    pub nfs_shares: Vec<ShareView>,
    /// The NFS server's directory (`DIR/run/nfs`): a read-only tmpfs of
    /// the shares' mount points (see [`nfs_dir`]).
    pub nfs_dir: PathBuf,
    /// The NBD unix socket (its directory is made 0700).
    pub nbd_socket: PathBuf,
    /// One NBD socket per VM, serving its own disks only, owned by the
    /// user it runs as.
    pub vm_exports: Vec<VmExport>,
}

/// A share's own mount for the NFS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareView {
    /// The share, relative to the data's root (`shared`); reached
    /// without following a symbolic link, on the data's filesystem.
    pub share: PathBuf,
    /// Where it is mounted for the server.
    pub at: PathBuf,
}

/// A VM's own NBD socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExport {
    /// Where the socket goes (in the VM's run directory).
    pub socket: PathBuf,
    /// The exports (`disks/NAME.img`) it serves; no other.
    pub disks: Vec<String>,
    /// Who may connect: the socket's owner.
    pub uid: u32,
    /// The socket's group.
    pub gid: u32,
}

impl Layout {
    /// The default layout under a vault directory: `DIR/run/volume`,
    /// `DIR/data`, `DIR/run/nbd/nbd.sock`.
    pub fn under(dir: &Path) -> Self {
        let run = dir.join("run");
        Self {
            volume_file: run.join("volume"),
            mountpoint: dir.join("data"),
            nfs_shares: Vec::new(),
            nfs_dir: run.join("nfs"),
            nbd_socket: run.join("nbd").join("nbd.sock"),
            vm_exports: Vec::new(),
        }
    }

    /// The directory of disk images served over NBD.
    pub fn disks(&self) -> PathBuf {
        self.mountpoint.join("disks")
    }
}

/// Owners and modes given to the team on every mount.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    /// The team's group: owns the top directory and `shared/`.
    pub team_gid: u32,
    /// Each member with a uid and gid gets `home/NAME` (0700).
    pub members: Vec<(String, u32, u32)>,
    /// Every current member of the vault. Any other `home/NAME` (a
    /// removed member's) becomes root's, 0700: kept, and out of reach of
    /// the host account that owned it.
    pub current: Vec<String>,
}

/// What a close does with processes that keep the data busy.
#[derive(Debug, Clone, Copy)]
pub struct ClosePolicy {
    /// Time between SIGTERM and SIGKILL for processes holding the mount.
    pub grace: Duration,
    /// A forced close (lock, failed open) wipes the key even if the
    /// filesystem cannot be unmounted cleanly: the FUSE connection is cut
    /// so nothing can use the key again.
    pub force: bool,
}

/// What a close did, for the audit log.
#[derive(Debug, Default, Clone)]
pub struct CloseReport {
    /// NBD clients that were connected and dropped.
    pub nbd_clients: usize,
    /// Processes that held the data and were signalled.
    pub killed: Vec<Holder>,
    /// Anything unusual (a cut FUSE connection...).
    pub notes: Vec<String>,
    /// How long the close took.
    pub elapsed: Duration,
}

/// The exposed stack. Dropping it without [`Exposure::close`] tears it
/// down as a forced close would.
pub struct Exposure {
    layout: Layout,
    volume: Option<Arc<EncryptedVolume>>,
    fuse: Option<fusefile::FuseFile>,
    /// The FUSE workers' handle on the volume, emptied at close.
    fuse_slot: Option<fusefile::Slot>,
    loopdev: Option<LoopDevice>,
    mounted: Option<String>,
    /// The shares' views that are mounted.
    views: Vec<PathBuf>,
    /// The shares that could not be mounted for the NFS server, and why
    /// (their exports then refuse to open).
    share_failures: Vec<(PathBuf, String)>,
    /// The ext4's device, kept after our unmount: a copy of the mount in
    /// another namespace keeps it (and the loop device) alive.
    ext4_dev: Option<String>,
    nbd: Option<nbd::NbdServer>,
    /// The VMs' own NBD servers.
    vm_nbd: Vec<nbd::NbdServer>,
    /// How long each step of the open took.
    phases: Vec<(&'static str, Duration)>,
}

impl std::fmt::Debug for Exposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposure")
            .field("layout", &self.layout)
            .field("loop", &self.loopdev)
            .field("mounted", &self.mounted.is_some())
            .finish_non_exhaustive()
    }
}

/// What [`Exposure::status`] reports.
#[derive(Debug, Clone)]
pub struct Status {
    /// The team's mount.
    pub mountpoint: PathBuf,
    /// The loop device under it.
    pub loop_device: Option<PathBuf>,
    /// The NBD socket.
    pub nbd_socket: Option<PathBuf>,
    /// NBD exports (disk images in `disks/`).
    pub exports: Vec<String>,
    /// NBD clients connected now.
    pub nbd_clients: usize,
}

fn mkfs_ext4(file: &Path) -> std::io::Result<()> {
    let args: Vec<&std::ffi::OsStr> = vec![
        "-q".as_ref(),
        "-F".as_ref(),
        // Never smaller than the volume's sectors (the loop device's
        // logical blocks are the volume's sectors).
        "-b".as_ref(),
        "4096".as_ref(),
        "-L".as_ref(),
        "coffre".as_ref(),
        "-m".as_ref(),
        "0".as_ref(),
        "-E".as_ref(),
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard".as_ref(),
        file.as_os_str(),
    ];
    system::run("mkfs.ext4", &args).map(|_| ())
}

/// Formats the decrypted volume with ext4, through the same FUSE path the
/// vault uses when open (nothing is written around the engine).
pub fn format_ext4(volume: EncryptedVolume, volume_file: &Path) -> Result<(), Error> {
    if let Some(dir) = volume_file.parent() {
        std::fs::create_dir_all(dir).map_err(step("create the run directory"))?;
    }
    let volume = Arc::new(volume);
    let mut fuse = fusefile::FuseFile::mount(volume.clone(), volume_file)
        .map_err(step("mount the volume file"))?;
    let made = mkfs_ext4(volume_file).map_err(step("mkfs.ext4"));
    let unmounted = fuse.unmount().map_err(step("unmount the volume file"));
    let flushed = volume.flush().map_err(|e| Error::Step {
        step: "flush the volume",
        source: std::io::Error::other(e.to_string()),
    });
    made.and(unmounted).and(flushed)
}

/// Builds the stack: FUSE file, loop device, ext4 mount with the team's
/// owners and modes, NBD server. On failure, what was built is taken down
/// again.
pub fn expose(
    volume: EncryptedVolume,
    layout: &Layout,
    own: &Ownership,
) -> Result<Exposure, Error> {
    let mut e = Exposure {
        layout: layout.clone(),
        volume: Some(Arc::new(volume)),
        fuse: None,
        fuse_slot: None,
        loopdev: None,
        mounted: None,
        views: Vec::new(),
        share_failures: Vec::new(),
        ext4_dev: None,
        nbd: None,
        vm_nbd: Vec::new(),
        phases: Vec::new(),
    };
    match e.build(own) {
        Ok(()) => Ok(e),
        Err(err) => {
            let _ = e.close(&ClosePolicy {
                grace: Duration::from_secs(1),
                force: true,
            });
            Err(err)
        }
    }
}

impl Exposure {
    fn build(&mut self, own: &Ownership) -> Result<(), Error> {
        let l = self.layout.clone();
        if let Some(dir) = l.volume_file.parent() {
            std::fs::create_dir_all(dir).map_err(step("create the run directory"))?;
        }
        let volume = self.volume.clone().expect("volume present while building");
        let ss = volume.sector_size();
        let mut t = Instant::now();
        let mut phase = |name: &'static str, phases: &mut Vec<_>| {
            phases.push((name, t.elapsed()));
            t = Instant::now();
        };
        self.fuse = Some(
            fusefile::FuseFile::mount(volume, &l.volume_file)
                .map_err(step("mount the volume file"))?,
        );
        self.fuse_slot = self.fuse.as_ref().map(fusefile::FuseFile::slot);
        phase("FUSE file", &mut self.phases);
        self.loopdev =
            Some(LoopDevice::attach(&l.volume_file, ss).map_err(step("attach a loop device"))?);
        phase("loop device", &mut self.phases);
        std::fs::create_dir_all(&l.mountpoint).map_err(step("create the mount point"))?;
        let dev = self
            .loopdev
            .as_ref()
            .map(|d| d.path.clone())
            .unwrap_or_default();
        use rustix::mount::MountFlags;
        rustix::mount::mount(
            &dev,
            &l.mountpoint,
            "ext4",
            MountFlags::NODEV | MountFlags::NOSUID,
            Some(c"errors=remount-ro"),
        )
        .map_err(|e| Error::Step {
            step: "mount the data",
            source: e.into(),
        })?;
        self.mounted = Some(system::device_of(&l.mountpoint).ok_or_else(|| Error::Step {
            step: "find the data in the mount table",
            source: std::io::Error::other(format!(
                "{} is not in /proc/self/mountinfo (give the vault an absolute, canonical path)",
                l.mountpoint.display()
            )),
        })?);
        self.ext4_dev = self.mounted.clone();
        phase("ext4 mount", &mut self.phases);
        apply_ownership(&l, own).map_err(step("set owners and modes"))?;
        phase("owners", &mut self.phases);
        if !l.nfs_shares.is_empty() {
            // A share that cannot be mounted fails its export, not the open.
            for v in &l.nfs_shares {
                match self.mount_share(v) {
                    Ok(()) => {}
                    Err(e) => self.share_failures.push((v.share.clone(), e.to_string())),
                }
            }
            phase("NFS shares", &mut self.phases);
        }
        self.nbd = Some(
            nbd::NbdServer::start(&l.nbd_socket, Arc::new(nbd::ImageDir::new(l.disks())))
                .map_err(step("start the NBD server"))?,
        );
        for (i, v) in l.vm_exports.iter().enumerate() {
            // Started in the main socket's directory (root's alone), then
            // handed over.
            let staging = l.nbd_socket.with_file_name(format!("vm-{i}.sock"));
            let mut server = nbd::NbdServer::start(
                &staging,
                Arc::new(nbd::Only::new(l.disks(), v.disks.clone())),
            )
            .map_err(step("start a VM's NBD server"))?;
            let r = server.publish(&v.socket, v.uid, v.gid);
            // Kept even when publishing failed, so the close stops it.
            self.vm_nbd.push(server);
            r.map_err(step("hand a VM its NBD socket"))?;
        }
        phase("NBD servers", &mut self.phases);
        Ok(())
    }

    /// How long each step of the open took, for the audit log: e.g.
    /// `FUSE file 1.1 ms, loop device 3.0 ms, ext4 mount 2.2 ms, ...`.
    pub fn phases(&self) -> String {
        self.phases
            .iter()
            .map(|(n, d)| format!("{n} {:.1} ms", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Mounts one share for the NFS server, by descriptors only: its
    /// directory opened beneath the data's root without following a
    /// symbolic link or leaving the data's filesystem (a member who
    /// replaced `shared` with a link to `/etc` gets a failed share, not
    /// `/etc` served), cloned as a detached mount, made `nosuid,nodev,
    /// noexec` before it is attached anywhere, then attached on the mount
    /// point opened the same way inside the server's directory (made by
    /// [`nfs_dir`]).
    fn mount_share(&mut self, v: &ShareView) -> std::io::Result<()> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        use rustix::mount::OpenTreeFlags;
        use std::os::fd::OwnedFd;
        let dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let open = |p: &Path| rustix::fs::open(p, dir | OFlags::NOFOLLOW, Mode::empty());
        let beneath = |top: &OwnedFd, rel: &Path, what: &str| -> std::io::Result<OwnedFd> {
            let strict = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
            rustix::fs::openat2(top, rel, dir, Mode::empty(), strict).map_err(|e| {
                std::io::Error::new(
                    std::io::Error::from(e).kind(),
                    format!(
                        "{}: {e} ({what}, without a symbolic link on the way)",
                        rel.display()
                    ),
                )
            })
        };
        let (parent, name) = match (v.at.parent(), v.at.file_name()) {
            (Some(p), Some(n)) => (p, Path::new(n)),
            _ => return Err(std::io::Error::other("a share's mount point has no parent")),
        };
        let top = open(parent).map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!(
                    "{}: {e}: not the NFS server's own directory (a read-only tmpfs): not mounting the share there",
                    parent.display()
                ),
            )
        })?;
        if !on_nfs_dir(&top)? {
            return Err(std::io::Error::other(format!(
                "{} is not the NFS server's own directory (a read-only tmpfs): not mounting the share there",
                parent.display()
            )));
        }
        let target = beneath(&top, name, "the NFS server's mount point, not mounted yet")?;
        let data = open(&self.layout.mountpoint)?;
        let source = beneath(&data, &v.share, "a directory of the data")?;
        let tree = rustix::mount::open_tree(
            &source,
            "",
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_EMPTY_PATH,
        )?;
        // Recorded first: the close takes down what is mounted there (and
        // finds nothing to do if the attach failed).
        self.views.push(v.at.clone());
        attach(&tree, &target, false)
    }

    /// The shares that could not be mounted for the NFS server at this
    /// open, and why.
    pub fn share_failures(&self) -> &[(PathBuf, String)] {
        &self.share_failures
    }

    /// The layout in use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// What is exposed now.
    pub fn status(&self) -> Status {
        use nbd::Catalog;
        Status {
            mountpoint: self.layout.mountpoint.clone(),
            loop_device: self.loopdev.as_ref().map(|d| d.path.clone()),
            nbd_socket: self.nbd.as_ref().map(|n| n.socket().to_path_buf()),
            exports: if self.mounted.is_some() {
                nbd::ImageDir::new(self.layout.disks()).list()
            } else {
                Vec::new()
            },
            nbd_clients: self.nbd.as_ref().map_or(0, nbd::NbdServer::connections)
                + self
                    .vm_nbd
                    .iter()
                    .map(nbd::NbdServer::connections)
                    .sum::<usize>(),
        }
    }

    /// Applies owners and modes again while mounted (a member removed
    /// while the vault is open loses their home at once). Returns false
    /// when the data is not mounted: the next open applies them.
    pub fn reapply_ownership(&self, own: &Ownership) -> std::io::Result<bool> {
        if self.mounted.is_none() {
            return Ok(false);
        }
        apply_ownership(&self.layout, own)?;
        Ok(true)
    }

    /// Whether everything has been taken down (and the key dropped).
    pub fn is_closed(&self) -> bool {
        self.volume.is_none()
    }

    /// Takes the stack down: NBD clients dropped, filesystem synced and
    /// unmounted (processes holding it are named, sent SIGTERM, and after
    /// `policy.grace` SIGKILL), loop device detached, FUSE session ended,
    /// backend flushed, key dropped. Each step that succeeded is not
    /// repeated, so a failed close can be called again.
    pub fn close(&mut self, policy: &ClosePolicy) -> Result<CloseReport, (Error, CloseReport)> {
        let started = Instant::now();
        let mut report = CloseReport::default();
        let r = self.close_steps(policy, &mut report);
        report.elapsed = started.elapsed();
        match r {
            Ok(()) => Ok(report),
            Err(e) => Err((e, report)),
        }
    }

    fn close_steps(&mut self, policy: &ClosePolicy, report: &mut CloseReport) -> Result<(), Error> {
        if let Some(mut n) = self.nbd.take() {
            report.nbd_clients = n.stop();
        }
        for mut n in self.vm_nbd.drain(..) {
            report.nbd_clients += n.stop();
        }
        // The shares' views before the data: each is another mount of
        // the same filesystem, which would keep it (and the loop device)
        // alive.
        if let Some(dev) = self.ext4_dev.clone() {
            while let Some(view) = self.views.last().cloned() {
                match unmount_busy(&view, &dev, policy.grace, report) {
                    Ok(()) => {}
                    Err(e) if !policy.force => return Err(e),
                    Err(e) => {
                        report.notes.push(format!("forced past: {e}"));
                        let _ = rustix::mount::unmount(&view, rustix::mount::UnmountFlags::DETACH);
                        report
                            .notes
                            .push(format!("{} detached lazily", view.display()));
                    }
                }
                self.views.pop();
            }
        }
        if let Some(dev) = self.mounted.clone() {
            let mp = self.layout.mountpoint.clone();
            if let Ok(d) = std::fs::File::open(&mp) {
                let _ = rustix::fs::syncfs(&d);
            }
            let unmounted = unmount_busy(&mp, &dev, policy.grace, report);
            match unmounted {
                Ok(()) => self.mounted = None,
                Err(e) if !policy.force => return Err(e),
                Err(e) => {
                    // Forced: cut the engine off so the key goes now; the
                    // filesystem above sees I/O errors until it can go.
                    report.notes.push(format!("forced past: {e}"));
                    self.abort_fuse(report);
                    if unmount_busy(&mp, &dev, Duration::from_millis(200), report).is_err() {
                        let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
                        report.notes.push(format!(
                            "{} detached lazily after the engine was cut",
                            mp.display()
                        ));
                    }
                    self.mounted = None;
                }
            }
        }
        if let Some(l) = self.loopdev.clone() {
            let mut detached = l.detach(Duration::from_secs(1));
            if detached.is_err()
                && let Some(dev) = self.ext4_dev.clone()
            {
                // Our mount is gone but the filesystem lives on: another
                // mount of it here (a bind mount), or a private copy in
                // another mount namespace. Bind mounts go; processes get
                // the same policy as on a busy mount.
                for m in system::mounts().into_iter().rev().filter(|m| m.dev == dev) {
                    let r =
                        rustix::mount::unmount(&m.mountpoint, rustix::mount::UnmountFlags::empty());
                    report.notes.push(format!(
                        "another mount of the data at {}: {}",
                        m.mountpoint.display(),
                        match r {
                            Ok(()) => "unmounted".to_string(),
                            Err(e) => format!("could not unmount it: {e}"),
                        }
                    ));
                }
                let mp = self.layout.mountpoint.clone();
                let gone = stop_holders(&dev, &mp, true, policy.grace, report, || {
                    Ok(!l.is_attached())
                });
                detached = match gone {
                    Ok(true) => Ok(()),
                    _ => l.detach(Duration::from_millis(100)),
                };
            }
            match detached {
                Ok(()) => self.loopdev = None,
                Err(e) if !policy.force => return Err(step("detach the loop device")(e)),
                Err(e) => {
                    report.notes.push(format!("loop device: {e}"));
                    self.abort_fuse(report);
                    self.loopdev = None;
                }
            }
        }
        if let Some(f) = &mut self.fuse {
            match f.unmount() {
                Ok(()) => self.fuse = None,
                Err(e) if !policy.force => return Err(step("unmount the volume file")(e)),
                Err(e) => {
                    report.notes.push(format!("volume file: {e}"));
                    self.abort_fuse(report);
                    if let Some(f) = self.fuse.as_mut() {
                        f.detach();
                    }
                    report.notes.push(format!(
                        "{} detached lazily: its connection is cut",
                        self.layout.volume_file.display()
                    ));
                    self.fuse = None;
                }
            }
        }
        // Whatever became of the FUSE workers, they lose the volume now.
        if let Some(slot) = self.fuse_slot.take() {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if let Some(v) = self.volume.take() {
            if let Err(e) = v.flush() {
                if !policy.force {
                    self.volume = Some(v);
                    return Err(Error::Step {
                        step: "flush the volume",
                        source: std::io::Error::other(e.to_string()),
                    });
                }
                report.notes.push(format!("flush: {e}"));
            }
            // The last reference: the cipher's key schedule is wiped here.
            // A request still in flight holds one for a moment; one stuck
            // on the storage (its connection aborted under it) for as long
            // as the storage hangs, and the stack is held until it ends: a
            // write that lands late must not land after a later open's.
            let mut v = v;
            let started = Instant::now();
            loop {
                match Arc::try_unwrap(v) {
                    Ok(last) => {
                        drop(last);
                        break;
                    }
                    Err(again) => {
                        v = again;
                        std::thread::sleep(if started.elapsed() < Duration::from_secs(2) {
                            Duration::from_millis(5)
                        } else {
                            Duration::from_millis(50)
                        });
                    }
                }
            }
            if started.elapsed() >= Duration::from_secs(2) {
                report.notes.push(format!(
                    "a FUSE request held the volume for {} s after its connection ended (its I/O on the storage)",
                    started.elapsed().as_secs()
                ));
            }
        }
        Ok(())
    }

    fn abort_fuse(&mut self, report: &mut CloseReport) {
        if self.fuse.as_ref().is_some_and(fusefile::FuseFile::aborted) {
            return;
        }
        if let Some(f) = self.fuse.as_mut() {
            if f.abort() {
                report.notes.push(
                    "FUSE connection aborted: the engine stopped serving the volume and dropped its key".into(),
                );
            } else {
                report.notes.push(
                    "FUSE connection could not be aborted: the engine's workers are still alive"
                        .into(),
                );
            }
        }
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        if !self.is_closed() {
            let _ = self.close(&ClosePolicy {
                grace: Duration::from_secs(1),
                force: true,
            });
        }
    }
}

/// Names the processes holding the filesystem `dev` (mounted at `mp`, or
/// formerly), sends them SIGTERM, waits up to `grace` for `done`, sends
/// SIGKILL to those left, and waits a little more. Returns whether `done`
/// became true.
fn stop_holders(
    dev: &str,
    mp: &Path,
    namespaces: bool,
    grace: Duration,
    report: &mut CloseReport,
    mut done: impl FnMut() -> Result<bool, Error>,
) -> Result<bool, Error> {
    use rustix::process::Signal;
    let held = system::holders(dev, mp, namespaces);
    for h in &held {
        system::signal(h.pid, Signal::TERM);
    }
    report.killed.extend(held.iter().cloned());
    let until = Instant::now() + grace;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= until {
            break;
        }
    }
    for h in system::holders(dev, mp, namespaces) {
        system::signal(h.pid, Signal::KILL);
        if !report.killed.iter().any(|k| k.pid == h.pid) {
            report.killed.push(h);
        }
    }
    // SIGKILL takes effect at once, but the kernel releases files as the
    // process exits: give it a moment.
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts `mp`; if busy, stops the holders (see [`stop_holders`]) and
/// tries again.
fn unmount_busy(
    mp: &Path,
    dev: &str,
    grace: Duration,
    report: &mut CloseReport,
) -> Result<(), Error> {
    use rustix::mount::{UnmountFlags, unmount};
    let try_unmount = || match unmount(mp, UnmountFlags::NOFOLLOW) {
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(true),
        Err(rustix::io::Errno::BUSY) => Ok(false),
        Err(e) => Err(Error::Step {
            step: "unmount the data",
            source: e.into(),
        }),
    };
    if try_unmount()? || stop_holders(dev, mp, false, grace, report, try_unmount)? {
        return Ok(());
    }
    Err(Error::Busy {
        mountpoint: mp.to_path_buf(),
        holders: system::holders(dev, mp, false),
    })
}

/// Mounts the NFS servers' directory: a small tmpfs of its own (root's,
/// 0700, `nosuid,nodev,noexec`, private), holding the shares' empty mount
/// points (one or two names below it: `NAME/share`, a directory per VM)
/// and nothing else, made read-only before it is attached.
/// Each server confines itself beneath its VM's directory in it; being a filesystem of its own,
/// nothing of the host's filesystem lies behind it (a bind of a host
/// directory would let a file of that filesystem, opened by handle
/// through it, count as beneath it), and the server can change nothing in
/// it (no link swapped in where the next open mounts a share). Done once:
/// while it is mounted (a server started again), it is kept as is. Says
/// what stands in the way (something else mounted there or beneath)
/// instead of mounting. [`release_nfs_dir`] takes it down.
pub fn nfs_dir(dir: &Path, shares: &[ShareView]) -> std::io::Result<Vec<String>> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};
    let here: Vec<_> = system::mounts()
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(dir))
        .collect();
    // Ours already (a server started again), shares mounted in it or not.
    let at_dir = here.iter().filter(|m| m.mountpoint == dir).count();
    if at_dir == 1
        && here
            .iter()
            .any(|m| m.mountpoint == dir && m.fstype == "tmpfs")
        && here
            .iter()
            .all(|m| m.mountpoint == dir || shares.iter().any(|v| v.at == m.mountpoint))
    {
        return Ok(Vec::new());
    }
    if !here.is_empty() {
        return Ok(here
            .iter()
            .map(|m| {
                format!(
                    "{} is mounted ({}), not by coffre",
                    m.mountpoint.display(),
                    m.fstype
                )
            })
            .collect());
    }
    // Each mount point one or two plain names below (`VM/share`: a
    // directory of each VM's own, which its server is confined beneath).
    let mut names: Vec<PathBuf> = Vec::new();
    for v in shares {
        let rel = v.at.strip_prefix(dir).ok().filter(|r| {
            let n = r.components().count();
            (1..=2).contains(&n)
                && r.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        let Some(rel) = rel else {
            return Ok(vec![format!(
                "{}: not one or two names in {}",
                v.at.display(),
                dir.display()
            )]);
        };
        if let Some(p) = rel.parent().filter(|p| !p.as_os_str().is_empty())
            && !names.iter().any(|n| n == p)
        {
            names.push(p.to_path_buf());
        }
        names.push(rel.to_path_buf());
    }
    private_dir(dir)?;
    let fs = rustix::mount::fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_set_string(&fs, "mode", "0700")?;
    rustix::mount::fsconfig_set_string(&fs, "size", "64k")?;
    rustix::mount::fsconfig_set_string(&fs, "nr_inodes", (names.len() + 8).to_string())?;
    rustix::mount::fsconfig_create(&fs)?;
    let root = rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )?;
    // Parents first (each listed before what it holds).
    for n in &names {
        match rustix::fs::mkdirat(&root, n.as_path(), Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let at = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    attach(&root, &at, true)?;
    Ok(Vec::new())
}

/// Attaches the detached mount `mount` on the directory `at`: made
/// `nosuid,nodev,noexec` (and read-only when asked) before, private
/// after (attached under a shared parent it would have become shared, and
/// what is mounted on it later would propagate elsewhere).
fn attach(
    mount: &std::os::fd::OwnedFd,
    at: &std::os::fd::OwnedFd,
    read_only: bool,
) -> std::io::Result<()> {
    use rustix::mount::MoveMountFlags;
    use std::os::fd::AsFd;
    coffre_sys::mount::restrict(mount.as_fd(), read_only)?;
    rustix::mount::move_mount(
        mount,
        "",
        at,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    coffre_sys::mount::make_private(mount.as_fd())
}

/// Whether `fd` (a directory) is on the NFS server's own directory: a
/// read-only tmpfs ([`nfs_dir`]).
fn on_nfs_dir(fd: &std::os::fd::OwnedFd) -> std::io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let st = rustix::fs::fstatfs(fd)?;
    let vfs = rustix::fs::fstatvfs(fd)?;
    Ok(st.f_type == TMPFS_MAGIC && vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Takes down the NFS server's directory [`nfs_dir`] mounted (and any
/// share still mounted in it: there should be none), once the server is
/// gone.
pub fn release_nfs_dir(dir: &Path) -> Vec<String> {
    use rustix::mount::{UnmountFlags, unmount};
    let mut done = Vec::new();
    for m in system::mounts()
        .into_iter()
        .rev()
        .filter(|m| m.mountpoint.starts_with(dir))
    {
        let r = unmount(&m.mountpoint, UnmountFlags::NOFOLLOW)
            .or_else(|_| unmount(&m.mountpoint, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH));
        if let Err(e) = r {
            done.push(format!("{}: {e}", m.mountpoint.display()));
        }
    }
    done
}

/// `d`, a directory of root's alone (0700): made if missing, anything
/// else there than a directory refused (it is in the vault's own run
/// directory).
fn private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(d)?;
    if !m.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            d.display()
        )));
    }
    if m.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Owners and modes, set through directory descriptors opened without
/// following symlinks: a member who replaced `shared` with a link to
/// `/etc` gets an error at the next open, not root.
fn apply_ownership(l: &Layout, own: &Ownership) -> std::io::Result<()> {
    use rustix::fs::{CWD, Gid, Mode, OFlags, Uid, fchmod, fchown, mkdirat, openat};
    use std::os::fd::OwnedFd;
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
    let set = |fd: &OwnedFd, uid: u32, gid: u32, mode: u32| -> std::io::Result<()> {
        fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
        fchmod(fd, Mode::from_raw_mode(mode))?;
        Ok(())
    };
    let sub = |parent: &OwnedFd, name: &str| -> std::io::Result<OwnedFd> {
        match mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        openat(parent, name, flags, Mode::empty()).map_err(|e| {
            std::io::Error::other(format!(
                "{name} in the data is not a plain directory ({e}); refusing to follow it"
            ))
        })
    };
    let root = openat(CWD, &l.mountpoint, flags, Mode::empty())?;
    // Sticky: members cannot rename or delete what root made here.
    set(&root, 0, own.team_gid, 0o3770)?;
    set(&sub(&root, "shared")?, 0, own.team_gid, 0o2770)?;
    set(&sub(&root, "disks")?, 0, 0, 0o700)?;
    // The daemon's own corner (workloads' logs and VM states): root's
    // alone, so nothing under it can be swapped for a symlink.
    let own_dir = sub(&root, ".coffre")?;
    set(&own_dir, 0, 0, 0o700)?;
    for name in ["logs", "vm"] {
        set(&sub(&own_dir, name)?, 0, 0, 0o700)?;
    }
    let home = sub(&root, "home")?;
    set(&home, 0, own.team_gid, 0o2750)?;
    for (name, uid, gid) in &own.members {
        if !nbd::valid_export_name(name) {
            continue;
        }
        set(&sub(&home, name)?, *uid, *gid, 0o700)?;
    }
    // Homes of people who are no longer members: root's alone. Only
    // directories, opened without following a link.
    let mut gone = Vec::new();
    for entry in rustix::fs::Dir::read_from(&home)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." || own.current.contains(&name) {
            continue;
        }
        gone.push(name);
    }
    for name in gone {
        if let Ok(fd) = openat(&home, name.as_str(), flags, Mode::empty()) {
            set(&fd, 0, 0, 0o700)?;
        }
    }
    Ok(())
}

/// Cuts a data stack that hangs on its storage off from its paths, from
/// outside the thread that holds it (a forced close, or an open, past its
/// deadline; a stop). The volume file's FUSE connection is aborted: the
/// I/O waiting on the engine fails at once (writes the storage had not
/// taken are lost, as they would be anyway: the engine's cipher is
/// revoked by then), so a close stuck syncing the filesystem or an open
/// stuck mounting it goes on. Then the team's filesystem is detached
/// lazily from every path it has in this mount namespace (its mount and
/// the shares' own mounts): nobody reaches its page cache's plaintext by
/// those paths while the storage hangs, and what still holds a file of it
/// (a paused workload) gets I/O errors for whatever is not cached. A copy
/// of the mount in another namespace is not reached (workloads' own
/// namespaces drop the vault's mounts; the workloads' view is cut by the
/// daemon beside this). Each path is unmounted only while it still holds
/// the mount first seen there. Never waits on the storage itself (the
/// workers stuck in it stay until it answers).
/// Returns what was done, one line each, for the audit log.
pub fn sever(layout: &Layout) -> Vec<String> {
    use rustix::mount::{UnmountFlags, unmount};
    let mut done = Vec::new();
    // Each unmount by path only while that path still holds the mount
    // seen at first (never one a later open made there).
    let still =
        |m: &system::MountEntry| system::mount_at(&m.mountpoint).is_some_and(|n| n.id == m.id);
    if let Some(m) = system::mount_at(&layout.volume_file)
        && m.fstype.starts_with("fuse")
        && m.source == "coffre"
        && still(&m)
    {
        // FORCE aborts a FUSE connection even when the unmount itself is
        // refused (the loop device still holds the file).
        done.push(match unmount(&layout.volume_file, UnmountFlags::FORCE) {
            Ok(()) | Err(rustix::io::Errno::BUSY) => {
                "the volume file's FUSE connection aborted: the I/O waiting on the engine failed"
                    .into()
            }
            Err(e) => format!("the volume file's FUSE connection: {e}"),
        });
    }
    if let Some(m) = system::mount_at(&layout.mountpoint)
        && m.source.starts_with("/dev/loop")
    {
        let all = system::mounts();
        let ours = all.iter().rev().filter(|o| o.dev == m.dev);
        for o in ours {
            if !still(o) {
                continue;
            }
            let r = unmount(&o.mountpoint, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
            done.push(match r {
                Ok(()) => format!("{} detached", o.mountpoint.display()),
                Err(e) => format!("{} not detached: {e}", o.mountpoint.display()),
            });
        }
    }
    done
}

/// Removes what a daemon killed while open left behind: the team's mount
/// (after naming and stopping the processes holding it), loop devices on
/// the volume file, the dead FUSE mount, the NBD socket. Returns what was
/// done, one line each, for the audit log.
pub fn cleanup_stale(layout: &Layout, grace: Duration) -> Vec<String> {
    use rustix::mount::{UnmountFlags, unmount};
    let mut done = Vec::new();
    // The NFS server's directory first: the shares' mounts in it hold the
    // data's filesystem (its server died with the daemon).
    let nfs: Vec<_> = system::mounts()
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(&layout.nfs_dir))
        .collect();
    if !nfs.is_empty() {
        let failed = release_nfs_dir(&layout.nfs_dir);
        done.push(format!(
            "unmounted {} mount(s) in {} left by a previous daemon{}",
            nfs.len(),
            layout.nfs_dir.display(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (not: {})", failed.join("; "))
            }
        ));
    }
    if let Some(m) = system::mount_at(&layout.mountpoint)
        && m.source.starts_with("/dev/loop")
    {
        let mut report = CloseReport::default();
        // The NFS server's view (or any bind mount of the data here)
        // first: it would keep the filesystem alive.
        for other in system::mounts()
            .into_iter()
            .rev()
            .filter(|o| o.dev == m.dev && o.mountpoint != layout.mountpoint)
        {
            let r = unmount(&other.mountpoint, UnmountFlags::empty())
                .or_else(|_| unmount(&other.mountpoint, UnmountFlags::DETACH));
            done.push(format!(
                "{} {} left by a previous daemon",
                if r.is_ok() {
                    "unmounted"
                } else {
                    "could not unmount"
                },
                other.mountpoint.display()
            ));
        }
        match unmount_busy(&layout.mountpoint, &m.dev, grace, &mut report) {
            Ok(()) => done.push(format!(
                "unmounted {} left by a previous daemon",
                layout.mountpoint.display()
            )),
            Err(e) => {
                let _ = unmount(&layout.mountpoint, UnmountFlags::DETACH);
                done.push(format!(
                    "{e}; detached lazily (the key died with the previous daemon)"
                ));
            }
        }
        for h in report.killed {
            done.push(format!("stopped {h}"));
        }
    }
    for l in LoopDevice::backed_by(&layout.volume_file) {
        match l.detach(Duration::from_secs(5)) {
            Ok(()) => done.push(format!("detached {}", l.path.display())),
            Err(e) => done.push(format!("could not detach {}: {e}", l.path.display())),
        }
    }
    if let Some(m) = system::mount_at(&layout.volume_file)
        && m.fstype.starts_with("fuse")
    {
        // The connection died with the daemon; FORCE makes sure of it.
        match unmount(&layout.volume_file, UnmountFlags::FORCE) {
            Ok(()) => done.push(format!(
                "unmounted the dead volume file {}",
                layout.volume_file.display()
            )),
            Err(e) => {
                let _ = unmount(&layout.volume_file, UnmountFlags::DETACH);
                done.push(format!(
                    "volume file {}: {e}; detached lazily",
                    layout.volume_file.display()
                ));
            }
        }
    }
    if layout.nbd_socket.exists() && std::fs::remove_file(&layout.nbd_socket).is_ok() {
        done.push(format!(
            "removed the stale socket {}",
            layout.nbd_socket.display()
        ));
    }
    done
}

//! QEMU workloads. The daemon starts QEMU in its own cgroup and mount
//! namespace (where no vault's data exists) and drives it over QMP. Its
//! disks are images inside the vault served over NBD, attached with a
//! reconnect delay, so it never holds a file on the mount:
//!
//! - fast mode: `stop` at close (the NBD connections drop with the
//!   server, the guest waits), `cont` at open (QEMU reconnects on the
//!   first request and retries it);
//! - safe mode: `stop`, then the VM's whole state is migrated into a file
//!   inside the volume through a descriptor the daemon opens and passes
//!   over QMP, and QEMU exits; at open a new QEMU waits for incoming
//!   migration from that file, then `cont`.

use crate::qmp::{Qmp, QmpError};
use crate::{KILL_WITHIN, Line, Running, State, WorkloadError, Workloads, line};
use serde_json::json;
use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long QEMU has to exit by itself after `quit`.
pub(crate) const QUIT_WITHIN: Duration = Duration::from_secs(10);
/// How long QEMU may take to create its QMP socket.
const QMP_WITHIN: Duration = Duration::from_secs(30);
/// How long a migration into (or out of) the vault may take.
const MIGRATE_WITHIN: Duration = Duration::from_secs(600);
/// How long the guest keeps retrying its disks while the vault is closed
/// (QEMU's NBD `reconnect-delay`): a fast-mode VM is paused while closed,
/// so this covers the moment between the server's return and `cont`.
const NBD_RECONNECT_S: u64 = 300;

impl Workloads {
    fn state_file(&self, name: &str) -> PathBuf {
        self.paths
            .data
            .join(".coffre")
            .join("vm")
            .join(format!("{name}.state"))
    }

    fn qmp_socket(&self, name: &str) -> PathBuf {
        crate::vm_dir(&self.paths.vms, name).join("qmp.sock")
    }

    /// Makes the VM's run directory, owned by the VM user and theirs alone,
    /// under `DIR/run/vm` (root's alone, so nobody can swap what is there).
    fn make_vm_dir(&self, name: &str, uid: u32, gid: u32) -> Result<PathBuf, WorkloadError> {
        use std::os::unix::fs::PermissionsExt;
        let vms = &self.paths.vms;
        std::fs::create_dir_all(vms)
            .map_err(|e| WorkloadError::Setup(format!("{}: {e}", vms.display())))?;
        std::fs::set_permissions(vms, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| WorkloadError::Setup(format!("{}: {e}", vms.display())))?;
        let dir = crate::vm_dir(vms, name);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(WorkloadError::Setup(format!("{}: {e}", dir.display())));
            }
            _ => {}
        }
        std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| WorkloadError::Setup(format!("{}: {e}", dir.display())))?;
        Ok(dir)
    }

    /// A host-side mark (no data in it) that a VM's state is in the vault,
    /// so status can say so while the vault is closed.
    pub(crate) fn suspended_mark(&self, name: &str) -> PathBuf {
        self.paths.run.join(format!("{name}.suspended"))
    }

    /// Starts QEMU (resuming from its saved state when there is one).
    pub(crate) fn spawn_vm(&mut self, i: usize) -> Result<(u32, bool), WorkloadError> {
        let h = self.hierarchy.as_ref().map_err(Clone::clone)?;
        let cfg = self.entries[i].cfg.clone();
        let group = h.group(&self.paths.scope, &cfg.name);
        group
            .kill_all(KILL_WITHIN)
            .map_err(|e| WorkloadError::Cgroup(format!("clearing its old cgroup: {e}")))?;
        for d in &cfg.disks {
            let img = self.paths.data.join("disks").join(format!("{d}.img"));
            if !img.exists() {
                let Some(mb) = cfg.disk_size_mb else {
                    return Err(WorkloadError::Setup(format!(
                        "disks/{d}.img does not exist in the data (create it, or set disk_size_mb)"
                    )));
                };
                let f = OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .mode(0o600)
                    .open(&img)
                    .map_err(|e| WorkloadError::Setup(format!("creating disks/{d}.img: {e}")))?;
                f.set_len(mb * 1024 * 1024)
                    .map_err(|e| WorkloadError::Setup(format!("sizing disks/{d}.img: {e}")))?;
            }
        }
        let state = self.state_file(&cfg.name);
        let incoming = cfg.role == crate::Role::Project && state.exists();
        std::fs::create_dir_all(&self.paths.run)
            .map_err(|e| WorkloadError::Setup(e.to_string()))?;
        // QEMU runs as an unprivileged user, in a namespace where the
        // vault directory is an empty tmpfs with only its own run
        // directory bound into it.
        let (uid, gid, groups) = crate::vm_credentials(&self.settings)?;
        let cover = self.paths.cover.clone().ok_or_else(|| {
            WorkloadError::Setup(
                "VMs need the data's mountpoint directly in the vault directory (the default)"
                    .to_string(),
            )
        })?;
        let vm_dir = self.make_vm_dir(&cfg.name, uid, gid)?;
        let seen = cover.join("vm");
        // The kernel and initrd go in as descriptors (the VM user needs no
        // way through the directories above them), if the files
        // themselves are readable by that user.
        let mut pass_fds = Vec::new();
        let mut boot_files = Vec::new();
        for (what, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
            let Some(path) = path else { continue };
            let f = std::fs::File::open(path)
                .map_err(|e| WorkloadError::Setup(format!("its {what} {}: {e}", path.display())))?;
            readable_by(&f, uid, &groups)
                .map_err(|e| WorkloadError::Setup(format!("its {what} {}: {e}", path.display())))?;
            let n = 200 + libc::c_int::try_from(pass_fds.len()).unwrap_or(0);
            pass_fds.push((std::os::fd::OwnedFd::from(f), n));
            boot_files.push((what, format!("/proc/self/fd/{n}")));
        }
        let sock = self.qmp_socket(&cfg.name);
        if sock.as_os_str().len() > 107 {
            return Err(WorkloadError::Setup(format!(
                "its QMP socket path {} is longer than a unix socket allows (107 bytes): use a shorter vault directory or name",
                sock.display()
            )));
        }
        let _ = std::fs::remove_file(&sock);
        let procs = group.create(None).map_err(|e| {
            WorkloadError::Cgroup(format!("cgroup {}: {e}", group.path().display()))
        })?;

        let qemu = self
            .settings
            .qemu
            .clone()
            .unwrap_or_else(|| "qemu-system-x86_64".into());
        let mut cmd = Command::new(&qemu);
        cmd.args(["-name", &cfg.name])
            .args([
                "-machine",
                &format!("accel={}", cfg.accel.as_deref().unwrap_or("kvm:tcg")),
            ])
            .args(["-m", &cfg.memory_mb.unwrap_or(256).to_string()])
            .args(["-smp", &cfg.cpus.unwrap_or(1).to_string()])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            // No privileges to win back, no process to start, no old
            // system calls, no scheduling or affinity changes.
            .args([
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                seen.join("qmp.sock").display()
            ))
            // The serial console is its log, through our pipe as QEMU's
            // own stdout (opening /proc/self/fd/1 again would be refused:
            // the pipe is root's).
            .args(["-chardev", "stdio,id=console,signal=off"])
            .args(["-serial", "chardev:console"]);
        for (what, path) in &boot_files {
            cmd.arg(format!("-{what}")).arg(path);
        }
        if let Some(a) = &cfg.append {
            cmd.args(["-append", a]);
        }
        for d in &cfg.disks {
            let node = json!({
                "driver": "nbd",
                "node-name": format!("disk-{d}"),
                // Its own socket, which serves its own disks only.
                "server": {"type": "unix", "path": seen.join("nbd.sock")},
                "export": d,
                "reconnect-delay": NBD_RECONNECT_S,
            });
            cmd.arg("-blockdev").arg(node.to_string());
            // An I/O error pauses the guest instead of reaching it.
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,drive=disk-{d},id=vblk-{d},werror=stop,rerror=stop"
            ));
        }
        let mut network = coffre_sys::child::Network::Host;
        if self.vms_isolated {
            network = coffre_sys::child::Network::Empty;
        }
        if let Some(crate::Link::Tap { name, mac }) = self.links.get(&cfg.name) {
            // Opened here, in the host's namespace; QEMU only gets the
            // descriptor (it has no right to make or open a tap itself).
            // The daemon made it, with its address and route; one that
            // vanished would come back bare: refuse rather than recreate.
            if !coffre_net::Host::here().link_exists(name) {
                return Err(WorkloadError::Setup(format!(
                    "its tap {name} is gone (restart the daemon to make it again)"
                )));
            }
            let tap = coffre_sys::tun::open_tap(name)
                .map_err(|e| WorkloadError::Setup(format!("its tap {name}: {e}")))?;
            let n = 200 + libc::c_int::try_from(pass_fds.len()).unwrap_or(0);
            pass_fds.push((tap, n));
            cmd.arg("-netdev").arg(format!("tap,id=vnet0,fd={n}"));
            cmd.arg("-device").arg(format!(
                "virtio-net-pci,netdev=vnet0,mac={}",
                coffre_net::names::mac_text(mac)
            ));
        }
        cmd.args(&cfg.qemu_args);
        if incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(&cfg.env);
        let (reader, writer) =
            std::io::pipe().map_err(|e| WorkloadError::Setup(format!("pipe: {e}")))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| WorkloadError::Setup(format!("pipe: {e}")))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2));
        let mut hide = (self.paths.hide)();
        hide.push(self.paths.data.clone());
        hide.push(self.paths.view.clone());
        coffre_sys::child::prepare(
            &mut cmd,
            coffre_sys::child::ChildSetup {
                cgroup_procs: procs,
                credentials: Some((uid, gid, groups)),
                detach: hide,
                binds: vec![coffre_sys::child::Bind {
                    from: vm_dir,
                    to: seen,
                }],
                cover: Some(cover),
                private_mounts: true,
                cwd: Some("/".into()),
                pass_fds,
                network,
            },
        )
        .map_err(|e| {
            group.remove();
            WorkloadError::Spawn(e.to_string())
        })?;
        let mut child = cmd.spawn().map_err(|e| {
            group.remove();
            WorkloadError::Spawn(format!("{}: {e}", qemu.display()))
        })?;
        drop(cmd);
        crate::sweep_copies(child.id(), self.paths.hide);
        let e = &mut self.entries[i];
        if cfg.role == crate::Role::Service {
            let _ = e.sink.attach(&self.paths.service_log(&cfg.name));
        }
        let pump = Some(e.sink.pump(reader));
        let pid = child.id();
        let until = Instant::now() + QMP_WITHIN;
        let mut qmp = loop {
            match Qmp::connect(&sock, Duration::from_millis(200)) {
                Ok(q) => break q,
                Err(err) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        let _ = group.kill_all(KILL_WITHIN);
                        group.remove();
                        return Err(WorkloadError::Spawn(format!(
                            "QEMU {} before its QMP socket was up (its log says why)",
                            crate::describe(st)
                        )));
                    }
                    if Instant::now() >= until {
                        let _ = group.kill_all(KILL_WITHIN);
                        let _ = child.wait();
                        group.remove();
                        return Err(WorkloadError::Timeout(format!("QEMU's QMP socket: {err}")));
                    }
                }
            }
        };
        if incoming {
            let t = Instant::now();
            let r = resume_from(&mut qmp, &state);
            if let Err(err) = r {
                let _ = group.kill_all(KILL_WITHIN);
                let _ = child.wait();
                group.remove();
                return Err(WorkloadError::Migration(format!(
                    "resuming from its saved state in the vault: {err} (the state file stays in the vault unless the migration had completed)"
                )));
            }
            let _ = std::fs::remove_file(self.suspended_mark(&cfg.name));
            self.entries[i].note = format!("resumed from the vault in {} ms", crate::ms(t));
        }
        self.entries[i].proc = Some(Running {
            child,
            group,
            pump,
            qmp: Some(qmp),
        });
        Ok((pid, incoming))
    }

    /// Fast mode: pause the guest (`stop`).
    pub(crate) fn pause_vm(&mut self, i: usize, out: &mut Vec<Line>) {
        let name = self.entries[i].cfg.name.clone();
        let t = Instant::now();
        let r = match self.entries[i].proc.as_mut().and_then(|p| p.qmp.as_mut()) {
            Some(q) => q.execute("stop", None).map(|_| ()),
            None => return,
        };
        match r {
            Ok(()) => {
                self.entries[i].set(State::Frozen, "paused at close (fast mode)");
                out.push(line(
                    "workload",
                    "frozen",
                    format!("{name} (VM paused) in {} ms", crate::ms(t)),
                ));
            }
            Err(e) => self.kill(
                i,
                &format!("could not be paused ({e}): killed at close"),
                out,
            ),
        }
    }

    /// Fast mode, at open: `cont`.
    pub(crate) fn continue_vm(&mut self, i: usize) -> Result<(), WorkloadError> {
        match self.entries[i].proc.as_mut().and_then(|p| p.qmp.as_mut()) {
            Some(q) => q
                .execute("cont", None)
                .map(|_| ())
                .map_err(|e| WorkloadError::Qmp(e.to_string())),
            None => Err(WorkloadError::Qmp("no QMP connection".into())),
        }
    }

    /// Safe mode: the VM's state goes into the volume, QEMU exits.
    pub(crate) fn suspend_vm(&mut self, i: usize, out: &mut Vec<Line>) {
        let name = self.entries[i].cfg.name.clone();
        let state = self.state_file(&name);
        let t = Instant::now();
        let Some(mut p) = self.entries[i].proc.take() else {
            return;
        };
        let r = match p.qmp.as_mut() {
            Some(q) => suspend_into(q, &state),
            None => Err(QmpError::Protocol("no QMP connection".into())),
        };
        match r {
            Ok(bytes) => {
                if let Some(q) = p.qmp.as_mut() {
                    let _ = q.execute("quit", None);
                }
                // QEMU exits by itself after `quit`; anything left goes.
                let until = Instant::now() + QUIT_WITHIN;
                while Instant::now() < until && !matches!(p.child.try_wait(), Ok(Some(_))) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = p.group.kill_all(KILL_WITHIN);
                let _ = p.child.wait();
                p.group.remove();
                crate::join_pump(p.pump.take());
                let _ = std::fs::write(self.suspended_mark(&name), b"");
                self.entries[i].set(
                    State::SuspendedToVault,
                    "suspended into the vault (safe mode)",
                );
                out.push(line(
                    "workload",
                    "suspended",
                    format!(
                        "{name}: {} MB of VM state written into the vault in {} ms",
                        bytes / 1_000_000,
                        t.elapsed().as_millis()
                    ),
                ));
            }
            Err(e) => {
                let mut part = state.clone().into_os_string();
                part.push(".part");
                let _ = std::fs::remove_file(PathBuf::from(part));
                self.entries[i].proc = Some(p);
                self.kill(
                    i,
                    &format!("could not be suspended into the vault ({e}): killed at close"),
                    out,
                );
            }
        }
    }
}

/// Whether the file's own mode lets `uid` (with `groups`) read it.
fn readable_by(f: &std::fs::File, uid: u32, groups: &[u32]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().map_err(|e| e.to_string())?;
    let mode = m.mode();
    let ok = if m.uid() == uid {
        mode & 0o400 != 0
    } else if groups.contains(&m.gid()) {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "not readable by the VM user (uid {uid}): mode {:o}, owner {}:{}",
            mode & 0o7777,
            m.uid(),
            m.gid()
        ))
    }
}

/// Migrates a paused-or-running VM into `state` (written as
/// `state.part`, renamed once complete and synced). Returns its size.
fn suspend_into(q: &mut Qmp, state: &std::path::Path) -> Result<u64, QmpError> {
    q.execute("stop", None)?;
    // A local file, not a network: no bandwidth cap (QEMU's default is
    // 128 MiB/s).
    q.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1_u64 << 40})),
    )?;
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    }
    let mut part = state.to_path_buf().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&part)?;
    q.pass_fd("coffre-state", f.as_fd())?;
    q.execute("migrate", Some(json!({"uri": "fd:coffre-state"})))?;
    q.wait_migration(MIGRATE_WITHIN)?;
    f.sync_all()?;
    let size = f.metadata()?.len();
    drop(f);
    std::fs::rename(&part, state)?;
    Ok(size)
}

/// Feeds a QEMU started with `-incoming defer -S` its saved state, then
/// lets it run.
fn resume_from(q: &mut Qmp, state: &std::path::Path) -> Result<(), QmpError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(state)?;
    q.pass_fd("coffre-state", f.as_fd())?;
    q.execute("migrate-incoming", Some(json!({"uri": "fd:coffre-state"})))?;
    q.wait_migration(MIGRATE_WITHIN)?;
    drop(f);
    // The state is in QEMU now: the file goes before the guest runs, so a
    // crash can never resume this old memory over a newer disk.
    std::fs::remove_file(state)?;
    q.execute("cont", None)?;
    Ok(())
}

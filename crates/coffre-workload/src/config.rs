//! The workloads a vault declares in `config.toml`:
//!
//! ```toml
//! [workloads]
//! freezer = "auto"          # auto | v2 | v1
//!
//! [[workload]]
//! name = "build"
//! kind = "process"          # process | qemu
//! role = "project"          # project (follows the vault) | service (always on, never sees the data)
//! order = 10                # started in ascending order, paused in descending order
//! members = ["alice"]       # who may see its logs and bind tasks to it (superusers always may)
//! command = ["/usr/bin/make", "-C", "shared/src"]
//! user = "alice"
//! cwd = "shared/src"        # project: relative to the data; service: absolute
//! env = { LANG = "C.UTF-8" }
//! stop_timeout_s = 10       # SIGTERM, then SIGKILL after this long
//! memory_mb = 2048
//! # With a [network] section in config.toml (see docs/network.md):
//! address = "10.9.0.20"     # its address on the vault network
//! network = true            # process: its own network namespace on the vault network
//! ports = ["tcp/3000"]      # reachable by its members over the VPN, and by other workloads
//! egress = ["198.51.100.7:443"]  # where it may send outside, besides [network] egress
//!
//! [[workload]]
//! name = "desktop"
//! kind = "qemu"
//! address = "10.9.0.10"
//! share = "shared"          # QEMU: mounts this directory of the data over NFS
//! share_user = "alice"      # ...acting on its files as this host user (name or uid, never root)
//! share_groups = [1234]     # optional: exactly these groups instead of alice's
//! share_readonly = false
//! share_async = false       # true: creates, renames, removes not synced before each reply
//! ```

use crate::WorkloadError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `[workloads]`: settings for all of them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Which cgroup freezer to use.
    #[serde(default)]
    pub freezer: crate::cgroup::FreezerChoice,
    /// The QEMU binary (default `qemu-system-x86_64` on `PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<PathBuf>,
    /// How long a process workload may take to freeze at a fast close
    /// before it is killed instead, ms.
    #[serde(default = "default_freeze_timeout")]
    pub freeze_timeout_ms: u64,
    /// The unprivileged user QEMU runs as (`coffre init` creates
    /// `coffre-vm`; a VM does not start while it is missing).
    #[serde(default = "default_vm_user")]
    pub vm_user: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            freezer: crate::cgroup::FreezerChoice::default(),
            qemu: None,
            freeze_timeout_ms: default_freeze_timeout(),
            vm_user: default_vm_user(),
        }
    }
}

/// The user VMs run as unless `[workloads] vm_user` says otherwise.
pub const DEFAULT_VM_USER: &str = "coffre-vm";

fn default_vm_user() -> String {
    DEFAULT_VM_USER.into()
}

fn default_freeze_timeout() -> u64 {
    5000
}

/// What a workload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A command in its own cgroup.
    Process,
    /// A QEMU virtual machine whose disks are images in the vault.
    Qemu,
}

/// Whether it follows the vault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs while the vault is open; paused or suspended while closed.
    #[default]
    Project,
    /// Always running, in a mount namespace where the data does not exist.
    Service,
}

/// `[[workload]]`: one workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Unique name: letters, digits, `-` and `_`.
    pub name: String,
    /// Process or QEMU.
    pub kind: Kind,
    /// Project or service.
    #[serde(default)]
    pub role: Role,
    /// Start order (ascending); pauses go in reverse.
    #[serde(default)]
    pub order: i32,
    /// Members who may use it (see its logs, bind tasks to it). Empty:
    /// every member. Superusers always may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Process: the program and its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Process: the user to run as, by name or numeric uid. Required:
    /// `"root"` must be asked for on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Process: primary group id (default: the user's, or the uid for a
    /// numeric user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Process: more supplementary group ids (e.g. the team's group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// Process: working directory (project: relative to the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Process: environment (nothing else is inherited but `PATH`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Process: seconds between SIGTERM and SIGKILL when it is stopped.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    /// Memory limit (process: cgroup; QEMU: guest RAM, default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// QEMU: virtual CPUs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// QEMU: kernel to boot directly (absolute path on the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// QEMU: its initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// QEMU: kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// QEMU: disks, by export name (`disks/NAME.img` in the data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// QEMU: accelerators to try, in order (`-machine accel=`; default
    /// `kvm:tcg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// QEMU: size of a disk image created when one is missing (sparse);
    /// without it a missing image is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_mb: Option<u64>,
    /// QEMU: extra arguments (devices...; no network options when the
    /// vault has a `[network]`: its NIC comes from the vault).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_args: Vec<String>,
    /// Its address on the vault network (`[network]`): a VM gets it from
    /// the vault's DHCP server on a NIC the vault gives it; a process
    /// workload with `network = true` has it on its namespace's `eth0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// Process: run in a network namespace of its own on the vault
    /// network (otherwise it shares the host's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// What its members reach over the VPN (and other workloads reach):
    /// `tcp/PORT` or `udp/PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<coffre_net::Port>,
    /// Destinations outside the vault network it may send to, besides
    /// the vault's own `egress`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<coffre_net::Egress>,
    /// QEMU: the part of the data this VM mounts over NFS from the vault
    /// host (on the vault network's gateway address): a directory
    /// relative to the data root, outside `.coffre` and `disks`. Needs an
    /// `address` (the NFS server knows the VM by it) and `share_user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<PathBuf>,
    /// With `share`: the host user the NFS server acts as on the shared
    /// files, whatever user the VM's own requests claim: a user name or a
    /// numeric uid, never root (see [`share_identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_user: Option<String>,
    /// With `share`: exactly these supplementary group ids, instead of
    /// `share_user`'s groups on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_groups: Option<Vec<u32>>,
    /// With `share`: the VM may read the shared files but not change them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_readonly: bool,
    /// With `share`: the NFS server replies to a call that changes a name
    /// or an attribute (CREATE, RENAME, REMOVE, SETATTR...) before it is
    /// on stable storage, as knfsd's `async` exports: small files go
    /// about twice as fast, and a crash of the host or the daemon while
    /// open may lose the last seconds of such changes, which the VM was
    /// told were done. Off by default (as RFC 1813 asks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_async: bool,
}

/// Whom the NFS server acts as on a VM's `share`, in place of the
/// credentials the VM sends (which it could make up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareIdentity {
    /// User id (never 0).
    pub uid: u32,
    /// Primary group id (never 0).
    pub gid: u32,
    /// Supplementary group ids (never 0).
    pub groups: Vec<u32>,
}

/// Resolves a workload's `share_user` (and `share_groups`) on this host.
///
/// A numeric uid is taken as is; its gid and groups are those of the
/// account that has it, or, when none does, the same number as gid and
/// only that as group. A name must be a host account: its uid, primary
/// gid and groups (`getgrouplist`). `groups` (`share_groups`), when
/// given, replaces the supplementary groups. Root (uid 0) and root's
/// group (gid 0) are refused: over NFS, whoever controls the VM would
/// act with them on the data.
pub fn share_identity(user: &str, groups: Option<&[u32]>) -> Result<ShareIdentity, WorkloadError> {
    let lookup = |e: std::io::Error| WorkloadError::User(format!("share_user {user}: {e}"));
    let (uid, gid, account_groups) = match user.parse::<u32>() {
        Ok(uid) => match coffre_sys::child::user_by_uid(uid).map_err(lookup)? {
            Some((uid, gid, g)) => (uid, gid, Some(g)),
            None => (uid, uid, None),
        },
        Err(_) => {
            let (uid, gid, g) = coffre_sys::child::user(user).map_err(lookup)?.ok_or_else(|| {
                WorkloadError::User(format!(
                    "share_user {user}: no such user on this host: create the account, or give a numeric uid"
                ))
            })?;
            (uid, gid, Some(g))
        }
    };
    if uid == 0 {
        return Err(WorkloadError::User(format!(
            "share_user {user} is root (uid 0): the NFS server never acts as root; name an ordinary user"
        )));
    }
    if gid == 0 {
        return Err(WorkloadError::User(format!(
            "share_user {user} has primary group 0 (root's): the NFS server never acts with it; name another user"
        )));
    }
    let groups = match groups {
        Some(g) => g.to_vec(),
        None => account_groups.unwrap_or_else(|| vec![gid]),
    };
    if groups.contains(&0) {
        return Err(WorkloadError::User(format!(
            "share_user {user} is in group 0 (root's): the NFS server never acts with it; set share_groups to the groups it should have"
        )));
    }
    Ok(ShareIdentity { uid, gid, groups })
}

/// QEMU options that would give a VM a network of its own making.
fn is_network_option(prev: Option<&str>, arg: &str) -> bool {
    let flag = arg.trim_start_matches('-');
    if arg.starts_with('-') && matches!(flag, "nic" | "net" | "netdev") {
        return true;
    }
    if prev.is_some_and(|p| p.trim_start_matches('-') == "device") {
        let driver = arg.split(',').next().unwrap_or("").to_ascii_lowercase();
        let driver = driver.strip_prefix("driver=").unwrap_or(&driver);
        return driver.contains("net")
            || [
                "e1000", "rtl8139", "ne2k", "pcnet", "i8255", "vmxnet", "usb-net",
            ]
            .iter()
            .any(|d| driver.starts_with(d));
    }
    false
}

fn default_stop_timeout() -> u64 {
    10
}

impl WorkloadConfig {
    /// Whether `member` may use this workload (read its log, bind a task
    /// to it): one of its `members`, any superuser, or anyone when it
    /// names no members.
    pub fn admits(&self, member: &str, superuser: bool) -> bool {
        superuser || self.members.is_empty() || self.members.iter().any(|m| m == member)
    }

    /// Checks one declaration; says what is wrong.
    pub fn check(&self) -> Result<(), WorkloadError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(WorkloadError::Config(format!(
                "workload name {n:?}: use 1 to 64 letters, digits, '-' or '_'"
            )));
        }
        match self.kind {
            Kind::Process => {
                if self.command.is_empty() {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: `command` is required for a process"
                    )));
                }
                if self.user.as_deref().is_none_or(str::is_empty) {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: set `user` (a user name or a numeric uid; \"root\" only on purpose: a root workload is root on the host)"
                    )));
                }
                if self.disks.len() + self.qemu_args.len() > 0 || self.kernel.is_some() {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: disks, kernel and qemu_args are for kind = \"qemu\""
                    )));
                }
                if let Some(cwd) = &self.cwd
                    && self.role == Role::Project
                    && (cwd.is_absolute()
                        || cwd
                            .components()
                            .any(|c| c == std::path::Component::ParentDir))
                {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: a project workload's cwd is relative to the data, without '..'"
                    )));
                }
                if self.role == Role::Service && self.cwd.as_ref().is_some_and(|c| !c.is_absolute())
                {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: a service workload's cwd must be absolute"
                    )));
                }
            }
            Kind::Qemu => {
                for (what, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
                    if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                        return Err(WorkloadError::Config(format!(
                            "workload {n}: `{what}` must be an absolute path on the host"
                        )));
                    }
                }
                if !self.command.is_empty() || self.user.is_some() {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: command and user are for kind = \"process\""
                    )));
                }
                if self.role == Role::Service && !self.disks.is_empty() {
                    return Err(WorkloadError::Config(format!(
                        "workload {n}: a service VM cannot have disks in the vault"
                    )));
                }
                for d in &self.disks {
                    if d.is_empty()
                        || !d
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                        || d.starts_with('.')
                    {
                        return Err(WorkloadError::Config(format!(
                            "workload {n}: disk name {d:?} is not a plain name"
                        )));
                    }
                }
            }
        }
        self.check_share()
    }

    /// `share` and its companions (see [`WorkloadConfig::share`]).
    fn check_share(&self) -> Result<(), WorkloadError> {
        let n = &self.name;
        let Some(share) = &self.share else {
            if self.share_user.is_some()
                || self.share_groups.is_some()
                || self.share_readonly
                || self.share_async
            {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: share_user, share_groups, share_readonly and share_async go with `share`"
                )));
            }
            return Ok(());
        };
        if self.kind != Kind::Qemu {
            return Err(WorkloadError::Config(format!(
                "workload {n}: `share` is for kind = \"qemu\": a process workload already sees the data through the vault's mount (set its `cwd`)"
            )));
        }
        if self.role == Role::Service {
            return Err(WorkloadError::Config(format!(
                "workload {n}: a service VM never sees the data: `share` is for project VMs"
            )));
        }
        // Checked on the text: `Path::components` would silently drop a
        // trailing '/' or an inner '.'.
        let parts: Option<Vec<&str>> = share.to_str().map(|s| s.split('/').collect());
        let Some(parts) = parts.filter(|p| {
            p.iter()
                .all(|c| !matches!(*c, "" | "." | "..") && !c.contains('\0'))
        }) else {
            return Err(WorkloadError::Config(format!(
                "workload {n}: share {share:?}: name a directory relative to the data root, like \"shared\" or \"projects/web\" (no leading or trailing '/', no '.', '..' or empty parts)"
            )));
        };
        if matches!(parts[0], ".coffre" | "disks") {
            return Err(WorkloadError::Config(format!(
                "workload {n}: share {share:?}: .coffre and disks hold the vault's own files and the VMs' disk images, and are never shared; share another directory"
            )));
        }
        match self.share_user.as_deref() {
            None | Some("") => {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: `share` needs `share_user`: the host user (a name or a numeric uid) the VM acts as on the shared files"
                )));
            }
            Some(u) if u == "root" || u.parse::<u32>() == Ok(0) => {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: share_user {u:?}: the NFS server never acts as root; name an ordinary user"
                )));
            }
            Some(_) => {}
        }
        if self.share_groups.as_ref().is_some_and(|g| g.contains(&0)) {
            return Err(WorkloadError::Config(format!(
                "workload {n}: share_groups: 0 is root's group, which the NFS server never acts with; remove it"
            )));
        }
        if self.address.is_none() {
            return Err(WorkloadError::Config(format!(
                "workload {n}: a VM with a `share` needs an `address` on the vault network: the NFS server knows it by that address"
            )));
        }
        Ok(())
    }
}

/// Checks what the workloads say about the vault network against the
/// vault's `[network]` subnet (`None`: the vault has no network, and no
/// workload may ask for one).
pub fn check_network(
    list: &[WorkloadConfig],
    subnet: Option<&coffre_net::Subnet>,
) -> Result<(), WorkloadError> {
    let mut seen = std::collections::BTreeMap::new();
    for w in list {
        let n = &w.name;
        let asks = w.address.is_some() || w.network || !w.ports.is_empty() || !w.egress.is_empty();
        let Some(subnet) = subnet else {
            if asks {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: address, network, ports and egress need a [network] section"
                )));
            }
            continue;
        };
        let mut prev = None;
        for a in &w.qemu_args {
            if is_network_option(prev, a) {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: qemu_args {a:?}: with a [network] section a VM's network comes from the vault (set `address`), not from qemu_args"
                )));
            }
            prev = Some(a.as_str());
        }
        if w.network && w.kind != Kind::Process {
            return Err(WorkloadError::Config(format!(
                "workload {n}: `network = true` is for processes; a VM is on the vault network when it has an `address`"
            )));
        }
        if w.kind == Kind::Process && w.address.is_some() != w.network {
            return Err(WorkloadError::Config(format!(
                "workload {n}: a process on the vault network needs both `network = true` and an `address`"
            )));
        }
        if w.address.is_none() && (!w.ports.is_empty() || !w.egress.is_empty()) {
            return Err(WorkloadError::Config(format!(
                "workload {n}: ports and egress need an `address` on the vault network"
            )));
        }
        if let Some(a) = w.address {
            if !subnet.holds_workload(a) {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: address {a} is not a workload address of {subnet} (inside it, not its first, network or broadcast address)"
                )));
            }
            if let Some(other) = seen.insert(a, n) {
                return Err(WorkloadError::Config(format!(
                    "workloads {other} and {n} both have address {a}"
                )));
            }
        }
        for e in &w.egress {
            if subnet.contains(e.addr) {
                return Err(WorkloadError::Config(format!(
                    "workload {n}: egress {e} is inside the vault network (use ports for that)"
                )));
            }
        }
    }
    Ok(())
}

/// Checks a whole list (each entry, and names unique).
pub fn check_all(list: &[WorkloadConfig]) -> Result<(), WorkloadError> {
    let mut seen = std::collections::BTreeSet::new();
    for w in list {
        w.check()?;
        if !seen.insert(&w.name) {
            return Err(WorkloadError::Config(format!(
                "workload {} is declared twice",
                w.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod access_tests {
    use super::*;
    use proptest::prelude::*;

    fn workload(members: Vec<String>) -> WorkloadConfig {
        let mut w: WorkloadConfig =
            serde_json::from_str(r#"{"name": "w", "kind": "process", "command": ["true"]}"#)
                .unwrap();
        w.members = members;
        w
    }

    fn parse(toml_text: &str) -> Vec<WorkloadConfig> {
        #[derive(Deserialize)]
        struct F {
            workload: Vec<WorkloadConfig>,
        }
        toml::from_str::<F>(toml_text).unwrap().workload
    }

    #[test]
    fn network_declarations_are_checked_against_the_subnet() {
        let subnet: coffre_net::Subnet = "10.9.0.0/24".parse().unwrap();
        let good = parse(
            r#"
[[workload]]
name = "desktop"
kind = "qemu"
address = "10.9.0.10"
ports = ["tcp/3389", "tcp/22"]
qemu_args = ["-device", "virtio-rng-pci"]
[[workload]]
name = "forge"
kind = "process"
command = ["forge"]
user = "git"
network = true
address = "10.9.0.20"
ports = ["tcp/3000"]
egress = ["198.51.100.7:443"]
"#,
        );
        check_network(&good, Some(&subnet)).unwrap();
        assert!(check_network(&good, None).is_err(), "no [network] section");
        let cases: &[(&str, &str)] = &[
            ("address = \"10.9.1.10\"", "not a workload address"),
            ("address = \"10.9.0.1\"", "not a workload address"),
            ("address = \"10.9.0.20\"", "both have address"),
            (
                "qemu_args = [\"-nic\", \"user\"]",
                "network comes from the vault",
            ),
            (
                "qemu_args = [\"-device\", \"e1000,netdev=n\"]",
                "network comes from the vault",
            ),
            (
                "qemu_args = [\"-netdev\", \"user,id=n\"]",
                "network comes from the vault",
            ),
            ("egress = [\"10.9.0.5:80\"]", "inside the vault network"),
            ("network = true", "for processes"),
        ];
        for (line, want) in cases {
            let text = format!(
                "[[workload]]\nname = \"a\"\nkind = \"qemu\"\naddress = \"10.9.0.20\"\n[[workload]]\nname = \"b\"\nkind = \"qemu\"\n{line}\n{}",
                if line.starts_with("address") {
                    ""
                } else {
                    "address = \"10.9.0.30\""
                }
            );
            let err = check_network(&parse(&text), Some(&subnet))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
        let half = parse(
            "[[workload]]\nname = \"p\"\nkind = \"process\"\ncommand = [\"x\"]\nuser = \"u\"\naddress = \"10.9.0.5\"\n",
        );
        assert!(check_network(&half, Some(&subnet)).is_err());
    }

    proptest! {
        /// Who may use a workload: a superuser always; with a list of
        /// members, exactly those; adding a name to the list takes
        /// access from nobody already listed, and gives it to that name.
        #[test]
        fn admits_exactly_its_members_and_superusers(
            listed in proptest::collection::btree_set("[a-e]", 0..4),
            who in "[a-f]",
            superuser: bool,
            extra in "[a-f]",
        ) {
            let w = workload(listed.iter().cloned().collect());
            let expected = superuser || listed.is_empty() || listed.contains(&who);
            prop_assert_eq!(w.admits(&who, superuser), expected);
            let mut more = listed.clone();
            more.insert(extra.clone());
            let w2 = workload(more.iter().cloned().collect());
            prop_assert!(w2.admits(&extra, false));
            for m in &listed {
                prop_assert!(w2.admits(m, false));
            }
            if !listed.is_empty() && !listed.contains(&who) && who != extra {
                prop_assert!(!w2.admits(&who, false));
            }
        }
    }
}

#[cfg(test)]
mod share_tests {
    use super::*;

    const VM: &str = "name = \"vm\"\nkind = \"qemu\"\naddress = \"10.9.0.10\"\n";

    fn parse(body: &str) -> WorkloadConfig {
        toml::from_str(body).unwrap()
    }

    fn refusal(body: &str) -> String {
        parse(body).check().unwrap_err().to_string()
    }

    #[test]
    fn a_vm_shares_a_directory_of_the_data_as_a_user() {
        let w = parse(&format!(
            "{VM}share = \"projects/web\"\nshare_user = \"alice\"\nshare_groups = [1234]\nshare_readonly = true\nshare_async = true\n"
        ));
        w.check().unwrap();
        assert_eq!(
            w.share.as_deref(),
            Some(std::path::Path::new("projects/web"))
        );
        assert_eq!(w.share_groups, Some(vec![1234]));
        assert!(w.share_readonly && w.share_async);
        let w = parse(&format!("{VM}share = \"shared\"\nshare_user = \"1000\"\n"));
        w.check().unwrap();
        assert_eq!(w.share_groups, None, "absent: the account's groups");
        assert!(!w.share_readonly);
        assert!(!w.share_async, "synced unless asked");
        // Nothing written back for a workload without a share.
        let plain = serde_json::to_value(parse(VM)).unwrap();
        assert!(
            plain
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("share")),
            "{plain}"
        );
        let empty = parse(&format!(
            "{VM}share = \"shared\"\nshare_user = \"alice\"\nshare_groups = []\n"
        ));
        empty.check().unwrap();
        assert_eq!(empty.share_groups, Some(vec![]), "present and empty: none");
    }

    #[test]
    fn every_wrong_share_is_refused_with_the_workload_named() {
        let process = "name = \"vm\"\nkind = \"process\"\ncommand = [\"x\"]\nuser = \"alice\"\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{process}share = \"shared\"\nshare_user = \"alice\"\n"),
                "sees the data through the vault's mount",
            ),
            (
                format!("{VM}role = \"service\"\nshare = \"shared\"\nshare_user = \"alice\"\n"),
                "service VM never sees the data",
            ),
            (format!("{VM}share_user = \"alice\"\n"), "go with `share`"),
            (format!("{VM}share_groups = [5]\n"), "go with `share`"),
            (format!("{VM}share_readonly = true\n"), "go with `share`"),
            (format!("{VM}share_async = true\n"), "go with `share`"),
            (
                format!("{VM}share = \"shared\"\n"),
                "`share` needs `share_user`",
            ),
            (
                format!("{VM}share = \"shared\"\nshare_user = \"\"\n"),
                "`share` needs `share_user`",
            ),
            (
                format!("{VM}share = \"shared\"\nshare_user = \"root\"\n"),
                "never acts as root",
            ),
            (
                format!("{VM}share = \"shared\"\nshare_user = \"0\"\n"),
                "never acts as root",
            ),
            (
                format!("{VM}share = \"shared\"\nshare_user = \"00\"\n"),
                "never acts as root",
            ),
            (
                format!("{VM}share = \"shared\"\nshare_user = \"alice\"\nshare_groups = [5, 0]\n"),
                "0 is root's group",
            ),
            (
                "name = \"vm\"\nkind = \"qemu\"\nshare = \"shared\"\nshare_user = \"alice\"\n"
                    .into(),
                "needs an `address`",
            ),
        ];
        for bad in [
            "",
            "/",
            "/shared",
            "shared/",
            "shared//web",
            ".",
            "./shared",
            "shared/./web",
            "..",
            "../shared",
            "shared/../..",
            "shared/..",
            "shared\\u0000x",
        ] {
            let body = format!("{VM}share = \"{bad}\"\nshare_user = \"alice\"\n");
            assert!(
                refusal(&body).contains("relative to the data root"),
                "{bad:?}: {}",
                refusal(&body)
            );
        }
        for own in [".coffre", ".coffre/logs", "disks", "disks/desktop.img"] {
            let body = format!("{VM}share = \"{own}\"\nshare_user = \"alice\"\n");
            assert!(refusal(&body).contains("never shared"), "{own}");
        }
        // Only the first part is the vault's: a user's own `disks` below
        // is theirs.
        parse(&format!(
            "{VM}share = \"shared/disks\"\nshare_user = \"alice\"\n"
        ))
        .check()
        .unwrap();
        parse(&format!(
            "{VM}share = \".coffree\"\nshare_user = \"alice\"\n"
        ))
        .check()
        .unwrap();
        for (body, want) in cases {
            let err = refusal(&body);
            assert!(err.contains(want), "{body}: {err}");
            assert!(err.starts_with("workload vm:"), "{body}: {err}");
        }
    }

    #[test]
    fn root_never_stands_behind_a_share() {
        for root in ["root", "0", "+0"] {
            let err = share_identity(root, None).unwrap_err().to_string();
            assert!(err.contains("never acts as root"), "{root}: {err}");
        }
        // Not through share_groups either.
        let err = share_identity("3999999998", Some(&[7, 0]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("group 0"), "{err}");
    }

    #[test]
    fn a_numeric_uid_without_an_account_is_its_own_group() {
        let id = share_identity("3999999998", None).unwrap();
        assert_eq!(
            id,
            ShareIdentity {
                uid: 3_999_999_998,
                gid: 3_999_999_998,
                groups: vec![3_999_999_998],
            }
        );
        let id = share_identity("3999999998", Some(&[5, 6])).unwrap();
        assert_eq!((id.gid, id.groups), (3_999_999_998, vec![5, 6]));
        let id = share_identity("3999999998", Some(&[])).unwrap();
        assert!(id.groups.is_empty(), "exactly the groups given: none");
    }

    #[test]
    fn a_host_account_is_found_by_name_or_by_uid() {
        let err = share_identity("no-such-user-coffre", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such user"), "{err}");
        let Some((uid, gid, groups)) = coffre_sys::child::user("nobody").unwrap() else {
            eprintln!("no `nobody` account here: skipped");
            return;
        };
        let by_name = share_identity("nobody", None).unwrap();
        assert_eq!(by_name, ShareIdentity { uid, gid, groups });
        // Its uid finds the same account, so the same primary group.
        assert_eq!(share_identity(&uid.to_string(), None).unwrap(), by_name);
        let id = share_identity("nobody", Some(&[4242])).unwrap();
        assert_eq!((id.uid, id.gid, id.groups), (uid, gid, vec![4242]));
    }
}

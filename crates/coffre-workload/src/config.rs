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
    /// QEMU: extra arguments (devices, network...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_args: Vec<String>,
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
        Ok(())
    }
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

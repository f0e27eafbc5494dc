//! What can go wrong with a workload, by what failed. Each variant carries
//! the sentence the audit log and `coffre status` show (its `Display` is
//! that sentence, unchanged).

/// Why a workload could not be declared, started, resumed or continued, or
/// why the host cannot run workloads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// `config.toml` declares a workload wrongly (a bad name, a missing
    /// command, a duplicate...).
    #[error("{0}")]
    Config(String),
    /// The user a workload, or every VM, runs as is missing or not allowed
    /// (VMs never run as root).
    #[error("{0}")]
    User(String),
    /// No cgroup freezer on this host (or no workloads to need one), or a
    /// workload's cgroup could not be made, cleared or thawed.
    #[error("{0}")]
    Cgroup(String),
    /// What a workload needs before it starts could not be prepared: its
    /// disks, its run directory, its kernel or initrd, its output pipe,
    /// its QMP socket path.
    #[error("{0}")]
    Setup(String),
    /// The process or QEMU could not be spawned, or QEMU exited before its
    /// QMP socket was up.
    #[error("{0}")]
    Spawn(String),
    /// QEMU's QMP socket did not come up in time.
    #[error("{0}")]
    Timeout(String),
    /// A QMP command failed, or there is no QMP connection.
    #[error("{0}")]
    Qmp(String),
    /// Resuming a VM from its state saved in the vault (an incoming
    /// migration) failed.
    #[error("{0}")]
    Migration(String),
}

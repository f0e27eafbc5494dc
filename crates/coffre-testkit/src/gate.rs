//! The one way to gate a system test.
//!
//! A test that needs more than a laptop's unprivileged user has is marked
//!
//! ```no_run
//! use coffre_testkit::{Need, require};
//!
//! #[test]
//! #[ignore = "system: needs root, FUSE, loop"]
//! fn the_mount_goes_away() {
//!     require(&[Need::Root, Need::Fuse, Need::Loop]);
//!     // ...
//! }
//! ```
//!
//! A plain `cargo test` lists it as ignored, with its reason. Run with
//! `--include-ignored` (`scripts/test` does, with `COFFRE_REQUIRE_ALL=1`),
//! [`require`] fails it when a prerequisite is missing, naming it: an
//! ignored test only runs when asked for, so a missing prerequisite is an
//! error, never a silent pass. With `COFFRE_REQUIRE_ALL=1`, the testkit's
//! own `prerequisites` test also checks every [`Need`] at once, so a run
//! of the whole suite on an incomplete machine says up front what is
//! missing.

use std::path::Path;

/// The variable `scripts/test` sets: every prerequisite must be present.
pub const REQUIRE_ALL: &str = "COFFRE_REQUIRE_ALL";

/// Something a system test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Need {
    /// Effective uid 0 (mounts, loop devices, cgroups, chown, fsuid).
    Root,
    /// `/dev/fuse`, openable.
    Fuse,
    /// `/dev/loop-control` and `losetup`.
    Loop,
    /// `mkfs.ext4` (e2fsprogs).
    Ext4,
    /// The `cryptsetup` binary (cryptsetup-bin), the LUKS2 oracle.
    Cryptsetup,
    /// `nbdinfo` and friends (libnbd-bin).
    Nbd,
    /// The `openvpn` binary.
    OpenVpn,
    /// Network namespaces: `ip` (iproute2), `unshare` and `nsenter`.
    NetNs,
    /// `qemu-system-x86_64` (qemu-system-x86).
    Qemu,
    /// A mounted cgroup v1 `freezer` controller.
    CgroupV1Freezer,
    /// Memory locking: `CAP_IPC_LOCK` or an `RLIMIT_MEMLOCK` of 64 KiB or
    /// more.
    Mlock,
    /// `chattr` (e2fsprogs).
    Chattr,
    /// The `nft` binary (nftables), and python3 for the network probes.
    Nft,
    /// libnfs's userspace NFS client tools (`nfs-cp`, `nfs-cat`,
    /// `nfs-ls`; libnfs-utils).
    NfsClient,
    /// OpenLDAP's command-line clients (`ldapsearch`, `ldapwhoami`;
    /// ldap-utils).
    LdapClient,
    /// nslcd and its NSS module (nslcd, libnss-ldapd), to resolve names
    /// from an LDAP server the way a workload does.
    Nslcd,
    /// OpenLDAP's server (`slapd`, `slapadd`; slapd) with its schemas and
    /// the mdb and ppolicy modules, started by tests on loopback as the
    /// organisation's directory.
    Slapd,
    /// NBD servers: nbdkit (with its memory and file plugins, error and
    /// delay filters) and qemu-nbd (qemu-utils), started by tests on unix
    /// sockets as the storage host.
    NbdServers,
    /// s3s-fs (crates.io, `cargo install s3s-fs --features binary`), a
    /// second S3 server, started by tests on loopback.
    S3sFs,
    /// moto's S3 application (PyPI `moto[server]`), started by tests on
    /// loopback as an S3 store; and curl, to create its buckets.
    Moto,
    /// RabbitMQ's server (rabbitmq-server, with its auth_mechanism_ssl
    /// plugin) and the `rabbitmq` user, started by tests from the
    /// configuration `coffre bus broker-config` writes.
    RabbitMq,
}

impl Need {
    /// Every need, for the up-front check.
    pub const ALL: &[Need] = &[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::Cryptsetup,
        Need::Nbd,
        Need::OpenVpn,
        Need::NetNs,
        Need::Qemu,
        Need::CgroupV1Freezer,
        Need::Mlock,
        Need::Chattr,
        Need::Nft,
        Need::NfsClient,
        Need::LdapClient,
        Need::Nslcd,
        Need::Slapd,
        Need::Moto,
        Need::NbdServers,
        Need::S3sFs,
        Need::RabbitMq,
    ];

    /// Whether the machine has it; if not, what is missing and how to get
    /// it.
    pub fn check(self) -> Result<(), String> {
        match self {
            Need::Root => {
                if effective_uid() == Some(0) {
                    Ok(())
                } else {
                    Err("root: run as root (or with sudo)".into())
                }
            }
            Need::Fuse => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .map(drop)
                .map_err(|e| {
                    format!(
                        "FUSE: cannot open /dev/fuse ({e}); install fuse3, load the fuse module"
                    )
                }),
            Need::Loop => {
                if !Path::new("/dev/loop-control").exists() {
                    Err("loop devices: no /dev/loop-control (load the loop module)".into())
                } else {
                    command("losetup", "mount")
                }
            }
            Need::Ext4 => command("mkfs.ext4", "e2fsprogs"),
            Need::Cryptsetup => command("cryptsetup", "cryptsetup-bin"),
            Need::Nbd => command("nbdinfo", "libnbd-bin"),
            Need::OpenVpn => command("openvpn", "openvpn"),
            Need::NetNs => command("ip", "iproute2")
                .and_then(|()| command("unshare", "util-linux"))
                .and_then(|()| command("nsenter", "util-linux")),
            Need::Qemu => command("qemu-system-x86_64", "qemu-system-x86"),
            Need::CgroupV1Freezer => {
                if has_v1_freezer() {
                    Ok(())
                } else {
                    Err("cgroup v1 freezer: no `freezer` controller in /proc/self/mounts (mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer)".into())
                }
            }
            Need::Mlock => {
                if may_lock_memory() {
                    Ok(())
                } else {
                    Err("memory locking: neither CAP_IPC_LOCK nor an RLIMIT_MEMLOCK of 64 KiB (ulimit -l)".into())
                }
            }
            Need::Chattr => command("chattr", "e2fsprogs"),
            Need::Nft => command("nft", "nftables").and_then(|()| command("python3", "python3")),
            Need::NfsClient => command("nfs-cp", "libnfs-utils"),
            Need::LdapClient => command("ldapsearch", "ldap-utils")
                .and_then(|()| command("ldapwhoami", "ldap-utils")),
            Need::Nslcd => command("nslcd", "nslcd").and_then(|()| {
                if [
                    "/lib/x86_64-linux-gnu/libnss_ldap.so.2",
                    "/usr/lib/x86_64-linux-gnu/libnss_ldap.so.2",
                ]
                .iter()
                .any(|p| Path::new(p).exists())
                {
                    Ok(())
                } else {
                    Err(
                        "nslcd's NSS module: no libnss_ldap.so.2 (apt-get install libnss-ldapd)"
                            .into(),
                    )
                }
            }),
            Need::Moto => {
                let found = std::process::Command::new(moto_python())
                    .args(["-c", "import moto.moto_server.werkzeug_app, werkzeug"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if found {
                    command("curl", "curl")
                } else {
                    Err(format!("moto: `{} -c 'import moto.moto_server.werkzeug_app'` fails: pip install 'moto[server]' (scripts/install-deps puts it in /opt/coffre-test-venv when the system pip refuses)", moto_python()))
                }
            }
            Need::S3sFs => {
                if Path::new(&s3s_fs()).exists() || command("s3s-fs", "").is_ok() {
                    Ok(())
                } else {
                    Err("s3s-fs: cargo install s3s-fs --version 0.14.1 --features binary (scripts/install-deps does)".into())
                }
            }
            Need::RabbitMq => {
                if Path::new(crate::rabbitmq::SERVER).exists() {
                    Ok(())
                } else {
                    Err(format!(
                        "RabbitMQ: no {} (apt-get install rabbitmq-server; scripts/install-deps does)",
                        crate::rabbitmq::SERVER
                    ))
                }
            }
            Need::NbdServers => {
                command("nbdkit", "nbdkit").and_then(|()| command("qemu-nbd", "qemu-utils"))
            }
            Need::Slapd => command("slapd", "slapd")
                .and_then(|()| command("slapadd", "slapd"))
                .and_then(|()| {
                    let missing: Vec<&str> = [
                        "/etc/ldap/schema/core.schema",
                        "/etc/ldap/schema/cosine.schema",
                        "/etc/ldap/schema/nis.schema",
                        "/etc/ldap/schema/inetorgperson.schema",
                    ]
                    .into_iter()
                    .filter(|p| !Path::new(p).exists())
                    .collect();
                    if !missing.is_empty() {
                        return Err(format!(
                            "slapd's schemas: missing {} (apt-get install slapd)",
                            missing.join(", ")
                        ));
                    }
                    let module = |name: &str| {
                        ["/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap"]
                            .iter()
                            .any(|d| Path::new(d).join(name).exists())
                    };
                    if module("back_mdb.so") && module("ppolicy.so") {
                        Ok(())
                    } else {
                        Err("slapd's modules: no back_mdb.so and ppolicy.so in /usr/lib/ldap (apt-get install slapd)".into())
                    }
                }),
        }
    }
}

/// The needs in `needs` this machine lacks, with why.
pub fn missing(needs: &[Need]) -> Vec<(Need, String)> {
    needs
        .iter()
        .filter_map(|&n| n.check().err().map(|why| (n, why)))
        .collect()
}

/// Fails the calling test, naming each missing prerequisite, unless the
/// machine has all of `needs`. Call it first in every test marked
/// `#[ignore = "system: ..."]`: such a test only runs when asked for, so
/// it fails rather than skips.
#[track_caller]
pub fn require(needs: &[Need]) {
    let missing = missing(needs);
    if missing.is_empty() {
        return;
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(_, why)| format!("  - {why}"))
        .collect();
    panic!(
        "system test: missing prerequisite{}:\n{}\n(a plain `cargo test` ignores system tests; run them as root on a machine set up by scripts/install-deps, as scripts/test does)",
        if missing.len() == 1 { "" } else { "s" },
        list.join("\n")
    );
}

/// Whether `COFFRE_REQUIRE_ALL` asks for every prerequisite.
pub fn require_all() -> bool {
    std::env::var_os(REQUIRE_ALL).is_some_and(|v| !v.is_empty() && v != "0")
}

/// `name` on `PATH`, as `Command::new(name)` would find it.
fn command(name: &str, package: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if found {
        Ok(())
    } else {
        Err(format!("`{name}` is not on PATH (install {package})"))
    }
}

fn status_field(name: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
}

fn effective_uid() -> Option<u32> {
    status_field("Uid:")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn has_v1_freezer() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            l.split(' ')
                .nth(3)
                .is_some_and(|o| o.split(',').any(|x| x == "freezer"))
        })
    })
}

fn may_lock_memory() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let cap = status_field("CapEff:")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    let limit = std::fs::read_to_string("/proc/self/limits").is_ok_and(|l| {
        l.lines()
            .find(|l| l.starts_with("Max locked memory"))
            .and_then(|l| l.split_whitespace().nth(3))
            .is_some_and(|soft| {
                soft == "unlimited" || soft.parse::<u64>().is_ok_and(|b| b >= 64 << 10)
            })
    });
    cap || limit
}

/// s3s-fs: in cargo's bin directory if it is not on PATH.
pub fn s3s_fs() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo = format!("{home}/.cargo/bin/s3s-fs");
    if Path::new(&cargo).exists() {
        cargo
    } else {
        "s3s-fs".into()
    }
}

/// The Python that has moto: the virtualenv scripts/install-deps made, or
/// the `python3` on PATH.
pub fn moto_python() -> String {
    let venv = "/opt/coffre-test-venv/bin/python3";
    if Path::new(venv).exists() {
        venv.into()
    } else {
        "python3".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this machine has for the system tests; with
    /// `COFFRE_REQUIRE_ALL=1` (as `scripts/test` runs), every prerequisite
    /// must be there, so an incomplete machine fails here first, with the
    /// whole list.
    #[test]
    fn prerequisites() {
        for n in Need::ALL {
            eprintln!(
                "{n:?}: {}",
                n.check().err().unwrap_or_else(|| "present".into())
            );
        }
        if require_all() {
            require(Need::ALL);
        }
    }

    #[test]
    fn commands_are_found_on_path_only() {
        assert!(command("sh", "dash").is_ok());
        let e = command("coffre-no-such-command", "nothing").unwrap_err();
        assert!(e.contains("coffre-no-such-command"), "{e}");
    }
}

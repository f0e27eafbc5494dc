//! The VMs' shares over NFS, end to end: the real daemon with its NFS
//! server, QEMU guests under TCG whose Linux NFSv3 client mounts the
//! share, a process workload reading the same files through the cut
//! layer, across fast and safe closes and a daemon restart.

use crate::harness::*;
use crate::network::{Lab, vm};
use std::path::Path;
use std::time::{Duration, Instant};

/// The numbers in `NAME.log` (lines `NAME N`): they must be 1, 2, 3...
/// with no gap and no repeat.
fn numbers(path: &Path, name: &str) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let n = l
                .strip_prefix(&format!("{name} "))
                .unwrap_or_else(|| panic!("{path:?}: a stray line {l:?}"));
            n.parse().unwrap_or_else(|_| panic!("{path:?}: {l:?}"))
        })
        .collect()
}

fn assert_contiguous(path: &Path, name: &str) -> u64 {
    let n = numbers(path, name);
    let want: Vec<u64> = (1..=n.len() as u64).collect();
    assert_eq!(n, want, "{path:?}: a gap or a repeat");
    n.len() as u64
}

impl Lab {
    /// The highest N a VM reported writing durably.
    fn wrote(&self, name: &str) -> u64 {
        self.console(name)
            .lines()
            .filter_map(|l| l.strip_prefix("nfs wrote ")?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn wait_wrote(&self, name: &str, n: u64, within: Duration) {
        let until = Instant::now() + within;
        while self.wrote(name) < n {
            assert!(
                Instant::now() < until,
                "{name} never wrote line {n}:\n{}\ndaemon:\n{}",
                self.console(name),
                self.gw.vault.daemon_stderr()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn shared(&self, file: &str) -> std::path::PathBuf {
        self.gw.vault.layout().mountpoint.join("shared").join(file)
    }
}

/// A VM of `member` that mounts `shared` over NFS as `member` and appends
/// numbered lines to `shared/NAME.log`.
fn share_vm(name: &str, member: &str, last: u8) -> String {
    vm(
        name,
        member,
        last,
        &format!("coffre.nfs=10.9.0.1 coffre.nfsappend={name}"),
        &format!("share = \"shared\"\nshare_user = \"{member}\""),
    )
}

/// A process workload of the team reading both VMs' files.
const READER: &str = r#"
[[workload]]
name = "reader"
kind = "process"
user = "5003"
groups = [4242]
cwd = "shared"
command = ["/bin/sh", "-c", "while :; do echo \"reader $(cat nfs-a.log 2>/dev/null | wc -l) $(cat nfs-b.log 2>/dev/null | wc -l)\"; sleep 1; done"]
"#;

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces, nft, QEMU"]
fn vms_share_files_over_nfs_across_fast_and_safe_closes_and_a_restart() {
    require(&[Need::Qemu]);
    let workloads = format!(
        "{}{}{READER}",
        share_vm("nfs-a", "alice", 10),
        share_vm("nfs-b", "bob", 20)
    );
    let mut lab = Lab::with_setup(r#"subnet = "10.9.0.0/24""#, &workloads, "640M", |v| {
        v.set_data(4242, 2, &[("alice", 5001, 5001), ("bob", 5002, 5002)]);
    });
    let mut alice = lab.gw.connect("alice", 0);
    lab.wait_console("nfs-a", "nfs up", Duration::from_secs(120));
    lab.wait_console("nfs-b", "nfs up", Duration::from_secs(60));
    lab.wait_wrote("nfs-a", 5, Duration::from_secs(60));
    lab.wait_wrote("nfs-b", 5, Duration::from_secs(60));
    // Files the VMs make are their share user's, in the team's group.
    let a = std::fs::metadata(lab.shared("nfs-a.log")).unwrap();
    let b = std::fs::metadata(lab.shared("nfs-b.log")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((a.uid(), a.gid()), (5001, 4242));
    assert_eq!((b.uid(), b.gid()), (5002, 4242));
    // The process workload reads what the VMs write.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let log = lab.console("reader");
        let seen = log
            .lines()
            .filter_map(|l| l.strip_prefix("reader "))
            .any(|l| {
                let n: Vec<u64> = l.split(' ').filter_map(|x| x.parse().ok()).collect();
                n.len() == 2 && n[0] >= 3 && n[1] >= 3
            });
        if seen {
            break;
        }
        assert!(Instant::now() < until, "the reader saw nothing:\n{log}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = lab.gw.vault.status("alice");
    assert_eq!(st["nfs"]["configured"], true, "{st}");
    let server = u32::try_from(st["nfs"]["pid"].as_u64().expect("the NFS server runs")).unwrap();

    // Fast close: the VMs pause, the server lets go, the key goes, from
    // the NFS server's memory too.
    let key = crate::harness::volume_key(&lab.gw.vault);
    let handle_key = coffre_nfs::HandleKey::derive(&key).to_hex();
    let raw_handle_key: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&handle_key[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(
        memory_contains(server, &raw_handle_key),
        "the scan must find the handle key while open, or it proves nothing"
    );
    alice.stop();
    lab.gw.vault.wait_state("closed", Duration::from_secs(60));
    assert!(
        !memory_contains(server, &raw_handle_key),
        "handle key kept while closed"
    );
    assert!(
        !memory_contains(server, &key),
        "volume key in the NFS server"
    );
    let before = (lab.wrote("nfs-a"), lab.wrote("nfs-b"));
    std::thread::sleep(Duration::from_secs(3));
    let mut alice = lab.gw.connect("alice", 0);
    lab.wait_wrote("nfs-a", before.0 + 5, Duration::from_secs(60));
    lab.wait_wrote("nfs-b", before.1 + 5, Duration::from_secs(60));

    // Safe close: the VMs are suspended into the vault, the daemon
    // restarts, the VMs come back with -incoming and carry on.
    ok(&lab.gw.vault.authed("alice", &["mode", "safe"]));
    alice.stop();
    lab.gw.vault.wait_state("closed", Duration::from_secs(90));
    lab.gw.vault.stop();
    lab.gw.vault.start();
    let mut alice = lab.gw.connect("alice", 0);
    let at = (lab.wrote("nfs-a"), lab.wrote("nfs-b"));
    lab.wait_wrote("nfs-a", at.0 + 5, Duration::from_secs(90));
    lab.wait_wrote("nfs-b", at.1 + 5, Duration::from_secs(90));
    for name in ["nfs-a", "nfs-b"] {
        let c = lab.console(name);
        assert_eq!(c.matches("nfs up").count(), 1, "{name} booted twice:\n{c}");
        assert!(!c.contains("nfs error"), "{name} saw an error:\n{c}");
        assert!(!c.to_lowercase().contains("stale"), "{name}:\n{c}");
        let n = assert_contiguous(&lab.shared(&format!("{name}.log")), name);
        assert!(
            n >= lab.wrote(name),
            "{name}: the file lost lines it reported durable"
        );
    }

    // Bob is removed: his VM's share refuses everything at once; his
    // guest's appends fail (it sees errors, never data).
    ok(&lab.gw.vault.authed("alice", &["member", "remove", "bob"]));
    let last = lab.wrote("nfs-b");
    lab.wait_console(
        "nfs-b",
        &format!("nfs error {}", last + 1),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.wrote("nfs-b"), last, "bob's VM wrote after his removal");
    assert_contiguous(&lab.shared("nfs-b.log"), "nfs-b");
    alice.stop();
}

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

/// A VM of `member` that mounts `shared` over NFS as `member`, appends
/// numbered lines to `shared/NAME.log` and reads what the process
/// workload wrote.
/// The NFS server: the one child of the broker (the process the daemon
/// started), once it has forked it.
fn nfs_server_of(broker: u32) -> u32 {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{broker}/task/{broker}/children"))
            .unwrap_or_default();
        let pids: Vec<u32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if let [one] = pids[..] {
            return one;
        }
        assert!(
            Instant::now() < until,
            "the broker {broker} has children {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn share_vm(name: &str, member: &str, last: u8, extra: &str) -> String {
    vm(
        name,
        member,
        last,
        &format!("coffre.nfs=10.9.0.1 coffre.nfsappend={name} coffre.nfsread=from-reader.txt"),
        &format!("share = \"shared\"\nshare_user = \"{member}\"{extra}"),
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
command = ["/bin/sh", "-c", "echo reader-was-here > from-reader.txt; while :; do echo \"reader $(cat nfs-a.log 2>/dev/null | wc -l) $(cat nfs-b.log 2>/dev/null | wc -l)\"; sleep 1; done"]
"#;

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, OpenVPN, network namespaces, nft, QEMU"]
fn vms_share_files_over_nfs_across_fast_and_safe_closes_and_a_restart() {
    require(&[Need::Qemu]);
    let workloads = format!(
        "{}{}{READER}",
        share_vm("nfs-a", "alice", 10, ""),
        // Bob's VM does without the sync of each change (share_async).
        share_vm("nfs-b", "bob", 20, "\nshare_async = true")
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
    // FIFOs too (MKNOD, RENAME, LINK through the confined, filtered
    // server): the share's user's, linked twice.
    for (name, uid) in [("nfs-a", 5001), ("nfs-b", 5002)] {
        lab.wait_console(name, "nfs fifo ok", Duration::from_secs(30));
        let f = std::fs::symlink_metadata(lab.shared(&format!("{name}.fifo-linked"))).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(f.file_type().is_fifo(), "{name}: {:?}", f.file_type());
        assert_eq!((f.uid(), f.gid(), f.nlink()), (uid, 4242, 2), "{name}");
        assert!(!lab.shared(&format!("{name}.fifo")).exists(), "{name}");
        // A file made 0444 and written through the descriptor that made
        // it (git's objects): written, and still 0444.
        lab.wait_console(name, "nfs ro ok", Duration::from_secs(30));
        let ro = lab.shared(&format!("{name}.ro"));
        assert_eq!(std::fs::read_to_string(&ro).unwrap(), "ro written\n");
        let m = std::fs::metadata(&ro).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (uid, 0o444), "{name}");
    }
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
    // And the VMs read what the process workload wrote.
    lab.wait_console(
        "nfs-a",
        "nfs read ok reader-was-here",
        Duration::from_secs(30),
    );
    lab.wait_console(
        "nfs-b",
        "nfs read ok reader-was-here",
        Duration::from_secs(30),
    );
    let st = lab.gw.vault.status("alice");
    assert_eq!(st["nfs"]["configured"], true, "{st}");
    let text = String::from_utf8_lossy(&ok(&lab.gw.vault.cli("alice", &["status"]))).into_owned();
    assert!(
        text.contains("nfs-a (10.9.0.10) mounts shared as uid 5001"),
        "{text}"
    );
    assert!(
        !text.contains("nfs-a (10.9.0.10) mounts shared as uid 5001, async"),
        "{text}"
    );
    assert!(
        text.contains("nfs-b (10.9.0.20) mounts shared as uid 5002, async"),
        "{text}"
    );
    let exports = st["nfs"]["exports"].as_array().unwrap();
    let async_of = |w: &str| exports.iter().find(|e| e["workload"] == w).unwrap()["async"].clone();
    assert_eq!(
        (async_of("nfs-a"), async_of("nfs-b")),
        (false.into(), true.into()),
        "{st}"
    );
    assert_eq!(
        text.matches(", confined (Landlock), seccomp filter)")
            .count(),
        2,
        "a server per VM, each confined and filtered: {text}"
    );
    assert!(
        text.contains("nfs-a (10.9.0.10) mounts shared as uid 5001 (its server: pid "),
        "{text}"
    );
    // A server per VM (each export says its own broker's pid).
    let pid_of = |st: &serde_json::Value, vm: &str| {
        st["nfs"]["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["workload"] == vm)
            .and_then(|e| e["pid"].as_u64())
            .map(|p| u32::try_from(p).unwrap())
    };
    let first = pid_of(&st, "nfs-a").expect("nfs-a's NFS server runs");
    let bobs = pid_of(&st, "nfs-b").expect("nfs-b's NFS server runs");
    assert_ne!(first, bobs, "one server for both VMs");
    // Each server serves its VM's share through its own mount of it, the
    // only thing in the directory it is confined beneath (Landlock: fully
    // on a kernel of 6.12 or later, as here and in CI), which is
    // read-only; it runs as a user of its own (not root, not nobody, not
    // the other VM's server's), as its handle broker does (below).
    // Bob joined with numbers from an older vault after the servers
    // started: his VM's server (alone) was started again, allowed them.
    let restarts = |vm: &str| {
        lab.gw
            .vault
            .audit_details("nfs", "ok")
            .iter()
            .filter(|d| {
                d.contains(&format!("NFS server for {vm} started again"))
                    && d.contains("to act as its share's user")
            })
            .count()
    };
    assert_eq!(
        (restarts("nfs-a"), restarts("nfs-b")),
        (0, 1),
        "{:?}",
        lab.gw.vault.audit_details("nfs", "ok")
    );
    // Whom a server's filter lets it act as (the daemon's arguments to it).
    let acts_uids = |pid: u32| {
        let args: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        args[args.iter().position(|a| a == "--acts-uids").unwrap() + 1].clone()
    };
    let nfs_dir = lab.gw.vault.dir.join("run/nfs");
    let view = nfs_dir.join("nfs-a/share");
    assert_eq!(st["nfs"]["stats"]["confined"], true, "{st}");
    assert_eq!(st["nfs"]["stats"]["filtered"], true, "{st}");
    for (vm, uid, other) in [("nfs-a", 5001, 5002), ("nfs-b", 5002, 5001)] {
        let log =
            std::fs::read_to_string(lab.gw.vault.dir.join(format!("run/nfs-{vm}.log"))).unwrap();
        assert!(
            log.contains(&format!(
                "confined beneath {} (fully by Landlock)",
                nfs_dir.join(vm).display()
            )),
            "{log}"
        );
        assert!(log.contains("seccomp filter on ("), "{log}");
        assert!(
            log.contains("coffre nfs-broker: seccomp filter on ("),
            "{log}"
        );
        // Its filter lets it act as its own share's user, not the other
        // VM's (nor any other member's).
        let uids = acts_uids(pid_of(&st, vm).unwrap());
        let ids: Vec<&str> = uids.split(',').collect();
        assert!(ids.contains(&uid.to_string().as_str()), "{vm}: {uids}");
        assert!(!uids.contains(&other.to_string()), "{vm}: {uids}");
        assert!(!uids.contains('-'), "{vm} may act as a range: {uids}");
        // Its groups are its share user's, for its life (its filter
        // refuses setgroups): the team's and the member's own, not the
        // other member's.
        let server = nfs_server_of(pid_of(&st, vm).unwrap());
        let groups_of = |status: &std::path::Path| {
            std::fs::read_to_string(status)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("Groups:").map(|g| g.trim().to_string()))
                .unwrap()
        };
        let main = groups_of(std::path::Path::new(&format!("/proc/{server}/status")));
        let groups: Vec<&str> = main.split_whitespace().collect();
        assert!(
            groups.contains(&"4242") && groups.contains(&uid.to_string().as_str()),
            "{vm}: {groups:?}"
        );
        assert!(
            !groups.contains(&other.to_string().as_str()),
            "{vm}: {groups:?}"
        );
        // As the daemon gave them (`--groups`), and on every thread of it,
        // its workers too.
        let args = std::fs::read(format!("/proc/{}/cmdline", pid_of(&st, vm).unwrap())).unwrap();
        let args: Vec<&[u8]> = args.split(|b| *b == 0).collect();
        let given = args[args
            .iter()
            .position(|a| *a == b"--groups")
            .expect("--groups")
            + 1];
        assert_eq!(String::from_utf8_lossy(given), groups.join(","), "{vm}");
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{server}/task"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(tasks.len() > 2, "{vm}: {tasks:?}");
        for t in tasks {
            assert_eq!(groups_of(&t.join("status")), main, "{vm}: {t:?}");
        }
    }
    // Two processes: the broker (the daemon's child, which alone opens
    // files by handle) and the server it forks (which parses guests'
    // bytes and acts as the shares' users).
    let field = |pid: u32, name: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let nfs_server = nfs_server_of(first);
    let own_uid = |pid: u32| own_user_and_limits(pid, &coffre_nfs::control::LIMITS);
    let a_uid = own_uid(first);
    let b_uid = own_uid(bobs);
    assert_ne!(a_uid, b_uid, "two VMs' servers share a user");
    for pid in [first, nfs_server, bobs, nfs_server_of(bobs)] {
        let uid = own_uid(pid);
        assert!(uid == a_uid || uid == b_uid, "{pid}: {uid}");
        assert_eq!(field(pid, "Seccomp:"), "2", "{pid}");
        assert_eq!(field(pid, "NoNewPrivs:"), "1", "{pid}");
    }
    // The server's own user is in what it may act as, besides its share
    // user: never the other server's.
    assert!(acts_uids(first).split(',').any(|u| u == a_uid.to_string()));
    assert!(!acts_uids(first).contains(&b_uid.to_string()));
    // The broker: CAP_DAC_READ_SEARCH alone; the server: CAP_SETUID and
    // CAP_SETGID, and no way to open by handle.
    assert_eq!(field(first, "CapEff:"), "0000000000000004");
    assert_eq!(field(nfs_server, "CapEff:"), "00000000000000c0");
    assert_eq!(field(nfs_server, "CapBnd:"), "00000000000000c0");
    let mounted = coffre_data::system::mount_at(&view).expect("the share is mounted for it");
    assert!(mounted.source.starts_with("/dev/loop"), "{mounted:?}");
    let dir_mount = coffre_data::system::mount_at(&nfs_dir).expect("its directory is mounted");
    assert!(
        dir_mount.has_option("ro") && dir_mount.fstype == "tmpfs",
        "{dir_mount:?}"
    );
    let entries: Vec<_> = std::fs::read_dir(&nfs_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut entries = entries;
    entries.sort();
    assert_eq!(entries, ["nfs-a", "nfs-b"], "a directory per VM");
    for vm in ["nfs-a", "nfs-b"] {
        let inside: Vec<_> = std::fs::read_dir(nfs_dir.join(vm))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            inside,
            ["share"],
            "{vm}'s directory holds its share's mount alone"
        );
        assert!(coffre_data::system::mount_at(&nfs_dir.join(vm).join("share")).is_some());
    }
    // Killed while open, it is started again and serves on, and the
    // team's data keeps its modes.
    let before = (lab.wrote("nfs-a"), lab.wrote("nfs-b"));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let restarted = |before: u32| {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let st = lab.gw.vault.status("alice");
            let open = st["nfs"]["exports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["workload"] == "nfs-a" && e["stats"]["open"] == true);
            if let Some(pid) = pid_of(&st, "nfs-a").filter(|p| *p != before)
                && open
            {
                break pid;
            }
            assert!(
                Instant::now() < until,
                "the NFS server was not started again: {st}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let again = restarted(first);
    // The server (the broker's child) killed: the broker goes with it,
    // and the daemon starts both again.
    let child = nfs_server_of(again);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &child.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let server = restarted(again);
    assert_ne!(nfs_server_of(server), child);
    lab.wait_wrote("nfs-a", before.0 + 3, Duration::from_secs(60));
    lab.wait_wrote("nfs-b", before.1 + 3, Duration::from_secs(60));
    // Bob's VM's server lived through all that: nothing of alice's VM's
    // server is his.
    assert_eq!(
        pid_of(&lab.gw.vault.status("alice"), "nfs-b"),
        Some(bobs),
        "nfs-b's server restarted with nfs-a's"
    );
    {
        use std::os::unix::fs::MetadataExt;
        let data = std::fs::metadata(lab.gw.vault.dir.join("data")).unwrap();
        assert_eq!(
            data.mode() & 0o7777,
            0o3770,
            "the data's modes after a restart"
        );
        let shared = std::fs::metadata(lab.gw.vault.dir.join("data/shared")).unwrap();
        assert_eq!(
            shared.mode() & 0o7777,
            0o2770,
            "the share's modes after a restart"
        );
    }
    assert!(coffre_data::system::mount_at(&view).is_some());

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
    assert!(
        memory_contains(bobs, &raw_handle_key),
        "nfs-b's server has no handle key while open"
    );
    assert!(
        !memory_contains(nfs_server_of(server), &raw_handle_key),
        "the NFS server (not the broker) holds the handle key"
    );
    alice.stop();
    lab.gw.vault.wait_state("closed", Duration::from_secs(60));
    assert!(
        coffre_data::system::mount_at(&view).is_none(),
        "the server's view outlived the close"
    );
    assert!(
        !memory_contains(server, &raw_handle_key),
        "handle key kept while closed"
    );
    assert!(
        !memory_contains(bobs, &raw_handle_key),
        "handle key kept by nfs-b's server while closed"
    );
    assert!(
        !memory_contains(server, &key),
        "volume key in the NFS server"
    );
    // Nor the daemon, which derived it and handed it to each broker (on
    // threads whose stacks glibc keeps for the next ones).
    assert!(
        !memory_contains(lab.gw.vault.pid(), &raw_handle_key),
        "handle key kept by the daemon while closed"
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

    // Bob is made a superuser: his groups gain the superusers', so nfs-b's
    // server starts again with them (its filter refuses setgroups: a
    // change of groups alone needs a new server), allowed the same users;
    // nfs-a's keeps its pid, and bob's guest carries on.
    let groups_given = |broker: u32| {
        let args = std::fs::read(format!("/proc/{broker}/cmdline")).unwrap();
        let args: Vec<String> = args
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let at = args.iter().position(|a| a == "--groups").expect("--groups");
        let mut g: Vec<String> = args[at + 1].split(',').map(str::to_string).collect();
        g.sort();
        g
    };
    let st = lab.gw.vault.status("alice");
    let (alices, bobs) = (pid_of(&st, "nfs-a").unwrap(), pid_of(&st, "nfs-b").unwrap());
    let (bobs_groups, bobs_acts) = (groups_given(bobs), acts_uids(bobs));
    ok(&lab
        .gw
        .vault
        .authed("alice", &["member", "role", "bob", "superuser"]));
    let until = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        let now = pid_of(&lab.gw.vault.status("alice"), "nfs-b");
        if let Some(p) = now.filter(|p| *p != bobs) {
            break p;
        }
        assert!(
            Instant::now() < until,
            "nfs-b's server kept bob's old groups"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // `_superusers`, and nfs-a's workload group (every workload admits
    // the superusers): two more, none lost.
    let more = groups_given(promoted);
    assert_eq!(
        more.len(),
        bobs_groups.len() + 2,
        "{bobs_groups:?} -> {more:?}"
    );
    assert!(bobs_groups.iter().all(|g| more.contains(g)), "{more:?}");
    assert_eq!(acts_uids(promoted), bobs_acts, "the same users");
    assert_eq!(
        pid_of(&lab.gw.vault.status("alice"), "nfs-a"),
        Some(alices),
        "nfs-a's server was started again for bob's role"
    );
    let w = lab.wrote("nfs-b");
    lab.wait_wrote("nfs-b", w + 3, Duration::from_secs(60));
    // And back: made a member again, his server starts again with his
    // groups as they were (none kept of the superusers').
    ok(&lab
        .gw
        .vault
        .authed("alice", &["member", "role", "bob", "member"]));
    let until = Instant::now() + Duration::from_secs(30);
    let demoted = loop {
        let now = pid_of(&lab.gw.vault.status("alice"), "nfs-b");
        if let Some(p) = now.filter(|p| *p != promoted) {
            break p;
        }
        assert!(
            Instant::now() < until,
            "nfs-b's server kept the superusers' groups"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(groups_given(demoted), bobs_groups);
    let w = lab.wrote("nfs-b");
    lab.wait_wrote("nfs-b", w + 3, Duration::from_secs(60));

    // Bob is removed: his VM's share refuses everything at once; his
    // guest's appends fail (it sees errors, never data).
    let bobs = pid_of(&lab.gw.vault.status("alice"), "nfs-b").expect("nfs-b's server runs");
    assert!(acts_uids(bobs).contains("5002"), "{}", acts_uids(bobs));
    ok(&lab.gw.vault.authed("alice", &["member", "remove", "bob"]));
    let last = lab.wrote("nfs-b");
    lab.wait_console(
        "nfs-b",
        &format!("nfs error {}", last + 1),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.wrote("nfs-b"), last, "bob's VM wrote after his removal");
    // Its server was started again, no longer allowed to act as bob.
    let now = pid_of(&lab.gw.vault.status("alice"), "nfs-b").expect("nfs-b's server runs");
    assert_ne!(now, bobs, "nfs-b's server kept the filter that allows bob");
    assert_eq!(
        acts_uids(now),
        b_uid.to_string(),
        "nfs-b's server may still act as bob (or lost its own user)"
    );
    let groups = std::fs::read_to_string(format!("/proc/{}/status", nfs_server_of(now))).unwrap();
    assert!(
        groups.lines().any(|l| l.trim_end() == "Groups:"),
        "nfs-b's server kept bob's groups: {groups}"
    );
    assert_contiguous(&lab.shared("nfs-b.log"), "nfs-b");
    // A daemon stopped while open: the NFS server lets go of the data
    // first, and is not killed as one of its holders.
    lab.gw.vault.stop();
    // For the record (not a pass/fail figure): the server's part of each
    // close, with the guests' clients connected.
    for d in lab.gw.vault.audit_details("nfs", "ok") {
        eprintln!("nfs: {d}");
    }
    let killed = lab.gw.vault.audit_details("close", "killed");
    assert!(killed.is_empty(), "{killed:?}");
    alice.stop();
}

/// A raw NFSv3 client for the benchmark's metadata work (the host has no
/// kernel NFS client): one TCP connection, one call at a time.
struct Raw {
    s: std::net::TcpStream,
    xid: u32,
}

impl Raw {
    fn call(&mut self, prog: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        use std::io::Write;
        self.xid += 1;
        let rec = coffre_nfs::rpc::call_record(self.xid, prog, 3, proc_, args);
        self.s.write_all(&rec).unwrap();
        let mut rec = Vec::new();
        assert!(coffre_nfs::rpc::read_record(&mut self.s, &mut rec, 4 << 20).unwrap());
        coffre_nfs::rpc::reply_results(&rec)
            .expect("an accepted call")
            .1
            .to_vec()
    }

    /// A call that must succeed; returns the new object's handle for the
    /// creating calls.
    fn ok(&mut self, proc_: u32, args: &coffre_nfs::xdr::Writer) -> Option<Vec<u8>> {
        let res = self.call(100_003, proc_, &args.buf);
        let mut r = coffre_nfs::xdr::Reader::new(&res);
        assert_eq!(r.u32().unwrap(), 0, "NFS procedure {proc_} failed");
        if matches!(proc_, 8 | 9) && r.bool().unwrap() {
            return Some(r.opaque(64).unwrap().to_vec());
        }
        None
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Makes the benchmark's tree (50 directories of 100 files of 1 KiB)
/// under `root` as `top`: MKDIR, CREATE, WRITE (unstable) and, when
/// `commit`, a COMMIT per file as the Linux client does at each close.
fn nfs_tree(c: &mut Raw, root: &[u8], top: &str, commit: bool) -> f64 {
    use coffre_nfs::xdr::Writer;
    let t = Instant::now();
    let mut mk = Writer::default();
    mk.opaque(root).opaque(top.as_bytes()).bool(true).u32(0o755);
    mk.bool(false).bool(false).bool(false).u32(0).u32(0);
    let top = c.ok(9, &mk).unwrap();
    for d in 0..50u64 {
        let mut mk = Writer::default();
        mk.opaque(&top)
            .opaque(format!("src-{d:02}").as_bytes())
            .bool(true)
            .u32(0o755);
        mk.bool(false).bool(false).bool(false).u32(0).u32(0);
        let dir = c.ok(9, &mk).unwrap();
        for f in 0..100u64 {
            let mut cr = Writer::default();
            cr.opaque(&dir)
                .opaque(format!("file-{f:03}.rs").as_bytes())
                .u32(0);
            cr.bool(true)
                .u32(0o644)
                .bool(false)
                .bool(false)
                .bool(false)
                .u32(0)
                .u32(0);
            let fh = c.ok(8, &cr).unwrap();
            let body = coffre_testkit::volume::pattern(1024, d * 100 + f);
            let mut wr = Writer::default();
            wr.opaque(&fh).u64(0).u32(1024).u32(0).opaque(&body);
            c.ok(7, &wr);
            if commit {
                let mut cm = Writer::default();
                cm.opaque(&fh).u64(0).u32(0);
                c.ok(21, &cm);
            }
        }
    }
    secs(t)
}

/// `scripts/bench-nfs`: a 512 MiB file written and read over NFS (libnfs's
/// nfs-cp on loopback, against the vault's NFS server code serving the
/// vault's mounted data) against `dd` and `cat` on the mount itself, same
/// run; 5,000 small files made over NFS (MKDIR, CREATE, WRITE, COMMIT,
/// one call at a time) against `tar -x` of the same tree onto the mount;
/// and the server's part of a close while a client reads.
#[test]
#[ignore = "survey: NFS throughput against the mount (scripts/bench-nfs)"]
fn survey_nfs_throughput_against_the_mount() {
    use coffre_nfs::xdr::Writer;
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::NfsClient,
    ]);
    let mib: u64 = std::env::var("COFFRE_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let mut v = Vault::init(&["--size", &format!("{}M", mib * 3 + 256)]);
    v.set_data(4242, 1, &[("alice", 5001, 5001)]);
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    v.wait_state("open", Duration::from_secs(60));
    let shared = v.layout().mountpoint.join("shared");
    let server = std::sync::Arc::new(coffre_nfs::Server::new());
    let sockets = coffre_nfs::Sockets::bind(&coffre_nfs::Listen {
        addr: std::net::Ipv4Addr::LOCALHOST,
        nfs_port: 0,
        portmap_port: None,
        udp_mark: None,
        device: None,
    })
    .unwrap();
    let port = sockets.nfs_port();
    {
        let s = std::sync::Arc::clone(&server);
        std::thread::spawn(move || s.serve(sockets, 8));
    }
    let spec = |async_metadata: bool| coffre_nfs::ExportSpec {
        workload: "bench".into(),
        client: std::net::Ipv4Addr::LOCALHOST,
        share: "shared".into(),
        path: shared.clone(),
        uid: 5001,
        gid: 5001,
        groups: vec![5001, 4242],
        readonly: false,
        denied: false,
        mounted: false,
        async_metadata,
    };
    server.set_exports(vec![spec(false)]);
    // Its handles from a broker, over the broker's protocol, as in the
    // service (on a thread here).
    let (keeper, failed) =
        coffre_nfs::Keeper::open(coffre_nfs::HandleKey::new([1; 32]), &[spec(false)]);
    assert!(failed.is_empty(), "{failed:?}");
    let broker = std::sync::Arc::new(coffre_nfs::broker::on_a_thread(keeper).unwrap());
    assert!(server.open(broker).is_empty());
    let url = |p: &str| {
        format!(
            "nfs://127.0.0.1/{p}?version=3&nfsport={port}&mountport={port}&auto-traverse-mounts=0"
        )
    };
    let tmp = v.tmp.path().to_path_buf();
    let src = tmp.join("src.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        let chunk = coffre_testkit::volume::pattern(1 << 20, 7);
        for _ in 0..mib {
            f.write_all(&chunk).unwrap();
        }
    }
    let run = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Writes: dd with fsync at the end, against nfs-cp (UNSTABLE writes
    // and a COMMIT).
    let t = Instant::now();
    run(std::process::Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", shared.join("base.bin").display()))
        .args(["bs=1M", "conv=fsync", "status=none"]));
    let dd_write = secs(t);
    let t = Instant::now();
    run(std::process::Command::new("nfs-cp")
        .arg(&src)
        .arg(url("nfs.bin")));
    let nfs_write = secs(t);
    // Reads of the same file (warm in the mount's page cache for both).
    let t = Instant::now();
    run(std::process::Command::new("sh").arg("-c").arg(format!(
        "cat {} > /dev/null",
        shared.join("nfs.bin").display()
    )));
    let cat_read = secs(t);
    let t = Instant::now();
    run(std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("nfs-cat '{}' > /dev/null", url("nfs.bin"))));
    let nfs_read = secs(t);

    // Metadata: a tree of 50 directories of 100 files of 1 KiB.
    let tree = tmp.join("tree");
    for d in 0..50 {
        let dir = tree.join(format!("src-{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("file-{f:03}.rs")),
                coffre_testkit::volume::pattern(1024, d * 100 + f),
            )
            .unwrap();
        }
    }
    run(std::process::Command::new("tar").args([
        "-cf",
        tmp.join("tree.tar").to_str().unwrap(),
        "-C",
        tree.to_str().unwrap(),
        ".",
    ]));
    let dest = shared.join("tar-tree");
    std::fs::create_dir(&dest).unwrap();
    let t = Instant::now();
    run(std::process::Command::new("tar").args([
        "-xf",
        tmp.join("tree.tar").to_str().unwrap(),
        "-C",
        dest.to_str().unwrap(),
    ]));
    run(std::process::Command::new("sync").arg("-f").arg(&dest));
    let tar_local = secs(t);
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut c = Raw { s, xid: 0 };
    let mut a = Writer::default();
    a.opaque(b"/");
    let res = c.call(100_005, 1, &a.buf);
    let root = coffre_nfs::xdr::Reader::new(&res[4..])
        .opaque(64)
        .unwrap()
        .to_vec();
    let tar_nfs = nfs_tree(&mut c, &root, "nfs-tree", true);
    let tar_nfs_nocommit = nfs_tree(&mut c, &root, "nfs-tree-2", false);
    let t = Instant::now();
    run(std::process::Command::new("sync").arg("-f").arg(&dest));
    let tar_nfs_nocommit = tar_nfs_nocommit + secs(t);
    // The same as the first, `share_async`: names and attributes not
    // synced before each reply.
    server.set_exports(vec![spec(true)]);
    let tar_nfs_async = nfs_tree(&mut c, &root, "nfs-tree-3", true);
    // What the broker costs: the same again with the handles opened in
    // the server's own process (as before the broker), interleaved.
    let key = || coffre_nfs::HandleKey::new([1; 32]);
    let mut local = Vec::new();
    let mut brokered = vec![tar_nfs_async];
    for round in 0..2 {
        server.close();
        assert!(server.open_in_process(key()).is_empty());
        local.push(nfs_tree(&mut c, &root, &format!("nfs-tree-l{round}"), true));
        server.close();
        let (keeper, _) = coffre_nfs::Keeper::open(key(), &[spec(true)]);
        let broker = std::sync::Arc::new(coffre_nfs::broker::on_a_thread(keeper).unwrap());
        assert!(server.open(broker).is_empty());
        brokered.push(nfs_tree(&mut c, &root, &format!("nfs-tree-b{round}"), true));
    }

    // The server's part of a close while a client reads.
    let reader = std::process::Command::new("nfs-cat")
        .arg(url("nfs.bin"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    server.close();
    let close_ms = secs(t) * 1000.0;
    if let Ok(mut r) = reader {
        let _ = r.kill();
        let _ = r.wait();
    }
    let mb = mib as f64;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "nfs benchmark ({mib} MiB file, 5000 files of 1 KiB; nfs-cp and a raw client on loopback)"
    );
    println!(
        "  write: dd+fsync on the mount {:.0} MiB/s, nfs-cp {:.0} MiB/s (x{:.2})",
        mb / dd_write,
        mb / nfs_write,
        dd_write / nfs_write
    );
    println!(
        "  read:  cat on the mount {:.0} MiB/s, nfs-cat {:.0} MiB/s (x{:.2})",
        mb / cat_read,
        mb / nfs_read,
        cat_read / nfs_read
    );
    println!(
        "  5000 files: tar -x + sync on the mount {tar_local:.2} s, over NFS {tar_nfs:.2} s (x{:.2} the time)",
        tar_nfs / tar_local
    );
    println!(
        "  the same without a COMMIT per file (one sync at the end): {tar_nfs_nocommit:.2} s (x{:.2})",
        tar_nfs_nocommit / tar_local
    );
    println!(
        "  the same with share_async (names and attributes not synced before each reply): {tar_nfs_async:.2} s (x{:.2})",
        tar_nfs_async / tar_local
    );
    println!("  close with a client reading: the server's part {close_ms:.2} ms");
    let (b, l) = (med(&mut brokered), med(&mut local));
    let span = |v: &[f64]| format!("{:.2}-{:.2}", v[0], v[v.len() - 1]);
    println!(
        "  share_async through the handle broker {b:.2} s ({}) against handles opened in the server's process {l:.2} s ({}): x{:.2} the time",
        span(&brokered),
        span(&local),
        b / l
    );
    let _ = enter.kill();
    let _ = enter.wait();
    v.stop();
}

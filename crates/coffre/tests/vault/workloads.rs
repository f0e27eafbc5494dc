//! Workloads follow the vault: processes in their own cgroups, started at
//! the first open, frozen (fast mode) or stopped (safe mode) at close,
//! thawed or restarted at open; and a daemon crash leaves nothing running.
//! Real cgroups (v2 and v1 freezers), real FUSE, real ext4.

use crate::harness::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A project workload, running as a member (uid 5001 in the team's group),
/// that appends a counter to a file it keeps open on the data (fd 3) and
/// prints it; one that only burns CPU; and a service workload.
const COUNTER: &str = r#"
[[workload]]
name = "counter"
kind = "process"
order = 1
user = "5001"
groups = [4242]
command = ["/bin/sh", "-c", "exec 3>>shared/counter.txt; i=0; while :; do i=$((i+1)); echo $i >&3; echo tick $i; sleep 0.1; done"]

[[workload]]
name = "spinner"
kind = "process"
order = 2
user = "root"
memory_mb = 64
command = ["/bin/sh", "-c", "while :; do :; done"]

[[workload]]
name = "watcher"
kind = "process"
role = "service"
user = "nobody"
command = ["/bin/sleep", "1000"]
"#;

/// The memory limit of the cgroup `pid` is in, in bytes.
fn memory_limit(pid: u32) -> Option<u64> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in cg.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        let file = if ctrl.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        return std::fs::read_to_string(file).ok()?.trim().parse().ok();
    }
    // A host with only cgroup v2.
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find(|l| l.split(' ').nth(2) == Some("cgroup2"))?
        .split(' ')
        .nth(1)?
        .to_string();
    std::fs::read_to_string(format!("{root}{path}/memory.max"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The mount lines at or under `dir` in a mountinfo table.
fn vault_mounts<'a>(mountinfo: &'a str, dir: &str) -> Vec<&'a str> {
    mountinfo
        .lines()
        .filter(|l| {
            let at = l.split(' ').nth(4).unwrap_or_default();
            at == dir || at.starts_with(&format!("{dir}/"))
        })
        .collect()
}

fn workload(st: &serde_json::Value, name: &str) -> serde_json::Value {
    st["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no workload {name} in {st}"))
        .clone()
}

fn pid_of(st: &serde_json::Value, name: &str) -> u32 {
    u32::try_from(workload(st, name)["pid"].as_i64().expect("a pid")).unwrap()
}

/// Whether a process exists and is not a zombie (a crashed daemon's
/// children are reparented to an init that may not reap them).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    Some(f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap())
}

fn counted(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn wait_count(path: &Path, at_least: usize) -> Vec<u64> {
    // A bound, not a measure: generous, for a machine busy with builds.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let c = counted(path);
        if c.len() >= at_least {
            return c;
        }
        assert!(
            Instant::now() < until,
            "the counter did not reach {at_least}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn leave(v: &Vault, enter: &mut std::process::Child) {
    ok(&v.cli("alice", &["leave"]));
    assert_eq!(wait_exit(enter, Duration::from_secs(30)), Some(0));
}

fn frozen_across_a_close(freezer: &str) {
    let mut v = Vault::init(&[]);
    v.set_data(4242, 2, &[]);
    v.set_workloads(freezer, COUNTER);
    v.start();
    let st = v.status("alice");
    assert_eq!(workload(&st, "counter")["state"], "stopped");
    assert_eq!(
        (st["mode"].as_str(), st["mode_pending"].as_str()),
        (Some("fast"), None)
    );

    let mut enter = v.enter_bg("alice", &[]);
    let file = v.layout().mountpoint.join("shared/counter.txt");
    wait_count(&file, 5);
    let st = v.status("alice");
    assert_eq!(workload(&st, "counter")["state"], "running", "{st}");
    assert_eq!(workload(&st, "spinner")["state"], "running", "{st}");
    let counter = pid_of(&st, "counter");
    let spinner = pid_of(&st, "spinner");
    // Its memory limit is the cgroup's (v1 memory controller or v2).
    assert_eq!(memory_limit(spinner), Some(64 << 20));
    // Created through the cut layer as the workload's own user.
    let meta = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (5001, 4242));
    // The workload sees the data through the cut layer, not the ext4 mount.
    let ns_mounts = std::fs::read_to_string(format!("/proc/{counter}/mountinfo")).unwrap();
    let mp = v.layout().mountpoint;
    let line = ns_mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
        .expect("the data's path in the workload's namespace");
    assert!(line.contains("coffre-view"), "{line}");
    // Under the vault directory: an empty tmpfs over it (its files are
    // none of the workload's business), the cut layer at the data's path
    // and, hidden below the tmpfs, the layer's own mount. No ext4, no
    // volume file.
    let vault_dir = v.dir.to_str().unwrap();
    let under = vault_mounts(&ns_mounts, vault_dir);
    for l in &under {
        let at = l.split(' ').nth(4).unwrap_or_default();
        assert!(
            l.contains("coffre-view") || (at == vault_dir && l.contains(" - tmpfs ")),
            "{l}"
        );
    }
    // The service workload runs as its user, all the time, in a namespace
    // where the data does not exist at all.
    let watcher = pid_of(&st, "watcher");
    let status = std::fs::read_to_string(format!("/proc/{watcher}/status")).unwrap();
    assert!(status.contains("Uid:\t65534\t"), "{status}");
    let ns_mounts = std::fs::read_to_string(format!("/proc/{watcher}/mountinfo")).unwrap();
    let under = vault_mounts(&ns_mounts, vault_dir);
    assert!(under.is_empty(), "{under:?}");

    leave(&v, &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    let st = v.status("alice");
    assert_eq!(st["key_held"], false);
    assert_eq!(st["data"]["mounted"], false);
    assert_eq!(workload(&st, "counter")["state"], "frozen", "{st}");
    assert_eq!(workload(&st, "spinner")["state"], "frozen", "{st}");
    assert_eq!(workload(&st, "watcher")["state"], "running", "{st}");
    assert!(alive(counter), "still alive");
    // Frozen means no instruction runs: the spinner's CPU time stands still.
    let t0 = cpu_ticks(spinner).unwrap_or_else(|| panic!("{:#?}", v.audit()));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(cpu_ticks(spinner), Some(t0), "a frozen workload used CPU");
    assert!(!file.exists(), "the data is gone while closed");
    // Nobody had to be killed to unmount: the frozen process does not pin it.
    let killed = v.audit_details("close", "killed");
    assert!(killed.is_empty(), "{killed:?}");
    assert_eq!(v.audit_details("workload", "frozen").len(), 2);

    let mut enter = v.enter_bg("alice", &[]);
    let before = counted(&file).len();
    let c = wait_count(&file, before + 5);
    // The same process carried on where it stopped, through the same
    // descriptor: 1, 2, 3... with no gap and no restart.
    let expect: Vec<u64> = (1..=c.len() as u64).collect();
    assert_eq!(c, expect);
    let st = v.status("alice");
    assert_eq!(workload(&st, "counter")["state"], "running");
    assert_eq!(pid_of(&st, "counter"), counter, "not restarted");
    let t1 = cpu_ticks(spinner).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        cpu_ticks(spinner).unwrap() > t1,
        "thawed workloads run again"
    );
    assert_eq!(v.audit_details("workload", "thawed").len(), 2);
    // Its output went to its log, inside the volume.
    let log = std::fs::read_to_string(mp.join(".coffre/logs/counter.log")).unwrap();
    assert!(log.contains("tick 1\n") && log.contains(&format!("tick {}\n", c.len())));
    leave(&v, &mut enter);
    v.stop();
    assert!(!alive(counter));
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn process_workloads_are_frozen_across_a_close_v2() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    frozen_across_a_close("v2");
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, a cgroup v1 freezer"]
fn process_workloads_are_frozen_across_a_close_v1() {
    require(&[
        Need::Root,
        Need::Fuse,
        Need::Loop,
        Need::Ext4,
        Need::CgroupV1Freezer,
    ]);
    frozen_across_a_close("v1");
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn safe_mode_restarts_them_and_the_next_daemon_kills_what_a_crash_left() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.set_data(4242, 2, &[]);
    v.set_workloads("auto", COUNTER);
    v.start();
    ok(&v.authed("alice", &["mode", "safe"]));
    let st = v.status("alice");
    assert_eq!(
        (st["mode"].as_str(), st["mode_pending"].as_str()),
        (Some("fast"), Some("safe"))
    );

    let mut enter = v.enter_bg("alice", &[]);
    let file = v.layout().mountpoint.join("shared/counter.txt");
    wait_count(&file, 3);
    let first = pid_of(&v.status("alice"), "counter");
    leave(&v, &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    let st = v.status("alice");
    assert_eq!(
        (st["mode"].as_str(), st["mode_pending"].as_str()),
        (Some("safe"), None)
    );
    assert_eq!(workload(&st, "counter")["state"], "stopped", "{st}");
    assert!(workload(&st, "counter")["pid"].is_null());
    assert!(!alive(first), "stopped at close");
    assert_eq!(v.audit_details("workload", "stopped").len(), 2);

    // A clean daemon restart, then an open: started again, from scratch.
    v.stop();
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let until = Instant::now() + Duration::from_secs(20);
    // The file kept the old count: wait for a new "1" after it.
    while counted(&file).iter().rposition(|&x| x == 1).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < until,
            "no new process: {:?}",
            counted(&file)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = pid_of(&v.status("alice"), "counter");
    assert_ne!(second, first);

    // Back to fast mode, closed: frozen. Then the daemon crashes.
    ok(&v.authed("alice", &["mode", "fast"]));
    leave(&v, &mut enter);
    v.wait_state("closed", Duration::from_secs(30));
    assert_eq!(workload(&v.status("alice"), "counter")["state"], "frozen");
    v.crash();
    assert!(alive(second));
    v.start();
    // The new daemon killed what its predecessor left, and said so.
    assert!(!alive(second), "left running");
    let killed = v.audit_details("workload", "killed");
    assert!(
        killed
            .iter()
            .any(|d| d.contains("counter") && d.contains("previous daemon")),
        "{killed:?}"
    );
    assert_eq!(workload(&v.status("alice"), "counter")["state"], "stopped");

    // A crash while open, workloads running: the same at the next start,
    // and the data the crash left goes too.
    let mut enter = v.enter_bg("alice", &[]);
    let n = counted(&file).len();
    wait_count(&file, n + 2);
    let st = v.status("alice");
    let (third, spinner) = (pid_of(&st, "counter"), pid_of(&st, "spinner"));
    v.crash();
    let _ = enter.kill();
    let _ = enter.wait();
    // The counter writes its log to the daemon, and may die of SIGPIPE at
    // its next line (a CI run caught it so); the spinner writes nothing
    // and outlives the daemon.
    assert!(alive(spinner));
    v.start();
    assert!(!alive(third) && !alive(spinner), "left running");
    let st = v.status("alice");
    assert_eq!(st["state"], "closed");
    assert_eq!(st["data"]["mounted"], false);
    assert_eq!(workload(&st, "counter")["state"], "stopped");
    assert!(v.audit_details("workload", "killed").len() >= 2);
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_task_waits_for_a_job_and_its_log_is_read_while_open() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    v.set_data(4242, 2, &[]);
    v.set_workloads(
        "auto",
        r#"
[[workload]]
name = "job"
kind = "process"
members = ["alice"]
user = "root"
command = ["/bin/sh", "-c", "echo job started; while [ ! -e shared/go ]; do sleep 0.1; done; echo job done"]
"#,
    );
    v.start();
    let mut enter = v.enter_bg("alice", &[]);
    let out = v.cli(
        "alice",
        &[
            "task",
            "add",
            "nightly",
            "--duration",
            "1h",
            "--workload",
            "nope",
        ],
    );
    assert_ne!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload is called nope"));
    ok(&v.cli(
        "alice",
        &[
            "task",
            "add",
            "nightly",
            "--duration",
            "1h",
            "--workload",
            "job",
        ],
    ));
    // Its log, from inside; each read is audited.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let out = v.cli("alice", &["workload", "logs", "job"]);
        ok(&out);
        if String::from_utf8_lossy(&out.stdout) == "job started\n" {
            break;
        }
        assert!(
            Instant::now() < until,
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!v.audit_details("workload_logs", "requested").is_empty());
    leave(&v, &mut enter);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(v.state(), "open", "the task waits for the job");
    // Outside, a certificate alone reads nothing.
    let out = v.cli("alice", &["workload", "logs", "job"]);
    assert_ne!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("coffre enter"));
    // The job ends; so does the task, and the vault closes.
    std::fs::write(v.layout().mountpoint.join("shared/go"), b"").unwrap();
    v.wait_state("closed", Duration::from_secs(30));
    let ended = v.audit_details("task_end", "ok");
    assert!(
        ended.iter().any(|d| d.contains("workload job ended")),
        "{ended:?}"
    );
    let st = v.status("alice");
    assert_eq!(workload(&st, "job")["state"], "exited", "{st}");
    let out = v.cli("alice", &["workload", "list", "--json"]);
    ok(&out);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["note"], "exited with status 0");
}

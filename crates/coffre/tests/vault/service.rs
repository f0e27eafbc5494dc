//! The daemon as a service: run as its systemd unit's ExecStart line
//! runs it, with `NOTIFY_SOCKET` pointing at a socket the test reads.

use crate::harness::*;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn next(rx: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = rx.recv(&mut buf).expect("no notification within 60 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// READY=1 once it accepts connections; on SIGTERM with a member inside,
/// STOPPING=1, then the close (audited) before the process ends.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn under_a_service_manager_it_says_ready_then_stopping_around_the_close() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    let sock = v.tmp.path().join("notify.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    v.daemon_env
        .push(("NOTIFY_SOCKET".into(), sock.to_str().unwrap().into()));
    v.start();
    let ready = next(&rx);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=listening on 127.0.0.1:{}", v.port)),
        "{ready}"
    );
    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    v.stop();
    let stopping = next(&rx);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    // Nothing after: the process is gone, and the vault was closed.
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(rx.recv(&mut [0u8; 64]).is_err());
    let stops = v.audit_details("stop", "closed");
    assert!(
        stops
            .iter()
            .any(|d| d.contains("was open") && d.contains("key wiped")),
        "{stops:?}"
    );
    // The member's session is gone with the daemon.
    let _ = enter.kill();
    let _ = enter.wait();
}

/// The unified hierarchy's mount point.
fn v2_root() -> std::path::PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
        .and_then(|l| l.split(' ').nth(1))
        .map(std::path::PathBuf::from)
        .expect("a cgroup2 mount")
}

/// The v2 cgroup of `pid`, relative to the hierarchy's root.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned()
}

/// Removes a cgroup tree, deepest first (each must be empty of processes).
fn remove_tree(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Started in a cgroup a service manager delegated to it (marked as
/// systemd marks a `Delegate=yes` unit's: `trusted.delegate` = 1), the
/// daemon moves into a leaf `daemon` of it and its workloads' groups go
/// under `workloads` beside it, frozen and thawed there; nothing of the
/// vault's is made at the hierarchy's root. Undelegated (run by hand), the
/// groups stay at the root as before (the other workload tests).
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, cgroup v2"]
fn in_a_delegated_cgroup_the_workloads_live_under_the_units_own() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let root = v2_root();
    let unit_rel = format!("coffre-test-{}.service", std::process::id());
    let unit = root.join(&unit_rel);
    std::fs::create_dir(&unit).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            remove_tree(&self.0);
        }
    }
    let _cleanup = Cleanup(unit.clone());
    let set = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys; os.setxattr(sys.argv[1], 'trusted.delegate', b'1')",
        ])
        .arg(&unit)
        .status()
        .unwrap();
    assert!(
        set.success(),
        "setting trusted.delegate on {}",
        unit.display()
    );

    let mut v = Vault::init(&[]);
    v.set_data(4242, 2, &[]);
    v.set_workloads(
        "v2",
        r#"
[[workload]]
name = "sleeper"
kind = "process"
user = "root"
command = ["/bin/sleep", "1000"]
"#,
    );
    v.daemon_cgroup = Some(unit.clone());
    v.start();
    assert_eq!(cgroup_of(v.pid()), format!("/{unit_rel}/daemon"));
    let mut enter = v.enter_bg("alice", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pid = loop {
        let st = v.status("alice");
        let w = st["workloads"]
            .as_array()
            .and_then(|a| a.iter().find(|w| w["name"] == "sleeper").cloned())
            .unwrap_or_default();
        if w["state"] == "running" {
            break u32::try_from(w["pid"].as_u64().unwrap()).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let group = cgroup_of(pid);
    assert!(
        group.starts_with(&format!("/{unit_rel}/workloads/")) && group.ends_with("/sleeper"),
        "{group}"
    );
    let scope = std::path::Path::new(&group)
        .parent()
        .and_then(|p| p.file_name())
        .unwrap()
        .to_owned();
    assert!(
        !root.join(&scope).exists(),
        "a group of the vault's at the hierarchy's root"
    );
    // The close freezes it where it is.
    v.cli("alice", &["leave"]);
    let _ = wait_exit(&mut enter, Duration::from_secs(10));
    v.wait_state("closed", Duration::from_secs(30));
    let frozen = std::fs::read_to_string(
        root.join(group.trim_start_matches('/'))
            .join("cgroup.freeze"),
    )
    .unwrap();
    assert_eq!(frozen.trim(), "1");
    v.stop();
    // Stopped, the daemon killed its frozen workload: nothing is left in
    // the unit but empty groups.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

/// alice tries to enter with `password`, a wrong one: refused.
fn enter_with_a_wrong_password(v: &mut Vault, password: &str) {
    let wrong = v.tmp.path().join("wrong.pw");
    std::fs::write(&wrong, password).unwrap();
    let totp = v.totp("alice");
    let out = v.cli(
        "alice",
        &[
            "enter",
            "--password-file",
            wrong.to_str().unwrap(),
            "--totp",
            &totp,
        ],
    );
    assert_eq!(code(&out), 2, "{}", String::from_utf8_lossy(&out.stderr));
}

/// Scrapes `url` and parses it with the reference parser (Python's
/// prometheus_client): samples as (name, labels as sorted `k=v` joined
/// by commas) -> value. A text the parser refuses fails the test.
fn scrape(url: &str) -> std::collections::BTreeMap<(String, String), f64> {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            r#"
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}\t{labels}\t{s.value}")
"#,
        )
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the parser refused the text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            let (n, labels, v) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            ((n.to_owned(), labels.to_owned()), v.parse().unwrap())
        })
        .collect()
}

fn sample(m: &std::collections::BTreeMap<(String, String), f64>, name: &str, labels: &str) -> f64 {
    m.get(&(name.to_owned(), labels.to_owned()))
        .copied()
        .unwrap_or_else(|| {
            panic!(
                "no {name}{{{labels}}} in {:?}",
                m.keys().collect::<Vec<_>>()
            )
        })
}

/// `[metrics] listen` on loopback: Prometheus text that the reference
/// parser reads, whose figures move as a member enters, works on the
/// data and leaves, and as a wrong password is refused; no member name
/// (unless the config allows it), no secret.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, python3-prometheus-client"]
fn the_metrics_endpoint_follows_a_member_in_and_out() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    let port = coffre_testkit::process::free_port();
    let cfg = v.dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    v.start();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let m = scrape(&url);
    assert_eq!(sample(&m, "coffre_up", ""), 1.0);
    assert_eq!(sample(&m, "coffre_state", "state=closed"), 1.0);
    assert_eq!(sample(&m, "coffre_members_inside", ""), 0.0);
    assert_eq!(sample(&m, "coffre_open_duration_seconds_count", ""), 0.0);

    let mut enter = v.enter_bg("alice", &[]);
    assert_eq!(v.state(), "open");
    std::fs::write(
        v.layout().mountpoint.join("shared/metrics-probe"),
        vec![7u8; 1 << 20],
    )
    .unwrap();
    let sync = std::process::Command::new("sync").status().unwrap();
    assert!(sync.success());
    let m = scrape(&url);
    assert_eq!(sample(&m, "coffre_state", "state=open"), 1.0);
    assert_eq!(sample(&m, "coffre_state", "state=closed"), 0.0);
    assert_eq!(sample(&m, "coffre_key_held", ""), 1.0);
    assert_eq!(sample(&m, "coffre_members_inside", ""), 1.0);
    assert_eq!(sample(&m, "coffre_sessions", "door=cli"), 1.0);
    assert_eq!(sample(&m, "coffre_open_duration_seconds_count", ""), 1.0);
    assert!(sample(&m, "coffre_keyslot_check_duration_seconds_count", "") >= 1.0);
    assert!(sample(&m, "coffre_audit_records_total", "action=enter,result=ok") >= 1.0);
    assert!(
        sample(&m, "coffre_data_bytes_total", "op=write") >= f64::from(1u32 << 20),
        "the 1 MiB written reached the volume"
    );
    assert!(sample(&m, "coffre_data_request_duration_seconds_count", "op=write") >= 1.0);

    // A wrong password: refused, counted by reason.
    enter_with_a_wrong_password(&mut v, "not alice's password");

    v.cli("alice", &["leave"]);
    let _ = wait_exit(&mut enter, Duration::from_secs(10));
    v.wait_state("closed", Duration::from_secs(30));
    let m = scrape(&url);
    assert_eq!(sample(&m, "coffre_state", "state=closed"), 1.0);
    assert_eq!(sample(&m, "coffre_key_held", ""), 0.0);
    assert_eq!(sample(&m, "coffre_members_inside", ""), 0.0);
    assert_eq!(sample(&m, "coffre_close_duration_seconds_count", ""), 1.0);
    let refused: f64 = m
        .iter()
        .filter(|((n, l), _)| n == "coffre_refused_total" && l.contains("action=enter"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        refused >= 1.0,
        "{:?}",
        m.keys()
            .filter(|(n, _)| n.contains("refused"))
            .collect::<Vec<_>>()
    );

    // Nothing that names a member or carries a secret.
    let raw = std::process::Command::new("curl")
        .args(["-sf", &url])
        .output()
        .unwrap();
    let raw = String::from_utf8(raw.stdout).unwrap();
    assert!(
        !raw.contains("alice"),
        "a member's name without member_names"
    );
    assert!(!raw.contains("alice's password") && !raw.contains("not alice"));
    v.stop();
}

/// The daemon's log: each audit record at its level. Under systemd
/// (`JOURNAL_STREAM` names stderr) lines carry the journal's `<N>`
/// priority and no time; `[log] level` filters, `COFFRE_LOG` overrides
/// it. A refused password is a warning that names the reason, never the
/// password.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn the_log_goes_to_the_journal_with_priorities_and_its_level() {
    use std::os::unix::fs::MetadataExt;
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let mut v = Vault::init(&[]);
    let cfg = v.dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\n[log]\nlevel = \"warn\"\n")).unwrap();
    let stderr = v.tmp.path().join("daemon.stderr");
    std::fs::write(&stderr, b"").unwrap();
    let m = std::fs::metadata(&stderr).unwrap();
    v.daemon_env
        .push(("JOURNAL_STREAM".into(), format!("{}:{}", m.dev(), m.ino())));
    v.start();
    enter_with_a_wrong_password(&mut v, "a wrong password for the log");
    v.stop();
    let log = v.daemon_stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with('<')).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("result=refused:wrong_password")),
        "{log}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("<6>")),
        "level warn lets no information through: {log}"
    );
    assert!(!log.contains("a wrong password for the log"));
    // No time of its own: the journal stamps lines.
    assert!(!lines.iter().any(|l| l.contains("Z ")), "{log}");

    // COFFRE_LOG wins over the config.
    v.daemon_env.push(("COFFRE_LOG".into(), "info".into()));
    v.start();
    v.stop();
    let log = v.daemon_stderr();
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6>") && l.contains("action=boot")),
        "{log}"
    );
}

/// A start that hangs (here config.toml is a FIFO nobody writes to, so
/// reading it never ends) still ends on SIGTERM, at once and saying so:
/// the daemon takes the signal before anything else, and until it serves,
/// a stop ends the start.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn a_stop_during_a_start_that_hangs_ends_it() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let v = Vault::init(&[]);
    let config = v.dir.join("config.toml");
    std::fs::rename(&config, v.tmp.path().join("config.toml.kept")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&config)
        .status()
        .unwrap();
    assert!(made.success());
    let stderr = v.tmp.path().join("serve.stderr");
    let mut child = v
        .bin()
        .args(["serve", v.dir.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // Once it has taken SIGTERM (its handler is set: bit 15 of SigCgt),
    // and still starting.
    let caught = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("SigCgt:"))?;
                u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
            })
            .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !caught(child.id()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never took SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the start did not hang, so this proves nothing: {}",
        std::fs::read_to_string(&stderr).unwrap()
    );
    unsafe_kill(child.id(), "TERM");
    let Some(status) = wait_child(&mut child, Duration::from_secs(10)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("SIGTERM did not end a start that hangs");
    };
    // Killed by the signal, as its default action does: what a service
    // manager takes for a clean stop.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(15), "{status:?}");
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(said.contains("stopped during its start"), "{said}");
}

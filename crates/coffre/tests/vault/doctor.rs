//! `coffre doctor` on this host and on a real vault directory: OK for
//! what works, FAIL with the reason for what a test takes away.

use crate::harness::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

/// `coffre doctor DIR --json` through `cmd`: (exit code, findings by check,
/// the worst level it reports).
fn doctor(mut cmd: Command) -> (i32, BTreeMap<String, Vec<serde_json::Value>>, String) {
    let out = cmd.output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut by = BTreeMap::<String, Vec<serde_json::Value>>::new();
    let vault = v["vault"]["findings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for f in v["host"].as_array().unwrap().iter().chain(vault.iter()) {
        by.entry(f["check"].as_str().unwrap().to_owned())
            .or_default()
            .push(f.clone());
    }
    (code, by, v["worst"].as_str().unwrap().to_owned())
}

fn level(by: &BTreeMap<String, Vec<serde_json::Value>>, check: &str) -> String {
    let f = by
        .get(check)
        .unwrap_or_else(|| panic!("no {check} finding in {by:?}"));
    f[0]["level"].as_str().unwrap().to_owned()
}

fn expected_code(worst: &str) -> i32 {
    match worst {
        "OK" => 0,
        "WARN" => 14,
        "FAIL" => 15,
        other => panic!("worst {other}"),
    }
}

/// A fresh vault on this host, its daemon running (it holds the header's
/// lock): every check of what this machine has says OK, and the exit
/// code is the worst level's.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn doctor_finds_this_host_and_a_fresh_vault_sound() {
    let mut v = Vault::init(&[]);
    v.start();
    let mut cmd = v.bin();
    cmd.arg("doctor").arg(&v.dir).arg("--json");
    let (code, by, worst) = doctor(cmd);
    for check in [
        "root",
        "fuse",
        "loop",
        "ext4-tools",
        "cgroups",
        "suid-dumpable",
        "landlock",
        "seccomp",
        "shared-mappings",
        "vault-dir",
        "vault-dir-path",
        "control-file",
        "config",
        "control",
        "header",
        "volume",
    ] {
        assert_eq!(level(&by, check), "OK", "{check}: {:?}", by[check]);
    }
    let certs = &by["certificate"];
    assert!(certs.len() >= 2, "ca.pem and server.pem: {certs:?}");
    assert!(certs.iter().all(|c| c["level"] == "OK"), "{certs:?}");
    assert_eq!(code, expected_code(&worst));
    // For people: a line per finding, the fix under each WARN or FAIL.
    let out = v.bin().arg("doctor").arg(&v.dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("header") && text.contains(&format!("worst: {worst}")),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(code));
}

/// A control file others can read, /dev/fuse taken away (in a mount
/// namespace of the check's own), a damaged header copy: each is named,
/// with its fix, and the exit code says a check failed.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4, unshare"]
fn doctor_fails_on_what_a_test_takes_away() {
    let v = Vault::init(&[]);
    let control = v.dir.join("control.json");
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = v.bin();
    cmd.arg("doctor").arg(&v.dir).arg("--json");
    let (code, by, worst) = doctor(cmd);
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600)).unwrap();
    let f = &by["control-file"][0];
    assert_eq!(f["level"], "FAIL", "{f}");
    assert!(
        f["detail"].as_str().unwrap().contains("control.json"),
        "{f}"
    );
    assert!(f["fix"].as_str().unwrap().contains("chmod 600"), "{f}");
    assert_eq!((worst.as_str(), code), ("FAIL", 15));

    // No FUSE device: an empty file bound over it, in a mount namespace
    // only this command sees.
    let empty = v.tmp.path().join("not-fuse");
    std::fs::write(&empty, b"").unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /dev/fuse && exec {BIN} doctor --json {}",
            empty.display(),
            v.dir.display()
        ));
    let (code, by, _) = doctor(cmd);
    let f = &by["fuse"][0];
    assert_eq!(f["level"], "FAIL", "{f}");
    assert!(f["detail"].as_str().unwrap().contains("/dev/fuse"), "{f}");
    assert_eq!(code, 15);
    assert_eq!(level(&by, "control-file"), "OK");
    // A character device, but not FUSE's (/dev/null bound over it).
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind /dev/null /dev/fuse && exec {BIN} doctor --json {}",
            v.dir.display()
        ));
    let (code, by, _) = doctor(cmd);
    let f = &by["fuse"][0];
    assert_eq!(f["level"], "FAIL", "{f}");
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("not the kernel's device"),
        "{f}"
    );
    assert_eq!(code, 15);
    // The host's device is untouched.
    assert!(
        std::fs::metadata("/dev/fuse")
            .unwrap()
            .file_type()
            .is_char_device()
    );

    // The header's secondary copy overwritten: a WARN that says which,
    // and how to repair.
    let config = std::fs::read_to_string(v.dir.join("config.toml")).unwrap();
    let header = config
        .lines()
        .find_map(|l| l.strip_prefix("header = "))
        .map(|h| h.trim_matches('"').to_owned())
        .unwrap();
    let header = v.dir.join(header);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&header)
            .unwrap();
        f.write_all_at(&[0x5a; 4096], 16384).unwrap();
    }
    let mut cmd = v.bin();
    cmd.arg("doctor").arg(&v.dir).arg("--json");
    let (_, by, _) = doctor(cmd);
    let f = &by["header"][0];
    assert_eq!(f["level"], "WARN", "{f}");
    assert!(
        f["fix"].as_str().unwrap().contains("coffre volume repair"),
        "{f}"
    );

    // A CA key that is not the CA certificate's: what it would sign
    // chains to nothing.
    let ca_key = v.dir.join("ca.key");
    let kept = std::fs::read(&ca_key).unwrap();
    std::fs::copy(v.dir.join("server.key"), &ca_key).unwrap();
    let mut cmd = v.bin();
    cmd.arg("doctor").arg(&v.dir).arg("--json");
    let (code, by, _) = doctor(cmd);
    std::fs::write(&ca_key, kept).unwrap();
    let f = by["key pair"]
        .iter()
        .find(|f| f["detail"].as_str().unwrap().contains("ca.pem"))
        .unwrap()
        .clone();
    assert_eq!(f["level"], "FAIL", "{f}");
    assert!(f["fix"].as_str().unwrap().contains("backup"), "{f}");
    assert_eq!(code, 15);
}

/// Without a directory: the host alone, and a directory that is not a
/// vault is a FAIL that says so.
#[test]
#[ignore = "system: needs root, FUSE, loop"]
fn doctor_without_a_vault_checks_the_host() {
    require(&[Need::Root, Need::Fuse, Need::Loop]);
    let mut cmd = Command::new(BIN);
    cmd.args(["doctor", "--json"]);
    let (code, by, worst) = doctor(cmd);
    assert_eq!(level(&by, "fuse"), "OK");
    assert!(!by.contains_key("config"));
    assert_eq!(code, expected_code(&worst));
    let t = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("doctor").arg(t.path()).arg("--json");
    let (code, by, _) = doctor(cmd);
    assert_eq!(level(&by, "config"), "FAIL");
    assert_eq!(code, 15);
}

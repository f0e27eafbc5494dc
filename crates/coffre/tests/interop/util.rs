//! Helpers: running cryptsetup and coffre; temporary directories, cheap
//! KDF flags and the gate come from the test kit.

use coffre_luks2::{Passphrase, VolumeKey};
use coffre_storage::Luks2Container;
pub use coffre_testkit::kdf::{ARGON2ID_FAST as COFFRE_FAST, fast_kdf};
pub use coffre_testkit::volume::{Dir, pattern, rand_suffix, s};
pub use coffre_testkit::{Need, ok, require};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs cryptsetup; panics with its output on failure.
pub fn cryptsetup(args: &[&str]) -> Output {
    let out = cryptsetup_status(args);
    assert!(
        out.status.success(),
        "cryptsetup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs cryptsetup and returns its output whatever the status.
pub fn cryptsetup_status(args: &[&str]) -> Output {
    // The LUKS2 oracle (scripts/test installs cryptsetup-bin).
    require(&[Need::Cryptsetup]);
    Command::new("cryptsetup")
        .args(["-q"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cryptsetup")
}

/// The volume key according to cryptsetup.
pub fn cryptsetup_volume_key(
    dir: &Dir,
    vol: &Path,
    header: Option<&Path>,
    key_file: &Path,
) -> Vec<u8> {
    let vk = dir.path(&format!("vk-{}", rand_suffix()));
    let mut args = vec!["luksDump", "--dump-volume-key", "--volume-key-file"];
    let vks = vk.to_str().unwrap().to_string();
    args.push(&vks);
    let kf = key_file.to_str().unwrap().to_string();
    args.extend(["--key-file", &kf]);
    let hs;
    if let Some(h) = header {
        hs = h.to_str().unwrap().to_string();
        args.extend(["--header", &hs]);
    }
    let v = vol.to_str().unwrap().to_string();
    args.push(&v);
    cryptsetup(&args);
    std::fs::read(&vk).unwrap()
}

/// Unlocks through the library; returns (slot, key).
pub fn coffre_unlock(
    vol: &Path,
    header: Option<&Path>,
    pass: &str,
) -> Result<(u32, VolumeKey), coffre_storage::Error> {
    let c = Luks2Container::open(vol, header)?;
    c.unlock(&Passphrase::from_slice(pass.as_bytes()), None)
}

/// Runs the coffre binary.
pub fn coffre(args: &[&str]) -> Output {
    coffre_stdin(args, &[])
}

/// Runs the coffre binary with bytes on stdin.
pub fn coffre_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_coffre"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coffre");
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `coffre volume format` of a SIZE volume (data and header in one file,
/// `vol`) with a cheap argon2id keyslot for passphrase `pass` (in file
/// `pw`); returns (volume, passphrase file).
pub fn format_volume(d: &Dir, size: &str) -> (PathBuf, PathBuf) {
    let vol = d.path("vol");
    let pw = d.pass("pw", "pass");
    let mut a = vec![
        "volume",
        "format",
        s(&vol),
        "--size",
        size,
        "--key-file",
        s(&pw),
    ];
    a.extend(COFFRE_FAST);
    ok(&coffre(&a));
    (vol, pw)
}

/// The exit code of a run that must not have panicked.
pub fn exit_code(out: &Output) -> i32 {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "panic: {err}");
    out.status.code().expect("exited, not killed by a signal")
}

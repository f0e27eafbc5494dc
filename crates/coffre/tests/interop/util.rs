//! Helpers: temporary volumes, running cryptsetup and coffre.

use coffre_luks2::{Passphrase, VolumeKey};
use coffre_storage::Luks2Container;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// Writes a passphrase file (no trailing newline) and returns its path.
    pub fn pass(&self, name: &str, pass: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, pass).unwrap();
        p
    }
}

fn check_installed() {
    let ok = Command::new("cryptsetup")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "cryptsetup is not installed: these tests use it as the LUKS2 oracle (scripts/test installs cryptsetup-bin)"
    );
}

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
    check_installed();
    Command::new("cryptsetup")
        .args(["-q"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cryptsetup")
}

/// The arguments for a cheap keyslot of the given KDF.
pub fn fast_kdf(kdf: &str) -> Vec<&'static str> {
    match kdf {
        "pbkdf2" => vec!["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
        "argon2i" => vec![
            "--pbkdf",
            "argon2i",
            "--pbkdf-memory",
            "8192",
            "--pbkdf-parallel",
            "2",
            "--pbkdf-force-iterations",
            "4",
        ],
        "argon2id" => vec![
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "8192",
            "--pbkdf-parallel",
            "2",
            "--pbkdf-force-iterations",
            "4",
        ],
        other => panic!("unknown kdf {other}"),
    }
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

fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    coffre_luks2::secret::fill_random(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
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

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "command failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Fast coffre KDF flags.
pub const COFFRE_FAST: [&str; 8] = [
    "--pbkdf",
    "argon2id",
    "--pbkdf-force-iterations",
    "4",
    "--pbkdf-memory",
    "8192",
    "--pbkdf-parallel",
    "2",
];

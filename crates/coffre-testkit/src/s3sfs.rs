//! A second S3 server for a test: s3s-fs (crates.io, `cargo install
//! s3s-fs --features binary`) over a directory, on a free loopback port,
//! killed by PID when dropped. Its buckets are the directory's
//! subdirectories. It honours conditional puts one at a time, not when
//! they race (see coffre-remote's tests/s3.rs).

use crate::gate::{Need, require};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running s3s-fs.
pub struct S3sFs {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl S3sFs {
    /// Starts it with bucket `bucket`; returns once it accepts
    /// connections.
    pub fn start(bucket: &str) -> S3sFs {
        require(&[Need::S3sFs]);
        let port = crate::process::free_port();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root").join(bucket)).unwrap();
        let child = Command::new(crate::gate::s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                "AKIATESTCOFFRE",
                "--secret-key",
                "test-secret",
            ])
            .arg(dir.path().join("root"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("s3s-fs.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let creds = dir.path().join("s3.credentials");
        std::fs::write(
            &creds,
            "aws_access_key_id=AKIATESTCOFFRE\naws_secret_access_key=test-secret\n",
        )
        .unwrap();
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
        S3sFs { child, port, dir }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A 0600 credentials file with its keys.
    pub fn credentials(&self) -> PathBuf {
        self.dir.path().join("s3.credentials")
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

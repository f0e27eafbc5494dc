//! An S3 server for a test: moto (PyPI `moto[server]`) on a free loopback
//! port, killed by PID when dropped. It accepts any credentials, honours
//! conditional puts (If-None-Match, If-Match), and makes buckets from an
//! unsigned PUT.
//!
//! moto checks a put's condition, then writes, with no lock between: its
//! conditional puts are not atomic, and of racing updates of one version
//! several can succeed (seen here: 3 runs of 20 with the host loaded).
//! AWS S3's are atomic, and coffre's conditional-write probe refuses a
//! store whose are not. So the tests run moto's application behind a lock
//! that lets one request in at a time ([`LAUNCHER`]): its conditional puts
//! then are atomic, by construction rather than by luck.

use crate::gate::{Need, require};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// moto's S3 application (as `moto_server` builds it) served on
/// `argv[1]:argv[2]` by werkzeug's threaded server, each request handled
/// under one lock, its response included: a condition checked and the
/// write it allows are one step.
pub const LAUNCHER: &str = r#"
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def one_at_a_time(environ, start_response):
    with lock:
        return list(app(environ, start_response))

run_simple(sys.argv[1], int(sys.argv[2]), one_at_a_time, threaded=True)
"#;

/// A running moto.
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Moto {
    /// Starts it; returns once it accepts connections.
    pub fn start() -> Moto {
        require(&[Need::Moto]);
        let port = crate::process::free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(crate::gate::moto_python())
            .args(["-c", LAUNCHER, "127.0.0.1", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("moto.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(
            dir.path().join("s3.credentials"),
            "aws_access_key_id=AKIATESTCOFFRE\naws_secret_access_key=test-secret\n",
        )
        .unwrap();
        std::fs::set_permissions(
            dir.path().join("s3.credentials"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Moto { child, port, dir }
    }

    /// Its process id (to stop it answering with SIGSTOP, as a store that
    /// hangs; SIGCONT to bring it back).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Makes bucket `name`.
    pub fn bucket(&self, name: &str) {
        let out = Command::new("curl")
            .args(["-sf", "-X", "PUT"])
            .arg(format!("{}/{name}", self.endpoint()))
            .output()
            .unwrap();
        assert!(out.status.success(), "bucket {name}: {out:?}");
    }

    /// A 0600 credentials file (any keys: moto checks none).
    pub fn credentials(&self) -> PathBuf {
        self.dir.path().join("s3.credentials")
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// Where it keeps its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // A stopped server gets SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

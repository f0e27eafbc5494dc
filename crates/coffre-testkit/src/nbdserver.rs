//! An NBD server for a test: nbdkit or qemu-nbd on a unix socket in its
//! own directory, killed by PID when dropped (nbdkit also exits with its
//! parent).

use crate::gate::{Need, require};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running NBD server.
pub struct NbdServer {
    child: Option<Child>,
    /// Its socket.
    pub socket: PathBuf,
    what: String,
    dir: tempfile::TempDir,
}

impl NbdServer {
    /// `nbdkit ARGS` (plugin, its parameters, `--filter=...` before them).
    pub fn nbdkit(args: &[&str]) -> NbdServer {
        require(&[Need::NbdServers]);
        let dir = tempfile::tempdir().unwrap();
        let mut s = NbdServer {
            child: None,
            socket: dir.path().join("nbd.sock"),
            what: "nbdkit".into(),
            dir,
        };
        s.spawn_nbdkit(args);
        s
    }

    fn spawn_nbdkit(&mut self, args: &[&str]) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_socket();
    }

    /// `qemu-nbd` serving the raw `image` as export `coffre`, for any
    /// number of connections in turn (one at a time).
    pub fn qemu_nbd(image: &Path) -> NbdServer {
        require(&[Need::NbdServers]);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "coffre",
                "--persistent",
                "--cache=writeback",
                "-k",
            ])
            .arg(&socket)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let s = NbdServer {
            child: Some(child),
            socket,
            what: "qemu-nbd".into(),
            dir,
        };
        s.wait_socket();
        s
    }

    fn wait_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not start: {}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it and starts nbdkit again on the same socket with `args`
    /// (a server restarted under a connected client).
    pub fn restart_nbdkit(&mut self, args: &[&str]) {
        self.stop();
        self.spawn_nbdkit(args);
    }

    /// Stops it (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Its directory (for files a test hands it: certificates, an error
    /// trigger).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

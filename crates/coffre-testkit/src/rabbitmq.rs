//! A real RabbitMQ broker for the bus's tests, started from the directory
//! `coffre bus broker-config` writes (its `run` script), on its own node
//! name, distribution port and port-mapper (epmd) port, and stopped with
//! its port mapper afterwards.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's server script.
pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A running broker.
pub struct Broker {
    child: Option<Child>,
    run: PathBuf,
    /// The address it listens on.
    pub host: String,
    /// The TLS port it listens on.
    pub port: u16,
    node: String,
    epmd: u16,
    dist: u16,
    log: PathBuf,
}

impl Broker {
    /// Starts `run` (the broker's directory's script), listening on
    /// 127.0.0.1:`port` as configured, and waits until it accepts
    /// connections (at most 120 s).
    pub fn start(run: &Path, port: u16) -> Broker {
        Broker::start_at(run, "127.0.0.1", port)
    }

    /// As [`Broker::start`], listening on `host` (an address of this
    /// network namespace) as configured.
    pub fn start_at(run: &Path, host: &str, port: u16) -> Broker {
        let epmd = crate::process::free_port();
        let dist = crate::process::free_port();
        let node = format!("coffre{}p{port}@localhost", std::process::id());
        let log = run.with_file_name("broker-test.log");
        let mut b = Broker {
            child: None,
            run: run.to_path_buf(),
            host: host.to_string(),
            port,
            node,
            epmd,
            dist,
            log,
        };
        b.boot();
        b
    }

    /// Starts the broker; when its distribution port was taken meanwhile
    /// (`free_port` only found it free: another test's process, or an
    /// outgoing connection's ephemeral port, may bind it before the node
    /// does, as at a restart), on another one, three tries in all.
    fn boot(&mut self) {
        for _ in 0..2 {
            let from = std::fs::metadata(&self.log).map_or(0, |m| m.len());
            match self.try_boot() {
                Ok(()) => return,
                Err(()) => {
                    let text = self.log_text();
                    let this = text.get(usize::try_from(from).unwrap_or(0)..).unwrap_or("");
                    if !this.contains("dist_port_already_used") {
                        panic!("the broker exited while starting:\n{text}");
                    }
                    self.dist = crate::process::free_port();
                }
            }
        }
        if self.try_boot().is_err() {
            panic!("the broker exited while starting:\n{}", self.log_text());
        }
    }

    /// One start: `Err` if the broker exited before it listened.
    fn try_boot(&mut self) -> Result<(), ()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.run)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("ERL_EPMD_PORT", self.epmd.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.run.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                return Ok(());
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.child = None;
                return Err(());
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not listen on {} within 120 s:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the broker printed.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the broker (SIGTERM to Debian's server script, which stops
    /// the Erlang VM it started and waits for it; SIGKILL to the process
    /// group after 60 s) and waits for it. (A SIGTERM to the whole group
    /// left the VM running here: the script's own signal, sent while the
    /// VM was already stopping, was lost.)
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id();
        let _ = Command::new("kill")
            .args(["-s", "TERM", &pgid.to_string()])
            .status();
        if crate::process::wait_child(&mut child, Duration::from_secs(60)).is_none() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pgid}")])
                .status();
            let _ = child.wait();
        }
        // Its listener gone before the next start reuses the port.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((self.host.as_str(), self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops and starts it again (same node, same data).
    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        // The port mapper the node started outlives it (it detaches).
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd.to_string(), "-kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

//! A helper process the daemon drives over its standard input (one JSON
//! command per line, one JSON answer per line): the NFS server and the
//! directory's LDAP server. The daemon binds their sockets and keeps
//! them, so a helper that dies is started again on the same ones; an
//! answer that does not come in time gets the helper killed. A helper
//! parses guests' bytes: its answers are read through
//! [`coffre_sys::helper`], which believes no more of them than it must.

pub(super) use coffre_sys::helper::{counters, failures};

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How soon a helper that died is started again.
pub(super) const RESTART_AFTER: Duration = Duration::from_secs(2);

/// How long a helper may take to answer a command. One that does not (an
/// NFS call stuck on storage that stopped answering holds the close) is
/// killed: its descriptors go with it, and the daemon goes on.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// A helper's process, its sockets and its log.
pub(super) struct Helper {
    /// What it is, for messages ("the NFS server").
    what: &'static str,
    args: Vec<String>,
    sockets: Vec<OwnedFd>,
    proc_: Option<(Child, ChildStdin, mpsc::Receiver<String>)>,
    pub(super) log: PathBuf,
    started: Option<Instant>,
}

impl Helper {
    /// A helper run as `coffre ARGS...`, given `sockets` as descriptors
    /// 3, 4...; not started yet.
    pub(super) fn new(
        what: &'static str,
        args: Vec<String>,
        sockets: Vec<OwnedFd>,
        log: PathBuf,
    ) -> Self {
        Self {
            what,
            args,
            sockets,
            proc_: None,
            log,
            started: None,
        }
    }

    /// Its arguments from the next start on.
    pub(super) fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// Starts the process (nothing told yet).
    pub(super) fn spawn(&mut self) -> Result<u32, String> {
        let mut pass_fds = Vec::new();
        for (i, s) in self.sockets.iter().enumerate() {
            let n = i32::try_from(3 + i).unwrap_or(3);
            pass_fds.push((s.try_clone().map_err(|e| e.to_string())?, n));
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut child = super::network::spawn_helper(&args, &self.log, pass_fds, Stdio::piped())?;
        self.started = Some(Instant::now());
        let pid = child.id();
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no pipes to {}", self.what));
        };
        // Commands are written without blocking, within their deadline: a
        // helper that stops reading (taken over, or stuck) must not hold
        // the daemon's actor, and the lock and the close with it.
        if let Err(e) = coffre_sys::pipe::set_nonblocking(&stdin) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the pipe to {}: {e}", self.what));
        }
        // Its answers come through a thread, so that waiting for one has a
        // deadline; a few at most wait (a helper that writes what nobody
        // asked for blocks itself, not the daemon's memory).
        let (tx, rx) = mpsc::sync_channel(4);
        std::thread::Builder::new()
            .name("helper-answers".into())
            .spawn(move || read_answers(BufReader::new(stdout), &tx))
            .map_err(|e| e.to_string())?;
        self.proc_ = Some((child, stdin, rx));
        Ok(pid)
    }

    /// Whether it runs.
    pub(super) fn running(&self) -> bool {
        self.proc_.is_some()
    }

    /// One command, one answer. A helper that does not answer is killed
    /// (it is started again by the next tick).
    pub(super) fn command(&mut self, cmd: &Value) -> Result<Value, String> {
        self.command_within(cmd, COMMAND_TIMEOUT)
    }

    /// `command`, with its own deadline (for what runs on the daemon's
    /// actor each tick: a stopped helper must not hold it for long).
    pub(super) fn command_within(
        &mut self,
        cmd: &Value,
        within: Duration,
    ) -> Result<Value, String> {
        let mut line = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let answer = self.line_within(&line, within);
        zeroize::Zeroize::zeroize(&mut line);
        answer
    }

    /// One command given as its line (for lines that carry a secret,
    /// built in a buffer the caller wipes).
    pub(super) fn command_line(&mut self, line: &[u8]) -> Result<Value, String> {
        self.line_within(line, COMMAND_TIMEOUT)
    }

    fn line_within(&mut self, line: &[u8], within: Duration) -> Result<Value, String> {
        let what = self.what;
        let Some((_, stdin, answers)) = self.proc_.as_mut() else {
            return Err(format!("{what} is not running"));
        };
        // An answer left over from a command that timed out is not ours.
        while answers.try_recv().is_ok() {}
        let deadline = Instant::now() + within;
        if let Err(e) = coffre_sys::pipe::write_within(stdin, line, deadline) {
            self.stop();
            return Err(if e.kind() == std::io::ErrorKind::TimedOut {
                format!(
                    "{what} did not take its command within {} ms: killed",
                    within.as_millis()
                )
            } else {
                format!("{what} ended")
            });
        }
        match answers.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            // It may lie: what it says is bounded and escaped there.
            Ok(answer) => coffre_sys::helper::answer(what, &answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.stop();
                Err(format!(
                    "{what} did not answer within {} ms: killed",
                    within.as_millis()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.stop();
                Err(format!("{what} ended"))
            }
        }
    }

    /// Whether it died (and why), reaping it; whatever it forked goes
    /// too (its process group).
    pub(super) fn died(&mut self) -> Option<String> {
        let (c, _, _) = self.proc_.as_mut()?;
        let st = coffre_sys::child::reap_group(c)?;
        self.proc_ = None;
        Some(st.to_string())
    }

    /// Whether it should be started (again) now.
    pub(super) fn due(&self) -> bool {
        self.proc_.is_none() && self.started.is_none_or(|t| t.elapsed() >= RESTART_AFTER)
    }

    /// Its process id, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.proc_.as_ref().map(|(c, _, _)| c.id())
    }

    /// Kills it, with whatever it forked: its process group (it was
    /// started in a session of its own, and the helpers' seccomp filter
    /// keeps them from leaving the group; the NFS server is the broker's
    /// child).
    pub(super) fn stop(&mut self) {
        if let Some((mut c, stdin, _)) = self.proc_.take() {
            drop(stdin);
            coffre_sys::child::stop_group(&mut c);
        }
    }
}

/// Forwards a helper's answers, one line each (at most 1 MiB).
fn read_answers(mut out: BufReader<ChildStdout>, tx: &mpsc::SyncSender<String>) {
    loop {
        let mut line = String::new();
        match std::io::Read::take(&mut out, 1 << 20).read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => {
                if tx.send(line).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

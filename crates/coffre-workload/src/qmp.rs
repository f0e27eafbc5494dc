//! A small QMP client (QEMU Machine Protocol): JSON lines over a unix
//! socket, one command at a time, with file descriptors passed alongside
//! (`getfd`), which is how a VM's saved state goes to and comes from a
//! file inside the volume that QEMU itself cannot see.

use serde_json::{Value, json};
use std::io::{IoSlice, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a command's answer is waited for.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// A QMP line longer than this is refused (QEMU's replies to what we ask
/// are a few hundred bytes).
pub const MAX_LINE: usize = 1 << 20;

/// QMP errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU said something we do not understand.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting (first line).
    Greeting,
    /// A command's result.
    Return(Value),
    /// A command's failure.
    Error {
        /// Error class.
        class: String,
        /// QEMU's sentence for a person.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Its name.
        name: String,
    },
}

/// Parses one QMP line.
pub fn parse(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| QmpError::Protocol(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| QmpError::Protocol("not a JSON object".into()))?;
    if obj.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    if let Some(r) = obj.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = obj.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Message::Error {
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        return Ok(Message::Event {
            name: name.to_string(),
        });
    }
    Err(QmpError::Protocol(
        "neither a return, an error nor an event".into(),
    ))
}

/// A QMP connection in command mode.
pub struct Qmp {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl Qmp {
    /// Connects (waiting up to `within` for QEMU to create the socket),
    /// reads the greeting and enters command mode.
    pub fn connect(path: &Path, within: Duration) -> Result<Self, QmpError> {
        let until = Instant::now() + within;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= until => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        sock.set_read_timeout(Some(ANSWER_WITHIN))?;
        let mut q = Self {
            sock,
            buf: Vec::new(),
        };
        match q.read()? {
            Message::Greeting => {}
            m => {
                return Err(QmpError::Protocol(format!(
                    "expected a greeting, got {m:?}"
                )));
            }
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Message, QmpError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return parse(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::Protocol("line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self.sock.read(&mut chunk)?;
            if n == 0 {
                return Err(QmpError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed its QMP socket",
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            match self.read()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    });
                }
                Message::Event { .. } => {}
                Message::Greeting => {
                    return Err(QmpError::Protocol("a second greeting".into()));
                }
            }
        }
    }

    fn line(command: &str, args: Option<Value>) -> Vec<u8> {
        let mut v = json!({ "execute": command });
        if let Some(a) = args {
            v["arguments"] = a;
        }
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        line
    }

    /// Runs one command; returns its result.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.sock.write_all(&Self::line(command, args))?;
        self.answer(command)
    }

    /// Hands `fd` to QEMU under `name` (`getfd`), for a later `fd:NAME`.
    pub fn pass_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
        let line = Self::line("getfd", Some(json!({ "fdname": name })));
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(QmpError::Protocol("no room for the descriptor".into()));
        }
        // SCM_RIGHTS goes with the first byte: send the whole line in one
        // message (it is short).
        let n = sendmsg(
            &self.sock,
            &[IoSlice::new(&line)],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        if n < line.len() {
            self.sock.write_all(&line[n..])?;
        }
        self.answer("getfd").map(|_| ())
    }

    /// Polls `query-migrate` until it completes (or fails), up to `within`.
    pub fn wait_migration(&mut self, within: Duration) -> Result<(), QmpError> {
        let until = Instant::now() + within;
        loop {
            let r = self.execute("query-migrate", None)?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(QmpError::Protocol(format!("migration {s}: {why}")));
                }
                _ => {}
            }
            if Instant::now() >= until {
                return Err(QmpError::Protocol(format!(
                    "migration not finished after {} s",
                    within.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol("query-status without a status".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_sends() {
        assert_eq!(
            parse(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#).unwrap(),
            Message::Greeting
        );
        assert_eq!(
            parse(br#"{"return": {}}"#).unwrap(),
            Message::Return(json!({}))
        );
        assert_eq!(
            parse(br#"{"error": {"class": "GenericError", "desc": "No fd named x"}}"#).unwrap(),
            Message::Error {
                class: "GenericError".into(),
                desc: "No fd named x".into()
            }
        );
        assert_eq!(
            parse(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#).unwrap(),
            Message::Event {
                name: "STOP".into()
            }
        );
        for bad in [&b"[]"[..], b"{}", b"nope", b"{\"event\": 3}", b""] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A fake QEMU on a socketpair: commands, events in between, errors, a
    /// descriptor passed with `getfd`.
    #[test]
    fn commands_events_errors_and_fd_passing() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\r\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"stop\""));
            s.write_all(b"{\"event\": \"STOP\"}\r\n{\"return\": {}}\r\n")
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            s.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n")
                .unwrap();
            // getfd: the descriptor arrives with the line.
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let mut buf = [0u8; 256];
            let got = rustix::net::recvmsg(
                &s,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut control,
                rustix::net::RecvFlags::empty(),
            )
            .unwrap();
            assert!(String::from_utf8_lossy(&buf[..got.bytes]).contains("getfd"));
            let mut fds = Vec::new();
            for m in control.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(f) = m {
                    fds.extend(f);
                }
            }
            assert_eq!(fds.len(), 1);
            let mut f = std::fs::File::from(fds.pop().unwrap());
            f.write_all(b"through the fd").unwrap();
            s.write_all(b"{\"return\": {}}\r\n").unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        q.execute("stop", None).unwrap();
        let e = q.execute("cont", None).unwrap_err();
        assert!(e.to_string().contains("QEMU refused cont: no"), "{e}");
        let file = dir.path().join("state");
        let f = std::fs::File::create(&file).unwrap();
        use std::os::fd::AsFd;
        q.pass_fd("state", f.as_fd()).unwrap();
        server.join().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"through the fd");
    }
}

//! Running commands and watching processes.

use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// Runs `cmd` to completion and asserts it succeeded, showing the command
/// and what it printed if not.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts a finished command succeeded, showing what it printed if not;
/// returns its stdout.
#[track_caller]
pub fn ok(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "command failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout.clone()
}

/// The exit code, -1 when killed by a signal.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Sends `sig` (a name such as `TERM`) to `pid` with kill(1).
pub fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Waits for a child to exit; returns its status, or None after `within`
/// (the child is left running).
pub fn wait_child(c: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Waits for a child to exit; returns its code, or None (having killed
/// it) after `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral
/// range: a port from that range (what binding port 0 gives) can be taken
/// by any outgoing connection's source port between this call and the
/// server's own bind (CI saw RabbitMQ's distribution port go that way).
/// Each process walks the range from a random start, so that the test
/// binaries running side by side, and the tests of one binary, are not
/// handed the same port.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = ephemeral_low().min(u32::from(u16::MAX));
    if high <= LOW + 1_000 {
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = high - LOW;
    let start = *START.get_or_init(|| {
        let r = RandomState::new().hash_one(std::process::id());
        u32::try_from(r % u64::from(span)).unwrap_or(0)
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % span).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port between {LOW} and {high}");
}

/// The first port of the kernel's ephemeral range (32768 by default).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Seconds since the epoch.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Where `needle` appears in the readable mappings of process `pid`: one
/// line per hit, with the mapping (as /proc/PID/maps shows it) and the
/// offset in it.
pub fn memory_hits(pid: u32, needle: &[u8]) -> Vec<String> {
    hits_where(pid, needle.len(), |w| w == needle)
}

/// Where the bytes whose complements are `inverted` appear in the
/// readable mappings of process `pid`, as [`memory_hits`]: a process can
/// scan itself for a secret it keeps only inverted.
pub fn memory_hits_inverted(pid: u32, inverted: &[u8]) -> Vec<String> {
    hits_where(pid, inverted.len(), |w| {
        w.iter().zip(inverted).all(|(a, b)| *a == !*b)
    })
}

fn hits_where(pid: u32, len: usize, found: impl Fn(&[u8]) -> bool) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut hits = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let range = parts.next().unwrap();
        let perms = parts.next().unwrap();
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        for (at, _) in buf.windows(len).enumerate().filter(|(_, w)| found(w)) {
            // What surrounds it tells which buffer holds it.
            let around = &buf[at.saturating_sub(96)..(at + len + 96).min(buf.len())];
            let text: String = around
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        char::from(b)
                    } else {
                        '.'
                    }
                })
                .collect();
            hits.push(format!("{line} +{at:#x}: {text}"));
        }
    }
    hits
}

/// Whether `needle` appears in any readable mapping of process `pid`.
pub fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    !memory_hits(pid, needle).is_empty()
}

#[cfg(test)]
mod tests {
    use super::{ephemeral_low, free_port};

    /// Ports handed out are distinct, bindable, and below the ephemeral
    /// range that outgoing connections take their source ports from.
    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
        for p in &ports {
            assert!(u32::from(*p) < ephemeral_low(), "{p}");
            std::net::TcpListener::bind(("127.0.0.1", *p)).unwrap();
        }
    }
}

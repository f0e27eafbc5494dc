//! Writing to a helper's standard input without ever blocking past a
//! deadline: a helper that stops reading (taken over, or stuck) must not
//! hold the daemon's actor, and the lock and the close with it.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

/// Makes our end of a pipe non-blocking (the other end is another open
/// file description, untouched).
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller holds open; no memory is
    // passed.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes all of `line` to a non-blocking pipe, waiting for room until
/// `deadline`: `TimedOut` past it.
pub fn write_within(
    pipe: &mut (impl Write + AsFd),
    line: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut at = 0;
    while at < line.len() {
        match pipe.write(&line[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                // Rounded up: a wait of 0 ms would spin.
                let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
                let mut p = libc::pollfd {
                    fd: pipe.as_fd().as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd that we own, for the length given.
                if unsafe { libc::poll(&mut p, 1, ms) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A helper that stops reading its commands holds the daemon no longer
    /// than the command's deadline: the write gives up with `TimedOut`
    /// (before, a blocking write waited for ever on a full pipe, on the
    /// daemon's actor). One that reads gets the whole line.
    #[test]
    fn a_write_to_a_pipe_nobody_reads_gives_up_at_its_deadline() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        set_nonblocking(&writer).unwrap();
        let line = vec![b'x'; 1 << 20];
        let t = Instant::now();
        let e = write_within(&mut writer, &line, t + Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        drop((reader, writer));
        // With a reader, it all goes through.
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        set_nonblocking(&writer).unwrap();
        let got = std::thread::spawn(move || {
            let mut v = Vec::new();
            io::Read::read_to_end(&mut reader, &mut v).unwrap();
            v
        });
        write_within(&mut writer, &line, Instant::now() + Duration::from_secs(60)).unwrap();
        drop(writer);
        assert_eq!(got.join().unwrap(), line);
    }
}

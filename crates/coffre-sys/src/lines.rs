//! Lines from a helper's standard input that may carry a secret (a key,
//! a TLS private key): read by hand, not through std's buffered `Stdin`
//! (its buffer would keep them), into buffers wiped when dropped and
//! never left behind by a reallocation.

use std::io::{self, Read};
use zeroize::{Zeroize, Zeroizing};

/// The next line of `src` (without its newline), or `None` at its end.
/// `pending` keeps what was read past the line, for the next call; a
/// line longer than `max` bytes is an error.
pub fn next_secret_line(
    src: &mut impl Read,
    pending: &mut Zeroizing<Vec<u8>>,
    max: usize,
) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    loop {
        if let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let line = Zeroizing::new(pending[..at].to_vec());
            let rest = Zeroizing::new(pending[at + 1..].to_vec());
            pending.zeroize();
            pending.clear();
            pending.extend_from_slice(&rest);
            return Ok(Some(line));
        }
        let mut buf = Zeroizing::new([0u8; 4096]);
        let n = src.read(&mut buf[..])?;
        if n == 0 {
            return Ok(None);
        }
        if pending.len() + n > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a command line of over {max} bytes"),
            ));
        }
        // Grown by hand: a reallocation would leave the old copy behind.
        let mut grown = Zeroizing::new(Vec::with_capacity((pending.len() + n) * 2));
        grown.extend_from_slice(pending);
        grown.extend_from_slice(&buf[..n]);
        *pending = grown;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_whatever_the_reads_bring() {
        let mut src: &[u8] = b"{\"cmd\":\"close\"}\n{\"cmd\":\"st";
        let mut pending = Zeroizing::new(Vec::new());
        let first = next_secret_line(&mut src, &mut pending, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(&first[..], b"{\"cmd\":\"close\"}");
        assert!(
            next_secret_line(&mut src, &mut pending, 1024)
                .unwrap()
                .is_none()
        );
        let mut more: &[u8] = b"ats\"}\n";
        let second = next_secret_line(&mut more, &mut pending, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(&second[..], b"{\"cmd\":\"stats\"}");
    }

    #[test]
    fn a_line_too_long_is_an_error() {
        let mut src: &[u8] = &[b'x'; 5000];
        let mut pending = Zeroizing::new(Vec::new());
        assert!(next_secret_line(&mut src, &mut pending, 4096).is_err());
    }
}

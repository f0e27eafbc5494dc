//! XDR (RFC 4506): the big-endian, 4-byte-aligned encoding of every ONC
//! RPC message. The reader never allocates more than the bytes it was
//! given and refuses lengths beyond the caller's limit, so a guest cannot
//! make the server reserve memory it did not send.

/// What a malformed message gets: the call is answered `GARBAGE_ARGS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    /// The message ends before the field does.
    #[error("message too short")]
    Short,
    /// A length beyond what the field allows.
    #[error("length {0} beyond the limit")]
    TooLong(u32),
    /// A value outside its enumeration (e.g. a boolean of 2).
    #[error("value {0} outside its type")]
    BadValue(u32),
}

/// Reads XDR items from a byte slice, front to back.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// What is left unread.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        if self.buf.len() < n {
            return Err(XdrError::Short);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// An unsigned 32-bit integer.
    pub fn u32(&mut self) -> Result<u32, XdrError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An unsigned 64-bit integer (hyper).
    pub fn u64(&mut self) -> Result<u64, XdrError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    /// A boolean: 0 or 1, nothing else.
    pub fn bool(&mut self) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(XdrError::BadValue(v)),
        }
    }

    /// `n` bytes of fixed-length opaque data (and their padding).
    pub fn fixed(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        let b = self.take(n)?;
        self.take(pad(n))?;
        Ok(b)
    }

    /// Variable-length opaque data of at most `max` bytes.
    pub fn opaque(&mut self, max: u32) -> Result<&'a [u8], XdrError> {
        let n = self.u32()?;
        if n > max {
            return Err(XdrError::TooLong(n));
        }
        self.fixed(n as usize)
    }
}

/// Padding after `n` bytes of opaque data.
pub fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Appends XDR items to a buffer.
#[derive(Default)]
pub struct Writer {
    /// The encoded bytes so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// An empty writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    /// An unsigned 32-bit integer.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// An unsigned 64-bit integer.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A boolean.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Fixed-length opaque data.
    pub fn fixed(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self.buf.extend_from_slice(&[0; 3][..pad(b.len())]);
        self
    }

    /// Variable-length opaque data (or a string).
    pub fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.fixed(b)
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let mut w = Writer::default();
        w.u32(7)
            .u64(1 << 40)
            .bool(true)
            .opaque(b"abcde")
            .fixed(b"xy");
        assert_eq!(w.len(), 4 + 8 + 4 + 4 + 8 + 4);
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u32(), Ok(7));
        assert_eq!(r.u64(), Ok(1 << 40));
        assert_eq!(r.bool(), Ok(true));
        assert_eq!(r.opaque(5), Ok(&b"abcde"[..]));
        assert_eq!(r.fixed(2), Ok(&b"xy"[..]));
        assert!(r.rest().is_empty());
    }

    #[test]
    fn refuses_what_is_not_there() {
        let mut r = Reader::new(&[0, 0, 0, 9, 1, 2]);
        assert_eq!(r.opaque(100), Err(XdrError::Short));
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.opaque(64), Err(XdrError::TooLong(u32::MAX)));
        let mut r = Reader::new(&[0, 0, 0, 2]);
        assert_eq!(r.bool(), Err(XdrError::BadValue(2)));
    }
}

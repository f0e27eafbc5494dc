//! ONC RPC version 2 (RFC 5531) over TCP: record marking, the call
//! header, and the reply headers this server sends. Credentials are read
//! and ignored: an export acts as its configured user whatever the guest
//! claims to be.

use crate::xdr::{Reader, Writer, XdrError};
use std::io::{self, Read};

/// The largest record (call) a client may send: a 1 MiB WRITE and its
/// headers. A fragment header announcing more is refused before any
/// allocation.
pub const MAX_RECORD: usize = (1 << 20) + 64 * 1024;

/// The portmapper (rpcbind version 2).
pub const PROG_PORTMAP: u32 = 100_000;
/// NFS.
pub const PROG_NFS: u32 = 100_003;
/// The MOUNT protocol.
pub const PROG_MOUNT: u32 = 100_005;

/// One call's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Transaction id, echoed in the reply.
    pub xid: u32,
    /// Program number.
    pub prog: u32,
    /// Program version.
    pub vers: u32,
    /// Procedure number.
    pub proc_: u32,
}

/// Why a record is not a call we answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// Not even an RPC header: the connection is dropped.
    #[error("malformed RPC header: {0}")]
    Header(#[from] XdrError),
    /// A reply, or another message type: ignored.
    #[error("not a call (message type {0})")]
    NotCall(u32),
    /// RPC version other than 2: answered RPC_MISMATCH.
    #[error("RPC version {1} (xid {0})")]
    Version(u32, u32),
}

/// Splits a record into the call header and its arguments.
pub fn parse_call(record: &[u8]) -> Result<(Call, &[u8]), RpcError> {
    let mut r = Reader::new(record);
    let xid = r.u32()?;
    let kind = r.u32()?;
    if kind != 0 {
        return Err(RpcError::NotCall(kind));
    }
    let rpcvers = r.u32()?;
    if rpcvers != 2 {
        return Err(RpcError::Version(xid, rpcvers));
    }
    let prog = r.u32()?;
    let vers = r.u32()?;
    let proc_ = r.u32()?;
    // Credential and verifier: flavour and at most 400 bytes each.
    for _ in 0..2 {
        r.u32()?;
        r.opaque(400)?;
    }
    Ok((
        Call {
            xid,
            prog,
            vers,
            proc_,
        },
        r.rest(),
    ))
}

/// How an accepted call went (`accept_stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The procedure ran; its results follow.
    Success,
    /// No such program here.
    ProgUnavail,
    /// The program, in versions `low..=high` only.
    ProgMismatch(u32, u32),
    /// No such procedure.
    ProcUnavail,
    /// The arguments could not be decoded.
    GarbageArgs,
    /// The server failed.
    SystemErr,
}

/// A reply's header for an accepted call; the results are appended to
/// the returned writer. Room is kept in front for the record mark.
pub fn accepted(xid: u32, how: Accept) -> Writer {
    let mut w = Writer::with_capacity(128);
    w.u32(0); // record mark, filled by `frame`
    w.u32(xid).u32(1).u32(0); // REPLY, MSG_ACCEPTED
    w.u32(0).u32(0); // verifier AUTH_NONE, empty
    match how {
        Accept::Success => w.u32(0),
        Accept::ProgUnavail => w.u32(1),
        Accept::ProgMismatch(lo, hi) => w.u32(2).u32(lo).u32(hi),
        Accept::ProcUnavail => w.u32(3),
        Accept::GarbageArgs => w.u32(4),
        Accept::SystemErr => w.u32(5),
    };
    w
}

/// The reply to a call of another RPC version (MSG_DENIED, RPC_MISMATCH).
pub fn rpc_mismatch(xid: u32) -> Writer {
    let mut w = Writer::default();
    w.u32(0);
    w.u32(xid).u32(1).u32(1).u32(0).u32(2).u32(2);
    w
}

/// Fills in the record mark of a reply built by [`accepted`]: one last
/// fragment.
pub fn frame(mut w: Writer) -> Vec<u8> {
    let n = u32::try_from(w.buf.len() - 4).unwrap_or(0) | 0x8000_0000;
    w.buf[..4].copy_from_slice(&n.to_be_bytes());
    w.buf
}

/// A call as a client frames it: one record, an AUTH_UNIX credential of
/// uid 0 (this server ignores it), no verifier. For tests, benchmarks and
/// tools that speak to the server without a kernel client.
pub fn call_record(xid: u32, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    let mut cred = Writer::default();
    cred.u32(0).opaque(b"coffre").u32(0).u32(0).u32(0);
    let mut w = Writer::with_capacity(64 + args.len());
    w.u32(0)
        .u32(xid)
        .u32(0)
        .u32(2)
        .u32(prog)
        .u32(vers)
        .u32(proc_);
    w.u32(1).opaque(&cred.buf).u32(0).u32(0);
    w.buf.extend_from_slice(args);
    frame(w)
}

/// The transaction id and the results of a reply to an accepted call
/// that succeeded; `None` for any other message.
pub fn reply_results(record: &[u8]) -> Option<(u32, &[u8])> {
    let mut r = Reader::new(record);
    let xid = r.u32().ok()?;
    // REPLY, MSG_ACCEPTED, a verifier, SUCCESS.
    if r.u32().ok()? != 1 || r.u32().ok()? != 0 {
        return None;
    }
    r.u32().ok()?;
    r.opaque(400).ok()?;
    (r.u32().ok()? == 0).then(|| (xid, r.rest()))
}

/// Reads one record (all its fragments) into `out`. `Ok(false)` at a
/// clean end of stream before a record starts. A record beyond `max`
/// bytes is an error: the connection must go.
pub fn read_record(src: &mut impl Read, out: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    out.clear();
    loop {
        let mut mark = [0u8; 4];
        if let Err(e) = src.read_exact(&mut mark) {
            if e.kind() == io::ErrorKind::UnexpectedEof && out.is_empty() {
                return Ok(false);
            }
            return Err(e);
        }
        let mark = u32::from_be_bytes(mark);
        let len = (mark & 0x7fff_ffff) as usize;
        if out.len() + len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an RPC record of over {max} bytes"),
            ));
        }
        // Grown as the bytes arrive, not as the mark announces them: a
        // mark alone commits no memory.
        let start = out.len();
        let got = src.by_ref().take(len as u64).read_to_end(out)?;
        if got != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended inside a record",
            ));
        }
        debug_assert_eq!(out.len(), start + len);
        if mark & 0x8000_0000 != 0 {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(0x1234).u32(0).u32(2).u32(prog).u32(vers).u32(proc_);
        // AUTH_UNIX credential, AUTH_NONE verifier.
        let mut cred = Writer::default();
        cred.u32(1).opaque(b"guest").u32(1000).u32(1000).u32(0);
        w.u32(1).opaque(&cred.buf).u32(0).u32(0);
        w.buf.extend_from_slice(args);
        w.buf
    }

    #[test]
    fn parses_a_call_and_its_arguments() {
        let rec = call(PROG_NFS, 3, 1, &[0, 0, 0, 5]);
        let (c, args) = parse_call(&rec).unwrap();
        assert_eq!(
            c,
            Call {
                xid: 0x1234,
                prog: PROG_NFS,
                vers: 3,
                proc_: 1
            }
        );
        assert_eq!(args, &[0, 0, 0, 5]);
    }

    #[test]
    fn refuses_other_versions_and_replies() {
        let mut rec = call(PROG_NFS, 3, 1, &[]);
        rec[11] = 3;
        assert_eq!(parse_call(&rec), Err(RpcError::Version(0x1234, 3)));
        rec[7] = 1;
        assert_eq!(parse_call(&rec), Err(RpcError::NotCall(1)));
        assert!(matches!(
            parse_call(&call(PROG_NFS, 3, 1, &[])[..10]),
            Err(RpcError::Header(XdrError::Short))
        ));
    }

    #[test]
    fn records_are_joined_from_fragments_and_bounded() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&3u32.to_be_bytes());
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&(0x8000_0002u32).to_be_bytes());
        wire.extend_from_slice(b"de");
        let mut out = Vec::new();
        let mut src = &wire[..];
        assert!(read_record(&mut src, &mut out, 100).unwrap());
        assert_eq!(out, b"abcde");
        assert!(!read_record(&mut src, &mut out, 100).unwrap());
        // A fragment announcing more than allowed is refused unread.
        let big = (0x8000_0000u32 | 0x7fff_ffff).to_be_bytes();
        assert!(read_record(&mut &big[..], &mut out, MAX_RECORD).is_err());
    }

    #[test]
    fn a_client_s_call_and_the_server_s_reply_read_back() {
        let rec = call_record(5, PROG_NFS, 3, 1, &[0, 0, 0, 9]);
        let (c, args) = parse_call(&rec[4..]).unwrap();
        assert_eq!((c.xid, c.prog, c.vers, c.proc_), (5, PROG_NFS, 3, 1));
        assert_eq!(args, &[0, 0, 0, 9]);
        let mut w = accepted(5, Accept::Success);
        w.u32(70);
        let reply = frame(w);
        assert_eq!(reply_results(&reply[4..]), Some((5, &[0, 0, 0, 70][..])));
        assert_eq!(
            reply_results(&frame(accepted(5, Accept::GarbageArgs))[4..]),
            None
        );
    }

    #[test]
    fn replies_carry_their_record_mark() {
        let mut w = accepted(9, Accept::ProgMismatch(3, 3));
        w.u32(0);
        let b = frame(w);
        assert_eq!(
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            0x8000_0000 | u32::try_from(b.len() - 4).unwrap()
        );
        assert_eq!(&b[4..8], &9u32.to_be_bytes());
    }
}

//! The NBD protocol's numbers, shared by our server (coffre-data) and our
//! client (coffre-remote).
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>

/// The server's first eight bytes: `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// The newstyle handshake's and each option request's magic: `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Each option reply's magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Each transmission request's magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Each simple reply's magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks the fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after the export's flags.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Option: an export by name, the old way (no reply on success).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client gives up.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: what an export is, without choosing it.
pub const OPT_INFO: u32 = 6;
/// Option: choose an export and start transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: an export's name (to `OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: a piece of information about the export.
pub const REP_INFO: u32 = 3;
/// Option replies with this bit are errors.
pub const REP_FLAG_ERROR: u32 = 0x8000_0000;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option error: refused by the server's policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Option error: malformed.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// Information: the export's size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: the export's block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags are meaningful.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: flush is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: trim is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: write-zeroes is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see one another's writes.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush (every write acknowledged before is durable).
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Reply error: I/O error.
pub const EIO: u32 = 5;
/// Reply error: invalid request.
pub const EINVAL: u32 = 22;
/// Reply error: no space.
pub const ENOSPC: u32 = 28;
/// Reply error: out of range.
pub const EOVERFLOW: u32 = 75;

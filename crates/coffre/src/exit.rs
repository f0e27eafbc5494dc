//! Exit codes, stable for scripts (documented in `coffre --help`).

/// The command did what it was asked.
pub const OK: u8 = 0;
/// Any failure without a more specific code.
pub const FAILURE: u8 = 1;
/// The passphrase opens no keyslot (cryptsetup uses 2 as well).
pub const WRONG_PASSPHRASE: u8 = 2;
/// The volume is held by another process.
pub const BUSY: u8 = 3;
/// The header is damaged, missing, or not LUKS2.
pub const BAD_HEADER: u8 = 4;
/// The header uses a LUKS2 feature or value coffre does not implement
/// (cryptsetup may read it; coffre leaves it untouched).
pub const UNSUPPORTED: u8 = 5;
/// The command line is wrong (EX_USAGE).
pub const USAGE: u8 = 64;

/// Maps an error chain to an exit code.
pub fn code_for(err: &anyhow::Error) -> u8 {
    use coffre_luks2::Error as L;
    use coffre_storage::Error as S;
    fn luks2(e: &L) -> u8 {
        match e {
            L::WrongPassphrase | L::WrongVolumeKey => WRONG_PASSPHRASE,
            L::NotLuks2(_) | L::Corrupt(_) | L::NoValidHeader { .. } => BAD_HEADER,
            L::Unsupported(_) => UNSUPPORTED,
            _ => FAILURE,
        }
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<S>() {
            match e {
                S::Busy(_) => return BUSY,
                S::NeedsRepair { .. } => return BAD_HEADER,
                S::Luks2(l) => return luks2(l),
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<L>() {
            return luks2(e);
        }
    }
    FAILURE
}

/// The vault is locked.
pub const LOCKED: u8 = 6;
/// Wrong, missing or replayed TOTP code.
pub const WRONG_TOTP: u8 = 7;
/// This identity is not (or no longer) a member of the vault.
pub const NOT_A_MEMBER: u8 = 8;
/// Too many failed attempts; wait.
pub const THROTTLED: u8 = 9;
/// Not allowed (needs a superuser, not your task...).
pub const NOT_PERMITTED: u8 = 10;
/// The daemon cannot be reached.
pub const UNREACHABLE: u8 = 11;
/// The session is gone (lock, removal, grace period).
pub const NO_SESSION: u8 = 12;
/// The vault's audit log was rolled back or rewritten: it shows an older
/// signed head than this machine saw, a history that does not contain
/// it, or a head signed by another key.
pub const AUDIT_ROLLED_BACK: u8 = 13;

/// `coffre audit witness`: records never reached the witness (a gap in
/// what it holds; see docs/bus.md).
pub const WITNESS_GAP: u8 = 16;
/// `coffre audit witness`: a record whose hash or signature does not hold.
pub const WITNESS_FORGED: u8 = 17;

/// `coffre doctor`: the worst finding is a warning.
pub const DOCTOR_WARN: u8 = 14;
/// `coffre doctor`: a check failed.
pub const DOCTOR_FAIL: u8 = 15;

/// Maps a daemon error name (`"wrong_password"`...) to an exit code. The
/// match is over every [`ErrorCode`]: a code added to the API does not
/// compile until it is given its exit code here.
pub fn code_for_refusal(error: &str) -> u8 {
    use coffre_api::ErrorCode as E;
    match E::parse(error) {
        E::WrongPassword => WRONG_PASSPHRASE,
        E::Locked => LOCKED,
        E::WrongTotp | E::TotpReplayed => WRONG_TOTP,
        E::UnknownCertificate | E::UnknownMember => NOT_A_MEMBER,
        E::Throttled => THROTTLED,
        E::NotPermitted => NOT_PERMITTED,
        E::NoSession => NO_SESSION,
        E::NoTask
        | E::Invalid
        | E::Busy
        | E::InvalidInvitation
        | E::AuditUnavailable
        | E::Audit
        | E::AuditTampered
        | E::Closed
        | E::OpenFailed
        | E::NoWorkload
        | E::NoGateway
        | E::NotFound
        | E::Stopping
        | E::Failure
        | E::Unknown => FAILURE,
    }
}

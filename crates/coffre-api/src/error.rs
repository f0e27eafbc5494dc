//! The error codes of the daemon's answers (`{"ok": false, "error":
//! CODE, "message": ...}`).

use coffre_vault::Refusal;
use serde::{Deserialize, Serialize};

/// Why the daemon said no. Serialised as its snake_case name, which is
/// stable: scripts and older clients match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The vault is locked.
    Locked,
    /// No such member.
    UnknownMember,
    /// The password opens no keyslot of that member.
    WrongPassword,
    /// Wrong or missing TOTP code.
    WrongTotp,
    /// That TOTP code was already used.
    TotpReplayed,
    /// Too many failed attempts: wait.
    Throttled,
    /// Not allowed for this member (needs a superuser, not theirs...).
    NotPermitted,
    /// The session is gone (or was never this member's).
    NoSession,
    /// No such task.
    NoTask,
    /// The command or one of its values is wrong.
    Invalid,
    /// Something else is under way; try again.
    Busy,
    /// The client certificate is not a member's.
    UnknownCertificate,
    /// The invitation is wrong, used, expired or cancelled.
    InvalidInvitation,
    /// The audit log cannot be written: nothing that changes the vault is
    /// done until it can.
    AuditUnavailable,
    /// The audit log cannot be read.
    Audit,
    /// The audit log does not verify.
    AuditTampered,
    /// The vault is closed and the command needs it open.
    Closed,
    /// The vault could not open.
    OpenFailed,
    /// No workload by that name.
    NoWorkload,
    /// The vault has no VPN gateway.
    NoGateway,
    /// No such endpoint.
    NotFound,
    /// The daemon is stopping.
    Stopping,
    /// The daemon failed to do it.
    Failure,
    /// A code this client does not know (a newer daemon's).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The stable name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Locked => "locked",
            ErrorCode::UnknownMember => "unknown_member",
            ErrorCode::WrongPassword => "wrong_password",
            ErrorCode::WrongTotp => "wrong_totp",
            ErrorCode::TotpReplayed => "totp_replayed",
            ErrorCode::Throttled => "throttled",
            ErrorCode::NotPermitted => "not_permitted",
            ErrorCode::NoSession => "no_session",
            ErrorCode::NoTask => "no_task",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Busy => "busy",
            ErrorCode::UnknownCertificate => "unknown_certificate",
            ErrorCode::InvalidInvitation => "invalid_invitation",
            ErrorCode::AuditUnavailable => "audit_unavailable",
            ErrorCode::Audit => "audit",
            ErrorCode::AuditTampered => "audit_tampered",
            ErrorCode::Closed => "closed",
            ErrorCode::OpenFailed => "open_failed",
            ErrorCode::NoWorkload => "no_workload",
            ErrorCode::NoGateway => "no_gateway",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Stopping => "stopping",
            ErrorCode::Failure => "failure",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The code named `name` on the wire ([`ErrorCode::Unknown`] if none).
    pub fn parse(name: &str) -> ErrorCode {
        ALL.iter()
            .copied()
            .find(|c| c.as_str() == name)
            .unwrap_or(ErrorCode::Unknown)
    }

    /// The HTTP status that goes with it by default.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Locked | ErrorCode::Busy | ErrorCode::Closed => 409,
            ErrorCode::Throttled => 429,
            ErrorCode::Invalid | ErrorCode::NoTask => 400,
            ErrorCode::NoSession | ErrorCode::NoWorkload | ErrorCode::NoGateway => 404,
            ErrorCode::NotFound => 404,
            ErrorCode::AuditUnavailable | ErrorCode::OpenFailed | ErrorCode::Stopping => 503,
            ErrorCode::Audit | ErrorCode::Failure | ErrorCode::Unknown => 500,
            ErrorCode::AuditTampered => 200,
            ErrorCode::UnknownMember
            | ErrorCode::WrongPassword
            | ErrorCode::WrongTotp
            | ErrorCode::TotpReplayed
            | ErrorCode::NotPermitted
            | ErrorCode::UnknownCertificate
            | ErrorCode::InvalidInvitation => 403,
        }
    }
}

/// Every code, for [`ErrorCode::parse`] and the tests.
const ALL: [ErrorCode; 24] = [
    ErrorCode::Locked,
    ErrorCode::UnknownMember,
    ErrorCode::WrongPassword,
    ErrorCode::WrongTotp,
    ErrorCode::TotpReplayed,
    ErrorCode::Throttled,
    ErrorCode::NotPermitted,
    ErrorCode::NoSession,
    ErrorCode::NoTask,
    ErrorCode::Invalid,
    ErrorCode::Busy,
    ErrorCode::UnknownCertificate,
    ErrorCode::InvalidInvitation,
    ErrorCode::AuditUnavailable,
    ErrorCode::Audit,
    ErrorCode::AuditTampered,
    ErrorCode::Closed,
    ErrorCode::OpenFailed,
    ErrorCode::NoWorkload,
    ErrorCode::NoGateway,
    ErrorCode::NotFound,
    ErrorCode::Stopping,
    ErrorCode::Failure,
    ErrorCode::Unknown,
];

impl From<Refusal> for ErrorCode {
    /// The core's refusals, one code each (a new refusal does not compile
    /// until it has one).
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Locked => ErrorCode::Locked,
            Refusal::UnknownMember => ErrorCode::UnknownMember,
            Refusal::WrongPassword => ErrorCode::WrongPassword,
            Refusal::WrongTotp => ErrorCode::WrongTotp,
            Refusal::TotpReplayed => ErrorCode::TotpReplayed,
            Refusal::Throttled => ErrorCode::Throttled,
            Refusal::NotPermitted => ErrorCode::NotPermitted,
            Refusal::NoSession => ErrorCode::NoSession,
            Refusal::NoTask => ErrorCode::NoTask,
            Refusal::Invalid => ErrorCode::Invalid,
            Refusal::Busy => ErrorCode::Busy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_serde_names_and_parse_back() {
        for c in ALL {
            let json = serde_json::to_value(c).unwrap();
            assert_eq!(json, c.as_str(), "{c:?}");
            assert_eq!(ErrorCode::parse(c.as_str()), c);
            assert_eq!(serde_json::from_value::<ErrorCode>(json).unwrap(), c);
        }
        assert_eq!(ErrorCode::parse("from_a_newer_daemon"), ErrorCode::Unknown);
    }

    #[test]
    fn the_core_refusals_keep_their_names() {
        for r in [
            Refusal::Locked,
            Refusal::UnknownMember,
            Refusal::WrongPassword,
            Refusal::WrongTotp,
            Refusal::TotpReplayed,
            Refusal::Throttled,
            Refusal::NotPermitted,
            Refusal::NoSession,
            Refusal::NoTask,
            Refusal::Invalid,
            Refusal::Busy,
        ] {
            let core_name = serde_json::to_value(r).unwrap();
            assert_eq!(core_name, ErrorCode::from(r).as_str(), "{r:?}");
        }
    }
}

//! The JSON command model, shared by every transport (HTTPS now, a message
//! bus later). Field names follow the original design where it had them
//! (`command`, `task_name`, `task_user`, `task_expire`).

use coffre_vault::Mode;
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroize;

/// A password inside a command: wiped on drop, never printed.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct ApiSecret(pub String);

impl fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiSecret([REDACTED])")
    }
}

impl Drop for ApiSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A command, as sent by clients.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiCommand {
    /// State, sessions, tasks (certificate only).
    Status,
    /// Enter the vault.
    Enter {
        /// The member's password (opens their keyslot).
        password: ApiSecret,
        /// Current TOTP code.
        totp: String,
    },
    /// End a session.
    Leave {
        /// Session id from `enter`.
        session: u64,
    },
    /// Keep a session alive.
    Heartbeat {
        /// Session id.
        session: u64,
    },
    /// Schedule a task that keeps the vault open.
    TaskAdd {
        /// The requester's session.
        session: u64,
        /// Free text.
        task_name: String,
        /// Must be the authenticated member if given.
        #[serde(default)]
        task_user: Option<String>,
        /// Duration in seconds from now.
        task_expire: u64,
        /// Wait for this workload's job (the task ends when it does).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<String>,
    },
    /// Tasks alive.
    TaskList,
    /// Cancel a task.
    TaskCancel {
        /// The requester's session.
        session: u64,
        /// Task id.
        task_id: u64,
    },
    /// Lock the vault (superuser).
    Lock {
        /// The reason, kept with the lock and in the audit log.
        reason: String,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Approve an unlock (superuser).
    Unlock {
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Switch mode (superuser).
    Mode {
        /// fast or safe.
        mode: Mode,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Set the unlock quorum (superuser).
    Quorum {
        /// Distinct superusers needed.
        quorum: u32,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Members (certificate only).
    MemberList,
    /// Remove a member (superuser).
    MemberRemove {
        /// The member to remove.
        name: String,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Make a member a superuser, or a superuser a member (superuser; with
    /// an unlock quorum above 1, a proposal the quorum approves).
    MemberRole {
        /// The member.
        name: String,
        /// Their new role.
        role: coffre_vault::Role,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Invite a member (superuser).
    Invite {
        /// New member's name.
        name: String,
        /// Their role.
        role: coffre_vault::Role,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Join with an invitation (the only command accepted without a client
    /// certificate).
    Join {
        /// The invited name.
        name: String,
        /// The invitation's one-time code.
        code: ApiSecret,
        /// Certificate request (PEM) for the key made on the joiner's machine.
        csr: String,
        /// The new member's password.
        password: ApiSecret,
    },
    /// Change one's own password.
    Passwd {
        /// Current password.
        password: ApiSecret,
        /// New password.
        new_password: ApiSecret,
        /// The caller's current TOTP code (6 digits; each step is accepted once).
        totp: String,
    },
    /// Approve a pending proposal (superuser, password and TOTP).
    Approve {
        /// The proposal's id.
        id: String,
        /// The superuser's password.
        password: ApiSecret,
        /// A fresh TOTP code.
        totp: String,
    },
    /// Pending proposals.
    ProposalList,
    /// Cancel a pending invitation (superuser).
    InviteCancel {
        /// The invited name.
        name: String,
        /// The superuser's password.
        password: ApiSecret,
        /// A fresh TOTP code.
        totp: String,
    },
    /// Change one's own account in the vault's directory (SSH keys, the
    /// workload password) with password and TOTP.
    Account {
        /// What.
        change: coffre_vault::AccountChange,
        /// The caller's vault password: it must open their keyslot.
        password: ApiSecret,
        /// The caller's current TOTP code.
        totp: String,
    },
    /// Audit records (certificate only).
    AuditShow {
        /// Only records after this sequence number.
        #[serde(default)]
        since: Option<u64>,
    },
    /// Verify the audit log (certificate only).
    AuditVerify,
    /// The public parts of a VPN profile: CA, tls-crypt key, where to
    /// connect (certificate only; the member's own key never leaves their
    /// machine).
    GatewayProfile,
    /// The end of a workload's log.
    WorkloadLogs {
        /// The reader's live session (logs may hold the team's data).
        session: u64,
        /// The workload.
        name: String,
        /// How many bytes of the end of the log (default 64 KiB).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_task_add_shape() {
        let c: ApiCommand = serde_json::from_str(
            r#"{"command": "task_add", "session": 3, "task_name": "nightly build", "task_user": "alice", "task_expire": 3600}"#,
        )
        .unwrap();
        assert!(matches!(
            c,
            ApiCommand::TaskAdd {
                task_expire: 3600,
                ..
            }
        ));
    }

    #[test]
    fn passwords_never_debug_print() {
        let c: ApiCommand =
            serde_json::from_str(r#"{"command":"enter","password":"hunter2","totp":"123456"}"#)
                .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_commands_and_fields_are_refused() {
        assert!(serde_json::from_str::<ApiCommand>(r#"{"command":"format_disk"}"#).is_err());
        assert!(
            serde_json::from_str::<ApiCommand>(r#"{"command":"leave","session":1,"x":1}"#).is_err()
        );
        assert!(
            serde_json::from_str::<ApiCommand>(r#"{"command":"leave","session":"1"}"#).is_err()
        );
    }
}

//! Commands over the bus: what a scheduler (a CI system starting the
//! nightly build, say) sends the vault, in the original design's JSON
//! (`task_add` with `task_name`, `task_user`, `task_expire`), inside a
//! signed envelope of kind [`KIND`].
//!
//! Commands wait in the durable queue [`VAULT_QUEUE`] until the vault has
//! applied them: the vault acknowledges a command to the broker only after
//! the core decided it and its nonce is on disk, so a crash never loses an
//! accepted command and a redelivery is known by its nonce. What the vault
//! refuses before deciding (bad signature, unknown sender, wrong broker
//! user, replay, stale, another vault) is rejected into the dead-letter
//! queue [`DEAD_QUEUE`] and audited. Answers go to the sender's reply
//! queue ([`reply_queue`]), signed by the vault, as envelopes of kind
//! [`REPLY_KIND`].

use serde::{Deserialize, Serialize};

/// The topic exchange commands and replies travel through.
pub const COMMANDS: &str = "coffre.cmd";
/// The dead-letter exchange of refused commands.
pub const DEAD: &str = "coffre.dead";
/// The vault's durable queue of commands.
pub const VAULT_QUEUE: &str = "coffre.cmd.vault";
/// Where refused commands wait for an operator.
pub const DEAD_QUEUE: &str = "coffre.cmd.dead";
/// The routing key of commands to the vault.
pub const TO_VAULT: &str = "vault";
/// The envelope kind of a command.
pub const KIND: &str = "command";
/// The envelope kind of the vault's answer.
pub const REPLY_KIND: &str = "reply";
/// How long a command's envelope counts, seconds (a command older than
/// this is refused as stale).
pub const LIFE_S: u64 = 300;

/// The routing key of replies to component `name`.
pub fn to_reply(name: &str) -> String {
    format!("reply.{name}")
}

/// Component `name`'s durable reply queue.
pub fn reply_queue(name: &str) -> String {
    format!("coffre.reply.{name}")
}

/// A command, in the original design's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum BusCommand {
    /// Keep the open vault open for a member while a job runs.
    TaskAdd {
        /// Free text (1 to 128 printable characters).
        task_name: String,
        /// The member the task is for (one the scheduler may act for).
        task_user: String,
        /// Seconds from now.
        task_expire: u64,
    },
    /// Cancel a task this scheduler added.
    TaskCancel {
        /// The task's number (from `task_add`'s answer).
        task_id: u64,
        /// The member it was for.
        task_user: String,
    },
}

/// What a command's envelope must be beyond [`crate::envelope::open`]'s
/// checks: of kind [`KIND`], living [`LIFE_S`] at most. Says why not
/// (without the body).
pub fn check_header(h: &crate::envelope::Header) -> Result<(), String> {
    if h.kind != KIND {
        return Err(format!(
            "from {}: a {:?} message is not a command",
            h.from, h.kind
        ));
    }
    if h.exp.saturating_sub(h.iat) > LIFE_S {
        return Err(format!(
            "from {}: a command lives {LIFE_S} s at most",
            h.from
        ));
    }
    Ok(())
}

impl BusCommand {
    /// Reads a command from an authentic envelope's body.
    pub fn from_body(body: &serde_json::Value) -> Result<Self, String> {
        Self::deserialize(body).map_err(|e| format!("not a command ({e})"))
    }

    /// Its name in audit records.
    pub fn name(&self) -> &'static str {
        match self {
            BusCommand::TaskAdd { .. } => "task_add",
            BusCommand::TaskCancel { .. } => "task_cancel",
        }
    }

    /// The member it acts for.
    pub fn member(&self) -> &str {
        match self {
            BusCommand::TaskAdd { task_user, .. } | BusCommand::TaskCancel { task_user, .. } => {
                task_user
            }
        }
    }
}

/// The vault's answer to a command (the body of a [`REPLY_KIND`] envelope).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// The command's nonce.
    pub in_reply_to: String,
    /// Whether it was done.
    pub ok: bool,
    /// The answer, as the door gives it (`{"ok": true, "task_id": 3, ...}`
    /// or `{"ok": false, "error": "locked", "message": ...}`).
    pub answer: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_designs_json_reads_and_anything_else_is_refused() {
        let c: BusCommand = serde_json::from_str(
            r#"{"command": "task_add", "task_name": "nightly build", "task_user": "alice", "task_expire": 3600}"#,
        )
        .unwrap();
        assert_eq!(c.member(), "alice");
        assert_eq!(c.name(), "task_add");
        for bad in [
            r#"{"command": "lock", "reason": "x"}"#,
            r#"{"command": "task_add", "task_name": "x", "task_user": "a", "task_expire": 1, "session": 3}"#,
            r#"{"command": "task_add", "task_name": "x", "task_expire": 1}"#,
            r#"{"command": "task_cancel", "task_id": -1, "task_user": "a"}"#,
        ] {
            assert!(serde_json::from_str::<BusCommand>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_command_that_lives_briefly_is_read() {
        let body = serde_json::json!({"command": "task_cancel", "task_id": 3, "task_user": "bob"});
        let mut h = crate::envelope::header("team", "ci", "vault", KIND, LIFE_S, body);
        assert_eq!(check_header(&h), Ok(()));
        let c = BusCommand::from_body(&h.body).unwrap();
        assert_eq!((c.name(), c.member()), ("task_cancel", "bob"));
        h.exp = h.iat + LIFE_S + 1;
        assert!(check_header(&h).unwrap_err().contains("300 s at most"));
        h.exp = h.iat;
        h.kind = "gateway".into();
        assert!(check_header(&h).unwrap_err().contains("not a command"));
        h.body = serde_json::json!({"command": "task_cancel", "task_id": "3", "task_user": "bob"});
        assert!(BusCommand::from_body(&h.body).is_err());
    }
}

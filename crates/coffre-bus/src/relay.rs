//! The gateway relay's protocol: OpenVPN's management interface carried
//! between the VPN host and the vault over the bus.
//!
//! The vault opens a *link* (a random name) by sending [`RelayMsg::Open`];
//! the relay connects to OpenVPN's management socket afresh for it and
//! answers [`RelayMsg::Opened`] (or [`RelayMsg::Closed`] with why). From
//! then on the relay sends OpenVPN's lines as they come, sealed to the
//! vault's X25519 key ([`RelayMsg::Lines`]: the broker never reads a
//! password, a name or an address), and writes the vault's commands
//! ([`RelayMsg::Cmd`]) to the socket. Both directions are numbered from 1
//! per link: a lost or replayed message ends the link, and the vault opens
//! a new one and rebuilds its view from OpenVPN's `status`, as it does
//! after any reconnection. Every message is a signed envelope
//! ([`crate::envelope`]) of kind [`KIND`], non-persistent, with a short
//! TTL, on the exchange [`GATEWAY`], in queues that live as long as their
//! consumer's connection.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The topic exchange the relay and the vault talk through.
pub const GATEWAY: &str = "coffre.gateway";
/// The envelope kind of every relay message.
pub const KIND: &str = "gateway";
/// The routing key of messages to the vault from relay `name` (each
/// relay may use its own only).
pub fn to_vault(name: &str) -> String {
    format!("vault.{name}")
}
/// The vault's queue of relay messages.
pub const VAULT_QUEUE: &str = "coffre.gateway.vault";
/// How long a relay message may wait in a queue, milliseconds (and its
/// envelope's life, in seconds, is the same).
pub const TTL_MS: u32 = 30_000;
/// How often the relay says it is alive.
pub const ALIVE_EVERY_S: u64 = 5;
/// Silence after which the vault counts the relay gone (and a message
/// unaccounted for, lost).
pub const SILENT_S: u64 = 20;
/// The most relay messages the vault's queue holds (beyond, the broker
/// refuses more: a flood cannot grow the vault's memory).
pub const VAULT_QUEUE_MAX: u32 = 10_000;

/// The routing key of messages to relay `name`.
pub fn to_relay(name: &str) -> String {
    format!("relay.{name}")
}

/// Relay `name`'s queue.
pub fn relay_queue(name: &str) -> String {
    format!("coffre.gateway.relay.{name}")
}

/// The associated data a sealed batch of lines is bound to: the link and
/// the message's number (a batch moved to another place does not open).
pub fn sealed_aad(link: &str, seq: u64) -> Vec<u8> {
    format!("coffre-relay lines {link} {seq}").into_bytes()
}

/// The associated data a sealed command is bound to.
pub fn cmd_aad(link: &str, seq: u64) -> Vec<u8> {
    format!("coffre-relay cmd {link} {seq}").into_bytes()
}

/// One relay message (the body of an envelope of kind [`KIND`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum RelayMsg {
    /// Vault to relay: (re)connect to OpenVPN for this link.
    Open {
        /// The new link's name.
        link: String,
    },
    /// Relay to vault: connected to OpenVPN for this link.
    Opened {
        /// The link.
        link: String,
    },
    /// Relay to vault: management lines, sealed (base64).
    Lines {
        /// The link.
        link: String,
        /// This message's number on the link, from 1.
        seq: u64,
        /// The lines, each ended by `\n`, sealed to the vault.
        sealed: String,
    },
    /// Vault to relay: a command for OpenVPN (whole lines), sealed to the
    /// relay's X25519 key (base64): client ids, pushed addresses and
    /// refusal reasons are not the broker's to read.
    Cmd {
        /// The link.
        link: String,
        /// This message's number on the link, from 1.
        seq: u64,
        /// What to write to the socket, sealed.
        sealed: String,
    },
    /// Relay to vault: still here (`link` is the one it holds, if any,
    /// with the number of the last lines message it sent and of the last
    /// command it wrote: the vault tells a lost message from silence).
    Alive {
        /// The link the relay holds, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        link: Option<String>,
        /// The last lines message sent on it.
        #[serde(default)]
        lines: u64,
        /// The last command written from it.
        #[serde(default)]
        cmds: u64,
    },
    /// Relay to vault: the link is over (OpenVPN went away, a message was
    /// lost, another link replaced it).
    Closed {
        /// The link.
        link: String,
        /// Why, for the audit log.
        why: String,
    },
}

impl RelayMsg {
    /// The message as an envelope's body.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("relay messages serialise")
    }

    /// Reads an envelope's body.
    pub fn from_value(v: serde_json::Value) -> Result<Self, String> {
        let m: RelayMsg = serde_json::from_value(v).map_err(|e| e.to_string())?;
        let link = match &m {
            RelayMsg::Open { link }
            | RelayMsg::Opened { link }
            | RelayMsg::Lines { link, .. }
            | RelayMsg::Cmd { link, .. }
            | RelayMsg::Closed { link, .. } => Some(link),
            RelayMsg::Alive { link, .. } => link.as_ref(),
        };
        if let Some(l) = link
            && (l.is_empty() || l.len() > 64 || !l.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err("a link name is 1 to 64 letters or digits".into());
        }
        Ok(m)
    }
}

/// The lines of a batch the relay sealed, once opened: split at each
/// `\n` (the relay ends every line with one; what follows the last is a
/// line too), any `\r` at a line's end dropped, empty lines skipped, as
/// text (bytes that are not UTF-8 are replaced). A line longer than
/// `max_line` refuses the whole batch, the lines before it included: it
/// is not what OpenVPN writes, and the link starts again.
pub fn batch_lines(plain: &[u8], max_line: usize) -> Result<Vec<Zeroizing<String>>, String> {
    let mut out = Vec::new();
    for mut l in plain.split(|&b| b == b'\n') {
        while let [rest @ .., b'\r'] = l {
            l = rest;
        }
        if l.is_empty() {
            continue;
        }
        if l.len() > max_line {
            return Err("the relay sent an overlong line".into());
        }
        out.push(Zeroizing::new(String::from_utf8_lossy(l).into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_odd_links_are_refused() {
        let m = RelayMsg::Cmd {
            link: "ab12".into(),
            seq: 3,
            sealed: "AAAA".into(),
        };
        assert_eq!(RelayMsg::from_value(m.to_value()).unwrap(), m);
        let a = RelayMsg::Alive {
            link: None,
            lines: 0,
            cmds: 0,
        };
        assert_eq!(RelayMsg::from_value(a.to_value()).unwrap(), a);
        let bad = serde_json::json!({"op": "open", "link": "a b"});
        assert!(RelayMsg::from_value(bad).is_err());
        let bad = serde_json::json!({"op": "open", "link": "ab", "more": 1});
        assert!(RelayMsg::from_value(bad).is_err());
        let bad = serde_json::json!({"op": "launch"});
        assert!(RelayMsg::from_value(bad).is_err());
    }

    #[test]
    fn a_batch_splits_into_its_lines_and_an_overlong_one_refuses_it() {
        let got = batch_lines(b">INFO:hello\r\n\r\n\nSUCCESS: x\r\r\n\xfftail", 16).unwrap();
        let got: Vec<&str> = got.iter().map(|l| l.as_str()).collect();
        assert_eq!(got, [">INFO:hello", "SUCCESS: x", "\u{fffd}tail"]);
        assert!(batch_lines(b"", 16).unwrap().is_empty());
        assert_eq!(batch_lines(&[b'x'; 16], 16).unwrap().len(), 1);
        let long = [&[b'x'; 17][..], b"\r\n"].concat();
        assert!(batch_lines(&long, 16).is_err());
    }
}

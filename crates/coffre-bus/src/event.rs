//! Events on the bus: JSON, one per message, on the topic exchange
//! [`crate::EVENTS`]. An audit event carries the record exactly as the
//! log holds it, with its hash and the host key's signature, so whoever
//! reads it can check it without trusting the broker or the sender.

use crate::BusError;
use coffre_audit::Entry;
use serde::{Deserialize, Serialize};

/// The largest event accepted (an audit record is a few hundred bytes).
pub const MAX_EVENT: usize = 256 << 10;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum Event {
    /// One audit record, as the vault's log holds it.
    Audit {
        /// Format version (1).
        v: u32,
        /// The vault's name.
        vault: String,
        /// The record with its sequence number, chain hash and signature.
        entry: Entry,
    },
    /// A witness's alarm.
    Witness {
        /// Format version (1).
        v: u32,
        /// The vault's name.
        vault: String,
        /// The witness (component name).
        by: String,
        /// `gap`, `rollback`, `fork` or `forged`.
        alarm: String,
        /// The record it was about.
        seq: u64,
        /// What it saw, for people.
        detail: String,
    },
}

impl Event {
    /// An audit event.
    pub fn audit(vault: &str, entry: Entry) -> Self {
        Event::Audit {
            v: 1,
            vault: vault.to_string(),
            entry,
        }
    }

    /// The routing key: `audit.ACTION` or `witness.ALARM`, with anything
    /// but a-z 0-9 _ - in the name turned into `_` (topic words split on
    /// dots).
    pub fn routing_key(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .take(64)
                .map(|c| {
                    if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        match self {
            Event::Audit { entry, .. } => format!("audit.{}", clean(&entry.record.action)),
            Event::Witness { alarm, .. } => format!("witness.{}", clean(alarm)),
        }
    }

    /// The message body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialise")
    }

    /// Parses a message body: anything else than one of our events, of
    /// a known version, is refused with the reason.
    pub fn parse(bytes: &[u8]) -> Result<Self, BusError> {
        if bytes.len() > MAX_EVENT {
            return Err(BusError::BadEvent(format!(
                "{} bytes, more than the {MAX_EVENT} an event may have",
                bytes.len()
            )));
        }
        let ev: Event = serde_json::from_slice(bytes)
            .map_err(|e| BusError::BadEvent(format!("not an event of ours ({e})")))?;
        let (v, vault) = match &ev {
            Event::Audit { v, vault, entry } => {
                if entry.seq == 0 {
                    return Err(BusError::BadEvent("an audit record numbered 0".into()));
                }
                (*v, vault)
            }
            Event::Witness { v, vault, .. } => (*v, vault),
        };
        if v != 1 {
            return Err(BusError::BadEvent(format!("version {v} is not known here")));
        }
        if vault.is_empty() || vault.len() > 64 {
            return Err(BusError::BadEvent("no vault name".into()));
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffre_vault::{AuditRecord, Millis};

    fn entry(action: &str) -> Entry {
        Entry {
            seq: 3,
            prev: "00".repeat(32),
            record: AuditRecord {
                at: Millis(1),
                actor: "alice".into(),
                source: None,
                action: action.into(),
                result: "ok".into(),
                detail: String::new(),
            },
            hash: "11".repeat(32),
            sig: Some("22".repeat(64)),
        }
    }

    #[test]
    fn events_round_trip_and_route_by_action() {
        let ev = Event::audit("team", entry("enter"));
        assert_eq!(Event::parse(&ev.to_bytes()).unwrap(), ev);
        assert_eq!(ev.routing_key(), "audit.enter");
        assert_eq!(
            Event::audit("team", entry("a.b#*")).routing_key(),
            "audit.a_b__"
        );
    }

    #[test]
    fn what_is_not_an_event_is_refused_with_a_reason() {
        for bad in [
            &b"{}"[..],
            b"null",
            b"{\"kind\":\"audit\",\"v\":1,\"vault\":\"t\"}",
            b"{\"kind\":\"other\",\"v\":1,\"vault\":\"t\"}",
        ] {
            assert!(
                Event::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut ev = Event::audit("team", entry("enter"));
        if let Event::Audit { v, .. } = &mut ev {
            *v = 2;
        }
        let e = Event::parse(&ev.to_bytes()).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
        let mut big = b"{\"kind\":\"audit\",\"x\":\"".to_vec();
        big.resize(MAX_EVENT + 10, b'a');
        assert!(
            Event::parse(&big)
                .unwrap_err()
                .to_string()
                .contains("bytes")
        );
    }
}

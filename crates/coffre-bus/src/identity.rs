//! A component's identity file: who it is on the bus, its certificate and
//! key, the vault's CA, the key that signs the vault's audit records and
//! the broker's address. Written by `coffre bus identity` on the vault's
//! host (0600), carried to the component's host.

use crate::BusError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use zeroize::Zeroize;

/// What a component may do on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// The vault daemon itself: publishes events.
    Vault,
    /// Reads events (`coffre audit witness`, `coffre audit follow`) and
    /// may publish its own alarms (`witness.*`).
    Monitor,
    /// Relays OpenVPN's management interface on the VPN host
    /// (`coffre gateway relay`).
    Gateway,
    /// Sends commands (`task_add`, `task_cancel`) for the members its
    /// record allows (`coffre bus send`).
    Scheduler,
}

impl Role {
    /// The role's name in files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Vault => "vault",
            Role::Monitor => "monitor",
            Role::Gateway => "gateway",
            Role::Scheduler => "scheduler",
        }
    }
}

/// Identity files are small; anything bigger is not one.
const MAX_IDENTITY: usize = 64 << 10;

/// A component's identity.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Format version (1).
    pub v: u32,
    /// The vault's name.
    pub vault: String,
    /// The component's name (its certificate says `coffre-bus:NAME`).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The vault's CA, the only root the component trusts.
    pub ca_pem: String,
    /// The component's certificate.
    pub cert_pem: String,
    /// Its private key. Secret.
    pub key_pem: String,
    /// The host's audit key (Ed25519 public key, hex): what signs the
    /// vault's records and heads.
    pub audit_key: String,
    /// The vault's bus signing key (ECDSA P-256 public point, hex): what
    /// signs the vault's envelopes to components.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vault_sign_key: String,
    /// The vault's sealing key (X25519, hex): what components seal secrets
    /// to (the relay, members' passwords).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vault_seal_key: String,
    /// A gateway's own X25519 key (hex), what the vault seals commands
    /// to. Secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub seal_key: String,
    /// The broker's address (`amqps://HOST:PORT`), if known when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("vault", &self.vault)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.key_pem.zeroize();
        self.seal_key.zeroize();
    }
}

impl Identity {
    /// Parses an identity file's bytes.
    pub fn parse(bytes: &[u8], path: &str) -> Result<Self, BusError> {
        let bad = |why: String| BusError::Identity {
            path: path.to_string(),
            why,
        };
        if bytes.len() > MAX_IDENTITY {
            return Err(bad(format!(
                "{} bytes: not a bus identity (at most {MAX_IDENTITY})",
                bytes.len()
            )));
        }
        // serde_json's messages quote no input; a key never reaches them.
        let id: Identity = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a bus identity file ({e})")))?;
        if id.v != 1 {
            return Err(bad(format!("format version {} is not known here", id.v)));
        }
        crate::check_component_name(&id.name).map_err(bad)?;
        if !id.ca_pem.contains("BEGIN CERTIFICATE") || !id.cert_pem.contains("BEGIN CERTIFICATE") {
            return Err(bad("no certificate in it".into()));
        }
        if !id.key_pem.contains("PRIVATE KEY") {
            return Err(bad("no private key in it".into()));
        }
        let hex_of =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !id.vault_sign_key.is_empty() && !hex_of(&id.vault_sign_key, 130) {
            return Err(bad(
                "the vault's signing key is not a P-256 public key in hex".into(),
            ));
        }
        if !id.vault_seal_key.is_empty() && !hex_of(&id.vault_seal_key, 64) {
            return Err(bad(
                "the vault's sealing key is not an X25519 public key in hex".into(),
            ));
        }
        if !id.seal_key.is_empty() && !hex_of(&id.seal_key, 64) {
            return Err(bad("its sealing key is not 32 bytes of hex".into()));
        }
        if id.audit_key.len() != 64 || !id.audit_key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the audit key is not a 32-byte hex key".into()));
        }
        Ok(id)
    }

    /// Reads an identity file.
    pub fn load(path: &Path) -> Result<Self, BusError> {
        let shown = path.display().to_string();
        let mut bytes = std::fs::read(path).map_err(|source| BusError::Io {
            what: "read",
            path: shown.clone(),
            source,
        })?;
        let r = Self::parse(&bytes, &shown);
        bytes.zeroize();
        r
    }

    /// The file's bytes (JSON; write them 0600).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("identities serialise");
        v.push(b'\n');
        v
    }

    /// The broker address to use: `given`, else the one in the file.
    pub fn broker_url(&self, given: Option<&str>) -> Result<String, BusError> {
        given
            .map(str::to_string)
            .or_else(|| self.broker.clone())
            .ok_or_else(|| BusError::Url {
                url: "(none)".into(),
                why: "the identity names no broker: give --bus amqps://HOST:PORT".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Identity {
        Identity {
            v: 1,
            vault: "team".into(),
            name: "mon1".into(),
            role: Role::Monitor,
            ca_pem: "-----BEGIN CERTIFICATE-----\nx\n".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\ny\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nsecret-key-bytes\n".into(),
            audit_key: "ab".repeat(32),
            vault_sign_key: String::new(),
            vault_seal_key: String::new(),
            seal_key: String::new(),
            broker: Some("amqps://127.0.0.1:5671".into()),
        }
    }

    #[test]
    fn an_identity_round_trips_and_its_key_stays_out_of_debug() {
        let id = sample();
        let back = Identity::parse(&id.to_bytes(), "f").unwrap();
        assert_eq!(back.name, "mon1");
        assert_eq!(back.role, Role::Monitor);
        assert!(!format!("{back:?}").contains("secret-key-bytes"));
    }

    #[test]
    fn broken_identities_are_refused_with_a_reason() {
        let mut id = sample();
        id.name = "Bad:Name".into();
        let e = Identity::parse(&id.to_bytes(), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("component name"), "{e}");
        let mut id = sample();
        id.audit_key = "zz".into();
        assert!(Identity::parse(&id.to_bytes(), "f").is_err());
        let e = Identity::parse(b"{\"v\":1}", "f").unwrap_err().to_string();
        assert!(e.contains("not a bus identity"), "{e}");
        assert!(Identity::parse(&vec![b' '; MAX_IDENTITY + 1], "f").is_err());
    }
}

//! The client side of the JSON API: one HTTPS request per command, over
//! mutual TLS with the member's identity.

use crate::command::ApiCommand;
use crate::identity::Identity;
use crate::tls::{SERVER_NAME, client_config};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Could not reach or talk to the daemon.
    #[error("cannot reach the vault daemon at {addr}: {msg}")]
    Unreachable {
        /// The daemon's address.
        addr: String,
        /// What went wrong.
        msg: String,
    },
    /// TLS refused (wrong CA, unknown or revoked certificate).
    #[error(
        "the vault refused the connection at {addr}: {msg} (is this identity a member of this vault?)"
    )]
    Tls {
        /// The daemon's address.
        addr: String,
        /// What the TLS layer said.
        msg: String,
    },
    /// Bad reply.
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
}

/// The request header in which a member's machine names the CA key it
/// pins (hex SHA-256 of the CA's public key): after a change of the CA's
/// key, the daemon learns from it whose machines have moved to the new one
/// (`coffre renew --ca DIR --finish` waits for all of them). Not a
/// credential: a machine that lies only strands itself.
pub const PINNED_CA_KEY_HEADER: &str = "coffre-pinned-ca-key";

/// Whether `v` has the form of a [`PINNED_CA_KEY_HEADER`] value (64
/// lowercase hex digits).
pub fn is_key_fingerprint(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Sends one command; returns the JSON reply (`{"ok": ...}`). `pinned_key`
/// is the key fingerprint of the CA `id` pins, reported to the daemon
/// ([`PINNED_CA_KEY_HEADER`]).
pub async fn call(
    id: &Identity,
    cmd: &ApiCommand,
    pinned_key: Option<&str>,
) -> Result<serde_json::Value, ClientError> {
    let config = client_config(id).map_err(|e| ClientError::Unreachable {
        addr: id.server.clone(),
        msg: e.to_string(),
    })?;
    call_with(Arc::new(config), &id.server, cmd, pinned_key).await
}

/// Sends `join` without a client certificate, trusting only `ca_pem`.
pub async fn call_join(
    ca_pem: &str,
    server: &str,
    cmd: &ApiCommand,
) -> Result<serde_json::Value, ClientError> {
    let config = crate::tls::join_config(ca_pem).map_err(|e| ClientError::Unreachable {
        addr: server.to_string(),
        msg: e.to_string(),
    })?;
    call_with(Arc::new(config), server, cmd, None).await
}

async fn call_with(
    config: Arc<rustls::ClientConfig>,
    server: &str,
    cmd: &ApiCommand,
    pinned_key: Option<&str>,
) -> Result<serde_json::Value, ClientError> {
    let addr = server.to_string();
    let unreachable = |m: String| ClientError::Unreachable {
        addr: addr.clone(),
        msg: m,
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(SERVER_NAME).expect("static name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = serde_json::to_vec(cmd).expect("commands serialise");
    let mut req = hyper::Request::post("/v1/command")
        .header("host", SERVER_NAME)
        .header("content-type", "application/json");
    if let Some(k) = pinned_key.filter(|k| is_key_fingerprint(k)) {
        req = req.header(PINNED_CA_KEY_HEADER, k);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let resp = sender.send_request(req).await.map_err(|e| {
        // A revoked or unknown certificate is refused after the handshake
        // (TLS 1.3 sends the alert with the first application data).
        ClientError::Tls {
            addr: addr.clone(),
            msg: e.to_string(),
        }
    })?;
    let bytes = Limited::new(resp.into_body(), 16 << 20)
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_key_fingerprint_is_reported() {
        let fp = "0123456789abcdef".repeat(4);
        assert!(is_key_fingerprint(&fp));
        assert!(!is_key_fingerprint(&fp.to_ascii_uppercase()));
        assert!(!is_key_fingerprint(&fp[1..]));
        assert!(!is_key_fingerprint(&format!("{}g", &fp[1..])));
        assert!(!is_key_fingerprint(&format!("{fp}\r\nx: y")));
    }
}

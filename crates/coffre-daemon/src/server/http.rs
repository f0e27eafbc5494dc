//! The HTTPS door's transport: bodies read into wiped buffers, JSON commands
//! parsed, the audit head attached to members' replies.

use super::*;

/// What every reply to a member carries: the audit log's current signed
/// head and the key that verifies it. Members remember the highest head
/// they saw and refuse a vault that shows them an older one (finding 3:
/// the log and its head can be put back together without any key).
#[derive(Clone)]
pub(super) struct HeadForReplies {
    pub(super) watch: coffre_audit::HeadWatch,
    pub(super) key: String,
}

impl HeadForReplies {
    fn json(&self) -> Value {
        match self.watch.current() {
            Some(h) => {
                json!({"seq": h.seq, "hash": h.hash, "signature": h.signature, "key": self.key})
            }
            None => json!({"seq": 0, "hash": null, "signature": null, "key": self.key}),
        }
    }
}

/// The largest command body accepted. Commands are small JSON objects;
/// a bound keeps one client from making the daemon hold much memory, and
/// lets the buffer be allocated once (a growing buffer would leave
/// unwiped copies behind at each reallocation).
pub(super) const MAX_REQUEST_BODY: usize = 64 * 1024;

pub(super) enum BodyError {
    TooLarge,
    Transport(hyper::Error),
}

/// Reads a request body into one buffer of `limit` bytes that is wiped
/// when dropped: bodies carry passwords and invitation codes.
///
/// Each chunk hyper hands over is copied in and then wiped too when no
/// one else holds it. hyper's chunks usually share storage with its
/// connection read buffer, which we cannot wipe from here: what that
/// buffer (and rustls's plaintext buffers) keep is measured by the vault
/// test `scan::password_not_in_daemon_memory_after_leave` and written in
/// docs/security.md.
pub(super) async fn read_body(
    mut body: Incoming,
    limit: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, BodyError> {
    let mut raw = zeroize::Zeroizing::new(Vec::with_capacity(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Transport)?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let fits = raw.len() + chunk.len() <= limit;
        if fits {
            raw.extend_from_slice(&chunk);
        }
        if let Ok(mut own) = chunk.try_into_mut() {
            zeroize::Zeroize::zeroize(own.as_mut());
        }
        if !fits {
            return Err(BodyError::TooLarge);
        }
    }
    Ok(raw)
}

pub(super) async fn handle_http(
    req: hyper::Request<Incoming>,
    tx: mpsc::UnboundedSender<Msg>,
    fp: Option<String>,
    addr: SocketAddr,
    head: HeadForReplies,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let respond = |status: u16, v: Value| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&v).expect("json"),
            )))
            .expect("valid response")
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/command" {
        return Ok(respond(
            404,
            error_json(ErrorCode::NotFound, "POST /v1/command"),
        ));
    }
    // What the member's machine says it pins (ignored unless well formed).
    let pinned = req
        .headers()
        .get(crate::client::PINNED_CA_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::client::is_key_fingerprint(v))
        .map(str::to_string);
    let raw = match read_body(req.into_body(), MAX_REQUEST_BODY).await {
        Ok(raw) => raw,
        Err(BodyError::TooLarge) => {
            return Ok(respond(
                413,
                error_json(ErrorCode::Invalid, "request too large"),
            ));
        }
        Err(BodyError::Transport(e)) => return Err(e),
    };
    let parsed = serde_json::from_slice::<ApiCommand>(&raw);
    drop(raw);
    let cmd = match parsed {
        Ok(c) => c,
        Err(e) => {
            // serde's message never echoes field values.
            return Ok(respond(
                400,
                error_json(ErrorCode::Invalid, format!("bad command: {e}")),
            ));
        }
    };
    let is_join = matches!(cmd, ApiCommand::Join { .. });
    let has_certificate = fp.is_some();
    let (rtx, rrx) = oneshot::channel();
    if tx
        .send(Msg::Api {
            fingerprint: fp,
            pinned,
            addr,
            cmd,
            reply: rtx,
        })
        .is_err()
    {
        return Ok(respond(
            503,
            error_json(ErrorCode::Stopping, "the daemon is stopping"),
        ));
    }
    let (status, mut v) = rrx.await.unwrap_or((
        503,
        error_json(ErrorCode::Stopping, "the daemon is stopping"),
    ));
    // Read after the answer, so it covers what the command recorded.
    // Members get it with every reply (refusals too); a joiner with the
    // reply that made them a member; strangers never.
    let member = has_certificate && v["error"] != "unknown_certificate";
    let joined = is_join && v["ok"] == true;
    if (member || joined)
        && let Some(o) = v.as_object_mut()
    {
        o.insert("audit_head".into(), head.json());
    }
    Ok(respond(status, v))
}

//! S3 and S3-compatible stores, through `object_store`.
//!
//! `s3://BUCKET/PREFIX`; the endpoint (for a store that is not AWS), the
//! region and plain HTTP (test servers only) are settings. Credentials come
//! from the usual AWS environment variables, or from a file of
//! `KEY=VALUE` lines (`aws_access_key_id`, `aws_secret_access_key`,
//! optionally `aws_session_token`) that must be mode 0600: never from the
//! command line.

use crate::RemoteError;
use crate::objects::{ObjectStoreObjects, Objects};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Where and how to reach an S3 store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// The endpoint, for a store that is not AWS (`http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    /// The region (default `us-east-1`).
    pub region: Option<String>,
    /// Plain HTTP allowed (test servers on loopback only).
    pub allow_http: bool,
}

/// An endpoint carries no login (the keys go in `credentials_file`): it is
/// shown in status and errors.
fn check_endpoint(endpoint: &str) -> Result<(), RemoteError> {
    // Any `@`: a secret may hold `/`, so the authority cannot be told
    // from the path before it.
    if endpoint.contains('@') {
        return Err(RemoteError::Config(format!(
            "the endpoint {:?} carries a login (or an @): put the keys in credentials_file",
            coffre_sys::shown::url(endpoint)
        )));
    }
    Ok(())
}

/// The bucket and the prefix of an `s3://` URL.
pub fn parse_url(url: &str) -> Result<(String, String), RemoteError> {
    let bad = |why: &str| {
        RemoteError::Config(format!(
            "{:?} is not an s3:// URL: {why}",
            coffre_sys::shown::url(url)
        ))
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("it must start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !valid {
        return Err(bad(
            "the bucket name must be 3 to 63 lower-case letters, digits, dots or dashes",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
        || prefix.chars().any(char::is_control)
    {
        return Err(bad(
            "the prefix has an empty, . or .. part, or a control character",
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Credentials read from a file.
pub struct Credentials {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// From `path`: `KEY=VALUE` lines, `#` comments; mode 0600 or refused.
    pub fn load(path: &Path) -> Result<Self, RemoteError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            RemoteError::Config(format!("the credentials file {}: {e}", path.display()))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(RemoteError::Config(format!(
                "the credentials file {} must be mode 0600 (chmod 600 it)",
                path.display()
            )));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            RemoteError::Config(format!("the credentials file {}: {e}", path.display()))
        })?);
        let (mut id, mut secret, mut token) = (None, None, None);
        for (n, line) in text.lines().map(str::trim).enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(RemoteError::Config(format!(
                    "the credentials file {}: line {} is not KEY=VALUE",
                    path.display(),
                    n + 1
                )));
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "aws_access_key_id" => id = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(Zeroizing::new(v.trim().to_string())),
                "aws_session_token" => token = Some(Zeroizing::new(v.trim().to_string())),
                // The key is not repeated: a misnamed file could be
                // anything, secrets included.
                _ => {
                    return Err(RemoteError::Config(format!(
                        "the credentials file {}: line {} has an unknown key (aws_access_key_id, aws_secret_access_key, aws_session_token)",
                        path.display(),
                        n + 1
                    )));
                }
            }
        }
        match (id, secret) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
                access_key_id,
                secret_access_key,
                session_token: token,
            }),
            _ => Err(RemoteError::Config(format!(
                "the credentials file {} needs aws_access_key_id and aws_secret_access_key",
                path.display()
            ))),
        }
    }
}

/// The store `settings` name, and the prefix under it. Without
/// `credentials`, the AWS environment variables are used.
pub fn open(
    settings: &S3Settings,
    credentials: Option<&Credentials>,
) -> Result<(Arc<dyn Objects>, String), RemoteError> {
    let (bucket, prefix) = parse_url(&settings.url)?;
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(
            settings
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".into()),
        )
        .with_allow_http(settings.allow_http)
        .with_conditional_put(S3ConditionalPut::ETagMatch);
    if let Some(e) = &settings.endpoint {
        check_endpoint(e)?;
        if e.starts_with("http://") && !settings.allow_http {
            return Err(RemoteError::Config(format!(
                "the endpoint {e} is plain HTTP: use https://, or allow_http for a test server"
            )));
        }
        b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
    }
    if let Some(c) = credentials {
        b = b
            .with_access_key_id(&c.access_key_id)
            .with_secret_access_key(c.secret_access_key.as_str());
        if let Some(t) = &c.session_token {
            b = b.with_token(t.as_str());
        }
    }
    let store = b
        .build()
        .map_err(|e| RemoteError::Config(format!("S3 settings: {e}")))?;
    Ok((Arc::new(ObjectStoreObjects::new(Arc::new(store))), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://team-bucket/vaults/team/").unwrap(),
            ("team-bucket".into(), "vaults/team".into())
        );
        assert_eq!(
            parse_url("s3://abc").unwrap(),
            ("abc".into(), String::new())
        );
        for bad in [
            "http://x/y",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://-abc",
            "s3://abc/../x",
            "s3://abc/a//b",
            "s3://abc/a/./b",
            "s3://under_score",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let e = parse_url("s3://AKIAX:wJal/rXU@team-bucket/x").unwrap_err();
        assert!(!e.to_string().contains("wJal"), "{e}");
        for e in [
            "https://AKIAX:wJal/rXU@s3.example",
            "https://k:s@s3.example:9000/",
        ] {
            let e = check_endpoint(e).unwrap_err();
            assert!(
                !e.to_string().contains("wJal") && !e.to_string().contains(":s@"),
                "{e}"
            );
        }
        assert!(check_endpoint("https://s3.example:9000").is_ok());
    }

    /// A store that declares a small object and streams far more (a
    /// chunked body, whose framing overrides `Content-Length`): the read
    /// is refused once past its bound, never collected whole.
    #[test]
    fn a_body_longer_than_it_can_be_is_refused_while_it_streams() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut req = [0u8; 8192];
                    let _ = c.read(&mut req);
                    let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\
                                ETag: \"e1\"\r\nLast-Modified: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n";
                    if c.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let part = vec![b'x'; 1 << 20];
                    for _ in 0..256 {
                        if c.write_all(b"100000\r\n").is_err()
                            || c.write_all(&part).is_err()
                            || c.write_all(b"\r\n").is_err()
                        {
                            return;
                        }
                        counter.fetch_add(part.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                    let _ = c.write_all(b"0\r\n\r\n");
                });
            }
        });
        let settings = S3Settings {
            url: "s3://team-bucket/v".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: None,
            allow_http: true,
        };
        let creds = Credentials {
            access_key_id: "AKIATEST".into(),
            secret_access_key: Zeroizing::new("not a secret".into()),
            session_token: None,
        };
        let (objects, _) = open(&settings, Some(&creds)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(objects.get("v/manifest", 4096));
        let e = match r {
            Err(e) => e,
            // (Never the bytes themselves in the message: 256 MiB.)
            Ok(got) => panic!(
                "{} bytes read as a 4 KiB object",
                got.map_or(0, |(b, _)| b.len())
            ),
        };
        assert!(e.to_string().contains("more than the 4096 bytes"), "{e}");
        // Refused while it streamed: far from all of it was sent.
        assert!(
            sent.load(std::sync::atomic::Ordering::SeqCst) < 64 << 20,
            "{} bytes sent",
            sent.load(std::sync::atomic::Ordering::SeqCst)
        );
    }

    /// Bodies in one part, in several, in tiny ones: the same bytes.
    #[test]
    fn a_body_is_read_whole_in_any_parts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for cut in [5000usize, 1000, 7, 1] {
            let parts: Vec<object_store::Result<bytes::Bytes>> = data
                .chunks(cut)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            let body = futures::StreamExt::boxed(futures::stream::iter(parts));
            let got = rt
                .block_on(crate::objects::read_at_most(body, "k", 5000))
                .unwrap();
            assert_eq!(&got[..], &data[..], "parts of {cut}");
            let parts: Vec<object_store::Result<bytes::Bytes>> = data
                .chunks(cut)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            let body = futures::StreamExt::boxed(futures::stream::iter(parts));
            assert!(
                rt.block_on(crate::objects::read_at_most(body, "k", 4999))
                    .is_err()
            );
        }
    }

    #[test]
    fn credentials_files() {
        let d = std::env::temp_dir().join(format!("coffre-remote-cred-{}", std::process::id()));
        std::fs::write(
            &d,
            "# test\naws_access_key_id = AKIA1\naws_secret_access_key=s3cr3t\n",
        )
        .unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Credentials::load(&d)
                .unwrap_err()
                .to_string()
                .contains("0600")
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::load(&d).unwrap();
        assert_eq!(c.access_key_id, "AKIA1");
        assert_eq!(c.secret_access_key.as_str(), "s3cr3t");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        std::fs::write(&d, "aws_access_key_id=x\n").unwrap();
        assert!(Credentials::load(&d).is_err());
        std::fs::write(&d, "password=x\n").unwrap();
        assert!(Credentials::load(&d).is_err());
        let _ = std::fs::remove_file(&d);
    }
}

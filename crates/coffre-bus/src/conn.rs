//! Our connector: lapin over rustls with the vault's CA as the only root,
//! TLS 1.3, the component's certificate presented, RabbitMQ's EXTERNAL
//! login (the certificate's common name is the user). Reconnection is the
//! caller's (lapin's own recovery is off): see the daemon's publisher and
//! the witness.

use crate::{BusError, Identity};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{AsyncTcpStream, Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::sync::Arc;
use std::time::Duration;

/// The broker's virtual host for the vault: every name below lives in it.
pub const VHOST: &str = "coffre";
/// The topic exchange the vault publishes its events to.
pub const EVENTS: &str = "coffre.events";
/// Seconds between AMQP heartbeats: a dead peer is noticed within two.
const HEARTBEAT_S: u16 = 10;
/// How long a connection attempt (TCP, TLS and the AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn tls(x: impl std::fmt::Display) -> BusError {
    BusError::Tls(x.to_string())
}

/// The TLS client configuration for `id`: the vault's CA alone as root.
pub fn client_config(id: &Identity) -> Result<ClientConfig, BusError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(id.ca_pem.as_bytes()) {
        roots.add(c.map_err(tls)?).map_err(tls)?;
    }
    if roots.is_empty() {
        return Err(BusError::Tls("no CA certificate in the identity".into()));
    }
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls)?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|_| BusError::Tls("the identity's private key does not parse".into()))?;
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls)
}

/// Parses `url` (`amqps://HOST:PORT`): TLS is required, the virtual host
/// is always [`VHOST`], the login is EXTERNAL.
pub fn parse_url(url: &str) -> Result<AMQPUri, BusError> {
    let bad = |why: &str| BusError::Url {
        url: shown(url),
        why: why.to_string(),
    };
    // Any login, `guest` included (lapin's default when there is none):
    // the address is shown in status, errors and Debug output.
    if url.contains('@') {
        return Err(bad(
            "no user in the address: components log in with their certificate",
        ));
    }
    let mut uri: AMQPUri = url.parse().map_err(|e: String| bad(&e))?;
    if uri.scheme != AMQPScheme::AMQPS {
        return Err(bad(
            "the bus runs over TLS only: use amqps://HOST:PORT (5671 by default)",
        ));
    }
    uri.vhost = VHOST.to_string();
    uri.query.auth_mechanism = Some(SASLMechanism::External);
    uri.query.heartbeat = Some(HEARTBEAT_S);
    // Ours, whatever the broker tunes: a broker saying 0 ("no limit")
    // would have the client size its buffers for 4 GiB frames.
    uri.query.frame_max = Some(FRAME_MAX);
    uri.query.connection_timeout = Some(CONNECT_TIMEOUT.as_millis().try_into().unwrap_or(10_000));
    Ok(uri)
}

/// The largest AMQP frame taken (an envelope is at most
/// [`crate::envelope::MAX_ENVELOPE`], in several frames if need be).
pub const FRAME_MAX: u32 = 128 << 10;

/// `url` as errors may show it: without any user or password.
pub use coffre_sys::shown::url as shown;

/// Connects `id` to the broker at `url`. Fails (never retries) if the
/// broker is unreachable, its certificate is not the vault CA's for that
/// address, or it refuses the login.
pub async fn connect(url: &str, id: &Identity) -> Result<Connection, BusError> {
    let uri = parse_url(url)?;
    let config = Arc::new(client_config(id)?);
    let host = uri.authority.host.clone();
    let port = uri.authority.port;
    let runtime = lapin::runtime::default_runtime().map_err(|e| BusError::Broker {
        url: shown(url),
        why: e.to_string(),
    })?;
    let props = ConnectionProperties::default()
        .with_connection_name(format!("coffre {} {}", id.role.as_str(), id.name).into());
    let attempt = Connection::connector(
        uri,
        runtime,
        async move |_uri, runtime| {
            let addrs = runtime.to_socket_addrs((host.clone(), port));
            let tcp = AsyncTcpStream::connect(&runtime, addrs)
                .await
                .map_err(lapin::Error::from)?;
            let connector = lapin::tcp::RustlsConnector::from(config.clone());
            tcp.into_rustls(&connector, &host)
                .await
                .map_err(lapin::Error::from)
        },
        props,
    );
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            let why = describe(&e);
            let why = if is_refusal(&why) {
                // At login: the broker does not know this certificate's name.
                format!(
                    "{why} (the broker does not know {}: is it in the broker's definitions? run `coffre bus broker-config` again and restart the broker)",
                    crate::common_name(&id.name)
                )
            } else {
                why
            };
            Err(BusError::Broker {
                url: shown(url),
                why,
            })
        }
        Err(_) => Err(BusError::Broker {
            url: shown(url),
            why: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// The wait between two connection attempts: 1 s, doubling up to 30 s
/// (or the ceiling given to [`Backoff::up_to`]), back to 1 s once a link
/// held.
#[derive(Debug)]
pub struct Backoff {
    delay: Duration,
    most: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::up_to(Self::MOST)
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MOST: Duration = Duration::from_secs(30);

    /// Doubling from 1 s to at most `most` (at least 1 s): for a link that
    /// members' sessions ride on, which the vault keeps only for its
    /// grace period (30 s by default) while it hears nothing. With 30 s
    /// between attempts, a broker back after 16 s was found again only
    /// 15 s later, and the sessions had gone.
    pub fn up_to(most: Duration) -> Self {
        Backoff {
            delay: Self::FIRST,
            most: most.max(Self::FIRST),
        }
    }

    /// The link that just ended had been up: the next wait is the first.
    pub fn reset(&mut self) {
        self.delay = Self::FIRST;
    }

    /// The wait the next [`Backoff::wait`] takes.
    pub fn next_wait(&self) -> Duration {
        self.delay
    }

    /// Sleeps, then makes the next wait twice as long (at most 30 s).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.delay).await;
        self.grow();
    }

    fn grow(&mut self) {
        self.delay = (self.delay * 2).min(self.most);
    }
}

/// lapin's error, said for an operator.
pub fn describe(e: &lapin::Error) -> String {
    e.to_string()
}

/// Whether an error is the broker refusing (a login, or a right).
pub fn is_refusal(why: &str) -> bool {
    why.contains("ACCESS_REFUSED") || why.contains("access refused")
}

#[cfg(test)]
mod tests {
    /// Whatever the broker tunes, frames are ours at most: a broker
    /// saying 0 ("no limit") would have lapin size buffers for 4 GiB.
    #[test]
    fn the_frame_size_is_ours() {
        let uri = super::parse_url("amqps://10.9.0.1:5671").unwrap();
        assert_eq!(uri.query.frame_max, Some(super::FRAME_MAX));
        assert!(super::FRAME_MAX as usize <= crate::envelope::MAX_ENVELOPE);
    }

    use super::*;

    #[test]
    fn only_tls_addresses_without_users_are_accepted() {
        let u = parse_url("amqps://127.0.0.1:5671").unwrap();
        assert_eq!(u.vhost, VHOST);
        assert_eq!(u.query.auth_mechanism, Some(SASLMechanism::External));
        assert_eq!(u.authority.port, 5671);
        let e = parse_url("amqp://127.0.0.1:5672").unwrap_err().to_string();
        assert!(e.contains("TLS only"), "{e}");
        let e = parse_url("amqps://bob:pw@127.0.0.1:5671")
            .unwrap_err()
            .to_string();
        assert!(e.contains("certificate"), "{e}");
        assert!(!e.contains("pw"), "{e}");
        let e = parse_url("amqps://guest:s3cret@127.0.0.1:5671")
            .unwrap_err()
            .to_string();
        assert!(e.contains("certificate") && !e.contains("s3cret"), "{e}");
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn the_wait_doubles_to_thirty_seconds_and_starts_again_after_a_link() {
        let mut b = Backoff::default();
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(b.next_wait().as_secs());
            b.grow();
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_secs(1));
    }

    #[test]
    fn a_ceiling_bounds_the_wait() {
        let mut b = Backoff::up_to(Duration::from_secs(4));
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(b.next_wait().as_secs());
            b.grow();
        }
        assert_eq!(seen, [1, 2, 4, 4, 4]);
        let b = Backoff::up_to(Duration::ZERO);
        assert_eq!(b.next_wait(), Duration::from_secs(1));
    }
}

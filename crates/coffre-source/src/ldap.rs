//! [`LdapDirectory`]: the [`Directory`] on a real server, through `ldap3`
//! over rustls (aws-lc), the workspace's one TLS stack.
//!
//! - **One connection**, bound as the service account, kept and shared
//!   by every lookup (ldap3 multiplexes operations on it); when an
//!   operation fails on the connection (closed, reset, timed out) it is
//!   dropped and the operation tried once more on a fresh one.
//!   A refused service bind is remembered for
//!   [`Limits::service_bind_retry`] and answered without asking again, so
//!   that a wrong `bind_password_file` cannot lock the service account
//!   under the directory's lockout policy.
//! - **Password checks on a connection of their own**, closed at once: a
//!   member's bind never changes who the shared connection is.
//! - **TLS verified** against `ca_file` or the system's roots, for the
//!   URL's host name (or IP address); StartTLS before anything else on an
//!   `ldap://` URL. Connecting (TCP, TLS, StartTLS) has a deadline
//!   ([`Limits::connect`]).
//! - **Every search** has a size limit, a server-side time limit and a
//!   client-side timeout ([`Limits`]), dereferences no alias, and chases
//!   no referral: a referral result is an error, referral entries are
//!   dropped.
//!
//! What each call costs, on OpenLDAP: [`Directory::lookup`] one search
//! for the account, then one base search per configured group sent
//! together (two round trips); [`Directory::lookup_many`] one paged
//! search for all the accounts and one read of each configured group
//! entry, all sent together (one round trip, plus one per further page of
//! 500 accounts). On Active Directory the group reads are replaced by
//! searches with the in-chain rule, which sees nested groups.

use crate::config::{Flavour, SourceConfig, Transport};
use crate::query::{self, Entry, Members};
use crate::{Account, BoxFuture, Directory, Found, SourceError};
use ldap3::asn1::{PL, StructureTag};
use ldap3::controls::{PagedResults, RawControl};
use ldap3::{DerefAliases, Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchOptions};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

/// The paged-results control's OID (RFC 2696).
const PAGED_RESULTS_OID: &str = "1.2.840.113556.1.4.319";

/// Deadlines and sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// To connect: TCP, TLS and StartTLS.
    pub connect: Duration,
    /// For one operation's answer (each entry of a search resets it).
    pub operation: Duration,
    /// The server-side time limit sent with each search, in seconds.
    pub search_seconds: i32,
    /// Entries per page of a paged search.
    pub page_size: i32,
    /// The most pages of one search (a server that never ends a paged
    /// search is stopped here).
    pub max_pages: u32,
    /// After the directory refused the service account's bind, how long
    /// the refusal is answered without asking again: a wrong
    /// `bind_password_file` must not become a stream of failed binds that
    /// locks the service account under the directory's own lockout policy.
    pub service_bind_retry: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect: Duration::from_secs(5),
            operation: Duration::from_secs(10),
            search_seconds: 10,
            page_size: 500,
            max_pages: 100,
            service_bind_retry: Duration::from_secs(60),
        }
    }
}

/// Counters, for tests and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections opened (the shared one and password checks').
    pub connects: u64,
    /// Search requests sent (each page counts).
    pub searches: u64,
    /// Bind requests sent, the service account's included.
    pub binds: u64,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    searches: AtomicU64,
    binds: AtomicU64,
}

/// The organisation's directory over LDAP.
pub struct LdapDirectory {
    config: SourceConfig,
    password: Zeroizing<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    limits: Limits,
    shared: tokio::sync::Mutex<Shared>,
    counters: Counters,
}

/// The shared connection, or why there is none.
#[derive(Default)]
struct Shared {
    ldap: Option<Ldap>,
    /// The service bind's last refusal, and when.
    refused: Option<(tokio::time::Instant, SourceError)>,
}

impl std::fmt::Debug for LdapDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapDirectory")
            .field("url", &self.config.url)
            .field("bind_dn", &self.config.bind_dn)
            .finish_non_exhaustive()
    }
}

/// One search request.
struct Query<'q> {
    base: &'q str,
    scope: Scope,
    filter: &'q str,
    attrs: &'q [&'q str],
    /// The most entries (of all pages).
    size_limit: i32,
    /// With the paged-results control (RFC 2696).
    paged: bool,
}

/// A failure of one attempt: on the connection (worth one retry on a
/// fresh one) or final.
enum Failure {
    Connection(String),
    /// More entries than the size limit (sizeLimitExceeded).
    TooMany(String),
    Final(SourceError),
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        Failure::Final(e)
    }
}

impl LdapDirectory {
    /// Checks `config`, reads the service account's password and the CA
    /// file from `dir` (the vault directory). Connects lazily, at the
    /// first call.
    pub fn new(config: SourceConfig, dir: &Path) -> Result<Self, SourceError> {
        let password = config.load_password(dir)?;
        Self::with_password(config, dir, password, Limits::default())
    }

    /// As [`new`](Self::new), with the password given and the limits
    /// chosen.
    pub fn with_password(
        config: SourceConfig,
        dir: &Path,
        password: Zeroizing<String>,
        limits: Limits,
    ) -> Result<Self, SourceError> {
        let transport = config.check()?;
        let tls = match transport {
            Transport::Ldapi => None,
            Transport::Ldaps | Transport::StartTls => {
                Some(Arc::new(tls_config(config.ca_path(dir).as_deref())?))
            }
        };
        if limits.page_size < 1 || limits.search_seconds < 1 || limits.max_pages < 1 {
            return Err(SourceError::Config("limits must be positive".into()));
        }
        Ok(LdapDirectory {
            config,
            password,
            tls,
            limits,
            shared: tokio::sync::Mutex::new(Shared::default()),
            counters: Counters::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    /// What was sent so far.
    pub fn stats(&self) -> Stats {
        Stats {
            connects: self.counters.connects.load(Ordering::Relaxed),
            searches: self.counters.searches.load(Ordering::Relaxed),
            binds: self.counters.binds.load(Ordering::Relaxed),
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> SourceError {
        SourceError::Unreachable {
            url: self.config.url.clone(),
            reason: reason.to_string(),
        }
    }

    /// A new connection, TLS set up, not bound.
    async fn connect(&self) -> Result<Ldap, SourceError> {
        let mut settings = LdapConnSettings::new().set_conn_timeout(self.limits.connect);
        if let Some(tls) = &self.tls {
            settings = settings.set_config(tls.clone());
        }
        let transport = self.config.transport()?;
        if transport == Transport::StartTls {
            settings = settings.set_starttls(true);
        }
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.limits.connect;
        // The TCP connection is ours, with Nagle's algorithm off: a bind
        // sent right after the TLS handshake's last flight is a second
        // small write before any ACK, which Nagle would hold until the
        // server's delayed ACK (40 ms on Linux) for every password check.
        if transport != Transport::Ldapi {
            let stream = tokio::time::timeout_at(deadline, self.tcp())
                .await
                .map_err(|_| {
                    self.unreachable(format!("no connection within {:?}", self.limits.connect))
                })??;
            settings = settings.set_std_stream(ldap3::StdStream::Tcp(stream));
        }
        // ldap3's own deadline covers TLS; this one ldapi:// too.
        let attempt = LdapConnAsync::with_settings(settings, &self.config.url);
        let (conn, ldap) = match tokio::time::timeout_at(deadline, attempt).await {
            Err(_) => {
                return Err(
                    self.unreachable(format!("no connection within {:?}", self.limits.connect))
                );
            }
            Ok(Err(e)) => return Err(self.connect_error(e)),
            Ok(Ok(pair)) => pair,
        };
        tokio::spawn(async move {
            // Ends when every handle is dropped or the server goes away;
            // the next operation then sees the connection closed.
            let _ = conn.drive().await;
        });
        Ok(ldap)
    }

    /// A TCP connection to the URL's host and port (389 for ldap://, 636
    /// for ldaps://), TCP_NODELAY set, as a std stream for ldap3 (which
    /// keeps it non-blocking).
    async fn tcp(&self) -> Result<std::net::TcpStream, SourceError> {
        let url = url::Url::parse(&self.config.url)
            .map_err(|e| SourceError::Config(format!("url: {e}")))?;
        let port = url
            .port()
            .unwrap_or(if url.scheme() == "ldaps" { 636 } else { 389 });
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost");
        // An IPv6 literal comes with brackets, which connect does not take.
        let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| self.unreachable(e))?;
        stream.set_nodelay(true).map_err(|e| self.unreachable(e))?;
        stream.into_std().map_err(|e| self.unreachable(e))
    }

    fn connect_error(&self, e: LdapError) -> SourceError {
        let tls = match &e {
            LdapError::Rustls { .. } | LdapError::DNSName { .. } => true,
            LdapError::Io { source } => source
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
            _ => false,
        };
        if tls {
            SourceError::Tls {
                url: self.config.url.clone(),
                reason: e.to_string(),
            }
        } else if let LdapError::LdapResult { result } = &e {
            // StartTLS refused.
            SourceError::Protocol(format!(
                "StartTLS refused: result {} {}",
                result.rc,
                short(&result.text)
            ))
        } else {
            self.unreachable(e)
        }
    }

    /// The shared connection, bound as the service account; opened (or
    /// opened again) when there is none or it closed.
    async fn shared(&self) -> Result<Ldap, SourceError> {
        let mut slot = self.shared.lock().await;
        if let Some(ldap) = slot.ldap.as_mut()
            && !ldap.is_closed()
        {
            return Ok(ldap.clone());
        }
        slot.ldap = None;
        if let Some((when, why)) = &slot.refused
            && when.elapsed() < self.limits.service_bind_retry
        {
            return Err(why.clone());
        }
        let mut ldap = self.connect().await?;
        self.counters.binds.fetch_add(1, Ordering::Relaxed);
        let res = ldap
            .with_timeout(self.limits.operation)
            .simple_bind(&self.config.bind_dn, &self.password)
            .await
            .map_err(|e| self.unreachable(format!("binding as the service account: {e}")))?;
        if res.rc != 0 {
            let e = SourceError::ServiceBind {
                bind_dn: self.config.bind_dn.clone(),
                code: res.rc,
                message: short(&res.text),
            };
            slot.refused = Some((tokio::time::Instant::now(), e.clone()));
            return Err(e);
        }
        slot.refused = None;
        slot.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    async fn forget_shared(&self) {
        if let Some(mut ldap) = self.shared.lock().await.ldap.take() {
            let _ = ldap.unbind().await;
        }
    }

    /// Runs `op` on the shared connection; once more on a fresh one if
    /// the connection failed.
    async fn on_shared<'s, T, F>(&'s self, op: F) -> Result<T, SourceError>
    where
        F: Fn(Ldap) -> BoxFuture<'s, Result<T, Failure>>,
    {
        let mut last = String::new();
        for _ in 0..2 {
            let ldap = self.shared().await?;
            match op(ldap).await {
                Ok(t) => return Ok(t),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::TooMany(why)) => return Err(SourceError::Protocol(why)),
                Err(Failure::Connection(why)) => {
                    self.forget_shared().await;
                    last = why;
                }
            }
        }
        Err(self.unreachable(last))
    }

    /// One search, all entries read; `None` if the base does not exist
    /// (noSuchObject). Any other result than success is an error.
    async fn search(&self, mut ldap: Ldap, q: Query<'_>) -> Result<Option<Vec<Entry>>, Failure> {
        let Query {
            base,
            scope,
            filter,
            attrs,
            size_limit,
            paged,
        } = q;
        let attrs: Vec<String> = attrs.iter().map(|a| (*a).to_string()).collect();
        let mut entries = Vec::new();
        let mut cookie: Vec<u8> = Vec::new();
        for _ in 0..self.limits.max_pages {
            let opts = SearchOptions::new()
                .deref(DerefAliases::Never)
                .sizelimit(size_limit)
                .timelimit(self.limits.search_seconds);
            ldap.with_search_options(opts)
                .with_timeout(self.limits.operation);
            if paged {
                ldap.with_controls(RawControl::from(PagedResults {
                    size: self.limits.page_size,
                    cookie: std::mem::take(&mut cookie),
                }));
            }
            self.counters.searches.fetch_add(1, Ordering::Relaxed);
            let ldap3::SearchResult(raw, res) = ldap
                .search(base, scope, filter, attrs.clone())
                .await
                .map_err(|e| Failure::Connection(e.to_string()))?;
            match res.rc {
                0 => {}
                32 => return Ok(None),
                10 => {
                    return Err(Failure::Final(SourceError::Protocol(format!(
                        "a referral for {base:?} (referrals are not followed: point people and the groups at this server's own entries)"
                    ))));
                }
                4 => {
                    return Err(Failure::TooMany(format!(
                        "more than {size_limit} entries under {base:?} for {filter}"
                    )));
                }
                3 => {
                    return Err(Failure::Connection(format!(
                        "the server's time limit hit searching {base:?}"
                    )));
                }
                51 | 52 => {
                    return Err(Failure::Connection(format!(
                        "server busy or unavailable (result {})",
                        res.rc
                    )));
                }
                rc => {
                    return Err(Failure::Final(SourceError::Protocol(format!(
                        "search of {base:?} failed: result {rc} {}",
                        short(&res.text)
                    ))));
                }
            }
            for re in raw {
                entries.push(read_entry(re.0)?);
            }
            if !paged {
                break;
            }
            cookie = page_cookie(&res.ctrls)?;
            if cookie.is_empty() {
                return Ok(Some(entries));
            }
        }
        if paged {
            return Err(Failure::Final(SourceError::Protocol(format!(
                "a paged search of {base:?} went past {} pages",
                self.limits.max_pages
            ))));
        }
        Ok(Some(entries))
    }

    async fn lookup_once(&self, ldap: Ldap, name: String) -> Result<Option<Account>, Failure> {
        let flavour = self.config.flavour;
        let attrs = query::account_attributes(flavour);
        let filter = query::account_filter(flavour, &name);
        let q = Query {
            base: &self.config.people,
            scope: Scope::Subtree,
            filter: &filter,
            attrs: &attrs,
            size_limit: 2,
            paged: false,
        };
        // One round trip in the usual layout: the group checks are sent
        // with the account search, for the DN the account most likely has
        // (NAME directly under people). Used only if that is its DN; else
        // asked again with the real one. (Active Directory's checks are
        // searches based at the account's DN: not guessed.)
        let guess = (flavour == Flavour::OpenLdap).then(|| {
            format!(
                "{}={},{}",
                flavour.name_attribute(),
                crate::escape::dn_value(&name),
                self.config.people
            )
        });
        let speculative = async {
            match &guess {
                Some(dn) => Some(self.groups_of(ldap.clone(), dn, &name).await),
                None => None,
            }
        };
        let (entries, speculative) = tokio::join!(self.search(ldap.clone(), q), speculative);
        let entries = match entries {
            // Three or more: as ambiguous as two.
            Err(Failure::TooMany(_)) => {
                return Err(Failure::Final(SourceError::Ambiguous { name, entries: 3 }));
            }
            r => r?.ok_or_else(|| missing("people", &self.config.people))?,
        };
        let named = query::entries_named(flavour, &entries, &name);
        let entry = match named.as_slice() {
            [] => return Ok(None),
            [e] => *e,
            many => {
                return Err(Failure::Final(SourceError::Ambiguous {
                    name,
                    entries: many.len(),
                }));
            }
        };
        let guessed_right = guess
            .as_deref()
            .and_then(crate::escape::normalise_dn)
            .is_some_and(|g| crate::escape::normalise_dn(&entry.dn).is_some_and(|d| d == g));
        let (members, superusers) = match speculative {
            Some(groups) if guessed_right => groups?,
            _ => self.groups_of(ldap.clone(), &entry.dn, &name).await?,
        };
        Ok(Some(query::account(
            &name,
            entry,
            members,
            superusers,
            SystemTime::now(),
        )))
    }

    /// Whether the account `dn` (named `name`) is in members_group and in
    /// superusers_group, both asked at once.
    async fn groups_of(&self, ldap: Ldap, dn: &str, name: &str) -> Result<(bool, bool), Failure> {
        let members = self.in_group(
            ldap.clone(),
            dn,
            name,
            "members_group",
            &self.config.members_group,
        );
        let superusers = async {
            match &self.config.superusers_group {
                Some(g) => {
                    self.in_group(ldap.clone(), dn, name, "superusers_group", g)
                        .await
                }
                None => Ok(false),
            }
        };
        let (members, superusers) = tokio::join!(members, superusers);
        Ok((members?, superusers?))
    }

    async fn in_group(
        &self,
        ldap: Ldap,
        dn: &str,
        name: &str,
        field: &str,
        group: &str,
    ) -> Result<bool, Failure> {
        let (base, filter) = match self.config.flavour {
            Flavour::OpenLdap => (group, query::group_has(dn, name)),
            Flavour::ActiveDirectory => (dn, query::in_chain(group)),
        };
        let q = Query {
            base,
            scope: Scope::Base,
            filter: &filter,
            attrs: &["1.1"],
            size_limit: 1,
            paged: false,
        };
        let found = self
            .search(ldap, q)
            .await?
            .ok_or_else(|| match self.config.flavour {
                Flavour::OpenLdap => missing(field, group),
                Flavour::ActiveDirectory => {
                    SourceError::Protocol(format!("the account {base:?} went away"))
                }
            })?;
        Ok(!found.is_empty())
    }

    async fn lookup_many_once(
        &self,
        ldap: Ldap,
        names: &[String],
    ) -> Result<Vec<(String, Found)>, Failure> {
        let flavour = self.config.flavour;
        let mut wanted: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| query::usable(n))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(query::found(
                flavour,
                names,
                &[],
                &Members::default(),
                None,
                SystemTime::now(),
            ));
        }
        // Room for every name twice (an ambiguity must be seen, not cut).
        let size_limit =
            i32::try_from(wanted.len().saturating_mul(2).saturating_add(2)).unwrap_or(i32::MAX);
        let attrs = query::account_attributes(flavour);
        let filter = query::accounts_filter(flavour, &wanted);
        let accounts = self.search(
            ldap.clone(),
            Query {
                base: &self.config.people,
                scope: Scope::Subtree,
                filter: &filter,
                attrs: &attrs,
                size_limit,
                paged: true,
            },
        );
        let members = self.members_of(
            ldap.clone(),
            &wanted,
            "members_group",
            &self.config.members_group,
            size_limit,
        );
        let superusers = async {
            match &self.config.superusers_group {
                Some(g) => self
                    .members_of(ldap.clone(), &wanted, "superusers_group", g, size_limit)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (accounts, members, superusers) = tokio::join!(accounts, members, superusers);
        let accounts = accounts?.ok_or_else(|| missing("people", &self.config.people))?;
        let (members, superusers) = (members?, superusers?);
        Ok(query::found(
            flavour,
            names,
            &accounts,
            &members,
            superusers.as_ref(),
            SystemTime::now(),
        ))
    }

    async fn members_of(
        &self,
        ldap: Ldap,
        names: &[&str],
        field: &str,
        group: &str,
        size_limit: i32,
    ) -> Result<Members, Failure> {
        match self.config.flavour {
            Flavour::OpenLdap => {
                let q = Query {
                    base: group,
                    scope: Scope::Base,
                    filter: "(objectClass=*)",
                    attrs: &query::GROUP_MEMBER_ATTRIBUTES,
                    size_limit: 1,
                    paged: false,
                };
                let entries = self
                    .search(ldap, q)
                    .await?
                    .ok_or_else(|| missing(field, group))?;
                Ok(entries.first().map(Members::from_group).unwrap_or_default())
            }
            Flavour::ActiveDirectory => {
                let filter = query::accounts_in_chain(names, group);
                let q = Query {
                    base: &self.config.people,
                    scope: Scope::Subtree,
                    filter: &filter,
                    attrs: &["1.1"],
                    size_limit,
                    paged: true,
                };
                let entries = self
                    .search(ldap, q)
                    .await?
                    .ok_or_else(|| missing("people", &self.config.people))?;
                Ok(Members::from_accounts(&entries))
            }
        }
    }

    async fn check_password_now(&self, dn: &str, password: &str) -> Result<bool, SourceError> {
        let mut ldap = self.connect().await?;
        self.counters.binds.fetch_add(1, Ordering::Relaxed);
        let res = ldap
            .with_timeout(self.limits.operation)
            .simple_bind(dn, password)
            .await
            .map_err(|e| self.unreachable(format!("binding as the account: {e}")));
        let _ = ldap.unbind().await;
        let res = res?;
        match res.rc {
            0 => Ok(true),
            // invalidCredentials: a wrong password, and also what
            // ppolicy answers for a locked account.
            49 => Ok(false),
            rc => Err(SourceError::Protocol(format!(
                "a bind as the account answered result {rc} {}",
                short(&res.text)
            ))),
        }
    }
}

impl Directory for LdapDirectory {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Account>, SourceError>> {
        Box::pin(async move {
            if !query::usable(name) {
                return Ok(None);
            }
            self.on_shared(|ldap| Box::pin(self.lookup_once(ldap, name.to_string())))
                .await
        })
    }

    fn lookup_many<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, Found)>, SourceError>> {
        Box::pin(async move {
            if !names.iter().any(|n| query::usable(n)) {
                return Ok(names
                    .iter()
                    .map(|n| (n.clone(), Found::NoAccount))
                    .collect());
            }
            self.on_shared(|ldap| Box::pin(self.lookup_many_once(ldap, names)))
                .await
        })
    }

    fn bind<'a>(
        &'a self,
        dn: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<bool, SourceError>> {
        Box::pin(self.check_password_now(dn, password))
    }
}

fn missing(field: &str, dn: &str) -> SourceError {
    SourceError::Config(format!(
        "{field} = {dn:?} does not exist in the directory (or the service account may not read it)"
    ))
}

/// At most 200 characters of a server's diagnostic text, controls out.
fn short(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

fn malformed(what: &str) -> Failure {
    Failure::Final(SourceError::Protocol(format!("a malformed {what}")))
}

/// A SearchResultEntry (RFC 4511 section 4.5.2) read without panicking:
/// `[APPLICATION 4] SEQUENCE { objectName, attributes SEQUENCE OF
/// SEQUENCE { type, vals SET OF value } }`. Values that are not UTF-8 are
/// dropped (none of the attributes asked for is binary).
fn read_entry(tag: StructureTag) -> Result<Entry, Failure> {
    let bad = || malformed("search entry");
    let mut parts = tag
        .match_id(4)
        .and_then(StructureTag::expect_constructed)
        .ok_or_else(bad)?
        .into_iter();
    let dn = parts
        .next()
        .and_then(StructureTag::expect_primitive)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let list = parts
        .next()
        .and_then(StructureTag::expect_constructed)
        .ok_or_else(bad)?;
    let mut attrs = crate::flags::Attributes::new();
    for attr in list {
        let mut pa = attr.expect_constructed().ok_or_else(bad)?.into_iter();
        let name = pa
            .next()
            .and_then(StructureTag::expect_primitive)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(bad)?
            .to_ascii_lowercase();
        let values = pa
            .next()
            .and_then(StructureTag::expect_constructed)
            .ok_or_else(bad)?;
        let slot: &mut Vec<String> = attrs.entry(name).or_default();
        for v in values {
            if let PL::P(bytes) = v.payload
                && let Ok(s) = String::from_utf8(bytes)
            {
                slot.push(s);
            }
        }
    }
    Ok(Entry { dn, attrs })
}

/// The cookie of a paged-results response control (RFC 2696:
/// `SEQUENCE { size INTEGER, cookie OCTET STRING }`), read without
/// panicking; empty when the search is done (or the server ignored
/// paging and sent everything).
fn page_cookie(ctrls: &[ldap3::controls::Control]) -> Result<Vec<u8>, Failure> {
    let Some(raw) = ctrls
        .iter()
        .map(|c| &c.1)
        .find(|c| c.ctype == PAGED_RESULTS_OID)
    else {
        return Ok(Vec::new());
    };
    let bad = || malformed("paged results control");
    let val = raw.val.as_deref().ok_or_else(bad)?;
    let (rest, tag) = ldap3::asn1::parse_tag(val).map_err(|_| bad())?;
    if !rest.is_empty() {
        return Err(bad());
    }
    let mut parts = tag.expect_constructed().ok_or_else(bad)?.into_iter();
    let _size = parts.next().ok_or_else(bad)?;
    parts
        .next()
        .and_then(StructureTag::expect_primitive)
        .ok_or_else(bad)
}

/// For the fuzz target `source_answer`: `data` as what a directory
/// could answer, through every reader of this crate that sees a server's
/// bytes or a configured string. The first byte chooses: 0, a search
/// entry (BER) read and judged; 1, a paged-results control value; else
/// the rest as text through the DN parser, the generalized-time parser and
/// both escapes. Panics only on a broken invariant.
#[doc(hidden)]
pub fn fuzz_answer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 => {
            if let Ok((_, tag)) = ldap3::asn1::parse_tag(rest)
                && let Ok(entry) = read_entry(tag)
            {
                let _ = crate::flags::disabled(&entry.attrs, SystemTime::now());
                let _ = query::Members::from_group(&entry);
                let _ = query::found(
                    Flavour::OpenLdap,
                    &["alice".to_string()],
                    std::slice::from_ref(&entry),
                    &query::Members::from_accounts(std::slice::from_ref(&entry)),
                    None,
                    SystemTime::now(),
                );
            }
        }
        1 => {
            let ctrl = ldap3::controls::Control(
                None,
                RawControl {
                    ctype: PAGED_RESULTS_OID.into(),
                    crit: false,
                    val: Some(rest.to_vec()),
                },
            );
            let _ = page_cookie(&[ctrl]);
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            if let Some(n) = crate::escape::normalise_dn(&text) {
                assert_eq!(crate::escape::normalise_dn(&n).as_deref(), Some(n.as_str()));
            }
            let _ = crate::flags::generalized_time(&text);
            let f = format!("(uid={})", crate::escape::filter_value(&text));
            assert!(ldap3::parse_filter(&f).is_ok(), "{f:?}");
            let dn = format!("uid={},dc=x", crate::escape::dn_value(&text));
            let rdns = crate::escape::parse_dn(&dn).expect("an escaped value parses");
            assert_eq!(rdns.len(), 2);
            assert_eq!(rdns[0][0].value, text.as_bytes());
        }
    }
}

/// The rustls client configuration: aws-lc, TLS 1.2 and 1.3, the CA file's
/// certificates or the system's as roots, no client certificate.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SourceError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display();
            let pem = std::fs::read(path)
                .map_err(|e| SourceError::Config(format!("ca_file {shown}: {e}")))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| SourceError::Config(format!("ca_file {shown}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| SourceError::Config(format!("ca_file {shown}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(SourceError::Config(format!(
                    "ca_file {shown} holds no PEM certificate"
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(SourceError::Config(
                    "no system CA certificates were found (install ca-certificates) : or set ca_file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3::asn1::TagClass;
    use ldap3::asn1::{ASNTag, OctetString, Sequence, Set, Tag};

    fn octets(s: &[u8]) -> Tag {
        Tag::OctetString(OctetString {
            inner: s.to_vec(),
            ..Default::default()
        })
    }

    fn entry_tag(dn: &[u8], attrs: Vec<(&str, Vec<&[u8]>)>) -> StructureTag {
        Tag::Sequence(Sequence {
            id: 4,
            class: TagClass::Application,
            inner: vec![
                octets(dn),
                Tag::Sequence(Sequence {
                    inner: attrs
                        .into_iter()
                        .map(|(n, vs)| {
                            Tag::Sequence(Sequence {
                                inner: vec![
                                    octets(n.as_bytes()),
                                    Tag::Set(Set {
                                        inner: vs.into_iter().map(octets).collect(),
                                        ..Default::default()
                                    }),
                                ],
                                ..Default::default()
                            })
                        })
                        .collect(),
                    ..Default::default()
                }),
            ],
        })
        .into_structure()
    }

    #[test]
    fn entries_are_read() {
        let e = read_entry(entry_tag(
            b"uid=alice,dc=x",
            vec![
                ("UID", vec![b"alice"]),
                ("jpegPhoto", vec![b"\xff\xfe"]),
                ("cn", vec![b"A", b"B"]),
            ],
        ))
        .ok()
        .unwrap();
        assert_eq!(e.dn, "uid=alice,dc=x");
        assert_eq!(e.attrs["uid"], ["alice"]);
        assert!(e.attrs["jpegphoto"].is_empty());
        assert_eq!(e.attrs["cn"], ["A", "B"]);
    }

    #[test]
    fn malformed_entries_are_errors_not_panics() {
        let cases = vec![
            // Wrong application tag.
            Tag::Sequence(Sequence {
                id: 5,
                class: TagClass::Application,
                inner: vec![],
            })
            .into_structure(),
            // No DN.
            Tag::Sequence(Sequence {
                id: 4,
                class: TagClass::Application,
                inner: vec![],
            })
            .into_structure(),
            // A DN that is not UTF-8.
            entry_tag(b"\xff", vec![]),
            // Attributes not a sequence.
            Tag::Sequence(Sequence {
                id: 4,
                class: TagClass::Application,
                inner: vec![octets(b"dc=x"), octets(b"oops")],
            })
            .into_structure(),
            // An attribute without values.
            Tag::Sequence(Sequence {
                id: 4,
                class: TagClass::Application,
                inner: vec![
                    octets(b"dc=x"),
                    Tag::Sequence(Sequence {
                        inner: vec![Tag::Sequence(Sequence {
                            inner: vec![octets(b"cn")],
                            ..Default::default()
                        })],
                        ..Default::default()
                    }),
                ],
            })
            .into_structure(),
            // A primitive where the entry should be.
            octets(b"x").into_structure(),
        ];
        for c in cases {
            assert!(matches!(
                read_entry(c),
                Err(Failure::Final(SourceError::Protocol(_)))
            ));
        }
    }

    #[test]
    fn page_cookies() {
        use ldap3::controls::{Control, ControlType};
        let ctrl = |val: Option<Vec<u8>>| {
            vec![Control(
                Some(ControlType::PagedResults),
                RawControl {
                    ctype: PAGED_RESULTS_OID.into(),
                    crit: false,
                    val,
                },
            )]
        };
        let encoded = |cookie: &[u8]| {
            let raw = RawControl::from(PagedResults {
                size: 0,
                cookie: cookie.to_vec(),
            });
            raw.val
        };
        assert_eq!(page_cookie(&[]).ok(), Some(vec![]));
        assert_eq!(
            page_cookie(&ctrl(encoded(b"abc"))).ok(),
            Some(b"abc".to_vec())
        );
        assert_eq!(page_cookie(&ctrl(encoded(b""))).ok(), Some(vec![]));
        for bad in [
            None,
            Some(vec![]),
            Some(vec![0x30, 0x03, 0x02, 0x01]),
            Some(b"\x04\x01x".to_vec()),
        ] {
            assert!(page_cookie(&ctrl(bad)).is_err());
        }
    }

    #[test]
    fn the_fuzz_seeds_reach_the_readers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/source_answer");
        let seed = |n: &str| std::fs::read(dir.join(n)).unwrap();
        let entry = seed("entry");
        let (_, tag) = ldap3::asn1::parse_tag(&entry[1..]).unwrap();
        let e = read_entry(tag).ok().unwrap();
        assert_eq!(e.attrs["uidnumber"], ["70001"]);
        assert!(crate::flags::disabled(&e.attrs, SystemTime::now()).is_some());
        let cookie = seed("paged_cookie");
        let ctrl = ldap3::controls::Control(
            None,
            RawControl {
                ctype: PAGED_RESULTS_OID.into(),
                crit: false,
                val: Some(cookie[1..].to_vec()),
            },
        );
        assert_eq!(page_cookie(&[ctrl]).ok(), Some(b"cookie".to_vec()));
        for n in ["entry", "paged_cookie", "dn", "injection", "time"] {
            fuzz_answer(&seed(n));
        }
        fuzz_answer(&[]);
        fuzz_answer(&[0, 0x64, 0x80]);
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        assert!(
            matches!(tls_config(Some(&p)), Err(SourceError::Config(m)) if m.contains("no PEM certificate"))
        );
        assert!(matches!(
            tls_config(Some(&dir.path().join("none.pem"))),
            Err(SourceError::Config(_))
        ));
        let (ca, _key) = rcgen_ca();
        std::fs::write(&p, ca.pem()).unwrap();
        assert!(tls_config(Some(&p)).is_ok());
    }

    fn rcgen_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }
}

//! The organisation's directory (OpenLDAP, Active Directory) as the source
//! of who may be a member of the vault (issue 16, part 2).
//!
//! With a `[directory]` table in `config.toml` ([`SourceConfig`]), a
//! member NAME must be, in that directory:
//!
//! - **an account** under `people` whose `uid` (OpenLDAP) or
//!   `sAMAccountName` (Active Directory) is NAME, exactly one;
//! - **in `members_group`** (and in `superusers_group` for what only
//!   superusers may do): `groupOfNames`/`groupOfUniqueNames` `member` /
//!   `uniqueMember` or `posixGroup` `memberUid`; on Active Directory
//!   nested groups count, through the in-chain matching rule
//!   (1.2.840.113556.1.4.1941);
//! - **not disabled**: ppolicy's `pwdAccountLockedTime`, AD's
//!   `userAccountControl` bit 0x2, an expired `shadowExpire` (see
//!   [`flags`]).
//!
//! [`Directory`] is what the daemon asks: [`Directory::lookup`] for one
//! name at enter, [`Directory::lookup_many`] for the periodic re-check of
//! everyone inside (one paged search for all the accounts), and
//! [`Directory::check_password`] for `check_password = true`.
//! [`LdapDirectory`] is the real one, [`FakeDirectory`] an in-memory one
//! for the daemon's tests.
//!
//! # The order at enter is the daemon's, and it matters
//!
//! The source must never become a guessing oracle, nor a way to lock a
//! member's organisation account. So the daemon, at enter:
//!
//! 1. throttles, and does the cheap checks through the **service
//!    account** ([`Directory::lookup`]: exists, in the group, not
//!    disabled). None of these involves the member's password.
//! 2. opens the keyslot with the password. A wrong password stops here:
//!    the directory never saw it.
//! 3. only then, with `check_password`, binds as the account
//!    ([`Directory::check_password`]). A guess reaches the directory only
//!    after it already opened the vault, so the directory's lockout
//!    counter sees no guesses, and the directory's answer teaches an
//!    attacker nothing the keyslot did not.
//!
//! A refusal at any step is one message to the person ("wrong password or
//! not allowed"); the detail ([`Refusal`], [`Disabled`]) goes to the audit
//! log. `check_password` sends the password to that directory (its
//! operators can see it) and makes the directory's stored hash a second,
//! often cheaper, offline check of it: it is off by default.
//!
//! # What this crate guarantees
//!
//! - Every value put into a filter is escaped (RFC 4515), every value put
//!   into a DN too (RFC 4514) ([`escape`]); both are property-tested to
//!   round-trip and never to add structure.
//! - Every search carries a size and a time limit, and a client-side
//!   timeout; referrals are never chased (a referral answer is an error);
//!   aliases are never dereferenced.
//! - An empty password is refused before any byte is sent (an empty
//!   simple bind is an anonymous bind, which "succeeds").
//! - Errors ([`SourceError`]) never carry a password; the service
//!   account's password is held in [`zeroize::Zeroizing`] memory (ldap3
//!   copies it into the bind request it encodes, which is not wiped).
//! - Entries are read without panicking on a malformed answer.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod escape;
pub mod fake;
pub mod flags;
pub mod ldap;
mod query;

pub use config::{Flavour, Ids, SourceConfig, Transport};
pub use fake::FakeDirectory;
pub use flags::Disabled;
pub use ldap::{LdapDirectory, Limits, Stats};

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that [`Directory`] can be used as `dyn Directory`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The organisation's directory, as the daemon asks it.
pub trait Directory: Send + Sync {
    /// The account NAME names, with its groups and disabled marks; `None`
    /// if there is none. More than one account with that name is
    /// [`SourceError::Ambiguous`].
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Account>, SourceError>>;

    /// Each of `names` looked up, in the order given (duplicates
    /// answered once each), with one search for all the accounts.
    fn lookup_many<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, Found)>, SourceError>>;

    /// Whether `password` binds as `dn`, on a connection of its own.
    /// `Ok(false)` for a refused bind (wrong password, or an account the
    /// directory locked: both answer invalidCredentials), and for an empty
    /// password or DN, without any network traffic: an empty simple bind
    /// is an unauthenticated bind (RFC 4513 section 5.1.2), which many
    /// servers answer "success". Implementations provide
    /// [`bind`](Directory::bind), never this.
    fn check_password<'a>(
        &'a self,
        dn: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<bool, SourceError>> {
        if password.is_empty() || dn.trim().is_empty() {
            return Box::pin(std::future::ready(Ok(false)));
        }
        self.bind(dn, password)
    }

    /// A simple bind as `dn` with `password` (neither empty: callers go
    /// through [`check_password`](Directory::check_password)), on a
    /// connection of its own; `Ok(false)` when refused.
    fn bind<'a>(
        &'a self,
        dn: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<bool, SourceError>>;
}

/// An account as found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// The name looked up.
    pub name: String,
    /// The account's DN, as the server gave it.
    pub dn: String,
    /// Why it is disabled, if it is.
    pub disabled: Option<Disabled>,
    /// Whether it is in `members_group`.
    pub in_members_group: bool,
    /// Whether it is in `superusers_group` (false when none is
    /// configured).
    pub in_superusers_group: bool,
    /// `uidNumber`, if the entry has exactly one readable value.
    pub uid_number: Option<u32>,
    /// `gidNumber`, likewise.
    pub gid_number: Option<u32>,
}

impl Account {
    /// Why this account may not be a member (or, with `as_superuser`, a
    /// superuser), if it may not.
    pub fn refusal(&self, as_superuser: bool) -> Option<Refusal> {
        if let Some(d) = &self.disabled {
            return Some(Refusal::Disabled(d.clone()));
        }
        if !self.in_members_group {
            return Some(Refusal::NotInMembersGroup);
        }
        if as_superuser && !self.in_superusers_group {
            return Some(Refusal::NotInSuperusersGroup);
        }
        None
    }
}

/// What [`Directory::lookup_many`] found for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Exactly one account.
    Account(Account),
    /// No account has that name.
    NoAccount,
    /// Several accounts have that name: none of them counts.
    Ambiguous {
        /// How many.
        entries: usize,
    },
}

impl Found {
    /// Why NAME may not be a member (or superuser), if it may not.
    pub fn refusal(&self, as_superuser: bool) -> Option<Refusal> {
        match self {
            Found::Account(a) => a.refusal(as_superuser),
            Found::NoAccount => Some(Refusal::NoAccount),
            Found::Ambiguous { entries } => Some(Refusal::Ambiguous { entries: *entries }),
        }
    }
}

/// Why the directory does not let NAME in, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// No account under `people` has that name.
    NoAccount,
    /// Several accounts have that name.
    Ambiguous {
        /// How many.
        entries: usize,
    },
    /// The account is disabled.
    Disabled(Disabled),
    /// The account is not in `members_group`.
    NotInMembersGroup,
    /// The account is not in `superusers_group`.
    NotInSuperusersGroup,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoAccount => f.write_str("no account of that name in the directory"),
            Refusal::Ambiguous { entries } => {
                write!(f, "{entries} accounts of that name in the directory")
            }
            Refusal::Disabled(d) => write!(f, "the directory's account is {d}"),
            Refusal::NotInMembersGroup => f.write_str("the account is not in members_group"),
            Refusal::NotInSuperusersGroup => f.write_str("the account is not in superusers_group"),
        }
    }
}

/// What went wrong talking to the directory. No variant ever holds a
/// password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The `[directory]` table, or a file it names, is wrong.
    #[error("[directory]: {0}")]
    Config(String),
    /// The server could not be reached, or did not answer in time.
    #[error("the directory at {url} cannot be reached: {reason}")]
    Unreachable {
        /// The configured URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// TLS failed: most often the server's certificate is not trusted
    /// (set `ca_file`) or does not name the URL's host.
    #[error(
        "TLS with the directory at {url} failed: {reason} (check ca_file and the url's host name)"
    )]
    Tls {
        /// The configured URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The service account's bind was refused.
    #[error(
        "the directory refused the service account {bind_dn:?} (result {code}{}): check bind_dn and bind_password_file",
        if .message.is_empty() { String::new() } else { format!(", {}", .message) }
    )]
    ServiceBind {
        /// `bind_dn`.
        bind_dn: String,
        /// The LDAP result code (49: invalid credentials).
        code: u32,
        /// The server's diagnostic text, cut short.
        message: String,
    },
    /// More than one account has the name looked up.
    #[error(
        "{entries} or more accounts under people have the name {name:?}: the directory must name one"
    )]
    Ambiguous {
        /// The name.
        name: String,
        /// How many entries, at least (a lookup asks for at most 2 and
        /// counts a size-limit answer as 3).
        entries: usize,
    },
    /// The server answered something this crate does not accept: an
    /// error result, a referral, a malformed entry.
    #[error("the directory answered unexpectedly: {0}")]
    Protocol(String),
}

impl SourceError {
    /// Whether this is the source being unreachable (as opposed to
    /// refusing or being misconfigured): the daemon keeps members inside
    /// up to `max_stale_s` on these.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SourceError::Unreachable { .. } | SourceError::Tls { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            name: "alice".into(),
            dn: "uid=alice,ou=people,dc=example,dc=org".into(),
            disabled: None,
            in_members_group: true,
            in_superusers_group: false,
            uid_number: None,
            gid_number: None,
        }
    }

    #[test]
    fn refusals_in_order() {
        let mut a = account();
        assert_eq!(a.refusal(false), None);
        assert_eq!(a.refusal(true), Some(Refusal::NotInSuperusersGroup));
        a.in_members_group = false;
        assert_eq!(a.refusal(false), Some(Refusal::NotInMembersGroup));
        a.disabled = Some(Disabled::Locked {
            since: "000001010000Z".into(),
        });
        assert!(matches!(a.refusal(false), Some(Refusal::Disabled(_))));
        assert_eq!(Found::NoAccount.refusal(false), Some(Refusal::NoAccount));
        assert!(
            Refusal::Disabled(Disabled::Locked { since: "x".into() })
                .to_string()
                .contains("locked")
        );
    }

    #[test]
    fn the_trait_is_object_safe() {
        let d: Box<dyn Directory> = Box::new(FakeDirectory::new());
        let _ = d;
    }

    #[test]
    fn service_bind_message_says_what_to_do() {
        let e = SourceError::ServiceBind {
            bind_dn: "cn=coffre".into(),
            code: 49,
            message: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "the directory refused the service account \"cn=coffre\" (result 49): check bind_dn and bind_password_file"
        );
        assert!(!e.is_unreachable());
    }
}

//! The vault's read-only LDAP server for its VMs.
//!
//! A VM needs to know who its users are (their uid, groups, home, shell,
//! SSH keys) and, for a password login or `sudo`, whether a password is
//! right. This server tells it, over LDAP, what the daemon allows that
//! VM to know, and nothing about anyone else.
//!
//! # The security model
//!
//! **A process of its own.** The server parses bytes from guests, with a
//! codec we did not write (`ldap3_proto`, used unmodified). So it runs as
//! its own process (`coffre ldap-server`), as an unprivileged user with
//! no capability, `no_new_privs`, not dumpable, killed with the daemon.
//! It holds no volume key and no CA key: only the directory (names,
//! numbers, public keys), the argon2id *verifiers* of the members'
//! workload passwords (never the passwords; a workload password is not
//! a vault password), and its own TLS key. Taking it over gives the
//! verifiers to brute-force, nothing that opens the vault.
//!
//! **Per-VM views.** A connection is known by its source address on the
//! vault network (which the daemon's firewall keeps honest: a VM cannot
//! spoof another's). An address the directory names no client for is
//! closed at accept. Each client sees exactly its users and its groups,
//! and a group's `memberUid` only lists the users it sees. A directory
//! from the daemon replaces the old one at once: a user removed is gone
//! at the next operation, on open connections too.
//!
//! **TLS only.** Nothing is answered in clear: on the plain port
//! (389), only StartTLS (and unbind, abandon) is accepted; a StartTLS
//! with requests pipelined behind it is refused (those bytes would be
//! read as if they had come through TLS). Without a TLS configuration,
//! connections are closed.
//!
//! **Binds.** Anonymous binds succeed (and give nothing more than a bind
//! does: every search answers the same). A simple bind as
//! `uid=NAME,ou=people,BASE` with the member's workload password
//! succeeds only if this client sees NAME, the vault is not locked, NAME
//! has a live session, NAME has a verifier and the password matches it.
//! Every refusal is `invalidCredentials` with the same text. Only the
//! last check costs anything: the others answer at once.
//!
//! **The KDF pool.** Password checks run on one thread, one at a time,
//! behind a queue of 8; a full queue answers `busy`. Verifiers are
//! bounded on receipt (argon2id, m ≤ 256 MiB, t ≤ 16, p ≤ 8): the daemon's
//! input cannot make a check unbounded either.
//!
//! **The throttle.** After a wrong password, that (address, user) pair
//! waits 1 s, doubling to 60 s, before the KDF runs for it again (binds
//! meanwhile are refused at once); a right password clears it. Nothing
//! else is affected: no lockout, no other pair slowed. Every bind's
//! outcome goes to the daemon as an event for its audit log (never a
//! password, never a name that is no user's).
//!
//! # Modules
//!
//! - [`spec`]: what the daemon sends, validated on receipt.
//! - [`dn`]: distinguished names, parsed and normalised.
//! - [`eval`]: search filters (three-valued), pure.
//! - [`tree`]: the tree a client sees, and the root DSE.
//! - [`session`]: one connection's requests and answers, without I/O.
//! - [`throttle`], [`kdf`]: the bind throttle and the KDF pool.
//! - [`server`]: listeners, TLS, framing, caps and timeouts.
//! - [`control`]: the process the daemon starts and drives.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod dn;
pub mod eval;
pub mod kdf;
pub mod server;
pub mod session;
pub mod spec;
pub mod throttle;
pub mod tree;

/// The codec, for callers that build or read messages.
pub use ldap3_proto;
pub use server::{Event, Outcome, Server};
pub use session::{After, Session};
pub use spec::{Client, DirectorySpec, Group, Live, User};

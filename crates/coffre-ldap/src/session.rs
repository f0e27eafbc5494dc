//! One connection's requests and their answers, without I/O: what the
//! connection threads and the fuzz target call.

use crate::dn::Dn;
use crate::eval::{self, Selection, Tri};
use crate::server::{Outcome, Server};
use crate::tree::{self, OID_NOTICE_OF_DISCONNECTION, OID_STARTTLS, OID_WHOAMI};
use ldap3_proto::control::LdapControl;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindRequest, LdapBindResponse, LdapCompareRequest, LdapExtendedRequest,
    LdapExtendedResponse, LdapFilter, LdapMsg, LdapOp, LdapResult, LdapResultCode,
    LdapSearchRequest, LdapSearchResultEntry, LdapSearchScope,
};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;
use zeroize::Zeroizing;

/// Entries one search returns at most, whatever the client asks.
pub const MAX_RESULTS: usize = 1000;
/// Paged searches one connection may leave open; the oldest goes first.
pub const MAX_PAGED_SEARCHES: usize = 4;
/// The text of every refused bind, whatever the reason: a client learns
/// nothing from it.
pub const REFUSED: &str = "invalid credentials";

/// What the connection does after answering.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Reads the next request.
    Continue,
    /// Starts TLS on the connection (the answer was sent in clear).
    StartTls,
    /// Closes it.
    Close,
}

/// A paged search left open (RFC 2696): what it asked, and the names it
/// has yet to return (each looked up again, in the tree of the moment,
/// when its page comes).
struct Paged {
    cookie: Vec<u8>,
    base: Dn,
    scope: LdapSearchScope,
    filter: LdapFilter,
    attrs: Vec<String>,
    types_only: bool,
    left: VecDeque<String>,
    truncated: bool,
}

/// One connection's state.
pub struct Session {
    /// The client's address.
    pub peer: IpAddr,
    /// Whether TLS is on (LDAPS, or after StartTLS).
    pub tls: bool,
    bound: Option<String>,
    paged: VecDeque<Paged>,
    cookies: u64,
}

impl Session {
    /// A new connection from `peer`.
    pub fn new(peer: IpAddr, tls: bool) -> Self {
        Self {
            peer: crate::spec::canonical_ip(peer),
            tls,
            bound: None,
            paged: VecDeque::new(),
            cookies: 0,
        }
    }

    /// The user this connection is bound as.
    pub fn bound(&self) -> Option<&str> {
        self.bound.as_deref()
    }
}

fn result(code: LdapResultCode, matched: &str, message: &str) -> LdapResult {
    LdapResult {
        code,
        matcheddn: matched.to_string(),
        message: message.to_string(),
        referral: Vec::new(),
    }
}

fn msg(msgid: i32, op: LdapOp) -> LdapMsg {
    LdapMsg {
        msgid,
        op,
        ctrl: Vec::new(),
    }
}

/// The answer to a request of `op`'s kind with `res`, or `None` for the
/// requests that have none (unbind, abandon) or are not requests.
fn answer(op: &LdapOp, res: LdapResult) -> Option<LdapOp> {
    Some(match op {
        LdapOp::BindRequest(_) => LdapOp::BindResponse(LdapBindResponse {
            res,
            saslcreds: None,
        }),
        LdapOp::SearchRequest(_) => LdapOp::SearchResultDone(res),
        LdapOp::ModifyRequest(_) => LdapOp::ModifyResponse(res),
        LdapOp::AddRequest(_) => LdapOp::AddResponse(res),
        LdapOp::DelRequest(_) => LdapOp::DelResponse(res),
        LdapOp::ModifyDNRequest(_) => LdapOp::ModifyDNResponse(res),
        LdapOp::CompareRequest(_) => LdapOp::CompareResult(res),
        LdapOp::ExtendedRequest(_) => LdapOp::ExtendedResponse(LdapExtendedResponse {
            res,
            name: None,
            value: None,
        }),
        _ => return None,
    })
}

/// The unsolicited notice sent before closing a connection whose request
/// made no sense (RFC 4511 §4.4.1).
pub fn notice_of_disconnection() -> LdapMsg {
    msg(
        0,
        LdapOp::ExtendedResponse(LdapExtendedResponse {
            res: result(LdapResultCode::ProtocolError, "", "malformed request"),
            name: Some(OID_NOTICE_OF_DISCONNECTION.into()),
            value: None,
        }),
    )
}

/// Whether a control we do not implement is marked critical (RFC 4511
/// §4.1.11: the operation must then fail).
fn unsupported_critical(ctrl: &[LdapControl]) -> bool {
    ctrl.iter().any(|c| match c {
        LdapControl::Unknown { criticality, .. }
        | LdapControl::SyncRequest { criticality, .. }
        | LdapControl::ManageDsaIT { criticality }
        | LdapControl::PasswordPolicyRequest { criticality }
        | LdapControl::ExtendedDn { criticality, .. } => *criticality,
        _ => false,
    })
}

impl Server {
    /// Answers one request. `pipelined`: the client sent more after it
    /// (only StartTLS cares).
    pub fn handle(&self, s: &mut Session, m: LdapMsg, pipelined: bool) -> (Vec<LdapMsg>, After) {
        let LdapMsg { msgid, op, ctrl } = m;
        match &op {
            LdapOp::UnbindRequest => return (Vec::new(), After::Close),
            // Every operation is answered before the next is read.
            LdapOp::AbandonRequest(_) => return (Vec::new(), After::Continue),
            LdapOp::ExtendedRequest(r) if r.name == OID_STARTTLS => {
                return self.start_tls(s, msgid, pipelined);
            }
            _ => {}
        }
        if !s.tls {
            // In clear, nothing but StartTLS: not even an anonymous search.
            return match answer(
                &op,
                result(
                    LdapResultCode::ConfidentialityRequired,
                    "",
                    "use StartTLS (ldap:// with -ZZ) or ldaps://",
                ),
            ) {
                Some(a) => (vec![msg(msgid, a)], After::Continue),
                None => (vec![notice_of_disconnection()], After::Close),
            };
        }
        if unsupported_critical(&ctrl)
            && let Some(a) = answer(
                &op,
                result(
                    LdapResultCode::UnavailableCriticalExtension,
                    "",
                    "a critical control this server does not implement",
                ),
            )
        {
            return (vec![msg(msgid, a)], After::Continue);
        }
        match op {
            LdapOp::BindRequest(req) => (vec![self.bind(s, msgid, req)], After::Continue),
            LdapOp::SearchRequest(req) => (self.search(s, msgid, req, &ctrl), After::Continue),
            LdapOp::ExtendedRequest(req) => (vec![self.extended(s, msgid, &req)], After::Continue),
            LdapOp::CompareRequest(req) => (vec![self.compare(s, msgid, &req)], After::Continue),
            op @ (LdapOp::AddRequest(_)
            | LdapOp::ModifyRequest(_)
            | LdapOp::DelRequest(_)
            | LdapOp::ModifyDNRequest(_)) => {
                let res = result(
                    LdapResultCode::UnwillingToPerform,
                    "",
                    "read-only directory",
                );
                match answer(&op, res) {
                    Some(a) => (vec![msg(msgid, a)], After::Continue),
                    None => (Vec::new(), After::Continue),
                }
            }
            // A response, or an intermediate one: a client does not send those.
            _ => (vec![notice_of_disconnection()], After::Close),
        }
    }

    fn start_tls(&self, s: &Session, msgid: i32, pipelined: bool) -> (Vec<LdapMsg>, After) {
        let reply = |code, text: &str| {
            msg(
                msgid,
                LdapOp::ExtendedResponse(LdapExtendedResponse {
                    res: result(code, "", text),
                    name: Some(OID_STARTTLS.into()),
                    value: None,
                }),
            )
        };
        if s.tls {
            return (
                vec![reply(LdapResultCode::OperationsError, "TLS is already on")],
                After::Continue,
            );
        }
        if pipelined {
            return (
                vec![reply(
                    LdapResultCode::OperationsError,
                    "requests sent after StartTLS before its answer",
                )],
                After::Close,
            );
        }
        (vec![reply(LdapResultCode::Success, "")], After::StartTls)
    }

    fn bind(&self, s: &mut Session, msgid: i32, req: LdapBindRequest) -> LdapMsg {
        self.stats.binds.fetch_add(1, Ordering::Relaxed);
        // Whatever happens next, the connection is anonymous until a bind
        // succeeds (RFC 4511 §4.2.1).
        s.bound = None;
        let reply = |code, text: &str| {
            msg(
                msgid,
                LdapOp::BindResponse(LdapBindResponse {
                    res: result(code, "", text),
                    saslcreds: None,
                }),
            )
        };
        if req.version != 3 {
            return reply(LdapResultCode::ProtocolError, "LDAP version 3 only");
        }
        let password = match req.cred {
            LdapBindCred::Simple(p) => Zeroizing::new(p.into_bytes()),
            LdapBindCred::SASL(mut sasl) => {
                zeroize::Zeroize::zeroize(&mut sasl.credentials);
                return reply(LdapResultCode::AuthMethodNotSupported, "simple binds only");
            }
            LdapBindCred::Unsupported => {
                return reply(LdapResultCode::AuthMethodNotSupported, "simple binds only");
            }
        };
        if req.dn.is_empty() && password.is_empty() {
            return reply(LdapResultCode::Success, "");
        }
        let outcome = self.check_bind(s.peer, &req.dn, password);
        let (outcome, user) = outcome;
        let dir = self.directory();
        self.event(s.peer, dir.workload(s.peer), &user, outcome);
        match outcome {
            Outcome::Ok => {
                s.bound = Some(user);
                reply(LdapResultCode::Success, "")
            }
            Outcome::Busy => reply(LdapResultCode::Busy, "busy: try again"),
            _ => reply(LdapResultCode::InvalidCredentials, REFUSED),
        }
    }

    /// What a simple bind as `dn` with `password` from `ip` comes to, and
    /// the known user's name it named ("" if none).
    fn check_bind(&self, ip: IpAddr, dn: &str, password: Zeroizing<Vec<u8>>) -> (Outcome, String) {
        let dir = self.directory();
        let Some(name) = Dn::parse(dn).ok().and_then(|d| dir.bind_name(&d)) else {
            return (Outcome::NotPermitted, String::new());
        };
        if !dir.accounts.contains_key(&name) {
            return (Outcome::NotPermitted, String::new());
        }
        // Checked before the KDF runs, and again after (the state may have
        // changed while it ran).
        let gate = |dir: &crate::spec::Directory| -> Option<Outcome> {
            let live = self.live();
            if !dir.sees(ip, &name) {
                Some(Outcome::NotPermitted)
            } else if live.locked {
                Some(Outcome::Locked)
            } else if !live.present.contains(&name) {
                Some(Outcome::NoSession)
            } else {
                None
            }
        };
        if let Some(o) = gate(&dir) {
            return (o, name);
        }
        let Some(verifier) = dir.accounts.get(&name).and_then(|u| u.verifier.clone()) else {
            return (Outcome::NoPassword, name);
        };
        // RFC 4513 §5.1.2: a name with an empty password is an
        // unauthenticated bind, which we refuse (without the KDF).
        if password.is_empty() {
            return (Outcome::WrongPassword, name);
        }
        drop(dir);
        let lock = || self.throttle.lock().unwrap_or_else(|p| p.into_inner());
        if !lock().begin(ip, &name, Instant::now()) {
            return (Outcome::Throttled, name);
        }
        let right = match self.kdf.verify(&verifier, password) {
            Ok(r) => r,
            Err(crate::kdf::Busy) => {
                lock().record(ip, &name, None, Instant::now());
                return (Outcome::Busy, name);
            }
        };
        lock().record(ip, &name, Some(right), Instant::now());
        if !right {
            return (Outcome::WrongPassword, name);
        }
        if let Some(o) = gate(&self.directory()) {
            return (o, name);
        }
        (Outcome::Ok, name)
    }

    fn extended(&self, s: &Session, msgid: i32, req: &LdapExtendedRequest) -> LdapMsg {
        let res = if req.name == OID_WHOAMI {
            let dir = self.directory();
            let who = match &s.bound {
                Some(name) if dir.sees(s.peer, name) => {
                    format!("dn:{}", dir.base().child("ou", "people").child("uid", name))
                }
                _ => String::new(),
            };
            LdapExtendedResponse {
                res: result(LdapResultCode::Success, "", ""),
                name: None,
                value: Some(who.into_bytes()),
            }
        } else {
            LdapExtendedResponse {
                res: result(
                    LdapResultCode::ProtocolError,
                    "",
                    "unsupported extended operation",
                ),
                name: None,
                value: None,
            }
        };
        msg(msgid, LdapOp::ExtendedResponse(res))
    }

    fn compare(&self, s: &Session, msgid: i32, req: &LdapCompareRequest) -> LdapMsg {
        let reply =
            |code, matched: &str| msg(msgid, LdapOp::CompareResult(result(code, matched, "")));
        let Ok(dn) = Dn::parse(&req.dn) else {
            return reply(LdapResultCode::InvalidDNSyntax, "");
        };
        let Some(tree) = self.directory().tree(s.peer) else {
            return reply(LdapResultCode::NoSuchObject, "");
        };
        let Some(entry) = tree.get(&dn) else {
            return reply(LdapResultCode::NoSuchObject, "");
        };
        let value = String::from_utf8_lossy(&req.val).into_owned();
        match eval::eval(&LdapFilter::Equality(req.atype.clone(), value), entry) {
            Tri::True => reply(LdapResultCode::CompareTrue, ""),
            Tri::False => reply(LdapResultCode::CompareFalse, ""),
            Tri::Undefined if eval::attribute(&req.atype).is_none() => {
                reply(LdapResultCode::UndefinedAttributeType, "")
            }
            Tri::Undefined => reply(LdapResultCode::InappropriateMatching, ""),
        }
    }

    fn search(
        &self,
        s: &mut Session,
        msgid: i32,
        req: LdapSearchRequest,
        ctrl: &[LdapControl],
    ) -> Vec<LdapMsg> {
        self.stats.searches.fetch_add(1, Ordering::Relaxed);
        let done = |code, matched: &str, text: &str, ctrl: Vec<LdapControl>| LdapMsg {
            msgid,
            op: LdapOp::SearchResultDone(result(code, matched, text)),
            ctrl,
        };
        let paging = ctrl.iter().find_map(|c| match c {
            LdapControl::SimplePagedResults { size, cookie } => Some((*size, cookie.clone())),
            _ => None,
        });
        let Ok(base) = Dn::parse(&req.base) else {
            return vec![done(LdapResultCode::InvalidDNSyntax, "", "", Vec::new())];
        };
        let dir = self.directory();
        if base.is_root() {
            // The root DSE, for a base search only.
            if !matches!(req.scope, LdapSearchScope::Base) {
                return vec![done(LdapResultCode::NoSuchObject, "", "", Vec::new())];
            }
            let mut out = Vec::new();
            let dse = tree::root_dse(dir.base());
            if eval::eval(&req.filter, &dse) == Tri::True {
                out.push(msg(
                    msgid,
                    LdapOp::SearchResultEntry(LdapSearchResultEntry {
                        dn: String::new(),
                        attributes: Selection::new(&req.attrs).apply(&dse, true, req.typesonly),
                    }),
                ));
            }
            let ctrl = paging
                .map(|_| {
                    vec![LdapControl::SimplePagedResults {
                        size: 0,
                        cookie: Vec::new(),
                    }]
                })
                .unwrap_or_default();
            out.push(done(LdapResultCode::Success, "", "", ctrl));
            return out;
        }
        let Some(tree) = dir.tree(s.peer) else {
            return vec![done(LdapResultCode::NoSuchObject, "", "", Vec::new())];
        };
        let selection = Selection::new(&req.attrs);
        let entry_msg = |e: &eval::Entry| {
            msg(
                msgid,
                LdapOp::SearchResultEntry(LdapSearchResultEntry {
                    dn: e.dn.clone(),
                    attributes: selection.apply(e, false, req.typesonly),
                }),
            )
        };
        let page_control =
            |cookie: Vec<u8>| vec![LdapControl::SimplePagedResults { size: 0, cookie }];

        // A page after the first.
        if let Some((size, cookie)) = &paging
            && !cookie.is_empty()
        {
            let Some(at) = s.paged.iter().position(|p| &p.cookie == cookie) else {
                return vec![done(
                    LdapResultCode::UnwillingToPerform,
                    "",
                    "unknown or expired paged results cookie",
                    Vec::new(),
                )];
            };
            let Some(mut p) = s.paged.remove(at) else {
                return Vec::new();
            };
            if p.base != base || p.scope != req.scope || p.filter != req.filter {
                return vec![done(
                    LdapResultCode::UnwillingToPerform,
                    "",
                    "a paged results cookie from another search",
                    Vec::new(),
                )];
            }
            // Size 0 abandons the search (RFC 2696 §3).
            if *size <= 0 {
                return vec![done(
                    LdapResultCode::Success,
                    "",
                    "",
                    page_control(Vec::new()),
                )];
            }
            let n = usize::try_from(*size)
                .unwrap_or(MAX_RESULTS)
                .min(MAX_RESULTS);
            let mut out = Vec::new();
            let sel = Selection::new(&p.attrs);
            for name in p.left.drain(..n.min(p.left.len())) {
                // Looked up again: gone since the first page means not sent.
                let Ok(dn) = Dn::parse(&name) else { continue };
                if let Some(e) = tree.get(&dn)
                    && eval::eval(&p.filter, e) == Tri::True
                {
                    out.push(msg(
                        msgid,
                        LdapOp::SearchResultEntry(LdapSearchResultEntry {
                            dn: e.dn.clone(),
                            attributes: sel.apply(e, false, p.types_only),
                        }),
                    ));
                }
            }
            if p.left.is_empty() {
                let code = if p.truncated {
                    LdapResultCode::SizeLimitExceeded
                } else {
                    LdapResultCode::Success
                };
                out.push(done(code, "", "", page_control(Vec::new())));
            } else {
                let cookie = p.cookie.clone();
                s.paged.push_back(p);
                out.push(done(LdapResultCode::Success, "", "", page_control(cookie)));
            }
            return out;
        }

        let mut found = match tree.search(&base, &req.scope, &req.filter) {
            Ok(f) => f,
            Err(e) => {
                return vec![done(
                    LdapResultCode::NoSuchObject,
                    &e.matched,
                    "",
                    Vec::new(),
                )];
            }
        };
        let limit = match usize::try_from(req.sizelimit) {
            Ok(n) if n > 0 => n.min(MAX_RESULTS),
            _ => MAX_RESULTS,
        };
        let truncated = found.len() > limit;
        found.truncate(limit);
        let limited = if truncated {
            LdapResultCode::SizeLimitExceeded
        } else {
            LdapResultCode::Success
        };
        match paging {
            Some((size, _)) if size > 0 && usize::try_from(size).is_ok_and(|n| n < found.len()) => {
                let n = usize::try_from(size).unwrap_or(MAX_RESULTS);
                let mut out: Vec<LdapMsg> = found[..n].iter().map(|e| entry_msg(e)).collect();
                s.cookies += 1;
                let cookie = s.cookies.to_be_bytes().to_vec();
                if s.paged.len() >= MAX_PAGED_SEARCHES {
                    s.paged.pop_front();
                }
                s.paged.push_back(Paged {
                    cookie: cookie.clone(),
                    base,
                    scope: req.scope.clone(),
                    filter: req.filter.clone(),
                    attrs: req.attrs.clone(),
                    types_only: req.typesonly,
                    left: found[n..].iter().map(|e| e.dn.clone()).collect(),
                    truncated,
                });
                out.push(done(LdapResultCode::Success, "", "", page_control(cookie)));
                out
            }
            Some(_) => {
                let mut out: Vec<LdapMsg> = found.iter().map(|e| entry_msg(e)).collect();
                out.push(done(limited, "", "", page_control(Vec::new())));
                out
            }
            None => {
                let mut out: Vec<LdapMsg> = found.iter().map(|e| entry_msg(e)).collect();
                out.push(done(limited, "", "", Vec::new()));
                out
            }
        }
    }
}

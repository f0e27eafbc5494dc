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
        {
            let mut t = lock();
            if t.address_busy(ip) || t.checking(ip, &name) {
                return (Outcome::Busy, name);
            }
            if !t.begin(ip, &name, Instant::now()) {
                return (Outcome::Throttled, name);
            }
        }
        // Recorded whatever happens (a panic included): a pair left
        // "checking" would hold its address's few checks for good.
        struct Checking<'a, F: Fn() -> std::sync::MutexGuard<'a, crate::throttle::Throttle>> {
            lock: F,
            ip: std::net::IpAddr,
            name: &'a str,
            right: Option<bool>,
        }
        impl<'a, F: Fn() -> std::sync::MutexGuard<'a, crate::throttle::Throttle>> Drop for Checking<'a, F> {
            fn drop(&mut self) {
                (self.lock)().record(self.ip, self.name, self.right, Instant::now());
            }
        }
        let mut checking = Checking {
            lock,
            ip,
            name: &name,
            right: None,
        };
        let right = match self.kdf.verify(&verifier, password) {
            Ok(r) => r,
            Err(crate::kdf::Busy) => {
                drop(checking);
                return (Outcome::Busy, name);
            }
        };
        checking.right = Some(right);
        drop(checking);
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
            Err(crate::tree::Refused::NoBase(e)) => {
                return vec![done(
                    LdapResultCode::NoSuchObject,
                    &e.matched,
                    "",
                    Vec::new(),
                )];
            }
            Err(crate::tree::Refused::TooCostly) => {
                return vec![done(
                    LdapResultCode::AdminLimitExceeded,
                    "",
                    "the filter is too large for this search",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Live;
    use crate::spec::tests::verifier;
    use ldap3_proto::parse_ldap_filter_str;

    const VM1: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 10));
    const BASE: &str = "dc=team,dc=coffre";

    fn server() -> Server {
        let s = Server::new().unwrap();
        let mut spec = crate::tree::tests::spec();
        spec.users[0].verifier = Some(verifier("right"));
        spec.users[2].verifier = Some(verifier("carols"));
        s.set_directory(spec).unwrap();
        s.set_live(Live {
            locked: false,
            present: vec!["alice".into(), "bob".into(), "carol".into()],
        });
        s
    }

    fn search(base: &str, filter: &str, sizelimit: i32, ctrl: Vec<LdapControl>) -> LdapMsg {
        LdapMsg {
            msgid: 2,
            op: LdapOp::SearchRequest(LdapSearchRequest {
                base: base.into(),
                scope: LdapSearchScope::Subtree,
                aliases: ldap3_proto::proto::LdapDerefAliases::Never,
                sizelimit,
                timelimit: 0,
                typesonly: false,
                filter: parse_ldap_filter_str(filter).unwrap(),
                attrs: vec![],
            }),
            ctrl,
        }
    }

    fn bind(dn: &str, pw: &str) -> LdapMsg {
        msg(
            1,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: dn.into(),
                cred: LdapBindCred::Simple(pw.into()),
            }),
        )
    }

    fn code(m: &LdapMsg) -> LdapResultCode {
        match &m.op {
            LdapOp::BindResponse(r) => r.res.code.clone(),
            LdapOp::SearchResultDone(r) | LdapOp::CompareResult(r) | LdapOp::AddResponse(r) => {
                r.code.clone()
            }
            LdapOp::ExtendedResponse(r) => r.res.code.clone(),
            other => panic!("not a result: {other:?}"),
        }
    }

    fn dns(out: &[LdapMsg]) -> Vec<String> {
        out.iter()
            .filter_map(|m| match &m.op {
                LdapOp::SearchResultEntry(e) => Some(e.dn.clone()),
                _ => None,
            })
            .collect()
    }

    fn alice() -> String {
        format!("uid=alice,ou=people,{BASE}")
    }

    fn whoami(s: &Server, sess: &mut Session) -> Vec<u8> {
        let req = msg(
            3,
            LdapOp::ExtendedRequest(LdapExtendedRequest {
                name: OID_WHOAMI.into(),
                value: None,
            }),
        );
        let (out, _) = s.handle(sess, req, false);
        match &out[0].op {
            LdapOp::ExtendedResponse(r) => r.value.clone().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn in_clear_only_starttls_is_answered() {
        let s = server();
        let mut sess = Session::new(VM1, false);
        let (out, after) = s.handle(&mut sess, search(BASE, "(objectClass=*)", 0, vec![]), false);
        assert_eq!(out.len(), 1, "no entry in clear");
        assert_eq!(code(&out[0]), LdapResultCode::ConfidentialityRequired);
        assert_eq!(after, After::Continue);
        let (out, _) = s.handle(&mut sess, bind(&alice(), "right"), false);
        assert_eq!(code(&out[0]), LdapResultCode::ConfidentialityRequired);
        assert_eq!(s.drain_events().0.len(), 0, "no bind was tried");
        let starttls = || {
            msg(
                4,
                LdapOp::ExtendedRequest(LdapExtendedRequest {
                    name: OID_STARTTLS.into(),
                    value: None,
                }),
            )
        };
        let (out, after) = s.handle(&mut sess, starttls(), true);
        assert_eq!(code(&out[0]), LdapResultCode::OperationsError);
        assert_eq!(after, After::Close, "pipelined bytes after StartTLS");
        let (out, after) = s.handle(&mut sess, starttls(), false);
        assert_eq!(code(&out[0]), LdapResultCode::Success);
        assert_eq!(after, After::StartTls);
        sess.tls = true;
        let (out, after) = s.handle(&mut sess, starttls(), false);
        assert_eq!(code(&out[0]), LdapResultCode::OperationsError);
        assert_eq!(after, After::Continue);
        let (_, after) = s.handle(&mut sess, msg(5, LdapOp::UnbindRequest), false);
        assert_eq!(after, After::Close);
    }

    #[test]
    fn binds_check_everything_and_say_nothing() {
        let s = server();
        let mut sess = Session::new(VM1, true);
        let bind_code = |sess: &mut Session, dn: &str, pw: &str| {
            let (out, _) = s.handle(sess, bind(dn, pw), false);
            code(&out[0])
        };
        assert_eq!(
            bind_code(&mut sess, "", ""),
            LdapResultCode::Success,
            "anonymous"
        );
        assert!(whoami(&s, &mut sess).is_empty());
        assert_eq!(
            bind_code(
                &mut sess,
                "UID=Alice, OU=People, DC=Team,DC=Coffre",
                "right"
            ),
            LdapResultCode::Success
        );
        assert_eq!(
            whoami(&s, &mut sess),
            format!("dn:{}", alice()).into_bytes()
        );
        let refused = LdapResultCode::InvalidCredentials;
        assert_eq!(
            bind_code(&mut sess, &alice(), ""),
            refused,
            "unauthenticated bind"
        );
        assert!(
            whoami(&s, &mut sess).is_empty(),
            "a failed bind leaves it anonymous"
        );
        assert_eq!(bind_code(&mut sess, "", "right"), refused);
        assert_eq!(
            bind_code(&mut sess, &format!("uid=bob,ou=people,{BASE}"), "x"),
            refused
        );
        assert_eq!(
            bind_code(&mut sess, &format!("uid=carol,ou=people,{BASE}"), "carols"),
            refused
        );
        assert_eq!(
            bind_code(&mut sess, &format!("uid=zed,ou=people,{BASE}"), "x"),
            refused
        );
        assert_eq!(bind_code(&mut sess, "not a dn", "x"), refused);
        s.set_live(Live {
            locked: false,
            present: vec![],
        });
        assert_eq!(bind_code(&mut sess, &alice(), "right"), refused);
        s.set_live(Live {
            locked: true,
            present: vec!["alice".into()],
        });
        assert_eq!(bind_code(&mut sess, &alice(), "right"), refused);
        s.set_live(Live {
            locked: false,
            present: vec!["alice".into()],
        });
        assert_eq!(bind_code(&mut sess, &alice(), "wrong"), refused);
        assert_eq!(
            bind_code(&mut sess, &alice(), "right"),
            refused,
            "throttled"
        );
        let sasl = msg(
            1,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: String::new(),
                cred: LdapBindCred::SASL(ldap3_proto::proto::SaslCredentials {
                    mechanism: "EXTERNAL".into(),
                    credentials: vec![],
                }),
            }),
        );
        let (out, _) = s.handle(&mut sess, sasl, false);
        assert_eq!(code(&out[0]), LdapResultCode::AuthMethodNotSupported);

        // Every refusal reads the same.
        let (events, dropped) = s.drain_events();
        assert_eq!(dropped, 0);
        let got: Vec<(&str, Outcome)> = events
            .iter()
            .map(|e| (e.user.as_str(), e.outcome))
            .collect();
        use Outcome::*;
        assert_eq!(
            got,
            [
                ("alice", Ok),
                ("alice", WrongPassword),
                ("", NotPermitted),
                ("bob", NoPassword),
                ("carol", NotPermitted),
                ("", NotPermitted),
                ("", NotPermitted),
                ("alice", NoSession),
                ("alice", Locked),
                ("alice", WrongPassword),
                ("alice", Throttled),
            ]
        );
        assert!(
            events
                .iter()
                .all(|e| e.workload == "vm1" && e.client == "10.9.0.10")
        );
        assert!(s.drain_events().0.is_empty(), "drained");
    }

    #[test]
    fn searches_see_the_directory_of_the_moment() {
        let s = server();
        let mut sess = Session::new(VM1, true);
        let (out, _) = s.handle(&mut sess, search(BASE, "(uid=*)", 0, vec![]), false);
        assert_eq!(dns(&out).len(), 2);
        let mut spec = crate::tree::tests::spec();
        spec.clients[0].users.retain(|u| u != "bob");
        s.set_directory(spec).unwrap();
        let (out, _) = s.handle(&mut sess, search(BASE, "(uid=*)", 0, vec![]), false);
        assert_eq!(dns(&out), [alice()]);
        let (out, _) = s.handle(&mut sess, search("dc=other", "(uid=*)", 0, vec![]), false);
        assert_eq!(code(&out[0]), LdapResultCode::NoSuchObject);
        let (out, _) = s.handle(&mut sess, search("uid=", "(uid=*)", 0, vec![]), false);
        assert_eq!(code(&out[0]), LdapResultCode::InvalidDNSyntax);
    }

    #[test]
    fn size_limits_and_critical_controls() {
        let s = server();
        let mut sess = Session::new(VM1, true);
        let (out, _) = s.handle(&mut sess, search(BASE, "(objectClass=*)", 2, vec![]), false);
        assert_eq!(dns(&out).len(), 2);
        assert_eq!(code(out.last().unwrap()), LdapResultCode::SizeLimitExceeded);
        let critical = LdapControl::Unknown {
            oid: "1.2.3.4".into(),
            criticality: true,
            value: None,
        };
        let (out, _) = s.handle(
            &mut sess,
            search(BASE, "(objectClass=*)", 0, vec![critical]),
            false,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(code(&out[0]), LdapResultCode::UnavailableCriticalExtension);
    }

    #[test]
    fn pages_return_everything_once_and_skip_what_went() {
        let s = server();
        let mut sess = Session::new(VM1, true);
        let page = |sess: &mut Session, cookie: Vec<u8>| {
            let ctrl = vec![LdapControl::SimplePagedResults { size: 2, cookie }];
            let (out, _) = s.handle(sess, search(BASE, "(objectClass=*)", 0, ctrl), false);
            let done = out.last().unwrap();
            let next = done.ctrl.iter().find_map(|c| match c {
                LdapControl::SimplePagedResults { cookie, .. } => Some(cookie.clone()),
                _ => None,
            });
            (dns(&out), code(done), next.unwrap_or_default())
        };
        let mut all = Vec::new();
        let (mut got, c, mut cookie) = page(&mut sess, vec![]);
        assert_eq!(c, LdapResultCode::Success);
        all.append(&mut got);
        // bob goes between pages: not sent.
        let mut spec = crate::tree::tests::spec();
        spec.clients[0].users.retain(|u| u != "bob");
        s.set_directory(spec).unwrap();
        while !cookie.is_empty() {
            let (mut got, _, next) = page(&mut sess, cookie);
            all.append(&mut got);
            cookie = next;
        }
        assert_eq!(all.len(), 5, "{all:?}");
        assert!(!all.iter().any(|d| d.contains("bob")));
        let (_, c, _) = page(&mut sess, b"forged".to_vec());
        assert_eq!(c, LdapResultCode::UnwillingToPerform);
        // Open paged searches per connection are bounded.
        for _ in 0..MAX_PAGED_SEARCHES + 3 {
            page(&mut sess, vec![]);
        }
        assert_eq!(sess.paged.len(), MAX_PAGED_SEARCHES);
    }

    #[test]
    fn root_dse_and_writes() {
        let s = server();
        let mut sess = Session::new(VM1, true);
        let mut req = search("", "(objectClass=*)", 0, vec![]);
        if let LdapOp::SearchRequest(r) = &mut req.op {
            r.scope = LdapSearchScope::Base;
            r.attrs = vec!["+".into()];
        }
        let (out, _) = s.handle(&mut sess, req, false);
        let LdapOp::SearchResultEntry(e) = &out[0].op else {
            panic!()
        };
        let nc = e
            .attributes
            .iter()
            .find(|a| a.atype == "namingContexts")
            .unwrap();
        assert_eq!(nc.vals, [BASE.as_bytes().to_vec()]);
        let add = msg(6, LdapOp::DelRequest(alice()));
        let (out, _) = s.handle(&mut sess, add, false);
        assert!(
            matches!(&out[0].op, LdapOp::DelResponse(r) if r.code == LdapResultCode::UnwillingToPerform)
        );
    }
}

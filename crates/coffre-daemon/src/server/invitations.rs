//! Invitations and joins: a temporary keyslot per invitation, the join that
//! turns it into a member's keyslot, and the throttle that keeps strangers'
//! joins from flooding the daemon or the log.

use super::*;
use coffre_vault::invitations::{JoinEffect, JoinEvent, JoinRefusal};

/// Joins under way (by name, with the connection waiting for each), and
/// the throttle on joins without a certificate, per source address.
#[derive(Default)]
pub(super) struct Joins {
    pub(super) door: coffre_vault::invitations::JoinDoor,
    pub(super) joining: std::collections::HashSet<String>,
    pub(super) replies: HashMap<String, oneshot::Sender<Answer>>,
}

/// A join whose keyslot is being made in the KDF pool.
pub(super) struct Joined {
    pub(super) name: String,
    pub(super) role: Role,
    pub(super) cert_pem: String,
    pub(super) fingerprint: String,
    pub(super) source: Option<Source>,
    /// The invitation's temporary keyslot and its code's SHA-256 (which
    /// invitation this is: a slot number may be reused by a new one).
    pub(super) temp_slot: u32,
    pub(super) code_sha256: String,
    /// The lock epoch when it began: a lock meanwhile cancels it.
    pub(super) epoch: u64,
}

/// Why a join stopped: the vault was locked while it ran.
pub(super) const JOIN_LOCKED: &str = "the vault was locked";

pub(super) fn ca_fingerprint(ca_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map(|d| fingerprint(d.as_ref()))
        .unwrap_or_default()
}

/// The actor of a refused join whose name no invitation can carry.
const INVALID_NAME: &str = "(invalid name)";

impl Shell {
    /// The join door's tick: one record per address for the refused
    /// joins that were only counted since the last tick (quiet addresses
    /// are forgotten), and the expired invitations cancelled.
    pub(super) fn join_door_tick(&mut self) {
        let now = now_ms();
        let effects = self
            .joins
            .door
            .handle(now, &self.control.invitations, JoinEvent::Tick);
        for effect in effects {
            match effect {
                JoinEffect::Counted { addr, count } => self.record(AuditRecord {
                    at: now,
                    actor: "coffre".into(),
                    source: Some(Source {
                        door: coffre_vault::Door::Join,
                        addr: addr.clone(),
                    }),
                    action: "member_join".into(),
                    result: "refused:counted".into(),
                    detail: format!(
                        "{count} more join attempt(s) from {addr} refused or throttled, counted rather than logged one by one"
                    ),
                }),
                JoinEffect::Expire { name } => self.drop_invitation(&name, "expired"),
                JoinEffect::Admit { .. } | JoinEffect::Refuse { .. } => {}
            }
        }
    }

    /// The refusal for a second invitation while `name` has one pending.
    pub(super) fn invitation_pending(&self, name: &str) -> Option<Answer> {
        let inv = self.control.invitations.get(name)?;
        Some((
            400,
            error_json(
                ErrorCode::Invalid,
                format!(
                    "{name} already has a pending invitation (expires at {} ms): cancel it first (`coffre member cancel-invitation {name}`), or wait until it is used or expires",
                    inv.expires_ms
                ),
            ),
        ))
    }

    pub(super) fn free_token_id(&self) -> Option<u32> {
        let c = self.container.read().unwrap_or_else(|p| p.into_inner());
        (0..coffre_luks2::MAX_KEYSLOTS).find(|i| {
            !c.header()
                .metadata
                .tokens
                .contains_key(&coffre_luks2::metadata::Id(*i))
        })
    }

    pub(super) fn invite_passphrase(&self, code: &[u8]) -> Option<Passphrase> {
        crate::init::invitation_passphrase(&self.control.invite_secret, code)
    }

    /// Starts an invitation with the key kept for `req`.
    pub(super) fn invite(&mut self, req: ReqId, name: String, role: Role) {
        let key = self.custody.kept.remove(&req);
        // Checked again where the keyslot is committed: a second
        // invitation would orphan the first one's keyslot.
        let refusal = match (self.invitation_pending(&name), key) {
            (Some(refusal), _) => {
                self.system_audit(
                    "member_invite",
                    "refused",
                    format!("{name} already has a pending invitation"),
                );
                Some(refusal)
            }
            (None, None) => Some(failure("no key for the invitation".into())),
            (None, Some(k)) => {
                let r = self.seal_invitation(req, k, name, role).err();
                // The invitation code was made and moved in that frame,
                // on this (the actor's) stack: scrubbed.
                coffre_luks2::secret::scrub_stack();
                r
            }
        };
        if let Some(answer) = refusal {
            self.answer(req, answer);
        }
    }

    /// A temporary keyslot opened by the invitation code mixed with a
    /// secret only this host holds: a stolen invitation plus a stolen
    /// header is not enough. Sealed in the pool (the volume key's digest
    /// check is a derivation too), committed by
    /// [`Shell::commit_invitation`].
    pub(super) fn seal_invitation(
        &mut self,
        req: ReqId,
        key: VolumeKey,
        name: String,
        role: Role,
    ) -> Result<(), Answer> {
        let code = crate::init::invitation_code();
        let Some(pass) = self.invite_passphrase(code.as_ref()) else {
            return Err(failure("no invitation secret in control data".into()));
        };
        if self.free_token_id().is_none() {
            return Err(failure("no free LUKS2 token".into()));
        }
        let kdf = crate::init::invitation_kdf();
        let header = self.header_snapshot();
        let epoch = self.lock_epoch;
        let locked = self.locked_flag.clone();
        let key = self.custody.for_job(key);
        self.kdf_job(
            kdf_memory_kib(kdf),
            move || {
                // A lock while this waited for the pool took the key: no
                // derivation.
                let key = key.take();
                let Some(key) = key.filter(|_| !locked.load(std::sync::atomic::Ordering::SeqCst))
                else {
                    return Err("the vault was locked while the invitation waited".into());
                };
                header
                    // Priority 0 ("ignore"): only asked for by number,
                    // never tried for a member's password.
                    .seal_keyslot(&key, &pass, kdf, Some(0))
                    .map_err(|e| format!("cannot make the invitation keyslot: {e}"))
            },
            move |result| {
                Msg::Sealed(Box::new((
                    Sealing::Invite {
                        req,
                        name,
                        role,
                        code,
                        epoch,
                    },
                    result,
                )))
            },
        );
        Ok(())
    }

    /// Commits an invitation's sealed keyslot, unless a lock or another
    /// invitation for the same name came in meanwhile.
    pub(super) fn commit_invitation(
        &mut self,
        name: &str,
        role: Role,
        code: &[u8; 16],
        epoch: u64,
        result: Result<coffre_storage::SealedKeyslot, String>,
    ) -> Answer {
        // A lock meanwhile first (its job may have failed for it).
        if self.vault.is_locked() || epoch != self.lock_epoch {
            drop(result);
            self.system_audit(
                "member_invite",
                "refused:locked",
                format!(
                    "the vault was locked while the invitation for {name} was made; nothing written"
                ),
            );
            return (
                409,
                error_json(
                    ErrorCode::Locked,
                    "the vault was locked meanwhile: no invitation was made",
                ),
            );
        }
        let sealed = match result {
            Ok(s) => s,
            Err(e) => return failure(e),
        };
        if let Some(refusal) = self.invitation_pending(name) {
            self.system_audit(
                "member_invite",
                "refused",
                format!("{name} already has a pending invitation"),
            );
            return refusal;
        }
        let Some(token_id) = self.free_token_id() else {
            return failure("no free LUKS2 token".into());
        };
        let slot = {
            let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
            let slot = match c.add_sealed(sealed, None) {
                Ok(n) => n,
                Err(e) => return failure(format!("cannot add the invitation keyslot: {e}")),
            };
            if let Err(e) = c.set_token(token_id, json!({"type": crate::init::INVITE_TOKEN, "keyslots": [slot.to_string()], "member": name})) {
                let _ = c.remove_keyslot(slot, false);
                return failure(format!("cannot bind the invitation keyslot: {e}"));
            }
            slot
        };
        let expires_ms = now_ms().0 + self.config.invitation_ttl_s * 1000;
        let code_hex = crate::init::hex_secret(code);
        self.control.invitations.insert(
            name.to_string(),
            crate::vaultdir::Invitation {
                keyslot: slot,
                role,
                expires_ms,
                code_sha256: crate::pki::fingerprint(code),
                by: String::new(),
            },
        );
        self.persist();
        self.system_audit(
            "member_invite",
            "ok",
            format!("invitation for {name}: temporary keyslot {slot}, expires at {expires_ms} ms"),
        );
        let ca_pem = self.dir.read(&self.dir.ca_cert()).unwrap_or_default();
        (
            200,
            json!({"ok": true, "invitation": {
                // The reply's JSON and HTTP buffers keep copies we cannot
                // wipe; the code opens nothing without the host's secret.
                "name": name, "role": role,
                "code": std::str::from_utf8(code_hex.expose()).unwrap_or_default(),
                "expires_ms": expires_ms,
                "server": self.config.listen, "ca_pem": ca_pem,
                "ca_fingerprint": ca_fingerprint(&ca_pem),
            }}),
        )
    }

    /// Cancels every pending invitation (a lock).
    pub(super) fn cancel_invitations(&mut self) {
        let names: Vec<String> = self.control.invitations.keys().cloned().collect();
        for name in names {
            self.drop_invitation(&name, "cancelled");
        }
    }

    /// Cancels `name`'s invitation and answers `req`.
    pub(super) fn cancel_invitation(&mut self, req: ReqId, name: String) {
        let had = self.control.invitations.contains_key(&name);
        self.drop_invitation(&name, "cancelled");
        let answer = if had {
            (200, json!({"ok": true}))
        } else {
            (
                400,
                error_json(
                    ErrorCode::Invalid,
                    format!("{name} has no pending invitation (used or expired meanwhile)"),
                ),
            )
        };
        if let Some(tx) = self.replies.remove(&req) {
            let _ = tx.send(answer);
        }
    }

    pub(super) fn drop_invitation(&mut self, name: &str, why: &str) {
        let Some(inv) = self.control.invitations.remove(name) else {
            return;
        };
        let r = {
            let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
            let tokens: Vec<u32> = c
                .header()
                .metadata
                .tokens
                .iter()
                .filter(|(_, t)| crate::init::token_of(t, crate::init::INVITE_TOKEN, name))
                .map(|(id, _)| id.0)
                .collect();
            let mut r = c.remove_keyslot(inv.keyslot, false);
            for id in tokens {
                let _ = c.remove_token(id);
            }
            if matches!(
                r,
                Err(coffre_storage::Error::Luks2(
                    coffre_luks2::Error::KeyslotNotFound(_)
                ))
            ) {
                r = Ok(());
            }
            r
        };
        self.persist();
        match r {
            Ok(()) => self.system_audit(
                "member_invite",
                why,
                format!(
                    "invitation for {name} ended; temporary keyslot {} wiped",
                    inv.keyslot
                ),
            ),
            Err(e) => self.system_audit(
                "member_invite",
                "failed",
                format!("invitation for {name}: keyslot {}: {e}", inv.keyslot),
            ),
        }
    }

    pub(super) fn join(
        &mut self,
        name: &str,
        code_hex: &str,
        csr: &str,
        password: &str,
        addr: SocketAddr,
    ) -> Option<Answer> {
        let ip = addr.ip().to_string();
        let source = Some(Source {
            door: coffre_vault::Door::Join,
            addr: ip.clone(),
        });
        // Anyone can send a join: the door (coffre_vault::invitations)
        // throttles addresses that keep failing (never counted towards the
        // auto-lock, which would hand a lock to anyone on the network) and
        // says which refusals get a record of their own; a right code is
        // never throttled.
        let code = crate::totp::unhex(code_hex).map(zeroize::Zeroizing::new);
        let code_sha256 = code.as_ref().map(|c| crate::pki::fingerprint(c));
        let effects = self.joins.door.handle(
            now_ms(),
            &self.control.invitations,
            JoinEvent::Attempt {
                addr: &ip,
                name,
                code_sha256: code_sha256.as_deref(),
            },
        );
        let mut admitted = None;
        for effect in effects {
            match effect {
                JoinEffect::Admit { invitation, .. } => admitted = Some(invitation),
                JoinEffect::Refuse { why, record } => {
                    if why == JoinRefusal::Expired {
                        self.drop_invitation(name, "expired");
                    }
                    if record {
                        // A name no invitation can carry came from anyone
                        // on the network, any bytes and any length: it is
                        // not written as it came.
                        let actor = match crate::init::check_member_name(name) {
                            Ok(()) => name.to_string(),
                            Err(_) => INVALID_NAME.to_string(),
                        };
                        let rec = AuditRecord {
                            at: now_ms(),
                            actor,
                            source: source.clone(),
                            action: "member_join".into(),
                            result: "refused".into(),
                            detail: why.as_str().to_string(),
                        };
                        self.record(rec);
                    }
                    return Some(match why {
                        JoinRefusal::Throttled { retry_s } => (
                            429,
                            error_json(
                                ErrorCode::Throttled,
                                format!("too many failed attempts; try again in {retry_s} s"),
                            ),
                        ),
                        _ => (
                            403,
                            error_json(
                                ErrorCode::InvalidInvitation,
                                "this invitation is not valid (wrong, used, expired, or cancelled by a lock)",
                            ),
                        ),
                    });
                }
                JoinEffect::Expire { .. } | JoinEffect::Counted { .. } => {}
            }
        }
        if admitted.is_none() || code.is_none() {
            return Some(failure("the join door gave no verdict".into()));
        }
        if password.is_empty() {
            return Some((400, error_json(ErrorCode::Invalid, "the password is empty")));
        }
        // One join per invitation at a time, from here (the directory's
        // lookup included) until the keyslot is committed or refused.
        if !self.joins.joining.insert(name.to_string()) {
            return Some((
                409,
                error_json(ErrorCode::Busy, "this invitation is being used right now"),
            ));
        }
        // With the organisation's directory as the source, the name must
        // qualify there first (looked up off the actor).
        let join = super::source::PendingJoin {
            name: name.to_string(),
            code_hex: zeroize::Zeroizing::new(code_hex.to_string()),
            csr: csr.to_string(),
            password: zeroize::Zeroizing::new(password.to_string()),
            addr,
        };
        let join = self.source_join(join)?;
        self.join_admitted(join)
    }

    /// A join whose code the door admitted (and, with a `[directory]`,
    /// whose name qualifies there): the new keyslot is made in the pool.
    /// `None`: the answer comes through `joins.replies`; `Some`: the join
    /// is over (refused), and the invitation free to be used again.
    pub(super) fn join_admitted(&mut self, join: super::source::PendingJoin) -> Option<Answer> {
        let name = join.name.clone();
        let answer = self.join_start(join);
        if answer.is_some() {
            self.joins.joining.remove(&name);
            if let Some(src) = self.source.as_mut() {
                src.numbers.remove(&name);
            }
        }
        answer
    }

    fn join_start(&mut self, join: super::source::PendingJoin) -> Option<Answer> {
        let name = join.name.as_str();
        let csr = join.csr.as_str();
        let password = join.password.as_str();
        let source = Some(Source {
            door: coffre_vault::Door::Join,
            addr: join.addr.ip().to_string(),
        });
        // The invitation again: it may have been cancelled, or have
        // expired, while the directory was asked.
        let code = crate::totp::unhex(&join.code_hex).map(zeroize::Zeroizing::new);
        let code_sha256 = code.as_ref().map(|c| crate::pki::fingerprint(c));
        let inv = self
            .control
            .invitations
            .get(name)
            .filter(|i| Some(&i.code_sha256) == code_sha256.as_ref() && i.expires_ms > now_ms().0)
            .cloned();
        let (Some(inv), Some(code)) = (inv, code) else {
            return Some((
                403,
                error_json(
                    ErrorCode::InvalidInvitation,
                    "this invitation is not valid (wrong, used, expired, or cancelled by a lock)",
                ),
            ));
        };
        // Before the temporary keyslot is opened: while locked the volume
        // key must not come into memory, nor may anyone join. After the
        // code check, so that only the holder of a valid invitation learns
        // that the vault is locked (a lock cancels invitations, so this
        // answers a join that raced the lock).
        if self.vault.may_join().is_err() {
            let rec = AuditRecord {
                at: now_ms(),
                actor: name.to_string(),
                source: source.clone(),
                action: "member_join".into(),
                result: "refused:locked".into(),
                detail: "the vault is locked".into(),
            };
            self.record(rec);
            return Some((
                409,
                error_json(
                    ErrorCode::Locked,
                    "the vault is locked: invitations are cancelled by a lock; ask for a new one once it is unlocked",
                ),
            ));
        }
        let Some(temp) = self.invite_passphrase(&code) else {
            return Some(failure("no invitation secret in control data".into()));
        };
        let ca_key = match self.dir.read(&self.dir.ca_key()) {
            Ok(k) => zeroize::Zeroizing::new(k),
            Err(e) => {
                return Some((500, error_json(ErrorCode::Failure, e.to_string())));
            }
        };
        let issued = match crate::pki::sign_csr(&self.config.name, &ca_key, csr, name) {
            Ok(i) => i,
            Err(e) => {
                return Some((
                    400,
                    error_json(ErrorCode::Invalid, format!("bad certificate request: {e}")),
                ));
            }
        };
        // The new keyslot's derivation runs in the KDF pool, off the actor
        // and without the header's lock, so the daemon keeps answering
        // while it takes its seconds; the commit comes back here.
        let kdf = self.config.keyslot_kdf.params();
        let member_pass = Passphrase::from_slice(password.as_bytes());
        let container = self.container.clone();
        let temp_slot = inv.keyslot;
        let locked = self.locked_flag.clone();
        let joined = Joined {
            name: name.to_string(),
            role: inv.role,
            cert_pem: issued.cert_pem,
            fingerprint: issued.fingerprint,
            source,
            temp_slot,
            code_sha256: inv.code_sha256.clone(),
            epoch: self.lock_epoch,
        };
        self.kdf_job(
            kdf_memory_kib(kdf),
            move || {
                let (header, snapshot) = {
                    let c = container.read().unwrap_or_else(|p| p.into_inner());
                    let snapshot = c
                        .keyslots_snapshot(Some(temp_slot))
                        .map_err(|e| format!("temporary keyslot: {e}"))?;
                    (c.header().clone(), snapshot)
                };
                let (_, key) = snapshot
                    .unlock(&temp)
                    .map_err(|e| format!("temporary keyslot did not open: {e}"))?;
                // A lock that landed while the temporary keyslot opened:
                // the key goes at once and nothing is derived.
                if locked.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(JOIN_LOCKED.into());
                }
                header
                    .seal_keyslot(&key, &member_pass, kdf, None)
                    .map_err(|e| format!("cannot make the keyslot: {e}"))
            },
            |result| Msg::Sealed(Box::new((Sealing::Join(joined), result))),
        );
        None
    }

    /// A join's keyslot comes back from the pool: committed unless a lock
    /// came in meanwhile (nothing is written then), or the invitation
    /// was cancelled or expired.
    pub(super) fn join_finish(
        &mut self,
        j: Joined,
        result: Result<coffre_storage::SealedKeyslot, String>,
    ) -> Answer {
        self.joins.joining.remove(&j.name);
        let name = j.name.as_str();
        let record = |this: &mut Self, result: &str, detail: String| {
            let rec = AuditRecord {
                at: now_ms(),
                actor: name.to_string(),
                source: j.source.clone(),
                action: "member_join".into(),
                result: result.into(),
                detail,
            };
            this.record(rec);
        };
        // Locked while the keyslot was made: nobody joins, nothing is
        // written.
        if self.vault.may_join().is_err() || j.epoch != self.lock_epoch {
            let detail = match &result {
                Ok(_) => "the vault was locked while joining; the new keyslot was never written"
                    .to_string(),
                Err(why) => format!("the vault was locked while joining: {why}"),
            };
            drop(result);
            record(self, "refused:locked", detail);
            self.drop_invitation(name, "cancelled");
            return (
                409,
                error_json(
                    ErrorCode::Locked,
                    "the vault was locked while you were joining: ask for a new invitation once it is unlocked",
                ),
            );
        }
        let sealed = match result {
            Ok(s) => s,
            Err(why) => {
                record(self, "failed", why.clone());
                return failure(format!("joining failed: {why}"));
            }
        };
        // The same invitation still pending (not cancelled, expired, or
        // replaced meanwhile).
        let pending = self.control.invitations.get(name).is_some_and(|i| {
            i.keyslot == j.temp_slot && i.code_sha256 == j.code_sha256 && i.expires_ms > now_ms().0
        });
        if !pending {
            drop(sealed);
            record(
                self,
                "refused",
                "the invitation was cancelled or expired while joining; nothing written".into(),
            );
            return (
                403,
                error_json(
                    ErrorCode::InvalidInvitation,
                    "this invitation is not valid (wrong, used, expired, or cancelled by a lock)",
                ),
            );
        }
        let slot = {
            let r = self
                .container
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .add_sealed(sealed, None);
            match r {
                Ok(s) => s,
                Err(e) => {
                    let why = format!("cannot add the keyslot: {e}");
                    record(self, "failed", why.clone());
                    return failure(format!("joining failed: {why}"));
                }
            }
        };
        self.drop_invitation(name, "used");
        let bound = self.free_token_id().map(|id| {
            self.container.write().unwrap_or_else(|p| p.into_inner()).set_token(id, json!({"type": crate::init::MEMBER_TOKEN, "keyslots": [slot.to_string()], "member": name}))
        });
        if !matches!(bound, Some(Ok(()))) {
            let _ = self
                .container
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove_keyslot(slot, false);
            return failure("cannot bind your keyslot".into());
        }
        let mut secret = zeroize::Zeroizing::new([0u8; totp::SECRET_LEN]);
        coffre_luks2::secret::fill_random(&mut *secret);
        self.control
            .totp
            .insert(name.to_string(), totp::base32(&*secret));
        self.control
            .certs
            .insert(j.fingerprint.clone(), name.to_string());
        self.run(Event::MemberJoined {
            member: Member {
                name: name.to_string(),
                role: j.role,
                keyslot: slot,
                last_totp_step: None,
            },
        });
        self.persist();
        (
            200,
            json!({"ok": true, "cert_pem": j.cert_pem, "keyslot": slot,
            "otpauth": totp::otpauth_uri(&format!("coffre {}", self.config.name), name, &*secret, self.config.totp_period_s)}),
        )
    }
}

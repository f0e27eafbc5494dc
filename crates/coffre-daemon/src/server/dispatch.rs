//! Requests in, answers out: a member's command from either door is checked
//! (certificate, reads while locked, audit) and handed to the vault core; the
//! core's effects are performed in order.

use super::*;

impl Shell {
    pub(super) fn api(
        &mut self,
        fp: Option<String>,
        pinned: Option<String>,
        addr: SocketAddr,
        cmd: ApiCommand,
        reply: oneshot::Sender<Answer>,
    ) {
        let Some(fp) = fp else {
            if let Some(why) = &self.audit.error {
                let _ = reply.send((
                    503,
                    error_json(
                        ErrorCode::AuditUnavailable,
                        format!("the audit log cannot be written ({why}): try again later"),
                    ),
                ));
                return;
            }
            // Without a client certificate, joining is the only thing to do.
            match cmd {
                ApiCommand::Join {
                    name,
                    code,
                    csr,
                    password,
                } => match self.join(&name, &code.0, &csr, &password.0, addr) {
                    Some(answer) => {
                        let _ = reply.send(answer);
                    }
                    None => {
                        self.joins.replies.insert(name, reply);
                    }
                },
                _ => {
                    let _ = reply.send((
                        403,
                        error_json(
                            ErrorCode::UnknownCertificate,
                            "a member certificate is required",
                        ),
                    ));
                }
            }
            return;
        };
        let Some(member) = self.member_of(&fp) else {
            self.system_audit(
                "connect",
                "refused:unknown_certificate",
                format!(
                    "certificate {} from {addr} is not a member's (unknown, removed or revoked)",
                    &fp[..16]
                ),
            );
            let _ = reply.send((
                403,
                error_json(
                    ErrorCode::UnknownCertificate,
                    "this certificate belongs to no member of the vault",
                ),
            ));
            return;
        };
        if let Some(key) = pinned {
            self.note_pinned(&member, key);
        }
        // The IP only: throttling is per source host, not per connection.
        let source = Source {
            door: coffre_vault::Door::Cli,
            addr: addr.ip().to_string(),
        };
        // While locked only superusers read (docs/security.md, "What each
        // state protects"); the core says who may.
        let is_read = matches!(
            cmd,
            ApiCommand::Status
                | ApiCommand::TaskList
                | ApiCommand::MemberList
                | ApiCommand::AuditShow { .. }
                | ApiCommand::AuditVerify
                | ApiCommand::WorkloadLogs { .. }
                | ApiCommand::GatewayProfile
                | ApiCommand::ProposalList
        );
        if is_read && let Err(code) = self.vault.may_read(&member) {
            let _ = reply.send((
                ErrorCode::from(code).status(),
                error_json(ErrorCode::from(code), "the vault is locked: only superusers can read its status and audit log until the quorum unlocks it"),
            ));
            return;
        }
        // Commands that need them carry the password and the TOTP code.
        let (command, auth) = match cmd {
            ApiCommand::Status => {
                let _ = reply.send((200, self.status_json(&member)));
                return;
            }
            ApiCommand::TaskList => {
                let s = self.status_json(&member);
                let _ = reply.send((200, json!({"ok": true, "tasks": s["tasks"]})));
                return;
            }
            ApiCommand::ProposalList => {
                let p = proposals_json(&self.vault.status().proposals);
                let _ = reply.send((200, json!({"ok": true, "proposals": p})));
                return;
            }
            ApiCommand::Approve {
                id,
                password: p,
                totp,
            } => {
                // A promotion is checked against the directory at every
                // approval, the one that carries it out included.
                let promotes = self
                    .vault
                    .status()
                    .proposals
                    .into_iter()
                    .find_map(|p| match p {
                        coffre_vault::Proposal {
                            id: pid,
                            change: coffre_vault::Change::Promote { name },
                            ..
                        } if pid == id => Some(name),
                        _ => None,
                    });
                if let Some(name) = promotes
                    && self.may_ask_directory(&member)
                    && let Some(why) = self.source_refuses_superuser(&name)
                {
                    let _ = reply.send((403, error_json(ErrorCode::NotPermitted, why)));
                    return;
                }
                (Command::Approve { id }, Some((p, totp)))
            }
            ApiCommand::InviteCancel {
                name,
                password: p,
                totp,
            } => {
                if !self.control.invitations.contains_key(&name) {
                    let _ = reply.send((
                        400,
                        error_json(
                            ErrorCode::Invalid,
                            format!("{name} has no pending invitation"),
                        ),
                    ));
                    return;
                }
                (Command::InviteCancel { name }, Some((p, totp)))
            }
            ApiCommand::Account {
                change,
                password: p,
                totp,
            } => {
                // Bad input is refused before any password check.
                let checked = match &change {
                    coffre_vault::AccountChange::SshKeyAdd { key } => {
                        super::accounts::check_ssh_key(key).map(drop)
                    }
                    coffre_vault::AccountChange::WorkloadPassword { verifier } => {
                        super::accounts::check_verifier(&verifier.0).map(drop)
                    }
                    coffre_vault::AccountChange::Certificate { csr } => {
                        crate::pki::check_csr(csr).map_err(|e| e.to_string())
                    }
                    _ => Ok(()),
                };
                if let Err(msg) = checked {
                    let _ = reply.send((400, error_json(ErrorCode::Invalid, msg)));
                    return;
                }
                if matches!(change, coffre_vault::AccountChange::Certificate { .. }) {
                    self.renewing.insert(ReqId(self.next_req), fp.clone());
                }
                (Command::Account { change }, Some((p, totp)))
            }
            ApiCommand::MemberList => {
                let a = &self.control.accounts;
                let list: Vec<Value> = self
                    .vault
                    .members()
                    .values()
                    .map(|m| {
                        let acc = a.users.get(&m.name);
                        json!({
                            "name": m.name, "role": m.role, "keyslot": m.keyslot,
                            "uid": acc.map(|x| x.uid), "gid": acc.map(|x| x.gid),
                            "ssh_keys": acc.map_or(0, |x| x.ssh_keys.len()),
                            "workload_password": acc.is_some_and(|x| x.workload_password.is_some()),
                            "source": self.source.as_ref().map(|s| s.standing(&m.name)),
                        })
                    })
                    .collect();
                let _ = reply.send((200, json!({"ok": true, "members": list})));
                return;
            }
            ApiCommand::AuditShow { since } => {
                let answer = match coffre_audit::read_entries(&self.dir.root) {
                    Ok(entries) => (
                        200,
                        json!({"ok": true, "entries": entries.into_iter().filter(|e| e.seq > since.unwrap_or(0)).collect::<Vec<_>>()}),
                    ),
                    Err(e) => (500, error_json(ErrorCode::Audit, e.to_string())),
                };
                let _ = reply.send(answer);
                return;
            }
            ApiCommand::AuditVerify => {
                let answer =
                    match coffre_audit::verify(&self.dir.root, &self.control.audit_public_key) {
                        Ok(r) => (
                            200,
                            json!({"ok": true, "records": r.records, "last_hash": r.last_hash}),
                        ),
                        Err(e) => (200, error_json(ErrorCode::AuditTampered, e.to_string())),
                    };
                let _ = reply.send(answer);
                return;
            }
            ApiCommand::WorkloadLogs {
                session,
                name,
                bytes,
            } => {
                if self.vault.session_member(SessionId(session)) != Some(member.as_str()) {
                    let _ = reply.send((
                        409,
                        error_json(ErrorCode::NoSession, "reading a workload's log needs your live session: run `coffre enter` first"),
                    ));
                    return;
                }
                self.workload_logs(&member, &name, bytes, reply);
                return;
            }
            ApiCommand::GatewayProfile => {
                let answer = match crate::gateway::profile_settings(&self.dir, &self.config) {
                    Ok(p) => (
                        200,
                        json!({"ok": true, "vault": p.vault, "remote": p.remote, "port": p.port,
                               "proto": p.proto, "static_challenge": p.static_challenge,
                               "ca_pem": p.ca_pem, "chain_pem": p.chain_pem,
                               "tls_crypt": p.tls_crypt}),
                    ),
                    Err(msg) => (404, error_json(ErrorCode::NoGateway, msg)),
                };
                let _ = reply.send(answer);
                return;
            }
            ApiCommand::Enter { password: p, totp } => (Command::Enter, Some((p, totp))),
            ApiCommand::Leave { session } => (
                Command::Leave {
                    session: SessionId(session),
                },
                None,
            ),
            ApiCommand::Heartbeat { session } => (
                Command::Heartbeat {
                    session: SessionId(session),
                },
                None,
            ),
            ApiCommand::TaskAdd {
                session,
                task_name,
                task_user,
                task_expire,
                workload,
            } => {
                if let Some(name) = &workload
                    && let Err(answer) = self.may_wait_for(&member, name)
                {
                    let _ = reply.send(answer);
                    return;
                }
                (
                    Command::TaskAdd {
                        session: SessionId(session),
                        name: task_name,
                        claimed_owner: task_user,
                        duration_ms: task_expire.saturating_mul(1000),
                        workload,
                    },
                    None,
                )
            }
            ApiCommand::TaskCancel { session, task_id } => (
                Command::TaskCancel {
                    session: SessionId(session),
                    task: TaskId(task_id),
                },
                None,
            ),
            ApiCommand::Lock {
                reason,
                password: p,
                totp,
            } => (Command::Lock { reason }, Some((p, totp))),
            ApiCommand::Unlock { password: p, totp } => (Command::Unlock, Some((p, totp))),
            ApiCommand::Mode {
                mode,
                password: p,
                totp,
            } => (Command::SetMode { mode }, Some((p, totp))),
            ApiCommand::Quorum {
                quorum,
                password: p,
                totp,
            } => (Command::SetQuorum { quorum }, Some((p, totp))),
            ApiCommand::MemberRemove {
                name,
                password: p,
                totp,
            } => (Command::MemberRemove { name }, Some((p, totp))),
            ApiCommand::MemberRole {
                name,
                role,
                password: p,
                totp,
            } => {
                if role == Role::Superuser
                    && self.may_ask_directory(&member)
                    && let Some(why) = self.source_refuses_superuser(&name)
                {
                    let _ = reply.send((403, error_json(ErrorCode::NotPermitted, why)));
                    return;
                }
                (Command::SetRole { name, role }, Some((p, totp)))
            }
            ApiCommand::Invite {
                name,
                role,
                password: p,
                totp,
            } => {
                if let Err(msg) = crate::init::check_member_name(&name) {
                    let _ = reply.send((400, error_json(ErrorCode::Invalid, msg)));
                    return;
                }
                if let Some(msg) = super::accounts::name_taken(&name) {
                    let _ = reply.send((400, error_json(ErrorCode::Invalid, msg)));
                    return;
                }
                if let Some(answer) = self.invitation_pending(&name) {
                    let _ = reply.send(answer);
                    return;
                }
                (Command::Invite { name, role }, Some((p, totp)))
            }
            ApiCommand::Passwd {
                password: p,
                new_password,
                totp,
            } => {
                if new_password.0.is_empty() {
                    let _ = reply.send((
                        400,
                        error_json(ErrorCode::Invalid, "the new password is empty"),
                    ));
                    return;
                }
                self.custody.new_passwords.insert(
                    ReqId(self.next_req),
                    Passphrase::from_slice(new_password.0.as_bytes()),
                );
                (Command::Passwd, Some((p, totp)))
            }
            ApiCommand::Join { .. } => {
                let _ = reply.send((
                    400,
                    error_json(ErrorCode::Invalid, "this identity is already a member"),
                ));
                return;
            }
        };
        let (password, totp_code) = match auth {
            Some((p, code)) => (Some(p), Some(code)),
            None => (None, None),
        };
        self.submit(
            member,
            source,
            command,
            password.as_ref().map(|p| p.0.as_str()),
            totp_code.as_deref(),
            reply,
        );
    }

    /// Hands an authenticated member's command to the core (from either
    /// door). `password` and `totp_code` come with the commands that need
    /// them; the password is kept only while the core waits for its check.
    pub(super) fn submit(
        &mut self,
        member: String,
        source: Source,
        command: Command,
        password: Option<&str>,
        totp_code: Option<&str>,
        reply: oneshot::Sender<Answer>,
    ) {
        if let Some(answer) = self.refused_for_audit(&command) {
            // What the door staged under this request's number (a new
            // password, the certificate a renewal keeps) goes with it.
            let req = ReqId(self.next_req);
            self.custody.new_passwords.remove(&req);
            self.renewing.remove(&req);
            let _ = reply.send(answer);
            return;
        }
        let totp = match totp_code {
            None => Totp::Missing,
            Some(code) => {
                let secret = self
                    .control
                    .totp
                    .get(&member)
                    .and_then(|s| totp::unbase32(s));
                let now_s = now_ms().0 / 1000;
                match secret.and_then(|s| totp::verify(&s, code, now_s, self.config.totp_period_s))
                {
                    Some(step) => Totp::Valid { step },
                    None => Totp::Invalid,
                }
            }
        };
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let has_password = password.is_some_and(|p| !p.is_empty());
        if let Some(p) = password
            && has_password
        {
            self.custody
                .passwords
                .insert(req, Passphrase::from_slice(p.as_bytes()));
        }
        self.replies.insert(req, reply);
        self.run(Event::Request(Request {
            req,
            member,
            source,
            password: has_password,
            totp,
            command,
        }));
        // A request the core answered without a password check leaves no
        // password behind.
        if !self.vault_waits_for(req) {
            self.custody.passwords.remove(&req);
            self.custody.new_passwords.remove(&req);
            self.renewing.remove(&req);
        }
    }

    pub(super) fn vault_waits_for(&self, req: ReqId) -> bool {
        self.replies.contains_key(&req)
    }

    pub(super) fn run(&mut self, first: Event) {
        let mut queue = VecDeque::from([first]);
        while let Some(event) = queue.pop_front() {
            let was_locked = self.vault.is_locked();
            let effects = self.vault.handle(now_ms(), event);
            if self.vault.is_locked() && !was_locked {
                self.lock_epoch += 1;
                // Keys kept for an effect still to come (an open, an
                // invitation, a password change waiting for the
                // organisation's directory, or for the KDF pool) go now:
                // nothing uses a key while locked.
                self.custody.wipe_waiting();
                // An open under way: its key and engine go at the close
                // deadline if it has not finished by then.
                if self.data.open_hold.is_some() {
                    self.data.open_locked_at = Some(std::time::Instant::now());
                }
            }
            self.locked_flag
                .store(self.vault.is_locked(), std::sync::atomic::Ordering::SeqCst);
            for effect in effects {
                self.perform(effect, &mut queue);
            }
        }
        self.flush_parked();
        self.leave_unclaimed();
    }

    /// Sessions whose `enter` could not be answered (its client went away
    /// before it learned its session: a `coffre enter` interrupted, a VPN
    /// client gone while the vault opened) are left at once, as their
    /// clients would have, instead of keeping the vault open until their
    /// heartbeats are missed. Run once the core's events settle (a leave
    /// in the middle of an enter's effects would come before its open).
    pub(super) fn leave_unclaimed(&mut self) {
        while let Some(session) = self.unclaimed.pop() {
            let Some(s) = self.vault.sessions().find(|s| s.id == session).cloned() else {
                continue;
            };
            self.system_audit(
                "leave",
                "note",
                format!(
                    "{}: session {} left, its client gone before it was answered",
                    s.member, session.0
                ),
            );
            let (tx, _rx) = oneshot::channel();
            self.submit(
                s.member,
                s.source,
                Command::Leave { session },
                None,
                None,
                tx,
            );
        }
    }

    /// Remembers the CA key `member`'s machine says it pins, saved when it
    /// changes: after a change of the CA's key, `coffre renew --ca DIR
    /// --finish` waits until every member's machine pins the new one. Only
    /// the key of `ca.pem` or of `ca.previous.pem` is taken (a machine that
    /// pins another reaches no door), and a move to the first is audited.
    pub(super) fn note_pinned(&mut self, member: &str, key: String) {
        let before = self.control.pinned.get(member).cloned();
        if before.as_deref() == Some(key.as_str()) {
            return;
        }
        let key_of = |p: &std::path::Path| {
            self.dir
                .read_if_present(p)
                .ok()
                .flatten()
                .and_then(|pem| crate::pki::pem_key_fingerprint(&pem))
        };
        let current = key_of(&self.dir.ca_cert());
        if current.as_deref() != Some(key.as_str())
            && key_of(&self.dir.ca_previous_cert()).as_deref() != Some(key.as_str())
        {
            return;
        }
        self.control.pinned.insert(member.to_string(), key.clone());
        if let Err(e) = self.try_persist() {
            // Told again with the member's next command.
            tracing::warn!("the CA key {member}'s machine pins is not saved: {e}");
            match &before {
                Some(b) => self.control.pinned.insert(member.to_string(), b.clone()),
                None => self.control.pinned.remove(member),
            };
            return;
        }
        if let Some(b) = before.filter(|_| current.as_deref() == Some(key.as_str())) {
            self.record(AuditRecord {
                at: now_ms(),
                actor: member.to_string(),
                source: None,
                action: "ca_pinned".into(),
                result: "ok".into(),
                detail: format!(
                    "this member's machine pins the CA key {}… (before: {}…)",
                    &key[..16],
                    &b[..b.len().min(16)]
                ),
            });
        }
    }

    pub(super) fn member_of(&self, fp: &str) -> Option<String> {
        if self.control.revoked.iter().any(|r| r == fp) {
            return None;
        }
        let name = self.control.certs.get(fp)?;
        self.vault
            .members()
            .contains_key(name)
            .then(|| name.clone())
    }

    pub(super) fn perform(&mut self, effect: Effect, queue: &mut VecDeque<Event>) {
        match effect {
            Effect::CheckPassword {
                req,
                member,
                keyslot,
                keep_key,
            } => {
                if self.source.is_some() {
                    // The organisation's directory first; the keyslot once
                    // it answered (source.rs).
                    self.source_check(req, member, keyslot, keep_key);
                } else {
                    self.check_password(req, member, keyslot, keep_key, queue);
                }
            }
            Effect::Open { req } => self.open_kept(req, queue),
            Effect::DiscardKey { req } => {
                self.custody.kept.remove(&req);
            }
            Effect::Close { force, mode } => self.close(force, mode, queue),
            Effect::Reply { req, outcome } => self.reply(req, outcome),
            Effect::DropSession { session, .. } => {
                // CLI sessions learn it at their next heartbeat; VPN
                // clients are disconnected.
                self.vpn_drop_session(session);
            }
            Effect::RemoveMember { name, keyslot } => self.remove_member(name, keyslot),
            Effect::Audit(rec) => self.record(rec),
            Effect::Persist => {
                self.persist();
                // Membership may have changed: the shares follow at once.
                self.nfs_update();
            }
            Effect::CancelInvitations => self.cancel_invitations(),
            Effect::CancelInvitation { req, name } => self.cancel_invitation(req, name),
            Effect::Invite { req, name, role } => {
                if !self.source_invite(req, name.clone(), role) {
                    self.invite(req, name, role);
                }
            }
            Effect::ChangePassword {
                req,
                member,
                keyslot,
            } => {
                if !self.source_passwd(req, member.clone(), keyslot) {
                    self.change_password(req, member, keyslot);
                }
            }
            Effect::ChangeAccount {
                req,
                member,
                change,
            } => self.change_account(req, member, change),
        }
    }

    /// Answers the member waiting on `req` with the core's outcome.
    pub(super) fn reply(&mut self, req: ReqId, outcome: Outcome) {
        // A passwd answered now (refused after its check) leaves no new
        // password behind.
        self.custody.new_passwords.remove(&req);
        self.renewing.remove(&req);
        if let Some(tx) = self.replies.remove(&req) {
            let entered = match &outcome {
                Outcome::Ok(Reply::Entered { session }) => Some(*session),
                _ => None,
            };
            let answer = match outcome {
                Outcome::Ok(Reply::Entered { session }) => {
                    let v = json!({"ok": true, "session": session.0});
                    let state = self.vault.status().state;
                    if state == "opening" || state == "closing" {
                        // Answered once the data is there.
                        self.data.parked.push((tx, v));
                        return;
                    }
                    let mut v = v;
                    v["data"] = json!(self.data.layout.mountpoint);
                    (200, v)
                }
                Outcome::Ok(Reply::TaskAdded { task, expires }) => (
                    200,
                    json!({"ok": true, "task_id": task.0, "expires_ms": expires.0}),
                ),
                Outcome::Ok(Reply::UnlockApproved { remaining }) => {
                    (200, json!({"ok": true, "remaining": remaining}))
                }
                Outcome::Ok(Reply::Proposal {
                    id,
                    description,
                    remaining,
                }) => (
                    200,
                    json!({"ok": true, "proposal": {"id": id, "description": description, "remaining": remaining}}),
                ),
                Outcome::Ok(Reply::Done) => (200, json!({"ok": true})),
                Outcome::Refused { code, message } => (
                    ErrorCode::from(code).status(),
                    error_json(ErrorCode::from(code), message),
                ),
            };
            if tx.send(answer).is_err()
                && let Some(session) = entered
            {
                self.unclaimed.push(session);
            }
        }
    }

    /// Sends `answer` to the member waiting on `req`, if still there.
    pub(super) fn answer(&mut self, req: ReqId, answer: Answer) {
        self.renewing.remove(&req);
        if let Some(tx) = self.replies.remove(&req) {
            let _ = tx.send(answer);
        }
    }

    /// An `enter` that waits for an open or a close to end, and whose
    /// client went away, is left now rather than when the wait ends:
    /// after a close, the vault does not open again for nobody (it
    /// reopened, then closed at once; before that, it stayed open for the
    /// heartbeat grace).
    pub(super) fn parked_gone_tick(&mut self) {
        let mut gone = Vec::new();
        self.data.parked.retain(|(tx, v)| {
            if !tx.is_closed() {
                return true;
            }
            if let Some(s) = v["session"].as_u64() {
                gone.push(SessionId(s));
            }
            false
        });
        if gone.is_empty() {
            return;
        }
        self.unclaimed.extend(gone);
        self.leave_unclaimed();
    }

    /// Sends the `enter` replies that waited for the open, once it is
    /// decided.
    pub(super) fn flush_parked(&mut self) {
        if self.data.parked.is_empty() {
            return;
        }
        let state = self.vault.status().state;
        if state == "opening" || state == "closing" {
            return;
        }
        let mountpoint = self.data.layout.mountpoint.clone();
        let err = self.data.last_open_error.clone();
        for (tx, mut v) in std::mem::take(&mut self.data.parked) {
            let session = v["session"].as_u64().map(SessionId);
            let answer = if state == "open" {
                v["data"] = json!(mountpoint);
                (200, v)
            } else {
                (
                    503,
                    error_json(
                        ErrorCode::OpenFailed,
                        format!(
                            "the vault could not open: {}",
                            err.as_deref().unwrap_or("it closed again")
                        ),
                    ),
                )
            };
            if tx.send(answer).is_err()
                && let Some(session) = session
            {
                self.unclaimed.push(session);
            }
        }
    }

    /// Saves the control data; a failure is audited once, said in status,
    /// and tried again at every tick (what changed holds in memory
    /// meanwhile, but a restart before it is saved would not know it).
    pub(super) fn persist(&mut self) {
        match self.try_persist() {
            Ok(()) => {
                if let Some(why) = self.unsaved.take() {
                    self.system_audit(
                        "control",
                        "ok",
                        format!("the control data is saved again (it could not be: {why})"),
                    );
                }
            }
            Err(e) => {
                if self.unsaved.is_none() {
                    self.system_audit(
                        "control",
                        "failed",
                        format!(
                            "the control data cannot be saved ({e}): what changed (a lock, a used TOTP code, a member removed) holds while the daemon runs, and is saved as soon as it can be (tried again twice a second)"
                        ),
                    );
                }
                self.unsaved = Some(e);
            }
        }
    }

    /// [`Shell::persist`], saying whether the control data reached the
    /// disk (for changes that must not be answered OK otherwise).
    pub(super) fn try_persist(&mut self) -> Result<(), String> {
        self.reconcile_accounts();
        self.control.vault = self.vault.persistent().clone();
        self.dir.save_control(&self.control).map_err(|e| {
            tracing::error!("cannot save control data: {e}");
            e.to_string()
        })
    }
}

//! Key custody: passwords held while the core waits for their check, keys
//! kept for an effect, the open key, and the KDF pool where every derivation
//! runs (never on the actor, never under the header's lock); sealed keyslots
//! come back here to be committed.

use super::*;

/// Secrets in the daemon's keeping, each for as long as it is needed.
pub(super) struct Custody {
    /// Passwords waiting for the core to ask for their check.
    pub(super) passwords: HashMap<ReqId, Passphrase>,
    /// New passwords (passwd) waiting for the old one's check.
    pub(super) new_passwords: HashMap<ReqId, Passphrase>,
    /// Keys kept for an effect the core will ask for (open, invite,
    /// passwd).
    pub(super) kept: HashMap<ReqId, VolumeKey>,
    /// The volume key, while the vault is open.
    pub(super) open_key: Option<VolumeKey>,
    /// The open volume's cipher, revocable while its close hangs.
    pub(super) cipher_slot: Option<Arc<coffre_storage::CipherSlot>>,
    /// Keys handed to work waiting for the KDF pool (a password change,
    /// an invitation): emptied by a lock.
    pub(super) jobs: Vec<KeyForJob>,
    /// The KDF pool's memory budget (KiB permits), and its size.
    pub(super) pool: Arc<Semaphore>,
    pub(super) cap: u32,
}

/// A key handed to a job that may wait for the KDF pool behind other
/// derivations (seconds each, for as long as members keep trying): the
/// job takes it out only once it runs, and a lock empties it before
/// that, so a queued job never keeps a key past a lock. A derivation
/// already under way when the lock lands keeps its key until it ends.
#[derive(Clone)]
pub(super) struct KeyForJob(Arc<std::sync::Mutex<Option<VolumeKey>>>);

impl KeyForJob {
    /// The key, if no lock took it first.
    pub(super) fn take(&self) -> Option<VolumeKey> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Custody {
    /// Hands `key` to a job through a holder a lock can empty.
    pub(super) fn for_job(&mut self, key: VolumeKey) -> KeyForJob {
        // Holders their jobs took (or dropped) are forgotten.
        self.jobs.retain(|j| Arc::strong_count(&j.0) > 1);
        let job = KeyForJob(Arc::new(std::sync::Mutex::new(Some(key))));
        self.jobs.push(job.clone());
        job
    }

    /// A lock (or a close's deadline): every key kept for an effect to
    /// come, or waiting in the pool for its job, is wiped now.
    pub(super) fn wipe_waiting(&mut self) {
        self.kept.clear();
        for j in self.jobs.drain(..) {
            drop(j.take());
        }
    }

    pub(super) fn new(cap: u32) -> Self {
        Self {
            passwords: HashMap::new(),
            new_passwords: HashMap::new(),
            kept: HashMap::new(),
            jobs: Vec::new(),
            open_key: None,
            cipher_slot: None,
            pool: Arc::new(Semaphore::new(cap as usize)),
            cap,
        }
    }
}

/// What a keyslot sealed in the KDF pool is for. The derivation runs
/// there, off the actor and without the header's lock; the commit (a
/// short header write) runs on the actor, after checking again what may
/// have changed meanwhile (a lock, a removal, another invitation).
pub(super) enum Sealing {
    /// `member`'s new password for `keyslot`.
    Passwd {
        req: ReqId,
        member: String,
        keyslot: u32,
        /// The keyslot being replaced, as it was when the sealing began
        /// (its KDF salt): a keyslot removed and reused meanwhile, or
        /// changed by another passwd, is not overwritten.
        replaces: String,
        /// The lock epoch when it began: a lock meanwhile cancels it,
        /// even if an unlock followed.
        epoch: u64,
    },
    /// An invitation's temporary keyslot; `code` goes in the reply.
    Invite {
        req: ReqId,
        name: String,
        role: Role,
        code: zeroize::Zeroizing<[u8; 16]>,
        epoch: u64,
    },
    /// A new member's keyslot, opened by the invitation's temporary one.
    Join(Joined),
}

/// Keyslot `n`'s KDF salt: what tells this keyslot from another that
/// took its number after it was removed, or from its own replacement.
pub(super) fn keyslot_salt(header: &coffre_luks2::Header, n: u32) -> Option<String> {
    header
        .metadata
        .keyslots
        .get(&coffre_luks2::metadata::Id(n))
        .map(|k| k.kdf.salt.clone())
}

/// The KDF pool memory a derivation with `kdf` takes (KiB; at least 1).
pub(super) fn kdf_memory_kib(kdf: coffre_luks2::kdf::KdfParams) -> u32 {
    match kdf {
        coffre_luks2::kdf::KdfParams::Argon2id { memory_kib, .. } => memory_kib.max(1),
        coffre_luks2::kdf::KdfParams::Pbkdf2 { .. } => 1,
    }
}

impl Shell {
    /// Runs `work` (a key derivation) in the KDF pool: on a blocking
    /// thread, once `memory_kib` of the pool's memory budget is free (a
    /// burst of attempts waits instead of allocating argon2 memory all at
    /// once), never on the actor. `done` turns its result into the message
    /// the actor gets.
    pub(super) fn kdf_job<T: Send + 'static>(
        &self,
        memory_kib: u32,
        work: impl FnOnce() -> Result<T, String> + Send + 'static,
        done: impl FnOnce(Result<T, String>) -> Msg + Send + 'static,
    ) {
        let permits = memory_kib.clamp(1, self.custody.cap);
        let pool = self.custody.pool.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let permit = pool.acquire_many_owned(permits).await;
            let result = tokio::task::spawn_blocking(move || {
                let r = work();
                coffre_luks2::secret::scrub_stack();
                r
            })
            .await
            .unwrap_or_else(|_| Err("the key derivation failed".into()));
            drop(permit);
            let _ = tx.send(done(result));
        });
    }

    /// A copy of the header, taken under its lock for an instant: what a
    /// derivation works from, so that nobody holds the lock across it.
    pub(super) fn header_snapshot(&self) -> coffre_luks2::Header {
        self.container
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .header()
            .clone()
    }

    pub(super) fn keyslot_memory_kib(&self, keyslot: u32) -> u32 {
        let c = self.container.read().unwrap_or_else(|p| p.into_inner());
        c.header()
            .metadata
            .keyslots
            .get(&coffre_luks2::metadata::Id(keyslot))
            .and_then(|k| k.kdf().ok())
            .map_or(1, |k| k.memory_kib().max(1))
    }

    /// Checks a password against its keyslot in the KDF pool (only a keyslot a LUKS2 token binds to the member).
    pub(super) fn check_password(
        &mut self,
        req: ReqId,
        member: String,
        keyslot: u32,
        keep_key: bool,
        queue: &mut VecDeque<Event>,
    ) {
        let bound = {
            let c = self.container.read().unwrap_or_else(|p| p.into_inner());
            c.header()
                .metadata
                .tokens
                .values()
                .any(|t| token_binds(t, &member, keyslot))
        };
        let Some(pass) = self.custody.passwords.remove(&req) else {
            queue.push_back(Event::PasswordChecked { req, ok: false });
            return;
        };
        if !bound {
            self.system_audit(
                "keyslot",
                "refused",
                format!("no LUKS2 token binds {member} to keyslot {keyslot}"),
            );
            queue.push_back(Event::PasswordChecked { req, ok: false });
            return;
        }
        let memory = self.keyslot_memory_kib(keyslot);
        let container = self.container.clone();
        let times = self.metrics.key_checks.clone();
        self.kdf_job(
            memory,
            move || {
                // The lock is held for the reads only.
                let snapshot = container
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keyslots_snapshot(Some(keyslot))
                    .map_err(|e| e.to_string())?;
                let start = std::time::Instant::now();
                let r = snapshot
                    .unlock(&pass)
                    .map(|(_, k)| k)
                    .map_err(|e| e.to_string());
                times
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe(start.elapsed().as_secs_f64());
                r
            },
            move |result| {
                let key = result.ok();
                let ok = key.is_some();
                // A key nobody keeps (an unlock approval, a lock, a
                // mode switch) is wiped here, before the result
                // travels anywhere.
                let key = key.filter(|_| keep_key);
                Msg::KeyChecked { req, ok, key }
            },
        );
    }

    pub(super) fn key_checked(&mut self, req: ReqId, ok: bool, key: Option<VolumeKey>) {
        // A check that ends after a lock keeps no key (the core refuses
        // what it was for): wiped here, not kept while the directory is
        // asked.
        if let Some(k) = key.filter(|_| !self.vault.is_locked()) {
            self.custody.kept.insert(req, k);
        }
        // With check_password, an opened keyslot waits for the bind.
        if self.source_after_key(req, ok) {
            return;
        }
        self.run(Event::PasswordChecked { req, ok });
    }

    /// Starts a password change: the new keyslot is sealed in the KDF pool.
    pub(super) fn change_password(&mut self, req: ReqId, member: String, keyslot: u32) {
        let key = self.custody.kept.remove(&req);
        let new = self.custody.new_passwords.remove(&req);
        let (Some(key), Some(new)) = (key, new) else {
            self.answer(req, failure("password not changed".into()));
            return;
        };
        // The new keyslot is derived in the pool from a copy of the
        // header; the commit comes back here.
        let kdf = self.config.keyslot_kdf.params();
        let header = self.header_snapshot();
        let Some(replaces) = keyslot_salt(&header, keyslot) else {
            self.answer(req, failure(format!("keyslot {keyslot} is gone")));
            return;
        };
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
                    return Err("the vault was locked".into());
                };
                header
                    .seal_keyslot(&key, &new, kdf, None)
                    .map_err(|e| e.to_string())
            },
            move |result| {
                Msg::Sealed(Box::new((
                    Sealing::Passwd {
                        req,
                        member,
                        keyslot,
                        replaces,
                        epoch,
                    },
                    result,
                )))
            },
        );
    }

    /// A keyslot sealed in the pool comes back: committed if what it was
    /// for still holds.
    pub(super) fn sealed(
        &mut self,
        purpose: Sealing,
        result: Result<coffre_storage::SealedKeyslot, String>,
    ) {
        match purpose {
            Sealing::Passwd {
                req,
                member,
                keyslot,
                replaces,
                epoch,
            } => {
                let answer = self.commit_passwd(&member, keyslot, &replaces, epoch, result);
                self.answer(req, answer);
            }
            Sealing::Invite {
                req,
                name,
                role,
                code,
                epoch,
            } => {
                let answer = self.commit_invitation(&name, role, &code, epoch, result);
                self.answer(req, answer);
            }
            Sealing::Join(joined) => {
                let name = joined.name.clone();
                let answer = self.join_finish(joined, result);
                // With ids = "directory", the numbers were used (the
                // member joined) or the join failed: either way they go.
                if let Some(src) = self.source.as_mut() {
                    src.numbers.remove(&name);
                }
                if let Some(tx) = self.joins.replies.remove(&name) {
                    let _ = tx.send(answer);
                }
            }
        }
    }

    /// Puts a new password's keyslot in place of the old one, unless the
    /// vault was locked or the member removed while it was derived (a
    /// removed keyslot is never brought back).
    pub(super) fn commit_passwd(
        &mut self,
        member: &str,
        keyslot: u32,
        replaces: &str,
        epoch: u64,
        result: Result<coffre_storage::SealedKeyslot, String>,
    ) -> Answer {
        // A lock meanwhile first (its job may have failed for it).
        if self.vault.is_locked() || epoch != self.lock_epoch {
            drop(result);
            self.system_audit(
                "passwd",
                "refused:locked",
                format!("{member}: the vault was locked while the new keyslot was made; keyslot {keyslot} unchanged"),
            );
            return (
                409,
                error_json(
                    ErrorCode::Locked,
                    "the vault was locked while your new password was being set: it was not changed",
                ),
            );
        }
        let sealed = match result {
            Ok(s) => s,
            Err(e) => {
                self.system_audit("passwd", "failed", format!("{member}: {e}"));
                return failure(format!("password not changed: {e}"));
            }
        };
        let still = self
            .vault
            .members()
            .get(member)
            .is_some_and(|m| m.keyslot == keyslot);
        if !still {
            drop(sealed);
            self.system_audit(
                "passwd",
                "refused",
                format!("{member}: removed (or given another keyslot) while the new keyslot was made; nothing written"),
            );
            return (
                403,
                error_json(
                    ErrorCode::NotPermitted,
                    "you are no longer a member with that keyslot: password not changed",
                ),
            );
        }
        let r = {
            let mut c = self.container.write().unwrap_or_else(|p| p.into_inner());
            if keyslot_salt(c.header(), keyslot).as_deref() != Some(replaces) {
                drop(c);
                self.system_audit(
                    "passwd",
                    "refused",
                    format!("{member}: keyslot {keyslot} changed while the new one was made (another passwd?); nothing written"),
                );
                return (
                    409,
                    error_json(
                        ErrorCode::Busy,
                        "your keyslot changed while the new password was being set (another password change?): this one was not applied",
                    ),
                );
            }
            c.replace_sealed(keyslot, sealed)
        };
        match r {
            Ok(()) => (200, json!({"ok": true})),
            Err(e) => {
                self.system_audit("passwd", "failed", format!("{member}: {e}"));
                failure(format!("password not changed: {e}"))
            }
        }
    }

    /// Wipes the volume key everywhere the daemon holds it: its own copy,
    /// and the engine's key schedule (revoked, so a stack or a thread that
    /// still holds the volume keeps no key). Returns whether the engine
    /// still had one.
    pub(super) fn wipe_key(&mut self) -> bool {
        // Dropping a VolumeKey zeroizes it.
        self.custody.open_key = None;
        self.custody.cipher_slot.take().is_some_and(|s| s.revoke())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key handed to a job waiting for the pool is gone once a lock
    /// wipes what waits; a job that already took its key is not reached
    /// (nor needed: it ends on its own), and holders whose job took the
    /// key are forgotten.
    #[test]
    fn a_lock_empties_the_keys_waiting_for_the_pool() {
        let mut c = Custody::new(1024);
        let key = || VolumeKey::generate(64);
        let waiting = c.for_job(key());
        let running = c.for_job(key());
        let taken = running.take().expect("the job's key");
        drop(running);
        c.kept.insert(ReqId(1), key());
        let third = c.for_job(key());
        assert_eq!(c.jobs.len(), 2, "the holder its job took is forgotten");
        c.wipe_waiting();
        assert!(waiting.take().is_none(), "a waiting job kept its key");
        assert!(third.take().is_none());
        assert!(c.kept.is_empty());
        assert!(c.jobs.is_empty());
        assert_eq!(taken.len(), 64);
    }
}

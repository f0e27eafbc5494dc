//! The KDF pool: one thread that checks passwords against argon2id
//! verifiers, one at a time, fed through a queue of [`QUEUE`]. A guest
//! flooding binds fills the queue and gets `busy`; it cannot make the
//! server run more than one verification at once (each may take up to
//! [`crate::spec::MAX_M_KIB`] of memory).

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use zeroize::Zeroizing;

/// Checks waiting at most.
pub const QUEUE: usize = 8;

struct Job {
    verifier: String,
    password: Zeroizing<Vec<u8>>,
    answer: SyncSender<bool>,
}

/// The pool's handle.
pub struct KdfPool {
    jobs: SyncSender<Job>,
}

/// The queue was full.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

impl KdfPool {
    /// Starts the pool's thread.
    pub fn new() -> std::io::Result<Self> {
        let (jobs, rx) = sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("ldap-kdf".into())
            .spawn(move || work(&rx))?;
        Ok(Self { jobs })
    }

    /// Whether `password` matches `verifier`, waiting for the check, or
    /// `Busy` at once if [`QUEUE`] checks are already waiting.
    pub fn verify(&self, verifier: &str, password: Zeroizing<Vec<u8>>) -> Result<bool, Busy> {
        let (answer, rx) = sync_channel(1);
        let job = Job {
            verifier: verifier.to_string(),
            password,
            answer,
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx.recv().unwrap_or(false)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

fn work(rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        let _ = job.answer.send(check(&job.verifier, &job.password));
    }
}

/// One check. The verifier was bounded on receipt
/// ([`crate::spec::check_verifier`]); anything unparsable is a refusal.
pub fn check(verifier: &str, password: &[u8]) -> bool {
    let Ok(hash) = PasswordHash::new(verifier) else {
        return false;
    };
    if hash.algorithm.as_str() != "argon2id" {
        return false;
    }
    Argon2::default().verify_password(password, &hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::verifier;

    #[test]
    fn checks_passwords() {
        let pool = KdfPool::new().unwrap();
        let v = verifier("right");
        assert_eq!(pool.verify(&v, Zeroizing::new(b"right".to_vec())), Ok(true));
        assert_eq!(
            pool.verify(&v, Zeroizing::new(b"wrong".to_vec())),
            Ok(false)
        );
        assert!(!check("garbage", b"right"));
    }

    #[test]
    fn a_full_queue_is_busy() {
        // A slow verifier keeps the thread busy while the queue fills.
        use argon2::{Algorithm, Params, PasswordHasher, Version};
        let slow = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(32 * 1024, 3, 1, None).unwrap(),
        )
        .hash_password_with_salt(b"x", b"saltsaltsalt")
        .unwrap()
        .to_string();
        let pool = std::sync::Arc::new(KdfPool::new().unwrap());
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..QUEUE + 4)
            .map(|_| {
                let (pool, busy, slow) = (pool.clone(), busy.clone(), slow.clone());
                std::thread::spawn(move || {
                    if pool.verify(&slow, Zeroizing::new(b"y".to_vec())).is_err() {
                        busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(busy.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}

//! Renewing the vault's own certificates on its host: the door's
//! (`coffre renew --server DIR`), the VPN gateway's (`--gateway`) and the
//! CA's (`--ca`). A member renews their own from their machine, through
//! the door (see `AccountChange::Certificate`).
//!
//! The door's and the gateway's are signed by the vault's CA with a new
//! key; clients check the CA and the name, never the server certificate
//! itself, so nothing changes for them. The daemon serves the new door
//! certificate from its next start, OpenVPN the gateway's from its next
//! start.
//!
//! The CA's is made anew for the same key and name ([`pki::renew_ca`]):
//! every certificate it signed chains to either, so identities keep
//! working and nothing is reissued. What checks the CA's own dates
//! (OpenSSL: OpenVPN, members' VPN profiles, the broker) must be given the
//! new one before the old one ends; rustls (the door, `coffre` clients,
//! bus components) does not read a trust anchor's dates.

use crate::pki::{self, PkiError};
use crate::vaultdir::{DirError, VaultDir, write_atomic};
use std::path::PathBuf;

/// Which certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The door's (`server.pem`, `server.key`).
    Server,
    /// The VPN gateway's (`gateway/server.pem`, `gateway/server.key`).
    Gateway,
    /// The CA's (`ca.pem`, and its copy `gateway/ca.pem` for OpenVPN),
    /// for the key it has (`ca.key` is not touched).
    Ca,
}

/// Why a renewal failed; nothing was replaced.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The vault directory.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Signing.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// `--ca --new-key` where something holds the CA that cannot take a
    /// cross certificate, or on a vault in the wrong state for it.
    #[error("the CA's key: {0}")]
    NewKeyRefused(String),
    /// `--ca --new-key` while the daemon runs (it holds the header's
    /// lock).
    #[error(
        "the CA's key is not changed: the daemon runs; stop it first, once the vault is closed (systemctl stop coffre@NAME)"
    )]
    DaemonRuns(#[source] coffre_storage::Error),
    /// `--gateway` on a vault without one.
    #[error(
        "{0} does not exist: this vault has no VPN gateway (coffre gateway openvpn-config makes one)"
    )]
    NoGateway(PathBuf),
}

/// What was renewed.
#[derive(Debug)]
pub struct Renewed {
    /// The certificate file.
    pub cert: PathBuf,
    /// Its SHA-256 fingerprint.
    pub fingerprint: String,
    /// When it ends (Unix seconds).
    pub not_after: i64,
}

/// Issues `which` anew and replaces its files. The door's and the
/// gateway's: a new key, [`pki::Lifetime::Server`], the key then the
/// certificate, each atomically: a crash between the two leaves the new
/// key with the old certificate, a pair that does not match (`coffre
/// doctor` says so; renew again). The CA's: see [`Which::Ca`].
pub fn renew(dir: &VaultDir, which: Which) -> Result<Renewed, RenewError> {
    let config = dir.load_config()?;
    if dir.ca_next_cert().exists() {
        return Err(RenewError::NewKeyRefused(format!(
            "{} is there: a change of the CA's key was interrupted; run coffre renew --ca DIR --new-key to finish it first",
            dir.ca_next_cert().display()
        )));
    }
    let (cert, key) = match which {
        Which::Ca => return renew_ca(dir, &config.name),
        Which::Server => (dir.server_cert(), dir.server_key()),
        Which::Gateway => {
            let gw = dir.gateway_dir();
            let cert = gw.join("server.pem");
            if !cert.exists() {
                return Err(RenewError::NoGateway(cert));
            }
            (cert, gw.join("server.key"))
        }
    };
    let ca_key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
    let issued = if which == Which::Gateway {
        pki::new_gateway_cert(
            &config.name,
            &ca_key,
            &crate::openvpn::gateway_cn(&config.name),
        )?
    } else {
        pki::new_server_cert(&config.name, &ca_key)?
    };
    drop(ca_key);
    let key_pem = zeroize::Zeroizing::new(issued.key_pem);
    let not_after = pki::pem_not_after(&issued.cert_pem).map_or(0, |(t, _)| t);
    // OpenVPN's: with the cross certificate after it while a change of the
    // CA's key is not finished (`gateway::openvpn_trust`).
    let cert_pem = if which == Which::Gateway {
        let chain = crate::gateway::openvpn_trust(dir)?.1;
        crate::openvpn::with_chain(&issued.cert_pem, &chain)
    } else {
        issued.cert_pem
    };
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert, cert_pem.as_bytes(), 0o644)?;
    Ok(Renewed {
        cert,
        fingerprint: issued.fingerprint,
        not_after,
    })
}

/// `ca.pem` made anew for `ca.key`, then its copy for OpenVPN when the
/// vault has a gateway, each atomically. A crash between the two leaves
/// OpenVPN's copy the old certificate of the same key: it keeps working
/// until the old one ends, and renewing again rewrites both. While a
/// change of the CA's key is not finished, OpenVPN's copy is the previous
/// CA, and stays so.
fn renew_ca(dir: &VaultDir, vault: &str) -> Result<Renewed, RenewError> {
    let ca_key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
    let old = dir.read(&dir.ca_cert())?;
    let issued = pki::renew_ca(vault, &ca_key, &old)?;
    drop(ca_key);
    let cert = dir.ca_cert();
    write_atomic(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    let copy = dir.gateway_dir().join("ca.pem");
    if copy.exists() && key_changed(dir)?.is_none() {
        write_atomic(&copy, issued.cert_pem.as_bytes(), 0o644)?;
    }
    let not_after = pki::pem_not_after(&issued.cert_pem).map_or(0, |(t, _)| t);
    Ok(Renewed {
        cert,
        fingerprint: issued.fingerprint,
        not_after,
    })
}

/// What [`new_ca_key`] did.
#[derive(Debug)]
pub struct NewKeyDone {
    /// The new CA's certificate.
    pub ca_pem: String,
    /// The CA's certificate before the change.
    pub previous_pem: String,
    /// The new CA certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    /// When the new CA ends (Unix seconds).
    pub not_after: i64,
    /// When the cross certificate ends, with the previous CA (Unix
    /// seconds).
    pub cross_not_after: i64,
    /// A change interrupted earlier was finished, not a new one made.
    pub resumed: bool,
    /// The vault has an OpenVPN gateway, whose files were made for the
    /// change (OpenVPN must be restarted).
    pub gateway: bool,
}

/// Whether the vault's CA key was changed (`ca.previous.pem` holds a CA of
/// another key than `ca.pem`'s), and the change is not finished.
pub fn key_changed(dir: &VaultDir) -> Result<Option<String>, DirError> {
    let Some(previous) = dir.read_if_present(&dir.ca_previous_cert())? else {
        return Ok(None);
    };
    let now = dir.read(&dir.ca_cert())?;
    Ok((pki::pem_key_fingerprint(&previous) != pki::pem_key_fingerprint(&now)).then_some(previous))
}

/// The files of a change of the CA's key: where each is written first
/// (beside the final one, `.next` before the extension) and where it goes.
/// `ca.next.pem` comes last both ways: it marks a change under way.
fn staged(dir: &VaultDir) -> [(std::path::PathBuf, std::path::PathBuf); 6] {
    [
        (
            dir.root.join("ca.previous.next.pem"),
            dir.ca_previous_cert(),
        ),
        (
            dir.root.join("ca.previous.certs.next.json"),
            dir.ca_previous_certs(),
        ),
        (dir.root.join("ca.cross.next.pem"), dir.ca_cross_cert()),
        (dir.server_next_key(), dir.server_key()),
        (dir.server_next_cert(), dir.server_cert()),
        (dir.ca_next_key(), dir.ca_key()),
    ]
}

/// The gateway's files in a change of the CA's key, staged as [`staged`]'s
/// (written before `ca.next.pem`, renamed before it): its certificate
/// signed by the new key, followed by the cross certificate, for a key of
/// its own. `gateway/ca.pem` stays the previous CA until the finish
/// (`gateway::openvpn_trust`).
fn gateway_staged(dir: &VaultDir) -> [(std::path::PathBuf, std::path::PathBuf); 2] {
    let gw = dir.gateway_dir();
    [
        (gw.join("server.next.key"), gw.join("server.key")),
        (gw.join("server.next.pem"), gw.join("server.pem")),
    ]
}

/// OpenVPN's certificate signed by `ca_key_pem`, for a new key, written
/// with `cross_pem` after it (`gateway::openvpn_trust`): the key at
/// `at.0`, then the certificate at `at.1`, each atomically.
fn write_gateway_pair(
    vault: &str,
    ca_key_pem: &str,
    cross_pem: &str,
    at: (&std::path::Path, &std::path::Path),
) -> Result<(), RenewError> {
    let gw = pki::new_gateway_cert(vault, ca_key_pem, &crate::openvpn::gateway_cn(vault))?;
    let key = zeroize::Zeroizing::new(gw.key_pem);
    write_atomic(at.0, key.as_bytes(), 0o600)?;
    let chained = crate::openvpn::with_chain(&gw.cert_pem, cross_pem);
    write_atomic(at.1, chained.as_bytes(), 0o644)?;
    Ok(())
}

/// `coffre renew --ca DIR --new-key`: a new key for the vault's CA (the old
/// one lost its secrecy, or is too weak), with a transition that keeps
/// every identity working ([`pki::new_ca_key`], docs/operations.md):
///
/// - the previous CA's certificate is kept (`ca.previous.pem`) and the door
///   keeps trusting the member certificates it signed; its key is gone
///   (replaced by the new one: nothing needs it, the cross certificate is
///   signed already);
/// - the cross certificate (`ca.cross.pem`) goes after the door's own
///   certificate, reissued under the new key, so that members' machines,
///   which pin the previous CA, trust the door;
/// - what the vault signs from now on (joins, renewals) is signed by the
///   new key, and invitations carry the new CA;
/// - OpenVPN (`[gateway]`) gets a certificate of the new key followed by
///   the cross certificate, and keeps trusting the previous CA alone
///   (`gateway::openvpn_trust`) until the finish.
///
/// Refused while the daemon runs (its header lock is held for the whole
/// change, so none starts meanwhile), and where something holds the CA that
/// does not take a cross certificate yet: `[bus]` (the broker and
/// components), NBD storage over TLS checked against the vault's CA. Crash-safe: every file is written under a `.next` name
/// first, `ca.next.pem` last, then renamed into place, `ca.next.pem` last;
/// a run that finds `ca.next.pem` checks what goes with it and finishes
/// that change, and the daemon does not start while it is there.
pub fn new_ca_key(dir: &VaultDir) -> Result<NewKeyDone, RenewError> {
    let config = dir.load_config()?;
    let refused = |why: &str| Err(RenewError::NewKeyRefused(why.to_string()));
    if config.bus.is_some() {
        return refused(
            "the vault uses the message bus ([bus]), and changing the key under the broker and its components is not done yet (docs/operations.md, \"A new CA key\")",
        );
    }
    if let Some(st) = &config.storage {
        let urls = std::iter::once((&st.url, &st.ca_file))
            .chain(st.mirror.iter().map(|m| (&m.url, &m.ca_file)));
        for (url, ca_file) in urls {
            if url.starts_with("nbds") && ca_file.is_none() {
                return refused(&format!(
                    "the storage host at {url} is checked against the vault's CA; give [storage] ca_file a copy of ca.pem first, so that it keeps trusting that host"
                ));
            }
        }
    }
    // The daemon holds this lock for its life: taken, no daemon runs, and
    // none starts until the change is made.
    let _held = match coffre_storage::FileDevice::open_locked(&config.header, false) {
        Ok(h) => h,
        Err(e @ coffre_storage::Error::Busy(_)) => return Err(RenewError::DaemonRuns(e)),
        Err(e) => return refused(&format!("cannot lock the vault's header: {e}")),
    };
    let resumed = dir.ca_next_cert().exists();
    if resumed {
        // What an interrupted run left must be whole before anything more
        // moves: the new CA for the key it will have, the previous CA and X
        // (each under its final name or its staged one).
        let next_pem = dir.read(&dir.ca_next_cert())?;
        let at = |(staged, done): &(std::path::PathBuf, std::path::PathBuf)| {
            if staged.exists() {
                staged.clone()
            } else {
                done.clone()
            }
        };
        let [previous, certs, cross, _, _, key] = staged(dir);
        let key = zeroize::Zeroizing::new(dir.read(&at(&key))?);
        let whole = pki::cert_matches_key(&next_pem, &key)
            && at(&previous).exists()
            && at(&certs).exists()
            && dir.read_if_present(&at(&cross))?.is_some_and(|x| {
                pki::pem_key_fingerprint(&x) == pki::pem_key_fingerprint(&next_pem)
            });
        if !whole {
            return refused(&format!(
                "{} is there but what goes with it is not (the new key, the previous CA, the cross certificate); restore the directory from its backup",
                dir.ca_next_cert().display()
            ));
        }
    } else {
        if key_changed(dir)?.is_some() {
            return refused(
                "the key was changed already (ca.previous.pem), and that change is not finished: coffre renew --ca DIR --finish once every member has renewed",
            );
        }
        let old_pem = dir.read(&dir.ca_cert())?;
        let old_key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
        let made = pki::new_ca_key(&config.name, &old_pem, &old_key)?;
        drop(old_key);
        let new_key = zeroize::Zeroizing::new(made.ca.key_pem);
        let door = pki::new_server_cert(&config.name, &new_key)?;
        let door_key = zeroize::Zeroizing::new(door.key_pem);
        // Every member certificate there is was signed by the previous CA:
        // what finishing the change revokes.
        let signed: Vec<String> = dir.load_control()?.certs.into_keys().collect();
        let signed = serde_json::to_vec_pretty(&signed).expect("strings serialise");
        let [previous, certs, cross, skey, scert, key] = staged(dir);
        write_atomic(&certs.0, &signed, 0o644)?;
        write_atomic(&previous.0, old_pem.as_bytes(), 0o644)?;
        write_atomic(&cross.0, made.cross_pem.as_bytes(), 0o644)?;
        write_atomic(&skey.0, door_key.as_bytes(), 0o600)?;
        write_atomic(&scert.0, door.cert_pem.as_bytes(), 0o644)?;
        if config.gateway.is_some() {
            let [gkey, gcert] = gateway_staged(dir);
            let at = (gkey.0.as_path(), gcert.0.as_path());
            write_gateway_pair(&config.name, &new_key, &made.cross_pem, at)?;
        }
        write_atomic(&key.0, new_key.as_bytes(), 0o600)?;
        write_atomic(&dir.ca_next_cert(), made.ca.cert_pem.as_bytes(), 0o644)?;
    }
    // Into place, ca.next.pem last. Each step is a rename, done again after
    // a crash if its source is still there.
    // OpenVPN's only for a vault with a gateway (a stray pair from a run
    // on this directory before `[gateway]` went is left alone).
    let gateway = config.gateway.is_some().then(|| gateway_staged(dir));
    for (from, to) in staged(dir).into_iter().chain(gateway.into_iter().flatten()) {
        if from.exists() {
            rename_synced(&from, &to)?;
        }
    }
    let door_ok = pki::cert_matches_key(
        &dir.read(&dir.server_cert())?,
        &zeroize::Zeroizing::new(dir.read(&dir.server_key())?),
    );
    if !door_ok {
        // Not what this command left (something else wrote one of them in
        // the middle): the door's certificate made again, under the new key.
        let key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
        let door = pki::new_server_cert(&config.name, &key)?;
        let door_key = zeroize::Zeroizing::new(door.key_pem);
        write_atomic(&dir.server_key(), door_key.as_bytes(), 0o600)?;
        write_atomic(&dir.server_cert(), door.cert_pem.as_bytes(), 0o644)?;
    }
    if config.gateway.is_some() {
        // The same for OpenVPN's pair, its certificate followed by X.
        let [(_, gkey), (_, gcert)] = gateway_staged(dir);
        let whole = dir.read_if_present(&gcert)?.is_some_and(|c| {
            pki::cert_matches_key(
                &c,
                &zeroize::Zeroizing::new(dir.read(&gkey).unwrap_or_default()),
            )
        });
        if !whole {
            let key = zeroize::Zeroizing::new(dir.read(&dir.ca_key())?);
            let cross = dir.read(&dir.ca_cross_cert())?;
            write_gateway_pair(
                &config.name,
                &key,
                &cross,
                (gkey.as_path(), gcert.as_path()),
            )?;
        }
    }
    rename_synced(&dir.ca_next_cert(), &dir.ca_cert())?;
    let ca_pem = dir.read(&dir.ca_cert())?;
    let previous_pem = dir.read(&dir.ca_previous_cert())?;
    let cross = dir.read(&dir.ca_cross_cert())?;
    Ok(NewKeyDone {
        fingerprint: pki::pem_fingerprint(&ca_pem).unwrap_or_default(),
        not_after: pki::pem_not_after(&ca_pem).map_or(0, |(t, _)| t),
        cross_not_after: pki::pem_not_after(&cross).map_or(0, |(t, _)| t),
        ca_pem,
        previous_pem,
        resumed,
        gateway: config.gateway.is_some(),
    })
}

/// Renames `from` to `to` and makes it durable (the directory synced).
fn rename_synced(from: &std::path::Path, to: &std::path::Path) -> Result<(), RenewError> {
    let io = |source| DirError::Io {
        what: "rename",
        path: from.to_path_buf(),
        source,
    };
    std::fs::rename(from, to).map_err(io)?;
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// What [`finish_ca_key`] did.
#[derive(Debug)]
pub struct Finished {
    /// The previous CA's member certificates revoked: (fingerprint,
    /// member).
    pub revoked: Vec<(String, String)>,
    /// Members who held no certificate of the new CA, shut out (with
    /// `force` only).
    pub shut_out: Vec<String>,
    /// Members holding a certificate of the new CA whose machine had not
    /// shown it pins the new CA, stranded (with `force` only): their
    /// machine trusts the door no more.
    pub stranded: Vec<String>,
    /// `ca.previous.certs.json` was missing: no certificate was revoked by
    /// its fingerprint (the door's trust in the new CA alone keeps them out).
    pub list_missing: bool,
}

/// `coffre renew --ca DIR --finish`: ends a change of the CA's key once
/// every member has renewed (their machines then pin the new CA): the
/// previous CA's member certificates are revoked, and the door trusts the
/// new CA alone and sends the cross certificate no more (`ca.previous.pem`,
/// `ca.cross.pem` removed). Refused, naming them, while a member holds no
/// certificate of the new CA, or their machine has not shown (with a
/// command since it renewed: `Control::pinned`) that it pins the new CA,
/// unless `force` (they are then shut out: a superuser removes them and
/// invites them again). Daemon stopped (its header lock is held); the
/// daemon audits it at its next start.
pub fn finish_ca_key(dir: &VaultDir, force: bool) -> Result<Finished, RenewError> {
    let config = dir.load_config()?;
    let refused = |why: String| Err(RenewError::NewKeyRefused(why));
    let _held = match coffre_storage::FileDevice::open_locked(&config.header, false) {
        Ok(h) => h,
        Err(e @ coffre_storage::Error::Busy(_)) => return Err(RenewError::DaemonRuns(e)),
        Err(e) => return refused(format!("cannot lock the vault's header: {e}")),
    };
    if dir.ca_next_cert().exists() {
        return refused(
            "a change of the CA's key was interrupted: run coffre renew --ca DIR --new-key to complete it first".into(),
        );
    }
    if key_changed(dir)?.is_none() {
        return refused("there is no change of the CA's key to finish".into());
    }
    // Without the list (lost with a restore from an older backup), no
    // certificate is known as the previous CA's: none is revoked by its
    // fingerprint, and every member counts as renewed. What the finish
    // checks still holds: a member who has not renewed has a machine that
    // pins the previous CA, and is named below; and from the daemon's next
    // start the door trusts the new CA alone, so the previous CA's
    // certificates get in nowhere.
    let listed = dir.read_if_present(&dir.ca_previous_certs())?;
    let list_missing = listed.is_none();
    let previous: std::collections::BTreeSet<String> = match listed {
        Some(l) => serde_json::from_str(&l).map_err(|e| {
            RenewError::NewKeyRefused(format!("{}: {e}", dir.ca_previous_certs().display()))
        })?,
        None => Default::default(),
    };
    let mut control = dir.load_control()?;
    let renewed: std::collections::BTreeSet<&String> = control
        .certs
        .iter()
        .filter(|(f, _)| !previous.contains(*f))
        .map(|(_, m)| m)
        .collect();
    let shut_out: std::collections::BTreeSet<String> = control
        .certs
        .iter()
        .filter(|(f, m)| previous.contains(*f) && !renewed.contains(m))
        .map(|(_, m)| m.clone())
        .collect();
    let shut_out: Vec<String> = shut_out.into_iter().collect();
    // A certificate of the new CA is not enough: the machine must pin the
    // new CA too, or it trusts the door no more once the cross certificate
    // goes (a member who renewed without --trust-ca, or joined with an
    // invitation made before the change).
    let new_key = crate::pki::pem_key_fingerprint(&dir.read(&dir.ca_cert())?)
        .ok_or_else(|| RenewError::NewKeyRefused("ca.pem is not a certificate".into()))?;
    let stranded: Vec<String> = renewed
        .iter()
        .filter(|m| control.pinned.get(m.as_str()) != Some(&new_key))
        .map(|m| m.to_string())
        .collect();
    // A run cut short after saving its revocations left its note: what it
    // was asked to do (with --force or not) is done, the rest follows.
    const FINISHED: &str = "the change of the CA's key was finished on the host";
    let noted = control
        .host_notes
        .iter()
        .any(|n| n.detail.starts_with(FINISHED));
    if (!shut_out.is_empty() || !stranded.is_empty()) && !force && !noted {
        let mut why = Vec::new();
        if !shut_out.is_empty() {
            why.push(format!(
                "{} hold(s) no certificate of the new CA yet: ask them to renew (coffre renew ... --trust-ca FINGERPRINT)",
                shut_out.join(", ")
            ));
        }
        if !stranded.is_empty() {
            why.push(format!(
                "the machine of {} has not shown it pins the new CA: ask them to renew with --trust-ca FINGERPRINT (given by another channel), which reports it; a machine that already pins it reports it with any command (coffre status)",
                stranded.join(", ")
            ));
        }
        return refused(format!(
            "{}; or finish with --force to shut them out",
            why.join("; ")
        ));
    }
    let revoked: Vec<(String, String)> = control
        .certs
        .iter()
        .filter(|(f, _)| previous.contains(*f))
        .map(|(f, m)| (f.clone(), m.clone()))
        .collect();
    for (f, _) in &revoked {
        control.certs.remove(f);
        control.revoked.push(f.clone());
    }
    let note = crate::vaultdir::HostNote {
        at: coffre_sys::time::now_ms(),
        action: "certificate_renew".into(),
        detail: format!(
            "the change of the CA's key was finished on the host (coffre renew --ca --finish): the door trusts the new CA alone; {} certificate(s) of the previous CA revoked{}{}",
            revoked.len(),
            if shut_out.is_empty() {
                String::new()
            } else {
                format!(", shutting out {}", shut_out.join(", "))
            },
            if stranded.is_empty() {
                String::new()
            } else {
                format!(
                    "; the machine of {} did not pin the new CA (stranded)",
                    stranded.join(", ")
                )
            }
        ),
    };
    debug_assert!(note.detail.starts_with(FINISHED));
    if !noted {
        control.host_notes.push(note);
    }
    dir.save_control(&control)?;
    // OpenVPN: the new CA alone, and its own certificate without X (read
    // at its next start). Before the removals: a run cut short does it
    // again.
    let gw = dir.gateway_dir();
    let (gca, gcert) = (gw.join("ca.pem"), gw.join("server.pem"));
    if config.gateway.is_some()
        && let Some(own) = dir.read_if_present(&gcert)?
    {
        let own = format!("{}\n", crate::gateway::first_certificate(&own));
        write_atomic(&gcert, own.as_bytes(), 0o644)?;
        write_atomic(&gca, dir.read(&dir.ca_cert())?.as_bytes(), 0o644)?;
    }
    // ca.previous.pem before the list: while it is there, a run finds the
    // change unfinished and does the rest (nothing more to revoke).
    for f in [
        dir.ca_cross_cert(),
        dir.ca_previous_cert(),
        dir.ca_previous_certs(),
    ] {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DirError::Io {
                    what: "remove",
                    path: f,
                    source,
                }
                .into());
            }
        }
    }
    Ok(Finished {
        revoked,
        shut_out,
        stranded,
        list_missing,
    })
}

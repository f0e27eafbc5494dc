//! `coffre init`: a new vault directory with its CA, server certificate,
//! audit key, detached header and volume, and its first superuser.

use crate::pki;
use crate::totp;
use crate::vaultdir::write_atomic;
use crate::vaultdir::{Config, Control, DirError, Identity, VaultDir};
use coffre_audit::{AuditLog, HostKey};
use coffre_luks2::header::{DEFAULT_HDR_SIZE, DEFAULT_METADATA_SIZE, FormatOptions};
use coffre_luks2::kdf::KdfParams;
use coffre_luks2::{Passphrase, SecretBytes};
use coffre_storage::{FormatRequest, Luks2Container};
use coffre_vault::{AuditRecord, Member, Millis, Persistent, Policy, Role};
use std::path::PathBuf;

/// The LUKS2 token type that binds a member to their keyslot.
pub const MEMBER_TOKEN: &str = "coffre-member";
/// The LUKS2 token type that marks an invitation's temporary keyslot.
pub const INVITE_TOKEN: &str = "coffre-invite";

/// Errors of `init`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The directory already holds a vault.
    #[error("{0} already holds a vault (config.toml exists); choose another directory")]
    Exists(PathBuf),
    /// Bad name.
    #[error("{0}")]
    Invalid(String),
    /// Creating or writing the vault directory failed.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Writing the first member's identity file failed.
    #[error(transparent)]
    Identity(#[from] coffre_api::IdentityError),
    /// Formatting the LUKS2 volume failed.
    #[error(transparent)]
    Storage(#[from] coffre_storage::Error),
    /// Starting the audit log failed.
    #[error(transparent)]
    Audit(#[from] coffre_audit::Error),
    /// Issuing the CA or server certificate failed.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The team's filesystem could not be made (FUSE, mkfs.ext4).
    #[error("formatting the team's filesystem: {0}")]
    Data(String),
}

/// What `init` needs.
pub struct InitOptions {
    /// The vault directory (created).
    pub dir: PathBuf,
    /// First superuser's name.
    pub admin: String,
    /// Their password (opens keyslot 0), or `None` to write an invitation
    /// instead (see `invite_out`).
    pub password: Option<Passphrase>,
    /// With no password: where to write the first superuser's invitation,
    /// so they join from their own machine like everyone else.
    pub invite_out: Option<PathBuf>,
    /// Data size in bytes.
    pub size: u64,
    /// Listen address.
    pub listen: String,
    /// Where the admin's identity file goes.
    pub identity_out: PathBuf,
    /// KDF costs of the admin's keyslot.
    pub kdf: KdfParams,
    /// pbkdf2 iterations of the volume-key digest.
    pub digest_iterations: u32,
    /// TOTP time step.
    pub totp_period_s: u64,
    /// Vault rules.
    pub policy: Policy,
    /// The volume on a remote store instead of `DIR/volume.img`, and the
    /// credentials file to copy into the control directory.
    pub storage: Option<(crate::vaultdir::StorageConfig, Option<PathBuf>)>,
}

/// What `init` made.
pub struct InitReport {
    /// otpauth URI for the admin's authenticator (shown once); empty when
    /// an invitation was written instead.
    pub otpauth: String,
    /// Identity file (or invitation) written.
    pub identity: PathBuf,
    /// CA fingerprint (to pin when joining).
    pub ca_fingerprint: String,
    /// What became of the user VMs run as (created, already there, or why
    /// it could not be made).
    pub vm_user: String,
}

/// Makes the unprivileged system user VMs run as, if missing (no home, no
/// login shell; in the kvm group when there is one). Returns what it did.
pub fn ensure_vm_user(name: &str) -> Result<String, String> {
    match coffre_sys::child::user(name) {
        Ok(Some((0, _, _))) => return Err(format!("{name} has uid 0: VMs will not run as it")),
        Ok(Some(_)) => return Ok(format!("VMs run as the existing user {name}")),
        Ok(None) => {}
        Err(e) => return Err(format!("looking up {name}: {e}")),
    }
    let kvm = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("kvm:"));
    let mut cmd = coffre_sys::child::system_tool("useradd");
    cmd.args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "--comment",
        "coffre virtual machines",
    ]);
    if kvm {
        cmd.args(["--groups", "kvm"]);
    }
    let out = cmd
        .arg(name)
        .output()
        .map_err(|e| format!("useradd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "useradd {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(format!("created the system user {name} that VMs run as"))
}

/// Member names: what certificates, tokens and audit records can carry.
pub fn check_member_name(name: &str) -> Result<(), String> {
    coffre_vault::check_name("member", name)
}

/// Creates a vault.
pub fn init(o: InitOptions) -> Result<InitReport, InitError> {
    let vm_user = ensure_vm_user(coffre_workload::config::DEFAULT_VM_USER).unwrap_or_else(|e| {
        format!(
            "VMs will not start until their user exists: {e} (or name another with [workloads] vm_user)"
        )
    });
    check_member_name(&o.admin).map_err(InitError::Invalid)?;
    // As for an invitation: the first superuser is served to workloads
    // under this name too.
    if let Some(why) = crate::server::accounts::name_taken(&o.admin) {
        return Err(InitError::Invalid(why));
    }
    let vd = VaultDir::new(&o.dir);
    if vd.config().exists() {
        return Err(InitError::Exists(o.dir.clone()));
    }
    std::fs::create_dir_all(&o.dir).map_err(|source| DirError::Io {
        what: "create",
        path: o.dir.clone(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&o.dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| DirError::Io {
                what: "chmod",
                path: o.dir.clone(),
                source,
            },
        )?;
    }
    // The write journal's directory judged before anything is written (a
    // refusal leaves nothing behind that a second init would trip on).
    if let Some((sc, _)) = &o.storage {
        crate::remote::journal_path(sc, &vd)
            .map_err(|e| InitError::Data(format!("the store: {e}")))?;
    }
    let name = o
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("vault")
        .to_string();

    let ca = pki::new_ca(&name)?;
    write_atomic(&vd.ca_cert(), ca.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&vd.ca_key(), ca.key_pem.as_bytes(), 0o600)?;
    let server = pki::new_server_cert(&name, &ca.key_pem)?;
    write_atomic(&vd.server_cert(), server.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&vd.server_key(), server.key_pem.as_bytes(), 0o600)?;
    let admin_cert = pki::new_member_cert(&name, &ca.key_pem, &o.admin)?;

    let volume = o.dir.join("volume.img");
    // With a remote store: its credentials file is copied into the control
    // directory (0600), and named from there.
    let storage = match &o.storage {
        None => None,
        Some((sc, creds)) => {
            let mut sc = sc.clone();
            if let Some(src) = creds {
                let bytes = std::fs::read(src).map_err(|source| DirError::Io {
                    what: "read",
                    path: src.clone(),
                    source,
                })?;
                write_atomic(&o.dir.join("storage.credentials"), &bytes, 0o600)?;
                sc.credentials_file = Some(PathBuf::from("storage.credentials"));
                // The mirrors use the same keys unless config.toml says
                // otherwise.
                for m in &mut sc.mirror {
                    m.credentials_file = Some(PathBuf::from("storage.credentials"));
                }
            }
            Some(sc)
        }
    };
    let header = o.dir.join("volume.hdr");
    let req = FormatRequest {
        options: FormatOptions {
            key_size: 64,
            sector_size: 4096,
            kdf: o.kdf,
            digest_iterations: o.digest_iterations,
            label: format!("coffre:{name}"),
            subsystem: String::new(),
            hdr_size: DEFAULT_HDR_SIZE,
            keyslots_size: DEFAULT_METADATA_SIZE - 2 * DEFAULT_HDR_SIZE,
            data_offset: 0,
            segment_size: None,
        },
        data_size: Some(o.size),
        force: false,
    };
    let invite_secret = {
        let raw = SecretBytes::random(32);
        let hex = hex_secret(raw.expose());
        // Stored in the control data as a string.
        String::from_utf8_lossy(hex.expose()).into_owned()
    };
    let code = invitation_code();
    let (first_pass, first_req, token_type) = match &o.password {
        Some(p) => (Passphrase::from_slice(p.expose()), req, MEMBER_TOKEN),
        None => {
            let p =
                invitation_passphrase(&invite_secret, code.as_ref()).expect("fresh secret is hex");
            let mut r = req;
            r.options.kdf = invitation_kdf();
            (p, r, INVITE_TOKEN)
        }
    };
    let (mut container, key) =
        Luks2Container::format(&volume, Some(&header), &first_req, &first_pass)?;
    // The team's filesystem, written through the same engine the daemon
    // serves it with.
    let volume_file = coffre_data::Layout::under(&o.dir).volume_file;
    let engine = match &storage {
        None => container.open_volume(&key)?,
        // The volume on a remote store: made there (the empty manifest,
        // the sealed integrity key and the root in the control
        // directory), the filesystem written through the same engine.
        Some(sc) => {
            let uuid = container.header().binary.uuid.clone();
            let dev = crate::remote::create(sc, &vd, &key, &uuid, o.size)
                .map_err(|e| InitError::Data(format!("the store: {e}")))?;
            container.open_volume_over(&key, dev, coffre_luks2::cipher::Provider::Auto)?
        }
    };
    coffre_data::format_ext4(engine, &volume_file).map_err(|e| InitError::Data(e.to_string()))?;
    drop(key);
    container.set_token(
        0,
        serde_json::json!({"type": token_type, "keyslots": ["0"], "member": o.admin}),
    )?;
    drop(container);
    if storage.is_some() {
        // The local data file only served the format: the data is on the
        // store.
        let _ = std::fs::remove_file(&volume);
    }

    let host_key = HostKey::load_or_create(&vd.host_key())?;
    let audit_public_key = host_key.public_hex();
    let mut audit = AuditLog::open(&o.dir, host_key)?;
    audit.append(AuditRecord {
        at: Millis(coffre_sys::time::now_ms()),
        actor: o.admin.clone(),
        source: None,
        action: "init".into(),
        result: "ok".into(),
        detail: format!(
            "vault {name} created; {} is the first superuser (keyslot 0)",
            o.admin
        ),
    })?;

    let mut secret = zeroize::Zeroizing::new([0u8; totp::SECRET_LEN]);
    coffre_luks2::secret::fill_random(&mut *secret);
    let mut persistent = Persistent {
        policy: o.policy.clone(),
        ..Persistent::default()
    };
    let mut control = Control {
        version: 1,
        audit_public_key,
        invite_secret,
        ..Control::default()
    };
    let expires_ms = coffre_sys::time::now_ms() + 72 * 3600 * 1000;
    if o.password.is_some() {
        persistent.members.insert(
            o.admin.clone(),
            Member {
                name: o.admin.clone(),
                role: Role::Superuser,
                keyslot: 0,
                last_totp_step: None,
            },
        );
        control.totp.insert(o.admin.clone(), totp::base32(&*secret));
        control
            .certs
            .insert(admin_cert.fingerprint.clone(), o.admin.clone());
    } else {
        control.invitations.insert(
            o.admin.clone(),
            crate::vaultdir::Invitation {
                keyslot: 0,
                role: Role::Superuser,
                expires_ms,
                code_sha256: pki::fingerprint(code.as_ref()),
                by: "init".into(),
            },
        );
    }
    control.vault = persistent;
    vd.save_control(&control)?;

    let config = Config {
        name: name.clone(),
        listen: o.listen.clone(),
        volume: storage.is_none().then(|| PathBuf::from("volume.img")),
        storage: storage.clone(),
        header: PathBuf::from("volume.hdr"),
        totp_period_s: o.totp_period_s,
        kdf_memory_cap_kib: 2 * 1024 * 1024,
        keyslot_kdf: crate::vaultdir::KeyslotKdf::from_params(o.kdf),
        data: crate::vaultdir::DataConfig::default(),
        accounts: Default::default(),
        invitation_ttl_s: 72 * 3600,
        policy: o.policy,
        gateway: None,
        network: None,
        directory: None,
        metrics: None,
        bus: None,
        log: None,
        workloads: Default::default(),
        workload: Vec::new(),
    };
    let text = toml::to_string_pretty(&config).map_err(|e| InitError::Invalid(e.to_string()))?;
    write_atomic(&vd.config(), text.as_bytes(), 0o600)?;

    if let (None, Some(out)) = (&o.password, &o.invite_out) {
        let code_hex = hex_secret(code.as_ref());
        // The JSON value keeps its own copy of the code, which is not
        // wiped; this process (`coffre init`) exits right after.
        let inv = serde_json::json!({
            "name": o.admin, "role": Role::Superuser,
            "code": std::str::from_utf8(code_hex.expose()).unwrap_or_default(),
            "expires_ms": expires_ms,
            "server": o.listen, "ca_pem": ca.cert_pem, "ca_fingerprint": ca.fingerprint,
        });
        let text = zeroize::Zeroizing::new(serde_json::to_string_pretty(&inv).expect("json"));
        write_atomic(out, text.as_bytes(), 0o600)?;
        return Ok(InitReport {
            otpauth: String::new(),
            identity: out.clone(),
            ca_fingerprint: ca.fingerprint,
            vm_user,
        });
    }
    let identity = Identity {
        member: o.admin.clone(),
        server: o.listen.clone(),
        ca_pem: ca.cert_pem.clone(),
        cert_pem: admin_cert.cert_pem,
        key_pem: admin_cert.key_pem,
    };
    identity.save(&o.identity_out)?;
    Ok(InitReport {
        otpauth: totp::otpauth_uri(
            &format!("coffre {name}"),
            &o.admin,
            &*secret,
            o.totp_period_s,
        ),
        identity: o.identity_out,
        ca_fingerprint: ca.fingerprint,
        vm_user,
    })
}

/// The passphrase of an invitation's temporary keyslot: HMAC-SHA256 of the
/// one-time code under the host's invitation secret, so the invitation file
/// alone (even with a copy of the header) opens nothing.
pub fn invitation_passphrase(secret_hex: &str, code: &[u8]) -> Option<Passphrase> {
    let p = invitation_hmac_hex(secret_hex, code);
    // HMAC copies its key into stack blocks we cannot reach; the finished
    // call left them below this frame.
    coffre_luks2::secret::scrub_stack();
    p
}

#[inline(never)]
fn invitation_hmac_hex(secret_hex: &str, code: &[u8]) -> Option<Passphrase> {
    use hmac::{Hmac, KeyInit, Mac};
    let secret = zeroize::Zeroizing::new(crate::totp::unhex(secret_hex)?);
    if secret.len() < 16 {
        // Without the host secret an invitation would be the code alone.
        return None;
    }
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&secret).ok()?;
    mac.update(b"coffre-invitation-v1\n");
    mac.update(code);
    let mut tag: [u8; 32] = mac.finalize().into_bytes().into();
    let hex = hex_secret(&tag);
    zeroize::Zeroize::zeroize(&mut tag);
    Some(Passphrase::new(hex))
}

/// Lower-case hex of `bytes`, written straight into a secret buffer (no
/// intermediate strings).
pub fn hex_secret(bytes: &[u8]) -> SecretBytes {
    let mut out = SecretBytes::zeroed(data_encoding::HEXLOWER.encode_len(bytes.len()));
    data_encoding::HEXLOWER.encode_mut(bytes, out.expose_mut());
    out
}

/// A fresh invitation code: 128 random bits, wiped when dropped.
pub fn invitation_code() -> zeroize::Zeroizing<[u8; 16]> {
    let mut code = zeroize::Zeroizing::new([0u8; 16]);
    coffre_luks2::secret::fill_random(code.as_mut());
    code
}

/// KDF of invitation keyslots: the passphrase carries 256 bits from a
/// 128-bit code, so a cheap KDF is enough.
pub fn invitation_kdf() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: coffre_luks2::hash::HashAlg::Sha256,
        iterations: 1000,
    }
}

/// Whether `token` binds `member` to `keyslot`.
pub fn token_binds(token: &serde_json::Value, member: &str, keyslot: u32) -> bool {
    token_of(token, MEMBER_TOKEN, member)
        && token
            .get("keyslots")
            .and_then(|k| k.as_array())
            .is_some_and(|k| k.len() == 1 && k[0].as_str() == Some(keyslot.to_string().as_str()))
}

/// Whether `token` is of `kind` ([`MEMBER_TOKEN`], [`INVITE_TOKEN`]) and
/// names `member`.
pub fn token_of(token: &serde_json::Value, kind: &str, member: &str) -> bool {
    token.get("type").and_then(|t| t.as_str()) == Some(kind)
        && token.get("member").and_then(|m| m.as_str()) == Some(member)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invitation_passphrase_needs_the_host_secret() {
        let code = [7u8; 16];
        assert!(invitation_passphrase("", &code).is_none());
        assert!(invitation_passphrase("00ff", &code).is_none());
        let a = invitation_passphrase(&"11".repeat(32), &code).unwrap();
        let b = invitation_passphrase(&"22".repeat(32), &code).unwrap();
        assert_eq!(a.expose().len(), 64);
        assert_eq!(hex_secret(&[0x0f, 0xa0]).expose(), b"0fa0");
        assert_ne!(a.expose(), b.expose());
        let hex = data_encoding::HEXLOWER.encode(&code);
        assert_ne!(
            a.expose(),
            hex.as_bytes(),
            "the code alone is not the passphrase"
        );
    }

    #[test]
    fn member_names() {
        assert!(check_member_name("alice").is_ok());
        assert!(check_member_name("a.b-c_9").is_ok());
        assert!(check_member_name("").is_err());
        assert!(check_member_name("-x").is_err());
        assert!(check_member_name("Alice").is_err());
        assert!(check_member_name("a b").is_err());
        assert!(check_member_name(&"a".repeat(33)).is_err());
    }
}

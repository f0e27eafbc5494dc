//! The command line, with cryptsetup's flag names where they exist.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const EXIT_CODES: &str = "\
EXIT CODES:
    0   success
    1   failure (the message says why)
    2   wrong password: the passphrase opens no keyslot
    3   the volume is in use by another coffre process
    4   the LUKS2 header is damaged (cryptsetup refuses it too), missing or not LUKS2
    5   the header uses a LUKS2 feature or value coffre does not implement
        (cryptsetup may read it; coffre writes nothing to it)
    6   the vault is locked
    7   wrong, missing or already used TOTP code
    8   this identity is not a member of the vault (unknown or revoked)
    9   too many failed attempts: wait and retry
    10  not permitted (needs a superuser, or not your task)
    11  the vault daemon cannot be reached
    12  the session is gone (lock, removal, or no heartbeat)
    13  the vault's audit log was rolled back or rewritten: it shows an older
        head than this machine saw, another history, or another signing key
    14  coffre doctor: the worst finding is a warning
    15  coffre doctor: a check failed
    64  the command line is wrong

SECRETS:
    Passphrases are read from files (--key-file F, or - for standard input),
    byte for byte as cryptsetup reads key files: a trailing newline is part of
    the passphrase. Secrets are never accepted as command-line arguments.";

/// coffre: a team strongroom for sensitive data.
///
/// A vault's data lives in one LUKS2 volume on storage nobody trusts; each
/// member has their own keyslot. `coffre serve` runs the vault: the first
/// member who enters (certificate, password, TOTP code) opens it, the last
/// one out closes it and the key is wiped; a superuser can lock it at once.
/// `coffre volume` works on the volume directly, without a daemon: it is
/// also the recovery path, and cryptsetup opens the same volume.
#[derive(Debug, Parser)]
#[command(name = "coffre", version, after_long_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a vault: configuration, CA, detached header, volume, and its
    /// first superuser.
    Init(InitArgs),
    /// Run the vault daemon (mutual-TLS JSON API) until SIGTERM or SIGINT;
    /// a clean stop closes the vault first.
    ///
    /// It runs as root (opening the vault mounts its data). Under systemd
    /// the Debian package's unit coffre@NAME runs it for
    /// /var/lib/coffre/NAME; check the host first with coffre doctor.
    ///
    /// Example: coffre serve /var/lib/coffre/team
    Serve {
        /// The vault directory.
        dir: PathBuf,
        /// Listen address (default: from config.toml).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Shell completions for coffre, on standard output.
    ///
    /// Example (bash): coffre completions bash >
    /// /etc/bash_completion.d/coffre; zsh: into a directory on $fpath as
    /// _coffre; fish: ~/.config/fish/completions/coffre.fish. The Debian
    /// package installs all three.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Man pages for coffre and each of its commands (coffre.1,
    /// coffre-volume-format.1...), written into DIR. For packaging.
    #[command(hide = true)]
    Manpages {
        /// Where to write them (made if missing).
        dir: PathBuf,
    },
    /// Check this host (and a vault directory) for what the vault needs.
    ///
    /// Each finding is OK, WARN (works, but less well or less safely) or
    /// FAIL (the vault cannot work, or is unsafe), with the fix. The host:
    /// root, /dev/fuse, loop devices, ext4 tools, the cgroup freezer,
    /// nftables, QEMU and KVM, OpenVPN 2.6, fs.suid_dumpable, Landlock
    /// and seccomp filters (with which the vault network's helpers
    /// confine themselves), swap, clock
    /// synchronization, and on a KVM guest with the haltpoll cpuidle
    /// driver whether idle vCPUs poll before halting (off, every request
    /// through FUSE waits on wake-ups through the hypervisor: a WARN with
    /// the figures). With DIR, also the vault directory: its modes and
    /// those of its secret files, config.toml, control.json, both copies of
    /// the LUKS2 header, room for the volume, and every certificate's end
    /// (WARN within 30 days). What DIR's config uses (a gateway, a network,
    /// VMs) turns a missing tool from WARN into FAIL. Reads only; works
    /// with the daemon running.
    ///
    /// Exit code: 0 all OK, 14 the worst is a WARN, 15 something FAILs.
    ///
    /// Example: coffre doctor /var/lib/coffre/team
    Doctor {
        /// The vault directory (without it, the host only).
        dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The vault network's DHCP server, as the daemon starts it: reads
    /// its specification (JSON) on stdin and serves on the sockets it
    /// inherited, unprivileged, in an empty network namespace. Not for
    /// people to run.
    #[command(hide = true)]
    DhcpServer {
        /// The user it drops to before reading anything.
        #[arg(long)]
        uid: u32,
        /// Its group.
        #[arg(long)]
        gid: u32,
    },
    /// The NFS server for the VMs' shares, as the daemon starts it: serves
    /// on the sockets it inherited (NFS, then the portmapper's TCP and
    /// UDP ones), keeps only the capabilities it needs, in an empty
    /// network namespace, and obeys the daemon on stdin. Not for people
    /// to run.
    #[command(hide = true)]
    NfsServer {
        /// How many sockets it inherited (from descriptor 3 on).
        #[arg(long)]
        sockets: u32,
        /// Worker threads.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// The directory it confines itself beneath (Landlock) before
        /// serving: the daemon mounts the shares there for it.
        #[arg(long)]
        confine: Option<std::path::PathBuf>,
        /// The user it becomes, never root: the handle broker keeping
        /// CAP_DAC_READ_SEARCH, the server it forks CAP_SETUID and
        /// CAP_SETGID.
        #[arg(long)]
        uid: u32,
        /// Its group.
        #[arg(long)]
        gid: u32,
        /// The uids it may act as on files (`5000-5999,1001`): never root.
        #[arg(long)]
        acts_uids: String,
        /// The gids it may act with.
        #[arg(long)]
        acts_gids: String,
        /// The supplementary groups it keeps for its life (`4242,5001`;
        /// empty: none), when it acts as one user: set before its filter,
        /// which then refuses any change of groups.
        #[arg(long)]
        groups: Option<String>,
    },
    /// The LDAP server for the VMs' directory, as the daemon starts it:
    /// serves on the sockets it inherited (descriptor 3: plain with
    /// StartTLS; 4: LDAPS), as `uid` with no capability, and obeys the
    /// daemon on stdin. Not for people to run.
    #[command(hide = true)]
    LdapServer {
        /// The user it drops to before reading anything.
        #[arg(long)]
        uid: u32,
        /// Its group.
        #[arg(long)]
        gid: u32,
    },
    /// Enter the vault (password and TOTP code) and stay inside, sending
    /// heartbeats, until Ctrl-C or `coffre leave`.
    ///
    /// The first member in opens the vault; the last one out closes it.
    /// Your identity file (from coffre join) is --identity FILE or
    /// COFFRE_IDENTITY.
    ///
    /// Example: COFFRE_IDENTITY=~/alice.identity coffre enter
    /// --password-file ~/.alice.pw --totp 123456
    Enter {
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = 5)]
        heartbeat: u64,
        /// Hand the session to a background agent and return at once
        /// (`coffre leave` ends it).
        #[arg(long)]
        detach: bool,
    },
    /// End the session that `coffre enter` holds for this identity.
    Leave {
        #[command(flatten)]
        id: IdentityArg,
    },
    /// The vault's state, who is inside, tasks, lock.
    ///
    /// Any member may ask, without a password (the identity file's
    /// certificate is enough).
    ///
    /// Example: coffre status --json
    Status {
        #[command(flatten)]
        id: IdentityArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Scheduled tasks that keep the vault open (need a live session).
    #[command(subcommand)]
    Task(TaskCommand),
    /// The team's workloads (processes, virtual machines): their state and
    /// their logs.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// The vault's own network (`[network]` in config.toml): its subnet,
    /// firewall table, each workload's address and ports and who may
    /// reach them, and the VPN clients reaching them now.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Lock the vault at once: everyone out, nobody in until unlocked
    /// (superuser).
    Lock {
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Approve unlocking a locked vault (superuser; the quorum may need
    /// several distinct superusers).
    Unlock {
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Switch what closing does to workloads: fast (frozen in memory:
    /// instant, but their memory stays in the host's RAM, and is lost if
    /// the host reboots) or safe (processes stopped, VMs suspended into the
    /// encrypted volume) (superuser). It takes effect at the next close: a
    /// closed vault has no key to write frozen state with. `coffre status`
    /// shows the mode in force and the one pending.
    Mode {
        /// fast or safe.
        #[arg(value_enum)]
        mode: ModeChoice,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Set how many distinct superusers must approve an unlock (superuser).
    /// With a quorum above 1 this makes a proposal the quorum must approve
    /// (`coffre approve ID`).
    Quorum {
        /// Number of superusers.
        quorum: u32,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Approve a pending proposal by its id (superuser). The approval that
    /// reaches the quorum carries it out; for a superuser's invitation it
    /// writes the invitation file.
    Approve {
        /// The proposal's id (`coffre proposal list`).
        proposal: String,
        /// Where to write the invitation if this approval completes an
        /// invitation of a superuser (default NAME.invitation).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Changes waiting for the quorum: quorum changes, superusers'
    /// invitations and removals.
    #[command(subcommand)]
    Proposal(ProposalCommand),
    /// Members of the vault.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Join a vault with an invitation: your key pair is made here and
    /// never leaves this machine; you choose your password and enroll TOTP.
    ///
    /// It prints the TOTP enrollment (an otpauth URI, and a QR code on a
    /// terminal) for your authenticator app, and writes your identity
    /// file.
    ///
    /// Example: coffre join bob.invitation --password-file ~/.bob.pw
    Join {
        /// The invitation file a superuser gave you.
        invitation: PathBuf,
        /// File holding the password you choose (- for stdin).
        #[arg(long, value_name = "FILE")]
        password_file: PathBuf,
        /// Where to write your identity file (default ./NAME.identity).
        #[arg(long, value_name = "FILE")]
        identity_out: Option<PathBuf>,
        /// Daemon address, overriding the invitation's.
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
    },
    /// Change your password (your keyslot is replaced atomically).
    Passwd {
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
        /// File holding the new password.
        #[arg(long, value_name = "FILE")]
        new_password_file: PathBuf,
    },
    /// Renew a certificate before it ends (doctor and status warn 30 days
    /// ahead).
    ///
    /// Without --server or --gateway: your own member certificate, from
    /// your machine, with your password and TOTP code. A new key is made
    /// here and never leaves it; the vault signs it for a year and your
    /// identity file is rewritten in place. The certificate you renewed
    /// with keeps working until it ends or until your next renewal; your
    /// keyslot and password do not change. If the vault's CA was renewed or
    /// given a new key, your identity file pins the new one from now on,
    /// provided the one it pinned certified it.
    ///
    /// With --server DIR or --gateway DIR (on the vault's host, as root):
    /// the door's or the VPN gateway's certificate, a new key signed by
    /// the vault's CA for two years. The daemon serves the new one from
    /// its next start, OpenVPN from its own; clients check the CA and the
    /// name, never the certificate itself, so nothing changes for them.
    ///
    /// With --ca DIR (on the vault's host, as root): the CA's certificate,
    /// made anew for the same key and name, for ten years. Everything the
    /// vault issued chains to it as to the old one, so identities keep
    /// working and nothing is reissued; what checks the CA's own dates
    /// (OpenVPN and members' VPN profiles, the bus broker) needs the new
    /// one before the old one ends: the command says what to redo.
    ///
    /// Example: coffre renew --password-file ~/.alice.pw --totp 123456
    ///
    /// Example: coffre renew --server /var/lib/coffre/team
    ///
    /// With --ca DIR --new-key (on the vault's host, as root, the daemon
    /// stopped): a new key for the CA, when the old one lost its secrecy
    /// or is too weak. The door keeps trusting the certificates the old CA
    /// signed, and sends with its own a cross certificate (the new key
    /// signed by the old CA), so identity files that pin the old CA keep
    /// working unchanged; what the vault signs from now on is signed by the
    /// new key. A member's machine moves to the new CA at their next
    /// renewal with --trust-ca FINGERPRINT (the new key's, which the
    /// command prints: give it to members by another channel); until then
    /// whoever holds the old key can still pose as the door to it, so ask
    /// every member to renew. OpenVPN gets a certificate of the new key
    /// followed by the cross certificate and keeps trusting the old CA
    /// until the finish (restart it). Refused while the vault has the bus,
    /// or an NBD store over TLS checked against its CA (not done yet).
    ///
    /// Example: coffre renew --ca /var/lib/coffre/team
    ///
    /// With --ca DIR --finish (the daemon stopped), once every member has
    /// renewed: the old CA's member certificates are revoked, and the door
    /// trusts the new CA alone and stops sending the cross certificate.
    /// Refused, naming them, while members have not renewed, or their
    /// machines have not shown they pin the new CA (--force shuts them
    /// out).
    ///
    /// Example: coffre renew --ca /var/lib/coffre/team --new-key
    ///
    /// Example: coffre renew --ca /var/lib/coffre/team --finish
    Renew {
        /// Renew the door's certificate of the vault in DIR (on its host).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["gateway", "ca"])]
        server: Option<PathBuf>,
        /// Renew the VPN gateway's certificate of the vault in DIR.
        #[arg(long, value_name = "DIR", conflicts_with = "ca")]
        gateway: Option<PathBuf>,
        /// Renew the CA's certificate of the vault in DIR (same key).
        #[arg(long, value_name = "DIR")]
        ca: Option<PathBuf>,
        /// With --ca: a new key for the CA, with a cross-signed transition
        /// (see above).
        #[arg(long, requires = "ca")]
        new_key: bool,
        /// With --ca: finish a change of the CA's key once every member has
        /// renewed (see above).
        #[arg(long, requires = "ca", conflicts_with = "new_key")]
        finish: bool,
        /// With --finish: finish even though some members have not renewed
        /// (they are shut out, and must be removed and invited again).
        #[arg(long, requires = "finish")]
        force: bool,
        /// Your identity file (member certificate, key, daemon address,
        /// vault CA): rewritten with the new certificate and key.
        #[arg(long, env = "COFFRE_IDENTITY", value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Daemon address, overriding the identity file's (what other
        /// commands call --server).
        #[arg(long, env = "COFFRE_SERVER", value_name = "ADDR")]
        address: Option<String>,
        /// File holding your password (- for stdin): for your own
        /// certificate.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present_any = ["server", "gateway", "ca"],
            conflicts_with_all = ["server", "gateway", "ca"]
        )]
        password_file: Option<PathBuf>,
        /// The current code of your authenticator app (single use): for
        /// your own certificate. Without it, the code is read from the
        /// environment variable COFFRE_TOTP, where it stays out of other
        /// users' `ps` (and which --server, --gateway and --ca ignore).
        #[arg(long, value_name = "CODE", conflicts_with_all = ["server", "gateway", "ca"])]
        totp: Option<String>,
        /// After the CA's key was changed: the new CA's key fingerprint, as
        /// your superuser gave it to you by another channel than the vault
        /// (`renew --ca --new-key` prints it). Without it, or if it differs,
        /// your machine keeps the CA it pins: the proof the vault sends is
        /// signed by the previous key, which may be the one that leaked.
        #[arg(long, value_name = "FINGERPRINT", conflicts_with_all = ["server", "gateway", "ca"])]
        trust_ca: Option<String>,
    },
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The OpenVPN gateway in front of the vault (on the vault's host).
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// The vault's message bus (RabbitMQ over mutual TLS): the broker's
    /// configuration and the identities of the components on other hosts
    /// (docs/bus.md). Members never log in to the broker; they keep using
    /// the door.
    #[command(subcommand)]
    Bus(BusCommand),
    /// Work on a LUKS2 volume directly (format, keyslots, data, recovery).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The vault's volume on a remote store (on the vault's host, with its
    /// daemon stopped): move a local volume there, or export it back.
    #[command(subcommand)]
    Storage(StorageCommand),
}

/// `coffre storage ...`.
#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Move the vault's local volume onto an S3 store or an NBD export: every chunk
    /// uploaded (chunks of zeros are not stored), read back and compared;
    /// then config.toml names the store and the local file is kept as
    /// volume.img.migrated until you remove it. Interrupted, run it again:
    /// it goes on where it stopped. Example:
    /// `coffre storage migrate /var/lib/coffre/team --to s3://bucket/team --password-file -`
    Migrate {
        /// The vault directory.
        dir: PathBuf,
        /// `s3://BUCKET/PREFIX` (the bucket must exist and honour
        /// conditional writes), or an NBD export (`nbd://HOST[:PORT]/EXPORT`,
        /// `nbds://...` with TLS, `nbd+unix:///EXPORT?socket=PATH`; about
        /// twice the volume's size: two slots per chunk).
        #[arg(long, value_name = "URL")]
        to: String,
        /// The S3 endpoint of a store that is not AWS.
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// The S3 region (default us-east-1).
        #[arg(long)]
        region: Option<String>,
        /// Allow plain HTTP to the endpoint (a test server only).
        #[arg(long)]
        allow_http: bool,
        /// A 0600 file of aws_access_key_id= / aws_secret_access_key=
        /// lines, copied into the vault directory (default: the AWS
        /// environment variables).
        #[arg(long, value_name = "FILE")]
        credentials: Option<PathBuf>,
        /// A member's password (it opens the volume key, which seals the
        /// store's integrity key); `-` for stdin.
        #[arg(long, value_name = "FILE")]
        password_file: PathBuf,
    },
    /// Where the volume is, the root kept locally, and what the store says
    /// now (its manifest's epoch, unverified: no key is needed here; the
    /// next open verifies it). Exit code 1 if the store cannot be reached
    /// or is behind the local root.
    Status {
        /// The vault directory.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write the store's volume, every chunk verified, into a file: a plain
    /// LUKS2 data segment again, which cryptsetup opens with the vault's
    /// detached header (`cryptsetup open --header DIR/volume.hdr FILE name`).
    Export {
        /// The vault directory.
        dir: PathBuf,
        /// Where to write it (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A member's password (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        password_file: PathBuf,
        /// Read only this store (the primary's URL or a mirror's, as in
        /// config.toml): disaster recovery from a replica. Default: every
        /// store, the newest authentic one winning. Nothing is written to
        /// any store either way.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Take the newest state the store has even if it is older than
        /// the local root (a mirror left behind when the primary was lost,
        /// or a lost control directory): say so in your records.
        #[arg(long)]
        trust_store_epoch: bool,
    },
    /// Delete orphans from the store and its mirrors: objects of the
    /// volume's layout that no manifest names and nothing will (chunks of
    /// an upload a crash cut short, pages of a flush that failed, objects
    /// of a writer that was fenced or of an interrupted migration). The
    /// store is verified against the local root first; only objects last
    /// written --min-age ago or earlier are judged; the manifest, and
    /// anything else in the store's folder, is never touched. The running
    /// daemon sweeps on its own, 10 minutes after it opens the store and
    /// daily after that; this command is for a vault whose daemon is
    /// stopped (it must be). A store is judged only if its manifest is the
    /// vault's own (not another writer's). Exit code 1 if a store could not
    /// be judged or a deletion failed (run it again); 64 for a --min-age
    /// under an hour without --force; 0 otherwise, also when a store held
    /// more objects than one sweep lists (said on stderr: the rest go at
    /// the next).
    /// Example:
    /// `coffre storage sweep /var/lib/coffre/team --dry-run --password-file -`
    Sweep {
        /// The vault directory.
        dir: PathBuf,
        /// A member's password (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        password_file: PathBuf,
        /// Only objects last written this long ago or earlier, by the
        /// store's clock (90, 30m, 2h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1d")]
        min_age: u64,
        /// Accept a --min-age under an hour: only when no writer on another
        /// host may have put objects it has not flushed yet.
        #[arg(long)]
        force: bool,
        /// List the orphans; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Recovery: take the store's epoch as the local root
    /// (`--trust-store-epoch`). For a control directory that was lost or
    /// restored from an older backup, whose root is behind the store's,
    /// so that every open is refused as a rollback. The store's manifest
    /// and every page are verified with the integrity key first; the
    /// rollback check is what this gives up, once: run it only when you
    /// know the store is current (a provider serving an old bucket would
    /// be believed). A store behind the local root, or at its epoch with
    /// another manifest, is refused unless --older. The daemon must be
    /// stopped.
    Trust {
        /// The vault directory.
        dir: PathBuf,
        /// A member's password (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        password_file: PathBuf,
        /// Trust a store behind the local root (or forked from it): only
        /// after restoring the store itself from an older backup, on
        /// purpose; every write since that backup is lost.
        #[arg(long)]
        older: bool,
    },
}

/// Which identity file to use.
#[derive(Debug, Args)]
pub struct IdentityArg {
    /// Identity file (member certificate, key, daemon address, vault CA).
    #[arg(long, env = "COFFRE_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Daemon address, overriding the identity file's.
    #[arg(long, env = "COFFRE_SERVER", value_name = "ADDR")]
    pub server: Option<String>,
}

/// Password and TOTP code.
#[derive(Debug, Args)]
pub struct AuthArgs {
    /// File holding your password (- for stdin).
    #[arg(long, value_name = "FILE")]
    pub password_file: PathBuf,
    /// The current code of your authenticator app (single use). From the
    /// environment, it stays out of other users' `ps`.
    #[arg(long, value_name = "CODE", env = "COFFRE_TOTP", hide_env_values = true)]
    pub totp: String,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The vault directory to create.
    pub dir: PathBuf,
    /// Name of the first superuser.
    #[arg(long)]
    pub admin: String,
    /// File holding the first superuser's password.
    #[arg(long, value_name = "FILE", required_unless_present = "invite")]
    pub password_file: Option<PathBuf>,
    /// Instead of a password and an identity made on this host, write an
    /// invitation for the first superuser, who then runs `coffre join` on
    /// their own machine like everyone else.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["password_file", "identity_out"])]
    pub invite: Option<PathBuf>,
    /// Size of the encrypted data volume.
    #[arg(long, default_value = "1G", value_parser = coffre::size::parse_size)]
    pub size: u64,
    /// Where to write the first superuser's identity file (move it off the
    /// host); default ./NAME.identity.
    #[arg(long, value_name = "FILE")]
    pub identity_out: Option<PathBuf>,
    /// Address the daemon will listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// TOTP time step in seconds (authenticator apps use 30).
    #[arg(long, default_value_t = 30)]
    pub totp_period: u64,
    /// Seconds without heartbeat after which a session is dropped.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Keep the volume's ciphertext on an S3 store (`s3://BUCKET/PREFIX`)
    /// or an NBD export (`nbd://HOST[:PORT]/EXPORT`, `nbds://...` with TLS
    /// against the vault's CA, `nbd+unix:///EXPORT?socket=PATH`) instead
    /// of DIR/volume.img: chunks with a MAC each and a manifest, checked
    /// against rollback at every open (docs/storage.md). The bucket must
    /// exist and honour conditional writes; the export must hold about
    /// twice the volume (two slots per chunk).
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// The S3 endpoint of a store that is not AWS (`https://s3.example.org`).
    #[arg(long, value_name = "URL", requires = "storage")]
    pub storage_endpoint: Option<String>,
    /// The S3 region (default us-east-1).
    #[arg(long, value_name = "REGION", requires = "storage")]
    pub storage_region: Option<String>,
    /// Allow plain HTTP to the endpoint (a test server on loopback only).
    #[arg(long, requires = "storage")]
    pub storage_allow_http: bool,
    /// A file of `aws_access_key_id=` and `aws_secret_access_key=` lines
    /// (mode 0600), copied into DIR; default: the AWS environment
    /// variables at each start.
    #[arg(long, value_name = "FILE", requires = "storage")]
    pub storage_credentials: Option<PathBuf>,
    /// Bytes per chunk on the store (a power of two, 64K to 64M; fixed at
    /// init). Smaller chunks upload less for each small synchronous write
    /// (a database, a mail spool); larger ones suit big sequential files.
    /// docs/storage.md has the measurements.
    /// Default: 1M.
    #[arg(long, value_name = "SIZE", requires = "storage", value_parser = coffre::size::parse_size)]
    pub storage_chunk_size: Option<u64>,
    /// Also write every chunk to this store (`s3://BUCKET/PREFIX` or an
    /// NBD URL, another provider): repeat for more. Each flush waits for every store that
    /// answers; one that does not within [storage] degrade_after_s (30 s)
    /// is left behind and brought back when it answers. Region, plain
    /// HTTP and credentials are the primary's (edit `[[storage.mirror]]`
    /// in config.toml for others).
    #[arg(long, value_name = "URL", requires = "storage")]
    pub mirror: Vec<String>,
    /// The mirrors' endpoint, when it is not the primary's.
    #[arg(long, value_name = "URL", requires = "mirror")]
    pub mirror_endpoint: Option<String>,
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleChoice {
    Member,
    Superuser,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeChoice {
    Fast,
    Safe,
}

#[derive(Debug, Subcommand)]
pub enum ProposalCommand {
    /// Pending proposals: id, change, author, approvals, expiry.
    List {
        #[command(flatten)]
        id: IdentityArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Keep the vault open for DURATION after everyone leaves.
    Add {
        /// A name for the task.
        name: String,
        /// How long (seconds, or with a unit: 90s, 30m, 2h). With
        /// `--workload`, the longest it may wait.
        #[arg(long, value_parser = parse_duration)]
        duration: u64,
        /// Keep the vault open until this workload's job ends (it must be
        /// running; you must be one of its members, or a superuser).
        #[arg(long, value_name = "NAME")]
        workload: Option<String>,
        #[command(flatten)]
        id: IdentityArg,
    },
    /// Tasks alive.
    List {
        #[command(flatten)]
        id: IdentityArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task (its owner or a superuser).
    Cancel {
        /// Task id.
        task_id: u64,
        #[command(flatten)]
        id: IdentityArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// The effective policy: who reaches what. A workload's declared ports
    /// are reachable by its members (all members when it names none) over
    /// the VPN, and by the other workloads; nothing else crosses the
    /// vault's firewall, except the listed egress.
    Show {
        #[command(flatten)]
        id: IdentityArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// The workloads declared in the vault's config.toml, with their state
    /// (running, frozen, suspended-to-vault, stopped, exited, failed) and
    /// the mode in force.
    List {
        #[command(flatten)]
        id: IdentityArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// A workload's output (stdout and stderr), the last BYTES of it. A
    /// project workload's log lives inside the volume: it can be read only
    /// while the vault is open. Its members and superusers may read it,
    /// from inside (after `coffre enter`); each read is audited.
    Logs {
        /// The workload.
        name: String,
        /// How much of the end of the log (default 64 KiB, at most 4 MiB).
        #[arg(long)]
        bytes: Option<u64>,
        #[command(flatten)]
        id: IdentityArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Write a hardened OpenVPN 2.6 server configuration for the vault, run
    /// as root on its host: a gateway certificate from the vault's CA, a
    /// tls-crypt key and an auth-token secret (kept if they exist, so
    /// profiles stay valid), and `DIR/gateway/server.conf`. It also writes
    /// `[gateway]` in config.toml: restart `coffre serve` to use it.
    ///
    /// Then run `openvpn --config DIR/gateway/server.conf`. The daemon
    /// connects to its management socket (in a directory only root can
    /// reach: it carries passwords in clear) and decides every connection:
    /// the certificate must be a member's, the password must open their
    /// keyslot, the TOTP code must be fresh. The first connection opens the
    /// vault, the last departure closes it.
    OpenvpnConfig(OpenvpnConfigArgs),
    /// On the VPN host (no vault directory there): carry OpenVPN's
    /// management interface to the vault over the bus.
    ///
    /// The relay connects to the broker with a gateway identity (`coffre
    /// bus identity DIR NAME --role gateway`), opens OpenVPN's management
    /// socket whenever the vault asks, seals every line OpenVPN writes
    /// (passwords, names, addresses) to the vault's key so the broker never
    /// reads them, and writes the vault's signed commands back. Every
    /// decision stays in the vault, whose `[gateway]` says `via = "bus"`
    /// (`coffre gateway openvpn-config DIR --relay NAME`). Runs in the
    /// foreground, for ever; reconnects with backoff; logs to stderr.
    Relay {
        /// The gateway's identity file.
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// The broker (default: the one in the identity).
        #[arg(long, value_name = "URL")]
        bus: Option<String>,
        /// OpenVPN's management socket on this host (in a directory only
        /// root can reach).
        #[arg(long, value_name = "PATH")]
        management: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct OpenvpnConfigArgs {
    /// The vault directory.
    pub dir: PathBuf,
    /// Host name or address members connect to (written into profiles).
    #[arg(long)]
    pub remote: String,
    /// Port OpenVPN listens on.
    #[arg(long, default_value_t = 1194)]
    pub port: u16,
    /// Transport OpenVPN runs over (udp unless a network only lets TCP through).
    #[arg(long, value_enum, default_value = "udp")]
    pub proto: ProtoChoice,
    /// The VPN's address space (the server takes .1).
    #[arg(long, default_value = "10.8.0.0/24")]
    pub network: String,
    /// Seconds between keepalive pings.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub keepalive_interval: u32,
    /// Seconds without a sign of life before a client is dropped (and its
    /// session ends).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub keepalive_timeout: u32,
    /// TLS renegotiation period; the auth token is renewed with it.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub reneg_sec: u32,
    /// How long a connection may live on its auth token before the
    /// password and a TOTP code are asked again.
    #[arg(long, value_name = "SECONDS", default_value_t = 43200)]
    pub token_lifetime: u32,
    /// A fixed VPN address for a member, as NAME=ADDRESS (repeatable).
    #[arg(long = "address", value_name = "NAME=ADDRESS")]
    pub addresses: Vec<String>,
    /// Profiles take the TOTP code typed after the password, instead of
    /// asking it separately (OpenVPN's static challenge).
    #[arg(long)]
    pub totp_suffix: bool,
    /// Keep OpenVPN running as root (default: it drops to nobody/nogroup).
    #[arg(long)]
    pub keep_root: bool,
    /// OpenVPN runs on another host, and its relay (this gateway component,
    /// `coffre gateway relay`) carries the management interface over the
    /// bus: sets `via = "bus"`. Needs `[bus]` (`coffre bus broker-config`).
    #[arg(long, value_name = "NAME")]
    pub relay: Option<String>,
    /// With --relay: also write what the VPN host needs (server.conf, its
    /// certificate and key, tls-crypt and token keys) into this directory,
    /// with paths relative to it: run `openvpn --cd DIR --config
    /// server.conf` there.
    #[arg(long, value_name = "DIR", requires = "relay")]
    pub out: Option<PathBuf>,
    /// With --out: OpenVPN's management socket on the VPN host (give the
    /// relay the same path).
    #[arg(
        long,
        value_name = "PATH",
        requires = "out",
        default_value = "/run/coffre-vpn/management.sock"
    )]
    pub management: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtoChoice {
    Udp,
    Tcp,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Members and their roles.
    List {
        #[command(flatten)]
        id: IdentityArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Invite a member: writes an invitation file (one-time code, vault
    /// address, CA fingerprint) to hand over; it expires (default 72 h)
    /// (superuser).
    Invite {
        /// The new member's name.
        name: String,
        /// Make them a superuser.
        #[arg(long, value_enum, default_value = "member")]
        role: RoleChoice,
        /// Where to write the invitation (mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Write your OpenVPN profile (.ovpn, mode 0600) for the vault's VPN
    /// gateway: the vault's CA, its tls-crypt key and address come from the
    /// vault; your certificate and private key come from your identity file
    /// on this machine and are never sent anywhere. Connect with the user
    /// name NAME and your vault password (and TOTP code).
    Profile {
        /// Your member name (the identity's).
        name: String,
        /// Where to write it (default ./NAME.ovpn).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Type the TOTP code after the password instead of answering a
        /// separate prompt (for clients without static-challenge support).
        #[arg(long)]
        totp_suffix: bool,
        #[command(flatten)]
        id: IdentityArg,
    },
    /// Cancel a pending invitation: its temporary keyslot is wiped
    /// (superuser; allowed while locked).
    CancelInvitation {
        /// The invited name.
        name: String,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Make a member a superuser, or a superuser a member (superuser).
    ///
    /// They keep their keyslot, certificate, password, numbers and files;
    /// only what the role grants changes, at once: the `_superusers` group
    /// and every workload's group in the vault's directory, their NFS
    /// server's groups, the commands they may run. A superuser made a
    /// member keeps their sessions and tasks; the approvals they gave no
    /// longer count. With an unlock quorum above 1 this makes a proposal
    /// the quorum approves (`coffre approve ID`). Refused while locked, for
    /// the last superuser, and when fewer superusers than the quorum would
    /// remain; with an organisation's directory, a new superuser must be in
    /// its superusers group.
    Role {
        /// The member.
        name: String,
        /// Their new role: member or superuser.
        #[arg(value_enum)]
        role: RoleChoice,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Remove a member: sessions dropped, keyslot wiped, certificate
    /// revoked (superuser).
    Remove {
        /// The member to remove.
        name: String,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Your SSH public keys in the vault's directory: the workloads' sshd
    /// finds them there (`AuthorizedKeysCommand`) for your account.
    #[command(subcommand)]
    SshKey(SshKeyCommand),
    /// Set your workload password: what you type to log in to a
    /// workload that needs a password (a remote desktop, a forge's web
    /// page). Never your vault password: a workload's administrator sees
    /// what is typed into it. It is hashed here (argon2id, 64 MiB); only
    /// the hash reaches the vault. It works while you are inside (a live
    /// session), on the workloads you may use, and not while the vault is
    /// locked.
    WorkloadPassword {
        /// File holding the new workload password (- for stdin).
        #[arg(long, value_name = "FILE", required_unless_present = "clear")]
        new_password_file: Option<PathBuf>,
        /// Remove it instead: password logins to workloads then fail.
        #[arg(long, conflicts_with = "new_password_file")]
        clear: bool,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SshKeyCommand {
    /// Add a public key (the `.pub` file: `TYPE BASE64 [COMMENT]`).
    Add {
        /// The public key file.
        file: PathBuf,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Your public keys, with their SHA256 fingerprints.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Remove a key, given as its `.pub` file or its `SHA256:` fingerprint.
    Remove {
        /// The `.pub` file or the fingerprint.
        key: String,
        #[command(flatten)]
        id: IdentityArg,
        #[command(flatten)]
        auth: AuthArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BusCommand {
    /// Write a RabbitMQ configuration for this vault into OUT, as root on
    /// the vault's host: TLS 1.3 only, the broker's certificate from the
    /// vault's CA for the --listen address, client certificates required
    /// and the only way to log in (EXTERNAL: one user per component, no
    /// passwords), each component's rights, the events exchange and one
    /// durable queue per monitor. Also issues the daemon's own bus
    /// certificate (kept if it exists) and sets `[bus] url` in config.toml:
    /// restart `coffre serve` to use it.
    ///
    /// Then run OUT/run on the broker's host (it starts rabbitmq-server in
    /// the foreground from OUT alone). Run this again after adding or
    /// forgetting a component, and restart the broker.
    BrokerConfig {
        /// The vault directory.
        dir: PathBuf,
        /// Address the broker listens on and components connect to
        /// (HOST:PORT; the broker's certificate names HOST).
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// Where to write the broker's files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Issue a component's identity (a new key and a certificate from the
    /// vault's CA, the vault's audit key, the broker's address) into a file
    /// readable by its owner only, and record the component for the
    /// broker's next configuration. Carry the file to the component's host.
    Identity {
        /// The vault directory.
        dir: PathBuf,
        /// The component's name (1 to 32 of a-z 0-9 - _ .).
        name: String,
        /// What it may do: monitor (reads events, keeps a witness copy of
        /// the audit chain), gateway (relays OpenVPN's management interface
        /// from the VPN host: `coffre gateway relay`), scheduler (adds and
        /// cancels tasks for the members named by --for: `coffre bus send`).
        #[arg(long, value_enum)]
        role: BusRoleChoice,
        /// A scheduler: the members it may add tasks for (comma-separated).
        #[arg(long = "for", value_name = "MEMBERS", value_delimiter = ',')]
        for_members: Vec<String>,
        /// A scheduler: the longest task it may add (90, 30m, 8h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        longest: Option<u64>,
        /// The broker's address (default: the vault's `[bus] url`).
        #[arg(long, value_name = "URL")]
        bus: Option<String>,
        /// The identity file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Forget a component: the broker refuses it once its configuration is
    /// written again (`coffre bus broker-config`) and the broker restarted.
    Forget {
        /// The vault directory.
        dir: PathBuf,
        /// The component's name.
        name: String,
    },
    /// List the components the broker is configured for.
    List {
        /// The vault directory.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Send the vault a command as a scheduler component, and print its
    /// answer (JSON). The command is the original design's JSON, given as
    /// an argument or on stdin:
    /// `{"command": "task_add", "task_name": "nightly build", "task_user":
    /// "alice", "task_expire": 3600}` keeps the open vault open for alice
    /// for an hour (never opens a closed one); `{"command": "task_cancel",
    /// "task_id": 3, "task_user": "alice"}` ends it. The command travels
    /// signed by the identity's key; the answer comes back signed by the
    /// vault. Exit status: 0 done, as the door's for a refusal (6 locked,
    /// 10 not permitted...), 11 broker unreachable or no answer in time.
    Send {
        /// The scheduler's identity file.
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// The broker (default: the one in the identity).
        #[arg(long, value_name = "URL")]
        bus: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30")]
        wait: u64,
        /// The command (JSON); `-` or nothing: read it from stdin.
        command: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BusRoleChoice {
    Monitor,
    Gateway,
    Scheduler,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the audit records.
    Show {
        #[command(flatten)]
        id: IdentityArg,
        /// Read the log from a vault directory instead of the daemon.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain and the signed head; names the first bad record.
    Verify {
        #[command(flatten)]
        id: IdentityArg,
        /// Verify offline, in a vault directory, instead of asking the daemon.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Keep a copy of the vault's audit chain off its host, from the bus,
    /// and raise the alarm when the vault's log is cut back, rewritten or
    /// forged, or when records never arrive. Runs until an alarm (or a
    /// signal); reconnects to the broker with backoff.
    ///
    /// Each record must carry the vault's audit signature and follow the
    /// last one held; the copy is STORE/witness.log (the format of the
    /// vault's audit.log). A new store trusts the first record it gets.
    /// On an alarm it publishes a `witness` event, prints why, and exits:
    /// 13 the log was rolled back or rewritten, 16 records were missed,
    /// 17 a forged record. 11: the broker refused this identity.
    Witness {
        /// The component identity (`coffre bus identity … --role monitor`).
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// The broker's address (default: the one in the identity).
        #[arg(long, value_name = "URL")]
        bus: Option<String>,
        /// The directory the witness keeps its copy in.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
    },
    /// Print the vault's events as they come, from the bus: audit records
    /// (each checked against the vault's audit key) and witnesses' alarms.
    /// Runs until interrupted.
    ///
    /// Example, the vault's state changes and who enters and leaves:
    ///   coffre audit follow --identity mon1.identity --only state,enter,leave
    Follow {
        /// The component identity (`coffre bus identity … --role monitor`).
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// The broker's address (default: the one in the identity).
        #[arg(long, value_name = "URL")]
        bus: Option<String>,
        /// One JSON event per line (for a SIEM), with `"verified"`.
        #[arg(long)]
        json: bool,
        /// Only the audit records with these actions (comma-separated:
        /// state, enter, leave, task_add, task_cancel, task_end, workload,
        /// lock, unlock, bus, gateway...); the broker filters them by
        /// routing key. Witnesses' alarms are always shown.
        #[arg(long, value_name = "ACTIONS", value_delimiter = ',', value_parser = parse_action)]
        only: Vec<String>,
    },
    /// Write the records after SEQ and the signed head, for an off-host
    /// archive (the head and key let a later export be checked against it).
    Export {
        #[command(flatten)]
        id: IdentityArg,
        /// Only the records after this one (0: all).
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        since: u64,
        /// One JSON document (vault, key, head, records) instead of lines.
        #[arg(long)]
        json: bool,
    },
}

/// An audit action, as a routing key's word.
fn parse_action(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: an action is a-z 0-9 _ - (as in `coffre audit show`)"
        ))
    }
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        Some('d') => (&t[..t.len() - 1], 86400),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a duration (examples: 90, 30m, 2h)"))
}

/// Where a volume is.
#[derive(Debug, Args)]
pub struct Target {
    /// The data device or file.
    pub path: PathBuf,
    /// Detached header file (the data device then holds ciphertext only).
    #[arg(long, value_name = "FILE")]
    pub header: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PbkdfChoice {
    Argon2id,
    Pbkdf2,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PriorityChoice {
    Prefer,
    Normal,
    Ignore,
}

impl PriorityChoice {
    pub fn value(self) -> u32 {
        match self {
            Self::Ignore => 0,
            Self::Normal => 1,
            Self::Prefer => 2,
        }
    }
}

/// KDF cost for a new keyslot: benchmarked to --iter-time, or explicit.
#[derive(Debug, Args)]
pub struct PbkdfArgs {
    /// Key derivation function for the new keyslot.
    #[arg(long, value_enum, default_value = "argon2id")]
    pub pbkdf: PbkdfChoice,
    /// Target unlock time in milliseconds; costs are benchmarked on this
    /// machine to reach it (cryptsetup's default is 2000).
    #[arg(long, value_name = "MS", conflicts_with = "pbkdf_force_iterations")]
    pub iter_time: Option<u64>,
    /// Exact cost: argon2 passes, or pbkdf2 iterations (no benchmark).
    #[arg(long, value_name = "N")]
    pub pbkdf_force_iterations: Option<u32>,
    /// argon2 memory in KiB: the exact memory with
    /// --pbkdf-force-iterations, otherwise the cap for the benchmark
    /// (default 1048576, never more than half the RAM).
    #[arg(long, value_name = "KIB")]
    pub pbkdf_memory: Option<u32>,
    /// argon2 lanes, computed in parallel (default: 4, at most the CPUs).
    #[arg(long, value_name = "N")]
    pub pbkdf_parallel: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a new LUKS2 volume (destroys what PATH holds).
    ///
    /// With --header, the header and keyslots go to their own file and PATH
    /// holds ciphertext only, from offset 0: whoever stores PATH has nothing
    /// to attack passphrases with. Keep that header file safe and backed up:
    /// without it the data is lost.
    Format {
        #[command(flatten)]
        target: Target,
        /// Size of the data area (e.g. 512M, 10G); required for a new file.
        #[arg(long, value_parser = coffre::size::parse_size)]
        size: Option<u64>,
        /// File holding the passphrase for keyslot 0 (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Data sector size in bytes.
        #[arg(long, default_value_t = 4096, value_parser = sector_size_parser)]
        sector_size: u32,
        /// Volume key size in bits: 512 is AES-256-XTS, 256 is AES-128-XTS.
        #[arg(long, default_value_t = 512, value_parser = key_size_parser)]
        key_size: usize,
        #[command(flatten)]
        pbkdf: PbkdfArgs,
        /// Label stored in the header.
        #[arg(long, default_value = "")]
        label: String,
        /// Format even if PATH or the header file already holds a LUKS header.
        #[arg(long)]
        force: bool,
    },
    /// Show the header: keyslots, segment, tokens, the state of both copies.
    Dump {
        #[command(flatten)]
        target: Target,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check a passphrase: exit 0 if it opens a keyslot, 2 if not.
    CheckKey {
        #[command(flatten)]
        target: Target,
        /// File holding the passphrase (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Try only this keyslot.
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
    },
    /// Add a keyslot for a new passphrase.
    AddKey {
        #[command(flatten)]
        target: Target,
        /// An existing passphrase (- for stdin).
        #[arg(long, value_name = "FILE", required_unless_present = "volume_key_file")]
        key_file: Option<PathBuf>,
        /// Authorise with the raw volume key instead (recovery).
        #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
        volume_key_file: Option<PathBuf>,
        /// The new passphrase.
        #[arg(long, value_name = "FILE")]
        new_keyfile: PathBuf,
        /// Keyslot number for the new passphrase (default: lowest free).
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
        /// Priority of the new keyslot when unlocking.
        #[arg(long, value_enum)]
        priority: Option<PriorityChoice>,
        #[command(flatten)]
        pbkdf: PbkdfArgs,
    },
    /// Remove a keyslot and wipe its key material.
    RemoveKey {
        #[command(flatten)]
        target: Target,
        /// Keyslot to remove.
        #[arg(long, value_name = "N")]
        key_slot: u32,
        /// A passphrase that opens some keyslot, proving you may (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Allow removing the last keyslot (the data becomes unreadable).
        #[arg(long)]
        force: bool,
    },
    /// Change the passphrase of the keyslot the old one opens, atomically.
    ChangeKey {
        #[command(flatten)]
        target: Target,
        /// The current passphrase.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// The new passphrase.
        #[arg(long, value_name = "FILE")]
        new_keyfile: PathBuf,
        /// Only this keyslot.
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
        #[command(flatten)]
        pbkdf: PbkdfArgs,
    },
    /// Set a keyslot's priority (cryptsetup config --priority).
    Config {
        #[command(flatten)]
        target: Target,
        /// The keyslot.
        #[arg(long, value_name = "N")]
        key_slot: u32,
        /// New priority.
        #[arg(long, value_enum)]
        priority: PriorityChoice,
    },
    /// Rewrite a damaged or stale header copy from the good one.
    ///
    /// Says what it will do first; asks for confirmation on a terminal, and
    /// needs --batch-mode otherwise. No other command writes to a header it
    /// found damaged.
    Repair {
        #[command(flatten)]
        target: Target,
        /// Do not ask for confirmation.
        #[arg(short = 'q', long)]
        batch_mode: bool,
    },
    /// Decrypt data from the volume to standard output.
    Read {
        #[command(flatten)]
        target: Target,
        /// The passphrase (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Start at this byte of the decrypted volume.
        #[arg(long, default_value = "0", value_parser = coffre::size::parse_size)]
        offset: u64,
        /// Read this many bytes (default: to the end).
        #[arg(long, value_parser = coffre::size::parse_size)]
        length: Option<u64>,
    },
    /// Encrypt standard input into the volume.
    Write {
        #[command(flatten)]
        target: Target,
        /// The passphrase (a file; stdin carries the data).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Start at this byte of the decrypted volume.
        #[arg(long, default_value = "0", value_parser = coffre::size::parse_size)]
        offset: u64,
    },
    /// Measure cipher throughput and unlock time on this machine.
    Bench {
        /// Bytes to encrypt per measurement.
        #[arg(long, default_value = "256M", value_parser = coffre::size::parse_size)]
        size: u64,
        /// Also time unlocking this volume (with --key-file).
        #[arg(long, value_name = "PATH", requires = "key_file")]
        volume: Option<PathBuf>,
        /// Detached header of --volume.
        #[arg(long, value_name = "FILE")]
        header: Option<PathBuf>,
        /// Passphrase for --volume.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn sector_size_parser(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the sector size is 512 or 4096".into()),
    }
}

fn key_size_parser(s: &str) -> Result<usize, String> {
    match s {
        "256" => Ok(256),
        "512" => Ok(512),
        _ => Err("the key size is 256 or 512 bits (aes-xts-plain64)".into()),
    }
}

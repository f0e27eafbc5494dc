//! `coffre serve`: the shell around the vault core. It turns connections
//! and timers into events, performs the core's effects in order (key
//! derivation in a memory-bounded pool, open, close, audit, persistence),
//! and answers over the mutual-TLS JSON API.

use crate::api::ApiCommand;
use crate::init::token_binds;
use crate::pki::fingerprint;
use crate::tls::server_config;
use crate::totp;
use crate::vaultdir::{Config, Control, DirError, VaultDir};
use coffre_api::ErrorCode;
use coffre_audit::{AuditLog, HostKey};
use coffre_luks2::{Passphrase, VolumeKey};
use coffre_storage::Luks2Container;
use coffre_vault::*;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

pub(crate) mod accounts;
mod audit;
mod custody;
mod directory;
mod dispatch;
mod exposure;
mod gateway;
mod helper;
mod http;
mod invitations;
mod members;
mod metrics;
mod network;
mod nfs;
mod services;
mod source;
mod status;
mod workloads;

use audit::AuditSink;
use custody::*;
use exposure::DataState;
use http::*;
use invitations::*;
use status::*;
use workloads::WorkloadState;

pub use network::vpn_link;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Vault directory.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The volume (busy, damaged...).
    #[error("the vault's volume: {0}")]
    Storage(#[from] coffre_storage::Error),
    /// The audit log does not verify or cannot be written.
    #[error("the audit log: {0} (run `coffre audit verify --dir DIR` to see what is wrong)")]
    Audit(#[from] coffre_audit::Error),
    /// TLS set-up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The vault network could not be set up (the daemon does not run
    /// without its firewall).
    #[error("the vault network: {0}")]
    Network(String),
    /// The members' numbers: a range that overlaps the host's, a
    /// `[data.members]` already imported, an ambiguous workload user.
    #[error("the vault's accounts: {0}")]
    Accounts(String),
    /// The organisation's directory (`[directory]`) cannot be used: its
    /// password file, its CA file.
    #[error("the organisation's directory: {0}")]
    Source(String),
    /// A change of the CA's key was interrupted.
    #[error(
        "{} is there: a change of the CA's key was interrupted; run `coffre renew --ca DIR --new-key` again to finish it",
        .0.display()
    )]
    CaKeyChange(std::path::PathBuf),
    /// SIGTERM and SIGINT could not be taken (a stop would kill the daemon
    /// without a close).
    #[error("cannot handle SIGTERM and SIGINT: {0}")]
    Signals(#[source] std::io::Error),
    /// Listening socket.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address it tried to listen on.
        addr: String,
        /// Why it could not.
        #[source]
        source: std::io::Error,
    },
}

type Answer = (u16, Value);

enum Msg {
    Api {
        fingerprint: Option<String>,
        /// The CA key the member's machine says it pins (hex).
        pinned: Option<String>,
        addr: SocketAddr,
        cmd: ApiCommand,
        reply: oneshot::Sender<Answer>,
    },
    /// A scrape of the metrics endpoint: the exposition text, now.
    Metrics(oneshot::Sender<String>),
    /// A keyslot check ended; `key` only when the core asked to keep it.
    KeyChecked {
        req: ReqId,
        ok: bool,
        key: Option<VolumeKey>,
    },
    /// A keyslot sealed in the KDF pool, to be committed on the actor.
    Sealed(Box<(Sealing, Result<coffre_storage::SealedKeyslot, String>)>),
    /// The data stack is up (or failed to come up), and what the
    /// workloads did.
    Exposed {
        /// Which open.
        open: u64,
        result: Result<String, String>,
        lines: Vec<coffre_workload::Line>,
        /// The key and the engine's cipher, while the vault is open.
        held: Option<Box<(VolumeKey, Arc<coffre_storage::CipherSlot>)>>,
    },
    /// A close of the data stack finished (`close`: which one).
    Unexposed {
        close: u64,
        result: Result<coffre_data::CloseReport, (String, coffre_data::CloseReport)>,
        lines: Vec<coffre_workload::Line>,
    },
    /// A forced close's deadline: if close `close` still runs, the engine
    /// is cut off and the key wiped.
    CloseDeadline(u64),
    /// From OpenVPN's management link.
    Link(crate::gateway::LinkEvent),
    /// The core's answer to a VPN client's `enter`.
    VpnAnswer(gateway::VpnAnswer),
    /// Workloads that ended by themselves, and the bound tasks' workloads
    /// that are not running.
    Reaped {
        lines: Vec<coffre_workload::Line>,
        ended: Vec<String>,
    },
    /// An answer from the organisation's directory.
    Source(Box<source::SourceMsg>),
    /// A scheduler's command from the bus, checked: for `member`, by the
    /// component `by`.
    Scheduled {
        member: String,
        by: String,
        command: coffre_vault::Command,
        reply: oneshot::Sender<Answer>,
    },
    /// A record from work done off the actor.
    SystemAudit {
        action: &'static str,
        outcome: &'static str,
        detail: String,
    },
    Tick,
    Shutdown(oneshot::Sender<()>),
}

/// The wall clock, as the vault core counts time.
fn now_ms() -> Millis {
    Millis(coffre_sys::time::now_ms())
}

/// The daemon's state, owned by its actor (one task: every change to the
/// vault happens here, in order). Each concern keeps its own part, in
/// its module; the work that blocks runs elsewhere and reports back by
/// message.
struct Shell {
    dir: VaultDir,
    config: Config,
    control: Control,
    /// The rules (sans I/O): what the shell asks, and what it must do.
    vault: Vault,
    /// The audit log, and what waits to be written to it.
    audit: AuditSink,
    /// Passwords, keys and the KDF pool.
    custody: Custody,
    /// Joins under way and the throttle on strangers' joins.
    joins: Joins,
    /// The data stack: open, close, and what waits for them.
    data: DataState,
    /// The team's workloads.
    workloads: WorkloadState,
    container: Arc<RwLock<Luks2Container>>,
    /// Members waiting for the core's answer.
    replies: HashMap<ReqId, oneshot::Sender<Answer>>,
    /// The certificate (fingerprint) each pending renewal came with: the
    /// one it keeps valid beside the new one.
    renewing: HashMap<ReqId, String>,
    /// Sessions whose `enter` answer found its client gone: left once the
    /// core's events settle ([`Server::leave_unclaimed`]).
    unclaimed: Vec<coffre_vault::SessionId>,
    tx: mpsc::UnboundedSender<Msg>,
    next_req: u64,
    /// OpenVPN's clients and the sessions they hold.
    vpn: gateway::VpnState,
    /// Commands to OpenVPN's management link (if the vault has a gateway).
    gw_tx: Option<mpsc::UnboundedSender<crate::gateway::LinkCommand>>,
    /// Whether the vault is locked, for work that runs off the actor (a
    /// join between its temporary keyslot and its new keyslot).
    locked_flag: Arc<std::sync::atomic::AtomicBool>,
    /// How many times the vault has been locked since the daemon started:
    /// work begun before a lock is not committed after it, even once
    /// unlocked.
    lock_epoch: u64,
    /// Why the control data could not be saved at the last try (a lock,
    /// a used TOTP step, a member's removal held in memory only): tried
    /// again at every tick until it is.
    unsaved: Option<String>,
    /// The vault network, when config.toml has a `[network]`.
    net: Option<network::NetState>,
    /// The organisation's directory, when config.toml has a
    /// `[directory]`.
    source: Option<source::SourceState>,
    /// What the metrics endpoint shows that the shell counts.
    metrics: metrics::Metrics,
    /// When the host's certificate files are looked at next (ms).
    host_certs_next_ms: u64,
}

/// A failure's answer (500).
fn failure(message: String) -> Answer {
    (500, error_json(ErrorCode::Failure, message))
}

/// A refusal's body: its typed code and a sentence for the member.
fn error_json(code: ErrorCode, message: impl serde::Serialize) -> Value {
    json!({"ok": false, "error": code.as_str(), "message": message})
}

/// Runs the daemon for the vault in `dir` until SIGTERM or SIGINT.
/// `on_ready` gets the bound address once the daemon accepts connections.
pub async fn serve(
    dir: &Path,
    listen: Option<String>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    // SIGTERM and SIGINT are taken first, before anything is set up: one
    // that comes during the start is then acted on once the daemon runs
    // (a close, as any stop). They used to be taken by a task spawned
    // just before READY=1 went out, and a service manager that stopped the
    // unit as soon as it read READY could come first and kill the daemon
    // with the signal's default action (seen in CI: the package test does
    // just that).
    //
    // A stop during the start itself (a step that hangs: a stale mount, the
    // network) ends the process there, as the signal's default action did:
    // nothing is open yet, and the next start cleans up after it as after
    // a crash. From just before READY=1, a stop is a close.
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => return Err(ServeError::Signals(e)),
        }
    };
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn({
        let running = running.clone();
        async move {
            let sig = tokio::select! {
                _ = term.recv() => coffre_sys::SIGTERM,
                _ = int.recv() => coffre_sys::SIGINT,
            };
            if running.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = stop_tx.send(());
            } else {
                eprintln!("coffre serve: stopped during its start, before the vault was served");
                coffre_sys::die_of(sig);
            }
        }
    });
    coffre_sys::return_large_allocations();
    coffre_sys::raise_open_files_limit();
    // Absolute and resolved: the mount table and sysfs speak in such paths,
    // and finding our own mounts after a crash depends on it.
    let dir = &dir.canonicalize().map_err(|source| DirError::Io {
        what: "resolve",
        path: dir.to_path_buf(),
        source,
    })?;
    let vd = VaultDir::new(dir);
    let config = vd.load_config()?;
    crate::log::init(config.log.as_ref().map_or("info", |l| l.level.as_str()));
    let mut control = vd.load_control()?;
    let account_notes = accounts::prepare(&config, &mut control, coffre_sys::time::now_ms())
        .map_err(ServeError::Accounts)?;
    // Exclusive locks on the volume and its header for the daemon's life.
    // With [storage], the header alone: the data lives on the store.
    let container = match &config.volume {
        Some(v) => Luks2Container::open(v, Some(&config.header))?,
        None => Luks2Container::open(&config.header, None)?,
    };
    // Checked under the header's lock, which `coffre renew --ca --new-key`
    // holds while it changes the files.
    if vd.ca_next_cert().exists() {
        return Err(ServeError::CaKeyChange(vd.ca_next_cert()));
    }
    let host_key = HostKey::load_or_create(&vd.host_key())?;
    let audit = AuditLog::open(dir, host_key)?;
    let head_for_replies = HeadForReplies {
        watch: audit.head_watch(),
        key: audit.public_hex(),
    };
    let unclean = vd.running_marker().exists();
    crate::vaultdir::write_atomic(
        &vd.running_marker(),
        std::process::id().to_string().as_bytes(),
        0o600,
    )?;

    // During a change of the CA's key, the door trusts both CAs and sends
    // the cross certificate after its own (docs/operations.md).
    let tls = server_config(
        &vd.door_roots()?,
        &vd.door_chain()?,
        &vd.read(&vd.server_key())?,
    )?;
    let addr = listen.unwrap_or_else(|| config.listen.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: addr.clone(),
        source,
    })?;

    // The rules come from config.toml (the operator's file); the unlock
    // quorum is changed through `coffre quorum` (audited) and lives in the
    // control data.
    let mut persistent = control.vault.clone();
    let quorum = persistent.policy.unlock_quorum;
    persistent.policy = config.policy.clone();
    persistent.policy.unlock_quorum = quorum;
    let join_policy = coffre_vault::invitations::ThrottlePolicy {
        base_ms: persistent.policy.throttle_base_ms,
        max_ms: persistent.policy.throttle_max_ms,
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cap =
        u32::try_from(config.kdf_memory_cap_kib.clamp(1, u64::from(u32::MAX))).unwrap_or(u32::MAX);
    // A daemon killed while open leaves its mount, loop device, FUSE
    // file and socket behind: take them down before anything else.
    let layout = vd.data_layout(&config);
    let mut workloads = coffre_workload::Workloads::new(
        &config.workloads,
        &config.workload,
        coffre_workload::Paths {
            scope: coffre_workload::scope_of(dir),
            run: dir.join("run").join("workloads"),
            data: layout.mountpoint.clone(),
            view: dir.join("run").join("view"),
            cover: (layout.mountpoint.parent() == Some(dir.as_path())).then(|| dir.clone()),
            hide: coffre_data::system::vault_mounts,
            nbd_socket: layout.nbd_socket.clone(),
            vms: dir.join("run").join("vm"),
        },
    );
    // What a crashed daemon left running goes first (it may still be
    // using the data), then the data stack it left.
    let stale_workloads = workloads.cleanup_stale();
    // The firewall before any workload runs; no daemon without it.
    let mut net_notes = Vec::new();
    let net = match &config.network {
        None => None,
        Some(_) => {
            // At start, before anything is served: blocking is fine.
            let up = network::bring_up(&config, dir).map_err(ServeError::Network)?;
            workloads.attach_network(up.links);
            net_notes = up.notes;
            Some(up.state)
        }
    };
    let cleaned = tokio::task::spawn_blocking({
        let layout = layout.clone();
        let grace = Duration::from_secs(config.data.close_grace_s);
        move || coffre_data::cleanup_stale(&layout, grace)
    })
    .await
    .unwrap_or_default();
    let mut shell = Shell {
        dir: vd,
        vault: Vault::new(persistent),
        control,
        config,
        audit: AuditSink::new(audit),
        custody: Custody::new(cap),
        joins: Joins {
            door: coffre_vault::invitations::JoinDoor::new(join_policy),
            ..Joins::default()
        },
        data: DataState::new(layout),
        workloads: WorkloadState::new(workloads),
        container: Arc::new(RwLock::new(container)),
        replies: HashMap::new(),
        renewing: HashMap::new(),
        unclaimed: Vec::new(),
        tx: tx.clone(),
        next_req: 1,
        vpn: gateway::VpnState::default(),
        gw_tx: None,
        locked_flag: Arc::default(),
        lock_epoch: 0,
        unsaved: None,
        net,
        source: None,
        metrics: metrics::Metrics::default(),
        host_certs_next_ms: 0,
    };
    shell.source_start().map_err(ServeError::Source)?;
    for n in net_notes {
        shell.system_audit("network", "up", n);
    }
    for n in account_notes {
        shell.system_audit("accounts", "ok", n);
    }
    shell.persist();
    shell.accounts_changed();
    shell.nfs_start();
    shell.directory_start();

    let via = match shell.config.gateway.as_ref().map(|g| g.via) {
        None => None,
        Some(crate::vaultdir::GatewayVia::Local) => {
            shell.dir.management_socket(&shell.config).map(|sock| {
                // The socket's directory protects the passwords it carries
                // (the link refuses a socket others could reach, and says
                // why).
                if let Some(parent) = sock.parent() {
                    let _ = crate::gateway::private_dir(parent);
                }
                crate::gateway::Via::Socket(sock)
            })
        }
        Some(crate::vaultdir::GatewayVia::Bus) => {
            let report_tx = tx.clone();
            let refused = Box::new(move |detail: String| {
                let _ = report_tx.send(Msg::SystemAudit {
                    action: "gateway",
                    outcome: "refused",
                    detail,
                });
            });
            match relay_config(&shell.dir, &shell.config, refused) {
                Ok(cfg) => Some(crate::gateway::Via::Relay(Box::new(cfg))),
                Err(e) => {
                    shell.system_audit(
                        "gateway",
                        "failed",
                        format!("{e}; the vault runs without its VPN gateway"),
                    );
                    None
                }
            }
        }
    };
    if let Some(via) = via {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        shell.gw_tx = Some(cmd_tx);
        tokio::spawn(crate::gateway::run(via, ev_tx, cmd_rx));
        let link_tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                if link_tx.send(Msg::Link(ev)).is_err() {
                    break;
                }
            }
        });
    }
    for line in cleaned {
        shell.system_audit("cleanup", "ok", line);
    }
    shell.workload_audit(stale_workloads);
    if shell
        .config
        .workload
        .iter()
        .any(|w| w.role == coffre_workload::config::Role::Project)
    {
        let at = shell.dir.root.join("run").join("view");
        match coffre_data::cut::CutLayer::mount(&at) {
            Ok(c) => shell.data.cut = Some(Arc::new(c)),
            Err(e) => shell.system_audit(
                "workload",
                "failed",
                format!("the workloads' view of the data at {}: {e}", at.display()),
            ),
        }
    }
    let lines = shell
        .workloads
        .set
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .start_services();
    shell.workload_audit(lines);
    shell.run(Event::Boot { unclean });

    if let Some(m) = shell.config.metrics.clone() {
        let addr = m.addr().map_err(|e| ServeError::Listen {
            addr: m.listen.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        // Not fatal: a local user who took the port first must not keep
        // the vault from starting (its members' door is what matters).
        if let Err(e) = metrics::serve(addr, tx.clone()).await {
            shell.system_audit(
                "metrics",
                "failed",
                format!(
                    "the metrics endpoint on {}: {e}; the vault runs without it",
                    m.listen
                ),
            );
        }
    }

    if let Some(b) = shell.config.bus.clone() {
        // Not fatal either: the vault works on its own door; the bus only
        // carries copies of what the audit log holds.
        match crate::bus::daemon_identity(&shell.dir, &b.url) {
            Ok(id) => {
                let report_tx = tx.clone();
                let report: crate::bus::Report = Box::new(move |outcome, detail| {
                    let _ = report_tx.send(Msg::SystemAudit {
                        action: "bus",
                        outcome,
                        detail,
                    });
                });
                match crate::bus::VaultKeys::load(&shell.dir) {
                    Ok(keys) => {
                        let submit_tx = tx.clone();
                        let submit: crate::buscmd::Submit = Box::new(move |member, by, command| {
                            let (reply, rx) = oneshot::channel();
                            let _ = submit_tx.send(Msg::Scheduled {
                                member,
                                by,
                                command,
                                reply,
                            });
                            rx
                        });
                        let report_tx = tx.clone();
                        let report: crate::buscmd::Report = Box::new(move |outcome, detail| {
                            let _ = report_tx.send(Msg::SystemAudit {
                                action: "bus_command",
                                outcome,
                                detail,
                            });
                        });
                        let cfg = crate::buscmd::CommandsConfig {
                            id: id.clone(),
                            url: b.url.clone(),
                            keys: Arc::new(keys),
                            dir: dir.to_path_buf(),
                        };
                        tokio::spawn(crate::buscmd::serve(cfg, submit, report));
                    }
                    Err(e) => shell.system_audit(
                        "bus_command",
                        "failed",
                        format!("{e}: commands over the bus are not served"),
                    ),
                }
                tokio::spawn(crate::bus::publish(
                    dir.to_path_buf(),
                    id,
                    b.url,
                    head_for_replies.watch.clone(),
                    report,
                ));
            }
            Err(e) => shell.system_audit(
                "bus",
                "failed",
                format!("{e}; the vault runs without its bus"),
            ),
        }
    }

    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let accept_tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = accept_tx.clone();
            let head = head_for_replies.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let fp = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| fingerprint(c.as_ref()));
                let svc = service_fn(move |req| {
                    handle_http(req, tx.clone(), fp.clone(), peer, head.clone())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let tick_tx = tx.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(500));
        loop {
            iv.tick().await;
            if tick_tx.send(Msg::Tick).is_err() {
                break;
            }
        }
    });
    let sig_tx = tx.clone();
    tokio::spawn(async move {
        if stop_rx.await.is_ok() {
            let (done, _wait) = oneshot::channel();
            let _ = sig_tx.send(Msg::Shutdown(done));
        }
    });
    running.store(true, std::sync::atomic::Ordering::SeqCst);
    on_ready(local);
    // Under systemd (Type=notify): accepting connections now.
    if let Err(e) = crate::sd_notify::notify(&format!("READY=1\nSTATUS=listening on {local}")) {
        shell.system_audit(
            "service",
            "failed",
            format!("could not tell the service manager the daemon is ready: {e}"),
        );
    }

    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Api {
                fingerprint,
                pinned,
                addr,
                cmd,
                reply,
            } => shell.api(fingerprint, pinned, addr, cmd, reply),
            Msg::Metrics(reply) => {
                let _ = reply.send(shell.metrics_text());
            }
            Msg::Scheduled {
                member,
                by,
                command,
                reply,
            } => shell.scheduled(member, by, command, reply),
            Msg::KeyChecked { req, ok, key } => shell.key_checked(req, ok, key),
            Msg::Sealed(job) => {
                let (purpose, result) = *job;
                shell.sealed(purpose, result)
            }
            Msg::Exposed {
                open,
                result,
                lines,
                held,
            } => shell.exposed(open, result, lines, held.map(|h| *h)),
            Msg::Unexposed {
                close,
                result,
                lines,
            } => {
                shell.data.closes_running.remove(&close);
                if shell.data.closes_abandoned.remove(&close) {
                    shell.late_close(result, lines);
                } else {
                    shell.unexposed(result, lines);
                }
            }
            Msg::CloseDeadline(close) => shell.close_deadline(close),
            Msg::Link(ev) => shell.link_event(ev),
            Msg::VpnAnswer(a) => shell.vpn_answer(a),
            Msg::Reaped { lines, ended } => shell.reaped(lines, ended),
            Msg::Source(m) => shell.source_msg(*m),
            Msg::SystemAudit {
                action,
                outcome,
                detail,
            } => shell.system_audit(action, outcome, detail),
            Msg::Tick => {
                shell.flush_audit();
                shell.join_door_tick();
                shell.reap_workloads();
                shell.vpn_tick();
                shell.net_tick();
                shell.nfs_tick();
                shell.directory_tick();
                shell.source_tick();
                shell.wipe_tick();
                shell.parked_gone_tick();
                shell.open_deadline_tick();
                shell.close_progress_tick();
                // Numbers or groups a busy close kept from the workloads.
                shell.accounts_changed();
                if shell.unsaved.is_some() {
                    shell.persist();
                }
                shell.host_certificates_tick();
                shell.run(Event::Tick);
            }
            Msg::Shutdown(done) => {
                // The close may take a while (workloads suspended into the
                // volume): the service manager knows it has begun.
                let _ = crate::sd_notify::notify("STOPPING=1\nSTATUS=closing the vault");
                shell.shutdown();
                shell.net_stop();
                let _ = done.send(());
                break;
            }
        }
        // Whatever the message changed (a removal, a lock, a session
        // ended), the directory has it before the next one.
        shell.directory_sync();
    }
    Ok(())
}

/// What the daemon needs to reach OpenVPN through the relay named in
/// `[gateway] relay`.
fn relay_config(
    dir: &VaultDir,
    config: &Config,
    refused: Box<dyn Fn(String) + Send + Sync>,
) -> Result<crate::relay::RelayConfig, String> {
    let bus = config
        .bus
        .as_ref()
        .ok_or("[gateway] via = \"bus\" without [bus]")?;
    let relay = config
        .gateway
        .as_ref()
        .and_then(|g| g.relay.clone())
        .ok_or("[gateway] via = \"bus\" without relay = NAME")?;
    Ok(crate::relay::RelayConfig {
        id: crate::bus::daemon_identity(dir, &bus.url).map_err(|e| e.to_string())?,
        url: bus.url.clone(),
        relay,
        dir: dir.root.clone(),
        keys: Arc::new(crate::bus::VaultKeys::load(dir).map_err(|e| e.to_string())?),
        refused,
    })
}

//! `coffre`: a team strongroom for sensitive data.

mod bench;
mod cli;
mod doctor;
mod secrets;
mod vault;
mod volume;

use clap::Parser;
use std::process::ExitCode;

/// Every freed block is wiped: the TLS, HTTP and JSON libraries drop
/// buffers that held passwords without wiping them (docs/security.md,
/// "Secrets in memory").
#[global_allocator]
static ALLOCATOR: coffre_sys::alloc::WipeOnFree = coffre_sys::alloc::WipeOnFree;

fn main() -> ExitCode {
    // Before any thread, for every command (`storage migrate` and `export`
    // move chunks as the daemon does): glibc's large blocks go back to the
    // kernel, smaller freed ones are kept for reuse.
    coffre_sys::return_large_allocations();
    // Before anything can hold a secret: no core dumps, not ptrace-able.
    if let Err(e) = coffre_sys::disable_core_dumps() {
        eprintln!("coffre: warning: could not disable core dumps: {e}");
    }
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    coffre::exit::OK
                }
                _ => coffre::exit::USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    use cli::Command as C;
    let result = match cli.command {
        C::Init(a) => {
            // Before any thread: the format's FUSE mount stays in a
            // namespace of its own (without the privilege to make one, as
            // before: in the host's).
            if let Err(e) = coffre_sys::private_mount_namespace()
                && e.kind() != std::io::ErrorKind::PermissionDenied
            {
                eprintln!("coffre: warning: no private mount namespace for the format: {e}");
            }
            vault::init(a)
        }
        C::Serve { dir, listen } => vault::serve(dir, listen),
        C::Doctor { dir, json } => doctor::run(dir.as_deref(), json),
        C::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut cli::Cli::command(),
                "coffre",
                &mut std::io::stdout(),
            );
            Ok(coffre::exit::OK)
        }
        C::Manpages { dir } => manpages(&dir),
        C::DhcpServer { uid, gid } => dhcp_server(uid, gid),
        C::NfsServer {
            sockets,
            workers,
            confine,
            uid,
            gid,
            acts_uids,
            acts_gids,
            groups,
        } => nfs_server(
            sockets,
            workers,
            confine.as_deref(),
            Some((uid, gid)),
            &acts_uids,
            &acts_gids,
            groups.as_deref(),
        ),
        C::LdapServer { uid, gid } => ldap_server(uid, gid),
        C::Enter {
            id,
            auth,
            heartbeat,
            detach: true,
        } => vault::enter_detached(id, auth, heartbeat),
        C::Enter {
            id,
            auth,
            heartbeat,
            detach: false,
        } => vault::enter(id, auth, heartbeat),
        C::Leave { id } => vault::leave(id),
        C::Status { id, json } => vault::status(id, json),
        C::Task(t) => vault::task(t),
        C::Workload(w) => vault::workload(w),
        C::Network(n) => vault::network(n),
        C::Lock { id, auth, reason } => vault::lock(id, auth, reason),
        C::Unlock { id, auth } => vault::unlock(id, auth),
        C::Mode { mode, id, auth } => vault::mode(id, auth, mode),
        C::Quorum { quorum, id, auth } => vault::quorum(id, auth, quorum),
        C::Approve {
            proposal,
            out,
            id,
            auth,
        } => vault::approve(id, auth, proposal, out),
        C::Proposal(p) => vault::proposal(p),
        C::Member(m) => vault::member(m),
        C::Join {
            invitation,
            password_file,
            identity_out,
            server,
        } => vault::join(&invitation, &password_file, identity_out, server),
        C::Passwd {
            id,
            auth,
            new_password_file,
        } => vault::passwd(id, auth, &new_password_file),
        C::Renew {
            server,
            gateway,
            ca,
            new_key,
            finish,
            force,
            identity,
            address,
            password_file,
            totp,
            trust_ca,
        } => vault::renew(
            server,
            gateway,
            ca,
            (new_key, finish, force),
            cli::IdentityArg {
                identity,
                server: address,
            },
            (password_file, totp, trust_ca),
        ),
        C::Audit(a) => vault::audit(a),
        C::Gateway(g) => vault::gateway(g),
        C::Bus(b) => vault::bus(b),
        C::Volume(v) => volume::run(v),
        C::Storage(s) => vault::storage(s),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Causes often repeat their source's text: print each once.
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&text);
                }
            }
            eprintln!("coffre: error: {msg}");
            ExitCode::from(coffre::exit::code_for(&e))
        }
    }
}

/// `coffre manpages DIR`: a page per visible command, named by its path
/// (`coffre-volume-format.1`), from the same definition as `--help`.
fn manpages(dir: &std::path::Path) -> anyhow::Result<u8> {
    use anyhow::Context;
    use clap::CommandFactory;
    fn write(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<()> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.to_owned()))
            .title(name.to_uppercase())
            .render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            write(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let mut cmd = cli::Cli::command();
    cmd.build();
    write(&cmd, "coffre", dir)?;
    Ok(coffre::exit::OK)
}

/// `coffre nfs-server`: what the daemon runs for the VMs' shares: the
/// handle broker (this process, `user` with only CAP_DAC_READ_SEARCH,
/// holding the handle key) and the server it forks (`user` with only
/// CAP_SETUID and CAP_SETGID, parsing guests' bytes), both in
/// `coffre_nfs::control::run`, before a byte is served; each confines
/// itself (Landlock) beneath `confine` and applies its seccomp filter.
fn nfs_server(
    sockets: u32,
    workers: usize,
    confine: Option<&std::path::Path>,
    user: Option<(u32, u32)>,
    acts_uids: &str,
    acts_gids: &str,
    groups: Option<&str>,
) -> anyhow::Result<u8> {
    let acts = coffre_sys::seccomp::Acts {
        uids: coffre_sys::seccomp::Acts::parse_ranges(acts_uids)
            .map_err(|e| anyhow::anyhow!("--acts-uids: {e}"))?,
        gids: coffre_sys::seccomp::Acts::parse_ranges(acts_gids)
            .map_err(|e| anyhow::anyhow!("--acts-gids: {e}"))?,
        groups: groups
            .map(coffre_sys::seccomp::Acts::parse_ids)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--groups: {e}"))?,
    };
    coffre_sys::limit(&coffre_nfs::control::LIMITS)
        .map_err(|e| anyhow::anyhow!("setting its limits: {e}"))?;
    coffre_sys::forbid_dumps().map_err(|e| anyhow::anyhow!("PR_SET_DUMPABLE: {e}"))?;
    coffre_sys::child::die_with_parent().map_err(|e| anyhow::anyhow!("PR_SET_PDEATHSIG: {e}"))?;
    let fds = (0..sockets.min(3))
        .map(|i| coffre_sys::child::inherited_fd(3 + i32::try_from(i).unwrap_or(0)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("the NFS server's sockets: {e}"))?;
    let sockets = coffre_nfs::Sockets::from_fds(fds)?;
    coffre_nfs::control::run(sockets, workers.clamp(1, 64), confine, user, acts)?;
    Ok(coffre::exit::OK)
}

/// `coffre ldap-server`: what the daemon runs for the VMs' directory.
/// Started as root, it drops to `uid` (no capability left) before it
/// reads a byte from the daemon or a guest. It holds no volume key and
/// no CA key: only the directory, the workload passwords' verifiers and
/// its own TLS key.
fn ldap_server(uid: u32, gid: u32) -> anyhow::Result<u8> {
    coffre_sys::limit(&coffre_ldap::control::LIMITS)
        .map_err(|e| anyhow::anyhow!("setting its limits: {e}"))?;
    coffre_sys::child::become_user(uid, gid)
        .map_err(|e| anyhow::anyhow!("dropping to uid {uid}: {e}"))?;
    // Not debuggable by other processes of that user (its memory has the
    // verifiers and the TLS key); gone with the daemon.
    coffre_sys::forbid_dumps().map_err(|e| anyhow::anyhow!("PR_SET_DUMPABLE: {e}"))?;
    coffre_sys::child::die_with_parent().map_err(|e| anyhow::anyhow!("PR_SET_PDEATHSIG: {e}"))?;
    let plain = coffre_sys::child::inherited_fd(3)
        .map_err(|e| anyhow::anyhow!("the LDAP server's plain socket (fd 3): {e}"))?;
    let ldaps = coffre_sys::child::inherited_fd(4)
        .map_err(|e| anyhow::anyhow!("the LDAP server's LDAPS socket (fd 4): {e}"))?;
    confine_to_nothing("ldap-server")?;
    coffre_ldap::control::run([
        std::net::TcpListener::from(plain),
        std::net::TcpListener::from(ldaps),
    ])?;
    Ok(coffre::exit::OK)
}

/// Confines a helper that has what it needs (its sockets, its standard
/// streams) to no file at all, before it starts a thread or reads a byte
/// from a guest (`coffre_sys::confine`): taken over, it cannot read what
/// its user could (the host's world-readable files, `/proc`). Said in its
/// log, as is a kernel without Landlock.
/// Then a seccomp filter refuses it the system calls that lead out of
/// its sandbox or into the kernel's widest surfaces
/// (`coffre_sys::seccomp`), and no file by handle.
fn confine_to_nothing(what: &str) -> anyhow::Result<()> {
    let c = coffre_sys::confine::to_beneath(&[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    match c {
        coffre_sys::confine::Confined::Not => {
            eprintln!("coffre {what}: NOT confined (this kernel has no Landlock)");
        }
        c => eprintln!(
            "coffre {what}: confined to no file ({} by Landlock)",
            c.as_str()
        ),
    }
    eprintln!(
        "coffre {what}: {}",
        coffre_sys::seccomp::said(&coffre_sys::seccomp::refuse(
            coffre_sys::seccomp::Profile::NoHandles,
            None
        ))
    );
    Ok(())
}

/// `coffre dhcp-server`: what the daemon runs for the vault network.
/// Started as root (so its binary need not be reachable by `uid`), it
/// drops to `uid` before it reads a byte of its specification or of a
/// guest's packets.
fn dhcp_server(uid: u32, gid: u32) -> anyhow::Result<u8> {
    coffre_sys::limit(&coffre::DHCP_LIMITS)
        .map_err(|e| anyhow::anyhow!("setting its limits: {e}"))?;
    coffre_sys::child::become_user(uid, gid)
        .map_err(|e| anyhow::anyhow!("dropping to uid {uid}: {e}"))?;
    // Not debuggable by other processes of that user; gone with the
    // daemon (an orphan would serve old leases next to a new one).
    coffre_sys::forbid_dumps().map_err(|e| anyhow::anyhow!("PR_SET_DUMPABLE: {e}"))?;
    coffre_sys::child::die_with_parent().map_err(|e| anyhow::anyhow!("PR_SET_PDEATHSIG: {e}"))?;
    let spec: coffre_dhcp::Spec = serde_json::from_reader(std::io::stdin().lock())
        .map_err(|e| anyhow::anyhow!("the DHCP server's specification on stdin: {e}"))?;
    let sockets = spec
        .interfaces
        .iter()
        .map(|i| coffre_sys::child::inherited_fd(i.fd))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("the DHCP server's sockets: {e}"))?;
    confine_to_nothing("dhcp-server")?;
    coffre_dhcp::serve(spec, sockets)?;
    Ok(coffre::exit::OK)
}

//! The server's process: what the daemon starts (`coffre nfs-server`),
//! with the listening sockets it bound, and drives over the child's
//! standard input, one JSON command per line, one JSON answer per line
//! on standard output:
//!
//! - `{"cmd":"exports","exports":[ExportSpec...]}` → `{"ok":true,"failed":[[workload, why]...]}`
//! - `{"cmd":"open","key":"64 hex digits"}` → the same (the key is the
//!   handle key, derived from the volume key by the daemon)
//! - `{"cmd":"close"}` → `{"ok":true}` once no call touches the data
//!   and the key is gone
//! - `{"cmd":"stats"}` → `{"ok":true,"open":..,"calls":..,...}`
//!
//! The end of standard input (the daemon gone) ends the process.
//!
//! Two processes (see [`crate::broker`]): the one the daemon starts is
//! the **broker**, which reads the daemon's commands, keeps the handle
//! key and alone opens files by handle; it forks the **server**, which
//! parses guests' bytes and gets the commands from the broker (never the
//! key). Each keeps only what it needs: the daemon's choice of user
//! (one of its own per VM's server, of no account), not root; the broker `CAP_DAC_READ_SEARCH` (to open
//! handles), the server `CAP_SETUID` and `CAP_SETGID` (to act as an
//! export's user on a thread); nothing else in any set or the bounding
//! set, `no_new_privs`, not dumpable. Given a directory (`DIR/run/nfs/NAME`,
//! where the daemon mounts its VM's share for it and nothing else), each
//! confines itself beneath it by Landlock before it starts a thread: the
//! server, taken over, reaches that share by path and nothing else; it
//! cannot open a file by handle, so no team file outside the shares.
//! A seccomp filter then refuses each the system calls that lead out of
//! its sandbox or into the kernel's widest surfaces
//! (`coffre_sys::seccomp`: `Nfs` for the server, `NfsBroker` for the
//! broker).

use crate::broker::{self, Client, Keeper};
use crate::fs::ExportSpec;
use crate::handle::HandleKey;
use crate::server::{Server, Sockets, merge};
use serde::Deserialize;
use serde_json::{Value, json};
use std::io::{self, BufRead, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use zeroize::Zeroize;

/// One line on standard error, in one write: the broker and the server
/// share their log (appended to), and `eprintln!` writes a formatted line
/// in pieces, between which the other process's line could land.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($t)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// What `coffre nfs-server` may use (set before the broker forks the
/// server, so each process has these; the processes count is its user's,
/// the broker's and the server's threads together): its workers, a
/// thread per connection, and a record buffer each with room to spare.
pub const LIMITS: coffre_sys::Limits = coffre_sys::Limits {
    processes: 256,
    data_bytes: 1 << 30,
    open_files: 4096,
};

/// A command from the daemon.
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Exports { exports: Vec<ExportSpec> },
    Open { key: String },
    Close,
    Stats,
}

/// A command from the broker to the server (the daemon's, without the
/// key).
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum ServerCommand {
    Exports { exports: Vec<ExportSpec> },
    Open,
    Close,
    Stats,
}

/// What a process of the service keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `CAP_DAC_READ_SEARCH`: opens files by handle.
    Broker,
    /// `CAP_SETUID` and `CAP_SETGID`: acts as an export's user.
    Server,
}

/// Keeps what `role` needs (the broker `CAP_DAC_READ_SEARCH`, the server
/// `CAP_SETUID` and `CAP_SETGID`) and drops every other capability from
/// every set, the bounding set included; becomes `user` (uid, gid; no
/// supplementary group) with those kept, so that it owns no file of
/// root's (by `setfsuid(0)` a root process would act as the owner of
/// every root file: the seccomp filter refuses that call to it); sets
/// `no_new_privs` and a zero umask (modes are exactly what clients ask).
/// The server keeps `CAP_DAC_READ_SEARCH` in its effective and permitted
/// sets (not the bounding set) until [`shed_search`], once its Landlock
/// rules have opened the directory it is confined beneath (whose parents
/// are root's own).
pub fn drop_privileges(user: Option<(u32, u32)>, role: Role) -> io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let keep = match role {
        Role::Broker => CapabilitySet::DAC_READ_SEARCH,
        Role::Server => CapabilitySet::SETUID | CapabilitySet::SETGID,
    };
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63);
    for cap in 0..=last {
        let c = CapabilitySet::from_bits_retain(1 << cap);
        if !keep.contains(c) {
            rustix::thread::remove_capability_from_bounding_set(c)?;
        }
    }
    rustix::thread::clear_ambient_capability_set()?;
    let Some((uid, gid)) = user else {
        // As root it would need setfsuid(0), which its filter refuses.
        return Err(io::Error::other(
            "the NFS server needs its user (--uid, --gid)",
        ));
    };
    {
        if uid == 0 || gid == 0 {
            return Err(io::Error::other("the NFS server's user must not be root's"));
        }
        // The permitted set survives the change of uid; the effective set
        // is set again below.
        rustix::thread::set_keep_capabilities(true)?;
        rustix::thread::set_thread_groups(&[])?;
        rustix::thread::set_thread_res_gid(
            rustix::process::Gid::from_raw(gid),
            rustix::process::Gid::from_raw(gid),
            rustix::process::Gid::from_raw(gid),
        )?;
        rustix::thread::set_thread_res_uid(
            rustix::process::Uid::from_raw(uid),
            rustix::process::Uid::from_raw(uid),
            rustix::process::Uid::from_raw(uid),
        )?;
        rustix::thread::set_keep_capabilities(false)?;
    }
    let now = match role {
        Role::Broker => keep,
        Role::Server => keep | CapabilitySet::DAC_READ_SEARCH,
    };
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: now,
            permitted: now,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::set_no_new_privs(true)?;
    coffre_sys::forbid_dumps()?;
    rustix::process::umask(rustix::fs::Mode::empty());
    Ok(())
}

/// The server gives up `CAP_DAC_READ_SEARCH` for good (before it starts
/// a thread or reads a guest's byte): from here it opens nothing by
/// handle and searches only where the share's user may.
pub fn shed_search() -> io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let keep = CapabilitySet::SETUID | CapabilitySet::SETGID;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

fn parse_key(hex: &str) -> Option<HandleKey> {
    if hex.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let key = HandleKey::new(k);
    k.zeroize();
    Some(key)
}

/// Landlock beneath `confine` (when given), said on standard error;
/// whether it is full.
fn confine_to(who: &str, confine: Option<&Path>) -> io::Result<bool> {
    let Some(dir) = confine else {
        say!("coffre {who}: NOT confined (no directory given)");
        return Ok(false);
    };
    match coffre_sys::confine::to_files_beneath(&[dir]).map_err(io::Error::other)? {
        coffre_sys::confine::Confined::Not => {
            say!("coffre {who}: NOT confined (this kernel has no Landlock)");
            Ok(false)
        }
        c => {
            say!(
                "coffre {who}: confined beneath {} ({} by Landlock)",
                dir.display(),
                c.as_str()
            );
            Ok(c == coffre_sys::confine::Confined::Fully)
        }
    }
}

/// The seccomp filter for `profile`, said on standard error; serving
/// without it is refused (the server keeps `CAP_SETUID`, the broker
/// `CAP_DAC_READ_SEARCH`).
fn filter(
    who: &str,
    profile: coffre_sys::seccomp::Profile,
    acts: &coffre_sys::seccomp::Acts,
) -> io::Result<()> {
    let filter = coffre_sys::seccomp::refuse(profile, Some(acts));
    say!("coffre {who}: {}", coffre_sys::seccomp::said(&filter));
    filter
        .map(drop)
        .map_err(|e| io::Error::other(format!("no seccomp filter, not serving: {e}")))
}

/// Runs the service: this process becomes the broker, and forks the
/// server (which serves on `sockets`). The broker obeys the daemon on
/// standard input until it ends, passing the commands on to the server.
/// Must be called while the process runs one thread.
pub fn run(
    sockets: Sockets,
    workers: usize,
    confine: Option<&Path>,
    user: Option<(u32, u32)>,
    acts: coffre_sys::seccomp::Acts,
) -> io::Result<()> {
    let (broker_ends, server_ends): (Vec<OwnedFd>, Vec<OwnedFd>) = (0..broker::CONNECTIONS)
        .map(|_| broker::pair())
        .collect::<io::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let (cmd_r, cmd_w) = io::pipe()?;
    let (ans_r, ans_w) = io::pipe()?;
    // The service ends by killing its process group (the broker and the
    // server): it must be a group of its own (the daemon starts it in a
    // session of its own; by hand, it makes one).
    if rustix::process::getpgrp() != rustix::process::getpid() {
        rustix::process::setsid()?;
    }
    match coffre_sys::child::fork()? {
        coffre_sys::child::Forked::Child => {
            drop((broker_ends, cmd_w, ans_r));
            // Its standard input and output become the broker's pipes:
            // the daemon's (which carry the key) are closed here.
            coffre_sys::child::replace_stdio(&cmd_r, &ans_w)?;
            drop((cmd_r, ans_w));
            let r = serve_as_server(sockets, workers, confine, user, &acts, server_ends);
            if let Err(e) = &r {
                say!("coffre nfs-server: {e}");
            }
            std::process::exit(i32::from(r.is_err()));
        }
        coffre_sys::child::Forked::Parent(_server) => {
            drop((server_ends, cmd_r, ans_w, sockets));
            // A panic on any thread ends the group too (never a broker
            // left serving nothing, nor a server without its broker).
            std::panic::set_hook(Box::new(|info| {
                let _ = writeln!(io::stderr(), "coffre nfs-broker: {info}");
                coffre_sys::child::end_own_group();
            }));
            let r = serve_as_broker(confine, user, &acts, broker_ends, &cmd_w, ans_r);
            if let Err(e) = &r {
                say!("coffre nfs-broker: {e}");
            }
            // The daemon is gone, or the server: the service ends, the
            // server with it whatever it does (a server taken over would
            // not end with its standard input). The key went with the
            // keeper's drop below `serve_as_broker`.
            coffre_sys::child::end_own_group()
        }
    }
}

/// The broker: the daemon's commands (the key kept, the rest passed on
/// to the server), and the server's requests on `sock`, on a thread.
fn serve_as_broker(
    confine: Option<&Path>,
    user: Option<(u32, u32)>,
    acts: &coffre_sys::seccomp::Acts,
    socks: Vec<OwnedFd>,
    to_server: &io::PipeWriter,
    from_server: io::PipeReader,
) -> io::Result<()> {
    const WHO: &str = "nfs-broker";
    drop_privileges(user, Role::Broker)?;
    // No parent-death signal here (the change of user cleared the one
    // set at the start): the daemon's end closes standard input, and the
    // broker then ends its group, the server with it, which a SIGKILL at
    // the daemon's death would not give it the time to do.
    let broker_confined = confine_to(WHO, confine)?;
    filter(WHO, coffre_sys::seccomp::Profile::NfsBroker, acts)?;
    let state: Arc<broker::State> = Arc::new(std::sync::RwLock::new(None));
    for sock in socks {
        let state = Arc::clone(&state);
        std::thread::Builder::new()
            .name("nfs-broker".into())
            .spawn(move || {
                // The server is gone (or spoke out of turn, or this
                // thread panicked): so is the service, both processes;
                // the daemon starts them again.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    broker::serve(&sock, &state)
                }));
                match r {
                    Ok(Ok(())) => say!("coffre nfs-broker: the server hung up"),
                    Ok(Err(e)) => say!("coffre nfs-broker: {e}"),
                    Err(_) => say!("coffre nfs-broker: its thread panicked"),
                }
                coffre_sys::child::end_own_group();
            })?;
    }
    let r = relay(&state, broker_confined, to_server, from_server);
    // The key goes before the process does.
    *state.write().unwrap_or_else(|p| p.into_inner()) = None;
    coffre_luks2::secret::scrub_stack();
    r
}

/// The daemon's commands on standard input, until it ends: the key kept
/// (in `state`), the rest passed on to the server and its answers back.
fn relay(
    state: &broker::State,
    broker_confined: bool,
    to_server: &io::PipeWriter,
    from_server: io::PipeReader,
) -> io::Result<()> {
    let mut specs: Vec<ExportSpec> = Vec::new();
    let mut answers = io::BufReader::new(from_server);
    let mut to_server = to_server;
    // Standard input read by hand, not through std's buffered Stdin: its
    // buffer would keep the key's line after the close.
    let mut stdin =
        std::fs::File::from(std::os::fd::AsFd::as_fd(&io::stdin()).try_clone_to_owned()?);
    let mut out = io::stdout().lock();
    let mut pending = zeroize::Zeroizing::new(Vec::<u8>::new());
    let mut ask = |cmd: &Value| -> io::Result<Value> {
        writeln!(to_server, "{cmd}")?;
        let mut line = String::new();
        // One line of at most 1 MiB (the server may lie, not flood).
        if io::Read::take(&mut answers, 1 << 20).read_line(&mut line)? == 0 || !line.ends_with('\n')
        {
            return Err(io::Error::other("the server is gone"));
        }
        serde_json::from_str(&line).map_err(io::Error::other)
    };
    let failed_of = |v: &Value| -> Vec<(String, String)> {
        serde_json::from_value(v["failed"].clone()).unwrap_or_default()
    };
    loop {
        let Some(line) = coffre_sys::lines::next_secret_line(&mut stdin, &mut pending, 1 << 20)?
        else {
            return Ok(());
        };
        let answer = match serde_json::from_slice::<Command>(&line) {
            Err(e) => json!({"ok": false, "error": format!("bad command: {e}")}),
            Ok(Command::Exports { exports }) => {
                // The broker's roots first: the server asks for them.
                let mut failed = match state.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    Some(k) => broker::Handles::exports(k, &exports),
                    None => Vec::new(),
                };
                specs = exports.clone();
                let v = ask(&json!({"cmd": "exports", "exports": exports}))?;
                merge(&mut failed, failed_of(&v));
                json!({"ok": true, "failed": failed})
            }
            Ok(Command::Open { mut key }) => {
                let opened = keep(state, &mut key, &specs);
                // What HMAC and the moves left of the key below this
                // frame (all of it: `keep` holds every copy).
                coffre_luks2::secret::scrub_stack();
                match opened {
                    Some(mut failed) => {
                        let v = ask(&json!({"cmd": "open"}))?;
                        merge(&mut failed, failed_of(&v));
                        json!({"ok": true, "failed": failed})
                    }
                    None => json!({"ok": false, "error": "the key must be 64 hex digits"}),
                }
            }
            Ok(Command::Close) => {
                // The server first: once it answers, no call touches the
                // data; then the key and the roots go.
                let v = ask(&json!({"cmd": "close"}))?;
                *state.write().unwrap_or_else(|p| p.into_inner()) = None;
                coffre_luks2::secret::scrub_stack();
                v
            }
            Ok(Command::Stats) => {
                // Confined and filtered: both processes.
                let mut v = ask(&json!({"cmd": "stats"}))?;
                let Some(o) = v.as_object_mut() else {
                    return Err(io::Error::other("the server's stats are not an object"));
                };
                let c = o.get("confined").and_then(Value::as_bool) == Some(true) && broker_confined;
                o.insert("confined".into(), json!(c));
                v
            }
        };
        drop(line);
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
}

/// The vault opened: the keeper made from the key's hex digits (wiped),
/// in `state`; what could not be opened. Never inlined, so that every
/// copy of the key that moves make stays in frames below the caller,
/// which scrubs them.
#[inline(never)]
fn keep(
    state: &broker::State,
    hex: &mut String,
    specs: &[ExportSpec],
) -> Option<Vec<(String, String)>> {
    let k = parse_key(hex);
    hex.zeroize();
    let (keeper, failed) = Keeper::open(k?, specs);
    *state.write().unwrap_or_else(|p| p.into_inner()) = Some(keeper);
    Some(failed)
}

/// The server: serves on `sockets`, asks the broker on `sock`, obeys the
/// broker's commands on standard input until it ends.
fn serve_as_server(
    sockets: Sockets,
    workers: usize,
    confine: Option<&Path>,
    user: Option<(u32, u32)>,
    acts: &coffre_sys::seccomp::Acts,
    socks: Vec<OwnedFd>,
) -> io::Result<()> {
    const WHO: &str = "nfs-server";
    drop_privileges(user, Role::Server)?;
    // Groups fixed for its life (a server per VM acts as one user): set
    // now, on its only thread (the others inherit them); its filter then
    // refuses any change.
    if let Some(g) = &acts.groups {
        let mut g: Vec<rustix::process::Gid> = g
            .iter()
            .map(|&id| rustix::process::Gid::from_raw(id))
            .collect();
        g.sort_unstable_by_key(|g| g.as_raw());
        g.dedup();
        rustix::thread::set_thread_groups(&g)?;
    }
    // What it reads outside the data, read before the confinement.
    crate::fs::prime();
    let confined = confine_to(WHO, confine)?;
    shed_search()?;
    // After the last change of its credentials on this thread (which
    // would clear it): gone with the broker. A server taken over could
    // clear it (a setfsuid on this thread); the daemon's kill of the
    // process group, which it cannot leave, and the broker's own end
    // (`end_own_group`) do not depend on it.
    coffre_sys::child::die_with_parent()?;
    filter(WHO, coffre_sys::seccomp::Profile::Nfs, acts)?;
    let filtered = true;
    let handles: Arc<Client> = Arc::new(Client::new(socks));
    let server = Arc::new(Server::new());
    {
        let s = Arc::clone(&server);
        std::thread::Builder::new()
            .name("nfs-accept".into())
            .spawn(move || {
                if let Err(e) = s.serve(sockets, workers) {
                    say!("coffre nfs-server: {e}");
                    std::process::exit(1);
                }
            })?;
    }
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let answer = match serde_json::from_str::<ServerCommand>(&line) {
            Err(e) => json!({"ok": false, "error": format!("bad command: {e}")}),
            Ok(ServerCommand::Exports { exports }) => {
                json!({"ok": true, "failed": server.set_exports(exports)})
            }
            Ok(ServerCommand::Open) => {
                let h: Arc<dyn broker::Handles> = handles.clone();
                json!({"ok": true, "failed": server.open(h)})
            }
            Ok(ServerCommand::Close) => {
                server.close();
                json!({"ok": true})
            }
            Ok(ServerCommand::Stats) => {
                let s = &server.stats;
                json!({
                    "ok": true,
                    "open": server.is_open(),
                    "confined": confined,
                    "filtered": filtered,
                    "calls": s.calls.load(Ordering::Relaxed),
                    "jukebox": s.jukebox.load(Ordering::Relaxed),
                    "replayed": s.replayed.load(Ordering::Relaxed),
                    "refused": s.refused.load(Ordering::Relaxed),
                })
            }
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_64_hex_digits() {
        assert!(parse_key(&"ab".repeat(32)).is_some());
        assert!(parse_key(&"ab".repeat(31)).is_none());
        assert!(parse_key(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn commands_parse_and_unknown_ones_do_not() {
        let c: Command = serde_json::from_str(r#"{"cmd":"close"}"#).unwrap();
        assert!(matches!(c, Command::Close));
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"format"}"#).is_err());
    }
}

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
//! It parses bytes from guests, so it keeps only what it needs: the
//! daemon's choice of user (`nobody`), not root, with
//! `CAP_DAC_READ_SEARCH` (to open handles), `CAP_SETUID` and `CAP_SETGID`
//! (to act as an export's user on a thread), nothing else in any set or
//! the bounding set, `no_new_privs`, not dumpable; and,
//! given a directory (`DIR/run/nfs`, where the daemon mounts the data for
//! it and nothing else), confined beneath it by Landlock before it starts
//! a thread: taken over, it cannot open the vault's keys or anything else
//! on the host, whatever `CAP_DAC_READ_SEARCH` allows, and files reached
//! by handle are checked by their path just the same. A seccomp filter
//! then refuses it the system calls that lead out of its sandbox or into
//! the kernel's widest surfaces (`coffre_sys::seccomp`).

use crate::fs::ExportSpec;
use crate::handle::HandleKey;
use crate::server::{Server, Sockets};
use serde::Deserialize;
use serde_json::json;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use zeroize::Zeroize;

/// A command from the daemon.
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Exports { exports: Vec<ExportSpec> },
    Open { key: String },
    Close,
    Stats,
}

/// Keeps `CAP_DAC_READ_SEARCH`, `CAP_SETUID` and `CAP_SETGID` and drops
/// every other capability from every set, the bounding set included;
/// becomes `user` (uid, gid; no supplementary group) with those three
/// kept, so that it owns no file of root's (by `setfsuid(0)` a root
/// process would act as the owner of every root file: the seccomp filter
/// refuses that call to it); sets `no_new_privs` and a zero umask (modes
/// are exactly what clients ask).
pub fn drop_privileges(user: Option<(u32, u32)>) -> io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let keep = CapabilitySet::DAC_READ_SEARCH | CapabilitySet::SETUID | CapabilitySet::SETGID;
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
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::set_no_new_privs(true)?;
    coffre_sys::forbid_dumps()?;
    rustix::process::umask(rustix::fs::Mode::empty());
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

/// Runs the server's process: drops privileges, confines itself beneath
/// `confine` (when given), serves on `sockets`, obeys the daemon on
/// standard input until it ends.
pub fn run(
    sockets: Sockets,
    workers: usize,
    confine: Option<&Path>,
    user: Option<(u32, u32)>,
    acts: coffre_sys::seccomp::Acts,
) -> io::Result<()> {
    drop_privileges(user)?;
    // What it reads outside the data, read before the confinement.
    crate::fs::prime();
    let confined = match confine {
        None => {
            eprintln!("coffre nfs-server: NOT confined (no directory given)");
            false
        }
        Some(dir) => {
            match coffre_sys::confine::to_files_beneath(&[dir]).map_err(io::Error::other)? {
                coffre_sys::confine::Confined::Not => {
                    eprintln!("coffre nfs-server: NOT confined (this kernel has no Landlock)");
                    false
                }
                c => {
                    eprintln!(
                        "coffre nfs-server: confined beneath {} ({} by Landlock)",
                        dir.display(),
                        c.as_str()
                    );
                    c == coffre_sys::confine::Confined::Fully
                }
            }
        }
    };
    let filter = coffre_sys::seccomp::refuse(coffre_sys::seccomp::Profile::Nfs, Some(&acts));
    eprintln!("coffre nfs-server: {}", coffre_sys::seccomp::said(&filter));
    // It keeps CAP_SETUID: without its filter it does not serve.
    filter.map_err(|e| io::Error::other(format!("no seccomp filter, not serving: {e}")))?;
    let filtered = true;
    let server = Arc::new(Server::new());
    {
        let s = Arc::clone(&server);
        std::thread::Builder::new()
            .name("nfs-accept".into())
            .spawn(move || {
                if let Err(e) = s.serve(sockets, workers) {
                    eprintln!("coffre nfs-server: {e}");
                    std::process::exit(1);
                }
            })?;
    }
    // Standard input read by hand, not through std's buffered Stdin: its
    // buffer would keep the key's line after the close.
    let mut stdin =
        std::fs::File::from(std::os::fd::AsFd::as_fd(&io::stdin()).try_clone_to_owned()?);
    let mut out = io::stdout().lock();
    let mut pending = zeroize::Zeroizing::new(Vec::<u8>::new());
    loop {
        let Some(line) = coffre_sys::lines::next_secret_line(&mut stdin, &mut pending, 1 << 20)?
        else {
            return Ok(());
        };
        let answer = match serde_json::from_slice::<Command>(&line) {
            Err(e) => json!({"ok": false, "error": format!("bad command: {e}")}),
            Ok(Command::Exports { exports }) => {
                json!({"ok": true, "failed": server.set_exports(exports)})
            }
            Ok(Command::Open { mut key }) => {
                let k = parse_key(&key);
                key.zeroize();
                let answer = match k {
                    Some(k) => json!({"ok": true, "failed": server.open(k)}),
                    None => json!({"ok": false, "error": "the key must be 64 hex digits"}),
                };
                // What HMAC and the moves left of the key on this stack.
                coffre_luks2::secret::scrub_stack();
                answer
            }
            Ok(Command::Close) => {
                server.close();
                json!({"ok": true})
            }
            Ok(Command::Stats) => {
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
        drop(line);
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
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

//! The server's process: what the daemon starts (`coffre ldap-server`)
//! with the two listening sockets it bound (plain, port 389; LDAPS, port
//! 636), and drives over standard input, one JSON command per line, one
//! JSON answer per line on standard output:
//!
//! - `{"cmd":"tls","chain_pem":"...","key_pem":"..."}` → `{"ok":true}`
//!   (new connections use it)
//! - `{"cmd":"directory","spec":{DirectorySpec}}` → `{"ok":true,"failed":[[name, why]...]}`
//! - `{"cmd":"live","live":{"locked":bool,"present":[names]}}` → `{"ok":true}`
//! - `{"cmd":"events"}` → `{"ok":true,"events":[...],"dropped":N,"stats":{...}}`
//!   (the bind events since the last such command)
//!
//! A command that fails answers `{"ok":false,"error":"..."}`. The end of
//! standard input (the daemon gone) ends the process.

use crate::server::Server;
use crate::spec::{DirectorySpec, Live};
use serde::Deserialize;
use serde_json::json;
use std::io::{self, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use zeroize::{Zeroize, Zeroizing};

/// A command from the daemon.
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Tls { chain_pem: String, key_pem: String },
    Directory { spec: DirectorySpec },
    Live { live: Live },
    Events,
}

/// What `coffre ldap-server` may use: a thread per connection (at most
/// [`crate::server::MAX_CONNECTIONS`]) and its request buffer, with room
/// to spare.
pub const LIMITS: coffre_sys::Limits = coffre_sys::Limits {
    processes: 320,
    data_bytes: 1 << 30,
    open_files: 1024,
};

/// Runs the server's process on `sockets` (plain, then LDAPS), obeying
/// the daemon on standard input until it ends. The caller has already
/// dropped to its unprivileged user.
pub fn run(sockets: [TcpListener; 2]) -> io::Result<()> {
    let server = Arc::new(Server::new()?);
    {
        let s = Arc::clone(&server);
        let [plain, ldaps] = sockets;
        std::thread::Builder::new()
            .name("ldap-accept".into())
            .spawn(move || {
                if let Err(e) = s.serve(plain, ldaps) {
                    eprintln!("coffre ldap-server: {e}");
                    std::process::exit(1);
                }
            })?;
    }
    // Standard input read by hand, not through std's buffered Stdin: its
    // buffer would keep the TLS key's line.
    let mut stdin =
        std::fs::File::from(std::os::fd::AsFd::as_fd(&io::stdin()).try_clone_to_owned()?);
    let mut out = io::stdout().lock();
    let mut pending = Zeroizing::new(Vec::<u8>::new());
    loop {
        let Some(line) = coffre_sys::lines::next_secret_line(&mut stdin, &mut pending, 16 << 20)?
        else {
            return Ok(());
        };
        let answer = obey(&server, &line);
        drop(line);
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
}

/// The answer to one command line.
pub fn obey(server: &Server, line: &[u8]) -> serde_json::Value {
    match serde_json::from_slice::<Command>(line) {
        Err(e) => {
            // serde's message may quote the line: not the key's.
            let what = if e.is_syntax() || e.is_eof() {
                "not JSON".to_string()
            } else {
                format!("line {} column {}", e.line(), e.column())
            };
            json!({"ok": false, "error": format!("bad command ({what}): expected tls, directory, live or events")})
        }
        Ok(Command::Tls {
            chain_pem,
            mut key_pem,
        }) => {
            let r = server.set_tls(&chain_pem, &key_pem);
            key_pem.zeroize();
            match r {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Ok(Command::Directory { spec }) => match server.set_directory(spec) {
            Ok(failed) => json!({"ok": true, "failed": failed}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Ok(Command::Live { live }) => {
            server.set_live(live);
            json!({"ok": true})
        }
        Ok(Command::Events) => {
            let (events, dropped) = server.drain_events();
            let s = &server.stats;
            json!({
                "ok": true,
                "events": events,
                "dropped": dropped,
                "stats": {
                    "connections": s.connections.load(Ordering::Relaxed),
                    "refused_addresses": s.refused_addresses.load(Ordering::Relaxed),
                    "searches": s.searches.load(Ordering::Relaxed),
                    "binds": s.binds.load(Ordering::Relaxed),
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_obeyed_and_bad_ones_say_so() {
        let s = Server::new().unwrap();
        let a = obey(
            &s,
            br#"{"cmd":"live","live":{"locked":false,"present":["alice"]}}"#,
        );
        assert_eq!(a["ok"], true);
        let a = obey(
            &s,
            br#"{"cmd":"directory","spec":{"base":"dc=t","users":[{"name":"-bad","uid":1,"gid":1,"home":"/","shell":"/bin/sh"}],"groups":[],"clients":[]}}"#,
        );
        assert_eq!(a["ok"], true);
        assert_eq!(a["failed"][0][0], "-bad");
        let a = obey(
            &s,
            br#"{"cmd":"directory","spec":{"base":"","users":[],"groups":[],"clients":[]}}"#,
        );
        assert_eq!(a["ok"], false);
        let a = obey(
            &s,
            br#"{"cmd":"tls","chain_pem":"","key_pem":"-----BEGIN PRIVATE KEY-----\nsecret"}"#,
        );
        assert_eq!(a["ok"], false);
        assert!(!a.to_string().contains("secret"));
        let a = obey(&s, br#"{"cmd":"format"}"#);
        assert_eq!(a["ok"], false);
        let a = obey(&s, br#"{"cmd":"events"}"#);
        assert_eq!(a["events"], json!([]));
        assert_eq!(a["stats"]["binds"], 0);
    }
}

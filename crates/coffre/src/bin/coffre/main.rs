//! `coffre`: a team strongroom for sensitive data.

mod bench;
mod cli;
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
        C::Init(a) => vault::init(a),
        C::Serve { dir, listen } => vault::serve(dir, listen),
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
        C::Audit(a) => vault::audit(a),
        C::Gateway(g) => vault::gateway(g),
        C::Volume(v) => volume::run(v),
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

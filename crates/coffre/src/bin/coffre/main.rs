//! `coffre`: a team strongroom for sensitive data.

mod bench;
mod cli;
mod secrets;
mod volume;

use clap::Parser;
use std::process::ExitCode;

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
    let result = match cli.command {
        cli::Command::Volume(v) => volume::run(v),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("coffre: error: {e:#}");
            ExitCode::from(coffre::exit::code_for(&e))
        }
    }
}

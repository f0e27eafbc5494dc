//! The vault commands: `init`, `serve`, and the client commands that talk
//! to the daemon over mutual TLS. One file per concern: `client` (the
//! connection and the audit-head check), `host`, `session`, `admin`,
//! `audit`, `status`; the output helpers they share are here.

mod admin;
mod audit;
mod bus;
mod client;
mod host;
mod session;
mod status;

pub use admin::{
    approve, gateway, join, lock, member, mode, passwd, proposal, quorum, renew, unlock,
};
pub use audit::audit;
pub use bus::bus;
pub use host::{init, serve, storage};
pub use session::{enter, enter_detached, leave, task};
pub use status::{network, status, workload};

use anyhow::Result;
use serde_json::Value;

fn fail(code: u8, msg: &str) -> u8 {
    // What the daemon says may carry what an outsider said.
    eprintln!("coffre: {}", coffre_sys::shown::told_lines(msg));
    code
}

/// Prints an otpauth URI as a QR code an authenticator app can scan.
fn print_qr(uri: &str) {
    if let Ok(code) = qrcode::QrCode::new(uri.as_bytes()) {
        let w = code.width();
        let dark = |x: usize, y: usize| x < w && y < w && code[(x, y)] == qrcode::Color::Dark;
        // Two modules per character cell, with a quiet zone of 2.
        for y in (0..w + 4).step_by(2) {
            let mut line = String::new();
            for x in 0..w + 4 {
                let top = x >= 2 && y >= 2 && dark(x - 2, y - 2);
                let bottom = x >= 2 && y + 1 >= 2 && dark(x - 2, y - 1);
                line.push(match (top, bottom) {
                    (true, true) => ' ',
                    (true, false) => '\u{2584}',
                    (false, true) => '\u{2580}',
                    (false, false) => '\u{2588}',
                });
            }
            println!("  {line}");
        }
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn iso(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

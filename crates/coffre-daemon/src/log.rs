//! The daemon's own log, on stderr: each audit record as it is written
//! (action, result, actor and detail: what the audit log says, nothing
//! more) and the daemon's operational messages. The level comes from
//! `[log] level` in config.toml, or `COFFRE_LOG` (an `EnvFilter`:
//! `debug`, `warn,coffre_daemon=debug`...), which wins.
//!
//! Under systemd, stderr is the journal's stream (`JOURNAL_STREAM` names
//! it): lines then carry the `<N>` priority prefix journald reads
//! (sd-daemon(3)), and no time (the journal has its own). Elsewhere: an
//! RFC 3339 time and the level in words.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::registry::LookupSpan;

/// Installs the log for this process (once; later calls do nothing).
/// `level` is the config's; `COFFRE_LOG` overrides it. A level that does
/// not parse falls back to `info`, and says so.
pub fn init(level: &str) {
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("COFFRE_LOG").ok();
    let spec = from_env.as_deref().unwrap_or(level);
    let (filter, bad) = match EnvFilter::try_new(spec) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(format!("{spec:?}: {e}"))),
    };
    let journal = under_journal();
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Lines { journal })
        .try_init()
        .is_ok();
    if let (true, Some(bad)) = (installed, bad) {
        tracing::warn!("the log level {bad}; using info");
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is the
/// `device:inode` of the socket systemd connected it to.
fn under_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The priority journald reads from a `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

struct Lines {
    journal: bool,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        if self.journal {
            write!(w, "<{}>", priority(level))?;
        } else {
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut w)?;
            write!(w, " {level:>5} ")?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`...): a log
/// line stays one line whatever a field holds.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// The level an audit record is logged at: refusals and what did not go
/// as asked are warnings, failures errors, the rest information.
pub fn level_of(result: &str) -> Level {
    let head = result.split(':').next().unwrap_or(result);
    match head {
        "failed" | "error" | "tampered" | "down" | "deadline" => Level::ERROR,
        "refused" | "killed" | "denied" | "lost" | "stale" | "abandoned" => Level::WARN,
        _ => Level::INFO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_to_levels() {
        assert_eq!(level_of("ok"), Level::INFO);
        assert_eq!(level_of("refused:wrong_password"), Level::WARN);
        assert_eq!(level_of("refused"), Level::WARN);
        assert_eq!(level_of("failed"), Level::ERROR);
        assert_eq!(level_of("opening"), Level::INFO);
        assert_eq!(priority(Level::WARN), 4);
    }

    #[test]
    fn a_field_cannot_start_a_line_of_its_own() {
        assert_eq!(one_line("alice"), "alice");
        let forged = one_line("x\n<0>action=state result=open\r\u{1b}[2J");
        assert!(!forged.contains('\n') && !forged.contains('\r') && !forged.contains('\u{1b}'));
        assert_eq!(forged, "x\\n<0>action=state result=open\\r\\u{1b}[2J");
    }
}

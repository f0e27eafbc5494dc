//! The Prometheus endpoint (`[metrics] listen`): plain HTTP on a loopback
//! address or a unix socket, `GET /metrics` in the text exposition format.
//! What it shows: the state, who is inside (counts; member names only with
//! `member_names = true`), sessions by door, tasks, workloads by state,
//! open and close durations, keyslot check durations, every audit record
//! by action and result (refusals by reason among them), the audit log's
//! health, and the data's I/O. Never a secret: no password, no TOTP, no
//! key, no path, no address.

use super::*;
use crate::vaultdir::MetricsAddr;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

/// Upper bounds of the open and close duration buckets, seconds.
const PHASE_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the keyslot check buckets, seconds (a KDF costs from
/// tens of milliseconds to seconds).
const KDF_BOUNDS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

/// A histogram: counts per bucket (not cumulative), their sum.
#[derive(Clone, Debug)]
pub(super) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub(super) fn observe(&mut self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += seconds;
    }
}

/// What the shell counts for the endpoint, as it goes.
pub(super) struct Metrics {
    /// Audit records written or waiting, by (action, result).
    records: BTreeMap<(String, String), u64>,
    opening_since: Option<Instant>,
    closing_since: Option<Instant>,
    opens: Histogram,
    closes: Histogram,
    /// Keyslot checks, timed on the KDF pool's threads.
    pub(super) key_checks: Arc<Mutex<Histogram>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            records: BTreeMap::new(),
            opening_since: None,
            closing_since: None,
            opens: Histogram::new(&PHASE_BOUNDS),
            closes: Histogram::new(&PHASE_BOUNDS),
            key_checks: Arc::new(Mutex::new(Histogram::new(&KDF_BOUNDS))),
        }
    }
}

impl Metrics {
    /// Counts an audit record, and times the state's phases from them.
    pub(super) fn on_record(&mut self, rec: &AuditRecord) {
        *self
            .records
            .entry((rec.action.clone(), rec.result.clone()))
            .or_default() += 1;
        if rec.action != "state" {
            return;
        }
        let now = Instant::now();
        match rec.result.as_str() {
            "opening" => self.opening_since = Some(now),
            "open" => {
                if let Some(t) = self.opening_since.take() {
                    self.opens.observe((now - t).as_secs_f64());
                }
            }
            "failed" => self.opening_since = None,
            "closing" => self.closing_since = Some(now),
            // A close for a lock ends in "locked".
            "closed" | "locked" => {
                if let Some(t) = self.closing_since.take() {
                    self.closes.observe((now - t).as_secs_f64());
                }
            }
            _ => {}
        }
    }
}

/// A label value in the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        cumulative: &[u64],
        sum: f64,
    ) {
        for (i, c) in cumulative.iter().enumerate() {
            let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, *c as f64);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(
            &format!("{name}_count"),
            labels,
            cumulative.last().copied().unwrap_or(0) as f64,
        );
    }
    fn own_histogram(&mut self, name: &str, h: &Histogram) {
        let mut total = 0;
        let cumulative: Vec<u64> = h
            .counts
            .iter()
            .map(|c| {
                total += c;
                total
            })
            .collect();
        self.histogram(name, &[], h.bounds, &cumulative, h.sum);
    }
}

/// Every state the core can be in, so each has its sample (0 or 1).
const STATES: [&str; 5] = ["closed", "opening", "open", "closing", "locked"];

impl Shell {
    /// The exposition text, now.
    pub(super) fn metrics_text(&self) -> String {
        let s = self.vault.status();
        let mut t = Text(String::with_capacity(8192));
        let names = self.config.metrics.as_ref().is_some_and(|m| m.member_names);

        t.family("coffre_up", "gauge", "1 while the daemon answers.");
        t.sample("coffre_up", &[], 1.0);

        let state = s.state.as_str();
        t.family(
            "coffre_state",
            "gauge",
            "The vault's state: 1 for the current one.",
        );
        for st in STATES {
            t.sample(
                "coffre_state",
                &[("state", st)],
                f64::from(u8::from(state == st)),
            );
        }
        t.family(
            "coffre_key_held",
            "gauge",
            "1 while the daemon holds the volume key (the vault is open, or opening).",
        );
        t.sample("coffre_key_held", &[], f64::from(u8::from(self.key_held())));

        t.family("coffre_members", "gauge", "Members of the vault.");
        t.sample("coffre_members", &[], s.members as f64);
        let inside: BTreeSet<&str> = s.sessions.iter().map(|x| x.member.as_str()).collect();
        t.family(
            "coffre_members_inside",
            "gauge",
            "Members with at least one session.",
        );
        t.sample("coffre_members_inside", &[], inside.len() as f64);
        let mut doors: BTreeMap<String, u64> = BTreeMap::new();
        for x in &s.sessions {
            let door = serde_json::to_value(x.source.door)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "other".into());
            *doors.entry(door).or_default() += 1;
        }
        t.family("coffre_sessions", "gauge", "Open sessions, by door.");
        for door in ["cli", "vpn"] {
            doors.entry(door.into()).or_default();
        }
        for (door, n) in &doors {
            t.sample("coffre_sessions", &[("door", door)], *n as f64);
        }
        if names {
            t.family(
                "coffre_member_inside",
                "gauge",
                "1 for each member inside ([metrics] member_names = true).",
            );
            for m in &inside {
                t.sample("coffre_member_inside", &[("member", m)], 1.0);
            }
        }
        t.family(
            "coffre_tasks",
            "gauge",
            "Scheduled tasks keeping the vault open.",
        );
        t.sample("coffre_tasks", &[], s.tasks.len() as f64);

        let rows = self.workloads_json();
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        for w in rows.as_array().into_iter().flatten() {
            let st = w["state"].as_str().unwrap_or("unknown").to_owned();
            *by_state.entry(st).or_default() += 1;
        }
        t.family("coffre_workloads", "gauge", "Workloads, by state.");
        for (st, n) in &by_state {
            t.sample("coffre_workloads", &[("state", st)], *n as f64);
        }

        t.family(
            "coffre_open_duration_seconds",
            "histogram",
            "From the first member's entry to the data mounted and the workloads resumed.",
        );
        t.own_histogram("coffre_open_duration_seconds", &self.metrics.opens);
        t.family(
            "coffre_close_duration_seconds",
            "histogram",
            "From the close's start to the data unmounted and the key wiped.",
        );
        t.own_histogram("coffre_close_duration_seconds", &self.metrics.closes);
        t.family(
            "coffre_keyslot_check_duration_seconds",
            "histogram",
            "One password checked against its keyslot (the KDF).",
        );
        let kdf = self
            .metrics
            .key_checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        t.own_histogram("coffre_keyslot_check_duration_seconds", &kdf);

        t.family(
            "coffre_audit_records_total",
            "counter",
            "Audit records since the daemon started, by action and result.",
        );
        for ((action, result), n) in &self.metrics.records {
            t.sample(
                "coffre_audit_records_total",
                &[("action", action), ("result", result)],
                *n as f64,
            );
        }
        t.family(
            "coffre_refused_total",
            "counter",
            "Refused attempts since the daemon started, by action and reason (throttled among them).",
        );
        for ((action, result), n) in &self.metrics.records {
            if let Some(reason) = result.strip_prefix("refused") {
                let reason = reason.trim_start_matches(':');
                let reason = if reason.is_empty() { "refused" } else { reason };
                t.sample(
                    "coffre_refused_total",
                    &[("action", action), ("reason", reason)],
                    *n as f64,
                );
            }
        }
        t.family(
            "coffre_audit_writable",
            "gauge",
            "1 while the audit log can be written.",
        );
        t.sample(
            "coffre_audit_writable",
            &[],
            f64::from(u8::from(self.audit.error.is_none())),
        );
        t.family(
            "coffre_audit_backlog",
            "gauge",
            "Audit records waiting for the log.",
        );
        t.sample("coffre_audit_backlog", &[], self.audit.backlog.len() as f64);

        let io = &coffre_data::iostats::DATA_IO;
        let bounds: Vec<f64> = coffre_data::iostats::LATENCY_BOUNDS_US
            .iter()
            .map(|us| *us as f64 / 1e6)
            .collect();
        t.family(
            "coffre_data_bytes_total",
            "counter",
            "Bytes of the data's volume served to its filesystem, by operation.",
        );
        for (op, d) in [("read", &io.read), ("write", &io.write)] {
            t.sample(
                "coffre_data_bytes_total",
                &[("op", op)],
                d.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
        }
        t.family(
            "coffre_data_errors_total",
            "counter",
            "Failed requests to the data's volume, by operation.",
        );
        for (op, d) in [("read", &io.read), ("write", &io.write)] {
            t.sample(
                "coffre_data_errors_total",
                &[("op", op)],
                d.errors.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
        }
        t.family(
            "coffre_data_request_duration_seconds",
            "histogram",
            "Requests to the data's volume (cipher and storage), by operation.",
        );
        for (op, d) in [("read", &io.read), ("write", &io.write)] {
            let (cumulative, sum) = d.latency.snapshot();
            t.histogram(
                "coffre_data_request_duration_seconds",
                &[("op", op)],
                &bounds,
                &cumulative,
                sum,
            );
        }
        t.0
    }
}

/// Connections served at once; more wait for a free place (the
/// kernel's backlog holds them).
const CONNECTIONS: usize = 8;

/// Serves the endpoint until the daemon stops: each scrape asks the shell
/// for the text through `tx`.
pub(super) async fn serve(
    addr: MetricsAddr,
    tx: mpsc::UnboundedSender<Msg>,
) -> std::io::Result<()> {
    let places = Arc::new(Semaphore::new(CONNECTIONS));
    match addr {
        MetricsAddr::Tcp(a) => {
            let l = tokio::net::TcpListener::bind(a).await?;
            tokio::spawn(async move {
                loop {
                    let Ok(place) = places.clone().acquire_owned().await else {
                        return;
                    };
                    match l.accept().await {
                        Ok((s, _)) => connection(TokioIo::new(s), tx.clone(), place),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
        }
        MetricsAddr::Unix(p) => {
            let l = bind_unix(&p)?;
            tokio::spawn(async move {
                loop {
                    let Ok(place) = places.clone().acquire_owned().await else {
                        return;
                    };
                    match l.accept().await {
                        Ok((s, _)) => connection(TokioIo::new(s), tx.clone(), place),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
        }
    }
    Ok(())
}

/// The unix socket at `p`, root's alone (0600). Its directory must be
/// root's and writable by nobody else (made 0700 if missing): in a
/// directory others can write, the path could be swapped for a link
/// between the bind and the chmod. Only an old socket is removed first.
fn bind_unix(p: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let parent = p
        .parent()
        .ok_or_else(|| refuse(format!("{}: no directory", p.display())))?;
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let m = std::fs::metadata(parent)?;
    if m.uid() != 0 || m.permissions().mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "{} must be root's and writable by nobody else",
            parent.display()
        )));
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p)?,
        Ok(_) => {
            return Err(refuse(format!(
                "{} exists and is not a socket: not replaced",
                p.display()
            )));
        }
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(p)?;
    // Root's alone, like the vault directory; a monitoring agent reads it
    // as root (or the admin grants a group on purpose).
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves one connection for at most 30 s, holding its `place`.
fn connection<S>(
    io: TokioIo<S>,
    tx: mpsc::UnboundedSender<Msg>,
    place: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _place = place;
        let svc = service_fn(move |req: hyper::Request<Incoming>| {
            let tx = tx.clone();
            async move {
                let respond = |status: u16, ctype: &str, body: String| {
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                };
                if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
                    return respond(404, "text/plain", "GET /metrics\n".into());
                }
                let (reply, rx) = oneshot::channel();
                if tx.send(Msg::Metrics(reply)).is_err() {
                    return respond(503, "text/plain", "the daemon is stopping\n".into());
                }
                match rx.await {
                    Ok(text) => respond(200, "text/plain; version=0.0.4; charset=utf-8", text),
                    Err(_) => respond(503, "text/plain", "the daemon is stopping\n".into()),
                }
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(io, svc);
        let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket's directory is made 0700 when missing; one others can
    /// write is refused; a file that is not a socket is never replaced.
    #[tokio::test]
    async fn the_unix_socket_is_bound_only_where_nobody_else_writes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("run/metrics.sock");
        let l = bind_unix(&p).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        assert_eq!(mode(&p), 0o600);
        drop(l);
        // An old socket is replaced.
        bind_unix(&p).unwrap();
        // A regular file is not.
        let f = t.path().join("run/not-a-socket");
        std::fs::write(&f, "keep me").unwrap();
        assert!(
            bind_unix(&f)
                .unwrap_err()
                .to_string()
                .contains("not a socket")
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep me");
        // A directory others can write (as /tmp) is refused.
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_unix(&open.join("m.sock")).unwrap_err().to_string();
        assert!(e.contains("writable by nobody else"), "{e}");
    }

    #[test]
    fn histograms_and_labels_are_written_as_the_format_says() {
        let mut h = Histogram::new(&PHASE_BOUNDS);
        h.observe(0.003);
        h.observe(0.2);
        let mut t = Text(String::new());
        t.own_histogram("x_seconds", &h);
        assert!(
            t.0.contains("x_seconds_bucket{le=\"0.005\"} 1\n"),
            "{}",
            t.0
        );
        assert!(t.0.contains("x_seconds_bucket{le=\"0.25\"} 2\n"), "{}", t.0);
        assert!(t.0.contains("x_seconds_bucket{le=\"+Inf\"} 2\n"), "{}", t.0);
        assert!(t.0.contains("x_seconds_count 2\n"), "{}", t.0);
        let mut t = Text(String::new());
        t.sample("y", &[("a", "q\"uo\\te\nnl")], 1.0);
        assert_eq!(t.0, "y{a=\"q\\\"uo\\\\te\\nnl\"} 1\n");
    }
}

//! A real vault: `coffre init` in a temporary directory, the real daemon
//! binary on a loopback port, the real CLI over mutual TLS.

use coffre_testkit::kdf;
use coffre_testkit::process::free_port;
pub use coffre_testkit::process::{
    code, memory_contains, memory_hits, ok, unix_secs, unsafe_kill, wait_child, wait_exit,
};
pub use coffre_testkit::{Need, require};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_coffre");

/// What every vault needs: its data is an ext4 filesystem on a loop
/// device on a FUSE file, made at init and mounted at each open.
pub const NEEDS: &[Need] = &[Need::Root, Need::Fuse, Need::Loop, Need::Ext4];

pub struct Member {
    pub name: String,
    pub identity: PathBuf,
    pub password: PathBuf,
    pub secret: Vec<u8>,
    pub last_step: u64,
}

pub struct Vault {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub port: u16,
    pub daemon: Option<Child>,
    pub members: Vec<Member>,
    pub period: u64,
    /// Extra environment for the daemon (test hooks).
    pub daemon_env: Vec<(String, String)>,
    /// The network namespace (`/run/netns/NAME`) standing in for the
    /// vault's host: the daemon and every command run in it (their
    /// mounts stay the host's).
    pub netns: Option<String>,
    /// A cgroup (v2 directory) the daemon starts in, as a service
    /// manager would start it in its unit's.
    pub daemon_cgroup: Option<PathBuf>,
    /// The daemon was crashed (`crash`) and not started since: its
    /// workloads may still run.
    pub crashed: bool,
}

impl Vault {
    /// `coffre init` with cheap KDF costs; `extra` goes to init.
    pub fn init(extra: &[&str]) -> Vault {
        Vault::init_as(extra, "alice's password")
    }

    /// `coffre init` with `admin_password` as alice's password.
    pub fn init_as(extra: &[&str], admin_password: &str) -> Vault {
        // Every vault formats its filesystem through FUSE and a loop device.
        require(NEEDS);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vault");
        let password = tmp.path().join("alice.pw");
        std::fs::write(&password, admin_password).unwrap();
        let identity = tmp.path().join("alice.identity");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "init",
            dir.to_str().unwrap(),
            "--admin",
            "alice",
            "--password-file",
            password.to_str().unwrap(),
            "--identity-out",
            identity.to_str().unwrap(),
            "--listen",
            &listen,
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            kdf::ARGON2_MEMORY_ARG,
            "--pbkdf-parallel",
            kdf::ARGON2_PARALLEL_ARG,
        ];
        if !extra.contains(&"--pbkdf-force-iterations") {
            args.extend(["--pbkdf-force-iterations", kdf::ARGON2_ITERATIONS_ARG]);
        }
        if !extra.contains(&"--size") {
            args.extend(["--size", "16M"]);
        }
        let period = match extra.iter().position(|a| *a == "--totp-period") {
            Some(i) => extra[i + 1].parse().unwrap(),
            None => {
                args.extend(["--totp-period", "1"]);
                1
            }
        };
        args.extend(extra);
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let secret = secret_from(&text);
        Vault {
            tmp,
            dir,
            port,
            daemon: None,
            members: vec![Member {
                name: "alice".into(),
                identity,
                password,
                secret,
                last_step: 0,
            }],
            period,
            daemon_env: Vec::new(),
            netns: None,
            daemon_cgroup: None,
            crashed: false,
        }
    }

    /// The CLI, in the vault host's network namespace when it has one.
    pub fn bin(&self) -> Command {
        match &self.netns {
            None => Command::new(BIN),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
                c
            }
        }
    }

    /// Where the daemon puts the data (as `VaultDir::data_layout` says).
    pub fn layout(&self) -> coffre_data::Layout {
        coffre_data::Layout::under(&self.dir)
    }

    /// Sets `[data]` keys in config.toml before `start` (`members` is a
    /// list of (name, uid, gid)).
    pub fn set_data(&self, team_gid: u32, grace_s: u64, members: &[(&str, u32, u32)]) {
        let cfg = self.dir.join("config.toml");
        let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
        let data = t
            .entry("data")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap();
        data.insert("team_gid".into(), toml::Value::Integer(team_gid.into()));
        data.insert(
            "close_grace_s".into(),
            toml::Value::Integer(grace_s.cast_signed()),
        );
        let mut m = toml::Table::new();
        for (name, uid, gid) in members {
            let mut ids = toml::Table::new();
            ids.insert("uid".into(), toml::Value::Integer((*uid).into()));
            ids.insert("gid".into(), toml::Value::Integer((*gid).into()));
            m.insert((*name).into(), toml::Value::Table(ids));
        }
        data.insert("members".into(), toml::Value::Table(m));
        std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    }

    /// Whether anything of the data stack is up: the team's mount, the
    /// FUSE volume file, a loop device on it, the NBD socket.
    pub fn leftovers(&self) -> Vec<String> {
        let l = self.layout();
        let mut v = Vec::new();
        if coffre_data::system::mount_at(&l.mountpoint).is_some() {
            v.push(format!("mount at {}", l.mountpoint.display()));
        }
        if coffre_data::system::mount_at(&l.volume_file).is_some() {
            v.push("FUSE volume file".into());
        }
        for d in coffre_data::system::LoopDevice::backed_by(&l.volume_file) {
            v.push(format!("loop device {}", d.path.display()));
        }
        if l.nbd_socket.exists() {
            v.push("NBD socket".into());
        }
        v
    }

    /// Decrypts the whole volume with alice's password (for fsck and
    /// plaintext searches; test only).
    pub fn decrypt_volume(&self, to: &Path) {
        let pw = self.members[0].password.clone();
        let out = Command::new(BIN)
            .args(["volume", "read", "--key-file"])
            .arg(&pw)
            .arg("--header")
            .arg(self.dir.join("volume.hdr"))
            .arg(self.dir.join("volume.img"))
            .output()
            .unwrap();
        // Not ok(): its stdout is the whole volume.
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(to, out.stdout).unwrap();
    }

    /// Edits config.toml's [policy] before `start`.
    pub fn set_policy(&self, key: &str, value: u64) {
        let cfg = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} = ")) {
                    format!("{key} = {value}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&cfg, out.join("\n")).unwrap();
    }

    /// The vault's accounts as control.json keeps them.
    pub fn accounts(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("control.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["accounts"].clone()
    }

    /// A member's (uid, gid), given by the vault.
    pub fn ids_of(&self, name: &str) -> (u32, u32) {
        let a = &self.accounts()["users"][name];
        let n = |k: &str| {
            u32::try_from(a[k].as_u64().unwrap_or_else(|| panic!("{name}: {a}"))).unwrap()
        };
        (n("uid"), n("gid"))
    }

    /// The team's gid, given by the vault.
    pub fn team_gid(&self) -> u32 {
        u32::try_from(self.accounts()["groups"]["_team"].as_u64().unwrap()).unwrap()
    }

    /// What the operator does once a start imported `[data.members]` and
    /// `team_gid` (the next start refuses them): takes them out of
    /// config.toml. `start` does it before every start after the import.
    pub fn forget_imported_data(&self) {
        if self.accounts()["imported_at_ms"].is_null() {
            return;
        }
        let cfg = self.dir.join("config.toml");
        let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
        if let Some(d) = t.get_mut("data").and_then(|d| d.as_table_mut()) {
            d.remove("members");
            d.remove("team_gid");
        }
        std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    }

    pub fn start(&mut self) {
        if self.dir.join("control.json").exists() {
            self.forget_imported_data();
        }
        let mut cmd = match &self.daemon_cgroup {
            None => self.bin(),
            Some(cg) => {
                // Joins the cgroup, then becomes the daemon.
                let mut c = Command::new("sh");
                c.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                    .arg(cg)
                    .arg(BIN);
                c
            }
        };
        let mut child = cmd
            .args(["serve", self.dir.to_str().unwrap()])
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            // Kept for a failing test to show (never a pipe nobody reads:
            // a full one would block the daemon).
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.tmp.path().join("daemon.stderr"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().expect("daemon printed nothing").unwrap();
        assert!(line.contains("listening on"), "{line}");
        std::thread::spawn(move || for _ in lines {});
        self.daemon = Some(child);
    }

    /// What the daemons of this vault wrote on stderr.
    pub fn daemon_stderr(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("daemon.stderr")).unwrap_or_default()
    }

    /// `member invite` by `by`, then `join` by the new member.
    pub fn add_member(&mut self, by: &str, name: &str, superuser: bool) {
        let inv = self.tmp.path().join(format!("{name}.invitation"));
        let mut args = vec!["member", "invite", name, "--out", inv.to_str().unwrap()];
        if superuser {
            args.extend(["--role", "superuser"]);
        }
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.authed(by, &argv);
        assert!(
            out.status.success(),
            "invite: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta = std::fs::metadata(&inv).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let out = self.join(name, &inv);
        assert!(
            out.status.success(),
            "join: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secret = secret_from(&String::from_utf8(out.stdout).unwrap());
        let identity = self.tmp.path().join(format!("{name}.identity"));
        let password = self.tmp.path().join(format!("{name}.pw"));
        self.members.push(Member {
            name: name.into(),
            identity,
            password,
            secret,
            last_step: 0,
        });
    }

    /// `coffre join` with the invitation file; the password is NAME's.
    pub fn join(&self, name: &str, inv: &Path) -> Output {
        let password = self.tmp.path().join(format!("{name}.pw"));
        std::fs::write(&password, format!("{name}'s password")).unwrap();
        let identity = self.tmp.path().join(format!("{name}.identity"));
        self.bin()
            .args([
                "join",
                inv.to_str().unwrap(),
                "--password-file",
                password.to_str().unwrap(),
            ])
            .args(["--identity-out", identity.to_str().unwrap()])
            .env("HOME", self.home(name))
            .env_remove("XDG_STATE_HOME")
            .output()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().unwrap().id()
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            unsafe_kill(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("daemon did not stop on SIGTERM");
        }
    }

    /// SIGKILL: a crash.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.crashed = true;
        }
    }

    pub fn member(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .expect("member")
    }

    /// A TOTP code for a step never used before by this member (waits for
    /// the next step if needed).
    pub fn totp(&mut self, name: &str) -> String {
        let period = self.period;
        let m = self.member(name);
        loop {
            let step = unix_secs() / period;
            if step > m.last_step {
                m.last_step = step;
                return format!("{:06}", coffre_daemon::totp::hotp(&m.secret, step));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The home directory of `name`'s machine (where the client remembers
    /// the vault's audit head).
    pub fn home(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("home-{name}"))
    }

    /// Runs the CLI as `name`.
    pub fn cli(&self, name: &str, args: &[&str]) -> Output {
        self.cli_at(name, &self.home(name), args)
    }

    /// Runs the CLI as `name` on a machine whose home is `home`.
    pub fn cli_at(&self, name: &str, home: &Path, args: &[&str]) -> Output {
        let m = self
            .members
            .iter()
            .find(|m| m.name == name)
            .expect("member");
        self.bin()
            .args(args)
            .env("COFFRE_IDENTITY", &m.identity)
            .env("HOME", home)
            .env_remove("XDG_STATE_HOME")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A password-and-TOTP command as `name`.
    pub fn authed(&mut self, name: &str, args: &[&str]) -> Output {
        let code = self.totp(name);
        let pw = self.member(name).password.clone();
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--password-file", pw.to_str().unwrap(), "--totp", &code]);
        self.cli(name, &a)
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        let out = self.cli(name, &["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn state(&self) -> String {
        self.status("alice")["state"].as_str().unwrap().to_string()
    }

    /// Waits until the daemon says it holds no key (`key_held`, asked as
    /// alice).
    pub fn wait_key_gone(&self, within: Duration) {
        let until = Instant::now() + within;
        while self.status("alice")["key_held"] != false {
            assert!(Instant::now() < until, "the key is still held");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until nothing the vault mounted or attached is left
    /// ([`Vault::leftovers`]); `what` says what would have left it.
    pub fn wait_no_leftovers(&self, within: Duration, what: &str) {
        let until = Instant::now() + within;
        while !self.leftovers().is_empty() {
            assert!(Instant::now() < until, "{what}: {:?}", self.leftovers());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the vault reaches `state`.
    pub fn wait_state(&self, state: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.state();
            if s == state {
                return;
            }
            assert!(Instant::now() < deadline, "vault is {s}, expected {state}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `coffre enter` in the background, held until `leave` or a signal.
    pub fn enter_bg(&mut self, name: &str, extra: &[&str]) -> Child {
        let child = self.enter_start(name, extra);
        // Entered once the session file appears.
        let sfile = session_file(&self.member(name).identity);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sfile.exists() {
            assert!(Instant::now() < deadline, "enter did not complete");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// `name` leaves, its `enter` (from [`enter_bg`](Self::enter_bg))
    /// ends, and the vault closes (it was the last one in).
    pub fn leave_closed(&mut self, name: &str, enter: &mut Child) {
        ok(&self.cli(name, &["leave"]));
        wait_exit(enter, Duration::from_secs(20));
        self.wait_state("closed", Duration::from_secs(60));
    }

    /// `coffre enter` started in the background; it has entered once
    /// `session_file` of the member's identity exists.
    pub fn enter_start(&mut self, name: &str, extra: &[&str]) -> Child {
        let code = self.totp(name);
        let m = self.members.iter().find(|m| m.name == name).unwrap();
        let mut args = vec![
            "enter",
            "--password-file",
            m.password.to_str().unwrap(),
            "--totp",
            &code,
            "--heartbeat",
            "1",
        ];
        args.extend(extra);
        self.bin()
            .args(&args)
            .env("COFFRE_IDENTITY", &m.identity)
            .env("HOME", self.home(name))
            .env_remove("XDG_STATE_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The details of the audit records with this action and result.
    pub fn audit_details(&self, action: &str, result: &str) -> Vec<String> {
        self.audit()
            .iter()
            .filter(|e| e["record"]["action"] == action && e["record"]["result"] == result)
            .map(|e| {
                e["record"]["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        let out = self.cli(
            "alice",
            &[
                "audit",
                "show",
                "--json",
                "--dir",
                self.dir.to_str().unwrap(),
            ],
        );
        assert!(out.status.success());
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        // A clean stop takes the mount down; after a crash, the same
        // clean-up a restarted daemon does.
        if let Some(mut c) = self.daemon.take() {
            unsafe_kill(c.id(), "TERM");
            if wait_child(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        coffre_data::cleanup_stale(&self.layout(), Duration::from_secs(1));
        if self.crashed && self.daemon_cgroup.is_none() {
            kill_left_workloads(&self.dir);
        }
    }
}

/// What a crashed daemon's workloads left (a test that failed between a
/// crash and the next start): killed through cgroup v2's `cgroup.kill`,
/// and the vault's cgroups removed, so that a spinning workload does not
/// take a core from the tests after it.
fn kill_left_workloads(dir: &Path) {
    let scope = coffre_daemon::workload::scope_of(dir);
    let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .map(|r| Path::new(r).join(&scope))
        .into_iter()
        .find(|p| p.join("cgroup.kill").exists());
    let Some(top) = unified else {
        return;
    };
    let _ = std::fs::write(top.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(top.join("cgroup.events"))
        .is_ok_and(|e| e.contains("populated 1"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|e| e.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        remove_tree(&root.join(&scope));
    }
}

/// `rmdir` of a cgroup and the ones under it, deepest first.
fn remove_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

pub fn session_file(identity: &Path) -> PathBuf {
    let mut s = identity.as_os_str().to_owned();
    s.push(".session");
    PathBuf::from(s)
}

pub fn secret_from(init_stdout: &str) -> Vec<u8> {
    let uri = init_stdout
        .lines()
        .find(|l| l.contains("otpauth://"))
        .expect("otpauth URI printed");
    let s = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    coffre_daemon::totp::unbase32(s).unwrap().to_vec()
}

impl Vault {
    /// Sets `[workloads] freezer` and appends `[[workload]]` tables to
    /// config.toml before `start`.
    pub fn set_workloads(&self, freezer: &str, tables: &str) {
        let cfg = self.dir.join("config.toml");
        let mut t: toml::Table = std::fs::read_to_string(&cfg).unwrap().parse().unwrap();
        t.remove("workload");
        let w = t
            .entry("workloads")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap();
        w.insert("freezer".into(), toml::Value::String(freezer.into()));
        let text = format!("{}\n{tables}\n", toml::to_string(&t).unwrap());
        std::fs::write(&cfg, text).unwrap();
    }
}

/// The vault's volume key, as cryptsetup reads it with the first
/// member's password (to look for it in memory).
pub fn volume_key(v: &Vault) -> Vec<u8> {
    let out_file = v.tmp.path().join("vk");
    let out = std::process::Command::new("cryptsetup")
        .args([
            "-q",
            // The daemon holds the header's lock while it runs.
            "--disable-locks",
            "luksDump",
            "--dump-volume-key",
            "--volume-key-file",
            out_file.to_str().unwrap(),
        ])
        .args(["--header", v.dir.join("volume.hdr").to_str().unwrap()])
        .args(["--key-file", v.members[0].password.to_str().unwrap()])
        .arg(v.dir.join("volume.img"))
        .output()
        .expect("cryptsetup (scripts/test installs cryptsetup-bin)");
    ok(&out);
    std::fs::read(out_file).unwrap()
}

/// A helper that parses guests' bytes (DHCP, LDAP, a VM's NFS server)
/// runs as a user of its own: one uid in every slot, not root, not
/// `nobody`, of no account here; and with `limits` as its hard (and soft)
/// limits. Returns that uid.
pub fn own_user_and_limits(pid: u32, limits: &coffre_sys::Limits) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_else(|| panic!("{pid}: no Uid in {status}"))
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4, "{pid}: {uids:?}");
    let uid = uids[0];
    assert!(uids.iter().all(|u| *u == uid), "{pid}: {uids:?}");
    assert!(uid != 0 && uid != 65534, "{pid}: uid {uid}");
    assert!(
        coffre_sys::child::user_by_uid(uid).unwrap().is_none(),
        "{pid}: uid {uid} is an account here"
    );
    let table = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        table
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{pid}: no {name} in {table}"))
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    for (name, v) in [
        ("Max processes", limits.processes),
        ("Max data size", limits.data_bytes),
        ("Max open files", limits.open_files),
    ] {
        assert_eq!(limit(name), vec![v.to_string(); 2], "{pid}: {name}");
    }
    uid
}

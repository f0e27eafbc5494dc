//! A real OpenLDAP server for a test: slapd on loopback (ldap:// for
//! StartTLS, ldaps://) and on a Unix socket (ldapi://), back_mdb with the
//! ppolicy overlay, the core, cosine, nis and inetorgperson schemas (and
//! any the test adds), its own CA and a
//! certificate for 127.0.0.1, loaded with slapadd. The guard kills it by
//! PID. slapd runs with `-d 256` (stats), so its log lists every search it
//! answered.

use crate::gate::{Need, require};
use crate::process::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The root DN's password (the root DN is `cn=admin,SUFFIX`).
pub const ROOT_PASSWORD: &str = "admin";

/// A running slapd.
pub struct Slapd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    suffix: String,
    /// Port of ldap:// (StartTLS) on 127.0.0.1.
    pub plain: u16,
    /// Port of ldaps:// on 127.0.0.1.
    pub ldaps: u16,
    log: PathBuf,
}

fn module_dir() -> &'static str {
    if Path::new("/usr/lib/ldap/back_mdb.so").exists() {
        "/usr/lib/ldap"
    } else {
        "/usr/lib/x86_64-linux-gnu/ldap"
    }
}

impl Slapd {
    /// Starts slapd for `suffix` with the entries of `ldif` (which holds
    /// the suffix's own entry, and `cn=default,ou=policies,SUFFIX`, the
    /// password policy applied to every account).
    pub fn start(suffix: &str, ldif: &str) -> Slapd {
        Slapd::start_with(suffix, ldif, "")
    }

    /// As [`start`](Self::start), with `schema` (slapd.conf schema text:
    /// `attributetype` and `objectclass` lines) loaded after the standard
    /// ones.
    pub fn start_with(suffix: &str, ldif: &str, schema: &str) -> Slapd {
        require(&[Need::Slapd]);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("db")).unwrap();

        let pki = crate::tls::TestPki::new("slapd test CA", &["127.0.0.1"]);
        std::fs::write(d.join("ca.pem"), &pki.ca).unwrap();
        std::fs::write(d.join("cert.pem"), &pki.cert).unwrap();
        std::fs::write(d.join("key.pem"), &pki.key).unwrap();
        std::fs::write(d.join("extra.schema"), schema).unwrap();

        let s = "/etc/ldap/schema";
        let conf = format!(
            "include {s}/core.schema\ninclude {s}/cosine.schema\ninclude {s}/nis.schema\n\
             include {s}/inetorgperson.schema\ninclude {d}/extra.schema\n\
             modulepath {m}\nmoduleload back_mdb\nmoduleload ppolicy\n\
             pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\nreferral ldap://elsewhere.invalid/\n\
             TLSCACertificateFile {d}/ca.pem\nTLSCertificateFile {d}/cert.pem\nTLSCertificateKeyFile {d}/key.pem\n\
             database mdb\nmaxsize 16777216\nsuffix \"{suffix}\"\nrootdn \"cn=admin,{suffix}\"\nrootpw {ROOT_PASSWORD}\n\
             directory {d}/db\n\
             overlay ppolicy\nppolicy_default \"cn=default,ou=policies,{suffix}\"\n",
            m = module_dir(),
            d = d.display()
        );
        std::fs::write(d.join("slapd.conf"), conf).unwrap();
        std::fs::write(d.join("init.ldif"), ldif).unwrap();
        let out = Command::new("slapadd")
            .args(["-q", "-f"])
            .arg(d.join("slapd.conf"))
            .arg("-l")
            .arg(d.join("init.ldif"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = Slapd {
            child: None,
            plain: free_port(),
            ldaps: free_port(),
            log: d.join("slapd.log"),
            suffix: suffix.to_string(),
            dir,
        };
        s.run();
        s
    }

    /// Starts it (again, after [`stop`](Self::stop)) on the same ports
    /// and database; returns once it answers on all three.
    pub fn run(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("slapd")
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-h")
            .arg(format!(
                "ldap://127.0.0.1:{}/ ldaps://127.0.0.1:{}/ {}",
                self.plain,
                self.ldaps,
                self.ldapi_url()
            ))
            // -d: stay in the foreground (killed by PID), and log stats.
            .args(["-d", "256"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.ldaps)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.plain)).is_err()
            || !d.join("ldapi").exists()
        {
            assert!(
                Instant::now() < deadline,
                "slapd did not start: {}",
                self.log_text()
            );
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("slapd exited ({status}): {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (by PID) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its directory: `ca.pem` is the CA its certificate comes from.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA to trust for its certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `ldaps://127.0.0.1:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.ldaps)
    }

    /// The Unix socket's URL, the path percent-encoded as host.
    pub fn ldapi_url(&self) -> String {
        let path = self.dir.path().join("ldapi");
        format!("ldapi://{}", path.display().to_string().replace('/', "%2F"))
    }

    /// Everything slapd logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Searches slapd logged whose line contains `needle` (without regard
    /// to case: slapd writes escapes in upper case).
    pub fn searches_with(&self, needle: &str) -> usize {
        let needle = needle.to_ascii_lowercase();
        self.log_text()
            .to_ascii_lowercase()
            .lines()
            .filter(|l| l.contains(" srch base=") && l.contains(&needle))
            .count()
    }

    /// Simple binds it was asked for as `dn` (the request's `BIND dn=...
    /// method=128` line; the result has a line of its own).
    pub fn binds_of(&self, dn: &str) -> usize {
        let needle = format!("bind dn=\"{}\" method=", dn.to_ascii_lowercase());
        self.log_text()
            .to_ascii_lowercase()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// Applies an LDIF change (`changetype: modify`...) as the root DN,
    /// over the Unix socket, with `ldapmodify` (needs [`Need::LdapClient`]).
    pub fn modify(&self, ldif: &str) {
        require(&[Need::LdapClient]);
        let path = self.dir.path().join("change.ldif");
        std::fs::write(&path, ldif).unwrap();
        let out = Command::new("ldapmodify")
            .env("LDAPCONF", "/dev/null")
            .env("LDAPRC", "/dev/null")
            .args(["-x", "-H", &self.ldapi_url(), "-D"])
            .arg(format!("cn=admin,{}", self.suffix))
            .args(["-w", ROOT_PASSWORD, "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ldapmodify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A throwaway PostgreSQL cluster from the machine's binaries, for tests
//! and `hushd bench`: `initdb` into a temporary directory, a server on a
//! Unix socket there (no TCP port), a database per caller.
//!
//! `initdb` refuses to run as root, so as root the cluster runs as the
//! `postgres` user (`runuser`). A watchdog process stops the server and
//! removes the directory once the process that started it is gone, so a
//! test binary that exits (or is killed) leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Where Debian and Ubuntu install PostgreSQL's server binaries.
pub const BINARIES: &str = "/usr/lib/postgresql";

/// Why no cluster could be started.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("no PostgreSQL server binaries under {BINARIES}/*/bin (Debian package `postgresql`)")]
    Missing,
    #[error("{what}: {why}")]
    Failed { what: String, why: String },
}

fn failed(what: &str, why: impl std::fmt::Display) -> ClusterError {
    ClusterError::Failed { what: what.to_string(), why: why.to_string() }
}

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    base: PathBuf,
    /// Run commands as this user (when started as root).
    user: Option<String>,
    /// The port (which names the Unix socket too).
    port: u16,
    next: AtomicU64,
}

/// The newest `bin` directory under [`BINARIES`] with `initdb` and
/// `pg_ctl`.
pub fn binaries() -> Result<PathBuf, ClusterError> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(BINARIES)
        .map_err(|_| ClusterError::Missing)?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or(ClusterError::Missing)
}

impl Cluster {
    /// Starts a cluster. `durable`: fsync as in production (for
    /// measurements); otherwise fsync is off (tests, which never kill
    /// PostgreSQL itself).
    pub fn start(durable: bool) -> Result<Self, ClusterError> {
        Self::start_with(durable, None)
    }

    /// Starts a cluster that also listens on `127.0.0.1:port` with TLS only
    /// on TCP, presenting `tls` (certificate and PKCS#8 key, PEM). For the
    /// test of hush's TLS to a remote database.
    pub fn start_tls(port: u16, certificate: &str, key: &str) -> Result<Self, ClusterError> {
        Self::start_with(false, Some((port, certificate, key)))
    }

    fn start_with(durable: bool, tls: Option<(u16, &str, &str)>) -> Result<Self, ClusterError> {
        let bin = binaries()?;
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        let user = root.then(|| "postgres".to_string());
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| failed("randomness", "unavailable"))?;
        let base =
            std::env::temp_dir().join(format!("hush-pg-{}-{:016x}", std::process::id(), u64::from_le_bytes(nonce)));
        std::fs::create_dir(&base).map_err(|e| failed(&format!("creating {}", base.display()), e))?;
        let port = tls.map_or(5432, |(port, _, _)| port);
        let cluster = Self { bin, base, user, port, next: AtomicU64::new(0) };
        if let Some(user) = &cluster.user {
            let status = Command::new("chown").arg(user).arg(&cluster.base).status();
            if !status.is_ok_and(|s| s.success()) {
                return Err(failed("chown", format!("cannot give {} to {user}", cluster.base.display())));
            }
        }
        cluster.watchdog()?;
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", path(&data)?, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
        )?;
        let fsync = if durable { "on" } else { "off" };
        let mut options =
            format!("-k {} -c max_connections=300 -c fsync={fsync} -c full_page_writes={fsync}", path(&cluster.base)?);
        match tls {
            None => options.push_str(" -c listen_addresses=''"),
            Some((port, certificate, key)) => {
                let (cert_file, key_file) = (cluster.base.join("server.crt"), cluster.base.join("server.key"));
                std::fs::write(&cert_file, certificate).map_err(|e| failed("writing the certificate", e))?;
                std::fs::write(&key_file, key).map_err(|e| failed("writing the key", e))?;
                std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(|e| failed("chmod", e))?;
                if let Some(user) = &cluster.user {
                    let status = Command::new("chown").arg(user).arg(&cert_file).arg(&key_file).status();
                    if !status.is_ok_and(|s| s.success()) {
                        return Err(failed("chown", "cannot give the TLS files to the cluster's user"));
                    }
                }
                // TCP connections must use TLS (pg_hba: hostssl only).
                let hba = cluster.data().join("pg_hba.conf");
                std::fs::write(&hba, "local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
                    .map_err(|e| failed("writing pg_hba.conf", e))?;
                options.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -p {port} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                    path(&cert_file)?,
                    path(&key_file)?
                ));
            }
        }
        let log = cluster.base.join("server.log");
        cluster.run("pg_ctl", &["-D", path(&data)?, "-l", path(&log)?, "-o", &options, "-w", "-t", "60", "start"])?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.base
    }

    /// Runs SQL on database `name` (e.g. `CHECKPOINT` before a scan).
    pub fn execute(&self, name: &str, sql: &str) -> Result<(), ClusterError> {
        super::off_runtime(|| {
            let mut client = postgres::Client::connect(&self.url(name), postgres::NoTls)
                .map_err(|e| failed("connecting to the throwaway cluster", e))?;
            client.batch_execute(sql).map_err(|e| failed(sql, e))
        })
    }

    /// A URL for database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgresql://postgres@/{name}?host={}&port={}", self.base.display(), self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn database(&self) -> Result<String, ClusterError> {
        let name = format!("hush_{}", self.next.fetch_add(1, Ordering::Relaxed));
        super::off_runtime(|| {
            let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
                .map_err(|e| failed("connecting to the throwaway cluster", e))?;
            client.batch_execute(&format!("CREATE DATABASE {name}")).map_err(|e| failed("CREATE DATABASE", e))
        })?;
        Ok(self.url(&name))
    }

    /// Runs one of the cluster's programs (as the cluster's user).
    fn run(&self, program: &str, args: &[&str]) -> Result<(), ClusterError> {
        let exe = self.bin.join(program);
        let mut command = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out =
            command.args(args).current_dir(&self.base).stdin(Stdio::null()).output().map_err(|e| failed(program, e))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.base.join("server.log")).unwrap_or_default();
            return Err(failed(
                program,
                format!("{}{}{log}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            ));
        }
        Ok(())
    }

    /// Starts the process that cleans up after this one.
    fn watchdog(&self) -> Result<(), ClusterError> {
        let ctl = self.bin.join("pg_ctl");
        let stop = match &self.user {
            Some(user) => {
                format!("runuser -u {user} -- '{}' -D '{}' -m immediate stop", ctl.display(), self.data().display())
            }
            None => format!("'{}' -D '{}' -m immediate stop", ctl.display(), self.data().display()),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; [ -d '{data}' ] && {stop} >/dev/null 2>&1; rm -rf '{base}'",
            pid = std::process::id(),
            data = self.data().display(),
            base = self.base.display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed("starting the cluster's watchdog", e))?;
        Ok(())
    }
}

fn path(p: &Path) -> Result<&str, ClusterError> {
    p.to_str().ok_or_else(|| failed("path", format!("{} is not UTF-8", p.display())))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().exists() {
            let data = self.data();
            if let Ok(d) = path(&data) {
                let _ = self.run("pg_ctl", &["-D", d, "-m", "immediate", "stop"]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

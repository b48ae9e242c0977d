//! Starting `hushd`, running `hush`, and bounding every wait.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hush::auth::{HushAddress, Identity};
use hush::client::mls::Member;
use hush::client::Connection;
use hush::db::pg::cluster::{Cluster, ClusterError};

/// Upper bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running `hushd serve`, killed when dropped.
pub struct Hushd {
    child: Option<Child>,
    pub address: HushAddress,
    pub data_dir: PathBuf,
    stderr: mpsc::Receiver<String>,
}

fn base_command(bin: &str) -> Command {
    let mut cmd = Command::new(bin);
    // Only what the test sets reaches the binaries.
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

pub fn hushd_command(data_dir: &Path) -> Command {
    let mut cmd = base_command(env!("CARGO_BIN_EXE_hushd"));
    cmd.env("HOME", data_dir).env("HUSHD_LOG", "warn").arg("--data-dir").arg(data_dir);
    if let Some(url) = database_for(data_dir) {
        cmd.env("HUSHD_DATABASE_URL", url);
    }
    cmd
}

thread_local! {
    /// Set by the PostgreSQL variant of a test ([`on_postgres`]): data
    /// directories this thread starts using get a PostgreSQL database.
    static POSTGRES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The database each data directory on PostgreSQL uses.
static DATABASES: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);

/// The throwaway cluster this test binary's PostgreSQL tests share.
fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Result<Cluster, ClusterError>> = OnceLock::new();
    match CLUSTER.get_or_init(|| Cluster::start(false)) {
        Ok(c) => Some(c),
        Err(ClusterError::Missing) => None,
        Err(e) => panic!("PostgreSQL binaries are installed but no throwaway cluster starts: {e}"),
    }
}

/// Makes this test run on PostgreSQL: every data directory it starts
/// using gets a new database on a throwaway cluster (`hushd` sees
/// `HUSHD_DATABASE_URL`). False, after saying why, where the machine has no
/// PostgreSQL binaries (`.ci/run` installs them, so there it is never
/// skipped).
pub fn on_postgres() -> bool {
    if cluster().is_none() {
        eprintln!("skipped: {}", ClusterError::Missing);
        return false;
    }
    POSTGRES.with(|p| p.set(true));
    true
}

/// Whether this test runs on PostgreSQL.
pub fn postgres() -> bool {
    POSTGRES.with(|p| p.get())
}

/// The PostgreSQL database of `data_dir`, created on first use in a
/// PostgreSQL test.
pub fn database_for(data_dir: &Path) -> Option<String> {
    let mut guard = DATABASES.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(url) = map.get(data_dir) {
        return Some(url.clone());
    }
    if !postgres() {
        return None;
    }
    let url = cluster()?.database().unwrap();
    map.insert(data_dir.to_owned(), url.clone());
    Some(url)
}

/// A second node of `first`'s server: `node` shares its database and gets
/// copies of its keys (same address fingerprint), as an operator sets up
/// several nodes.
pub fn second_node(first: &Path, node: &Path) {
    let url = database_for(first).expect("the first node is on PostgreSQL");
    std::fs::create_dir_all(node).unwrap();
    std::fs::set_permissions(node, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for key in [hush::server::KEY_FILE, hush::server::REMOVAL_KEY_FILE] {
        std::fs::copy(first.join(key), node.join(key)).unwrap();
    }
    let mut guard = DATABASES.lock().unwrap_or_else(|p| p.into_inner());
    guard.get_or_insert_with(HashMap::new).insert(node.to_owned(), url);
}

/// The throwaway cluster's files (data directory, WAL, server log), for
/// scans; `None` unless on PostgreSQL.
pub fn cluster_files() -> Option<PathBuf> {
    postgres().then(|| cluster().map(|c| c.socket_dir().to_owned())).flatten()
}

/// Runs SQL on the PostgreSQL database of `data_dir`.
pub fn sql(data_dir: &Path, statement: &str) {
    let url = database_for(data_dir).expect("a PostgreSQL data directory");
    let name = url.split("@/").nth(1).and_then(|rest| rest.split('?').next()).unwrap();
    cluster().unwrap().execute(name, statement).unwrap();
}

/// Writes everything PostgreSQL holds in memory out to its files.
pub fn checkpoint() {
    cluster().unwrap().execute("postgres", "CHECKPOINT").unwrap();
}

/// Runs the named test functions of the enclosing module twice: as
/// `sqlite::NAME` on the embedded SQLite store and as `postgres::NAME` on
/// a throwaway PostgreSQL database.
#[macro_export]
macro_rules! on_both_backends {
    (sync: [$($s:ident),* $(,)?], async: [$($a:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $( #[test] fn $s() { super::$s() } )*
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $a() { super::$a().await } )*
        }
        mod postgres {
            $( #[test] fn $s() { if $crate::support::on_postgres() { super::$s() } } )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $a() {
                    if $crate::support::on_postgres() {
                        super::$a().await
                    }
                }
            )*
        }
    };
}

impl Hushd {
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, "127.0.0.1:0", &[])
    }

    /// Starts `hushd serve --listen LISTEN` with extra environment and waits
    /// for the address line on stdout.
    pub fn start_with(data_dir: &Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = hushd_command(data_dir);
        cmd.args(["serve", "--listen", listen]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn hushd");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = line_tx.send(line);
            }
            for _ in lines {}
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            let _ = err_tx.send(text);
        });
        let line = match line_rx.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hushd printed no address; stderr:\n{}", err_rx.recv_timeout(WAIT).unwrap_or_default());
            }
        };
        let address = line.parse().unwrap_or_else(|e| panic!("bad address line {line:?}: {e}"));
        Self { child: Some(child), address, data_dir: data_dir.to_owned(), stderr: err_rx }
    }

    pub fn port(&self) -> u16 {
        self.address.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `hushd invite` with extra arguments; returns the token (last stdout line).
    pub fn invite(&self, args: &[&str]) -> String {
        let out = run(hushd_command(&self.data_dir).arg("invite").args(args));
        assert!(out.status.success(), "hushd invite failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string()
    }

    /// Resident memory of the server process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        hush::util::rss_kib(Some(self.child.as_ref().unwrap().id())).unwrap()
    }

    /// SIGKILL: no cleanup, no checkpoint, as in a power cut.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status and stderr.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM failed");
        let status = wait_timeout(&mut child, WAIT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("hushd did not exit within {WAIT:?} of SIGTERM");
        });
        (status, self.stderr.recv_timeout(WAIT).unwrap_or_default())
    }
}

impl Drop for Hushd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion within [`WAIT`], killing it otherwise.
pub fn run(cmd: &mut Command) -> Output {
    run_within(cmd, WAIT)
}

/// Runs a command to completion within `limit`, killing it otherwise.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let status = wait_timeout(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("command did not finish within {limit:?}: {cmd:?}");
    });
    Output { status, stdout: out_thread.join().unwrap(), stderr: err_thread.join().unwrap() }
}

/// Every file under `dir`, in its subdirectories too (the blob directory).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Runs `hush --home HOME ARGS...` in the directory `cwd`.
pub fn hush_in(cwd: &Path, home: &Path, args: &[&str]) -> Output {
    let mut cmd = base_command(env!("CARGO_BIN_EXE_hush"));
    cmd.current_dir(cwd).env("HOME", home).arg("--home").arg(home).args(args);
    run(&mut cmd)
}

/// Runs `hush --home HOME ARGS...` with extra environment.
pub fn hush_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = base_command(env!("CARGO_BIN_EXE_hush"));
    cmd.env("HOME", home).arg("--home").arg(home).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// Runs `hush --home HOME ARGS...`.
pub fn hush(home: &Path, args: &[&str]) -> Output {
    let mut cmd = base_command(env!("CARGO_BIN_EXE_hush"));
    cmd.env("HOME", home).arg("--home").arg(home).args(args);
    run(&mut cmd)
}

/// Starts `hush --home HOME ARGS...` with its output piped, for commands
/// that print and then wait (`device add`). Returns the child and its
/// first stdout line.
pub fn hush_first_line(home: &Path, args: &[&str]) -> (Child, String) {
    use std::io::BufRead as _;
    let mut cmd = base_command(env!("CARGO_BIN_EXE_hush"));
    cmd.env("HOME", home).arg("--home").arg(home).args(args);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    (child, line.trim().to_string())
}

/// Waits (bounded) for a child from [`hush_first_line`]; returns its exit
/// status and stderr.
pub fn finish(mut child: Child) -> (ExitStatus, String) {
    let status = wait_timeout(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("the command did not finish within 60 s; stderr:\n{err}");
    });
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status, err)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "command failed ({}): {}", out.status, stderr(&out));
    stdout(&out)
}

/// A registered library client: its device key and connection.
pub async fn registered_client(server: &Hushd) -> (Identity, Connection) {
    let (id, conn, _) = registered_member(server).await;
    (id, conn)
}

/// A registered library client with its MLS member (a fresh account with
/// one device): the device key, the connection and the member.
pub async fn registered_member(server: &Hushd) -> (Identity, Connection, Member) {
    let token = server.invite(&[]);
    let (_account, id, member) = Member::generate().unwrap();
    let conn = Connection::connect(&server.address, &id).await.unwrap();
    assert!(conn.register(Some(&token), member.certificate()).await.unwrap());
    (id, conn, member)
}

/// Claims one KeyPackage per device of `account`, paired with the account
/// (what `Member::add` takes).
pub async fn claim(conn: &Connection, account: hush::auth::AccountId) -> Vec<(hush::auth::AccountId, Vec<u8>)> {
    conn.claim_key_packages(&account).await.unwrap().into_iter().map(|p| (account, p)).collect()
}

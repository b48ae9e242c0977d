//! `hushd bench`: hush's throughput against the ceiling of its own stack —
//! raw quinn with the same TLS configuration, and raw SQLite with the same
//! durability — measured in the same process, in the same run, on loopback,
//! with a temporary data directory. Results are ratios (hush / baseline).
//!
//! Scenarios so far: authenticated handshakes, request round trips (1 and
//! 64 in flight), and durable sends of real MLS application messages (64 in
//! flight) against batched SQLite inserts of the same size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Endpoint, VarInt};
use rusqlite::{params, Connection as Sqlite};
use tokio::task::JoinSet;

use crate::auth::tls::{client_crypto, server_crypto};
use crate::auth::{HushAddress, Identity};
use crate::client::mls::Member;
use crate::client::Connection;
use crate::config::ServerConfig;
use crate::server::Server;
use crate::wire::Request;

/// One line of the result table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub hush: f64,
    pub baseline: f64,
    pub unit: &'static str,
}

impl Row {
    /// hush / baseline (higher is better for rates).
    pub fn ratio(&self) -> f64 {
        if self.baseline > 0.0 {
            self.hush / self.baseline
        } else {
            0.0
        }
    }
}

/// A benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("benchmark: {0}")]
pub struct BenchError(String);

fn fail(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

/// How long each measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub duration: Duration,
}

impl Settings {
    pub fn full() -> Self {
        Self { duration: Duration::from_secs(5) }
    }
    pub fn quick() -> Self {
        Self { duration: Duration::from_millis(300) }
    }
}

/// Runs every scenario; `progress` hears the name of each before it starts.
pub async fn run(settings: Settings, progress: impl Fn(&str)) -> Result<Vec<Row>, BenchError> {
    let dir = tempfile_dir()?;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().map_err(fail)?,
        open_registration: true,
        // Measure the server, not its rate limiter.
        requests_per_second_per_account: 1_000_000,
        requests_per_second_per_ip: 1_000_000,
        max_connections_per_ip: 100_000,
        max_unregistered_per_ip: 100_000,
        max_streams_per_connection: 256,
        max_log_per_group: 1_000_000_000,
        ..ServerConfig::default()
    };
    let server = Server::bind(config, dir.path()).map_err(fail)?;
    let address = server.address().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let raw = RawServer::start().await?;

    let mut rows = vec![];
    progress("handshakes");
    // Accounts registered beforehand: the scenario is connect + key-pair
    // authentication + one request, not registration.
    let mut ids = vec![];
    for _ in 0..16 {
        let id = Identity::generate().map_err(fail)?;
        let c = Connection::connect(&address, &id).await.map_err(fail)?;
        c.register(None).await.map_err(fail)?;
        ids.push(Arc::new(id));
    }
    let a = address.clone();
    let ids = Arc::new(ids);
    let hush_hs = rate(settings, 16, move |i| {
        let address = a.clone();
        let ids = ids.clone();
        async move {
            let id = ids
                .get(usize::try_from(i % 1000).unwrap_or(0) % 16)
                .cloned()
                .ok_or_else(|| BenchError("no id".into()))?;
            let c = Connection::connect(&address, &id).await.map_err(fail)?;
            c.call(&Request::Ping { nonce: i }).await.map_err(fail)?;
            c.quic().close(VarInt::from_u32(0), b"");
            Ok(())
        }
    })
    .await?;
    let r = raw.clone();
    let raw_hs = rate(settings, 16, move |_| {
        let raw = r.clone();
        async move { raw.connect_and_echo(9).await }
    })
    .await?;
    rows.push(Row {
        scenario: "auth handshakes/s (16 concurrent)".into(),
        hush: hush_hs,
        baseline: raw_hs,
        unit: "/s",
    });

    let id = Identity::generate().map_err(fail)?;
    let conn = Arc::new(Connection::connect(&address, &id).await.map_err(fail)?);
    conn.register(None).await.map_err(fail)?;
    let raw_conn = raw.connection().await?;
    for in_flight in [1usize, 64] {
        progress(&format!("round trips, {in_flight} in flight"));
        let c = conn.clone();
        let hush_rt = rate(settings, in_flight, move |i| {
            let c = c.clone();
            async move { c.call(&Request::Ping { nonce: i }).await.map(|_| ()).map_err(fail) }
        })
        .await?;
        let rc = raw_conn.clone();
        let raw_rt = rate(settings, in_flight, move |_| {
            let rc = rc.clone();
            async move { echo(&rc, 9).await }
        })
        .await?;
        rows.push(Row {
            scenario: format!("round trips/s, {in_flight} in flight (ping, protocol only)"),
            hush: hush_rt,
            baseline: raw_rt,
            unit: "/s",
        });
    }

    progress("durable sends");
    let (hush_sends, message_len) = durable_sends(&address, &conn, &id, settings).await?;
    let sql = sqlite_batches(dir.path(), message_len, 64, settings)?;
    rows.push(Row {
        scenario: format!("durable sends/s, 64 in flight ({message_len} B MLS ciphertext)"),
        hush: hush_sends,
        baseline: sql,
        unit: "/s",
    });

    let _ = stop_tx.send(());
    let _ = serving.await;
    raw.endpoint.close(VarInt::from_u32(0), b"done");
    Ok(rows)
}

fn tempfile_dir() -> Result<TempDir, BenchError> {
    let base = std::env::temp_dir().join(format!("hush-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(fail)?;
    Ok(TempDir(base))
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `op` from `workers` concurrent loops for the configured duration;
/// returns completed operations per second.
async fn rate<F, Fut>(settings: Settings, workers: usize, op: F) -> Result<f64, BenchError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send,
{
    let start = Instant::now();
    let deadline = start + settings.duration;
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let op = op.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                op(n * 1000 + w as u64).await?;
                n += 1;
            }
            Ok::<u64, BenchError>(n)
        });
    }
    let mut total = 0u64;
    while let Some(r) = tasks.join_next().await {
        total += r.map_err(fail)??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Real MLS application messages from a group of two, sent 64 at a time;
/// each is acknowledged only after its SQLite transaction committed.
async fn durable_sends(
    address: &HushAddress,
    conn: &Arc<Connection>,
    id: &Identity,
    settings: Settings,
) -> Result<(f64, usize), BenchError> {
    let mut alice = Member::new(id.account_id()).map_err(fail)?;
    let bob_id = Identity::generate().map_err(fail)?;
    let bob = Connection::connect(address, &bob_id).await.map_err(fail)?;
    bob.register(None).await.map_err(fail)?;
    let bob_mls = Member::new(bob_id.account_id()).map_err(fail)?;
    bob.publish_key_packages(bob_mls.key_packages(1).map_err(fail)?, Some(0)).await.map_err(fail)?;
    let g = alice.create_group().map_err(fail)?;
    conn.create_group(g.group_info, g.ratchet_tree).await.map_err(fail)?;
    let kp = conn.claim_key_package(&bob_id.account_id()).await.map_err(fail)?;
    let (commit, welcome) = alice.add(&g.id, &[kp]).map_err(fail)?;
    conn.send(commit, Some(welcome)).await.map_err(fail)?;
    alice.merge_pending(&g.id).map_err(fail)?;
    // Generate before timing, then send them all, 64 in flight.
    let count = if settings.duration < Duration::from_secs(1) { 2_000 } else { 50_000 };
    let mut messages = Vec::with_capacity(count);
    for i in 0..count {
        messages.push(alice.encrypt(&g.id, format!("benchmark message {i}").as_bytes()).map_err(fail)?);
    }
    let len = messages.first().map(Vec::len).unwrap_or(0);
    let queue = Arc::new(std::sync::Mutex::new(messages));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..64 {
        let c = conn.clone();
        let queue = queue.clone();
        tasks.spawn(async move {
            loop {
                let next = queue.lock().map_err(fail)?.pop();
                let Some(m) = next else { return Ok::<(), BenchError>(()) };
                c.send(m, None).await.map_err(fail)?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(fail)??;
    }
    let r = count as f64 / start.elapsed().as_secs_f64();
    Ok((r, len))
}

/// Raw SQLite: WAL, synchronous=FULL, batches of `batch` rows of `len`
/// bytes per transaction. Rows per second.
fn sqlite_batches(dir: &std::path::Path, len: usize, batch: usize, settings: Settings) -> Result<f64, BenchError> {
    let db = Sqlite::open(dir.join("raw.db")).map_err(fail)?;
    db.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    db.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
    db.execute_batch("CREATE TABLE log (gid INTEGER, seq INTEGER, data BLOB, PRIMARY KEY (gid, seq)) WITHOUT ROWID")
        .map_err(fail)?;
    let row = vec![0x5au8; len];
    let start = Instant::now();
    let mut seq = 0i64;
    while start.elapsed() < settings.duration {
        let tx = db.unchecked_transaction().map_err(fail)?;
        {
            let mut stmt = tx.prepare_cached("INSERT INTO log (gid, seq, data) VALUES (1, ?1, ?2)").map_err(fail)?;
            for _ in 0..batch {
                seq += 1;
                stmt.execute(params![seq, row]).map_err(fail)?;
            }
        }
        tx.commit().map_err(fail)?;
    }
    Ok(seq as f64 / start.elapsed().as_secs_f64())
}

/// The baseline: a quinn endpoint with hush's own TLS configuration whose
/// only logic is echoing each request stream.
#[derive(Clone)]
struct RawServer {
    endpoint: Endpoint,
    address: HushAddress,
    client: Arc<Identity>,
}

impl RawServer {
    async fn start() -> Result<Self, BenchError> {
        let identity = Identity::generate().map_err(fail)?;
        let crypto = server_crypto(&identity).map_err(fail)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(VarInt::from_u32(256));
        cfg.transport_config(Arc::new(transport));
        let endpoint = Endpoint::server(cfg, "127.0.0.1:0".parse().map_err(fail)?).map_err(fail)?;
        let port = endpoint.local_addr().map_err(fail)?.port();
        let address = HushAddress { host: "127.0.0.1".into(), port, fingerprint: identity.fingerprint() };
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            if let Ok(data) = recv.read_to_end(1 << 20).await {
                                let _ = send.write_all(&data).await;
                                let _ = send.finish();
                            }
                        });
                    }
                });
            }
        });
        Ok(Self { endpoint, address, client: Arc::new(Identity::generate().map_err(fail)?) })
    }

    async fn connection(&self) -> Result<quinn::Connection, BenchError> {
        let (crypto, _) = client_crypto(Some(self.client.tls_credentials().map_err(fail)?), self.address.fingerprint)
            .map_err(fail)?;
        let mut ep = Endpoint::client("127.0.0.1:0".parse().map_err(fail)?).map_err(fail)?;
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.address.port));
        ep.connect(addr, "hush").map_err(fail)?.await.map_err(fail)
    }

    async fn connect_and_echo(&self, len: usize) -> Result<(), BenchError> {
        let c = self.connection().await?;
        echo(&c, len).await?;
        c.close(VarInt::from_u32(0), b"");
        Ok(())
    }
}

async fn echo(c: &quinn::Connection, len: usize) -> Result<(), BenchError> {
    let (mut send, mut recv) = c.open_bi().await.map_err(fail)?;
    send.write_all(&vec![0x03; len]).await.map_err(fail)?;
    send.finish().map_err(fail)?;
    recv.read_to_end(1 << 20).await.map_err(fail)?;
    Ok(())
}

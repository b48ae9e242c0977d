//! The baselines: the ceiling of hush's own stack on this machine. Raw quinn
//! with hush's TLS configuration and no protocol logic, and raw SQLite with
//! hush's durability settings and nothing else to do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Endpoint, VarInt};
use rusqlite::{params, Connection as Sqlite};
use tokio::sync::mpsc;

use super::{fail, BenchError, Settings};
use crate::auth::tls::{client_crypto, server_crypto};
use crate::auth::{Fingerprint, HushAddress, Identity};
use crate::limits::PUSH_QUEUE;
use crate::wire::Push;

/// A quinn endpoint with hush's TLS configuration. Every bidirectional
/// stream is a request: the server reads it to the end, then either echoes
/// it ([`Mode::Echo`]) or, as a relay with no storage would
/// ([`Mode::Relay`]), wraps it in the same push frame hush sends, queues it
/// for every connection (bounded queues, one push stream each, as hush
/// does) and answers with its sequence number.
#[derive(Clone)]
pub(super) struct RawServer {
    pub endpoint: Endpoint,
    pub address: HushAddress,
    client: Arc<Identity>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Echo,
    Relay,
    /// Bulk transfer: a stream starting with `U` is read to its end and
    /// answered with its length; `D` and a `u64` n is answered with n
    /// bytes.
    Bulk,
}

type Queues = Arc<Mutex<Vec<mpsc::Sender<Arc<Vec<u8>>>>>>;

impl RawServer {
    pub async fn start(mode: Mode) -> Result<Self, BenchError> {
        let identity = Identity::generate().map_err(fail)?;
        let fingerprint = identity.fingerprint();
        let current =
            crate::auth::online::CurrentKey::new(crate::auth::online::ServerKey::identity(identity).map_err(fail)?);
        let crypto = server_crypto(current).map_err(fail)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(VarInt::from_u32(256));
        cfg.transport_config(Arc::new(transport));
        let endpoint = Endpoint::server(cfg, "127.0.0.1:0".parse().map_err(fail)?).map_err(fail)?;
        let port = endpoint.local_addr().map_err(fail)?.port();
        let address = HushAddress { host: "127.0.0.1".into(), port, fingerprint };
        let ep = endpoint.clone();
        let queues: Queues = Arc::default();
        let seq = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let queues = queues.clone();
                let seq = seq.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    if mode == Mode::Relay {
                        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
                        if let Ok(mut q) = queues.lock() {
                            q.push(tx);
                        }
                        tokio::spawn(push_task(conn.clone(), rx));
                    }
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let queues = queues.clone();
                        let seq = seq.clone();
                        tokio::spawn(async move {
                            if mode == Mode::Bulk {
                                bulk(send, recv).await;
                                return;
                            }
                            let Ok(data) = recv.read_to_end(1 << 20).await else { return };
                            let reply = match mode {
                                Mode::Echo | Mode::Bulk => data,
                                Mode::Relay => {
                                    let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
                                    let push = Push::Message {
                                        group: vec![7; 16],
                                        seq: n,
                                        head: None,
                                        ciphertext: Some(data),
                                    };
                                    let Ok(frame) = push.encode_framed() else { return };
                                    let frame = Arc::new(frame);
                                    if let Ok(q) = queues.lock() {
                                        for tx in q.iter() {
                                            let _ = tx.try_send(frame.clone());
                                        }
                                    }
                                    n.to_be_bytes().to_vec()
                                }
                            };
                            let _ = send.write_all(&reply).await;
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        Ok(Self { endpoint, address, client: Arc::new(Identity::generate().map_err(fail)?) })
    }

    /// A client connection on its own endpoint (as `hush::client` does).
    pub async fn connection(&self) -> Result<quinn::Connection, BenchError> {
        let config = client_config(&self.client, self.address.fingerprint)?;
        let mut ep = Endpoint::client("127.0.0.1:0".parse().map_err(fail)?).map_err(fail)?;
        ep.set_default_client_config(config);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.address.port));
        ep.connect(addr, "hush").map_err(fail)?.await.map_err(fail)
    }

    /// A client configuration for this server.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, BenchError> {
        client_config(&self.client, self.address.fingerprint)
    }

    pub async fn connect_and_echo(&self, len: usize) -> Result<(), BenchError> {
        let c = self.connection().await?;
        echo(&c, len).await?;
        c.close(VarInt::from_u32(0), b"");
        Ok(())
    }
}

/// hush's client TLS configuration for `identity`, pinned to `pin`.
pub(super) fn client_config(identity: &Identity, pin: Fingerprint) -> Result<quinn::ClientConfig, BenchError> {
    let (crypto, _) = client_crypto(Some(identity.tls_credentials().map_err(fail)?), pin).map_err(fail)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// One bulk stream of [`Mode::Bulk`], through a buffer of hush's size.
async fn bulk(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut head = [0u8; 1];
    if recv.read_exact(&mut head).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; crate::limits::BLOB_IO_BUFFER];
    if head == *b"U" {
        let mut total = 0u64;
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            total += n as u64;
        }
        let _ = send.write_all(&total.to_be_bytes()).await;
    } else {
        let mut n = [0u8; 8];
        if recv.read_exact(&mut n).await.is_err() {
            return;
        }
        let mut left = u64::from_be_bytes(n);
        while left > 0 {
            let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            if send.write_all(buf.get(..k).unwrap_or_default()).await.is_err() {
                return;
            }
            left -= k as u64;
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

async fn push_task(conn: quinn::Connection, mut rx: mpsc::Receiver<Arc<Vec<u8>>>) {
    let Ok(mut stream) = conn.open_uni().await else { return };
    while let Some(frame) = rx.recv().await {
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// One request stream of `len` bytes, read back to the end.
pub(super) async fn echo(c: &quinn::Connection, len: usize) -> Result<(), BenchError> {
    request(c, &vec![0x03; len]).await.map(|_| ())
}

/// One request stream; returns the reply.
pub(super) async fn request(c: &quinn::Connection, data: &[u8]) -> Result<Vec<u8>, BenchError> {
    let (mut send, mut recv) = c.open_bi().await.map_err(fail)?;
    send.write_all(data).await.map_err(fail)?;
    send.finish().map_err(fail)?;
    recv.read_to_end(1 << 20).await.map_err(fail)
}

/// Raw SQLite on its own, as the server's writer: WAL,
/// synchronous=FULL, one table of log rows.
fn raw_log(dir: &std::path::Path, name: &str) -> Result<(Sqlite, std::path::PathBuf), BenchError> {
    let path = dir.join(name);
    let db = Sqlite::open(&path).map_err(fail)?;
    db.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    db.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
    db.execute_batch("CREATE TABLE log (gid INTEGER, seq INTEGER, data BLOB, PRIMARY KEY (gid, seq)) WITHOUT ROWID")
        .map_err(fail)?;
    Ok((db, path))
}

/// The median time of one raw SQLite commit of one row of `len` bytes
/// (WAL, synchronous=FULL), with `per_second` commits a second: what one
/// flush costs at that pace (a disk that has been idle for a while may
/// flush more slowly than a busy one). Microseconds.
pub(super) fn sqlite_commit_p50(
    dir: &std::path::Path,
    len: usize,
    per_second: u32,
    samples: usize,
) -> Result<f64, BenchError> {
    let (db, path) = raw_log(dir, &format!("raw-commit-{per_second}.db"))?;
    let row = vec![0x5au8; len];
    let gap = Duration::from_secs(1) / per_second.max(1);
    let mut took = Vec::with_capacity(samples);
    for seq in 0..samples {
        let next = Instant::now() + gap;
        let start = Instant::now();
        db.execute("INSERT INTO log (gid, seq, data) VALUES (1, ?1, ?2)", params![seq as i64, row]).map_err(fail)?;
        took.push(start.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(db);
    let _ = std::fs::remove_file(&path);
    took.sort_by(f64::total_cmp);
    Ok(took.get(took.len() / 2).copied().unwrap_or(0.0))
}

/// Inserts `row` in transactions of `batch` rows while `more(rows so
/// far)`; returns how many rows.
fn insert_batches(db: &Sqlite, row: &[u8], batch: usize, more: impl Fn(usize) -> bool) -> Result<usize, BenchError> {
    let mut seq = 0usize;
    while more(seq) {
        let tx = db.unchecked_transaction().map_err(fail)?;
        {
            let mut stmt = tx.prepare_cached("INSERT INTO log (gid, seq, data) VALUES (1, ?1, ?2)").map_err(fail)?;
            for _ in 0..batch.max(1) {
                seq += 1;
                stmt.execute(params![seq as i64, row]).map_err(fail)?;
            }
        }
        tx.commit().map_err(fail)?;
    }
    Ok(seq)
}

/// CPU µs per row of raw SQLite inserting `rows` rows of `len` bytes in
/// transactions of `batch` (WAL, synchronous=FULL, one prepared
/// statement).
pub(super) async fn sqlite_insert_cpu(
    dir: &std::path::Path,
    len: usize,
    batch: usize,
    rows: usize,
) -> Result<f64, BenchError> {
    let (db, path) = raw_log(dir, &format!("raw-cpu-{len}-{batch}.db"))?;
    let row = vec![0x5au8; len];
    let per_row = super::measure::cpu_per_op(rows, async {
        insert_batches(&db, &row, batch, |seq| seq < rows)?;
        Ok(())
    })
    .await?;
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(per_row)
}

/// Raw SQLite: WAL, synchronous=FULL, batches of `batch` rows of `len`
/// bytes per transaction, one prepared statement. Rows per second.
pub(super) fn sqlite_batches(
    dir: &std::path::Path,
    len: usize,
    batch: usize,
    settings: Settings,
) -> Result<f64, BenchError> {
    let (db, path) = raw_log(dir, &format!("raw-{len}-{batch}.db"))?;
    let row = vec![0x5au8; len];
    let start = Instant::now();
    let seq = insert_batches(&db, &row, batch, |_| start.elapsed() < settings.duration)?;
    let rate = seq as f64 / start.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

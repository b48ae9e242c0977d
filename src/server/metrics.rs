//! Metrics in the Prometheus text format, on a listener of their own (off
//! unless `--metrics ADDR`).
//!
//! Counts and histograms only. No label ever holds an account, device or
//! group id or an address: request labels are the request's kind and the
//! result code, connection labels a state, refusal labels a reason.
//! Recording is always on (atomics; a label lookup per request), serving
//! only when asked.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

use super::engine::Engine;
use crate::limits::{MAX_METRICS_CONNECTIONS, MAX_METRICS_REQUEST, METRICS_REQUEST_TIMEOUT, METRICS_TIMEOUT};
use crate::wire::Response;

/// A request's kind and what became of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `register`, `send`, … (`wire::Request::kind`), or `unread` for a
    /// request refused before it was decoded.
    pub kind: &'static str,
    /// 0 for success, else the error code's number (`wire::ErrorCode`).
    pub result: u16,
}

/// One label: a state or a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Everything hushd counts.
pub struct Metrics {
    registry: Registry,
    connections: Family<Reason, Gauge>,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<Reason, Counter>,
    batch_size: Histogram,
    commit_seconds: Histogram,
    write_queue: Gauge,
    read_queue: Gauge,
    push_dropped: Counter,
    push_resyncs: Counter,
    file_bytes_in: Counter,
    file_bytes_out: Counter,
    database_bytes: Gauge,
    messages_held: Gauge,
    oldest_message_age: Gauge,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("hushd");
        let m = Self {
            connections: Family::default(),
            requests: Family::default(),
            refusals: Family::default(),
            // 1 … 256 requests per write transaction.
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            // 50 µs … ~0.8 s per write transaction, up to its durable commit.
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 15)),
            write_queue: Gauge::default(),
            read_queue: Gauge::default(),
            push_dropped: Counter::default(),
            push_resyncs: Counter::default(),
            file_bytes_in: Counter::default(),
            file_bytes_out: Counter::default(),
            database_bytes: Gauge::default(),
            messages_held: Gauge::default(),
            oldest_message_age: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open connections, by state (registered device or not)",
            m.connections.clone(),
        );
        registry.register("requests", "Requests answered, by kind and result code", m.requests.clone());
        registry.register("refusals", "Requests refused by a rate limit or the memory budget", m.refusals.clone());
        registry.register("commit_batch_size", "Requests per write transaction (group commit)", m.batch_size.clone());
        registry.register(
            "commit_seconds",
            "Time of a write transaction, from its first request to its durable commit",
            m.commit_seconds.clone(),
        );
        registry.register("write_queue", "Requests waiting for the writer", m.write_queue.clone());
        registry.register("read_queue", "Requests waiting for the reader", m.read_queue.clone());
        registry.register("push_dropped", "Pushes dropped for a full connection queue", m.push_dropped.clone());
        registry.register("push_resyncs", "Resyncs sent instead of dropped pushes", m.push_resyncs.clone());
        registry.register("file_bytes_in", "Bytes of files received (uploads)", m.file_bytes_in.clone());
        registry.register("file_bytes_out", "Bytes of files sent (downloads)", m.file_bytes_out.clone());
        registry.register(
            "database_bytes",
            "Bytes the database occupies (at the last scrape)",
            m.database_bytes.clone(),
        );
        registry.register(
            "messages_held",
            "Messages stored, not yet read by all (at the last scrape)",
            m.messages_held.clone(),
        );
        registry.register(
            "oldest_message_age_seconds",
            "Age of the oldest message held (at the last scrape)",
            m.oldest_message_age.clone(),
        );
        Self { registry, ..m }
    }

    /// A connection opened, as a registered device or not.
    pub fn connection_opened(&self, registered: bool) {
        self.connections.get_or_create(&state(registered)).inc();
    }

    /// A connection's key registered.
    pub fn connection_registered(&self) {
        self.connections.get_or_create(&state(false)).dec();
        self.connections.get_or_create(&state(true)).inc();
    }

    pub fn connection_closed(&self, registered: bool) {
        self.connections.get_or_create(&state(registered)).dec();
    }

    /// A request of `kind` was answered with `response`.
    pub fn request(&self, kind: &'static str, response: &Response) {
        let result = match response {
            Response::Error { code, .. } => code.to_u16(),
            _ => 0,
        };
        self.requests.get_or_create(&RequestLabels { kind, result }).inc();
    }

    /// A request refused by `reason` (`rate-limit`, `busy`, `verify-queue`).
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&Reason { reason }).inc();
    }

    /// A write transaction of `requests` committed in `took`.
    pub fn committed(&self, requests: usize, took: Duration) {
        self.batch_size.observe(requests as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    pub fn queued(&self, write: bool, delta: i64) {
        let gauge = if write { &self.write_queue } else { &self.read_queue };
        gauge.inc_by(delta);
    }

    pub fn push_dropped(&self) {
        self.push_dropped.inc();
    }

    pub fn push_resynced(&self) {
        self.push_resyncs.inc();
    }

    /// Bytes of a file received (`upload`) or sent.
    pub fn file_bytes(&self, upload: bool, n: usize) {
        let counter = if upload { &self.file_bytes_in } else { &self.file_bytes_out };
        counter.inc_by(n as u64);
    }

    /// The text exposition of everything.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

fn state(registered: bool) -> Reason {
    Reason { reason: if registered { "registered" } else { "unregistered" } }
}

/// Where a metrics connection is.
const WAITING: u8 = 0;
const ANSWERING: u8 = 1;
const EVICTED: u8 = 2;

/// A connection that has not sent its request yet, in arrival order.
struct Waiting {
    task: AbortHandle,
    /// Where it comes from.
    peer: std::net::IpAddr,
    /// [`WAITING`] until the connection's task claims it ([`ANSWERING`])
    /// or the accept loop does ([`EVICTED`]), whichever comes first.
    state: Arc<AtomicU8>,
}

/// Serves `GET /metrics` on `listener` until the task is dropped. Each
/// scrape first reads the database's counts (on the engine's reader).
///
/// At most [`MAX_METRICS_CONNECTIONS`] connections are open at once, each
/// in its own task. When all are taken, a new connection evicts the oldest
/// one still waiting for its request head ([`METRICS_REQUEST_TIMEOUT`] at
/// most) from the address with the most such connections: connections
/// that send nothing hold no slot a scraper needs, and one address that
/// opens them as fast as it can evicts its own, not a scraper's from
/// another address. Only if every connection is being
/// answered (bounded by [`METRICS_TIMEOUT`]) is the new one dropped.
pub async fn serve(listener: TcpListener, engine: Engine) {
    let mut connections = JoinSet::new();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let peer = peer.ip();
                if connections.len() >= MAX_METRICS_CONNECTIONS {
                    let Some(oldest) = evict(&mut waiting) else { continue };
                    oldest.abort();
                    // Frees a slot: the evicted task ends at its next poll
                    // (or another one ended first).
                    let _ = connections.join_next().await;
                }
                let state = Arc::new(AtomicU8::new(WAITING));
                let engine = engine.clone();
                let claim = state.clone();
                let task = connections.spawn(async move {
                    let _ = tokio::time::timeout(METRICS_TIMEOUT, scrape(stream, &engine, &claim)).await;
                });
                waiting.push_back(Waiting { task, peer, state });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                waiting.retain(|w| !w.task.is_finished() && w.state.load(Ordering::Acquire) == WAITING);
            }
        }
    }
}

/// Claims the oldest connection still waiting for its request from the
/// address with the most of them (the oldest of all among equals), or
/// none; forgets those that finished or are being answered.
fn evict(waiting: &mut VecDeque<Waiting>) -> Option<AbortHandle> {
    loop {
        waiting.retain(|w| !w.task.is_finished() && w.state.load(Ordering::Acquire) == WAITING);
        let mut counts: HashMap<std::net::IpAddr, usize> = HashMap::new();
        for w in waiting.iter() {
            *counts.entry(w.peer).or_default() += 1;
        }
        let most = counts.values().copied().max()?;
        let at = waiting.iter().position(|w| counts.get(&w.peer) == Some(&most))?;
        let w = waiting.remove(at)?;
        if w.state.compare_exchange(WAITING, EVICTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return Some(w.task);
        }
    }
}

/// Reads the request head within [`METRICS_REQUEST_TIMEOUT`]; `None` if it
/// did not come, was too large, or the connection closed.
async fn request_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let read = async {
        let mut request = Vec::with_capacity(256);
        let mut buf = [0u8; 512];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 || request.len() + n > MAX_METRICS_REQUEST {
                return None;
            }
            request.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        Some(request)
    };
    tokio::time::timeout(METRICS_REQUEST_TIMEOUT, read).await.ok().flatten()
}

async fn scrape(mut stream: tokio::net::TcpStream, engine: &Engine, state: &AtomicU8) -> std::io::Result<()> {
    let Some(request) = request_head(&mut stream).await else { return Ok(()) };
    if state.compare_exchange(WAITING, ANSWERING, Ordering::AcqRel, Ordering::Acquire).is_err() {
        // Evicted meanwhile: its slot went to a newer connection.
        return Ok(());
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
        let m = metrics();
        let now = crate::util::now_unix();
        if let Ok(stats) = engine.stats(now).await {
            m.database_bytes.set(i64::try_from(stats.database_bytes).unwrap_or(i64::MAX));
            m.messages_held.set(i64::try_from(stats.messages).unwrap_or(i64::MAX));
            let age = stats.oldest_message.map_or(0, |at| now.saturating_sub(at));
            m.oldest_message_age.set(i64::try_from(age).unwrap_or(i64::MAX));
        }
        ("200 OK", m.render())
    } else {
        ("404 Not Found", "only GET /metrics here\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

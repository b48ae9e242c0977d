//! How the benchmark measures: rates over a duration or a fixed amount of
//! work, push fan-out and send→push latency read from real push streams,
//! and resident memory per idle connection. Shared by hush's scenarios and
//! their baselines, so both are measured the same way.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::Endpoint;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{fail, BenchError, Settings};
use crate::client::PushStream;
use crate::wire::Push;

/// CPU time this process has used, all threads, user and system
/// (`/proc/self/stat`, in ticks of 10 ms: measure seconds of work). `None`
/// where the file is not Linux's.
pub(super) fn process_cpu() -> Option<Duration> {
    /// `/proc` counts in USER_HZ ticks, 100 a second on Linux.
    const TICK: Duration = Duration::from_millis(10);
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let (_, after) = stat.rsplit_once(')')?;
    let mut fields = after.split_whitespace().skip(11);
    let user: u32 = fields.next()?.parse().ok()?;
    let system: u32 = fields.next()?.parse().ok()?;
    Some(TICK * user.saturating_add(system))
}

/// CPU µs per operation of `work`, which runs `ops` operations.
pub(super) async fn cpu_per_op<Fut>(ops: usize, work: Fut) -> Result<f64, BenchError>
where
    Fut: Future<Output = Result<(), BenchError>>,
{
    let before = process_cpu().ok_or_else(|| BenchError("no CPU time to read (/proc/self/stat)".into()))?;
    work.await?;
    let after = process_cpu().ok_or_else(|| BenchError("no CPU time to read (/proc/self/stat)".into()))?;
    Ok(after.saturating_sub(before).as_secs_f64() * 1e6 / ops.max(1) as f64)
}

/// Runs `op` from `workers` concurrent loops for the configured duration;
/// returns completed operations per second.
pub(super) async fn rate<F, Fut>(settings: Settings, workers: usize, op: F) -> Result<f64, BenchError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
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

/// Feeds every item to `op` from `workers` concurrent loops; returns items
/// per second.
pub(super) async fn drain<T, F, Fut>(items: Vec<T>, workers: usize, op: F) -> Result<f64, BenchError>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
{
    drain_for(items, workers, None, op).await
}

/// [`drain`], stopping at `limit` if the items last longer.
pub(super) async fn drain_for<T, F, Fut>(
    items: Vec<T>,
    workers: usize,
    limit: Option<Duration>,
    op: F,
) -> Result<f64, BenchError>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
{
    let queue = Arc::new(Mutex::new(items));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = limit.map(|l| start + l);
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (queue, done) = (queue.clone(), done.clone());
        let op = op.clone();
        tasks.spawn(async move {
            while deadline.is_none_or(|d| Instant::now() < d) {
                let next = queue.lock().map_err(fail)?.pop();
                let Some(item) = next else { break };
                op(item).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), BenchError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(fail)??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// How long a receiver may wait for deliveries before the run is declared
/// broken (a dropped push would otherwise hang the benchmark).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends every message through `send` (32 in flight, at most two bursts
/// ahead of the slowest reader, so no push queue overflows) while every
/// connection in `readers` reads its push stream. Returns pushes delivered
/// per second. Pushes with a sequence number up to `after` are ignored.
pub(super) async fn fan_out<F, Fut>(
    readers: Vec<quinn::Connection>,
    after: u64,
    messages: Vec<Vec<u8>>,
    strict: bool,
    send: F,
) -> Result<f64, BenchError>
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<u64, BenchError>> + Send + 'static,
{
    const BURST: usize = 32;
    let delivered = Arc::new(Semaphore::new(0));
    let resyncs = Arc::new(AtomicU64::new(0));
    let n = readers.len();
    let mut tasks = JoinSet::new();
    for conn in readers {
        let delivered = delivered.clone();
        let resyncs = resyncs.clone();
        tasks.spawn(async move {
            let Ok(mut pushes) = PushStream::accept(conn).await else { return };
            while let Ok(Some(push)) = pushes.next().await {
                match push {
                    Push::Message { seq, .. } if seq > after => delivered.add_permits(1),
                    Push::Resync => {
                        resyncs.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }
    let per_burst = u32::try_from(BURST * n).map_err(fail)?;
    let total = messages.len() * n;
    let start = Instant::now();
    let mut bursts = 0usize;
    let mut owed = 0u32;
    for chunk in messages.chunks(BURST) {
        let mut sends = JoinSet::new();
        for m in chunk {
            sends.spawn(send.clone()(m.clone()));
        }
        while let Some(r) = sends.join_next().await {
            r.map_err(fail)??;
        }
        bursts += 1;
        if bursts > 1 {
            wait_for(&delivered, per_burst, &resyncs, strict).await?;
            owed = owed.saturating_sub(per_burst);
        }
        owed = owed.saturating_add(u32::try_from(chunk.len() * n).map_err(fail)?);
    }
    wait_for(&delivered, owed.min(u32::try_from(total).map_err(fail)?), &resyncs, strict).await?;
    let elapsed = start.elapsed().as_secs_f64();
    tasks.abort_all();
    Ok(total as f64 / elapsed)
}

async fn wait_for(delivered: &Semaphore, n: u32, resyncs: &AtomicU64, strict: bool) -> Result<(), BenchError> {
    match tokio::time::timeout(DELIVERY_TIMEOUT, delivered.acquire_many(n)).await {
        Ok(Ok(p)) => {
            p.forget();
            Ok(())
        }
        _ if !strict && u64::try_from(delivered.available_permits()).unwrap_or(0) * 4 >= u64::from(n) * 3 => {
            tracing::warn!("fan-out: {} of {n} deliveries arrived", delivered.available_permits());
            delivered.forget_permits(delivered.available_permits());
            Ok(())
        }
        _ => Err(BenchError(format!(
            "deliveries missing after {}s ({} of {n} arrived, {} resyncs)",
            DELIVERY_TIMEOUT.as_secs(),
            delivered.available_permits(),
            resyncs.load(Ordering::Relaxed)
        ))),
    }
}

/// Messages a latency scenario at `per_second` sends.
pub(super) fn latency_samples(settings: Settings, per_second: u32) -> usize {
    let secs = settings.duration.as_secs_f64();
    ((f64::from(per_second) * secs) as usize).max(settings.min_latency_samples)
}

/// Offers messages at a fixed rate (each send its own task, so a slow
/// reply never delays the schedule) and records, per message, the time
/// from starting its send to its push arriving at the second reader. The
/// first reader (the sender's own connection) is drained. Returns (p50,
/// p99) in microseconds.
pub(super) async fn latency<F, Fut>(
    readers: Vec<quinn::Connection>,
    messages: Vec<Vec<u8>>,
    per_second: u32,
    strict: bool,
    send: F,
) -> Result<(f64, f64), BenchError>
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<u64, BenchError>> + Send + 'static,
{
    let samples = latencies(readers, messages, per_second, strict, send).await?;
    Ok(p50_p99(samples))
}

/// The median and the 99th percentile of `samples`.
pub(super) fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples.get(((samples.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    (at(0.50), at(0.99))
}

/// What [`latency`] measures: each message's send→push time (µs), in no
/// particular order.
pub(super) async fn latencies<F, Fut>(
    readers: Vec<quinn::Connection>,
    messages: Vec<Vec<u8>>,
    per_second: u32,
    strict: bool,
    send: F,
) -> Result<Vec<f64>, BenchError>
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<u64, BenchError>> + Send + 'static,
{
    let arrived: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for (i, conn) in readers.into_iter().enumerate() {
        let arrived = arrived.clone();
        tasks.spawn(async move {
            let Ok(mut pushes) = PushStream::accept(conn).await else { return };
            while let Ok(Some(push)) = pushes.next().await {
                if let (1, Push::Message { seq, .. }) = (i, push) {
                    if let Ok(mut a) = arrived.lock() {
                        a.insert(seq, Instant::now());
                    }
                }
            }
        });
    }
    let count = messages.len();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    let mut sends = JoinSet::new();
    for m in messages {
        ticker.tick().await;
        let send = send.clone();
        sends.spawn(async move {
            let started = Instant::now();
            send(m).await.map(|seq| (seq, started))
        });
    }
    let mut started = Vec::with_capacity(count);
    while let Some(r) = sends.join_next().await {
        started.push(r.map_err(fail)??);
    }
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let samples = loop {
        let got: Option<Vec<f64>> = {
            let a = arrived.lock().map_err(fail)?;
            started
                .iter()
                .map(|(seq, t)| a.get(seq).map(|at| at.saturating_duration_since(*t).as_secs_f64() * 1e6))
                .collect()
        };
        match got {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                let a = arrived.lock().map_err(fail)?;
                let partial: Vec<f64> = started
                    .iter()
                    .filter_map(|(seq, t)| a.get(seq).map(|at| at.saturating_duration_since(*t).as_secs_f64() * 1e6))
                    .collect();
                if !strict && partial.len() * 4 >= count * 3 {
                    tracing::warn!("latency run: {} of {count} pushes arrived", partial.len());
                    break partial;
                }
                return Err(BenchError(format!(
                    "pushes missing in the latency run ({} of {count} arrived)",
                    partial.len()
                )));
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    tasks.abort_all();
    Ok(samples)
}

/// Resident memory of this process, KiB.
fn rss_kib() -> Result<f64, BenchError> {
    #[allow(clippy::cast_precision_loss)] // KiB of a process: far below 2^52.
    crate::util::rss_kib(None).map(|k| k as f64).ok_or_else(|| BenchError("no VmRSS in /proc/self/status".into()))
}

/// Opens connections from `endpoint` (configuration and port from
/// `target(n)`) up to each count in `steps` (ascending), lets them settle
/// at each, and returns the growth of this process's resident memory per
/// connection at each step (client and server side, KiB), and the
/// connections, still open.
pub(super) async fn idle_memory<F>(
    endpoint: &Endpoint,
    steps: &[usize],
    target: F,
) -> Result<(Vec<(usize, f64)>, Vec<quinn::Connection>), BenchError>
where
    F: Fn(usize) -> Option<(quinn::ClientConfig, u16)>,
{
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib()?;
    let mut conns = Vec::with_capacity(steps.iter().copied().max().unwrap_or(0));
    let mut per = Vec::with_capacity(steps.len());
    for &count in steps {
        while conns.len() < count {
            let (config, port) = target(conns.len()).ok_or_else(|| BenchError("no client configuration".into()))?;
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let c = endpoint.connect_with(config, addr, "hush").map_err(fail)?.await.map_err(fail)?;
            conns.push(c);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = rss_kib()?;
        per.push((count, (after - before).max(0.0) / count.max(1) as f64));
    }
    Ok((per, conns))
}

//! `hushd bench`: hush's throughput, latency and footprint against the
//! ceiling of its own stack — raw quinn with the same TLS configuration,
//! and raw SQLite with the same durability — measured in the same process,
//! in the same run, on loopback, with a temporary data directory. Each row
//! is hush's figure, the baseline's and their ratio (hush / baseline; for
//! latency, memory and bytes lower is better).
//!
//! Every message is a real MLS application message, generated with openmls
//! before the clock starts, so the server parses, checks and stores what it
//! would in production.
//!
//! Runtime: the multi-threaded tokio runtime, as `hushd serve` uses; the
//! clients run in the same process and compete for the same cores, for
//! hush and baseline alike.

mod raw;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Endpoint, VarInt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::auth::{HushAddress, Identity};
use crate::client::mls::Member;
use crate::client::{Connection, PushStream};
use crate::config::ServerConfig;
use crate::delivery::Quotas;
use crate::delivery::{Caller, Origin};
use crate::server::engine::Engine;
use crate::server::Server;
use crate::util::now_unix;
use crate::wire::{Push, Request, Response};
use raw::{Mode, RawServer};

/// One line of the result table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub hush: f64,
    pub baseline: f64,
    pub unit: &'static str,
    /// Latency, memory and bytes: smaller is better.
    pub lower_is_better: bool,
}

impl Row {
    fn rate(scenario: String, hush: f64, baseline: f64) -> Self {
        Self { scenario, hush, baseline, unit: "/s", lower_is_better: false }
    }
    fn cost(scenario: String, hush: f64, baseline: f64, unit: &'static str) -> Self {
        Self { scenario, hush, baseline, unit, lower_is_better: true }
    }

    /// hush / baseline.
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

/// How long and how large each measurement is.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Length of each timed rate measurement.
    pub duration: Duration,
    /// Messages pre-generated for each durable scenario.
    pub messages: usize,
    /// Members of the fan-out group, and of the large group in the
    /// bytes-per-message comparison.
    pub group: usize,
    /// Idle connections held for the memory measurement.
    pub idle_connections: usize,
    /// Offered load of the latency scenario, messages per second.
    pub latency_rate: u32,
    /// Runs of each `hush` command timed as a whole process.
    pub cli_runs: usize,
    /// Whether every push must arrive. The quick mode (a smoke test that
    /// judges nothing) accepts up to a quarter missing and logs it: pushes
    /// are notifications, and a client that misses one fetches from its
    /// cursor. (About 1 quick run in 12 loses some, before and after the
    /// certified-credentials change; see the open note in issue 20.)
    pub strict: bool,
}

impl Settings {
    pub fn full() -> Self {
        Self {
            duration: Duration::from_secs(4),
            messages: 100_000,
            group: 100,
            idle_connections: 1000,
            latency_rate: 1000,
            cli_runs: 50,
            strict: true,
        }
    }
    /// A few seconds: checks that every scenario works, judges nothing.
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_millis(300),
            messages: 1_000,
            group: 8,
            idle_connections: 100,
            latency_rate: 500,
            cli_runs: 3,
            strict: false,
        }
    }
}

/// Runs every scenario; `progress` hears the name of each before it starts.
pub async fn run(settings: Settings, progress: impl Fn(&str)) -> Result<Vec<Row>, BenchError> {
    let dir = TempDir::new()?;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().map_err(fail)?,
        open_registration: true,
        // Measure the server, not its rate limiter or connection caps.
        requests_per_second_per_account: 1_000_000,
        requests_per_second_per_ip: 1_000_000,
        max_connections: 100_000,
        max_connections_per_ip: 100_000,
        max_unregistered_per_ip: 100_000,
        max_unregistered: 100_000,
        max_streams_per_connection: 256,
        max_log_per_group: 1_000_000_000,
        ..ServerConfig::default()
    };
    let server = Server::bind(config, &dir.path().join("server")).map_err(fail)?;
    let address = server.address().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let echo = RawServer::start(Mode::Echo).await?;
    let mut rows = vec![];

    progress("handshakes");
    // Accounts registered beforehand: the scenario is connect + key-pair
    // authentication + one request, not registration.
    let mut ids = vec![];
    for _ in 0..16 {
        let (_, id, member) = Member::generate().map_err(fail)?;
        let c = Connection::connect(&address, &id).await.map_err(fail)?;
        c.register(None, member.certificate()).await.map_err(fail)?;
        c.close().await;
        ids.push(Arc::new(id));
    }
    let ids = Arc::new(ids);

    progress("memory per idle connection");
    // First, while the heap holds little that could be reused, and with
    // both sets of connections held at once so neither reuses memory the
    // other freed.
    let k = settings.idle_connections;
    let configs = ids.iter().map(|i| raw::client_config(i, address.fingerprint)).collect::<Result<Vec<_>, _>>()?;
    let endpoint = Endpoint::client("127.0.0.1:0".parse().map_err(fail)?).map_err(fail)?;
    let raw_cfg = echo.client_config()?;
    let (raw_mem, raw_conns) = idle_memory(&endpoint, k, |_| Some((raw_cfg.clone(), echo.address.port))).await?;
    let (hush_mem, hush_conns) =
        idle_memory(&endpoint, k, |n| configs.get(n % configs.len().max(1)).cloned().map(|c| (c, address.port)))
            .await?;
    for c in raw_conns.iter().chain(&hush_conns) {
        c.close(VarInt::from_u32(0), b"");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    rows.push(Row::cost(
        format!("memory per idle authenticated connection (KiB, {k} connections)"),
        hush_mem,
        raw_mem,
        "KiB",
    ));

    let (a, i) = (address.clone(), ids.clone());
    let hush_hs = rate(settings, 16, move |n| {
        let address = a.clone();
        let id = i.get((n % 16) as usize).cloned();
        async move {
            let id = id.ok_or_else(|| BenchError("no identity".into()))?;
            let c = Connection::connect(&address, &id).await.map_err(fail)?;
            c.call(&Request::Ping { nonce: n }).await.map_err(fail)?;
            c.quic().close(VarInt::from_u32(0), b"");
            Ok(())
        }
    })
    .await?;
    let r = echo.clone();
    let raw_hs = rate(settings, 16, move |_| {
        let raw = r.clone();
        async move { raw.connect_and_echo(9).await }
    })
    .await?;
    rows.push(Row::rate("auth handshakes/s (16 concurrent)".into(), hush_hs, raw_hs));

    let (_, id, alice_member) = Member::generate().map_err(fail)?;
    let conn = Arc::new(Connection::connect(&address, &id).await.map_err(fail)?);
    conn.register(None, alice_member.certificate()).await.map_err(fail)?;
    let removal_key = conn.status().await.map_err(fail)?.removal_key;
    let raw_conn = echo.connection().await?;
    for in_flight in [1usize, 64] {
        progress(&format!("round trips, {in_flight} in flight"));
        let c = conn.clone();
        let hush_rt = rate(settings, in_flight, move |n| {
            let c = c.clone();
            async move { c.call(&Request::Ping { nonce: n }).await.map(|_| ()).map_err(fail) }
        })
        .await?;
        let rc = raw_conn.clone();
        let raw_rt = rate(settings, in_flight, move |_| {
            let rc = rc.clone();
            async move { raw::echo(&rc, 9).await }
        })
        .await?;
        rows.push(Row::rate(format!("round trips/s, {in_flight} in flight (ping, protocol only)"), hush_rt, raw_rt));
    }

    progress("durable sends");
    // A group of two on the server: alice sends, bob is online.
    let (_, bob_id, bob_member) = Member::generate().map_err(fail)?;
    let bob = Arc::new(Connection::connect(&address, &bob_id).await.map_err(fail)?);
    bob.register(None, bob_member.certificate()).await.map_err(fail)?;
    let mut pair = vec![alice_member, bob_member];
    let (group, _) = make_group(&ViaServer(vec![conn.clone(), bob.clone()]), &mut pair, &removal_key).await?;
    let alice = pair.first_mut().ok_or_else(|| BenchError("no member".into()))?;
    let messages = encrypt_many(alice, &group, settings.messages)?;
    let message_len = messages.first().map(Vec::len).unwrap_or(0);
    let c = conn.clone();
    let hush_sends = drain(messages, 64, move |m| {
        let c = c.clone();
        async move { c.send(m, None).await.map(|_| ()).map_err(fail) }
    })
    .await?;
    let batches = raw::sqlite_batches(dir.path(), message_len, 64, settings)?;
    rows.push(Row::rate(
        format!("durable sends/s, 64 in flight ({message_len} B MLS ciphertext)"),
        hush_sends,
        batches,
    ));

    progress("durable appends");
    let appends = durable_appends(dir.path(), settings).await?;
    rows.push(Row::rate("durable appends/s, store alone, 64 writers".into(), appends, batches));

    progress("send→push latency");
    let alice = pair.first_mut().ok_or_else(|| BenchError("no member".into()))?;
    let messages = encrypt_many(alice, &group, latency_samples(settings))?;
    // Fresh connections: the old ones stopped reading their push streams,
    // so the server has (rightly) dropped pushes for them and owes a Resync.
    conn.quic().close(VarInt::from_u32(0), b"");
    bob.quic().close(VarInt::from_u32(0), b"");
    let alice_conn = Arc::new(Connection::connect(&address, &id).await.map_err(fail)?);
    let bob_conn = Connection::connect(&address, &bob_id).await.map_err(fail)?;
    // A request answered means the session is online (it registers for
    // pushes before it serves requests): no push can miss it.
    for c in [&*alice_conn, &bob_conn] {
        c.call(&Request::Ping { nonce: 0 }).await.map_err(fail)?;
    }
    let c = alice_conn.clone();
    let readers = vec![alice_conn.quic().clone(), bob_conn.quic().clone()];
    let hush_lat = latency(readers, messages.clone(), settings.latency_rate, settings.strict, move |m| {
        let c = c.clone();
        async move { c.send(m, None).await.map(|(seq, _)| seq).map_err(fail) }
    })
    .await?;
    let relay = RawServer::start(Mode::Relay).await?;
    let (sender, receiver) = (relay.connection().await?, relay.connection().await?);
    let s = sender.clone();
    let raw_lat = latency(vec![sender, receiver], messages, settings.latency_rate, settings.strict, move |m| {
        let s = s.clone();
        async move { raw_seq(&s, &m).await }
    })
    .await?;
    let load = settings.latency_rate;
    rows.push(Row::cost(format!("send→push latency p50 (µs, {load} msg/s offered)"), hush_lat.0, raw_lat.0, "µs"));
    rows.push(Row::cost(format!("send→push latency p99 (µs, {load} msg/s offered)"), hush_lat.1, raw_lat.1, "µs"));
    relay.endpoint.close(VarInt::from_u32(0), b"done");

    progress("fan-out");
    let n = settings.group;
    let mut members = vec![];
    let mut conns = vec![];
    for _ in 0..n {
        let (_, mid, member) = Member::generate().map_err(fail)?;
        let c = Arc::new(Connection::connect(&address, &mid).await.map_err(fail)?);
        c.register(None, member.certificate()).await.map_err(fail)?;
        members.push(member);
        conns.push(c);
    }
    let (group, added_at) = make_group(&ViaServer(conns.clone()), &mut members, &removal_key).await?;
    let first = members.first_mut().ok_or_else(|| BenchError("no member".into()))?;
    let count = (settings.messages / 50).max(64);
    let messages = encrypt_many(first, &group, count)?;
    let sender = conns.first().cloned().ok_or_else(|| BenchError("no member".into()))?;
    let readers: Vec<_> = conns.iter().map(|c| c.quic().clone()).collect();
    let hush_fan = fan_out(readers, added_at, messages.clone(), settings.strict, move |m| {
        let s = sender.clone();
        async move { s.send(m, None).await.map(|(seq, _)| seq).map_err(fail) }
    })
    .await?;
    for c in conns {
        c.quic().close(VarInt::from_u32(0), b"");
    }
    let relay = RawServer::start(Mode::Relay).await?;
    let mut readers = vec![];
    for _ in 0..n {
        readers.push(relay.connection().await?);
    }
    let sender = readers.first().cloned().ok_or_else(|| BenchError("no connection".into()))?;
    let raw_fan = fan_out(readers.clone(), 0, messages, settings.strict, move |m| {
        let s = sender.clone();
        async move { raw_seq(&s, &m).await }
    })
    .await?;
    for c in readers {
        c.close(VarInt::from_u32(0), b"");
    }
    relay.endpoint.close(VarInt::from_u32(0), b"done");
    rows.push(Row::rate(format!("fan-out deliveries/s to {n} online members"), hush_fan, raw_fan));

    progress("hush as a process");
    rows.extend(cli_processes(&address, dir.path(), settings.cli_runs).await?);

    progress("bytes per message");
    let small = bytes_per_message(&dir.path().join("bytes-2.db"), 2, settings.messages / 10).await?;
    let large = bytes_per_message(&dir.path().join("bytes-n.db"), n, settings.messages / 10).await?;
    rows.push(Row::cost(format!("database bytes per message, group of {n} vs group of 2"), large, small, "B"));

    progress("commits");
    let commits = (settings.messages / 500).max(5);
    let (whole, check) = tokio::task::spawn_blocking(move || commit_cost(n, commits)).await.map_err(fail)??;
    rows.push(Row::cost(
        format!("GroupInfo check per commit vs the whole commit, core CPU, group of {n} (µs)"),
        check,
        whole,
        "µs",
    ));

    let _ = stop_tx.send(());
    let _ = serving.await;
    echo.endpoint.close(VarInt::from_u32(0), b"done");
    Ok(rows)
}

/// CPU the Delivery Service core spends accepting a commit (a member's
/// self-update) in a group of `size` devices, on the in-memory store (no
/// disk), and the part of it spent checking the commit's GroupInfo (group
/// repair), each averaged over `commits` commits. In µs.
pub fn commit_cost(size: usize, commits: usize) -> Result<(f64, f64), BenchError> {
    use crate::delivery::memory::MemoryStore;
    use crate::delivery::{mls, Delivery, Storage as _};
    let removal_key = Identity::generate().map_err(fail)?.public_key();
    let mut ds = Delivery::new(86_400, removal_key);
    let mut store = MemoryStore::default();
    let mut members = Vec::with_capacity(size);
    for _ in 0..size.max(2) {
        let (_, _, m) = Member::generate().map_err(fail)?;
        store.enrol(m.certificate());
        members.push(m);
    }
    let mut now = 1_000_000;
    let mut exec = |ds: &mut Delivery, store: &mut MemoryStore, m: &Member, request: Request| {
        now += 1;
        match ds.handle(store, Caller::of(m.certificate()), request, now).response {
            Response::Error { message, .. } => Err(BenchError(message)),
            r => Ok(r),
        }
    };
    for m in &members {
        let packages = m.key_packages(1).map_err(fail)?;
        exec(&mut ds, &mut store, m, Request::PublishKeyPackages { packages, last_resort: None })?;
    }
    let (first, rest) = members.split_first_mut().ok_or_else(|| BenchError("no members".into()))?;
    let g = first.create_group(&removal_key).map_err(fail)?;
    exec(&mut ds, &mut store, first, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree })?;
    let mut packages = vec![];
    for m in rest.iter() {
        if let Response::KeyPackages { packages: p } =
            exec(&mut ds, &mut store, first, Request::ClaimKeyPackage { account: m.account().0 })?
        {
            packages.extend(p.into_iter().map(|p| (m.account(), p)));
        }
    }
    let add = first.add(&g.id, &packages).map_err(fail)?;
    exec(&mut ds, &mut store, first, add.into_request())?;
    first.merge_pending(&g.id).map_err(fail)?;
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let (mut whole, mut check) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..commits {
        let commit = first.self_update(&g.id).map_err(fail)?;
        let info = commit.group_info.clone();
        let t = Instant::now();
        exec(&mut ds, &mut store, first, commit.into_request())?;
        whole += t.elapsed();
        first.merge_pending(&g.id).map_err(fail)?;
        // The check alone, on the state the commit produced.
        let state = store.group(&g.id).map_err(fail)?.ok_or_else(|| BenchError("no group".into()))?.state;
        let storage = mls::decode_state(&state).map_err(fail)?;
        let public = mls::PublicGroup::load(&storage, &openmls::prelude::GroupId::from_slice(&g.id))
            .map_err(|e| BenchError(format!("{e:?}")))?
            .ok_or_else(|| BenchError("no group state".into()))?;
        let t = Instant::now();
        mls::check_group_info(&crypto, &info, &public, openmls::prelude::LeafNodeIndex::new(0)).map_err(fail)?;
        check += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / commits.max(1) as f64;
    Ok((per(whole), per(check)))
}

/// A fresh temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Result<Self, BenchError> {
        let base = std::env::temp_dir().join(format!("hush-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).map_err(fail)?;
        Ok(Self(base))
    }
    fn path(&self) -> &Path {
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
async fn drain<T, F, Fut>(items: Vec<T>, workers: usize, op: F) -> Result<f64, BenchError>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
{
    let count = items.len();
    let queue = Arc::new(Mutex::new(items));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let queue = queue.clone();
        let op = op.clone();
        tasks.spawn(async move {
            loop {
                let next = queue.lock().map_err(fail)?.pop();
                let Some(item) = next else { return Ok::<(), BenchError>(()) };
                op(item).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(fail)??;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Somewhere to send requests as one of a group's members.
trait Exec {
    fn exec(&self, member: usize, request: Request) -> impl Future<Output = Result<Response, BenchError>> + Send;
}

/// Through a running server, one connection per member.
struct ViaServer(Vec<Arc<Connection>>);

impl Exec for ViaServer {
    async fn exec(&self, member: usize, request: Request) -> Result<Response, BenchError> {
        let c = self.0.get(member).ok_or_else(|| BenchError("no such member".into()))?;
        c.call(&request).await.map_err(fail)
    }
}

/// Straight into a store, as the server's sessions do.
struct ViaStore<'a> {
    store: &'a Engine,
    callers: Vec<Caller>,
}

impl Exec for ViaStore<'_> {
    async fn exec(&self, member: usize, request: Request) -> Result<Response, BenchError> {
        let caller = *self.callers.get(member).ok_or_else(|| BenchError("no such member".into()))?;
        match self.store.deliver(caller, request, now_unix()).await.map_err(fail)?.response {
            Response::Error { message, .. } => Err(BenchError(message)),
            other => Ok(other),
        }
    }
}

/// The first member creates a group and adds every other member in one
/// commit. Returns the group id and the commit's sequence number.
async fn make_group<E: Exec>(
    e: &E,
    members: &mut [Member],
    removal_key: &[u8; 32],
) -> Result<(Vec<u8>, u64), BenchError> {
    let (first, rest) = members.split_first_mut().ok_or_else(|| BenchError("no members".into()))?;
    for (i, m) in rest.iter().enumerate() {
        let packages = m.key_packages(1).map_err(fail)?;
        e.exec(i + 1, Request::PublishKeyPackages { packages, last_resort: None }).await?;
    }
    let g = first.create_group(removal_key).map_err(fail)?;
    e.exec(0, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }).await?;
    let mut packages = vec![];
    for m in rest.iter() {
        match e.exec(0, Request::ClaimKeyPackage { account: m.account().0 }).await? {
            Response::KeyPackages { packages: p } => packages.extend(p.into_iter().map(|p| (m.account(), p))),
            other => return Err(BenchError(format!("unexpected {} response", other.kind()))),
        }
    }
    if packages.is_empty() {
        return Ok((g.id, 0));
    }
    let commit = first.add(&g.id, &packages).map_err(fail)?;
    let seq = match e.exec(0, commit.into_request()).await? {
        Response::Accepted { seq, .. } => seq,
        other => return Err(BenchError(format!("unexpected {} response", other.kind()))),
    };
    first.merge_pending(&g.id).map_err(fail)?;
    Ok((g.id, seq))
}

fn encrypt_many(member: &mut Member, group: &[u8], count: usize) -> Result<Vec<Vec<u8>>, BenchError> {
    (0..count).map(|i| member.encrypt(group, format!("benchmark message {i:08}").as_bytes()).map_err(fail)).collect()
}

/// A store on its own database with two registered accounts in one group.
async fn store_with_group(path: &Path, size: usize) -> Result<(Engine, Vec<u8>, Member), BenchError> {
    let quotas = Quotas {
        max_log_per_group: u64::MAX,
        max_database_bytes: u64::MAX,
        invite_required: false,
        ..Quotas::default()
    };
    let removal_key = Identity::generate().map_err(fail)?.public_key();
    let store = Engine::open(path, quotas, removal_key).map_err(fail)?;
    let mut members = vec![];
    for _ in 0..size {
        let (_, _, member) = Member::generate().map_err(fail)?;
        let register = Request::Register { invite: None, certificate: member.certificate().encode() };
        match store.deliver(Origin::Stranger(member.device()), register, now_unix()).await.map_err(fail)?.response {
            Response::Registered { .. } => {}
            other => return Err(BenchError(format!("registration: unexpected {} response", other.kind()))),
        }
        members.push(member);
    }
    let via = ViaStore { store: &store, callers: members.iter().map(|m| Caller::of(m.certificate())).collect() };
    let (group, _) = make_group(&via, &mut members, &removal_key).await?;
    let first = members.into_iter().next().ok_or_else(|| BenchError("no member".into()))?;
    Ok((store, group, first))
}

/// Appends through hush's store (the writer thread, group commit, the
/// Delivery Service's checks), 64 requests in flight, no network.
pub async fn durable_appends(dir: &Path, settings: Settings) -> Result<f64, BenchError> {
    let (store, group, mut alice) = store_with_group(&dir.join("appends.db"), 2).await?;
    let messages = encrypt_many(&mut alice, &group, settings.messages)?;
    let account = Caller::of(alice.certificate());
    drain(messages, 64, move |m| {
        let store = store.clone();
        async move { store_send(&store, account, m).await }
    })
    .await
}

/// Wall time of `hush send` and `hush sync` as whole processes (what a
/// script or bot pays per command) against this run's server, next to
/// `hush whoami`: the same process start and state opening, no network.
/// Skipped (no rows) when the `hush` binary is not next to this one.
async fn cli_processes(address: &HushAddress, dir: &Path, runs: usize) -> Result<Vec<Row>, BenchError> {
    let Some(hush) = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("hush"))).filter(|p| p.exists())
    else {
        return Ok(vec![]);
    };
    let home = dir.join("cli-home");
    let address = address.to_string();
    tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| -> Result<(), BenchError> {
            let out = std::process::Command::new(&hush)
                .arg("--home")
                .arg(&home)
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(fail)?;
            if !out.status.success() {
                return Err(BenchError(format!("hush {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))));
            }
            Ok(())
        };
        let timed = |args: &[&str]| -> Result<f64, BenchError> {
            let start = Instant::now();
            for _ in 0..runs.max(1) {
                run(args)?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e3 / runs.max(1) as f64)
        };
        run(&["register", &address])?;
        run(&["group", "create", "bench"])?;
        let floor = timed(&["whoami"])?;
        let send = timed(&["send", "bench", "benchmark message"])?;
        let sync = timed(&["sync"])?;
        Ok(vec![
            Row::cost("hush send as a process (ms; baseline: hush whoami, no network)".into(), send, floor, "ms"),
            Row::cost("hush sync as a process (ms; baseline: hush whoami, no network)".into(), sync, floor, "ms"),
        ])
    })
    .await
    .map_err(fail)?
}

/// Sends one application message straight into `store`.
async fn store_send(store: &Engine, account: Caller, message: Vec<u8>) -> Result<(), BenchError> {
    match store.deliver(account, Request::Send { message, welcome: None, group_info: None }, now_unix()).await {
        Ok(o) if matches!(o.response, Response::Accepted { .. }) => Ok(()),
        Ok(o) => Err(BenchError(format!("unexpected {} response", o.response.kind()))),
        Err(e) => Err(fail(e)),
    }
}

/// Bytes the database grows by per application message in a group of
/// `size` members (real MLS ciphertexts, nobody acknowledging; WAL
/// checkpointed before measuring).
pub async fn bytes_per_message(path: &Path, size: usize, messages: usize) -> Result<f64, BenchError> {
    let (store, group, mut first) = store_with_group(path, size).await?;
    let size_of = || crate::store::maintenance::checkpointed_size(path).map_err(fail);
    let before = size_of()?;
    let account = Caller::of(first.certificate());
    let batch = encrypt_many(&mut first, &group, messages)?;
    let s = store.clone();
    drain(batch, 16, move |m| {
        let store = s.clone();
        async move { store_send(&store, account, m).await }
    })
    .await?;
    let after = size_of()?;
    // The database holds this one group.
    let stored = crate::store::maintenance::check(path).map_err(fail)?.messages;
    let expected = messages + usize::from(size > 1);
    if usize::try_from(stored).ok() != Some(expected) {
        return Err(BenchError(format!("{stored} messages stored, expected {expected}")));
    }
    Ok((after - before) as f64 / messages.max(1) as f64)
}

/// A raw relay request; the reply is the sequence number.
async fn raw_seq(c: &quinn::Connection, m: &[u8]) -> Result<u64, BenchError> {
    let reply = raw::request(c, m).await?;
    let bytes: [u8; 8] = reply.as_slice().try_into().map_err(fail)?;
    Ok(u64::from_be_bytes(bytes))
}

/// How long a receiver may wait for deliveries before the run is declared
/// broken (a dropped push would otherwise hang the benchmark).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends every message through `send` (32 in flight, at most two bursts
/// ahead of the slowest reader, so no push queue overflows) while every
/// connection in `readers` reads its push stream. Returns pushes delivered
/// per second. Pushes with a sequence number up to `after` are ignored.
async fn fan_out<F, Fut>(
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

fn latency_samples(settings: Settings) -> usize {
    let secs = settings.duration.as_secs_f64();
    ((f64::from(settings.latency_rate) * secs) as usize).max(50)
}

/// Offers messages at a fixed rate (each send its own task, so a slow
/// reply never delays the schedule) and records, per message, the time
/// from starting its send to its push arriving at the second reader. The
/// first reader (the sender's own connection) is drained. Returns (p50,
/// p99) in microseconds.
async fn latency<F, Fut>(
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
    let mut samples = loop {
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
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples.get(((samples.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    Ok((at(0.50), at(0.99)))
}

/// Resident memory of this process, KiB.
fn rss_kib() -> Result<f64, BenchError> {
    #[allow(clippy::cast_precision_loss)] // KiB of a process: far below 2^52.
    crate::util::rss_kib(None).map(|k| k as f64).ok_or_else(|| BenchError("no VmRSS in /proc/self/status".into()))
}

/// Opens `count` connections from `endpoint` (configuration and port from
/// `target(n)`), lets them settle, and returns the growth of this process's
/// resident memory per connection (client and server side, KiB) and the
/// connections, still open.
async fn idle_memory<F>(
    endpoint: &Endpoint,
    count: usize,
    target: F,
) -> Result<(f64, Vec<quinn::Connection>), BenchError>
where
    F: Fn(usize) -> Option<(quinn::ClientConfig, u16)>,
{
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib()?;
    let mut conns = Vec::with_capacity(count);
    for n in 0..count {
        let (config, port) = target(n).ok_or_else(|| BenchError("no client configuration".into()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let c = endpoint.connect_with(config, addr, "hush").map_err(fail)?.await.map_err(fail)?;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib()?;
    Ok(((after - before).max(0.0) / count.max(1) as f64, conns))
}

#[cfg(test)]
mod tests {
    /// Storage per message does not depend on the group's size (measured
    /// with the benchmark's own scenario, on real MLS ciphertexts).
    #[test]
    fn bytes_per_message_do_not_depend_on_group_size() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let measure = |name: &str, size: usize| {
            runtime.block_on(super::bytes_per_message(&dir.path().join(name), size, 600)).unwrap()
        };
        let two = measure("2.db", 2);
        let fifty = measure("50.db", 50);
        eprintln!("database bytes per message: group of 2: {two:.0}, group of 50: {fifty:.0}");
        assert!(fifty <= two * 1.1 && two <= fifty * 1.1, "2: {two}, 50: {fifty}");
    }
}

//! The scenarios that run against a real `hushd` on loopback, each next to
//! its baseline (raw quinn with the same TLS, or raw SQLite with the same
//! durability), and the group set-up they share.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Endpoint, VarInt};

use super::measure::{drain, drain_for, fan_out, idle_memory, latencies, latency, latency_samples, p50_p99, rate};
use super::plot::{Curve, Series};
use super::raw::{self, Mode, RawServer};
use super::{fail, BenchError, Row, Settings};
use crate::auth::{HushAddress, Identity};
use crate::client::mls::Member;
use crate::client::Connection;
use crate::wire::{Request, Response};

/// Somewhere to send requests as one of a group's members.
pub(super) trait Exec {
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

/// The first member creates a group and adds every other member in one
/// commit. Returns the group id and the commit's sequence number.
pub(super) async fn make_group<E: Exec>(
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

pub(super) fn encrypt_many(member: &mut Member, group: &[u8], count: usize) -> Result<Vec<Vec<u8>>, BenchError> {
    (0..count).map(|i| member.encrypt(group, format!("benchmark message {i:08}").as_bytes()).map_err(fail)).collect()
}

/// Wall time of `hush send` and `hush sync` as whole processes (what a
/// script or bot pays per command) against this run's server, next to
/// `hush whoami`: the same process start and state opening, no network.
/// Skipped (no rows) when the `hush` binary is not next to this one.
pub(super) async fn cli_processes(address: &HushAddress, dir: &Path, runs: usize) -> Result<Vec<Row>, BenchError> {
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
        let mut rows = vec![
            Row::cost("hush send as a process (ms; baseline: hush whoami, no network)".into(), send, floor, "ms"),
            Row::cost("hush sync as a process (ms; baseline: hush whoami, no network)".into(), sync, floor, "ms"),
        ];
        rows.extend(bots::rows(&hush, &home, &address, runs, send)?);
        Ok(rows)
    })
    .await
    .map_err(fail)?
}

/// What a bot gets from `hush daemon` (issue 36): messages sent through
/// one daemon connection against `hush send` processes, and how soon a
/// message reaches a daemon's client against `hush chat`.
mod bots {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};

    use super::super::{fail, BenchError, Row};

    /// Longest wait for one line or one notification.
    const WAIT: Duration = Duration::from_secs(30);

    struct Killed(Child);

    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn hush(bin: &Path, home: &Path, args: &[&str]) -> Result<String, BenchError> {
        let out = Command::new(bin).arg("--home").arg(home).args(args).stdin(Stdio::null()).output().map_err(fail)?;
        if !out.status.success() {
            return Err(BenchError(format!("hush {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn first_line(text: &str) -> String {
        text.lines().next().unwrap_or_default().trim().to_string()
    }

    /// Lines a child or socket writes, each with when it was read.
    fn lines(read: impl std::io::Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(read).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// The first line containing `needle`, and when it came.
    fn until(rx: &mpsc::Receiver<(Instant, String)>, needle: &str) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = rx.recv_timeout(left).map_err(|_| BenchError(format!("never saw {needle:?}")))?;
            if line.contains(needle) {
                return Ok(at);
            }
        }
    }

    fn daemon(bin: &Path, home: &Path, socket: &Path) -> Result<(Killed, UnixStream), BenchError> {
        let child = Command::new(bin)
            .arg("--home")
            .arg(home)
            .args(["daemon", "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(fail)?;
        let child = Killed(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(s) = UnixStream::connect(socket) {
                return Ok((child, s));
            }
            if Instant::now() > deadline {
                return Err(BenchError("hush daemon never listened".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn request(socket: &mut UnixStream, id: u64, method: &str, params: Value) -> Result<(), BenchError> {
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        socket.write_all(format!("{line}\n").as_bytes()).map_err(fail)
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    pub(super) fn rows(
        bin: &Path,
        home: &Path,
        address: &str,
        runs: usize,
        send_ms: f64,
    ) -> Result<Vec<Row>, BenchError> {
        let dir = home.parent().ok_or_else(|| BenchError("no directory".into()))?;
        let peer = dir.join("cli-peer");
        hush(bin, &peer, &["register", address])?;
        let (me, them) = (first_line(&hush(bin, home, &["whoami"])?), first_line(&hush(bin, &peer, &["whoami"])?));
        hush(bin, home, &["contact", "add", "peer", &them])?;
        hush(bin, &peer, &["contact", "add", "me", &me])?;
        hush(bin, home, &["group", "add", "bench", "peer"])?;
        hush(bin, &peer, &["sync"])?;

        // Notification latency, `hush chat` first: from the request that
        // sends to the line on the chat's output.
        let (mut sender, sent) = {
            let (child, socket) = daemon(bin, home, &dir.join("me.sock"))?;
            let replies = lines(socket.try_clone().map_err(fail)?);
            ((child, socket), replies)
        };
        let samples = runs.clamp(5, 50);
        let mut next = 0u64;
        let mut send_one = |text: &str| -> Result<Instant, BenchError> {
            next += 1;
            let at = Instant::now();
            request(&mut sender.1, next, "send", json!({"group": "bench", "text": text}))?;
            until(&sent, &format!("\"id\":{next},"))?;
            Ok(at)
        };
        let chat_latency = {
            let mut child = Command::new(bin)
                .arg("--home")
                .arg(&peer)
                .args(["chat", "bench"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(fail)?;
            let out = lines(child.stdout.take().ok_or_else(|| BenchError("no stdout".into()))?);
            let chat = Killed(child);
            send_one("warm-up chat")?;
            until(&out, "warm-up chat")?;
            let mut v = vec![];
            for i in 0..samples {
                let text = format!("to the chat {i}");
                let at = send_one(&text)?;
                v.push(until(&out, &text)?.duration_since(at).as_secs_f64() * 1e6);
            }
            drop(chat);
            median(v)
        };
        let daemon_latency = {
            let (_child, socket) = daemon(bin, &peer, &dir.join("peer.sock"))?;
            let out = lines(socket);
            send_one("warm-up daemon")?;
            until(&out, "warm-up daemon")?;
            let mut v = vec![];
            for i in 0..samples {
                let text = format!("to the daemon {i}");
                let at = send_one(&text)?;
                v.push(until(&out, &text)?.duration_since(at).as_secs_f64() * 1e6);
            }
            median(v)
        };

        // Messages through the daemon, one after the other on its one
        // connection, against one `hush send` process each.
        let count = (runs * 4).max(20);
        let start = Instant::now();
        for i in 0..count {
            send_one(&format!("through the daemon {i}"))?;
        }
        let daemon_rate = count as f64 / start.elapsed().as_secs_f64();
        let process_rate = 1e3 / send_ms;
        Ok(vec![
            Row::rate(
                "messages sent through hush daemon, one connection (msg/s; baseline: hush send processes)".into(),
                daemon_rate,
                process_rate,
            ),
            Row::cost(
                "message → daemon client notification, p50 (µs; baseline: → hush chat's output)".into(),
                daemon_latency,
                chat_latency,
                "µs",
            ),
        ])
    }
}

/// A raw relay request; the reply is the sequence number.
async fn raw_seq(c: &quinn::Connection, m: &[u8]) -> Result<u64, BenchError> {
    let reply = raw::request(c, m).await?;
    let bytes: [u8; 8] = reply.as_slice().try_into().map_err(fail)?;
    Ok(u64::from_be_bytes(bytes))
}

/// Identities registered on the server beforehand (so a scenario measures
/// connecting and authenticating, not registration).
pub(super) async fn registered(address: &HushAddress, count: usize) -> Result<Vec<Arc<Identity>>, BenchError> {
    let mut ids = vec![];
    for _ in 0..count {
        let (_, id, member) = Member::generate().map_err(fail)?;
        let c = Connection::connect(address, &id).await.map_err(fail)?;
        c.register(None, member.certificate()).await.map_err(fail)?;
        c.close().await;
        ids.push(Arc::new(id));
    }
    Ok(ids)
}

/// Memory per idle authenticated connection against the raw echo server's,
/// at each count of `settings.idle_steps`: the row at the largest, and the
/// curve. Run first, while the heap holds little that could be reused, with
/// both sets of connections held at once so neither reuses memory the
/// other freed.
pub(super) async fn idle_connections(
    settings: Settings,
    address: &HushAddress,
    ids: &[Arc<Identity>],
    echo: &RawServer,
) -> Result<(Row, Curve), BenchError> {
    let steps = settings.idle_steps;
    let configs = ids.iter().map(|i| raw::client_config(i, address.fingerprint)).collect::<Result<Vec<_>, _>>()?;
    let endpoint = Endpoint::client("127.0.0.1:0".parse().map_err(fail)?).map_err(fail)?;
    let raw_cfg = echo.client_config()?;
    let (raw_mem, raw_conns) = idle_memory(&endpoint, steps, |_| Some((raw_cfg.clone(), echo.address.port))).await?;
    let (hush_mem, hush_conns) =
        idle_memory(&endpoint, steps, |n| configs.get(n % configs.len().max(1)).cloned().map(|c| (c, address.port)))
            .await?;
    for c in raw_conns.iter().chain(&hush_conns) {
        c.close(VarInt::from_u32(0), b"");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    let (Some(&(k, hush)), Some(&(_, raw))) = (hush_mem.last(), raw_mem.last()) else {
        return Err(BenchError("no connection counts to measure at".into()));
    };
    let points = |m: &[(usize, f64)]| m.iter().map(|&(n, kib)| (n as f64, kib)).collect();
    let curve = Curve {
        file: "memory-per-connection.svg",
        title: "Memory per idle authenticated connection".into(),
        x_label: "idle connections held",
        y_label: "KiB per connection (client and server)",
        series: vec![
            Series { name: "hush".into(), points: points(&hush_mem) },
            Series { name: "raw quinn, same TLS".into(), points: points(&raw_mem) },
        ],
    };
    Ok((Row::cost(format!("memory per idle authenticated connection (KiB, {k} connections)"), hush, raw, "KiB"), curve))
}

/// Connect, authenticate with a key pair and make one request, 16 at once.
pub(super) async fn handshakes(
    settings: Settings,
    address: &HushAddress,
    ids: Vec<Arc<Identity>>,
    echo: &RawServer,
) -> Result<Row, BenchError> {
    let (a, ids) = (address.clone(), Arc::new(ids));
    let hush = rate(settings, 16, move |n| {
        let address = a.clone();
        let id = ids.get(n as usize % ids.len().max(1)).cloned();
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
    let raw = rate(settings, 16, move |_| {
        let raw = r.clone();
        async move { raw.connect_and_echo(9).await }
    })
    .await?;
    Ok(Row::rate("auth handshakes/s (16 concurrent)".into(), hush, raw))
}

/// Two registered members, alice and bob, each connected; later a group of
/// the two.
pub(super) struct Pair {
    pub alice_id: Identity,
    pub bob_id: Identity,
    /// alice, then bob.
    pub members: Vec<Member>,
    pub alice: Arc<Connection>,
    pub bob: Arc<Connection>,
    pub removal_key: [u8; 32],
    pub group: Vec<u8>,
}

impl Pair {
    pub async fn new(address: &HushAddress) -> Result<Self, BenchError> {
        let (_, alice_id, alice_member) = Member::generate().map_err(fail)?;
        let alice = Arc::new(Connection::connect(address, &alice_id).await.map_err(fail)?);
        alice.register(None, alice_member.certificate()).await.map_err(fail)?;
        let removal_key = alice.status().await.map_err(fail)?.removal_key;
        let (_, bob_id, bob_member) = Member::generate().map_err(fail)?;
        let bob = Arc::new(Connection::connect(address, &bob_id).await.map_err(fail)?);
        bob.register(None, bob_member.certificate()).await.map_err(fail)?;
        let mut members = vec![alice_member, bob_member];
        let via = ViaServer(vec![alice.clone(), bob.clone()]);
        let (group, _) = make_group(&via, &mut members, &removal_key).await?;
        Ok(Self { alice_id, bob_id, members, alice, bob, removal_key, group })
    }

    /// `count` application messages from alice.
    pub fn messages(&mut self, count: usize) -> Result<Vec<Vec<u8>>, BenchError> {
        let alice = self.members.first_mut().ok_or_else(|| BenchError("no member".into()))?;
        encrypt_many(alice, &self.group, count)
    }
}

/// Ping round trips (the protocol alone) against raw echo round trips.
pub(super) async fn round_trips(
    settings: Settings,
    pair: &Pair,
    raw_conn: &quinn::Connection,
    in_flight: usize,
) -> Result<Row, BenchError> {
    let c = pair.alice.clone();
    let hush = rate(settings, in_flight, move |n| {
        let c = c.clone();
        async move { c.call(&Request::Ping { nonce: n }).await.map(|_| ()).map_err(fail) }
    })
    .await?;
    let rc = raw_conn.clone();
    let raw = rate(settings, in_flight, move |_| {
        let rc = rc.clone();
        async move { raw::echo(&rc, 9).await }
    })
    .await?;
    Ok(Row::rate(format!("round trips/s, {in_flight} in flight (ping, protocol only)"), hush, raw))
}

/// What [`durable_sends`] measured.
pub(super) struct Sends {
    pub message_len: usize,
    /// Sends per second, 64 in flight.
    pub in_flight_64: f64,
    /// Sends per second, one at a time.
    pub in_flight_1: f64,
    /// Raw SQLite batches of 64 rows of the same size and durability, per
    /// second.
    pub sqlite: f64,
}

/// alice sends to the pair's group, bob online, 64 in flight and then one
/// at a time (for at most the configured duration); and raw SQLite
/// batches of the same size and durability.
pub(super) async fn durable_sends(settings: Settings, pair: &mut Pair, dir: &Path) -> Result<Sends, BenchError> {
    let (in_flight_64, message_len) = sends(pair, settings.messages, 64, None).await?;
    let (in_flight_1, _) = sends(pair, settings.messages / 4, 1, Some(settings.duration)).await?;
    let sqlite = raw::sqlite_batches(dir, message_len, 64, settings)?;
    Ok(Sends { message_len, in_flight_64, in_flight_1, sqlite })
}

/// Most operations each CPU measurement runs (enough seconds of work for
/// the 10 ms ticks the kernel counts CPU time in).
pub const CPU_OPS: usize = 20_000;

/// CPU µs (this process: server and client both) per durable send, 64 in
/// flight, against CPU µs per ping round trip, 64 in flight, plus CPU µs
/// per raw SQLite insert in 64-row batches: what a send costs beyond the
/// protocol and the insert it needs.
pub(super) async fn cpu_per_send(settings: Settings, pair: &mut Pair, dir: &Path) -> Result<Row, BenchError> {
    let n = settings.messages.min(CPU_OPS);
    let c = pair.alice.clone();
    let ping = super::measure::cpu_per_op(n, async move {
        drain((0..n as u64).collect(), 64, move |nonce| {
            let c = c.clone();
            async move { c.call(&Request::Ping { nonce }).await.map(|_| ()).map_err(fail) }
        })
        .await
        .map(drop)
    })
    .await?;
    // Encrypted before the clock starts: the client's MLS work is not the
    // server's.
    let messages = pair.messages(n)?;
    let len = messages.first().map(Vec::len).unwrap_or(0);
    let c = pair.alice.clone();
    let send = super::measure::cpu_per_op(n, async move {
        drain(messages, 64, move |m| {
            let c = c.clone();
            async move { c.send(m, None).await.map(|_| ()).map_err(fail) }
        })
        .await
        .map(drop)
    })
    .await?;
    let insert = raw::sqlite_insert_cpu(dir, len, 64, n).await?;
    Ok(Row::cost(
        format!(
            "CPU µs per durable send, 64 in flight (server and client; baseline: CPU per ping round trip {ping:.1} µs + per raw SQLite insert in 64-row batches {insert:.1} µs)"
        ),
        send,
        ping + insert,
        "µs",
    ))
}

/// alice sends `count` fresh messages to the pair's group, `in_flight` at
/// a time, stopping at `limit`. Returns sends per second and the size of
/// a message.
pub(super) async fn sends(
    pair: &mut Pair,
    count: usize,
    in_flight: usize,
    limit: Option<Duration>,
) -> Result<(f64, usize), BenchError> {
    let messages = pair.messages(count)?;
    let message_len = messages.first().map(Vec::len).unwrap_or(0);
    let c = pair.alice.clone();
    let rate = drain_for(messages, in_flight, limit, move |m| {
        let c = c.clone();
        async move { c.send(m, None).await.map(|_| ()).map_err(fail) }
    })
    .await?;
    Ok((rate, message_len))
}

/// Time from starting a send to the push arriving at the other member, at
/// a fixed offered load of `load` messages per second, against the raw
/// relay. p50 and p99.
pub(super) async fn push_latency(
    settings: Settings,
    address: &HushAddress,
    pair: &mut Pair,
    load: u32,
) -> Result<[Row; 2], BenchError> {
    let messages = pair.messages(latency_samples(settings, load))?;
    let hush = p50_p99(latency_of(settings, address, pair, load, messages.clone()).await?);
    let relay = RawServer::start(Mode::Relay).await?;
    let (sender, receiver) = (relay.connection().await?, relay.connection().await?);
    let s = sender.clone();
    let raw = latency(vec![sender, receiver], messages, load, settings.strict, move |m| {
        let s = s.clone();
        async move { raw_seq(&s, &m).await }
    })
    .await?;
    relay.endpoint.close(VarInt::from_u32(0), b"done");
    Ok([
        Row::cost(format!("send→push latency p50 (µs, {load} msg/s offered)"), hush.0, raw.0, "µs"),
        Row::cost(format!("send→push latency p99 (µs, {load} msg/s offered)"), hush.1, raw.1, "µs"),
    ])
}

/// The send→push time (µs) of each of `count` messages alice sends at
/// `load` msg/s on fresh connections, in no particular order.
pub(super) async fn pair_latencies(
    settings: Settings,
    address: &HushAddress,
    pair: &mut Pair,
    load: u32,
    count: usize,
) -> Result<Vec<f64>, BenchError> {
    let messages = pair.messages(count)?;
    latency_of(settings, address, pair, load, messages).await
}

/// alice sends `messages` at `load` msg/s on fresh connections; bob's
/// pushes time them.
async fn latency_of(
    settings: Settings,
    address: &HushAddress,
    pair: &mut Pair,
    load: u32,
    messages: Vec<Vec<u8>>,
) -> Result<Vec<f64>, BenchError> {
    // Fresh connections: the old ones stopped reading their push streams,
    // so the server has (rightly) dropped pushes for them and owes a Resync.
    pair.alice.quic().close(VarInt::from_u32(0), b"");
    pair.bob.quic().close(VarInt::from_u32(0), b"");
    let alice = Arc::new(Connection::connect(address, &pair.alice_id).await.map_err(fail)?);
    let bob = Arc::new(Connection::connect(address, &pair.bob_id).await.map_err(fail)?);
    // A request answered means the session is online (it registers for
    // pushes before it serves requests): no push can miss it.
    for c in [&alice, &bob] {
        c.call(&Request::Ping { nonce: 0 }).await.map_err(fail)?;
    }
    // The pair goes on with the fresh connections.
    pair.alice = alice.clone();
    pair.bob = bob.clone();
    let readers = vec![alice.quic().clone(), bob.quic().clone()];
    latencies(readers, messages, load, settings.strict, move |m| {
        let c = alice.clone();
        async move { c.send(m, None).await.map(|(seq, _)| seq).map_err(fail) }
    })
    .await
}

/// One member sends to a group of `settings.group`, all online, against
/// the raw relay pushing to as many connections.
pub(super) async fn group_fan_out(
    settings: Settings,
    address: &HushAddress,
    removal_key: &[u8; 32],
) -> Result<Row, BenchError> {
    let n = settings.group;
    let mut members = vec![];
    let mut conns = vec![];
    for _ in 0..n {
        let (_, mid, member) = Member::generate().map_err(fail)?;
        let c = Arc::new(Connection::connect(address, &mid).await.map_err(fail)?);
        c.register(None, member.certificate()).await.map_err(fail)?;
        members.push(member);
        conns.push(c);
    }
    let (group, added_at) = make_group(&ViaServer(conns.clone()), &mut members, removal_key).await?;
    let first = members.first_mut().ok_or_else(|| BenchError("no member".into()))?;
    // At least a second of deliveries in a full run: shorter runs on this
    // VM vary by a third from one run to the next.
    let count = (settings.messages / 20).max(64);
    let messages = encrypt_many(first, &group, count)?;
    let sender = conns.first().cloned().ok_or_else(|| BenchError("no member".into()))?;
    let readers: Vec<_> = conns.iter().map(|c| c.quic().clone()).collect();
    let hush = fan_out(readers, added_at, messages.clone(), settings.strict, move |m| {
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
    let raw = fan_out(readers.clone(), 0, messages, settings.strict, move |m| {
        let s = sender.clone();
        async move { raw_seq(&s, &m).await }
    })
    .await?;
    for c in readers {
        c.close(VarInt::from_u32(0), b"");
    }
    relay.endpoint.close(VarInt::from_u32(0), b"done");
    Ok(Row::rate(format!("fan-out deliveries/s to {n} online members"), hush, raw))
}

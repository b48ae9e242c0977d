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
//!
//! Layout: `scenarios` against a running server, `store` without the
//! network, `measure` how both are measured, `raw` the baselines.

mod chain;
mod files;
mod large;
mod measure;
pub mod plot;
mod postgres;
mod raw;
mod scenarios;
mod slow;
mod store;

use std::path::Path;
use std::time::Duration;

use quinn::VarInt;

use crate::config::ServerConfig;
use crate::server::Server;
use raw::{Mode, RawServer};
pub use store::{bytes_per_message, commit_cost, durable_appends};

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

    /// hush / baseline, when the baseline is a positive number. A row that
    /// reports a measured difference (what a quiet server adds, say) can
    /// measure zero or less on a loaded machine: it then has no ratio.
    pub fn ratio(&self) -> Option<f64> {
        (self.baseline > 0.0 && self.hush.is_finite()).then(|| self.hush / self.baseline)
    }
}

/// What a run measured: the table and the growth curves.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub curves: Vec<plot::Curve>,
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
    /// Idle connections held for the memory measurement, at each count in
    /// turn (ascending; the row is the last).
    pub idle_steps: &'static [usize],
    /// Offered load of the busy latency scenario, messages per second.
    pub latency_rate: u32,
    /// Offered load of the quiet latency scenario, messages per second.
    pub idle_rate: u32,
    /// Further offered loads the latency curve is measured at.
    pub curve_rates: &'static [u32],
    /// Messages in the large history whose newest page is fetched.
    pub history: usize,
    /// Fewest messages a latency scenario sends (a p99 needs some).
    pub min_latency_samples: usize,
    /// Runs of each `hush` command timed as a whole process.
    pub cli_runs: usize,
    /// Size of the file the file rows move, MiB.
    pub file_mib: u64,
    /// Rounds of each file transfer (medians are compared), and uploads
    /// run at once for the memory row.
    pub file_rounds: usize,
    pub file_uploads: usize,
    /// Group sizes whose commit cost is measured (the growth curve).
    pub commit_sizes: &'static [usize],
    /// Devices in the large group that commits while a small one chats.
    pub large_group: usize,
    /// Commits the large group has ready (it stops when they run out).
    pub large_commits: usize,
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
            idle_steps: &[1000, 2500, 5000, 10_000],
            latency_rate: 1000,
            idle_rate: 10,
            curve_rates: &[100, 300, 3000],
            history: 1_000_000,
            min_latency_samples: 100,
            cli_runs: 50,
            file_mib: 256,
            file_rounds: 3,
            file_uploads: 8,
            commit_sizes: &[10, 30, 100, 300, 1000],
            large_group: large::LARGE_GROUP,
            large_commits: 400,
            strict: true,
        }
    }
    /// A few seconds: checks that every scenario works, judges nothing.
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_millis(300),
            messages: 1_000,
            group: 8,
            idle_steps: &[50, 100],
            latency_rate: 500,
            idle_rate: 10,
            curve_rates: &[],
            history: 5_000,
            min_latency_samples: 10,
            cli_runs: 3,
            file_mib: 8,
            file_rounds: 1,
            file_uploads: 2,
            commit_sizes: &[10, 100, 1000],
            large_group: large::LARGE_GROUP,
            large_commits: 3,
            strict: false,
        }
    }
}

/// The server's settings for the benchmark: measure the server, not its
/// rate limiter or connection caps.
pub(super) fn bench_config() -> Result<ServerConfig, BenchError> {
    Ok(ServerConfig {
        listen: "127.0.0.1:0".parse().map_err(fail)?,
        open_registration: true,
        requests_per_second_per_account: 1_000_000,
        requests_per_second_per_ip: 1_000_000,
        max_connections: 100_000,
        max_connections_per_ip: 100_000,
        max_unregistered_per_ip: 100_000,
        max_unregistered: 100_000,
        max_streams_per_connection: 256,
        max_log_per_group: 1_000_000_000,
        storage_quota_mb: 1 << 30,
        uploads_per_device: 64,
        ..ServerConfig::default()
    })
}

/// The scenario groups `hushd bench --only` can pick, in running order.
pub const SCENARIOS: &[&str] = &[
    "memory",
    "handshakes",
    "round-trips",
    "durable",
    "chain",
    "slow-disk",
    "latency",
    "fan-out",
    "cli",
    "bytes",
    "commits",
    "large-groups",
    "files",
    "postgres",
];

/// Runs the scenario groups named in `only` (every one if it is empty);
/// `progress` hears the name of each scenario before it starts.
pub async fn run(settings: Settings, only: &[String], progress: impl Fn(&str)) -> Result<Report, BenchError> {
    if let Some(unknown) = only.iter().find(|o| !SCENARIOS.contains(&o.as_str())) {
        return Err(BenchError(format!("no scenario {unknown:?}; there are: {}", SCENARIOS.join(", "))));
    }
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let dir = TempDir::new()?;
    let config = bench_config()?;
    let server = Server::bind(config.clone(), &dir.path().join("server")).map_err(fail)?;
    let address = server.address().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let echo = RawServer::start(Mode::Echo).await?;
    let mut rows = vec![];
    let mut curves = vec![];

    if wanted("memory") || wanted("handshakes") {
        progress("handshakes");
        let ids = scenarios::registered(&address, 16).await?;
        if wanted("memory") {
            progress("memory per idle connection");
            let (row, curve) = scenarios::idle_connections(settings, &address, &ids, &echo).await?;
            rows.push(row);
            curves.push(curve);
        }
        if wanted("handshakes") {
            rows.push(scenarios::handshakes(settings, &address, ids, &echo).await?);
        }
    }

    let mut pair = scenarios::Pair::new(&address).await?;
    let raw_conn = echo.connection().await?;
    // Raw quinn round trips at 64 in flight: a row of its own and the
    // ceiling durable sends are compared with.
    let mut raw_64 = None;
    if wanted("round-trips") || wanted("durable") {
        for in_flight in [1usize, 64] {
            progress(&format!("round trips, {in_flight} in flight"));
            let row = scenarios::round_trips(settings, &pair, &raw_conn, in_flight).await?;
            if in_flight == 64 {
                raw_64 = Some(row.baseline);
            }
            if wanted("round-trips") {
                rows.push(row);
            }
        }
    }

    let mut fast = None;
    if wanted("durable") || wanted("slow-disk") {
        progress("durable sends");
        let sends = scenarios::durable_sends(settings, &mut pair, dir.path()).await?;
        fast = Some((sends.in_flight_64, sends.in_flight_1));
        if wanted("durable") {
            let s = &sends;
            rows.push(Row::rate(
                format!("durable sends/s, 64 in flight ({} B MLS ciphertext; baseline: raw SQLite)", s.message_len),
                s.in_flight_64,
                s.sqlite,
            ));
            if let Some(raw) = raw_64 {
                rows.push(Row::rate(
                    "durable sends/s, 64 in flight (baseline: raw quinn round trips, 64 in flight)".into(),
                    s.in_flight_64,
                    raw,
                ));
            }
            progress("CPU per durable send");
            rows.push(scenarios::cpu_per_send(settings, &mut pair, dir.path()).await?);
            progress("durable appends");
            let appends = durable_appends(dir.path(), settings).await?;
            rows.push(Row::rate("durable appends/s, store alone, 64 writers".into(), appends, s.sqlite));
        }
    }
    if wanted("chain") {
        progress("what the delivery chain costs");
        rows.extend(chain::chain_cost(settings, dir.path()).await?);
    }
    if let (true, Some((fast_64, fast_1))) = (wanted("slow-disk"), fast) {
        progress("durable sends on a slow disk");
        rows.extend(slow::durable_sends(settings, dir.path(), fast_64, fast_1).await?);
    }

    if wanted("latency") {
        let mut p50 = vec![];
        let mut loads: Vec<u32> = [settings.idle_rate, settings.latency_rate]
            .into_iter()
            .chain(settings.curve_rates.iter().copied())
            .collect();
        loads.sort_unstable();
        loads.dedup();
        let mut series: Vec<plot::Series> =
            ["hush p50", "hush p99", "raw relay p50", "raw relay p99"].into_iter().map(plot::Series::new).collect();
        for load in loads {
            progress(&format!("send→push latency at {load} msg/s"));
            let measured = scenarios::push_latency(settings, &address, &mut pair, load).await?;
            let x = f64::from(load);
            for (s, y) in
                series.iter_mut().zip([measured[0].hush, measured[1].hush, measured[0].baseline, measured[1].baseline])
            {
                s.points.push((x, y));
            }
            if load == settings.idle_rate || load == settings.latency_rate {
                p50.push((measured[0].hush, measured[0].baseline));
                rows.extend(measured);
            }
        }
        curves.push(plot::Curve {
            file: "latency-by-load.svg",
            title: "Send→push latency, group of 2, by offered load".into(),
            x_label: "messages per second offered",
            y_label: "µs from send to push",
            series,
        });
        // #20's bound for a quiet server: its p50 at most the busy p50
        // plus one flush, the flush measured at the quiet pace on this
        // disk (a disk idle for a while may flush more slowly).
        progress("one flush at the quiet pace");
        let (quiet, busy) = (settings.idle_rate, settings.latency_rate);
        let path = dir.path().to_owned();
        let samples = (settings.min_latency_samples / 2).max(5);
        let flush = tokio::task::spawn_blocking(move || raw::sqlite_commit_p50(&path, 334, quiet, samples))
            .await
            .map_err(fail)??;
        if let [(quiet_p50, raw_quiet), (busy_p50, raw_busy)] = p50[..] {
            rows.push(Row::cost(
                format!("send→push p50 at {quiet} msg/s (µs; baseline: p50 at {busy} msg/s + one raw SQLite commit at {quiet}/s, {flush:.0} µs)"),
                quiet_p50,
                busy_p50 + flush,
                "µs",
            ));
            // The wire itself is slower on a quiet machine (sleeping CPUs
            // wake late): what quiet adds to hush, against what it adds to
            // the raw relay plus that one flush.
            rows.push(Row::cost(
                format!("what quiet adds to send→push p50, {quiet} vs {busy} msg/s (µs; baseline: what it adds to the raw relay + one raw SQLite commit at {quiet}/s)"),
                // Differences as measured: on a loaded machine either can
                // be zero or negative (the row then has no ratio).
                quiet_p50 - busy_p50,
                raw_quiet - raw_busy + flush,
                "µs",
            ));
        }
    }

    if wanted("fan-out") {
        progress("fan-out");
        rows.push(scenarios::group_fan_out(settings, &address, &pair.removal_key).await?);
    }

    if wanted("cli") {
        progress("hush as a process");
        rows.extend(scenarios::cli_processes(&address, dir.path(), settings.cli_runs).await?);
    }

    let n = settings.group;
    if wanted("bytes") {
        progress("bytes per message");
        let small = bytes_per_message(&dir.path().join("bytes-2.db"), 2, settings.messages / 10).await?;
        let large = bytes_per_message(&dir.path().join("bytes-n.db"), n, settings.messages / 10).await?;
        rows.push(Row::cost(format!("database bytes per message, group of {n} vs group of 2"), large, small, "B"));
    }

    if wanted("files") {
        progress("files");
        let files_dir = dir.path().join("files");
        std::fs::create_dir_all(&files_dir).map_err(fail)?;
        rows.extend(files::file_rows(&pair, &address, &files_dir, settings).await?);
    }

    if wanted("commits") {
        progress("commits");
        let commits = (settings.messages / 500).max(5);
        let classic = tokio::task::spawn_blocking(move || commit_cost(n, commits, crate::mls::Suite::Classic))
            .await
            .map_err(fail)??;
        rows.push(Row::cost(
            format!("GroupInfo check per commit vs the whole commit, core CPU, group of {n} (µs)"),
            classic.check_us,
            classic.whole_us,
            "µs",
        ));
        progress("post-quantum commits");
        let pq = tokio::task::spawn_blocking(move || commit_cost(n, commits, crate::mls::Suite::Pq))
            .await
            .map_err(fail)??;
        rows.push(Row::cost(
            format!("server CPU per commit, post-quantum vs classic group of {n} (µs)"),
            pq.whole_us,
            classic.whole_us,
            "µs",
        ));
        rows.push(Row::cost(
            format!("commit (self-update) size, post-quantum vs classic group of {n} (bytes)"),
            pq.commit_bytes,
            classic.commit_bytes,
            "B",
        ));
        rows.push(Row::cost(
            format!("Welcome adding one device, post-quantum vs classic group of {n} (bytes)"),
            pq.welcome_bytes,
            classic.welcome_bytes,
            "B",
        ));
    }

    if wanted("large-groups") {
        let commits = (settings.messages / 2000).max(2);
        let (mut hush, mut openmls) = (
            plot::Series::new("hush (every rule, encoded state)"),
            plot::Series::new("raw openmls (decode, verify, merge)"),
        );
        for &size in settings.commit_sizes {
            progress(&format!("commit cost, group of {size}"));
            let cost = tokio::task::spawn_blocking(move || commit_cost(size, commits, crate::mls::Suite::Classic))
                .await
                .map_err(fail)??;
            rows.push(Row::cost(
                format!("server CPU per commit, group of {size} (µs; baseline: raw openmls verifying the same commit)"),
                cost.whole_us,
                cost.openmls_us,
                "µs",
            ));
            hush.points.push((size as f64, cost.whole_us));
            openmls.points.push((size as f64, cost.openmls_us));
        }
        curves.push(plot::Curve {
            file: "commit-cost.svg",
            title: "Server CPU per commit (a self-update), by group size".into(),
            x_label: "devices in the group",
            y_label: "µs of CPU per commit",
            series: vec![hush, openmls],
        });
        progress("the newest page of a long history");
        let long = settings.history;
        let big = store::newest_page(&dir.path().join("history-long.db"), long).await?;
        let small = store::newest_page(&dir.path().join("history-short.db"), 100).await?;
        rows.push(Row::cost(
            format!("fetch of the newest 100 messages, group holding {long} (µs p50; baseline: group holding 100)"),
            big,
            small,
            "µs",
        ));
        progress(&format!("a group of {} committing while a group of 2 chats", settings.large_group));
        rows.extend(large::stall(settings, &address, &mut pair, settings.large_group).await?);
    }

    let _ = stop_tx.send(());
    let _ = serving.await;
    echo.endpoint.close(VarInt::from_u32(0), b"done");

    if wanted("postgres") {
        progress("durable sends on PostgreSQL");
        match postgres::durable_sends(settings, config, dir.path()).await? {
            Ok(pg) => rows.extend(pg),
            Err(why) => tracing::warn!("PostgreSQL rows skipped: {why}"),
        }
    }
    Ok(Report { rows, curves })
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

#[cfg(test)]
mod tests {
    use super::Row;

    #[test]
    fn a_difference_of_zero_or_less_has_no_ratio_and_is_reported_as_measured() {
        let row = |hush, baseline| Row::cost("d".into(), hush, baseline, "µs");
        assert_eq!(row(3.0, 2.0).ratio(), Some(1.5));
        assert_eq!(row(0.0, 2.0).ratio(), Some(0.0));
        assert_eq!(row(-4.0, 2.0).ratio(), Some(-2.0));
        assert_eq!(row(5.0, 0.0).ratio(), None);
        assert_eq!(row(5.0, -1.0).ratio(), None);
        assert_eq!(row(f64::NAN, 1.0).ratio(), None);
    }
}

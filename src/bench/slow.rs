//! A slower disk under a real server.
//!
//! This machine's disk makes a commit durable in well under a millisecond;
//! ordinary servers' disks take 0.5–5 ms. [`SlowFlush`] wraps the engine's
//! writing connection and holds the writer thread for [`FLUSH_DELAY`] after
//! every commit, before the commit returns, which is what a slower fsync
//! does: the requests of that batch are acknowledged only afterwards, and
//! requests arriving meanwhile wait in the writer's queue. (A sleep, not a
//! real device: it costs no CPU, where a real flush costs a little; the
//! kernel's timer slack adds some 50–100 µs to each.)

use std::path::Path;
use std::time::Duration;

use super::scenarios::{sends, Pair};
use super::{bench_config, fail, BenchError, Row, Settings};
use crate::db::sqlite::Db;
use crate::delivery::storage::Backend;
use crate::server::engine::Engine;
use crate::server::Server;

/// How much longer every durable commit takes.
pub const FLUSH_DELAY: Duration = Duration::from_millis(2);

/// A [`Backend`] whose commits take [`FLUSH_DELAY`] longer.
struct SlowFlush<B>(B);

impl<B: Backend> Backend for SlowFlush<B> {
    type Error = B::Error;
    type Unit<'a>
        = B::Unit<'a>
    where
        Self: 'a;

    fn write<T>(&mut self, work: impl FnOnce(&mut Self::Unit<'_>) -> Result<T, Self::Error>) -> Result<T, Self::Error> {
        let out = self.0.write(work)?;
        std::thread::sleep(FLUSH_DELAY);
        Ok(out)
    }

    fn read<T>(&mut self, work: impl FnOnce(&mut Self::Unit<'_>) -> T) -> Result<T, Self::Error> {
        self.0.read(work)
    }
}

/// Durable sends, 64 in flight and one at a time, through a server whose
/// commits take [`FLUSH_DELAY`] longer, against the same on this disk
/// (`fast_64`, `fast_1`, measured in the same run).
pub(super) async fn durable_sends(
    settings: Settings,
    dir: &Path,
    fast_64: f64,
    fast_1: f64,
) -> Result<Vec<Row>, BenchError> {
    let server = Server::bind_with_engine(bench_config()?, &dir.join("slow-server"), |path, quotas, keys| {
        // The reader never commits: wrapping it changes nothing.
        Engine::start(SlowFlush(Db::open(path)?), SlowFlush(Db::open(path)?), quotas, keys)
    })
    .map_err(fail)?;
    let address = server.address().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let mut pair = Pair::new(&address).await?;
    let limit = Some(settings.duration * 2);
    let (slow_64, _) = sends(&mut pair, settings.messages / 2, 64, limit).await?;
    let (slow_1, _) = sends(&mut pair, settings.messages / 20, 1, limit).await?;
    pair.alice.quic().close(quinn::VarInt::from_u32(0), b"");
    pair.bob.quic().close(quinn::VarInt::from_u32(0), b"");
    let _ = stop_tx.send(());
    let _ = serving.await;
    let ms = FLUSH_DELAY.as_secs_f64() * 1e3;
    Ok(vec![
        Row::rate(
            format!("durable sends/s, 64 in flight, every flush {ms} ms slower (baseline: this disk)"),
            slow_64,
            fast_64,
        ),
        Row::rate(
            format!("durable sends/s, 1 in flight, every flush {ms} ms slower (baseline: this disk)"),
            slow_1,
            fast_1,
        ),
    ])
}

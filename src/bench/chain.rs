//! What verifiable delivery costs the server: durable sends through a
//! server whose store keeps each group's chain against one whose store
//! does not (the same code as before the chain: [`Db::open_unchained`]),
//! measured alternately in one run so both see the same machine; and the
//! bytes the chain adds to each stored message.

use std::path::Path;

use super::scenarios::{sends, Pair};
use super::store::{bytes_per_message_with, durable_appends_on};
use super::{bench_config, fail, BenchError, Row, Settings};
use crate::db::sqlite::Db;
use crate::server::engine::Engine;
use crate::server::Server;

/// Measurements of each kind; their medians are compared (the order
/// alternates, so a machine that slows down or speeds up during the run
/// weighs on both).
const ROUNDS: usize = 3;

/// Durable sends/s, 64 in flight, through a fresh server on `dir` whose
/// store keeps the chain or not.
async fn sends_through(settings: Settings, dir: &Path, chained: bool) -> Result<f64, BenchError> {
    let server = Server::bind_with_engine(bench_config()?, dir, |path, quotas, keys| {
        let open = if chained { Db::open } else { Db::open_unchained };
        Engine::start(open(path)?, open(path)?, quotas, keys)
    })
    .map_err(fail)?;
    let address = server.address().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let mut pair = Pair::new(&address).await?;
    let (rate, _) = sends(&mut pair, settings.messages / 2, 64, Some(settings.duration * 2)).await?;
    pair.alice.quic().close(quinn::VarInt::from_u32(0), b"");
    pair.bob.quic().close(quinn::VarInt::from_u32(0), b"");
    let _ = stop_tx.send(());
    let _ = serving.await;
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The chain's rows.
pub(super) async fn chain_cost(settings: Settings, dir: &Path) -> Result<Vec<Row>, BenchError> {
    let (mut with, mut without) = (vec![], vec![]);
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for chained in order {
            let rate = sends_through(settings, &dir.join(format!("chain-{round}-{chained}")), chained).await?;
            if chained {
                with.push(rate)
            } else {
                without.push(rate)
            }
        }
    }
    // The store alone (no network, 64 writers): what the chain costs the
    // writer, with less noise from the rest of the machine.
    let (mut appends_with, mut appends_without) = (vec![], vec![]);
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for chained in order {
            let path = dir.join(format!("chain-appends-{round}-{chained}.db"));
            let rate = durable_appends_on(&path, settings, chained).await?;
            if chained {
                appends_with.push(rate)
            } else {
                appends_without.push(rate)
            }
        }
    }
    let messages = settings.messages / 10;
    let bytes_with = bytes_per_message_with(&dir.join("chain-bytes-on.db"), 2, messages, true).await?;
    let bytes_without = bytes_per_message_with(&dir.join("chain-bytes-off.db"), 2, messages, false).await?;
    Ok(vec![
        Row::rate(
            format!(
                "durable sends/s, 64 in flight, with the delivery chain (baseline: the same store without it; medians of {ROUNDS}, alternated)"
            ),
            median(with),
            median(without),
        ),
        Row::rate(
            format!(
                "durable appends/s, store alone, 64 writers, with the delivery chain (baseline: without it; medians of {ROUNDS}, alternated)"
            ),
            median(appends_with),
            median(appends_without),
        ),
        Row::cost(
            "database bytes per message with the delivery chain (baseline: without it)".into(),
            bytes_with,
            bytes_without,
            "B",
        ),
    ])
}

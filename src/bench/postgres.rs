//! Durable sends on PostgreSQL: one node, two nodes on one database, and
//! raw PostgreSQL batched inserts of the same rows with the same
//! durability (`synchronous_commit = on`, fsync on), on a throwaway
//! cluster from the machine's binaries. Skipped, with a line saying why,
//! where the machine has none.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::measure::drain;
use super::scenarios::Pair;
use super::{fail, BenchError, Row, Settings};
use crate::client::Connection;
use crate::config::{DatabaseUrl, ServerConfig};
use crate::db::pg::cluster::{Cluster, ClusterError};
use crate::server::Server;

/// The PostgreSQL rows, or none (and why) without PostgreSQL binaries.
pub(super) async fn durable_sends(
    settings: Settings,
    config: ServerConfig,
    dir: &Path,
) -> Result<Result<Vec<Row>, String>, BenchError> {
    let cluster = match Cluster::start(true) {
        Ok(c) => c,
        Err(e @ ClusterError::Missing) => return Ok(Err(e.to_string())),
        Err(e) => return Err(fail(e)),
    };
    let url = cluster.database().map_err(fail)?;
    let config = ServerConfig { database_url: Some(DatabaseUrl(url.clone())), ..config };
    let (one, two) = (dir.join("pg-node1"), dir.join("pg-node2"));
    let first = Server::bind(config.clone(), &one).map_err(fail)?;
    std::fs::create_dir_all(&two).map_err(fail)?;
    for key in [crate::server::KEY_FILE, crate::server::REMOVAL_KEY_FILE] {
        std::fs::copy(one.join(key), two.join(key)).map_err(fail)?;
    }
    let second = Server::bind(config, &two).map_err(fail)?;
    let addresses = [first.address().clone(), second.address().clone()];
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut serving = vec![];
    for server in [first, second] {
        let mut stop = stop_rx.clone();
        serving.push(tokio::spawn(server.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let [address1, address2] = &addresses;

    let mut pair = Pair::new(address1).await?;
    let messages = pair.messages(settings.messages)?;
    let len = messages.first().map(Vec::len).unwrap_or(0);
    let c = pair.alice.clone();
    let one_node = drain(messages, 64, move |m| {
        let c = c.clone();
        async move { c.send(m, None).await.map(|_| ()).map_err(fail) }
    })
    .await?;

    // The same device on both nodes, the requests spread evenly.
    let other = Arc::new(Connection::connect(address2, &pair.alice_id).await.map_err(fail)?);
    let conns = [pair.alice.clone(), other];
    let next = Arc::new(AtomicUsize::new(0));
    let messages = pair.messages(settings.messages)?;
    let two_nodes = drain(messages, 64, move |m| {
        let [a, b] = &conns;
        let c = if next.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) { a.clone() } else { b.clone() };
        async move { c.send(m, None).await.map(|_| ()).map_err(fail) }
    })
    .await?;

    let raw_url = cluster.database().map_err(fail)?;
    let raw = crate::db::pg::off_runtime(|| raw_batches(&raw_url, len, 64, settings))?;

    let _ = stop_tx.send(true);
    for s in serving {
        let _ = s.await;
    }
    drop(cluster);
    Ok(Ok(vec![
        Row::rate(format!("durable sends/s on PostgreSQL, one node, 64 in flight ({len} B)"), one_node, raw),
        Row::rate(format!("durable sends/s on PostgreSQL, two nodes, 64 in flight ({len} B)"), two_nodes, raw),
    ]))
}

/// Rows of `len` bytes inserted in transactions of `batch` rows (one
/// statement each, as hush's writer issues them) on one connection.
fn raw_batches(url: &str, len: usize, batch: usize, settings: Settings) -> Result<f64, BenchError> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).map_err(fail)?;
    client
        .batch_execute("CREATE TABLE log (gid bigint, seq bigint, data bytea NOT NULL, PRIMARY KEY (gid, seq))")
        .map_err(fail)?;
    let insert = client.prepare("INSERT INTO log (gid, seq, data) VALUES (1, $1, $2)").map_err(fail)?;
    let row = vec![0x5au8; len];
    let start = Instant::now();
    let mut seq = 0i64;
    while start.elapsed() < settings.duration {
        let mut tx = client.transaction().map_err(fail)?;
        for _ in 0..batch {
            seq += 1;
            tx.execute(&insert, &[&seq, &row]).map_err(fail)?;
        }
        tx.commit().map_err(fail)?;
    }
    Ok(seq as f64 / start.elapsed().as_secs_f64())
}

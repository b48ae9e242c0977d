//! What sharing a file costs (issue 32): a file's upload and download
//! through hush (client encryption, the blob store, the durable write)
//! against raw quinn moving the same bytes with the same TLS
//! configuration, and against a raw durable write of the same bytes to the
//! same disk; and the process's memory while 8 uploads run at once.

use std::path::Path;
use std::time::Instant;

use super::raw::{Mode, RawServer};
use super::scenarios::Pair;
use super::{fail, BenchError, Row};
use crate::auth::HushAddress;
use crate::client::app::files::{upload_from, Quiet, Source};
use crate::client::Connection;
use crate::files::{open_chunk, FileKey, Layout, TAG};
use crate::limits::{BLOB_IO_BUFFER, BLOB_SYNC_EVERY};
use crate::wire::Response;

const MIB: f64 = 1024.0 * 1024.0;

/// Times an upload is resumed after a stall before the bench gives up.
const RESUMES: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Uploads the file at `path` to `group` on `conn`; returns its blob id.
async fn upload(conn: &Connection, group: &[u8], path: &Path, size: u64) -> Result<([u8; 16], FileKey), BenchError> {
    let layout = Layout::of_size(size).ok_or_else(|| BenchError("file too large".into()))?;
    let key = FileKey::random().map_err(fail)?;
    let mut state = conn.upload_open(group, layout.blob).await.map_err(fail)?;
    // As `hush send` does: a stream that stalls (a loaded machine, a slow
    // flush) is resumed where the server holds bytes, a few times.
    for _ in 0..RESUMES {
        match upload_from(conn, Source::Path(path), &key, layout, &state, &mut Quiet).await {
            Ok(Some(_)) => return Ok((state.id, key)),
            Ok(None) | Err(crate::client::app::AppError::Client(crate::client::ClientError::Timeout(_))) => {
                state = conn.upload_status(state.id).await.map_err(fail)?;
            }
            Err(crate::client::app::AppError::Client(crate::client::ClientError::Server {
                code: crate::wire::ErrorCode::RateLimited,
                ..
            })) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                state = conn.upload_status(state.id).await.map_err(fail)?;
            }
            Err(e) => return Err(fail(e)),
        }
    }
    Err(BenchError("the upload kept stalling".into()))
}

/// Downloads and checks blob `id` (a file of `size` bytes under `key`).
async fn download(conn: &Connection, id: [u8; 16], key: &FileKey, size: u64) -> Result<(), BenchError> {
    let layout = Layout::of_size(size).ok_or_else(|| BenchError("file too large".into()))?;
    let (head, mut recv) = conn.download(id, 0, 0).await.map_err(fail)?;
    let Response::Blob { hash, .. } = head else { return Err(BenchError(format!("download: {}", head.kind()))) };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunk = Vec::new();
    for index in 0..layout.chunks {
        chunk.resize(layout.plain_len(index) + TAG, 0);
        recv.read_exact(&mut chunk).await.map_err(fail)?;
        ctx.update(&chunk);
        open_chunk(key, index, layout.is_last(index), &mut chunk).map_err(fail)?;
    }
    if ctx.finish().as_ref() != hash {
        return Err(BenchError("the downloaded blob's hash differs".into()));
    }
    Ok(())
}

/// Raw quinn: `size` bytes up a stream, then `size` bytes down one.
/// Returns the two times in seconds.
async fn raw_bulk(raw: &RawServer, size: u64) -> Result<(f64, f64), BenchError> {
    let c = raw.connection().await?;
    let buf = vec![0x5au8; BLOB_IO_BUFFER];
    let t = Instant::now();
    let (mut send, mut recv) = c.open_bi().await.map_err(fail)?;
    send.write_all(b"U").await.map_err(fail)?;
    let mut left = size;
    while left > 0 {
        let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        send.write_all(buf.get(..k).unwrap_or_default()).await.map_err(fail)?;
        left -= k as u64;
    }
    send.finish().map_err(fail)?;
    recv.read_to_end(64).await.map_err(fail)?;
    let up = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (mut send, mut recv) = c.open_bi().await.map_err(fail)?;
    let mut head = b"D".to_vec();
    head.extend_from_slice(&size.to_be_bytes());
    send.write_all(&head).await.map_err(fail)?;
    send.finish().map_err(fail)?;
    let mut into = vec![0u8; BLOB_IO_BUFFER];
    while recv.read(&mut into).await.map_err(fail)?.is_some() {}
    let down = t.elapsed().as_secs_f64();
    c.close(quinn::VarInt::from_u32(0), b"");
    Ok((up, down))
}

/// A raw durable write of `size` bytes to a file in `dir`: the server's
/// buffer size and flush interval, nothing else. Seconds.
fn raw_write(dir: &Path, size: u64) -> Result<f64, BenchError> {
    use std::io::Write;
    let path = dir.join("raw-write.bin");
    let buf = vec![0x5au8; BLOB_IO_BUFFER];
    let t = Instant::now();
    let mut file = std::fs::File::create(&path).map_err(fail)?;
    let (mut left, mut unsynced) = (size, 0u64);
    while left > 0 {
        let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        file.write_all(buf.get(..k).unwrap_or_default()).map_err(fail)?;
        left -= k as u64;
        unsynced += k as u64;
        if unsynced >= BLOB_SYNC_EVERY {
            file.sync_data().map_err(fail)?;
            unsynced = 0;
        }
    }
    file.sync_all().map_err(fail)?;
    let took = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

/// The rows: MiB/s up and down against raw quinn, up against a raw
/// durable write, and memory during 8 uploads at once against idle.
pub(super) async fn file_rows(
    pair: &Pair,
    address: &HushAddress,
    dir: &Path,
    settings: super::Settings,
) -> Result<Vec<Row>, BenchError> {
    let (mib, uploads_at_once) = (settings.file_mib, settings.file_uploads);
    let size = mib * 1024 * 1024;
    let path = dir.join("file.bin");
    {
        let block: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let mut bytes = Vec::with_capacity(usize::try_from(size).map_err(fail)?);
        while (bytes.len() as u64) < size {
            bytes.extend_from_slice(&block);
        }
        bytes.truncate(usize::try_from(size).map_err(fail)?);
        std::fs::write(&path, bytes).map_err(fail)?;
    }
    // Rounds alternate which goes first, and medians are compared: the
    // machine's speed drifts during a run, and both see the same drift.
    let raw = RawServer::start(Mode::Bulk).await?;
    let (mut ups, mut downs, mut raw_ups, mut raw_downs, mut disks) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..settings.file_rounds {
        for hush_first in [round % 2 == 0, round % 2 != 0] {
            if hush_first {
                let t = Instant::now();
                let (id, key) = upload(&pair.alice, &pair.group, &path, size).await?;
                ups.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                download(&pair.bob, id, &key, size).await?;
                downs.push(t.elapsed().as_secs_f64());
            } else {
                let (up, down) = raw_bulk(&raw, size).await?;
                raw_ups.push(up);
                raw_downs.push(down);
                let dir = dir.to_path_buf();
                disks.push(tokio::task::spawn_blocking(move || raw_write(&dir, size)).await.map_err(fail)??);
            }
        }
    }
    raw.endpoint.close(quinn::VarInt::from_u32(0), b"done");
    let (up, down, raw_up, raw_down, disk) =
        (median(ups), median(downs), median(raw_ups), median(raw_downs), median(disks));
    let rate = |secs: f64| if secs > 0.0 { size as f64 / MIB / secs } else { 0.0 };

    // Uploads at once (8 in the full run), each on its own connection of
    // alice's device.
    let idle = crate::util::rss_kib(None).unwrap_or(0) as f64 / 1024.0;
    let mut conns = Vec::new();
    for _ in 0..uploads_at_once {
        conns.push(Connection::connect(address, &pair.alice_id).await.map_err(fail)?);
    }
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watching = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = crate::util::rss_kib(None) {
                    peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    };
    let mut uploads = tokio::task::JoinSet::new();
    for c in conns {
        let (group, path) = (pair.group.clone(), path.clone());
        uploads.spawn(async move {
            let r = upload(&c, &group, &path, size).await.map(|_| ());
            c.close().await;
            r
        });
    }
    while let Some(r) = uploads.join_next().await {
        r.map_err(fail)??;
    }
    watching.abort();
    let busy = peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    let _ = std::fs::remove_file(&path);
    Ok(vec![
        Row::rate(format!("file upload MiB/s, {mib} MiB, vs raw quinn bulk (same TLS)"), rate(up), rate(raw_up)),
        Row::rate(format!("file download MiB/s, {mib} MiB, vs raw quinn bulk (same TLS)"), rate(down), rate(raw_down)),
        Row::rate(format!("file upload MiB/s, {mib} MiB, vs a raw durable write to this disk"), rate(up), rate(disk)),
        Row::cost(
            format!("process RSS, {uploads_at_once} uploads of {mib} MiB at once vs idle (server and clients, MiB)"),
            busy,
            idle,
            "MiB",
        ),
    ])
}

//! Large groups (issue 37): a group of [`LARGE_GROUP`] devices built on the
//! running server and committing without pause, against the latency of a
//! group of two that chats meanwhile. The server verifies handshakes off
//! its single writer thread; this is what shows whether a large group's
//! commits still hold up every other group's sends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::JoinSet;

use super::measure::{latency_samples, p50_p99};
use super::scenarios::{pair_latencies, Pair};
use super::{fail, BenchError, Row, Settings};
use crate::auth::{AccountId, HushAddress};
use crate::client::mls::Member;
use crate::client::Connection;
use crate::wire::{Request, Response};

/// Devices in the large group (the server's default cap on a group).
pub const LARGE_GROUP: usize = 1000;

/// Devices one set-up commit adds at most: with its Welcome and the
/// GroupInfo (each carrying the tree of up to [`LARGE_GROUP`] leaves) a
/// commit stays within one request frame.
const ADD_BATCH: usize = 100;

/// Devices registering at once while the large group is set up.
const REGISTERING_AT_ONCE: usize = 16;

/// Messages per second the group of two offers meanwhile.
pub const STALL_LOAD: u32 = 200;

/// Quiet and committing phases the stall row alternates, each.
const STALL_ROUNDS: usize = 4;

/// A device that registered, published one KeyPackage and claimed it
/// itself (claims are rate-limited per claiming account, so the large
/// group's creator could not claim them all): its account and package.
async fn member_package(address: HushAddress) -> Result<(AccountId, Vec<u8>), BenchError> {
    let (_, id, member) = Member::generate().map_err(fail)?;
    let c = Connection::connect(&address, &id).await.map_err(fail)?;
    c.register(None, member.certificate()).await.map_err(fail)?;
    let packages = member.key_packages(1).map_err(fail)?;
    c.call(&Request::PublishKeyPackages { packages, last_resort: None }).await.map_err(fail)?;
    let claimed = c.call(&Request::ClaimKeyPackage { account: member.account().0 }).await.map_err(fail)?;
    c.close().await;
    match claimed {
        Response::KeyPackages { mut packages } => {
            packages.pop().map(|p| (member.account(), p)).ok_or_else(|| BenchError("no KeyPackage".into()))
        }
        other => Err(BenchError(format!("claim: unexpected {} response", other.kind()))),
    }
}

/// A group of `size` devices on the server at `address`: its creator (its
/// client state and connection) and its id. The others register, publish
/// and claim a package each, [`REGISTERING_AT_ONCE`] at a time, and are
/// added [`ADD_BATCH`] per commit; they never come online.
pub(super) async fn large_group(
    address: &HushAddress,
    removal_key: &[u8; 32],
    size: usize,
) -> Result<(Member, Arc<Connection>, Vec<u8>), BenchError> {
    let (_, id, mut owner) = Member::generate().map_err(fail)?;
    let conn = Arc::new(Connection::connect(address, &id).await.map_err(fail)?);
    conn.register(None, owner.certificate()).await.map_err(fail)?;
    let mut packages = Vec::with_capacity(size);
    let mut joining = JoinSet::new();
    for _ in 1..size {
        if joining.len() >= REGISTERING_AT_ONCE {
            if let Some(done) = joining.join_next().await {
                packages.push(done.map_err(fail)??);
            }
        }
        joining.spawn(member_package(address.clone()));
    }
    while let Some(done) = joining.join_next().await {
        packages.push(done.map_err(fail)??);
    }
    let g = owner.create_group(removal_key).map_err(fail)?;
    conn.call(&Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }).await.map_err(fail)?;
    for batch in packages.chunks(ADD_BATCH) {
        let commit = owner.add(&g.id, batch).map_err(fail)?;
        accepted(conn.call(&commit.into_request()).await.map_err(fail)?)?;
        owner.merge_pending(&g.id).map_err(fail)?;
    }
    Ok((owner, conn, g.id))
}

fn accepted(r: Response) -> Result<(), BenchError> {
    match r {
        Response::Accepted { .. } => Ok(()),
        Response::Error { message, .. } => Err(BenchError(format!("large group: {message}"))),
        other => Err(BenchError(format!("large group: unexpected {} response", other.kind()))),
    }
}

/// The p99 send→push latency in the pair's group of two at
/// [`STALL_LOAD`] msg/s while a group of `size` commits without pause
/// (self-updates, made before the clock starts), against the same p99
/// with no large group committing. The two are measured in
/// [`STALL_ROUNDS`] alternating phases each (quiet, then committing), so
/// that a machine whose speed drifts during the run weighs on both alike.
pub(super) async fn stall(
    settings: Settings,
    address: &HushAddress,
    pair: &mut Pair,
    size: usize,
) -> Result<Vec<Row>, BenchError> {
    let (mut owner, conn, group) = large_group(address, &pair.removal_key, size).await?;
    let mut commits = Vec::with_capacity(settings.large_commits);
    for _ in 0..settings.large_commits {
        commits.push(owner.self_update(&group).map_err(fail)?.into_request());
        owner.merge_pending(&group).map_err(fail)?;
    }
    let commit_bytes = commits.first().map_or(0, request_bytes);
    let per_phase = latency_samples(settings, STALL_LOAD).div_ceil(STALL_ROUNDS);
    // The committer commits while it may take this lock, one commit at a
    // time; a quiet phase holds it, so it starts once the commit in
    // flight is done and none starts during it.
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    let quiet = turn.clone().lock_owned().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (stopping, taking) = (stop.clone(), turn.clone());
    let committer = tokio::spawn(async move {
        let mut made = 0usize;
        for commit in commits {
            let _turn = taking.lock().await;
            if stopping.load(Ordering::Relaxed) {
                break;
            }
            accepted(conn.call(&commit).await.map_err(fail)?)?;
            made += 1;
        }
        Ok::<usize, BenchError>(made)
    });
    let (mut alone, mut busy) = (Vec::new(), Vec::new());
    let mut quiet = Some(quiet);
    let measured: Result<(), BenchError> = async {
        for _ in 0..STALL_ROUNDS {
            if quiet.is_none() {
                quiet = Some(turn.clone().lock_owned().await);
            }
            alone.extend(pair_latencies(settings, address, pair, STALL_LOAD, per_phase).await?);
            quiet = None;
            busy.extend(pair_latencies(settings, address, pair, STALL_LOAD, per_phase).await?);
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    drop(quiet);
    let made = committer.await.map_err(fail)??;
    measured?;
    let all = if made == settings.large_commits { ", all it had: the run outlasted them" } else { "" };
    Ok(vec![Row::cost(
        format!(
            "send→push p99 in a group of 2 at {STALL_LOAD} msg/s while a group of {size} commits ({made} commits of {} KiB{all}; baseline: the same p99 with no large group; {STALL_ROUNDS} alternating phases each) (µs)",
            commit_bytes / 1024
        ),
        p50_p99(busy).1,
        p50_p99(alone).1,
        "µs",
    )])
}

/// Bytes of a commit request's message, Welcome and GroupInfo.
fn request_bytes(r: &Request) -> usize {
    match r {
        Request::Send { message, welcome, group_info } => {
            message.len() + welcome.as_ref().map_or(0, Vec::len) + group_info.as_ref().map_or(0, Vec::len)
        }
        _ => 0,
    }
}

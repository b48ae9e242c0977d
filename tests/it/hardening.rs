//! Faults: the server is killed with SIGKILL while clients write; nothing
//! it acknowledged may be lost or duplicated.

use std::time::Duration;

use hush::client::log::{GroupLog, Read};
use hush::client::mls::{Commit, Member, Received};
use hush::client::Connection;

use crate::support::*;

/// Load tests measure the server, not its rate limiter.
const UNLIMITED: &[(&str, &str)] = &[("HUSHD_REQUESTS_PER_SECOND_PER_ACCOUNT", "1000000")];

/// `HUSH_LONG_TESTS=1` runs the load tests longer (CI runs the short
/// mode): more kills, a longer flood, more unread pushes.
fn long() -> bool {
    std::env::var_os("HUSH_LONG_TESTS").is_some()
}

/// How many SIGKILLs the test survives.
fn kills() -> usize {
    if long() {
        25
    } else {
        5
    }
}

async fn kill_9_under_load_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let mut server = Hushd::start_with(&dir, "127.0.0.1:0", UNLIMITED);
    let port = server.port();
    let listen = format!("127.0.0.1:{port}");

    // alice writes, bob checks.
    let (alice_id, mut alice, mut alice_mls) = registered_member(&server).await;
    let (bob_id, mut bob, mut bob_mls) = registered_member(&server).await;
    bob.publish_key_packages(bob_mls.key_packages(2).unwrap(), Some(1)).await.unwrap();
    let g = alice_mls.create_group(&alice.status().await.unwrap().removal_key).unwrap();
    alice.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let kps = claim(&alice, bob_mls.account()).await;
    let commit = alice_mls.add(&g.id, &kps).unwrap();
    let (first_seq, _) = alice.commit(commit).await.unwrap();
    alice_mls.merge_pending(&g.id).unwrap();
    let welcomes = bob.fetch_welcomes().await.unwrap();
    bob_mls.join(&welcomes[0].1).unwrap();

    let mut acked: Vec<(u64, String)> = vec![];
    let mut counter = 0u64;
    // The kill moments come from a seed, printed so that a failure can be
    // replayed with HUSH_KILL_SEED.
    let mut seed: u64 = std::env::var("HUSH_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| u64::from_be_bytes([rand_byte(), rand_byte(), rand_byte(), rand_byte(), 0, 0, 0, 1]));
    eprintln!("kill moments from HUSH_KILL_SEED={seed}");
    for round in 0..kills() {
        // Write as fast as possible; SIGKILL the server at a random moment,
        // with requests in flight.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(150 + seed % 768);
        eprintln!("round {round}: SIGKILL after {} ms", delay.as_millis());
        let victim = server;
        let killer = tokio::task::spawn_blocking(move || {
            std::thread::sleep(delay);
            victim.kill9();
        });
        tokio::pin!(killer);
        loop {
            counter += 1;
            let text = format!("message {counter}");
            let m = alice_mls.encrypt(&g.id, text.as_bytes()).unwrap();
            tokio::select! {
                r = alice.send(m, None) => match r {
                    Ok((seq, _)) => acked.push((seq, text)),
                    Err(_) => {
                        (&mut killer).await.unwrap();
                        break;
                    }
                },
                k = &mut killer => {
                    k.unwrap();
                    break;
                }
            }
        }
        server = Hushd::start_with(&dir, &listen, UNLIMITED);
        alice = Connection::connect(&server.address, &alice_id).await.unwrap();
        bob = Connection::connect(&server.address, &bob_id).await.unwrap();
        let integrity = ok(run(hushd_command(&dir).arg("check")));
        assert!(integrity.contains("integrity ok"), "round {round}: {integrity}");
    }

    // Everything acknowledged is there, once, in order, and decrypts.
    let reads = GroupLog::new(&g.id, first_seq).read_all_over(&mut bob_mls, &bob, None).await.unwrap();
    let stored: Vec<(u64, String)> = reads
        .into_iter()
        .map(|r| match r {
            Read::Received { seq, received: Received::Application { data, .. } } => {
                (seq, String::from_utf8(data).unwrap())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert!(acked.len() >= kills(), "too few writes to mean anything: {}", acked.len());
    for (seq, text) in &acked {
        let found: Vec<_> = stored.iter().filter(|(s, t)| s == seq && t == text).collect();
        assert_eq!(found.len(), 1, "acknowledged message {seq} ({text}) stored {} times", found.len());
    }
    let texts: Vec<&String> = stored.iter().map(|(_, t)| t).collect();
    let mut unique = texts.clone();
    unique.dedup();
    assert_eq!(unique.len(), texts.len(), "a message was stored twice");
    eprintln!("kill -9 x{}: {} acknowledged, {} stored, 0 lost", kills(), acked.len(), stored.len());
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b[0]
}

/// A member of a test group, talking to a real server.
pub(crate) struct Peer {
    pub id: hush::auth::Identity,
    pub conn: Connection,
    pub mls: Member,
    /// Its reading of the test group's log.
    pub log: GroupLog,
}

impl Peer {
    pub async fn new(server: &Hushd) -> Self {
        let (id, conn, mls) = registered_member(server).await;
        conn.publish_key_packages(mls.key_packages(3).unwrap(), Some(2)).await.unwrap();
        Self { id, conn, mls, log: GroupLog::new(&[], 0) }
    }

    /// Reads the group's log to its end (with the library's reader, which
    /// also acknowledges); returns what was received, with sequences.
    pub async fn sync(&mut self, g: &[u8]) -> Vec<(u64, Received)> {
        assert_eq!(self.log.group(), g);
        let reads = self.log.read_all_over(&mut self.mls, &self.conn, None).await.unwrap();
        reads
            .into_iter()
            .filter_map(|r| match r {
                Read::Received { seq, received } => Some((seq, received)),
                Read::Own { .. } | Read::Gone { .. } => None,
                Read::Failed { seq, error, .. } => panic!("message {seq} failed: {error}"),
            })
            .collect()
    }
}

/// Every peer sends `rounds` messages in turn; then all catch up and must
/// agree on the group's state.
async fn converse(peers: &mut [Peer], g: &[u8], rounds: usize) {
    for round in 0..rounds {
        for (i, p) in peers.iter_mut().enumerate() {
            let m = p.mls.encrypt(g, format!("{i}:{round}").as_bytes()).unwrap();
            let (seq, _) = p.conn.send(m, None).await.unwrap();
            p.log.sent(seq);
        }
    }
    for p in peers.iter_mut() {
        p.sync(g).await;
    }
    let auth = peers[0].mls.epoch_authenticator(g);
    assert!(peers.iter_mut().all(|p| p.mls.epoch_authenticator(g) == auth), "members diverged");
}

async fn group_of(server: &Hushd, n: usize) -> (Vec<Peer>, Vec<u8>) {
    group_across(&[server], n).await
}

/// A group of `n` members, member `i` connected to `servers[i % len]`
/// (several nodes of one server).
pub(crate) async fn group_across(servers: &[&Hushd], n: usize) -> (Vec<Peer>, Vec<u8>) {
    let mut peers = vec![];
    for i in 0..n {
        peers.push(Peer::new(servers[i % servers.len()]).await);
    }
    let removal_key = peers[0].conn.status().await.unwrap().removal_key;
    let g = peers[0].mls.create_group(&removal_key).unwrap();
    peers[0].conn.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let mut kps = vec![];
    for p in &peers[1..] {
        kps.extend(claim(&peers[0].conn, p.mls.account()).await);
    }
    let commit = peers[0].mls.add(&g.id, &kps).unwrap();
    let (seq, _) = peers[0].conn.commit(commit).await.unwrap();
    peers[0].mls.merge_pending(&g.id).unwrap();
    peers[0].log = GroupLog::new(&g.id, seq);
    for p in &mut peers[1..] {
        let w = p.conn.fetch_welcomes().await.unwrap();
        p.mls.join(&w[0].1).unwrap();
        p.log = GroupLog::new(&g.id, seq);
    }
    (peers, g.id)
}

async fn five_members_racing_commits_twenty_times_one_wins_each_epoch_and_all_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    race_commits(&[&server]).await;
}

/// Five members (member `i` on `servers[i % len]`) each commit for the same
/// epoch at once, twenty times: exactly one commit is accepted per epoch
/// and all members converge. Returns the accepted commits per server.
pub(crate) async fn race_commits(servers: &[&Hushd]) -> Vec<usize> {
    let (mut peers, g) = group_across(servers, 5).await;
    let mut wins = vec![0; servers.len()];
    for round in 0..20 {
        let epoch = peers[0].mls.epoch(&g).unwrap();
        let commits: Vec<Commit> = peers.iter_mut().map(|p| p.mls.commit_pending(&g).unwrap()).collect();
        let mut racers = tokio::task::JoinSet::new();
        // Connected first, so the commits leave together.
        let mut conns = vec![];
        for (i, p) in peers.iter().enumerate() {
            conns.push(Connection::connect(&servers[i % servers.len()].address, &p.id).await.unwrap());
        }
        for (i, (c, conn)) in commits.into_iter().zip(conns).enumerate() {
            racers.spawn(async move { (i, conn.commit(c).await) });
        }
        let mut winners = vec![];
        while let Some(r) = racers.join_next().await {
            let (i, result) = r.unwrap();
            match result {
                Ok((seq, e)) => {
                    assert_eq!(e, epoch + 1);
                    winners.push((i, seq));
                }
                Err(e) => assert_eq!(e.code(), Some(hush::wire::ErrorCode::StaleEpoch), "round {round}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {} commits accepted for epoch {epoch}", winners.len());
        let (w, seq) = winners[0];
        wins[w % servers.len()] += 1;
        for (i, p) in peers.iter_mut().enumerate() {
            if i == w {
                p.mls.merge_pending(&g).unwrap();
                p.log.sent(seq);
            } else {
                p.mls.discard_pending(&g).unwrap();
            }
            p.sync(&g).await;
        }
        let auth = peers[0].mls.epoch_authenticator(&g);
        for p in &mut peers {
            assert_eq!(p.mls.epoch(&g), Some(epoch + 1));
            assert_eq!(p.mls.epoch_authenticator(&g), auth, "round {round}: members diverged");
        }
    }
    wins
}

async fn a_non_member_is_refused_everything_and_learns_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut peers, g) = group_of(&server, 2).await;
    let text = peers[0].mls.encrypt(&g, b"members only").unwrap();
    let (seq, _) = peers[0].conn.send(text.clone(), None).await.unwrap();
    let mut eve = Peer::new(&server).await;
    let removal_key = eve.conn.status().await.unwrap().removal_key;
    // A missing id of the same shape (bound to alice, the creator of g).
    let missing = hush::mls::group_id_for(&peers[0].mls.account(), b"never created");
    let not_member = |r: Result<(), hush::client::ClientError>| {
        let e = r.expect_err("a non-member request succeeded");
        assert_eq!(e.code(), Some(hush::wire::ErrorCode::NotMember), "{e}");
        e.to_string()
    };
    // Issue 13, finding 4: every request on an existing group id gets the
    // answer the same request gets on a missing one, creation included
    // (group ids are bound to their creator, so eve cannot even try).
    let mut answers = vec![];
    for group in [&g, &missing] {
        let fetch = not_member(eve.conn.fetch(group, 0, 0).await.map(|_| ()));
        let ack = not_member(eve.conn.ack(group, seq).await);
        let local = eve.mls.create_group_with_id(&removal_key, group).unwrap();
        let post = eve.mls.encrypt(group, b"probe").unwrap();
        let post = not_member(eve.conn.send(post, None).await.map(|_| ()));
        let create = eve.conn.create_group(local.group_info, local.ratchet_tree).await.expect_err("created");
        assert_eq!(create.code(), Some(hush::wire::ErrorCode::InvalidMessage), "{create}");
        eve.mls.forget(group);
        answers.push((fetch, ack, post, create.to_string()));
    }
    assert_eq!(answers[0], answers[1], "existing and missing groups answered differently");
    // Replaying a member's ciphertext or commit under her own key.
    not_member(eve.conn.send(text, None).await.map(|_| ()));
    let commit = peers[1].mls.commit_pending(&g).unwrap();
    not_member(eve.conn.commit(commit.clone()).await.map(|_| ()));
    // No Welcome for her; the group is not in her list.
    assert!(eve.conn.fetch_welcomes().await.unwrap().is_empty());
    assert!(eve.conn.groups().await.unwrap().is_empty());
    // The member's own commit is still good: nothing eve did changed the group.
    let (_, epoch) = peers[1].conn.commit(commit).await.unwrap();
    assert_eq!(epoch, 2);
}

async fn a_member_that_never_reads_pushes_costs_bounded_memory_and_resyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", UNLIMITED);
    let (mut peers, g) = group_of(&server, 2).await;
    // Peer 1 stays connected but never accepts or reads its push stream.
    let before = server.rss_kib();
    let total = if long() { 25_000 } else { 2500 };
    let mut sent = 0;
    while sent < total {
        // 50 in flight at a time: the writer batches them into few commits.
        // (Within the members' out-of-order tolerance of 64.)
        let mut batch = vec![];
        for _ in 0..50 {
            sent += 1;
            batch.push(peers[0].mls.encrypt(&g, format!("m{sent} {}", "x".repeat(3000)).as_bytes()).unwrap());
        }
        let conn = &peers[0].conn;
        let results = futures_join(batch.into_iter().map(|m| conn.send(m, None))).await;
        for r in results {
            let (seq, _) = r.unwrap();
            peers[0].log.sent(seq);
        }
    }
    let after = server.rss_kib();
    let growth = after.saturating_sub(before);
    eprintln!("slow reader: server RSS {before} KiB -> {after} KiB after {total} pushes it never read");
    // Bounded: the push queue (256 frames of ~3.3 KB), quinn's send buffer
    // for the stalled stream (≤ 4 MiB) and SQLite's page caches (≤ 2 MiB per
    // connection). Keeping every push (2500 x ~3.3 KB) would add ~8 MiB more.
    assert!(growth < 12 * 1024, "server memory grew by {growth} KiB");
    // The slow reader resyncs from its cursor and gets everything.
    let got = peers[1].sync(&g).await.len();
    assert_eq!(got, total);
}

/// Awaits all futures concurrently (a tiny join_all, to avoid a dependency).
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_members_finish_their_conversation_during_a_flood() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_REQUEST_TIMEOUT_SECS", "2")]);
    let before = server.rss_kib();
    // The attacker: a registered account (so it gets past the handshake)
    // sending garbage, oversized and truncated frames and streams it never
    // finishes, as fast as it can, on several connections.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (attacker, _) = registered_client(&server).await;
    let mut flood = tokio::task::JoinSet::new();
    for lane in 0..4u8 {
        let conn = Connection::connect(&server.address, &attacker).await.unwrap();
        let stop = stop.clone();
        flood.spawn(async move {
            let mut sent = 0u64;
            let mut stalled = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                let frame: Vec<u8> = match sent % 4 {
                    0 => (0..64).map(|i| (i as u8).wrapping_mul(lane).wrapping_add(sent as u8)).collect(),
                    1 => vec![0x08; hush::limits::MAX_REQUEST_FRAME + 1],
                    2 => vec![0x08, 0, 0, 0x10],
                    _ => {
                        // A stream that never finishes.
                        if let Ok((mut s, r)) = conn.quic().open_bi().await {
                            let _ = s.write_all(&[0x09, 1]).await;
                            stalled.push((s, r));
                        }
                        continue;
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.raw(&frame)).await;
                if stalled.len() > 40 {
                    stalled.clear();
                }
            }
            sent
        });
    }
    // Meanwhile three honest members hold a conversation.
    let sampler_stop = stop.clone();
    let pid_rss = {
        let server_ref = &server;
        let mut peak = before;
        let honest = async {
            let (mut peers, g) = group_of(server_ref, 3).await;
            converse(&mut peers, &g, if long() { 300 } else { 10 }).await;
        };
        tokio::pin!(honest);
        loop {
            tokio::select! {
                () = &mut honest => break,
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    peak = peak.max(server_ref.rss_kib());
                }
            }
        }
        peak
    };
    sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flood_requests = 0;
    while let Some(n) = flood.join_next().await {
        flood_requests += n.unwrap();
    }
    eprintln!(
        "flood: {flood_requests} hostile requests; honest conversation completed; server RSS {before} KiB -> peak {pid_rss} KiB"
    );
    assert!(flood_requests > 100, "the flood was too weak to mean anything");
    assert!(pid_rss.saturating_sub(before) < 64 * 1024, "server memory grew to {pid_rss} KiB under the flood");
}

async fn a_full_storage_quota_refuses_new_messages_keeps_the_stored_ones_and_recovers_after_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("HUSHD_REQUESTS_PER_SECOND_PER_ACCOUNT", "1000000"), ("HUSHD_MAX_DATABASE_MB", "1")];
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &env);
    let (mut peers, g) = group_of(&server, 2).await;
    // Fill the 1 MiB quota with ~3 KB messages until the server refuses.
    let mut accepted = vec![];
    let refusal = loop {
        let text = format!("message {} {}", accepted.len(), "x".repeat(3000));
        let m = peers[0].mls.encrypt(&g, text.as_bytes()).unwrap();
        match peers[0].conn.send(m, None).await {
            Ok((seq, _)) => accepted.push((seq, text)),
            Err(e) => break e,
        }
        assert!(accepted.len() < 2000, "a 1 MiB quota took 6 MB of messages");
    };
    assert_eq!(refusal.code(), Some(hush::wire::ErrorCode::QuotaExceeded), "{refusal}");
    assert!(refusal.to_string().contains("storage quota is full"), "{refusal}");
    assert!(accepted.len() > 50, "only {} messages fit", accepted.len());
    for (seq, _) in &accepted {
        peers[0].log.sent(*seq);
    }
    // Reads are still served, and every accepted message is there, in order.
    let got: Vec<(u64, String)> = peers[1]
        .sync(&g)
        .await
        .into_iter()
        .map(|(seq, r)| match r {
            Received::Application { data, .. } => (seq, String::from_utf8(data).unwrap()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, accepted);
    // Once every member has acknowledged them, the messages are deleted and
    // the space is usable again.
    let last = accepted.last().unwrap().0;
    for p in &peers {
        p.conn.ack(&g, last).await.unwrap();
    }
    let m = peers[0].mls.encrypt(&g, b"there is room again").unwrap();
    let (seq, _) = peers[0].conn.send(m, None).await.unwrap();
    assert_eq!(seq, last + 1);
}

/// Issue 13, finding 3 (and the CI failure that came with it): strangers
/// flooding from one address (an office behind one NAT) used up the
/// per-address budget that a registered member on the same address also
/// spent, so the member's sends failed with `RateLimited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_flooding_from_a_members_address_never_spend_the_members_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("HUSHD_REQUESTS_PER_SECOND_PER_IP", "5")];
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &env);
    let (mut peers, g) = group_of(&server, 2).await;
    // A stranger (a key with no account) on the same address drains the
    // address's budget until the server says so.
    let stranger = hush::auth::Identity::generate().unwrap();
    let conn = Connection::connect(&server.address, &stranger).await.unwrap();
    let mut drained = false;
    for _ in 0..100 {
        // `request`, not `call`: the answer as the server gives it (`call`
        // would wait out the limit and retry).
        let reply = conn.request(&hush::wire::Request::Status).await.unwrap();
        if matches!(reply, hush::wire::Response::Error { code: hush::wire::ErrorCode::RateLimited, .. }) {
            drained = true;
            break;
        }
    }
    assert!(drained, "the stranger was never rate-limited: the test proves nothing");
    // It keeps flooding while the member sends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let frame = hush::wire::Request::Status.encode().unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = conn.raw(&frame).await;
            }
        })
    };
    let mut accepted = 0;
    for i in 0..10 {
        let m = peers[0].mls.encrypt(&g, format!("message {i}").as_bytes()).unwrap();
        match peers[0].conn.send(m, None).await {
            Ok(_) => accepted += 1,
            Err(e) => eprintln!("send {i} refused: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.await.unwrap();
    assert_eq!(accepted, 10, "{accepted} of 10 sends accepted while strangers flooded from the same address");
}

/// Issue 13, finding 1: strangers (keys with no account) opened 16
/// connections from one address with 64 streams each, pushed ~1 MiB into
/// every stream and never finished them; the server read every stream
/// whole before checking anything and held over a gigabyte. Now a
/// connection starts with one stream and a 4 KiB receive window until its
/// key is known to be a device, and a stranger may send nothing but a
/// `Register` of at most 2 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_hoarding_request_streams_cost_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("HUSHD_AUTH_DEADLINE_SECS", "60"), ("HUSHD_REQUEST_TIMEOUT_SECS", "60")];
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &env);
    // Three honest members on the same address, registered before the
    // attack (while 16 strangers hold their address's stranger slots, new
    // keys from it cannot connect: that cap is deliberate).
    let (mut peers, g) = group_of(&server, 3).await;
    let idle = server.rss_kib();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attack = tokio::task::JoinSet::new();
    let pushed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..16 {
        let stranger = hush::auth::Identity::generate().unwrap();
        let conn = Connection::connect(&server.address, &stranger).await.unwrap();
        let (stop, pushed) = (stop.clone(), pushed.clone());
        attack.spawn(async move {
            let mut streams = vec![];
            for _ in 0..64 {
                // Each stream: a Send tag and ~1 MiB, never finished. Opens
                // and writes block once the server grants no more credit.
                let Ok(Ok((mut send, recv))) =
                    tokio::time::timeout(Duration::from_millis(200), conn.quic().open_bi()).await
                else {
                    continue;
                };
                let pushed = pushed.clone();
                let writer = tokio::spawn(async move {
                    let chunk = [0x08u8; 1024];
                    for _ in 0..1024 {
                        if send.write_all(&chunk).await.is_err() {
                            break;
                        }
                        pushed.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    send
                });
                streams.push((writer, recv));
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for (w, _) in &streams {
                w.abort();
            }
            conn.quic().close(0u32.into(), b"");
        });
    }
    // Meanwhile the honest members hold a conversation, and the server's
    // memory is sampled.
    let mut peak = idle;
    {
        let honest = converse(&mut peers, &g, if long() { 200 } else { 10 });
        tokio::pin!(honest);
        loop {
            tokio::select! {
                () = &mut honest => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => peak = peak.max(server.rss_kib()),
            }
        }
    }
    // Let the attack sit a little longer at full size.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(server.rss_kib());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while attack.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    let pushed = pushed.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "stream hoarding: 16 stranger connections x 64 streams; {pushed} bytes accepted by the transport; \
         server RSS idle {idle} KiB, peak {peak} KiB, after {after} KiB"
    );
    // Before the fix the attackers pushed as fast as they could write (about
    // 1 GiB in 5 s from a release build) and the server kept it. The bound
    // SECURITY.md states is 64 MiB; the credit strangers get makes it tiny.
    assert!(peak.saturating_sub(idle) < 16 * 1024, "server memory grew by {} KiB", peak - idle);
    assert!(after.saturating_sub(idle) < 16 * 1024, "server kept {} KiB after the attack", after - idle);
    let credit = 16 * u64::from(hush::limits::STRANGER_RECEIVE_WINDOW);
    assert!(pushed <= credit, "strangers got {pushed} bytes of credit, more than {credit}");
}

/// Issue 13, finding 2: an account queued update proposals whose leaf
/// carried a 400 KB unknown extension in a group of its own; each was kept
/// in the group's public state, which every later handshake decodes and
/// rewrites on the single writer (the 100th took 505 ms, 1.3 GB peak).
/// Now leaves with extensions are refused, pending proposals are capped and
/// so is a group's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_grow_a_groups_state_without_bound() {
    use hush::wire::ErrorCode;
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", UNLIMITED);
    let (mut honest, hg) = group_of(&server, 2).await;
    let mut attacker = Peer::new(&server).await;
    let removal_key = attacker.conn.status().await.unwrap().removal_key;
    let g = attacker.mls.create_group(&removal_key).unwrap();
    attacker.conn.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    // The bloated leaf itself.
    let bloated = attacker.mls.update_proposal(&g.id, Some(400 * 1024)).unwrap();
    let e = attacker.conn.send(bloated, None).await.expect_err("a leaf with a 400 KB extension was accepted");
    assert_eq!(e.code(), Some(ErrorCode::InvalidCommit), "{e}");
    assert!(e.to_string().contains("extensions"), "{e}");
    // Plain proposals, until the cap; the other group keeps working.
    let mut accepted = 0;
    let mut last_sent = 0;
    let refusal = loop {
        let proposal = attacker.mls.update_proposal(&g.id, None).unwrap();
        match attacker.conn.send(proposal, None).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        let m = honest[0].mls.encrypt(&hg, format!("still here {accepted}").as_bytes()).unwrap();
        let (seq, _) = honest[0].conn.send(m, None).await.unwrap();
        honest[0].log.sent(seq);
        last_sent = seq;
        assert!(accepted <= hush::limits::MAX_PENDING_PROPOSALS, "no cap on pending proposals");
    };
    assert_eq!(refusal.code(), Some(ErrorCode::QuotaExceeded), "{refusal}");
    assert_eq!(accepted, hush::limits::MAX_PENDING_PROPOSALS);
    // The honest members read everything.
    honest[1].sync(&hg).await;
    assert_eq!(honest[1].log.cursor(), last_sent);
}

/// Issue 13, finding 4 (second half): a removed member's group list showed
/// the group's current epoch forever and its row was never deleted.
async fn a_removed_members_view_is_frozen_at_its_removal_and_then_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut peers, g) = group_of(&server, 3).await;
    let removal_epoch = peers[0].mls.epoch(&g).unwrap();
    let carol = peers[2].mls.account();
    let commit = peers[0].mls.remove(&g, &[carol]).unwrap();
    let (removed_at, _) = peers[0].conn.commit(commit).await.unwrap();
    peers[0].mls.merge_pending(&g).unwrap();
    peers[0].log.sent(removed_at);
    // The group moves on.
    for _ in 0..2 {
        let commit = peers[0].mls.commit_pending(&g).unwrap();
        let (seq, _) = peers[0].conn.commit(commit).await.unwrap();
        peers[0].mls.merge_pending(&g).unwrap();
        peers[0].log.sent(seq);
    }
    let view = peers[2].conn.groups().await.unwrap();
    assert_eq!(view.len(), 1);
    assert_eq!((view[0].epoch, view[0].last_seq, view[0].member), (removal_epoch, removed_at, false));
    // Carol reads up to her removal and acknowledges it: the group is gone.
    let carol = &mut peers[2];
    let (messages, _) = carol.conn.fetch(&g, carol.log.cursor(), 0).await.unwrap();
    assert_eq!(messages.last().map(|m| m.seq), Some(removed_at));
    carol.conn.ack(&g, removed_at).await.unwrap();
    assert!(carol.conn.groups().await.unwrap().is_empty());
    let e = carol.conn.fetch(&g, 0, 0).await.expect_err("a forgotten member fetched");
    assert_eq!(e.code(), Some(hush::wire::ErrorCode::NotMember));
    // The others are unaffected.
    peers[1].sync(&g).await;
    assert_eq!(peers[1].mls.epoch(&g), peers[0].mls.epoch(&g));
}

crate::on_both_backends! {
    sync: [],
    async: [kill_9_under_load_loses_nothing_acknowledged, five_members_racing_commits_twenty_times_one_wins_each_epoch_and_all_converge, a_non_member_is_refused_everything_and_learns_nothing, a_member_that_never_reads_pushes_costs_bounded_memory_and_resyncs, a_full_storage_quota_refuses_new_messages_keeps_the_stored_ones_and_recovers_after_acks, a_removed_members_view_is_frozen_at_its_removal_and_then_gone],
}

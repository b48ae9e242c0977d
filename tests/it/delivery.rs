//! The Delivery Service end to end: real openmls clients (the library's
//! `Member`) against a real `hushd`.

use std::collections::HashMap;

use hush::auth::{AccountId, Identity};
use hush::client::log::{all_received, GroupLog};
use hush::client::mls::{Member, Received};
use hush::client::{ClientError, Connection};
use hush::wire::{ErrorCode, Push};

use crate::support::*;

/// One user: key, connection, MLS state, and read positions.
struct User {
    id: Identity,
    conn: Connection,
    member: Member,
    logs: HashMap<Vec<u8>, GroupLog>,
}

impl User {
    async fn new(server: &Hushd) -> Self {
        let (id, conn, member) = registered_member(server).await;
        let packages = member.key_packages(5).unwrap();
        conn.publish_key_packages(packages, Some(4)).await.unwrap();
        Self { id, conn, member, logs: HashMap::new() }
    }

    /// This user's reading of `group`'s log.
    fn log(&mut self, group: &[u8]) -> &mut GroupLog {
        self.logs.entry(group.to_vec()).or_insert_with(|| GroupLog::new(group, 0))
    }

    fn account(&self) -> AccountId {
        self.member.account()
    }

    async fn reconnect(&mut self, server: &Hushd) {
        self.conn = Connection::connect(&server.address, &self.id).await.unwrap();
    }

    async fn create(&mut self) -> Vec<u8> {
        let removal_key = self.conn.status().await.unwrap().removal_key;
        let g = self.member.create_group(&removal_key).unwrap();
        self.conn.create_group(g.group_info, g.ratchet_tree).await.unwrap();
        self.logs.insert(g.id.clone(), GroupLog::new(&g.id, 0));
        g.id
    }

    async fn add(&mut self, group: &[u8], targets: &[AccountId]) {
        let mut kps = vec![];
        for t in targets {
            kps.extend(claim(&self.conn, *t).await);
        }
        let commit = self.member.add(group, &kps).unwrap();
        let (seq, _) = self.conn.commit(commit).await.unwrap();
        self.log(group).sent(seq);
        self.member.merge_pending(group).unwrap();
    }

    async fn join(&mut self) -> Vec<u8> {
        let welcomes = self.conn.fetch_welcomes().await.unwrap();
        let (id, w) = welcomes.into_iter().next().expect("a Welcome");
        let group = self.member.join(&w).unwrap();
        self.conn.ack_welcome(id).await.unwrap();
        let groups = self.conn.groups().await.unwrap();
        let g = groups.iter().find(|g| g.group == group).unwrap();
        self.logs.insert(group.clone(), GroupLog::new(&group, g.acked_seq));
        group
    }

    async fn text(&mut self, group: &[u8], text: &str) -> Result<u64, ClientError> {
        let m = self.member.encrypt(group, text.as_bytes()).unwrap();
        let (seq, _) = self.conn.send(m, None).await?;
        self.log(group).sent(seq);
        Ok(seq)
    }

    async fn sync(&mut self, group: &[u8]) -> Vec<Received> {
        let mut log = self.log(group).clone();
        let reads = log.read_all_over(&mut self.member, &self.conn, None).await.unwrap();
        self.logs.insert(group.to_vec(), log);
        all_received(reads).unwrap_or_else(|(seq, e)| panic!("message {seq} failed: {e}"))
    }
}

fn texts(received: &[Received]) -> Vec<String> {
    Received::texts(received)
}

async fn trio(server: &Hushd) -> (User, User, User, Vec<u8>) {
    let mut alice = User::new(server).await;
    let mut bob = User::new(server).await;
    let mut carol = User::new(server).await;
    let g = alice.create().await;
    alice.add(&g, &[bob.account(), carol.account()]).await;
    assert_eq!(bob.join().await, g);
    assert_eq!(carol.join().await, g);
    (alice, bob, carol, g)
}

async fn a_group_of_three_talks_adds_and_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut alice, mut bob, mut carol, g) = trio(&server).await;
    alice.text(&g, "hello from alice").await.unwrap();
    bob.text(&g, "hello from bob").await.unwrap();
    assert_eq!(texts(&carol.sync(&g).await), ["hello from alice", "hello from bob"]);

    let commit = alice.member.remove(&g, &[carol.account()]).unwrap();
    let (seq, _) = alice.conn.commit(commit).await.unwrap();
    alice.log(&g).sent(seq);
    alice.member.merge_pending(&g).unwrap();
    alice.text(&g, "carol is gone").await.unwrap();

    // Carol has not seen her removal yet and still holds the old epoch's keys.
    let late = carol.member.encrypt(&g, b"still here?").unwrap();
    let err = carol.conn.send(late, None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember), "{err}");
    let got = carol.sync(&g).await;
    assert!(matches!(got.last(), Some(Received::Commit { removed_me: true, .. })), "{got:?}");
    // She has read up to her removal: the server forgot her; nothing later
    // is hers to fetch.
    let e = carol.conn.fetch(&g, seq, 0).await.expect_err("a removed member fetched after her removal");
    assert_eq!(e.code(), Some(ErrorCode::NotMember), "{e}");
    assert_eq!(texts(&bob.sync(&g).await), ["hello from alice", "carol is gone"]);
    assert_eq!(alice.member.epoch_authenticator(&g), bob.member.epoch_authenticator(&g));
}

async fn concurrent_commits_exactly_one_wins_and_all_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut alice, mut bob, mut carol, g) = trio(&server).await;
    let bc = bob.member.commit_pending(&g).unwrap();
    let cc = carol.member.commit_pending(&g).unwrap();
    let (rb, rc) = tokio::join!(bob.conn.commit(bc), carol.conn.commit(cc));
    let (winner, loser, loser_result) = match (rb, rc) {
        (Ok((seq, _)), Err(e)) => {
            bob.log(&g).sent(seq);
            (&mut bob, &mut carol, e)
        }
        (Err(e), Ok((seq, _))) => {
            carol.log(&g).sent(seq);
            (&mut carol, &mut bob, e)
        }
        other => panic!("expected exactly one winner: {other:?}"),
    };
    assert_eq!(loser_result.code(), Some(ErrorCode::StaleEpoch), "{loser_result}");
    winner.member.merge_pending(&g).unwrap();
    loser.member.discard_pending(&g).unwrap();
    loser.sync(&g).await;
    let retry = loser.member.commit_pending(&g).unwrap();
    let (seq, _) = loser.conn.commit(retry).await.unwrap();
    loser.log(&g).sent(seq);
    loser.member.merge_pending(&g).unwrap();
    winner.sync(&g).await;
    alice.sync(&g).await;
    let a = alice.member.epoch_authenticator(&g);
    assert_eq!(a, bob.member.epoch_authenticator(&g));
    assert_eq!(a, carol.member.epoch_authenticator(&g));
}

async fn an_offline_member_gets_everything_in_order_even_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut alice, mut bob, mut carol, g) = trio(&server).await;
    carol.conn.quic().close(0u32.into(), b"offline");
    for i in 0..10 {
        alice.text(&g, &format!("m{i}")).await.unwrap();
        bob.text(&g, &format!("n{i}")).await.unwrap();
    }
    // Restart between send and fetch.
    let port = server.port();
    let dir = server.data_dir.clone();
    let (status, _) = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success());
    let server = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);
    carol.reconnect(&server).await;
    let expected: Vec<String> = (0..10).flat_map(|i| [format!("m{i}"), format!("n{i}")]).collect();
    assert_eq!(texts(&carol.sync(&g).await), expected);
    alice.reconnect(&server).await;
    alice.text(&g, "still working").await.unwrap();
    assert_eq!(texts(&carol.sync(&g).await), ["still working"]);
}

async fn online_members_get_pushes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut alice, mut bob, _carol, g) = trio(&server).await;
    let seq = alice.text(&g, "pushed").await.unwrap();
    let mut pushes = tokio::time::timeout(WAIT, bob.conn.pushes()).await.unwrap().unwrap();
    loop {
        match tokio::time::timeout(WAIT, pushes.next()).await.unwrap().unwrap() {
            Some(Push::Message { group, seq: s, ciphertext: Some(ct), .. }) if s == seq => {
                assert_eq!(group, g);
                let got = bob.member.receive(&g, &ct).unwrap();
                assert_eq!(texts(&[got]), ["pushed"]);
                break;
            }
            Some(_) => continue,
            None => panic!("push stream ended"),
        }
    }
}

async fn key_package_claims_never_repeat() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let target = User::new(&server).await;
    let extra = target.member.key_packages(15).unwrap();
    let (held, lr) = target.conn.publish_key_packages(extra, None).await.unwrap();
    assert_eq!((held, lr), (19, true));
    let a = User::new(&server).await;
    let b = User::new(&server).await;
    let mut claims = vec![];
    let t = target.account();
    for _ in 0..10 {
        let (x, y) = tokio::join!(a.conn.claim_key_packages(&t), b.conn.claim_key_packages(&t));
        claims.extend(x.unwrap());
        claims.extend(y.unwrap());
    }
    // 19 regular packages, then the last-resort one (kept, so it may repeat).
    let regular = &claims[..19];
    let mut unique = regular.to_vec();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 19, "a KeyPackage was handed out twice");
    assert_eq!(target.conn.count_key_packages().await.unwrap(), (0, true));
}

async fn the_server_stores_only_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (mut alice, mut bob, mut carol, g) = trio(&server).await;
    let marker = format!("MARKER-{}-secret", hush::auth::InviteToken::generate().unwrap());
    for _ in 0..3 {
        alice.text(&g, &marker).await.unwrap();
    }
    assert_eq!(texts(&bob.sync(&g).await), vec![marker.clone(); 3]);
    // Leave one member behind so the messages stay stored, then stop cleanly
    // (a checkpoint moves the WAL into the database) and look everywhere.
    let _ = &mut carol;
    let dir = server.data_dir.clone();
    let (_, stderr) = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(!stderr.contains(&marker));
    let mut scanned = 0;
    for path in files_under(&dir) {
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()), "plaintext found in {}", path.display());
    }
    assert!(scanned > 0);
    if let Some(cluster) = cluster_files() {
        // On PostgreSQL: the whole cluster (tables, WAL, server log), once a
        // checkpoint has written everything out. The group id is stored in
        // the clear, so the scan must find it: it reads what was written.
        checkpoint();
        let (marker_found, group_found) = scan(&cluster, &[marker.as_bytes(), &g[..]]);
        assert!(group_found, "the scan of {} did not even find the group id", cluster.display());
        assert!(!marker_found, "plaintext found in the PostgreSQL cluster");
    }
}

/// Whether each needle occurs in some file under `dir`.
fn scan(dir: &std::path::Path, needles: &[&[u8]; 2]) -> (bool, bool) {
    let mut found = (false, false);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let (a, b) = scan(&path, needles);
            found = (found.0 || a, found.1 || b);
        } else if let Ok(bytes) = std::fs::read(&path) {
            let has = |n: &[u8]| bytes.windows(n.len()).any(|w| w == n);
            found = (found.0 || has(needles[0]), found.1 || has(needles[1]));
        }
    }
    found
}

async fn a_full_group_log_refuses_new_messages_keeps_the_old_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_MAX_LOG_PER_GROUP", "4")]);
    let (mut alice, mut bob, mut carol, g) = trio(&server).await;
    // The add commit plus three messages fill the log.
    for t in ["one", "two", "three"] {
        alice.text(&g, t).await.unwrap();
    }
    let err = alice.text(&g, "four").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
    assert!(err.to_string().contains("unread messages"), "{err}");
    // Nothing stored was lost; reads work.
    assert_eq!(texts(&bob.sync(&g).await), ["one", "two", "three"]);
    assert_eq!(texts(&carol.sync(&g).await), ["one", "two", "three"]);
    alice.sync(&g).await;
    // Everyone acknowledged: room again.
    alice.text(&g, "four").await.unwrap();
    assert_eq!(texts(&bob.sync(&g).await), ["four"]);
}

crate::on_both_backends! {
    sync: [],
    async: [a_group_of_three_talks_adds_and_removes, concurrent_commits_exactly_one_wins_and_all_converge, an_offline_member_gets_everything_in_order_even_across_a_restart, online_members_get_pushes, key_package_claims_never_repeat, the_server_stores_only_ciphertext, a_full_group_log_refuses_new_messages_keeps_the_old_and_recovers],
}

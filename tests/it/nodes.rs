//! Several `hushd` nodes on one PostgreSQL database, as an operator runs
//! them: the same keys (copied), one database, clients on either node.
//! PostgreSQL only (skipped, saying why, without its binaries).

use std::time::Duration;

use hush::client::mls::Received;
use hush::client::{Connection, PushStream};
use hush::wire::Push;

use crate::hardening::{group_across, race_commits};
use crate::support::*;

/// Load tests measure the server, not its rate limiter.
const UNLIMITED: &[(&str, &str)] = &[("HUSHD_REQUESTS_PER_SECOND_PER_ACCOUNT", "1000000")];

/// Two nodes of one server; `None` without PostgreSQL.
fn two_nodes(tmp: &std::path::Path) -> Option<(Hushd, Hushd)> {
    if !on_postgres() {
        return None;
    }
    let (a, b) = (tmp.join("node1"), tmp.join("node2"));
    let first = Hushd::start_with(&a, "127.0.0.1:0", UNLIMITED);
    second_node(&a, &b);
    let second = Hushd::start_with(&b, "127.0.0.1:0", UNLIMITED);
    assert_eq!(first.address.fingerprint, second.address.fingerprint, "one server, one fingerprint");
    assert_ne!(first.port(), second.port());
    Some((first, second))
}

/// Waits (bounded) for the push of `seq` in `group` and returns its
/// ciphertext; `pushes` is the connection's push stream once it opened.
async fn pushed(conn: &Connection, pushes: &mut Option<PushStream>, group: &[u8], seq: u64) -> Vec<u8> {
    if pushes.is_none() {
        *pushes = Some(tokio::time::timeout(WAIT, conn.pushes()).await.expect("no push within the wait").unwrap());
    }
    let Some(pushes) = pushes.as_mut() else { unreachable!() };
    loop {
        match tokio::time::timeout(WAIT, pushes.next()).await.expect("no push within the wait").unwrap() {
            Some(Push::Message { group: g, seq: s, ciphertext: Some(ct), .. }) if g == group && s == seq => return ct,
            Some(_) => continue,
            None => panic!("push stream ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_on_one_node_and_bob_on_the_other_converse_with_live_pushes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let (mut peers, g) = group_across(&[&node1, &node2], 2).await;
    let [alice, bob] = &mut peers[..] else { unreachable!() };
    let mut alice_pushes = None;
    let mut bob_pushes = None;
    for round in 0..5 {
        // alice (node 1) → bob (node 2), pushed live across nodes.
        let m = alice.mls.encrypt(&g, format!("hello bob {round}").as_bytes()).unwrap();
        let (seq, _) = alice.conn.send(m, None).await.unwrap();
        alice.log.sent(seq);
        let ct = pushed(&bob.conn, &mut bob_pushes, &g, seq).await;
        assert_eq!(Received::texts(&[bob.mls.receive(&g, &ct).unwrap()]), [format!("hello bob {round}")]);
        // bob (node 2) → alice (node 1).
        let m = bob.mls.encrypt(&g, format!("hello alice {round}").as_bytes()).unwrap();
        let (seq, _) = bob.conn.send(m, None).await.unwrap();
        let ct = pushed(&alice.conn, &mut alice_pushes, &g, seq).await;
        assert_eq!(Received::texts(&[alice.mls.receive(&g, &ct).unwrap()]), [format!("hello alice {round}")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_on_two_nodes_race_commits_and_one_wins_each_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let wins = race_commits(&[&node1, &node2]).await;
    eprintln!("20 epochs, accepted commits by node: {wins:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_node_under_load_loses_nothing_and_the_other_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((mut node1, node2)) = two_nodes(tmp.path()) else { return };
    let listen1 = format!("127.0.0.1:{}", node1.port());
    // alice writes through node 1, carol through node 2, bob checks.
    let (mut peers, g) = group_across(&[&node1, &node2, &node2], 3).await;
    let mut carol = peers.pop().unwrap();
    let mut bob = peers.pop().unwrap();
    let mut alice = peers.pop().unwrap();
    let mut acked: Vec<(u64, String)> = vec![];
    let mut counter = 0u64;
    for round in 0..3 {
        // Both write until node 1 is killed; carol's node must not notice.
        let killer = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(150 + 100 * round));
            node1.kill9();
        });
        tokio::pin!(killer);
        loop {
            counter += 1;
            let text = format!("a{counter}");
            let m = alice.mls.encrypt(&g, text.as_bytes()).unwrap();
            let sent = tokio::select! {
                r = alice.conn.send(m, None) => r,
                k = &mut killer => { k.unwrap(); break; }
            };
            match sent {
                Ok((seq, _)) => {
                    alice.log.sent(seq);
                    acked.push((seq, text));
                }
                Err(_) => {
                    (&mut killer).await.unwrap();
                    break;
                }
            }
            let text = format!("c{counter}");
            let m = carol.mls.encrypt(&g, text.as_bytes()).unwrap();
            let (seq, _) = carol.conn.send(m, None).await.expect("the other node keeps serving");
            carol.log.sent(seq);
            acked.push((seq, text));
        }
        // alice reconnects to the surviving node and goes on.
        alice.conn = Connection::connect(&node2.address, &alice.id).await.unwrap();
        for _ in 0..5 {
            counter += 1;
            let text = format!("a{counter}");
            let m = alice.mls.encrypt(&g, text.as_bytes()).unwrap();
            let (seq, _) = alice.conn.send(m, None).await.unwrap();
            alice.log.sent(seq);
            acked.push((seq, text));
        }
        node1 = Hushd::start_with(&tmp.path().join("node1"), &listen1, UNLIMITED);
        alice.conn = Connection::connect(&node1.address, &alice.id).await.unwrap();
    }
    // Everything acknowledged by either node is there, once, in order.
    let stored: Vec<(u64, String)> = bob
        .sync(&g)
        .await
        .into_iter()
        .map(|(seq, r)| match r {
            Received::Application { data, .. } => (seq, String::from_utf8(data).unwrap()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    for (seq, text) in &acked {
        let found = stored.iter().filter(|(s, t)| s == seq && t == text).count();
        assert_eq!(found, 1, "acknowledged message {seq} ({text}) stored {found} times");
    }
    let mut texts: Vec<&String> = stored.iter().map(|(_, t)| t).collect();
    let all = texts.len();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), all, "a message was stored twice");
    let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "sequences have gaps: {seqs:?}");
    assert!(acked.len() > 20, "too few writes to mean anything: {}", acked.len());
    eprintln!("two nodes, node 1 killed 3 times: {} acknowledged, {} stored, 0 lost", acked.len(), stored.len());
    drop(node2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_listen_connection_has_its_clients_resync_and_pushes_again() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let (mut peers, g) = group_across(&[&node1, &node2], 2).await;
    let [alice, bob] = &mut peers[..] else { unreachable!() };
    let mut bob_pushes = None;
    let m = alice.mls.encrypt(&g, b"before").unwrap();
    let (seq, _) = alice.conn.send(m, None).await.unwrap();
    alice.log.sent(seq);
    pushed(&bob.conn, &mut bob_pushes, &g, seq).await;
    // The database drops both nodes' listening connections (as a restart or
    // a network cut would); what is sent meanwhile may never be announced.
    sql(
        &tmp.path().join("node1"),
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hushd-listen' AND datname = current_database()",
    );
    let m = alice.mls.encrypt(&g, b"while reconnecting").unwrap();
    let (missed, _) = alice.conn.send(m, None).await.unwrap();
    alice.log.sent(missed);
    // bob is told to resync once node 2 listens again, and reads it.
    let pushes = bob_pushes.as_mut().unwrap();
    loop {
        match tokio::time::timeout(WAIT, pushes.next()).await.expect("no resync within the wait").unwrap() {
            Some(Push::Resync) => break,
            Some(_) => continue,
            None => panic!("push stream ended"),
        }
    }
    let got: Vec<String> = bob.sync(&g).await.into_iter().map(|(_, r)| Received::texts(&[r]).concat()).collect();
    assert!(got.contains(&"while reconnecting".to_string()), "{got:?}");
    // And live pushes cross nodes again.
    let m = alice.mls.encrypt(&g, b"after").unwrap();
    let (seq, _) = alice.conn.send(m, None).await.unwrap();
    let ct = pushed(&bob.conn, &mut bob_pushes, &g, seq).await;
    assert_eq!(Received::texts(&[bob.mls.receive(&g, &ct).unwrap()]), ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_account_from_one_node_closes_its_connections_on_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let (_, conn, member) = registered_member(&node2).await;
    conn.status().await.unwrap();
    let account = member.account().to_string();
    let dir = node1.data_dir.clone();
    let out = tokio::task::spawn_blocking(move || run(hushd_command(&dir).args(["accounts", "remove", &account])))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    match tokio::time::timeout(WAIT, conn.closed()).await.expect("the device's connection on node 2 stayed open") {
        hush::client::ClientError::Closed { code, .. } => assert_eq!(code, u64::from(hush::wire::close::REVOKED)),
        other => panic!("unexpected close: {other:?}"),
    }
}

/// The key the nodes of `node`'s deployment authenticate wake-ups with
/// (derived from the server key, as they derive it).
fn wake_key(node: &Hushd) -> hush::db::pg::WakeKey {
    hush::db::pg::WakeKey::of(&hush::auth::Identity::load(&node.data_dir.join("server.key")).unwrap()).unwrap()
}

/// Issue 29, finding 6: any role that could connect to the database could
/// `NOTIFY` hush's channel, and a forged `r:` notice naming a device closed
/// its connections on every node. Notices now name nothing (a node and a
/// row of `notices`), and a node closes a device's connections only if the
/// devices table says it is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_29_a_forged_notify_does_not_disconnect_a_live_device() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let (mut peers, g) = group_across(&[&node1, &node2], 2).await;
    let [alice, bob] = &mut peers[..] else { unreachable!() };
    let mut bob_pushes = None;
    let bob_device: String = bob.id.public_key().iter().map(|b| format!("{b:02x}")).collect();
    let db = tmp.path().join("node1");
    // A live push across nodes, after `forge` ran on another connection:
    // node 2 handles notices in commit order, so once bob has this push,
    // node 2 has handled the forged ones; bob's connection must be open.
    let mut round = 0;
    let mut still_connected =
        async |alice: &mut crate::hardening::Peer, bob: &mut crate::hardening::Peer, forge: &str| {
            sql(&db, forge);
            round += 1;
            let text = format!("after forgery {round}");
            let m = alice.mls.encrypt(&g, text.as_bytes()).unwrap();
            let (seq, _) = alice.conn.send(m, None).await.unwrap();
            alice.log.sent(seq);
            let ct = pushed(&bob.conn, &mut bob_pushes, &g, seq).await;
            assert_eq!(Received::texts(&[bob.mls.receive(&g, &ct).unwrap()]), [text]);
            bob.conn.status().await.expect("bob's connection was closed by a forged notice");
        };
    // The notice format of old: a device key in the clear.
    still_connected(alice, bob, &format!("NOTIFY hush, '0000000000000000:r:{bob_device}'")).await;
    // Wake-ups naming rows as they did before they were authenticated.
    still_connected(alice, bob, "SELECT pg_notify('hush', '0000000000000000:' || n) FROM generate_series(1, 100) n")
        .await;
    // Even a forged row (which needs rights on the table, as the test's
    // superuser has) with an authenticated wake-up (which needs the server
    // key too: only the operator has both) is checked against the devices
    // table.
    let key = wake_key(&node1);
    still_connected(
        alice,
        bob,
        &format!(
            "INSERT INTO notices (node, nseq, kind, device) VALUES (7, 1, 'r', '\\x{bob_device}');
             NOTIFY hush, '{}'",
            hush::db::pg::wake_up_text(&key, 7, 1, hush::util::now_unix())
        ),
    )
    .await;
    // A genuine revocation from node 1 still closes bob's connection on node 2.
    let account = bob.mls.account().to_string();
    let dir = node1.data_dir.clone();
    let out = tokio::task::spawn_blocking(move || run(hushd_command(&dir).args(["accounts", "remove", &account])))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    match tokio::time::timeout(WAIT, bob.conn.closed()).await.expect("bob's connection on node 2 stayed open") {
        hush::client::ClientError::Closed { code, .. } => assert_eq!(code, u64::from(hush::wire::close::REVOKED)),
        other => panic!("unexpected close: {other:?}"),
    }
    drop(node2);
}

/// Issue 29 (left open in session 9): wake-ups were not authenticated, so
/// any role that could connect to the database could send enough of them to
/// fill a node's queue, and the node told every connection to resync. Now a
/// node takes only wake-ups whose tag verifies under the key derived from
/// the server key, each number of each node once and upwards, and only
/// recent ones: floods of the old form, of forged tags, of a genuine
/// wake-up replayed and of old genuine ones leave bob's live pushes alone
/// (no resync before the next message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_forged_or_replayed_wake_ups_make_no_node_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let (mut peers, g) = group_across(&[&node1, &node2], 2).await;
    let [alice, bob] = &mut peers[..] else { unreachable!() };
    let db = tmp.path().join("node1");
    let mut bob_pushes: Option<PushStream> = None;
    let mut round = 0;
    let mut no_resync = async |alice: &mut crate::hardening::Peer, bob: &mut crate::hardening::Peer, flood: &str| {
        sql(&db, flood);
        round += 1;
        let text = format!("after flood {round}");
        let m = alice.mls.encrypt(&g, text.as_bytes()).unwrap();
        let (seq, _) = alice.conn.send(m, None).await.unwrap();
        alice.log.sent(seq);
        if bob_pushes.is_none() {
            bob_pushes = Some(tokio::time::timeout(WAIT, bob.conn.pushes()).await.expect("no push stream").unwrap());
        }
        let Some(pushes) = bob_pushes.as_mut() else { unreachable!() };
        loop {
            match tokio::time::timeout(WAIT, pushes.next()).await.expect("no push within the wait").unwrap() {
                Some(Push::Message { group, seq: s, ciphertext: Some(ct), .. }) if group == g && s == seq => {
                    assert_eq!(Received::texts(&[bob.mls.receive(&g, &ct).unwrap()]), [text]);
                    break;
                }
                Some(Push::Resync) => panic!("flood {round} made node 2 tell bob to resync"),
                Some(_) => continue,
                None => panic!("push stream ended"),
            }
        }
    };
    // A genuine message first: node 1 has numbered a notice, and bob's
    // push stream is open.
    no_resync(alice, bob, "SELECT 1").await;
    // Far more than a node's queue holds, of each kind.
    let flood = 3 * hush::limits::NOTICE_QUEUE;
    // The form wake-ups had before: a node and a row.
    no_resync(
        alice,
        bob,
        &format!("SELECT pg_notify('hush', '0000000000000000:' || n) FROM generate_series(1, {flood}) n"),
    )
    .await;
    // Well-formed, with tags no key made, from ever new "nodes".
    no_resync(
        alice,
        bob,
        &format!(
            "SELECT pg_notify('hush', lpad(to_hex(n), 16, '0') || ':1:' || encode(sha256(int8send(n)), 'hex'))
             FROM generate_series(1, {flood}) n"
        ),
    )
    .await;
    // node 1's newest genuine wake-up, replayed (each in its own
    // transaction: PostgreSQL folds equal payloads of one transaction).
    let url = database_for(&db).unwrap();
    let (node, nseq): (i64, i64) = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let row = client.query_one("SELECT node, nseq FROM notices ORDER BY id DESC LIMIT 1", &[]).unwrap();
        (row.get(0), row.get(1))
    })
    .await
    .unwrap();
    let genuine = hush::db::pg::wake_up_text(
        &wake_key(&node1),
        u64::from_le_bytes(node.to_le_bytes()),
        nseq,
        hush::util::now_unix(),
    );
    let replays = format!("BEGIN; NOTIFY hush, '{genuine}'; COMMIT;\n").repeat(flood);
    no_resync(alice, bob, &replays).await;
    // Genuine wake-ups recorded long ago, of node processes long gone
    // (their rows expired, so nothing tells a listener it saw them): each
    // is new to the listener, but too old to be taken.
    let key = wake_key(&node1);
    let long_ago = hush::util::now_unix() - 3600;
    let stale: String = (1..=flood as u64)
        .map(|node| format!("NOTIFY hush, '{}';\n", hush::db::pg::wake_up_text(&key, node, 1, long_ago)))
        .collect();
    no_resync(alice, bob, &stale).await;
    drop(node2);
}

/// Red team (session 30): a listener remembered the last number of each
/// node only in memory, so a node that restarts takes every genuine
/// wake-up again. A role that can only connect (it LISTENs and records
/// them) replays node 1's recent wake-ups to the restarted node 2, which
/// pushes bob messages he already had (and, with more than a queue's worth
/// recorded, tells every connection to resync). A listener now starts from
/// the newest number of each node in `notices`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_takes_no_replayed_wake_up() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((node1, node2)) = two_nodes(tmp.path()) else { return };
    let (mut peers, g) = group_across(&[&node1, &node2], 2).await;
    let [alice, bob] = &mut peers[..] else { unreachable!() };
    let db = tmp.path().join("node1");
    let m = alice.mls.encrypt(&g, b"said once").unwrap();
    let (old, _) = alice.conn.send(m, None).await.unwrap();
    alice.log.sent(old);
    // What the listening role heard: node 1's genuine wake-ups (read back
    // here from the rows, with the deployment's key: the same texts).
    let url = database_for(&db).unwrap();
    let heard: Vec<String> = {
        let key = wake_key(&node1);
        tokio::task::spawn_blocking(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            client
                .query("SELECT node, nseq FROM notices ORDER BY id", &[])
                .unwrap()
                .iter()
                .map(|r| {
                    let node = u64::from_le_bytes(r.get::<_, i64>(0).to_le_bytes());
                    hush::db::pg::wake_up_text(&key, node, r.get(1), hush::util::now_unix())
                })
                .collect()
        })
        .await
        .unwrap()
    };
    assert!(!heard.is_empty());
    // Node 2 restarts (a new process); bob connects to it again.
    let dir2 = node2.data_dir.clone();
    drop(node2);
    let node2 = Hushd::start_with(&dir2, "127.0.0.1:0", UNLIMITED);
    let conn = Connection::connect(&node2.address, &bob.id).await.unwrap();
    conn.groups().await.unwrap();
    let replays: String = heard.iter().map(|w| format!("BEGIN; NOTIFY hush, '{w}'; COMMIT;\n")).collect();
    sql(&db, &replays);
    // A genuine message after the replays: bob gets it, and nothing before.
    let m = alice.mls.encrypt(&g, b"said after").unwrap();
    let (new, _) = alice.conn.send(m, None).await.unwrap();
    let mut pushes = tokio::time::timeout(WAIT, conn.pushes()).await.expect("no push stream").unwrap();
    loop {
        match tokio::time::timeout(WAIT, pushes.next()).await.expect("no push within the wait").unwrap() {
            Some(Push::Message { group, seq, .. }) if group == g && seq == new => break,
            Some(Push::Message { group, seq, .. }) if group == g => {
                panic!("a replayed wake-up made the restarted node push seq {seq} again (the message was {old})")
            }
            Some(Push::Resync) => panic!("the replays made the restarted node tell bob to resync"),
            Some(_) => continue,
            None => panic!("push stream ended"),
        }
    }
    drop(node2);
}

/// One device opens uploads on two nodes at once, with room in its quota
/// for one: never do both fit (each node's check must see the other's
/// open, as the device cap's does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_both_open_an_upload_the_quota_has_room_for_once() {
    if !on_postgres() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("node1"), tmp.path().join("node2"));
    let env = [("HUSHD_REQUESTS_PER_SECOND_PER_ACCOUNT", "1000000"), ("HUSHD_STORAGE_QUOTA_MB", "1")];
    let node1 = Hushd::start_with(&a, "127.0.0.1:0", &env);
    second_node(&a, &b);
    let node2 = Hushd::start_with(&b, "127.0.0.1:0", &env);
    let (key, one, mut mls) = registered_member(&node1).await;
    let g = mls.create_group(&one.status().await.unwrap().removal_key).unwrap();
    one.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let two = Connection::connect(&node2.address, &key).await.unwrap();
    let size = hush::files::Layout::of_size(700_000).unwrap().blob;
    let mut both = 0;
    for _ in 0..40 {
        let (x, y) = tokio::join!(one.upload_open(&g.id, size), two.upload_open(&g.id, size));
        if x.is_ok() && y.is_ok() {
            both += 1;
        }
        for state in [x, y].into_iter().flatten() {
            one.upload_cancel(state.id).await.unwrap();
        }
    }
    assert_eq!(both, 0, "{both} of 40 times both nodes opened an upload where the quota had room for one");
}

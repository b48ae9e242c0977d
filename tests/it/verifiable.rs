//! Verifiable delivery (issue 31): a server that drops, swaps, changes,
//! forks or withholds a group's messages is caught by the members, with
//! evidence a third party can check.

use std::path::Path;

use hush::auth::Identity;
use hush::chain::{Head, SignedHead};
use hush::client::Connection;

use crate::cli::{run_ok, team, Person};
use crate::support::*;

/// Runs SQL on the stopped server's SQLite database.
fn tamper(data_dir: &Path, statement: &str) {
    let db = rusqlite::Connection::open(data_dir.join(hush::db::sqlite::DB_FILE)).unwrap();
    db.execute_batch(statement).unwrap();
}

/// The last `n` sequence numbers of the server's log, oldest first.
fn last_seqs(data_dir: &Path, n: usize) -> Vec<i64> {
    let db = rusqlite::Connection::open(data_dir.join(hush::db::sqlite::DB_FILE)).unwrap();
    let mut seqs: Vec<i64> = db
        .prepare("SELECT seq FROM log ORDER BY seq DESC")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .take(n)
        .collect();
    seqs.reverse();
    seqs
}

/// `hush verify GROUP --json`, parsed, and whether it exited 0.
fn verify_json(p: &Person, group: &str) -> (serde_json::Value, bool) {
    let out = hush(&p.home, &["verify", group, "--json"]);
    let v = serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    (v, out.status.success())
}

/// The operator, with the server stopped, deletes one stored message,
/// swaps two, or changes one byte of one: the next sync of a member that
/// had not read them alarms, naming the group and the position, and
/// `hush verify` exits non-zero.
#[test]
fn an_operator_who_deletes_swaps_or_changes_stored_messages_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "before"]);
    run_ok(&bob, &["sync"]);
    let (v, healthy) = verify_json(&bob, "team");
    assert!(healthy && v["status"] == "ok", "{v}");
    assert!(v["alarms"].as_array().unwrap().is_empty());

    type Attack = (&'static str, usize, fn(&[i64]) -> String, &'static str);
    let attacks: [Attack; 3] = [
        ("delete", 3, |s| format!("DELETE FROM log WHERE seq = {}", s[1]), "skipped from message"),
        (
            "swap",
            2,
            |s| {
                format!(
                    "UPDATE log SET data = CASE seq WHEN {a} THEN (SELECT data FROM log WHERE seq = {b}) \
                     ELSE (SELECT data FROM log WHERE seq = {a}) END WHERE seq IN ({a}, {b})",
                    a = s[0],
                    b = s[1]
                )
            },
            "does not follow from the messages before it",
        ),
        (
            "change a byte",
            1,
            |s| {
                format!(
                    "UPDATE log SET data = CAST(substr(data, 1, length(data) - 1) || \
                     (CASE WHEN substr(data, -1) = X'00' THEN X'01' ELSE X'00' END) AS BLOB) WHERE seq = {}",
                    s[0]
                )
            },
            "does not follow from the messages before it",
        ),
    ];
    let mut alarms = 0;
    for (what, n, statement, says) in attacks {
        for i in 0..n {
            run_ok(&alice, &["send", "team", &format!("{what} {i}")]);
        }
        let seqs = last_seqs(&server.data_dir, n);
        let (dir, port) = (server.data_dir.clone(), server.port());
        let (status, _) = server.terminate();
        assert!(status.success());
        tamper(&dir, &statement(&seqs));
        server = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);

        let out = hush(&bob.home, &["sync"]);
        assert!(!out.status.success(), "{what}: the sync said nothing was wrong: {}", stdout(&out));
        let printed = stdout(&out);
        let line = printed.lines().find(|l| l.contains("ALARM")).unwrap_or_else(|| panic!("{what}: {printed}"));
        assert!(line.starts_with("[team] !!") && line.contains(says), "{what}: {line}");
        let at = if what == "delete" { seqs[2] } else { seqs[0] };
        assert!(line.contains(&format!("message {at}")), "{what}: the alarm does not name the position: {line}");
        assert!(stderr(&out).contains("hush verify"), "{what}: {}", stderr(&out));
        alarms += 1;

        let out = hush(&bob.home, &["verify", "team"]);
        assert!(!out.status.success(), "{what}: verify exited 0");
        let (v, _) = verify_json(&bob, "team");
        assert_eq!(v["status"], "alarm");
        assert_eq!(v["alarms"].as_array().unwrap().len(), alarms, "{what}: {v}");
        // The alarm stays in the history: it never scrolls away silently.
        assert!(ok(hush(&bob.home, &["read", "team"])).contains("!! ALARM"));
    }
    // The members who read the history before the operator touched it see
    // nothing wrong (nothing was shown to them twice).
    let (v, healthy) = verify_json(&alice, "team");
    assert!(healthy, "{v}");
}

/// A head a third party checks: the signature verifies under the key, and
/// the key is the one the server's address pins.
fn signed_head_of(v: &serde_json::Value, pinned: &hush::auth::Fingerprint) -> (Vec<u8>, SignedHead) {
    let bytes = |k: &str| -> Vec<u8> {
        let s = v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"));
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    };
    let group = bytes("group");
    let signed = SignedHead {
        seq: v["seq"].as_u64().unwrap(),
        head: Head(bytes("head").try_into().unwrap()),
        key: bytes("key").try_into().unwrap(),
        signature: bytes("signature").try_into().unwrap(),
        cert: None,
    };
    // Independently of hush's own check: ring over the documented message.
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, signed.key);
    key.verify(&SignedHead::message(&group, signed.seq, &signed.head), &signed.signature)
        .expect("the server's signature verifies");
    let spki = hush::auth::cert::ed25519_spki(&signed.key);
    assert!(hush::auth::Fingerprint::of_spki(&spki).matches(pinned), "signed by the pinned key");
    (group, signed)
}

/// A fork: two servers with the same key serve bob and carol different
/// histories. As soon as one of carol's messages reaches bob's side, bob's
/// client alarms and holds two heads for one sequence number, both signed
/// by the server: a proof of equivocation anyone can check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_forks_a_group_is_caught_with_two_signed_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    let server_a = Hushd::start(&a_dir);
    let (alice, bob, carol) = tokio::task::block_in_place(|| team(&server_a, tmp.path()));
    tokio::task::block_in_place(|| {
        run_ok(&alice, &["send", "team", "one history"]);
        run_ok(&bob, &["sync"]);
        run_ok(&carol, &["sync"]);
    });

    // The operator copies its server (same key, same database) and from now
    // on serves carol from the copy.
    let port = server_a.port();
    let (status, _) = server_a.terminate();
    assert!(status.success());
    let b_dir = tmp.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    for entry in std::fs::read_dir(&a_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), b_dir.join(entry.file_name())).unwrap();
        }
    }
    let server_a = Hushd::start_with(&a_dir, &format!("127.0.0.1:{port}"), &[]);
    let server_b = Hushd::start(&b_dir);
    assert_eq!(server_a.address.fingerprint, server_b.address.fingerprint);
    std::fs::write(carol.home.join("server"), format!("{}\n", server_b.address)).unwrap();

    // Two histories: alice writes on a, carol on b.
    let seq = tokio::task::block_in_place(|| {
        run_ok(&alice, &["send", "team", "only bob sees this"]);
        run_ok(&carol, &["send", "team", "only carol sees this"]);
        // Carol reads her side (the server signs her head there), then
        // writes again: her message claims that signed head.
        run_ok(&carol, &["sync"]);
        run_ok(&carol, &["send", "team", "still here"]);
        last_seqs(&b_dir, 1)[0]
    });
    let healthy = tokio::task::block_in_place(|| hush(&bob.home, &["verify", "team"]));
    assert!(healthy.status.success(), "no alarm before the histories meet");
    eprintln!("--- hush verify team (healthy)\n{}", stdout(&healthy));

    // The operator relays carol's last message to bob's side (it holds the
    // bytes; as carol's device here, the server it would be).
    let carols = {
        let db = rusqlite::Connection::open(b_dir.join(hush::db::sqlite::DB_FILE)).unwrap();
        db.query_row("SELECT data FROM log WHERE seq = ?1", [seq], |r| r.get::<_, Vec<u8>>(0)).unwrap()
    };
    let carol_device = Identity::load(&carol.home.join("device.key")).unwrap();
    let relay = Connection::connect(&server_a.address, &carol_device).await.unwrap();
    relay.send(carols, None).await.unwrap();
    relay.close().await;

    let out = tokio::task::block_in_place(|| hush(&bob.home, &["sync"]));
    assert!(!out.status.success(), "bob's sync saw nothing wrong: {}", stdout(&out));
    let printed = stdout(&out);
    assert!(printed.contains("still here"), "carol's message is still shown: {printed}");
    assert!(printed.contains("!! ALARM") && printed.contains("another history"), "{printed}");

    let human = tokio::task::block_in_place(|| hush(&bob.home, &["verify", "team"]));
    assert!(!human.status.success());
    // What README shows.
    eprintln!("--- hush verify team (forked)\n{}{}", stdout(&human), stderr(&human));
    assert!(stdout(&human).contains("!!") && stderr(&human).contains("alarm"), "{}", stdout(&human));
    let (v, healthy) = tokio::task::block_in_place(|| verify_json(&bob, "team"));
    assert!(!healthy);
    let fork = v["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["evidence"]["kind"] == "fork")
        .unwrap_or_else(|| panic!("no fork evidence: {v}"));
    let pinned = server_a.address.fingerprint;
    let (g1, theirs) = signed_head_of(&fork["evidence"]["theirs"], &pinned);
    let (g2, ours) = signed_head_of(&fork["evidence"]["ours"], &pinned);
    assert_eq!(g1, g2, "one group");
    assert_eq!(theirs.seq, ours.seq, "one sequence number");
    assert_eq!(theirs.key, ours.key, "one key");
    assert_ne!(theirs.head, ours.head, "two histories: the server equivocated");
    drop(server_b);
}

/// Retention deleting messages a device never read is told, not an alarm,
/// for a device that has not read the group for as long as the server
/// keeps messages; the same gap for a device that read the group recently
/// (so the messages cannot have expired) is an alarm.
#[test]
fn expired_messages_are_told_to_a_long_absent_reader_and_an_alarm_for_a_recent_one() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "read by all"]);
    run_ok(&bob, &["sync"]);
    run_ok(&carol, &["sync"]);
    run_ok(&alice, &["send", "team", "will expire 1"]);
    run_ok(&alice, &["send", "team", "will expire 2"]);
    let expiring = last_seqs(&server.data_dir, 2);
    let (dir, port) = (server.data_dir.clone(), server.port());
    let (status, _) = server.terminate();
    assert!(status.success());
    // As if written long ago: the restarted server's first sweep deletes
    // them (unread by bob and carol).
    tamper(&dir, &format!("UPDATE log SET created_at = 0 WHERE seq IN ({}, {})", expiring[0], expiring[1]));
    let server = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);
    run_ok(&alice, &["send", "team", "after the sweep"]);
    let db = rusqlite::Connection::open(server.data_dir.join(hush::db::sqlite::DB_FILE)).unwrap();
    let left: i64 = db
        .query_row("SELECT count(*) FROM log WHERE seq IN (?1, ?2)", [expiring[0], expiring[1]], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "the sweep deleted them");

    // Carol has been away longer than the server keeps messages.
    let state = rusqlite::Connection::open(carol.home.join("hush.db")).unwrap();
    state.execute("UPDATE groups SET synced_at = 0", []).unwrap();
    drop(state);
    let told = run_ok(&carol, &["sync"]);
    assert!(told.contains("expired on the server") && told.contains("after the sweep"), "{told}");
    assert!(!told.contains("ALARM"), "{told}");
    ok(hush(&carol.home, &["verify", "team"]));

    // Bob read the group a moment ago: those messages cannot have expired.
    let out = hush(&bob.home, &["sync"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("!! ALARM") && stdout(&out).contains("skipped from message"), "{}", stdout(&out));
}

/// A device's app and its connection.
struct Device {
    app: hush::client::app::App,
    conn: Connection,
}

impl Device {
    async fn open(home: &Path) -> Self {
        let app = hush::client::home::Home::new(home).open().unwrap();
        let conn = app.connect().await.unwrap();
        Self { app, conn }
    }

    async fn sync(&mut self) {
        let new = self.app.sync(&self.conn).await.unwrap();
        let alarms: Vec<_> =
            new.iter().filter(|e| e.kind == hush::client::app::EntryKind::Alarm).map(|e| e.body.clone()).collect();
        assert!(alarms.is_empty(), "alarms in normal operation: {alarms:?}");
    }
}

/// Normal operation never alarms: 10,000 messages between two people with
/// two devices each, read as they come (claims cross-checked all along),
/// a group repair, a retention sweep of messages one device never read,
/// and a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_two_devices_each_a_repair_a_sweep_and_a_restart_raise_no_alarm() {
    const MESSAGES: usize = 10_000;
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Hushd::start(&tmp.path().join("server"));
    let homes: Vec<std::path::PathBuf> =
        ["alice", "alice-laptop", "bob", "bob-laptop"].iter().map(|n| tmp.path().join(n)).collect();
    tokio::task::block_in_place(|| {
        let alice = crate::cli::person(&server, tmp.path(), "alice");
        let bob = crate::cli::person(&server, tmp.path(), "bob");
        run_ok(&alice, &["contact", "add", "bob", &bob.id]);
        run_ok(&bob, &["contact", "add", "alice", &alice.id]);
        run_ok(&alice, &["group", "create", "team"]);
        run_ok(&alice, &["group", "add", "team", "bob"]);
        run_ok(&bob, &["sync"]);
        crate::devices::link(&alice.home, &homes[1], "laptop");
        ok(hush(&homes[1], &["sync"]));
        ok(hush(&homes[2], &["sync"]));
        crate::devices::link(&bob.home, &homes[3], "laptop");
        ok(hush(&homes[3], &["sync"]));
        for h in &homes {
            ok(hush(h, &["sync"]));
        }
    });
    let mut devices = Vec::new();
    for h in &homes {
        devices.push(Device::open(h).await);
    }
    let group = devices[0].app.resolve_group("team").unwrap();
    for d in devices.iter_mut() {
        d.sync().await;
    }
    for i in 0..MESSAGES {
        // bob's laptop is away for the last stretch before the sweep.
        let away = (6_000..8_000).contains(&i);
        let who = if away { i % 3 } else { i % 4 };
        let d = &mut devices[who];
        d.app.send_text(&d.conn, &group, &format!("message {i}")).await.unwrap();
        if i % 250 == 249 {
            for (n, d) in devices.iter_mut().enumerate() {
                if !(away && n == 3) {
                    d.sync().await;
                }
            }
        }
        if i == 3_000 {
            // Group repair: bob's laptop rejoins by an external commit.
            let g = devices[3].app.resolve_group("team").unwrap();
            let d = &mut devices[3];
            d.app.rejoin_unverified(&d.conn, &g).await.unwrap();
        }
        if i == 7_999 {
            // Retention: what bob's laptop has not read is old enough to go
            // (as if it had been away that long), and the server restarts.
            let state = rusqlite::Connection::open(homes[3].join("hush.db")).unwrap();
            state.execute("UPDATE groups SET synced_at = 0", []).unwrap();
            drop(state);
            let (dir, port) = (server.data_dir.clone(), server.port());
            let (status, _) = tokio::task::block_in_place(|| server.terminate());
            assert!(status.success());
            tamper(&dir, "UPDATE log SET created_at = 0");
            server = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);
            for d in devices.iter_mut() {
                d.conn = d.app.connect().await.unwrap();
                d.sync().await;
            }
        }
    }
    // Each reads, then writes once more (what it claims is where it is).
    for d in devices.iter_mut() {
        d.sync().await;
        d.app.send_text(&d.conn, &group, "all read").await.unwrap();
    }
    for d in devices.iter_mut() {
        d.sync().await;
    }
    // Everyone read everything, verified all the way.
    let mut last = None;
    for d in &devices {
        let r = d.app.chain_report(&group).unwrap();
        assert!(r.alarms.is_empty(), "{:?}", r.alarms);
        let (at, _) = r.position.expect("a position");
        assert!(last.is_none_or(|l| l == at), "every device ends at the same head");
        last = Some(at);
        assert!(r.behind().is_empty(), "nobody reported behind at the end: {:?}", r.members);
    }
    drop(devices);
    for h in &homes {
        tokio::task::block_in_place(|| ok(hush(h, &["verify", "team"])));
    }
    drop(server);
}

/// A group from before the chain (its log stored without heads, its
/// members' clients from before it too): the chain starts at its first
/// message after the upgrade, each device says so, and nothing alarms.
#[test]
fn a_group_from_before_the_chain_starts_it_at_the_first_message_after_the_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "from before 1"]);
    run_ok(&alice, &["send", "team", "from before 2"]);
    let (dir, port) = (server.data_dir.clone(), server.port());
    let (status, _) = server.terminate();
    assert!(status.success());
    // As the server and the clients were before verifiable delivery.
    tamper(&dir, "UPDATE log SET head = NULL; UPDATE groups SET head = NULL, chain_start = NULL;");
    for p in [&alice, &bob, &carol] {
        let state = rusqlite::Connection::open(p.home.join("hush.db")).unwrap();
        state.execute_batch("DELETE FROM chains; DELETE FROM heads; UPDATE sent SET head = NULL;").unwrap();
    }
    let server = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);
    run_ok(&alice, &["send", "team", "after the upgrade"]);
    let first = last_seqs(&server.data_dir, 1)[0];
    let seen = run_ok(&bob, &["sync"]);
    assert!(seen.contains("from before 2") && seen.contains("after the upgrade"), "{seen}");
    assert!(seen.contains(&format!("delivery chain of this group begins at message {first}")), "{seen}");
    let report = run_ok(&bob, &["verify", "team"]);
    assert!(report.contains(&format!("chain verified from message {first}")), "{report}");
    run_ok(&carol, &["sync"]);
    run_ok(&carol, &["send", "team", "and on"]);
    assert!(run_ok(&bob, &["sync"]).contains("and on"));
    for p in [&alice, &bob, &carol] {
        run_ok(p, &["sync"]);
        run_ok(p, &["verify", "team"]);
    }
}

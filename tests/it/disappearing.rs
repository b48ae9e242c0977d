//! Disappearing messages (issue 33): real hushd, real clients. A group's
//! timer is set by a member's commit; when it runs out, nothing of the
//! message is left on the server (database, WAL, freed pages, blob files)
//! or on the members' devices, and nobody's delivery chain alarms.

use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{run_ok, team, Person};
use crate::support::*;

/// How long a test waits for the server's sweep (1 s here) to delete what
/// expired: generous for a loaded machine; the wait ends as soon as it did.
const SWEPT_WITHIN: Duration = Duration::from_secs(60);

/// `hush chat GROUP` in line mode, kept running: its stdin stays open and
/// its stdout lines arrive on a channel.
struct LiveChat {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl LiveChat {
    fn start(p: &Person, group: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hush"))
            .env_clear()
            .env("HOME", &p.home)
            .arg("--home")
            .arg(&p.home)
            .args(["chat", group])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // Ready once it says so (it synced and listens for pushes).
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        assert!(first.contains("chatting in"), "{first}");
        std::thread::spawn(move || for _ in stderr.lines() {});
        Self { child, lines }
    }

    /// The first line containing `needle`, waiting at most [`WAIT`].
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("the chat never showed {needle:?}"),
            }
        }
    }

    /// Ends the chat (end of input) and waits for it to exit.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = wait_timeout(&mut self.child, WAIT).expect("chat did not exit at end of input");
        assert!(status.success());
    }
}

/// An MLS variable-length vector (RFC 9420 §2.1.2) at the start of
/// `bytes`: its content and what follows.
fn mls_vector(bytes: &[u8]) -> (&[u8], &[u8]) {
    let first = bytes[0];
    let (len, head) = match first >> 6 {
        0 => (usize::from(first & 0x3f), 1),
        1 => (usize::from(u16::from_be_bytes([first & 0x3f, bytes[1]])), 2),
        _ => (u32::from_be_bytes([first & 0x3f, bytes[1], bytes[2], bytes[3]]) as usize, 4),
    };
    (&bytes[head..head + len], &bytes[head + len..])
}

/// The encrypted parts of a PrivateMessage (its encrypted sender data and
/// its ciphertext): what only members can read. Its framing (group id,
/// epoch, the sender's claim in the authenticated data) is public and
/// also in other rows, so it is not what must disappear.
fn encrypted_parts(message: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(&message[..4], &[0, 1, 0, 2], "an MLS 1.0 PrivateMessage");
    let (_group, rest) = mls_vector(&message[4..]);
    let rest = &rest[9..]; // epoch, content type
    let (_aad, rest) = mls_vector(rest);
    let (sender_data, rest) = mls_vector(rest);
    let (ciphertext, rest) = mls_vector(rest);
    assert!(rest.is_empty());
    vec![sender_data.to_vec(), ciphertext.to_vec()]
}

/// The encrypted parts of the log rows with a timer in a copy of the
/// server's SQLite database (taken while it runs: its WAL comes along);
/// none on PostgreSQL, whose files are not the server's (SECURITY.md says
/// what stays there).
fn timed_ciphertexts(data: &Path, copy: &Path) -> Vec<Vec<u8>> {
    if !data.join("hush.db").exists() {
        return Vec::new();
    }
    std::fs::create_dir_all(copy).unwrap();
    for name in ["hush.db", "hush.db-wal"] {
        if data.join(name).exists() {
            std::fs::copy(data.join(name), copy.join(name)).unwrap();
        }
    }
    let conn = rusqlite::Connection::open(copy.join("hush.db")).unwrap();
    let mut stmt = conn.prepare("SELECT data FROM log WHERE expires_at IS NOT NULL").unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    let rows: Vec<Vec<u8>> = rows.collect::<Result<_, _>>().unwrap();
    rows.iter().flat_map(|m| encrypted_parts(m)).collect()
}

/// Files under `dir` holding any 32-byte piece of one of `secrets`, with
/// the offset of the first piece found.
fn holding_pieces(dir: &Path, secrets: &[Vec<u8>]) -> Vec<(PathBuf, usize)> {
    let pieces: HashSet<&[u8]> = secrets.iter().flat_map(|s| s.windows(32)).collect();
    let mut found = Vec::new();
    for path in files_under(dir) {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        if let Some(at) = bytes.windows(32).position(|w| pieces.contains(w)) {
            found.push((path, at));
        }
    }
    found
}

/// Files under `dir` holding `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        .collect()
}

/// Waits (at most [`SWEPT_WITHIN`]) until `done` holds; whether it did.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + SWEPT_WITHIN;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

/// The marker text a test sends, unique per run.
fn marker(what: &str) -> String {
    let mut n = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n).unwrap();
    format!("{what}-{}", n.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The whole story: alice sets a 2-second timer; bob, chatting, reads
/// alice's message; carol stays offline. After expiry and one sweep: no
/// 32-byte piece of the stored ciphertext in any file of the running
/// server's data directory, the shared file's blob gone, no marker byte in
/// alice's or bob's home, `hush read` shows nothing of it, carol receives
/// nothing, and nobody's chain alarms. The message sent before the timer
/// and the one after it is turned off stay: a message keeps the timer it
/// was sent under.
fn expired_messages_and_files_leave_no_byte_on_the_server_or_the_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_SWEEP_SECONDS", "1"), ("HUSHD_LOG", "info")]);
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "said before the timer"]);
    assert_eq!(
        run_ok(&alice, &["group", "set", "team", "--disappear", "2s"]).trim(),
        "disappearing messages in team: 2 seconds"
    );
    let info = run_ok(&bob, &["sync"]);
    assert!(info.contains("alice set disappearing messages to 2 seconds"), "{info}");
    let info: serde_json::Value = serde_json::from_str(&run_ok(&bob, &["group", "info", "team", "--json"])).unwrap();
    assert_eq!(info["disappear_seconds"], 2, "{info}");

    // bob is chatting when alice writes; carol is offline the whole time.
    let chat = LiveChat::start(&bob, "team");
    let secret = marker("DISAPPEARING");
    let original = tmp.path().join("notes.txt");
    std::fs::write(&original, format!("file {secret}").repeat(100)).unwrap();
    run_ok(&alice, &["send", "team", &secret]);
    let stored = timed_ciphertexts(&data, &tmp.path().join("copy"));
    let sqlite = data.join("hush.db").exists();
    assert_eq!(stored.len(), 2 * usize::from(sqlite), "one message with a timer");
    assert!(chat.wait_for(&secret).contains("alice"), "bob read it");
    run_ok(&alice, &["send", "team", "--file", original.to_str().unwrap()]);
    assert_eq!(files_under(&data.join("blobs")).len(), 1, "the file's blob is on the server");
    // Turned off: what was sent under the timer keeps it.
    run_ok(&alice, &["group", "set", "team", "--disappear", "off"]);
    run_ok(&alice, &["send", "team", "said after the timer"]);
    chat.wait_for("said after the timer");
    let json = run_ok(&bob, &["read", "team", "--json"]);
    let line = json.lines().find(|l| l.contains(&secret));
    if let Some(line) = line {
        // Still there (the machine was quick): it says when it goes.
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["expires_in"].as_u64().unwrap() <= 2, "{v}");
        assert!(v["expires_at"].as_u64().is_some(), "{v}");
    }

    // The server deletes it (and the file) while it serves, and leaves no
    // piece of it in the database, its WAL or its free pages.
    let swept = eventually(|| holding_pieces(&data, &stored).is_empty() && files_under(&data.join("blobs")).is_empty());
    if !swept {
        let left = (holding_pieces(&data, &stored), files_under(&data.join("blobs")));
        let (_, log) = server.terminate();
        panic!("left on the server: {left:?}; its log:\n{log}");
    }
    // bob's running chat deleted it from his history (every second).
    assert!(
        eventually(|| holding(&bob.home, secret.as_bytes()).is_empty()),
        "{:?}",
        holding(&bob.home, secret.as_bytes())
    );
    chat.finish();
    for p in [&alice, &bob] {
        let read = run_ok(p, &["read", "team"]);
        assert!(!read.contains(&secret) && !read.contains("notes.txt"), "{read}");
        assert!(read.contains("said before the timer") && read.contains("said after the timer"), "{read}");
        assert!(run_ok(p, &["files", "team"]).trim().is_empty());
        assert!(holding(&p.home, secret.as_bytes()).is_empty(), "{:?}", holding(&p.home, secret.as_bytes()));
    }
    // carol, offline the whole time, receives nothing of it, and sees both
    // changes of the timer.
    let got = run_ok(&carol, &["sync"]);
    assert!(!got.contains(&secret) && !got.contains("notes.txt"), "{got}");
    assert!(got.contains("alice set disappearing messages to 2 seconds"), "{got}");
    assert!(got.contains("alice turned disappearing messages off"), "{got}");
    assert!(got.contains("said after the timer") && !got.contains("ALARM"), "{got}");
    // Expiry is no alarm for anyone.
    for p in [&alice, &bob, &carol] {
        let out = hush(&p.home, &["verify", "team"]);
        assert!(out.status.success(), "{}", stdout(&out));
        assert!(!stdout(&out).contains("ALARM"), "{}", stdout(&out));
    }
    let _ = server.terminate();
}

/// The timer survives a restart of the server, and a message whose time
/// ran out while it was down is never served: the sweep picks up where it
/// was.
fn the_sweep_resumes_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let env = [("HUSHD_SWEEP_SECONDS", "1")];
    let server = Hushd::start_with(&data, "127.0.0.1:0", &env);
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "set", "team", "--disappear", "1s"]);
    let secret = marker("RESTART");
    run_ok(&alice, &["send", "team", &secret]);
    let stored = timed_ciphertexts(&data, &tmp.path().join("copy"));
    let port = server.port();
    server.kill9();
    std::thread::sleep(Duration::from_secs(2));
    let server = Hushd::start_with(&data, &format!("127.0.0.1:{port}"), &env);
    let got = run_ok(&bob, &["sync"]);
    assert!(!got.contains(&secret) && !got.contains("ALARM"), "{got}");
    assert!(got.contains("alice set disappearing messages to 1 second"), "{got}");
    assert!(eventually(|| holding_pieces(&data, &stored).is_empty()), "{:?}", holding_pieces(&data, &stored));
    drop(server);
}

/// How many log rows still carry a timer or are gone, in a copy of the
/// server's SQLite database.
fn timed_rows(data: &Path, copy: &Path) -> i64 {
    let _ = std::fs::remove_dir_all(copy);
    std::fs::create_dir_all(copy).unwrap();
    for name in ["hush.db", "hush.db-wal"] {
        if data.join(name).exists() {
            std::fs::copy(data.join(name), copy.join(name)).unwrap();
        }
    }
    let conn = rusqlite::Connection::open(copy.join("hush.db")).unwrap();
    conn.query_row("SELECT count(*) FROM log WHERE expires_at IS NOT NULL OR gone IS NOT NULL", [], |r| r.get(0))
        .unwrap()
}

/// Red team (issue 33): a message every member reads before its time is
/// deleted by their acknowledgements, not by the sweep; its bytes must
/// still leave the WAL once its time is up (they stayed there).
#[test]
fn a_message_everyone_read_before_expiry_leaves_the_wal_too() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_SWEEP_SECONDS", "1")]);
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "set", "team", "--disappear", "3s"]);
    run_ok(&bob, &["sync"]);
    run_ok(&carol, &["sync"]);
    let secret = marker("READBYALL");
    run_ok(&alice, &["send", "team", &secret]);
    let stored = timed_ciphertexts(&data, &tmp.path().join("copy"));
    assert_eq!(stored.len(), 2, "one message with a timer");
    for p in [&bob, &carol, &alice] {
        run_ok(p, &["sync"]);
    }
    assert_eq!(timed_rows(&data, &tmp.path().join("copy2")), 0, "deleted by the acknowledgements");
    let swept = eventually(|| holding_pieces(&data, &stored).is_empty());
    let left = holding_pieces(&data, &stored);
    let _ = server.terminate();
    assert!(swept, "the expired message's ciphertext is still in: {left:?}");
}

/// Red team (issue 33): another process reading bob's state (a backup, a
/// slow `hush read`) when his running chat deletes an expired line keeps
/// the WAL from being emptied; the chat tries again every second until it
/// is (it never did).
#[test]
fn a_chat_empties_its_wal_once_another_reader_lets_go() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_SWEEP_SECONDS", "1")]);
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "set", "team", "--disappear", "2s"]);
    run_ok(&bob, &["sync"]);
    let chat = LiveChat::start(&bob, "team");
    let secret = marker("CHATWAL");
    run_ok(&alice, &["send", "team", &secret]);
    chat.wait_for(&secret);
    let db = bob.home.join("hush.db");
    let reader = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: i64 = reader.query_row("SELECT count(*) FROM history", [], |r| r.get(0)).unwrap();
    assert!(n > 0);
    // The chat deletes the line while the reader holds its snapshot.
    let deleted = eventually(|| {
        let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let shown: i64 = c
            .query_row("SELECT count(*) FROM history WHERE body LIKE ?1", [format!("%{secret}%")], |r| r.get(0))
            .unwrap();
        shown == 0
    });
    assert!(deleted, "the chat deleted the expired line");
    // Longer than SQLite's busy timeout (5 s): a checkpoint that waited for
    // the reader gave up meanwhile.
    std::thread::sleep(Duration::from_secs(6));
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    let gone = eventually(|| holding(&bob.home, secret.as_bytes()).is_empty());
    let left = holding(&bob.home, secret.as_bytes());
    chat.finish();
    let _ = server.terminate();
    assert!(gone, "the expired plaintext is still in: {left:?}");
}

/// Red team (issue 33): only messages expire, never a commit; an operator
/// who serves a commit as expired (its epoch and true digest, so the chain
/// links) is caught, in a group with a timer too.
#[test]
fn a_commit_served_as_expired_is_an_alarm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[]);
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "set", "team", "--disappear", "1h"]);
    run_ok(&bob, &["sync"]);
    run_ok(&carol, &["sync"]);
    run_ok(&alice, &["group", "remove", "team", "carol"]);
    run_ok(&alice, &["send", "team", "after the removal"]);
    let conn = rusqlite::Connection::open(data.join("hush.db")).unwrap();
    let rows: Vec<(i64, i64, Vec<u8>)> = conn
        .prepare("SELECT gid, seq, data FROM log ORDER BY gid, seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // The last PublicMessage (wire format 1) is the removal commit.
    let (gid, seq, commit) = rows.iter().rfind(|(_, _, d)| d.get(..4) == Some(&[0, 1, 0, 1][..])).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, commit);
    let n = conn
        .execute(
            "UPDATE log SET data = x'', gone = ?3 WHERE gid = ?1 AND seq = ?2",
            rusqlite::params![gid, seq, digest.as_ref()],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);
    let got = hush(&bob.home, &["sync"]);
    let out = format!("{}{}", stdout(&got), stderr(&got));
    assert!(!got.status.success(), "{out}");
    assert!(out.contains("ALARM: the server hid a change of this group as an expired message"), "{out}");
    let verify = hush(&bob.home, &["verify", "team", "--json"]);
    assert!(stdout(&verify).contains("hidden-change"), "{}", stdout(&verify));
    let _ = server.terminate();
}

/// A message larger than a page (overflow pages), expired by the sweep,
/// leaves no 32-byte piece in any server file (the red team's control).
#[test]
fn an_overflowing_message_leaves_nothing_either() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_SWEEP_SECONDS", "1")]);
    let (alice, _bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "set", "team", "--disappear", "2s"]);
    let big = marker("BIG").repeat(900);
    run_ok(&alice, &["send", "team", &big]);
    let stored = timed_ciphertexts(&data, &tmp.path().join("copy"));
    assert_eq!(stored.len(), 2);
    assert!(stored[1].len() > 8000, "{}", stored[1].len());
    let swept = eventually(|| holding_pieces(&data, &stored).is_empty());
    let left = holding_pieces(&data, &stored);
    let _ = server.terminate();
    assert!(swept, "{left:?}");
}

crate::on_both_backends! {
    sync: [expired_messages_and_files_leave_no_byte_on_the_server_or_the_devices, the_sweep_resumes_after_a_restart],
    async: [],
}

//! History for a linked device (issue 34): real hushd, real clients.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::{run_ok, team, Person};
use crate::support::*;

/// `hush chat GROUP` with `lines` piped in, one message each.
fn chat_lines(p: &Person, group: &str, lines: &[String]) {
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    crate::cli::chat_piped_in(p, group, input.as_bytes());
}

/// `read --json`'s text lines as "sender: text", and how many are marked
/// as handed over.
fn texts(home: &Path, group: &str) -> (Vec<String>, usize) {
    let out = ok(hush(home, &["read", group, "--json"]));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let texts = lines
        .iter()
        .filter(|v| v["kind"] == "text")
        .map(|v| format!("{}: {}", v["sender"].as_str().unwrap(), v["text"].as_str().unwrap()))
        .collect();
    let imported = lines.iter().filter(|v| v["imported"] == true).count();
    (texts, imported)
}

/// Links `new` to `first`'s account with `device add NAME ARGS…`; returns
/// (`device add`'s stderr, `device join`'s stderr). The code goes to
/// `device join -` on standard input (out of the process list).
fn link_with(first: &Path, new: &Path, name: &str, args: &[&str]) -> (String, String) {
    let mut all = vec!["device", "add", name];
    all.extend_from_slice(args);
    let (adding, code) = hush_first_line(first, &all);
    assert!(code.starts_with("hushlink://"), "{code}");
    let mut join = Command::new(env!("CARGO_BIN_EXE_hush"))
        .env_clear()
        .env("HOME", new)
        .arg("--home")
        .arg(new)
        .args(["device", "join", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    join.stdin.take().unwrap().write_all(format!("{code}\n").as_bytes()).unwrap();
    wait_timeout(&mut join, WAIT).expect("device join did not finish");
    let joined = join.wait_with_output().unwrap();
    assert!(joined.status.success(), "device join: {}", stderr(&joined));
    let (status, err) = finish(adding);
    assert!(status.success(), "device add: {err}");
    (err, stderr(&joined))
}

/// alice has 200 messages in two groups (hers and bob's) and links a
/// laptop: the laptop's `read` shows the same 200, by text and sender, in
/// order, marked as handed over, and then what came after; nothing of the
/// history is readable on the server. A tablet linked with `--history
/// none` has none of it.
fn a_linked_device_reads_the_history_of_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "create", "ops"]);
    run_ok(&alice, &["group", "add", "ops", "bob"]);
    run_ok(&bob, &["sync"]);
    let lines = |who: &str, group: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{group} line {i} from {who} HISTORY-MARKER-{who}-{group}-{i}")).collect()
    };
    chat_lines(&alice, "team", &lines("alice", "team", 60));
    chat_lines(&bob, "team", &lines("bob", "team", 40));
    chat_lines(&bob, "ops", &lines("bob", "ops", 50));
    chat_lines(&alice, "ops", &lines("alice", "ops", 50));
    run_ok(&alice, &["sync"]);
    let (team_before, _) = texts(&alice.home, "team");
    let (ops_before, _) = texts(&alice.home, "ops");
    assert_eq!(team_before.len() + ops_before.len(), 200, "{team_before:?} {ops_before:?}");

    let laptop = tmp.path().join("laptop");
    let (added, joined) = link_with(&alice.home, &laptop, "laptop", &[]);
    assert!(added.contains("handed over") && added.contains("2 group(s)"), "{added}");
    assert!(joined.contains("of history in 2 group(s)"), "{joined}");
    // Before the laptop received anything itself.
    let (team_laptop, imported) = texts(&laptop, "team");
    assert_eq!(team_laptop, team_before);
    assert!(imported >= 100, "{imported} lines marked as handed over");
    assert_eq!(texts(&laptop, "ops").0, ops_before);
    assert!(ok(hush(&laptop, &["read", "team"])).contains("handed over by your other device"));

    // After new messages: the history, then what came after, in order.
    let synced = ok(hush(&laptop, &["sync"]));
    assert!(synced.contains("this device joined the group"), "{synced}");
    run_ok(&bob, &["send", "team", "after the link, from bob"]);
    let synced = ok(hush(&laptop, &["sync"]));
    assert!(synced.contains("after the link, from bob"), "{synced}");
    ok(hush(&laptop, &["send", "ops", "the laptop writes"]));
    let mut team_after = team_before.clone();
    team_after.push("bob: after the link, from bob".into());
    assert_eq!(texts(&laptop, "team").0, team_after);
    let mut ops_after = ops_before.clone();
    ops_after.push("you: the laptop writes".into());
    assert_eq!(texts(&laptop, "ops").0, ops_after);
    assert!(run_ok(&bob, &["sync"]).contains("alice: the laptop writes"));

    // The server holds the history only encrypted.
    for path in files_under(&data) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(!bytes.windows(14).any(|w| w == b"HISTORY-MARKER"), "plaintext history in {}", path.display());
    }

    // --history none: nothing handed over. (alice's first device has not
    // read the laptop's joining commits, and `--history none` does not sync:
    // the tablet walks the log from her state to the groups' current ones,
    // which the server lets a device of a member's account read before its
    // first join. It used not to: such a device could never join.)
    let tablet = tmp.path().join("tablet");
    let (added, joined) = link_with(&alice.home, &tablet, "tablet", &["--history", "none"]);
    assert!(!added.contains("handed over"), "{added}");
    assert!(!joined.contains("history"), "{joined}");
    let synced = ok(hush(&tablet, &["sync"]));
    assert!(synced.contains("checked commit by commit from your first device's state"), "{synced}");
    assert_eq!(texts(&tablet, "team"), (vec![], 0));
    assert_eq!(texts(&tablet, "ops"), (vec![], 0));
}

/// `--history DURATION` hands over only what is that recent, and what a
/// group's disappearing timer deleted is not handed over at all (what it
/// has not deleted yet keeps its time).
fn a_history_hands_over_only_what_was_asked_and_has_not_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_SWEEP_SECONDS", "1")]);
    let (alice, bob, _carol) = team(&server, tmp.path());
    crate::cli::one_message_expired(&alice, &bob);
    run_ok(&alice, &["group", "set", "team", "--disappear", "1w"]);
    run_ok(&alice, &["send", "team", "disappears in a week"]);
    let laptop = tmp.path().join("laptop");
    link_with(&alice.home, &laptop, "laptop", &["--history", "1h"]);
    let (got, _) = texts(&laptop, "team");
    assert_eq!(got, ["you: kept for good", "you: disappears in a week"]);
    let read = ok(hush(&laptop, &["read", "team", "--json"]));
    let timed: serde_json::Value = read
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["text"] == "disappears in a week")
        .unwrap();
    assert!(timed["expires_in"].as_u64().unwrap() > 6 * 86_400, "{timed}");
    for path in files_under(&laptop) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(!bytes.windows(15).any(|w| w == b"EXPIRING-MARKER"), "expired text in {}", path.display());
    }
}

/// Damages every blob on the server's disk as the new device starts to
/// fetch the history: what a malicious or broken server serves.
struct Tamper(PathBuf);

impl hush::client::app::files::Progress for Tamper {
    fn start(&mut self, _total: u64) {
        for entry in std::fs::read_dir(self.0.join("blobs")).unwrap() {
            let path = entry.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 1;
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

/// A server that alters the history blob gets nothing imported: the new
/// device says so (in its join and in every group) and keeps working.
async fn a_history_altered_on_the_server_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "ALTERED-MARKER before the link"]);
    let (adding, code) = hush_first_line(&alice.home, &["device", "add", "laptop"]);
    let laptop = tmp.path().join("laptop");
    let joined = hush::client::home::Home::new(&laptop).join(&code, &mut Tamper(data.clone())).await.unwrap();
    let (status, err) = tokio::task::spawn_blocking(move || finish(adding)).await.unwrap();
    assert!(status.success(), "{err}");
    let Some(Err(why)) = &joined.history else { panic!("{:?}", joined.history) };
    assert!(why.contains("altered on the server"), "{why}");
    assert!(!why.contains("tries again"), "{why}");
    let laptop_home = laptop.clone();
    let (read, synced, after) = tokio::task::spawn_blocking(move || {
        let read = ok(hush(&laptop_home, &["read", "team"]));
        let synced = ok(hush(&laptop_home, &["sync"]));
        ok(hush(&laptop_home, &["send", "team", "the laptop still writes"]));
        (read, synced, ok(hush(&laptop_home, &["read", "team"])))
    })
    .await
    .unwrap();
    assert!(!read.contains("ALTERED-MARKER"), "{read}");
    assert!(read.contains("could not be taken"), "{read}");
    assert!(synced.contains("this device joined the group"), "{synced}");
    assert!(after.contains("you: the laptop still writes"), "{after}");
    let bob_home = bob.home.clone();
    let seen = tokio::task::spawn_blocking(move || ok(hush(&bob_home, &["sync"]))).await.unwrap();
    assert!(seen.contains("alice: the laptop still writes"), "{seen}");
}

/// Runs a command once, as the new device starts to fetch the history.
struct OnStart(Option<Box<dyn FnOnce() + Send>>);

impl hush::client::app::files::Progress for OnStart {
    fn start(&mut self, _total: u64) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Red team (issue 34): a `hush sync` of the new home, run while `device
/// join` is fetching (a second terminal), imported the history too: every
/// line twice. It is imported once.
async fn a_sync_during_the_join_does_not_import_the_history_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, _bob, _carol) = team(&server, tmp.path());
    let lines: Vec<String> = (0..20).map(|i| format!("RACE-MARKER-{i:02}")).collect();
    let home = alice.home.clone();
    let id = alice.id.clone();
    tokio::task::spawn_blocking(move || chat_lines(&Person { home, id }, "team", &lines)).await.unwrap();
    let (adding, code) = hush_first_line(&alice.home, &["device", "add", "laptop"]);
    let laptop = tmp.path().join("laptop");
    let other = laptop.clone();
    let mut hook = OnStart(Some(Box::new(move || {
        let _ = hush(&other, &["sync"]);
    })));
    hush::client::home::Home::new(&laptop).join(&code, &mut hook).await.unwrap();
    let (status, err) = tokio::task::spawn_blocking(move || finish(adding)).await.unwrap();
    assert!(status.success(), "{err}");
    let (texts, _) = tokio::task::spawn_blocking(move || texts(&laptop, "team")).await.unwrap();
    let markers = texts.iter().filter(|t| t.contains("RACE-MARKER-")).count();
    assert_eq!(markers, 20, "{texts:?}");
}

/// Red team (issue 34): the history's key travelled in the bundle sealed
/// only under the link code, so the operator, keeping a copy of the
/// bundle, could open the history with the code once it leaked (a shell's
/// history). The key is now sealed to an ephemeral key of the joining
/// process: the code opens the bundle, and the key is not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_code_and_a_kept_bundle_do_not_open_the_history() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, _bob, _carol) = tokio::task::block_in_place(|| team(&server, tmp.path()));
    tokio::task::block_in_place(|| run_ok(&alice, &["send", "team", "KEPT-BUNDLE-MARKER"]));
    let (adding, code) = hush_first_line(&alice.home, &["device", "add", "laptop"]);
    let laptop = tmp.path().join("laptop");
    let captured: std::sync::Arc<std::sync::Mutex<(Vec<u8>, Vec<u8>)>> = Default::default();
    let (into, server_db, home) = (captured.clone(), data.join("hush.db"), laptop.clone());
    let mut hook = OnStart(Some(Box::new(move || {
        // What the operator keeps, and the key the new device holds.
        let db = rusqlite::Connection::open(server_db).unwrap();
        let bundle: Vec<u8> =
            db.query_row("SELECT bundle FROM links WHERE bundle IS NOT NULL", [], |r| r.get(0)).unwrap();
        let local = rusqlite::Connection::open(home.join("hush.db")).unwrap();
        let pending: Vec<u8> =
            local.query_row("SELECT value FROM settings WHERE key = 'pending_history'", [], |r| r.get(0)).unwrap();
        *into.lock().unwrap() = (bundle, pending);
    })));
    let joined = hush::client::home::Home::new(&laptop).join(&code, &mut hook).await.unwrap();
    assert!(matches!(joined.history, Some(Ok(_))), "{:?}", joined.history);
    let (status, err) = tokio::task::spawn_blocking(move || finish(adding)).await.unwrap();
    assert!(status.success(), "{err}");
    let (sealed, pending) = captured.lock().unwrap().clone();
    let key = &pending[16..48];
    // The leaked code opens the kept bundle: the history's key is not in it.
    let link: hush::client::link::LinkCode = code.parse().unwrap();
    let bundle = link.open_bundle(&sealed).unwrap();
    assert!(bundle.history.is_some());
    let encoded = bundle.encode().unwrap();
    assert!(!encoded.windows(32).any(|w| w == key), "the history's key is in the bundle the code opens");
}

crate::on_both_backends! {
    sync: [
        a_linked_device_reads_the_history_of_the_first,
        a_history_hands_over_only_what_was_asked_and_has_not_expired,
    ],
    async: [a_history_altered_on_the_server_is_refused, a_sync_during_the_join_does_not_import_the_history_twice],
}

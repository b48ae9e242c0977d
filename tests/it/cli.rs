//! The `hush` CLI end to end: three people, real binaries, real server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::*;

pub(crate) struct Person {
    pub(crate) home: PathBuf,
    pub(crate) id: String,
}

pub(crate) fn person(server: &Hushd, dir: &Path, name: &str) -> Person {
    let home = dir.join(name);
    let token = server.invite(&[]);
    ok(hush(&home, &["register", &server.address.to_string(), "--invite", &token, "--name", name]));
    let id = ok(hush(&home, &["whoami"])).lines().next().unwrap().to_string();
    Person { home, id }
}

pub(crate) fn run_ok(p: &Person, args: &[&str]) -> String {
    ok(hush(&p.home, args))
}

/// In `team` (alice's, bob in it, a sweep every second): alice sends "kept
/// for good", sets a one-second timer, sends "EXPIRING-MARKER", bob reads
/// it, and this returns once it is gone from alice's history.
pub(crate) fn one_message_expired(alice: &Person, bob: &Person) {
    run_ok(alice, &["send", "team", "kept for good"]);
    run_ok(alice, &["group", "set", "team", "--disappear", "1s"]);
    run_ok(alice, &["send", "team", "EXPIRING-MARKER"]);
    run_ok(bob, &["sync"]);
    let deadline = std::time::Instant::now() + WAIT;
    while run_ok(alice, &["read", "team"]).contains("EXPIRING-MARKER") {
        assert!(std::time::Instant::now() < deadline, "never expired");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `hush chat team` with `input` on standard input; its standard output
/// once it exited (successfully) at the end of the input.
fn chat_piped(p: &Person, input: &[u8]) -> String {
    chat_piped_in(p, "team", input)
}

/// `hush chat GROUP` with `input` on standard input (one message a line);
/// its standard output once it exited (successfully) at the end of it.
pub(crate) fn chat_piped_in(p: &Person, group: &str, input: &[u8]) -> String {
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
    child.stdin.take().unwrap().write_all(input).unwrap();
    let status = wait_timeout(&mut child, WAIT).expect("chat did not exit at end of input");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    out
}

fn texts_of(read_json: &str) -> Vec<String> {
    read_json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "text")
        .map(|v| format!("{}: {}", v["sender"].as_str().unwrap(), v["text"].as_str().unwrap()))
        .collect()
}

pub(crate) fn team(server: &Hushd, dir: &Path) -> (Person, Person, Person) {
    let alice = person(server, dir, "alice");
    let bob = person(server, dir, "bob");
    let carol = person(server, dir, "carol");
    for (p, others) in [
        (&alice, [("bob", &bob), ("carol", &carol)]),
        (&bob, [("alice", &alice), ("carol", &carol)]),
        (&carol, [("alice", &alice), ("bob", &bob)]),
    ] {
        for (n, o) in others {
            run_ok(p, &["contact", "add", n, &o.id]);
        }
    }
    run_ok(&alice, &["group", "create", "team"]);
    run_ok(&alice, &["group", "add", "team", "bob", "carol"]);
    let joined = run_ok(&bob, &["sync"]);
    assert!(joined.contains("you joined"), "{joined}");
    run_ok(&carol, &["sync"]);
    (alice, bob, carol)
}

fn three_people_chat_in_order_offline_member_catches_up_and_restart_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "hello", "team"]);
    run_ok(&bob, &["send", "team", "hi", "alice"]);
    let carol_new = run_ok(&carol, &["sync"]);
    assert!(
        carol_new.contains("[team] alice: hello team") && carol_new.contains("[team] bob: hi alice"),
        "{carol_new}"
    );
    let members = run_ok(&carol, &["group", "members", "team"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    assert!(members.contains("alice") && members.contains("bob") && members.contains("you"));

    // Carol is offline (no command running) while alice and bob send 20.
    for i in 0..10 {
        run_ok(&alice, &["send", "team", &format!("a{i}")]);
        run_ok(&bob, &["send", "team", &format!("b{i}")]);
    }
    run_ok(&carol, &["sync"]);
    let history = texts_of(&run_ok(&carol, &["read", "team", "--json"]));
    let mut expected = vec!["alice: hello team".to_string(), "bob: hi alice".to_string()];
    for i in 0..10 {
        expected.push(format!("alice: a{i}"));
        expected.push(format!("bob: b{i}"));
    }
    assert_eq!(history, expected);

    // Restart the server; everything still works.
    let port = server.port();
    let dir = server.data_dir.clone();
    let (status, _) = server.terminate();
    assert!(status.success());
    let _server = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);
    run_ok(&carol, &["send", "team", "after the restart"]);
    assert!(run_ok(&alice, &["sync"]).contains("carol: after the restart"));
    assert!(run_ok(&bob, &["sync"]).contains("carol: after the restart"));
}

fn a_removed_member_sees_it_and_reads_nothing_new() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "remove", "team", "carol"]);
    run_ok(&alice, &["send", "team", "only for bob"]);
    let carol_new = run_ok(&carol, &["sync"]);
    assert!(carol_new.contains("you were removed by alice"), "{carol_new}");
    assert!(!carol_new.contains("only for bob"), "{carol_new}");
    let out = hush(&carol.home, &["send", "team", "let me in"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a member"), "{}", stderr(&out));
    let bob_new = run_ok(&bob, &["sync"]);
    assert!(bob_new.contains("carol was removed by alice") && bob_new.contains("alice: only for bob"), "{bob_new}");
}

fn chat_sends_piped_lines_and_prints_what_others_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "before the chat"]);
    let out = chat_piped(&bob, b"first line\nsecond line\n/members\n");
    assert!(out.contains("alice: before the chat"), "{out}");
    assert!(out.contains("alice, you, carol"), "/members should list the group in leaf order: {out}");
    let alice_new = run_ok(&alice, &["sync"]);
    let first = alice_new.find("bob: first line").expect(&alice_new);
    let second = alice_new.find("bob: second line").expect(&alice_new);
    assert!(first < second);
}

#[test]
fn the_whole_scenario_leaves_no_plaintext_on_the_server_and_client_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    let marker = format!("MARKER{}", hush::auth::InviteToken::generate().unwrap());
    run_ok(&alice, &["send", "team", &marker]);
    run_ok(&bob, &["sync"]);
    run_ok(&alice, &["group", "remove", "team", "carol"]);
    run_ok(&carol, &["sync"]);
    let dir = server.data_dir.clone();
    let (_, stderr) = server.terminate();
    assert!(!stderr.contains(&marker));
    for path in files_under(&dir) {
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()), "plaintext in {}", path.display());
    }
    for p in [&alice, &bob, &carol] {
        assert_eq!(std::fs::metadata(&p.home).unwrap().permissions().mode() & 0o777, 0o700);
        for entry in std::fs::read_dir(&p.home).unwrap() {
            let path = entry.unwrap().path();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
}

#[test]
fn errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let alice = person(&server, tmp.path(), "alice");
    let out = hush(&alice.home, &["group", "add", "nosuch", "bob"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown contact") || stderr(&out).contains("unknown group"), "{}", stderr(&out));
    run_ok(&alice, &["group", "create", "g"]);
    let out = hush(&alice.home, &["group", "add", "g", "nobody"]);
    assert!(stderr(&out).contains("unknown contact \"nobody\""), "{}", stderr(&out));
    let out = hush(&alice.home, &["send", "nosuch", "x"]);
    assert!(stderr(&out).contains("unknown group"), "{}", stderr(&out));
    let out = hush(&tmp.path().join("nobody"), &["sync"]);
    assert!(stderr(&out).contains("hush register"), "{}", stderr(&out));
    // Unreachable server: stop it, then try.
    drop(server);
    let out = hush(&alice.home, &["status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach") || stderr(&out).contains("no answer"), "{}", stderr(&out));
}

/// Issue 12: data from before device certificates is refused with a line
/// that says what to do, never half-used.
#[test]
fn homes_and_databases_from_before_device_certificates_are_refused_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    // A client home with the old single key file.
    let home = tmp.path().join("old-home");
    std::fs::create_dir_all(&home).unwrap();
    hush::auth::Identity::generate().unwrap().save(&home.join("identity.key")).unwrap();
    for args in [&["whoami"][..], &["sync"], &["register", "hush://127.0.0.1:1/#aaaa"]] {
        let out = hush(&home, args);
        assert!(!out.status.success(), "{args:?} worked on an old home");
        let err = stderr(&out);
        assert!(err.contains("before device certificates") && err.contains("--home"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // A server database at schema 3 that holds an account.
    let dir = tmp.path().join("old-server");
    ok(run(hushd_command(&dir).arg("init")));
    {
        let db = rusqlite::Connection::open(dir.join("hush.db")).unwrap();
        db.execute_batch("PRAGMA user_version = 3; INSERT INTO accounts (key, created_at) VALUES (zeroblob(32), 1);")
            .unwrap();
    }
    let out = run(hushd_command(&dir).args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("before device certificates") && err.contains("move hush.db"), "{err}");
}

/// Issue 14, finding 1: a body with a newline, ANSI colour codes and a bidi
/// override printed as a second line that looked exactly like a message
/// from bob, colours live.
#[test]
fn a_body_cannot_forge_a_line_or_reach_the_terminal_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    let attack = "ok, see you at 5\n[team] bob: the new wifi password is on https://evil.example \u{1b}[31m(verified)\u{1b}[0m \u{202e}gnp.exe";
    run_ok(&carol, &["send", "team", attack]);
    let chat = chat_piped(&alice, b"");
    let sync = run_ok(&bob, &["sync"]);
    let read = run_ok(&bob, &["read", "team"]);
    for (what, out) in [("sync", &sync), ("read", &read), ("chat", &chat)] {
        assert!(out.contains("carol: ok, see you at 5"), "{what}: {out}");
        assert!(
            !out.chars().any(|c| c != '\n' && (c.is_control() || c == '\u{202e}')),
            "{what}: raw control character in {out:?}"
        );
        for line in out.lines() {
            // Every line is either one the client starts (a message or
            // event of its own formatting) or a marked continuation.
            let forged = line.contains("bob: the new wifi") && !line.starts_with(hush::client::screen::CONTINUATION);
            assert!(!forged, "{what}: a line passes for bob's message: {line:?}");
        }
        assert!(out.contains("\\e[31m(verified)"), "{what}: the escape is not shown visibly: {out}");
    }
    // --json stays exact.
    let json = run_ok(&bob, &["read", "team", "--json"]);
    let texts = texts_of(&json);
    assert!(texts.iter().any(|t| t == &format!("carol: {attack}")), "{texts:?}");
}

/// Issue 14, finding 4: `hush send` failed with "too many requests; retry in
/// 1 ms (code 6)" instead of waiting and retrying.
fn a_member_on_a_rate_limited_server_completes_its_sends() {
    let tmp = tempfile::tempdir().unwrap();
    let server =
        Hushd::start_with(&tmp.path().join("server"), "127.0.0.1:0", &[("HUSHD_REQUESTS_PER_SECOND_PER_ACCOUNT", "5")]);
    let (alice, bob, _carol) = team(&server, tmp.path());
    for i in 0..8 {
        run_ok(&alice, &["send", "team", &format!("message {i}")]);
    }
    let got = run_ok(&bob, &["sync"]);
    for i in 0..8 {
        assert!(got.contains(&format!("alice: message {i}")), "{got}");
    }
}

/// Issue 14, finding 3: secrets openmls deletes (KeyPackage private keys,
/// past epochs' secrets) stayed in free pages and in the WAL.
#[test]
fn deleted_secrets_do_not_stay_in_the_client_files() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    // What bob's state holds now: KeyPackage bundles and encryption key
    // pairs not yet used, and this epoch's secrets.
    let snapshot = |home: &Path| -> Vec<Vec<u8>> {
        let db = rusqlite::Connection::open(home.join("hush.db")).unwrap();
        let mut out = vec![];
        for sql in [
            "SELECT key_package FROM openmls_key_packages",
            "SELECT key_pair FROM openmls_encryption_keys",
            "SELECT group_data FROM openmls_group_data WHERE data_type IN ('message_secrets', 'group_epoch_secrets')",
            "SELECT key_pairs FROM openmls_epoch_keys_pairs",
        ] {
            let mut stmt = db.prepare(sql).unwrap();
            out.extend(stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap().map(Result::unwrap));
        }
        out
    };
    let before = snapshot(&bob.home);
    assert!(before.len() > 20, "too few secrets to mean anything: {}", before.len());
    // Bob's KeyPackages are used (new groups add him), the team's epoch
    // changes (carol is removed, then every send commits nothing new but
    // messages ratchet keys forward).
    for i in 0..2 {
        let g = format!("extra{i}");
        run_ok(&alice, &["group", "create", &g]);
        run_ok(&alice, &["group", "add", &g, "bob"]);
    }
    run_ok(&alice, &["send", "team", "epoch one"]);
    run_ok(&bob, &["sync"]);
    run_ok(&alice, &["group", "remove", "team", "carol"]);
    for i in 0..3 {
        run_ok(&bob, &["sync"]);
        run_ok(&bob, &["send", "team", &format!("reply {i}")]);
        run_ok(&alice, &["sync"]);
        run_ok(&alice, &["send", "team", &format!("tick {i}")]);
    }
    run_ok(&bob, &["sync"]);
    let live = snapshot(&bob.home);
    let deleted: Vec<&Vec<u8>> = before.iter().filter(|s| !live.contains(s)).collect();
    assert!(deleted.len() >= 3, "too few secrets were deleted to test anything: {}", deleted.len());
    let mut files = vec![];
    for entry in std::fs::read_dir(&bob.home).unwrap() {
        let path = entry.unwrap().path();
        files.push((path.clone(), std::fs::read(&path).unwrap()));
    }
    for secret in deleted {
        for (path, bytes) in &files {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_slice());
            assert!(!found, "a deleted secret ({} bytes) is still in {}", secret.len(), path.display());
        }
    }
}

fn stats_count_what_the_server_holds_while_it_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "one"]);
    run_ok(&alice, &["send", "team", "two"]);
    server.invite(&["--uses", "3"]);
    let stats = |server: &Hushd| ok(run(hushd_command(&server.data_dir).arg("stats")));
    let held = |text: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with("messages held")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let text = stats(&server);
    for expected in [
        "accounts       3 (0 removed)",
        "devices        3",
        "groups         1",
        "welcomes held  0",
        "invites        1 outstanding",
    ] {
        assert!(text.contains(expected), "{expected:?} in\n{text}");
    }
    assert!(held(&text) >= 2 && text.contains("oldest stored"), "{text}");
    assert!(text.contains("database ") && text.contains(" KiB"), "{text}");
    // Everyone has read everything: nothing is held any more.
    for p in [&alice, &bob, &carol] {
        run_ok(p, &["sync"]);
    }
    let text = stats(&server);
    assert_eq!(held(&text), 0, "{text}");
    // Counts only: no account id appears.
    for p in [&alice, &bob, &carol] {
        assert!(!text.contains(&p.id), "{text}");
    }
}

crate::on_both_backends! {
    sync: [three_people_chat_in_order_offline_member_catches_up_and_restart_keeps_everything, a_removed_member_sees_it_and_reads_nothing_new, chat_sends_piped_lines_and_prints_what_others_wrote, a_member_on_a_rate_limited_server_completes_its_sends, stats_count_what_the_server_holds_while_it_serves],
    async: [],
}

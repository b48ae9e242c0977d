//! Bots and scripts (issue 36): `hush jsonrpc` and `hush daemon` driven as
//! a bot would drive them, against a real hushd.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::{chat_piped_in, person, run_ok, Person};
use crate::support::*;

/// A JSON-RPC peer: writes requests, reads every line the other end
/// writes (answers and notifications) on a thread.
struct Peer {
    input: Box<dyn Write + Send>,
    lines: mpsc::Receiver<Value>,
    next_id: u64,
    /// Notifications read while waiting for an answer.
    seen: Vec<Value>,
}

impl Peer {
    fn new(input: Box<dyn Write + Send>, output: impl std::io::Read + Send + 'static) -> Self {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Self { input, lines, next_id: 1, seen: Vec::new() }
    }

    fn write_line(&mut self, line: &[u8]) {
        self.input.write_all(line).unwrap();
        self.input.write_all(b"\n").unwrap();
        self.input.flush().unwrap();
    }

    /// The next line that is an answer (not a notification).
    fn answer(&mut self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.lines.recv_timeout(left).expect("no answer in time");
            if v.get("id").is_some() {
                return v;
            }
            self.seen.push(v);
        }
    }

    /// Calls `method` and returns its whole answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.write_line(request.to_string().as_bytes());
        let answer = self.answer();
        assert_eq!(answer["id"], id, "{answer}");
        answer
    }

    /// Calls `method` and returns its result, failing on an error.
    fn ok(&mut self, method: &str, params: Value) -> Value {
        let answer = self.call(method, params);
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Waits for a notification `method` whose params satisfy `wanted`.
    fn notified(&mut self, method: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(|v| v["method"] == method && wanted(&v["params"])) {
            return self.seen.remove(i);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no {method} notification in time"));
            if v["method"] == method && wanted(&v["params"]) {
                return v;
            }
            self.seen.push(v);
        }
    }
}

fn spawn_hush(home: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hush"))
        .env_clear()
        .env("HOME", home)
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn contacts(a: &Person, a_name: &str, b: &Person, b_name: &str) {
    run_ok(a, &["contact", "add", b_name, &b.id]);
    run_ok(b, &["contact", "add", a_name, &a.id]);
}

/// Through `hush jsonrpc` as a subprocess: create a group, add bob, send,
/// receive bob's reply as a notification, read the history; bad input on
/// the way gets error objects; closing standard input ends it cleanly.
fn a_bot_on_jsonrpc_runs_a_group_and_hears_the_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob) = (person(&server, tmp.path(), "alice"), person(&server, tmp.path(), "bob"));
    contacts(&alice, "alice", &bob, "bob");
    let mut child = spawn_hush(&alice.home, &["jsonrpc"]);
    let input: ChildStdin = child.stdin.take().unwrap();
    let mut bot = Peer::new(Box::new(input), child.stdout.take().unwrap());
    assert_eq!(bot.ok("whoami", json!({}))["account"], alice.id);
    // While it runs, the home is its own.
    let out = hush(&alice.home, &["sync"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use by `hush daemon` or `hush jsonrpc`"), "{}", stderr(&out));
    let created = bot.ok("createGroup", json!({"name": "ops", "suite": "classic"}));
    assert_eq!(created["suite"], "classic");
    bot.ok("addMembers", json!({"group": "ops", "members": ["bob"]}));
    let sent = bot.ok("send", json!({"group": "ops", "text": "build 812 is green"}));
    assert!(sent["seq"].as_u64().unwrap() > 0, "{sent}");
    assert!(run_ok(&bob, &["sync"]).contains("you joined"));
    assert!(run_ok(&bob, &["read", "ops"]).contains("alice: build 812 is green"));
    run_ok(&bob, &["send", "ops", "thanks, deploying"]);
    let heard = bot.notified("message", |p| p["text"] == "thanks, deploying");
    let p = &heard["params"];
    assert_eq!((p["sender"].as_str(), p["sender_account"].as_str()), (Some("bob"), Some(bob.id.as_str())), "{heard}");
    assert_eq!((p["group"].as_str(), p["from_me"].as_bool()), (Some("ops"), Some(false)));
    let members = bot.ok("members", json!({"group": "ops"}));
    assert_eq!(members.as_array().unwrap().len(), 2, "{members}");
    let groups = bot.ok("listGroups", json!({}));
    assert_eq!(groups[0]["name"], "ops");
    let history = bot.ok("read", json!({"group": "ops"}));
    let texts: Vec<&str> = history.as_array().unwrap().iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(texts.contains(&"build 812 is green") && texts.contains(&"thanks, deploying"), "{texts:?}");
    let last = bot.ok("read", json!({"group": "ops", "limit": 1}));
    assert_eq!(last.as_array().unwrap().len(), 1);
    // Errors are objects, and it goes on.
    assert_eq!(bot.call("send", json!({"group": "nowhere", "text": "x"}))["error"]["code"], -32001);
    assert_eq!(bot.call("send", json!({"group": "ops", "text": 5}))["error"]["code"], -32602);
    assert_eq!(bot.call("launch", json!({}))["error"]["code"], -32601);
    bot.write_line(b"{not json");
    assert_eq!(bot.answer()["error"]["code"], -32700);
    assert_eq!(bot.ok("contacts", json!({}))[0]["name"], "bob");
    drop(bot);
    let status = wait_timeout(&mut child, WAIT).expect("jsonrpc did not end with its input");
    assert!(status.success());
    // The home is free again.
    run_ok(&alice, &["sync"]);
}

/// alice and bob, contacts, in alice's group "ops".
fn alice_and_bob_in_ops(server: &Hushd, dir: &Path) -> (Person, Person) {
    let (alice, bob) = (person(server, dir, "alice"), person(server, dir, "bob"));
    contacts(&alice, "alice", &bob, "bob");
    run_ok(&alice, &["group", "create", "ops"]);
    run_ok(&alice, &["group", "add", "ops", "bob"]);
    run_ok(&bob, &["sync"]);
    (alice, bob)
}

/// Waits until the daemon's socket accepts connections.
fn connect(socket: &Path) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(socket) {
            return s;
        }
        assert!(Instant::now() < deadline, "the daemon never listened on {}", socket.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn peer(stream: std::os::unix::net::UnixStream) -> Peer {
    let reader = stream.try_clone().unwrap();
    Peer::new(Box::new(stream), reader)
}

/// The daemon on a socket: two clients at once; malformed JSON, unknown
/// methods, wrong parameter types and a 10 MiB line each get an error
/// object and the daemon keeps serving; a client that stops reading has
/// its notifications dropped and counted, while the others get all of
/// theirs; `hush send` on the same home is refused meanwhile.
fn the_daemon_serves_clients_at_once_and_survives_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob) = alice_and_bob_in_ops(&server, tmp.path());
    let socket = tmp.path().join("alice.sock");
    let mut daemon = spawn_hush(&alice.home, &["daemon", "--socket", socket.to_str().unwrap()]);
    let mut first = peer(connect(&socket));
    let mut second = peer(connect(&socket));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // A third that will stop reading: it never looks at its socket.
    let stalled = connect(&socket);
    assert_eq!(first.ok("whoami", json!({}))["account"], alice.id);
    assert_eq!(second.ok("whoami", json!({}))["account"], alice.id);
    let out = hush(&alice.home, &["send", "ops", "from the CLI"]);
    assert!(!out.status.success(), "a second process wrote the home the daemon holds");
    assert!(stderr(&out).contains("in use by `hush daemon`"), "{}", stderr(&out));
    // Bad input on the first; the second is served throughout.
    first.write_line(b"{\"jsonrpc\":\"2.0\",\"id\":");
    assert_eq!(first.answer()["error"]["code"], -32700);
    assert_eq!(first.call("frobnicate", json!({}))["error"]["code"], -32601);
    assert_eq!(first.call("members", json!({"group": ["ops"]}))["error"]["code"], -32602);
    let huge = vec![b'x'; 10 * 1024 * 1024];
    first.write_line(&huge);
    assert_eq!(first.answer()["error"]["code"], -32600);
    assert_eq!(second.ok("members", json!({"group": "ops"})).as_array().unwrap().len(), 2);
    assert_eq!(first.ok("members", json!({"group": "ops"})).as_array().unwrap().len(), 2);
    // Many long messages at once: more than the stalled client's socket
    // buffers and its queue of 256 hold (about 1.5 MB against 2 MB).
    const MESSAGES: usize = 500;
    let filler = "x".repeat(4000);
    let lines: String = (0..MESSAGES).map(|i| format!("note {i} {filler}\n")).collect();
    chat_piped_in(&bob, "ops", lines.as_bytes());
    for peer in [&mut first, &mut second] {
        let last = format!("note {} {filler}", MESSAGES - 1);
        peer.notified("message", |p| p["text"] == last.as_str());
        let got = peer.seen.iter().filter(|v| v["method"] == "message").count();
        assert_eq!(got, MESSAGES - 1, "a reading client missed notifications");
        assert!(!peer.seen.iter().any(|v| v["method"] == "dropped"));
    }
    // The stalled one reads at last: some were dropped, and it is told
    // how many before its next answer.
    let mut late = peer(stalled);
    assert_eq!(late.ok("whoami", json!({}))["account"], alice.id, "the stalled client is served again");
    let dropped = late.notified("dropped", |p| p["count"].as_u64().is_some_and(|n| n > 0));
    let delivered = late.seen.iter().filter(|v| v["method"] == "message").count();
    let count = usize::try_from(dropped["params"]["count"].as_u64().unwrap()).unwrap();
    // The count covers every notification dropped: messages, and events
    // such as "bob has not seen the latest messages" that the burst may
    // bring.
    assert!(delivered < MESSAGES && delivered + count >= MESSAGES, "{delivered} delivered, {dropped}");
    // Still serving the others.
    assert_eq!(first.ok("send", json!({"group": "ops", "text": "all read"}))["group"], "ops");
    run_ok(&bob, &["sync"]);
    assert!(run_ok(&bob, &["read", "ops"]).contains("alice: all read"));
    drop((first, second, late));
    let stopped = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(stopped.success());
    let status = wait_timeout(&mut daemon, WAIT).expect("the daemon did not stop on SIGTERM");
    assert!(status.success());
    assert!(!socket.exists(), "the socket was left behind");
}

/// The server restarts under a running daemon (red team): meanwhile the
/// methods that need no server answer and the others fail with -32004
/// at once; what bob sent while the daemon was still reconnecting is
/// notified once it is back.
fn a_daemon_rides_out_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, bob) = alice_and_bob_in_ops(&server, tmp.path());
    let socket = tmp.path().join("alice.sock");
    let mut daemon = spawn_hush(&alice.home, &["daemon", "--socket", socket.to_str().unwrap()]);
    let mut client = peer(connect(&socket));
    client.ok("send", json!({"group": "ops", "text": "before"}));
    let port = server.port();
    let (status, _) = server.terminate();
    assert!(status.success());
    // Until the daemon notices, a call may still try the old connection.
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = client.call("send", json!({"group": "ops", "text": "while away"}));
        if answer["error"]["code"] == -32004 {
            break;
        }
        assert!(Instant::now() < deadline, "sends kept working without a server: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(client.call("send", json!({"group": "ops", "text": "still away"}))["error"]["code"], -32004);
    assert_eq!(client.ok("whoami", json!({}))["account"], alice.id);
    assert_eq!(client.ok("listGroups", json!({}))[0]["name"], "ops");
    let server = Hushd::start_with(&data, &format!("127.0.0.1:{port}"), &[]);
    run_ok(&bob, &["send", "ops", "sent while the daemon reconnects"]);
    client.notified("message", |p| p["text"] == "sent while the daemon reconnects");
    let deadline = Instant::now() + WAIT;
    while client.call("send", json!({"group": "ops", "text": "back"})).get("error").is_some() {
        assert!(Instant::now() < deadline, "the daemon never reconnected");
        std::thread::sleep(Duration::from_millis(200));
    }
    run_ok(&bob, &["sync"]);
    assert!(run_ok(&bob, &["read", "ops"]).contains("alice: back"));
    drop((client, server));
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// The example bot (examples/echo_bot.rs), built by `cargo test`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(Path::parent).unwrap();
    debug.join("examples").join(name)
}

/// The example bot answers a message sent by `hush send`.
fn the_example_bot_answers_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bot) = (person(&server, tmp.path(), "alice"), person(&server, tmp.path(), "bot"));
    contacts(&alice, "alice", &bot, "bot");
    let mut running = Command::new(example("echo_bot"))
        .env_clear()
        .args(["--home", bot.home.to_str().unwrap(), "--hush", env!("CARGO_BIN_EXE_hush")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("examples/echo_bot is built by cargo test");
    run_ok(&alice, &["group", "create", "ops"]);
    run_ok(&alice, &["group", "add", "ops", "bot"]);
    run_ok(&alice, &["send", "ops", "hello bot"]);
    let deadline = Instant::now() + WAIT;
    loop {
        run_ok(&alice, &["sync"]);
        if run_ok(&alice, &["read", "ops"]).contains("bot: echo: hello bot") {
            break;
        }
        assert!(Instant::now() < deadline, "the bot never answered: {}", run_ok(&alice, &["read", "ops"]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = running.kill();
    let _ = running.wait();
}

/// Red team (issue 36): mallory, a contact of the bot, gives a group of
/// her own the id of alice's group as its name, so that a bot replying
/// to alice's group by id would write into hers. An honest client refuses
/// to create such a name; the bot's client keeps the id as the name of
/// mallory's group; a message to alice's group's id goes there.
fn a_group_named_like_another_groups_id_takes_none_of_its_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let alice = person(&server, tmp.path(), "alice");
    let bot = person(&server, tmp.path(), "bot");
    let mallory = person(&server, tmp.path(), "mallory");
    contacts(&alice, "alice", &bot, "bot");
    contacts(&mallory, "mallory", &bot, "bot");
    run_ok(&alice, &["group", "create", "team"]);
    run_ok(&alice, &["group", "add", "team", "bot"]);
    run_ok(&bot, &["sync"]);
    let info: Value = serde_json::from_str(&run_ok(&alice, &["group", "info", "team", "--json"])).unwrap();
    let team_id = info["id"].as_str().unwrap().to_string();
    let out = hush(&mallory.home, &["group", "create", &team_id]);
    assert!(!out.status.success(), "a group named like an id was created");
    assert!(stderr(&out).contains("looks like a group id"), "{}", stderr(&out));
    // Her own client, modified: the name goes out as it is.
    run_ok(&mallory, &["group", "create", "decoy"]);
    let db = rusqlite::Connection::open(mallory.home.join("hush.db")).unwrap();
    db.execute("UPDATE groups SET name = ?1 WHERE name = 'decoy'", [&team_id]).unwrap();
    drop(db);
    run_ok(&mallory, &["group", "add", &team_id, "bot"]);
    run_ok(&bot, &["sync"]);
    let groups = run_ok(&bot, &["group", "list"]);
    assert_eq!(groups.matches(team_id.as_str()).count(), 1, "{groups}");
    run_ok(&bot, &["send", &team_id, "meant for alice's group"]);
    run_ok(&alice, &["sync"]);
    assert!(run_ok(&alice, &["read", "team"]).contains("bot: meant for alice's group"));
    run_ok(&mallory, &["sync"]);
    assert!(!run_ok(&mallory, &["read", &team_id]).contains("meant for alice's group"));
}

crate::on_both_backends! {
    sync: [
        a_bot_on_jsonrpc_runs_a_group_and_hears_the_reply,
        the_daemon_serves_clients_at_once_and_survives_bad_ones,
        the_example_bot_answers_a_message,
        a_group_named_like_another_groups_id_takes_none_of_its_messages,
        a_daemon_rides_out_a_server_restart,
    ],
    async: [],
}

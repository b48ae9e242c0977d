//! Long-term keys (issue 35): post-quantum groups, real hushd, real
//! clients.

use std::path::Path;

use hush::auth::online::{CurrentKey, OnlineCert, ServerKey};
use hush::auth::tls::server_crypto;
use hush::auth::{HushAddress, Identity};
use hush::client::Connection;

use crate::cli::{run_ok, team, Person};
use crate::support::*;

/// A post-quantum group of three beside a classic group of the same
/// people: messages, an add, a removal, a linked device's external join,
/// each group keeping its suite; post-quantum is the default.
fn a_post_quantum_group_and_a_classic_one_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    let info: serde_json::Value = serde_json::from_str(&run_ok(&bob, &["group", "info", "team", "--json"])).unwrap();
    assert_eq!(info["suite"], "pq", "the default: {info}");
    let created = run_ok(&alice, &["group", "create", "plain", "--suite", "classic"]);
    assert!(created.contains("created plain (classic)"), "{created}");
    run_ok(&alice, &["group", "add", "plain", "bob", "carol"]);
    run_ok(&bob, &["sync"]);
    run_ok(&carol, &["sync"]);
    let created = run_ok(&alice, &["group", "create", "vault", "--suite", "pq"]);
    assert!(created.contains("created vault (pq)"), "{created}");
    run_ok(&alice, &["group", "add", "vault", "bob"]);
    assert!(run_ok(&bob, &["sync"]).contains("you joined"));
    run_ok(&bob, &["send", "vault", "safe from a later quantum computer"]);
    run_ok(&alice, &["send", "plain", "and this one classic"]);
    run_ok(&alice, &["sync"]);
    let got = run_ok(&alice, &["read", "vault"]);
    assert!(got.contains("bob: safe from a later quantum computer"), "{got}");
    run_ok(&bob, &["sync"]);
    let got = run_ok(&bob, &["read", "plain"]);
    assert!(got.contains("alice: and this one classic"), "{got}");
    run_ok(&alice, &["group", "add", "vault", "carol"]);
    assert!(run_ok(&carol, &["sync"]).contains("you joined"));
    run_ok(&carol, &["send", "vault", "carol in the vault"]);
    for p in [&alice, &bob] {
        run_ok(p, &["sync"]);
        assert!(run_ok(p, &["read", "vault"]).contains("carol: carol in the vault"));
    }
    for (p, group, suite) in [(&carol, "vault", "pq"), (&bob, "vault", "pq"), (&bob, "plain", "classic")] {
        let info: serde_json::Value = serde_json::from_str(&run_ok(p, &["group", "info", group, "--json"])).unwrap();
        assert_eq!(info["suite"], suite, "{group}: {info}");
    }
    run_ok(&alice, &["group", "remove", "vault", "carol"]);
    assert!(run_ok(&carol, &["sync"]).contains("you were removed"));
    run_ok(&bob, &["send", "vault", "after carol left"]);
    run_ok(&alice, &["sync"]);
    assert!(run_ok(&alice, &["read", "vault"]).contains("bob: after carol left"));
    assert!(!run_ok(&carol, &["read", "vault"]).contains("after carol left"));
    // alice's laptop joins both by external commits, walked from her state.
    let laptop = tmp.path().join("laptop");
    crate::devices::link(&alice.home, &laptop, "laptop");
    let joined = ok(hush(&laptop, &["sync"]));
    assert_eq!(joined.matches("checked commit by commit").count(), 3, "{joined}");
    ok(hush(&laptop, &["send", "vault", "from the laptop, post-quantum"]));
    ok(hush(&laptop, &["send", "plain", "from the laptop, classic"]));
    run_ok(&bob, &["sync"]);
    assert!(run_ok(&bob, &["read", "vault"]).contains("alice: from the laptop, post-quantum"));
    assert!(run_ok(&bob, &["read", "plain"]).contains("alice: from the laptop, classic"));
    let info: serde_json::Value =
        serde_json::from_str(&ok(hush(&laptop, &["group", "info", "vault", "--json"]))).unwrap();
    assert_eq!(info["suite"], "pq");
}

/// A member whose client is older than post-quantum groups (it publishes
/// classic KeyPackages only): adding it to a post-quantum group fails with
/// a message that says what to do, and a classic group takes it.
async fn an_older_client_is_refused_from_a_post_quantum_group_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (_, conn, old) = registered_member(&server).await;
    conn.publish_key_packages(old.key_packages(2).unwrap(), Some(1)).await.unwrap();
    let old_id = old.account().to_string();
    let alice = tokio::task::block_in_place(|| crate::cli::person(&server, tmp.path(), "alice"));
    tokio::task::block_in_place(|| {
        run_ok(&alice, &["contact", "add", "old", &old_id]);
        run_ok(&alice, &["group", "create", "vault"]);
        let out = hush(&alice.home, &["group", "add", "vault", "old"]);
        assert!(!out.status.success(), "an older client went into a post-quantum group");
        let err = stderr(&out);
        assert!(err.contains("has no pq KeyPackage") && err.contains("--suite classic"), "{err}");
        run_ok(&alice, &["group", "create", "plain", "--suite", "classic"]);
        run_ok(&alice, &["group", "add", "plain", "old"]);
    });
    let welcomes = conn.fetch_welcomes().await.unwrap();
    assert_eq!(welcomes.len(), 1, "the classic group's Welcome");
}

/// The online-key certificate a fresh connection to `server` is shown
/// (`None`: the identity key itself serves).
async fn served_cert(address: &HushAddress) -> Option<OnlineCert> {
    let conn = Connection::connect(address, &Identity::generate().unwrap()).await.expect("connects");
    conn.server_cert()
}

/// Waits until new connections to `address` are shown an online key
/// other than `old`'s.
async fn wait_for_rotation(address: &HushAddress, old: Option<OnlineCert>) -> OnlineCert {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(cert) = served_cert(address).await {
            if Some(cert.online) != old.map(|c| c.online) {
                return cert;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the running server never served the rotated key");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn keys_cmd(data_dir: &Path, args: &[&str]) -> String {
    ok(run(hushd_command(data_dir).arg("keys").args(args)))
}

/// `hush chat GROUP` kept open, its input written line by line.
fn open_chat(p: &Person, group: &str) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hush"))
        .env_clear()
        .env("HOME", &p.home)
        .arg("--home")
        .arg(&p.home)
        .args(["chat", group])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

/// Two members chat on connections opened before the server's key is
/// rotated twice (the second time with the identity key exported and
/// given back only for the rotation): nothing is lost, both keep working
/// on their old connections while new ones get the new key, the chain
/// heads signed by three different keys verify, a new member registers
/// with the old address, the server restarts without its identity key at
/// the same address, and a rollback to the first online key (as a thief
/// of it would try) is refused by every client that saw the second.
async fn a_rotation_while_two_members_chat_loses_nothing_and_nobody_repins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let address = server.address.clone();
    let (alice, bob, _) = tokio::task::block_in_place(|| team(&server, tmp.path()));
    assert_eq!(served_cert(&address).await, None, "before any rotation the identity key serves");
    let (mut alice_chat, mut alice_in) = open_chat(&alice, "team");
    let (mut bob_chat, mut bob_in) = open_chat(&bob, "team");
    let say = |input: &mut std::process::ChildStdin, line: &str| {
        use std::io::Write;
        writeln!(input, "{line}").unwrap();
        input.flush().unwrap();
    };
    say(&mut alice_in, "alice before");
    say(&mut bob_in, "bob before");
    let shown = tokio::task::block_in_place(|| keys_cmd(&data, &["rotate", "--valid-for", "30d"]));
    assert!(shown.contains("online key"), "{shown}");
    let first = wait_for_rotation(&address, None).await;
    say(&mut alice_in, "alice after the first rotation");
    say(&mut bob_in, "bob after the first rotation");
    let first_key_file = std::fs::read(data.join("online.key")).unwrap();
    // The identity key leaves the machine; the server keeps serving.
    let offline = tmp.path().join("identity.key");
    tokio::task::block_in_place(|| keys_cmd(&data, &["export-identity", offline.to_str().unwrap()]));
    assert!(!data.join("server.key").exists());
    let init = tokio::task::block_in_place(|| ok(run(hushd_command(&data).arg("init"))));
    let init: HushAddress = init.trim().parse().unwrap();
    assert_eq!(init.fingerprint, address.fingerprint, "init after the export changed the address");
    assert!(!data.join("server.key").exists(), "init made a new identity key after its export");
    let out = tokio::task::block_in_place(|| run(hushd_command(&data).args(["keys", "rotate"])));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--identity-key"), "{}", stderr(&out));
    tokio::task::block_in_place(|| keys_cmd(&data, &["rotate", "--identity-key", offline.to_str().unwrap()]));
    let second = wait_for_rotation(&address, Some(first)).await;
    assert!(second.not_before >= first.not_before);
    say(&mut alice_in, "alice after the second rotation");
    say(&mut bob_in, "bob after the second rotation");
    drop((alice_in, bob_in));
    for chat in [&mut alice_chat, &mut bob_chat] {
        let status = wait_timeout(chat, WAIT).expect("chat did not exit at end of input");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut chat.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{err}");
    }
    let lines = [
        ": alice before",
        ": bob before",
        ": alice after the first rotation",
        ": bob after the first rotation",
        ": alice after the second rotation",
        ": bob after the second rotation",
    ];
    tokio::task::block_in_place(|| {
        for p in [&alice, &bob] {
            run_ok(p, &["sync"]);
            let read = run_ok(p, &["read", "team"]);
            for line in lines {
                assert!(read.contains(line), "{line:?} missing:\n{read}");
            }
            // Heads signed by the identity key and both online keys all
            // count as the server's.
            run_ok(p, &["verify", "team"]);
        }
        // A new member registers with the address as it always was.
        let dave = crate::cli::person(&server, tmp.path(), "dave");
        run_ok(&alice, &["contact", "add", "dave", &dave.id]);
        run_ok(&dave, &["contact", "add", "alice", &alice.id]);
        run_ok(&alice, &["group", "add", "team", "dave"]);
        let joined = run_ok(&dave, &["sync"]);
        assert!(joined.contains("you joined"), "{joined}");
        run_ok(&dave, &["send", "team", "dave after the rotations"]);
        run_ok(&bob, &["sync"]);
        assert!(run_ok(&bob, &["read", "team"]).contains(": dave after the rotations"));
    });
    // Restarted without its identity key: same address, same key.
    let (status, _) = server.terminate();
    assert!(status.success());
    let server = Hushd::start_with(&data, &format!("127.0.0.1:{}", address.port), &[]);
    assert_eq!(server.address, address);
    assert_eq!(served_cert(&address).await.map(|c| c.online), Some(second.online));
    // The first online key put back (a backup restored over the
    // rotation): the running server keeps serving the newer one.
    std::fs::write(data.join("online.key.back"), &first_key_file).unwrap();
    std::fs::set_permissions(data.join("online.key.back"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    std::fs::rename(data.join("online.key.back"), data.join("online.key")).unwrap();
    for _ in 0..3 {
        tokio::time::sleep(hush::server::keys::KEY_POLL_INTERVAL).await;
        assert_eq!(served_cert(&address).await.map(|c| c.online), Some(second.online), "went back to an older key");
    }
    // A hushd started on it (as a thief of the first online key would
    // run one): still certified, but older than what the clients saw.
    let (status, _) = server.terminate();
    assert!(status.success());
    let _thief = Hushd::start_with(&data, &format!("127.0.0.1:{}", address.port), &[]);
    assert_eq!(served_cert(&address).await.map(|c| c.online), Some(first.online));
    tokio::task::block_in_place(|| {
        for p in [&alice, &bob] {
            let out = hush(&p.home, &["sync"]);
            assert!(!out.status.success(), "a superseded online key was accepted");
            assert!(stderr(&out).contains("certified before the newest one this device saw"), "{}", stderr(&out));
        }
    });
}

/// A server presenting `serving` at an address pinning `pin`, answering
/// nothing after the handshake; the real `hush register` against it
/// fails with what its stderr says.
fn register_against(rt: &tokio::runtime::Runtime, serving: ServerKey, pin: hush::auth::Fingerprint) -> String {
    let _guard = rt.enter();
    let crypto = server_crypto(CurrentKey::new(serving)).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(std::sync::Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let ep = endpoint.clone();
    rt.spawn(async move {
        while let Some(incoming) = ep.accept().await {
            if let Ok(conn) = incoming.await {
                conn.close(quinn::VarInt::from_u32(0), b"test server");
            }
        }
    });
    let address = HushAddress { host: "127.0.0.1".into(), port, fingerprint: pin };
    let home = tempfile::tempdir().unwrap();
    let out = hush(home.path(), &["register", &address.to_string(), "--name", "eve"]);
    endpoint.close(quinn::VarInt::from_u32(0), b"");
    assert!(!out.status.success());
    stderr(&out)
}

/// What a client is shown instead of the pinned identity: an online key
/// certified by another identity, one whose certificate expired, one
/// not yet valid, a key with no certificate at all. Each is refused with
/// a message that says which; a properly certified one gets past the
/// handshake (and fails only because this server speaks no further).
fn a_client_refuses_online_keys_its_pinned_identity_did_not_certify_for_now() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let identity = Identity::generate().unwrap();
    let pin = identity.fingerprint();
    let mallory = Identity::generate().unwrap();
    let now = hush::util::now_unix();
    let online = |by: &Identity, from: u64, to: u64| {
        let key = Identity::generate().unwrap();
        let cert = OnlineCert::issue(by, key.public_key(), from, to).unwrap();
        ServerKey::online(key, cert).unwrap()
    };
    let cases = [
        (online(&mallory, now - 60, now + 3600), "certified by another identity"),
        (online(&identity, now - 7200, now - 3600), "expired at"),
        (online(&identity, now + 3600, now + 7200), "valid only from"),
        (ServerKey::identity(Identity::generate().unwrap()).unwrap(), "does not match the one you pinned"),
    ];
    for (serving, expected) in cases {
        let err = register_against(&rt, serving, pin);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    }
    let err = register_against(&rt, online(&identity, now - 60, now + 3600), pin);
    assert!(!err.contains("refusing the server") && !err.contains("pinned"), "a valid certificate refused: {err}");
}

crate::on_both_backends! {
    sync: [a_post_quantum_group_and_a_classic_one_side_by_side],
    async: [
        an_older_client_is_refused_from_a_post_quantum_group_with_advice,
        a_rotation_while_two_members_chat_loses_nothing_and_nobody_repins,
    ],
}

#[test]
fn a_client_refuses_online_keys_its_pinned_identity_did_not_certify() {
    a_client_refuses_online_keys_its_pinned_identity_did_not_certify_for_now();
}

//! Restarts, graceful shutdown, admission limits and configuration.

use std::time::Duration;

use hush::client::{ClientError, Connection};
use hush::wire::close;

use crate::support::*;

#[test]
fn restart_keeps_key_fingerprint_accounts_and_invites() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let server = Hushd::start(&dir);
    let addr = server.address.to_string();
    let token = server.invite(&["--uses", "2"]);
    ok(hush(&tmp.path().join("a"), &["register", &addr, "--invite", &token]));
    let port = server.port();
    let (status, _) = server.terminate();
    assert!(status.success());

    let again = Hushd::start_with(&dir, &format!("127.0.0.1:{port}"), &[]);
    assert_eq!(again.address.to_string(), addr, "same key, same address");
    ok(hush(&tmp.path().join("a"), &["status"]));
    // The invite's second use survived the restart; a third does not exist.
    ok(hush(&tmp.path().join("b"), &["register", &addr, "--invite", &token]));
    let out = hush(&tmp.path().join("c"), &["register", &addr, "--invite", &token]);
    assert!(stderr(&out).contains("no uses left"), "{}", stderr(&out));
}

#[test]
fn init_creates_the_same_identity_that_serve_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let init = ok(run(hushd_command(&dir).arg("init")));
    let printed: hush::auth::HushAddress = init.trim().parse().unwrap();
    let server = Hushd::start(&dir);
    assert_eq!(server.address.fingerprint, printed.fingerprint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_tells_connected_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (_a, alice) = registered_client(&server).await;
    let (_b, bob) = registered_client(&server).await;
    let (status, stderr) = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "exit status {status}; stderr:\n{stderr}");
    for conn in [alice, bob] {
        match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
            ClientError::Closed { code, .. } => assert_eq!(code, u64::from(close::SHUTTING_DOWN)),
            other => panic!("unexpected: {other:?}"),
        }
    }
}

#[tokio::test]
async fn forced_address_validation_still_lets_clients_in() {
    let tmp = tempfile::tempdir().unwrap();
    // retry_above_pending = 0: every new address must answer a QUIC retry.
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_RETRY_ABOVE_PENDING", "0")]);
    let (_id, conn) = registered_client(&server).await;
    conn.status().await.unwrap();
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_MAX_CONNECTIONS_PER_IP", "2")]);
    let (id, first) = registered_client(&server).await;
    let second = Connection::connect(&server.address, &id).await.unwrap();
    second.status().await.unwrap();
    let third = Connection::connect(&server.address, &id).await;
    assert!(matches!(third, Err(ClientError::Refused(_))), "{third:?}");
    // Closing one frees its slot.
    second.close().await;
    let mut admitted = None;
    for _ in 0..50 {
        if let Ok(c) = Connection::connect(&server.address, &id).await {
            admitted = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    admitted.expect("slot not freed").status().await.unwrap();
    first.status().await.unwrap();
}

#[test]
fn invalid_configuration_is_refused_at_start_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let out = run(hushd_command(&dir).env("HUSHD_MAX_CONNECTIONS", "lots").args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_connections"), "{}", stderr(&out));

    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hushd.toml"), "idle_timeout = 5\n").unwrap();
    let out = run(hushd_command(&dir).args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("idle_timeout"), "{}", stderr(&out));
}

#[test]
fn invite_needs_an_initialised_data_dir_and_valid_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nothing-here");
    let out = run(hushd_command(&dir).arg("invite"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("hushd serve"), "{}", stderr(&out));
    ok(run(hushd_command(&dir).arg("init")));
    for bad in [["--uses", "0"], ["--expires", "soon"]] {
        let out = run(hushd_command(&dir).arg("invite").args(bad));
        assert!(!out.status.success(), "{bad:?}");
    }
}

#[test]
fn check_and_backup_work_while_serving() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let server = Hushd::start(&dir);
    let token = server.invite(&[]);
    ok(hush(&tmp.path().join("a"), &["register", &server.address.to_string(), "--invite", &token]));
    let report = ok(run(hushd_command(&dir).arg("check")));
    assert!(report.contains("database  ok   integrity ok"), "{report}");
    assert!(report.contains("1 accounts"), "{report}");
    let copy = tmp.path().join("backup.db");
    let out = ok(run(hushd_command(&dir).arg("backup").arg(&copy)));
    assert!(out.contains("backed up"), "{out}");
    assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);
    // The copy is a working database: a server started on it knows the account.
    let restored = tmp.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::set_permissions(&restored, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(&copy, restored.join("hush.db")).unwrap();
    let accounts = ok(run(hushd_command(&restored).arg("accounts")));
    assert_eq!(accounts.lines().count(), 1, "{accounts}");
    // Refuses to overwrite.
    assert!(!run(hushd_command(&dir).arg("backup").arg(&copy)).status.success());
    // A key readable by others fails the check.
    drop(server);
    std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(hushd_command(&dir).arg("check"));
    assert!(!out.status.success());
    assert!(stdout(&out).contains("key       FAIL"), "{}", stdout(&out));
}

#[test]
fn bench_quick_mode_runs_and_reports_every_scenario() {
    let tmp = tempfile::tempdir().unwrap();
    // Every scenario of a debug build, while other tests load both cores:
    // ~10 s alone, so more than the usual bound.
    let out = ok(run_within(
        hushd_command(&tmp.path().join("unused")).args(["bench", "--quick", "--json"]).env("TMPDIR", tmp.path()),
        Duration::from_secs(180),
    ));
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.len() >= 10, "{out}");
    for word in [
        "handshake",
        "round trip",
        "durable send",
        "append",
        "fan-out",
        "latency",
        "memory",
        "bytes",
        "commit",
        "post-quantum",
        "Welcome",
        "file upload",
        "hush daemon",
        "group of 1000 commits",
        "raw openmls",
        "newest 100 messages",
        "CPU µs per durable send",
    ] {
        assert!(rows.iter().any(|r| r["scenario"].as_str().unwrap().contains(word)), "no {word} row: {out}");
    }
    // Every row carries two measured numbers. Their size depends on how
    // loaded the machine is (a measured difference can be zero or below),
    // so nothing here compares them: speed is the benchmark's business.
    for r in &rows {
        assert!(r["hush"].as_f64().is_some_and(f64::is_finite), "{r}");
        assert!(r["baseline"].as_f64().is_some_and(f64::is_finite), "{r}");
        assert!(r["ratio"].is_null() || r["ratio"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
}

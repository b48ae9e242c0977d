//! Registration by invite, through the real `hush` CLI.

use hush::client::Connection;
use hush::db::Admin as _;
use hush::wire::ErrorCode;
use tokio::task::JoinSet;

use crate::support::*;

#[test]
fn register_with_invite_then_status_authenticates() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let token = server.invite(&[]);
    let home = tmp.path().join("alice");
    let addr = server.address.to_string();
    let out = ok(hush(&home, &["register", &addr, "--invite", &token, "--name", "alice"]));
    assert!(out.starts_with("registered "), "{out}");

    let whoami = ok(hush(&home, &["whoami"]));
    let account = whoami.lines().next().unwrap().to_string();
    assert_eq!(account.len(), 52);

    let status = ok(hush(&home, &["status"]));
    assert!(status.contains(&account), "{status}");
    assert!(status.contains("authenticated"), "{status}");

    // The operator sees the account.
    let accounts = ok(run(hushd_command(&server.data_dir).arg("accounts")));
    assert!(accounts.contains(&account), "{accounts}");

    // Registering again is harmless and spends no invite use.
    let again = ok(hush(&home, &["register", &addr, "--invite", &token]));
    assert!(again.starts_with("already registered"), "{again}");
}

#[test]
fn used_up_expired_unknown_and_missing_invites_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let addr = server.address.to_string();

    let once = server.invite(&["--uses", "1"]);
    ok(hush(&tmp.path().join("a"), &["register", &addr, "--invite", &once]));
    let out = hush(&tmp.path().join("b"), &["register", &addr, "--invite", &once]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no uses left"), "{}", stderr(&out));

    let unknown = hush::auth::InviteToken::generate().unwrap().to_string();
    let out = hush(&tmp.path().join("b"), &["register", &addr, "--invite", &unknown]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not known"), "{}", stderr(&out));

    let out = hush(&tmp.path().join("b"), &["register", &addr, "--invite", "not-a-token"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invite refused"), "{}", stderr(&out));

    let out = hush(&tmp.path().join("b"), &["register", &addr]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("requires an invite"), "{}", stderr(&out));

    // `--expires` sets the expiry; an invite whose expiry has passed is
    // refused. (The past is written straight into the database: no sleep.)
    let now = hush::util::now_unix();
    server.invite(&["--expires", "1h"]);
    let mut db = hush::db::sqlite::Db::open(&server.data_dir.join("hush.db")).unwrap();
    let expiries: Vec<Option<u64>> = db.invites().unwrap().iter().map(|i| i.expires_at).collect();
    assert!(expiries.iter().any(|e| e.is_some_and(|t| (now + 3_590..=now + 3_610).contains(&t))), "{expiries:?}");
    let short = db.create_invite(1, Some(now - 1), now - 60).unwrap().to_string();
    drop(db);
    let out = hush(&tmp.path().join("b"), &["register", &addr, "--invite", &short]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    // A refused registration pins nothing: status still says to register.
    let out = hush(&tmp.path().join("b"), &["status"]);
    assert!(!out.status.success());
}

async fn racing_for_the_last_use_exactly_one_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let token = server.invite(&["--uses", "1"]);
    let mut racers = JoinSet::new();
    for _ in 0..8 {
        let address = server.address.clone();
        let token = token.clone();
        racers.spawn(async move {
            let (_, id, member) = hush::client::mls::Member::generate().unwrap();
            let conn = Connection::connect(&address, &id).await.unwrap();
            let r = conn.register(Some(&token), member.certificate()).await;
            conn.close().await;
            r
        });
    }
    let mut wins = 0;
    while let Some(r) = racers.join_next().await {
        match r.unwrap() {
            Ok(created) => {
                assert!(created);
                wins += 1;
            }
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::InviteUsedUp), "{e}"),
        }
    }
    assert_eq!(wins, 1);
    let accounts = ok(run(hushd_command(&server.data_dir).arg("accounts")));
    assert_eq!(accounts.lines().count(), 1, "{accounts}");
}

#[test]
fn client_home_and_server_secrets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let token = server.invite(&[]);
    let home = tmp.path().join("alice");
    ok(hush(&home, &["register", &server.address.to_string(), "--invite", &token, "--name", "alice"]));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home), 0o700);
    for entry in std::fs::read_dir(&home).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert_eq!(mode(&server.data_dir), 0o700);
    assert_eq!(mode(&server.data_dir.join("server.key")), 0o600);
    assert_eq!(mode(&server.data_dir.join("hush.db")), 0o600);
}

crate::on_both_backends! {
    sync: [],
    async: [racing_for_the_last_use_exactly_one_wins],
}

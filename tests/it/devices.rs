//! Several devices per person (issue 17): offboarding by the operator,
//! revocation, and the server as every group's external sender.

use std::path::Path;

use hush::auth::Identity;
use hush::client::app::App;

use crate::support::*;

/// Registers a `hush` home on `server`; returns its account id.
fn register(server: &Hushd, home: &Path) -> String {
    let token = server.invite(&[]);
    ok(hush(home, &["register", &server.address.to_string(), "--invite", &token]));
    ok(hush(home, &["whoami"])).lines().next().unwrap().to_string()
}

/// The epoch authenticator a home holds for its group `name`.
fn authenticator(server: &Hushd, home: &Path, name: &str) -> Vec<u8> {
    let key = Identity::load(&home.join("device.key")).unwrap();
    let mut app = App::open(home, key, server.address.clone()).unwrap();
    let row = app.resolve_group(name).unwrap();
    app.epoch_authenticator(&row).expect("state for the group")
}

/// The operator removes carol's account while serving: her key is refused
/// at once, and after one sync by a member she is out of every group; the
/// others go on with the same view of their group.
#[test]
fn an_offboarded_account_is_refused_and_leaves_every_group_after_one_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob, carol) = (tmp.path().join("alice"), tmp.path().join("bob"), tmp.path().join("carol"));
    register(&server, &alice);
    let bob_id = register(&server, &bob);
    let carol_id = register(&server, &carol);
    ok(hush(&alice, &["contact", "add", "bob", &bob_id]));
    ok(hush(&alice, &["contact", "add", "carol", &carol_id]));
    ok(hush(&bob, &["contact", "add", "carol", &carol_id]));
    ok(hush(&alice, &["group", "create", "team"]));
    ok(hush(&alice, &["group", "add", "team", "bob", "carol"]));
    ok(hush(&bob, &["sync"]));
    ok(hush(&bob, &["group", "create", "ops"]));
    ok(hush(&bob, &["group", "add", "ops", "carol"]));
    ok(hush(&carol, &["sync"]));
    ok(hush(&carol, &["send", "team", "carol was here"]));

    let out = run(hushd_command(&server.data_dir).args(["accounts", "remove", &carol_id]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 device(s) refused") && stdout(&out).contains("2 group membership(s)"),
        "{}",
        stdout(&out)
    );
    let listed = ok(run(hushd_command(&server.data_dir).arg("accounts")));
    let line = listed.lines().find(|l| l.starts_with(&carol_id)).unwrap();
    assert!(line.contains("removed"), "{listed}");
    assert!(!listed.lines().find(|l| l.starts_with(&bob_id)).unwrap().contains("removed"));

    // Her key is refused from now on.
    let refused = hush(&carol, &["sync"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("revoked"), "{}", stderr(&refused));

    // One sync by bob commits the server's removals in both groups.
    let seen = ok(hush(&bob, &["sync"]));
    assert!(seen.contains("carol was here"), "{seen}");
    assert!(seen.contains("the server removes a device of carol"), "{seen}");
    for (home, group) in [(&bob, "team"), (&bob, "ops")] {
        let members = ok(hush(home, &["group", "members", group]));
        assert!(!members.contains("carol"), "{group}: {members}");
    }
    ok(hush(&alice, &["sync"]));
    assert!(!ok(hush(&alice, &["group", "members", "team"])).contains("carol"));
    ok(hush(&alice, &["send", "team", "without carol"]));
    assert!(ok(hush(&bob, &["sync"])).contains("without carol"));
    assert_eq!(authenticator(&server, &alice, "team"), authenticator(&server, &bob, "team"));

    // Removing again finds nothing left to do; an unknown account is named.
    let again = ok(run(hushd_command(&server.data_dir).args(["accounts", "remove", &carol_id])));
    assert!(again.contains("0 device(s)"), "{again}");
    let unknown = run(hushd_command(&server.data_dir).args([
        "accounts",
        "remove",
        &Identity::generate().unwrap().account_id().to_string(),
    ]));
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("no such account"), "{}", stderr(&unknown));
}

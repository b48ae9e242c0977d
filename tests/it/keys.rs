//! Long-term keys (issue 35): post-quantum groups, real hushd, real
//! clients.

use crate::cli::{run_ok, team};
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

crate::on_both_backends! {
    sync: [a_post_quantum_group_and_a_classic_one_side_by_side],
    async: [an_older_client_is_refused_from_a_post_quantum_group_with_advice],
}

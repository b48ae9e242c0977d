//! Several devices per person (issue 17): offboarding by the operator,
//! revocation, and the server as every group's external sender.

use std::path::Path;

use hush::auth::{DeviceId, Identity};
use hush::client::app::App;
use hush::client::mls::Member;
use hush::client::Connection;

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
fn an_offboarded_account_is_refused_and_leaves_every_group_after_one_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob, carol) = (tmp.path().join("alice"), tmp.path().join("bob"), tmp.path().join("carol"));
    let alice_id = register(&server, &alice);
    let bob_id = register(&server, &bob);
    let carol_id = register(&server, &carol);
    ok(hush(&alice, &["contact", "add", "bob", &bob_id]));
    ok(hush(&alice, &["contact", "add", "carol", &carol_id]));
    ok(hush(&bob, &["contact", "add", "carol", &carol_id]));
    ok(hush(&bob, &["contact", "add", "alice", &alice_id]));
    ok(hush(&carol, &["contact", "add", "alice", &alice_id]));
    ok(hush(&carol, &["contact", "add", "bob", &bob_id]));
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

/// Registers `home` with a name.
fn register_named(server: &Hushd, home: &Path, name: &str) -> String {
    let token = server.invite(&[]);
    ok(hush(home, &["register", &server.address.to_string(), "--invite", &token, "--name", name]));
    ok(hush(home, &["whoami"])).lines().next().unwrap().to_string()
}

/// Registers alice (named) and bob, each the other's contact; returns
/// alice's account id.
fn acquainted(server: &Hushd, alice: &Path, bob: &Path) -> String {
    let alice_id = register_named(server, alice, "alice");
    let bob_id = register(server, bob);
    ok(hush(alice, &["contact", "add", "bob", &bob_id]));
    ok(hush(bob, &["contact", "add", "alice", &alice_id]));
    alice_id
}

/// Links a new home to `first`'s account under `name`; returns the
/// `device join` output.
pub(crate) fn link(first: &Path, new: &Path, name: &str) -> String {
    let (adding, code) = hush_first_line(first, &["device", "add", name]);
    assert!(code.starts_with("hushlink://"), "{code}");
    let joined = ok(hush(new, &["device", "join", &code]));
    let (status, err) = finish(adding);
    assert!(status.success(), "device add: {err}");
    joined
}

/// alice links a laptop: both devices get every message of her groups,
/// either device's messages show as alice, bob adding alice later adds both
/// devices, and nothing of the hand-over is readable on the server.
fn a_linked_device_reads_and_writes_as_the_same_person() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, laptop, bob) = (tmp.path().join("alice"), tmp.path().join("laptop"), tmp.path().join("bob"));
    let alice_id = acquainted(&server, &alice, &bob);
    // Markers: a contact name and a group name only alice's devices know.
    let marker_contact = "zq-contact-marker-71";
    let marker_group = "zq-group-marker-72";
    ok(hush(&alice, &["contact", "add", marker_contact, &Identity::generate().unwrap().account_id().to_string()]));
    ok(hush(&alice, &["group", "create", marker_group]));
    ok(hush(&alice, &["group", "add", marker_group, "bob"]));
    ok(hush(&bob, &["sync"]));

    let joined = link(&alice, &laptop, "laptop");
    assert!(joined.contains(&alice_id), "{joined}");
    assert_eq!(ok(hush(&laptop, &["whoami"])).lines().next().unwrap(), alice_id);
    assert!(ok(hush(&laptop, &["contact", "list"])).contains("bob"));
    // Registering the laptop again changes nothing and makes no account key.
    let again = hush(&laptop, &["register", &server.address.to_string()]);
    assert!(!again.status.success() && stderr(&again).contains("linked device"), "{}", stderr(&again));
    assert!(!laptop.join("account.key").exists());
    let synced = ok(hush(&laptop, &["sync"]));
    assert!(synced.contains("this device joined the group"), "{synced}");
    let devices = ok(hush(&alice, &["device", "list"]));
    assert_eq!(devices.lines().count(), 2, "{devices}");
    assert!(devices.contains("(this device)") && devices.contains("laptop"), "{devices}");

    // Both of alice's devices read bob; bob reads both as alice.
    ok(hush(&bob, &["send", marker_group, "hello both"]));
    assert!(ok(hush(&alice, &["sync"])).contains("hello both"));
    assert!(ok(hush(&laptop, &["sync"])).contains("hello both"));
    ok(hush(&laptop, &["send", marker_group, "from the laptop"]));
    ok(hush(&alice, &["send", marker_group, "from the phone"]));
    let seen = ok(hush(&bob, &["sync"]));
    assert!(seen.contains("alice: from the laptop") && seen.contains("alice: from the phone"), "{seen}");
    // alice's own send caught up first; her history has the laptop's line
    // (her own, so shown as "you").
    assert!(ok(hush(&alice, &["read", marker_group])).contains("you: from the laptop"));

    // bob adds alice to a new group: both of her devices come in.
    ok(hush(&bob, &["group", "create", "pair"]));
    ok(hush(&bob, &["group", "add", "pair", "alice"]));
    ok(hush(&bob, &["send", "pair", "just us"]));
    for home in [&alice, &laptop] {
        assert!(ok(hush(home, &["sync"])).contains("just us"), "{}", home.display());
    }

    // The hand-over went through the server sealed.
    for path in files_under(&server.data_dir) {
        let bytes = std::fs::read(path).unwrap_or_default();
        for marker in [marker_contact, marker_group] {
            assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()), "{marker} on the server");
        }
    }
}

/// A code works once; a device of another account cannot use it; a
/// stranger who answers without the secret gets nothing certified.
fn link_codes_are_single_use_and_need_the_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let alice = tmp.path().join("alice");
    register(&server, &alice);
    let (adding, code) = hush_first_line(&alice, &["device", "add", "laptop"]);
    ok(hush(&tmp.path().join("laptop"), &["device", "join", &code]));
    assert!(finish(adding).0.success());
    let again = hush(&tmp.path().join("thief"), &["device", "join", &code]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already used"), "{}", stderr(&again));
    // The name is taken now.
    let taken = hush(&alice, &["device", "add", "laptop"]);
    assert!(!taken.status.success() && stderr(&taken).contains("already called"), "{}", stderr(&taken));

    // A stranger who knows the link id but not the secret offers garbage:
    // the first device refuses to certify and says why.
    let (adding, code) = hush_first_line(&alice, &["device", "add", "tablet"]);
    let parsed: hush::client::link::LinkCode = code.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let key = Identity::generate().unwrap();
        let conn = hush::client::Connection::connect(&server.address, &key).await.unwrap();
        conn.link_offer(parsed.id(), vec![7; 80]).await.unwrap();
        conn.close().await;
    });
    let (status, err) = finish(adding);
    assert!(!status.success());
    assert!(err.contains("does not open with this code"), "{err}");
    let list = ok(hush(&alice, &["device", "list"]));
    assert_eq!(list.lines().count(), 2, "nothing was certified: {list}");
    // A linked device is not the first device: it cannot link or revoke.
    let secondary = hush(&tmp.path().join("laptop"), &["device", "add", "other"]);
    assert!(!secondary.status.success() && stderr(&secondary).contains("first device"), "{}", stderr(&secondary));
}

/// alice revokes her laptop: it cannot connect any more, bob is told, and
/// after the next commit the laptop reads nothing new.
/// alice (with a linked laptop) and bob in group "team", everyone synced.
fn team_with_laptop(server: &Hushd, alice: &Path, laptop: &Path, bob: &Path) {
    acquainted(server, alice, bob);
    ok(hush(alice, &["group", "create", "team"]));
    ok(hush(alice, &["group", "add", "team", "bob"]));
    ok(hush(bob, &["sync"]));
    link(alice, laptop, "laptop");
    ok(hush(laptop, &["sync"]));
    ok(hush(bob, &["sync"]));
}

fn a_revoked_device_is_refused_and_leaves_the_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, laptop, bob) = (tmp.path().join("alice"), tmp.path().join("laptop"), tmp.path().join("bob"));
    team_with_laptop(&server, &alice, &laptop, &bob);

    let revoked = ok(hush(&alice, &["device", "revoke", "laptop"]));
    assert!(revoked.starts_with("revoked laptop"), "{revoked}");
    let refused = hush(&laptop, &["sync"]);
    assert!(!refused.status.success() && stderr(&refused).contains("revoked"), "{}", stderr(&refused));
    let seen = ok(hush(&bob, &["sync"]));
    // bob learns the revocation from alice's account key itself (not only
    // from the server, which could withhold it or let the laptop back in),
    // and sees alice's own device remove the laptop's leaf.
    assert!(seen.contains("alice revoked one of its devices (signed with the account key)"), "{seen}");
    assert!(seen.contains("one of alice's devices was removed by"), "{seen}");
    assert!(ok(hush(&alice, &["read", "team"])).contains("you revoked your device laptop"));
    ok(hush(&bob, &["send", "team", "after the laptop"]));
    assert!(ok(hush(&alice, &["sync"])).contains("after the laptop"));
    assert_eq!(authenticator(&server, &alice, "team"), authenticator(&server, &bob, "team"));
    assert!(ok(hush(&alice, &["device", "list"])).contains("(revoked)"));
}

/// issue 29: the operator lets alice's revoked laptop back in (clears the
/// revocation in its database) and relays the laptop's "new device" join.
/// bob learned the revocation from alice's account key, so his client finds
/// the laptop back, removes it before sending, and the laptop cannot read
/// what bob sends.
async fn a_revoked_device_the_operator_lets_back_in_is_removed_again_by_members() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("s");
    let server = Hushd::start(&data);
    let (alice, laptop, bob) = (tmp.path().join("alice"), tmp.path().join("laptop"), tmp.path().join("bob"));
    let group = tokio::task::block_in_place(|| {
        team_with_laptop(&server, &alice, &laptop, &bob);
        ok(hush(&alice, &["device", "revoke", "laptop"]));
        let seen = ok(hush(&bob, &["sync"]));
        assert!(seen.contains("revoked one of its devices"), "{seen}");
        let key = Identity::load(&bob.join("device.key")).unwrap();
        let app = App::open(&bob, key, server.address.clone()).unwrap();
        app.resolve_group("team").unwrap().id
    });
    // The operator un-revokes the laptop.
    let laptop_key = Identity::load(&laptop.join("device.key")).unwrap();
    if postgres() {
        let hex: String = laptop_key.public_key().iter().map(|b| format!("{b:02x}")).collect();
        sql(&data, &format!("UPDATE devices SET revoked_at = NULL WHERE key = '\\x{hex}'"));
    } else {
        let db = rusqlite::Connection::open(data.join("hush.db")).unwrap();
        db.execute("UPDATE devices SET revoked_at = NULL WHERE key = ?1", [&laptop_key.public_key()[..]]).unwrap();
    }
    // The laptop (raw openmls here, with a certificate of alice's account
    // for the laptop's device) joins as a new device of alice.
    let alice_account = Identity::load(&alice.join("account.key")).unwrap();
    let mut raw = Member::new(&alice_account, DeviceId(laptop_key.public_key())).unwrap();
    let conn = Connection::connect(&server.address, &laptop_key).await.unwrap();
    let (info, tree) = conn.group_info(&group).await.unwrap();
    let commit = raw.join_external(&group, &info, tree.as_deref()).unwrap();
    conn.commit(commit).await.expect("the operator's server takes the laptop back");

    tokio::task::block_in_place(|| {
        let seen = ok(hush(&bob, &["sync"]));
        assert!(seen.contains("you removed 1 device(s) their account revoked"), "{seen}");
        ok(hush(&bob, &["send", "team", "not for the laptop"]));
        assert!(ok(hush(&alice, &["sync"])).contains("not for the laptop"));
    });
    let start = conn.groups().await.unwrap().into_iter().find(|g| g.group == group).map_or(0, |g| g.acked_seq);
    let reads = hush::client::log::GroupLog::new(&group, start).read_all_over(&mut raw, &conn, None).await.unwrap();
    let texts = hush::client::mls::Received::texts(
        &reads
            .into_iter()
            .filter_map(|r| match r {
                hush::client::log::Read::Received { received, .. } => Some(received),
                _ => None,
            })
            .collect::<Vec<_>>(),
    );
    assert!(!texts.iter().any(|t| t.contains("not for the laptop")), "the revoked laptop read bob: {texts:?}");
}

/// A malicious (or careless) member adds one of alice's two devices: the
/// real hushd refuses; adding both is accepted.
async fn a_commit_adding_only_some_devices_of_a_person_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, laptop) = (tmp.path().join("alice"), tmp.path().join("laptop"));
    let alice_id: hush::auth::AccountId = tokio::task::block_in_place(|| {
        let id = register(&server, &alice);
        link(&alice, &laptop, "laptop");
        id
    })
    .parse()
    .unwrap();
    let (_, conn, mut bob) = registered_member(&server).await;
    let removal_key = conn.status().await.unwrap().removal_key;
    let g = bob.create_group(&removal_key).unwrap();
    conn.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let packages = conn.claim_key_packages(&alice_id).await.unwrap();
    assert_eq!(packages.len(), 2, "one package per device");
    let partial = bob.add(&g.id, &[(alice_id, packages[0].clone())]).unwrap();
    let refused = conn.commit(partial).await.unwrap_err();
    assert_eq!(refused.code(), Some(hush::wire::ErrorCode::InvalidCommit));
    assert!(refused.to_string().contains("only some devices"), "{refused}");
    bob.discard_pending(&g.id).unwrap();
    let both: Vec<_> = packages.into_iter().map(|p| (alice_id, p)).collect();
    conn.commit(bob.add(&g.id, &both).unwrap()).await.unwrap();
}

crate::on_both_backends! {
    sync: [an_offboarded_account_is_refused_and_leaves_every_group_after_one_sync, a_linked_device_reads_and_writes_as_the_same_person, link_codes_are_single_use_and_need_the_secret, a_revoked_device_is_refused_and_leaves_the_groups],
    async: [a_commit_adding_only_some_devices_of_a_person_is_refused, a_revoked_device_the_operator_lets_back_in_is_removed_again_by_members],
}

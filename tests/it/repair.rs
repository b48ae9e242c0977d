//! Group repair (issue 15): a commit that nobody can process never bricks a
//! group. A malicious member (raw openmls) gets such a commit accepted by
//! the real hushd; the real `hush` clients rejoin the group's current epoch
//! from the GroupInfo the server keeps, say who broke it, remove them and
//! carry on. And the server accepts an external commit only as a member
//! device's resync of its own leaf.

use std::path::{Path, PathBuf};

use hush::auth::{DeviceCertificate, DeviceId, Identity};
use hush::client::app::App;
use hush::client::log::{GroupLog, Read};
use hush::client::mls::{Commit, Member};
use hush::client::Connection;
use hush::wire::ErrorCode;

use crate::support::*;

/// Registers a `hush` home on `server`; returns its account id.
pub(crate) fn register(server: &Hushd, home: &Path) -> String {
    let token = server.invite(&[]);
    ok(hush(home, &["register", &server.address.to_string(), "--invite", &token]));
    ok(hush(home, &["whoami"])).lines().next().unwrap().to_string()
}

/// A raw openmls member registered on `server`, with its account key.
pub(crate) async fn raw_member(server: &Hushd) -> (Identity, Connection, Member) {
    let token = server.invite(&[]);
    let (account, device, member) = Member::generate().unwrap();
    let conn = Connection::connect(&server.address, &device).await.unwrap();
    assert!(conn.register(Some(&token), member.certificate()).await.unwrap());
    conn.publish_key_packages(member.key_packages(2).unwrap(), Some(1)).await.unwrap();
    // Groups `hush group create` makes are post-quantum by default.
    let pq = member.key_packages_of(hush::mls::Suite::Pq, 2).unwrap();
    conn.publish_key_packages(pq, Some(1)).await.unwrap();
    (account, conn, member)
}

/// Reads everything in `group` after `cursor` with the library's reader.
pub(crate) async fn catch_up(conn: &Connection, member: &mut Member, group: &[u8], cursor: u64) {
    let reads = GroupLog::new(group, cursor).read_all_over(member, conn, None).await.unwrap();
    assert!(!reads.iter().any(|r| matches!(r, Read::Failed { .. })), "{reads:?}");
}

/// The epoch authenticator a home holds for its group `name`.
pub(crate) fn authenticator(server: &Hushd, home: &Path, name: &str) -> Vec<u8> {
    let key = Identity::load(&home.join("device.key")).unwrap();
    let mut app = App::open(home, key, server.address.clone()).unwrap();
    let row = app.resolve_group(name).unwrap();
    app.epoch_authenticator(&row).expect("state for the group")
}

/// alice and bob (`hush` homes) and mallory (raw openmls) in group "team",
/// everyone at the same epoch. Returns the homes, mallory (connection,
/// member, account key) and the group id.
pub(crate) async fn team(server: &Hushd, tmp: &Path) -> (PathBuf, PathBuf, Connection, Member, Identity, Vec<u8>) {
    let (alice, bob) = (tmp.join("alice"), tmp.join("bob"));
    let alice_id = register(server, &alice);
    let bob_id = register(server, &bob);
    let (mallory_account, mallory, mut mallory_mls) = raw_member(server).await;
    let mallory_id = mallory_mls.account().to_string();
    tokio::task::block_in_place(|| {
        ok(hush(&bob, &["contact", "add", "alice", &alice_id]));
        ok(hush(&alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(&alice, &["contact", "add", "mallory", &mallory_id]));
        ok(hush(&alice, &["group", "create", "team"]));
        ok(hush(&alice, &["group", "add", "team", "bob", "mallory"]));
        ok(hush(&bob, &["sync"]));
    });
    let welcomes = mallory.fetch_welcomes().await.unwrap();
    let group = mallory_mls.join(&welcomes[0].1).unwrap();
    mallory.ack_welcome(welcomes[0].0).await.unwrap();
    let start = mallory.groups().await.unwrap()[0].acked_seq;
    catch_up(&mallory, &mut mallory_mls, &group, start).await;
    (alice, bob, mallory, mallory_mls, mallory_account, group)
}

/// mallory's broken commit is accepted; alice and bob repair, name her,
/// remove her, and go on talking with the same view of the group.
async fn survives(break_commit: fn(&mut Member, &[u8]) -> Commit) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob, mallory, mut mallory_mls, _, group) = team(&server, tmp.path()).await;
    let bad_epoch = mallory_mls.epoch(&group).unwrap();
    let commit = break_commit(&mut mallory_mls, &group);
    let (_, epoch) = mallory.commit(commit).await.expect("the server cannot tell the commit is broken");
    assert_eq!(epoch, bad_epoch + 1);
    mallory_mls.merge_pending(&group).unwrap();

    let (alice_sync, bob_sync) = tokio::task::block_in_place(|| {
        let a = ok(hush(&alice, &["sync"]));
        let b = ok(hush(&bob, &["sync"]));
        (a, b)
    });
    let expected = format!("mallory's change at epoch {bad_epoch} could not be read; this device rejoined the group");
    assert!(alice_sync.contains(&expected), "alice did not repair: {alice_sync}");
    assert!(bob_sync.contains(&format!("change at epoch {bad_epoch} could not be read")), "bob: {bob_sync}");
    assert!(bob_sync.contains("this device rejoined the group"), "bob did not repair: {bob_sync}");
    assert!(alice_sync.contains("cannot be decrypted here"), "{alice_sync}");

    tokio::task::block_in_place(|| {
        ok(hush(&alice, &["group", "remove", "team", "mallory"]));
        ok(hush(&alice, &["send", "team", "repaired and without mallory"]));
        let b = ok(hush(&bob, &["sync"]));
        assert!(b.contains("repaired and without mallory"), "bob: {b}");
        assert!(b.contains(" was removed by "), "bob: {b}");
        ok(hush(&bob, &["send", "team", "good to have you back"]));
        let a = ok(hush(&alice, &["sync"]));
        assert!(a.contains("good to have you back"), "alice: {a}");
        let members = ok(hush(&alice, &["group", "members", "team"]));
        assert!(!members.contains("mallory"), "{members}");
    });
    assert_eq!(authenticator(&server, &alice, "team"), authenticator(&server, &bob, "team"));
    // Mallory is out: her sends are refused.
    let late = mallory_mls.encrypt(&group, b"still here?").unwrap();
    let e = mallory.send(late, None).await.unwrap_err();
    assert!(matches!(e.code(), Some(ErrorCode::NotMember) | Some(ErrorCode::StaleEpoch)), "{e}");
}

fn corrupted_membership_tag(m: &mut Member, group: &[u8]) -> Commit {
    let mut commit = m.self_update(group).unwrap();
    commit.corrupt_membership_tag();
    commit
}

fn garbage_update_path(m: &mut Member, group: &[u8]) -> Commit {
    m.garbage_path_update(group).unwrap()
}

async fn a_commit_with_a_corrupted_membership_tag_is_repaired_by_every_member() {
    survives(corrupted_membership_tag).await;
}

async fn a_commit_with_a_garbage_update_path_is_repaired_by_every_member() {
    survives(garbage_update_path).await;
}

async fn a_device_restored_from_an_old_backup_rejoins_instead_of_staying_stuck() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let alice_id = register(&server, &alice);
    let bob_id = register(&server, &bob);
    let backup = tmp.path().join("bob-backup");
    tokio::task::block_in_place(|| {
        ok(hush(&bob, &["contact", "add", "alice", &alice_id]));
        ok(hush(&alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(&alice, &["group", "create", "team"]));
        ok(hush(&alice, &["group", "add", "team", "bob"]));
        ok(hush(&bob, &["sync"]));
        copy_dir(&bob, &backup);
        // The group moves on, and everything is read (so the server
        // deletes it): bob's backup is behind epochs nobody keeps.
        let carol = tmp.path().join("carol");
        let carol_id = register(&server, &carol);
        ok(hush(&carol, &["contact", "add", "alice", &alice_id]));
        ok(hush(&alice, &["contact", "add", "carol", &carol_id]));
        ok(hush(&alice, &["group", "add", "team", "carol"]));
        ok(hush(&alice, &["send", "team", "before the restore"]));
        ok(hush(&bob, &["sync"]));
        ok(hush(&carol, &["sync"]));
        ok(hush(&alice, &["sync"]));
        std::fs::remove_dir_all(&bob).unwrap();
        copy_dir(&backup, &bob);
        // The commits since bob's state are gone: the server's word that
        // the group is at a later epoch is all there is, so bob's sync does
        // not rejoin, and says how to.
        let out = ok(hush(&bob, &["sync"]));
        assert!(out.contains("this device was behind the group"), "{out}");
        assert!(out.contains("did not show the commits") && out.contains("hush group rejoin"), "{out}");
        assert!(!out.contains("rejoined"), "{out}");
        // On bob's word, it does, naming who is there now.
        let out = ok(hush(&bob, &["group", "rejoin", "team"]));
        assert!(out.contains("rejoined the group") && out.contains("unverified"), "{out}");
        assert!(out.contains("in this group now, and not when this device last followed it"), "{out}");
        ok(hush(&bob, &["send", "team", "back from the backup"]));
        let a = ok(hush(&alice, &["sync"]));
        assert!(a.contains("back from the backup"), "{a}");
        assert!(a.contains("bob rejoined the group"), "{a}");
    });
    assert_eq!(authenticator(&server, &alice, "team"), authenticator(&server, &bob, "team"));
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

// ---- what the server accepts as a resync ----

async fn an_external_commit_is_accepted_only_as_a_member_devices_resync_of_its_own_leaf() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (_alice, _bob, mallory, mut mallory_mls, mallory_account, group) = team(&server, tmp.path()).await;
    let (info, tree) = mallory.group_info(&group).await.unwrap();
    let epoch = mallory_mls.epoch(&group).unwrap();
    let refused = |r: Result<(u64, u64), hush::client::ClientError>, code: ErrorCode, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Some(code), "{what}: {e}");
    };
    let now = hush::util::now_unix();

    // An outsider handed the GroupInfo: it has no leaf to resync.
    let (_, eve, mut eve_mls) = raw_member(&server).await;
    refused(eve.group_info(&group).await.map(|_| (0, 0)), ErrorCode::NotMember, "an outsider read the GroupInfo");
    let c = eve_mls.rejoin_unchecked(&group, &info, tree.as_deref()).unwrap();
    refused(eve.commit(c).await, ErrorCode::NotMember, "an outsider joined by external commit");

    // A device mallory's account certifies on the side, its external commit
    // sent over her connection: it would add a leaf nobody claimed a
    // KeyPackage for, and remove none.
    let phantom_device = DeviceId(Identity::generate().unwrap().public_key());
    let mut phantom =
        Member::create(openmls_rust_crypto::OpenMlsRustCrypto::default(), &mallory_account, phantom_device, now)
            .unwrap();
    let c = phantom.rejoin_unchecked(&group, &info, tree.as_deref()).unwrap();
    refused(mallory.commit(c).await, ErrorCode::InvalidCommit, "a resync that removes no leaf");

    // Her own leaf replaced by a leaf for that other device (her account
    // certifies her MLS key for it): a resync that moves the leaf.
    let moved = DeviceCertificate::issue(&mallory_account, phantom_device, mallory_mls.certificate().mls_key, now);
    let c = mallory_mls.rejoin_as(&group, &info, tree.as_deref(), moved.encode()).unwrap();
    refused(mallory.commit(c).await, ErrorCode::InvalidCredential, "a resync that moves the leaf to another device");
    assert_eq!(mallory.groups().await.unwrap()[0].epoch, epoch, "a refused resync changed the group");

    // The same member's honest resync of her own leaf is accepted.
    let c = mallory_mls.resync(&group, &info, tree.as_deref(), None).unwrap();
    let (_, after) = mallory.commit(c).await.expect("an honest resync");
    assert_eq!(after, epoch + 1);
    // A commit without the GroupInfo of its epoch is refused.
    let mut c = mallory_mls.self_update(&group).unwrap();
    c.group_info = info;
    refused(mallory.commit(c).await, ErrorCode::InvalidCommit, "a commit with a stale GroupInfo");
}

crate::on_both_backends! {
    sync: [],
    async: [a_commit_with_a_corrupted_membership_tag_is_repaired_by_every_member, a_commit_with_a_garbage_update_path_is_repaired_by_every_member, a_device_restored_from_an_old_backup_rejoins_instead_of_staying_stuck, an_external_commit_is_accepted_only_as_a_member_devices_resync_of_its_own_leaf],
}

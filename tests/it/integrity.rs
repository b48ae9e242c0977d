//! Group integrity, second round (issue 29): a malicious member (raw
//! openmls, straight to a real hushd) cannot freeze a group with a
//! proposal hush does not use, nor get someone removed in another member's
//! name. (The operator's part, a server that rolls a member back or breaks
//! one group's sync, is in `malicious.rs`.)

use hush::auth::{DeviceId, DeviceRevocation, Identity};
use hush::client::mls::adversary::HostileProposal;
use hush::client::payload::Payload;
use hush::wire::ErrorCode;

use crate::repair::{catch_up, raw_member, team};
use crate::support::*;

/// Each proposal that froze a group is refused by the server; the group
/// goes on (mallory can be removed) and so does every other group.
async fn a_psk_a_gce_or_a_foreign_add_proposal_leaves_every_group_working() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob, mallory, mut mallory_mls, _, group) = team(&server, tmp.path()).await;
    tokio::task::block_in_place(|| {
        ok(hush(&alice, &["group", "create", "other"]));
        ok(hush(&alice, &["group", "add", "other", "bob"]));
        ok(hush(&bob, &["sync"]));
    });
    // A commit carrying a proposal type hush does not use is refused.
    let commit = mallory_mls.commit_with_extensions(&group).unwrap();
    let e = mallory.commit(commit).await.expect_err("the server took a commit with a GroupContextExtensions");
    assert_eq!(e.code(), Some(ErrorCode::InvalidCommit), "{e}");
    mallory_mls.discard_pending(&group).unwrap();
    // A KeyPackage of an account the server never handed out to mallory.
    let (_, _, stranger) = raw_member(&server).await;
    let foreign = stranger.key_packages_of(hush::mls::Suite::Pq, 1).unwrap().remove(0);
    for kind in [HostileProposal::PreSharedKey, HostileProposal::GroupContextExtensions, HostileProposal::Add(foreign)]
    {
        let proposal = mallory_mls.hostile_proposal(&group, &kind).unwrap();
        let e = mallory.send(proposal, None).await.expect_err("the server stored a proposal hush does not use");
        assert_eq!(e.code(), Some(ErrorCode::InvalidCommit), "{kind:?}: {e}");
        assert!(e.to_string().contains("hush does not use it"), "{kind:?}: {e}");
    }

    tokio::task::block_in_place(|| {
        ok(hush(&alice, &["group", "remove", "team", "mallory"]));
        ok(hush(&alice, &["send", "other", "the other group is fine"]));
        ok(hush(&alice, &["send", "team", "team is fine"]));
        let b = ok(hush(&bob, &["sync"]));
        assert!(b.contains("the other group is fine") && b.contains("team is fine"), "{b}");
        assert!(b.contains(" was removed by "), "{b}");
    });
}

/// mallory proposes removing bob: everyone sees who asked, nobody's sync
/// commits it in their name, and bob stays.
async fn a_members_removal_proposal_is_shown_with_its_author_and_committed_by_nobody_unasked() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob, mallory, mut mallory_mls, _, group) = team(&server, tmp.path()).await;
    let bob_account = tokio::task::block_in_place(|| ok(hush(&bob, &["whoami"])).lines().next().unwrap().to_string());
    let proposal = mallory_mls.propose_removal(&group, &bob_account.parse().unwrap()).unwrap();
    mallory.send(proposal, None).await.expect("a member may propose a removal");
    tokio::task::block_in_place(|| {
        let a = ok(hush(&alice, &["sync"]));
        assert!(a.contains("mallory proposed removing bob"), "{a}");
        assert!(!a.contains("was removed"), "{a}");
        let b = ok(hush(&bob, &["sync"]));
        assert!(b.contains("proposed removing you"), "{b}");
        assert!(!b.contains("you were removed"), "{b}");
        // Another sync, another commit for another reason: bob is still in.
        ok(hush(&alice, &["send", "team", "bob is still here"]));
        let b = ok(hush(&bob, &["sync"]));
        assert!(b.contains("bob is still here"), "{b}");
        assert!(ok(hush(&alice, &["group", "members", "team"])).contains("bob"));
    });
    // And mallory's own view agrees: bob still holds a leaf.
    let start = mallory.groups().await.unwrap()[0].acked_seq;
    catch_up(&mallory, &mut mallory_mls, &group, start).await;
    assert!(mallory_mls.members(&group).contains(&bob_account.parse().unwrap()));
}

/// mallory fills bob's group quota with junk groups; bob leaves them and
/// the quota is free at once, though nobody commits his leaving; the
/// operator can take an account out of one group too.
async fn leaving_frees_the_group_quota_without_anyone_committing_and_the_operator_can_remove_one_membership() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("s");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hushd.toml"), "max_groups_per_account = 2\n").unwrap();
    let server = Hushd::start(&data);
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    crate::repair::register(&server, &alice);
    let bob_id = crate::repair::register(&server, &bob);
    let bob_account: hush::auth::AccountId = bob_id.parse().unwrap();
    let (_, mallory, mut mallory_mls) = raw_member(&server).await;
    let removal_key = mallory.status().await.unwrap().removal_key;
    let mut junk = Vec::new();
    for _ in 0..2 {
        let g = mallory_mls.create_group(&removal_key).unwrap();
        mallory.create_group(g.group_info, g.ratchet_tree).await.unwrap();
        let packages = claim(&mallory, bob_account).await;
        mallory.commit(mallory_mls.add(&g.id, &packages).unwrap()).await.unwrap();
        mallory_mls.merge_pending(&g.id).unwrap();
        junk.push(hush::auth::text::encode(&g.id));
    }
    tokio::task::block_in_place(|| {
        ok(hush(&alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(&alice, &["group", "create", "team"]));
        let refused = hush(&alice, &["group", "add", "team", "bob"]);
        assert!(!refused.status.success(), "bob's quota is full");
        assert!(stderr(&refused).contains("the most this server allows"), "{}", stderr(&refused));
        // mallory is not bob's contact: her invitations wait.
        let seen = ok(hush(&bob, &["sync"]));
        assert!(seen.contains("(not a contact) invited you"), "{seen}");
        assert!(!seen.contains("you joined"), "{seen}");
        let waiting = ok(hush(&bob, &["invitations"]));
        for id in &junk {
            assert!(waiting.contains(id.as_str()), "{waiting}");
            assert!(!ok(hush(&bob, &["group", "list"])).contains(id.as_str()));
            ok(hush(&bob, &["invitations", "decline", id]));
        }
        assert!(ok(hush(&bob, &["invitations"])).trim().is_empty());
        // bob adds alice as a contact: her invitation is joined at once.
        let alice_id = ok(hush(&alice, &["whoami"])).lines().next().unwrap().to_string();
        ok(hush(&bob, &["contact", "add", "alice", &alice_id]));
        // Nobody committed bob's leaving (mallory never will): the server
        // counts him out all the same.
        ok(hush(&alice, &["group", "add", "team", "bob"]));
        assert!(ok(hush(&bob, &["sync"])).contains("you joined"));
    });
    // Another junk group (mallory's accomplice eve: mallory is at her own
    // quota); the operator takes bob out of it.
    let (_, mallory, mut mallory_mls) = raw_member(&server).await;
    let g = mallory_mls.create_group(&removal_key).unwrap();
    mallory.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let packages = claim(&mallory, bob_account).await;
    mallory.commit(mallory_mls.add(&g.id, &packages).unwrap()).await.unwrap();
    mallory_mls.merge_pending(&g.id).unwrap();
    tokio::task::block_in_place(|| {
        let out =
            ok(run(hushd_command(&data).args(["groups", "remove-member", &hush::auth::text::encode(&g.id), &bob_id])));
        assert!(out.contains("removed") && out.contains("1 device(s)"), "{out}");
        ok(hush(&alice, &["group", "create", "second"]));
        ok(hush(&alice, &["group", "add", "second", "bob"]));
        // Unknown group or account: a clear refusal.
        let bad =
            run(hushd_command(&data).args(["groups", "remove-member", &hush::auth::text::encode(&g.id), &bob_id]));
        assert!(!bad.status.success() && stderr(&bad).contains("not a member"), "{}", stderr(&bad));
    });
    // mallory's next commit in that group leaves bob's leaf in: the server
    // proposes its removal again, and bob stays out.
    let commit = mallory_mls.self_update(&g.id).unwrap();
    mallory.commit(commit).await.unwrap();
    mallory_mls.merge_pending(&g.id).unwrap();
    let listing = mallory.groups().await.unwrap();
    assert!(listing.iter().any(|s| s.group == g.id));
    let bob_device = hush::auth::Identity::load(&bob.join("device.key")).unwrap();
    let bob_conn = hush::client::Connection::connect(&server.address, &bob_device).await.unwrap();
    let e = bob_conn.fetch(&g.id, u64::MAX - 1, 0).await;
    assert!(e.is_err() || e.unwrap().0.is_empty());
    let bob_groups = bob_conn.groups().await.unwrap();
    assert!(bob_groups.iter().filter(|s| s.group == g.id).all(|s| !s.member), "{bob_groups:?}");
}

/// A stranger's invitation waits until bob accepts it, then he reads the
/// group like any member.
async fn a_strangers_invitation_waits_until_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let bob = tmp.path().join("bob");
    let bob_id: hush::auth::AccountId = crate::repair::register(&server, &bob).parse().unwrap();
    let (_, eve, mut eve_mls) = raw_member(&server).await;
    let removal_key = eve.status().await.unwrap().removal_key;
    let g = eve_mls.create_group(&removal_key).unwrap();
    eve.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let packages = claim(&eve, bob_id).await;
    eve.commit(eve_mls.add(&g.id, &packages).unwrap()).await.unwrap();
    eve_mls.merge_pending(&g.id).unwrap();
    let hello = eve_mls.encrypt(&g.id, &hush::client::payload::Payload::Text("hello bob".into()).encode()).unwrap();
    eve.send(hello, None).await.unwrap();
    let id = hush::auth::text::encode(&g.id);
    tokio::task::block_in_place(|| {
        let seen = ok(hush(&bob, &["sync"]));
        assert!(seen.contains("invited you") && !seen.contains("hello bob"), "{seen}");
        assert!(ok(hush(&bob, &["invitations"])).contains(id.as_str()));
        let unknown = hush(&bob, &["invitations", "accept", "nosuchgroup"]);
        assert!(!unknown.status.success() && stderr(&unknown).contains("no invitation"), "{}", stderr(&unknown));
        let joined = ok(hush(&bob, &["invitations", "accept", &id]));
        assert!(joined.contains("you joined") && joined.contains("hello bob"), "{joined}");
        assert!(ok(hush(&bob, &["invitations"])).trim().is_empty());
        ok(hush(&bob, &["send", &id, "hi eve"]));
    });
}

/// Red team: mallory signs, with her own account key, a "revocation" of
/// a device of another account (bob's, then alice's) and sends it in the
/// group. It verifies (it is mallory's signature), but it is not the
/// device's account that revoked it: members must neither remove bob nor
/// refuse alice, in this group or in any other.
async fn a_member_cannot_revoke_another_accounts_device() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob, mallory, mut mallory_mls, mallory_account, group) = team(&server, tmp.path()).await;
    tokio::task::block_in_place(|| {
        ok(hush(&alice, &["group", "create", "other"]));
        ok(hush(&alice, &["group", "add", "other", "bob"]));
        ok(hush(&bob, &["sync"]));
    });
    let device = |home: &std::path::Path| DeviceId(Identity::load(&home.join("device.key")).unwrap().public_key());
    for victim in [device(&bob), device(&alice)] {
        let forged = DeviceRevocation::issue(&mallory_account, victim, hush::util::now_unix());
        let m = mallory_mls.encrypt(&group, &Payload::Revocation(forged.encode()).encode()).unwrap();
        mallory.send(m, None).await.expect("any member may send application data");
    }
    tokio::task::block_in_place(|| {
        let a = hush(&alice, &["sync"]);
        assert!(a.status.success(), "alice's sync failed: {}", stderr(&a));
        let b = hush(&bob, &["sync"]);
        assert!(b.status.success(), "bob's sync failed: {}", stderr(&b));
        let a = hush(&alice, &["sync"]);
        assert!(a.status.success(), "alice's sync failed: {}", stderr(&a));
        for g in ["team", "other"] {
            let members = ok(hush(&alice, &["group", "members", g]));
            assert!(members.contains("bob"), "bob was removed from {g} on mallory's word: {members}");
            ok(hush(&alice, &["send", g, "alice still sends"]));
            ok(hush(&bob, &["send", g, "bob still sends"]));
        }
        ok(hush(&bob, &["sync"]));
        ok(hush(&alice, &["sync"]));
        for g in ["team", "other"] {
            assert!(ok(hush(&bob, &["read", g])).contains("alice still sends"), "{g}");
            assert!(ok(hush(&alice, &["read", g])).contains("bob still sends"), "{g}");
        }
        let a = ok(hush(&alice, &["read", "team"]));
        assert!(a.contains("refused a revocation sent by mallory"), "{a}");
    });
}

/// Red team (a removed member who kept its old state): alice removes bob
/// and later adds him back to the same group. bob's device still holds
/// the state it was removed with; the Welcome must still bring him back.
fn a_removed_member_added_back_reads_the_group_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let alice_id = crate::repair::register(&server, &alice);
    let bob_id = crate::repair::register(&server, &bob);
    ok(hush(&alice, &["contact", "add", "bob", &bob_id]));
    ok(hush(&bob, &["contact", "add", "alice", &alice_id]));
    ok(hush(&alice, &["group", "create", "team"]));
    ok(hush(&alice, &["group", "add", "team", "bob"]));
    ok(hush(&bob, &["sync"]));
    ok(hush(&alice, &["group", "remove", "team", "bob"]));
    assert!(ok(hush(&bob, &["sync"])).contains("you were removed"));
    ok(hush(&alice, &["group", "add", "team", "bob"]));
    let b = ok(hush(&bob, &["sync"]));
    assert!(!b.contains("did not join"), "{b}");
    ok(hush(&alice, &["send", "team", "welcome back"]));
    let b = ok(hush(&bob, &["sync"]));
    assert!(b.contains("welcome back"), "{b}");
    ok(hush(&bob, &["send", "team", "glad to be back"]));
    assert!(ok(hush(&alice, &["sync"])).contains("glad to be back"));
}

crate::on_both_backends! {
    sync: [a_removed_member_added_back_reads_the_group_again],
    async: [a_psk_a_gce_or_a_foreign_add_proposal_leaves_every_group_working, a_members_removal_proposal_is_shown_with_its_author_and_committed_by_nobody_unasked, leaving_frees_the_group_quota_without_anyone_committing_and_the_operator_can_remove_one_membership, a_strangers_invitation_waits_until_accepted, a_member_cannot_revoke_another_accounts_device],
}

//! The member's own rules, without a server: what it stores, what it
//! commits, what it refuses, whatever the server relays (a hostile
//! operator hands a member exactly these bytes).

use super::adversary::HostileProposal;
use super::*;
use crate::auth::DeviceId;

const REMOVAL_KEY: [u8; 32] = [9; 32];

/// `creator`'s new group with `others` added in one commit and joined; the
/// group id.
fn group_of(creator: &mut Member, others: &mut [&mut Member]) -> Vec<u8> {
    let group = creator.create_group(&REMOVAL_KEY).unwrap().id;
    let packages: Vec<_> = others.iter().map(|m| (m.account(), m.key_packages(1).unwrap().remove(0))).collect();
    let commit = creator.add(&group, &packages).unwrap();
    creator.merge_pending(&group).unwrap();
    let welcome = commit.welcome.unwrap();
    for m in others.iter_mut() {
        assert_eq!(m.join(&welcome).unwrap(), group);
    }
    group
}

/// alice, bob and mallory in one group at the same epoch; the group id.
fn trio() -> (Member, Member, Member, Vec<u8>) {
    let (_, _, mut alice) = Member::generate().unwrap();
    let (_, _, mut bob) = Member::generate().unwrap();
    let (_, _, mut mallory) = Member::generate().unwrap();
    let group = group_of(&mut alice, &mut [&mut bob, &mut mallory]);
    (alice, bob, mallory, group)
}

/// alice's account key, her first device and a laptop of her account (not
/// in any group).
fn alice_and_laptop() -> (crate::auth::Identity, Member, Member) {
    let (account, _, alice) = Member::generate().unwrap();
    let laptop_key = crate::auth::Identity::generate().unwrap();
    let laptop = Member::new(&account, DeviceId(laptop_key.public_key())).unwrap();
    (account, alice, laptop)
}

/// The ratchet tree of `m`'s current epoch of `group`, as the server hands
/// it out beside a GroupInfo that leaves it out (a commit that adds
/// nobody).
fn tree_of(m: &Member, group: &[u8]) -> Vec<u8> {
    serialize(&m.groups.get(group).unwrap().export_ratchet_tree(), "the tree").unwrap()
}

/// `from` commits something; everyone in `to` processes it.
fn committed(from: &mut Member, to: &mut [&mut Member], group: &[u8], commit: Commit) -> Vec<Received> {
    from.merge_pending(group).unwrap();
    to.iter_mut().map(|m| m.receive(group, &commit.message).unwrap()).collect()
}

#[test]
fn proposals_hush_does_not_use_are_refused_and_not_stored_and_commits_go_on() {
    let (_, _, stranger) = Member::generate().unwrap();
    let foreign = stranger.key_packages(1).unwrap().remove(0);
    for kind in [HostileProposal::PreSharedKey, HostileProposal::GroupContextExtensions, HostileProposal::Add(foreign)]
    {
        let (mut alice, mut bob, mut mallory, group) = trio();
        let proposal = mallory.hostile_proposal(&group, &kind).unwrap();
        let got = alice.receive(&group, &proposal).unwrap();
        assert!(
            matches!(&got, Received::Refused { reason, .. } if reason.contains("hush does not use")),
            "{kind:?}: {got:?}"
        );
        assert!(!alice.should_commit_pending(&group), "{kind:?}: nothing stored, nothing to commit");
        // alice can still change the group (this failed for every later
        // commit while the proposal was stored), and bob follows.
        let commit = alice.remove(&group, &[mallory.account()]).unwrap();
        let got = committed(&mut alice, &mut [&mut bob], &group, commit);
        assert!(matches!(&got[..], [Received::Commit { .. }]), "{kind:?}: {got:?}");
        assert_eq!(alice.epoch_authenticator(&group), bob.epoch_authenticator(&group));
        assert!(!alice.members(&group).contains(&mallory.account()));
    }
}

#[test]
fn a_commit_carrying_a_proposal_type_hush_does_not_use_is_refused() {
    let (mut alice, _, mut mallory, group) = trio();
    let before = alice.epoch(&group);
    let commit = mallory.commit_with_extensions(&group).unwrap();
    let got = alice.receive(&group, &commit.message).unwrap();
    assert!(matches!(&got, Received::Refused { reason, .. } if reason.contains("external sender")), "{got:?}");
    assert_eq!(alice.epoch(&group), before, "nothing applied");
}

#[test]
fn a_members_removal_proposal_is_shown_with_its_author_and_never_committed_silently() {
    let (mut alice, mut bob, mut mallory, group) = trio();
    let proposal = mallory.propose_removal(&group, &bob.account()).unwrap();
    let got = alice.receive(&group, &proposal).unwrap();
    assert_eq!(
        got,
        Received::Proposal { sender: Some(mallory.account()), removing: Some(bob.account()), leaving: false }
    );
    // alice commits (no message can be sent while a proposal waits), and
    // her commit leaves the proposal out: only leaving and the server's
    // removals are committed unasked.
    assert!(alice.should_commit_pending(&group));
    assert!(alice.committable_removals(&group).is_empty());
    let _ = bob.receive(&group, &proposal).unwrap();
    let commit = alice.commit_pending(&group).unwrap();
    let got = committed(&mut alice, &mut [&mut bob], &group, commit);
    assert!(matches!(&got[..], [Received::Commit { removed_me: false, removed, .. }] if removed.is_empty()), "{got:?}");
    assert!(alice.members(&group).contains(&bob.account()));
}

#[test]
fn leaving_is_committed_by_the_next_member_and_named_as_leaving() {
    let (mut alice, mut bob, mut mallory, group) = trio();
    let proposal = mallory.leave(&group).unwrap();
    let got = alice.receive(&group, &proposal).unwrap();
    assert_eq!(
        got,
        Received::Proposal { sender: Some(mallory.account()), removing: Some(mallory.account()), leaving: true }
    );
    let _ = bob.receive(&group, &proposal).unwrap();
    assert!(alice.should_commit_pending(&group));
    assert_eq!(alice.committable_removals(&group), vec![Removed { account: mallory.account(), by: RemovedBy::Itself }]);
    let commit = alice.commit_pending(&group).unwrap();
    let got = committed(&mut alice, &mut [&mut bob], &group, commit.clone());
    let expected = vec![Removed { account: mallory.account(), by: RemovedBy::Itself }];
    assert!(matches!(&got[..], [Received::Commit { removed, .. }] if *removed == expected), "{got:?}");
    // mallory learns only that she was removed; not that anyone else was.
    let got = mallory.receive(&group, &commit.message).unwrap();
    assert!(matches!(&got, Received::Commit { removed_me: true, removed, .. } if *removed == expected), "{got:?}");
}

#[test]
fn a_device_its_account_revoked_that_comes_back_is_found_and_removed_by_members() {
    let (account, mut alice, mut laptop) = alice_and_laptop();
    let (_, _, mut bob) = Member::generate().unwrap();
    let group = group_of(&mut alice, &mut [&mut bob, &mut laptop]);

    // alice removes the laptop (her account revoked it); bob follows.
    alice.revoke(account.account_id(), laptop.device());
    assert_eq!(alice.revoked_in(&group), vec![laptop.device()]);
    let removal = alice.remove_devices(&group, &[laptop.device()]).unwrap();
    committed(&mut alice, &mut [&mut bob], &group, removal.clone());
    let tree = tree_of(&alice, &group);
    assert!(alice.revoked_in(&group).is_empty());

    // With the operator's help, the laptop comes back as a "new device" of
    // alice's account, which is still in the group. A member that knows
    // the revocation (bob read alice's signed statement) finds it, and its
    // next commit (made before it sends anything) takes it out again.
    bob.revoke(account.account_id(), laptop.device());
    let rejoin = laptop.join_external(&group, &removal.group_info, Some(&tree)).unwrap();
    let got = bob.receive(&group, &rejoin.message).unwrap();
    assert!(matches!(got, Received::Commit { new_device: true, .. }), "{got:?}");
    assert_eq!(bob.revoked_in(&group), vec![laptop.device()]);
    let back = bob.revoked_in(&group);
    let again = bob.remove_devices(&group, &back).unwrap();
    bob.merge_pending(&group).unwrap();
    assert!(!bob.devices(&group).contains(&laptop.device()));
    // The laptop cannot read what bob sends next.
    let after = bob.encrypt(&group, b"not for the laptop").unwrap();
    let _ = laptop.receive(&group, &again.message);
    assert!(laptop.receive(&group, &after).is_err(), "the revoked laptop read bob's message");
    // A member that never saw the revocation has nothing to remove.
    let (_, _, mut unaware) = Member::generate().unwrap();
    assert!(unaware.revoked_in(&group).is_empty());
}

#[test]
fn a_linked_devices_first_join_never_goes_back_from_the_state_its_first_device_handed_over() {
    let (_, mut alice, mut laptop) = alice_and_laptop();
    let (_, _, mut mallory) = Member::generate().unwrap();
    let group = alice.create_group(&REMOVAL_KEY).unwrap().id;
    let added = alice.add(&group, &[(mallory.account(), mallory.key_packages(1).unwrap().remove(0))]).unwrap();
    alice.merge_pending(&group).unwrap();
    mallory.join(added.welcome.as_ref().unwrap()).unwrap();
    // The state with mallory in, then alice removes her.
    let with_mallory = added.group_info;
    let removal = alice.remove(&group, &[mallory.account()]).unwrap();
    alice.merge_pending(&group).unwrap();
    let tree = tree_of(&alice, &group);
    // alice links the laptop now: the bundle carries her epoch and
    // transcript hash.
    let anchor = alice.anchor(&group).unwrap();
    let e = laptop.join_external_after(&group, &with_mallory, None, Some(&anchor), None).unwrap_err();
    assert!(matches!(e, MlsError::BeforeAnchor { .. }), "{e}");
    assert!(!laptop.has_group(&group), "nothing joined");
    // mallory's fork of the same epoch (from the state she kept) is not it
    // either.
    let mut fork = mallory.copy().unwrap();
    let forked = fork.self_update(&group).unwrap();
    fork.merge_pending(&group).unwrap();
    let forked_tree = tree_of(&fork, &group);
    let e =
        laptop.join_external_after(&group, &forked.group_info, Some(&forked_tree), Some(&anchor), None).unwrap_err();
    assert!(matches!(e, MlsError::BeforeAnchor { .. }), "{e}");
    // The state alice handed over (or a later one) is joined.
    laptop.join_external_after(&group, &removal.group_info, Some(&tree), Some(&anchor), None).unwrap();
    assert!(!laptop.members(&group).contains(&mallory.account()));
}

/// alice (first device), bob and mallory in a group, mallory removed by
/// alice; alice's laptop (same account) not linked yet. The group id and
/// alice's removal commit.
fn removed_mallory() -> (Member, Member, Member, Member, Vec<u8>, Commit) {
    let (_, mut alice, laptop) = alice_and_laptop();
    let (_, _, mut bob) = Member::generate().unwrap();
    let (_, _, mut mallory) = Member::generate().unwrap();
    let group = group_of(&mut alice, &mut [&mut bob, &mut mallory]);
    let removal = alice.remove(&group, &[mallory.account()]).unwrap();
    committed(&mut alice, &mut [&mut bob], &group, removal.clone());
    (alice, laptop, bob, mallory, group, removal)
}

/// Issue 29, the gap left in session 9: the anchor (epoch, transcript
/// hash) only stops a state older than the first device's. Removed
/// mallory takes the GroupInfo the server keeps (anyone it hands it to
/// can) and forces her way back in with an external commit; the operator
/// hands the linked laptop that state, a later epoch than alice's. The
/// walk from the state alice handed over finds no commit a member would
/// take leading there, and the laptop joins only a state the walk reaches.
#[test]
fn a_linked_devices_first_join_takes_only_a_state_its_first_devices_state_leads_to() {
    let (mut alice, mut laptop, mut bob, mut mallory, group, removal) = removed_mallory();
    let tree = tree_of(&alice, &group);
    // alice links the laptop: she hands over her state.
    let handover = alice.handover(&group).unwrap().unwrap();
    let anchor = alice.anchor(&group).unwrap();
    let forced = mallory.rejoin_unchecked(&group, &removal.group_info, Some(&tree)).unwrap();
    assert!(mallory.members(&group).contains(&mallory.account()), "mallory's fork has her in it");
    let forced_tree = tree_of(&mallory, &group);
    // The anchor alone lets the fork through: this is what the walk closes.
    let mut unchecked = laptop.copy().unwrap();
    unchecked.join_external_after(&group, &forced.group_info, Some(&forced_tree), Some(&anchor), None).unwrap();
    assert!(unchecked.members(&group).contains(&mallory.account()));
    // With the walk: the log holds mallory's commit, which moves nothing.
    let mut walk = Descent::from_handover(&group, &handover).unwrap();
    assert!(!walk.feed(&forced.message), "the walk took an outsider's external commit");
    let e = laptop
        .join_external_after(&group, &forced.group_info, Some(&forced_tree), Some(&anchor), Some(&walk))
        .unwrap_err();
    assert!(matches!(e, MlsError::UnprovenState { .. }), "{e}");
    assert!(!laptop.has_group(&group), "nothing joined");
    // The state alice handed over is joined as it is.
    let mut as_handed = laptop.copy().unwrap();
    as_handed.join_external_after(&group, &removal.group_info, Some(&tree), Some(&anchor), Some(&walk)).unwrap();
    // bob's genuine commit leads on from alice's state: the laptop joins it.
    let update = bob.self_update(&group).unwrap();
    bob.merge_pending(&group).unwrap();
    assert!(walk.feed(&update.message));
    let e =
        laptop.join_external_after(&group, &removal.group_info, Some(&tree), Some(&anchor), Some(&walk)).unwrap_err();
    assert!(matches!(e, MlsError::UnprovenState { .. }), "the state the walk left behind: {e}");
    let tree = tree_of(&bob, &group);
    laptop.join_external_after(&group, &update.group_info, Some(&tree), Some(&anchor), Some(&walk)).unwrap();
    assert!(!laptop.members(&group).contains(&mallory.account()));
    assert!(laptop.devices(&group).contains(&laptop.device()));
}

/// A proposal alice had read before she linked the laptop (bob leaving)
/// travels with her state: the commit that takes it by reference moves the
/// walk, which could not verify that commit without it.
#[test]
fn a_handover_carries_the_proposals_its_epoch_holds() {
    let (mut alice, mut laptop, mut bob, _mallory, group, _) = removed_mallory();
    let leaving = bob.leave(&group).unwrap();
    assert!(matches!(alice.receive(&group, &leaving).unwrap(), Received::Proposal { .. }));
    let handover = alice.handover(&group).unwrap().unwrap();
    assert_eq!(handover.proposals.len(), 1);
    let anchor = alice.anchor(&group).unwrap();
    assert!(alice.should_commit_pending(&group));
    let commit = alice.commit_pending(&group).unwrap();
    alice.merge_pending(&group).unwrap();
    // Without the proposal, the commit does not verify.
    let bare = Handover { info: handover.info.clone(), proposals: Vec::new() };
    let mut blind = Descent::from_handover(&group, &bare).unwrap();
    assert!(!blind.feed(&commit.message));
    let mut walk = Descent::from_handover(&group, &handover).unwrap();
    assert_eq!(walk.pending(), 1);
    assert!(walk.feed(&commit.message));
    let tree = tree_of(&alice, &group);
    laptop.join_external_after(&group, &commit.group_info, Some(&tree), Some(&anchor), Some(&walk)).unwrap();
    assert!(!laptop.members(&group).contains(&bob.account()));
    // A handover is checked: another group's state, a forged proposal.
    let other = alice.create_group(&REMOVAL_KEY).unwrap().id;
    assert!(matches!(Descent::from_handover(&other, &handover), Err(MlsError::OtherGroup)));
    let junk = Handover { info: handover.info.clone(), proposals: vec![b"{}".to_vec()] };
    assert!(matches!(Descent::from_handover(&group, &junk), Err(MlsError::Handover(_))));
    let garbage = Handover { info: vec![0; 40], proposals: Vec::new() };
    assert!(Descent::from_handover(&group, &garbage).is_err());
}

/// Red team: a revocation verifies under the key of the account that
/// signed it, which need not be the device's own account. mallory's
/// "revocation" of bob's device (or of alice's own) revokes nothing.
#[test]
fn a_revocation_signed_by_another_account_revokes_nothing() {
    let (mut alice, bob, mallory, group) = trio();
    alice.revoke(mallory.account(), bob.device());
    alice.revoke(mallory.account(), alice.device());
    assert!(alice.revoked_in(&group).is_empty());
    assert!(!alice.is_revoked(&bob.account(), &bob.device()));
    // Even the device's own account cannot make this device commit its
    // own removal (another member will).
    let own = (alice.account(), alice.device());
    alice.revoke(own.0, own.1);
    assert!(alice.revoked_in(&group).is_empty());
    // bob's own account's revocation of his device is what counts.
    alice.revoke(bob.account(), bob.device());
    assert_eq!(alice.revoked_in(&group), vec![bob.device()]);
}

/// Red team: a repair's walk must take only commits a member of each
/// epoch could have made, as a member's own `receive` would. An outsider
/// (the operator's own account, which it can register like anyone) builds
/// an external commit from a GroupInfo the server kept; the walk took it
/// (it verifies under the tree: the signer is the new leaf itself), and
/// bob rejoined the operator's fork, where the operator reads him.
#[test]
fn a_repair_walk_refuses_an_outsiders_external_commit() {
    let (mut alice, mut bob, _, group) = trio();
    let update = alice.self_update(&group).unwrap();
    alice.merge_pending(&group).unwrap();
    bob.receive(&group, &update.message).unwrap();
    let mut descent = bob.descent(&group).unwrap().unwrap();
    // The operator's device, certified by the operator's own account.
    let (_, _, mut operator) = Member::generate().unwrap();
    let intrusion = operator.rejoin_unchecked(&group, &update.group_info, Some(&tree_of(&alice, &group))).unwrap();
    // bob's own rules refuse it as a message of the group...
    let mut copy = bob.copy().unwrap();
    let got = copy.receive(&group, &intrusion.message).unwrap();
    assert!(matches!(got, Received::Refused { .. }), "{got:?}");
    // ...and so must the walk, and the rejoin it would prove.
    descent.feed(&intrusion.message);
    let rejoined = bob.resync(&group, &intrusion.group_info, None, Some(&descent));
    assert!(rejoined.is_err(), "bob rejoined a fork where the operator's account is a member");
    assert!(!bob.members(&group).contains(&operator.account()));
}

/// Red team: a hostile operator holds the removal key, so it can sign as
/// many removal proposals of any epoch as it likes; an honest server keeps
/// at most `MAX_PENDING_PROPOSALS` waiting per epoch. Each one a member or
/// a repair's walk stores costs more than the last (openmls rewrites the
/// queue: 1,000 took half a minute in a debug build, a 4 MiB page holds
/// some 30,000), so a flood in the walk's epoch pinned the client's CPU for
/// hours. Neither may store more than an honest server would let wait.
#[test]
fn a_flood_of_the_servers_removal_proposals_is_bounded() {
    use crate::limits::MAX_PENDING_PROPOSALS;
    let removal = crate::auth::Identity::generate().unwrap();
    let (_, _, mut alice) = Member::generate().unwrap();
    alice.set_removal_key(removal.public_key());
    let group = alice.create_group(&removal.public_key()).unwrap().id;
    let mut descent = alice.descent(&group).unwrap().unwrap();
    let flood: Vec<Vec<u8>> = (0..MAX_PENDING_PROPOSALS as u32 + 8)
        .map(|i| {
            let leaf = LeafNodeIndex::new(i + 1);
            crate::mls::removal_proposal(&descent.public, leaf, &removal).unwrap().unwrap()
        })
        .collect();
    for m in &flood {
        descent.feed(m);
    }
    assert!(descent.pending() <= MAX_PENDING_PROPOSALS, "the walk stored {} proposals", descent.pending());
    let mut refused = 0;
    for m in &flood {
        if matches!(alice.receive(&group, m), Ok(Received::Refused { .. }) | Err(_)) {
            refused += 1;
        }
    }
    let stored = alice.group_mut(&group).unwrap().pending_proposals().count();
    assert!(stored <= MAX_PENDING_PROPOSALS && refused >= 8, "alice stored {stored} proposals");
}

/// The same for a member's proposals (with a server that takes more than
/// an honest one would): no more are stored than the server would keep,
/// and those already stored still go in the next commit.
#[test]
fn a_flood_of_a_members_proposals_is_bounded() {
    use crate::limits::MAX_PENDING_PROPOSALS;
    let (mut alice, mut bob, mut mallory, group) = trio();
    let mut descent = bob.descent(&group).unwrap().unwrap();
    let mut refused = 0;
    for _ in 0..MAX_PENDING_PROPOSALS + 8 {
        let p = mallory.update_proposal(&group, None).unwrap();
        descent.feed(&p);
        if matches!(alice.receive(&group, &p).unwrap(), Received::Refused { .. }) {
            refused += 1;
        }
    }
    assert!(descent.pending() <= MAX_PENDING_PROPOSALS, "the walk stored {}", descent.pending());
    assert_eq!(refused, 8);
    let commit = alice.commit_pending(&group).unwrap();
    alice.merge_pending(&group).unwrap();
    assert!(!matches!(bob.receive(&group, &commit.message), Ok(Received::Refused { .. })));
}

#[test]
fn a_member_sets_the_timer_every_member_sees_it_and_new_members_inherit_it() {
    let (mut alice, mut bob, mut mallory, group) = trio();
    for m in [&mut alice, &mut bob, &mut mallory] {
        m.set_removal_key(REMOVAL_KEY);
    }
    assert_eq!(alice.settings(&group).unwrap(), GroupSettings::default(), "a new group has no timer");
    let two = GroupSettings { disappear_secs: 2 };
    let commit = alice.set_settings(&group, two).unwrap();
    let got = committed(&mut alice, &mut [&mut bob, &mut mallory], &group, commit);
    for r in &got {
        assert!(matches!(r, Received::Commit { settings: Some(s), .. } if *s == two), "{r:?}");
    }
    for m in [&mut alice, &mut bob, &mut mallory] {
        assert_eq!(m.settings(&group).unwrap(), two);
    }
    // A member added later has it from its Welcome.
    let (_, _, mut carol) = Member::generate().unwrap();
    let package = carol.key_packages(1).unwrap().remove(0);
    let commit = bob.add(&group, &[(carol.account(), package)]).unwrap();
    let welcome = commit.welcome.clone().unwrap();
    let got = committed(&mut bob, &mut [&mut alice, &mut mallory], &group, commit);
    assert!(got.iter().all(|r| matches!(r, Received::Commit { settings: None, .. })), "{got:?}");
    carol.join(&welcome).unwrap();
    assert_eq!(carol.settings(&group).unwrap(), two);
    // Any member turns it off again; everyone follows.
    carol.set_removal_key(REMOVAL_KEY);
    let off = carol.set_settings(&group, GroupSettings::default()).unwrap();
    let got = committed(&mut carol, &mut [&mut alice, &mut bob, &mut mallory], &group, off);
    assert!(got.iter().all(|r| matches!(r, Received::Commit { settings: Some(s), .. } if s.disappear_secs == 0)));
    assert_eq!(alice.epoch_authenticator(&group), carol.epoch_authenticator(&group));
}

#[test]
fn settings_codec_refuses_what_hush_does_not_write() {
    let s = GroupSettings { disappear_secs: 86_400 };
    assert_eq!(GroupSettings::decode(&s.encode()), Ok(s));
    for bad in
        [&[][..], &[1, 0, 0, 0][..], &[2, 0, 0, 0, 1][..], &[1, 0, 0, 0, 1, 0][..], &[1, 0xff, 0xff, 0xff, 0xff][..]]
    {
        assert!(GroupSettings::decode(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_timer_waits_for_every_members_leaf_to_read_it() {
    let (_, _, mut alice) = Member::generate().unwrap();
    let (_, _, mut bob) = Member::generate().unwrap();
    alice.set_removal_key(REMOVAL_KEY);
    let group = alice.create_group(&REMOVAL_KEY).unwrap().id;
    let legacy = bob.legacy_key_packages(1).unwrap().remove(0);
    let commit = alice.add(&group, &[(bob.account(), legacy)]).unwrap();
    alice.merge_pending(&group).unwrap();
    bob.join(&commit.welcome.unwrap()).unwrap();
    assert!(bob.leaf_predates_settings(&group));
    let two = GroupSettings { disappear_secs: 2 };
    let e = alice.set_settings(&group, two).unwrap_err();
    assert!(matches!(&e, MlsError::SettingsUnsupported(who) if *who == vec![bob.account()]), "{e}");
    // bob's next commit advertises them; then the timer can be set.
    let update = bob.self_update(&group).unwrap();
    bob.merge_pending(&group).unwrap();
    alice.receive(&group, &update.message).unwrap();
    assert!(!bob.leaf_predates_settings(&group));
    let commit = alice.set_settings(&group, two).unwrap();
    alice.merge_pending(&group).unwrap();
    assert!(
        matches!(bob.receive(&group, &commit.message).unwrap(), Received::Commit { settings: Some(s), .. } if s == two)
    );
}

/// A post-quantum group (issue 35): three members exchange messages, one
/// is removed, a linked device joins by an external commit, and a classic
/// KeyPackage is refused for it (and a post-quantum one for a classic
/// group). Its commits carry X-Wing encapsulations: larger than classic.
#[test]
fn a_post_quantum_group_does_everything_a_classic_one_does() {
    let (account, mut alice, mut laptop) = alice_and_laptop();
    let (_, _, mut bob) = Member::generate().unwrap();
    let (_, _, mut carol) = Member::generate().unwrap();
    alice.set_removal_key(REMOVAL_KEY);
    let group = alice.create_group_of(&REMOVAL_KEY, Suite::Pq).unwrap().id;
    assert_eq!(alice.suite_of(&group), Some(Ok(Suite::Pq)));
    let classic = bob.key_packages(1).unwrap().remove(0);
    let Err(MlsError::KeyPackage { why: Unfit::OtherSuite(_), .. }) = alice.add(&group, &[(bob.account(), classic)])
    else {
        panic!("a classic KeyPackage was taken into a post-quantum group")
    };
    let packages = vec![
        (bob.account(), bob.key_packages_of(Suite::Pq, 1).unwrap().remove(0)),
        (carol.account(), carol.key_packages_of(Suite::Pq, 1).unwrap().remove(0)),
    ];
    let added = alice.add(&group, &packages).unwrap();
    alice.merge_pending(&group).unwrap();
    for m in [&mut bob, &mut carol] {
        assert_eq!(m.join(added.welcome.as_ref().unwrap()).unwrap(), group);
        assert_eq!(m.suite_of(&group), Some(Ok(Suite::Pq)));
    }
    let hello = bob.encrypt(&group, b"hello, quantum-safe").unwrap();
    for m in [&mut alice, &mut carol] {
        assert!(
            matches!(m.receive(&group, &hello).unwrap(), Received::Application { data, .. } if data == b"hello, quantum-safe")
        );
    }
    let removal = alice.remove(&group, &[carol.account()]).unwrap();
    alice.merge_pending(&group).unwrap();
    bob.receive(&group, &removal.message).unwrap();
    // alice's laptop joins from the GroupInfo the removal carried.
    let _ = account;
    let joined = laptop.join_external(&group, &removal.group_info, Some(&tree_of(&alice, &group))).unwrap();
    for m in [&mut alice, &mut bob] {
        m.receive(&group, &joined.message).unwrap();
    }
    laptop.merge_pending(&group).unwrap();
    let after = laptop.encrypt(&group, b"from the laptop").unwrap();
    assert!(matches!(bob.receive(&group, &after).unwrap(), Received::Application { .. }));
    // The other way round: a post-quantum package for a classic group.
    let classic_group = alice.create_group(&REMOVAL_KEY).unwrap().id;
    let pq = bob.key_packages_of(Suite::Pq, 1).unwrap().remove(0);
    assert!(alice.add(&classic_group, &[(bob.account(), pq)]).is_err());
}

#[test]
fn a_group_info_of_another_suite_is_no_state_of_the_group() {
    // Red team (issue 35): a server downgrading a post-quantum group by
    // handing its member a classic GroupInfo under the same id.
    let (_, _, mut alice) = Member::generate().unwrap();
    let (_, _, mut mallory) = Member::generate().unwrap();
    let group = alice.create_group_of(&REMOVAL_KEY, Suite::Pq).unwrap().id;
    let downgraded = mallory.create_group_with_id(&REMOVAL_KEY, &group).unwrap();
    let tree = Some(downgraded.ratchet_tree.as_slice());
    for result in [
        alice.resync(&group, &downgraded.group_info, tree, None),
        alice.join_external(&group, &downgraded.group_info, tree),
    ] {
        assert!(matches!(result, Err(MlsError::OtherSuite { ours: Suite::Pq, offered: 0x0001 })), "{result:?}");
    }
    assert_eq!(alice.suite_of(&group), Some(Ok(Suite::Pq)), "the state was kept");
}

/// A commit that adds nobody uploads its GroupInfo without the ratchet
/// tree (the server hands out its own tree with it): in a large group the
/// tree is most of a commit's bytes. A commit that adds somebody keeps it,
/// since its Welcome shares the GroupInfo's extensions and a joiner by
/// Welcome has no other way to the tree. A member who missed the commit
/// rejoins from the GroupInfo and the tree handed out beside it (and its
/// external commit leaves the tree out in turn).
#[test]
fn only_a_commit_that_adds_carries_the_tree_in_its_group_info() {
    let (mut alice, mut bob, mut mallory, group) = trio();
    let carries_tree =
        |c: &Commit| crate::mls::parse_group_info(&c.group_info).unwrap().extensions().ratchet_tree().is_some();
    let update = alice.self_update(&group).unwrap();
    assert!(!carries_tree(&update), "a self-update's GroupInfo leaves the tree out");
    committed(&mut alice, &mut [&mut mallory], &group, update.clone());
    let tree = serialize(&alice.groups.get(&group).unwrap().export_ratchet_tree(), "tree").unwrap();
    let rejoin = bob.resync(&group, &update.group_info, Some(&tree), None).unwrap();
    assert!(!carries_tree(&rejoin), "nor does a rejoin's (an external commit has no Welcome)");
    committed(&mut bob, &mut [&mut alice, &mut mallory], &group, rejoin);
    let (_, _, mut dave) = Member::generate().unwrap();
    let add = alice.add(&group, &[(dave.account(), dave.key_packages(1).unwrap().remove(0))]).unwrap();
    assert!(carries_tree(&add), "a commit with a Welcome keeps the tree");
    alice.merge_pending(&group).unwrap();
    assert_eq!(dave.join(add.welcome.as_ref().unwrap()).unwrap(), group);
    let removal = alice.remove(&group, &[mallory.account()]).unwrap();
    assert!(!carries_tree(&removal));
}

//! The member's own rules, without a server: what it stores, what it
//! commits, what it refuses, whatever the server relays (a hostile
//! operator hands a member exactly these bytes).

use super::adversary::HostileProposal;
use super::*;

const REMOVAL_KEY: [u8; 32] = [9; 32];

/// alice, bob and mallory in one group at the same epoch; the group id.
fn trio() -> (Member, Member, Member, Vec<u8>) {
    let (_, _, mut alice) = Member::generate().unwrap();
    let (_, _, mut bob) = Member::generate().unwrap();
    let (_, _, mut mallory) = Member::generate().unwrap();
    let group = alice.create_group(&REMOVAL_KEY).unwrap().id;
    let packages = vec![
        (bob.account(), bob.key_packages(1).unwrap().remove(0)),
        (mallory.account(), mallory.key_packages(1).unwrap().remove(0)),
    ];
    let commit = alice.add(&group, &packages).unwrap();
    alice.merge_pending(&group).unwrap();
    let welcome = commit.welcome.unwrap();
    assert_eq!(bob.join(&welcome).unwrap(), group);
    assert_eq!(mallory.join(&welcome).unwrap(), group);
    (alice, bob, mallory, group)
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
    assert!(matches!(&got, Received::Refused { reason, .. } if reason.contains("GroupContextExtensions")), "{got:?}");
    assert_eq!(alice.epoch(&group), before, "nothing applied");
}

#[test]
fn a_members_removal_proposal_is_shown_with_its_author_and_never_committed_silently() {
    let (mut alice, mut bob, mut mallory, group) = trio();
    let proposal = mallory.propose_removal(&group, &bob.account()).unwrap();
    let got = alice.receive(&group, &proposal).unwrap();
    assert_eq!(
        got,
        Received::Proposal { sender: Some(mallory.account()), removing: Some(bob.account()), own_leaf: false }
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
        Received::Proposal { sender: Some(mallory.account()), removing: Some(mallory.account()), own_leaf: true }
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

//! Stateful fuzzing of the client against a hostile server and a hostile
//! member (issue 29): a real client member (alice) reads its groups'
//! logs, rejoins, commits and sends exactly as `hush` does (the same
//! `GroupLog`, `Member::descent` walk and `Member::resync` check, a state
//! rolled back when the server refuses a rejoin), while a model server
//! relays a true log an honest member (bob) follows, and may also show
//! alice anything: proposals of every type, commits nobody can process,
//! GroupInfos of any epoch or of a fork, messages whose framing claims any
//! epoch, external commits from a removed member. mallory is a member that
//! keeps the state of every epoch she is removed from and forks it.
//!
//! Invariants, checked after every step:
//!
//! * alice's epoch in a group never goes back;
//! * alice is never on another history: the authenticator of every epoch
//!   she holds is the one the true log has for that epoch (so a removed
//!   member never becomes a member again without a commit of the true log,
//!   and no stale or forked GroupInfo is ever joined);
//! * one group's failure never touches the other group's state;
//! * alice's state of a group is never gone while she is a member;
//! * every commit alice reads is attributed to the member who made it.
#![no_main]
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arbitrary::Arbitrary;
use hush::auth::AccountId;
use hush::client::log::{GroupLog, Read};
use hush::client::mls::adversary::HostileProposal;
use hush::client::mls::{Commit, Member, Received};
use libfuzzer_sys::fuzz_target;

const REMOVAL_KEY: [u8; 32] = [7; 32];
/// Steps per input, at most (each is real MLS work).
const MAX_STEPS: usize = 24;

/// What alice's repairs came to, over a run: tried, refused (state kept),
/// landed. Printed every 500 inputs when `CLIENT_STATE_STATS` is set, to
/// see that the fuzzer reaches both outcomes.
static INPUTS: AtomicU64 = AtomicU64::new(0);
static REPAIRS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    BobUpdate {
        second: bool,
    },
    BobText {
        second: bool,
    },
    BobRemoveMallory,
    BobAddMallory,
    MalloryText,
    MalloryUpdate,
    /// A commit the server cannot tell from a good one and nobody can
    /// process.
    MalloryBroken,
    /// A proposal of every kind (0 PSK, 1 GCE, 2 foreign Add, 3 remove
    /// bob, 4 remove alice, 5 leave), relayed to alice whatever the server
    /// said.
    MalloryProposal {
        kind: u8,
    },
    /// A commit carrying GroupContextExtensions, relayed to alice.
    MalloryExtensionsCommit,
    /// mallory commits alice's removal (an honest, accepted commit).
    MalloryRemovesAlice,
    /// mallory moves her kept state on by a commit nobody sees, and
    /// encrypts a message in it (a later epoch's framing).
    MalloryFork,
    /// The server shows alice one of mallory's fork messages.
    InjectForkMessage {
        index: u8,
    },
    /// mallory, with a kept state, sends an external commit rejoining
    /// from a GroupInfo of any epoch; the server relays it to alice.
    RemovedRejoin {
        index: u8,
    },
    /// The server says alice is behind and offers this GroupInfo (of every
    /// one it ever saw, forks included) at her next sync.
    OfferGroupInfo {
        index: u8,
    },
    AliceSync {
        second: bool,
    },
    AliceSend {
        second: bool,
    },
    /// bob (or mallory) sets the group's disappearing timer: an inline
    /// GroupContextExtensions commit alice, the walk and repair must take.
    SetTimer {
        mallory: bool,
        secs: u8,
    },
}

/// One group as the model server keeps it.
struct Group {
    id: Vec<u8>,
    /// The true log: (committer or sender, bytes).
    log: Vec<(AccountId, Vec<u8>)>,
    /// What the server shows alice: the true log's messages (by their
    /// index) and what it inserts for her alone.
    alice_view: Vec<(AccountId, Vec<u8>)>,
    epoch: u64,
    group_info: Vec<u8>,
    /// Every GroupInfo anyone made for this group, forks included.
    infos: Vec<Vec<u8>>,
    /// The authenticator of each epoch of the true log.
    truth: HashMap<u64, Vec<u8>>,
    /// What the server offers alice at her next sync.
    offer: Option<Vec<u8>>,
}

struct World {
    alice: Member,
    bob: Member,
    mallory: Member,
    /// mallory's kept states (of epochs she was removed from).
    kept: Vec<Member>,
    fork_messages: Vec<Vec<u8>>,
    groups: [Group; 2],
    /// Readers: alice's and bob's positions in their views (alice reads
    /// `alice_view`, bob and mallory the true log).
    alice_log: [GroupLog; 2],
    bob_log: [GroupLog; 2],
    mallory_log: GroupLog,
    alice_in: [bool; 2],
    mallory_in: bool,
    /// alice's epoch per group, last seen.
    alice_epoch: [u64; 2],
}

fn fresh() -> Member {
    let (_, _, mut m) = Member::generate().unwrap();
    m.set_removal_key(REMOVAL_KEY);
    m
}

impl World {
    fn new() -> Self {
        let (mut alice, mut bob, mut mallory) = (fresh(), fresh(), fresh());
        let mut make = |with_mallory: bool| -> (Group, Vec<u8>) {
            let new = alice.create_group(&REMOVAL_KEY).unwrap();
            let mut packages = vec![(bob.account(), bob.key_packages(1).unwrap().remove(0))];
            if with_mallory {
                packages.push((mallory.account(), mallory.key_packages(1).unwrap().remove(0)));
            }
            let commit = alice.add(&new.id, &packages).unwrap();
            alice.merge_pending(&new.id).unwrap();
            let welcome = commit.welcome.clone().unwrap();
            let mut truth = HashMap::new();
            truth.insert(alice.epoch(&new.id).unwrap(), alice.epoch_authenticator(&new.id).unwrap());
            let g = Group {
                id: new.id.clone(),
                log: vec![(alice.account(), commit.message.clone())],
                alice_view: vec![(alice.account(), commit.message)],
                epoch: alice.epoch(&new.id).unwrap(),
                group_info: commit.group_info.clone(),
                infos: vec![new.group_info, commit.group_info],
                truth,
                offer: None,
            };
            (g, welcome)
        };
        let (first, w1) = make(true);
        let (second, w2) = make(false);
        bob.join(&w1).unwrap();
        bob.join(&w2).unwrap();
        mallory.join(&w1).unwrap();
        let epoch = [first.epoch, second.epoch];
        let mut alice_log = [GroupLog::new(&first.id, 0), GroupLog::new(&second.id, 0)];
        alice_log[0].sent(1);
        alice_log[1].sent(1);
        let bob_log = [GroupLog::new(&first.id, 1), GroupLog::new(&second.id, 1)];
        let mallory_log = GroupLog::new(&first.id, 1);
        Self {
            alice,
            bob,
            mallory,
            kept: Vec::new(),
            fork_messages: Vec::new(),
            groups: [first, second],
            alice_log,
            bob_log,
            mallory_log,
            alice_in: [true, true],
            mallory_in: true,
            alice_epoch: epoch,
        }
    }

    /// The server takes `bytes` from `who` into group `g` if it is of the
    /// group's epoch (first commit wins); returns whether it did. A commit
    /// moves the epoch and its GroupInfo becomes the one served.
    fn post(&mut self, g: usize, who: AccountId, bytes: &[u8], commit: Option<&Commit>) -> Option<u64> {
        let framed = hush::mls::frame(bytes).ok()?;
        let group = &mut self.groups[g];
        if framed.epoch != group.epoch {
            return None;
        }
        group.log.push((who, bytes.to_vec()));
        group.alice_view.push((who, bytes.to_vec()));
        if let Some(c) = commit {
            group.epoch += 1;
            group.group_info = c.group_info.clone();
            group.infos.push(c.group_info.clone());
        }
        Some(group.log.len() as u64)
    }

    /// Records the authenticator `m` holds for group `g` as the truth of
    /// its epoch (or checks it against the truth already known).
    fn witness(truth: &mut HashMap<u64, Vec<u8>>, m: &mut Member, id: &[u8]) {
        let (Some(epoch), Some(auth)) = (m.epoch(id), m.epoch_authenticator(id)) else { return };
        let known = truth.entry(epoch).or_insert_with(|| auth.clone());
        assert_eq!(*known, auth, "two states for one epoch of the true log");
    }

    /// An honest member's commit (bob's or mallory's), merged if accepted.
    fn honest_commit(&mut self, g: usize, who: usize, build: impl FnOnce(&mut Member, &[u8]) -> Option<Commit>) {
        let id = self.groups[g].id.clone();
        self.catch_up(g, who);
        let m = if who == 0 { &mut self.bob } else { &mut self.mallory };
        let Some(commit) = build(m, &id) else { return };
        let account = m.account();
        match self.post(g, account, &commit.message.clone(), Some(&commit)) {
            Some(seq) => {
                let m = if who == 0 { &mut self.bob } else { &mut self.mallory };
                m.merge_pending(&id).unwrap();
                Self::witness(&mut self.groups[g].truth, m, &id);
                if let Some(w) = &commit.welcome {
                    // Only mallory is ever added again.
                    self.mallory.forget(&id);
                    if self.mallory.join(w).is_ok() {
                        self.mallory_in = true;
                        self.mallory_log = GroupLog::new(&id, seq);
                    }
                }
                if who == 0 {
                    self.bob_log[g].sent(seq);
                } else {
                    self.mallory_log.sent(seq);
                }
            }
            None => {
                let m = if who == 0 { &mut self.bob } else { &mut self.mallory };
                m.discard_pending(&id).unwrap();
            }
        }
    }

    /// bob (0) or mallory (1) reads the true log of group `g`; bob
    /// repairs like alice when stuck.
    fn catch_up(&mut self, g: usize, who: usize) {
        if who == 1 && (g != 0 || !self.mallory_in) {
            return;
        }
        let id = self.groups[g].id.clone();
        loop {
            let log = if who == 0 { &mut self.bob_log[g] } else { &mut self.mallory_log };
            let m = if who == 0 { &mut self.bob } else { &mut self.mallory };
            let entries: Vec<(u64, Vec<u8>)> = self.groups[g]
                .log
                .iter()
                .enumerate()
                .map(|(i, (_, b))| (i as u64 + 1, b.clone()))
                .filter(|(s, _)| *s > log.cursor())
                .collect();
            let mut stuck_at = None;
            for (seq, bytes) in &entries {
                let read = log.read(m, *seq, bytes);
                if let Read::Received { received: Received::Commit { removed_me: true, .. }, .. } = read {
                    if who == 1 {
                        self.mallory_in = false;
                    }
                    return;
                }
                if read.stuck() {
                    stuck_at = Some(*seq);
                    break;
                }
            }
            if who == 0 {
                Self::witness(&mut self.groups[g].truth, &mut self.bob, &id);
            }
            let Some(seq) = stuck_at else { return };
            if who == 1 {
                // mallory does not repair: she is out of step for good.
                self.mallory_in = false;
                return;
            }
            // bob repairs from the true log and the served GroupInfo.
            let info = self.groups[g].group_info.clone();
            let truth: Vec<(u64, Vec<u8>)> =
                self.groups[g].log.iter().enumerate().map(|(i, (_, b))| (i as u64 + 1, b.clone())).collect();
            let Some(commit) = rejoin(&mut self.bob, &id, &truth, seq - 1, &info) else { return };
            let bob = self.bob.account();
            match self.post(g, bob, &commit.message.clone(), Some(&commit)) {
                Some(at) => {
                    self.bob_log[g].skip_to(at);
                    Self::witness(&mut self.groups[g].truth, &mut self.bob, &id);
                }
                None => return,
            }
        }
    }

    /// alice syncs group `g` as `hush sync` does.
    fn alice_sync(&mut self, g: usize) {
        if !self.alice_in[g] {
            return;
        }
        let id = self.groups[g].id.clone();
        let view: Vec<(u64, AccountId, Vec<u8>)> =
            self.groups[g].alice_view.iter().enumerate().map(|(i, (w, b))| (i as u64 + 1, *w, b.clone())).collect();
        let mut repair_from = None;
        let cursor = self.alice_log[g].cursor();
        for (seq, who, bytes) in view.iter().filter(|(s, _, _)| *s > cursor) {
            let read = self.alice_log[g].read(&mut self.alice, *seq, bytes);
            match &read {
                Read::Received { received: Received::Commit { sender, removed_me, .. }, .. } => {
                    assert_eq!(*sender, Some(*who), "a commit attributed to someone else");
                    if *removed_me {
                        self.alice_in[g] = false;
                        return;
                    }
                }
                Read::Failed { stuck: true, .. } => {
                    repair_from = Some(*seq);
                    break;
                }
                _ => {}
            }
        }
        // The server's claim that alice is behind, with what it offers.
        let offer = self.groups[g].offer.take();
        let (info, from) = match (repair_from, offer) {
            (Some(seq), offer) => (offer.unwrap_or_else(|| self.groups[g].group_info.clone()), seq - 1),
            (None, Some(offer)) => (offer, self.alice_log[g].cursor()),
            (None, None) => return,
        };
        let visible: Vec<(u64, Vec<u8>)> = view.iter().map(|(s, _, b)| (*s, b.clone())).collect();
        REPAIRS[0].fetch_add(1, Relaxed);
        // A rejoin the server refuses leaves the state as it was (the
        // state file's transaction is rolled back).
        let backup = self.alice.copy().unwrap();
        let Some(commit) = rejoin(&mut self.alice, &id, &visible, from, &info) else {
            REPAIRS[1].fetch_add(1, Relaxed);
            self.alice = backup;
            return;
        };
        let alice = self.alice.account();
        match self.post(g, alice, &commit.message.clone(), Some(&commit)) {
            Some(_) => {
                REPAIRS[2].fetch_add(1, Relaxed);
                let at = self.groups[g].alice_view.len() as u64;
                self.alice_log[g].skip_to(at);
            }
            None => self.alice = backup,
        }
    }

    fn alice_send(&mut self, g: usize) {
        if !self.alice_in[g] {
            return;
        }
        let id = self.groups[g].id.clone();
        let alice = self.alice.account();
        if self.alice.should_commit_pending(&id) {
            let Ok(commit) = self.alice.commit_pending(&id) else { return };
            match self.post(g, alice, &commit.message.clone(), Some(&commit)) {
                Some(_) => {
                    self.alice.merge_pending(&id).unwrap();
                    let at = self.groups[g].alice_view.len() as u64;
                    self.alice_log[g].sent(at);
                }
                None => {
                    self.alice.discard_pending(&id).unwrap();
                    return;
                }
            }
        }
        let Ok(m) = self.alice.encrypt(&id, b"hello") else { return };
        if self.post(g, alice, &m, None).is_some() {
            let at = self.groups[g].alice_view.len() as u64;
            self.alice_log[g].sent(at);
        }
    }

    /// Shows alice (only) `bytes` in group 0, as from `who`.
    fn inject(&mut self, who: AccountId, bytes: Vec<u8>) {
        self.groups[0].alice_view.push((who, bytes));
    }

    fn step(&mut self, op: Op) {
        let mallory = self.mallory.account();
        match op {
            Op::BobUpdate { second } => self.honest_commit(usize::from(second), 0, |m, g| m.self_update(g).ok()),
            Op::BobText { second } => {
                let g = usize::from(second);
                self.catch_up(g, 0);
                let id = self.groups[g].id.clone();
                let bob = self.bob.account();
                if let Ok(m) = self.bob.encrypt(&id, b"from bob") {
                    if let Some(seq) = self.post(g, bob, &m, None) {
                        self.bob_log[g].sent(seq);
                    }
                }
            }
            Op::BobRemoveMallory => {
                if self.mallory_in {
                    if let Ok(copy) = self.mallory.copy() {
                        self.kept.push(copy);
                    }
                }
                self.honest_commit(0, 0, |m, g| m.remove(g, &[mallory]).ok());
            }
            Op::BobAddMallory => {
                if self.mallory_in {
                    return;
                }
                let package = self.mallory.key_packages(1).unwrap().remove(0);
                self.honest_commit(0, 0, |m, g| m.add(g, &[(mallory, package)]).ok());
            }
            Op::MalloryText => {
                self.catch_up(0, 1);
                let id = self.groups[0].id.clone();
                if let Ok(m) = self.mallory.encrypt(&id, b"from mallory") {
                    if let Some(seq) = self.post(0, mallory, &m, None) {
                        self.mallory_log.sent(seq);
                    }
                }
            }
            Op::MalloryUpdate => {
                if self.mallory_in {
                    self.honest_commit(0, 1, |m, g| m.self_update(g).ok());
                }
            }
            Op::MalloryRemovesAlice => {
                if self.mallory_in {
                    let alice = self.alice.account();
                    self.honest_commit(0, 1, |m, g| m.remove(g, &[alice]).ok());
                }
            }
            Op::MalloryBroken => {
                if !self.mallory_in {
                    return;
                }
                self.catch_up(0, 1);
                let id = self.groups[0].id.clone();
                let Ok(commit) = self.mallory.garbage_path_update(&id) else { return };
                if let Some(seq) = self.post(0, mallory, &commit.message.clone(), Some(&commit)) {
                    self.mallory.merge_pending(&id).unwrap();
                    Self::witness(&mut self.groups[0].truth, &mut self.mallory, &id);
                    self.mallory_log.sent(seq);
                } else {
                    self.mallory.discard_pending(&id).unwrap();
                }
            }
            Op::MalloryProposal { kind } => {
                if !self.mallory_in {
                    return;
                }
                self.catch_up(0, 1);
                let id = self.groups[0].id.clone();
                let made = match kind % 6 {
                    0 => self.mallory.hostile_proposal(&id, &HostileProposal::PreSharedKey),
                    1 => self.mallory.hostile_proposal(&id, &HostileProposal::GroupContextExtensions),
                    2 => {
                        let package = fresh().key_packages(1).unwrap().remove(0);
                        self.mallory.hostile_proposal(&id, &HostileProposal::Add(package))
                    }
                    3 => self.mallory.propose_removal(&id, &self.bob.account()),
                    4 => self.mallory.propose_removal(&id, &self.alice.account()),
                    _ => self.mallory.leave(&id),
                };
                // mallory's own store keeps it; her next commits are hers
                // to break. The server relays it to alice only.
                if let Ok(bytes) = made {
                    self.inject(mallory, bytes);
                }
            }
            Op::MalloryExtensionsCommit => {
                if !self.mallory_in {
                    return;
                }
                self.catch_up(0, 1);
                let id = self.groups[0].id.clone();
                if let Ok(commit) = self.mallory.commit_with_extensions(&id) {
                    self.inject(mallory, commit.message);
                    let _ = self.mallory.discard_pending(&id);
                }
            }
            Op::MalloryFork => {
                let Some(kept) = self.kept.last_mut() else { return };
                let id = self.groups[0].id.clone();
                if let Ok(commit) = kept.self_update(&id) {
                    if kept.merge_pending(&id).is_ok() {
                        self.groups[0].infos.push(commit.group_info);
                        if let Ok(m) = kept.encrypt(&id, b"from the fork") {
                            self.fork_messages.push(m);
                        }
                    }
                }
            }
            Op::InjectForkMessage { index } => {
                if let Some(m) = pick(&self.fork_messages, index).cloned() {
                    self.inject(mallory, m);
                }
            }
            Op::RemovedRejoin { index } => {
                let Some(info) = pick(&self.groups[0].infos, index).cloned() else { return };
                let id = self.groups[0].id.clone();
                let Some(kept) = self.kept.last_mut() else { return };
                if let Ok(commit) = kept.rejoin_unchecked(&id, &info, None) {
                    self.inject(mallory, commit.message);
                }
            }
            Op::OfferGroupInfo { index } => {
                let info = pick(&self.groups[0].infos, index).cloned();
                self.groups[0].offer = info;
            }
            Op::SetTimer { mallory: by_mallory, secs } => {
                if by_mallory && !self.mallory_in {
                    return;
                }
                let settings = hush::mls::GroupSettings { disappear_secs: u32::from(secs) };
                self.honest_commit(0, usize::from(by_mallory), |m, g| m.set_settings(g, settings).ok());
            }
            Op::AliceSync { second } => self.alice_sync(usize::from(second)),
            Op::AliceSend { second } => self.alice_send(usize::from(second)),
        }
    }

    /// The invariants on alice, after every step.
    fn check(&mut self, touched_second: bool, second_before: Option<Vec<u8>>) {
        for g in 0..2 {
            let id = self.groups[g].id.clone();
            if !self.alice_in[g] {
                continue;
            }
            assert!(self.alice.has_group(&id), "alice's state of a group she is in is gone");
            let epoch = self.alice.epoch(&id).unwrap();
            assert!(epoch >= self.alice_epoch[g], "alice went back from epoch {} to {epoch}", self.alice_epoch[g]);
            self.alice_epoch[g] = epoch;
            let auth = self.alice.epoch_authenticator(&id).unwrap();
            match self.groups[g].truth.get(&epoch) {
                Some(truth) => assert_eq!(*truth, auth, "alice is on another history at epoch {epoch}"),
                None => {
                    // Only her own accepted commit or rejoin makes an epoch
                    // nobody witnessed yet: the server's latest.
                    assert_eq!(epoch, self.groups[g].epoch, "alice is at an epoch the true log never had");
                    self.groups[g].truth.insert(epoch, auth);
                }
            }
        }
        if !touched_second && self.alice_in[1] {
            let now = self.alice.epoch_authenticator(&self.groups[1].id.clone());
            assert_eq!(now, second_before, "a step in the first group changed the second");
        }
    }
}

fn pick<T>(items: &[T], index: u8) -> Option<&T> {
    if items.is_empty() {
        return None;
    }
    items.get(usize::from(index) % items.len())
}

/// What `hush` does to rejoin (`App::repair`): walk the visible log from
/// `from` with a descent of its own state up to the offered epoch, then
/// resync, which checks the GroupInfo against the walk.
fn rejoin(m: &mut Member, id: &[u8], visible: &[(u64, Vec<u8>)], from: u64, info: &[u8]) -> Option<Commit> {
    let mut descent = m.descent(id).ok()??;
    let offered = hush::mls::parse_group_info(info).ok()?.epoch().as_u64();
    for (_, bytes) in visible.iter().filter(|(s, _)| *s > from) {
        if descent.epoch() >= offered {
            break;
        }
        descent.feed(bytes);
    }
    m.resync(id, info, None, Some(&descent)).ok()
}

fuzz_target!(|ops: Vec<Op>| {
    let n = INPUTS.fetch_add(1, Relaxed);
    if n % 500 == 0 && std::env::var_os("CLIENT_STATE_STATS").is_some() {
        let [tried, refused, landed] = &REPAIRS;
        eprintln!(
            "client_state: {n} inputs; repairs tried {}, refused {}, landed {}",
            tried.load(Relaxed),
            refused.load(Relaxed),
            landed.load(Relaxed)
        );
    }
    let mut world = World::new();
    for op in ops.into_iter().take(MAX_STEPS) {
        let touched_second = matches!(op, Op::AliceSync { second: true } | Op::AliceSend { second: true });
        let second_before = world.alice.epoch_authenticator(&world.groups[1].id.clone());
        world.step(op);
        // alice is the client under test: she reads what every step did
        // to her first group (the second only when a step names it).
        world.alice_sync(0);
        world.check(touched_second, second_before);
    }
});

//! Stateful fuzzing of the Delivery Service core: arbitrary sequences of
//! honest MLS operations and arbitrary raw requests from several accounts
//! (members, a member who may be added, an outsider who never is), on the
//! in-memory store, with the Delivery Service invariants checked after
//! every step:
//!
//! * accepted sequence numbers strictly increase per group;
//! * exactly one commit is accepted per epoch (epochs advance by one);
//! * no push ever names the outsider, and every group request the outsider
//!   makes is refused with `NotMember`;
//! * forged credentials (a member moving its leaf to another device's
//!   certificate, KeyPackages and groups under someone else's
//!   certificate, commits adding forged packages) are always refused;
//! * a commit no member can process (corrupted membership tag, garbage
//!   update path) is accepted, and every member that cannot process it
//!   rejoins by an external commit from the stored GroupInfo; an honest
//!   resync is always accepted, a forged one (from an outsider, adding a
//!   device the account certified on the side, or moving the leaf to
//!   another device) never;
//! * a revoked device is refused everything from then on, and the server's
//!   removal proposal for it (renewed after every commit that leaves it in)
//!   reaches the others like any message, pushed in sequence;
//! * at the end, every leaf of the server's group state is certified, the
//!   store's roster equals the MLS membership and every current member has
//!   the same epoch authenticator.
#![no_main]
use arbitrary::Arbitrary;
use hush::auth::{DeviceCertificate, DeviceId, Identity};
use hush::client::log::{GroupLog, Read};
use hush::client::mls::{Commit, Member, Received};
use hush::delivery::memory::MemoryStore;
use hush::delivery::{Caller, Delivery, Notification, Storage};
use hush::wire::{ErrorCode, Request, Response};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Text {
        who: u8,
    },
    Commit {
        who: u8,
    },
    Sync {
        who: u8,
    },
    AddDave {
        who: u8,
    },
    Remove {
        who: u8,
        target: u8,
    },
    Probe {
        after: u64,
        seq: u64,
    },
    Raw {
        who: u8,
        bytes: Vec<u8>,
    },
    /// `who` tries to take `victim`'s identity (`broken`: with a
    /// certificate whose signature does not verify).
    ForgeUpdate {
        who: u8,
        victim: u8,
        broken: bool,
        proposal: bool,
    },
    /// `who` uploads KeyPackages under `victim`'s certificate.
    ForgePackage {
        who: u8,
        victim: u8,
        broken: bool,
    },
    /// `who` adds a KeyPackage forged under `victim`'s certificate.
    ForgeAdd {
        who: u8,
        victim: u8,
        broken: bool,
    },
    /// `who` registers a group whose only leaf claims `victim`.
    ForgeGroup {
        who: u8,
        victim: u8,
        broken: bool,
    },
    /// `who` rejoins the group by an external commit (group repair).
    Resync {
        who: u8,
    },
    /// `who` sends a commit nobody else can process (`garbage`: a garbage
    /// update path; otherwise a corrupted membership tag).
    BadCommit {
        who: u8,
        garbage: bool,
    },
    /// A resync that is not one: 0 from the outsider, 1 from a device
    /// `who`'s account certifies on the side, 2 moving `who`'s leaf to such
    /// a device.
    ForgeResync {
        who: u8,
        kind: u8,
    },
    /// `target`'s account revokes its device (sent from `target` itself:
    /// every account here has one device).
    Revoke {
        target: u8,
    },
}

const EVE: usize = 4;

struct World {
    ds: Delivery,
    store: MemoryStore,
    now: u64,
    members: Vec<Member>,
    accounts: Vec<Identity>,
    /// Who each member is to the server (fixed: members swap out of
    /// `members` while they read).
    callers: Vec<Caller>,
    /// Each member's reading of the group's log.
    logs: Vec<GroupLog>,
    /// A stand-in that takes a reading member's place in `members`.
    spare: Option<Member>,
    active: Vec<bool>,
    /// Devices their account revoked: refused everything, out of play.
    revoked: Vec<bool>,
    group: Vec<u8>,
    last_seq: u64,
    epoch: u64,
    removal_key: [u8; 32],
}

impl World {
    /// A member's certificate (as anyone can copy it), or a copy whose
    /// signature no longer verifies.
    fn claimed(&self, victim: u8, broken: bool) -> Vec<u8> {
        let mut cert = self.members[usize::from(victim) % self.members.len()].certificate().encode();
        if broken {
            if let Some(b) = cert.get_mut(70) {
                *b ^= 1;
            }
        }
        cert
    }

    fn req(&mut self, who: usize, request: Request) -> Response {
        self.now += 1;
        let caller = self.callers[who];
        let revoked = self.revoked[who];
        let out = self.ds.handle(&mut self.store, caller, request, self.now);
        if revoked {
            assert!(
                matches!(out.response, Response::Error { code: ErrorCode::Revoked, .. }),
                "a revoked device was served: {:?}",
                out.response
            );
        }
        let eve = self.callers[EVE].device;
        let previous = self.last_seq;
        for n in &out.notifications {
            match n {
                Notification::Message { recipients, seq, group, .. } => {
                    assert!(!recipients.contains(&eve), "a push named the outsider");
                    assert_eq!(group, &self.group);
                    // A commit may be followed by the server's renewed
                    // removal proposal: consecutive sequences.
                    assert_eq!(*seq, self.last_seq + 1, "pushed sequence out of order");
                    self.last_seq = *seq;
                }
                Notification::Welcome { recipient } => assert_ne!(*recipient, eve),
                Notification::Revoked { device } => assert_eq!(*device, self.callers[who].device),
            }
        }
        out.response.encode().expect("responses encode");
        if let Response::Accepted { seq, epoch, group, .. } = &out.response {
            if *group == self.group && *seq > 0 {
                assert_eq!(*seq, previous + 1, "the accepted message is the next in the log");
                assert!(*epoch == self.epoch || *epoch == self.epoch + 1, "epochs advance by one");
                self.epoch = *epoch;
            }
        }
        out.response
    }

    fn send(&mut self, who: usize, message: Vec<u8>, welcome: Option<Vec<u8>>) -> Response {
        self.send_request(who, Request::Send { message, welcome, group_info: None })
    }

    fn send_request(&mut self, who: usize, request: Request) -> Response {
        let r = self.req(who, request);
        if let Response::Accepted { seq, .. } = &r {
            self.logs[who].sent(*seq);
        }
        r
    }

    /// The group's current GroupInfo and tree, as `who` may fetch it.
    fn group_info(&mut self, who: usize) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        match self.req(who, Request::FetchGroupInfo { group: self.group.clone() }) {
            Response::GroupInfo { group_info, ratchet_tree, .. } => Some((group_info, ratchet_tree)),
            _ => None,
        }
    }

    /// `who` rejoins the current epoch. An honest resync of a device that
    /// still has its leaf is always accepted; its cursor moves to it.
    fn resync(&mut self, who: usize) -> bool {
        let g = self.group.clone();
        let Some((info, tree)) = self.group_info(who) else { return false };
        let Ok(commit) = self.members[who].resync(&g, &info, tree.as_deref(), None) else { return false };
        let before = self.epoch;
        match self.send_request(who, commit.into_request()) {
            Response::Accepted { seq, epoch, .. } => {
                assert_eq!(epoch, before + 1, "a resync is one commit");
                self.logs[who].skip_to(seq);
                true
            }
            other => panic!("an honest resync was refused: {other:?}"),
        }
    }

    /// `who` reads the group's log with the library's reader, and rejoins
    /// (group repair, as the app does) whenever it is stuck.
    fn sync(&mut self, who: usize) {
        for _ in 0..64 {
            if !self.active[who] {
                return;
            }
            let spare = self.spare.take().expect("a spare member");
            let mut member = std::mem::replace(&mut self.members[who], spare);
            let mut log = self.logs[who].clone();
            let reads = log.read_all(&mut member, |r| self.req(who, r)).expect("the core sends pages in order");
            self.spare = Some(std::mem::replace(&mut self.members[who], member));
            self.logs[who] = log;
            for r in &reads {
                if let Read::Received { received: Received::Commit { removed_me: true, .. }, .. } = r {
                    self.active[who] = false;
                }
            }
            if !(reads.last().is_some_and(Read::stuck) && self.active[who] && self.resync(who)) {
                return;
            }
        }
    }

    fn commit(&mut self, who: usize, build: impl FnOnce(&mut Member, &[u8]) -> Option<Commit>) {
        if !self.active[who] {
            return;
        }
        self.sync(who);
        if !self.active[who] {
            return;
        }
        let g = self.group.clone();
        let Some(commit) = build(&mut self.members[who], &g) else { return };
        let before = self.epoch;
        match self.send_request(who, commit.into_request()) {
            Response::Accepted { epoch, .. } => {
                assert_eq!(epoch, before + 1, "one accepted commit per epoch");
                self.members[who].merge_pending(&g).expect("merge our accepted commit");
            }
            Response::Error { .. } => {
                let _ = self.members[who].discard_pending(&g);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn setup() -> World {
    let mut store = MemoryStore::default();
    let removal = std::sync::Arc::new(hush::auth::Identity::generate().expect("key"));
    let removal_key = removal.public_key();
    let mut ds = Delivery::new(86_400, removal_key).with_removal_signer(removal);
    let (accounts, members): (Vec<Identity>, Vec<Member>) = (1..=5u8)
        .map(|_| {
            let (account, _, mut m) = Member::generate().expect("member");
            m.set_removal_key(removal_key);
            store.enrol(m.certificate());
            (account, m)
        })
        .unzip();
    for m in &members {
        let packages = m.key_packages(2).expect("key packages");
        let caller = Caller::of(m.certificate());
        let out = ds.handle(&mut store, caller, Request::PublishKeyPackages { packages, last_resort: Some(1) }, 1);
        assert!(matches!(out.response, Response::KeyPackageCount { .. }));
    }
    let mut w = World {
        ds,
        store,
        now: 10,
        callers: members.iter().map(|m| Caller::of(m.certificate())).collect(),
        members,
        accounts,
        logs: vec![],
        spare: Some(Member::generate().expect("member").2),
        active: vec![true, true, true, false, false],
        revoked: vec![false; 5],
        group: vec![],
        last_seq: 0,
        epoch: 0,
        removal_key,
    };
    let g = w.members[0].create_group(&removal_key).expect("group");
    w.group = g.id.clone();
    w.logs = vec![GroupLog::new(&g.id, 0); 5];
    assert!(matches!(
        w.req(0, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }),
        Response::Accepted { .. }
    ));
    let mut kps = vec![];
    for t in [1, 2] {
        let account = w.members[t].account().0;
        let Response::KeyPackages { packages } = w.req(0, Request::ClaimKeyPackage { account }) else {
            panic!("claim")
        };
        kps.extend(packages.into_iter().map(|p| (w.members[t].account(), p)));
    }
    let commit = w.members[0].add(&g.id, &kps).expect("add");
    assert!(matches!(w.send_request(0, commit.into_request()), Response::Accepted { .. }));
    w.members[0].merge_pending(&g.id).expect("merge");
    for t in [1, 2] {
        let Response::Welcomes { welcomes } = w.req(t, Request::FetchWelcomes) else { panic!("welcomes") };
        w.members[t].join(&welcomes[0].1).expect("join");
        w.logs[t] = GroupLog::new(&g.id, w.last_seq);
    }
    w
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > 40 {
        return;
    }
    let mut w = setup();
    for op in ops {
        match op {
            Op::Text { who } => {
                let who = usize::from(who % 4);
                if w.active[who] {
                    w.sync(who);
                    let g = w.group.clone();
                    if let Ok(m) = w.members[who].encrypt(&g, b"fuzz") {
                        w.send(who, m, None);
                    }
                }
            }
            Op::Commit { who } => w.commit(usize::from(who % 4), |m, g| m.commit_pending(g).ok()),
            Op::Sync { who } => w.sync(usize::from(who % 4)),
            Op::AddDave { who } => {
                let who = usize::from(who % 3);
                if w.active[3] || !w.active[who] {
                    continue;
                }
                let dave = w.members[3].account();
                let Response::KeyPackages { packages } = w.req(who, Request::ClaimKeyPackage { account: dave.0 })
                else {
                    continue;
                };
                let packages: Vec<_> = packages.into_iter().map(|p| (dave, p)).collect();
                let before = w.last_seq;
                w.commit(who, |m, g| m.add(g, &packages).ok());
                if w.last_seq > before && w.store.current_members(&w.group).unwrap().contains(&w.members[3].device()) {
                    if let Response::Welcomes { welcomes } = w.req(3, Request::FetchWelcomes) {
                        if let Some((_, wl)) = welcomes.last() {
                            if w.members[3].join(wl).is_ok() {
                                w.active[3] = true;
                                w.logs[3] = GroupLog::new(&w.group, w.last_seq);
                            }
                        }
                    }
                }
            }
            Op::Remove { who, target } => {
                let (who, target) = (usize::from(who % 4), usize::from(target % 4));
                if who != target && w.active[target] {
                    let t = w.members[target].account();
                    w.commit(who, |m, g| m.remove(g, &[t]).ok());
                }
            }
            Op::Probe { after, seq } => {
                let g = w.group.clone();
                for r in [Request::Fetch { group: g.clone(), after, limit: 0 }, Request::Ack { group: g, seq }] {
                    match w.req(EVE, r) {
                        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NotMember),
                        other => panic!("the outsider got {other:?}"),
                    }
                }
            }
            Op::ForgeUpdate { who, victim, broken, proposal } => {
                let (who, claimed) = (usize::from(who % 4), w.claimed(victim, broken));
                if !w.active[who] {
                    continue;
                }
                w.sync(who);
                let g = w.group.clone();
                let forged = if proposal {
                    w.members[who].impersonating_proposal(&g, claimed)
                } else {
                    w.members[who].impersonating_update(&g, claimed)
                };
                let Ok(forged) = forged else { continue };
                let before = w.last_seq;
                let r = w.req(who, Request::Send { message: forged, welcome: None, group_info: None });
                // Claiming one's own certificate with a new key is a key
                // mismatch too: every variant must be refused.
                assert!(matches!(r, Response::Error { .. }), "a forged update was accepted: {r:?}");
                assert_eq!(w.last_seq, before);
                if !proposal {
                    let _ = w.members[who].discard_pending(&g);
                }
            }
            Op::ForgePackage { who, victim, broken } => {
                let who = usize::from(who % 5);
                if w.revoked[who] {
                    continue;
                }
                let forger = Member::forger(w.claimed(victim, broken)).expect("forger");
                let packages = forger.key_packages(1).expect("package");
                match w.req(who, Request::PublishKeyPackages { packages, last_resort: None }) {
                    Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidCredential),
                    other => panic!("a forged KeyPackage was accepted: {other:?}"),
                }
            }
            Op::ForgeAdd { who, victim, broken } => {
                let who = usize::from(who % 4);
                let forger = Member::forger(w.claimed(victim, broken)).expect("forger");
                let packages = forger.key_packages(1).expect("package");
                if !w.active[who] {
                    continue;
                }
                w.sync(who);
                let g = w.group.clone();
                let Ok(commit) = w.members[who].add_unchecked(&g, &packages) else { continue };
                let before = w.last_seq;
                let r = w.req(who, commit.into_request());
                assert!(matches!(r, Response::Error { .. }), "a forged add was accepted: {r:?}");
                assert_eq!(w.last_seq, before);
                let _ = w.members[who].discard_pending(&g);
            }
            Op::ForgeGroup { who, victim, broken } => {
                let who = usize::from(who % 5);
                if w.revoked[who] {
                    continue;
                }
                let mut forger = Member::forger(w.claimed(victim, broken)).expect("forger");
                // An id bound to the sender, so the leaf is what is judged.
                let id = hush::mls::group_id_for(&w.members[who].account(), b"forged group");
                let Ok(g) = forger.create_group_with_id(&w.removal_key, &id) else { continue };
                match w.req(who, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }) {
                    Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidCredential),
                    other => panic!("a group with a forged leaf was accepted: {other:?}"),
                }
            }
            Op::Resync { who } => {
                let who = usize::from(who % 4);
                if w.active[who] {
                    w.resync(who);
                }
            }
            Op::BadCommit { who, garbage } => {
                let who = usize::from(who % 4);
                w.commit(who, |m, g| {
                    if garbage {
                        m.garbage_path_update(g).ok()
                    } else {
                        let mut c = m.self_update(g).ok()?;
                        c.corrupt_membership_tag();
                        Some(c)
                    }
                });
            }
            Op::ForgeResync { who, kind } => {
                let who = usize::from(who % 4);
                if !w.active[who] {
                    continue;
                }
                let g = w.group.clone();
                let Some((info, tree)) = w.group_info(who) else { continue };
                let before = w.last_seq;
                let (sender, forged) = match kind % 3 {
                    0 => (EVE, w.members[EVE].rejoin_unchecked(&g, &info, tree.as_deref())),
                    1 => {
                        let phantom = DeviceId(Identity::generate().expect("key").public_key());
                        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
                        let mut m = Member::create(provider, &w.accounts[who], phantom, w.now).expect("member");
                        (who, m.rejoin_unchecked(&g, &info, tree.as_deref()))
                    }
                    _ => {
                        let phantom = DeviceId(Identity::generate().expect("key").public_key());
                        let mls_key = w.members[who].certificate().mls_key;
                        let cert = DeviceCertificate::issue(&w.accounts[who], phantom, mls_key, w.now);
                        (who, w.members[who].rejoin_as(&g, &info, tree.as_deref(), cert.encode()))
                    }
                };
                if let Ok(commit) = forged {
                    let r = w.req(sender, commit.into_request());
                    assert!(matches!(r, Response::Error { .. }), "a forged resync was accepted: {r:?}");
                    assert_eq!(w.last_seq, before);
                }
                // The state a forged rejoin built is of no epoch; the member
                // rejoins for real, as the app does after a refusal.
                w.members[EVE].forget(&g);
                if kind % 3 == 2 {
                    w.members[who].forget(&g);
                    assert!(w.resync(who), "the member could not rejoin after its forged resync");
                }
            }
            Op::Revoke { target } => {
                let target = usize::from(target % 4);
                // Someone must stay to carry the group on.
                if w.revoked[target] || w.active.iter().take(4).filter(|a| **a).count() < 2 {
                    continue;
                }
                let device = w.callers[target].device;
                let revocation = hush::auth::DeviceRevocation::issue(&w.accounts[target], device, w.now);
                match w.req(target, Request::RevokeDevice { revocation: revocation.encode() }) {
                    Response::Done => {}
                    other => panic!("an account could not revoke its own device: {other:?}"),
                }
                w.revoked[target] = true;
                w.active[target] = false;
                assert!(matches!(w.req(target, Request::ListGroups), Response::Error { .. }));
            }
            Op::Raw { who, bytes } => {
                if let Ok(request) = Request::decode(&bytes) {
                    if !matches!(request, Request::Register { .. } | Request::Status) {
                        let who = usize::from(who % 5);
                        let before = w.last_seq;
                        w.req(who, request);
                        // Raw bytes cannot carry a valid signed commit or
                        // ciphertext for this group: nothing was appended.
                        assert_eq!(w.last_seq, before, "a raw request appended to the log");
                    }
                }
            }
        }
    }
    // Everyone catches up (a member that rejoins makes a commit the others
    // then read, so until nothing moves); the roster is the MLS membership.
    for _ in 0..8 {
        let before = w.last_seq;
        for who in 0..4 {
            w.sync(who);
        }
        if w.last_seq == before {
            break;
        }
    }
    let mut roster = w.store.current_members(&w.group).unwrap();
    roster.sort();
    let g = w.group.clone();
    let active: Vec<usize> = (0..4).filter(|i| w.active[*i]).collect();
    let mut mls = w.members[active[0]].devices(&g);
    mls.sort();
    assert_eq!(roster, mls, "roster differs from the MLS membership");
    let state = w.store.group(&g).unwrap().expect("the group").state;
    for (leaf, check) in hush::mls::leaf_certificates(&state, &g).expect("state") {
        assert!(check.is_ok(), "leaf {leaf} of the server's state is not certified");
    }
    let auth = w.members[active[0]].epoch_authenticator(&g);
    for i in active {
        assert_eq!(w.members[i].epoch_authenticator(&g), auth, "members diverged");
    }
});

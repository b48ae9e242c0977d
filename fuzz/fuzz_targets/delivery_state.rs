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
//! * at the end, the store's roster equals the MLS membership and every
//!   current member has the same epoch authenticator.
#![no_main]
use arbitrary::Arbitrary;
use hush::auth::AccountId;
use hush::client::mls::Member;
use hush::delivery::memory::MemoryStore;
use hush::delivery::{Delivery, Notification, Store};
use hush::wire::{ErrorCode, Request, Response};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Text { who: u8 },
    Commit { who: u8 },
    Sync { who: u8 },
    AddDave { who: u8 },
    Remove { who: u8, target: u8 },
    Probe { after: u64, seq: u64 },
    Raw { who: u8, bytes: Vec<u8> },
}

const EVE: usize = 4;

struct World {
    ds: Delivery,
    store: MemoryStore,
    now: u64,
    members: Vec<Member>,
    cursor: Vec<u64>,
    own: Vec<Vec<u64>>,
    active: Vec<bool>,
    group: Vec<u8>,
    last_seq: u64,
    epoch: u64,
}

impl World {
    fn req(&mut self, who: usize, request: Request) -> Response {
        self.now += 1;
        let account = self.members[who].account();
        let out = self.ds.handle(&mut self.store, account, request, self.now);
        let eve = self.members[EVE].account();
        for n in &out.notifications {
            match n {
                Notification::Message { recipients, seq, group, .. } => {
                    assert!(!recipients.contains(&eve), "a push named the outsider");
                    assert_eq!(group, &self.group);
                    assert_eq!(*seq, self.last_seq + 1, "pushed sequence out of order");
                }
                Notification::Welcome { recipient } => assert_ne!(*recipient, eve),
            }
        }
        out.response.encode().expect("responses encode");
        if let Response::Accepted { seq, epoch, group } = &out.response {
            if *group == self.group && *seq > 0 {
                assert!(*seq > self.last_seq, "sequence numbers must increase");
                self.last_seq = *seq;
                assert!(*epoch == self.epoch || *epoch == self.epoch + 1, "epochs advance by one");
                self.epoch = *epoch;
            }
        }
        out.response
    }

    fn send(&mut self, who: usize, message: Vec<u8>, welcome: Option<Vec<u8>>) -> Response {
        let r = self.req(who, Request::Send { message, welcome });
        if let Response::Accepted { seq, .. } = &r {
            self.own[who].push(*seq);
        }
        r
    }

    fn sync(&mut self, who: usize) {
        if !self.active[who] {
            return;
        }
        loop {
            let after = self.cursor[who];
            let r = self.req(who, Request::Fetch { group: self.group.clone(), after, limit: 0 });
            let Response::Messages { messages, more, .. } = r else { return };
            for (seq, m) in &messages {
                assert!(*seq > after);
                if !self.own[who].contains(seq) {
                    if let Ok(hush::client::mls::Received::Commit { removed_me: true, .. }) =
                        self.members[who].receive(&self.group, m)
                    {
                        self.active[who] = false;
                    }
                }
                self.cursor[who] = *seq;
            }
            if let Some((last, _)) = messages.last() {
                let g = self.group.clone();
                self.req(who, Request::Ack { group: g, seq: *last });
            }
            if !more || !self.active[who] {
                return;
            }
        }
    }

    fn commit(&mut self, who: usize, build: impl FnOnce(&mut Member, &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)>) {
        if !self.active[who] {
            return;
        }
        self.sync(who);
        if !self.active[who] {
            return;
        }
        let g = self.group.clone();
        let Some((commit, welcome)) = build(&mut self.members[who], &g) else { return };
        let before = self.epoch;
        match self.send(who, commit, welcome) {
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
    let mut ds = Delivery::new(86_400);
    let members: Vec<Member> = (1..=5u8)
        .map(|i| {
            let a = AccountId([i; 32]);
            store.accounts.insert(a);
            Member::new(a).expect("member")
        })
        .collect();
    for m in &members {
        let packages = m.key_packages(2).expect("key packages");
        let out = ds.handle(&mut store, m.account(), Request::PublishKeyPackages { packages, last_resort: Some(1) }, 1);
        assert!(matches!(out.response, Response::KeyPackageCount { .. }));
    }
    let mut w = World {
        ds,
        store,
        now: 10,
        members,
        cursor: vec![0; 5],
        own: vec![vec![]; 5],
        active: vec![true, true, true, false, false],
        group: vec![],
        last_seq: 0,
        epoch: 0,
    };
    let g = w.members[0].create_group().expect("group");
    w.group = g.id.clone();
    assert!(matches!(
        w.req(0, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }),
        Response::Accepted { .. }
    ));
    let mut kps = vec![];
    for t in [1, 2] {
        let account = w.members[t].account().0;
        let Response::KeyPackage { package } = w.req(0, Request::ClaimKeyPackage { account }) else { panic!("claim") };
        kps.push(package);
    }
    let (commit, welcome) = w.members[0].add(&g.id, &kps).expect("add");
    assert!(matches!(w.send(0, commit, Some(welcome)), Response::Accepted { .. }));
    w.members[0].merge_pending(&g.id).expect("merge");
    for t in [1, 2] {
        let Response::Welcomes { welcomes } = w.req(t, Request::FetchWelcomes) else { panic!("welcomes") };
        w.members[t].join(&welcomes[0].1).expect("join");
        w.cursor[t] = w.last_seq;
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
                let account = w.members[3].account().0;
                let Response::KeyPackage { package } = w.req(who, Request::ClaimKeyPackage { account }) else { continue };
                let before = w.last_seq;
                w.commit(who, |m, g| m.add(g, &[package]).ok().map(|(c, wl)| (c, Some(wl))));
                if w.last_seq > before && w.store.current_members(&w.group).unwrap().contains(&w.members[3].account()) {
                    if let Response::Welcomes { welcomes } = w.req(3, Request::FetchWelcomes) {
                        if let Some((_, wl)) = welcomes.last() {
                            if w.members[3].join(wl).is_ok() {
                                w.active[3] = true;
                                w.cursor[3] = w.last_seq;
                            }
                        }
                    }
                }
            }
            Op::Remove { who, target } => {
                let (who, target) = (usize::from(who % 4), usize::from(target % 4));
                if who != target && w.active[target] {
                    let t = w.members[target].account();
                    w.commit(who, |m, g| m.remove(g, &[t]).ok().map(|c| (c, None)));
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
    // Everyone catches up; the roster is the MLS membership.
    for who in 0..4 {
        w.sync(who);
    }
    let mut roster = w.store.current_members(&w.group).unwrap();
    roster.sort();
    let g = w.group.clone();
    let active: Vec<usize> = (0..4).filter(|i| w.active[*i]).collect();
    let mut mls = w.members[active[0]].members(&g);
    mls.sort();
    assert_eq!(roster, mls, "roster differs from the MLS membership");
    let auth = w.members[active[0]].epoch_authenticator(&g);
    for i in active {
        assert_eq!(w.members[i].epoch_authenticator(&g), auth, "members diverged");
    }
});

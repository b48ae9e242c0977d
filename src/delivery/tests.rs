//! The Delivery Service rules, exercised with real openmls clients on each
//! storage: the in-memory store, SQLite and PostgreSQL (issue 30: one rule
//! suite, every storage). Each test runs three times ([`rules!`]); the
//! PostgreSQL run is skipped, saying why, without PostgreSQL's binaries.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::memory::MemoryStore;
use super::*;
use crate::client::log::{all_received, GroupLog, Read};
use crate::client::mls::{Commit, Member, Received};
use crate::limits::CLAIM_BURST;
use crate::wire::{ErrorCode, Request, Response};

struct Net {
    ds: Delivery,
    removal_key: [u8; 32],
    store: Store,
    now: u64,
    pushes: Vec<Notification>,
}

/// Which storage the rules run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    Memory,
    Sqlite,
    Postgres,
}

thread_local! {
    /// The storage `Net::new` opens on this test's thread.
    static BACKING: std::cell::Cell<Backing> = const { std::cell::Cell::new(Backing::Memory) };
}

/// Runs `test` with its nets on `backing`; `false` (skipped) without
/// PostgreSQL's binaries.
fn on(backing: Backing, test: fn()) {
    if backing == Backing::Postgres && crate::db::pg::tests::database().is_none() {
        return;
    }
    BACKING.with(|b| b.set(backing));
    test();
}

/// A net's storage.
enum Store {
    Memory(MemoryStore),
    /// The database, and the directory it lives in (deleted with it).
    Sqlite(crate::db::sqlite::Db, #[allow(dead_code)] tempfile::TempDir),
    Postgres(Box<crate::db::pg::PgDb>),
}

impl Store {
    fn open() -> Self {
        match BACKING.with(|b| b.get()) {
            Backing::Memory => Self::Memory(MemoryStore::default()),
            Backing::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Self::Sqlite(crate::db::sqlite::Db::open(&dir.path().join("rules.db")).unwrap(), dir)
            }
            Backing::Postgres => {
                let target = crate::db::pg::tests::database().expect("PostgreSQL");
                Self::Postgres(Box::new(crate::db::pg::PgDb::connect(target).unwrap()))
            }
        }
    }
}

/// Runs `$body` with `$s` the net's [`Storage`], in one unit of work on the
/// SQL stores (committed).
macro_rules! in_unit {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            Store::Memory($s) => $body,
            Store::Sqlite(db, _) => {
                crate::delivery::storage::Backend::write(db, |$s| Ok($body)).expect("a SQLite unit of work")
            }
            Store::Postgres(db) => {
                crate::delivery::storage::Backend::write(&mut **db, |$s| Ok($body)).expect("a PostgreSQL unit of work")
            }
        }
    };
}

/// Declares each rule test three times: `memory::NAME`, `sqlite::NAME`
/// and `postgres::NAME`.
macro_rules! rules {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[test] fn $name() { super::on(super::Backing::Memory, super::$name) } )*
        }
        mod sqlite {
            $( #[test] fn $name() { super::on(super::Backing::Sqlite, super::$name) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::on(super::Backing::Postgres, super::$name) } )*
        }
    };
}

struct Client {
    member: Member,
    /// Where it reads each group's log.
    logs: HashMap<Vec<u8>, GroupLog>,
}

impl Client {
    fn log(&mut self, group: &[u8]) -> &mut GroupLog {
        self.logs.entry(group.to_vec()).or_insert_with(|| GroupLog::new(group, 0))
    }
}

impl Net {
    /// alice's group with bob and carol in it, everyone joined.
    fn trio() -> (Self, Client, Client, Client, Vec<u8>) {
        let mut net = Net::new();
        let (mut alice, mut bob, mut carol) = (net.client(1), net.client(2), net.client(3));
        let g = net.create(&mut alice);
        net.add(&mut alice, &g, &[&bob, &carol]);
        net.join(&mut bob);
        net.join(&mut carol);
        (net, alice, bob, carol, g)
    }

    fn new() -> Self {
        let removal = std::sync::Arc::new(crate::auth::Identity::generate().unwrap());
        let removal_key = removal.public_key();
        Self {
            ds: Delivery::new(30 * 86_400, removal_key).with_removal_signer(removal).with_head_signer(
                crate::auth::online::CurrentKey::new(
                    crate::auth::online::ServerKey::identity(crate::auth::Identity::generate().unwrap()).unwrap(),
                ),
            ),
            removal_key,
            store: Store::open(),
            now: 1_000_000,
            pushes: vec![],
        }
    }

    fn client(&mut self, _n: u8) -> Client {
        let (_, _, member) = Member::generate().unwrap();
        self.enrol(member.certificate());
        let c = Client { member, logs: HashMap::new() };
        let packages = c.member.key_packages(3).unwrap();
        self.ok(&c, Request::PublishKeyPackages { packages, last_resort: Some(2) });
        c
    }

    /// A registered device of `account` (no KeyPackages yet).
    fn device_of(&mut self, account: &crate::auth::Identity) -> Client {
        let device = crate::auth::Identity::generate().unwrap();
        let member = Member::new(account, crate::auth::DeviceId(device.public_key())).unwrap();
        self.enrol(member.certificate());
        Client { member, logs: HashMap::new() }
    }

    /// A further device of `account`, with KeyPackages published.
    fn second_device(&mut self, account: &crate::auth::Identity) -> Client {
        let c = self.device_of(account);
        let packages = c.member.key_packages(3).unwrap();
        self.ok(&c, Request::PublishKeyPackages { packages, last_resort: Some(2) });
        c
    }

    fn req(&mut self, who: &Client, request: Request) -> Response {
        self.req_as(Caller::of(who.member.certificate()), request)
    }

    fn req_as(&mut self, caller: Caller, request: Request) -> Response {
        self.now += 1;
        let now = self.now;
        let out = self.handle(caller, request, now);
        self.pushes.extend(out.notifications);
        out.response
    }

    /// One request, as the engine runs it: on the SQL stores in its own
    /// savepoint, kept only if the request wrote.
    ///
    /// On the SQL stores a handshake is also verified first, off the unit
    /// of work, against a snapshot of its group, as the engine does
    /// ([`Delivery::prepare`]); on the in-memory store the core verifies
    /// it where it applies it. So every rule holds on both paths.
    fn handle(&mut self, origin: impl Into<Origin>, request: Request, now: u64) -> Outcome {
        let origin = origin.into();
        let prepared = self.prepare(origin, &request);
        self.run(origin, request, now, prepared)
    }

    /// One request with the verdict given (if any), as the engine's writer
    /// runs it: on the SQL stores in its own savepoint, kept only if the
    /// request wrote.
    fn run(&mut self, origin: Origin, request: Request, now: u64, prepared: Option<Prepared>) -> Outcome {
        self.run_as(origin, request, now, prepared, NoVerdict::Verify)
    }

    /// [`Net::run`], doing with a handshake that has no verdict that
    /// holds what `no_verdict` says (as the server's engine asks).
    fn run_as(
        &mut self,
        origin: Origin,
        request: Request,
        now: u64,
        prepared: Option<Prepared>,
        no_verdict: NoVerdict,
    ) -> Outcome {
        use crate::delivery::storage::{Backend as _, Unit as _};
        let ds = &mut self.ds;
        match &mut self.store {
            Store::Memory(s) => ds.handle_prepared(s, origin, request, now, None, prepared, no_verdict),
            Store::Sqlite(db, _) => db
                .write(|u| {
                    u.savepoint()?;
                    let out = ds.handle_prepared(u, origin, request, now, None, prepared, no_verdict);
                    u.release(out.wrote)?;
                    Ok(out)
                })
                .unwrap(),
            Store::Postgres(db) => db
                .write(|u| {
                    u.savepoint()?;
                    let out = ds.handle_prepared(u, origin, request, now, None, prepared, no_verdict);
                    u.release(out.wrote)?;
                    Ok(out)
                })
                .unwrap(),
        }
    }

    /// A handshake's verdict from a snapshot of its group, as the engine
    /// prepares it (SQL stores only, see [`Net::handle`]).
    fn prepare(&mut self, origin: Origin, request: &Request) -> Option<Prepared> {
        if matches!(self.store, Store::Memory(_)) {
            return None;
        }
        let (Origin::Device(caller), Request::Send { message, .. }) = (origin, request) else { return None };
        let handshake = crate::mls::handshake_group(message)?;
        let snapshot = self.snapshot_of(caller, &handshake)?;
        self.ds.prepare(caller, snapshot, request)
    }

    /// The snapshot the engine's reader would take for verifying a
    /// handshake `caller` sent to `group` at `epoch`.
    fn snapshot(&mut self, caller: Caller, group: &[u8], epoch: u64) -> Option<Snapshot> {
        self.snapshot_of(caller, &crate::mls::HandshakeHeader { group: group.to_vec(), epoch, commit: true })
    }

    fn snapshot_of(&mut self, caller: Caller, h: &crate::mls::HandshakeHeader) -> Option<Snapshot> {
        use crate::delivery::storage::Backend as _;
        let ds = &mut self.ds;
        match &mut self.store {
            Store::Memory(s) => ds.snapshot(s, &caller, h).unwrap(),
            Store::Sqlite(db, _) => db.read(|u| ds.snapshot(u, &caller, h)).unwrap().unwrap(),
            Store::Postgres(db) => db.read(|u| ds.snapshot(u, &caller, h)).unwrap().unwrap(),
        }
    }

    /// One request with the verdict given, as the engine's writer runs
    /// it.
    fn handle_with(&mut self, caller: Caller, request: Request, prepared: Option<Prepared>) -> Response {
        self.now += 1;
        let out = self.run(caller.into(), request, self.now, prepared);
        self.pushes.extend(out.notifications);
        out.response
    }

    /// Registers the certificate's account (if new) and device.
    fn enrol(&mut self, certificate: &crate::auth::DeviceCertificate) {
        let (account, device, encoded) = (certificate.account, certificate.device, certificate.encode());
        in_unit!(&mut self.store, s => {
            if s.account(&account).unwrap().is_none() {
                s.insert_account(&account, None, 0).unwrap();
            }
            s.insert_device(&device, &storage::DeviceRecord::new(account, encoded, 0)).unwrap();
        })
    }

    /// The sequences stored in `group`'s log.
    fn log(&mut self, group: &[u8]) -> Vec<u64> {
        in_unit!(&mut self.store, s => {
            s.fetch(group, 0, None, usize::MAX, usize::MAX).unwrap().0.into_iter().map(|m| m.seq).collect()
        })
    }

    /// Welcomes waiting, for anyone.
    fn welcomes_waiting(&mut self) -> u64 {
        let now = self.now;
        in_unit!(&mut self.store, s => s.stats(now).unwrap().welcomes)
    }

    fn current_members(&mut self, group: &[u8]) -> Vec<crate::auth::DeviceId> {
        in_unit!(&mut self.store, s => s.current_members(group).unwrap())
    }

    fn database_bytes(&mut self) -> u64 {
        in_unit!(&mut self.store, s => s.database_bytes().unwrap())
    }

    fn group(&mut self, group: &[u8]) -> Option<GroupRecord> {
        in_unit!(&mut self.store, s => s.group(group).unwrap())
    }

    fn link(&mut self, id: &[u8; 16]) -> Option<storage::LinkRecord> {
        in_unit!(&mut self.store, s => s.link(id).unwrap())
    }

    fn revoke_device(&mut self, device: &crate::auth::DeviceId, now: u64) {
        in_unit!(&mut self.store, s => s.revoke_device(device, now).unwrap())
    }

    fn devices_of(&mut self, account: &AccountId) -> Vec<(crate::auth::DeviceId, storage::DeviceRecord)> {
        in_unit!(&mut self.store, s => s.devices_of(account).unwrap())
    }

    fn chain_tip(&mut self, group: &[u8]) -> Option<storage::ChainTip> {
        in_unit!(&mut self.store, s => s.chain_tip(group).unwrap())
    }

    /// The retention sweep at `now`.
    fn expire(&mut self, now: u64) {
        let ds = &mut self.ds;
        in_unit!(&mut self.store, s => { ds.expire(s, now).unwrap(); })
    }

    fn ok(&mut self, who: &Client, request: Request) -> Response {
        let r = self.req(who, request);
        assert!(!matches!(r, Response::Error { .. }), "{r:?}");
        r
    }

    fn code(&mut self, who: &Client, request: Request) -> (ErrorCode, u64) {
        match self.req(who, request) {
            Response::Error { code, detail, .. } => (code, detail),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn create(&mut self, who: &mut Client) -> Vec<u8> {
        let g = who.member.create_group(&self.removal_key).unwrap();
        self.ok(who, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
        who.logs.insert(g.id.clone(), GroupLog::new(&g.id, 0));
        g.id
    }

    fn claim(&mut self, who: &Client, target: &Client) -> Vec<u8> {
        match self.ok(who, Request::ClaimKeyPackage { account: target.member.account().0 }) {
            Response::KeyPackages { packages } if packages.len() == 1 => packages.into_iter().next().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    /// Sends and, when accepted, records the sequence as own.
    fn send(&mut self, who: &mut Client, message: Vec<u8>, welcome: Option<Vec<u8>>) -> Response {
        self.send_request(who, Request::Send { message, welcome, group_info: None })
    }

    /// Sends a commit (with its Welcome and GroupInfo).
    fn commit(&mut self, who: &mut Client, commit: Commit) -> Response {
        self.send_request(who, commit.into_request())
    }

    fn send_request(&mut self, who: &mut Client, request: Request) -> Response {
        let r = self.req(who, request);
        if let Response::Accepted { group, seq, .. } = &r {
            who.log(group).sent(*seq);
        }
        r
    }

    fn add(&mut self, who: &mut Client, group: &[u8], targets: &[&Client]) {
        let kps: Vec<(AccountId, Vec<u8>)> = targets.iter().map(|t| (t.member.account(), self.claim(who, t))).collect();
        let commit = who.member.add(group, &kps).unwrap();
        let r = self.commit(who, commit);
        assert!(matches!(r, Response::Accepted { .. }), "{r:?}");
        who.member.merge_pending(group).unwrap();
    }

    fn join(&mut self, who: &mut Client) -> Vec<u8> {
        let Response::Welcomes { welcomes } = self.ok(who, Request::FetchWelcomes) else { panic!() };
        let (id, w) = welcomes.into_iter().next().expect("a Welcome");
        let group = who.member.join(&w).unwrap();
        self.ok(who, Request::AckWelcome { id });
        // History starts after the commit that added us.
        let Response::Groups { groups } = self.ok(who, Request::ListGroups) else { panic!() };
        let g = groups.iter().find(|g| g.group == group).unwrap();
        who.logs.insert(group.clone(), GroupLog::new(&group, g.acked_seq));
        group
    }

    /// Fetches and processes everything new; returns what was received.
    fn sync(&mut self, who: &mut Client, group: &[u8]) -> Vec<Received> {
        all_received(self.read(who, group)).unwrap_or_else(|(seq, e)| panic!("message {seq} failed: {e}"))
    }

    /// Reads `group` to its end or to a message `who` cannot follow past.
    fn read(&mut self, who: &mut Client, group: &[u8]) -> Vec<Read> {
        let caller = Caller::of(who.member.certificate());
        let mut log = who.log(group).clone();
        let reads = log
            .read_all(&mut who.member, |r| {
                let response = self.req_as(caller, r);
                assert!(!matches!(response, Response::Error { .. }), "{response:?}");
                response
            })
            .expect("the server sends pages in order");
        who.logs.insert(group.to_vec(), log);
        reads
    }

    fn text(&mut self, who: &mut Client, group: &[u8], text: &str) -> u64 {
        let m = who.member.encrypt(group, text.as_bytes()).unwrap();
        match self.send(who, m, None) {
            Response::Accepted { seq, .. } => seq,
            other => panic!("{other:?}"),
        }
    }
}

/// Post-quantum groups (issue 35): a device keeps KeyPackages (and a
/// last-resort one) of each suite, counted and claimed per suite; an
/// upload mixing suites and a suite hush does not speak are refused; a
/// post-quantum group is created, verified and committed to like a
/// classic one.
fn post_quantum_key_packages_and_groups() {
    use crate::mls::Suite;
    let mut net = Net::new();
    let (mut alice, mut bob) = (net.client(1), net.client(2));
    let pq = Suite::Pq.code();
    let packages = bob.member.key_packages_of(Suite::Pq, 3).unwrap();
    let r = net.ok(&bob, Request::PublishKeyPackages { packages, last_resort: Some(2) });
    assert_eq!(r, Response::KeyPackageCount { count: 2, last_resort: true });
    assert_eq!(
        net.ok(&bob, Request::CountKeyPackagesOf { suite: pq }),
        Response::KeyPackageCount { count: 2, last_resort: true }
    );
    assert_eq!(net.ok(&bob, Request::CountKeyPackages), Response::KeyPackageCount { count: 2, last_resort: true });
    let mut mixed = bob.member.key_packages_of(Suite::Pq, 1).unwrap();
    mixed.extend(bob.member.key_packages(1).unwrap());
    assert_eq!(
        net.code(&bob, Request::PublishKeyPackages { packages: mixed, last_resort: None }).0,
        ErrorCode::Malformed
    );
    let other = Request::ClaimKeyPackages { account: bob.member.account().0, suite: 0x0003 };
    assert_eq!(net.code(&alice, other).0, ErrorCode::Malformed);
    assert_eq!(net.code(&alice, Request::CountKeyPackagesOf { suite: 0x0042 }).0, ErrorCode::Malformed);

    alice.member.set_removal_key(net.removal_key);
    let g = alice.member.create_group_of(&net.removal_key, Suite::Pq).unwrap();
    net.ok(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    alice.logs.insert(g.id.clone(), GroupLog::new(&g.id, 0));
    let g = g.id;
    let claim = Request::ClaimKeyPackages { account: bob.member.account().0, suite: pq };
    let Response::KeyPackages { packages } = net.ok(&alice, claim) else { panic!() };
    let kp = packages.into_iter().next().unwrap();
    let commit = alice.member.add(&g, &[(bob.member.account(), kp)]).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    net.join(&mut bob);
    net.text(&mut alice, &g, "post-quantum hello");
    assert_eq!(texts(&net.sync(&mut bob, &g)), ["post-quantum hello"]);
    let update = bob.member.self_update(&g).unwrap();
    assert!(matches!(net.commit(&mut bob, update), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    net.sync(&mut alice, &g);
    net.text(&mut alice, &g, "after bob's update");
    assert_eq!(texts(&net.sync(&mut bob, &g)), ["after bob's update"]);
    // One package claimed, one left, the last resort kept; classic ones untouched.
    assert_eq!(
        net.ok(&bob, Request::CountKeyPackagesOf { suite: pq }),
        Response::KeyPackageCount { count: 1, last_resort: true }
    );
    assert_eq!(net.ok(&bob, Request::CountKeyPackages), Response::KeyPackageCount { count: 2, last_resort: true });
}

/// A post-quantum group holds at most [`crate::limits::MAX_PQ_GROUP_MEMBERS`]
/// devices: the commit that fills it is taken, one more is refused (a
/// classic group of that size is not).
fn a_post_quantum_group_holds_at_most_its_cap() {
    use crate::mls::Suite;
    let mut net = Net::new();
    let mut alice = net.client(1);
    alice.member.set_removal_key(net.removal_key);
    let g = alice.member.create_group_of(&net.removal_key, Suite::Pq).unwrap();
    net.ok(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    alice.logs.insert(g.id.clone(), GroupLog::new(&g.id, 0));
    let g = g.id;
    let max = usize::try_from(crate::limits::MAX_PQ_GROUP_MEMBERS).unwrap();
    let mut claimed = Vec::new();
    for _ in 0..max {
        let c = net.client(0);
        let packages = c.member.key_packages_of(Suite::Pq, 1).unwrap();
        net.ok(&c, Request::PublishKeyPackages { packages, last_resort: None });
        // Claims are rate-limited per claimer: time passes between them.
        net.now += 10;
        let claim = Request::ClaimKeyPackages { account: c.member.account().0, suite: Suite::Pq.code() };
        let Response::KeyPackages { packages } = net.ok(&alice, claim) else { panic!() };
        claimed.push((c.member.account(), packages.into_iter().next().unwrap()));
    }
    let one_more = claimed.pop().unwrap();
    let fill = alice.member.add(&g, &claimed).unwrap();
    assert!(matches!(net.commit(&mut alice, fill), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    assert_eq!(net.current_members(&g).len(), max);
    let over = alice.member.add(&g, &[one_more]).unwrap();
    match net.commit(&mut alice, over) {
        Response::Error { code: ErrorCode::QuotaExceeded, message, .. } => {
            assert!(message.contains("post-quantum groups hold at most"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// A device just linked to a member's account reads the group's log
/// before its first join (it walks the commits from the state its first
/// device handed over), from where its account's devices read; a stranger
/// does not, nor a device removed on its own once it read up to its
/// removal (red team, issue 34: its row gone, the account's membership
/// let it read again), nor the new device once its account is out.
fn a_further_device_of_a_member_reads_the_log_before_it_joins() {
    let mut net = Net::new();
    let (mut bob, eve) = (net.client(2), net.client(3));
    let account = crate::auth::Identity::generate().unwrap();
    let mut phone = net.second_device(&account);
    let mut laptop = net.second_device(&account);
    bob.member.set_removal_key(net.removal_key);
    let g = net.create(&mut bob);
    let before = net.text(&mut bob, &g, "before alice");
    let Response::KeyPackages { packages } = net.ok(&bob, Request::ClaimKeyPackage { account: account.account_id().0 })
    else {
        panic!()
    };
    let both: Vec<_> = packages.into_iter().map(|p| (account.account_id(), p)).collect();
    let commit = bob.member.add(&g, &both).unwrap();
    assert!(matches!(net.commit(&mut bob, commit), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    net.join(&mut phone);
    net.join(&mut laptop);
    let update = bob.member.self_update(&g).unwrap();
    let Response::Accepted { seq: commit, .. } = net.commit(&mut bob, update) else { panic!() };
    bob.member.merge_pending(&g).unwrap();
    let tablet = net.device_of(&account);
    let fetch = |after| Request::Fetch { group: g.clone(), after, limit: 0 };
    let Response::Messages { messages, .. } = net.ok(&tablet, fetch(0)) else { panic!() };
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert!(seqs.contains(&commit), "{seqs:?}");
    assert!(!seqs.contains(&before), "read before its account joined: {seqs:?}");
    assert_eq!(net.code(&eve, fetch(0)).0, ErrorCode::NotMember);
    // The phone alone is removed; it reads up to its removal and its row
    // goes; its account (the laptop) is still in.
    let removal = bob.member.remove_devices(&g, &[phone.member.device()]).unwrap();
    let Response::Accepted { seq: removed_at, .. } = net.commit(&mut bob, removal) else { panic!() };
    bob.member.merge_pending(&g).unwrap();
    net.read(&mut phone, &g);
    // (Reading acknowledges; the server no longer lists the group for it.)
    let _ = net.req(&phone, Request::Ack { group: g.clone(), seq: removed_at });
    let Response::Groups { groups } = net.ok(&phone, Request::ListGroups) else { panic!() };
    assert!(groups.iter().all(|s| s.group != g), "the phone's row stayed");
    net.text(&mut bob, &g, "after the phone left");
    assert_eq!(net.code(&phone, fetch(removed_at)).0, ErrorCode::NotMember, "the removed phone reads again");
    // Once the account is out, the new device reads nothing.
    let removal = bob.member.remove(&g, &[laptop.member.account()]).unwrap();
    assert!(matches!(net.commit(&mut bob, removal), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    assert_eq!(net.code(&tablet, fetch(0)).0, ErrorCode::NotMember);
}

fn texts(received: &[Received]) -> Vec<String> {
    Received::texts(received)
}

fn three_members_exchange_messages_in_order() {
    let mut net = Net::new();
    let (mut alice, mut bob, mut carol) = (net.client(1), net.client(2), net.client(3));
    let g = net.create(&mut alice);
    net.add(&mut alice, &g, &[&bob, &carol]);
    assert!(net
        .pushes
        .iter()
        .any(|p| matches!(p, Notification::Welcome { recipient } if *recipient == bob.member.device())));
    assert_eq!(net.join(&mut bob), g);
    assert_eq!(net.join(&mut carol), g);
    for i in 0..5 {
        net.text(&mut alice, &g, &format!("a{i}"));
        net.text(&mut bob, &g, &format!("b{i}"));
    }
    let carol_got = net.sync(&mut carol, &g);
    let expected: Vec<String> = (0..5).flat_map(|i| [format!("a{i}"), format!("b{i}")]).collect();
    assert_eq!(texts(&carol_got), expected);
    assert_eq!(texts(&net.sync(&mut bob, &g)), (0..5).map(|i| format!("a{i}")).collect::<Vec<_>>());
    assert_eq!(alice.member.epoch_authenticator(&g), carol.member.epoch_authenticator(&g));
    // Stored once per message whatever the group size, and deleted once all acked.
    net.sync(&mut alice, &g);
    assert!(net.log(&g).is_empty(), "{:?}", net.log(&g));
}

fn concurrent_commits_one_wins_loser_catches_up_and_retries() {
    let (mut net, mut alice, mut bob, mut carol, g) = Net::trio();
    let epoch = bob.member.epoch(&g).unwrap();
    let bob_commit = bob.member.commit_pending(&g).unwrap();
    let carol_commit = carol.member.commit_pending(&g).unwrap();
    assert!(matches!(net.commit(&mut bob, bob_commit), Response::Accepted { epoch: e, .. } if e == epoch + 1));
    bob.member.merge_pending(&g).unwrap();
    let r = net.commit(&mut carol, carol_commit);
    assert!(matches!(r, Response::Error { code: ErrorCode::StaleEpoch, detail, .. } if detail == epoch + 1), "{r:?}");
    carol.member.discard_pending(&g).unwrap();
    net.sync(&mut carol, &g);
    let retry = carol.member.commit_pending(&g).unwrap();
    assert!(matches!(net.commit(&mut carol, retry), Response::Accepted { .. }));
    carol.member.merge_pending(&g).unwrap();
    net.sync(&mut alice, &g);
    net.sync(&mut bob, &g);
    let auth = alice.member.epoch_authenticator(&g);
    assert_eq!(auth, bob.member.epoch_authenticator(&g));
    assert_eq!(auth, carol.member.epoch_authenticator(&g));
    assert_eq!(alice.member.epoch(&g), Some(epoch + 2));
}

/// Issue 37: commits are verified off the writer, against a snapshot. Two
/// commits for one epoch, verified at once on two threads from the same
/// snapshot (both verify), reach the writer one after the other: the
/// first is applied from its verdict, the second is refused as stale.
fn two_commits_for_one_epoch_verified_concurrently_accept_exactly_one() {
    let (mut net, _alice, mut bob, mut carol, g) = Net::trio();
    let epoch = bob.member.epoch(&g).unwrap();
    let (bc, cc) = (Caller::of(bob.member.certificate()), Caller::of(carol.member.certificate()));
    let b = bob.member.commit_pending(&g).unwrap().into_request();
    let c = carol.member.commit_pending(&g).unwrap().into_request();
    let (rb, rc) = (net.snapshot(bc, &g, epoch).unwrap(), net.snapshot(cc, &g, epoch).unwrap());
    let (quotas, key) = (net.ds.quotas, net.removal_key);
    let (pb, pc) = std::thread::scope(|s| {
        let tb = s.spawn(|| Delivery::with_quotas(quotas, key).prepare(bc, rb, &b));
        let tc = s.spawn(|| Delivery::with_quotas(quotas, key).prepare(cc, rc, &c));
        (tb.join().unwrap(), tc.join().unwrap())
    });
    let (pb, pc) = (pb.unwrap(), pc.unwrap());
    assert!(pb.verified() && pc.verified(), "each verifies against the snapshot");
    let (used, logged) = (net.ds.prepared_used(), net.log(&g).len());
    let responses = [net.handle_with(bc, b, Some(pb)), net.handle_with(cc, c, Some(pc))];
    let accepted =
        responses.iter().filter(|r| matches!(r, Response::Accepted { epoch: e, .. } if *e == epoch + 1)).count();
    let stale = responses
        .iter()
        .filter(|r| matches!(r, Response::Error { code: ErrorCode::StaleEpoch, detail, .. } if *detail == epoch + 1))
        .count();
    assert_eq!((accepted, stale), (1, 1), "{responses:?}");
    assert_eq!(net.ds.prepared_used(), used + 1, "the winner was applied from its verdict");
    bob.member.merge_pending(&g).unwrap();
    assert_eq!(net.log(&g).len(), logged + 1, "one of the two commits is logged");
}

/// alice's commit of bob's leaving, with a verdict from a snapshot taken
/// before bob's proposal (stale once the proposal is kept).
struct StaleCommit {
    net: Net,
    alice: Client,
    bob: Client,
    g: Vec<u8>,
    epoch: u64,
    ac: Caller,
    commit: Request,
    stale: Prepared,
}

impl StaleCommit {
    fn new() -> Self {
        let (mut net, mut alice, mut bob, _carol, g) = Net::trio();
        let epoch = alice.member.epoch(&g).unwrap();
        let ac = Caller::of(alice.member.certificate());
        let old = net.snapshot(ac, &g, epoch).unwrap();
        let proposal = bob.member.leave(&g).unwrap();
        assert!(matches!(net.send(&mut bob, proposal, None), Response::Accepted { .. }));
        net.sync(&mut alice, &g);
        let commit = alice.member.commit_pending(&g).unwrap().into_request();
        let stale = net.ds.prepare(ac, old, &commit).unwrap();
        Self { net, alice, bob, g, epoch, ac, commit, stale }
    }
}

/// A verdict is used only while the group's state is the snapshot it was
/// verified against. A proposal that lands in between changes the state
/// within the epoch: the commit that takes it by reference failed against
/// the snapshot, and is verified again (and accepted) by the writer.
fn a_verdict_from_before_a_proposal_is_verified_again() {
    let StaleCommit { mut net, mut alice, bob, g, epoch, ac, commit, stale } = StaleCommit::new();
    assert!(!stale.verified(), "against the snapshot the proposal it refers to does not exist");
    let used = net.ds.prepared_used();
    let r = net.handle_with(ac, commit, Some(stale));
    assert!(matches!(r, Response::Accepted { epoch: e, .. } if e == epoch + 1), "{r:?}");
    assert_eq!(net.ds.prepared_used(), used, "the stale verdict was not used");
    alice.member.merge_pending(&g).unwrap();
    assert!(!net.current_members(&g).contains(&bob.member.device()));
}

/// Red team M1: a handshake whose verdict went stale (or that has none)
/// is not verified where it would be applied when the server's engine
/// asks so: it comes back whole, unapplied and unlogged, to be verified
/// off the writer again, or, once it went back too often, is refused as
/// rate-limited; verified against the group as it is now, its verdict is
/// used.
fn a_stale_verdict_marked_to_go_back_comes_back_unverified() {
    let StaleCommit { mut net, mut alice, bob, g, epoch, ac, commit, stale } = StaleCommit::new();
    let (used, logged) = (net.ds.prepared_used(), net.log(&g).len());
    net.now += 1;
    let out = net.run_as(ac.into(), commit.clone(), net.now, Some(stale), NoVerdict::GiveBack);
    assert!(!out.wrote && out.notifications.is_empty(), "{:?}", out.response);
    assert_eq!(out.again.as_deref(), Some(&commit), "the handshake comes back whole");
    let out = net.run_as(ac.into(), commit.clone(), net.now, None, NoVerdict::GiveBack);
    assert_eq!(out.again.as_deref(), Some(&commit), "without a verdict too");
    let out = net.run_as(ac.into(), commit.clone(), net.now, None, NoVerdict::Refuse);
    assert!(matches!(out.response, Response::Error { code: ErrorCode::RateLimited, .. }), "{:?}", out.response);
    assert!(!out.wrote && out.again.is_none());
    assert_eq!((net.ds.prepared_used(), net.log(&g).len()), (used, logged), "nothing used, nothing logged");
    let fresh = net.snapshot(ac, &g, epoch).unwrap();
    let verdict = net.ds.prepare(ac, fresh, &commit).unwrap();
    let out = net.run_as(ac.into(), commit, net.now, Some(verdict), NoVerdict::GiveBack);
    let r = out.response;
    assert!(matches!(r, Response::Accepted { epoch: e, .. } if e == epoch + 1), "{r:?}");
    assert_eq!(net.ds.prepared_used(), used + 1, "the fresh verdict was used");
    alice.member.merge_pending(&g).unwrap();
    assert!(!net.current_members(&g).contains(&bob.member.device()));
}

/// A verdict holds while the group's state version is the snapshot's:
/// every change of the state (a proposal kept, a commit) and of who is a
/// member advances the version, and a message that leaves both alone does
/// not.
fn every_change_of_a_groups_state_advances_its_version() {
    let (mut net, mut alice, mut bob, carol, g) = Net::trio();
    let version = |net: &mut Net| net.group(&g).unwrap().version;
    let v0 = version(&mut net);
    let text = alice.member.encrypt(&g, b"hello").unwrap();
    assert!(matches!(net.send(&mut alice, text, None), Response::Accepted { .. }));
    assert_eq!(version(&mut net), v0, "an application message is not a change of state");
    let proposal = bob.member.leave(&g).unwrap();
    assert!(matches!(net.send(&mut bob, proposal, None), Response::Accepted { .. }));
    assert_eq!(version(&mut net), v0 + 2, "a proposal kept in the state, and bob's membership ended");
    net.sync(&mut alice, &g);
    let commit = alice.member.commit_pending(&g).unwrap().into_request();
    net.ok(&alice, commit);
    alice.member.merge_pending(&g).unwrap();
    assert_eq!(version(&mut net), v0 + 3, "a commit (of a leaf whose membership had ended)");
    let commit = alice.member.remove(&g, &[carol.member.account()]).unwrap().into_request();
    net.ok(&alice, commit);
    assert_eq!(version(&mut net), v0 + 5, "a commit that ends carol's membership");
}

/// Nothing is verified off the writer for whom the writer would refuse
/// first: a device outside the group, a revoked member device, a message
/// for another epoch.
fn a_snapshot_is_taken_only_for_a_current_members_handshake_of_this_epoch() {
    let (mut net, mut alice, bob, _carol, g) = Net::trio();
    let mut eve = net.client(9);
    let epoch = alice.member.epoch(&g).unwrap();
    let (ac, bc) = (Caller::of(alice.member.certificate()), Caller::of(bob.member.certificate()));
    assert!(net.snapshot(ac, &g, epoch).is_some());
    assert!(net.snapshot(ac, &g, epoch + 1).is_none(), "another epoch");
    assert!(net.snapshot(Caller::of(eve.member.certificate()), &g, epoch).is_none(), "not a member");
    let mine = net.create(&mut eve);
    assert!(net.snapshot(ac, &mine, 0).is_none(), "not a member of that group");
    let now = net.now;
    net.revoke_device(&bob.member.device(), now);
    assert!(net.snapshot(bc, &g, epoch).is_none(), "revoked");
}

/// Red team, issue 37: a verdict serves only the message it was computed
/// for. With the verdict of bob's commit, the same commit with one byte of
/// its signature changed is refused as it would be alone.
fn a_verdict_serves_only_the_message_it_was_verified_for() {
    let (mut net, _alice, mut bob, _carol, g) = Net::trio();
    let epoch = bob.member.epoch(&g).unwrap();
    let bc = Caller::of(bob.member.certificate());
    let good = bob.member.self_update(&g).unwrap().into_request();
    let snapshot = net.snapshot(bc, &g, epoch).unwrap();
    let verdict = net.ds.prepare(bc, snapshot, &good).unwrap();
    assert!(verdict.verified());
    let Request::Send { message, welcome, group_info } = good else { panic!("a Send") };
    let mut forged = message;
    // The tail is the signature (64 bytes), the confirmation tag and the
    // membership tag (32 each), each length-prefixed: the server checks
    // the signature.
    let at = forged.len() - 100;
    forged[at] ^= 0xff;
    let bad = Request::Send { message: forged, welcome, group_info };
    let r = net.handle_with(bc, bad, Some(verdict));
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCommit, .. }), "{r:?}");
}

/// Red team, issue 37 (found there, older than it): a device that left (its
/// membership ended by its own Remove proposal, its leaf still in the tree)
/// may not act through that leaf, even while another device of its account
/// is a member: only an external commit may come from a device that is not
/// a member.
fn a_device_that_left_cannot_commit_as_a_member() {
    let mut net = Net::new();
    let mut bob = net.client(2);
    let mut carol = net.client(3);
    let account = crate::auth::Identity::generate().unwrap();
    let mut laptop = net.second_device(&account);
    let mut phone = net.second_device(&account);
    bob.member.set_removal_key(net.removal_key);
    let g = net.create(&mut bob);
    let Response::KeyPackages { packages } = net.ok(&bob, Request::ClaimKeyPackage { account: account.account_id().0 })
    else {
        panic!("packages")
    };
    let mut adds: Vec<_> = packages.iter().map(|p| (account.account_id(), p.clone())).collect();
    adds.push((carol.member.account(), net.claim(&bob, &carol)));
    let commit = bob.member.add(&g, &adds).unwrap();
    assert!(matches!(net.commit(&mut bob, commit), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    net.join(&mut laptop);
    net.join(&mut phone);
    net.join(&mut carol);
    // The laptop leaves: its membership ends at once.
    let leave = laptop.member.leave(&g).unwrap();
    assert!(matches!(net.send(&mut laptop, leave, None), Response::Accepted { .. }));
    assert!(!net.current_members(&g).contains(&laptop.member.device()));
    // It tries to remove carol with an ordinary member commit.
    let kick = laptop.member.remove(&g, &[carol.member.account()]).unwrap();
    let r = net.commit(&mut laptop, kick);
    assert!(matches!(r, Response::Error { code: ErrorCode::NotMember, .. }), "{r:?}");
    assert!(net.current_members(&g).contains(&carol.member.device()));
}

fn non_members_learn_nothing() {
    let mut net = Net::new();
    let (mut alice, mut eve) = (net.client(1), net.client(9));
    let g = net.create(&mut alice);
    net.text(&mut alice, &g, "secret");
    let missing = vec![7u8; 16];
    for group in [g.clone(), missing] {
        let requests = [
            Request::Fetch { group: group.clone(), after: 0, limit: 10 },
            Request::Ack { group: group.clone(), seq: 1 },
        ];
        for r in requests {
            assert_eq!(net.code(&eve, r).0, ErrorCode::NotMember);
        }
    }
    // Posting to her own group never touches alice's.
    let mine = net.create(&mut eve);
    let m = eve.member.encrypt(&mine, b"spam").unwrap();
    assert!(matches!(net.send(&mut eve, m, None), Response::Accepted { .. }));
    assert_eq!(net.log(&g).len(), 1);
    let Response::Welcomes { welcomes } = net.ok(&eve, Request::FetchWelcomes) else { panic!() };
    assert!(welcomes.is_empty());
}

fn removed_member_sees_its_removal_and_nothing_after() {
    let (mut net, mut alice, mut bob, mut carol, g) = Net::trio();
    let removal_epoch = alice.member.epoch(&g).unwrap();
    let commit = alice.member.remove(&g, &[carol.member.account()]).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    net.text(&mut alice, &g, "after carol left");
    // The group moves on; carol's list stays frozen at her removal.
    let commit = alice.member.commit_pending(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    let Response::Groups { groups } = net.ok(&carol, Request::ListGroups) else { panic!() };
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].epoch, groups[0].last_seq, groups[0].member), (removal_epoch, 2, false));
    let again = net.ok(&carol, Request::Fetch { group: g.clone(), after: 0, limit: 0 });
    assert!(
        matches!(again, Response::Messages { ref messages, .. } if messages.iter().all(|m| m.seq <= 2)),
        "{again:?}"
    );
    // Once she has read up to her removal, the group is gone for her.
    let got = net.sync(&mut carol, &g);
    assert!(matches!(got.as_slice(), [Received::Commit { removed_me: true, .. }]), "{got:?}");
    let Response::Groups { groups } = net.ok(&carol, Request::ListGroups) else { panic!() };
    assert!(groups.is_empty(), "{groups:?}");
    let (code, _) = net.code(&carol, Request::Fetch { group: g.clone(), after: 0, limit: 0 });
    assert_eq!(code, ErrorCode::NotMember);
    assert_eq!(texts(&net.sync(&mut bob, &g)), vec!["after carol left".to_string()]);
    assert_eq!(net.current_members(&g).len(), 2);
}

fn a_member_can_leave_by_proposal() {
    let mut net = Net::new();
    let (mut alice, mut bob) = (net.client(1), net.client(2));
    let g = net.create(&mut alice);
    net.add(&mut alice, &g, &[&bob]);
    net.join(&mut bob);
    let proposal = bob.member.leave(&g).unwrap();
    assert!(matches!(net.send(&mut bob, proposal, None), Response::Accepted { .. }));
    net.sync(&mut alice, &g);
    let commit = alice.member.commit_pending(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    assert_eq!(net.current_members(&g), vec![alice.member.device()]);
    assert_eq!(alice.member.members(&g), vec![alice.member.account()]);
}

/// Leaving ends a device's membership at once, in the same epoch: the
/// next message is not pushed to it, though the writer had cached the
/// group's members at that epoch (it did, keyed by the epoch alone).
fn a_device_that_left_gets_no_push_of_the_next_message() {
    let (mut net, mut alice, _bob, mut carol, g) = Net::trio();
    net.text(&mut alice, &g, "before carol leaves");
    let proposal = carol.member.leave(&g).unwrap();
    assert!(matches!(net.send(&mut carol, proposal, None), Response::Accepted { .. }));
    net.pushes.clear();
    // alice has not read the proposal yet: her message is for this epoch.
    net.text(&mut alice, &g, "after carol left");
    let recipients: Vec<&DeviceId> = net
        .pushes
        .iter()
        .filter_map(|p| match p {
            Notification::Message { recipients, .. } => Some(recipients.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(recipients.contains(&&alice.member.device()), "{recipients:?}");
    assert!(!recipients.contains(&&carol.member.device()), "{recipients:?}");
}

/// The operator's removal ends a membership at once, also when it cannot
/// propose the removal (the group does not list the server's current
/// removal key, so no new state is written), and it runs in a process of
/// its own, with a Delivery Service of its own: the serving writer's cached
/// members must not outlive it (red team, issue 37).
fn a_device_the_operator_removed_gets_no_push_of_the_next_message() {
    let (mut net, mut alice, _bob, carol, g) = Net::trio();
    net.text(&mut alice, &g, "before the operator removes carol");
    let version = net.group(&g).unwrap().version;
    let key = Arc::new(crate::auth::Identity::generate().unwrap());
    let mut operator = Delivery::with_quotas(Quotas::default(), key.public_key()).with_removal_signer(key);
    let (account, now) = (carol.member.account(), net.now);
    let removal = in_unit!(&mut net.store, s => operator.remove_membership(s, &g, &account, now)).unwrap();
    assert_eq!((removal.devices, removal.proposals), (1, 0), "ended without a proposal");
    assert!(net.group(&g).unwrap().version > version, "an ended membership advances the version");
    net.pushes.clear();
    net.text(&mut alice, &g, "after");
    let recipients: Vec<DeviceId> = net
        .pushes
        .iter()
        .filter_map(|p| match p {
            Notification::Message { recipients, .. } => Some(recipients.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(recipients.contains(&alice.member.device()), "{recipients:?}");
    assert!(!recipients.contains(&carol.member.device()), "{recipients:?}");
}

/// A commit that changes no membership leaves the group's revoked members
/// cached for the next commit, which proposes their removal again. A
/// device revoked in between (here by the operator's process, unable to
/// propose, so no state is written) must not be missed: the revocation
/// advances the version.
fn a_device_revoked_between_two_commits_is_proposed_for_removal() {
    let (mut net, mut alice, bob, _carol, g) = Net::trio();
    let commit = alice.member.self_update(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    let key = Arc::new(crate::auth::Identity::generate().unwrap());
    let mut operator = Delivery::with_quotas(Quotas::default(), key.public_key()).with_removal_signer(key);
    let (account, now) = (bob.member.account(), net.now);
    let removal = in_unit!(&mut net.store, s => operator.remove_account(s, &account, now)).unwrap();
    assert_eq!((removal.devices, removal.proposals), (1, 0), "revoked without a proposal");
    net.pushes.clear();
    let commit = alice.member.self_update(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    let messages = net.pushes.iter().filter(|p| matches!(p, Notification::Message { .. })).count();
    assert_eq!(messages, 2, "the commit, then the server's proposal to remove bob's revoked device");
}

/// A commit's writer keeps the members it leaves behind for the next one:
/// what it keeps is what the rows say, commit after commit (adds, removals,
/// self-updates), and every message goes to exactly those.
fn members_kept_across_commits_are_the_stored_ones() {
    let (mut net, mut alice, mut bob, mut carol, g) = Net::trio();
    for round in 0..3 {
        let commit = alice.member.self_update(&g).unwrap();
        assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
        alice.member.merge_pending(&g).unwrap();
        if round == 1 {
            let commit = alice.member.remove(&g, &[carol.member.account()]).unwrap();
            assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
            alice.member.merge_pending(&g).unwrap();
        }
        net.pushes.clear();
        net.text(&mut alice, &g, "hello");
        let mut stored = net.current_members(&g);
        stored.sort();
        let pushed: Vec<Vec<DeviceId>> = net
            .pushes
            .iter()
            .filter_map(|p| match p {
                Notification::Message { recipients, .. } => Some(recipients.to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(pushed, vec![stored], "round {round}");
    }
    net.sync(&mut bob, &g);
    net.sync(&mut carol, &g);
}

fn adds_need_server_issued_key_packages_and_a_matching_welcome() {
    let mut net = Net::new();
    let (mut alice, bob) = (net.client(1), net.client(2));
    let g = net.create(&mut alice);
    // A KeyPackage bob made but the server never handed out.
    let local = bob.member.key_packages(1).unwrap();
    let local: Vec<_> = local.into_iter().map(|p| (bob.member.account(), p)).collect();
    let commit = alice.member.add(&g, &local).unwrap();
    let r = net.commit(&mut alice, commit);
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCommit, .. }), "{r:?}");
    alice.member.discard_pending(&g).unwrap();
    // A claimed one, but no Welcome.
    let kp = net.claim(&alice, &bob);
    let mut commit = alice.member.add(&g, &[(bob.member.account(), kp)]).unwrap();
    commit.welcome = None;
    let r = net.commit(&mut alice, commit);
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidMessage, .. }), "{r:?}");
    assert_eq!(net.welcomes_waiting(), 0);
    assert!(net.log(&g).is_empty());
}

fn key_packages_are_validated_claimed_once_and_the_last_resort_kept() {
    let mut net = Net::new();
    let (alice, bob) = (net.client(1), net.client(2));
    // Garbage, and a package whose credential is someone else.
    let (code, detail) =
        net.code(&alice, Request::PublishKeyPackages { packages: vec![vec![1, 2, 3]], last_resort: None });
    assert_eq!((code, detail), (ErrorCode::InvalidKeyPackage, 0));
    let bobs = bob.member.key_packages(1).unwrap();
    let mut upload = alice.member.key_packages(1).unwrap();
    upload.extend(bobs);
    let (code, detail) = net.code(&alice, Request::PublishKeyPackages { packages: upload, last_resort: None });
    assert_eq!((code, detail), (ErrorCode::InvalidCredential, 1));
    assert_eq!(net.ok(&alice, Request::CountKeyPackages), Response::KeyPackageCount { count: 2, last_resort: true });
    // Two regular packages, then the last-resort one, which stays.
    let claims: Vec<Vec<u8>> = (0..4).map(|_| net.claim(&bob, &alice)).collect();
    assert_ne!(claims[0], claims[1]);
    assert_eq!(claims[2], claims[3]);
    assert!(!claims[..2].contains(&claims[2]));
    assert_eq!(net.ok(&alice, Request::CountKeyPackages), Response::KeyPackageCount { count: 0, last_resort: true });
}

fn claims_are_rate_limited_per_claimer() {
    let mut net = Net::new();
    let (alice, bob) = (net.client(1), net.client(2));
    net.now = 5_000_000;
    let mut limited = None;
    for i in 0..=CLAIM_BURST {
        let account = bob.member.account().0;
        let now = net.now;
        let out = net.handle(Caller::of(alice.member.certificate()), Request::ClaimKeyPackage { account }, now);
        if let Response::Error { code: ErrorCode::RateLimited, detail, .. } = out.response {
            limited = Some((i, detail));
            break;
        }
    }
    let (at, retry_ms) = limited.expect("never rate limited");
    assert_eq!(at, CLAIM_BURST);
    assert!(retry_ms > 0);
}

fn a_group_must_start_with_only_its_creator() {
    let mut net = Net::new();
    let (mut alice, bob) = (net.client(1), net.client(2));
    let g = alice.member.create_group(&net.removal_key).unwrap();
    // Bob uploads alice's group as his own: its id is bound to alice.
    let r =
        net.req(&bob, Request::CreateGroup { group_info: g.group_info.clone(), ratchet_tree: g.ratchet_tree.clone() });
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidMessage, .. }), "{r:?}");
    net.ok(&alice, Request::CreateGroup { group_info: g.group_info.clone(), ratchet_tree: g.ratchet_tree.clone() });
    let r = net.req(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    assert!(matches!(r, Response::Error { code: ErrorCode::GroupExists, .. }), "{r:?}");
}

#[derive(Debug, Clone)]
enum Op {
    Text(usize),
    Commit(usize),
    Probe(usize),
    Sync(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize).prop_map(Op::Text),
        1 => (0..3usize).prop_map(Op::Commit),
        1 => (0..2usize).prop_map(Op::Probe),
        2 => (0..3usize).prop_map(Op::Sync),
    ]
}

/// Random traffic from members and outsiders keeps the invariants:
/// sequences increase, outsiders get nothing, one commit per epoch, the
/// roster equals the MLS membership (8 random runs on each storage).
fn random_traffic_keeps_the_invariants() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 8, ..ProptestConfig::default() });
    let result = runner.run(&proptest::collection::vec(op(), 1..25), random_traffic);
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn random_traffic(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut net = Net::new();
    let mut members = [net.client(1), net.client(2), net.client(3)];
    let outsiders = [net.client(8), net.client(9)];
    let g = {
        let (first, rest) = members.split_at_mut(1);
        let g = net.create(&mut first[0]);
        net.add(&mut first[0], &g, &[&rest[0], &rest[1]]);
        net.join(&mut rest[0]);
        net.join(&mut rest[1]);
        g
    };
    let mut accepted_epochs: BTreeMap<u64, usize> = BTreeMap::new();
    let mut last_seq = 0;
    // Commits each member made since it last read: past 3, it reads first
    // (MLS keeps 3 past epochs' secrets, so a member that committed more
    // often without reading could no longer decrypt what came before its
    // commits; no invariant of the server). Below that, commits may be
    // stale and must be refused as such.
    let mut unread_commits = [0usize; 3];
    for op in ops {
        match op {
            Op::Text(i) => {
                let m = &mut members[i];
                net.sync(m, &g);
                unread_commits[i] = 0;
                let msg = m.member.encrypt(&g, b"hello").unwrap();
                if let Response::Accepted { seq, .. } = net.send(m, msg, None) {
                    prop_assert!(seq > last_seq);
                    last_seq = seq;
                }
            }
            Op::Commit(i) => {
                let m = &mut members[i];
                if unread_commits[i] >= 3 {
                    net.sync(m, &g);
                    unread_commits[i] = 0;
                }
                let epoch = m.member.epoch(&g).unwrap();
                let c = m.member.commit_pending(&g).unwrap();
                match net.commit(m, c) {
                    Response::Accepted { seq, .. } => {
                        unread_commits[i] += 1;
                        *accepted_epochs.entry(epoch).or_default() += 1;
                        prop_assert!(seq > last_seq);
                        last_seq = seq;
                        m.member.merge_pending(&g).unwrap();
                    }
                    Response::Error { code, .. } => {
                        prop_assert_eq!(code, ErrorCode::StaleEpoch);
                        m.member.discard_pending(&g).unwrap();
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            Op::Probe(i) => {
                let o = &outsiders[i];
                let (code, _) = net.code(o, Request::Fetch { group: g.clone(), after: 0, limit: 0 });
                prop_assert_eq!(code, ErrorCode::NotMember);
            }
            Op::Sync(i) => {
                net.sync(&mut members[i], &g);
                unread_commits[i] = 0;
            }
        }
    }
    prop_assert!(accepted_epochs.values().all(|n| *n == 1));
    for p in &net.pushes {
        if let Notification::Message { recipients, .. } = p {
            prop_assert!(recipients.iter().all(|r| outsiders.iter().all(|o| o.member.device() != *r)));
        }
    }
    for m in members.iter_mut() {
        net.sync(m, &g);
    }
    let mut roster = net.current_members(&g);
    roster.sort();
    let mut mls = members[0].member.devices(&g);
    mls.sort();
    prop_assert_eq!(roster, mls);
    let a = members[0].member.epoch_authenticator(&g);
    prop_assert!(members.iter_mut().all(|m| m.member.epoch_authenticator(&g) == a));
    Ok(())
}

fn net_with(quotas: Quotas) -> Net {
    let mut net = Net::new();
    net.ds = Delivery::with_quotas(quotas, net.removal_key);
    net
}

/// Red team (issue 37): a new group's tree of more than one node is
/// refused before any of it is verified (the refusal came only after
/// every leaf's signature and the parent hashes were checked, on the
/// writer, for a tree of up to half a megabyte sent again and again).
fn a_new_groups_tree_of_more_than_one_node_is_refused_unverified() {
    let mut net = Net::new();
    let mut alice = net.client(1);
    let g = alice.member.create_group(&net.removal_key).unwrap();
    // The tree's one node twice: its second copy's signature is over
    // another position, so verifying would refuse it as not verifying.
    let tree = &g.ratchet_tree;
    let (head, len) = match tree.first().map(|b| b >> 6) {
        Some(0) => (1, usize::from(tree[0] & 0x3f)),
        Some(1) => (2, usize::from(u16::from_be_bytes([tree[0] & 0x3f, tree[1]]))),
        other => panic!("a tree of {other:?}"),
    };
    assert_eq!(tree.len(), head + len);
    let doubled = 2 * len;
    assert!(doubled < 1 << 14);
    let mut twice = (u16::try_from(doubled).unwrap() | 0x4000).to_be_bytes().to_vec();
    twice.extend_from_slice(&tree[head..]);
    twice.extend_from_slice(&tree[head..]);
    let r = net.req(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: twice });
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InvalidCommit, message, .. } if message.contains("exactly one member")),
        "{r:?}"
    );
}

/// Red team (issue 37): a device that holds the most KeyPackages it may
/// is refused an upload before any package in it is verified (each
/// verification ran on the writer, for an upload sent again and again).
fn a_full_devices_upload_is_refused_before_its_packages_are_verified() {
    let mut net = Net::new();
    let alice = net.client(1);
    let held = 2; // `Net::client` publishes two and a last resort.
    let packages = alice.member.key_packages(crate::limits::MAX_KEY_PACKAGES - held).unwrap();
    net.ok(&alice, Request::PublishKeyPackages { packages, last_resort: None });
    // Not KeyPackages at all, only the classic suite's code where a
    // package names its suite: refused for the quota, not as invalid.
    let junk = vec![vec![0, 1, 0, 1, 0xff]; 3];
    let (code, _) = net.code(&alice, Request::PublishKeyPackages { packages: junk, last_resort: None });
    assert_eq!(code, ErrorCode::QuotaExceeded);
}

fn quotas_refuse_new_data_and_keep_what_is_stored() {
    let quotas =
        Quotas { max_members_per_group: 2, max_groups_per_account: 1, max_log_per_group: 3, ..Quotas::default() };
    let mut net = net_with(quotas);
    let (mut alice, mut bob, carol) = (net.client(1), net.client(2), net.client(3));
    let g = net.create(&mut alice);
    // One group per account.
    let other = alice.member.create_group(&net.removal_key).unwrap();
    let r = net.req(&alice, Request::CreateGroup { group_info: other.group_info, ratchet_tree: other.ratchet_tree });
    assert!(matches!(r, Response::Error { code: ErrorCode::QuotaExceeded, .. }), "{r:?}");
    // Two members at most: bob fits, carol does not.
    net.add(&mut alice, &g, &[&bob]);
    net.join(&mut bob);
    let kp = net.claim(&alice, &carol);
    let commit = alice.member.add(&g, &[(carol.member.account(), kp)]).unwrap();
    let r = net.commit(&mut alice, commit);
    assert!(matches!(r, Response::Error { code: ErrorCode::QuotaExceeded, .. }), "{r:?}");
    alice.member.discard_pending(&g).unwrap();
    assert_eq!(net.welcomes_waiting(), 0);
    // The log holds 3 messages (the add commit counts until acknowledged).
    net.text(&mut alice, &g, "one");
    net.text(&mut alice, &g, "two");
    let m = alice.member.encrypt(&g, b"three").unwrap();
    let r = net.send(&mut alice, m, None);
    assert!(matches!(r, Response::Error { code: ErrorCode::QuotaExceeded, .. }), "{r:?}");
    // Reads still work and nothing stored was lost.
    assert_eq!(texts(&net.sync(&mut bob, &g)), ["one", "two"]);
    // Once everyone acknowledged, there is room again.
    net.sync(&mut alice, &g);
    assert!(net.log(&g).is_empty());
    net.text(&mut alice, &g, "four");
    assert_eq!(texts(&net.sync(&mut bob, &g)), ["four"]);
}

fn a_full_store_refuses_writes_but_serves_reads() {
    let mut net = net_with(Quotas::default());
    let (mut alice, mut bob) = (net.client(1), net.client(2));
    let g = net.create(&mut alice);
    net.add(&mut alice, &g, &[&bob]);
    net.join(&mut bob);
    net.text(&mut alice, &g, "stored before the disk filled");
    let used = net.database_bytes();
    net.ds = Delivery::with_quotas(Quotas { max_database_bytes: used, ..Quotas::default() }, net.removal_key);
    let m = alice.member.encrypt(&g, b"no room").unwrap();
    let r = net.send(&mut alice, m, None);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::QuotaExceeded, message, .. } if message.contains("storage")),
        "{r:?}"
    );
    let packages = alice.member.key_packages(1).unwrap();
    let (code, _) = net.code(&alice, Request::PublishKeyPackages { packages, last_resort: None });
    assert_eq!(code, ErrorCode::QuotaExceeded);
    assert_eq!(texts(&net.sync(&mut bob, &g)), ["stored before the disk filled"]);
}

// ---- certified credentials (issue 12) ----

/// The genuine certificate of a client, as anyone can copy it from one of
/// its KeyPackages or leaves.
fn cert_of(c: &Client) -> Vec<u8> {
    c.member.certificate().encode()
}

/// The same certificate with one bit of its MLS key flipped: the signature
/// no longer verifies.
fn broken(cert: &[u8]) -> Vec<u8> {
    let mut b = cert.to_vec();
    b[70] ^= 1;
    b
}

fn a_key_package_carrying_another_devices_certificate_is_refused() {
    let mut net = Net::new();
    let (alice, bob) = (net.client(1), net.client(2));
    for claimed in [cert_of(&bob), broken(&cert_of(&alice)), cert_of(&alice)] {
        // The forger's own signature key under someone's certificate (or
        // under alice's own, which certifies another MLS key).
        let forger = Member::forger(claimed).unwrap();
        let packages = forger.key_packages(1).unwrap();
        let (code, detail) = net.code(&alice, Request::PublishKeyPackages { packages, last_resort: None });
        assert_eq!((code, detail), (ErrorCode::InvalidCredential, 0));
    }
    // Bob's genuine package, uploaded by alice's device.
    let packages = bob.member.key_packages(1).unwrap();
    let (code, _) = net.code(&alice, Request::PublishKeyPackages { packages, last_resort: None });
    assert_eq!(code, ErrorCode::InvalidCredential);
}

fn a_group_must_list_the_server_and_start_with_a_certified_leaf() {
    let mut net = Net::new();
    let (mut alice, _bob) = (net.client(1), net.client(2));
    // Without the server's removal key as external sender.
    let other_key = crate::auth::Identity::generate().unwrap().public_key();
    let g = alice.member.create_group(&other_key).unwrap();
    let (code, _) = net.code(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    assert_eq!(code, ErrorCode::InvalidCommit);
    // A leaf claiming alice's certificate with another key.
    let mut forger = Member::forger(cert_of(&alice)).unwrap();
    let id = mls::group_id_for(&alice.member.account(), b"forged");
    let g = forger.create_group_with_id(&net.removal_key, &id).unwrap();
    let (code, detail) =
        net.code(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    assert_eq!((code, detail), (ErrorCode::InvalidCredential, 0));
}

fn a_member_cannot_take_another_members_identity() {
    let mut net = Net::new();
    let (mut alice, mut bob, mut mallory) = (net.client(1), net.client(2), net.client(3));
    let g = net.create(&mut alice);
    net.add(&mut alice, &g, &[&mallory]);
    net.join(&mut mallory);
    net.add(&mut alice, &g, &[&bob]);
    net.join(&mut bob);
    net.sync(&mut mallory, &g);
    let epoch = mallory.member.epoch(&g).unwrap();
    let roster = net.current_members(&g);
    for claimed in [cert_of(&bob), broken(&cert_of(&bob))] {
        // A commit moving mallory's leaf to bob's certificate.
        let commit = mallory.member.impersonating_update(&g, claimed.clone()).unwrap();
        let r = net.send(&mut mallory, commit.clone(), None);
        assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCredential, .. }), "{r:?}");
        mallory.member.discard_pending(&g).unwrap();
        // The same commit handed straight to a client (a server that lets it
        // through): refused, nothing applied.
        let before = alice.member.epoch_authenticator(&g);
        match alice.member.receive(&g, &commit).unwrap() {
            Received::Refused { reason, .. } => {
                assert!(reason.contains("certified") || reason.contains("whose"), "{reason}")
            }
            other => panic!("a client accepted an impersonating commit: {other:?}"),
        }
        assert_eq!(alice.member.epoch_authenticator(&g), before);
        // As a proposal.
        let proposal = mallory.member.impersonating_proposal(&g, claimed).unwrap();
        let r = net.send(&mut mallory, proposal.clone(), None);
        assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCredential, .. }), "{r:?}");
        assert!(matches!(alice.member.receive(&g, &proposal).unwrap(), Received::Refused { .. }));
    }
    assert_eq!(net.current_members(&g), roster);
    assert_eq!(mallory.member.epoch(&g), Some(epoch));
    // The group still works: an honest commit and a message.
    let commit = alice.member.commit_pending(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    net.sync(&mut bob, &g);
    net.text(&mut alice, &g, "still us");
    assert_eq!(texts(&net.sync(&mut bob, &g)), ["still us"]);
}

fn a_commit_adding_a_forged_key_package_is_refused_by_server_and_client() {
    let mut net = Net::new();
    let (mut alice, mut bob) = (net.client(1), net.client(2));
    let g = net.create(&mut alice);
    net.add(&mut alice, &g, &[&bob]);
    net.join(&mut bob);
    // Someone's key under carol's... under bob's certificate.
    let forger = Member::forger(cert_of(&bob)).unwrap();
    let forged = forger.key_packages(1).unwrap();
    // An honest client refuses to build it.
    assert!(alice.member.add(&g, &[(bob.member.account(), forged[0].clone())]).is_err());
    // A malicious one builds it anyway; the server refuses it.
    let commit = alice.member.add_unchecked(&g, &forged).unwrap();
    let (code, _) = net.code(&alice, commit.clone().into_request());
    assert!(matches!(code, ErrorCode::InvalidCredential | ErrorCode::InvalidCommit), "{code:?}");
    alice.member.discard_pending(&g).unwrap();
    // And a client that is handed it refuses it.
    assert!(matches!(bob.member.receive(&g, &commit.message).unwrap(), Received::Refused { .. }));
}

fn groups_an_account_is_added_to_count_against_its_quota() {
    let mut net = net_with(Quotas { max_groups_per_account: 1, ..Quotas::default() });
    let (mut alice, mut bob) = (net.client(1), net.client(2));
    let g = net.create(&mut alice);
    // Bob may be in one group: his own. Alice cannot add him to hers, and
    // she learns why.
    net.create(&mut bob);
    let kp = net.claim(&alice, &bob);
    let commit = alice.member.add(&g, &[(bob.member.account(), kp)]).unwrap();
    let r = net.req(&alice, commit.into_request());
    let Response::Error { code: ErrorCode::QuotaExceeded, message, .. } = r else { panic!("{r:?}") };
    assert!(message.contains(&bob.member.account().short()), "{message}");
    alice.member.discard_pending(&g).unwrap();
    assert_eq!(net.welcomes_waiting(), 0);
}

impl Net {
    /// Reads `group` like the app: a commit `who` cannot process makes it
    /// rejoin from the stored GroupInfo. Returns whether it rejoined.
    fn sync_repairing(&mut self, who: &mut Client, group: &[u8]) -> bool {
        if !self.read(who, group).last().is_some_and(Read::stuck) {
            return false;
        }
        let Response::GroupInfo { group_info, ratchet_tree, .. } =
            self.ok(who, Request::FetchGroupInfo { group: group.to_vec() })
        else {
            panic!()
        };
        let commit = who.member.resync(group, &group_info, ratchet_tree.as_deref(), None).unwrap();
        let Response::Accepted { seq, .. } = self.commit(who, commit) else { panic!("resync refused") };
        who.log(group).skip_to(seq);
        true
    }
}

fn a_commit_nobody_can_process_is_accepted_and_every_member_rejoins_past_it() {
    let (mut net, mut alice, mut bob, mut mallory, g) = Net::trio();
    let roster = net.current_members(&g);
    let mut bad = mallory.member.self_update(&g).unwrap();
    bad.corrupt_membership_tag();
    assert!(matches!(net.commit(&mut mallory, bad), Response::Accepted { .. }));
    mallory.member.merge_pending(&g).unwrap();
    assert!(net.sync_repairing(&mut alice, &g), "alice processed a corrupted commit");
    assert!(net.sync_repairing(&mut bob, &g), "bob processed a corrupted commit");
    // Each read the other's rejoin; nobody was added or lost on the way.
    assert!(!net.sync_repairing(&mut alice, &g));
    assert!(!net.sync_repairing(&mut mallory, &g));
    let mut now = net.current_members(&g);
    now.sort();
    let mut before = roster.clone();
    before.sort();
    assert_eq!(now, before);
    let auth = alice.member.epoch_authenticator(&g);
    assert_eq!(auth, bob.member.epoch_authenticator(&g));
    assert_eq!(auth, mallory.member.epoch_authenticator(&g));
    // And the group goes on: alice removes mallory, bob reads it.
    let commit = alice.member.remove(&g, &[mallory.member.account()]).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    assert!(!net.sync_repairing(&mut bob, &g));
    assert_eq!(alice.member.epoch_authenticator(&g), bob.member.epoch_authenticator(&g));
}

/// The tree handed out beside a GroupInfo that leaves it out (every
/// commit that adds nobody) is the one of that GroupInfo's epoch: the
/// reader keeps it per epoch and state version, never longer, and a member
/// who missed the commits rejoins from the two.
fn the_tree_handed_out_with_a_group_info_is_its_epochs() {
    let (mut net, mut alice, mut bob, carol, g) = Net::trio();
    let fetch = |net: &mut Net, who: &Client| {
        let Response::GroupInfo { group_info, ratchet_tree, .. } =
            net.ok(who, Request::FetchGroupInfo { group: g.clone() })
        else {
            panic!()
        };
        (group_info, ratchet_tree.expect("a self-update's GroupInfo comes with the server's tree"))
    };
    let update = alice.member.self_update(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, update), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    let (_, first) = fetch(&mut net, &bob);
    assert_eq!(fetch(&mut net, &carol).1, first);
    let update = alice.member.self_update(&g).unwrap();
    assert!(matches!(net.commit(&mut alice, update), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    let (info, second) = fetch(&mut net, &bob);
    assert_ne!(first, second, "the tree of the epoch before");
    let rejoin = bob.member.resync(&g, &info, Some(&second), None).unwrap();
    assert!(matches!(net.commit(&mut bob, rejoin), Response::Accepted { .. }));
}

fn commits_carry_the_group_info_of_exactly_their_epoch_and_only_members_read_it() {
    let mut net = Net::new();
    let (mut alice, mut bob, eve) = (net.client(1), net.client(2), net.client(3));
    let g = net.create(&mut alice);
    // The creator's GroupInfo is kept from the start.
    let Response::GroupInfo { group_info: first, ratchet_tree, .. } =
        net.ok(&alice, Request::FetchGroupInfo { group: g.clone() })
    else {
        panic!()
    };
    assert!(ratchet_tree.is_some(), "a GroupInfo without its tree comes with the server's");
    net.add(&mut alice, &g, &[&bob]);
    net.join(&mut bob);
    let (code, _) = net.code(&eve, Request::FetchGroupInfo { group: g.clone() });
    assert_eq!(code, ErrorCode::NotMember);
    let (code, _) = net.code(&eve, Request::FetchGroupInfo { group: vec![7; 32] });
    assert_eq!(code, ErrorCode::NotMember, "a missing group answers like a foreign one");
    // Without a GroupInfo, with one of an earlier epoch, with another
    // member's: refused, and nothing changes.
    let epoch = net.group(&g).unwrap().epoch;
    let mut c = alice.member.self_update(&g).unwrap();
    let info = c.group_info.clone();
    let r = net.send(&mut alice, c.message.clone(), None);
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidMessage, .. }), "{r:?}");
    c.group_info = first;
    let r = net.commit(&mut alice, c.clone());
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCommit, .. }), "{r:?}");
    alice.member.discard_pending(&g).unwrap();
    let mut bobs = bob.member.self_update(&g).unwrap();
    bob.member.discard_pending(&g).unwrap();
    std::mem::swap(&mut bobs.group_info, &mut c.group_info);
    let r = net.commit(&mut alice, c.clone());
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCommit, .. }), "{r:?}");
    assert_eq!(net.group(&g).unwrap().epoch, epoch);
    // A GroupInfo on an application message or a proposal: refused.
    let m = alice.member.encrypt(&g, b"x").unwrap();
    let r = net.send_request(&mut alice, Request::Send { message: m, welcome: None, group_info: Some(info) });
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidMessage, .. }), "{r:?}");
}

fn what_the_server_refuses_of_mls_is_typed() {
    use mls::MlsRefusal;
    assert!(matches!(mls::frame(b"junk"), Err(MlsRefusal::Undecodable { what: "MLS message", .. })));
    let mut net = Net::new();
    let mut alice = net.client(1);
    let g = alice.member.create_group(&net.removal_key).unwrap();
    assert!(matches!(mls::frame(&g.group_info), Err(MlsRefusal::NotAGroupMessage)));
    net.ok(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    let commit = alice.member.self_update(&g.id).unwrap();
    assert!(matches!(mls::parse_group_info(&commit.message), Err(MlsRefusal::NotAGroupInfo)));
    assert!(mls::parse_group_info(&commit.group_info).is_ok());
}

fn what_a_member_refuses_to_join_or_rejoin_is_typed() {
    use crate::client::mls::MlsError;
    let mut net = Net::new();
    let (alice, mut bob) = (net.client(1), net.client(2));
    // A forger's group whose only leaf claims alice, inviting bob.
    let mut forger = Member::forger(cert_of(&alice)).unwrap();
    let g = forger.create_group(&net.removal_key).unwrap();
    let kp = net.claim(&alice, &bob);
    let forged = forger.add_unchecked(&g.id, &[kp]).unwrap();
    let e = bob.member.join(forged.welcome.as_ref().unwrap()).unwrap_err();
    assert!(matches!(e, MlsError::UncertifiedLeaf { action: "join", leaf: 0, .. }), "{e}");
    // A GroupInfo of one group offered to rejoin another.
    let own = net.create(&mut bob);
    let e = bob.member.resync(&own, &g.group_info, Some(&g.ratchet_tree), None).unwrap_err();
    assert!(matches!(e, MlsError::OtherGroup), "{e}");
    let e = bob.member.resync(&g.id, &g.group_info, Some(&g.ratchet_tree), None).unwrap_err();
    assert!(matches!(e, MlsError::UncertifiedLeaf { action: "rejoin", leaf: 0, .. }), "{e}");
}

mod registration {
    use super::super::memory::MemoryStore;
    use super::super::storage::InviteRecord;
    use super::super::*;
    use crate::auth::{DeviceCertificate, DeviceId, Identity, InviteToken};
    use crate::wire::{ErrorCode, Request, Response};

    fn cert(owner: &Identity, n: u8) -> DeviceCertificate {
        DeviceCertificate::issue(owner, DeviceId([n; 32]), [n; 32], 1)
    }

    fn invite(store: &mut MemoryStore, uses: u32, expires_at: Option<u64>) -> InviteToken {
        let token = InviteToken::generate().unwrap();
        let record = InviteRecord::new(&token, uses, expires_at, 10);
        store.insert_invite(&record).unwrap();
        token
    }

    /// Registers `cert` from a connection that authenticated with its key.
    fn register(
        ds: &mut Delivery,
        store: &mut MemoryStore,
        cert: &DeviceCertificate,
        invite: Option<&InviteToken>,
        now: u64,
    ) -> Result<Outcome, ErrorCode> {
        let request = Request::Register { invite: invite.map(|t| t.to_string()), certificate: cert.encode() };
        let outcome = ds.handle(store, Origin::Stranger(cert.device), request, now);
        match outcome.response {
            Response::Error { code, .. } => Err(code),
            _ => Ok(outcome),
        }
    }

    fn created(outcome: Result<Outcome, ErrorCode>) -> Result<bool, ErrorCode> {
        outcome.map(|o| matches!(o.response, Response::Registered { created: true }))
    }

    fn ds() -> Delivery {
        Delivery::new(86_400, [7; 32])
    }

    #[test]
    fn invite_uses_expiry_and_reregistration() {
        let (mut ds, mut store) = (ds(), MemoryStore::default());
        let token = invite(&mut store, 1, Some(100));
        let (a, b) = (cert(&Identity::generate().unwrap(), 1), cert(&Identity::generate().unwrap(), 2));
        assert_eq!(created(register(&mut ds, &mut store, &a, None, 20)), Err(ErrorCode::InviteRequired));
        let outcome = register(&mut ds, &mut store, &a, Some(&token), 20).unwrap();
        assert!(matches!(outcome.response, Response::Registered { created: true }) && outcome.wrote);
        assert_eq!(outcome.registered, Some(Caller::of(&a)), "the connection now acts as the device");
        // Registering again is harmless and spends nothing, with or without the invite.
        assert_eq!(created(register(&mut ds, &mut store, &a, Some(&token), 20)), Ok(false));
        assert_eq!(created(register(&mut ds, &mut store, &a, None, 20)), Ok(false));
        assert_eq!(created(register(&mut ds, &mut store, &b, Some(&token), 20)), Err(ErrorCode::InviteUsedUp));
        let token2 = invite(&mut store, 5, Some(100));
        assert_eq!(created(register(&mut ds, &mut store, &b, Some(&token2), 100)), Err(ErrorCode::InviteExpired));
        let unknown = InviteToken::generate().unwrap();
        assert_eq!(created(register(&mut ds, &mut store, &b, Some(&unknown), 20)), Err(ErrorCode::InviteUnknown));
        assert_eq!(store.accounts().unwrap().len(), 1);
        assert_eq!(store.device(&a.device).unwrap().unwrap().account, a.account);
        assert!(store.device(&b.device).unwrap().is_none());
        // A registered device asks for its status; a stranger is told to register.
        let status = ds.handle(&mut store, Caller::of(&a), Request::Status, 30).response;
        assert!(
            matches!(status, Response::Status { registered_at: 20, server_time: 30, removal_key, .. } if removal_key == [7; 32])
        );
        let refused = ds.handle(&mut store, Origin::Stranger(b.device), Request::Status, 30).response;
        assert!(matches!(refused, Response::Error { code: ErrorCode::NotRegistered, .. }));
    }

    #[test]
    fn open_registration_needs_no_invite() {
        let mut ds = Delivery::with_quotas(Quotas { invite_required: false, ..Quotas::default() }, [7; 32]);
        let mut store = MemoryStore::default();
        let a = cert(&Identity::generate().unwrap(), 1);
        assert_eq!(created(register(&mut ds, &mut store, &a, None, 20)), Ok(true));
    }

    #[test]
    fn a_second_certificate_or_someone_elses_certificate_is_refused_a_further_device_is_not() {
        let (mut ds, mut store) = (ds(), MemoryStore::default());
        let token = invite(&mut store, 10, None);
        let owner = Identity::generate().unwrap();
        let first = cert(&owner, 1);
        assert_eq!(created(register(&mut ds, &mut store, &first, Some(&token), 20)), Ok(true));
        // A further device the account key certified (a restored home):
        // registered into the account, no invite spent, within the caps.
        let second = cert(&owner, 2);
        assert_eq!(created(register(&mut ds, &mut store, &second, None, 20)), Ok(false));
        assert_eq!(store.devices_of(&AccountId(owner.public_key())).unwrap().len(), 2);
        for n in 3..=crate::limits::MAX_DEVICES_PER_ACCOUNT {
            let c = cert(&owner, u8::try_from(n).unwrap());
            assert_eq!(created(register(&mut ds, &mut store, &c, None, 20)), Ok(false), "device {n}");
        }
        let one_too_many = cert(&owner, 200);
        assert_eq!(created(register(&mut ds, &mut store, &one_too_many, None, 20)), Err(ErrorCode::QuotaExceeded));
        // An account the operator removed takes no device.
        store.remove_account(&AccountId(owner.public_key()), 30).unwrap();
        let after = cert(&owner, 201);
        assert_eq!(created(register(&mut ds, &mut store, &after, None, 40)), Err(ErrorCode::Revoked));
        let other_key = DeviceCertificate::issue(&owner, DeviceId([1; 32]), [3; 32], 1);
        assert_eq!(
            created(register(&mut ds, &mut store, &other_key, Some(&token), 20)),
            Err(ErrorCode::InvalidCredential)
        );
        // A certificate for another key than the connection's.
        let theirs = cert(&Identity::generate().unwrap(), 4);
        let request = Request::Register { invite: Some(token.to_string()), certificate: theirs.encode() };
        let r = ds.handle(&mut store, Origin::Stranger(DeviceId([5; 32])), request, 20).response;
        assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCredential, .. }));
        let garbage = Request::Register { invite: Some(token.to_string()), certificate: vec![1, 2, 3] };
        let r = ds.handle(&mut store, Origin::Stranger(DeviceId([5; 32])), garbage, 20).response;
        assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCredential, .. }));
        assert_eq!(store.invite(&token.id()).unwrap().unwrap().uses_left, 9, "only the one success spent a use");
    }

    #[test]
    fn right_id_wrong_secret_is_unknown() {
        let (mut ds, mut store) = (ds(), MemoryStore::default());
        let token = invite(&mut store, 1, None);
        let text = token.to_string();
        // Same id (first 8 bytes = first 12.8 symbols), different secret.
        let mut forged: Vec<char> = text.chars().collect();
        forged[20] = if forged[20] == 'a' { 'b' } else { 'a' };
        let forged: InviteToken = forged.into_iter().collect::<String>().parse().unwrap();
        assert_eq!(forged.id(), token.id());
        let c = cert(&Identity::generate().unwrap(), 3);
        assert_eq!(created(register(&mut ds, &mut store, &c, Some(&forged), 20)), Err(ErrorCode::InviteUnknown));
        assert_eq!(store.invite(&token.id()).unwrap().unwrap().uses_left, 1);
    }
}

/// A person is added with all their devices; a revoked device is refused
/// at once and, through the server's own removal proposal, leaves the
/// group with the next member commit.
fn whole_accounts_are_added_and_revoked_devices_leave_with_the_next_commit() {
    let mut net = Net::new();
    let mut bob = net.client(2);
    let account = crate::auth::Identity::generate().unwrap();
    let laptop_key = crate::auth::Identity::generate().unwrap();
    let mut laptop = Client {
        member: Member::new(&account, crate::auth::DeviceId(laptop_key.public_key())).unwrap(),
        logs: HashMap::new(),
    };
    net.enrol(laptop.member.certificate());
    let packages = laptop.member.key_packages(3).unwrap();
    net.ok(&laptop, Request::PublishKeyPackages { packages, last_resort: Some(2) });
    let mut phone = net.second_device(&account);
    bob.member.set_removal_key(net.removal_key);
    let g = net.create(&mut bob);

    // One claim returns a package per device; adding only one is refused.
    let Response::KeyPackages { packages } = net.ok(&bob, Request::ClaimKeyPackage { account: account.account_id().0 })
    else {
        panic!()
    };
    assert_eq!(packages.len(), 2);
    let one = vec![(account.account_id(), packages[0].clone())];
    let partial = bob.member.add(&g, &one).unwrap();
    match net.commit(&mut bob, partial) {
        Response::Error { code: ErrorCode::InvalidCommit, message, .. } => {
            assert!(message.contains("only some devices"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    bob.member.discard_pending(&g).unwrap();
    let both: Vec<_> = packages.iter().map(|p| (account.account_id(), p.clone())).collect();
    let commit = bob.member.add(&g, &both).unwrap();
    assert!(matches!(net.commit(&mut bob, commit), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    net.join(&mut laptop);
    net.join(&mut phone);

    // The account key revokes the laptop, from the phone.
    let revocation = crate::auth::DeviceRevocation::issue(&account, laptop.member.device(), net.now);
    net.pushes.clear();
    net.ok(&phone, Request::RevokeDevice { revocation: revocation.encode() });
    assert!(net.pushes.contains(&Notification::Revoked { device: laptop.member.device() }));
    assert_eq!(net.code(&laptop, Request::ListGroups).0, ErrorCode::Revoked);
    let Response::Devices { devices } = net.ok(&phone, Request::ListDevices) else { panic!() };
    assert_eq!(devices.iter().filter(|d| d.revoked).count(), 1);
    // Someone else's revocation, or one for another account's device, is refused.
    let forged = crate::auth::DeviceRevocation::issue(&account, bob.member.device(), net.now);
    assert_eq!(net.code(&phone, Request::RevokeDevice { revocation: forged.encode() }).0, ErrorCode::InvalidCredential);

    // bob, who has not read the proposal yet, commits something else first:
    // the proposal dies with its epoch, so the server proposes again in the
    // new one.
    let update = bob.member.self_update(&g).unwrap();
    net.pushes.clear();
    assert!(matches!(net.commit(&mut bob, update), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    assert_eq!(net.pushes.len(), 2, "the commit and the new proposal: {:?}", net.pushes.len());
    // bob reads the server's proposal of his epoch (the old one is of an
    // epoch he left) and commits it; the laptop is out.
    let reads = net.read(&mut bob, &g);
    let removals: Vec<_> = reads
        .iter()
        .filter_map(|r| match r {
            Read::Received { received: Received::ServerRemoval { account }, .. } => Some(*account),
            _ => None,
        })
        .collect();
    assert_eq!(removals, vec![Some(account.account_id())]);
    assert!(!reads.iter().any(Read::stuck));
    assert!(bob.member.should_commit_pending(&g));
    let commit = bob.member.commit_pending(&g).unwrap();
    assert!(matches!(net.commit(&mut bob, commit), Response::Accepted { .. }));
    bob.member.merge_pending(&g).unwrap();
    let current = net.current_members(&g);
    assert!(!current.contains(&laptop.member.device()) && current.contains(&phone.member.device()));
    phone.member.set_removal_key(net.removal_key);
    net.sync(&mut phone, &g);
    assert_eq!(phone.member.epoch_authenticator(&g), bob.member.epoch_authenticator(&g));
}

/// The server's side of linking: one offer per link, from a key that is
/// not a device; the answer only from the link's account, certifying
/// exactly the key that offered; links expire and are capped per account.
fn links_are_single_use_expire_and_certify_only_the_offering_key() {
    use crate::auth::{DeviceCertificate, DeviceId, Identity};
    let mut net = Net::new();
    let account = Identity::generate().unwrap();
    let first = net.device_of(&account);
    let stranger = net.client(9);
    let link = [5u8; 16];
    let new_key = DeviceId([6; 32]);
    let stranger_origin = Origin::Stranger(new_key);
    let as_stranger = |net: &mut Net, request: Request| {
        net.now += 1;
        let now = net.now;
        net.handle(stranger_origin, request, now).response
    };
    let code = |r: &Response| match r {
        Response::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    };

    assert_eq!(net.code(&first, Request::LinkOpen { link, expires_in: 0 }).0, ErrorCode::Malformed);
    assert_eq!(net.code(&first, Request::LinkOpen { link, expires_in: 10_000 }).0, ErrorCode::Malformed);
    net.ok(&first, Request::LinkOpen { link, expires_in: 600 });
    assert_eq!(net.code(&first, Request::LinkOpen { link, expires_in: 600 }).0, ErrorCode::LinkUsed);
    assert!(matches!(net.ok(&first, Request::LinkFetch { link }), Response::LinkPending));
    // Another account does not see the link; a device cannot offer.
    assert_eq!(net.code(&stranger, Request::LinkFetch { link }).0, ErrorCode::LinkUnknown);
    assert_eq!(net.code(&stranger, Request::LinkOffer { link, offer: vec![1] }).0, ErrorCode::InvalidCredential);
    assert_eq!(
        code(&as_stranger(&mut net, Request::LinkOffer { link: [0; 16], offer: vec![1] })),
        ErrorCode::LinkUnknown
    );
    assert!(matches!(as_stranger(&mut net, Request::LinkOffer { link, offer: vec![1, 2, 3] }), Response::Done));
    assert_eq!(code(&as_stranger(&mut net, Request::LinkOffer { link, offer: vec![4] })), ErrorCode::LinkUsed);
    assert!(matches!(net.ok(&first, Request::LinkFetch { link }), Response::LinkOffer { offer } if offer == [1, 2, 3]));
    assert!(matches!(as_stranger(&mut net, Request::LinkResult { link }), Response::LinkPending));

    // The certificate must be for the key that offered, by this account.
    let wrong_key = DeviceCertificate::issue(&account, DeviceId([7; 32]), [1; 32], net.now).encode();
    let answer = |certificate: Vec<u8>| Request::LinkAnswer { link, certificate, bundle: vec![9; 40] };
    assert_eq!(net.code(&first, answer(wrong_key)).0, ErrorCode::InvalidCredential);
    let other_account = DeviceCertificate::issue(&Identity::generate().unwrap(), new_key, [1; 32], net.now).encode();
    assert_eq!(net.code(&first, answer(other_account)).0, ErrorCode::InvalidCredential);
    let good = DeviceCertificate::issue(&account, new_key, [1; 32], net.now).encode();
    net.ok(&first, answer(good.clone()));
    assert_eq!(net.code(&first, answer(good.clone())).0, ErrorCode::LinkUsed);
    match as_stranger(&mut net, Request::LinkResult { link }) {
        Response::Linked { certificate, bundle } => assert!(certificate == good && bundle == [9; 40]),
        other => panic!("{other:?}"),
    }
    // Only the offering key learns the answer; the new device is a device.
    let Response::Devices { devices } = net.ok(&first, Request::ListDevices) else { panic!() };
    assert_eq!(devices.len(), 2);
    assert_eq!(net.code(&stranger, Request::LinkResult { link }).0, ErrorCode::LinkUnknown);

    // Expiry, and at most MAX_OPEN_LINKS open.
    net.ok(&first, Request::LinkOpen { link: [1; 16], expires_in: 5 });
    net.now += 10;
    assert_eq!(
        code(&as_stranger(&mut net, Request::LinkOffer { link: [1; 16], offer: vec![1] })),
        ErrorCode::LinkExpired
    );
    // The first link is still open (the answered one), the expired one is not.
    for i in 1..crate::limits::MAX_OPEN_LINKS {
        net.ok(&first, Request::LinkOpen { link: [20 + i as u8; 16], expires_in: 600 });
    }
    assert_eq!(net.code(&first, Request::LinkOpen { link: [99; 16], expires_in: 600 }).0, ErrorCode::QuotaExceeded);
    let later = net.now + 601;
    net.expire(later);
    assert!(net.link(&link).is_none(), "expired links are deleted");
}

/// An account's device list always fits its response: at most 64 devices
/// ever (revoked ones count), 16 at once.
fn devices_are_capped_at_once_and_ever() {
    use crate::auth::{DeviceCertificate, DeviceId, Identity};
    use crate::limits::{MAX_DEVICES_EVER, MAX_DEVICES_PER_ACCOUNT};
    let mut net = Net::new();
    let account = Identity::generate().unwrap();
    let first = net.device_of(&account);
    for i in 1..MAX_DEVICES_PER_ACCOUNT {
        net.enrol(&DeviceCertificate::issue(&account, DeviceId([i as u8; 32]), [1; 32], 1));
    }
    assert_eq!(net.code(&first, Request::LinkOpen { link: [1; 16], expires_in: 60 }).0, ErrorCode::QuotaExceeded);
    for i in MAX_DEVICES_PER_ACCOUNT..MAX_DEVICES_EVER {
        let d = DeviceId([i as u8; 32]);
        net.enrol(&DeviceCertificate::issue(&account, d, [1; 32], 1));
        net.revoke_device(&d, 2);
    }
    let Response::Devices { devices } = net.ok(&first, Request::ListDevices) else { panic!() };
    assert_eq!(devices.len(), MAX_DEVICES_EVER);
    assert!(Response::Devices { devices }.encode().is_ok());
    net.revoke_device(&DeviceId([1; 32]), 3);
    let (code, _) = net.code(&first, Request::LinkOpen { link: [2; 16], expires_in: 60 });
    assert_eq!(code, ErrorCode::QuotaExceeded, "64 devices ever, even with one slot free now");
}

/// Issue 29, finding 9: the device caps were checked when a link was
/// opened, not when it was answered, so links opened under the caps could
/// all be answered and take the account past them. Both caps (devices at
/// once, devices ever) now hold when the device is certified.
fn issue_29_links_answered_together_stay_within_the_device_caps() {
    use crate::auth::{DeviceCertificate, DeviceId, Identity};
    use crate::limits::{MAX_DEVICES_EVER, MAX_DEVICES_PER_ACCOUNT};

    /// Opens one link per new key (all under the caps), has each key offer,
    /// then answers them in turn; returns how many answers were refused
    /// for the quota, asserting the rest succeed.
    fn answer_all(net: &mut Net, account: &Identity, first: &Client, keys: &[u8]) -> usize {
        for k in keys {
            net.ok(first, Request::LinkOpen { link: [*k; 16], expires_in: 600 });
        }
        for k in keys {
            net.now += 1;
            let offer = Request::LinkOffer { link: [*k; 16], offer: vec![1] };
            let now = net.now;
            let r = net.handle(Origin::Stranger(DeviceId([*k; 32])), offer, now).response;
            assert!(matches!(r, Response::Done), "{r:?}");
        }
        let mut refused = 0;
        for k in keys {
            let certificate = DeviceCertificate::issue(account, DeviceId([*k; 32]), [1; 32], net.now).encode();
            match net.req(first, Request::LinkAnswer { link: [*k; 16], certificate, bundle: vec![9] }) {
                Response::Done => {}
                Response::Error { code: ErrorCode::QuotaExceeded, .. } => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        refused
    }
    let current = |net: &mut Net, account: &Identity| {
        let all = net.devices_of(&account.account_id());
        (all.iter().filter(|(_, d)| d.revoked_at.is_none()).count(), all.len())
    };

    // One slot free at once: two links open, one answer certifies.
    let mut net = Net::new();
    let account = Identity::generate().unwrap();
    let first = net.device_of(&account);
    for i in 1..MAX_DEVICES_PER_ACCOUNT - 1 {
        net.enrol(&DeviceCertificate::issue(&account, DeviceId([i as u8; 32]), [1; 32], 1));
    }
    assert_eq!(answer_all(&mut net, &account, &first, &[200, 201, 202]), 2);
    assert_eq!(current(&mut net, &account).0, MAX_DEVICES_PER_ACCOUNT);

    // One slot free ever: likewise.
    let mut net = Net::new();
    let account = Identity::generate().unwrap();
    let first = net.device_of(&account);
    for i in 1..MAX_DEVICES_EVER - 1 {
        let d = DeviceId([i as u8; 32]);
        net.enrol(&DeviceCertificate::issue(&account, d, [1; 32], 1));
        net.revoke_device(&d, 2);
    }
    assert_eq!(answer_all(&mut net, &account, &first, &[200, 201]), 1);
    assert_eq!(current(&mut net, &account).1, MAX_DEVICES_EVER);
}

/// Issue 31: every message the server accepts (application messages and
/// commits alike) extends the group's chain, the same way on every
/// storage: the head the server keeps is the one a member recomputes from
/// the messages, in order.
fn every_accepted_message_extends_the_groups_chain() {
    let mut net = Net::new();
    let mut alice = net.client(1);
    let g = net.create(&mut alice);
    assert_eq!(net.chain_tip(&g), None, "no message yet");
    let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut accepted = Vec::new();
    for text in ["one", "two"] {
        let m = alice.member.encrypt(&g, text.as_bytes()).unwrap();
        let Response::Accepted { seq, head, .. } = net.send(&mut alice, m.clone(), None) else { panic!() };
        sent.push((seq, m));
        accepted.push(head);
    }
    let c = alice.member.self_update(&g).unwrap();
    let message = c.message.clone();
    let Response::Accepted { seq, head, .. } = net.commit(&mut alice, c) else { panic!() };
    alice.member.merge_pending(&g).unwrap();
    sent.push((seq, message));
    accepted.push(head);
    let m = alice.member.encrypt(&g, b"three").unwrap();
    let Response::Accepted { seq, head, .. } = net.send(&mut alice, m.clone(), None) else { panic!() };
    sent.push((seq, m));
    accepted.push(head);

    let mut expected = None;
    for (seq, m) in &sent {
        let epoch = crate::mls::frame(m).unwrap().epoch;
        expected = Some(storage::ChainTip::after(expected, &g, *seq, epoch, &crate::chain::MessageDigest::of(m)));
    }
    let tip = net.chain_tip(&g).expect("a chain");
    assert_eq!(Some(tip), expected);
    assert_eq!((tip.start, tip.seq), (1, 4));
    // A member following the log from the start verifies every link.
    let mut at = crate::chain::Position::start(&g, tip.start);
    let mut head = crate::chain::Head::genesis(&g);
    for (seq, m) in &sent {
        let epoch = crate::mls::frame(m).unwrap().epoch;
        head = head.next(*seq, epoch, m);
        at.take(*seq, epoch, m, &head).unwrap();
    }
    assert_eq!(at.head, tip.head);
    // The heads handed out with each accept and each fetched message are
    // the chain's, and the server signs the one asked for.
    let Response::Messages { messages, .. } = net.req(&alice, Request::Fetch { group: g.clone(), after: 0, limit: 0 })
    else {
        panic!()
    };
    let mut head = crate::chain::Head::genesis(&g);
    for (i, logged) in messages.iter().enumerate() {
        let epoch = crate::mls::frame(&logged.data).unwrap().epoch;
        head = head.next(logged.seq, epoch, &logged.data);
        assert_eq!(logged.head, Some(head));
        assert_eq!(accepted[i], head);
    }
    let Response::SignedHead { signed, .. } = net.req(&alice, Request::Head { group: g.clone(), seq: 2 }) else {
        panic!()
    };
    assert!(signed.verify(&g) && signed.seq == 2 && Some(signed.head) == messages[1].head);
    let outsider = net.client(9);
    let (code, _) = net.code(&outsider, Request::Head { group: g.clone(), seq: 2 });
    assert_eq!(code, ErrorCode::NotMember, "a stranger learns no head");
}

/// Issue 32: a blob is opened only by a current member with a padded size
/// within the quotas; only its device writes, resumes or cancels it; only
/// current members fetch it once complete, and everyone else gets the
/// answer a missing blob gets; blobs go with retention, when their group
/// has no member left, and (unfinished) after a day. The same on every
/// storage.
fn disappearing_messages_expire_on_the_server_and_chains_link_through_them() {
    use crate::mls::GroupSettings;
    let (mut net, mut alice, mut bob, carol, g) = Net::trio();
    alice.member.set_removal_key(net.removal_key);
    bob.member.set_removal_key(net.removal_key);
    net.text(&mut alice, &g, "before the timer");
    // A member may not drop the server as the group's external sender.
    let hostile = bob.member.commit_with_extensions(&g).unwrap();
    let r = net.commit(&mut bob, hostile);
    assert!(matches!(r, Response::Error { code: ErrorCode::InvalidCommit, .. }), "{r:?}");
    bob.member.discard_pending(&g).unwrap();
    // Nor may a non-member set the timer (it has no leaf to sign with).
    let eve = net.client(9);
    let outsider = alice.member.set_settings(&g, GroupSettings { disappear_secs: 1 }).unwrap();
    assert_eq!(net.code(&eve, outsider.clone().into_request()).0, ErrorCode::NotMember);
    alice.member.discard_pending(&g).unwrap();
    // A member sets 2 seconds; the server reads it from the commit.
    let commit = alice.member.set_settings(&g, GroupSettings { disappear_secs: 2 }).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    assert_eq!(net.group(&g).unwrap().disappear, 2);
    let m = alice.member.encrypt(&g, b"marker").unwrap();
    let Response::Accepted { seq, .. } = net.send(&mut alice, m.clone(), None) else { panic!() };
    let sent_at = net.now;
    let fetch = |after| Request::Fetch { group: g.clone(), after, limit: 0 };
    let Response::Messages { messages, .. } = net.ok(&bob, fetch(seq - 1)) else { panic!() };
    assert_eq!((messages[0].expires, messages[0].gone, &messages[0].data), (Some(sent_at + 2), None, &m));
    // Its time is up: served as gone even before a sweep reaches it.
    net.now = sent_at + 2;
    let Response::Messages { messages, .. } = net.ok(&bob, fetch(seq - 1)) else { panic!() };
    let gone = messages[0].gone.expect("served as gone");
    assert!(messages[0].data.is_empty());
    assert_eq!(gone.digest, crate::chain::MessageDigest::of(&m));
    // The sweep deletes its bytes for good; its place stays.
    let now = net.now;
    let ds = &mut net.ds;
    let swept = in_unit!(&mut net.store, s => ds.expire_messages(s, now).unwrap());
    assert_eq!(swept, 1);
    let again = in_unit!(&mut net.store, s => ds.expire_messages(s, now).unwrap());
    assert_eq!(again, 0, "a sweep is done once");
    let stored = in_unit!(&mut net.store, s => s.fetch(&g, seq - 1, None, 10, usize::MAX).unwrap().0);
    assert!(stored[0].data.is_empty() && stored[0].gone == Some(gone), "{stored:?}");
    // bob reads: the old message, the timer, nothing of the marker, and
    // his chain links through the expired message.
    let reads = net.read(&mut bob, &g);
    assert!(reads.iter().any(|r| matches!(r, Read::Gone { seq: s } if *s == seq)), "{reads:?}");
    let got = all_received(reads).unwrap();
    assert_eq!(texts(&got), vec!["before the timer".to_string()]);
    assert!(got.iter().any(|r| matches!(r, Received::Commit { settings: Some(s), .. } if s.disappear_secs == 2)));
    let Response::Messages { messages, .. } = net.ok(&carol, fetch(0)) else { panic!() };
    let start = net.chain_tip(&g).unwrap().start;
    let mut at = None;
    for logged in &messages {
        match crate::client::verify::follow(&g, at, logged) {
            crate::client::verify::Step::Verified(p) | crate::client::verify::Step::Started { at: p, .. } => {
                at = Some(p)
            }
            other => panic!("message {}: {other:?}", logged.seq),
        }
    }
    assert_eq!(at.map(|p| p.seq), Some(net.chain_tip(&g).unwrap().seq));
    assert!(start >= 1);
    // A file uploaded in the group goes with the timer too.
    let size = crate::files::Layout::of_size(10).unwrap().blob;
    let Response::Upload(u) = net.ok(&alice, Request::UploadOpen { group: g.clone(), size }) else { panic!() };
    let done_at = net.now;
    in_unit!(&mut net.store, st => st.complete_blob(&u.id, &[9; 32], done_at).unwrap());
    let download = Request::Download { id: u.id, offset: 0, length: 0 };
    assert!(matches!(net.ok(&bob, download.clone()), Response::Blob { .. }));
    net.now = done_at + 2;
    assert_eq!(net.code(&bob, download).0, ErrorCode::NoSuchFile, "expired: not served");
    let now = net.now;
    let ds = &mut net.ds;
    let gone_blobs = in_unit!(&mut net.store, s => ds.expire_blobs(s, now).unwrap());
    assert_eq!(gone_blobs, vec![u.id]);
    // A timer longer than the server's retention (30 days here): the
    // shorter wins.
    let year = GroupSettings { disappear_secs: 365 * 86_400 };
    let commit = alice.member.set_settings(&g, year).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    let m = alice.member.encrypt(&g, b"long").unwrap();
    let Response::Accepted { seq: long, .. } = net.send(&mut alice, m, None) else { panic!() };
    let accepted = net.now;
    let Response::Messages { messages, .. } = net.ok(&bob, fetch(long - 1)) else { panic!() };
    assert_eq!(messages[0].expires, Some(accepted + 30 * 86_400));
    // Turning it off: later messages stay until read.
    let off = alice.member.set_settings(&g, GroupSettings::default()).unwrap();
    assert!(matches!(net.commit(&mut alice, off), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    assert_eq!(net.group(&g).unwrap().disappear, 0);
    let kept = net.text(&mut alice, &g, "kept");
    let Response::Messages { messages, .. } = net.ok(&bob, fetch(kept - 1)) else { panic!() };
    assert!(messages.iter().all(|m| m.expires.is_none() && m.gone.is_none()), "{messages:?}");
}

fn blobs_follow_membership_quotas_and_retention() {
    let (mut net, mut alice, bob, carol, g) = Net::trio();
    let size = crate::files::Layout::of_size(10_000).unwrap().blob;
    let open = |size| Request::UploadOpen { group: g.clone(), size };
    let Response::Upload(u) = net.ok(&alice, open(size)) else { panic!() };
    assert_eq!((u.size, u.received, u.hash), (size, 0, None));
    let id = u.id;
    assert_eq!(net.code(&alice, open(size + 1)).0, ErrorCode::Malformed, "not a padded size");
    let dave = net.client(4);
    assert_eq!(net.code(&dave, open(size)).0, ErrorCode::NotMember);
    // Someone else's upload is no upload at all.
    let missing = net.code(&bob, Request::UploadStatus { id: [7; 16] });
    assert_eq!(missing.0, ErrorCode::NoSuchFile);
    for r in [Request::UploadStatus { id }, Request::Upload { id, offset: 0 }, Request::UploadCancel { id }] {
        assert_eq!(net.code(&bob, r), missing);
    }
    assert_eq!(net.code(&alice, Request::Upload { id, offset: 5 }), (ErrorCode::UploadOffset, 0));
    let download = |id, offset, length| Request::Download { id, offset, length };
    assert_eq!(net.code(&bob, download(id, 0, 0)), missing, "not complete yet");
    // The server records it durable, then complete.
    in_unit!(&mut net.store, st => st.set_blob_received(&id, 4096).unwrap());
    assert_eq!(net.code(&alice, Request::Upload { id, offset: 0 }), (ErrorCode::UploadOffset, 4096));
    let now = net.now;
    in_unit!(&mut net.store, st => st.complete_blob(&id, &[9; 32], now).unwrap());
    let Response::Upload(done) = net.ok(&alice, Request::UploadStatus { id }) else { panic!() };
    assert_eq!((done.received, done.hash), (size, Some([9; 32])));
    assert_eq!(net.ok(&bob, download(id, 0, 0)), Response::Blob { size, hash: [9; 32], offset: 0, length: size });
    assert_eq!(net.ok(&bob, download(id, 10, 5)), Response::Blob { size, hash: [9; 32], offset: 10, length: 5 });
    assert_eq!(net.code(&bob, download(id, size + 1, 0)).0, ErrorCode::Malformed);
    assert_eq!(net.code(&bob, download(id, 10, size)).0, ErrorCode::Malformed);
    assert_eq!(net.code(&dave, download(id, 0, 0)), missing);
    // Removed, carol gets nothing more.
    let commit = alice.member.remove(&g, &[carol.member.account()]).unwrap();
    assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
    alice.member.merge_pending(&g).unwrap();
    assert_eq!(net.code(&carol, download(id, 0, 0)), missing);
    assert!(matches!(net.ok(&bob, download(id, 0, 0)), Response::Blob { .. }));
    // Quotas: unfinished uploads per device (the default, 4).
    let mut open_ids = Vec::new();
    for _ in 0..4 {
        let Response::Upload(u) = net.ok(&alice, open(size)) else { panic!() };
        open_ids.push(u.id);
    }
    assert_eq!(net.code(&alice, open(size)), (ErrorCode::TooManyUploads, 4));
    assert_eq!(net.ok(&alice, Request::UploadCancel { id: open_ids[0] }), Response::Done);
    assert_eq!(net.code(&alice, Request::UploadStatus { id: open_ids[0] }), missing);
    assert!(matches!(net.ok(&alice, open(size)), Response::Upload(_)));
    assert_eq!(net.code(&alice, Request::UploadCancel { id }).0, ErrorCode::Malformed, "complete: not cancelled");
    let too_big = crate::files::Layout::of_size(2 * 1024 * 1024 * 1024).unwrap().blob;
    assert_eq!(net.code(&alice, open(too_big)).0, ErrorCode::TooLarge);
    // Retention: unfinished uploads go after a day, complete ones with the
    // messages; a blob of a group nobody is in goes at the next sweep.
    let day = crate::limits::ABANDONED_UPLOAD_AFTER.as_secs();
    let sweep = |net: &mut Net, now: u64| {
        let ds = &mut net.ds;
        in_unit!(&mut net.store, st => ds.expire_blobs(st, now).unwrap())
    };
    let now = net.now;
    assert!(sweep(&mut net, now + 10).is_empty());
    let gone = sweep(&mut net, now + day + 1);
    assert_eq!(gone.len(), 4, "the unfinished uploads");
    assert!(matches!(net.ok(&bob, download(id, 0, 0)), Response::Blob { .. }));
    let gone = sweep(&mut net, now + 30 * 86_400 + 1);
    assert_eq!(gone, vec![id]);
    assert_eq!(net.code(&bob, download(id, 0, 0)), missing);
    // A group nobody is in any more loses its blobs at the next sweep,
    // however young they are.
    let Response::Upload(young) = net.ok(&alice, open(size)) else { panic!() };
    let now = net.now;
    in_unit!(&mut net.store, st => st.complete_blob(&young.id, &[8; 32], now).unwrap());
    assert!(sweep(&mut net, now + 1).is_empty());
    for device in net.current_members(&g) {
        in_unit!(&mut net.store, st => st.remove_member(&g, &device, 99, 99).unwrap());
    }
    assert_eq!(sweep(&mut net, now + 1), vec![young.id]);
}

/// A crypto provider whose `derive_hpke_keypair` cuts the public key of
/// its `which`-th derivation (counted from 1 once armed) to `cut` bytes:
/// a member that makes a commit path with a parent node's key of the wrong
/// length, consistently (parent hashes and signatures over the cut key).
mod short_keys {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openmls::prelude::tls_codec::SecretVLBytes;
    use openmls_traits::crypto::OpenMlsCrypto;
    use openmls_traits::types::{
        AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig, HpkeKeyPair,
        KemOutput, SignatureScheme,
    };
    use openmls_traits::OpenMlsProvider;

    #[derive(Default)]
    pub struct ShortKeys {
        inner: openmls_rust_crypto::RustCrypto,
        /// 0: harmless; otherwise the number of the next derivation.
        pub armed: AtomicUsize,
        pub which: AtomicUsize,
        pub cut: AtomicUsize,
    }

    #[derive(Default)]
    pub struct Provider {
        inner: openmls_rust_crypto::OpenMlsRustCrypto,
        pub crypto: ShortKeys,
    }

    impl OpenMlsProvider for Provider {
        type CryptoProvider = ShortKeys;
        type RandProvider = openmls_rust_crypto::RustCrypto;
        type StorageProvider = openmls_memory_storage::MemoryStorage;
        fn storage(&self) -> &Self::StorageProvider {
            self.inner.storage()
        }
        fn crypto(&self) -> &Self::CryptoProvider {
            &self.crypto
        }
        fn rand(&self) -> &Self::RandProvider {
            self.inner.rand()
        }
    }

    impl OpenMlsCrypto for ShortKeys {
        fn supports(&self, c: Ciphersuite) -> Result<(), CryptoError> {
            self.inner.supports(c)
        }
        fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
            self.inner.supported_ciphersuites()
        }
        fn hkdf_extract(&self, h: HashType, salt: &[u8], ikm: &[u8]) -> Result<SecretVLBytes, CryptoError> {
            self.inner.hkdf_extract(h, salt, ikm)
        }
        fn hmac(&self, h: HashType, key: &[u8], m: &[u8]) -> Result<SecretVLBytes, CryptoError> {
            self.inner.hmac(h, key, m)
        }
        fn hkdf_expand(&self, h: HashType, prk: &[u8], info: &[u8], l: usize) -> Result<SecretVLBytes, CryptoError> {
            self.inner.hkdf_expand(h, prk, info, l)
        }
        fn hash(&self, h: HashType, d: &[u8]) -> Result<Vec<u8>, CryptoError> {
            self.inner.hash(h, d)
        }
        fn aead_encrypt(&self, a: AeadType, k: &[u8], d: &[u8], n: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
            self.inner.aead_encrypt(a, k, d, n, aad)
        }
        fn aead_decrypt(&self, a: AeadType, k: &[u8], c: &[u8], n: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
            self.inner.aead_decrypt(a, k, c, n, aad)
        }
        fn signature_key_gen(&self, a: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
            self.inner.signature_key_gen(a)
        }
        fn verify_signature(&self, a: SignatureScheme, d: &[u8], pk: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
            self.inner.verify_signature(a, d, pk, sig)
        }
        fn sign(&self, a: SignatureScheme, d: &[u8], k: &[u8]) -> Result<Vec<u8>, CryptoError> {
            self.inner.sign(a, d, k)
        }
        fn hpke_seal(
            &self,
            c: HpkeConfig,
            pk: &[u8],
            info: &[u8],
            aad: &[u8],
            p: &[u8],
        ) -> Result<HpkeCiphertext, CryptoError> {
            self.inner.hpke_seal(c, pk, info, aad, p)
        }
        fn hpke_open(
            &self,
            c: HpkeConfig,
            x: &HpkeCiphertext,
            sk: &[u8],
            info: &[u8],
            aad: &[u8],
        ) -> Result<Vec<u8>, CryptoError> {
            self.inner.hpke_open(c, x, sk, info, aad)
        }
        fn hpke_setup_sender_and_export(
            &self,
            c: HpkeConfig,
            pk: &[u8],
            info: &[u8],
            e: &[u8],
            l: usize,
        ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
            self.inner.hpke_setup_sender_and_export(c, pk, info, e, l)
        }
        fn hpke_setup_receiver_and_export(
            &self,
            c: HpkeConfig,
            enc: &[u8],
            sk: &[u8],
            info: &[u8],
            e: &[u8],
            l: usize,
        ) -> Result<ExporterSecret, CryptoError> {
            self.inner.hpke_setup_receiver_and_export(c, enc, sk, info, e, l)
        }
        fn derive_hpke_keypair(&self, c: HpkeConfig, ikm: &[u8]) -> Result<HpkeKeyPair, CryptoError> {
            let mut pair = self.inner.derive_hpke_keypair(c, ikm)?;
            let n = self.armed.load(Ordering::SeqCst);
            if n > 0 {
                self.armed.store(n + 1, Ordering::SeqCst);
                if n == self.which.load(Ordering::SeqCst) {
                    pair.public.truncate(self.cut.load(Ordering::SeqCst));
                }
            }
            Ok(pair)
        }
    }
}

/// Red team (issue 35): a member's commit whose path gives a parent node
/// a key of another length than the group's KEM (the members under that
/// node's other child would check it, and there is nobody there; the
/// server cannot derive it) froze every later commit that encrypts to it.
/// The server refuses it; a member that a server relays it to anyway
/// refuses it too and stays in its epoch.
fn a_parent_node_key_of_the_wrong_length_is_refused_by_server_and_members() {
    use std::sync::atomic::Ordering;

    use crate::mls::Suite;
    for (suite, cut) in [(Suite::Classic, 31), (Suite::Pq, crate::mls::XWING_PUBLIC_KEY - 1), (Suite::Pq, 32)] {
        let mut net = Net::new();
        let (mut alice, mut bob, mut carol) = (net.client(1), net.client(2), net.client(3));
        // mallory, at leaf 3: her path sets the parent of carol's leaf and
        // hers (which carol checks) and the root (which everyone checks).
        let account = crate::auth::Identity::generate().unwrap();
        let device = crate::auth::DeviceId(crate::auth::Identity::generate().unwrap().public_key());
        let mut mallory = Member::create(short_keys::Provider::default(), &account, device, net.now).unwrap();
        net.enrol(mallory.certificate());
        let as_mallory = Caller::of(mallory.certificate());
        let packages = mallory.key_packages_of(suite, 2).unwrap();
        assert!(!matches!(
            net.req_as(as_mallory, Request::PublishKeyPackages { packages, last_resort: Some(1) }),
            Response::Error { .. }
        ));
        for c in [&bob, &carol] {
            let packages = c.member.key_packages_of(suite, 2).unwrap();
            net.ok(c, Request::PublishKeyPackages { packages, last_resort: Some(1) });
        }
        alice.member.set_removal_key(net.removal_key);
        let g = alice.member.create_group_of(&net.removal_key, suite).unwrap();
        net.ok(&alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
        alice.logs.insert(g.id.clone(), GroupLog::new(&g.id, 0));
        let g = g.id;
        let mut packages = vec![];
        for who in [bob.member.account(), carol.member.account(), mallory.account()] {
            let claim = Request::ClaimKeyPackages { account: who.0, suite: suite.code() };
            let Response::KeyPackages { packages: p } = net.ok(&alice, claim) else { panic!() };
            packages.push((who, p.into_iter().next().unwrap()));
        }
        let commit = alice.member.add(&g, &packages).unwrap();
        assert!(matches!(net.commit(&mut alice, commit), Response::Accepted { .. }));
        alice.member.merge_pending(&g).unwrap();
        net.join(&mut bob);
        net.join(&mut carol);
        let Response::Welcomes { welcomes } = net.req_as(as_mallory, Request::FetchWelcomes) else { panic!() };
        let (id, welcome) = welcomes.into_iter().next().unwrap();
        mallory.join(&welcome).unwrap();
        net.req_as(as_mallory, Request::AckWelcome { id });
        // Her path's two parent keys (the parent of carol's leaf and hers,
        // which only carol derives; the root, which alice derives too) are
        // derived in parallel, in either order: one of the first two
        // derivations is cut. Either way the server refuses the commit;
        // when it was the parent below the root, only the member's own
        // check stands between alice and a frozen group.
        let mut below_the_root = false;
        for _ in 0..32 {
            let crypto = &mallory.provider().crypto;
            crypto.which.store(1, Ordering::SeqCst);
            crypto.cut.store(cut, Ordering::SeqCst);
            crypto.armed.store(1, Ordering::SeqCst);
            let bad = mallory.self_update(&g).unwrap();
            mallory.provider().crypto.armed.store(0, Ordering::SeqCst);
            let message = bad.message.clone();
            match net.req_as(as_mallory, bad.into_request()) {
                Response::Error { code: ErrorCode::InvalidCommit, message, .. } => {
                    assert!(message.contains("encryption key"), "{suite} cut to {cut}: {message}")
                }
                other => panic!("{suite}, a parent key cut to {cut}: the server took {other:?}"),
            }
            mallory.discard_pending(&g).unwrap();
            // Relayed anyway (a server without the check, or a hostile one).
            let epoch = alice.member.epoch(&g);
            match alice.member.receive(&g, &message) {
                Ok(Received::Refused { reason, .. }) => {
                    assert!(reason.contains("encryption key"), "{suite} cut to {cut}: {reason}");
                    below_the_root = true;
                }
                // The root's key: openmls sees it differs from the one
                // alice derives.
                Err(e) => assert!(e.to_string().contains("not identical"), "{e}"),
                Ok(other) => panic!("{suite}, a parent key cut to {cut}: alice took {other:?}"),
            }
            assert_eq!(alice.member.epoch(&g), epoch);
            if below_the_root {
                break;
            }
        }
        assert!(below_the_root, "the parent below the root was never the one cut");
        // The group goes on.
        net.text(&mut alice, &g, "still one group");
        assert_eq!(texts(&net.sync(&mut bob, &g)), ["still one group"]);
    }
}

/// Red team (issue 35): a claim of a suite that some of the person's
/// devices have no package of (an older client on one of them) fails as
/// a whole, and spends none of the packages of the devices that have one.
fn a_claim_some_devices_cannot_answer_fails_whole_and_spends_nothing() {
    use crate::mls::Suite;
    let mut net = Net::new();
    let alice = net.client(1);
    let account = crate::auth::Identity::generate().unwrap();
    let phone = net.second_device(&account);
    let _old_laptop = net.second_device(&account);
    let pq = Suite::Pq.code();
    let packages = phone.member.key_packages_of(Suite::Pq, 3).unwrap();
    net.ok(&phone, Request::PublishKeyPackages { packages, last_resort: Some(2) });
    let before = net.ok(&phone, Request::CountKeyPackagesOf { suite: pq });
    assert_eq!(before, Response::KeyPackageCount { count: 2, last_resort: true });
    let claim = Request::ClaimKeyPackages { account: account.account_id().0, suite: pq };
    assert_eq!(net.code(&alice, claim.clone()).0, ErrorCode::NoKeyPackage);
    assert_eq!(
        net.ok(&phone, Request::CountKeyPackagesOf { suite: pq }),
        before,
        "the phone's packages were spent on a claim that failed"
    );
    // Classic: both devices answer.
    let classic = Request::ClaimKeyPackages { account: account.account_id().0, suite: Suite::Classic.code() };
    let Response::KeyPackages { packages } = net.ok(&alice, classic) else { panic!() };
    assert_eq!(packages.len(), 2);
}

rules! {
    every_change_of_a_groups_state_advances_its_version,
    a_verdict_serves_only_the_message_it_was_verified_for,
    a_device_that_left_cannot_commit_as_a_member,
    a_snapshot_is_taken_only_for_a_current_members_handshake_of_this_epoch,
    two_commits_for_one_epoch_verified_concurrently_accept_exactly_one,
    a_verdict_from_before_a_proposal_is_verified_again,
    a_stale_verdict_marked_to_go_back_comes_back_unverified,
    a_claim_some_devices_cannot_answer_fails_whole_and_spends_nothing,
    a_parent_node_key_of_the_wrong_length_is_refused_by_server_and_members,
    post_quantum_key_packages_and_groups,
    a_post_quantum_group_holds_at_most_its_cap,
    a_further_device_of_a_member_reads_the_log_before_it_joins,
    disappearing_messages_expire_on_the_server_and_chains_link_through_them,
    blobs_follow_membership_quotas_and_retention,
    every_accepted_message_extends_the_groups_chain,
    random_traffic_keeps_the_invariants,
    three_members_exchange_messages_in_order,
    concurrent_commits_one_wins_loser_catches_up_and_retries,
    non_members_learn_nothing,
    removed_member_sees_its_removal_and_nothing_after,
    a_member_can_leave_by_proposal,
    a_device_that_left_gets_no_push_of_the_next_message,
    a_device_the_operator_removed_gets_no_push_of_the_next_message,
    a_device_revoked_between_two_commits_is_proposed_for_removal,
    members_kept_across_commits_are_the_stored_ones,
    adds_need_server_issued_key_packages_and_a_matching_welcome,
    key_packages_are_validated_claimed_once_and_the_last_resort_kept,
    claims_are_rate_limited_per_claimer,
    a_group_must_start_with_only_its_creator,
    quotas_refuse_new_data_and_keep_what_is_stored,
    a_new_groups_tree_of_more_than_one_node_is_refused_unverified,
    a_full_devices_upload_is_refused_before_its_packages_are_verified,
    a_full_store_refuses_writes_but_serves_reads,
    a_key_package_carrying_another_devices_certificate_is_refused,
    a_group_must_list_the_server_and_start_with_a_certified_leaf,
    a_member_cannot_take_another_members_identity,
    a_commit_adding_a_forged_key_package_is_refused_by_server_and_client,
    groups_an_account_is_added_to_count_against_its_quota,
    a_commit_nobody_can_process_is_accepted_and_every_member_rejoins_past_it,
    commits_carry_the_group_info_of_exactly_their_epoch_and_only_members_read_it,
    the_tree_handed_out_with_a_group_info_is_its_epochs,
    what_the_server_refuses_of_mls_is_typed,
    what_a_member_refuses_to_join_or_rejoin_is_typed,
    whole_accounts_are_added_and_revoked_devices_leave_with_the_next_commit,
    links_are_single_use_expire_and_certify_only_the_offering_key,
    devices_are_capped_at_once_and_ever,
    issue_29_links_answered_together_stay_within_the_device_caps,
}

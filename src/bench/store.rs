//! The server's core without the network: requests straight into an
//! [`Engine`] on its own database (durable appends, storage per message)
//! and into the Delivery Service on the in-memory store (the CPU of a
//! commit).

use std::path::Path;
use std::time::{Duration, Instant};

use super::measure::drain;
use super::scenarios::{encrypt_many, make_group, Exec};
use super::{fail, BenchError, Settings};
use crate::auth::Identity;
use crate::client::mls::Member;
use crate::delivery::{Caller, Origin, Quotas};
use crate::server::engine::Engine;
use crate::util::now_unix;
use crate::wire::{Request, Response};

/// Straight into a store, as the server's sessions do.
struct ViaStore<'a> {
    store: &'a Engine,
    callers: Vec<Caller>,
}

impl Exec for ViaStore<'_> {
    async fn exec(&self, member: usize, request: Request) -> Result<Response, BenchError> {
        let caller = *self.callers.get(member).ok_or_else(|| BenchError("no such member".into()))?;
        match self.store.deliver(caller, request, now_unix()).await.map_err(fail)?.response {
            Response::Error { message, .. } => Err(BenchError(message)),
            other => Ok(other),
        }
    }
}

/// A store on its own database with two registered accounts in one group.
/// The store keeps the delivery chain or not
/// ([`crate::db::sqlite::Db::open_unchained`]: the chain's baseline).
async fn store_with_group_on(path: &Path, size: usize, chained: bool) -> Result<(Engine, Vec<u8>, Member), BenchError> {
    let quotas = Quotas {
        max_log_per_group: u64::MAX,
        max_database_bytes: u64::MAX,
        invite_required: false,
        ..Quotas::default()
    };
    let removal = std::sync::Arc::new(Identity::generate().map_err(fail)?);
    let removal_key = removal.public_key();
    let current = crate::auth::online::CurrentKey::new(
        crate::auth::online::ServerKey::identity(Identity::generate().map_err(fail)?).map_err(fail)?,
    );
    let keys = crate::delivery::ServerKeys { removal, current };
    let open = if chained { crate::db::sqlite::Db::open } else { crate::db::sqlite::Db::open_unchained };
    let store = Engine::start(open(path).map_err(fail)?, open(path).map_err(fail)?, quotas, keys).map_err(fail)?;
    let mut members = vec![];
    for _ in 0..size {
        let (_, _, member) = Member::generate().map_err(fail)?;
        let register = Request::Register { invite: None, certificate: member.certificate().encode() };
        match store.deliver(Origin::Stranger(member.device()), register, now_unix()).await.map_err(fail)?.response {
            Response::Registered { .. } => {}
            other => return Err(BenchError(format!("registration: unexpected {} response", other.kind()))),
        }
        members.push(member);
    }
    let via = ViaStore { store: &store, callers: members.iter().map(|m| Caller::of(m.certificate())).collect() };
    let (group, _) = make_group(&via, &mut members, &removal_key).await?;
    let first = members.into_iter().next().ok_or_else(|| BenchError("no member".into()))?;
    Ok((store, group, first))
}

/// Appends through hush's store (the writer thread, group commit, the
/// Delivery Service's checks), 64 requests in flight, no network.
pub async fn durable_appends(dir: &Path, settings: Settings) -> Result<f64, BenchError> {
    durable_appends_on(&dir.join("appends.db"), settings, true).await
}

/// [`durable_appends`] into a new database at `path`, on a store that
/// keeps the delivery chain or not.
pub(super) async fn durable_appends_on(path: &Path, settings: Settings, chained: bool) -> Result<f64, BenchError> {
    let (store, group, mut alice) = store_with_group_on(path, 2, chained).await?;
    let messages = encrypt_many(&mut alice, &group, settings.messages)?;
    let account = Caller::of(alice.certificate());
    drain(messages, 64, move |m| {
        let store = store.clone();
        async move { store_send(&store, account, m).await }
    })
    .await
}

/// Sends one application message straight into `store`.
async fn store_send(store: &Engine, account: Caller, message: Vec<u8>) -> Result<(), BenchError> {
    match store.deliver(account, Request::Send { message, welcome: None, group_info: None }, now_unix()).await {
        Ok(o) if matches!(o.response, Response::Accepted { .. }) => Ok(()),
        Ok(o) => Err(BenchError(format!("unexpected {} response", o.response.kind()))),
        Err(e) => Err(fail(e)),
    }
}

/// Bytes the database grows by per application message in a group of
/// `size` members (real MLS ciphertexts, nobody acknowledging; WAL
/// checkpointed before measuring).
pub async fn bytes_per_message(path: &Path, size: usize, messages: usize) -> Result<f64, BenchError> {
    bytes_per_message_with(path, size, messages, true).await
}

/// [`bytes_per_message`], on a store that keeps the delivery chain or not.
pub(super) async fn bytes_per_message_with(
    path: &Path,
    size: usize,
    messages: usize,
    chained: bool,
) -> Result<f64, BenchError> {
    let (store, group, mut first) = store_with_group_on(path, size, chained).await?;
    let size_of = || crate::db::sqlite::maintenance::checkpointed_size(path).map_err(fail);
    let before = size_of()?;
    let account = Caller::of(first.certificate());
    let batch = encrypt_many(&mut first, &group, messages)?;
    let s = store.clone();
    drain(batch, 16, move |m| {
        let store = s.clone();
        async move { store_send(&store, account, m).await }
    })
    .await?;
    let after = size_of()?;
    // The database holds this one group.
    let stored = crate::db::sqlite::maintenance::check(path).map_err(fail)?.messages;
    let expected = messages + usize::from(size > 1);
    if usize::try_from(stored).ok() != Some(expected) {
        return Err(BenchError(format!("{stored} messages stored, expected {expected}")));
    }
    Ok((after - before) as f64 / messages.max(1) as f64)
}

/// Newest-page fetches timed per group ([`newest_page`]).
const PAGE_FETCHES: usize = 200;

/// A page: what a member fetches at once.
const PAGE: u16 = 100;

/// Distinct ciphertexts the history is filled with (sent again and again:
/// the server stores each copy as a message of its own).
const DISTINCT: usize = 1000;

/// p50 latency (µs) of fetching the newest [`PAGE`] messages of a group
/// that holds `messages` messages, through the engine (the reader thread,
/// no network), on its own database at `path`.
pub(super) async fn newest_page(path: &Path, messages: usize) -> Result<f64, BenchError> {
    let (store, group, mut alice) = store_with_group_on(path, 2, true).await?;
    let distinct = encrypt_many(&mut alice, &group, DISTINCT.min(messages.max(1)))?;
    let fill: Vec<Vec<u8>> = distinct.iter().cycle().take(messages).cloned().collect();
    drop(distinct);
    let account = Caller::of(alice.certificate());
    let s = store.clone();
    drain(fill, 64, move |m| {
        let store = s.clone();
        async move { store_send(&store, account, m).await }
    })
    .await?;
    let last = u64::try_from(messages).map_err(fail)? + 1;
    let mut took = Vec::with_capacity(PAGE_FETCHES);
    for _ in 0..PAGE_FETCHES {
        let fetch = Request::Fetch { group: group.clone(), after: last.saturating_sub(u64::from(PAGE)), limit: PAGE };
        let t = Instant::now();
        let r = store.deliver(account, fetch, now_unix()).await.map_err(fail)?.response;
        took.push(t.elapsed().as_secs_f64() * 1e6);
        match r {
            Response::Messages { messages: got, .. } if !got.is_empty() => {}
            other => return Err(BenchError(format!("newest page: unexpected {} response", other.kind()))),
        }
    }
    took.sort_by(f64::total_cmp);
    Ok(took.get(took.len() / 2).copied().unwrap_or(0.0))
}

/// What a commit costs in a group of one suite ([`commit_cost`]).
#[derive(Debug, Clone, Copy)]
pub struct CommitCost {
    /// Core CPU to accept a self-update, µs.
    pub whole_us: f64,
    /// The part of it spent checking the commit's GroupInfo, µs.
    pub check_us: f64,
    /// Raw openmls verifying the same commit, µs: the public state decoded,
    /// the commit processed and merged (what any Delivery Service that
    /// checks commits does, without hush's rules, storage or encoding).
    pub openmls_us: f64,
    /// A self-update commit's bytes (the MLS message).
    pub commit_bytes: f64,
    /// The Welcome that adds one device to the group, bytes.
    pub welcome_bytes: f64,
}

/// CPU the Delivery Service core spends accepting a commit (a member's
/// self-update) in a group of `size` devices of `suite`, on the in-memory
/// store (no disk), and the part of it spent checking the commit's
/// GroupInfo (group repair), each averaged over `commits` commits; the
/// commit's size, and the size of the Welcome that added the group's last
/// device.
pub fn commit_cost(size: usize, commits: usize, suite: crate::mls::Suite) -> Result<CommitCost, BenchError> {
    use crate::delivery::memory::MemoryStore;
    use crate::delivery::{Delivery, Storage as _};
    use crate::mls;
    let removal_key = Identity::generate().map_err(fail)?.public_key();
    let mut ds = Delivery::new(86_400, removal_key);
    let mut store = MemoryStore::default();
    let mut members = Vec::with_capacity(size);
    for _ in 0..size.max(2) {
        let (_, _, m) = Member::generate().map_err(fail)?;
        store.enrol(m.certificate());
        members.push(m);
    }
    let mut now = 1_000_000;
    let mut exec = |ds: &mut Delivery, store: &mut MemoryStore, m: &Member, request: Request| {
        now += 1;
        match ds.handle(store, Caller::of(m.certificate()), request, now).response {
            Response::Error { message, .. } => Err(BenchError(message)),
            r => Ok(r),
        }
    };
    for m in &members {
        let packages = m.key_packages_of(suite, 1).map_err(fail)?;
        exec(&mut ds, &mut store, m, Request::PublishKeyPackages { packages, last_resort: None })?;
    }
    let (first, rest) = members.split_first_mut().ok_or_else(|| BenchError("no members".into()))?;
    let g = first.create_group_of(&removal_key, suite).map_err(fail)?;
    exec(&mut ds, &mut store, first, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree })?;
    let mut claimed = vec![];
    // Each device claims its own package: claims are rate-limited per
    // claiming account, and the creator could not claim a large group's.
    for m in rest.iter() {
        let claim = Request::ClaimKeyPackages { account: m.account().0, suite: suite.code() };
        if let Response::KeyPackages { packages: p } = exec(&mut ds, &mut store, m, claim)? {
            claimed.extend(p.into_iter().map(|p| (m.account(), p)));
        }
    }
    // Everyone but the last in one commit, then the last alone: its Welcome
    // is what one more device costs.
    let last = claimed.pop().ok_or_else(|| BenchError("a group needs two members".into()))?;
    if !claimed.is_empty() {
        let add = first.add(&g.id, &claimed).map_err(fail)?;
        exec(&mut ds, &mut store, first, add.into_request())?;
        first.merge_pending(&g.id).map_err(fail)?;
    }
    let add = first.add(&g.id, &[last]).map_err(fail)?;
    let welcome_bytes = add.welcome.as_ref().map_or(0, Vec::len) as f64;
    exec(&mut ds, &mut store, first, add.into_request())?;
    first.merge_pending(&g.id).map_err(fail)?;
    let mut commit_bytes = 0usize;
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let (mut whole, mut check, mut raw) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let load = |state: &[u8]| -> Result<_, BenchError> {
        let storage = mls::decode_state(state).map_err(fail)?;
        let public = mls::PublicGroup::load(&storage, &openmls::prelude::GroupId::from_slice(&g.id))
            .map_err(|e| BenchError(format!("{e:?}")))?
            .ok_or_else(|| BenchError("no group state".into()))?;
        Ok((storage, public))
    };
    for _ in 0..commits {
        let commit = first.self_update(&g.id).map_err(fail)?;
        commit_bytes += commit.message.len();
        let (info, message) = (commit.group_info.clone(), commit.message.clone());
        let before = store.group(&g.id).map_err(fail)?.ok_or_else(|| BenchError("no group".into()))?.state;
        let t = Instant::now();
        exec(&mut ds, &mut store, first, commit.into_request())?;
        whole += t.elapsed();
        first.merge_pending(&g.id).map_err(fail)?;
        // Raw openmls, the same commit on the state before it.
        let t = Instant::now();
        let (storage, mut public) = load(&before)?;
        let framed = mls::frame(&message).map_err(fail)?;
        let processed = public.process_message(&crypto, framed.message).map_err(fail)?;
        let openmls::prelude::ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(BenchError("not a commit".into()));
        };
        public.merge_commit(&storage, *staged).map_err(|e| BenchError(format!("{e:?}")))?;
        raw += t.elapsed();
        // The check alone, on the state the commit produced.
        let state = store.group(&g.id).map_err(fail)?.ok_or_else(|| BenchError("no group".into()))?.state;
        let (_storage, public) = load(&state)?;
        let t = Instant::now();
        mls::check_group_info(&crypto, &info, &public, openmls::prelude::LeafNodeIndex::new(0)).map_err(fail)?;
        check += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / commits.max(1) as f64;
    Ok(CommitCost {
        whole_us: per(whole),
        check_us: per(check),
        openmls_us: per(raw),
        commit_bytes: commit_bytes as f64 / commits.max(1) as f64,
        welcome_bytes,
    })
}

#[cfg(test)]
mod tests {
    /// Storage per message does not depend on the group's size (measured
    /// with the benchmark's own scenario, on real MLS ciphertexts).
    #[test]
    fn bytes_per_message_do_not_depend_on_group_size() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let measure = |name: &str, size: usize| {
            runtime.block_on(super::bytes_per_message(&dir.path().join(name), size, 600)).unwrap()
        };
        let two = measure("2.db", 2);
        let fifty = measure("50.db", 50);
        eprintln!("database bytes per message: group of 2: {two:.0}, group of 50: {fifty:.0}");
        assert!(fifty <= two * 1.1 && two <= fifty * 1.1, "2: {two}, 50: {fifty}");
    }
}

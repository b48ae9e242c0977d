//! The Delivery Service rules (RFC 9750), sans-IO.
//!
//! [`Delivery::handle`] takes an authenticated device ([`Caller`]), a
//! decoded request and the current time, runs it against a [`Storage`], and returns the
//! response plus the [`Notification`]s to push. It knows no sockets and
//! reads no clock; the server calls it on its storage thread, the unit
//! tests and the fuzzer on a [`memory::MemoryStore`].
//!
//! # Rules
//!
//! * **Credentials**: every leaf's BasicCredential identity is a device
//!   certificate ([`crate::auth::device`]) that must verify under the
//!   account key it names and certify the leaf's signature key. The core
//!   checks it on every leaf it sees: uploaded KeyPackages (the certificate
//!   must be the uploading device's), the tree of a new group, every Add,
//!   every Update and every committer's path leaf (an Update may not change
//!   the leaf's account or device), and, after each commit, every leaf of
//!   the resulting tree (no device twice). Refusals carry
//!   [`ErrorCode::InvalidCredential`] with the leaf index.
//! * **KeyPackages** are validated with openmls (signature, lifetime,
//!   version, ciphersuite) and their credential as above. At most
//!   [`MAX_KEY_PACKAGES`] per device; one may be last-resort. A claim names
//!   an account and removes one package of each of its devices (a
//!   last-resort one is returned and kept) and records each `KeyPackageRef`
//!   with its account and device, so the server later knows whose package a
//!   commit adds. Claims are rate-limited per claiming account: a burst of
//!   [`CLAIM_BURST`], then one per [`CLAIM_REFILL`].
//! * **Groups** are created from a GroupInfo and ratchet tree, with an id
//!   bound to the creator's account ([`mls::group_id_for`]), checked before
//!   the id's existence is (so a non-member learns nothing and squats
//!   nothing by trying another's id); the server
//!   builds an openmls [`mls::PublicGroup`] (public state only) and requires
//!   the tree to hold exactly one leaf, the creating device's, and the group
//!   context to list the server's removal key as an external sender (no
//!   commit may take it out).
//! * **Commits and proposals** are PublicMessages. Each must verify against
//!   the current public state (member sender, valid signature, valid
//!   proposals), be signed by the leaf of the device that sends it, and
//!   name the current epoch: the first commit for an epoch wins and
//!   advances it, later ones get [`ErrorCode::StaleEpoch`] with the current
//!   epoch. Added members must come from KeyPackages this server handed out
//!   for exactly that device; the Welcome is required, must address exactly
//!   the added packages, and is stored in the inbox of those devices (never
//!   a list the client supplies). The roster (which devices may read and
//!   post) is the set of certified leaves after the commit.
//! * **Group repair**: every commit carries the GroupInfo of the epoch it
//!   creates, checked with [`mls::check_group_info`] against the public
//!   state after the commit (group context, confirmation tag, signed by the
//!   committer's leaf, external public key present, no other extension but
//!   the group's own ratchet tree) and kept as the group's current one (the
//!   creator's GroupInfo from the start); current members fetch it with
//!   `FetchGroupInfo`. An external commit (`NewMemberCommit` sender) is
//!   accepted only as a resync: from a current member device, carrying only
//!   the ExternalInit and the Remove of exactly that device's leaf, its new
//!   leaf certified for the same account and device. Everything else about
//!   it (epoch, first-commit-wins, the tree check) is as for any commit.
//! * **Application messages** are PrivateMessages for the current epoch from
//!   a current member device. Each is stored once, whatever the group size.
//! * **Visibility**: a member sees messages after the commit that added it;
//!   a removed member sees messages up to the commit that removed it, and
//!   nothing later. A non-member gets [`ErrorCode::NotMember`] whether or not
//!   the group exists.
//! * **Deletion**: a message is deleted once every current member (and
//!   every removed member still owed its removal) acknowledged it, or when
//!   retention expires; a Welcome when acknowledged or expired.

pub mod memory;
pub mod mls;
pub mod storage;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    GroupId, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal, ProposalStore, RatchetTreeIn, Sender,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

use crate::auth::{AccountId, DeviceCertificate, DeviceId};
use crate::limits::{
    CLAIM_BURST, CLAIM_REFILL, FETCH_BYTE_BUDGET, MAX_CACHED_ROSTERS, MAX_DEVICES_PER_ACCOUNT, MAX_FETCH_ENTRIES,
    MAX_GROUPS_LISTED, MAX_GROUP_STATE, MAX_KEY_PACKAGES, MAX_PENDING_PROPOSALS,
};
use crate::util::TokenBucket;
use crate::wire::{ErrorCode, Request, Response};

pub use storage::{GroupRecord, Membership, NewKeyPackage, SendContext, Storage};

/// Who sends a request: the device its connection authenticated, and the
/// account that device's certificate names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller {
    pub account: AccountId,
    pub device: DeviceId,
}

impl Caller {
    /// The caller a verified certificate describes.
    pub fn of(cert: &DeviceCertificate) -> Self {
        Self { account: cert.account, device: cert.device }
    }
}

/// Something to push to online connections after the request's writes are
/// durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A new message in `group` at `seq`, for these devices.
    Message { group: Vec<u8>, seq: u64, message: Vec<u8>, recipients: Arc<[DeviceId]> },
    /// A Welcome waits for `recipient`.
    Welcome { recipient: DeviceId },
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub response: Response,
    pub notifications: Vec<Notification>,
    /// False when the request changed nothing (the caller may roll back).
    pub wrote: bool,
}

/// Why a request was refused, or failed.
enum Refusal<E> {
    Client { code: ErrorCode, detail: u64, message: String },
    Storage(E),
    Internal(String),
}

impl<E> From<E> for Refusal<E> {
    fn from(e: E) -> Self {
        Refusal::Storage(e)
    }
}

fn refuse<E>(code: ErrorCode, message: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client { code, detail: 0, message: message.to_string() }
}

fn not_member<E>() -> Refusal<E> {
    refuse(ErrorCode::NotMember, "you are not a member of that group")
}

/// A leaf whose credential is not acceptable; `detail` is its index.
fn bad_leaf<E>(index: u32, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCredential,
        detail: u64::from(index),
        message: format!("leaf {index}: {why}"),
    }
}

/// A leaf hush never makes (extensions, oversized); `detail` is its index.
fn bad_shape<E>(index: u32, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCommit,
        detail: u64::from(index),
        message: format!("leaf {index}: {why}"),
    }
}

/// An added KeyPackage hush never makes; `detail` is its position.
fn bad_add_shape<E>(position: usize, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCommit,
        detail: u64::try_from(position).unwrap_or(u64::MAX),
        message: format!("added member {position}: {why}"),
    }
}

/// Refuses a group state above [`MAX_GROUP_STATE`].
fn check_state_size<E>(state: &[u8]) -> Result<(), Refusal<E>> {
    if state.len() > MAX_GROUP_STATE {
        return Err(refuse(
            ErrorCode::QuotaExceeded,
            format!("the group's state would be {} bytes; this server keeps at most {MAX_GROUP_STATE}", state.len()),
        ));
    }
    Ok(())
}

/// An added KeyPackage whose credential is not acceptable (it has no leaf
/// index yet); `detail` is its position among the commit's Adds.
fn bad_add<E>(position: usize, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCredential,
        detail: u64::try_from(position).unwrap_or(u64::MAX),
        message: format!("added member {position}: {why}"),
    }
}

/// The claim bucket's (rate per second, burst) and `now` on its clock: a
/// burst of [`CLAIM_BURST`], then one claim per [`CLAIM_REFILL`].
fn claim_bucket(now: u64) -> (f64, f64, f64) {
    let refill = CLAIM_REFILL.as_secs_f64().max(1.0);
    #[allow(clippy::cast_precision_loss)] // Unix seconds fit an f64 exactly for 285 million years.
    let now = now as f64;
    (1.0 / refill, f64::from(CLAIM_BURST), now)
}

/// Quotas the core enforces (see [`crate::limits`] for the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub retention_secs: u64,
    pub max_groups_per_account: u64,
    pub max_members_per_group: u64,
    pub max_log_per_group: u64,
    pub max_database_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        use crate::limits::*;
        Self {
            retention_secs: DEFAULT_RETENTION.as_secs(),
            max_groups_per_account: u64::from(DEFAULT_MAX_GROUPS_PER_ACCOUNT),
            max_members_per_group: u64::from(DEFAULT_MAX_MEMBERS_PER_GROUP),
            max_log_per_group: DEFAULT_MAX_LOG_PER_GROUP,
            max_database_bytes: DEFAULT_MAX_DATABASE_MB.saturating_mul(1024 * 1024),
        }
    }
}

/// The Delivery Service. Holds only in-memory rate-limit state; everything
/// durable is in the [`Storage`].
pub struct Delivery {
    crypto: RustCrypto,
    claims: HashMap<AccountId, TokenBucket>,
    retention_secs: u64,
    quotas: Quotas,
    /// Current member devices per group, valid for the epoch stored with
    /// them (membership changes only by a commit, which changes the epoch).
    /// Only the writer fills it; see [`Delivery::forget_cached`].
    rosters: HashMap<Vec<u8>, (u64, Arc<[DeviceId]>)>,
    /// The server's removal key, which every group must list as an
    /// external sender.
    removal_key: [u8; 32],
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("retention_secs", &self.retention_secs).finish_non_exhaustive()
    }
}

impl Delivery {
    /// Default quotas with this retention; groups must list `removal_key`.
    pub fn new(retention_secs: u64, removal_key: [u8; 32]) -> Self {
        Self::with_quotas(Quotas { retention_secs, ..Quotas::default() }, removal_key)
    }

    pub fn with_quotas(quotas: Quotas, removal_key: [u8; 32]) -> Self {
        Self {
            crypto: RustCrypto::default(),
            claims: HashMap::new(),
            retention_secs: quotas.retention_secs,
            quotas,
            rosters: HashMap::new(),
            removal_key,
        }
    }

    /// The removal key groups must list.
    pub fn removal_key(&self) -> [u8; 32] {
        self.removal_key
    }

    /// Drops cached state derived from the store. The writer calls this
    /// when a batch fails to commit: what the batch wrote never happened,
    /// so a roster cached from it may not be true.
    pub fn forget_cached(&mut self) {
        self.rosters.clear();
    }

    /// The current members of `group` at `epoch` (the current epoch).
    fn roster<S: Storage>(&mut self, store: &mut S, group: &[u8], epoch: u64) -> Result<Arc<[DeviceId]>, S::Error> {
        if let Some((e, members)) = self.rosters.get(group) {
            if *e == epoch {
                return Ok(members.clone());
            }
        }
        let members: Arc<[DeviceId]> = store.current_members(group)?.into();
        if self.rosters.len() >= MAX_CACHED_ROSTERS {
            self.rosters.clear();
        }
        self.rosters.insert(group.to_vec(), (epoch, members.clone()));
        Ok(members)
    }

    /// Refuses new data once the store reached its size quota.
    fn check_space<S: Storage>(&self, store: &mut S) -> Result<(), Refusal<S::Error>> {
        if store.database_bytes()? >= self.quotas.max_database_bytes {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                "the server's storage quota is full; nothing new can be stored until old messages are read or expire",
            ));
        }
        Ok(())
    }

    /// Whether a request may write (and so must go through the writer).
    pub fn writes(request: &Request) -> bool {
        !matches!(
            request,
            Request::Fetch { .. }
                | Request::FetchWelcomes
                | Request::ListGroups
                | Request::FetchGroupInfo { .. }
                | Request::CountKeyPackages
                | Request::Status
                | Request::Ping { .. }
        )
    }

    /// Handles one request from a registered device at time `now`.
    pub fn handle<S: Storage>(&mut self, store: &mut S, caller: Caller, request: Request, now: u64) -> Outcome {
        let kind = request.kind();
        match self.dispatch(store, caller, request, now) {
            Ok(outcome) => outcome,
            Err(Refusal::Client { code, detail, message }) => {
                Outcome { response: Response::Error { code, detail, message }, notifications: vec![], wrote: false }
            }
            Err(Refusal::Storage(e)) => internal(kind, &e.to_string()),
            Err(Refusal::Internal(e)) => internal(kind, &e),
        }
    }

    fn dispatch<S: Storage>(
        &mut self,
        store: &mut S,
        caller: Caller,
        request: Request,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let reply = |response| Ok(Outcome { response, notifications: vec![], wrote: false });
        let device = caller.device;
        match request {
            Request::Ping { nonce } => reply(Response::Pong { nonce }),
            Request::Status | Request::Register { .. } => {
                Err(Refusal::Internal("registration requests are handled by the session".into()))
            }
            Request::PublishKeyPackages { packages, last_resort } => {
                self.publish(store, &caller, &packages, last_resort, now)
            }
            Request::CountKeyPackages => {
                let (count, last_resort) = store.key_package_count(&device)?;
                reply(Response::KeyPackageCount { count, last_resort })
            }
            Request::ClaimKeyPackage { account: target } => self.claim(store, &caller.account, &AccountId(target), now),
            Request::CreateGroup { group_info, ratchet_tree } => {
                self.create_group(store, &caller, &group_info, &ratchet_tree, now)
            }
            Request::Send { message, welcome, group_info } => {
                self.send(store, &caller, message, welcome, group_info, now)
            }
            Request::Fetch { group, after, limit } => {
                let m = store.membership(&group, &device)?.ok_or_else(not_member)?;
                let limit = match usize::from(limit) {
                    0 => MAX_FETCH_ENTRIES,
                    n => n.min(MAX_FETCH_ENTRIES),
                };
                let (messages, more) =
                    store.fetch(&group, after.max(m.joined_after), m.left_at, limit, FETCH_BYTE_BUDGET)?;
                reply(Response::Messages { group, messages, more })
            }
            Request::Ack { group, seq } => {
                let m = store.membership(&group, &device)?.ok_or_else(not_member)?;
                let last = store.group(&group)?.map(|g| g.last_seq).unwrap_or(0);
                let visible_end = m.left_at.unwrap_or(last).min(last);
                let seq = seq.min(visible_end);
                if m.left_at.is_some_and(|left| seq >= left) {
                    // A removed device that has read up to its removal is
                    // done with the group: its row goes, and the group with
                    // it from its list.
                    store.delete_member(&group, &device)?;
                    self.delete_acknowledged(store, &group)?;
                } else if seq > m.acked {
                    store.set_acked(&group, &device, seq)?;
                    self.delete_acknowledged(store, &group)?;
                }
                Ok(Outcome { response: Response::Done, notifications: vec![], wrote: true })
            }
            Request::FetchWelcomes => {
                let welcomes = store.welcomes(&device, MAX_FETCH_ENTRIES, FETCH_BYTE_BUDGET)?;
                reply(Response::Welcomes { welcomes })
            }
            Request::AckWelcome { id } => {
                store.delete_welcome(&device, id)?;
                Ok(Outcome { response: Response::Done, notifications: vec![], wrote: true })
            }
            Request::ListGroups => reply(Response::Groups { groups: store.groups_of(&device, MAX_GROUPS_LISTED)? }),
            Request::FetchGroupInfo { group } => {
                store.membership(&group, &device)?.filter(Membership::is_current).ok_or_else(not_member)?;
                let group_info = store.group_info(&group)?.ok_or_else(|| {
                    refuse(
                        ErrorCode::NoGroupInfo,
                        "the group has no GroupInfo yet (created by an older server); any member's next commit stores one",
                    )
                })?;
                let carries_tree = mls::parse_group_info(&group_info)
                    .map_err(|e| Refusal::Internal(format!("stored GroupInfo: {e}")))?
                    .extensions()
                    .ratchet_tree()
                    .is_some();
                let ratchet_tree = if carries_tree {
                    None
                } else {
                    let record = store.group(&group)?.ok_or_else(not_member)?;
                    let (_, public) = load_public(&record.state, &group)?;
                    let tree = public.export_ratchet_tree();
                    Some(
                        openmls::prelude::tls_codec::Serialize::tls_serialize_detached(&tree)
                            .map_err(|e| Refusal::Internal(format!("encoding the tree: {e}")))?,
                    )
                };
                reply(Response::GroupInfo { group, group_info, ratchet_tree })
            }
        }
    }

    fn publish<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        packages: &[Vec<u8>],
        last_resort: Option<u16>,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        if packages.is_empty() {
            return Err(refuse(ErrorCode::InvalidKeyPackage, "no KeyPackages in the upload"));
        }
        let last_resort = last_resort.map(usize::from);
        if last_resort.is_some_and(|i| i >= packages.len()) {
            return Err(refuse(ErrorCode::Malformed, "the last-resort index is outside the upload"));
        }
        let mut new = Vec::with_capacity(packages.len());
        let mut seen = BTreeSet::new();
        for (i, data) in packages.iter().enumerate() {
            let detail = u64::try_from(i).unwrap_or(u64::MAX);
            let hash_ref = mls::validate_key_package(&self.crypto, data, &caller.account, &caller.device).map_err(
                |e| match e {
                    mls::KeyPackageError::Invalid(m) => Refusal::Client {
                        code: ErrorCode::InvalidKeyPackage,
                        detail,
                        message: format!("KeyPackage {i}: {m}"),
                    },
                    mls::KeyPackageError::Credential(m) => Refusal::Client {
                        code: ErrorCode::InvalidCredential,
                        detail,
                        message: format!("KeyPackage {i}: {m}"),
                    },
                },
            )?;
            if seen.insert(hash_ref.clone()) {
                new.push(NewKeyPackage { hash_ref, data: data.clone(), last_resort: last_resort == Some(i) });
            }
        }
        self.check_space(store)?;
        let (held, _) = store.key_package_count(&caller.device)?;
        let adding = new.iter().filter(|p| !p.last_resort).count();
        let total = usize::try_from(held).unwrap_or(usize::MAX).saturating_add(adding);
        if total > MAX_KEY_PACKAGES {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("at most {MAX_KEY_PACKAGES} KeyPackages per device; you hold {held}"),
            ));
        }
        store.add_key_packages(&caller.account, &caller.device, &new, now)?;
        let (count, last_resort) = store.key_package_count(&caller.device)?;
        Ok(Outcome { response: Response::KeyPackageCount { count, last_resort }, notifications: vec![], wrote: true })
    }

    fn claim<S: Storage>(
        &mut self,
        store: &mut S,
        claimer: &AccountId,
        target: &AccountId,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let (rate, burst, now_s) = claim_bucket(now);
        let bucket = self.claims.entry(*claimer).or_insert_with(|| TokenBucket::full(burst, now_s));
        if let Err(wait) = bucket.refill(rate, burst, now_s) {
            // Whole seconds, rounded up, at least one.
            let wait = Duration::from_secs_f64(wait);
            let wait = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0)).max(1);
            return Err(Refusal::Client {
                code: ErrorCode::RateLimited,
                detail: wait.saturating_mul(1000),
                message: format!("too many KeyPackage claims; retry in {wait} s"),
            });
        }
        let no_package = || refuse(ErrorCode::NoKeyPackage, "that account has no KeyPackage available");
        if !store.account_exists(target)? {
            return Err(no_package());
        }
        let mut packages = store.claim_key_packages(target, now)?;
        if packages.is_empty() {
            return Err(no_package());
        }
        packages.truncate(MAX_DEVICES_PER_ACCOUNT);
        bucket.spend();
        Ok(Outcome { response: Response::KeyPackages { packages }, notifications: vec![], wrote: true })
    }

    fn create_group<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group_info: &[u8],
        ratchet_tree: &[u8],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let invalid = |m: String| refuse(ErrorCode::InvalidMessage, m);
        let msg = MlsMessageIn::tls_deserialize_exact(group_info).map_err(|e| invalid(format!("GroupInfo: {e}")))?;
        let MlsMessageBodyIn::GroupInfo(info) = msg.extract() else {
            return Err(invalid("expected an MLS GroupInfo".into()));
        };
        let tree =
            RatchetTreeIn::tls_deserialize_exact(ratchet_tree).map_err(|e| invalid(format!("ratchet tree: {e}")))?;
        let group = info.group_id().as_slice().to_vec();
        if group.is_empty() || group.len() > crate::limits::MAX_GROUP_ID {
            return Err(invalid("group ids must be 1 to 255 bytes".into()));
        }
        // Before anything about the id's existence is looked at: ids are
        // bound to their creator, so nobody probes or squats another's.
        if !mls::group_id_bound_to(&group, &caller.account) {
            return Err(invalid(
                "a group's id must be bound to its creator's account (nonce, then the tag hush derives)".into(),
            ));
        }
        if store.group(&group)?.is_some() {
            return Err(refuse(ErrorCode::GroupExists, "you already created a group with this id"));
        }
        self.check_space(store)?;
        let groups = store.groups_count(&caller.account)?;
        if groups >= self.quotas.max_groups_per_account {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("you are in {groups} groups, the most this server allows"),
            ));
        }
        let storage = MemoryStorage::default();
        let (public, _) = mls::PublicGroup::from_external(&self.crypto, &storage, tree, info, ProposalStore::new())
            .map_err(|e| refuse(ErrorCode::InvalidCommit, format!("the group does not verify: {e}")))?;
        let members: Vec<_> = public.members().collect();
        let [only] = members.as_slice() else {
            return Err(refuse(
                ErrorCode::InvalidCommit,
                "a new group must contain exactly one member: you (add others with a commit)",
            ));
        };
        let cert =
            mls::leaf_certificate(&only.credential, &only.signature_key).map_err(|e| bad_leaf(only.index.u32(), e))?;
        let leaf = public.leaf(only.index).ok_or_else(|| Refusal::Internal("the only leaf is missing".into()))?;
        mls::check_leaf_shape(leaf).map_err(|m| bad_shape(only.index.u32(), m))?;
        if Caller::of(&cert) != *caller {
            return Err(bad_leaf(only.index.u32(), "a new group's only leaf must be your own device's"));
        }
        if !mls::lists_server(public.group_context(), &self.removal_key) {
            return Err(refuse(
                ErrorCode::InvalidCommit,
                "a new group must list this server's removal key as an external sender (see the Status response)",
            ));
        }
        // The GroupInfo is kept: a member that cannot process the first
        // commit rejoins from it.
        mls::check_group_info(&self.crypto, group_info, &public, only.index)
            .map_err(|m| refuse(ErrorCode::InvalidCommit, m))?;
        let epoch = public.group_context().epoch().as_u64();
        let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
        check_state_size(&state)?;
        store.insert_group(&group, epoch, &state, now)?;
        store.set_group_info(&group, group_info)?;
        store.add_member(&group, &caller.device, &caller.account, 0)?;
        Ok(Outcome { response: Response::Accepted { group, seq: 0, epoch }, notifications: vec![], wrote: true })
    }

    fn send<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        bytes: Vec<u8>,
        welcome: Option<Vec<u8>>,
        group_info: Option<Vec<u8>>,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let framed = mls::frame(&bytes).map_err(|m| refuse(ErrorCode::InvalidMessage, m))?;
        if group_info.is_some() && framed.kind != mls::Kind::Commit {
            return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a GroupInfo"));
        }
        let group = framed.group.clone();
        let context = store.send_context(&group, &caller.device)?.ok_or_else(not_member)?;
        let epoch = context.epoch;
        if !context.membership.is_some_and(|m| m.is_current()) {
            return Err(not_member());
        }
        if framed.epoch != epoch {
            return Err(Refusal::Client {
                code: ErrorCode::StaleEpoch,
                detail: epoch,
                message: format!("the group is at epoch {epoch}, the message is for epoch {}", framed.epoch),
            });
        }
        self.check_space(store)?;
        if framed.kind != mls::Kind::Commit {
            let backlog = context.log_len;
            if backlog >= self.quotas.max_log_per_group {
                return Err(refuse(
                    ErrorCode::QuotaExceeded,
                    format!("the group holds {backlog} unread messages, the most this server keeps; members must catch up (commits are still accepted)"),
                ));
            }
        }
        match framed.kind {
            mls::Kind::Application => {
                if welcome.is_some() {
                    return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a Welcome"));
                }
                let seq = store.append(&group, epoch, &bytes, now)?;
                let recipients = self.roster(store, &group, epoch)?;
                Ok(Outcome {
                    response: Response::Accepted { group: group.clone(), seq, epoch },
                    notifications: vec![Notification::Message { group, seq, message: bytes, recipients }],
                    wrote: true,
                })
            }
            mls::Kind::Commit | mls::Kind::Proposal => {
                // Only handshakes need the public state.
                let record = store.group(&group)?.ok_or_else(not_member)?;
                self.handshake(store, caller, &group, record, framed, bytes, welcome, group_info, now)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handshake<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: &[u8],
        record: GroupRecord,
        framed: mls::Framed,
        bytes: Vec<u8>,
        welcome: Option<Vec<u8>>,
        group_info: Option<Vec<u8>>,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let invalid_commit = |m: String| refuse(ErrorCode::InvalidCommit, m);
        let (storage, mut public) = load_public(&record.state, group)?;
        // Who holds each leaf before this message (every leaf was checked
        // when it entered the tree).
        let mut holders: HashMap<u32, Caller> = HashMap::new();
        for m in public.members() {
            let (account, device) = mls::holder_of(&m.credential)
                .ok_or_else(|| Refusal::Internal(format!("stored leaf {} holds no certificate", m.index.u32())))?;
            holders.insert(m.index.u32(), Caller { account, device });
        }
        let processed = public
            .process_message(&self.crypto, framed.message)
            .map_err(|e| invalid_commit(format!("the message does not verify: {e}")))?;
        // A member's own commit or proposal, or a member device's resync
        // (an external commit that replaces its own leaf).
        let sender = match processed.sender() {
            Sender::Member(index) => Some(index.u32()),
            Sender::NewMemberCommit => None,
            _ => {
                return Err(invalid_commit(
                    "only members' own commits and proposals, and a member's resync of its own leaf, are accepted"
                        .into(),
                ))
            }
        };
        if let Some(sender) = sender {
            if holders.get(&sender) != Some(caller) {
                return Err(invalid_commit("the message is signed by another device's leaf".into()));
            }
        }
        // A leaf may change its keys, never whose it is.
        let same_holder = |index: u32, leaf: &openmls::prelude::LeafNode| -> Result<(), Refusal<S::Error>> {
            mls::check_leaf_shape(leaf).map_err(|m| bad_shape(index, m))?;
            let cert = mls::node_certificate(leaf).map_err(|e| bad_leaf(index, e))?;
            if holders.get(&index) != Some(&Caller::of(&cert)) {
                return Err(bad_leaf(index, "an update may not change the leaf's account or device"));
            }
            Ok(())
        };
        let before = store.current_members(group)?;
        match processed.into_content() {
            ProcessedMessageContent::ProposalMessage(queued) => {
                let Some(sender) = sender else {
                    return Err(invalid_commit("a proposal from outside the group".into()));
                };
                if welcome.is_some() {
                    return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a Welcome"));
                }
                match queued.proposal() {
                    Proposal::Update(update) => same_holder(sender, update.leaf_node())?,
                    Proposal::Add(add) => {
                        let kp = add.key_package();
                        mls::check_key_package_shape(kp).map_err(|m| bad_add_shape(0, m))?;
                        mls::node_certificate(kp.leaf_node()).map_err(|e| bad_add(0, e))?;
                    }
                    _ => {}
                }
                let pending = public
                    .queued_proposals(&storage)
                    .map_err(|e| Refusal::Internal(format!("reading the proposals: {e:?}")))?
                    .len();
                if pending >= MAX_PENDING_PROPOSALS {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!("the group has {pending} proposals waiting, the most it may; commit them first"),
                    ));
                }
                public
                    .add_proposal(&storage, *queued)
                    .map_err(|e| Refusal::Internal(format!("storing the proposal: {e:?}")))?;
                let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
                check_state_size(&state)?;
                let seq = store.append(group, record.epoch, &bytes, now)?;
                store.update_group(group, record.epoch, &state)?;
                Ok(Outcome {
                    response: Response::Accepted { group: group.to_vec(), seq, epoch: record.epoch },
                    notifications: vec![Notification::Message {
                        group: group.to_vec(),
                        seq,
                        message: bytes,
                        recipients: before.into(),
                    }],
                    wrote: true,
                })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                match sender {
                    Some(sender) => {
                        if let Some(leaf) = staged.update_path_leaf_node() {
                            same_holder(sender, leaf)?;
                        }
                    }
                    None => check_resync(&staged, caller, &holders)?,
                }
                for update in staged.update_proposals() {
                    let Sender::Member(index) = update.sender() else {
                        return Err(invalid_commit("an update proposal from outside the group".into()));
                    };
                    same_holder(index.u32(), update.update_proposal().leaf_node())?;
                }
                // Whom does the commit add? Only devices whose KeyPackage
                // this server handed out, certified for exactly that device.
                let mut added = Vec::new();
                for (position, add) in staged.add_proposals().enumerate() {
                    let kp = add.add_proposal().key_package();
                    mls::check_key_package_shape(kp).map_err(|m| bad_add_shape(position, m))?;
                    let cert = mls::node_certificate(kp.leaf_node()).map_err(|e| bad_add(position, e))?;
                    let hash_ref = kp
                        .hash_ref(&self.crypto)
                        .map_err(|e| Refusal::Internal(format!("hashing a KeyPackage: {e}")))?;
                    match store.claimed_owner(hash_ref.as_slice())? {
                        Some((account, device)) if account == cert.account && device == cert.device => {
                            added.push((hash_ref.as_slice().to_vec(), Caller::of(&cert)));
                        }
                        _ => {
                            return Err(invalid_commit(
                                "the commit adds a KeyPackage this server did not hand out for that device".into(),
                            ))
                        }
                    }
                }
                // Groups an account is in count against its quota, however it
                // got there: the adder learns whom the group would take over.
                let accounts: BTreeSet<AccountId> = added.iter().map(|(_, c)| c.account).collect();
                for account in accounts {
                    let groups = store.groups_count(&account)?;
                    if groups >= self.quotas.max_groups_per_account {
                        return Err(refuse(
                            ErrorCode::QuotaExceeded,
                            format!(
                                "account {} is in {groups} groups, the most this server allows; it cannot be added",
                                account.short()
                            ),
                        ));
                    }
                }
                let welcome = match (added.is_empty(), welcome) {
                    (true, None) => None,
                    (true, Some(_)) => {
                        return Err(refuse(ErrorCode::InvalidMessage, "a Welcome needs a commit that adds members"))
                    }
                    (false, None) => {
                        return Err(refuse(ErrorCode::InvalidMessage, "a commit that adds members needs their Welcome"))
                    }
                    (false, Some(w)) => {
                        check_welcome(&w, &added).map_err(|m| refuse(ErrorCode::InvalidMessage, m))?;
                        Some(w)
                    }
                };
                public
                    .merge_commit(&storage, *staged)
                    .map_err(|e| Refusal::Internal(format!("merging the commit: {e:?}")))?;
                let epoch = public.group_context().epoch().as_u64();
                // The tree after the commit: each device once, the server
                // still an external sender. (Every leaf that entered or
                // changed with this commit was verified above: adds,
                // updates, the committer's path leaf.)
                let mut roster: BTreeMap<DeviceId, AccountId> = BTreeMap::new();
                for m in public.members() {
                    let (account, device) = mls::holder_of(&m.credential)
                        .ok_or_else(|| bad_leaf(m.index.u32(), "the leaf holds no device certificate"))?;
                    if roster.insert(device, account).is_some() {
                        return Err(bad_leaf(m.index.u32(), "this device already has a leaf in the group"));
                    }
                }
                if !mls::lists_server(public.group_context(), &self.removal_key) {
                    return Err(invalid_commit(
                        "the commit would take this server's removal key out of the group's external senders".into(),
                    ));
                }
                // The GroupInfo of the new epoch, signed by the committer's
                // leaf: what a member that cannot process this commit rejoins
                // from.
                let Some(group_info) = group_info else {
                    return Err(refuse(
                        ErrorCode::InvalidMessage,
                        "a commit must carry the GroupInfo of the epoch it creates",
                    ));
                };
                let committer = leaf_of(&public, caller)
                    .ok_or_else(|| Refusal::Internal("the committer has no leaf after its commit".into()))?;
                mls::check_group_info(&self.crypto, &group_info, &public, committer)
                    .map_err(|e| refuse(ErrorCode::InvalidCommit, e))?;
                let size = u64::try_from(roster.len()).unwrap_or(u64::MAX);
                if size > self.quotas.max_members_per_group {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "the group would have {size} members; this server allows {}",
                            self.quotas.max_members_per_group
                        ),
                    ));
                }
                let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
                check_state_size(&state)?;
                let seq = store.append(group, record.epoch, &bytes, now)?;
                store.update_group(group, epoch, &state)?;
                store.set_group_info(group, &group_info)?;
                let before_set: BTreeSet<DeviceId> = before.iter().copied().collect();
                for (device, account) in &roster {
                    if !before_set.contains(device) {
                        store.add_member(group, device, account, seq)?;
                    }
                }
                for device in before_set.iter().filter(|d| !roster.contains_key(d)) {
                    store.remove_member(group, device, seq, record.epoch)?;
                }
                let mut notifications = Vec::new();
                if let Some(w) = &welcome {
                    let recipients: BTreeSet<DeviceId> = added.iter().map(|(_, c)| c.device).collect();
                    for r in recipients {
                        store.add_welcome(&r, group, w, now)?;
                        notifications.push(Notification::Welcome { recipient: r });
                    }
                }
                // Everyone who was a member sees the commit, removed members
                // included (it tells them they were removed).
                notifications.insert(
                    0,
                    Notification::Message { group: group.to_vec(), seq, message: bytes, recipients: before.into() },
                );
                Ok(Outcome {
                    response: Response::Accepted { group: group.to_vec(), seq, epoch },
                    notifications,
                    wrote: true,
                })
            }
            _ => Err(refuse(ErrorCode::InvalidMessage, "expected a commit or a proposal")),
        }
    }

    /// Deletes messages every member who still needs them has acknowledged.
    fn delete_acknowledged<S: Storage>(&mut self, store: &mut S, group: &[u8]) -> Result<(), Refusal<S::Error>> {
        let mut floor = u64::MAX;
        for (_, m) in store.members(group)? {
            match m.left_at {
                None => floor = floor.min(m.acked.max(m.joined_after)),
                // A removed member is owed the messages up to its removal.
                Some(left) if m.acked < left => floor = floor.min(m.acked.max(m.joined_after)),
                Some(_) => {}
            }
        }
        if floor != u64::MAX && floor > 0 {
            store.delete_messages_upto(group, floor)?;
        }
        Ok(())
    }

    /// Expires messages, Welcomes and claim records past retention, and
    /// forgets idle rate-limit buckets. Returns rows deleted.
    pub fn expire<S: Storage>(&mut self, store: &mut S, now: u64) -> Result<u64, S::Error> {
        let (rate, burst, now_s) = claim_bucket(now);
        self.claims.retain(|_, b| !b.is_full(rate, burst, now_s));
        store.expire(now.saturating_sub(self.retention_secs))
    }
}

/// A group's public state from its stored blob.
fn load_public<E>(state: &[u8], group: &[u8]) -> Result<(MemoryStorage, mls::PublicGroup), Refusal<E>> {
    let storage = mls::decode_state(state).map_err(|e| Refusal::Internal(format!("group state: {e}")))?;
    let public = mls::PublicGroup::load(&storage, &GroupId::from_slice(group))
        .map_err(|e| Refusal::Internal(format!("group state: {e:?}")))?
        .ok_or_else(|| Refusal::Internal("group state missing".into()))?;
    Ok((storage, public))
}

/// The leaf `caller`'s device holds in `public` (each device holds at most
/// one, checked after every commit).
fn leaf_of(public: &mls::PublicGroup, caller: &Caller) -> Option<openmls::prelude::LeafNodeIndex> {
    public.members().find(|m| mls::holder_of(&m.credential) == Some((caller.account, caller.device))).map(|m| m.index)
}

/// Accepts an external commit only as a resync: from a device that holds
/// a leaf in the group (`holders`, before the commit), carrying nothing but
/// the ExternalInit and the Remove of exactly that leaf, with a new leaf
/// certified for the same account and device.
fn check_resync<E>(
    staged: &openmls::prelude::StagedCommit,
    caller: &Caller,
    holders: &HashMap<u32, Caller>,
) -> Result<(), Refusal<E>> {
    let invalid = |m: &str| refuse(ErrorCode::InvalidCommit, m);
    let own = holders.iter().find(|(_, h)| *h == caller).map(|(i, _)| *i);
    let Some(own) = own else {
        return Err(invalid("a resync must come from a device that has a leaf in the group"));
    };
    let mut removed = Vec::new();
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::ExternalInit(_) => {}
            Proposal::Remove(r) => removed.push(r.removed().u32()),
            _ => return Err(invalid("a resync may carry only its ExternalInit and the Remove of its own leaf")),
        }
    }
    if removed != [own] {
        return Err(invalid("a resync must remove exactly the rejoining device's own leaf, and no other"));
    }
    let leaf = staged.update_path_leaf_node().ok_or_else(|| invalid("a resync must carry a new leaf"))?;
    mls::check_leaf_shape(leaf).map_err(|m| bad_shape(own, m))?;
    let cert = mls::node_certificate(leaf).map_err(|e| bad_leaf(own, e))?;
    if Caller::of(&cert) != *caller {
        return Err(bad_leaf(own, "a resync's new leaf must be certified for the same device"));
    }
    Ok(())
}

/// Checks that a Welcome addresses exactly the added KeyPackages.
fn check_welcome(bytes: &[u8], added: &[(Vec<u8>, Caller)]) -> Result<(), String> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| format!("Welcome: {e}"))?;
    let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
        return Err("expected an MLS Welcome".into());
    };
    let addressed: BTreeSet<Vec<u8>> = welcome.secrets().iter().map(|s| s.new_member().as_slice().to_vec()).collect();
    let expected: BTreeSet<Vec<u8>> = added.iter().map(|(r, _)| r.clone()).collect();
    if addressed != expected {
        return Err("the Welcome does not address exactly the members the commit adds".into());
    }
    Ok(())
}

fn internal(kind: &str, detail: &str) -> Outcome {
    tracing::warn!(request = kind, "internal error: {detail}");
    Outcome {
        response: Response::error(ErrorCode::Internal, "internal server error; nothing was changed"),
        notifications: vec![],
        wrote: false,
    }
}

#[cfg(test)]
mod tests;

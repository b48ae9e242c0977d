//! The Delivery Service rules (RFC 9750), sans-IO.
//!
//! [`Delivery::handle`] takes who sends ([`Origin`]: a registered device,
//! or a key that is not one yet), a decoded request and the current time,
//! runs it against a [`Storage`], and returns the response plus the
//! [`Notification`]s to push. It knows no sockets and reads no clock; the
//! server calls it on its storage threads; its rule tests run on every
//! storage (a [`memory::MemoryStore`], SQLite and PostgreSQL, each request
//! in its own savepoint as the engine runs it), the fuzzer on a
//! `MemoryStore`. Every request kind is answered here, except
//! `Ping`, which the connection answers itself (it measures the transport):
//! `handle` checks who may send it and hands it to its handler, one per
//! kind, next to its siblings (`accounts`, `devices`, `links`,
//! `key_packages`, `groups`, `handshake`, `reading`).
//!
//! # Rules
//!
//! * **Registration**: a key that is not a registered device may only
//!   `Register` a new account, with a device certificate for exactly that
//!   key (an invite is required unless the operator opened registration,
//!   [`Quotas`], and one of its uses is spent in the same unit of work that
//!   creates the account), `Register` a further device of an existing
//!   account whose key signed its certificate (a restored backup: no
//!   invite, within the device caps), or take the new device's part in
//!   linking ([`links`]).
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
//!   [`crate::limits::MAX_KEY_PACKAGES`] per device; one may be last-resort. A claim names
//!   an account and removes one package of each of its devices (a
//!   last-resort one is returned and kept) and records each `KeyPackageRef`
//!   with its account and device, so the server later knows whose package a
//!   commit adds. Claims are rate-limited per claiming account: a burst of
//!   [`crate::limits::CLAIM_BURST`], then one per [`crate::limits::CLAIM_REFILL`].
//! * **Groups** are created from a GroupInfo and ratchet tree, with an id
//!   bound to the creator's account ([`mls::group_id_for`]), checked before
//!   the id's existence is (so a non-member learns nothing and squats
//!   nothing by trying another's id); the server
//!   builds an openmls [`mls::PublicGroup`] (public state only) and requires
//!   the tree to hold exactly one leaf, the creating device's, and the group
//!   context to list the server's removal key as its one external sender (no
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
//!   post) is the set of certified leaves after the commit, except a leaf
//!   whose device is no longer a member (it left, or the operator removed
//!   it) and whose removal the commit did not take: that one does not
//!   come back, and the server proposes its removal again.
//! * **Proposals hush uses, and no others** ([`mls::check_proposal_use`],
//!   the same rule the client applies): on its own, an Update of the
//!   sender's own leaf or a Remove; inside a member's commit, Add, Update,
//!   Remove and (inline, by the committer, only to change hush's settings:
//!   [`mls::check_context_extensions`]) GroupContextExtensions; inside an
//!   external commit, the ExternalInit and the Remove of the sender's own
//!   leaf. A Remove of leaves of the sender's own
//!   account is its leaving: the membership ends at once, committed or not
//!   (so a group of strangers cannot hold an account's quota).
//! * **Group repair**: every commit carries the GroupInfo of the epoch it
//!   creates, checked with [`mls::check_group_info`] against the public
//!   state after the commit (group context, confirmation tag, signed by the
//!   committer's leaf, external public key present, no other extension but
//!   the group's own ratchet tree) and kept as the group's current one (the
//!   creator's GroupInfo from the start); current members fetch it with
//!   `FetchGroupInfo`, and so does a new device of a member's account. An
//!   external commit (`NewMemberCommit` sender) is accepted only as a
//!   resync (from a current member device, carrying only the ExternalInit
//!   and the Remove of exactly that device's leaf) or as a new device of a
//!   member's account joining (only the ExternalInit); either way its new
//!   leaf is certified for that account and device. Everything else about
//!   it (epoch, first-commit-wins, the tree check) is as for any commit.
//! * **Devices**: an account may have several (linked through the server
//!   by a one-time code, [`links`]); adding a person adds all their
//!   unrevoked devices in one commit ([`handshake`]); a revoked device (or
//!   every device of an account the operator removed) is refused at once
//!   and the server, as every group's one external sender, proposes the
//!   removal of its leaves ([`devices`]).
//! * **Application messages** are PrivateMessages for the current epoch from
//!   a current member device. Each is stored once, whatever the group size.
//! * **Visibility**: a member sees messages after the commit that added it;
//!   a removed member sees messages up to the commit that removed it, and
//!   nothing later. A non-member gets [`ErrorCode::NotMember`] whether or not
//!   the group exists.
//! * **Deletion**: a message is deleted once every current member (and
//!   every removed member still owed its removal) acknowledged it, or when
//!   retention expires; a Welcome when acknowledged or expired.
//! * **Disappearing messages** (issue 33): the group's timer is read from
//!   the group context each commit leaves ([`mls::settings_of`]); each
//!   application message accepted afterwards expires that long after (or
//!   at retention, if sooner). One whose time is up is served as `gone`
//!   (its epoch and digest, its link in the chain, never its bytes), and
//!   [`Delivery::expire_messages`] deletes its bytes for good; blobs
//!   completed in the group expire with the same timer.

mod accounts;
mod blobs;
mod devices;
mod groups;
mod handshake;
mod key_packages;
mod links;
pub mod memory;
mod reading;
use crate::mls;
mod retention;
pub mod storage;

use std::collections::HashMap;
use std::sync::Arc;

use openmls_rust_crypto::RustCrypto;

use crate::auth::{AccountId, DeviceCertificate, DeviceId};
use crate::limits::{EVICTION_SAMPLE, MAX_CACHED_ROSTERS, MAX_CACHED_TREES};
use crate::mls::Suite;
use crate::util::TokenBucket;
use crate::wire::{ErrorCode, Request, Response};

pub use devices::{Removal, RemoveError};
pub use handshake::{NoVerdict, Prepared, Snapshot};
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

/// What a key that is not a registered device is told when it asks for
/// anything but registration.
pub const NOT_REGISTERED: &str = "this key is not a registered device on this server; register with an invite first";

/// Who sends a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A key that is not a registered device (yet).
    Stranger(DeviceId),
    /// A registered device.
    Device(Caller),
}

impl From<Caller> for Origin {
    fn from(caller: Caller) -> Self {
        Origin::Device(caller)
    }
}

/// Something to push to online connections after the request's writes are
/// durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A new message in `group` at `seq` (with the group's chain head
    /// after it), for these devices.
    Message {
        group: Vec<u8>,
        seq: u64,
        head: Option<crate::chain::Head>,
        message: Vec<u8>,
        recipients: Arc<[DeviceId]>,
    },
    /// A Welcome waits for `recipient`.
    Welcome { recipient: DeviceId },
    /// `device` was revoked: close its connections.
    Revoked { device: DeviceId },
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub response: Response,
    pub notifications: Vec<Notification>,
    /// False when the request changed nothing (the caller may roll back).
    pub wrote: bool,
    /// Set by a successful `Register`: the connection now acts as this
    /// device.
    pub registered: Option<Caller>,
    /// A handshake given back unapplied ([`NoVerdict::GiveBack`]): it
    /// had no verdict prepared off the writer that still held (the group
    /// changed since the snapshot, or had no snapshot for it). The caller
    /// verifies it off the writer again and resubmits it; nothing was
    /// written.
    pub again: Option<Box<Request>>,
}

impl Outcome {
    /// A response to a request that changed nothing.
    pub fn reply(response: Response) -> Self {
        Self { response, notifications: vec![], wrote: false, registered: None, again: None }
    }

    /// A response to a request that wrote, and what to push once durable.
    pub fn wrote(response: Response, notifications: Vec<Notification>) -> Self {
        Self { response, notifications, wrote: true, registered: None, again: None }
    }

    /// The answer to a request that failed on the server's side.
    pub fn internal() -> Self {
        Self::reply(Response::error(ErrorCode::Internal, "internal server error; nothing was changed"))
    }
}

/// Why a request was refused, or failed.
enum Refusal<E> {
    Client {
        code: ErrorCode,
        detail: u64,
        message: String,
    },
    Storage(E),
    Internal(String),
    /// A handshake without a verdict that holds, given back to be
    /// verified off the writer again (see [`Outcome::again`]).
    Again(Box<Request>),
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

/// Quotas the core enforces (see [`crate::limits`] for the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub retention_secs: u64,
    pub max_groups_per_account: u64,
    pub max_members_per_group: u64,
    pub max_log_per_group: u64,
    pub max_database_bytes: u64,
    /// Largest blob a member may upload.
    pub max_file_bytes: u64,
    /// Blob storage per account (open uploads count in full).
    pub storage_quota_bytes: u64,
    /// Unfinished uploads one device may have.
    pub uploads_per_device: u64,
    /// Registration needs an invite (false: anyone may register).
    pub invite_required: bool,
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
            max_file_bytes: DEFAULT_MAX_FILE_MB.saturating_mul(1024 * 1024),
            storage_quota_bytes: DEFAULT_STORAGE_QUOTA_MB.saturating_mul(1024 * 1024),
            uploads_per_device: DEFAULT_UPLOADS_PER_DEVICE,
            invite_required: true,
        }
    }
}

/// What a cached roster is valid for: a group's (epoch, state version).
type RosterKey = (u64, u64);

/// What the core keeps of each group, each value valid at one
/// [`RosterKey`]: devices (its members, or its revoked members, on the
/// writer) or the ratchet tree it hands out with a GroupInfo (on the
/// reader); at most `LIMIT` groups. When full, the shortest of
/// [`EVICTION_SAMPLE`] values goes first (of all of them, in a cache no
/// larger): it is the cheapest to read or decode again, so many small
/// groups (an account can make them at will) do not push out a large one.
struct GroupCache<T, const LIMIT: usize = MAX_CACHED_ROSTERS>(HashMap<Vec<u8>, (RosterKey, Arc<[T]>)>);

impl<T, const LIMIT: usize> Default for GroupCache<T, LIMIT> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<T, const LIMIT: usize> GroupCache<T, LIMIT> {
    /// `group`'s value, if it was kept at exactly `at`.
    fn get(&self, group: &[u8], at: RosterKey) -> Option<Arc<[T]>> {
        self.0.get(group).filter(|(key, _)| *key == at).map(|(_, value)| value.clone())
    }

    /// Keeps `value` as `group`'s at `at`.
    fn put(&mut self, group: &[u8], at: RosterKey, value: Arc<[T]>) {
        if self.0.len() >= LIMIT && !self.0.contains_key(group) {
            let shortest =
                self.0.iter().take(EVICTION_SAMPLE).min_by_key(|(_, (_, v))| v.len()).map(|(g, _)| g.clone());
            if let Some(shortest) = shortest {
                self.0.remove(&shortest);
            }
        }
        self.0.insert(group.to_vec(), (at, value));
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The Delivery Service. Holds only in-memory rate-limit state; everything
/// durable is in the [`Storage`].
pub struct Delivery {
    crypto: RustCrypto,
    claims: HashMap<AccountId, TokenBucket>,
    retention_secs: u64,
    quotas: Quotas,
    /// Current member devices per group, valid for the epoch and state
    /// version stored with them. Membership changes by a commit (a new
    /// epoch), by leaving (a proposal: a new state version, same epoch) and
    /// by the operator (sometimes without a new state); every membership
    /// that starts or ends advances the version too (the stores do it, on
    /// SQLite and PostgreSQL by trigger), so this holds whichever process
    /// or node made the change. Only the writer fills it; see
    /// [`Delivery::forget_cached`].
    rosters: GroupCache<DeviceId>,
    /// Which of a group's current members are revoked (their removal still
    /// to be committed), at the (epoch, version) stored with them: on
    /// SQLite and in memory a device revoked advances the version of every
    /// group it is a member of. Kept like [`Delivery::rosters`], and never
    /// on a shared database (see [`Storage::SHARED`]).
    revoked: GroupCache<DeviceId>,
    /// The ratchet tree of each group whose GroupInfo does not carry it (a
    /// commit that adds nobody leaves it out), encoded as it is handed out
    /// with the GroupInfo, at the group's (epoch, version): decoding a
    /// large group's state for it costs milliseconds, and a member may ask
    /// again and again. Only the reader fills it.
    trees: GroupCache<u8, MAX_CACHED_TREES>,
    /// The server's removal key, which every group must list as an
    /// external sender.
    removal_key: [u8; 32],
    /// Its private half, on the engine's writer only: it signs the
    /// server's removal proposals ([`devices`]).
    removal_signer: Option<Arc<crate::auth::Identity>>,
    /// The server's current key (its identity key, or an online key the
    /// identity certified), on the engine's reader: it signs chain heads
    /// a member asks for (`Head`).
    head_signer: Option<crate::auth::online::CurrentKey>,
    /// The digest of the message of the request being handled, computed
    /// before it reached the writer ([`Delivery::handle_digested`]).
    digest: Option<crate::chain::MessageDigest>,
    /// The handshake of the request being handled, verified off the
    /// writer ([`Delivery::handle_prepared`]).
    prepared: Option<Prepared>,
    /// What becomes of the request's handshake if it has no verdict that
    /// holds ([`Delivery::handle_prepared`]).
    no_verdict: NoVerdict,
    /// Handshakes applied from a prepared verdict (for tests and metrics).
    prepared_used: u64,
}

/// The keys a server's Delivery Service signs with: its removal key
/// (external sender of every group) and its current key (the identity
/// key its address pins, or an online key that identity certified),
/// which signs chain heads.
#[derive(Clone)]
pub struct ServerKeys {
    pub removal: Arc<crate::auth::Identity>,
    pub current: crate::auth::online::CurrentKey,
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKeys(..)")
    }
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
            rosters: GroupCache::default(),
            revoked: GroupCache::default(),
            trees: GroupCache::default(),
            removal_key,
            removal_signer: None,
            head_signer: None,
            digest: None,
            prepared: None,
            no_verdict: NoVerdict::Verify,
            prepared_used: 0,
        }
    }

    /// Lets this instance sign chain heads with the server's current key.
    pub fn with_head_signer(mut self, signer: crate::auth::online::CurrentKey) -> Self {
        self.head_signer = Some(signer);
        self
    }

    /// Lets this instance propose removals (revoked devices, removed
    /// accounts) with the server's removal key.
    pub fn with_removal_signer(mut self, signer: Arc<crate::auth::Identity>) -> Self {
        if signer.public_key() == self.removal_key {
            self.removal_signer = Some(signer);
        }
        self
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
        self.revoked.clear();
        self.trees.clear();
    }

    /// The current members of `group` at `at` (its current epoch and
    /// state version).
    fn roster<S: Storage>(&mut self, store: &mut S, group: &[u8], at: RosterKey) -> Result<Arc<[DeviceId]>, S::Error> {
        if let Some(members) = self.rosters.get(group, at) {
            return Ok(members);
        }
        let mut members = store.current_members(group)?;
        // Sorted, as a commit's roster is: the two are compared in one walk.
        members.sort_unstable();
        members.dedup();
        let members: Arc<[DeviceId]> = members.into();
        self.rosters.put(group, at, members.clone());
        Ok(members)
    }

    /// The current members of `group` that are revoked, at `at` (its
    /// current epoch and state version).
    fn revoked_at<S: Storage>(
        &mut self,
        store: &mut S,
        group: &[u8],
        at: RosterKey,
    ) -> Result<Arc<[DeviceId]>, S::Error> {
        if let Some(devices) = self.revoked.get(group, at) {
            return Ok(devices);
        }
        let devices: Arc<[DeviceId]> = store.revoked_members(group)?.into();
        self.revoked.put(group, at, devices.clone());
        Ok(devices)
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

    /// [`Delivery::handle`] for a request whose message's digest
    /// ([`crate::chain::MessageDigest::of`] of a `Send`'s message) was
    /// computed before: the writer does not hash it again.
    pub fn handle_digested<S: Storage>(
        &mut self,
        store: &mut S,
        origin: impl Into<Origin>,
        request: Request,
        now: u64,
        digest: Option<crate::chain::MessageDigest>,
    ) -> Outcome {
        self.handle_prepared(store, origin, request, now, digest, None, NoVerdict::Verify)
    }

    /// [`Delivery::handle_digested`] for a request whose handshake was
    /// verified off the writer ([`Delivery::prepare`]): the verdict is
    /// used if the group's state is still the one it was verified against;
    /// a handshake without one that holds is handled as `no_verdict` says.
    #[allow(clippy::too_many_arguments)] // One request and what came with it.
    pub fn handle_prepared<S: Storage>(
        &mut self,
        store: &mut S,
        origin: impl Into<Origin>,
        request: Request,
        now: u64,
        digest: Option<crate::chain::MessageDigest>,
        prepared: Option<Prepared>,
        no_verdict: NoVerdict,
    ) -> Outcome {
        self.digest = digest;
        self.prepared = prepared;
        self.no_verdict = no_verdict;
        let out = self.handle(store, origin, request, now);
        self.digest = None;
        self.prepared = None;
        self.no_verdict = NoVerdict::Verify;
        out
    }

    /// How many handshakes were applied from a verdict prepared off the
    /// writer (the rest were verified where they were applied).
    pub fn prepared_used(&self) -> u64 {
        self.prepared_used
    }

    /// The digest of the request's message `bytes`: computed before, or
    /// now. (Only for the message of the request being handled.)
    fn digest_of(&mut self, bytes: &[u8]) -> crate::chain::MessageDigest {
        self.digest.take().unwrap_or_else(|| crate::chain::MessageDigest::of(bytes))
    }

    /// Handles one request at time `now`.
    pub fn handle<S: Storage>(
        &mut self,
        store: &mut S,
        origin: impl Into<Origin>,
        request: Request,
        now: u64,
    ) -> Outcome {
        let kind = request.kind();
        let result = match (origin.into(), request) {
            (Origin::Stranger(device), Request::Register { invite, certificate }) => {
                self.register(store, device, invite.as_deref(), &certificate, now)
            }
            (Origin::Stranger(device), Request::LinkOffer { link, offer }) => {
                self.link_offer(store, device, link, &offer, now)
            }
            (Origin::Stranger(device), Request::LinkResult { link }) => self.link_result(store, device, link, now),
            (Origin::Stranger(_), _) => Err(refuse(ErrorCode::NotRegistered, NOT_REGISTERED)),
            (Origin::Device(caller), request) => self.dispatch(store, caller, request, now),
        };
        match result {
            Ok(outcome) => outcome,
            Err(Refusal::Client { code, detail, message }) => Outcome::reply(Response::Error { code, detail, message }),
            Err(Refusal::Storage(e)) => internal(kind, &e.to_string()),
            Err(Refusal::Internal(e)) => internal(kind, &e),
            Err(Refusal::Again(request)) => Outcome {
                again: Some(request),
                ..Outcome::reply(Response::error(ErrorCode::Internal, "the group changed; verifying again"))
            },
        }
    }

    fn dispatch<S: Storage>(
        &mut self,
        store: &mut S,
        caller: Caller,
        request: Request,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let device = caller.device;
        // A revoked device (or one of a removed account) is refused at once,
        // whatever connection it still holds.
        if store.device(&device)?.is_none_or(|d| d.revoked_at.is_some()) {
            return Err(refuse(ErrorCode::Revoked, "this device was revoked, or its account removed"));
        }
        match request {
            Request::Ping { .. } => {
                Err(refuse(ErrorCode::UnknownRequest, "Ping is answered by the connection, not the Delivery Service"))
            }
            Request::Register { invite, certificate } => {
                self.register(store, device, invite.as_deref(), &certificate, now)
            }
            Request::Status => self.status(store, &caller, now),
            Request::RevokeDevice { revocation } => self.revoke(store, &caller, &revocation, now),
            Request::ListDevices => self.list_devices(store, &caller),
            Request::LinkOpen { link, expires_in } => self.link_open(store, &caller, link, expires_in, now),
            Request::LinkOffer { .. } => {
                Err(refuse(ErrorCode::InvalidCredential, "this key is already a device; a new device needs new keys"))
            }
            Request::LinkFetch { link } => self.link_fetch(store, &caller, link, now),
            Request::LinkAnswer { link, certificate, bundle } => {
                self.link_answer(store, &caller, link, &certificate, &bundle, now)
            }
            Request::LinkResult { link } => self.link_result(store, device, link, now),
            Request::PublishKeyPackages { packages, last_resort } => {
                self.publish(store, &caller, &packages, last_resort, now)
            }
            Request::CountKeyPackages => self.count_key_packages(store, &caller, Suite::Classic.code()),
            Request::CountKeyPackagesOf { suite } => self.count_key_packages(store, &caller, suite),
            Request::ClaimKeyPackage { account: target } => {
                self.claim(store, &caller.account, &AccountId(target), Suite::Classic.code(), now)
            }
            Request::ClaimKeyPackages { account: target, suite } => {
                self.claim(store, &caller.account, &AccountId(target), suite, now)
            }
            Request::CreateGroup { group_info, ratchet_tree } => {
                self.create_group(store, &caller, &group_info, &ratchet_tree, now)
            }
            Request::Send { message, welcome, group_info } => {
                self.send(store, &caller, message, welcome, group_info, now)
            }
            Request::Fetch { group, after, limit } => self.fetch(store, &caller, group, after, limit, now),
            Request::Ack { group, seq } => self.ack(store, &caller, &group, seq),
            Request::FetchWelcomes => self.fetch_welcomes(store, &caller),
            Request::AckWelcome { id } => self.ack_welcome(store, &caller, id),
            Request::ListGroups => self.list_groups(store, &caller),
            Request::FetchGroupInfo { group } => self.fetch_group_info(store, &caller, group),
            Request::Head { group, seq } => self.signed_head(store, &caller, group, seq),
            Request::UploadOpen { group, size } => self.upload_open(store, &caller, group, size, now),
            Request::UploadStatus { id } => self.upload_status(store, &caller, id),
            Request::Upload { id, offset } => self.upload_at(store, &caller, id, offset),
            Request::UploadCancel { id } => self.upload_cancel(store, &caller, id),
            Request::Download { id, offset, length } => self.download(store, &caller, id, offset, length, now),
        }
    }
}

fn internal(kind: &str, detail: &str) -> Outcome {
    tracing::warn!(request = kind, "internal error: {detail}");
    Outcome::internal()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod cache_tests {
    use super::*;

    /// A full cache drops its shortest value, so a stream of small groups
    /// never pushes out a large group's (red team, issue 37); a value is
    /// only ever found at the key it was kept at.
    #[test]
    fn a_full_group_cache_drops_the_shortest_value() {
        let mut cache: GroupCache<u8, 3> = GroupCache::default();
        cache.put(b"large", (1, 1), vec![0u8; 1000].into());
        for n in 0..50u8 {
            cache.put(&[n], (1, 1), vec![n; 3].into());
            assert!(cache.0.len() <= 3);
        }
        assert_eq!(cache.get(b"large", (1, 1)).map(|v| v.len()), Some(1000));
        assert!(cache.get(b"large", (1, 2)).is_none(), "another state version");
        assert!(cache.get(b"large", (2, 1)).is_none(), "another epoch");
        cache.put(b"large", (2, 1), vec![1u8; 10].into());
        assert!(cache.get(b"large", (1, 1)).is_none(), "replaced, not kept beside");
        assert_eq!(cache.get(&[49], (1, 1)).map(|v| v.len()), Some(3), "the newest small group stays");
    }
}

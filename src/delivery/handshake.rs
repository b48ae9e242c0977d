//! Handshakes: commits, proposals and resyncs, with the certified-credential
//! and group-repair rules of the module docs.
//!
//! A handshake is handled in two halves:
//!
//! * [`Check::verify`], the expensive half, needs nothing but the group's
//!   public state as stored and the request: it decodes the state,
//!   verifies the message against it (signature, sender, proposals), checks
//!   every leaf the message adds or changes, merges a commit and checks the
//!   tree, the Welcome and the GroupInfo it leads to, and encodes the new
//!   state. Its result is an [`Effect`] or a refusal.
//! * `apply`, the cheap half, runs on the storage in the writer's unit of
//!   work: the checks that need the database (whose KeyPackages these are,
//!   revocations, quotas over other groups, whole accounts), then the
//!   writes.
//!
//! The server runs the first half off its single writer thread
//! ([`Delivery::prepare`], from a snapshot the reader took) so that a large
//! group's commit never holds up other groups' sends; the writer uses that
//! result only if the group's state is still exactly the snapshot's (same
//! epoch, same bytes: no proposal came in between) and verifies again
//! itself otherwise. So every rule, and first-commit-wins, are decided on
//! the state the writer holds, as before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    LeafNode, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal, ProposalOrRefType, ProtocolMessage,
    Sender, StagedCommit,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

use super::groups::{bad_leaf, bad_shape, check_state_size, load_public};
use super::{mls, not_member, refuse, Caller, Delivery, GroupRecord, Notification, Outcome, Quotas, Refusal, Storage};
use crate::auth::{AccountId, DeviceId};
use crate::limits::{MAX_PENDING_PROPOSALS, MAX_PQ_GROUP_MEMBERS};
use crate::wire::{ErrorCode, Request, Response};

/// A device a commit adds: its package's `KeyPackageRef` (how the Welcome
/// names it) and whose it is.
type Added = (Vec<u8>, Caller);

/// A commit or proposal a current member sent for the group's current
/// epoch, with what came with it.
pub(super) struct Handshake<'a> {
    pub caller: &'a Caller,
    pub group: &'a [u8],
    /// The group's epoch and state version as stored now.
    pub epoch: u64,
    pub version: u64,
    /// The `MLSMessage` as sent (stored and relayed as is).
    pub bytes: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Option<Vec<u8>>,
    pub now: u64,
    /// The sending device is not a current member (a new device of a
    /// member's account): only an external commit may come from it.
    pub joining: bool,
}

/// What a verified handshake does to its group, before the checks that
/// need the database.
enum Effect {
    Proposal {
        /// The group's state with the proposal kept.
        state: Vec<u8>,
        /// The device whose leaf the proposal removes, if it is the
        /// sender's own account's (leaving).
        leaving: Option<Caller>,
    },
    Commit(Committed),
}

/// A verified commit (or resync).
struct Committed {
    /// An external commit (a resync, or a new device of a member's
    /// account joining).
    external: bool,
    /// The devices it adds, from the KeyPackages it carries.
    added: Vec<Added>,
    /// The epoch it creates.
    epoch: u64,
    /// Who holds a leaf afterwards (each device once).
    roster: BTreeMap<DeviceId, AccountId>,
    /// The group's state afterwards.
    state: Vec<u8>,
    /// The settings afterwards, if the commit changed them.
    settings: Option<mls::GroupSettings>,
}

/// A handshake verified off the writer ([`Delivery::prepare`]) against a
/// snapshot of its group: the writer takes its verdict only for this
/// caller and only while the group's stored state is the snapshot's (its
/// version, which every change advances: the state itself is not kept).
pub struct Prepared {
    caller: Caller,
    epoch: u64,
    version: u64,
    /// Whether the sender was verified as a device joining (not a current
    /// member).
    joining: bool,
    /// The digest of the MLS message verified.
    message: crate::chain::MessageDigest,
    verdict: Result<Effect, Refusal<Infallible>>,
}

/// What the core does with a handshake that reaches it without a verdict
/// that holds (none was prepared, the snapshot was refused, or the group
/// changed since it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoVerdict {
    /// Verify it here (where nothing verifies off the writer: the
    /// operator's commands, tests, a server whose verifiers are gone).
    Verify,
    /// Give it back unapplied ([`Outcome::again`]) to be verified off the
    /// writer again (red team M1: a member who keeps changing a group's
    /// state, or moves its epoch with a commit of its own while its next
    /// handshakes wait for a verifier, made the writer verify them,
    /// milliseconds each in a large group, while every group's sends
    /// waited).
    GiveBack,
    /// Refuse it with `RateLimited` (it went back [`MAX_SENT_BACK`] times:
    /// the group keeps changing under it; the client retries).
    ///
    /// [`MAX_SENT_BACK`]: crate::limits::MAX_SENT_BACK
    Refuse,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prepared(epoch {}, {})", self.epoch, if self.verdict.is_ok() { "verified" } else { "refused" })
    }
}

impl Prepared {
    /// Whether the handshake verified against the snapshot.
    pub fn verified(&self) -> bool {
        self.verdict.is_ok()
    }

    /// Whether the verdict holds for this handshake (`message` the digest
    /// of its MLS message) on the group as it is stored now.
    fn holds_for(&self, h: &Handshake<'_>, message: &crate::chain::MessageDigest) -> bool {
        self.caller == *h.caller
            && self.joining == h.joining
            && self.message == *message
            && self.epoch == h.epoch
            && self.version == h.version
    }
}

/// A group's state as the reader saw it, for verifying a handshake off
/// the writer ([`Delivery::snapshot`]), and whether the sender was joining.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub record: GroupRecord,
    pub joining: bool,
}

/// The group's public state with the message verified against it.
struct Verified {
    storage: MemoryStorage,
    public: mls::PublicGroup,
    /// Who held each leaf before the message (every leaf was checked when
    /// it entered the tree).
    holders: HashMap<u32, Caller>,
    /// The sender's leaf; `None` for a resync (an external commit).
    sender: Option<u32>,
}

fn invalid_commit<E>(message: impl std::fmt::Display) -> Refusal<E> {
    refuse(ErrorCode::InvalidCommit, message)
}

/// A refusal of the storage-free half, as one of any storage's.
fn widen<E>(r: Refusal<Infallible>) -> Refusal<E> {
    match r {
        Refusal::Client { code, detail, message } => Refusal::Client { code, detail, message },
        Refusal::Internal(m) => Refusal::Internal(m),
        Refusal::Again(r) => Refusal::Again(r),
        Refusal::Storage(never) => match never {},
    }
}

impl Verified {
    /// A leaf may change its keys, never whose it is.
    fn same_holder<E>(&self, index: u32, leaf: &LeafNode) -> Result<(), Refusal<E>> {
        mls::check_leaf_shape(leaf, self.public.ciphersuite()).map_err(|m| bad_shape(index, m))?;
        let cert = mls::node_certificate(leaf).map_err(|e| bad_leaf(index, e))?;
        if self.holders.get(&index) != Some(&Caller::of(&cert)) {
            return Err(bad_leaf(index, "an update may not change the leaf's account or device"));
        }
        Ok(())
    }

    /// What the committer may change of the tree: its own path leaf (or,
    /// for a resync, its own leaf replaced), and each Update its sender's
    /// own leaf.
    fn check_changed_leaves<E>(&self, staged: &StagedCommit, caller: &Caller) -> Result<(), Refusal<E>> {
        match self.sender {
            Some(sender) => {
                if let Some(leaf) = staged.update_path_leaf_node() {
                    self.same_holder(sender, leaf)?;
                }
            }
            None => check_resync(staged, caller, &self.holders, self.public.ciphersuite())?,
        }
        for update in staged.update_proposals() {
            let Sender::Member(index) = update.sender() else {
                return Err(invalid_commit("an update proposal from outside the group"));
            };
            self.same_holder(index.u32(), update.update_proposal().leaf_node())?;
        }
        Ok(())
    }
}

/// The storage-free half of a handshake: what it checks against.
struct Check<'a> {
    crypto: &'a RustCrypto,
    removal_key: &'a [u8; 32],
    quotas: &'a Quotas,
}

/// What [`Check::verify`] verifies: a handshake `message` (framed from
/// `bytes`) `caller` sent to `group`, whose stored state is `state`.
struct Input<'a> {
    caller: &'a Caller,
    /// The sender is not a current member ([`Handshake::joining`]).
    joining: bool,
    group: &'a [u8],
    state: &'a [u8],
    welcome: Option<&'a [u8]>,
    group_info: Option<&'a [u8]>,
}

type Verdict = Result<Effect, Refusal<Infallible>>;

impl Check<'_> {
    /// Verifies a handshake message against the group's public state and
    /// what it does to it.
    fn verify(&self, input: &Input<'_>, message: ProtocolMessage) -> Verdict {
        let (storage, public) = load_public(input.state, input.group)?;
        let mut holders: HashMap<u32, Caller> = HashMap::new();
        for m in public.members() {
            let (account, device) = mls::holder_of(&m.credential)
                .ok_or_else(|| Refusal::Internal(format!("stored leaf {} holds no certificate", m.index.u32())))?;
            holders.insert(m.index.u32(), Caller { account, device });
        }
        let processed = public
            .process_message(self.crypto, message)
            .map_err(|e| invalid_commit(format!("the message does not verify: {e}")))?;
        // A member's own commit or proposal, or a member device's resync
        // (an external commit that replaces its own leaf).
        let sender = match processed.sender() {
            Sender::Member(index) => Some(index.u32()),
            Sender::NewMemberCommit => None,
            _ => {
                return Err(invalid_commit(
                    "only members' own commits and proposals, and a member's resync of its own leaf, are accepted",
                ))
            }
        };
        if sender.is_some_and(|s| holders.get(&s) != Some(input.caller)) {
            return Err(invalid_commit("the message is signed by another device's leaf"));
        }
        // A device that is not a member (it left, or was removed, and its
        // leaf is still in the tree) does not act through that leaf: it may
        // only join again by an external commit.
        if input.joining && sender.is_some() {
            return Err(refuse(
                ErrorCode::NotMember,
                "this device is not a member of the group; it may only join it again (an external commit)",
            ));
        }
        let verified = Verified { storage, public, holders, sender };
        match processed.into_content() {
            ProcessedMessageContent::ProposalMessage(queued) => self.proposal(input, verified, *queued),
            ProcessedMessageContent::StagedCommitMessage(staged) => self.commit(input, verified, *staged),
            _ => Err(refuse(ErrorCode::InvalidMessage, "expected a commit or a proposal")),
        }
    }

    /// A member's proposal: kept in the group's state until a commit
    /// takes it (at most [`MAX_PENDING_PROPOSALS`] waiting).
    fn proposal(&self, input: &Input<'_>, v: Verified, queued: openmls::prelude::QueuedProposal) -> Verdict {
        let Some(sender) = v.sender else {
            return Err(invalid_commit("a proposal from outside the group"));
        };
        if input.welcome.is_some() {
            return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a Welcome"));
        }
        // Only what hush uses: a proposal nobody can commit (a PSK nobody
        // holds, extensions the server would have to re-check) would make
        // every later commit that takes it fail.
        mls::check_proposal_use(queued.proposal(), mls::ProposalUse::Pending).map_err(invalid_commit)?;
        if let Proposal::Update(update) = queued.proposal() {
            v.same_holder(sender, update.leaf_node())?;
        }
        // Leaving: a Remove of a leaf of the sender's own account. It takes
        // effect at once, whether or not anyone commits it (`apply`).
        let leaving = match queued.proposal() {
            Proposal::Remove(r) => {
                v.holders.get(&r.removed().u32()).filter(|held| held.account == input.caller.account).copied()
            }
            _ => None,
        };
        let Verified { storage, mut public, .. } = v;
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
        public.add_proposal(&storage, queued).map_err(|e| Refusal::Internal(format!("storing the proposal: {e:?}")))?;
        check_state_size(&storage)?;
        let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok(Effect::Proposal { state, leaving })
    }

    /// A commit (or a resync): every leaf it adds or changes is certified,
    /// its Welcome and GroupInfo match it, the resulting tree holds each
    /// device once and still lists the server's removal key, and the
    /// group's size stays within the quotas. (First-commit-wins, whose
    /// packages these are and the quotas over other groups are `apply`'s.)
    fn commit(&self, input: &Input<'_>, v: Verified, staged: StagedCommit) -> Verdict {
        if v.sender.is_some() {
            for queued in staged.queued_proposals() {
                mls::check_proposal_use(queued.proposal(), mls::ProposalUse::Commit).map_err(invalid_commit)?;
                // The settings change only inline, in the committer's own
                // commit: never a proposal left waiting for someone else.
                if matches!(queued.proposal(), Proposal::GroupContextExtensions(_))
                    && (queued.proposal_or_ref_type() != ProposalOrRefType::Proposal
                        || !matches!(queued.sender(), Sender::Member(i) if Some(i.u32()) == v.sender))
                {
                    return Err(invalid_commit("group settings change only inline, in their proposer's own commit"));
                }
            }
        }
        let settings_before = mls::settings_of(v.public.group_context());
        let changes_settings =
            staged.queued_proposals().any(|q| matches!(q.proposal(), Proposal::GroupContextExtensions(_)));
        v.check_changed_leaves(&staged, input.caller)?;
        let added = self.added_devices(&staged, v.public.ciphersuite())?;
        check_welcome_for(input.welcome, &added)?;
        let Verified { storage, mut public, sender, .. } = v;
        public.merge_commit(&storage, staged).map_err(|e| Refusal::Internal(format!("merging the commit: {e:?}")))?;
        let epoch = public.group_context().epoch().as_u64();
        let roster = self.check_tree(&public)?;
        // A commit that changes the settings must leave exactly what hush
        // allows (a group from before they existed is judged by its
        // external senders alone, as it was created).
        if changes_settings {
            mls::check_context_extensions(public.group_context().extensions(), self.removal_key)
                .map_err(invalid_commit)?;
        }
        let settings = mls::settings_of(public.group_context());
        // The GroupInfo of the new epoch, signed by the committer's leaf:
        // what a member that cannot process this commit rejoins from.
        let Some(group_info) = input.group_info else {
            return Err(refuse(ErrorCode::InvalidMessage, "a commit must carry the GroupInfo of the epoch it creates"));
        };
        let committer = leaf_of(&public, input.caller)
            .ok_or_else(|| Refusal::Internal("the committer has no leaf after its commit".into()))?;
        mls::check_group_info(self.crypto, group_info, &public, committer).map_err(invalid_commit)?;
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
        if size > MAX_PQ_GROUP_MEMBERS && mls::Suite::of(public.ciphersuite()) == Ok(mls::Suite::Pq) {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "the group would have {size} devices; post-quantum groups hold at most {MAX_PQ_GROUP_MEMBERS} (their keys are 38 times larger)"
                ),
            ));
        }
        check_state_size(&storage)?;
        let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok(Effect::Commit(Committed {
            external: sender.is_none(),
            added,
            epoch,
            roster,
            state,
            settings: (settings != settings_before).then_some(settings),
        }))
    }

    /// The devices the commit adds, from their KeyPackages: each of a shape
    /// hush makes, of the group's suite, certified for its device. (Whether
    /// this server handed each out for that device is `apply`'s.) Returns
    /// each added package's `KeyPackageRef` and device.
    fn added_devices<E>(
        &self,
        staged: &StagedCommit,
        ciphersuite: openmls::prelude::Ciphersuite,
    ) -> Result<Vec<Added>, Refusal<E>> {
        let mut added = Vec::new();
        for (position, add) in staged.add_proposals().enumerate() {
            let kp = add.add_proposal().key_package();
            mls::check_key_package_shape(kp).map_err(|m| bad_add_shape(position, m))?;
            if kp.ciphersuite() != ciphersuite {
                return Err(bad_add_shape(position, "a KeyPackage of another ciphersuite than the group's"));
            }
            let cert = mls::node_certificate(kp.leaf_node()).map_err(|e| bad_add(position, e))?;
            let hash_ref =
                kp.hash_ref(self.crypto).map_err(|e| Refusal::Internal(format!("hashing a KeyPackage: {e}")))?;
            added.push((hash_ref.as_slice().to_vec(), Caller::of(&cert)));
        }
        Ok(added)
    }

    /// The tree after the commit: each device once, the server still an
    /// external sender. (Every leaf that entered or changed with the commit
    /// was verified before: adds, updates, the committer's path leaf.)
    /// Returns the roster it makes.
    fn check_tree<E>(&self, public: &mls::PublicGroup) -> Result<BTreeMap<DeviceId, AccountId>, Refusal<E>> {
        // The keys a commit's path set on parent nodes (the leaves were
        // checked as they came in).
        mls::check_tree_keys(&public.export_ratchet_tree(), public.ciphersuite()).map_err(invalid_commit)?;
        let mut roster = BTreeMap::new();
        for m in public.members() {
            let (account, device) = mls::holder_of(&m.credential)
                .ok_or_else(|| bad_leaf(m.index.u32(), "the leaf holds no device certificate"))?;
            if roster.insert(device, account).is_some() {
                return Err(bad_leaf(m.index.u32(), "this device already has a leaf in the group"));
            }
        }
        if !mls::lists_server(public.group_context(), self.removal_key) {
            return Err(invalid_commit(
                "the commit would change the group's external senders (only this server's removal key may be listed)",
            ));
        }
        Ok(roster)
    }
}

impl Delivery {
    fn check(&self) -> Check<'_> {
        Check { crypto: &self.crypto, removal_key: &self.removal_key, quotas: &self.quotas }
    }

    /// The group's state for verifying a handshake `caller` sent off the
    /// writer, and whether `caller` sends it as a device joining (not a
    /// current member); `None` where the writer would refuse it before
    /// verifying (a revoked device; not a member, nor a new device of a
    /// member's account sending a commit; another epoch; no such group).
    /// Reads only.
    pub fn snapshot<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        handshake: &mls::HandshakeHeader,
    ) -> Result<Option<Snapshot>, S::Error> {
        // A revoked device (or one of a removed account) gets nothing
        // verified: the writer refuses it first.
        if store.device(&caller.device)?.is_none_or(|d| d.revoked_at.is_some()) {
            return Ok(None);
        }
        let group = &handshake.group;
        let Some(context) = store.send_context(group, &caller.device)? else { return Ok(None) };
        if context.epoch != handshake.epoch {
            return Ok(None);
        }
        let joining = !context.membership.is_some_and(|m| m.is_current());
        if joining
            && !(handshake.commit
                && store.members(group)?.iter().any(|(_, m)| m.is_current() && m.account == caller.account))
        {
            return Ok(None);
        }
        Ok(store.group(group)?.filter(|r| r.epoch == handshake.epoch).map(|record| Snapshot { record, joining }))
    }

    /// Verifies a handshake `request` (a `Send` of a commit or proposal)
    /// from `caller` against `record`, a snapshot of its group
    /// ([`Delivery::snapshot`]), without any storage: the expensive half of
    /// a handshake, which the server runs off its writer. `None` if the
    /// request is not a handshake for that snapshot.
    pub fn prepare(&self, caller: Caller, snapshot: Snapshot, request: &Request) -> Option<Prepared> {
        let Request::Send { message, welcome, group_info } = request else { return None };
        let Snapshot { record, joining } = snapshot;
        let framed = mls::frame(message).ok()?;
        if !matches!(framed.kind, mls::Kind::Commit | mls::Kind::Proposal) || framed.epoch != record.epoch {
            return None;
        }
        let input = Input {
            caller: &caller,
            joining,
            group: &framed.group,
            state: &record.state,
            welcome: welcome.as_deref(),
            group_info: group_info.as_deref(),
        };
        let verdict = self.check().verify(&input, framed.message);
        let message = crate::chain::MessageDigest::of(message);
        Some(Prepared { caller, epoch: record.epoch, version: record.version, joining, message, verdict })
    }

    /// Verifies a handshake message (or takes the verdict prepared for it
    /// off the writer, if it still holds) and applies it.
    pub(super) fn handshake<S: Storage>(
        &mut self,
        store: &mut S,
        h: Handshake<'_>,
        message: ProtocolMessage,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let digest = self.digest_of(&h.bytes);
        let prepared = match (self.prepared.take(), self.no_verdict) {
            (Some(p), _) if p.holds_for(&h, &digest) => Some(p),
            (_, NoVerdict::Verify) => None,
            // Nothing was written for it yet (the caller rolls back what
            // a request that did not write did anyway).
            (_, NoVerdict::GiveBack) => {
                let Handshake { bytes: message, welcome, group_info, .. } = h;
                return Err(Refusal::Again(Box::new(Request::Send { message, welcome, group_info })));
            }
            (_, NoVerdict::Refuse) => {
                let wait = crate::limits::HANDSHAKE_RETRY;
                return Err(Refusal::Client {
                    code: ErrorCode::RateLimited,
                    detail: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    message: format!("the group kept changing while this was verified; retry in {} s", wait.as_secs()),
                });
            }
        };
        let verdict = match prepared {
            Some(p) => {
                self.prepared_used = self.prepared_used.wrapping_add(1);
                p.verdict
            }
            None => {
                // Only now is the state read: a verdict that holds needs
                // none of it.
                let record = store.group(h.group)?.ok_or_else(not_member)?;
                if record.epoch != h.epoch || record.version != h.version {
                    return Err(Refusal::Internal("the group changed within one request".into()));
                }
                let input = Input {
                    caller: h.caller,
                    joining: h.joining,
                    group: h.group,
                    state: &record.state,
                    welcome: h.welcome.as_deref(),
                    group_info: h.group_info.as_deref(),
                };
                // A panic in openmls costs this request, not the thread
                // that applies every group's writes (red team).
                let check = self.check();
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check.verify(&input, message)))
                    .unwrap_or_else(|_| Err(Refusal::Internal("verifying the handshake panicked".into())))
            }
        };
        match verdict.map_err(widen)? {
            Effect::Proposal { state, leaving } => apply_proposal(store, digest, h, state, leaving),
            Effect::Commit(c) => self.apply_commit(store, digest, h, c),
        }
    }

    /// A verified commit: first wins for its epoch (the caller checked
    /// the epoch); its KeyPackages are ones this server handed out for
    /// exactly those devices, none revoked; the quotas over other groups
    /// and whole accounts hold. Then the roster follows the tree.
    fn apply_commit<S: Storage>(
        &mut self,
        store: &mut S,
        digest: crate::chain::MessageDigest,
        h: Handshake<'_>,
        c: Committed,
    ) -> Result<Outcome, Refusal<S::Error>> {
        for (position, (hash_ref, holder)) in c.added.iter().enumerate() {
            match store.claimed_owner(hash_ref)? {
                Some((account, device)) if account == holder.account && device == holder.device => {
                    if store.device(&device)?.is_none_or(|d| d.revoked_at.is_some()) {
                        return Err(bad_add(position, "that device was revoked"));
                    }
                }
                _ => {
                    return Err(invalid_commit(
                        "the commit adds a KeyPackage this server did not hand out for that device",
                    ))
                }
            }
        }
        self.check_groups_quota(store, &c.added)?;
        check_whole_accounts(store, &c.added, &c.roster)?;
        let Some(group_info) = h.group_info else {
            return Err(Refusal::Internal("a verified commit without its GroupInfo".into()));
        };
        // The members before the commit: cached at its epoch when the last
        // commit (or a send) put them there.
        let before = self.roster(store, h.group, (h.epoch, h.version))?;
        // Which of them are revoked: as long as the commit changes no
        // membership, the same ones afterwards. Not cached on a shared
        // database: a revocation committing there meanwhile may not have
        // seen a membership this writer added, and so not have advanced
        // the group's version.
        let revoked_before =
            if S::SHARED { None } else { Some(self.revoked_at(store, h.group, (h.epoch, h.version))?) };
        let group = h.group;
        let (seq, head) = store.append(group, h.epoch, &h.bytes, &digest, h.now, None)?;
        store.update_group(group, c.epoch, &c.state)?;
        store.set_group_info(group, &group_info)?;
        if let Some(settings) = c.settings {
            store.set_disappear(group, settings.disappear_secs)?;
        }
        // Who becomes a member: the devices this commit adds, and the
        // sender of an external commit (a new device of a member's
        // account). A leaf that is in the tree without being a member (a
        // device that left, or was removed by the operator, and whose
        // removal nobody committed) does not come back by being left in.
        let mut joining: BTreeSet<DeviceId> = c.added.iter().map(|(_, c)| c.device).collect();
        if c.external {
            joining.insert(h.caller.device);
        }
        let mut lingering = Vec::new();
        let mut membership_changed = false;
        let (entering, gone) = roster_changes(&before, &c.roster);
        for (device, account) in entering {
            if joining.contains(&device) {
                membership_changed = true;
                store.add_member(group, &device, &account, seq)?;
            } else {
                lingering.push(device);
            }
        }
        for device in gone {
            membership_changed = true;
            store.remove_member(group, &device, seq, h.epoch)?;
        }
        // Everyone who was a member sees the commit, removed members
        // included (it tells them they were removed); the added devices
        // get the Welcome.
        let mut notifications = vec![Notification::Message {
            group: group.to_vec(),
            seq,
            head: Some(head),
            message: h.bytes,
            recipients: before.clone(),
        }];
        if let Some(w) = &h.welcome {
            let recipients: BTreeSet<DeviceId> = c.added.iter().map(|(_, c)| c.device).collect();
            for r in recipients {
                store.add_welcome(&r, group, w, h.now)?;
                notifications.push(Notification::Welcome { recipient: r });
            }
        }
        // Proposals do not outlive their epoch: a revoked device this commit
        // left in (its committer had not read the server's proposal, or
        // chose not to take it) is proposed for removal again, in the new
        // epoch.
        let revoked: Arc<[DeviceId]> = match revoked_before {
            Some(before) if !membership_changed => before,
            _ => store.revoked_members(group)?.into(),
        };
        for device in revoked.iter().chain(&lingering) {
            notifications.extend(self.propose_removal(store, group, device, h.now)?);
        }
        // A commit that changes no membership (a self-update: what a large
        // group commits most) leaves the same members behind, at the new
        // epoch and at the version its state write made (one more: a
        // membership written since, or a removal proposal, advanced it
        // further, and the entry is then never used). Last, when nothing
        // can fail any more: a request that fails is undone, and must not
        // leave its roster behind.
        if !membership_changed {
            let at = (c.epoch, h.version.wrapping_add(1));
            self.rosters.put(group, at, before);
            if !S::SHARED {
                self.revoked.put(group, at, revoked);
            }
        }
        Ok(Outcome::wrote(Response::Accepted { group: group.to_vec(), seq, epoch: c.epoch, head }, notifications))
    }

    /// Groups an account is in count against its quota, however it got
    /// there: the adder learns whom the group would take over.
    fn check_groups_quota<S: Storage>(&self, store: &mut S, added: &[Added]) -> Result<(), Refusal<S::Error>> {
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
        Ok(())
    }
}

/// Who is in the tree after a commit without having been a member
/// before it, and who was a member and has no leaf any more: `before`
/// (sorted, as the writer keeps its rosters; sorted here otherwise) and
/// `after` compared in one walk, which a self-update in a large group does
/// on every commit.
fn roster_changes(
    before: &[DeviceId],
    after: &BTreeMap<DeviceId, AccountId>,
) -> (Vec<(DeviceId, AccountId)>, Vec<DeviceId>) {
    let mut sorted = None;
    if !before.is_sorted() {
        let mut copy = before.to_vec();
        copy.sort_unstable();
        sorted = Some(copy);
    }
    let before = sorted.as_deref().unwrap_or(before);
    let (mut entering, mut gone) = (Vec::new(), Vec::new());
    let mut old = before.iter().peekable();
    for (device, account) in after {
        while let Some(earlier) = old.next_if(|d| *d < device) {
            gone.push(*earlier);
        }
        if old.next_if(|d| *d == device).is_none() {
            entering.push((*device, *account));
        }
        // A device listed twice before is one member.
        while old.next_if(|d| *d == device).is_some() {}
    }
    gone.extend(old.copied());
    gone.dedup();
    (entering, gone)
}

/// A verified proposal, kept in the group's state. Leaving (a Remove of a
/// leaf of the sender's own account) takes effect here at once, whether or
/// not anyone commits it: the device stops counting against its account's
/// group quota, receiving and sending (a group of strangers cannot hold it
/// by never committing); a later commit that leaves its leaf in is
/// followed by the server's own removal proposal.
fn apply_proposal<S: Storage>(
    store: &mut S,
    digest: crate::chain::MessageDigest,
    h: Handshake<'_>,
    state: Vec<u8>,
    leaving: Option<Caller>,
) -> Result<Outcome, Refusal<S::Error>> {
    let before = store.current_members(h.group)?;
    let (group, epoch) = (h.group, h.epoch);
    let (seq, head) = store.append(group, epoch, &h.bytes, &digest, h.now, None)?;
    store.update_group(group, epoch, &state)?;
    if let Some(left) = leaving {
        if store.membership(group, &left.device)?.is_some_and(|m| m.is_current()) {
            store.remove_member(group, &left.device, seq, epoch)?;
        }
    }
    Ok(Outcome::wrote(
        Response::Accepted { group: group.to_vec(), seq, epoch, head },
        vec![Notification::Message {
            group: group.to_vec(),
            seq,
            head: Some(head),
            message: h.bytes,
            recipients: before.into(),
        }],
    ))
}

/// Adding a person adds all their devices: for every account the commit
/// adds devices of, each of its devices that is not revoked must hold a
/// leaf afterwards (messages to that person reach every device they use).
fn check_whole_accounts<S: Storage>(
    store: &mut S,
    added: &[Added],
    roster: &BTreeMap<DeviceId, AccountId>,
) -> Result<(), Refusal<S::Error>> {
    let accounts: BTreeSet<AccountId> = added.iter().map(|(_, c)| c.account).collect();
    for account in accounts {
        let devices = store.devices_of(&account)?;
        let current: Vec<&DeviceId> = devices.iter().filter(|(_, r)| r.revoked_at.is_none()).map(|(d, _)| d).collect();
        let missing = current.iter().filter(|d| !roster.contains_key(d)).count();
        if missing > 0 {
            return Err(invalid_commit(format!(
                "the commit adds only some devices of account {} ({} of {}); a person is added with all their devices",
                account.short(),
                current.len() - missing,
                current.len()
            )));
        }
    }
    Ok(())
}

/// A Welcome comes with exactly the commits that add members, and
/// addresses exactly the packages they add.
fn check_welcome_for<E>(welcome: Option<&[u8]>, added: &[Added]) -> Result<(), Refusal<E>> {
    match (added.is_empty(), welcome) {
        (true, None) => Ok(()),
        (true, Some(_)) => Err(refuse(ErrorCode::InvalidMessage, "a Welcome needs a commit that adds members")),
        (false, None) => Err(refuse(ErrorCode::InvalidMessage, "a commit that adds members needs their Welcome")),
        (false, Some(w)) => check_welcome(w, added).map_err(|m| refuse(ErrorCode::InvalidMessage, m)),
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

/// An added KeyPackage whose credential is not acceptable (it has no leaf
/// index yet); `detail` is its position among the commit's Adds.
fn bad_add<E>(position: usize, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCredential,
        detail: u64::try_from(position).unwrap_or(u64::MAX),
        message: format!("added member {position}: {why}"),
    }
}

/// The leaf `caller`'s device holds in `public` (each device holds at most
/// one, checked after every commit).
fn leaf_of(public: &mls::PublicGroup, caller: &Caller) -> Option<openmls::prelude::LeafNodeIndex> {
    public.members().find(|m| mls::holder_of(&m.credential) == Some((caller.account, caller.device))).map(|m| m.index)
}

/// Accepts an external commit only from a device of an account that holds
/// a leaf in the group (`holders`, before the commit), in one of two
/// shapes:
///
/// * a **resync**: the device holds a leaf and the commit carries nothing
///   but the ExternalInit and the Remove of exactly that leaf;
/// * a **new device joining**: the device holds no leaf, another device of
///   its account does, and the commit carries nothing but the ExternalInit.
///
/// Either way its new leaf must be certified for that account and device.
fn check_resync<E>(
    staged: &openmls::prelude::StagedCommit,
    caller: &Caller,
    holders: &HashMap<u32, Caller>,
    ciphersuite: openmls::prelude::Ciphersuite,
) -> Result<(), Refusal<E>> {
    let invalid = |m: &str| refuse(ErrorCode::InvalidCommit, m);
    let own = holders.iter().find(|(_, h)| *h == caller).map(|(i, _)| *i);
    if own.is_none() && !holders.values().any(|h| h.account == caller.account) {
        return Err(invalid("an external commit must come from a device of an account in the group"));
    }
    let mut removed = Vec::new();
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::ExternalInit(_) => {}
            Proposal::Remove(r) => removed.push(r.removed().u32()),
            _ => {
                return Err(invalid(
                    "an external commit may carry only its ExternalInit and the Remove of its own leaf",
                ))
            }
        }
    }
    let expected: Vec<u32> = own.into_iter().collect();
    if removed != expected {
        return Err(invalid(
            "an external commit must remove exactly the rejoining device's own leaf (none for a new device), and no other",
        ));
    }
    let index = own.unwrap_or(u32::MAX);
    let leaf = staged.update_path_leaf_node().ok_or_else(|| invalid("an external commit must carry a new leaf"))?;
    mls::check_leaf_shape(leaf, ciphersuite).map_err(|m| bad_shape(index, m))?;
    let cert = mls::node_certificate(leaf).map_err(|e| bad_leaf(index, e))?;
    if Caller::of(&cert) != *caller {
        return Err(bad_leaf(index, "an external commit's new leaf must be certified for the device that sends it"));
    }
    Ok(())
}

/// Checks that a Welcome addresses exactly the added KeyPackages.
fn check_welcome(bytes: &[u8], added: &[Added]) -> Result<(), mls::MlsRefusal> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| mls::MlsRefusal::Undecodable { what: "Welcome", reason: e.to_string() })?;
    let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
        return Err(mls::MlsRefusal::NotAWelcome);
    };
    let addressed: BTreeSet<Vec<u8>> = welcome.secrets().iter().map(|s| s.new_member().as_slice().to_vec()).collect();
    let expected: BTreeSet<Vec<u8>> = added.iter().map(|(r, _)| r.clone()).collect();
    if addressed != expected {
        return Err(mls::MlsRefusal::WelcomeRecipients);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> DeviceId {
        DeviceId([n; 32])
    }

    fn after(devices: &[u8]) -> BTreeMap<DeviceId, AccountId> {
        devices.iter().map(|&n| (d(n), AccountId([n; 32]))).collect()
    }

    /// The one-walk comparison finds exactly who entered and who went,
    /// whatever the order of the members before (and a member listed
    /// twice is one).
    #[test]
    fn roster_changes_are_the_set_differences() {
        let (entering, gone) = roster_changes(&[d(1), d(3), d(5), d(7)], &after(&[2, 3, 5, 8]));
        assert_eq!(entering, vec![(d(2), AccountId([2; 32])), (d(8), AccountId([8; 32]))]);
        assert_eq!(gone, vec![d(1), d(7)]);
        let (entering, gone) = roster_changes(&[d(7), d(3), d(3), d(1), d(5)], &after(&[2, 3, 5, 8]));
        assert_eq!(entering.len(), 2);
        assert_eq!(gone, vec![d(1), d(7)]);
        let (entering, gone) = roster_changes(&[d(1), d(2)], &after(&[1, 2]));
        assert!(entering.is_empty() && gone.is_empty());
        let (entering, gone) = roster_changes(&[], &after(&[4]));
        assert_eq!((entering.len(), gone.len()), (1, 0));
        let (entering, gone) = roster_changes(&[d(4), d(4)], &BTreeMap::new());
        assert_eq!((entering.len(), gone), (0, vec![d(4)]));
    }
}

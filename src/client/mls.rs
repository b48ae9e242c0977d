//! The client side of MLS: one member's key material and groups, on
//! openmls with the RustCrypto provider.
//!
//! Handshake messages are PublicMessages and application messages
//! PrivateMessages ([`MIXED_PLAINTEXT_WIRE_FORMAT_POLICY`]), so the server
//! can verify commits without being able to read anything. Application
//! payloads are padded to [`PADDING`] bytes so ciphertext sizes reveal only
//! a size bucket. Group state here lives in memory; the `hush` CLI keeps it
//! on disk.
//!
//! **Certified credentials.** A member's credential is its device
//! certificate ([`crate::auth::device`]), signed by its account key. The
//! member trusts no server and no other member to have checked anyone
//! else's: it verifies the certificate of every KeyPackage it adds (it must
//! be certified by exactly the account asked for), of every leaf in a
//! Welcome's tree before joining, and of every leaf a commit adds or
//! updates before merging it (an update may not change a leaf's account or
//! device). A commit or proposal that fails is not applied and comes back
//! as [`Received::Refused`]; the group state stays as it was.

pub mod adversary;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use thiserror::Error;

use crate::auth::{AccountId, DeviceCertificate, DeviceId, Identity};
use crate::limits::{MAX_HANDOVER_PROPOSALS, MAX_PENDING_PROPOSALS};
pub use crate::mls::GroupSettings;
use crate::mls::{
    check_proposal_use, holder_of, leaf_certificate, member_capabilities, node_certificate, server_sender, ProposalUse,
    Suite, UnknownSuite, UnusedProposal, VerifiableGroupInfo,
};

/// The classic ciphersuite: X25519, AES-128-GCM, SHA-256, Ed25519. Its
/// signature algorithm (Ed25519) is every suite's: a device's one MLS
/// signature key serves both ([`Suite`]).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Application messages are padded to a multiple of this many bytes.
pub const PADDING: usize = 256;

/// Epochs whose secrets a member keeps after moving on, so application
/// messages sent just before a commit (and ordered before it in the log)
/// still decrypt for the committer. A small window: older keys are gone.
pub const MAX_PAST_EPOCHS: usize = 3;

/// Application messages from one sender that may arrive out of order (a
/// client may pipeline sends, and the server orders them as they arrive).
pub const OUT_OF_ORDER_TOLERANCE: u32 = 64;

/// How far ahead of the last seen message a sender's message may be.
pub const MAX_FORWARD_DISTANCE: u32 = 10_000;

/// Length of a new group's random nonce (the id is the nonce and a tag
/// binding it to the creator's account, see
/// [`crate::mls::group_id_for`]).
pub const GROUP_NONCE_LEN: usize = 16;

/// A new group as the server registers it.
#[derive(Debug, Clone)]
pub struct NewGroup {
    pub id: Vec<u8>,
    /// The signed GroupInfo, as an `MLSMessage`.
    pub group_info: Vec<u8>,
    /// The ratchet tree (TLS encoding).
    pub ratchet_tree: Vec<u8>,
}

/// A commit ready to send: the message, the Welcome for the devices it
/// adds, and the GroupInfo of the epoch it creates (the server keeps it for
/// members that must rejoin; see [`Member::resync`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub message: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Vec<u8>,
}

impl Commit {
    /// The `Send` request that posts it.
    pub fn into_request(self) -> crate::wire::Request {
        crate::wire::Request::Send { message: self.message, welcome: self.welcome, group_info: Some(self.group_info) }
    }

    fn of(
        message: &MlsMessageOut,
        welcome: Option<&MlsMessageOut>,
        group_info: Option<group_info::GroupInfo>,
    ) -> Result<Self, MlsError> {
        let group_info = group_info.ok_or(MlsError::NoGroupInfo)?;
        Ok(Self {
            message: serialize(message, "the commit")?,
            welcome: welcome.map(|w| serialize(w, "the Welcome")).transpose()?,
            group_info: serialize(&MlsMessageOut::from(group_info), "the GroupInfo")?,
        })
    }
}

/// What a member can tell about a message it could not process: enough to
/// decide whether to rejoin, and whom to name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unprocessed {
    /// The epoch the message names.
    pub epoch: u64,
    /// Whether it is a commit.
    pub commit: bool,
    /// The account of the leaf that sent it, when the message is a
    /// PublicMessage of our current epoch (whose tree we hold).
    pub sender: Option<AccountId>,
}

/// The group's public state followed, commit by commit, from the state
/// this member last verified ([`Member::descent`]): what group repair
/// checks a GroupInfo against before it rejoins (DESIGN §5, "Repair never
/// goes back"). Each commit is verified as the server verifies it (the
/// sender's leaf signature under the tree of its epoch), so only members of
/// each epoch could have written the chain; a GroupInfo is accepted only if
/// its group context (epoch, tree hash, transcript hash) is the one the
/// chain reaches.
pub struct Descent {
    storage: openmls_memory_storage::MemoryStorage,
    public: PublicGroup,
    crypto: openmls_rust_crypto::RustCrypto,
    /// The accounts in the group where the walk started.
    pub start_members: Vec<AccountId>,
    /// The epoch where the walk started.
    pub start_epoch: u64,
    /// Proposals of the walk's epoch it holds.
    pending: usize,
    /// Of those, members' proposals (at most [`MAX_PENDING_PROPOSALS`], as
    /// an honest server keeps) ...
    member_pending: usize,
    /// ... and the leaves the server's removal proposals name (one each,
    /// of a leaf in the tree).
    server_removals: std::collections::BTreeSet<LeafNodeIndex>,
}

/// A member's state of a group as another party can check it: the
/// GroupInfo with the ratchet tree (signed by the member's leaf) and the
/// proposals of its epoch it had read (each a serialized openmls
/// `QueuedProposal`). The start of a [`Descent`]; what a first device hands
/// a device it links, so the new device's first join is walked from it.
#[derive(Clone, PartialEq, Eq)]
pub struct Handover {
    pub info: Vec<u8>,
    pub proposals: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover").field("info", &self.info.len()).field("proposals", &self.proposals.len()).finish()
    }
}

impl std::fmt::Debug for Descent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Descent").field("start_epoch", &self.start_epoch).field("epoch", &self.epoch()).finish()
    }
}

impl Descent {
    /// The epoch the walk has reached.
    pub fn epoch(&self) -> u64 {
        self.public.group_context().epoch().as_u64()
    }

    /// Takes one message of the group's log: a proposal or commit of the
    /// walk's epoch that verifies moves it on (a commit to the next
    /// epoch); anything else (application messages, other epochs, what
    /// does not verify: a server may insert junk) is passed over. Returns
    /// whether the epoch moved.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let Ok(framed) = crate::mls::frame(bytes) else { return false };
        if framed.group != self.public.group_id().as_slice() || framed.epoch != self.epoch() {
            return false;
        }
        let Ok(processed) = self.public.process_message(&self.crypto, framed.message) else { return false };
        // What a member's own `receive` would refuse, the walk refuses too:
        // a signature under the tree proves only that the signer held a
        // leaf, or (an external commit) that it had a GroupInfo, which the
        // server keeps and anyone it hands one to can use.
        let holders: HashMap<LeafNodeIndex, (AccountId, DeviceId)> =
            self.public.members().filter_map(|m| holder_of(&m.credential).map(|h| (m.index, h))).collect();
        let sender = processed.sender().clone();
        match processed.into_content() {
            ProcessedMessageContent::ProposalMessage(p) => {
                // What the walk refuses is passed over like junk.
                let _ = self.take_pending(*p);
                false
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let moved = vet_commit(&staged, &sender, &holders, self.public.group_context()).is_ok()
                    && self.public.merge_commit(&self.storage, *staged).is_ok();
                if moved {
                    self.pending = 0;
                    self.member_pending = 0;
                    self.server_removals.clear();
                }
                moved
            }
            _ => false,
        }
    }

    /// A walk from the state in `handover`: this member's own (see
    /// [`Member::descent`]), or the one its account's first device handed
    /// over when it linked this device. The GroupInfo must be of `group`
    /// and verify against its tree, and every proposal must be one the walk
    /// itself would have taken.
    pub fn from_handover(group: &[u8], handover: &Handover) -> Result<Self, MlsError> {
        if handover.proposals.len() > MAX_HANDOVER_PROPOSALS {
            return Err(MlsError::Handover(format!("{} pending proposals", handover.proposals.len())));
        }
        let info = crate::mls::parse_group_info(&handover.info)?;
        if info.group_id().as_slice() != group {
            return Err(MlsError::OtherGroup);
        }
        let tree = info.extensions().ratchet_tree().map(|t| t.ratchet_tree().clone()).ok_or(MlsError::NoTree)?;
        let storage = openmls_memory_storage::MemoryStorage::default();
        let crypto = openmls_rust_crypto::RustCrypto::default();
        let (public, _) = PublicGroup::from_external(&crypto, &storage, tree, info, ProposalStore::new())
            .context("the group state handed over does not verify")?;
        check_tree(public.members(), "handover")?;
        crate::mls::check_tree_keys(&public.export_ratchet_tree(), public.ciphersuite())?;
        let start_members = public.members().filter_map(|m| holder_of(&m.credential).map(|(a, _)| a)).collect();
        let start_epoch = public.group_context().epoch().as_u64();
        let mut descent = Descent {
            storage,
            public,
            crypto,
            start_members,
            start_epoch,
            pending: 0,
            member_pending: 0,
            server_removals: std::collections::BTreeSet::new(),
        };
        for bytes in &handover.proposals {
            let p: QueuedProposal =
                serde_json::from_slice(bytes).map_err(|e| MlsError::Handover(format!("a pending proposal: {e}")))?;
            descent.take_pending(p)?;
        }
        Ok(descent)
    }

    /// Takes a proposal of the walk's epoch, bounded as an honest server
    /// bounds them (whoever holds the removal key can sign any number, and
    /// each one stored costs more than the last): from the server's
    /// removal key only removals, one per leaf in the tree; from members
    /// at most [`MAX_PENDING_PROPOSALS`], of the kinds a member's own
    /// `receive` takes.
    fn take_pending(&mut self, p: QueuedProposal) -> Result<(), MlsError> {
        let holders: HashMap<LeafNodeIndex, (AccountId, DeviceId)> =
            self.public.members().filter_map(|m| holder_of(&m.credential).map(|h| (m.index, h))).collect();
        let removal = match (p.sender(), p.proposal()) {
            (Sender::External(_), Proposal::Remove(r)) => Some(r.removed()),
            _ => None,
        };
        let allowed = match (p.sender(), p.proposal()) {
            (Sender::External(_), Proposal::Remove(r)) => {
                holders.contains_key(&r.removed()) && !self.server_removals.contains(&r.removed())
            }
            (Sender::Member(_), _) if self.member_pending >= MAX_PENDING_PROPOSALS => false,
            (Sender::Member(i), Proposal::Update(u)) => same_holder(&holders, Some(*i), u.leaf_node()).is_ok(),
            (Sender::Member(_), proposal) => check_proposal_use(proposal, ProposalUse::Pending).is_ok(),
            _ => false,
        };
        if !allowed {
            return Err(MlsError::Handover("a pending proposal the walk would not take".into()));
        }
        self.public.add_proposal(&self.storage, p).context("a pending proposal")?;
        self.pending += 1;
        match removal {
            Some(leaf) => {
                self.server_removals.insert(leaf);
            }
            None => self.member_pending += 1,
        }
        Ok(())
    }

    /// How many proposals of the walk's epoch it holds.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether `info` describes the state the walk reached.
    fn reaches(&self, info: &VerifiableGroupInfo) -> bool {
        info.group_context() == self.public.group_context()
    }
}

/// An MLS operation failed, or what it was handed was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MlsError {
    /// openmls failed at `what` (its own error, as text: openmls's error
    /// types are generic over the storage provider).
    #[error("{what}: {why}")]
    Openmls { what: &'static str, why: String },
    #[error("not in that group")]
    NotInGroup,
    #[error("cannot load the group state")]
    Load,
    #[error("the MLS signature key is missing from the state")]
    MissingSignatureKey,
    #[error("the MLS signature key is not Ed25519")]
    NotEd25519,
    #[error("the stored device certificate: {0}")]
    StoredCertificate(crate::auth::CredentialError),
    #[error("no randomness available from the operating system")]
    Random,
    #[error("the KeyPackage the server handed out for {who} was refused: {why}")]
    KeyPackage { who: String, why: Unfit },
    #[error("none of those accounts is in the group")]
    NoneInGroup,
    #[error("refused to {action}: leaf {leaf} of the group's tree is not certified ({why})")]
    UncertifiedLeaf { action: &'static str, leaf: u32, why: crate::auth::CredentialError },
    #[error("refused to {action}: leaf {leaf} of the group's tree repeats a device")]
    RepeatedDevice { action: &'static str, leaf: u32 },
    #[error("this device has no leaf in the group any more; a member must add it again")]
    NoOwnLeaf,
    #[error("this device already has a leaf in the group")]
    AlreadyInGroup,
    #[error("this account is not in the group (any more)")]
    AccountNotInGroup,
    #[error("the GroupInfo is for another group")]
    OtherGroup,
    #[error("the GroupInfo is of another ciphersuite (0x{offered:04x}) than the group's ({ours}): refused")]
    OtherSuite { ours: Suite, offered: u16 },
    #[error(
        "the server offered the group's state at epoch {offered}, which is not after the epoch this device already \
         verified ({ours}): it would take this device back in the group's history"
    )]
    OlderState { offered: u64, ours: u64 },
    #[error(
        "the server offered the group's state at epoch {offered}, but this account's first device handed over epoch \
         {anchor}: a state of the group from before this device was linked, or another history of it"
    )]
    BeforeAnchor { offered: u64, anchor: u64 },
    #[error(
        "the server offered the group's state at epoch {offered}, but did not show the commits that lead there from \
         epoch {reached} (the last this device could verify): it may be another history of the group. The state \
         was kept; if the commits are gone for good (the device was away longer than the server keeps them), check \
         the group's members with a member, then run `hush group rejoin GROUP` to rejoin anyway"
    )]
    UnprovenState { offered: u64, reached: u64 },
    #[error("no ratchet tree came with the GroupInfo")]
    NoTree,
    #[error("the group state handed over is not usable: {0}")]
    Handover(String),
    #[error(transparent)]
    Refused(#[from] crate::mls::MlsRefusal),
    #[error("not a Welcome")]
    NotAWelcome,
    #[error("unexpected message content")]
    UnexpectedContent,
    #[error("openmls made no GroupInfo for the commit")]
    NoGroupInfo,
    #[error("the group does not list the server as its one external sender, so hush cannot change its settings")]
    NoServerSender,
    /// Members whose devices do not read hush's settings yet.
    #[error(
        "{} device(s) in the group run a hush from before disappearing messages; once they upgrade and sync, try again",
        .0.len()
    )]
    SettingsUnsupported(Vec<AccountId>),
    /// What the adversary module could not forge (tests only).
    #[error("forging: {0}")]
    Forgery(String),
}

/// `.context("what we were doing")` on an openmls result.
trait Context<T> {
    fn context(self, what: &'static str) -> Result<T, MlsError>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: &'static str) -> Result<T, MlsError> {
        self.map_err(|e| MlsError::Openmls { what, why: e.to_string() })
    }
}

/// What processing a message from the group yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Decrypted application data, with the authenticated data it was
    /// sent with.
    Application { sender: Option<AccountId>, data: Vec<u8>, aad: Vec<u8> },
    /// A commit was merged; the group is now at `epoch`. `rejoined`: it was
    /// the sender's resync (an external commit replacing its own leaf);
    /// `new_device`: a new device of the sender's account joined (an
    /// external commit adding its leaf).
    /// `removed`: the accounts whose leaves the commit removed, and on
    /// whose proposal (true author: the committer, the leaf itself leaving,
    /// or the server).
    Commit {
        sender: Option<AccountId>,
        epoch: u64,
        removed_me: bool,
        rejoined: bool,
        new_device: bool,
        removed: Vec<Removed>,
        /// The group's settings, when the commit changed them (its sender
        /// set the disappearing-message timer).
        settings: Option<GroupSettings>,
    },
    /// A member's proposal was stored. `removing`: the account whose leaf it
    /// proposes to remove; `leaving`: a leaf of the sender's own account (a
    /// member leaving, committed by the others on their next sync). A
    /// proposal to remove someone else lapses with the epoch unless a
    /// member chooses to remove them (`hush group remove`).
    Proposal { sender: Option<AccountId>, removing: Option<AccountId>, leaving: bool },
    /// A commit or proposal was refused because a leaf it adds or changes
    /// is not certified, or changes whose leaf it is. Nothing was applied.
    Refused { sender: Option<AccountId>, reason: String },
    /// The server, as the group's external sender, proposed removing a
    /// device of `account` (revoked, or the account removed by the
    /// operator). Stored for the next commit.
    ServerRemoval { account: Option<AccountId> },
}

impl Received {
    /// The texts among `received` application data, in order (invalid
    /// UTF-8 read lossily): what a test or a plain-text client reads.
    pub fn texts(received: &[Received]) -> Vec<String> {
        received
            .iter()
            .filter_map(|r| match r {
                Received::Application { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
                _ => None,
            })
            .collect()
    }
}

/// A leaf a commit removed: whose it was, and whose proposal removed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub account: AccountId,
    pub by: RemovedBy,
}

/// Who asked for a removal a commit carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedBy {
    /// The committer, in its own commit.
    Committer,
    /// The removed leaf itself (it left), committed by another member.
    Itself,
    /// The server, as the group's external sender (a revoked device or an
    /// account the operator removed).
    Server,
    /// Another member's pending proposal that the committer chose to
    /// commit.
    Member(AccountId),
}

/// Whether a stored proposal may go into a commit this member builds
/// without being asked: only the server's removal proposals and a member
/// leaving (a Remove of a leaf of its own account). A member's proposal to
/// remove someone else, an Update, or anything else stored is never
/// committed silently (and a proposal hush does not use is never stored).
/// `accounts` maps the group's leaves to their accounts.
fn committable(p: &QueuedProposal, own: LeafNodeIndex, accounts: &HashMap<LeafNodeIndex, AccountId>) -> bool {
    // openmls runs its filter over the committer's own proposals too
    // (inline, by value): those are what this member chose to commit.
    if p.proposal_or_ref_type() == ProposalOrRefType::Proposal {
        return matches!(p.sender(), Sender::Member(i) if *i == own);
    }
    match (p.proposal(), p.sender()) {
        (Proposal::Remove(_), Sender::External(_)) => true,
        (Proposal::Remove(r), Sender::Member(i)) => {
            *i != own && accounts.get(&r.removed()).is_some_and(|a| accounts.get(i) == Some(a))
        }
        _ => false,
    }
}

/// The account of each leaf of a group.
fn leaf_accounts(g: &MlsGroup) -> HashMap<LeafNodeIndex, AccountId> {
    g.members().filter_map(|m| holder_of(&m.credential).map(|(a, _)| (m.index, a))).collect()
}

/// One member: its MLS signature key, credential and groups, kept in the
/// provider's storage (in memory for [`OpenMlsRustCrypto`], SQLite for the
/// CLI).
pub struct Member<P: OpenMlsProvider = OpenMlsRustCrypto> {
    provider: P,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    certificate: DeviceCertificate,
    groups: HashMap<Vec<u8>, MlsGroup>,
    /// The server's removal key: the only external sender whose proposals
    /// this member accepts (`None`: it accepts none).
    removal_key: Option<[u8; 32]>,
    /// Devices whose account revoked them (account-signed revocations this
    /// member has seen), each with the account that signed: a leaf of one,
    /// certified by that same account, is removed before this member sends
    /// anything in its group ([`Member::revoked_in`]).
    revoked: std::collections::BTreeSet<(AccountId, DeviceId)>,
}

impl<P: OpenMlsProvider> std::fmt::Debug for Member<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("account", &self.certificate.account).finish_non_exhaustive()
    }
}

/// Why a member refuses what it was handed (a KeyPackage to add, a
/// proposal, a commit), whoever relayed it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Unfit {
    #[error("not a KeyPackage: {0}")]
    NotAKeyPackage(String),
    #[error("invalid KeyPackage: {0}")]
    InvalidKeyPackage(String),
    #[error("its KeyPackage is of another ciphersuite than the group's ({0})")]
    OtherSuite(String),
    #[error(transparent)]
    Uncertified(crate::auth::CredentialError),
    #[error("its device certificate is signed by another account ({0})")]
    OtherAccount(String),
    #[error("an updated leaf is not certified ({0})")]
    UpdateUncertified(crate::auth::CredentialError),
    #[error("an update would change whose leaf it is")]
    ChangesHolder,
    #[error("a commit from outside the group")]
    FromOutside,
    #[error(transparent)]
    Proposal(#[from] UnusedProposal),
    #[error("an added member is not certified ({0})")]
    AddUncertified(crate::auth::CredentialError),
    #[error("an external commit without a new leaf")]
    NoNewLeaf,
    #[error("a rejoining leaf is not certified ({0})")]
    RejoinUncertified(crate::auth::CredentialError),
    #[error("an external commit that does more than rejoin")]
    ExternalDoesMore,
    #[error("an external commit that neither replaces the sender's own leaf nor adds a device of a member")]
    ExternalNotRejoin,
    #[error("group settings changed other than inline in their proposer's own commit")]
    SettingsNotInline,
    #[error("group settings hush does not accept: {0}")]
    Settings(String),
}

/// Why a KeyPackage handed out for an account may not be added.
pub fn check_key_package(bytes: &[u8], account: &AccountId) -> Result<KeyPackage, Unfit> {
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|e| Unfit::NotAKeyPackage(e.to_string()))?;
    let kp = kp_in.validate(&crypto, ProtocolVersion::Mls10).map_err(|e| Unfit::InvalidKeyPackage(e.to_string()))?;
    // The server's shape rules too (red team, issue 35): an init or leaf
    // key of another length than the suite's KEM's would make the add, or
    // every later commit, fail to encrypt: a server that hands one out
    // must not freeze the group.
    crate::mls::check_key_package_shape(&kp).map_err(|e| Unfit::InvalidKeyPackage(e.to_string()))?;
    let cert = node_certificate(kp.leaf_node()).map_err(Unfit::Uncertified)?;
    if cert.account != *account {
        return Err(Unfit::OtherAccount(cert.account.short()));
    }
    Ok(kp)
}

/// A leaf may change its keys, never whose it is.
fn same_holder(
    holders: &HashMap<LeafNodeIndex, (AccountId, DeviceId)>,
    index: Option<LeafNodeIndex>,
    leaf: &LeafNode,
) -> Result<(), Unfit> {
    let cert = node_certificate(leaf).map_err(Unfit::UpdateUncertified)?;
    match index.and_then(|i| holders.get(&i)) {
        Some(held) if *held == (cert.account, cert.device) => Ok(()),
        _ => Err(Unfit::ChangesHolder),
    }
}

/// What a member accepts of a commit that verified under the tree of its
/// epoch (`holders`: who holds each leaf there), whatever the server
/// relayed: an external commit only as a device's resync of its own leaf
/// or a new device of an account in the group; a member's commit with only
/// the proposals hush uses, leaves that keep their holders, and certified
/// additions. Used for every commit a member processes and for every
/// commit a repair's walk takes ([`Descent::feed`]). Returns whether it is
/// an external commit adding a new device.
fn vet_commit(
    staged: &StagedCommit,
    sender: &Sender,
    holders: &HashMap<LeafNodeIndex, (AccountId, DeviceId)>,
    before: &GroupContext,
) -> Result<bool, Unfit> {
    let sender_leaf = match sender {
        Sender::Member(i) => Some(*i),
        _ => None,
    };
    let mut new_device = false;
    if matches!(sender, Sender::NewMemberCommit) {
        new_device = check_resync(staged, holders)?;
    } else if sender_leaf.is_none() {
        return Err(Unfit::FromOutside);
    } else {
        if let Some(leaf) = staged.update_path_leaf_node() {
            same_holder(holders, sender_leaf, leaf)?;
        }
        for queued in staged.queued_proposals() {
            check_proposal_use(queued.proposal(), ProposalUse::Commit)?;
            if let Proposal::GroupContextExtensions(_) = queued.proposal() {
                // Inline, by the committer itself: a settings change is its
                // sender's own, never a proposal someone else left waiting.
                let own = queued.proposal_or_ref_type() == ProposalOrRefType::Proposal
                    && matches!(queued.sender(), Sender::Member(i) if Some(*i) == sender_leaf);
                if !own {
                    return Err(Unfit::SettingsNotInline);
                }
                crate::mls::check_settings_change(before, staged.group_context())
                    .map_err(|e| Unfit::Settings(e.to_string()))?;
            }
        }
    }
    for update in staged.update_proposals() {
        let index = match update.sender() {
            Sender::Member(i) => Some(*i),
            _ => None,
        };
        same_holder(holders, index, update.update_proposal().leaf_node())?;
    }
    for add in staged.add_proposals() {
        node_certificate(add.add_proposal().key_package().leaf_node()).map_err(Unfit::AddUncertified)?;
    }
    Ok(new_device)
}

/// Accepts an external commit only from a device of an account in the
/// group: as a resync (only the ExternalInit and the Remove of exactly
/// that device's own leaf), or as a new device of that account joining
/// (only the ExternalInit). Returns whether it was a new device.
fn check_resync(staged: &StagedCommit, holders: &HashMap<LeafNodeIndex, (AccountId, DeviceId)>) -> Result<bool, Unfit> {
    let leaf = staged.update_path_leaf_node().ok_or(Unfit::NoNewLeaf)?;
    let cert = node_certificate(leaf).map_err(Unfit::RejoinUncertified)?;
    let mut removed = Vec::new();
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::ExternalInit(_) => {}
            Proposal::Remove(r) => removed.push(r.removed()),
            _ => return Err(Unfit::ExternalDoesMore),
        }
    }
    match removed.as_slice() {
        [only] if holders.get(only) == Some(&(cert.account, cert.device)) => Ok(false),
        [] if holders.values().any(|(a, _)| *a == cert.account)
            && !holders.values().any(|(_, d)| *d == cert.device) =>
        {
            Ok(true)
        }
        _ => Err(Unfit::ExternalNotRejoin),
    }
}

fn check_tree(members: impl Iterator<Item = openmls::group::Member>, action: &'static str) -> Result<(), MlsError> {
    let mut devices = std::collections::BTreeSet::new();
    for m in members {
        let leaf = m.index.u32();
        let cert = leaf_certificate(&m.credential, &m.signature_key).map_err(|why| MlsError::UncertifiedLeaf {
            action,
            leaf,
            why,
        })?;
        if !devices.insert(cert.device) {
            return Err(MlsError::RepeatedDevice { action, leaf });
        }
    }
    Ok(())
}

/// The leaf this member puts in each commit's path: its capabilities
/// (its credential and key stay).
fn own_leaf_parameters() -> LeafNodeParameters {
    LeafNodeParameters::builder().with_capabilities(member_capabilities()).build()
}

fn serialize(m: &impl tls_codec::Serialize, what: &'static str) -> Result<Vec<u8>, MlsError> {
    m.tls_serialize_detached().map_err(|e| MlsError::Openmls { what, why: e.to_string() })
}

impl Member<OpenMlsRustCrypto> {
    /// An in-memory member for the device whose TLS key is `device`, of the
    /// account `account`, with a fresh MLS signature key certified by the
    /// account key.
    pub fn new(account: &Identity, device: DeviceId) -> Result<Self, MlsError> {
        Self::create(OpenMlsRustCrypto::default(), account, device, crate::util::now_unix())
    }

    /// A fresh account with one fresh device, in memory (tests, benchmarks,
    /// fuzzing): the account key, the device's TLS key and its member.
    pub fn generate() -> Result<(Identity, Identity, Self), MlsError> {
        let account = Identity::generate().map_err(|_| MlsError::Random)?;
        let device = Identity::generate().map_err(|_| MlsError::Random)?;
        let member = Self::new(&account, DeviceId(device.public_key()))?;
        Ok((account, device, member))
    }
}

impl<P: OpenMlsProvider> Member<P> {
    /// A member with a fresh MLS signature key, stored in `provider`, and
    /// its device certificate signed now by `account`.
    /// The provider (tests arm adversarial crypto through it).
    #[cfg(test)]
    pub(crate) fn provider(&self) -> &P {
        &self.provider
    }

    pub fn create(provider: P, account: &Identity, device: DeviceId, now: u64) -> Result<Self, MlsError> {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).context("signature key")?;
        signer.store(provider.storage()).context("storing the signature key")?;
        let mls_key: [u8; 32] = signer.public().try_into().map_err(|_| MlsError::NotEd25519)?;
        let certificate = DeviceCertificate::issue(account, device, mls_key, now);
        Ok(Self::assemble(provider, signer, certificate))
    }

    /// A fresh MLS signature key, stored in `provider`, for a device whose
    /// certificate another device will sign (linking); returns its public
    /// key. [`Member::load`] finds it once the certificate arrives.
    pub fn new_signature_key(provider: &P) -> Result<[u8; 32], MlsError> {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).context("signature key")?;
        signer.store(provider.storage()).context("storing the signature key")?;
        signer.public().try_into().map_err(|_| MlsError::NotEd25519)
    }

    /// A member whose certificate is `certificate` and whose signature key
    /// is already in `provider`'s storage.
    pub fn load(provider: P, certificate: &[u8]) -> Result<Self, MlsError> {
        let certificate = DeviceCertificate::decode(certificate).map_err(MlsError::StoredCertificate)?;
        let signer =
            SignatureKeyPair::read(provider.storage(), &certificate.mls_key, CIPHERSUITE.signature_algorithm())
                .ok_or(MlsError::MissingSignatureKey)?;
        Ok(Self::assemble(provider, signer, certificate))
    }

    fn assemble(provider: P, signer: SignatureKeyPair, certificate: DeviceCertificate) -> Self {
        let credential = CredentialWithKey {
            credential: BasicCredential::new(certificate.encode()).into(),
            signature_key: signer.public().into(),
        };
        Self {
            provider,
            signer,
            credential,
            certificate,
            groups: HashMap::new(),
            removal_key: None,
            revoked: Default::default(),
        }
    }

    /// Marks `device` revoked by `account` (the caller verified the
    /// revocation's signature under `account`'s key): from now on a leaf of
    /// that device *certified by that account* is to be removed wherever it
    /// is ([`Member::revoked_in`]). A revocation signed by another account
    /// than the device's own (any member can sign one with its own key)
    /// revokes nothing.
    pub fn revoke(&mut self, account: AccountId, device: DeviceId) {
        self.revoked.insert((account, device));
    }

    /// The devices of `group` whose own account revoked them (never this
    /// device: it cannot commit its own removal).
    pub fn revoked_in(&mut self, group: &[u8]) -> Vec<DeviceId> {
        let revoked = self.revoked.clone();
        let own = self.certificate.device;
        let Ok(g) = self.group_mut(group) else { return Vec::new() };
        g.members()
            .filter_map(|m| holder_of(&m.credential))
            .filter(|(a, d)| *d != own && revoked.contains(&(*a, *d)))
            .map(|(_, d)| d)
            .collect()
    }

    /// The account whose certificate the leaf of `device` in `group`
    /// carries, if the device holds a leaf there.
    pub fn account_of_device(&mut self, group: &[u8], device: &DeviceId) -> Option<AccountId> {
        let g = self.group_mut(group).ok()?;
        g.members().filter_map(|m| holder_of(&m.credential)).find(|(_, d)| d == device).map(|(a, _)| a)
    }

    /// Whether `account` revoked `device` (a revocation this member saw).
    pub fn is_revoked(&self, account: &AccountId, device: &DeviceId) -> bool {
        self.revoked.contains(&(*account, *device))
    }

    /// Accept external proposals (removals of revoked devices) signed by
    /// this key, the server's removal key, and by no other.
    pub fn set_removal_key(&mut self, key: [u8; 32]) {
        self.removal_key = Some(key);
    }

    /// Whether this member should commit now: proposals are waiting (while
    /// any is, openmls sends no application message), and none that it
    /// would commit removes its own leaf (a member cannot commit its own
    /// removal; another member will). The commit ([`Member::commit_pending`])
    /// takes the server's removals and members leaving, and leaves out every
    /// other proposal, which ends with the epoch: a member's proposal to
    /// remove someone else is, in effect, declined by whoever commits next.
    pub fn should_commit_pending(&mut self, group: &[u8]) -> bool {
        let Ok(g) = self.group_mut(group) else { return false };
        let own = g.own_leaf_index();
        let accounts = leaf_accounts(g);
        let mut any = false;
        for p in g.pending_proposals() {
            if committable(p, own, &accounts) && matches!(p.proposal(), Proposal::Remove(r) if r.removed() == own) {
                return false;
            }
            any = true;
        }
        any
    }

    /// What [`Member::commit_pending`] would remove, and on whose proposal
    /// (for the committer's own history).
    pub fn committable_removals(&mut self, group: &[u8]) -> Vec<Removed> {
        let Ok(g) = self.group_mut(group) else { return Vec::new() };
        let own = g.own_leaf_index();
        let holders = leaf_accounts(g);
        g.pending_proposals()
            .filter(|p| committable(p, own, &holders))
            .filter_map(|p| match (p.proposal(), p.sender()) {
                (Proposal::Remove(r), Sender::External(_)) => {
                    holders.get(&r.removed()).map(|a| Removed { account: *a, by: RemovedBy::Server })
                }
                (Proposal::Remove(r), _) => {
                    holders.get(&r.removed()).map(|a| Removed { account: *a, by: RemovedBy::Itself })
                }
                _ => None,
            })
            .collect()
    }

    /// This device's certificate (its credential in every group).
    pub fn certificate(&self) -> &DeviceCertificate {
        &self.certificate
    }

    pub fn device(&self) -> DeviceId {
        self.certificate.device
    }

    /// The group, loaded from storage on first use.
    fn group_mut(&mut self, id: &[u8]) -> Result<&mut MlsGroup, MlsError> {
        if !self.groups.contains_key(id) {
            let loaded = MlsGroup::load(self.provider.storage(), &GroupId::from_slice(id))
                .map_err(|_| MlsError::Load)?
                .ok_or(MlsError::NotInGroup)?;
            self.groups.insert(id.to_vec(), loaded);
        }
        self.groups.get_mut(id).ok_or(MlsError::NotInGroup)
    }

    /// Whether we hold state for the group.
    pub fn has_group(&mut self, id: &[u8]) -> bool {
        self.group_mut(id).is_ok()
    }

    pub fn account(&self) -> AccountId {
        self.certificate.account
    }

    /// `n` fresh KeyPackages of the classic suite, serialized for upload.
    pub fn key_packages(&self, n: usize) -> Result<Vec<Vec<u8>>, MlsError> {
        self.key_packages_of(Suite::Classic, n)
    }

    /// `n` fresh KeyPackages of `suite`, serialized for upload.
    pub fn key_packages_of(&self, suite: Suite, n: usize) -> Result<Vec<Vec<u8>>, MlsError> {
        (0..n)
            .map(|_| {
                let bundle = KeyPackage::builder()
                    .leaf_node_capabilities(member_capabilities())
                    .build(suite.ciphersuite(), &self.provider, &self.signer, self.credential.clone())
                    .context("building a KeyPackage")?;
                serialize(bundle.key_package(), "a KeyPackage")
            })
            .collect()
    }

    fn create_config(removal_key: &[u8; 32], suite: Suite) -> Result<MlsGroupCreateConfig, MlsError> {
        // No settings until a member sets a timer: that commit adds them,
        // with the capability they require of every member (so devices
        // whose KeyPackages predate them can still be added to groups
        // without a timer).
        let senders = Extensions::single(Extension::ExternalSenders(vec![server_sender(removal_key)]))
            .context("external senders")?;
        Ok(MlsGroupCreateConfig::builder()
            .ciphersuite(suite.ciphersuite())
            .capabilities(member_capabilities())
            .with_group_context_extensions(senders)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .padding_size(PADDING)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE))
            .build())
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .padding_size(PADDING)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE))
            .build()
    }

    /// Creates a group with a random id bound to this member's account
    /// that lists `removal_key` (the server's, from its `Status`) as its one
    /// external sender; returns the id and what the server needs to
    /// register it (GroupInfo message, ratchet tree).
    pub fn create_group(&mut self, removal_key: &[u8; 32]) -> Result<NewGroup, MlsError> {
        self.create_group_of(removal_key, Suite::Classic)
    }

    /// [`Member::create_group`] with the ciphersuite `suite`.
    pub fn create_group_of(&mut self, removal_key: &[u8; 32], suite: Suite) -> Result<NewGroup, MlsError> {
        let mut nonce = [0u8; GROUP_NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| "no randomness")
            .context("group id")?;
        let id = crate::mls::group_id_for(&self.certificate.account, &nonce);
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &Self::create_config(removal_key, suite)?,
            GroupId::from_slice(&id),
            self.credential.clone(),
        )
        .context("creating the group")?;
        let info = group.export_group_info(self.provider.crypto(), &self.signer, false).context("GroupInfo")?;
        let info = serialize(&info, "the GroupInfo")?;
        let tree = serialize(&group.export_ratchet_tree(), "the ratchet tree")?;
        self.groups.insert(id.to_vec(), group);
        Ok(NewGroup { id: id.to_vec(), group_info: info, ratchet_tree: tree })
    }

    /// A commit adding the devices whose `key_packages` the server handed
    /// out, each paired with the account it was claimed for, and their
    /// Welcome. Every package must be certified by exactly that account
    /// ([`check_key_package`]); otherwise nothing is built. The commit stays
    /// pending until [`Member::merge_pending`] (server accepted) or
    /// [`Member::discard_pending`] (server refused).
    pub fn add(&mut self, group: &[u8], key_packages: &[(AccountId, Vec<u8>)]) -> Result<Commit, MlsError> {
        let ciphersuite = self.group_mut(group)?.ciphersuite();
        let mut kps = Vec::new();
        for (account, bytes) in key_packages {
            let kp =
                check_key_package(bytes, account).map_err(|why| MlsError::KeyPackage { who: account.short(), why })?;
            if kp.ciphersuite() != ciphersuite {
                return Err(MlsError::KeyPackage {
                    who: account.short(),
                    why: Unfit::OtherSuite(format!("{:?}", kp.ciphersuite())),
                });
            }
            kps.push(kp);
        }
        self.commit_with(group, kps, Vec::new(), false, None)
    }

    /// The one way this member builds a commit (DESIGN §5: commits are
    /// built from an allow-list, never from whatever was stored): its own
    /// `adds` and `removes`, a path when `self_update`, and of the stored
    /// proposals only those [`committable`] says.
    fn commit_with(
        &mut self,
        group: &[u8],
        adds: Vec<KeyPackage>,
        removes: Vec<LeafNodeIndex>,
        self_update: bool,
        settings: Option<Extensions<GroupContext>>,
    ) -> Result<Commit, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        let own = g.own_leaf_index();
        let accounts = leaf_accounts(g);
        let adds_anyone = !adds.is_empty();
        let mut builder = g
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes)
            .force_self_update(self_update)
            // Every commit carries a path whose leaf says what hush reads
            // (a member from before the settings advertises them from its
            // next commit on).
            .leaf_node_parameters(own_leaf_parameters());
        if let Some(extensions) = settings {
            builder = builder.propose_group_context_extensions(extensions).context("building a commit")?;
        }
        // The GroupInfo carries the tree only when a Welcome (which shares
        // its extensions) needs it: a joiner by Welcome has no other way to
        // the tree, while anyone fetching the GroupInfo gets the server's
        // tree with it. Without it a commit in a large group is a fifth of
        // the size (the tree is most of it) for the server to take in,
        // check and store.
        let bundle = builder
            .load_psks(provider.storage())
            .context("building a commit")?
            .create_group_info(true)
            .use_ratchet_tree_extension(adds_anyone)
            .build(provider.rand(), provider.crypto(), signer, |p| committable(p, own, &accounts))
            .context("building a commit")?
            .stage_commit(provider)
            .context("building a commit")?;
        let welcome = bundle.to_welcome_msg();
        let (commit, _, info) = bundle.into_contents();
        Commit::of(&commit, welcome.as_ref(), info)
    }

    /// A commit removing every leaf of these accounts.
    pub fn remove(&mut self, group: &[u8], accounts: &[AccountId]) -> Result<Commit, MlsError> {
        self.remove_leaves(group, |account, _| accounts.contains(account))
    }

    /// A commit removing these devices' leaves (a revoked device of our
    /// own account).
    pub fn remove_devices(&mut self, group: &[u8], devices: &[DeviceId]) -> Result<Commit, MlsError> {
        self.remove_leaves(group, |_, device| devices.contains(device))
    }

    /// A commit removing every leaf whose holder `which` picks.
    fn remove_leaves(
        &mut self,
        group: &[u8],
        which: impl Fn(&AccountId, &DeviceId) -> bool,
    ) -> Result<Commit, MlsError> {
        let g = self.group_mut(group)?;
        let leaves: Vec<LeafNodeIndex> = g
            .members()
            .filter(|m| holder_of(&m.credential).is_some_and(|(a, d)| which(&a, &d)))
            .map(|m| m.index)
            .collect();
        if leaves.is_empty() {
            return Err(MlsError::NoneInGroup);
        }
        self.commit_with(group, Vec::new(), leaves, false, None)
    }

    /// A proposal to remove ourselves; another member commits it.
    pub fn leave(&mut self, group: &[u8]) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        let proposal = g.leave_group(provider, signer).context("leaving")?;
        serialize(&proposal, "the proposal")
    }

    /// Proposals removing every leaf of this account (this device's and
    /// its siblings'): the account leaves the group. Others commit them.
    pub fn leave_account(&mut self, group: &[u8]) -> Result<Vec<Vec<u8>>, MlsError> {
        // The siblings' first: once this device's own leaving is sent, the
        // server takes nothing more from it in the group.
        let mut out = Vec::new();
        let account = self.account();
        let g = self.group_mut(group)?;
        let own = g.own_leaf_index();
        let siblings: Vec<LeafNodeIndex> = g
            .members()
            .filter(|m| m.index != own && holder_of(&m.credential).is_some_and(|(a, _)| a == account))
            .map(|m| m.index)
            .collect();
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        for leaf in siblings {
            let (message, _) = g.propose_remove_member(provider, signer, leaf).context("leaving")?;
            out.push(serialize(&message, "the proposal")?);
        }
        out.push(self.leave(group)?);
        Ok(out)
    }

    /// A commit of the stored proposals that may be committed without
    /// being asked: the server's removals and members leaving
    /// ([`Member::should_commit_pending`]).
    pub fn commit_pending(&mut self, group: &[u8]) -> Result<Commit, MlsError> {
        // With a fresh path: the commit may take no proposal at all.
        self.commit_with(group, Vec::new(), Vec::new(), true, None)
    }

    /// A commit that only refreshes this member's own leaf (new keys, same
    /// credential): post-compromise security, and what tests use to move a
    /// group to its next epoch.
    pub fn self_update(&mut self, group: &[u8]) -> Result<Commit, MlsError> {
        self.commit_with(group, Vec::new(), Vec::new(), true, None)
    }

    /// The group's settings (its disappearing-message timer), as every
    /// member agreed them.
    pub fn settings(&mut self, group: &[u8]) -> Result<GroupSettings, MlsError> {
        Ok(crate::mls::settings_in(self.group_mut(group)?.extensions()))
    }

    /// Whether this device's leaf in `group` predates hush's settings (it
    /// does not advertise them, so nobody can set the group's timer until
    /// it commits once: [`Member::self_update`] does).
    pub fn leaf_predates_settings(&mut self, group: &[u8]) -> bool {
        let settings = ExtensionType::Unknown(crate::mls::SETTINGS_EXTENSION);
        self.group_mut(group)
            .ok()
            .and_then(|g| g.own_leaf_node().map(|l| !l.capabilities().extensions().contains(&settings)))
            .unwrap_or(false)
    }

    /// The group's ciphersuite, without loading the group for later use
    /// (`None`: no state for it; an [`UnknownSuite`]: a group another
    /// version of hush made, or whose draft code point changed).
    pub fn suite_of(&self, group: &[u8]) -> Option<Result<Suite, UnknownSuite>> {
        let ciphersuite = match self.groups.get(group) {
            Some(g) => g.ciphersuite(),
            None => MlsGroup::load(self.provider.storage(), &GroupId::from_slice(group)).ok()??.ciphersuite(),
        };
        Some(Suite::of(ciphersuite))
    }

    /// [`Member::settings`] without loading the group for later use.
    pub fn settings_of(&self, group: &[u8]) -> Option<GroupSettings> {
        if let Some(g) = self.groups.get(group) {
            return Some(crate::mls::settings_in(g.extensions()));
        }
        let g = MlsGroup::load(self.provider.storage(), &GroupId::from_slice(group)).ok()??;
        Some(crate::mls::settings_in(g.extensions()))
    }

    /// A commit that sets the group's settings (DESIGN §12): an inline
    /// GroupContextExtensions proposal keeping the external senders as they
    /// are, with a fresh path. Members whose leaves predate the settings
    /// must have committed once since (openmls refuses otherwise).
    pub fn set_settings(&mut self, group: &[u8], settings: GroupSettings) -> Result<Commit, MlsError> {
        let key = self.removal_key.ok_or(MlsError::NoServerSender)?;
        let g = self.group_mut(group)?;
        let senders = g.extensions().external_senders().map(|s| s.as_slice()).unwrap_or_default();
        if senders != [server_sender(&key)] {
            return Err(MlsError::NoServerSender);
        }
        let wanted = ExtensionType::Unknown(crate::mls::SETTINGS_EXTENSION);
        let behind: Vec<AccountId> = g
            .members()
            .filter(|m| {
                g.public_group().leaf(m.index).is_some_and(|l| !l.capabilities().extensions().contains(&wanted))
            })
            .filter_map(|m| holder_of(&m.credential).map(|(a, _)| a))
            .collect();
        if !behind.is_empty() {
            return Err(MlsError::SettingsUnsupported(behind));
        }
        let extensions = settings.extensions(&key).context("group settings")?;
        self.commit_with(group, Vec::new(), Vec::new(), true, Some(extensions))
    }

    /// Rejoins `group` at the epoch `group_info` describes (the group's
    /// current GroupInfo, from the server; `ratchet_tree` when the GroupInfo
    /// does not carry it) by an external commit that replaces this device's
    /// own leaf: group repair, for a member that cannot process a commit, has
    /// fallen behind its retained epochs, or lost its state for the group.
    ///
    /// Trusts no one: the GroupInfo must verify against the tree, every
    /// leaf of the tree must be certified (each device once, like a
    /// Welcome's), and this device must hold a leaf with its own signature
    /// key (the one the commit removes). The new state replaces the old one
    /// at once, the old one being of no further use; if the server refuses
    /// the commit, [`Member::forget`] the group and rejoin again.
    pub fn resync(
        &mut self,
        group: &[u8],
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
        descent: Option<&Descent>,
    ) -> Result<Commit, MlsError> {
        let (info, tree, public) = self.verify_rejoin(group, group_info, ratchet_tree)?;
        if let Some(d) = descent {
            let offered = info.epoch().as_u64();
            if offered <= d.start_epoch {
                return Err(MlsError::OlderState { offered, ours: d.start_epoch });
            }
            if !d.reaches(&info) {
                return Err(MlsError::UnprovenState { offered, reached: d.epoch() });
            }
        }
        let own_leaf = public.members().any(|m| {
            holder_of(&m.credential).is_some_and(|(_, d)| d == self.certificate.device)
                && m.signature_key == self.signer.public()
        });
        if !own_leaf {
            return Err(MlsError::NoOwnLeaf);
        }
        self.rejoin(group, info, tree)
    }

    /// The start of a [`Descent`] from this member's current state of
    /// `group` (its tree and group context, exported and re-read as a
    /// public group). `None` without state for the group.
    pub fn descent(&mut self, group: &[u8]) -> Result<Option<Descent>, MlsError> {
        let Some(handover) = self.handover(group)? else { return Ok(None) };
        Descent::from_handover(group, &handover).map(Some)
    }

    /// This member's current state of `group` as a [`Handover`]: its
    /// GroupInfo with the tree (signed by this device), and the proposals of
    /// the epoch it already read (a commit may take them by reference).
    /// `None` without state for the group.
    pub fn handover(&mut self, group: &[u8]) -> Result<Option<Handover>, MlsError> {
        if !self.has_group(group) {
            return Ok(None);
        }
        self.group_mut(group)?;
        let g = self.groups.get(group).ok_or(MlsError::NotInGroup)?;
        let exported = g.export_group_info(self.provider.crypto(), &self.signer, true).context("our GroupInfo")?;
        let info = serialize(&exported, "our GroupInfo")?;
        let mut proposals = Vec::new();
        for p in g.pending_proposals() {
            proposals.push(serde_json::to_vec(p).map_err(|e| MlsError::Handover(e.to_string()))?);
        }
        Ok(Some(Handover { info, proposals }))
    }

    /// This member's epoch of `group` and its confirmed transcript hash (what
    /// a linked device's first join must not go back from).
    pub fn anchor(&mut self, group: &[u8]) -> Option<(u64, Vec<u8>)> {
        let g = self.group_mut(group).ok()?;
        let context = g.public_group().group_context();
        Some((context.epoch().as_u64(), context.confirmed_transcript_hash().to_vec()))
    }

    /// Drops the cached state of `group`, so it is read again from storage
    /// (after the storage was rolled back).
    pub fn evict(&mut self, group: &[u8]) {
        self.groups.remove(group);
    }

    /// Joins `group` as a new device of an account that is already in it
    /// (this device was linked after the account joined), by an external
    /// commit adding this device's leaf. The tree must verify and hold a
    /// leaf of this account and none of this device.
    pub fn join_external(
        &mut self,
        group: &[u8],
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<Commit, MlsError> {
        self.join_external_after(group, group_info, ratchet_tree, None, None)
    }

    /// [`Member::join_external`], refusing a GroupInfo older than `anchor`
    /// (the first device's epoch and transcript hash when it linked this
    /// device), or of that epoch with another transcript; with a `descent`
    /// (walked from the state the first device handed over), refusing any
    /// GroupInfo but the state the walk reached.
    pub fn join_external_after(
        &mut self,
        group: &[u8],
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
        anchor: Option<&(u64, Vec<u8>)>,
        descent: Option<&Descent>,
    ) -> Result<Commit, MlsError> {
        let (info, tree, public) = self.verify_rejoin(group, group_info, ratchet_tree)?;
        if let Some(d) = descent {
            let offered = info.epoch().as_u64();
            if offered < d.start_epoch {
                return Err(MlsError::BeforeAnchor { offered, anchor: d.start_epoch });
            }
            if !d.reaches(&info) {
                return Err(MlsError::UnprovenState { offered, reached: d.epoch() });
            }
        }
        if let Some((epoch, transcript)) = anchor {
            let context = info.group_context();
            let offered = context.epoch().as_u64();
            if offered < *epoch || (offered == *epoch && context.confirmed_transcript_hash() != transcript.as_slice()) {
                return Err(MlsError::BeforeAnchor { offered, anchor: *epoch });
            }
        }
        let account = self.certificate.account;
        let holders: Vec<(AccountId, DeviceId)> = public.members().filter_map(|m| holder_of(&m.credential)).collect();
        if holders.iter().any(|(_, d)| *d == self.certificate.device) {
            return Err(MlsError::AlreadyInGroup);
        }
        if !holders.iter().any(|(a, _)| *a == account) {
            return Err(MlsError::AccountNotInGroup);
        }
        self.rejoin(group, info, tree)
    }

    /// The GroupInfo and tree a rejoin would build on, verified: the
    /// GroupInfo against the tree, every leaf certified, each device once.
    fn verify_rejoin(
        &self,
        group: &[u8],
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<(VerifiableGroupInfo, RatchetTreeIn, PublicGroup), MlsError> {
        let info = crate::mls::parse_group_info(group_info)?;
        if info.group_id().as_slice() != group {
            return Err(MlsError::OtherGroup);
        }
        // A group keeps its suite for life: a GroupInfo of another one
        // (a server downgrading a post-quantum group) is no state of it.
        let offered = info.group_context().ciphersuite();
        if let Some(Ok(ours)) = self.suite_of(group) {
            if offered != ours.ciphersuite() {
                return Err(MlsError::OtherSuite { ours, offered: offered as u16 });
            }
        }
        let tree = match (info.extensions().ratchet_tree(), ratchet_tree) {
            (Some(ext), _) => ext.ratchet_tree().clone(),
            (None, Some(bytes)) => RatchetTreeIn::tls_deserialize_exact(bytes).context("the ratchet tree")?,
            (None, None) => return Err(MlsError::NoTree),
        };
        let scratch = openmls_memory_storage::MemoryStorage::default();
        let (public, _) = PublicGroup::from_external(
            self.provider.crypto(),
            &scratch,
            tree.clone(),
            info.clone(),
            ProposalStore::new(),
        )
        .context("the group's GroupInfo and tree do not verify")?;
        check_tree(public.members(), "rejoin")?;
        crate::mls::check_tree_keys(&public.export_ratchet_tree(), public.ciphersuite())?;
        Ok((info, tree, public))
    }

    /// Builds the external commit (openmls adds the Remove of the leaf with
    /// our signature key, the only proposal besides the ExternalInit) and
    /// makes its group ours.
    fn rejoin(&mut self, group: &[u8], info: VerifiableGroupInfo, tree: RatchetTreeIn) -> Result<Commit, MlsError> {
        let builder = MlsGroup::external_commit_builder()
            .with_config(Self::join_config())
            .with_ratchet_tree(tree)
            .build_group(&self.provider, info, self.credential.clone())
            .context("rejoining")?
            .leaf_node_parameters(own_leaf_parameters());
        // No tree in the GroupInfo, as in any commit without a Welcome: the
        // server hands out its own beside it, and a tree that has outgrown
        // one request would otherwise leave no member able to rejoin.
        let built = builder
            .load_psks(self.provider.storage())
            .context("rejoining")?
            .create_group_info(true)
            .use_ratchet_tree_extension(false);
        let complete = built
            .build(self.provider.rand(), self.provider.crypto(), &self.signer, |_| true)
            .context("building the external commit")?;
        // The old state could not go on; its keys go with it, but only
        // once the new one is built (red team: a tree no commit could be
        // built on used to cost the old state for nothing). Finalizing
        // stores the new state under the same id, so it comes after.
        let old = match self.groups.remove(group) {
            Some(g) => Some(g),
            None => MlsGroup::load(self.provider.storage(), &GroupId::from_slice(group)).ok().flatten(),
        };
        if let Some(mut old) = old {
            old.delete(self.provider.storage()).context("deleting the old group state")?;
        }
        let (joined, bundle) = complete.finalize(&self.provider).context("rejoining")?;
        let (commit, _, info) = bundle.contents();
        let commit = Commit::of(commit, None, info.cloned())?;
        self.groups.insert(group.to_vec(), joined);
        Ok(commit)
    }

    /// What can be told about a message of `group` that failed to process:
    /// its epoch, whether it is a commit, and (for a PublicMessage of our
    /// current epoch) the account whose leaf sent it. `None` if it is not
    /// an MLS message of that group at all.
    pub fn unprocessed(&mut self, group: &[u8], bytes: &[u8]) -> Option<Unprocessed> {
        let framed = crate::mls::frame(bytes).ok().filter(|f| f.group == group)?;
        let ours = self.epoch(group);
        let sender = match (&framed.message, ours) {
            (ProtocolMessage::PublicMessage(m), Some(e)) if e == framed.epoch => match m.sender() {
                Sender::Member(i) => self.group_mut(group).ok().and_then(|g| {
                    g.members().find(|m| m.index == *i).and_then(|m| holder_of(&m.credential)).map(|(a, _)| a)
                }),
                _ => None,
            },
            _ => None,
        };
        Some(Unprocessed { epoch: framed.epoch, commit: framed.kind == crate::mls::Kind::Commit, sender })
    }

    /// The server accepted our pending commit: apply it.
    pub fn merge_pending(&mut self, group: &[u8]) -> Result<(), MlsError> {
        self.group_mut(group)?;
        let provider = &self.provider;
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        g.merge_pending_commit(provider).context("merging our commit")
    }

    /// The server refused our pending commit: forget it.
    pub fn discard_pending(&mut self, group: &[u8]) -> Result<(), MlsError> {
        self.group_mut(group)?;
        let provider = &self.provider;
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        g.clear_pending_commit(provider.storage()).context("discarding our commit")
    }

    /// Encrypts application data for the group.
    pub fn encrypt(&mut self, group: &[u8], data: &[u8]) -> Result<Vec<u8>, MlsError> {
        self.encrypt_with_aad(group, data, Vec::new())
    }

    /// Encrypts `data` with `aad` as the message's authenticated data
    /// (signed with it, readable by the server; see
    /// [`crate::chain::Claim`]).
    pub fn encrypt_with_aad(&mut self, group: &[u8], data: &[u8], aad: Vec<u8>) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        g.set_aad(aad);
        let msg = g.create_message(provider, signer, data);
        // Never left for the next message (openmls clears it only on
        // success).
        g.set_aad(Vec::new());
        let msg = msg.context("encrypting")?;
        serialize(&msg, "the message")
    }

    /// Joins a group from a Welcome; returns the group id.
    pub fn join(&mut self, welcome: &[u8]) -> Result<Vec<u8>, MlsError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).context("Welcome")?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(MlsError::NotAWelcome);
        };
        let builder =
            StagedWelcome::build_from_welcome(&self.provider, &Self::join_config(), welcome).context("Welcome")?;
        // A group this device was removed from (or left), by a commit it
        // processed itself: its old state is of no further use, and a
        // member may add it back. A group it is still active in is never
        // replaced.
        let id = builder.processed_welcome().unverified_group_info().group_id().as_slice().to_vec();
        let stored = MlsGroup::load(self.provider.storage(), &GroupId::from_slice(&id)).ok().flatten();
        if let Some(mut old) = stored.filter(|g| !g.is_active()) {
            self.groups.remove(&id);
            old.delete(self.provider.storage()).context("deleting the state this device was removed with")?;
        }
        let staged = builder.build().context("Welcome")?;
        check_tree(staged.members(), "join")?;
        let mut group = staged.into_group(&self.provider).context("joining")?;
        // Every node's key of the group's KEM (a tree with one that is not
        // would freeze the group at its next commit).
        if let Err(e) = crate::mls::check_tree_keys(&group.export_ratchet_tree(), group.ciphersuite()) {
            group.delete(self.provider.storage()).context("deleting the refused group state")?;
            return Err(e.into());
        }
        let id = group.group_id().as_slice().to_vec();
        self.groups.insert(id.clone(), group);
        Ok(id)
    }

    /// Reads a Welcome without joining: the group id, who sent it (the
    /// certified account of its sender leaf) and how many devices the group
    /// holds, every leaf checked as for [`Member::join`]. openmls deletes the
    /// KeyPackage the Welcome used as it reads it: call this inside a unit
    /// of work that is rolled back, so the Welcome can be joined later.
    pub fn peek_welcome(&mut self, welcome: &[u8]) -> Result<(Vec<u8>, AccountId, usize), MlsError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).context("Welcome")?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(MlsError::NotAWelcome);
        };
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &Self::join_config(), welcome, None).context("Welcome")?;
        check_tree(staged.members(), "join")?;
        let sender = staged.welcome_sender().context("Welcome")?;
        let inviter = node_certificate(sender)
            .map_err(|why| MlsError::UncertifiedLeaf {
                action: "join",
                leaf: staged.welcome_sender_index().u32(),
                why,
            })?
            .account;
        Ok((staged.group_context().group_id().as_slice().to_vec(), inviter, staged.members().count()))
    }

    /// Processes a message fetched from the group's log (not one we sent).
    pub fn receive(&mut self, group: &[u8], bytes: &[u8]) -> Result<Received, MlsError> {
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).context("message")?;
        let protocol = msg.try_into_protocol_message().context("message")?;
        self.group_mut(group)?;
        let provider = &self.provider;
        let g = self.groups.get_mut(group).ok_or(MlsError::NotInGroup)?;
        let processed = g.process_message(provider, protocol).context("processing")?;
        // Every leaf was checked when it entered our tree, so the sender's
        // certificate names who said it.
        let sender = holder_of(processed.credential()).map(|(account, _)| account);
        let sender_kind = processed.sender().clone();
        let aad = processed.aad().to_vec();
        let sender_leaf = match processed.sender() {
            Sender::Member(i) => Some(*i),
            _ => None,
        };
        let holders: HashMap<LeafNodeIndex, (AccountId, DeviceId)> =
            g.members().filter_map(|m| holder_of(&m.credential).map(|h| (m.index, h))).collect();
        let same_holder = |index: Option<LeafNodeIndex>, leaf: &LeafNode| same_holder(&holders, index, leaf);
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                Ok(Received::Application { sender, data: app.into_bytes(), aad })
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                if let Sender::External(_) = &sender_kind {
                    // Only the server's removal key, and only to remove a
                    // leaf. openmls verified the signature under the listed
                    // sender it names; every listed sender must be the
                    // server's key for that to mean "the server".
                    let listed = g.extensions().external_senders().map(|s| s.as_slice()).unwrap_or_default();
                    let from_server = self.removal_key.is_some_and(|key| {
                        let server = crate::mls::server_sender(&key);
                        !listed.is_empty() && listed.iter().all(|e| *e == server)
                    });
                    let Proposal::Remove(r) = p.proposal() else {
                        return Ok(Received::Refused {
                            sender: None,
                            reason: "an external proposal that is not a removal".into(),
                        });
                    };
                    if !from_server {
                        return Ok(Received::Refused {
                            sender: None,
                            reason: "an external proposal not signed by this server's removal key".into(),
                        });
                    }
                    // One per leaf in the tree, as an honest server makes
                    // them: whoever holds the removal key can sign any
                    // number, and each one stored costs more than the last.
                    let again = g.pending_proposals().any(|q| {
                        matches!((q.sender(), q.proposal()), (Sender::External(_), Proposal::Remove(o)) if o.removed() == r.removed())
                    });
                    if again || !holders.contains_key(&r.removed()) {
                        return Ok(Received::Refused {
                            sender: None,
                            reason: "a removal proposal of a leaf the server already proposed to remove, or of no leaf"
                                .into(),
                        });
                    }
                    let account = holders.get(&r.removed()).map(|(a, _)| *a);
                    g.store_pending_proposal(provider.storage(), *p).context("storing the proposal")?;
                    return Ok(Received::ServerRemoval { account });
                }
                // No more than an honest server lets wait.
                if g.pending_proposals().filter(|q| matches!(q.sender(), Sender::Member(_))).count()
                    >= MAX_PENDING_PROPOSALS
                {
                    return Ok(Received::Refused {
                        sender,
                        reason: format!("more than {MAX_PENDING_PROPOSALS} proposals waiting"),
                    });
                }
                // Only what hush uses is stored: anything else would make
                // the next commit that takes it fail, for every member.
                if let Err(reason) = check_proposal_use(p.proposal(), ProposalUse::Pending) {
                    return Ok(Received::Refused { sender, reason: reason.to_string() });
                }
                if let Proposal::Update(update) = p.proposal() {
                    if let Err(reason) = same_holder(sender_leaf, update.leaf_node()) {
                        return Ok(Received::Refused { sender, reason: reason.to_string() });
                    }
                }
                let removing = match p.proposal() {
                    Proposal::Remove(r) => holders.get(&r.removed()).map(|(a, _)| *a),
                    _ => None,
                };
                let leaving = removing.is_some() && removing == sender;
                g.store_pending_proposal(provider.storage(), *p).context("storing the proposal")?;
                Ok(Received::Proposal { sender, removing, leaving })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let external = matches!(sender_kind, Sender::NewMemberCommit);
                let settings_before = crate::mls::settings_in(g.extensions());
                let new_device = match vet_commit(&staged, &sender_kind, &holders, g.public_group().group_context()) {
                    Ok(new_device) => new_device,
                    Err(reason) => return Ok(Received::Refused { sender, reason: reason.to_string() }),
                };
                // The keys the commit's path set, as the server checks them
                // (a server that did not would let a member freeze the group).
                if let Ok(Some(tree)) = staged.export_ratchet_tree(provider.crypto(), g.export_ratchet_tree()) {
                    if let Err(reason) = crate::mls::check_tree_keys(&tree, g.ciphersuite()) {
                        return Ok(Received::Refused { sender, reason: reason.to_string() });
                    }
                }
                let removed_me = staged.self_removed();
                let removed = if external {
                    Vec::new()
                } else {
                    staged
                        .remove_proposals()
                        .filter_map(|r| {
                            let leaf = r.remove_proposal().removed();
                            let (account, _) = holders.get(&leaf)?;
                            let by = match r.sender() {
                                Sender::External(_) => RemovedBy::Server,
                                Sender::Member(i) if Some(*i) == sender_leaf => RemovedBy::Committer,
                                Sender::Member(i) if holders.get(i).map(|h| h.0) == Some(*account) => RemovedBy::Itself,
                                Sender::Member(i) => match holders.get(i) {
                                    Some((proposer, _)) => RemovedBy::Member(*proposer),
                                    None => RemovedBy::Committer,
                                },
                                _ => RemovedBy::Committer,
                            };
                            Some(Removed { account: *account, by })
                        })
                        .collect()
                };
                g.merge_staged_commit(provider, *staged).context("merging the commit")?;
                let rejoined = external && !new_device;
                let after = crate::mls::settings_in(g.extensions());
                let settings = (after != settings_before).then_some(after);
                Ok(Received::Commit {
                    sender,
                    epoch: g.epoch().as_u64(),
                    removed_me,
                    rejoined,
                    new_device,
                    removed,
                    settings,
                })
            }
            _ => Err(MlsError::UnexpectedContent),
        }
    }

    pub fn epoch(&mut self, group: &[u8]) -> Option<u64> {
        self.group_mut(group).ok().map(|g| g.epoch().as_u64())
    }

    /// A value all members share in an epoch: equal values mean equal state.
    pub fn epoch_authenticator(&mut self, group: &[u8]) -> Option<Vec<u8>> {
        self.group_mut(group).ok().map(|g| g.epoch_authenticator().as_slice().to_vec())
    }

    /// The accounts in the group, by leaf order (each leaf's certified
    /// account).
    pub fn members(&mut self, group: &[u8]) -> Vec<AccountId> {
        self.group_mut(group)
            .map(|g| g.members().filter_map(|m| holder_of(&m.credential).map(|(a, _)| a)).collect())
            .unwrap_or_default()
    }

    /// The devices in the group, by leaf order (each leaf's certified
    /// device).
    pub fn devices(&mut self, group: &[u8]) -> Vec<DeviceId> {
        self.group_mut(group)
            .map(|g| g.members().filter_map(|m| holder_of(&m.credential).map(|(_, d)| d)).collect())
            .unwrap_or_default()
    }

    /// Forgets a group (after leaving or being removed), deleting its state.
    pub fn forget(&mut self, group: &[u8]) {
        if self.group_mut(group).is_ok() {
            if let Some(mut g) = self.groups.remove(group) {
                let _ = g.delete(self.provider.storage());
            }
        }
    }
}

//! hush's MLS profile: the dialect both ends speak, via openmls. Message
//! framing, KeyPackage validation, certified credentials (a leaf's
//! credential is a device certificate over its signature key), the
//! proposals hush uses, the server's external-sender entry, and the public
//! group state codec. The Delivery Service ([`crate::delivery`]) checks
//! what it relays with it; the client ([`crate::client::mls`]) checks what
//! it is handed with the same rules. Neither side imports the other.
//!
//! What the server does with it never needs a secret: it parses
//! PublicMessage and PrivateMessage *framing* (group id, epoch, content
//! type), verifies PublicMessage signatures against the public ratchet
//! tree, and keeps each group's public state (openmls [`PublicGroup`]) as a
//! blob.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, ContentType, Credential, Extension, ExtensionType, Extensions,
    ExternalSender, GroupContext, KeyPackage, KeyPackageIn, LeafNode, LeafNodeIndex, MlsMessageBodyIn, MlsMessageIn,
    OpenMlsSignaturePublicKey, Proposal, ProtocolMessage, ProtocolVersion, RequiredCapabilitiesExtension,
    SignaturePublicKey, UnknownExtension, Verifiable as _,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

use crate::auth::{AccountId, CredentialError, DeviceCertificate, DeviceId};
use crate::limits::{MAX_GROUP_ID, MAX_LEAF_NODE};
use crate::wire::{DecodeError, Reader, Writer};

pub use openmls::prelude::group_info::VerifiableGroupInfo;
pub use openmls::prelude::PublicGroup;

/// Entries in a group state blob at most (a `PublicGroup` stores a handful
/// of records plus one per queued proposal).
pub const MAX_STATE_ENTRIES: usize = 4096;

/// Largest value in a group state blob (the ratchet tree of a large group).
pub const MAX_STATE_VALUE: usize = 64 * 1024 * 1024;

/// Why the server refuses MLS it read: what it cannot decode, or what
/// hush never makes. Each is the sender's fault; the `Display` text is what
/// the refusal tells the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MlsRefusal {
    #[error("not a valid {what}: {reason}")]
    Undecodable { what: &'static str, reason: String },
    #[error("expected a PublicMessage or PrivateMessage")]
    NotAGroupMessage,
    #[error("group ids must be 1 to {MAX_GROUP_ID} bytes")]
    GroupIdLength,
    #[error("application messages must be encrypted (PrivateMessage)")]
    PlaintextApplication,
    #[error("commits and proposals must be sent as PublicMessage")]
    EncryptedHandshake,
    #[error("leaves may not carry extensions")]
    LeafExtensions,
    #[error("the leaf is {len} bytes; at most {max} are accepted")]
    LeafTooLarge { len: usize, max: usize },
    #[error("the leaf's encryption key is {len} bytes; the group's suite ({suite}) uses {expected}")]
    LeafKey { len: usize, expected: usize, suite: Suite },
    #[error("the KeyPackage's init key is {len} bytes; its suite ({suite}) uses {expected}")]
    InitKey { len: usize, expected: usize, suite: Suite },
    #[error(
        "a node of the tree has a {len}-byte encryption key; the group's suite ({suite}) uses {expected} (no \
         commit could encrypt to it: the group would freeze)"
    )]
    NodeKey { len: usize, expected: usize, suite: Suite },
    #[error(transparent)]
    Suite(#[from] UnknownSuite),
    #[error("KeyPackages may not carry extensions")]
    KeyPackageExtensions,
    #[error("expected an MLS GroupInfo")]
    NotAGroupInfo,
    #[error("the GroupInfo is not that of the epoch the commit creates ({epoch})")]
    GroupInfoContext { epoch: u64 },
    #[error("the GroupInfo's ratchet tree is not the group's")]
    GroupInfoTree,
    #[error("a GroupInfo may carry only the external public key and the ratchet tree")]
    GroupInfoExtension,
    #[error("the GroupInfo lacks the external public key members rejoin with")]
    GroupInfoExternalPub,
    #[error("the GroupInfo's confirmation tag or signer is not the commit's")]
    GroupInfoTranscript,
    #[error("the GroupInfo is not signed by the committer's leaf")]
    GroupInfoSignature,
    #[error("expected an MLS Welcome")]
    NotAWelcome,
    #[error("the Welcome does not address exactly the members the commit adds")]
    WelcomeRecipients,
    #[error("a group's context may carry only the server as external sender, hush's settings and the capability they require ({0})")]
    GroupExtension(&'static str),
    #[error("hush's group settings do not decode ({0})")]
    Settings(&'static str),
}

fn undecodable(what: &'static str) -> impl FnOnce(tls_codec::Error) -> MlsRefusal {
    move |e| MlsRefusal::Undecodable { what, reason: e.to_string() }
}

/// A stored group state that cannot be read or written: never the client's
/// fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("the group state's lock is poisoned")]
    Poisoned,
    #[error("the group state has more than {MAX_STATE_ENTRIES} entries")]
    TooManyEntries,
    #[error("encoding the group state: {0}")]
    Encode(#[from] crate::wire::EncodeError),
    #[error("decoding the group state: {0}")]
    Decode(#[from] DecodeError),
    #[error("openmls cannot load the group state: {0}")]
    Load(String),
    #[error("the state holds no group")]
    Missing,
    #[error("building the server's removal proposal: {0}")]
    Proposal(String),
}

/// The kind of a message sent to a group, read from its framing.
#[derive(Debug)]
pub struct Framed {
    pub group: Vec<u8>,
    pub epoch: u64,
    pub kind: Kind,
    pub message: ProtocolMessage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// PrivateMessage carrying application data.
    Application,
    /// PublicMessage carrying a commit.
    Commit,
    /// PublicMessage carrying a proposal.
    Proposal,
}

/// Whether `bytes` start as an MLS 1.0 PublicMessage (a handshake, in
/// hush: application messages are PrivateMessages), from the first four
/// bytes alone.
pub fn is_public_message(bytes: &[u8]) -> bool {
    bytes.get(..4) == Some(&[0, 1, 0, 1])
}

/// Who a handshake (a commit or proposal) is for, from its framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeHeader {
    pub group: Vec<u8>,
    pub epoch: u64,
    /// A commit (not a proposal).
    pub commit: bool,
}

/// The group, epoch and kind of a handshake, `None` for anything else or
/// what does not decode.
pub fn handshake_group(bytes: &[u8]) -> Option<HandshakeHeader> {
    let framed = frame(bytes).ok()?;
    let commit = match framed.kind {
        Kind::Commit => true,
        Kind::Proposal => false,
        Kind::Application => return None,
    };
    Some(HandshakeHeader { group: framed.group, epoch: framed.epoch, commit })
}

/// Reads the framing of an `MLSMessage` sent to a group. Refuses every
/// combination hush does not accept: handshake messages must be
/// PublicMessage (so the server can verify them), application messages
/// PrivateMessage.
pub fn frame(bytes: &[u8]) -> Result<Framed, MlsRefusal> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(undecodable("MLS message"))?;
    let message = match msg.extract() {
        MlsMessageBodyIn::PublicMessage(m) => ProtocolMessage::from(m),
        MlsMessageBodyIn::PrivateMessage(m) => ProtocolMessage::from(m),
        _ => return Err(MlsRefusal::NotAGroupMessage),
    };
    let group = message.group_id().as_slice().to_vec();
    if group.is_empty() || group.len() > MAX_GROUP_ID {
        return Err(MlsRefusal::GroupIdLength);
    }
    let public = matches!(message, ProtocolMessage::PublicMessage(_));
    let kind = match (message.content_type(), public) {
        (ContentType::Application, false) => Kind::Application,
        (ContentType::Commit, true) => Kind::Commit,
        (ContentType::Proposal, true) => Kind::Proposal,
        (ContentType::Application, true) => return Err(MlsRefusal::PlaintextApplication),
        (_, false) => return Err(MlsRefusal::EncryptedHandshake),
    };
    Ok(Framed { group, epoch: message.epoch().as_u64(), kind, message })
}

/// Domain-separation label of a group id's creator tag.
const GROUP_ID_LABEL: &[u8] = b"hush group id v1\0";

/// Length of the creator tag at the end of a group id.
const GROUP_TAG_LEN: usize = 16;

/// The id of a group `account` creates with `nonce`: the nonce followed by
/// the first 16 bytes of SHA-256(label, account, nonce). Binding ids to
/// their creator means nobody can create (squat) or probe another
/// account's group ids: the server checks the binding before it looks at
/// whether the id exists.
pub fn group_id_for(account: &AccountId, nonce: &[u8]) -> Vec<u8> {
    let mut id = nonce.to_vec();
    id.extend_from_slice(&group_tag(account, nonce));
    id
}

fn group_tag(account: &AccountId, nonce: &[u8]) -> [u8; GROUP_TAG_LEN] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(GROUP_ID_LABEL);
    ctx.update(&account.0);
    ctx.update(nonce);
    let digest = ctx.finish();
    let mut tag = [0u8; GROUP_TAG_LEN];
    if let Some(head) = digest.as_ref().get(..GROUP_TAG_LEN) {
        tag.copy_from_slice(head);
    }
    tag
}

/// Whether `id` is a group id `account` may create ([`group_id_for`] with
/// some nonce of at least one byte).
pub fn group_id_bound_to(id: &[u8], account: &AccountId) -> bool {
    let Some(split) = id.len().checked_sub(GROUP_TAG_LEN).filter(|n| *n > 0) else { return false };
    let (nonce, tag) = id.split_at(split);
    bool::from(subtle::ConstantTimeEq::ct_eq(tag, &group_tag(account, nonce)[..]))
}

/// BasicCredential identity of the server's entry in every group's
/// `external_senders` extension (its signature key is the server's removal
/// key).
pub const SERVER_SENDER_IDENTITY: &[u8] = b"hush server removal key";

/// The `external_senders` entry every group must list: the server's removal
/// key (RFC 9420 §12.1.8.1), the only key allowed to propose removals from
/// outside the group.
pub fn server_sender(removal_key: &[u8; 32]) -> ExternalSender {
    ExternalSender::new(
        SignaturePublicKey::from(removal_key.to_vec()),
        BasicCredential::new(SERVER_SENDER_IDENTITY.to_vec()).into(),
    )
}

/// Whether a group context lists the server's removal key as its one
/// external sender (so an external proposal in the group is always the
/// server's, which is what members check before accepting one).
pub fn lists_server(context: &GroupContext, removal_key: &[u8; 32]) -> bool {
    let expected = server_sender(removal_key);
    context.extensions().external_senders().is_some_and(|senders| senders.as_slice() == [expected])
}

/// The GroupContext extension type of hush's group settings (RFC 9420
/// §17.3 private-use range): what every member and the server read the
/// disappearing-message timer from (DESIGN §12).
pub const SETTINGS_EXTENSION: u16 = 0xF4A1;

/// The version byte that starts the settings' encoding.
const SETTINGS_VERSION: u8 = 1;

/// A group's settings, agreed by every member through MLS: changed only by
/// a member's commit carrying an inline GroupContextExtensions proposal,
/// read by the server from the group context it verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupSettings {
    /// Seconds after which the group's messages disappear (0: never), at
    /// most [`crate::limits::MAX_DISAPPEAR`].
    pub disappear_secs: u32,
}

impl GroupSettings {
    /// The extension's bytes: the version, then the timer (`u32`,
    /// big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![SETTINGS_VERSION];
        out.extend_from_slice(&self.disappear_secs.to_be_bytes());
        out
    }

    /// Reads [`GroupSettings::encode`]'s bytes, refusing anything else
    /// (another version, trailing bytes, a timer past the limit).
    pub fn decode(bytes: &[u8]) -> Result<Self, MlsRefusal> {
        let [SETTINGS_VERSION, a, b, c, d] = bytes else {
            return Err(MlsRefusal::Settings("expected version 1 and a 4-byte timer"));
        };
        let disappear_secs = u32::from_be_bytes([*a, *b, *c, *d]);
        if u64::from(disappear_secs) > crate::limits::MAX_DISAPPEAR.as_secs() {
            return Err(MlsRefusal::Settings("the timer is longer than a year"));
        }
        Ok(Self { disappear_secs })
    }

    /// The timer, if the group has one.
    pub fn disappear(&self) -> Option<u32> {
        (self.disappear_secs > 0).then_some(self.disappear_secs)
    }

    /// The group context extensions of a group with these settings whose
    /// one external sender is the server's `removal_key`: the sender, the
    /// settings and the capability every member must have to read them.
    pub fn extensions(&self, removal_key: &[u8; 32]) -> Result<Extensions<GroupContext>, MlsRefusal> {
        Extensions::from_vec(vec![
            Extension::ExternalSenders(vec![server_sender(removal_key)]),
            Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                &[ExtensionType::Unknown(SETTINGS_EXTENSION)],
                &[],
                &[],
            )),
            Extension::Unknown(SETTINGS_EXTENSION, UnknownExtension(self.encode())),
        ])
        .map_err(|_| MlsRefusal::GroupExtension("repeated extension"))
    }
}

/// The leaf capabilities every hush member advertises: openmls's defaults
/// and hush's settings extension (a group that has settings requires it of
/// every member, so a client that could not read the timer is never added).
pub fn member_capabilities() -> Capabilities {
    Capabilities::builder()
        .ciphersuites(Suite::ALL.iter().map(|s| s.ciphersuite()).collect())
        .extensions(vec![ExtensionType::Unknown(SETTINGS_EXTENSION)])
        .build()
}

/// The MLS ciphersuites hush speaks (issue 35). Both sign with Ed25519
/// (a device's one MLS signature key serves both), encrypt with
/// AES-128-GCM and hash with SHA-256; they differ in the KEM that
/// protects the group's secrets on their way to each member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Suite {
    /// RFC 9420's `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519` (0x0001):
    /// X25519 alone.
    Classic,
    /// draft-ietf-mls-pq-ciphersuites' hybrid
    /// `MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519` (0x004F, a
    /// provisional code point): the X-Wing KEM, ML-KEM-768 combined with
    /// X25519, so a recording is safe unless both are broken.
    Pq,
}

/// Bytes of an X-Wing public key (ML-KEM-768's 1184 and X25519's 32).
pub const XWING_PUBLIC_KEY: usize = 1216;

/// The suite of a new group when `--suite` does not say (see SECURITY.md,
/// "Post-quantum groups").
pub const DEFAULT_SUITE: Suite = Suite::Pq;

/// A ciphersuite code point hush does not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "ciphersuite 0x{0:04x} is not one this hush speaks (classic 0x0001, pq 0x004f): a group made by another \
     version, or a draft code point that changed"
)]
pub struct UnknownSuite(pub u16);

impl Suite {
    /// Every suite, classic first.
    pub const ALL: [Suite; 2] = [Suite::Classic, Suite::Pq];

    pub fn ciphersuite(self) -> Ciphersuite {
        match self {
            Suite::Classic => Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
            Suite::Pq => Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519,
        }
    }

    /// The suite of `ciphersuite`, if hush speaks it.
    pub fn of(ciphersuite: Ciphersuite) -> Result<Suite, UnknownSuite> {
        Suite::ALL.into_iter().find(|s| s.ciphersuite() == ciphersuite).ok_or(UnknownSuite(ciphersuite as u16))
    }

    /// Bytes of its KEM's public keys (a leaf's encryption key, a
    /// KeyPackage's init key): X25519's 32, X-Wing's 1216.
    pub fn kem_public_key_len(self) -> usize {
        match self {
            Suite::Classic => 32,
            Suite::Pq => XWING_PUBLIC_KEY,
        }
    }

    /// The largest leaf node accepted in a group of this suite:
    /// [`MAX_LEAF_NODE`] with a classic key, as much more as its KEM's key
    /// is longer.
    pub fn max_leaf_node(self) -> usize {
        MAX_LEAF_NODE + self.kem_public_key_len() - Suite::Classic.kem_public_key_len()
    }

    /// Its code point (on the wire, and in the servers' tables).
    pub fn code(self) -> u16 {
        self.ciphersuite() as u16
    }

    pub fn from_code(code: u16) -> Result<Suite, UnknownSuite> {
        Suite::ALL.into_iter().find(|s| s.code() == code).ok_or(UnknownSuite(code))
    }

    /// As `--suite` takes it and `group info` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Classic => "classic",
            Suite::Pq => "pq",
        }
    }
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Suite {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "classic" => Ok(Suite::Classic),
            "pq" => Ok(Suite::Pq),
            other => Err(format!("{other:?}: the suites are classic and pq")),
        }
    }
}

/// Checks a group context's extensions (a new group's, or what a commit's
/// GroupContextExtensions proposal would make them) and returns the
/// settings they hold: exactly the server's removal key as the one
/// external sender, and besides it only hush's settings (absent: no
/// timer) and the RequiredCapabilities that name exactly them.
pub fn check_context_extensions(
    extensions: &Extensions<GroupContext>,
    removal_key: &[u8; 32],
) -> Result<GroupSettings, MlsRefusal> {
    check_extensions_with(extensions, &[server_sender(removal_key)])
}

/// What a member checks of the group context a commit makes: the external
/// senders exactly as `before` listed them, and otherwise the rules of
/// [`check_context_extensions`]. Returns the settings after.
pub fn check_settings_change(before: &GroupContext, after: &GroupContext) -> Result<GroupSettings, MlsRefusal> {
    let senders = before.extensions().external_senders().map(|s| s.as_slice()).unwrap_or_default();
    check_extensions_with(after.extensions(), senders)
}

fn check_extensions_with(
    extensions: &Extensions<GroupContext>,
    expected_senders: &[ExternalSender],
) -> Result<GroupSettings, MlsRefusal> {
    let mut settings = None;
    let mut senders = false;
    for extension in extensions.iter() {
        match extension {
            Extension::ExternalSenders(list) => {
                if expected_senders.is_empty() || list.as_slice() != expected_senders {
                    return Err(MlsRefusal::GroupExtension("the external senders are not exactly this server"));
                }
                senders = true;
            }
            Extension::RequiredCapabilities(required) => {
                if required.extension_types() != [ExtensionType::Unknown(SETTINGS_EXTENSION)]
                    || !required.proposal_types().is_empty()
                    || !required.credential_types().is_empty()
                {
                    return Err(MlsRefusal::GroupExtension("it requires capabilities other than hush's settings"));
                }
            }
            Extension::Unknown(SETTINGS_EXTENSION, UnknownExtension(bytes)) => {
                settings = Some(GroupSettings::decode(bytes)?);
            }
            _ => return Err(MlsRefusal::GroupExtension("an extension hush does not use")),
        }
    }
    if !senders {
        return Err(MlsRefusal::GroupExtension("the server is not the external sender"));
    }
    Ok(settings.unwrap_or_default())
}

/// The settings a group context holds, as [`check_context_extensions`]
/// reads them (for a context already checked: default on error).
pub fn settings_of(context: &GroupContext) -> GroupSettings {
    settings_in(context.extensions())
}

/// [`settings_of`] the extensions of a group context.
pub fn settings_in(extensions: &Extensions<GroupContext>) -> GroupSettings {
    match extensions.unknown(SETTINGS_EXTENSION) {
        Some(UnknownExtension(bytes)) => GroupSettings::decode(bytes).unwrap_or_default(),
        None => GroupSettings::default(),
    }
}

/// Where a proposal appears; hush accepts a different set of proposal types
/// in each place (DESIGN §5, "Proposals hush uses, and no others").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalUse {
    /// Sent on its own, kept for a later commit: a member's Update of its
    /// own leaf or a Remove (a self-removal, or a request shown to every
    /// member), and the server's Remove as external sender.
    Pending,
    /// Inside a member's commit: Add (of a KeyPackage the server handed
    /// out, checked separately), Update and Remove.
    Commit,
    /// Inside an external commit: the ExternalInit and the Remove of the
    /// rejoining device's own leaf (checked separately).
    ExternalCommit,
}

/// Whether hush accepts `proposal` where it appears; the refusal names
/// the proposal type. A PreSharedKey, ReInit, SelfRemove or custom
/// proposal is refused everywhere: hush never makes one, and one left
/// pending makes every later commit fail (nobody holds the PSK). An Add,
/// and a GroupContextExtensions (hush's settings), are accepted only
/// inside their proposer's own commit, never pending.
pub fn check_proposal_use(proposal: &Proposal, place: ProposalUse) -> Result<(), UnusedProposal> {
    let allowed = match proposal {
        Proposal::Update(_) => place != ProposalUse::ExternalCommit,
        Proposal::Remove(_) => true,
        Proposal::Add(_) => place == ProposalUse::Commit,
        // Only inline in its proposer's own commit (the caller checks it is
        // by value), and only to change hush's settings
        // ([`check_context_extensions`]).
        Proposal::GroupContextExtensions(_) => place == ProposalUse::Commit,
        Proposal::ExternalInit(_) => place == ProposalUse::ExternalCommit,
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    let kind = match proposal {
        Proposal::Add(_) => "an Add proposal (members are added in their adder's own commit)",
        Proposal::Update(_) => "an Update proposal",
        Proposal::Remove(_) => "a Remove proposal",
        Proposal::PreSharedKey(_) => "a PreSharedKey proposal",
        Proposal::ReInit(_) => "a ReInit proposal",
        Proposal::ExternalInit(_) => "an ExternalInit proposal",
        Proposal::GroupContextExtensions(_) => "a GroupContextExtensions proposal",
        Proposal::SelfRemove => "a SelfRemove proposal",
        _ => "a custom proposal",
    };
    let place = match place {
        ProposalUse::Pending => "on its own",
        ProposalUse::Commit => "in a commit",
        ProposalUse::ExternalCommit => "in an external commit",
    };
    Err(UnusedProposal { kind, place })
}

/// A proposal hush does not use where it appears ([`check_proposal_use`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {place}: hush does not use it")]
pub struct UnusedProposal {
    kind: &'static str,
    place: &'static str,
}

/// The device certificate a credential carries, verified (signature under
/// the account key it names) but not matched against a leaf key. Enough to
/// name the sender of a message whose leaf was checked with
/// [`leaf_certificate`] when it entered the tree.
pub fn certificate_of(credential: &Credential) -> Result<DeviceCertificate, CredentialError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| CredentialError::Malformed("not a BasicCredential"))?;
    DeviceCertificate::decode(basic.identity())
}

/// The account and device of a leaf that was checked with
/// [`leaf_certificate`] when it entered the tree (no signature check).
pub fn holder_of(credential: &Credential) -> Option<(AccountId, DeviceId)> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    DeviceCertificate::holder_of_checked_leaf(basic.identity())
}

/// The certificate of a leaf (its credential and signature key): valid only
/// if the certificate verifies under its account key and certifies exactly
/// this signature key.
pub fn leaf_certificate(credential: &Credential, signature_key: &[u8]) -> Result<DeviceCertificate, CredentialError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| CredentialError::Malformed("not a BasicCredential"))?;
    DeviceCertificate::check_leaf(basic.identity(), signature_key)
}

/// [`leaf_certificate`] of a leaf node.
pub fn node_certificate(leaf: &LeafNode) -> Result<DeviceCertificate, CredentialError> {
    leaf_certificate(leaf.credential(), leaf.signature_key().as_slice())
}

/// Refuses a leaf hush never makes: one carrying any extension (hush uses
/// none, so every extension is unknown here), or one whose encoding is
/// larger than [`MAX_LEAF_NODE`]. Such leaves would sit in the group's
/// public state, which every later handshake decodes and rewrites.
pub fn check_leaf_shape(leaf: &LeafNode, ciphersuite: Ciphersuite) -> Result<(), MlsRefusal> {
    use openmls::prelude::tls_codec::Size as _;
    let suite = Suite::of(ciphersuite)?;
    if leaf.extensions().iter().next().is_some() {
        return Err(MlsRefusal::LeafExtensions);
    }
    // A key of another length is no key of the group's KEM: every commit
    // would fail to encrypt to it, and the group would freeze.
    let key = leaf
        .encryption_key()
        .tls_serialize_detached()
        .ok()
        .and_then(|b| openmls::prelude::tls_codec::VLBytes::tls_deserialize_exact(&b).ok())
        .map_or(0, |k| k.as_slice().len());
    if key != suite.kem_public_key_len() {
        return Err(MlsRefusal::LeafKey { len: key, expected: suite.kem_public_key_len(), suite });
    }
    let len = leaf.tls_serialized_len();
    if len > suite.max_leaf_node() {
        return Err(MlsRefusal::LeafTooLarge { len, max: suite.max_leaf_node() });
    }
    Ok(())
}

/// Every node of `tree` (leaves and parents) has an encryption key of the
/// suite's KEM's length. A commit's path sets parent nodes' keys, which
/// the server (holding the public state only) cannot derive and members
/// check only above their common ancestor with the committer: a key of
/// another length there would make every later commit that encrypts to
/// it fail, for everyone.
pub fn check_tree_keys(tree: &openmls::treesync::RatchetTree, ciphersuite: Ciphersuite) -> Result<(), MlsRefusal> {
    use openmls::prelude::tls_codec::VLBytes;
    use openmls::prelude::Node;
    let suite = Suite::of(ciphersuite)?;
    let expected = suite.kem_public_key_len();
    for node in tree.nodes() {
        let len = match node {
            Node::LeafNode(leaf) => leaf
                .encryption_key()
                .tls_serialize_detached()
                .ok()
                .and_then(|b| VLBytes::tls_deserialize_exact(&b).ok())
                .map_or(0, |k| k.as_slice().len()),
            // A parent node's encoding starts with its encryption key.
            Node::ParentNode(parent) => parent
                .tls_serialize_detached()
                .ok()
                .and_then(|b| VLBytes::tls_deserialize(&mut b.as_slice()).ok())
                .map_or(0, |k| k.as_slice().len()),
        };
        if len != expected {
            return Err(MlsRefusal::NodeKey { len, expected, suite });
        }
    }
    Ok(())
}

/// [`check_leaf_shape`] for a KeyPackage's leaf, and no KeyPackage
/// extensions either.
pub fn check_key_package_shape(kp: &KeyPackage) -> Result<(), MlsRefusal> {
    if kp.extensions().iter().next().is_some() {
        return Err(MlsRefusal::KeyPackageExtensions);
    }
    let suite = Suite::of(kp.ciphersuite())?;
    let init = kp.hpke_init_key().as_slice().len();
    if init != suite.kem_public_key_len() {
        return Err(MlsRefusal::InitKey { len: init, expected: suite.kem_public_key_len(), suite });
    }
    check_leaf_shape(kp.leaf_node(), kp.ciphersuite())
}

/// A KeyPackage that failed validation: whose fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPackageError {
    /// Not a valid KeyPackage (encoding, signature, lifetime, suite).
    Invalid(String),
    /// Valid MLS, but its credential is not a certificate for the uploader.
    Credential(String),
}

/// Validates an uploaded KeyPackage (signature, lifetime, protocol version,
/// supported ciphersuite) and its credential: a device certificate for
/// `device` of `account` that certifies the leaf's signature key. Returns
/// its `KeyPackageRef` and its suite.
pub fn validate_key_package(
    crypto: &RustCrypto,
    bytes: &[u8],
    account: &AccountId,
    device: &DeviceId,
) -> Result<(Vec<u8>, Suite), KeyPackageError> {
    use openmls_traits::crypto::OpenMlsCrypto as _;
    let invalid = KeyPackageError::Invalid;
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|e| invalid(format!("not a KeyPackage: {e}")))?;
    let kp = kp_in.validate(crypto, ProtocolVersion::Mls10).map_err(|e| invalid(format!("invalid KeyPackage: {e}")))?;
    let suite = Suite::of(kp.ciphersuite()).map_err(|e| invalid(e.to_string()))?;
    crypto.supports(kp.ciphersuite()).map_err(|_| invalid("unsupported ciphersuite".to_string()))?;
    check_key_package_shape(&kp).map_err(|e| invalid(e.to_string()))?;
    let cert = node_certificate(kp.leaf_node()).map_err(|e| KeyPackageError::Credential(e.to_string()))?;
    if cert.account != *account || cert.device != *device {
        return Err(KeyPackageError::Credential(
            "its device certificate is for another device; upload only your own device's KeyPackages".into(),
        ));
    }
    let hash_ref = kp.hash_ref(crypto).map_err(|e| invalid(format!("cannot hash the KeyPackage: {e}")))?;
    Ok((hash_ref.as_slice().to_vec(), suite))
}

/// Reads a GroupInfo `MLSMessage`.
pub fn parse_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo, MlsRefusal> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(undecodable("GroupInfo"))?;
    match msg.extract() {
        MlsMessageBodyIn::GroupInfo(info) => Ok(info),
        _ => Err(MlsRefusal::NotAGroupInfo),
    }
}

/// Checks the GroupInfo a committer uploads with its commit (or a creator
/// with its new group): it must describe exactly the public state `public`
/// holds after the commit (group context and confirmation tag), be signed
/// by `signer`'s leaf (the committer's, after the commit), carry the
/// external public key a member rejoins with, and no other extension than
/// that and the ratchet tree, which must then be the group's tree. Returns
/// whether it carries the tree.
///
/// What the server cannot check: that the external public key matches the
/// epoch's secrets. A member that rejoins from a wrong one makes a commit
/// the others cannot process; they rejoin from its GroupInfo in turn, and
/// the group converges (see SECURITY.md, "Group repair").
pub fn check_group_info(
    crypto: &RustCrypto,
    bytes: &[u8],
    public: &PublicGroup,
    signer: LeafNodeIndex,
) -> Result<bool, MlsRefusal> {
    let info = parse_group_info(bytes)?;
    if info.group_context() != public.group_context() {
        return Err(MlsRefusal::GroupInfoContext { epoch: public.group_context().epoch().as_u64() });
    }
    let mut external_pub = false;
    let mut tree = false;
    for extension in info.extensions().iter() {
        match extension {
            Extension::ExternalPub(_) => external_pub = true,
            Extension::RatchetTree(t) => {
                let theirs = t.ratchet_tree().tls_serialize_detached().map_err(undecodable("ratchet tree"))?;
                let ours =
                    public.export_ratchet_tree().tls_serialize_detached().map_err(undecodable("ratchet tree"))?;
                if theirs != ours {
                    return Err(MlsRefusal::GroupInfoTree);
                }
                tree = true;
            }
            _ => return Err(MlsRefusal::GroupInfoExtension),
        }
    }
    if !external_pub {
        return Err(MlsRefusal::GroupInfoExternalPub);
    }
    let expected = VerifiableGroupInfo::new(
        public.group_context().clone(),
        info.extensions().clone(),
        public.confirmation_tag().clone(),
        signer,
        info.signature().clone(),
    );
    if expected != info {
        return Err(MlsRefusal::GroupInfoTranscript);
    }
    let leaf = public.leaf(signer).ok_or(MlsRefusal::GroupInfoSignature)?;
    let key = OpenMlsSignaturePublicKey::from_signature_key(
        leaf.signature_key().clone(),
        public.ciphersuite().signature_algorithm(),
    );
    info.verify_no_out(crypto, &key).map_err(|_| MlsRefusal::GroupInfoSignature)?;
    Ok(tree)
}

/// A leaf index and the result of checking its certificate.
pub type LeafCheck = (u32, Result<DeviceCertificate, CredentialError>);

/// Every leaf of a stored group state (`group` is its id) with the result
/// of checking its certificate: for invariant checks.
pub fn leaf_certificates(state: &[u8], group: &[u8]) -> Result<Vec<LeafCheck>, StateError> {
    let storage = decode_state(state)?;
    let public = PublicGroup::load(&storage, &openmls::prelude::GroupId::from_slice(group))
        .map_err(|e| StateError::Load(format!("{e:?}")))?
        .ok_or(StateError::Missing)?;
    Ok(public.members().map(|m| (m.index.u32(), leaf_certificate(&m.credential, &m.signature_key))).collect())
}

/// Starts a compacted state blob (format 2); format 1 started with its
/// entry count, which never comes near this.
const STATE_FORMAT_2: u32 = u32::MAX;

/// How a format-2 state value is stored.
const VALUE_RAW: u8 = 0;
const VALUE_COMPACTED: u8 = 1;

/// The size of a group's public state as openmls holds it (what
/// [`crate::limits::MAX_GROUP_STATE`] caps, however compactly it is
/// stored): format 1's length.
pub fn state_size(storage: &MemoryStorage) -> Result<usize, StateError> {
    let values = storage.values.read().map_err(|_| StateError::Poisoned)?;
    Ok(values.iter().fold(4usize, |n, (k, v)| n.saturating_add(8).saturating_add(k.len()).saturating_add(v.len())))
}

/// Serializes a group's public state (sorted, so equal states give equal
/// bytes), format 2: `u32` [`STATE_FORMAT_2`], `u32` n, then n ×
/// (`bytes32` key, `u8` form, `bytes32` value), each value (JSON, from
/// openmls) stored [`crate::compact`]ed where it can be. Format 1 (read,
/// no longer written) was `u32` n, then n × (`bytes32` key, `bytes32`
/// value).
pub fn encode_state(storage: &MemoryStorage) -> Result<Vec<u8>, StateError> {
    let values = storage.values.read().map_err(|_| StateError::Poisoned)?;
    let mut entries: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
    entries.sort();
    if entries.len() > MAX_STATE_ENTRIES {
        return Err(StateError::TooManyEntries);
    }
    let mut w = Writer::new();
    w.u32(STATE_FORMAT_2);
    w.u32(u32::try_from(entries.len()).map_err(|_| StateError::TooManyEntries)?);
    for (k, v) in entries {
        w.bytes32("state key", k, MAX_STATE_VALUE)?;
        // A value longer than the cap is refused whole, compacted or not.
        if v.len() > MAX_STATE_VALUE {
            w.bytes32("state value", v, MAX_STATE_VALUE)?;
        }
        match crate::compact::compact(v) {
            Some(small) => {
                w.u8(VALUE_COMPACTED);
                w.bytes32("state value", &small, MAX_STATE_VALUE)?;
            }
            None => {
                w.u8(VALUE_RAW);
                w.bytes32("state value", v, MAX_STATE_VALUE)?;
            }
        }
    }
    Ok(w.into_inner())
}

/// Reads a state blob written by [`encode_state`] (either format).
pub fn decode_state(bytes: &[u8]) -> Result<MemoryStorage, DecodeError> {
    let mut r = Reader::new(bytes);
    let first = r.u32()?;
    let format2 = first == STATE_FORMAT_2;
    let n = if format2 { r.u32()? } else { first };
    let n = usize::try_from(n).map_err(|_| DecodeError::Invalid("state entries"))?;
    if n > MAX_STATE_ENTRIES {
        return Err(DecodeError::TooLong { field: "state entries", len: n, max: MAX_STATE_ENTRIES });
    }
    let mut map = std::collections::HashMap::new();
    for _ in 0..n {
        let k = r.bytes32("state key", MAX_STATE_VALUE)?.to_vec();
        let form = if format2 { r.u8()? } else { VALUE_RAW };
        let stored = r.bytes32("state value", MAX_STATE_VALUE)?;
        let v = match form {
            VALUE_RAW => stored.to_vec(),
            VALUE_COMPACTED => crate::compact::expand(stored, MAX_STATE_VALUE)?,
            _ => return Err(DecodeError::Invalid("state value form")),
        };
        if map.insert(k, v).is_some() {
            return Err(DecodeError::Invalid("duplicate state key"));
        }
    }
    r.finish()?;
    Ok(MemoryStorage { values: std::sync::RwLock::new(map) })
}

/// The server's removal key as an openmls signer: it signs nothing but the
/// external Remove proposals of [`removal_proposal`].
struct RemovalSigner<'a>(&'a crate::auth::Identity);

impl openmls_traits::signatures::Signer for RemovalSigner<'_> {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, openmls_traits::signatures::SignerError> {
        Ok(self.0.sign(payload).to_vec())
    }

    fn signature_scheme(&self) -> openmls_traits::types::SignatureScheme {
        openmls_traits::types::SignatureScheme::ED25519
    }
}

/// An external proposal (RFC 9420 §12.1.8, sender type `external`) to
/// remove `leaf` from `public`'s group at its current epoch, signed with the
/// server's removal key as the group's listed external sender. `None` if
/// the group does not list that key (a group from before it was required).
pub fn removal_proposal(
    public: &PublicGroup,
    leaf: LeafNodeIndex,
    removal: &crate::auth::Identity,
) -> Result<Option<Vec<u8>>, StateError> {
    let expected = server_sender(&removal.public_key());
    let context = public.group_context();
    let Some(index) = context.extensions().external_senders().and_then(|s| s.iter().position(|e| *e == expected))
    else {
        return Ok(None);
    };
    let index = u32::try_from(index).map_err(|_| StateError::Proposal("external sender index".into()))?;
    let message = openmls::prelude::ExternalProposal::new_remove::<openmls_rust_crypto::OpenMlsRustCrypto>(
        leaf,
        context.group_id().clone(),
        context.epoch(),
        &RemovalSigner(removal),
        openmls::prelude::SenderExtensionIndex::new(index),
    )
    .map_err(|e| StateError::Proposal(format!("{e:?}")))?;
    let bytes = message.tls_serialize_detached().map_err(|e| StateError::Proposal(e.to_string()))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod state_tests {
    use super::*;

    fn storage(entries: &[(&[u8], Vec<u8>)]) -> MemoryStorage {
        let map = entries.iter().map(|(k, v)| (k.to_vec(), v.clone())).collect();
        MemoryStorage { values: std::sync::RwLock::new(map) }
    }

    #[test]
    fn states_are_stored_compacted_and_states_of_the_old_format_still_read() {
        let bytes: Vec<String> = (0..=255u8).cycle().take(4000).map(|b| b.to_string()).collect();
        let tree = format!(r#"{{"tree":{{"vec":[{}]}},"name":"[1,2,3,4,5,6,7,8]"}}"#, bytes.join(",")).into_bytes();
        let not_text = vec![0xff, b'[', b'1', b']'];
        let state = storage(&[(b"Tree", tree.clone()), (b"Other", not_text.clone())]);
        let blob = encode_state(&state).unwrap();
        assert!(blob.len() * 3 < tree.len(), "{} bytes stored for {}", blob.len(), tree.len());
        assert_eq!(*decode_state(&blob).unwrap().values.read().unwrap(), *state.values.read().unwrap());
        assert_eq!(state_size(&state).unwrap(), 4 + 8 + 4 + tree.len() + 8 + 5 + not_text.len());
        // Format 1, as every state stored before: n, then (key, value).
        let mut w = Writer::new();
        w.u32(2);
        for (k, v) in [(&b"Other"[..], &not_text), (b"Tree", &tree)] {
            w.bytes32("k", k, MAX_STATE_VALUE).unwrap();
            w.bytes32("v", v, MAX_STATE_VALUE).unwrap();
        }
        let old = w.into_inner();
        assert_eq!(old.len(), state_size(&state).unwrap());
        assert_eq!(*decode_state(&old).unwrap().values.read().unwrap(), *state.values.read().unwrap());
        // An unknown form of value is refused.
        let mut bad = blob.clone();
        let form = 4 + 4 + 4 + b"Other".len();
        bad[form] = 7;
        assert!(decode_state(&bad).is_err());
    }
}

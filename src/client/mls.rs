//! The client side of MLS: one member's key material and groups, on
//! openmls with the RustCrypto provider.
//!
//! Handshake messages are PublicMessages and application messages
//! PrivateMessages ([`MIXED_PLAINTEXT_WIRE_FORMAT_POLICY`]), so the server
//! can verify commits without being able to read anything. Application
//! payloads are padded to [`PADDING`] bytes so ciphertext sizes reveal only
//! a size bucket. Group state here lives in memory; the `hush` CLI keeps it
//! on disk.

use std::collections::HashMap;

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use thiserror::Error;

use crate::auth::AccountId;

/// The one ciphersuite hush uses: X25519, AES-128-GCM, SHA-256, Ed25519.
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

/// Length of a new group's random id.
pub const GROUP_ID_LEN: usize = 16;

/// A new group as the server registers it.
#[derive(Debug, Clone)]
pub struct NewGroup {
    pub id: Vec<u8>,
    /// The signed GroupInfo, as an `MLSMessage`.
    pub group_info: Vec<u8>,
    /// The ratchet tree (TLS encoding).
    pub ratchet_tree: Vec<u8>,
}

/// An MLS operation failed.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct MlsError(pub String);

macro_rules! mls_try {
    ($e:expr, $ctx:expr) => {
        $e.map_err(|e| MlsError(format!("{}: {e}", $ctx)))
    };
}

/// What processing a message from the group yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Decrypted application data.
    Application { sender: Option<AccountId>, data: Vec<u8> },
    /// A commit was merged; the group is now at `epoch`.
    Commit { sender: Option<AccountId>, epoch: u64, removed_me: bool },
    /// A proposal was stored for a later commit.
    Proposal { sender: Option<AccountId> },
}

/// One member: its MLS signature key, credential and groups, kept in the
/// provider's storage (in memory for [`OpenMlsRustCrypto`], SQLite for the
/// CLI).
pub struct Member<P: OpenMlsProvider = OpenMlsRustCrypto> {
    provider: P,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    account: AccountId,
    groups: HashMap<Vec<u8>, MlsGroup>,
}

impl<P: OpenMlsProvider> std::fmt::Debug for Member<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("account", &self.account).finish_non_exhaustive()
    }
}

fn serialize(m: &impl tls_codec::Serialize, what: &str) -> Result<Vec<u8>, MlsError> {
    m.tls_serialize_detached().map_err(|e| MlsError(format!("encoding {what}: {e}")))
}

impl Member<OpenMlsRustCrypto> {
    /// An in-memory member whose BasicCredential identity is `account` (the
    /// account's Ed25519 public key) with a fresh MLS signature key.
    pub fn new(account: AccountId) -> Result<Self, MlsError> {
        Self::create(OpenMlsRustCrypto::default(), account)
    }
}

impl<P: OpenMlsProvider> Member<P> {
    /// A member with a fresh MLS signature key, stored in `provider`.
    pub fn create(provider: P, account: AccountId) -> Result<Self, MlsError> {
        let signer = mls_try!(SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()), "signature key")?;
        mls_try!(signer.store(provider.storage()), "storing the signature key")?;
        Ok(Self::assemble(provider, signer, account))
    }

    /// A member whose signature key (public part `signature_public`) is
    /// already in `provider`'s storage.
    pub fn load(provider: P, account: AccountId, signature_public: &[u8]) -> Result<Self, MlsError> {
        let signer = SignatureKeyPair::read(provider.storage(), signature_public, CIPHERSUITE.signature_algorithm())
            .ok_or_else(|| MlsError("the MLS signature key is missing from the state".into()))?;
        Ok(Self::assemble(provider, signer, account))
    }

    fn assemble(provider: P, signer: SignatureKeyPair, account: AccountId) -> Self {
        let credential = CredentialWithKey {
            credential: BasicCredential::new(account.0.to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Self { provider, signer, credential, account, groups: HashMap::new() }
    }

    /// The public half of the MLS signature key (to find it again).
    pub fn signature_public(&self) -> Vec<u8> {
        self.signer.public().to_vec()
    }

    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// The group, loaded from storage on first use.
    fn group_mut(&mut self, id: &[u8]) -> Result<&mut MlsGroup, MlsError> {
        if !self.groups.contains_key(id) {
            let loaded = MlsGroup::load(self.provider.storage(), &GroupId::from_slice(id))
                .map_err(|_| MlsError("cannot load the group state".into()))?
                .ok_or_else(|| MlsError("not in that group".into()))?;
            self.groups.insert(id.to_vec(), loaded);
        }
        self.groups.get_mut(id).ok_or_else(|| MlsError("not in that group".into()))
    }

    /// Whether we hold state for the group.
    pub fn has_group(&mut self, id: &[u8]) -> bool {
        self.group_mut(id).is_ok()
    }

    pub fn account(&self) -> AccountId {
        self.account
    }

    /// `n` fresh KeyPackages, serialized for upload.
    pub fn key_packages(&self, n: usize) -> Result<Vec<Vec<u8>>, MlsError> {
        (0..n)
            .map(|_| {
                let bundle = mls_try!(
                    KeyPackage::builder().build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone()),
                    "building a KeyPackage"
                )?;
                serialize(bundle.key_package(), "a KeyPackage")
            })
            .collect()
    }

    fn create_config() -> MlsGroupCreateConfig {
        MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .padding_size(PADDING)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE))
            .build()
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

    /// Creates a group with a random id; returns the id and what the server
    /// needs to register it (GroupInfo message, ratchet tree).
    pub fn create_group(&mut self) -> Result<NewGroup, MlsError> {
        let mut id = [0u8; GROUP_ID_LEN];
        mls_try!(
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).map_err(|_| "no randomness"),
            "group id"
        )?;
        let group = mls_try!(
            MlsGroup::new_with_group_id(
                &self.provider,
                &self.signer,
                &Self::create_config(),
                GroupId::from_slice(&id),
                self.credential.clone()
            ),
            "creating the group"
        )?;
        let info = mls_try!(group.export_group_info(self.provider.crypto(), &self.signer, false), "GroupInfo")?;
        let info = serialize(&info, "the GroupInfo")?;
        let tree = serialize(&group.export_ratchet_tree(), "the ratchet tree")?;
        self.groups.insert(id.to_vec(), group);
        Ok(NewGroup { id: id.to_vec(), group_info: info, ratchet_tree: tree })
    }

    /// A commit adding the owners of `key_packages` (as claimed from the
    /// server) and their Welcome. The commit stays pending until
    /// [`Member::merge_pending`] (server accepted) or
    /// [`Member::discard_pending`] (server refused).
    pub fn add(&mut self, group: &[u8], key_packages: &[Vec<u8>]) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
        self.group_mut(group)?;
        let mut kps = Vec::new();
        for bytes in key_packages {
            let kp_in = mls_try!(KeyPackageIn::tls_deserialize_exact(bytes), "KeyPackage")?;
            kps.push(mls_try!(kp_in.validate(self.provider.crypto(), ProtocolVersion::Mls10), "KeyPackage")?);
        }
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let (commit, welcome, _) = mls_try!(g.add_members(provider, signer, &kps), "adding members")?;
        Ok((serialize(&commit, "the commit")?, serialize(&welcome, "the Welcome")?))
    }

    /// A commit removing every leaf of these accounts.
    pub fn remove(&mut self, group: &[u8], accounts: &[AccountId]) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let leaves: Vec<LeafNodeIndex> = g
            .members()
            .filter(|m| crate::delivery::mls::account_of(&m.credential).is_some_and(|a| accounts.contains(&a)))
            .map(|m| m.index)
            .collect();
        if leaves.is_empty() {
            return Err(MlsError("none of those accounts is in the group".into()));
        }
        let (commit, _, _) = mls_try!(g.remove_members(provider, signer, &leaves), "removing members")?;
        serialize(&commit, "the commit")
    }

    /// A proposal to remove ourselves; another member commits it.
    pub fn leave(&mut self, group: &[u8]) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let proposal = mls_try!(g.leave_group(provider, signer), "leaving")?;
        serialize(&proposal, "the proposal")
    }

    /// A commit of the proposals received so far (and the Welcome if they
    /// add members).
    pub fn commit_pending(&mut self, group: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>), MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let (commit, welcome, _) = mls_try!(g.commit_to_pending_proposals(provider, signer), "committing")?;
        Ok((serialize(&commit, "the commit")?, welcome.map(|w| serialize(&w, "the Welcome")).transpose()?))
    }

    /// The server accepted our pending commit: apply it.
    pub fn merge_pending(&mut self, group: &[u8]) -> Result<(), MlsError> {
        self.group_mut(group)?;
        let provider = &self.provider;
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        mls_try!(g.merge_pending_commit(provider), "merging our commit")
    }

    /// The server refused our pending commit: forget it.
    pub fn discard_pending(&mut self, group: &[u8]) -> Result<(), MlsError> {
        self.group_mut(group)?;
        let provider = &self.provider;
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        mls_try!(g.clear_pending_commit(provider.storage()), "discarding our commit")
    }

    /// Encrypts application data for the group.
    pub fn encrypt(&mut self, group: &[u8], data: &[u8]) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let msg = mls_try!(g.create_message(provider, signer, data), "encrypting")?;
        serialize(&msg, "the message")
    }

    /// Joins a group from a Welcome; returns the group id.
    pub fn join(&mut self, welcome: &[u8]) -> Result<Vec<u8>, MlsError> {
        let msg = mls_try!(MlsMessageIn::tls_deserialize_exact(welcome), "Welcome")?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(MlsError("not a Welcome".into()));
        };
        let staged =
            mls_try!(StagedWelcome::new_from_welcome(&self.provider, &Self::join_config(), welcome, None), "Welcome")?;
        let group = mls_try!(staged.into_group(&self.provider), "joining")?;
        let id = group.group_id().as_slice().to_vec();
        self.groups.insert(id.clone(), group);
        Ok(id)
    }

    /// Processes a message fetched from the group's log (not one we sent).
    pub fn receive(&mut self, group: &[u8], bytes: &[u8]) -> Result<Received, MlsError> {
        let msg = mls_try!(MlsMessageIn::tls_deserialize_exact(bytes), "message")?;
        let protocol = mls_try!(msg.try_into_protocol_message(), "message")?;
        self.group_mut(group)?;
        let provider = &self.provider;
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let processed = mls_try!(g.process_message(provider, protocol), "processing")?;
        let sender = crate::delivery::mls::account_of(processed.credential());
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                Ok(Received::Application { sender, data: app.into_bytes() })
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                mls_try!(g.store_pending_proposal(provider.storage(), *p), "storing the proposal")?;
                Ok(Received::Proposal { sender })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let removed_me = staged.self_removed();
                mls_try!(g.merge_staged_commit(provider, *staged), "merging the commit")?;
                Ok(Received::Commit { sender, epoch: g.epoch().as_u64(), removed_me })
            }
            _ => Err(MlsError("unexpected message content".into())),
        }
    }

    pub fn epoch(&mut self, group: &[u8]) -> Option<u64> {
        self.group_mut(group).ok().map(|g| g.epoch().as_u64())
    }

    /// A value all members share in an epoch: equal values mean equal state.
    pub fn epoch_authenticator(&mut self, group: &[u8]) -> Option<Vec<u8>> {
        self.group_mut(group).ok().map(|g| g.epoch_authenticator().as_slice().to_vec())
    }

    /// The accounts in the group, by leaf order.
    pub fn members(&mut self, group: &[u8]) -> Vec<AccountId> {
        self.group_mut(group)
            .map(|g| g.members().filter_map(|m| crate::delivery::mls::account_of(&m.credential)).collect())
            .unwrap_or_default()
    }

    /// Whether we are still an active member of the group.
    pub fn is_active(&mut self, group: &[u8]) -> bool {
        self.group_mut(group).map(|g| g.is_active()).unwrap_or(false)
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

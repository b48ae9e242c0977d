//! Forgeries, for the adversary tests and the fuzzer: what a malicious
//! member or a malicious server can build with openmls and public
//! information alone. Nothing in hush calls this module; it exists so the
//! attacks that certified credentials stop are tests, not claims.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

use super::{serialize, Commit, Member, MlsError, CIPHERSUITE};
use crate::mls::Suite;
use crate::mls::VerifiableGroupInfo;

impl Member<OpenMlsRustCrypto> {
    /// A forger: a member whose leaf credential carries `claimed` (another
    /// device's genuine certificate copied from one of its KeyPackages, or a
    /// certificate with a broken signature) while the leaf's signature key
    /// is the forger's own. Its KeyPackages, groups and Welcomes are what a
    /// compromised server or a malicious member would hand out.
    pub fn forger(claimed: Vec<u8>) -> Result<Self, MlsError> {
        let (_, _, mut member) = Self::generate()?;
        member.credential.credential = BasicCredential::new(claimed).into();
        Ok(member)
    }
}

impl<P: OpenMlsProvider> Member<P> {
    fn new_signer_bundle(&self, claimed: Vec<u8>) -> Result<(SignatureKeyPair, CredentialWithKey), MlsError> {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
            .map_err(|e| MlsError::Forgery(format!("signature key: {e}")))?;
        signer
            .store(self.provider.storage())
            .map_err(|e| MlsError::Forgery(format!("storing the signature key: {e}")))?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(claimed).into(),
            signature_key: signer.public().into(),
        };
        Ok((signer, credential))
    }

    /// A commit that moves this member's own leaf to a new signature key and
    /// the credential `claimed`: a member trying to become someone else.
    /// Pending like any commit of ours.
    pub fn impersonating_update(&mut self, group: &[u8], claimed: Vec<u8>) -> Result<Vec<u8>, MlsError> {
        let (signer, credential_with_key) = self.new_signer_bundle(claimed)?;
        self.group_mut(group)?;
        let (provider, old) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let bundle = g
            .self_update_with_new_signer(
                provider,
                old,
                NewSignerBundle { signer: &signer, credential_with_key },
                LeafNodeParameters::default(),
            )
            .map_err(|e| MlsError::Forgery(format!("forging an update: {e}")))?;
        serialize(bundle.commit(), "the commit")
    }

    /// An update proposal that would do the same.
    pub fn impersonating_proposal(&mut self, group: &[u8], claimed: Vec<u8>) -> Result<Vec<u8>, MlsError> {
        let (signer, credential_with_key) = self.new_signer_bundle(claimed)?;
        self.group_mut(group)?;
        let (provider, old) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let (proposal, _) = g
            .propose_self_update_with_new_signer(
                provider,
                old,
                NewSignerBundle { signer: &signer, credential_with_key },
                LeafNodeParameters::default(),
            )
            .map_err(|e| MlsError::Forgery(format!("forging an update proposal: {e}")))?;
        serialize(&proposal, "the proposal")
    }

    /// An update proposal for this member's own leaf (same credential, new
    /// keys), its leaf carrying an unknown extension of `extension` bytes
    /// when given: a member parking data in the group's public state.
    pub fn update_proposal(&mut self, group: &[u8], extension: Option<usize>) -> Result<Vec<u8>, MlsError> {
        let mut params = LeafNodeParameters::builder();
        if let Some(n) = extension {
            const TYPE: u16 = 0xf0f0;
            let ext = Extensions::single(Extension::Unknown(TYPE, UnknownExtension(vec![0x42; n])))
                .map_err(|e| MlsError::Forgery(format!("extension: {e}")))?;
            let capabilities = Capabilities::builder().extensions(vec![ExtensionType::Unknown(TYPE)]).build();
            params = params.with_extensions(ext).with_capabilities(capabilities);
        }
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let (proposal, _) = g
            .propose_self_update(provider, signer, params.build())
            .map_err(|e| MlsError::Forgery(format!("proposing an update: {e}")))?;
        serialize(&proposal, "the proposal")
    }

    /// A classic group with the id `id`, whatever account it is bound to
    /// (an honest [`Member::create_group`] derives it from its own account).
    pub fn create_group_with_id(&mut self, removal_key: &[u8; 32], id: &[u8]) -> Result<super::NewGroup, MlsError> {
        self.create_group_with_id_of(removal_key, id, Suite::Classic)
    }

    /// [`Member::create_group_with_id`] in `suite`.
    pub fn create_group_with_id_of(
        &mut self,
        removal_key: &[u8; 32],
        id: &[u8],
        suite: Suite,
    ) -> Result<super::NewGroup, MlsError> {
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &Self::create_config(removal_key, suite)?,
            GroupId::from_slice(id),
            self.credential.clone(),
        )
        .map_err(|e| MlsError::Forgery(format!("creating the group: {e}")))?;
        let info = group
            .export_group_info(self.provider.crypto(), &self.signer, false)
            .map_err(|e| MlsError::Forgery(format!("GroupInfo: {e}")))?;
        let new = super::NewGroup {
            id: id.to_vec(),
            group_info: serialize(&info, "the GroupInfo")?,
            ratchet_tree: serialize(&group.export_ratchet_tree(), "the ratchet tree")?,
        };
        self.groups.insert(id.to_vec(), group);
        Ok(new)
    }

    /// A commit adding `key_packages` without checking whose they are (an
    /// honest [`Member::add`] refuses uncertified ones).
    pub fn add_unchecked(&mut self, group: &[u8], key_packages: &[Vec<u8>]) -> Result<Commit, MlsError> {
        let mut kps = Vec::new();
        for bytes in key_packages {
            let kp_in = KeyPackageIn::tls_deserialize_exact(bytes)
                .map_err(|e| MlsError::Forgery(format!("KeyPackage: {e}")))?;
            kps.push(
                kp_in
                    .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(|e| MlsError::Forgery(format!("KeyPackage: {e}")))?,
            );
        }
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let (commit, welcome, info) =
            g.add_members(provider, signer, &kps).map_err(|e| MlsError::Forgery(format!("adding members: {e}")))?;
        Commit::of(&commit, Some(&welcome), info)
    }
}

/// The credential identity (for hush: the device certificate) a KeyPackage
/// carries. Public information: anyone the package passes through can copy
/// it.
pub fn credential_of_key_package(bytes: &[u8]) -> Option<Vec<u8>> {
    let kp = KeyPackageIn::tls_deserialize_exact(bytes).ok()?;
    let kp = kp.validate(&openmls_rust_crypto::RustCrypto::default(), ProtocolVersion::Mls10).ok()?;
    let basic = BasicCredential::try_from(kp.leaf_node().credential().clone()).ok()?;
    Some(basic.identity().to_vec())
}

impl<P: OpenMlsProvider> Member<P> {
    /// An external commit built from a group's GroupInfo without the
    /// checks [`Member::resync`] makes about this device's own leaf: what a
    /// device that has no leaf in the group (an outsider handed the
    /// GroupInfo, or a device its owner certified on the side) sends to
    /// force its way in. openmls removes the leaf holding this member's
    /// signature key, if there is one.
    pub fn rejoin_unchecked(
        &mut self,
        group: &[u8],
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<Commit, MlsError> {
        let (info, tree, _) = self.verify_rejoin(group, group_info, ratchet_tree)?;
        self.rejoin(group, info, tree)
    }

    /// The same, with this member's signature key under `certificate`
    /// instead of its own (e.g. one its account key issued for another
    /// device, certifying this member's MLS key): a "resync" that replaces
    /// this device's leaf with a leaf for another device.
    pub fn rejoin_as(
        &mut self,
        group: &[u8],
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
        certificate: Vec<u8>,
    ) -> Result<Commit, MlsError> {
        let own = self.credential.credential.clone();
        self.credential.credential = BasicCredential::new(certificate).into();
        let commit = self.rejoin_unchecked(group, group_info, ratchet_tree);
        self.credential.credential = own;
        commit
    }
}

impl Commit {
    /// Flips the last byte of the commit's framing (its membership tag,
    /// which only members can check): a commit the server accepts and no
    /// member can process.
    pub fn corrupt_membership_tag(&mut self) {
        if let Some(last) = self.message.last_mut() {
            *last ^= 0x01;
        }
    }
}

impl Member<OpenMlsRustCrypto> {
    /// A self-update commit whose update path is garbage (the last byte of
    /// its last encrypted path secret flipped), yet correctly signed and
    /// carrying a valid membership tag and GroupInfo: a commit that no
    /// server can tell from a good one and no other member can process.
    /// Stays pending like any commit of ours (our own view of the epoch is
    /// sound).
    ///
    /// Re-signing needs only our signature key; the membership tag needs
    /// this epoch's membership key, which openmls keeps to itself, so it is
    /// read from the in-memory provider's storage and checked against the
    /// tag openmls computed before it is used.
    // Every index below is within lengths checked first (the message is
    // longer than HEADER + the trailer, which is SIGNATURE + 2 × TAG bytes;
    // the serialized GroupInfo ends with its SIGNATURE).
    #[allow(clippy::indexing_slicing)]
    pub fn garbage_path_update(&mut self, group: &[u8]) -> Result<Commit, MlsError> {
        use openmls_traits::signatures::Signer as _;
        // A Commit PublicMessage from a member ends with its signature (64
        // bytes, 2-byte length), confirmation tag and membership tag (32
        // bytes each, 1-byte length).
        const SIGNATURE: usize = 2 + 64;
        const TAG: usize = 1 + 32;
        const HEADER: usize = 4;
        // What the server sees of this epoch, to make the GroupInfo it will
        // check: a public copy of the group.
        let (info_now, context) = {
            self.group_mut(group)?;
            let (provider, signer) = (&self.provider, &self.signer);
            let g = self.groups.get(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
            let info = g
                .export_group_info(provider.crypto(), signer, true)
                .map_err(|e| MlsError::Forgery(format!("exporting the GroupInfo: {e}")))?;
            (serialize(&info, "the GroupInfo")?, serialize(g.public_group().group_context(), "the group context")?)
        };
        let info_now = crate::mls::parse_group_info(&info_now)?;
        let tree = info_now
            .extensions()
            .ratchet_tree()
            .map(|t| t.ratchet_tree().clone())
            .ok_or_else(|| MlsError::Forgery("the GroupInfo lacks its tree".into()))?;
        let scratch = openmls_memory_storage::MemoryStorage::default();
        let (mut public, _) =
            PublicGroup::from_external(self.provider.crypto(), &scratch, tree, info_now, ProposalStore::new())
                .map_err(|e| MlsError::Forgery(format!("the public view: {e}")))?;
        let mut commit = self.self_update(group)?;
        let m = commit.message.clone();
        let content_end = m
            .len()
            .checked_sub(SIGNATURE + 2 * TAG)
            .filter(|end| *end > HEADER)
            .ok_or_else(|| MlsError::Forgery("the commit is too short".into()))?;
        let (head, trailer) = m.split_at(content_end);
        if trailer[..2] != [0x40, 64] || trailer[SIGNATURE] != 32 || trailer[SIGNATURE + TAG] != 32 {
            return Err(MlsError::Forgery("the commit's trailer is not laid out as expected".into()));
        }
        let confirmation = &trailer[SIGNATURE..SIGNATURE + TAG];
        let key = self.membership_key()?;
        let tbm = |content: &[u8], signature: &[u8]| {
            let mut out = m[..HEADER].to_vec();
            out.extend_from_slice(content);
            out.extend_from_slice(&context);
            out.extend_from_slice(&[0x40, 64]);
            out.extend_from_slice(signature);
            out.extend_from_slice(confirmation);
            out
        };
        let mac = |data: &[u8]| ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), data);
        let content = &head[HEADER..];
        if mac(&tbm(content, &trailer[2..SIGNATURE])).as_ref() != &trailer[SIGNATURE + TAG + 1..] {
            return Err(MlsError::Forgery(
                "the membership key read from storage does not match the commit's tag".into(),
            ));
        }
        let mut garbled = content.to_vec();
        if let Some(last) = garbled.last_mut() {
            *last ^= 0x01;
        }
        let mut tbs = m[..HEADER].to_vec();
        tbs.extend_from_slice(&garbled);
        tbs.extend_from_slice(&context);
        let to_sign = serialize(&SignContent::new("FramedContentTBS", tbs.into()), "the content to sign")?;
        let signature = self.signer.sign(&to_sign).map_err(|e| MlsError::Forgery(format!("signing: {e:?}")))?;
        let tag = mac(&tbm(&garbled, &signature));
        let mut out = m[..HEADER].to_vec();
        out.extend_from_slice(&garbled);
        out.extend_from_slice(&[0x40, 64]);
        out.extend_from_slice(&signature);
        out.extend_from_slice(confirmation);
        out.push(32);
        out.extend_from_slice(tag.as_ref());
        // The GroupInfo of the epoch the garbled commit creates, as the
        // server computes it (the transcript covers the garbled bytes).
        let msg =
            MlsMessageIn::tls_deserialize_exact(&out).map_err(|e| MlsError::Forgery(format!("re-reading: {e}")))?;
        let message = msg.try_into_protocol_message().map_err(|e| MlsError::Forgery(format!("re-reading: {e}")))?;
        let processed = public
            .process_message(self.provider.crypto(), message)
            .map_err(|e| MlsError::Forgery(format!("the public view refused the commit: {e}")))?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(MlsError::Forgery("not a commit".into()));
        };
        public.merge_commit(&scratch, *staged).map_err(|e| MlsError::Forgery(format!("merging publicly: {e:?}")))?;
        let own = self.group_mut(group)?.own_leaf_index();
        let original = crate::mls::parse_group_info(&commit.group_info)?;
        let unsigned = VerifiableGroupInfo::new(
            public.group_context().clone(),
            original.extensions().clone(),
            public.confirmation_tag().clone(),
            own,
            Signature::from(vec![0u8; 64]),
        );
        let unsigned = serialize(&unsigned, "the GroupInfo")?;
        let tbs =
            unsigned.get(..unsigned.len() - SIGNATURE).ok_or_else(|| MlsError::Forgery("short GroupInfo".into()))?;
        let to_sign = serialize(&SignContent::new("GroupInfoTBS", tbs.to_vec().into()), "the GroupInfo to sign")?;
        let signature = self.signer.sign(&to_sign).map_err(|e| MlsError::Forgery(format!("signing: {e:?}")))?;
        // MLSMessage: version mls10, wire format group_info (4).
        let mut info = vec![0x00, 0x01, 0x00, 0x04];
        info.extend_from_slice(tbs);
        info.extend_from_slice(&[0x40, 64]);
        info.extend_from_slice(&signature);
        commit.group_info = info;
        commit.message = out;
        Ok(commit)
    }

    /// The current epoch's membership key, from the in-memory storage
    /// (openmls stores its message secrets as JSON).
    fn membership_key(&self) -> Result<Vec<u8>, MlsError> {
        fn bytes_in(v: &serde_json::Value) -> Option<Vec<u8>> {
            match v {
                serde_json::Value::Array(items) if !items.is_empty() => {
                    items.iter().map(|i| i.as_u64().and_then(|n| u8::try_from(n).ok())).collect()
                }
                serde_json::Value::Array(_) => None,
                serde_json::Value::Object(map) => map.values().find_map(bytes_in),
                _ => None,
            }
        }
        let values = self.provider.storage().values.read().map_err(|_| MlsError::Forgery("storage lock".into()))?;
        values
            .values()
            .filter_map(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
            .find_map(|v| v.get("message_secrets")?.get("membership_key").and_then(bytes_in))
            .ok_or_else(|| MlsError::Forgery("no membership key in storage".into()))
    }
}

/// A proposal hush never makes, sent on its own by a malicious member: each
/// one, stored, made every later commit fail (issue 29).
#[derive(Debug, Clone)]
pub enum HostileProposal {
    /// An external PreSharedKey nobody else holds.
    PreSharedKey,
    /// GroupContextExtensions that keep the server as external sender (so
    /// only the proposal type is wrong).
    GroupContextExtensions,
    /// An Add of a KeyPackage (serialized) the server never handed out.
    Add(Vec<u8>),
}

impl<P: OpenMlsProvider> Member<P> {
    /// `kind`, proposed in `group` (kept pending in our own state too).
    pub fn hostile_proposal(&mut self, group: &[u8], kind: &HostileProposal) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let forge = |e: &dyn std::fmt::Display| MlsError::Forgery(format!("proposing: {e}"));
        let (message, _) = match kind {
            HostileProposal::PreSharedKey => {
                let id = openmls::schedule::PreSharedKeyId::external(b"nobody has this".to_vec(), vec![7; 32]);
                g.propose_pre_shared_key(provider, signer, id).map_err(|e| forge(&e))?
            }
            HostileProposal::GroupContextExtensions => {
                let same = g.extensions().clone();
                g.propose_group_context_extensions(provider, same, signer).map_err(|e| forge(&e))?
            }
            HostileProposal::Add(bytes) => {
                let kp = KeyPackageIn::tls_deserialize_exact(bytes.as_slice())
                    .map_err(|e| forge(&e))?
                    .validate(provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(|e| forge(&e))?;
                g.propose_add_member(provider, signer, &kp).map_err(|e| forge(&e))?
            }
        };
        serialize(&message, "the proposal")
    }

    /// KeyPackages as a hush from before group settings made them: their
    /// leaf does not advertise hush's settings extension.
    pub fn legacy_key_packages(&self, n: usize) -> Result<Vec<Vec<u8>>, MlsError> {
        (0..n)
            .map(|_| {
                let bundle = KeyPackage::builder()
                    .build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone())
                    .map_err(|e| MlsError::Forgery(format!("a KeyPackage: {e}")))?;
                serialize(bundle.key_package(), "a KeyPackage")
            })
            .collect()
    }

    /// A commit carrying, besides a fresh path, GroupContextExtensions that
    /// keep hush's settings but drop the server as the group's external
    /// sender (so it could no longer remove revoked devices): a settings
    /// change hush refuses. Pending.
    pub fn commit_with_extensions(&mut self, group: &[u8]) -> Result<Commit, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let forge = |e: &dyn std::fmt::Display| MlsError::Forgery(format!("committing: {e}"));
        let kept: Vec<Extension> =
            g.extensions().iter().filter(|e| !matches!(e, Extension::ExternalSenders(_))).cloned().collect();
        let same = Extensions::from_vec(kept).map_err(|e| forge(&e))?;
        let bundle = g
            .commit_builder()
            .propose_group_context_extensions(same)
            .map_err(|e| forge(&e))?
            .force_self_update(true)
            .load_psks(provider.storage())
            .map_err(|e| forge(&e))?
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(|e| forge(&e))?
            .stage_commit(provider)
            .map_err(|e| forge(&e))?;
        let (commit, _, info) = bundle.into_contents();
        Commit::of(&commit, None, info)
    }

    /// A proposal to remove every leaf of `account` (one message per leaf;
    /// the first is returned): a member asking the group to drop someone.
    pub fn propose_removal(&mut self, group: &[u8], account: &crate::auth::AccountId) -> Result<Vec<u8>, MlsError> {
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError::Forgery("not in that group".into()))?;
        let leaf = g
            .members()
            .find(|m| crate::mls::holder_of(&m.credential).is_some_and(|(a, _)| a == *account))
            .map(|m| m.index)
            .ok_or_else(|| MlsError::Forgery("no such member".into()))?;
        let (message, _) = g
            .propose_remove_member(provider, signer, leaf)
            .map_err(|e| MlsError::Forgery(format!("proposing: {e}")))?;
        serialize(&message, "the proposal")
    }
}

impl Member<OpenMlsRustCrypto> {
    /// An independent copy of this member (its keys and every group's
    /// state, copied out of the in-memory storage): a member that keeps
    /// the state of an epoch it was removed from to fork the group, and
    /// the client fuzzer's stand-in for a state file rolled back.
    pub fn copy(&self) -> Result<Self, MlsError> {
        let provider = OpenMlsRustCrypto::default();
        let values =
            self.provider.storage().values.read().map_err(|_| MlsError::Forgery("a poisoned storage".into()))?.clone();
        *provider.storage().values.write().map_err(|_| MlsError::Forgery("a poisoned storage".into()))? = values;
        let mut copy = Self::load(provider, &self.certificate.encode())?;
        copy.removal_key = self.removal_key;
        Ok(copy)
    }
}

//! Forgeries, for the adversary tests and the fuzzer: what a malicious
//! member or a malicious server can build with openmls and public
//! information alone. Nothing in hush calls this module; it exists so the
//! attacks that certified credentials stop are tests, not claims.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

use super::{serialize, Member, MlsError, CIPHERSUITE};

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
            .map_err(|e| MlsError(format!("signature key: {e}")))?;
        signer.store(self.provider.storage()).map_err(|e| MlsError(format!("storing the signature key: {e}")))?;
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
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let bundle = g
            .self_update_with_new_signer(
                provider,
                old,
                NewSignerBundle { signer: &signer, credential_with_key },
                LeafNodeParameters::default(),
            )
            .map_err(|e| MlsError(format!("forging an update: {e}")))?;
        serialize(bundle.commit(), "the commit")
    }

    /// An update proposal that would do the same.
    pub fn impersonating_proposal(&mut self, group: &[u8], claimed: Vec<u8>) -> Result<Vec<u8>, MlsError> {
        let (signer, credential_with_key) = self.new_signer_bundle(claimed)?;
        self.group_mut(group)?;
        let (provider, old) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let (proposal, _) = g
            .propose_self_update_with_new_signer(
                provider,
                old,
                NewSignerBundle { signer: &signer, credential_with_key },
                LeafNodeParameters::default(),
            )
            .map_err(|e| MlsError(format!("forging an update proposal: {e}")))?;
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
                .map_err(|e| MlsError(format!("extension: {e}")))?;
            let capabilities = Capabilities::builder().extensions(vec![ExtensionType::Unknown(TYPE)]).build();
            params = params.with_extensions(ext).with_capabilities(capabilities);
        }
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let (proposal, _) = g
            .propose_self_update(provider, signer, params.build())
            .map_err(|e| MlsError(format!("proposing an update: {e}")))?;
        serialize(&proposal, "the proposal")
    }

    /// A group with the id `id`, whatever account it is bound to (an honest
    /// [`Member::create_group`] derives it from its own account).
    pub fn create_group_with_id(&mut self, removal_key: &[u8; 32], id: &[u8]) -> Result<super::NewGroup, MlsError> {
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &Self::create_config(removal_key)?,
            GroupId::from_slice(id),
            self.credential.clone(),
        )
        .map_err(|e| MlsError(format!("creating the group: {e}")))?;
        let info = group
            .export_group_info(self.provider.crypto(), &self.signer, false)
            .map_err(|e| MlsError(format!("GroupInfo: {e}")))?;
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
    pub fn add_unchecked(&mut self, group: &[u8], key_packages: &[Vec<u8>]) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
        let mut kps = Vec::new();
        for bytes in key_packages {
            let kp_in = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError(format!("KeyPackage: {e}")))?;
            kps.push(
                kp_in
                    .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(|e| MlsError(format!("KeyPackage: {e}")))?,
            );
        }
        self.group_mut(group)?;
        let (provider, signer) = (&self.provider, &self.signer);
        let g = self.groups.get_mut(group).ok_or_else(|| MlsError("not in that group".into()))?;
        let (commit, welcome, _) =
            g.add_members(provider, signer, &kps).map_err(|e| MlsError(format!("adding members: {e}")))?;
        Ok((serialize(&commit, "the commit")?, serialize(&welcome, "the Welcome")?))
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

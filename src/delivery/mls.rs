//! What the Delivery Service reads of MLS, via openmls: message framing,
//! KeyPackage validation, credentials, and the public group state codec.
//!
//! The server never holds a secret: it parses PublicMessage and
//! PrivateMessage *framing* (group id, epoch, content type), verifies
//! PublicMessage signatures against the public ratchet tree, and keeps each
//! group's public state (openmls [`PublicGroup`]) as a blob.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, ContentType, Credential, KeyPackageIn, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage,
    ProtocolVersion,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

use crate::auth::AccountId;
use crate::limits::MAX_GROUP_ID;
use crate::wire::{DecodeError, Reader, Writer};

pub use openmls::prelude::PublicGroup;

/// Entries in a group state blob at most (a `PublicGroup` stores a handful
/// of records plus one per queued proposal).
pub const MAX_STATE_ENTRIES: usize = 4096;

/// Largest value in a group state blob (the ratchet tree of a large group).
pub const MAX_STATE_VALUE: usize = 64 * 1024 * 1024;

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

/// Reads the framing of an `MLSMessage` sent to a group. Refuses every
/// combination hush does not accept: handshake messages must be
/// PublicMessage (so the server can verify them), application messages
/// PrivateMessage.
pub fn frame(bytes: &[u8]) -> Result<Framed, String> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| format!("not an MLS message: {e}"))?;
    let message = match msg.extract() {
        MlsMessageBodyIn::PublicMessage(m) => ProtocolMessage::from(m),
        MlsMessageBodyIn::PrivateMessage(m) => ProtocolMessage::from(m),
        _ => return Err("expected a PublicMessage or PrivateMessage".into()),
    };
    let group = message.group_id().as_slice().to_vec();
    if group.is_empty() || group.len() > MAX_GROUP_ID {
        return Err(format!("group ids must be 1 to {MAX_GROUP_ID} bytes"));
    }
    let public = matches!(message, ProtocolMessage::PublicMessage(_));
    let kind = match (message.content_type(), public) {
        (ContentType::Application, false) => Kind::Application,
        (ContentType::Commit, true) => Kind::Commit,
        (ContentType::Proposal, true) => Kind::Proposal,
        (ContentType::Application, true) => {
            return Err("application messages must be encrypted (PrivateMessage)".into())
        }
        (_, false) => return Err("commits and proposals must be sent as PublicMessage".into()),
    };
    Ok(Framed { group, epoch: message.epoch().as_u64(), kind, message })
}

/// The hush account a credential names: a BasicCredential whose identity
/// is a 32-byte Ed25519 account key.
pub fn account_of(credential: &Credential) -> Option<AccountId> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    <[u8; 32]>::try_from(basic.identity()).ok().map(AccountId)
}

/// Validates an uploaded KeyPackage (signature, lifetime, protocol version,
/// supported ciphersuite) and checks that its credential is `uploader`.
/// Returns its `KeyPackageRef`.
pub fn validate_key_package(crypto: &RustCrypto, bytes: &[u8], uploader: &AccountId) -> Result<Vec<u8>, String> {
    use openmls_traits::crypto::OpenMlsCrypto as _;
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|e| format!("not a KeyPackage: {e}"))?;
    let kp = kp_in.validate(crypto, ProtocolVersion::Mls10).map_err(|e| format!("invalid KeyPackage: {e}"))?;
    crypto.supports(kp.ciphersuite()).map_err(|_| "unsupported ciphersuite".to_string())?;
    match account_of(kp.leaf_node().credential()) {
        Some(a) if a == *uploader => {}
        _ => return Err("the KeyPackage's credential is not your account key".into()),
    }
    let hash_ref = kp.hash_ref(crypto).map_err(|e| format!("cannot hash the KeyPackage: {e}"))?;
    Ok(hash_ref.as_slice().to_vec())
}

/// Serializes a group's public state (sorted, so equal states give equal
/// bytes): `u32` n, then n × (`bytes32` key, `bytes32` value).
pub fn encode_state(storage: &MemoryStorage) -> Result<Vec<u8>, String> {
    let values = storage.values.read().map_err(|_| "state lock poisoned".to_string())?;
    let mut entries: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
    entries.sort();
    if entries.len() > MAX_STATE_ENTRIES {
        return Err("group state has too many entries".into());
    }
    let mut w = Writer::new();
    w.u32(u32::try_from(entries.len()).map_err(|_| "too many entries".to_string())?);
    for (k, v) in entries {
        w.bytes32("state key", k, MAX_STATE_VALUE).map_err(|e| e.to_string())?;
        w.bytes32("state value", v, MAX_STATE_VALUE).map_err(|e| e.to_string())?;
    }
    Ok(w.into_inner())
}

/// Reads a state blob written by [`encode_state`].
pub fn decode_state(bytes: &[u8]) -> Result<MemoryStorage, DecodeError> {
    let mut r = Reader::new(bytes);
    let n = usize::try_from(r.u32()?).map_err(|_| DecodeError::Invalid("state entries"))?;
    if n > MAX_STATE_ENTRIES {
        return Err(DecodeError::TooLong { field: "state entries", len: n, max: MAX_STATE_ENTRIES });
    }
    let mut map = std::collections::HashMap::new();
    for _ in 0..n {
        let k = r.bytes32("state key", MAX_STATE_VALUE)?.to_vec();
        let v = r.bytes32("state value", MAX_STATE_VALUE)?.to_vec();
        if map.insert(k, v).is_some() {
            return Err(DecodeError::Invalid("duplicate state key"));
        }
    }
    r.finish()?;
    Ok(MemoryStorage { values: std::sync::RwLock::new(map) })
}

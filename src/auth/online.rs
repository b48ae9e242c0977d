//! The server's online-key certificate (issue 35): how a server's key can
//! change without every member re-pinning.
//!
//! A `hush://` address pins the server's **identity key** (the SHA-256 of
//! its SubjectPublicKeyInfo). The identity key certifies an **online key**
//! for a validity period; the online key is what TLS uses, and only it
//! needs to be on the serving machine. A client accepts a handshake whose
//! key is the pinned identity key itself (a server that never rotated:
//! today's key becomes the identity key, so nobody re-pins), or an online
//! key with a certificate from the pinned identity that is valid now.
//!
//! # Encoding (152 bytes)
//!
//! ```text
//! "HUSHONL1"            8 bytes, the magic
//! [u8; 32] identity     the certifying identity key (Ed25519)
//! [u8; 32] online       the certified online key (Ed25519)
//! u64 not_before        Unix seconds
//! u64 not_after         Unix seconds
//! [u8; 64] signature    Ed25519 by `identity` over SIGNING_LABEL and the
//!                       112 bytes before it
//! ```
//!
//! The certificate travels in the TLS handshake as the second entry of
//! the server's certificate chain (after the self-signed X.509 certificate
//! of the online key), where only hush's own verifier reads it.

use std::sync::{Arc, RwLock};

use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use super::address::Fingerprint;
use super::cert;
use super::identity::{Identity, KeyError};

/// The first bytes of an online-key certificate.
pub const MAGIC: &[u8; 8] = b"HUSHONL1";

/// Bytes of an encoded certificate.
pub use crate::limits::ONLINE_CERT_LEN;

/// What the identity key signs before the certificate's fields: no
/// signature made for anything else verifies as a certificate.
const SIGNING_LABEL: &[u8] = b"hush online key certificate v1\0";

/// Longest validity a certificate may claim: a stolen online key whose
/// certificate was never rotated away stops working within this.
pub const MAX_ONLINE_VALIDITY_SECS: u64 = 366 * 24 * 3600;

/// Why an online key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OnlineError {
    #[error("the server's key is neither the pinned one nor certified by it (no certificate came with it)")]
    Uncertified,
    #[error("the server's online-key certificate is malformed")]
    Malformed,
    #[error("the server's online key is certified by another identity ({0}), not the pinned one")]
    OtherIdentity(Fingerprint),
    #[error("the server's online-key certificate is for another key than the one it presented")]
    OtherKey,
    #[error("the server's online-key certificate does not verify (bad signature)")]
    BadSignature,
    #[error(
        "the server's online-key certificate expired at {0} (Unix time); its operator must run `hushd keys rotate`"
    )]
    Expired(u64),
    #[error(
        "the server's online-key certificate is valid only from {0} (Unix time): this device's clock or the \
         server's is wrong; check this one, or ask the operator to check the server's and rotate"
    )]
    NotYetValid(u64),
    #[error("the online-key certificate claims a validity longer than a year")]
    TooLong,
    #[error(
        "the server presented an online key certified before the newest one this device saw from it (certified \
         from {0}, Unix time): a key its operator replaced, perhaps a stolen one; ask the operator"
    )]
    Superseded(u64),
}

/// An online key, certified by an identity key (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnlineCert {
    pub identity: [u8; 32],
    pub online: [u8; 32],
    pub not_before: u64,
    pub not_after: u64,
    pub signature: [u8; 64],
}

impl OnlineCert {
    /// `identity` certifies `online` from `not_before` to `not_after`.
    pub fn issue(identity: &Identity, online: [u8; 32], not_before: u64, not_after: u64) -> Result<Self, OnlineError> {
        if not_after <= not_before || not_after - not_before > MAX_ONLINE_VALIDITY_SECS {
            return Err(OnlineError::TooLong);
        }
        let mut cert = Self { identity: identity.public_key(), online, not_before, not_after, signature: [0; 64] };
        cert.signature = identity.sign(&cert.signing_input());
        Ok(cert)
    }

    fn signed_fields(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ONLINE_CERT_LEN - 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.identity);
        out.extend_from_slice(&self.online);
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out
    }

    fn signing_input(&self) -> Vec<u8> {
        [SIGNING_LABEL, &self.signed_fields()].concat()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.signed_fields();
        out.extend_from_slice(&self.signature);
        out
    }

    /// [`Self::encode`] as an array, as chain heads carry it.
    pub fn to_bytes(&self) -> [u8; ONLINE_CERT_LEN] {
        let mut out = [0u8; ONLINE_CERT_LEN];
        out.copy_from_slice(&self.encode());
        out
    }

    /// Reads exactly [`ONLINE_CERT_LEN`] bytes starting with [`MAGIC`];
    /// never panics. The signature is not checked here ([`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, OnlineError> {
        if bytes.len() != ONLINE_CERT_LEN || !bytes.starts_with(MAGIC) {
            return Err(OnlineError::Malformed);
        }
        let field = |from: usize, to: usize| bytes.get(from..to).ok_or(OnlineError::Malformed);
        let array32 = |from: usize| -> Result<[u8; 32], OnlineError> {
            field(from, from + 32)?.try_into().map_err(|_| OnlineError::Malformed)
        };
        let u64_at = |from: usize| -> Result<u64, OnlineError> {
            Ok(u64::from_be_bytes(field(from, from + 8)?.try_into().map_err(|_| OnlineError::Malformed)?))
        };
        let signature: [u8; 64] = field(88, 152)?.try_into().map_err(|_| OnlineError::Malformed)?;
        Ok(Self {
            identity: array32(8)?,
            online: array32(40)?,
            not_before: u64_at(72)?,
            not_after: u64_at(80)?,
            signature,
        })
    }

    /// The fingerprint a `hush://` address pins for the certifying identity.
    pub fn identity_fingerprint(&self) -> Fingerprint {
        Fingerprint::of_spki(&cert::ed25519_spki(&self.identity))
    }

    /// Whether this certificate, from the identity `pin` names, makes
    /// `presented` (the key the TLS handshake proved) the server's key at
    /// `now`.
    pub fn verify(&self, pin: &Fingerprint, presented: &[u8; 32], now: u64) -> Result<(), OnlineError> {
        self.verify_any_time(pin, presented)?;
        if now < self.not_before {
            return Err(OnlineError::NotYetValid(self.not_before));
        }
        if now >= self.not_after {
            return Err(OnlineError::Expired(self.not_after));
        }
        Ok(())
    }

    /// [`Self::verify`] without the validity period: whether the pinned
    /// identity certified `presented` at all. What a signature made in
    /// the past (a chain head another member quotes) is checked against.
    pub fn verify_any_time(&self, pin: &Fingerprint, presented: &[u8; 32]) -> Result<(), OnlineError> {
        let identity = self.identity_fingerprint();
        if !identity.matches(pin) {
            return Err(OnlineError::OtherIdentity(identity));
        }
        if self.online != *presented {
            return Err(OnlineError::OtherKey);
        }
        if self.not_after <= self.not_before || self.not_after - self.not_before > MAX_ONLINE_VALIDITY_SECS {
            return Err(OnlineError::TooLong);
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.identity).map_err(|_| OnlineError::BadSignature)?;
        key.verify_strict(&self.signing_input(), &ed25519_dalek::Signature::from_bytes(&self.signature))
            .map_err(|_| OnlineError::BadSignature)?;
        Ok(())
    }
}

/// Whether the server that proved `presented` in the TLS handshake, with
/// `chain` after its certificate, is the server `pin` names at `now`: its
/// key is the pinned identity key itself, or an online key the first
/// entry of `chain` certifies.
pub fn check_server_key(pin: &Fingerprint, presented: &[u8; 32], chain: &[&[u8]], now: u64) -> Result<(), OnlineError> {
    if Fingerprint::of_spki(&cert::ed25519_spki(presented)).matches(pin) {
        return Ok(());
    }
    let first = chain.first().ok_or(OnlineError::Uncertified)?;
    OnlineCert::decode(first)?.verify(pin, presented, now)
}

/// The key a server signs with right now: its TLS key and the signer of
/// chain heads. Either the identity key itself (no certificate: a server
/// that never rotated) or an online key with its certificate.
pub struct ServerKey {
    signer: Identity,
    cert: Option<OnlineCert>,
    credentials: Arc<CertifiedKey>,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey").field("certified", &self.cert.is_some()).finish_non_exhaustive()
    }
}

impl ServerKey {
    /// The identity key serving directly.
    pub fn identity(identity: Identity) -> Result<Self, KeyError> {
        let credentials = identity.tls_credentials()?;
        Ok(Self { signer: identity, cert: None, credentials })
    }

    /// An online key with the certificate for it; refused unless the
    /// certificate names exactly this key.
    pub fn online(online: Identity, cert: OnlineCert) -> Result<Self, KeyError> {
        if cert.online != online.public_key() {
            return Err(KeyError::Cert(cert::CertError::Build(
                "the online-key certificate is for another key than the online key".into(),
            )));
        }
        let mut credentials = CertifiedKey::clone(&*online.tls_credentials()?);
        // The chain's second entry: only hush's verifier reads it.
        credentials.cert.push(CertificateDer::from(cert.encode()));
        Ok(Self { signer: online, cert: Some(cert), credentials: Arc::new(credentials) })
    }

    /// Signs `message` with the current key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signer.sign(message)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signer.public_key()
    }

    /// The certificate, unless the identity key serves itself.
    pub fn cert(&self) -> Option<OnlineCert> {
        self.cert
    }
}

/// The server's current key, shared by the TLS listener (a certificate
/// resolver: each new handshake takes the key current then, so
/// connections made before a rotation keep theirs until they close) and
/// whatever signs chain heads. [`CurrentKey::set`] rotates it.
#[derive(Clone)]
pub struct CurrentKey(Arc<RwLock<Arc<ServerKey>>>);

impl std::fmt::Debug for CurrentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentKey(..)")
    }
}

impl CurrentKey {
    pub fn new(key: ServerKey) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(key))))
    }

    pub fn get(&self) -> Arc<ServerKey> {
        match self.0.read() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, key: ServerKey) {
        let key = Arc::new(key);
        match self.0.write() {
            Ok(mut current) => *current = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }
}

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get().credentials.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_online_key_is_accepted_only_as_its_identity_certified_it() {
        let identity = Identity::generate().unwrap();
        let online = Identity::generate().unwrap().public_key();
        let pin = identity.fingerprint();
        let cert = OnlineCert::issue(&identity, online, 1000, 2000).unwrap();
        let bytes = cert.encode();
        assert_eq!(bytes.len(), ONLINE_CERT_LEN);
        assert_eq!(OnlineCert::decode(&bytes).unwrap(), cert);
        assert_eq!(check_server_key(&pin, &online, &[&bytes], 1500), Ok(()));
        // The identity key itself needs no certificate (a server that
        // never rotated).
        assert_eq!(check_server_key(&pin, &identity.public_key(), &[], 1500), Ok(()));
        // Expired, not yet valid, uncertified, another key, another identity.
        assert_eq!(check_server_key(&pin, &online, &[&bytes], 2000), Err(OnlineError::Expired(2000)));
        assert_eq!(check_server_key(&pin, &online, &[&bytes], 999), Err(OnlineError::NotYetValid(1000)));
        assert_eq!(check_server_key(&pin, &online, &[], 1500), Err(OnlineError::Uncertified));
        let other = Identity::generate().unwrap().public_key();
        assert_eq!(check_server_key(&pin, &other, &[&bytes], 1500), Err(OnlineError::OtherKey));
        let mallory = Identity::generate().unwrap();
        let theirs = OnlineCert::issue(&mallory, online, 1000, 2000).unwrap().encode();
        assert_eq!(
            check_server_key(&pin, &online, &[&theirs], 1500),
            Err(OnlineError::OtherIdentity(mallory.fingerprint()))
        );
        // Any byte changed: refused.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(check_server_key(&pin, &online, &[&bad], 1500).is_err(), "byte {at}");
        }
        assert_eq!(OnlineCert::decode(&bytes[..100]), Err(OnlineError::Malformed));
        assert!(OnlineCert::issue(&identity, online, 0, MAX_ONLINE_VALIDITY_SECS + 1).is_err());
    }
}

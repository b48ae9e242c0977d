//! Devices and device certificates: what binds an MLS leaf to an account.
//!
//! A person's **account key** (Ed25519; its public key is the account id
//! that contacts name and safety numbers compare) signs one statement per
//! device: "this TLS key and this MLS signature key are my device, since
//! this time". That statement, the [`DeviceCertificate`], is the
//! BasicCredential identity of the device's leaf in every MLS group. A leaf
//! is valid only if its certificate verifies under the account key it names
//! and the leaf's signature key is the certificate's MLS key
//! ([`DeviceCertificate::check_leaf`]). So neither the server (which never
//! holds an account key) nor another member can put a leaf into a group
//! that claims an account without that account's own signature.
//!
//! # Encoding (169 bytes, fixed)
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | version, `1` |
//! | 32 | account public key (Ed25519) |
//! | 32 | device TLS public key (Ed25519; the device id) |
//! | 32 | device MLS signature public key (Ed25519) |
//! | 8 | creation time, Unix seconds, big-endian |
//! | 64 | Ed25519 signature by the account key over [`CERTIFICATE_LABEL`] followed by the 104 bytes above, version included |
//!
//! The label separates this statement from anything else the account key
//! will ever sign: device revocations ([`DeviceRevocation`]) get their own.

use std::fmt;

use thiserror::Error;

use super::address::AccountId;
use super::Identity;

/// Domain-separation label of a device certificate signature.
pub const CERTIFICATE_LABEL: &[u8] = b"hush device certificate v1\0";

/// Version byte of the certificate encoding.
pub const CERTIFICATE_VERSION: u8 = 1;

/// Length of an encoded certificate.
pub const CERTIFICATE_LEN: usize = 1 + 32 + 32 + 32 + 8 + 64;

/// Length of the signed part (everything but the signature).
const SIGNED_LEN: usize = CERTIFICATE_LEN - 64;

super::address::key_id! {
    /// A device: the raw Ed25519 public key it authenticates its connections
    /// with (its TLS key).
    DeviceId
}

/// Why a certificate or a leaf was not accepted. Always the presenter's
/// fault (or a forger's).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("the credential is not a hush device certificate ({0})")]
    Malformed(&'static str),
    #[error("the device certificate's signature does not verify under the account key it names")]
    BadSignature,
    #[error("the leaf's signature key is not the MLS key its device certificate certifies")]
    KeyMismatch,
}

/// The account key's statement that a device belongs to it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DeviceCertificate {
    pub account: AccountId,
    pub device: DeviceId,
    /// The device's MLS signature public key (its leaf key in every group).
    pub mls_key: [u8; 32],
    pub created_at: u64,
    signature: [u8; 64],
}

impl fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("account", &self.account)
            .field("device", &self.device)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

fn signed_part(account: &[u8; 32], device: &[u8; 32], mls_key: &[u8; 32], created_at: u64) -> [u8; SIGNED_LEN] {
    let mut out = [0u8; SIGNED_LEN];
    let fields: [&[u8]; 5] = [&[CERTIFICATE_VERSION], account, device, mls_key, &created_at.to_be_bytes()];
    let mut at = 0;
    for f in fields {
        if let Some(dst) = out.get_mut(at..at + f.len()) {
            dst.copy_from_slice(f);
        }
        at += f.len();
    }
    out
}

fn signing_input(signed: &[u8; SIGNED_LEN]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(CERTIFICATE_LABEL.len() + SIGNED_LEN);
    msg.extend_from_slice(CERTIFICATE_LABEL);
    msg.extend_from_slice(signed);
    msg
}

impl DeviceCertificate {
    /// Signs a certificate for a device with the account key.
    pub fn issue(account: &Identity, device: DeviceId, mls_key: [u8; 32], created_at: u64) -> Self {
        let account_id = account.account_id();
        let signed = signed_part(&account_id.0, &device.0, &mls_key, created_at);
        let signature = account.sign(&signing_input(&signed));
        Self { account: account_id, device, mls_key, created_at, signature }
    }

    /// The 169-byte encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = signed_part(&self.account.0, &self.device.0, &self.mls_key, self.created_at).to_vec();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes *and verifies* a certificate: a value of this type always
    /// carries a signature that verifies under its account key (strict
    /// Ed25519 verification: no small-order keys, canonical signatures).
    pub fn decode(bytes: &[u8]) -> Result<Self, CredentialError> {
        if bytes.len() != CERTIFICATE_LEN {
            return Err(CredentialError::Malformed("wrong length"));
        }
        let (signed, signature) = bytes.split_at_checked(SIGNED_LEN).ok_or(CredentialError::Malformed("length"))?;
        let (&version, rest) = signed.split_first().ok_or(CredentialError::Malformed("empty"))?;
        if version != CERTIFICATE_VERSION {
            return Err(CredentialError::Malformed("unknown version"));
        }
        let field = |at: usize| -> Result<[u8; 32], CredentialError> {
            rest.get(at..at + 32).and_then(|s| s.try_into().ok()).ok_or(CredentialError::Malformed("length"))
        };
        let account = field(0)?;
        let device = field(32)?;
        let mls_key = field(64)?;
        let created_at = rest
            .get(96..104)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map(u64::from_be_bytes)
            .ok_or(CredentialError::Malformed("length"))?;
        let signature: [u8; 64] = signature.try_into().map_err(|_| CredentialError::Malformed("length"))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&account).map_err(|_| CredentialError::BadSignature)?;
        let signed: [u8; SIGNED_LEN] = signed.try_into().map_err(|_| CredentialError::Malformed("length"))?;
        key.verify_strict(&signing_input(&signed), &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| CredentialError::BadSignature)?;
        Ok(Self { account: AccountId(account), device: DeviceId(device), mls_key, created_at, signature })
    }

    /// The account and device a certificate names, read *without*
    /// verifying its signature. Only for leaves already checked with
    /// [`DeviceCertificate::check_leaf`] when they entered a tree (saves
    /// one signature verification per member on every message and commit).
    pub fn holder_of_checked_leaf(bytes: &[u8]) -> Option<(AccountId, DeviceId)> {
        if bytes.len() != CERTIFICATE_LEN || bytes.first() != Some(&CERTIFICATE_VERSION) {
            return None;
        }
        let account: [u8; 32] = bytes.get(1..33)?.try_into().ok()?;
        let device: [u8; 32] = bytes.get(33..65)?.try_into().ok()?;
        Some((AccountId(account), DeviceId(device)))
    }

    /// Checks an MLS leaf: `identity` is its BasicCredential identity,
    /// `signature_key` its signature public key. Returns the certificate
    /// when the identity is a valid certificate for that key.
    pub fn check_leaf(identity: &[u8], signature_key: &[u8]) -> Result<Self, CredentialError> {
        let cert = Self::decode(identity)?;
        if signature_key != cert.mls_key {
            return Err(CredentialError::KeyMismatch);
        }
        Ok(cert)
    }
}

/// Domain-separation label of a device revocation signature.
pub const REVOCATION_LABEL: &[u8] = b"hush device revocation v1\0";

/// Length of an encoded revocation: version, account, device, time,
/// signature.
pub const REVOCATION_LEN: usize = 1 + 32 + 32 + 8 + 64;

/// The account key's statement that a device is no longer its own.
///
/// Encoding (137 bytes): version `1`, account public key, device TLS key,
/// revocation time (Unix seconds, big-endian), then the account key's
/// Ed25519 signature over [`REVOCATION_LABEL`] followed by the 73 bytes
/// before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRevocation {
    pub account: AccountId,
    pub device: DeviceId,
    pub revoked_at: u64,
    signature: [u8; 64],
}

impl DeviceRevocation {
    fn signed(account: &AccountId, device: &DeviceId, revoked_at: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(REVOCATION_LEN - 64);
        out.push(CERTIFICATE_VERSION);
        out.extend_from_slice(&account.0);
        out.extend_from_slice(&device.0);
        out.extend_from_slice(&revoked_at.to_be_bytes());
        out
    }

    fn input(signed: &[u8]) -> Vec<u8> {
        [REVOCATION_LABEL, signed].concat()
    }

    /// Signs a revocation of `device` with the account key.
    pub fn issue(account: &Identity, device: DeviceId, revoked_at: u64) -> Self {
        let account_id = account.account_id();
        let signature = account.sign(&Self::input(&Self::signed(&account_id, &device, revoked_at)));
        Self { account: account_id, device, revoked_at, signature }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Self::signed(&self.account, &self.device, self.revoked_at);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes *and verifies* a revocation (strict Ed25519).
    pub fn decode(bytes: &[u8]) -> Result<Self, CredentialError> {
        if bytes.len() != REVOCATION_LEN {
            return Err(CredentialError::Malformed("wrong length"));
        }
        let (signed, signature) = bytes.split_at(REVOCATION_LEN - 64);
        if signed.first() != Some(&CERTIFICATE_VERSION) {
            return Err(CredentialError::Malformed("unknown version"));
        }
        let field = |at: usize| -> Result<[u8; 32], CredentialError> {
            signed.get(at..at + 32).and_then(|s| s.try_into().ok()).ok_or(CredentialError::Malformed("length"))
        };
        let (account, device) = (field(1)?, field(33)?);
        let revoked_at = signed
            .get(65..73)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map(u64::from_be_bytes)
            .ok_or(CredentialError::Malformed("length"))?;
        let signature: [u8; 64] = signature.try_into().map_err(|_| CredentialError::Malformed("length"))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&account).map_err(|_| CredentialError::BadSignature)?;
        key.verify_strict(&Self::input(signed), &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| CredentialError::BadSignature)?;
        Ok(Self { account: AccountId(account), device: DeviceId(device), revoked_at, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_verifies_only_as_signed_and_never_as_a_certificate() {
        let account = Identity::generate().unwrap();
        let r = DeviceRevocation::issue(&account, DeviceId([4; 32]), 77);
        let bytes = r.encode();
        assert_eq!(bytes.len(), REVOCATION_LEN);
        assert_eq!(DeviceRevocation::decode(&bytes).unwrap(), r);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(DeviceRevocation::decode(&bad).is_err(), "byte {i}");
        }
        assert!(DeviceCertificate::decode(&bytes).is_err());
        let cert = DeviceCertificate::issue(&account, DeviceId([4; 32]), [5; 32], 77).encode();
        assert!(DeviceRevocation::decode(&cert).is_err());
    }
    use proptest::prelude::*;

    fn sample() -> (Identity, DeviceCertificate) {
        let account = Identity::generate().unwrap();
        let cert = DeviceCertificate::issue(&account, DeviceId([7; 32]), [9; 32], 1_700_000_000);
        (account, cert)
    }

    #[test]
    fn issued_certificates_round_trip_and_verify() {
        let (account, cert) = sample();
        let bytes = cert.encode();
        assert_eq!(bytes.len(), CERTIFICATE_LEN);
        let back = DeviceCertificate::decode(&bytes).unwrap();
        assert_eq!(back, cert);
        assert_eq!(back.account, account.account_id());
        assert_eq!(DeviceCertificate::check_leaf(&bytes, &[9; 32]).unwrap(), cert);
        assert_eq!(DeviceCertificate::check_leaf(&bytes, &[8; 32]), Err(CredentialError::KeyMismatch));
    }

    #[test]
    fn any_changed_bit_breaks_the_certificate() {
        let (_, cert) = sample();
        let bytes = cert.encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(DeviceCertificate::decode(&b).is_err(), "bit {i} flipped still verifies");
        }
    }

    #[test]
    fn a_certificate_names_only_the_account_that_signed_it() {
        // Another account's key cannot vouch for a device of this account.
        let (_, cert) = sample();
        let forger = Identity::generate().unwrap();
        let forged = DeviceCertificate::issue(&forger, cert.device, cert.mls_key, cert.created_at);
        let mut bytes = forged.encode();
        bytes[1..33].copy_from_slice(&cert.account.0);
        assert_eq!(DeviceCertificate::decode(&bytes), Err(CredentialError::BadSignature));
    }

    #[test]
    fn the_unchecked_holder_is_what_the_certificate_names() {
        let (_, cert) = sample();
        assert_eq!(DeviceCertificate::holder_of_checked_leaf(&cert.encode()), Some((cert.account, cert.device)));
        assert_eq!(DeviceCertificate::holder_of_checked_leaf(&cert.encode()[1..]), None);
    }

    #[test]
    fn wrong_lengths_and_versions_are_refused() {
        let (_, cert) = sample();
        let bytes = cert.encode();
        for cut in 0..bytes.len() {
            assert!(DeviceCertificate::decode(&bytes[..cut]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(DeviceCertificate::decode(&long).is_err());
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(DeviceCertificate::decode(&v2), Err(CredentialError::Malformed("unknown version")));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DeviceCertificate::decode(&bytes);
        }
    }
}

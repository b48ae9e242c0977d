//! Certificates as hush uses them: wrappers around one Ed25519 key.
//!
//! hush does not use X.509 for trust. A certificate only carries a public
//! key through the TLS handshake; what is trusted is the key itself (the
//! server's by its pinned fingerprint, a client's as its account id), and
//! TLS 1.3's CertificateVerify proves the peer holds the private key.
//! So all hush reads of a certificate is its SubjectPublicKeyInfo, through
//! rustls-webpki's certificate parser (already in every build for rustls,
//! fuzzed and audited upstream, and stricter than a walker of our own: it
//! refuses trailing bytes, bad serials and unknown critical extensions),
//! and [`ed25519_key`] accepts only the one canonical Ed25519 SPKI.

use rcgen::{CertificateParams, KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use zeroize::Zeroizing;

/// Why a certificate was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("the certificate is not well-formed DER")]
    Malformed,
    #[error("the certificate's key is not an Ed25519 key")]
    NotEd25519,
    #[error("could not build a certificate: {0}")]
    Build(String),
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE,
/// AlgorithmIdentifier { id-Ed25519 }, BIT STRING of 33 bytes, 0 unused bits.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410 §7), followed by
/// the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The DER SubjectPublicKeyInfo of an X.509 certificate.
pub fn spki_of_certificate(cert: &[u8]) -> Result<Vec<u8>, CertError> {
    let der = CertificateDer::from(cert);
    let parsed = webpki::EndEntityCert::try_from(&der).map_err(|_| CertError::Malformed)?;
    Ok(parsed.subject_public_key_info().to_vec())
}

/// The raw Ed25519 public key of a SubjectPublicKeyInfo, or an error if it
/// is anything but the canonical Ed25519 encoding.
pub fn ed25519_key(spki: &[u8]) -> Result<[u8; 32], CertError> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..]).ok_or(CertError::NotEd25519)?;
    key.try_into().map_err(|_| CertError::NotEd25519)
}

/// The Ed25519 SubjectPublicKeyInfo for a raw public key.
pub fn ed25519_spki(key: &[u8; 32]) -> Vec<u8> {
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(key);
    spki
}

/// PKCS#8 encoding of an Ed25519 seed, in a buffer wiped on drop.
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    let mut der = Zeroizing::new(Vec::with_capacity(48));
    der.extend_from_slice(&ED25519_PKCS8_PREFIX);
    der.extend_from_slice(seed);
    der
}

/// A self-signed certificate for the Ed25519 key with this seed. The
/// certificate's names and dates carry no meaning for hush.
pub fn self_signed(seed: &[u8; 32]) -> Result<CertificateDer<'static>, CertError> {
    let pkcs8 = ed25519_pkcs8(seed);
    let der = PrivatePkcs8KeyDer::from(pkcs8.as_slice());
    let key =
        KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519).map_err(|e| CertError::Build(e.to_string()))?;
    let mut params = CertificateParams::new(vec!["hush".to_string()]).map_err(|e| CertError::Build(e.to_string()))?;
    // Fixed, far validity: hush never checks dates, and a fixed range keeps
    // certificates free of the local clock.
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(4000, 1, 1);
    let cert = params.self_signed(&key).map_err(|e| CertError::Build(e.to_string()))?;
    Ok(cert.der().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extracts_the_key_of_a_self_signed_certificate() {
        let seed = [7u8; 32];
        let cert = self_signed(&seed).unwrap();
        let spki = spki_of_certificate(&cert).unwrap();
        let key = ed25519_key(&spki).unwrap();
        let expected = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        assert_eq!(key, expected);
        assert_eq!(ed25519_spki(&key), spki);
    }

    #[test]
    fn refuses_other_key_types() {
        let ecdsa = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["x".into()]).unwrap().self_signed(&ecdsa).unwrap();
        let spki = spki_of_certificate(cert.der()).unwrap();
        assert_eq!(ed25519_key(&spki), Err(CertError::NotEd25519));
    }

    #[test]
    fn refuses_truncated_and_padded_certificates() {
        let cert = self_signed(&[1u8; 32]).unwrap().to_vec();
        for cut in 0..cert.len() {
            assert!(spki_of_certificate(&cert[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = cert.clone();
        long.push(0);
        assert!(spki_of_certificate(&long).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(spki) = spki_of_certificate(&bytes) {
                let _ = ed25519_key(&spki);
            }
        }
    }
}

//! The certificate handling of both TLS verifiers: extracting the
//! SubjectPublicKeyInfo never panics and returns no more than the input
//! held, and an accepted Ed25519 key re-encodes to exactly that SPKI.
#![no_main]
use hush::auth::cert::{ed25519_key, ed25519_spki, spki_of_certificate};
use hush::auth::tls::device_of_peer;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let account = device_of_peer(&[CertificateDer::from(data)]);
    match spki_of_certificate(data) {
        Ok(spki) => {
            assert!(spki.len() <= data.len());
            match ed25519_key(&spki) {
                Ok(key) => {
                    assert_eq!(ed25519_spki(&key), spki);
                    assert_eq!(account.map(|a| a.0), Some(key));
                }
                Err(_) => assert!(account.is_none()),
            }
        }
        Err(_) => assert!(account.is_none()),
    }
});

//! The server's online-key certificate (issue 35), as a client reads it
//! from the TLS handshake of any server it connects to: decoding and
//! checking never panic, a certificate that decodes re-encodes to the same
//! bytes, and nothing forged under a pinned identity nobody holds the key
//! of is ever accepted.
#![no_main]
use hush::auth::online::{check_server_key, OnlineCert};
use hush::auth::Fingerprint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = OnlineCert::decode(data) {
        assert_eq!(cert.encode(), data);
    }
    let pin = Fingerprint([7; 32]);
    let presented = data.get(40..72).and_then(|k| <[u8; 32]>::try_from(k).ok()).unwrap_or([9; 32]);
    assert!(check_server_key(&pin, &presented, &[data], 1_800_000_000).is_err(), "a forged online key was accepted");
});

//! Device certificates: decoding never panics, and whatever decodes (which
//! includes a verified signature) re-encodes to exactly the input and
//! certifies exactly its own MLS key.
#![no_main]
use hush::auth::DeviceCertificate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = DeviceCertificate::decode(data) {
        assert_eq!(cert.encode(), data);
        assert!(DeviceCertificate::check_leaf(data, &cert.mls_key).is_ok());
        let mut other = cert.mls_key;
        other[0] ^= 1;
        assert!(DeviceCertificate::check_leaf(data, &other).is_err());
    }
});

//! Device certificates and device revocations, the two statements an
//! account key signs: decoding never panics, whatever decodes (which
//! includes a verified signature) re-encodes to exactly the input, a
//! certificate certifies exactly its own MLS key, and no input is both.
#![no_main]
use hush::auth::{DeviceCertificate, DeviceRevocation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cert = DeviceCertificate::decode(data);
    if let Ok(cert) = &cert {
        assert_eq!(cert.encode(), data);
        assert!(DeviceCertificate::check_leaf(data, &cert.mls_key).is_ok());
        let mut other = cert.mls_key;
        other[0] ^= 1;
        assert!(DeviceCertificate::check_leaf(data, &other).is_err());
    }
    if let Ok(revocation) = DeviceRevocation::decode(data) {
        assert_eq!(revocation.encode(), data);
        assert!(cert.is_err(), "one signature taken as two statements");
    }
});

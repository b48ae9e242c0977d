//! KeyPackage upload validation: never panics, and never accepts a package
//! for an account other than the uploader.
#![no_main]
use hush::auth::AccountId;
use hush::delivery::mls::validate_key_package;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let uploader = AccountId([7; 32]);
    if let Ok(hash_ref) = validate_key_package(&crypto, data, &uploader) {
        assert!(!hash_ref.is_empty());
    }
});

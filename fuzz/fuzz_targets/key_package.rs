//! KeyPackage upload validation: never panics, and never accepts a package
//! for a device other than the uploader. The uploader here is an account
//! and device whose keys nobody holds, so every input must be refused:
//! accepting one would mean a certificate was forged.
#![no_main]
use hush::auth::{AccountId, DeviceId};
use hush::mls::validate_key_package;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let uploader = (AccountId([7; 32]), DeviceId([7; 32]));
    assert!(validate_key_package(&crypto, data, &uploader.0, &uploader.1).is_err(), "a forged KeyPackage was accepted");
});

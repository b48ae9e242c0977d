//! Request decoding: never panics; whatever decodes re-encodes to the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = hush::wire::Request::decode(data) {
        assert_eq!(req.encode().expect("decoded requests re-encode"), data);
    }
});

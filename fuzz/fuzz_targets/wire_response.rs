//! Response decoding (what a client does with a server's bytes): never
//! panics; whatever decodes re-encodes to the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = hush::wire::Response::decode(data) {
        assert_eq!(resp.encode().expect("decoded responses re-encode"), data);
    }
});

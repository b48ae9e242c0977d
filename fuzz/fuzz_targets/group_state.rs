//! Stored group-state rows: decoding never panics, and re-encoding a
//! decoded state decodes to the same entries.
#![no_main]
use hush::mls::{decode_state, encode_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = decode_state(data) {
        let bytes = encode_state(&state).expect("decoded states re-encode");
        let again = decode_state(&bytes).expect("encoded states decode");
        assert_eq!(*again.values.read().unwrap(), *state.values.read().unwrap());
    }
});

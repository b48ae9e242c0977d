//! Compacted JSON (group states): expanding never panics and stays under
//! its cap, and any text compacts and expands back to itself.
#![no_main]
use hush::compact::{compact, expand, MARK};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = expand(data, MAX) {
        assert!(text.len() <= MAX);
    }
    match compact(data) {
        Some(small) => assert_eq!(expand(&small, data.len()).expect("compacted text expands"), data),
        None => assert!(data.contains(&MARK)),
    }
});

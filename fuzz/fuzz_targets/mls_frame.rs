//! The server's reading of MLS framing from untrusted `MLSMessage` bytes:
//! never panics; what it accepts has a group id within limits and a kind
//! consistent with its wire format.
#![no_main]
use hush::delivery::mls::{frame, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = frame(data) {
        assert!(!f.group.is_empty() && f.group.len() <= hush::limits::MAX_GROUP_ID);
        assert!(matches!(f.kind, Kind::Application | Kind::Commit | Kind::Proposal));
    }
});

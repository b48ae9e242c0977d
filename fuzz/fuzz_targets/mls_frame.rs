//! The server's reading of MLS framing from untrusted `MLSMessage` bytes:
//! never panics; what it accepts has a group id within limits, the group
//! id and epoch the message itself carries, and a kind consistent with its
//! wire format (application data only encrypted, handshakes only public).
#![no_main]
use hush::mls::{frame, Kind};
use libfuzzer_sys::fuzz_target;
use openmls::prelude::ProtocolMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = frame(data) {
        assert!(!f.group.is_empty() && f.group.len() <= hush::limits::MAX_GROUP_ID);
        assert_eq!(f.group, f.message.group_id().as_slice());
        assert_eq!(f.epoch, f.message.epoch().as_u64());
        let private = matches!(f.message, ProtocolMessage::PrivateMessage(_));
        assert_eq!(f.kind == Kind::Application, private, "{:?} framed as {:?}", f.kind, private);
    }
});

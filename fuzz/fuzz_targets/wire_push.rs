//! Push-stream framing: a frame split off a buffer consumes exactly its
//! framed encoding, and push bodies round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(push) = hush::wire::Push::decode(data) {
        assert_eq!(push.encode().expect("decoded pushes re-encode"), data);
    }
    if let Ok(Some((push, used))) = hush::wire::decode_push_frame(data) {
        let framed = push.encode_framed().expect("decoded pushes re-encode");
        assert_eq!(framed.len(), used);
        assert_eq!(&framed[..], &data[..used]);
    }
});

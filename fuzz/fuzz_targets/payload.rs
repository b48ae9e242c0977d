//! Application payloads a member decrypted: whatever another member put in
//! a message, [`Payload::decode`] never panics, and what it accepts encodes
//! back to the same bytes when they were valid UTF-8 (a file message: to
//! one that decodes).
#![no_main]
use hush::client::payload::Payload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = Payload::decode(data) else { return };
    if let Payload::File(file) = &payload {
        // Binary fields and lossy text: checked in the `file_format` target.
        assert!(matches!(Payload::decode(&Payload::File(file.clone()).encode()), Ok(Payload::File(_))));
        return;
    }
    let utf8 = data.get(1..).is_some_and(|rest| std::str::from_utf8(rest).is_ok());
    if utf8 || matches!(payload, Payload::Revocation(_)) {
        assert_eq!(payload.encode(), data);
    }
});

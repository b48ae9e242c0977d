//! Wake-ups between nodes (PostgreSQL `NOTIFY` payloads, written by other
//! nodes, or by anyone who can write to the database): `Notice::decode`
//! never panics, and what it accepts encodes back to the same notice.
#![no_main]
use hush::pg::Notice;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some((node, notice)) = Notice::decode(text) else { return };
    assert_eq!(Notice::decode(&notice.encode(node)), Some((node, notice)));
});

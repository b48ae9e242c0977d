//! Wake-ups between nodes (PostgreSQL `NOTIFY` payloads, sent by other
//! nodes, or by any role that can connect to the database): `wake_up`
//! never panics, and what it accepts is exactly what `wake_up_text`
//! writes for it.
#![no_main]
use hush::pg::{wake_up, wake_up_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some((node, id)) = wake_up(text) else { return };
    assert_eq!(wake_up_text(node, id), text);
});

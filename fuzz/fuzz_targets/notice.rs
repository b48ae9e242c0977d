//! Wake-ups between nodes (PostgreSQL `NOTIFY` payloads, sent by other
//! nodes, or by any role that can connect to the database): `wake_up`
//! never panics, what it accepts is exactly what `wake_up_text` writes for
//! it under the deployment's key, what that writes is accepted, and no
//! other key's (or a changed) wake-up is.
#![no_main]
use std::sync::OnceLock;

use hush::auth::Identity;
use hush::db::pg::{wake_up, wake_up_text, WakeKey};
use libfuzzer_sys::fuzz_target;

/// The listening node's clock.
const NOW: u64 = 1_800_000_000;

fn key() -> &'static WakeKey {
    static KEY: OnceLock<WakeKey> = OnceLock::new();
    KEY.get_or_init(|| WakeKey::of(&Identity::generate().expect("a key")).expect("a wake-up key"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((node, n)) = wake_up(key(), text, NOW) {
            let at = text.split(':').nth(2).and_then(|t| t.parse().ok()).expect("a time");
            assert_eq!(wake_up_text(key(), node, n, at), text);
        }
    }
    // What a node writes for any node and number verifies, and only as it is.
    if let (Some(node), Some(n), Some(&flip)) = (data.get(..8), data.get(8..16), data.get(16)) {
        let node = u64::from_le_bytes(node.try_into().expect("8 bytes"));
        let n = i64::from_le_bytes(n.try_into().expect("8 bytes")) & i64::MAX;
        if n >= 1 {
            let text = wake_up_text(key(), node, n, NOW);
            assert_eq!(wake_up(key(), &text, NOW), Some((node, n)));
            let mut changed = text.clone().into_bytes();
            let at = usize::from(flip) % changed.len();
            changed[at] ^= 1;
            if let Ok(changed) = String::from_utf8(changed) {
                assert_eq!(wake_up(key(), &changed, NOW), None, "{changed}");
            }
        }
    }
});

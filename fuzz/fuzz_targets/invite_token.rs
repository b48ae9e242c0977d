//! Invite tokens: parsing never panics; a parsed token prints to text that
//! parses to the same id and secret.
#![no_main]
use hush::auth::InviteToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = text.parse::<InviteToken>() {
        let again: InviteToken = token.to_string().parse().expect("printed tokens parse");
        assert_eq!(again.id(), token.id());
        assert!(again.matches(&token.secret_hash()));
    }
});

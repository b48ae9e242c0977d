//! `hush://` addresses: parsing never panics, and what parses prints to
//! text that parses back to the same address.
#![no_main]
use hush::auth::HushAddress;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(addr) = text.parse::<HushAddress>() {
        let again: HushAddress = addr.to_string().parse().expect("printed addresses parse");
        assert_eq!(again, addr);
    }
    if let Ok(id) = text.parse::<hush::auth::AccountId>() {
        assert_eq!(id.to_string().parse::<hush::auth::AccountId>().expect("account ids round-trip"), id);
    }
});

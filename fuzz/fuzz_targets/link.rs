//! What comes through a device link: the code a person pastes, the bundle
//! a first device sealed (decoded after opening, so any bytes), and sealed
//! offers and bundles under a fixed code. Nothing panics; a bundle that
//! decodes re-encodes to the same bytes; garbage never opens; a group
//! state handed over (GroupInfo, tree, pending proposals) is checked
//! without panicking, as a new device checks it before its first join.
#![no_main]
use hush::client::link::{Bundle, LinkCode, LinkHandover};
use hush::client::mls::Descent;
use libfuzzer_sys::fuzz_target;

const CODE: &str = concat!(
    "hushlink://00000000000000000000000000@127.0.0.1:7443/#",
    "0000000000000000000000000000000000000000000000000000"
);

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(code) = text.parse::<LinkCode>() {
            let again: LinkCode = code.to_string().parse().expect("a code prints as it parses");
            assert_eq!(again.id(), code.id());
        }
    }
    if let Ok(bundle) = Bundle::decode(data) {
        assert_eq!(bundle.encode().expect("a decoded bundle encodes"), data);
        for g in &bundle.groups {
            if let Some(h) = &g.handover {
                let kept = h.encode().expect("a decoded state encodes");
                assert_eq!(LinkHandover::decode(&kept).as_ref(), Ok(h));
                let _ = Descent::from_handover(&g.id, &h.state);
            }
        }
    }
    let code: LinkCode = CODE.parse().expect("the fixed code parses");
    // Nothing but what was sealed under the code opens (a forgery would
    // have to guess the tag).
    assert!(code.open_offer(data).is_err());
    let _ = code.open_bundle(data);
});

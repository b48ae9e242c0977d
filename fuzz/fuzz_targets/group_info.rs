//! GroupInfo a server hands out for group repair: the client's rejoin
//! (GroupInfo decoding, its verification against the ratchet tree, the
//! certificate of every leaf) never panics on arbitrary bytes, and neither
//! does the server's reading of a stored GroupInfo. The input is a `u16`
//! length, that many bytes of GroupInfo `MLSMessage`, then the ratchet tree
//! (absent if empty). hush's group settings (the disappearing timer) are
//! read from the same bytes, raw and as the GroupInfo's group context
//! carries them, as the server and members read them.
#![no_main]
use hush::client::mls::Member;
use hush::mls::{check_context_extensions, parse_group_info, settings_of, GroupSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else { return };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (info, tree) = rest.split_at(len);
    if let Ok(s) = GroupSettings::decode(info) {
        assert_eq!(s.encode(), info, "settings decode only their own encoding");
    }
    let Ok(parsed) = parse_group_info(info) else { return };
    let _ = parsed.extensions().ratchet_tree().is_some();
    if let Ok(s) = check_context_extensions(parsed.group_context().extensions(), &[7; 32]) {
        assert_eq!(s, settings_of(parsed.group_context()));
    }
    let group = parsed.group_id().as_slice().to_vec();
    let (_, _, mut member) = Member::generate().expect("member");
    let tree = (!tree.is_empty()).then_some(tree);
    // A member with no leaf in that group never rejoins it.
    assert!(member.resync(&group, info, tree, None).is_err());
});

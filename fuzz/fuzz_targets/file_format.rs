//! The encrypted file format a member receives (issue 32): whatever a
//! member or the server sends, the blob layout, chunk opening, file
//! messages and received names never panic; a name is always safe to
//! create in a directory; a file message that decodes encodes to one that
//! decodes the same.
#![no_main]
use hush::files::{open_chunk, safe_name, FileKey, FileRef, Layout, MAX_SAVED_NAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, rest) = data.split_at(data.len().min(8));
    let mut n = [0u8; 8];
    n[..head.len()].copy_from_slice(head);
    let blob = u64::from_be_bytes(n);
    if let Some(layout) = Layout::of_blob(blob) {
        assert_eq!(layout.blob, blob);
        assert!(layout.chunks >= 1);
        let sum: u128 = (0..layout.chunks.min(4)).map(|i| layout.plain_len(i) as u128).sum();
        assert!(sum <= u128::from(layout.padded));
    }
    let key = FileKey(zeroize::Zeroizing::new([7u8; 32]));
    let mut chunk = rest.to_vec();
    let _ = open_chunk(&key, blob, blob % 2 == 0, &mut chunk);

    let name = String::from_utf8_lossy(rest);
    let safe = safe_name(&name);
    assert!(!safe.is_empty() && safe.len() <= MAX_SAVED_NAME + 17, "{safe:?}");
    assert!(!safe.contains(['/', '\\']) && !safe.chars().any(char::is_control), "{safe:?}");
    assert!(!safe.starts_with('.') && safe != "..", "{safe:?}");

    if let Some(file) = FileRef::decode(data) {
        // Text is read lossily (and cut to its cap when encoded): what
        // decodes always encodes to a message that decodes, the same one
        // when its text fits.
        let again = FileRef::decode(&file.encode()).expect("a decoded file message encodes to a valid one");
        if file.name.len() <= hush::files::MAX_FILE_NAME && file.media_type.len() <= hush::files::MAX_MEDIA_TYPE {
            assert_eq!(again, file);
        }
    }
});

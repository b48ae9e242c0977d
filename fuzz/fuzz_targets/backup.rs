//! Backup files (issue 34): a restore reads a file anyone could have
//! handed over. The contents decoder never panics, and what it accepts
//! re-encodes to something it reads back the same; the file reader never
//! panics on a header it refuses before deriving a key (arbitrary bytes
//! past a valid header would only spend Argon2id's cost on a tag check).
#![no_main]
use hush::client::backup::{open, Backup, MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Backup::decode(data) {
        let again = b.encode().expect("decoded backups re-encode");
        assert!(Backup::decode(&again).expect("and decode again") == b);
    }
    if data.len() < 60 || !data.starts_with(MAGIC) {
        assert!(open(data, b"fuzz passphrase").is_err());
    }
});

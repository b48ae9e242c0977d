//! Backup files and linked devices' history archives (issue 34): a restore
//! reads a file anyone could have handed over, and a new device reads an
//! archive a server could have altered (it is checked against the hash in
//! the sealed bundle first, but the decoder must hold on its own). The
//! decoders never panic, and what they accept re-encodes to something they
//! read back the same; the file reader never panics on a header it refuses
//! before deriving a key (arbitrary bytes past a valid header would only
//! spend Argon2id's cost on a tag check).
#![no_main]
use hush::client::backup::{open, Backup, MAGIC};
use hush::client::history::{Archive, HistoryRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Backup::decode(data) {
        let again = b.encode().expect("decoded backups re-encode");
        assert!(Backup::decode(&again).expect("and decode again") == b);
    }
    if let Ok(a) = Archive::decode(data) {
        let again = a.encode().expect("decoded archives re-encode");
        assert!(Archive::decode(&again).expect("and decode again") == a);
    }
    if let Ok(r) = HistoryRef::decode(data) {
        assert_eq!(&r.encode()[..], data);
    }
    if data.len() < 60 || !data.starts_with(MAGIC) {
        assert!(open(data, b"fuzz passphrase").is_err());
    }
});

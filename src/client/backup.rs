//! Encrypted backups (issue 34): what `hush backup` writes and `hush
//! restore` reads. Sans-IO: [`seal`] turns a [`Backup`] and a passphrase
//! into the file's bytes, [`open`] the other way.
//!
//! # Format (version 1)
//!
//! ```text
//! "HUSHBAK1"                      8 bytes, the magic
//! u32 memory_kib, u32 passes, u32 lanes   Argon2id's cost, as written
//! [u8; 16] salt                    random per backup
//! [u8; 12] nonce                   random per backup
//! ciphertext                       ChaCha20-Poly1305 of the payload under
//!                                  Argon2id(passphrase, salt), the header
//!                                  above as authenticated data
//! ```
//!
//! The payload ([`Backup::encode`]) holds the account key's seed, the
//! server's address, the person's name, contacts, device names, the
//! account-signed revocations this device knew, and per group its id,
//! name, whether the account is still in it, the epoch and transcript hash
//! this device had reached (a restored device never rejoins an older
//! state), its history lines and its file messages. Never the MLS state:
//! its epoch secrets and keys stay on the device they belong to; a
//! restored device joins each group anew.
//!
//! A wrong passphrase and a damaged file are the same failure (the AEAD's
//! tag); a file cut short or not a backup at all is told apart before any
//! key is derived. Every length is bounded ([`MAX_BACKUP`] and the
//! per-field limits), and the Argon2 cost a file asks for is bounded too,
//! so a crafted file cannot make `restore` allocate without limit.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use zeroize::Zeroizing;

use crate::auth::{AccountId, DeviceId};
use crate::client::local::{EntryKind, FileRow, HistoryRow, MAX_NAME};
use crate::files::FileRef;
use crate::wire::{DecodeError, EncodeError, Reader, Writer};

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"HUSHBAK1";

/// Largest backup file `restore` reads (and `backup` writes).
pub const MAX_BACKUP: usize = 512 * 1024 * 1024;

/// Argon2id's memory cost for new backups, in KiB (64 MiB).
pub const KDF_MEMORY_KIB: u32 = 64 * 1024;
/// Argon2id's passes for new backups.
pub const KDF_PASSES: u32 = 3;
/// Argon2id's lanes for new backups.
pub const KDF_LANES: u32 = 1;
/// The most memory a backup file may ask Argon2id for (1 GiB).
pub const MAX_KDF_MEMORY_KIB: u32 = 1024 * 1024;
/// The most passes a backup file may ask for.
pub const MAX_KDF_PASSES: u32 = 16;
/// The most lanes a backup file may ask for.
pub const MAX_KDF_LANES: u32 = 8;
/// The least memory a backup file may ask for (a weaker file is refused).
pub const MIN_KDF_MEMORY_KIB: u32 = 19 * 1024;

/// Shortest passphrase `backup` accepts.
pub const MIN_PASSPHRASE: usize = 8;

const SALT_LEN: usize = 16;
const HEADER_LEN: usize = 8 + 12 + SALT_LEN + NONCE_LEN;

/// Most entries of one list in a backup (contacts, groups, lines of one
/// group, ...).
const MAX_ENTRIES: usize = 10_000_000;
/// Longest text field (a history line, an address).
const MAX_TEXT: usize = 16 * 1024 * 1024;
/// Longest binary field (a group id, a revocation, a file message).
const MAX_FIELD: usize = 64 * 1024;

/// Everything a backup holds (see the module doc).
#[derive(Clone, PartialEq, Eq)]
pub struct Backup {
    pub account_key: Zeroizing<[u8; 32]>,
    /// The device that made the backup (the restored one names it, so it
    /// can revoke it).
    pub device: DeviceId,
    /// The pinned server's address (`hush://…`).
    pub server: String,
    pub name: Option<String>,
    pub contacts: Vec<(String, AccountId)>,
    pub device_names: Vec<(DeviceId, String)>,
    pub revocations: Vec<Vec<u8>>,
    pub groups: Vec<GroupBackup>,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup").field("groups", &self.groups.len()).finish_non_exhaustive()
    }
}

/// One group of a backup.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupBackup {
    pub id: Vec<u8>,
    pub name: Option<String>,
    /// False once the account left or was removed.
    pub active: bool,
    /// The epoch and transcript hash the backed-up device had reached.
    pub anchor: Option<(u64, Vec<u8>)>,
    pub history: Vec<HistoryRow>,
    pub files: Vec<FileRow>,
}

/// Why a backup file was refused. Nothing is written when one is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error("not a hush backup (it does not start with {MAGIC:?})")]
    NotABackup,
    #[error("the backup is cut short ({0} bytes)")]
    Truncated(usize),
    #[error("the backup is larger than {MAX_BACKUP} bytes")]
    TooLarge,
    #[error("the backup asks for a key derivation hush does not accept ({0})")]
    Kdf(String),
    #[error("wrong passphrase, or the backup was damaged or altered (it does not decrypt)")]
    Decrypt,
    #[error("the backup decrypts but its contents do not decode: {0}")]
    Contents(String),
    #[error("the passphrase must be at least {MIN_PASSPHRASE} characters")]
    WeakPassphrase,
    #[error("no randomness available")]
    Random,
    #[error("encoding the backup: {0}")]
    Encode(String),
}

impl From<DecodeError> for BackupError {
    fn from(e: DecodeError) -> Self {
        BackupError::Contents(e.to_string())
    }
}

impl From<EncodeError> for BackupError {
    fn from(e: EncodeError) -> Self {
        BackupError::Encode(e.to_string())
    }
}

/// Encrypts `backup` under `passphrase` (see the module doc).
pub fn seal(backup: &Backup, passphrase: &[u8]) -> Result<Vec<u8>, BackupError> {
    if passphrase.len() < MIN_PASSPHRASE {
        return Err(BackupError::WeakPassphrase);
    }
    let mut payload = Zeroizing::new(backup.encode()?);
    let rng = ring::rand::SystemRandom::new();
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&rng, &mut salt).map_err(|_| BackupError::Random)?;
    ring::rand::SecureRandom::fill(&rng, &mut nonce).map_err(|_| BackupError::Random)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 16);
    out.extend_from_slice(MAGIC);
    for v in [KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    let key = derive(passphrase, &salt, KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES)?;
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&out[..]), &mut payload)
        .map_err(|_| BackupError::Encode("sealing".into()))?;
    if out.len() + payload.len() + tag.as_ref().len() > MAX_BACKUP {
        return Err(BackupError::TooLarge);
    }
    out.extend_from_slice(&payload);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Decrypts and decodes a backup file's bytes.
pub fn open(bytes: &[u8], passphrase: &[u8]) -> Result<Backup, BackupError> {
    if bytes.len() > MAX_BACKUP {
        return Err(BackupError::TooLarge);
    }
    if bytes.len() < MAGIC.len() || !bytes.starts_with(MAGIC) {
        return Err(if MAGIC.starts_with(bytes) && !bytes.is_empty() {
            BackupError::Truncated(bytes.len())
        } else {
            BackupError::NotABackup
        });
    }
    if bytes.len() < HEADER_LEN + 16 {
        return Err(BackupError::Truncated(bytes.len()));
    }
    let (header, sealed) = bytes.split_at(HEADER_LEN);
    let mut r = Reader::new(header.get(8..).unwrap_or_default());
    let (memory, passes, lanes) = (r.u32()?, r.u32()?, r.u32()?);
    if !(MIN_KDF_MEMORY_KIB..=MAX_KDF_MEMORY_KIB).contains(&memory)
        || !(1..=MAX_KDF_PASSES).contains(&passes)
        || !(1..=MAX_KDF_LANES).contains(&lanes)
    {
        return Err(BackupError::Kdf(format!("{memory} KiB, {passes} passes, {lanes} lanes")));
    }
    let salt: [u8; SALT_LEN] = r.array()?;
    let nonce: [u8; NONCE_LEN] = r.array()?;
    let key = derive(passphrase, &salt, memory, passes, lanes)?;
    let mut buf = Zeroizing::new(sealed.to_vec());
    let plain = key
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut buf)
        .map_err(|_| BackupError::Decrypt)?;
    Backup::decode(plain)
}

/// Argon2id(passphrase, salt) as a ChaCha20-Poly1305 key.
fn derive(passphrase: &[u8], salt: &[u8], memory: u32, passes: u32, lanes: u32) -> Result<LessSafeKey, BackupError> {
    let params = argon2::Params::new(memory, passes, lanes, Some(32)).map_err(|e| BackupError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(passphrase, salt, key.as_mut()).map_err(|e| BackupError::Kdf(e.to_string()))?;
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, key.as_ref()).map_err(|_| BackupError::Kdf("key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

fn count(w: &mut Writer, n: usize) -> Result<(), BackupError> {
    if n > MAX_ENTRIES {
        return Err(BackupError::Encode(format!("{n} entries in one list")));
    }
    w.u32(u32::try_from(n).map_err(|_| BackupError::Encode("count".into()))?);
    Ok(())
}

fn read_count(r: &mut Reader<'_>) -> Result<usize, BackupError> {
    let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
    // Each entry takes at least a byte: no count past what is left.
    if n > MAX_ENTRIES || n > r.remaining() {
        return Err(BackupError::Contents(format!("a list of {n} entries")));
    }
    Ok(n)
}

fn text(w: &mut Writer, field: &'static str, s: &str) -> Result<(), BackupError> {
    Ok(w.bytes32(field, s.as_bytes(), MAX_TEXT)?)
}

fn read_text(r: &mut Reader<'_>, field: &'static str) -> Result<String, BackupError> {
    let b = r.bytes32(field, MAX_TEXT)?;
    String::from_utf8(b.to_vec()).map_err(|_| BackupError::Contents(format!("{field} is not UTF-8")))
}

fn opt_text(w: &mut Writer, field: &'static str, s: Option<&str>) -> Result<(), BackupError> {
    w.bool(s.is_some());
    if let Some(s) = s {
        text(w, field, s)?;
    }
    Ok(())
}

fn read_opt_text(r: &mut Reader<'_>, field: &'static str) -> Result<Option<String>, BackupError> {
    Ok(if r.bool(field)? { Some(read_text(r, field)?) } else { None })
}

fn opt_u64(w: &mut Writer, v: Option<u64>) {
    w.bool(v.is_some());
    if let Some(v) = v {
        w.u64(v);
    }
}

fn read_opt_u64(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, BackupError> {
    Ok(if r.bool(field)? { Some(r.u64()?) } else { None })
}

fn opt_account(w: &mut Writer, a: Option<&AccountId>) {
    w.bool(a.is_some());
    if let Some(a) = a {
        w.raw(&a.0);
    }
}

fn read_opt_account(r: &mut Reader<'_>) -> Result<Option<AccountId>, BackupError> {
    Ok(if r.bool("sender")? { Some(AccountId(r.array()?)) } else { None })
}

fn kind_byte(k: EntryKind) -> u8 {
    match k {
        EntryKind::Text => 1,
        EntryKind::Event => 2,
        EntryKind::Alarm => 3,
    }
}

/// Writes groups with their history and file messages (a backup's, and a
/// linked device's history archive: [`crate::client::history`]).
pub(crate) fn write_groups(w: &mut Writer, groups: &[GroupBackup]) -> Result<(), BackupError> {
    count(w, groups.len())?;
    for g in groups {
        w.bytes32("group id", &g.id, MAX_FIELD)?;
        opt_text(w, "group name", g.name.as_deref())?;
        w.bool(g.active);
        w.bool(g.anchor.is_some());
        if let Some((epoch, transcript)) = &g.anchor {
            w.u64(*epoch);
            w.bytes32("transcript", transcript, MAX_FIELD)?;
        }
        count(w, g.history.len())?;
        for h in &g.history {
            w.u64(h.seq);
            opt_account(w, h.sender.as_ref());
            w.u8(kind_byte(h.kind));
            text(w, "line", &h.body)?;
            w.u64(h.time);
            opt_u64(w, h.expires);
        }
        count(w, g.files.len())?;
        for f in &g.files {
            w.u64(f.seq);
            opt_account(w, f.sender.as_ref());
            let encoded = Zeroizing::new(f.file.encode());
            w.bytes32("file", &encoded, MAX_FIELD)?;
            w.u64(f.time);
            opt_u64(w, f.expires);
        }
    }
    Ok(())
}

/// Reads what [`write_groups`] wrote.
pub(crate) fn read_groups(r: &mut Reader<'_>) -> Result<Vec<GroupBackup>, BackupError> {
    let mut groups = Vec::new();
    for _ in 0..read_count(r)? {
        let id = r.bytes32("group id", MAX_FIELD)?.to_vec();
        let name = read_opt_text(r, "group name")?;
        let active = r.bool("active")?;
        let anchor =
            if r.bool("anchor")? { Some((r.u64()?, r.bytes32("transcript", MAX_FIELD)?.to_vec())) } else { None };
        let mut history = Vec::new();
        for _ in 0..read_count(r)? {
            let seq = r.u64()?;
            let sender = read_opt_account(r)?;
            let kind = match r.u8()? {
                1 => EntryKind::Text,
                2 => EntryKind::Event,
                3 => EntryKind::Alarm,
                _ => return Err(BackupError::Contents("a history line of unknown kind".into())),
            };
            let body = read_text(r, "line")?;
            let time = r.u64()?;
            let expires = read_opt_u64(r, "expires")?;
            history.push(HistoryRow { seq, sender, kind, body, time, expires, imported: false });
        }
        let mut files = Vec::new();
        for _ in 0..read_count(r)? {
            let seq = r.u64()?;
            let sender = read_opt_account(r)?;
            let file = FileRef::decode(r.bytes32("file", MAX_FIELD)?)
                .ok_or_else(|| BackupError::Contents("a file message that does not decode".into()))?;
            let time = r.u64()?;
            let expires = read_opt_u64(r, "expires")?;
            files.push(FileRow { seq, sender, file, time, expires });
        }
        groups.push(GroupBackup { id, name, active, anchor, history, files });
    }
    Ok(groups)
}

impl Backup {
    /// The payload's bytes (before encryption).
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        let mut w = Writer::new();
        w.raw(self.account_key.as_ref());
        w.raw(&self.device.0);
        text(&mut w, "server", &self.server)?;
        opt_text(&mut w, "name", self.name.as_deref())?;
        count(&mut w, self.contacts.len())?;
        for (name, account) in &self.contacts {
            text(&mut w, "contact", name)?;
            w.raw(&account.0);
        }
        count(&mut w, self.device_names.len())?;
        for (device, name) in &self.device_names {
            w.raw(&device.0);
            text(&mut w, "device name", name)?;
        }
        count(&mut w, self.revocations.len())?;
        for r in &self.revocations {
            w.bytes32("revocation", r, MAX_FIELD)?;
        }
        write_groups(&mut w, &self.groups)?;
        Ok(w.into_inner())
    }

    /// Reads [`Backup::encode`]'s bytes, refusing anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, BackupError> {
        let mut r = Reader::new(bytes);
        let account_key = Zeroizing::new(r.array::<32>()?);
        let device = DeviceId(r.array()?);
        let server = read_text(&mut r, "server")?;
        let name = read_opt_text(&mut r, "name")?.filter(|n| n.len() <= MAX_NAME);
        let mut contacts = Vec::new();
        for _ in 0..read_count(&mut r)? {
            let name = read_text(&mut r, "contact")?;
            contacts.push((name, AccountId(r.array()?)));
        }
        let mut device_names = Vec::new();
        for _ in 0..read_count(&mut r)? {
            let device = DeviceId(r.array()?);
            device_names.push((device, read_text(&mut r, "device name")?));
        }
        let mut revocations = Vec::new();
        for _ in 0..read_count(&mut r)? {
            revocations.push(r.bytes32("revocation", MAX_FIELD)?.to_vec());
        }
        let groups = read_groups(&mut r)?;
        r.finish()?;
        Ok(Self { account_key, device, server, name, contacts, device_names, revocations, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backup {
        let file = FileRef {
            id: [1; 16],
            key: [2; 32],
            hash: [3; 32],
            size: 10,
            name: "a.txt".into(),
            media_type: "text/plain".into(),
            caption: String::new(),
        };
        Backup {
            account_key: Zeroizing::new([7; 32]),
            device: DeviceId([3; 32]),
            server: "hush://127.0.0.1:7443/#x".into(),
            name: Some("alice".into()),
            contacts: vec![("bob".into(), AccountId([4; 32]))],
            device_names: vec![(DeviceId([5; 32]), "laptop".into())],
            revocations: vec![vec![9; 100]],
            groups: vec![GroupBackup {
                id: vec![6; 32],
                name: Some("team".into()),
                active: true,
                anchor: Some((4, vec![8; 32])),
                history: vec![HistoryRow {
                    seq: 3,
                    sender: Some(AccountId([4; 32])),
                    kind: EntryKind::Text,
                    body: "hello".into(),
                    time: 99,
                    expires: None,
                    imported: false,
                }],
                files: vec![FileRow { seq: 4, sender: None, file, time: 100, expires: Some(200) }],
            }],
        }
    }

    #[test]
    fn a_backup_opens_with_its_passphrase_and_nothing_else() {
        let b = sample();
        let sealed = seal(&b, b"correct horse").unwrap();
        assert_eq!(open(&sealed, b"correct horse").unwrap(), b);
        assert_eq!(open(&sealed, b"correct horsf").unwrap_err(), BackupError::Decrypt);
        // Any byte flipped, header or body: refused.
        for at in [0, 9, 20, 30, HEADER_LEN + 1, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(open(&bad, b"correct horse").is_err(), "byte {at}");
        }
        // Cut short anywhere.
        for len in [0, 4, 8, HEADER_LEN, sealed.len() - 1] {
            assert!(open(&sealed[..len], b"correct horse").is_err(), "{len} bytes");
        }
        assert_eq!(open(b"PK\x03\x04 a zip file", b"x").unwrap_err(), BackupError::NotABackup);
        assert_eq!(seal(&b, b"short").unwrap_err(), BackupError::WeakPassphrase);
        // Two backups of the same data share nothing (salt, nonce).
        assert_ne!(seal(&b, b"correct horse").unwrap()[20..], sealed[20..]);
    }

    #[test]
    fn a_file_asking_for_an_unbounded_key_derivation_is_refused_before_deriving() {
        let sealed = seal(&sample(), b"correct horse").unwrap();
        let mut greedy = sealed.clone();
        greedy[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(open(&greedy, b"correct horse"), Err(BackupError::Kdf(_))));
        let mut weak = sealed;
        weak[8..12].copy_from_slice(&8u32.to_be_bytes());
        assert!(matches!(open(&weak, b"correct horse"), Err(BackupError::Kdf(_))));
    }

    #[test]
    fn contents_decode_strictly() {
        let bytes = sample().encode().unwrap();
        assert_eq!(Backup::decode(&bytes).unwrap(), sample());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Backup::decode(&trailing).is_err());
        for len in 0..bytes.len() {
            assert!(Backup::decode(&bytes[..len]).is_err(), "{len}");
        }
    }
}

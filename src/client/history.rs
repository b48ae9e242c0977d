//! History for a linked device (issue 34): what `hush device add --history`
//! hands the new device, sans-IO.
//!
//! The first device packs its history lines and file messages, per group
//! (whatever the group's disappearing timer already deleted is not there;
//! what it has not deleted yet keeps its expiry, so the new device deletes
//! it on time), into an [`Archive`]. The archive is encrypted exactly as a
//! file is ([`crate::files`]: a fresh random key, chunked
//! ChaCha20-Poly1305, padded to a Padmé bucket) and uploaded as a blob to a
//! group of the account; the blob's id, key, SHA-256 and size
//! ([`HistoryRef`]) go to the new device inside the link's sealed bundle
//! ([`crate::client::link::Bundle`]), and within it sealed once more
//! ([`SealedHistory`]) to an ephemeral X25519 key the new device put in
//! its offer and forgets once the history is in: whoever later holds the
//! link code and a copy of the bundle (the operator keeps both, a shell's
//! history keeps the code) still cannot open the history. The server
//! stores a blob it cannot read or alter undetected, of a size it learns
//! only to the bucket.
//!
//! # Archive (version 1)
//!
//! ```text
//! "HUSHHIS1"     8 bytes, the magic
//! u64 created    when it was packed (Unix seconds)
//! groups         as in a backup (crate::client::backup's group codec):
//!                id, name, still a member, lines, file messages
//! ```

use std::str::FromStr;
use std::time::Duration;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::Zeroizing;

use crate::client::backup::{read_groups, write_groups, BackupError, GroupBackup};
use crate::wire::{DecodeError, Reader, Writer};

/// The first bytes of every history archive.
pub const MAGIC: &[u8; 8] = b"HUSHHIS1";

/// Largest history archive a device packs or accepts (its plaintext).
pub const MAX_HISTORY: u64 = 512 * 1024 * 1024;

/// A packed history (see the module doc).
#[derive(Clone, PartialEq, Eq)]
pub struct Archive {
    pub created: u64,
    pub groups: Vec<GroupBackup>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive").field("groups", &self.groups.len()).finish_non_exhaustive()
    }
}

impl Archive {
    /// History lines and file messages in it.
    pub fn counts(&self) -> (usize, usize) {
        self.groups.iter().fold((0, 0), |(l, f), g| (l + g.history.len(), f + g.files.len()))
    }

    /// The archive's bytes (before encryption).
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, BackupError> {
        let mut w = Writer::new();
        w.raw(MAGIC);
        w.u64(self.created);
        write_groups(&mut w, &self.groups)?;
        let bytes = Zeroizing::new(w.into_inner());
        if bytes.len() as u64 > MAX_HISTORY {
            return Err(BackupError::Encode(format!(
                "the history is larger than {} MiB; hand over less of it (--history 30d, say)",
                MAX_HISTORY / (1024 * 1024)
            )));
        }
        Ok(bytes)
    }

    /// Reads [`Archive::encode`]'s bytes, refusing anything else. Never
    /// panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, BackupError> {
        if bytes.len() as u64 > MAX_HISTORY {
            return Err(BackupError::TooLarge);
        }
        let mut r = Reader::new(bytes);
        if r.array::<8>()? != *MAGIC {
            return Err(BackupError::Contents("not a history archive".into()));
        }
        let created = r.u64()?;
        let groups = read_groups(&mut r)?;
        r.finish()?;
        Ok(Self { created, groups })
    }
}

/// Where the new device finds the history, and how it opens and checks it:
/// the blob's id, its key, the SHA-256 of the whole blob and the archive's
/// size. Travels only inside the sealed bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct HistoryRef {
    pub id: [u8; 16],
    pub key: Zeroizing<[u8; 32]>,
    pub hash: [u8; 32],
    pub size: u64,
}

impl std::fmt::Debug for HistoryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryRef").field("size", &self.size).finish_non_exhaustive()
    }
}

/// Bytes of an encoded [`HistoryRef`].
pub const HISTORY_REF_LEN: usize = 16 + 32 + 32 + 8;

impl HistoryRef {
    pub fn write(&self, w: &mut Writer) {
        w.raw(&self.id);
        w.raw(self.key.as_ref());
        w.raw(&self.hash);
        w.u64(self.size);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = r.array()?;
        let key = Zeroizing::new(r.array()?);
        let hash = r.array()?;
        let size = r.u64()?;
        if size > MAX_HISTORY {
            return Err(DecodeError::Invalid("history size"));
        }
        Ok(Self { id, key, hash, size })
    }

    /// As a device keeps it until the history is in.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::new();
        self.write(&mut w);
        Zeroizing::new(w.into_inner())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let h = Self::read(&mut r)?;
        r.finish()?;
        Ok(h)
    }

    /// As a file reference, to fetch it the way files are fetched.
    pub fn as_file(&self) -> crate::files::FileRef {
        crate::files::FileRef {
            id: self.id,
            key: *self.key,
            hash: self.hash,
            size: self.size,
            name: "history".into(),
            media_type: "application/octet-stream".into(),
            caption: String::new(),
        }
    }
}

/// A [`HistoryRef`] sealed to the new device's ephemeral key: the first
/// device's ephemeral X25519 public key, then the reference under
/// ChaCha20-Poly1305 with the key HKDF-SHA-256 derives from the two
/// keys' agreement (the link id and both public keys as its info).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedHistory {
    pub ephemeral: [u8; 32],
    pub sealed: [u8; SEALED_REF_LEN],
}

impl std::fmt::Debug for SealedHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedHistory(..)")
    }
}

/// Bytes of a sealed reference: the reference and the AEAD's tag.
pub const SEALED_REF_LEN: usize = HISTORY_REF_LEN + 16;

const SEAL_LABEL: &[u8] = b"hush history seal v1";

/// Why a history reference could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no randomness available")]
    Random,
    #[error("the history was sealed to another key (an earlier attempt of this join?)")]
    Open,
}

/// The new device's half: an ephemeral X25519 key, its public half for the
/// offer.
pub fn ephemeral_key() -> Result<(ring::agreement::EphemeralPrivateKey, [u8; 32]), SealError> {
    let rng = ring::rand::SystemRandom::new();
    let private = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
        .map_err(|_| SealError::Random)?;
    let public = private.compute_public_key().map_err(|_| SealError::Random)?;
    let public: [u8; 32] = public.as_ref().try_into().map_err(|_| SealError::Random)?;
    Ok((private, public))
}

/// The AEAD key both devices derive from their agreement.
fn sealing_key(shared: &[u8], link: &[u8; 16], first: &[u8; 32], new: &[u8; 32]) -> Result<LessSafeKey, SealError> {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SEAL_LABEL).extract(shared);
    let info = [&link[..], &first[..], &new[..]];
    let okm = prk.expand(&info, &CHACHA20_POLY1305).map_err(|_| SealError::Open)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

impl SealedHistory {
    /// The first device seals `history` to `new_device_key` (from the
    /// offer), for the link `link`.
    pub fn seal(history: &HistoryRef, new_device_key: &[u8; 32], link: &[u8; 16]) -> Result<Self, SealError> {
        let (mine, ephemeral) = ephemeral_key()?;
        let peer = ring::agreement::UnparsedPublicKey::new(&ring::agreement::X25519, *new_device_key);
        let key = ring::agreement::agree_ephemeral(mine, &peer, |shared| {
            sealing_key(shared, link, &ephemeral, new_device_key)
        })
        .map_err(|_| SealError::Open)??;
        let mut buf = history.encode();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(link), &mut *buf)
            .map_err(|_| SealError::Open)?;
        let sealed: [u8; SEALED_REF_LEN] = buf.as_slice().try_into().map_err(|_| SealError::Open)?;
        Ok(Self { ephemeral, sealed })
    }

    /// The new device opens it with the ephemeral key it offered (used
    /// once, then gone).
    pub fn open(
        &self,
        mine: ring::agreement::EphemeralPrivateKey,
        my_public: &[u8; 32],
        link: &[u8; 16],
    ) -> Result<HistoryRef, SealError> {
        let peer = ring::agreement::UnparsedPublicKey::new(&ring::agreement::X25519, self.ephemeral);
        let key = ring::agreement::agree_ephemeral(mine, &peer, |shared| {
            sealing_key(shared, link, &self.ephemeral, my_public)
        })
        .map_err(|_| SealError::Open)??;
        let mut buf = Zeroizing::new(self.sealed.to_vec());
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(link), &mut buf)
            .map_err(|_| SealError::Open)?;
        HistoryRef::decode(plain).map_err(|_| SealError::Open)
    }

    pub fn write(&self, w: &mut Writer) {
        w.raw(&self.ephemeral);
        w.raw(&self.sealed);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self { ephemeral: r.array()?, sealed: r.array()? })
    }
}

/// How much history `hush device add` hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryChoice {
    /// Everything this device still holds.
    #[default]
    All,
    /// Nothing: the new device starts empty.
    None,
    /// What this device recorded in the last this long.
    Since(Duration),
}

/// A `--history` value that is none of `all`, `none` or a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--history takes all, none or a duration such as 30d or 12h ({0})")]
pub struct HistoryChoiceError(pub String);

impl FromStr for HistoryChoice {
    type Err = HistoryChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => Ok(Self::All),
            "none" => Ok(Self::None),
            other => crate::util::parse_duration(other).map(Self::Since).map_err(|e| HistoryChoiceError(e.to_string())),
        }
    }
}

impl HistoryChoice {
    /// Whether a line recorded at `time` goes in, at `now`.
    pub fn keeps(self, time: u64, now: u64) -> bool {
        match self {
            Self::All => true,
            Self::None => false,
            Self::Since(d) => time >= now.saturating_sub(d.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AccountId;
    use crate::client::local::{EntryKind, HistoryRow};

    fn sample() -> Archive {
        Archive {
            created: 77,
            groups: vec![GroupBackup {
                id: vec![6; 32],
                name: Some("team".into()),
                active: true,
                anchor: None,
                history: vec![HistoryRow {
                    seq: 3,
                    sender: Some(AccountId([4; 32])),
                    kind: EntryKind::Text,
                    body: "hello".into(),
                    time: 99,
                    expires: Some(1000),
                    imported: false,
                }],
                files: vec![],
            }],
        }
    }

    #[test]
    fn archives_and_references_round_trip_and_decode_strictly() {
        let bytes = sample().encode().unwrap();
        assert_eq!(Archive::decode(&bytes).unwrap(), sample());
        assert_eq!(sample().counts(), (1, 0));
        for len in 0..bytes.len() {
            assert!(Archive::decode(&bytes[..len]).is_err(), "{len}");
        }
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert!(Archive::decode(&trailing).is_err());
        let mut magic = bytes.to_vec();
        magic[0] ^= 1;
        assert!(Archive::decode(&magic).is_err());

        let r = HistoryRef { id: [1; 16], key: Zeroizing::new([2; 32]), hash: [3; 32], size: 4096 };
        let enc = r.encode();
        assert_eq!(enc.len(), HISTORY_REF_LEN);
        assert_eq!(HistoryRef::decode(&enc).unwrap(), r);
        assert!(!format!("{r:?}").contains("2, 2"), "the key is never printed");
        let huge = HistoryRef { size: MAX_HISTORY + 1, ..r };
        assert!(HistoryRef::decode(&huge.encode()).is_err());
    }

    /// Red team (issue 34): the history's key was in the bundle, sealed
    /// only under the link code, so the code (a shell's history) and a
    /// kept copy of the bundle (the operator) opened it long after. It is
    /// sealed to an ephemeral key only the new device's process held.
    #[test]
    fn a_sealed_reference_opens_only_with_the_offered_ephemeral_key() {
        let r = HistoryRef { id: [1; 16], key: Zeroizing::new([2; 32]), hash: [3; 32], size: 4096 };
        let link = [9u8; 16];
        let (secret, public) = ephemeral_key().unwrap();
        let sealed = SealedHistory::seal(&r, &public, &link).unwrap();
        assert!(!sealed.sealed.windows(32).any(|w| w == [2; 32]), "the key shows");
        // Another key, another link: nothing.
        let (other, other_public) = ephemeral_key().unwrap();
        assert_eq!(sealed.open(other, &other_public, &link), Err(SealError::Open));
        let (again, _) = ephemeral_key().unwrap();
        assert_eq!(sealed.open(again, &public, &link), Err(SealError::Open));
        let mut w = Writer::new();
        sealed.write(&mut w);
        let bytes = w.into_inner();
        assert_eq!(SealedHistory::read(&mut Reader::new(&bytes)).unwrap(), sealed);
        // The offered key opens it, once (the key is gone after).
        assert_eq!(sealed.open(secret, &public, &[8; 16]), Err(SealError::Open));
        let (secret, public) = ephemeral_key().unwrap();
        let sealed = SealedHistory::seal(&r, &public, &link).unwrap();
        assert_eq!(sealed.open(secret, &public, &link).unwrap(), r);
    }

    #[test]
    fn choices_parse_and_filter() {
        assert_eq!("all".parse::<HistoryChoice>().unwrap(), HistoryChoice::All);
        assert_eq!("none".parse::<HistoryChoice>().unwrap(), HistoryChoice::None);
        assert_eq!("7d".parse::<HistoryChoice>().unwrap(), HistoryChoice::Since(Duration::from_secs(7 * 86400)));
        assert!("sometimes".parse::<HistoryChoice>().is_err());
        let day = HistoryChoice::Since(Duration::from_secs(86400));
        assert!(day.keeps(100_000, 100_000 + 86_400));
        assert!(!day.keeps(99_999, 100_000 + 86_400));
        assert!(HistoryChoice::All.keeps(0, u64::MAX));
        assert!(!HistoryChoice::None.keeps(5, 5));
    }
}

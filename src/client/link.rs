//! Linking a device, the clients' half (the server's is
//! [`crate::delivery`]'s `links` module, which relays ciphertext only).
//!
//! A **link code** is `hushlink://SECRET@HOST:PORT/#FINGERPRINT`: the
//! server's address (pinned as in `hush://`) and a 128-bit one-time secret.
//! From the secret both devices derive, with HKDF-SHA-256:
//!
//! * the link id the server knows the link by (SHA-256 of a label and the
//!   secret, first 16 bytes; the server never sees the secret);
//! * the key that seals the new device's **offer** (its TLS and MLS public
//!   keys) for the first device;
//! * the key that seals the first device's **bundle** (the account id, the
//!   person's name, contacts, group names, and each group's state as the
//!   first device holds it) for the new device.
//!
//! Both are ChaCha20-Poly1305 with the link id as associated data. A
//! message can be sealed more than once under one code (a retried
//! `hush device join` seals a new offer, a retried answer a new bundle), so
//! every sealed message starts with [`SEAL_SALT`] fresh random bytes that
//! go into its key's derivation: no two messages share a key, and the
//! fixed nonce is never used twice under one key (issue 29). Whoever holds
//! the code is trusted with the account, as whoever holds the first device
//! is: the code is shown once, expires within minutes and works once.

use std::fmt;
use std::str::FromStr;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::auth::device::REVOCATION_LEN;
use crate::auth::{text, AccountId, DeviceId, HushAddress};
use crate::client::history::SealedHistory;
use crate::client::local::MAX_NAME;
use crate::client::mls::Handover;
use crate::limits::{MAX_GROUPS_LISTED, MAX_GROUP_ID, MAX_HANDOVER_PROPOSALS, MAX_LINK_BUNDLE, MAX_MLS_MESSAGE};
use crate::wire::{DecodeError, EncodeError, Reader, Writer};

/// Scheme of a link code.
pub const SCHEME: &str = "hushlink://";

/// Contacts one bundle carries at most.
pub const MAX_BUNDLE_CONTACTS: usize = 1000;

const ID_LABEL: &[u8] = b"hush link id v1\0";
const SALT: &[u8] = b"hush link v1";
const OFFER_KEY: &[u8] = b"offer";
const BUNDLE_KEY: &[u8] = b"bundle";
/// Offer plaintext: device TLS key, MLS signature key (a device older than
/// history hand-over offers only these).
const OFFER_LEN: usize = 64;

/// Offer plaintext with the ephemeral X25519 key the history is sealed to
/// ([`crate::client::history::SealedHistory`]).
const OFFER_WITH_HISTORY_LEN: usize = 96;

/// What a new device offers through the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub device: DeviceId,
    pub mls_key: [u8; 32],
    /// The ephemeral X25519 key to seal the history to (`None`: a device
    /// that cannot take history).
    pub history_key: Option<[u8; 32]>,
}
/// Fresh random bytes in front of every sealed message, from which (with
/// the secret and the message's label) its key is derived.
pub const SEAL_SALT: usize = 16;

/// What sealing adds to a message: the salt and the AEAD's tag.
pub const SEAL_OVERHEAD: usize = SEAL_SALT + 16;

/// Why a link code or what came through the link was not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("a link code looks like {SCHEME}SECRET@HOST:PORT/#FINGERPRINT")]
    Format,
    #[error("the link code's secret is damaged: {0}")]
    Secret(String),
    #[error("the link code's server address: {0}")]
    Address(String),
    #[error("no randomness available from the operating system")]
    Random,
    #[error("what came through the link does not open with this code: someone without the code took part; nothing was certified or kept")]
    Sealed,
    #[error("what came through the link is malformed: {0}")]
    Malformed(String),
    #[error("the account's contacts and groups do not fit one link ({0})")]
    TooLarge(String),
}

/// A one-time link code (see the module doc).
#[derive(Clone)]
pub struct LinkCode {
    pub server: HushAddress,
    secret: Zeroizing<[u8; 16]>,
}

impl fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkCode").field("server", &self.server).finish_non_exhaustive()
    }
}

impl fmt::Display for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = self.server.to_string();
        let rest = address.strip_prefix("hush://").unwrap_or(&address);
        write!(f, "{SCHEME}{}@{rest}", text::encode(&self.secret[..]))
    }
}

impl FromStr for LinkCode {
    type Err = LinkError;

    fn from_str(s: &str) -> Result<Self, LinkError> {
        let rest = s.trim().strip_prefix(SCHEME).ok_or(LinkError::Format)?;
        let (secret, address) = rest.split_once('@').ok_or(LinkError::Format)?;
        let secret = text::decode_array::<16>(secret).map_err(|e| LinkError::Secret(e.to_string()))?;
        let server: HushAddress = format!("hush://{address}")
            .parse()
            .map_err(|e: crate::auth::AddressError| LinkError::Address(e.to_string()))?;
        Ok(Self { server, secret: Zeroizing::new(secret) })
    }
}

impl LinkCode {
    /// A fresh code for `server`.
    pub fn generate(server: HushAddress) -> Result<Self, LinkError> {
        let mut secret = Zeroizing::new([0u8; 16]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret[..])
            .map_err(|_| LinkError::Random)?;
        Ok(Self { server, secret })
    }

    /// What the server knows the link by.
    pub fn id(&self) -> [u8; 16] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &[ID_LABEL, &self.secret[..]].concat());
        let mut id = [0u8; 16];
        for (out, byte) in id.iter_mut().zip(digest.as_ref()) {
            *out = *byte;
        }
        id
    }

    /// The key of one sealed message: from the secret, the message's
    /// label and its own random `salt`.
    fn key(&self, label: &[u8], salt: &[u8; SEAL_SALT]) -> Result<LessSafeKey, LinkError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(&self.secret[..]);
        let info = [label, &salt[..]];
        let okm = prk.expand(&info, &CHACHA20_POLY1305).map_err(|_| LinkError::Sealed)?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// `salt || ciphertext || tag`, the salt fresh: each key seals one
    /// message, so the zero nonce is unique for its key.
    fn seal(&self, label: &[u8], plain: Vec<u8>) -> Result<Vec<u8>, LinkError> {
        let mut salt = [0u8; SEAL_SALT];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).map_err(|_| LinkError::Random)?;
        let mut body = plain;
        let nonce = Nonce::assume_unique_for_key([0; 12]);
        self.key(label, &salt)?
            .seal_in_place_append_tag(nonce, Aad::from(self.id()), &mut body)
            .map_err(|_| LinkError::Sealed)?;
        let mut sealed = Vec::with_capacity(SEAL_SALT + body.len());
        sealed.extend_from_slice(&salt);
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    fn open(&self, label: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, LinkError> {
        let (salt, body) = sealed.split_at_checked(SEAL_SALT).ok_or(LinkError::Sealed)?;
        let salt: &[u8; SEAL_SALT] = salt.try_into().map_err(|_| LinkError::Sealed)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let nonce = Nonce::assume_unique_for_key([0; 12]);
        let len = self
            .key(label, salt)?
            .open_in_place(nonce, Aad::from(self.id()), &mut buf)
            .map_err(|_| LinkError::Sealed)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// The new device's offer: its TLS key, MLS signature key and the
    /// ephemeral key its history is to be sealed to.
    pub fn seal_offer(&self, offer: &Offer) -> Result<Vec<u8>, LinkError> {
        let mut plain = [&offer.device.0[..], &offer.mls_key[..]].concat();
        if let Some(key) = &offer.history_key {
            plain.extend_from_slice(key);
        }
        self.seal(OFFER_KEY, plain)
    }

    pub fn open_offer(&self, sealed: &[u8]) -> Result<Offer, LinkError> {
        let plain = self.open(OFFER_KEY, sealed)?;
        if plain.len() != OFFER_LEN && plain.len() != OFFER_WITH_HISTORY_LEN {
            return Err(LinkError::Malformed("the offer is not two or three keys".into()));
        }
        let key = |at: usize| -> Result<[u8; 32], LinkError> {
            plain.get(at..at + 32).and_then(|k| k.try_into().ok()).ok_or(LinkError::Malformed("offer".into()))
        };
        let history_key = if plain.len() == OFFER_WITH_HISTORY_LEN { Some(key(64)?) } else { None };
        Ok(Offer { device: DeviceId(key(0)?), mls_key: key(32)?, history_key })
    }

    pub fn seal_bundle(&self, bundle: &Bundle) -> Result<Vec<u8>, LinkError> {
        let plain = bundle.encode().map_err(|e| LinkError::TooLarge(e.to_string()))?;
        let sealed = self.seal(BUNDLE_KEY, plain)?;
        if sealed.len() > MAX_LINK_BUNDLE {
            return Err(LinkError::TooLarge(format!("{} bytes", sealed.len())));
        }
        Ok(sealed)
    }

    pub fn open_bundle(&self, sealed: &[u8]) -> Result<Bundle, LinkError> {
        let plain = self.open(BUNDLE_KEY, sealed)?;
        Bundle::decode(&plain).map_err(|e| LinkError::Malformed(e.to_string()))
    }
}

/// What the first device hands the new one, sealed: whose device it is,
/// and what the person sees on their first device.
///
/// Encoding: account id (32 bytes), `bytes16<64>` name (empty: none),
/// `u16` n contacts × (`bytes16<64>` name, account id), `u16` m groups ×
/// (`bytes8<255>` group id, `bytes16<64>` name, `u64` epoch, `bytes8<64>`
/// confirmed transcript hash: the first device's state of the group, which
/// the new device's first join must not go back from, `u8` 0 or 1 then, if
/// 1, a [`LinkHandover`]: `u64` sequence, `bytes32` GroupInfo with tree,
/// `u16` k × `bytes32` pending proposal), then `u16` r × `bytes8<137>`
/// account-signed device revocation the first device holds, then, only if
/// history was handed over, `u8` 1 and a [`SealedHistory`] (32-byte
/// ephemeral key, 104 sealed bytes; a bundle from a device that never
/// hands history over ends before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub account: AccountId,
    pub name: Option<String>,
    pub contacts: Vec<(String, AccountId)>,
    pub groups: Vec<LinkedGroup>,
    /// The account-signed revocations the first device holds (encoded
    /// [`crate::auth::DeviceRevocation`]s, verified again by the new device):
    /// the ones that were sent into its groups went out in epochs the new
    /// device never joins, so without them it would let a revoked device
    /// (its own account's stolen laptop, say) stay in, or come back into,
    /// a group its walk reaches.
    pub revocations: Vec<Vec<u8>>,
    /// Where the history the first device handed over waits, encrypted,
    /// sealed to the new device's ephemeral key (`hush device add
    /// --history`; [`crate::client::history`]).
    pub history: Option<SealedHistory>,
}

/// Most revocations a bundle carries (the account's own first).
pub const MAX_LINK_REVOCATIONS: usize = 1024;

/// A group of the account, as the first device hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedGroup {
    pub id: Vec<u8>,
    pub name: String,
    /// The first device's epoch of the group and its confirmed transcript
    /// hash (empty if it held no state): the new device joins no state
    /// older than this, nor another state of this epoch.
    pub epoch: u64,
    pub transcript: Vec<u8>,
    /// The first device's state itself, and how far it had read the
    /// group's log: the new device walks the log's commits from there to
    /// the state the server offers, and joins only a state the walk
    /// reaches. `None` when it did not fit in the bundle (the first join
    /// then only checks `epoch` and `transcript`, and says so).
    pub handover: Option<LinkHandover>,
}

/// A group's state handed over with a link, and the last sequence of the
/// group's log it includes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkHandover {
    pub seq: u64,
    pub state: Handover,
}

impl LinkHandover {
    /// Bytes its encoding adds to a bundle.
    pub fn encoded_len(&self) -> usize {
        8 + 4 + self.state.info.len() + 2 + self.state.proposals.iter().map(|p| 4 + p.len()).sum::<usize>()
    }

    fn write(&self, w: &mut Writer) -> Result<(), EncodeError> {
        w.u64(self.seq);
        w.bytes32("group state", &self.state.info, MAX_LINK_BUNDLE)?;
        w.count("pending proposals", self.state.proposals.len(), MAX_HANDOVER_PROPOSALS)?;
        for p in &self.state.proposals {
            w.bytes32("pending proposal", p, MAX_MLS_MESSAGE)?;
        }
        Ok(())
    }

    fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let seq = r.u64()?;
        let info = r.bytes32("group state", MAX_LINK_BUNDLE)?.to_vec();
        let k = r.count("pending proposals", MAX_HANDOVER_PROPOSALS)?;
        let mut proposals = Vec::new();
        for _ in 0..k {
            proposals.push(r.bytes32("pending proposal", MAX_MLS_MESSAGE)?.to_vec());
        }
        Ok(Self { seq, state: Handover { info, proposals } })
    }

    /// The encoding a device keeps until its first join.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut w = Writer::new();
        self.write(&mut w)?;
        Ok(w.into_inner())
    }

    /// Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let h = Self::read(&mut r)?;
        r.finish()?;
        Ok(h)
    }
}

/// Longest transcript hash in a bundle (SHA-512's).
pub const MAX_TRANSCRIPT_HASH: usize = 64;

impl Bundle {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut w = Writer::new();
        w.raw(&self.account.0);
        w.bytes16("name", self.name.as_deref().unwrap_or_default().as_bytes(), MAX_NAME)?;
        w.count("contacts", self.contacts.len(), MAX_BUNDLE_CONTACTS)?;
        for (name, account) in &self.contacts {
            w.bytes16("contact name", name.as_bytes(), MAX_NAME)?;
            w.raw(&account.0);
        }
        w.count("groups", self.groups.len(), MAX_GROUPS_LISTED)?;
        for g in &self.groups {
            w.bytes8("group id", &g.id, MAX_GROUP_ID)?;
            w.bytes16("group name", g.name.as_bytes(), MAX_NAME)?;
            w.u64(g.epoch);
            w.bytes8("transcript hash", &g.transcript, MAX_TRANSCRIPT_HASH)?;
            match &g.handover {
                None => w.u8(0),
                Some(h) => {
                    w.u8(1);
                    h.write(&mut w)?;
                }
            }
        }
        w.count("revocations", self.revocations.len(), MAX_LINK_REVOCATIONS)?;
        for r in &self.revocations {
            w.bytes8("revocation", r, REVOCATION_LEN)?;
        }
        if let Some(h) = &self.history {
            w.u8(1);
            h.write(&mut w);
        }
        Ok(w.into_inner())
    }

    /// Never panics; names are checked by the caller before use.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let account = AccountId(r.array()?);
        let name = r.string16("name", MAX_NAME)?;
        let name = (!name.is_empty()).then(|| name.to_owned());
        let n = r.count("contacts", MAX_BUNDLE_CONTACTS)?;
        let mut contacts = Vec::new();
        for _ in 0..n {
            let name = r.string16("contact name", MAX_NAME)?.to_owned();
            contacts.push((name, AccountId(r.array()?)));
        }
        let m = r.count("groups", MAX_GROUPS_LISTED)?;
        let mut groups = Vec::new();
        for _ in 0..m {
            let id = r.bytes8("group id", MAX_GROUP_ID)?.to_vec();
            let name = r.string16("group name", MAX_NAME)?.to_owned();
            let epoch = r.u64()?;
            let transcript = r.bytes8("transcript hash", MAX_TRANSCRIPT_HASH)?.to_vec();
            let handover = match r.u8()? {
                0 => None,
                1 => Some(LinkHandover::read(&mut r)?),
                _ => return Err(DecodeError::Invalid("group state flag")),
            };
            groups.push(LinkedGroup { id, name, epoch, transcript, handover });
        }
        let k = r.count("revocations", MAX_LINK_REVOCATIONS)?;
        let mut revocations = Vec::new();
        for _ in 0..k {
            revocations.push(r.bytes8("revocation", REVOCATION_LEN)?.to_vec());
        }
        let history = if r.remaining() == 0 {
            None
        } else if r.u8()? == 1 {
            Some(SealedHistory::read(&mut r)?)
        } else {
            return Err(DecodeError::Invalid("history flag"));
        };
        r.finish()?;
        Ok(Self { account, name, contacts, groups, revocations, history })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code() -> LinkCode {
        let server: HushAddress =
            format!("hush://127.0.0.1:7443/#{}", crate::auth::Identity::generate().unwrap().fingerprint())
                .parse()
                .unwrap();
        LinkCode::generate(server).unwrap()
    }

    #[test]
    fn codes_round_trip_and_only_the_code_opens_what_it_sealed() {
        let c = code();
        let text = c.to_string();
        assert!(text.starts_with(SCHEME), "{text}");
        let back: LinkCode = text.parse().unwrap();
        assert_eq!(back.id(), c.id());
        assert_eq!(back.server, c.server);
        let mine = Offer { device: DeviceId([1; 32]), mls_key: [2; 32], history_key: Some([3; 32]) };
        let offer = c.seal_offer(&mine).unwrap();
        assert_eq!(back.open_offer(&offer).unwrap(), mine);
        let older = Offer { history_key: None, ..mine };
        assert_eq!(back.open_offer(&c.seal_offer(&older).unwrap()).unwrap(), older);
        let other = code();
        assert_eq!(other.open_offer(&offer), Err(LinkError::Sealed));
        // The offer key does not open a bundle, nor the other way round.
        assert_eq!(c.open_bundle(&offer), Err(LinkError::Sealed));
        let mut flipped = offer.clone();
        flipped[3] ^= 1;
        assert_eq!(c.open_offer(&flipped), Err(LinkError::Sealed));
        let bundle = Bundle {
            account: AccountId([9; 32]),
            name: Some("alice".into()),
            contacts: vec![("bob".into(), AccountId([8; 32]))],
            groups: vec![
                LinkedGroup { id: vec![7; 32], name: "team".into(), epoch: 4, transcript: vec![1; 32], handover: None },
                LinkedGroup {
                    id: vec![6; 32],
                    name: "ops".into(),
                    epoch: 2,
                    transcript: vec![2; 32],
                    handover: Some(LinkHandover {
                        seq: 17,
                        state: Handover { info: vec![5; 300], proposals: vec![vec![4; 20], vec![3; 10]] },
                    }),
                },
            ],
            revocations: vec![vec![1; REVOCATION_LEN]],
            history: Some(SealedHistory { ephemeral: [1; 32], sealed: [2; crate::client::history::SEALED_REF_LEN] }),
        };
        let sealed = c.seal_bundle(&bundle).unwrap();
        assert_eq!(back.open_bundle(&sealed).unwrap(), bundle);
        assert!(!String::from_utf8_lossy(&sealed).contains("team"));
        for bad in ["", "hush://x", "hushlink://nope", "hushlink://aaaa@127.0.0.1:1/#x"] {
            assert!(bad.parse::<LinkCode>().is_err(), "{bad}");
        }
    }

    /// Issue 29, finding 10: a retried `hush device join` seals a second
    /// offer under the same code. The two must not share a key and nonce:
    /// with a stream cipher, the XOR of the two ciphertexts would be the
    /// XOR of the two offers (and the Poly1305 key would repeat).
    #[test]
    fn issue_29_two_offers_under_one_code_never_share_key_and_nonce() {
        let c = code();
        let a = Offer { device: DeviceId([1; 32]), mls_key: [2; 32], history_key: None };
        let b = Offer { device: DeviceId([3; 32]), mls_key: [4; 32], history_key: None };
        let plain_xor: Vec<u8> = [&a.device.0[..], &a.mls_key[..]]
            .concat()
            .iter()
            .zip([&b.device.0[..], &b.mls_key[..]].concat())
            .map(|(x, y)| x ^ y)
            .collect();
        let first = c.seal_offer(&a).unwrap();
        let second = c.seal_offer(&b).unwrap();
        let again = c.seal_offer(&a).unwrap();
        // Wherever the ciphertext sits in the sealed message, no 64-byte
        // window of the two XORed together is the XOR of the plaintexts.
        let xor: Vec<u8> = first.iter().zip(&second).map(|(x, y)| x ^ y).collect();
        assert!(!xor.windows(OFFER_LEN).any(|w| w == plain_xor), "the offers' XOR shows through");
        assert_ne!(first, again, "sealing the same offer twice gave the same bytes");
        assert_eq!(c.open_offer(&first).unwrap(), a);
        assert_eq!(c.open_offer(&second).unwrap(), b);
        assert_eq!(c.open_offer(&again).unwrap(), a);
        // Bundles too (an answer can be retried).
        let bundle = Bundle {
            account: AccountId([9; 32]),
            name: None,
            contacts: vec![],
            groups: vec![],
            revocations: vec![],
            history: None,
        };
        let (x, y) = (c.seal_bundle(&bundle).unwrap(), c.seal_bundle(&bundle).unwrap());
        assert_ne!(x, y);
        assert_eq!(c.open_bundle(&x).unwrap(), c.open_bundle(&y).unwrap());
    }
}

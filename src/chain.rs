//! Verifiable delivery (issue 31): the hash chain the server keeps over each
//! group's log, and the check a member makes of it.
//!
//! Every message the server accepts into a group's log (application and
//! handshake alike) extends the group's chain:
//!
//! ```text
//! head_0 = SHA-256("hush chain v1 genesis\0" ‖ len(group id) ‖ group id)
//! head_n = SHA-256("hush chain v1 link\0" ‖ head_{n-1} ‖ seq_n ‖ epoch_n ‖ SHA-256(message_n))
//! ```
//!
//! with `seq` and `epoch` as 8-byte big-endian integers and the length as
//! one byte (group ids are at most 255 bytes). A member that knows a head
//! and the messages after it can recompute every later head, so a server
//! that drops, swaps, changes or inserts a message in what it shows one
//! member breaks that member's chain; and a head the member saw is a
//! commitment to the whole history before it, so two members comparing the
//! heads they saw at one sequence number find a fork.
//!
//! A group created before the chain existed starts it at the first message
//! after the upgrade: from the genesis head, at that message's sequence
//! number (the server says where, see `Storage::chain_start`).

use crate::limits::ONLINE_CERT_LEN;
use ring::digest::{digest, Context, SHA256};
use ring::signature::{UnparsedPublicKey, ED25519};

/// The label the genesis head hashes first.
pub const GENESIS_LABEL: &[u8] = b"hush chain v1 genesis\0";
/// The label every link hashes first.
pub const LINK_LABEL: &[u8] = b"hush chain v1 link\0";

/// The label a server's signature over a head signs first.
pub const SIGNED_HEAD_LABEL: &[u8] = b"hush signed head v1\0";

/// One link of a group's chain: the head after some message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Head(pub [u8; 32]);

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Head({})", self.short())
    }
}

impl Head {
    /// The chain's start for `group`, before its first message.
    pub fn genesis(group: &[u8]) -> Self {
        let mut c = Context::new(&SHA256);
        c.update(GENESIS_LABEL);
        // Group ids are 1 to 255 bytes (wire and storage refuse others);
        // a longer one would still hash, with its length cut to a byte.
        c.update(&[u8::try_from(group.len()).unwrap_or(u8::MAX)]);
        c.update(group);
        Self::of(c)
    }

    /// The head after `message`, stored at `seq` in `epoch`, follows this
    /// one.
    pub fn next(&self, seq: u64, epoch: u64, message: &[u8]) -> Self {
        self.next_digest(seq, epoch, &MessageDigest::of(message))
    }

    /// [`Head::next`], from the message's digest (computed before, off the
    /// server's writer).
    pub fn next_digest(&self, seq: u64, epoch: u64, message: &MessageDigest) -> Self {
        let mut c = Context::new(&SHA256);
        c.update(LINK_LABEL);
        c.update(&self.0);
        c.update(&seq.to_be_bytes());
        c.update(&epoch.to_be_bytes());
        c.update(&message.0);
        Self::of(c)
    }

    /// The first 8 bytes in hex: enough to tell heads apart in a message
    /// to a person.
    pub fn short(&self) -> String {
        self.0.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    fn of(c: Context) -> Self {
        let d = c.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

/// A head the server signed with its key (the key the `hush://` address
/// pins): "after message `seq`, `group`'s chain is at `head`". Two of them
/// for one group and sequence number with different heads, under one key,
/// prove that the server showed two histories; so does one whose head a
/// chain from another signed head at the same sequence contradicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHead {
    pub seq: u64,
    pub head: Head,
    /// The server's Ed25519 public key: its identity key, or an online
    /// key `cert` certifies.
    pub key: [u8; 32],
    pub signature: [u8; 64],
    /// The identity's certificate for `key`, when an online key signed
    /// (encoded; `crate::auth::online::OnlineCert` reads and checks it).
    pub cert: Option<[u8; ONLINE_CERT_LEN]>,
}

impl SignedHead {
    /// What the server signs: the label, the group id (length first, one
    /// byte), the sequence number (8 bytes big-endian) and the head.
    pub fn message(group: &[u8], seq: u64, head: &Head) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGNED_HEAD_LABEL.len() + 1 + group.len() + 8 + 32);
        m.extend_from_slice(SIGNED_HEAD_LABEL);
        m.push(u8::try_from(group.len()).unwrap_or(u8::MAX));
        m.extend_from_slice(group);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&head.0);
        m
    }

    /// Whether the signature is the key's over this head of `group`.
    pub fn verify(&self, group: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.key)
            .verify(&Self::message(group, self.seq, &self.head), &self.signature)
            .is_ok()
    }
}

/// SHA-256 of a message: what its link in the chain hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageDigest(pub [u8; 32]);

impl MessageDigest {
    pub fn of(message: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, message).as_ref());
        Self(out)
    }
}

/// Why a chain does not continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Break {
    #[error("the server skipped from message {last} to message {seq}: the messages in between are missing")]
    Gap { last: u64, seq: u64 },
    #[error("message {seq} comes after message {last}: the server went back in the group's history")]
    Back { last: u64, seq: u64 },
    #[error(
        "message {seq} does not follow from the messages before it (its head should be {expected}, the server \
         says {claimed}): a message was changed, dropped, swapped or inserted"
    )]
    WrongLink { seq: u64, expected: String, claimed: String },
    #[error("message {seq} is not an MLS message: its place in the chain cannot be checked")]
    NotMls { seq: u64 },
    #[error(
        "message {seq} comes without a chain head, as if stored before the chain began, after messages that had \
         one: its place in the chain cannot be checked"
    )]
    NoHead { seq: u64 },
}

/// The magic that starts a sender's claim in an application message's
/// authenticated data (version 1: signed by the identity key).
pub const CLAIM_MAGIC: &[u8; 4] = b"hsc1";

/// The magic of a claim whose head an online key signed: version 1's
/// fields, then the online key's certificate.
pub const CLAIM_MAGIC_CERTIFIED: &[u8; 4] = b"hsc2";

/// What a member puts in the authenticated data of each application
/// message it sends (MLS signs it with the message, so the server can
/// neither forge nor change it): the last head of the group's chain that
/// the server signed for it, after it verified the chain up to there.
/// Receivers compare it with their own chain at that sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim(pub SignedHead);

impl Claim {
    /// The encoded length: magic, sequence, head, key, signature.
    pub const LEN: usize = 4 + 8 + 32 + 32 + 64;

    /// The encoded length with a certificate after those.
    pub const LEN_CERTIFIED: usize = Self::LEN + ONLINE_CERT_LEN;

    pub fn encode(&self) -> Vec<u8> {
        let s = &self.0;
        let mut out = Vec::with_capacity(Self::LEN_CERTIFIED);
        out.extend_from_slice(if s.cert.is_some() { CLAIM_MAGIC_CERTIFIED } else { CLAIM_MAGIC });
        out.extend_from_slice(&s.seq.to_be_bytes());
        out.extend_from_slice(&s.head.0);
        out.extend_from_slice(&s.key);
        out.extend_from_slice(&s.signature);
        if let Some(cert) = &s.cert {
            out.extend_from_slice(cert);
        }
        out
    }

    /// The claim in `aad`, if it holds exactly one (anything else, from an
    /// older client or a careless one, is no claim).
    pub fn decode(aad: &[u8]) -> Option<Self> {
        let certified = match (aad.len(), aad.get(..4)?) {
            (Self::LEN, magic) if magic == CLAIM_MAGIC => false,
            (Self::LEN_CERTIFIED, magic) if magic == CLAIM_MAGIC_CERTIFIED => true,
            _ => return None,
        };
        let seq = u64::from_be_bytes(aad.get(4..12)?.try_into().ok()?);
        let head = Head(aad.get(12..44)?.try_into().ok()?);
        let key = aad.get(44..76)?.try_into().ok()?;
        let signature = aad.get(76..140)?.try_into().ok()?;
        let cert = match certified {
            true => Some(aad.get(Self::LEN..)?.try_into().ok()?),
            false => None,
        };
        Some(Self(SignedHead { seq, head, key, signature, cert }))
    }
}

/// A member's position in a group's chain: the last sequence number it
/// verified and the head there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub head: Head,
}

impl Position {
    /// The start of `group`'s chain (before its first message, or before
    /// `start` for a group whose chain began later).
    pub fn start(group: &[u8], start: u64) -> Self {
        Self { seq: start.saturating_sub(1), head: Head::genesis(group) }
    }

    /// Takes the message at `seq` (of `epoch`) whose head the server says
    /// is `claimed`: it must be the next sequence number and its head the
    /// one the chain gives. The position moves only if it is.
    pub fn take(&mut self, seq: u64, epoch: u64, message: &[u8], claimed: &Head) -> Result<(), Break> {
        self.take_digest(seq, epoch, &MessageDigest::of(message), claimed)
    }

    /// [`Position::take`] for a message of which only its digest is left
    /// (its group's disappearing timer deleted it): the link checks as
    /// well, what the message said cannot be.
    pub fn take_digest(&mut self, seq: u64, epoch: u64, message: &MessageDigest, claimed: &Head) -> Result<(), Break> {
        if seq <= self.seq {
            return Err(Break::Back { last: self.seq, seq });
        }
        if seq != self.seq.saturating_add(1) {
            return Err(Break::Gap { last: self.seq, seq });
        }
        let expected = self.head.next_digest(seq, epoch, message);
        if expected != *claimed {
            return Err(Break::WrongLink { seq, expected: expected.short(), claimed: claimed.short() });
        }
        *self = Self { seq, head: expected };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain of `messages` (epoch 1) from the genesis of group `g`.
    fn chain(messages: &[&[u8]]) -> Vec<Head> {
        let mut head = Head::genesis(b"g");
        let mut out = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            head = head.next(i as u64 + 1, 1, m);
            out.push(head);
        }
        out
    }

    #[test]
    fn a_member_follows_the_chain_and_every_change_breaks_it() {
        let messages: [&[u8]; 3] = [b"one", b"two", b"three"];
        let heads = chain(&messages);
        let mut at = Position::start(b"g", 1);
        for (i, m) in messages.iter().enumerate() {
            at.take(i as u64 + 1, 1, m, &heads[i]).unwrap();
        }
        assert_eq!(at, Position { seq: 3, head: heads[2] });

        // Dropped: message 2 never shown.
        let mut at = Position::start(b"g", 1);
        at.take(1, 1, b"one", &heads[0]).unwrap();
        assert!(matches!(at.take(3, 1, b"three", &heads[2]), Err(Break::Gap { last: 1, seq: 3 })));
        // Dropped and renumbered: the head does not follow.
        assert!(matches!(at.take(2, 1, b"three", &heads[2]), Err(Break::WrongLink { seq: 2, .. })));
        // Changed by one byte, or shown in another epoch.
        assert!(matches!(at.take(2, 1, b"twO", &heads[1]), Err(Break::WrongLink { .. })));
        assert!(matches!(at.take(2, 2, b"two", &heads[1]), Err(Break::WrongLink { .. })));
        assert_eq!(at.seq, 1, "a refused message moves nothing");
        // Going back.
        assert!(matches!(at.take(1, 1, b"one", &heads[0]), Err(Break::Back { last: 1, seq: 1 })));
        // Swapped: two then one.
        let swapped = chain(&[b"two", b"one"]);
        assert_ne!(swapped[1], heads[1]);
        // Another group's chain is another chain.
        assert_ne!(Head::genesis(b"g"), Head::genesis(b"h"));
        // A chain that starts later starts from the genesis there.
        let mut late = Position::start(b"g", 7);
        let head = Head::genesis(b"g").next(7, 3, b"x");
        late.take(7, 3, b"x", &head).unwrap();
    }

    #[test]
    fn heads_are_fixed_by_the_construction() {
        // The construction is part of the protocol: a change here must be
        // a new label (and version), never silent.
        let h = Head::genesis(b"g").next(1, 1, b"m");
        assert_eq!(Head::genesis(b"g"), Head::genesis(b"g"));
        assert_ne!(h, Head::genesis(b"g").next(1, 1, b"n"));
        assert_ne!(h, Head::genesis(b"g").next(2, 1, b"m"));
        assert_eq!(h.short().len(), 16);
    }
}

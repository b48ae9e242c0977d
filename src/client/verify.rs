//! Verifiable delivery, a member's side ([`crate::chain`] is the
//! construction): following a group's chain through every message this
//! device reads or sends, and comparing it with the heads other members
//! say they saw. Sans-IO; the app ([`super::app`]) stores the results and
//! raises the alarms.
//!
//! * **Continuity.** Each message read must be the next sequence number
//!   and its head must follow from the last one verified
//!   ([`Position::take`]). A gap, a sequence number that goes back or a
//!   wrong link is an alarm: the server dropped, reordered, changed or
//!   inserted a message in what it showed this device.
//! * **Cross-checks.** Each application message a member sends carries in
//!   its MLS-signed authenticated data the last head the server signed for
//!   it ([`Claim`]). A receiver compares it with its own head at that
//!   sequence number ([`cross_check`]): two different heads for one
//!   sequence number, both signed by the server, prove that the server
//!   showed two histories (a fork).
//! * **Withholding.** How far a member had read when it wrote (the claim's
//!   sequence number against where its message landed) shows a member the
//!   server stops delivering to.

use crate::auth::online::OnlineCert;
use crate::auth::Fingerprint;
use crate::chain::{Break, Claim, Head, MessageDigest, Position, SignedHead};
use crate::wire::Logged;

/// A member that had not seen this many messages of the group when it
/// wrote is reported as not receiving them.
pub const WITHHOLDING_LAG: u64 = 10;

/// What following the chain through one message gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The chain continues: the new position.
    Verified(Position),
    /// The first chained message this device reads (it joined, or the
    /// chain began): taken as the server gives it, the start of what this
    /// device can vouch for. `genesis`: it is the chain's first message,
    /// checked from the genesis head.
    Started { at: Position, genesis: bool },
    /// A message stored before the chain began: nothing to check.
    Unchained,
    /// The chain breaks here. The position moves to what the server
    /// claims, so the next message is checked again (and a second break is
    /// a second alarm).
    Broken { why: Break, at: Position },
}

/// Follows `group`'s chain from `at` (`None`: not started) through `m`.
pub fn follow(group: &[u8], at: Option<Position>, m: &Logged) -> Step {
    let Some(claimed) = m.head else {
        // Only messages stored before the chain began have no head; once
        // this device follows the chain, every later message has one (a
        // server that leaves them out would check nothing).
        return match at {
            None => Step::Unchained,
            Some(at) => Step::Broken { why: Break::NoHead { seq: m.seq }, at },
        };
    };
    let claimed_at = Position { seq: m.seq, head: claimed };
    // An expired message links through the epoch and digest left of it.
    let (epoch, digest) = match &m.gone {
        Some(gone) => (gone.epoch, gone.digest),
        None => match crate::mls::frame(&m.data).ok().filter(|f| f.group == group) {
            Some(f) => (f.epoch, MessageDigest::of(&m.data)),
            None => return Step::Broken { why: Break::NotMls { seq: m.seq }, at: claimed_at },
        },
    };
    match at {
        None => {
            let genesis = Head::genesis(group).next_digest(m.seq, epoch, &digest) == claimed;
            Step::Started { at: claimed_at, genesis }
        }
        Some(mut at) => match at.take_digest(m.seq, epoch, &digest, &claimed) {
            Ok(()) => Step::Verified(at),
            Err(why) => Step::Broken { why, at: claimed_at },
        },
    }
}

/// What another member's claim says about this device's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Same head at that sequence number.
    Agrees,
    /// The server signed another head at that sequence number for the
    /// sender than the one this device verified: a fork.
    Forked { ours: Head },
    /// This device does not know its head there (before it started
    /// following the chain, or pruned): nothing to compare.
    Unknown,
    /// The signature is not the server's: the claim proves nothing (the
    /// sender's client is broken or hostile; the server cannot forge it).
    NotSigned,
}

/// Compares a sender's `claim` with this device's head at the claim's
/// sequence number (`ours`, if known), under the server key the address
/// pins.
pub fn cross_check(group: &[u8], claim: &Claim, ours: Option<Head>, fingerprint: &Fingerprint) -> Check {
    let signed = &claim.0;
    if !by_server(signed, fingerprint) || !signed.verify(group) {
        return Check::NotSigned;
    }
    match ours {
        None => Check::Unknown,
        Some(h) if h == signed.head => Check::Agrees,
        Some(h) => Check::Forked { ours: h },
    }
}

/// Whether the key that signed `signed` is the server's the address
/// `pin` names: the identity key itself, or an online key the identity
/// certified. The certificate's validity period is not checked: the head
/// may have been signed long ago, while it was valid (see SECURITY.md,
/// "Rotating the server's key").
pub fn by_server(signed: &SignedHead, pin: &Fingerprint) -> bool {
    if Fingerprint::of_spki(&crate::auth::cert::ed25519_spki(&signed.key)).matches(pin) {
        return true;
    }
    signed
        .cert
        .and_then(|bytes| OnlineCert::decode(&bytes).ok())
        .is_some_and(|cert| cert.verify_any_time(pin, &signed.key).is_ok())
}

/// Hex of bytes, for evidence.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A signed head as evidence (JSON): everything a third party needs to
/// check the signature ([`SignedHead::message`]).
pub fn signed_json(group: &[u8], s: &SignedHead) -> serde_json::Value {
    serde_json::json!({
        "group": hex(group),
        "seq": s.seq,
        "head": hex(&s.head.0),
        "key": hex(&s.key),
        "signature": hex(&s.signature),
        "certificate": s.cert.map(|c| hex(&c)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::cert;

    #[test]
    fn a_message_that_is_not_mls_or_of_another_group_breaks_the_chain() {
        let m = Logged::new(1, Some(Head([1; 32])), b"not mls".to_vec());
        assert!(matches!(follow(b"g", None, &m), Step::Broken { why: Break::NotMls { seq: 1 }, .. }));
        let old = Logged::new(1, None, vec![]);
        assert_eq!(follow(b"g", None, &old), Step::Unchained);
        // Once the chain is followed, a message without a head breaks it
        // (and the position stays).
        let at = Position { seq: 4, head: Head([2; 32]) };
        let stripped = Logged::new(5, None, vec![]);
        assert_eq!(follow(b"g", Some(at), &stripped), Step::Broken { why: Break::NoHead { seq: 5 }, at });
    }

    #[test]
    fn a_claim_under_another_key_or_with_a_bad_signature_proves_nothing() {
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
        let pk: [u8; 32] = ring::signature::KeyPair::public_key(&key).as_ref().try_into().unwrap();
        let fpr = Fingerprint::of_spki(&cert::ed25519_spki(&pk));
        let head = Head([3; 32]);
        let sig: [u8; 64] = key.sign(&SignedHead::message(b"g", 5, &head)).as_ref().try_into().unwrap();
        let claim = Claim(SignedHead { seq: 5, head, key: pk, signature: sig, cert: None });
        assert_eq!(Claim::decode(&claim.encode()), Some(claim));
        assert_eq!(cross_check(b"g", &claim, Some(head), &fpr), Check::Agrees);
        assert_eq!(cross_check(b"g", &claim, None, &fpr), Check::Unknown);
        assert_eq!(cross_check(b"g", &claim, Some(Head([4; 32])), &fpr), Check::Forked { ours: Head([4; 32]) });
        assert_eq!(cross_check(b"h", &claim, Some(head), &fpr), Check::NotSigned, "another group's head");
        let other = Fingerprint::of_spki(&cert::ed25519_spki(&[9; 32]));
        assert_eq!(cross_check(b"g", &claim, Some(head), &other), Check::NotSigned, "not the pinned key");
        let mut forged = claim;
        forged.0.head = Head([4; 32]);
        assert_eq!(cross_check(b"g", &forged, Some(Head([4; 32])), &fpr), Check::NotSigned);
        assert_eq!(Claim::decode(&claim.encode()[1..]), None);
        assert_eq!(Claim::decode(b""), None);
    }

    #[test]
    fn a_head_an_online_key_signed_counts_as_the_servers_if_its_identity_certified_it() {
        use crate::auth::online::OnlineCert;
        use crate::auth::Identity;
        let identity = Identity::generate().unwrap();
        let online = Identity::generate().unwrap();
        let pin = identity.fingerprint();
        let head = Head([3; 32]);
        let signature = online.sign(&SignedHead::message(b"g", 5, &head));
        // Long expired: the head was signed while it was valid.
        let cert = OnlineCert::issue(&identity, online.public_key(), 10, 20).unwrap();
        let claim =
            Claim(SignedHead { seq: 5, head, key: online.public_key(), signature, cert: Some(cert.to_bytes()) });
        let bytes = claim.encode();
        assert_eq!(bytes.len(), Claim::LEN_CERTIFIED);
        assert_eq!(Claim::decode(&bytes), Some(claim));
        assert_eq!(cross_check(b"g", &claim, Some(head), &pin), Check::Agrees);
        assert_eq!(cross_check(b"g", &claim, Some(Head([4; 32])), &pin), Check::Forked { ours: Head([4; 32]) });
        // Without its certificate, or certified by someone else: nothing.
        let bare = Claim(SignedHead { cert: None, ..claim.0 });
        assert_eq!(cross_check(b"g", &bare, Some(head), &pin), Check::NotSigned);
        let mallory = Identity::generate().unwrap();
        let theirs = OnlineCert::issue(&mallory, online.public_key(), 10, 20).unwrap();
        let foreign = Claim(SignedHead { cert: Some(theirs.to_bytes()), ..claim.0 });
        assert_eq!(cross_check(b"g", &foreign, Some(head), &pin), Check::NotSigned);
        // A certificate for another online key does not lend it.
        let other = OnlineCert::issue(&identity, [5; 32], 10, 20).unwrap();
        let lent = Claim(SignedHead { cert: Some(other.to_bytes()), ..claim.0 });
        assert_eq!(cross_check(b"g", &lent, Some(head), &pin), Check::NotSigned);
        // A version-2 magic with a version-1 length is no claim.
        let mut short = bytes.clone();
        short.truncate(Claim::LEN);
        assert_eq!(Claim::decode(&short), None);
    }
}

//! Verifiable delivery, a member's side: whatever the server sends as a
//! group's log (sequence numbers, heads, bytes) and whatever claims other
//! members put in their messages, following the chain and comparing claims
//! never panic, a position only moves to the next sequence number when the
//! link verifies, and no message is accepted twice.
#![no_main]
use hush::auth::Fingerprint;
use hush::chain::{Break, Claim, Head, Position};
use hush::client::verify::{cross_check, follow, Step};
use hush::wire::Logged;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (group, mut rest) = data.split_at(data.len().min(4));
    let fingerprint = Fingerprint::of_spki(b"fuzz");
    let mut at: Option<Position> = None;
    while let Some((&op, tail)) = rest.split_first() {
        // One entry: seq delta (1 byte), head present + 32 bytes or a
        // recomputed one, then up to 511 bytes of message (the op's top
        // bit adds 256: a claim with an online key's certificate is 292).
        let delta = u64::from(*tail.first().unwrap_or(&1));
        let long = if op & 0x80 != 0 { 256 } else { 0 };
        let len = (usize::from(*tail.get(1).unwrap_or(&0)) + long).min(tail.len().saturating_sub(2));
        let body = tail.get(2..2 + len).unwrap_or_default();
        rest = tail.get(2 + len..).unwrap_or_default();
        let seq = at.map_or(delta, |p| p.seq.wrapping_add(delta));
        if op & 1 == 1 {
            // As a claim in a message's authenticated data.
            if let Some(claim) = Claim::decode(body) {
                let _ = cross_check(group, &claim, at.map(|p| p.head), &fingerprint);
                assert_eq!(Claim::decode(&claim.encode()), Some(claim));
            }
            continue;
        }
        let head = match op >> 1 & 3 {
            0 => None,
            1 => Some(Head(
                body.iter().copied().chain(std::iter::repeat(0)).take(32).collect::<Vec<_>>().try_into().unwrap(),
            )),
            // What an honest server would send, for epoch 1.
            _ => Some(at.map_or_else(|| Head::genesis(group), |p| p.head).next(seq, 1, body)),
        };
        let m = Logged::new(seq, head, body.to_vec());
        let before = at;
        match follow(group, at, &m) {
            Step::Verified(p) => {
                let b = before.expect("verified without a start");
                assert_eq!(p.seq, b.seq + 1);
                assert_eq!(p.seq, seq);
                at = Some(p);
            }
            Step::Started { at: p, .. } => {
                assert!(before.is_none());
                at = Some(p);
            }
            Step::Unchained => assert!(head.is_none()),
            Step::Broken { why, at: p } => {
                if let (Break::Back { last, seq: s }, Some(b)) = (&why, before) {
                    assert!(s <= last && *last == b.seq);
                }
                at = Some(p);
            }
        }
    }
});

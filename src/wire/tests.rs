//! Round-trip and robustness properties of the wire codec.

use super::*;
use crate::chain::{Head, SignedHead};
use crate::limits::{MAX_ERROR_MESSAGE, MAX_GROUP_ID, MAX_INVITE_LEN, MAX_PUSH_FRAME};
use proptest::prelude::*;

fn invite() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-z0-9-]{0,64}")
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (invite(), blob()).prop_map(|(invite, certificate)| Request::Register { invite, certificate }),
        Just(Request::Status),
        any::<u64>().prop_map(|nonce| Request::Ping { nonce }),
        (proptest::collection::vec(blob(), 0..4), proptest::option::of(any::<u16>()))
            .prop_map(|(packages, last_resort)| Request::PublishKeyPackages { packages, last_resort }),
        any::<[u8; 32]>().prop_map(|account| Request::ClaimKeyPackage { account }),
        Just(Request::CountKeyPackages),
        (blob(), blob()).prop_map(|(group_info, ratchet_tree)| Request::CreateGroup { group_info, ratchet_tree }),
        (blob(), proptest::option::of(blob()), proptest::option::of(blob()))
            .prop_map(|(message, welcome, group_info)| Request::Send { message, welcome, group_info }),
        (group(), any::<u64>(), any::<u16>()).prop_map(|(group, after, limit)| Request::Fetch { group, after, limit }),
        (group(), any::<u64>()).prop_map(|(group, seq)| Request::Ack { group, seq }),
        Just(Request::FetchWelcomes),
        any::<u64>().prop_map(|id| Request::AckWelcome { id }),
        Just(Request::ListGroups),
        group().prop_map(|group| Request::FetchGroupInfo { group }),
        blob().prop_map(|revocation| Request::RevokeDevice { revocation }),
        Just(Request::ListDevices),
        (any::<[u8; 16]>(), any::<u32>()).prop_map(|(link, expires_in)| Request::LinkOpen { link, expires_in }),
        (any::<[u8; 16]>(), small()).prop_map(|(link, offer)| Request::LinkOffer { link, offer }),
        any::<[u8; 16]>().prop_map(|link| Request::LinkFetch { link }),
        (any::<[u8; 16]>(), blob(), blob()).prop_map(|(link, certificate, bundle)| Request::LinkAnswer {
            link,
            certificate,
            bundle
        }),
        any::<[u8; 16]>().prop_map(|link| Request::LinkResult { link }),
        (group(), any::<u64>()).prop_map(|(group, seq)| Request::Head { group, seq }),
    ]
}

/// Fits every field, even the smallest (a link offer).
fn small() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..200)
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

fn group() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=255)
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (any::<u16>(), any::<u64>(), "\\PC{0,100}")
            .prop_map(|(c, detail, message)| { Response::Error { code: ErrorCode::from_u16(c), detail, message } }),
        any::<bool>().prop_map(|created| Response::Registered { created }),
        (any::<[u8; 32]>(), any::<[u8; 32]>(), any::<u64>(), any::<u64>(), any::<[u8; 32]>(), any::<u64>()).prop_map(
            |(account, device, r, s, removal_key, retention)| Response::Status {
                account,
                device,
                registered_at: r,
                server_time: s,
                removal_key,
                retention
            }
        ),
        any::<u64>().prop_map(|nonce| Response::Pong { nonce }),
        (any::<u32>(), any::<bool>()).prop_map(|(count, last_resort)| Response::KeyPackageCount { count, last_resort }),
        proptest::collection::vec(blob(), 1..4).prop_map(|packages| Response::KeyPackages { packages }),
        (group(), any::<u64>(), any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(group, seq, epoch, h)| Response::Accepted { group, seq, epoch, head: Head(h) }),
        (
            group(),
            proptest::collection::vec(
                (
                    any::<u64>(),
                    proptest::option::of(any::<[u8; 32]>()),
                    blob(),
                    proptest::option::of(any::<u64>()),
                    proptest::option::of((any::<u64>(), any::<[u8; 32]>()))
                ),
                0..4
            ),
            any::<bool>()
        )
            .prop_map(|(group, messages, more)| Response::Messages {
                group,
                messages: messages
                    .into_iter()
                    .map(|(seq, h, data, expires, gone)| {
                        let gone =
                            gone.map(|(epoch, d)| crate::wire::Gone { epoch, digest: crate::chain::MessageDigest(d) });
                        // What is gone has no bytes left.
                        let data = if gone.is_some() { Vec::new() } else { data };
                        Logged { seq, head: h.map(Head), data, expires, gone }
                    })
                    .collect(),
                more
            }),
        Just(Response::Done),
        proptest::collection::vec((any::<u64>(), blob()), 0..4).prop_map(|welcomes| Response::Welcomes { welcomes }),
        proptest::collection::vec(
            (group(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
            0..4
        )
        .prop_map(|gs| Response::Groups {
            groups: gs
                .into_iter()
                .map(|(group, epoch, last_seq, acked_seq, first_seq, member)| GroupSummary {
                    group,
                    epoch,
                    last_seq,
                    acked_seq,
                    first_seq,
                    member
                })
                .collect()
        }),
        (group(), blob(), proptest::option::of(blob()))
            .prop_map(|(group, group_info, ratchet_tree)| { Response::GroupInfo { group, group_info, ratchet_tree } }),
        proptest::collection::vec((any::<[u8; 32]>(), any::<u64>(), any::<bool>()), 0..4).prop_map(|ds| {
            Response::Devices {
                devices: ds
                    .into_iter()
                    .map(|(device, registered_at, revoked)| DeviceSummary { device, registered_at, revoked })
                    .collect(),
            }
        }),
        small().prop_map(|offer| Response::LinkOffer { offer }),
        (blob(), blob()).prop_map(|(certificate, bundle)| Response::Linked { certificate, bundle }),
        Just(Response::LinkPending),
        (
            group(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<bool>()
        )
            .prop_map(|(group, seq, h, key, s1, s2, certified)| {
                let mut signature = [0u8; 64];
                signature[..32].copy_from_slice(&s1);
                signature[32..].copy_from_slice(&s2);
                // Carried as bytes: the client checks it.
                let cert = certified.then(|| {
                    let mut c = [0u8; crate::limits::ONLINE_CERT_LEN];
                    c[..32].copy_from_slice(&h);
                    c[40..72].copy_from_slice(&key);
                    c
                });
                Response::SignedHead { group, signed: SignedHead { seq, head: Head(h), key, signature, cert } }
            }),
    ]
}

fn push() -> impl Strategy<Value = Push> {
    prop_oneof![
        (
            proptest::collection::vec(any::<u8>(), 0..=255),
            any::<u64>(),
            proptest::option::of(any::<[u8; 32]>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2000)),
        )
            .prop_map(|(group, seq, h, ciphertext)| Push::Message {
                group,
                seq,
                head: h.map(Head),
                ciphertext
            }),
        Just(Push::Welcome),
        Just(Push::Resync),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(req in request()) {
        let bytes = req.encode().unwrap();
        prop_assert_eq!(Request::decode(&bytes).unwrap(), req);
    }

    #[test]
    fn responses_round_trip(resp in response()) {
        let bytes = resp.encode().unwrap();
        prop_assert_eq!(Response::decode(&bytes).unwrap(), resp);
    }

    #[test]
    fn pushes_round_trip_through_the_stream_framing(pushes in proptest::collection::vec(push(), 1..5)) {
        let mut stream = Vec::new();
        for p in &pushes {
            stream.extend(p.encode_framed().unwrap());
        }
        let mut at = 0;
        let mut decoded = Vec::new();
        while let Some((p, used)) = decode_push_frame(&stream[at..]).unwrap() {
            decoded.push(p);
            at += used;
        }
        prop_assert_eq!(at, stream.len());
        prop_assert_eq!(decoded, pushes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Whatever decodes must re-encode to exactly the input: there is one
        // encoding per value, so nothing can be smuggled in slack.
        if let Ok(r) = Request::decode(&bytes) { prop_assert_eq!(r.encode().unwrap(), bytes.clone()); }
        if let Ok(r) = Response::decode(&bytes) { prop_assert_eq!(r.encode().unwrap(), bytes.clone()); }
        if let Ok(p) = Push::decode(&bytes) { prop_assert_eq!(p.encode().unwrap(), bytes.clone()); }
        let _ = decode_push_frame(&bytes);
    }

    #[test]
    fn truncations_and_trailing_bytes_are_rejected(req in request(), extra in 1u8..=255) {
        let bytes = req.encode().unwrap();
        for cut in 0..bytes.len() {
            prop_assert!(Request::decode(&bytes[..cut]).is_err());
        }
        let mut long = bytes.clone();
        long.push(extra);
        prop_assert_eq!(Request::decode(&long), Err(DecodeError::TrailingBytes(1)));
    }
}

#[test]
fn oversized_push_prefix_is_refused_before_the_body_arrives() {
    let prefix = u32::try_from(MAX_PUSH_FRAME + 1).unwrap().to_be_bytes();
    assert!(matches!(decode_push_frame(&prefix), Err(DecodeError::TooLong { .. })));
    assert_eq!(decode_push_frame(&[0, 0]), Ok(None));
}

#[test]
fn error_messages_are_cut_to_the_wire_limit() {
    let resp = Response::error(ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE));
    let bytes = resp.encode().unwrap();
    assert!(Response::decode(&bytes).is_ok());
}

#[test]
fn error_codes_are_stable() {
    for code in 0..=u16::MAX {
        assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
    }
    assert_eq!(ErrorCode::NotRegistered.to_u16(), 10);
    assert_eq!(ErrorCode::StaleEpoch.to_u16(), 21);
}

proptest! {
    #[test]
    fn every_request_fits_the_frame_its_tag_allows(request in request()) {
        if let Ok(frame) = request.encode() {
            let max = Request::max_frame(frame[0]).expect("known tag");
            prop_assert!(frame.len() <= max || frame.len() > MAX_REQUEST_FRAME);
        }
    }
}

#[test]
fn the_largest_frames_of_each_kind_fit_their_limit() {
    let big = |n: usize| vec![0u8; n];
    let cases = [
        Request::Register {
            invite: Some("x".repeat(MAX_INVITE_LEN)),
            certificate: big(crate::limits::MAX_CERTIFICATE),
        },
        Request::Fetch { group: big(MAX_GROUP_ID), after: 1, limit: 1 },
        Request::Ack { group: big(MAX_GROUP_ID), seq: 1 },
        Request::ClaimKeyPackage { account: [0; 32] },
        Request::AckWelcome { id: 1 },
    ];
    for r in cases {
        let frame = r.encode().unwrap();
        assert_eq!(frame.len(), Request::max_frame(frame[0]).unwrap(), "{}", r.kind());
    }
    assert_eq!(Request::max_frame(0x08), Some(MAX_REQUEST_FRAME));
    assert_eq!(Request::max_frame(0x0e), Some(1 + 1 + MAX_GROUP_ID));
    assert_eq!(Request::max_frame(0x04), Some(MAX_REQUEST_FRAME));
    assert_eq!(Request::max_frame(0xff), None);
}

/// The request seeds in the fuzz corpus were written by the codec before
/// the request table was declared once (issue 30): every one that decodes
/// now re-encodes to the same bytes, and every tag's seed decodes, so the
/// format did not move.
#[test]
fn the_corpus_requests_written_by_the_old_codec_read_and_write_the_same() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/wire_request");
    let mut tags = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(request) = Request::decode(&bytes) {
            assert_eq!(request.encode().unwrap(), bytes, "{}", request.kind());
            tags.insert(bytes[0]);
        }
    }
    assert!((0x01..=0x0e).all(|t| tags.contains(&t)), "seeds of some tags no longer decode: {tags:?}");
}

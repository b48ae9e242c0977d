//! The hush wire protocol, version 4 (ALPN `hush/4`).
//!
//! Version 2 (certified credentials) changed `Register`, `Status` and the
//! KeyPackage claim; version 3 (group repair) added the GroupInfo every
//! commit carries and `FetchGroupInfo`; version 4 (verifiable delivery,
//! [`crate::chain`]) added each group's chain head to `Accepted`, to every
//! fetched and pushed message, and `Head` / `SignedHead`; files (issue 32)
//! added requests 0x17–0x1b and responses 0x11–0x12 without changing any
//! existing frame, so they kept the version: an older server answers them
//! with `UnknownRequest`; so did post-quantum groups (issue 35, requests
//! 0x1c–0x1d: the original claim and count are of the classic suite). A peer of another version fails the
//! ALPN negotiation instead of misreading frames.
//!
//! Everything a second client needs to interoperate is on this page.
//!
//! # Transport
//!
//! QUIC with TLS 1.3 (see [`crate::auth`] for the certificates both sides
//! present). The ALPN protocol identifier is `hush/4`; it versions the whole
//! format below, so frames carry no version field.
//!
//! * **Requests**: the client opens one bidirectional stream per request,
//!   writes one request frame and finishes its send side. The server answers
//!   with exactly one response frame and finishes. Stream boundaries delimit
//!   the frames, so request and response frames have no length prefix. The
//!   server reads the tag first and then at most [`Request::max_frame`] of
//!   that tag (never more than [`MAX_REQUEST_FRAME`]); longer requests get
//!   [`ErrorCode::TooLarge`]. A key that is not a registered device may
//!   only send `Register`, of at most [`crate::limits::MAX_STRANGER_FRAME`]
//!   bytes, one at a time. Clients read at most [`MAX_RESPONSE_FRAME`].
//! * **Pushes**: once the connection belongs to a registered account, the
//!   server may open one unidirectional stream and write push frames on it,
//!   each a `u32` big-endian length `n` (at most [`MAX_PUSH_FRAME`]) followed
//!   by `n` bytes of push body.
//! * **Connection close codes** (QUIC application error codes) are listed in
//!   [`close`].
//!
//! # Encoding
//!
//! All integers are unsigned big-endian. `bytes8<max>` / `bytes16<max>` /
//! `bytes32<max>` are a `u8` / `u16` / `u32` length followed by that many
//! bytes, the length being at most `max`. `string16<max>` is `bytes16<max>`
//! holding UTF-8. `bool` is one byte, 0 or 1. `option<T>` is a `bool`
//! followed by `T` when true. Every frame starts with a one-byte tag; a
//! frame with bytes after its last field is malformed.
//!
//! ## Request frames
//!
//! | tag | request | fields |
//! | --- | --- | --- |
//! | 0x01 | `Register` | `option<bytes8<64>>` invite token (ASCII), `bytes16<1024>` device certificate ([`crate::auth::device`]) of the connection's key |
//! | 0x02 | `Status` | none |
//! | 0x03 | `Ping` | `u64` nonce |
//! | 0x04 | `PublishKeyPackages` | `u16` n (1..=100), n × `bytes32<16384>` KeyPackage (TLS encoding, RFC 9420 §10), all of one ciphersuite, `option<u16>` index of the last-resort package (it replaces the device's last-resort one of that suite); answered with the count of that suite |
//! | 0x05 | `ClaimKeyPackage` | `[u8; 32]` account (one package per device of that account comes back) |
//! | 0x06 | `CountKeyPackages` | none |
//! | 0x07 | `CreateGroup` | `bytes32<491520>` GroupInfo (an `MLSMessage`), `bytes32<491520>` ratchet tree (TLS `RatchetTree`) |
//! | 0x08 | `Send` | `bytes32<491520>` `MLSMessage` (PublicMessage commit or proposal, or PrivateMessage application message), `option<bytes32<491520>>` Welcome (`MLSMessage`), `option<bytes32<491520>>` GroupInfo (`MLSMessage`) of the epoch a commit creates: required with a commit, refused otherwise |
//! | 0x09 | `Fetch` | `bytes8<255>` group id, `u64` after (sequence), `u16` limit |
//! | 0x0a | `Ack` | `bytes8<255>` group id, `u64` sequence |
//! | 0x0b | `FetchWelcomes` | none |
//! | 0x0c | `AckWelcome` | `u64` Welcome id |
//! | 0x0d | `ListGroups` | none |
//! | 0x0e | `FetchGroupInfo` | `bytes8<255>` group id (current members only) |
//! | 0x0f | `RevokeDevice` | `bytes16<1024>` device revocation ([`crate::auth::device::DeviceRevocation`]) signed by the caller's account key |
//! | 0x10 | `ListDevices` | none |
//! | 0x11 | `LinkOpen` | `[u8; 16]` link id, `u32` seconds until it expires (1..=900) |
//! | 0x12 | `LinkOffer` | `[u8; 16]` link id, `bytes16<256>` sealed offer (a key that is not a device yet; once per link) |
//! | 0x13 | `LinkFetch` | `[u8; 16]` link id (the link's account) |
//! | 0x14 | `LinkAnswer` | `[u8; 16]` link id, `bytes16<1024>` device certificate for the offering key, `bytes32<1044480>` sealed bundle (with each group's state, see [`crate::client::link`]) |
//! | 0x15 | `LinkResult` | `[u8; 16]` link id (the offering key) |
//! | 0x16 | `Head` | `bytes8<255>` group id, `u64` sequence: the server's signature over the group's chain head after that message (one the caller may read, or the group's last) |
//! | 0x17 | `UploadOpen` | `bytes8<255>` group id, `u64` size: a padded blob size ([`crate::files::Layout::of_blob`]) for a group the caller is a current member of |
//! | 0x18 | `UploadStatus` | `[u8; 16]` blob id (the caller's own upload) |
//! | 0x19 | `Upload` | `[u8; 16]` blob id, `u64` offset (the bytes the server holds): the head of an upload stream; the blob's bytes from `offset` follow on the stream until the client finishes it, and the server answers once with `Upload` (or an error) |
//! | 0x1a | `Download` | `[u8; 16]` blob id, `u64` offset, `u64` length (0: to the end): answered, unlike any other request, with a `u32` length and a response frame (`Blob`, or an error), then the range's bytes |
//! | 0x1b | `UploadCancel` | `[u8; 16]` blob id (the caller's own unfinished upload) |
//! | 0x1c | `ClaimKeyPackages` | `[u8; 32]` account, `u16` ciphersuite (0x0001 classic, 0x004f pq): one package of that suite per device comes back (`KeyPackages`) |
//! | 0x1d | `CountKeyPackagesOf` | `u16` ciphersuite: the caller's packages of that suite (`KeyPackageCount`) |
//!
//! ## Response frames
//!
//! | tag | response | fields |
//! | --- | --- | --- |
//! | 0x00 | `Error` | `u16` code, `u64` detail, `string16<512>` message |
//! | 0x01 | `Registered` | `bool` created (false: the account already existed) |
//! | 0x02 | `Status` | `[u8; 32]` account key, `[u8; 32]` device key, `u64` registered at (Unix s), `u64` server time (Unix s), `[u8; 32]` the server's removal key (the `external_senders` entry every group must list), `u64` retention (seconds after which a message is deleted whether or not everyone read it) |
//! | 0x03 | `Pong` | `u64` nonce (echoed) |
//! | 0x04 | `KeyPackageCount` | `u32` count held (last resort excluded), `bool` has a last-resort package |
//! | 0x05 | `KeyPackages` | `u16` n (1..=16), n × `bytes32<16384>` KeyPackage, one per device of the claimed account |
//! | 0x06 | `Accepted` | `bytes8<255>` group id, `u64` sequence (0 for a new group), `u64` epoch after the message, `[u8; 32]` the group's chain head after the message (the genesis head for a new group) |
//! | 0x07 | `Messages` | `bytes8<255>` group id, `u16` n, n × (`u64` sequence, `u8` flags (bit 0: a head follows, bit 1: an expiry, bit 2: the message is gone; no other bit), `[u8; 32]` chain head after it if bit 0 (absent for a message stored before the chain began), `u64` when the group's timer deletes it if bit 1, `u64` epoch and `[u8; 32]` SHA-256 of what an expired message was if bit 2, `bytes32<491520>` `MLSMessage` (empty if bit 2)), `bool` more. A peer from before issue 33 wrote a `bool` where the flags are, which reads the same |
//! | 0x08 | `Done` | none |
//! | 0x09 | `Welcomes` | `u16` n, n × (`u64` id, `bytes32<491520>` `MLSMessage`) |
//! | 0x0a | `Groups` | `u16` n, n × (`bytes8<255>` group id, `u64` epoch, `u64` last sequence, `u64` acknowledged sequence, `u64` first sequence the server still holds (0: none), `bool` current member) |
//! | 0x0b | `GroupInfo` | `bytes8<255>` group id, `bytes32<491520>` the GroupInfo (`MLSMessage`) of the group's current epoch, as its last committer signed it, `option<bytes32<491520>>` the ratchet tree when that GroupInfo does not carry it |
//! | 0x0c | `Devices` | `u16` n (≤ 64), n × (`[u8; 32]` device key, `u64` registered at, `bool` revoked), oldest first |
//! | 0x0d | `LinkOffer` | `bytes16<256>` the sealed offer |
//! | 0x0e | `Linked` | `bytes16<1024>` the device certificate, `bytes32<1044480>` the sealed bundle |
//! | 0x0f | `LinkPending` | none: the other device has not answered yet |
//! | 0x10 | `SignedHead` | `bytes8<255>` group id, `u64` sequence, `[u8; 32]` head, `[u8; 32]` the server's Ed25519 key (the one the address pins), `[u8; 64]` its signature over the head ([`crate::chain::SignedHead::message`]) |
//! | 0x13 | `SignedHead` (by an online key) | as 0x10, the key being the server's online key, then its `[u8; 152]` certificate from the identity key ([`crate::auth::online::OnlineCert`]) |
//! | 0x11 | `Upload` | `[u8; 16]` blob id, `u64` size, `u64` bytes the server holds durably (where the next upload stream starts), `option<[u8; 32]>` the SHA-256 of the blob as stored, once complete |
//! | 0x12 | `Blob` | `u64` size, `[u8; 32]` SHA-256 of the blob, `u64` offset, `u64` length of the range that follows |
//!
//! `detail` is 0 unless the code says otherwise ([`ErrorCode`]).
//!
//! ## Push frames
//!
//! | tag | push | fields |
//! | --- | --- | --- |
//! | 0x01 | `Message` | `bytes8<255>` group id, `u64` sequence, `option<[u8; 32]>` chain head after it, `option<bytes32<65536>>` ciphertext |
//! | 0x02 | `Welcome` | none: a Welcome waits in the inbox |
//! | 0x03 | `Resync` | none: pushes were dropped; fetch from your cursors |

//! # Code
//!
//! One file per family: [`Request`] (declared as one table in `request`,
//! from which its codec, sizes and checks follow; field codecs in
//! `fields`), [`Response`], [`Push`], and [`ErrorCode`] with the [`close`]
//! codes.

mod codec;
mod error;
mod fields;
mod push;
mod request;
mod response;

pub use codec::{Reader, Writer};
pub use error::{close, ErrorCode};
pub use push::{decode_push_frame, Push};
pub use request::Request;
pub use response::{DeviceSummary, Gone, GroupSummary, Logged, Response, UploadState};

pub use crate::limits::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};

/// The ALPN protocol identifier of this format.
pub const ALPN: &[u8] = b"hush/4";

/// Why a frame could not be decoded. Always the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame ends early")]
    Truncated,
    #[error("{0} unexpected bytes after the frame")]
    TrailingBytes(usize),
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("unknown {what} tag {tag:#04x}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("{0} has an invalid value")]
    Invalid(&'static str),
}

/// Why a value could not be encoded: a field exceeds the limit the decoder
/// enforces. The caller's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{0} may not be empty")]
    Empty(&'static str),
}

#[cfg(test)]
mod tests;

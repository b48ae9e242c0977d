//! The hush wire protocol, version 3 (ALPN `hush/3`).
//!
//! Version 2 (certified credentials) changed `Register`, `Status` and the
//! KeyPackage claim; version 3 (group repair) added the GroupInfo every
//! commit carries and `FetchGroupInfo`. A peer of another version fails the
//! ALPN negotiation instead of misreading frames.
//!
//! Everything a second client needs to interoperate is on this page.
//!
//! # Transport
//!
//! QUIC with TLS 1.3 (see [`crate::auth`] for the certificates both sides
//! present). The ALPN protocol identifier is `hush/3`; it versions the whole
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
//! | 0x04 | `PublishKeyPackages` | `u16` n (1..=100), n × `bytes32<16384>` KeyPackage (TLS encoding, RFC 9420 §10), `option<u16>` index of the last-resort package |
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
//! | 0x14 | `LinkAnswer` | `[u8; 16]` link id, `bytes16<1024>` device certificate for the offering key, `bytes32<262144>` sealed bundle |
//! | 0x15 | `LinkResult` | `[u8; 16]` link id (the offering key) |
//!
//! ## Response frames
//!
//! | tag | response | fields |
//! | --- | --- | --- |
//! | 0x00 | `Error` | `u16` code, `u64` detail, `string16<512>` message |
//! | 0x01 | `Registered` | `bool` created (false: the account already existed) |
//! | 0x02 | `Status` | `[u8; 32]` account key, `[u8; 32]` device key, `u64` registered at (Unix s), `u64` server time (Unix s), `[u8; 32]` the server's removal key (the `external_senders` entry every group must list) |
//! | 0x03 | `Pong` | `u64` nonce (echoed) |
//! | 0x04 | `KeyPackageCount` | `u32` count held (last resort excluded), `bool` has a last-resort package |
//! | 0x05 | `KeyPackages` | `u16` n (1..=16), n × `bytes32<16384>` KeyPackage, one per device of the claimed account |
//! | 0x06 | `Accepted` | `bytes8<255>` group id, `u64` sequence (0 for a new group), `u64` epoch after the message |
//! | 0x07 | `Messages` | `bytes8<255>` group id, `u16` n, n × (`u64` sequence, `bytes32<491520>` `MLSMessage`), `bool` more |
//! | 0x08 | `Done` | none |
//! | 0x09 | `Welcomes` | `u16` n, n × (`u64` id, `bytes32<491520>` `MLSMessage`) |
//! | 0x0a | `Groups` | `u16` n, n × (`bytes8<255>` group id, `u64` epoch, `u64` last sequence, `u64` acknowledged sequence, `bool` current member) |
//! | 0x0b | `GroupInfo` | `bytes8<255>` group id, `bytes32<491520>` the GroupInfo (`MLSMessage`) of the group's current epoch, as its last committer signed it, `option<bytes32<491520>>` the ratchet tree when that GroupInfo does not carry it |
//! | 0x0c | `Devices` | `u16` n (≤ 64), n × (`[u8; 32]` device key, `u64` registered at, `bool` revoked), oldest first |
//! | 0x0d | `LinkOffer` | `bytes16<256>` the sealed offer |
//! | 0x0e | `Linked` | `bytes16<1024>` the device certificate, `bytes32<262144>` the sealed bundle |
//! | 0x0f | `LinkPending` | none: the other device has not answered yet |
//!
//! `detail` is 0 unless the code says otherwise ([`ErrorCode`]).
//!
//! ## Push frames
//!
//! | tag | push | fields |
//! | --- | --- | --- |
//! | 0x01 | `Message` | `bytes8<255>` group id, `u64` sequence, `option<bytes32<65536>>` ciphertext |
//! | 0x02 | `Welcome` | none: a Welcome waits in the inbox |
//! | 0x03 | `Resync` | none: pushes were dropped; fetch from your cursors |

mod codec;

pub use codec::{Reader, Writer};

use crate::limits::{
    MAX_CERTIFICATE, MAX_DEVICES_EVER, MAX_DEVICES_PER_ACCOUNT, MAX_ERROR_MESSAGE, MAX_FETCH_ENTRIES,
    MAX_GROUPS_LISTED, MAX_GROUP_ID, MAX_INVITE_LEN, MAX_KEY_PACKAGE, MAX_KEY_PACKAGES, MAX_LINK_BUNDLE,
    MAX_LINK_OFFER, MAX_MLS_MESSAGE, MAX_PUSH_CIPHERTEXT, MAX_PUSH_FRAME,
};
pub use crate::limits::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};

/// The ALPN protocol identifier of this format.
pub const ALPN: &[u8] = b"hush/3";

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

/// Stable numeric error codes. New codes may appear; an unknown code decodes
/// as [`ErrorCode::Other`] so old clients still show the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 1: the request frame could not be decoded.
    Malformed,
    /// 2: the request frame exceeded [`MAX_REQUEST_FRAME`], or a value
    /// exceeded a limit.
    TooLarge,
    /// 3: the request tag is not known to this server.
    UnknownRequest,
    /// 4: the server failed; nothing was changed. Retry later.
    Internal,
    /// 5: the server is shutting down. Reconnect later.
    ShuttingDown,
    /// 6: too many requests; `detail` is the number of milliseconds to wait.
    RateLimited,
    /// 7: the request stream did not deliver its frame in time.
    Timeout,
    /// 10: the key is not a registered account; only `Register` is allowed.
    NotRegistered,
    /// 11: the server needs an invite token to register.
    InviteRequired,
    /// 12: the invite token is not known to this server.
    InviteUnknown,
    /// 13: the invite token has expired.
    InviteExpired,
    /// 14: the invite token has no uses left.
    InviteUsedUp,
    /// 20: not a member of that group (or the group does not exist).
    NotMember,
    /// 21: the commit is for an old epoch; `detail` is the current epoch.
    StaleEpoch,
    /// 22: the commit or proposal failed MLS verification (the message says why).
    InvalidCommit,
    /// 23: a storage quota would be exceeded.
    QuotaExceeded,
    /// 24: a KeyPackage failed validation; `detail` is its index in the upload.
    InvalidKeyPackage,
    /// 25: the account has no KeyPackage left to claim.
    NoKeyPackage,
    /// 26: the MLS message is malformed or of a kind this request does not take.
    InvalidMessage,
    /// 27: a group with this id already exists.
    GroupExists,
    /// 28: a device certificate or an MLS leaf's credential is not valid
    /// (forged, for another account or device, or not matching the leaf's
    /// key); `detail` is the leaf index in the tree, or the package's index
    /// in an upload. The message says which leaf and why.
    InvalidCredential,
    /// 29: the group has no GroupInfo yet (it was created by an older
    /// server); any member's next commit stores one.
    NoGroupInfo,
    /// 30: this device was revoked, or its account removed by the
    /// operator; its key is refused for good.
    Revoked,
    /// 31: no such link (or not yours to use).
    LinkUnknown,
    /// 32: the link code expired.
    LinkExpired,
    /// 33: the link code was already used.
    LinkUsed,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::TooLarge => 2,
            Self::UnknownRequest => 3,
            Self::Internal => 4,
            Self::ShuttingDown => 5,
            Self::RateLimited => 6,
            Self::Timeout => 7,
            Self::NotRegistered => 10,
            Self::InviteRequired => 11,
            Self::InviteUnknown => 12,
            Self::InviteExpired => 13,
            Self::InviteUsedUp => 14,
            Self::NotMember => 20,
            Self::StaleEpoch => 21,
            Self::InvalidCommit => 22,
            Self::QuotaExceeded => 23,
            Self::InvalidKeyPackage => 24,
            Self::NoKeyPackage => 25,
            Self::InvalidMessage => 26,
            Self::GroupExists => 27,
            Self::InvalidCredential => 28,
            Self::NoGroupInfo => 29,
            Self::Revoked => 30,
            Self::LinkUnknown => 31,
            Self::LinkExpired => 32,
            Self::LinkUsed => 33,
            Self::Other(c) => c,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::Malformed,
            2 => Self::TooLarge,
            3 => Self::UnknownRequest,
            4 => Self::Internal,
            5 => Self::ShuttingDown,
            6 => Self::RateLimited,
            7 => Self::Timeout,
            10 => Self::NotRegistered,
            11 => Self::InviteRequired,
            12 => Self::InviteUnknown,
            13 => Self::InviteExpired,
            14 => Self::InviteUsedUp,
            20 => Self::NotMember,
            21 => Self::StaleEpoch,
            22 => Self::InvalidCommit,
            23 => Self::QuotaExceeded,
            24 => Self::InvalidKeyPackage,
            25 => Self::NoKeyPackage,
            26 => Self::InvalidMessage,
            27 => Self::GroupExists,
            28 => Self::InvalidCredential,
            29 => Self::NoGroupInfo,
            30 => Self::Revoked,
            31 => Self::LinkUnknown,
            32 => Self::LinkExpired,
            33 => Self::LinkUsed,
            c => Self::Other(c),
        }
    }
}

/// QUIC application close codes the server uses.
pub mod close {
    /// The peer closed normally.
    pub const NORMAL: u32 = 0;
    /// The server is shutting down.
    pub const SHUTTING_DOWN: u32 = 1;
    /// The key did not register before the deadline.
    pub const REGISTRATION_DEADLINE: u32 = 2;
    /// The peer broke the protocol (e.g. opened a stream it may not open).
    pub const PROTOCOL_VIOLATION: u32 = 3;
    /// Too many connections (in total or from this address).
    pub const BUSY: u32 = 4;
    /// The handshake did not yield an account key.
    pub const NOT_AUTHENTICATED: u32 = 5;
    /// The device was revoked or its account removed.
    pub const REVOKED: u32 = 6;

    /// A human description of a close code, for error messages.
    pub fn describe(code: u64) -> &'static str {
        match code {
            0 => "closed normally",
            1 => "the server is shutting down",
            2 => "this key is not registered and did not register in time",
            3 => "protocol violation",
            4 => "the server is busy (too many connections)",
            5 => "not authenticated",
            6 => "this device was revoked, or its account removed by the server's operator",
            _ => "unknown reason",
        }
    }
}

/// A request from client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Make the connection's key a device of a new account, using an invite
    /// token when the server requires one. `certificate` is the device
    /// certificate for the connection's key. Harmless for a device that is
    /// already registered with the same certificate.
    Register { invite: Option<String>, certificate: Vec<u8> },
    /// Who am I to the server?
    Status,
    /// Round trip check.
    Ping { nonce: u64 },
    /// Store KeyPackages for this account; `last_resort` marks one of them
    /// as the package handed out (and kept) when the others are gone.
    PublishKeyPackages { packages: Vec<Vec<u8>>, last_resort: Option<u16> },
    /// Take one KeyPackage of each of `account`'s devices, to add that
    /// account to a group.
    ClaimKeyPackage { account: [u8; 32] },
    /// How many KeyPackages does this account have left?
    CountKeyPackages,
    /// Register a new group from its GroupInfo and ratchet tree.
    CreateGroup { group_info: Vec<u8>, ratchet_tree: Vec<u8> },
    /// Post an MLS message to its group (the group id is read from the
    /// message), with the Welcome for the members a commit adds and, with
    /// every commit, the GroupInfo of the epoch it creates (what a member
    /// that cannot process the commit rejoins from).
    Send { message: Vec<u8>, welcome: Option<Vec<u8>>, group_info: Option<Vec<u8>> },
    /// Messages of `group` after sequence `after`, at most `limit`.
    Fetch { group: Vec<u8>, after: u64, limit: u16 },
    /// Everything in `group` up to `seq` has been processed.
    Ack { group: Vec<u8>, seq: u64 },
    /// Welcomes waiting for this account.
    FetchWelcomes,
    /// The Welcome `id` has been processed; delete it.
    AckWelcome { id: u64 },
    /// The groups this account is (or was) in.
    ListGroups,
    /// The GroupInfo of `group`'s current epoch, to rejoin it by an
    /// external commit (group repair).
    FetchGroupInfo { group: Vec<u8> },
    /// Revoke a device of the caller's account (signed by the account key).
    RevokeDevice { revocation: Vec<u8> },
    /// The caller's account's devices.
    ListDevices,
    /// Open a one-time link for a new device of the caller's account.
    LinkOpen { link: [u8; 16], expires_in: u32 },
    /// A new device's sealed keys, for the link (from a key that is not a
    /// device yet).
    LinkOffer { link: [u8; 16], offer: Vec<u8> },
    /// The offer waiting on the caller's link, if any.
    LinkFetch { link: [u8; 16] },
    /// The certificate for the offering key, and the sealed bundle for it.
    LinkAnswer { link: [u8; 16], certificate: Vec<u8>, bundle: Vec<u8> },
    /// The answer to the caller's offer, if any.
    LinkResult { link: [u8; 16] },
}

/// Reads a group id field.
fn group_id(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    Ok(r.bytes8("group id", MAX_GROUP_ID)?.to_vec())
}

/// Reads an MLS message field.
fn mls(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u8>, DecodeError> {
    Ok(r.bytes32(field, MAX_MLS_MESSAGE)?.to_vec())
}

/// Reads a list count, capped.
impl Request {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut w = Writer::new();
        match self {
            Self::Register { invite, certificate } => {
                w.u8(0x01);
                match invite {
                    None => w.bool(false),
                    Some(token) => {
                        w.bool(true);
                        w.bytes8("invite", token.as_bytes(), MAX_INVITE_LEN)?;
                    }
                }
                w.bytes16("certificate", certificate, MAX_CERTIFICATE)?;
            }
            Self::Status => w.u8(0x02),
            Self::Ping { nonce } => {
                w.u8(0x03);
                w.u64(*nonce);
            }
            Self::PublishKeyPackages { packages, last_resort } => {
                w.u8(0x04);
                w.count("key packages", packages.len(), MAX_KEY_PACKAGES)?;
                for p in packages {
                    w.bytes32("key package", p, MAX_KEY_PACKAGE)?;
                }
                match last_resort {
                    None => w.bool(false),
                    Some(i) => {
                        w.bool(true);
                        w.u16(*i);
                    }
                }
            }
            Self::ClaimKeyPackage { account } => {
                w.u8(0x05);
                w.raw(account);
            }
            Self::CountKeyPackages => w.u8(0x06),
            Self::CreateGroup { group_info, ratchet_tree } => {
                w.u8(0x07);
                w.bytes32("group info", group_info, MAX_MLS_MESSAGE)?;
                w.bytes32("ratchet tree", ratchet_tree, MAX_MLS_MESSAGE)?;
            }
            Self::Send { message, welcome, group_info } => {
                w.u8(0x08);
                w.bytes32("message", message, MAX_MLS_MESSAGE)?;
                for (field, value) in [("welcome", welcome), ("group info", group_info)] {
                    match value {
                        None => w.bool(false),
                        Some(v) => {
                            w.bool(true);
                            w.bytes32(field, v, MAX_MLS_MESSAGE)?;
                        }
                    }
                }
            }
            Self::Fetch { group, after, limit } => {
                w.u8(0x09);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(*after);
                w.u16(*limit);
            }
            Self::Ack { group, seq } => {
                w.u8(0x0a);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(*seq);
            }
            Self::FetchWelcomes => w.u8(0x0b),
            Self::AckWelcome { id } => {
                w.u8(0x0c);
                w.u64(*id);
            }
            Self::ListGroups => w.u8(0x0d),
            Self::FetchGroupInfo { group } => {
                w.u8(0x0e);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
            }
            Self::RevokeDevice { revocation } => {
                w.u8(0x0f);
                w.bytes16("revocation", revocation, MAX_CERTIFICATE)?;
            }
            Self::ListDevices => w.u8(0x10),
            Self::LinkOpen { link, expires_in } => {
                w.u8(0x11);
                w.raw(link);
                w.u32(*expires_in);
            }
            Self::LinkOffer { link, offer } => {
                w.u8(0x12);
                w.raw(link);
                w.bytes16("offer", offer, MAX_LINK_OFFER)?;
            }
            Self::LinkFetch { link } => {
                w.u8(0x13);
                w.raw(link);
            }
            Self::LinkAnswer { link, certificate, bundle } => {
                w.u8(0x14);
                w.raw(link);
                w.bytes16("certificate", certificate, MAX_CERTIFICATE)?;
                w.bytes32("bundle", bundle, MAX_LINK_BUNDLE)?;
            }
            Self::LinkResult { link } => {
                w.u8(0x15);
                w.raw(link);
            }
        }
        Ok(w.into_inner())
    }

    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let req = match r.u8()? {
            0x01 => {
                let invite = if r.bool("invite present")? {
                    let bytes = r.bytes8("invite", MAX_INVITE_LEN)?;
                    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8("invite"))?;
                    Some(text.to_owned())
                } else {
                    None
                };
                let certificate = r.bytes16("certificate", MAX_CERTIFICATE)?.to_vec();
                Self::Register { invite, certificate }
            }
            0x02 => Self::Status,
            0x03 => Self::Ping { nonce: r.u64()? },
            0x04 => {
                let n = r.count("key packages", MAX_KEY_PACKAGES)?;
                let mut packages = Vec::new();
                for _ in 0..n {
                    packages.push(r.bytes32("key package", MAX_KEY_PACKAGE)?.to_vec());
                }
                let last_resort = if r.bool("last resort present")? { Some(r.u16()?) } else { None };
                Self::PublishKeyPackages { packages, last_resort }
            }
            0x05 => Self::ClaimKeyPackage { account: r.array()? },
            0x06 => Self::CountKeyPackages,
            0x07 => {
                Self::CreateGroup { group_info: mls(&mut r, "group info")?, ratchet_tree: mls(&mut r, "ratchet tree")? }
            }
            0x08 => {
                let message = mls(&mut r, "message")?;
                let welcome = if r.bool("welcome present")? { Some(mls(&mut r, "welcome")?) } else { None };
                let group_info = if r.bool("group info present")? { Some(mls(&mut r, "group info")?) } else { None };
                Self::Send { message, welcome, group_info }
            }
            0x09 => Self::Fetch { group: group_id(&mut r)?, after: r.u64()?, limit: r.u16()? },
            0x0a => Self::Ack { group: group_id(&mut r)?, seq: r.u64()? },
            0x0b => Self::FetchWelcomes,
            0x0c => Self::AckWelcome { id: r.u64()? },
            0x0d => Self::ListGroups,
            0x0e => Self::FetchGroupInfo { group: group_id(&mut r)? },
            0x0f => Self::RevokeDevice { revocation: r.bytes16("revocation", MAX_CERTIFICATE)?.to_vec() },
            0x10 => Self::ListDevices,
            0x11 => Self::LinkOpen { link: r.array()?, expires_in: r.u32()? },
            0x12 => Self::LinkOffer { link: r.array()?, offer: r.bytes16("offer", MAX_LINK_OFFER)?.to_vec() },
            0x13 => Self::LinkFetch { link: r.array()? },
            0x14 => Self::LinkAnswer {
                link: r.array()?,
                certificate: r.bytes16("certificate", MAX_CERTIFICATE)?.to_vec(),
                bundle: r.bytes32("bundle", MAX_LINK_BUNDLE)?.to_vec(),
            },
            0x15 => Self::LinkResult { link: r.array()? },
            tag => return Err(DecodeError::UnknownTag { what: "request", tag }),
        };
        r.finish()?;
        Ok(req)
    }

    /// The largest frame a request with this tag can be, from its fields'
    /// limits (capped at [`MAX_REQUEST_FRAME`]); `None` for an unknown tag.
    /// The server reads the tag first and reserves this much memory before
    /// reading the rest, so a small request can never hold a large buffer.
    pub fn max_frame(tag: u8) -> Option<usize> {
        let group_id = 1 + MAX_GROUP_ID;
        let mls = 4 + MAX_MLS_MESSAGE;
        let len = match tag {
            0x01 => 1 + 1 + 1 + MAX_INVITE_LEN + 2 + MAX_CERTIFICATE,
            0x02 | 0x06 | 0x0b | 0x0d | 0x10 => 1,
            0x03 | 0x0c => 1 + 8,
            0x04 => 1 + 2 + MAX_KEY_PACKAGES * (4 + MAX_KEY_PACKAGE) + 1 + 2,
            0x05 => 1 + 32,
            0x07 => 1 + 2 * mls,
            0x08 => 1 + mls + 2 * (1 + mls),
            0x09 => 1 + group_id + 8 + 2,
            0x0a => 1 + group_id + 8,
            0x0e => 1 + group_id,
            0x0f => 1 + 2 + MAX_CERTIFICATE,
            0x11 => 1 + 16 + 4,
            0x12 => 1 + 16 + 2 + MAX_LINK_OFFER,
            0x13 | 0x15 => 1 + 16,
            0x14 => 1 + 16 + 2 + MAX_CERTIFICATE + 4 + MAX_LINK_BUNDLE,
            _ => return None,
        };
        Some(len.min(MAX_REQUEST_FRAME))
    }

    /// Whether a key that is not a registered device may send a request
    /// with this tag: `Register`, and the new device's half of linking
    /// (`LinkOffer`, `LinkResult`). Anything else is refused unread.
    pub fn from_stranger(tag: u8) -> bool {
        matches!(tag, 0x01 | 0x12 | 0x15)
    }

    /// A short name for logs (never the contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Register { .. } => "register",
            Self::Status => "status",
            Self::Ping { .. } => "ping",
            Self::PublishKeyPackages { .. } => "publish-key-packages",
            Self::ClaimKeyPackage { .. } => "claim-key-package",
            Self::CountKeyPackages => "count-key-packages",
            Self::CreateGroup { .. } => "create-group",
            Self::Send { .. } => "send",
            Self::Fetch { .. } => "fetch",
            Self::Ack { .. } => "ack",
            Self::FetchWelcomes => "fetch-welcomes",
            Self::AckWelcome { .. } => "ack-welcome",
            Self::ListGroups => "list-groups",
            Self::FetchGroupInfo { .. } => "fetch-group-info",
            Self::RevokeDevice { .. } => "revoke-device",
            Self::ListDevices => "list-devices",
            Self::LinkOpen { .. } => "link-open",
            Self::LinkOffer { .. } => "link-offer",
            Self::LinkFetch { .. } => "link-fetch",
            Self::LinkAnswer { .. } => "link-answer",
            Self::LinkResult { .. } => "link-result",
        }
    }
}

/// A response from server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    Error { code: ErrorCode, detail: u64, message: String },
    Registered { created: bool },
    Status { account: [u8; 32], device: [u8; 32], registered_at: u64, server_time: u64, removal_key: [u8; 32] },
    Pong { nonce: u64 },
    KeyPackageCount { count: u32, last_resort: bool },
    KeyPackages { packages: Vec<Vec<u8>> },
    Accepted { group: Vec<u8>, seq: u64, epoch: u64 },
    Messages { group: Vec<u8>, messages: Vec<(u64, Vec<u8>)>, more: bool },
    Done,
    Welcomes { welcomes: Vec<(u64, Vec<u8>)> },
    Groups { groups: Vec<GroupSummary> },
    GroupInfo { group: Vec<u8>, group_info: Vec<u8>, ratchet_tree: Option<Vec<u8>> },
    Devices { devices: Vec<DeviceSummary> },
    LinkOffer { offer: Vec<u8> },
    Linked { certificate: Vec<u8>, bundle: Vec<u8> },
    LinkPending,
}

/// One entry of [`Response::Devices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSummary {
    pub device: [u8; 32],
    pub registered_at: u64,
    pub revoked: bool,
}

/// One entry of [`Response::Groups`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    pub group: Vec<u8>,
    pub epoch: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
    pub member: bool,
}

impl Response {
    /// A short name for errors and logs (never the contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Error { .. } => "error",
            Self::Registered { .. } => "registered",
            Self::Status { .. } => "status",
            Self::Pong { .. } => "pong",
            Self::KeyPackageCount { .. } => "key-package-count",
            Self::KeyPackages { .. } => "key-packages",
            Self::Accepted { .. } => "accepted",
            Self::Messages { .. } => "messages",
            Self::Done => "done",
            Self::Welcomes { .. } => "welcomes",
            Self::Groups { .. } => "groups",
            Self::GroupInfo { .. } => "group-info",
            Self::Devices { .. } => "devices",
            Self::LinkOffer { .. } => "link-offer",
            Self::Linked { .. } => "linked",
            Self::LinkPending => "link-pending",
        }
    }

    /// An error response with `detail` 0. Messages longer than the wire
    /// limit are cut at a character boundary.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error { code, detail: 0, message: truncate(message.into(), MAX_ERROR_MESSAGE) }
    }

    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut w = Writer::new();
        match self {
            Self::Error { code, detail, message } => {
                w.u8(0x00);
                w.u16(code.to_u16());
                w.u64(*detail);
                w.bytes16("error message", message.as_bytes(), MAX_ERROR_MESSAGE)?;
            }
            Self::Registered { created } => {
                w.u8(0x01);
                w.bool(*created);
            }
            Self::Status { account, device, registered_at, server_time, removal_key } => {
                w.u8(0x02);
                w.raw(account);
                w.raw(device);
                w.u64(*registered_at);
                w.u64(*server_time);
                w.raw(removal_key);
            }
            Self::Pong { nonce } => {
                w.u8(0x03);
                w.u64(*nonce);
            }
            Self::KeyPackageCount { count, last_resort } => {
                w.u8(0x04);
                w.u32(*count);
                w.bool(*last_resort);
            }
            Self::KeyPackages { packages } => {
                w.u8(0x05);
                if packages.is_empty() {
                    return Err(EncodeError::Empty("key packages"));
                }
                w.count("key packages", packages.len(), MAX_DEVICES_PER_ACCOUNT)?;
                for p in packages {
                    w.bytes32("key package", p, MAX_KEY_PACKAGE)?;
                }
            }
            Self::Accepted { group, seq, epoch } => {
                w.u8(0x06);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(*seq);
                w.u64(*epoch);
            }
            Self::Messages { group, messages, more } => {
                w.u8(0x07);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.count("messages", messages.len(), MAX_FETCH_ENTRIES)?;
                for (seq, m) in messages {
                    w.u64(*seq);
                    w.bytes32("message", m, MAX_MLS_MESSAGE)?;
                }
                w.bool(*more);
            }
            Self::Done => w.u8(0x08),
            Self::Welcomes { welcomes } => {
                w.u8(0x09);
                w.count("welcomes", welcomes.len(), MAX_FETCH_ENTRIES)?;
                for (id, m) in welcomes {
                    w.u64(*id);
                    w.bytes32("welcome", m, MAX_MLS_MESSAGE)?;
                }
            }
            Self::Groups { groups } => {
                w.u8(0x0a);
                w.count("groups", groups.len(), MAX_GROUPS_LISTED)?;
                for g in groups {
                    w.bytes8("group id", &g.group, MAX_GROUP_ID)?;
                    w.u64(g.epoch);
                    w.u64(g.last_seq);
                    w.u64(g.acked_seq);
                    w.bool(g.member);
                }
            }
            Self::GroupInfo { group, group_info, ratchet_tree } => {
                w.u8(0x0b);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.bytes32("group info", group_info, MAX_MLS_MESSAGE)?;
                match ratchet_tree {
                    None => w.bool(false),
                    Some(t) => {
                        w.bool(true);
                        w.bytes32("ratchet tree", t, MAX_MLS_MESSAGE)?;
                    }
                }
            }
            Self::Devices { devices } => {
                w.u8(0x0c);
                w.count("devices", devices.len(), MAX_DEVICES_EVER)?;
                for d in devices {
                    w.raw(&d.device);
                    w.u64(d.registered_at);
                    w.bool(d.revoked);
                }
            }
            Self::LinkOffer { offer } => {
                w.u8(0x0d);
                w.bytes16("offer", offer, MAX_LINK_OFFER)?;
            }
            Self::Linked { certificate, bundle } => {
                w.u8(0x0e);
                w.bytes16("certificate", certificate, MAX_CERTIFICATE)?;
                w.bytes32("bundle", bundle, MAX_LINK_BUNDLE)?;
            }
            Self::LinkPending => w.u8(0x0f),
        }
        Ok(w.into_inner())
    }

    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let resp = match r.u8()? {
            0x00 => {
                let code = ErrorCode::from_u16(r.u16()?);
                let detail = r.u64()?;
                let message = r.string16("error message", MAX_ERROR_MESSAGE)?.to_owned();
                Self::Error { code, detail, message }
            }
            0x01 => Self::Registered { created: r.bool("created")? },
            0x02 => Self::Status {
                account: r.array()?,
                device: r.array()?,
                registered_at: r.u64()?,
                server_time: r.u64()?,
                removal_key: r.array()?,
            },
            0x03 => Self::Pong { nonce: r.u64()? },
            0x04 => Self::KeyPackageCount { count: r.u32()?, last_resort: r.bool("last resort")? },
            0x05 => {
                let n = r.count("key packages", MAX_DEVICES_PER_ACCOUNT)?;
                if n == 0 {
                    return Err(DecodeError::Invalid("key packages (none)"));
                }
                let mut packages = Vec::new();
                for _ in 0..n {
                    packages.push(r.bytes32("key package", MAX_KEY_PACKAGE)?.to_vec());
                }
                Self::KeyPackages { packages }
            }
            0x06 => Self::Accepted { group: group_id(&mut r)?, seq: r.u64()?, epoch: r.u64()? },
            0x07 => {
                let group = group_id(&mut r)?;
                let n = r.count("messages", MAX_FETCH_ENTRIES)?;
                let mut messages = Vec::new();
                for _ in 0..n {
                    messages.push((r.u64()?, mls(&mut r, "message")?));
                }
                Self::Messages { group, messages, more: r.bool("more")? }
            }
            0x08 => Self::Done,
            0x09 => {
                let n = r.count("welcomes", MAX_FETCH_ENTRIES)?;
                let mut welcomes = Vec::new();
                for _ in 0..n {
                    welcomes.push((r.u64()?, mls(&mut r, "welcome")?));
                }
                Self::Welcomes { welcomes }
            }
            0x0a => {
                let n = r.count("groups", MAX_GROUPS_LISTED)?;
                let mut groups = Vec::new();
                for _ in 0..n {
                    groups.push(GroupSummary {
                        group: group_id(&mut r)?,
                        epoch: r.u64()?,
                        last_seq: r.u64()?,
                        acked_seq: r.u64()?,
                        member: r.bool("member")?,
                    });
                }
                Self::Groups { groups }
            }
            0x0b => {
                let group = group_id(&mut r)?;
                let group_info = mls(&mut r, "group info")?;
                let ratchet_tree =
                    if r.bool("ratchet tree present")? { Some(mls(&mut r, "ratchet tree")?) } else { None };
                Self::GroupInfo { group, group_info, ratchet_tree }
            }
            0x0c => {
                let n = r.count("devices", MAX_DEVICES_EVER)?;
                let mut devices = Vec::new();
                for _ in 0..n {
                    devices.push(DeviceSummary {
                        device: r.array()?,
                        registered_at: r.u64()?,
                        revoked: r.bool("revoked")?,
                    });
                }
                Self::Devices { devices }
            }
            0x0d => Self::LinkOffer { offer: r.bytes16("offer", MAX_LINK_OFFER)?.to_vec() },
            0x0e => Self::Linked {
                certificate: r.bytes16("certificate", MAX_CERTIFICATE)?.to_vec(),
                bundle: r.bytes32("bundle", MAX_LINK_BUNDLE)?.to_vec(),
            },
            0x0f => Self::LinkPending,
            tag => return Err(DecodeError::UnknownTag { what: "response", tag }),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// A server-initiated event on the push stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Push {
    /// A new message in `group` at sequence `seq`, with its ciphertext when
    /// it is small enough to inline.
    Message { group: Vec<u8>, seq: u64, ciphertext: Option<Vec<u8>> },
    /// A Welcome waits in this account's inbox.
    Welcome,
    /// Pushes were dropped because the client read too slowly: fetch.
    Resync,
}

impl Push {
    /// The push body, without the stream's length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut w = Writer::new();
        match self {
            Self::Message { group, seq, ciphertext } => {
                w.u8(0x01);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(*seq);
                match ciphertext {
                    None => w.bool(false),
                    Some(ct) => {
                        w.bool(true);
                        w.bytes32("ciphertext", ct, MAX_PUSH_CIPHERTEXT)?;
                    }
                }
            }
            Self::Welcome => w.u8(0x02),
            Self::Resync => w.u8(0x03),
        }
        Ok(w.into_inner())
    }

    /// Decodes one push body (without the length prefix).
    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let push = match r.u8()? {
            0x01 => {
                let group = r.bytes8("group id", MAX_GROUP_ID)?.to_vec();
                let seq = r.u64()?;
                let ciphertext = if r.bool("ciphertext present")? {
                    Some(r.bytes32("ciphertext", MAX_PUSH_CIPHERTEXT)?.to_vec())
                } else {
                    None
                };
                Self::Message { group, seq, ciphertext }
            }
            0x02 => Self::Welcome,
            0x03 => Self::Resync,
            tag => return Err(DecodeError::UnknownTag { what: "push", tag }),
        };
        r.finish()?;
        Ok(push)
    }

    /// The push body with its 4-byte length prefix, ready for the stream.
    pub fn encode_framed(&self) -> Result<Vec<u8>, EncodeError> {
        let body = self.encode()?;
        let mut w = Writer::new();
        w.bytes32("push frame", &body, MAX_PUSH_FRAME)?;
        Ok(w.into_inner())
    }
}

/// Splits the first complete push frame off a push-stream buffer.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, and
/// `Ok(Some((push, consumed)))` otherwise. A length prefix above
/// [`MAX_PUSH_FRAME`] is an error as soon as the prefix is seen.
pub fn decode_push_frame(buf: &[u8]) -> Result<Option<(Push, usize)>, DecodeError> {
    let mut r = Reader::new(buf);
    let Ok(len) = r.u32() else { return Ok(None) };
    let len = usize::try_from(len).map_err(|_| DecodeError::Invalid("push frame length"))?;
    if len > MAX_PUSH_FRAME {
        return Err(DecodeError::TooLong { field: "push frame", len, max: MAX_PUSH_FRAME });
    }
    if r.remaining() < len {
        return Ok(None);
    }
    let body = r.take(len)?;
    let push = Push::decode(body)?;
    Ok(Some((push, 4 + len)))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests;

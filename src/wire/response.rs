//! Response frames.

use super::{DecodeError, EncodeError, ErrorCode, Reader, Writer};
use crate::chain::{Head, SignedHead};
use crate::limits::{
    MAX_CERTIFICATE, MAX_DEVICES_EVER, MAX_DEVICES_PER_ACCOUNT, MAX_ERROR_MESSAGE, MAX_FETCH_ENTRIES,
    MAX_GROUPS_LISTED, MAX_GROUP_ID, MAX_KEY_PACKAGE, MAX_LINK_BUNDLE, MAX_LINK_OFFER, MAX_MLS_MESSAGE,
};

/// Reads a group id field.
fn group_id(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    Ok(r.bytes8("group id", MAX_GROUP_ID)?.to_vec())
}

/// Reads an MLS message field.
fn mls(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u8>, DecodeError> {
    Ok(r.bytes32(field, MAX_MLS_MESSAGE)?.to_vec())
}

/// Writes an optional head.
pub(super) fn write_opt_head(w: &mut Writer, head: &Option<Head>) {
    match head {
        None => w.bool(false),
        Some(h) => {
            w.bool(true);
            w.raw(&h.0);
        }
    }
}

/// One message of a group's log as the server hands it out: its sequence
/// number, the group's chain head after it (`None` for a message stored
/// before the chain began), and the `MLSMessage`.
///
/// In a group with disappearing messages (issue 33) `expires` is when the
/// server deletes the message, and a message whose time is up comes as
/// `gone`: its bytes deleted, its epoch and digest kept so a member's chain
/// still links through it (`data` is then empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub seq: u64,
    pub head: Option<Head>,
    pub data: Vec<u8>,
    pub expires: Option<u64>,
    pub gone: Option<Gone>,
}

impl Logged {
    /// A message as stored, without a timer.
    pub fn new(seq: u64, head: Option<Head>, data: Vec<u8>) -> Self {
        Self { seq, head, data, expires: None, gone: None }
    }
}

/// What is left of an expired message: the epoch it was sent in and its
/// SHA-256, what its link in the group's chain hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone {
    pub epoch: u64,
    pub digest: crate::chain::MessageDigest,
}

/// Flags of a [`Logged`] entry: which optional fields follow. An older
/// peer wrote a bool here (head or not), which these read the same.
const LOGGED_HEAD: u8 = 0x01;
const LOGGED_EXPIRES: u8 = 0x02;
const LOGGED_GONE: u8 = 0x04;

fn write_logged(w: &mut Writer, m: &Logged) -> Result<(), EncodeError> {
    w.u64(m.seq);
    let flags = if m.head.is_some() { LOGGED_HEAD } else { 0 }
        | if m.expires.is_some() { LOGGED_EXPIRES } else { 0 }
        | if m.gone.is_some() { LOGGED_GONE } else { 0 };
    w.u8(flags);
    if let Some(h) = &m.head {
        w.raw(&h.0);
    }
    if let Some(t) = m.expires {
        w.u64(t);
    }
    if let Some(g) = &m.gone {
        w.u64(g.epoch);
        w.raw(&g.digest.0);
    }
    let data: &[u8] = if m.gone.is_some() { &[] } else { &m.data };
    w.bytes32("message", data, MAX_MLS_MESSAGE)
}

fn read_logged(r: &mut Reader<'_>) -> Result<Logged, DecodeError> {
    let seq = r.u64()?;
    let flags = r.u8()?;
    if flags & !(LOGGED_HEAD | LOGGED_EXPIRES | LOGGED_GONE) != 0 {
        return Err(DecodeError::Invalid("message flags"));
    }
    let head = if flags & LOGGED_HEAD != 0 { Some(Head(r.array()?)) } else { None };
    let expires = if flags & LOGGED_EXPIRES != 0 { Some(r.u64()?) } else { None };
    let gone = if flags & LOGGED_GONE != 0 {
        Some(Gone { epoch: r.u64()?, digest: crate::chain::MessageDigest(r.array()?) })
    } else {
        None
    };
    let data = mls(r, "message")?;
    if gone.is_some() && !data.is_empty() {
        return Err(DecodeError::Invalid("an expired message with bytes"));
    }
    Ok(Logged { seq, head, data, expires, gone })
}

/// A response from server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    Error {
        code: ErrorCode,
        detail: u64,
        message: String,
    },
    Registered {
        created: bool,
    },
    /// `retention`: seconds after which the server deletes a message
    /// whether or not everyone read it.
    Status {
        account: [u8; 32],
        device: [u8; 32],
        registered_at: u64,
        server_time: u64,
        removal_key: [u8; 32],
        retention: u64,
    },
    Pong {
        nonce: u64,
    },
    KeyPackageCount {
        count: u32,
        last_resort: bool,
    },
    KeyPackages {
        packages: Vec<Vec<u8>>,
    },
    /// `head`: the group's chain head after the message (for a new group,
    /// the genesis head).
    Accepted {
        group: Vec<u8>,
        seq: u64,
        epoch: u64,
        head: Head,
    },
    Messages {
        group: Vec<u8>,
        messages: Vec<Logged>,
        more: bool,
    },
    Done,
    Welcomes {
        welcomes: Vec<(u64, Vec<u8>)>,
    },
    Groups {
        groups: Vec<GroupSummary>,
    },
    GroupInfo {
        group: Vec<u8>,
        group_info: Vec<u8>,
        ratchet_tree: Option<Vec<u8>>,
    },
    Devices {
        devices: Vec<DeviceSummary>,
    },
    LinkOffer {
        offer: Vec<u8>,
    },
    Linked {
        certificate: Vec<u8>,
        bundle: Vec<u8>,
    },
    LinkPending,
    /// The server's signature over the group's head at a sequence number.
    SignedHead {
        group: Vec<u8>,
        signed: SignedHead,
    },
    /// An upload and how much of it the server holds durably; `hash` (the
    /// SHA-256 of the blob as the server stored it) once it is complete.
    Upload(UploadState),
    /// The head of a download stream: the blob's size and hash, and the
    /// range of bytes that follow this frame on the stream.
    Blob {
        size: u64,
        hash: [u8; 32],
        offset: u64,
        length: u64,
    },
}

/// Where an upload stands ([`Response::Upload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadState {
    pub id: [u8; 16],
    /// The blob's size (what was opened).
    pub size: u64,
    /// Bytes the server holds durably: the next upload stream starts here.
    pub received: u64,
    pub hash: Option<[u8; 32]>,
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
    /// The first message the server still holds (0: none).
    pub first_seq: u64,
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
            Self::SignedHead { .. } => "signed-head",
            Self::Upload(_) => "upload",
            Self::Blob { .. } => "blob",
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
            Self::Status { account, device, registered_at, server_time, removal_key, retention } => {
                w.u8(0x02);
                w.raw(account);
                w.raw(device);
                w.u64(*registered_at);
                w.u64(*server_time);
                w.raw(removal_key);
                w.u64(*retention);
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
            Self::Accepted { group, seq, epoch, head } => {
                w.u8(0x06);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(*seq);
                w.u64(*epoch);
                w.raw(&head.0);
            }
            Self::Messages { group, messages, more } => {
                w.u8(0x07);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.count("messages", messages.len(), MAX_FETCH_ENTRIES)?;
                for m in messages {
                    write_logged(&mut w, m)?;
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
                    w.u64(g.first_seq);
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
            Self::SignedHead { group, signed } => {
                w.u8(if signed.cert.is_some() { 0x13 } else { 0x10 });
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(signed.seq);
                w.raw(&signed.head.0);
                w.raw(&signed.key);
                w.raw(&signed.signature);
                if let Some(cert) = &signed.cert {
                    w.raw(cert);
                }
            }
            Self::Upload(u) => {
                w.u8(0x11);
                w.raw(&u.id);
                w.u64(u.size);
                w.u64(u.received);
                match &u.hash {
                    None => w.bool(false),
                    Some(h) => {
                        w.bool(true);
                        w.raw(h);
                    }
                }
            }
            Self::Blob { size, hash, offset, length } => {
                w.u8(0x12);
                w.u64(*size);
                w.raw(hash);
                w.u64(*offset);
                w.u64(*length);
            }
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
                retention: r.u64()?,
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
            0x06 => Self::Accepted { group: group_id(&mut r)?, seq: r.u64()?, epoch: r.u64()?, head: Head(r.array()?) },
            0x07 => {
                let group = group_id(&mut r)?;
                let n = r.count("messages", MAX_FETCH_ENTRIES)?;
                let mut messages = Vec::new();
                for _ in 0..n {
                    messages.push(read_logged(&mut r)?);
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
                        first_seq: r.u64()?,
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
            code @ (0x10 | 0x13) => {
                let group = group_id(&mut r)?;
                let (seq, head, key, signature) = (r.u64()?, Head(r.array()?), r.array()?, r.array()?);
                // The certificate is read as bytes: the client checks it.
                let cert = match code {
                    0x13 => Some(r.array()?),
                    _ => None,
                };
                Self::SignedHead { group, signed: SignedHead { seq, head, key, signature, cert } }
            }
            0x11 => Self::Upload(UploadState {
                id: r.array()?,
                size: r.u64()?,
                received: r.u64()?,
                hash: if r.bool("hash present")? { Some(r.array()?) } else { None },
            }),
            0x12 => Self::Blob { size: r.u64()?, hash: r.array()?, offset: r.u64()?, length: r.u64()? },
            tag => return Err(DecodeError::UnknownTag { what: "response", tag }),
        };
        r.finish()?;
        Ok(resp)
    }
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

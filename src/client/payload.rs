//! What members put inside MLS application messages: one kind byte, then
//! UTF-8.
//!
//! * `0x01` text a member wrote;
//! * `0x02` the group's name, sent to members when they are added (names
//!   travel encrypted; the server never sees them);
//! * `0x03` an account-signed device revocation (its fixed encoding, see
//!   [`crate::auth::DeviceRevocation`]), sent by the account's first
//!   device to every group the revoked device is in, so members refuse
//!   that device's leaves whatever the server relays;
//! * `0x04` a file ([`crate::files::FileRef`]: the blob's id, key and hash,
//!   the file's size, name, media type and a caption).
//!
//! The server cannot read payloads, but any member can send anything:
//! [`Payload::decode`] accepts every byte string without panicking, reads
//! invalid UTF-8 lossily (what was sent is shown, marked where broken) and
//! reports kinds it does not know, so a newer client's payloads are skipped
//! rather than shown as text.

use thiserror::Error;

use crate::files::FileRef;

const KIND_TEXT: u8 = 0x01;
const KIND_GROUP_NAME: u8 = 0x02;
const KIND_REVOCATION: u8 = 0x03;
const KIND_FILE: u8 = 0x04;

/// One application payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(String),
    GroupName(String),
    /// Bytes as sent: verify with [`crate::auth::DeviceRevocation::decode`].
    Revocation(Vec<u8>),
    File(FileRef),
}

/// A payload this client cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PayloadError {
    #[error("an empty payload")]
    Empty,
    #[error("a payload of unknown kind {0:#04x}")]
    UnknownKind(u8),
    #[error("a file message that does not decode")]
    BadFile,
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        let file;
        let (kind, body) = match self {
            Payload::Text(t) => (KIND_TEXT, t.as_bytes()),
            Payload::GroupName(n) => (KIND_GROUP_NAME, n.as_bytes()),
            Payload::Revocation(r) => (KIND_REVOCATION, r.as_slice()),
            Payload::File(f) => {
                file = zeroize::Zeroizing::new(f.encode());
                (KIND_FILE, file.as_slice())
            }
        };
        let mut out = Vec::with_capacity(1 + body.len());
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let (&kind, rest) = bytes.split_first().ok_or(PayloadError::Empty)?;
        let text = || String::from_utf8_lossy(rest).into_owned();
        match kind {
            KIND_TEXT => Ok(Payload::Text(text())),
            KIND_GROUP_NAME => Ok(Payload::GroupName(text())),
            KIND_REVOCATION => Ok(Payload::Revocation(rest.to_vec())),
            KIND_FILE => FileRef::decode(rest).map(Payload::File).ok_or(PayloadError::BadFile),
            other => Err(PayloadError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_strangers_are_refused() {
        for p in [
            Payload::Text("hello ✓".into()),
            Payload::GroupName("team".into()),
            Payload::Text(String::new()),
            Payload::Revocation(vec![0xff, 0, 1]),
        ] {
            assert_eq!(Payload::decode(&p.encode()), Ok(p));
        }
        assert_eq!(Payload::decode(&[]), Err(PayloadError::Empty));
        assert_eq!(Payload::decode(&[9, b'x']), Err(PayloadError::UnknownKind(9)));
        assert_eq!(Payload::decode(&[1, 0xff, b'a']), Ok(Payload::Text("\u{fffd}a".into())));
        // The bytes on the wire stay what clients already send.
        assert_eq!(Payload::Text("hi".into()).encode(), b"\x01hi");
        assert_eq!(Payload::GroupName("g".into()).encode(), b"\x02g");
    }
}

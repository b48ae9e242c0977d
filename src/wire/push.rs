//! Push frames, on the server's one unidirectional stream.

use super::response::write_opt_head;
use super::{DecodeError, EncodeError, Reader, Writer};
use crate::chain::Head;
use crate::limits::{MAX_GROUP_ID, MAX_PUSH_CIPHERTEXT, MAX_PUSH_FRAME};

/// A server-initiated event on the push stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Push {
    /// A new message in `group` at sequence `seq`, with the group's chain
    /// head after it and its ciphertext when it is small enough to inline.
    Message { group: Vec<u8>, seq: u64, head: Option<Head>, ciphertext: Option<Vec<u8>> },
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
            Self::Message { group, seq, head, ciphertext } => {
                w.u8(0x01);
                w.bytes8("group id", group, MAX_GROUP_ID)?;
                w.u64(*seq);
                write_opt_head(&mut w, head);
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
                let head = if r.bool("head present")? { Some(Head(r.array()?)) } else { None };
                let ciphertext = if r.bool("ciphertext present")? {
                    Some(r.bytes32("ciphertext", MAX_PUSH_CIPHERTEXT)?.to_vec())
                } else {
                    None
                };
                Self::Message { group, seq, head, ciphertext }
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

//! A non-panicking byte reader and a length-checked writer.
//!
//! All integers are big-endian. Variable-length fields carry a length prefix
//! of the width the format names (u8, u16 or u32) and a cap: the reader
//! checks the cap before it looks at the bytes, and never allocates; callers
//! copy out at most what the input held.

use super::{DecodeError, EncodeError};

/// Reads fields from a borrowed buffer; every method fails instead of
/// panicking when the input runs out.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `input` from its first byte.
    pub fn new(input: &'a [u8]) -> Self {
        Self { rest: input }
    }

    /// Takes exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A boolean encoded as one byte, 0 or 1; anything else is an error.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid(field)),
        }
    }

    /// Bytes with a u8 length prefix, at most `max` long.
    pub fn bytes8(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8()?);
        self.capped(field, len, max)
    }

    /// Bytes with a u16 length prefix, at most `max` long.
    pub fn bytes16(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16()?);
        self.capped(field, len, max)
    }

    /// Bytes with a u32 length prefix, at most `max` long.
    pub fn bytes32(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u32()?).map_err(|_| DecodeError::Invalid(field))?;
        self.capped(field, len, max)
    }

    /// UTF-8 text with a u16 length prefix, at most `max` bytes.
    pub fn string16(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes16(field, max)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(field))
    }

    fn capped(&mut self, field: &'static str, len: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        self.take(len)
    }

    /// A `u16` element count, refused above `max`.
    pub fn count(&mut self, field: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(DecodeError::TooLong { field, len: n, max });
        }
        Ok(n)
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Ends decoding: the input must be exhausted.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.rest.len()))
        }
    }
}

/// Appends fields to a buffer, refusing values that do not fit their
/// length prefix or exceed the cap the decoder will enforce.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn bytes8(&mut self, field: &'static str, bytes: &[u8], max: usize) -> Result<(), EncodeError> {
        let len = check(field, bytes.len(), max.min(usize::from(u8::MAX)))?;
        self.u8(u8::try_from(len).map_err(|_| EncodeError::TooLong { field, len, max })?);
        self.raw(bytes);
        Ok(())
    }

    pub fn bytes16(&mut self, field: &'static str, bytes: &[u8], max: usize) -> Result<(), EncodeError> {
        let len = check(field, bytes.len(), max.min(usize::from(u16::MAX)))?;
        self.u16(u16::try_from(len).map_err(|_| EncodeError::TooLong { field, len, max })?);
        self.raw(bytes);
        Ok(())
    }

    pub fn bytes32(&mut self, field: &'static str, bytes: &[u8], max: usize) -> Result<(), EncodeError> {
        let len = check(field, bytes.len(), max)?;
        self.u32(u32::try_from(len).map_err(|_| EncodeError::TooLong { field, len, max })?);
        self.raw(bytes);
        Ok(())
    }

    /// A `u16` element count, refused above `max`.
    pub fn count(&mut self, field: &'static str, n: usize, max: usize) -> Result<(), EncodeError> {
        let n16 = u16::try_from(n).ok().filter(|_| n <= max).ok_or(EncodeError::TooLong { field, len: n, max })?;
        self.u16(n16);
        Ok(())
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

fn check(field: &'static str, len: usize, max: usize) -> Result<usize, EncodeError> {
    if len > max {
        Err(EncodeError::TooLong { field, len, max })
    } else {
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_short_input_and_trailing_bytes() {
        assert_eq!(Reader::new(&[1]).u16(), Err(DecodeError::Truncated));
        let mut r = Reader::new(&[0, 1, 9]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn length_cap_is_checked_before_the_bytes() {
        // Claims 0xFFFF bytes but holds none: the cap error wins, nothing is read.
        let mut r = Reader::new(&[0xFF, 0xFF]);
        assert_eq!(r.bytes16("x", 10), Err(DecodeError::TooLong { field: "x", len: 0xFFFF, max: 10 }));
    }

    #[test]
    fn writer_refuses_what_the_reader_would_refuse() {
        let mut w = Writer::new();
        assert!(w.bytes8("x", &[0; 300], 1000).is_err());
        assert!(w.bytes16("x", &[0; 11], 10).is_err());
        assert!(w.bytes16("x", &[0; 10], 10).is_ok());
    }
}

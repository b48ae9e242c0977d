//! Field codecs: how one field of a frame is written and read, and the most
//! bytes it can take. The message tables ([`super::Request`]) are declared
//! with them, so a frame's encoding, decoding and largest size all follow
//! from one list of fields.

use std::marker::PhantomData;

use super::{DecodeError, EncodeError, Reader, Writer};

/// One field's encoding (the names in the module docs' tables).
pub trait Codec {
    /// The Rust value the field holds.
    type Value;
    /// The most bytes the field can take on the wire.
    const MAX_LEN: usize;
    fn write(value: &Self::Value, w: &mut Writer, field: &'static str) -> Result<(), EncodeError>;
    fn read(r: &mut Reader<'_>, field: &'static str) -> Result<Self::Value, DecodeError>;
}

/// `u16`.
pub struct U16;
/// `u32`.
pub struct U32;
/// `u64`.
pub struct U64;
/// `[u8; N]`.
pub struct Raw<const N: usize>;
/// `bytes8<MAX>`.
pub struct Bytes8<const MAX: usize>;
/// `bytes16<MAX>`.
pub struct Bytes16<const MAX: usize>;
/// `bytes32<MAX>`.
pub struct Bytes32<const MAX: usize>;
/// `bytes8<MAX>` holding UTF-8 text.
pub struct Text8<const MAX: usize>;
/// `option<C>`: a `bool`, then `C` when true.
pub struct Opt<C>(PhantomData<C>);
/// A `u16` count (at most `MAX`), then that many `C`.
pub struct List<C, const MAX: usize>(PhantomData<C>);

macro_rules! integer {
    ($codec:ident, $ty:ty, $write:ident, $read:ident) => {
        impl Codec for $codec {
            type Value = $ty;
            const MAX_LEN: usize = std::mem::size_of::<$ty>();
            fn write(value: &$ty, w: &mut Writer, _: &'static str) -> Result<(), EncodeError> {
                w.$write(*value);
                Ok(())
            }
            fn read(r: &mut Reader<'_>, _: &'static str) -> Result<$ty, DecodeError> {
                r.$read()
            }
        }
    };
}

integer!(U16, u16, u16, u16);
integer!(U32, u32, u32, u32);
integer!(U64, u64, u64, u64);

impl<const N: usize> Codec for Raw<N> {
    type Value = [u8; N];
    const MAX_LEN: usize = N;
    fn write(value: &[u8; N], w: &mut Writer, _: &'static str) -> Result<(), EncodeError> {
        w.raw(value);
        Ok(())
    }
    fn read(r: &mut Reader<'_>, _: &'static str) -> Result<[u8; N], DecodeError> {
        r.array()
    }
}

macro_rules! bytes {
    ($codec:ident, $prefix:literal, $write:ident, $read:ident) => {
        impl<const MAX: usize> Codec for $codec<MAX> {
            type Value = Vec<u8>;
            const MAX_LEN: usize = $prefix + MAX;
            fn write(value: &Vec<u8>, w: &mut Writer, field: &'static str) -> Result<(), EncodeError> {
                w.$write(field, value, MAX)
            }
            fn read(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u8>, DecodeError> {
                Ok(r.$read(field, MAX)?.to_vec())
            }
        }
    };
}

bytes!(Bytes8, 1, bytes8, bytes8);
bytes!(Bytes16, 2, bytes16, bytes16);
bytes!(Bytes32, 4, bytes32, bytes32);

impl<const MAX: usize> Codec for Text8<MAX> {
    type Value = String;
    const MAX_LEN: usize = 1 + MAX;
    fn write(value: &String, w: &mut Writer, field: &'static str) -> Result<(), EncodeError> {
        w.bytes8(field, value.as_bytes(), MAX)
    }
    fn read(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
        let bytes = r.bytes8(field, MAX)?;
        Ok(std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(field))?.to_owned())
    }
}

impl<C: Codec> Codec for Opt<C> {
    type Value = Option<C::Value>;
    const MAX_LEN: usize = 1 + C::MAX_LEN;
    fn write(value: &Option<C::Value>, w: &mut Writer, field: &'static str) -> Result<(), EncodeError> {
        w.bool(value.is_some());
        match value {
            Some(v) => C::write(v, w, field),
            None => Ok(()),
        }
    }
    fn read(r: &mut Reader<'_>, field: &'static str) -> Result<Option<C::Value>, DecodeError> {
        if r.bool(field)? {
            Ok(Some(C::read(r, field)?))
        } else {
            Ok(None)
        }
    }
}

impl<C: Codec, const MAX: usize> Codec for List<C, MAX> {
    type Value = Vec<C::Value>;
    const MAX_LEN: usize = 2 + MAX * C::MAX_LEN;
    fn write(value: &Vec<C::Value>, w: &mut Writer, field: &'static str) -> Result<(), EncodeError> {
        w.count(field, value.len(), MAX)?;
        value.iter().try_for_each(|v| C::write(v, w, field))
    }
    fn read(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<C::Value>, DecodeError> {
        let n = r.count(field, MAX)?;
        // Not `with_capacity(n)`: a claimed count allocates nothing before
        // its elements arrive.
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(C::read(r, field)?);
        }
        Ok(out)
    }
}

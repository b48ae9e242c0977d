//! Human-friendly text encodings of keys and fingerprints.
//!
//! hush writes 32-byte values in lowercase Crockford base32: digits and
//! letters without `i`, `l`, `o`, `u`, so nothing reads ambiguously aloud.
//! Parsing is forgiving in the ways people are: upper case, `-` or spaces
//! between groups, and `i`/`l` for `1`, `o` for `0` are accepted.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Characters in the encoding of 32 bytes (256 bits / 5, rounded up).
pub const KEY_TEXT_LEN: usize = 52;

/// A value could not be read as base32 text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TextError {
    #[error("unexpected character {0:?}")]
    BadChar(char),
    #[error("expected {expected} characters, found {found}")]
    BadLength { expected: usize, found: usize },
    #[error("the last character carries bits that must be zero")]
    NonCanonical,
}

/// Encodes bytes as lowercase base32, without padding or separators.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(symbol(acc >> bits));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(symbol(acc << (5 - bits)));
    }
    out
}

fn symbol(v: u32) -> char {
    // `v & 31` is always a valid index into the 32-symbol alphabet.
    ALPHABET.get((v & 31) as usize).map_or('?', |&c| char::from(c))
}

fn value(c: char) -> Option<u32> {
    let c = c.to_ascii_lowercase();
    let c = match c {
        'i' | 'l' => '1',
        'o' => '0',
        other => other,
    };
    ALPHABET.iter().position(|&a| char::from(a) == c).and_then(|p| u32::try_from(p).ok())
}

/// Decodes base32 text to exactly `N` bytes; `-`, spaces and case are ignored.
pub fn decode_array<const N: usize>(text: &str) -> Result<[u8; N], TextError> {
    let expected = (N * 8).div_ceil(5);
    let symbols: Vec<char> = text.chars().filter(|c| *c != '-' && *c != ' ').take(expected + 1).collect();
    if symbols.len() != expected {
        return Err(TextError::BadLength { expected, found: symbols.len() });
    }
    let mut out = [0u8; N];
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut filled = 0usize;
    for c in symbols {
        let v = value(c).ok_or(TextError::BadChar(c))?;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            if let Some(slot) = out.get_mut(filled) {
                *slot = ((acc >> bits) & 0xFF) as u8;
            }
            filled += 1;
            acc &= (1 << bits) - 1;
        }
    }
    if acc != 0 || filled != N {
        return Err(TextError::NonCanonical);
    }
    Ok(out)
}

/// Splits text into dash-separated groups of `size` characters, for reading
/// aloud.
pub fn grouped(text: &str, size: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(size.max(1)).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join("-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(bytes in any::<[u8; 32]>()) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), KEY_TEXT_LEN);
            prop_assert_eq!(decode_array::<32>(&text).unwrap(), bytes);
            prop_assert_eq!(decode_array::<32>(&grouped(&text.to_uppercase(), 4)).unwrap(), bytes);
        }

        #[test]
        fn never_panics(text in "\\PC{0,80}") {
            let _ = decode_array::<32>(&text);
            let _ = decode_array::<24>(&text);
        }
    }

    #[test]
    fn rejects_nonzero_padding_bits() {
        let mut text = encode(&[0u8; 32]);
        text.pop();
        text.push('1');
        assert_eq!(decode_array::<32>(&text), Err(TextError::NonCanonical));
    }
}

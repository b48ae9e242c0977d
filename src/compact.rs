//! Compact storage of JSON text: the group states openmls keeps are JSON in
//! which every byte string is an array of decimal numbers (`[26,146,231]`,
//! about 3.6 characters per byte), so a group of 1000 held 1.5 MB of which
//! 1.2 MB was such arrays (issue 37: the writer stored and flushed all of it
//! on every commit). [`compact`] replaces each such array, outside strings,
//! with [`MARK`], a `u32` length and the bytes themselves; [`expand`]
//! writes the same text back, byte for byte.
//!
//! Only arrays in exactly the form `serde_json` writes are replaced: `[`,
//! numbers 0–255 without leading zeros or signs, one `,` between them, `]`,
//! no spaces. Expanding writes that same form, so `expand(compact(t)) == t`
//! for every `t` that `compact` accepts. [`MARK`] (0xFF) never occurs in
//! UTF-8 text, which is why `compact` refuses input holding it.

use crate::wire::DecodeError;

/// Starts a replaced array in compacted text.
pub const MARK: u8 = 0xFF;

/// Arrays shorter than this stay as text (the marker and length take 5
/// bytes).
pub const MIN_RUN: usize = 8;

/// `text` with each byte array replaced; `None` if `text` holds
/// [`MARK`] (it is then not UTF-8, and is kept as it is).
pub fn compact(text: &[u8]) -> Option<Vec<u8>> {
    if text.contains(&MARK) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 3);
    // Where the text not yet copied starts.
    let mut copied = 0;
    let mut i = 0;
    let mut in_string = false;
    while let Some(&c) = text.get(i) {
        if in_string {
            match c {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        match c {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'[' => match byte_array(text, i) {
                Some((bytes, end)) if bytes.len() >= MIN_RUN => {
                    out.extend_from_slice(text.get(copied..i)?);
                    out.push(MARK);
                    out.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_be_bytes());
                    out.extend_from_slice(&bytes);
                    i = end;
                    copied = end;
                }
                _ => i += 1,
            },
            _ => i += 1,
        }
    }
    out.extend_from_slice(text.get(copied..)?);
    Some(out)
}

/// The array of bytes that starts at `text[at]` (a `[`) in the canonical
/// form, and the index after its `]`; `None` if what starts there is not
/// one.
fn byte_array(text: &[u8], at: usize) -> Option<(Vec<u8>, usize)> {
    let mut bytes = Vec::new();
    let mut i = at + 1;
    if text.get(i) == Some(&b']') {
        return Some((bytes, i + 1));
    }
    loop {
        let start = i;
        let mut value: u32 = 0;
        while let Some(d) = text.get(i).filter(|d| d.is_ascii_digit()) {
            value = value * 10 + u32::from(d - b'0');
            i += 1;
            if i - start > 3 {
                return None;
            }
        }
        let digits = i - start;
        // No number, a leading zero, or above 255.
        if digits == 0 || (digits > 1 && text.get(start) == Some(&b'0')) {
            return None;
        }
        bytes.push(u8::try_from(value).ok()?);
        match text.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return Some((bytes, i + 1)),
            _ => return None,
        }
    }
}

/// The text [`compact`] made `bytes` from; refuses text that would exceed
/// `max` bytes and a marker cut short.
pub fn expand(bytes: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let too_long = |len: usize| DecodeError::TooLong { field: "compacted text", len, max };
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(3).min(max));
    let mut rest = bytes;
    while let Some(at) = rest.iter().position(|&b| b == MARK) {
        let (text, marked) = rest.split_at(at);
        out.extend_from_slice(text);
        let len = marked
            .get(1..5)
            .and_then(|l| <[u8; 4]>::try_from(l).ok())
            .and_then(|l| usize::try_from(u32::from_be_bytes(l)).ok())
            .ok_or(DecodeError::Invalid("compacted array length"))?;
        let array = marked.get(5..5 + len).ok_or(DecodeError::Invalid("compacted array cut short"))?;
        // The brackets, the commas and each number's digits.
        let digits: usize = array.iter().map(|&b| 1 + usize::from(b >= 10) + usize::from(b >= 100)).sum();
        let grown = out.len().saturating_add(digits).saturating_add(len.max(1)).saturating_add(1);
        if grown > max {
            return Err(too_long(grown));
        }
        out.push(b'[');
        for (n, b) in array.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            write_decimal(&mut out, *b);
        }
        out.push(b']');
        rest = marked.get(5 + len..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    if out.len() > max {
        return Err(too_long(out.len()));
    }
    Ok(out)
}

fn write_decimal(out: &mut Vec<u8>, b: u8) {
    if b >= 100 {
        out.push(b'0' + b / 100);
    }
    if b >= 10 {
        out.push(b'0' + (b / 10) % 10);
    }
    out.push(b'0' + b % 10);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn byte_arrays_outside_strings_are_replaced_and_come_back_exactly() {
        let text =
            br#"{"key":{"vec":[26,146,231,98,106,95,237,0,255]},"s":"[1,2,3,4,5,6,7,8,9]","short":[1,2],"e":[]}"#;
        let small = compact(text).unwrap();
        assert!(small.len() < text.len());
        let kept = br#""s":"[1,2,3,4,5,6,7,8,9]","short":[1,2],"e":[]}"#;
        assert!(small.ends_with(kept), "the array in a string and the short ones stay text");
        assert_eq!(small.first(), Some(&b'{'));
        assert_eq!(expand(&small, 1 << 20).unwrap(), text.to_vec());
    }

    #[test]
    fn arrays_not_in_serde_json_form_stay_text() {
        for text in [
            &b"[1,2,3,4,5,6,7,08]"[..],
            b"[1,2,3,4,5,6,7,256]",
            b"[1,2,3,4,5,6,7, 8]",
            b"[1,2,3,4,5,6,7,-8]",
            b"[1,2,3,4,5,6,7,8.0]",
            b"[1,2,3,4,5,6,7,8",
            b"[1,2,3,4,5,6,7,1000]",
            br#""\"[1,2,3,4,5,6,7,8]""#,
        ] {
            let small = compact(text).unwrap();
            assert_eq!(small, text.to_vec(), "{}", String::from_utf8_lossy(text));
        }
        assert!(compact(&[b'[', MARK]).is_none());
    }

    #[test]
    fn expansion_is_bounded_and_cut_markers_are_refused() {
        let text = format!("[{}]", vec!["200"; 1000].join(","));
        let small = compact(text.as_bytes()).unwrap();
        assert!(expand(&small, text.len()).is_ok());
        assert!(matches!(expand(&small, text.len() - 1), Err(DecodeError::TooLong { .. })));
        assert!(expand(&small[..small.len() - 1], 1 << 20).is_err());
        assert!(expand(&[MARK, 0, 0], 1 << 20).is_err());
    }

    proptest! {
        #[test]
        fn any_text_comes_back_exactly(parts in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| format!("{v:?}").replace(' ', "")),
                "[a-z\"\\\\\\[\\],0-9 ]{0,12}",
            ],
            0..12,
        )) {
            let text = parts.concat();
            let small = compact(text.as_bytes()).unwrap();
            prop_assert_eq!(expand(&small, 1 << 20).unwrap(), text.into_bytes());
        }

        /// Red team: pieces that sit at the edges of what is replaced
        /// (numbers above 255, quotes and escapes, bytes that are not
        /// ASCII, markers); the text never grows and the cap is exact.
        #[test]
        fn edge_pieces_come_back_exactly_and_never_grow(pieces in proptest::collection::vec(
            prop_oneof![
                Just("[".to_string()), Just("]".to_string()), Just(",".to_string()),
                Just("\"".to_string()), Just("\\".to_string()), Just("é".to_string()),
                (0u32..300).prop_map(|n| n.to_string()),
                proptest::collection::vec(any::<u8>(), 8..12).prop_map(|v| format!("{v:?}").replace(' ', "")),
            ],
            0..40,
        )) {
            let text = pieces.concat().into_bytes();
            let small = compact(&text).unwrap();
            prop_assert!(small.len() <= text.len());
            prop_assert_eq!(expand(&small, text.len()).unwrap(), text.clone());
            if !text.is_empty() {
                prop_assert!(expand(&small, text.len() - 1).is_err());
            }
        }

        #[test]
        fn expanding_anything_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = expand(&bytes, 1 << 12);
        }
    }
}

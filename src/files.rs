//! The encrypted file format (issue 32, `docs/FILES.md`): what a sender
//! uploads as a blob and what a file message carries, and how a received
//! name becomes a safe file name. Pure: no I/O, no panics on any input.
//!
//! # Blob
//!
//! The sender picks a fresh random 32-byte key per file. The file's bytes,
//! followed by zero bytes up to the *padded length* ([`padded_len`]: the
//! Padmé bucket of the size, at least [`MIN_PADDED_FILE`]), are cut into
//! chunks of [`FILE_CHUNK`] bytes (the last may be shorter, never empty)
//! and each is sealed with ChaCha20-Poly1305 (ring's, the one crypto
//! provider hush uses) under a STREAM nonce:
//! `u64` chunk index (big-endian), three zero bytes, and a last-chunk flag
//! (1 on the last chunk, 0 otherwise), with [`AAD`] as associated data. The
//! blob is the sealed chunks in order. Dropping, reordering or splicing
//! chunks (from this file or another) fails authentication; cutting the
//! blob after a chunk leaves no chunk with the last flag. The server sees
//! only the blob's size, which is a function of the padded length: it
//! learns the bucket, not the size.
//!
//! # File message
//!
//! An MLS application message of the group ([`FileRef`], payload kind
//! `0x04`) carries the blob id, the key, the SHA-256 of the whole blob, the
//! real size, the name and media type the sender gave, and an optional
//! caption. Only members can read it.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::Zeroizing;

pub use crate::limits::{FILE_CHUNK, MAX_FILE_NAME, MAX_MEDIA_TYPE, MAX_SAVED_NAME, MIN_PADDED_FILE};

/// Bytes a sealed chunk adds (the Poly1305 tag).
pub const TAG: usize = 16;

/// Associated data of every chunk: binds chunks to this format.
pub const AAD: &[u8] = b"hush file v1";

/// The Padmé bucket of `len`: `len` rounded up so that only the top
/// `floor(log2(log2(len))) + 1` bits may be set, which leaks
/// `O(log log len)` bits of the size and costs at most 12% overhead.
pub fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = 63 - u64::from(len.leading_zeros()); // floor(log2 len)
    let s = 64 - u64::from(e.leading_zeros()); // floor(log2 e) + 1
    let zeroed = e.saturating_sub(s);
    let mask = (1u64 << zeroed) - 1;
    len.saturating_add(mask) & !mask
}

/// The padded plaintext length of a file of `size` bytes.
pub fn padded_len(size: u64) -> u64 {
    padme(size.max(MIN_PADDED_FILE))
}

/// How a padded plaintext is laid out in its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Padded plaintext length.
    pub padded: u64,
    /// Number of chunks (at least 1).
    pub chunks: u64,
    /// The blob's length: the padded length plus a tag per chunk.
    pub blob: u64,
}

const CHUNK: u64 = FILE_CHUNK as u64;
const SEALED_CHUNK: u64 = CHUNK + TAG as u64;

impl Layout {
    /// The layout of a file of `size` bytes, `None` if its blob would not
    /// fit a `u64`.
    pub fn of_size(size: u64) -> Option<Self> {
        Self::of_padded(padded_len(size))
    }

    fn of_padded(padded: u64) -> Option<Self> {
        let chunks = padded.div_ceil(CHUNK).max(1);
        let blob = padded.checked_add(chunks.checked_mul(TAG as u64)?)?;
        Some(Self { padded, chunks, blob })
    }

    /// The layout a blob of `blob` bytes must have, if it is the blob of
    /// some padded file (what the server checks before it accepts an
    /// upload: anything else would tell it more than the bucket).
    pub fn of_blob(blob: u64) -> Option<Self> {
        let chunks = blob.div_ceil(SEALED_CHUNK).max(1);
        let padded = blob.checked_sub(chunks.checked_mul(TAG as u64)?)?;
        let layout = Self::of_padded(padded)?;
        (layout.blob == blob && padded >= MIN_PADDED_FILE && padme(padded) == padded).then_some(layout)
    }

    /// Plaintext bytes in chunk `index`.
    pub fn plain_len(&self, index: u64) -> usize {
        if index + 1 < self.chunks {
            FILE_CHUNK
        } else {
            // The last chunk: what is left (at most one chunk).
            usize::try_from(self.padded - CHUNK * (self.chunks - 1)).unwrap_or(FILE_CHUNK)
        }
    }

    /// Where chunk `index` starts in the blob.
    pub fn blob_offset(index: u64) -> u64 {
        index.saturating_mul(SEALED_CHUNK)
    }

    /// Whether `index` is the last chunk.
    pub fn is_last(&self, index: u64) -> bool {
        index + 1 == self.chunks
    }
}

/// A file key. Zeroed when dropped.
#[derive(Clone)]
pub struct FileKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    /// A fresh random key.
    pub fn random() -> Result<Self, FileError> {
        let mut key = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), key.as_mut())
            .map_err(|_| FileError::Random)?;
        Ok(Self(key))
    }

    fn cipher(&self) -> Result<LessSafeKey, FileError> {
        // Never fails for a 32-byte key; an error all the same, not a panic.
        UnboundKey::new(&CHACHA20_POLY1305, self.0.as_ref()).map(LessSafeKey::new).map_err(|_| FileError::Random)
    }
}

/// What can go wrong with a file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("the system's random number generator failed")]
    Random,
    /// A chunk failed authentication, the blob's hash differs, or the
    /// padding is not zero: the blob was altered (or is another file).
    #[error("the file was altered on the server or in transit (chunk {0} does not verify)")]
    Tampered(u64),
    #[error("the file was altered on the server or in transit (its hash differs)")]
    HashMismatch,
}

/// The STREAM nonce of chunk `index`.
fn nonce(index: u64, last: bool) -> Nonce {
    let [a, b, c, d, e, f, g, h] = index.to_be_bytes();
    Nonce::assume_unique_for_key([a, b, c, d, e, f, g, h, 0, 0, 0, u8::from(last)])
}

/// Seals chunk `index` in place: `chunk` holds its plaintext and gets the
/// tag appended.
pub fn seal_chunk(key: &FileKey, index: u64, last: bool, chunk: &mut Vec<u8>) -> Result<(), FileError> {
    key.cipher()?
        .seal_in_place_append_tag(nonce(index, last), Aad::from(AAD), chunk)
        .map_err(|_| FileError::Tampered(index))
}

/// Opens sealed chunk `index` in place (the tag is removed).
pub fn open_chunk(key: &FileKey, index: u64, last: bool, chunk: &mut Vec<u8>) -> Result<(), FileError> {
    let Some(at) = chunk.len().checked_sub(TAG) else { return Err(FileError::Tampered(index)) };
    key.cipher()?
        .open_in_place(nonce(index, last), Aad::from(AAD), chunk.as_mut_slice())
        .map_err(|_| FileError::Tampered(index))?;
    chunk.truncate(at);
    Ok(())
}

/// A file message: everything a member needs to fetch, check and save a
/// file.
#[derive(Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The blob's id on the server.
    pub id: [u8; 16],
    pub key: [u8; 32],
    /// SHA-256 of the whole blob.
    pub hash: [u8; 32],
    /// The file's real size in bytes.
    pub size: u64,
    /// The name the sender gave (never used as a path: see [`safe_name`]).
    pub name: String,
    pub media_type: String,
    /// Text sent with the file (may be empty).
    pub caption: String,
}

impl std::fmt::Debug for FileRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRef").field("size", &self.size).finish_non_exhaustive()
    }
}

impl Drop for FileRef {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl FileRef {
    /// `id ‖ key ‖ hash ‖ u64 size ‖ u16 n ‖ name (n bytes) ‖ u8 m ‖
    /// media type (m bytes) ‖ caption (the rest)`; names and types longer
    /// than their caps are cut (on a character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let name = cut(&self.name, MAX_FILE_NAME);
        let media = cut(&self.media_type, MAX_MEDIA_TYPE);
        let mut out = Vec::with_capacity(16 + 32 + 32 + 8 + 3 + name.len() + media.len() + self.caption.len());
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(u8::try_from(media.len()).unwrap_or(0));
        out.extend_from_slice(media.as_bytes());
        out.extend_from_slice(self.caption.as_bytes());
        out
    }

    /// Never panics; `None` for bytes that are not a file message. Text is
    /// read lossily.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (id, rest) = bytes.split_first_chunk::<16>()?;
        let (key, rest) = rest.split_first_chunk::<32>()?;
        let (hash, rest) = rest.split_first_chunk::<32>()?;
        let (size, rest) = rest.split_first_chunk::<8>()?;
        let (n, rest) = rest.split_first_chunk::<2>()?;
        let n = usize::from(u16::from_be_bytes(*n));
        if n > MAX_FILE_NAME || rest.len() < n {
            return None;
        }
        let (name, rest) = rest.split_at(n);
        let (&m, rest) = rest.split_first()?;
        let m = usize::from(m);
        if m > MAX_MEDIA_TYPE || rest.len() < m {
            return None;
        }
        let (media, caption) = rest.split_at(m);
        Some(Self {
            id: *id,
            key: *key,
            hash: *hash,
            size: u64::from_be_bytes(*size),
            name: String::from_utf8_lossy(name).into_owned(),
            media_type: String::from_utf8_lossy(media).into_owned(),
            caption: String::from_utf8_lossy(caption).into_owned(),
        })
    }

    pub fn file_key(&self) -> FileKey {
        FileKey(Zeroizing::new(self.key))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether `c` may appear in a saved file name: no control characters
/// (newlines, escapes), no bidirectional overrides (a name that displays
/// as something else), no path separators.
fn allowed(c: char) -> bool {
    !(c.is_control()
        || matches!(c, '/' | '\\' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}'))
}

/// A file name that is safe to create in a directory: the last component
/// of what was received (after `/` and `\`), without control characters,
/// bidirectional overrides or leading dots and spaces (no hidden files, no
/// `..`), at most [`MAX_SAVED_NAME`] bytes with its extension kept, and
/// `file` when nothing is left.
pub fn safe_name(received: &str) -> String {
    let last = received.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = last.chars().filter(|&c| allowed(c)).collect();
    let clean = clean.trim_start_matches(['.', ' ']).trim_end_matches([' ', '.']);
    if clean.is_empty() {
        return "file".to_string();
    }
    if clean.len() <= MAX_SAVED_NAME {
        return clean.to_string();
    }
    let (stem, ext) = split_extension(clean);
    let ext = cut(ext, 16);
    let stem = cut(stem, MAX_SAVED_NAME.saturating_sub(ext.len() + 1));
    if ext.is_empty() {
        stem.to_string()
    } else {
        format!("{stem}.{ext}")
    }
}

/// `("name", "ext")` for `name.ext`; `(name, "")` without an extension.
pub fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(at) if at > 0 => (&name[..at], &name[at + 1..]),
        _ => (name, ""),
    }
}

/// The `n`th alternative of a taken name: `name (n).ext`.
pub fn numbered(name: &str, n: u32) -> String {
    let (stem, ext) = split_extension(name);
    if ext.is_empty() {
        format!("{stem} ({n})")
    } else {
        format!("{stem} ({n}).{ext}")
    }
}

/// A media type for a file name, from its extension (what the recipient
/// is told; never used to decide anything).
pub fn media_type(name: &str) -> &'static str {
    let (_, ext) = split_extension(name);
    match ext.to_ascii_lowercase().as_str() {
        "txt" | "log" | "md" => "text/plain",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "mp4" => "video/mp4",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padme_buckets_and_every_padded_size_is_a_valid_blob() {
        assert_eq!(padme(0), 0);
        assert_eq!(padme(4096), 4096);
        assert_eq!(padme(4097), 4352);
        assert_eq!(padded_len(1), MIN_PADDED_FILE);
        for size in [0u64, 1, 4095, 4096, 65_535, 65_536, 65_537, 1 << 20, 50 << 20, (50 << 20) + 1, 1 << 34] {
            let layout = Layout::of_size(size).unwrap();
            assert!(layout.padded >= size && layout.padded <= size.max(MIN_PADDED_FILE) * 113 / 100, "{size}");
            assert_eq!(Layout::of_blob(layout.blob), Some(layout), "{size}");
            let sum: u64 = (0..layout.chunks).map(|i| layout.plain_len(i) as u64).sum();
            assert_eq!(sum, layout.padded);
        }
        // A blob of any other size is refused.
        for blob in [0u64, 1, 4096, 4113, 70_000] {
            assert_eq!(Layout::of_blob(blob), None, "{blob}");
        }
    }

    #[test]
    fn chunks_bind_their_index_their_position_and_the_key() {
        let key = FileKey::random().unwrap();
        let mut a = b"chunk zero".to_vec();
        seal_chunk(&key, 0, false, &mut a).unwrap();
        let mut ok = a.clone();
        open_chunk(&key, 0, false, &mut ok).unwrap();
        assert_eq!(ok, b"chunk zero");
        // Moved, marked last (a truncated blob), flipped, or another key.
        assert_eq!(open_chunk(&key, 1, false, &mut a.clone()), Err(FileError::Tampered(1)));
        assert_eq!(open_chunk(&key, 0, true, &mut a.clone()), Err(FileError::Tampered(0)));
        let mut flipped = a.clone();
        flipped[3] ^= 1;
        assert_eq!(open_chunk(&key, 0, false, &mut flipped), Err(FileError::Tampered(0)));
        assert!(open_chunk(&FileKey::random().unwrap(), 0, false, &mut a.clone()).is_err());
        assert!(open_chunk(&key, 0, false, &mut vec![1, 2, 3]).is_err());
    }

    #[test]
    fn file_messages_round_trip_and_any_bytes_decode_without_panic() {
        let f = FileRef {
            id: [1; 16],
            key: [2; 32],
            hash: [3; 32],
            size: 12345,
            name: "report ✓.pdf".into(),
            media_type: "application/pdf".into(),
            caption: "see page 2".into(),
        };
        assert_eq!(FileRef::decode(&f.encode()), Some(f.clone()));
        let bytes = f.encode();
        for n in 0..bytes.len() {
            let _ = FileRef::decode(&bytes[..n]);
        }
        assert_eq!(FileRef::decode(&bytes[..88]), None);
    }

    #[test]
    fn received_names_never_leave_the_directory() {
        assert_eq!(safe_name("../../x"), "x");
        assert_eq!(safe_name("/etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_name("a\nb.txt"), "ab.txt");
        assert_eq!(safe_name("\u{1b}[31mred\u{1b}[0m.txt"), "[31mred[0m.txt");
        assert_eq!(safe_name("evil\u{202e}txt.exe"), "eviltxt.exe");
        assert_eq!(safe_name(".."), "file");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name(""), "file");
        assert_eq!(safe_name("dir/"), "file");
        let long = format!("{}.tar", "é".repeat(300));
        let saved = safe_name(&long);
        assert!(saved.len() <= MAX_SAVED_NAME && saved.ends_with(".tar"), "{saved}");
        assert_eq!(numbered("a.txt", 1), "a (1).txt");
        assert_eq!(numbered("Makefile", 2), "Makefile (2)");
    }
}

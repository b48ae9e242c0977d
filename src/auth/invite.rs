//! Invite tokens.
//!
//! A token is 24 random bytes written as 39 base32 characters: an 8-byte
//! public id, used to find the invite, and a 16-byte secret. The server
//! stores only the id and SHA-256 of the secret, and compares that hash in
//! constant time, so neither a stolen database nor a timing side channel
//! yields a usable token.

use std::fmt;
use std::str::FromStr;

use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroize;

use super::text::{self, TextError};

/// Characters in a token's text form.
pub const TOKEN_TEXT_LEN: usize = 39;

/// A token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum InviteError {
    #[error("not an invite token: {0}")]
    Text(#[from] TextError),
    #[error("no randomness available from the operating system")]
    Random,
}

/// An invite token. Its `Display` is the secret text: print it only to the
/// operator who asked for it, never to logs (`Debug` hides the secret).
#[derive(Clone)]
pub struct InviteToken {
    id: [u8; 8],
    secret: [u8; 16],
}

impl Drop for InviteToken {
    fn drop(&mut self) {
        self.id.zeroize();
        self.secret.zeroize();
    }
}

impl InviteToken {
    pub fn generate() -> Result<Self, InviteError> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 24]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut())
            .map_err(|_| InviteError::Random)?;
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8; 24]) -> Self {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        for (i, b) in bytes.iter().enumerate() {
            if let Some(slot) = id.get_mut(i) {
                *slot = *b;
            } else if let Some(slot) = secret.get_mut(i - 8) {
                *slot = *b;
            }
        }
        Self { id, secret }
    }

    /// The public lookup id.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// SHA-256 of the secret: what the server stores.
    pub fn secret_hash(&self) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        out
    }

    /// Constant-time check of this token's secret against a stored hash.
    pub fn matches(&self, stored_hash: &[u8]) -> bool {
        self.secret_hash().ct_eq(stored_hash).into()
    }
}

impl fmt::Display for InviteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = zeroize::Zeroizing::new([0u8; 24]);
        for (slot, b) in bytes.iter_mut().zip(self.id.iter().chain(self.secret.iter())) {
            *slot = *b;
        }
        let mut text = text::encode(bytes.as_ref());
        let result = f.write_str(&text);
        text.zeroize();
        result
    }
}

impl fmt::Debug for InviteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InviteToken(id {}, secret [scrubbed])", text::encode(&self.id))
    }
}

impl FromStr for InviteToken {
    type Err = InviteError;
    fn from_str(s: &str) -> Result<Self, InviteError> {
        let bytes = zeroize::Zeroizing::new(text::decode_array::<24>(s.trim())?);
        Ok(Self::from_bytes(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_round_trip_and_hash_check() {
        let t = InviteToken::generate().unwrap();
        let text = t.to_string();
        assert_eq!(text.len(), TOKEN_TEXT_LEN);
        let back: InviteToken = text.parse().unwrap();
        assert_eq!(back.id(), t.id());
        assert!(back.matches(&t.secret_hash()));
        assert!(!InviteToken::generate().unwrap().matches(&t.secret_hash()));
        assert!(!format!("{t:?}").contains(&text[16..]));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,60}") {
            let _ = s.parse::<InviteToken>();
        }
    }
}

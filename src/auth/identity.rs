//! Ed25519 keys on disk: the server's TLS key and removal key, and each
//! client's account key and device (TLS) key.
//!
//! A key file holds the 32-byte Ed25519 seed and nothing else. It is
//! created with mode 0600 (written to a temporary file, synced, then renamed,
//! so a crash never leaves half a key), and refused at load time if anyone
//! but the owner can read it. In memory the seed lives in
//! `ed25519_dalek::SigningKey`, which wipes itself on drop; copies made for
//! rustls are wiped too ([`zeroize::Zeroizing`]).

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use std::sync::Arc;

use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::sign::CertifiedKey;
use thiserror::Error;
use zeroize::Zeroizing;

use super::address::{AccountId, Fingerprint};
use super::cert::{self, CertError};

/// Length of a key file: one Ed25519 seed.
pub const KEY_FILE_LEN: u64 = 32;

/// HKDF salt of [`Identity::derive`].
const DERIVE_SALT: &[u8] = b"hush derived key v1";

/// Why a key could not be loaded or created.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a hush key file (expected {KEY_FILE_LEN} bytes)")]
    Format { path: PathBuf },
    #[error("{path}: key file is accessible by other users (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("no randomness available from the operating system")]
    Random,
    #[error("could not derive a key")]
    Derive,
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// An Ed25519 key pair. Deliberately neither `Debug` nor `Clone`.
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// A fresh key from the operating system's random generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), seed.as_mut())
            .map_err(|_| KeyError::Random)?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    /// Loads the key at `path`, or creates it (mode 0600) if there is none.
    /// Returns the identity and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        match Self::load(path) {
            Ok(id) => Ok((id, false)),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate()?;
                id.save(path)?;
                Ok((id, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Loads an existing key file.
    /// [`Identity::load`], accepting a file others may read (a key kept on
    /// a removable disk whose file system has no modes); returns the mode
    /// if it was too open, so the caller can warn.
    pub fn load_any_mode(path: &Path) -> Result<(Self, Option<u32>), KeyError> {
        match Self::load(path) {
            Ok(id) => Ok((id, None)),
            Err(KeyError::Permissions { mode, .. }) => {
                let io = |source| KeyError::Io { path: path.to_owned(), source };
                let file = File::open(path).map_err(io)?;
                if file.metadata().map_err(io)?.len() != KEY_FILE_LEN {
                    return Err(KeyError::Format { path: path.to_owned() });
                }
                let mut seed = Zeroizing::new([0u8; 32]);
                file.take(KEY_FILE_LEN).read_exact(seed.as_mut()).map_err(io)?;
                Ok((Self { key: SigningKey::from_bytes(&seed) }, Some(mode)))
            }
            Err(e) => Err(e),
        }
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
        if meta.len() != KEY_FILE_LEN {
            return Err(KeyError::Format { path: path.to_owned() });
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        file.take(KEY_FILE_LEN).read_exact(seed.as_mut()).map_err(io)?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    /// The key from its 32-byte seed (a restored backup's account key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(seed) }
    }

    /// The key's 32-byte seed (what a backup carries), wiped when dropped.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// Writes the key to `path` with mode 0600; never overwrites a file.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let seed = Zeroizing::new(self.key.to_bytes());
        crate::util::write_private(path, seed.as_ref(), false)
            .map_err(|source| KeyError::Io { path: path.to_owned(), source })
    }

    /// The raw public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The account id this key authenticates as.
    pub fn account_id(&self) -> AccountId {
        AccountId(self.public_key())
    }

    /// The DER SubjectPublicKeyInfo of the public key.
    pub fn spki(&self) -> Vec<u8> {
        cert::ed25519_spki(&self.public_key())
    }

    /// SHA-256 of the SubjectPublicKeyInfo: what peers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_spki(&self.spki())
    }

    /// A self-signed certificate and the signing key, as rustls uses them.
    /// The PKCS#8 copy of the seed made on the way is wiped; the key inside
    /// rustls (a *ring* key pair) lives as long as the TLS configuration.
    pub fn tls_credentials(&self) -> Result<Arc<CertifiedKey>, KeyError> {
        let seed = Zeroizing::new(self.key.to_bytes());
        let cert = cert::self_signed(&seed)?;
        let pkcs8 = cert::ed25519_pkcs8(&seed);
        let signing_key = rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_slice()))
            .map_err(|e| KeyError::Cert(CertError::Build(e.to_string())))?;
        Ok(Arc::new(CertifiedKey::new(vec![cert], signing_key)))
    }

    /// A 32-byte key for another purpose, derived from this one's seed with
    /// HKDF-SHA-256 under `label` (distinct labels give independent keys;
    /// nothing derived reveals the seed). What hushd nodes sharing one
    /// server key agree on without another secret to distribute.
    pub fn derive(&self, label: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        struct Len32;
        impl ring::hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let seed = Zeroizing::new(self.key.to_bytes());
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, DERIVE_SALT).extract(seed.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        prk.expand(&[label], Len32).and_then(|okm| okm.fill(out.as_mut())).map_err(|_| KeyError::Derive)?;
        Ok(out)
    }

    /// Signs `msg`. An account key signs only device certificates
    /// ([`super::DeviceCertificate::issue`], with its own domain-separation
    /// label); no other key signs anything outside TLS.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.key.sign(msg).to_bytes()
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing; refuses a
/// directory others can enter.
pub fn private_dir(dir: &Path) -> Result<(), KeyError> {
    let io = |source| KeyError::Io { path: dir.to_owned(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    let mode = fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn created_key_is_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let (a, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (b, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public_key(), b.public_key());
    }

    #[test]
    fn refuses_readable_or_malformed_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        Identity::generate().unwrap().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Identity::load(&path), Err(KeyError::Permissions { .. })));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"x").unwrap();
        assert!(matches!(Identity::load(&path), Err(KeyError::Format { .. })));
    }

    #[test]
    fn never_overwrites_an_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        Identity::generate().unwrap().save(&path).unwrap();
        assert!(Identity::generate().unwrap().save(&path).is_err());
    }
}

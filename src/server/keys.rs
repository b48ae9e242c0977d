//! The server's key files (issue 35): an identity key that may leave the
//! machine, the online key it certifies, and the secrets derived from the
//! identity that must outlive its export.
//!
//! In the data directory:
//!
//! | file | what | when |
//! | --- | --- | --- |
//! | `server.key` | the identity key (32-byte seed, 0600): what the address pins | created by the first `init`/`serve`; gone after `keys export-identity` |
//! | `identity.pub` | its public half (hex), so the address is known without it | written whenever the identity key is at hand |
//! | `online.key` | the online key's seed and its [`OnlineCert`] (184 bytes, 0600) | written by `keys rotate`; absent until the first rotation, and then the identity key itself serves |
//! | `node.secrets` | the stateless-reset and wake-up secrets (64 bytes, 0600), derived from the identity key exactly as before they had a file | written whenever the identity key is at hand |
//!
//! `init` never creates an identity key where `identity.pub` exists: a
//! directory whose identity key was exported stays that identity's.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::auth::online::{CurrentKey, OnlineCert, OnlineError, ServerKey, MAX_ONLINE_VALIDITY_SECS, ONLINE_CERT_LEN};
use crate::auth::{cert, Fingerprint, Identity, KeyError};

/// The identity key (the name predates the split: existing data
/// directories keep theirs, and their address with it).
pub const IDENTITY_KEY_FILE: &str = "server.key";

/// The identity key's public half, hex.
pub const IDENTITY_PUBLIC_FILE: &str = "identity.pub";

/// The online key and its certificate.
pub const ONLINE_KEY_FILE: &str = "online.key";

/// The secrets derived from the identity key.
pub const NODE_SECRETS_FILE: &str = "node.secrets";

/// Bytes of `online.key`: seed, then certificate.
pub const ONLINE_KEY_FILE_LEN: usize = 32 + ONLINE_CERT_LEN;

/// How long `keys rotate` certifies a new online key for by default.
pub const DEFAULT_ONLINE_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// A server holding its identity key rotates its online key by itself
/// once the certificate has less than this left; one without it warns.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// How far before now a new certificate starts: clients whose clocks run
/// a little behind accept it at once.
pub const CERT_BACKDATE: Duration = Duration::from_secs(3600);

/// How often a serving hushd looks for a rotated `online.key`.
pub const KEY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a renewed online key is derived under (with the certificate it
/// follows).
const RENEWAL_LABEL: &[u8] = b"hush online key renewal v1";

/// Most renewals one [`KeyFiles::renew`] chains (a server offline for
/// longer starts afresh with a random key).
const MAX_RENEWALS: usize = 64;

/// What the stateless-reset secret is derived under (unchanged since the
/// reset key was derived from the server key directly).
const RESET_KEY_LABEL: &[u8] = b"hush quic stateless reset v1";

/// Why the server's keys could not be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeysError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a hush {what} file")]
    Format { path: PathBuf, what: &'static str },
    #[error("{path}: key file is accessible by other users (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "the identity key is not in {dir} (it was exported: identity.pub is there, server.key is not) and no \
         online key is either; run `hushd keys rotate --identity-key FILE` with the exported key"
    )]
    NoServingKey { dir: PathBuf },
    #[error(
        "{path} is certified by another identity ({found}) than this server's ({ours}); run `hushd keys rotate` \
         with this server's identity key"
    )]
    OtherIdentity { path: PathBuf, found: Fingerprint, ours: Fingerprint },
    #[error("{path}: the certificate is not for the key beside it")]
    Mismatched { path: PathBuf },
    #[error(
        "that identity key ({given}) is not this server's ({ours}): its address pins {ours}; rotating with \
         another identity would make every member re-pin"
    )]
    WrongIdentity { given: Fingerprint, ours: Fingerprint },
    #[error(
        "the identity key is not in {dir} (exported); pass it with --identity-key FILE (a removable disk, \
         for example), or copy the data directory to where it is"
    )]
    IdentityAway { dir: PathBuf },
    #[error(
        "{dir} served a server before (node.secrets is there) but neither its identity key (server.key) nor \
         identity.pub nor online.key is: restore one of them from a backup; hushd will not make a new identity \
         here, which would change the address every member pinned"
    )]
    IdentityUnknown { dir: PathBuf },
    #[error("{0} already exists; choose another path (an exported identity key is never overwritten)")]
    Exists(PathBuf),
    #[error("--valid-for must be between one day and {} days", MAX_ONLINE_VALIDITY_SECS / 86_400)]
    Validity,
    #[error(transparent)]
    Online(#[from] OnlineError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeysError + '_ {
    move |source| KeysError::Io { path: path.to_owned(), source }
}

/// The secrets every node of a deployment derives from the identity key.
pub struct NodeSecrets {
    /// Keys the QUIC stateless resets, so a restarted server's reset for
    /// a connection of its previous run is one the client recognises.
    pub reset: Zeroizing<[u8; 32]>,
    /// Authenticates PostgreSQL wake-ups between nodes.
    pub wake: Zeroizing<[u8; 32]>,
}

impl NodeSecrets {
    fn derive(identity: &Identity) -> Result<Self, KeyError> {
        Ok(Self {
            reset: identity.derive(RESET_KEY_LABEL)?,
            wake: identity.derive(crate::db::pg::listen::WAKE_KEY_LABEL)?,
        })
    }
}

/// A data directory's key files.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    dir: PathBuf,
}

/// What [`KeyFiles::open`] found: everything a server needs to serve.
pub struct Keys {
    /// The identity key's public half: what the address pins.
    pub identity_public: [u8; 32],
    /// The identity key, unless it was exported.
    pub identity: Option<Identity>,
    /// Whether the identity key was created just now.
    pub created: bool,
    /// The key TLS presents and chain heads are signed with.
    pub serving: ServerKey,
    pub secrets: NodeSecrets,
}

impl Keys {
    /// The fingerprint the address pins.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint_of(&self.identity_public)
    }
}

pub fn fingerprint_of(key: &[u8; 32]) -> Fingerprint {
    Fingerprint::of_spki(&cert::ed25519_spki(key))
}

/// The first 32 bytes (a seed or secret) and the rest.
fn split_seed(bytes: &[u8]) -> Option<(Zeroizing<[u8; 32]>, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<32>()?;
    Some((Zeroizing::new(*head), rest))
}

/// Reads a private file of exactly `len` bytes (mode 0600 or stricter).
fn read_private(path: &Path, len: usize, what: &'static str) -> Result<Zeroizing<Vec<u8>>, KeysError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeysError::Permissions { path: path.to_owned(), mode });
    }
    if meta.len() != len as u64 {
        return Err(KeysError::Format { path: path.to_owned(), what });
    }
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    file.take(len as u64).read_exact(&mut bytes).map_err(io(path))?;
    Ok(bytes)
}

impl KeyFiles {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    pub fn identity_key(&self) -> PathBuf {
        self.dir.join(IDENTITY_KEY_FILE)
    }
    pub fn identity_public(&self) -> PathBuf {
        self.dir.join(IDENTITY_PUBLIC_FILE)
    }
    pub fn online_key(&self) -> PathBuf {
        self.dir.join(ONLINE_KEY_FILE)
    }
    pub fn node_secrets(&self) -> PathBuf {
        self.dir.join(NODE_SECRETS_FILE)
    }

    /// The identity key if it is here (`None` if it was exported).
    pub fn load_identity(&self) -> Result<Option<Identity>, KeysError> {
        match Identity::load(&self.identity_key()) {
            Ok(id) => Ok(Some(id)),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The public half recorded in `identity.pub`, if any.
    pub fn recorded_public(&self) -> Result<Option<[u8; 32]>, KeysError> {
        let path = self.identity_public();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let bytes = crate::auth::text::decode_array::<32>(text.trim())
            .map_err(|_| KeysError::Format { path: path.clone(), what: "identity public key" })?;
        Ok(Some(bytes))
    }

    /// The public identity: from the key if it is here, else from
    /// `identity.pub`.
    pub fn public_identity(&self) -> Result<Option<[u8; 32]>, KeysError> {
        if let Some(id) = self.load_identity()? {
            return Ok(Some(id.public_key()));
        }
        if let Some(public) = self.recorded_public()? {
            return Ok(Some(public));
        }
        Ok(self.load_online()?.map(|(_, cert)| cert.identity))
    }

    /// Writes `identity.pub` and `node.secrets` for `identity` where they
    /// are missing; refuses an identity other than the recorded one.
    fn record(&self, identity: &Identity) -> Result<(), KeysError> {
        match self.recorded_public()? {
            Some(recorded) if recorded != identity.public_key() => {
                return Err(KeysError::WrongIdentity { given: identity.fingerprint(), ours: fingerprint_of(&recorded) })
            }
            Some(_) => {}
            None => {
                let text = format!("{}\n", crate::auth::text::encode(&identity.public_key()));
                crate::util::write_private(&self.identity_public(), text.as_bytes(), true)
                    .map_err(io(&self.identity_public()))?;
            }
        }
        if !self.node_secrets().exists() {
            let secrets = NodeSecrets::derive(identity)?;
            let bytes = Zeroizing::new([secrets.reset.as_slice(), secrets.wake.as_slice()].concat());
            crate::util::write_private(&self.node_secrets(), &bytes, false).map_err(io(&self.node_secrets()))?;
        }
        Ok(())
    }

    /// The derived secrets, for an operator's command (written first if
    /// the identity key is here and they are not).
    pub fn secrets(&self) -> Result<NodeSecrets, KeysError> {
        if !self.node_secrets().exists() {
            if let Some(identity) = self.load_identity()? {
                self.record(&identity)?;
            }
        }
        self.load_secrets()
    }

    fn load_secrets(&self) -> Result<NodeSecrets, KeysError> {
        let path = self.node_secrets();
        let bytes = read_private(&path, 64, "node secrets")?;
        let malformed = || KeysError::Format { path: path.clone(), what: "node secrets" };
        let (reset, wake) = split_seed(&bytes).ok_or_else(malformed)?;
        let wake: [u8; 32] = wake.try_into().map_err(|_| malformed())?;
        Ok(NodeSecrets { reset, wake: Zeroizing::new(wake) })
    }

    /// The online key and its certificate, if a rotation wrote them.
    pub fn load_online(&self) -> Result<Option<(Identity, OnlineCert)>, KeysError> {
        let path = self.online_key();
        let bytes = match read_private(&path, ONLINE_KEY_FILE_LEN, "online key") {
            Ok(b) => b,
            Err(KeysError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let malformed = || KeysError::Format { path: path.clone(), what: "online key" };
        let (seed, cert) = split_seed(&bytes).ok_or_else(malformed)?;
        let key = Identity::from_seed(&seed);
        let cert = OnlineCert::decode(cert).map_err(|_| malformed())?;
        if cert.online != key.public_key() {
            return Err(KeysError::Mismatched { path });
        }
        Ok(Some((key, cert)))
    }

    /// Makes the directory's identity key if it has none and never had
    /// one; returns whether it did. Records the identity's public half and
    /// the derived secrets.
    pub fn init(&self) -> Result<bool, KeysError> {
        crate::auth::identity::private_dir(&self.dir)?;
        if let Some(identity) = self.load_identity()? {
            self.record(&identity)?;
            return Ok(false);
        }
        if self.recorded_public()?.is_some() {
            // Exported: this directory keeps that identity.
            return Ok(false);
        }
        // identity.pub lost (a partial restore, a tidy-up): the online
        // key's certificate names the identity. Never a new identity in
        // a directory that served one (red team).
        if let Some((_, cert)) = self.load_online()? {
            let text = format!("{}\n", crate::auth::text::encode(&cert.identity));
            crate::util::write_private(&self.identity_public(), text.as_bytes(), true)
                .map_err(io(&self.identity_public()))?;
            return Ok(false);
        }
        if self.node_secrets().exists() {
            return Err(KeysError::IdentityUnknown { dir: self.dir.clone() });
        }
        let identity = Identity::generate()?;
        identity.save(&self.identity_key())?;
        self.record(&identity)?;
        Ok(true)
    }

    /// Everything a server needs to serve, after [`Self::init`]. A server
    /// holding its identity key renews an online key that expires within
    /// [`RENEW_BEFORE`] (or has expired) by itself.
    pub fn open(&self, now: u64) -> Result<Keys, KeysError> {
        let created = self.init()?;
        let identity = self.load_identity()?;
        let identity_public = match (&identity, self.recorded_public()?) {
            (Some(id), _) => id.public_key(),
            (None, Some(public)) => public,
            (None, None) => return Err(KeysError::NoServingKey { dir: self.dir.clone() }),
        };
        let serving = self.serving_key(&identity_public, identity.as_ref(), now)?;
        let secrets = self.load_secrets()?;
        Ok(Keys { identity_public, identity, created, serving, secrets })
    }

    /// The key to serve with now: the online key if there is one (renewed
    /// first if the identity is here and it is near its end), else the
    /// identity key.
    pub fn serving_key(
        &self,
        identity_public: &[u8; 32],
        identity: Option<&Identity>,
        now: u64,
    ) -> Result<ServerKey, KeysError> {
        let online = self.load_online()?;
        if let Some((_, cert)) = &online {
            if cert.identity != *identity_public {
                return Err(KeysError::OtherIdentity {
                    path: self.online_key(),
                    found: fingerprint_of(&cert.identity),
                    ours: fingerprint_of(identity_public),
                });
            }
        }
        match (online, identity) {
            (Some((_, cert)), Some(identity)) if needs_renewal(&cert, now) => {
                let (key, cert) = self.renew(identity, &cert, now)?;
                tracing::info!("renewed the online key (the old certificate ended within 30 days)");
                Ok(ServerKey::online(key, cert)?)
            }
            (Some((key, cert)), _) => Ok(ServerKey::online(key, cert)?),
            (None, Some(identity)) => Ok(ServerKey::identity(Identity::from_seed(&identity.seed()))?),
            (None, None) => Err(KeysError::NoServingKey { dir: self.dir.clone() }),
        }
    }

    /// Makes a new online key, certified by `identity` for `validity` from
    /// now (backdated by [`CERT_BACKDATE`]), and writes it in place of
    /// the old one. A serving hushd picks it up within
    /// [`KEY_POLL_INTERVAL`].
    pub fn rotate(
        &self,
        identity: &Identity,
        validity: Duration,
        now: u64,
    ) -> Result<(Identity, OnlineCert), KeysError> {
        let secs = validity.as_secs();
        if !(86_400..=MAX_ONLINE_VALIDITY_SECS - CERT_BACKDATE.as_secs()).contains(&secs) {
            return Err(KeysError::Validity);
        }
        if let Some(public) = self.public_identity()? {
            if public != identity.public_key() {
                return Err(KeysError::WrongIdentity { given: identity.fingerprint(), ours: fingerprint_of(&public) });
            }
        }
        self.record(identity)?;
        // Never older than the key it replaces: clients refuse a
        // certificate older than the newest they saw. (One that starts in
        // the future, from a clock that was wrong, no client took.)
        let after = match self.load_online() {
            Ok(Some((_, old))) if old.identity == identity.public_key() && old.not_before <= now => {
                old.not_before.saturating_add(1)
            }
            _ => 0,
        };
        let not_before = now.saturating_sub(CERT_BACKDATE.as_secs()).max(after);
        let online = Identity::generate()?;
        let cert = OnlineCert::issue(identity, online.public_key(), not_before, now.saturating_add(secs))?;
        self.write_online(&online, &cert)?;
        Ok((online, cert))
    }

    /// The online key that follows `old`, certified from [`RENEW_BEFORE`]
    /// before `old` ends for [`DEFAULT_ONLINE_VALIDITY`] (repeated until
    /// it is valid past `now` plus [`RENEW_BEFORE`]), and written in its
    /// place. Deterministic: its key is derived from the identity key and
    /// `old`, and Ed25519 signatures are too, so every node of a
    /// deployment that renews the same certificate makes the same key and
    /// certificate, and clients that refuse a certificate older than one
    /// they saw are never refused by a node that renewed a moment later.
    pub fn renew(&self, identity: &Identity, old: &OnlineCert, now: u64) -> Result<(Identity, OnlineCert), KeysError> {
        let mut cert = *old;
        let mut key = None;
        for _ in 0..MAX_RENEWALS {
            // From the start of the renewal window (backdated as a manual
            // rotation is), never before the certificate it follows
            // (clients refuse one older than the newest they saw); as long
            // as the one it follows.
            let validity = cert.not_after.saturating_sub(cert.not_before);
            let not_before = cert
                .not_after
                .saturating_sub(renewal_window(&cert))
                .saturating_sub(CERT_BACKDATE.as_secs())
                .max(cert.not_before.saturating_add(1));
            let label = [RENEWAL_LABEL, &cert.online, &not_before.to_be_bytes()].concat();
            let next = Identity::from_seed(&*identity.derive(&label)?);
            cert = OnlineCert::issue(identity, next.public_key(), not_before, not_before.saturating_add(validity))?;
            key = Some(next);
            if !needs_renewal(&cert, now) {
                break;
            }
        }
        let key = key.ok_or(KeysError::Validity)?;
        if needs_renewal(&cert, now) {
            // Decades offline: start afresh.
            return self.rotate(identity, DEFAULT_ONLINE_VALIDITY, now);
        }
        self.write_online(&key, &cert)?;
        Ok((key, cert))
    }

    fn write_online(&self, key: &Identity, cert: &OnlineCert) -> Result<(), KeysError> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(ONLINE_KEY_FILE_LEN));
        bytes.extend_from_slice(key.seed().as_ref());
        bytes.extend_from_slice(&cert.encode());
        crate::util::write_private(&self.online_key(), &bytes, true).map_err(io(&self.online_key()))
    }

    /// Moves the identity key to `to` (a new file, 0600) and deletes it
    /// here, after making sure the server can serve without it: the
    /// derived secrets are on disk and an online key valid for at least
    /// [`RENEW_BEFORE`] is in place (made now if not).
    pub fn export_identity(&self, to: &Path, now: u64) -> Result<OnlineCert, KeysError> {
        let identity = self.load_identity()?.ok_or_else(|| KeysError::IdentityAway { dir: self.dir.clone() })?;
        if to.exists() {
            return Err(KeysError::Exists(to.to_owned()));
        }
        self.record(&identity)?;
        let cert = match self.load_online()? {
            Some((_, cert)) if cert.identity == identity.public_key() && !needs_renewal(&cert, now) => cert,
            Some((_, cert)) if cert.identity == identity.public_key() => self.renew(&identity, &cert, now)?.1,
            _ => self.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now)?.1,
        };
        crate::util::write_private(to, identity.seed().as_ref(), false).map_err(io(to))?;
        // Read back before the only other copy goes.
        let copy = Identity::load(to)?;
        if copy.public_key() != identity.public_key() {
            return Err(KeysError::Format { path: to.to_owned(), what: "identity key (the copy differs)" });
        }
        std::fs::remove_file(self.identity_key()).map_err(io(&self.identity_key()))?;
        Ok(cert)
    }

    /// When `online.key` last changed, to notice a rotation cheaply.
    pub fn online_stamp(&self) -> Option<(std::time::SystemTime, u64)> {
        let meta = std::fs::metadata(self.online_key()).ok()?;
        Some((meta.modified().ok()?, std::os::unix::fs::MetadataExt::ino(&meta)))
    }
}

/// A serving hushd's watch on its key files: a rotation (`hushd keys
/// rotate`, here or on another machine with the data directory copied
/// over) takes effect for new connections within [`KEY_POLL_INTERVAL`];
/// connections made before keep the key they were made with until they
/// close. A server holding its identity key renews its online key before
/// it ends; one without warns once a day from [`RENEW_BEFORE`] on.
#[derive(Clone)]
pub struct KeyWatch {
    pub files: KeyFiles,
    pub identity_public: [u8; 32],
    pub identity: Option<std::sync::Arc<Identity>>,
    pub current: CurrentKey,
}

impl std::fmt::Debug for KeyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyWatch(..)")
    }
}

impl KeyWatch {
    pub async fn run(mut self) {
        let mut stamp = self.files.online_stamp();
        let mut tick = tokio::time::interval(KEY_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut warned_on_day = None;
        loop {
            tick.tick().await;
            let now = crate::util::now_unix();
            // Exported while serving: the key leaves this process too.
            if self.identity.is_some() && !self.files.identity_key().exists() {
                self.identity = None;
                tracing::info!("the identity key left the data directory; this server no longer renews by itself");
            }
            let current = self.current.get();
            let renew = self.identity.is_some() && current.cert().is_some_and(|c| needs_renewal(&c, now));
            // Taken before reading: a change while it reads is seen at the
            // next tick.
            let seen = self.files.online_stamp();
            if seen != stamp || renew {
                stamp = seen;
                let watch = self.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    watch.files.serving_key(&watch.identity_public, watch.identity.as_deref(), now)
                })
                .await;
                match loaded {
                    Ok(Ok(key)) if key.public_key() == current.public_key() => {}
                    Ok(Ok(key)) => match (key.cert(), current.cert()) {
                        // Clients that saw the newer key refuse the older
                        // one: never go back to it (a backup restored over
                        // a rotation, a copy between nodes the wrong way).
                        (Some(new), Some(old)) if new.not_before < old.not_before => tracing::warn!(
                            "online.key holds a key certified before the one being served; still serving the newer \
                             one (run `hushd keys rotate` for a new key)"
                        ),
                        (Some(new), _) => {
                            tracing::info!(
                                "serving a new online key (certified until {} Unix time): new connections use it, \
                                 existing ones keep theirs",
                                new.not_after
                            );
                            self.current.set(key);
                        }
                        (None, _) => {
                            tracing::info!("serving with the identity key itself again");
                            self.current.set(key);
                        }
                    },
                    Ok(Err(e)) => {
                        tracing::warn!("not using the changed key files: {e}; still serving the previous key")
                    }
                    Err(e) => tracing::warn!("reading the key files failed: {e}"),
                }
            }
            if let (None, Some(cert)) = (&self.identity, self.current.get().cert()) {
                let day = now / 86_400;
                if needs_renewal(&cert, now) && warned_on_day != Some(day) {
                    warned_on_day = Some(day);
                    let days = cert.not_after.saturating_sub(now) / 86_400;
                    tracing::warn!(
                        "the online key's certificate ends in {days} day(s) (at {} Unix time) and the identity key is \
                         not here to renew it: run `hushd keys rotate --identity-key FILE`; after it ends, clients \
                         refuse this server",
                        cert.not_after
                    );
                }
            }
        }
    }
}

/// How long before its end a certificate is renewed: [`RENEW_BEFORE`],
/// or a third of its validity if that is shorter (an operator's short
/// certificate is renewed into one as short, not at once).
pub fn renewal_window(cert: &OnlineCert) -> u64 {
    RENEW_BEFORE.as_secs().min(cert.not_after.saturating_sub(cert.not_before) / 3)
}

/// Whether a certificate ends within its [`renewal_window`] of `now`.
pub fn needs_renewal(cert: &OnlineCert, now: u64) -> bool {
    cert.not_after <= now.saturating_add(renewal_window(cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, KeyFiles) {
        let tmp = tempfile::tempdir().unwrap();
        let files = KeyFiles::new(&tmp.path().join("data"));
        (tmp, files)
    }

    #[test]
    fn an_exported_identity_is_never_recreated_and_its_secrets_stay() {
        let (_tmp, files) = dir();
        let now = 1_000_000_000;
        assert!(files.init().unwrap());
        let before = files.open(now).unwrap();
        assert!(before.serving.cert().is_none(), "before any rotation the identity key serves");
        let out = files.dir.parent().unwrap().join("identity.key");
        let cert = files.export_identity(&out, now).unwrap();
        assert!(!files.identity_key().exists());
        assert!(files.export_identity(&out, now).is_err(), "nothing left to export");
        // Init and open do not make a new identity; the address stays.
        assert!(!files.init().unwrap());
        let after = files.open(now).unwrap();
        assert_eq!(after.identity_public, before.identity_public);
        assert_eq!(after.serving.cert(), Some(cert));
        assert_eq!(after.secrets.reset.as_ref(), before.secrets.reset.as_ref());
        assert_eq!(after.secrets.wake.as_ref(), before.secrets.wake.as_ref());
        // Rotating needs the exported key, and only that one.
        let identity = Identity::load(&out).unwrap();
        assert!(matches!(
            files.rotate(&Identity::generate().unwrap(), DEFAULT_ONLINE_VALIDITY, now),
            Err(KeysError::WrongIdentity { .. })
        ));
        let (_, newer) = files.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now + 10).unwrap();
        assert_ne!(newer.online, cert.online);
        assert!(newer.not_before > cert.not_before, "a rotation is never older than what it replaces");
        assert_eq!(files.open(now + 10).unwrap().serving.cert(), Some(newer));
        // Without its identity, a server past its certificate's renewal
        // point keeps serving the old key (clients say why they refuse).
        let late = newer.not_after;
        assert_eq!(files.open(late).unwrap().serving.cert(), Some(newer));
    }

    #[test]
    fn a_server_holding_its_identity_renews_its_online_key_before_it_ends() {
        let (_tmp, files) = dir();
        let now = 1_000_000_000;
        files.init().unwrap();
        let identity = files.load_identity().unwrap().unwrap();
        let (_, cert) = files.rotate(&identity, Duration::from_secs(40 * 86_400), now).unwrap();
        assert_eq!(files.open(now).unwrap().serving.cert(), Some(cert));
        let later = now + 30 * 86_400;
        let renewed = files.open(later).unwrap().serving.cert().unwrap();
        assert_ne!(renewed.online, cert.online);
        assert!(renewed.not_after > later + RENEW_BEFORE.as_secs());
        assert!(files.rotate(&identity, Duration::from_secs(60), now).is_err(), "too short");
        // Two nodes renewing the same certificate make the same key.
        let other = KeyFiles::new(&files.dir.parent().unwrap().join("node2"));
        other.init().unwrap();
        let (_, twin) = other.renew(&identity, &cert, later).unwrap();
        assert_eq!(twin, renewed);
        // A server down for a year renews into a certificate valid now.
        let (_, late) = other.renew(&identity, &cert, now + 400 * 86_400).unwrap();
        assert!(late.not_before <= now + 400 * 86_400 && !needs_renewal(&late, now + 400 * 86_400));
    }

    #[test]
    fn a_renewal_never_starts_before_what_it_renews_and_keeps_its_length() {
        // Red team: a short rotation was renewed at once into a
        // certificate older than the one clients had seen.
        let (_tmp, files) = dir();
        let now = 1_000_000_000;
        files.init().unwrap();
        let identity = files.load_identity().unwrap().unwrap();
        let (_, seen) = files.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now - 10 * 86_400).unwrap();
        let (_, short) = files.rotate(&identity, Duration::from_secs(7 * 86_400), now).unwrap();
        assert!(short.not_before > seen.not_before);
        assert_eq!(files.open(now + 2).unwrap().serving.cert(), Some(short), "renewed at once");
        let late = short.not_after - 86_400;
        let renewed = files.open(late).unwrap().serving.cert().unwrap();
        assert_ne!(renewed, short);
        assert!(renewed.not_before > short.not_before && renewed.not_before <= late);
        assert_eq!(renewed.not_after - renewed.not_before, short.not_after - short.not_before);
    }

    #[test]
    fn a_rotation_after_a_fast_clock_is_valid_now() {
        let (_tmp, files) = dir();
        let now = 1_000_000_000;
        files.init().unwrap();
        let identity = files.load_identity().unwrap().unwrap();
        files.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now + 86_400).unwrap();
        let (_, fixed) = files.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now).unwrap();
        assert!(fixed.not_before <= now);
        files.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now + 10 * 365 * 86_400).unwrap();
        assert!(files.rotate(&identity, DEFAULT_ONLINE_VALIDITY, now).is_ok(), "ten years fast once");
    }

    #[test]
    fn init_never_replaces_an_identity_whose_public_half_was_lost() {
        let (tmp, files) = dir();
        let now = 1_000_000_000;
        files.init().unwrap();
        let before = files.open(now).unwrap().identity_public;
        files.export_identity(&tmp.path().join("id.key"), now).unwrap();
        std::fs::remove_file(files.identity_public()).unwrap();
        assert!(!files.init().unwrap(), "a new identity was created");
        assert!(!files.identity_key().exists());
        assert_eq!(files.public_identity().unwrap(), Some(before));
        assert_eq!(files.recorded_public().unwrap(), Some(before), "identity.pub written back");
        // With online.key gone too, node.secrets still says a server lived
        // here.
        std::fs::remove_file(files.identity_public()).unwrap();
        std::fs::remove_file(files.online_key()).unwrap();
        assert!(matches!(files.init(), Err(KeysError::IdentityUnknown { .. })));
        assert!(!files.identity_key().exists());
    }

    #[test]
    fn a_foreign_or_damaged_online_key_is_refused() {
        let (_tmp, files) = dir();
        let now = 1_000_000_000;
        files.init().unwrap();
        let other = KeyFiles::new(&files.dir.parent().unwrap().join("other"));
        other.init().unwrap();
        let theirs = other.load_identity().unwrap().unwrap();
        other.rotate(&theirs, DEFAULT_ONLINE_VALIDITY, now).unwrap();
        std::fs::copy(other.online_key(), files.online_key()).unwrap();
        assert!(matches!(files.open(now), Err(KeysError::OtherIdentity { .. })));
        let mut bytes = std::fs::read(files.online_key()).unwrap();
        bytes[0] ^= 1;
        crate::util::write_private(&files.online_key(), &bytes, true).unwrap();
        assert!(matches!(files.open(now), Err(KeysError::Mismatched { .. })));
    }
}

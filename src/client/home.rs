//! A home directory: one account on one device, pinned to one server.
//!
//! Layout (the directory is 0700, every file 0600):
//!
//! * `account.key`: the account key; it signs this device's certificate
//!   and is never used for TLS.
//! * `device.key`: this device's TLS key.
//! * `server`: the pinned server address, `hush://HOST:PORT/#FINGERPRINT`.
//! * `name`: the person's name as shown on this device (optional).
//! * `hush.db`: the state ([`super::state`]).
//!
//! Homes made before device certificates held a single `identity.key`;
//! they are refused with what to do instead.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::app::files::Progress;
use super::app::history::HistoryTaken;
use super::app::{App, AppError};
use super::link::{LinkCode, Offer};
use super::local::valid_name;
use super::Connection;
use crate::auth::{identity, AccountId, DeviceCertificate, HushAddress, Identity, KeyError};

/// Why a home cannot be used as asked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HomeError {
    #[error(
        "{0} was made by a hush from before device certificates; its groups cannot be carried over. Register \
         again in a new home (`hush --home NEW_DIR register ADDRESS --invite TOKEN`) and ask your contacts to \
         verify your new account id"
    )]
    Legacy(PathBuf),
    #[error("no identity in {0}; run `hush register ADDRESS --invite TOKEN` first")]
    NoIdentity(PathBuf),
    #[error("no server pinned in {0}; run `hush register` first")]
    NoServer(PathBuf),
    #[error("{path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("{home} is already registered with another server ({pinned}); use --home DIR for a second identity")]
    OtherServer { home: PathBuf, pinned: HushAddress },
    #[error("{text:?} is not a hush address: {why}")]
    NotAnAddress { text: String, why: String },
    #[error("names are 1 to 64 printable characters")]
    Name,
    #[error("{0} already has a device; link a new device into a new home (`hush --home NEW_DIR device join CODE`)")]
    AlreadyDevice(PathBuf),
    #[error(
        "this home has no account key: only the account's first device (the one that registered) can link or \
         revoke devices. A lost first device cannot be replaced: register a new account and have your contacts \
         verify it"
    )]
    NoAccountKey,
    #[error("{0} is a linked device of an account and registered already; nothing to do")]
    Linked(PathBuf),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "{0} is in use by `hush daemon` or `hush jsonrpc` (one process holds a home while it serves): talk to it \
         through its socket, or stop it first"
    )]
    HeldByDaemon(PathBuf),
    #[error(
        "{0} is in use by another hush process (a chat, a sync, a daemon): `hush daemon` and `hush jsonrpc` need \
         the home to themselves; stop the other one first"
    )]
    InUse(PathBuf),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A home directory (see the module doc).
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

/// What [`Home::register`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub account: AccountId,
    pub server: HushAddress,
    /// False when this device was registered already.
    pub new: bool,
    /// True when this call created the account and device keys.
    pub created_keys: bool,
}

/// A lock on a home (the file `lock` in it), held while the value lives.
#[derive(Debug)]
pub struct HomeLock {
    _file: std::fs::File,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Locks the home: `exclusive` for a process that serves it to others
    /// (`hush daemon`, `hush jsonrpc`), shared for every other command,
    /// so a daemon and a `hush send` never write its state at once while
    /// two ordinary commands still may. Fails at once with a message that
    /// says who holds it; never waits.
    pub fn lock(&self, exclusive: bool) -> Result<HomeLock, HomeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join("lock");
        let write = |source| HomeError::Write { path: path.clone(), source };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(write)?;
        let locked = if exclusive { file.try_lock() } else { file.try_lock_shared() };
        match locked {
            Ok(()) => Ok(HomeLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) if exclusive => Err(HomeError::InUse(self.dir.clone())),
            Err(std::fs::TryLockError::WouldBlock) => Err(HomeError::HeldByDaemon(self.dir.clone())),
            Err(std::fs::TryLockError::Error(e)) => Err(write(e)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn account_key_file(&self) -> PathBuf {
        self.dir.join("account.key")
    }

    fn device_key(&self) -> PathBuf {
        self.dir.join("device.key")
    }

    fn server_file(&self) -> PathBuf {
        self.dir.join("server")
    }

    fn name_file(&self) -> PathBuf {
        self.dir.join("name")
    }

    fn refuse_legacy(&self) -> Result<(), HomeError> {
        if self.dir.join("identity.key").exists() && !self.device_key().exists() {
            return Err(HomeError::Legacy(self.dir.clone()));
        }
        Ok(())
    }

    /// This device's TLS key.
    pub fn device(&self) -> Result<Identity, HomeError> {
        self.refuse_legacy()?;
        if !self.device_key().exists() {
            return Err(HomeError::NoIdentity(self.dir.clone()));
        }
        Ok(Identity::load(&self.device_key())?)
    }

    /// The server this home is registered with.
    pub fn server(&self) -> Result<HushAddress, HomeError> {
        let path = self.server_file();
        let text = std::fs::read_to_string(&path).map_err(|_| HomeError::NoServer(self.dir.clone()))?;
        text.trim().parse().map_err(|e| HomeError::Damaged { path, why: format!("{e}") })
    }

    /// The person's name on this device, if they gave one.
    pub fn name(&self) -> Option<String> {
        std::fs::read_to_string(self.name_file()).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    fn write(&self, path: &Path, text: &str) -> Result<(), HomeError> {
        crate::util::write_private(path, text.as_bytes(), true)
            .map_err(|source| HomeError::Write { path: path.to_owned(), source })
    }

    /// The account key, on the first device only.
    pub fn account_key(&self) -> Result<Identity, HomeError> {
        self.refuse_legacy()?;
        if !self.account_key_file().exists() {
            return Err(HomeError::NoAccountKey);
        }
        Ok(Identity::load(&self.account_key_file())?)
    }

    /// Opens the app of a registered home.
    pub fn open(&self) -> Result<App, AppError> {
        let device = self.device()?;
        let server = self.server()?;
        App::open(&self.dir, device, server)
    }

    /// Creates the account and this device (if this home has none yet),
    /// registers the device with the server at `address`
    /// (`hush://HOST:PORT/#FINGERPRINT`; with `invite`,
    /// if the server requires one), pins the server, publishes KeyPackages
    /// and keeps `name`. Registering again with the same server is
    /// harmless; a home already pinned to another server is refused.
    pub async fn register(
        &self,
        address: &str,
        invite: Option<&str>,
        name: Option<&str>,
    ) -> Result<Registration, AppError> {
        self.refuse_legacy()?;
        let address: HushAddress =
            address.parse().map_err(|e| HomeError::NotAnAddress { text: address.to_owned(), why: format!("{e}") })?;
        let address = &address;
        if name.is_some_and(|n| !valid_name(n)) {
            return Err(HomeError::Name.into());
        }
        if let Ok(pinned) = self.server() {
            if pinned.fingerprint != address.fingerprint {
                return Err(HomeError::OtherServer { home: self.dir.clone(), pinned }.into());
            }
            if !self.account_key_file().exists() {
                return Err(HomeError::Linked(self.dir.clone()).into());
            }
        }
        identity::private_dir(&self.dir).map_err(HomeError::from)?;
        let (account, created_keys) = Identity::load_or_create(&self.account_key_file()).map_err(HomeError::from)?;
        let (device, _) = Identity::load_or_create(&self.device_key()).map_err(HomeError::from)?;
        // The account key certifies this device (its TLS key and MLS key);
        // the certificate is this device's credential in every group.
        let certificate = App::initialise(&self.dir, &account, &device)?;
        drop(account);
        let conn = Connection::connect(address, &device).await?;
        let registered = conn.register(invite, &certificate).await;
        conn.close().await;
        let new = registered?;
        self.write(&self.server_file(), &format!("{address}\n"))?;
        let app = App::open(&self.dir, device, address.clone())?;
        let conn = app.connect().await?;
        app.top_up_key_packages(&conn).await?;
        conn.close().await;
        if let Some(n) = name {
            self.write(&self.name_file(), &format!("{}\n", n.trim()))?;
        }
        Ok(Registration { account: app.account(), server: address.clone(), new, created_keys })
    }

    /// Makes this (new, empty) home a device of the account whose first
    /// device shows `code`: creates this device's keys, offers them through
    /// the server sealed under the code, and waits for the certificate and
    /// the bundle (contacts, group names) the first device answers with. The
    /// account's groups are joined on the next sync.
    ///
    /// History the first device handed over is fetched, checked and
    /// imported before this returns (with `progress`); if the connection
    /// fails, the next sync tries again.
    pub async fn join(&self, code: &str, progress: &mut dyn Progress) -> Result<Joined, AppError> {
        self.refuse_legacy()?;
        let code: LinkCode = code.parse()?;
        // A home that registered or finished linking is a device already;
        // one whose earlier attempt did not finish may try again.
        if self.server_file().exists() || self.account_key_file().exists() {
            return Err(HomeError::AlreadyDevice(self.dir.clone()).into());
        }
        identity::private_dir(&self.dir).map_err(HomeError::from)?;
        let (device, _) = Identity::load_or_create(&self.device_key()).map_err(HomeError::from)?;
        let device_id = crate::auth::DeviceId(device.public_key());
        let mls_key = App::prepare_linked(&self.dir)?;
        // The history is sealed to this key, which lives only in this
        // process: a later leak of the code (a shell's history) and a kept
        // copy of the bundle (the operator) do not open it.
        let (history_secret, history_key) =
            crate::client::history::ephemeral_key().map_err(|e| AppError::File(e.to_string()))?;
        let offer = Offer { device: device_id, mls_key, history_key: Some(history_key) };
        let offer = code.seal_offer(&offer)?;
        let mut conn = Connection::connect(&code.server, &device).await?;
        conn.link_offer(code.id(), offer).await?;
        let deadline = std::time::Instant::now() + crate::limits::MAX_LINK_LIFETIME;
        let (certificate, bundle) = loop {
            if std::time::Instant::now() > deadline {
                return Err(AppError::LinkTimedOut);
            }
            match conn.link_result(code.id()).await {
                Ok(Some(answer)) => break answer,
                Ok(None) => tokio::time::sleep(super::app::LINK_POLL).await,
                // The server closes a connection that is not a device yet
                // after a while: come back on a new one.
                Err(e) if e.code().is_none() => conn = Connection::connect(&code.server, &device).await?,
                Err(e) => return Err(e.into()),
            }
        };
        conn.close().await;
        let cert = DeviceCertificate::decode(&certificate).map_err(|e| HomeError::Damaged {
            path: self.dir.clone(),
            why: format!("the certificate the first device sent: {e}"),
        })?;
        let bundle = code.open_bundle(&bundle)?;
        if cert.device != device_id || cert.mls_key != mls_key || cert.account != bundle.account {
            return Err(AppError::Link(crate::client::link::LinkError::Malformed(
                "the certificate is not for this device's keys and the account that sent it".into(),
            )));
        }
        App::finish_linked(&self.dir, &cert)?;
        self.write(&self.server_file(), &format!("{}\n", code.server))?;
        if let Some(n) = bundle.name.as_deref().filter(|n| valid_name(n)) {
            self.write(&self.name_file(), &format!("{n}\n"))?;
        }
        let mut app = App::open(&self.dir, device, code.server.clone())?;
        let history = bundle.history.as_ref().map(|sealed| sealed.open(history_secret, &history_key, &code.id()));
        let (contacts, groups) = app.import(&bundle, history.as_ref().and_then(|h| h.as_ref().ok()))?;
        let mut conn = app.connect().await?;
        app.publish_key_packages(&conn, true).await?;
        let history = match history {
            None => None,
            Some(Err(e)) => Some(Err(e.to_string())),
            Some(Ok(_)) => Some(match app.take_history(&mut conn, progress).await {
                Ok(taken) => Ok(taken),
                Err(e) if app.history_pending().unwrap_or(false) => Err(format!("{e}; `hush sync` tries again")),
                Err(e) => Err(e.to_string()),
            }),
        };
        conn.close().await;
        let history = history.map(|r| {
            r.and_then(|t| t.ok_or_else(|| "another process of this home (a sync) took the history in".to_string()))
        });
        Ok(Joined { account: cert.account, device: device_id, contacts, groups, history })
    }
}

/// What [`Home::restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub account: AccountId,
    pub server: HushAddress,
    pub contacts: usize,
    pub groups: usize,
    /// History lines taken back.
    pub lines: usize,
}

impl Home {
    /// The encrypted backup of this home (see
    /// [`crate::client::backup`]): only a home with the account key (the
    /// account's first device, or one restored from its backup) can make
    /// one.
    pub fn backup(&self, passphrase: &[u8]) -> Result<Vec<u8>, AppError> {
        let account = self.account_key()?;
        let mut app = self.open()?;
        let backup = app.export_backup(&account, self.name())?;
        Ok(crate::client::backup::seal(&backup, passphrase)?)
    }

    /// Makes this (new, empty) home the account a backup holds, on a new
    /// device: decrypts `file` with `passphrase` (a wrong passphrase or a
    /// damaged file is refused before anything is written), writes the
    /// account key, creates this device's key and certificate (signed by
    /// the account key), registers the device with the backup's server,
    /// takes back contacts, groups and history, and publishes
    /// KeyPackages. The groups are joined anew on the next sync (an
    /// external commit of a further device of the account, never to an
    /// older state than the backed-up device had reached).
    pub async fn restore(&self, file: &[u8], passphrase: &[u8]) -> Result<Restored, AppError> {
        self.refuse_legacy()?;
        let backup = crate::client::backup::open(file, passphrase)?;
        let server: HushAddress = backup
            .server
            .parse()
            .map_err(|e| HomeError::NotAnAddress { text: backup.server.clone(), why: format!("{e}") })?;
        if self.device_key().exists() || self.account_key_file().exists() || self.server_file().exists() {
            return Err(HomeError::AlreadyDevice(self.dir.clone()).into());
        }
        let existed = self.dir.exists();
        let restored = self.restore_into(&backup, server).await;
        if restored.is_err() {
            // Nothing half-made stays behind (the account key least of
            // all): the same restore can simply be run again.
            if existed {
                for f in ["account.key", "device.key", "hush.db", "hush.db-wal", "hush.db-shm", "name", "server"] {
                    let _ = std::fs::remove_file(self.dir.join(f));
                }
            } else {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
        restored
    }

    async fn restore_into(
        &self,
        backup: &crate::client::backup::Backup,
        server: HushAddress,
    ) -> Result<Restored, AppError> {
        identity::private_dir(&self.dir).map_err(HomeError::from)?;
        let account = Identity::from_seed(&backup.account_key);
        account.save(&self.account_key_file()).map_err(HomeError::from)?;
        let (device, _) = Identity::load_or_create(&self.device_key()).map_err(HomeError::from)?;
        let certificate = App::initialise(&self.dir, &account, &device)?;
        drop(account);
        let conn = Connection::connect(&server, &device).await?;
        let registered = conn.register(None, &certificate).await;
        conn.close().await;
        registered?;
        self.write(&self.server_file(), &format!("{server}\n"))?;
        if let Some(n) = backup.name.as_deref().filter(|n| valid_name(n)) {
            self.write(&self.name_file(), &format!("{n}\n"))?;
        }
        let mut app = App::open(&self.dir, device, server.clone())?;
        let (contacts, groups, lines) = app.import_backup(backup)?;
        let conn = app.connect().await?;
        app.publish_key_packages(&conn, true).await?;
        conn.close().await;
        Ok(Restored { account: certificate.account, server, contacts, groups, lines })
    }
}

/// What [`Home::join`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub account: AccountId,
    pub device: crate::auth::DeviceId,
    /// Contacts and groups taken over from the first device.
    pub contacts: usize,
    pub groups: usize,
    /// The history the first device handed over, if it did: what was
    /// imported, or why not (the next sync tries again if the connection
    /// was at fault).
    pub history: Option<Result<HistoryTaken, String>>,
}

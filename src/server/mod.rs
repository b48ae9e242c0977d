//! The QUIC listener: admission, sessions and graceful shutdown.
//!
//! [`Server::bind`] prepares everything that can fail (data directory, key,
//! database, socket) so that `hushd serve` prints its address only when it
//! is really listening. [`Server::run`] accepts connections until the
//! shutdown future completes, then stops accepting, lets in-flight requests
//! finish (at most [`SHUTDOWN_GRACE`]), closes every connection with
//! [`close::SHUTTING_DOWN`] and returns.
//!
//! Admission, in order, for each connection attempt: total and per-IP
//! connection caps (refused at once); when more than
//! `retry_above_pending` handshakes are in progress, an address that has not
//! been validated gets a QUIC retry; then the TLS handshake, which
//! authenticates the client's account key (see [`crate::auth::tls`]).

mod admission;
pub mod blobs;
pub mod engine;
pub mod keys;
pub mod metrics;
mod push;
mod session;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::auth::online::CurrentKey;
use crate::auth::tls::{server_crypto, TlsError};
use crate::auth::{identity, HushAddress, Identity, KeyError};
use crate::config::ServerConfig;
use crate::db::sqlite::DB_FILE;
use crate::db::Location;
use crate::db::StoreError;
use crate::limits::{
    INCOMING_BUFFER_BYTES, INCOMING_BUFFER_BYTES_TOTAL, LISTEN_READY_TIMEOUT, SHUTDOWN_GRACE, STRANGER_RECEIVE_WINDOW,
    STREAM_RECEIVE_WINDOW,
};
use crate::wire::close;
use engine::Engine;

pub use admission::{Admission, Refusal};

/// File name of the server's identity key in the data directory (what
/// its address pins; see [`keys`] for the online key it certifies).
pub const KEY_FILE: &str = keys::IDENTITY_KEY_FILE;

/// File name of the server's removal key: the key it would sign external
/// Remove proposals with (RFC 9420 external sender), separate from its TLS
/// key. Every group lists its public half.
pub const REMOVAL_KEY_FILE: &str = "removal.key";

/// How often messages and Welcomes past retention are deleted.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(600);

/// File the running server writes its address to, for `hushd invite`.
pub const ADDRESS_FILE: &str = "address";

/// Why the server could not start or stopped with an error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the idle timeout {0:?} is longer than QUIC can express")]
    IdleTimeout(std::time::Duration),
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub engine: Engine,
    pub admission: Arc<Admission>,
    pub registry: Arc<push::Registry>,
    pub account_rate: admission::RateLimiter<crate::auth::AccountId>,
    pub ip_rate: admission::RateLimiter<std::net::IpAddr>,
    /// Bytes of request frames all connections may hold at once.
    pub request_budget: Arc<tokio::sync::Semaphore>,
    /// Where blob bytes live.
    pub blobs: Arc<blobs::BlobStore>,
}

/// Paths of a server's files inside its data directory.
#[derive(Debug, Clone)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn key(&self) -> PathBuf {
        self.0.join(KEY_FILE)
    }
    pub fn db(&self) -> PathBuf {
        self.0.join(DB_FILE)
    }
    pub fn address(&self) -> PathBuf {
        self.0.join(ADDRESS_FILE)
    }
    pub fn removal_key(&self) -> PathBuf {
        self.0.join(REMOVAL_KEY_FILE)
    }
    /// The blob directory `config` names (default: `blobs` in here).
    pub fn blobs(&self, config: &ServerConfig) -> PathBuf {
        config.blob_dir.clone().unwrap_or_else(|| self.0.join(blobs::BLOB_DIR))
    }

    /// The server's key files.
    pub fn keys(&self) -> keys::KeyFiles {
        keys::KeyFiles::new(&self.0)
    }

    /// Creates the directory (0700), the keys and the database if missing
    /// (the SQLite file, or the schema in the configured PostgreSQL
    /// database). Returns the server's keys (an exported identity key is
    /// never recreated), the removal key, and where the database is.
    pub fn init(&self, config: &ServerConfig) -> Result<Initialised, ServerError> {
        identity::private_dir(&self.0)?;
        let keys = self.keys().open(crate::util::now_unix())?;
        let (removal, _) = Identity::load_or_create(&self.removal_key())?;
        // A node: its wake-ups are authenticated with the deployment's
        // wake-up secret.
        let database = Location::of(config.database_url(), &self.db(), Some(&keys.secrets.wake))?;
        database.prepare()?;
        Ok(Initialised { keys, removal, database })
    }
}

/// What [`DataDir::init`] made or found.
pub struct Initialised {
    /// The server's identity (what the address pins), the key it serves
    /// with, and the secrets derived from the identity.
    pub keys: keys::Keys,
    /// The key that signs the server's removal proposals.
    pub removal: Identity,
    /// The database the configuration names, ready.
    pub database: Location,
}

/// A bound, not yet running server.
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    address: HushAddress,
    data_dir: DataDir,
    /// The shared PostgreSQL database, if any: other nodes' pushes come
    /// from it.
    target: Option<Arc<crate::db::pg::Target>>,
    /// The metrics listener, if asked for.
    metrics: Option<std::net::TcpListener>,
    /// Watches for a rotated online key.
    rotation: keys::KeyWatch,
}

impl Server {
    /// Prepares the data directory and binds the UDP socket.
    pub fn bind(config: ServerConfig, data_dir: &Path) -> Result<Self, ServerError> {
        Self::bind_with_engine(config, data_dir, Engine::open)
    }

    /// [`Server::bind`], with the SQLite engine made by `open` (the
    /// database's path, quotas, keys) instead of [`Engine::open`]:
    /// how the benchmark puts a slower disk under a real server.
    pub fn bind_with_engine(
        config: ServerConfig,
        data_dir: &Path,
        open: impl FnOnce(&Path, crate::delivery::Quotas, crate::delivery::ServerKeys) -> Result<Engine, StoreError>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let data_dir = DataDir(data_dir.to_owned());
        let Initialised { keys: key_set, removal, database } = data_dir.init(&config)?;
        if key_set.created {
            info!("created server key {}", data_dir.key().display());
        }
        let keys::Keys { identity_public, identity: identity_key, serving, secrets, .. } = key_set;
        if let Some(cert) = serving.cert() {
            info!("serving with an online key certified until {} (Unix time)", cert.not_after);
        }
        let current = CurrentKey::new(serving);
        let keys = crate::delivery::ServerKeys { removal: Arc::new(removal), current: current.clone() };
        let (engine, target) = match database {
            Location::Postgres(target) => {
                info!("storing in PostgreSQL (several nodes may share the database)");
                (Engine::open_postgres(&target, config.quotas(), keys)?, Some(target))
            }
            Location::Sqlite(path) => (open(&path, config.quotas(), keys)?, None),
        };

        let mut transport = TransportConfig::default();
        // Every connection starts as a stranger's: one request stream and a
        // few KiB of flow-control credit, so nothing can be buffered for a
        // key before it is known to be a device (the session then opens
        // both up; see `session::Session::go_online`).
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(1))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_idle_timeout(Some(
                IdleTimeout::try_from(config.idle_timeout())
                    .map_err(|_| ServerError::IdleTimeout(config.idle_timeout()))?,
            ))
            .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
            .receive_window(VarInt::from_u32(STRANGER_RECEIVE_WINDOW))
            .send_window(4 * 1024 * 1024);
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto(current.clone())?));
        server_config
            .transport_config(Arc::new(transport))
            .max_incoming(usize::try_from(config.max_incoming).unwrap_or(usize::MAX))
            .incoming_buffer_size(INCOMING_BUFFER_BYTES)
            .incoming_buffer_size_total(INCOMING_BUFFER_BYTES_TOTAL)
            .migration(false);
        // Stateless resets under a key derived from the identity key: after
        // a restart (or a crash) the server's reset for a connection of its
        // previous run is one the client recognises, so clients reconnect
        // at once instead of waiting out their idle timeout.
        let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secrets.reset.as_ref());
        let bind = |addr: std::net::SocketAddr| -> std::io::Result<quinn::Endpoint> {
            let socket = std::net::UdpSocket::bind(addr)?;
            let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
            let endpoint_config = quinn::EndpointConfig::new(Arc::new(reset.clone()));
            quinn::Endpoint::new(endpoint_config, Some(server_config.clone()), socket, runtime)
        };
        let endpoint = match bind(config.listen) {
            Ok(e) => e,
            // The default [::] fails on hosts without IPv6; fall back to IPv4.
            Err(e) if config.listen == ServerConfig::default().listen => {
                let v4 = std::net::SocketAddr::from(([0u8; 4], config.listen.port()));
                warn!("cannot listen on {} ({e}); listening on {v4}", config.listen);
                bind(v4).map_err(|source| ServerError::Bind { addr: v4, source })?
            }
            Err(source) => return Err(ServerError::Bind { addr: config.listen, source }),
        };
        let bound = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let address = HushAddress {
            host: config.advertised_host(bound),
            port: bound.port(),
            fingerprint: keys::fingerprint_of(&identity_public),
        };
        let rotation =
            keys::KeyWatch { files: data_dir.keys(), identity_public, identity: identity_key.map(Arc::new), current };
        if let Err(e) = std::fs::write(data_dir.address(), format!("{address}\n")) {
            warn!("could not write {}: {e}", data_dir.address().display());
        }
        let config_rates = (config.requests_per_second_per_account, config.requests_per_second_per_ip);
        let config_metrics = config.metrics_listen;
        let request_memory = config.request_memory().min(tokio::sync::Semaphore::MAX_PERMITS);
        let blob_dir = data_dir.blobs(&config);
        let blob_store = blobs::BlobStore::open(&blob_dir).map_err(|e| {
            ServerError::Store(StoreError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot use the blob directory {}: {e}", blob_dir.display()),
            )))
        })?;
        let shared = Arc::new(Shared {
            config,
            engine,
            admission: Arc::new(Admission::default()),
            registry: Arc::new(push::Registry::default()),
            account_rate: admission::RateLimiter::new(config_rates.0),
            ip_rate: admission::RateLimiter::new(config_rates.1),
            request_budget: Arc::new(tokio::sync::Semaphore::new(request_memory)),
            blobs: Arc::new(blob_store),
        });
        let metrics = match config_metrics {
            Some(addr) => {
                let listener =
                    std::net::TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
                listener.set_nonblocking(true).map_err(|source| ServerError::Bind { addr, source })?;
                info!("metrics on http://{}/metrics", listener.local_addr().unwrap_or(addr));
                Some(listener)
            }
            None => None,
        };
        Ok(Self { endpoint, shared, address, data_dir, target, metrics, rotation })
    }

    /// The address clients register with.
    pub fn address(&self) -> &HushAddress {
        &self.address
    }

    /// The socket address actually bound.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut background = JoinSet::new();
        let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
        background.spawn(self.rotation.clone().run());
        background.spawn(sweep_orphans(self.shared.clone()));
        background.spawn(sweep_expired(self.shared.clone()));
        if let Some(listener) = self.metrics.as_ref().and_then(|l| l.try_clone().ok()) {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    background.spawn(metrics::serve(listener, self.shared.engine.clone()));
                }
                Err(e) => warn!("cannot serve metrics: {e}"),
            }
        }
        if let Some(target) = &self.target {
            let (events, rx) = tokio::sync::mpsc::channel(crate::db::pg::listen::NOTICE_QUEUE);
            let (listening, ready) = tokio::sync::oneshot::channel();
            background.spawn(crate::db::pg::listen::run(target.clone(), events));
            background.spawn(push::from_other_nodes(
                rx,
                self.shared.engine.clone(),
                self.shared.registry.clone(),
                listening,
            ));
            // Serve only once other nodes' notices are heard, so no client
            // misses a push in between (connection attempts wait in the
            // endpoint's queue meanwhile).
            if tokio::time::timeout(LISTEN_READY_TIMEOUT, ready).await.is_err() {
                warn!("not listening for other nodes' pushes yet; serving anyway (clients resync once it does)");
            }
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = expiry.tick() => {
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        match shared.engine.expire(crate::util::now_unix()).await {
                            Ok(0) => {}
                            Ok(n) => info!(rows = n, "expired old messages and Welcomes"),
                            Err(e) => warn!("expiry failed: {e}"),
                        }
                        expire_files(&shared, false).await;
                    });
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    self.admit(incoming, &mut connections, stop_rx.clone());
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        info!(connections = self.shared.admission.connections(), "shutting down");
        background.abort_all();
        self.endpoint.set_server_config(None);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("some connections did not finish in time; closing them");
            connections.abort_all();
        }
        self.endpoint.close(VarInt::from_u32(close::SHUTTING_DOWN), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        let _ = std::fs::remove_file(self.data_dir.address());
        info!("stopped");
        Ok(())
    }

    /// The blob directory.
    pub fn blob_dir(&self) -> &Path {
        self.shared.blobs.dir()
    }

    fn admit(&self, incoming: quinn::Incoming, connections: &mut JoinSet<()>, stop: watch::Receiver<bool>) {
        let remote = incoming.remote_address();
        let cfg = &self.shared.config;
        let slot = match self.shared.admission.admit(remote.ip(), cfg.max_connections, cfg.max_connections_per_ip) {
            Ok(slot) => slot,
            Err(why) => {
                debug!(?why, "refusing connection attempt");
                incoming.refuse();
                return;
            }
        };
        let pending = self.shared.admission.pending();
        if pending >= cfg.retry_above_pending && !incoming.remote_address_validated() && incoming.may_retry() {
            debug!(pending, "asking for address validation (retry)");
            if let Err(e) = incoming.retry() {
                debug!("retry failed: {e}");
            }
            return;
        }
        let handshake = self.shared.admission.handshake();
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!("accept failed: {e}");
                return;
            }
        };
        let shared = self.shared.clone();
        let span = tracing::info_span!("conn", id = tracing::field::Empty);
        connections.spawn(
            async move {
                let conn = match connecting.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        debug!("handshake failed: {e}");
                        return;
                    }
                };
                drop(handshake);
                tracing::Span::current().record("id", conn.stable_id());
                session::run(conn, shared, stop).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// Every `sweep_seconds` (and once at start, so a restart resumes what
/// was due), deletes what disappearing timers ran out on: messages' bytes,
/// in bounded steps, then blob rows and their files; then empties the
/// database's WAL so no file keeps a deleted byte. A checkpoint a reader
/// held up is tried again at the next sweep.
async fn sweep_expired(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unflushed = false;
    loop {
        tick.tick().await;
        let now = crate::util::now_unix();
        tracing::debug!(now, "sweeping expired messages");
        let mut expired = 0u64;
        loop {
            match shared.engine.expire_messages(now).await {
                Ok(n) => {
                    expired += n;
                    if n < crate::limits::MAX_MESSAGES_EXPIRED_PER_RUN as u64 {
                        break;
                    }
                }
                Err(e) => {
                    warn!("message expiry failed: {e}");
                    break;
                }
            }
        }
        if expired > 0 {
            info!(messages = expired, "deleted expired messages");
            unflushed = true;
        }
        expire_files(&shared, true).await;
        // While any group has a timer, every sweep empties the WAL: a
        // message everyone read before its time went by acknowledgement,
        // not by this sweep, and its bytes must leave the WAL too.
        match shared.engine.checkpoint(unflushed).await {
            Ok(done) => unflushed = !done,
            Err(e) => warn!("checkpoint after expiry failed: {e}"),
        }
    }
}

/// Deletes expired blobs, their rows then their files: those past
/// retention, or (`timed`) those whose group's disappearing timer ran out.
async fn expire_files(shared: &Shared, timed: bool) {
    let mut removed = 0usize;
    loop {
        let now = crate::util::now_unix();
        let expired =
            if timed { shared.engine.expire_timed_blobs(now).await } else { shared.engine.expire_blobs(now).await };
        match expired {
            Ok(ids) => {
                for id in &ids {
                    shared.blobs.remove(id);
                }
                removed += ids.len();
                if ids.len() < crate::limits::MAX_BLOBS_EXPIRED_PER_RUN {
                    break;
                }
            }
            Err(e) => {
                warn!("file expiry failed: {e}");
                break;
            }
        }
    }
    if removed > 0 {
        info!(files = removed, "deleted expired files");
    }
}

/// Removes files in the blob directory that no blob row names (a crash
/// between deleting a row and its file). The files are listed before the
/// rows are read: a file is created only after its row, so one listed
/// without a row has none.
async fn sweep_orphans(shared: Arc<Shared>) {
    let files = match std::fs::read_dir(shared.blobs.dir()) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect::<Vec<_>>(),
        Err(e) => {
            warn!("cannot list the blob directory: {e}");
            return;
        }
    };
    if files.is_empty() {
        return;
    }
    let mut known = std::collections::HashSet::new();
    let mut after = None;
    loop {
        match shared.engine.blobs(after, 4096).await {
            Ok(rows) if rows.is_empty() => break,
            Ok(rows) => {
                after = rows.last().map(|r| r.id);
                known.extend(rows.into_iter().map(|r| r.id));
            }
            Err(e) => {
                warn!("cannot list blobs: {e}");
                return;
            }
        }
    }
    let mut removed = 0;
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if blobs::parse_hex(name).is_some_and(|id| !known.contains(&id)) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        info!(files = removed, "removed blob files no row names");
    }
}

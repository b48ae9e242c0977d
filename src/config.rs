//! `hushd` configuration: every tunable limit, with validation.
//!
//! Precedence, highest first: command-line flags, environment variables
//! `HUSHD_<KEY>` (key in upper case, e.g. `HUSHD_MAX_CONNECTIONS=100`), the
//! optional file `hushd.toml` in the data directory, then the defaults from
//! [`crate::limits`]. Unknown keys and out-of-range values are refused at
//! start, naming the offending key and where it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::limits::*;

/// Name of the optional configuration file in the data directory.
pub const CONFIG_FILE: &str = "hushd.toml";

/// Environment variables with the `HUSHD_` prefix that are not config keys.
const RESERVED_ENV: &[&str] = &["HUSHD_DATA_DIR", "HUSHD_LOG", "HUSHD_LOG_FORMAT", "HUSHD_METRICS"];

/// Why the configuration was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: larger than {MAX_CONFIG_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Server settings. Field names are the config keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Host name printed in the `hush://` address (default: the listen IP,
    /// or `localhost` when listening on all interfaces).
    pub public_host: Option<String>,
    /// Allow registration without an invite. Off by default.
    pub open_registration: bool,
    /// Seconds an unregistered key may stay connected.
    pub auth_deadline_secs: u64,
    /// Seconds of silence after which a connection is dropped.
    pub idle_timeout_secs: u64,
    /// Seconds a request stream may take to deliver its frame.
    pub request_timeout_secs: u64,
    /// Concurrent connections in total.
    pub max_connections: u32,
    /// Concurrent connections per source IP address.
    pub max_connections_per_ip: u32,
    /// Concurrent connections per source IP whose key is not an account yet.
    pub max_unregistered_per_ip: u32,
    /// Concurrent connections whose key is not an account yet, in total.
    pub max_unregistered: u32,
    /// MiB of request frames all connections may hold in memory at once.
    pub max_request_memory_mb: u32,
    /// Concurrent request streams per connection.
    pub max_streams_per_connection: u32,
    /// Handshakes in progress above which clients must validate their
    /// address with a QUIC retry first (0: always).
    pub retry_above_pending: u32,
    /// Connection attempts buffered before being accepted or refused.
    pub max_incoming: u32,
    /// Days messages and Welcomes are kept at most, acknowledged or not.
    pub retention_days: u64,
    /// Seconds between sweeps of messages and files whose group's
    /// disappearing timer ran out (they are never served in between).
    pub sweep_seconds: u64,
    /// Groups one account may be a current member of.
    pub max_groups_per_account: u64,
    /// Members (MLS leaves) per group.
    pub max_members_per_group: u64,
    /// Messages one group's log may hold before new ones are refused.
    pub max_log_per_group: u64,
    /// Database size (MiB) above which new data is refused.
    pub max_database_mb: u64,
    /// Largest file (padded blob, MiB) a member may upload.
    pub max_file_mb: u64,
    /// File storage (MiB) per account; unfinished uploads count in full.
    pub storage_quota_mb: u64,
    /// Unfinished uploads one device may have at once.
    pub uploads_per_device: u64,
    /// Where blob files are kept (default: `blobs` in the data directory).
    /// Several PostgreSQL nodes must share one directory (a network file
    /// system), so any node serves any blob.
    pub blob_dir: Option<std::path::PathBuf>,
    /// Sustained requests per second per account (burst: twice this).
    pub requests_per_second_per_account: u32,
    /// Sustained requests per second per source IP from connections whose key
    /// is not an account (burst: twice this). Registered devices spend only
    /// their account's budget.
    pub requests_per_second_per_ip: u32,
    /// A PostgreSQL database to use instead of the embedded SQLite file
    /// (`postgresql://…`): several nodes can share it.
    pub database_url: Option<DatabaseUrl>,
    /// Serve Prometheus metrics on this TCP address (off by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on an address other than loopback (the
    /// metrics name no ids, but say how busy the server is).
    pub metrics_public: bool,
}

/// A database URL. It may hold a password, so it never appears in debug
/// output or logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0u16; 8], 7443)),
            public_host: None,
            database_url: None,
            metrics_listen: None,
            metrics_public: false,
            open_registration: false,
            auth_deadline_secs: DEFAULT_AUTH_DEADLINE.as_secs(),
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT.as_secs(),
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT.as_secs(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_unregistered_per_ip: DEFAULT_MAX_UNREGISTERED_PER_IP,
            max_unregistered: DEFAULT_MAX_UNREGISTERED,
            max_request_memory_mb: DEFAULT_MAX_REQUEST_MEMORY_MB,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            retry_above_pending: DEFAULT_RETRY_ABOVE_PENDING,
            max_incoming: DEFAULT_MAX_INCOMING,
            retention_days: DEFAULT_RETENTION.as_secs() / 86_400,
            sweep_seconds: DEFAULT_SWEEP_INTERVAL.as_secs(),
            max_groups_per_account: u64::from(DEFAULT_MAX_GROUPS_PER_ACCOUNT),
            max_members_per_group: u64::from(DEFAULT_MAX_MEMBERS_PER_GROUP),
            max_log_per_group: DEFAULT_MAX_LOG_PER_GROUP,
            max_database_mb: DEFAULT_MAX_DATABASE_MB,
            max_file_mb: DEFAULT_MAX_FILE_MB,
            storage_quota_mb: DEFAULT_STORAGE_QUOTA_MB,
            uploads_per_device: DEFAULT_UPLOADS_PER_DEVICE,
            blob_dir: None,
            requests_per_second_per_account: DEFAULT_REQUESTS_PER_SECOND_PER_ACCOUNT,
            requests_per_second_per_ip: DEFAULT_REQUESTS_PER_SECOND_PER_IP,
        }
    }
}

impl ServerConfig {
    /// Loads `hushd.toml` from `data_dir` (if present) and applies the
    /// `HUSHD_*` variables from `env` on top.
    pub fn load(data_dir: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let mut layers: Vec<(String, toml::Table)> = Vec::new();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > MAX_CONFIG_FILE => return Err(ConfigError::TooLarge { path }),
            Ok(_) => {
                let text =
                    std::fs::read_to_string(&path).map_err(|source| ConfigError::Io { path: path.clone(), source })?;
                let table = Self::parse_file(&text).map_err(|e| ConfigError::Invalid {
                    origin: path.display().to_string(),
                    message: e.to_string().trim().to_string(),
                })?;
                layers.push((path.display().to_string(), table));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Io { path, source }),
        }
        let mut env_table = toml::Table::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("HUSHD_") else { continue };
            if RESERVED_ENV.contains(&name.as_str()) {
                continue;
            }
            env_table.insert(key.to_ascii_lowercase(), env_value(&value));
        }
        layers.push(("environment (HUSHD_*)".into(), env_table));
        Self::from_layers(layers)
    }

    /// Parses the text of a configuration file into its keys (no checks of
    /// key names or values yet).
    pub fn parse_file(text: &str) -> Result<toml::Table, toml::de::Error> {
        text.parse::<toml::Table>()
    }

    /// Builds a configuration from layers applied in order (later wins),
    /// checking each key where it appears so errors name their origin.
    pub fn from_layers(layers: Vec<(String, toml::Table)>) -> Result<Self, ConfigError> {
        let mut merged = toml::Table::new();
        for (origin, table) in layers {
            for (key, value) in table {
                let mut single = toml::Table::new();
                single.insert(key.clone(), value.clone());
                Self::deserialize(single).map_err(|e| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: format!("key `{key}`: {}", e.message().trim()),
                })?;
                merged.insert(key, value);
            }
        }
        let config = Self::deserialize(merged)
            .map_err(|e| ConfigError::Invalid { origin: "configuration".into(), message: e.message().to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Range checks; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| ConfigError::Invalid {
            origin: "configuration".into(),
            message: format!("key `{key}`: {why}"),
        };
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(bad(key, &format!("{v} is outside {lo}..={hi}")))
            } else {
                Ok(())
            }
        };
        range("auth_deadline_secs", self.auth_deadline_secs, 1, 3600)?;
        range("idle_timeout_secs", self.idle_timeout_secs, 1, 3600)?;
        range("request_timeout_secs", self.request_timeout_secs, 1, 3600)?;
        range("max_connections", u64::from(self.max_connections), 1, 1_000_000)?;
        range("max_connections_per_ip", u64::from(self.max_connections_per_ip), 1, 1_000_000)?;
        range("max_unregistered_per_ip", u64::from(self.max_unregistered_per_ip), 1, 1_000_000)?;
        range("max_unregistered", u64::from(self.max_unregistered), 1, 1_000_000)?;
        range("max_request_memory_mb", u64::from(self.max_request_memory_mb), 2, 65_536)?;
        range("max_streams_per_connection", u64::from(self.max_streams_per_connection), 1, 10_000)?;
        range("retry_above_pending", u64::from(self.retry_above_pending), 0, 1_000_000)?;
        range("max_incoming", u64::from(self.max_incoming), 1, 1_000_000)?;
        range("retention_days", self.retention_days, MIN_RETENTION.as_secs() / 86_400, 3650)?;
        range("sweep_seconds", self.sweep_seconds, 1, MAX_SWEEP_INTERVAL.as_secs())?;
        range("max_groups_per_account", self.max_groups_per_account, 1, 1_000_000)?;
        range("max_members_per_group", self.max_members_per_group, 2, 100_000)?;
        range("max_log_per_group", self.max_log_per_group, 1, 1_000_000_000)?;
        range("max_database_mb", self.max_database_mb, 1, 1 << 30)?;
        range("max_file_mb", self.max_file_mb, 1, MAX_BLOB_SIZE / (1024 * 1024))?;
        range("storage_quota_mb", self.storage_quota_mb, 1, 1 << 40)?;
        range("uploads_per_device", self.uploads_per_device, 1, 1000)?;
        range("requests_per_second_per_account", u64::from(self.requests_per_second_per_account), 1, 1_000_000)?;
        range("requests_per_second_per_ip", u64::from(self.requests_per_second_per_ip), 1, 1_000_000)?;
        if let Some(host) = &self.public_host {
            // Same rule as `hush://` addresses: a colon only in an IPv6 address.
            if !crate::auth::address::is_host(host) {
                return Err(bad("public_host", "must be a DNS name or an IP address"));
            }
        }
        if let Some(addr) = self.metrics_listen {
            if !addr.ip().is_loopback() && !self.metrics_public {
                return Err(bad(
                    "metrics_listen",
                    &format!("{addr} is not a loopback address; set metrics_public = true to serve metrics there"),
                ));
            }
        }
        if let Some(url) = &self.database_url {
            crate::db::pg::Target::parse(&url.0).map_err(|e| bad("database_url", &e.to_string()))?;
        }
        Ok(())
    }

    /// The PostgreSQL URL, if the configuration names one.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_ref().map(|u| u.0.as_str())
    }

    /// The Delivery Service quotas this configuration sets.
    pub fn quotas(&self) -> crate::delivery::Quotas {
        crate::delivery::Quotas {
            retention_secs: self.retention_days.saturating_mul(86_400),
            max_groups_per_account: self.max_groups_per_account,
            max_members_per_group: self.max_members_per_group,
            max_log_per_group: self.max_log_per_group,
            max_database_bytes: self.max_database_mb.saturating_mul(1024 * 1024),
            max_file_bytes: self.max_file_mb.saturating_mul(1024 * 1024),
            storage_quota_bytes: self.storage_quota_mb.saturating_mul(1024 * 1024),
            uploads_per_device: self.uploads_per_device,
            invite_required: !self.open_registration,
        }
    }

    /// How often expired messages and files are swept.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_seconds)
    }

    pub fn auth_deadline(&self) -> Duration {
        Duration::from_secs(self.auth_deadline_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// Bytes of request frames all connections may hold at once.
    pub fn request_memory(&self) -> usize {
        usize::try_from(self.max_request_memory_mb).unwrap_or(usize::MAX).saturating_mul(1024 * 1024)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The host clients should dial, for the printed address.
    pub fn advertised_host(&self, bound: SocketAddr) -> String {
        if let Some(host) = &self.public_host {
            return host.clone();
        }
        if bound.ip().is_unspecified() {
            // [::] also accepts IPv4 on Linux; 0.0.0.0 does not accept ::1.
            if bound.is_ipv6() { "localhost" } else { "127.0.0.1" }.to_string()
        } else {
            bound.ip().to_string()
        }
    }
}

/// An environment value as TOML: numbers and booleans keep their type,
/// anything else is a string.
fn env_value(text: &str) -> toml::Value {
    if let Ok(n) = text.trim().parse::<i64>() {
        return toml::Value::Integer(n);
    }
    match text.trim() {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = file {
            std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        }
        ServerConfig::load(dir.path(), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_without_file_or_env() {
        assert_eq!(load(None, &[]).unwrap(), ServerConfig::default());
    }

    #[test]
    fn env_overrides_file() {
        let c =
            load(Some("max_connections = 10\nauth_deadline_secs = 3\n"), &[("HUSHD_MAX_CONNECTIONS", "20")]).unwrap();
        assert_eq!(c.max_connections, 20);
        assert_eq!(c.auth_deadline_secs, 3);
        let c = load(None, &[("HUSHD_LISTEN", "127.0.0.1:9000"), ("HUSHD_DATA_DIR", "/x"), ("PATH", "/bin")]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
    }

    #[test]
    fn a_database_url_is_checked_at_load_and_never_printed() {
        let c = load(None, &[("HUSHD_DATABASE_URL", "postgresql://hush:s3cret@db.example/hush")]).unwrap();
        assert!(c.database_url.is_some());
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = load(Some("database_url = \"not a url\""), &[]).unwrap_err().to_string();
        assert!(e.contains("database_url"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_its_origin() {
        let e = load(Some("max_conections = 10\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("max_conections") && e.contains(CONFIG_FILE), "{e}");
        let e = load(None, &[("HUSHD_MAX_CONNECTIONS", "lots")]).unwrap_err().to_string();
        assert!(e.contains("max_connections") && e.contains("environment"), "{e}");
        let e = load(Some("auth_deadline_secs = 0\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("auth_deadline_secs"), "{e}");
        let e = load(Some("listen = \"nowhere\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        assert!(load(Some("this is not toml"), &[]).is_err());
    }
}

//! What both backends share: the one error type, the integer conversions
//! both databases need, and the health report `hushd check` prints. It
//! knows neither backend's code (only the `postgres` crate's error type).

use std::path::PathBuf;

use thiserror::Error;

/// A count or time as the databases store it (SQLite's INTEGER and
/// PostgreSQL's bigint are signed): values past
/// `i64::MAX` are clamped, never wrapped.
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Back from the database: a negative value (which hush never writes) reads as 0.
pub fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// An error and its causes, each once ("error performing TLS handshake:
/// invalid peer certificate: UnknownIssuer"), so an operator sees why.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// A PostgreSQL error without the server's DETAIL and HINT, which can quote
/// row values (a duplicate key's bytes: a device or account key), so that
/// logging it leaks no id; with the SQLSTATE to look it up.
fn postgres_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => causes(e),
    }
}

/// Storage failures. None of them is the client's fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {}", postgres_error(.0))]
    Postgres(#[from] postgres::Error),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("database schema version {found} is newer than this hushd supports ({supported}); upgrade hushd")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error(
        "the database (schema {found}) was written by a hushd from before device certificates: its accounts and \
         groups have MLS leaves nothing vouches for and cannot be carried over. Stop hushd, move hush.db (with any \
         hush.db-wal and hush.db-shm) aside (keep server.key, so the address stays the same), start hushd again and have members register again \
         with new invites"
    )]
    Uncertified { found: i64 },
    #[error("the database holds data that is not valid: {0}")]
    Corrupt(String),
    #[error("no hushd database at {0}; run `hushd serve` or `hushd init` first")]
    Missing(PathBuf),
    #[error("the database thread has stopped")]
    Closed,
    #[error("could not start the database thread: {0}")]
    Thread(std::io::Error),
    #[error("no randomness available from the operating system")]
    Random,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why a database URL was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("the database URL is not valid: {0}")]
    Url(String),
    #[error("cannot read the CA certificates in {path}: {why}")]
    RootCerts { path: PathBuf, why: String },
    #[error("no randomness available from the operating system")]
    Random,
    #[error("cannot derive the wake-up key from the server key: {0}")]
    Key(String),
}

/// What `hushd check` found in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbReport {
    /// `PRAGMA integrity_check` output: `["ok"]` when healthy.
    pub integrity: Vec<String>,
    pub schema_version: i64,
    pub latest_schema: i64,
    pub accounts: u64,
    pub groups: u64,
    pub messages: u64,
    pub bytes: u64,
}

impl DbReport {
    pub fn healthy(&self) -> bool {
        self.integrity == ["ok"] && self.schema_version <= self.latest_schema
    }
}

//! The client's on-disk state: one SQLite database per home directory.
//!
//! The MLS state (signature key, KeyPackage private keys, group secrets)
//! lives in openmls's own SQLite storage provider
//! (`openmls_sqlite_storage`, serde/JSON codec, its own migrations), and
//! hush's tables (settings, contacts, groups with read cursors, the message
//! history) live beside it in the same file, migrated by `user_version`.
//! The file is created 0600 in a 0700 home. `synchronous=FULL`: whatever
//! the CLI reports as done survives a crash. `secure_delete=ON`, and the
//! write-ahead log is checkpointed and truncated when the app closes
//! ([`checkpoint`]), so secrets openmls deletes do not linger on disk.

use std::path::Path;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{params, Connection, OptionalExtension};

use crate::auth::AccountId;

/// The state file in the home directory.
pub const STATE_FILE: &str = "hush.db";

/// JSON codec for openmls's SQLite storage.
#[derive(Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// An openmls provider: RustCrypto plus SQLite storage.
pub struct Provider {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, Connection>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider")
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }
    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }
    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// Why the state could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("client state: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("client state migrations: {0}")]
    Migrations(String),
    #[error("client state: {0}")]
    Io(#[from] std::io::Error),
}

const MIGRATIONS: &[&str] = &["CREATE TABLE settings (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
    CREATE TABLE contacts (name TEXT PRIMARY KEY NOT NULL, account BLOB NOT NULL UNIQUE);
    CREATE TABLE groups (
        id BLOB PRIMARY KEY NOT NULL,
        name TEXT,
        cursor INTEGER NOT NULL DEFAULT 0,
        active INTEGER NOT NULL DEFAULT 1,
        joined_at INTEGER NOT NULL
    );
    CREATE TABLE sent (group_id BLOB NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (group_id, seq));
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        group_id BLOB NOT NULL,
        seq INTEGER NOT NULL,
        sender BLOB,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        time INTEGER NOT NULL
    );
    CREATE INDEX history_group ON history(group_id, id);"];

fn open_conn(path: &Path) -> Result<Connection, StateError> {
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Deleted secrets (KeyPackage private keys, past epochs' secrets,
    // used message keys) are overwritten, not left in free pages.
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

/// Opens (creating and migrating) the state in `home`: the MLS provider and
/// a connection for hush's tables.
pub fn open(home: &Path) -> Result<(Provider, Connection), StateError> {
    let path = home.join(STATE_FILE);
    let mut storage = SqliteStorageProvider::<JsonCodec, Connection>::new(open_conn(&path)?);
    storage.run_migrations().map_err(|e| StateError::Migrations(e.to_string()))?;
    let mut conn = open_conn(&path)?;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let Some(sql) = usize::try_from(version).ok().and_then(|v| MIGRATIONS.get(v)) else { break };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
    Ok((Provider { crypto: RustCrypto::default(), storage }, conn))
}

/// A setting.
pub fn setting(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StateError> {
    Ok(conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

pub fn set_setting(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StateError> {
    conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)", params![key, value])?;
    Ok(())
}

/// Reads an account id column.
pub fn account_col(bytes: Option<Vec<u8>>) -> Option<AccountId> {
    bytes.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok()).map(AccountId)
}

/// Moves everything from the write-ahead log into the database and
/// truncates the log, so page images holding deleted secrets do not stay
/// in it.
pub fn checkpoint(conn: &Connection) -> Result<(), StateError> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

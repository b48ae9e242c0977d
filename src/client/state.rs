//! The client's on-disk state: one SQLite database per home directory.
//!
//! The MLS state (signature key, KeyPackage private keys, group secrets)
//! lives in openmls's own SQLite storage provider
//! (`openmls_sqlite_storage`, serde/JSON codec, its own migrations), and
//! hush's tables (settings, contacts, groups with read cursors, the message
//! history; [`super::local`]) live beside it in the same file, migrated by
//! `user_version`, on the same connection, so one unit of work covers both.
//! The file is created 0600 in a 0700 home. `synchronous=FULL`: whatever
//! the CLI reports as done survives a crash. `secure_delete=ON`, and the
//! write-ahead log is checkpointed and truncated when the app closes
//! ([`checkpoint`]), so secrets openmls deletes do not linger on disk.

use std::path::Path;
use std::rc::Rc;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::Connection;

use super::local::Local;

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
    storage: SqliteStorageProvider<JsonCodec, Rc<Connection>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider")
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, Rc<Connection>>;

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
    #[error(
        "this home's state (schema {found}) was written by a newer hush (this one knows {supported}); upgrade hush"
    )]
    TooNew { found: i64, supported: i64 },
    #[error("client state: {0}")]
    Io(#[from] std::io::Error),
}

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE settings (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
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
    CREATE INDEX history_group ON history(group_id, id);",
    // 1 -> 2: names this (first) device gave the account's other devices.
    "CREATE TABLE device_names (device BLOB PRIMARY KEY NOT NULL, name TEXT NOT NULL UNIQUE);",
    // 2 -> 3: account-signed revocations this device has seen (any
    // account's); their devices are refused as leaves from then on.
    "CREATE TABLE revocations (device BLOB PRIMARY KEY NOT NULL, statement BLOB NOT NULL);",
    // 3 -> 4: Welcomes from accounts that are not contacts, waiting for the
    // user to accept or decline them.
    "CREATE TABLE invitations (
        group_id BLOB PRIMARY KEY NOT NULL,
        welcome BLOB NOT NULL,
        inviter BLOB NOT NULL,
        members INTEGER NOT NULL,
        at INTEGER NOT NULL
    );",
    // 4 -> 5: for a linked device, the first device's epoch and transcript
    // hash of each group, which its first join must not go back from.
    "CREATE TABLE anchors (group_id BLOB PRIMARY KEY NOT NULL, epoch INTEGER NOT NULL, transcript BLOB NOT NULL);",
    // 5 -> 6: for a linked device, the first device's state of each group
    // itself (an encoded `LinkHandover`), which its first join walks from.
    "CREATE TABLE handovers (group_id BLOB PRIMARY KEY NOT NULL, state BLOB NOT NULL);",
    // 6 -> 7: verifiable delivery (`crate::client::verify`). Per group the
    // position this device verified the chain to (and since which
    // sequence, without a break), the last head the server signed for it;
    // the heads it verified (for comparing with what others saw); alarms
    // with their evidence; how far each member had read when it last
    // wrote; and the head the server gave each of our own messages.
    "CREATE TABLE chains (
        group_id BLOB PRIMARY KEY NOT NULL,
        seq INTEGER NOT NULL,
        head BLOB NOT NULL,
        since INTEGER NOT NULL,
        signed BLOB
    );
    CREATE TABLE heads (
        group_id BLOB NOT NULL, seq INTEGER NOT NULL, head BLOB NOT NULL, PRIMARY KEY (group_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE alarms (
        id INTEGER PRIMARY KEY,
        group_id BLOB NOT NULL,
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        evidence TEXT,
        time INTEGER NOT NULL
    );
    CREATE TABLE seen (
        group_id BLOB NOT NULL,
        account BLOB NOT NULL,
        at_seq INTEGER NOT NULL,
        seen_seq INTEGER NOT NULL,
        PRIMARY KEY (group_id, account)
    );
    ALTER TABLE sent ADD COLUMN head BLOB;
    ALTER TABLE groups ADD COLUMN synced_at INTEGER;",
    // 7 -> 8: the SHA-256 of each message this device sent, so the message
    // at the place the server gave it must be that one (not another the
    // server gives its place, which this device would skip as its own).
    "ALTER TABLE sent ADD COLUMN digest BLOB;",
    // 8 -> 9: files (issue 32). Each file message received or sent: the
    // blob's id, key and hash, and what the sender said about the file.
    "CREATE TABLE files (
        group_id BLOB NOT NULL,
        id BLOB NOT NULL,
        seq INTEGER NOT NULL,
        sender BLOB,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        media_type TEXT NOT NULL,
        key BLOB NOT NULL,
        hash BLOB NOT NULL,
        time INTEGER NOT NULL,
        PRIMARY KEY (group_id, id)
    );",
    // 9 -> 10: disappearing messages (issue 33). When each line and file
    // message expires (NULL: never); expired ones are deleted on every run
    // ([`super::local::Local::purge_expired`]). Each group's timer from the
    // epoch it was set in (a message the server says expired must have
    // been sent under one).
    "ALTER TABLE history ADD COLUMN expires_at INTEGER;
    ALTER TABLE files ADD COLUMN expires_at INTEGER;
    CREATE INDEX history_expires ON history(expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX files_expires ON files(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE timers (
        group_id BLOB NOT NULL, epoch INTEGER NOT NULL, secs INTEGER NOT NULL, PRIMARY KEY (group_id, epoch)
    ) WITHOUT ROWID;",
    // 10 -> 11: history for a linked device, and restored backups (issue
    // 34). A line another device of the account handed over is marked, and
    // shown before what this device received itself.
    "ALTER TABLE history ADD COLUMN imported INTEGER NOT NULL DEFAULT 0;",
];

/// Deleted secrets (KeyPackage private keys, past epochs' secrets, used
/// message keys) are overwritten, not left in free pages: see
/// [`crate::sqlite::open`].
fn open_conn(path: &Path) -> Result<Connection, StateError> {
    crate::sqlite::open(path)
}

/// Opens (creating and migrating) the state in `home`: the MLS provider and
/// hush's tables, on one connection.
pub fn open(home: &Path) -> Result<(Provider, Local), StateError> {
    let path = home.join(STATE_FILE);
    // openmls migrates through a connection it owns; it is closed before
    // the shared one opens.
    let mut migrating = SqliteStorageProvider::<JsonCodec, Connection>::new(open_conn(&path)?);
    migrating.run_migrations().map_err(|e| StateError::Migrations(e.to_string()))?;
    drop(migrating);
    let mut conn = open_conn(&path)?;
    let latest = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    crate::sqlite::migrate(
        &mut conn,
        MIGRATIONS,
        latest,
        |found, supported| StateError::TooNew { found, supported },
        |_, _| Ok(()),
    )?;
    let conn = Rc::new(conn);
    let storage = SqliteStorageProvider::new(conn.clone());
    Ok((Provider { crypto: RustCrypto::default(), storage }, Local::new(conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_written_by_a_newer_hush_is_refused_and_left_alone() {
        let home = tempfile::tempdir().unwrap();
        drop(open(home.path()).unwrap());
        let conn = Connection::open(home.path().join(STATE_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let Err(e) = open(home.path()) else { panic!("a newer state was opened") };
        assert!(matches!(e, StateError::TooNew { found: 99, .. }), "{e}");
        let conn = Connection::open(home.path().join(STATE_FILE)).unwrap();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, 99);
    }
}

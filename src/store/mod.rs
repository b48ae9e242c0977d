//! Persistence: SQLite (rusqlite, bundled) in WAL mode.
//!
//! [`Db`] is an open database: the [`crate::delivery::storage::Backend`]
//! the server's engine ([`crate::server::engine::Engine`]) runs on its
//! threads (so async tasks never block on SQLite), and what short-lived
//! commands (`hushd invite`, `hushd accounts`) use directly. [`SqlStore`]
//! is the [`crate::delivery::Storage`] on a connection: everything the
//! server persists. Several
//! processes may open the same database: writes take SQLite's write lock
//! (`BEGIN IMMEDIATE`) and wait up to [`BUSY_TIMEOUT`] for it.
//!
//! Durability: `synchronous=FULL`, so a write acknowledged to a client has
//! been fsynced. `foreign_keys=ON`. The schema is versioned with
//! `PRAGMA user_version` and migrated forward in the `schema` module.
//!
//! The store holds public keys, device certificates, hashed invite
//! secrets, public MLS group state and GroupInfo, and ciphertext. It never
//! holds the server's private keys.

mod db;
pub mod maintenance;
mod schema;
mod sql;

pub use db::{Admin, Db};
pub use sql::SqlStore;

use thiserror::Error;

pub use crate::sqlite::BUSY_TIMEOUT;

/// A count or time as SQLite stores it (INTEGER is signed): values past
/// `i64::MAX` are clamped, never wrapped.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Back from SQLite: a negative value (which hush never writes) reads as 0.
pub(crate) fn to_u64(v: i64) -> u64 {
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

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "hush.db";

/// Storage failures. None of them is the client's fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {}", postgres_error(.0))]
    Postgres(#[from] postgres::Error),
    #[error(transparent)]
    Target(#[from] crate::pg::TargetError),
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
    #[error("the database thread has stopped")]
    Closed,
    #[error("could not start the database thread: {0}")]
    Thread(std::io::Error),
    #[error("no randomness available from the operating system")]
    Random,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::mls::Member;
    use crate::delivery::storage::{Backend as _, DeviceRecord};
    use crate::delivery::{Caller, Delivery, Storage as _};
    use crate::wire::{Request, Response};

    #[test]
    fn postgres_errors_never_show_the_row_values_the_server_quotes() {
        let Some(target) = crate::pg::tests::database() else { return };
        let mut db = crate::pg::PgDb::connect(target).unwrap();
        let key = crate::auth::AccountId([0xab; 32]);
        db.write(|s| s.insert_account(&key, None, 1)).unwrap();
        let e = db.write(|s| s.insert_account(&key, None, 1)).unwrap_err().to_string();
        assert!(e.contains("duplicate key") && e.contains("23505"), "{e}");
        assert!(!e.contains("abab") && !e.contains("DETAIL"), "{e}");
    }

    #[test]
    fn retention_deletes_the_oldest_messages_of_each_group_and_nothing_younger() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("t.db")).unwrap();
        let removal_key = crate::auth::Identity::generate().unwrap().public_key();
        let mut ds = Delivery::new(100, removal_key);
        let (_, _, mut alice) = Member::generate().unwrap();
        let caller = Caller::of(alice.certificate());
        let mut run = |db: &mut Db, request: Request, now: u64| {
            let out = db.write(|s| Ok(ds.handle(s, caller, request, now))).unwrap();
            assert!(!matches!(out.response, Response::Error { .. }), "{:?}", out.response);
        };
        let cert = alice.certificate().clone();
        db.write(|s| {
            s.insert_account(&cert.account, None, 1)?;
            let record = DeviceRecord::new(cert.account, cert.encode(), 1);
            s.insert_device(&cert.device, &record)
        })
        .unwrap();
        let g = alice.create_group(&removal_key).unwrap();
        run(&mut db, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }, 1_000);
        // Ten messages at t = 1000..1009, then one stamped earlier (a clock
        // that stepped back): retention removes a prefix, never a hole.
        for t in (1_000..1_010).chain([1_001]) {
            let m = alice.encrypt(&g.id, b"x").unwrap();
            run(&mut db, Request::Send { message: m, welcome: None, group_info: None }, t);
        }
        let deleted = ds.expire(&mut SqlStore::new(&db.conn), 1_105).unwrap();
        assert_eq!(deleted, 5, "messages stamped 1000..=1004 are older than 100 s");
        let mut store = SqlStore::new(&db.conn);
        let (kept, _) = store.fetch(&g.id, 0, None, 100, usize::MAX).unwrap();
        assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (6..=11).collect::<Vec<_>>());
        assert_eq!(store.log_len(&g.id).unwrap(), 6);
        assert_eq!(ds.expire(&mut SqlStore::new(&db.conn), 2_000).unwrap(), 6);
        assert_eq!(SqlStore::new(&db.conn).log_len(&g.id).unwrap(), 0);
    }
}

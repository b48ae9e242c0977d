//! An open SQLite database: the [`Backend`] the engine runs on; and the
//! operator's short commands (invites, accounts) on any backend.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{schema, SqlStore, StoreError};
use crate::auth::InviteToken;
use crate::delivery::storage::{AccountRecord, Backend, InviteRecord, Storage as _};

/// An open hush database.
#[derive(Debug)]
pub struct Db {
    pub(crate) conn: Connection,
}

impl Db {
    /// Opens or creates the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn: Connection = crate::sqlite::open::<StoreError>(path)?;
        schema::migrate(&mut conn)?;
        Ok(Self { conn })
    }
}

/// The operator's short commands (`hushd invite`, `invites`, `accounts`),
/// on any database.
pub trait Admin: Backend<Error = StoreError> {
    /// Creates an invite good for `uses` registrations until `expires_at`.
    fn create_invite(&mut self, uses: u32, expires_at: Option<u64>, now: u64) -> Result<InviteToken, StoreError> {
        let token = InviteToken::generate().map_err(|_| StoreError::Random)?;
        let record = InviteRecord::new(&token, uses, expires_at, now);
        self.write(|s| s.insert_invite(&record))?;
        Ok(token)
    }

    /// All invites, newest first.
    fn invites(&mut self) -> Result<Vec<InviteRecord>, StoreError> {
        self.read(|s| s.invites())?
    }

    /// All accounts, oldest first.
    fn accounts(&mut self) -> Result<Vec<AccountRecord>, StoreError> {
        self.read(|s| s.accounts())?
    }
}

impl<B: Backend<Error = StoreError>> Admin for B {}

impl Backend for Db {
    type Error = StoreError;
    type Unit<'a> = SqlStore<'a>;

    fn write<T>(&mut self, work: impl FnOnce(&mut SqlStore<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = work(&mut SqlStore::new(&tx))?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(&mut self, work: impl FnOnce(&mut SqlStore<'_>) -> T) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let out = work(&mut SqlStore::new(&tx));
        tx.finish()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_are_stored_hashed_and_listed_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("t.db")).unwrap();
        let first = db.create_invite(1, Some(100), 10).unwrap();
        let second = db.create_invite(5, None, 20).unwrap();
        let listed = db.invites().unwrap();
        assert_eq!(listed.iter().map(|i| i.id).collect::<Vec<_>>(), vec![second.id(), first.id()]);
        assert_eq!((listed[1].uses_total, listed[1].uses_left, listed[1].expires_at), (1, 1, Some(100)));
        assert!(first.matches(&listed[1].secret_hash));
        assert!(!second.matches(&listed[1].secret_hash));
        // The last use can be spent once.
        assert!(db.write(|s| s.spend_invite(&first.id())).unwrap());
        assert!(!db.write(|s| s.spend_invite(&first.id())).unwrap());
        assert_eq!(db.invites().unwrap()[1].uses_left, 0);
    }

    #[test]
    fn refuses_a_database_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(Db::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(Db::open(&path), Err(StoreError::SchemaTooNew { found: 99, .. })));
    }
}

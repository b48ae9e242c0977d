//! An open SQLite database: the [`Backend`] the engine runs on.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{schema, SqlStore};
use crate::db::StoreError;
use crate::delivery::storage::Backend;

/// How long a checkpoint on the writer waits for readers.
const CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// An open hush database.
#[derive(Debug)]
pub struct Db {
    pub(crate) conn: Connection,
    /// Whether appends extend each group's chain (always, but for the
    /// benchmark's baseline: [`Db::open_unchained`]).
    chained: bool,
}

impl Db {
    /// Opens or creates the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn: Connection = crate::sqlite::open::<StoreError>(path)?;
        schema::migrate(&mut conn)?;
        Ok(Self { conn, chained: true })
    }

    /// [`Db::open`], for a store that keeps no chain (appends store no
    /// head, as before verifiable delivery): only the benchmark's baseline
    /// for what the chain costs. Clients of such a server see no heads.
    pub fn open_unchained(path: &Path) -> Result<Self, StoreError> {
        Ok(Self { chained: false, ..Self::open(path)? })
    }
}

impl Backend for Db {
    type Error = StoreError;
    type Unit<'a> = SqlStore<'a>;

    fn write<T>(&mut self, work: impl FnOnce(&mut SqlStore<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = work(&mut SqlStore::new(&tx).chained(self.chained))?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(&mut self, work: impl FnOnce(&mut SqlStore<'_>) -> T) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let out = work(&mut SqlStore::new(&tx));
        tx.finish()?;
        Ok(out)
    }

    /// `PRAGMA wal_checkpoint(TRUNCATE)`: every page of the WAL into the
    /// database file (where `secure_delete` zeroed what was deleted), then
    /// the WAL cut to zero bytes, so no old page image holding deleted
    /// bytes stays in it.
    /// It runs on the writer, so it waits at most [`CHECKPOINT_WAIT`] for
    /// readers to finish (writes wait meanwhile) and otherwise says it did
    /// not complete: the sweep tries again.
    fn checkpoint(&mut self) -> Result<bool, StoreError> {
        self.conn.busy_timeout(CHECKPOINT_WAIT)?;
        let result = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?)));
        self.conn.busy_timeout(crate::sqlite::BUSY_TIMEOUT)?;
        let (busy, log): (i64, i64) = result?;
        Ok(busy == 0 && log <= 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Admin as _;
    use crate::delivery::storage::Storage as _;

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

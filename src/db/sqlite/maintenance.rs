//! Operator maintenance: `hushd check` and `hushd backup`.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::{schema, BUSY_TIMEOUT};
use crate::db::{DbReport, StoreError};

fn count(conn: &Connection, table: &str) -> Result<u64, StoreError> {
    // Table names come from the fixed list below, never from input.
    let n = conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Checks the database read-only (it may be in use by a running server).
pub fn check(path: &Path) -> Result<DbReport, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let integrity = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let bytes: i64 =
        conn.query_row("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()", [], |r| r.get(0))?;
    Ok(DbReport {
        integrity,
        schema_version,
        latest_schema: schema::latest(),
        accounts: count(&conn, "accounts")?,
        groups: count(&conn, "groups")?,
        messages: count(&conn, "log")?,
        bytes: u64::try_from(bytes).unwrap_or(0),
    })
}

/// Copies the database to `dest` with SQLite's online backup: a consistent
/// snapshot, taken while the server keeps serving (it copies in steps and
/// restarts a step if the server wrote meanwhile). `dest` must not exist;
/// it is created 0600. `progress(done, total)` is called after each step.
pub fn backup(path: &Path, dest: &Path, mut progress: impl FnMut(u64, u64)) -> Result<u64, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest).map_err(StoreError::Io)?;
    let src = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    src.busy_timeout(BUSY_TIMEOUT)?;
    let mut dst = Connection::open(dest)?;
    let pages = {
        let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
        loop {
            let step = b.step(256)?;
            let p = b.progress();
            let total = u64::try_from(p.pagecount).unwrap_or(0);
            let done = total.saturating_sub(u64::try_from(p.remaining).unwrap_or(0));
            progress(done, total);
            match step {
                rusqlite::backup::StepResult::Done => break total,
                rusqlite::backup::StepResult::More => {}
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    };
    dst.pragma_update(None, "journal_mode", "DELETE")?;
    drop(dst);
    Ok(pages)
}

/// Moves the write-ahead log into the database file (waiting for readers
/// to finish) and returns the file's size: what the data occupies, for
/// measurements.
pub fn checkpointed_size(path: &Path) -> Result<u64, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    let bytes: i64 =
        conn.query_row("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()", [], |r| r.get(0))?;
    Ok(u64::try_from(bytes).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::storage::{Backend as _, Storage as _};

    #[test]
    fn check_and_backup_a_database_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hush.db");
        let mut db = super::super::Db::open(&path).unwrap();
        let account = crate::auth::Identity::generate().unwrap();
        db.write(|s| s.insert_account(&account.account_id(), None, 5)).unwrap();
        let report = check(&path).unwrap();
        assert!(report.healthy(), "{report:?}");
        assert_eq!(report.accounts, 1);
        let dest = dir.path().join("backup.db");
        let pages = backup(&path, &dest, |_, _| {}).unwrap();
        assert!(pages > 0);
        let copy = check(&dest).unwrap();
        assert!(copy.healthy());
        assert_eq!(copy.accounts, 1);
        // Never overwrites.
        assert!(backup(&path, &dest, |_, _| {}).is_err());
    }
}

//! The one way hush opens SQLite (the server's database and each client's
//! state) and migrates a schema.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, Transaction};

/// How long a write waits for another connection or process holding the
/// database lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) a database file that only this user can read:
/// it is created 0600 and SQLite gives the `-wal` and `-shm` files the same
/// mode. WAL, `synchronous=FULL` (a write that returned is on disk),
/// foreign keys on, and `secure_delete` (deleted rows, such as used keys,
/// are overwritten rather than left in free pages).
pub fn open<E: From<rusqlite::Error> + From<std::io::Error>>(path: &Path) -> Result<Connection, E> {
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(_) => {}
            // Another process created it first: open theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

/// Brings a database from its `PRAGMA user_version` to `target`, where
/// `migrations[i]` takes version `i` to `i + 1`. Each step runs in its own
/// transaction with its version bump, so a crash leaves the previous
/// version intact. A database newer than `migrations` is refused with
/// `too_new(found, supported)`; `check(version, tx)` runs before each step
/// and may refuse it.
pub fn migrate<E: From<rusqlite::Error>>(
    conn: &mut Connection,
    migrations: &[&str],
    target: i64,
    too_new: impl Fn(i64, i64) -> E,
    check: impl Fn(i64, &Transaction<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let latest = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > latest {
            return Err(too_new(version, latest));
        }
        if version >= target {
            return Ok(());
        }
        check(version, &tx)?;
        let Some(sql) = usize::try_from(version).ok().and_then(|v| migrations.get(v)) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

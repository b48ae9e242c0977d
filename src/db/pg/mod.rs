//! Persistence on PostgreSQL: several `hushd` nodes on one database.
//!
//! The same [`Storage`](crate::delivery::Storage) and
//! [`Backend`](crate::delivery::storage::Backend) as the embedded SQLite
//! store ([`crate::db::sqlite`]), so the engine and the Delivery Service core are
//! unchanged. What differs is what several writers on one database need:
//!
//! * **Order comes from the database.** A write unit is one `READ
//!   COMMITTED` transaction; every read of a group's row that a decision
//!   depends on (its epoch for first-commit-wins, its last sequence for
//!   the next one) takes the row's lock (`FOR UPDATE`) and holds it to the
//!   commit. A commit racing on another node waits, then reads the new
//!   epoch and is refused as stale; a sequence number is the group row's
//!   counter bumped in the statement that inserts the message.
//! * **Conflicts are retried, not reported.** Two nodes' batches can lock
//!   two groups in opposite orders (PostgreSQL then aborts one statement
//!   with a deadlock), or insert the same key at once. The unit records
//!   such a conflict ([`Unit::take_conflict`]), the engine rolls that
//!   request's savepoint back and runs the request again, which then sees
//!   the other node's committed rows.
//! * **Pushes cross nodes.** A committing unit stores one row per
//!   notification in `notices` (group and sequence, or a device key; never
//!   message bytes) and sends a `NOTIFY` naming only the row, in its
//!   transaction, so it is delivered only if the commit is; every node
//!   LISTENs ([`listen`]), reads the rows and pushes to its own
//!   connections from the log. A wake-up is trusted for nothing: any role
//!   that can connect can send one.
//!
//! Connections: a Unix socket (`host=/run/postgresql`) needs no TLS; a TCP
//! host is reached over TLS (rustls, ring provider) verified against the
//! system's CA bundle or `sslrootcert=FILE`, unless the URL says
//! `sslmode=disable`.
//!
//! [`Unit::take_conflict`]: crate::delivery::storage::Unit::take_conflict

pub mod cluster;
mod connect;
pub mod listen;
mod schema;
mod store;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use postgres::{IsolationLevel, Statement};

pub use crate::db::TargetError;
pub use connect::Target;
pub use listen::{wake_up, wake_up_text, Notice, WakeKey, CHANNEL};
pub use schema::latest as latest_schema;
pub use store::PgStore;

use crate::db::DbReport;
use crate::db::StoreError;
use crate::delivery::storage::Backend;

/// SQLSTATE codes of a conflict with another transaction, after which the
/// request is run again: deadlock, serialization failure, unique key taken.
const CONFLICTS: &[&str] = &["40P01", "40001", "23505"];

/// Whether `e` is a conflict with a concurrent transaction.
fn is_conflict(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| CONFLICTS.contains(&c.code()))
}

/// Runs `work` where the blocking client may run: the `postgres` crate
/// drives its connection with its own runtime, which cannot start on a
/// thread that is already inside one (as `hushd serve` is while binding).
pub(crate) fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    std::thread::scope(|s| s.spawn(work).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
}

/// An open connection to a hush database on PostgreSQL: the [`Backend`]
/// the engine runs on, and what the operator's short commands use.
pub struct PgDb {
    target: Arc<Target>,
    client: postgres::Client,
    /// Prepared statements of this connection, by their text.
    statements: HashMap<&'static str, Statement>,
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgDb")
    }
}

impl PgDb {
    /// Connects and brings the schema up to date (several nodes starting
    /// at once migrate one after the other).
    pub fn connect(target: Arc<Target>) -> Result<Self, StoreError> {
        off_runtime(|| {
            let mut client = target.connect_blocking()?;
            schema::migrate(&mut client)?;
            Ok(Self { target, client, statements: HashMap::new() })
        })
    }

    /// Reconnects if the connection was lost (a restarted database, a
    /// network cut): the next unit of work then runs on a new connection.
    fn ensure(&mut self) -> Result<(), StoreError> {
        if self.client.is_closed() {
            tracing::warn!("connection to PostgreSQL lost; reconnecting");
            self.statements.clear();
            self.client = self.target.connect_blocking()?;
        }
        Ok(())
    }

    /// The server's version, and the schema version of the database and
    /// what it holds, for `hushd check`: connects without migrating
    /// anything. Integrity here means every group's log is a dense run of
    /// sequences up to the group's last one, with its bytes counted right.
    pub fn inspect(target: &Target) -> Result<(String, DbReport), StoreError> {
        let mut client = target.connect_blocking()?;
        let row = client.query_one(
            "SELECT (SELECT version FROM hush_schema), (SELECT count(*) FROM accounts), (SELECT count(*) FROM groups),
                    (SELECT count(*) FROM log), pg_database_size(current_database()), current_setting('server_version'),
                    (SELECT count(*) FROM groups g, LATERAL (SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi,
                                                                COALESCE(sum(octet_length(data)), 0) AS bytes
                                                         FROM log WHERE gid = g.gid) l
                     WHERE l.hi > g.last_seq OR l.n <> COALESCE(l.hi - l.lo + 1, 0) OR l.bytes <> g.bytes)",
            &[],
        )?;
        let inconsistent = crate::db::to_u64(row.get(6));
        let integrity = match inconsistent {
            0 => "ok".to_string(),
            n => format!("{n} group(s) with gaps or miscounted bytes in their log"),
        };
        let report = DbReport {
            integrity: vec![integrity],
            schema_version: i64::from(row.get::<_, i32>(0)),
            latest_schema: schema::latest(),
            accounts: crate::db::to_u64(row.get(1)),
            groups: crate::db::to_u64(row.get(2)),
            messages: crate::db::to_u64(row.get(3)),
            bytes: crate::db::to_u64(row.get(4)),
        };
        Ok((row.get(5), report))
    }
}

impl Backend for PgDb {
    type Error = StoreError;
    type Unit<'a> = PgStore<'a>;

    fn write<T>(&mut self, work: impl FnOnce(&mut PgStore<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.ensure()?;
        let tx = self.client.build_transaction().isolation_level(IsolationLevel::ReadCommitted).start()?;
        let mut unit = PgStore::new(tx, &mut self.statements, true, &self.target);
        let out = work(&mut unit)?;
        unit.commit()?;
        Ok(out)
    }

    fn read<T>(&mut self, work: impl FnOnce(&mut PgStore<'_>) -> T) -> Result<T, StoreError> {
        self.ensure()?;
        let tx =
            self.client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
        let mut unit = PgStore::new(tx, &mut self.statements, false, &self.target);
        let out = work(&mut unit);
        unit.commit()?;
        Ok(out)
    }
}

//! Which database a configuration names, and opening it: the one place
//! that decides between SQLite and PostgreSQL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::pg::{PgDb, Target};
use super::sqlite::{maintenance, Db};
use super::{Admin as _, DbReport, StoreError};
use crate::auth::{AccountId, Identity, InviteToken};
use crate::delivery::storage::{AccountRecord, Backend as _, InviteRecord, Stats, Unit as _};
use crate::delivery::{Delivery, Quotas, Removal, RemoveError, Storage as _};

/// Where the database a configuration names lives (its URL parsed once).
#[derive(Debug, Clone)]
pub enum Location {
    /// The embedded SQLite file in the data directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database several nodes may share.
    Postgres(Arc<Target>),
}

impl Location {
    /// The database a configuration names: PostgreSQL at `database_url` if
    /// it has one, else the SQLite file at `sqlite_path`. `wake` is the
    /// wake-up secret of a node (or of an operator's command that writes;
    /// `node.secrets` in the data directory): its wake-ups to the other
    /// nodes are authenticated with it. Without it (a look that writes
    /// nothing) no wake-up is sent or taken.
    pub fn of(database_url: Option<&str>, sqlite_path: &Path, wake: Option<&[u8; 32]>) -> Result<Self, StoreError> {
        Ok(match (database_url, wake) {
            (Some(url), Some(key)) => Self::Postgres(Target::for_node(url, key)?),
            (Some(url), None) => Self::Postgres(Target::parse(url)?),
            (None, _) => Self::Sqlite(sqlite_path.to_owned()),
        })
    }

    /// Creates the database if it is new and migrates it to this build's
    /// schema (`hushd init`, and `hushd serve` before it listens).
    pub fn prepare(&self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(path) => Db::open(path).map(drop),
            // Connected and closed off the async runtime (closing blocks too).
            Self::Postgres(target) => super::pg::off_runtime(|| PgDb::connect(target.clone()).map(drop)),
        }
    }

    /// Opens the database of an initialised data directory for an
    /// operator's command.
    pub fn open_existing(&self) -> Result<Database, StoreError> {
        match self {
            Self::Sqlite(path) if !path.exists() => Err(StoreError::Missing(path.clone())),
            Self::Sqlite(path) => Ok(Database::Sqlite(Db::open(path)?)),
            Self::Postgres(target) => Ok(Database::Postgres(Box::new(PgDb::connect(target.clone())?))),
        }
    }

    /// What `hushd check` reports: the database server (PostgreSQL's
    /// version, or nothing for SQLite) and the report; `None` if the SQLite
    /// file does not exist yet. Read-only.
    pub fn inspect(&self) -> Result<Option<(String, DbReport)>, StoreError> {
        match self {
            Self::Sqlite(path) if !path.exists() => Ok(None),
            Self::Sqlite(path) => Ok(Some((String::new(), maintenance::check(path)?))),
            Self::Postgres(target) => {
                let (version, report) = PgDb::inspect(target)?;
                Ok(Some((format!("PostgreSQL {version}, "), report)))
            }
        }
    }
}

/// An open database, for the operator's commands.
pub enum Database {
    Sqlite(Db),
    Postgres(Box<PgDb>),
}

/// Runs `$body` with `$d` bound to whichever database is open (both are a
/// `Backend`).
macro_rules! on_either {
    ($db:expr, $d:ident => $body:expr) => {
        match $db {
            Database::Sqlite($d) => $body,
            Database::Postgres($d) => $body,
        }
    };
}

/// One of the operator's removals ([`Database::remove`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRemoval {
    /// Offboarding an account: every device refused, removed from every
    /// group.
    Account(AccountId),
    /// Removing an account from one group.
    Membership([u8; 32], AccountId),
}

impl Database {
    /// Creates an invite good for `uses` registrations until `expires_at`.
    pub fn create_invite(&mut self, uses: u32, expires_at: Option<u64>, now: u64) -> Result<InviteToken, StoreError> {
        on_either!(self, d => d.create_invite(uses, expires_at, now))
    }

    /// All invites, newest first.
    pub fn invites(&mut self) -> Result<Vec<InviteRecord>, StoreError> {
        on_either!(self, d => d.invites())
    }

    /// All accounts, oldest first.
    pub fn accounts(&mut self) -> Result<Vec<AccountRecord>, StoreError> {
        on_either!(self, d => d.accounts())
    }

    /// What `hushd stats` prints.
    pub fn stats(&mut self, now: u64) -> Result<Stats, StoreError> {
        on_either!(self, d => d.read(|u| u.stats(now)))?
    }

    /// Blob rows in id order after `after`, at most `limit` (`hushd check`).
    pub fn blobs(
        &mut self,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<crate::delivery::storage::BlobRecord>, StoreError> {
        on_either!(self, d => d.read(|u| u.blobs(after, limit)))?
    }

    /// Runs one of the operator's removals through the Delivery Service
    /// core, signing its removal proposals with the server's `removal` key,
    /// in one unit of work, and announces what it did to the serving nodes
    /// (PostgreSQL; on SQLite the serving process refuses what it removed
    /// from the next request). The outer error is the database's, the inner
    /// the core's refusal.
    pub fn remove(
        &mut self,
        removal: Arc<Identity>,
        what: OperatorRemoval,
        now: u64,
    ) -> Result<Result<Removal, RemoveError>, StoreError> {
        let mut delivery = Delivery::with_quotas(Quotas::default(), removal.public_key()).with_removal_signer(removal);
        let delivery = &mut delivery;
        on_either!(self, d => d.write(|s| {
            let removal = match what {
                OperatorRemoval::Account(account) => delivery.remove_account(s, &account, now),
                OperatorRemoval::Membership(group, account) => delivery.remove_membership(s, &group, &account, now),
            };
            if let Ok(r) = &removal {
                s.announce(&r.notifications)?;
            }
            Ok(removal)
        }))
    }
}

//! Persistence: SQLite (rusqlite, bundled) in WAL mode.
//!
//! [`Db`] is the synchronous database used directly by short-lived commands
//! (`hushd invite`, `hushd accounts`); [`Store`] runs a `Db` on a dedicated
//! thread so the server's async tasks never block on SQLite. Several
//! processes may open the same database: writes take SQLite's write lock
//! (`BEGIN IMMEDIATE`) and wait up to [`BUSY_TIMEOUT`] for it.
//!
//! Durability: `synchronous=FULL`, so a write acknowledged to a client has
//! been fsynced. `foreign_keys=ON`. The schema is versioned with
//! `PRAGMA user_version` and migrated forward in [`schema`].
//!
//! The store holds only public keys, hashed invite secrets and (later)
//! ciphertext. It never holds the server's private key.

mod db;
mod schema;

pub use db::{AccountRow, Db, InviteRow, RegisterError, Registered};

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::oneshot;

/// How long a write waits for another process holding the database lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "hush.db";

/// Storage failures. None of them is the client's fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database schema version {found} is newer than this hushd supports ({supported}); upgrade hushd")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the database thread has stopped")]
    Closed,
    #[error("could not start the database thread: {0}")]
    Thread(std::io::Error),
}

type Job = Box<dyn FnOnce(&mut Db) + Send>;

/// Async handle to a [`Db`] owned by a dedicated thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
}

impl Store {
    /// Opens (creating and migrating if needed) the database at `path` and
    /// starts its thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Db::open(path)?;
        Self::spawn(db)
    }

    fn spawn(mut db: Db) -> Result<Self, StoreError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hush-store".into())
            .spawn(move || {
                // Ends when every `Store` handle is dropped; `db` closes here.
                while let Ok(job) = rx.recv() {
                    job(&mut db);
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the database thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let _ = tx.send(f(db));
        });
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }
}

//! The engine: the Delivery Service core on the database, off the async
//! runtime.
//!
//! [`Engine`] is a cheap async handle to two threads, each with its own
//! SQLite connection ([`crate::store::Db`]) and its own
//! [`crate::delivery::Delivery`]: a writer that batches requests into one
//! transaction (group commit, a savepoint per request) and a reader that
//! serves requests that only read from a WAL snapshot. The storage layer
//! knows no protocol frames; this is where requests meet it.

use std::path::Path;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::delivery::{Caller, Delivery, Outcome, Quotas};
use crate::limits::MAX_WRITE_BATCH;
use crate::store::{Db, SqlStore, StoreError};
use crate::wire::{ErrorCode, Request, Response};

/// Arbitrary work with the database and the Delivery Service core.
type Work = Box<dyn FnOnce(&mut Db, &mut Delivery) + Send>;

/// Work for a database thread.
enum Job {
    Call(Work),
    /// One Delivery Service request.
    Deliver {
        caller: Caller,
        request: Request,
        now: u64,
        reply: oneshot::Sender<Outcome>,
    },
}

/// Async handle to the database threads. Cheap to clone.
///
/// * The **writer** thread owns the only connection that writes, and the
///   Delivery Service core (with its rate-limit state). It takes every job
///   waiting in its queue (up to [`MAX_WRITE_BATCH`]), runs the delivery
///   requests among them in one `BEGIN IMMEDIATE` transaction, each inside
///   its own savepoint (a refused or failed request rolls back alone), and
///   commits once: with `synchronous=FULL` that is one fsync for the whole
///   batch (group commit). Replies are sent only after the commit, so a
///   request is acknowledged only once it is durable; if the commit fails,
///   every request in the batch gets an internal error and nothing of it
///   happened.
/// * The **reader** thread has its own connection and serves requests that
///   only read (fetches, counts, lists) from a consistent WAL snapshot; they
///   never wait for the writer.
#[derive(Clone, Debug)]
pub struct Engine {
    writer: mpsc::Sender<Job>,
    reader: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Call(_) => f.write_str("Job::Call"),
            Job::Deliver { request, .. } => write!(f, "Job::Deliver({})", request.kind()),
        }
    }
}

impl Engine {
    /// Opens (creating and migrating if needed) the database at `path` and
    /// starts its threads; the Delivery Service enforces `quotas` and
    /// requires every group to list `removal_key` as an external sender.
    pub fn open(path: &Path, quotas: Quotas, removal_key: [u8; 32]) -> Result<Self, StoreError> {
        let writer_db = Db::open(path)?;
        let reader_db = Db::open(path)?;
        let writer = spawn("hush-writer", writer_db, Delivery::with_quotas(quotas, removal_key), writer_loop)?;
        let reader = spawn("hush-reader", reader_db, Delivery::with_quotas(quotas, removal_key), reader_loop)?;
        Ok(Self { writer, reader })
    }

    /// Runs `f` on the writer thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> T + Send + 'static,
    {
        self.call_with_delivery(move |db, _| f(db)).await
    }

    /// Runs `f` on the writer thread with the Delivery Service core.
    pub async fn call_with_delivery<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db, &mut Delivery) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Job::Call(Box::new(move |db, delivery| {
            let _ = tx.send(f(db, delivery));
        }));
        self.writer.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Runs a read-only `f` on the reader thread (never waits for writes).
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Job::Call(Box::new(move |db, _| {
            let _ = tx.send(f(db));
        }));
        self.reader.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Runs a Delivery Service request: reads on the reader, writes on the
    /// writer (batched). Returns once the outcome is durable.
    pub async fn deliver(&self, caller: Caller, request: Request, now: u64) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let queue = if Delivery::writes(&request) { &self.writer } else { &self.reader };
        queue.send(Job::Deliver { caller, request, now, reply }).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Deletes what retention says is too old. Returns rows deleted.
    pub async fn expire(&self, now: u64) -> Result<u64, StoreError> {
        self.call_with_delivery(move |db, delivery| delivery.expire(&mut SqlStore::new(&db.conn), now)).await?
    }
}

fn spawn(
    name: &str,
    db: Db,
    delivery: Delivery,
    run: fn(Db, Delivery, mpsc::Receiver<Job>),
) -> Result<mpsc::Sender<Job>, StoreError> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new().name(name.into()).spawn(move || run(db, delivery, rx)).map_err(StoreError::Thread)?;
    Ok(tx)
}

/// The writer: group commit over batches of waiting jobs. Ends when every
/// `Engine` handle is dropped.
fn writer_loop(mut db: Db, mut delivery: Delivery, rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        for job in jobs {
            match job {
                Job::Deliver { caller, request, now, reply } => batch.push((caller, request, now, reply)),
                Job::Call(f) => {
                    commit_batch(&mut db, &mut delivery, &mut batch);
                    f(&mut db, &mut delivery);
                }
            }
        }
        commit_batch(&mut db, &mut delivery, &mut batch);
    }
}

type Pending = (Caller, Request, u64, oneshot::Sender<Outcome>);

fn commit_batch(db: &mut Db, delivery: &mut Delivery, batch: &mut Vec<Pending>) {
    if batch.is_empty() {
        return;
    }
    let jobs: Vec<Pending> = std::mem::take(batch);
    let mut replies = Vec::with_capacity(jobs.len());
    let result = (|| -> Result<Vec<Outcome>, rusqlite::Error> {
        let tx = db.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        {
            let mut store = SqlStore::new(&tx);
            let mut savepoint = tx.prepare_cached("SAVEPOINT request")?;
            let mut release = tx.prepare_cached("RELEASE request")?;
            let mut rollback = tx.prepare_cached("ROLLBACK TO request")?;
            for (caller, request, now, reply) in jobs {
                savepoint.execute([])?;
                let outcome = delivery.handle(&mut store, caller, request, now);
                if !outcome.wrote {
                    rollback.execute([])?;
                }
                release.execute([])?;
                outcomes.push(outcome);
                replies.push(reply);
            }
        }
        tx.commit()?;
        Ok(outcomes)
    })();
    if result.is_err() {
        delivery.forget_cached();
    }
    match result {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            tracing::error!("write batch failed, nothing of it was stored: {e}");
            // Requests that never ran have dropped their reply sender; the
            // caller sees `Closed` and reports an internal error.
            for reply in replies {
                let _ = reply.send(Outcome {
                    response: Response::error(ErrorCode::Internal, "storage failure; nothing was changed"),
                    notifications: vec![],
                    wrote: false,
                });
            }
        }
    }
}

/// The reader: each request in its own read transaction (a WAL snapshot).
fn reader_loop(mut db: Db, mut delivery: Delivery, rx: mpsc::Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        match job {
            Job::Deliver { caller, request, now, reply } => {
                let outcome = match db.conn.transaction() {
                    Ok(tx) => {
                        let o = delivery.handle(&mut SqlStore::new(&tx), caller, request, now);
                        let _ = tx.finish();
                        o
                    }
                    Err(e) => {
                        tracing::error!("read transaction failed: {e}");
                        Outcome {
                            response: Response::error(ErrorCode::Internal, "storage failure"),
                            notifications: vec![],
                            wrote: false,
                        }
                    }
                };
                let _ = reply.send(outcome);
            }
            Job::Call(f) => f(&mut db, &mut delivery),
        }
    }
}

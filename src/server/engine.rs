//! The engine: the Delivery Service core on the database, off the async
//! runtime.
//!
//! [`Engine`] is a cheap async handle to two threads, each with its own
//! database connection (a [`Backend`]) and its own
//! [`crate::delivery::Delivery`]: a writer that batches requests into one
//! transaction (group commit, a savepoint per request) and a reader that
//! serves requests that only read from a consistent snapshot. The storage
//! layer knows no protocol frames; this is where requests meet it, and it
//! knows no SQL: any [`Backend`] runs here.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::auth::DeviceId;
use crate::db::sqlite::Db;
use crate::db::StoreError;
use crate::delivery::storage::{Backend, DeviceRecord, Unit};
use crate::delivery::Notification;
use crate::delivery::{Caller, Delivery, NoVerdict, Origin, Outcome, Prepared, Quotas, ServerKeys, Snapshot, Storage};
use crate::limits::{
    COMMIT_DELAY_BACKOFF, COMMIT_SIBLINGS, MAX_COMMIT_DELAY, MAX_CONFLICT_RETRIES, MAX_SENT_BACK, MAX_VERIFY_WAIT,
    MAX_WRITE_BATCH,
};
use crate::wire::Request;

/// One Delivery Service request, and where its outcome goes.
struct Pending {
    origin: Origin,
    request: Request,
    now: u64,
    reply: oneshot::Sender<Outcome>,
    /// A `Send`'s message digest, computed by the session before the
    /// writer (which extends the group's chain with it).
    digest: Option<crate::chain::MessageDigest>,
    /// A handshake's verdict, verified off the writer.
    prepared: Option<Box<Prepared>>,
    /// What the writer does with a handshake without a verdict that holds.
    no_verdict: NoVerdict,
}

/// Work for the writer thread.
enum Write {
    Deliver(Pending),
    /// Apply retention.
    Expire {
        now: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Work outside the request batches (each in its own transaction).
    Chore(Chore),
}

/// Writes the server makes for itself, not for a request.
enum Chore {
    /// An upload is durable up to `received`.
    BlobReceived { id: [u8; 16], received: u64, reply: oneshot::Sender<Result<(), StoreError>> },
    /// An upload is complete with this hash.
    BlobComplete { id: [u8; 16], hash: [u8; 32], now: u64, reply: oneshot::Sender<Result<(), StoreError>> },
    /// Delete the rows of expired blobs; their ids come back.
    ExpireBlobs { now: u64, reply: oneshot::Sender<Result<Vec<[u8; 16]>, StoreError>> },
    /// Delete the bytes of messages whose timer ran out (bounded).
    ExpireMessages { now: u64, reply: oneshot::Sender<Result<u64, StoreError>> },
    /// Delete the rows of blobs whose timer ran out; their ids come back.
    ExpireTimedBlobs { now: u64, reply: oneshot::Sender<Result<Vec<[u8; 16]>, StoreError>> },
    /// Empty the database's write-ahead log into its file, if `always` or
    /// any group has a timer (expired messages may have passed through it,
    /// however they were deleted: by the sweep, by acknowledgements, by
    /// retention).
    Checkpoint { always: bool, reply: oneshot::Sender<Result<bool, StoreError>> },
}

/// Work for the reader thread.
enum Read {
    Deliver(Pending),
    /// Look up a device.
    Device {
        device: DeviceId,
        reply: oneshot::Sender<Result<Option<DeviceRecord>, StoreError>>,
    },
    /// Counts for the operator.
    Stats {
        now: u64,
        reply: oneshot::Sender<Result<crate::delivery::storage::Stats, StoreError>>,
    },
    /// Blob rows, for `hushd check`.
    Blobs {
        after: Option<[u8; 16]>,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<crate::delivery::storage::BlobRecord>, StoreError>>,
    },
    /// The state of a handshake's group, to verify the handshake `caller`
    /// sent off the writer ([`Delivery::snapshot`]).
    Snapshot {
        caller: Caller,
        handshake: crate::mls::HandshakeHeader,
        reply: oneshot::Sender<Result<Option<Snapshot>, StoreError>>,
    },
    /// Another node stored a message: read it and who may see it.
    Stored {
        group: Vec<u8>,
        seq: u64,
        reply: oneshot::Sender<Result<Option<Notification>, StoreError>>,
    },
}

/// Async handle to the database threads. Cheap to clone.
///
/// * The **writer** thread owns the only connection that writes, and the
///   Delivery Service core (with its rate-limit state and roster cache). It
///   takes every job waiting in its queue (up to [`MAX_WRITE_BATCH`]), runs
///   the delivery requests among them in one write transaction, each inside
///   its own savepoint (a refused or failed request rolls back alone), and
///   commits once: on SQLite with `synchronous=FULL` that is one fsync for
///   the whole batch (group commit). Replies are sent only after the
///   commit, so a request is acknowledged only once it is durable; if the
///   commit fails, every request in the batch gets an internal error and
///   nothing of it happened.
/// * The **reader** thread has its own connection and serves requests that
///   only read (fetches, counts, lists) from a consistent snapshot; they
///   never wait for the writer.
///
/// Handshakes (commits and proposals) are verified before they reach the
/// writer, on verifier threads (one per core), against a snapshot of their group the reader takes
/// ([`Engine::prepare`]): the writer then only checks that the group's
/// state is still that snapshot and applies, so a large group's commit
/// (tens of milliseconds of CPU at 1000 members) does not hold up every
/// other group's sends.
#[derive(Clone, Debug)]
pub struct Engine {
    writer: mpsc::Sender<Write>,
    reader: mpsc::Sender<Read>,
    /// What verifies handshakes off the writer.
    verifier: Verifier,
    /// What became of the verdicts.
    counts: Arc<HandshakeCounts>,
}

/// What became of the handshake verdicts prepared off the writer.
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    /// Applied from their verdict.
    pub prepared: std::sync::atomic::AtomicU64,
    /// Not used: the group changed since the snapshot (the writer verified
    /// the handshake again, refused it as stale before verifying, or
    /// refused it as sent back too often).
    pub verified_again: std::sync::atomic::AtomicU64,
    /// Handshakes that reached the writer without a verdict that held and
    /// went back to be verified off the writer again.
    pub sent_back: std::sync::atomic::AtomicU64,
}

/// How handshakes are verified off the writer: by one thread per core (at
/// most [`crate::limits::MAX_VERIFIERS`]), taking jobs in turn.
#[derive(Clone, Debug)]
struct Verifier {
    jobs: mpsc::Sender<Verify>,
    /// Handshakes each account has waiting for or in verification.
    in_flight: Arc<InFlight>,
}

/// Handshakes per account waiting for a verifier or in verification,
/// at most [`crate::limits::MAX_HANDSHAKES_IN_VERIFICATION`] each: one
/// account flooding commits fills the verifiers' queue with its own work
/// only up to that, not every other group's commits' wait.
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<std::collections::HashMap<crate::auth::AccountId, usize>>);

impl InFlight {
    /// Counts one more for `account`, unless it has the most it may.
    fn enter(self: &Arc<Self>, account: crate::auth::AccountId) -> Option<InFlightGuard> {
        let mut counts = self.0.lock().ok()?;
        let count = counts.entry(account).or_insert(0);
        if *count >= crate::limits::MAX_HANDSHAKES_IN_VERIFICATION {
            return None;
        }
        *count += 1;
        Some(InFlightGuard { of: self.clone(), account })
    }
}

/// One handshake counted in [`InFlight`] until dropped.
struct InFlightGuard {
    of: Arc<InFlight>,
    account: crate::auth::AccountId,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.of.0.lock() {
            if let Some(count) = counts.get_mut(&self.account) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&self.account);
                }
            }
        }
    }
}

/// A handshake to verify, and where it goes back with its verdict.
struct Verify {
    caller: Caller,
    request: Request,
    /// When it was queued: a job that waited longer than
    /// [`MAX_VERIFY_WAIT`] for a verifier is answered "busy" unverified.
    queued: Instant,
    reply: oneshot::Sender<Verified>,
}

/// What a verifier gives back: the request with its verdict (`None` if
/// it made none: no snapshot of the handshake's epoch, or the verification
/// panicked), or [`Verified::Late`] for a job that waited too long for a
/// verifier.
enum Verified {
    Done(Request, Option<Box<Prepared>>),
    Late,
}

/// A request ready for the writer: its verdict if a verifier made one, and
/// whether it went through a verifier at all (then the writer never
/// verifies it itself).
struct Ready {
    request: Request,
    prepared: Option<Box<Prepared>>,
    offloaded: bool,
}

impl Ready {
    /// A request no verifier saw: the writer verifies its handshake, if
    /// it has one.
    fn unverified(request: Request) -> Self {
        Self { request, prepared: None, offloaded: false }
    }
}

impl Verifier {
    /// Starts the verifier threads: each reads snapshots through `reader`
    /// and verifies with the core's rules (`quotas`, `removal_key`).
    fn start(reader: &mpsc::Sender<Read>, quotas: Quotas, removal_key: [u8; 32]) -> Result<Self, StoreError> {
        let (jobs, rx) = mpsc::channel::<Verify>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        for n in 0..verifier_threads(cores) {
            let (rx, reader) = (rx.clone(), reader.clone());
            std::thread::Builder::new()
                .name(format!("hush-verify-{n}"))
                .spawn(move || {
                    yield_to_sends();
                    let core = Delivery::with_quotas(quotas, removal_key);
                    loop {
                        // One thread waits for the next job at a time.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(Verify { caller, request, queued, reply }) = job else { return };
                        // Its connection went: nobody waits for the verdict.
                        if reply.is_closed() {
                            continue;
                        }
                        // The queue is longer than a client waits: answer
                        // at once, so that it drains instead of verifying
                        // what nobody will apply in time.
                        if queued.elapsed() > MAX_VERIFY_WAIT {
                            let _ = reply.send(Verified::Late);
                            continue;
                        }
                        // A panic in the verification (openmls) costs this
                        // verdict, not the thread: the handshake goes back
                        // to be verified again, and is refused in the end.
                        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            prepare_blocking(&reader, &core, caller, &request)
                        }))
                        .unwrap_or_else(|_| {
                            tracing::error!("verifying a handshake panicked");
                            None
                        });
                        let _ = reply.send(Verified::Done(request, prepared.map(Box::new)));
                    }
                })
                .map_err(StoreError::Thread)?;
        }
        Ok(Self { jobs, in_flight: Arc::default() })
    }
}

/// How many verifier threads a machine with `cores` cores runs: one core
/// is left to the connections and the writer, which carry every other
/// group's sends. On a machine of two cores (one real core's worth of
/// time, as the benchmark's is) two verifiers made no more commits per
/// second than one, while a large group's commits held up small groups'
/// sends half as long again (`hushd bench --only large-groups`, p99 of
/// 5.0–5.3 ms against 3.2–3.6 ms).
fn verifier_threads(cores: usize) -> usize {
    cores.saturating_sub(1).clamp(1, crate::limits::MAX_VERIFIERS)
}

/// The niceness verifier threads run at: below the connections and the
/// writer, not the lowest there is, so that under a full load of other
/// work verification still gets a tenth of a core's time (weight 110
/// against 1024) rather than starving (red team: at 19, about 1.5%).
const VERIFIER_NICENESS: i32 = 10;

/// Lowers the calling (verifier) thread's scheduling priority to
/// [`VERIFIER_NICENESS`]. A large group's commit costs tens of
/// milliseconds of CPU to verify; on a machine with few cores, verifying
/// at the priority of the connections and the writer would make every
/// other group's sends wait for a time slice behind it. At a lower
/// priority it runs mostly on what they leave. Nothing depends on it: where the
/// system refuses (a seccomp filter), verification runs as before.
fn yield_to_sends() {
    let thread = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(thread), VERIFIER_NICENESS) {
        tracing::debug!("verifying at the default priority: {e}");
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({})", self.request.kind())
    }
}

impl Engine {
    /// Opens (creating and migrating if needed) the SQLite database at
    /// `path` and starts the engine on it.
    pub fn open(path: &Path, quotas: Quotas, keys: ServerKeys) -> Result<Self, StoreError> {
        Self::start(Db::open(path)?, Db::open(path)?, quotas, keys)
    }

    /// Connects to the PostgreSQL database `target` (migrating it if
    /// needed) and starts the engine on it.
    pub fn open_postgres(
        target: &Arc<crate::db::pg::Target>,
        quotas: Quotas,
        keys: ServerKeys,
    ) -> Result<Self, StoreError> {
        use crate::db::pg::PgDb;
        Self::start(PgDb::connect(target.clone())?, PgDb::connect(target.clone())?, quotas, keys)
    }

    /// Starts the writer and reader threads on two connections to one
    /// database; the Delivery Service enforces `quotas`, requires every
    /// group to list the removal key as an external sender, and signs its
    /// removal proposals with it (on the writer) and chain heads with the
    /// server's own key (on the reader).
    pub fn start<B: Backend<Error = StoreError>>(
        writer: B,
        reader: B,
        quotas: Quotas,
        keys: ServerKeys,
    ) -> Result<Self, StoreError> {
        let key = keys.removal.public_key();
        let writing = Delivery::with_quotas(quotas, key).with_removal_signer(keys.removal);
        let counts = Arc::new(HandshakeCounts::default());
        let counting = counts.clone();
        let writer = spawn("hush-writer", move |rx| writer_loop(writer, writing, rx, &counting))?;
        let reading = Delivery::with_quotas(quotas, key).with_head_signer(keys.current);
        let reader = spawn("hush-reader", move |rx| reader_loop(reader, reading, rx))?;
        let verifier = Verifier::start(&reader, quotas, key)?;
        Ok(Self { writer, reader, verifier, counts })
    }

    /// What became of the handshakes verified off the writer so far.
    pub fn handshake_counts(&self) -> &HandshakeCounts {
        &self.counts
    }

    /// Verifies a device's handshake (a `Send` of a commit or proposal,
    /// told apart by its wire format) against a snapshot of its group, off
    /// the writer; gives the request back with the verdict. Anything else,
    /// or a handshake the writer would refuse before verifying it (see
    /// [`Delivery::snapshot`]), comes back without one. The outcome to
    /// answer instead if the account has too many handshakes in
    /// verification, or the verifying thread stopped (the request went
    /// with it).
    async fn prepare(&self, origin: Origin, request: Request) -> Result<Ready, Outcome> {
        let Origin::Device(caller) = origin else { return Ok(Ready::unverified(request)) };
        let Request::Send { message, .. } = &request else { return Ok(Ready::unverified(request)) };
        if !crate::mls::is_public_message(message) {
            return Ok(Ready::unverified(request));
        }
        let Some(_counted) = self.verifier.in_flight.enter(caller.account) else {
            let wait = crate::limits::HANDSHAKE_RETRY;
            return Err(Outcome::reply(crate::wire::Response::Error {
                code: crate::wire::ErrorCode::RateLimited,
                detail: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                message: format!(
                    "this account has {} commits or proposals being verified; retry in {} s",
                    crate::limits::MAX_HANDSHAKES_IN_VERIFICATION,
                    wait.as_secs()
                ),
            }));
        };
        let (reply, rx) = oneshot::channel();
        let job = Verify { caller, request, queued: Instant::now(), reply };
        if let Err(mpsc::SendError(job)) = self.verifier.jobs.send(job) {
            return Ok(Ready::unverified(job.request));
        }
        match rx.await {
            Ok(Verified::Done(request, prepared)) => Ok(Ready { request, prepared, offloaded: true }),
            Ok(Verified::Late) => {
                super::metrics::metrics().refused("verify-queue");
                Err(verify_busy())
            }
            Err(_) => {
                tracing::error!("a verifier thread stopped");
                Err(Outcome::internal())
            }
        }
    }

    /// Runs a Delivery Service request: reads on the reader, writes on the
    /// writer (batched). Returns once the outcome is durable.
    ///
    /// A handshake without a verdict that still holds when the writer
    /// reaches it comes back ([`Outcome::again`]) and is verified off the
    /// writer again, up to [`MAX_SENT_BACK`] times; after that it is
    /// refused (`RateLimited`).
    pub async fn deliver(&self, origin: impl Into<Origin>, request: Request, now: u64) -> Result<Outcome, StoreError> {
        let origin = origin.into();
        match self.prepare(origin, request).await {
            Ok(ready) => self.settle(origin, ready, now).await,
            Err(refused) => Ok(refused),
        }
    }

    /// [`Engine::deliver`] once the request is prepared: submits it, and
    /// prepares and submits again what comes back. A handshake that went
    /// through a verifier is never verified on the writer: without a
    /// verdict that holds there it comes back, and after
    /// [`MAX_SENT_BACK`] times it is refused (`RateLimited`).
    async fn settle(&self, origin: Origin, mut ready: Ready, now: u64) -> Result<Outcome, StoreError> {
        let mut sent_back = 0;
        loop {
            let no_verdict = match (ready.offloaded, sent_back < MAX_SENT_BACK) {
                (false, _) => NoVerdict::Verify,
                (true, true) => NoVerdict::GiveBack,
                (true, false) => NoVerdict::Refuse,
            };
            let mut outcome = self.submit(origin, ready.request, now, ready.prepared, no_verdict).await?;
            let Some(again) = outcome.again.take() else { return Ok(outcome) };
            sent_back += 1;
            ready = match self.prepare(origin, *again).await {
                Ok(ready) => ready,
                Err(refused) => return Ok(refused),
            };
        }
    }

    /// Queues a request (and its verdict, if any) for the writer or the
    /// reader and waits for its outcome.
    async fn submit(
        &self,
        origin: Origin,
        request: Request,
        now: u64,
        prepared: Option<Box<Prepared>>,
        no_verdict: NoVerdict,
    ) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let writes = request.writes();
        let digest = match &request {
            Request::Send { message, .. } => Some(crate::chain::MessageDigest::of(message)),
            _ => None,
        };
        let pending = Pending { origin, request, now, reply, digest, prepared, no_verdict };
        let m = super::metrics::metrics();
        m.queued(writes, 1);
        let sent = if writes {
            self.writer.send(Write::Deliver(pending)).is_ok()
        } else {
            self.reader.send(Read::Deliver(pending)).is_ok()
        };
        if !sent {
            m.queued(writes, -1);
            return Err(StoreError::Closed);
        }
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// The registered device with this key, if any (how a new connection
    /// learns whether its key is a device, and whose).
    pub async fn device(&self, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.reader.send(Read::Device { device, reply }).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The push for a message another node stored in `group` at `seq`,
    /// with the devices that may see it (those that were members when it
    /// was sent); `None` if it is gone.
    pub async fn stored(&self, group: Vec<u8>, seq: u64) -> Result<Option<Notification>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.reader.send(Read::Stored { group, seq, reply }).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// What the database holds, in counts (`hushd stats`, metrics).
    pub async fn stats(&self, now: u64) -> Result<crate::delivery::storage::Stats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.reader.send(Read::Stats { now, reply }).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Deletes what retention says is too old. Returns rows deleted.
    pub async fn expire(&self, now: u64) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(Write::Expire { now, reply }).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn chore<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Chore,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(Write::Chore(make(reply))).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records that upload `id` is durable up to `received` bytes.
    pub async fn blob_received(&self, id: [u8; 16], received: u64) -> Result<(), StoreError> {
        self.chore(|reply| Chore::BlobReceived { id, received, reply }).await
    }

    /// Marks upload `id` complete with `hash`.
    pub async fn blob_complete(&self, id: [u8; 16], hash: [u8; 32], now: u64) -> Result<(), StoreError> {
        self.chore(|reply| Chore::BlobComplete { id, hash, now, reply }).await
    }

    /// Deletes the rows of expired blobs and returns their ids (whose
    /// bytes the caller removes).
    pub async fn expire_blobs(&self, now: u64) -> Result<Vec<[u8; 16]>, StoreError> {
        self.chore(|reply| Chore::ExpireBlobs { now, reply }).await
    }

    /// Deletes the bytes of at most
    /// [`crate::limits::MAX_MESSAGES_EXPIRED_PER_RUN`] messages whose timer
    /// ran out by `now`; returns how many.
    pub async fn expire_messages(&self, now: u64) -> Result<u64, StoreError> {
        self.chore(|reply| Chore::ExpireMessages { now, reply }).await
    }

    /// Deletes the rows of blobs whose timer ran out; returns their ids.
    pub async fn expire_timed_blobs(&self, now: u64) -> Result<Vec<[u8; 16]>, StoreError> {
        self.chore(|reply| Chore::ExpireTimedBlobs { now, reply }).await
    }

    /// Empties the database's write-ahead log into its file (see
    /// [`Backend::checkpoint`]) if `always` or any group has a timer;
    /// whether it completed (or was not needed).
    pub async fn checkpoint(&self, always: bool) -> Result<bool, StoreError> {
        self.chore(|reply| Chore::Checkpoint { always, reply }).await
    }

    /// Blob rows in id order after `after`.
    pub async fn blobs(
        &self,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<crate::delivery::storage::BlobRecord>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.reader.send(Read::Blobs { after, limit, reply }).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// The answer to a handshake that waited longer than [`MAX_VERIFY_WAIT`]
/// for a verifier: nothing changed, retry later.
fn verify_busy() -> Outcome {
    let wait = crate::limits::HANDSHAKE_RETRY;
    Outcome::reply(crate::wire::Response::Error {
        code: crate::wire::ErrorCode::RateLimited,
        detail: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        message: format!("the server is busy verifying commits and proposals; retry in {} s", wait.as_secs()),
    })
}

/// [`Engine::prepare`]'s work on a verifier thread: the group's snapshot
/// from the reader, then the verification.
fn prepare_blocking(
    reader: &mpsc::Sender<Read>,
    core: &Delivery,
    caller: Caller,
    request: &Request,
) -> Option<Prepared> {
    let Request::Send { message, .. } = request else { return None };
    let handshake = crate::mls::handshake_group(message)?;
    let (reply, rx) = oneshot::channel();
    reader.send(Read::Snapshot { caller, handshake, reply }).ok()?;
    let snapshot = rx.blocking_recv().ok()?.ok()??;
    core.prepare(caller, snapshot, request)
}

fn spawn<J: Send + 'static>(
    name: &str,
    run: impl FnOnce(mpsc::Receiver<J>) + Send + 'static,
) -> Result<mpsc::Sender<J>, StoreError> {
    let (tx, rx) = mpsc::channel::<J>();
    std::thread::Builder::new().name(name.into()).spawn(move || run(rx)).map_err(StoreError::Thread)?;
    Ok(tx)
}

/// The writer: group commit over batches of waiting jobs, with a commit
/// delay. Ends when every `Engine` handle is dropped.
///
/// **Commit delay.** Without one, the writer commits whatever is queued
/// when it starts. With clients that each keep requests in flight, the
/// requests answered by one commit come back while the next one flushes,
/// and two half-size batches alternate: every request waits about two
/// flushes (on a disk that flushes in 2 ms, 64 clients got ~31 requests
/// per commit). So the writer keeps an estimate of the requests it will see
/// next, `expected`: those the last commit answered plus those that
/// arrived while it ran (they are all "in the system"). If fewer are
/// queued, it keeps the batch open for more, until it holds `expected`, or
/// [`MAX_COMMIT_DELAY`], or as long as the last flush took (the commit
/// itself, after the batch's work), whichever comes first. Waiting pays
/// when a flush costs more than the clients' way back: on a disk that
/// flushes in 2 ms, a batch holds all 64 requests of 64 clients instead
/// of two halves taking turns. On a disk that flushes in 0.15 ms the
/// clients cannot come back within a flush, the wait ends with fewer than
/// half of the missing requests, and the writer then makes
/// [`COMMIT_DELAY_BACKOFF`] commits without one: the halves stay, one
/// half's flush overlapping the other half's work (waiting every time cost
/// 15% there). A request therefore waits at most one flush longer, and only
/// when the last cycle showed concurrency: below [`COMMIT_SIBLINGS`]
/// expected requests (one client at a time, or a trickle of unrelated ones)
/// nothing waits, and a wait that ended with fewer than expected lowers the
/// estimate to what came.
///
/// The wait comes before the transaction. (Running each request as it
/// arrives in an open transaction was tried: it kept absorbing arrivals
/// into the batch, delaying the early requests' replies, and cost 10% on
/// a fast disk for no gain on a slow one.) There is no commit delay on a
/// database other nodes share (PostgreSQL, [`Unit::CONFLICTS`]): there a
/// commit is a round trip whose length includes waiting for another
/// node's locks on the same group, and holding batches back for it
/// halved two nodes' throughput on one group (2213 → 978 sends/s).
///
/// Nothing changes about acknowledgements: replies go out after the commit
/// that holds them is durable.
fn writer_loop<B: Backend<Error = StoreError>>(
    mut db: B,
    mut delivery: Delivery,
    rx: mpsc::Receiver<Write>,
    counts: &HandshakeCounts,
) {
    let mut writer = Writer::new();
    loop {
        // Block only with nothing to do: a chore or retention run taken in
        // with the last batch's stragglers is done now, not whenever the
        // next request comes (the expiry sweep waited on one forever).
        if writer.waiting.is_empty() && writer.chores.is_empty() && writer.expires.is_empty() {
            match rx.recv() {
                Ok(job) => writer.take(job),
                Err(_) => return,
            }
        }
        writer.take_queued(&rx, MAX_WRITE_BATCH);
        if let Some(target) = writer.delay_target(<B::Unit<'static> as Unit>::CONFLICTS) {
            writer.fill(&rx, target, Instant::now() + MAX_COMMIT_DELAY.min(writer.last_flush));
        }
        let (answered, flush) = commit_batch(&mut db, &mut delivery, std::mem::take(&mut writer.waiting), counts);
        if let Some(flush) = flush {
            writer.last_flush = flush;
        }
        for (now, reply) in writer.expires.drain(..) {
            let _ = reply.send(db.write(|unit| delivery.expire(unit, now)));
        }
        for chore in writer.chores.drain(..) {
            match chore {
                Chore::BlobReceived { id, received, reply } => {
                    let _ = reply.send(db.write(|unit| unit.set_blob_received(&id, received)));
                }
                Chore::BlobComplete { id, hash, now, reply } => {
                    let _ = reply.send(db.write(|unit| unit.complete_blob(&id, &hash, now)));
                }
                Chore::ExpireBlobs { now, reply } => {
                    let _ = reply.send(db.write(|unit| delivery.expire_blobs(unit, now)));
                }
                Chore::ExpireMessages { now, reply } => {
                    let _ = reply.send(db.write(|unit| delivery.expire_messages(unit, now)));
                }
                Chore::ExpireTimedBlobs { now, reply } => {
                    let _ = reply.send(db.write(|unit| delivery.expire_timed_blobs(unit, now)));
                }
                Chore::Checkpoint { always, reply } => {
                    let needed = always || db.read(|unit| unit.timers_in_use()).and_then(|r| r).unwrap_or(true);
                    let _ = reply.send(if needed { db.checkpoint() } else { Ok(true) });
                }
            }
        }
        let arrived = writer.take_queued(&rx, MAX_WRITE_BATCH);
        writer.committed(answered, arrived);
    }
}

/// Requests waiting for the next batch, and what the writer knows about
/// the load.
struct Writer {
    waiting: VecDeque<Pending>,
    /// Retention runs, after the batch being built.
    expires: Vec<(u64, oneshot::Sender<Result<u64, StoreError>>)>,
    /// Chores, after the batch being built.
    chores: Vec<Chore>,
    /// Requests the next batch is expected to hold.
    expected: usize,
    /// How long the last commit's flush took (the commit itself, after
    /// the batch's work).
    last_flush: Duration,
    /// Commits still to make without a delay (after one that waited in
    /// vain).
    skip: u32,
}

impl Writer {
    fn new() -> Self {
        Self {
            waiting: VecDeque::new(),
            expires: Vec::new(),
            chores: Vec::new(),
            expected: 0,
            last_flush: Duration::ZERO,
            skip: 0,
        }
    }

    /// How many requests to wait for before the next commit, if any
    /// (`shared`: other nodes write to the database too).
    fn delay_target(&mut self, shared: bool) -> Option<usize> {
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        (self.expected >= COMMIT_SIBLINGS && !shared).then(|| self.expected.min(MAX_WRITE_BATCH))
    }

    /// A commit answered `answered` requests while `arrived` more came.
    fn committed(&mut self, answered: usize, arrived: usize) {
        if answered > 0 {
            self.expected = answered + arrived;
        }
    }

    fn take(&mut self, job: Write) {
        match job {
            Write::Deliver(pending) => {
                super::metrics::metrics().queued(true, -1);
                self.waiting.push_back(pending);
            }
            Write::Expire { now, reply } => self.expires.push((now, reply)),
            Write::Chore(chore) => self.chores.push(chore),
        }
    }

    /// Takes the jobs already queued while the batch has room for them;
    /// returns how many.
    fn take_queued(&mut self, rx: &mpsc::Receiver<Write>, room: usize) -> usize {
        let mut taken = 0;
        while self.waiting.len() < room {
            match rx.try_recv() {
                Ok(job) => {
                    self.take(job);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        taken
    }

    /// The commit delay: waits until `target` requests are waiting or
    /// `deadline`.
    fn fill(&mut self, rx: &mpsc::Receiver<Write>, target: usize, deadline: Instant) {
        let had = self.waiting.len();
        while self.waiting.len() < target {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => {
                    self.take(job);
                    self.take_queued(rx, MAX_WRITE_BATCH);
                }
                Err(_) => {
                    // Fewer came than expected: expect what came. If not
                    // even half of those missing came, they are slower to
                    // come back than a flush: do not wait for a while.
                    let came = self.waiting.len().saturating_sub(had);
                    if came * 2 < target.saturating_sub(had) {
                        self.skip = COMMIT_DELAY_BACKOFF;
                    }
                    self.expected = self.waiting.len();
                    return;
                }
            }
        }
    }
}

/// Runs `jobs` in one write transaction, then answers them all. Returns
/// how many requests it answered and, if it committed, how long the commit
/// itself took.
fn commit_batch<B: Backend<Error = StoreError>>(
    db: &mut B,
    delivery: &mut Delivery,
    jobs: VecDeque<Pending>,
    counts: &HandshakeCounts,
) -> (usize, Option<Duration>) {
    if jobs.is_empty() {
        return (0, None);
    }
    let started = Instant::now();
    let mut replies = Vec::with_capacity(jobs.len());
    let mut worked = started;
    let result = db.write(|unit| {
        let mut outcomes = Vec::with_capacity(jobs.len());
        for Pending { origin, request, now, reply, digest, prepared, no_verdict } in jobs {
            let had = prepared.is_some();
            let used = delivery.prepared_used();
            let outcome = run_request(unit, delivery, origin, request, now, digest, (prepared, no_verdict))?;
            let counter = if delivery.prepared_used() != used {
                Some(&counts.prepared)
            } else if outcome.again.is_some() {
                Some(&counts.sent_back)
            } else {
                had.then_some(&counts.verified_again)
            };
            if let Some(counter) = counter {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            outcomes.push(outcome);
            replies.push(reply);
        }
        worked = Instant::now();
        Ok(outcomes)
    });
    let count = replies.len();
    let mut flush = None;
    match result {
        Ok(outcomes) => {
            flush = Some(worked.elapsed());
            super::metrics::metrics().committed(count, started.elapsed());
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            // What the batch wrote never happened, so a roster cached from
            // it may not be true.
            delivery.forget_cached();
            tracing::error!("write batch failed, nothing of it was stored: {e}");
            // Requests that never ran have dropped their reply sender; the
            // caller sees `Closed` and reports an internal error.
            for reply in replies {
                let _ = reply.send(Outcome::internal());
            }
        }
    }
    (count, flush)
}

/// Runs one request in its own savepoint. On a database several nodes
/// share, a request that conflicted with another node's transaction (see
/// [`Unit::take_conflict`]) is undone and run again, up to
/// [`MAX_CONFLICT_RETRIES`] times; it then sees what the other node
/// committed.
fn run_request<U: Unit<Error = StoreError>>(
    unit: &mut U,
    delivery: &mut Delivery,
    origin: Origin,
    request: Request,
    now: u64,
    digest: Option<crate::chain::MessageDigest>,
    (mut prepared, no_verdict): (Option<Box<Prepared>>, NoVerdict),
) -> Result<Outcome, StoreError> {
    let mut request = Some(request);
    let mut attempt = 0;
    loop {
        let Some(this) = request.take() else { return Ok(Outcome::internal()) };
        // Only a store that can conflict pays for a copy of the request.
        let again = (U::CONFLICTS && attempt < MAX_CONFLICT_RETRIES).then(|| this.clone());
        unit.savepoint()?;
        // A verdict serves the first attempt only: a retry sees what
        // another node committed (and a handshake that went through a
        // verifier goes back to one rather than being verified here).
        let prepared = prepared.take().map(|p| *p);
        let outcome = delivery.handle_prepared(unit, origin, this, now, digest, prepared, no_verdict);
        if unit.take_conflict() {
            if let Some(again) = again {
                unit.release(false)?;
                // The undone attempt may have cached a roster it wrote.
                delivery.forget_cached();
                tracing::debug!(attempt, "request conflicted with another node; running it again");
                attempt += 1;
                request = Some(again);
                continue;
            }
        }
        if outcome.wrote {
            unit.announce(&outcome.notifications)?;
        }
        unit.release(outcome.wrote)?;
        return Ok(outcome);
    }
}

/// The reader: each request in its own read unit (a snapshot).
fn reader_loop<B: Backend<Error = StoreError>>(mut db: B, mut delivery: Delivery, rx: mpsc::Receiver<Read>) {
    while let Ok(job) = rx.recv() {
        match job {
            Read::Deliver(Pending { origin, request, now, reply, .. }) => {
                super::metrics::metrics().queued(false, -1);
                let outcome = db.read(|unit| delivery.handle(unit, origin, request, now)).unwrap_or_else(|e| {
                    tracing::error!("read transaction failed: {e}");
                    Outcome::internal()
                });
                let _ = reply.send(outcome);
            }
            Read::Device { device, reply } => {
                let _ = reply.send(db.read(|unit| unit.device(&device)).and_then(|r| r));
            }
            Read::Stats { now, reply } => {
                let _ = reply.send(db.read(|unit| unit.stats(now)).and_then(|r| r));
            }
            Read::Snapshot { caller, handshake, reply } => {
                let _ = reply.send(db.read(|unit| delivery.snapshot(unit, &caller, &handshake)).and_then(|r| r));
            }
            Read::Stored { group, seq, reply } => {
                let _ = reply.send(db.read(|unit| stored(unit, group, seq)).and_then(|r| r));
            }
            Read::Blobs { after, limit, reply } => {
                let _ = reply.send(db.read(|unit| unit.blobs(after, limit)).and_then(|r| r));
            }
        }
    }
}

/// A message as another node stored it, as a push to the devices that were
/// members when it was sent (joined before it, not removed before it).
fn stored<S: Storage<Error = StoreError>>(
    store: &mut S,
    group: Vec<u8>,
    seq: u64,
) -> Result<Option<Notification>, StoreError> {
    let (mut messages, _) = store.fetch(&group, seq.saturating_sub(1), Some(seq), 1, usize::MAX)?;
    let Some(crate::wire::Logged { head, data: message, expires, gone, .. }) = messages.pop() else { return Ok(None) };
    // Expired (its group's timer): never handed out again, pushed or not.
    if gone.is_some() || expires.is_some_and(|t| t <= crate::util::now_unix()) {
        return Ok(None);
    }
    let recipients: Arc<[DeviceId]> = store
        .members(&group)?
        .into_iter()
        .filter(|(_, m)| m.joined_after < seq && m.left_at.is_none_or(|left| left >= seq))
        .map(|(d, _)| d)
        .collect();
    Ok(Some(Notification::Message { group, seq, head, message, recipients }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Write {
        let (reply, _) = oneshot::channel();
        let request = Request::Send { message: vec![1, 2, 3], welcome: None, group_info: None };
        Write::Deliver(Pending {
            origin: Origin::Stranger(DeviceId([7; 32])),
            request,
            now: 0,
            reply,
            digest: None,
            prepared: None,
            no_verdict: NoVerdict::Verify,
        })
    }

    /// An engine on a new SQLite file in `dir` (open registration), and its
    /// removal key.
    fn engine_in(dir: &tempfile::TempDir) -> (Engine, [u8; 32]) {
        let path = dir.path().join("engine.db");
        let removal = Arc::new(crate::auth::Identity::generate().unwrap());
        let removal_key = removal.public_key();
        let current = crate::auth::online::CurrentKey::new(
            crate::auth::online::ServerKey::identity(crate::auth::Identity::generate().unwrap()).unwrap(),
        );
        let quotas = Quotas { invite_required: false, ..Quotas::default() };
        let keys = ServerKeys { removal, current };
        (Engine::start(Db::open(&path).unwrap(), Db::open(&path).unwrap(), quotas, keys).unwrap(), removal_key)
    }

    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    /// (applied from a verdict, sent back, not used) so far.
    fn tally(c: &HandshakeCounts) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (c.prepared.load(Relaxed), c.sent_back.load(Relaxed), c.verified_again.load(Relaxed))
    }

    /// Red team (issue 37): a member's handshake for the epoch after its
    /// own commit, verified while the group is still before it, gets no
    /// verdict (no snapshot of an epoch the group is not at). Once the
    /// commit is applied it reached the writer, which verified it itself,
    /// milliseconds each in a large group: a member could pipeline junk
    /// behind each commit of its own. Now it goes back to a verifier.
    #[test]
    fn a_handshake_for_the_next_epoch_is_not_verified_on_the_writer() {
        use crate::client::mls::Member;
        use crate::wire::{ErrorCode, Response};
        let dir = tempfile::tempdir().unwrap();
        let (engine, removal_key) = engine_in(&dir);
        multi_thread().block_on(async {
            let mut alice = Member::generate().unwrap().2;
            let a = Caller::of(alice.certificate());
            let ok = |r: Response| assert!(!matches!(r, Response::Error { .. }), "{r:?}");
            let register = Request::Register { invite: None, certificate: alice.certificate().encode() };
            ok(engine.deliver(Origin::Stranger(alice.device()), register, 1).await.unwrap().response);
            let g = alice.create_group_of(&removal_key, crate::mls::Suite::Classic).unwrap();
            let create = Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree };
            ok(engine.deliver(a, create, 2).await.unwrap().response);
            let first = alice.self_update(&g.id).unwrap().into_request();
            alice.merge_pending(&g.id).unwrap();
            // A commit of the next epoch that fails only once merged (no
            // GroupInfo): the most verification for the least.
            let mut junk = alice.self_update(&g.id).unwrap().into_request();
            if let Request::Send { group_info, .. } = &mut junk {
                *group_info = None;
            }
            let ready = engine.prepare(a.into(), junk).await.unwrap();
            assert!(ready.offloaded && ready.prepared.is_none(), "no snapshot of the next epoch yet");
            ok(engine.deliver(a, first, 3).await.unwrap().response);
            let before = tally(engine.handshake_counts());
            let r = engine.settle(a.into(), ready, 4).await.unwrap().response;
            assert!(
                matches!(&r, Response::Error { code: ErrorCode::InvalidMessage, message, .. } if message.contains("GroupInfo")),
                "{r:?}"
            );
            let after = tally(engine.handshake_counts());
            assert_eq!(
                (after.0 - before.0, after.1 - before.1, after.2 - before.2),
                (1, 1, 0),
                "sent back once, then refused from a verdict made off the writer"
            );
        });
    }

    /// `count` jobs sent from another thread, a little apart, as clients
    /// coming back one by one.
    fn arriving(tx: mpsc::Sender<Write>, count: usize) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for _ in 0..count {
                std::thread::sleep(Duration::from_millis(1));
                let _ = tx.send(job());
            }
        })
    }

    /// Handshakes reach the writer verified: a lone commit is applied from
    /// its verdict; two commits for one epoch sent at once (each verified
    /// against the same epoch's snapshot) accept exactly one, and the
    /// loser's verdict is not used.
    #[test]
    fn commits_are_verified_off_the_writer_and_one_per_epoch_wins() {
        use crate::client::mls::Member;
        use crate::wire::{ErrorCode, Response};
        let dir = tempfile::tempdir().unwrap();
        let (engine, removal_key) = engine_in(&dir);
        multi_thread().block_on(async {
            let (mut alice, mut bob) = (Member::generate().unwrap().2, Member::generate().unwrap().2);
            let (a, b) = (Caller::of(alice.certificate()), Caller::of(bob.certificate()));
            let ok = |r: Response| assert!(!matches!(r, Response::Error { .. }), "{r:?}");
            for m in [&alice, &bob] {
                let register = Request::Register { invite: None, certificate: m.certificate().encode() };
                ok(engine.deliver(Origin::Stranger(m.device()), register, 1).await.unwrap().response);
                let packages = m.key_packages(1).unwrap();
                let publish = Request::PublishKeyPackages { packages, last_resort: None };
                ok(engine.deliver(Caller::of(m.certificate()), publish, 1).await.unwrap().response);
            }
            let g = alice.create_group_of(&removal_key, crate::mls::Suite::Classic).unwrap();
            let create = Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree };
            ok(engine.deliver(a, create, 2).await.unwrap().response);
            let claim = Request::ClaimKeyPackage { account: bob.account().0 };
            let Response::KeyPackages { packages } = engine.deliver(a, claim, 3).await.unwrap().response else {
                panic!("no package")
            };
            let add = alice.add(&g.id, &[(bob.account(), packages[0].clone())]).unwrap();
            let welcome = add.welcome.clone().unwrap();
            ok(engine.deliver(a, add.into_request(), 4).await.unwrap().response);
            alice.merge_pending(&g.id).unwrap();
            bob.join(&welcome).unwrap();
            let counts = engine.handshake_counts();
            let prepared = |c: &HandshakeCounts| c.prepared.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(prepared(counts), 1, "the add was applied from its verdict");
            let epoch = alice.epoch(&g.id).unwrap();
            let (ca, cb) = (alice.self_update(&g.id).unwrap(), bob.self_update(&g.id).unwrap());
            let sent = (ca.into_request(), cb.into_request());
            let (ra, rb) = tokio::join!(engine.deliver(a, sent.0.clone(), 5), engine.deliver(b, sent.1.clone(), 5));
            let responses = [ra.unwrap().response, rb.unwrap().response];
            let won = |r: &Response| matches!(r, Response::Accepted { epoch: e, .. } if *e == epoch + 1);
            let lost = |r: &Response| matches!(r, Response::Error { code: ErrorCode::StaleEpoch, .. });
            assert_eq!(responses.iter().filter(|r| won(r)).count(), 1, "{responses:?}");
            assert_eq!(responses.iter().filter(|r| lost(r)).count(), 1, "{responses:?}");
            assert_eq!(prepared(counts), 2, "the winner was applied from its verdict, the loser's was not");
            // Red team M1: a verdict that went stale before the writer
            // reached it (a proposal changed the group in between) goes
            // back to a verifier; the writer does not verify it.
            let alice_won = won(&responses[0]);
            let Request::Send { message: winning, .. } = (if alice_won { &sent.0 } else { &sent.1 }) else {
                panic!("not a send")
            };
            let (winner, loser, wc, lc) =
                if alice_won { (&mut alice, &mut bob, a, b) } else { (&mut bob, &mut alice, b, a) };
            winner.merge_pending(&g.id).unwrap();
            loser.discard_pending(&g.id).unwrap();
            loser.receive(&g.id, winning).unwrap();
            let commit = winner.self_update(&g.id).unwrap().into_request();
            let ready = engine.prepare(wc.into(), commit).await.unwrap();
            assert!(ready.prepared.as_ref().is_some_and(|v| v.verified()), "verified against the snapshot");
            let proposal = Request::Send { message: loser.leave(&g.id).unwrap(), welcome: None, group_info: None };
            ok(engine.deliver(lc, proposal, 7).await.unwrap().response);
            let before = tally(counts);
            let out = engine.settle(wc.into(), ready, 8).await.unwrap();
            assert!(out.again.is_none());
            let after = tally(counts);
            assert_eq!(
                (after.0 - before.0, after.1 - before.1, after.2 - before.2),
                (1, 1, 0),
                "sent back once, then applied (or refused) from a second verdict, never verified on the writer: {:?}",
                out.response
            );
        });
    }

    /// Red team M2: a handshake that waited longer than
    /// [`MAX_VERIFY_WAIT`] in the verifiers' queue is answered at once,
    /// unverified ("busy"), so a flooded queue drains; one that did not
    /// is verified.
    #[test]
    fn a_handshake_that_waited_too_long_for_a_verifier_is_answered_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _) = engine_in(&dir);
        let caller = Caller::of(crate::client::mls::Member::generate().unwrap().2.certificate());
        let verify = |queued: Instant| {
            let (reply, rx) = oneshot::channel();
            let request = Request::Send { message: vec![1, 2, 3], welcome: None, group_info: None };
            engine.verifier.jobs.send(Verify { caller, request, queued, reply }).unwrap();
            rx.blocking_recv().unwrap()
        };
        let late = Instant::now().checked_sub(MAX_VERIFY_WAIT + Duration::from_secs(1)).unwrap();
        assert!(matches!(verify(late), Verified::Late));
        assert!(matches!(verify(Instant::now()), Verified::Done(Request::Send { .. }, None)));
        assert!(matches!(
            verify_busy().response,
            crate::wire::Response::Error { code: crate::wire::ErrorCode::RateLimited, .. }
        ));
    }

    /// A verifier thread runs at a lower priority (the niceness in its
    /// own `/proc` entry), so a large group's commits yield the CPU to
    /// sends.
    #[test]
    fn verification_yields_the_cpu_to_sends() {
        let niceness = std::thread::spawn(|| {
            yield_to_sends();
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            // Fields after the command name (which ends with the last ')'):
            // the state is field 3, the niceness field 19.
            let after = stat.rsplit_once(')').unwrap().1;
            after.split_whitespace().nth(16).unwrap().parse::<i32>().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(niceness, VERIFIER_NICENESS);
    }

    /// One core is left to sends wherever there is more than one.
    #[test]
    fn verifiers_leave_a_core_to_the_connections() {
        assert_eq!(verifier_threads(1), 1);
        assert_eq!(verifier_threads(2), 1);
        assert_eq!(verifier_threads(4), 3);
        assert_eq!(verifier_threads(64), crate::limits::MAX_VERIFIERS);
    }

    #[test]
    fn an_account_has_a_bounded_number_of_handshakes_in_verification() {
        use crate::limits::MAX_HANDSHAKES_IN_VERIFICATION as MAX;
        let counts = Arc::new(InFlight::default());
        let (a, b) = (crate::auth::AccountId([1; 32]), crate::auth::AccountId([2; 32]));
        let held: Vec<_> = (0..MAX).map(|_| counts.enter(a).unwrap()).collect();
        assert!(counts.enter(a).is_none(), "one more than the bound");
        let other = counts.enter(b);
        assert!(other.is_some(), "another account is not held up");
        drop(held);
        assert!(counts.enter(a).is_some(), "a finished verification frees its place");
        drop(other);
        assert!(counts.0.lock().unwrap().is_empty(), "nothing left once all are done");
    }

    #[test]
    fn a_batch_waits_for_the_requests_its_last_commit_answered() {
        let (tx, rx) = mpsc::channel();
        let mut w = Writer::new();
        // 16 clients were answered; 4 are back, 12 on their way.
        w.committed(16, 0);
        for _ in 0..4 {
            w.take(job());
        }
        let target = w.delay_target(false);
        assert_eq!(target, Some(16));
        let coming = arriving(tx, 12);
        // A deadline far away: the test waits for the requests, not a clock.
        w.fill(&rx, 16, Instant::now() + Duration::from_secs(60));
        coming.join().unwrap();
        assert_eq!(w.waiting.len(), 16, "one commit for all 16");
        assert_eq!(w.skip, 0);
    }

    #[test]
    fn a_wait_in_vain_lowers_the_estimate_and_backs_off() {
        let (tx, rx) = mpsc::channel::<Write>();
        let mut w = Writer::new();
        w.committed(32, 0);
        w.take(job());
        let target = w.delay_target(false).unwrap();
        // Nobody else comes before the deadline.
        w.fill(&rx, target, Instant::now() + Duration::from_millis(5));
        drop(tx);
        assert_eq!(w.expected, 1);
        assert_eq!(w.skip, COMMIT_DELAY_BACKOFF);
        w.committed(32, 0);
        for _ in 0..COMMIT_DELAY_BACKOFF {
            assert_eq!(w.delay_target(false), None, "no delay while backing off");
        }
        assert_eq!(w.delay_target(false), Some(32), "then it tries again");
    }

    #[test]
    fn no_delay_for_a_few_requests_or_on_a_shared_database() {
        let mut w = Writer::new();
        w.committed(1, 0);
        assert_eq!(w.delay_target(false), None, "one client at a time never waits");
        w.committed(2, COMMIT_SIBLINGS - 3);
        assert_eq!(w.delay_target(false), None);
        w.committed(64, 0);
        assert_eq!(w.delay_target(true), None, "other nodes would wait on this one's locks");
        assert_eq!(w.delay_target(false), Some(64));
        w.committed(MAX_WRITE_BATCH, 40);
        assert_eq!(w.delay_target(false), Some(MAX_WRITE_BATCH));
    }
}

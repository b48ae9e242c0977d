//! One authenticated connection: request streams, the registration
//! deadline, and the connection's part of graceful shutdown.
//!
//! The TLS handshake has already bound the connection to a device key.
//! If that key is not yet a registered device, the only requests served are
//! `Register` (with the device's certificate) and a new device's half of
//! linking ([`Request::from_stranger`]); if registration does not succeed
//! within the auth deadline, the connection is closed with
//! [`close::REGISTRATION_DEADLINE`]. A registered device acts as the
//! account its certificate names ([`Caller`]); a revoked one is closed
//! with [`close::REVOKED`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::{ReadToEndError, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::push::Online;
use super::Shared;
use crate::auth::tls::device_of_peer;
use crate::auth::DeviceId;
use crate::delivery::{Caller, Origin};
use crate::limits::{
    BLOB_IO_BUFFER, DEVICE_RECEIVE_WINDOW, MAX_STRANGER_FRAME, REQUEST_BUDGET_PER_CONNECTION, SHUTDOWN_GRACE,
};
use crate::util::now_unix;
use crate::wire::{close, DecodeError, ErrorCode, Request, Response};

/// Per-connection state shared by its request tasks.
struct Session {
    shared: Arc<Shared>,
    /// The key the connection authenticated with.
    device: DeviceId,
    /// Set once the key is a registered device.
    caller: OnceLock<Caller>,
    conn: quinn::Connection,
    online: std::sync::Mutex<Option<Online>>,
    /// Bytes of request frames this connection may hold at once.
    budget: Arc<Semaphore>,
    /// Held while the key is not an account (the per-address cap on strangers).
    stranger: std::sync::Mutex<Option<super::admission::UnregisteredSlot>>,
}

impl Session {
    /// Starts live delivery to this connection (once) and opens its flow
    /// control and stream limits to what a device gets (a connection starts
    /// with a stranger's: one stream, a few KiB).
    fn go_online(&self) {
        self.conn.set_receive_window(VarInt::from_u32(DEVICE_RECEIVE_WINDOW));
        self.conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.shared.config.max_streams_per_connection));
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        if online.is_none() {
            *online = Some(self.shared.registry.connect(self.device, self.conn.clone()));
        }
    }

    fn registered(&self) -> bool {
        self.caller.get().is_some()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        super::metrics::metrics().connection_closed(self.registered());
    }
}

pub(crate) async fn run(conn: quinn::Connection, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let device = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| device_of_peer(&certs));
    let Some(device) = device else {
        // The verifier makes this unreachable; refuse rather than trust.
        conn.close(VarInt::from_u32(close::NOT_AUTHENTICATED), b"no device key");
        return;
    };
    let caller = match shared.engine.device(device).await {
        Ok(Some(row)) if row.revoked_at.is_some() => {
            debug!("a revoked device connected");
            conn.close(VarInt::from_u32(close::REVOKED), b"this device was revoked");
            return;
        }
        Ok(row) => row.map(|r| Caller { account: r.account, device }),
        Err(e) => {
            error!("device lookup failed: {e}");
            conn.close(VarInt::from_u32(close::BUSY), b"the server cannot look up devices right now");
            return;
        }
    };
    let known = caller.is_some();
    debug!(registered = known, "connected");
    let mut stranger = None;
    if !known {
        let ip = conn.remote_address().ip();
        let cfg = &shared.config;
        match shared.admission.unregistered(ip, cfg.max_unregistered_per_ip, cfg.max_unregistered) {
            Some(slot) => stranger = Some(slot),
            None => {
                debug!("too many unregistered connections");
                conn.close(VarInt::from_u32(close::BUSY), b"too many unregistered connections");
                return;
            }
        }
    }
    let deadline = Instant::now() + shared.config.auth_deadline();
    let session = Arc::new(Session {
        shared,
        device,
        caller: caller.map(OnceLock::from).unwrap_or_default(),
        conn: conn.clone(),
        online: std::sync::Mutex::new(None),
        budget: Arc::new(Semaphore::new(REQUEST_BUDGET_PER_CONNECTION)),
        stranger: std::sync::Mutex::new(stranger),
    });
    super::metrics::metrics().connection_opened(known);
    if known {
        session.go_online();
    }
    let mut requests = JoinSet::new();
    let mut deadline_armed = !known;
    // One timer for the connection, not one made (and dropped) per stream.
    let registration = tokio::time::sleep_until(deadline);
    tokio::pin!(registration);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = &mut registration, if deadline_armed => {
                if session.registered() {
                    deadline_armed = false;
                } else {
                    debug!("registration deadline passed");
                    conn.close(VarInt::from_u32(close::REGISTRATION_DEADLINE), b"not registered in time");
                    requests.abort_all();
                    return;
                }
            }
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let session = session.clone();
                    requests.spawn(async move { serve_stream(&session, send, recv).await });
                }
                Err(e) => {
                    debug!("connection ended: {e}");
                    requests.abort_all();
                    return;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    // Shutdown: finish what is in flight, then say goodbye.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while requests.join_next().await.is_some() {} }).await;
    conn.close(VarInt::from_u32(close::SHUTTING_DOWN), b"server shutting down");
}

async fn serve_stream(session: &Session, mut send: SendStream, mut recv: RecvStream) {
    let timeout = session.shared.config.request_timeout();
    let deadline = Instant::now() + timeout;
    let (kind, response) = match tokio::time::timeout_at(deadline, read_request(session, &mut recv, deadline)).await {
        Err(_) => {
            let _ = recv.stop(VarInt::from_u32(0));
            ("unread", Response::error(ErrorCode::Timeout, "the request was not received in time"))
        }
        Ok(Err(Refused::Stream)) => return,
        Ok(Err(Refused::DownloadAnswer(response))) => {
            let _ = recv.stop(VarInt::from_u32(0));
            super::blobs::refuse_download(send, &response).await;
            return;
        }
        Ok(Err(Refused::Upload)) => {
            // Registered (checked when the tag was read): the stream is
            // the upload's.
            // Its buffer is memory like a request frame's: reserved from
            // the connection's and the server's budgets for as long as it
            // runs, so transfers in flight are bounded as requests are.
            let Some(caller) = session.caller.get() else { return };
            match reserve(session, BLOB_IO_BUFFER, deadline).await {
                Ok(budget) => {
                    super::blobs::serve_upload(&session.shared, *caller, send, recv).await;
                    drop(budget);
                }
                Err(Refused::Answer(response)) => {
                    let _ = recv.stop(VarInt::from_u32(0));
                    super::metrics::metrics().request("upload", &response);
                    if let Ok(bytes) = response.encode() {
                        let _ = send.write_all(&bytes).await;
                        let _ = send.finish();
                    }
                }
                Err(_) => {}
            }
            return;
        }
        Ok(Err(Refused::Answer(response))) => {
            // Nothing more of this stream is read or buffered.
            let _ = recv.stop(VarInt::from_u32(0));
            ("unread", response)
        }
        Ok(Ok((frame, budget))) => {
            let answered = match Request::decode(&frame) {
                Ok(request @ Request::Download { .. }) => {
                    drop(frame);
                    drop(budget);
                    let Some(caller) = session.caller.get() else { return };
                    match reserve(session, BLOB_IO_BUFFER, deadline).await {
                        Ok(budget) => {
                            super::blobs::serve_download(&session.shared, *caller, request, send).await;
                            drop(budget);
                        }
                        Err(Refused::Answer(response)) => super::blobs::refuse_download(send, &response).await,
                        Err(_) => {}
                    }
                    return;
                }
                Ok(request) => {
                    drop(frame);
                    let kind = request.kind();
                    (kind, handle(session, request).await)
                }
                Err(e @ DecodeError::UnknownTag { .. }) => {
                    ("unknown", Response::error(ErrorCode::UnknownRequest, e.to_string()))
                }
                Err(e) => ("malformed", Response::error(ErrorCode::Malformed, format!("malformed request: {e}"))),
            };
            drop(budget);
            answered
        }
    };
    super::metrics::metrics().request(kind, &response);
    let bytes = match response.encode() {
        Ok(b) => b,
        Err(e) => {
            error!("could not encode a response: {e}");
            match Response::error(ErrorCode::Internal, "internal error").encode() {
                Ok(b) => b,
                Err(_) => return,
            }
        }
    };
    if send.write_all(&bytes).await.is_err() || send.finish().is_err() {
        return;
    }
    // Wait until the peer has the whole response, so that closing the
    // connection (shutdown) cannot cut it off. No timer of its own: this
    // ends when the peer acknowledges the response or the connection ends,
    // a connection holds at most its stream limit of these, and shutdown
    // waits for them [`SHUTDOWN_GRACE`] at most.
    let _ = send.stopped().await;
}

/// Why a request was not read.
enum Refused {
    /// Answer with this (the rest of the stream is not read).
    Answer(Response),
    /// The stream failed; nothing to answer.
    Stream,
    /// An upload: its head and bytes are read by [`super::blobs`].
    Upload,
    /// Answer a download with this (in the download's framing).
    DownloadAnswer(Response),
}

/// Memory reserved for one request frame: given back when dropped.
struct Budget {
    connection: OwnedSemaphorePermit,
    /// `None` for a stranger: its frames (at most a few KiB on a capped
    /// number of connections) never spend what registered devices share.
    server: Option<OwnedSemaphorePermit>,
}

impl Budget {
    /// Gives back everything above `bytes` (what the frame turned out to
    /// need).
    fn shrink_to(&mut self, bytes: usize) {
        for permit in std::iter::once(&mut self.connection).chain(self.server.as_mut()) {
            let excess = permit.num_permits().saturating_sub(bytes.max(1));
            drop(permit.split(excess));
        }
    }
}

/// Reads one request frame, spending memory only once it is reserved:
/// first the one-byte tag (under the connection's small receive window
/// nothing else is buffered), then, if the caller may send that request at
/// all and its rate budget allows, a reservation of the largest frame that
/// tag can have, from the connection's and the server's budgets, and only
/// then the body, capped at that size.
async fn read_request(
    session: &Session,
    recv: &mut RecvStream,
    deadline: Instant,
) -> Result<(Vec<u8>, Budget), Refused> {
    let mut tag = [0u8; 1];
    match recv.read_exact(&mut tag).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(Refused::Answer(Response::error(ErrorCode::Malformed, "malformed request: frame ends early")))
        }
        Err(quinn::ReadExactError::ReadError(e)) => {
            debug!("request stream failed: {e}");
            return Err(Refused::Stream);
        }
    }
    let [tag] = tag;
    match read_rest(session, recv, deadline, tag).await {
        // A download's answers are length-prefixed (its bytes follow).
        Err(Refused::Answer(response)) if tag == Request::DOWNLOAD_TAG => Err(Refused::DownloadAnswer(response)),
        other => other,
    }
}

/// [`read_request`] once the tag is read.
async fn read_rest(
    session: &Session,
    recv: &mut RecvStream,
    deadline: Instant,
    tag: u8,
) -> Result<(Vec<u8>, Budget), Refused> {
    // Every request spends rate budget (the account's, or a stranger's
    // address's), even one that is refused next.
    if let Err(wait) = rate_check(session) {
        super::metrics::metrics().refused("rate-limit");
        return Err(Refused::Answer(rate_limited(wait, "too many requests")));
    }
    let registered = session.registered();
    let Some(limit) = Request::max_frame(tag) else {
        let e = DecodeError::UnknownTag { what: "request", tag };
        return Err(Refused::Answer(Response::error(ErrorCode::UnknownRequest, e.to_string())));
    };
    let limit = if registered {
        limit
    } else if Request::from_stranger(tag) {
        limit.min(MAX_STRANGER_FRAME)
    } else {
        return Err(Refused::Answer(not_registered()));
    };
    if tag == Request::UPLOAD_TAG && registered {
        return Err(Refused::Upload);
    }
    let mut budget = reserve(session, limit, deadline).await?;
    let frame = match recv.read_to_end(limit.saturating_sub(1)).await {
        Ok(mut rest) => {
            rest.insert(0, tag);
            rest
        }
        Err(ReadToEndError::TooLong) => {
            return Err(Refused::Answer(Response::error(
                ErrorCode::TooLarge,
                format!("this request is limited to {limit} bytes"),
            )))
        }
        Err(ReadToEndError::Read(e)) => {
            debug!("request stream failed: {e}");
            return Err(Refused::Stream);
        }
    };
    budget.shrink_to(frame.len());
    Ok((frame, budget))
}

/// Reserves `bytes` from the connection's and the server's request budgets,
/// waiting until `deadline` at most.
async fn reserve(session: &Session, bytes: usize, deadline: Instant) -> Result<Budget, Refused> {
    let n = u32::try_from(bytes).unwrap_or(u32::MAX);
    let busy = || {
        super::metrics::metrics().refused("busy");
        Refused::Answer(rate_limited(Duration::from_millis(BUDGET_RETRY_MS), "the server is busy"))
    };
    // Almost always there is room: take it without arming a timer.
    let server = &session.shared.request_budget;
    if let Ok(connection) = session.budget.clone().try_acquire_many_owned(n) {
        if !session.registered() {
            return Ok(Budget { connection, server: None });
        }
        if let Ok(server) = server.clone().try_acquire_many_owned(n) {
            return Ok(Budget { connection, server: Some(server) });
        }
    }
    let acquire = async {
        let connection = session.budget.clone().acquire_many_owned(n).await.map_err(|_| busy())?;
        let server = if session.registered() {
            Some(session.shared.request_budget.clone().acquire_many_owned(n).await.map_err(|_| busy())?)
        } else {
            None
        };
        Ok(Budget { connection, server })
    };
    tokio::time::timeout_at(deadline, acquire).await.map_err(|_| busy())?
}

/// The answer to a cancel of blob `id` while a stream writes it: the
/// uploader hears to wait; anyone else what a missing file gets.
async fn being_written(shared: &super::Shared, origin: Origin, id: [u8; 16]) -> Response {
    match shared.engine.deliver(origin, Request::UploadStatus { id }, now_unix()).await {
        Ok(outcome) => match outcome.response {
            Response::Upload(_) => rate_limited(
                Duration::from_millis(CANCEL_RETRY_MS),
                "this upload is being written on another stream; end it first",
            ),
            other => other,
        },
        Err(e) => {
            warn!("internal error: {e}");
            Response::error(ErrorCode::Internal, "internal server error; nothing was changed")
        }
    }
}

/// How long a client whose cancel met a writing stream should wait.
const CANCEL_RETRY_MS: u64 = 250;

/// How long a client told "busy" should wait before retrying.
const BUDGET_RETRY_MS: u64 = 100;

fn rate_limited(wait: Duration, what: &str) -> Response {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    Response::Error { code: ErrorCode::RateLimited, detail: ms, message: format!("{what}; retry in {ms} ms") }
}

fn not_registered() -> Response {
    Response::error(ErrorCode::NotRegistered, crate::delivery::NOT_REGISTERED)
}

/// One token bucket per request: a registered device spends its account's
/// budget only, a key that is not (yet) an account spends its source
/// address's. Strangers behind the same address as a member (one office
/// NAT) therefore never use up the member's budget, and a member's traffic
/// never counts against the strangers' one.
fn rate_check(session: &Session) -> Result<(), std::time::Duration> {
    let now = std::time::Instant::now();
    if let Some(caller) = session.caller.get() {
        session.shared.account_rate.check(caller.account, now)
    } else {
        session.shared.ip_rate.check(session.conn.remote_address().ip(), now)
    }
}

/// Answers one request: `Ping` here (it measures the connection), every
/// other kind in the Delivery Service core, on the engine.
async fn handle(session: &Session, request: Request) -> Response {
    debug!(request = request.kind(), "request");
    let origin = match session.caller.get() {
        Some(caller) => {
            if let Request::Ping { nonce } = request {
                return Response::Pong { nonce };
            }
            Origin::Device(*caller)
        }
        None => Origin::Stranger(session.device),
    };
    let shared = &session.shared;
    let cancelled = match &request {
        Request::UploadCancel { id } => Some(*id),
        _ => None,
    };
    // A cancel holds the blob as an upload stream does: while a stream
    // writes it, the upload is not cancelled (its quota and slot would be
    // free while the stream went on writing), and no stream starts while
    // it is being cancelled.
    let _writing = match cancelled {
        Some(id) => match shared.blobs.claim(id) {
            Some(hold) => Some(hold),
            None => return being_written(shared, origin, id).await,
        },
        None => None,
    };
    match shared.engine.deliver(origin, request, now_unix()).await {
        Ok(outcome) => {
            if let Some(caller) = outcome.registered {
                if session.caller.set(caller).is_ok() {
                    super::metrics::metrics().connection_registered();
                    // Registered: no longer counts against its address's
                    // stranger cap.
                    drop(session.stranger.lock().unwrap_or_else(|p| p.into_inner()).take());
                    session.go_online();
                }
            }
            shared.registry.dispatch(&outcome.notifications);
            if let (Some(id), Response::Done) = (cancelled, &outcome.response) {
                shared.blobs.remove(&id);
            }
            outcome.response
        }
        Err(e) => {
            warn!("internal error: {e}");
            Response::error(ErrorCode::Internal, "internal server error; nothing was changed")
        }
    }
}

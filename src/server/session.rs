//! One authenticated connection: request streams, the registration
//! deadline, and the connection's part of graceful shutdown.
//!
//! The TLS handshake has already bound the connection to an account key.
//! If that key is not yet an account, the only request served is
//! `Register`; if registration does not succeed within the auth deadline,
//! the connection is closed with [`close::REGISTRATION_DEADLINE`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use quinn::{ReadToEndError, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::push::Online;
use super::Shared;
use crate::auth::tls::account_of_peer;
use crate::auth::{AccountId, InviteToken};
use crate::limits::{MAX_REQUEST_FRAME, SHUTDOWN_GRACE};
use crate::store::RegisterError;
use crate::util::now_unix;
use crate::wire::{close, DecodeError, ErrorCode, Request, Response};

/// Per-connection state shared by its request tasks.
struct Session {
    shared: Arc<Shared>,
    account: AccountId,
    registered: AtomicBool,
    conn: quinn::Connection,
    online: std::sync::Mutex<Option<Online>>,
    /// Held while the key is not an account (the per-address cap on strangers).
    stranger: std::sync::Mutex<Option<super::limits::UnregisteredSlot>>,
}

impl Session {
    /// Starts live delivery to this connection (once).
    fn go_online(&self) {
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        if online.is_none() {
            *online = Some(self.shared.registry.connect(self.account, self.conn.clone()));
        }
    }
}

pub(crate) async fn run(conn: quinn::Connection, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let account = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| account_of_peer(&certs));
    let Some(account) = account else {
        // The verifier makes this unreachable; refuse rather than trust.
        conn.close(VarInt::from_u32(close::NOT_AUTHENTICATED), b"no account key");
        return;
    };
    let known = match shared.store.read(move |db| db.account(&account)).await {
        Ok(Ok(row)) => row.is_some(),
        Ok(Err(e)) => {
            error!("account lookup failed: {e}");
            false
        }
        Err(e) => {
            error!("account lookup failed: {e}");
            false
        }
    };
    debug!(account = %account.short(), registered = known, "connected");
    let mut stranger = None;
    if !known {
        let ip = conn.remote_address().ip();
        match shared.admission.unregistered(ip, shared.config.max_unregistered_per_ip) {
            Some(slot) => stranger = Some(slot),
            None => {
                debug!("too many unregistered connections from this address");
                conn.close(VarInt::from_u32(close::BUSY), b"too many unregistered connections from your address");
                return;
            }
        }
    }
    let deadline = Instant::now() + shared.config.auth_deadline();
    let session = Arc::new(Session {
        shared,
        account,
        registered: AtomicBool::new(known),
        conn: conn.clone(),
        online: std::sync::Mutex::new(None),
        stranger: std::sync::Mutex::new(stranger),
    });
    if known {
        session.go_online();
    }
    let mut requests = JoinSet::new();
    let mut deadline_armed = !known;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(deadline), if deadline_armed => {
                if session.registered.load(Ordering::Acquire) {
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
    let response = match tokio::time::timeout(timeout, recv.read_to_end(MAX_REQUEST_FRAME)).await {
        Err(_) => {
            let _ = recv.stop(VarInt::from_u32(0));
            Response::error(ErrorCode::Timeout, "the request was not received in time")
        }
        Ok(Err(ReadToEndError::TooLong)) => {
            let _ = recv.stop(VarInt::from_u32(0));
            Response::error(ErrorCode::TooLarge, format!("requests are limited to {MAX_REQUEST_FRAME} bytes"))
        }
        Ok(Err(ReadToEndError::Read(e))) => {
            debug!("request stream failed: {e}");
            return;
        }
        Ok(Ok(frame)) => match rate_check(session) {
            Err(wait) => {
                let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
                Response::Error {
                    code: ErrorCode::RateLimited,
                    detail: ms,
                    message: format!("too many requests; retry in {ms} ms"),
                }
            }
            Ok(()) => match Request::decode(&frame) {
                Ok(request) => handle(session, request).await,
                Err(e @ DecodeError::UnknownTag { .. }) => Response::error(ErrorCode::UnknownRequest, e.to_string()),
                Err(e) => Response::error(ErrorCode::Malformed, format!("malformed request: {e}")),
            },
        },
    };
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
    // connection (shutdown) cannot cut it off.
    let _ = tokio::time::timeout(timeout, send.stopped()).await;
}

/// One token bucket per request: a registered device spends its account's
/// budget only, a key that is not (yet) an account spends its source
/// address's. Strangers behind the same address as a member (one office
/// NAT) therefore never use up the member's budget, and a member's traffic
/// never counts against the strangers' one.
fn rate_check(session: &Session) -> Result<(), std::time::Duration> {
    let now = std::time::Instant::now();
    if session.registered.load(Ordering::Acquire) {
        session.shared.account_rate.check(session.account, now)
    } else {
        session.shared.ip_rate.check(session.conn.remote_address().ip(), now)
    }
}

async fn handle(session: &Session, request: Request) -> Response {
    let registered = session.registered.load(Ordering::Acquire);
    debug!(request = request.kind(), "request");
    match request {
        Request::Register { invite } => register(session, invite).await,
        _ if !registered => Response::error(
            ErrorCode::NotRegistered,
            "this key is not registered on this server; register with an invite first",
        ),
        Request::Status => {
            let account = session.account;
            match session.shared.store.read(move |db| db.account(&account)).await {
                Ok(Ok(Some(row))) => {
                    Response::Status { account: account.0, registered_at: row.created_at, server_time: now_unix() }
                }
                Ok(Ok(None)) => Response::error(ErrorCode::NotRegistered, "this key is not registered"),
                Ok(Err(e)) => internal(e),
                Err(e) => internal(e),
            }
        }
        Request::Ping { nonce } => Response::Pong { nonce },
        request => {
            let shared = &session.shared;
            match shared.store.deliver(session.account, request, now_unix()).await {
                Ok(outcome) => {
                    shared.registry.dispatch(&outcome.notifications);
                    outcome.response
                }
                Err(e) => internal(e),
            }
        }
    }
}

async fn register(session: &Session, invite: Option<String>) -> Response {
    let token = match invite.as_deref().map(str::parse::<InviteToken>) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => return Response::error(ErrorCode::InviteUnknown, "the invite is not known to this server"),
    };
    let account = session.account;
    let required = !session.shared.config.open_registration;
    let result = session.shared.store.call(move |db| db.register(&account, token.as_ref(), required, now_unix())).await;
    match result {
        Ok(Ok(r)) => {
            session.registered.store(true, Ordering::Release);
            // Registered: no longer counts against its address's stranger cap.
            drop(session.stranger.lock().unwrap_or_else(|p| p.into_inner()).take());
            session.go_online();
            if r.created {
                debug!("account registered");
            }
            Response::Registered { created: r.created }
        }
        Ok(Err(e)) => {
            let code = match &e {
                RegisterError::InviteRequired => ErrorCode::InviteRequired,
                RegisterError::InviteUnknown => ErrorCode::InviteUnknown,
                RegisterError::InviteExpired => ErrorCode::InviteExpired,
                RegisterError::InviteUsedUp => ErrorCode::InviteUsedUp,
                RegisterError::Store(e) => return internal(e),
            };
            Response::error(code, e.to_string())
        }
        Err(e) => internal(e),
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    warn!("internal error: {e}");
    Response::error(ErrorCode::Internal, "internal server error; nothing was changed")
}

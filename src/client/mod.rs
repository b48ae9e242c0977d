//! Client side of the protocol: connect with a pinned server key,
//! authenticate with an account key, make requests.
//!
//! Used by the `hush` binary and by the integration tests. Everything a
//! server sends is decoded with the same non-panicking codecs the server
//! uses, with the client's own size caps ([`MAX_RESPONSE_FRAME`]): a
//! malicious server cannot crash or exhaust a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, IdleTimeout, TransportConfig, VarInt};
use thiserror::Error;

use crate::auth::tls::{client_crypto, Credentials, SeenFingerprint, TlsError};
use crate::auth::{AccountId, Fingerprint, HushAddress, Identity};
use crate::limits::{CLIENT_KEEP_ALIVE, CLIENT_TIMEOUT, DEFAULT_IDLE_TIMEOUT};
pub mod mls;

use crate::wire::{close, DecodeError, EncodeError, ErrorCode, Request, Response, MAX_RESPONSE_FRAME};

/// What went wrong talking to a server, phrased for the person at the
/// keyboard.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot reach the server at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error(
        "the server's key does not match the one you pinned (pinned {pinned}, server presented {presented}); \
         this may be an attack, or the server's key was replaced: ask its operator"
    )]
    FingerprintMismatch { pinned: Fingerprint, presented: Fingerprint },
    #[error("the server refused the connection: {0}")]
    Refused(String),
    #[error("the server closed the connection: {reason} (code {code})")]
    Closed { code: u64, reason: &'static str },
    #[error("{message} (code {})", code.to_u16())]
    Server { code: ErrorCode, detail: u64, message: String },
    #[error("the server sent a malformed response: {0}")]
    Protocol(#[from] DecodeError),
    #[error("the request could not be encoded: {0}")]
    Encode(#[from] EncodeError),
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    #[error("connection lost: {0}")]
    Connection(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_connection(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(c) => {
                let code = c.error_code.into_inner();
                Self::Closed { code, reason: close::describe(code) }
            }
            ConnectionError::ConnectionClosed(c) => Self::Refused(c.to_string()),
            ConnectionError::TimedOut => Self::Timeout(CLIENT_TIMEOUT),
            other => Self::Connection(other.to_string()),
        }
    }
}

/// What the server knows about this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub account: AccountId,
    pub registered_at: u64,
    pub server_time: u64,
}

/// An authenticated connection to a hush server.
#[derive(Debug)]
pub struct Connection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Connection {
    /// Connects to `address`, checks the server's key against the pinned
    /// fingerprint, and authenticates as `identity`.
    pub async fn connect(address: &HushAddress, identity: &Identity) -> Result<Self, ClientError> {
        let credentials = identity.tls_credentials().map_err(TlsError::from)?;
        Self::connect_with(address, Some(credentials)).await
    }

    /// Like [`Connection::connect`] with any certificate, or none. A hush
    /// server refuses anything but an Ed25519 certificate; tests use this
    /// to prove it.
    pub async fn connect_with(address: &HushAddress, credentials: Option<Credentials>) -> Result<Self, ClientError> {
        let remote = resolve(address).await?;
        let (crypto, seen) = client_crypto(credentials, address.fingerprint)?;
        let mut transport = TransportConfig::default();
        transport.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
        if let Ok(idle) = IdleTimeout::try_from(DEFAULT_IDLE_TIMEOUT) {
            transport.max_idle_timeout(Some(idle));
        }
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        let local: SocketAddr =
            if remote.is_ipv6() { SocketAddr::from(([0u16; 8], 0)) } else { SocketAddr::from(([0u8; 4], 0)) };
        let endpoint = quinn::Endpoint::client(local)
            .map_err(|e| ClientError::Unreachable { addr: remote, reason: format!("cannot open a UDP socket: {e}") })?;
        let server_name = if address.host.parse::<std::net::IpAddr>().is_ok() { "hush" } else { &address.host };
        let connecting = endpoint
            .connect_with(config, remote, server_name)
            .map_err(|e| ClientError::Unreachable { addr: remote, reason: e.to_string() })?;
        let result = tokio::time::timeout(CLIENT_TIMEOUT, connecting).await;
        let conn = match result {
            Err(_) => {
                return Err(ClientError::Unreachable {
                    addr: remote,
                    reason: format!("no answer within {}s (is hushd running there?)", CLIENT_TIMEOUT.as_secs()),
                })
            }
            Ok(Err(e)) => {
                return Err(mismatch(&seen, address.fingerprint).unwrap_or_else(|| handshake_error(remote, e)))
            }
            Ok(Ok(conn)) => conn,
        };
        Ok(Self { endpoint, conn })
    }

    /// Sends one request and returns the server's response, including error
    /// responses.
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let frame = request.encode()?;
        let bytes = self.raw(&frame).await?;
        Ok(Response::decode(&bytes)?)
    }

    /// Sends one request; an error response becomes [`ClientError::Server`].
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        match self.request(request).await? {
            Response::Error { code, detail, message } => Err(ClientError::Server { code, detail, message }),
            other => Ok(other),
        }
    }

    /// Sends raw bytes as one request frame and returns the raw response
    /// frame. For tests and diagnostics.
    pub async fn raw(&self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(ClientError::from_connection)?;
            send.write_all(frame).await.map_err(|e| self.lost(e.to_string()))?;
            send.finish().map_err(|e| self.lost(e.to_string()))?;
            recv.read_to_end(MAX_RESPONSE_FRAME).await.map_err(|e| self.lost(e.to_string()))
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout(CLIENT_TIMEOUT))?
    }

    fn lost(&self, what: String) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => ClientError::from_connection(reason),
            None => ClientError::Connection(what),
        }
    }

    /// Registers this key, with an invite token if given. Returns whether a
    /// new account was created (false: it already existed).
    pub async fn register(&self, invite: Option<&str>) -> Result<bool, ClientError> {
        match self.call(&Request::Register { invite: invite.map(str::to_owned) }).await? {
            Response::Registered { created } => Ok(created),
            other => Err(unexpected(&other)),
        }
    }

    /// The server's view of this account.
    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.call(&Request::Status).await? {
            Response::Status { account, registered_at, server_time } => {
                Ok(Status { account: AccountId(account), registered_at, server_time })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Waits until the server closes the connection and says why.
    pub async fn closed(&self) -> ClientError {
        ClientError::from_connection(self.conn.closed().await)
    }

    /// The underlying QUIC connection (for tests that need raw streams).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection politely and waits briefly for the server to
    /// hear it.
    pub async fn close(self) {
        self.conn.close(VarInt::from_u32(close::NORMAL), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn unexpected(response: &Response) -> ClientError {
    ClientError::Connection(format!("unexpected response {response:?}"))
}

fn mismatch(seen: &SeenFingerprint, pinned: Fingerprint) -> Option<ClientError> {
    let presented = seen.get()?;
    (!presented.matches(&pinned)).then_some(ClientError::FingerprintMismatch { pinned, presented })
}

fn handshake_error(remote: SocketAddr, e: ConnectionError) -> ClientError {
    match e {
        ConnectionError::TimedOut => {
            ClientError::Unreachable { addr: remote, reason: "the handshake timed out".into() }
        }
        other => ClientError::from_connection(other),
    }
}

async fn resolve(address: &HushAddress) -> Result<SocketAddr, ClientError> {
    let host = address.host.as_str();
    let mut addrs = tokio::net::lookup_host((host, address.port))
        .await
        .map_err(|e| ClientError::Resolve { host: host.to_owned(), reason: e.to_string() })?;
    addrs.next().ok_or_else(|| ClientError::Resolve { host: host.to_owned(), reason: "no addresses".into() })
}

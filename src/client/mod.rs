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
use crate::auth::{AccountId, DeviceCertificate, DeviceId, Fingerprint, HushAddress, Identity};
use crate::chain::{Head, SignedHead};
use crate::limits::{
    CLIENT_KEEP_ALIVE, CLIENT_MAX_RATE_LIMIT_WAIT, CLIENT_RATE_LIMIT_RETRIES, CLIENT_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};
/// An upload stream: the blob's bytes go out on it, the server's answer
/// (how much it holds, and the hash once complete) comes back at the end.
#[derive(Debug)]
pub struct UploadStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
}

impl UploadStream {
    fn lost(&self, what: String) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => ClientError::from_connection(reason),
            None => ClientError::Connection(what),
        }
    }

    /// Writes bytes of the blob. An error may mean the server refused the
    /// upload: [`UploadStream::finish`] then says why.
    /// A write that makes no progress for [`CLIENT_TIMEOUT`] fails with
    /// [`ClientError::Timeout`].
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        match tokio::time::timeout(CLIENT_TIMEOUT, self.send.write_all(bytes)).await {
            Err(_) => Err(ClientError::Timeout(CLIENT_TIMEOUT)),
            Ok(r) => r.map_err(|e| self.lost(e.to_string())),
        }
    }

    /// Abandons the stream: the server stops reading it at once (and keeps
    /// what it made durable), so a resumed upload is not told that this
    /// one is still being written.
    pub fn reset(mut self) {
        let _ = self.send.reset(VarInt::from_u32(0));
        let _ = self.recv.stop(VarInt::from_u32(0));
    }

    /// Ends the stream and returns where the upload stands.
    pub async fn finish(mut self) -> Result<UploadState, ClientError> {
        let _ = self.send.finish();
        let read = self.recv.read_to_end(MAX_RESPONSE_FRAME);
        let bytes = match tokio::time::timeout(CLIENT_TIMEOUT, read).await {
            Err(_) => return Err(ClientError::Timeout(CLIENT_TIMEOUT)),
            Ok(Err(e)) => return Err(self.lost(e.to_string())),
            Ok(Ok(bytes)) => bytes,
        };
        match Response::decode(&bytes)? {
            Response::Upload(state) => Ok(state),
            other => Err(unexpected(&other)),
        }
    }
}

/// Where the server stored a message: its sequence number, the group's
/// epoch after it, and the group's chain head after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    pub epoch: u64,
    pub head: Head,
}

pub mod app;
pub mod backup;
pub mod history;
pub mod home;
pub mod link;
pub mod local;
pub mod log;
pub mod mls;
pub mod payload;
pub mod rpc;
pub mod screen;
pub mod state;
pub mod verify;

use crate::wire::{
    close, decode_push_frame, DecodeError, EncodeError, ErrorCode, Logged, Push, Request, Response, UploadState,
    MAX_RESPONSE_FRAME,
};

/// Times [`Connection::close`] yields to the runtime so the close frame
/// leaves before the connection is dropped.
const CLOSE_YIELDS: usize = 8;

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
    #[error("refusing the server: {0}")]
    ServerKey(crate::auth::online::OnlineError),
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
    #[error("the server answered with a {0} response, which does not fit the request")]
    Unexpected(&'static str),
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

/// What the server knows about this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub account: AccountId,
    pub device: DeviceId,
    pub registered_at: u64,
    pub server_time: u64,
    /// The server's removal key, which new groups list as external sender.
    pub removal_key: [u8; 32],
    /// Seconds after which the server deletes a message whether or not
    /// everyone read it.
    pub retention: u64,
}

/// An authenticated connection to a hush server.
#[derive(Debug)]
pub struct Connection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The certificate of the server's online key, unless its identity
    /// key served itself.
    server_cert: Option<crate::auth::online::OnlineCert>,
}

impl Connection {
    /// Connects to `address`, checks the server's key against the pinned
    /// fingerprint, and authenticates with the device key `identity`.
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
        Ok(Self { endpoint, conn, server_cert: seen.seen().cert })
    }

    /// The certificate of the online key this connection's server
    /// presented (`None`: its identity key itself).
    pub fn server_cert(&self) -> Option<crate::auth::online::OnlineCert> {
        self.server_cert
    }

    /// Sends one request and returns the server's response, including error
    /// responses.
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let frame = request.encode()?;
        let bytes = self.raw(&frame).await?;
        Ok(Response::decode(&bytes)?)
    }

    /// Sends one request; an error response becomes [`ClientError::Server`].
    /// `RateLimited` (the server refused before doing anything) is retried
    /// after the wait the server names, at most [`CLIENT_RATE_LIMIT_RETRIES`]
    /// times and [`CLIENT_MAX_RATE_LIMIT_WAIT`] in all; a long wait is
    /// logged so a person sees why nothing happens.
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let mut waited = Duration::ZERO;
        let mut attempt = 0;
        loop {
            match self.request(request).await? {
                Response::Error { code: ErrorCode::RateLimited, detail, message } => {
                    let wait = Duration::from_millis(detail.max(1));
                    attempt += 1;
                    if attempt > CLIENT_RATE_LIMIT_RETRIES || waited + wait > CLIENT_MAX_RATE_LIMIT_WAIT {
                        return Err(ClientError::Server { code: ErrorCode::RateLimited, detail, message });
                    }
                    if wait >= Duration::from_secs(1) {
                        tracing::warn!("the server asks us to slow down; waiting {:.1} s", wait.as_secs_f64());
                    }
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
                Response::Error { code, detail, message } => return Err(ClientError::Server { code, detail, message }),
                other => return Ok(other),
            }
        }
    }

    /// Sends raw bytes as one request frame and returns the raw response
    /// frame. For tests and diagnostics.
    pub async fn raw(&self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(ClientError::from_connection)?;
            match send.write_all(frame).await {
                Ok(()) => send.finish().map_err(|e| self.lost(e.to_string()))?,
                // The server stopped reading (a frame too large for its
                // kind): its answer says why.
                Err(quinn::WriteError::Stopped(_)) => {}
                Err(e) => return Err(self.lost(e.to_string())),
            }
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

    /// Opens an upload of `size` bytes (a padded blob size) for `group`.
    pub async fn upload_open(&self, group: &[u8], size: u64) -> Result<UploadState, ClientError> {
        match self.call(&Request::UploadOpen { group: group.to_vec(), size }).await? {
            Response::Upload(state) => Ok(state),
            other => Err(unexpected(&other)),
        }
    }

    /// Where the caller's upload `id` stands on the server.
    pub async fn upload_status(&self, id: [u8; 16]) -> Result<UploadState, ClientError> {
        match self.call(&Request::UploadStatus { id }).await? {
            Response::Upload(state) => Ok(state),
            other => Err(unexpected(&other)),
        }
    }

    /// Drops the caller's unfinished upload `id`.
    pub async fn upload_cancel(&self, id: [u8; 16]) -> Result<(), ClientError> {
        match self.call(&Request::UploadCancel { id }).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts an upload stream for `id` at `offset`: write the blob's bytes
    /// from there with [`UploadStream::write`], then [`UploadStream::finish`].
    pub async fn upload_stream(&self, id: [u8; 16], offset: u64) -> Result<UploadStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(ClientError::from_connection)?;
        let head = Request::Upload { id, offset }.encode()?;
        send.write_all(&head).await.map_err(|e| self.lost(e.to_string()))?;
        Ok(UploadStream { send, recv, conn: self.conn.clone() })
    }

    /// Asks for `length` bytes (0: to the end) of blob `id` from `offset`:
    /// the server's `Blob` head (or error) and the stream the bytes follow on.
    pub async fn download(
        &self,
        id: [u8; 16],
        offset: u64,
        length: u64,
    ) -> Result<(Response, quinn::RecvStream), ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(ClientError::from_connection)?;
            let frame = Request::Download { id, offset, length }.encode()?;
            send.write_all(&frame).await.map_err(|e| self.lost(e.to_string()))?;
            send.finish().map_err(|e| self.lost(e.to_string()))?;
            let mut len = [0u8; 4];
            recv.read_exact(&mut len).await.map_err(|e| self.lost(e.to_string()))?;
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_RESPONSE_FRAME {
                return Err(ClientError::Protocol(DecodeError::TooLong {
                    field: "download head",
                    len,
                    max: MAX_RESPONSE_FRAME,
                }));
            }
            let mut frame = vec![0u8; len];
            recv.read_exact(&mut frame).await.map_err(|e| self.lost(e.to_string()))?;
            Ok((Response::decode(&frame)?, recv))
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout(CLIENT_TIMEOUT))?
    }

    /// Registers this connection's key as the device `certificate` describes
    /// (the first device of a new account), with an invite token if given.
    /// Returns whether a new account was created (false: this device was
    /// already registered).
    pub async fn register(&self, invite: Option<&str>, certificate: &DeviceCertificate) -> Result<bool, ClientError> {
        let request = Request::Register { invite: invite.map(str::to_owned), certificate: certificate.encode() };
        match self.call(&request).await? {
            Response::Registered { created } => Ok(created),
            other => Err(unexpected(&other)),
        }
    }

    /// The server's view of this account.
    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.call(&Request::Status).await? {
            Response::Status { account, device, registered_at, server_time, removal_key, retention } => Ok(Status {
                account: AccountId(account),
                device: DeviceId(device),
                registered_at,
                server_time,
                removal_key,
                retention,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Uploads KeyPackages; returns (held, has last resort).
    pub async fn publish_key_packages(
        &self,
        packages: Vec<Vec<u8>>,
        last_resort: Option<u16>,
    ) -> Result<(u32, bool), ClientError> {
        match self.call(&Request::PublishKeyPackages { packages, last_resort }).await? {
            Response::KeyPackageCount { count, last_resort } => Ok((count, last_resort)),
            other => Err(unexpected(&other)),
        }
    }

    /// How many KeyPackages of the classic suite this device has left, and
    /// whether a last-resort one.
    pub async fn count_key_packages(&self) -> Result<(u32, bool), ClientError> {
        self.count_key_packages_of(crate::mls::Suite::Classic).await
    }

    /// How many KeyPackages of `suite` this device has left, and whether a
    /// last-resort one (a server older than post-quantum groups answers
    /// `UnknownRequest` for any but the classic suite).
    pub async fn count_key_packages_of(&self, suite: crate::mls::Suite) -> Result<(u32, bool), ClientError> {
        let request = match suite {
            crate::mls::Suite::Classic => Request::CountKeyPackages,
            other => Request::CountKeyPackagesOf { suite: other.code() },
        };
        match self.call(&request).await? {
            Response::KeyPackageCount { count, last_resort } => Ok((count, last_resort)),
            other => Err(unexpected(&other)),
        }
    }

    /// Claims one KeyPackage of each of `account`'s devices. What comes
    /// back is the server's word only: check each with
    /// [`mls::check_key_package`] before adding it.
    pub async fn claim_key_packages(&self, account: &AccountId) -> Result<Vec<Vec<u8>>, ClientError> {
        self.claim_key_packages_of(account, crate::mls::Suite::Classic).await
    }

    /// [`Connection::claim_key_packages`] of `suite`.
    pub async fn claim_key_packages_of(
        &self,
        account: &AccountId,
        suite: crate::mls::Suite,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let request = match suite {
            crate::mls::Suite::Classic => Request::ClaimKeyPackage { account: account.0 },
            other => Request::ClaimKeyPackages { account: account.0, suite: other.code() },
        };
        match self.call(&request).await? {
            Response::KeyPackages { packages } => Ok(packages),
            other => Err(unexpected(&other)),
        }
    }

    /// Registers a new group; returns its epoch.
    pub async fn create_group(&self, group_info: Vec<u8>, ratchet_tree: Vec<u8>) -> Result<u64, ClientError> {
        match self.call(&Request::CreateGroup { group_info, ratchet_tree }).await? {
            Response::Accepted { epoch, .. } => Ok(epoch),
            other => Err(unexpected(&other)),
        }
    }

    /// Posts an MLS message as it is (an application message or a proposal;
    /// a commit goes through [`Connection::commit`]). `welcome` is for tests
    /// that check what the server refuses. Returns the message's (sequence,
    /// epoch after it).
    pub async fn send(&self, message: Vec<u8>, welcome: Option<Vec<u8>>) -> Result<(u64, u64), ClientError> {
        let a = self.accepted(&Request::Send { message, welcome, group_info: None }).await?;
        Ok((a.seq, a.epoch))
    }

    /// Posts a commit with its Welcome and GroupInfo. Returns its
    /// (sequence, epoch after it).
    pub async fn commit(&self, commit: crate::client::mls::Commit) -> Result<(u64, u64), ClientError> {
        let a = self.accepted(&commit.into_request()).await?;
        Ok((a.seq, a.epoch))
    }

    /// Posts a request that stores a message (`Send`, or a commit's) and
    /// returns where it went, with the group's chain head after it.
    pub async fn accepted(&self, request: &Request) -> Result<Accepted, ClientError> {
        match self.call(request).await? {
            Response::Accepted { seq, epoch, head, .. } => Ok(Accepted { seq, epoch, head }),
            other => Err(unexpected(&other)),
        }
    }

    /// The server's signature over `group`'s chain head after `seq`.
    pub async fn signed_head(&self, group: &[u8], seq: u64) -> Result<SignedHead, ClientError> {
        match self.call(&Request::Head { group: group.to_vec(), seq }).await? {
            Response::SignedHead { signed, .. } => Ok(signed),
            other => Err(unexpected(&other)),
        }
    }

    /// The group's current GroupInfo (and its ratchet tree when the
    /// GroupInfo does not carry it), to rejoin it.
    pub async fn group_info(&self, group: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>), ClientError> {
        match self.call(&Request::FetchGroupInfo { group: group.to_vec() }).await? {
            Response::GroupInfo { group_info, ratchet_tree, .. } => Ok((group_info, ratchet_tree)),
            other => Err(unexpected(&other)),
        }
    }

    /// This account's devices, oldest first.
    pub async fn devices(&self) -> Result<Vec<crate::wire::DeviceSummary>, ClientError> {
        match self.call(&Request::ListDevices).await? {
            Response::Devices { devices } => Ok(devices),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a device revocation signed by the account key.
    pub async fn revoke_device(&self, revocation: &crate::auth::DeviceRevocation) -> Result<(), ClientError> {
        self.done(&Request::RevokeDevice { revocation: revocation.encode() }).await
    }

    /// Opens a link for a new device of this account.
    pub async fn link_open(&self, link: [u8; 16], expires_in: u32) -> Result<(), ClientError> {
        self.done(&Request::LinkOpen { link, expires_in }).await
    }

    /// Offers a new device's sealed keys (from a key that is not a device).
    pub async fn link_offer(&self, link: [u8; 16], offer: Vec<u8>) -> Result<(), ClientError> {
        self.done(&Request::LinkOffer { link, offer }).await
    }

    /// The sealed offer on this account's link, once a device made one.
    pub async fn link_fetch(&self, link: [u8; 16]) -> Result<Option<Vec<u8>>, ClientError> {
        match self.call(&Request::LinkFetch { link }).await? {
            Response::LinkOffer { offer } => Ok(Some(offer)),
            Response::LinkPending => Ok(None),
            other => Err(unexpected(&other)),
        }
    }

    /// Answers a link's offer with the certificate and the sealed bundle.
    pub async fn link_answer(&self, link: [u8; 16], certificate: Vec<u8>, bundle: Vec<u8>) -> Result<(), ClientError> {
        self.done(&Request::LinkAnswer { link, certificate, bundle }).await
    }

    /// The answer to this key's offer (certificate, sealed bundle), once
    /// the first device gave it.
    pub async fn link_result(&self, link: [u8; 16]) -> Result<Option<(Vec<u8>, Vec<u8>)>, ClientError> {
        match self.call(&Request::LinkResult { link }).await? {
            Response::Linked { certificate, bundle } => Ok(Some((certificate, bundle))),
            Response::LinkPending => Ok(None),
            other => Err(unexpected(&other)),
        }
    }

    async fn done(&self, request: &Request) -> Result<(), ClientError> {
        match self.call(request).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Messages after `after` (with their chain heads); returns them and
    /// whether more remain.
    pub async fn fetch(&self, group: &[u8], after: u64, limit: u16) -> Result<(Vec<Logged>, bool), ClientError> {
        match self.call(&Request::Fetch { group: group.to_vec(), after, limit }).await? {
            Response::Messages { messages, more, .. } => Ok((messages, more)),
            other => Err(unexpected(&other)),
        }
    }

    /// Acknowledges everything in `group` up to `seq`.
    pub async fn ack(&self, group: &[u8], seq: u64) -> Result<(), ClientError> {
        self.done(&Request::Ack { group: group.to_vec(), seq }).await
    }

    /// Welcomes waiting for this account, as (id, Welcome).
    pub async fn fetch_welcomes(&self) -> Result<Vec<(u64, Vec<u8>)>, ClientError> {
        match self.call(&Request::FetchWelcomes).await? {
            Response::Welcomes { welcomes } => Ok(welcomes),
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes a processed Welcome.
    pub async fn ack_welcome(&self, id: u64) -> Result<(), ClientError> {
        self.done(&Request::AckWelcome { id }).await
    }

    /// The groups this account is or was in.
    pub async fn groups(&self) -> Result<Vec<crate::wire::GroupSummary>, ClientError> {
        match self.call(&Request::ListGroups).await? {
            Response::Groups { groups } => Ok(groups),
            other => Err(unexpected(&other)),
        }
    }

    /// Waits for the server's push stream (opened at its first push).
    pub async fn pushes(&self) -> Result<PushStream, ClientError> {
        PushStream::accept(self.conn.clone()).await
    }

    /// Waits until the server closes the connection and says why.
    pub async fn closed(&self) -> ClientError {
        ClientError::from_connection(self.conn.closed().await)
    }

    /// The underlying QUIC connection (for tests that need raw streams).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection: the close frame is handed to the network and
    /// the call returns, without waiting out QUIC's draining period (three
    /// probe timeouts, ~85 ms on loopback, which a one-shot command would
    /// spend doing nothing). The server learns of the close from that
    /// frame; if it is lost, the server's idle timeout ends the connection.
    pub async fn close(self) {
        self.conn.close(VarInt::from_u32(close::NORMAL), b"bye");
        // Let the connection's driver run and transmit the close frame.
        for _ in 0..CLOSE_YIELDS {
            tokio::task::yield_now().await;
        }
        drop(self.endpoint);
    }
}

/// The server's push stream: length-prefixed push frames.
#[derive(Debug)]
pub struct PushStream {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl PushStream {
    /// Waits for the push stream on a connection (from [`Connection::quic`]).
    pub async fn accept(conn: quinn::Connection) -> Result<Self, ClientError> {
        let recv = conn.accept_uni().await.map_err(ClientError::from_connection)?;
        Ok(Self { recv, buf: Vec::new() })
    }

    /// The next push, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Push>, ClientError> {
        loop {
            if let Some((push, used)) = decode_push_frame(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(push));
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.recv.read(&mut chunk).await {
                Ok(Some(n)) => self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(None) => return Ok(None),
                Err(e) => return Err(ClientError::Connection(e.to_string())),
            }
            // decode_push_frame refuses oversized prefixes, so the buffer
            // never holds more than one maximal frame plus one chunk.
        }
    }
}

/// A response of the wrong kind for the request. Named by its kind only:
/// responses carry ciphertexts and keys, which have no place in an error.
fn unexpected(response: &Response) -> ClientError {
    match response {
        Response::Error { code, detail, message } => {
            ClientError::Server { code: *code, detail: *detail, message: message.clone() }
        }
        other => ClientError::Unexpected(other.kind()),
    }
}

/// Why the verifier refused the server's key, if it did: a key with no
/// certificate at all is another server as far as anyone can tell.
fn mismatch(seen: &SeenFingerprint, pinned: Fingerprint) -> Option<ClientError> {
    let seen = seen.seen();
    let presented = seen.presented?;
    match seen.refused? {
        crate::auth::online::OnlineError::Uncertified => Some(ClientError::FingerprintMismatch { pinned, presented }),
        other => Some(ClientError::ServerKey(other)),
    }
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

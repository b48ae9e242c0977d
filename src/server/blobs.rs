//! Files (issue 32): the blob store and the two streams that move blobs.
//!
//! A blob's bytes are one file in the blob directory (mode 0700), named by
//! the hex of the id the server chose: nothing a client sends becomes part
//! of a path. Its row (group, owner, size, progress, hash) is in the
//! database, and the Delivery Service decides who may write or read it
//! ([`crate::delivery`]'s `blobs`); this module only moves bytes.
//!
//! * **Upload** (request tag 0x19 on its own stream): the head names the
//!   blob and the offset the server holds; the bytes follow until the
//!   client finishes the stream. They are written as they arrive through
//!   one buffer of [`BLOB_IO_BUFFER`] bytes, hashed on the way, flushed to
//!   disk and recorded every [`BLOB_SYNC_EVERY`] bytes and at the end of
//!   the stream (also when it breaks off): the recorded offset is what the
//!   server acknowledges and where a resumed upload starts. Once every byte
//!   is there, the server records the blob's SHA-256 and answers with it.
//! * **Download** (tag 0x1a): after the Delivery Service allows it, the
//!   server writes a length-prefixed `Blob` frame, then the range's bytes,
//!   read through one buffer of [`BLOB_IO_BUFFER`] bytes.

use std::collections::{HashMap, HashSet};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::Shared;
use crate::delivery::{Caller, Origin};
use crate::limits::{BLOB_IDLE_TIMEOUT, BLOB_IO_BUFFER, BLOB_SYNC_EVERY};
use crate::util::now_unix;
use crate::wire::{ErrorCode, Request, Response, UploadState};

/// Name of the blob directory inside the data directory.
pub const BLOB_DIR: &str = "blobs";

/// The directory of blob files, and the uploads being written now.
pub struct BlobStore {
    dir: PathBuf,
    /// Blobs with an upload stream in progress (one stream per blob).
    writing: Mutex<HashSet<[u8; 16]>>,
    /// The hash of each unfinished upload's durable bytes as its last
    /// stream left it, so the next stream goes on from there instead of
    /// reading them back (after a restart it reads them once).
    hashes: Mutex<HashMap<[u8; 16], (u64, ring::digest::Context)>>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Lowercase hex of an id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl BlobStore {
    /// Opens (creating, mode 0700) the blob directory.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        crate::auth::identity::private_dir(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self { dir: dir.to_path_buf(), writing: Mutex::new(HashSet::new()), hashes: Mutex::new(HashMap::new()) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of blob `id`.
    pub fn path(&self, id: &[u8; 16]) -> PathBuf {
        self.dir.join(hex(id))
    }

    /// Removes blob `id`'s bytes (nothing if there are none).
    pub fn remove(&self, id: &[u8; 16]) {
        self.hashes.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("could not remove a blob file: {e}"),
        }
    }

    /// Keeps the hash of upload `id`'s first `at` bytes for its next stream.
    fn keep_hash(&self, id: [u8; 16], at: u64, ctx: ring::digest::Context) {
        self.hashes.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (at, ctx));
    }

    /// The hold on blob `id` an upload stream (or a cancel) needs, `None`
    /// while another has it.
    pub(crate) fn claim(self: &Arc<Self>, id: [u8; 16]) -> Option<Writing> {
        let mut writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        writing.insert(id).then(|| Writing { store: self.clone(), id })
    }
}

/// An id from 32 hex digits.
pub fn parse_hex(name: &str) -> Option<[u8; 16]> {
    if name.len() != 32 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// An upload stream's (or a cancel's) hold on its blob.
pub(crate) struct Writing {
    store: Arc<BlobStore>,
    id: [u8; 16],
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.store.writing.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// The SHA-256 of the first `len` bytes of `file`, read through one buffer.
async fn hash_prefix(file: &mut tokio::fs::File, len: u64) -> std::io::Result<ring::digest::Context> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    file.seek(SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; BLOB_IO_BUFFER];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = file.read(buf.get_mut(..want).unwrap_or_default()).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob file shorter than recorded"));
        }
        ctx.update(buf.get(..n).unwrap_or_default());
        left -= n as u64;
    }
    Ok(ctx)
}

/// The SHA-256 of a whole blob file (`hushd check`).
pub fn hash_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; BLOB_IO_BUFFER];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(buf.get(..n).unwrap_or_default());
        len += n as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((out, len))
}

/// Writes one response frame and finishes the stream.
async fn answer(send: &mut SendStream, response: &Response) {
    super::metrics::metrics().request("upload", response);
    if let Ok(bytes) = response.encode() {
        if send.write_all(&bytes).await.is_ok() && send.finish().is_ok() {
            let _ = send.stopped().await;
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    warn!("{what}: {e}");
    Response::error(ErrorCode::Internal, "internal server error; the upload resumes where the server says it holds")
}

/// Serves an upload stream whose tag byte was read: its head, then the
/// bytes.
pub(crate) async fn serve_upload(shared: &Shared, caller: Caller, mut send: SendStream, mut recv: RecvStream) {
    let response = upload(shared, caller, &mut recv).await;
    if matches!(response, Response::Error { .. }) {
        let _ = recv.stop(VarInt::from_u32(0));
    }
    answer(&mut send, &response).await;
}

/// Length of an upload head after its tag: id and offset.
const UPLOAD_HEAD: usize = 16 + 8;

async fn upload(shared: &Shared, caller: Caller, recv: &mut RecvStream) -> Response {
    let mut head = [0u8; 1 + UPLOAD_HEAD];
    head[0] = Request::UPLOAD_TAG;
    match tokio::time::timeout(shared.config.request_timeout(), recv.read_exact(&mut head[1..])).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Response::error(ErrorCode::Malformed, "malformed request: the upload head ends early"),
        Err(_) => return Response::error(ErrorCode::Timeout, "the request was not received in time"),
    }
    let Ok(Request::Upload { id, offset }) = Request::decode(&head) else {
        return Response::error(ErrorCode::Malformed, "malformed request: not an upload head");
    };
    debug!(offset, "upload stream");
    // The hold is taken before the check, so that what the check sees
    // (the row, how much of it is held, that it is not cancelled) stays
    // true while this stream writes: a cancel, or another stream, waits
    // for it to end.
    let writing = shared.blobs.claim(id);
    // The Delivery Service decides: the caller's own unfinished upload, at
    // the offset the server holds.
    let state = match shared.engine.deliver(Origin::Device(caller), Request::Upload { id, offset }, now_unix()).await {
        Ok(outcome) => match outcome.response {
            Response::Upload(state) => state,
            other => return other,
        },
        Err(e) => return internal("upload check failed", e),
    };
    if state.hash.is_some() {
        return Response::Upload(state);
    }
    let Some(_writing) = writing else {
        return Response::error(ErrorCode::RateLimited, "this upload is being written on another stream");
    };
    match receive(shared, state, recv).await {
        Ok(response) => response,
        Err(e) => internal("upload failed", e),
    }
}

/// Writes the stream's bytes to the blob's file from `state.received`.
async fn receive(shared: &Shared, state: UploadState, recv: &mut RecvStream) -> std::io::Result<Response> {
    let UploadState { id, size, received: start, .. } = state;
    let path = shared.blobs.path(&id);
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .await?;
    let on_disk = file.metadata().await?.len();
    if on_disk < start {
        // The file lost bytes the database says are durable (a restore, an
        // operator): start again from what is there.
        shared.engine.blob_received(id, on_disk).await.map_err(std::io::Error::other)?;
        return Ok(Response::Error {
            code: ErrorCode::UploadOffset,
            detail: on_disk,
            message: format!("the server holds {on_disk} bytes of this upload; continue from there"),
        });
    }
    // Bytes after the recorded offset were never acknowledged: drop them.
    debug!(start, on_disk, "writing an upload");
    file.set_len(start).await?;
    let kept = shared.blobs.hashes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    let mut hash = match kept {
        Some((at, ctx)) if at == start => ctx,
        _ => hash_prefix(&mut file, start).await?,
    };
    file.seek(SeekFrom::Start(start)).await?;
    let mut received = start;
    let mut synced = start;
    let mut buf = vec![0u8; BLOB_IO_BUFFER];
    let outcome: Result<(), Response> = loop {
        // Fill the buffer (fewer, larger writes), then write what came.
        let (mut filled, mut end) = (0, None);
        while filled < buf.len() {
            let read = tokio::time::timeout(BLOB_IDLE_TIMEOUT, recv.read(buf.get_mut(filled..).unwrap_or_default()));
            match read.await {
                Ok(Ok(Some(n))) => filled += n,
                Ok(Ok(None)) => {
                    end = Some(Ok(()));
                    break;
                }
                Ok(Err(e)) => {
                    debug!("upload stream ended: {e}");
                    end = Some(Err(Response::error(ErrorCode::Timeout, "the upload stream broke off")));
                    break;
                }
                Err(_) => {
                    end = Some(Err(Response::error(ErrorCode::Timeout, "the upload stalled")));
                    break;
                }
            }
        }
        if received + filled as u64 > size {
            break Err(Response::error(ErrorCode::TooLarge, "more bytes than the upload was opened for"));
        }
        let bytes = buf.get(..filled).unwrap_or_default();
        file.write_all(bytes).await?;
        hash.update(bytes);
        received += filled as u64;
        super::metrics::metrics().file_bytes(true, filled);
        if received - synced >= BLOB_SYNC_EVERY {
            file.sync_data().await?;
            shared.engine.blob_received(id, received).await.map_err(std::io::Error::other)?;
            synced = received;
        }
        if let Some(end) = end {
            break end;
        }
    };
    if let Err(refusal) = outcome {
        // Keep what arrived: make it durable and record it, so the next
        // stream resumes there (bytes past the size are cut off).
        file.set_len(received).await?;
        file.sync_data().await?;
        shared.engine.blob_received(id, received).await.map_err(std::io::Error::other)?;
        shared.blobs.keep_hash(id, received, hash);
        return Ok(refusal);
    }
    file.sync_all().await?;
    if received < size {
        shared.engine.blob_received(id, received).await.map_err(std::io::Error::other)?;
        shared.blobs.keep_hash(id, received, hash);
        return Ok(Response::Upload(UploadState { id, size, received, hash: None }));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(hash.finish().as_ref());
    shared.engine.blob_complete(id, digest, now_unix()).await.map_err(std::io::Error::other)?;
    Ok(Response::Upload(UploadState { id, size, received, hash: Some(digest) }))
}

/// Answers a download stream with `response` alone (length-prefixed, as
/// a download's head is).
pub(crate) async fn refuse_download(mut send: SendStream, response: &Response) {
    super::metrics::metrics().request("download", response);
    let Ok(frame) = response.encode() else { return };
    let Ok(len) = u32::try_from(frame.len()) else { return };
    if write_or_give_up(&mut send, &len.to_be_bytes()).await && write_or_give_up(&mut send, &frame).await {
        let _ = send.finish();
    }
}

/// Serves a download: the Delivery Service's answer, then the bytes.
pub(crate) async fn serve_download(
    shared: &Shared,
    caller: Caller,
    request: Request,
    mut send: SendStream,
) -> &'static str {
    let Request::Download { id, .. } = &request else { return "download" };
    let id = *id;
    let response = match shared.engine.deliver(Origin::Device(caller), request, now_unix()).await {
        Ok(outcome) => outcome.response,
        Err(e) => internal("download check failed", e),
    };
    let file = match &response {
        Response::Blob { offset, .. } => match open_at(&shared.blobs.path(&id), *offset).await {
            Ok(file) => Some(file),
            Err(e) => {
                warn!("a complete blob's file cannot be read: {e}");
                None
            }
        },
        _ => None,
    };
    let response = match (&response, &file) {
        (Response::Blob { .. }, None) => {
            Response::error(ErrorCode::NoSuchFile, "no such file (it may have expired, or it is not yours to fetch)")
        }
        _ => response,
    };
    super::metrics::metrics().request("download", &response);
    let Ok(frame) = response.encode() else { return "download" };
    let Ok(len) = u32::try_from(frame.len()) else { return "download" };
    if !write_or_give_up(&mut send, &len.to_be_bytes()).await || !write_or_give_up(&mut send, &frame).await {
        return "download";
    }
    if let (Response::Blob { length, .. }, Some(mut file)) = (response, file) {
        let mut buf = vec![0u8; BLOB_IO_BUFFER];
        let mut left = length;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let n = match file.read(buf.get_mut(..want).unwrap_or_default()).await {
                Ok(0) | Err(_) => {
                    // The file is shorter than its row says: cut the
                    // stream off (the client sees a reset, not bad bytes).
                    warn!("a blob file ended early");
                    let _ = send.reset(VarInt::from_u32(1));
                    return "download";
                }
                Ok(n) => n,
            };
            if !write_or_give_up(&mut send, buf.get(..n).unwrap_or_default()).await {
                return "download";
            }
            super::metrics::metrics().file_bytes(false, n);
            left -= n as u64;
        }
    }
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(BLOB_IDLE_TIMEOUT, send.stopped()).await;
    }
    "download"
}

/// Writes `bytes` to a download stream; false (and the stream reset) if the
/// peer stops reading: a write that makes no progress for
/// [`BLOB_IDLE_TIMEOUT`] gives the stream up, as a stalled upload is, so a
/// reader that never reads cannot hold a blob file and a buffer for as long
/// as its connection lives.
async fn write_or_give_up(send: &mut SendStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match tokio::time::timeout(BLOB_IDLE_TIMEOUT, send.write(bytes)).await {
            Ok(Ok(n)) => bytes = bytes.get(n..).unwrap_or_default(),
            Ok(Err(_)) => return false,
            Err(_) => {
                debug!("a download stalled");
                let _ = send.reset(VarInt::from_u32(1));
                return false;
            }
        }
    }
    true
}

async fn open_at(path: &Path, offset: u64) -> std::io::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(offset)).await?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_their_file_names_round_trip_and_nothing_else_is_an_id() {
        let id = [0xab; 16];
        assert_eq!(parse_hex(&hex(&id)), Some(id));
        for name in ["", "../x", "abcd", &"g".repeat(32), &format!("{}.part", hex(&id))] {
            assert_eq!(parse_hex(name), None, "{name}");
        }
    }
}

//! Files (issue 32): sending, listing and saving encrypted files.
//!
//! Sending encrypts the file in chunks as it is read (never the whole file
//! in memory), uploads the blob on its own stream, and only once the
//! server holds all of it, with the hash this device computed, sends the
//! file message (key, hash, name, size, type) to the group. Encryption is
//! deterministic for a key, so a broken upload resumes where the server
//! says it holds bytes: the chunks before are sealed again (for the hash),
//! not sent again.
//!
//! Saving fetches the blob, checks every chunk as it arrives and the whole
//! blob's hash at the end, writes the plaintext to a temporary file
//! (mode 0600) in the target directory, and gives it its name only after
//! everything verified: a damaged or altered file never appears under its
//! name, and the temporary file is removed. A received name is never a
//! path ([`crate::files::safe_name`]) and never replaces an existing file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{App, AppError, Entry, EntryKind, GroupRow};
use crate::auth::AccountId;
use crate::client::local::FileRow;
use crate::client::payload::Payload;
use crate::client::{ClientError, Connection};
use crate::files::{
    media_type, numbered, open_chunk, safe_name, seal_chunk, FileError, FileKey, FileRef, Layout, FILE_CHUNK, TAG,
};
use crate::util::now_unix;
use crate::wire::{close, ErrorCode, Response, UploadState};

/// Times a transfer reconnects after losing its connection before it gives
/// up (one second apart, and as long as connecting takes).
pub const TRANSFER_RETRIES: u32 = 60;

/// Upload streams in a row that may end without the server holding more
/// before the upload is given up.
pub const TRANSFER_STALLS: u32 = 5;

/// How far a transfer has come, for a progress bar.
pub trait Progress: Send {
    /// The transfer has `total` bytes.
    fn start(&mut self, _total: u64) {}
    /// `done` of them are through.
    fn advance(&mut self, _done: u64) {}
    /// Something worth saying (a resume).
    fn note(&mut self, _message: &str) {}
    fn finish(&mut self) {}
}

/// No progress shown.
pub struct Quiet;
impl Progress for Quiet {}

/// What [`App::send_file`] did.
#[derive(Debug, Clone)]
pub struct SentFile {
    pub seq: u64,
    pub id: [u8; 16],
    pub size: u64,
    /// Bytes the upload resumed from after an interruption (0: none).
    pub resumed_at: Vec<u64>,
}

/// Where [`App::save_file`] writes.
#[derive(Debug, Clone)]
pub enum Target {
    /// This file, which must not exist.
    Exactly(PathBuf),
    /// The received name, made safe, in this directory (`name (1).ext`
    /// when it is taken).
    Into(PathBuf),
}

/// A file of a group, as listed.
#[derive(Debug, Clone)]
pub struct FileLine {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub media_type: String,
    pub sender: String,
    pub time: u64,
}

/// What an upload encrypts: a file (read again from its start on every
/// resumed stream, for the hash), or bytes in memory (a linked device's
/// history, never written to disk unencrypted).
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Bytes(_) => "the history".into(),
        }
    }

    /// A reader from the start, and its length.
    fn open(&self) -> std::io::Result<(Box<dyn Read + Send + '_>, u64)> {
        match self {
            Source::Path(p) => {
                let file = std::fs::File::open(p)?;
                let size = file.metadata()?.len();
                Ok((Box::new(file), size))
            }
            Source::Bytes(b) => Ok((Box::new(*b), b.len() as u64)),
        }
    }
}

/// Whether a transfer error is the connection's (retry) rather than an
/// answer.
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connection(_) | ClientError::Timeout(_) | ClientError::Unreachable { .. } => true,
        ClientError::Refused(_) => true,
        ClientError::Closed { code, .. } => *code == u64::from(close::SHUTTING_DOWN),
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::ShuttingDown | ErrorCode::Internal | ErrorCode::Timeout)
        }
        _ => false,
    }
}

fn file_error(e: FileError) -> AppError {
    AppError::File(e.to_string())
}

/// The id as shown: 32 hex digits.
pub fn file_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl App {
    /// Reconnects after a transfer lost its connection, waiting a second
    /// between tries.
    async fn reconnect(
        &self,
        conn: &mut Connection,
        tries: &mut u32,
        progress: &mut dyn Progress,
    ) -> Result<(), AppError> {
        loop {
            if *tries >= TRANSFER_RETRIES {
                return Err(AppError::TransferGaveUp(
                    "the connection to the server kept failing; try again later".into(),
                ));
            }
            *tries += 1;
            progress.note("connection lost; reconnecting…");
            tokio::time::sleep(Duration::from_secs(1)).await;
            match self.connect().await {
                Ok(c) => {
                    *conn = c;
                    return Ok(());
                }
                Err(AppError::Client(e)) if transient(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts and uploads `path`, then sends the file message (named
    /// `name`, or the file's own name, with `caption`) to `group`.
    pub async fn send_file(
        &mut self,
        conn: &mut Connection,
        group: &GroupRow,
        path: &Path,
        name: Option<&str>,
        caption: &str,
        progress: &mut dyn Progress,
    ) -> Result<SentFile, AppError> {
        if !group.active {
            return Err(AppError::NotMember(group.name.clone()));
        }
        let io = |e: std::io::Error| AppError::File(format!("cannot read {}: {e}", path.display()));
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(AppError::File(format!("{} is not a file", path.display())));
        }
        let size = meta.len();
        let layout = Layout::of_size(size).ok_or_else(|| AppError::File("the file is too large".into()))?;
        let key = FileKey::random().map_err(file_error)?;
        let state = conn.upload_open(&group.id, layout.blob).await?;
        let id = state.id;
        let mut resumed_at = Vec::new();
        let hash = match self.upload(conn, Source::Path(path), &key, layout, state, &mut resumed_at, progress).await {
            Ok(hash) => hash,
            Err(e) => {
                // Free the quota it holds (best effort: it expires anyway).
                let _ = conn.upload_cancel(id).await;
                return Err(e);
            }
        };
        let name = match name {
            Some(n) => n.to_string(),
            None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into()),
        };
        let file = FileRef {
            id,
            key: *key.0,
            hash,
            size,
            media_type: media_type(&name).to_string(),
            name,
            caption: caption.to_string(),
        };
        let seq = self.send_payload(conn, &group.id, &Payload::File(file)).await?;
        Ok(SentFile { seq, id, size, resumed_at })
    }

    /// Uploads the blob from where the server holds it until it holds all
    /// of it; returns its hash (the server's, which must be this one's).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn upload(
        &self,
        conn: &mut Connection,
        source: Source<'_>,
        key: &FileKey,
        layout: Layout,
        mut state: UploadState,
        resumed_at: &mut Vec<u64>,
        progress: &mut dyn Progress,
    ) -> Result<[u8; 32], AppError> {
        let mut tries = 0;
        // Streams in a row after which the server held no more than
        // before: a server that keeps stopping the upload is given up on.
        let mut stalled = 0;
        progress.start(layout.blob);
        loop {
            let before = state.received;
            let mut waited = false;
            match upload_from(conn, source, key, layout, &state, progress).await {
                Ok(Some(hash)) => {
                    progress.finish();
                    return Ok(hash);
                }
                // The stream ended early (the server stopped it): ask.
                Ok(None) => {}
                Err(AppError::Client(e)) if transient(&e) => self.reconnect(conn, &mut tries, progress).await?,
                Err(AppError::Client(ClientError::Server { code: ErrorCode::UploadOffset, .. })) => {}
                // The server still ends an earlier stream of this upload.
                Err(AppError::Client(ClientError::Server { code: ErrorCode::RateLimited, detail, .. })) => {
                    tries += 1;
                    if tries >= TRANSFER_RETRIES {
                        return Err(AppError::File("the server kept the upload busy; try again later".into()));
                    }
                    tokio::time::sleep(Duration::from_millis(detail.clamp(250, 5000))).await;
                    waited = true;
                }
                Err(e) => return Err(e),
            }
            state = loop {
                match conn.upload_status(state.id).await {
                    Ok(s) => break s,
                    Err(e) if transient(&e) => self.reconnect(conn, &mut tries, progress).await?,
                    Err(e) => return Err(e.into()),
                }
            };
            if state.received <= before && !waited {
                stalled += 1;
                if stalled >= TRANSFER_STALLS {
                    return Err(AppError::File(
                        "the server keeps stopping the upload without taking more of it; try again later".into(),
                    ));
                }
            } else {
                stalled = 0;
            }
            resumed_at.push(state.received);
            progress.note(&format!("resuming the upload at {} of {} bytes", state.received, layout.blob));
        }
    }

    /// Records a file message (received, or sent by this device) in the
    /// group's files and history.
    pub(super) fn record_file(
        &mut self,
        group: &[u8],
        seq: u64,
        sender: Option<&AccountId>,
        file: &FileRef,
    ) -> Result<Option<Entry>, AppError> {
        let row =
            FileRow { seq, sender: sender.copied(), file: file.clone(), time: now_unix(), expires: self.expiry(group) };
        if !self.local.add_file(group, &row)? {
            tracing::debug!(seq, "skipped a second file message for one blob");
            return Ok(None);
        }
        let mut line = format!("[file {}] {} ({})", &file_id(&file.id)[..8], safe_name(&file.name), human(file.size));
        let caption: String = file.caption.chars().filter(|c| !c.is_control()).collect();
        if !caption.is_empty() {
            line.push_str(": ");
            line.push_str(&caption);
        }
        Ok(Some(self.record(group, seq, sender, EntryKind::Text, &line)?))
    }

    /// The files of a group, oldest first.
    pub fn files(&self, group: &GroupRow) -> Result<Vec<FileLine>, AppError> {
        let now = now_unix();
        Ok(self
            .local
            .files(&group.id)?
            .into_iter()
            .filter(|r| r.expires.is_none_or(|t| t > now))
            .map(|r| FileLine {
                id: file_id(&r.file.id),
                name: safe_name(&r.file.name),
                size: r.file.size,
                media_type: r.file.media_type.chars().filter(|c| !c.is_control()).collect(),
                sender: r.sender.map(|a| self.display(&a)).unwrap_or_default(),
                time: r.time,
            })
            .collect())
    }

    /// The group's file whose id starts with `id` (at least 4 hex digits).
    fn find_file(&self, group: &GroupRow, id: &str) -> Result<FileRow, AppError> {
        let want = id.trim().to_ascii_lowercase();
        if want.len() < 4 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AppError::File(format!("{id:?} is not a file id; see `hush files {}`", group.name)));
        }
        let mut found: Vec<FileRow> = self
            .local
            .files(&group.id)?
            .into_iter()
            .filter(|r| r.expires.is_none_or(|t| t > now_unix()) && file_id(&r.file.id).starts_with(&want))
            .collect();
        match found.len() {
            0 => Err(AppError::File(format!("no file {want} in {}; see `hush files {}`", group.name, group.name))),
            1 => Ok(found.remove(0)),
            _ => Err(AppError::File(format!("several files start with {want}; give more of the id"))),
        }
    }

    /// Fetches, verifies and saves the group's file `id`; returns where it
    /// was written.
    pub async fn save_file(
        &self,
        conn: &mut Connection,
        group: &GroupRow,
        id: &str,
        target: Target,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf, AppError> {
        let row = self.find_file(group, id)?;
        let (dir, name) = match &target {
            Target::Exactly(path) => {
                if path.symlink_metadata().is_ok() {
                    return Err(AppError::File(format!("{} exists; it was not overwritten", path.display())));
                }
                let dir = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                (dir, None)
            }
            Target::Into(dir) => (dir.clone(), Some(safe_name(&row.file.name))),
        };
        let (temp_path, mut temp) = temp_file(&dir)?;
        // Removed however this ends: an error, or the future dropped (the
        // person pressed Ctrl-C): never a partial file left behind.
        let _temp = RemovedOnDrop(temp_path.clone());
        let fetched = self.fetch_into(conn, &row.file, &mut temp, progress).await;
        let result = fetched.and_then(|()| {
            temp.sync_all().map_err(|e| AppError::File(format!("cannot write {}: {e}", dir.display())))?;
            drop(temp);
            match &target {
                Target::Exactly(path) => place(&temp_path, path).map(|()| path.clone()),
                Target::Into(_) => place_numbered(&temp_path, &dir, name.as_deref().unwrap_or("file")),
            }
        });
        result
    }

    /// Downloads and decrypts the blob into `out`, resuming after a lost
    /// connection at the first chunk not yet verified.
    pub(super) async fn fetch_into(
        &self,
        conn: &mut Connection,
        file: &FileRef,
        out: &mut dyn Write,
        progress: &mut dyn Progress,
    ) -> Result<(), AppError> {
        let layout =
            Layout::of_size(file.size).ok_or_else(|| AppError::File("the file message is not valid".into()))?;
        let key = file.file_key();
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut next = 0u64; // the next chunk to verify
        let mut written = 0u64; // plaintext bytes written
        let mut tries = 0;
        let mut chunk = Vec::with_capacity(FILE_CHUNK + TAG);
        progress.start(layout.blob);
        while next < layout.chunks {
            let offset = Layout::blob_offset(next);
            let (head, mut recv) = match conn.download(file.id, offset, 0).await {
                Ok(x) => x,
                Err(e) if transient(&e) => {
                    self.reconnect(conn, &mut tries, progress).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match head {
                Response::Blob { size, hash: stored, .. } if size == layout.blob && stored == file.hash => {}
                Response::Blob { .. } => return Err(file_error(FileError::HashMismatch)),
                Response::Error { code: ErrorCode::NoSuchFile, .. } => {
                    return Err(AppError::File(
                        "the server does not have this file (it expired, or you are no longer a member of the group)"
                            .into(),
                    ))
                }
                other => return Err(ClientError::Unexpected(other.kind()).into()),
            }
            while next < layout.chunks {
                let sealed = layout.plain_len(next) + TAG;
                chunk.resize(sealed, 0);
                let read = tokio::time::timeout(crate::limits::CLIENT_TIMEOUT, recv.read_exact(&mut chunk)).await;
                let Ok(read) = read else {
                    tracing::debug!("download stalled");
                    break;
                };
                match read {
                    Ok(()) => {}
                    Err(quinn::ReadExactError::FinishedEarly(_)) => {
                        return Err(AppError::File(
                            "the file was altered on the server or in transit (it ends early)".into(),
                        ))
                    }
                    Err(quinn::ReadExactError::ReadError(e)) => {
                        tracing::debug!("download broke off: {e}");
                        break;
                    }
                }
                hash.update(&chunk);
                open_chunk(&key, next, layout.is_last(next), &mut chunk).map_err(file_error)?;
                let keep = usize::try_from(file.size - written).unwrap_or(usize::MAX).min(chunk.len());
                let (plain, padding) = chunk.split_at(keep);
                if padding.iter().any(|&b| b != 0) {
                    return Err(file_error(FileError::Tampered(next)));
                }
                out.write_all(plain).map_err(|e| AppError::File(format!("cannot write the file: {e}")))?;
                written += keep as u64;
                next += 1;
                progress.advance(Layout::blob_offset(next).min(layout.blob));
            }
            if next < layout.chunks {
                self.reconnect(conn, &mut tries, progress).await?;
                progress.note(&format!(
                    "resuming the download at {} of {} bytes",
                    Layout::blob_offset(next),
                    layout.blob
                ));
            }
        }
        if hash.finish().as_ref() != file.hash {
            return Err(file_error(FileError::HashMismatch));
        }
        progress.finish();
        Ok(())
    }
}

/// Seals the file's chunks from the start (for the hash) and sends those
/// from `state.received` on one upload stream. `Some(hash)` once the server
/// holds the whole blob; `None` if the stream ended before.
pub(crate) async fn upload_from(
    conn: &Connection,
    source: Source<'_>,
    key: &FileKey,
    layout: Layout,
    state: &UploadState,
    progress: &mut dyn Progress,
) -> Result<Option<[u8; 32]>, AppError> {
    let io = |e: std::io::Error| AppError::File(format!("cannot read {}: {e}", source.describe()));
    let (mut file, size) = source.open().map_err(io)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    // A complete upload (the server says so) is only checked: its hash
    // must be the one this device computes.
    let mut stream = match state.hash {
        Some(_) => None,
        None => Some(conn.upload_stream(state.id, state.received).await?),
    };
    let mut pos = 0u64;
    let mut read = 0u64;
    let mut chunk = Vec::with_capacity(FILE_CHUNK + TAG);
    for index in 0..layout.chunks {
        let len = layout.plain_len(index);
        chunk.clear();
        chunk.resize(len, 0);
        let real = usize::try_from(size.saturating_sub(read)).unwrap_or(usize::MAX).min(len);
        let (content, _zeros) = chunk.split_at_mut(real);
        file.read_exact(content).map_err(|e| {
            AppError::File(format!("{} changed while it was being sent ({e}); send it again", source.describe()))
        })?;
        read += real as u64;
        seal_chunk(key, index, layout.is_last(index), &mut chunk).map_err(file_error)?;
        hash.update(&chunk);
        let start = pos;
        pos += chunk.len() as u64;
        if pos <= state.received {
            continue;
        }
        let from = usize::try_from(state.received.saturating_sub(start)).unwrap_or(0);
        let Some(open) = stream.as_mut() else { continue };
        if let Err(e) = open.write(chunk.get(from..).unwrap_or_default()).await {
            let Some(open) = stream.take() else { return Err(e.into()) };
            if matches!(e, ClientError::Timeout(_)) {
                // Stalled: let the server end this stream now, so the resumed
                // one is not refused as "being written".
                open.reset();
                return Err(e.into());
            }
            // The server may have stopped the stream: its answer says why.
            return match open.finish().await {
                Ok(_) => Ok(None),
                Err(ClientError::Server { code, detail, message }) => {
                    Err(ClientError::Server { code, detail, message }.into())
                }
                Err(_) => Err(e.into()),
            };
        }
        progress.advance(pos);
        // Sealing is work without a wait: let the connection (and, in one
        // process with a server, everything else) run between chunks.
        tokio::task::yield_now().await;
    }
    let stored = match stream {
        Some(stream) => stream.finish().await?.hash,
        None => state.hash,
    };
    let mut mine = [0u8; 32];
    mine.copy_from_slice(hash.finish().as_ref());
    match stored {
        Some(h) if h == mine => Ok(Some(h)),
        Some(_) => {
            Err(AppError::File("the server stored other bytes than this device sent; send the file again".into()))
        }
        None => Ok(None),
    }
}

/// A file removed when this is dropped.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A new temporary file (mode 0600) in `dir`.
fn temp_file(dir: &Path) -> Result<(PathBuf, std::fs::File), AppError> {
    let mut salt = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| AppError::File("the random number generator failed".into()))?;
    let salt: String = salt.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!(".hush-part-{salt}"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&path).map_err(|e| AppError::File(format!("cannot write in {}: {e}", dir.display())))?;
    Ok((path, file))
}

/// Gives the verified temporary file its name, never replacing a file (a
/// hard link fails if the name exists).
fn place(temp: &Path, path: &Path) -> Result<(), AppError> {
    std::fs::hard_link(temp, path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            AppError::File(format!("{} exists; it was not overwritten", path.display()))
        }
        _ => AppError::File(format!("cannot write {}: {e}", path.display())),
    })
}

/// [`place`] under `name` in `dir`, or `name (n).ext` if taken.
fn place_numbered(temp: &Path, dir: &Path, name: &str) -> Result<PathBuf, AppError> {
    for n in 0..10_000u32 {
        let candidate = dir.join(if n == 0 { name.to_string() } else { numbered(name, n) });
        match std::fs::hard_link(temp, &candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(AppError::File(format!("cannot write {}: {e}", candidate.display()))),
        }
    }
    Err(AppError::File(format!("too many files called {name} in {}", dir.display())))
}

/// A size for people: bytes, KiB, MiB or GiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS.get(unit).unwrap_or(&"GiB"))
    }
}

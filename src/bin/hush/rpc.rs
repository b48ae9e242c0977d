//! `hush jsonrpc` (standard input and output) and `hush daemon --socket
//! PATH` (a Unix socket, several clients at once): JSON-RPC 2.0, one
//! object per line, on one long-lived connection to the server with live
//! pushes. The protocol is `hush::client::rpc`; this is its I/O.
//!
//! One task (the core) owns the app and the connection and runs calls one
//! at a time, in the order they arrive. Each client has a reader, which
//! sends the core one request and waits for its answer before it reads
//! the next, and a writer with a queue of [`RPC_CLIENT_QUEUE`]. Answers
//! wait for room in that queue (so only that client slows down);
//! notifications never wait: when a client's queue is full they are
//! dropped for it and counted, and a `dropped` notification with the
//! count goes out before the next thing it is sent. Nothing a client
//! does makes the process hold more than the queues and one line of
//! [`MAX_RPC_LINE`] per client.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hush::client::app::App;
use hush::client::rpc::{self, code, Call, Rpc, RpcError};
use hush::limits::{CLIENT_PURGE_INTERVAL, MAX_RPC_CLIENTS, MAX_RPC_LINE, RPC_CLIENT_QUEUE, RPC_STALL};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::{app_error, chat};

/// Longest wait between two attempts to reconnect.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// A request on its way to the core, with where its answer goes.
type ToCore = (Call, oneshot::Sender<Value>);

/// Where the core sends one client's notifications.
#[derive(Clone)]
struct Subscriber {
    id: u64,
    queue: mpsc::Sender<Value>,
    dropped: Arc<AtomicU64>,
    /// It let a notification wait [`RPC_STALL`]: no more waiting for it
    /// until its queue has room.
    stalled: Arc<AtomicBool>,
}

/// Numbers the clients, to take one off the list when it leaves.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(0);

type Subscribers = Arc<Mutex<Vec<Subscriber>>>;

/// Tells every client. A client whose queue is full gets [`RPC_STALL`]
/// to make room, once; one that does not read is then skipped (its
/// notifications dropped and counted) until it has room again.
async fn broadcast(subscribers: &Subscribers, message: &Value) {
    let list: Vec<Subscriber> = match subscribers.lock() {
        Ok(list) => list.clone(),
        Err(_) => return,
    };
    let mut gone = Vec::new();
    for s in list {
        let sent = match s.queue.try_send(message.clone()) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(true),
            Err(mpsc::error::TrySendError::Full(m)) if !s.stalled.load(Ordering::Relaxed) => {
                match tokio::time::timeout(RPC_STALL, s.queue.send(m)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(true),
                    Err(_) => Err(false),
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(false),
        };
        match sent {
            Ok(()) => s.stalled.store(false, Ordering::Relaxed),
            Err(true) => gone.push(s.id),
            Err(false) => {
                s.stalled.store(true, Ordering::Relaxed);
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if !gone.is_empty() {
        if let Ok(mut list) = subscribers.lock() {
            list.retain(|s| !gone.contains(&s.id));
        }
    }
}

/// `hush jsonrpc`: one client, on standard input and output.
pub fn jsonrpc(app: App) -> Result<()> {
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let subscribers: Subscribers = Arc::default();
        let (calls, from_clients) = mpsc::channel::<ToCore>(1);
        let client = client(BufReader::new(tokio::io::stdin()), tokio::io::stdout(), calls, &subscribers);
        let core = core(app, from_clients, subscribers.clone());
        tokio::pin!(core, client);
        tokio::select! {
            // The core failed (no connection at start): nothing to serve.
            served = &mut core => served,
            // Standard input closed: the core finishes (a last sync, a
            // clean close) and ends.
            () = &mut client => core.await,
        }
    })
}

/// `hush daemon --socket PATH`: clients on a Unix socket (mode 0600)
/// until SIGTERM or SIGINT.
pub fn daemon(app: App, socket: &Path) -> Result<()> {
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let listener = bind(socket)?;
        eprintln!("serving JSON-RPC on {} (one object per line)", socket.display());
        let subscribers: Subscribers = Arc::default();
        let (calls, from_clients) = mpsc::channel::<ToCore>(MAX_RPC_CLIENTS);
        let accepting = {
            let subscribers = subscribers.clone();
            async move {
                let open = Arc::new(tokio::sync::Semaphore::new(MAX_RPC_CLIENTS));
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let (read, mut write) = stream.into_split();
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        let busy = RpcError::new(
                            code::FAILED,
                            format!("this daemon serves {MAX_RPC_CLIENTS} clients at once; try again later"),
                        );
                        let _ = write.write_all(format!("{}\n", busy.response(None)).as_bytes()).await;
                        continue;
                    };
                    let calls = calls.clone();
                    let subscribers = subscribers.clone();
                    tokio::spawn(async move {
                        client(BufReader::new(read), write, calls, &subscribers).await;
                        drop(permit);
                    });
                }
            }
        };
        let result = tokio::select! {
            served = core(app, from_clients, subscribers) => served,
            () = accepting => Ok(()),
            () = shutdown() => Ok(()),
        };
        let _ = std::fs::remove_file(socket);
        result
    })
}

/// Binds `socket` with mode 0600 from the start: bound in a private
/// directory beside it, then moved into place. A socket left by a daemon
/// that died is replaced; one a live daemon answers on is not.
fn bind(socket: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("{} is in use by a running daemon", socket.display());
        }
        let meta = std::fs::symlink_metadata(socket).with_context(|| socket.display().to_string())?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            bail!("{} exists and is not a socket; choose another path", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing the stale {}", socket.display()))?;
    }
    let parent = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = socket.file_name().context("the socket path names no file")?;
    let private = parent.join(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private).with_context(|| private.display().to_string())?;
    let inside = private.join("socket");
    let bound = (|| -> Result<tokio::net::UnixListener> {
        let listener =
            tokio::net::UnixListener::bind(&inside).with_context(|| format!("binding {}", socket.display()))?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, socket).with_context(|| format!("moving the socket to {}", socket.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    bound
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Owns the app and the connection: syncs at start and on every push,
/// runs the calls, tells every client what happened. Ends when every
/// client is gone (`jsonrpc`: standard input closed).
async fn core(mut app: App, mut calls: mpsc::Receiver<ToCore>, subscribers: Subscribers) -> Result<()> {
    let mut conn = Some(app.connect().await.map_err(app_error)?);
    let mut pushes = conn.as_ref().map(chat::push_wakeups);
    let mut retry_in = Duration::from_secs(1);
    let mut retry_at = tokio::time::Instant::now();
    let mut purge = tokio::time::interval(CLIENT_PURGE_INTERVAL);
    if let Some(c) = conn.as_ref() {
        let news = app.sync(c).await;
        tell(&app, &subscribers, news).await;
    }
    loop {
        let pushed = async {
            match pushes.as_mut() {
                Some(p) => p.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = purge.tick() => {
                if let Err(e) = app.purge_expired() {
                    tracing::warn!("deleting expired messages: {e}");
                }
            }
            next = calls.recv() => {
                let Some((call, reply)) = next else { break };
                if conn.is_none() {
                    // Lost: one attempt now, for the caller.
                    if let Ok(c) = app.connect().await {
                        pushes = Some(chat::push_wakeups(&c));
                        conn = Some(c);
                    }
                }
                let answer = match conn.as_mut() {
                    None => Err(RpcError::new(code::UNREACHABLE, "the server cannot be reached; retry later")),
                    Some(c) => Rpc::call(&mut app, c, &call).await,
                };
                let id = call.id.clone().unwrap_or(Value::Null);
                let response = match answer {
                    Ok(out) => {
                        for e in &out.entries {
                            broadcast(&subscribers, &rpc::notification(&app, e)).await;
                        }
                        rpc::result(&id, out.result)
                    }
                    Err(e) => {
                        if e.code == code::UNREACHABLE {
                            conn = None;
                            pushes = None;
                        }
                        e.response(Some(&id))
                    }
                };
                let _ = reply.send(response);
            }
            wake = pushed => {
                match (wake, conn.as_ref()) {
                    (Some(()), Some(c)) => {
                        let news = app.sync(c).await;
                        tell(&app, &subscribers, news).await;
                    }
                    _ => {
                        // The push stream ended: the connection is gone.
                        tracing::warn!("lost the connection to the server; reconnecting");
                        conn = None;
                        pushes = None;
                        retry_at = tokio::time::Instant::now();
                    }
                }
            }
            () = tokio::time::sleep_until(retry_at), if conn.is_none() => {
                match app.connect().await {
                    Ok(c) => {
                        pushes = Some(chat::push_wakeups(&c));
                        let news = app.sync(&c).await;
                        tell(&app, &subscribers, news).await;
                        conn = Some(c);
                        retry_in = Duration::from_secs(1);
                    }
                    Err(e) => {
                        tracing::warn!("reconnecting: {e}");
                        retry_at = tokio::time::Instant::now() + retry_in;
                        retry_in = (retry_in * 2).min(MAX_RECONNECT_WAIT);
                    }
                }
            }
        }
    }
    // Anything that arrived meanwhile, then a clean close.
    if let Some(c) = conn {
        let news = app.sync(&c).await;
        tell(&app, &subscribers, news).await;
        c.close().await;
    }
    Ok(())
}

/// Notifies every client of a sync's news (or logs why it failed).
async fn tell(
    app: &App,
    subscribers: &Subscribers,
    news: Result<Vec<hush::client::app::Entry>, hush::client::app::AppError>,
) {
    match news {
        Ok(entries) => {
            for e in &entries {
                broadcast(subscribers, &rpc::notification(app, e)).await;
            }
        }
        Err(e) => tracing::warn!("sync failed: {e}"),
    }
}

/// One line as read.
enum Line {
    Data,
    TooLong,
    End,
}

/// Reads up to the next newline into `buf`, keeping at most
/// [`MAX_RPC_LINE`] bytes: a longer line is read to its end and thrown
/// away, never held.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::End,
                (false, false) => Line::Data,
            });
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if !too_long {
            if buf.len() + take > MAX_RPC_LINE {
                too_long = true;
                buf.clear();
                buf.shrink_to(4096);
            } else {
                buf.extend_from_slice(available.get(..take).unwrap_or_default());
            }
        }
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(if too_long { Line::TooLong } else { Line::Data });
        }
    }
}

/// Serves one client until it closes its end.
async fn client<R, W>(mut reader: R, writer: W, calls: mpsc::Sender<ToCore>, subscribers: &Subscribers)
where
    R: AsyncBufRead + AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, queue) = mpsc::channel::<Value>(RPC_CLIENT_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut list) = subscribers.lock() {
        list.push(Subscriber { id, queue: out.clone(), dropped: dropped.clone(), stalled: Arc::default() });
    }
    let writing = tokio::spawn(write_out(writer, queue, dropped));
    let mut line = Vec::new();
    loop {
        let answer = match read_line(&mut reader, &mut line).await {
            Err(_) | Ok(Line::End) => break,
            Ok(Line::TooLong) => Some(
                RpcError::new(code::INVALID_REQUEST, format!("a request is at most {MAX_RPC_LINE} bytes on one line"))
                    .response(None),
            ),
            Ok(Line::Data) if line.iter().all(u8::is_ascii_whitespace) => None,
            Ok(Line::Data) => match rpc::parse(&line) {
                Err((id, e)) => Some(e.response(id.as_ref())),
                Ok(call) => {
                    let wants_answer = call.id.is_some();
                    let (reply, answered) = oneshot::channel();
                    if calls.send((call, reply)).await.is_err() {
                        break;
                    }
                    match answered.await {
                        Ok(response) if wants_answer => Some(response),
                        Ok(_) => None,
                        Err(_) => break,
                    }
                }
            },
        };
        if let Some(answer) = answer {
            if out.send(answer).await.is_err() {
                break;
            }
        }
    }
    // Off the list: with no sender left, the writer writes what is
    // queued and ends.
    drop(out);
    if let Ok(mut list) = subscribers.lock() {
        list.retain(|s| s.id != id);
    }
    let _ = writing.await;
}

/// Writes the queue out, one object per line, saying first how many
/// notifications were dropped since the last write.
async fn write_out<W: AsyncWrite + Unpin>(mut writer: W, mut queue: mpsc::Receiver<Value>, dropped: Arc<AtomicU64>) {
    while let Some(message) = queue.recv().await {
        let lost = dropped.swap(0, Ordering::Relaxed);
        let mut text = String::new();
        if lost > 0 {
            text.push_str(&rpc::dropped(lost).to_string());
            text.push('\n');
        }
        text.push_str(&message.to_string());
        text.push('\n');
        if writer.write_all(text.as_bytes()).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
}

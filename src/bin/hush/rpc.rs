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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hush::client::app::App;
use hush::client::rpc::{self, code, Call, Rpc, RpcError};
use hush::client::Connection;
use hush::limits::{
    CLIENT_PURGE_INTERVAL, MAX_RPC_CLIENTS, MAX_RPC_LINE, RPC_CLIENT_QUEUE, RPC_CLIENT_QUEUE_BYTES, RPC_STALL,
};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::chat;

/// Longest wait between two attempts to reconnect.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// A request on its way to the core, with where its answer goes.
type ToCore = (Call, oneshot::Sender<Value>);

/// One line for a client (without its newline), serialized once however
/// many clients it goes to.
type Line = Arc<str>;

/// What a client may have waiting, and what it has.
#[derive(Clone)]
struct Queue {
    items: mpsc::Sender<Line>,
    /// Bytes waiting (the writer takes off what it wrote).
    bytes: Arc<AtomicUsize>,
}

impl Queue {
    /// Queues `line` if it fits (items and bytes); `Err(false)` if it does
    /// not, `Err(true)` if the client is gone.
    fn try_put(&self, line: &Line) -> Result<(), bool> {
        if self.bytes.load(Ordering::Relaxed) + line.len() > RPC_CLIENT_QUEUE_BYTES {
            return Err(false);
        }
        match self.items.try_send(line.clone()) {
            Ok(()) => {
                self.bytes.fetch_add(line.len(), Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(true),
        }
    }

    /// Queues `line`, waiting for room (an answer: only its client waits).
    async fn put(&self, line: Line) -> Result<(), ()> {
        let len = line.len();
        self.items.send(line).await.map_err(|_| ())?;
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Whether it is at most half full: a client that stalled reads again.
    fn drained(&self) -> bool {
        self.items.capacity() * 2 >= RPC_CLIENT_QUEUE
            && self.bytes.load(Ordering::Relaxed) * 2 <= RPC_CLIENT_QUEUE_BYTES
    }
}

/// Where the core sends one client's notifications.
#[derive(Clone)]
struct Subscriber {
    id: u64,
    queue: Queue,
    /// Notifications dropped since the last one it was sent.
    dropped: Arc<AtomicU64>,
    /// It let a notification wait [`RPC_STALL`]: no more waiting for it
    /// until its queue is half empty again.
    stalled: Arc<AtomicBool>,
}

/// Numbers the clients, to take one off the list when it leaves.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(0);

type Subscribers = Arc<Mutex<Vec<Subscriber>>>;

/// Tells every client. A client whose queue is full gets until one
/// deadline ([`RPC_STALL`] from now, shared by all of them) to make room,
/// once; one that does not read is then skipped (its notifications
/// dropped and counted) until its queue is half empty. The count goes
/// out, as a `dropped` notification, right before the next one it gets.
async fn broadcast(subscribers: &Subscribers, message: &Value) {
    let list: Vec<Subscriber> = match subscribers.lock() {
        Ok(list) => list.clone(),
        Err(_) => return,
    };
    let line: Line = Arc::from(message.to_string());
    let deadline = tokio::time::Instant::now() + RPC_STALL;
    let mut gone = Vec::new();
    for s in list {
        if s.stalled.load(Ordering::Relaxed) {
            if !s.queue.drained() {
                s.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            s.stalled.store(false, Ordering::Relaxed);
        }
        let lost = s.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let notice: Line = Arc::from(rpc::dropped(lost).to_string());
            if s.queue.try_put(&notice).is_err() {
                s.dropped.fetch_add(lost, Ordering::Relaxed);
            }
        }
        let sent = match s.queue.try_put(&line) {
            Err(false) if s.queue.bytes.load(Ordering::Relaxed) + line.len() <= RPC_CLIENT_QUEUE_BYTES => {
                match tokio::time::timeout_at(deadline, s.queue.put(line.clone())).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(())) => Err(true),
                    Err(_) => Err(false),
                }
            }
            other => other,
        };
        match sent {
            Ok(()) => {}
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
            // The core failed: nothing to serve.
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
        let (listener, ours) = bind(socket)?;
        eprintln!("serving JSON-RPC on {} (one object per line)", socket.display());
        let subscribers: Subscribers = Arc::default();
        let (calls, from_clients) = mpsc::channel::<ToCore>(MAX_RPC_CLIENTS);
        let accepting = {
            let subscribers = subscribers.clone();
            async move {
                let open = Arc::new(tokio::sync::Semaphore::new(MAX_RPC_CLIENTS));
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of descriptors, say: not a busy loop.
                            tracing::warn!("accepting a client: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
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
        // Only our own socket: another daemon may have taken the path.
        if file_id(socket) == Some(ours) {
            let _ = std::fs::remove_file(socket);
        }
        result
    })
}

/// The device and inode of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Binds `socket` with mode 0600 from the start: bound in a private
/// directory of a random name beside it, then moved into place. A socket
/// left by a daemon that died is replaced; one a live daemon answers on
/// is not, nor anything that is not a socket. Returns the listener and
/// the socket's file id (to remove only it at the end).
fn bind(socket: &Path) -> Result<(tokio::net::UnixListener, (u64, u64))> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            bail!("{} exists and is not a socket; choose another path", socket.display());
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("{} is in use by a running daemon", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing the stale {}", socket.display()))?;
    }
    let parent = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = socket.file_name().context("the socket path names no file")?;
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let private = parent.join(format!(".{}.{hex}", name.to_string_lossy()));
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
    let listener = bound?;
    let id = file_id(socket).context("the socket vanished as it was made")?;
    Ok((listener, id))
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

/// A connection being made, off the core (so calls that need no server
/// are answered meanwhile).
type Connecting = tokio::task::JoinHandle<Result<Connection, hush::client::ClientError>>;

fn start_connecting(app: &App) -> Option<Connecting> {
    match app.connection_parts() {
        Ok((address, credentials)) => {
            Some(tokio::spawn(async move { Connection::connect_with(&address, Some(credentials)).await }))
        }
        Err(e) => {
            tracing::warn!("cannot connect: {e}");
            None
        }
    }
}

/// Owns the app and the connection: connects in the background (and
/// again whenever the connection is lost), syncs once connected and on
/// every push, runs the calls (those that need the server fail at once
/// with -32004 while it is away), tells every client what happened. Ends
/// when every client is gone (`jsonrpc`: standard input closed).
async fn core(mut app: App, mut calls: mpsc::Receiver<ToCore>, subscribers: Subscribers) -> Result<()> {
    let mut conn: Option<Connection> = None;
    let mut pushes: Option<mpsc::Receiver<()>> = None;
    let mut connecting = start_connecting(&app);
    let mut retry_in = Duration::from_secs(1);
    let mut retry_at = tokio::time::Instant::now() + retry_in;
    let mut purge = tokio::time::interval(CLIENT_PURGE_INTERVAL);
    loop {
        let pushed = async {
            match pushes.as_mut() {
                Some(p) => p.recv().await,
                None => std::future::pending().await,
            }
        };
        let idle = conn.is_none() && connecting.is_none();
        let connected = async {
            match connecting.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = purge.tick() => {
                if let Err(e) = app.purge_expired() {
                    tracing::warn!("deleting expired messages: {e}");
                }
            }
            made = connected => {
                connecting = None;
                match connected_to(&mut app, &subscribers, made).await {
                    Some((c, p)) => {
                        (conn, pushes) = (Some(c), Some(p));
                        retry_in = Duration::from_secs(1);
                    }
                    None => {
                        retry_at = tokio::time::Instant::now() + retry_in;
                        retry_in = (retry_in * 2).min(MAX_RECONNECT_WAIT);
                    }
                }
            }
            () = tokio::time::sleep_until(retry_at), if idle => {
                connecting = start_connecting(&app);
                if connecting.is_none() {
                    retry_at = tokio::time::Instant::now() + MAX_RECONNECT_WAIT;
                }
            }
            next = calls.recv() => {
                let Some((call, reply)) = next else { break };
                // A call that needs the server while a connection is being
                // made (at start, say) waits for that attempt; otherwise it
                // fails at once while the server is away.
                if conn.is_none() && !rpc::LOCAL_METHODS.contains(&call.method.as_str()) {
                    if let Some(task) = connecting.take() {
                        match connected_to(&mut app, &subscribers, task.await).await {
                            Some((c, p)) => {
                                (conn, pushes) = (Some(c), Some(p));
                                retry_in = Duration::from_secs(1);
                            }
                            None => retry_at = tokio::time::Instant::now() + retry_in,
                        }
                    }
                }
                let answer = Rpc::call(&mut app, conn.as_mut(), &call).await;
                let id = call.id.clone().unwrap_or(Value::Null);
                let response = match answer {
                    Ok(out) => {
                        for e in &out.entries {
                            broadcast(&subscribers, &rpc::notification(&app, e)).await;
                        }
                        rpc::result(&id, out.result)
                    }
                    Err(e) => {
                        if e.code == code::UNREACHABLE && conn.is_some() {
                            // The connection broke under the call.
                            conn = None;
                            pushes = None;
                            retry_at = tokio::time::Instant::now();
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
        }
    }
    if let Some(task) = connecting {
        task.abort();
    }
    // Anything that arrived meanwhile, then a clean close.
    if let Some(c) = conn {
        let news = app.sync(&c).await;
        tell(&app, &subscribers, news).await;
        c.close().await;
    }
    Ok(())
}

/// A connection attempt's end: checked, pushes listened to, and what
/// arrived while away synced and told. `None` (logged) if it failed.
async fn connected_to(
    app: &mut App,
    subscribers: &Subscribers,
    made: Result<Result<Connection, hush::client::ClientError>, tokio::task::JoinError>,
) -> Option<(Connection, mpsc::Receiver<()>)> {
    let checked = match made {
        Ok(Ok(c)) => app.check_connection(&c).map(|()| c).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match checked {
        Ok(c) => {
            let pushes = chat::push_wakeups(&c);
            let news = app.sync(&c).await;
            tell(app, subscribers, news).await;
            Some((c, pushes))
        }
        Err(e) => {
            tracing::warn!("connecting to the server: {e}; retrying");
            None
        }
    }
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
enum Read {
    Data,
    TooLong,
    End,
}

/// Reads up to the next newline into `buf`, keeping at most
/// [`MAX_RPC_LINE`] bytes: a longer line is read to its end and thrown
/// away, never held.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Read> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Read::TooLong,
                (false, true) => Read::End,
                (false, false) => Read::Data,
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
            return Ok(if too_long { Read::TooLong } else { Read::Data });
        }
    }
}

/// Serves one client until it closes its end.
async fn client<R, W>(mut reader: R, writer: W, calls: mpsc::Sender<ToCore>, subscribers: &Subscribers)
where
    R: AsyncBufRead + AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (items, waiting) = mpsc::channel::<Line>(RPC_CLIENT_QUEUE);
    let queue = Queue { items, bytes: Arc::default() };
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let dropped = Arc::new(AtomicU64::new(0));
    if let Ok(mut list) = subscribers.lock() {
        list.push(Subscriber { id, queue: queue.clone(), dropped: dropped.clone(), stalled: Arc::default() });
    }
    let writing = tokio::spawn(write_out(writer, waiting, queue.bytes.clone()));
    let mut line = Vec::new();
    loop {
        let answer = match read_line(&mut reader, &mut line).await {
            Err(_) | Ok(Read::End) => break,
            Ok(Read::TooLong) => Some(
                RpcError::new(code::INVALID_REQUEST, format!("a request is at most {MAX_RPC_LINE} bytes on one line"))
                    .response(None),
            ),
            Ok(Read::Data) if line.iter().all(u8::is_ascii_whitespace) => None,
            Ok(Read::Data) => match rpc::parse(&line) {
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
            // A client that was not reading learns what it missed before
            // its next answer, too.
            let lost = dropped.swap(0, Ordering::Relaxed);
            if lost > 0 && queue.put(Arc::from(rpc::dropped(lost).to_string())).await.is_err() {
                break;
            }
            if queue.put(Arc::from(answer.to_string())).await.is_err() {
                break;
            }
        }
    }
    // Off the list: with no sender left, the writer writes what is
    // queued and ends.
    drop(queue);
    if let Ok(mut list) = subscribers.lock() {
        list.retain(|s| s.id != id);
    }
    let _ = writing.await;
}

/// Writes the queue out, one object per line.
async fn write_out<W: AsyncWrite + Unpin>(mut writer: W, mut queue: mpsc::Receiver<Line>, bytes: Arc<AtomicUsize>) {
    while let Some(line) = queue.recv().await {
        let written = async {
            writer.write_all(line.as_bytes()).await?;
            writer.write_all(b"\n").await?;
            writer.flush().await
        };
        let ok = written.await.is_ok();
        bytes.fetch_sub(line.len(), Ordering::Relaxed);
        if !ok {
            return;
        }
    }
}

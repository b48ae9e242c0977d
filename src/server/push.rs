//! Live delivery: which connections are online for which device, and one
//! push stream per connection.
//!
//! Each connection has a bounded queue of [`PUSH_QUEUE`] encoded frames
//! and a task that writes them to its unidirectional push stream. Fan-out
//! never waits: a frame for a full queue is dropped and the connection is
//! marked, and once its task catches up it sends one `Resync`, telling the
//! client to fetch from its cursors. A slow or stalled reader therefore
//! costs at most its queue, and never slows the sender or other members.
//! Ciphertexts up to [`PUSH_INLINE_THRESHOLD`] ride inside the push; larger ones
//! are announced and fetched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::auth::DeviceId;
use crate::delivery::Notification;
use crate::limits::{PUSH_QUEUE, PUSH_WRITE_BATCH};
use crate::wire::Push;

/// Largest ciphertext pushed inline (bounds queued bytes per connection to
/// about `PUSH_QUEUE * PUSH_INLINE_THRESHOLD`).
pub const PUSH_INLINE_THRESHOLD: usize = 4096;

/// An encoded push frame, shared by every queue it is in (written to each
/// stream without a copy).
type Frame = Bytes;

struct Queue {
    id: u64,
    tx: mpsc::Sender<Frame>,
    overflowed: Arc<AtomicBool>,
    conn: quinn::Connection,
}

/// Online connections by device.
#[derive(Default)]
pub struct Registry {
    online: Mutex<HashMap<DeviceId, Vec<Queue>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

/// A connection's registration; unregisters on drop.
pub struct Online {
    registry: Arc<Registry>,
    device: DeviceId,
    id: u64,
}

impl Drop for Online {
    fn drop(&mut self) {
        let mut online = self.registry.online.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = online.get_mut(&self.device) {
            list.retain(|q| q.id != self.id);
            if list.is_empty() {
                online.remove(&self.device);
            }
        }
    }
}

impl Registry {
    /// Registers a connection of `device` and starts its push task.
    pub fn connect(self: &Arc<Self>, device: DeviceId, conn: quinn::Connection) -> Online {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(push_task(conn.clone(), rx, overflowed.clone()));
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        online.entry(device).or_default().push(Queue { id, tx, overflowed, conn });
        Online { registry: self.clone(), device, id }
    }

    /// Queues the pushes for these notifications, and closes the
    /// connections of revoked devices. Never blocks.
    pub fn dispatch(&self, notifications: &[Notification]) {
        for n in notifications {
            let (frame, recipients): (Option<Vec<u8>>, &[DeviceId]) = match n {
                Notification::Revoked { device } => {
                    let online = self.online.lock().unwrap_or_else(|p| p.into_inner());
                    for q in online.get(device).map(Vec::as_slice).unwrap_or_default() {
                        q.conn.close(quinn::VarInt::from_u32(crate::wire::close::REVOKED), b"this device was revoked");
                    }
                    continue;
                }
                Notification::Message { group, seq, head, message, recipients } => {
                    let ciphertext = (message.len() <= PUSH_INLINE_THRESHOLD).then(|| message.clone());
                    let push = Push::Message { group: group.clone(), seq: *seq, head: *head, ciphertext };
                    (push.encode_framed().ok(), recipients)
                }
                Notification::Welcome { recipient } => {
                    (Push::Welcome.encode_framed().ok(), std::slice::from_ref(recipient))
                }
            };
            let Some(frame) = frame else { continue };
            let frame = Bytes::from(frame);
            let online = self.online.lock().unwrap_or_else(|p| p.into_inner());
            for device in recipients {
                for q in online.get(device).map(Vec::as_slice).unwrap_or_default() {
                    if q.tx.try_send(frame.clone()).is_err() {
                        super::metrics::metrics().push_dropped();
                        q.overflowed.store(true, Ordering::Release);
                    }
                }
            }
        }
    }
}

impl Registry {
    /// Whether any connection is online (else other nodes' messages need
    /// not be read at all).
    fn any_online(&self) -> bool {
        !self.online.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Tells every connection to fetch from its cursors: pushes may have
    /// been missed.
    pub fn resync_all(&self) {
        let Ok(frame) = Push::Resync.encode_framed() else { return };
        let frame = Bytes::from(frame);
        let online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        for q in online.values().flatten() {
            if q.tx.try_send(frame.clone()).is_err() {
                q.overflowed.store(true, Ordering::Release);
            }
        }
    }
}

/// Pushes what other nodes sharing the database stored to this node's
/// connections (see [`crate::db::pg::listen`]): a message is read from the log,
/// with the devices that may see it; a revoked device's connections are
/// closed once the devices table says it is revoked (or gone). Ends when
/// the listener does.
pub async fn from_other_nodes(
    mut events: mpsc::Receiver<crate::db::pg::listen::Event>,
    engine: super::engine::Engine,
    registry: Arc<Registry>,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    use crate::db::pg::listen::{Event, Notice};
    let mut listening = Some(listening);
    while let Some(event) = events.recv().await {
        let notification = match event {
            Event::Listening => {
                // The first time, the server starts serving; if it did not
                // wait that long, or any later time, notices may have been
                // missed.
                let waited = listening.take().is_some_and(|l| l.send(()).is_ok());
                if !waited {
                    tracing::info!("listening for other nodes again; asking connections to resync");
                    registry.resync_all();
                }
                continue;
            }
            Event::Lost => {
                tracing::info!("other nodes' pushes may have been missed; asking connections to resync");
                registry.resync_all();
                continue;
            }
            Event::Notice(Notice::Welcome { recipient }) => Notification::Welcome { recipient },
            Event::Notice(Notice::Revoked { device }) => {
                // Closing connections is the one thing a notice could make
                // a node do to a device: only if the devices table agrees.
                match engine.device(device).await {
                    Ok(Some(record)) if record.revoked_at.is_none() => {
                        tracing::warn!("ignoring a revocation notice for a device that is not revoked");
                        continue;
                    }
                    Ok(_) => Notification::Revoked { device },
                    Err(e) => {
                        // Fail closed: the device may reconnect, and the
                        // connection's own check decides then.
                        tracing::warn!("checking a revoked device failed: {e}; closing its connections");
                        Notification::Revoked { device }
                    }
                }
            }
            Event::Notice(Notice::Message { group, seq }) => {
                if !registry.any_online() {
                    continue;
                }
                match engine.stored(group, seq).await {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!("reading another node's message failed: {e}");
                        registry.resync_all();
                        continue;
                    }
                }
            }
        };
        registry.dispatch(std::slice::from_ref(&notification));
    }
}

/// Writes a connection's queued frames to its push stream: all that are
/// waiting (up to [`PUSH_WRITE_BATCH`]) in one write, so a busy stream
/// goes out in full packets rather than one wake-up of the connection per
/// frame.
async fn push_task(conn: quinn::Connection, mut rx: mpsc::Receiver<Frame>, overflowed: Arc<AtomicBool>) {
    let resync = match Push::Resync.encode_framed() {
        Ok(f) => Bytes::from(f),
        Err(_) => return,
    };
    let mut stream = None;
    let mut frames = Vec::with_capacity(PUSH_WRITE_BATCH);
    while rx.recv_many(&mut frames, PUSH_WRITE_BATCH).await > 0 {
        if stream.is_none() {
            match conn.open_uni().await {
                Ok(s) => stream = Some(s),
                Err(_) => return,
            }
        }
        let Some(s) = stream.as_mut() else { return };
        if overflowed.swap(false, Ordering::AcqRel) {
            super::metrics::metrics().push_resynced();
            frames.push(resync.clone());
        }
        if s.write_all_chunks(&mut frames).await.is_err() {
            return;
        }
        frames.clear();
    }
}

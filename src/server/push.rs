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

use tokio::sync::mpsc;

use crate::auth::DeviceId;
use crate::delivery::Notification;
use crate::limits::PUSH_QUEUE;
use crate::wire::Push;

/// Largest ciphertext pushed inline (bounds queued bytes per connection to
/// about `PUSH_QUEUE * PUSH_INLINE_THRESHOLD`).
pub const PUSH_INLINE_THRESHOLD: usize = 4096;

type Frame = Arc<Vec<u8>>;

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
                Notification::Message { group, seq, message, recipients } => {
                    let ciphertext = (message.len() <= PUSH_INLINE_THRESHOLD).then(|| message.clone());
                    (Push::Message { group: group.clone(), seq: *seq, ciphertext }.encode_framed().ok(), recipients)
                }
                Notification::Welcome { recipient } => {
                    (Push::Welcome.encode_framed().ok(), std::slice::from_ref(recipient))
                }
            };
            let Some(frame) = frame else { continue };
            let frame = Arc::new(frame);
            let online = self.online.lock().unwrap_or_else(|p| p.into_inner());
            for device in recipients {
                for q in online.get(device).map(Vec::as_slice).unwrap_or_default() {
                    if q.tx.try_send(frame.clone()).is_err() {
                        q.overflowed.store(true, Ordering::Release);
                    }
                }
            }
        }
    }
}

async fn push_task(conn: quinn::Connection, mut rx: mpsc::Receiver<Frame>, overflowed: Arc<AtomicBool>) {
    let resync = match Push::Resync.encode_framed() {
        Ok(f) => f,
        Err(_) => return,
    };
    let mut stream = None;
    while let Some(frame) = rx.recv().await {
        if stream.is_none() {
            match conn.open_uni().await {
                Ok(s) => stream = Some(s),
                Err(_) => return,
            }
        }
        let Some(s) = stream.as_mut() else { return };
        if s.write_all(&frame).await.is_err() {
            return;
        }
        if overflowed.swap(false, Ordering::AcqRel) && s.write_all(&resync).await.is_err() {
            return;
        }
    }
}

//! Live pushes across nodes: `NOTIFY` wake-ups and the node that LISTENs.
//!
//! A committing write unit sends one [`Notice`] per notification on
//! [`CHANNEL`]; PostgreSQL delivers them to every listening connection
//! once the transaction commits, in commit order. Each node keeps one
//! connection LISTENing ([`run`]) and hands every notice that another node
//! sent to its own push code, which reads the message from the log.
//! Notices carry a group id and a sequence, or a device key: never message
//! bytes.
//!
//! A node serves clients only once it listens ([`Event::Listening`]; see
//! `server::Server::run`). When the listening connection is lost, some
//! notices may have been missed: the node reconnects (after
//! [`RECONNECT_DELAY`]) and, listening again, tells every connection it
//! serves to resync from its cursors, which is how clients catch up from
//! the log.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::Target;
use crate::auth::DeviceId;
use crate::delivery::Notification;

/// The `LISTEN`/`NOTIFY` channel.
pub const CHANNEL: &str = "hush";

/// The `application_name` of a node's listening connection.
pub const APPLICATION_NAME: &str = "hushd-listen";

pub use crate::limits::{LISTEN_RECONNECT_DELAY as RECONNECT_DELAY, NOTICE_QUEUE};

/// What one node tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A message was stored in `group` at `seq`.
    Message { group: Vec<u8>, seq: u64 },
    /// A Welcome waits for `recipient`.
    Welcome { recipient: DeviceId },
    /// `device` was revoked: close its connections.
    Revoked { device: DeviceId },
}

impl Notice {
    /// The notice for a notification (dropping the message bytes).
    pub fn of(n: &Notification) -> Self {
        match n {
            Notification::Message { group, seq, .. } => Self::Message { group: group.clone(), seq: *seq },
            Notification::Welcome { recipient } => Self::Welcome { recipient: *recipient },
            Notification::Revoked { device } => Self::Revoked { device: *device },
        }
    }

    /// `NODE:m:GROUP:SEQ`, `NODE:w:DEVICE` or `NODE:r:DEVICE`, in hex
    /// (a `NOTIFY` payload is text, at most 8000 bytes; a group id is at
    /// most 255 bytes).
    pub fn encode(&self, node: u64) -> String {
        match self {
            Self::Message { group, seq } => format!("{node:016x}:m:{}:{seq}", hex(group)),
            Self::Welcome { recipient } => format!("{node:016x}:w:{}", hex(&recipient.0)),
            Self::Revoked { device } => format!("{node:016x}:r:{}", hex(&device.0)),
        }
    }

    /// The sending node and the notice; `None` for anything malformed.
    pub fn decode(text: &str) -> Option<(u64, Self)> {
        let mut parts = text.split(':');
        let node = u64::from_str_radix(parts.next()?, 16).ok()?;
        let kind = parts.next()?;
        let bytes = unhex(parts.next()?)?;
        let notice = match kind {
            "m" => {
                let seq = parts.next()?.parse().ok()?;
                if bytes.is_empty() || bytes.len() > crate::limits::MAX_GROUP_ID {
                    return None;
                }
                Self::Message { group: bytes, seq }
            }
            "w" => Self::Welcome { recipient: DeviceId(bytes.try_into().ok()?) },
            "r" => Self::Revoked { device: DeviceId(bytes.try_into().ok()?) },
            _ => return None,
        };
        parts.next().is_none().then_some((node, notice))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 2 * 256 {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| text.get(at..at + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// What the listener hands the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection listens (again): from now on no notice is missed.
    /// After the first time, notices may have been missed meanwhile.
    Listening,
    /// Another node's notice.
    Notice(Notice),
    /// Notices may have been missed (the connection was lost, or too many
    /// waited): everyone should resync.
    Lost,
}

/// Listens until `events` is closed, reconnecting as needed. Notices this
/// node sent itself (`target.node`) are skipped.
pub async fn run(target: Arc<Target>, events: mpsc::Sender<Event>) {
    let mut config = target.config().clone();
    // Tells this connection apart in `pg_stat_activity`.
    config.application_name(APPLICATION_NAME);
    loop {
        let result = match target.tls() {
            Some(tls) => match config.connect(tls.clone()).await {
                Ok((client, conn)) => listen(&target, client, conn, &events).await,
                Err(e) => Err(e),
            },
            None => match config.connect(tokio_postgres::NoTls).await {
                Ok((client, conn)) => listen(&target, client, conn, &events).await,
                Err(e) => Err(e),
            },
        };
        if events.is_closed() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!("the database closed the LISTEN connection; reconnecting"),
            Err(e) => tracing::warn!("LISTEN connection to the database failed: {e}; reconnecting"),
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// Drives one connection: LISTEN, then forward notices until it ends.
async fn listen<S, T>(
    target: &Target,
    client: tokio_postgres::Client,
    mut conn: tokio_postgres::Connection<S, T>,
    events: &mpsc::Sender<Event>,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let statement = format!("LISTEN {CHANNEL}");
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    let mut subscribed = false;
    loop {
        tokio::select! {
            done = &mut listening, if !subscribed => {
                done?;
                subscribed = true;
                if events.send(Event::Listening).await.is_err() {
                    return Ok(());
                }
                tracing::debug!("listening for other nodes' notices");
            }
            message = std::future::poll_fn(|cx| conn.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let Some((node, notice)) = Notice::decode(n.payload()) else {
                        tracing::warn!("ignoring a malformed notice on channel {CHANNEL}");
                        continue;
                    };
                    if node == target.node {
                        continue;
                    }
                    match events.try_send(Event::Notice(notice)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            if events.send(Event::Lost).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            () = events.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_carry_no_message_bytes() {
        let m =
            Notification::Message { group: vec![1, 2, 0xff], seq: 42, message: vec![9; 100], recipients: Arc::new([]) };
        let text = Notice::of(&m).encode(7);
        assert_eq!(text, "0000000000000007:m:0102ff:42");
        assert_eq!(Notice::decode(&text), Some((7, Notice::Message { group: vec![1, 2, 0xff], seq: 42 })));
        let d = DeviceId([3; 32]);
        for n in [Notice::Welcome { recipient: d }, Notice::Revoked { device: d }] {
            assert_eq!(Notice::decode(&n.encode(u64::MAX)), Some((u64::MAX, n)));
        }
        for bad in ["", "x:m:01:1", "1:m::1", "1:m:0:1", "1:m:01", "1:m:01:1:2", "1:w:01", "1:q:01", "1:m:zz:1"] {
            assert_eq!(Notice::decode(bad), None, "{bad}");
        }
    }
}

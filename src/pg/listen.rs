//! Live pushes across nodes: `NOTIFY` wake-ups and the node that LISTENs.
//!
//! A committing write unit stores one [`Notice`] per notification in the
//! `notices` table and sends, on [`CHANNEL`], one wake-up per row naming
//! only the sending node and the row's id ([`wake_up`]); PostgreSQL
//! delivers them to every listening connection once the transaction
//! commits, in commit order. Each node keeps one connection LISTENing
//! ([`run`]), reads the rows it is woken up for (in batches, in the order
//! heard) and hands the notices another node stored to its own push code,
//! which reads the message from the log.
//!
//! **Trust.** Any role that may connect to the database may LISTEN and
//! NOTIFY on any channel; no table right is needed (issue 29). So a
//! wake-up carries no group id, sequence or device key (a listener learns
//! only that some node committed something), and a node acts on nothing a
//! wake-up says: it reads the `notices` row (only hushd's role may read or
//! write the tables), ignores ids that name no row and rows its own node
//! stored, and the push code checks the authoritative tables again before
//! acting (a message is read from the log, to the devices that were members
//! then; a device's connections are closed only if the devices table says
//! it is revoked). A forged wake-up can at most replay a recent genuine
//! notice (a duplicate push) or cost a lookup. Operators should still let
//! only hushd's role connect (README, PostgreSQL).
//!
//! A node serves clients only once it listens ([`Event::Listening`]; see
//! `server::Server::run`). When the listening connection is lost, some
//! notices may have been missed: the node reconnects (after
//! [`RECONNECT_DELAY`]) and, listening again, tells every connection it
//! serves to resync from its cursors, which is how clients catch up from
//! the log.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Row};

use super::Target;
use crate::auth::DeviceId;
use crate::delivery::Notification;

/// The `LISTEN`/`NOTIFY` channel.
pub const CHANNEL: &str = "hush";

/// The `application_name` of a node's listening connection.
pub const APPLICATION_NAME: &str = "hushd-listen";

pub use crate::limits::{LISTEN_RECONNECT_DELAY as RECONNECT_DELAY, NOTICE_LOOKUP_BATCH, NOTICE_QUEUE};

/// Reads the rows of the notices a batch of wake-ups named.
const LOOKUP: &str = "SELECT id, node, kind, grp, seq, device FROM notices WHERE id = ANY($1)";

/// What one node tells the others (a row of the `notices` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A message was stored in `group` at `seq`.
    Message { group: Vec<u8>, seq: u64 },
    /// A Welcome waits for `recipient`.
    Welcome { recipient: DeviceId },
    /// `device` was revoked: close its connections (once the devices table
    /// confirms it).
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

    /// A row of `notices` (`id, node, kind, grp, seq, device`): its id,
    /// the node that stored it and the notice; `None` if malformed.
    fn from_row(row: &Row) -> Option<(i64, u64, Self)> {
        let id: i64 = row.try_get(0).ok()?;
        let node: i64 = row.try_get(1).ok()?;
        let kind: &str = row.try_get(2).ok()?;
        let group: Option<Vec<u8>> = row.try_get(3).ok()?;
        let seq: Option<i64> = row.try_get(4).ok()?;
        let device: Option<Vec<u8>> = row.try_get(5).ok()?;
        let device = || device.and_then(|d| <[u8; 32]>::try_from(d).ok()).map(DeviceId);
        let notice = match kind {
            "m" => {
                let group = group.filter(|g| !g.is_empty() && g.len() <= crate::limits::MAX_GROUP_ID)?;
                Self::Message { group, seq: u64::try_from(seq?).ok()? }
            }
            "w" => Self::Welcome { recipient: device()? },
            "r" => Self::Revoked { device: device()? },
            _ => return None,
        };
        Some((id, u64::from_le_bytes(node.to_le_bytes()), notice))
    }
}

/// A node id as the `notices.node` column holds it (the same 64 bits).
pub(super) fn node_column(node: u64) -> i64 {
    i64::from_le_bytes(node.to_le_bytes())
}

/// A node id as a wake-up names it.
pub(super) fn node_text(node: u64) -> String {
    format!("{node:016x}")
}

/// The wake-up for row `id` of `node`'s notices, as the committing
/// statement writes it: `NODE:ID` (the node in 16 lowercase hex digits,
/// the row in decimal).
pub fn wake_up_text(node: u64, id: i64) -> String {
    format!("{}:{id}", node_text(node))
}

/// A wake-up's payload ([`wake_up_text`], and only that exact form): the
/// node and the row; `None` for anything else. Nothing in it is taken on
/// trust (see the module doc).
pub fn wake_up(text: &str) -> Option<(u64, i64)> {
    let (node, id) = text.split_once(':')?;
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let decimal = !id.is_empty()
        && id.len() <= 19
        && id.bytes().all(|b| b.is_ascii_digit())
        && (id == "0" || !id.starts_with('0'));
    if node.len() != 16 || !node.bytes().all(hex) || !decimal {
        return None;
    }
    Some((u64::from_str_radix(node, 16).ok()?, id.parse().ok()?))
}

/// The notices of `ids` (in that order, each once) that `rows` hold and
/// another node than `own` stored. Ids naming no row (forged, or deleted
/// by the expiry) are skipped.
pub(super) fn in_order(own: u64, ids: &[i64], rows: &[Row]) -> Vec<Notice> {
    let mut found: HashMap<i64, Notice> = rows
        .iter()
        .filter_map(Notice::from_row)
        .filter(|(_, node, _)| *node != own)
        .map(|(id, _, notice)| (id, notice))
        .collect();
    ids.iter().filter_map(|id| found.remove(id)).collect()
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

/// Drives one connection: LISTEN, then read the notices it is woken up
/// for and forward them, until it ends.
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
    let client = &client;
    let setup = async move {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        client.prepare(LOOKUP).await
    };
    tokio::pin!(setup);
    let mut statement = None;
    // Rows woken up for and not read yet, in the order heard.
    let mut heard: Vec<i64> = Vec::new();
    // The batch being read, if any (one at a time keeps the order).
    type Lookup<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(Vec<i64>, Vec<Row>), tokio_postgres::Error>> + Send + 'a>,
    >;
    let mut lookup: Option<Lookup<'_>> = None;
    loop {
        if let (None, Some(statement)) = (&lookup, &statement) {
            if !heard.is_empty() {
                let ids: Vec<i64> = heard.drain(..heard.len().min(NOTICE_LOOKUP_BATCH)).collect();
                let statement: tokio_postgres::Statement = Clone::clone(statement);
                lookup = Some(Box::pin(async move {
                    let rows = client.query(&statement, &[&ids]).await?;
                    Ok((ids, rows))
                }));
            }
        }
        tokio::select! {
            done = &mut setup, if statement.is_none() => {
                statement = Some(done?);
                if events.send(Event::Listening).await.is_err() {
                    return Ok(());
                }
                tracing::debug!("listening for other nodes' notices");
            }
            read = std::future::poll_fn(|cx| match lookup.as_mut() {
                Some(f) => f.as_mut().poll(cx),
                None => std::task::Poll::Pending,
            }), if lookup.is_some() => {
                lookup = None;
                let (ids, rows) = read?;
                for notice in in_order(target.node, &ids, &rows) {
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
            }
            message = std::future::poll_fn(|cx| conn.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let Some((node, id)) = wake_up(n.payload()) else {
                        tracing::warn!("ignoring a malformed wake-up on channel {CHANNEL} (another role may NOTIFY it)");
                        continue;
                    };
                    if node == target.node {
                        continue;
                    }
                    if heard.len() >= NOTICE_QUEUE {
                        heard.clear();
                        if events.send(Event::Lost).await.is_err() {
                            return Ok(());
                        }
                    }
                    heard.push(id);
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
    fn wake_ups_name_a_node_and_a_row_and_nothing_else() {
        let text = wake_up_text(7, 42);
        assert_eq!(text, "0000000000000007:42");
        assert_eq!(wake_up(&text), Some((7, 42)));
        for (node, id) in [(u64::MAX, 0), (0, i64::MAX), (0xabcdef, 10)] {
            assert_eq!(wake_up(&wake_up_text(node, id)), Some((node, id)));
        }
        assert_eq!(u64::from_le_bytes(node_column(u64::MAX).to_le_bytes()), u64::MAX);
        let device = "03".repeat(32);
        for bad in [
            "".to_string(),
            "7:42".to_string(),
            "0000000000000007:".to_string(),
            "0000000000000007:-1".to_string(),
            "0000000000000007:+1".to_string(),
            "+000000000000007:1".to_string(),
            "000000000000000A:1".to_string(),
            "0000000000000007:07".to_string(),
            "0000000000000007:9223372036854775808".to_string(),
            "0000000000000007:42:1".to_string(),
            "000000000000000x:42".to_string(),
            "0000000000000007:99999999999999999999".to_string(),
            // What notices looked like before issue 29.
            "0000000000000007:m:0102ff:42".to_string(),
            format!("0000000000000007:r:{device}"),
        ] {
            assert_eq!(wake_up(&bad), None, "{bad}");
        }
    }
}

//! Live pushes across nodes: `NOTIFY` wake-ups and the node that LISTENs.
//!
//! A committing write unit stores one [`Notice`] per notification in the
//! `notices` table, numbered by the node (upwards from 1 in each process),
//! and sends, on [`CHANNEL`], one wake-up per row naming only the sending
//! node and that number, authenticated ([`wake_up_text`]); PostgreSQL
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
//! write the tables), ignores numbers that name no row and rows its own
//! node stored, and the push code checks the authoritative tables again
//! before acting (a message is read from the log, to the devices that were
//! members then; a device's connections are closed only if the devices
//! table says it is revoked). And a node takes only wake-ups it can
//! authenticate: each carries an HMAC-SHA-256 tag under a key derived from
//! the server key (which every node of a deployment holds, and the
//! database never sees), and a node's numbers only go up, so a listener
//! takes each number of each node once, in order ([`Heard`]). A role that
//! can merely connect can neither forge a wake-up nor replay one, so it
//! cannot fill a node's queue ([`NOTICE_QUEUE`]) and make every connection
//! resync. Operators should still let only hushd's role connect (README,
//! PostgreSQL).
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
use crate::auth::{DeviceId, Identity, KeyError};
use crate::delivery::Notification;

/// The `LISTEN`/`NOTIFY` channel.
pub const CHANNEL: &str = "hush";

/// The `application_name` of a node's listening connection.
pub const APPLICATION_NAME: &str = "hushd-listen";

pub use crate::limits::{
    LISTEN_RECONNECT_DELAY as RECONNECT_DELAY, MAX_WAKE_NODES, NOTICE_LOOKUP_BATCH, NOTICE_QUEUE, WAKE_UP_FRESHNESS,
};

/// Reads the rows of the notices a batch of wake-ups named (by node and
/// the node's number).
const LOOKUP: &str = "SELECT n.nseq, n.node, n.kind, n.grp, n.seq, n.device FROM notices n
                      JOIN unnest($1::bigint[], $2::bigint[]) AS w(node, nseq)
                      ON n.node = w.node AND n.nseq = w.nseq";

/// The newest number each node gave a row still in `notices`.
const NEWEST: &str = "SELECT node, max(nseq) FROM notices GROUP BY node";

/// What [`WakeKey`] is derived under, from the server key.
pub const WAKE_KEY_LABEL: &[u8] = b"hush wake-ups v1";

/// The key that authenticates wake-ups: HMAC-SHA-256 under a key derived
/// from the server key, so every node of one deployment has it and no one
/// else does (it never leaves the node: tags are computed here, not in
/// SQL).
#[derive(Clone)]
pub struct WakeKey(ring::hmac::Key);

impl std::fmt::Debug for WakeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeKey")
    }
}

impl WakeKey {
    /// The wake-up key of the deployment whose server key is `server_key`.
    pub fn of(server_key: &Identity) -> Result<Self, KeyError> {
        Ok(Self::from_secret(&*server_key.derive(WAKE_KEY_LABEL)?))
    }

    /// The wake-up key from its secret (derived from the server's identity
    /// key under [`WAKE_KEY_LABEL`], kept in the data directory's
    /// `node.secrets` so it outlives the identity key's export).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }
}

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

    /// A row of `notices` (`nseq, node, kind, grp, seq, device`): its
    /// number, the node that stored it and the notice; `None` if malformed.
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

/// Length of a wake-up's tag in hex digits (all of HMAC-SHA-256).
const TAG_HEX: usize = 64;

/// The wake-up for notice number `n` of `node`, sent at `at` (Unix
/// seconds), as the committing statement sends it: `NODE:N:AT:TAG`, the
/// node in 16 lowercase hex digits, the number and the time in decimal, and
/// the HMAC-SHA-256 of `NODE:N:AT` under `key` in 64 lowercase hex digits.
pub fn wake_up_text(key: &WakeKey, node: u64, n: i64, at: u64) -> String {
    let body = format!("{}:{n}:{at}", node_text(node));
    let tag = ring::hmac::sign(&key.0, body.as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{body}:{hex}")
}

/// A wake-up's payload ([`wake_up_text`], and only that exact form, with a
/// tag that verifies under `key`, sent within [`WAKE_UP_FRESHNESS`] of
/// `now`): the node and its number; `None` for anything else. (A wake-up
/// older than that names a row the expiry may have deleted, so a restarted
/// node could not tell it is not news; see [`Heard`].)
pub fn wake_up(key: &WakeKey, text: &str, now: u64) -> Option<(u64, i64)> {
    let (body, tag) = text.rsplit_once(':')?;
    let mut fields = body.split(':');
    let (node, n, at) = (fields.next()?, fields.next()?, fields.next()?);
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let decimal = |d: &str| !d.is_empty() && d.len() <= 19 && d.bytes().all(|b| b.is_ascii_digit());
    if fields.next().is_some()
        || node.len() != 16
        || !node.bytes().all(hex)
        || !decimal(n)
        || n.starts_with('0')
        || !decimal(at)
        || (at.starts_with('0') && at != "0")
        || tag.len() != TAG_HEX
        || !tag.bytes().all(hex)
    {
        return None;
    }
    let tag: Vec<u8> =
        (0..TAG_HEX / 2).map(|i| u8::from_str_radix(tag.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<_>>()?;
    ring::hmac::verify(&key.0, body.as_bytes(), &tag).ok()?;
    let at: u64 = at.parse().ok()?;
    if at.abs_diff(now) > WAKE_UP_FRESHNESS.as_secs() {
        return None;
    }
    Some((u64::from_str_radix(node, 16).ok()?, n.parse().ok()?))
}

/// The newest number taken from each node: a node's wake-ups number
/// upwards, so one that is not newer is a replay (or a duplicate) and is
/// dropped. Remembers at most [`MAX_WAKE_NODES`] nodes (node processes),
/// forgetting the one heard from longest ago.
#[derive(Debug, Default)]
pub struct Heard {
    last: HashMap<u64, (i64, u64)>,
    clock: u64,
}

impl Heard {
    /// Marks every number of `node` up to `n` as taken (what the listener
    /// finds stored when it starts listening).
    pub fn seen(&mut self, node: u64, n: i64) {
        if self.last.get(&node).is_none_or(|(last, _)| *last < n) {
            self.take(node, n);
        }
    }

    /// Whether number `n` of `node` is new (and takes it).
    pub fn take(&mut self, node: u64, n: i64) -> bool {
        self.clock += 1;
        if let Some((last, at)) = self.last.get_mut(&node) {
            if n <= *last {
                return false;
            }
            (*last, *at) = (n, self.clock);
            return true;
        }
        if self.last.len() >= MAX_WAKE_NODES {
            if let Some(oldest) = self.last.iter().min_by_key(|(_, (_, at))| *at).map(|(node, _)| *node) {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(node, (n, self.clock));
        true
    }
}

/// The notices `named` (node and number, in that order, each once) that
/// `rows` hold and another node than `own` stored. Names of no row
/// (deleted by the expiry) are skipped.
pub(super) fn in_order(own: u64, named: &[(u64, i64)], rows: &[Row]) -> Vec<Notice> {
    let mut found: HashMap<(u64, i64), Notice> = rows
        .iter()
        .filter_map(Notice::from_row)
        .filter(|(_, node, _)| *node != own)
        .map(|(n, node, notice)| ((node, n), notice))
        .collect();
    named.iter().filter_map(|name| found.remove(name)).collect()
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
    // Kept across reconnections: a replay is refused whenever it comes.
    let mut taken = Heard::default();
    let mut config = target.config().clone();
    // Tells this connection apart in `pg_stat_activity`.
    config.application_name(APPLICATION_NAME);
    loop {
        let result = match target.tls() {
            Some(tls) => match config.connect(tls.clone()).await {
                Ok((client, conn)) => listen(&target, client, conn, &events, &mut taken).await,
                Err(e) => Err(e),
            },
            None => match config.connect(tokio_postgres::NoTls).await {
                Ok((client, conn)) => listen(&target, client, conn, &events, &mut taken).await,
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
    taken: &mut Heard,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let client = &client;
    let setup = async move {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // Listening now: every wake-up of a row stored from here on is
        // heard, so none numbered up to the newest stored already is
        // genuine news (a replay, after a restart of this process, of one
        // a role recorded). Rows before were missed anyway: this node's
        // clients sync from their cursors at their start, or on the resync
        // a reconnection tells them to.
        let newest = client.query(NEWEST, &[]).await?;
        Ok::<_, tokio_postgres::Error>((client.prepare(LOOKUP).await?, newest))
    };
    tokio::pin!(setup);
    let mut statement = None;
    // Rows woken up for and not read yet, in the order heard.
    let mut heard: Vec<(u64, i64)> = Vec::new();
    let mut warned = false;
    // The batch being read, if any (one at a time keeps the order).
    type Lookup<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(Vec<(u64, i64)>, Vec<Row>), tokio_postgres::Error>> + Send + 'a>,
    >;
    let mut lookup: Option<Lookup<'_>> = None;
    loop {
        if let (None, Some(statement)) = (&lookup, &statement) {
            if !heard.is_empty() {
                let named: Vec<(u64, i64)> = heard.drain(..heard.len().min(NOTICE_LOOKUP_BATCH)).collect();
                let statement: tokio_postgres::Statement = Clone::clone(statement);
                lookup = Some(Box::pin(async move {
                    let nodes: Vec<i64> = named.iter().map(|(node, _)| node_column(*node)).collect();
                    let numbers: Vec<i64> = named.iter().map(|(_, n)| *n).collect();
                    let rows = client.query(&statement, &[&nodes, &numbers]).await?;
                    Ok((named, rows))
                }));
            }
        }
        tokio::select! {
            done = &mut setup, if statement.is_none() => {
                let (prepared, newest) = done?;
                for row in &newest {
                    if let (Ok(node), Ok(Some(n))) = (row.try_get::<_, i64>(0), row.try_get::<_, Option<i64>>(1)) {
                        taken.seen(u64::from_le_bytes(node.to_le_bytes()), n);
                    }
                }
                statement = Some(prepared);
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
                let (named, rows) = read?;
                for notice in in_order(target.node, &named, &rows) {
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
                    let Some((node, number)) = target.wake_key().and_then(|key| wake_up(key, n.payload(), crate::util::now_unix())) else {
                        // Said once per connection: whoever sends them
                        // could otherwise flood the log too.
                        if !warned {
                            warned = true;
                            tracing::warn!(
                                "ignoring wake-ups on channel {CHANNEL} that do not verify (another role may NOTIFY it)"
                            );
                        }
                        continue;
                    };
                    if node == target.node || !taken.take(node, number) {
                        continue;
                    }
                    if heard.len() >= NOTICE_QUEUE {
                        heard.clear();
                        if events.send(Event::Lost).await.is_err() {
                            return Ok(());
                        }
                    }
                    heard.push((node, number));
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

    fn key() -> WakeKey {
        WakeKey::of(&Identity::generate().unwrap()).unwrap()
    }

    #[test]
    fn wake_ups_name_a_node_and_a_number_and_verify_under_the_deployments_key() {
        const NOW: u64 = 1_800_000_000;
        let k = key();
        let text = wake_up_text(&k, 7, 42, NOW);
        assert!(text.starts_with("0000000000000007:42:1800000000:"), "{text}");
        assert_eq!(wake_up(&k, &text, NOW), Some((7, 42)));
        for (node, n) in [(u64::MAX, 1), (0, i64::MAX), (0xabcdef, 10)] {
            assert_eq!(wake_up(&k, &wake_up_text(&k, node, n, NOW), NOW), Some((node, n)));
        }
        assert_eq!(u64::from_le_bytes(node_column(u64::MAX).to_le_bytes()), u64::MAX);
        // Within the freshness either way (clocks differ a little), not
        // beyond: a replay of an old one names a row that may be gone.
        let fresh = WAKE_UP_FRESHNESS.as_secs();
        assert_eq!(wake_up(&k, &text, NOW + fresh), Some((7, 42)));
        assert_eq!(wake_up(&k, &text, NOW - fresh), Some((7, 42)));
        assert_eq!(wake_up(&k, &text, NOW + fresh + 1), None, "too old");
        assert_eq!(wake_up(&k, &text, NOW - fresh - 1), None, "from the future");
        // Another deployment's key (or none: a role that can only connect).
        assert_eq!(wake_up(&key(), &text, NOW), None);
        let tag = &text[text.len() - TAG_HEX..];
        let mut flipped = text.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let device = "03".repeat(32);
        for bad in [
            String::from_utf8(flipped).unwrap(),
            // The same tag on another node, number or time.
            format!("0000000000000008:42:1800000000:{tag}"),
            format!("0000000000000007:43:1800000000:{tag}"),
            format!("0000000000000007:42:1800000001:{tag}"),
            text.to_uppercase(),
            format!("{text}:1"),
            text[..text.len() - 2].to_string(),
            "".to_string(),
            format!("0000000000000007:42:{tag}"),
            format!("0000000000000007:0:1800000000:{tag}"),
            format!("0000000000000007:-1:1800000000:{tag}"),
            format!("0000000000000007:+1:1800000000:{tag}"),
            format!("0000000000000007:042:1800000000:{tag}"),
            format!("0000000000000007:42:01800000000:{tag}"),
            format!("0000000000000007:42::{tag}"),
            format!("0000000000000007:99999999999999999999:1800000000:{tag}"),
            format!("7:42:1800000000:{tag}"),
            // What wake-ups looked like before: `NODE:N:TAG`, `NODE:ID`,
            // and older still.
            format!("0000000000000007:42:{tag}"),
            "0000000000000007:42".to_string(),
            "0000000000000007:m:0102ff:42".to_string(),
            format!("0000000000000007:r:{device}"),
        ] {
            assert_eq!(wake_up(&k, &bad, NOW), None, "{bad}");
        }
    }

    #[test]
    fn each_number_of_each_node_is_taken_once_and_only_upwards() {
        let mut heard = Heard::default();
        assert!(heard.take(1, 5));
        assert!(!heard.take(1, 5), "a replay");
        assert!(!heard.take(1, 4), "an older one");
        assert!(heard.take(1, 9));
        assert!(heard.take(2, 1), "another node numbers on its own");
        // Past the bound, the node heard from longest ago is forgotten.
        for node in 3..(MAX_WAKE_NODES as u64 + 3) {
            assert!(heard.take(node, 1));
        }
        assert!(heard.last.len() <= MAX_WAKE_NODES);
        assert!(!heard.take(MAX_WAKE_NODES as u64 + 2, 1), "the newest is still known");
    }
}

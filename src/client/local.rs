//! hush's own tables in the client's state file, typed: settings,
//! contacts, groups with their read cursors, the messages this device sent,
//! and the history.
//!
//! [`Local`] shares one SQLite connection with the MLS state (openmls's
//! storage provider, see [`super::state`]), so one [`Local::unit`] covers
//! both: processing a message, recording it and moving the cursor past it
//! commit together or not at all (openmls asks its applications for
//! exactly this), and cost one fsync instead of one per statement.

use std::cell::Cell;
use std::rc::Rc;

use rusqlite::{params, Connection, OptionalExtension};

use super::state::StateError;
use crate::auth::AccountId;
use crate::chain::{Claim, Head, Position, SignedHead};

/// Longest contact, group or device name, in bytes.
pub const MAX_NAME: usize = 64;

/// Whether `name` is usable as a contact, group or device name: 1 to
/// [`MAX_NAME`] bytes, no control characters, not only spaces.
pub fn valid_name(name: &str) -> bool {
    !name.trim().is_empty() && name.len() <= MAX_NAME && !name.chars().any(char::is_control)
}

/// What a history line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Something a member wrote.
    Text,
    /// Something that happened (joins, removals, repairs, refusals).
    Event,
    /// The server misbehaved (verifiable delivery): never scrolls away
    /// silently; `hush verify` lists it with its evidence.
    Alarm,
}

impl EntryKind {
    /// As stored, and as `hush read --json` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Text => "text",
            EntryKind::Event => "event",
            EntryKind::Alarm => "alarm",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "text" => EntryKind::Text,
            "alarm" => EntryKind::Alarm,
            _ => EntryKind::Event,
        }
    }
}

/// Heads of a group's chain a device keeps, to compare with the heads
/// other members say they saw: enough for a member that fell this far
/// behind.
pub const MAX_KEPT_HEADS: u64 = 100_000;

/// How long a purge's checkpoint waits for another process reading the
/// state (a running `hush chat` purges every second).
const PURGE_CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// How often (in messages) old heads are pruned.
const PRUNE_EVERY: u64 = 1024;

/// Where a device stands in a group's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRow {
    /// The last message verified, and the head after it.
    pub position: Position,
    /// Verified without a break from after this sequence.
    pub since: u64,
    /// The last head the server signed for this device.
    pub signed: Option<SignedHead>,
}

/// An alarm about a group: the server showed something it should not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmRow {
    pub seq: u64,
    pub body: String,
    /// The evidence, as JSON.
    pub evidence: Option<String>,
    pub time: u64,
}

/// A group as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGroup {
    pub id: Vec<u8>,
    /// `None` until a member told us the name (encrypted).
    pub name: Option<String>,
    /// False once this device left or was removed.
    pub active: bool,
}

/// A Welcome from an account that is not a contact, waiting for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub group: Vec<u8>,
    /// Who added this account (the certified account of the Welcome's
    /// sender leaf).
    pub inviter: AccountId,
    /// Devices in the group.
    pub members: usize,
    pub at: u64,
}

/// A file message this device received or sent (issue 32).
#[derive(Clone, PartialEq, Eq)]
pub struct FileRow {
    pub seq: u64,
    pub sender: Option<AccountId>,
    pub file: crate::files::FileRef,
    pub time: u64,
    /// When the group's disappearing timer deletes it.
    pub expires: Option<u64>,
}

impl std::fmt::Debug for FileRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRow").field("seq", &self.seq).finish_non_exhaustive()
    }
}

/// One stored history line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub seq: u64,
    pub sender: Option<AccountId>,
    pub kind: EntryKind,
    pub body: String,
    pub time: u64,
    /// When the group's disappearing timer deletes it (`None`: never).
    pub expires: Option<u64>,
    /// Handed over by another device of the account (a linked device's
    /// history, a restored backup), not received by this one: shown before
    /// everything this device received itself.
    pub imported: bool,
}

/// The local store (see the module doc).
#[derive(Debug, Clone)]
pub struct Local {
    conn: Rc<Connection>,
    /// Whether a [`Unit`] is open (units do not nest).
    open: Rc<Cell<bool>>,
    /// Expired text was deleted but the WAL not yet emptied of it (another
    /// reader was in the way): every purge tries again.
    unflushed: Rc<Cell<bool>>,
}

/// A unit of work on the state file: everything written through [`Local`]
/// or the MLS state until [`Unit::commit`] lands together. Dropped without
/// committing, it is rolled back.
#[derive(Debug)]
#[must_use = "a unit that is not committed is rolled back"]
pub struct Unit {
    conn: Option<Rc<Connection>>,
    open: Rc<Cell<bool>>,
}

impl Unit {
    pub fn commit(mut self) -> Result<(), StateError> {
        if let Some(conn) = self.conn.take() {
            self.open.set(false);
            conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.open.set(false);
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!("could not roll back the client state: {e}");
            }
        }
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn account(bytes: Option<Vec<u8>>) -> Option<AccountId> {
    bytes.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok()).map(AccountId)
}

impl Local {
    pub(super) fn new(conn: Rc<Connection>) -> Self {
        Self { conn, open: Rc::new(Cell::new(false)), unflushed: Rc::new(Cell::new(false)) }
    }

    /// Begins a unit of work (taking the file's write lock). Inside an open
    /// unit, returns one that commits nothing itself: the outer one decides.
    pub fn unit(&self) -> Result<Unit, StateError> {
        if self.open.get() {
            return Ok(Unit { conn: None, open: self.open.clone() });
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.open.set(true);
        Ok(Unit { conn: Some(self.conn.clone()), open: self.open.clone() })
    }

    /// Moves the write-ahead log into the file and truncates it, so page
    /// images holding deleted secrets do not stay in it.
    pub fn checkpoint(&self) -> Result<(), StateError> {
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    // ---- settings ----

    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)", params![key, value])?;
        Ok(())
    }

    pub fn clear_setting(&self, key: &str) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM settings WHERE key = ?1", [key])?;
        Ok(())
    }

    // ---- contacts ----

    /// Names `account` (renaming an existing name's account). False if the
    /// account already has another name.
    pub fn put_contact(&self, name: &str, account: &AccountId) -> Result<bool, StateError> {
        let r = self.conn.execute(
            "INSERT INTO contacts (name, account) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET account = excluded.account",
            params![name, &account.0[..]],
        );
        match r {
            Ok(_) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// All contacts by name.
    pub fn contacts(&self) -> Result<Vec<(String, AccountId)>, StateError> {
        let mut stmt = self.conn.prepare_cached("SELECT name, account FROM contacts ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut out = vec![];
        for row in rows {
            let (name, a) = row?;
            out.extend(account(Some(a)).map(|a| (name, a)));
        }
        Ok(out)
    }

    /// Forgets a contact; false if there was none of that name.
    pub fn delete_contact(&self, name: &str) -> Result<bool, StateError> {
        Ok(self.conn.execute("DELETE FROM contacts WHERE name = ?1", [name])? > 0)
    }

    pub fn contact(&self, name: &str) -> Result<Option<AccountId>, StateError> {
        let found = self
            .conn
            .prepare_cached("SELECT account FROM contacts WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        Ok(account(found))
    }

    /// The name this device gave `account`, if any.
    pub fn name_of(&self, account: &AccountId) -> Result<Option<String>, StateError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM contacts WHERE account = ?1")?
            .query_row([&account.0[..]], |r| r.get(0))
            .optional()?)
    }

    // ---- the account's other devices ----

    /// Names a device of this account; false if the name is taken.
    pub fn name_device(&self, device: &crate::auth::DeviceId, name: &str) -> Result<bool, StateError> {
        let r = self.conn.execute(
            "INSERT OR REPLACE INTO device_names (device, name) VALUES (?1, ?2)",
            params![&device.0[..], name],
        );
        match r {
            Ok(_) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The names given to devices, by device.
    pub fn device_names(&self) -> Result<Vec<(crate::auth::DeviceId, String)>, StateError> {
        let mut stmt = self.conn.prepare_cached("SELECT device, name FROM device_names ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = vec![];
        for row in rows {
            let (d, name) = row?;
            if let Ok(d) = <[u8; 32]>::try_from(d.as_slice()) {
                out.push((crate::auth::DeviceId(d), name));
            }
        }
        Ok(out)
    }

    // ---- invitations ----

    /// Keeps a Welcome from someone who is not a contact (replacing an
    /// earlier one for the same group).
    pub fn put_invitation(&self, inv: &Invitation, welcome: &[u8]) -> Result<(), StateError> {
        let members = i64::try_from(inv.members).unwrap_or(i64::MAX);
        self.conn.execute(
            "INSERT OR REPLACE INTO invitations (group_id, welcome, inviter, members, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![inv.group, welcome, &inv.inviter.0[..], members, i(inv.at)],
        )?;
        Ok(())
    }

    /// The invitations waiting, oldest first.
    pub fn invitations(&self) -> Result<Vec<Invitation>, StateError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT group_id, inviter, members, at FROM invitations ORDER BY at")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
        })?;
        let mut out = vec![];
        for row in rows {
            let (group, inviter, members, at) = row?;
            if let Ok(inviter) = <[u8; 32]>::try_from(inviter.as_slice()) {
                out.push(Invitation {
                    group,
                    inviter: AccountId(inviter),
                    members: usize::try_from(members).unwrap_or(0),
                    at: u(at),
                });
            }
        }
        Ok(out)
    }

    /// The Welcome of a waiting invitation.
    pub fn invitation_welcome(&self, group: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .conn
            .query_row("SELECT welcome FROM invitations WHERE group_id = ?1", [group], |r| r.get(0))
            .optional()?)
    }

    pub fn delete_invitation(&self, group: &[u8]) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM invitations WHERE group_id = ?1", [group])?;
        Ok(())
    }

    // ---- anchors (a linked device's first join) ----

    pub fn put_anchor(&self, group: &[u8], epoch: u64, transcript: &[u8]) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO anchors (group_id, epoch, transcript) VALUES (?1, ?2, ?3)",
            params![group, i(epoch), transcript],
        )?;
        Ok(())
    }

    /// The first device's (epoch, transcript hash) of `group`, if handed over.
    pub fn anchor(&self, group: &[u8]) -> Result<Option<(u64, Vec<u8>)>, StateError> {
        Ok(self
            .conn
            .query_row("SELECT epoch, transcript FROM anchors WHERE group_id = ?1", [group], |r| {
                Ok((u(r.get::<_, i64>(0)?), r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?)
    }

    /// Keeps the first device's state of `group` (an encoded
    /// `LinkHandover`) until this device's first join.
    pub fn put_handover(&self, group: &[u8], state: &[u8]) -> Result<(), StateError> {
        self.conn
            .execute("INSERT OR REPLACE INTO handovers (group_id, state) VALUES (?1, ?2)", params![group, state])?;
        Ok(())
    }

    pub fn handover(&self, group: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.conn.query_row("SELECT state FROM handovers WHERE group_id = ?1", [group], |r| r.get(0)).optional()?)
    }

    /// Drops what the first device handed over for `group`, once this
    /// device joined it.
    pub fn forget_handover(&self, group: &[u8]) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM handovers WHERE group_id = ?1", [group])?;
        self.conn.execute("DELETE FROM anchors WHERE group_id = ?1", [group])?;
        Ok(())
    }

    // ---- the group's chain (verifiable delivery) ----

    /// Where this device stands in `group`'s chain, if it started
    /// following it.
    pub fn chain(&self, group: &[u8]) -> Result<Option<ChainRow>, StateError> {
        let row = self
            .conn
            .prepare_cached("SELECT seq, head, since, signed FROM chains WHERE group_id = ?1")?
            .query_row([group], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<Vec<u8>>>(3)?))
            })
            .optional()?;
        Ok(row.and_then(|(seq, head, since, signed)| {
            let head = Head(<[u8; 32]>::try_from(head.as_slice()).ok()?);
            let signed = signed.as_deref().and_then(Claim::decode).map(|c| c.0);
            Some(ChainRow { position: Position { seq: u(seq), head }, since: u(since), signed })
        }))
    }

    /// Moves this device's position in `group`'s chain (verified without a
    /// break since `since`), and keeps the head for comparisons, at most
    /// [`MAX_KEPT_HEADS`] per group.
    pub fn set_position(&self, group: &[u8], at: Position, since: u64) -> Result<(), StateError> {
        self.conn
            .prepare_cached(
                "INSERT INTO chains (group_id, seq, head, since) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (group_id) DO UPDATE SET seq = ?2, head = ?3, since = ?4",
            )?
            .execute(params![group, i(at.seq), &at.head.0[..], i(since)])?;
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO heads (group_id, seq, head) VALUES (?1, ?2, ?3)")?
            .execute(params![group, i(at.seq), &at.head.0[..]])?;
        let floor = at.seq.saturating_sub(MAX_KEPT_HEADS);
        if floor > 0 && at.seq.is_multiple_of(PRUNE_EVERY) {
            self.conn
                .prepare_cached("DELETE FROM heads WHERE group_id = ?1 AND seq <= ?2")?
                .execute(params![group, i(floor)])?;
        }
        Ok(())
    }

    /// This device read `group` to the end of its log at `now`.
    pub fn set_synced(&self, group: &[u8], now: u64) -> Result<(), StateError> {
        self.conn.prepare_cached("UPDATE groups SET synced_at = ?2 WHERE id = ?1")?.execute(params![group, i(now)])?;
        Ok(())
    }

    /// When this device last read `group` to the end of its log; when it
    /// never did, when it joined (nothing it could read is older than
    /// that, so a server that keeps it from reading to the end cannot make
    /// a gap look older than it is).
    pub fn synced_at(&self, group: &[u8]) -> Result<Option<u64>, StateError> {
        let t: Option<Option<i64>> = self
            .conn
            .prepare_cached("SELECT COALESCE(synced_at, joined_at) FROM groups WHERE id = ?1")?
            .query_row([group], |r| r.get(0))
            .optional()?;
        Ok(t.flatten().map(u))
    }

    /// Forgets this device's position in `group`'s chain (it starts again
    /// at the next message, e.g. after joining anew).
    pub fn reset_chain(&self, group: &[u8]) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM chains WHERE group_id = ?1", [group])?;
        Ok(())
    }

    /// Keeps the last head the server signed for this device in `group`.
    pub fn set_signed(&self, group: &[u8], signed: &SignedHead) -> Result<(), StateError> {
        self.conn
            .prepare_cached("UPDATE chains SET signed = ?2 WHERE group_id = ?1")?
            .execute(params![group, Claim(*signed).encode()])?;
        Ok(())
    }

    /// The head this device verified after message `seq` of `group`, if it
    /// keeps it.
    pub fn head_at(&self, group: &[u8], seq: u64) -> Result<Option<Head>, StateError> {
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT head FROM heads WHERE group_id = ?1 AND seq = ?2")?
            .query_row(params![group, i(seq)], |r| r.get(0))
            .optional()?;
        Ok(h.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(Head))
    }

    /// Records an alarm about `group` at `seq`, with its evidence (JSON).
    /// Returns its id.
    pub fn add_alarm(
        &self,
        group: &[u8],
        seq: u64,
        body: &str,
        evidence: Option<&str>,
        now: u64,
    ) -> Result<i64, StateError> {
        self.conn.execute(
            "INSERT INTO alarms (group_id, seq, body, evidence, time) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![group, i(seq), body, evidence, i(now)],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Sets `field` of alarm `id`'s evidence (a JSON object) to `value`.
    pub fn sign_alarm_evidence(&self, id: i64, field: &str, value: &serde_json::Value) -> Result<(), StateError> {
        let evidence: Option<Option<String>> =
            self.conn.query_row("SELECT evidence FROM alarms WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let mut e: serde_json::Value =
            evidence.flatten().and_then(|e| serde_json::from_str(&e).ok()).unwrap_or_else(|| serde_json::json!({}));
        if let Some(o) = e.as_object_mut() {
            o.insert(field.to_owned(), value.clone());
        }
        self.conn.execute("UPDATE alarms SET evidence = ?2 WHERE id = ?1", params![id, e.to_string()])?;
        Ok(())
    }

    /// `group`'s alarms, oldest first.
    pub fn alarms(&self, group: &[u8]) -> Result<Vec<AlarmRow>, StateError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT seq, body, evidence, time FROM alarms WHERE group_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map([group], |r| {
            Ok(AlarmRow { seq: u(r.get(0)?), body: r.get(1)?, evidence: r.get(2)?, time: u(r.get(3)?) })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `account` wrote message `at_seq` of `group` having verified the
    /// chain up to `seen_seq`.
    pub fn put_seen(&self, group: &[u8], account: &AccountId, at_seq: u64, seen_seq: u64) -> Result<(), StateError> {
        self.conn
            .prepare_cached(
                "INSERT INTO seen (group_id, account, at_seq, seen_seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (group_id, account) DO UPDATE SET at_seq = ?3, seen_seq = ?4 WHERE at_seq < ?3",
            )?
            .execute(params![group, &account.0[..], i(at_seq), i(seen_seq)])?;
        Ok(())
    }

    /// For each member that wrote with a claim: (account, the message it
    /// last wrote, how far it had read then).
    pub fn seen(&self, group: &[u8]) -> Result<Vec<(AccountId, u64, u64)>, StateError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT account, at_seq, seen_seq FROM seen WHERE group_id = ?1 ORDER BY at_seq")?;
        let rows = stmt.query_map([group], |r| Ok((account(Some(r.get(0)?)), u(r.get(1)?), u(r.get(2)?))))?;
        let rows: Vec<_> = rows.collect::<Result<_, _>>()?;
        Ok(rows.into_iter().filter_map(|(a, at, seen)| Some((a?, at, seen))).collect())
    }

    /// This device's message (whose SHA-256 is `digest`, when it is known)
    /// is at `seq`, with the chain head the server gave it there.
    pub fn mark_sent_head(
        &self,
        id: &[u8],
        seq: u64,
        head: &Head,
        digest: Option<&[u8; 32]>,
    ) -> Result<(), StateError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO sent (group_id, seq, head, digest) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![id, i(seq), &head.0[..], digest.map(|d| &d[..])])?;
        Ok(())
    }

    /// Whether this device sent the message at `seq`, and then its SHA-256
    /// if it kept it.
    pub fn sent_digest(&self, id: &[u8], seq: u64) -> Result<Option<Option<[u8; 32]>>, StateError> {
        let d: Option<Option<Vec<u8>>> = self
            .conn
            .prepare_cached("SELECT digest FROM sent WHERE group_id = ?1 AND seq = ?2")?
            .query_row(params![id, i(seq)], |r| r.get(0))
            .optional()?;
        Ok(d.map(|d| d.and_then(|d| <[u8; 32]>::try_from(d.as_slice()).ok())))
    }

    pub fn sent_head(&self, id: &[u8], seq: u64) -> Result<Option<Head>, StateError> {
        let h: Option<Option<Vec<u8>>> = self
            .conn
            .prepare_cached("SELECT head FROM sent WHERE group_id = ?1 AND seq = ?2")?
            .query_row(params![id, i(seq)], |r| r.get(0))
            .optional()?;
        Ok(h.flatten().and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(Head))
    }

    // ---- revocations ----

    /// Keeps an account-signed revocation (encoded, as verified); false if
    /// its device was already known revoked.
    pub fn put_revocation(&self, device: &crate::auth::DeviceId, statement: &[u8]) -> Result<bool, StateError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO revocations (device, statement) VALUES (?1, ?2)",
            params![&device.0[..], statement],
        )?;
        Ok(n > 0)
    }

    /// The revocations kept, encoded (verify them again before use).
    pub fn revocations(&self) -> Result<Vec<Vec<u8>>, StateError> {
        let mut stmt = self.conn.prepare_cached("SELECT statement FROM revocations")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    // ---- groups ----

    /// All groups, in the order this device joined them.
    pub fn groups(&self) -> Result<Vec<LocalGroup>, StateError> {
        let mut stmt = self.conn.prepare_cached("SELECT id, name, active FROM groups ORDER BY joined_at, id")?;
        let rows = stmt.query_map([], |r| Ok(LocalGroup { id: r.get(0)?, name: r.get(1)?, active: r.get(2)? }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn group_name(&self, id: &[u8]) -> Result<Option<String>, StateError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM groups WHERE id = ?1")?
            .query_row([id], |r| r.get::<_, Option<String>>(0))
            .optional()?
            .flatten())
    }

    /// Starts keeping a group (active, reading after `cursor`); a group
    /// kept before (this device rejoined it) starts over.
    pub fn put_group(&self, id: &[u8], name: Option<&str>, cursor: u64, now: u64) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO groups (id, name, cursor, active, joined_at) VALUES (?1, ?2, ?3, 1, ?4)",
            params![id, name, i(cursor), i(now)],
        )?;
        // Its chain is followed again from the first message read.
        self.reset_chain(id)?;
        Ok(())
    }

    /// Gives an unnamed group its name (a name once set stays).
    pub fn name_group(&self, id: &[u8], name: &str) -> Result<(), StateError> {
        self.conn.execute("UPDATE groups SET name = ?2 WHERE id = ?1 AND name IS NULL", params![id, name])?;
        Ok(())
    }

    /// This device is no longer in the group.
    pub fn reactivate(&self, id: &[u8]) -> Result<(), StateError> {
        self.conn.execute("UPDATE groups SET active = 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn deactivate(&self, id: &[u8]) -> Result<(), StateError> {
        self.conn.execute("UPDATE groups SET active = 0 WHERE id = ?1", [id])?;
        Ok(())
    }

    /// The last sequence of the group's log this device has dealt with.
    pub fn cursor(&self, id: &[u8]) -> Result<u64, StateError> {
        let c: Option<i64> = self
            .conn
            .prepare_cached("SELECT cursor FROM groups WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        Ok(c.map_or(0, u))
    }

    /// Moves the cursor forward to `seq` (never back).
    pub fn advance(&self, id: &[u8], seq: u64) -> Result<(), StateError> {
        self.conn
            .prepare_cached("UPDATE groups SET cursor = MAX(cursor, ?2) WHERE id = ?1")?
            .execute(params![id, i(seq)])?;
        Ok(())
    }

    // ---- what this device sent ----

    pub fn mark_sent(&self, id: &[u8], seq: u64) -> Result<(), StateError> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO sent (group_id, seq) VALUES (?1, ?2)")?
            .execute(params![id, i(seq)])?;
        Ok(())
    }

    pub fn sent(&self, id: &[u8], seq: u64) -> Result<bool, StateError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM sent WHERE group_id = ?1 AND seq = ?2")?
            .exists(params![id, i(seq)])?)
    }

    // ---- history ----

    pub fn record(&self, id: &[u8], row: &HistoryRow) -> Result<(), StateError> {
        self.conn
            .prepare_cached(
                "INSERT INTO history (group_id, seq, sender, kind, body, time, expires_at, imported)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                id,
                i(row.seq),
                row.sender.map(|a| a.0.to_vec()),
                row.kind.as_str(),
                row.body,
                i(row.time),
                row.expires.map(i),
                row.imported
            ])?;
        Ok(())
    }

    /// Deletes every history line and file message whose time is up (their
    /// group's disappearing timer), then empties the write-ahead log, so
    /// the deleted text is in no file (`secure_delete` zeroes it in the
    /// database). Returns how many went.
    pub fn purge_expired(&self, now: u64) -> Result<u64, StateError> {
        let lines = self
            .conn
            .prepare_cached("DELETE FROM history WHERE expires_at IS NOT NULL AND expires_at <= ?1")?
            .execute([i(now)])?;
        let files = self
            .conn
            .prepare_cached("DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?1")?
            .execute([i(now)])?;
        let n = u64::try_from(lines + files).unwrap_or(u64::MAX);
        if n > 0 {
            self.unflushed.set(true);
        }
        if self.unflushed.get() && !self.open.get() {
            // Another process reading the file may hold the WAL: this
            // waits only briefly, and the next purge (every second in a
            // chat, at the next run otherwise) tries again.
            match self.try_checkpoint(PURGE_CHECKPOINT_WAIT) {
                Ok(done) => self.unflushed.set(!done),
                Err(e) => tracing::debug!("could not truncate the state's WAL after deleting expired messages: {e}"),
            }
        }
        Ok(n)
    }

    /// `PRAGMA wal_checkpoint(TRUNCATE)` waiting at most `wait` for other
    /// readers; whether the WAL is now empty.
    pub fn try_checkpoint(&self, wait: std::time::Duration) -> Result<bool, StateError> {
        self.conn.busy_timeout(wait)?;
        let result = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?)));
        self.conn.busy_timeout(crate::sqlite::BUSY_TIMEOUT)?;
        let (busy, log): (i64, i64) = result?;
        Ok(busy == 0 && log <= 0)
    }

    /// Records the group's disappearing timer as of `epoch`, if it is not
    /// what the last record says (what [`Local::timer_at`] reads).
    pub fn note_timer(&self, id: &[u8], epoch: u64, secs: u32) -> Result<(), StateError> {
        let last: Option<i64> = self
            .conn
            .prepare_cached("SELECT secs FROM timers WHERE group_id = ?1 AND epoch <= ?2 ORDER BY epoch DESC LIMIT 1")?
            .query_row(params![id, i(epoch)], |r| r.get(0))
            .optional()?;
        if last != Some(i64::from(secs)) {
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO timers (group_id, epoch, secs) VALUES (?1, ?2, ?3)")?
                .execute(params![id, i(epoch), i64::from(secs)])?;
        }
        Ok(())
    }

    /// The group's disappearing timer in `epoch`, as this device recorded
    /// it; `None` if it recorded nothing that early.
    pub fn timer_at(&self, id: &[u8], epoch: u64) -> Result<Option<u32>, StateError> {
        let secs: Option<i64> = self
            .conn
            .prepare_cached("SELECT secs FROM timers WHERE group_id = ?1 AND epoch <= ?2 ORDER BY epoch DESC LIMIT 1")?
            .query_row(params![id, i(epoch)], |r| r.get(0))
            .optional()?;
        Ok(secs.and_then(|s| u32::try_from(s).ok()))
    }

    /// The first time a line or file message of this state expires, if any
    /// does.
    pub fn next_expiry(&self) -> Result<Option<u64>, StateError> {
        let t: Option<i64> = self.conn.query_row(
            "SELECT min(t) FROM (SELECT min(expires_at) AS t FROM history UNION ALL SELECT min(expires_at) FROM files)",
            [],
            |r| r.get(0),
        )?;
        Ok(t.map(u))
    }

    // ---- files ----

    /// Keeps a file message; false if the group already has a file of that
    /// id (the first message naming a blob is the one that counts).
    pub fn add_file(&self, id: &[u8], row: &FileRow) -> Result<bool, StateError> {
        let f = &row.file;
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO files
                     (group_id, id, seq, sender, name, size, media_type, key, hash, time, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                id,
                &f.id[..],
                i(row.seq),
                row.sender.map(|a| a.0.to_vec()),
                f.name,
                i(f.size),
                f.media_type,
                &f.key[..],
                &f.hash[..],
                i(row.time),
                row.expires.map(i)
            ])?;
        Ok(n > 0)
    }

    /// A group's files, oldest first.
    pub fn files(&self, id: &[u8]) -> Result<Vec<FileRow>, StateError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, sender, id, name, size, media_type, key, hash, time, expires_at FROM files WHERE group_id = ?1
             ORDER BY seq, id",
        )?;
        let rows = stmt.query_map([id], |r| {
            let blob: Vec<u8> = r.get(2)?;
            let key: zeroize::Zeroizing<Vec<u8>> = zeroize::Zeroizing::new(r.get(6)?);
            let hash: Vec<u8> = r.get(7)?;
            Ok((
                u(r.get(0)?),
                account(r.get(1)?),
                blob,
                r.get::<_, String>(3)?,
                u(r.get(4)?),
                r.get::<_, String>(5)?,
                key,
                hash,
                u(r.get(8)?),
                r.get::<_, Option<i64>>(9)?.map(u),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, sender, blob, name, size, media_type, key, hash, time, expires) = row?;
            let (Ok(blob), Ok(k), Ok(hash)) = (
                <[u8; 16]>::try_from(blob.as_slice()),
                <[u8; 32]>::try_from(key.as_slice()),
                <[u8; 32]>::try_from(hash.as_slice()),
            ) else {
                continue;
            };
            let file = crate::files::FileRef { id: blob, key: k, hash, size, name, media_type, caption: String::new() };
            out.push(FileRow { seq, sender, file, time, expires });
        }
        Ok(out)
    }

    /// A group's history, oldest first.
    pub fn history(&self, id: &[u8]) -> Result<Vec<HistoryRow>, StateError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, sender, kind, body, time, expires_at, imported FROM history WHERE group_id = ?1
             ORDER BY imported DESC, id",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(HistoryRow {
                seq: u(r.get(0)?),
                sender: account(r.get(1)?),
                kind: EntryKind::parse(&r.get::<_, String>(2)?),
                body: r.get(3)?,
                time: u(r.get(4)?),
                expires: r.get::<_, Option<i64>>(5)?.map(u),
                imported: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (tempfile::TempDir, Local) {
        let home = tempfile::tempdir().unwrap();
        let (_, local) = super::super::state::open(home.path()).unwrap();
        (home, local)
    }

    #[test]
    fn a_unit_commits_everything_or_nothing() {
        let (_home, local) = local();
        local.put_group(b"g", None, 0, 1).unwrap();
        {
            let _unit = local.unit().unwrap();
            local.advance(b"g", 5).unwrap();
            local.mark_sent(b"g", 5).unwrap();
            // Dropped: rolled back.
        }
        assert_eq!(local.cursor(b"g").unwrap(), 0);
        assert!(!local.sent(b"g", 5).unwrap());
        let unit = local.unit().unwrap();
        local.advance(b"g", 5).unwrap();
        let inner = local.unit().unwrap();
        local.mark_sent(b"g", 5).unwrap();
        inner.commit().unwrap();
        unit.commit().unwrap();
        assert_eq!(local.cursor(b"g").unwrap(), 5);
        assert!(local.sent(b"g", 5).unwrap());
        local.advance(b"g", 3).unwrap();
        assert_eq!(local.cursor(b"g").unwrap(), 5, "cursors never move back");
    }

    #[test]
    fn contacts_names_and_history_round_trip() {
        let (_home, local) = local();
        let (a, b) = (AccountId([1; 32]), AccountId([2; 32]));
        assert!(local.put_contact("alice", &a).unwrap());
        assert!(!local.put_contact("alicia", &a).unwrap(), "one name per account");
        assert!(local.put_contact("alice", &b).unwrap(), "a name can move to another account");
        assert_eq!(local.contact("alice").unwrap(), Some(b));
        assert_eq!(local.name_of(&b).unwrap().as_deref(), Some("alice"));
        assert!(local.delete_contact("alice").unwrap());
        assert!(!local.delete_contact("alice").unwrap());
        local.put_group(b"g", None, 0, 1).unwrap();
        local.name_group(b"g", "team").unwrap();
        local.name_group(b"g", "renamed").unwrap();
        assert_eq!(local.group_name(b"g").unwrap().as_deref(), Some("team"), "a name once set stays");
        let row = HistoryRow {
            seq: 3,
            sender: Some(a),
            kind: EntryKind::Text,
            body: "hi".into(),
            time: 9,
            expires: None,
            imported: false,
        };
        local.record(b"g", &row).unwrap();
        assert_eq!(local.history(b"g").unwrap(), vec![row]);
        assert!(valid_name("bob") && !valid_name(" ") && !valid_name("a\nb") && !valid_name(&"x".repeat(65)));
    }
}

//! What the `hush` CLI does, as a library: contacts, groups and messages on
//! top of the client state, the MLS member and a server connection.
//!
//! Crash safety: a message enters the local history as sent only after
//! the server acknowledged it; a commit is merged locally only after the
//! server accepted it (otherwise it is discarded and, on `StaleEpoch`,
//! retried after catching up); a Welcome is acknowledged to the server
//! only after the group was joined and recorded.
//!
//! Application payloads are one kind byte followed by UTF-8:
//! `0x01` text, `0x02` the group's name (so names travel encrypted and the
//! server never sees them).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection as Db, OptionalExtension};
use thiserror::Error;

use super::mls::{Commit, Member, MlsError, Received};
use super::state::{self, Provider, StateError};
use super::{ClientError, Connection};
use crate::auth::{text, AccountId, DeviceCertificate, DeviceId, HushAddress, Identity, KeyError};
use crate::util::now_unix;
use crate::wire::{ErrorCode, GroupSummary};

mod sync;

/// KeyPackages published at registration and kept available.
pub const KEY_PACKAGE_TARGET: usize = 20;
/// Top up when fewer than this many are left.
pub const KEY_PACKAGE_LOW: u32 = 5;
/// Attempts at a commit that keeps meeting `StaleEpoch`.
pub const COMMIT_ATTEMPTS: usize = 5;
/// Pages of messages one sync reads from a group at most; past this it
/// stops (what is left comes with the next sync). 1024 pages of up to 256
/// messages cover a full group log (100,000 messages by default) twice.
pub const MAX_SYNC_PAGES: usize = 1024;
/// Bytes of messages one sync reads from a group at most.
pub const MAX_SYNC_BYTES: usize = 512 * 1024 * 1024;

/// Setting holding this device's certificate.
const CERTIFICATE: &str = "certificate";

const KIND_TEXT: u8 = 0x01;
const KIND_NAME: u8 = 0x02;

/// Something the user can act on.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AppError {
    #[error("no identity in {0}; run `hush register ADDRESS --invite TOKEN` first")]
    NoIdentity(PathBuf),
    #[error(
        "refused to add {who}: {why}. The server handed out a KeyPackage that {who}'s account key did not \
         certify; the server may be compromised. Nothing was changed"
    )]
    Forged { who: String, why: String },
    #[error("unknown contact {0:?}; add it with `hush contact add NAME ACCOUNT_ID`")]
    UnknownContact(String),
    #[error("unknown group {0:?}; see `hush group list`")]
    UnknownGroup(String),
    #[error("you are not a member of {0} any more")]
    NotMember(String),
    #[error("the device certificate in {home} is damaged: {why}")]
    DamagedCertificate { home: PathBuf, why: String },
    #[error("the device certificate in {0} is for another device key; this home is damaged")]
    ForeignCertificate(PathBuf),
    #[error("contact names are 1 to 64 printable characters")]
    ContactName,
    #[error("{text:?} is not an account id: {why}")]
    NotAnAccount { text: String, why: String },
    #[error("that account already has another name")]
    AlreadyNamed,
    #[error("several groups are called {0:?}; use the id from `hush group list`")]
    AmbiguousGroup(String),
    #[error("you already have a group called {0:?}")]
    GroupExists(String),
    #[error("the group kept changing; try again")]
    GroupKeptChanging,
    #[error("the group kept changing while this device rejoined it; sync again")]
    RejoinKeptFailing,
    #[error("the server misbehaved: {0}; nothing after that point was applied (try again, or ask its operator)")]
    Misbehaving(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Mls(#[from] MlsError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl From<rusqlite::Error> for AppError {
    fn from(e: rusqlite::Error) -> Self {
        Self::State(StateError::Sqlite(e))
    }
}

/// One line of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub group_id: Vec<u8>,
    pub group: String,
    pub seq: u64,
    /// Display name of the sender (petname, "you", or short fingerprint).
    pub sender: String,
    /// `text` or `event`.
    pub kind: String,
    pub body: String,
    pub time: u64,
}

/// A local group.
#[derive(Debug, Clone)]
pub struct GroupRow {
    pub id: Vec<u8>,
    pub name: String,
    pub active: bool,
}

/// The open client: device key, pinned server, state (with the device
/// certificate and the MLS member).
pub struct App {
    pub home: PathBuf,
    /// This device's TLS key.
    pub device_key: Identity,
    pub server: HushAddress,
    db: Db,
    member: Member<Provider>,
}

impl Drop for App {
    /// Secrets deleted during this session leave the write-ahead log too.
    fn drop(&mut self) {
        if let Err(e) = state::checkpoint(&self.db) {
            tracing::warn!("could not checkpoint the client state: {e}");
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("home", &self.home).finish_non_exhaustive()
    }
}

/// Shown instead of an account id: the first 16 characters, grouped.
pub fn short(a: &AccountId) -> String {
    a.short()
}

/// A number both people compute the same way from their two account keys:
/// SHA-256 over the sorted pair, shown as 12 groups of 5 digits.
pub fn safety_number(a: &AccountId, b: &AccountId) -> String {
    let (x, y) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut input = b"hush safety number v1".to_vec();
    input.extend_from_slice(&x.0);
    input.extend_from_slice(&y.0);
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest
        .as_ref()
        .chunks(2)
        .take(12)
        .map(|c| {
            let v = c.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
            format!("{:05}", v % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl App {
    /// Creates the MLS state of this device (once): a fresh MLS signature
    /// key and the device certificate binding it and `device_key` to the
    /// account. Returns the certificate.
    pub fn initialise(home: &Path, account: &Identity, device_key: &Identity) -> Result<DeviceCertificate, AppError> {
        let (provider, db) = state::open(home)?;
        if let Some(cert) = state::setting(&db, CERTIFICATE)? {
            return DeviceCertificate::decode(&cert)
                .map_err(|e| AppError::DamagedCertificate { home: home.to_owned(), why: e.to_string() });
        }
        let device = DeviceId(device_key.public_key());
        let member = Member::create(provider, account, device, now_unix())?;
        state::set_setting(&db, CERTIFICATE, &member.certificate().encode())?;
        Ok(member.certificate().clone())
    }

    /// Opens an initialised home.
    pub fn open(home: &Path, device_key: Identity, server: HushAddress) -> Result<Self, AppError> {
        let (provider, db) = state::open(home)?;
        let cert = state::setting(&db, CERTIFICATE)?.ok_or_else(|| AppError::NoIdentity(home.to_owned()))?;
        let member = Member::load(provider, &cert)?;
        if member.device() != DeviceId(device_key.public_key()) {
            return Err(AppError::ForeignCertificate(home.to_owned()));
        }
        Ok(Self { home: home.to_owned(), device_key, server, db, member })
    }

    pub fn account(&self) -> AccountId {
        self.member.account()
    }

    /// This device's certificate.
    pub fn certificate(&self) -> &DeviceCertificate {
        self.member.certificate()
    }

    pub async fn connect(&self) -> Result<Connection, AppError> {
        Ok(Connection::connect(&self.server, &self.device_key).await?)
    }

    // ---- contacts ----

    pub fn contact_add(&self, name: &str, account: &str) -> Result<AccountId, AppError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(AppError::ContactName);
        }
        let account: AccountId =
            account.parse().map_err(|e| AppError::NotAnAccount { text: account.to_owned(), why: format!("{e}") })?;
        self.db
            .execute(
                "INSERT INTO contacts (name, account) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET account = excluded.account",
                params![name, &account.0[..]],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    AppError::AlreadyNamed
                }
                other => other.into(),
            })?;
        Ok(account)
    }

    pub fn contacts(&self) -> Result<Vec<(String, AccountId)>, AppError> {
        let mut stmt = self.db.prepare("SELECT name, account FROM contacts ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut out = vec![];
        for row in rows {
            let (n, a) = row?;
            if let Some(a) = state::account_col(Some(a)) {
                out.push((n, a));
            }
        }
        Ok(out)
    }

    pub fn contact_remove(&self, name: &str) -> Result<(), AppError> {
        if self.db.execute("DELETE FROM contacts WHERE name = ?1", [name])? == 0 {
            return Err(AppError::UnknownContact(name.into()));
        }
        Ok(())
    }

    /// A petname or an account id.
    pub fn resolve_contact(&self, who: &str) -> Result<AccountId, AppError> {
        let found: Option<Vec<u8>> =
            self.db.query_row("SELECT account FROM contacts WHERE name = ?1", [who], |r| r.get(0)).optional()?;
        if let Some(a) = state::account_col(found) {
            return Ok(a);
        }
        who.parse().map_err(|_| AppError::UnknownContact(who.into()))
    }

    /// How to show an account: "you", its petname, or a short fingerprint.
    pub fn display(&self, a: &AccountId) -> String {
        if *a == self.account() {
            return "you".into();
        }
        self.db
            .query_row("SELECT name FROM contacts WHERE account = ?1", [&a.0[..]], |r| r.get::<_, String>(0))
            .unwrap_or_else(|_| short(a))
    }

    // ---- groups ----

    pub fn groups(&self) -> Result<Vec<GroupRow>, AppError> {
        let mut stmt = self.db.prepare("SELECT id, name, active FROM groups ORDER BY joined_at, id")?;
        let rows = stmt.query_map([], |r| {
            let id: Vec<u8> = r.get(0)?;
            let name: Option<String> = r.get(1)?;
            Ok(GroupRow { name: name.unwrap_or_else(|| text::encode(&id)), id, active: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A group by local name or by id (base32, as `group list` shows).
    pub fn resolve_group(&self, name: &str) -> Result<GroupRow, AppError> {
        let groups = self.groups()?;
        let mut matches: Vec<&GroupRow> = groups.iter().filter(|g| g.name == name).collect();
        if matches.is_empty() {
            matches = groups.iter().filter(|g| text::encode(&g.id) == name).collect();
        }
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(AppError::UnknownGroup(name.into())),
            _ => Err(AppError::AmbiguousGroup(name.into())),
        }
    }

    fn group_name(&self, id: &[u8]) -> String {
        self.db
            .query_row("SELECT name FROM groups WHERE id = ?1", [id], |r| r.get::<_, Option<String>>(0))
            .ok()
            .flatten()
            .unwrap_or_else(|| text::encode(id))
    }

    fn record(
        &self,
        group: &[u8],
        seq: u64,
        sender: Option<&AccountId>,
        kind: &str,
        body: &str,
    ) -> Result<(), AppError> {
        self.db.execute(
            "INSERT INTO history (group_id, seq, sender, kind, body, time) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                group,
                i64::try_from(seq).unwrap_or(i64::MAX),
                sender.map(|a| a.0.to_vec()),
                kind,
                body,
                i64::try_from(now_unix()).unwrap_or(0)
            ],
        )?;
        Ok(())
    }

    fn mark_sent(&self, group: &[u8], seq: u64) -> Result<(), AppError> {
        self.db.execute(
            "INSERT OR IGNORE INTO sent (group_id, seq) VALUES (?1, ?2)",
            params![group, i64::try_from(seq).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    /// Creates a group named `name` (the name stays local until members are
    /// added, who receive it encrypted).
    pub async fn create_group(&mut self, conn: &Connection, name: &str) -> Result<Vec<u8>, AppError> {
        if self.groups()?.iter().any(|g| g.name == name && g.active) {
            return Err(AppError::GroupExists(name.into()));
        }
        // The server's removal key goes into the group as its one external
        // sender (the server refuses a group without it).
        let removal_key = conn.status().await?.removal_key;
        let g = self.member.create_group(&removal_key)?;
        conn.create_group(g.group_info, g.ratchet_tree).await?;
        self.db.execute(
            "INSERT INTO groups (id, name, cursor, active, joined_at) VALUES (?1, ?2, 0, 1, ?3)",
            params![g.id, name, i64::try_from(now_unix()).unwrap_or(0)],
        )?;
        self.record(&g.id, 0, Some(&self.account()), "event", &format!("you created {name}"))?;
        Ok(g.id)
    }

    /// Sends the commit `build` makes; on `StaleEpoch` catches up and calls
    /// `build` again (at most [`COMMIT_ATTEMPTS`] times). Returns the
    /// commit's sequence.
    async fn send_commit<F>(&mut self, conn: &Connection, group: &[u8], mut build: F) -> Result<u64, AppError>
    where
        F: FnMut(&mut Member<Provider>) -> Result<Commit, AppError>,
    {
        for _ in 0..COMMIT_ATTEMPTS {
            self.sync_group(conn, group, &mut Vec::new()).await?;
            let commit = build(&mut self.member)?;
            match conn.commit(commit).await {
                Ok((seq, _)) => {
                    self.member.merge_pending(group)?;
                    self.mark_sent(group, seq)?;
                    self.set_cursor_if_next(group, seq)?;
                    return Ok(seq);
                }
                Err(e) => {
                    self.member.discard_pending(group)?;
                    if e.code() != Some(ErrorCode::StaleEpoch) {
                        return Err(e.into());
                    }
                }
            }
        }
        Err(AppError::GroupKeptChanging)
    }

    fn cursor(&self, group: &[u8]) -> Result<u64, AppError> {
        let c: i64 = self.db.query_row("SELECT cursor FROM groups WHERE id = ?1", [group], |r| r.get(0))?;
        Ok(u64::try_from(c).unwrap_or(0))
    }

    fn set_cursor(&self, group: &[u8], seq: u64) -> Result<(), AppError> {
        self.db.execute(
            "UPDATE groups SET cursor = MAX(cursor, ?2) WHERE id = ?1",
            params![group, i64::try_from(seq).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    /// Our own message was the next in the log: nothing to fetch for it.
    fn set_cursor_if_next(&self, group: &[u8], seq: u64) -> Result<(), AppError> {
        if self.cursor(group)? + 1 == seq {
            self.set_cursor(group, seq)?;
        }
        Ok(())
    }

    /// Adds accounts (all their devices) to a group. Every KeyPackage the
    /// server hands out must be certified by the account it was claimed
    /// for; if one is not, nothing is added and the refusal is recorded.
    pub async fn add(&mut self, conn: &Connection, group: &GroupRow, accounts: &[AccountId]) -> Result<(), AppError> {
        let gid = group.id.clone();
        let mut packages = vec![];
        for a in accounts {
            for p in conn.claim_key_packages(a).await? {
                if let Err(why) = super::mls::check_key_package(&p, a) {
                    let who = self.display(a);
                    self.record(
                        &gid,
                        self.cursor(&gid)?,
                        None,
                        "event",
                        &format!(
                            "refused to add {who}: the server handed out a KeyPackage {who} did not certify ({why})"
                        ),
                    )?;
                    return Err(AppError::Forged { who, why });
                }
                packages.push((*a, p));
            }
        }
        let seq = self.send_commit(conn, &gid, |m| Ok(m.add(&gid, &packages)?)).await?;
        for a in accounts {
            let who = self.display(a);
            self.record(&gid, seq, Some(&self.account()), "event", &format!("{who} was added by you"))?;
        }
        // Tell the new members the group's name, encrypted.
        let mut payload = vec![KIND_NAME];
        payload.extend_from_slice(group.name.as_bytes());
        self.send_payload(conn, &gid, &payload).await?;
        Ok(())
    }

    /// Removes accounts from a group.
    pub async fn remove(
        &mut self,
        conn: &Connection,
        group: &GroupRow,
        accounts: &[AccountId],
    ) -> Result<(), AppError> {
        let gid = group.id.clone();
        let targets = accounts.to_vec();
        let seq = self.send_commit(conn, &gid, |m| Ok(m.remove(&gid, &targets)?)).await?;
        for a in accounts {
            let who = self.display(a);
            self.record(&gid, seq, Some(&self.account()), "event", &format!("{who} was removed by you"))?;
        }
        Ok(())
    }

    /// Asks the group to remove us (another member's next commit does).
    pub async fn leave(&mut self, conn: &Connection, group: &GroupRow) -> Result<(), AppError> {
        self.sync_group(conn, &group.id, &mut Vec::new()).await?;
        let proposal = self.member.leave(&group.id)?;
        let (seq, _) = conn.send(proposal, None).await?;
        self.mark_sent(&group.id, seq)?;
        self.db.execute("UPDATE groups SET active = 0 WHERE id = ?1", [&group.id])?;
        self.record(&group.id, seq, Some(&self.account()), "event", "you left")?;
        Ok(())
    }

    /// A value every member of the group shares in its current epoch (the
    /// MLS epoch authenticator): equal values mean the same view of the
    /// group. `None` without state for the group.
    pub fn epoch_authenticator(&mut self, group: &GroupRow) -> Option<Vec<u8>> {
        self.member.epoch_authenticator(&group.id)
    }

    pub fn members(&mut self, group: &GroupRow) -> Vec<String> {
        self.member.members(&group.id).iter().map(|a| self.display(a)).collect()
    }

    async fn send_payload(&mut self, conn: &Connection, group: &[u8], payload: &[u8]) -> Result<u64, AppError> {
        if !self.member.has_group(group) {
            // Lost state: syncing rejoins the group first.
            self.sync_group(conn, group, &mut Vec::new()).await?;
        }
        for _ in 0..COMMIT_ATTEMPTS {
            let m = self.member.encrypt(group, payload)?;
            match conn.send(m, None).await {
                Ok((seq, _)) => {
                    self.mark_sent(group, seq)?;
                    self.set_cursor_if_next(group, seq)?;
                    return Ok(seq);
                }
                Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    self.sync_group(conn, group, &mut Vec::new()).await?;
                }
                Err(e) if e.code() == Some(ErrorCode::NotMember) => {
                    return Err(AppError::NotMember(self.group_name(group)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::GroupKeptChanging)
    }

    /// Sends text; it enters the history once the server acknowledged it.
    pub async fn send_text(&mut self, conn: &Connection, group: &GroupRow, text: &str) -> Result<u64, AppError> {
        if !group.active {
            return Err(AppError::NotMember(group.name.clone()));
        }
        let mut payload = vec![KIND_TEXT];
        payload.extend_from_slice(text.as_bytes());
        let seq = self.send_payload(conn, &group.id, &payload).await?;
        self.record(&group.id, seq, Some(&self.account()), "text", text)?;
        Ok(seq)
    }

    /// Publishes a fresh batch of KeyPackages (and a last-resort one).
    pub async fn publish_key_packages(&self, conn: &Connection, with_last_resort: bool) -> Result<(), AppError> {
        let n = KEY_PACKAGE_TARGET + usize::from(with_last_resort);
        let packages = self.member.key_packages(n)?;
        let last = with_last_resort.then(|| u16::try_from(n - 1).unwrap_or(0));
        conn.publish_key_packages(packages, last).await?;
        Ok(())
    }

    fn entry_now(&self, group: &[u8], seq: u64, sender: Option<&AccountId>, kind: &str, body: &str) -> Entry {
        Entry {
            group_id: group.to_vec(),
            group: self.group_name(group),
            seq,
            sender: sender.map(|a| self.display(a)).unwrap_or_default(),
            kind: kind.into(),
            body: body.into(),
            time: now_unix(),
        }
    }

    fn is_own(&self, group: &[u8], seq: u64) -> Result<bool, AppError> {
        Ok(self
            .db
            .prepare_cached("SELECT 1 FROM sent WHERE group_id = ?1 AND seq = ?2")?
            .exists(params![group, i64::try_from(seq).unwrap_or(i64::MAX)])?)
    }

    /// The local history of a group, oldest first.
    pub fn history(&self, group: &GroupRow) -> Result<Vec<Entry>, AppError> {
        let mut stmt =
            self.db.prepare("SELECT seq, sender, kind, body, time FROM history WHERE group_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map([&group.id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (seq, sender, kind, body, time) = row?;
            let sender = state::account_col(sender).map(|a| self.display(&a)).unwrap_or_default();
            out.push(Entry {
                group_id: group.id.clone(),
                group: group.name.clone(),
                seq: u64::try_from(seq).unwrap_or(0),
                sender,
                kind,
                body,
                time: u64::try_from(time).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Commits proposals others made (e.g. a member asking to leave).
    pub async fn commit_pending_proposals(&mut self, conn: &Connection, group: &GroupRow) -> Result<(), AppError> {
        let gid = group.id.clone();
        self.send_commit(conn, &gid, |m| Ok(m.commit_pending(&gid)?)).await?;
        Ok(())
    }
}

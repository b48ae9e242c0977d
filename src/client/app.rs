//! What the `hush` CLI does, as a library: contacts, groups and messages on
//! top of the client state, the MLS member and a server connection.
//!
//! Crash safety: a message enters the local history as sent only after
//! the server acknowledged it; a commit is merged locally only after the
//! server accepted it (otherwise it is discarded and, on `StaleEpoch`,
//! retried after catching up); a Welcome is acknowledged to the server
//! only after the group was joined and recorded.
//!
//! Each of those steps is one unit of work on the state file
//! ([`Local::unit`]): the MLS state, the history, the cursor and the record
//! of what this device sent change together. Payloads: [`Payload`].

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use super::local::EntryKind;
use super::local::{valid_name, HistoryRow, Local, LocalGroup};
use super::mls::{Commit, Member, MlsError, Received};
use super::payload::Payload;
use super::state::{self, Provider, StateError};
use super::{ClientError, Connection};
use crate::auth::{text, AccountId, DeviceCertificate, DeviceId, HushAddress, Identity, KeyError};
use crate::mls::Suite;
use crate::util::now_unix;
use crate::wire::{ErrorCode, GroupSummary};

mod backup;
mod devices;
pub mod files;
pub mod history;
mod sync;
mod verify;

pub use devices::{Certified, DeviceLine, DeviceLink, LINK_POLL};
pub use verify::ChainReport;

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
/// Setting holding the server's removal key (from `Status`).
const REMOVAL_KEY: &str = "removal_key";
/// Setting: the `not_before` of the newest online-key certificate this
/// device has seen from its server (8 bytes, big-endian).
const NEWEST_SERVER_CERT: &str = "newest_server_cert";

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
    Forged { who: String, why: super::mls::Unfit },
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
    #[error("could not rejoin the group: {0}")]
    RejoinRefused(String),
    #[error("no invitation to a group {0:?}; see `hush invitations`")]
    UnknownInvitation(String),
    #[error("the server misbehaved: {0}; nothing after that point was applied (try again, or ask its operator)")]
    Misbehaving(String),
    #[error(
        "only the account's first device (the one that registered) holds the account key and can do this; a lost \
         first device cannot be replaced: register a new account and have your contacts verify it"
    )]
    NotFirstDevice,
    #[error("{0}")]
    DeviceName(String),
    #[error("no device called {0:?}; see `hush device list`")]
    UnknownDevice(String),
    #[error("no new device used the link code before it expired; run `hush device add` again")]
    LinkTimedOut,
    #[error("{0}")]
    File(String),
    #[error("{0}")]
    Timer(String),
    #[error("{0}")]
    GroupFull(String),
    /// A transfer's connection kept failing (the network's fault, not the
    /// file's: worth another try later).
    #[error("{0}")]
    TransferGaveUp(String),
    #[error("{0:?} looks like a group id; choose a name that does not (ids name groups everywhere a name does)")]
    GroupNameLikeId(String),
    #[error(
        "{who} has no {suite} KeyPackage on the server (their hush may be older than post-quantum groups, or \
         have not synced since): ask them to update and sync, or create the group with --suite classic"
    )]
    NoSuiteKeyPackage { who: String, suite: Suite },
    #[error("{0}")]
    Suite(#[from] crate::mls::UnknownSuite),
    #[error(transparent)]
    Link(#[from] super::link::LinkError),
    #[error(transparent)]
    Backup(#[from] super::backup::BackupError),
    #[error(transparent)]
    Home(#[from] super::home::HomeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Mls(#[from] MlsError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl AppError {
    /// Whether a sync must stop on this error (the connection is gone, or
    /// the local state cannot be written), rather than record it in the
    /// group it happened in and go on with the others.
    pub fn stops_sync(&self) -> bool {
        match self {
            Self::Client(e) => e.code().is_none(),
            Self::State(_) | Self::Home(_) | Self::Key(_) => true,
            _ => false,
        }
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
    /// The sender's account, when a member wrote or did it.
    pub sender_account: Option<AccountId>,
    pub kind: EntryKind,
    pub body: String,
    pub time: u64,
    /// When it disappears (its group's timer), if it does.
    pub expires: Option<u64>,
    /// Handed over by another device of the account (see
    /// [`crate::client::local::HistoryRow::imported`]).
    pub imported: bool,
}

/// Whether `name` reads as a group id (base32 of 32 bytes): no group may
/// be called that, so an id always means the group it is the id of.
pub fn looks_like_group_id(name: &str) -> bool {
    text::decode_array::<32>(name.trim()).is_ok()
}

/// A local group, as shown.
#[derive(Debug, Clone)]
pub struct GroupRow {
    pub id: Vec<u8>,
    /// Its name, or its id until a member told us the name.
    pub name: String,
    pub active: bool,
}

impl From<LocalGroup> for GroupRow {
    fn from(g: LocalGroup) -> Self {
        Self { name: g.name.unwrap_or_else(|| text::encode(&g.id)), id: g.id, active: g.active }
    }
}

/// The open client: device key, pinned server, state (with the device
/// certificate and the MLS member).
pub struct App {
    pub home: PathBuf,
    /// This device's TLS key.
    pub device_key: Identity,
    pub server: HushAddress,
    local: Local,
    member: Member<Provider>,
    /// The groups the last [`App::sync`] could not sync (name, why).
    sync_failures: Vec<(String, String)>,
    /// When the server deletes the message being recorded (its group's
    /// timer, from the server's fetch): a received message's local copy
    /// goes no later ([`App::expiry`]).
    server_expiry: Option<u64>,
}

impl Drop for App {
    /// Secrets deleted during this session leave the write-ahead log too.
    fn drop(&mut self) {
        if let Err(e) = self.local.checkpoint() {
            tracing::warn!("could not checkpoint the client state: {e}");
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("home", &self.home).finish_non_exhaustive()
    }
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
        let (provider, local) = state::open(home)?;
        if let Some(cert) = local.setting(CERTIFICATE)? {
            return DeviceCertificate::decode(&cert)
                .map_err(|e| AppError::DamagedCertificate { home: home.to_owned(), why: e.to_string() });
        }
        let device = DeviceId(device_key.public_key());
        let member = Member::create(provider, account, device, now_unix())?;
        local.set_setting(CERTIFICATE, &member.certificate().encode())?;
        Ok(member.certificate().clone())
    }

    /// Starts the state of a device that is being linked: a fresh MLS
    /// signature key (its certificate comes from the first device).
    /// Returns the key's public half.
    pub fn prepare_linked(home: &Path) -> Result<[u8; 32], AppError> {
        let (provider, local) = state::open(home)?;
        if local.setting(CERTIFICATE)?.is_some() {
            return Err(super::home::HomeError::AlreadyDevice(home.to_owned()).into());
        }
        Ok(Member::new_signature_key(&provider)?)
    }

    /// Keeps the certificate the first device signed for this one.
    pub fn finish_linked(home: &Path, certificate: &DeviceCertificate) -> Result<(), AppError> {
        let (_, local) = state::open(home)?;
        local.set_setting(CERTIFICATE, &certificate.encode())?;
        Ok(())
    }

    /// Takes over the contacts and groups a first device handed over
    /// (names that are not usable are skipped). Returns how many of each.
    pub fn import(
        &mut self,
        bundle: &super::link::Bundle,
        history: Option<&super::history::HistoryRef>,
    ) -> Result<(usize, usize), AppError> {
        let unit = self.local.unit()?;
        // The first device's revocations: verified again, kept and
        // enforced as if this device had read them in its groups.
        let contacts = self.take_over(&bundle.revocations, &bundle.contacts)?;
        for g in &bundle.groups {
            let name = Some(g.name.as_str()).filter(|n| valid_name(n));
            self.local.put_group(&g.id, name, 0, now_unix())?;
            if !g.transcript.is_empty() {
                self.local.put_anchor(&g.id, g.epoch, &g.transcript)?;
            }
            if let Some(h) = &g.handover {
                let state = h.encode().map_err(|e| super::link::LinkError::Malformed(e.to_string()))?;
                self.local.put_handover(&g.id, &state)?;
            }
        }
        if let Some(h) = history {
            self.expect_history(h)?;
        }
        unit.commit()?;
        Ok((contacts, bundle.groups.len()))
    }

    /// Keeps the account-signed revocations (verified again) and the
    /// contacts (usable names only) another device of the account handed
    /// over; returns how many contacts were new.
    fn take_over(&mut self, revocations: &[Vec<u8>], contacts: &[(String, AccountId)]) -> Result<usize, AppError> {
        for bytes in revocations {
            if let Ok(r) = crate::auth::DeviceRevocation::decode(bytes) {
                self.learn_revocation(&r)?;
            }
        }
        let mut n = 0;
        for (name, account) in contacts {
            if valid_name(name) && self.local.put_contact(name.trim(), account)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Opens an initialised home.
    pub fn open(home: &Path, device_key: Identity, server: HushAddress) -> Result<Self, AppError> {
        let (provider, local) = state::open(home)?;
        let cert = local.setting(CERTIFICATE)?.ok_or_else(|| AppError::NoIdentity(home.to_owned()))?;
        let mut member = Member::load(provider, &cert)?;
        if member.device() != DeviceId(device_key.public_key()) {
            return Err(AppError::ForeignCertificate(home.to_owned()));
        }
        if let Some(key) = local.setting(REMOVAL_KEY)?.and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok()) {
            member.set_removal_key(key);
        }
        for statement in local.revocations()? {
            if let Ok(r) = crate::auth::DeviceRevocation::decode(&statement) {
                member.revoke(r.account, r.device);
            }
        }
        // Every run starts by deleting what expired since the last one.
        local.purge_expired(now_unix())?;
        Ok(Self {
            home: home.to_owned(),
            device_key,
            server,
            local,
            member,
            sync_failures: Vec::new(),
            server_expiry: None,
        })
    }

    pub fn account(&self) -> AccountId {
        self.member.account()
    }

    /// The groups the last sync could not sync, with why (each also has
    /// the failure in its history).
    pub fn sync_failures(&self) -> &[(String, String)] {
        &self.sync_failures
    }

    /// This device's certificate.
    pub fn certificate(&self) -> &DeviceCertificate {
        self.member.certificate()
    }

    /// Connects to the server. A server that presents an online key
    /// certified before the newest one this device has seen from it is
    /// refused: a stolen key of before a rotation works for nobody who saw
    /// the rotation (see SECURITY.md, "Rotating the server's key").
    pub async fn connect(&self) -> Result<Connection, AppError> {
        let conn = Connection::connect(&self.server, &self.device_key).await?;
        self.check_connection(&conn)?;
        Ok(conn)
    }

    /// What a connection to this device's server is made from (for a
    /// connection made elsewhere, as a daemon does in the background);
    /// hand it to [`App::check_connection`] before use.
    pub fn connection_parts(&self) -> Result<(HushAddress, crate::auth::tls::Credentials), AppError> {
        Ok((self.server.clone(), self.device_key.tls_credentials()?))
    }

    /// The checks [`App::connect`] makes of a new connection: the server's
    /// online key is none older than the newest this device has seen.
    pub fn check_connection(&self, conn: &Connection) -> Result<(), AppError> {
        if let Some(cert) = conn.server_cert() {
            let newest = self
                .local
                .setting(NEWEST_SERVER_CERT)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes);
            if cert.not_before < newest {
                return Err(ClientError::ServerKey(crate::auth::online::OnlineError::Superseded(newest)).into());
            }
            if cert.not_before > newest {
                self.local.set_setting(NEWEST_SERVER_CERT, &cert.not_before.to_be_bytes())?;
            }
        }
        Ok(())
    }

    // ---- contacts ----

    pub fn contact_add(&self, name: &str, account: &str) -> Result<AccountId, AppError> {
        let name = name.trim();
        if !valid_name(name) {
            return Err(AppError::ContactName);
        }
        let account: AccountId =
            account.parse().map_err(|e| AppError::NotAnAccount { text: account.to_owned(), why: format!("{e}") })?;
        if !self.local.put_contact(name, &account)? {
            return Err(AppError::AlreadyNamed);
        }
        Ok(account)
    }

    pub fn contacts(&self) -> Result<Vec<(String, AccountId)>, AppError> {
        Ok(self.local.contacts()?)
    }

    pub fn contact_remove(&self, name: &str) -> Result<(), AppError> {
        if !self.local.delete_contact(name)? {
            return Err(AppError::UnknownContact(name.into()));
        }
        Ok(())
    }

    /// A petname or an account id.
    pub fn resolve_contact(&self, who: &str) -> Result<AccountId, AppError> {
        if let Some(a) = self.local.contact(who)? {
            return Ok(a);
        }
        who.parse().map_err(|_| AppError::UnknownContact(who.into()))
    }

    /// How to show an account: "you", its petname, or a short fingerprint.
    pub fn display(&self, a: &AccountId) -> String {
        if *a == self.account() {
            return "you".into();
        }
        self.local.name_of(a).ok().flatten().unwrap_or_else(|| a.short())
    }

    // ---- groups ----

    pub fn groups(&self) -> Result<Vec<GroupRow>, AppError> {
        Ok(self.local.groups()?.into_iter().map(GroupRow::from).collect())
    }

    /// A group by id (base32, as `group list` shows it) or by local name.
    /// An id is looked for first: ids are unique, names are not, and a
    /// name can be anything a member chose.
    pub fn resolve_group(&self, name: &str) -> Result<GroupRow, AppError> {
        let groups = self.groups()?;
        let mut matches: Vec<&GroupRow> = groups.iter().filter(|g| text::encode(&g.id) == name).collect();
        if matches.is_empty() {
            matches = groups.iter().filter(|g| g.name == name).collect();
        }
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(AppError::UnknownGroup(name.into())),
            _ => Err(AppError::AmbiguousGroup(name.into())),
        }
    }

    fn group_name(&self, id: &[u8]) -> String {
        self.local.group_name(id).ok().flatten().unwrap_or_else(|| text::encode(id))
    }

    /// Records a history line and returns it as shown.
    fn record(
        &self,
        group: &[u8],
        seq: u64,
        sender: Option<&AccountId>,
        kind: EntryKind,
        body: &str,
    ) -> Result<Entry, AppError> {
        // What members wrote disappears with the group's timer; events
        // (joins, timer changes, alarms) stay.
        let expires = if kind == EntryKind::Text { self.expiry(group) } else { None };
        let row = HistoryRow {
            seq,
            sender: sender.copied(),
            kind,
            body: body.into(),
            time: now_unix(),
            expires,
            imported: false,
        };
        self.local.record(group, &row)?;
        Ok(self.entry(group, &self.group_name(group), row))
    }

    /// When a message recorded now in `group` expires: its timer from now
    /// (the timer of the epoch it was sent in: messages are read in
    /// order), and no later than the server said it deletes it.
    fn expiry(&self, group: &[u8]) -> Option<u64> {
        let timer = self.member.settings_of(group)?.disappear()?;
        let local = now_unix().saturating_add(u64::from(timer));
        Some(self.server_expiry.map_or(local, |s| s.min(local)))
    }

    /// Deletes the history lines and file messages whose time is up;
    /// returns how many went (a running `hush chat` calls this every
    /// second).
    pub fn purge_expired(&self) -> Result<u64, AppError> {
        Ok(self.local.purge_expired(now_unix())?)
    }

    /// A stored history line as shown.
    fn entry(&self, group: &[u8], name: &str, row: HistoryRow) -> Entry {
        Entry {
            group_id: group.to_vec(),
            group: name.to_owned(),
            seq: row.seq,
            sender: row.sender.map(|a| self.display(&a)).unwrap_or_default(),
            sender_account: row.sender,
            kind: row.kind,
            body: row.body,
            time: row.time,
            expires: row.expires,
            imported: row.imported,
        }
    }

    /// Creates a group named `name` (the name stays local until members are
    /// added, who receive it encrypted).
    pub async fn create_group(&mut self, conn: &Connection, name: &str, suite: Suite) -> Result<Vec<u8>, AppError> {
        if looks_like_group_id(name) {
            return Err(AppError::GroupNameLikeId(name.into()));
        }
        if self.groups()?.iter().any(|g| g.name == name && g.active) {
            return Err(AppError::GroupExists(name.into()));
        }
        // The server's removal key goes into the group as its one external
        // sender (the server refuses a group without it).
        let removal_key = conn.status().await?.removal_key;
        let g = self.member.create_group_of(&removal_key, suite)?;
        conn.create_group(g.group_info, g.ratchet_tree).await?;
        let unit = self.local.unit()?;
        self.local.put_group(&g.id, Some(name), 0, now_unix())?;
        self.record(&g.id, 0, Some(&self.account()), EntryKind::Event, &format!("you created {name}"))?;
        unit.commit()?;
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
            let message = commit.message.clone();
            match conn.accepted(&commit.into_request()).await {
                Ok(a) => {
                    let unit = self.local.unit()?;
                    self.member.merge_pending(group)?;
                    self.sent_chained(group, &a, &message, &mut Vec::new())?;
                    self.note_timer(group)?;
                    unit.commit()?;
                    return Ok(a.seq);
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

    /// Adds accounts (all their devices) to a group. Every KeyPackage the
    /// server hands out must be certified by the account it was claimed
    /// for; if one is not, nothing is added and the refusal is recorded.
    pub async fn add(&mut self, conn: &Connection, group: &GroupRow, accounts: &[AccountId]) -> Result<(), AppError> {
        let gid = group.id.clone();
        let suite = match self.member.suite_of(&gid) {
            Some(s) => s?,
            None => return Err(AppError::NotMember(group.name.clone())),
        };
        let mut packages = vec![];
        for a in accounts {
            let claimed = match conn.claim_key_packages_of(a, suite).await {
                Ok(p) => p,
                Err(e) if suite != Suite::Classic && e.code() == Some(ErrorCode::NoKeyPackage) => {
                    return Err(AppError::NoSuiteKeyPackage { who: self.display(a), suite })
                }
                Err(e) => return Err(e.into()),
            };
            for p in claimed {
                if let Err(why) = super::mls::check_key_package(&p, a) {
                    let who = self.display(a);
                    self.record(
                        &gid,
                        self.local.cursor(&gid)?,
                        None,
                        EntryKind::Event,
                        &format!(
                            "refused to add {who}: the server handed out a KeyPackage {who} did not certify ({why})"
                        ),
                    )?;
                    return Err(AppError::Forged { who, why });
                }
                packages.push((*a, p));
            }
        }
        let max = crate::limits::MAX_PQ_GROUP_MEMBERS;
        let devices = u64::try_from(self.member.devices(&gid).len() + packages.len()).unwrap_or(u64::MAX);
        if suite == Suite::Pq && devices > max {
            return Err(AppError::GroupFull(format!(
                "the group would have {devices} devices; post-quantum groups hold at most {max} (their keys are 38 times larger than classic ones)"
            )));
        }
        let seq = self.send_commit(conn, &gid, |m| Ok(m.add(&gid, &packages)?)).await?;
        for a in accounts {
            let who = self.display(a);
            self.record(&gid, seq, Some(&self.account()), EntryKind::Event, &format!("{who} was added by you"))?;
        }
        // Tell the new members the group's name, encrypted.
        self.send_payload(conn, &gid, &Payload::GroupName(group.name.clone())).await?;
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
            self.record(&gid, seq, Some(&self.account()), EntryKind::Event, &format!("{who} was removed by you"))?;
        }
        Ok(())
    }

    /// Sets the group's disappearing-message timer (`secs`, 0: off) by a
    /// commit every member processes and sees as an event; the server
    /// reads it from the same commit and deletes the group's messages (and
    /// files) that long after it accepts them. Messages sent before keep
    /// the timer they were sent under.
    pub async fn set_disappear(&mut self, conn: &Connection, group: &GroupRow, secs: u32) -> Result<(), AppError> {
        if !group.active {
            return Err(AppError::NotMember(group.name.clone()));
        }
        if u64::from(secs) > crate::limits::MAX_DISAPPEAR.as_secs() {
            return Err(AppError::Timer(format!(
                "{} is longer than the longest timer, {}",
                crate::util::format_timer(u64::from(secs)),
                crate::util::format_timer(crate::limits::MAX_DISAPPEAR.as_secs())
            )));
        }
        self.know_removal_key(conn).await?;
        let gid = group.id.clone();
        let settings = crate::mls::GroupSettings { disappear_secs: secs };
        let seq = self.send_commit(conn, &gid, |m| Ok(m.set_settings(&gid, settings)?)).await?;
        let line = timer_event("you", secs);
        self.record(&gid, seq, Some(&self.account()), EntryKind::Event, &line)?;
        Ok(())
    }

    /// The group's disappearing-message timer in seconds (0: off), as its
    /// members agreed it.
    pub fn disappear(&self, group: &GroupRow) -> u32 {
        self.member.settings_of(&group.id).map_or(0, |s| s.disappear_secs)
    }

    /// The group's ciphersuite as shown: `classic`, `pq`, or what an
    /// unknown one is (`None`: no state for it on this device).
    pub fn suite(&self, group: &GroupRow) -> Option<String> {
        self.member.suite_of(&group.id).map(|s| match s {
            Ok(suite) => suite.to_string(),
            Err(e) => e.to_string(),
        })
    }

    /// Asks the group to remove us (another member's next commit does).
    pub async fn leave(&mut self, conn: &Connection, group: &GroupRow) -> Result<(), AppError> {
        self.sync_group(conn, &group.id, &mut Vec::new()).await?;
        // Every device of this account leaves; the server stops counting
        // the group at once, whether or not anyone commits it.
        let mut seq = 0;
        for proposal in self.member.leave_account(&group.id)? {
            seq = conn.send(proposal, None).await?.0;
            self.local.mark_sent(&group.id, seq)?;
        }
        let unit = self.local.unit()?;
        self.local.deactivate(&group.id)?;
        self.record(&group.id, seq, Some(&self.account()), EntryKind::Event, "you left")?;
        unit.commit()?;
        Ok(())
    }

    /// Keeps a verified, account-signed revocation and refuses its device
    /// as a leaf from now on; false if it was known already.
    pub(crate) fn learn_revocation(&mut self, r: &crate::auth::DeviceRevocation) -> Result<bool, AppError> {
        self.member.revoke(r.account, r.device);
        Ok(self.local.put_revocation(&r.device, &r.encode())?)
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

    /// The accounts in a group.
    pub fn member_accounts(&mut self, group: &GroupRow) -> Vec<AccountId> {
        self.member.members(&group.id)
    }

    /// Sends a payload; text enters the history once the server accepted
    /// it.
    async fn send_payload(&mut self, conn: &Connection, group: &[u8], payload: &Payload) -> Result<u64, AppError> {
        if !self.member.has_group(group) {
            // Lost state: syncing rejoins the group first.
            self.sync_group(conn, group, &mut Vec::new()).await?;
        }
        let bytes = payload.encode();
        for _ in 0..COMMIT_ATTEMPTS {
            // Nothing goes to a group where a device its account revoked
            // holds a leaf (it came back, or nobody removed it yet).
            self.remove_revoked(conn, group).await?;
            if self.member.should_commit_pending(group) {
                // A proposal came in since the last sync: while one waits,
                // no message can be sent in this epoch.
                let row = GroupRow { id: group.to_vec(), name: self.group_name(group), active: true };
                self.commit_pending_proposals(conn, &row).await?;
            }
            // The last head the server signed for us goes with the message,
            // signed by us: receivers compare it with their own chain.
            let aad = self.claim(group)?;
            let m = self.member.encrypt_with_aad(group, &bytes, aad)?;
            let request = crate::wire::Request::Send { message: m.clone(), welcome: None, group_info: None };
            match conn.accepted(&request).await {
                Ok(a) => {
                    let unit = self.local.unit()?;
                    self.sent_chained(group, &a, &m, &mut Vec::new())?;
                    match payload {
                        Payload::Text(text) => {
                            self.record(group, a.seq, Some(&self.account()), EntryKind::Text, text)?;
                        }
                        Payload::File(file) => {
                            self.record_file(group, a.seq, Some(&self.account()), file)?;
                        }
                        _ => {}
                    }
                    unit.commit()?;
                    return Ok(a.seq);
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
        self.send_payload(conn, &group.id, &Payload::Text(text.to_owned())).await
    }

    /// Publishes a fresh batch of KeyPackages (and a last-resort one) of
    /// every suite.
    pub async fn publish_key_packages(&self, conn: &Connection, with_last_resort: bool) -> Result<(), AppError> {
        for suite in Suite::ALL {
            self.publish_suite(conn, suite, with_last_resort).await?;
        }
        Ok(())
    }

    /// Publishes a batch of `suite`'s KeyPackages. A server older than
    /// post-quantum groups refuses those: the device then goes on with
    /// classic ones only (it cannot be added to a post-quantum group there).
    async fn publish_suite(&self, conn: &Connection, suite: Suite, with_last_resort: bool) -> Result<(), AppError> {
        let n = KEY_PACKAGE_TARGET + usize::from(with_last_resort);
        let packages = self.member.key_packages_of(suite, n)?;
        let last = with_last_resort.then(|| u16::try_from(n - 1).unwrap_or(0));
        match conn.publish_key_packages(packages, last).await {
            Ok(_) => Ok(()),
            Err(e) if suite != Suite::Classic && older_server(&e) => {
                tracing::warn!("the server does not take {suite} KeyPackages: {e}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Tops up each suite's KeyPackages when fewer than
    /// [`KEY_PACKAGE_LOW`] are left, or the last-resort one is missing.
    pub async fn top_up_key_packages(&self, conn: &Connection) -> Result<(), AppError> {
        for suite in Suite::ALL {
            let (count, last_resort) = match conn.count_key_packages_of(suite).await {
                Ok(c) => c,
                Err(e) if suite != Suite::Classic && older_server(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            if count < KEY_PACKAGE_LOW || !last_resort {
                self.publish_suite(conn, suite, !last_resort).await?;
            }
        }
        Ok(())
    }

    /// The local history of a group, oldest first.
    pub fn history(&self, group: &GroupRow) -> Result<Vec<Entry>, AppError> {
        let now = now_unix();
        Ok(self
            .local
            .history(&group.id)?
            .into_iter()
            .filter(|row| row.expires.is_none_or(|t| t > now))
            .map(|row| self.entry(&group.id, &group.name, row))
            .collect())
    }

    /// Commits proposals others made (e.g. a member asking to leave).
    /// Returns the history lines saying what the commit did.
    pub async fn commit_pending_proposals(
        &mut self,
        conn: &Connection,
        group: &GroupRow,
    ) -> Result<Vec<Entry>, AppError> {
        let gid = group.id.clone();
        let mut removals = Vec::new();
        let seq = self
            .send_commit(conn, &gid, |m| {
                removals = m.committable_removals(&gid);
                Ok(m.commit_pending(&gid)?)
            })
            .await?;
        let me = self.account();
        let mut lines = Vec::new();
        for r in removals {
            let who = if r.account == me { "one of your devices".to_string() } else { self.display(&r.account) };
            let line = match r.by {
                super::mls::RemovedBy::Server => format!(
                    "you committed the server's removal of {who} (a revoked device, or an account its operator removed)"
                ),
                _ => format!("you committed {who}'s leaving the group"),
            };
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        lines.into_iter().map(|l| self.record(&gid, seq, Some(&me), EntryKind::Event, &l)).collect()
    }
}

/// Whether `e` is how a server older than post-quantum groups refuses
/// them (an unknown request, or a KeyPackage of a suite it does not take).
fn older_server(e: &ClientError) -> bool {
    matches!(e.code(), Some(ErrorCode::UnknownRequest | ErrorCode::InvalidKeyPackage))
}

/// The history line for a timer change by `who`.
pub(crate) fn timer_event(who: &str, secs: u32) -> String {
    if secs == 0 {
        format!("{who} turned disappearing messages off")
    } else {
        format!(
            "{who} set disappearing messages to {}: new messages are deleted from every device and the server that long after they are sent",
            crate::util::format_timer(u64::from(secs))
        )
    }
}

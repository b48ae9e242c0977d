//! Everything the server persists, behind one interface.
//!
//! [`Storage`] covers accounts, devices, invites, KeyPackages, groups, the
//! log, the Welcome inbox and cursors, with its own row types (no protocol
//! frames). Implementations: [`super::memory::MemoryStore`] (unit tests,
//! fuzzing) and the SQLite store in [`crate::db::sqlite`]. The core calls these
//! methods inside one unit of work per request; a [`Backend`] says how units
//! of work begin and end (the engine, [`crate::server::engine`], wraps each
//! request in a savepoint inside a batched transaction, so a request either
//! applies all of its writes or none, and is acknowledged only after the
//! transaction commits).
//!
//! Sequence numbers are per group, start at 1 and never repeat. Times are
//! Unix seconds passed in by the caller.
//!
//! Members are *devices* (one MLS leaf each); every membership row also
//! names the device's account, for per-account quotas.

use crate::auth::{AccountId, DeviceId};
use crate::chain::{Head, MessageDigest};
use crate::mls::Suite;
use crate::wire::Logged;

/// A registered account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountRecord {
    pub account: AccountId,
    pub created_at: u64,
    /// Set once the operator removed (offboarded) the account.
    pub removed_at: Option<u64>,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub account: AccountId,
    /// The device certificate it registered with (verified then).
    pub certificate: Vec<u8>,
    pub created_at: u64,
    /// Set once the device was revoked (or its account removed).
    pub revoked_at: Option<u64>,
}

impl DeviceRecord {
    /// A device as it registers.
    pub fn new(account: AccountId, certificate: Vec<u8>, now: u64) -> Self {
        Self { account, certificate, created_at: now, revoked_at: None }
    }
}

/// An invite. The secret itself is never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRecord {
    pub id: [u8; 8],
    pub secret_hash: [u8; 32],
    pub uses_total: u32,
    pub uses_left: u32,
    pub expires_at: Option<u64>,
    pub created_at: u64,
}

impl InviteRecord {
    /// A new invite for `token`, good for `uses` registrations until
    /// `expires_at`.
    pub fn new(token: &crate::auth::InviteToken, uses: u32, expires_at: Option<u64>, now: u64) -> Self {
        Self {
            id: token.id(),
            secret_hash: token.secret_hash(),
            uses_total: uses,
            uses_left: uses,
            expires_at,
            created_at: now,
        }
    }
}

/// A one-time link for a new device (see [`super::links`]): the server
/// holds its id, whose it is, and ciphertext it cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    pub id: [u8; 16],
    /// The account the new device joins.
    pub account: AccountId,
    pub created_at: u64,
    pub expires_at: u64,
    /// The key that made the offer (the new device), once one did.
    pub device: Option<DeviceId>,
    pub offer: Option<Vec<u8>>,
    /// The first device's answer: the certificate and the sealed bundle.
    pub answer: Option<(Vec<u8>, Vec<u8>)>,
}

/// A group as one device sees it in its group list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group: Vec<u8>,
    /// The current epoch, or the epoch of the device's removal.
    pub epoch: u64,
    /// The last sequence, or the sequence of the device's removal.
    pub last_seq: u64,
    pub acked: u64,
    /// The first message the server still holds (0: none): those before it
    /// were read by everyone, or expired.
    pub first_seq: u64,
    /// False once the device was removed.
    pub current: bool,
}

/// A group's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// The current MLS epoch.
    pub epoch: u64,
    /// The public MLS state ([`super::mls::encode_state`]).
    pub state: Vec<u8>,
    /// Counts the changes of the state ([`Storage::update_group`]) and of
    /// who is a current member ([`Storage::add_member`],
    /// [`Storage::remove_member`]): a verdict prepared against one version,
    /// and a roster the writer cached at it, hold only while the group is
    /// at it.
    pub version: u64,
    /// The sequence number of the last message (0: none yet).
    pub last_seq: u64,
    /// The disappearing-message timer of its current epoch, in seconds (0:
    /// none), as its group context says ([`crate::mls::settings_of`]).
    pub disappear: u32,
}

/// Where a group's chain (issue 31, [`crate::chain`]) stands: the sequence
/// number of its first message (a group from before the chain starts it at
/// the first message after the upgrade), and the head after its last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainTip {
    pub start: u64,
    pub seq: u64,
    pub head: Head,
}

impl ChainTip {
    /// The tip after the message whose digest is `message` (at `seq`, of
    /// `epoch`) is appended to the
    /// group whose tip was `before` (`None`: no message since the chain
    /// began).
    pub fn after(before: Option<ChainTip>, group: &[u8], seq: u64, epoch: u64, message: &MessageDigest) -> Self {
        let (start, prev) = match before {
            Some(t) => (t.start, t.head),
            None => (seq, Head::genesis(group)),
        };
        Self { start, seq, head: prev.next_digest(seq, epoch, message) }
    }
}

/// A device's relation to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// The account the device belongs to.
    pub account: AccountId,
    /// Messages after this sequence are visible (the commit that added the
    /// member, or 0 for the creator).
    pub joined_after: u64,
    /// Set when the member was removed: messages up to and including this
    /// sequence (the removing commit) stay visible, later ones do not.
    pub left_at: Option<u64>,
    /// Highest sequence the member acknowledged.
    pub acked: u64,
}

impl Membership {
    pub fn is_current(&self) -> bool {
        self.left_at.is_none()
    }
}

/// What the hot path of an application message needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendContext {
    /// The group's current epoch.
    pub epoch: u64,
    /// The sender's relation to the group, if any.
    pub membership: Option<Membership>,
    /// Messages stored for the group ([`Storage::log_len`]).
    pub log_len: u64,
    /// The group's disappearing-message timer (seconds, 0: none).
    pub disappear: u32,
    /// The version of the group's state ([`GroupRecord::version`]).
    pub version: u64,
}

/// Messages with their sequence numbers and chain heads, in order.
pub type Messages = Vec<Logged>;

/// Welcomes as `(id, MLSMessage)`, in order.
pub type Welcomes = Vec<(u64, Vec<u8>)>;

/// A page of entries within a count and a byte budget, and always at least
/// one entry when there is one: every storage fills its fetch (of
/// [`Logged`] messages) and Welcome (`(id, bytes)`) answers through this.
#[derive(Debug)]
pub struct Page<T = (u64, Vec<u8>)> {
    limit: usize,
    budget: usize,
    bytes: usize,
    entries: Vec<T>,
    more: bool,
}

impl<T> Page<T> {
    pub fn new(limit: usize, budget: usize) -> Self {
        Self { limit, budget, bytes: 0, entries: Vec::new(), more: false }
    }

    /// Whether an entry of `len` bytes still fits; once one does not, the
    /// page is full and says more remain.
    pub fn fits(&mut self, len: usize) -> bool {
        let full = self.entries.len() >= self.limit
            || (!self.entries.is_empty() && self.bytes.saturating_add(len) > self.budget);
        self.more |= full;
        !full
    }

    /// Adds an entry of `len` bytes that [`Page::fits`].
    pub fn push(&mut self, entry: T, len: usize) {
        self.bytes = self.bytes.saturating_add(len);
        self.entries.push(entry);
    }

    /// The entries, and whether more remain.
    pub fn finish(self) -> (Vec<T>, bool) {
        (self.entries, self.more)
    }
}

/// What the server holds, in counts only (`hushd stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Accounts not removed.
    pub accounts: u64,
    pub removed_accounts: u64,
    /// Devices not revoked.
    pub devices: u64,
    pub groups: u64,
    /// Messages held (not yet acknowledged by every member, nor expired).
    pub messages: u64,
    /// When the oldest held message was stored.
    pub oldest_message: Option<u64>,
    /// Welcomes waiting for their device.
    pub welcomes: u64,
    /// Invites with uses left that have not expired.
    pub invites_outstanding: u64,
    /// Bytes the database occupies.
    pub database_bytes: u64,
    /// Blobs (files) held, complete or being uploaded.
    pub blobs: u64,
    /// Their sizes, summed.
    pub blob_bytes: u64,
}

/// A blob's row (issue 32, [`super::blobs`]); its bytes live in the
/// server's blob store, under its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    pub id: [u8; 16],
    /// The group it was uploaded for.
    pub group: Vec<u8>,
    /// The uploader (its quota pays for the blob).
    pub account: AccountId,
    pub device: DeviceId,
    /// The blob's size as opened.
    pub size: u64,
    /// Bytes held durably.
    pub received: u64,
    /// The SHA-256 of the stored blob, once complete.
    pub hash: Option<[u8; 32]>,
    pub created_at: u64,
    pub completed_at: Option<u64>,
    /// When the group's disappearing timer deletes it (set on completion).
    pub expires_at: Option<u64>,
}

/// A KeyPackage to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKeyPackage {
    /// `KeyPackageRef` (RFC 9420 §5.2): how a Welcome names its recipient.
    pub hash_ref: Vec<u8>,
    pub data: Vec<u8>,
    pub last_resort: bool,
    pub suite: Suite,
}

/// Storage operations of the server.
pub trait Storage {
    type Error: std::fmt::Display;

    /// Whether another transaction can commit between this one's reads and
    /// its end (a database several nodes and the operator's commands share,
    /// at read committed). A cache that a database trigger keeps true only
    /// by seeing this transaction's rows is then not used: another
    /// transaction's trigger cannot see rows this one has not committed
    /// (red team, issue 37: a revocation racing an add).
    const SHARED: bool = false;

    fn account_exists(&mut self, account: &AccountId) -> Result<bool, Self::Error>;
    /// All accounts, oldest first.
    fn accounts(&mut self) -> Result<Vec<AccountRecord>, Self::Error>;
    /// Creates an account (which must not exist), registered with `invite`.
    fn insert_account(&mut self, account: &AccountId, invite: Option<[u8; 8]>, now: u64) -> Result<(), Self::Error>;
    /// The registered device with this key, if any.
    fn device(&mut self, device: &DeviceId) -> Result<Option<DeviceRecord>, Self::Error>;
    /// Registers a device (which must not exist) of an existing account.
    fn insert_device(&mut self, device: &DeviceId, record: &DeviceRecord) -> Result<(), Self::Error>;
    /// The devices of `account`, revoked ones included, oldest first.
    fn devices_of(&mut self, account: &AccountId) -> Result<Vec<(DeviceId, DeviceRecord)>, Self::Error>;
    /// Marks a device revoked at `now` (if it was not) and deletes its
    /// KeyPackages; advances the [`GroupRecord::version`] of each group it
    /// is a current member of.
    fn revoke_device(&mut self, device: &DeviceId, now: u64) -> Result<(), Self::Error>;
    /// Marks an account removed at `now` (if it was not).
    fn remove_account(&mut self, account: &AccountId, now: u64) -> Result<(), Self::Error>;
    /// The account's row, if registered.
    fn account(&mut self, account: &AccountId) -> Result<Option<AccountRecord>, Self::Error>;
    /// In a write unit, makes other writers of the same database that lock
    /// `account` wait until this unit ends, so a decision on the account's
    /// devices (a cap) sees theirs and they see this one's. A store with a
    /// single writer has nothing to do.
    fn lock_account(&mut self, account: &AccountId) -> Result<(), Self::Error> {
        let _ = account;
        Ok(())
    }

    fn insert_link(&mut self, link: &LinkRecord) -> Result<(), Self::Error>;
    fn link(&mut self, id: &[u8; 16]) -> Result<Option<LinkRecord>, Self::Error>;
    /// Records the offer, if the link has none yet (decided by the storage,
    /// so a link is offered to once even with racing offers).
    fn set_link_offer(&mut self, id: &[u8; 16], device: &DeviceId, offer: &[u8]) -> Result<bool, Self::Error>;
    /// Records the answer, if the link has an offer and no answer yet.
    fn set_link_answer(&mut self, id: &[u8; 16], certificate: &[u8], bundle: &[u8]) -> Result<bool, Self::Error>;
    /// Links of `account` that have not expired at `now`.
    fn open_links(&mut self, account: &AccountId, now: u64) -> Result<u64, Self::Error>;
    /// Deletes links that expired before `now`. Returns how many.
    fn expire_links(&mut self, now: u64) -> Result<u64, Self::Error>;

    fn insert_invite(&mut self, invite: &InviteRecord) -> Result<(), Self::Error>;
    fn invite(&mut self, id: &[u8; 8]) -> Result<Option<InviteRecord>, Self::Error>;
    /// Spends one use of the invite if it has one left; false if it had
    /// none (decided by the storage, so two registrations racing for the
    /// last use cannot both win, on one node or several).
    fn spend_invite(&mut self, id: &[u8; 8]) -> Result<bool, Self::Error>;
    /// All invites, newest first.
    fn invites(&mut self) -> Result<Vec<InviteRecord>, Self::Error>;

    /// A device's packages of `suite`: (held excluding the last-resort
    /// one, whether a last-resort one exists).
    fn key_package_count(&mut self, device: &DeviceId, suite: Suite) -> Result<(u32, bool), Self::Error>;
    /// Adds packages of `device` (of `account`); a new last-resort package
    /// replaces the old one of its suite. Re-uploading a package already
    /// held is a no-op.
    fn add_key_packages(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        packages: &[NewKeyPackage],
        now: u64,
    ) -> Result<(), Self::Error>;
    /// For each device of `account` (in a stable order): removes and
    /// returns one of its packages of `suite`, or returns (and keeps) its
    /// last-resort one of that suite when no other is left. Devices without
    /// any package of the suite are skipped. Records who owns each returned
    /// package's `hash_ref`, for Welcome routing.
    fn claim_key_packages(&mut self, account: &AccountId, suite: Suite, now: u64) -> Result<Vec<Vec<u8>>, Self::Error>;
    /// The account and device of a package this server handed out.
    fn claimed_owner(&mut self, hash_ref: &[u8]) -> Result<Option<(AccountId, DeviceId)>, Self::Error>;

    fn group(&mut self, group: &[u8]) -> Result<Option<GroupRecord>, Self::Error>;
    /// The group's epoch, `device`'s membership and the group's backlog
    /// (the hot path of every application message, which needs no group
    /// state); `None` if the group does not exist. One lookup where the
    /// store can (the SQL stores do).
    fn send_context(&mut self, group: &[u8], device: &DeviceId) -> Result<Option<SendContext>, Self::Error> {
        let Some((epoch, disappear, version)) = self.group(group)?.map(|g| (g.epoch, g.disappear, g.version)) else {
            return Ok(None);
        };
        let membership = self.membership(group, device)?;
        let log_len = self.log_len(group)?;
        Ok(Some(SendContext { epoch, membership, log_len, disappear, version }))
    }
    fn insert_group(&mut self, group: &[u8], epoch: u64, state: &[u8], now: u64) -> Result<(), Self::Error>;
    /// Stores the group's new epoch and state, and advances its
    /// [`GroupRecord::version`].
    fn update_group(&mut self, group: &[u8], epoch: u64, state: &[u8]) -> Result<(), Self::Error>;
    /// Records the group's disappearing-message timer (seconds, 0: none)
    /// after a commit changed it: messages accepted from now on expire
    /// that long after.
    fn set_disappear(&mut self, group: &[u8], secs: u32) -> Result<(), Self::Error>;
    /// The GroupInfo of the group's current epoch, as the member that
    /// created that epoch signed it (what a member rejoins from).
    fn group_info(&mut self, group: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;
    /// Replaces the group's GroupInfo (at creation and with every commit).
    fn set_group_info(&mut self, group: &[u8], info: &[u8]) -> Result<(), Self::Error>;

    fn membership(&mut self, group: &[u8], device: &DeviceId) -> Result<Option<Membership>, Self::Error>;
    /// Whether `device` was a member of `group` once and its row is gone
    /// (it read up to its removal): such a device never reads the group's
    /// log again through its account's membership.
    fn was_member(&mut self, group: &[u8], device: &DeviceId) -> Result<bool, Self::Error>;
    /// Every device that is or was a member, with its membership.
    fn members(&mut self, group: &[u8]) -> Result<Vec<(DeviceId, Membership)>, Self::Error>;
    /// Current member devices (not removed), in a stable order.
    fn current_members(&mut self, group: &[u8]) -> Result<Vec<DeviceId>, Self::Error> {
        Ok(self.members(group)?.into_iter().filter(|(_, m)| m.is_current()).map(|(d, _)| d).collect())
    }
    /// Current member devices of `group` that are revoked (their removal is
    /// still to be committed).
    fn revoked_members(&mut self, group: &[u8]) -> Result<Vec<DeviceId>, Self::Error>;
    /// Makes `device` (of `account`) a current member whose visible history
    /// starts after `joined_after` (re-adding a former member resets its
    /// row); advances the group's [`GroupRecord::version`].
    fn add_member(
        &mut self,
        group: &[u8],
        device: &DeviceId,
        account: &AccountId,
        joined_after: u64,
    ) -> Result<(), Self::Error>;
    /// Marks `device` removed by the message at `left_at`, which the group
    /// sent in `epoch` (what the device keeps seeing in its group list);
    /// advances the group's [`GroupRecord::version`].
    fn remove_member(&mut self, group: &[u8], device: &DeviceId, left_at: u64, epoch: u64) -> Result<(), Self::Error>;
    /// Forgets a removed device's row (it has read up to its removal).
    fn delete_member(&mut self, group: &[u8], device: &DeviceId) -> Result<(), Self::Error>;
    fn set_acked(&mut self, group: &[u8], device: &DeviceId, seq: u64) -> Result<(), Self::Error>;

    /// Appends a message with the next sequence number, extends the
    /// group's chain with it ([`ChainTip::after`]), and returns the
    /// sequence number and the new head.
    /// `digest` is the message's ([`MessageDigest::of`]), computed by the
    /// caller (the engine does it before the writer). `expires`: when the
    /// group's timer deletes it (what [`Storage::expire_messages`] takes).
    fn append(
        &mut self,
        group: &[u8],
        epoch: u64,
        message: &[u8],
        digest: &MessageDigest,
        now: u64,
        expires: Option<u64>,
    ) -> Result<(u64, Head), Self::Error>;
    /// Where the group's chain stands; `None` if no message was appended
    /// since it began (or no such group).
    fn chain_tip(&mut self, group: &[u8]) -> Result<Option<ChainTip>, Self::Error>;
    /// The group's chain head after message `seq`, if that message is still
    /// stored with one (or is the group's last).
    fn head_at(&mut self, group: &[u8], seq: u64) -> Result<Option<Head>, Self::Error> {
        if let Some(tip) = self.chain_tip(group)?.filter(|t| t.seq == seq) {
            return Ok(Some(tip.head));
        }
        let (messages, _) = self.fetch(group, seq.saturating_sub(1), Some(seq), 1, 0)?;
        Ok(messages.into_iter().find(|m| m.seq == seq).and_then(|m| m.head))
    }
    /// Messages with `after < seq <= upto` (no upper bound if `None`), in
    /// order, at most `limit` of them and at most `byte_budget` bytes (but
    /// always at least one if any). Returns them and whether more remain.
    /// A message with a timer carries its `expires`; one that expired and
    /// was swept comes `gone` (the caller hides one whose time is up but
    /// that no sweep reached yet).
    fn fetch(
        &mut self,
        group: &[u8],
        after: u64,
        upto: Option<u64>,
        limit: usize,
        byte_budget: usize,
    ) -> Result<(Messages, bool), Self::Error>;
    /// Deletes messages of `group` with `seq <= upto`. Returns how many.
    fn delete_messages_upto(&mut self, group: &[u8], upto: u64) -> Result<u64, Self::Error>;

    fn add_welcome(&mut self, recipient: &DeviceId, group: &[u8], welcome: &[u8], now: u64)
        -> Result<u64, Self::Error>;
    fn welcomes(
        &mut self,
        recipient: &DeviceId,
        limit: usize,
        byte_budget: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Self::Error>;
    fn delete_welcome(&mut self, recipient: &DeviceId, id: u64) -> Result<bool, Self::Error>;

    /// The groups `device` is or was in, as it sees them: a removed device
    /// sees the epoch and last sequence of its removal.
    fn groups_of(&mut self, device: &DeviceId, limit: usize) -> Result<Vec<GroupListing>, Self::Error>;

    /// Groups any device of `account` is a current member of.
    fn groups_count(&mut self, account: &AccountId) -> Result<u64, Self::Error>;
    /// Messages stored for `group`.
    fn log_len(&mut self, group: &[u8]) -> Result<u64, Self::Error>;
    /// Bytes the store occupies (for the storage quota).
    fn database_bytes(&mut self) -> Result<u64, Self::Error>;

    /// Counts of what is held, for the operator.
    fn stats(&mut self, now: u64) -> Result<Stats, Self::Error>;

    /// Deletes messages, Welcomes and claim records older than `before`.
    fn expire(&mut self, before: u64) -> Result<u64, Self::Error>;
    /// Deletes the bytes of (at most `limit`) messages whose timer ran out
    /// by `now`, keeping each one's epoch and digest in its place (`gone`)
    /// so members' chains still link. Returns how many.
    fn expire_messages(&mut self, now: u64, limit: usize) -> Result<u64, Self::Error>;

    // Blobs (issue 32).
    fn insert_blob(&mut self, blob: &BlobRecord) -> Result<(), Self::Error>;
    fn blob(&mut self, id: &[u8; 16]) -> Result<Option<BlobRecord>, Self::Error>;
    /// Records how much of an unfinished upload is durable.
    fn set_blob_received(&mut self, id: &[u8; 16], received: u64) -> Result<(), Self::Error>;
    /// Marks an upload complete (all of it received) with its hash; in a
    /// group with a timer it expires that long after `now`.
    fn complete_blob(&mut self, id: &[u8; 16], hash: &[u8; 32], now: u64) -> Result<(), Self::Error>;
    fn delete_blob(&mut self, id: &[u8; 16]) -> Result<bool, Self::Error>;
    /// The sizes of `account`'s blobs (complete or not), summed.
    fn blob_usage(&mut self, account: &AccountId) -> Result<u64, Self::Error>;
    /// `device`'s unfinished uploads.
    fn open_uploads(&mut self, device: &DeviceId) -> Result<u64, Self::Error>;
    /// Deletes (at most `limit`) blob rows: complete before
    /// `complete_before`, unfinished and opened before `open_before`,
    /// whose group's timer ran out by `now`, or of a group that has no
    /// current member. Returns their ids (the caller removes the bytes once
    /// this is committed).
    fn expire_blobs(
        &mut self,
        complete_before: u64,
        open_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<[u8; 16]>, Self::Error>;
    /// Deletes (at most `limit`) blob rows whose group's timer ran out by
    /// `now` (an index finds them: what the frequent sweep runs). Returns
    /// their ids.
    fn expire_timed_blobs(&mut self, now: u64, limit: usize) -> Result<Vec<[u8; 16]>, Self::Error>;
    /// Whether any group has a disappearing timer (so expired messages may
    /// have passed through the database's files since the last sweep).
    fn timers_in_use(&mut self) -> Result<bool, Self::Error>;
    /// Blob rows in id order after `after`, at most `limit`.
    fn blobs(&mut self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<BlobRecord>, Self::Error>;
}

/// How units of work begin and end on a database: what the engine needs
/// besides [`Storage`]. A write unit takes the database's write lock and
/// commits durably (or not at all); a read unit sees one consistent
/// snapshot. Inside a write unit, [`Unit::savepoint`] lets one request's
/// writes be undone alone.
pub trait Backend: Send + 'static {
    type Error: std::fmt::Display + Send;
    type Unit<'a>: Unit<Error = Self::Error>
    where
        Self: 'a;

    /// Runs `work` in one write transaction and commits it; nothing of it
    /// stays if `work` or the commit fails.
    fn write<T>(&mut self, work: impl FnOnce(&mut Self::Unit<'_>) -> Result<T, Self::Error>) -> Result<T, Self::Error>;
    /// Runs `work` on one consistent snapshot; it writes nothing.
    fn read<T>(&mut self, work: impl FnOnce(&mut Self::Unit<'_>) -> T) -> Result<T, Self::Error>;
    /// Moves what the database keeps beside its main file (SQLite's
    /// write-ahead log) into it and empties it, so bytes deleted from the
    /// database are in no file any more. Returns whether it completed (a
    /// reader in the way: try again later). A database whose files the
    /// server does not manage has nothing to do.
    fn checkpoint(&mut self) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Storage inside a unit of work, with savepoints.
pub trait Unit: Storage {
    /// Whether statements can conflict with another node's transactions
    /// (see [`Unit::take_conflict`]).
    const CONFLICTS: bool = false;

    /// Marks a point to return to (one at a time).
    fn savepoint(&mut self) -> Result<(), Self::Error>;
    /// Ends the savepoint, keeping its writes or undoing them.
    fn release(&mut self, keep: bool) -> Result<(), Self::Error>;
    /// Tells other nodes sharing the database about a kept request's
    /// notifications, if the commit succeeds. A single-node store has
    /// nobody to tell.
    fn announce(&mut self, notifications: &[super::Notification]) -> Result<(), Self::Error> {
        let _ = notifications;
        Ok(())
    }
    /// Whether a statement since the last call failed on a conflict with
    /// another node's transaction (a deadlock, a key inserted at the same
    /// time): the request is worth running again, and its failure is not
    /// its own. A single-node store never conflicts.
    fn take_conflict(&mut self) -> bool {
        false
    }
}

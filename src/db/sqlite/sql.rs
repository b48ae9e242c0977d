//! The Delivery Service's [`Storage`] on SQLite.
//!
//! Used on a connection that is inside a transaction (the writer's batch or
//! the reader's snapshot); it issues statements and never begins or ends
//! transactions itself. Prepared statements are cached by rusqlite.

use rusqlite::{params, Connection, OptionalExtension};

use super::StoreError;
use crate::auth::{AccountId, DeviceId};
use crate::chain::{Head, MessageDigest};
use crate::delivery::storage::{
    AccountRecord, BlobRecord, ChainTip, DeviceRecord, GroupListing, InviteRecord, LinkRecord, Messages, Page, Stats,
    Unit, Welcomes,
};
use crate::delivery::{GroupRecord, Membership, NewKeyPackage, SendContext, Storage};
use crate::mls::Suite;
use crate::wire::Logged;

/// A delivery store over a borrowed connection.
///
/// The writer uses one `SqlStore` for a whole batch: the database size the
/// quota check needs is measured once per batch and then advanced by the
/// bytes each write adds (an estimate that errs high: it ignores deletions
/// and page reuse until the next batch measures again).
#[derive(Debug)]
pub struct SqlStore<'c> {
    conn: &'c Connection,
    /// Database bytes at the first quota check, plus bytes written since.
    space: Option<u64>,
    /// The group, its `gid` and chain tip read by the last
    /// [`Storage::send_context`], consumed by the [`Storage::append`] that
    /// follows it in the same request (saves looking the group up twice on
    /// the hot path).
    hint: Option<(Vec<u8>, i64, Tip)>,
    /// See [`super::Db::open_unchained`].
    chained: bool,
}

/// A group row's `last_seq`, `chain_start` and `head`.
type Tip = (i64, Option<i64>, Option<Vec<u8>>);

/// The chain tip a group row holds (`None` before its first chained
/// message, or if the stored head is not 32 bytes).
fn chain_tip(last: i64, start: Option<i64>, head: Option<Vec<u8>>) -> Option<ChainTip> {
    let head = Head(<[u8; 32]>::try_from(head?.as_slice()).ok()?);
    Some(ChainTip { start: u(start?), seq: u(last), head })
}

impl<'c> SqlStore<'c> {
    pub fn new(conn: &'c Connection) -> Self {
        Self { conn, space: None, hint: None, chained: true }
    }

    /// Whether appends extend the chain ([`super::Db::open_unchained`]).
    pub fn chained(mut self, chained: bool) -> Self {
        self.chained = chained;
        self
    }

    fn wrote(&mut self, bytes: usize) {
        if let Some(s) = self.space.as_mut() {
            *s = s.saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
        }
    }
}

use crate::db::{to_i64 as i, to_u64 as u};

/// Fills `page` from rows of (key INTEGER, data BLOB), in their order.
fn fill(mut rows: rusqlite::Rows<'_>, mut page: Page) -> Result<(Welcomes, bool), StoreError> {
    while let Some(row) = rows.next()? {
        let data: Vec<u8> = row.get(1)?;
        if !page.fits(data.len()) {
            break;
        }
        let len = data.len();
        page.push((u(row.get(0)?), data), len);
    }
    Ok(page.finish())
}

/// Fills `page` from log rows of (seq INTEGER, data BLOB, head BLOB,
/// expires_at INTEGER, gone BLOB, epoch INTEGER), in their order.
fn fill_log(mut rows: rusqlite::Rows<'_>, mut page: Page<Logged>) -> Result<(Messages, bool), StoreError> {
    while let Some(row) = rows.next()? {
        let data: Vec<u8> = row.get(1)?;
        if !page.fits(data.len()) {
            break;
        }
        let head: Option<Vec<u8>> = row.get(2)?;
        let gone: Option<Vec<u8>> = row.get(4)?;
        let gone = gone
            .as_deref()
            .and_then(key)
            .map(|d| crate::wire::Gone { epoch: u(row.get(5).unwrap_or(0)), digest: MessageDigest(d) });
        let len = data.len();
        let logged = Logged {
            seq: u(row.get(0)?),
            head: head.as_deref().and_then(key).map(Head),
            data,
            expires: row.get::<_, Option<i64>>(3)?.map(u),
            gone,
        };
        page.push(logged, len);
    }
    Ok(page.finish())
}

/// The columns [`blob_row`] reads.
const BLOB_SELECT: &str =
    "SELECT b.id, g.id, b.account, b.device, b.size, b.received, b.hash, b.created_at, b.completed_at, b.expires_at
     FROM blobs b JOIN groups g ON g.gid = b.gid";

/// A blob row; `None` for ids or keys of a length the schema forbids.
fn blob_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<BlobRecord>> {
    let id: Vec<u8> = r.get(0)?;
    let account: Vec<u8> = r.get(2)?;
    let device: Vec<u8> = r.get(3)?;
    let hash: Option<Vec<u8>> = r.get(6)?;
    let (Ok(id), Some(account), Some(device)) = (<[u8; 16]>::try_from(id.as_slice()), key(&account), key(&device))
    else {
        return Ok(None);
    };
    Ok(Some(BlobRecord {
        id,
        group: r.get(1)?,
        account: AccountId(account),
        device: DeviceId(device),
        size: u(r.get(4)?),
        received: u(r.get(5)?),
        hash: hash.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()),
        created_at: u(r.get(7)?),
        completed_at: r.get::<_, Option<i64>>(8)?.map(u),
        expires_at: r.get::<_, Option<i64>>(9)?.map(u),
    }))
}

fn key(bytes: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).ok()
}

fn membership_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<Membership>> {
    let account: Vec<u8> = r.get(at)?;
    let joined_after: i64 = r.get(at + 1)?;
    let left_at: Option<i64> = r.get(at + 2)?;
    let acked: i64 = r.get(at + 3)?;
    Ok(key(&account).map(|a| Membership {
        account: AccountId(a),
        joined_after: u(joined_after),
        left_at: left_at.map(u),
        acked: u(acked),
    }))
}

/// An account row (key, created_at, removed_at); `None` for a key of a
/// length the schema forbids (skipped, not trusted).
fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<AccountRecord>> {
    let k: Vec<u8> = r.get(0)?;
    let Some(k) = key(&k) else { return Ok(None) };
    Ok(Some(AccountRecord {
        account: AccountId(k),
        created_at: u(r.get(1)?),
        removed_at: r.get::<_, Option<i64>>(2)?.map(u),
    }))
}

/// An invite row; `None` for one whose id or hash has a length the schema
/// forbids (skipped, not trusted).
fn invite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<InviteRecord>> {
    let id: Vec<u8> = r.get(0)?;
    let hash: Vec<u8> = r.get(1)?;
    let (Ok(id), Ok(secret_hash)) = (<[u8; 8]>::try_from(id.as_slice()), <[u8; 32]>::try_from(hash.as_slice())) else {
        return Ok(None);
    };
    Ok(Some(InviteRecord {
        id,
        secret_hash,
        uses_total: r.get(2)?,
        uses_left: r.get(3)?,
        expires_at: r.get::<_, Option<i64>>(4)?.map(u),
        created_at: u(r.get(5)?),
    }))
}

impl SqlStore<'_> {
    /// Deletes these blob rows; returns their ids.
    fn delete_blobs(&mut self, ids: Vec<Vec<u8>>) -> Result<Vec<[u8; 16]>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            self.conn.prepare_cached("DELETE FROM blobs WHERE id = ?1")?.execute([&id])?;
            out.extend(<[u8; 16]>::try_from(id.as_slice()).ok());
        }
        Ok(out)
    }

    fn gid(&self, group: &[u8]) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT gid FROM groups WHERE id = ?1")?
            .query_row([group], |r| r.get(0))
            .optional()?)
    }
}

impl Storage for SqlStore<'_> {
    type Error = StoreError;

    fn account_exists(&mut self, a: &AccountId) -> Result<bool, StoreError> {
        Ok(self.conn.prepare_cached("SELECT 1 FROM accounts WHERE key = ?1")?.exists([&a.0[..]])?)
    }

    fn accounts(&mut self) -> Result<Vec<AccountRecord>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT key, created_at, removed_at FROM accounts ORDER BY created_at, key")?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.extend(account_row(row)?);
        }
        Ok(out)
    }

    fn account(&mut self, a: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT key, created_at, removed_at FROM accounts WHERE key = ?1")?;
        let mut rows = stmt.query([&a.0[..]])?;
        match rows.next()? {
            Some(row) => Ok(account_row(row)?),
            None => Ok(None),
        }
    }

    fn remove_account(&mut self, a: &AccountId, now: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE accounts SET removed_at = ?2 WHERE key = ?1 AND removed_at IS NULL")?
            .execute(params![&a.0[..], i(now)])?;
        Ok(())
    }

    fn insert_link(&mut self, l: &LinkRecord) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO links (id, account, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![&l.id[..], &l.account.0[..], i(l.created_at), i(l.expires_at)])?;
        Ok(())
    }

    fn link(&mut self, id: &[u8; 16]) -> Result<Option<LinkRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT account, created_at, expires_at, device, offer, certificate, bundle FROM links WHERE id = ?1",
        )?;
        let mut rows = stmt.query([&id[..]])?;
        let Some(row) = rows.next()? else { return Ok(None) };
        let account: Vec<u8> = row.get(0)?;
        let account = key(&account).ok_or_else(|| StoreError::Corrupt("a link's account is not 32 bytes".into()))?;
        let device: Option<Vec<u8>> = row.get(3)?;
        let certificate: Option<Vec<u8>> = row.get(5)?;
        let bundle: Option<Vec<u8>> = row.get(6)?;
        Ok(Some(LinkRecord {
            id: *id,
            account: AccountId(account),
            created_at: u(row.get(1)?),
            expires_at: u(row.get(2)?),
            device: device.as_deref().and_then(key).map(DeviceId),
            offer: row.get(4)?,
            answer: certificate.zip(bundle),
        }))
    }

    fn set_link_offer(&mut self, id: &[u8; 16], device: &DeviceId, offer: &[u8]) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("UPDATE links SET device = ?2, offer = ?3 WHERE id = ?1 AND offer IS NULL")?
            .execute(params![&id[..], &device.0[..], offer])?;
        Ok(n == 1)
    }

    fn set_link_answer(&mut self, id: &[u8; 16], certificate: &[u8], bundle: &[u8]) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE links SET certificate = ?2, bundle = ?3
                 WHERE id = ?1 AND offer IS NOT NULL AND certificate IS NULL",
            )?
            .execute(params![&id[..], certificate, bundle])?;
        self.wrote(bundle.len());
        Ok(n == 1)
    }

    fn open_links(&mut self, a: &AccountId, now: u64) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM links WHERE account = ?1 AND expires_at > ?2")?
            .query_row(params![&a.0[..], i(now)], |r| r.get(0))?;
        Ok(u(n))
    }

    fn expire_links(&mut self, now: u64) -> Result<u64, StoreError> {
        let n = self.conn.prepare_cached("DELETE FROM links WHERE expires_at < ?1")?.execute([i(now)])?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn devices_of(&mut self, a: &AccountId) -> Result<Vec<(DeviceId, DeviceRecord)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, certificate, created_at, revoked_at FROM devices WHERE account = ?1 ORDER BY created_at, key",
        )?;
        let mut rows = stmt.query([&a.0[..]])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let k: Vec<u8> = row.get(0)?;
            if let Some(k) = key(&k) {
                let record = DeviceRecord {
                    account: *a,
                    certificate: row.get(1)?,
                    created_at: u(row.get(2)?),
                    revoked_at: row.get::<_, Option<i64>>(3)?.map(u),
                };
                out.push((DeviceId(k), record));
            }
        }
        Ok(out)
    }

    fn revoke_device(&mut self, device: &DeviceId, now: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE devices SET revoked_at = ?2 WHERE key = ?1 AND revoked_at IS NULL")?
            .execute(params![&device.0[..], i(now)])?;
        self.conn.prepare_cached("DELETE FROM key_packages WHERE device = ?1")?.execute([&device.0[..]])?;
        Ok(())
    }

    fn insert_account(&mut self, a: &AccountId, invite: Option<[u8; 8]>, now: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO accounts (key, created_at, invite_id) VALUES (?1, ?2, ?3)")?
            .execute(params![&a.0[..], i(now), invite.as_ref().map(|id| &id[..])])?;
        Ok(())
    }

    fn device(&mut self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT account, certificate, created_at, revoked_at FROM devices WHERE key = ?1")?;
        let mut rows = stmt.query([&device.0[..]])?;
        let Some(row) = rows.next()? else { return Ok(None) };
        let account: Vec<u8> = row.get(0)?;
        let account =
            key(&account).ok_or_else(|| StoreError::Corrupt("a device row's account is not 32 bytes".into()))?;
        Ok(Some(DeviceRecord {
            account: AccountId(account),
            certificate: row.get(1)?,
            created_at: u(row.get(2)?),
            revoked_at: row.get::<_, Option<i64>>(3)?.map(u),
        }))
    }

    fn insert_device(&mut self, device: &DeviceId, r: &DeviceRecord) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO devices (key, account, certificate, created_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![&device.0[..], &r.account.0[..], r.certificate, i(r.created_at)])?;
        Ok(())
    }

    fn insert_invite(&mut self, v: &InviteRecord) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO invites (id, secret_hash, uses_total, uses_left, expires_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &v.id[..],
                &v.secret_hash[..],
                v.uses_total,
                v.uses_left,
                v.expires_at.map(i),
                i(v.created_at)
            ])?;
        Ok(())
    }

    fn invite(&mut self, id: &[u8; 8]) -> Result<Option<InviteRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, secret_hash, uses_total, uses_left, expires_at, created_at FROM invites WHERE id = ?1",
        )?;
        let mut rows = stmt.query([&id[..]])?;
        match rows.next()? {
            Some(row) => Ok(invite_row(row)?),
            None => Ok(None),
        }
    }

    fn spend_invite(&mut self, id: &[u8; 8]) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("UPDATE invites SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0")?
            .execute([&id[..]])?;
        Ok(n == 1)
    }

    fn invites(&mut self) -> Result<Vec<InviteRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, secret_hash, uses_total, uses_left, expires_at, created_at FROM invites
             ORDER BY created_at DESC, id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.extend(invite_row(row)?);
        }
        Ok(out)
    }

    fn key_package_count(&mut self, owner: &DeviceId, suite: Suite) -> Result<(u32, bool), StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT COALESCE(SUM(last_resort = 0), 0), COALESCE(MAX(last_resort), 0) FROM key_packages
             WHERE device = ?1 AND suite = ?2",
        )?;
        let (n, lr): (i64, i64) =
            stmt.query_row(params![&owner.0[..], suite.code()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((u32::try_from(n).unwrap_or(u32::MAX), lr != 0))
    }

    fn add_key_packages(
        &mut self,
        account: &AccountId,
        owner: &DeviceId,
        packages: &[NewKeyPackage],
        now: u64,
    ) -> Result<(), StoreError> {
        for p in packages {
            if p.last_resort {
                self.conn
                    .prepare_cached("DELETE FROM key_packages WHERE device = ?1 AND last_resort = 1 AND suite = ?2")?
                    .execute(params![&owner.0[..], p.suite.code()])?;
            }
            self.conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO key_packages (hash_ref, device, account, data, last_resort, created_at, suite)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    p.hash_ref,
                    &owner.0[..],
                    &account.0[..],
                    p.data,
                    p.last_resort,
                    i(now),
                    p.suite.code()
                ])?;
            self.wrote(p.data.len());
        }
        Ok(())
    }

    fn claim_key_packages(&mut self, account: &AccountId, suite: Suite, now: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let devices: Vec<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT key FROM devices WHERE account = ?1 ORDER BY key")?
            .query_map([&account.0[..]], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            let row: Option<(Vec<u8>, Vec<u8>, bool)> = self
                .conn
                .prepare_cached(
                    "SELECT hash_ref, data, last_resort FROM key_packages WHERE device = ?1 AND suite = ?2
                     ORDER BY last_resort, created_at, hash_ref LIMIT 1",
                )?
                .query_row(params![&device, suite.code()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((hash_ref, data, last_resort)) = row else { continue };
            if !last_resort {
                self.conn.prepare_cached("DELETE FROM key_packages WHERE hash_ref = ?1")?.execute([&hash_ref])?;
            }
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO claimed (hash_ref, device, account, claimed_at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![hash_ref, device, &account.0[..], i(now)])?;
            out.push(data);
        }
        Ok(out)
    }

    fn claimed_owner(&mut self, hash_ref: &[u8]) -> Result<Option<(AccountId, DeviceId)>, StoreError> {
        let owner: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT account, device FROM claimed WHERE hash_ref = ?1")?
            .query_row([hash_ref], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(owner.and_then(|(a, d)| Some((AccountId(key(&a)?), DeviceId(key(&d)?)))))
    }

    fn group(&mut self, group: &[u8]) -> Result<Option<GroupRecord>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT g.epoch, s.state, g.last_seq, g.disappear, g.state_version
                 FROM groups g JOIN group_states s ON s.gid = g.gid WHERE g.id = ?1",
            )?
            .query_row([group], |r| {
                Ok(GroupRecord {
                    epoch: u(r.get(0)?),
                    state: r.get(1)?,
                    last_seq: u(r.get(2)?),
                    disappear: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                    version: u(r.get(4)?),
                })
            })
            .optional()?)
    }

    fn send_context(&mut self, group: &[u8], d: &DeviceId) -> Result<Option<SendContext>, StoreError> {
        type Row = (i64, i64, Tip, Option<i64>, Option<Vec<u8>>, Option<i64>, Option<i64>, Option<i64>, i64, i64);
        self.hint = None;
        let row: Option<Row> = self
            .conn
            .prepare_cached(
                "SELECT g.gid, g.epoch, g.last_seq, (SELECT min(seq) FROM log WHERE gid = g.gid),
                        m.account, m.joined_after, m.left_at, m.acked, g.chain_start, g.head, g.disappear,
                        g.state_version
                 FROM groups g LEFT JOIN members m ON m.gid = g.gid AND m.device = ?2 WHERE g.id = ?1",
            )?
            .query_row(params![group, &d.0[..]], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    (r.get(2)?, r.get(8)?, r.get(9)?),
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(10)?,
                    r.get(11)?,
                ))
            })
            .optional()?;
        let Some((gid, epoch, tip, first, account, joined_after, left_at, acked, disappear, version)) = row else {
            return Ok(None);
        };
        let last = tip.0;
        self.hint = Some((group.to_vec(), gid, tip));
        let membership = match (account.as_deref().and_then(key), joined_after) {
            (Some(a), Some(j)) => Some(Membership {
                account: AccountId(a),
                joined_after: u(j),
                left_at: left_at.map(u),
                acked: u(acked.unwrap_or(0)),
            }),
            _ => None,
        };
        let log_len = first.map_or(0, |f| u(last).saturating_sub(u(f)).saturating_add(1));
        let disappear = u32::try_from(disappear).unwrap_or(0);
        Ok(Some(SendContext { epoch: u(epoch), membership, log_len, disappear, version: u(version) }))
    }

    fn insert_group(&mut self, group: &[u8], epoch: u64, state: &[u8], now: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO groups (id, epoch, last_seq, created_at) VALUES (?1, ?2, 0, ?3)")?
            .execute(params![group, i(epoch), i(now)])?;
        let gid = self.conn.last_insert_rowid();
        self.conn
            .prepare_cached("INSERT INTO group_states (gid, state) VALUES (?1, ?2)")?
            .execute(params![gid, state])?;
        self.wrote(state.len());
        Ok(())
    }

    fn update_group(&mut self, group: &[u8], epoch: u64, state: &[u8]) -> Result<(), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(()) };
        self.conn
            .prepare_cached("UPDATE groups SET epoch = ?2, state_version = state_version + 1 WHERE gid = ?1")?
            .execute(params![gid, i(epoch)])?;
        self.conn.prepare_cached("UPDATE group_states SET state = ?2 WHERE gid = ?1")?.execute(params![gid, state])?;
        self.wrote(state.len());
        Ok(())
    }

    fn set_disappear(&mut self, group: &[u8], secs: u32) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE groups SET disappear = ?2 WHERE id = ?1")?
            .execute(params![group, i64::from(secs)])?;
        Ok(())
    }

    fn group_info(&mut self, group: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT i.info FROM groups g JOIN group_infos i ON i.gid = g.gid WHERE g.id = ?1")?
            .query_row([group], |r| r.get::<_, Vec<u8>>(0))
            .optional()?)
    }

    fn set_group_info(&mut self, group: &[u8], info: &[u8]) -> Result<(), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(()) };
        self.conn
            .prepare_cached("INSERT INTO group_infos (gid, info) VALUES (?1, ?2) ON CONFLICT (gid) DO UPDATE SET info = excluded.info")?
            .execute(params![gid, info])?;
        self.wrote(info.len());
        Ok(())
    }

    fn membership(&mut self, group: &[u8], d: &DeviceId) -> Result<Option<Membership>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT m.account, m.joined_after, m.left_at, m.acked FROM members m JOIN groups g ON g.gid = m.gid
                 WHERE g.id = ?1 AND m.device = ?2",
            )?
            .query_row(params![group, &d.0[..]], |r| membership_row(r, 0))
            .optional()?
            .flatten())
    }

    fn revoked_members(&mut self, group: &[u8]) -> Result<Vec<DeviceId>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.device FROM members m JOIN groups g ON g.gid = m.gid JOIN devices d ON d.key = m.device
             WHERE g.id = ?1 AND m.left_at IS NULL AND d.revoked_at IS NOT NULL ORDER BY m.device",
        )?;
        let rows = stmt.query_map([group], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.extend(key(&row?).map(DeviceId));
        }
        Ok(out)
    }

    fn members(&mut self, group: &[u8]) -> Result<Vec<(DeviceId, Membership)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.device, m.account, m.joined_after, m.left_at, m.acked FROM members m
             JOIN groups g ON g.gid = m.gid WHERE g.id = ?1 ORDER BY m.device",
        )?;
        let rows = stmt.query_map([group], |r| Ok((r.get::<_, Vec<u8>>(0)?, membership_row(r, 1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            if let (d, Some(m)) = row? {
                if let Some(d) = key(&d) {
                    out.push((DeviceId(d), m));
                }
            }
        }
        Ok(out)
    }

    fn add_member(&mut self, group: &[u8], d: &DeviceId, a: &AccountId, joined_after: u64) -> Result<(), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(()) };
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO members (gid, device, account, joined_after, left_at, acked)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?4)",
            )?
            .execute(params![gid, &d.0[..], &a.0[..], i(joined_after)])?;
        Ok(())
    }

    fn remove_member(&mut self, group: &[u8], d: &DeviceId, left_at: u64, epoch: u64) -> Result<(), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(()) };
        self.conn
            .prepare_cached("UPDATE members SET left_at = ?3, left_epoch = ?4 WHERE gid = ?1 AND device = ?2")?
            .execute(params![gid, &d.0[..], i(left_at), i(epoch)])?;
        Ok(())
    }

    fn delete_member(&mut self, group: &[u8], d: &DeviceId) -> Result<(), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(()) };
        self.conn
            .prepare_cached("DELETE FROM members WHERE gid = ?1 AND device = ?2")?
            .execute(params![gid, &d.0[..]])?;
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO former_members (gid, device) VALUES (?1, ?2)")?
            .execute(params![gid, &d.0[..]])?;
        Ok(())
    }

    fn was_member(&mut self, group: &[u8], d: &DeviceId) -> Result<bool, StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(false) };
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM former_members WHERE gid = ?1 AND device = ?2")?
            .exists(params![gid, &d.0[..]])?)
    }

    fn set_acked(&mut self, group: &[u8], a: &DeviceId, seq: u64) -> Result<(), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(()) };
        self.conn
            .prepare_cached("UPDATE members SET acked = MAX(acked, ?3) WHERE gid = ?1 AND device = ?2")?
            .execute(params![gid, &a.0[..], i(seq)])?;
        Ok(())
    }

    fn append(
        &mut self,
        group: &[u8],
        epoch: u64,
        message: &[u8],
        digest: &MessageDigest,
        now: u64,
        expires: Option<u64>,
    ) -> Result<(u64, Head), StoreError> {
        let (gid, (last, start, head)) = match self.hint.take() {
            Some((g, gid, tip)) if g == group => (gid, tip),
            _ => self
                .conn
                .prepare_cached("SELECT gid, last_seq, chain_start, head FROM groups WHERE id = ?1")?
                .query_row([group], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?,
        };
        let seq = last.saturating_add(1);
        if !self.chained {
            self.conn.prepare_cached("UPDATE groups SET last_seq = ?2 WHERE gid = ?1")?.execute(params![gid, seq])?;
            self.conn
                .prepare_cached(
                    "INSERT INTO log (gid, seq, epoch, data, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![gid, seq, i(epoch), message, i(now), expires.map(i)])?;
            self.wrote(message.len());
            return Ok((u(seq), Head([0; 32])));
        }
        let tip = ChainTip::after(chain_tip(last, start, head), group, u(seq), epoch, digest);
        self.conn
            .prepare_cached("UPDATE groups SET last_seq = ?2, chain_start = ?3, head = ?4 WHERE gid = ?1")?
            .execute(params![gid, seq, i(tip.start), &tip.head.0[..]])?;
        self.conn
            .prepare_cached(
                "INSERT INTO log (gid, seq, epoch, data, created_at, head, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![gid, seq, i(epoch), message, i(now), &tip.head.0[..], expires.map(i)])?;
        self.wrote(message.len() + 32);
        Ok((u(seq), tip.head))
    }

    fn chain_tip(&mut self, group: &[u8]) -> Result<Option<ChainTip>, StoreError> {
        let row: Option<Tip> = self
            .conn
            .prepare_cached("SELECT last_seq, chain_start, head FROM groups WHERE id = ?1")?
            .query_row([group], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        Ok(row.and_then(|(last, start, head)| chain_tip(last, start, head)))
    }

    fn fetch(
        &mut self,
        group: &[u8],
        after: u64,
        upto: Option<u64>,
        limit: usize,
        byte_budget: usize,
    ) -> Result<(Messages, bool), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok((vec![], false)) };
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, data, head, expires_at, gone, epoch FROM log
             WHERE gid = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4",
        )?;
        let upper = upto.map(i).unwrap_or(i64::MAX);
        let want = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = stmt.query(params![gid, i(after), upper, want])?;
        fill_log(rows, Page::new(limit, byte_budget))
    }

    fn delete_messages_upto(&mut self, group: &[u8], upto: u64) -> Result<u64, StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(0) };
        let n =
            self.conn.prepare_cached("DELETE FROM log WHERE gid = ?1 AND seq <= ?2")?.execute(params![gid, i(upto)])?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn add_welcome(&mut self, recipient: &DeviceId, group: &[u8], welcome: &[u8], now: u64) -> Result<u64, StoreError> {
        let gid = self.gid(group)?.unwrap_or(0);
        self.conn
            .prepare_cached("INSERT INTO inbox (recipient, gid, data, created_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![&recipient.0[..], gid, welcome, i(now)])?;
        self.wrote(welcome.len());
        Ok(u(self.conn.last_insert_rowid()))
    }

    fn welcomes(
        &mut self,
        recipient: &DeviceId,
        limit: usize,
        byte_budget: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT id, data FROM inbox WHERE recipient = ?1 ORDER BY id LIMIT ?2")?;
        let rows = stmt.query(params![&recipient.0[..], i64::try_from(limit).unwrap_or(i64::MAX)])?;
        Ok(fill(rows, Page::new(limit, byte_budget))?.0)
    }

    fn delete_welcome(&mut self, recipient: &DeviceId, id: u64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM inbox WHERE id = ?1 AND recipient = ?2")?
            .execute(params![i(id), &recipient.0[..]])?;
        Ok(n > 0)
    }

    fn groups_of(&mut self, a: &DeviceId, limit: usize) -> Result<Vec<GroupListing>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT g.id, COALESCE(m.left_epoch, g.epoch), COALESCE(m.left_at, g.last_seq), m.acked, m.left_at IS NULL,
                    COALESCE((SELECT MIN(seq) FROM log WHERE log.gid = g.gid), 0)
             FROM members m JOIN groups g ON g.gid = m.gid WHERE m.device = ?1 ORDER BY g.gid LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![&a.0[..], i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(GroupListing {
                group: r.get(0)?,
                epoch: u(r.get(1)?),
                last_seq: u(r.get(2)?),
                acked: u(r.get(3)?),
                first_seq: u(r.get(5)?),
                current: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn groups_count(&mut self, a: &AccountId) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(DISTINCT gid) FROM members WHERE account = ?1 AND left_at IS NULL")?
            .query_row([&a.0[..]], |r| r.get(0))?;
        Ok(u(n))
    }

    fn log_len(&mut self, group: &[u8]) -> Result<u64, StoreError> {
        // Sequences are dense and deletions only remove a prefix, so the
        // length is the span from the oldest kept message (an index probe,
        // not a scan).
        let row: Option<(Option<i64>, i64)> = self
            .conn
            .prepare_cached(
                "SELECT (SELECT min(seq) FROM log WHERE gid = g.gid), g.last_seq FROM groups g WHERE g.id = ?1",
            )?
            .query_row([group], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((Some(first), last)) => u(last).saturating_sub(u(first)).saturating_add(1),
            _ => 0,
        })
    }

    fn database_bytes(&mut self) -> Result<u64, StoreError> {
        if let Some(s) = self.space {
            return Ok(s);
        }
        // Pages in use (free pages are reused before the file grows).
        let n: i64 = self.conn.prepare_cached(
            "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
        )?
        .query_row([], |r| r.get(0))?;
        self.space = Some(u(n));
        Ok(u(n))
    }

    fn stats(&mut self, now: u64) -> Result<Stats, StoreError> {
        let mut stats = self
            .conn
            .prepare_cached(
                "SELECT (SELECT count(*) FROM accounts WHERE removed_at IS NULL),
                        (SELECT count(*) FROM accounts WHERE removed_at IS NOT NULL),
                        (SELECT count(*) FROM devices WHERE revoked_at IS NULL), (SELECT count(*) FROM groups),
                        (SELECT count(*) FROM log), (SELECT min(created_at) FROM log), (SELECT count(*) FROM inbox),
                        (SELECT count(*) FROM invites WHERE uses_left > 0 AND (expires_at IS NULL OR expires_at > ?1))",
            )?
            .query_row([i(now)], |r| {
                Ok(Stats {
                    accounts: u(r.get(0)?),
                    removed_accounts: u(r.get(1)?),
                    devices: u(r.get(2)?),
                    groups: u(r.get(3)?),
                    messages: u(r.get(4)?),
                    oldest_message: r.get::<_, Option<i64>>(5)?.map(u),
                    welcomes: u(r.get(6)?),
                    invites_outstanding: u(r.get(7)?),
                    database_bytes: 0,
                    blobs: 0,
                    blob_bytes: 0,
                })
            })?;
        stats.database_bytes = self.database_bytes()?;
        let (blobs, bytes): (i64, i64) = self
            .conn
            .prepare_cached("SELECT count(*), coalesce(sum(size), 0) FROM blobs")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        stats.blobs = u(blobs);
        stats.blob_bytes = u(bytes);
        Ok(stats)
    }

    fn expire(&mut self, before: u64) -> Result<u64, StoreError> {
        let b = i(before);
        // Per group, the messages before the first one young enough to keep
        // (a prefix: sequences stay dense from the oldest kept message).
        let gids: Vec<i64> = self
            .conn
            .prepare_cached("SELECT gid FROM groups")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut n = 0;
        for gid in gids {
            n += self
                .conn
                .prepare_cached(
                    "DELETE FROM log WHERE gid = ?1 AND seq < coalesce(
                         (SELECT seq FROM log WHERE gid = ?1 AND created_at >= ?2 ORDER BY seq LIMIT 1),
                         (SELECT last_seq + 1 FROM groups WHERE gid = ?1))",
                )?
                .execute(params![gid, b])?;
        }
        n += self.conn.prepare_cached("DELETE FROM inbox WHERE created_at < ?1")?.execute([b])?;
        n += self.conn.prepare_cached("DELETE FROM claimed WHERE claimed_at < ?1")?.execute([b])?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn expire_messages(&mut self, now: u64, limit: usize) -> Result<u64, StoreError> {
        type Due = (i64, i64, Vec<u8>);
        let due: Vec<Due> = self
            .conn
            .prepare_cached(
                "SELECT gid, seq, data FROM log WHERE expires_at IS NOT NULL AND expires_at <= ?1
                 ORDER BY expires_at LIMIT ?2",
            )?
            .query_map(params![i(now), i(limit as u64)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (gid, seq, data) in &due {
            // `secure_delete` zeroes the old cell; the WAL is truncated
            // after the sweep (`Backend::checkpoint`).
            let digest = MessageDigest::of(data);
            self.conn
                .prepare_cached("UPDATE log SET data = x'', gone = ?3, expires_at = NULL WHERE gid = ?1 AND seq = ?2")?
                .execute(params![gid, seq, &digest.0[..]])?;
        }
        Ok(u64::try_from(due.len()).unwrap_or(u64::MAX))
    }

    fn insert_blob(&mut self, b: &BlobRecord) -> Result<(), StoreError> {
        let Some(gid) = self.gid(&b.group)? else {
            return Err(StoreError::Corrupt("a blob for a group that does not exist".into()));
        };
        self.conn
            .prepare_cached(
                "INSERT INTO blobs (id, gid, account, device, size, received, hash, created_at, completed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                &b.id[..],
                gid,
                &b.account.0[..],
                &b.device.0[..],
                i(b.size),
                i(b.received),
                b.hash.as_ref().map(|h| &h[..]),
                i(b.created_at),
                b.completed_at.map(i)
            ])?;
        Ok(())
    }

    fn blob(&mut self, id: &[u8; 16]) -> Result<Option<BlobRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("{BLOB_SELECT} WHERE b.id = ?1"))?;
        let mut rows = stmt.query([&id[..]])?;
        match rows.next()? {
            Some(row) => Ok(blob_row(row)?),
            None => Ok(None),
        }
    }

    fn set_blob_received(&mut self, id: &[u8; 16], received: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE blobs SET received = ?2 WHERE id = ?1 AND hash IS NULL")?
            .execute(params![&id[..], i(received)])?;
        Ok(())
    }

    fn complete_blob(&mut self, id: &[u8; 16], hash: &[u8; 32], now: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE blobs SET received = size, hash = ?2, completed_at = ?3,
                     expires_at = (SELECT CASE WHEN g.disappear > 0 THEN ?3 + g.disappear END
                                   FROM groups g WHERE g.gid = blobs.gid)
                 WHERE id = ?1 AND hash IS NULL",
            )?
            .execute(params![&id[..], &hash[..], i(now)])?;
        Ok(())
    }

    fn delete_blob(&mut self, id: &[u8; 16]) -> Result<bool, StoreError> {
        Ok(self.conn.prepare_cached("DELETE FROM blobs WHERE id = ?1")?.execute([&id[..]])? > 0)
    }

    fn blob_usage(&mut self, a: &AccountId) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT coalesce(sum(size), 0) FROM blobs WHERE account = ?1")?
            .query_row([&a.0[..]], |r| r.get(0))?;
        Ok(u(n))
    }

    fn open_uploads(&mut self, d: &DeviceId) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM blobs WHERE device = ?1 AND hash IS NULL")?
            .query_row([&d.0[..]], |r| r.get(0))?;
        Ok(u(n))
    }

    fn expire_blobs(
        &mut self,
        complete_before: u64,
        open_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<[u8; 16]>, StoreError> {
        let ids: Vec<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT b.id FROM blobs b
                 WHERE (b.completed_at IS NOT NULL AND b.completed_at < ?1)
                    OR (b.completed_at IS NULL AND b.created_at < ?2)
                    OR b.expires_at <= ?4
                    OR NOT EXISTS (SELECT 1 FROM members m WHERE m.gid = b.gid AND m.left_at IS NULL)
                 LIMIT ?3",
            )?
            .query_map(params![i(complete_before), i(open_before), i(limit as u64), i(now)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        self.delete_blobs(ids)
    }

    fn expire_timed_blobs(&mut self, now: u64, limit: usize) -> Result<Vec<[u8; 16]>, StoreError> {
        let ids: Vec<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT id FROM blobs WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2")?
            .query_map(params![i(now), i(limit as u64)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        self.delete_blobs(ids)
    }

    fn timers_in_use(&mut self) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM groups WHERE disappear > 0)")?
            .query_row([], |r| r.get(0))?)
    }

    fn blobs(&mut self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<BlobRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("{BLOB_SELECT} WHERE b.id > ?1 ORDER BY b.id LIMIT ?2"))?;
        let after = after.map(|a| a.to_vec()).unwrap_or_default();
        let mut rows = stmt.query(params![after, i(limit as u64)])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.extend(blob_row(row)?);
        }
        Ok(out)
    }
}

impl Unit for SqlStore<'_> {
    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.prepare_cached("SAVEPOINT request")?.execute([])?;
        Ok(())
    }

    fn release(&mut self, keep: bool) -> Result<(), StoreError> {
        if !keep {
            self.conn.prepare_cached("ROLLBACK TO request")?.execute([])?;
        }
        self.conn.prepare_cached("RELEASE request")?.execute([])?;
        Ok(())
    }
}

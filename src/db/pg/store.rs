//! The Delivery Service's [`Storage`] on PostgreSQL.
//!
//! Used inside a transaction the [`super::PgDb`] backend began (a write
//! unit in `READ COMMITTED`, a read unit in `REPEATABLE READ READ ONLY`);
//! it never begins or ends one itself, except [`PgStore::commit`].

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Row, Statement, Transaction};

use super::listen::Notice;
use super::Target;
use crate::auth::{AccountId, DeviceId};
use crate::chain::{Head, MessageDigest, GENESIS_LABEL, LINK_LABEL};
use crate::db::{to_i64 as i, to_u64 as u, StoreError};
use crate::delivery::storage::{
    AccountRecord, BlobRecord, ChainTip, DeviceRecord, GroupListing, InviteRecord, LinkRecord, Messages, Page, Stats,
    Unit, Welcomes,
};
use crate::delivery::{GroupRecord, Membership, NewKeyPackage, Notification, SendContext, Storage};
use crate::limits::NOTICE_RETENTION;
use crate::mls::Suite;
use crate::wire::Logged;

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

/// Storage inside one transaction.
pub struct PgStore<'a> {
    tx: Transaction<'a>,
    statements: &'a mut HashMap<&'static str, Statement>,
    /// A write unit: reads that decide (epochs, sequences) lock the group.
    writing: bool,
    /// Where this node writes: its id, and how it numbers and signs its
    /// notices' wake-ups.
    target: &'a Target,
    /// Database bytes at the first quota check, plus bytes written since
    /// (as [`crate::db::sqlite::SqlStore`] does).
    space: Option<u64>,
    /// Set when a statement failed on a conflict with another transaction.
    conflict: bool,
    /// Notices of the requests kept so far, stored and announced with the
    /// commit.
    notices: Vec<Notice>,
    /// A kept request's savepoint not released yet (see [`Unit::release`]).
    unreleased: bool,
}

impl std::fmt::Debug for PgStore<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("writing", &self.writing).finish_non_exhaustive()
    }
}

fn key(bytes: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).ok()
}

fn account_row(r: &Row) -> Option<AccountRecord> {
    let k: Vec<u8> = r.get(0);
    Some(AccountRecord {
        account: AccountId(key(&k)?),
        created_at: u(r.get(1)),
        removed_at: r.get::<_, Option<i64>>(2).map(u),
    })
}

fn invite_row(r: &Row) -> Option<InviteRecord> {
    let id: Vec<u8> = r.get(0);
    let hash: Vec<u8> = r.get(1);
    Some(InviteRecord {
        id: <[u8; 8]>::try_from(id.as_slice()).ok()?,
        secret_hash: <[u8; 32]>::try_from(hash.as_slice()).ok()?,
        uses_total: u32::try_from(r.get::<_, i64>(2)).unwrap_or(0),
        uses_left: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
        expires_at: r.get::<_, Option<i64>>(4).map(u),
        created_at: u(r.get(5)),
    })
}

/// A membership from columns `at..at + 4` (account, joined_after, left_at,
/// acked).
/// A blob row (id, group id, account, device, size, received, hash,
/// created_at, completed_at); `None` for lengths the schema forbids.
fn blob_row(r: &Row) -> Option<BlobRecord> {
    let hash: Option<Vec<u8>> = r.get(6);
    Some(BlobRecord {
        id: <[u8; 16]>::try_from(r.get::<_, &[u8]>(0)).ok()?,
        group: r.get(1),
        account: AccountId(key(r.get::<_, &[u8]>(2))?),
        device: DeviceId(key(r.get::<_, &[u8]>(3))?),
        size: u(r.get(4)),
        received: u(r.get(5)),
        hash: hash.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()),
        created_at: u(r.get(7)),
        completed_at: r.get::<_, Option<i64>>(8).map(u),
        expires_at: r.get::<_, Option<i64>>(9).map(u),
    })
}

fn membership_row(r: &Row, at: usize) -> Option<Membership> {
    let account: Vec<u8> = r.get(at);
    Some(Membership {
        account: AccountId(key(&account)?),
        joined_after: u(r.get(at + 1)),
        left_at: r.get::<_, Option<i64>>(at + 2).map(u),
        acked: u(r.get(at + 3)),
    })
}

/// Fills `page` from rows of (key bigint, data bytea), in their order.
fn fill(rows: Vec<Row>, mut page: Page) -> (Welcomes, bool) {
    for row in rows {
        let data: Vec<u8> = row.get(1);
        if !page.fits(data.len()) {
            break;
        }
        let len = data.len();
        page.push((u(row.get(0)), data), len);
    }
    page.finish()
}

/// Fills `page` from log rows of (seq bigint, data bytea, head bytea,
/// expires_at bigint, gone bytea, epoch bigint), in their order.
fn fill_log(rows: Vec<Row>, mut page: Page<Logged>) -> (Messages, bool) {
    for row in rows {
        let data: Vec<u8> = row.get(1);
        if !page.fits(data.len()) {
            break;
        }
        let head: Option<Vec<u8>> = row.get(2);
        let head = head.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(Head);
        let gone: Option<Vec<u8>> = row.get(4);
        let gone =
            gone.as_deref().and_then(key).map(|d| crate::wire::Gone { epoch: u(row.get(5)), digest: MessageDigest(d) });
        let len = data.len();
        let expires = row.get::<_, Option<i64>>(3).map(u);
        page.push(Logged { seq: u(row.get(0)), head, data, expires, gone }, len);
    }
    page.finish()
}

fn len(bytes: &[u8]) -> i64 {
    i64::try_from(bytes.len()).unwrap_or(i64::MAX)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<'a> PgStore<'a> {
    pub(super) fn new(
        tx: Transaction<'a>,
        statements: &'a mut HashMap<&'static str, Statement>,
        writing: bool,
        target: &'a Target,
    ) -> Self {
        Self { tx, statements, writing, target, space: None, conflict: false, notices: Vec::new(), unreleased: false }
    }

    /// Stores the kept requests' notices, wakes the other nodes up for
    /// each (an authenticated `NOTIFY` naming only this node and its number
    /// for the row, see [`super::listen`]) and commits. One round trip, in
    /// the order the notifications came.
    pub(super) fn commit(mut self) -> Result<(), StoreError> {
        if !self.notices.is_empty() {
            let notices = std::mem::take(&mut self.notices);
            let mut kinds = Vec::with_capacity(notices.len());
            let mut groups: Vec<Option<&[u8]>> = Vec::with_capacity(notices.len());
            let mut seqs: Vec<Option<i64>> = Vec::with_capacity(notices.len());
            let mut devices: Vec<Option<&[u8]>> = Vec::with_capacity(notices.len());
            for n in &notices {
                let (kind, group, seq, device) = match n {
                    Notice::Message { group, seq } => ("m", Some(&group[..]), Some(i(*seq)), None),
                    Notice::Welcome { recipient } => ("w", None, None, Some(&recipient.0[..])),
                    Notice::Revoked { device } => ("r", None, None, Some(&device.0[..])),
                };
                kinds.push(kind);
                groups.push(group);
                seqs.push(seq);
                devices.push(device);
            }
            let (numbers, wake_ups) = self.target.number_notices(notices.len());
            // A data-modifying WITH runs to completion whether or not the
            // outer query reads it; the wake-ups go out at the commit.
            self.exec(
                "WITH n AS (
                     INSERT INTO notices (node, nseq, kind, grp, seq, device)
                     SELECT $2, t.nseq, t.kind, t.grp, t.seq, t.device
                     FROM unnest($3::bigint[], $4::text[], $5::bytea[], $6::bigint[], $7::bytea[])
                          AS t(nseq, kind, grp, seq, device))
                 SELECT pg_notify($1, w.text) FROM unnest($8::text[]) WITH ORDINALITY AS w(text, at) ORDER BY w.at",
                &[
                    &super::CHANNEL,
                    &super::listen::node_column(self.target.node),
                    &numbers,
                    &kinds,
                    &groups,
                    &seqs,
                    &devices,
                    &wake_ups,
                ],
            )?;
        }
        self.tx.commit()?;
        Ok(())
    }

    fn fail(&mut self, e: postgres::Error) -> StoreError {
        if super::is_conflict(&e) {
            self.conflict = true;
        }
        StoreError::Postgres(e)
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).map_err(|e| self.fail(e))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn rows(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql)?;
        self.tx.query(&s, params).map_err(|e| self.fail(e))
    }

    fn row(&mut self, sql: &'static str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        let s = self.statement(sql)?;
        self.tx.query_opt(&s, params).map_err(|e| self.fail(e))
    }

    fn one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, StoreError> {
        let s = self.statement(sql)?;
        self.tx.query_one(&s, params).map_err(|e| self.fail(e))
    }

    fn exec(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        self.tx.execute(&s, params).map_err(|e| self.fail(e))
    }

    /// Picks the locking variant of a group read in a write unit.
    fn pick(&self, reading: &'static str, writing: &'static str) -> &'static str {
        if self.writing {
            writing
        } else {
            reading
        }
    }

    fn gid(&mut self, group: &[u8]) -> Result<Option<i64>, StoreError> {
        Ok(self.row("SELECT gid FROM groups WHERE id = $1", &[&group])?.map(|r| r.get(0)))
    }

    /// Deletes a prefix of a group's log and takes its bytes off the
    /// group's count. Returns how many messages.
    fn delete_log(&mut self, gid: i64, upto: u64) -> Result<u64, StoreError> {
        let row = self.one(
            "WITH d AS (DELETE FROM log WHERE gid = $1 AND seq <= $2 RETURNING octet_length(data) AS n),
                  g AS (UPDATE groups SET bytes = bytes - (SELECT COALESCE(sum(n), 0) FROM d) WHERE gid = $1)
             SELECT count(*) FROM d",
            &[&gid, &i(upto)],
        )?;
        Ok(u(row.get(0)))
    }

    fn wrote(&mut self, bytes: usize) {
        if let Some(s) = self.space.as_mut() {
            *s = s.saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
        }
    }
}

impl Storage for PgStore<'_> {
    const SHARED: bool = true;
    type Error = StoreError;

    fn account_exists(&mut self, a: &AccountId) -> Result<bool, StoreError> {
        Ok(self.row("SELECT 1 FROM accounts WHERE key = $1", &[&&a.0[..]])?.is_some())
    }

    fn accounts(&mut self) -> Result<Vec<AccountRecord>, StoreError> {
        let rows = self.rows("SELECT key, created_at, removed_at FROM accounts ORDER BY created_at, key", &[])?;
        Ok(rows.iter().filter_map(account_row).collect())
    }

    fn insert_account(&mut self, a: &AccountId, invite: Option<[u8; 8]>, now: u64) -> Result<(), StoreError> {
        let invite = invite.as_ref().map(|id| &id[..]);
        self.exec(
            "INSERT INTO accounts (key, created_at, invite_id) VALUES ($1, $2, $3)",
            &[&&a.0[..], &i(now), &invite],
        )?;
        Ok(())
    }

    fn device(&mut self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let Some(row) = self.row(
            "SELECT account, certificate, created_at, revoked_at FROM devices WHERE key = $1",
            &[&&device.0[..]],
        )?
        else {
            return Ok(None);
        };
        let account: Vec<u8> = row.get(0);
        let account =
            key(&account).ok_or_else(|| StoreError::Corrupt("a device row's account is not 32 bytes".into()))?;
        Ok(Some(DeviceRecord {
            account: AccountId(account),
            certificate: row.get(1),
            created_at: u(row.get(2)),
            revoked_at: row.get::<_, Option<i64>>(3).map(u),
        }))
    }

    fn lock_account(&mut self, account: &AccountId) -> Result<(), StoreError> {
        if self.writing {
            self.rows("SELECT 1 FROM accounts WHERE key = $1 FOR UPDATE", &[&&account.0[..]])?;
        }
        Ok(())
    }

    fn insert_device(&mut self, device: &DeviceId, r: &DeviceRecord) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO devices (key, account, certificate, created_at) VALUES ($1, $2, $3, $4)",
            &[&&device.0[..], &&r.account.0[..], &r.certificate, &i(r.created_at)],
        )?;
        Ok(())
    }

    fn devices_of(&mut self, a: &AccountId) -> Result<Vec<(DeviceId, DeviceRecord)>, StoreError> {
        let rows = self.rows(
            "SELECT key, certificate, created_at, revoked_at FROM devices WHERE account = $1 ORDER BY created_at, key",
            &[&&a.0[..]],
        )?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let k: Vec<u8> = row.get(0);
                let record = DeviceRecord {
                    account: *a,
                    certificate: row.get(1),
                    created_at: u(row.get(2)),
                    revoked_at: row.get::<_, Option<i64>>(3).map(u),
                };
                Some((DeviceId(key(&k)?), record))
            })
            .collect())
    }

    fn revoke_device(&mut self, device: &DeviceId, now: u64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE devices SET revoked_at = $2 WHERE key = $1 AND revoked_at IS NULL",
            &[&&device.0[..], &i(now)],
        )?;
        self.exec("DELETE FROM key_packages WHERE device = $1", &[&&device.0[..]])?;
        Ok(())
    }

    fn remove_account(&mut self, a: &AccountId, now: u64) -> Result<(), StoreError> {
        self.exec("UPDATE accounts SET removed_at = $2 WHERE key = $1 AND removed_at IS NULL", &[&&a.0[..], &i(now)])?;
        Ok(())
    }

    fn account(&mut self, a: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self
            .row("SELECT key, created_at, removed_at FROM accounts WHERE key = $1", &[&&a.0[..]])?
            .as_ref()
            .and_then(account_row))
    }

    fn insert_link(&mut self, l: &LinkRecord) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO links (id, account, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            &[&&l.id[..], &&l.account.0[..], &i(l.created_at), &i(l.expires_at)],
        )?;
        Ok(())
    }

    fn link(&mut self, id: &[u8; 16]) -> Result<Option<LinkRecord>, StoreError> {
        let Some(row) = self.row(
            "SELECT account, created_at, expires_at, device, offer, certificate, bundle FROM links WHERE id = $1",
            &[&&id[..]],
        )?
        else {
            return Ok(None);
        };
        let account: Vec<u8> = row.get(0);
        let account = key(&account).ok_or_else(|| StoreError::Corrupt("a link's account is not 32 bytes".into()))?;
        let device: Option<Vec<u8>> = row.get(3);
        let certificate: Option<Vec<u8>> = row.get(5);
        let bundle: Option<Vec<u8>> = row.get(6);
        Ok(Some(LinkRecord {
            id: *id,
            account: AccountId(account),
            created_at: u(row.get(1)),
            expires_at: u(row.get(2)),
            device: device.as_deref().and_then(key).map(DeviceId),
            offer: row.get(4),
            answer: certificate.zip(bundle),
        }))
    }

    fn set_link_offer(&mut self, id: &[u8; 16], device: &DeviceId, offer: &[u8]) -> Result<bool, StoreError> {
        let n = self.exec(
            "UPDATE links SET device = $2, offer = $3 WHERE id = $1 AND offer IS NULL",
            &[&&id[..], &&device.0[..], &offer],
        )?;
        Ok(n == 1)
    }

    fn set_link_answer(&mut self, id: &[u8; 16], certificate: &[u8], bundle: &[u8]) -> Result<bool, StoreError> {
        let n = self.exec(
            "UPDATE links SET certificate = $2, bundle = $3 WHERE id = $1 AND offer IS NOT NULL AND certificate IS NULL",
            &[&&id[..], &certificate, &bundle],
        )?;
        self.wrote(bundle.len());
        Ok(n == 1)
    }

    fn open_links(&mut self, a: &AccountId, now: u64) -> Result<u64, StoreError> {
        let row =
            self.one("SELECT count(*) FROM links WHERE account = $1 AND expires_at > $2", &[&&a.0[..], &i(now)])?;
        Ok(u(row.get(0)))
    }

    fn expire_links(&mut self, now: u64) -> Result<u64, StoreError> {
        self.exec("DELETE FROM links WHERE expires_at < $1", &[&i(now)])
    }

    fn insert_invite(&mut self, v: &InviteRecord) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO invites (id, secret_hash, uses_total, uses_left, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &&v.id[..],
                &&v.secret_hash[..],
                &i64::from(v.uses_total),
                &i64::from(v.uses_left),
                &v.expires_at.map(i),
                &i(v.created_at),
            ],
        )?;
        Ok(())
    }

    fn invite(&mut self, id: &[u8; 8]) -> Result<Option<InviteRecord>, StoreError> {
        Ok(self
            .row(
                "SELECT id, secret_hash, uses_total, uses_left, expires_at, created_at FROM invites WHERE id = $1",
                &[&&id[..]],
            )?
            .as_ref()
            .and_then(invite_row))
    }

    fn spend_invite(&mut self, id: &[u8; 8]) -> Result<bool, StoreError> {
        let n =
            self.exec("UPDATE invites SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left > 0", &[&&id[..]])?;
        Ok(n == 1)
    }

    fn invites(&mut self) -> Result<Vec<InviteRecord>, StoreError> {
        let rows = self.rows(
            "SELECT id, secret_hash, uses_total, uses_left, expires_at, created_at FROM invites
             ORDER BY created_at DESC, id",
            &[],
        )?;
        Ok(rows.iter().filter_map(invite_row).collect())
    }

    fn key_package_count(&mut self, owner: &DeviceId, suite: Suite) -> Result<(u32, bool), StoreError> {
        let row = self.one(
            "SELECT count(*) FILTER (WHERE NOT last_resort), COALESCE(bool_or(last_resort), false)
             FROM key_packages WHERE device = $1 AND suite = $2",
            &[&&owner.0[..], &i32::from(suite.code())],
        )?;
        Ok((u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX), row.get(1)))
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
                self.exec(
                    "DELETE FROM key_packages WHERE device = $1 AND last_resort AND suite = $2",
                    &[&&owner.0[..], &i32::from(p.suite.code())],
                )?;
            }
            self.exec(
                "INSERT INTO key_packages (hash_ref, device, account, data, last_resort, created_at, suite)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (hash_ref) DO NOTHING",
                &[
                    &p.hash_ref,
                    &&owner.0[..],
                    &&account.0[..],
                    &p.data,
                    &p.last_resort,
                    &i(now),
                    &i32::from(p.suite.code()),
                ],
            )?;
            self.wrote(p.data.len());
        }
        Ok(())
    }

    fn claim_key_packages(&mut self, account: &AccountId, suite: Suite, now: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let devices: Vec<Vec<u8>> = self
            .rows("SELECT key FROM devices WHERE account = $1 ORDER BY key", &[&&account.0[..]])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            // Locked, so two nodes never hand out the same package: the
            // second waits, finds it gone, and takes the next one.
            let Some(row) = self.row(
                "SELECT hash_ref, data, last_resort FROM key_packages WHERE device = $1 AND suite = $2
                 ORDER BY last_resort, created_at, hash_ref LIMIT 1 FOR UPDATE",
                &[&device, &i32::from(suite.code())],
            )?
            else {
                continue;
            };
            let (hash_ref, data, last_resort): (Vec<u8>, Vec<u8>, bool) = (row.get(0), row.get(1), row.get(2));
            if !last_resort {
                self.exec("DELETE FROM key_packages WHERE hash_ref = $1", &[&hash_ref])?;
            }
            self.exec(
                "INSERT INTO claimed (hash_ref, device, account, claimed_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (hash_ref) DO UPDATE SET device = EXCLUDED.device, account = EXCLUDED.account,
                     claimed_at = EXCLUDED.claimed_at",
                &[&hash_ref, &device, &&account.0[..], &i(now)],
            )?;
            out.push(data);
        }
        Ok(out)
    }

    fn claimed_owner(&mut self, hash_ref: &[u8]) -> Result<Option<(AccountId, DeviceId)>, StoreError> {
        let Some(row) = self.row("SELECT account, device FROM claimed WHERE hash_ref = $1", &[&hash_ref])? else {
            return Ok(None);
        };
        let (a, d): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
        Ok(key(&a).zip(key(&d)).map(|(a, d)| (AccountId(a), DeviceId(d))))
    }

    fn group(&mut self, group: &[u8]) -> Result<Option<GroupRecord>, StoreError> {
        let sql = self.pick(
            "SELECT g.epoch, s.state, g.last_seq, g.disappear, g.state_version
             FROM groups g JOIN group_states s ON s.gid = g.gid WHERE g.id = $1",
            "SELECT g.epoch, s.state, g.last_seq, g.disappear, g.state_version
             FROM groups g JOIN group_states s ON s.gid = g.gid WHERE g.id = $1
             FOR UPDATE OF g",
        );
        Ok(self.row(sql, &[&group])?.map(|r| GroupRecord {
            epoch: u(r.get(0)),
            state: r.get(1),
            last_seq: u(r.get(2)),
            disappear: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            version: u(r.get(4)),
        }))
    }

    fn send_context(&mut self, group: &[u8], d: &DeviceId) -> Result<Option<SendContext>, StoreError> {
        let sql = self.pick(
            "SELECT g.epoch, g.last_seq, (SELECT min(seq) FROM log WHERE gid = g.gid),
                    m.account, m.joined_after, m.left_at, m.acked, g.disappear, g.state_version
             FROM groups g LEFT JOIN members m ON m.gid = g.gid AND m.device = $2 WHERE g.id = $1",
            "SELECT g.epoch, g.last_seq, (SELECT min(seq) FROM log WHERE gid = g.gid),
                    m.account, m.joined_after, m.left_at, m.acked, g.disappear, g.state_version
             FROM groups g LEFT JOIN members m ON m.gid = g.gid AND m.device = $2 WHERE g.id = $1
             FOR UPDATE OF g",
        );
        let Some(row) = self.row(sql, &[&group, &&d.0[..]])? else { return Ok(None) };
        let last: i64 = row.get(1);
        let first: Option<i64> = row.get(2);
        let membership = match row.get::<_, Option<Vec<u8>>>(3) {
            Some(_) => membership_row(&row, 3),
            None => None,
        };
        let log_len = first.map_or(0, |f| u(last).saturating_sub(u(f)).saturating_add(1));
        let disappear = u32::try_from(row.get::<_, i64>(7)).unwrap_or(0);
        let version = u(row.get(8));
        Ok(Some(SendContext { epoch: u(row.get(0)), membership, log_len, disappear, version }))
    }

    fn insert_group(&mut self, group: &[u8], epoch: u64, state: &[u8], now: u64) -> Result<(), StoreError> {
        self.exec(
            "WITH g AS (INSERT INTO groups (id, epoch, last_seq, created_at) VALUES ($1, $2, 0, $3) RETURNING gid)
             INSERT INTO group_states (gid, state) SELECT gid, $4 FROM g",
            &[&group, &i(epoch), &i(now), &state],
        )?;
        self.wrote(state.len());
        Ok(())
    }

    fn update_group(&mut self, group: &[u8], epoch: u64, state: &[u8]) -> Result<(), StoreError> {
        self.exec(
            // The trigger of schema 8 advances the state's version.
            "WITH g AS (UPDATE groups SET epoch = $2 WHERE id = $1 RETURNING gid)
             UPDATE group_states s SET state = $3 FROM g WHERE s.gid = g.gid",
            &[&group, &i(epoch), &state],
        )?;
        self.wrote(state.len());
        Ok(())
    }

    fn set_disappear(&mut self, group: &[u8], secs: u32) -> Result<(), StoreError> {
        self.exec("UPDATE groups SET disappear = $2 WHERE id = $1", &[&group, &i64::from(secs)])?;
        Ok(())
    }

    fn group_info(&mut self, group: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .row("SELECT s.group_info FROM groups g JOIN group_states s ON s.gid = g.gid WHERE g.id = $1", &[&group])?
            .and_then(|r| r.get(0)))
    }

    fn set_group_info(&mut self, group: &[u8], info: &[u8]) -> Result<(), StoreError> {
        self.exec(
            "UPDATE group_states s SET group_info = $2 FROM groups g WHERE g.id = $1 AND s.gid = g.gid",
            &[&group, &info],
        )?;
        self.wrote(info.len());
        Ok(())
    }

    fn membership(&mut self, group: &[u8], d: &DeviceId) -> Result<Option<Membership>, StoreError> {
        Ok(self
            .row(
                "SELECT m.account, m.joined_after, m.left_at, m.acked FROM members m JOIN groups g ON g.gid = m.gid
                 WHERE g.id = $1 AND m.device = $2",
                &[&group, &&d.0[..]],
            )?
            .and_then(|r| membership_row(&r, 0)))
    }

    fn members(&mut self, group: &[u8]) -> Result<Vec<(DeviceId, Membership)>, StoreError> {
        let rows = self.rows(
            "SELECT m.device, m.account, m.joined_after, m.left_at, m.acked FROM members m
             JOIN groups g ON g.gid = m.gid WHERE g.id = $1 ORDER BY m.device",
            &[&group],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let d: Vec<u8> = r.get(0);
                Some((DeviceId(key(&d)?), membership_row(r, 1)?))
            })
            .collect())
    }

    fn revoked_members(&mut self, group: &[u8]) -> Result<Vec<DeviceId>, StoreError> {
        let rows = self.rows(
            "SELECT m.device FROM members m JOIN groups g ON g.gid = m.gid JOIN devices d ON d.key = m.device
             WHERE g.id = $1 AND m.left_at IS NULL AND d.revoked_at IS NOT NULL ORDER BY m.device",
            &[&group],
        )?;
        Ok(rows.iter().filter_map(|r| key(&r.get::<_, Vec<u8>>(0)).map(DeviceId)).collect())
    }

    fn add_member(&mut self, group: &[u8], d: &DeviceId, a: &AccountId, joined_after: u64) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO members (gid, device, account, joined_after, left_at, left_epoch, acked)
             SELECT gid, $2, $3, $4, NULL, NULL, $4 FROM groups WHERE id = $1
             ON CONFLICT (gid, device) DO UPDATE SET account = EXCLUDED.account,
                 joined_after = EXCLUDED.joined_after, left_at = NULL, left_epoch = NULL, acked = EXCLUDED.acked",
            &[&group, &&d.0[..], &&a.0[..], &i(joined_after)],
        )?;
        Ok(())
    }

    fn remove_member(&mut self, group: &[u8], d: &DeviceId, left_at: u64, epoch: u64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE members m SET left_at = $3, left_epoch = $4 FROM groups g
             WHERE g.id = $1 AND m.gid = g.gid AND m.device = $2",
            &[&group, &&d.0[..], &i(left_at), &i(epoch)],
        )?;
        Ok(())
    }

    fn delete_member(&mut self, group: &[u8], d: &DeviceId) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM members m USING groups g WHERE g.id = $1 AND m.gid = g.gid AND m.device = $2",
            &[&group, &&d.0[..]],
        )?;
        self.exec(
            "INSERT INTO former_members (gid, device) SELECT gid, $2 FROM groups WHERE id = $1 ON CONFLICT DO NOTHING",
            &[&group, &&d.0[..]],
        )?;
        Ok(())
    }

    fn was_member(&mut self, group: &[u8], d: &DeviceId) -> Result<bool, StoreError> {
        Ok(self
            .row(
                "SELECT 1 FROM former_members f JOIN groups g ON g.gid = f.gid WHERE g.id = $1 AND f.device = $2",
                &[&group, &&d.0[..]],
            )?
            .is_some())
    }

    fn set_acked(&mut self, group: &[u8], d: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE members m SET acked = GREATEST(m.acked, $3) FROM groups g
             WHERE g.id = $1 AND m.gid = g.gid AND m.device = $2",
            &[&group, &&d.0[..], &i(seq)],
        )?;
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
        // The sequence is the group row's counter, bumped (under the row's
        // lock) in the statement that inserts the message; the chain's head
        // is extended in the same statement (`crate::chain`'s construction,
        // with PostgreSQL's sha256 over the message's digest computed
        // before: every SET sees the row as it was).
        let row = self.one(
            "WITH g AS (UPDATE groups SET
                            last_seq = last_seq + 1,
                            bytes = bytes + $5,
                            chain_start = COALESCE(chain_start, last_seq + 1),
                            head = sha256($7 || COALESCE(head, sha256($6 || set_byte('\\x00'::bytea, 0, length(id)) || id))
                                          || int8send(last_seq + 1) || int8send($2) || $8)
                        WHERE id = $1
                        RETURNING gid, last_seq, head)
             INSERT INTO log (gid, seq, epoch, data, created_at, head, expires_at)
                 SELECT gid, last_seq, $2, $3, $4, head, $9 FROM g
             RETURNING seq, head",
            &[
                &group,
                &i(epoch),
                &message,
                &i(now),
                &len(message),
                &GENESIS_LABEL,
                &LINK_LABEL,
                &&digest.0[..],
                &expires.map(i),
            ],
        )?;
        self.wrote(message.len() + 32);
        let head: Vec<u8> = row.get(1);
        let head = <[u8; 32]>::try_from(head.as_slice()).map_err(|_| StoreError::Corrupt("a chain head".into()))?;
        Ok((u(row.get(0)), Head(head)))
    }

    fn chain_tip(&mut self, group: &[u8]) -> Result<Option<ChainTip>, StoreError> {
        let Some(row) = self.row("SELECT last_seq, chain_start, head FROM groups WHERE id = $1", &[&group])? else {
            return Ok(None);
        };
        let (start, head): (Option<i64>, Option<Vec<u8>>) = (row.get(1), row.get(2));
        let (Some(start), Some(head)) = (start, head) else { return Ok(None) };
        let head = <[u8; 32]>::try_from(head.as_slice()).map_err(|_| StoreError::Corrupt("a chain head".into()))?;
        Ok(Some(ChainTip { start: u(start), seq: u(row.get(0)), head: Head(head) }))
    }

    fn fetch(
        &mut self,
        group: &[u8],
        after: u64,
        upto: Option<u64>,
        limit_n: usize,
        byte_budget: usize,
    ) -> Result<(Messages, bool), StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok((vec![], false)) };
        let upper = upto.map(i).unwrap_or(i64::MAX);
        let rows = self.rows(
            "SELECT seq, data, head, expires_at, gone, epoch FROM log
             WHERE gid = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
            &[&gid, &i(after), &upper, &limit(limit_n.saturating_add(1))],
        )?;
        Ok(fill_log(rows, Page::new(limit_n, byte_budget)))
    }

    fn delete_messages_upto(&mut self, group: &[u8], upto: u64) -> Result<u64, StoreError> {
        let Some(gid) = self.gid(group)? else { return Ok(0) };
        self.delete_log(gid, upto)
    }

    fn add_welcome(&mut self, recipient: &DeviceId, group: &[u8], welcome: &[u8], now: u64) -> Result<u64, StoreError> {
        let gid = self.gid(group)?.unwrap_or(0);
        let row = self.one(
            "INSERT INTO inbox (recipient, gid, data, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&&recipient.0[..], &gid, &welcome, &i(now)],
        )?;
        self.wrote(welcome.len());
        Ok(u(row.get(0)))
    }

    fn welcomes(
        &mut self,
        recipient: &DeviceId,
        limit_n: usize,
        byte_budget: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = self.rows(
            "SELECT id, data FROM inbox WHERE recipient = $1 ORDER BY id LIMIT $2",
            &[&&recipient.0[..], &limit(limit_n)],
        )?;
        Ok(fill(rows, Page::new(limit_n, byte_budget)).0)
    }

    fn delete_welcome(&mut self, recipient: &DeviceId, id: u64) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM inbox WHERE id = $1 AND recipient = $2", &[&i(id), &&recipient.0[..]])? > 0)
    }

    fn groups_of(&mut self, d: &DeviceId, limit_n: usize) -> Result<Vec<GroupListing>, StoreError> {
        let rows = self.rows(
            "SELECT g.id, COALESCE(m.left_epoch, g.epoch), COALESCE(m.left_at, g.last_seq), m.acked, m.left_at IS NULL,
                    COALESCE((SELECT MIN(seq) FROM log WHERE log.gid = g.gid), 0)
             FROM members m JOIN groups g ON g.gid = m.gid WHERE m.device = $1 ORDER BY g.gid LIMIT $2",
            &[&&d.0[..], &limit(limit_n)],
        )?;
        Ok(rows
            .iter()
            .map(|r| GroupListing {
                group: r.get(0),
                epoch: u(r.get(1)),
                last_seq: u(r.get(2)),
                acked: u(r.get(3)),
                first_seq: u(r.get(5)),
                current: r.get(4),
            })
            .collect())
    }

    fn groups_count(&mut self, a: &AccountId) -> Result<u64, StoreError> {
        let row =
            self.one("SELECT count(DISTINCT gid) FROM members WHERE account = $1 AND left_at IS NULL", &[&&a.0[..]])?;
        Ok(u(row.get(0)))
    }

    fn log_len(&mut self, group: &[u8]) -> Result<u64, StoreError> {
        let row = self.row(
            "SELECT (SELECT min(seq) FROM log WHERE gid = g.gid), g.last_seq FROM groups g WHERE g.id = $1",
            &[&group],
        )?;
        Ok(match row {
            Some(r) => match r.get::<_, Option<i64>>(0) {
                Some(first) => u(r.get(1)).saturating_sub(u(first)).saturating_add(1),
                None => 0,
            },
            None => 0,
        })
    }

    fn database_bytes(&mut self) -> Result<u64, StoreError> {
        if let Some(s) = self.space {
            return Ok(s);
        }
        // Stored messages, counted in each group's row as they come and go
        // (the database's files only grow; PostgreSQL reuses their space
        // after VACUUM). Other tables are bounded by per-account quotas.
        let n = u(self.one("SELECT COALESCE(sum(bytes), 0)::bigint FROM groups", &[])?.get(0));
        self.space = Some(n);
        Ok(n)
    }

    fn stats(&mut self, now: u64) -> Result<Stats, StoreError> {
        let r = self.one(
            "SELECT (SELECT count(*) FROM accounts WHERE removed_at IS NULL),
                    (SELECT count(*) FROM accounts WHERE removed_at IS NOT NULL),
                    (SELECT count(*) FROM devices WHERE revoked_at IS NULL), (SELECT count(*) FROM groups),
                    (SELECT count(*) FROM log), (SELECT min(created_at) FROM log), (SELECT count(*) FROM inbox),
                    (SELECT count(*) FROM invites WHERE uses_left > 0 AND (expires_at IS NULL OR expires_at > $1)),
                    pg_database_size(current_database()),
                    (SELECT count(*) FROM blobs), (SELECT COALESCE(sum(size), 0)::bigint FROM blobs)",
            &[&i(now)],
        )?;
        Ok(Stats {
            accounts: u(r.get(0)),
            removed_accounts: u(r.get(1)),
            devices: u(r.get(2)),
            groups: u(r.get(3)),
            messages: u(r.get(4)),
            oldest_message: r.get::<_, Option<i64>>(5).map(u),
            welcomes: u(r.get(6)),
            invites_outstanding: u(r.get(7)),
            database_bytes: u(r.get(8)),
            blobs: u(r.get(9)),
            blob_bytes: u(r.get(10)),
        })
    }

    fn expire(&mut self, before: u64) -> Result<u64, StoreError> {
        let b = i(before);
        // Per group, the messages before the first one young enough to keep
        // (a prefix: sequences stay dense from the oldest kept message).
        let groups: Vec<(i64, i64)> = self
            .rows(
                "SELECT g.gid, COALESCE(
                     (SELECT k.seq FROM log k WHERE k.gid = g.gid AND k.created_at >= $1 ORDER BY k.seq LIMIT 1),
                     g.last_seq + 1) - 1
                 FROM groups g WHERE EXISTS (SELECT 1 FROM log l WHERE l.gid = g.gid AND l.created_at < $1)",
                &[&b],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut n = 0;
        for (gid, upto) in groups {
            n += self.delete_log(gid, u(upto))?;
        }
        n += self.exec("DELETE FROM inbox WHERE created_at < $1", &[&b])?;
        n += self.exec("DELETE FROM claimed WHERE claimed_at < $1", &[&b])?;
        // Notices every node has long read: those up to the newest one
        // older than the retention (found walking back from the newest).
        // Not counted: they are no one's messages or Welcomes.
        let keep = f64::from(u32::try_from(NOTICE_RETENTION.as_secs()).unwrap_or(u32::MAX));
        self.exec(
            "DELETE FROM notices WHERE id <= (SELECT id FROM notices
                                              WHERE created_at < now() - make_interval(secs => $1)
                                              ORDER BY id DESC LIMIT 1)",
            &[&keep],
        )?;
        Ok(n)
    }

    fn insert_blob(&mut self, b: &BlobRecord) -> Result<(), StoreError> {
        let Some(gid) = self.gid(&b.group)? else {
            return Err(StoreError::Corrupt("a blob for a group that does not exist".into()));
        };
        self.exec(
            "INSERT INTO blobs (id, gid, account, device, size, received, hash, created_at, completed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &&b.id[..],
                &gid,
                &&b.account.0[..],
                &&b.device.0[..],
                &i(b.size),
                &i(b.received),
                &b.hash.as_ref().map(|h| &h[..]),
                &i(b.created_at),
                &b.completed_at.map(i),
            ],
        )?;
        Ok(())
    }

    fn blob(&mut self, id: &[u8; 16]) -> Result<Option<BlobRecord>, StoreError> {
        Ok(self
            .row(
                "SELECT b.id, g.id, b.account, b.device, b.size, b.received, b.hash, b.created_at, b.completed_at, b.expires_at
                 FROM blobs b JOIN groups g ON g.gid = b.gid WHERE b.id = $1",
                &[&&id[..]],
            )?
            .as_ref()
            .and_then(blob_row))
    }

    fn set_blob_received(&mut self, id: &[u8; 16], received: u64) -> Result<(), StoreError> {
        self.exec("UPDATE blobs SET received = $2 WHERE id = $1 AND hash IS NULL", &[&&id[..], &i(received)])?;
        Ok(())
    }

    fn expire_messages(&mut self, now: u64, limit: usize) -> Result<u64, StoreError> {
        // PostgreSQL's sha256 of the bytes is the chain's message digest.
        // The old row version stays in the table file until VACUUM reuses
        // its space, and in the WAL until its segment is recycled
        // (SECURITY.md, "Disappearing messages").
        let n = self.exec(
            "UPDATE log SET data = ''::bytea, gone = sha256(data), expires_at = NULL
             WHERE (gid, seq) IN (SELECT gid, seq FROM log WHERE expires_at IS NOT NULL AND expires_at <= $1
                                  ORDER BY expires_at LIMIT $2)",
            &[&i(now), &i(limit as u64)],
        )?;
        Ok(n)
    }

    fn complete_blob(&mut self, id: &[u8; 16], hash: &[u8; 32], now: u64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE blobs SET received = size, hash = $2, completed_at = $3,
                 expires_at = (SELECT CASE WHEN g.disappear > 0 THEN $3 + g.disappear END
                               FROM groups g WHERE g.gid = blobs.gid)
             WHERE id = $1 AND hash IS NULL",
            &[&&id[..], &&hash[..], &i(now)],
        )?;
        Ok(())
    }

    fn delete_blob(&mut self, id: &[u8; 16]) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM blobs WHERE id = $1", &[&&id[..]])? > 0)
    }

    fn blob_usage(&mut self, a: &AccountId) -> Result<u64, StoreError> {
        Ok(u(self.one("SELECT COALESCE(sum(size), 0)::bigint FROM blobs WHERE account = $1", &[&&a.0[..]])?.get(0)))
    }

    fn open_uploads(&mut self, d: &DeviceId) -> Result<u64, StoreError> {
        Ok(u(self.one("SELECT count(*) FROM blobs WHERE device = $1 AND hash IS NULL", &[&&d.0[..]])?.get(0)))
    }

    fn expire_blobs(
        &mut self,
        complete_before: u64,
        open_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<[u8; 16]>, StoreError> {
        let rows = self.rows(
            "DELETE FROM blobs WHERE id IN (
                 SELECT b.id FROM blobs b
                 WHERE (b.completed_at IS NOT NULL AND b.completed_at < $1)
                    OR (b.completed_at IS NULL AND b.created_at < $2)
                    OR b.expires_at <= $4
                    OR NOT EXISTS (SELECT 1 FROM members m WHERE m.gid = b.gid AND m.left_at IS NULL)
                 LIMIT $3)
             RETURNING id",
            &[&i(complete_before), &i(open_before), &i(limit as u64), &i(now)],
        )?;
        Ok(rows.iter().filter_map(|r| <[u8; 16]>::try_from(r.get::<_, &[u8]>(0)).ok()).collect())
    }

    fn expire_timed_blobs(&mut self, now: u64, limit: usize) -> Result<Vec<[u8; 16]>, StoreError> {
        let rows = self.rows(
            "DELETE FROM blobs WHERE id IN (
                 SELECT id FROM blobs WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2)
             RETURNING id",
            &[&i(now), &i(limit as u64)],
        )?;
        Ok(rows.iter().filter_map(|r| <[u8; 16]>::try_from(r.get::<_, &[u8]>(0)).ok()).collect())
    }

    fn timers_in_use(&mut self) -> Result<bool, StoreError> {
        Ok(self.one("SELECT EXISTS (SELECT 1 FROM groups WHERE disappear > 0)", &[])?.get(0))
    }

    fn blobs(&mut self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<BlobRecord>, StoreError> {
        let after = after.map(|a| a.to_vec()).unwrap_or_default();
        let rows = self.rows(
            "SELECT b.id, g.id, b.account, b.device, b.size, b.received, b.hash, b.created_at, b.completed_at, b.expires_at
             FROM blobs b JOIN groups g ON g.gid = b.gid WHERE b.id > $1 ORDER BY b.id LIMIT $2",
            &[&after, &i(limit as u64)],
        )?;
        Ok(rows.iter().filter_map(blob_row).collect())
    }
}

impl Unit for PgStore<'_> {
    const CONFLICTS: bool = true;

    fn savepoint(&mut self) -> Result<(), StoreError> {
        // The previous request's kept savepoint is released in the same
        // round trip (or by the commit, if that was the last request).
        let sql = if std::mem::take(&mut self.unreleased) {
            "RELEASE SAVEPOINT request; SAVEPOINT request"
        } else {
            "SAVEPOINT request"
        };
        self.tx.batch_execute(sql).map_err(|e| self.fail(e))
    }

    fn release(&mut self, keep: bool) -> Result<(), StoreError> {
        if keep {
            self.unreleased = true;
            return Ok(());
        }
        self.tx.batch_execute("ROLLBACK TO SAVEPOINT request; RELEASE SAVEPOINT request").map_err(|e| self.fail(e))
    }

    fn announce(&mut self, notifications: &[Notification]) -> Result<(), StoreError> {
        self.notices.extend(notifications.iter().map(Notice::of));
        Ok(())
    }

    fn take_conflict(&mut self) -> bool {
        std::mem::take(&mut self.conflict)
    }
}

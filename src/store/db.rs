//! The synchronous database: accounts, devices and invites.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use thiserror::Error;

use super::{schema, StoreError};
use crate::auth::{AccountId, DeviceCertificate, DeviceId, InviteToken};

/// An open hush database.
#[derive(Debug)]
pub struct Db {
    pub(crate) conn: Connection,
}

/// A registered account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub account: AccountId,
    pub created_at: u64,
}

/// An invite, as the operator sees it (the secret is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRow {
    pub id: [u8; 8],
    pub uses_total: u32,
    pub uses_left: u32,
    pub expires_at: Option<u64>,
    pub created_at: u64,
}

/// A registered device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRow {
    pub account: AccountId,
    pub device: DeviceId,
    pub created_at: u64,
}

/// Outcome of a successful registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// False when the account already existed (no invite use was spent).
    pub created: bool,
}

/// Why a registration was refused (the client's doing) or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegisterError {
    #[error("this server requires an invite to register")]
    InviteRequired,
    #[error("the invite is not known to this server")]
    InviteUnknown,
    #[error("the invite has expired")]
    InviteExpired,
    #[error("the invite has no uses left")]
    InviteUsedUp,
    #[error("this account is already registered from another device; linking a second device is not supported yet")]
    AccountExists,
    #[error("this device is already registered with another certificate")]
    DeviceConflict,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for RegisterError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(StoreError::Sqlite(e))
    }
}

use super::{to_i64, to_u64};

impl Db {
    /// Opens or creates the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn: Connection = crate::sqlite::open::<StoreError>(path)?;
        schema::migrate(&mut conn)?;
        Ok(Self { conn })
    }

    /// Makes the certificate's device the first device of a new account.
    /// A device already registered with this same certificate succeeds
    /// without spending an invite. Otherwise the invite is checked (secret
    /// hash in constant time, expiry, uses) and one use is spent in the
    /// same transaction that creates the account and its device, so two
    /// registrations racing for the last use cannot both win. The caller
    /// has verified the certificate and that its device key is the one the
    /// connection authenticated with.
    pub fn register(
        &mut self,
        cert: &DeviceCertificate,
        invite: Option<&InviteToken>,
        invite_required: bool,
        now: u64,
    ) -> Result<Registered, RegisterError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let encoded = cert.encode();
        let device: Option<Vec<u8>> = tx
            .query_row("SELECT certificate FROM devices WHERE key = ?1", [&cert.device.0[..]], |r| r.get(0))
            .optional()?;
        match device {
            Some(existing) if existing == encoded => return Ok(Registered { created: false }),
            Some(_) => return Err(RegisterError::DeviceConflict),
            None => {}
        }
        let account_exists = tx
            .query_row("SELECT 1 FROM accounts WHERE key = ?1", [&cert.account.0[..]], |_| Ok(()))
            .optional()?
            .is_some();
        if account_exists {
            return Err(RegisterError::AccountExists);
        }
        let invite_id = match invite {
            None if invite_required => return Err(RegisterError::InviteRequired),
            None => None,
            Some(token) => {
                let id = token.id();
                let row: Option<(Vec<u8>, i64, Option<i64>)> = tx
                    .query_row("SELECT secret_hash, uses_left, expires_at FROM invites WHERE id = ?1", [&id[..]], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                let Some((hash, uses_left, expires_at)) = row else {
                    return Err(RegisterError::InviteUnknown);
                };
                if !token.matches(&hash) {
                    return Err(RegisterError::InviteUnknown);
                }
                if expires_at.is_some_and(|e| to_u64(e) <= now) {
                    return Err(RegisterError::InviteExpired);
                }
                if uses_left <= 0 {
                    return Err(RegisterError::InviteUsedUp);
                }
                tx.execute("UPDATE invites SET uses_left = uses_left - 1 WHERE id = ?1", [&id[..]])?;
                Some(id.to_vec())
            }
        };
        tx.execute(
            "INSERT INTO accounts (key, created_at, invite_id) VALUES (?1, ?2, ?3)",
            params![&cert.account.0[..], to_i64(now), invite_id],
        )?;
        tx.execute(
            "INSERT INTO devices (key, account, certificate, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![&cert.device.0[..], &cert.account.0[..], encoded, to_i64(now)],
        )?;
        tx.commit()?;
        Ok(Registered { created: true })
    }

    /// The registered device with this key, if any. (Its certificate was
    /// verified when it registered; the account is read from its own
    /// column so a connection costs no signature check.)
    pub fn device(&self, device: &DeviceId) -> Result<Option<DeviceRow>, StoreError> {
        let row: Option<(Vec<u8>, i64)> = self
            .conn
            .query_row("SELECT account, created_at FROM devices WHERE key = ?1", [&device.0[..]], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((account, created_at)) = row else { return Ok(None) };
        let account = <[u8; 32]>::try_from(account.as_slice())
            .map_err(|_| StoreError::Corrupt("a device row's account is not 32 bytes".into()))?;
        Ok(Some(DeviceRow { account: AccountId(account), device: *device, created_at: to_u64(created_at) }))
    }

    /// The account row for `account`, if it is registered.
    pub fn account(&self, account: &AccountId) -> Result<Option<AccountRow>, StoreError> {
        let created_at: Option<i64> = self
            .conn
            .query_row("SELECT created_at FROM accounts WHERE key = ?1", [&account.0[..]], |r| r.get(0))
            .optional()?;
        Ok(created_at.map(|c| AccountRow { account: *account, created_at: to_u64(c) }))
    }

    /// All accounts, oldest first. Rows whose key is not 32 bytes (which the
    /// schema forbids) are skipped rather than trusted.
    pub fn accounts(&self) -> Result<Vec<AccountRow>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT key, created_at FROM accounts ORDER BY created_at, key")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, created_at) = row?;
            if let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) {
                out.push(AccountRow { account: AccountId(key), created_at: to_u64(created_at) });
            }
        }
        Ok(out)
    }

    /// Creates an invite good for `uses` registrations until `expires_at`.
    pub fn create_invite(&mut self, uses: u32, expires_at: Option<u64>, now: u64) -> Result<InviteToken, StoreError> {
        let token = InviteToken::generate().map_err(|_| StoreError::Random)?;
        self.conn.execute(
            "INSERT INTO invites (id, secret_hash, uses_total, uses_left, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5)",
            params![&token.id()[..], &token.secret_hash()[..], uses, expires_at.map(to_i64), to_i64(now)],
        )?;
        Ok(token)
    }

    /// All invites, newest first.
    pub fn invites(&self) -> Result<Vec<InviteRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, uses_total, uses_left, expires_at, created_at FROM invites ORDER BY created_at DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, uses_total, uses_left, expires_at, created_at) = row?;
            if let Ok(id) = <[u8; 8]>::try_from(id.as_slice()) {
                out.push(InviteRow {
                    id,
                    uses_total,
                    uses_left,
                    expires_at: expires_at.map(to_u64),
                    created_at: to_u64(created_at),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        (dir, db)
    }

    fn cert(n: u8) -> DeviceCertificate {
        let account = crate::auth::Identity::generate().unwrap();
        DeviceCertificate::issue(&account, DeviceId([n; 32]), [n; 32], 1)
    }

    #[test]
    fn invite_uses_expiry_and_reregistration() {
        let (_d, mut db) = db();
        let token = db.create_invite(1, Some(100), 10).unwrap();
        let a = cert(1);
        let b = cert(2);
        assert!(matches!(db.register(&a, None, true, 20), Err(RegisterError::InviteRequired)));
        assert!(db.register(&a, Some(&token), true, 20).unwrap().created);
        // Re-registering is harmless and spends nothing.
        assert!(!db.register(&a, Some(&token), true, 20).unwrap().created);
        assert!(!db.register(&a, None, true, 20).unwrap().created);
        assert!(matches!(db.register(&b, Some(&token), true, 20), Err(RegisterError::InviteUsedUp)));
        let token2 = db.create_invite(5, Some(100), 10).unwrap();
        assert!(matches!(db.register(&b, Some(&token2), true, 100), Err(RegisterError::InviteExpired)));
        let unknown = InviteToken::generate().unwrap();
        assert!(matches!(db.register(&b, Some(&unknown), true, 20), Err(RegisterError::InviteUnknown)));
        assert_eq!(db.accounts().unwrap().len(), 1);
        assert_eq!(db.invites().unwrap().len(), 2);
        assert_eq!(db.device(&a.device).unwrap().unwrap().account, a.account);
        assert!(db.device(&b.device).unwrap().is_none());
    }

    #[test]
    fn a_second_device_or_a_second_certificate_is_refused() {
        let (_d, mut db) = db();
        let owner = crate::auth::Identity::generate().unwrap();
        let first = DeviceCertificate::issue(&owner, DeviceId([1; 32]), [1; 32], 1);
        assert!(db.register(&first, None, false, 20).unwrap().created);
        let second = DeviceCertificate::issue(&owner, DeviceId([2; 32]), [2; 32], 1);
        assert!(matches!(db.register(&second, None, false, 20), Err(RegisterError::AccountExists)));
        let other_key = DeviceCertificate::issue(&owner, DeviceId([1; 32]), [3; 32], 1);
        assert!(matches!(db.register(&other_key, None, false, 20), Err(RegisterError::DeviceConflict)));
    }

    #[test]
    fn right_id_wrong_secret_is_unknown() {
        let (_d, mut db) = db();
        let token = db.create_invite(1, None, 10).unwrap();
        let text = token.to_string();
        // Same id (first 8 bytes = first 12.8 symbols), different secret.
        let mut forged: Vec<char> = text.chars().collect();
        forged[20] = if forged[20] == 'a' { 'b' } else { 'a' };
        let forged: InviteToken = forged.into_iter().collect::<String>().parse().unwrap();
        assert_eq!(forged.id(), token.id());
        assert!(matches!(db.register(&cert(3), Some(&forged), true, 20), Err(RegisterError::InviteUnknown)));
    }

    #[test]
    fn refuses_a_database_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(Db::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(Db::open(&path), Err(StoreError::SchemaTooNew { found: 99, .. })));
    }
}

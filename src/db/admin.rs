//! The operator's short commands on any backend.

use super::StoreError;
use crate::auth::InviteToken;
use crate::delivery::storage::{AccountRecord, Backend, InviteRecord, Storage as _};

/// The operator's short commands (`hushd invite`, `invites`, `accounts`),
/// on any database.
pub trait Admin: Backend<Error = StoreError> {
    /// Creates an invite good for `uses` registrations until `expires_at`.
    fn create_invite(&mut self, uses: u32, expires_at: Option<u64>, now: u64) -> Result<InviteToken, StoreError> {
        let token = InviteToken::generate().map_err(|_| StoreError::Random)?;
        let record = InviteRecord::new(&token, uses, expires_at, now);
        self.write(|s| s.insert_invite(&record))?;
        Ok(token)
    }

    /// All invites, newest first.
    fn invites(&mut self) -> Result<Vec<InviteRecord>, StoreError> {
        self.read(|s| s.invites())?
    }

    /// All accounts, oldest first.
    fn accounts(&mut self) -> Result<Vec<AccountRecord>, StoreError> {
        self.read(|s| s.accounts())?
    }
}

impl<B: Backend<Error = StoreError>> Admin for B {}

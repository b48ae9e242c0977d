//! Registration and status: the requests about the caller itself.

use super::{refuse, Caller, Delivery, Outcome, Refusal};
use crate::auth::{DeviceCertificate, DeviceId, InviteToken};
use crate::delivery::storage::{DeviceRecord, Storage};
use crate::wire::{ErrorCode, Response};

impl Delivery {
    /// Makes the certificate's device the first device of a new account,
    /// for a connection that authenticated with `device`'s key.
    ///
    /// A device already registered with this same certificate succeeds
    /// without spending an invite. Otherwise the invite is checked (secret
    /// hash in constant time, expiry, uses) and one use is spent in the
    /// same unit of work that creates the account and its device; the
    /// storage decides whether a use is left, so two registrations racing
    /// for the last use cannot both win.
    pub(super) fn register<S: Storage>(
        &mut self,
        store: &mut S,
        device: DeviceId,
        invite: Option<&str>,
        certificate: &[u8],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let cert = DeviceCertificate::decode(certificate)
            .map_err(|e| refuse(ErrorCode::InvalidCredential, format!("device certificate: {e}")))?;
        if cert.device != device {
            return Err(refuse(
                ErrorCode::InvalidCredential,
                "the device certificate is for another key than the one this connection authenticated with",
            ));
        }
        let registered = Some(Caller::of(&cert));
        let encoded = cert.encode();
        match store.device(&device)? {
            Some(existing) if existing.revoked_at.is_some() => {
                return Err(refuse(ErrorCode::Revoked, "this device was revoked, or its account removed"))
            }
            Some(existing) if existing.certificate == encoded => {
                return Ok(Outcome { registered, ..Outcome::reply(Response::Registered { created: false }) })
            }
            Some(_) => {
                return Err(refuse(
                    ErrorCode::InvalidCredential,
                    "this device is already registered with another certificate",
                ))
            }
            None => {}
        }
        if let Some(account) = store.account(&cert.account)? {
            // A further device of an existing account, certified by the
            // account key itself (a home restored from a backup holds it):
            // the same authority that certifies a linked device, within
            // the same caps. No invite: the account is registered.
            if account.removed_at.is_some() {
                return Err(refuse(ErrorCode::Revoked, "this account was removed by the server's operator"));
            }
            store.lock_account(&cert.account)?;
            // Again under the account's lock (another node may have removed
            // it meanwhile).
            if store.account(&cert.account)?.is_some_and(|a| a.removed_at.is_some()) {
                return Err(refuse(ErrorCode::Revoked, "this account was removed by the server's operator"));
            }
            Self::room_for_a_device(store, &cert.account)?;
            store.insert_device(&device, &DeviceRecord::new(cert.account, encoded, now))?;
            tracing::debug!("device registered with its account's certificate");
            return Ok(Outcome { registered, ..Outcome::wrote(Response::Registered { created: false }, vec![]) });
        }
        let unknown = || refuse(ErrorCode::InviteUnknown, "the invite is not known to this server");
        let invite_id = match invite {
            None if self.quotas.invite_required => {
                return Err(refuse(ErrorCode::InviteRequired, "this server requires an invite to register"))
            }
            None => None,
            Some(text) => {
                let token: InviteToken = text.parse().map_err(|_| unknown())?;
                let id = token.id();
                let record = store.invite(&id)?.ok_or_else(unknown)?;
                if !token.matches(&record.secret_hash) {
                    return Err(unknown());
                }
                if record.expires_at.is_some_and(|e| e <= now) {
                    return Err(refuse(ErrorCode::InviteExpired, "the invite has expired"));
                }
                if !store.spend_invite(&id)? {
                    return Err(refuse(ErrorCode::InviteUsedUp, "the invite has no uses left"));
                }
                Some(id)
            }
        };
        store.insert_account(&cert.account, invite_id, now)?;
        store.insert_device(&device, &DeviceRecord::new(cert.account, encoded, now))?;
        tracing::debug!("account registered");
        Ok(Outcome { registered, ..Outcome::wrote(Response::Registered { created: true }, vec![]) })
    }

    /// What the server knows of the caller, and its clock and removal key.
    pub(super) fn status<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let row = store
            .device(&caller.device)?
            .ok_or_else(|| refuse(ErrorCode::NotRegistered, "this device is not registered"))?;
        Ok(Outcome::reply(Response::Status {
            account: caller.account.0,
            device: caller.device.0,
            registered_at: row.created_at,
            server_time: now,
            removal_key: self.removal_key,
            retention: self.retention_secs,
        }))
    }
}

//! Devices after registration: listing them, revoking one (the account
//! key's signed statement), and the operator removing a whole account.
//!
//! Revoking refuses the device's key at once (every request, and every
//! connection at its handshake) and, as every group's listed external
//! sender, the server proposes the removal of the device's leaf in each
//! group it is in (RFC 9420 external proposal, signed with the removal
//! key). The proposal is stored in the group's log and public state like a
//! member's; the next commit by any member applies it, and the roster
//! follows the tree as for every commit.

use super::groups::{check_state_size, load_public};
use super::{mls, refuse, Caller, Delivery, Notification, Outcome, Refusal, Storage};
use crate::auth::{AccountId, DeviceId, DeviceRevocation};
use crate::wire::{DeviceSummary, ErrorCode, Response};

/// Groups one device can be in at most, as far as revocation looks.
const MAX_GROUPS_SCANNED: usize = 1 << 20;

/// What removing an account did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// Devices newly revoked.
    pub devices: usize,
    /// Removal proposals stored (one per device per group).
    pub proposals: usize,
    /// What to push to online members (and whose connections to close).
    pub notifications: Vec<Notification>,
}

impl Delivery {
    /// The caller's account's devices.
    pub(super) fn list_devices<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let devices = store
            .devices_of(&caller.account)?
            .into_iter()
            .map(|(d, r)| DeviceSummary { device: d.0, registered_at: r.created_at, revoked: r.revoked_at.is_some() })
            .collect();
        Ok(Outcome::reply(Response::Devices { devices }))
    }

    /// `RevokeDevice`: a revocation signed by the caller's account key, of
    /// one of that account's devices.
    pub(super) fn revoke<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        revocation: &[u8],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let r = DeviceRevocation::decode(revocation)
            .map_err(|e| refuse(ErrorCode::InvalidCredential, format!("device revocation: {e}")))?;
        if r.account != caller.account {
            return Err(refuse(ErrorCode::InvalidCredential, "the revocation is signed by another account"));
        }
        let Some(device) = store.device(&r.device)?.filter(|d| d.account == caller.account) else {
            return Err(refuse(ErrorCode::InvalidCredential, "the revocation names a device of another account"));
        };
        let mut removal = Removal::default();
        if device.revoked_at.is_none() {
            self.revoke_device(store, &r.device, now, &mut removal)?;
        }
        Ok(Outcome::wrote(Response::Done, removal.notifications))
    }

    /// Offboarding: refuses every device of `account` from now on and
    /// proposes their removal from every group. Idempotent (a second call
    /// finds nothing left to do). For `hushd accounts remove`.
    pub fn remove_account<S: Storage>(
        &mut self,
        store: &mut S,
        account: &AccountId,
        now: u64,
    ) -> Result<Removal, RemoveError> {
        let mut removal = Removal::default();
        let result = (|| -> Result<(), Refusal<S::Error>> {
            if store.account(account)?.is_none() {
                return Err(refuse(ErrorCode::NotRegistered, "no such account"));
            }
            store.remove_account(account, now)?;
            for (device, record) in store.devices_of(account)? {
                if record.revoked_at.is_none() {
                    self.revoke_device(store, &device, now, &mut removal)?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(removal),
            Err(Refusal::Client { code: ErrorCode::NotRegistered, .. }) => Err(RemoveError::Unknown),
            Err(Refusal::Client { message, .. }) | Err(Refusal::Internal(message)) => Err(RemoveError::Failed(message)),
            Err(Refusal::Storage(e)) => Err(RemoveError::Failed(e.to_string())),
            Err(Refusal::Again(_)) => Err(RemoveError::Failed("a handshake given back".into())),
        }
    }

    /// `hushd groups remove-member`: the operator takes `account` out of
    /// one group. Its devices there stop being members at once (no longer
    /// counted against its group quota, sent to, or accepted from), and the
    /// server proposes the removal of their leaves, which members commit on
    /// their next sync (a commit that leaves one in is followed by a new
    /// proposal). `devices` in the result counts the memberships ended.
    pub fn remove_membership<S: Storage>(
        &mut self,
        store: &mut S,
        group: &[u8],
        account: &AccountId,
        now: u64,
    ) -> Result<Removal, RemoveError> {
        let mut removal = Removal::default();
        let result = (|| -> Result<(), Refusal<S::Error>> {
            let Some(record) = store.group(group)? else {
                return Err(refuse(ErrorCode::NotMember, "no such group"));
            };
            let devices: Vec<DeviceId> = store
                .members(group)?
                .into_iter()
                .filter(|(_, m)| m.is_current() && m.account == *account)
                .map(|(d, _)| d)
                .collect();
            if devices.is_empty() {
                return Err(refuse(ErrorCode::NotMember, "that account is not a member of that group"));
            }
            for device in devices {
                let at = match self.propose_removal(store, group, &device, now)? {
                    Some(n) => {
                        let seq = match &n {
                            Notification::Message { seq, .. } => *seq,
                            _ => record.last_seq,
                        };
                        removal.proposals += 1;
                        removal.notifications.push(n);
                        seq
                    }
                    None => record.last_seq,
                };
                store.remove_member(group, &device, at, record.epoch)?;
                removal.devices += 1;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(removal),
            Err(Refusal::Client { code: ErrorCode::NotMember, .. }) => Err(RemoveError::Unknown),
            Err(Refusal::Client { message, .. }) | Err(Refusal::Internal(message)) => Err(RemoveError::Failed(message)),
            Err(Refusal::Storage(e)) => Err(RemoveError::Failed(e.to_string())),
            Err(Refusal::Again(_)) => Err(RemoveError::Failed("a handshake given back".into())),
        }
    }

    /// Marks `device` revoked and proposes its removal in every group it is
    /// a current member of.
    fn revoke_device<S: Storage>(
        &mut self,
        store: &mut S,
        device: &DeviceId,
        now: u64,
        removal: &mut Removal,
    ) -> Result<(), Refusal<S::Error>> {
        store.revoke_device(device, now)?;
        removal.devices += 1;
        removal.notifications.push(Notification::Revoked { device: *device });
        for g in store.groups_of(device, MAX_GROUPS_SCANNED)? {
            if g.current {
                if let Some(n) = self.propose_removal(store, &g.group, device, now)? {
                    removal.proposals += 1;
                    removal.notifications.push(n);
                }
            }
        }
        Ok(())
    }

    /// Stores the server's external proposal to remove `device`'s leaf from
    /// `group` at its current epoch. `None` when the device holds no leaf
    /// or the group does not list the server's removal key.
    pub(super) fn propose_removal<S: Storage>(
        &mut self,
        store: &mut S,
        group: &[u8],
        device: &DeviceId,
        now: u64,
    ) -> Result<Option<Notification>, Refusal<S::Error>> {
        let signer = self
            .removal_signer
            .clone()
            .ok_or_else(|| Refusal::Internal("this server was started without its removal key".into()))?;
        let Some(record) = store.group(group)? else { return Ok(None) };
        let (storage, mut public) = load_public(&record.state, group)?;
        let leaf = public
            .members()
            .find(|m| mls::holder_of(&m.credential).is_some_and(|(_, d)| d == *device))
            .map(|m| m.index);
        let Some(leaf) = leaf else { return Ok(None) };
        let Some(bytes) =
            mls::removal_proposal(&public, leaf, &signer).map_err(|e| Refusal::Internal(e.to_string()))?
        else {
            return Ok(None);
        };
        // Our own proposal goes through the same verification as any
        // handshake message, into the public state members commit against.
        let framed = mls::frame(&bytes).map_err(|e| Refusal::Internal(format!("own removal proposal: {e}")))?;
        let processed = public
            .process_message(&self.crypto, framed.message)
            .map_err(|e| Refusal::Internal(format!("own removal proposal: {e}")))?;
        let openmls::prelude::ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(Refusal::Internal("own removal proposal is not a proposal".into()));
        };
        public
            .add_proposal(&storage, *queued)
            .map_err(|e| Refusal::Internal(format!("storing the removal proposal: {e:?}")))?;
        check_state_size(&storage)?;
        let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
        // The server's own proposal: never the request's message.
        let digest = crate::chain::MessageDigest::of(&bytes);
        let (seq, head) = store.append(group, record.epoch, &bytes, &digest, now, None)?;
        store.update_group(group, record.epoch, &state)?;
        let recipients = store.current_members(group)?.into();
        Ok(Some(Notification::Message { group: group.to_vec(), seq, head: Some(head), message: bytes, recipients }))
    }
}

/// Why an account could not be removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    #[error("no such account on this server (or, for one group: no such group, or the account is not a member of it)")]
    Unknown,
    #[error("removing the account failed: {0}")]
    Failed(String),
}

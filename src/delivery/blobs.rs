//! Files (issue 32): the rules for blobs. The bytes live in a blob store
//! the server keeps beside its database (see `crate::server::blobs`); the
//! core decides who may upload and fetch what, and keeps each blob's row
//! (group, owner, size, progress, hash) with the quotas.
//!
//! * An upload is opened for a group the device is a current member of,
//!   with a padded size ([`crate::files::Layout::of_blob`]: the server
//!   learns the bucket, not the size), within the largest file, the
//!   account's storage quota (an open upload counts in full) and the
//!   uploads a device may have open.
//! * Only the device that opened an upload may write, resume or cancel it.
//! * A complete blob may be fetched by a current member device of its group
//!   (or another device of such a member's account). Everything else, a
//!   missing blob, someone else's upload, a group the caller left or never
//!   joined, is answered with one [`ErrorCode::NoSuchFile`].
//! * Blobs go with retention: complete ones with the messages that carry
//!   them, unfinished ones after [`crate::limits::ABANDONED_UPLOAD_AFTER`],
//!   and every blob of a group nobody is a member of any more.

use super::storage::{BlobRecord, Membership};
use super::{Caller, Delivery, Outcome, Refusal, Storage};
use crate::files::Layout;
use crate::wire::{ErrorCode, Response, UploadState};

fn no_such_file<E>() -> Refusal<E> {
    super::refuse(ErrorCode::NoSuchFile, "no such file (it may have expired, or it is not yours to fetch)")
}

const MIB: u64 = 1024 * 1024;

impl Delivery {
    pub(super) fn upload_open<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: Vec<u8>,
        size: u64,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        if store.membership(&group, &caller.device)?.filter(Membership::is_current).is_none() {
            return Err(super::not_member());
        }
        if Layout::of_blob(size).is_none() {
            return Err(super::refuse(ErrorCode::Malformed, "the size is not a padded file size"));
        }
        let max = self.quotas.max_file_bytes;
        if size > max {
            return Err(Refusal::Client {
                code: ErrorCode::TooLarge,
                detail: max,
                message: format!("files on this server are limited to {} MiB", max / MIB),
            });
        }
        // Other nodes sharing the database wait here until this unit
        // commits, so their counts include this upload (and this one's
        // theirs): two opens at once on two nodes cannot both fit in
        // room for one.
        store.lock_account(&caller.account)?;
        let open = store.open_uploads(&caller.device)?;
        let allowed = self.quotas.uploads_per_device;
        if open >= allowed {
            return Err(Refusal::Client {
                code: ErrorCode::TooManyUploads,
                detail: allowed,
                message: format!(
                    "this device has {open} unfinished uploads, the most it may have; finish or cancel one"
                ),
            });
        }
        let used = store.blob_usage(&caller.account)?;
        let quota = self.quotas.storage_quota_bytes;
        if used.saturating_add(size) > quota {
            return Err(Refusal::Client {
                code: ErrorCode::QuotaExceeded,
                detail: quota,
                message: format!(
                    "over quota: this account stores {} MiB of files and may store {} MiB; old files free their space when they expire",
                    used.div_ceil(MIB),
                    quota / MIB
                ),
            });
        }
        self.check_space(store)?;
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| Refusal::Internal("the random number generator failed".into()))?;
        let record = BlobRecord {
            id,
            group,
            account: caller.account,
            device: caller.device,
            size,
            received: 0,
            hash: None,
            created_at: now,
            completed_at: None,
            expires_at: None,
        };
        store.insert_blob(&record)?;
        Ok(Outcome::wrote(Response::Upload(state(&record)), vec![]))
    }

    /// The caller's own upload, complete or not.
    fn own_upload<S: Storage>(store: &mut S, caller: &Caller, id: &[u8; 16]) -> Result<BlobRecord, Refusal<S::Error>> {
        store.blob(id)?.filter(|b| b.device == caller.device).ok_or_else(no_such_file)
    }

    pub(super) fn upload_status<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
    ) -> Result<Outcome, Refusal<S::Error>> {
        let blob = Self::own_upload(store, caller, &id)?;
        Ok(Outcome::reply(Response::Upload(state(&blob))))
    }

    /// May the caller write blob `id` from `offset`? (The head of an upload
    /// stream; the server streams the bytes once this answers `Upload`.)
    pub(super) fn upload_at<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
        offset: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let blob = Self::own_upload(store, caller, &id)?;
        if blob.hash.is_none() && offset != blob.received {
            return Err(Refusal::Client {
                code: ErrorCode::UploadOffset,
                detail: blob.received,
                message: format!("the server holds {} bytes of this upload; continue from there", blob.received),
            });
        }
        Ok(Outcome::reply(Response::Upload(state(&blob))))
    }

    pub(super) fn upload_cancel<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
    ) -> Result<Outcome, Refusal<S::Error>> {
        let blob = Self::own_upload(store, caller, &id)?;
        if blob.hash.is_some() {
            return Err(super::refuse(ErrorCode::Malformed, "this upload is complete; it expires with its messages"));
        }
        store.delete_blob(&id)?;
        Ok(Outcome::wrote(Response::Done, vec![]))
    }

    pub(super) fn download<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
        offset: u64,
        length: u64,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let blob = store.blob(&id)?.ok_or_else(no_such_file)?;
        let (Some(hash), Some(done)) = (blob.hash, blob.completed_at) else { return Err(no_such_file()) };
        if done.saturating_add(self.retention_secs) <= now || blob.expires_at.is_some_and(|t| t <= now) {
            return Err(no_such_file());
        }
        if store.membership(&blob.group, &caller.device)?.filter(Membership::is_current).is_none()
            && !store.members(&blob.group)?.iter().any(|(_, m)| m.is_current() && m.account == caller.account)
        {
            return Err(no_such_file());
        }
        let rest = blob.size.checked_sub(offset).ok_or_else(|| {
            super::refuse(ErrorCode::Malformed, format!("the range starts after the file's end ({} bytes)", blob.size))
        })?;
        let length = if length == 0 { rest } else { length };
        if length > rest {
            return Err(super::refuse(ErrorCode::Malformed, "the range ends after the file's end"));
        }
        Ok(Outcome::reply(Response::Blob { size: blob.size, hash, offset, length }))
    }
}

fn state(b: &BlobRecord) -> UploadState {
    UploadState { id: b.id, size: b.size, received: b.received, hash: b.hash }
}

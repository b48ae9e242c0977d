//! Retention: deleting what every member who still needs it has read, and
//! what is older than the retention period.

use super::key_packages::claim_bucket;
use super::{Delivery, Refusal, Storage};

impl Delivery {
    /// Deletes messages every member who still needs them has acknowledged.
    pub(super) fn delete_acknowledged<S: Storage>(
        &mut self,
        store: &mut S,
        group: &[u8],
    ) -> Result<(), Refusal<S::Error>> {
        let mut floor = u64::MAX;
        for (_, m) in store.members(group)? {
            match m.left_at {
                None => floor = floor.min(m.acked.max(m.joined_after)),
                // A removed member is owed the messages up to its removal.
                Some(left) if m.acked < left => floor = floor.min(m.acked.max(m.joined_after)),
                Some(_) => {}
            }
        }
        if floor != u64::MAX && floor > 0 {
            store.delete_messages_upto(group, floor)?;
        }
        Ok(())
    }

    /// Expires messages, Welcomes and claim records past retention, and
    /// forgets idle rate-limit buckets. Returns rows deleted.
    pub fn expire<S: Storage>(&mut self, store: &mut S, now: u64) -> Result<u64, S::Error> {
        let (rate, burst, now_s) = claim_bucket(now);
        self.claims.retain(|_, b| !b.is_full(rate, burst, now_s));
        let links = store.expire_links(now)?;
        Ok(links + store.expire(now.saturating_sub(self.retention_secs))?)
    }

    /// Deletes the rows of blobs past retention, abandoned uploads and the
    /// blobs of groups nobody is in (at most
    /// [`crate::limits::MAX_BLOBS_EXPIRED_PER_RUN`]); returns their ids,
    /// whose bytes the caller removes once this is durable.
    pub fn expire_blobs<S: Storage>(&mut self, store: &mut S, now: u64) -> Result<Vec<[u8; 16]>, S::Error> {
        let abandoned = now.saturating_sub(crate::limits::ABANDONED_UPLOAD_AFTER.as_secs());
        store.expire_blobs(
            now.saturating_sub(self.retention_secs),
            abandoned,
            now,
            crate::limits::MAX_BLOBS_EXPIRED_PER_RUN,
        )
    }

    /// Deletes the rows of blobs whose group's timer ran out (at most
    /// [`crate::limits::MAX_BLOBS_EXPIRED_PER_RUN`]); returns their ids.
    pub fn expire_timed_blobs<S: Storage>(&mut self, store: &mut S, now: u64) -> Result<Vec<[u8; 16]>, S::Error> {
        store.expire_timed_blobs(now, crate::limits::MAX_BLOBS_EXPIRED_PER_RUN)
    }

    /// Deletes the bytes of messages whose group's timer ran out (at most
    /// [`crate::limits::MAX_MESSAGES_EXPIRED_PER_RUN`]); returns how many.
    pub fn expire_messages<S: Storage>(&mut self, store: &mut S, now: u64) -> Result<u64, S::Error> {
        store.expire_messages(now, crate::limits::MAX_MESSAGES_EXPIRED_PER_RUN)
    }
}

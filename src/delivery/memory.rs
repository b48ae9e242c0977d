//! An in-memory [`Storage`] for unit tests and fuzzing. Same semantics as
//! the SQLite store, none of its durability.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;

use super::storage::{
    AccountRecord, BlobRecord, ChainTip, DeviceRecord, GroupListing, GroupRecord, InviteRecord, LinkRecord, Membership,
    Messages, NewKeyPackage, Page, Stats, Storage,
};
use crate::auth::{AccountId, DeviceCertificate, DeviceId};
use crate::chain::{Head, MessageDigest};
use crate::mls::Suite;
use crate::wire::Logged;

#[derive(Debug, Clone)]
struct StoredPackage {
    hash_ref: Vec<u8>,
    data: Vec<u8>,
    last_resort: bool,
    suite: Suite,
}

#[derive(Debug, Clone)]
struct Group {
    record: GroupRecord,
    members: BTreeMap<DeviceId, Membership>,
    left_epochs: BTreeMap<DeviceId, u64>,
    /// Devices whose membership row went ([`Storage::was_member`]).
    former: std::collections::BTreeSet<DeviceId>,
    log: BTreeMap<u64, Entry>,
    group_info: Option<Vec<u8>>,
    chain: Option<ChainTip>,
}

/// One message of a group's log.
#[derive(Debug, Clone)]
struct Entry {
    data: Vec<u8>,
    created: u64,
    head: Head,
    epoch: u64,
    expires: Option<u64>,
    /// Set once the timer ran out and the bytes were deleted.
    gone: Option<MessageDigest>,
}

/// Everything in hash maps.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    accounts: BTreeMap<AccountId, AccountRecord>,
    devices: BTreeMap<DeviceId, DeviceRecord>,
    invites: BTreeMap<[u8; 8], InviteRecord>,
    links: BTreeMap<[u8; 16], LinkRecord>,
    packages: HashMap<DeviceId, Vec<StoredPackage>>,
    claimed: HashMap<Vec<u8>, (AccountId, DeviceId, u64)>,
    groups: BTreeMap<Vec<u8>, Group>,
    inbox: BTreeMap<u64, (DeviceId, Vec<u8>, Vec<u8>, u64)>,
    next_welcome: u64,
    blobs: BTreeMap<[u8; 16], BlobRecord>,
}

impl MemoryStore {
    /// Registers the certificate's account (if new) and device, as a
    /// registration would (for setting up tests).
    pub fn enrol(&mut self, certificate: &DeviceCertificate) {
        let account = certificate.account;
        self.accounts.entry(account).or_insert(AccountRecord { account, created_at: 0, removed_at: None });
        self.devices.insert(certificate.device, DeviceRecord::new(account, certificate.encode(), 0));
    }
}

impl Storage for MemoryStore {
    type Error = Infallible;

    fn account_exists(&mut self, account: &AccountId) -> Result<bool, Infallible> {
        Ok(self.accounts.contains_key(account))
    }

    fn accounts(&mut self) -> Result<Vec<AccountRecord>, Infallible> {
        let mut all: Vec<_> = self.accounts.values().copied().collect();
        all.sort_by_key(|r| (r.created_at, r.account));
        Ok(all)
    }

    fn insert_account(&mut self, account: &AccountId, _invite: Option<[u8; 8]>, now: u64) -> Result<(), Infallible> {
        self.accounts.insert(*account, AccountRecord { account: *account, created_at: now, removed_at: None });
        Ok(())
    }

    fn account(&mut self, account: &AccountId) -> Result<Option<AccountRecord>, Infallible> {
        Ok(self.accounts.get(account).copied())
    }

    fn remove_account(&mut self, account: &AccountId, now: u64) -> Result<(), Infallible> {
        if let Some(a) = self.accounts.get_mut(account) {
            a.removed_at.get_or_insert(now);
        }
        Ok(())
    }

    fn insert_link(&mut self, link: &LinkRecord) -> Result<(), Infallible> {
        self.links.insert(link.id, link.clone());
        Ok(())
    }

    fn link(&mut self, id: &[u8; 16]) -> Result<Option<LinkRecord>, Infallible> {
        Ok(self.links.get(id).cloned())
    }

    fn set_link_offer(&mut self, id: &[u8; 16], device: &DeviceId, offer: &[u8]) -> Result<bool, Infallible> {
        Ok(match self.links.get_mut(id) {
            Some(l) if l.offer.is_none() => {
                l.device = Some(*device);
                l.offer = Some(offer.to_vec());
                true
            }
            _ => false,
        })
    }

    fn set_link_answer(&mut self, id: &[u8; 16], certificate: &[u8], bundle: &[u8]) -> Result<bool, Infallible> {
        Ok(match self.links.get_mut(id) {
            Some(l) if l.offer.is_some() && l.answer.is_none() => {
                l.answer = Some((certificate.to_vec(), bundle.to_vec()));
                true
            }
            _ => false,
        })
    }

    fn open_links(&mut self, account: &AccountId, now: u64) -> Result<u64, Infallible> {
        Ok(self.links.values().filter(|l| l.account == *account && l.expires_at > now).count() as u64)
    }

    fn expire_links(&mut self, now: u64) -> Result<u64, Infallible> {
        let before = self.links.len();
        self.links.retain(|_, l| l.expires_at >= now);
        Ok((before - self.links.len()) as u64)
    }

    fn devices_of(&mut self, account: &AccountId) -> Result<Vec<(DeviceId, DeviceRecord)>, Infallible> {
        let mut all: Vec<_> =
            self.devices.iter().filter(|(_, r)| r.account == *account).map(|(d, r)| (*d, r.clone())).collect();
        all.sort_by_key(|(d, r)| (r.created_at, *d));
        Ok(all)
    }

    fn revoke_device(&mut self, device: &DeviceId, now: u64) -> Result<(), Infallible> {
        if let Some(d) = self.devices.get_mut(device) {
            if d.revoked_at.is_none() {
                d.revoked_at = Some(now);
                for g in self.groups.values_mut() {
                    if g.members.get(device).is_some_and(|m| m.left_at.is_none()) {
                        g.record.version = g.record.version.wrapping_add(1);
                    }
                }
            }
        }
        self.packages.remove(device);
        Ok(())
    }

    fn device(&mut self, device: &DeviceId) -> Result<Option<DeviceRecord>, Infallible> {
        Ok(self.devices.get(device).cloned())
    }

    fn insert_device(&mut self, device: &DeviceId, record: &DeviceRecord) -> Result<(), Infallible> {
        self.devices.insert(*device, record.clone());
        Ok(())
    }

    fn insert_invite(&mut self, invite: &InviteRecord) -> Result<(), Infallible> {
        self.invites.insert(invite.id, invite.clone());
        Ok(())
    }

    fn invite(&mut self, id: &[u8; 8]) -> Result<Option<InviteRecord>, Infallible> {
        Ok(self.invites.get(id).cloned())
    }

    fn spend_invite(&mut self, id: &[u8; 8]) -> Result<bool, Infallible> {
        Ok(match self.invites.get_mut(id) {
            Some(i) if i.uses_left > 0 => {
                i.uses_left -= 1;
                true
            }
            _ => false,
        })
    }

    fn invites(&mut self) -> Result<Vec<InviteRecord>, Infallible> {
        let mut all: Vec<_> = self.invites.values().cloned().collect();
        all.sort_by_key(|i| std::cmp::Reverse(i.created_at));
        Ok(all)
    }

    fn key_package_count(&mut self, owner: &DeviceId, suite: Suite) -> Result<(u32, bool), Infallible> {
        let list = self.packages.get(owner).map(Vec::as_slice).unwrap_or_default();
        let n = list.iter().filter(|p| !p.last_resort && p.suite == suite).count();
        Ok((u32::try_from(n).unwrap_or(u32::MAX), list.iter().any(|p| p.last_resort && p.suite == suite)))
    }

    fn add_key_packages(
        &mut self,
        _account: &AccountId,
        owner: &DeviceId,
        packages: &[NewKeyPackage],
        _now: u64,
    ) -> Result<(), Infallible> {
        let list = self.packages.entry(*owner).or_default();
        for p in packages {
            if list.iter().any(|q| q.hash_ref == p.hash_ref) {
                continue;
            }
            if p.last_resort {
                list.retain(|q| !(q.last_resort && q.suite == p.suite));
            }
            list.push(StoredPackage {
                hash_ref: p.hash_ref.clone(),
                data: p.data.clone(),
                last_resort: p.last_resort,
                suite: p.suite,
            });
        }
        Ok(())
    }

    fn claim_key_packages(&mut self, account: &AccountId, suite: Suite, now: u64) -> Result<Vec<Vec<u8>>, Infallible> {
        let devices: Vec<DeviceId> =
            self.devices.iter().filter(|(_, r)| r.account == *account).map(|(d, _)| *d).collect();
        let mut out = Vec::new();
        for device in devices {
            let Some(list) = self.packages.get_mut(&device) else { continue };
            let picked = match list.iter().position(|p| !p.last_resort && p.suite == suite) {
                Some(i) => Some(list.remove(i)),
                None => list.iter().find(|p| p.last_resort && p.suite == suite).cloned(),
            };
            if let Some(p) = picked {
                self.claimed.insert(p.hash_ref.clone(), (*account, device, now));
                out.push(p.data);
            }
        }
        Ok(out)
    }

    fn claimed_owner(&mut self, hash_ref: &[u8]) -> Result<Option<(AccountId, DeviceId)>, Infallible> {
        Ok(self.claimed.get(hash_ref).map(|(a, d, _)| (*a, *d)))
    }

    fn group(&mut self, group: &[u8]) -> Result<Option<GroupRecord>, Infallible> {
        Ok(self.groups.get(group).map(|g| g.record.clone()))
    }

    fn insert_group(&mut self, group: &[u8], epoch: u64, state: &[u8], _now: u64) -> Result<(), Infallible> {
        self.groups.insert(
            group.to_vec(),
            Group {
                record: GroupRecord { epoch, state: state.to_vec(), last_seq: 0, disappear: 0, version: 0 },
                members: BTreeMap::new(),
                left_epochs: BTreeMap::new(),
                former: std::collections::BTreeSet::new(),
                log: BTreeMap::new(),
                group_info: None,
                chain: None,
            },
        );
        Ok(())
    }

    fn update_group(&mut self, group: &[u8], epoch: u64, state: &[u8]) -> Result<(), Infallible> {
        if let Some(g) = self.groups.get_mut(group) {
            g.record.epoch = epoch;
            g.record.state = state.to_vec();
            g.record.version = g.record.version.wrapping_add(1);
        }
        Ok(())
    }

    fn set_disappear(&mut self, group: &[u8], secs: u32) -> Result<(), Infallible> {
        if let Some(g) = self.groups.get_mut(group) {
            g.record.disappear = secs;
        }
        Ok(())
    }

    fn group_info(&mut self, group: &[u8]) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self.groups.get(group).and_then(|g| g.group_info.clone()))
    }

    fn set_group_info(&mut self, group: &[u8], info: &[u8]) -> Result<(), Infallible> {
        if let Some(g) = self.groups.get_mut(group) {
            g.group_info = Some(info.to_vec());
        }
        Ok(())
    }

    fn membership(&mut self, group: &[u8], device: &DeviceId) -> Result<Option<Membership>, Infallible> {
        Ok(self.groups.get(group).and_then(|g| g.members.get(device).copied()))
    }

    fn was_member(&mut self, group: &[u8], device: &DeviceId) -> Result<bool, Infallible> {
        Ok(self.groups.get(group).is_some_and(|g| g.former.contains(device)))
    }

    fn revoked_members(&mut self, group: &[u8]) -> Result<Vec<DeviceId>, Infallible> {
        let current = self.current_members(group)?;
        Ok(current.into_iter().filter(|d| self.devices.get(d).is_some_and(|r| r.revoked_at.is_some())).collect())
    }

    fn members(&mut self, group: &[u8]) -> Result<Vec<(DeviceId, Membership)>, Infallible> {
        Ok(self.groups.get(group).map(|g| g.members.iter().map(|(d, m)| (*d, *m)).collect()).unwrap_or_default())
    }

    fn add_member(
        &mut self,
        group: &[u8],
        device: &DeviceId,
        account: &AccountId,
        joined_after: u64,
    ) -> Result<(), Infallible> {
        if let Some(g) = self.groups.get_mut(group) {
            g.members
                .insert(*device, Membership { account: *account, joined_after, left_at: None, acked: joined_after });
            g.record.version = g.record.version.wrapping_add(1);
        }
        Ok(())
    }

    fn remove_member(&mut self, group: &[u8], device: &DeviceId, left_at: u64, epoch: u64) -> Result<(), Infallible> {
        if let Some(g) = self.groups.get_mut(group) {
            if let Some(m) = g.members.get_mut(device) {
                m.left_at = Some(left_at);
                g.left_epochs.insert(*device, epoch);
                g.record.version = g.record.version.wrapping_add(1);
            }
        }
        Ok(())
    }

    fn delete_member(&mut self, group: &[u8], device: &DeviceId) -> Result<(), Infallible> {
        if let Some(g) = self.groups.get_mut(group) {
            g.members.remove(device);
            g.left_epochs.remove(device);
            g.former.insert(*device);
        }
        Ok(())
    }

    fn set_acked(&mut self, group: &[u8], device: &DeviceId, seq: u64) -> Result<(), Infallible> {
        if let Some(m) = self.groups.get_mut(group).and_then(|g| g.members.get_mut(device)) {
            m.acked = m.acked.max(seq);
        }
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
    ) -> Result<(u64, Head), Infallible> {
        let Some(g) = self.groups.get_mut(group) else { return Ok((0, Head::genesis(group))) };
        g.record.last_seq += 1;
        let tip = ChainTip::after(g.chain, group, g.record.last_seq, epoch, digest);
        let entry = Entry { data: message.to_vec(), created: now, head: tip.head, epoch, expires, gone: None };
        g.log.insert(g.record.last_seq, entry);
        g.chain = Some(tip);
        Ok((g.record.last_seq, tip.head))
    }

    fn chain_tip(&mut self, group: &[u8]) -> Result<Option<ChainTip>, Infallible> {
        Ok(self.groups.get(group).and_then(|g| g.chain))
    }

    fn fetch(
        &mut self,
        group: &[u8],
        after: u64,
        upto: Option<u64>,
        limit: usize,
        byte_budget: usize,
    ) -> Result<(Messages, bool), Infallible> {
        let Some(g) = self.groups.get(group) else { return Ok((vec![], false)) };
        let mut page = Page::new(limit, byte_budget);
        for (seq, e) in g.log.range(after.saturating_add(1)..) {
            if upto.is_some_and(|u| *seq > u) || !page.fits(e.data.len()) {
                break;
            }
            let gone = e.gone.map(|digest| crate::wire::Gone { epoch: e.epoch, digest });
            let logged = Logged { seq: *seq, head: Some(e.head), data: e.data.clone(), expires: e.expires, gone };
            page.push(logged, e.data.len());
        }
        Ok(page.finish())
    }

    fn delete_messages_upto(&mut self, group: &[u8], upto: u64) -> Result<u64, Infallible> {
        let Some(g) = self.groups.get_mut(group) else { return Ok(0) };
        let keep = g.log.split_off(&upto.saturating_add(1));
        let removed = g.log.len();
        g.log = keep;
        Ok(u64::try_from(removed).unwrap_or(u64::MAX))
    }

    fn add_welcome(&mut self, recipient: &DeviceId, group: &[u8], welcome: &[u8], now: u64) -> Result<u64, Infallible> {
        self.next_welcome += 1;
        self.inbox.insert(self.next_welcome, (*recipient, group.to_vec(), welcome.to_vec(), now));
        Ok(self.next_welcome)
    }

    fn welcomes(
        &mut self,
        recipient: &DeviceId,
        limit: usize,
        byte_budget: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Infallible> {
        let mut page = Page::new(limit, byte_budget);
        for (id, (_, _, w, _)) in self.inbox.iter().filter(|(_, (r, ..))| r == recipient) {
            if !page.fits(w.len()) {
                break;
            }
            page.push((*id, w.clone()), w.len());
        }
        Ok(page.finish().0)
    }

    fn delete_welcome(&mut self, recipient: &DeviceId, id: u64) -> Result<bool, Infallible> {
        if self.inbox.get(&id).is_some_and(|(r, ..)| r == recipient) {
            self.inbox.remove(&id);
            return Ok(true);
        }
        Ok(false)
    }

    fn groups_of(&mut self, device: &DeviceId, limit: usize) -> Result<Vec<GroupListing>, Infallible> {
        Ok(self
            .groups
            .iter()
            .filter_map(|(id, g)| {
                g.members.get(device).map(|m| GroupListing {
                    group: id.clone(),
                    epoch: g.left_epochs.get(device).copied().unwrap_or(g.record.epoch),
                    last_seq: m.left_at.unwrap_or(g.record.last_seq),
                    acked: m.acked,
                    first_seq: g.log.keys().next().copied().unwrap_or(0),
                    current: m.is_current(),
                })
            })
            .take(limit)
            .collect())
    }

    fn groups_count(&mut self, account: &AccountId) -> Result<u64, Infallible> {
        let n = self
            .groups
            .values()
            .filter(|g| g.members.values().any(|m| m.account == *account && m.is_current()))
            .count();
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn log_len(&mut self, group: &[u8]) -> Result<u64, Infallible> {
        Ok(self.groups.get(group).map(|g| u64::try_from(g.log.len()).unwrap_or(u64::MAX)).unwrap_or(0))
    }

    fn stats(&mut self, now: u64) -> Result<Stats, Infallible> {
        let held = || self.groups.values().flat_map(|g| g.log.values());
        Ok(Stats {
            accounts: count(self.accounts.values().filter(|a| a.removed_at.is_none())),
            removed_accounts: count(self.accounts.values().filter(|a| a.removed_at.is_some())),
            devices: count(self.devices.values().filter(|d| d.revoked_at.is_none())),
            groups: count(self.groups.values()),
            messages: count(held()),
            oldest_message: held().map(|e| e.created).min(),
            welcomes: count(self.inbox.values()),
            invites_outstanding: count(
                self.invites.values().filter(|i| i.uses_left > 0 && i.expires_at.is_none_or(|e| e > now)),
            ),
            database_bytes: self.database_bytes()?,
            blobs: count(self.blobs.values()),
            blob_bytes: self.blobs.values().map(|b| b.size).sum(),
        })
    }

    fn database_bytes(&mut self) -> Result<u64, Infallible> {
        let logs: usize = self.groups.values().flat_map(|g| g.log.values()).map(|e| e.data.len() + 64).sum();
        let states: usize =
            self.groups.values().map(|g| g.record.state.len() + g.group_info.as_ref().map_or(0, Vec::len)).sum();
        let inbox: usize = self.inbox.values().map(|(_, _, w, _)| w.len()).sum();
        let packages: usize = self.packages.values().flatten().map(|p| p.data.len()).sum();
        Ok(u64::try_from(logs + states + inbox + packages).unwrap_or(u64::MAX))
    }

    fn expire(&mut self, before: u64) -> Result<u64, Infallible> {
        let mut n = 0u64;
        for g in self.groups.values_mut() {
            // A prefix, as in SQL: up to the first message young enough.
            let old: Vec<u64> = g.log.iter().take_while(|(_, e)| e.created < before).map(|(s, _)| *s).collect();
            for s in old {
                g.log.remove(&s);
                n += 1;
            }
        }
        let before_len = self.inbox.len();
        self.inbox.retain(|_, (_, _, _, t)| *t >= before);
        n += u64::try_from(before_len - self.inbox.len()).unwrap_or(0);
        self.claimed.retain(|_, (_, _, t)| *t >= before);
        Ok(n)
    }

    fn expire_messages(&mut self, now: u64, limit: usize) -> Result<u64, Infallible> {
        let mut n = 0u64;
        for g in self.groups.values_mut() {
            for e in g.log.values_mut() {
                if n >= u64::try_from(limit).unwrap_or(u64::MAX) {
                    return Ok(n);
                }
                if e.gone.is_none() && e.expires.is_some_and(|t| t <= now) {
                    e.gone = Some(MessageDigest::of(&e.data));
                    e.data = Vec::new();
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn insert_blob(&mut self, blob: &BlobRecord) -> Result<(), Infallible> {
        self.blobs.insert(blob.id, blob.clone());
        Ok(())
    }

    fn blob(&mut self, id: &[u8; 16]) -> Result<Option<BlobRecord>, Infallible> {
        Ok(self.blobs.get(id).cloned())
    }

    fn set_blob_received(&mut self, id: &[u8; 16], received: u64) -> Result<(), Infallible> {
        if let Some(b) = self.blobs.get_mut(id).filter(|b| b.hash.is_none()) {
            b.received = received;
        }
        Ok(())
    }

    fn complete_blob(&mut self, id: &[u8; 16], hash: &[u8; 32], now: u64) -> Result<(), Infallible> {
        let groups = &self.groups;
        if let Some(b) = self.blobs.get_mut(id).filter(|b| b.hash.is_none()) {
            b.received = b.size;
            b.hash = Some(*hash);
            b.completed_at = Some(now);
            let timer = groups.get(&b.group).map_or(0, |g| g.record.disappear);
            b.expires_at = (timer > 0).then(|| now.saturating_add(u64::from(timer)));
        }
        Ok(())
    }

    fn delete_blob(&mut self, id: &[u8; 16]) -> Result<bool, Infallible> {
        Ok(self.blobs.remove(id).is_some())
    }

    fn blob_usage(&mut self, account: &AccountId) -> Result<u64, Infallible> {
        Ok(self.blobs.values().filter(|b| b.account == *account).map(|b| b.size).sum())
    }

    fn open_uploads(&mut self, device: &DeviceId) -> Result<u64, Infallible> {
        Ok(count(self.blobs.values().filter(|b| b.device == *device && b.hash.is_none())))
    }

    fn expire_blobs(
        &mut self,
        complete_before: u64,
        open_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<[u8; 16]>, Infallible> {
        let groups = &self.groups;
        let orphaned = |g: &[u8]| groups.get(g).is_none_or(|g| !g.members.values().any(Membership::is_current));
        let gone: Vec<[u8; 16]> = self
            .blobs
            .values()
            .filter(|b| match b.completed_at {
                Some(t) => t < complete_before,
                None => b.created_at < open_before,
            } || b.expires_at.is_some_and(|t| t <= now) || orphaned(&b.group))
            .map(|b| b.id)
            .take(limit)
            .collect();
        for id in &gone {
            self.blobs.remove(id);
        }
        Ok(gone)
    }

    fn expire_timed_blobs(&mut self, now: u64, limit: usize) -> Result<Vec<[u8; 16]>, Infallible> {
        let gone: Vec<[u8; 16]> =
            self.blobs.values().filter(|b| b.expires_at.is_some_and(|t| t <= now)).map(|b| b.id).take(limit).collect();
        for id in &gone {
            self.blobs.remove(id);
        }
        Ok(gone)
    }

    fn timers_in_use(&mut self) -> Result<bool, Infallible> {
        Ok(self.groups.values().any(|g| g.record.disappear > 0))
    }

    fn blobs(&mut self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<BlobRecord>, Infallible> {
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        Ok(self.blobs.range((start, std::ops::Bound::Unbounded)).take(limit).map(|(_, b)| b.clone()).collect())
    }
}

fn count<T>(items: impl Iterator<Item = T>) -> u64 {
    u64::try_from(items.count()).unwrap_or(u64::MAX)
}

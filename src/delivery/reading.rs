//! What a device reads: its groups' logs (and acknowledging them), its
//! Welcomes, the groups it is in, and a group's current GroupInfo (to
//! rejoin).

use std::sync::Arc;

use super::groups::load_public;
use super::{mls, not_member, refuse, Caller, Delivery, Membership, Outcome, Refusal, Storage};
use crate::chain::SignedHead;
use crate::limits::{FETCH_BYTE_BUDGET, MAX_FETCH_ENTRIES, MAX_GROUPS_LISTED};
use crate::wire::{ErrorCode, Gone, GroupSummary, Logged, Response};

impl Delivery {
    /// Messages of `group` after `after` (at most `limit`, 0 for the most
    /// one response carries) that the caller may read: from when it joined
    /// to when it left.
    ///
    /// A device that was never in the group but whose account is (a device
    /// just linked, before its first join) reads what its account's
    /// current devices read, from the earliest of their joins: it walks
    /// the log's commits from the state its first device handed over to
    /// the state it joins ([`crate::client::mls::Descent`]), and without
    /// them it could not join at all once that device was behind. It is
    /// ciphertext it holds no keys for, as the group's GroupInfo and files
    /// are to such a device.
    pub(super) fn fetch<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: Vec<u8>,
        after: u64,
        limit: u16,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let (joined_after, left_at) = match store.membership(&group, &caller.device)? {
            Some(m) => (m.joined_after, m.left_at),
            // A device that left (its row went once it read up to its
            // removal) never reads again this way.
            None if store.was_member(&group, &caller.device)? => return Err(not_member()),
            None => {
                let account = store
                    .members(&group)?
                    .into_iter()
                    .filter(|(_, m)| m.is_current() && m.account == caller.account)
                    .map(|(_, m)| m.joined_after)
                    .min()
                    .ok_or_else(not_member)?;
                (account, None)
            }
        };
        let limit = match usize::from(limit) {
            0 => MAX_FETCH_ENTRIES,
            n => n.min(MAX_FETCH_ENTRIES),
        };
        let (mut messages, more) = store.fetch(&group, after.max(joined_after), left_at, limit, FETCH_BYTE_BUDGET)?;
        for message in &mut messages {
            hide_expired(message, now);
        }
        Ok(Outcome::reply(Response::Messages { group, messages, more }))
    }

    /// The server's signature over `group`'s chain head after `seq`, for a
    /// device that may read that message (or, having read everything, the
    /// last one).
    pub(super) fn signed_head<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: Vec<u8>,
        seq: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let m = store.membership(&group, &caller.device)?.ok_or_else(not_member)?;
        if seq <= m.joined_after || m.left_at.is_some_and(|left| seq > left) {
            return Err(refuse(ErrorCode::NotMember, "that message is not one this device may read"));
        }
        let Some(signer) = &self.head_signer else {
            return Err(refuse(ErrorCode::UnknownRequest, "this server does not sign chain heads"));
        };
        let head = store.head_at(&group, seq)?.ok_or_else(|| {
            refuse(
                ErrorCode::Gone,
                "the server no longer holds that message's head (it was read by every member, or expired)",
            )
        })?;
        let signer = signer.get();
        let signature = signer.sign(&SignedHead::message(&group, seq, &head));
        let signed =
            SignedHead { seq, head, key: signer.public_key(), signature, cert: signer.cert().map(|c| c.to_bytes()) };
        Ok(Outcome::reply(Response::SignedHead { group, signed }))
    }

    /// The caller has read `group` up to `seq`: messages everyone read go,
    /// and a removed device that read up to its removal leaves the group's
    /// list for good.
    pub(super) fn ack<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: &[u8],
        seq: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let device = caller.device;
        let m = store.membership(group, &device)?.ok_or_else(not_member)?;
        let last = store.group(group)?.map(|g| g.last_seq).unwrap_or(0);
        let visible_end = m.left_at.unwrap_or(last).min(last);
        let seq = seq.min(visible_end);
        if m.left_at.is_some_and(|left| seq >= left) {
            // A removed device that has read up to its removal is done
            // with the group: its row goes, and the group with it from its
            // list.
            store.delete_member(group, &device)?;
            self.delete_acknowledged(store, group)?;
        } else if seq > m.acked {
            store.set_acked(group, &device, seq)?;
            self.delete_acknowledged(store, group)?;
        }
        Ok(Outcome::wrote(Response::Done, vec![]))
    }

    /// The Welcomes waiting for the caller.
    pub(super) fn fetch_welcomes<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let welcomes = store.welcomes(&caller.device, MAX_FETCH_ENTRIES, FETCH_BYTE_BUDGET)?;
        Ok(Outcome::reply(Response::Welcomes { welcomes }))
    }

    /// The caller processed Welcome `id`: it goes.
    pub(super) fn ack_welcome<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        store.delete_welcome(&caller.device, id)?;
        Ok(Outcome::wrote(Response::Done, vec![]))
    }

    /// The groups the caller is (or was, until it read up to its removal)
    /// in.
    pub(super) fn list_groups<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let groups = store
            .groups_of(&caller.device, MAX_GROUPS_LISTED)?
            .into_iter()
            .map(|g| GroupSummary {
                group: g.group,
                epoch: g.epoch,
                last_seq: g.last_seq,
                acked_seq: g.acked,
                first_seq: g.first_seq,
                member: g.current,
            })
            .collect();
        Ok(Outcome::reply(Response::Groups { groups }))
    }

    /// `group`'s current GroupInfo (and its tree when the GroupInfo does
    /// not carry it), for current member devices and a new device of an
    /// account that has one (it joins by an external commit).
    pub(super) fn fetch_group_info<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: Vec<u8>,
    ) -> Result<Outcome, Refusal<S::Error>> {
        if store.membership(&group, &caller.device)?.filter(Membership::is_current).is_none()
            && !store.members(&group)?.iter().any(|(_, m)| m.is_current() && m.account == caller.account)
        {
            return Err(not_member());
        }
        let group_info = store.group_info(&group)?.ok_or_else(|| {
            refuse(
                ErrorCode::NoGroupInfo,
                "the group has no GroupInfo yet (created by an older server); any member's next commit stores one",
            )
        })?;
        let parsed =
            mls::parse_group_info(&group_info).map_err(|e| Refusal::Internal(format!("stored GroupInfo: {e}")))?;
        let ratchet_tree = if parsed.extensions().ratchet_tree().is_some() {
            None
        } else {
            // The group's epoch and state version without its state (a
            // large group's is most of a megabyte): a cached tree needs
            // none of it.
            let context = store.send_context(&group, &caller.device)?.ok_or_else(not_member)?;
            // The two are written together; a pair that disagrees would
            // only make the member's rejoin fail.
            if parsed.epoch().as_u64() != context.epoch {
                return Err(Refusal::Internal("the stored GroupInfo is not of the group's epoch".into()));
            }
            let at = (context.epoch, context.version);
            let tree = match self.trees.get(&group, at) {
                Some(tree) => tree,
                None => {
                    let record = store.group(&group)?.ok_or_else(not_member)?;
                    if (record.epoch, record.version) != at {
                        return Err(Refusal::Internal("the group changed within one read".into()));
                    }
                    let (_, public) = load_public(&record.state, &group)?;
                    let tree: Arc<[u8]> =
                        openmls::prelude::tls_codec::Serialize::tls_serialize_detached(&public.export_ratchet_tree())
                            .map_err(|e| Refusal::Internal(format!("encoding the tree: {e}")))?
                            .into();
                    self.trees.put(&group, at, tree.clone());
                    tree
                }
            };
            Some(tree.to_vec())
        };
        Ok(Outcome::reply(Response::GroupInfo { group, group_info, ratchet_tree }))
    }
}

/// A message whose timer ran out before a sweep reached it is served as
/// the sweep will leave it: gone, only its epoch and digest (its place in
/// the chain) said.
fn hide_expired(message: &mut Logged, now: u64) {
    if message.gone.is_some() || message.expires.is_none_or(|t| t > now) {
        return;
    }
    // Stored messages were framed when accepted; an unreadable one keeps
    // epoch 0, which breaks the reader's chain loudly rather than quietly.
    let epoch = mls::frame(&message.data).map(|f| f.epoch).unwrap_or(0);
    let digest = crate::chain::MessageDigest::of(&message.data);
    message.gone = Some(Gone { epoch, digest });
    message.data = Vec::new();
}

//! Groups: creation, and every message sent to one (application messages
//! here, handshakes in [`super::handshake`]), with the certified-credential
//! rules of the module docs.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{GroupId, MlsMessageBodyIn, MlsMessageIn, ProposalStore, RatchetTreeIn};
use openmls_memory_storage::MemoryStorage;

use super::handshake::Handshake;
use super::{mls, not_member, refuse, Caller, Delivery, Notification, Outcome, Refusal, Storage};
use crate::limits::MAX_GROUP_STATE;
use crate::wire::{ErrorCode, Response};

impl Delivery {
    pub(super) fn create_group<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group_info: &[u8],
        ratchet_tree: &[u8],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let invalid = |m: String| refuse(ErrorCode::InvalidMessage, m);
        let msg = MlsMessageIn::tls_deserialize_exact(group_info).map_err(|e| invalid(format!("GroupInfo: {e}")))?;
        let MlsMessageBodyIn::GroupInfo(info) = msg.extract() else {
            return Err(invalid("expected an MLS GroupInfo".into()));
        };
        let tree =
            RatchetTreeIn::tls_deserialize_exact(ratchet_tree).map_err(|e| invalid(format!("ratchet tree: {e}")))?;
        // Before any signature is checked, on the writer: a tree of many
        // valid leaves cost it the whole verification before this refusal
        // (red team, issue 37: ~200 ms per request for 1400 leaves, to be
        // sent again and again).
        if tree.nodes().count() != 1 {
            return Err(one_member_only());
        }
        let group = info.group_id().as_slice().to_vec();
        if group.is_empty() || group.len() > crate::limits::MAX_GROUP_ID {
            return Err(invalid("group ids must be 1 to 255 bytes".into()));
        }
        // Before anything about the id's existence is looked at: ids are
        // bound to their creator, so nobody probes or squats another's.
        if !mls::group_id_bound_to(&group, &caller.account) {
            return Err(invalid(
                "a group's id must be bound to its creator's account (nonce, then the tag hush derives)".into(),
            ));
        }
        if store.group(&group)?.is_some() {
            return Err(refuse(ErrorCode::GroupExists, "you already created a group with this id"));
        }
        self.check_space(store)?;
        let groups = store.groups_count(&caller.account)?;
        if groups >= self.quotas.max_groups_per_account {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("you are in {groups} groups, the most this server allows"),
            ));
        }
        let storage = MemoryStorage::default();
        let (public, _) = mls::PublicGroup::from_external(&self.crypto, &storage, tree, info, ProposalStore::new())
            .map_err(|e| refuse(ErrorCode::InvalidCommit, format!("the group does not verify: {e}")))?;
        mls::Suite::of(public.ciphersuite()).map_err(|e| refuse(ErrorCode::InvalidCommit, e.to_string()))?;
        let members: Vec<_> = public.members().collect();
        let [only] = members.as_slice() else {
            return Err(one_member_only());
        };
        let cert =
            mls::leaf_certificate(&only.credential, &only.signature_key).map_err(|e| bad_leaf(only.index.u32(), e))?;
        let leaf = public.leaf(only.index).ok_or_else(|| Refusal::Internal("the only leaf is missing".into()))?;
        mls::check_leaf_shape(leaf, public.ciphersuite()).map_err(|m| bad_shape(only.index.u32(), m))?;
        if Caller::of(&cert) != *caller {
            return Err(bad_leaf(only.index.u32(), "a new group's only leaf must be your own device's"));
        }
        if !mls::lists_server(public.group_context(), &self.removal_key) {
            return Err(refuse(
                ErrorCode::InvalidCommit,
                "a new group must list this server's removal key as its one external sender (see the Status response)",
            ));
        }
        let settings = mls::check_context_extensions(public.group_context().extensions(), &self.removal_key)
            .map_err(|m| refuse(ErrorCode::InvalidCommit, m))?;
        // The GroupInfo is kept: a member that cannot process the first
        // commit rejoins from it.
        mls::check_group_info(&self.crypto, group_info, &public, only.index)
            .map_err(|m| refuse(ErrorCode::InvalidCommit, m))?;
        let epoch = public.group_context().epoch().as_u64();
        check_state_size(&storage)?;
        let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
        store.insert_group(&group, epoch, &state, now)?;
        if settings.disappear_secs > 0 {
            store.set_disappear(&group, settings.disappear_secs)?;
        }
        store.set_group_info(&group, group_info)?;
        store.add_member(&group, &caller.device, &caller.account, 0)?;
        let head = crate::chain::Head::genesis(&group);
        Ok(Outcome::wrote(Response::Accepted { group, seq: 0, epoch, head }, vec![]))
    }

    pub(super) fn send<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        bytes: Vec<u8>,
        welcome: Option<Vec<u8>>,
        group_info: Option<Vec<u8>>,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let framed = mls::frame(&bytes).map_err(|m| refuse(ErrorCode::InvalidMessage, m))?;
        if group_info.is_some() && framed.kind != mls::Kind::Commit {
            return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a GroupInfo"));
        }
        let group = framed.group.clone();
        let context = store.send_context(&group, &caller.device)?.ok_or_else(not_member)?;
        let epoch = context.epoch;
        let joining = !context.membership.is_some_and(|m| m.is_current());
        if joining {
            // A new device of a member's account may send one thing: the
            // external commit that joins it (checked in the handshake).
            let may = framed.kind == mls::Kind::Commit
                && store.members(&group)?.iter().any(|(_, m)| m.is_current() && m.account == caller.account);
            if !may {
                return Err(not_member());
            }
        }
        if framed.epoch != epoch {
            return Err(Refusal::Client {
                code: ErrorCode::StaleEpoch,
                detail: epoch,
                message: format!("the group is at epoch {epoch}, the message is for epoch {}", framed.epoch),
            });
        }
        self.check_space(store)?;
        if framed.kind != mls::Kind::Commit {
            let backlog = context.log_len;
            if backlog >= self.quotas.max_log_per_group {
                return Err(refuse(
                    ErrorCode::QuotaExceeded,
                    format!("the group holds {backlog} unread messages, the most this server keeps; members must catch up (commits are still accepted)"),
                ));
            }
        }
        match framed.kind {
            mls::Kind::Application => {
                if welcome.is_some() {
                    return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a Welcome"));
                }
                let digest = self.digest_of(&bytes);
                // Deleted when the group's timer (as of now: a message
                // keeps the timer it was sent under) or the server's
                // retention runs out, whichever is shorter; members delete
                // their copies then too.
                let expires = (context.disappear > 0)
                    .then(|| now.saturating_add(u64::from(context.disappear).min(self.retention_secs)));
                let (seq, head) = store.append(&group, epoch, &bytes, &digest, now, expires)?;
                let recipients = self.roster(store, &group, (epoch, context.version))?;
                Ok(Outcome::wrote(
                    Response::Accepted { group: group.clone(), seq, epoch, head },
                    vec![Notification::Message { group, seq, head: Some(head), message: bytes, recipients }],
                ))
            }
            mls::Kind::Commit | mls::Kind::Proposal => {
                let version = context.version;
                let h = Handshake { caller, group: &group, epoch, version, bytes, welcome, group_info, now, joining };
                self.handshake(store, h, framed.message)
            }
        }
    }
}

/// A leaf whose credential is not acceptable; `detail` is its index.
pub(super) fn bad_leaf<E>(index: u32, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCredential,
        detail: u64::from(index),
        message: format!("leaf {index}: {why}"),
    }
}

/// A leaf hush never makes (extensions, oversized); `detail` is its index.
pub(super) fn bad_shape<E>(index: u32, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCommit,
        detail: u64::from(index),
        message: format!("leaf {index}: {why}"),
    }
}

/// Refuses a group state above [`MAX_GROUP_STATE`] (its size as openmls
/// holds it, [`mls::state_size`]; it is stored compacted).
pub(super) fn check_state_size<E>(storage: &MemoryStorage) -> Result<(), Refusal<E>> {
    let size = mls::state_size(storage).map_err(|e| Refusal::Internal(e.to_string()))?;
    if size > MAX_GROUP_STATE {
        return Err(refuse(
            ErrorCode::QuotaExceeded,
            format!("the group's state would be {size} bytes; this server keeps at most {MAX_GROUP_STATE}"),
        ));
    }
    Ok(())
}

/// A group's public state from its stored blob.
pub(super) fn load_public<E>(state: &[u8], group: &[u8]) -> Result<(MemoryStorage, mls::PublicGroup), Refusal<E>> {
    let storage = mls::decode_state(state).map_err(|e| Refusal::Internal(format!("group state: {e}")))?;
    let public = mls::PublicGroup::load(&storage, &GroupId::from_slice(group))
        .map_err(|e| Refusal::Internal(format!("group state: {e:?}")))?
        .ok_or_else(|| Refusal::Internal("group state missing".into()))?;
    Ok((storage, public))
}

fn one_member_only<E>() -> Refusal<E> {
    refuse(ErrorCode::InvalidCommit, "a new group must contain exactly one member: you (add others with a commit)")
}

//! Groups: creation, and every handshake (commits, proposals, resyncs)
//! and application message sent to one, with the certified-credential and
//! group-repair rules of the module docs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    GroupId, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal, ProposalStore, RatchetTreeIn, Sender,
};
use openmls_memory_storage::MemoryStorage;

use super::{mls, not_member, refuse, Caller, Delivery, GroupRecord, Notification, Outcome, Refusal, Storage};
use crate::auth::{AccountId, DeviceId};
use crate::limits::{MAX_GROUP_STATE, MAX_PENDING_PROPOSALS};
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
        let members: Vec<_> = public.members().collect();
        let [only] = members.as_slice() else {
            return Err(refuse(
                ErrorCode::InvalidCommit,
                "a new group must contain exactly one member: you (add others with a commit)",
            ));
        };
        let cert =
            mls::leaf_certificate(&only.credential, &only.signature_key).map_err(|e| bad_leaf(only.index.u32(), e))?;
        let leaf = public.leaf(only.index).ok_or_else(|| Refusal::Internal("the only leaf is missing".into()))?;
        mls::check_leaf_shape(leaf).map_err(|m| bad_shape(only.index.u32(), m))?;
        if Caller::of(&cert) != *caller {
            return Err(bad_leaf(only.index.u32(), "a new group's only leaf must be your own device's"));
        }
        if !mls::lists_server(public.group_context(), &self.removal_key) {
            return Err(refuse(
                ErrorCode::InvalidCommit,
                "a new group must list this server's removal key as an external sender (see the Status response)",
            ));
        }
        // The GroupInfo is kept: a member that cannot process the first
        // commit rejoins from it.
        mls::check_group_info(&self.crypto, group_info, &public, only.index)
            .map_err(|m| refuse(ErrorCode::InvalidCommit, m))?;
        let epoch = public.group_context().epoch().as_u64();
        let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
        check_state_size(&state)?;
        store.insert_group(&group, epoch, &state, now)?;
        store.set_group_info(&group, group_info)?;
        store.add_member(&group, &caller.device, &caller.account, 0)?;
        Ok(Outcome::wrote(Response::Accepted { group, seq: 0, epoch }, vec![]))
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
        if !context.membership.is_some_and(|m| m.is_current()) {
            return Err(not_member());
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
                let seq = store.append(&group, epoch, &bytes, now)?;
                let recipients = self.roster(store, &group, epoch)?;
                Ok(Outcome::wrote(
                    Response::Accepted { group: group.clone(), seq, epoch },
                    vec![Notification::Message { group, seq, message: bytes, recipients }],
                ))
            }
            mls::Kind::Commit | mls::Kind::Proposal => {
                // Only handshakes need the public state.
                let record = store.group(&group)?.ok_or_else(not_member)?;
                self.handshake(store, caller, &group, record, framed, bytes, welcome, group_info, now)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handshake<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        group: &[u8],
        record: GroupRecord,
        framed: mls::Framed,
        bytes: Vec<u8>,
        welcome: Option<Vec<u8>>,
        group_info: Option<Vec<u8>>,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let invalid_commit = |m: String| refuse(ErrorCode::InvalidCommit, m);
        let (storage, mut public) = load_public(&record.state, group)?;
        // Who holds each leaf before this message (every leaf was checked
        // when it entered the tree).
        let mut holders: HashMap<u32, Caller> = HashMap::new();
        for m in public.members() {
            let (account, device) = mls::holder_of(&m.credential)
                .ok_or_else(|| Refusal::Internal(format!("stored leaf {} holds no certificate", m.index.u32())))?;
            holders.insert(m.index.u32(), Caller { account, device });
        }
        let processed = public
            .process_message(&self.crypto, framed.message)
            .map_err(|e| invalid_commit(format!("the message does not verify: {e}")))?;
        // A member's own commit or proposal, or a member device's resync
        // (an external commit that replaces its own leaf).
        let sender = match processed.sender() {
            Sender::Member(index) => Some(index.u32()),
            Sender::NewMemberCommit => None,
            _ => {
                return Err(invalid_commit(
                    "only members' own commits and proposals, and a member's resync of its own leaf, are accepted"
                        .into(),
                ))
            }
        };
        if let Some(sender) = sender {
            if holders.get(&sender) != Some(caller) {
                return Err(invalid_commit("the message is signed by another device's leaf".into()));
            }
        }
        // A leaf may change its keys, never whose it is.
        let same_holder = |index: u32, leaf: &openmls::prelude::LeafNode| -> Result<(), Refusal<S::Error>> {
            mls::check_leaf_shape(leaf).map_err(|m| bad_shape(index, m))?;
            let cert = mls::node_certificate(leaf).map_err(|e| bad_leaf(index, e))?;
            if holders.get(&index) != Some(&Caller::of(&cert)) {
                return Err(bad_leaf(index, "an update may not change the leaf's account or device"));
            }
            Ok(())
        };
        let before = store.current_members(group)?;
        match processed.into_content() {
            ProcessedMessageContent::ProposalMessage(queued) => {
                let Some(sender) = sender else {
                    return Err(invalid_commit("a proposal from outside the group".into()));
                };
                if welcome.is_some() {
                    return Err(refuse(ErrorCode::InvalidMessage, "only commits carry a Welcome"));
                }
                match queued.proposal() {
                    Proposal::Update(update) => same_holder(sender, update.leaf_node())?,
                    Proposal::Add(add) => {
                        let kp = add.key_package();
                        mls::check_key_package_shape(kp).map_err(|m| bad_add_shape(0, m))?;
                        mls::node_certificate(kp.leaf_node()).map_err(|e| bad_add(0, e))?;
                    }
                    _ => {}
                }
                let pending = public
                    .queued_proposals(&storage)
                    .map_err(|e| Refusal::Internal(format!("reading the proposals: {e:?}")))?
                    .len();
                if pending >= MAX_PENDING_PROPOSALS {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!("the group has {pending} proposals waiting, the most it may; commit them first"),
                    ));
                }
                public
                    .add_proposal(&storage, *queued)
                    .map_err(|e| Refusal::Internal(format!("storing the proposal: {e:?}")))?;
                let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
                check_state_size(&state)?;
                let seq = store.append(group, record.epoch, &bytes, now)?;
                store.update_group(group, record.epoch, &state)?;
                Ok(Outcome::wrote(
                    Response::Accepted { group: group.to_vec(), seq, epoch: record.epoch },
                    vec![Notification::Message {
                        group: group.to_vec(),
                        seq,
                        message: bytes,
                        recipients: before.into(),
                    }],
                ))
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                match sender {
                    Some(sender) => {
                        if let Some(leaf) = staged.update_path_leaf_node() {
                            same_holder(sender, leaf)?;
                        }
                    }
                    None => check_resync(&staged, caller, &holders)?,
                }
                for update in staged.update_proposals() {
                    let Sender::Member(index) = update.sender() else {
                        return Err(invalid_commit("an update proposal from outside the group".into()));
                    };
                    same_holder(index.u32(), update.update_proposal().leaf_node())?;
                }
                // Whom does the commit add? Only devices whose KeyPackage
                // this server handed out, certified for exactly that device.
                let mut added = Vec::new();
                for (position, add) in staged.add_proposals().enumerate() {
                    let kp = add.add_proposal().key_package();
                    mls::check_key_package_shape(kp).map_err(|m| bad_add_shape(position, m))?;
                    let cert = mls::node_certificate(kp.leaf_node()).map_err(|e| bad_add(position, e))?;
                    let hash_ref = kp
                        .hash_ref(&self.crypto)
                        .map_err(|e| Refusal::Internal(format!("hashing a KeyPackage: {e}")))?;
                    match store.claimed_owner(hash_ref.as_slice())? {
                        Some((account, device)) if account == cert.account && device == cert.device => {
                            added.push((hash_ref.as_slice().to_vec(), Caller::of(&cert)));
                        }
                        _ => {
                            return Err(invalid_commit(
                                "the commit adds a KeyPackage this server did not hand out for that device".into(),
                            ))
                        }
                    }
                }
                // Groups an account is in count against its quota, however it
                // got there: the adder learns whom the group would take over.
                let accounts: BTreeSet<AccountId> = added.iter().map(|(_, c)| c.account).collect();
                for account in accounts {
                    let groups = store.groups_count(&account)?;
                    if groups >= self.quotas.max_groups_per_account {
                        return Err(refuse(
                            ErrorCode::QuotaExceeded,
                            format!(
                                "account {} is in {groups} groups, the most this server allows; it cannot be added",
                                account.short()
                            ),
                        ));
                    }
                }
                let welcome = match (added.is_empty(), welcome) {
                    (true, None) => None,
                    (true, Some(_)) => {
                        return Err(refuse(ErrorCode::InvalidMessage, "a Welcome needs a commit that adds members"))
                    }
                    (false, None) => {
                        return Err(refuse(ErrorCode::InvalidMessage, "a commit that adds members needs their Welcome"))
                    }
                    (false, Some(w)) => {
                        check_welcome(&w, &added).map_err(|m| refuse(ErrorCode::InvalidMessage, m))?;
                        Some(w)
                    }
                };
                public
                    .merge_commit(&storage, *staged)
                    .map_err(|e| Refusal::Internal(format!("merging the commit: {e:?}")))?;
                let epoch = public.group_context().epoch().as_u64();
                // The tree after the commit: each device once, the server
                // still an external sender. (Every leaf that entered or
                // changed with this commit was verified above: adds,
                // updates, the committer's path leaf.)
                let mut roster: BTreeMap<DeviceId, AccountId> = BTreeMap::new();
                for m in public.members() {
                    let (account, device) = mls::holder_of(&m.credential)
                        .ok_or_else(|| bad_leaf(m.index.u32(), "the leaf holds no device certificate"))?;
                    if roster.insert(device, account).is_some() {
                        return Err(bad_leaf(m.index.u32(), "this device already has a leaf in the group"));
                    }
                }
                if !mls::lists_server(public.group_context(), &self.removal_key) {
                    return Err(invalid_commit(
                        "the commit would take this server's removal key out of the group's external senders".into(),
                    ));
                }
                // The GroupInfo of the new epoch, signed by the committer's
                // leaf: what a member that cannot process this commit rejoins
                // from.
                let Some(group_info) = group_info else {
                    return Err(refuse(
                        ErrorCode::InvalidMessage,
                        "a commit must carry the GroupInfo of the epoch it creates",
                    ));
                };
                let committer = leaf_of(&public, caller)
                    .ok_or_else(|| Refusal::Internal("the committer has no leaf after its commit".into()))?;
                mls::check_group_info(&self.crypto, &group_info, &public, committer)
                    .map_err(|e| refuse(ErrorCode::InvalidCommit, e))?;
                let size = u64::try_from(roster.len()).unwrap_or(u64::MAX);
                if size > self.quotas.max_members_per_group {
                    return Err(refuse(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "the group would have {size} members; this server allows {}",
                            self.quotas.max_members_per_group
                        ),
                    ));
                }
                let state = mls::encode_state(&storage).map_err(|e| Refusal::Internal(e.to_string()))?;
                check_state_size(&state)?;
                let seq = store.append(group, record.epoch, &bytes, now)?;
                store.update_group(group, epoch, &state)?;
                store.set_group_info(group, &group_info)?;
                let before_set: BTreeSet<DeviceId> = before.iter().copied().collect();
                for (device, account) in &roster {
                    if !before_set.contains(device) {
                        store.add_member(group, device, account, seq)?;
                    }
                }
                for device in before_set.iter().filter(|d| !roster.contains_key(d)) {
                    store.remove_member(group, device, seq, record.epoch)?;
                }
                let mut notifications = Vec::new();
                if let Some(w) = &welcome {
                    let recipients: BTreeSet<DeviceId> = added.iter().map(|(_, c)| c.device).collect();
                    for r in recipients {
                        store.add_welcome(&r, group, w, now)?;
                        notifications.push(Notification::Welcome { recipient: r });
                    }
                }
                // Everyone who was a member sees the commit, removed members
                // included (it tells them they were removed).
                notifications.insert(
                    0,
                    Notification::Message { group: group.to_vec(), seq, message: bytes, recipients: before.into() },
                );
                Ok(Outcome::wrote(Response::Accepted { group: group.to_vec(), seq, epoch }, notifications))
            }
            _ => Err(refuse(ErrorCode::InvalidMessage, "expected a commit or a proposal")),
        }
    }
}

/// A leaf whose credential is not acceptable; `detail` is its index.
fn bad_leaf<E>(index: u32, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCredential,
        detail: u64::from(index),
        message: format!("leaf {index}: {why}"),
    }
}

/// A leaf hush never makes (extensions, oversized); `detail` is its index.
fn bad_shape<E>(index: u32, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCommit,
        detail: u64::from(index),
        message: format!("leaf {index}: {why}"),
    }
}

/// An added KeyPackage hush never makes; `detail` is its position.
fn bad_add_shape<E>(position: usize, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCommit,
        detail: u64::try_from(position).unwrap_or(u64::MAX),
        message: format!("added member {position}: {why}"),
    }
}

/// Refuses a group state above [`MAX_GROUP_STATE`].
fn check_state_size<E>(state: &[u8]) -> Result<(), Refusal<E>> {
    if state.len() > MAX_GROUP_STATE {
        return Err(refuse(
            ErrorCode::QuotaExceeded,
            format!("the group's state would be {} bytes; this server keeps at most {MAX_GROUP_STATE}", state.len()),
        ));
    }
    Ok(())
}

/// An added KeyPackage whose credential is not acceptable (it has no leaf
/// index yet); `detail` is its position among the commit's Adds.
fn bad_add<E>(position: usize, why: impl std::fmt::Display) -> Refusal<E> {
    Refusal::Client {
        code: ErrorCode::InvalidCredential,
        detail: u64::try_from(position).unwrap_or(u64::MAX),
        message: format!("added member {position}: {why}"),
    }
}

/// A group's public state from its stored blob.
pub(super) fn load_public<E>(state: &[u8], group: &[u8]) -> Result<(MemoryStorage, mls::PublicGroup), Refusal<E>> {
    let storage = mls::decode_state(state).map_err(|e| Refusal::Internal(format!("group state: {e}")))?;
    let public = mls::PublicGroup::load(&storage, &GroupId::from_slice(group))
        .map_err(|e| Refusal::Internal(format!("group state: {e:?}")))?
        .ok_or_else(|| Refusal::Internal("group state missing".into()))?;
    Ok((storage, public))
}

/// The leaf `caller`'s device holds in `public` (each device holds at most
/// one, checked after every commit).
fn leaf_of(public: &mls::PublicGroup, caller: &Caller) -> Option<openmls::prelude::LeafNodeIndex> {
    public.members().find(|m| mls::holder_of(&m.credential) == Some((caller.account, caller.device))).map(|m| m.index)
}

/// Accepts an external commit only as a resync: from a device that holds
/// a leaf in the group (`holders`, before the commit), carrying nothing but
/// the ExternalInit and the Remove of exactly that leaf, with a new leaf
/// certified for the same account and device.
fn check_resync<E>(
    staged: &openmls::prelude::StagedCommit,
    caller: &Caller,
    holders: &HashMap<u32, Caller>,
) -> Result<(), Refusal<E>> {
    let invalid = |m: &str| refuse(ErrorCode::InvalidCommit, m);
    let own = holders.iter().find(|(_, h)| *h == caller).map(|(i, _)| *i);
    let Some(own) = own else {
        return Err(invalid("a resync must come from a device that has a leaf in the group"));
    };
    let mut removed = Vec::new();
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::ExternalInit(_) => {}
            Proposal::Remove(r) => removed.push(r.removed().u32()),
            _ => return Err(invalid("a resync may carry only its ExternalInit and the Remove of its own leaf")),
        }
    }
    if removed != [own] {
        return Err(invalid("a resync must remove exactly the rejoining device's own leaf, and no other"));
    }
    let leaf = staged.update_path_leaf_node().ok_or_else(|| invalid("a resync must carry a new leaf"))?;
    mls::check_leaf_shape(leaf).map_err(|m| bad_shape(own, m))?;
    let cert = mls::node_certificate(leaf).map_err(|e| bad_leaf(own, e))?;
    if Caller::of(&cert) != *caller {
        return Err(bad_leaf(own, "a resync's new leaf must be certified for the same device"));
    }
    Ok(())
}

/// Checks that a Welcome addresses exactly the added KeyPackages.
fn check_welcome(bytes: &[u8], added: &[(Vec<u8>, Caller)]) -> Result<(), String> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| format!("Welcome: {e}"))?;
    let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
        return Err("expected an MLS Welcome".into());
    };
    let addressed: BTreeSet<Vec<u8>> = welcome.secrets().iter().map(|s| s.new_member().as_slice().to_vec()).collect();
    let expected: BTreeSet<Vec<u8>> = added.iter().map(|(r, _)| r.clone()).collect();
    if addressed != expected {
        return Err("the Welcome does not address exactly the members the commit adds".into());
    }
    Ok(())
}

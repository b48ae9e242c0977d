//! Syncing: Welcomes, every group's new messages through
//! [`crate::client::log::GroupLog`], and group repair (rejoining a group
//! this device can no longer follow).

use super::*;

/// Builds an external commit from (group, GroupInfo, ratchet tree).
/// Builds an external commit from (group, GroupInfo, ratchet tree), checked
/// against a descent when there is one.
pub(super) type ExternalBuilder<'a> =
    &'a mut dyn FnMut(&mut Member<Provider>, &[u8], &[u8], Option<&[u8]>, Option<&Descent>) -> Result<Commit, MlsError>;

/// What came of an external commit into a group.
pub(super) enum External {
    Done {
        seq: u64,
        epoch: u64,
        /// The group's chain head after the commit, and the commit.
        head: crate::chain::Head,
        commit: Vec<u8>,
    },
    /// The server says this device (or its account) is not in the group.
    NotMember,
    /// The group or the server would not have it; why.
    Refused(String),
}
use crate::chain::Position;
use crate::client::local::Invitation;
use crate::client::local::MAX_NAME;
use crate::client::log::{GroupLog, Read};
use crate::client::mls::{Descent, RemovedBy};

impl App {
    /// Joins pending Welcomes, fetches every group, tops up KeyPackages.
    /// Returns the new history entries, in order.
    ///
    /// A group that could not be synced does not stop the others: its
    /// failure is recorded in it and listed by [`App::sync_failures`].
    pub async fn sync(&mut self, conn: &Connection) -> Result<Vec<Entry>, AppError> {
        self.sync_failures.clear();
        let mut new = Vec::new();
        // History handed over with the link that could not be fetched
        // then (the connection failed): tried again on a connection of its
        // own (a transfer may reconnect).
        if self.history_pending()? {
            match self.connect().await {
                Ok(mut own) => {
                    // Bounded: a server that stalls the transfer does not
                    // hold the sync up (the next one tries again).
                    let budget = super::history::HISTORY_FETCH_BUDGET;
                    match tokio::time::timeout(budget, self.take_history(&mut own, &mut super::files::Quiet)).await {
                        Ok(Ok(taken)) => new.extend(taken.map(|t| t.entries).unwrap_or_default()),
                        Ok(Err(e)) => tracing::warn!("the history handed over is not in yet: {e}"),
                        Err(_) => tracing::warn!("the history handed over is not in yet: its fetch took too long"),
                    }
                    own.close().await;
                }
                Err(e) => tracing::warn!("the history handed over is not in yet: {e}"),
            }
        }
        let welcomes = conn.fetch_welcomes().await?;
        // The server lists a group as soon as the commit that added us is
        // stored, before we read its Welcome.
        let mut announced = if welcomes.is_empty() { Vec::new() } else { conn.groups().await? };
        for (id, welcome) in welcomes {
            // From someone who is not a contact: it waits for the user
            // (`hush invitations`), so strangers cannot pull this account
            // into groups. (The server counts the membership until the user
            // declines.)
            if let Some(invitation) = self.held_invitation(&welcome)? {
                let unit = self.local.unit()?;
                self.local.put_invitation(&invitation, &welcome)?;
                let who = self.display(&invitation.inviter);
                let body = format!(
                    "{who} (not a contact) invited you to a group of {} device(s); it waits: `hush invitations accept {}` to join, `decline` to leave it",
                    invitation.members,
                    text::encode(&invitation.group)
                );
                new.push(Entry {
                    group_id: vec![],
                    group: "invitation".into(),
                    seq: 0,
                    sender: who,
                    sender_account: Some(invitation.inviter),
                    kind: EntryKind::Event,
                    body,
                    time: now_unix(),
                    expires: None,
                    imported: false,
                });
                unit.commit()?;
                conn.ack_welcome(id).await?;
                continue;
            }
            let unit = self.local.unit()?;
            match self.member.join(&welcome) {
                Ok(gid) => {
                    // Where our history starts; never past the log's end.
                    let cursor =
                        announced.iter().find(|g| g.group == gid).map(|g| g.acked_seq.min(g.last_seq)).unwrap_or(0);
                    self.local.put_group(&gid, None, cursor, now_unix())?;
                    let joined = match self.member.suite_of(&gid) {
                        Some(Ok(suite)) => format!("you joined (a {suite} group)"),
                        _ => "you joined".to_string(),
                    };
                    new.push(self.record(&gid, cursor, None, EntryKind::Event, &joined)?);
                }
                Err(e) => {
                    // Shown to the user (there is no group to file it under).
                    tracing::warn!("could not join from a Welcome: {e}");
                    new.push(Entry {
                        group_id: vec![],
                        group: "invitation".into(),
                        seq: 0,
                        sender: String::new(),
                        sender_account: None,
                        kind: EntryKind::Event,
                        body: format!("did not join a group: {e}"),
                        time: now_unix(),
                        expires: None,
                        imported: false,
                    });
                }
            }
            unit.commit()?;
            conn.ack_welcome(id).await?;
        }
        announced = conn.groups().await?;
        // A group the server lists us in that this home does not know (its
        // state was lost, e.g. restored from an older backup): rejoin it.
        let mut known: Vec<Vec<u8>> = self.groups()?.into_iter().map(|g| g.id).collect();
        known.extend(self.local.invitations()?.into_iter().map(|i| i.group));
        for s in announced.iter().filter(|s| s.member && !known.contains(&s.group)) {
            self.local.put_group(&s.group, None, s.last_seq, now_unix())?;
        }
        self.know_removal_key(conn).await?;
        for g in self.groups()? {
            if !g.active {
                continue;
            }
            let summary = announced.iter().find(|s| s.group == g.id);
            // One group's failure (a commit nobody can build, a server that
            // misbehaves in it, a repair refused) never stops the others:
            // it is recorded in that group and the sync goes on. Only a
            // lost connection or a local storage error stops it.
            if let Err(e) = self.sync_one(conn, &g, summary, &mut new).await {
                if e.stops_sync() {
                    return Err(e);
                }
                tracing::warn!("could not sync a group: {e}");
                let at = self.local.cursor(&g.id)?;
                let line = format!("this group could not be synced: {e}");
                new.push(self.record(&g.id, at, None, EntryKind::Event, &line)?);
                self.sync_failures.push((g.name.clone(), e.to_string()));
            }
        }
        self.top_up_key_packages(conn).await?;
        // Names may have arrived after the entries that mention the group.
        for e in &mut new {
            e.group = self.group_name(&e.group_id);
        }
        Ok(new)
    }

    /// The invitation a Welcome is, if it should wait for the user: its
    /// sender is neither a contact nor this account. A Welcome that cannot
    /// be read is not held (joining it fails and says why).
    fn held_invitation(&mut self, welcome: &[u8]) -> Result<Option<Invitation>, AppError> {
        // Reading a Welcome consumes its KeyPackage: look, then roll back.
        let unit = self.local.unit()?;
        let peek = self.member.peek_welcome(welcome);
        drop(unit);
        let Ok((group, inviter, members)) = peek else { return Ok(None) };
        if inviter == self.account() || self.local.name_of(&inviter)?.is_some() {
            return Ok(None);
        }
        Ok(Some(Invitation { group, inviter, members, at: now_unix() }))
    }

    /// The invitations waiting for this user.
    pub fn invitations(&self) -> Result<Vec<Invitation>, AppError> {
        Ok(self.local.invitations()?)
    }

    /// The waiting invitation to `group` (its id as `hush invitations`
    /// shows it).
    fn invitation(&self, group: &str) -> Result<(Invitation, Vec<u8>), AppError> {
        let found = self.local.invitations()?.into_iter().find(|i| text::encode(&i.group) == group.trim());
        let invitation = found.ok_or_else(|| AppError::UnknownInvitation(group.to_owned()))?;
        let welcome = self
            .local
            .invitation_welcome(&invitation.group)?
            .ok_or_else(|| AppError::UnknownInvitation(group.into()))?;
        Ok((invitation, welcome))
    }

    /// Joins the group of a waiting invitation and reads it.
    pub async fn accept_invitation(&mut self, conn: &Connection, group: &str) -> Result<Vec<Entry>, AppError> {
        let (invitation, welcome) = self.invitation(group)?;
        let announced = conn.groups().await?;
        let unit = self.local.unit()?;
        let gid = self.member.join(&welcome)?;
        let cursor = announced.iter().find(|g| g.group == gid).map(|g| g.acked_seq.min(g.last_seq)).unwrap_or(0);
        self.local.put_group(&gid, None, cursor, now_unix())?;
        self.local.delete_invitation(&invitation.group)?;
        let who = self.display(&invitation.inviter);
        let mut new =
            vec![self.record(&gid, cursor, None, EntryKind::Event, &format!("you joined ({who} invited you)"))?];
        unit.commit()?;
        self.sync_group(conn, &gid, &mut new).await?;
        for e in &mut new {
            e.group = self.group_name(&e.group_id);
        }
        Ok(new)
    }

    /// Declines a waiting invitation: joins only to leave at once (the
    /// server stops counting the group for this account as the leaving
    /// arrives; nobody needs to commit it).
    pub async fn decline_invitation(&mut self, conn: &Connection, group: &str) -> Result<(), AppError> {
        let (invitation, welcome) = self.invitation(group)?;
        let unit = self.local.unit()?;
        let gid = match self.member.join(&welcome) {
            Ok(gid) => gid,
            Err(e) => {
                // Nothing to leave from here (the Welcome went stale): drop it.
                tracing::warn!("could not read a declined invitation: {e}");
                self.local.delete_invitation(&invitation.group)?;
                unit.commit()?;
                return Ok(());
            }
        };
        self.local.put_group(&gid, None, 0, now_unix())?;
        self.local.delete_invitation(&invitation.group)?;
        unit.commit()?;
        let row = GroupRow { id: gid.clone(), name: text::encode(&gid), active: true };
        let proposals = self.member.leave_account(&gid)?;
        let unit = self.local.unit()?;
        for p in proposals {
            match conn.send(p, None).await {
                Ok((seq, _)) => self.local.mark_sent(&gid, seq)?,
                // Stale (the group moved on since the Welcome): the server
                // still ends the membership below when we read on and leave.
                Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    drop(unit);
                    self.sync_group(conn, &gid, &mut Vec::new()).await?;
                    return self.leave(conn, &row).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.local.deactivate(&gid)?;
        self.record(&gid, 0, Some(&self.account()), EntryKind::Event, "you declined the invitation and left")?;
        unit.commit()?;
        Ok(())
    }

    /// Syncs one active group: joins it (a linked device not in it yet),
    /// reads its log, and commits the proposals that may be committed
    /// without being asked.
    async fn sync_one(
        &mut self,
        conn: &Connection,
        g: &GroupRow,
        summary: Option<&GroupSummary>,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        if summary.is_none() && !self.member.has_group(&g.id) {
            // A group of this account that this (linked) device is not in
            // yet.
            self.join_linked(conn, &g.id, new).await?;
            // The state joined may hold a device its account revoked (the
            // walk takes what a member takes): out before anything is sent.
            if self.member.has_group(&g.id) {
                if let Some((seq, n)) = self.remove_revoked(conn, &g.id).await? {
                    let line = format!("you removed {n} device(s) their account revoked, still or again in the group");
                    let me = self.account();
                    new.push(self.record(&g.id, seq, Some(&me), EntryKind::Event, &line)?);
                }
            }
            return Ok(());
        }
        self.sync_group_upto(conn, &g.id, summary, new).await?;
        // Removals the server proposed, and members leaving, take effect
        // with the next commit: make it.
        if self.member.should_commit_pending(&g.id) {
            new.extend(self.commit_pending_proposals(conn, g).await?);
        }
        // A device its account revoked that still (or again) holds a leaf
        // here: this member removes it, whatever the server proposed or
        // relayed.
        if let Some((seq, n)) = self.remove_revoked(conn, &g.id).await? {
            let line = format!("you removed {n} device(s) their account revoked, still or again in the group");
            let me = self.account();
            new.push(self.record(&g.id, seq, Some(&me), EntryKind::Event, &line)?);
        }
        // A leaf from before hush's group settings: one commit advertises
        // them, so the group's timer can be set (it needs every member's).
        if g.active && self.member.leaf_predates_settings(&g.id) {
            let gid = g.id.clone();
            if let Err(e) = self.send_commit(conn, &gid, |m| Ok(m.self_update(&gid)?)).await {
                tracing::warn!("could not update this device's leaf for group settings: {e}");
            }
        }
        Ok(())
    }

    /// Tells the MLS member the server's removal key (the one external
    /// sender whose proposals it accepts), asking the server once and
    /// keeping it.
    pub(super) async fn know_removal_key(&mut self, conn: &Connection) -> Result<(), AppError> {
        let key = match self.local.setting(REMOVAL_KEY)? {
            Some(k) if k.len() == 32 => k,
            _ => {
                let key = conn.status().await?.removal_key;
                self.local.set_setting(REMOVAL_KEY, &key)?;
                key.to_vec()
            }
        };
        if let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) {
            self.member.set_removal_key(key);
        }
        Ok(())
    }

    /// Fetches and processes one group's new messages (asking the server
    /// first how far its log goes).
    pub async fn sync_group(&mut self, conn: &Connection, group: &[u8], new: &mut Vec<Entry>) -> Result<(), AppError> {
        let summary = conn.groups().await?.into_iter().find(|s| s.group == group);
        self.sync_group_upto(conn, group, summary.as_ref(), new).await
    }

    /// Fetches and processes one group's messages up to the last sequence
    /// the server announced in `summary` (`None`: the server does not list
    /// the group for us). Never trusts the server to end the loop: every
    /// page must move the cursor forward and stay within the bound, and at
    /// most [`MAX_SYNC_PAGES`] pages and [`MAX_SYNC_BYTES`] bytes are read.
    ///
    /// **Group repair**: a commit of our epoch (or any message of a later
    /// one) that cannot be processed means this device can no longer follow
    /// the group; it rejoins the current epoch ([`App::repair`]) and goes on
    /// from there. So does a device whose state for the group is gone, or
    /// that is still behind the server's epoch once it read everything.
    async fn sync_group_upto(
        &mut self,
        conn: &Connection,
        group: &[u8],
        summary: Option<&GroupSummary>,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let bound = summary.map(|s| s.last_seq);
        let mut bytes_read = 0usize;
        let mut repaired = false;
        let mut acked = summary.map_or(0, |s| s.acked_seq);
        'pages: for _ in 0..MAX_SYNC_PAGES {
            let after = self.local.cursor(group)?;
            if bound.is_some_and(|b| after >= b) {
                return self.catch_up(conn, group, summary, repaired, acked, new).await;
            }
            let (mut messages, mut more) = match conn.fetch(group, after, 0).await {
                Ok(r) => r,
                Err(e) if e.code() == Some(ErrorCode::NotMember) => {
                    self.local.deactivate(group)?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let Some(bound) = bound else {
                return Err(AppError::Misbehaving("it sent messages of a group it does not list for us".into()));
            };
            // Messages that arrived after the server listed the group are
            // read with the next sync: this one stops at the bound it was
            // given (so the server cannot keep it reading forever).
            if let Some(past) = messages.iter().position(|m| m.seq > bound) {
                messages.truncate(past);
                more = false;
            }
            let mut log = GroupLog::new(group, after);
            log.check(&messages, more, Some(bound)).map_err(|e| AppError::Misbehaving(e.to_string()))?;
            let expired = self.expired_before(conn, group, summary, &messages).await?;
            self.note_timer(group)?;
            // A message of this epoch shown as expired since the last
            // change read: if the next one is of a later epoch, that entry
            // hid the change.
            let mut gone_here: Option<u64> = None;
            for m in &messages {
                let (seq, bytes) = (&m.seq, &m.data);
                bytes_read = bytes_read.saturating_add(bytes.len());
                // Reading the message, recording what it did and moving the
                // cursor past it land together.
                let unit = self.local.unit()?;
                let mut forks = Vec::new();
                if let Some(gone) = m.gone {
                    // Expired before this device read it. Our own: checked
                    // against what we sent.
                    if !self.own_message(group, m, new)? {
                        self.gone_message(group, m, new)?;
                        if Some(gone.epoch) == self.member.epoch(group) {
                            gone_here = Some(*seq);
                        }
                    }
                } else if !self.own_message(group, m, new)? {
                    let before = self.member.members(group);
                    match log.read(&mut self.member, *seq, bytes) {
                        Read::Received { received, .. } => {
                            let commit = matches!(received, Received::Commit { .. });
                            self.server_expiry = m.expires;
                            let applied = self.apply(group, *seq, received, &before, new);
                            self.server_expiry = None;
                            forks = applied?;
                            if commit {
                                gone_here = None;
                                self.note_timer(group)?;
                            }
                        }
                        Read::Failed { cause: Some(c), stuck: true, error, .. } if !repaired => {
                            drop(unit);
                            if let Some(gone_seq) =
                                gone_here.filter(|_| self.member.epoch(group).is_some_and(|e| c.epoch > e))
                            {
                                self.hidden_change(group, gone_seq, *seq, new)?;
                            }
                            // Where the chain stands through the message
                            // that could not be read (an alarm if it does
                            // not follow): the rejoin must link back to it.
                            let chain = self.chain_through(group, m, expired, new)?;
                            tracing::warn!(seq, "could not process a commit; rejoining the group: {error}");
                            let who = c.sender.map(|a| self.display(&a)).unwrap_or_else(|| "someone".into());
                            let why = if c.commit {
                                format!("{who}'s change at epoch {} could not be read", c.epoch)
                            } else {
                                format!("this device missed the group's changes up to epoch {}", c.epoch)
                            };
                            repaired = true;
                            // The walk starts at the message we could not
                            // read; the cursor moves only if we rejoin.
                            self.repair(conn, group, &why, seq.saturating_sub(1), chain, new).await?;
                            if self.local.cursor(group)? < *seq {
                                // Not rejoined: the group waits here for
                                // the next sync (or `hush group rejoin`).
                                return Ok(());
                            }
                            acked = acked.max(self.local.cursor(group)?);
                            continue 'pages;
                        }
                        Read::Failed { error, .. } => tracing::warn!(seq, "could not process a message: {error}"),
                        Read::Own { .. } | Read::Gone { .. } => {}
                    }
                }
                self.follow_chain(group, m, expired, new)?;
                self.local.advance(group, *seq)?;
                unit.commit()?;
                for (at, alarm) in forks {
                    self.prove_fork(conn, group, at, alarm).await?;
                }
            }
            if let Some(last) = messages.last() {
                conn.ack(group, last.seq).await?;
                acked = last.seq;
            }
            if !more {
                return self.catch_up(conn, group, summary, repaired, acked, new).await;
            }
            if bytes_read > MAX_SYNC_BYTES {
                break;
            }
        }
        tracing::warn!(
            "stopped reading a group after {MAX_SYNC_PAGES} pages or {MAX_SYNC_BYTES} bytes; sync again for the rest"
        );
        Ok(())
    }

    /// After reading a group's log to its end: a device still behind the
    /// epoch the server announced (its state lost, or the commits it missed
    /// deleted) rejoins, unless it just did.
    async fn catch_up(
        &mut self,
        conn: &Connection,
        group: &[u8],
        summary: Option<&GroupSummary>,
        repaired: bool,
        acked: u64,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        // What our next messages claim: the server's signature over the
        // head we verified last.
        self.sign_position(conn, group, new).await?;
        // Read (and verified) to the end the server announced: messages it
        // holds from now on cannot expire before the retention has passed.
        // Not when the end was not reached (what it did not show may have
        // expired meanwhile, and a later gap is judged from the last time
        // this device really was at the end).
        let at_end = self.local.chain(group)?.is_some_and(|r| summary.is_some_and(|s| r.position.seq >= s.last_seq));
        if at_end {
            self.local.set_synced(group, now_unix())?;
        }
        // Our own messages move the cursor without a fetch: tell the server
        // too, or it keeps them for others who read them long ago.
        if let Some(s) = summary.filter(|s| s.member) {
            let cursor = self.local.cursor(group)?;
            if acked < cursor && cursor <= s.last_seq {
                conn.ack(group, cursor).await?;
            }
        }
        let Some(s) = summary.filter(|s| s.member && !repaired) else { return Ok(()) };
        let why = match self.member.epoch(group) {
            None => "this device had no state for the group".to_string(),
            Some(e) if e < s.epoch => format!("this device was behind the group (epoch {e} of {})", s.epoch),
            Some(_) => return Ok(()),
        };
        let from = self.local.cursor(group)?;
        let chain = self.local.chain(group)?.map(|r| (r.position, r.since));
        self.repair(conn, group, &why, from, chain, new).await
    }

    /// Rejoins `group` at its current epoch by an external commit that
    /// replaces this device's leaf (the server keeps the GroupInfo of each
    /// epoch for this), records an event saying `why`, what was lost and
    /// how the members changed meanwhile, and moves the cursor to the
    /// rejoining commit.
    ///
    /// **Never back, never on a claim** (DESIGN §5): the GroupInfo must be
    /// of a later epoch than this device's state, and the group's log after
    /// `from` must hold the commits that lead there from that state, each
    /// verified against the tree of its epoch ([`Descent`]). Otherwise
    /// nothing changes: the state is kept and the refusal is recorded
    /// (`hush group rejoin` rejoins anyway, on the user's word). A rejoin
    /// the server refuses leaves the state as it was.
    async fn repair(
        &mut self,
        conn: &Connection,
        group: &[u8],
        why: &str,
        from: u64,
        chain: Option<(Position, u64)>,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let Some(mut descent) = self.member.descent(group)? else {
            let error = "this device holds no state of the group to check the server's against; \
                         check the group's members with a member, then run `hush group rejoin` to rejoin anyway";
            return self.not_rejoined(group, why, error, new);
        };
        let before = descent.start_members.clone();
        let mut walked = from;
        let mut walk = Some((&mut descent, &mut walked));
        let mut build = |m: &mut Member<Provider>, g: &[u8], info: &[u8], tree: Option<&[u8]>, d: Option<&Descent>| {
            m.resync(g, info, tree, d)
        };
        let outcome = self.external_commit(conn, group, walk.take(), &mut build).await?;
        match outcome {
            External::Done { seq, epoch, head, commit } => {
                let mut body = format!(
                    "{why}; this device rejoined the group at epoch {epoch}. Messages sent before that which it had not read cannot be decrypted here."
                );
                body.push_str(&self.roster_change(group, &before));
                // What it did not read is still in the chain: the server
                // cannot make a repair hide what it dropped. (Before the
                // acknowledgement, which lets the server delete them.)
                self.link_rejoin(conn, group, chain, (seq, head, &commit), new).await?;
                self.external_landed(conn, group, seq, &body, new).await
            }
            External::NotMember => Ok(self.local.deactivate(group)?),
            External::Refused(error) => self.not_rejoined(group, why, &error, new),
        }
    }

    /// Rejoins `group` without the proof `App::repair` asks for (the
    /// commits since this device's state are gone, or it has no state):
    /// on its user's word, after a refused repair said why. The members
    /// it finds are named in the event, with how they differ from the
    /// state it had.
    pub async fn rejoin_unverified(&mut self, conn: &Connection, group: &GroupRow) -> Result<Vec<Entry>, AppError> {
        let mut new = Vec::new();
        let before = self.member.members(&group.id);
        // A linked device whose first join was refused has no leaf of its
        // own yet: it joins as a new device of the account instead.
        let mut build =
            |m: &mut Member<Provider>, g: &[u8], info: &[u8], tree: Option<&[u8]>, _: Option<&Descent>| match m
                .resync(g, info, tree, None)
            {
                Err(MlsError::NoOwnLeaf) if !m.has_group(g) => m.join_external(g, info, tree),
                other => other,
            };
        match self.external_commit(conn, &group.id, None, &mut build).await? {
            External::Done { seq, epoch, .. } => {
                self.local.reactivate(&group.id)?;
                self.local.forget_handover(&group.id)?;
                let mut body = format!("this device rejoined the group at epoch {epoch} on your word, unverified");
                let now: Vec<String> = self.member.members(&group.id).iter().map(|a| self.display(a)).collect();
                body.push_str(&format!("; its members now: {}", now.join(", ")));
                if !before.is_empty() {
                    body.push_str(&self.roster_change(&group.id, &before));
                }
                self.external_landed(conn, &group.id, seq, &body, &mut new).await?;
                Ok(new)
            }
            External::NotMember => Err(AppError::NotMember(group.name.clone())),
            External::Refused(error) => Err(AppError::RejoinRefused(error)),
        }
    }

    /// How the group's accounts changed from `before` to now, as a loud
    /// addition to a rejoin event ("" when they did not).
    fn roster_change(&mut self, group: &[u8], before: &[AccountId]) -> String {
        let after = self.member.members(group);
        // The accounts of `from` that `other` lacks, named once each.
        let missing = |from: &[AccountId], other: &[AccountId]| -> Vec<String> {
            let names: std::collections::BTreeSet<String> =
                from.iter().filter(|a| !other.contains(a)).map(|a| self.display(a)).collect();
            names.into_iter().collect()
        };
        let (added, gone) = (missing(&after, before), missing(before, &after));
        let mut out = String::new();
        if !added.is_empty() {
            out.push_str(&format!(
                ". NOTE: in this group now, and not when this device last followed it: {}",
                added.join(", ")
            ));
        }
        if !gone.is_empty() {
            out.push_str(&format!(". NOTE: no longer in this group: {}", gone.join(", ")));
        }
        out
    }

    /// Reads the group's log after `after` into `descent` until it reaches
    /// `target` or the log ends, bounded like a sync ([`MAX_SYNC_PAGES`],
    /// [`MAX_SYNC_BYTES`]: a server that serves junk cannot keep it
    /// walking); returns the last sequence read.
    async fn walk(
        &self,
        conn: &Connection,
        group: &[u8],
        descent: &mut Descent,
        mut after: u64,
        target: u64,
    ) -> Result<u64, AppError> {
        let mut bytes_read = 0usize;
        for _ in 0..MAX_SYNC_PAGES {
            if descent.epoch() >= target || bytes_read > MAX_SYNC_BYTES {
                break;
            }
            let (messages, more) = conn.fetch(group, after, 0).await?;
            GroupLog::new(group, after)
                .check(&messages, more, None)
                .map_err(|e| AppError::Misbehaving(e.to_string()))?;
            for m in &messages {
                bytes_read = bytes_read.saturating_add(m.data.len());
                descent.feed(&m.data);
                after = m.seq;
                if descent.epoch() >= target {
                    break;
                }
            }
            if !more {
                break;
            }
        }
        Ok(after)
    }

    /// Sends the external commit `build` makes from the group's current
    /// GroupInfo (a resync of our leaf, or a linked device joining),
    /// retrying on `StaleEpoch`. With a `descent`, the log is walked up to
    /// the GroupInfo's epoch first, and `build` checks the GroupInfo
    /// against it. The new state, the cursor at the commit and the record
    /// that it is ours land together once the server accepted it; a commit
    /// that did not land changes nothing (the old state stays).
    pub(super) async fn external_commit(
        &mut self,
        conn: &Connection,
        group: &[u8],
        mut descent: Option<(&mut Descent, &mut u64)>,
        build: ExternalBuilder<'_>,
    ) -> Result<External, AppError> {
        for _ in 0..COMMIT_ATTEMPTS {
            let (info, tree) = match conn.group_info(group).await {
                Ok(r) => r,
                Err(e) if e.code() == Some(ErrorCode::NotMember) => return Ok(External::NotMember),
                Err(e) if e.code().is_some() => return Ok(External::Refused(e.to_string())),
                Err(e) => return Err(e.into()),
            };
            if let Some((d, walked)) = descent.as_mut() {
                let offered = crate::mls::parse_group_info(&info).map(|i| i.epoch().as_u64()).unwrap_or(0);
                **walked = self.walk(conn, group, d, **walked, offered).await?;
            }
            let unit = self.local.unit()?;
            let commit =
                match build(&mut self.member, group, &info, tree.as_deref(), descent.as_ref().map(|(d, _)| &**d)) {
                    Ok(c) => c,
                    Err(e) => {
                        drop(unit);
                        self.member.evict(group);
                        return Ok(External::Refused(e.to_string()));
                    }
                };
            let bytes = commit.message.clone();
            match conn.accepted(&commit.into_request()).await {
                Ok(a) => {
                    self.local.advance(group, a.seq)?;
                    // Past messages this device did not read: its chain
                    // starts again at its own commit (a repair then links
                    // it back to where it stood: App::link_rejoin).
                    self.restart_chain(group, &a)?;
                    unit.commit()?;
                    return Ok(External::Done { seq: a.seq, epoch: a.epoch, head: a.head, commit: bytes });
                }
                Err(e) => {
                    // The state we built is of an epoch that never
                    // happened: back to the one we had.
                    drop(unit);
                    self.member.evict(group);
                    match e.code() {
                        Some(ErrorCode::StaleEpoch) => {}
                        Some(_) => return Ok(External::Refused(e.to_string())),
                        None => return Err(e.into()),
                    }
                }
            }
        }
        Err(AppError::RejoinKeptFailing)
    }

    /// Our external commit landed at `seq` (the cursor is there already):
    /// the event `body` is recorded, and the server hears we read that far.
    pub(super) async fn external_landed(
        &mut self,
        conn: &Connection,
        group: &[u8],
        seq: u64,
        body: &str,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        new.push(self.record(group, seq, None, EntryKind::Event, body)?);
        conn.ack(group, seq).await?;
        Ok(())
    }

    /// Records that a rejoin did not happen, and why.
    fn not_rejoined(&mut self, group: &[u8], why: &str, error: &str, new: &mut Vec<Entry>) -> Result<(), AppError> {
        // Logs name no one (the event, shown to the user, does).
        tracing::warn!("could not rejoin a group: {error}");
        let body = format!("{why}; this device could not rejoin the group: {error}");
        let at = self.local.cursor(group)?;
        new.push(self.record(group, at, None, EntryKind::Event, &body)?);
        Ok(())
    }

    /// "`who` was removed by `by`", told by whose proposal it was.
    fn removal_line(&self, who: &str, how: RemovedBy, by: &str) -> String {
        let were = if who == "you" { "were" } else { "was" };
        match how {
            RemovedBy::Committer => format!("{who} {were} removed by {by}"),
            RemovedBy::Itself if who == "you" => format!("you left the group ({by} committed it)"),
            RemovedBy::Itself => format!("{who} left the group ({by} committed it)"),
            RemovedBy::Server => format!(
                "{who} {were} removed by the server (a revoked device, or an account its operator removed; {by} committed it)"
            ),
            RemovedBy::Member(p) => {
                format!("{who} {were} removed on {}'s proposal ({by} committed it)", self.display(&p))
            }
        }
    }

    /// Records what a received message did. Returns the forks its claim
    /// proved, as (sequence number, alarm) to complete the evidence of.
    fn apply(
        &mut self,
        group: &[u8],
        seq: u64,
        r: Received,
        before: &[AccountId],
        new: &mut Vec<Entry>,
    ) -> Result<Vec<(u64, i64)>, AppError> {
        let mut forks = Vec::new();
        if let Received::Application { sender, aad, .. } = &r {
            forks.extend(self.check_claim(group, seq, sender.as_ref(), aad, new)?);
        }
        match r {
            Received::Application { sender, data, .. } => match Payload::decode(&data) {
                Ok(Payload::Text(body)) => {
                    new.push(self.record(group, seq, sender.as_ref(), EntryKind::Text, &body)?)
                }
                Ok(Payload::File(file)) => new.extend(self.record_file(group, seq, sender.as_ref(), &file)?),
                Ok(Payload::GroupName(name)) => {
                    let name: String = name.chars().filter(|c| !c.is_control()).take(MAX_NAME).collect();
                    // A name shaped like a group id could stand in for
                    // another group's id wherever a group is named (red
                    // team, issue 36: a bot's reply to the id of alice's
                    // group went to mallory's group of that name): such a
                    // group keeps its id as its name.
                    if !name.trim().is_empty() && !super::looks_like_group_id(&name) {
                        self.local.name_group(group, &name)?;
                    }
                }
                Ok(Payload::Revocation(bytes)) => match crate::auth::DeviceRevocation::decode(&bytes) {
                    Ok(r) if self.member.account_of_device(group, &r.device).is_some_and(|a| a != r.account) => {
                        // Signed, but by another account than the device's
                        // own: it revokes nothing (Member::revoke).
                        let by = sender.as_ref().map(|a| self.display(a)).unwrap_or_else(|| "someone".into());
                        let e = format!(
                            "refused a revocation sent by {by}: it names a device of another account than the one that signed it"
                        );
                        tracing::warn!(seq, "{e}");
                        new.push(self.record(group, seq, sender.as_ref(), EntryKind::Event, &e)?);
                    }
                    Ok(r) => {
                        if self.learn_revocation(&r)? {
                            let whose = if r.account == self.account() {
                                "your account".to_string()
                            } else {
                                self.display(&r.account)
                            };
                            let e = format!(
                                "{whose} revoked one of its devices (signed with the account key): that device is refused in every group from now on"
                            );
                            new.push(self.record(group, seq, sender.as_ref(), EntryKind::Event, &e)?);
                        }
                    }
                    Err(e) => tracing::debug!(seq, "skipped a revocation that does not verify: {e}"),
                },
                Err(e) => tracing::debug!(seq, "skipped a payload: {e}"),
            },
            Received::Commit { sender, removed_me, rejoined, new_device, removed, settings, .. } => {
                let by = sender.as_ref().map(|a| self.display(a)).unwrap_or_else(|| "someone".into());
                let after = if removed_me { vec![] } else { self.member.members(group) };
                let mut events = vec![];
                if let Some(s) = settings {
                    events.push(super::timer_event(&by, s.disappear_secs));
                }
                if rejoined {
                    events.push(format!("{by} rejoined the group (a device of theirs could not follow it)"));
                }
                if new_device {
                    events.push(format!("{by} added a device to the group"));
                }
                for a in after.iter().filter(|a| !before.contains(a)) {
                    events.push(format!("{} was added by {by}", self.display(a)));
                }
                if removed_me {
                    // Only what happened to us: the others' leaves are not
                    // ours to know about any more.
                    let ours = removed.iter().find(|r| r.account == self.account()).map(|r| r.by);
                    events.push(self.removal_line("you", ours.unwrap_or(RemovedBy::Committer), &by));
                    self.local.deactivate(group)?;
                } else {
                    for r in removed.iter().filter(|r| r.account != self.account() || after.contains(&r.account)) {
                        let who = self.display(&r.account);
                        if after.contains(&r.account) {
                            // One device of someone still in the group.
                            let whose =
                                if r.account == self.account() { "your".to_string() } else { format!("{who}'s") };
                            events.push(self.removal_line(&format!("one of {whose} devices"), r.by, &by));
                        } else if before.contains(&r.account) {
                            events.push(self.removal_line(&who, r.by, &by));
                        }
                    }
                    // Each account once, devices aside.
                    events.dedup();
                }
                for e in events {
                    new.push(self.record(group, seq, sender.as_ref(), EntryKind::Event, &e)?);
                }
            }
            Received::Proposal { sender, removing: Some(target), leaving } => {
                let who = sender.as_ref().map(|a| self.display(a)).unwrap_or_else(|| "someone".into());
                let e = if leaving {
                    format!("{who} asked to leave the group; the next member to sync takes it")
                } else {
                    let target = self.display(&target);
                    format!(
                        "{who} proposed removing {target}; the next change leaves it out (only a member who runs `hush group remove` removes {target})"
                    )
                };
                new.push(self.record(group, seq, sender.as_ref(), EntryKind::Event, &e)?);
            }
            Received::Proposal { .. } => {}
            Received::ServerRemoval { account } => {
                let whose = match account {
                    Some(a) if a == self.account() => "one of your devices".to_string(),
                    Some(a) => format!("a device of {}", self.display(&a)),
                    None => "a device".to_string(),
                };
                let e = format!(
                    "the server removes {whose} (revoked, or the account was removed by the operator); it leaves the group with the next change"
                );
                new.push(self.record(group, seq, None, EntryKind::Event, &e)?);
            }
            Received::Refused { sender, reason } => {
                let by = sender.as_ref().map(|a| self.display(a)).unwrap_or_else(|| "someone".into());
                let e = format!("refused a change by {by}: {reason}");
                tracing::warn!(seq, "{e}");
                new.push(self.record(group, seq, sender.as_ref(), EntryKind::Event, &e)?);
            }
        }
        Ok(forks)
    }
}

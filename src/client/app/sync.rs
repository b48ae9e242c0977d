//! Syncing: Welcomes, every group's new messages through
//! [`crate::client::log::GroupLog`], and group repair (rejoining a group
//! this device can no longer follow).

use rusqlite::params;

use super::*;
use crate::client::log::{GroupLog, Read};

impl App {
    /// Joins pending Welcomes, fetches every group, tops up KeyPackages.
    /// Returns the new history entries, in order.
    pub async fn sync(&mut self, conn: &Connection) -> Result<Vec<Entry>, AppError> {
        let mut new = Vec::new();
        for (id, welcome) in conn.fetch_welcomes().await? {
            match self.member.join(&welcome) {
                Ok(gid) => {
                    let groups = conn.groups().await?;
                    // Where our history starts; never past the log's end.
                    let cursor =
                        groups.iter().find(|g| g.group == gid).map(|g| g.acked_seq.min(g.last_seq)).unwrap_or(0);
                    self.db.execute(
                        "INSERT OR REPLACE INTO groups (id, name, cursor, active, joined_at) VALUES (?1, NULL, ?2, 1, ?3)",
                        params![gid, i64::try_from(cursor).unwrap_or(0), i64::try_from(now_unix()).unwrap_or(0)],
                    )?;
                    self.record(&gid, cursor, None, "event", "you joined")?;
                    new.push(self.entry_now(&gid, cursor, None, "event", "you joined"));
                }
                Err(e) => {
                    // Shown to the user (there is no group to file it under).
                    tracing::warn!("could not join from a Welcome: {e}");
                    new.push(Entry {
                        group_id: vec![],
                        group: "invitation".into(),
                        seq: 0,
                        sender: String::new(),
                        kind: "event".into(),
                        body: format!("did not join a group: {e}"),
                        time: now_unix(),
                    });
                }
            }
            conn.ack_welcome(id).await?;
        }
        let announced = conn.groups().await?;
        // A group the server lists us in that this home does not know (its
        // state was lost, e.g. restored from an older backup): rejoin it.
        let known: Vec<Vec<u8>> = self.groups()?.into_iter().map(|g| g.id).collect();
        for s in announced.iter().filter(|s| s.member && !known.contains(&s.group)) {
            self.db.execute(
                "INSERT INTO groups (id, name, cursor, active, joined_at) VALUES (?1, NULL, ?2, 1, ?3)",
                params![s.group, i64::try_from(s.last_seq).unwrap_or(0), i64::try_from(now_unix()).unwrap_or(0)],
            )?;
        }
        for g in self.groups()? {
            if g.active {
                let summary = announced.iter().find(|s| s.group == g.id);
                self.sync_group_upto(conn, &g.id, summary, &mut new).await?;
            }
        }
        let (count, _) = conn.count_key_packages().await?;
        if count < KEY_PACKAGE_LOW {
            self.publish_key_packages(conn, false).await?;
        }
        // Names may have arrived after the entries that mention the group.
        for e in &mut new {
            e.group = self.group_name(&e.group_id);
        }
        Ok(new)
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
            let after = self.cursor(group)?;
            if bound.is_some_and(|b| after >= b) {
                return self.catch_up(conn, group, summary, repaired, acked, new).await;
            }
            let (messages, more) = match conn.fetch(group, after, 0).await {
                Ok(r) => r,
                Err(e) if e.code() == Some(ErrorCode::NotMember) => {
                    self.db.execute("UPDATE groups SET active = 0 WHERE id = ?1", [group])?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let Some(bound) = bound else {
                return Err(AppError::Misbehaving("it sent messages of a group it does not list for us".into()));
            };
            let mut log = GroupLog::new(group, after);
            log.check(&messages, more, Some(bound)).map_err(|e| AppError::Misbehaving(e.to_string()))?;
            for (seq, bytes) in &messages {
                bytes_read = bytes_read.saturating_add(bytes.len());
                if !self.is_own(group, *seq)? {
                    let before = self.member.members(group);
                    match log.read(&mut self.member, *seq, bytes) {
                        Read::Received { received, .. } => self.apply(group, *seq, received, &before, new)?,
                        Read::Failed { cause: Some(c), stuck: true, error, .. } if !repaired => {
                            tracing::warn!(seq, "could not process a commit; rejoining the group: {error}");
                            let who = c.sender.map(|a| self.display(&a)).unwrap_or_else(|| "someone".into());
                            let why = if c.commit {
                                format!("{who}'s change at epoch {} could not be read", c.epoch)
                            } else {
                                format!("this device missed the group's changes up to epoch {}", c.epoch)
                            };
                            self.set_cursor(group, *seq)?;
                            repaired = true;
                            self.repair(conn, group, &why, new).await?;
                            acked = acked.max(self.cursor(group)?);
                            continue 'pages;
                        }
                        Read::Failed { error, .. } => tracing::warn!(seq, "could not process a message: {error}"),
                        Read::Own { .. } => {}
                    }
                }
                self.set_cursor(group, *seq)?;
            }
            if let Some((last, _)) = messages.last() {
                conn.ack(group, *last).await?;
                acked = *last;
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
        // Our own messages move the cursor without a fetch: tell the server
        // too, or it keeps them for others who read them long ago.
        if let Some(s) = summary.filter(|s| s.member) {
            let cursor = self.cursor(group)?;
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
        self.repair(conn, group, &why, new).await
    }

    /// Rejoins `group` at its current epoch by an external commit that
    /// replaces this device's leaf (the server keeps the GroupInfo of each
    /// epoch for this), records an event saying `why` and what was lost,
    /// and moves the cursor to the rejoining commit. A rejoin the group
    /// refuses to let happen (a tree that does not verify, no leaf of ours
    /// left) is recorded and leaves the group as it was.
    async fn repair(
        &mut self,
        conn: &Connection,
        group: &[u8],
        why: &str,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        for _ in 0..COMMIT_ATTEMPTS {
            let (info, tree) = match conn.group_info(group).await {
                Ok(r) => r,
                Err(e) if e.code() == Some(ErrorCode::NotMember) => {
                    self.db.execute("UPDATE groups SET active = 0 WHERE id = ?1", [group])?;
                    return Ok(());
                }
                Err(e) if e.code().is_some() => return self.not_rejoined(group, why, &e.to_string(), new),
                Err(e) => return Err(e.into()),
            };
            let commit = match self.member.resync(group, &info, tree.as_deref()) {
                Ok(c) => c,
                Err(e) => return self.not_rejoined(group, why, &e.to_string(), new),
            };
            match conn.commit(commit).await {
                Ok((seq, epoch)) => {
                    self.mark_sent(group, seq)?;
                    self.set_cursor(group, seq)?;
                    conn.ack(group, seq).await?;
                    let body = format!(
                        "{why}; this device rejoined the group at epoch {epoch}. Messages sent before that which it had not read cannot be decrypted here."
                    );
                    self.record(group, seq, None, "event", &body)?;
                    new.push(self.entry_now(group, seq, None, "event", &body));
                    return Ok(());
                }
                Err(e) => {
                    // The state we built is of an epoch that never happened;
                    // the next sync rejoins again.
                    self.member.forget(group);
                    match e.code() {
                        Some(ErrorCode::StaleEpoch) => {}
                        Some(_) => return self.not_rejoined(group, why, &e.to_string(), new),
                        None => return Err(e.into()),
                    }
                }
            }
        }
        Err(AppError::RejoinKeptFailing)
    }

    /// Records that a rejoin did not happen, and why.
    fn not_rejoined(&mut self, group: &[u8], why: &str, error: &str, new: &mut Vec<Entry>) -> Result<(), AppError> {
        // Logs name no one (the event, shown to the user, does).
        tracing::warn!("could not rejoin a group: {error}");
        let body = format!("{why}; this device could not rejoin the group: {error}");
        let at = self.cursor(group)?;
        self.record(group, at, None, "event", &body)?;
        new.push(self.entry_now(group, at, None, "event", &body));
        Ok(())
    }

    fn apply(
        &mut self,
        group: &[u8],
        seq: u64,
        r: Received,
        before: &[AccountId],
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        match r {
            Received::Application { sender, data } => match data.split_first() {
                Some((&KIND_TEXT, rest)) => {
                    let body = String::from_utf8_lossy(rest).into_owned();
                    self.record(group, seq, sender.as_ref(), "text", &body)?;
                    new.push(self.entry_now(group, seq, sender.as_ref(), "text", &body));
                }
                Some((&KIND_NAME, rest)) => {
                    let name =
                        String::from_utf8_lossy(rest).chars().filter(|c| !c.is_control()).take(64).collect::<String>();
                    let unnamed: bool =
                        self.db.query_row("SELECT name IS NULL FROM groups WHERE id = ?1", [group], |r| r.get(0))?;
                    if unnamed && !name.is_empty() {
                        self.db.execute("UPDATE groups SET name = ?2 WHERE id = ?1", params![group, name])?;
                    }
                }
                _ => {}
            },
            Received::Commit { sender, removed_me, rejoined, .. } => {
                let by = sender.as_ref().map(|a| self.display(a)).unwrap_or_else(|| "someone".into());
                let after = if removed_me { vec![] } else { self.member.members(group) };
                let mut events = vec![];
                if rejoined {
                    events.push(format!("{by} rejoined the group (a device of theirs could not follow it)"));
                }
                for a in after.iter().filter(|a| !before.contains(a)) {
                    events.push(format!("{} was added by {by}", self.display(a)));
                }
                for a in before.iter().filter(|a| !after.contains(a) && **a != self.account()) {
                    events.push(format!("{} was removed by {by}", self.display(a)));
                }
                if removed_me {
                    events.push(format!("you were removed by {by}"));
                    self.db.execute("UPDATE groups SET active = 0 WHERE id = ?1", [group])?;
                }
                for e in events {
                    self.record(group, seq, sender.as_ref(), "event", &e)?;
                    new.push(self.entry_now(group, seq, sender.as_ref(), "event", &e));
                }
            }
            Received::Proposal { .. } => {}
            Received::Refused { sender, reason } => {
                let by = sender.as_ref().map(|a| self.display(a)).unwrap_or_else(|| "someone".into());
                let e = format!("refused a change by {by}: {reason}");
                tracing::warn!(seq, "{e}");
                self.record(group, seq, sender.as_ref(), "event", &e)?;
                new.push(self.entry_now(group, seq, sender.as_ref(), "event", &e));
            }
        }
        Ok(())
    }
}

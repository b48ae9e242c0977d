//! Verifiable delivery in the app: every message read or sent moves this
//! device along its group's chain ([`crate::client::verify`]), breaks and
//! forks become alarms with evidence, and `hush verify` reports it all.

use super::*;
use crate::chain::{Break, Claim, Position, SignedHead};
use crate::client::local::AlarmRow;
use crate::client::verify::{self, cross_check, signed_json, Check, Step, WITHHOLDING_LAG};
use crate::client::Accepted;
use crate::wire::Logged;

/// What `hush verify` reports about one group.
#[derive(Debug, Clone)]
pub struct ChainReport {
    pub group: String,
    /// The last message verified, and since which one without a break.
    pub position: Option<(Position, u64)>,
    /// The last head the server signed for this device.
    pub signed: Option<SignedHead>,
    /// Members that wrote with a claim: (name, the message they last
    /// wrote, how far they had read then).
    pub members: Vec<(String, u64, u64)>,
    pub alarms: Vec<AlarmRow>,
}

impl ChainReport {
    /// Whether anything is wrong.
    pub fn alarmed(&self) -> bool {
        !self.alarms.is_empty()
    }

    /// Members that had not seen at least [`WITHHOLDING_LAG`] messages when
    /// they last wrote: (name, how many).
    pub fn behind(&self) -> Vec<(String, u64)> {
        self.members
            .iter()
            .filter_map(|(name, at, seen)| {
                let lag = at.saturating_sub(1).saturating_sub(*seen);
                (lag >= WITHHOLDING_LAG).then(|| (name.clone(), lag))
            })
            .collect()
    }
}

impl App {
    /// Follows `group`'s chain through `m` (a message read, or our own the
    /// server accepted right after the last one we verified), recording an
    /// alarm if it breaks.
    ///
    /// `expired`: the first message the server still holds, when this
    /// device's gap before it can be the server's retention at work (see
    /// [`App::expired_before`]); a gap up to exactly there is told, not an
    /// alarm.
    pub(super) fn follow_chain(
        &mut self,
        group: &[u8],
        m: &Logged,
        expired: Option<u64>,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let row = self.local.chain(group)?;
        // Our own message: the server said its head when it accepted it.
        if let (Some(said), Some(shown)) = (self.local.sent_head(group, m.seq)?, m.head) {
            if said != shown {
                let body = format!(
                    "ALARM: the server changed its history: when it accepted this device's message {} the group's chain head was {}, now it shows {}",
                    m.seq,
                    said.short(),
                    shown.short()
                );
                let evidence = serde_json::json!({
                    "kind": "own-message", "seq": m.seq, "accepted_head": verify::hex(&said.0), "shown_head": verify::hex(&shown.0),
                });
                self.alarm(group, m.seq, &body, Some(evidence), new)?;
            }
        }
        match verify::follow(group, row.map(|r| r.position), m) {
            Step::Unchained => {}
            Step::Verified(at) => self.local.set_position(group, at, row.map_or(at.seq, |r| r.since))?,
            Step::Started { at, genesis } => {
                if genesis && at.seq > 1 {
                    // A group older than the chain: its chain begins here.
                    let body = format!(
                        "the server's delivery chain of this group begins at message {} (it kept none before its upgrade): from there on, what it shows is checked",
                        at.seq
                    );
                    new.push(self.record(group, at.seq, None, EntryKind::Event, &body)?);
                }
                self.local.set_position(group, at, at.seq)?;
            }
            Step::Broken { why: Break::Gap { last, seq }, at } if expired == Some(seq) => {
                let body = format!(
                    "messages {} to {} expired on the server (it deletes messages after a while, read or not) before this device read them; its chain goes on from message {seq}",
                    last.saturating_add(1),
                    seq.saturating_sub(1)
                );
                new.push(self.record(group, seq, None, EntryKind::Event, &body)?);
                self.local.set_position(group, at, at.seq)?;
            }
            Step::Broken { why, at } => {
                let body = format!("ALARM: the server broke this group's history: {why}");
                let evidence = serde_json::json!({
                    "kind": match why { Break::Gap { .. } => "gap", Break::Back { .. } => "back", Break::WrongLink { .. } => "wrong-link", Break::NoHead { .. } => "no-head", _ => "not-mls" },
                    "seq": m.seq,
                    "last_verified": row.map(|r| serde_json::json!({"seq": r.position.seq, "head": verify::hex(&r.position.head.0)})),
                    "claimed_head": verify::hex(&at.head.0),
                });
                self.alarm(group, m.seq, &body, Some(evidence), new)?;
                self.local.set_position(group, at, at.seq)?;
            }
        }
        Ok(())
    }

    /// Whether the page `messages` of `group` may start after messages the
    /// server's retention deleted: its first message is the first the
    /// server holds (`summary`), it is past the next one this device
    /// expects, and this device has not read the group to its end for at
    /// least as long as the server keeps messages (a message it missed is
    /// younger than that, so it cannot have expired). Returns that first
    /// message's sequence number.
    pub(super) async fn expired_before(
        &mut self,
        conn: &Connection,
        group: &[u8],
        summary: Option<&GroupSummary>,
        messages: &[Logged],
    ) -> Result<Option<u64>, AppError> {
        let (Some(first), Some(s)) = (messages.first(), summary) else { return Ok(None) };
        let Some(row) = self.local.chain(group)? else { return Ok(None) };
        if first.seq <= row.position.seq.saturating_add(1) {
            return Ok(None);
        }
        Ok(self.may_have_expired(conn, group, first.seq, s.first_seq).await?.then_some(first.seq))
    }

    /// Whether messages before `first` may have been deleted by the
    /// server's retention: `first` is the first message the server holds
    /// (`first_kept`), and this device has not been at the log's end for at
    /// least the retention (what it missed is younger than that otherwise).
    async fn may_have_expired(
        &mut self,
        conn: &Connection,
        group: &[u8],
        first: u64,
        first_kept: u64,
    ) -> Result<bool, AppError> {
        if first != first_kept {
            return Ok(false);
        }
        // A server cannot keep messages for less than a day: one that says
        // so would pass any drop off as expiry.
        let retention = conn.status().await?.retention.max(crate::limits::MIN_RETENTION.as_secs());
        let recent = self.local.synced_at(group)?.is_some_and(|t| now_unix().saturating_sub(t) < retention);
        Ok(!recent)
    }

    /// Where `group`'s chain stands through `m`, a message this device
    /// could not read (it will rejoin the group): (position, verified
    /// since), not stored. `None` if it had no position; an alarm, and
    /// `None`, if `m` does not follow.
    pub(super) fn chain_through(
        &mut self,
        group: &[u8],
        m: &Logged,
        expired: Option<u64>,
        new: &mut Vec<Entry>,
    ) -> Result<Option<(Position, u64)>, AppError> {
        let Some(row) = self.local.chain(group)? else { return Ok(None) };
        match verify::follow(group, Some(row.position), m) {
            Step::Verified(p) => Ok(Some((p, row.since))),
            Step::Broken { why: Break::Gap { .. }, at } if expired == Some(m.seq) => Ok(Some((at, at.seq))),
            _ => {
                self.follow_chain(group, m, expired, new)?;
                Ok(None)
            }
        }
    }

    /// This device rejoined `group` by its commit (`seq`, its head, its
    /// bytes) after a repair: links its chain from where it stood (`from`:
    /// position, verified since) through the messages it did not read to
    /// the commit, so a repair the server forced (by showing a message it
    /// cannot read) cannot hide what the server dropped or changed. A break
    /// is an alarm; reading more than a sync would (a long way behind) is
    /// told, and the chain then starts at the commit.
    pub(super) async fn link_rejoin(
        &mut self,
        conn: &Connection,
        group: &[u8],
        from: Option<(Position, u64)>,
        (seq, head, commit): (u64, crate::chain::Head, &[u8]),
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let Some((mut at, since)) = from else { return Ok(()) };
        let first_kept = conn.groups().await?.into_iter().find(|s| s.group == group).map_or(0, |s| s.first_seq);
        let mut bytes_read = 0usize;
        let mut capped = true;
        for _ in 0..MAX_SYNC_PAGES {
            if at.seq.saturating_add(1) >= seq {
                capped = false;
                break;
            }
            if bytes_read > MAX_SYNC_BYTES {
                break;
            }
            let (messages, more) = match conn.fetch(group, at.seq, 0).await {
                Ok(r) => r,
                Err(e) if e.code().is_some() => break,
                Err(e) => return Err(e.into()),
            };
            let before = at.seq;
            for m in messages.iter().take_while(|m| m.seq < seq) {
                bytes_read = bytes_read.saturating_add(m.data.len());
                match verify::follow(group, Some(at), m) {
                    Step::Verified(p) => at = p,
                    Step::Broken { why: Break::Gap { .. }, at: p }
                        if self.may_have_expired(conn, group, m.seq, first_kept).await? =>
                    {
                        at = p;
                    }
                    other => return self.rejoin_broke(group, seq, at, &other, new),
                }
            }
            if at.seq == before || !more {
                capped = false;
                break;
            }
        }
        let rejoined = Logged::new(seq, Some(head), commit.to_vec());
        match verify::follow(group, Some(at), &rejoined) {
            Step::Verified(p) => self.local.set_position(group, p, since)?,
            Step::Broken { why: Break::Gap { .. }, .. } if capped => {
                let body = format!(
                    "this device was too far behind to check the group's history up to its rejoin; its chain starts again at message {seq}"
                );
                new.push(self.record(group, seq, None, EntryKind::Event, &body)?);
            }
            other => return self.rejoin_broke(group, seq, at, &other, new),
        }
        Ok(())
    }

    /// The alarm for a rejoin the chain does not lead to.
    fn rejoin_broke(
        &mut self,
        group: &[u8],
        seq: u64,
        at: Position,
        step: &Step,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let why = match step {
            Step::Broken { why, .. } => why.to_string(),
            _ => "a message without its place in the chain".into(),
        };
        let body =
            format!("ALARM: the server broke this group's history before this device's rejoin at message {seq}: {why}");
        let evidence = serde_json::json!({
            "kind": "rejoin", "seq": seq,
            "last_verified": {"seq": at.seq, "head": verify::hex(&at.head.0)},
        });
        self.alarm(group, seq, &body, Some(evidence), new)?;
        Ok(())
    }

    /// The server accepted our message `bytes` into `group`: keep the head
    /// it gave, and follow the chain through it when it came right after
    /// the last message read (no fetch will show it then).
    pub(super) fn sent_chained(
        &mut self,
        group: &[u8],
        a: &Accepted,
        bytes: &[u8],
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let cursor = self.local.cursor(group)?;
        if a.seq <= cursor {
            // An honest server appends after everything this device read:
            // a place already read means the message is not in the log.
            let body = format!(
                "ALARM: the server said it stored this device's message at message {}, which this device had already read: the message is not in the group's history",
                a.seq
            );
            let evidence = serde_json::json!({
                "kind": "own-place", "seq": a.seq, "accepted_head": verify::hex(&a.head.0), "read_up_to": cursor,
            });
            self.alarm(group, a.seq, &body, Some(evidence), new)?;
            return Ok(());
        }
        self.local.mark_sent_head(group, a.seq, &a.head, Some(&digest32(bytes)))?;
        if cursor + 1 == a.seq {
            self.local.advance(group, a.seq)?;
            let m = Logged::new(a.seq, Some(a.head), bytes.to_vec());
            self.follow_chain(group, &m, None, new)?;
        }
        Ok(())
    }

    /// Whether `m` is this device's own message: one the server said it
    /// stored at `m.seq`, with the bytes this device sent. Another message
    /// there is an alarm (the server gave our message's place to it, so
    /// that this device would skip it as its own; ours is not in the log)
    /// and is read like any other.
    pub(super) fn own_message(&mut self, group: &[u8], m: &Logged, new: &mut Vec<Entry>) -> Result<bool, AppError> {
        let shown = m.gone.map_or_else(|| digest32(&m.data), |g| g.digest.0);
        match self.local.sent_digest(group, m.seq)? {
            None => Ok(false),
            // Sent before digests were kept, or not chained (leaving).
            Some(None) => Ok(true),
            Some(Some(d)) if d == shown => Ok(true),
            Some(Some(d)) => {
                let body = format!(
                    "ALARM: the server shows another message at message {} than the one it said it stored there for this device: this device's message is not in the group's history",
                    m.seq
                );
                let evidence = serde_json::json!({
                    "kind": "own-replaced", "seq": m.seq, "sent_digest": verify::hex(&d), "shown_digest": verify::hex(&shown),
                });
                self.alarm(group, m.seq, &body, Some(evidence), new)?;
                Ok(false)
            }
        }
    }

    /// A message the server shows as expired (only its epoch and digest
    /// left, its link in the chain): what a group with a disappearing
    /// timer does, so nothing to tell. In a group without one, the server
    /// withheld the message and calls it expired: an alarm.
    ///
    /// The timer is the one of the epoch the entry names (this device
    /// records each change it reads); an entry of an epoch this device has
    /// not reached is a change the server hid: only application messages
    /// of the epoch being read expire.
    pub(super) fn gone_message(&mut self, group: &[u8], m: &Logged, new: &mut Vec<Entry>) -> Result<(), AppError> {
        let Some(gone) = m.gone else { return Ok(()) };
        let ours = self.member.epoch(group).unwrap_or(0);
        let current = self.member.settings(group).map(|s| s.disappear_secs).unwrap_or(0);
        let timer = self.local.timer_at(group, gone.epoch)?.unwrap_or(current);
        let body = if gone.epoch > ours {
            format!(
                "ALARM: the server hid message {} (of epoch {}, which this device has not reached), saying it expired: only messages expire, never the changes that lead to an epoch",
                m.seq, gone.epoch
            )
        } else if timer == 0 {
            format!(
                "ALARM: the server withheld message {}, saying it expired, but this group has no disappearing messages",
                m.seq
            )
        } else {
            return Ok(());
        };
        let evidence = serde_json::json!({
            "kind": "false-expiry", "seq": m.seq, "epoch": gone.epoch, "digest": verify::hex(&gone.digest.0),
        });
        self.alarm(group, m.seq, &body, Some(evidence), new)?;
        Ok(())
    }

    /// This device cannot follow `group` past message `seq` (of a later
    /// epoch) right after the server showed message `gone_seq` of this
    /// epoch as expired: that entry was the change leading there, hidden.
    pub(super) fn hidden_change(
        &mut self,
        group: &[u8],
        gone_seq: u64,
        seq: u64,
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let body = format!(
            "ALARM: the server hid a change of this group as an expired message (message {gone_seq}): message {seq} is of a later epoch and nothing between leads there; only messages expire"
        );
        let evidence = serde_json::json!({ "kind": "hidden-change", "gone_seq": gone_seq, "seq": seq });
        self.alarm(group, seq, &body, Some(evidence), new)?;
        Ok(())
    }

    /// Records the group's timer as of this device's current epoch (what
    /// [`App::gone_message`] judges expired messages of that epoch by).
    pub(super) fn note_timer(&mut self, group: &[u8]) -> Result<(), AppError> {
        if let (Some(epoch), Ok(s)) = (self.member.epoch(group), self.member.settings(group)) {
            self.local.note_timer(group, epoch, s.disappear_secs)?;
        }
        Ok(())
    }

    /// This device rejoined `group` by a commit at `a.seq`, past messages it
    /// did not read: its chain starts again there, as the server gives it.
    pub(super) fn restart_chain(&mut self, group: &[u8], a: &Accepted) -> Result<(), AppError> {
        self.local.mark_sent_head(group, a.seq, &a.head, None)?;
        self.local.set_position(group, Position { seq: a.seq, head: a.head }, a.seq)?;
        Ok(())
    }

    /// After reading `group`: asks the server to sign the head this device
    /// verified last (what its next messages claim), unless it did
    /// already. A signature over another head is proof the server showed
    /// two histories, and an alarm.
    pub(super) async fn sign_position(
        &mut self,
        conn: &Connection,
        group: &[u8],
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let Some(row) = self.local.chain(group)? else { return Ok(()) };
        if row.signed.is_some_and(|s| s.seq >= row.position.seq) {
            return Ok(());
        }
        let signed = match conn.signed_head(group, row.position.seq).await {
            Ok(s) => s,
            // Gone (everyone read it and it was deleted meanwhile), or a
            // removed device: the next sync asks again.
            Err(e) if e.code().is_some() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !verify::by_server(&signed, &self.server.fingerprint) || !signed.verify(group) {
            return Err(AppError::Misbehaving("it signed a chain head with another key than its own".into()));
        }
        if signed.seq != row.position.seq {
            return Err(AppError::Misbehaving("it signed the head of another message than the one asked for".into()));
        }
        if signed.head != row.position.head {
            let body = format!(
                "ALARM: the server signed another history than the one it showed this device: after message {} it showed head {} and signed {}",
                signed.seq,
                row.position.head.short(),
                signed.head.short()
            );
            let evidence = serde_json::json!({
                "kind": "signed-other", "seq": signed.seq, "ours": verify::hex(&row.position.head.0), "signed": signed_json(group, &signed),
            });
            self.alarm(group, signed.seq, &body, Some(evidence), new)?;
            return Ok(());
        }
        self.local.set_signed(group, &signed)?;
        Ok(())
    }

    /// The authenticated data our next message in `group` carries: the
    /// last head the server signed for this device.
    pub(super) fn claim(&self, group: &[u8]) -> Result<Vec<u8>, AppError> {
        Ok(self.local.chain(group)?.and_then(|r| r.signed).map(|s| Claim(s).encode()).unwrap_or_default())
    }

    /// Compares the claim in a received message (at `seq`, from `sender`)
    /// with this device's chain. Returns the sequence number of a fork it
    /// proves, whose own signed head the caller should add to the evidence.
    pub(super) fn check_claim(
        &mut self,
        group: &[u8],
        seq: u64,
        sender: Option<&AccountId>,
        aad: &[u8],
        new: &mut Vec<Entry>,
    ) -> Result<Option<(u64, i64)>, AppError> {
        let Some(claim) = Claim::decode(aad) else { return Ok(None) };
        let ours = self.local.head_at(group, claim.0.seq)?;
        let check = cross_check(group, &claim, ours, &self.server.fingerprint);
        if check == Check::NotSigned {
            tracing::debug!(seq, "a message carried a claim the server did not sign");
            return Ok(None);
        }
        if let Some(sender) = sender {
            let lag = seq.saturating_sub(1).saturating_sub(claim.0.seq);
            let before = self.local.seen(group)?.into_iter().find(|(a, ..)| a == sender);
            let was_behind =
                before.is_some_and(|(_, at, seen)| at.saturating_sub(1).saturating_sub(seen) >= WITHHOLDING_LAG);
            self.local.put_seen(group, sender, seq, claim.0.seq)?;
            if lag >= WITHHOLDING_LAG && !was_behind && *sender != self.account() {
                let who = self.display(sender);
                let body = format!(
                    "{who} has not seen the last {lag} messages (when they wrote this, they had read up to message {}); if this goes on, the server may be holding messages back from them",
                    claim.0.seq
                );
                new.push(self.record(group, seq, None, EntryKind::Event, &body)?);
            }
        }
        let Check::Forked { ours } = check else { return Ok(None) };
        let who = sender.map(|a| self.display(a)).unwrap_or_else(|| "a member".into());
        let body = format!(
            "ALARM: the server showed {who} another history of this group than this device: after message {} {who} saw head {}, this device {}. The server signed {who}'s; see `hush verify`",
            claim.0.seq,
            claim.0.head.short(),
            ours.short()
        );
        let evidence = serde_json::json!({
            "kind": "fork", "seq": claim.0.seq, "message": seq,
            "theirs": signed_json(group, &claim.0),
            "ours": {"seq": claim.0.seq, "head": verify::hex(&ours.0)},
        });
        let id = self.alarm(group, seq, &body, Some(evidence), new)?;
        Ok(Some((claim.0.seq, id)))
    }

    /// Completes a fork's evidence with the server's signature over this
    /// device's own head at `seq` (two signed heads for one sequence
    /// number: the server cannot deny either).
    pub(super) async fn prove_fork(
        &mut self,
        conn: &Connection,
        group: &[u8],
        seq: u64,
        alarm: i64,
    ) -> Result<(), AppError> {
        let Some(ours) = self.local.head_at(group, seq)? else { return Ok(()) };
        let signed = match conn.signed_head(group, seq).await {
            Ok(s) => s,
            Err(e) if e.code().is_some() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let valid = verify::by_server(&signed, &self.server.fingerprint) && signed.verify(group);
        if valid && signed.seq == seq && signed.head == ours {
            self.local.sign_alarm_evidence(alarm, "ours", &signed_json(group, &signed))?;
        }
        Ok(())
    }

    /// Records an alarm (and shows it as a history line). Returns its id.
    fn alarm(
        &mut self,
        group: &[u8],
        seq: u64,
        body: &str,
        evidence: Option<serde_json::Value>,
        new: &mut Vec<Entry>,
    ) -> Result<i64, AppError> {
        // Logs name no group (the history line does).
        tracing::warn!(seq, "delivery alarm: the server broke a group's history");
        let evidence = evidence.map(|e| e.to_string());
        let id = self.local.add_alarm(group, seq, body, evidence.as_deref(), now_unix())?;
        new.push(self.record(group, seq, None, EntryKind::Alarm, body)?);
        Ok(id)
    }

    /// What `hush verify` shows about `group`.
    pub fn chain_report(&self, group: &GroupRow) -> Result<ChainReport, AppError> {
        let row = self.local.chain(&group.id)?;
        let members =
            self.local.seen(&group.id)?.into_iter().map(|(a, at, seen)| (self.display(&a), at, seen)).collect();
        Ok(ChainReport {
            group: group.name.clone(),
            position: row.map(|r| (r.position, r.since)),
            signed: row.and_then(|r| r.signed),
            members,
            alarms: self.local.alarms(&group.id)?,
        })
    }
}

/// SHA-256 of `bytes`.
fn digest32(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

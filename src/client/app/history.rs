//! History for a linked device (issue 34), in the app: the first device
//! packs and uploads it while it certifies the new one
//! ([`App::hand_over_history`]); the new device fetches, checks and imports
//! it ([`App::take_history`]). The format is [`crate::client::history`].

use zeroize::Zeroizing;

use super::files::{Progress, Source};
use super::*;
use crate::client::backup::GroupBackup;
use crate::client::history::{Archive, HistoryChoice, HistoryRef};
use crate::files::{FileKey, Layout};

/// The setting under which a linked device keeps where its history waits,
/// until it has it (a fetch that failed for the connection's sake is
/// tried again at every sync).
const PENDING_HISTORY: &str = "pending_history";

/// The setting counting the fetches of the pending history that failed.
const HISTORY_TRIES: &str = "pending_history_tries";

/// How long a sync spends fetching a pending history before it goes on
/// without it (and tries again next time).
pub const HISTORY_FETCH_BUDGET: std::time::Duration = std::time::Duration::from_secs(120);

/// Fetches of a pending history that may fail (the network, or a server
/// that keeps answering with errors) before it is given up.
pub const MAX_HISTORY_TRIES: u32 = 20;

/// A group the history blob goes to, and its timer (seconds) if it has one.
type Carrier = (Vec<u8>, Option<u64>);

/// What the first device did with its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistorySent {
    /// `--history none`.
    NotAsked,
    /// There was nothing (in the span asked for) to hand over.
    Nothing,
    /// The account is in no group the history could be uploaded to.
    NoGroup,
    /// Uploaded: lines and file messages, the archive's bytes, and the
    /// disappearing timer of the group that carries the blob, if it has
    /// one (the new device must fetch it within that).
    Sent { groups: usize, lines: usize, files: usize, bytes: u64, carrier_timer: Option<u64> },
    /// It could not be uploaded (the device was linked all the same).
    Failed(String),
}

/// What a linked device took from the history handed over.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryTaken {
    pub groups: usize,
    pub lines: usize,
    pub files: usize,
    /// The lines saying so, one per group.
    pub entries: Vec<Entry>,
}

impl App {
    /// This device's history as `choice` asks, per group: lines and file
    /// messages whose disappearing timer has not run out (they keep their
    /// expiry).
    pub fn pack_history(&self, choice: HistoryChoice) -> Result<Archive, AppError> {
        let now = now_unix();
        let live = |expires: Option<u64>| expires.is_none_or(|t| t > now);
        let mut groups = Vec::new();
        for g in self.local.groups()? {
            let history: Vec<HistoryRow> = self
                .local
                .history(&g.id)?
                .into_iter()
                .filter(|r| live(r.expires) && choice.keeps(r.time, now))
                .collect();
            let files: Vec<_> =
                self.local.files(&g.id)?.into_iter().filter(|r| live(r.expires) && choice.keeps(r.time, now)).collect();
            if history.is_empty() && files.is_empty() {
                continue;
            }
            groups.push(GroupBackup { id: g.id, name: g.name, active: g.active, anchor: None, history, files });
        }
        Ok(Archive { created: now, groups })
    }

    /// The group the history blob is uploaded to: one the account is in,
    /// without a disappearing timer if there is one (a timed group's blobs
    /// go with its timer), else the one with the longest.
    fn history_carrier(&mut self) -> Result<Option<Carrier>, AppError> {
        let mut best: Option<(u64, Vec<u8>)> = None;
        for g in self.groups()?.into_iter().filter(|g| g.active) {
            if self.member.anchor(&g.id).is_none() {
                continue;
            }
            let timer = self.member.settings_of(&g.id).and_then(|s| s.disappear()).map_or(u64::MAX, u64::from);
            if best.as_ref().is_none_or(|(t, _)| timer > *t) {
                best = Some((timer, g.id));
            }
        }
        Ok(best.map(|(timer, id)| (id, (timer != u64::MAX).then_some(timer))))
    }

    /// Packs the history as `choice` asks, encrypts it under a fresh key
    /// and uploads it (see [`crate::client::history`]); returns where it
    /// is, for the link's sealed bundle. Never fails the link: what went
    /// wrong is in the [`HistorySent`].
    pub(super) async fn hand_over_history(
        &mut self,
        conn: &mut Connection,
        choice: HistoryChoice,
        progress: &mut dyn Progress,
    ) -> (Option<HistoryRef>, HistorySent) {
        if choice == HistoryChoice::None {
            return (None, HistorySent::NotAsked);
        }
        match self.upload_history(conn, choice, progress).await {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!("could not hand the history over: {e}");
                (None, HistorySent::Failed(e.to_string()))
            }
        }
    }

    async fn upload_history(
        &mut self,
        conn: &mut Connection,
        choice: HistoryChoice,
        progress: &mut dyn Progress,
    ) -> Result<(Option<HistoryRef>, HistorySent), AppError> {
        let archive = self.pack_history(choice)?;
        let (lines, files) = archive.counts();
        if lines + files == 0 {
            return Ok((None, HistorySent::Nothing));
        }
        let Some((group, carrier_timer)) = self.history_carrier()? else { return Ok((None, HistorySent::NoGroup)) };
        let bytes = archive.encode()?;
        let size = bytes.len() as u64;
        let layout = Layout::of_size(size).ok_or_else(|| AppError::File("the history is too large".into()))?;
        let key = FileKey::random().map_err(|e| AppError::File(e.to_string()))?;
        let state = conn.upload_open(&group, layout.blob).await?;
        let id = state.id;
        let mut resumed = Vec::new();
        let hash = match self.upload(conn, Source::Bytes(&bytes), &key, layout, state, &mut resumed, progress).await {
            Ok(hash) => hash,
            Err(e) => {
                let _ = conn.upload_cancel(id).await;
                return Err(e);
            }
        };
        let sent = HistorySent::Sent { groups: archive.groups.len(), lines, files, bytes: size, carrier_timer };
        Ok((Some(HistoryRef { id, key: key.0, hash, size }), sent))
    }

    /// Keeps where the history handed over with a link waits (in the same
    /// unit as the rest of the link's bundle).
    pub(super) fn expect_history(&self, history: &HistoryRef) -> Result<(), AppError> {
        Ok(self.local.set_setting(PENDING_HISTORY, &history.encode())?)
    }

    /// Whether history handed over with a link still waits to be fetched.
    pub fn history_pending(&self) -> Result<bool, AppError> {
        Ok(self.local.setting(PENDING_HISTORY)?.is_some())
    }

    /// Fetches the history another device of the account handed over (if
    /// any waits), checks it (every chunk, and the whole blob's hash the
    /// first device put in the sealed bundle) and imports it. The
    /// plaintext stays in memory. A connection that fails leaves it
    /// waiting for the next sync; a blob the server no longer has, or
    /// altered, is given up, and every group says so.
    pub async fn take_history(
        &mut self,
        conn: &mut Connection,
        progress: &mut dyn Progress,
    ) -> Result<Option<HistoryTaken>, AppError> {
        let Some(bytes) = self.local.setting(PENDING_HISTORY)?.map(Zeroizing::new) else { return Ok(None) };
        let wanted = match HistoryRef::decode(&bytes) {
            Ok(r) => r,
            Err(e) => return self.give_up_history(&bytes, &format!("its reference is damaged ({e})")),
        };
        let tries = self
            .local
            .setting(HISTORY_TRIES)?
            .and_then(|t| <[u8; 4]>::try_from(t.as_slice()).ok())
            .map_or(0, u32::from_be_bytes);
        if tries >= MAX_HISTORY_TRIES {
            return self.give_up_history(&bytes, &format!("{tries} attempts to fetch it failed"));
        }
        // Counted before the attempt: one cut short (a sync's time budget
        // ran out, the process was stopped) counts too.
        self.local.set_setting(HISTORY_TRIES, &(tries + 1).to_be_bytes())?;
        let capacity = usize::try_from(wanted.size).map_err(|_| AppError::File("the history is too large".into()))?;
        // Reserved whole, so the plaintext is never moved (and copies left
        // behind) as it grows.
        let mut plain = Zeroizing::new(Vec::with_capacity(capacity));
        match self.fetch_into(conn, &wanted.as_file(), &mut *plain, progress).await {
            Ok(()) => {}
            // The server no longer has it, or served other bytes: trying
            // again changes nothing.
            Err(AppError::File(why)) => return self.give_up_history(&bytes, &why),
            // The network, or the server's errors: later, a bounded number
            // of times.
            Err(e) => return Err(e),
        }
        let archive = match Archive::decode(&plain) {
            Ok(a) => a,
            Err(e) => return self.give_up_history(&bytes, &e.to_string()),
        };
        drop(plain);
        self.import_history(&archive, &bytes)
    }

    /// Forgets history that cannot be had, and says so in every group
    /// (unless another process of this home took `pending` in meanwhile).
    fn give_up_history(&mut self, pending: &[u8], why: &str) -> Result<Option<HistoryTaken>, AppError> {
        let unit = self.local.unit()?;
        if self.local.setting(PENDING_HISTORY)?.map(Zeroizing::new).as_deref().map(Vec::as_slice) != Some(pending) {
            return Ok(None);
        }
        tracing::warn!("the history handed over could not be taken: {why}");
        self.local.clear_setting(PENDING_HISTORY)?;
        self.local.clear_setting(HISTORY_TRIES)?;
        let body = format!(
            "the history your other device handed over could not be taken ({why}); this device shows what it receives from now on"
        );
        for g in self.groups()?.into_iter().filter(|g| g.active) {
            let at = self.local.cursor(&g.id)?;
            self.record(&g.id, at, None, EntryKind::Event, &body)?;
        }
        unit.commit()?;
        Err(AppError::File(format!("the history your other device handed over could not be taken: {why}")))
    }

    /// Imports an archive's lines and file messages, marked as handed
    /// over, before everything this device received itself; a group this
    /// device does not know (one the account left) is kept as one it is
    /// not in.
    ///
    /// Once: the reference `pending` it was fetched for is checked again
    /// inside the unit that imports it and clears it, so two processes of
    /// one home (a `device join` and a `sync` in another terminal) cannot
    /// both import it.
    fn import_history(&mut self, archive: &Archive, pending: &[u8]) -> Result<Option<HistoryTaken>, AppError> {
        let unit = self.local.unit()?;
        if self.local.setting(PENDING_HISTORY)?.map(Zeroizing::new).as_deref().map(Vec::as_slice) != Some(pending) {
            return Ok(None);
        }
        let now = now_unix();
        let known: Vec<Vec<u8>> = self.local.groups()?.into_iter().map(|g| g.id).collect();
        let mut taken = HistoryTaken::default();
        for g in &archive.groups {
            if !known.contains(&g.id) {
                let name = g.name.as_deref().filter(|n| valid_name(n));
                self.local.put_group(&g.id, name, 0, now)?;
                self.local.deactivate(&g.id)?;
            }
            let mut lines = 0;
            let mut last = 0;
            for row in g.history.iter().filter(|r| r.expires.is_none_or(|t| t > now)) {
                self.local.record(&g.id, &HistoryRow { imported: true, ..row.clone() })?;
                lines += 1;
                last = row.seq;
            }
            for row in g.files.iter().filter(|r| r.expires.is_none_or(|t| t > now)) {
                if self.local.add_file(&g.id, row)? {
                    taken.files += 1;
                }
            }
            if lines == 0 {
                continue;
            }
            let body = format!(
                "{lines} earlier line(s) above were handed over by your other device on {}; this device did not receive them itself",
                crate::util::format_unix(archive.created)
            );
            let row = HistoryRow {
                seq: last,
                sender: None,
                kind: EntryKind::Event,
                body,
                time: archive.created,
                expires: None,
                imported: true,
            };
            self.local.record(&g.id, &row)?;
            let name = self.group_name(&g.id);
            taken.entries.push(self.entry(&g.id, &name, row));
            taken.groups += 1;
            taken.lines += lines;
        }
        self.local.clear_setting(PENDING_HISTORY)?;
        self.local.clear_setting(HISTORY_TRIES)?;
        unit.commit()?;
        Ok(Some(taken))
    }
}

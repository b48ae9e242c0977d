//! The account's devices: certifying a new one through a link code (on the
//! first device, which holds the account key), listing and revoking them,
//! and a linked device joining its account's groups.

use std::time::Duration;

use super::files::Progress;
use super::history::HistorySent;
use super::sync::External;
use super::*;
use crate::auth::DeviceRevocation;
use crate::client::history::{HistoryChoice, SealedHistory};
use crate::client::link::{
    Bundle, LinkCode, LinkError, LinkHandover, LinkedGroup, MAX_LINK_REVOCATIONS, SEAL_OVERHEAD,
};
use crate::client::local::valid_name;
use crate::client::mls::Descent;
use crate::limits::MAX_LINK_BUNDLE;

/// How often the waiting side of a link asks the server.
pub const LINK_POLL: Duration = Duration::from_millis(500);

/// One line of `hush device list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLine {
    pub device: DeviceId,
    /// The name the first device gave it (none for the first device, or on
    /// other devices).
    pub name: Option<String>,
    pub registered_at: u64,
    pub revoked: bool,
    /// This device.
    pub this: bool,
}

/// What `hush device add` asks for.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLink<'a> {
    /// What to call the new device here.
    pub name: &'a str,
    /// The person's name, handed over.
    pub person: Option<&'a str>,
    /// How much history to hand over.
    pub history: HistoryChoice,
}

/// What [`App::certify_linked_device`] did.
#[derive(Debug, Clone)]
pub struct Certified {
    pub device: DeviceId,
    /// Groups whose state did not fit in the bundle (the new device's
    /// first join there is checked against the epoch and transcript hash
    /// only).
    pub left_out: Vec<String>,
    pub history: HistorySent,
}

impl App {
    /// On the first device, once `code`'s link is open: waits (until
    /// `deadline`) for the new device's offer, certifies exactly the keys
    /// it offers with the account key, and answers with the certificate and
    /// the sealed bundle (account, `person`'s name, contacts, groups with
    /// this device's state of each). Remembers the device as `name`.
    /// With `history` other than none, it first syncs (so the history and
    /// the states handed over are as fresh as they can be), then packs and
    /// uploads the history (see [`App::hand_over_history`]).
    pub async fn certify_linked_device(
        &mut self,
        conn: &mut Connection,
        account: &Identity,
        code: &LinkCode,
        link: &DeviceLink<'_>,
        deadline: std::time::Instant,
        progress: &mut dyn Progress,
    ) -> Result<Certified, AppError> {
        let (name, person) = (link.name, link.person);
        if account.account_id() != self.account() {
            return Err(AppError::NotFirstDevice);
        }
        let offer = loop {
            if let Some(offer) = conn.link_fetch(code.id()).await? {
                break offer;
            }
            if std::time::Instant::now() >= deadline {
                return Err(AppError::LinkTimedOut);
            }
            tokio::time::sleep(LINK_POLL).await;
        };
        let offer = code.open_offer(&offer)?;
        let (device, mls_key) = (offer.device, offer.mls_key);
        let certificate = DeviceCertificate::issue(account, device, mls_key, now_unix());
        let (history_ref, history) = match (link.history, offer.history_key) {
            (HistoryChoice::None, _) => (None, HistorySent::NotAsked),
            (_, None) => (
                None,
                HistorySent::Failed("the new device's hush is older than history hand-over; update it first".into()),
            ),
            (choice, Some(key)) => {
                if let Err(e) = self.sync(conn).await {
                    tracing::warn!("could not sync before handing the history over: {e}");
                }
                match self.hand_over_history(conn, choice, progress).await {
                    (Some(r), sent) => match SealedHistory::seal(&r, &key, &code.id()) {
                        Ok(sealed) => (Some(sealed), sent),
                        Err(e) => (None, HistorySent::Failed(e.to_string())),
                    },
                    (None, sent) => (None, sent),
                }
            }
        };
        let mut groups = Vec::new();
        let mut states = Vec::new();
        for g in self.groups()?.into_iter().filter(|g| g.active) {
            let name = self.local.group_name(&g.id).ok().flatten().unwrap_or_default();
            let (epoch, transcript) = self.member.anchor(&g.id).unwrap_or_default();
            if let Some(state) = self.member.handover(&g.id)? {
                states.push((groups.len(), LinkHandover { seq: self.local.cursor(&g.id)?, state }));
            }
            groups.push(LinkedGroup { id: g.id, name, epoch, transcript, handover: None });
        }
        // The revocations this device holds, the account's own first: the
        // new device joins in epochs after they were sent into the groups.
        let mut revocations: Vec<(bool, Vec<u8>)> = self
            .local
            .revocations()?
            .into_iter()
            .filter_map(|bytes| DeviceRevocation::decode(&bytes).ok())
            .map(|r| (r.account != self.account(), r.encode()))
            .collect();
        revocations.sort();
        revocations.truncate(MAX_LINK_REVOCATIONS);
        let revocations = revocations.into_iter().map(|(_, r)| r).collect();
        let mut bundle = Bundle {
            account: self.account(),
            name: person.map(str::to_owned),
            contacts: self.contacts()?,
            groups,
            revocations,
            history: history_ref,
        };
        let left_out = fit_handovers(&mut bundle, states)?;
        conn.link_answer(code.id(), certificate.encode(), code.seal_bundle(&bundle)?).await?;
        self.local.name_device(&device, name)?;
        Ok(Certified { device, left_out, history })
    }

    /// Whether `name` can name a new device of this account here.
    pub fn check_device_name(&self, name: &str) -> Result<(), AppError> {
        if !valid_name(name) {
            return Err(AppError::DeviceName(format!("{name:?}: names are 1 to 64 printable characters")));
        }
        if self.local.device_names()?.iter().any(|(_, n)| n == name) {
            return Err(AppError::DeviceName(format!("a device is already called {name:?}")));
        }
        Ok(())
    }

    /// The account's devices as the server lists them, with the names this
    /// device gave them.
    pub async fn devices(&self, conn: &Connection) -> Result<Vec<DeviceLine>, AppError> {
        let names = self.local.device_names()?;
        let this = self.member.device();
        Ok(conn
            .devices()
            .await?
            .into_iter()
            .map(|d| DeviceLine {
                device: DeviceId(d.device),
                name: names.iter().find(|(id, _)| id.0 == d.device).map(|(_, n)| n.clone()),
                registered_at: d.registered_at,
                revoked: d.revoked,
                this: d.device == this.0,
            })
            .collect())
    }

    /// Revokes the device named `name` with the account key: the server
    /// refuses it at once and removes it from every group with the next
    /// commit there.
    pub async fn revoke_device(
        &mut self,
        conn: &Connection,
        account: &Identity,
        name: &str,
    ) -> Result<DeviceId, AppError> {
        if account.account_id() != self.account() {
            return Err(AppError::NotFirstDevice);
        }
        let device = self
            .local
            .device_names()?
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(d, _)| d)
            .ok_or_else(|| AppError::UnknownDevice(name.to_owned()))?;
        if device == self.member.device() {
            return Err(AppError::DeviceName("this is the device you are using".into()));
        }
        let revocation = DeviceRevocation::issue(account, device, now_unix());
        conn.revoke_device(&revocation).await?;
        // Kept first: whatever happens in any group below, this device
        // removes the revoked one from every group at each sync.
        self.learn_revocation(&revocation)?;
        // Members learn the revocation from the account itself, not from
        // the server (which could withhold it, or let the device back in):
        // in every group the device is in, the revocation goes out signed
        // by the account key, and this device commits its removal. One
        // group that fails (a server that breaks it, say) stops none of
        // the others; it is named at the end.
        let groups: Vec<GroupRow> = self.groups()?.into_iter().filter(|g| g.active).collect();
        let mut failed = Vec::new();
        for g in groups {
            match self.revoke_in(conn, &g, device, &revocation, name).await {
                Ok(()) => {}
                Err(e) if e.stops_sync() => return Err(e),
                Err(e) => {
                    tracing::warn!("could not send the revocation to a group: {e}");
                    let at = self.local.cursor(&g.id)?;
                    let line = format!(
                        "the revocation of your device {name} could not be sent to this group ({e}); this device removes it at its next sync"
                    );
                    self.record(&g.id, at, None, EntryKind::Event, &line)?;
                    failed.push(g.name.clone());
                }
            }
        }
        if !failed.is_empty() {
            return Err(AppError::DeviceName(format!(
                "{name} is revoked, but the revocation could not be sent to {}; `hush sync` removes it there",
                failed.join(", ")
            )));
        }
        Ok(device)
    }

    /// Sends `revocation` into one group the device is in (removing its
    /// leaf first), after reading the group up to date.
    async fn revoke_in(
        &mut self,
        conn: &Connection,
        g: &GroupRow,
        device: DeviceId,
        revocation: &DeviceRevocation,
        name: &str,
    ) -> Result<(), AppError> {
        self.sync_group(conn, &g.id, &mut Vec::new()).await?;
        if !self.member.devices(&g.id).contains(&device) {
            return Ok(());
        }
        // Sending removes the device's leaf first (it is revoked now).
        self.send_payload(conn, &g.id, &Payload::Revocation(revocation.encode())).await?;
        let me = self.account();
        let line = format!("you revoked your device {name}: it is out of the group, and members refuse it from now on");
        let at = self.local.cursor(&g.id)?;
        self.record(&g.id, at, Some(&me), EntryKind::Event, &line)?;
        Ok(())
    }

    /// Commits the removal of every leaf of `group` held by a device whose
    /// account revoked it (a revocation this device holds), if any; returns
    /// the commit's sequence and how many devices it removed.
    pub(super) async fn remove_revoked(
        &mut self,
        conn: &Connection,
        group: &[u8],
    ) -> Result<Option<(u64, usize)>, AppError> {
        let revoked = self.member.revoked_in(group);
        if revoked.is_empty() {
            return Ok(None);
        }
        let gid = group.to_vec();
        match self.send_commit(conn, &gid, |m| Ok(m.remove_devices(&gid, &revoked)?)).await {
            Ok(seq) => Ok(Some((seq, revoked.len()))),
            // Someone else's commit removed them meanwhile.
            Err(AppError::Mls(MlsError::NoneInGroup)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A linked device joins a group of its account that it holds no state
    /// for, by an external commit adding its own leaf; records that it did
    /// (or why it could not).
    ///
    /// Never a state the first device's does not lead to: the group's log
    /// after the first device's cursor is walked from the state it handed
    /// over ([`Descent`]), and only the state the walk reaches is joined, so
    /// neither the server nor anyone it hands a GroupInfo to (a removed
    /// member, say) can fork this device off. Without a handed-over state
    /// (it did not fit in the link), the join only refuses a state older
    /// than the first device's, and the event says it was not checked.
    pub(super) async fn join_linked(
        &mut self,
        conn: &Connection,
        group: &[u8],
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        let anchor = self.local.anchor(group)?;
        let handover = match self.local.handover(group)? {
            None => None,
            Some(bytes) => match LinkHandover::decode(&bytes)
                .map_err(|e| MlsError::Handover(e.to_string()))
                .and_then(|h| Ok((h.seq, Descent::from_handover(group, &h.state)?)))
            {
                Ok(h) => Some(h),
                Err(e) => return self.not_joined(group, &e.to_string(), new),
            },
        };
        let checked = handover.is_some();
        let mut walk = handover;
        let mut build = |m: &mut Member<Provider>, g: &[u8], info: &[u8], tree: Option<&[u8]>, d: Option<&Descent>| {
            m.join_external_after(g, info, tree, anchor.as_ref(), d)
        };
        let descent = walk.as_mut().map(|(seq, d)| (d, seq));
        match self.external_commit(conn, group, descent, &mut build).await? {
            External::Done { epoch, seq, .. } => {
                let body = if checked {
                    format!(
                        "this device joined the group at epoch {epoch}, checked commit by commit from your first device's state"
                    )
                } else {
                    format!(
                        "this device joined the group at epoch {epoch}; with no state of the group handed over (too large \
                         to hand over, or a restored backup), only that it is not older than what your other device had \
                         reached was checked: compare its members with another member"
                    )
                };
                self.local.forget_handover(group)?;
                self.external_landed(conn, group, seq, &body, new).await
            }
            // The account left the group meanwhile.
            External::NotMember => Ok(self.local.deactivate(group)?),
            External::Refused(error) => self.not_joined(group, &error, new),
        }
    }

    /// Records that this (linked) device could not join `group`, and why.
    fn not_joined(&mut self, group: &[u8], error: &str, new: &mut Vec<Entry>) -> Result<(), AppError> {
        tracing::warn!("could not join a group of this account: {error}");
        let at = self.local.cursor(group)?;
        let body = format!("this device could not join the group: {error}");
        new.push(self.record(group, at, None, EntryKind::Event, &body)?);
        // Kept active: the next sync tries again (a server that lied now
        // may serve the real log then), and `hush group rejoin` joins on
        // the user's word.
        Ok(())
    }
}

/// Puts as many groups' states into `bundle` as fit in a sealed bundle,
/// smallest first; returns the names of the groups left without one.
fn fit_handovers(bundle: &mut Bundle, mut states: Vec<(usize, LinkHandover)>) -> Result<Vec<String>, AppError> {
    let base = bundle.encode().map_err(|e| LinkError::TooLarge(e.to_string()))?;
    let mut room = MAX_LINK_BUNDLE.saturating_sub(SEAL_OVERHEAD + base.len());
    states.sort_by_key(|(_, h)| h.encoded_len());
    let mut left_out = Vec::new();
    for (i, h) in states {
        let Some(g) = bundle.groups.get_mut(i) else { continue };
        let need = h.encoded_len();
        // One the bundle's encoding would refuse (more proposals than it
        // carries: a large group's removals, say) is left out, never the
        // whole link.
        if need <= room && h.encode().is_ok() {
            room -= need;
            g.handover = Some(h);
        } else {
            left_out.push(g.name.clone());
        }
    }
    Ok(left_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::mls::Handover;
    use crate::limits::{MAX_HANDOVER_PROPOSALS, MAX_MLS_MESSAGE};

    fn group(name: &str) -> LinkedGroup {
        LinkedGroup {
            id: name.as_bytes().to_vec(),
            name: name.into(),
            epoch: 1,
            transcript: vec![1; 32],
            handover: None,
        }
    }

    /// Red team (session 30): a group whose state is larger than one MLS
    /// message (a GroupInfo with the tree of ~1,200 leaves) but fits in the
    /// bundle, or whose first device holds more pending proposals than a
    /// bundle carries (the server's removals, one per leaf of a large
    /// group), made the bundle's encoding fail: `hush device add` failed for
    /// every group of the account.
    #[test]
    fn a_state_the_bundle_cannot_carry_is_left_out_not_the_link() {
        let mut bundle = Bundle {
            account: AccountId([9; 32]),
            name: None,
            contacts: vec![],
            groups: vec![group("big"), group("removals"), group("small")],
            revocations: vec![],
            history: None,
        };
        let states = vec![
            (0, LinkHandover { seq: 1, state: Handover { info: vec![5; MAX_MLS_MESSAGE + 1024], proposals: vec![] } }),
            (
                1,
                LinkHandover {
                    seq: 1,
                    state: Handover { info: vec![5; 100], proposals: vec![vec![1; 8]; MAX_HANDOVER_PROPOSALS + 1] },
                },
            ),
            (2, LinkHandover { seq: 1, state: Handover { info: vec![5; 100], proposals: vec![] } }),
        ];
        let left_out = fit_handovers(&mut bundle, states).unwrap();
        let encoded = bundle.encode().expect("the bundle encodes");
        assert!(encoded.len() + SEAL_OVERHEAD <= MAX_LINK_BUNDLE);
        assert_eq!(left_out, ["removals"]);
        let back = Bundle::decode(&encoded).unwrap();
        assert!(back.groups[0].handover.is_some(), "a state up to the bundle's size is handed over");
        assert!(back.groups[2].handover.is_some());
    }
}

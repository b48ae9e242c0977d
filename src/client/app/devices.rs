//! The account's devices: certifying a new one through a link code (on the
//! first device, which holds the account key), listing and revoking them,
//! and a linked device joining its account's groups.

use std::time::Duration;

use super::sync::External;
use super::*;
use crate::auth::DeviceRevocation;
use crate::client::link::{Bundle, LinkCode, LinkedGroup};
use crate::client::local::valid_name;
use crate::client::mls::Descent;

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

impl App {
    /// On the first device, once `code`'s link is open: waits (until
    /// `deadline`) for the new device's offer, certifies exactly the keys
    /// it offers with the account key, and answers with the certificate and
    /// the sealed bundle (account, `person`'s name, contacts, group names).
    /// Remembers the device as `name`.
    pub async fn certify_linked_device(
        &mut self,
        conn: &Connection,
        account: &Identity,
        code: &LinkCode,
        name: &str,
        person: Option<&str>,
        deadline: std::time::Instant,
    ) -> Result<DeviceId, AppError> {
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
        let (device, mls_key) = code.open_offer(&offer)?;
        let certificate = DeviceCertificate::issue(account, device, mls_key, now_unix());
        let mut groups = Vec::new();
        for g in self.groups()?.into_iter().filter(|g| g.active) {
            let name = self.local.group_name(&g.id).ok().flatten().unwrap_or_default();
            let (epoch, transcript) = self.member.anchor(&g.id).unwrap_or_default();
            groups.push(LinkedGroup { id: g.id, name, epoch, transcript });
        }
        let bundle =
            Bundle { account: self.account(), name: person.map(str::to_owned), contacts: self.contacts()?, groups };
        conn.link_answer(code.id(), certificate.encode(), code.seal_bundle(&bundle)?).await?;
        self.local.name_device(&device, name)?;
        Ok(device)
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
    pub(super) async fn join_linked(
        &mut self,
        conn: &Connection,
        group: &[u8],
        new: &mut Vec<Entry>,
    ) -> Result<(), AppError> {
        // Never a state older than the one the first device handed over.
        let anchor = self.local.anchor(group)?;
        let mut build = |m: &mut Member<Provider>, g: &[u8], info: &[u8], tree: Option<&[u8]>, _: Option<&Descent>| {
            m.join_external_after(g, info, tree, anchor.as_ref())
        };
        match self.external_commit(conn, group, None, &mut build).await? {
            External::Done { epoch, seq } => {
                let body = format!("this device joined the group at epoch {epoch}");
                self.external_landed(conn, group, seq, &body, new).await
            }
            // The account left the group meanwhile.
            External::NotMember => Ok(self.local.deactivate(group)?),
            External::Refused(error) => {
                tracing::warn!("could not join a group of this account: {error}");
                let at = self.local.cursor(group)?;
                let body = format!("this device could not join the group: {error}");
                new.push(self.record(group, at, None, EntryKind::Event, &body)?);
                Ok(self.local.deactivate(group)?)
            }
        }
    }
}

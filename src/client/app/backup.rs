//! Backups in the app (issue 34): what this device puts in a backup, and
//! how a restored home takes it back ([`crate::client::backup`] is the
//! file format, [`crate::client::home::Home::restore`] the restore).

use super::*;
use crate::client::backup::{Backup, GroupBackup};

impl App {
    /// Everything of this account and device a backup holds (see
    /// [`crate::client::backup`]); `account_key` is this home's (only the
    /// account's first device, or a home restored from its backup, has
    /// one). Messages whose disappearing timer ran out are left out.
    pub fn export_backup(&mut self, account_key: &Identity, name: Option<String>) -> Result<Backup, AppError> {
        let now = now_unix();
        let mut groups = Vec::new();
        for g in self.local.groups()? {
            let history =
                self.local.history(&g.id)?.into_iter().filter(|r| r.expires.is_none_or(|t| t > now)).collect();
            let files = self.local.files(&g.id)?.into_iter().filter(|r| r.expires.is_none_or(|t| t > now)).collect();
            let anchor = self.member.anchor(&g.id).or(self.local.anchor(&g.id)?);
            groups.push(GroupBackup {
                id: g.id.clone(),
                name: g.name.clone(),
                active: g.active,
                anchor,
                history,
                files,
            });
        }
        Ok(Backup {
            account_key: account_key.seed(),
            device: self.member.device(),
            server: self.server.to_string(),
            name,
            contacts: self.local.contacts()?,
            device_names: self.local.device_names()?,
            revocations: self.local.revocations()?,
            groups,
        })
    }

    /// Takes a backup's contacts, device names, revocations, groups (with
    /// the state each had reached, which this device's first join may not
    /// go back from) and history into this (new) home. The device that
    /// made the backup is named `previous-device` (or the name it had).
    /// Returns (contacts, groups, history lines).
    pub fn import_backup(&mut self, backup: &Backup) -> Result<(usize, usize, usize), AppError> {
        let unit = self.local.unit()?;
        let contacts = self.take_over(&backup.revocations, &backup.contacts)?;
        for (device, name) in &backup.device_names {
            if valid_name(name) && *device != self.member.device() {
                self.local.name_device(device, name.trim())?;
            }
        }
        if !backup.device_names.iter().any(|(d, _)| *d == backup.device) {
            self.local.name_device(&backup.device, PREVIOUS_DEVICE)?;
        }
        let now = now_unix();
        let mut lines = 0;
        for g in &backup.groups {
            let name = g.name.as_deref().filter(|n| valid_name(n));
            self.local.put_group(&g.id, name, 0, now)?;
            if !g.active {
                self.local.deactivate(&g.id)?;
            }
            if let Some((epoch, transcript)) = &g.anchor {
                self.local.put_anchor(&g.id, *epoch, transcript)?;
            }
            for row in g.history.iter().filter(|r| r.expires.is_none_or(|t| t > now)) {
                self.local.record(&g.id, &HistoryRow { imported: true, ..row.clone() })?;
                lines += 1;
            }
            for row in g.files.iter().filter(|r| r.expires.is_none_or(|t| t > now)) {
                self.local.add_file(&g.id, row)?;
            }
        }
        unit.commit()?;
        Ok((contacts, backup.groups.len(), lines))
    }
}

/// What a restored home calls the device its backup came from.
pub const PREVIOUS_DEVICE: &str = "previous-device";

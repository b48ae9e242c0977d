//! Linking a new device to an account through the server, which relays
//! ciphertext only.
//!
//! The first device (which holds the account key) opens a link under an id
//! derived from a one-time secret it shows its person as a code; the server
//! never sees the secret. The new device, a key that is not a device yet,
//! offers its public keys sealed under a key derived from the secret; the
//! server records which key offered (once per link). The first device
//! fetches the offer, opens it, signs a device certificate for exactly those
//! keys and answers with it and a bundle (contacts, group names) sealed
//! under another key derived from the secret. The server checks the
//! certificate (the link's account, the key that offered, a valid
//! signature), registers the device, and hands the answer to the offering
//! key (and no other) until the link expires. Links expire ([`crate::limits::MAX_LINK_LIFETIME`] at most)
//! and an account has at most [`MAX_OPEN_LINKS`] open. The device caps
//! hold when a device is certified, not only when its link opened.
//!
//! What the server learns: that an account links a device, when, and the
//! new device's key (it must, to let it connect). Not the contacts, not the
//! group names, not the secret.

use super::storage::{DeviceRecord, LinkRecord};
use super::{refuse, Caller, Delivery, Outcome, Refusal, Storage};
use crate::auth::{AccountId, DeviceCertificate, DeviceId};
use crate::limits::{MAX_DEVICES_EVER, MAX_DEVICES_PER_ACCOUNT, MAX_LINK_LIFETIME, MAX_OPEN_LINKS};
use crate::wire::{ErrorCode, Response};

fn unknown<E>() -> Refusal<E> {
    refuse(ErrorCode::LinkUnknown, "no such link code on this server")
}

fn expired<E>() -> Refusal<E> {
    refuse(ErrorCode::LinkExpired, "the link code expired; make a new one with `hush device add`")
}

fn used<E>() -> Refusal<E> {
    refuse(ErrorCode::LinkUsed, "the link code was already used; make a new one with `hush device add`")
}

impl Delivery {
    /// Whether `account` may have one more device: fewer than
    /// [`MAX_DEVICES_EVER`] ever (revoked ones count) and fewer than
    /// [`MAX_DEVICES_PER_ACCOUNT`] now. Checked when a link opens (to
    /// refuse early) and again when it is answered, in the unit that
    /// registers the device: several links opened under the caps cannot
    /// all be answered past them (issue 29).
    pub(super) fn room_for_a_device<S: Storage>(store: &mut S, account: &AccountId) -> Result<(), Refusal<S::Error>> {
        let all = store.devices_of(account)?;
        if all.len() >= MAX_DEVICES_EVER {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("the account has had {} devices, the most this server keeps for one account", all.len()),
            ));
        }
        let devices = all.iter().filter(|(_, d)| d.revoked_at.is_none()).count();
        if devices >= MAX_DEVICES_PER_ACCOUNT {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("the account has {devices} devices, the most it may; revoke one first"),
            ));
        }
        Ok(())
    }

    pub(super) fn link_open<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
        expires_in: u32,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let lifetime = u64::from(expires_in);
        if lifetime == 0 || lifetime > MAX_LINK_LIFETIME.as_secs() {
            return Err(refuse(
                ErrorCode::Malformed,
                format!("a link lasts 1 to {} seconds", MAX_LINK_LIFETIME.as_secs()),
            ));
        }
        Self::room_for_a_device(store, &caller.account)?;
        if store.open_links(&caller.account, now)? >= MAX_OPEN_LINKS {
            return Err(refuse(ErrorCode::QuotaExceeded, "too many link codes open; wait until one expires"));
        }
        if store.link(&id)?.is_some() {
            return Err(used());
        }
        let link = LinkRecord {
            id,
            account: caller.account,
            created_at: now,
            expires_at: now.saturating_add(lifetime),
            device: None,
            offer: None,
            answer: None,
        };
        store.insert_link(&link)?;
        Ok(Outcome::wrote(Response::Done, vec![]))
    }

    /// From a key that is not a device yet.
    pub(super) fn link_offer<S: Storage>(
        &mut self,
        store: &mut S,
        device: DeviceId,
        id: [u8; 16],
        offer: &[u8],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let link = store.link(&id)?.ok_or_else(unknown)?;
        if link.expires_at <= now {
            return Err(expired());
        }
        if link.offer.is_some() {
            return Err(used());
        }
        if store.device(&device)?.is_some() {
            return Err(refuse(
                ErrorCode::InvalidCredential,
                "this key is already a device; a new device needs new keys",
            ));
        }
        if !store.set_link_offer(&id, &device, offer)? {
            return Err(used());
        }
        Ok(Outcome::wrote(Response::Done, vec![]))
    }

    /// The caller's account's link, not expired.
    fn own_link<S: Storage>(
        store: &mut S,
        caller: &Caller,
        id: &[u8; 16],
        now: u64,
    ) -> Result<LinkRecord, Refusal<S::Error>> {
        // Another account's link is "unknown": ids say nothing to strangers.
        let link = store.link(id)?.filter(|l| l.account == caller.account).ok_or_else(unknown)?;
        if link.expires_at <= now {
            return Err(expired());
        }
        Ok(link)
    }

    pub(super) fn link_fetch<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let link = Self::own_link(store, caller, &id, now)?;
        Ok(Outcome::reply(match link.offer {
            Some(offer) if link.answer.is_none() => Response::LinkOffer { offer },
            Some(_) => return Err(used()),
            None => Response::LinkPending,
        }))
    }

    pub(super) fn link_answer<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        id: [u8; 16],
        certificate: &[u8],
        bundle: &[u8],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let link = Self::own_link(store, caller, &id, now)?;
        let Some(device) = link.device else {
            return Err(refuse(ErrorCode::LinkUnknown, "no device has used this link code yet"));
        };
        if link.answer.is_some() {
            return Err(used());
        }
        let cert = DeviceCertificate::decode(certificate)
            .map_err(|e| refuse(ErrorCode::InvalidCredential, format!("device certificate: {e}")))?;
        if cert.account != caller.account || cert.device != device {
            return Err(refuse(
                ErrorCode::InvalidCredential,
                "the certificate must be for this account and the key that used the link code",
            ));
        }
        if store.device(&device)?.is_some() {
            return Err(refuse(ErrorCode::InvalidCredential, "that key is already a device"));
        }
        // Other nodes sharing the database wait here until this unit
        // commits, so their count includes this device.
        store.lock_account(&caller.account)?;
        Self::room_for_a_device(store, &caller.account)?;
        if !store.set_link_answer(&id, certificate, bundle)? {
            return Err(used());
        }
        store.insert_device(&device, &DeviceRecord::new(caller.account, cert.encode(), now))?;
        tracing::debug!("device linked");
        Ok(Outcome::wrote(Response::Done, vec![]))
    }

    /// From the key that offered (registered by now, or not yet).
    pub(super) fn link_result<S: Storage>(
        &mut self,
        store: &mut S,
        device: DeviceId,
        id: [u8; 16],
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let link = store.link(&id)?.filter(|l| l.device == Some(device)).ok_or_else(unknown)?;
        match link.answer {
            // Kept until the link expires, so an answer lost on the way
            // can be fetched again (by the same key only); retention then
            // deletes the row.
            Some((certificate, bundle)) => Ok(Outcome::reply(Response::Linked { certificate, bundle })),
            None if link.expires_at <= now => Err(expired()),
            None => Ok(Outcome::reply(Response::LinkPending)),
        }
    }
}

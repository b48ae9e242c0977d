//! KeyPackages: uploads (validated, certified for the uploading device)
//! and claims (one package per device of the claimed account, rate-limited
//! per claimer).

use std::collections::BTreeSet;
use std::time::Duration;

use super::{mls, refuse, Caller, Delivery, NewKeyPackage, Outcome, Refusal, Storage};
use crate::auth::{AccountId, DeviceId};
use crate::limits::{CLAIM_BURST, CLAIM_REFILL, MAX_DEVICES_PER_ACCOUNT, MAX_KEY_PACKAGES};
use crate::mls::Suite;
use crate::util::TokenBucket;
use crate::wire::{ErrorCode, Response};

impl Delivery {
    /// How many KeyPackages the caller's device has left, and whether it
    /// has a last-resort one.
    pub(super) fn count_key_packages<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        suite: u16,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let suite = known_suite(suite)?;
        let (count, last_resort) = store.key_package_count(&caller.device, suite)?;
        Ok(Outcome::reply(Response::KeyPackageCount { count, last_resort }))
    }

    pub(super) fn publish<S: Storage>(
        &mut self,
        store: &mut S,
        caller: &Caller,
        packages: &[Vec<u8>],
        last_resort: Option<u16>,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        if packages.is_empty() {
            return Err(refuse(ErrorCode::InvalidKeyPackage, "no KeyPackages in the upload"));
        }
        let last_resort = last_resort.map(usize::from);
        if last_resort.is_some_and(|i| i >= packages.len()) {
            return Err(refuse(ErrorCode::Malformed, "the last-resort index is outside the upload"));
        }
        // Before any package is verified (on the writer, up to 100 of
        // them): an upload that cannot fit in the suite its first package
        // names is refused as the check below would refuse it (red team,
        // issue 37: a full device's upload, sent again and again, cost a
        // verification per package each time). Every package is then
        // verified to be of that suite.
        self.check_space(store)?;
        let named = packages
            .first()
            .and_then(|p| p.get(2..4))
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_be_bytes);
        if let Some(suite) = named.and_then(|code| Suite::from_code(code).ok()) {
            let distinct: BTreeSet<&[u8]> = packages.iter().map(Vec::as_slice).collect();
            let adding_at_least = distinct.len().saturating_sub(usize::from(last_resort.is_some()));
            let held = usize::try_from(store.key_package_count(&caller.device, suite)?.0).unwrap_or(usize::MAX);
            if held.saturating_add(adding_at_least) > MAX_KEY_PACKAGES {
                return Err(too_many_key_packages(held));
            }
        }
        let mut new = Vec::with_capacity(packages.len());
        let mut seen = BTreeSet::new();
        let mut upload_suite = None;
        for (i, data) in packages.iter().enumerate() {
            let detail = u64::try_from(i).unwrap_or(u64::MAX);
            let (hash_ref, suite) = mls::validate_key_package(&self.crypto, data, &caller.account, &caller.device)
                .map_err(|e| match e {
                    mls::KeyPackageError::Invalid(m) => Refusal::Client {
                        code: ErrorCode::InvalidKeyPackage,
                        detail,
                        message: format!("KeyPackage {i}: {m}"),
                    },
                    mls::KeyPackageError::Credential(m) => Refusal::Client {
                        code: ErrorCode::InvalidCredential,
                        detail,
                        message: format!("KeyPackage {i}: {m}"),
                    },
                })?;
            if *upload_suite.get_or_insert(suite) != suite {
                return Err(Refusal::Client {
                    code: ErrorCode::Malformed,
                    detail,
                    message: format!("KeyPackage {i} is of another ciphersuite: upload one suite at a time"),
                });
            }
            if seen.insert(hash_ref.clone()) {
                new.push(NewKeyPackage { hash_ref, data: data.clone(), last_resort: last_resort == Some(i), suite });
            }
        }
        let suite = upload_suite.unwrap_or(Suite::Classic);
        let (held, _) = store.key_package_count(&caller.device, suite)?;
        let held = usize::try_from(held).unwrap_or(usize::MAX);
        let adding = new.iter().filter(|p| !p.last_resort).count();
        if held.saturating_add(adding) > MAX_KEY_PACKAGES {
            return Err(too_many_key_packages(held));
        }
        store.add_key_packages(&caller.account, &caller.device, &new, now)?;
        let (count, last_resort) = store.key_package_count(&caller.device, suite)?;
        Ok(Outcome::wrote(Response::KeyPackageCount { count, last_resort }, vec![]))
    }

    pub(super) fn claim<S: Storage>(
        &mut self,
        store: &mut S,
        claimer: &AccountId,
        target: &AccountId,
        suite: u16,
        now: u64,
    ) -> Result<Outcome, Refusal<S::Error>> {
        let suite = known_suite(suite)?;
        let (rate, burst, now_s) = claim_bucket(now);
        let bucket = self.claims.entry(*claimer).or_insert_with(|| TokenBucket::full(burst, now_s));
        if let Err(wait) = bucket.refill(rate, burst, now_s) {
            // Whole seconds, rounded up, at least one.
            let wait = Duration::from_secs_f64(wait);
            let wait = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0)).max(1);
            return Err(Refusal::Client {
                code: ErrorCode::RateLimited,
                detail: wait.saturating_mul(1000),
                message: format!("too many KeyPackage claims; retry in {wait} s"),
            });
        }
        let no_package = || refuse(ErrorCode::NoKeyPackage, "that account has no KeyPackage available");
        if !store.account_exists(target)? {
            return Err(no_package());
        }
        // All of the person's devices or none (red team, issue 35): a
        // commit adding only some of them is refused anyway, and the
        // packages claimed for the others would be spent for nothing.
        let devices = store.devices_of(target)?;
        let current: Vec<&DeviceId> = devices.iter().filter(|(_, r)| r.revoked_at.is_none()).map(|(d, _)| d).collect();
        let mut lacking = 0;
        for device in &current {
            if store.key_package_count(device, suite)? == (0, false) {
                lacking += 1;
            }
        }
        if lacking > 0 && lacking < current.len() {
            return Err(refuse(
                ErrorCode::NoKeyPackage,
                format!(
                    "{lacking} of that account's {} devices have no {suite} KeyPackage available (an older client, \
                     or one that has not synced yet); nothing was claimed",
                    current.len()
                ),
            ));
        }
        let mut packages = store.claim_key_packages(target, suite, now)?;
        if packages.is_empty() {
            return Err(no_package());
        }
        packages.truncate(MAX_DEVICES_PER_ACCOUNT);
        bucket.spend();
        Ok(Outcome::wrote(Response::KeyPackages { packages }, vec![]))
    }
}

/// A ciphersuite a request names, if hush speaks it.
fn known_suite<E>(code: u16) -> Result<Suite, Refusal<E>> {
    Suite::from_code(code).map_err(|e| refuse(ErrorCode::Malformed, e.to_string()))
}

/// The claim bucket's (rate per second, burst) and `now` on its clock: a
/// burst of [`CLAIM_BURST`], then one claim per [`CLAIM_REFILL`].
pub(super) fn claim_bucket(now: u64) -> (f64, f64, f64) {
    let refill = CLAIM_REFILL.as_secs_f64().max(1.0);
    #[allow(clippy::cast_precision_loss)] // Unix seconds fit an f64 exactly for 285 million years.
    let now = now as f64;
    (1.0 / refill, f64::from(CLAIM_BURST), now)
}

fn too_many_key_packages<E>(held: usize) -> Refusal<E> {
    refuse(ErrorCode::QuotaExceeded, format!("at most {MAX_KEY_PACKAGES} KeyPackages per device; you hold {held}"))
}

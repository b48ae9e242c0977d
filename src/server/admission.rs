//! Connection admission: counts of live connections (total and per source
//! IP) and of handshakes in progress, each held by a guard that gives its
//! slot back when dropped, whatever path the connection task takes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::limits::RATE_LIMIT_ENTRIES;
use crate::util::TokenBucket;

/// Live counters shared by the accept loop and connection tasks.
#[derive(Debug, Default)]
pub struct Admission {
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    unregistered: Arc<Mutex<Strangers>>,
    total: AtomicU32,
    pending: AtomicU32,
}

/// Connections whose key is not a registered device: per address and in
/// total.
#[derive(Debug, Default)]
struct Strangers {
    per_ip: HashMap<IpAddr, u32>,
    total: u32,
}

/// Why a connection attempt was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl Admission {
    /// Takes a connection slot for `ip`, if both caps allow it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max_total: u32, max_per_ip: u32) -> Result<ConnectionSlot, Refusal> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= max_total {
            return Err(Refusal::Total);
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot { admission: self.clone(), ip })
    }

    /// Takes a slot for a connection whose key is not an account yet, if
    /// neither its address's cap nor the total cap is reached; it is given
    /// back when the guard drops (registration or disconnect).
    pub fn unregistered(&self, ip: IpAddr, max_per_ip: u32, max_total: u32) -> Option<UnregisteredSlot> {
        let mut strangers = self.unregistered.lock().unwrap_or_else(|p| p.into_inner());
        if strangers.total >= max_total {
            return None;
        }
        let n = strangers.per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return None;
        }
        *n += 1;
        strangers.total += 1;
        Some(UnregisteredSlot { strangers: self.unregistered.clone(), ip })
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Marks a handshake in progress until the guard drops.
    pub fn handshake(self: &Arc<Self>) -> HandshakeSlot {
        self.pending.fetch_add(1, Ordering::Relaxed);
        HandshakeSlot { admission: self.clone() }
    }

    /// Live connections in total.
    pub fn connections(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }
}

/// One admitted connection; frees its slot on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.admission.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One unregistered connection; frees its slot on drop.
#[derive(Debug)]
pub struct UnregisteredSlot {
    strangers: Arc<Mutex<Strangers>>,
    ip: IpAddr,
}

impl Drop for UnregisteredSlot {
    fn drop(&mut self) {
        let mut strangers = self.strangers.lock().unwrap_or_else(|p| p.into_inner());
        strangers.total = strangers.total.saturating_sub(1);
        if let Some(n) = strangers.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                strangers.per_ip.remove(&self.ip);
            }
        }
    }
}

/// One handshake in progress; frees its slot on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    admission: Arc<Admission>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.admission.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Token buckets per key (account or IP address): `rate` requests per
/// second sustained, bursts of twice that. Memory is bounded: past
/// [`RATE_LIMIT_ENTRIES`] keys, full (idle) buckets are forgotten.
#[derive(Debug)]
pub struct RateLimiter<K> {
    buckets: Mutex<HashMap<K, TokenBucket>>,
    /// The origin of the buckets' clock.
    origin: std::time::Instant,
    rate: f64,
    burst: f64,
}

impl<K: std::hash::Hash + Eq + Copy> RateLimiter<K> {
    pub fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self { buckets: Mutex::new(HashMap::new()), origin: std::time::Instant::now(), rate, burst: rate * 2.0 }
    }

    /// Takes one token for `key`; when none is left, says how long until one is.
    pub fn check(&self, key: K, now: std::time::Instant) -> Result<(), std::time::Duration> {
        let now = now.saturating_duration_since(self.origin).as_secs_f64();
        let (rate, burst) = (self.rate, self.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= RATE_LIMIT_ENTRIES && !buckets.contains_key(&key) {
            buckets.retain(|_, b| !b.is_full(rate, burst, now));
        }
        let bucket = buckets.entry(key).or_insert_with(|| TokenBucket::full(burst, now));
        bucket.take(rate, burst, now).map_err(std::time::Duration::from_secs_f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_refill_at_the_rate() {
        let limiter = RateLimiter::new(10);
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            assert!(limiter.check(1u8, t0).is_ok());
        }
        let wait = limiter.check(1u8, t0).unwrap_err();
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_millis(100));
        assert!(limiter.check(2u8, t0).is_ok(), "keys are independent");
        assert!(limiter.check(1u8, t0 + std::time::Duration::from_millis(150)).is_ok());
    }

    #[test]
    fn caps_and_release() {
        let a = Arc::new(Admission::default());
        let ip1: IpAddr = "127.0.0.1".parse().unwrap();
        let ip2: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = a.admit(ip1, 3, 2).unwrap();
        let _s2 = a.admit(ip1, 3, 2).unwrap();
        assert_eq!(a.admit(ip1, 3, 2).unwrap_err(), Refusal::PerIp);
        let _s3 = a.admit(ip2, 3, 2).unwrap();
        assert_eq!(a.admit(ip2, 3, 2).unwrap_err(), Refusal::Total);
        drop(s1);
        assert!(a.admit(ip1, 3, 2).is_ok());
        let h = a.handshake();
        assert_eq!(a.pending(), 1);
        drop(h);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn strangers_are_capped_per_address_and_in_total() {
        let a = Admission::default();
        let ip1: IpAddr = "127.0.0.1".parse().unwrap();
        let ip2: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = a.unregistered(ip1, 2, 3).unwrap();
        let _s2 = a.unregistered(ip1, 2, 3).unwrap();
        assert!(a.unregistered(ip1, 2, 3).is_none(), "per address");
        let _s3 = a.unregistered(ip2, 2, 3).unwrap();
        assert!(a.unregistered(ip2, 2, 3).is_none(), "in total");
        drop(s1);
        assert!(a.unregistered(ip2, 2, 3).is_some());
    }
}

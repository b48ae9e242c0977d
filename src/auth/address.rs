//! Server fingerprints, account ids and `hush://` addresses.
//!
//! * A server **fingerprint** is the SHA-256 of the server certificate's
//!   SubjectPublicKeyInfo, written as 52 base32 characters in 13 dash-joined
//!   groups of four (`abcd-efgh-…`) so two people can read it to each other.
//! * An **account id** is the account's raw 32-byte Ed25519 public key as 52
//!   base32 characters, without separators, so it can be copied whole.
//! * An **address** is `hush://HOST:PORT/#FINGERPRINT`. `HOST` is a DNS
//!   name, an IPv4 address or a bracketed IPv6 address. The fingerprint may
//!   be written with or without dashes.

use std::fmt;
use std::str::FromStr;

use subtle::ConstantTimeEq;
use thiserror::Error;

use super::text::{self, TextError};
use crate::limits::MAX_ADDRESS_LEN;

/// SHA-256 of a SubjectPublicKeyInfo: what a client pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// Constant-time comparison.
    pub fn matches(&self, other: &Fingerprint) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::grouped(&text::encode(&self.0), 4))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TextError;
    fn from_str(s: &str) -> Result<Self, TextError> {
        text::decode_array(s).map(Self)
    }
}

/// A 32-byte public key used as an id (accounts, devices): written as 52
/// base32 characters, shown short as its first 16 grouped in fours.
macro_rules! key_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The short form people compare: the first 16 characters, grouped.
            pub fn short(&self) -> String {
                let full = $crate::auth::text::encode(&self.0);
                $crate::auth::text::grouped(full.get(..16).unwrap_or(&full), 4)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&$crate::auth::text::encode(&self.0))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::auth::text::TextError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::auth::text::decode_array(s).map(Self)
            }
        }
    };
}
pub(crate) use key_id;

key_id! {
    /// An account: the raw Ed25519 public key of the account key.
    AccountId
}

/// Why a `hush://` address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("the address is longer than {MAX_ADDRESS_LEN} characters")]
    TooLong,
    #[error("the address must start with hush://")]
    Scheme,
    #[error("the address has no #FINGERPRINT part")]
    NoFingerprint,
    #[error("the host is missing or malformed")]
    Host,
    #[error("the port is missing or not a number from 1 to 65535")]
    Port,
    #[error("the fingerprint is malformed: {0}")]
    Fingerprint(TextError),
}

/// Where a server is and which key it must present.
#[derive(Clone, PartialEq, Eq)]
pub struct HushAddress {
    /// DNS name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    pub fingerprint: Fingerprint,
}

impl fmt::Display for HushAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "hush://[{}]:{}/#{}", self.host, self.port, self.fingerprint)
        } else {
            write!(f, "hush://{}:{}/#{}", self.host, self.port, self.fingerprint)
        }
    }
}

impl fmt::Debug for HushAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for HushAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        if s.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        let s = s.trim();
        let rest = s
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("hush://"))
            .and_then(|_| s.get(7..))
            .ok_or(AddressError::Scheme)?;
        let (authority, fragment) = rest.split_once('#').ok_or(AddressError::NoFingerprint)?;
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            // An IPv6 address, which must be bracketed.
            let (host, after) = v6.split_once(']').ok_or(AddressError::Host)?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(AddressError::Host);
            }
            (host, after.strip_prefix(':').ok_or(AddressError::Port)?)
        } else {
            // A DNS name or IPv4 address: no colon may remain in it
            // (regression: fuzz finding 1, `a::1` parsed as host `a:`).
            let (host, port) = authority.rsplit_once(':').ok_or(AddressError::Port)?;
            if !is_host_name(host) {
                return Err(AddressError::Host);
            }
            (host, port)
        };
        if !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(AddressError::Port);
        }
        let port: u16 = port.parse().map_err(|_| AddressError::Port)?;
        if port == 0 {
            return Err(AddressError::Port);
        }
        let fingerprint = fragment.parse().map_err(AddressError::Fingerprint)?;
        Ok(Self { host: host.to_ascii_lowercase(), port, fingerprint })
    }
}

/// A host a `hush://` address or `public_host` may name without brackets:
/// a DNS name or an IPv4 address (1 to 253 letters, digits, `.`, `-`,
/// `_`). An IPv6 address has colons and is written in brackets.
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A host `hush://` addresses can carry: [`is_host_name`] or an IPv6
/// address.
pub fn is_host(host: &str) -> bool {
    if host.contains(':') {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        is_host_name(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fpr() -> Fingerprint {
        Fingerprint::of_spki(b"example")
    }

    #[test]
    fn parses_what_it_prints() {
        for host in ["example.org", "127.0.0.1", "::1", "fe80::1"] {
            let a = HushAddress { host: host.into(), port: 7443, fingerprint: fpr() };
            let text = a.to_string();
            assert_eq!(text.parse::<HushAddress>().unwrap(), a, "{text}");
        }
    }

    #[test]
    fn accepts_fingerprint_without_dashes_and_in_upper_case() {
        let plain = text::encode(&fpr().0).to_uppercase();
        let a: HushAddress = format!("HUSH://Host.Example:1/#{plain}").parse().unwrap();
        assert_eq!(a.fingerprint, fpr());
        assert_eq!(a.host, "host.example");
    }

    #[test]
    fn rejects_broken_addresses() {
        let f = fpr();
        for bad in [
            format!("http://h:1/#{f}"),
            "hush://h:1/".to_string(),
            format!("hush://h/#{f}"),
            format!("hush://h:0/#{f}"),
            format!("hush://h:99999/#{f}"),
            format!("hush://:1/#{f}"),
            format!("hush://[zz]:1/#{f}"),
            format!("hush://h h:1/#{f}"),
            "hush://h:1/#abc".to_string(),
        ] {
            assert!(bad.parse::<HushAddress>().is_err(), "{bad}");
        }
    }

    /// Fuzz finding 1 (audit/FINDINGS.md): an unbracketed host with a colon
    /// parsed, but printed bracketed and then failed to parse.
    #[test]
    fn finding_1_unbracketed_host_with_colon_is_refused() {
        let text = "hush://chg1-b9te-18sp-07g1-b9te-18srat.example.nrg::721/#1yb9-bkqr-24aj-qr6y-z9jp-07g1-b9te-18sr-7tjg-6cw6-b0sb-sdpy-hzgg";
        assert_eq!(text.parse::<HushAddress>(), Err(AddressError::Host));
        let f = fpr();
        assert!(format!("hush://::1:7443/#{f}").parse::<HushAddress>().is_err());
        assert!(format!("hush://[::1]:7443/#{f}").parse::<HushAddress>().is_ok());
    }

    proptest! {
        #[test]
        fn printed_addresses_parse_back(host in "[a-z0-9:.\\-\\[\\]]{1,20}", port in 1u16..) {
            let text = format!("hush://{host}:{port}/#{}", fpr());
            if let Ok(a) = text.parse::<HushAddress>() {
                prop_assert_eq!(a.to_string().parse::<HushAddress>(), Ok(a));
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,120}") {
            let _ = s.parse::<HushAddress>();
            let _ = format!("hush://{s}").parse::<HushAddress>();
        }
    }
}

//! Who is who: server identity, account keys, device keys and device
//! certificates, addresses, invites.
//!
//! Authentication happens inside the TLS 1.3 handshake (see [`tls`]): the
//! server proves its pinned key, the client proves its device key, and
//! neither side uses certificate authorities, passwords or bearer tokens.
//! The device key maps to an account through the device's certificate
//! ([`device`]), signed by the account key, which never leaves the person's
//! first device and never touches TLS.

pub mod address;
pub mod cert;
pub mod device;
pub mod identity;
pub mod invite;
pub mod online;
pub mod text;
pub mod tls;

pub use address::{AccountId, AddressError, Fingerprint, HushAddress};
pub use device::{CredentialError, DeviceCertificate, DeviceId, DeviceRevocation};
pub use identity::{Identity, KeyError};
pub use invite::{InviteError, InviteToken};

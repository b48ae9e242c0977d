//! Who is who: server identity, client account keys, addresses, invites.
//!
//! Authentication happens inside the TLS 1.3 handshake (see [`tls`]): the
//! server proves its pinned key, the client proves its account key, and
//! neither side uses certificate authorities, passwords or bearer tokens.

pub mod address;
pub mod cert;
pub mod identity;
pub mod invite;
pub mod text;
pub mod tls;

pub use address::{AccountId, AddressError, Fingerprint, HushAddress};
pub use identity::{Identity, KeyError};
pub use invite::{InviteError, InviteToken};

//! hush: a self-hosted relay (MLS Delivery Service) for end-to-end-encrypted
//! group chat.
//!
//! Layout, with dependencies pointing down:
//!
//! * [`wire`]: the protocol's frames and their pure, non-panicking codecs.
//! * [`auth`]: keys, certificates, fingerprints, addresses, invite tokens,
//!   and the TLS configuration that authenticates both ends.
//! * [`delivery`]: the Delivery Service rules, sans-IO: a request, an
//!   authenticated device and the time in; a response and the pushes out;
//!   storage behind a trait.
//! * [`store`]: SQLite persistence: the delivery storage on a connection,
//!   accounts, devices and invites, schema migrations, maintenance.
//! * [`server`]: the QUIC listener, per-connection sessions, admission
//!   limits and graceful shutdown (`hushd`); [`server::engine`] runs the
//!   delivery core on the database's writer and reader threads.
//! * [`client`]: connecting, authenticating and making requests (`hush`,
//!   tests).
//! * [`config`] and [`limits`]: every tunable value and hard cap.
//! * [`sqlite`]: how both sides open and migrate their SQLite files.
#![forbid(unsafe_code)]

pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
pub mod client;
pub mod config;
pub mod delivery;
pub mod limits;
pub mod server;
pub mod sqlite;
pub mod store;
pub mod util;
pub mod wire;

//! hush: a self-hosted relay (MLS Delivery Service) for end-to-end-encrypted
//! group chat.
//!
//! Layout, with dependencies pointing down:
//!
//! * [`wire`]: the protocol's frames and their pure, non-panicking codecs.
//! * [`auth`]: keys, certificates, fingerprints, addresses, invite tokens,
//!   and the TLS configuration that authenticates both ends.
//! * [`delivery`]: the Delivery Service rules, sans-IO: a request, who
//!   sends it (a registered device or a key registering) and the time in;
//!   a response and the pushes out. Everything the server persists sits
//!   behind one trait ([`delivery::Storage`]), units of work behind
//!   [`delivery::storage::Backend`].
//! * [`store`]: both traits on SQLite, schema migrations, maintenance.
//! * [`server`]: the QUIC listener, per-connection sessions (transport:
//!   memory budgets, rate limits, `Ping`), admission limits and graceful
//!   shutdown (`hushd`); [`server::engine`] runs the delivery core on any
//!   backend's writer and reader threads (group commit).
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

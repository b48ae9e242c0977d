//! Persistence: everything the server stores, on SQLite (one process, the
//! default) or PostgreSQL (several nodes on one database).
//!
//! * [`base`]: what both backends share: the one error type
//!   ([`StoreError`]), integer conversions, the health report.
//! * [`admin`]: the operator's short commands, on any backend.
//! * [`sqlite`] and [`pg`]: the [`crate::delivery::Storage`] and
//!   [`crate::delivery::storage::Backend`] traits on each database, its
//!   schema and migrations. Siblings: neither imports the other.
//! * [`open`]: the one place that decides which database a configuration
//!   names ([`Location`]) and opens it, for the server's engine and for
//!   the operator's commands ([`Database`]).

pub mod admin;
pub mod base;
pub mod open;
pub mod pg;
pub mod sqlite;

pub use admin::Admin;
pub use base::{to_i64, to_u64, DbReport, StoreError, TargetError};
pub use open::{Database, Location};

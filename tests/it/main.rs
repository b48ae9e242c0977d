//! Integration tests: the real `hushd` and `hush` binaries on loopback,
//! each test with its own temporary data directories and ephemeral ports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod support;

mod auth;
mod backup;
mod bots;
mod cli;
mod conventions;
mod delivery;
mod devices;
mod disappearing;
mod files;
mod hardening;
mod history;
mod integrity;
mod keys;
mod lifecycle;
mod malicious;
mod metrics;
mod nodes;
mod protocol;
mod register;
mod repair;
mod terminal;
mod verifiable;

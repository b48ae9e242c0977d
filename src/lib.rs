//! hush: a self-hosted relay (MLS Delivery Service) for end-to-end-encrypted
//! group chat.
//!
//! Layout, with dependencies pointing down:
//!
//! * [`files`]: the encrypted file format (chunks, padding, file messages,
//!   safe names); pure.
//! * [`wire`]: the protocol's frames and their pure, non-panicking codecs.
//! * [`chain`]: the hash chain over each group's log that members check
//!   (verifiable delivery).
//! * [`auth`]: keys, certificates, fingerprints, addresses, invite tokens,
//!   and the TLS configuration that authenticates both ends.
//! * [`mls`]: hush's MLS profile, what both ends check of MLS (framing,
//!   certified leaves, the proposals hush uses, the public group state).
//! * [`delivery`]: the Delivery Service rules, sans-IO: a request, who
//!   sends it (a registered device or a key registering) and the time in;
//!   a response and the pushes out. Everything the server persists sits
//!   behind one trait ([`delivery::Storage`]), units of work behind
//!   [`delivery::storage::Backend`].
//! * [`db`]: persistence, one root: the error type both backends share,
//!   both traits on SQLite ([`db::sqlite`]: schema migrations,
//!   maintenance) and on PostgreSQL ([`db::pg`]: several nodes on one
//!   database, the `LISTEN`/`NOTIFY` wake-ups that carry pushes across
//!   nodes), siblings that never import each other, and the one place that
//!   opens the database a configuration names ([`db::Location`]).
//! * [`server`]: the QUIC listener, per-connection sessions (transport:
//!   memory budgets, rate limits, `Ping`), admission limits and graceful
//!   shutdown (`hushd`); [`server::engine`] runs the delivery core on any
//!   backend's writer and reader threads (group commit).
//! * [`client`]: the client library (`hush` only parses, calls and prints):
//!   connecting and requests, a home directory and registration, the app
//!   (contacts, groups, sync, repair) over a typed local store that commits
//!   with the MLS state, payloads, reading a group's log, the MLS member.
//! * [`config`] and [`limits`]: every tunable value and hard cap.
//! * [`sqlite`]: how both sides open and migrate their SQLite files.
//! * [`util`]: time, durations, private files, the token bucket.
//! * `bench` (cargo feature `bench`, on by default): `hushd bench`.
#![forbid(unsafe_code)]

/// `--version` of both binaries: the crate version and the git commit the
/// build came from (see `build.rs`; "unknown" for a build outside git
/// without `HUSH_COMMIT`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("HUSH_COMMIT"), ")");

/// What `hush completions` and `hushd completions` take: a shell.
pub use clap_complete::Shell;

/// Writes `command`'s completion script for `shell` to `out`.
pub fn completions(shell: Shell, command: &mut clap::Command, out: &mut dyn std::io::Write) {
    let name = command.get_name().to_string();
    clap_complete::generate(shell, command, name, out);
}

/// Writes `command`'s man page (roff) to `out`.
pub fn man_page(command: clap::Command, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(command).render(out)
}

pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
pub mod chain;
pub mod client;
pub mod compact;
pub mod config;
pub mod db;
pub mod delivery;
pub mod files;
pub mod limits;
pub mod mls;
pub mod server;
pub mod sqlite;
pub mod util;
pub mod wire;

/// The layering the module list above promises, checked on the sources:
/// the protocol and the Delivery Service core know no sockets, clocks,
/// threads, files or databases, and no layer above them. (The cheaper
/// alternative to a crate of their own; see issue 16's note.)
#[cfg(test)]
mod layering {
    use std::path::Path;

    /// Names a core source file may not mention.
    const FORBIDDEN: &[&str] = &[
        "tokio",
        "quinn",
        "rusqlite",
        "std::net",
        "std::fs",
        "std::thread",
        "SystemTime",
        "Instant",
        "crate::server",
        "crate::db",
        "crate::client",
        "crate::config",
        "crate::sqlite",
    ];

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// What each part may not import (code, not docs): the shared layers
    /// (protocol, MLS profile, keys) nothing above them, and the client
    /// nothing of the server's.
    const IMPORTS: &[(&str, &[&str])] = &[
        ("wire", &["crate::auth", "crate::mls", "crate::delivery", "crate::client", "crate::server"]),
        ("auth", &["crate::mls", "crate::delivery", "crate::client", "crate::server", "crate::db"]),
        ("mls.rs", &["crate::delivery", "crate::client", "crate::server", "crate::db"]),
        ("client", &["crate::delivery", "crate::server", "crate::db"]),
        // Persistence: one root, two sibling backends that never import
        // each other, and nothing of the server above it.
        ("db", &["crate::server", "crate::config"]),
        ("db/sqlite", &["db::pg", "super::pg", "db::open", "postgres::"]),
        ("db/pg", &["db::sqlite", "super::sqlite", "db::open", "rusqlite"]),
        ("db/base.rs", &["db::sqlite", "db::pg", "super::sqlite", "super::pg", "db::open"]),
        ("db/admin.rs", &["db::sqlite", "db::pg", "super::sqlite", "super::pg", "db::open"]),
    ];

    /// The parts of the library from the bottom up: each may import only
    /// parts before it (code, not tests), so there is no circle between
    /// them and nothing imports upward.
    const LAYERS: &[&str] = &[
        "util", "limits", "sqlite", "chain", "files", "wire", "compact", "auth", "mls", "delivery", "db", "config",
        "server", "client", "bench",
    ];

    /// The parts (`crate::NAME`) a file's code mentions: everything before
    /// its test module, doc comments and comments left out.
    fn imports(file: &Path) -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(file).unwrap();
        let mut out = std::collections::BTreeSet::new();
        for line in text.lines() {
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("");
            for (at, _) in code.match_indices("crate::") {
                let name: String = code[at + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                out.insert(name);
            }
        }
        out
    }

    #[test]
    fn every_part_imports_only_the_parts_below_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (i, part) in LAYERS.iter().enumerate() {
            let mut files = Vec::new();
            let dir = root.join(part);
            if dir.is_dir() {
                sources(&dir, &mut files);
            } else {
                files.push(root.join(format!("{part}.rs")));
            }
            for file in files.iter().filter(|f| !f.ends_with("tests.rs")) {
                for name in imports(file) {
                    let Some(j) = LAYERS.iter().position(|l| *l == name) else { continue };
                    assert!(
                        j <= i,
                        "{}: {part} imports crate::{name}, which lies above it ({:?})",
                        file.display(),
                        LAYERS
                    );
                }
            }
        }
        // Every part of the library is in the list.
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if name != "lib" && name != "bin" {
                assert!(LAYERS.contains(&name.as_str()), "{name} is in no layer");
            }
        }
    }

    #[test]
    fn no_part_imports_what_lies_above_it_and_the_client_nothing_of_the_server() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (part, forbidden) in IMPORTS {
            let mut files = Vec::new();
            let path = root.join(part);
            if path.is_dir() {
                sources(&path, &mut files);
            } else {
                files.push(path);
            }
            assert!(!files.is_empty(), "no sources for {part}");
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    for name in *forbidden {
                        assert!(!code.contains(name), "{}:{}: {part} imports {name}: {line}", file.display(), n + 1);
                    }
                }
            }
        }
    }

    #[test]
    fn the_protocol_and_the_core_know_no_io_and_nothing_above_them() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        for dir in ["wire", "delivery"] {
            sources(&root.join(dir), &mut files);
        }
        files.push(root.join("mls.rs"));
        assert!(files.len() >= 10, "found only {files:?}");
        for file in files {
            // Unit tests drive the core with real clients.
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for name in FORBIDDEN {
                    assert!(!code.contains(name), "{}:{}: the core mentions {name}: {line}", file.display(), n + 1);
                }
            }
        }
    }
}

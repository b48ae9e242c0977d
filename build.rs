//! Records the git commit the binaries are built from, for `--version`.
//!
//! `HUSH_COMMIT` in the environment wins (a build from a source archive,
//! and `audit/reproducible`, which builds from `git archive` copies, pass
//! it); otherwise `git rev-parse HEAD` in the source tree; otherwise
//! "unknown". Nothing else (no time, no path, no dirty flag) goes in, so
//! two builds of one commit stay identical.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HUSH_COMMIT");
    let commit = std::env::var("HUSH_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_head);
    let commit = commit.filter(|c| c.chars().all(|ch| ch.is_ascii_hexdigit())).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HUSH_COMMIT={commit}");
}

fn git_head() -> Option<String> {
    let git = Path::new(".git");
    if git.is_dir() {
        // Rebuild when HEAD moves: HEAD itself, the branch it names, packed
        // refs. Only paths that exist: Cargo treats a missing one as always
        // changed and would rebuild the crate every time.
        let mut watch = vec![git.join("HEAD"), git.join("packed-refs")];
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
            if let Some(branch) = head.trim().strip_prefix("ref: ") {
                watch.push(git.join(branch));
            }
        }
        for path in watch.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let out = Command::new("git").args(["rev-parse", "HEAD"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

//! What every command-line tool is expected to have: `--version` with the
//! commit it was built from, shell completions, a man page.

use std::process::Command;

use crate::support::*;

fn output(bin: &str, args: &[&str]) -> String {
    ok(run(Command::new(bin).args(args)))
}

#[test]
fn both_binaries_print_their_version_and_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    for (bin, name) in [(env!("CARGO_BIN_EXE_hushd"), "hushd"), (env!("CARGO_BIN_EXE_hush"), "hush")] {
        let version = output(bin, &["--version"]);
        let commit = version
            .trim()
            .strip_prefix(&format!("{name} {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{version:?}"));
        match &head {
            // Built in this checkout: its HEAD when the binary was built,
            // a full commit id.
            Some(_) => assert!(commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()), "{version}"),
            None => assert_eq!(commit, "unknown"),
        }
    }
}

#[test]
fn completions_are_valid_bash_and_man_pages_render() {
    for bin in [env!("CARGO_BIN_EXE_hushd"), env!("CARGO_BIN_EXE_hush")] {
        let script = output(bin, &["completions", "bash"]);
        assert!(script.contains("complete -F"), "{script}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("completion.bash");
        std::fs::write(&file, &script).unwrap();
        ok(run(Command::new("bash").arg("-n").arg(&file)));
        for shell in ["zsh", "fish"] {
            assert!(!output(bin, &["completions", shell]).is_empty());
        }
        let man = output(bin, &["man"]);
        assert!(man.contains(".TH") && man.contains(".SH NAME"), "{man}");
    }
    // Subcommands are in it.
    assert!(output(env!("CARGO_BIN_EXE_hushd"), &["completions", "bash"]).contains("invite"));
    assert!(output(env!("CARGO_BIN_EXE_hush"), &["completions", "bash"]).contains("register"));
}

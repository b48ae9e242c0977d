//! Files (issue 32): real hushd, real clients.

use std::path::{Path, PathBuf};

use crate::cli::{person, run_ok, team, Person};
use crate::support::*;

/// A file of `size` bytes made of numbered markers (`HUSH-MARKER-n `).
fn marked_file(path: &Path, size: usize) {
    let mut bytes = Vec::with_capacity(size + 32);
    let mut n = 0u64;
    while bytes.len() < size {
        bytes.extend_from_slice(format!("HUSH-MARKER-{n} ").as_bytes());
        n += 1;
    }
    bytes.truncate(size);
    std::fs::write(path, bytes).unwrap();
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// The id of the group's only file, as `hush files --json` shows it.
fn only_file(p: &Person) -> serde_json::Value {
    let out = run_ok(p, &["files", "team", "--json"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    serde_json::from_str(lines[0]).unwrap()
}

/// The blob files the server holds.
fn blob_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(data_dir.join("blobs")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// alice shares a 50 MiB file with a known pattern: bob and carol get
/// byte-identical copies (carol's under its name, in her directory), and no
/// file of the server's (database, WAL, blob) holds a marker.
fn a_large_file_reaches_every_member_byte_identical_and_the_server_holds_no_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, bob, carol) = team(&server, tmp.path());
    let original = tmp.path().join("logs.bin");
    marked_file(&original, 50 * 1024 * 1024 + 123);
    let sent = ok(hush(&alice.home, &["send", "team", "--file", original.to_str().unwrap(), "the", "logs"]));
    assert!(sent.is_empty(), "{sent}");

    run_ok(&bob, &["sync"]);
    let f = only_file(&bob);
    assert_eq!(f["name"], "logs.bin");
    assert_eq!(f["size"], 50 * 1024 * 1024 + 123);
    assert_eq!(f["sender"], "alice");
    let id = f["id"].as_str().unwrap().to_string();
    let copy = tmp.path().join("bob-copy.bin");
    let saved = run_ok(&bob, &["get", "team", &id, "-o", copy.to_str().unwrap()]);
    assert_eq!(saved.trim(), copy.to_str().unwrap());
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&original).unwrap(), "bob's copy differs");
    let read = run_ok(&bob, &["read", "team"]);
    assert!(read.contains(&format!("[file {}] logs.bin (50.0 MiB): the logs", &id[..8])), "{read}");

    run_ok(&carol, &["sync"]);
    let downloads = tmp.path().join("carol-downloads");
    std::fs::create_dir(&downloads).unwrap();
    // A unique prefix of the id is enough.
    ok(hush_in(&downloads, &carol.home, &["get", "team", &id[..10]]));
    assert!(std::fs::read(downloads.join("logs.bin")).unwrap() == std::fs::read(&original).unwrap());
    // Again: never overwritten, a second copy beside it.
    let again = ok(hush_in(&downloads, &carol.home, &["get", "team", &id]));
    assert!(again.trim().ends_with("logs (1).bin"), "{again}");
    // alice lists her own file too.
    assert_eq!(only_file(&alice)["id"], id.as_str());

    let leaks = files_containing(&data, b"HUSH-MARKER-");
    assert!(leaks.is_empty(), "plaintext on the server: {leaks:?}");
    assert_eq!(blob_files(&data).len(), 1);
    // The blob's size is the padded bucket, not the file's.
    let stored = std::fs::metadata(&blob_files(&data)[0]).unwrap().len();
    assert!(stored > 50 * 1024 * 1024 + 123, "{stored}");
}

/// The operator flips one byte of a stored blob: the recipient refuses the
/// file, says it was altered, and leaves nothing behind.
fn a_blob_altered_on_the_server_is_refused_and_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, bob, _carol) = team(&server, tmp.path());
    let original = tmp.path().join("notes.txt");
    marked_file(&original, 300_000);
    ok(hush(&alice.home, &["send", "team", "--file", original.to_str().unwrap()]));
    run_ok(&bob, &["sync"]);
    let id = only_file(&bob)["id"].as_str().unwrap().to_string();
    let blob = blob_files(&data).remove(0);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[200_000] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();

    let target = tmp.path().join("bob-downloads");
    std::fs::create_dir(&target).unwrap();
    let out = hush_in(&target, &bob.home, &["get", "team", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("altered on the server or in transit"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
    assert!(left.is_empty(), "a partial file stayed: {left:?}");
}

/// Names a sender chooses are never paths, never control sequences, and
/// never replace a file: each is saved inside the target directory.
fn hostile_file_names_are_saved_safely_inside_the_target_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let alice = person(&server, tmp.path(), "alice");
    let bob = person(&server, tmp.path(), "bob");
    run_ok(&alice, &["contact", "add", "bob", &bob.id]);
    run_ok(&bob, &["contact", "add", "alice", &alice.id]);
    run_ok(&alice, &["group", "create", "team"]);
    run_ok(&alice, &["group", "add", "team", "bob"]);
    run_ok(&bob, &["sync"]);
    let original = tmp.path().join("payload");
    std::fs::write(&original, b"contents").unwrap();
    let names = ["../../x", "/etc/passwd", "\u{1b}[31mred\u{1b}[0m.txt", "two\nlines.txt"];
    for name in names {
        ok(hush(&alice.home, &["send", "team", "--file", original.to_str().unwrap(), "--name", name]));
    }
    run_ok(&bob, &["sync"]);
    let target = tmp.path().join("inbox").join("deeper");
    std::fs::create_dir_all(&target).unwrap();
    let listed = run_ok(&bob, &["files", "team", "--json"]);
    let ids: Vec<String> = listed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 4, "{listed}");
    let mut saved = Vec::new();
    for id in &ids {
        saved.push(ok(hush_in(&target, &bob.home, &["get", "team", id])).trim().to_string());
    }
    let mut inside: Vec<String> =
        std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    inside.sort();
    assert_eq!(inside, ["[31mred[0m.txt", "passwd", "twolines.txt", "x"], "{saved:?}");
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("inbox").join("x").exists());
    // The listing shows no control characters either.
    assert!(!listed.contains('\u{1b}'), "{listed}");
}

crate::on_both_backends! {
    sync: [
        a_large_file_reaches_every_member_byte_identical_and_the_server_holds_no_plaintext,
        a_blob_altered_on_the_server_is_refused_and_leaves_no_file,
        hostile_file_names_are_saved_safely_inside_the_target_directory,
    ],
    async: []
}

//! Encrypted backups (issue 34): real hushd, real clients.

use std::path::Path;

use crate::cli::{run_ok, team, Person};
use crate::support::*;

/// `hush --home HOME ARGS…` with `HUSH_PASSPHRASE` unset and the
/// passphrase in a file.
fn with_passphrase(home: &Path, args: &[&str], file: &Path) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--passphrase-file", file.to_str().unwrap()]);
    hush(home, &all)
}

/// alice writes in two groups, backs up, loses her home and restores on a
/// new one: she reads her old history, sends and receives in both groups,
/// bob sees her as alice, and her old device can be revoked from the new
/// one. A wrong passphrase, a truncated file and a flipped byte are
/// refused with nothing written.
fn a_restored_home_continues_where_the_lost_one_was() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "create", "ops"]);
    run_ok(&alice, &["group", "add", "ops", "bob"]);
    run_ok(&bob, &["sync"]);
    for i in 0..5 {
        run_ok(&alice, &["send", "team", &format!("team line {i} BACKUP-MARKER")]);
        run_ok(&bob, &["send", "ops", &format!("ops line {i} from bob")]);
    }
    run_ok(&alice, &["sync"]);
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let file = tmp.path().join("alice.bak");
    let out = with_passphrase(&alice.home, &["backup", file.to_str().unwrap()], &pass);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions()) & 0o777;
    assert_eq!(mode, 0o600);
    let bytes = std::fs::read(&file).unwrap();
    assert!(!bytes.windows(13).any(|w| w == b"BACKUP-MARKER"), "the backup holds plaintext");
    // Never overwritten.
    let again = with_passphrase(&alice.home, &["backup", file.to_str().unwrap()], &pass);
    assert!(!again.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // Refused, nothing written: a wrong passphrase, a cut file, a flipped byte.
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "correct horse battery stapler\n").unwrap();
    let cut = tmp.path().join("cut.bak");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let flipped = tmp.path().join("flipped.bak");
    let mut f = bytes.clone();
    let middle = f.len() / 2;
    f[middle] ^= 0x01;
    std::fs::write(&flipped, &f).unwrap();
    for (what, backup, secret) in
        [("wrong passphrase", &file, &wrong), ("cut", &cut, &pass), ("flipped", &flipped, &pass)]
    {
        let home = tmp.path().join(format!("refused-{}", what.replace(' ', "-")));
        let out = with_passphrase(&home, &["restore", backup.to_str().unwrap()], secret);
        assert!(!out.status.success(), "{what}");
        assert!(stderr(&out).contains("wrong passphrase, or the backup was damaged"), "{what}: {}", stderr(&out));
        assert!(!home.exists(), "{what}: something was written");
    }

    // The laptop is lost.
    let old_home = alice.home.clone();
    std::fs::remove_dir_all(&old_home).unwrap();
    let restored = Person { home: tmp.path().join("alice-new"), id: alice.id.clone() };
    let out = with_passphrase(&restored.home, &["restore", file.to_str().unwrap()], &pass);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains(&format!("restored {}", alice.id)), "{said}");
    assert!(said.contains("2 contact(s), 2 group(s)"), "{said}");
    assert_eq!(run_ok(&restored, &["whoami"]).lines().next().unwrap(), alice.id);
    for i in 0..5 {
        let team = run_ok(&restored, &["read", "team"]);
        assert!(team.contains(&format!("you: team line {i} BACKUP-MARKER")), "{team}");
        let ops = run_ok(&restored, &["read", "ops"]);
        assert!(ops.contains(&format!("bob: ops line {i} from bob")), "{ops}");
    }
    // She writes in both groups; bob sees her as alice, and her device joined.
    run_ok(&restored, &["send", "team", "back on a new laptop"]);
    run_ok(&restored, &["send", "ops", "ops: back too"]);
    let got = run_ok(&bob, &["sync"]);
    assert!(got.contains("[team] alice: back on a new laptop"), "{got}");
    assert!(got.contains("[ops] alice: ops: back too"), "{got}");
    assert!(got.contains("alice added a device to the group"), "{got}");
    run_ok(&bob, &["send", "team", "welcome back"]);
    run_ok(&bob, &["send", "ops", "ops welcome"]);
    let got = run_ok(&restored, &["sync"]);
    assert!(got.contains("[team] bob: welcome back") && got.contains("[ops] bob: ops welcome"), "{got}");
    // The lost device is revoked from the new one.
    let list = run_ok(&restored, &["device", "list"]);
    assert!(list.contains("previous-device") && list.contains("(this device)"), "{list}");
    run_ok(&restored, &["device", "revoke", "previous-device"]);
    run_ok(&bob, &["sync"]);
    run_ok(&restored, &["send", "team", "after the revocation"]);
    assert!(run_ok(&bob, &["sync"]).contains("alice: after the revocation"));
}

/// Messages whose disappearing timer ran out are not in a backup taken
/// after; without a passphrase (and no terminal) nothing is written.
fn a_backup_leaves_out_what_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("server"), "127.0.0.1:0", &[("HUSHD_SWEEP_SECONDS", "1")]);
    let (alice, bob, _carol) = team(&server, tmp.path());
    crate::cli::one_message_expired(&alice, &bob);
    let file = tmp.path().join("a.bak");
    let out = hush_env(&alice.home, &["backup", file.to_str().unwrap()], &[("HUSH_PASSPHRASE", "a long passphrase")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let backup = hush::client::backup::open(&std::fs::read(&file).unwrap(), b"a long passphrase").unwrap();
    let lines: Vec<&str> = backup.groups.iter().flat_map(|g| g.history.iter().map(|h| h.body.as_str())).collect();
    assert!(lines.contains(&"kept for good"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("EXPIRING-MARKER")), "{lines:?}");
    // No passphrase, no terminal: refused, nothing written.
    let none = hush(&alice.home, &["backup", tmp.path().join("b.bak").to_str().unwrap()]);
    assert!(!none.status.success() && stderr(&none).contains("no passphrase"), "{}", stderr(&none));
    assert!(!tmp.path().join("b.bak").exists());
}

/// Red team (issue 34): writing FILE never deletes an existing file, FILE
/// itself (`old-backup.tmp`) or one beside it (`notes.tmp`).
#[test]
fn writing_a_private_file_never_deletes_an_existing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let same = tmp.path().join("old-backup.tmp");
    std::fs::write(&same, b"a precious earlier backup").unwrap();
    assert!(hush::util::write_private(&same, b"new", false).is_err(), "an existing file was replaced");
    assert_eq!(std::fs::read(&same).unwrap(), b"a precious earlier backup");
    let sibling = tmp.path().join("notes.tmp");
    std::fs::write(&sibling, b"unrelated user data").unwrap();
    hush::util::write_private(&tmp.path().join("notes.bak"), b"backup", false).unwrap();
    assert_eq!(std::fs::read(&sibling).unwrap(), b"unrelated user data");
    // Nothing of its own is left beside them either.
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

/// The same through the CLI: `hush backup FILE.tmp` with FILE.tmp present.
fn a_backup_onto_an_existing_tmp_file_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let alice = crate::cli::person(&server, tmp.path(), "alice");
    let file = tmp.path().join("alice-backup.tmp");
    std::fs::write(&file, b"last week's backup").unwrap();
    let out = hush_env(&alice.home, &["backup", file.to_str().unwrap()], &[("HUSH_PASSPHRASE", "a long passphrase")]);
    assert!(!out.status.success(), "overwrote an existing file");
    assert_eq!(std::fs::read(&file).unwrap(), b"last week's backup", "{}", stderr(&out));
}

/// Red team (issue 34): a restore that fails after decrypting (the server
/// unreachable) leaves nothing behind, the account key least of all, and
/// the same restore simply runs again.
fn a_restore_that_could_not_reach_the_server_can_be_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let port = server.port();
    let alice = crate::cli::person(&server, tmp.path(), "alice");
    run_ok(&alice, &["group", "create", "solo"]);
    let file = tmp.path().join("a.bak");
    let pass = [("HUSH_PASSPHRASE", "a long passphrase")];
    let out = hush_env(&alice.home, &["backup", file.to_str().unwrap()], &pass);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = server.terminate();
    let home = tmp.path().join("restored");
    let first = hush_env(&home, &["restore", file.to_str().unwrap()], &pass);
    assert!(!first.status.success(), "restored with the server down?");
    assert!(!home.exists(), "left behind: {:?}", files_under(&home));
    let _server = Hushd::start_with(&data, &format!("127.0.0.1:{port}"), &[]);
    let again = hush_env(&home, &["restore", file.to_str().unwrap()], &pass);
    assert!(again.status.success(), "retrying the restore was refused: {}", stderr(&again));
}

crate::on_both_backends! {
    sync: [
        a_restored_home_continues_where_the_lost_one_was,
        a_backup_leaves_out_what_expired,
        a_backup_onto_an_existing_tmp_file_leaves_it_alone,
        a_restore_that_could_not_reach_the_server_can_be_retried,
    ],
    async: [],
}

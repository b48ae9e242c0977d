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

    let check = ok(hushd_command(&data).arg("check").output().unwrap());
    assert!(check.contains("files     ok   1 blobs verified"), "{check}");
    let stats = ok(hushd_command(&data).arg("stats").output().unwrap());
    assert!(stats.contains("files          1 ("), "{stats}");
    let leaks = files_containing(&data, b"HUSH-MARKER-");
    assert!(leaks.is_empty(), "plaintext on the server: {leaks:?}");
    assert_eq!(blob_files(&data).len(), 1);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&blob_files(&data)[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "blob file mode {mode:o}");
    }
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

    // The operator's check finds it too.
    let check = run(hushd_command(&data).arg("check"));
    assert!(!check.status.success());
    assert!(stdout(&check).contains("1 of 1 blobs damaged"), "{}", stdout(&check));

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

/// The answer to a download of `id` over a fresh connection with `key`.
async fn download_answer(server: &Hushd, key: &hush::auth::Identity, id: [u8; 16]) -> hush::wire::Response {
    let conn = hush::client::Connection::connect(&server.address, key).await.unwrap();
    let (head, _) = conn.download(id, 0, 0).await.unwrap();
    head
}

fn device_key(p: &Person) -> hush::auth::Identity {
    hush::auth::Identity::load(&p.home.join("device.key")).unwrap()
}

fn id_bytes(hex: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

/// A registered account that is not a member, a member removed from the
/// group, and a key that is no account: none of them gets the file, and
/// each answer is the one for a file that does not exist.
async fn outsiders_get_what_a_missing_file_gets() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, carol) = team(&server, tmp.path());
    let dave = person(&server, tmp.path(), "dave");
    let original = tmp.path().join("plan.txt");
    marked_file(&original, 10_000);
    ok(hush(&alice.home, &["send", "team", "--file", original.to_str().unwrap()]));
    run_ok(&carol, &["sync"]);
    let id = id_bytes(only_file(&carol)["id"].as_str().unwrap());
    run_ok(&alice, &["group", "remove", "team", "carol"]);
    let missing = download_answer(&server, &device_key(&bob), [7; 16]).await;
    assert!(
        matches!(&missing, hush::wire::Response::Error { code: hush::wire::ErrorCode::NoSuchFile, .. }),
        "{missing:?}"
    );
    // A member gets it.
    let member = download_answer(&server, &device_key(&bob), id).await;
    assert!(matches!(member, hush::wire::Response::Blob { .. }), "{member:?}");
    for (who, key) in [("dave", device_key(&dave)), ("removed carol", device_key(&carol))] {
        assert_eq!(download_answer(&server, &key, id).await, missing, "{who}");
        let conn = hush::client::Connection::connect(&server.address, &key).await.unwrap();
        assert_eq!(conn.upload_status(id).await.unwrap_err().code(), Some(hush::wire::ErrorCode::NoSuchFile));
    }
    // carol's CLI says what happened.
    let out = hush(&carol.home, &["get", "team", &hex(&id), "-o", tmp.path().join("c").to_str().unwrap()]);
    assert!(!out.status.success());
    // A stranger: the same refusal whether or not the blob exists.
    let stranger = hush::auth::Identity::generate().unwrap();
    let conn = hush::client::Connection::connect(&server.address, &stranger).await.unwrap();
    let real = conn.upload_stream(id, 0).await.unwrap().finish().await.unwrap_err().to_string();
    let conn = hush::client::Connection::connect(&server.address, &stranger).await.unwrap();
    let fake = conn.upload_stream([7; 16], 0).await.unwrap().finish().await.unwrap_err().to_string();
    assert_eq!(real, fake);
    assert!(real.contains("code 10"), "{real}");
    // And dave cannot write into alice's blob.
    let conn = hush::client::Connection::connect(&server.address, &device_key(&dave)).await.unwrap();
    let mut stream = conn.upload_stream(id, 0).await.unwrap();
    let _ = stream.write(b"overwrite").await;
    assert_eq!(stream.finish().await.unwrap_err().code(), Some(hush::wire::ErrorCode::NoSuchFile));
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls until `size_of` returns at least `bytes` (or panics after WAIT).
fn wait_for_bytes(what: &str, bytes: u64, size_of: impl Fn() -> u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while size_of() < bytes {
        assert!(std::time::Instant::now() < deadline, "{what} never reached {bytes} bytes");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn spawn_hush(cwd: &Path, home: &Path, args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_hush"))
        .env_clear()
        .env("HOME", home)
        .current_dir(cwd)
        .arg("--home")
        .arg(home)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// hushd is killed (SIGKILL) in the middle of an upload and again in the
/// middle of a download; once it is back, both go on from what the server
/// held (not from the start) and the file arrives intact.
fn transfers_resume_after_the_server_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let mut server = Hushd::start(&data);
    let port = server.port();
    let alice = person(&server, tmp.path(), "alice");
    let bob = person(&server, tmp.path(), "bob");
    run_ok(&alice, &["contact", "add", "bob", &bob.id]);
    run_ok(&bob, &["contact", "add", "alice", &alice.id]);
    run_ok(&alice, &["group", "create", "team"]);
    run_ok(&alice, &["group", "add", "team", "bob"]);
    run_ok(&bob, &["sync"]);
    let original = tmp.path().join("image.iso");
    marked_file(&original, 256 * 1024 * 1024);

    let sending = spawn_hush(tmp.path(), &alice.home, &["send", "team", "--file", original.to_str().unwrap()]);
    let blobs = data.join("blobs");
    let blob_size = || {
        std::fs::read_dir(&blobs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok()?.metadata().ok())
            .map_or(0, |m| m.len())
    };
    wait_for_bytes("the upload", 24 * 1024 * 1024, blob_size);
    server.kill9();
    std::thread::sleep(std::time::Duration::from_millis(500));
    server = Hushd::start_with(&data, &format!("127.0.0.1:{port}"), &[]);
    let (status, err) = finish(sending);
    assert!(status.success(), "{err}");
    let resumed: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("resuming the upload at "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no resume: {err}"));
    assert!(resumed >= 16 * 1024 * 1024, "resumed at {resumed}: {err}");

    run_ok(&bob, &["sync"]);
    let id = only_file(&bob)["id"].as_str().unwrap().to_string();
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir(&inbox).unwrap();
    let fetching = spawn_hush(&inbox, &bob.home, &["get", "team", &id]);
    let partial = || {
        std::fs::read_dir(&inbox)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok()?.metadata().ok())
            .map_or(0, |m| m.len())
    };
    wait_for_bytes("the download", 24 * 1024 * 1024, partial);
    server.kill9();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _server = Hushd::start_with(&data, &format!("127.0.0.1:{port}"), &[]);
    let (status, err) = finish(fetching);
    assert!(status.success(), "{err}");
    let resumed: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("resuming the download at "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no resume: {err}"));
    assert!(resumed >= 16 * 1024 * 1024, "resumed at {resumed}: {err}");
    assert!(std::fs::read(inbox.join("image.iso")).unwrap() == std::fs::read(&original).unwrap());
}

/// What the server's memory may grow by while 8 devices upload at once:
/// per upload, its buffer ([`hush::limits::BLOB_IO_BUFFER`], twice: read
/// and write), a connection's receive window, and slack for the runtime.
const UPLOAD_RSS_BOUND: u64 =
    8 * (2 * hush::limits::BLOB_IO_BUFFER as u64 + hush::limits::DEVICE_RECEIVE_WINDOW as u64) + 32 * 1024 * 1024;

/// 8 devices upload 128 MiB each at once: the server's memory grows by
/// less than [`UPLOAD_RSS_BOUND`]. Then one of them, over its account's
/// quota, is refused before anything is stored, and what it holds is
/// exactly its one file.
fn eight_uploads_at_once_stay_within_a_memory_bound_and_the_quota_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_STORAGE_QUOTA_MB", "200")]);
    let original = tmp.path().join("disk.img");
    marked_file(&original, 128 * 1024 * 1024);
    let people: Vec<Person> = (0..8).map(|i| person(&server, tmp.path(), &format!("p{i}"))).collect();
    for p in &people {
        run_ok(p, &["group", "create", "team"]);
    }
    let idle = server.rss_kib() * 1024;
    let sending: Vec<_> = people
        .iter()
        .map(|p| spawn_hush(tmp.path(), &p.home, &["send", "team", "--file", original.to_str().unwrap()]))
        .collect();
    let mut peak = idle;
    let pid = server.pid();
    let watching = std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(kib) = hush::util::rss_kib(Some(pid)) {
            peak = peak.max(kib * 1024);
            std::thread::sleep(std::time::Duration::from_millis(20));
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
        peak
    });
    for child in sending {
        let (status, err) = finish(child);
        assert!(status.success(), "{err}");
    }
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    peak = peak.max(watching.join().unwrap());
    assert!(
        peak.saturating_sub(idle) < UPLOAD_RSS_BOUND,
        "the server grew by {} MiB during 8 uploads (bound {} MiB)",
        (peak - idle) >> 20,
        UPLOAD_RSS_BOUND >> 20
    );
    let stats = ok(hushd_command(&data).arg("stats").output().unwrap());
    assert!(stats.contains("files          8 (1025 MiB)"), "{stats}");

    // Over quota: 128 MiB held, 100 more would pass 200 MiB.
    let more = tmp.path().join("more.bin");
    marked_file(&more, 100 * 1024 * 1024);
    let out = hush(&people[0].home, &["send", "team", "--file", more.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("over quota"), "{}", stderr(&out));
    let stats = ok(hushd_command(&data).arg("stats").output().unwrap());
    assert!(stats.contains("files          8 (1025 MiB)"), "nothing partial counts: {stats}");
    // What fits still goes.
    let small = tmp.path().join("small.bin");
    marked_file(&small, 50 * 1024 * 1024);
    ok(hush(&people[0].home, &["send", "team", "--file", small.to_str().unwrap()]));
}

/// How many files of the blob directory `pid` holds open.
fn open_blob_files(pid: u32, data_dir: &Path) -> usize {
    let blobs = std::fs::canonicalize(data_dir.join("blobs")).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(&blobs))
        .count()
}

/// A member asks for a file many times and never reads the bytes (a
/// slowloris reader): no more transfers run at once than the connection's
/// memory budget holds buffers, and the server gives up on those streams
/// once they make no progress for [`hush::limits::BLOB_IDLE_TIMEOUT`], as
/// it does for a stalled upload, instead of holding a file and a buffer
/// for each of them for as long as the connection lives.
async fn stalled_downloads_are_given_up() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start(&data);
    let (alice, bob, _carol) = team(&server, tmp.path());
    let original = tmp.path().join("big.bin");
    marked_file(&original, 16 * 1024 * 1024);
    ok(hush(&alice.home, &["send", "team", "--file", original.to_str().unwrap()]));
    run_ok(&bob, &["sync"]);
    let id = id_bytes(only_file(&bob)["id"].as_str().unwrap());
    let conn = hush::client::Connection::connect(&server.address, &device_key(&bob)).await.unwrap();
    // A transfer's buffer comes out of the connection's request budget
    // (2 MiB): 8 at once, then the server is busy.
    let per_connection = hush::limits::REQUEST_BUDGET_PER_CONNECTION / hush::limits::BLOB_IO_BUFFER;
    let mut held = Vec::new();
    for _ in 0..per_connection {
        let (head, recv) = conn.download(id, 0, 0).await.unwrap();
        assert!(matches!(head, hush::wire::Response::Blob { .. }), "{head:?}");
        held.push(recv);
    }
    let (head, _) = conn.download(id, 0, 0).await.unwrap();
    assert!(matches!(head, hush::wire::Response::Error { code: hush::wire::ErrorCode::RateLimited, .. }), "{head:?}");
    let open = open_blob_files(server.pid(), &data);
    assert!(open >= per_connection, "only {open} downloads are being served");
    tokio::time::sleep(hush::limits::BLOB_IDLE_TIMEOUT + std::time::Duration::from_secs(10)).await;
    let still = open_blob_files(server.pid(), &data);
    assert_eq!(
        still,
        0,
        "{still} downloads nobody read for {:?} still hold the blob open (and a buffer each)",
        hush::limits::BLOB_IDLE_TIMEOUT + std::time::Duration::from_secs(10)
    );
    drop(held);
}

/// alice opens an upload, streams part of it and cancels it while the
/// stream still writes. Either the cancel is refused while the stream
/// writes, or the stream takes no more bytes: a cancelled upload never
/// becomes a whole blob the server accepted outside the quota. (Before:
/// the cancel freed the quota and the upload slot, and the stream went on
/// writing into the unlinked file to the end, three times over a quota
/// that holds one.)
async fn an_upload_cancelled_while_it_streams_takes_no_more_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = Hushd::start_with(&data, "127.0.0.1:0", &[("HUSHD_STORAGE_QUOTA_MB", "2")]);
    let (_key, conn, mut mls) = registered_member(&server).await;
    let g = mls.create_group(&conn.status().await.unwrap().removal_key).unwrap();
    conn.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let (_, outsider) = registered_client(&server).await;
    let size = hush::files::Layout::of_size(1_500_000).unwrap().blob;
    let half = usize::try_from(size / 2).unwrap();
    let rest = usize::try_from(size).unwrap() - half;
    for round in 0..3 {
        let state = conn.upload_open(&g.id, size).await.unwrap();
        let mut stream = conn.upload_stream(state.id, 0).await.unwrap();
        stream.write(&vec![7u8; half]).await.unwrap();
        let path = data.join("blobs").join(hex(&state.id));
        wait_for_bytes("the upload", 1, || std::fs::metadata(&path).map_or(0, |m| m.len()));
        // Someone else's cancel meanwhile hears what a missing file gets,
        // not that the upload is being written.
        let other = outsider.upload_cancel(state.id).await.unwrap_err();
        assert_eq!(other.to_string(), outsider.upload_cancel([7; 16]).await.unwrap_err().to_string());
        let cancelled = conn.upload_cancel(state.id).await;
        if cancelled.is_err() {
            // Refused while it streams: it still counts. End the stream,
            // then the cancel goes through.
            let held = stream.finish().await.unwrap();
            assert_eq!(held.hash, None);
            conn.upload_cancel(state.id).await.unwrap();
            continue;
        }
        let _ = stream.write(&vec![7u8; rest]).await;
        let finished = stream.finish().await;
        assert!(
            !matches!(finished, Ok(hush::wire::UploadState { hash: Some(_), .. })),
            "round {round}: the server took all {size} bytes of an upload it had cancelled (its quota and slot \
             were already free): {finished:?}"
        );
    }
}

/// bob interrupts `hush get` (Ctrl-C) half way: no partial plaintext is
/// left behind in his directory (the temporary file goes as it does when a
/// download fails).
fn an_interrupted_get_leaves_no_partial_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    let original = tmp.path().join("secret.bin");
    marked_file(&original, 128 * 1024 * 1024);
    ok(hush(&alice.home, &["send", "team", "--file", original.to_str().unwrap()]));
    run_ok(&bob, &["sync"]);
    let id = only_file(&bob)["id"].as_str().unwrap().to_string();
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir(&inbox).unwrap();
    let fetching = spawn_hush(&inbox, &bob.home, &["get", "team", &id]);
    let partial = || {
        std::fs::read_dir(&inbox)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok()?.metadata().ok())
            .map_or(0, |m| m.len())
    };
    wait_for_bytes("the download", 1024 * 1024, partial);
    let sent = std::process::Command::new("kill").args(["-INT", &fetching.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let (status, err) = finish(fetching);
    assert!(!status.success(), "{err}");
    let left: Vec<_> = std::fs::read_dir(&inbox).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "an interrupted get left {left:?} (plaintext) behind");
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Bytes the server process has read from files (`rchar`: read calls,
/// page cache or not; network datagrams are not counted).
fn read_by(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

/// Red team: resuming an upload must not cost the server a read of all it
/// holds. Streams that resume and send nothing, over and over, read
/// (almost) nothing.
async fn resuming_an_upload_does_not_read_back_what_the_server_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let alice = person(&server, tmp.path(), "alice");
    run_ok(&alice, &["group", "create", "team"]);
    let group = {
        let app = hush::client::app::App::open(&alice.home, device_key(&alice), server.address.clone()).unwrap();
        app.resolve_group("team").unwrap().id
    };
    let conn = hush::client::Connection::connect(&server.address, &device_key(&alice)).await.unwrap();
    let size = hush::files::Layout::of_size(16 * 1024 * 1024).unwrap().blob;
    let state = conn.upload_open(&group, size).await.unwrap();
    let held = 9 * 1024 * 1024;
    let mut stream = conn.upload_stream(state.id, 0).await.unwrap();
    stream.write(&vec![0x42; held]).await.unwrap();
    assert_eq!(stream.finish().await.unwrap().received, held as u64);
    let before = read_by(server.pid());
    for _ in 0..10 {
        let stream = conn.upload_stream(state.id, held as u64).await.unwrap();
        assert_eq!(stream.finish().await.unwrap().received, held as u64);
    }
    let read = read_by(server.pid()) - before;
    assert!(read < held as u64, "10 empty resumes made the server read {} MiB", read >> 20);
}

crate::on_both_backends! {
    sync: [
        a_large_file_reaches_every_member_byte_identical_and_the_server_holds_no_plaintext,
        a_blob_altered_on_the_server_is_refused_and_leaves_no_file,
        hostile_file_names_are_saved_safely_inside_the_target_directory,
        transfers_resume_after_the_server_is_killed,
        eight_uploads_at_once_stay_within_a_memory_bound_and_the_quota_holds,
        an_interrupted_get_leaves_no_partial_plaintext,
    ],
    async: [
        resuming_an_upload_does_not_read_back_what_the_server_holds,
        outsiders_get_what_a_missing_file_gets,
        stalled_downloads_are_given_up,
        an_upload_cancelled_while_it_streams_takes_no_more_bytes,
    ]
}

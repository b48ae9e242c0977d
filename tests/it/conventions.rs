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

/// The forms an id could take in a log line: its text (full, or the short
/// form people compare, grouped or not) and hex (full or a prefix).
pub(crate) fn forms(bytes: &[u8]) -> Vec<String> {
    let text = hush::auth::text::encode(bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![text[..12].to_string(), hush::auth::text::grouped(&text[..16], 4)[..9].to_string(), hex[..16].to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_at_the_default_level_are_json_on_request_and_name_no_id_or_client_address() {
    let tmp = tempfile::tempdir().unwrap();
    // The server on 127.0.0.2: clients reach it from 127.0.0.1, so the
    // clients' address is told apart from the server's own.
    let env = [("HUSHD_LOG", "info"), ("HUSHD_LOG_FORMAT", "json")];
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.2:0", &env);
    let (mut peers, g) = crate::hardening::group_across(&[&server], 3).await;
    for (i, p) in peers.iter_mut().enumerate() {
        let m = p.mls.encrypt(&g, format!("hello {i}").as_bytes()).unwrap();
        let (seq, _) = p.conn.send(m, None).await.unwrap();
        p.log.sent(seq);
    }
    for p in peers.iter_mut() {
        p.sync(&g).await;
    }
    // A stranger with a bad invite, and a refused request, for good measure.
    let (_, stranger, member) = hush::client::mls::Member::generate().unwrap();
    let conn = hush::client::Connection::connect(&server.address, &stranger).await.unwrap();
    assert!(conn.register(Some("not-a-token"), member.certificate()).await.is_err());
    let invite = server.invite(&[]);
    let (status, logs) = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success());
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in &lines {
        let object: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(object.get("level").is_some() && object.get("fields").is_some(), "{line}");
    }
    // The scan sees info lines: the server's own address is there.
    assert!(logs.contains("127.0.0.2"), "{logs}");
    let mut secrets: Vec<String> = vec!["127.0.0.1".into(), invite];
    for p in &peers {
        secrets.extend(forms(&p.mls.account().0));
        secrets.extend(forms(&p.mls.certificate().device.0));
    }
    secrets.extend(forms(&g));
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "{secret:?} is in the log:\n{logs}");
    }
}

#[test]
fn under_systemd_hushd_says_ready_once_listening_and_stopping_when_asked_to_stop() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let notify = path.to_str().unwrap().to_string();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("NOTIFY_SOCKET", notify.as_str())]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("no readiness message");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    // Ready means listening: a client gets in right away.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(registered_client(&server));
    let (status, _) = server.terminate();
    assert!(status.success());
    let n = socket.recv(&mut buf).expect("no stopping message");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
}

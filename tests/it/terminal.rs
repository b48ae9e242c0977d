//! `hush chat` in a real pseudo-terminal, read through a terminal emulator
//! (vt100): what a person sees while typing as messages arrive.

use std::io::{Read, Write};
use std::num::NonZeroU16;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{person, run_ok, team, Person};
use crate::support::*;

const ROWS: NonZeroU16 = NonZeroU16::new(24).unwrap();
const COLS: NonZeroU16 = NonZeroU16::new(100).unwrap();

/// A `hush chat` running on a pseudo-terminal, and the screen it shows.
struct Terminal {
    pty: Arc<pty_process::blocking::Pty>,
    screen: Arc<Mutex<vt100::Parser>>,
    child: Child,
}

impl Terminal {
    fn chat(p: &Person, group: &str) -> Self {
        Self::chat_on(p, group, "xterm-256color")
    }

    fn chat_on(p: &Person, group: &str, term: &str) -> Self {
        Self::chat_in(p, group, term, &std::env::current_dir().unwrap())
    }

    fn chat_in(p: &Person, group: &str, term: &str, cwd: &std::path::Path) -> Self {
        let (pty, pts) = pty_process::blocking::open().unwrap();
        pty.resize(pty_process::Size::new(ROWS.get(), COLS.get())).unwrap();
        let mut cmd = pty_process::blocking::Command::new(env!("CARGO_BIN_EXE_hush"))
            .env_clear()
            .env("HOME", &p.home)
            .env("TERM", term)
            .current_dir(cwd)
            .arg("--home")
            .arg(&p.home)
            .args(["chat", group]);
        if let Some(path) = std::env::var_os("PATH") {
            cmd = cmd.env("PATH", path);
        }
        let child = cmd.spawn(pts).unwrap();
        let pty = Arc::new(pty);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let (reader, parser) = (pty.clone(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with an error once the child closed the terminal.
            while let Ok(n @ 1..) = (&*reader).read(&mut buf) {
                parser.lock().unwrap().process(&buf[..n]);
            }
        });
        Self { pty, screen, child }
    }

    fn type_keys(&self, keys: &str) {
        (&*self.pty).write_all(keys.as_bytes()).unwrap();
    }

    /// The screen's rows, trailing spaces trimmed.
    fn rows(&self) -> Vec<String> {
        let parser = self.screen.lock().unwrap();
        parser.screen().rows(0, COLS.get()).map(|r| r.trim_end().to_string()).collect()
    }

    /// The row the cursor is on: the input line.
    fn input_row(&self) -> String {
        let parser = self.screen.lock().unwrap();
        let (row, _) = parser.screen().cursor_position();
        let line = parser.screen().rows(0, COLS.get()).nth(usize::from(row)).unwrap_or_default();
        line.trim_end().to_string()
    }

    fn shown(&self) -> String {
        self.rows().join("\n")
    }

    /// Waits until `check` holds for the screen.
    fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; the screen:\n{}", self.shown());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for_text(&self, text: &str) {
        self.wait_for(text, |t| t.shown().contains(text));
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn texts(p: &Person, group: &str) -> String {
    run_ok(p, &["read", group])
}

fn typing_keeps_the_input_line_intact_while_messages_arrive() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["send", "team", "before the chat"]);
    run_ok(&bob, &["sync"]);

    let term = Terminal::chat(&bob, "team");
    // Scrollback from the local history: time and sender.
    term.wait_for("the prompt", |t| t.input_row() == "team>");
    term.wait_for_text("alice: before the chat");
    let shown = term.shown();
    assert!(
        shown
            .lines()
            .any(|l| l.ends_with("Z alice: before the chat") && l.len() == "HH:MMZ alice: before the chat".len()),
        "{shown}"
    );

    term.type_keys("I am typing a long repl");
    term.wait_for("the typed text", |t| t.input_row() == "team> I am typing a long repl");
    run_ok(&alice, &["send", "team", "hello bob, are you there?"]);
    term.wait_for_text("alice: hello bob, are you there?");
    let rows = term.rows();
    let message = rows.iter().find(|r| r.contains("alice: hello bob, are you there?")).unwrap();
    assert!(message.ends_with("Z alice: hello bob, are you there?") && !message.contains("typing"), "{}", term.shown());
    assert_eq!(term.input_row(), "team> I am typing a long repl", "the partial line must survive:\n{}", term.shown());
    let message_row = rows.iter().position(|r| r == message).unwrap();
    let input_row = rows.iter().position(|r| r == "team> I am typing a long repl").unwrap();
    assert!(message_row < input_row, "the message goes above the input line:\n{}", term.shown());
    // What the screen looks like (`cargo test terminal -- --nocapture`).
    println!("{}", term.shown().trim_end());

    // Finish the line: it reaches alice.
    term.type_keys("y\r");
    term.wait_for("an empty prompt", |t| t.input_row() == "team>");
    let deadline = Instant::now() + WAIT;
    loop {
        run_ok(&alice, &["sync"]);
        if texts(&alice, "team").contains("bob: I am typing a long reply") {
            break;
        }
        assert!(Instant::now() < deadline, "alice never got bob's line: {}", texts(&alice, "team"));
        std::thread::sleep(Duration::from_millis(100));
    }

    // History and editing keys: Up recalls the sent line, Ctrl-W deletes a
    // word, Left moves inside the line.
    term.type_keys("\x1b[A");
    term.wait_for("the recalled line", |t| t.input_row() == "team> I am typing a long reply");
    term.type_keys("\x17\x17\x17answer\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dan ");
    term.wait_for("the edited line", |t| t.input_row() == "team> I am typing an answer");
    term.type_keys("\r");
    term.wait_for("an empty prompt", |t| t.input_row() == "team>");

    // /members shows the group on one line, without sending anything.
    term.type_keys("/members\r");
    term.wait_for_text("members of team: alice, you, carol");
    term.type_keys("/quit\r");
    let status = wait_timeout(&mut { term }.child, WAIT).expect("chat did not exit on /quit");
    assert!(status.success());
    run_ok(&alice, &["sync"]);
    let seen = texts(&alice, "team");
    assert!(seen.contains("bob: I am typing an answer"), "{seen}");
    assert!(!seen.contains("/members") && !seen.contains("/quit"), "commands are not sent: {seen}");
}

fn switching_groups_announces_news_elsewhere_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    run_ok(&alice, &["group", "create", "ops"]);
    run_ok(&alice, &["group", "add", "ops", "bob"]);
    run_ok(&alice, &["send", "ops", "earlier in ops"]);

    let term = Terminal::chat(&bob, "team");
    term.wait_for("the prompt", |t| t.input_row() == "team>");
    // Joining ops on start is news from elsewhere: "you joined" and
    // alice's line.
    term.wait_for_text("[ops] 2 new lines, last from alice (/switch ops)");
    run_ok(&alice, &["send", "ops", "deploy at 5"]);
    term.wait_for_text("[ops] 3 new lines, last from alice (/switch ops)");
    assert!(!term.shown().contains("deploy at 5"), "another group's text is not shown here:\n{}", term.shown());

    term.type_keys("/switch nope\r");
    term.wait_for_text("nope");
    term.wait_for("the prompt back", |t| t.input_row() == "team>");
    term.type_keys("/switch ops\r");
    term.wait_for("the ops prompt", |t| t.input_row() == "ops>");
    let shown = term.shown();
    assert!(shown.contains("-- ops --") && shown.contains("alice: earlier in ops"), "{shown}");
    assert!(shown.contains("alice: deploy at 5"), "{shown}");
    term.type_keys("on it\r");
    term.wait_for("an empty prompt", |t| t.input_row() == "ops>");
    run_ok(&alice, &["send", "team", "and in team?"]);
    term.wait_for_text("[team] 1 new line, last from alice (/switch team)");
    println!("{}", term.shown().trim_end());
    // Ctrl-D ends the chat like /quit.
    term.type_keys("\x04");
    let status = wait_timeout(&mut { term }.child, WAIT).expect("chat did not exit on Ctrl-D");
    assert!(status.success());
    run_ok(&alice, &["sync"]);
    assert!(texts(&alice, "ops").contains("bob: on it"), "{}", texts(&alice, "ops"));
    assert!(!texts(&alice, "team").contains("on it"));
}

/// `/file PATH` shares a file from the chat, `/get ID` saves one in the
/// chat's directory.
fn files_are_shared_and_saved_from_the_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    let here = tmp.path().join("bob-here");
    std::fs::create_dir(&here).unwrap();
    let report = tmp.path().join("report.txt");
    std::fs::write(&report, "quarterly numbers").unwrap();
    let term = Terminal::chat_in(&bob, "team", "xterm-256color", &here);
    term.wait_for("the prompt", |t| t.input_row() == "team>");
    term.type_keys(&format!("/file {}\r", report.display()));
    term.wait_for_text("shared [file ");
    run_ok(&alice, &["sync"]);
    let listed = run_ok(&alice, &["files", "team"]);
    assert!(listed.contains("report.txt") && listed.contains("bob"), "{listed}");

    let notes = tmp.path().join("notes.md");
    std::fs::write(&notes, "# minutes").unwrap();
    run_ok(&alice, &["send", "team", "--file", notes.to_str().unwrap(), "from the meeting"]);
    term.wait_for_text("notes.md (9 B): from the meeting");
    let shown = term.shown();
    let id = shown.split("[file ").nth(2).map(|r| r[..8].to_string()).unwrap_or_else(|| panic!("{shown}"));
    term.type_keys(&format!("/get {id}\r"));
    term.wait_for_text("saved ./notes.md");
    assert_eq!(std::fs::read_to_string(here.join("notes.md")).unwrap(), "# minutes");
}

/// `/disappear` shows and sets the group's timer from the chat; alice
/// sees the change, and a message sent under it leaves bob's history
/// while the chat runs.
fn the_timer_is_set_from_the_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    let term = Terminal::chat(&bob, "team");
    term.wait_for("the prompt", |t| t.input_row() == "team>");
    term.type_keys("/disappear\r");
    term.wait_for_text("disappearing messages in team: off");
    term.type_keys("/disappear forever\r");
    term.wait_for_text("! --disappear \"forever\"");
    term.type_keys("/disappear 1s\r");
    term.wait_for_text("* you set disappearing messages to 1 second");
    let got = run_ok(&alice, &["sync"]);
    assert!(got.contains("bob set disappearing messages to 1 second"), "{got}");
    run_ok(&alice, &["send", "team", "gone in a second"]);
    term.wait_for_text("alice: gone in a second");
    let deadline = Instant::now() + WAIT;
    while texts(&bob, "team").contains("gone in a second") {
        assert!(Instant::now() < deadline, "still in bob's history: {}", texts(&bob, "team"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn a_message_cannot_reach_the_terminal_raw_or_forge_the_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    let term = Terminal::chat(&bob, "team");
    term.wait_for("the prompt", |t| t.input_row() == "team>");
    term.type_keys("draft");
    // Clear the screen, move the cursor home, write a fake prompt; a
    // second line posing as another sender.
    let attack = "\x1b[2J\x1b[Hteam> \r\n12:00Z carol: forged";
    ok(hush(&alice.home, &["send", "team", attack]));
    term.wait_for_text("forged");
    let shown = term.shown();
    assert!(shown.contains("\\e[2J\\e[Hteam> \\r"), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("    | 12:00Z carol: forged")), "{shown}");
    assert_eq!(term.input_row(), "team> draft", "{shown}");
    assert!(!shown.lines().any(|l| l.starts_with("12:00Z carol")), "{shown}");
}

/// A terminal the editor cannot drive gets line mode: what is typed is
/// sent line by line, Ctrl-D (end of input) leaves.
fn a_dumb_terminal_gets_line_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (alice, bob, _carol) = team(&server, tmp.path());
    let mut term = Terminal::chat_on(&bob, "team", "dumb");
    term.wait_for_text("chatting in team; /members, /quit");
    term.type_keys("plain line\n\x04");
    let status = wait_timeout(&mut term.child, WAIT).expect("chat did not exit at end of input");
    assert!(status.success());
    run_ok(&alice, &["sync"]);
    assert!(texts(&alice, "team").contains("bob: plain line"), "{}", texts(&alice, "team"));
}

/// A group that does not exist is refused with its name, on a terminal
/// too.
fn an_unknown_group_is_refused_before_the_terminal_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let dave = person(&server, tmp.path(), "dave");
    let mut term = Terminal::chat(&dave, "nowhere");
    let status = wait_timeout(&mut term.child, WAIT).expect("chat did not exit");
    assert!(!status.success());
    term.wait_for_text("nowhere");
}

fn losing_the_server_ends_the_chat_and_gives_the_terminal_back() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("server"));
    let (_alice, bob, _carol) = team(&server, tmp.path());
    let mut term = Terminal::chat(&bob, "team");
    term.wait_for("the prompt", |t| t.input_row() == "team>");
    let editing = tcgetattr(&*term.pty).unwrap().local_flags;
    assert!(!editing.contains(LocalFlags::ICANON), "the editor holds the line in raw mode");
    term.type_keys("half a thou");
    term.wait_for("the typed text", |t| t.input_row() == "team> half a thou");
    server.terminate();
    let status = wait_timeout(&mut term.child, WAIT).expect("chat did not notice the server was gone");
    assert!(!status.success());
    term.wait_for_text("connection to the server was lost");
    let after = tcgetattr(&*term.pty).unwrap().local_flags;
    assert!(after.contains(LocalFlags::ICANON | LocalFlags::ECHO), "the terminal is left raw: {after:?}");
}

crate::on_both_backends! {
    sync: [typing_keeps_the_input_line_intact_while_messages_arrive, switching_groups_announces_news_elsewhere_in_one_line],
    async: [],
}

#[test]
fn files_in_the_chat() {
    files_are_shared_and_saved_from_the_chat();
}

#[test]
fn disappearing_messages_on_a_terminal() {
    the_timer_is_set_from_the_chat();
}

#[test]
fn a_hostile_message_on_a_terminal() {
    a_message_cannot_reach_the_terminal_raw_or_forge_the_prompt();
}

#[test]
fn losing_the_server_on_a_terminal() {
    losing_the_server_ends_the_chat_and_gives_the_terminal_back();
}

#[test]
fn line_mode_on_a_dumb_terminal() {
    a_dumb_terminal_gets_line_mode();
}

#[test]
fn an_unknown_group_on_a_terminal() {
    an_unknown_group_is_refused_before_the_terminal_changes();
}

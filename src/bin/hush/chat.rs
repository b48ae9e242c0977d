//! `hush chat` on a terminal: the line being typed stays intact while
//! messages arrive.
//!
//! A line editor (rustyline) owns the terminal on its own thread: arrow
//! keys, the usual editing keys (Ctrl-A/E/U/W/K, Alt-B/F, …) and the
//! history of the lines sent since `chat` started (kept in memory only,
//! never written to disk: it is plaintext). Everything else is printed
//! through the editor's external printer, which clears the input line,
//! prints the message above it and redraws the line with the cursor where
//! it was. Why a line editor and not a full-screen view: the terminal's own
//! scrollback, copy and paste and search keep working, output stays plain
//! lines like the rest of the CLI, and it is two small crates (rustyline,
//! nix) instead of a widget toolkit.
//!
//! When standard input or output is not a terminal (or the terminal cannot
//! be driven, `TERM=dumb`), `chat` runs in line mode instead (`piped` in
//! main.rs), unchanged for scripts.

use std::io::IsTerminal;
use std::sync::mpsc as std_mpsc;

use anyhow::{Context, Result};
use hush::client::app::{files, App, AppError, Entry, EntryKind, GroupRow};
use hush::client::screen::{self, one_line};
use hush::client::{Connection, PushStream};
use hush::util::format_unix;
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::{Config, Editor, ExternalPrinter as _};

use super::app_error;
use hush::out;

/// Earlier messages shown when a group is opened (at start and on
/// `/switch`), from the local history.
pub const SCROLLBACK: usize = 20;
/// Lines of input history the editor keeps (what was typed since `chat`
/// started; in memory only).
pub const INPUT_HISTORY: usize = 500;
/// Typed lines waiting for the chat loop (the editor blocks beyond this).
const TYPED_QUEUE: usize = 16;

const HELP: &str = "commands: /members, /groups, /switch GROUP, /file PATH (share a file), /get ID (save a file \
                    here), /disappear [DURATION|off] (the group's timer, e.g. 1d), /help, /quit (or Ctrl-D); \
                    Enter sends the line (start it with // to send a line that begins with /)";

/// Whether `chat` should run interactively: both ends are terminals.
pub fn on_a_terminal() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// What the editor thread hands the chat loop.
enum Typed {
    /// A line; for a command, where to send the prompt to show next once
    /// the command ran (the editor waits, so a `/switch` changes the very
    /// next prompt).
    Line(String, Option<std_mpsc::Sender<String>>),
    /// Ctrl-D or Ctrl-C.
    End,
    /// The terminal failed.
    Failed(String),
}

/// What a typed line asks for (both chat modes read lines with this).
#[derive(Debug, PartialEq, Eq)]
pub enum Input<'a> {
    Nothing,
    Text(&'a str),
    Quit,
    Help,
    Members,
    Groups,
    Switch(&'a str),
    /// Share the file at this path.
    File(&'a str),
    /// Save the group's file with this id (or id prefix).
    Get(&'a str),
    /// Set the group's disappearing-message timer (`None`: show it).
    Disappear(Option<&'a str>),
    /// A command used the wrong way: what to say.
    Usage(&'static str),
    Unknown(&'a str),
}

impl<'a> Input<'a> {
    pub fn parse(line: &'a str) -> Self {
        let line = line.trim_end();
        if line.trim().is_empty() {
            return Self::Nothing;
        }
        if line.starts_with("//") {
            return Self::Text(line.strip_prefix('/').unwrap_or(line));
        }
        let Some(command) = line.strip_prefix('/') else { return Self::Text(line) };
        let (word, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
        let rest = rest.trim();
        match (word, rest.is_empty()) {
            ("quit" | "exit" | "q", true) => Self::Quit,
            ("help" | "h" | "?", true) => Self::Help,
            ("members", true) => Self::Members,
            ("groups", true) => Self::Groups,
            ("switch" | "s" | "join", false) => Self::Switch(rest),
            ("switch" | "s" | "join", true) => Self::Usage("usage: /switch GROUP"),
            ("file", false) => Self::File(rest),
            ("file", true) => Self::Usage("usage: /file PATH"),
            ("get", false) => Self::Get(rest),
            ("get", true) => Self::Usage("usage: /get ID (see the [file ID] line)"),
            ("disappear", false) => Self::Disappear(Some(rest)),
            ("disappear", true) => Self::Disappear(None),
            ("quit" | "exit" | "q" | "help" | "h" | "?" | "members" | "groups", false) => {
                Self::Usage("that command takes no argument")
            }
            _ => Self::Unknown(word),
        }
    }
}

/// A wake-up for each push the server sends on `conn` (the chat then
/// syncs, which reads what is new); the channel closes when the push
/// stream ends. Both chat modes wait on it.
pub fn push_wakeups(conn: &Connection) -> tokio::sync::mpsc::Receiver<()> {
    let (tx, pushes) = tokio::sync::mpsc::channel::<()>(16);
    let quic = conn.quic().clone();
    tokio::spawn(async move {
        let Ok(mut stream) = PushStream::accept(quic).await else { return };
        while let Ok(Some(_)) = stream.next().await {
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    pushes
}

/// Prints above the input line, from any thread, in order.
#[derive(Clone)]
struct Screen(std_mpsc::Sender<String>);

impl Screen {
    fn line(&self, text: impl Into<String>) {
        // Between two lines being edited the printer writes as it is
        // given: the newline is ours.
        let mut text = text.into();
        text.push('\n');
        // The printer thread is gone only once the terminal failed.
        let _ = self.0.send(text);
    }
}

/// The time of a line: `HH:MM` today, with the date before that (UTC, as
/// everywhere in hush's output, marked `Z`).
fn when(time: u64, now: u64) -> String {
    let full = format_unix(time);
    let today = format_unix(now);
    let date_len = "2026-11-28 ".len();
    let hm = full.get(date_len..date_len + 5).unwrap_or("");
    if full.get(..date_len) == today.get(..date_len) {
        format!("{hm}Z")
    } else {
        format!("{} {hm}Z", full.get(..date_len - 1).unwrap_or(""))
    }
}

/// One history entry of the group on screen, escaped.
fn format_entry(e: &Entry, now: u64) -> String {
    let time = when(e.time, now);
    if e.kind == EntryKind::Text {
        format!("{time} {}: {}", one_line(&e.sender), screen::body(&e.body))
    } else if e.kind == EntryKind::Alarm {
        format!("{time} !! {}", screen::body(&e.body))
    } else {
        format!("{time} * {}", screen::body(&e.body))
    }
}

fn prompt_for(group: &GroupRow) -> String {
    format!("{}> ", one_line(&group.name))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Runs `hush chat GROUP` on a terminal. `Ok(false)` when the terminal
/// cannot be driven after all: the caller falls back to line mode.
pub fn interactive(app: &mut App, group: &str, runtime: &tokio::runtime::Runtime) -> Result<bool> {
    let current = app.resolve_group(group).map_err(app_error)?;
    let config = Config::builder().max_history_size(INPUT_HISTORY)?.auto_add_history(false).build();
    let mut editor: Editor<(), DefaultHistory> = Editor::with_config(config)?;
    let Ok(mut printer) = editor.create_external_printer() else { return Ok(false) };
    // The terminal as it was, to put back if the chat ends while the
    // editor holds a line in raw mode (the connection dropped).
    let saved = nix::sys::termios::tcgetattr(std::io::stdin()).ok();

    let (print_tx, print_rx) = std_mpsc::channel::<String>();
    let printer_thread = std::thread::spawn(move || {
        for text in print_rx {
            if printer.print(text).is_err() {
                return;
            }
        }
    });
    let screen = Screen(print_tx);

    let (typed_tx, typed_rx) = tokio::sync::mpsc::channel::<Typed>(TYPED_QUEUE);
    let first_prompt = prompt_for(&current);
    std::thread::spawn(move || edit(editor, first_prompt, typed_tx));

    screen.line(format!("chatting in {}: Enter sends, /help lists commands, Ctrl-D leaves", one_line(&current.name)));
    show_scrollback(app, &current, &screen)?;
    let result = runtime.block_on(async {
        let conn = app.connect().await.map_err(app_error)?;
        let mut chat = Chat { app, conn: &conn, screen: screen.clone(), current, unread: Vec::new() };
        let r = chat.run(typed_rx).await;
        conn.close().await;
        r
    });
    drop(screen);
    let _ = printer_thread.join();
    if let Some(saved) = saved {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &saved);
    }
    if result.is_err() {
        // The reason goes below the line that was being edited.
        out!("");
    }
    result.map(|()| true)
}

/// The last [`SCROLLBACK`] entries of a group's local history.
fn show_scrollback(app: &App, group: &GroupRow, screen: &Screen) -> Result<()> {
    let history = app.history(group).map_err(app_error)?;
    let now = now();
    let skip = history.len().saturating_sub(SCROLLBACK);
    for e in history.iter().skip(skip) {
        screen.line(format_entry(e, now));
    }
    Ok(())
}

/// The editor thread: reads lines until Ctrl-D, Ctrl-C, or the chat loop
/// is gone.
fn edit(mut editor: Editor<(), DefaultHistory>, mut prompt: String, typed: tokio::sync::mpsc::Sender<Typed>) {
    loop {
        match editor.readline(&prompt) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if line.starts_with('/') && !line.starts_with("//") {
                    let (tx, rx) = std_mpsc::channel();
                    if typed.blocking_send(Typed::Line(line, Some(tx))).is_err() {
                        return;
                    }
                    match rx.recv() {
                        Ok(next) => prompt = next,
                        Err(_) => return, // the chat ended (/quit)
                    }
                } else if typed.blocking_send(Typed::Line(line, None)).is_err() {
                    return;
                }
            }
            Err(ReadlineError::Eof | ReadlineError::Interrupted) => {
                let _ = typed.blocking_send(Typed::End);
                return;
            }
            Err(e) => {
                let _ = typed.blocking_send(Typed::Failed(e.to_string()));
                return;
            }
        }
    }
}

/// The chat loop's state.
struct Chat<'a> {
    app: &'a mut App,
    conn: &'a Connection,
    screen: Screen,
    /// The group lines are sent to.
    current: GroupRow,
    /// New lines in other groups since they were last shown: (group id,
    /// name, count).
    unread: Vec<(Vec<u8>, String, usize)>,
}

impl Chat<'_> {
    async fn run(&mut self, mut typed: tokio::sync::mpsc::Receiver<Typed>) -> Result<()> {
        self.catch_up().await?;

        let mut pushes = push_wakeups(self.conn);
        let mut purge = tokio::time::interval(hush::limits::CLIENT_PURGE_INTERVAL);
        loop {
            tokio::select! {
                _ = purge.tick() => {
                    // Expired messages leave this device while it chats
                    // (what the terminal already showed stays in its
                    // scrollback: it is the terminal's).
                    self.app.purge_expired().map_err(app_error)?;
                }
                t = typed.recv() => match t {
                    None | Some(Typed::End) => break,
                    Some(Typed::Failed(e)) => anyhow::bail!("the terminal failed: {e}"),
                    Some(Typed::Line(line, reply)) => {
                        let go_on = self.typed(&line).await?;
                        if let Some(reply) = reply {
                            let _ = reply.send(prompt_for(&self.current));
                        }
                        if !go_on {
                            break;
                        }
                    }
                },
                p = pushes.recv() => match p {
                    Some(()) => self.catch_up().await?,
                    None => anyhow::bail!("the connection to the server was lost"),
                },
            }
        }
        // A last look for anything that arrived while we typed.
        self.catch_up().await
    }

    /// Acts on one typed line; `false` to stop.
    async fn typed(&mut self, line: &str) -> Result<bool> {
        match Input::parse(line) {
            Input::Nothing => {}
            Input::Quit => return Ok(false),
            Input::Help => self.screen.line(HELP),
            Input::Usage(text) => self.screen.line(text),
            Input::Unknown(word) => {
                self.screen.line(format!("unknown command /{}; /help lists them", one_line(word)));
            }
            Input::Members => {
                let g = self.app.resolve_group(&self.current.name).map_err(app_error)?;
                let members: Vec<String> = self.app.members(&g).iter().map(|m| one_line(m)).collect();
                self.screen.line(format!("members of {}: {}", one_line(&g.name), members.join(", ")));
            }
            Input::Groups => {
                let groups = self.app.groups().map_err(app_error)?;
                for g in groups {
                    let mut flags = String::new();
                    if g.id == self.current.id {
                        flags.push_str("  (here)");
                    }
                    if let Some((_, _, n)) = self.unread.iter().find(|u| u.0 == g.id) {
                        flags.push_str(&format!("  ({n} new)"));
                    }
                    if !g.active {
                        flags.push_str("  (left)");
                    }
                    self.screen.line(format!("{}{flags}", one_line(&g.name)));
                }
            }
            Input::Switch(name) => match self.app.resolve_group(name) {
                Ok(g) => {
                    self.unread.retain(|u| u.0 != g.id);
                    self.current = g;
                    self.screen.line(format!("-- {} --", one_line(&self.current.name)));
                    show_scrollback(self.app, &self.current, &self.screen)?;
                }
                Err(e) => self.screen.line(format!("! {e}")),
            },
            Input::File(path) => {
                let g = self.app.resolve_group(&self.current.name).unwrap_or_else(|_| self.current.clone());
                self.screen.line(format!("sending {}…", one_line(path)));
                let sent = async {
                    let mut conn = self.app.connect().await?;
                    let mut quiet = files::Quiet;
                    let r = self.app.send_file(&mut conn, &g, std::path::Path::new(path), None, "", &mut quiet).await;
                    conn.close().await;
                    r
                };
                match sent.await {
                    Ok(f) => self.screen.line(format!(
                        "shared [file {}] ({})",
                        &files::file_id(&f.id)[..8],
                        files::human(f.size)
                    )),
                    Err(e) => self.fail_unless_connected(e, "not sent")?,
                }
            }
            Input::Get(id) => {
                let g = self.app.resolve_group(&self.current.name).unwrap_or_else(|_| self.current.clone());
                let saved = async {
                    let mut conn = self.app.connect().await?;
                    let mut quiet = files::Quiet;
                    let target = files::Target::Into(std::path::PathBuf::from("."));
                    let r = self.app.save_file(&mut conn, &g, id, target, &mut quiet).await;
                    conn.close().await;
                    r
                };
                match saved.await {
                    Ok(path) => self.screen.line(format!("saved {}", one_line(&path.display().to_string()))),
                    Err(e) => self.fail_unless_connected(e, "not saved")?,
                }
            }
            Input::Disappear(None) => {
                let g = self.app.resolve_group(&self.current.name).unwrap_or_else(|_| self.current.clone());
                let timer = hush::util::format_timer(u64::from(self.app.disappear(&g)));
                self.screen.line(format!("disappearing messages in {}: {timer}", one_line(&g.name)));
            }
            Input::Disappear(Some(text)) => match super::parse_timer(text) {
                Ok(secs) => {
                    let g = self.app.resolve_group(&self.current.name).unwrap_or_else(|_| self.current.clone());
                    match self.app.set_disappear(self.conn, &g, secs).await {
                        Ok(()) => self.screen.line(format!(
                            "* you set disappearing messages to {}",
                            hush::util::format_timer(u64::from(secs))
                        )),
                        Err(e) => self.fail_unless_connected(e, "not changed")?,
                    }
                }
                Err(e) => self.screen.line(format!("! {e:#}")),
            },
            Input::Text(text) => {
                // The group may have changed name or state meanwhile.
                let g = self.app.resolve_group(&self.current.name).unwrap_or_else(|_| self.current.clone());
                if let Err(e) = self.app.send_text(self.conn, &g, text).await {
                    self.fail_unless_connected(e, "not sent")?;
                }
            }
        }
        Ok(true)
    }

    /// A failure the chat survives is shown; a lost connection ends it.
    fn fail_unless_connected(&self, e: AppError, what: &str) -> Result<()> {
        if let Some(reason) = self.conn.quic().close_reason() {
            return Err(app_error(e)).context(format!("the connection to the server was lost ({reason})"));
        }
        self.screen.line(format!("! {what}: {:#}", app_error(e)));
        Ok(())
    }

    /// Fetches what is new; shows the current group's entries and one
    /// line per other group with news.
    async fn catch_up(&mut self) -> Result<()> {
        let new = match self.app.sync(self.conn).await {
            Ok(new) => new,
            Err(e) => return self.fail_unless_connected(e, "could not fetch new messages"),
        };
        let now = now();
        let mut elsewhere: Vec<(Vec<u8>, String, usize, String)> = Vec::new();
        for e in &new {
            // An invitation (or a Welcome that failed) belongs to no group
            // yet: shown as it is, wherever the chat is.
            if e.group_id == self.current.id || e.group_id.is_empty() {
                self.screen.line(format_entry(e, now));
                continue;
            }
            let from = if e.kind == EntryKind::Text { one_line(&e.sender) } else { String::new() };
            match elsewhere.iter_mut().find(|x| x.0 == e.group_id) {
                Some(x) => {
                    x.2 += 1;
                    if !from.is_empty() {
                        x.3 = from;
                    }
                }
                None => elsewhere.push((e.group_id.clone(), e.group.clone(), 1, from)),
            }
        }
        for (id, name, n, from) in elsewhere {
            let total = match self.unread.iter_mut().find(|u| u.0 == id) {
                Some(u) => {
                    u.2 += n;
                    u.1 = name.clone();
                    u.2
                }
                None => {
                    self.unread.push((id, name.clone(), n));
                    n
                }
            };
            let from = if from.is_empty() { String::new() } else { format!(", last from {from}") };
            let name = one_line(&name);
            let plural = if total == 1 { "" } else { "s" };
            self.screen.line(format!("[{name}] {total} new line{plural}{from} (/switch {name})"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines_are_commands_or_text() {
        assert_eq!(Input::parse("hello"), Input::Text("hello"));
        assert_eq!(Input::parse("  indented  "), Input::Text("  indented"));
        assert_eq!(Input::parse("   "), Input::Nothing);
        assert_eq!(Input::parse("/quit"), Input::Quit);
        assert_eq!(Input::parse("/members "), Input::Members);
        assert_eq!(Input::parse("/switch  ops team "), Input::Switch("ops team"));
        assert_eq!(Input::parse("/switch"), Input::Usage("usage: /switch GROUP"));
        assert_eq!(Input::parse("/quit now"), Input::Usage("that command takes no argument"));
        assert_eq!(Input::parse("//etc/hosts is"), Input::Text("/etc/hosts is"));
        assert_eq!(Input::parse("/frobnicate x"), Input::Unknown("frobnicate"));
        assert_eq!(Input::parse("/file ./a b.txt"), Input::File("./a b.txt"));
        assert_eq!(Input::parse("/get 1a2b3c4d"), Input::Get("1a2b3c4d"));
        assert_eq!(Input::parse("/get"), Input::Usage("usage: /get ID (see the [file ID] line)"));
        assert_eq!(Input::parse("/disappear 1d"), Input::Disappear(Some("1d")));
        assert_eq!(Input::parse("/disappear"), Input::Disappear(None));
    }

    #[test]
    fn times_show_the_date_only_before_today() {
        let now = 1_795_856_400; // 2026-11-28 09:00:00Z
        assert_eq!(when(now - 60, now), "08:59Z");
        assert_eq!(when(now - 86_400, now), "2026-11-27 09:00Z");
    }

    #[test]
    fn entries_are_escaped() {
        let e = Entry {
            group_id: vec![1],
            group: "team".into(),
            seq: 1,
            sender: "mallory\u{1b}[2J".into(),
            sender_account: None,
            kind: EntryKind::Text,
            body: "hi\n12:00Z alice: forged".into(),
            time: 0,
            expires: None,
            imported: false,
        };
        let shown = format_entry(&e, 0);
        assert!(!shown.contains('\u{1b}'), "{shown}");
        assert_eq!(shown.lines().count(), 2);
        assert!(shown.lines().nth(1).is_some_and(|l| l.starts_with(screen::CONTINUATION)), "{shown}");
    }
}

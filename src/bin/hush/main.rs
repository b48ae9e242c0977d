//! `hush`: the hush command-line client. Thin: parse arguments, call the
//! library, print results on stdout, a one-line reason and exit code 1 on
//! failure.

use hush::out;

mod chat;
mod rpc;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use hush::client::app::history::HistorySent;
use hush::client::app::{files, safety_number, App, AppError, DeviceLink, Entry, EntryKind};
use hush::client::home::Home;
use hush::client::link::LinkCode;
use hush::client::local::valid_name;
use hush::client::screen::{self, one_line};
use hush::client::{ClientError, Connection};
use hush::limits::DEFAULT_LINK_LIFETIME;
use hush::util::{default_data_dir, format_unix};
use hush::wire::ErrorCode;

#[derive(Parser)]
#[command(name = "hush", version = hush::VERSION, about = "hush: end-to-end-encrypted group chat over a self-hosted relay")]
struct Cli {
    /// Home directory holding this account's and device's keys and state.
    #[arg(long, global = true, env = "HUSH_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this account and device (if needed), pin the server and register with it.
    Register {
        /// The server's address, hush://HOST:PORT/#FINGERPRINT, as hushd printed it.
        address: String,
        /// Invite token from the server's operator (`hushd invite`).
        #[arg(long)]
        invite: Option<String>,
        /// Your name, as shown on this device.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print your account id (first line) and its fingerprint.
    Whoami,
    /// Connect, authenticate, and print who and where you are.
    Status,
    /// Your contacts: local names for account ids (they never leave this device).
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Groups: create, add and remove members, list, leave.
    #[command(subcommand)]
    Group(GroupCmd),
    /// This account's devices: link a new one, list, revoke.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Send a message to a group (TEXT "-" reads standard input).
    Send {
        group: String,
        /// Share this file (encrypted on this device; TEXT, if any, is its
        /// caption).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// The file's name as members see it (default: its own name).
        #[arg(long, value_name = "NAME", requires = "file")]
        name: Option<String>,
        #[arg(required_unless_present = "file")]
        text: Vec<String>,
    },
    /// The files shared in a group, one a line, its id first.
    Files {
        group: String,
        /// One JSON object per line: id, name, size, sender, time.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a group's file, verify it and save it (under its name, made
    /// safe, in the current directory; never overwriting a file).
    Get {
        group: String,
        /// The id `hush files` shows (a unique prefix is enough).
        file_id: String,
        /// Write to this file instead (it must not exist).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Fetch Welcomes and messages; print what is new.
    Sync,
    /// Invitations from accounts that are not your contacts: they wait here
    /// until you accept or decline them (id first on each line).
    Invitations {
        #[command(subcommand)]
        action: Option<InvitationCmd>,
    },
    /// Show a group's local history.
    Read {
        group: String,
        /// One JSON object per line: group, sender, text, time, seq.
        #[arg(long)]
        json: bool,
    },
    /// Interactive chat: messages arrive live above the line you type;
    /// Enter sends it. Commands: /members, /groups, /switch GROUP, /help,
    /// /quit. On a terminal: line editing, history of what you sent, the
    /// group's last messages on start. With piped input: one line per
    /// message, exits at the end of the input.
    Chat { group: String },
    /// JSON-RPC 2.0 on standard input and output, one object per line, for
    /// bots and scripts: methods for what the CLI does, notifications for
    /// every message and group event, on one connection (see
    /// examples/jsonrpc.md). Holds the home: other hush commands on it are
    /// refused while it runs.
    Jsonrpc,
    /// The same JSON-RPC on a Unix socket (mode 0600), for several clients
    /// at once, until SIGTERM or Ctrl-C.
    Daemon {
        /// Where to listen (a new socket; a stale one is replaced).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Write an encrypted backup of this account (its key, contacts, device
    /// names and history; never the MLS keys) to FILE (created, mode 0600,
    /// never overwritten). The passphrase is asked on the terminal without
    /// echo, or read from --passphrase-file or HUSH_PASSPHRASE.
    Backup {
        file: PathBuf,
        #[arg(long, value_name = "PATH")]
        passphrase_file: Option<PathBuf>,
    },
    /// Restore a backup into a new, empty home: registers a new device of
    /// the account, takes back contacts and history, and rejoins every
    /// group. The device that made the backup is named `previous-device`.
    Restore {
        file: PathBuf,
        #[arg(long, value_name = "PATH")]
        passphrase_file: Option<PathBuf>,
    },
    /// Check a group's delivery chain: how far this device verified the
    /// server's history, how far each member had read when they last
    /// wrote, and any alarm with its evidence. Exits non-zero on an alarm.
    Verify {
        group: String,
        /// One JSON object: status, position, signed head, members, alarms
        /// with their evidence.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: hush::Shell },
    /// Print the manual page (roff; `hush man | man -l -`).
    Man,
}

#[derive(Subcommand)]
enum InvitationCmd {
    /// Join the group (its id, as `hush invitations` lists it).
    Accept { group: String },
    /// Leave the group without reading it; the server stops counting it for you.
    Decline { group: String },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// On the first device: print a one-time link code, wait for the new
    /// device to use it, certify it (it joins your groups on its first sync).
    Add {
        /// What to call the new device here (for `device list` and `revoke`).
        name: String,
        /// How much of this device's history to hand over, encrypted to
        /// the new device: all, none, or the last DURATION (30d, 12h, ...).
        #[arg(long, value_name = "all|none|DURATION", default_value = "all")]
        history: hush::client::history::HistoryChoice,
    },
    /// On the new device, in a new home: use a link code from `device add`
    /// ("-" reads it from standard input, so it stays out of the shell's
    /// history and the process list).
    Join { code: String },
    /// List this account's devices; marks this one.
    List,
    /// On the first device: revoke a device (the server refuses it at once
    /// and removes it from your groups).
    Revoke { name: String },
}

#[derive(Subcommand)]
enum ContactCmd {
    /// Give an account id a name.
    Add { name: String, account: String },
    /// List contacts.
    List,
    /// Forget a contact.
    Remove { name: String },
    /// Show the safety number to compare in person.
    Verify { name: String },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group (its name is shared with members encrypted).
    Create {
        name: String,
        /// The group's MLS ciphersuite: classic (X25519) or pq (the hybrid
        /// X-Wing KEM, ML-KEM-768 with X25519: recorded traffic stays
        /// safe from a future quantum computer). Fixed for the group's life.
        #[arg(long, value_name = "classic|pq", default_value_t = hush::mls::DEFAULT_SUITE)]
        suite: hush::mls::Suite,
    },
    /// Add contacts (names or account ids).
    Add {
        group: String,
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Remove members.
    Remove {
        group: String,
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// List a group's members.
    Members { group: String },
    /// What this device knows of a group: its name, id, whether you are in
    /// it, its members and its disappearing-message timer.
    Info {
        group: String,
        /// One JSON object: name, id, active, members, disappear_seconds.
        #[arg(long)]
        json: bool,
    },
    /// Change a group's settings (every member sees the change).
    Set {
        group: String,
        /// Delete new messages (and files) from every device and the server
        /// this long after they are sent: 30s, 10m, 12h, 7d, 2w, or `off`.
        #[arg(long, value_name = "DURATION|off")]
        disappear: String,
    },
    /// List your groups.
    List,
    /// Leave a group.
    Leave { group: String },
    /// Rejoin a group without proof that the server's state of it follows
    /// this device's (only after `sync` said it could not verify it, and
    /// you checked the members it names with another member).
    Rejoin { group: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hush: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open_app(home: &Home) -> Result<App> {
    home.open().map_err(app_error)
}

fn print_entry(e: &Entry) {
    if e.kind == EntryKind::Text {
        out!("[{}] {}: {}", one_line(&e.group), one_line(&e.sender), screen::body(&e.body));
    } else if e.kind == EntryKind::Alarm {
        out!("[{}] !! {}", one_line(&e.group), screen::body(&e.body));
    } else {
        out!("[{}] * {}", one_line(&e.group), screen::body(&e.body));
    }
}

/// Runs `f` with an open app and a connection, on one thread.
fn online<T>(home: &Home, f: impl AsyncFnOnce(&mut App, &Connection) -> Result<T, AppError>) -> Result<T> {
    let mut app = open_app(home)?;
    runtime()?.block_on(async {
        let conn = app.connect().await.map_err(app_error)?;
        let r = f(&mut app, &conn).await;
        conn.close().await;
        r.map_err(app_error)
    })
}

/// [`online`] for work that may reconnect (file transfers).
fn online_mut<T>(home: &Home, f: impl AsyncFnOnce(&mut App, &mut Connection) -> Result<T, AppError>) -> Result<T> {
    let mut app = open_app(home)?;
    runtime()?.block_on(async {
        let mut conn = app.connect().await.map_err(app_error)?;
        let r = f(&mut app, &mut conn).await;
        conn.close().await;
        r.map_err(app_error)
    })
}

fn app_error(e: AppError) -> anyhow::Error {
    match e {
        AppError::Client(c) => explain(c),
        other => anyhow::Error::new(other),
    }
}

fn run(cli: Cli) -> Result<()> {
    let home = match cli.home {
        Some(h) => Home::new(h),
        None => Home::new(default_data_dir("hush").context("no home directory: set --home, HUSH_HOME or HOME")?),
    };
    // One serving process holds the home alone; every other command
    // shares it (held until this process ends).
    let serving = matches!(cli.command, Command::Jsonrpc | Command::Daemon { .. });
    let _lock = match &cli.command {
        Command::Completions { .. } | Command::Man => None,
        _ if home.dir().is_dir() => Some(home.lock(serving).map_err(|e| app_error(e.into()))?),
        _ => None,
    };
    match cli.command {
        Command::Completions { shell } => {
            hush::completions(shell, &mut Cli::command(), &mut std::io::stdout().lock());
            Ok(())
        }
        Command::Man => Ok(hush::man_page(Cli::command(), &mut std::io::stdout().lock())?),
        Command::Register { address, invite, name } => register(&home, &address, invite, name),
        Command::Whoami => {
            let app = open_app(&home)?;
            out!("{}", app.account());
            out!("device      {}", app.certificate().device);
            if let Some(name) = home.name() {
                out!("name        {name}");
            }
            if let Ok(server) = home.server() {
                out!("server      {server}");
            }
            Ok(())
        }
        Command::Status => {
            let id = home.device()?;
            let server = home.server()?;
            let status = runtime()?.block_on(async {
                let conn = Connection::connect(&server, &id).await?;
                let status = conn.status().await;
                conn.close().await;
                status
            });
            let status = status.map_err(explain)?;
            out!("account     {}", status.account);
            out!("device      {}", status.device);
            if let Some(name) = home.name() {
                out!("name        {name}");
            }
            out!("server      {server}");
            out!("registered  {}", format_unix(status.registered_at));
            out!("server time {}", format_unix(status.server_time));
            out!("connection  authenticated");
            Ok(())
        }
        Command::Contact(cmd) => contact(&home, cmd),
        Command::Device(cmd) => device(&home, cmd),
        Command::Group(cmd) => group(&home, cmd),
        Command::Send { group, file: Some(path), name, text } => {
            let caption = text.join(" ");
            let (sent, arrived) = online_mut(&home, async |app, conn| {
                let g = app.resolve_group(&group)?;
                let arrived = app.sync(conn).await?;
                let g = app.resolve_group(&g.name)?;
                let mut bar = transfer::Bar::new("sending");
                Ok((app.send_file(conn, &g, &path, name.as_deref(), &caption, &mut bar).await?, arrived))
            })?;
            for e in &arrived {
                print_entry(e);
            }
            eprintln!("sent {} ({}, #{})", files::file_id(&sent.id), files::human(sent.size), sent.seq);
            Ok(())
        }
        Command::Files { group, json } => {
            let app = open_app(&home)?;
            let g = app.resolve_group(&group)?;
            for f in app.files(&g).map_err(app_error)? {
                if json {
                    let line = serde_json::json!({
                        "id": f.id, "name": f.name, "size": f.size, "sender": f.sender, "time": f.time,
                        "media_type": f.media_type,
                    });
                    out!("{line}");
                } else {
                    out!(
                        "{}  {}  {}  {}  {}",
                        f.id,
                        screen::body(&f.name),
                        files::human(f.size),
                        one_line(&f.sender),
                        format_unix(f.time)
                    );
                }
            }
            Ok(())
        }
        Command::Get { group, file_id, output } => {
            let target = match output {
                Some(path) => files::Target::Exactly(path),
                None => files::Target::Into(PathBuf::from(".")),
            };
            let saved = online_mut(&home, async |app, conn| {
                let g = app.resolve_group(&group)?;
                let mut bar = transfer::Bar::new("fetching");
                // Ctrl-C drops the transfer, which removes its partial file.
                tokio::select! {
                    saved = app.save_file(conn, &g, &file_id, target, &mut bar) => saved,
                    _ = tokio::signal::ctrl_c() => Err(AppError::File("interrupted; nothing was saved".into())),
                }
            })?;
            out!("{}", saved.display());
            Ok(())
        }
        Command::Send { group, file: None, text, .. } => {
            let text = if text == ["-"] {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading standard input")?;
                s.trim_end_matches('\n').to_string()
            } else {
                text.join(" ")
            };
            if text.is_empty() {
                bail!("nothing to send");
            }
            let (seq, arrived) = online(&home, async |app, conn| {
                let g = app.resolve_group(&group)?;
                // Catch up first (also prints what arrived meanwhile).
                let arrived = app.sync(conn).await?;
                let g = app.resolve_group(&g.name)?;
                Ok((app.send_text(conn, &g, &text).await?, arrived))
            })?;
            for e in &arrived {
                print_entry(e);
            }
            eprintln!("sent (#{seq})");
            Ok(())
        }
        Command::Invitations { action: None } => {
            let app = open_app(&home)?;
            let waiting = app.invitations().map_err(app_error)?;
            for i in &waiting {
                out!(
                    "{}  from {}  {} device(s)  {}",
                    hush::auth::text::encode(&i.group),
                    one_line(&app.display(&i.inviter)),
                    i.members,
                    format_unix(i.at)
                );
            }
            eprintln!("{} invitation(s) waiting", waiting.len());
            Ok(())
        }
        Command::Invitations { action: Some(InvitationCmd::Accept { group }) } => {
            let new = online(&home, async |app, conn| app.accept_invitation(conn, &group).await)?;
            for e in &new {
                print_entry(e);
            }
            Ok(())
        }
        Command::Invitations { action: Some(InvitationCmd::Decline { group }) } => {
            online(&home, async |app, conn| app.decline_invitation(conn, &group).await)?;
            out!("declined {group}");
            Ok(())
        }
        Command::Sync => {
            let (new, failed) = online(&home, async |app, conn| {
                let new = app.sync(conn).await?;
                Ok((new, app.sync_failures().to_vec()))
            })?;
            for e in &new {
                print_entry(e);
            }
            let mut alarmed: Vec<String> =
                new.iter().filter(|e| e.kind == EntryKind::Alarm).map(|e| one_line(&e.group)).collect();
            alarmed.dedup();
            if !alarmed.is_empty() {
                bail!("the server broke the delivery history of {}: see `hush verify GROUP`", alarmed.join(", "));
            }
            match failed.as_slice() {
                [] => Ok(()),
                [(group, why)] => bail!("could not sync {}: {why}", one_line(group)),
                many => {
                    let names: Vec<String> = many.iter().map(|(g, _)| one_line(g)).collect();
                    bail!("could not sync {} groups ({}); see each group's history", many.len(), names.join(", "))
                }
            }
        }
        Command::Read { group, json } => {
            let app = open_app(&home)?;
            let g = app.resolve_group(&group)?;
            for e in app.history(&g)? {
                if json {
                    let text = if e.kind == EntryKind::Text { e.body.clone() } else { format!("* {}", e.body) };
                    let mut line = serde_json::json!({
                        "group": e.group, "sender": e.sender, "text": text, "time": e.time, "seq": e.seq,
                        "kind": e.kind.as_str(),
                    });
                    if let (true, Some(fields)) = (e.imported, line.as_object_mut()) {
                        // Handed over by another device of the account.
                        fields.insert("imported".into(), true.into());
                    }
                    if let (Some(t), Some(fields)) = (e.expires, line.as_object_mut()) {
                        // When it disappears, and how long is left.
                        fields.insert("expires_at".into(), t.into());
                        fields.insert("expires_in".into(), t.saturating_sub(hush::util::now_unix()).into());
                    }
                    out!("{line}");
                } else if e.kind == EntryKind::Text {
                    out!("{} {}: {}", format_unix(e.time), one_line(&e.sender), screen::body(&e.body));
                } else if e.kind == EntryKind::Alarm {
                    out!("{} !! {}", format_unix(e.time), screen::body(&e.body));
                } else {
                    out!("{} * {}", format_unix(e.time), screen::body(&e.body));
                }
            }
            Ok(())
        }
        Command::Chat { group } => chat(&home, &group),
        Command::Jsonrpc => rpc::jsonrpc(open_app(&home)?),
        Command::Daemon { socket } => rpc::daemon(open_app(&home)?, &socket),
        Command::Verify { group, json } => verify(&home, &group, json),
        Command::Backup { file, passphrase_file } => {
            let passphrase = passphrase(passphrase_file.as_deref(), true)?;
            let bytes = home.backup(passphrase.as_bytes()).map_err(app_error)?;
            hush::util::write_private(&file, &bytes, false)
                .with_context(|| format!("writing {} (it must not exist)", file.display()))?;
            out!("backed up to {} ({} bytes)", file.display(), bytes.len());
            Ok(())
        }
        Command::Restore { file, passphrase_file } => {
            let bytes = read_bounded(&file, hush::client::backup::MAX_BACKUP)?;
            let passphrase = passphrase(passphrase_file.as_deref(), false)?;
            let r = runtime()?.block_on(home.restore(&bytes, passphrase.as_bytes())).map_err(app_error)?;
            out!(
                "restored {} on {}: {} contact(s), {} group(s), {} history line(s)",
                r.account,
                r.server,
                r.contacts,
                r.groups,
                r.lines
            );
            // Rejoin every group now, as a further device of the account.
            let new = online(&home, async |app, conn| app.sync(conn).await)?;
            for e in &new {
                print_entry(e);
            }
            eprintln!(
                "the device the backup came from is `previous-device`; if it is lost, revoke it: hush device revoke previous-device"
            );
            Ok(())
        }
    }
}

/// `hush verify`: what this device knows of the group's chain.
fn verify(home: &Home, group: &str, json: bool) -> Result<()> {
    let app = open_app(home)?;
    let g = app.resolve_group(group)?;
    let r = app.chain_report(&g).map_err(app_error)?;
    let hex = hush::client::verify::hex;
    if json {
        let alarms: Vec<serde_json::Value> = r
            .alarms
            .iter()
            .map(|a| {
                let evidence = a.evidence.as_deref().and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok());
                serde_json::json!({"seq": a.seq, "time": a.time, "text": a.body, "evidence": evidence})
            })
            .collect();
        let behind = r.behind();
        let members: Vec<serde_json::Value> = r
            .members
            .iter()
            .map(|(name, at, seen)| {
                let lag = behind.iter().find(|(n, _)| n == name).map(|(_, l)| *l);
                serde_json::json!({"name": name, "last_wrote": at, "had_read": seen, "behind": lag})
            })
            .collect();
        let line = serde_json::json!({
            "group": r.group,
            "status": if r.alarmed() { "alarm" } else { "ok" },
            "verified_from": r.position.map(|(_, since)| since),
            "position": r.position.map(|(p, _)| serde_json::json!({"seq": p.seq, "head": hex(&p.head.0)})),
            "signed": r.signed.map(|s| serde_json::json!({
                "seq": s.seq, "head": hex(&s.head.0), "key": hex(&s.key), "signature": hex(&s.signature),
            })),
            "members": members,
            "alarms": alarms,
        });
        out!("{line}");
    } else {
        let name = one_line(&r.group);
        match r.position {
            None => out!("{name}: no message of its chain read yet"),
            Some((p, since)) => {
                out!("{name}: chain verified from message {since} to message {} (head {})", p.seq, p.head.short())
            }
        }
        if let Some(s) = r.signed {
            out!("  signed by the server up to message {} (head {})", s.seq, s.head.short());
        }
        let behind = r.behind();
        for (member, at, seen) in &r.members {
            let lag = behind.iter().find(|(n, _)| n == member).map(|(_, l)| *l);
            match lag {
                Some(l) => out!(
                    "  {}: wrote message {at} having read up to {seen}: has not seen the last {l} messages",
                    one_line(member)
                ),
                None => out!("  {}: wrote message {at} having read up to {seen}", one_line(member)),
            }
        }
        for a in &r.alarms {
            out!("  !! {} {}", format_unix(a.time), screen::body(&a.body));
        }
        if r.alarms.is_empty() {
            out!("  no alarms");
        }
    }
    if r.alarmed() {
        bail!(
            "{} alarm(s) in {}: the server showed this device a history it cannot stand by (evidence: `hush verify {} --json`)",
            r.alarms.len(),
            one_line(&r.group),
            one_line(group)
        );
    }
    Ok(())
}

fn device(home: &Home, cmd: DeviceCmd) -> Result<()> {
    match cmd {
        DeviceCmd::Add { name, history } => {
            let account = home.account_key()?;
            let mut app = open_app(home)?;
            app.check_device_name(&name).map_err(app_error)?;
            let code = LinkCode::generate(app.server.clone())?;
            let lifetime = DEFAULT_LINK_LIFETIME;
            let deadline = std::time::Instant::now() + lifetime;
            let person = home.name();
            let certified = runtime()?.block_on(async {
                let mut conn = app.connect().await.map_err(app_error)?;
                let lifetime_secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
                conn.link_open(code.id(), lifetime_secs).await.map_err(explain)?;
                out!("{code}");
                eprintln!(
                    "on the new device run: hush --home NEW_DIR device join CODE (the code works once, for {} minutes); waiting…",
                    lifetime.as_secs() / 60
                );
                let link = DeviceLink { name: &name, person: person.as_deref(), history };
                let mut bar = transfer::Bar::new("handing the history over");
                let r = app.certify_linked_device(&mut conn, &account, &code, &link, deadline, &mut bar).await;
                conn.close().await;
                r.map_err(app_error)
            })?;
            eprintln!("certified {name} ({}); it joins your groups on its first `hush sync`", certified.device);
            match &certified.history {
                HistorySent::NotAsked => {}
                HistorySent::Nothing => eprintln!("no history to hand over"),
                HistorySent::NoGroup => {
                    eprintln!("warning: the history was not handed over: you are in no group it could be uploaded to")
                }
                HistorySent::Sent { groups, lines, files, bytes, carrier_timer } => {
                    eprintln!(
                        "handed over {lines} line(s) and {files} file message(s) of {groups} group(s), encrypted to {name} ({})",
                        files::human(*bytes)
                    );
                    if let Some(timer) = carrier_timer {
                        eprintln!(
                            "warning: every group you are in has disappearing messages; the history is deleted from the server {} after it was handed over: {name} must join before then",
                            hush::util::format_timer(*timer)
                        );
                    }
                }
                HistorySent::Failed(why) => {
                    eprintln!("warning: the history was not handed over ({why}); {name} starts without it")
                }
            }
            let left_out = &certified.left_out;
            if !left_out.is_empty() {
                let names: Vec<String> = left_out.iter().map(|n| one_line(n)).collect();
                eprintln!(
                    "warning: the state of {} did not fit in the link; {name} joins there checking only that the group is not older than here (compare members with another member)",
                    names.join(", ")
                );
            }
        }
        DeviceCmd::Join { code } => {
            let code = if code == "-" {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("reading the link code from standard input")?;
                line.trim().to_string()
            } else {
                code
            };
            let mut bar = transfer::Bar::new("fetching the history");
            let joined = runtime()?.block_on(home.join(&code, &mut bar)).map_err(app_error)?;
            out!("linked this device to {}", joined.account);
            eprintln!(
                "took over {} contact(s) and {} group(s); run `hush sync` to join the groups",
                joined.contacts, joined.groups
            );
            match &joined.history {
                None => {}
                Some(Ok(t)) => eprintln!(
                    "took over {} line(s) and {} file message(s) of history in {} group(s) (marked as handed over)",
                    t.lines, t.files, t.groups
                ),
                Some(Err(why)) => eprintln!("warning: {why}"),
            }
        }
        DeviceCmd::List => {
            let devices = online(home, async |app, conn| app.devices(conn).await)?;
            for d in devices {
                let name = d.name.as_deref().map(one_line).unwrap_or_else(|| "-".into());
                let mut flags = String::new();
                if d.this {
                    flags.push_str("  (this device)");
                }
                if d.revoked {
                    flags.push_str("  (revoked)");
                }
                out!("{}  {name}  registered {}{flags}", d.device, format_unix(d.registered_at));
            }
        }
        DeviceCmd::Revoke { name } => {
            let account = home.account_key()?;
            let device = online(home, async |app, conn| app.revoke_device(conn, &account, &name).await)?;
            out!("revoked {name} ({device})");
            eprintln!("the server refuses it from now on; your groups drop it with their next change");
        }
    }
    Ok(())
}

fn contact(home: &Home, cmd: ContactCmd) -> Result<()> {
    let app = open_app(home)?;
    match cmd {
        ContactCmd::Add { name, account } => {
            let a = app.contact_add(&name, &account)?;
            out!("{name} = {a}");
        }
        ContactCmd::List => {
            for (name, a) in app.contacts()? {
                out!("{}  {a}", one_line(&name));
            }
        }
        ContactCmd::Remove { name } => app.contact_remove(&name)?,
        ContactCmd::Verify { name } => {
            let a = app.resolve_contact(&name)?;
            out!("{}", safety_number(&app.account(), &a));
            eprintln!("compare this number with {name}'s `hush contact verify` for you; equal numbers mean the keys are right");
        }
    }
    Ok(())
}

fn group(home: &Home, cmd: GroupCmd) -> Result<()> {
    match cmd {
        GroupCmd::Create { name, suite } => {
            let name = name.trim().to_string();
            if !valid_name(&name) {
                bail!("group names are 1 to 64 printable characters");
            }
            online(home, async |app, conn| app.create_group(conn, &name, suite).await)?;
            out!("created {name} ({suite})");
        }
        GroupCmd::Add { group, contacts } => {
            online(home, async |app, conn| {
                let accounts = contacts.iter().map(|c| app.resolve_contact(c)).collect::<Result<Vec<_>, _>>()?;
                let g = app.resolve_group(&group)?;
                app.add(conn, &g, &accounts).await
            })?;
            out!("added {} to {group}", contacts.join(", "));
        }
        GroupCmd::Remove { group, contacts } => {
            online(home, async |app, conn| {
                let accounts = contacts.iter().map(|c| app.resolve_contact(c)).collect::<Result<Vec<_>, _>>()?;
                let g = app.resolve_group(&group)?;
                app.remove(conn, &g, &accounts).await
            })?;
            out!("removed {} from {group}", contacts.join(", "));
        }
        GroupCmd::Members { group } => {
            let mut app = open_app(home)?;
            let g = app.resolve_group(&group)?;
            for m in app.members(&g) {
                out!("{}", one_line(&m));
            }
        }
        GroupCmd::Info { group, json } => {
            let mut app = open_app(home)?;
            let g = app.resolve_group(&group)?;
            let members = app.members(&g);
            let timer = app.disappear(&g);
            let suite = app.suite(&g).unwrap_or_else(|| "-".into());
            let id = hush::auth::text::encode(&g.id);
            if json {
                let line = serde_json::json!({
                    "name": g.name, "id": id, "active": g.active, "members": members,
                    "disappear_seconds": timer, "suite": suite,
                });
                out!("{line}");
            } else {
                out!("name: {}", one_line(&g.name));
                out!("id: {id}");
                out!("member: {}", if g.active { "yes" } else { "no (left or removed)" });
                out!("members: {}", members.iter().map(|m| one_line(m)).collect::<Vec<_>>().join(", "));
                out!("disappearing messages: {}", hush::util::format_timer(u64::from(timer)));
                out!("suite: {suite}");
            }
        }
        GroupCmd::Set { group, disappear } => {
            let secs = parse_timer(&disappear)?;
            online(home, async |app, conn| {
                let g = app.resolve_group(&group)?;
                app.set_disappear(conn, &g, secs).await
            })?;
            out!("disappearing messages in {group}: {}", hush::util::format_timer(u64::from(secs)));
        }
        GroupCmd::List => {
            let app = open_app(home)?;
            for g in app.groups()? {
                let state = if g.active { "" } else { "  (left)" };
                out!("{}  {}{state}", one_line(&g.name), hush::auth::text::encode(&g.id));
            }
        }
        GroupCmd::Leave { group } => {
            online(home, async |app, conn| {
                let g = app.resolve_group(&group)?;
                app.leave(conn, &g).await
            })?;
            out!("left {group}");
        }
        GroupCmd::Rejoin { group } => {
            let new = online(home, async |app, conn| {
                let g = app.resolve_group(&group)?;
                app.rejoin_unverified(conn, &g).await
            })?;
            for e in &new {
                print_entry(e);
            }
        }
    }
    Ok(())
}

/// The file at `path`, refused (before reading it all) if it is larger
/// than `max` bytes.
fn read_bounded(path: &std::path::Path, max: usize) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, limit), &mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > max {
        bail!("{} is larger than a backup can be ({max} bytes)", path.display());
    }
    Ok(bytes)
}

/// The backup passphrase: from `file`, else `HUSH_PASSPHRASE`, else asked
/// on the terminal without echo (twice when `confirm`). Never from argv.
fn passphrase(file: Option<&std::path::Path>, confirm: bool) -> Result<zeroize::Zeroizing<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(zeroize::Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    if let Ok(text) = std::env::var("HUSH_PASSPHRASE") {
        return Ok(zeroize::Zeroizing::new(text));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!("no passphrase: give --passphrase-file PATH or HUSH_PASSPHRASE (it is asked only on a terminal)");
    }
    let first = read_hidden("passphrase: ")?;
    if confirm && *read_hidden("again: ")? != *first {
        bail!("the two passphrases differ; nothing was written");
    }
    Ok(first)
}

/// A line read from the terminal with echo off.
fn read_hidden(prompt: &str) -> Result<zeroize::Zeroizing<String>> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning echo off")?;
    eprint!("{prompt}");
    let mut line = zeroize::Zeroizing::new(String::new());
    let read = std::io::BufRead::read_line(&mut stdin.lock(), &mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("reading the passphrase")?;
    let trimmed = line.trim_end_matches(['\n', '\r']).len();
    line.truncate(trimmed);
    Ok(line)
}

/// A disappearing-message timer from the command line: a duration
/// (`30s`, `10m`, `12h`, `7d`, `2w`) up to a year, or `off`.
pub(crate) fn parse_timer(text: &str) -> Result<u32> {
    let text = text.trim();
    if matches!(text, "off" | "0") {
        return Ok(0);
    }
    let d = hush::util::parse_duration(text).with_context(|| format!("--disappear {text:?}"))?;
    if d > hush::limits::MAX_DISAPPEAR {
        bail!(
            "--disappear {text}: the longest timer is {}",
            hush::util::format_timer(hush::limits::MAX_DISAPPEAR.as_secs())
        );
    }
    u32::try_from(d.as_secs()).context("--disappear")
}

fn chat(home: &Home, group: &str) -> Result<()> {
    let mut app = open_app(home)?;
    let runtime = runtime()?;
    if chat::on_a_terminal() && chat::interactive(&mut app, group, &runtime)? {
        return Ok(());
    }
    piped(&mut app, group, &runtime)
}

/// `chat` in line mode: standard input is not a terminal (or cannot be
/// driven). Scripts depend on this: lines in, sent in order, received
/// messages printed as `[GROUP] SENDER: TEXT`, exit at the end of input.
fn piped(app: &mut App, group: &str, runtime: &tokio::runtime::Runtime) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let name = app.resolve_group(group)?.name;
    runtime.block_on(async {
        let conn = app.connect().await.map_err(app_error)?;
        for e in app.sync(&conn).await.map_err(app_error)? {
            print_entry(&e);
        }
        let mut pushes = chat::push_wakeups(&conn);
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut purge = tokio::time::interval(hush::limits::CLIENT_PURGE_INTERVAL);
        eprintln!("chatting in {}; /members, /quit", one_line(&name));
        loop {
            tokio::select! {
                _ = purge.tick() => {
                    app.purge_expired().map_err(app_error)?;
                }
                line = lines.next_line() => {
                    let Some(line) = line.context("reading standard input")? else { break };
                    // The interactive chat's parser; in line mode only
                    // `/quit` and `/members` are commands, and every other
                    // line is sent as it is (scripts depend on that).
                    match chat::Input::parse(&line) {
                        chat::Input::Nothing => {}
                        chat::Input::Quit if line.trim_end() == "/quit" => break,
                        chat::Input::Members => {
                            let g = app.resolve_group(&name)?;
                            let members: Vec<String> = app.members(&g).iter().map(|m| one_line(m)).collect();
                            out!("{}", members.join(", "));
                        }
                        _ => {
                            let g = app.resolve_group(&name)?;
                            app.send_text(&conn, &g, line.trim_end()).await.map_err(app_error)?;
                        }
                    }
                }
                Some(()) = pushes.recv() => {
                    for e in app.sync(&conn).await.map_err(app_error)? {
                        print_entry(&e);
                    }
                }
            }
        }
        // A last look for anything that arrived while we typed.
        for e in app.sync(&conn).await.map_err(app_error)? {
            print_entry(&e);
        }
        conn.close().await;
        Ok(())
    })
}

fn register(home: &Home, address: &str, invite: Option<String>, name: Option<String>) -> Result<()> {
    let r = runtime()?.block_on(home.register(address, invite.as_deref(), name.as_deref())).map_err(app_error)?;
    let address = &r.server;
    if r.created_keys {
        eprintln!("created a new identity in {}", home.dir().display());
    }
    if r.new {
        out!("registered {} on {address}", r.account);
    } else {
        out!("already registered: {} on {address}", r.account);
    }
    Ok(())
}

/// Turns a client error into a message a person can act on.
fn explain(e: ClientError) -> anyhow::Error {
    let hint = match e.code() {
        Some(ErrorCode::InviteRequired) => {
            Some("ask the server's operator for an invite (`hushd invite`) and pass --invite")
        }
        Some(ErrorCode::InviteUnknown | ErrorCode::InviteExpired | ErrorCode::InviteUsedUp) => {
            Some("invite refused; ask the server's operator for a new one")
        }
        Some(ErrorCode::NotRegistered) => Some("run `hush register ADDRESS --invite TOKEN` first"),
        Some(ErrorCode::Revoked) => {
            Some("this device can no longer use the server; if that is a mistake, ask the server's operator")
        }
        _ => None,
    };
    match hint {
        Some(h) => anyhow::anyhow!("{e}; {h}"),
        None => anyhow::Error::new(e),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")
}

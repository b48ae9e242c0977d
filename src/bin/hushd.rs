//! `hushd`: the hush relay server. Thin: parse arguments, call the library,
//! print results on stdout, logs on stderr, `{:#}` errors with exit code 1.

use hush::out;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use hush::auth::{HushAddress, Identity};
use hush::config::ServerConfig;
use hush::db::open::OperatorRemoval;
use hush::db::{Database, Location};
use hush::limits::{DEFAULT_INVITE_LIFETIME, DEFAULT_INVITE_USES, MAX_INVITE_USES};
use hush::server::{DataDir, Server, ADDRESS_FILE};
use hush::util::{default_data_dir, format_unix, now_unix, parse_duration};

#[derive(Parser)]
#[command(
    name = "hushd",
    version = hush::VERSION,
    about = "hush relay server: an MLS Delivery Service for end-to-end-encrypted group chat"
)]
struct Cli {
    /// Data directory (key, database, optional hushd.toml).
    #[arg(long, global = true, env = "HUSHD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL database instead of the embedded SQLite file
    /// (`postgresql://…`; also HUSHD_DATABASE_URL or `database_url` in
    /// hushd.toml). Several nodes may share it.
    #[arg(long, global = true, value_name = "URL")]
    database: Option<String>,
    /// Log format on stderr: `human` (default) or `json` (one object per
    /// line, for log collectors).
    #[arg(long, global = true, env = "HUSHD_LOG_FORMAT", value_name = "FORMAT", default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum AccountsCmd {
    /// Offboard an account: refuse all its devices from now on and propose
    /// their removal from every group (works while serving; the next commit
    /// by any member applies it).
    Remove {
        /// The account id, as `hushd accounts` lists it.
        id: String,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a new online key, certified by the identity key, for TLS and
    /// the server's signatures. The address stays the same: nobody
    /// re-pins. A running hushd uses it for new connections within two
    /// seconds; connections made before keep the old one until they close.
    Rotate {
        /// The identity key, if it was exported (`keys export-identity`);
        /// it is read, used and never copied into the data directory.
        #[arg(long, value_name = "FILE")]
        identity_key: Option<PathBuf>,
        /// How long the new key is certified for, e.g. 30d, 12w [default:
        /// 90d; at most 365d].
        #[arg(long, value_name = "DURATION")]
        valid_for: Option<String>,
    },
    /// Move the identity key out of the data directory into FILE (a new
    /// file, mode 600), so that it can be kept offline. An online key is
    /// made first if there is none valid for 30 days more; the server
    /// keeps serving with it. Renewing it later needs `keys rotate
    /// --identity-key FILE`.
    ExportIdentity {
        /// Where to write the identity key (never overwritten).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum GroupsCmd {
    /// Take one account out of one group: its devices stop being members at
    /// once (no longer counted against its group quota) and the server
    /// proposes the removal of their leaves (works while serving; the next
    /// commit by any member applies it). The group id is the one
    /// `hush group list` shows.
    RemoveMember {
        /// The group id.
        group: String,
        /// The account id, as `hushd accounts` lists it.
        account: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (creates key and database on first run) and print its
    /// address once listening.
    Serve {
        /// UDP address to listen on [default: [::]:7443].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Host name to put in the printed address (what clients dial).
        #[arg(long, value_name = "HOST")]
        public_host: Option<String>,
        /// Serve Prometheus metrics on this TCP address, e.g.
        /// 127.0.0.1:9443 (off by default; loopback only unless
        /// `metrics_public = true`).
        #[arg(long, env = "HUSHD_METRICS", value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Create the key and database without serving; print the address.
    Init,
    /// Create an invite; prints the token alone on the last line of stdout.
    Invite {
        /// How many registrations the invite allows.
        #[arg(long, default_value_t = DEFAULT_INVITE_USES)]
        uses: u32,
        /// Lifetime, e.g. 30m, 12h, 7d, 2w [default: 7d].
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List registered accounts (removed ones marked), or remove one.
    Accounts {
        #[command(subcommand)]
        action: Option<AccountsCmd>,
    },
    /// List invites (ids, uses left, expiry; never the secret).
    Invites,
    /// The server's keys: which one serves, and until when (no action);
    /// rotate the online key; export the identity key.
    Keys {
        #[command(subcommand)]
        action: Option<KeysCmd>,
    },
    /// Act on one group's membership (the operator's tools).
    Groups {
        #[command(subcommand)]
        action: GroupsCmd,
    },
    /// Counts only: accounts, devices, groups, messages held and the oldest
    /// one's age, Welcomes waiting, invites outstanding, database size.
    /// Works while serving.
    Stats,
    /// Measure hush against raw quinn, raw SQLite and raw PostgreSQL on this
    /// machine (in one process, on loopback, with a temporary data directory
    /// and, where PostgreSQL's binaries are installed, a throwaway cluster).
    Bench {
        /// A few seconds in all: checks that it works, numbers are rough.
        #[arg(long)]
        quick: bool,
        /// One JSON object per scenario: scenario, hush, baseline, ratio, unit.
        #[arg(long)]
        json: bool,
        /// Only these scenario groups (comma-separated): memory, handshakes,
        /// round-trips, durable, chain, slow-disk, latency, fan-out, cli,
        /// bytes, commits, large-groups, files, postgres.
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        only: Vec<String>,
        /// Also write the growth curves (commit cost by group size,
        /// latency by offered load, memory by connections) as SVG files
        /// into this directory.
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
    },
    /// Check the data directory: key file, configuration, database
    /// integrity and schema. Exits non-zero if anything is wrong.
    Check,
    /// Copy the database to PATH with SQLite's online backup (safe while
    /// the server runs). The key files are not included: copy them
    /// separately.
    /// On PostgreSQL it refuses and points to pg_dump.
    Backup { path: PathBuf },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: hush::Shell },
    /// Print the manual page (roff; `hushd man | man -l -`).
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmark's own server would otherwise log over its progress bar.
    init_logging(if matches!(cli.command, Command::Bench { .. }) { "warn" } else { "info" }, cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hushd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How logs are written.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn data_dir(cli: &Cli) -> Result<DataDir> {
    match &cli.data_dir {
        Some(d) => Ok(DataDir(d.clone())),
        None => default_data_dir("hushd")
            .map(DataDir)
            .context("no data directory: set --data-dir, HUSHD_DATA_DIR, XDG_DATA_HOME or HOME"),
    }
}

fn load_config(dir: &DataDir) -> Result<ServerConfig> {
    Ok(ServerConfig::load(&dir.0, std::env::vars())?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Completions { shell } => {
            hush::completions(shell, &mut Cli::command(), &mut std::io::stdout().lock());
            return Ok(());
        }
        Command::Man => return Ok(hush::man_page(Cli::command(), &mut std::io::stdout().lock())?),
        _ => {}
    }
    let dir = data_dir(&cli)?;
    let database = cli.database.clone();
    let load_config = |dir: &DataDir| -> Result<ServerConfig> {
        let mut config = load_config(dir)?;
        if let Some(url) = &database {
            config.database_url = Some(hush::config::DatabaseUrl(url.clone()));
        }
        Ok(config)
    };
    match cli.command {
        Command::Serve { listen, public_host, metrics } => {
            let mut config = load_config(&dir)?;
            if let Some(l) = listen {
                config.listen = l;
            }
            if metrics.is_some() {
                config.metrics_listen = metrics;
            }
            if public_host.is_some() {
                config.public_host = public_host;
            }
            config.validate()?;
            serve(config, dir)
        }
        Command::Init => {
            let config = load_config(&dir)?;
            let hush::server::Initialised { keys, .. } = dir.init(&config)?;
            let address = HushAddress {
                host: config.advertised_host(config.listen),
                port: config.listen.port(),
                fingerprint: keys.fingerprint(),
            };
            eprintln!("{} {}", if keys.created { "created" } else { "already initialised:" }, dir.0.display());
            out!("{address}");
            Ok(())
        }
        Command::Invite { uses, expires } => {
            if uses == 0 || uses > MAX_INVITE_USES {
                bail!("--uses must be between 1 and {MAX_INVITE_USES}");
            }
            let lifetime = match expires {
                Some(text) => parse_duration(&text).context("--expires")?,
                None => DEFAULT_INVITE_LIFETIME,
            };
            let mut db = open_existing(&dir, &load_config(&dir)?)?;
            let now = now_unix();
            let expires_at = now.saturating_add(lifetime.as_secs());
            let token = db.create_invite(uses, Some(expires_at), now)?;
            let plural = if uses == 1 { "" } else { "s" };
            eprintln!("invite for {uses} registration{plural}, valid until {}", format_unix(expires_at));
            match server_address(&dir) {
                Some(address) => eprintln!("the new member runs:\n  hush register {address} --invite {token}"),
                None => eprintln!("the new member runs: hush register <server address> --invite <token>"),
            }
            out!("{token}");
            Ok(())
        }
        Command::Accounts { action: None } => {
            let mut db = open_existing(&dir, &load_config(&dir)?)?;
            let accounts = db.accounts()?;
            for a in &accounts {
                match a.removed_at {
                    None => out!("{}  registered {}", a.account, format_unix(a.created_at)),
                    Some(r) => {
                        out!("{}  registered {}  removed {}", a.account, format_unix(a.created_at), format_unix(r))
                    }
                }
            }
            eprintln!("{} account{}", accounts.len(), if accounts.len() == 1 { "" } else { "s" });
            Ok(())
        }
        // Answered above, before anything needs a data directory.
        Command::Completions { .. } | Command::Man => Ok(()),
        Command::Accounts { action: Some(AccountsCmd::Remove { id }) } => {
            remove_account(&dir, &load_config(&dir)?, &id)
        }
        Command::Keys { action } => keys(&dir, action),
        Command::Groups { action: GroupsCmd::RemoveMember { group, account } } => {
            remove_member(&dir, &load_config(&dir)?, &group, &account)
        }
        Command::Check => check(&dir, load_config(&dir)),
        Command::Bench { quick, json, only, plot } => bench(quick, json, &only, plot.as_deref()),
        Command::Backup { path } => {
            if load_config(&dir)?.database_url.is_some() {
                bail!(
                    "the database is PostgreSQL, which has its own backup tools: run `pg_dump --format=custom \
                     --file {} <database URL>` (or use your replication or base backups); nothing was written. \
                     The keys are not in the database: keep copies of {} and {}",
                    path.display(),
                    dir.key().display(),
                    dir.removal_key().display()
                );
            }
            if !dir.db().exists() {
                bail!("no hushd database in {}", dir.0.display());
            }
            if path.exists() {
                bail!("{} already exists; choose a new file", path.display());
            }
            let mut last = 0;
            let pages = hush::db::sqlite::maintenance::backup(&dir.db(), &path, |done, total| {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if pct >= last + 10 || done == total {
                    eprintln!("backup: {pct}% ({done}/{total} pages)");
                    last = pct;
                }
            })
            .with_context(|| format!("backing up to {}", path.display()))?;
            out!("backed up {} ({pages} pages) to {}", dir.db().display(), path.display());
            eprintln!(
                "the key files are not in the backup: keep copies of server.key (or the exported identity key), \
                 identity.pub, online.key, node.secrets and removal.key from {} somewhere safe",
                dir.0.display()
            );
            Ok(())
        }
        Command::Stats => {
            let mut db = open_existing(&dir, &load_config(&dir)?)?;
            let now = now_unix();
            let s = db.stats(now)?;
            out!("accounts       {} ({} removed)", s.accounts, s.removed_accounts);
            out!("devices        {}", s.devices);
            out!("groups         {}", s.groups);
            match s.oldest_message {
                Some(at) => out!(
                    "messages held  {} (oldest stored {} ago)",
                    s.messages,
                    hush::util::format_age(now.saturating_sub(at))
                ),
                None => out!("messages held  {}", s.messages),
            }
            out!("welcomes held  {}", s.welcomes);
            out!("invites        {} outstanding", s.invites_outstanding);
            out!("database       {} KiB", s.database_bytes / 1024);
            out!("files          {} ({} MiB)", s.blobs, s.blob_bytes.div_ceil(1024 * 1024));
            Ok(())
        }
        Command::Invites => {
            let mut db = open_existing(&dir, &load_config(&dir)?)?;
            let now = now_unix();
            for i in db.invites()? {
                let state = match i.expires_at {
                    Some(e) if e <= now => "expired".to_string(),
                    _ if i.uses_left == 0 => "used up".to_string(),
                    Some(e) => format!("valid until {}", format_unix(e)),
                    None => "valid".to_string(),
                };
                out!("{}  {}/{} uses left  {}", hush::auth::text::encode(&i.id), i.uses_left, i.uses_total, state);
            }
            Ok(())
        }
    }
}

#[cfg(not(feature = "bench"))]
fn bench(_quick: bool, _json: bool, _only: &[String], _plot: Option<&Path>) -> Result<()> {
    anyhow::bail!("this hushd was built without the benchmark (cargo feature `bench`, on by default)")
}

#[cfg(feature = "bench")]
fn bench(quick: bool, json: bool, only: &[String], plot: Option<&Path>) -> Result<()> {
    let settings = if quick { hush::bench::Settings::quick() } else { hush::bench::Settings::full() };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let report = runtime.block_on(hush::bench::run(settings, only, |s| bar.set_message(format!("measuring {s}"))))?;
    bar.finish_and_clear();
    let rows = &report.rows;
    if let Some(dir) = plot {
        for file in hush::bench::plot::write(dir, &report.curves)? {
            eprintln!("wrote {}", file.display());
        }
    }
    if json {
        for r in rows {
            out!(
                "{}",
                serde_json::json!({"scenario": r.scenario, "hush": r.hush, "baseline": r.baseline, "ratio": r.ratio(), "unit": r.unit, "better": if r.lower_is_better { "lower" } else { "higher" }})
            );
        }
    } else {
        out!("| scenario | hush | baseline (same run) | ratio | better |");
        out!("| --- | ---: | ---: | ---: | --- |");
        for r in rows {
            let better = if r.lower_is_better { "lower" } else { "higher" };
            let ratio = r.ratio().map_or_else(|| "n/a".to_owned(), |x| format!("{x:.2}"));
            out!("| {} | {:.0}{} | {:.0}{} | {ratio} | {better} |", r.scenario, r.hush, r.unit, r.baseline, r.unit);
        }
    }
    Ok(())
}

fn check(dir: &DataDir, config: Result<ServerConfig>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut failures = 0;
    let mut line = |what: &str, detail: String, ok: bool| {
        out!("{:<9} {:<4} {detail}", what, if ok { "ok" } else { "FAIL" });
        if !ok {
            failures += 1;
        }
    };
    match std::fs::metadata(&dir.0) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            line("data dir", format!("{} (mode {mode:o})", dir.0.display()), mode & 0o077 == 0);
        }
        Err(e) => bail!("{}: {e}; nothing to check", dir.0.display()),
    }
    let files = dir.keys();
    match (Identity::load(&dir.key()), files.recorded_public()) {
        (Ok(id), _) => {
            line("key", format!("{} (mode 600), fingerprint {}", dir.key().display(), id.fingerprint()), true)
        }
        (Err(_), Ok(Some(public))) if !dir.key().exists() => line(
            "key",
            format!("identity key exported (not here), fingerprint {}", hush::server::keys::fingerprint_of(&public)),
            true,
        ),
        (Err(e), _) => line("key", e.to_string(), false),
    }
    match files.load_online() {
        Ok(None) => line("online", "none: the identity key itself serves (`hushd keys rotate` makes one)".into(), true),
        Ok(Some((_, cert))) => {
            let now = now_unix();
            let left = cert.not_after.saturating_sub(now) / 86_400;
            let ours = files.public_identity().ok().flatten() == Some(cert.identity);
            let (detail, ok) = if !ours {
                ("certified by another identity than this server's".to_string(), false)
            } else if cert.not_before > now {
                (
                    format!(
                        "certificate starts in the future ({}): this machine's clock was or is wrong; fix it, then \
                         `hushd keys rotate`",
                        format_unix(cert.not_before)
                    ),
                    false,
                )
            } else if cert.not_after <= now {
                (format!("certificate EXPIRED at {} (Unix time): run `hushd keys rotate`", cert.not_after), false)
            } else if hush::server::keys::needs_renewal(&cert, now) && !dir.key().exists() {
                (format!("certificate ends in {left} day(s): run `hushd keys rotate --identity-key FILE`"), false)
            } else {
                (format!("{} (mode 600), certified for {left} more day(s)", files.online_key().display()), true)
            };
            line("online", detail, ok)
        }
        Err(e) => line("online", e.to_string(), false),
    }
    match Identity::load(&dir.removal_key()) {
        Ok(_) => line("removal", format!("{} (mode 600)", dir.removal_key().display()), true),
        Err(e) => line("removal", e.to_string(), false),
    }
    // Looked at only: no key, so nothing it could send would be taken.
    let location = config.as_ref().ok().map(|c| Location::of(c.database_url(), &dir.db(), None));
    let config_for_files = config.as_ref().map(Clone::clone).map_err(|e| anyhow::anyhow!("{e:#}"));
    match config {
        Ok(_) => {
            let source = if dir.0.join(hush::config::CONFIG_FILE).exists() {
                "hushd.toml + environment"
            } else {
                "defaults + environment"
            };
            line("config", format!("valid ({source})"), true)
        }
        Err(e) => line("config", format!("{e:#}"), false),
    }
    // One line for either database: PostgreSQL says its version first.
    let report = match location {
        Some(Ok(location)) => location.inspect().map_err(anyhow::Error::from).transpose(),
        Some(Err(e)) => Some(Err(anyhow::Error::from(e))),
        None if dir.db().exists() => Some(
            hush::db::sqlite::maintenance::check(&dir.db()).map(|r| (String::new(), r)).map_err(anyhow::Error::from),
        ),
        None => None,
    };
    match report {
        Some(Ok((server, r))) => line(
            "database",
            format!(
                "{server}integrity {}, schema {} (this hushd: {}), {} accounts, {} groups, {} stored messages, {} KiB",
                r.integrity.join("; "),
                r.schema_version,
                r.latest_schema,
                r.accounts,
                r.groups,
                r.messages,
                r.bytes / 1024
            ),
            r.healthy(),
        ),
        Some(Err(e)) => line("database", format!("{e:#}"), false),
        None => line(
            "database",
            format!("{} missing (created by `hushd serve` or `hushd init`)", dir.db().display()),
            false,
        ),
    }
    if let Ok(config) = &config_for_files {
        match check_files(dir, config) {
            Ok((detail, ok)) => line("files", detail, ok),
            Err(e) => line("files", format!("{e:#}"), false),
        }
    }
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    Ok(())
}

/// `hushd keys`: show, rotate, export.
fn keys(dir: &DataDir, action: Option<KeysCmd>) -> Result<()> {
    let files = dir.keys();
    let now = now_unix();
    let show_cert = |cert: &hush::auth::online::OnlineCert| {
        out!(
            "online key {} certified from {} until {}",
            hush::server::keys::fingerprint_of(&cert.online),
            format_unix(cert.not_before),
            format_unix(cert.not_after)
        );
    };
    match action {
        None => {
            let public = files.public_identity()?.context("no server key here yet: run `hushd init` first")?;
            let away = if dir.key().exists() { "" } else { " (exported: not in the data directory)" };
            out!("identity {}{away}", hush::server::keys::fingerprint_of(&public));
            match files.load_online()? {
                Some((_, cert)) => show_cert(&cert),
                None => out!("no online key: the identity key itself serves (`hushd keys rotate` makes one)"),
            }
        }
        Some(KeysCmd::Rotate { identity_key, valid_for }) => {
            let validity = match valid_for {
                Some(text) => parse_duration(&text).context("--valid-for")?,
                None => hush::server::keys::DEFAULT_ONLINE_VALIDITY,
            };
            let identity = match &identity_key {
                Some(path) => {
                    let (identity, open) =
                        Identity::load_any_mode(path).with_context(|| format!("loading {}", path.display()))?;
                    if let Some(mode) = open {
                        eprintln!(
                            "warning: {} is readable by others (mode {mode:o}); fine on a removable disk without \
                             file modes, otherwise run: chmod 600 {}",
                            path.display(),
                            path.display()
                        );
                    }
                    identity
                }
                None => files.load_identity()?.ok_or_else(|| {
                    anyhow::anyhow!(hush::server::keys::KeysError::IdentityAway { dir: dir.0.clone() })
                })?,
            };
            if files.public_identity()?.is_none() {
                bail!("{} holds no server yet: run `hushd init` first", dir.0.display());
            }
            let (_, cert) = files.rotate(&identity, validity, now)?;
            show_cert(&cert);
            eprintln!(
                "the address is unchanged; a running hushd uses the new key for new connections within {} s",
                hush::server::keys::KEY_POLL_INTERVAL.as_secs()
            );
            if identity_key.is_some() {
                eprintln!("put the identity key back offline");
            }
        }
        Some(KeysCmd::ExportIdentity { file }) => {
            let cert = files.export_identity(&file, now)?;
            show_cert(&cert);
            eprintln!(
                "the identity key is now only in {} (deleted from {}); keep it offline and safe: losing it means \
                 every member re-pins a new address once the online key ends, and renewing the online key needs \
                 `hushd keys rotate --identity-key {}`",
                file.display(),
                dir.0.display(),
                file.display()
            );
        }
    }
    Ok(())
}

/// Reads every blob file against its row: a complete blob's size and
/// SHA-256, an unfinished one's durable length. Returns the line to print
/// and whether all is well.
fn check_files(dir: &DataDir, config: &ServerConfig) -> Result<(String, bool)> {
    let blob_dir = dir.blobs(config);
    if !blob_dir.exists() {
        return Ok((format!("{} missing (created by `hushd serve`)", blob_dir.display()), true));
    }
    let mut db = open_existing(dir, config)?;
    let (mut good, mut bytes, mut bad) = (0u64, 0u64, Vec::new());
    let mut after = None;
    loop {
        let rows = db.blobs(after, 1024)?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id);
        for row in rows {
            let path = blob_dir.join(hush::server::blobs::hex(&row.id));
            let verdict = match (row.hash, std::fs::metadata(&path)) {
                (_, Err(e)) => Err(format!("{}: {e}", path.display())),
                (Some(hash), Ok(_)) => match hush::server::blobs::hash_file(&path) {
                    Ok((h, len)) if h == hash && len == row.size => Ok(len),
                    Ok(_) => {
                        Err(format!("{}: altered (its hash or size differs from when it was stored)", path.display()))
                    }
                    Err(e) => Err(format!("{}: {e}", path.display())),
                },
                (None, Ok(m)) if m.len() >= row.received => Ok(m.len()),
                (None, Ok(_)) => Err(format!("{}: shorter than the upload's acknowledged bytes", path.display())),
            };
            match verdict {
                Ok(len) => {
                    good += 1;
                    bytes += len;
                }
                Err(e) => bad.push(e),
            }
        }
    }
    if bad.is_empty() {
        Ok((format!("{good} blobs verified ({} MiB) in {}", bytes.div_ceil(1024 * 1024), blob_dir.display()), true))
    } else {
        let shown: Vec<String> = bad.iter().take(5).cloned().collect();
        Ok((format!("{} of {} blobs damaged: {}", bad.len(), good + bad.len() as u64, shown.join("; ")), false))
    }
}

/// `hushd accounts remove ID`: offboarding, through the Delivery Service
/// core on this process's own connection to the database (the serving
/// process, if any, refuses the account's devices from their next request).
fn remove_account(dir: &DataDir, config: &ServerConfig, id: &str) -> Result<()> {
    let account: hush::auth::AccountId = id.parse().with_context(|| format!("{id:?} is not an account id"))?;
    // On PostgreSQL the serving nodes hear of it at once (the revoked
    // devices' connections are closed); on SQLite at their next request.
    let removal = with_removal_key(dir, config, OperatorRemoval::Account(account))?;
    out!(
        "removed {account}: {} device(s) refused, removal proposed in {} group membership(s)",
        removal.devices,
        removal.proposals
    );
    eprintln!("members' next sync commits the removal; the account's keys are refused from now on");
    Ok(())
}

/// `hushd groups remove-member GROUP ACCOUNT`, through the Delivery Service
/// core like `accounts remove`.
fn remove_member(dir: &DataDir, config: &ServerConfig, group: &str, account: &str) -> Result<()> {
    let id: [u8; 32] = hush::auth::text::decode_array(group)
        .map_err(|e| anyhow::anyhow!("{group:?} is not a group id (as `hush group list` shows it): {e}"))?;
    let account: hush::auth::AccountId =
        account.parse().with_context(|| format!("{account:?} is not an account id"))?;
    let removal = with_removal_key(dir, config, OperatorRemoval::Membership(id, account))?;
    out!("removed {account} from the group: {} device(s), removal proposed for {}", removal.devices, removal.proposals);
    eprintln!("members' next sync commits the removal; the account no longer counts the group against its quota");
    Ok(())
}

/// Runs one of the operator's removals through the Delivery Service core,
/// with the server's removal key, on this process's own connection to the
/// database (a serving process refuses what it removed from the next
/// request), and announces what it did to the serving nodes.
fn with_removal_key(dir: &DataDir, config: &ServerConfig, what: OperatorRemoval) -> Result<hush::delivery::Removal> {
    let mut db = open_existing(dir, config)?;
    let removal = Identity::load(&dir.removal_key())
        .with_context(|| format!("loading the removal key {}", dir.removal_key().display()))?;
    Ok(db.remove(std::sync::Arc::new(removal), what, now_unix())??)
}

/// Opens the database of an initialised data directory.
fn open_existing(dir: &DataDir, config: &ServerConfig) -> Result<Database> {
    // What a command changes reaches the running nodes' clients live (on
    // PostgreSQL): its wake-ups are authenticated with the server key, as
    // theirs are.
    let secrets = match &config.database_url {
        Some(_) => Some(dir.keys().secrets().context("the node secrets, which authenticate wake-ups to the nodes")?),
        None => None,
    };
    let location = Location::of(config.database_url(), &dir.db(), secrets.as_ref().map(|s| &*s.wake))?;
    location.open_existing().context(if config.database_url.is_some() {
        "connecting to PostgreSQL"
    } else {
        "opening the database"
    })
}

/// The address of the running server (or, failing that, one built from the
/// key and configuration).
fn server_address(dir: &DataDir) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.0.join(ADDRESS_FILE)) {
        if let Ok(a) = text.trim().parse::<HushAddress>() {
            return Some(a.to_string());
        }
    }
    let config = load_config(dir).ok()?;
    let identity = dir.keys().public_identity().ok()??;
    Some(
        HushAddress {
            host: config.advertised_host(config.listen),
            port: config.listen.port(),
            fingerprint: hush::server::keys::fingerprint_of(&identity),
        }
        .to_string(),
    )
}

fn serve(config: ServerConfig, dir: DataDir) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    // Binding touches the disk (key, database); do it before the runtime
    // starts serving, inside its context for the UDP socket.
    let server = {
        let _guard = runtime.enter();
        Server::bind(config, &dir.0)?
    };
    tracing::info!("listening on {} (data in {})", server.local_addr()?, dir.0.display());
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.address())?;
    out.flush()?;
    drop(out);
    // Under systemd (Type=notify): ready once listening, stopping once asked
    // to stop. Without NOTIFY_SOCKET these do nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("could not tell systemd that hushd is ready: {e}");
    }
    runtime.block_on(server.run(async {
        shutdown_signal().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }))?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            tracing::warn!("cannot listen for signals; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

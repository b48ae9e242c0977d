//! `hush`: the hush command-line client. Thin: parse arguments, call the
//! library, print results on stdout, a one-line reason and exit code 1 on
//! failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hush::auth::{identity, HushAddress, Identity};
use hush::client::{ClientError, Connection};
use hush::util::{default_data_dir, format_unix};
use hush::wire::ErrorCode;

#[derive(Parser)]
#[command(name = "hush", version, about = "hush: end-to-end-encrypted group chat over a self-hosted relay")]
struct Cli {
    /// Home directory holding this identity's key and state.
    #[arg(long, global = true, env = "HUSH_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this identity (if needed), pin the server and register with it.
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
}

/// Files in the home directory.
struct Home(PathBuf);

impl Home {
    fn key(&self) -> PathBuf {
        self.0.join("identity.key")
    }
    fn server(&self) -> PathBuf {
        self.0.join("server")
    }
    fn name(&self) -> PathBuf {
        self.0.join("name")
    }

    fn identity(&self) -> Result<Identity> {
        if !self.key().exists() {
            bail!("no identity in {}; run `hush register ADDRESS --invite TOKEN` first", self.0.display());
        }
        Ok(Identity::load(&self.key())?)
    }

    fn pinned_server(&self) -> Result<HushAddress> {
        let text = std::fs::read_to_string(self.server())
            .with_context(|| format!("no server pinned in {}; run `hush register` first", self.0.display()))?;
        text.trim().parse().with_context(|| format!("{} is damaged", self.server().display()))
    }

    fn name_or_none(&self) -> Option<String> {
        std::fs::read_to_string(self.name()).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }
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

fn run(cli: Cli) -> Result<()> {
    let home = match cli.home {
        Some(h) => Home(h),
        None => Home(default_data_dir("hush").context("no home directory: set --home, HUSH_HOME or HOME")?),
    };
    match cli.command {
        Command::Register { address, invite, name } => register(&home, &address, invite, name),
        Command::Whoami => {
            let id = home.identity()?;
            println!("{}", id.account_id());
            println!("fingerprint {}", id.fingerprint());
            if let Some(name) = home.name_or_none() {
                println!("name        {name}");
            }
            if let Ok(server) = home.pinned_server() {
                println!("server      {server}");
            }
            Ok(())
        }
        Command::Status => {
            let id = home.identity()?;
            let server = home.pinned_server()?;
            let status = runtime()?.block_on(async {
                let conn = Connection::connect(&server, &id).await?;
                let status = conn.status().await;
                conn.close().await;
                status
            });
            let status = status.map_err(explain)?;
            println!("account     {}", status.account);
            if let Some(name) = home.name_or_none() {
                println!("name        {name}");
            }
            println!("server      {server}");
            println!("registered  {}", format_unix(status.registered_at));
            println!("server time {}", format_unix(status.server_time));
            println!("connection  authenticated");
            Ok(())
        }
    }
}

fn register(home: &Home, address: &str, invite: Option<String>, name: Option<String>) -> Result<()> {
    let address: HushAddress = address.parse().with_context(|| format!("{address:?} is not a hush address"))?;
    if let Some(n) = &name {
        if n.trim().is_empty() || n.len() > 64 || n.chars().any(char::is_control) {
            bail!("--name must be 1 to 64 printable characters");
        }
    }
    if let Ok(pinned) = home.pinned_server() {
        if pinned.fingerprint != address.fingerprint {
            bail!(
                "{} is already registered with another server ({pinned}); use --home DIR for a second identity",
                home.0.display()
            );
        }
    }
    identity::private_dir(&home.0)?;
    let (id, created) = Identity::load_or_create(&home.key())?;
    if created {
        eprintln!("created a new identity in {}", home.0.display());
    }
    let outcome = runtime()?.block_on(async {
        let conn = Connection::connect(&address, &id).await?;
        let r = conn.register(invite.as_deref()).await;
        conn.close().await;
        r
    });
    let new = outcome.map_err(explain)?;
    write_private(&home.server(), &format!("{address}\n"))?;
    if let Some(n) = name {
        write_private(&home.name(), &format!("{}\n", n.trim()))?;
    }
    if new {
        println!("registered {} on {address}", id.account_id());
    } else {
        println!("already registered: {} on {address}", id.account_id());
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
        _ => None,
    };
    match hint {
        Some(h) => anyhow::anyhow!("{e}; {h}"),
        None => anyhow::Error::new(e),
    }
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")
}

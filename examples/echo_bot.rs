//! An echo bot on `hush jsonrpc`: it answers every message other people
//! write in its groups with "echo: …", and "/uptime" with how long it has
//! been running. It shows the whole protocol a bot needs: read one JSON
//! object per line, act on `message` notifications, write requests.
//!
//! ```sh
//! hush --home bot register ADDRESS --invite TOKEN --name bot   # once
//! cargo run --example echo_bot -- --home bot                    # then add "bot" to a group
//! ```
//!
//! `--hush PATH` names the hush binary (default: `hush` on the PATH).
//! The schema of every method and notification: examples/jsonrpc.md.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut home, mut hush) = (None, String::from("hush"));
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--home" => home = args.next(),
            "--hush" => hush = args.next().ok_or("--hush needs a path")?,
            other => return Err(format!("unknown argument {other:?}; usage: echo_bot --home DIR [--hush PATH]").into()),
        }
    }
    let home = home.ok_or("usage: echo_bot --home DIR [--hush PATH]")?;
    let mut child = Command::new(&hush)
        .args(["--home", &home, "jsonrpc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {hush}: {e}"))?;
    let mut requests = child.stdin.take().ok_or("no stdin")?;
    let replies = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let started = Instant::now();
    let mut next_id = 1u64;
    eprintln!("echo bot: running on {home}");
    for line in replies.lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if let Some(error) = v.get("error") {
            eprintln!("echo bot: a request failed: {error}");
            continue;
        }
        // Only what other people wrote: never answer ourselves.
        let field = |path: &str| v.pointer(path).cloned().unwrap_or_default();
        if field("/method") != "message" || field("/params/from_me") == true {
            continue;
        }
        let (Value::String(group), Value::String(text)) = (field("/params/group_id"), field("/params/text")) else {
            continue;
        };
        // Another echo bot's answer is not echoed (two would echo each
        // other forever).
        if text.starts_with("echo: ") {
            continue;
        }
        let reply = if text.trim() == "/uptime" {
            format!("up {} s", started.elapsed().as_secs())
        } else {
            format!("echo: {text}")
        };
        let request = json!({"jsonrpc": "2.0", "id": next_id, "method": "send",
                             "params": {"group": group, "text": reply}});
        next_id += 1;
        writeln!(requests, "{request}")?;
        requests.flush()?;
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("hush jsonrpc ended: {status}").into());
    }
    Ok(())
}

//! A progress bar for file transfers: on a terminal only, and only for a
//! transfer that takes more than a second.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use hush::client::app::files::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// How long a transfer runs before a bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

pub struct Bar {
    what: &'static str,
    started: Instant,
    total: u64,
    bar: Option<ProgressBar>,
    terminal: bool,
}

impl Bar {
    pub fn new(what: &'static str) -> Self {
        Self { what, started: Instant::now(), total: 0, bar: None, terminal: std::io::stderr().is_terminal() }
    }
}

impl Progress for Bar {
    fn start(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    fn advance(&mut self, done: u64) {
        if self.bar.is_none() && self.terminal && self.started.elapsed() >= SHOW_AFTER {
            let bar = ProgressBar::new(self.total);
            if let Ok(style) =
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(self.what);
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

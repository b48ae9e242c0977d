//! Small shared helpers: wall-clock time, durations typed by people,
//! default directories, private files written atomically, and the one
//! token bucket every rate limit uses.
//!
//! Written here rather than taken from a crate, each for a reason:
//! `parse_duration` reads exactly the forms the docs promise (`90s`, `30m`,
//! `12h`, `7d`, `2w`, bare seconds) and refuses zero and more than ten
//! years, which `humantime` would accept and leave to every caller;
//! `format_unix` is the one date format hush prints (20 lines, tested on
//! leap days), where `humantime` prints RFC 3339 with a `T`; and
//! [`TokenBucket`] is one value per key inside maps the callers already
//! bound and prune, where `governor`'s keyed limiters bring their own
//! concurrent map and clock abstraction the sans-IO core cannot take.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Writes `bytes` to `path` so that a crash leaves either the old file or
/// the whole new one, readable by this user only (mode 0600): a temporary
/// file beside it, fsynced, then moved into place (`replace`) or linked
/// (not `replace`: an existing `path` is never touched and the call fails),
/// and the directory fsynced.
pub fn write_private(path: &std::path::Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A hidden name of its own, random, created here: never a file the
    // caller named or another one beside it (the red team's backup
    // `old.tmp` was deleted when this used `path.with_extension("tmp")`).
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_file_name(format!(".{name}.{hex}.tmp"));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if replace {
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    } else {
        let linked = std::fs::hard_link(&tmp, path);
        std::fs::remove_file(&tmp)?;
        match linked {
            Ok(()) => {}
            // A file system without hard links (FAT, exFAT: a removable
            // disk): create the file itself, never over an existing one.
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                let written = file.write_all(bytes).and_then(|()| file.sync_all());
                drop(file);
                if let Err(e) = written {
                    let _ = std::fs::remove_file(path);
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Parses durations such as `90s`, `30m`, `12h`, `7d`, `2w` or a bare number
/// of seconds. Zero and values above ten years are refused.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    const MAX_SECS: u64 = 10 * 365 * 24 * 3600;
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| DurationError::NotADuration(text.to_string()))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(DurationError::Unit { unit: unit.to_string(), text: text.to_string() }),
    };
    let secs =
        n.checked_mul(scale).filter(|s| *s <= MAX_SECS).ok_or_else(|| DurationError::TooLong(text.to_string()))?;
    if secs == 0 {
        return Err(DurationError::Zero);
    }
    Ok(Duration::from_secs(secs))
}

/// Why [`parse_duration`] refused its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 30m, 12h or 7d")]
    NotADuration(String),
    #[error("unknown unit {unit:?} in {text:?}: use s, m, h, d or w")]
    Unit { unit: String, text: String },
    #[error("{0:?} is too long")]
    TooLong(String),
    #[error("a duration must be longer than zero")]
    Zero,
}

/// `$XDG_DATA_HOME/<app>`, else `~/.local/share/<app>`.
pub fn default_data_dir(app: &str) -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join(app));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".local/share").join(app))
}

/// A disappearing-message timer as people say it, exactly: "2 seconds",
/// "90 minutes", "1 day", "2 weeks"; "off" for 0.
pub fn format_timer(secs: u64) -> String {
    let (n, unit) = match secs {
        0 => return "off".into(),
        s if s % 604_800 == 0 => (s / 604_800, "week"),
        s if s % 86_400 == 0 => (s / 86_400, "day"),
        s if s % 3_600 == 0 => (s / 3_600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// A duration in seconds, roughly: "45 s", "12 min", "3 h", "9 d".
pub fn format_age(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7_200 => format!("{} min", secs / 60),
        7_200..172_800 => format!("{} h", secs / 3_600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// Formats Unix seconds as a UTC date and time (`2026-11-27 14:05:09Z`).
pub fn format_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), in unsigned arithmetic.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "0", "5y", "-1h", "h", "99999999999999999999d", "100000w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_unix(1_795_779_909), "2026-11-27 11:45:09Z");
        assert_eq!(format_unix(951_782_400), "2000-02-29 00:00:00Z");
    }
}

/// Prints a line to stdout (the binaries' results); a closed stdout
/// (`hush … | head -1`) ends the program quietly instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// Resident memory of a process (`None`: this one), in KiB, from
/// `/proc/PID/status`; `None` where there is no such file.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(|| "/proc/self/status".to_string(), |p| format!("/proc/{p}/status"));
    let status = std::fs::read_to_string(path).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// A token bucket: it refills at `rate` tokens per second up to `burst`
/// and each allowed action spends one token. Pure (the caller passes the
/// time, in seconds from any fixed origin), so the sans-IO Delivery Service
/// and the server's per-key limiters share it. Hand-written rather than
/// `governor`: a dozen lines, no clock of its own, and the Delivery
/// Service must not read one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at: f64,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(burst: f64, now: f64) -> Self {
        Self { tokens: burst, at: now }
    }

    /// Refills up to `now`; `Ok` if a whole token is there, otherwise the
    /// seconds until one is. A clock that steps back refills nothing.
    pub fn refill(&mut self, rate: f64, burst: f64, now: f64) -> Result<(), f64> {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }

    /// Spends one token (after [`TokenBucket::refill`] said there is one).
    pub fn spend(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// [`TokenBucket::refill`], then [`TokenBucket::spend`] if allowed.
    pub fn take(&mut self, rate: f64, burst: f64, now: f64) -> Result<(), f64> {
        self.refill(rate, burst, now)?;
        self.spend();
        Ok(())
    }

    /// Whether the bucket is full again at `now` (an idle bucket, which can
    /// be forgotten: a new one starts full).
    pub fn is_full(&self, rate: f64, burst: f64, now: f64) -> bool {
        self.tokens + (now - self.at).max(0.0) * rate >= burst
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::TokenBucket;

    #[test]
    fn a_bucket_allows_its_burst_then_one_token_per_refill_and_ignores_a_clock_stepping_back() {
        let (rate, burst) = (0.5, 3.0);
        let mut b = TokenBucket::full(burst, 100.0);
        for _ in 0..3 {
            assert!(b.take(rate, burst, 100.0).is_ok());
        }
        let wait = b.take(rate, burst, 100.0).unwrap_err();
        assert!((wait - 2.0).abs() < 1e-9, "{wait}");
        assert!(b.take(rate, burst, 50.0).is_err(), "a clock stepping back refilled the bucket");
        assert!(b.take(rate, burst, 102.0).is_ok());
        assert!(b.take(rate, burst, 102.0).is_err());
        assert!(!b.is_full(rate, burst, 104.0));
        assert!(b.is_full(rate, burst, 108.0));
        // Refilling never goes past the burst.
        assert!(b.refill(rate, burst, 1_000.0).is_ok());
        for _ in 0..3 {
            b.spend();
        }
        assert!(b.refill(rate, burst, 1_000.0).is_err());
    }
}

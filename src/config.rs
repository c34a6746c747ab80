//! Configuration: parse the TOML file, merge the defaults, validate.
//!
//! Every key is optional. Values that cannot be right (zero parallelism, a
//! zero timeout) are refused by the types themselves, so the parser reports
//! them with the file, line and column. Values too large to be meant (a
//! timeout of centuries, a million job slots) are refused when the file is
//! validated, with the key and its allowed range named.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::spool::job::{MAX_ATTEMPTS, MAX_TIMEOUT_SECS};

/// Where the worker and the CLI look for the configuration by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ai-cmd-executor/config.toml";

/// The system spool, used by root when nothing else is configured.
pub const SYSTEM_SPOOL: &str = "/var/lib/ai-cmd-executor";

/// The longest duration any key may hold: 100 years of 365 days, the same
/// ceiling as a job's `timeout_secs`. Every deadline the worker derives
/// from a configured duration stays far from the limits of its clock
/// arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(MAX_TIMEOUT_SECS);

/// Most job slots (`max_parallel`): each is a thread with its own stack.
pub const MAX_PARALLEL: usize = 1024;

/// Largest `log_max_bytes`: 1 TiB.
pub const MAX_LOG_BYTES: u64 = 1 << 40;

/// Largest `max_job_bytes`: 64 MiB. A slot reads a whole job file into
/// memory before it parses it.
pub const MAX_JOB_BYTES: u64 = 64 << 20;

/// Longest `log_retention_days` and `archive_retention_days`: 36 500 days
/// (100 years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// Most `notify.attempts`: the pauses between attempts grow with each one.
pub const MAX_NOTIFY_ATTEMPTS: u32 = 10;

/// A duration that is never zero, written as in `"30s"`, `"5m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NonZeroDuration(Duration);

impl NonZeroDuration {
    /// `d`, unless it is zero.
    pub fn new(d: Duration) -> Option<Self> {
        (!d.is_zero()).then_some(Self(d))
    }
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
    const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
}

impl fmt::Display for NonZeroDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for NonZeroDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let dur = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (write it like \"30s\", \"5m\" or \"1h\")"
            ))
        })?;
        NonZeroDuration::new(dur)
            .ok_or_else(|| serde::de::Error::custom("the duration must be greater than zero"))
    }
}

impl Serialize for NonZeroDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The effective configuration. Each field documents its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Spool directory. Default: `/var/lib/ai-cmd-executor` for root,
    /// `$XDG_STATE_HOME/ai-cmd-executor` otherwise. `--spool` and
    /// `AI_CMD_EXECUTOR_SPOOL` take precedence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<PathBuf>,
    /// Jobs run at once. Default 1.
    pub max_parallel: NonZeroUsize,
    /// Timeout of a job that sets no `timeout_secs`. Default `"1h"`.
    pub default_timeout: NonZeroDuration,
    /// Time between SIGTERM and SIGKILL when a job times out or is
    /// interrupted. Default `"5s"`.
    pub kill_grace: NonZeroDuration,
    /// On SIGTERM, how long running jobs may go on before they are killed
    /// and recorded `interrupted`. Default `"20s"`.
    pub stop_grace: NonZeroDuration,
    /// Safety-net rescan of `pending/` (inotify does the real work).
    /// Default `"5m"`.
    pub rescan_interval: NonZeroDuration,
    /// Largest log kept per run; the rest is dropped and the result says
    /// `output_truncated`. Default 10 MiB.
    pub log_max_bytes: NonZeroU64,
    /// Largest job file accepted. Default 1 MiB.
    pub max_job_bytes: NonZeroU64,
    /// Runs of a job with `on_interrupt = "retry"`, in all. Default 3.
    pub max_attempts: NonZeroU32,
    /// The shell jobs run with. Default `/bin/bash`.
    pub shell: PathBuf,
    /// A file in `pending/` older than this is stale: health warns, and
    /// `cleanup` archives it. Default `"30m"`.
    pub stale_pending_after: NonZeroDuration,
    /// `cleanup` packs logs older than this many days into dated archives.
    /// Default 30.
    pub log_retention_days: NonZeroU32,
    /// `cleanup` deletes archives older than this many days. Default 90.
    pub archive_retention_days: NonZeroU32,
    /// When set, only root, the worker's own user and members of this
    /// group may submit: other job files are rejected. Default: anyone who
    /// can write to `pending/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submit_group: Option<String>,
    /// Where alerts and repair reports go; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifyConfig>,
}

/// The `[notify]` table: a Slack incoming webhook or a generic JSON webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// `"slack"` (a Slack incoming webhook) or `"webhook"` (generic JSON).
    pub kind: NotifyKind,
    /// A root-only file holding the webhook URL (a secret). Under systemd a
    /// credential named `webhook` (`LoadCredential=webhook:…`) wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// Per-attempt timeout. Default `"5s"`.
    #[serde(default = "default_notify_timeout")]
    pub timeout: NonZeroDuration,
    /// Attempts in all. Default 3.
    #[serde(default = "default_notify_attempts")]
    pub attempts: NonZeroU32,
}

/// The notifier's message format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyKind {
    /// Slack incoming webhook: `{"text": …}`.
    Slack,
    /// Generic JSON: host, unit, event, message, details.
    Webhook,
}

fn default_notify_timeout() -> NonZeroDuration {
    NonZeroDuration::secs(5)
}

fn default_notify_attempts() -> NonZeroU32 {
    NonZeroU32::new(3).expect("non-zero")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            spool: None,
            max_parallel: NonZeroUsize::MIN,
            default_timeout: NonZeroDuration::secs(3600),
            kill_grace: NonZeroDuration::secs(5),
            stop_grace: NonZeroDuration::secs(20),
            rescan_interval: NonZeroDuration::secs(300),
            log_max_bytes: NonZeroU64::new(10 << 20).expect("non-zero"),
            max_job_bytes: NonZeroU64::new(1 << 20).expect("non-zero"),
            max_attempts: NonZeroU32::new(3).expect("non-zero"),
            shell: PathBuf::from("/bin/bash"),
            stale_pending_after: NonZeroDuration::secs(1800),
            log_retention_days: NonZeroU32::new(30).expect("non-zero"),
            archive_retention_days: NonZeroU32::new(90).expect("non-zero"),
            submit_group: None,
            notify: None,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds an unknown key or a bad value.
    #[error("config {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A value is well-formed but not usable.
    #[error("config {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A configuration and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedConfig {
    /// The effective values.
    pub config: Config,
    /// The file they were read from; `None` means the built-in defaults.
    pub source: Option<PathBuf>,
}

impl Config {
    /// Parses TOML text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message,
            })
        };
        if !self.shell.is_absolute() {
            return invalid(format!(
                "shell must be an absolute path, not {:?}",
                self.shell
            ));
        }
        if let Some(spool) = &self.spool
            && !spool.is_absolute()
        {
            return invalid(format!("spool must be an absolute path, not {spool:?}"));
        }
        if let Some(file) = self.notify.as_ref().and_then(|n| n.url_file.as_ref())
            && !file.is_absolute()
        {
            return invalid(format!(
                "notify.url_file must be an absolute path, not {file:?}"
            ));
        }
        let mut durations = vec![
            ("default_timeout", self.default_timeout),
            ("kill_grace", self.kill_grace),
            ("stop_grace", self.stop_grace),
            ("rescan_interval", self.rescan_interval),
            ("stale_pending_after", self.stale_pending_after),
        ];
        let mut counts = vec![
            (
                "max_parallel",
                u64::try_from(self.max_parallel.get()).unwrap_or(u64::MAX),
                MAX_PARALLEL as u64,
            ),
            ("log_max_bytes", self.log_max_bytes.get(), MAX_LOG_BYTES),
            ("max_job_bytes", self.max_job_bytes.get(), MAX_JOB_BYTES),
            (
                "max_attempts",
                u64::from(self.max_attempts.get()),
                u64::from(MAX_ATTEMPTS),
            ),
            (
                "log_retention_days",
                u64::from(self.log_retention_days.get()),
                u64::from(MAX_RETENTION_DAYS),
            ),
            (
                "archive_retention_days",
                u64::from(self.archive_retention_days.get()),
                u64::from(MAX_RETENTION_DAYS),
            ),
        ];
        if let Some(n) = &self.notify {
            durations.push(("notify.timeout", n.timeout));
            counts.push((
                "notify.attempts",
                u64::from(n.attempts.get()),
                u64::from(MAX_NOTIFY_ATTEMPTS),
            ));
        }
        for (key, d) in durations {
            if d.get() > MAX_DURATION {
                return invalid(format!(
                    "{key} must be at most {}s (100 years), not {d}",
                    MAX_DURATION.as_secs()
                ));
            }
        }
        for (key, n, max) in counts {
            if n > max {
                return invalid(format!("{key} must be from 1 to {max}, not {n}"));
            }
        }
        Ok(())
    }

    /// Loads the configuration: `explicit` (from `--config` or
    /// `AI_CMD_EXECUTOR_CONFIG`) must exist; otherwise
    /// [`DEFAULT_CONFIG_PATH`] is read if present, and the built-in defaults
    /// are used if not.
    pub fn load(explicit: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                if !p.exists() {
                    return Ok(LoadedConfig {
                        config: Config::default(),
                        source: None,
                    });
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(LoadedConfig {
            config: Config::parse(&text, &path)?,
            source: Some(path),
        })
    }

    /// The effective configuration as TOML, every key written out.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serializes")
    }

    /// The spool to use: `cli` (from `--spool` or `AI_CMD_EXECUTOR_SPOOL`),
    /// then this file's `spool`, then [`default_spool`].
    pub fn resolve_spool(&self, cli: Option<&Path>) -> PathBuf {
        cli.map(Path::to_owned)
            .or_else(|| self.spool.clone())
            .unwrap_or_else(default_spool)
    }
}

/// The default spool: the unit's state directory when systemd started us
/// with `StateDirectory=` (`$STATE_DIRECTORY`), else [`SYSTEM_SPOOL`] for
/// root, else `$XDG_STATE_HOME/ai-cmd-executor` (or
/// `~/.local/state/ai-cmd-executor`).
pub fn default_spool() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .filter(|p| p.is_absolute())
    {
        return dir;
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(SYSTEM_SPOOL);
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    state.join("ai-cmd-executor")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/x.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c =
            parse("max_parallel = 4\ndefault_timeout = \"90s\"\nlog_max_bytes = 1024\n").unwrap();
        assert_eq!(c.max_parallel.get(), 4);
        assert_eq!(c.default_timeout.get(), Duration::from_secs(90));
        assert_eq!(c.log_max_bytes.get(), 1024);
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            ("\n\ncolour = 1\n", "line 3"),
            ("max_parallel = 0\n", "line 1"),
            ("\nkill_grace = \"0s\"\n", "line 2"),
            ("stop_grace = \"soon\"\n", "invalid duration"),
            ("max_parallel = \"x\"\n", "line 1"),
            ("shell = \"bash\"\n", "absolute"),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains("/etc/x.toml"), "{err}");
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn values_too_large_are_refused_with_key_and_range() {
        let cases = [
            (
                "max_parallel = 1025\n",
                "max_parallel must be from 1 to 1024",
            ),
            (
                "log_max_bytes = 1099511627777\n",
                "log_max_bytes must be from 1 to 1099511627776",
            ),
            (
                "max_job_bytes = 67108865\n",
                "max_job_bytes must be from 1 to 67108864",
            ),
            ("max_attempts = 101\n", "max_attempts must be from 1 to 100"),
            (
                "log_retention_days = 36501\n",
                "log_retention_days must be from 1 to 36500",
            ),
            (
                "archive_retention_days = 4294967295\n",
                "archive_retention_days must be from 1",
            ),
            (
                "default_timeout = \"200years\"\n",
                "default_timeout must be at most 3153600000s",
            ),
            (
                "kill_grace = \"3153600001s\"\n",
                "kill_grace must be at most",
            ),
            (
                "stop_grace = \"500000000000y\"\n",
                "stop_grace must be at most",
            ),
            (
                "rescan_interval = \"101y\"\n",
                "rescan_interval must be at most",
            ),
            (
                "stale_pending_after = \"101y\"\n",
                "stale_pending_after must be at most",
            ),
            (
                "[notify]\nkind = \"slack\"\ntimeout = \"101y\"\n",
                "notify.timeout must be at most",
            ),
            (
                "[notify]\nkind = \"slack\"\nattempts = 11\n",
                "notify.attempts must be from 1 to 10",
            ),
            // Out of the type's own range: the parser refuses these.
            ("max_parallel = -1\n", "line 1"),
            ("log_max_bytes = 1.5\n", "line 1"),
            ("max_job_bytes = \"1\"\n", "line 1"),
            ("max_attempts = 4294967296\n", "line 1"),
            (
                "default_timeout = \"99999999999999999999s\"\n",
                "invalid duration",
            ),
            ("kill_grace = 5\n", "line 1"),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains("/etc/x.toml"), "{err}");
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
        let at_the_limits = format!(
            "max_parallel = {MAX_PARALLEL}\nlog_max_bytes = {MAX_LOG_BYTES}\nmax_job_bytes = {MAX_JOB_BYTES}\n\
             max_attempts = {MAX_ATTEMPTS}\nlog_retention_days = {MAX_RETENTION_DAYS}\n\
             default_timeout = \"{}s\"\nstop_grace = \"{}s\"\n\
             [notify]\nkind = \"webhook\"\nattempts = {MAX_NOTIFY_ATTEMPTS}\n",
            MAX_DURATION.as_secs(),
            MAX_DURATION.as_secs()
        );
        let c = parse(&at_the_limits).unwrap();
        assert_eq!(c.default_timeout.get(), MAX_DURATION);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn effective_config_round_trips() {
        let c = parse("max_parallel = 2\nrescan_interval = \"1m\"\n").unwrap();
        let text = c.to_toml();
        assert!(text.contains("rescan_interval = \"1m\""), "{text}");
        assert_eq!(parse(&text).unwrap(), c);
    }

    #[test]
    fn notify_table() {
        let c = parse("[notify]\nkind = \"slack\"\nurl_file = \"/etc/ai-cmd-executor/webhook\"\n")
            .unwrap();
        let n = c.notify.unwrap();
        assert_eq!(n.kind, NotifyKind::Slack);
        assert_eq!(n.attempts.get(), 3);
        assert!(
            parse("[notify]\nkind = \"email\"\n")
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
        assert!(
            parse("[notify]\nkind = \"slack\"\nurl = \"x\"\n")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
    }

    #[test]
    fn spool_precedence() {
        let mut c = Config::default();
        assert_eq!(c.resolve_spool(Some(Path::new("/a"))), PathBuf::from("/a"));
        c.spool = Some("/b".into());
        assert_eq!(c.resolve_spool(Some(Path::new("/a"))), PathBuf::from("/a"));
        assert_eq!(c.resolve_spool(None), PathBuf::from("/b"));
    }
}

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
use crate::spool::limits::LimitsConfig;

fn is_unset(l: &LimitsConfig) -> bool {
    *l == LimitsConfig::default()
}

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
    /// How long a job may wait in `pending/` while no worker serves the
    /// spool (none holds its lock); after that it is stale: health warns,
    /// and `cleanup` (or the health fix) archives it with an `expired`
    /// result. A job waiting its turn while a worker runs is never stale
    /// (health's `spool.queue` warns once it has waited this long). Age is
    /// the job file's modification time. Default `"30m"`.
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
    /// How far each job is kept from the worker and from other jobs:
    /// `"auto"` (the default: the strongest level this host supports),
    /// `"process"` (refuse to start without it) or `"none"`. See
    /// [`Isolation`].
    pub isolation: Isolation,
    /// Per-job resource limits: the defaults of a job that sets none, and
    /// `[limits.ceiling]`, the most a job may ask for. None by default.
    #[serde(skip_serializing_if = "is_unset")]
    pub limits: LimitsConfig,
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

/// The `isolation` setting: what the worker asks of the kernel for each job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// The strongest level this host supports; the worker says at start
    /// (journal) when that is less than the strongest there is.
    #[default]
    Auto,
    /// `Process`, and the spool is out of the jobs' reach: they can read
    /// it but create, change, rename or delete nothing in it (Landlock file
    /// rules). That needs a spool whose parent directories the worker's
    /// user cannot write (the package's `/var/lib/ai-cmd-executor`): the
    /// rules cannot tell the spool's own entry in such a directory from
    /// the rest of it. The worker refuses to start when it cannot do this.
    Full,
    /// Each job in a Landlock domain of its own (Linux 6.12 or later,
    /// Landlock ABI 6): it cannot signal, `ptrace`, or read the memory or
    /// environment of the worker or of another job. The worker refuses to
    /// start when the kernel cannot do this.
    Process,
    /// Jobs are ordinary children of the worker, under its user.
    None,
}

impl Isolation {
    /// The name used in the config and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Auto => "auto",
            Isolation::Full => "full",
            Isolation::Process => "process",
            Isolation::None => "none",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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

/// `notify.timeout` when unset.
pub(crate) fn default_notify_timeout() -> NonZeroDuration {
    NonZeroDuration::secs(5)
}

/// `notify.attempts` when unset.
pub(crate) fn default_notify_attempts() -> NonZeroU32 {
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
            isolation: Isolation::Auto,
            limits: LimitsConfig::default(),
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
    /// The file is not valid TOML, or holds an unknown key or a value of
    /// the wrong type. Shown as `path:LINE:COL: message`.
    #[error("{}: {message}", place(path, at.as_ref()))]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where in the file, when the parser says.
        at: Option<Location>,
        /// The parser's message.
        message: String,
    },
    /// A value is well-formed but not usable. Shown as
    /// `path:LINE:COL: message`, the place being the key's value.
    #[error("{}: {message}", place(path, at.as_ref()))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where the value is in the file.
        at: Option<Location>,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// `path:LINE:COL`, or the path alone when the place is not known.
fn place(path: &Path, at: Option<&Location>) -> String {
    match at {
        Some(at) => format!("{}:{}:{}", path.display(), at.line, at.column),
        None => path.display().to_string(),
    }
}

/// A place in a configuration file, as compilers report one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1, in characters.
    pub column: usize,
    /// The text of that line.
    pub text: String,
    /// How many characters of the line to mark (at least 1).
    pub width: usize,
}

impl Location {
    /// Where the byte range `span` of `text` starts.
    pub fn of(text: &str, span: std::ops::Range<usize>) -> Location {
        let start = floor_char_boundary(text, span.start.min(text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[..line_start].matches('\n').count() + 1;
        let line_text = text[line_start..line_end].trim_end_matches('\r');
        let column = text[line_start..start].chars().count() + 1;
        let end = floor_char_boundary(text, span.end.clamp(start, line_end));
        Location {
            line,
            column,
            text: line_text.to_owned(),
            width: text[start..end].chars().count().max(1),
        }
    }
}

/// The largest character boundary of `s` at or before `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl ConfigError {
    /// The file concerned.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Parse { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// Where in the file, when known.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { at, .. } | ConfigError::Invalid { at, .. } => at.as_ref(),
        }
    }

    /// The error as compilers print one: `path:LINE:COL: message`, then
    /// the line with a caret under the mistake. Ends with a newline.
    pub fn diagnostic(&self) -> String {
        let mut out = format!("{}\n", crate::error::chain(self));
        if let Some(at) = self.location() {
            let gutter = at.line.to_string().len();
            // Tabs before the mistake stay tabs, so the caret lines up.
            let pad: String = at
                .text
                .chars()
                .take(at.column - 1)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            out.push_str(&format!("{:gutter$} |\n", ""));
            out.push_str(&format!("{} | {}\n", at.line, at.text));
            out.push_str(&format!("{:gutter$} | {pad}{}\n", "", "^".repeat(at.width)));
        }
        out
    }

    /// A parser error on `text`, placed.
    fn parse(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
        ConfigError::Parse {
            path: path.to_owned(),
            at: e.span().map(|s| Location::of(text, s)),
            message: e.message().trim_end().to_owned(),
        }
    }
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
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::parse(path, text, &e))?;
        config.validate(path, text)?;
        Ok(config)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                at: value_span(text, key).map(|s| Location::of(text, s)),
                message,
            })
        };
        if !self.shell.is_absolute() {
            return invalid(
                "shell",
                format!("shell must be an absolute path, not {:?}", self.shell),
            );
        }
        if let Some(spool) = &self.spool
            && !spool.is_absolute()
        {
            return invalid(
                "spool",
                format!("spool must be an absolute path, not {spool:?}"),
            );
        }
        if let Err(message) = self.limits.check() {
            return invalid("limits", message);
        }
        if let Some(file) = self.notify.as_ref().and_then(|n| n.url_file.as_ref())
            && !file.is_absolute()
        {
            return invalid(
                "notify.url_file",
                format!("notify.url_file must be an absolute path, not {file:?}"),
            );
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
                return invalid(
                    key,
                    format!(
                        "{key} must be at most {}s (100 years), not {d}",
                        MAX_DURATION.as_secs()
                    ),
                );
            }
        }
        for (key, n, max) in counts {
            if n > max {
                return invalid(key, format!("{key} must be from 1 to {max}, not {n}"));
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

    /// The spool the installed service serves, as it reads this file: its
    /// `spool`, else the package's ([`SYSTEM_SPOOL`]; the unit's state
    /// directory).
    pub fn service_spool(&self) -> PathBuf {
        self.spool.clone().unwrap_or_else(|| SYSTEM_SPOOL.into())
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
/// root, else `$XDG_STATE_HOME/ai-cmd-executor` (an absolute one), else
/// `~/.local/state/ai-cmd-executor` with `~` from `$HOME` (an absolute
/// one) or, without it, the user's home directory in the user database.
/// Never a relative path: without any of them, `/nonexistent/...`, which
/// the commands then refuse as not a spool. docs/PROTOCOL.md ("Finding
/// the spool") gives the whole order, which every client follows.
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
    let home = || {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::geteuid())
                    .ok()
                    .flatten()
                    .map(|u| u.dir)
                    .filter(|p| p.is_absolute())
            })
            .unwrap_or_else(|| PathBuf::from("/nonexistent"))
    };
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| home().join(".local/state"));
    state.join("ai-cmd-executor")
}

/// Where the value of `key` (dotted for a table's key: `notify.timeout`)
/// is in `text`, a document that parses.
fn value_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut parts = key.split('.');
    let mut value = doc.get_ref().get(parts.next()?)?;
    for part in parts {
        value = value.get_ref().as_table()?.get(part)?;
    }
    Some(value.span())
}

/// The configuration file's path and text: `explicit` must be readable;
/// [`DEFAULT_CONFIG_PATH`] is read if it exists. `None`: no file.
fn read_text(explicit: Option<&Path>) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
        None => return Ok(None),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(Some((path, text)))
}

/// The line numbers (from 1) that the byte range `span` of `text` covers.
fn lines_of(text: &str, span: std::ops::Range<usize>) -> std::ops::RangeInclusive<usize> {
    let first = Location::of(text, span.start..span.start).line;
    let last = Location::of(text, span.end.max(span.start + 1) - 1..span.end).line;
    first..=last.max(first)
}

/// What the client commands (`submit`, `result`, `wait`, `log`, `list`)
/// take from the configuration: the `spool` key, and nothing else, so a
/// mistake in a key they do not use does not stop them.
#[derive(Debug, Default)]
pub struct SpoolSetting {
    /// The spool the file names; `None` when it names none, or when a
    /// syntax error leaves it unclear.
    pub spool: Option<PathBuf>,
    /// The file's syntax error, when it is not valid TOML. `spool` was
    /// still read from it when the mistake is on other lines.
    pub broken: Option<ConfigError>,
    /// The file read; `None` when there is none.
    pub source: Option<PathBuf>,
}

/// What the alert path takes from the configuration: the `[notify]` table
/// alone, read past mistakes elsewhere in the file.
#[derive(Debug, Default)]
pub struct NotifySetting {
    /// The notifier, as far as the `[notify]` table could be read (values
    /// out of range are brought within it); `None` when the file has none
    /// or it cannot be read.
    pub notify: Option<NotifyConfig>,
    /// Why the file as a whole is not valid (what `config check` says),
    /// if it is not.
    pub broken: Option<ConfigError>,
}

impl Config {
    /// The `spool` key alone (see [`SpoolSetting`]): the file is read as
    /// generic TOML, so unknown keys and bad values elsewhere do not
    /// matter. A file that is not valid TOML is read as far as the parser
    /// can recover, and the error is returned in
    /// [`SpoolSetting::broken`] for the caller to warn about. Errors: an
    /// `explicit` file that cannot be read, and a `spool` value that is
    /// not an absolute path.
    pub fn load_spool(explicit: Option<&Path>) -> Result<SpoolSetting, ConfigError> {
        let Some((path, text)) = read_text(explicit)? else {
            return Ok(SpoolSetting::default());
        };
        let (doc, errors) = toml::de::DeTable::parse_recoverable(&text);
        let broken = errors.first().map(|e| ConfigError::parse(&path, &text, e));
        let mut bad_lines = Vec::new();
        for e in &errors {
            match e.span() {
                Some(s) => bad_lines.push(lines_of(&text, s)),
                // Nowhere in particular: anywhere, as far as we know.
                None => bad_lines.push(1..=usize::MAX),
            }
        }
        let entry = doc
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == "spool");
        let spool = match entry {
            None => None,
            Some((key, value)) => {
                let lines = lines_of(&text, key.span().start..value.span().end);
                let clean = !bad_lines
                    .iter()
                    .any(|b| b.start() <= lines.end() && lines.start() <= b.end());
                match value.get_ref().as_str() {
                    Some(s) if clean && Path::new(s).is_absolute() => Some(PathBuf::from(s)),
                    // The syntax error may be this very line: unclear.
                    _ if !clean => None,
                    other => {
                        return Err(ConfigError::Invalid {
                            at: Some(Location::of(&text, value.span())),
                            path,
                            message: match other {
                                Some(s) => format!("spool must be an absolute path, not {s:?}"),
                                None => format!(
                                    "spool must be an absolute path (a string), not {}",
                                    value.get_ref().type_str()
                                ),
                            },
                        });
                    }
                }
            }
        };
        Ok(SpoolSetting {
            spool,
            broken,
            source: Some(path),
        })
    }

    /// The `[notify]` table alone (see [`NotifySetting`]); never fails:
    /// what is wrong is in [`NotifySetting::broken`].
    pub fn load_notify(explicit: Option<&Path>) -> NotifySetting {
        let (path, text) = match read_text(explicit) {
            Ok(Some(file)) => file,
            Ok(None) => return NotifySetting::default(),
            Err(e) => {
                return NotifySetting {
                    notify: None,
                    broken: Some(e),
                };
            }
        };
        let broken = match Config::parse(&text, &path) {
            Ok(c) => {
                return NotifySetting {
                    notify: c.notify,
                    broken: None,
                };
            }
            Err(e) => e,
        };
        let (doc, _) = toml::de::DeTable::parse_recoverable(&text);
        let notify = doc
            .into_inner()
            .remove("notify")
            .and_then(|v| NotifyConfig::deserialize(toml::de::ValueDeserializer::from(v)).ok())
            .map(|mut n| {
                n.url_file = n.url_file.filter(|f| f.is_absolute());
                n.timeout = n.timeout.min(NonZeroDuration(MAX_DURATION));
                n.attempts = n
                    .attempts
                    .min(NonZeroU32::new(MAX_NOTIFY_ATTEMPTS).expect("non-zero"));
                n
            });
        NotifySetting {
            notify,
            broken: Some(broken),
        }
    }
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
            ("\n\ncolour = 1\n", "x.toml:3:1: unknown field `colour`"),
            ("max_parallel = 0\n", "x.toml:1:16: invalid value"),
            ("\nkill_grace = \"0s\"\n", "x.toml:2:14: "),
            ("stop_grace = \"soon\"\n", "invalid duration"),
            ("max_parallel = \"x\"\n", "x.toml:1:16: "),
            (
                "shell = \"bash\"\n",
                "x.toml:1:9: shell must be an absolute path",
            ),
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
            ("max_parallel = -1\n", ":1:"),
            ("log_max_bytes = 1.5\n", ":1:"),
            ("max_job_bytes = \"1\"\n", ":1:"),
            ("max_attempts = 4294967296\n", ":1:"),
            (
                "default_timeout = \"99999999999999999999s\"\n",
                "invalid duration",
            ),
            ("kill_grace = 5\n", ":1:"),
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
                .contains("x.toml:2:8:")
        );
        assert!(
            parse("[notify]\nkind = \"slack\"\nurl = \"x\"\n")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
    }

    #[test]
    fn diagnostics_point_at_the_mistake_like_a_compiler() {
        // A syntax error on line 3.
        let e = parse("spool = \"/s\"\n\nmax_parallel = = 2\n").unwrap_err();
        assert_eq!(
            e.diagnostic(),
            "/etc/x.toml:3:16: extra `=`, expected nothing\n  |\n3 | max_parallel = = 2\n  |                ^\n"
        );
        // An unknown key: the whole key is marked.
        let e = parse("max_parallel = 2\n\n[notify]\nkind = \"slack\"\nurl = \"x\"\n").unwrap_err();
        assert_eq!(
            e.diagnostic(),
            "/etc/x.toml:5:1: unknown field `url`, expected one of `kind`, `url_file`, `timeout`, `attempts`\n  |\n5 | url = \"x\"\n  | ^^^\n"
        );
        // A value the type refuses.
        let e = parse("kill_grace = \"soon\"\n").unwrap_err();
        let d = e.diagnostic();
        assert!(
            d.starts_with("/etc/x.toml:1:14: invalid duration \"soon\""),
            "{d}"
        );
        assert!(
            d.ends_with("1 | kill_grace = \"soon\"\n  |              ^^^^^^\n"),
            "{d}"
        );
        // A value out of range, found by validation: its value is marked,
        // in a table too, past line 9 (a wider gutter).
        let text = format!(
            "{}[notify]\nkind = \"webhook\"\n\tattempts = 11\n",
            "# comment\n".repeat(9)
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(
            e.diagnostic(),
            "/etc/x.toml:12:13: notify.attempts must be from 1 to 10, not 11\n   |\n12 | \tattempts = 11\n   | \t           ^^\n"
        );
        assert_eq!(
            e.to_string(),
            "/etc/x.toml:12:13: notify.attempts must be from 1 to 10, not 11"
        );
        // Columns count characters, not bytes.
        let e = parse("# é\nshell = \"ça\"\n").unwrap_err();
        assert!(
            e.to_string().starts_with("/etc/x.toml:2:9: shell must be"),
            "{e}"
        );
        // Not valid UTF-8 is not the parser's to place: no location, no panic.
        let e = parse("x = \"\u{7f}\"").unwrap_err();
        assert!(e.diagnostic().starts_with("/etc/x.toml"), "{e}");
    }

    #[test]
    fn locations_of_spans() {
        let text = "a = 1\nbb = 22\n";
        let at = Location::of(text, 11..13);
        assert_eq!((at.line, at.column, at.width), (2, 6, 2));
        assert_eq!(at.text, "bb = 22");
        // At the end of the file: the last (empty) line, one caret.
        let at = Location::of(text, 14..14);
        assert_eq!((at.line, at.column, at.width), (3, 1, 1));
        // A span running past its line is cut at the line's end.
        let at = Location::of(text, 4..9);
        assert_eq!((at.line, at.column, at.width), (1, 5, 1));
        assert_eq!(lines_of(text, 0..9), 1..=2);
        assert_eq!(lines_of(text, 0..6), 1..=1, "the newline ends line 1");
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn the_spool_is_read_past_mistakes_in_other_keys() {
        // Unknown keys and bad values elsewhere: not the clients' concern.
        let (_d, p) = file("max_paralel = 2\nkill_grace = \"soon\"\nspool = \"/srv/spool\"\n");
        let s = Config::load_spool(Some(&p)).unwrap();
        assert_eq!(s.spool, Some(PathBuf::from("/srv/spool")));
        assert!(s.broken.is_none(), "{:?}", s.broken);
        assert_eq!(s.source.as_deref(), Some(p.as_path()));

        // A syntax error elsewhere: read past, and said.
        let (_d, p) = file("spool = \"/srv/spool\"\nmax_parallel = = 2\n[notify\n");
        let s = Config::load_spool(Some(&p)).unwrap();
        assert_eq!(s.spool, Some(PathBuf::from("/srv/spool")));
        let broken = s.broken.unwrap().to_string();
        assert!(broken.contains("config.toml:2:16: "), "{broken}");

        // A syntax error on the spool's own line: unclear, so none.
        let (_d, p) = file("max_parallel = 2\nspool = \"/srv/sp\n");
        let s = Config::load_spool(Some(&p)).unwrap();
        assert_eq!(s.spool, None);
        assert!(s.broken.is_some());

        // No spool key; no file at all.
        let (_d, p) = file("max_parallel = 2\n");
        let s = Config::load_spool(Some(&p)).unwrap();
        assert_eq!((s.spool, s.broken.is_none()), (None, true));
        let missing = p.with_file_name("missing.toml");
        let e = Config::load_spool(Some(&missing)).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    #[test]
    fn a_bad_spool_is_an_error_where_it_is() {
        let (_d, p) = file("# the spool\nspool = \"spool\"\n");
        let e = Config::load_spool(Some(&p)).unwrap_err().to_string();
        assert!(
            e.ends_with("config.toml:2:9: spool must be an absolute path, not \"spool\""),
            "{e}"
        );
        let (_d, p) = file("spool = 5\n");
        let e = Config::load_spool(Some(&p)).unwrap_err().to_string();
        assert!(
            e.ends_with("config.toml:1:9: spool must be an absolute path (a string), not integer"),
            "{e}"
        );
    }

    #[test]
    fn the_notify_table_is_read_past_mistakes_elsewhere() {
        let table = "[notify]\nkind = \"slack\"\nurl_file = \"/etc/w\"\nattempts = 50\n";
        // Valid: as the strict loader reads it.
        let (_d, p) = file("[notify]\nkind = \"webhook\"\n");
        let n = Config::load_notify(Some(&p));
        assert!(n.broken.is_none());
        assert_eq!(n.notify.unwrap().kind, NotifyKind::Webhook);

        // A syntax error and an unknown key elsewhere, a value out of range
        // in the table: the table is read, the value brought within range.
        let (_d, p) = file(&format!("colour = 1\nmax_parallel = = 2\n{table}"));
        let n = Config::load_notify(Some(&p));
        let got = n.notify.unwrap();
        assert_eq!(got.kind, NotifyKind::Slack);
        assert_eq!(got.url_file.as_deref(), Some(Path::new("/etc/w")));
        assert_eq!(got.attempts.get(), MAX_NOTIFY_ATTEMPTS);
        assert!(n.broken.unwrap().to_string().contains("config.toml:2:16:"));

        // The table itself unusable: none, and why.
        let (_d, p) = file("[notify]\nkind = \"email\"\n");
        let n = Config::load_notify(Some(&p));
        assert!(n.notify.is_none());
        assert!(n.broken.unwrap().to_string().contains("config.toml:2:8:"));

        // An unreadable file: none, and why.
        let n = Config::load_notify(Some(&p.with_file_name("missing.toml")));
        assert!(matches!(n.broken, Some(ConfigError::Read { .. })));
        assert!(n.notify.is_none());
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

//! Diagnosis: one registry of named checks, each giving a level, a sentence
//! a person can act on, machine-readable detail and, where one exists, a
//! fix. The same list serves `health` (the quick subset, monitoring-plugin
//! exit codes), `diagnose` (everything) and `repair` (diagnose, fix,
//! verify). A check that cannot run says `unknown` with the reason; it never
//! panics and never hides the others.

pub mod checks;
pub mod repair;

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, LoadedConfig};
use crate::spool::Spool;
use crate::systemd::bus::Systemd;

pub use checks::run_checks;

/// The service user as the installed units or cron file name it.
pub fn checks_service_user() -> String {
    checks::service_user(&Err(String::new()))
}

/// How bad a finding is. Ordered: the worst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// All is well.
    Ok,
    /// Needs attention, not yet broken.
    Warning,
    /// The check could not run.
    Unknown,
    /// Broken.
    Critical,
}

impl Level {
    /// The monitoring-plugin exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    pub fn exit_code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Critical => 2,
            Level::Unknown => 3,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Unknown => "unknown",
            Level::Critical => "critical",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// A repair that a check knows how to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Fix {
    /// Start the service.
    StartService,
    /// Clear the failed state (and the start-rate counter), then start.
    ResetFailedAndStart,
    /// Restart the service (its start-up recovers `running/`).
    RestartService,
    /// Enable (and start) these units. Only `repair --enable` applies it:
    /// a disabled unit is an administrator's choice.
    EnableUnits {
        /// The units.
        units: Vec<String>,
    },
    /// Write the expected text back into drifted unit files, reload,
    /// restart.
    ReinstallUnits {
        /// The files to rewrite, with their expected text.
        files: Vec<(PathBuf, String)>,
    },
    /// Create the spool's directories and set their owner and mode.
    RepairSpool,
    /// Move stale files from `pending/` to `archive/stale/`.
    ArchiveStale,
    /// Write the cron file and start a worker (cron mode).
    RestoreCronFallback,
}

impl Fix {
    /// What the fix does, for people.
    pub fn describe(&self) -> String {
        match self {
            Fix::StartService => "start the service".into(),
            Fix::ResetFailedAndStart => "reset the failed state and start the service".into(),
            Fix::RestartService => "restart the service (recovers running/)".into(),
            Fix::EnableUnits { units } => format!(
                "enable and start {} (only `repair --enable` does this)",
                units.join(" ")
            ),
            Fix::ReinstallUnits { files } => format!(
                "re-install {} and restart",
                files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Fix::RepairSpool => "create the spool's directories and set owner and modes".into(),
            Fix::ArchiveStale => "archive stale pending files into archive/stale/".into(),
            Fix::RestoreCronFallback => "write the cron file and start a worker".into(),
        }
    }
}

/// One check's finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable id, e.g. `service.active`.
    pub id: &'static str,
    /// How bad.
    pub level: Level,
    /// A sentence a person can act on.
    pub summary: String,
    /// Machine-readable detail.
    pub detail: serde_json::Value,
    /// The repair, where one exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<Fix>,
}

impl Finding {
    fn new(id: &'static str, level: Level, summary: impl Into<String>) -> Self {
        Finding {
            id,
            level,
            summary: summary.into(),
            detail: serde_json::Value::Null,
            fix: None,
        }
    }
    fn detail(mut self, d: serde_json::Value) -> Self {
        self.detail = d;
        self
    }
    fn fix(mut self, f: Fix) -> Self {
        self.fix = Some(f);
        self
    }
}

/// How the worker of the spool is kept running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervision {
    /// systemd is PID 1 and its service serves the spool: the service and
    /// timers.
    Systemd,
    /// No systemd: the cron fallback (or a worker started by hand).
    Cron,
    /// systemd is PID 1, but its service does not serve this spool: a
    /// worker started by hand does (`ai-cmd-executor run --spool DIR`), or
    /// none. Nothing restarts it, and no fix starts one.
    Foreground,
}

/// Which checks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `health`: quick, for monitoring every few minutes.
    Quick,
    /// `diagnose` and `repair`: everything, including the journal and an
    /// end-to-end probe job.
    Full,
}

/// Why the configuration did not load.
#[derive(Debug, Clone)]
pub struct ConfigProblem {
    /// The error and its causes, on one line.
    pub text: String,
    /// Whether this user may not read the file (a fact it cannot check,
    /// not an invalid configuration).
    pub denied: bool,
}

impl ConfigProblem {
    /// From the error `Config::load` gave.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        ConfigProblem {
            text: crate::error::chain(e),
            denied: is_denied(e),
        }
    }
}

/// What the checks look at.
pub struct Ctx {
    /// The configuration (defaults if it did not load).
    pub config: Config,
    /// Why the configuration did not load, if it did not.
    pub config_error: Option<ConfigProblem>,
    /// The spool.
    pub spool: Spool,
    /// systemd or cron.
    pub supervision: Supervision,
    /// The bus, or why it is unreachable (systemd mode only).
    pub bus: Option<Result<Systemd, String>>,
    /// Whether to send a test notification.
    pub probe_notifier: bool,
    /// The configuration file given (`--config`); `None`: the default,
    /// [`crate::config::DEFAULT_CONFIG_PATH`]. A change to it may have
    /// mended a failed service; alerts read their `[notify]` from it.
    pub config_path: Option<PathBuf>,
}

impl Ctx {
    /// Builds the context: configuration, spool, supervision, bus.
    pub async fn new(
        loaded: Result<LoadedConfig, ConfigProblem>,
        spool: PathBuf,
        probe_notifier: bool,
    ) -> Ctx {
        let (config, config_error) = match loaded {
            Ok(l) => (l.config, None),
            Err(e) => (Config::default(), Some(e)),
        };
        let bus = match crate::systemd::booted() {
            true => Some(
                Systemd::connect()
                    .await
                    .map_err(|e| crate::error::chain(&e)),
            ),
            false => None,
        };
        let supervision = match &bus {
            None => Supervision::Cron,
            Some(bus) if served_by_hand(&spool, &config, bus.as_ref().ok()).await => {
                Supervision::Foreground
            }
            Some(_) => Supervision::Systemd,
        };
        Ctx {
            config,
            config_error,
            spool: Spool::new(spool),
            supervision,
            bus,
            probe_notifier,
            config_path: None,
        }
    }

    /// The bus, or the reason it is not there.
    pub fn bus(&self) -> Result<&Systemd, String> {
        match &self.bus {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(format!("the system bus is unreachable: {e}")),
            None => Err("systemd is not running on this host".into()),
        }
    }
}

/// Whether, on a host systemd runs, the spool at `spool` is not the
/// service's: a worker other than the service's main process serves it,
/// or none does and the service's spool (the configuration's, as the
/// service reads it) is another directory. Where the bus cannot tell,
/// it is the service's.
async fn served_by_hand(spool: &Path, config: &Config, bus: Option<&Systemd>) -> bool {
    match crate::install::ensure::serving_worker(spool) {
        Ok(Some(pid)) if pid > 0 => match bus {
            Some(bus) => match bus.service_info(crate::systemd::units::SERVICE).await {
                Ok(s) => s.main_pid != pid as u32,
                Err(_) => false,
            },
            None => false,
        },
        _ => {
            let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            real(spool) != real(&config.service_spool())
        }
    }
}

/// The worst level among findings (OK when there are none).
pub fn worst(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

/// Output formats of `health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned lines for people.
    Human,
    /// A JSON object.
    Json,
    /// One status line with perfdata (Nagios / Icinga / monitoring plugins).
    Nagios,
}

/// The findings as aligned lines, coloured on a terminal.
pub fn render_human(findings: &[Finding]) -> String {
    let colour = std::io::stdout().is_terminal();
    let width = findings.iter().map(|f| f.id.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in findings {
        let word = format!("{:<8}", f.level.word().to_uppercase());
        let word = if colour {
            let code = match f.level {
                Level::Ok => "32",
                Level::Warning => "33",
                Level::Unknown => "35",
                Level::Critical => "31",
            };
            format!("\x1b[{code}m{word}\x1b[0m")
        } else {
            word
        };
        out.push_str(&format!("{word} {:<width$}  {}\n", f.id, f.summary));
        if let Some(fix) = f.fix.as_ref().filter(|_| f.level != Level::Ok) {
            out.push_str(&format!(
                "{:8} {:<width$}  fix: {}\n",
                "",
                "",
                fix.describe()
            ));
        }
    }
    let w = worst(findings);
    out.push_str(&format!("overall: {w}\n"));
    out
}

/// The findings as one JSON document.
pub fn render_json(findings: &[Finding]) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "status": worst(findings),
        "checks": findings,
    }))
    .expect("findings serialize")
}

/// `spool.disk` is critical with less free space than this, or less than
/// [`DISK_CRIT_FREE_PCT`] of the file system (space or inodes).
pub(crate) const DISK_CRIT_FREE_BYTES: u64 = 16 << 20;
/// `spool.disk` warns with less free space than this, or less than
/// [`DISK_WARN_FREE_PCT`] of the file system (space or inodes).
pub(crate) const DISK_WARN_FREE_BYTES: u64 = 256 << 20;
/// See [`DISK_CRIT_FREE_BYTES`].
pub(crate) const DISK_CRIT_FREE_PCT: u64 = 1;
/// See [`DISK_WARN_FREE_BYTES`].
pub(crate) const DISK_WARN_FREE_PCT: u64 = 5;

/// Whether `e`, or one of its causes, is the system refusing access
/// (`EACCES`, `EPERM`): a fact this user may not read, not a fault.
pub fn is_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    use nix::errno::Errno;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(crate::client::ClientError::Denied(_)) =
            err.downcast_ref::<crate::client::ClientError>()
        {
            return true;
        }
        let errno = if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                return true;
            }
            io.raw_os_error().map(Errno::from_raw)
        } else if let Some(n) = err.downcast_ref::<Errno>() {
            Some(*n)
        } else {
            err.downcast_ref::<rustix::io::Errno>()
                .map(|r| Errno::from_raw(r.raw_os_error()))
        };
        if matches!(errno, Some(Errno::EACCES | Errno::EPERM)) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// This process's user, for messages: `uid 110 (nagios)`.
fn caller() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid).ok().flatten() {
        Some(u) => format!("uid {uid} ({})", u.name),
        None => format!("uid {uid}"),
    }
}

/// What a monitoring user needs to read the spool: its group, or a read
/// ACL (the README's "Monitoring" section says which directories).
pub(crate) fn spool_access_hint(spool: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let group = std::fs::metadata(spool)
        .ok()
        .and_then(|m| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                .ok()
                .flatten()
        })
        .map_or_else(
            || crate::systemd::units::SHIPPED_USER.to_owned(),
            |g| g.name,
        );
    format!(
        "add the monitoring user to group {group}, or give it a read ACL on the spool, see Monitoring in the README"
    )
}

impl Finding {
    /// A fact this process may not read: `unknown`, never worse, naming
    /// what, who asked, why, and `hint` (how to grant read access).
    pub(crate) fn cannot_read(id: &'static str, what: &str, cause: &str, hint: &str) -> Finding {
        Finding::new(
            id,
            Level::Unknown,
            format!("cannot read {what} as {}: {cause} ({hint})", caller()),
        )
    }
}

/// The plugin's name on its status line.
const PLUGIN: &str = "AI-CMD-EXECUTOR";

/// `text` on one line, safe anywhere in plugin output: `|` (which starts
/// performance data) becomes `¦`, and line breaks and other control
/// characters become single spaces.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_control() || c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(if c == '|' { '¦' } else { c });
    }
    out
}

/// One performance-data metric: which finding's detail it is read from,
/// its label and unit, and its thresholds and bounds.
struct Metric {
    /// The finding's id.
    finding: &'static str,
    /// The label (unique across the table).
    label: &'static str,
    /// Unit of measurement: `""` (a count), `s`, `B`, `%`, `c`.
    uom: &'static str,
    /// The value from the finding's detail, formatted.
    value: fn(&Detail) -> Option<String>,
    /// Warning and critical ranges, minimum and maximum, from the detail
    /// and the configuration: `[warn, crit, min, max]`, empty where none.
    bounds: fn(&Detail, &Config) -> [String; 4],
}

type Detail = serde_json::Map<String, serde_json::Value>;

fn u64_of(d: &Detail, key: &str) -> Option<u64> {
    d.get(key).and_then(serde_json::Value::as_u64)
}

/// The metrics `--format nagios` prints, each from one finding's detail
/// key(s), so each label appears once however many findings carry a key.
/// A metric whose finding is absent (or lacks the key) is left out.
const METRICS: &[Metric] = &[
    Metric {
        finding: "spool.queue",
        label: "pending",
        uom: "",
        value: |d| u64_of(d, "pending").map(|v| v.to_string()),
        bounds: |_, _| [String::new(), String::new(), "0".into(), String::new()],
    },
    Metric {
        finding: "spool.queue",
        label: "running",
        uom: "",
        value: |d| u64_of(d, "running").map(|v| v.to_string()),
        bounds: |_, c| {
            [
                String::new(),
                String::new(),
                "0".into(),
                c.max_parallel.get().to_string(),
            ]
        },
    },
    Metric {
        finding: "spool.queue",
        label: "oldest_pending",
        uom: "s",
        // No pending job: nothing has waited.
        value: |d| match d.get("oldest_pending_secs") {
            Some(serde_json::Value::Null) => Some("0".into()),
            Some(v) => v.as_u64().map(|v| v.to_string()),
            None => None,
        },
        bounds: |_, c| {
            [
                c.stale_pending_after.get().as_secs().to_string(),
                String::new(),
                "0".into(),
                String::new(),
            ]
        },
    },
    Metric {
        finding: "spool.disk",
        label: "spool_free",
        uom: "B",
        value: |d| u64_of(d, "free_bytes").map(|v| v.to_string()),
        bounds: |d, _| {
            let total = u64_of(d, "total_bytes").unwrap_or(0);
            // Either limit makes it so: the larger of the two is where it starts.
            let at = |bytes: u64, pct: u64| bytes.max(share(total, pct));
            [
                format!("{}:", at(DISK_WARN_FREE_BYTES, DISK_WARN_FREE_PCT)),
                format!("{}:", at(DISK_CRIT_FREE_BYTES, DISK_CRIT_FREE_PCT)),
                "0".into(),
                total.to_string(),
            ]
        },
    },
    Metric {
        finding: "spool.disk",
        label: "spool_free_pct",
        uom: "%",
        value: |d| {
            let (free, total) = (u64_of(d, "free_bytes")?, u64_of(d, "total_bytes")?);
            (total > 0).then(|| format!("{:.2}", free as f64 * 100.0 / total as f64))
        },
        bounds: |_, _| {
            [
                format!("{DISK_WARN_FREE_PCT}:"),
                format!("{DISK_CRIT_FREE_PCT}:"),
                "0".into(),
                "100".into(),
            ]
        },
    },
    Metric {
        finding: "spool.disk",
        label: "spool_free_inodes",
        uom: "",
        value: |d| {
            // A file system without an inode count (btrfs) reports 0 of 0.
            u64_of(d, "total_inodes").filter(|t| *t > 0)?;
            u64_of(d, "free_inodes").map(|v| v.to_string())
        },
        bounds: |d, _| {
            let total = u64_of(d, "total_inodes").unwrap_or(0);
            [
                format!("{}:", share(total, DISK_WARN_FREE_PCT)),
                format!("{}:", share(total, DISK_CRIT_FREE_PCT)),
                "0".into(),
                total.to_string(),
            ]
        },
    },
    Metric {
        finding: "service.active",
        label: "n_restarts",
        uom: "c",
        value: |d| u64_of(d, "n_restarts").map(|v| v.to_string()),
        bounds: |_, _| [String::new(), String::new(), "0".into(), String::new()],
    },
];

/// `pct` percent of `total`, rounded up: the least whole amount that is
/// not below `pct` percent.
fn share(total: u64, pct: u64) -> u64 {
    (u128::from(total) * u128::from(pct)).div_ceil(100) as u64
}

/// The performance data of `findings`: `'label'=value[UOM];warn;crit;min;max`
/// for each metric of [`METRICS`] whose finding is there, space-separated.
fn perfdata(findings: &[Finding], config: &Config) -> String {
    let mut out = Vec::new();
    for m in METRICS {
        let Some(detail) = findings
            .iter()
            .find(|f| f.id == m.finding)
            .and_then(|f| f.detail.as_object())
        else {
            continue;
        };
        let Some(value) = (m.value)(detail) else {
            continue;
        };
        let mut fields = (m.bounds)(detail, config).to_vec();
        while fields.last().is_some_and(String::is_empty) {
            fields.pop();
        }
        let mut item = format!("'{}'={value}{}", m.label, m.uom);
        for f in fields {
            item.push(';');
            item.push_str(&f);
        }
        out.push(item);
    }
    out.join(" ")
}

/// The findings as monitoring-plugin output, by the Monitoring Plugins
/// Development Guidelines:
///
/// ```text
/// AI-CMD-EXECUTOR WARNING - spool.stale: 2 file(s) ... (+1 more) | 'pending'=3;;;0 ...
/// WARNING spool.stale: 2 file(s) in pending/ older than 30m have not been run
/// UNKNOWN notifier: ...
/// OK config.valid: the configuration is valid
/// ```
///
/// One status line naming the worst finding, then one line per finding
/// that is not OK (worst first), then the OK ones. Every line is made safe
/// by [`one_line`], so `|` appears once, before the performance data. The
/// exit code that goes with it is `worst(findings).exit_code()`.
pub fn render_nagios(findings: &[Finding], config: &Config) -> String {
    let w = worst(findings);
    let mut bad: Vec<&Finding> = findings.iter().filter(|f| f.level != Level::Ok).collect();
    // Worst first; a stable sort keeps the checks' order within a level.
    bad.sort_by_key(|f| std::cmp::Reverse(f.level));
    let summary = match bad.as_slice() {
        [] => {
            let queue = findings
                .iter()
                .find(|f| f.id == "spool.queue")
                .and_then(|f| f.detail.as_object())
                .and_then(|d| Some((u64_of(d, "pending")?, u64_of(d, "running")?)));
            match queue {
                Some((p, r)) => {
                    format!("{} checks passed, {p} pending, {r} running", findings.len())
                }
                None => format!("{} checks passed", findings.len()),
            }
        }
        [first, rest @ ..] => {
            let more = if rest.is_empty() {
                String::new()
            } else {
                format!(" (+{} more)", rest.len())
            };
            format!("{}: {}{more}", first.id, first.summary)
        }
    };
    let mut out = format!(
        "{PLUGIN} {} - {}",
        w.word().to_uppercase(),
        one_line(&summary)
    );
    let perf = perfdata(findings, config);
    if !perf.is_empty() {
        out.push_str(" | ");
        out.push_str(&perf);
    }
    out.push('\n');
    let ok = findings.iter().filter(|f| f.level == Level::Ok);
    for f in bad.into_iter().chain(ok) {
        let mut line = format!("{} {}: {}", f.level.word().to_uppercase(), f.id, f.summary);
        if let Some(fix) = f.fix.as_ref().filter(|_| f.level != Level::Ok) {
            line.push_str(&format!(" (fix: {})", fix.describe()));
        }
        out.push_str(&one_line(&line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(id: &'static str, level: Level, summary: &str) -> Finding {
        Finding::new(id, level, summary)
    }

    fn queue(pending: u64, running: u64, oldest: Option<u64>) -> Finding {
        f("spool.queue", Level::Ok, "queue").detail(json!({
            "pending": pending, "running": running,
            "oldest_pending_secs": oldest, "oldest_pending_id": oldest.map(|_| "a"),
        }))
    }

    fn disk(free: u64, total: u64) -> Finding {
        f("spool.disk", Level::Ok, "disk").detail(json!({
            "free_bytes": free, "total_bytes": total,
            "free_inodes": 900, "total_inodes": 1000,
        }))
    }

    fn service(n_restarts: u64) -> Vec<Finding> {
        let d = json!({"n_restarts": n_restarts, "main_pid": 42});
        vec![
            f("service.active", Level::Ok, "active").detail(d.clone()),
            f("service.enabled", Level::Ok, "enabled").detail(d),
        ]
    }

    /// One metric as the guidelines give it:
    /// `'label'=value[UOM];[warn];[crit];[min];[max]`.
    #[derive(Debug, PartialEq)]
    struct Perf {
        label: String,
        value: f64,
        uom: String,
        warn: String,
        crit: String,
        min: Option<f64>,
        max: Option<f64>,
    }

    /// Whether `r` is a threshold range: `[@][start:][end]`, where start
    /// may be `~` (negative infinity) and an empty range means none.
    fn is_range(r: &str) -> bool {
        let r = r.strip_prefix('@').unwrap_or(r);
        let num = |s: &str| s.is_empty() || s.parse::<f64>().is_ok();
        match r.split_once(':') {
            Some((start, end)) => (start == "~" || num(start)) && num(end),
            None => num(r),
        }
    }

    /// Parses performance data strictly, failing on anything the
    /// guidelines do not allow.
    fn parse_perfdata(text: &str) -> Result<Vec<Perf>, String> {
        let mut out = Vec::new();
        for item in text.split(' ').filter(|s| !s.is_empty()) {
            let (label, rest) = if let Some(q) = item.strip_prefix('\'') {
                let end = q.find("'=").ok_or(format!("unclosed label in {item}"))?;
                (q[..end].to_owned(), &q[end + 2..])
            } else {
                let (l, r) = item.split_once('=').ok_or(format!("no = in {item}"))?;
                (l.to_owned(), r)
            };
            let fields: Vec<&str> = rest.split(';').collect();
            if fields.len() > 5 {
                return Err(format!("too many fields in {item}"));
            }
            let v = fields[0];
            let split = v
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                .unwrap_or(v.len());
            let (num, uom) = v.split_at(split);
            let value = num.parse::<f64>().map_err(|e| format!("{item}: {e}"))?;
            if !["", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"].contains(&uom) {
                return Err(format!("unit {uom:?} in {item}"));
            }
            let field = |i: usize| fields.get(i).copied().unwrap_or("");
            for r in [field(1), field(2)] {
                if !is_range(r) {
                    return Err(format!("range {r:?} in {item}"));
                }
            }
            let bound = |s: &str| -> Result<Option<f64>, String> {
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse().map(Some).map_err(|e| format!("{item}: {e}"))
                }
            };
            out.push(Perf {
                label,
                value,
                uom: uom.into(),
                warn: field(1).into(),
                crit: field(2).into(),
                min: bound(field(3))?,
                max: bound(field(4))?,
            });
        }
        Ok(out)
    }

    /// The status line, the long output and the performance data of
    /// plugin output; fails unless `|` appears once, on the first line.
    fn split(out: &str) -> (String, Vec<String>, Vec<Perf>) {
        assert_eq!(out.matches('|').count(), 1, "one | only: {out}");
        let mut lines = out.lines();
        let first = lines.next().expect("a status line");
        let (status, perf) = first.split_once(" | ").expect("perfdata on line 1");
        let long: Vec<String> = lines.map(str::to_owned).collect();
        (
            status.to_owned(),
            long,
            parse_perfdata(perf).expect("valid perfdata"),
        )
    }

    #[test]
    fn one_line_takes_out_pipes_and_line_breaks() {
        assert_eq!(
            one_line("a | b\nc\r\n\td  e|"),
            "a ¦ b c d e¦",
            "pipes replaced, whitespace runs collapsed"
        );
        assert_eq!(one_line("\n  lead and trail \n"), "lead and trail");
        assert_eq!(one_line("bell\u{7}here"), "bell here");
    }

    #[test]
    fn a_healthy_service_is_ok_with_every_metric_once() {
        let mut findings = vec![f("config.valid", Level::Ok, "valid")];
        findings.extend(service(3));
        findings.push(disk(10 << 30, 100 << 30));
        findings.push(queue(4, 1, Some(75)));
        let config = Config::default();
        let out = render_nagios(&findings, &config);
        let (status, long, perf) = split(&out);
        assert_eq!(
            status,
            "AI-CMD-EXECUTOR OK - 5 checks passed, 4 pending, 1 running"
        );
        assert_eq!(long.len(), findings.len(), "each finding once: {out}");
        assert!(long.iter().all(|l| l.starts_with("OK ")), "{long:?}");
        let labels: Vec<&str> = perf.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "pending",
                "running",
                "oldest_pending",
                "spool_free",
                "spool_free_pct",
                "spool_free_inodes",
                "n_restarts"
            ],
            "n_restarts once though two findings carry it"
        );
        let get = |l: &str| perf.iter().find(|p| p.label == l).unwrap();
        assert_eq!(get("pending").value, 4.0);
        assert_eq!(get("running").max, Some(1.0), "max_parallel");
        let oldest = get("oldest_pending");
        assert_eq!((oldest.value, oldest.uom.as_str()), (75.0, "s"));
        assert_eq!(oldest.warn, "1800", "stale_pending_after");
        let free = get("spool_free");
        assert_eq!(free.uom, "B");
        assert_eq!(free.max, Some((100u64 << 30) as f64));
        // 5 % of 100 GiB is more than 256 MiB, and 1 % more than 16 MiB:
        // spool.disk goes by whichever is reached first.
        assert_eq!(free.warn, format!("{}:", 5 * (1u64 << 30)));
        assert_eq!(free.crit, format!("{}:", 1u64 << 30));
        let pct = get("spool_free_pct");
        assert_eq!(
            (pct.value, pct.warn.as_str(), pct.crit.as_str()),
            (10.0, "5:", "1:")
        );
        let inodes = get("spool_free_inodes");
        assert_eq!((inodes.warn.as_str(), inodes.crit.as_str()), ("50:", "10:"));
        let restarts = get("n_restarts");
        assert_eq!((restarts.value, restarts.uom.as_str()), (3.0, "c"));
    }

    #[test]
    fn small_disks_get_the_absolute_limits() {
        let out = render_nagios(&[disk(512 << 20, 1 << 30)], &Config::default());
        let (_, _, perf) = split(&out);
        assert_eq!(perf[0].warn, format!("{}:", DISK_WARN_FREE_BYTES));
        assert_eq!(perf[0].crit, format!("{}:", DISK_CRIT_FREE_BYTES));
    }

    #[test]
    fn metrics_of_absent_findings_are_left_out() {
        let out = render_nagios(&[f("config.valid", Level::Ok, "valid")], &Config::default());
        assert_eq!(
            out,
            "AI-CMD-EXECUTOR OK - 1 checks passed\nOK config.valid: valid\n"
        );
        let (_, _, perf) = split(&render_nagios(&service(0), &Config::default()));
        assert_eq!(perf.len(), 1);
        // An empty queue has waited for nothing.
        let (_, _, perf) = split(&render_nagios(&[queue(0, 0, None)], &Config::default()));
        assert_eq!(perf[2].label, "oldest_pending");
        assert_eq!(perf[2].value, 0.0);
    }

    #[test]
    fn labels_of_the_table_are_unique_and_plain() {
        let mut seen = std::collections::HashSet::new();
        for m in METRICS {
            assert!(seen.insert(m.label), "{} twice", m.label);
            assert!(
                m.label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                m.label
            );
            assert!(["", "s", "B", "%", "c"].contains(&m.uom), "{}", m.uom);
        }
    }

    #[test]
    fn problems_come_first_worst_first_and_never_add_a_pipe() {
        let findings = vec![
            f("config.valid", Level::Ok, "valid"),
            f("spool.stale", Level::Warning, "2 stale | see\nthe log"),
            f("spool.layout", Level::Critical, "missing\n| tmp").fix(Fix::RepairSpool),
            f("notifier", Level::Unknown, "cannot check: a|b"),
            queue(1, 0, Some(3)),
        ];
        let out = render_nagios(&findings, &Config::default());
        let (status, long, _) = split(&out);
        assert_eq!(
            status,
            "AI-CMD-EXECUTOR CRITICAL - spool.layout: missing ¦ tmp (+2 more)"
        );
        assert_eq!(
            long,
            [
                "CRITICAL spool.layout: missing ¦ tmp (fix: create the spool's directories and set owner and modes)",
                "UNKNOWN notifier: cannot check: a¦b",
                "WARNING spool.stale: 2 stale ¦ see the log",
                "OK config.valid: valid",
                "OK spool.queue: queue",
            ]
        );
    }

    #[test]
    fn the_exit_code_is_the_worst_level() {
        let code = |levels: &[Level]| {
            let fs: Vec<Finding> = levels.iter().map(|l| f("x", *l, "x")).collect();
            worst(&fs).exit_code()
        };
        assert_eq!(code(&[]), 0);
        assert_eq!(code(&[Level::Ok, Level::Ok]), 0);
        assert_eq!(code(&[Level::Ok, Level::Warning]), 1);
        assert_eq!(code(&[Level::Warning, Level::Critical]), 2);
        // A fact that could not be read may hide anything short of a
        // failure already seen.
        assert_eq!(code(&[Level::Warning, Level::Unknown]), 3);
        assert_eq!(code(&[Level::Unknown, Level::Critical]), 2);
        for (l, word) in [
            (Level::Ok, "OK"),
            (Level::Warning, "WARNING"),
            (Level::Critical, "CRITICAL"),
            (Level::Unknown, "UNKNOWN"),
        ] {
            let out = render_nagios(&[f("x", l, "x")], &Config::default());
            assert!(
                out.starts_with(&format!("AI-CMD-EXECUTOR {word} - ")),
                "{out}"
            );
        }
    }

    #[test]
    fn permission_errors_are_recognised_through_their_causes() {
        use std::io;
        let eacces = || io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32);
        assert!(is_denied(&eacces()));
        assert!(is_denied(&io::Error::from(io::ErrorKind::PermissionDenied)));
        assert!(is_denied(&nix::errno::Errno::EPERM));
        assert!(is_denied(&rustix::io::Errno::ACCESS));
        let wrapped = crate::spool::safe::SafeError::Io {
            what: "opening",
            path: "/spool/pending".into(),
            source: eacces(),
        };
        assert!(is_denied(&wrapped));
        let any = anyhow::Error::new(wrapped).context("listing the queue");
        assert!(is_denied(any.as_ref()));
        assert!(!is_denied(&io::Error::from(io::ErrorKind::NotFound)));
        assert!(!is_denied(&nix::errno::Errno::ENOENT));
    }

    #[test]
    fn what_cannot_be_read_is_unknown_with_who_and_how() {
        use std::io;
        let f = Finding::cannot_read(
            "spool.stale",
            "pending/",
            "opening /spool/pending: Permission denied (os error 13)",
            &spool_access_hint(std::path::Path::new("/nonexistent")),
        );
        assert_eq!(f.level, Level::Unknown);
        let uid = nix::unistd::geteuid();
        assert!(
            f.summary
                .starts_with(&format!("cannot read pending/ as uid {uid}")),
            "{}",
            f.summary
        );
        assert!(f.summary.contains("Permission denied"), "{}", f.summary);
        assert!(
            f.summary.contains("group ai-cmd") && f.summary.contains("README"),
            "{}",
            f.summary
        );
        let out = render_nagios(&[f], &Config::default());
        assert!(out.starts_with("AI-CMD-EXECUTOR UNKNOWN - spool.stale: cannot read"));
        let problem = ConfigProblem::of(&io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(problem.denied);
    }
}

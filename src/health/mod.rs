//! Diagnosis: one registry of named checks, each giving a level, a sentence
//! a person can act on, machine-readable detail and, where one exists, a
//! fix. The same list serves `health` (the quick subset, monitoring-plugin
//! exit codes), `diagnose` (everything) and `repair` (diagnose, fix,
//! verify). A check that cannot run says `unknown` with the reason; it never
//! panics and never hides the others.

mod checks;
pub mod repair;

use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;

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

/// How the worker is kept running on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervision {
    /// systemd is PID 1: the service and timers.
    Systemd,
    /// No systemd: the cron fallback.
    Cron,
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

/// What the checks look at.
pub struct Ctx {
    /// The configuration (defaults if it did not load).
    pub config: Config,
    /// Why the configuration did not load, if it did not.
    pub config_error: Option<String>,
    /// The spool.
    pub spool: Spool,
    /// systemd or cron.
    pub supervision: Supervision,
    /// The bus, or why it is unreachable (systemd mode only).
    pub bus: Option<Result<Systemd, String>>,
    /// Whether to send a test notification.
    pub probe_notifier: bool,
}

impl Ctx {
    /// Builds the context: configuration, spool, supervision, bus.
    pub async fn new(
        loaded: Result<LoadedConfig, String>,
        spool: PathBuf,
        probe_notifier: bool,
    ) -> Ctx {
        let (config, config_error) = match loaded {
            Ok(l) => (l.config, None),
            Err(e) => (Config::default(), Some(e)),
        };
        let supervision = if crate::systemd::booted() {
            Supervision::Systemd
        } else {
            Supervision::Cron
        };
        let bus = match supervision {
            Supervision::Systemd => Some(
                Systemd::connect()
                    .await
                    .map_err(|e| crate::error::chain(&e)),
            ),
            Supervision::Cron => None,
        };
        Ctx {
            config,
            config_error,
            spool: Spool::new(spool),
            supervision,
            bus,
            probe_notifier,
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

/// A monitoring-plugin line: `AI-CMD-EXECUTOR OK - summary | perfdata`.
pub fn render_nagios(findings: &[Finding]) -> String {
    let w = worst(findings);
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| f.level != Level::Ok)
        .map(|f| format!("{}: {}", f.id, f.summary))
        .collect();
    let summary = if bad.is_empty() {
        format!("{} checks passed", findings.len())
    } else {
        bad.join("; ")
    };
    let mut perf = Vec::new();
    for f in findings {
        if let Some(obj) = f.detail.as_object() {
            for key in [
                "pending",
                "running",
                "completed",
                "rss_bytes",
                "free_bytes",
                "free_inodes",
                "n_restarts",
                "stale",
                "errors",
            ] {
                if let Some(v) = obj.get(key).and_then(serde_json::Value::as_u64) {
                    perf.push(format!("{key}={v}"));
                }
            }
        }
    }
    format!(
        "AI-CMD-EXECUTOR {} - {summary} | {}",
        w.word().to_uppercase(),
        perf.join(" ")
    )
}

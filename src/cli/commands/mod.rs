//! One handler per subcommand. Each resolves the configuration and spool the
//! same way (through [`Context`]) and calls into the library.

pub mod cancel;
pub mod config;
pub mod generate;
pub mod health;
pub mod install;
pub mod list;
pub mod log;
pub mod mcp;
pub mod result;
pub mod run;
pub mod service;
pub mod submit;
pub mod wait;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use crate::client::Client;
use crate::config::{Config, LoadedConfig};
use crate::spool::{JobId, JobResult};

/// What every handler needs from the global options.
#[derive(Debug, Clone)]
pub struct Context {
    /// `--config` / `AI_CMD_EXECUTOR_CONFIG`.
    pub config_path: Option<PathBuf>,
    /// `--spool` / `AI_CMD_EXECUTOR_SPOOL`.
    pub spool: Option<PathBuf>,
}

impl Context {
    /// Loads the configuration file (or the defaults).
    pub fn load_config(&self) -> anyhow::Result<LoadedConfig> {
        Ok(Config::load(self.config_path.as_deref())?)
    }

    /// The spool, as an absolute path: `--spool`, the environment, the
    /// config file, then the default.
    pub fn spool_path(&self, config: &Config) -> anyhow::Result<PathBuf> {
        let p = config.resolve_spool(self.spool.as_deref());
        std::path::absolute(&p).with_context(|| format!("resolving spool path {}", p.display()))
    }

    /// A client of the resolved spool (see [`Context::client_spool`]).
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(self.client_spool()?))
    }

    /// The spool of the client commands (`submit`, `result`, `wait`,
    /// `log`, `list`), which need nothing else from the configuration:
    /// `--spool` (or the environment), and then no configuration is read;
    /// else the file's `spool` key alone, so that a mistake in another key
    /// does not stop them. A file that is not valid TOML is a warning on
    /// stderr, and its `spool` is used if the mistake is elsewhere, the
    /// default spool if not.
    pub fn client_spool(&self) -> anyhow::Result<PathBuf> {
        let p = match &self.spool {
            Some(p) => p.clone(),
            None => {
                let s = Config::load_spool(self.config_path.as_deref())?;
                if let Some(e) = &s.broken {
                    let using = match &s.spool {
                        Some(p) => format!("the spool it names, {}", p.display()),
                        None => format!(
                            "the default spool, {} (give --spool to choose)",
                            crate::config::default_spool().display()
                        ),
                    };
                    eprintln!(
                        "ai-cmd-executor: warning: the configuration is not valid TOML: {e}; \
                         `ai-cmd-executor config check` shows the mistake; using {using}"
                    );
                }
                s.spool.unwrap_or_else(crate::config::default_spool)
            }
        };
        std::path::absolute(&p).with_context(|| format!("resolving spool path {}", p.display()))
    }
}

/// Parses an id given on the command line.
pub fn parse_id(s: &str) -> anyhow::Result<JobId> {
    JobId::new(s).with_context(|| format!("invalid job id {s:?}"))
}

/// Before a wait on `id`: a job no state knows (a mistyped id) is an error
/// at once, rather than a wait for ever; a job waiting while no worker
/// serves the spool gets one line on stderr saying so (the wait goes on:
/// a worker may come).
pub fn before_waiting(client: &Client, id: &JobId) -> anyhow::Result<()> {
    let state = match client.state(id)? {
        // Once more: a retried job moves from running/ back to pending/.
        crate::client::JobState::Unknown => client.state(id)?,
        s => s,
    };
    if matches!(state, crate::client::JobState::Unknown) {
        anyhow::bail!(
            "no job {id} in {}: it is not pending, running or finished (a mistyped id?)",
            client.spool().root().display()
        );
    }
    if matches!(state, crate::client::JobState::Pending) {
        warn_unserved(client);
    }
    Ok(())
}

/// Says on stderr when no worker serves the spool (nothing is said when
/// that cannot be told, say the lock file is not readable).
pub fn warn_unserved(client: &Client) {
    let root = client.spool().root();
    if let Ok(None) = crate::install::ensure::serving_worker(root) {
        eprintln!(
            "ai-cmd-executor: no worker is running on {}; the job waits in pending/",
            root.display()
        );
    }
}

/// Seconds from the command line as a timeout.
pub fn secs(s: Option<u64>) -> Option<Duration> {
    s.map(Duration::from_secs)
}

/// Exit code of the waiting commands when the tool itself fails (bad spool,
/// deadline passed): distinct from anything a job's own code maps to.
pub const TOOL_FAILURE: u8 = 125;

/// Prints a result for people, one field a line.
pub fn print_result(client: &Client, r: &JobResult) {
    let outcome = match (r.exit_code, &r.signal) {
        (Some(c), _) => format!("{} (exit code {c})", r.status),
        (None, Some(s)) => format!("{} (signal {s})", r.status),
        (None, None) => r.status.to_string(),
    };
    println!("id:        {}", r.id);
    println!("status:    {outcome}");
    println!("started:   {}", r.started_at);
    println!("finished:  {} ({} ms)", r.finished_at, r.duration_ms);
    if let Some(log) = &r.log {
        let trunc = if r.output_truncated {
            " (truncated)"
        } else {
            ""
        };
        println!(
            "log:       {}{trunc}",
            client.spool().root().join(log).display()
        );
    }
    if let Some(e) = &r.error {
        println!("error:     {e}");
    }
    if let Some(usage) = usage_line(&r.usage) {
        println!("usage:     {usage}");
    }
    if let Some(limits) = &r.limits {
        println!("limits:    {limits}");
    }
    println!("attempt:   {}", r.attempt);
}

/// What a run used, for people: `cpu 12 ms user + 3 ms system, peak 4.0 MiB`.
fn usage_line(u: &crate::spool::Usage) -> Option<String> {
    let (user, system) = (u.cpu_user_ms?, u.cpu_system_ms?);
    let mut line = format!("cpu {user} ms user + {system} ms system");
    if let Some(rss) = u.max_rss_bytes {
        // Precision for people, not arithmetic.
        #[allow(clippy::cast_precision_loss)]
        let mib = rss as f64 / f64::from(1u32 << 20);
        line.push_str(&format!(", peak memory {mib:.1} MiB"));
    }
    if let Some(tree) = u.memory_peak_bytes {
        #[allow(clippy::cast_precision_loss)]
        let mib = tree as f64 / f64::from(1u32 << 20);
        line.push_str(&format!(" ({mib:.1} MiB for the whole job)"));
    }
    Some(line)
}

/// Prints a result in the requested form and returns the job's shell exit code.
pub fn report(client: &Client, r: &JobResult, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print_result(client, r);
    }
    Ok(ExitCode::from(r.shell_exit_code()))
}

/// Runs a waiting command: errors are printed here and become
/// [`TOOL_FAILURE`], so a job's own exit code is never confused with them.
pub fn waiting(f: impl FnOnce() -> anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
    match f() {
        Ok(code) => Ok(code),
        Err(e) => {
            let root: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("ai-cmd-executor: {}", crate::error::chain(root));
            Ok(ExitCode::from(TOOL_FAILURE))
        }
    }
}

pub use crate::systemd::bus::block_on;

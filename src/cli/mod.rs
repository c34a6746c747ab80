//! The command line: clap definitions here, one handler file per
//! subcommand in `commands/`.

pub mod commands;

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The sections `--help` ends with and the man page carries (one source).
pub mod sections {
    /// EXIT STATUS.
    pub const EXIT_STATUS: &str = "\
0    success (for health: OK)
1    an error, with the cause on stderr (for health: WARNING); result and log: nothing yet
2    a usage error (for health: CRITICAL)
3    health: UNKNOWN (a fact it may not read, or a spool that does not exist)
submit --wait, wait and result --wait exit with the job's own exit code, and:
75   the job expired: it waited longer than stale_pending_after while no worker served the spool
124  the job timed out
126  the job was rejected (bad input, an unusable cwd)
127  the job could not be started (the result's error says why)
128+N  a signal N ended the job
130  the job was interrupted (the worker stopped)
125  the tool itself failed, or --timeout passed";

    /// FILES.
    pub const FILES: &str = "\
/etc/ai-cmd-executor/config.toml   the configuration (spool, max_parallel, timeouts, [notify])
/var/lib/ai-cmd-executor           the service's spool: tmp/ pending/ running/ completed/ logs/ archive/
SPOOL/.serving.lock                held (shared) by every live worker on the spool
SPOOL/.worker.lock                 held by the cron fallback's worker
SPOOL/.stopped                     an administrator's stop in cron mode
/etc/cron.d/ai-cmd-executor        the cron fallback (inert where systemd runs)
/lib/systemd/system/ai-cmd-executor*.service, *.timer   the units";

    /// ENVIRONMENT.
    pub const ENVIRONMENT: &str = "\
AI_CMD_EXECUTOR_SPOOL       the spool (as --spool)
AI_CMD_EXECUTOR_CONFIG      the configuration file (as --config)
AI_CMD_EXECUTOR_LOG_TARGET  journal, stderr or auto (as --log-target)
RUST_LOG                    the log filter (e.g. debug)
STATE_DIRECTORY, XDG_STATE_HOME, HOME   where the default spool is (docs/PROTOCOL.md)";

    /// EXAMPLES.
    pub const EXAMPLES: &str = "\
ai-cmd-executor run --spool ./spool                 a worker in the foreground
ai-cmd-executor submit --wait -- 'make test'        queue a command and wait for it
ai-cmd-executor log build-7 --follow                follow a job's output
ai-cmd-executor health --format nagios              a monitoring check
sudo ai-cmd-executor repair                         diagnose and mend the installation
ai-cmd-executor completions bash > ~/.local/share/bash-completion/completions/ai-cmd-executor";

    /// All four, as `--help` ends.
    pub fn after_help() -> String {
        format!(
            "Exit status:\n{}\n\nFiles:\n{}\n\nEnvironment:\n{}\n\nExamples:\n{}",
            indent(EXIT_STATUS),
            indent(FILES),
            indent(ENVIRONMENT),
            indent(EXAMPLES)
        )
    }

    fn indent(text: &str) -> String {
        text.lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A systemd-native command executor: agents drop shell commands into a
/// spool directory, a supervised worker runs them and leaves a result record
/// and a log for each.
#[derive(Debug, Parser)]
#[command(
    name = "ai-cmd-executor",
    version,
    about,
    long_about = None,
    after_long_help = sections::after_help()
)]
pub struct Cli {
    /// Configuration file [default: /etc/ai-cmd-executor/config.toml when it exists].
    #[arg(
        long,
        global = true,
        env = "AI_CMD_EXECUTOR_CONFIG",
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
    /// Spool directory [default: the config's `spool`, else /var/lib/ai-cmd-executor
    /// for root, $XDG_STATE_HOME/ai-cmd-executor otherwise].
    #[arg(
        long,
        global = true,
        env = "AI_CMD_EXECUTOR_SPOOL",
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub spool: Option<PathBuf>,
    /// Where log lines go: the journal (structured fields), stderr, or auto
    /// (the journal when systemd connected stderr to it).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "AI_CMD_EXECUTOR_LOG_TARGET",
        help_heading = "Global options"
    )]
    pub log_target: crate::logging::LogTarget,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker in the foreground (what the systemd unit starts).
    #[command(after_help = "Example:\n  ai-cmd-executor run --spool ./spool")]
    Run(RunArgs),
    /// Queue a shell command (or a script with --file) and print its id.
    #[command(
        after_help = "Examples:\n  ai-cmd-executor submit --id build-7 --timeout 600 -- 'make -j4'\n  ai-cmd-executor submit --wait --cwd /src -- 'make test'\n  ai-cmd-executor submit --memory-max 2G --tasks-max 256 -- 'npm ci'\n  ai-cmd-executor submit --file deploy.sh"
    )]
    Submit(SubmitArgs),
    /// Show the latest result of a job.
    #[command(after_help = "Example:\n  ai-cmd-executor result build-7 --json")]
    Result(ResultArgs),
    /// Print the latest log of a job.
    #[command(
        after_help = "Examples:\n  ai-cmd-executor log build-7 --follow\n  ai-cmd-executor log build-7 --from 4096    the output after its first 4096 bytes"
    )]
    Log(LogArgs),
    /// Wait for a job to finish; exit with its exit code.
    #[command(after_help = "Example:\n  ai-cmd-executor wait build-7 --timeout 3600 && echo built")]
    Wait(WaitArgs),
    /// List pending, running and completed jobs.
    #[command(after_help = "Example:\n  ai-cmd-executor list --state running")]
    List(ListArgs),
    /// Cancel a job: withdraw it if pending, stop it (and all it started) if running.
    #[command(
        after_help = "Only the job's submitter or root may cancel it. Exit 0 once it is cancelled, 1 if it ended otherwise first.\nExample:\n  ai-cmd-executor cancel build-7"
    )]
    Cancel(CancelArgs),
    /// Serve the Model Context Protocol on stdin/stdout, for AI agents.
    #[command(
        after_help = "A client of the spool, run by the agent's MCP client as the agent's user; the worker runs every job.\nExample (an MCP client's configuration):\n  {\"mcpServers\": {\"shell\": {\"command\": \"ai-cmd-executor\", \"args\": [\"mcp\"]}}}"
    )]
    Mcp,
    /// Install the service (systemd units, or the cron fallback), the
    /// service user, the spool and the default configuration.
    Install(InstallArgs),
    /// Stop, disable and remove what `install` added.
    Uninstall(UninstallArgs),
    /// Start a detached worker unless one runs (what the cron fallback calls).
    EnsureRunning,
    /// Print the completion script for a shell.
    #[command(
        after_help = "Example:\n  ai-cmd-executor completions bash > ~/.local/share/bash-completion/completions/ai-cmd-executor"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man page and shell completions into a directory (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory: man/ and completions/ are created in it.
        dir: PathBuf,
    },
    /// Quick health check for monitoring: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Health(HealthArgs),
    /// Run every check and show the findings (and fixes).
    Diagnose(DiagnoseArgs),
    /// Diagnose, fix, check the watchdog and persistence, verify with a probe job.
    Repair(RepairArgs),
    /// One screen: service, queue, last job, worker, spool.
    Status(StatusArgs),
    /// Start the service (over D-Bus) or the cron-mode worker.
    Start,
    /// Stop the service (over D-Bus) or the cron-mode worker.
    Stop,
    /// Restart the service (over D-Bus) or the cron-mode worker.
    Restart,
    /// Reload the configuration (and hand over to a replaced binary, with
    /// running jobs carrying on): the service over D-Bus, or SIGHUP to the
    /// cron-mode worker.
    Reload,
    /// Archive stale pending files, pack old logs, delete old archives.
    Cleanup(CleanupArgs),
    /// Send an alert through the configured notifier (what OnFailure= runs).
    Notify(NotifyArgs),
    /// Configuration tools.
    Config {
        /// What to do with the configuration.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Hold an exclusive lock on this file while running (exit if another
    /// worker holds it); `ensure-running` uses it.
    #[arg(long, value_name = "FILE")]
    pub lock_file: Option<PathBuf>,
}

/// `health` options.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Apply the fixes the checks offer, then check again.
    #[arg(long)]
    pub fix: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub format: crate::health::Format,
    /// Also send a test notification to check the webhook is reachable.
    #[arg(long)]
    pub probe: bool,
}

/// `diagnose` options.
#[derive(Debug, Args)]
pub struct DiagnoseArgs {
    /// Apply the fixes the checks offer, then check again.
    #[arg(long)]
    pub fix: bool,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Also send a test notification to check the webhook is reachable.
    #[arg(long)]
    pub probe: bool,
}

/// `repair` options.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Also enable the service and the health and cleanup timers where an
    /// administrator disabled them, and start the timers.
    ///
    /// Without it, repair says what is disabled and leaves it so. Either
    /// way, a service stopped with `ai-cmd-executor stop` or `systemctl
    /// stop` stays stopped until `ai-cmd-executor start`.
    #[arg(long)]
    pub enable: bool,
}

/// `status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `cleanup` options.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `notify` options.
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// The unit concerned.
    #[arg(long, default_value = "ai-cmd-executor.service")]
    pub unit: String,
    /// What happened.
    #[arg(long, default_value = "failed")]
    pub event: String,
    /// The message (default: the unit's state, read over D-Bus).
    #[arg(long)]
    pub message: Option<String>,
}

/// `install` options.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// systemd when it is PID 1, cron otherwise (auto), or force one.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: crate::install::Mode,
    /// Write the files under DIR instead of / and take no live action.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Print every file and action without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Service user and group.
    #[arg(long, value_name = "NAME", default_value = "ai-cmd")]
    pub user: String,
    /// Do not start the service or worker.
    #[arg(long)]
    pub no_start: bool,
}

/// `uninstall` options.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Work on the tree under DIR instead of /.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Print what would be removed without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Also delete the spool and the configuration (says what first).
    #[arg(long)]
    pub purge: bool,
}

/// `submit` options.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Job id (letters, digits, '.', '_', '-'; at most 128). Generated if absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Kill the job after this many seconds [default: the config's default_timeout].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<NonZeroU64>,
    /// Extra environment variable for the job (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Absolute directory to run the job in.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Put the job back in the queue if the worker dies while it runs.
    #[arg(long)]
    pub retry_on_interrupt: bool,
    /// Most memory of each of the job's processes, e.g. 512M or 2G [default: the config's limits].
    #[arg(long, value_name = "SIZE", value_parser = crate::spool::limits::Bytes::parse)]
    pub memory_max: Option<crate::spool::limits::Bytes>,
    /// Most processes and threads the job may add [default: the config's limits].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::spool::limits::MAX_TASKS)))]
    pub tasks_max: Option<u32>,
    /// Most CPU, as a share of one CPU (0.5) or a percentage (50%) [default: the config's limits].
    #[arg(long, value_name = "SHARE", value_parser = crate::spool::limits::CpuQuota::parse)]
    pub cpu_max: Option<crate::spool::limits::CpuQuota>,
    /// Submit this bash script file as a `.sh` job instead of a command.
    #[arg(long, value_name = "SCRIPT", conflicts_with_all = ["command", "env", "cwd", "retry_on_interrupt", "timeout", "memory_max", "tasks_max", "cpu_max"])]
    pub file: Option<PathBuf>,
    /// Wait for the job to finish, print its result and exit with its exit code.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, value_name = "SECS", requires = "wait")]
    pub wait_timeout: Option<u64>,
    /// The shell command (everything after `--`, joined with spaces).
    #[arg(trailing_var_arg = true, required_unless_present = "file")]
    pub command: Vec<String>,
}

/// `result` options.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The job id.
    pub id: String,
    /// Print the raw result record.
    #[arg(long)]
    pub json: bool,
    /// Wait for the job to finish first.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, value_name = "SECS", requires = "wait")]
    pub timeout: Option<u64>,
}

/// `log` options.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// The job id.
    pub id: String,
    /// Keep printing output as the job writes it, until it finishes.
    #[arg(long, short)]
    pub follow: bool,
    /// Start at this byte of the log (what an earlier read printed is
    /// skipped; past the end, nothing is printed).
    #[arg(long, value_name = "BYTE", default_value_t = 0)]
    pub from: u64,
}

/// `cancel` options.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    pub id: String,
    /// Return once the request is written, without waiting for the job to end.
    #[arg(long)]
    pub no_wait: bool,
    /// Wait at most this many seconds for the job to end [default: 60].
    #[arg(long, value_name = "SECS", conflicts_with = "no_wait")]
    pub timeout: Option<u64>,
    /// Print the raw result record.
    #[arg(long)]
    pub json: bool,
}

/// `wait` options.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The job id.
    pub id: String,
    /// Give up after this many seconds (exit 125).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print the raw result record.
    #[arg(long)]
    pub json: bool,
}

/// Job states `list` can filter on.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateFilter {
    /// Queued in pending/.
    Pending,
    /// Claimed by the worker.
    Running,
    /// Finished, with a result.
    Completed,
}

/// `list` options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateFilter>,
    /// JSON output: an array of {id, state, since, result}.
    #[arg(long)]
    pub json: bool,
}

/// `config` actions.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate the configuration and print the effective values.
    Check {
        /// Print nothing when it is valid (what the unit's ExecReload runs).
        #[arg(long)]
        quiet: bool,
    },
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let ctx = commands::Context {
            config_path: self.config,
            spool: self.spool,
        };
        match self.command {
            Command::Run(a) => commands::run::run(&ctx, a),
            Command::Install(a) => commands::install::install(&ctx, a),
            Command::Uninstall(a) => commands::install::uninstall(&ctx, a),
            Command::EnsureRunning => commands::install::ensure_running(&ctx),
            Command::GenerateAssets { dir } => commands::generate::run(&dir),
            Command::Completions { shell } => commands::generate::completions(shell),
            Command::Health(a) => commands::health::health(&ctx, a),
            Command::Diagnose(a) => commands::health::diagnose(&ctx, a),
            Command::Repair(a) => commands::health::repair(&ctx, a),
            Command::Status(a) => commands::service::status(&ctx, a),
            Command::Start => commands::service::control(&ctx, commands::service::Action::Start),
            Command::Stop => commands::service::control(&ctx, commands::service::Action::Stop),
            Command::Restart => {
                commands::service::control(&ctx, commands::service::Action::Restart)
            }
            Command::Reload => commands::service::control(&ctx, commands::service::Action::Reload),
            Command::Cleanup(a) => commands::service::cleanup(&ctx, a),
            Command::Notify(a) => commands::service::notify(&ctx, a),
            Command::Submit(a) => commands::submit::run(&ctx, a),
            Command::Result(a) => commands::result::run(&ctx, a),
            Command::Log(a) => commands::log::run(&ctx, a),
            Command::Wait(a) => commands::wait::run(&ctx, a),
            Command::List(a) => commands::list::run(&ctx, a),
            Command::Cancel(a) => commands::cancel::run(&ctx, a),
            Command::Mcp => commands::mcp::run(&ctx, self.log_target),
            Command::Config {
                action: ConfigAction::Check { quiet },
            } => commands::config::check(&ctx, quiet),
        }
    }
}

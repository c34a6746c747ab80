//! ai-cmd-executor: a systemd-native command executor.
//!
//! Agents drop shell commands as files into a spool directory; the worker
//! runs each one and leaves a result record and a log. The library holds
//! everything; `main.rs` only parses the command line and calls [`cli::Cli::run`].

/// Alerts that say what failed, once per incident; the journal when no
/// notifier is configured.
pub mod alert;
/// The command line: clap definitions and one handler per subcommand.
pub mod cli;
/// The client API over the spool contract (submit, result, wait, logs).
pub mod client;
/// Configuration: TOML file, defaults, validation.
pub mod config;
/// Printing error chains once.
pub mod error;
/// Diagnosis, health checks and repair.
pub mod health;
/// The installer: systemd units or the cron fallback, user, spool, config.
pub mod install;
/// Logging set-up for the worker and the CLI.
pub mod logging;
/// Maintenance: stale pending files, log packing, archive retention.
pub mod maintenance;
pub mod mcp;
/// Alerts: Slack or generic JSON webhooks.
pub mod notifier;
/// Root's tools act in the spool as its owner.
pub mod privilege;
/// The spool directory contract: layout, ids, job files, results.
pub mod spool;
/// systemd integration: the notify protocol.
pub mod systemd;
/// The worker: event loop, job execution, recovery.
pub mod worker;

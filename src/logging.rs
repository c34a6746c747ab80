//! Logging: structured journal entries under journald, readable lines on
//! stderr elsewhere.
//!
//! Why `tracing` + `tracing-journald` rather than `systemd-journal-logger`:
//! the worker is instrumented with `tracing` (structured fields on every
//! event), and `tracing-journald` sends each event as one native journal
//! entry with those fields as journal fields. `systemd-journal-logger` sits
//! on the `log` facade, whose key-value support would need a second set of
//! macros. `tracing-journald` prefixes event fields with `F_` unless told
//! otherwise, so the layer is built with `with_field_prefix(None)`: the
//! event field `cmd_id` becomes the journal field `CMD_ID`, and
//! `journalctl CMD_ID=x` works as written.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Stable `MESSAGE_ID`s, one per kind of event, so that
/// `journalctl MESSAGE_ID=…` finds every event of a kind.
pub mod message_id {
    /// A job was claimed and started.
    pub const JOB_STARTED: &str = "f78d71b3c99f4d3091108b40969e993c";
    /// A job's result was recorded (any status but rejected).
    pub const JOB_FINISHED: &str = "f5ce453e05554bb3b407715bab1d43c1";
    /// A job file was rejected as bad input.
    pub const JOB_REJECTED: &str = "e731a17994664d788f01efcf801c5f21";
    /// The worker withheld a watchdog ping because a self-check failed.
    pub const HEARTBEAT_WITHHELD: &str = "e66db1f6debc47899f3c183609b85250";
    /// The worker finished start-up and is serving.
    pub const WORKER_READY: &str = "c5928de1160f44d3b4781b2bd42e1e4c";
    /// The worker is stopping.
    pub const WORKER_STOPPING: &str = "6d9dc82b228d4dd6889568ee5e1bcd0a";
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogTarget {
    /// The journal when started by systemd with its output connected to
    /// journald (`JOURNAL_STREAM` set), stderr otherwise.
    #[default]
    Auto,
    /// Native journal entries with structured fields.
    Journal,
    /// Readable lines on stderr.
    Stderr,
}

/// Sets up the global subscriber. `default` is the level used when
/// `RUST_LOG` does not say otherwise.
pub fn init(default: &str, target: LogTarget) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let want_journal = match target {
        LogTarget::Journal => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("ai-cmd-executor".into());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => {
                eprintln!("ai-cmd-executor: journald is not reachable ({e}); logging to stderr")
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // Still under systemd: its journal stamps lines itself.
        builder.without_time().init();
    } else {
        builder.init();
    }
}

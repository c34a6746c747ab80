//! Logging: readable lines on stderr. Under journald (`JOURNAL_STREAM` set)
//! no timestamps are written, since the journal adds its own.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sets up the global subscriber. `default` is the level used when
/// `RUST_LOG` does not say otherwise.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.init();
    }
}

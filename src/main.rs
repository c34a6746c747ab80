//! The `ai-cmd-executor` binary: parse the command line, set up logging,
//! run the subcommand, print an error chain once.

use std::process::ExitCode;

use ai_cmd_executor::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.command {
        Command::Run(_) | Command::Install(_) | Command::Uninstall(_) | Command::Repair(_) => {
            "info"
        }
        _ => "warn",
    };
    ai_cmd_executor::logging::init(level, cli.log_target);
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            // The cause chain on one line, each cause once; no backtrace is
            // captured (RUST_BACKTRACE may be set in the environment). At
            // priority err in the journal, where an alert finds it.
            ai_cmd_executor::logging::eprint_failure("ai-cmd-executor", &e);
            ExitCode::FAILURE
        }
    }
}

//! The `ai-cmd-executor` binary: parse the command line, set up logging,
//! run the subcommand, print an error chain once.

use std::process::ExitCode;

use ai_cmd_executor::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.command {
        Command::Run => "info",
        _ => "warn",
    };
    ai_cmd_executor::logging::init(level, cli.log_target);
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the cause chain on one line and never captures a
            // backtrace (RUST_BACKTRACE may be set in the environment).
            eprintln!("ai-cmd-executor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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
    if !matches!(cli.command, Command::Run(_)) {
        // A command whose reader went away (`list | head`) ends quietly, as
        // other Unix tools do, not with a panic about a broken pipe. The
        // worker keeps SIGPIPE ignored: a write error is for it to handle.
        // SAFETY: no other thread runs yet, and no handler is installed.
        #[allow(unsafe_code)]
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
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

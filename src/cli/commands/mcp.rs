//! `mcp`: hands over to the MCP server's own binary, installed beside this
//! one. The server lives apart so that the worker, which stays resident on
//! every host, does not map the MCP SDK (it grew this binary by a third and
//! the idle worker's resident memory with it).

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::Context;

/// The MCP server's file name, in the same directory as `ai-cmd-executor`.
pub const SERVER: &str = "ai-cmd-executor-mcp";

/// Where the server is: beside the running binary.
pub fn server_path() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding this program's own path")?;
    Ok(me.with_file_name(SERVER))
}

/// Resolves the spool as every client does (warnings included), then
/// replaces this process with the server (with the same `--log-target`),
/// which keeps its PID: an MCP client that signals the process it started
/// reaches the server.
pub fn run(ctx: &Context, log_target: crate::logging::LogTarget) -> anyhow::Result<ExitCode> {
    let spool = ctx.client_spool()?;
    let server = server_path()?;
    let mut spool_arg = OsString::from("--spool=");
    spool_arg.push(&spool);
    let target = clap::ValueEnum::to_possible_value(&log_target).expect("no value is skipped");
    let e = std::process::Command::new(&server)
        .arg(spool_arg)
        .arg(format!("--log-target={}", target.get_name()))
        .exec();
    Err(e).with_context(|| {
        format!(
            "starting the MCP server {} (it is installed beside ai-cmd-executor; \
             a build from source has it in target/release/)",
            server.display()
        )
    })
}

/// The server's command line (`ai-cmd-executor-mcp`, and its man page).
///
/// Serves the Model Context Protocol on stdin/stdout for AI agents: tools
/// to run commands through the worker, follow their output, and list and
/// cancel jobs. The worker runs every job; this process only reads and
/// writes the spool, as the agent's user. `ai-cmd-executor mcp` starts it.
#[derive(Debug, clap::Parser)]
#[command(name = SERVER, version, about, long_about = None)]
pub struct ServerArgs {
    /// Configuration file (only its `spool` is read).
    #[arg(long, env = "AI_CMD_EXECUTOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Spool directory [default: as for every client, ai-cmd-executor-protocol(7)].
    #[arg(long, env = "AI_CMD_EXECUTOR_SPOOL", value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Where log lines go (never stdout, which carries the protocol).
    #[arg(long, value_enum, default_value_t, env = "AI_CMD_EXECUTOR_LOG_TARGET")]
    pub log_target: crate::logging::LogTarget,
}

/// The server's `main`: serves one MCP session on stdin/stdout until the
/// client closes it.
pub fn server_main() -> ExitCode {
    let args = <ServerArgs as clap::Parser>::parse();
    crate::logging::init("warn", args.log_target);
    let ctx = Context {
        config_path: args.config,
        spool: args.spool,
    };
    let served = ctx
        .client()
        .and_then(|client| super::block_on(crate::mcp::serve(client)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::logging::eprint_failure(SERVER, &e);
            ExitCode::FAILURE
        }
    }
}

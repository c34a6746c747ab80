//! `ai-cmd-executor-mcp`: the MCP server over stdin/stdout, a client of the
//! spool (`ai-cmd-executor mcp` starts it). A binary of its own so that the
//! resident worker does not map the MCP SDK.

fn main() -> std::process::ExitCode {
    ai_cmd_executor::cli::commands::mcp::server_main()
}

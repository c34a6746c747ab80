//! `list`: jobs by state.

use std::process::ExitCode;

use super::Context;
use crate::cli::{ListArgs, StateFilter};

/// Prints the jobs as a table or as JSON.
pub fn run(ctx: &Context, args: ListArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let state = args.state.map(|s| match s {
        StateFilter::Pending => "pending",
        StateFilter::Running => "running",
        StateFilter::Completed => "completed",
    });
    let entries = client.list(state)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<40} {:<28} {:<12} {:>5}",
        "STATE", "ID", "SINCE", "STATUS", "EXIT"
    );
    for e in entries {
        let since = e.since.map_or_else(|| "-".into(), |t| t.to_string());
        let (status, exit) = match &e.result {
            Some(r) => (
                r.status.to_string(),
                r.exit_code.map_or_else(
                    || r.signal.clone().unwrap_or_else(|| "-".into()),
                    |c| c.to_string(),
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<10} {:<40} {:<28} {:<12} {:>5}",
            e.state, e.id, since, status, exit
        );
    }
    Ok(ExitCode::SUCCESS)
}

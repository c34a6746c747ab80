//! `wait`: block until a job is finished.

use std::process::ExitCode;

use super::{Context, parse_id, report, secs, waiting};
use crate::cli::WaitArgs;

/// Waits for the job, prints its result, and exits with its exit code
/// (125 if the tool fails or the deadline passes).
pub fn run(ctx: &Context, args: WaitArgs) -> anyhow::Result<ExitCode> {
    waiting(|| {
        let client = ctx.client()?;
        let id = parse_id(&args.id)?;
        super::before_waiting(&client, &id)?;
        let r = client.wait(&id, secs(args.timeout))?;
        report(&client, &r, args.json)
    })
}

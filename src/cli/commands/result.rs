//! `result`: the latest result of a job.

use std::process::ExitCode;

use super::{Context, parse_id, print_result, secs, waiting};
use crate::cli::ResultArgs;

/// Prints the result (exit 0), or says where the job is when it has none
/// (exit 1). With `--wait`, waits and exits with the job's exit code.
pub fn run(ctx: &Context, args: ResultArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let id = parse_id(&args.id)?;
    if args.wait {
        return waiting(|| {
            super::before_waiting(&client, &id)?;
            let r = client.wait(&id, secs(args.timeout))?;
            super::report(&client, &r, args.json)
        });
    }
    match client.result(&id)? {
        Some(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_result(&client, &r);
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "no result for {id} yet: the job is {}",
                client.state(&id)?.name()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

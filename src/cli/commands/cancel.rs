//! `cancel`: withdraw a pending job or stop a running one.

use std::process::ExitCode;
use std::time::Duration;

use super::{Context, parse_id, report};
use crate::cli::CancelArgs;
use crate::client::ClientError;
use crate::spool::Status;

/// How long `cancel` waits for the job to end, unless told otherwise: the
/// default `kill_grace` and then some.
const WAIT: Duration = Duration::from_secs(60);

/// Asks the worker to cancel the job, then (unless `--no-wait`) waits for
/// its result and prints it: exit 0 once it is `cancelled`, 1 if it ended
/// otherwise first (or the cancel was refused) or the wait ran out.
pub fn run(ctx: &Context, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let id = parse_id(&args.id)?;
    client.cancel(&id)?;
    if args.no_wait {
        println!("cancel of {id} requested");
        super::warn_unserved(&client);
        return Ok(ExitCode::SUCCESS);
    }
    super::warn_unserved(&client);
    let wait = args.timeout.map_or(WAIT, Duration::from_secs);
    match client.wait(&id, Some(wait)) {
        Ok(r) if r.status == Status::Cancelled => {
            report(&client, &r, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => {
            report(&client, &r, args.json)?;
            eprintln!(
                "ai-cmd-executor: {id} was not cancelled: it ended {} first, or the worker refused the cancel (see its journal)",
                r.status
            );
            Ok(ExitCode::FAILURE)
        }
        Err(ClientError::Timeout { state, .. }) => {
            eprintln!(
                "ai-cmd-executor: {id} is still {state} after {}s; the cancel stands (`ai-cmd-executor wait {id}` follows it)",
                wait.as_secs()
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

//! `submit`: queue a command or a script.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use super::{Context, parse_id, report, secs, waiting};
use crate::cli::SubmitArgs;
use crate::client::Submission;
use crate::spool::Timestamp;
use crate::spool::job::{OnInterrupt, SubmittedVia};
use crate::spool::limits::Limits;
use std::num::NonZeroU32;

/// Queues the job, prints its id, and with `--wait` waits for its result.
pub fn run(ctx: &Context, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let mut sub = match &args.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading script {}", path.display()))?;
            Submission::script(text)
        }
        None => {
            let mut env = BTreeMap::new();
            for pair in &args.env {
                let Some((k, v)) = pair.split_once('=') else {
                    bail!("--env {pair:?}: expected NAME=VALUE");
                };
                env.insert(k.to_owned(), v.to_owned());
            }
            let on_interrupt = if args.retry_on_interrupt {
                OnInterrupt::Retry
            } else {
                OnInterrupt::Fail
            };
            let cwd = args.cwd.as_deref().map(std::path::absolute).transpose()?;
            let mut s =
                Submission::command(args.command.join(" ")).with_options(env, cwd, on_interrupt);
            if let Some(t) = args.timeout {
                s = s.with_timeout(t);
            }
            s.via(SubmittedVia::Cli).with_limits(Limits {
                memory_max: args.memory_max,
                tasks_max: args.tasks_max.and_then(NonZeroU32::new),
                cpu_max: args.cpu_max,
            })
        }
    };
    if let Some(id) = &args.id {
        sub = sub.with_id(parse_id(id)?);
    }
    let since = Timestamp::now();
    let id = client.submit(&sub)?;
    println!("{id}");
    super::warn_unserved(&client);
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    waiting(|| {
        let r = client.wait_since(&id, Some(since), secs(args.wait_timeout))?;
        report(&client, &r, false)
    })
}

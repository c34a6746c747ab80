//! `log`: print (and follow) the latest log of a job.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use inotify::WatchMask;

use super::{Context, parse_id};
use crate::cli::LogArgs;
use crate::client::{Client, DirWatch, JobState};
use crate::spool::JobId;

/// Prints the latest log; with `--follow`, waits for the job to start if it
/// is pending and prints output as it comes until the job has finished.
pub fn run(ctx: &Context, args: LogArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let id = parse_id(&args.id)?;
    let path = if args.follow {
        super::before_waiting(&client, &id)?;
        wait_for_log(&client, &id)?
    } else {
        client.latest_log(&id)?
    };
    let Some(path) = path else {
        eprintln!("no log for {id}: the job is {}", client.state(&id)?.name());
        return Ok(ExitCode::FAILURE);
    };
    let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    file.seek(SeekFrom::Start(args.from))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = io::stdout().lock();
    io::copy(&mut file, &mut out).with_context(|| format!("reading {}", path.display()))?;
    out.flush()?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let completed = client.spool().completed();
    let mut watch = DirWatch::new(&[
        (&path, WatchMask::MODIFY),
        (&completed, WatchMask::MOVED_TO),
    ])
    .with_context(|| format!("watching {}", path.display()))?;
    loop {
        let done = !matches!(client.state(&id)?, JobState::Pending | JobState::Running);
        io::copy(&mut file, &mut out).with_context(|| format!("reading {}", path.display()))?;
        out.flush()?;
        if done {
            return Ok(ExitCode::SUCCESS);
        }
        watch.wait(Duration::from_secs(1))?;
    }
}

/// The latest log, waiting for the job to start if it is still pending.
fn wait_for_log(client: &Client, id: &JobId) -> anyhow::Result<Option<PathBuf>> {
    let running = client.spool().running();
    let mut watch = DirWatch::new(&[(&running, WatchMask::MOVED_TO)])
        .with_context(|| format!("watching {}", running.display()))?;
    loop {
        match client.state(id)? {
            JobState::Pending => {}
            _ => return Ok(client.latest_log(id)?),
        }
        watch.wait(Duration::from_secs(1))?;
    }
}

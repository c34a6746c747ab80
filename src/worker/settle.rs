//! The last step of every run: record its result (or put it back in the
//! queue for a retry), then remove the job file from `running/`. Shared by
//! the live worker and by start-up recovery, so a run interrupted by a stop
//! and one interrupted by a crash end the same way.

use std::fs;
use std::io;
use std::path::Path;

use crate::spool::job::{Job, OnInterrupt};
use crate::spool::{
    JobResult, Spool, SpoolError, Staged, Status, move_into, rename_noreplace, write_atomically,
};

/// What [`settle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The result was written.
    Recorded(Status),
    /// The job was put back in `pending/` for another attempt.
    Requeued {
        /// The attempt it will run as.
        attempt: u32,
    },
}

/// Records `result` for the job file at `running_path` (whose parsed form is
/// `job`, if it parsed), or re-queues it when the run was interrupted and the
/// job asked for a retry and has attempts left.
pub fn settle(
    spool: &Spool,
    running_path: &Path,
    job: Option<&Job>,
    result: &JobResult,
    max_attempts: u32,
) -> Result<Settled, SpoolError> {
    match prepare(spool, running_path, job, result, max_attempts)? {
        Prepared::Done(settled) => Ok(settled),
        Prepared::Staged(staged) => finish(spool, running_path, result.status, staged),
    }
}

/// How far [`prepare`] got.
#[derive(Debug)]
pub enum Prepared {
    /// Nothing is left to do (the job was re-queued).
    Done(Settled),
    /// The result is staged; [`finish`] puts it in place.
    Staged(Staged),
}

/// The first half of [`settle`]: re-queues the job, or stages its result
/// (written, not yet synced; see [`Staged`]), so that several results can
/// be made durable by one journal commit.
pub fn prepare(
    spool: &Spool,
    running_path: &Path,
    job: Option<&Job>,
    result: &JobResult,
    max_attempts: u32,
) -> Result<Prepared, SpoolError> {
    if result.status == Status::Interrupted
        && let Some(job) = job
        && job.on_interrupt == OnInterrupt::Retry
        && job.attempt < max_attempts
        && let Some(attempt) = requeue(spool, running_path, job)?
    {
        return Ok(Prepared::Done(Settled::Requeued { attempt }));
    }
    spool.stage_result(result).map(Prepared::Staged)
}

/// The second half of [`settle`]: puts the staged result (of a run that
/// ended as `status`) in place, then takes the job file out of `running/`.
pub fn finish(
    spool: &Spool,
    running_path: &Path,
    status: Status,
    staged: Staged,
) -> Result<Settled, SpoolError> {
    staged.commit()?;
    let done = if status == Status::Interrupted {
        // Keep what was interrupted, so an operator can look at it or
        // submit it again; it is never run again by itself.
        move_into(running_path, &spool.archive_interrupted()).map(drop)
    } else {
        fs::remove_file(running_path)
    };
    match done {
        Ok(()) => Ok(Settled::Recorded(status)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Settled::Recorded(status)),
        Err(e) => Err(SpoolError::io("removing", running_path, e)),
    }
}

/// Writes the job back into `pending/` with the next attempt number and
/// removes it from `running/`. `None` when a job with the same id is
/// already pending (then the interrupted run is recorded instead).
fn requeue(spool: &Spool, running_path: &Path, job: &Job) -> Result<Option<u32>, SpoolError> {
    let mut next = job.clone();
    next.attempt += 1;
    let spec = next.to_spec().expect("only JSON jobs can ask for a retry");
    let name = running_path
        .file_name()
        .expect("a job file has a name")
        .to_string_lossy()
        .into_owned();
    let mut bytes = serde_json::to_vec(&spec).expect("a job always serializes");
    bytes.push(b'\n');
    let staged_name = format!("{name}.requeue.{}", std::process::id());
    write_atomically(&spool.tmp(), &staged_name, &bytes, 0o640)?;
    let staged = spool.tmp().join(&staged_name);
    let dest = spool.pending().join(&name);
    match rename_noreplace(&staged, &dest) {
        Ok(true) => {}
        Ok(false) => {
            let _ = fs::remove_file(&staged);
            return Ok(None);
        }
        Err(e) => {
            let _ = fs::remove_file(&staged);
            return Err(SpoolError::io("re-queueing into", dest, e));
        }
    }
    match fs::remove_file(running_path) {
        Ok(()) => Ok(Some(next.attempt)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(next.attempt)),
        Err(e) => Err(SpoolError::io("removing", running_path, e)),
    }
}

//! `run`: the worker in the foreground.

use std::process::ExitCode;

use tracing::error;

use super::Context;
use crate::cli::RunArgs;
use crate::install::ensure::{WorkerLock, acquire_worker_lock};
use crate::worker::handover::{self, Inherited};
use crate::worker::{self, Exit, WorkerOptions};

/// Loads the configuration and runs the worker until it is stopped. A
/// worker that hands over to a replaced binary re-executes it here (and
/// takes its jobs back if that fails).
pub fn run(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    // What a previous worker handed over, before anything can fail: its
    // jobs are this process's to follow.
    let (mut inherited, mut lock) = match handover::from_env() {
        Ok(Some(mut wire)) => {
            let lock = wire.lock_fd.take().and_then(take_lock);
            (Inherited::take(wire), lock)
        }
        Ok(None) => (Inherited::default(), None),
        Err(e) => {
            error!("taking over from the previous worker: {e:#}");
            (Inherited::default(), None)
        }
    };
    let loaded = ctx.load_config()?;
    let spool = ctx.spool_path(&loaded.config)?;
    // Held until the worker returns; the kernel drops it if we die.
    if lock.is_none() {
        lock = args
            .lock_file
            .as_deref()
            .map(acquire_worker_lock)
            .transpose()?;
    }
    let opts = WorkerOptions {
        config_path: ctx.config_path.clone(),
        loaded,
        spool,
    };
    loop {
        match worker::run(opts.clone(), inherited)? {
            Exit::Stopped => return Ok(ExitCode::SUCCESS),
            Exit::Handover(mut h) => {
                if let Some(l) = lock.take() {
                    h.wire.lock_fd = l.into_inheritable().ok();
                }
                let (err, mut wire) = h.exec();
                error!("{err:#}; this worker takes its jobs back and carries on");
                lock = wire.lock_fd.take().and_then(take_lock);
                inherited = Inherited::take(wire);
            }
        }
    }
}

/// The worker lock a previous worker passed on as descriptor `fd`.
fn take_lock(fd: i32) -> Option<WorkerLock> {
    match handover::adopt_fd(fd).and_then(WorkerLock::from_owned) {
        Ok(l) => Some(l),
        Err(e) => {
            error!("taking over the worker lock: {e}");
            None
        }
    }
}

//! `run`: the worker in the foreground.

use std::process::ExitCode;

use super::Context;
use crate::cli::RunArgs;
use crate::install::ensure::acquire_worker_lock;
use crate::worker::{self, WorkerOptions};

/// Loads the configuration and runs the worker until it is stopped.
pub fn run(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    let loaded = ctx.load_config()?;
    let spool = ctx.spool_path(&loaded.config)?;
    // Held until the worker returns; the kernel drops it if we die.
    let _lock = args
        .lock_file
        .as_deref()
        .map(acquire_worker_lock)
        .transpose()?;
    worker::run(WorkerOptions {
        config_path: ctx.config_path.clone(),
        loaded,
        spool,
    })?;
    Ok(ExitCode::SUCCESS)
}

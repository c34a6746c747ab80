//! `run`: the worker in the foreground.

use std::process::ExitCode;

use super::Context;
use crate::worker::{self, WorkerOptions};

/// Loads the configuration and runs the worker until it is stopped.
pub fn run(ctx: &Context) -> anyhow::Result<ExitCode> {
    let loaded = ctx.load_config()?;
    let spool = ctx.spool_path(&loaded.config)?;
    worker::run(WorkerOptions {
        config_path: ctx.config_path.clone(),
        loaded,
        spool,
    })?;
    Ok(ExitCode::SUCCESS)
}

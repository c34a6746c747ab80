//! `config check`: validate and print the effective configuration.

use std::process::ExitCode;

use super::Context;

/// Prints the effective configuration, or fails with the file and line of
/// the first error.
/// With `quiet`, a valid configuration prints nothing (errors still go to
/// stderr and exit 1).
pub fn check(ctx: &Context, quiet: bool) -> anyhow::Result<ExitCode> {
    let loaded = ctx.load_config()?;
    let spool = ctx.spool_path(&loaded.config)?;
    if quiet {
        return Ok(ExitCode::SUCCESS);
    }
    match &loaded.source {
        Some(p) => println!("# configuration OK: {}", p.display()),
        None => println!("# no configuration file; built-in defaults"),
    }
    println!("# spool in effect: {}", spool.display());
    print!("{}", loaded.config.to_toml());
    Ok(ExitCode::SUCCESS)
}

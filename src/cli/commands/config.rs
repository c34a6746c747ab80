//! `config check`: validate and print the effective configuration.

use std::process::ExitCode;

use super::Context;
use crate::config::Config;

/// Prints the effective configuration, or fails with the first error as
/// compilers print one: `path:LINE:COL: message`, the line, and a caret
/// under the mistake.
/// With `quiet`, a valid configuration prints nothing; errors still go to
/// stderr (at priority err in the journal, where `systemctl reload`'s
/// `ExecReload=` puts them, so `systemctl status` shows them) and exit 1.
pub fn check(ctx: &Context, quiet: bool) -> anyhow::Result<ExitCode> {
    let loaded = match Config::load(ctx.config_path.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            crate::logging::eprint_err(&e.diagnostic());
            return Ok(ExitCode::FAILURE);
        }
    };
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

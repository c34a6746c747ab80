//! `install`, `uninstall` and `ensure-running`.

use std::io::IsTerminal;
use std::process::ExitCode;

use super::Context;
use crate::cli::{InstallArgs, UninstallArgs};
use crate::install::{self, InstallOptions, UninstallOptions, ensure};

/// Installs the service or the cron fallback.
pub fn install(ctx: &Context, args: InstallArgs) -> anyhow::Result<ExitCode> {
    let spool = ctx
        .spool
        .clone()
        .unwrap_or_else(|| crate::config::SYSTEM_SPOOL.into());
    install::install(&InstallOptions {
        mode: args.mode,
        root: args.root,
        dry_run: args.dry_run,
        user: args.user,
        spool: std::path::absolute(spool)?,
        no_start: args.no_start,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Removes what `install` added.
pub fn uninstall(ctx: &Context, args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let spool = match &ctx.spool {
        Some(s) => s.clone(),
        None => ctx
            .load_config()
            .map(|l| l.config)
            .unwrap_or_default()
            .service_spool(),
    };
    install::uninstall(&UninstallOptions {
        root: args.root,
        dry_run: args.dry_run,
        purge: args.purge,
        spool: std::path::absolute(spool)?,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Starts a detached worker unless one runs or an administrator stopped
/// it; quiet when all is well.
pub fn ensure_running(ctx: &Context) -> anyhow::Result<ExitCode> {
    let loaded = ctx.load_config()?;
    let spool = ctx.spool_path(&loaded.config)?;
    // Run by root, the worker it starts and the files it opens in the
    // spool are the spool owner's, never root's.
    if nix::unistd::Uid::effective().is_root() && crate::privilege::become_owner(&spool)?.is_none()
    {
        let owned_by_root = crate::spool::safe::SafeDir::open(&spool)
            .and_then(|d| d.meta())
            .is_ok_and(|m| m.uid == 0);
        anyhow::ensure!(
            owned_by_root,
            "{} does not exist: as root, ensure-running only starts a worker on an installed spool \
             (run `ai-cmd-executor install` first, or run ensure-running as the service user)",
            spool.display()
        );
    }
    match ensure::ensure_running(&spool, ctx.config_path.as_deref())? {
        ensure::Ensured::AlreadyRunning(_) => {}
        ensure::Ensured::Started(pid) => {
            println!("started worker pid {pid} on {}", spool.display())
        }
        // Cron calls this every five minutes: a stop it respects is no
        // news to mail. A person at a terminal is told.
        ensure::Ensured::Stopped(mark) if std::io::stderr().is_terminal() => eprintln!(
            "not starting a worker on {}: it was stopped by an administrator since {}; \
             `ai-cmd-executor start` resumes it",
            spool.display(),
            humantime::format_rfc3339_seconds(mark.since.0)
        ),
        ensure::Ensured::Stopped(_) => {}
    }
    Ok(ExitCode::SUCCESS)
}

//! `health`, `diagnose` and `repair`.

use std::process::ExitCode;

use super::Context;
use crate::cli::{DiagnoseArgs, HealthArgs, RepairArgs};
use crate::config::Config;
use crate::health::{self, ConfigProblem, Ctx, Format, Scope, repair};

/// Builds the diagnosis context from the global options. A configuration
/// that does not load is itself a finding, not an error.
pub async fn context(ctx: &Context, probe_notifier: bool) -> Ctx {
    let loaded = ctx.load_config().map_err(|e| ConfigProblem::of(e.as_ref()));
    let config = loaded
        .as_ref()
        .map(|l| l.config.clone())
        .unwrap_or_default();
    // A configuration this user may not read still names a spool: the
    // package's, unless `--spool` or the environment names another (the
    // default of an unprivileged user, under its home, is surely not it).
    let config = match &loaded {
        Err(p) if p.denied => Config {
            spool: Some(crate::config::SYSTEM_SPOOL.into()),
            ..config
        },
        _ => config,
    };
    let spool = ctx
        .spool_path(&config)
        .unwrap_or_else(|_| crate::config::SYSTEM_SPOOL.into());
    let mut c = Ctx::new(loaded, spool, probe_notifier).await;
    c.config_path = ctx.config_path.clone();
    c
}

/// `health`: the quick checks; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
/// With `--format nagios`, a failure of the tool itself is UNKNOWN too
/// (exit 3, the reason on the status line), never a WARNING.
pub fn health(ctx: &Context, args: HealthArgs) -> anyhow::Result<ExitCode> {
    let format = args.format;
    let run = super::block_on(async {
        let c = context(ctx, args.probe).await;
        if let Some(missing) = missing_spool(ctx, &c) {
            return Ok(missing.report(format));
        }
        let (findings, done) = repair::check_and_fix(&c, Scope::Quick, args.fix).await;
        for d in &done {
            eprintln!("fixed: {d}");
        }
        match args.format {
            Format::Human => print!("{}", health::render_human(&findings)),
            Format::Json => println!("{}", health::render_json(&findings)),
            Format::Nagios => print!("{}", health::render_nagios(&findings, &c.config)),
        }
        Ok(ExitCode::from(health::worst(&findings).exit_code()))
    });
    match run {
        Err(e) if format == Format::Nagios => {
            tracing::error!("health: {e:#}");
            println!(
                "AI-CMD-EXECUTOR UNKNOWN - {}",
                health::one_line(&format!("the check could not run: {e:#}"))
            );
            Ok(ExitCode::from(health::Level::Unknown.exit_code()))
        }
        other => other,
    }
}

/// A spool named explicitly (`--spool`, `AI_CMD_EXECUTOR_SPOOL`) that does
/// not exist: nothing there can be checked (a mistyped path, most likely),
/// so the answer is UNKNOWN, not a list of failures to repair.
struct MissingSpool(std::path::PathBuf);

impl MissingSpool {
    fn report(&self, format: Format) -> ExitCode {
        let text = format!(
            "no spool at {}: it does not exist (a mistyped --spool or AI_CMD_EXECUTOR_SPOOL?)",
            self.0.display()
        );
        match format {
            Format::Nagios => println!("AI-CMD-EXECUTOR UNKNOWN - {}", health::one_line(&text)),
            Format::Json => println!(
                "{}",
                serde_json::json!({"status": "unknown", "error": text, "checks": []})
            ),
            Format::Human => eprintln!("UNKNOWN  {text}"),
        }
        ExitCode::from(health::Level::Unknown.exit_code())
    }
}

fn missing_spool(ctx: &Context, c: &health::Ctx) -> Option<MissingSpool> {
    (ctx.spool.is_some() && !c.spool.root().exists())
        .then(|| MissingSpool(c.spool.root().to_owned()))
}

/// `diagnose`: every check, readable or JSON.
pub fn diagnose(ctx: &Context, args: DiagnoseArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async {
        let c = context(ctx, args.probe).await;
        if let Some(missing) = missing_spool(ctx, &c) {
            let format = if args.json {
                Format::Json
            } else {
                Format::Human
            };
            return Ok(missing.report(format));
        }
        let (findings, done) = repair::check_and_fix(&c, Scope::Full, args.fix).await;
        for d in &done {
            eprintln!("fixed: {d}");
        }
        if args.json {
            println!("{}", health::render_json(&findings));
        } else {
            print!("{}", health::render_human(&findings));
        }
        Ok(ExitCode::from(health::worst(&findings).exit_code()))
    })
}

/// `repair`: the full sequence; non-zero if anything is still wrong.
pub fn repair(ctx: &Context, args: RepairArgs) -> anyhow::Result<ExitCode> {
    let opts = repair::RepairOptions {
        enable: args.enable,
    };
    super::block_on(async {
        let c = context(ctx, false).await;
        Ok(if repair::repair(&c, opts).await {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

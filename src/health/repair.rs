//! Applying fixes, and `repair`: diagnose → fix → watchdog → persistence →
//! verify, each step printed and sent to the notifier.

use std::path::Path;

use std::os::unix::process::CommandExt;

use anyhow::Context;

use super::checks::{Hold, current_hold, service_user};
use super::{Ctx, Finding, Fix, Level, Scope, Supervision, run_checks, worst};
use crate::install::{self, Report, ensure};
use crate::notifier::{Event, Notifier};
use crate::systemd::units::{CLEANUP_TIMER, HEALTH_TIMER, SERVICE};

/// Order in which fixes are applied: the spool and unit files before the
/// service is (re)started.
fn rank(f: &Fix) -> u8 {
    match f {
        Fix::RepairSpool => 0,
        // Stale jobs are set aside before a worker comes back, so they do
        // not all run at once long after their time.
        Fix::ArchiveStale => 1,
        Fix::ReinstallUnits { .. } => 2,
        Fix::ResetFailedAndStart => 3,
        Fix::StartService => 4,
        Fix::EnableUnits { .. } => 5,
        Fix::RestartService => 6,
        Fix::RestoreCronFallback => 7,
    }
}

/// What the fixes may do beyond what the health timer does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairOptions {
    /// Enable (and start) the units that are disabled, and start the
    /// timers that are stopped (`repair --enable`). Without it they are
    /// reported and left: an administrator's `disable` stands.
    pub enable: bool,
}

/// The fixes of the findings that are not OK, in order, without repeats.
/// Enabling units is among them only when `opts` allow it.
pub fn planned(findings: &[Finding], opts: RepairOptions) -> Vec<Fix> {
    let mut fixes: Vec<Fix> = findings
        .iter()
        .filter(|f| f.level != Level::Ok)
        .filter_map(|f| f.fix.clone())
        .filter(|f| opts.enable || !matches!(f, Fix::EnableUnits { .. }))
        .collect();
    fixes.sort_by_key(rank);
    fixes.dedup();
    // A service that is (re)started by one fix needs no second restart.
    let starts = fixes.iter().any(|f| {
        matches!(
            f,
            Fix::StartService | Fix::ResetFailedAndStart | Fix::ReinstallUnits { .. }
        )
    });
    if starts {
        fixes.retain(|f| !matches!(f, Fix::RestartService));
    }
    fixes
}

/// Applies one fix; returns what was done.
pub async fn apply(ctx: &Ctx, fix: &Fix) -> anyhow::Result<String> {
    match fix {
        Fix::StartService => {
            ctx.bus()
                .map_err(anyhow::Error::msg)?
                .start(SERVICE)
                .await?;
            Ok(format!("started {SERVICE}"))
        }
        Fix::ResetFailedAndStart => {
            let bus = ctx.bus().map_err(anyhow::Error::msg)?;
            bus.reset_failed(SERVICE).await?;
            bus.start(SERVICE).await?;
            Ok(format!(
                "reset the failed state of {SERVICE} and started it"
            ))
        }
        Fix::RestartService => {
            ctx.bus()
                .map_err(anyhow::Error::msg)?
                .restart(SERVICE)
                .await?;
            Ok(format!("restarted {SERVICE}"))
        }
        Fix::EnableUnits { units } => {
            let bus = ctx.bus().map_err(anyhow::Error::msg)?;
            let names: Vec<&str> = units.iter().map(String::as_str).collect();
            bus.enable(&names).await?;
            bus.reload().await?;
            // Enabling is about boot; a service an administrator stopped
            // stays stopped until `start`.
            let held = if names.contains(&SERVICE) {
                current_hold(ctx).await
            } else {
                None
            };
            for u in &names {
                if *u == SERVICE && held.is_some() {
                    continue;
                }
                bus.start(u).await?;
            }
            Ok(match held {
                Some(h) => format!(
                    "enabled {}, and started all but {SERVICE}: it was {}; {}",
                    names.join(" "),
                    h.describe(),
                    h.resume()
                ),
                None => format!("enabled and started {}", names.join(" ")),
            })
        }
        Fix::ReinstallUnits { files } => {
            let mut report = Report::new(false);
            for (path, text) in files {
                install::write_file(&mut report, path, text.as_bytes(), 0o644)?;
            }
            let bus = ctx.bus().map_err(anyhow::Error::msg)?;
            bus.reload().await?;
            let written = files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ");
            if let Some(h) = current_hold(ctx).await {
                return Ok(format!(
                    "re-installed {written}; left {SERVICE} stopped: it was {}",
                    h.describe()
                ));
            }
            bus.reset_failed(SERVICE).await.ok();
            bus.restart(SERVICE).await?;
            Ok(format!("re-installed {written} and restarted {SERVICE}"))
        }
        Fix::RepairSpool => {
            let service = match ctx.bus() {
                Ok(b) => b
                    .service_info(SERVICE)
                    .await
                    .map_err(|e| crate::error::chain(&e)),
                Err(e) => Err(e),
            };
            let user = service_user(&service);
            let mut report = Report::new(false);
            install::ensure_spool(&mut report, ctx.spool.root(), &user)?;
            Ok(format!(
                "re-created and re-owned {} for {user}",
                ctx.spool.root().display()
            ))
        }
        Fix::ArchiveStale => {
            // Spool work: as the spool's owner, never as root.
            let _as_owner = crate::privilege::lower(ctx.spool.root())?;
            // Nothing is archived while a worker serves the spool; while
            // archiving, the worker lock is held, so none starts meanwhile.
            let done = crate::maintenance::archive_stale(
                &ctx.spool,
                ctx.config.stale_pending_after.get(),
                false,
            )?;
            let mut text = format!(
                "archived {} stale pending job(s) into archive/stale/, each with an expired result",
                done.archived
            );
            let others: Vec<&String> = done
                .lines
                .iter()
                .filter(|l| !l.starts_with("archived "))
                .collect();
            for l in others {
                text.push_str("; ");
                text.push_str(l);
            }
            Ok(text)
        }
        Fix::RestoreCronFallback => restore_cron(ctx),
    }
}

/// Writes the cron file and starts a worker, unless an administrator
/// stopped it (the stop marker): then only the file is written.
fn restore_cron(ctx: &Ctx) -> anyhow::Result<String> {
    let user = service_user(&Err(String::new()));
    let binary = [
        crate::install::LOCAL_BINARY,
        crate::systemd::units::SHIPPED_BINARY,
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or(crate::systemd::units::SHIPPED_BINARY);
    let local = install::files::Local {
        binary: binary.into(),
        user: user.clone(),
        spool: ctx.spool.root().to_string_lossy().into_owned(),
    };
    let mut report = Report::new(false);
    install::write_file(
        &mut report,
        Path::new(install::CRON_FILE),
        local.cron().as_bytes(),
        0o644,
    )?;
    let pid = match ensure::running_worker(ctx.spool.root())? {
        Some(pid) => pid,
        None if let Some(mark) = ensure::stop_mark(ctx.spool.root())? => {
            let h = Hold::Stopped(Some(mark.since));
            return Ok(format!(
                "cron fallback in place; no worker started: it was {}; {}",
                h.describe(),
                h.resume()
            ));
        }
        None => {
            let u = nix::unistd::User::from_name(&user)?
                .with_context(|| format!("user {user} does not exist"))?;
            let out = std::process::Command::new(binary)
                .args(["ensure-running", "--spool"])
                .arg(ctx.spool.root())
                .uid(u.uid.as_raw())
                .gid(u.gid.as_raw())
                .output()
                .context("running ensure-running")?;
            anyhow::ensure!(
                out.status.success(),
                "ensure-running failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            ensure::running_worker(ctx.spool.root())?.unwrap_or(0)
        }
    };
    Ok(format!("cron fallback in place; worker pid {pid} running"))
}

/// Sends `event` if a notifier is configured; a failure is printed, never
/// fatal. Returns false if sending failed.
pub fn tell(config: &crate::config::Config, event: Event) -> bool {
    if config.notify.is_none() {
        return true;
    }
    match Notifier::from_config(config).and_then(|n| n.send(&event)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("notifier: {}", crate::error::chain(&e));
            false
        }
    }
}

/// Runs the checks of `scope`; with `fix`, applies the fixes and runs them
/// again. Returns the final findings and what was done.
pub async fn check_and_fix(ctx: &Ctx, scope: Scope, fix: bool) -> (Vec<Finding>, Vec<String>) {
    let findings = run_checks(ctx, scope).await;
    if !fix {
        return (findings, Vec::new());
    }
    // The timer's `health --fix` (and `diagnose --fix`) never enable units.
    let fixes = planned(&findings, RepairOptions::default());
    if fixes.is_empty() {
        alert_incidents(ctx, &findings);
        return (findings, Vec::new());
    }
    let mut done = Vec::new();
    for f in &fixes {
        match apply(ctx, f).await {
            Ok(what) => done.push(what),
            Err(e) => done.push(format!(
                "could not {}: {}",
                f.describe(),
                crate::error::chain(e.as_ref())
            )),
        }
    }
    let _ = tell(
        &ctx.config,
        Event {
            unit: SERVICE.into(),
            event: "health-fix".into(),
            message: format!(
                "health check found {} problem(s) and applied fixes",
                fixes.len()
            ),
            actions: done.clone(),
        },
    );
    let after = run_checks(ctx, scope).await;
    alert_incidents(ctx, &after);
    (after, done)
}

/// What the fixes leave broken and someone must see to (a service left
/// failed by its start limit, a full disk): alerted once per incident,
/// and said on stderr (the health unit's journal).
fn alert_incidents(ctx: &Ctx, findings: &[Finding]) {
    for line in crate::alert::health_incidents(ctx, findings) {
        eprintln!("{line}");
    }
}

/// Waits (up to a minute) while the service is in a transitional state;
/// returns the state it settles in.
async fn settle(bus: &crate::systemd::bus::Systemd) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let state = bus
            .unit_state(SERVICE)
            .await
            .map(|s| s.active_state)
            .unwrap_or_default();
        let transitional = matches!(state.as_str(), "activating" | "deactivating" | "reloading");
        if !transitional || std::time::Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `repair`: the full sequence. Prints each step; returns whether all is
/// well at the end (warnings are told, and are not failures: a service an
/// administrator stopped or disabled is left so, and said to be).
pub async fn repair(ctx: &Ctx, opts: RepairOptions) -> bool {
    let mut steps: Vec<String> = Vec::new();
    // Each step is printed and sent to the notifier as it happens; after
    // one failed send the rest are skipped, so a dead webhook costs a
    // repair one bounded wait, not one per step.
    let notifier_ok = std::cell::Cell::new(true);
    let step = |n: u8, text: String, steps: &mut Vec<String>| {
        println!("[{n}/5] {text}");
        steps.push(format!("{n}. {text}"));
        if notifier_ok.get() {
            let sent = tell(
                &ctx.config,
                Event {
                    unit: SERVICE.into(),
                    event: "repair-step".into(),
                    message: format!("repair step {n}/5: {text}"),
                    actions: Vec::new(),
                },
            );
            if !sent {
                notifier_ok.set(false);
                eprintln!("notifier: the remaining repair steps are not sent");
            }
        }
    };

    // 1. Diagnose.
    let findings = run_checks(ctx, Scope::Full).await;
    let bad: Vec<&Finding> = findings.iter().filter(|f| f.level != Level::Ok).collect();
    step(
        1,
        format!(
            "diagnose: {} check(s), {} not ok",
            findings.len(),
            bad.len()
        ),
        &mut steps,
    );
    for f in &bad {
        println!("      {} {}: {}", f.level, f.id, f.summary);
    }

    // 2. Apply every available fix.
    let fixes = planned(&findings, opts);
    if fixes.is_empty() {
        step(2, "fix: nothing to fix".into(), &mut steps);
    }
    for f in &fixes {
        match apply(ctx, f).await {
            Ok(what) => step(2, format!("fix: {what}"), &mut steps),
            Err(e) => step(
                2,
                format!(
                    "fix FAILED: could not {}: {}",
                    f.describe(),
                    crate::error::chain(e.as_ref())
                ),
                &mut steps,
            ),
        }
    }

    // A service restarting (by a fix, or by systemd after a watchdog
    // timeout) is given time to settle; one that ends up down is started,
    // unless an administrator stopped it.
    if matches!(ctx.supervision, Supervision::Cron | Supervision::Foreground)
        && let Some(h) = current_hold(ctx).await
    {
        step(
            2,
            format!(
                "fix: left the worker stopped: it was {}; {}",
                h.describe(),
                h.resume()
            ),
            &mut steps,
        );
    }
    if ctx.supervision == Supervision::Systemd
        && let Ok(bus) = ctx.bus()
    {
        let state = settle(bus).await;
        let held = if state == "active" {
            None
        } else {
            current_hold(ctx).await
        };
        if let Some(h) = held {
            step(
                2,
                format!(
                    "fix: left {SERVICE} {state}: it was {}; {}",
                    h.describe(),
                    h.resume()
                ),
                &mut steps,
            );
        } else if state != "active" {
            match apply(ctx, &Fix::ResetFailedAndStart).await {
                Ok(what) => step(
                    2,
                    format!("fix: {what} (it was {state} after the fixes)"),
                    &mut steps,
                ),
                Err(e) => step(
                    2,
                    format!(
                        "fix FAILED: could not start {SERVICE}: {}",
                        crate::error::chain(e.as_ref())
                    ),
                    &mut steps,
                ),
            }
        }
    }

    // 3. The watchdog is configured and the service runs under it;
    // 4. it persists across reboots.
    match ctx.supervision {
        Supervision::Systemd => match ctx.bus() {
            Ok(bus) => {
                let held = current_hold(ctx).await;
                match bus.service_info(SERVICE).await {
                    Ok(s) if s.watchdog_usec > 0 && s.unit.active_state == "active" => step(
                        3,
                        format!(
                            "watchdog: {SERVICE} is active with WatchdogSec={}s",
                            s.watchdog_usec / 1_000_000
                        ),
                        &mut steps,
                    ),
                    // systemd shows no watchdog (infinity) for a service
                    // that has not run since it was loaded: the unit file
                    // (`service.units`) says what it will be.
                    Ok(s) if held.is_some() => step(
                        3,
                        format!(
                            "watchdog: {SERVICE} is {}, so nothing runs under it ({})",
                            s.unit.active_state,
                            match s.watchdog_usec {
                                0 => "WatchdogSec= is NOT set".to_owned(),
                                u64::MAX => "its WatchdogSec= is read when it starts".to_owned(),
                                us => format!("WatchdogSec={}s", us / 1_000_000),
                            }
                        ),
                        &mut steps,
                    ),
                    Ok(s) => step(
                        3,
                        format!(
                            "watchdog NOT OK: {SERVICE} is {} with WatchdogUSec={}",
                            s.unit.active_state, s.watchdog_usec
                        ),
                        &mut steps,
                    ),
                    Err(e) => step(
                        3,
                        format!(
                            "watchdog: cannot read {SERVICE}: {}",
                            crate::error::chain(&e)
                        ),
                        &mut steps,
                    ),
                }
                let mut not_enabled = Vec::new();
                for u in [SERVICE, HEALTH_TIMER, CLEANUP_TIMER] {
                    if bus
                        .unit_state(u)
                        .await
                        .map(|s| s.unit_file_state)
                        .unwrap_or_default()
                        != "enabled"
                    {
                        not_enabled.push(u.to_owned());
                    }
                }
                if not_enabled.is_empty() {
                    step(
                        4,
                        "persistence: the service and both timers are enabled".into(),
                        &mut steps,
                    );
                } else if !opts.enable {
                    // An administrator's `disable` stands unless asked.
                    step(
                        4,
                        format!(
                            "persistence: left disabled: {}; `ai-cmd-executor repair --enable` enables {}",
                            not_enabled.join(" "),
                            if not_enabled.len() == 1 { "it" } else { "them" }
                        ),
                        &mut steps,
                    );
                } else {
                    let fix = Fix::EnableUnits { units: not_enabled };
                    match apply(ctx, &fix).await {
                        Ok(what) => step(4, format!("persistence: {what}"), &mut steps),
                        Err(e) => step(
                            4,
                            format!("persistence FAILED: {}", crate::error::chain(e.as_ref())),
                            &mut steps,
                        ),
                    }
                }
            }
            Err(e) => {
                step(3, format!("watchdog: {e}"), &mut steps);
                step(4, format!("persistence: {e}"), &mut steps);
            }
        },
        Supervision::Foreground => {
            let why = format!(
                "{SERVICE} does not serve {}; whoever started its worker by hand keeps it running",
                ctx.spool.root().display()
            );
            step(3, format!("watchdog: none: {why}"), &mut steps);
            step(4, format!("persistence: none: {why}"), &mut steps);
        }
        Supervision::Cron => {
            step(3, "watchdog: not available without systemd; cron's ensure-running restarts a dead worker (not one an administrator stopped)".into(), &mut steps);
            if Path::new(install::CRON_FILE).exists() {
                step(
                    4,
                    format!("persistence: {} is in place", install::CRON_FILE),
                    &mut steps,
                );
            } else {
                match restore_cron(ctx) {
                    Ok(what) => step(4, format!("persistence: {what}"), &mut steps),
                    Err(e) => step(
                        4,
                        format!("persistence FAILED: {}", crate::error::chain(e.as_ref())),
                        &mut steps,
                    ),
                }
            }
        }
    }

    // 5. Verify end to end, and re-check.
    let after = run_checks(ctx, Scope::Full).await;
    let probe = after.iter().find(|f| f.id == "probe.end_to_end");
    step(
        5,
        format!(
            "verify: {}",
            probe.map_or("no probe ran".into(), |p| format!(
                "{} ({})",
                p.summary, p.level
            ))
        ),
        &mut steps,
    );
    let still: Vec<&Finding> = after
        .iter()
        .filter(|f| matches!(f.level, Level::Critical | Level::Unknown))
        .collect();
    let ok = still.is_empty();
    let warned: Vec<&Finding> = after.iter().filter(|f| f.level == Level::Warning).collect();
    if ok && warned.is_empty() {
        println!("repair: all is well ({})", worst(&after));
    } else if ok {
        println!("repair: nothing is broken; left as they are:");
        for f in &warned {
            println!("      {} {}: {}", f.level, f.id, f.summary);
        }
    } else {
        println!("repair: still wrong:");
        for f in &still {
            println!("      {} {}: {}", f.level, f.id, f.summary);
        }
    }
    if notifier_ok.get() {
        tell(
            &ctx.config,
            Event {
                unit: SERVICE.into(),
                event: if ok {
                    "repaired".into()
                } else {
                    "repair-failed".into()
                },
                message: if ok {
                    "repair finished: all is well".into()
                } else {
                    format!(
                        "repair finished, still wrong: {}",
                        still.iter().map(|f| f.id).collect::<Vec<_>>().join(", ")
                    )
                },
                actions: steps,
            },
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(id: &'static str, fix: Fix) -> Finding {
        Finding::new(id, Level::Warning, "x").fix(fix)
    }

    #[test]
    fn units_are_enabled_only_when_asked() {
        let enable = Fix::EnableUnits {
            units: vec![HEALTH_TIMER.into()],
        };
        let findings = [
            finding("timers", enable.clone()),
            finding("spool.layout", Fix::RepairSpool),
        ];
        assert_eq!(
            planned(&findings, RepairOptions::default()),
            vec![Fix::RepairSpool],
            "the timer and a plain `repair` leave a disabled unit"
        );
        assert_eq!(
            planned(&findings, RepairOptions { enable: true }),
            vec![Fix::RepairSpool, enable]
        );
    }
}

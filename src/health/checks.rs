//! The checks. Each returns findings; none fails the others.

use std::fs::{self, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use nix::unistd::{Group, User};
use serde_json::json;

use super::{Ctx, Finding, Fix, Level, Scope, Supervision};
use crate::client::{Client, Submission};
use crate::install::ensure::StopMark;
use crate::install::{CRON_FILE, LOCAL_BINARY, ensure};
use crate::logging::message_id;
use crate::spool::acl;
use crate::spool::id::parse_job_file_name;
use crate::spool::job::Job;
use crate::spool::safe::{SafeDir, SafeError};
use crate::spool::{JobId, LAYOUT, ROOT_MODE, Status, Timestamp};
use crate::systemd::bus::ServiceInfo;
use crate::systemd::units::{
    self, CLEANUP_TIMER, HEALTH_TIMER, RenderOptions, SERVICE, SHIPPED_BINARY, SHIPPED_USER,
};

/// The id of the probe job.
pub const PROBE_ID: &str = "ai-cmd-executor-probe";

/// Runs the checks of `scope`.
pub async fn run_checks(ctx: &Ctx, scope: Scope) -> Vec<Finding> {
    let mut out = vec![check_config(ctx)];
    let service = match ctx.supervision {
        Supervision::Systemd => match ctx.bus() {
            Ok(bus) => bus
                .service_info(SERVICE)
                .await
                .map_err(|e| crate::error::chain(&e)),
            Err(e) => Err(e),
        },
        Supervision::Cron => Err("cron mode".into()),
        Supervision::Foreground => Err("not the service's spool".into()),
    };
    let down = match (ctx.supervision, &service) {
        (Supervision::Systemd, Ok(s)) => service_down(ctx, s, booted_at(ctx).await),
        (Supervision::Systemd, Err(_)) => None,
        (Supervision::Cron | Supervision::Foreground, _) => cron_down(ctx),
    };
    let held = match &down {
        Some(Down::Held(h)) => Some(h),
        _ => None,
    };
    match ctx.supervision {
        Supervision::Systemd => {
            let limit = match &service {
                Ok(s) if s.unit.active_state != "active" => start_limit(ctx, s),
                _ => None,
            };
            out.extend(check_service(&service, down.as_ref(), limit.as_ref()));
            out.push(check_watchdog(&service));
            out.push(check_units_drift(&service));
            out.push(check_timers(ctx).await);
        }
        Supervision::Cron => out.push(check_cron(ctx)),
        Supervision::Foreground => out.push(check_foreground(ctx)),
    }
    let user = match ctx.supervision {
        // A foreground worker's spool belongs to whoever runs it.
        Supervision::Cron => foreground_user(ctx).unwrap_or_else(|| service_user(&service)),
        // Not the service's spool: whoever runs its worker, else its owner.
        Supervision::Foreground => foreground_user(ctx)
            .or_else(|| owner_of(ctx.spool.root()))
            .unwrap_or_else(|| service_user(&service)),
        Supervision::Systemd => service_user(&service),
    };
    out.push(check_layout(ctx, &user));
    out.push(check_disk(ctx));
    {
        // Reading the queue is spool work: as root, done as the spool's
        // owner. Were that impossible (a link in place of the spool root),
        // the checks below still follow no link and say what they found.
        let _as_owner = crate::privilege::lower(ctx.spool.root()).ok().flatten();
        out.push(check_stale(ctx));
        out.push(check_queue(ctx));
        out.push(check_stuck(ctx));
        out.push(check_orphans(ctx, held));
    }
    out.push(check_notifier(ctx));
    if scope == Scope::Full {
        out.push(check_process(ctx, &service, held));
        out.push(check_journal());
        let (probe, isolation) = check_probe(ctx, &service, held).await;
        out.push(probe);
        out.extend(isolation);
    }
    out
}

/// Why the worker is down on purpose. The health timer and `repair` leave
/// it so: only `ai-cmd-executor start` (or `repair --enable`, for a
/// disabled service) changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// Stopped by an administrator (`ai-cmd-executor stop`, `systemctl
    /// stop`), since then when known.
    Stopped(Option<Timestamp>),
    /// The service is disabled and was not started since boot.
    Disabled,
}

impl Hold {
    /// What it is, for people: `stopped by an administrator since T`.
    pub fn describe(&self) -> String {
        match self {
            Hold::Stopped(Some(t)) => format!(
                "stopped by an administrator since {}",
                humantime::format_rfc3339_seconds(t.0)
            ),
            Hold::Stopped(None) => "stopped by an administrator".into(),
            Hold::Disabled => "disabled, and not started since boot".into(),
        }
    }

    /// What resumes it, for people.
    pub fn resume(&self) -> &'static str {
        match self {
            Hold::Stopped(_) => "`ai-cmd-executor start` resumes it",
            Hold::Disabled => {
                "`ai-cmd-executor start` starts it, and `ai-cmd-executor repair --enable` enables it at boot"
            }
        }
    }
}

/// Why a service that ended cleanly (or a cron-mode worker) is not running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Down {
    /// On purpose: left so.
    Held(Hold),
    /// The worker stopped on a SIGTERM or SIGINT that did not come through
    /// systemd (a job or a user signalled it): not a stop anyone asked of
    /// the service, so it is started again. At this time, when known.
    Signalled(Option<Timestamp>),
}

/// What the journal says about how the service's last run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ending {
    /// When systemd last ran a stop job for the unit (`systemctl stop`,
    /// `ai-cmd-executor stop`, a shutdown), if it did.
    pub stop_job: Option<Timestamp>,
    /// The worker logged that a signal made it stop.
    pub worker_signalled: bool,
}

/// A systemd wall-clock time (microseconds since the epoch; 0: none).
fn realtime(usec: u64) -> Option<Timestamp> {
    (usec != 0).then(|| Timestamp(SystemTime::UNIX_EPOCH + Duration::from_micros(usec)))
}

/// Whether a service that is not running was stopped on purpose: the
/// decision, from what systemd says (`s`), the stop marker `stop` leaves
/// (`mark`), and the journal since the last start, or since boot when
/// systemd no longer knows the last start (`ending`, `None` when it could
/// not be read). `None` when the service is not inactive after a clean end
/// (running, failed, not installed), or is enabled and was not started or
/// stopped since boot: then nothing is held and the usual fixes apply.
///
/// A clean stop (`inactive`, result `success`) is what `systemctl stop`
/// and `ai-cmd-executor stop` leave; a crash, a watchdog kill or a failed
/// start leave `failed`. One other way there looks the same on the bus: a
/// SIGTERM sent to the worker by someone else (jobs run as the worker's
/// user). The journal tells them apart: systemd records its stop job, and
/// the worker records the signal. When the journal says nothing either way
/// (not readable by this user, or rotated), the stop is taken as meant.
///
/// systemd unloads an inactive unit that nothing refers to (a disabled
/// one), and with it the times of its last start and stop: then a stop
/// marker or a stop job since boot still says it was stopped, and a
/// disabled unit is held anyway.
pub fn classify_down(
    s: &ServiceInfo,
    mark: Option<StopMark>,
    ending: Option<Ending>,
) -> Option<Down> {
    if !ended_cleanly(s) {
        return None;
    }
    let stop_job = ending.and_then(|e| e.stop_job);
    let Some(started) = realtime(s.active_enter_timestamp) else {
        let since = stop_job.into_iter().chain(mark.map(|m| m.since)).max();
        return match since {
            Some(t) => Some(Down::Held(Hold::Stopped(Some(t)))),
            None => (s.unit.unit_file_state == "disabled").then_some(Down::Held(Hold::Disabled)),
        };
    };
    let stopped = realtime(s.inactive_enter_timestamp);
    // `ai-cmd-executor stop` since the last start (an older mark is stale:
    // `systemctl start` does not remove it).
    if let Some(m) = mark
        && m.since >= started
    {
        return Some(Down::Held(Hold::Stopped(stopped.or(Some(m.since)))));
    }
    match ending {
        Some(e) if e.worker_signalled && stop_job.is_none() => Some(Down::Signalled(stopped)),
        _ => Some(Down::Held(Hold::Stopped(stopped))),
    }
}

/// Loaded, and inactive after a clean end (or no run at all).
fn ended_cleanly(s: &ServiceInfo) -> bool {
    s.unit.load_state == "loaded" && s.unit.active_state == "inactive" && s.result == "success"
}

/// The service's [`Down`], reading the stop marker and the journal.
/// `booted`: when this boot began.
fn service_down(ctx: &Ctx, s: &ServiceInfo, booted: Option<Timestamp>) -> Option<Down> {
    // Cheap first: most of the time the service runs.
    if !ended_cleanly(s) {
        return None;
    }
    // A mark from before this boot is stale, as is one from before the
    // last start (see `classify_down`).
    let mark = ensure::stop_mark(ctx.spool.root())
        .ok()
        .flatten()
        .filter(|m| booted.is_none_or(|b| m.since >= b));
    let since = realtime(s.active_enter_timestamp).or(booted);
    classify_down(s, mark, since.and_then(journal_ending))
}

/// When this boot began: when systemd started (inside a container too,
/// where the kernel's boot is older), else when the kernel booted.
async fn booted_at(ctx: &Ctx) -> Option<Timestamp> {
    if let Ok(bus) = ctx.bus()
        && let Ok(usec) = bus.booted_at().await
        && let Some(t) = realtime(usec)
    {
        return Some(t);
    }
    use nix::time::{ClockId, clock_gettime};
    let up = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    let up = Duration::new(up.tv_sec().try_into().ok()?, up.tv_nsec().try_into().ok()?);
    SystemTime::now().checked_sub(up).map(Timestamp)
}

/// A cron-mode worker held by the stop marker: none runs, and the marker
/// is there.
fn cron_down(ctx: &Ctx) -> Option<Down> {
    if ensure::local_worker(ctx.spool.root())
        .ok()
        .flatten()
        .is_some()
    {
        return None;
    }
    let mark = ensure::stop_mark(ctx.spool.root()).ok().flatten()?;
    Some(Down::Held(Hold::Stopped(Some(mark.since))))
}

/// What the worker is held by, if it is: read afresh (the fixes use it
/// just before they would start the service).
pub async fn current_hold(ctx: &Ctx) -> Option<Hold> {
    let down = match ctx.supervision {
        Supervision::Systemd => {
            let s = ctx.bus().ok()?.service_info(SERVICE).await.ok()?;
            service_down(ctx, &s, booted_at(ctx).await)
        }
        Supervision::Cron | Supervision::Foreground => cron_down(ctx),
    };
    match down {
        Some(Down::Held(h)) => Some(h),
        _ => None,
    }
}

/// What the journal says about how the run that started at `since` (the
/// last start, or the boot when systemd no longer knows the last start)
/// ended: entries that systemd and the worker write, matched on a field a
/// job cannot forge where it matters (`_PID=1` for systemd's stop job).
/// `None` when journalctl cannot be run.
///
/// By time, not `--boot`: a sandboxed caller (the health unit's
/// `ProtectKernelTunables=`) may see another boot id than the journal's
/// writers inside a container.
fn journal_ending(since: Timestamp) -> Option<Ending> {
    let since_usec = since
        .0
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    let times = |matches: &[String]| -> Option<Vec<u64>> {
        let out = Command::new("journalctl")
            .args([
                "--no-pager",
                "-q",
                "-o",
                "json",
                "--output-fields=__REALTIME_TIMESTAMP",
            ])
            .arg(format!("--since=@{}", since_usec / 1_000_000))
            .args(matches)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["__REALTIME_TIMESTAMP"].as_str()?.parse::<u64>().ok())
                .filter(|t| *t >= since_usec)
                .collect(),
        )
    };
    let stop_job = times(&[
        "_PID=1".into(),
        format!("UNIT={SERVICE}"),
        "JOB_TYPE=stop".into(),
    ])?;
    let worker = times(&[
        format!("_SYSTEMD_UNIT={SERVICE}"),
        format!("MESSAGE_ID={}", message_id::WORKER_STOPPING),
    ])?;
    Some(Ending {
        stop_job: stop_job.into_iter().max().and_then(realtime),
        worker_signalled: !worker.is_empty(),
    })
}

/// The service user: the unit's `User=`, else the cron file's, else the default.
/// The user a foreground worker serving the spool runs as (the owner of
/// its `/proc` entry), when one does and no cron worker does.
fn foreground_user(ctx: &Ctx) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let (pid, how) = ensure::local_worker(ctx.spool.root()).ok().flatten()?;
    if how != ensure::Started::Foreground || pid <= 0 {
        return None;
    }
    let uid = fs::metadata(format!("/proc/{pid}")).ok()?.uid();
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// The user the service runs as: the unit's `User=`, else the cron file's,
/// else the package's.
pub fn service_user(service: &Result<ServiceInfo, String>) -> String {
    if let Ok(s) = service
        && !s.user.is_empty()
    {
        return s.user.clone();
    }
    fs::read_to_string(CRON_FILE)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with('@') && !l.trim().is_empty())
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| SHIPPED_USER.into())
}

fn check_config(ctx: &Ctx) -> Finding {
    match &ctx.config_error {
        None => Finding::new("config.valid", Level::Ok, "the configuration is valid"),
        Some(e) if e.denied => Finding::cannot_read(
            "config.valid",
            "the configuration",
            &e.text,
            "it is world-readable as installed; the checks assume the package's spool",
        ),
        Some(e) => Finding::new(
            "config.valid",
            Level::Critical,
            format!("the configuration is invalid: {}", e.text),
        ),
    }
}

fn unknown(id: &'static str, why: &str) -> Finding {
    Finding::new(id, Level::Unknown, format!("cannot check: {why}"))
}

/// A part of the spool this user may not read (`what`: `pending/`).
fn denied_spool(ctx: &Ctx, id: &'static str, what: &str, e: &SafeError) -> Finding {
    Finding::cannot_read(
        id,
        what,
        &e.to_string(),
        &super::spool_access_hint(ctx.spool.root()),
    )
}

/// A service that systemd gave up on (its start-rate limit): when, what
/// changed since that may have mended it, and the last error it logged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartLimit {
    /// When it failed.
    pub at: Option<Timestamp>,
    /// The configuration file or the binary, changed since it failed (for
    /// people: `/etc/…/config.toml changed at T`); `None` if neither was.
    pub changed: Option<String>,
    /// The last error in its journal since its last start.
    pub last_error: Option<String>,
}

/// What [`StartLimit`] says of `s`, if systemd gave up on it (see
/// [`crate::alert::hit_start_limit`]). The configuration file and this
/// binary (the one the units run) are compared with the time it failed, by
/// their ctime, which an edit, a `touch` and a package upgrade (a new file,
/// with the package's own mtime) all set.
fn start_limit(ctx: &Ctx, s: &ServiceInfo) -> Option<StartLimit> {
    if !crate::alert::hit_start_limit(SERVICE, s) {
        return None;
    }
    let at = realtime(s.inactive_enter_timestamp);
    let config = ctx
        .config_path
        .clone()
        .unwrap_or_else(|| crate::config::DEFAULT_CONFIG_PATH.into());
    let files = [Some(config), std::env::current_exe().ok()];
    let changed = at.and_then(|at| {
        files.iter().flatten().find_map(|f| {
            let m = fs::metadata(f).ok()?;
            let ctime = realtime(
                u64::try_from(m.ctime()).ok()? * 1_000_000 + m.ctime_nsec() as u64 / 1000,
            )?;
            (ctime > at).then(|| {
                format!(
                    "{} changed at {}",
                    f.display(),
                    humantime::format_rfc3339_seconds(ctime.0)
                )
            })
        })
    });
    Some(StartLimit {
        at,
        changed,
        last_error: crate::alert::last_error(SERVICE, s.inactive_exit_timestamp),
    })
}

fn check_service(
    service: &Result<ServiceInfo, String>,
    down: Option<&Down>,
    limit: Option<&StartLimit>,
) -> Vec<Finding> {
    let s = match service {
        Ok(s) => s,
        Err(e) => return vec![unknown("service.active", e), unknown("service.enabled", e)],
    };
    let held = match down {
        Some(Down::Held(h)) => Some(h),
        _ => None,
    };
    let stopped_since = match held {
        Some(Hold::Stopped(Some(t))) => Some(*t),
        _ => None,
    };
    // Left failed by its start limit, until what caused it may have changed.
    let hit_limit = s.unit.active_state != "active" && (limit.is_some() || s.hit_start_limit());
    let left_failed = hit_limit && limit.is_none_or(|l| l.changed.is_none());
    let detail = json!({
        "load_state": s.unit.load_state, "active_state": s.unit.active_state, "sub_state": s.unit.sub_state,
        "result": s.result, "n_restarts": s.n_restarts, "main_pid": s.main_pid,
        "unit_file_state": s.unit.unit_file_state, "fragment_path": s.fragment_path,
        "held": held.map(Hold::describe), "stopped_since": stopped_since,
        "inactive_enter_timestamp": s.inactive_enter_timestamp, "left_failed": left_failed,
        "last_error": limit.and_then(|l| l.last_error.as_deref()),
    });
    let active = if s.unit.load_state != "loaded" {
        Finding::new(
            "service.active",
            Level::Critical,
            format!(
                "{SERVICE} is not installed ({}); run `ai-cmd-executor install` or install the package",
                s.unit.load_state
            ),
        )
    } else if s.unit.active_state == "active" {
        let uptime = uptime(s.active_enter_timestamp_monotonic);
        let mut f = Finding::new(
            "service.active",
            Level::Ok,
            format!(
                "{SERVICE} is {}/{}, up {}, {} restart(s)",
                s.unit.active_state, s.unit.sub_state, uptime, s.n_restarts
            ),
        );
        if s.n_restarts >= 5 {
            f.level = Level::Warning;
            f.summary
                .push_str("; it keeps restarting, see `journalctl -u ai-cmd-executor`");
        }
        f
    } else if hit_limit {
        // Starting it again as it is would fail as often again (and alert
        // as often): only a change that may have mended it is worth a try.
        let at = limit
            .and_then(|l| l.at)
            .map_or("an unknown time".into(), |t| {
                humantime::format_rfc3339_seconds(t.0).to_string()
            });
        let last = limit
            .and_then(|l| l.last_error.as_deref())
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        match limit.and_then(|l| l.changed.as_deref()) {
            Some(what) => Finding::new(
                "service.active",
                Level::Critical,
                format!(
                    "{SERVICE} hit its start limit at {at}{last}; {what} since, so it is started again"
                ),
            )
            .fix(Fix::ResetFailedAndStart),
            None => Finding::new(
                "service.active",
                Level::Critical,
                format!(
                    "{SERVICE} hit its start limit at {at}{last}; not restarted until the config or \
                     binary changes; fix the cause, then `ai-cmd-executor start`"
                ),
            ),
        }
    } else if s.unit.active_state == "failed" {
        Finding::new(
            "service.active",
            Level::Critical,
            format!("{SERVICE} failed (result: {})", s.result),
        )
        .fix(Fix::ResetFailedAndStart)
    } else if s.unit.active_state == "activating" || s.unit.active_state == "reloading" {
        Finding::new(
            "service.active",
            Level::Warning,
            format!("{SERVICE} is {}", s.unit.active_state),
        )
    } else if let Some(h) = held {
        // No fix: neither the timer nor `repair` undoes an administrator's stop.
        Finding::new(
            "service.active",
            Level::Warning,
            format!("{SERVICE} was {}; {}", h.describe(), h.resume()),
        )
    } else if let Some(Down::Signalled(at)) = down {
        Finding::new(
            "service.active",
            Level::Critical,
            format!(
                "{SERVICE} stopped{} on a signal that did not come through systemd \
                 (a job or a user signalled the worker); `ai-cmd-executor stop` is how to keep it stopped",
                at.map(|t| format!(" at {}", humantime::format_rfc3339_seconds(t.0)))
                    .unwrap_or_default()
            ),
        )
        .fix(Fix::StartService)
    } else {
        Finding::new(
            "service.active",
            Level::Critical,
            format!("{SERVICE} is {} (not running)", s.unit.active_state),
        )
        .fix(Fix::StartService)
    };
    let enabled = match s.unit.unit_file_state.as_str() {
        "enabled" | "enabled-runtime" | "static" | "alias" => Finding::new(
            "service.enabled",
            Level::Ok,
            format!("{SERVICE} starts at boot ({})", s.unit.unit_file_state),
        ),
        "" => Finding::new(
            "service.enabled",
            Level::Critical,
            format!("{SERVICE} has no unit file"),
        ),
        other => Finding::new(
            "service.enabled",
            Level::Warning,
            format!(
                "{SERVICE} is {other}: it does not start at boot; `ai-cmd-executor repair --enable` \
                 (or `systemctl enable {SERVICE}`) enables it"
            ),
        )
        // Applied only when asked: `repair --enable`.
        .fix(Fix::EnableUnits {
            units: vec![SERVICE.into()],
        }),
    };
    vec![active.detail(detail.clone()), enabled.detail(detail)]
}

fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

fn uptime(entered_monotonic: u64) -> String {
    if entered_monotonic == 0 {
        return "-".into();
    }
    let secs = monotonic_usec().saturating_sub(entered_monotonic) / 1_000_000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn check_watchdog(service: &Result<ServiceInfo, String>) -> Finding {
    let s = match service {
        Ok(s) => s,
        Err(e) => return unknown("service.watchdog", e),
    };
    let detail = json!({"watchdog_usec": s.watchdog_usec, "last_ping_monotonic": s.watchdog_timestamp_monotonic});
    if s.unit.load_state != "loaded" {
        return unknown("service.watchdog", "the service is not installed").detail(detail);
    }
    if s.watchdog_usec == 0 {
        return Finding::new(
            "service.watchdog",
            Level::Critical,
            "WatchdogSec= is not set: a hung worker would never be restarted",
        )
        .detail(detail);
    }
    let limit = Duration::from_micros(s.watchdog_usec);
    if s.unit.active_state != "active" {
        return Finding::new(
            "service.watchdog",
            Level::Ok,
            format!(
                "watchdog {} configured (service not running)",
                humantime::format_duration(limit)
            ),
        )
        .detail(detail);
    }
    let since = if s.watchdog_timestamp_monotonic == 0 {
        monotonic_usec().saturating_sub(s.active_enter_timestamp_monotonic)
    } else {
        monotonic_usec().saturating_sub(s.watchdog_timestamp_monotonic)
    };
    let since = Duration::from_micros(since);
    if since > limit {
        Finding::new(
            "service.watchdog",
            Level::Warning,
            format!(
                "no watchdog ping for {}s (limit {}): the worker may be hung",
                since.as_secs(),
                humantime::format_duration(limit)
            ),
        )
        .detail(detail)
    } else {
        Finding::new(
            "service.watchdog",
            Level::Ok,
            format!(
                "watchdog {}, last ping {}s ago",
                humantime::format_duration(limit),
                since.as_secs()
            ),
        )
        .detail(detail)
    }
}

/// The text each unit file should have, next to the service's file.
fn expected_units(fragment: &Path, user: &str) -> Vec<(PathBuf, String)> {
    let dir = fragment
        .parent()
        .unwrap_or(Path::new("/lib/systemd/system"));
    let packaged = !dir.starts_with("/etc");
    let binary = if packaged || !Path::new(LOCAL_BINARY).exists() {
        SHIPPED_BINARY
    } else {
        LOCAL_BINARY
    };
    let opts = RenderOptions {
        binary: binary.into(),
        user: if packaged {
            SHIPPED_USER.into()
        } else {
            user.into()
        },
    };
    units::render(&opts)
        .into_iter()
        .map(|(name, text)| (dir.join(name), text))
        .collect()
}

fn check_units_drift(service: &Result<ServiceInfo, String>) -> Finding {
    let s = match service {
        Ok(s) if !s.fragment_path.is_empty() => s,
        Ok(_) => return unknown("service.units", "the service has no unit file"),
        Err(e) => return unknown("service.units", e),
    };
    let user = if s.user.is_empty() {
        SHIPPED_USER
    } else {
        &s.user
    };
    let mut drifted = Vec::new();
    for (path, text) in expected_units(Path::new(&s.fragment_path), user) {
        match fs::read_to_string(&path) {
            Ok(actual) if actual == text => {}
            Err(e) if super::is_denied(&e) => {
                return Finding::cannot_read(
                    "service.units",
                    &path.display().to_string(),
                    &e.to_string(),
                    "unit files are world-readable as installed",
                );
            }
            _ => drifted.push((path, text)),
        }
    }
    if drifted.is_empty() {
        Finding::new("service.units", Level::Ok, "the unit files are as shipped")
    } else {
        let names: Vec<String> = drifted
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        Finding::new(
            "service.units",
            Level::Warning,
            format!(
                "unit files differ from what was installed: {}",
                names.join(", ")
            ),
        )
        .detail(json!({"drifted": names}))
        .fix(Fix::ReinstallUnits { files: drifted })
    }
}

async fn check_timers(ctx: &Ctx) -> Finding {
    let bus = match ctx.bus() {
        Ok(b) => b,
        Err(e) => return unknown("timers", &e),
    };
    let mut problems = Vec::new();
    let mut fix_units = Vec::new();
    let mut detail = serde_json::Map::new();
    for t in [HEALTH_TIMER, CLEANUP_TIMER] {
        match bus.timer_info(t).await {
            Ok(info) => {
                detail.insert(t.into(), serde_json::to_value(&info).unwrap_or_default());
                if info.unit.load_state != "loaded" {
                    problems.push(format!("{t} is not installed"));
                } else if info.unit.unit_file_state != "enabled" {
                    problems.push(format!(
                        "{t} is {} and {}",
                        info.unit.unit_file_state, info.unit.active_state
                    ));
                    fix_units.push(t.to_owned());
                } else if info.unit.active_state != "active" {
                    problems.push(format!(
                        "{t} is enabled but {}",
                        match info.unit.active_state.as_str() {
                            "inactive" => "stopped",
                            other => other,
                        }
                    ));
                    fix_units.push(t.to_owned());
                } else if info.next_elapse_realtime == 0 && info.next_elapse_monotonic == 0 {
                    problems.push(format!("{t} has no next elapse"));
                }
            }
            Err(e) => return unknown("timers", &crate::error::chain(&e)),
        }
    }
    let detail = serde_json::Value::Object(detail);
    if problems.is_empty() {
        Finding::new(
            "timers",
            Level::Ok,
            "the health and cleanup timers are enabled and scheduled",
        )
        .detail(detail)
    } else {
        if fix_units.is_empty() {
            return Finding::new("timers", Level::Warning, problems.join("; ")).detail(detail);
        }
        // A disabled or stopped timer is an administrator's choice until
        // shown otherwise: enabled only when asked.
        let text = format!(
            "{}; `ai-cmd-executor repair --enable` (or `systemctl enable --now {}`) enables and starts {}",
            problems.join("; "),
            fix_units.join(" "),
            if fix_units.len() == 1 { "it" } else { "them" }
        );
        Finding::new("timers", Level::Warning, text)
            .detail(detail)
            .fix(Fix::EnableUnits { units: fix_units })
    }
}

fn check_cron(ctx: &Ctx) -> Finding {
    let file = Path::new(CRON_FILE).exists();
    let worker = match ensure::running_worker(ctx.spool.root()) {
        Ok(w) => w,
        Err(e) if super::is_denied(e.as_ref()) => {
            return Finding::cannot_read(
                "cron.fallback",
                "the worker's lock file",
                &crate::error::chain(e.as_ref()),
                &super::spool_access_hint(ctx.spool.root()),
            );
        }
        Err(_) => None,
    };
    if worker.is_none()
        && let Ok(Some(pid)) = ensure::serving_worker(ctx.spool.root())
    {
        // Started by hand (`ai-cmd-executor run`): it serves the spool, and
        // nothing restarts it.
        return Finding::new(
            "cron.fallback",
            Level::Ok,
            format!(
                "a foreground worker, pid {pid}, serves the spool (started by hand, not by cron: nothing restarts it if it stops){}",
                if file {
                    ""
                } else {
                    "; no cron fallback is installed"
                }
            ),
        )
        .detail(json!({"cron_file": file, "worker_pid": pid, "mode": "foreground"}));
    }
    let mark = ensure::stop_mark(ctx.spool.root());
    let stopped = mark.as_ref().ok().copied().flatten().map(|m| m.since);
    let detail = json!({"cron_file": file, "worker_pid": worker, "stopped_since": stopped});
    let marker = ctx.spool.root().join(ensure::STOPPED_MARKER);
    if let Err(e) = &mark {
        if super::is_denied(e.as_ref()) {
            return Finding::cannot_read(
                "cron.fallback",
                "the stop marker",
                &crate::error::chain(e.as_ref()),
                &super::spool_access_hint(ctx.spool.root()),
            )
            .detail(detail);
        }
        return unknown(
            "cron.fallback",
            &format!(
                "reading the stop marker {} (cron's ensure-running starts no worker while it cannot): {}",
                marker.display(),
                crate::error::chain(e.as_ref())
            ),
        )
        .detail(detail);
    }
    let held = Hold::Stopped(stopped);
    match (file, worker, stopped) {
        (true, Some(pid), None) => Finding::new(
            "cron.fallback",
            Level::Ok,
            format!("cron fallback installed; worker pid {pid} running"),
        )
        .detail(detail),
        (true, Some(pid), Some(_)) => Finding::new(
            "cron.fallback",
            Level::Warning,
            format!(
                "worker pid {pid} runs, but {} says it was {}: cron will not restart it after a crash; \
                 `ai-cmd-executor start` removes the marker",
                marker.display(),
                held.describe()
            ),
        )
        .detail(detail),
        // No fix: neither the timer nor `repair` undoes an administrator's stop.
        (true, None, Some(_)) => Finding::new(
            "cron.fallback",
            Level::Warning,
            format!("the worker was {}; {}", held.describe(), held.resume()),
        )
        .detail(detail),
        (true, None, None) => Finding::new(
            "cron.fallback",
            Level::Critical,
            "no worker holds the spool lock (cron will start one within 5 minutes)",
        )
        .detail(detail)
        .fix(Fix::RestoreCronFallback),
        (false, _, _) => Finding::new(
            "cron.fallback",
            Level::Critical,
            format!("{CRON_FILE} is missing: nothing restarts the worker after a crash or reboot"),
        )
        .detail(detail)
        .fix(Fix::RestoreCronFallback),
    }
}

/// On a host systemd runs, a spool its service does not serve: the worker
/// started by hand that serves it, if one does. Nothing restarts it, and no
/// fix starts one (whoever runs it chose where and as whom).
fn check_foreground(ctx: &Ctx) -> Finding {
    let spool = ctx.spool.root();
    let theirs = ctx.config.service_spool();
    match ensure::local_worker(spool) {
        Ok(Some((pid, how))) => Finding::new(
            "worker.foreground",
            Level::Ok,
            format!(
                "a worker, pid {pid}, serves the spool ({}; {SERVICE} serves {}, not this spool): nothing restarts it if it stops",
                match how {
                    ensure::Started::Cron => "started by `ensure-running`",
                    ensure::Started::Foreground => "started by hand",
                },
                theirs.display()
            ),
        )
        .detail(json!({"worker_pid": pid, "mode": "foreground", "service_spool": theirs})),
        Ok(None) => {
            let (level, why) = match ensure::stop_mark(spool).ok().flatten() {
                Some(m) => (
                    Level::Warning,
                    format!("it was {}", Hold::Stopped(Some(m.since)).describe()),
                ),
                None => (Level::Critical, "jobs submitted to it wait in pending/".to_owned()),
            };
            Finding::new(
                "worker.foreground",
                level,
                format!(
                    "no worker serves {} ({SERVICE} serves {}): {why}; `ai-cmd-executor run --spool {}` serves it",
                    spool.display(),
                    theirs.display(),
                    spool.display()
                ),
            )
            .detail(json!({"worker_pid": null, "mode": "foreground", "service_spool": theirs}))
        }
        Err(e) => unknown(
            "worker.foreground",
            &format!("looking for the spool's worker: {}", crate::error::chain(e.as_ref())),
        ),
    }
}

/// The name of the user who owns `path`.
fn owner_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = fs::symlink_metadata(path).ok()?.uid();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid));
    user.ok().flatten().map(|u| u.name)
}

fn check_layout(ctx: &Ctx, user: &str) -> Finding {
    let ids = match (User::from_name(user), Group::from_name(user)) {
        (Ok(Some(u)), Ok(Some(g))) => Some((u.uid.as_raw(), g.gid.as_raw())),
        _ => None,
    };
    let mut problems = Vec::new();
    // What this user may not look at (unknown, not missing), and why.
    let mut unreadable: Vec<String> = Vec::new();
    let mut why = String::new();
    let mut deny = |path: &Path, e: &dyn std::fmt::Display| {
        let p = path.display().to_string();
        if !unreadable.contains(&p) {
            unreadable.push(p);
        }
        if why.is_empty() {
            why = e.to_string();
        }
    };
    let mut dirs = vec![(ctx.spool.root().to_owned(), ROOT_MODE)];
    dirs.extend(LAYOUT.iter().map(|(n, m)| (ctx.spool.root().join(n), *m)));
    for (dir, mode) in &dirs {
        // Not following links: a link here is a finding, never looked through.
        match fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => problems.push(format!(
                "{} is a symbolic link to {}: a job or a member of the spool's group may have planted it; \
                 root will not touch it or its target: inspect it, move it away, then run `ai-cmd-executor repair`",
                dir.display(),
                fs::read_link(dir).map_or_else(|_| "?".into(), |t| t.display().to_string())
            )),
            Ok(m) if m.is_dir() => {
                if let Some((uid, gid)) = ids
                    && (m.uid() != uid || m.gid() != gid)
                {
                    problems.push(format!(
                        "{} is owned by {}:{}, not {user}",
                        dir.display(),
                        m.uid(),
                        m.gid()
                    ));
                }
                if m.mode() & 0o7777 != *mode {
                    problems.push(format!(
                        "{} has mode {:04o}, not {mode:04o}",
                        dir.display(),
                        m.mode() & 0o7777
                    ));
                }
            }
            Ok(_) => problems.push(format!("{} is not a directory", dir.display())),
            Err(e) if super::is_denied(&e) => deny(dir, &e),
            Err(e) => problems.push(format!("{} is missing ({e})", dir.display())),
        }
    }
    if ids.is_none() {
        problems.push(format!("the service user {user} does not exist"));
    }
    // The queue directories' default ACL keeps members' jobs apart.
    let mut notes = Vec::new();
    if let Some((uid, _)) = ids {
        for name in acl::QUEUE_DIRS {
            let dir = match SafeDir::open(ctx.spool.root()).and_then(|r| r.dir(name)) {
                Ok(d) => d,
                Err(e) if super::is_denied(&e) => {
                    deny(&ctx.spool.root().join(name), &e);
                    continue;
                }
                Err(_) => continue, // reported above
            };
            match acl::state(&dir, uid) {
                Ok(acl::AclState::Private) => {}
                Ok(acl::AclState::Missing) => problems.push(format!(
                    "{} has no default ACL for {user}: members can read each other's queued jobs",
                    dir.path().display()
                )),
                Ok(acl::AclState::Unsupported) => notes.push(format!(
                    "{} is on a file system without POSIX ACLs: members can read each other's queued jobs",
                    dir.path().display()
                )),
                Err(e) if super::is_denied(&e) => deny(dir.path(), &e),
                Err(e) => problems.push(format!(
                    "reading the ACL of {}: {e}",
                    dir.path().display()
                )),
            }
        }
    }
    let detail = json!({"spool": ctx.spool.root(), "user": user, "problems": problems, "notes": notes, "unreadable": unreadable});
    if problems.is_empty() && !unreadable.is_empty() {
        return Finding::cannot_read(
            "spool.layout",
            &unreadable.join(", "),
            &why,
            &super::spool_access_hint(ctx.spool.root()),
        )
        .detail(detail);
    }
    if problems.is_empty() && !notes.is_empty() {
        return Finding::new("spool.layout", Level::Warning, notes.join("; ")).detail(detail);
    }
    if problems.is_empty() {
        Finding::new(
            "spool.layout",
            Level::Ok,
            format!(
                "{} and its directories are present, owned by {user}, with the installed modes",
                ctx.spool.root().display()
            ),
        )
        .detail(detail)
    } else {
        Finding::new("spool.layout", Level::Critical, problems.join("; "))
            .detail(detail)
            .fix(Fix::RepairSpool)
    }
}

fn check_disk(ctx: &Ctx) -> Finding {
    let st = match nix::sys::statvfs::statvfs(ctx.spool.root()) {
        Ok(s) => s,
        Err(e) if super::is_denied(&e) => {
            return Finding::cannot_read(
                "spool.disk",
                &format!("the file system of {}", ctx.spool.root().display()),
                &e.to_string(),
                &super::spool_access_hint(ctx.spool.root()),
            );
        }
        Err(e) => {
            return unknown(
                "spool.disk",
                &format!("statvfs {}: {e}", ctx.spool.root().display()),
            );
        }
    };
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let total = st.blocks() as u64 * st.fragment_size() as u64;
    let free_inodes = st.files_available() as u64;
    let total_inodes = st.files() as u64;
    let pct = |a: u64, b: u64| {
        if b == 0 {
            100.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    let detail = json!({"free_bytes": free, "total_bytes": total, "free_inodes": free_inodes, "total_inodes": total_inodes});
    let (free_pct, inode_pct) = (pct(free, total), pct(free_inodes, total_inodes));
    let text = format!(
        "{:.1}% space ({} MiB) and {:.1}% inodes free",
        free_pct,
        free >> 20,
        inode_pct
    );
    // `--format nagios` gives the same limits as thresholds.
    use super::{
        DISK_CRIT_FREE_BYTES, DISK_CRIT_FREE_PCT, DISK_WARN_FREE_BYTES, DISK_WARN_FREE_PCT,
    };
    let (crit_pct, warn_pct) = (DISK_CRIT_FREE_PCT as f64, DISK_WARN_FREE_PCT as f64);
    let level = if free < DISK_CRIT_FREE_BYTES
        || free_pct < crit_pct
        || (total_inodes > 0 && inode_pct < crit_pct)
    {
        Level::Critical
    } else if free < DISK_WARN_FREE_BYTES
        || free_pct < warn_pct
        || (total_inodes > 0 && inode_pct < warn_pct)
    {
        Level::Warning
    } else {
        Level::Ok
    };
    Finding::new("spool.disk", level, text).detail(detail)
}

/// Jobs nobody could pick up: no live worker holds the spool's lock, and
/// they waited in `pending/` longer than `stale_pending_after`. While a
/// worker serves the spool nothing is stale (`spool.queue` reports a long
/// wait instead).
fn check_stale(ctx: &Ctx) -> Finding {
    let after = ctx.config.stale_pending_after.get();
    let denied = |e: &anyhow::Error, what: &str| {
        Finding::cannot_read(
            "spool.stale",
            what,
            &crate::error::chain(e.as_ref()),
            &super::spool_access_hint(ctx.spool.root()),
        )
    };
    match ensure::serving_worker(ctx.spool.root()) {
        Ok(Some(pid)) => {
            return Finding::new(
                "spool.stale",
                Level::Ok,
                format!(
                    "nothing is stale: a worker (pid {pid}) serves the spool, and jobs in pending/ wait their turn"
                ),
            )
            .detail(json!({"stale": 0}));
        }
        Ok(None) => {}
        Err(e) if super::is_denied(e.as_ref()) => return denied(&e, "the worker's lock file"),
        Err(e) => {
            return unknown(
                "spool.stale",
                &format!(
                    "reading the worker's lock: {}",
                    crate::error::chain(e.as_ref())
                ),
            );
        }
    }
    match crate::maintenance::stale_pending(&ctx.spool, after) {
        Ok(v) if v.is_empty() => {
            Finding::new("spool.stale", Level::Ok, "no stale jobs in pending/")
                .detail(json!({"stale": 0}))
        }
        Ok(v) => Finding::new(
            "spool.stale",
            Level::Warning,
            format!(
                "{} job(s) waited in pending/ longer than {} (stale_pending_after) while no worker served the spool",
                v.len(),
                humantime::format_duration(after)
            ),
        )
        .detail(json!({"stale": v.len(), "files": v}))
        .fix(Fix::ArchiveStale),
        Err(e) if super::is_denied(e.as_ref()) => denied(&e, "pending/"),
        Err(e) => unknown(
            "spool.stale",
            &format!("listing pending/: {}", crate::error::chain(e.as_ref())),
        ),
    }
}

/// The queue: how many jobs wait and run, and how long the oldest has
/// waited (by its file's modification time). Waiting is no error that a
/// fix may touch: a warning, with no fix, when a live worker serves the
/// spool and the oldest job has waited longer than `stale_pending_after`
/// (the jobs ahead of it take long, or `max_parallel` is too low).
fn check_queue(ctx: &Ctx) -> Finding {
    let after = ctx.config.stale_pending_after.get();
    let q = match crate::maintenance::queue(&ctx.spool) {
        Ok(q) => q,
        Err(e) if super::is_denied(&e) => {
            return denied_spool(ctx, "spool.queue", "pending/ and running/", &e);
        }
        Err(e) => return unknown("spool.queue", &format!("listing the queue: {e}")),
    };
    let (oldest_id, oldest_secs) = q
        .oldest
        .as_ref()
        .map_or((None, 0), |(id, age)| (Some(id.as_str()), age.as_secs()));
    let detail = json!({
        "pending": q.pending,
        "running": q.running,
        "oldest_pending_secs": oldest_secs,
        "oldest_pending_id": oldest_id,
    });
    let counts = format!("{} job(s) pending, {} running", q.pending, q.running);
    let Some((id, age)) = &q.oldest else {
        return Finding::new("spool.queue", Level::Ok, counts).detail(detail);
    };
    let age_text = humantime::format_duration(*age);
    // Only a served queue is this check's: an unserved one is stale
    // (`spool.stale`), and the service checks say why no worker runs.
    let worker = ensure::serving_worker(ctx.spool.root()).ok().flatten();
    match worker {
        Some(pid) if *age > after => Finding::new(
            "spool.queue",
            Level::Warning,
            format!(
                "job {id} has waited {age_text} in pending/, longer than {} (stale_pending_after), \
                 while a worker (pid {pid}) serves the spool: the jobs ahead of it take long, or \
                 max_parallel is too low; it runs in its turn ({counts})",
                humantime::format_duration(after)
            ),
        )
        .detail(detail),
        _ => Finding::new(
            "spool.queue",
            Level::Ok,
            format!("{counts}; the oldest, {id}, has waited {age_text}"),
        )
        .detail(detail),
    }
}

/// How long an odd item may sit in `pending/` before it counts as stuck:
/// the worker takes or moves anything it can within moments.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// Items in `pending/` that are not job files the worker can take (a
/// directory, a FIFO, a link, a hidden or badly named file) and have been
/// there longer than [`STUCK_AFTER`]; and at once what the worker could
/// not move out, reported, and renamed aside to `.<name>.unmovable-<stamp>`
/// (which frees its id).
pub fn stuck_in_pending(ctx: &Ctx) -> Result<Vec<(String, String)>, SafeError> {
    let pending = SafeDir::open(ctx.spool.root())?.dir("pending")?;
    let now = SystemTime::now();
    Ok(pending
        .entries()?
        .into_iter()
        .filter(|e| {
            let odd = !e.meta.is_file() || parse_job_file_name(&e.name).is_err();
            let aside = e.name.to_string_lossy().contains(".unmovable-");
            odd && (aside || now.duration_since(e.meta.ctime).unwrap_or_default() > STUCK_AFTER)
        })
        .map(|e| {
            let owner = User::from_uid(nix::unistd::Uid::from_raw(e.meta.uid))
                .ok()
                .flatten()
                .map_or_else(|| format!("uid {}", e.meta.uid), |u| u.name);
            (
                e.name.to_string_lossy().into_owned(),
                format!("{} of {owner}", e.meta.kind()),
            )
        })
        .collect())
}

fn check_stuck(ctx: &Ctx) -> Finding {
    match stuck_in_pending(ctx) {
        Ok(v) if v.is_empty() => {
            Finding::new("spool.stuck", Level::Ok, "nothing stuck in pending/")
                .detail(json!({"stuck": 0}))
        }
        Ok(v) => {
            let shown: Vec<String> = v
                .iter()
                .take(5)
                .map(|(name, what)| format!("pending/{name} ({what})"))
                .collect();
            Finding::new(
                "spool.stuck",
                Level::Warning,
                format!(
                    "{} item(s) in pending/ are no job the worker can take or move out: {}{}; \
                     their ids got a rejected result; remove them (as their owner or root: rm -r)",
                    v.len(),
                    shown.join(", "),
                    if v.len() > shown.len() { ", ..." } else { "" }
                ),
            )
            .detail(json!({"stuck": v.len(), "items": v}))
        }
        Err(e) if super::is_denied(&e) => denied_spool(ctx, "spool.stuck", "pending/", &e),
        Err(e) => unknown("spool.stuck", &format!("listing pending/: {e}")),
    }
}

/// Opens `running/` of the spool without following a link anywhere.
fn running_dir(ctx: &Ctx) -> Result<SafeDir, SafeError> {
    SafeDir::open(ctx.spool.root())?.dir("running")
}

/// Files in `running/` that no live worker holds.
pub fn orphans(ctx: &Ctx) -> Result<Vec<PathBuf>, SafeError> {
    let running = running_dir(ctx)?;
    let mut out = Vec::new();
    for e in running.entries()? {
        // A link is nobody's job: the worker never claims one.
        let Ok(f) = running.open_file(&e.name) else {
            continue;
        };
        match f.try_lock() {
            Ok(()) => out.push(running.join(&e.name)),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(_)) => {}
        }
    }
    Ok(out)
}

fn check_orphans(ctx: &Ctx, held: Option<&Hold>) -> Finding {
    match orphans(ctx) {
        Ok(v) if v.is_empty() => Finding::new(
            "spool.orphans",
            Level::Ok,
            "every file in running/ belongs to a live worker",
        )
        .detail(json!({"orphans": 0})),
        Ok(v) => {
            let f = Finding::new(
                "spool.orphans",
                Level::Warning,
                format!("{} file(s) in running/ have no live worker; a worker start records them interrupted", v.len()),
            )
            .detail(json!({"orphans": v.len(), "files": v}));
            match (ctx.supervision, held) {
                // Recovering them means starting a worker: not against an
                // administrator's stop.
                (_, Some(h)) => Finding {
                    summary: format!(
                        "{}; the worker was {}: {}",
                        f.summary,
                        h.describe(),
                        h.resume()
                    ),
                    ..f
                },
                (Supervision::Systemd, None) => f.fix(Fix::RestartService),
                (Supervision::Cron, None) => f.fix(Fix::RestoreCronFallback),
                // A worker started by hand on it records them.
                (Supervision::Foreground, None) => f,
            }
        }
        Err(e) if super::is_denied(&e) => denied_spool(ctx, "spool.orphans", "running/", &e),
        Err(e) => unknown("spool.orphans", &format!("listing running/: {e}")),
    }
}

fn check_notifier(ctx: &Ctx) -> Finding {
    if ctx.config.notify.is_none() {
        return Finding::new(
            "notifier",
            Level::Ok,
            "no notifier configured; alerts go to the journal only ([notify] in the config)",
        );
    }
    match crate::notifier::Notifier::from_config(&ctx.config) {
        // The URL is root's secret: another user (a monitoring one) sees
        // that the file is there, private and not empty, and no more.
        Err(crate::notifier::NotifyError::Read { path, source }) if super::is_denied(&source) => {
            match fs::metadata(&path) {
                Ok(m) if m.len() > 0 => Finding::new(
                    "notifier",
                    Level::Ok,
                    format!(
                        "the notifier is configured; its URL file {} is private to root, so this user checked only that it is there and not empty",
                        path.display()
                    ),
                ),
                _ => Finding::cannot_read(
                    "notifier",
                    &path.display().to_string(),
                    &source.to_string(),
                    "the URL file is root's secret; the health timer checks it as root",
                ),
            }
        }
        Err(e) => Finding::new(
            "notifier",
            Level::Critical,
            format!("the notifier cannot work: {e}"),
        ),
        Ok(n) if ctx.probe_notifier => {
            let ev = crate::notifier::Event {
                unit: SERVICE.into(),
                event: "probe".into(),
                message: "test notification from `ai-cmd-executor health --probe`".into(),
                actions: vec![],
            };
            match n.send(&ev) {
                Ok(()) => Finding::new(
                    "notifier",
                    Level::Ok,
                    "the notifier is configured and its webhook answered",
                ),
                Err(e) => Finding::new(
                    "notifier",
                    Level::Warning,
                    format!("the webhook did not answer: {e}"),
                ),
            }
        }
        Ok(_) => Finding::new(
            "notifier",
            Level::Ok,
            "the notifier is configured (check it is reachable with --probe)",
        ),
    }
}

fn check_process(ctx: &Ctx, service: &Result<ServiceInfo, String>, held: Option<&Hold>) -> Finding {
    let pid = match (ctx.supervision, service) {
        (Supervision::Systemd, Ok(s)) => s.main_pid,
        (Supervision::Systemd, Err(e)) => return unknown("service.process", e),
        (Supervision::Cron | Supervision::Foreground, _) => ensure::local_worker(ctx.spool.root())
            .ok()
            .flatten()
            .map_or(0, |(pid, _)| pid)
            as u32,
    };
    if pid == 0 {
        return match held {
            // Said once, by the service's (or cron's) own check.
            Some(h) => Finding::new(
                "service.process",
                Level::Ok,
                format!("no worker process: it was {}", h.describe()),
            ),
            None => Finding::new(
                "service.process",
                Level::Critical,
                "no worker process is running",
            ),
        };
    }
    let mut sys = sysinfo::System::new();
    sys.refresh_processes(sysinfo::ProcessesToUpdate::All, true);
    let spid = sysinfo::Pid::from_u32(pid);
    let Some(p) = sys.process(spid) else {
        return Finding::new(
            "service.process",
            Level::Critical,
            format!("worker pid {pid} does not exist"),
        );
    };
    let children = sys
        .processes()
        .values()
        // sysinfo lists the worker's threads too, each with the worker as
        // its parent: only processes are jobs.
        .filter(|c| c.parent() == Some(spid) && c.thread_kind().is_none())
        .count();
    let open_files = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .ok();
    let overdue = {
        let _as_owner = crate::privilege::lower(ctx.spool.root()).ok().flatten();
        overdue_jobs(ctx)
    };
    let detail = json!({
        "pid": pid, "rss_bytes": p.memory(), "cpu_ms": p.accumulated_cpu_time(), "children": children,
        "open_files": open_files, "running_for_s": p.run_time(), "overdue_jobs": overdue,
    });
    let text = format!(
        "worker pid {pid}: {} MiB RSS, {} ms CPU, {children} job process(es), {} open files",
        p.memory() >> 20,
        p.accumulated_cpu_time(),
        open_files.map_or_else(|| "?".into(), |n| n.to_string())
    );
    if overdue.is_empty() {
        Finding::new("service.process", Level::Ok, text).detail(detail)
    } else {
        Finding::new(
            "service.process",
            Level::Warning,
            format!("{text}; running past their timeout: {}", overdue.join(", ")),
        )
        .detail(detail)
    }
}

/// Ids of running jobs older than their timeout plus the kill grace plus a
/// minute.
fn overdue_jobs(ctx: &Ctx) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(running) = running_dir(ctx) else {
        return out;
    };
    for e in running.entries().unwrap_or_default() {
        let Ok((id, kind)) = parse_job_file_name(&e.name) else {
            continue;
        };
        let timeout = running
            .open_file(&e.name)
            .ok()
            .and_then(|mut f| {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut b).ok().map(|_| b)
            })
            .and_then(|b| Job::parse(kind, &b).ok())
            .and_then(|j| j.timeout_secs)
            .map_or(ctx.config.default_timeout.get(), |t| {
                Duration::from_secs(t.get())
            });
        let started = ctx
            .spool
            .latest_log(&id)
            .ok()
            .flatten()
            .and_then(|p| crate::spool::log_started(&p));
        if let Some(started) = started
            && Timestamp::now().since(started)
                > timeout + ctx.config.kill_grace.get() + Duration::from_secs(60)
        {
            out.push(id.to_string());
        }
    }
    out
}

fn check_journal() -> Finding {
    // journalctl shows others the service's entries only through these
    // groups (Debian's journal ACLs); elsewhere "no errors" would mean
    // nothing.
    let reader = nix::unistd::geteuid().is_root()
        || nix::unistd::getgroups()
            .unwrap_or_default()
            .into_iter()
            .chain([nix::unistd::getegid()])
            .filter_map(|g| nix::unistd::Group::from_gid(g).ok().flatten())
            .any(|g| ["systemd-journal", "adm", "wheel"].contains(&g.name.as_str()));
    if !reader {
        return Finding::cannot_read(
            "journal.errors",
            "the service's journal entries",
            "only root and the groups systemd-journal, adm and wheel read them",
            "add the user to group systemd-journal",
        );
    }
    let count = |args: &[&str]| -> Result<usize, String> {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-q", "-o", "json", "--since", "-1h"])
            .args(args)
            .output()
            .map_err(|e| format!("running journalctl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .count())
    };
    let errors = count(&["-u", SERVICE, "-p", "err"]);
    let withheld = count(&[&format!("MESSAGE_ID={}", message_id::HEARTBEAT_WITHHELD)]);
    match (errors, withheld) {
        (Ok(0), Ok(0)) => Finding::new("journal.errors", Level::Ok, "no errors from the service in the last hour").detail(json!({"errors": 0, "heartbeat_withheld": 0})),
        (Ok(e), Ok(w)) => Finding::new(
            "journal.errors",
            Level::Warning,
            format!("in the last hour: {e} error(s) from the service, {w} withheld heartbeat(s); see `journalctl -u ai-cmd-executor -p warning --since -1h`"),
        )
        .detail(json!({"errors": e, "heartbeat_withheld": w})),
        (Err(e), _) | (_, Err(e)) => unknown("journal.errors", &e),
    }
}

/// The end-to-end probe, and what the probe job measured of its own
/// isolation (when it ran).
async fn check_probe(
    ctx: &Ctx,
    service: &Result<ServiceInfo, String>,
    held: Option<&Hold>,
) -> (Finding, Option<Finding>) {
    let (probe, log) = run_probe(ctx, service, held).await;
    let isolation = log.as_deref().map(|log| check_isolation(ctx, log));
    (probe, isolation)
}

/// What the probe job runs besides echoing its token: whether it can
/// signal its parent (the worker) and create an entry in the spool (a
/// directory in `tmp/`, removed at once), and which cgroup it runs in.
pub fn probe_isolation_script(spool: &Path) -> String {
    let tmp = shell_quote(
        &spool
            .join("tmp")
            .join(".probe-isolation-$$")
            .to_string_lossy(),
    );
    format!(
        "if kill -0 $PPID 2>/dev/null; then echo 'probe: worker reachable'; else echo 'probe: worker guarded'; fi\n\
         if mkdir {tmp} 2>/dev/null; then rmdir {tmp}; echo 'probe: spool writable'; else echo 'probe: spool guarded'; fi\n\
         sed -n 's/^0::/probe: cgroup /p' /proc/self/cgroup"
    )
}

/// `s` in single quotes for the shell, with `$$` left outside them.
fn shell_quote(s: &str) -> String {
    let quoted = format!("'{}'", s.replace('\'', r"'\''"));
    quoted.replace("$$", "'$$'")
}

/// What a probe log says of the job's isolation: `(worker guarded, spool
/// guarded)`, or `None` if it says nothing (an older probe).
pub fn probe_isolation(log: &str) -> Option<(bool, bool)> {
    let worker = if log.contains("probe: worker guarded") {
        true
    } else if log.contains("probe: worker reachable") {
        false
    } else {
        return None;
    };
    Some((worker, log.contains("probe: spool guarded")))
}

/// The cgroup the probe job ran in when it was one of its own (the
/// worker's `run-N` job cgroups), from its log.
pub fn probe_cgroup(log: &str) -> Option<&str> {
    log.lines()
        .find_map(|l| l.strip_prefix("probe: cgroup "))
        .filter(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|leaf| leaf.starts_with("run-"))
        })
}

/// `jobs.isolation`: what the probe job could reach, against what the
/// configuration asks, and whether it had a cgroup of its own.
fn check_isolation(ctx: &Ctx, log: &str) -> Finding {
    use crate::config::Isolation;
    let Some((worker, spool)) = probe_isolation(log) else {
        return unknown("jobs.isolation", "the probe job's log does not say");
    };
    let said = match (worker, spool) {
        (true, true) => "a job can neither signal the worker nor change the spool (isolation full)",
        (true, false) => {
            "a job cannot signal the worker, but can change the spool (isolation process)"
        }
        (false, true) => "a job can signal the worker, but cannot change the spool",
        (false, false) => "a job can signal the worker and change the spool (isolation none)",
    };
    let asked = ctx.config.isolation;
    let level = match asked {
        Isolation::Auto if !(worker && spool) => Level::Warning,
        Isolation::Full if !(worker && spool) => Level::Critical,
        Isolation::Process if !worker => Level::Critical,
        _ => Level::Ok,
    };
    let hint = match level {
        Level::Ok => String::new(),
        _ => format!(
            "; isolation = \"{asked}\" asks for more: the worker's warning at start says why it could not (docs/OPERATING.md, \"Isolation\")"
        ),
    };
    let cgroup = probe_cgroup(log);
    let contained = match cgroup {
        Some(path) => format!("; each job runs in a cgroup of its own ({path})"),
        None => "; jobs have no cgroup of their own (their process group and the worker as subreaper contain them)".to_owned(),
    };
    Finding::new("jobs.isolation", level, format!("{said}{contained}{hint}"))
        .detail(json!({"worker_guarded": worker, "spool_guarded": spool, "cgroup": cgroup}))
}

/// The probe itself; beside its finding, the probe job's log when it ran.
async fn run_probe(
    ctx: &Ctx,
    service: &Result<ServiceInfo, String>,
    held: Option<&Hold>,
) -> (Finding, Option<String>) {
    let live = match ctx.supervision {
        Supervision::Systemd => service
            .as_ref()
            .is_ok_and(|s| s.unit.active_state == "active"),
        Supervision::Cron | Supervision::Foreground => ensure::local_worker(ctx.spool.root())
            .ok()
            .flatten()
            .is_some(),
    };
    if !live {
        let finding = match held {
            Some(h) => Finding::new(
                "probe.end_to_end",
                Level::Ok,
                format!("no probe job: the worker was {}", h.describe()),
            ),
            None => Finding::new(
                "probe.end_to_end",
                Level::Critical,
                "no worker is running, so no probe job was submitted",
            ),
        };
        return (finding, None);
    }
    // Submitting and reading back is spool work any member could do: as
    // root, it is done as the spool's owner (see `crate::privilege`).
    let _as_owner = match crate::privilege::lower(ctx.spool.root()) {
        Ok(l) => l,
        Err(e) => {
            let f = Finding::new(
                "probe.end_to_end",
                Level::Critical,
                format!(
                    "cannot act as the spool's owner to submit a probe job: {}",
                    crate::error::chain(e.as_ref())
                ),
            );
            return (f, None);
        }
    };
    let client = Client::new(ctx.spool.root());
    let id = JobId::new(PROBE_ID).expect("valid id");
    let now = Timestamp::now();
    let fresh = format!("probe-{}", now.file_stamp());
    let sub = Submission::command(format!(
        "echo {fresh}\n{}",
        probe_isolation_script(ctx.spool.root())
    ))
    .with_id(id.clone());
    // An earlier probe still queued is waited for instead of a new one.
    let (since, token) = match client.submit(&sub) {
        Ok(_) => (Some(now), Some(fresh)),
        Err(crate::client::ClientError::AlreadyPending(_)) => (None, None),
        // Denied to a caller without access (a monitoring user): unknown.
        // Denied to root acting as the spool's owner: the spool is broken
        // (a directory replaced by a link elsewhere, say), which is critical.
        Err(e) if super::is_denied(&e) && !nix::unistd::getuid().is_root() => {
            let f = Finding::cannot_read(
                "probe.end_to_end",
                "tmp/ and pending/ (to submit a probe job)",
                &crate::error::chain(&e),
                &super::spool_access_hint(ctx.spool.root()),
            );
            return (f, None);
        }
        Err(e) => {
            let f = Finding::new(
                "probe.end_to_end",
                Level::Critical,
                format!("cannot submit a probe job: {}", crate::error::chain(&e)),
            );
            return (f, None);
        }
    };
    let t0 = SystemTime::now();
    let waited = tokio::task::spawn_blocking(move || {
        let r = client.wait_since(&id, since, Some(Duration::from_secs(30)));
        (r, client)
    })
    .await;
    let (result, client) = match waited {
        Ok(x) => x,
        Err(e) => return (unknown("probe.end_to_end", &e.to_string()), None),
    };
    let ms = t0.elapsed().unwrap_or_default().as_millis();
    match result {
        Ok(r) if r.status == Status::Succeeded => {
            let log = client
                .latest_log(&JobId::new(PROBE_ID).expect("valid"))
                .ok()
                .flatten()
                .and_then(|p| fs::read_to_string(p).ok())
                .unwrap_or_default();
            if token.as_ref().is_none_or(|t| log.contains(t)) {
                let f = Finding::new(
                    "probe.end_to_end",
                    Level::Ok,
                    format!("a probe job ran end to end in {ms} ms"),
                )
                .detail(json!({"ms": ms}));
                (f, Some(log))
            } else {
                let f = Finding::new(
                    "probe.end_to_end",
                    Level::Critical,
                    "the probe job succeeded but its log lacks its output",
                );
                (f, None)
            }
        }
        Ok(r) => {
            let f = Finding::new(
                "probe.end_to_end",
                Level::Critical,
                format!(
                    "the probe job ended {}: {}",
                    r.status,
                    r.error.unwrap_or_default()
                ),
            );
            (f, None)
        }
        Err(e) => {
            let f = Finding::new(
                "probe.end_to_end",
                Level::Critical,
                format!("the probe job did not finish: {}", crate::error::chain(&e)),
            );
            (f, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STARTED: u64 = 1_796_000_000_000_000;
    const STOPPED: u64 = 1_796_000_600_000_000;

    fn at(usec: u64) -> Timestamp {
        realtime(usec).unwrap()
    }

    /// A service as systemd shows it after a clean stop.
    fn stopped_cleanly() -> ServiceInfo {
        let mut s = ServiceInfo::default();
        s.unit.load_state = "loaded".into();
        s.unit.active_state = "inactive".into();
        s.unit.sub_state = "dead".into();
        s.unit.unit_file_state = "enabled".into();
        s.result = "success".into();
        s.active_enter_timestamp = STARTED;
        s.inactive_enter_timestamp = STOPPED;
        s
    }

    fn held_since(usec: u64) -> Option<Down> {
        Some(Down::Held(Hold::Stopped(Some(at(usec)))))
    }

    #[test]
    fn a_clean_stop_is_held_and_a_crash_is_not() {
        let s = stopped_cleanly();
        assert_eq!(classify_down(&s, None, None), held_since(STOPPED));
        let stop_job = Ending {
            stop_job: Some(at(STOPPED)),
            worker_signalled: true,
        };
        assert_eq!(classify_down(&s, None, Some(stop_job)), held_since(STOPPED));
        assert_eq!(
            classify_down(&s, None, Some(Ending::default())),
            held_since(STOPPED),
            "nothing in the journal either way: the stop is taken as meant"
        );
        for (active, result) in [
            ("failed", "signal"),
            ("failed", "watchdog"),
            ("failed", "start-limit-hit"),
            ("active", "success"),
            ("activating", "success"),
            ("inactive", "exit-code"),
        ] {
            let mut f = stopped_cleanly();
            f.unit.active_state = active.into();
            f.result = result.into();
            assert_eq!(classify_down(&f, None, None), None, "{active} {result}");
        }
        let mut gone = stopped_cleanly();
        gone.unit.load_state = "not-found".into();
        assert_eq!(classify_down(&gone, None, None), None);
    }

    #[test]
    fn a_signal_from_outside_systemd_is_not_an_administrators_stop() {
        let s = stopped_cleanly();
        let signalled = Ending {
            stop_job: None,
            worker_signalled: true,
        };
        assert_eq!(
            classify_down(&s, None, Some(signalled)),
            Some(Down::Signalled(Some(at(STOPPED))))
        );
        // `ai-cmd-executor stop` afterwards: its mark makes it meant.
        let mark = StopMark {
            since: at(STOPPED + 60_000_000),
        };
        assert_eq!(
            classify_down(&s, Some(mark), Some(signalled)),
            held_since(STOPPED)
        );
        // A mark from before the last start is stale.
        let stale = StopMark {
            since: at(STARTED - 1),
        };
        assert_eq!(
            classify_down(&s, Some(stale), Some(signalled)),
            Some(Down::Signalled(Some(at(STOPPED))))
        );
    }

    #[test]
    fn a_service_not_started_since_boot_is_held_only_when_disabled() {
        let mut s = stopped_cleanly();
        s.active_enter_timestamp = 0;
        s.inactive_enter_timestamp = 0;
        assert_eq!(classify_down(&s, None, None), None, "enabled: start it");
        s.unit.unit_file_state = "disabled".into();
        assert_eq!(
            classify_down(&s, None, None),
            Some(Down::Held(Hold::Disabled))
        );
        let mark = StopMark { since: at(STARTED) };
        s.unit.unit_file_state = "enabled".into();
        assert_eq!(classify_down(&s, Some(mark), None), held_since(STARTED));
    }

    #[test]
    fn a_stop_is_remembered_when_systemd_forgot_the_unit() {
        // Disabled and stopped: systemd unloads it, and its times go.
        let mut s = stopped_cleanly();
        s.active_enter_timestamp = 0;
        s.inactive_enter_timestamp = 0;
        s.unit.unit_file_state = "disabled".into();
        let ending = Ending {
            stop_job: Some(at(STOPPED)),
            worker_signalled: true,
        };
        assert_eq!(classify_down(&s, None, Some(ending)), held_since(STOPPED));
        // Enabled again (`repair --enable`): still the stop of an administrator.
        s.unit.unit_file_state = "enabled".into();
        assert_eq!(classify_down(&s, None, Some(ending)), held_since(STOPPED));
        let mark = StopMark {
            since: at(STOPPED + 1),
        };
        assert_eq!(
            classify_down(&s, Some(mark), Some(ending)),
            held_since(STOPPED + 1),
            "the later of the two"
        );
        assert_eq!(
            classify_down(&s, None, Some(Ending::default())),
            None,
            "enabled, never started since boot: start it"
        );
    }

    #[test]
    fn a_held_service_is_a_warning_with_no_fix() {
        let s = stopped_cleanly();
        let down = classify_down(&s, None, None);
        let f = check_service(&Ok(s.clone()), down.as_ref(), None);
        let active = &f[0];
        assert_eq!(active.id, "service.active");
        assert_eq!(active.level, Level::Warning);
        assert_eq!(active.fix, None);
        let since = humantime::format_rfc3339_seconds(at(STOPPED).0).to_string();
        assert!(since.ends_with('Z'), "{since}");
        assert_eq!(
            active.summary,
            format!(
                "{SERVICE} was stopped by an administrator since {since}; `ai-cmd-executor start` resumes it"
            )
        );
        assert_eq!(f[1].level, Level::Ok, "enabled: {}", f[1].summary);

        let mut disabled = s.clone();
        disabled.active_enter_timestamp = 0;
        disabled.inactive_enter_timestamp = 0;
        disabled.unit.unit_file_state = "disabled".into();
        let down = classify_down(&disabled, None, None);
        let f = check_service(&Ok(disabled), down.as_ref(), None);
        assert_eq!(f[0].level, Level::Warning);
        assert_eq!(f[0].fix, None);
        assert!(f[0].summary.contains("disabled"), "{}", f[0].summary);
        assert_eq!(f[1].level, Level::Warning);
        assert!(f[1].summary.contains("repair --enable"), "{}", f[1].summary);
        assert_eq!(
            f[1].fix,
            Some(Fix::EnableUnits {
                units: vec![SERVICE.into()]
            })
        );
    }

    #[test]
    fn what_is_not_held_is_still_fixed() {
        let s = stopped_cleanly();
        let signalled = Some(Down::Signalled(Some(at(STOPPED))));
        let f = check_service(&Ok(s.clone()), signalled.as_ref(), None);
        assert_eq!(f[0].level, Level::Critical);
        assert_eq!(f[0].fix, Some(Fix::StartService));

        let mut crashed = s.clone();
        crashed.unit.active_state = "failed".into();
        crashed.result = "signal".into();
        let f = check_service(&Ok(crashed.clone()), None, None);
        assert_eq!(f[0].level, Level::Critical);
        assert_eq!(f[0].fix, Some(Fix::ResetFailedAndStart));

        let mut never = s;
        never.active_enter_timestamp = 0;
        never.inactive_enter_timestamp = 0;
        let f = check_service(
            &Ok(never.clone()),
            classify_down(&never, None, None).as_ref(),
            None,
        );
        assert_eq!(f[0].level, Level::Critical);
        assert_eq!(f[0].fix, Some(Fix::StartService));
    }

    #[test]
    fn a_start_limit_is_left_until_its_cause_may_have_changed() {
        let mut s = stopped_cleanly();
        s.unit.active_state = "failed".into();
        s.unit.sub_state = "failed".into();
        s.result = "exit-code".into();
        s.n_restarts = 10;
        s.start_limit_burst = 10;
        let since = humantime::format_rfc3339_seconds(at(STOPPED).0).to_string();
        let mut limit = StartLimit {
            at: Some(at(STOPPED)),
            changed: None,
            last_error: Some("config.toml:3:16: extra `=`".into()),
        };
        let f = &check_service(&Ok(s.clone()), None, Some(&limit))[0];
        assert_eq!(f.level, Level::Critical);
        assert_eq!(f.fix, None, "not started again: it would fail as often");
        assert_eq!(
            f.summary,
            format!(
                "{SERVICE} hit its start limit at {since} (last error: config.toml:3:16: extra `=`); \
                 not restarted until the config or binary changes; fix the cause, then `ai-cmd-executor start`"
            )
        );
        assert_eq!(f.detail["left_failed"], true);
        assert_eq!(f.detail["inactive_enter_timestamp"], STOPPED);

        limit.changed = Some("/etc/ai-cmd-executor/config.toml changed at T".into());
        let f = &check_service(&Ok(s.clone()), None, Some(&limit))[0];
        assert_eq!(f.fix, Some(Fix::ResetFailedAndStart));
        assert!(
            f.summary.ends_with(
                "; /etc/ai-cmd-executor/config.toml changed at T since, so it is started again"
            ),
            "{}",
            f.summary
        );
        assert_eq!(f.detail["left_failed"], false);

        // Result says so (as later systemd versions do), or the restarts do.
        s.result = "start-limit-hit".into();
        s.n_restarts = 3;
        limit.changed = None;
        let f = &check_service(&Ok(s.clone()), None, Some(&limit))[0];
        assert_eq!(
            (f.fix.clone(), f.detail["left_failed"].clone()),
            (None, true.into())
        );
        // Any other failure is still started again.
        s.result = "exit-code".into();
        let f = &check_service(&Ok(s), None, None)[0];
        assert_eq!(f.fix, Some(Fix::ResetFailedAndStart));
        assert_eq!(f.detail["left_failed"], false);
    }

    #[test]
    fn a_configuration_this_user_may_not_read_is_unknown_not_invalid() {
        let mut ctx = Ctx {
            config: crate::config::Config::default(),
            config_error: Some(super::super::ConfigProblem::of(&std::io::Error::from(
                std::io::ErrorKind::PermissionDenied,
            ))),
            spool: crate::spool::Spool::new("/nonexistent"),
            supervision: Supervision::Cron,
            bus: None,
            probe_notifier: false,
            config_path: None,
        };
        let f = check_config(&ctx);
        assert_eq!(f.level, Level::Unknown, "{}", f.summary);
        assert!(
            f.summary
                .starts_with("cannot read the configuration as uid")
        );
        ctx.config_error = Some(super::super::ConfigProblem {
            text: "config x: unknown field `sppol`".into(),
            denied: false,
        });
        assert_eq!(check_config(&ctx).level, Level::Critical);
    }
}

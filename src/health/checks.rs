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
    };
    match ctx.supervision {
        Supervision::Systemd => {
            out.extend(check_service(&service));
            out.push(check_watchdog(&service));
            out.push(check_units_drift(&service));
            out.push(check_timers(ctx).await);
        }
        Supervision::Cron => out.push(check_cron(ctx)),
    }
    let user = service_user(&service);
    out.push(check_layout(ctx, &user));
    out.push(check_disk(ctx));
    {
        // Reading the queue is spool work: as root, done as the spool's
        // owner. Were that impossible (a link in place of the spool root),
        // the checks below still follow no link and say what they found.
        let _as_owner = crate::privilege::lower(ctx.spool.root()).ok().flatten();
        out.push(check_stale(ctx));
        out.push(check_stuck(ctx));
        out.push(check_orphans(ctx));
    }
    out.push(check_notifier(ctx));
    if scope == Scope::Full {
        out.push(check_process(ctx, &service));
        out.push(check_journal());
        out.push(check_probe(ctx, &service).await);
    }
    out
}

/// The service user: the unit's `User=`, else the cron file's, else the default.
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
        Some(e) => Finding::new(
            "config.valid",
            Level::Critical,
            format!("the configuration is invalid: {e}"),
        ),
    }
}

fn unknown(id: &'static str, why: &str) -> Finding {
    Finding::new(id, Level::Unknown, format!("cannot check: {why}"))
}

fn check_service(service: &Result<ServiceInfo, String>) -> Vec<Finding> {
    let s = match service {
        Ok(s) => s,
        Err(e) => return vec![unknown("service.active", e), unknown("service.enabled", e)],
    };
    let detail = json!({
        "load_state": s.unit.load_state, "active_state": s.unit.active_state, "sub_state": s.unit.sub_state,
        "result": s.result, "n_restarts": s.n_restarts, "main_pid": s.main_pid,
        "unit_file_state": s.unit.unit_file_state, "fragment_path": s.fragment_path,
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
    } else if s.result == "start-limit-hit"
        || (s.unit.active_state == "failed"
            && s.start_limit_burst > 0
            && s.n_restarts >= s.start_limit_burst)
    {
        // systemd 252 leaves Result at the last exit's cause when the limit
        // stops automatic restarts; the restart count tells.
        Finding::new(
            "service.active",
            Level::Critical,
            format!("{SERVICE} failed: it hit the start-rate limit (StartLimitBurst) and systemd gave up"),
        )
        .fix(Fix::ResetFailedAndStart)
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
            format!("{SERVICE} does not start at boot ({other})"),
        )
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
                } else if info.unit.unit_file_state != "enabled"
                    || info.unit.active_state != "active"
                {
                    problems.push(format!(
                        "{t} is {} and {}",
                        info.unit.unit_file_state, info.unit.active_state
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
        let f = Finding::new("timers", Level::Warning, problems.join("; ")).detail(detail);
        if fix_units.is_empty() {
            f
        } else {
            f.fix(Fix::EnableUnits { units: fix_units })
        }
    }
}

fn check_cron(ctx: &Ctx) -> Finding {
    let file = Path::new(CRON_FILE).exists();
    let worker = ensure::running_worker(ctx.spool.root()).ok().flatten();
    let detail = json!({"cron_file": file, "worker_pid": worker});
    match (file, worker) {
        (true, Some(pid)) => Finding::new(
            "cron.fallback",
            Level::Ok,
            format!("cron fallback installed; worker pid {pid} running"),
        )
        .detail(detail),
        (true, None) => Finding::new(
            "cron.fallback",
            Level::Critical,
            "no worker holds the spool lock (cron will start one within 5 minutes)",
        )
        .detail(detail)
        .fix(Fix::RestoreCronFallback),
        (false, _) => Finding::new(
            "cron.fallback",
            Level::Critical,
            format!("{CRON_FILE} is missing: nothing restarts the worker after a crash or reboot"),
        )
        .detail(detail)
        .fix(Fix::RestoreCronFallback),
    }
}

fn check_layout(ctx: &Ctx, user: &str) -> Finding {
    let ids = match (User::from_name(user), Group::from_name(user)) {
        (Ok(Some(u)), Ok(Some(g))) => Some((u.uid.as_raw(), g.gid.as_raw())),
        _ => None,
    };
    let mut problems = Vec::new();
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
            let Ok(dir) = SafeDir::open(ctx.spool.root()).and_then(|r| r.dir(name)) else {
                continue; // reported above
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
                Err(e) => problems.push(format!(
                    "reading the ACL of {}: {e}",
                    dir.path().display()
                )),
            }
        }
    }
    let detail =
        json!({"spool": ctx.spool.root(), "user": user, "problems": problems, "notes": notes});
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
    let level = if free < 16 << 20 || free_pct < 1.0 || (total_inodes > 0 && inode_pct < 1.0) {
        Level::Critical
    } else if free < 256 << 20 || free_pct < 5.0 || (total_inodes > 0 && inode_pct < 5.0) {
        Level::Warning
    } else {
        Level::Ok
    };
    Finding::new("spool.disk", level, text).detail(detail)
}

fn check_stale(ctx: &Ctx) -> Finding {
    let after = ctx.config.stale_pending_after.get();
    match crate::maintenance::stale_pending(&ctx.spool, after) {
        Ok(v) if v.is_empty() => {
            Finding::new("spool.stale", Level::Ok, "no stale files in pending/")
                .detail(json!({"stale": 0}))
        }
        Ok(v) => Finding::new(
            "spool.stale",
            Level::Warning,
            format!(
                "{} file(s) in pending/ older than {} have not been run",
                v.len(),
                humantime::format_duration(after)
            ),
        )
        .detail(json!({"stale": v.len(), "files": v}))
        .fix(Fix::ArchiveStale),
        Err(e) => unknown("spool.stale", &format!("listing pending/: {e}")),
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

fn check_orphans(ctx: &Ctx) -> Finding {
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
            match ctx.supervision {
                Supervision::Systemd => f.fix(Fix::RestartService),
                Supervision::Cron => f.fix(Fix::RestoreCronFallback),
            }
        }
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

fn check_process(ctx: &Ctx, service: &Result<ServiceInfo, String>) -> Finding {
    let pid = match (ctx.supervision, service) {
        (Supervision::Systemd, Ok(s)) => s.main_pid,
        (Supervision::Systemd, Err(e)) => return unknown("service.process", e),
        (Supervision::Cron, _) => ensure::running_worker(ctx.spool.root())
            .ok()
            .flatten()
            .unwrap_or(0) as u32,
    };
    if pid == 0 {
        return Finding::new(
            "service.process",
            Level::Critical,
            "no worker process is running",
        );
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
        .filter(|c| c.parent() == Some(spid))
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

async fn check_probe(ctx: &Ctx, service: &Result<ServiceInfo, String>) -> Finding {
    let live = match ctx.supervision {
        Supervision::Systemd => service
            .as_ref()
            .is_ok_and(|s| s.unit.active_state == "active"),
        Supervision::Cron => ensure::running_worker(ctx.spool.root())
            .ok()
            .flatten()
            .is_some(),
    };
    if !live {
        return Finding::new(
            "probe.end_to_end",
            Level::Critical,
            "no worker is running, so no probe job was submitted",
        );
    }
    // Submitting and reading back is spool work any member could do: as
    // root, it is done as the spool's owner (see `crate::privilege`).
    let _as_owner = match crate::privilege::lower(ctx.spool.root()) {
        Ok(l) => l,
        Err(e) => {
            return Finding::new(
                "probe.end_to_end",
                Level::Critical,
                format!(
                    "cannot act as the spool's owner to submit a probe job: {}",
                    crate::error::chain(e.as_ref())
                ),
            );
        }
    };
    let client = Client::new(ctx.spool.root());
    let id = JobId::new(PROBE_ID).expect("valid id");
    let now = Timestamp::now();
    let fresh = format!("probe-{}", now.file_stamp());
    let sub = Submission::command(format!("echo {fresh}")).with_id(id.clone());
    // An earlier probe still queued is waited for instead of a new one.
    let (since, token) = match client.submit(&sub) {
        Ok(_) => (Some(now), Some(fresh)),
        Err(crate::client::ClientError::AlreadyPending(_)) => (None, None),
        Err(e) => {
            return Finding::new(
                "probe.end_to_end",
                Level::Critical,
                format!("cannot submit a probe job: {}", crate::error::chain(&e)),
            );
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
        Err(e) => return unknown("probe.end_to_end", &e.to_string()),
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
                Finding::new(
                    "probe.end_to_end",
                    Level::Ok,
                    format!("a probe job ran end to end in {ms} ms"),
                )
                .detail(json!({"ms": ms}))
            } else {
                Finding::new(
                    "probe.end_to_end",
                    Level::Critical,
                    "the probe job succeeded but its log lacks its output",
                )
            }
        }
        Ok(r) => Finding::new(
            "probe.end_to_end",
            Level::Critical,
            format!(
                "the probe job ended {}: {}",
                r.status,
                r.error.unwrap_or_default()
            ),
        ),
        Err(e) => Finding::new(
            "probe.end_to_end",
            Level::Critical,
            format!("the probe job did not finish: {}", crate::error::chain(&e)),
        ),
    }
}

//! `status`, `start`, `stop`, `restart`, `cleanup` and `notify`.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;

use super::Context;
use crate::cli::{CleanupArgs, NotifyArgs, StatusArgs};
use crate::client::Client;
use crate::health::{Ctx, Supervision, checks_service_user};
use crate::install::ensure;
use crate::notifier::Event;
use crate::systemd::bus::UnitAction;
use crate::systemd::units::SERVICE;

/// Which way the service is started and stopped.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Start it.
    Start,
    /// Stop it.
    Stop,
    /// Stop and start it.
    Restart,
    /// Reload its configuration; a worker whose binary was replaced hands
    /// over to the new one.
    Reload,
}

impl From<Action> for UnitAction {
    fn from(a: Action) -> UnitAction {
        match a {
            Action::Start => UnitAction::Start,
            Action::Stop => UnitAction::Stop,
            Action::Restart => UnitAction::Restart,
            Action::Reload => UnitAction::Reload,
        }
    }
}

/// `start`/`stop`/`restart`: over D-Bus under systemd (waiting for the
/// job's result), through the worker lock in cron mode. Exit 0 once the
/// service is in the state asked for; an error that says why otherwise.
///
/// `stop` is a maintenance switch: the health timer, `repair` and (in cron
/// mode) cron's `ensure-running` leave a stopped worker stopped until
/// `start` (or `restart`). Under systemd the stop itself says so (a clean
/// stop by a stop job); `stop` also leaves the spool's stop marker, which
/// is all cron mode has, and `start` removes it.
pub fn control(ctx: &Context, action: Action) -> anyhow::Result<ExitCode> {
    // One runtime for the whole command: the bus connection made while
    // building the context is used for the job and its result.
    super::block_on(async {
        let c = super::health::context(ctx, false).await;
        match c.supervision {
            Supervision::Systemd => control_systemd(&c, action).await,
            // Blocking file and process work; nothing else runs on this
            // runtime meanwhile.
            Supervision::Cron => control_cron(&c, action),
            Supervision::Foreground => control_foreground(&c, action),
        }
    })
}

/// The unit job over D-Bus, its result, and the state it left.
async fn control_systemd(c: &Ctx, action: Action) -> anyhow::Result<ExitCode> {
    let bus = c.bus().map_err(anyhow::Error::msg)?;
    let before = bus
        .service_info(SERVICE)
        .await
        .context("reading the service's state")?;
    anyhow::ensure!(
        before.unit.load_state == "loaded",
        "{SERVICE} is {}: install it first (`ai-cmd-executor install`, or the package)",
        before.unit.load_state
    );
    // A failed service (its start limit hit, say: the health timer leaves
    // it so until its cause may have changed) starts only once its failed
    // state and start count are reset.
    if matches!(action, Action::Start | Action::Restart) && before.unit.active_state == "failed" {
        bus.reset_failed(SERVICE).await?;
    }
    let outcome = bus.change(SERVICE, action.into()).await?;
    let after = &outcome.state;
    let reached = match action {
        Action::Start | Action::Restart | Action::Reload => after.unit.active_state == "active",
        Action::Stop => matches!(after.unit.active_state.as_str(), "inactive" | "failed"),
    };
    if !outcome.done() || !reached {
        let verb = UnitAction::from(action).verb();
        anyhow::bail!(
            "{verb} {SERVICE} failed: the job ended {:?}, and the service is {}; see `journalctl -u {SERVICE}`",
            outcome.result,
            after.describe()
        );
    }
    let spool = c.spool.root();
    // The marker is a second witness of the stop (systemd's record of the
    // stop job is the first, and there is none when the service was down
    // already); it counts only if it is newer than the last start, so a
    // stop writes it afresh, and a start removes it.
    let marked = match action {
        Action::Stop => ensure::clear_stopped(spool)
            .and_then(|_| ensure::mark_stopped(spool))
            .map(|_| ()),
        Action::Start | Action::Restart => ensure::clear_stopped(spool).map(|_| ()),
        Action::Reload => Ok(()),
    };
    if let Err(e) = marked {
        eprintln!(
            "note: the stop marker {}: {}",
            spool.join(ensure::STOPPED_MARKER).display(),
            crate::error::chain(e.as_ref())
        );
    }
    let state = after.describe();
    const KEPT: &str =
        "the health timer and `repair` leave it stopped until `ai-cmd-executor start`";
    let line = match action {
        Action::Stop if before.main_pid != 0 => {
            format!("stopped ({state}); pid {} is gone; {KEPT}", before.main_pid)
        }
        Action::Stop => format!("stopped ({state}); it was not running; {KEPT}"),
        Action::Start if before.unit.active_state == "active" => {
            format!("already running ({state}), pid {}", after.main_pid)
        }
        Action::Start => format!("started ({state}), pid {}", after.main_pid),
        Action::Restart if before.main_pid != 0 => format!(
            "restarted ({state}), pid {} replaced by pid {}",
            before.main_pid, after.main_pid
        ),
        Action::Restart => format!("restarted ({state}), pid {}", after.main_pid),
        Action::Reload => format!(
            "reloaded ({state}), pid {}; a replaced binary takes over with the running jobs",
            after.main_pid
        ),
    };
    println!("{SERVICE}: {line}");
    Ok(ExitCode::SUCCESS)
}

/// The cron-mode worker: signalled through its lock, started as the
/// service user.
fn control_cron(c: &Ctx, action: Action) -> anyhow::Result<ExitCode> {
    let spool = c.spool.root();
    let marker = || spool.join(ensure::STOPPED_MARKER);
    if let Action::Reload = action {
        let Some((pid, _)) = ensure::local_worker(spool)? else {
            anyhow::bail!(
                "no worker is running on {}: nothing to reload",
                spool.display()
            );
        };
        may_signal(pid, action)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .with_context(|| format!("signalling worker pid {pid}"))?;
        println!(
            "asked worker pid {pid} to reload (SIGHUP); a replaced binary takes over with the running jobs"
        );
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(action, Action::Stop | Action::Restart) {
        let running = ensure::local_worker(spool)?;
        if let Some((pid, _)) = running {
            may_signal(pid, action)?;
        }
        // Marked before the worker goes, so cron's next `ensure-running`
        // cannot start another in between. A worker that runs now was
        // started since any earlier mark: the stop is from now.
        let mark = match action {
            Action::Stop => Some(
                running
                    .map_or(Ok(false), |_| ensure::clear_stopped(spool))
                    .and_then(|_| ensure::mark_stopped(spool))
                    .with_context(|| {
                        format!(
                            "recording the stop in {} (needs root, or the user the worker runs as)",
                            marker().display()
                        )
                    })?,
            ),
            _ => None,
        };
        match ensure::stop_local_worker(spool)? {
            Some((pid, ensure::Started::Cron)) => println!("stopped worker pid {pid}"),
            Some((pid, ensure::Started::Foreground)) => {
                println!("stopped worker pid {pid} (it was started by hand, in the foreground)")
            }
            None => println!("no worker was running"),
        }
        if let Some(mark) = mark {
            println!(
                "stopped by an administrator since {}: cron's ensure-running, `health --fix` and \
                 `repair` start no worker until `ai-cmd-executor start`",
                humantime::format_rfc3339_seconds(mark.since.0)
            );
        }
    }
    if matches!(action, Action::Start | Action::Restart) {
        let cleared = ensure::clear_stopped(spool).with_context(|| {
            format!(
                "removing the stop marker {} (needs root, or the user the worker runs as)",
                marker().display()
            )
        })?;
        if cleared {
            println!("resumed: removed the stop marker {}", marker().display());
        }
        start_as_service_user(spool)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A spool systemd's service does not serve, on a host systemd runs: its
/// worker, started by hand, can be stopped or reloaded; starting one is
/// left to whoever chooses where and as whom it runs.
fn control_foreground(c: &Ctx, action: Action) -> anyhow::Result<ExitCode> {
    let spool = c.spool.root();
    match action {
        Action::Reload => control_cron(c, action),
        Action::Stop => {
            if let Some((pid, _)) = ensure::local_worker(spool)? {
                may_signal(pid, action)?;
            }
            match ensure::stop_local_worker(spool)? {
                Some((pid, _)) => println!("stopped worker pid {pid}"),
                None => println!("no worker was running on {}", spool.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Start | Action::Restart => anyhow::bail!(
            "{SERVICE} does not serve {spool}, so neither systemd nor this command starts its worker; \
             run one with `ai-cmd-executor run --spool {spool}`, or name the service's spool \
             (its configuration's `spool`)",
            spool = spool.display()
        ),
    }
}

/// Refuses, before anything is done, to stop a worker this user may not
/// signal (a worker that runs as the service user, asked by a member).
fn may_signal(pid: i32, action: Action) -> anyhow::Result<()> {
    use nix::errno::Errno;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(Errno::EPERM) => anyhow::bail!(
            "{} the worker (pid {pid}) needs root, or the user it runs as",
            match action {
                Action::Restart => "restarting",
                Action::Reload => "reloading",
                _ => "stopping",
            }
        ),
        Err(e) => Err(e).with_context(|| format!("checking worker pid {pid}")),
    }
}

/// Starts a cron-mode worker as the service user (this program is often
/// run as root).
fn start_as_service_user(spool: &std::path::Path) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(me);
    cmd.args(["ensure-running", "--spool"]).arg(spool);
    if nix::unistd::geteuid().is_root() {
        let user = checks_service_user();
        let u = nix::unistd::User::from_name(&user)?
            .with_context(|| format!("user {user} does not exist"))?;
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let out = cmd.output().context("running ensure-running")?;
    anyhow::ensure!(
        out.status.success(),
        "ensure-running failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let pid = ensure::running_worker(spool)?.unwrap_or(0);
    println!("worker pid {pid} running on {}", spool.display());
    Ok(())
}

/// `status`: one screen.
pub fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async {
        let c = super::health::context(ctx, false).await;
        anyhow::ensure!(
            c.spool.root().exists(),
            "no spool at {}: it does not exist (a mistyped --spool? `ai-cmd-executor run --spool DIR` creates one)",
            c.spool.root().display()
        );
        let client = Client::new(c.spool.root());
        let mut service = json!(null);
        let mut pid: u32 = 0;
        match c.supervision {
            Supervision::Systemd => match c.bus() {
                Ok(bus) => match bus.service_info(SERVICE).await {
                    Ok(s) => {
                        pid = s.main_pid;
                        service = json!({
                            "mode": "systemd", "unit": SERVICE, "active_state": s.unit.active_state, "sub_state": s.unit.sub_state,
                            "enabled": s.unit.unit_file_state, "restarts": s.n_restarts, "result": s.result,
                            "uptime_s": uptime_secs(s.active_enter_timestamp_monotonic),
                        });
                    }
                    Err(e) => {
                        service = json!({"mode": "systemd", "error": crate::error::chain(&e)})
                    }
                },
                Err(e) => service = json!({"mode": "systemd", "error": e}),
            },
            Supervision::Cron | Supervision::Foreground => {
                let worker = ensure::local_worker(c.spool.root()).ok().flatten();
                pid = worker.map_or(0, |(p, _)| p) as u32;
                let mode = match (c.supervision, worker) {
                    (Supervision::Foreground, _) => "foreground",
                    (_, Some((_, ensure::Started::Foreground))) => "foreground",
                    _ => "cron",
                };
                let stopped = ensure::stop_mark(c.spool.root())
                    .ok()
                    .flatten()
                    .map(|m| humantime::format_rfc3339_seconds(m.since.0).to_string());
                service = json!({"mode": mode, "worker_running": worker.is_some(), "stopped_since": stopped});
            }
        }
        let list = client.list(None).unwrap_or_default();
        let count = |s: &str| list.iter().filter(|e| e.state == s).count();
        let last = list
            .iter()
            .filter_map(|e| e.result.as_ref())
            .max_by_key(|r| r.finished_at)
            .cloned();
        let mut worker = json!(null);
        if pid != 0 {
            let mut sys = sysinfo::System::new();
            let spid = sysinfo::Pid::from_u32(pid);
            sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[spid]), true);
            if let Some(p) = sys.process(spid) {
                worker = json!({"pid": pid, "rss_bytes": p.memory(), "cpu_ms": p.accumulated_cpu_time()});
            }
        }
        // What the last probe job (`diagnose`, the health timer) could
        // reach: measured, not what the configuration asks.
        let probe_id = crate::spool::JobId::new(crate::health::checks::PROBE_ID).expect("valid");
        let isolation = client
            .result(&probe_id)
            .ok()
            .flatten()
            .zip(client.latest_log(&probe_id).ok().flatten())
            .and_then(|(r, log)| {
                let text = std::fs::read_to_string(log).ok()?;
                let (worker, spool) = crate::health::checks::probe_isolation(&text)?;
                let cgroup = crate::health::checks::probe_cgroup(&text);
                Some(json!({"worker_guarded": worker, "spool_guarded": spool, "cgroup": cgroup, "measured_at": r.finished_at}))
            });
        let used = dir_size(c.spool.root());
        let free = nix::sys::statvfs::statvfs(c.spool.root())
            .map(|s| s.blocks_available() * s.fragment_size())
            .ok();
        let doc = json!({
            "service": service,
            "queue": {"pending": count("pending"), "running": count("running"), "completed": count("completed")},
            "last_job": last,
            "worker": worker,
            "isolation": isolation,
            "spool": {"path": c.spool.root(), "used_bytes": used, "free_bytes": free},
        });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(ExitCode::SUCCESS);
        }
        let s = &doc["service"];
        if s["mode"] == "foreground" && s["worker_running"] == false {
            println!(
                "service:   no worker serves this spool (a foreground spool: only a worker started by hand serves it){}",
                match c.supervision {
                    Supervision::Foreground => format!("; {SERVICE} serves another"),
                    _ => String::new(),
                }
            );
        } else if s["mode"] == "foreground" {
            println!(
                "service:   foreground worker pid {pid} running (started by hand, not supervised: nothing restarts it)"
            );
        } else if s["mode"] == "cron" {
            let stopped = s["stopped_since"]
                .as_str()
                .map(|t| format!(" (stopped by an administrator since {t})"))
                .unwrap_or_default();
            println!(
                "service:   cron fallback; worker {}{stopped}",
                if pid != 0 {
                    format!("pid {pid} running")
                } else {
                    "NOT running".into()
                }
            );
        } else if let Some(e) = s["error"].as_str() {
            println!("service:   {SERVICE}: {e}");
        } else {
            println!(
                "service:   {SERVICE} {}/{} ({}), up {}, {} restart(s)",
                s["active_state"].as_str().unwrap_or("?"),
                s["sub_state"].as_str().unwrap_or("?"),
                s["enabled"].as_str().unwrap_or("?"),
                humantime::format_duration(std::time::Duration::from_secs(
                    s["uptime_s"].as_u64().unwrap_or(0)
                )),
                s["restarts"]
            );
        }
        println!(
            "queue:     {} pending, {} running, {} completed",
            count("pending"),
            count("running"),
            count("completed")
        );
        match &last {
            Some(r) => println!(
                "last job:  {} {}{} at {}",
                r.id,
                r.status,
                r.exit_code
                    .map_or_else(String::new, |c| format!(" (exit {c})")),
                r.finished_at
            ),
            None => println!("last job:  none yet"),
        }
        if worker.is_null() {
            println!("worker:    not running");
        } else {
            println!(
                "worker:    pid {pid}, {} MiB RSS, {} ms CPU",
                worker["rss_bytes"].as_u64().unwrap_or(0) >> 20,
                worker["cpu_ms"]
            );
        }
        match &isolation {
            Some(i) => {
                println!(
                    "isolation: a job {} the worker and {} the spool (measured by the probe job at {})",
                    if i["worker_guarded"] == true {
                        "cannot signal"
                    } else {
                        "CAN signal"
                    },
                    if i["spool_guarded"] == true {
                        "cannot change"
                    } else {
                        "CAN change"
                    },
                    i["measured_at"].as_str().unwrap_or("?")
                );
                match i["cgroup"].as_str() {
                    Some(path) => println!("cgroups:   one per job (the probe job's: {path})"),
                    None => println!(
                        "cgroups:   none per job (no delegated cgroup v2 subtree): the job's process group and the worker as subreaper contain it"
                    ),
                }
            }
            None => println!("isolation: not measured yet (`diagnose` runs a probe job that does)"),
        }
        println!(
            "spool:     {}, {} MiB used, {} free",
            c.spool.root().display(),
            used >> 20,
            free.map_or_else(|| "?".into(), |f| format!("{} MiB", f >> 20))
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn uptime_secs(entered_monotonic: u64) -> u64 {
    if entered_monotonic == 0 {
        return 0;
    }
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    now.saturating_sub(entered_monotonic) / 1_000_000
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `cleanup`: stale pending files, old logs, old archives.
pub fn cleanup(ctx: &Context, args: CleanupArgs) -> anyhow::Result<ExitCode> {
    let loaded = ctx.load_config()?;
    let spool = crate::spool::Spool::new(ctx.spool_path(&loaded.config)?);
    // All of it is spool work: root does it as the spool's owner.
    if let Some(owner) = crate::privilege::become_owner(spool.root())? {
        eprintln!(
            "cleanup: working as {}, the owner of {}",
            owner.describe(),
            spool.root().display()
        );
    }
    let done = crate::maintenance::cleanup(&spool, &loaded.config, args.dry_run);
    if done.actions.is_empty() && done.failed.is_empty() {
        println!("cleanup: nothing to do");
    }
    for d in &done.actions {
        println!("{d}");
    }
    for f in &done.failed {
        eprintln!("cleanup: {f}");
    }
    Ok(if done.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `notify`: what the `OnFailure=` alert unit runs. It needs only the
/// notifier (see [`crate::alert::deliver`]), so it sends even when the
/// configuration is broken; without `--message` it says what failed: the
/// unit, its state and result over D-Bus, and the last error in its
/// journal. With no notifier configured, the alert is a journal entry at
/// priority err (`MESSAGE_ID` [`crate::logging::message_id::ALERT`]), and
/// the command succeeds: it did its job. A failed unit's alert is recorded,
/// so the health timer does not send it again.
pub fn notify(ctx: &Context, args: NotifyArgs) -> anyhow::Result<ExitCode> {
    let mut failed = None;
    let message = match args.message.filter(|m| !m.is_empty()) {
        Some(m) => m,
        None if crate::systemd::booted() => {
            let unit = args.unit.clone();
            let info = super::block_on(async move {
                let bus = crate::systemd::bus::Systemd::connect().await?;
                Ok(bus.service_info(&unit).await?)
            });
            match info {
                Ok(s) => {
                    let last = crate::alert::last_error(&args.unit, s.inactive_exit_timestamp);
                    let limit = crate::alert::hit_start_limit(&args.unit, &s);
                    let m = crate::alert::describe_failure(&args.unit, &s, limit, last.as_deref());
                    failed = (s.unit.active_state == "failed").then_some(s);
                    m
                }
                Err(e) => format!(
                    "{} {} (its state cannot be read: {})",
                    args.unit,
                    args.event,
                    crate::error::chain(e.as_ref())
                ),
            }
        }
        None => format!("{} {}", args.unit, args.event),
    };
    let event = Event {
        unit: args.unit.clone(),
        event: args.event,
        message,
        actions: Vec::new(),
    };
    let text = event.message.clone();
    // Locked while it is sent, so the health timer, should it run now,
    // finds it sent rather than sending it too.
    let incidents = match &failed {
        Some(_) => crate::alert::Incidents::open().map(Some),
        None => Ok(None),
    };
    let how = crate::alert::deliver(ctx.config_path.as_deref(), event)?;
    if let Some(s) = failed {
        let recorded = incidents.and_then(|i| match i {
            Some(i) => i.record(
                &crate::alert::unit_kind(&args.unit),
                &crate::alert::unit_incident(s.inactive_enter_timestamp),
            ),
            None => Ok(()),
        });
        if let Err(e) = recorded {
            eprintln!(
                "note: the health timer may alert again: {}",
                crate::error::chain(e.as_ref())
            );
        }
    }
    match how {
        crate::alert::Delivery::Posted => println!("notified: {text}"),
        crate::alert::Delivery::Journal => println!(
            "no notifier configured ([notify] in the config): the alert is in the journal at \
             priority err, MESSAGE_ID={}: {text}",
            crate::logging::message_id::ALERT
        ),
    }
    Ok(ExitCode::SUCCESS)
}

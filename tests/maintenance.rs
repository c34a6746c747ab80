//! Tier 3: the maintenance switch. A worker an administrator stopped
//! (`ai-cmd-executor stop`, `systemctl stop`) stays stopped through the
//! health timer and `repair` until `ai-cmd-executor start`, and `health`
//! says so; a unit an administrator disabled stays disabled through
//! `repair` unless it is run with `--enable`. What was not meant (a crash,
//! a SIGTERM from outside systemd) is still repaired. Under a real systemd
//! and in cron mode. Skipped with a visible notice where no sandbox can be
//! booted, except in CI, where that is a failure.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use ai_cmd_executor::systemd::units::{CLEANUP_TIMER, HEALTH_TIMER};
use common::BIN;
use common::installed::{BIN_INSIDE, SERVICE, SPOOL, installed};
use common::sandbox::{self, Sandbox};

const HEALTH_SERVICE: &str = "ai-cmd-executor-health.service";
const DEADLINE: Duration = Duration::from_secs(60);

fn wait_active(sb: &Sandbox, what: &str) {
    sb.wait_until(
        what,
        DEADLINE,
        &format!("systemctl show -p ActiveState,SubState {SERVICE}"),
        |s| s.contains("ActiveState=active") && s.contains("SubState=running"),
    );
}

/// stdout and stderr of a command run in the sandbox, for messages.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `args` of the CLI as root; returns its exit code and what it said.
fn cli(sb: &Sandbox, args: &str) -> (i32, String) {
    let out = sb.sh(&format!("{BIN_INSIDE} {args}"));
    (out.status.code().unwrap_or(-1), said(&out))
}

/// The finding `id` of `health --format json`.
fn finding(sb: &Sandbox, id: &str) -> serde_json::Value {
    let out = sb.sh(&format!("{BIN_INSIDE} health --format json"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("health --format json: {e}\n{}", said(&out)));
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {doc}"))
        .clone()
}

/// What the health timer does: its service, run to the end. It exits
/// non-zero while a warning stands, so its own result is not asserted.
fn run_health_timer(sb: &Sandbox) {
    sb.sh(&format!("systemctl start {HEALTH_SERVICE}"));
    sb.wait_until(
        "the health service to finish",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {HEALTH_SERVICE}"),
        |s| s == "inactive" || s == "failed",
    );
}

/// The service stays stopped through the health timer and `repair`,
/// `health` says it was stopped by an administrator, and `start` resumes it.
fn held_until_start(sb: &Sandbox, how: &str) {
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "inactive", "{how}");

    run_health_timer(sb);
    assert_eq!(
        sb.prop(SERVICE, "ActiveState"),
        "inactive",
        "{how}: the health timer started the service"
    );

    let (code, text) = cli(sb, "health");
    assert_eq!(code, 1, "{how}: health should exit 1 (WARNING):\n{text}");
    let line = text
        .lines()
        .find(|l| l.contains("service.active"))
        .unwrap_or_else(|| panic!("{how}: no service.active line:\n{text}"));
    assert!(line.starts_with("WARNING"), "{how}: {line}");
    let since = line
        .split_once("was stopped by an administrator since ")
        .unwrap_or_else(|| panic!("{how}: {line}"))
        .1;
    let (t, rest) = since.split_once(';').expect("a time, then ;");
    assert!(
        humantime::parse_rfc3339(t).is_ok(),
        "{how}: not RFC 3339 UTC: {t:?}"
    );
    assert_eq!(rest.trim(), "`ai-cmd-executor start` resumes it", "{how}");
    let f = finding(sb, "service.active");
    assert_eq!(f["level"], "warning", "{how}: {f}");
    assert!(
        f.get("fix").is_none(),
        "{how}: a held service has no fix: {f}"
    );
    let nagios = sb.sh(&format!("{BIN_INSIDE} health --format nagios"));
    assert!(
        String::from_utf8_lossy(&nagios.stdout).starts_with("AI-CMD-EXECUTOR WARNING"),
        "{how}: {}",
        said(&nagios)
    );

    let (code, text) = cli(sb, "repair");
    assert_eq!(code, 0, "{how}: repair of a held service:\n{text}");
    assert!(
        text.contains(&format!(
            "fix: left {SERVICE} inactive: it was stopped by an administrator since"
        )),
        "{how}:\n{text}"
    );
    assert!(text.contains("no probe job"), "{how}:\n{text}");
    assert_eq!(
        sb.prop(SERVICE, "ActiveState"),
        "inactive",
        "{how}: repair started the service:\n{text}"
    );

    let (code, text) = cli(sb, "start");
    assert_eq!(code, 0, "{how}: start:\n{text}");
    wait_active(sb, "the service to be active after start");
    let f = finding(sb, "service.active");
    assert_eq!(f["level"], "ok", "{how}: after start: {f}");
}

#[test]
fn a_stopped_or_disabled_service_is_left_so_under_systemd() {
    let Some(sb) = installed("maintenance", None) else {
        return;
    };

    // `ai-cmd-executor stop`, then `systemctl stop`.
    let (code, text) = cli(&sb, "stop");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("leave it stopped until"), "{text}");
    held_until_start(&sb, "after `ai-cmd-executor stop`");
    sb.ok(&format!("systemctl stop {SERVICE}"));
    held_until_start(&sb, "after `systemctl stop`");

    // A SIGTERM from outside systemd (a job runs as the worker's user and
    // may send one) is no administrator's stop: the health timer starts it.
    sb.ok(&format!(
        "kill -TERM $(systemctl show -p MainPID --value {SERVICE})"
    ));
    sb.wait_until(
        "the signalled worker to stop",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "inactive",
    );
    sb.wait_until(
        "health to tell the signal from a stop",
        DEADLINE,
        &format!("{BIN_INSIDE} health; true"),
        |s| s.contains("did not come through systemd"),
    );
    run_health_timer(&sb);
    wait_active(&sb, "the health timer to start the signalled service");

    // A crash is still repaired (automatic restarts off, so that it is
    // the health timer that does it).
    sb.write(
        &format!("/etc/systemd/system/{SERVICE}.d/no-restart.conf"),
        "[Service]\nRestart=no\n",
    );
    sb.ok("systemctl daemon-reload");
    sb.ok(&format!("systemctl kill -s KILL {SERVICE}"));
    sb.wait_until(
        "the killed service to fail",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "failed",
    );
    let f = finding(&sb, "service.active");
    assert_eq!(f["level"], "critical", "{f}");
    run_health_timer(&sb);
    wait_active(&sb, "the health timer to start the crashed service");
    sb.ok(&format!(
        "rm /etc/systemd/system/{SERVICE}.d/no-restart.conf && systemctl daemon-reload"
    ));

    // Disabled (the health timer stopped too): `repair` leaves them and
    // says so; so does the health timer.
    sb.ok(&format!(
        "systemctl disable {SERVICE} {CLEANUP_TIMER} && systemctl disable --now {HEALTH_TIMER}"
    ));
    let disabled = || {
        sb.sh(&format!(
            "systemctl is-enabled {SERVICE} {HEALTH_TIMER} {CLEANUP_TIMER}"
        ))
    };
    let (code, text) = cli(&sb, "health");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("repair --enable"), "{text}");
    let (code, text) = cli(&sb, "repair");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "persistence: left disabled: {SERVICE} {HEALTH_TIMER} {CLEANUP_TIMER}; \
             `ai-cmd-executor repair --enable` enables them"
        )),
        "{text}"
    );
    let states = String::from_utf8_lossy(&disabled().stdout).into_owned();
    assert_eq!(
        states.lines().collect::<Vec<_>>(),
        ["disabled"; 3],
        "repair enabled units:\n{text}"
    );
    assert_eq!(sb.prop(HEALTH_TIMER, "ActiveState"), "inactive", "{text}");
    run_health_timer(&sb);
    let states = String::from_utf8_lossy(&disabled().stdout).into_owned();
    assert_eq!(states.lines().collect::<Vec<_>>(), ["disabled"; 3]);

    // `repair --enable` enables them, and starts the timer.
    let (code, text) = cli(&sb, "repair --enable");
    assert_eq!(code, 0, "{text}");
    let states = String::from_utf8_lossy(&disabled().stdout).into_owned();
    assert_eq!(
        states.lines().collect::<Vec<_>>(),
        ["enabled"; 3],
        "repair --enable:\n{text}"
    );
    assert_eq!(sb.prop(HEALTH_TIMER, "ActiveState"), "active", "{text}");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active", "{text}");

    // `disable --now` is a disable and a stop: `repair --enable` enables
    // the service, and it stays stopped until `start`.
    // With the health timer off too, nothing refers to the service (the
    // health service's After= does while it is loaded), and systemd
    // unloads it, its last start and stop times with it: the stop is still
    // known.
    sb.ok(&format!(
        "systemctl disable --now {SERVICE} {HEALTH_TIMER} && systemctl reset-failed"
    ));
    sb.wait_until(
        "systemd to unload the stopped, disabled service",
        DEADLINE,
        &format!("systemctl show -p ActiveEnterTimestampMonotonic --value {SERVICE}"),
        |s| s == "0",
    );
    let (code, text) = cli(&sb, "repair");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "fix: left {SERVICE} inactive: it was stopped by an administrator since"
        )),
        "{text}"
    );
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "inactive", "{text}");
    assert_eq!(sb.prop(SERVICE, "UnitFileState"), "disabled", "{text}");
    let (code, text) = cli(&sb, "repair --enable");
    assert_eq!(code, 0, "{text}");
    assert_eq!(sb.prop(SERVICE, "UnitFileState"), "enabled", "{text}");
    assert_eq!(sb.prop(HEALTH_TIMER, "UnitFileState"), "enabled", "{text}");
    assert_eq!(sb.prop(HEALTH_TIMER, "ActiveState"), "active", "{text}");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "inactive", "{text}");
    assert!(text.contains("stopped by an administrator"), "{text}");
    held_until_start(&sb, "after `systemctl disable --now` and `repair --enable`");
}

#[test]
fn a_stopped_worker_is_left_so_in_cron_mode() {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let lock = format!("{SPOOL}/.worker.lock");
    let marker = format!("{SPOOL}/.stopped");
    let script = format!(
        r#"set -eu
        test ! -d /run/systemd/system   # no systemd here
        {BIN} install --mode cron --no-start > /tmp/install.out
        A={BIN_INSIDE}
        running() {{ [ -e {lock} ] && ! flock -n {lock} true; }}
        # What cron runs every five minutes (and at boot).
        cron() {{ runuser -u ai-cmd -- $A ensure-running; }}
        $A start
        running || {{ echo "start left no worker"; exit 1; }}
        echo "== stop"; $A stop
        if running; then echo "stop left the worker running"; exit 1; fi
        [ "$(stat -c %U {marker})" = ai-cmd ] || {{ echo "the marker is not the spool owner's"; exit 1; }}
        echo "== cron"; cron
        if running; then echo "cron's ensure-running started a stopped worker"; exit 1; fi
        $A ensure-running
        if running; then echo "root's ensure-running started a stopped worker"; exit 1; fi
        echo "== status"; $A status
        echo "== health"; rc=0; $A health || rc=$?; echo "exit $rc"
        echo "== health --fix"; rc=0; $A health --fix || rc=$?; echo "exit $rc"
        if running; then echo "health --fix started a stopped worker"; exit 1; fi
        echo "== repair"; rc=0; $A repair || rc=$?; echo "exit $rc"
        if running; then echo "repair started a stopped worker"; exit 1; fi
        echo "== start"; $A start
        running || {{ echo "start left no worker"; exit 1; }}
        [ ! -e {marker} ] || {{ echo "start left the marker"; exit 1; }}
        pid1=$(cat {lock})
        cron
        [ "$(cat {lock})" = "$pid1" ] || {{ echo "cron replaced a running worker"; exit 1; }}
        echo "== crash"
        kill -KILL "$pid1"
        for _ in $(seq 600); do running || break; sleep 0.1; done
        if running; then echo "the killed worker still holds its lock"; exit 1; fi
        cron
        running || {{ echo "cron did not restart a crashed worker"; exit 1; }}
        echo "== health after"; rc=0; $A health || rc=$?; echo "exit $rc"
        echo "== end"
        "#
    );
    let Some(out) = sandbox::run_without_systemd("cron-maintenance", &[bin_dir], &script) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cron maintenance scenario failed:\n{stdout}\n{stderr}"
    );
    let section = |name: &str| -> String {
        let start = stdout
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no section {name}:\n{stdout}"));
        let rest = &stdout[start + name.len() + 4..];
        let end = if rest.starts_with("== ") {
            0
        } else {
            rest.find("\n== ").map_or(rest.len(), |e| e + 1)
        };
        rest[..end].to_owned()
    };
    let stop = section("stop");
    assert!(stop.contains("stopped worker pid"), "{stdout}");
    assert!(
        stop.contains("stopped by an administrator since"),
        "{stdout}"
    );
    assert!(
        section("cron").trim().is_empty(),
        "cron is told nothing: {stdout}"
    );
    assert!(
        section("status").contains("worker NOT running (stopped by an administrator since"),
        "{stdout}"
    );
    for name in ["health", "health --fix"] {
        let h = section(name);
        assert!(h.contains("exit 1"), "{name}:\n{stdout}\n{stderr}");
        let line = h
            .lines()
            .find(|l| l.contains("cron.fallback"))
            .unwrap_or_else(|| panic!("{name}:\n{stdout}"));
        assert!(line.starts_with("WARNING"), "{line}");
        assert!(
            line.contains("the worker was stopped by an administrator since ")
                && line.ends_with("; `ai-cmd-executor start` resumes it"),
            "{line}"
        );
    }
    let repair = section("repair");
    assert!(repair.contains("exit 0"), "{stdout}\n{stderr}");
    assert!(
        repair.contains("fix: left the worker stopped: it was stopped by an administrator since"),
        "{stdout}"
    );
    assert!(
        section("start").contains("removed the stop marker"),
        "{stdout}"
    );
    assert!(
        !section("health after").contains("stopped by an administrator"),
        "{stdout}"
    );
}

//! Tier 3: the operator's verbs `start`, `stop`, `restart` and `status`,
//! run through the CLI itself, under a real systemd (over D-Bus) and in cron
//! mode (no systemd). Skipped with a visible notice where no sandbox can be
//! booted, except in CI, where that is a failure.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::BIN;
use common::installed::{BIN_INSIDE, SERVICE, SPOOL, installed};
use common::sandbox::{self, Sandbox};

/// stdout and stderr of a command run in the sandbox, for messages.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The service's main pid, read only to check what the CLI did.
fn main_pid(sb: &Sandbox) -> u32 {
    sb.prop(SERVICE, "MainPID")
        .parse()
        .expect("MainPID is a number")
}

#[test]
fn start_stop_restart_and_status_work_through_the_cli_under_systemd() {
    let Some(sb) = installed("control", None) else {
        return;
    };

    // status: the state, for root and for a member alike.
    let status = sb.ok(&format!("{BIN_INSIDE} status"));
    assert!(
        status.contains(&format!("{SERVICE} active/running")),
        "{status}"
    );
    let status = sb.ok(&format!("runuser -u agent -- {BIN_INSIDE} status"));
    assert!(
        status.contains(&format!("{SERVICE} active/running")),
        "{status}"
    );

    // A member may not stop it: a clear message, a non-zero exit, and the
    // service untouched.
    let before = main_pid(&sb);
    let out = sb.sh(&format!("runuser -u agent -- {BIN_INSIDE} stop"));
    let text = said(&out);
    assert!(
        !out.status.success(),
        "a member stopped the service:\n{text}"
    );
    assert!(text.contains("needs root"), "{text}");
    assert!(!text.contains("Tokio"), "{text}");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active");
    assert_eq!(main_pid(&sb), before, "the service was touched");

    // stop: exit 0 once the service is inactive (no waiting needed here:
    // the command itself waits for the stop job).
    let out = sb.ok(&format!("{BIN_INSIDE} stop"));
    assert!(out.contains("inactive"), "{out}");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "inactive", "{out}");
    assert_eq!(main_pid(&sb), 0);
    let status = sb.ok(&format!("{BIN_INSIDE} status"));
    assert!(
        status.contains(&format!("{SERVICE} inactive/dead")),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&sb.ok(&format!("{BIN_INSIDE} status --json"))).expect("JSON");
    assert_eq!(json["service"]["active_state"], "inactive", "{json}");
    // Stopping what is stopped is fine.
    sb.ok(&format!("{BIN_INSIDE} stop"));

    // A job queued while it is stopped waits, and runs after `start`.
    sb.ok(&format!(
        "runuser -u agent -- {BIN_INSIDE} submit --id queued-while-stopped -- 'echo ran'"
    ));
    let listed = sb.ok(&format!("{BIN_INSIDE} list --state pending"));
    assert!(listed.contains("queued-while-stopped"), "{listed}");

    // start: exit 0 once the service is active (it is Type=notify: after
    // READY=1).
    let out = sb.ok(&format!("{BIN_INSIDE} start"));
    assert!(out.contains("active"), "{out}");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active", "{out}");
    let started = main_pid(&sb);
    assert_ne!(started, 0);
    assert!(out.contains(&format!("pid {started}")), "{out}");
    let waited = sb.ok(&format!(
        "runuser -u agent -- {BIN_INSIDE} wait queued-while-stopped --timeout 60"
    ));
    assert!(waited.contains("status:    succeeded"), "{waited}");
    let ran = sb.ok(&format!(
        "runuser -u agent -- {BIN_INSIDE} submit --wait --wait-timeout 60 -- 'echo member-job'"
    ));
    assert!(ran.contains("status:    succeeded"), "{ran}");
    // Starting what runs is fine and changes nothing.
    sb.ok(&format!("{BIN_INSIDE} start"));
    assert_eq!(main_pid(&sb), started);

    // restart: a new main process, active when the command returns.
    let out = sb.ok(&format!("{BIN_INSIDE} restart"));
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active", "{out}");
    let restarted = main_pid(&sb);
    assert_ne!(restarted, 0);
    assert_ne!(restarted, started, "restart kept the old process:\n{out}");
    assert!(out.contains(&format!("pid {restarted}")), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&sb.ok(&format!("{BIN_INSIDE} status --json"))).expect("JSON");
    assert_eq!(json["service"]["active_state"], "active", "{json}");
    assert_eq!(json["worker"]["pid"], restarted, "{json}");
    let ran = sb.ok(&format!(
        "runuser -u agent -- {BIN_INSIDE} submit --wait --wait-timeout 60 -- 'echo after-restart'"
    ));
    assert!(ran.contains("status:    succeeded"), "{ran}");

    // A start that fails: a non-zero exit that says so, with the unit's
    // state, never a success.
    sb.write(
        &format!("/etc/systemd/system/{SERVICE}.d/broken.conf"),
        "[Service]\nExecStartPre=/bin/false\n",
    );
    sb.ok("systemctl daemon-reload");
    let out = sb.sh(&format!("{BIN_INSIDE} restart"));
    let text = said(&out);
    assert!(!out.status.success(), "a failed restart succeeded:\n{text}");
    assert!(text.contains("failed"), "{text}");
    assert!(text.contains(SERVICE), "{text}");
    assert!(!text.contains("Tokio"), "{text}");

    // Repaired, `start` brings it back.
    sb.ok(&format!(
        "rm /etc/systemd/system/{SERVICE}.d/broken.conf && systemctl daemon-reload"
    ));
    let out = sb.ok(&format!("{BIN_INSIDE} start"));
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active", "{out}");
}

#[test]
fn start_stop_restart_and_status_work_through_the_cli_in_cron_mode() {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let lock = format!("{SPOOL}/.worker.lock");
    let script = format!(
        r#"set -eu
        test ! -d /run/systemd/system   # no systemd here
        {BIN} install --mode cron --no-start > /tmp/install.out
        A={BIN_INSIDE}
        running() {{ [ -e {lock} ] && ! flock -n {lock} true; }}
        if running; then echo "install --no-start started a worker"; exit 1; fi
        echo "== status (not started)"; $A status
        echo "== start"; $A start
        running || {{ echo "start left no worker"; exit 1; }}
        pid1=$(cat {lock})
        echo "== status (started)"; $A status
        echo "== start again"; $A start
        [ "$(cat {lock})" = "$pid1" ] || {{ echo "a second start replaced the worker"; exit 1; }}
        useradd --create-home --groups ai-cmd agent
        echo "== member job"
        runuser -u agent -- $A submit --id cron-control --wait --wait-timeout 60 -- 'echo member-job'
        echo "== member stop"
        if runuser -u agent -- $A --spool {SPOOL} stop; then echo "a member stopped the worker"; exit 1; fi
        running || {{ echo "the worker is gone after a member's stop"; exit 1; }}
        [ "$(cat {lock})" = "$pid1" ] || {{ echo "the worker changed after a member's stop"; exit 1; }}
        echo "== restart"; $A restart
        running || {{ echo "restart left no worker"; exit 1; }}
        pid2=$(cat {lock})
        [ "$pid2" != "$pid1" ] || {{ echo "restart kept worker $pid1"; exit 1; }}
        echo "restarted: $pid1 -> $pid2"
        echo "== status (restarted)"; $A status
        echo "== stop"; $A stop
        if running; then echo "stop left the worker running"; exit 1; fi
        kill -0 "$pid2" 2>/dev/null && {{ echo "worker $pid2 still alive"; exit 1; }}
        echo "== status (stopped)"; $A status
        echo "== stop again"; $A stop
        echo "== end"
        "#
    );
    let Some(out) = sandbox::run_without_systemd("cron-control", &[bin_dir], &script) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cron control scenario failed:\n{stdout}\n{stderr}"
    );
    let section = |name: &str| -> String {
        let start = stdout
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no section {name}:\n{stdout}"));
        let rest = &stdout[start + name.len() + 4..];
        rest[..rest.find("\n== ").map_or(rest.len(), |e| e + 1)].to_owned()
    };
    assert!(
        section("status (not started)").contains("cron fallback; worker NOT running"),
        "{stdout}"
    );
    assert!(section("start").contains("running on"), "{stdout}");
    assert!(
        section("status (started)").contains("cron fallback; worker pid"),
        "{stdout}"
    );
    assert!(
        section("member job").contains("status:    succeeded"),
        "{stdout}"
    );
    assert!(
        stderr.contains("needs root"),
        "a member's stop should say it needs root:\n{stderr}"
    );
    assert!(!stderr.contains("Tokio"), "{stderr}");
    assert!(
        section("restart").contains("stopped worker pid"),
        "{stdout}"
    );
    assert!(
        section("status (restarted)").contains("cron fallback; worker pid"),
        "{stdout}"
    );
    assert!(section("stop").contains("stopped worker pid"), "{stdout}");
    assert!(
        section("status (stopped)").contains("worker NOT running"),
        "{stdout}"
    );
    assert!(
        section("stop again").contains("no worker was running"),
        "{stdout}"
    );
}

/// A worker an agent started by hand on a spool of its own, on a host
/// where systemd runs the service on another: `status`, `health` and
/// `stop` with that `--spool` see it, not the service, and leave the
/// service alone.
#[test]
fn a_foreground_worker_beside_the_service_is_seen_and_stopped_by_its_spool() {
    let Some(sb) = installed("control-foreground", None) else {
        return;
    };
    let service_pid = main_pid(&sb);
    let own = "/home/agent/spool";
    let agent = format!("runuser -u agent -- {BIN_INSIDE} --spool {own}");
    sb.ok(&format!(
        "runuser -u agent -- setsid {BIN_INSIDE} --log-target stderr run --spool {own} \
         > /home/agent/worker.log 2>&1 < /dev/null &"
    ));
    let status = sb.wait_until(
        "the foreground worker to show in `status`",
        Duration::from_secs(30),
        &format!("{agent} status"),
        |s| s.contains("foreground worker pid"),
    );
    let pid = sb.ok(&format!(
        "pgrep -u agent -f '^{BIN_INSIDE} --log-target stderr run'"
    ));
    assert!(
        status.contains(&format!("foreground worker pid {pid} running")),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&sb.ok(&format!("{agent} status --json"))).expect("JSON");
    assert_eq!(json["service"]["mode"], "foreground", "{json}");
    assert_eq!(json["worker"]["pid"].to_string(), pid, "{json}");
    let ran = sb.ok(&format!(
        "{agent} submit --wait --wait-timeout 60 -- 'echo by-hand'"
    ));
    assert!(ran.contains("status:    succeeded"), "{ran}");

    // health names the worker and checks nothing of the service's.
    let health = |expect: i32| -> serde_json::Value {
        let out = sb.sh(&format!("{agent} health --format json"));
        assert_eq!(out.status.code(), Some(expect), "{}", said(&out));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let doc = health(0);
    let checks = doc["checks"].as_array().expect("checks");
    let foreground = checks.iter().find(|c| c["id"] == "worker.foreground");
    let foreground = foreground.unwrap_or_else(|| panic!("no worker.foreground: {doc}"));
    assert_eq!(foreground["level"], "ok", "{doc}");
    assert_eq!(foreground["detail"]["worker_pid"].to_string(), pid, "{doc}");
    assert!(
        !checks
            .iter()
            .any(|c| c["id"].as_str().unwrap().starts_with("service.")),
        "{doc}"
    );

    // stop stops it, and only it.
    let out = sb.ok(&format!("{agent} stop"));
    assert!(out.contains(&format!("stopped worker pid {pid}")), "{out}");
    assert!(!sb.sh(&format!("kill -0 {pid}")).status.success(), "{out}");
    assert_eq!(main_pid(&sb), service_pid, "the service was touched");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active");
    let status = sb.ok(&format!("{agent} status"));
    assert!(status.contains("no worker serves this spool"), "{status}");
    let doc = health(2);
    let checks = doc["checks"].as_array().expect("checks");
    let foreground = checks.iter().find(|c| c["id"] == "worker.foreground");
    assert_eq!(
        foreground.expect("worker.foreground")["level"],
        "critical",
        "{doc}"
    );
    // start is not this command's to do for a spool the service does not serve.
    let out = sb.sh(&format!("{agent} start"));
    assert!(!out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains(&format!("ai-cmd-executor run --spool {own}")),
        "{}",
        said(&out)
    );
    assert_eq!(main_pid(&sb), service_pid, "the service was touched");
}

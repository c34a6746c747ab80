//! Tier 3: diagnosis and repair against a real systemd. The installed
//! service is broken in each of the ways an operator meets; `diagnose
//! --json` must name the right check, `repair` must mend it, and `health`
//! must then exit 0. Also: the alert unit posts to a webhook when the
//! service fails, and `cleanup` packs old logs into archives that list back.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sandbox::Sandbox;
use common::{BIN, webhook_on};

const SERVICE: &str = "ai-cmd-executor.service";
const SPOOL: &str = "/var/lib/ai-cmd-executor";
const AICE: &str = "/usr/local/bin/ai-cmd-executor";
const DEADLINE: Duration = Duration::from_secs(90);

/// A booted sandbox with the project installed and a webhook receiver
/// inside it (its URL and what it received).
fn installed(test: &str, config_extra: &str) -> Option<(Sandbox, Arc<Mutex<Vec<String>>>)> {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let sb = Sandbox::boot(test, &[bin_dir])?;
    let (webhook_url, bodies) = webhook_on(sb.listen_inside());
    sb.ok("rm -f /usr/sbin/policy-rc.d");
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &format!(
            "spool = \"{SPOOL}\"\nstop_grace = \"2s\"\nkill_grace = \"1s\"\n{config_extra}\n[notify]\nkind = \"webhook\"\nurl_file = \"/etc/ai-cmd-executor/webhook\"\ntimeout = \"2s\"\nattempts = 2\n"
        ),
    );
    sb.write("/etc/ai-cmd-executor/webhook", &format!("{webhook_url}\n"));
    sb.ok("chmod 600 /etc/ai-cmd-executor/webhook");
    sb.ok(&format!("{BIN} install --mode systemd"));
    sb.wait_until(
        "the service",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "active",
    );
    let h = sb.sh(&format!("{AICE} health"));
    assert!(
        h.status.success(),
        "healthy after install:\n{}",
        String::from_utf8_lossy(&h.stdout)
    );
    Some((sb, bodies))
}

/// The ids of the checks `diagnose --json` reports as not ok.
fn failing(sb: &Sandbox) -> Vec<String> {
    let out = sb.sh(&format!("{AICE} diagnose --json"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "diagnose --json: {e}\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] != "ok")
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Diagnose names `check`; `repair` mends it; health exits 0.
fn diagnose_repair_health(sb: &Sandbox, what: &str, check: &str) {
    diagnose_repair_with(sb, what, check, "repair");
}

/// Diagnose names `check`; `repair` (the command given) mends it; health
/// exits 0.
fn diagnose_repair_with(sb: &Sandbox, what: &str, check: &str, repair: &str) {
    let bad = failing(sb);
    assert!(
        bad.iter().any(|c| c == check),
        "{what}: diagnose should name {check}, named {bad:?}"
    );
    let out = sb.sh(&format!("{AICE} {repair}"));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let journal = sb.sh(&format!("journalctl --no-pager -n 30 -u {SERVICE}"));
        panic!(
            "{what}: repair failed:\n{text}{}\njournal:\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&journal.stdout)
        );
    }
    assert!(
        text.contains("[5/5] verify: a probe job ran end to end"),
        "{what}:\n{text}"
    );
    let h = sb.sh(&format!("{AICE} health"));
    assert!(
        h.status.success(),
        "{what}: health after repair exits {:?}:\n{}",
        h.status.code(),
        String::from_utf8_lossy(&h.stdout)
    );
}

#[test]
fn each_breakage_is_diagnosed_and_repaired() {
    let Some((sb, bodies)) = installed("repair", "") else {
        return;
    };

    // A stop nobody asked of the service (an administrator's `stop` is
    // left alone: tests/maintenance.rs): the worker signalled from outside.
    sb.ok(&format!(
        "kill -TERM $(systemctl show -p MainPID --value {SERVICE})"
    ));
    sb.wait_until(
        "the signalled worker to stop",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "inactive",
    );
    diagnose_repair_health(&sb, "worker signalled", "service.active");

    sb.ok(&format!("rm -rf {SPOOL}/completed"));
    diagnose_repair_health(&sb, "spool directory removed", "spool.layout");

    sb.ok(&format!("chown root:root {SPOOL} && chmod 700 {SPOOL}"));
    diagnose_repair_health(&sb, "spool re-owned to root, mode 700", "spool.layout");

    // A disabled timer is enabled when asked (plain `repair` leaves it:
    // tests/maintenance.rs).
    sb.ok("systemctl disable --now ai-cmd-executor-health.timer");
    diagnose_repair_with(&sb, "health timer disabled", "timers", "repair --enable");

    sb.ok(&format!(
        "sed -i 's/^WatchdogSec=30s$/WatchdogSec=0/' /etc/systemd/system/{SERVICE} && systemctl daemon-reload && systemctl restart {SERVICE}"
    ));
    assert_eq!(sb.prop(SERVICE, "WatchdogUSec"), "0");
    diagnose_repair_health(&sb, "unit file edited", "service.units");
    assert_eq!(
        sb.prop(SERVICE, "WatchdogUSec"),
        "30s",
        "the shipped watchdog is back"
    );

    // Start-rate limit: an unusable spool (pending/ replaced by a file)
    // makes every start fail until systemd gives up; OnFailure= then
    // raises the alert.
    sb.write(
        &format!("/etc/systemd/system/{SERVICE}.d/fast.conf"),
        "[Service]\nRestartSec=100ms\n",
    );
    sb.ok(&format!("systemctl daemon-reload && systemctl stop {SERVICE} && rm -rf {SPOOL}/pending && touch {SPOOL}/pending"));
    sb.ok(&format!("systemctl start {SERVICE} || true"));
    sb.wait_until(
        "the start-rate limit",
        DEADLINE,
        &format!("systemctl show -p ActiveState,NRestarts {SERVICE}"),
        |s| s.contains("ActiveState=failed") && s.contains("NRestarts=10"),
    );
    common::wait_for("the alert on the webhook", DEADLINE, || {
        let b = bodies.lock().unwrap();
        b.iter()
            .find(|body| body.contains("\"event\":\"failed\"") && body.contains(SERVICE))
            .cloned()
    });
    sb.ok(&format!("rm {SPOOL}/pending"));
    diagnose_repair_health(&sb, "start-rate limit hit", "service.active");
    assert!(
        bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.contains("\"event\":\"repaired\"")),
        "repair reports to the notifier"
    );
    assert!(
        bodies.lock().unwrap().iter().any(
            |b| b.contains("\"event\":\"repair-step\"") && b.contains("repair step 2/5: fix: ")
        ),
        "each repair step is sent as it happens"
    );
}

#[test]
fn stale_pending_files_are_archived_and_old_logs_packed() {
    let Some((sb, _bodies)) = installed("stale", "stale_pending_after = \"1s\"\n") else {
        return;
    };
    // The worker is down (signalled from outside systemd: not an
    // administrator's stop, which repair would leave) while five jobs wait
    // in pending/ past stale_pending_after.
    sb.ok(&format!(
        "kill -TERM $(systemctl show -p MainPID --value {SERVICE})"
    ));
    sb.wait_until(
        "the signalled worker to stop",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "inactive",
    );
    for i in 0..5 {
        sb.ok(&format!("{AICE} submit --id waiting-{i} -- true"));
    }
    sb.wait_until(
        "the waiting jobs to be stale",
        DEADLINE,
        &format!("{AICE} health --format json; true"),
        |s| s.contains("5 job(s) waited in pending/"),
    );
    diagnose_repair_health(&sb, "5 stale pending jobs", "spool.stale");
    let archived = sb.ok(&format!("ls {SPOOL}/archive/stale"));
    assert_eq!(
        archived.lines().filter(|l| l.ends_with(".reason")).count(),
        5,
        "{archived}"
    );
    sb.ok(&format!("test -z \"$(ls {SPOOL}/pending)\""));
    // Archived jobs did not run: each has an expired result, which the
    // worker, started again by repair, left as it was.
    for i in 0..5 {
        let r = sb.ok(&format!("cat {SPOOL}/completed/waiting-{i}.json"));
        let r: serde_json::Value = serde_json::from_str(&r).expect("a result");
        assert_eq!(r["status"], "expired", "{r}");
        assert_eq!(r["log"], serde_json::Value::Null, "{r}");
        assert_eq!(r["submitted_by"]["name"], "root", "{r}");
    }

    // Old logs are packed into a dated archive that lists back.
    let old = sb.ok("date -u -d '40 days ago' +%Y%m%dT%H%M%S.000001Z");
    let log = |id: &str| {
        let shard =
            ai_cmd_executor::spool::log_shard(&ai_cmd_executor::spool::JobId::new(id).unwrap());
        (
            format!("logs/{shard}"),
            format!("logs/{shard}/{id}@{old}.log"),
        )
    };
    for id in ["old-a", "old-b"] {
        let (dir, file) = log(id);
        sb.ok(&format!(
            "install -d -o ai-cmd -g ai-cmd {SPOOL}/{dir} && echo {id} > {SPOOL}/{file} && chown ai-cmd:ai-cmd {SPOOL}/{file}"
        ));
    }
    let out = sb.ok(&format!("runuser -u ai-cmd -- {AICE} cleanup"));
    assert!(out.contains("packed 2 log(s)"), "{out}");
    let listing = sb.ok(&format!(
        "tar tzf {SPOOL}/archive/logs/logs-{}.tar.gz | sort",
        &old[..8]
    ));
    let mut want = [log("old-a").1, log("old-b").1];
    want.sort();
    assert_eq!(listing, want.join("\n"));
    sb.ok(&format!("test ! -e {SPOOL}/{}", log("old-a").1));
}

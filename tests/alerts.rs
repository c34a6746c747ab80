//! Issue 17: alerts fire when it matters, once per incident; configuration
//! errors are refused loudly, and only where they matter.
//!
//! Tier 2 (the real binary, no systemd): the client commands need only the
//! `spool` key, so a mistake elsewhere in the configuration does not stop
//! them; `config check` points at the line and column of a mistake; the
//! alert command (`notify`) sends with a broken configuration, and with no
//! notifier writes the alert at priority err.
//!
//! Tier 3 (a booted sandbox): with a syntax error in the configuration the
//! worker fails until its start limit; the webhook then gets exactly one
//! alert naming the unit and the error, the health timer's `health --fix`
//! leaves the service failed and says CRITICAL, and starts it again once
//! the configuration is mended; with no notifier the alert is in
//! `journalctl -p err` with its `MESSAGE_ID`. A full spool disk is alerted
//! once, and again only after it had room in between.

mod common;

use std::fs;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ai_cmd_executor::logging::message_id;
use common::installed::{BIN_INSIDE, SERVICE, SPOOL, installed};
use common::{BIN, DEADLINE, Spool, wait_for, webhook_on};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A webhook receiver on loopback that records each request body.
fn webhook() -> (String, Arc<Mutex<Vec<String>>>) {
    webhook_on(TcpListener::bind("127.0.0.1:0").unwrap())
}

/// The CLI with `args`, nothing inherited that names a spool, a
/// configuration, a journal or a credential; `env` added.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    for var in [
        "AI_CMD_EXECUTOR_SPOOL",
        "AI_CMD_EXECUTOR_CONFIG",
        "JOURNAL_STREAM",
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

#[test]
fn clients_need_only_the_spool_key() {
    let spool = Spool::new();
    let _w = spool.start("");
    let root = spool.root();
    let root = root.to_str().unwrap();

    // Mistakes in keys the clients do not use: not their concern, not a
    // word about them (the worker and `config check` refuse them).
    let cfg = spool.scratch("unknown.toml");
    fs::write(
        &cfg,
        format!("max_paralel = 2\nkill_grace = \"soon\"\nspool = \"{root}\"\n"),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let out = cli(
        &[
            "--config", c, "submit", "--id", "typo", "--wait", "--", "echo", "ran",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    for args in [
        vec!["wait", "typo"],
        vec!["result", "typo"],
        vec!["list"],
        vec!["log", "typo"],
    ] {
        let mut all = vec!["--config", c];
        all.extend(args.iter().copied());
        let out = cli(&all, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(stdout(&cli(&["--config", c, "log", "typo"], &[])), "ran\n");
    let check = cli(&["--config", c, "config", "check"], &[]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "config check still refuses it"
    );

    // Not valid TOML, but the spool's line is intact: used, with a warning
    // that says where the mistake is.
    let cfg = spool.scratch("syntax.toml");
    fs::write(&cfg, format!("spool = \"{root}\"\n\nmax_parallel = = 2\n")).unwrap();
    let c = cfg.to_str().unwrap();
    let out = cli(
        &[
            "--config", c, "submit", "--id", "syntax", "--wait", "--", "true",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning")
            && err.contains(&format!("{c}:3:16:"))
            && err.contains(&format!("using the spool it names, {root}")),
        "{err}"
    );

    // With --spool, no configuration is read at all.
    let out = cli(
        &[
            "--config",
            "/nonexistent/config.toml",
            "--spool",
            root,
            "wait",
            "syntax",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let out = cli(
        &["wait", "syntax"],
        &[
            ("AI_CMD_EXECUTOR_SPOOL", root),
            ("AI_CMD_EXECUTOR_CONFIG", "/nonexistent"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The one key they need is wrong: an error, where it is.
    let cfg = spool.scratch("relative.toml");
    fs::write(&cfg, "max_parallel = 2\nspool = \"spool\"\n").unwrap();
    let c = cfg.to_str().unwrap();
    let out = cli(&["--config", c, "list"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{c}:2:9: spool must be an absolute path")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn config_check_points_at_the_line_and_column() {
    let spool = Spool::new();
    let cases = [
        // A syntax error on line 4.
        (
            "# ai-cmd-executor\nspool = \"/var/lib/x\"\n\nmax_parallel = = 2\n",
            ":4:16: ",
            "4 | max_parallel = = 2",
            "  |                ^",
        ),
        // An unknown key on line 3: the key is marked.
        (
            "max_parallel = 2\n\nmax_paralel = 2\n",
            ":3:1: unknown field `max_paralel`",
            "3 | max_paralel = 2",
            "  | ^^^^^^^^^^^",
        ),
        // A value the type refuses, in a table.
        (
            "[notify]\nkind = \"email\"\n",
            ":2:8: unknown variant `email`",
            "2 | kind = \"email\"",
            "  |        ^^^^^^^",
        ),
        // A value out of range, found by validation.
        (
            "max_parallel = 2\nstop_grace = \"1s\"\nmax_attempts = 1000\n",
            ":3:16: max_attempts must be from 1 to 100, not 1000",
            "3 | max_attempts = 1000",
            "  |                ^^^^",
        ),
    ];
    for (i, (text, head, line, caret)) in cases.into_iter().enumerate() {
        let cfg = spool.scratch(&format!("bad-{i}.toml"));
        fs::write(&cfg, text).unwrap();
        let c = cfg.to_str().unwrap();
        for quiet in [false, true] {
            let mut args = vec!["--config", c, "config", "check"];
            if quiet {
                args.push("--quiet");
            }
            let out = cli(&args, &[]);
            assert_eq!(out.status.code(), Some(1), "{text}");
            assert_eq!(stdout(&out), "", "{text}");
            let err = stderr(&out);
            let lines: Vec<&str> = err.lines().collect();
            assert!(lines[0].starts_with(&format!("{c}{head}")), "{text}: {err}");
            assert_eq!(lines[2], line, "{text}: {err}");
            assert_eq!(lines[3], caret, "{text}: {err}");
        }
    }
}

/// A root-only file holding `url`, and a configuration with `before`, a
/// `[notify]` table naming that file, and `after`.
fn notify_config(spool: &Spool, url: &str, before: &str, after: &str) -> String {
    let url_file = spool.scratch("webhook");
    fs::write(&url_file, format!("{url}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&url_file, fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = spool.scratch("notify.toml");
    fs::write(
        &cfg,
        format!(
            "{before}[notify]\nkind = \"webhook\"\nurl_file = \"{}\"\ntimeout = \"2s\"\nattempts = 1\n{after}",
            url_file.display()
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_owned()
}

fn posted(bodies: &Arc<Mutex<Vec<String>>>, needle: &str) -> serde_json::Value {
    wait_for(&format!("a post with {needle:?}"), DEADLINE, || {
        bodies
            .lock()
            .unwrap()
            .iter()
            .find(|b| b.contains(needle))
            .map(|b| serde_json::from_str(b).unwrap())
    })
}

#[test]
fn notify_sends_with_a_broken_configuration() {
    let spool = Spool::new();
    let (url, bodies) = webhook();

    // A syntax error and an unknown key outside [notify]: the alert goes
    // out, and says the configuration is broken, and where.
    let c = notify_config(&spool, &url, "colour = 1\nmax_parallel = = 2\n", "");
    let args = [
        "--config",
        &c,
        "notify",
        "--unit",
        "x.service",
        "--event",
        "failed",
        "--message",
        "x.service failed: one",
    ];
    let out = cli(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let body = posted(&bodies, "failed: one");
    assert_eq!(body["unit"], "x.service");
    assert_eq!(body["event"], "failed");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("the configuration is broken") && message.contains(&format!("{c}:2:16:")),
        "{message}"
    );

    // Not even [notify] can be read: the `webhook` credential, as a
    // generic webhook.
    let creds = spool.scratch("credentials");
    fs::create_dir(&creds).unwrap();
    fs::write(creds.join("webhook"), format!("{url}\n")).unwrap();
    let cfg = spool.scratch("hopeless.toml");
    fs::write(&cfg, "[notify\nkind = \"slack\"\n").unwrap();
    let out = cli(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "notify",
            "--message",
            "two",
        ],
        &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let body = posted(&bodies, "two");
    assert_eq!(body["unit"], "ai-cmd-executor.service");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(":1:8: unclosed table"),
        "{body}"
    );
}

#[test]
fn with_no_notifier_the_alert_is_an_error_line() {
    let spool = Spool::new();
    let cfg = spool.config("max_parallel = 2\n");
    let out = cli(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--log-target",
            "stderr",
            "notify",
            "--unit",
            "x.service",
            "--message",
            "x.service failed: three",
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "it did its job: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("ERROR") && err.contains("alert: x.service failed: three"),
        "{err}"
    );
    assert!(stdout(&out).contains(message_id::ALERT), "{}", stdout(&out));

    // A notifier that fails: an error (the unit fails), and the alert is
    // still logged.
    let c = notify_config(&spool, "http://127.0.0.1:9/hook", "", "");
    let out = cli(
        &[
            "--config",
            &c,
            "--log-target",
            "stderr",
            "notify",
            "--message",
            "four",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("alert: four (the notifier failed: posting to the webhook failed"),
        "{err}"
    );
}

// ---- tier 3 ----

/// The configuration of the sandbox: short grace periods and `notify` (a
/// `[notify]` table, or nothing), with `broken` (a line) as line 4, before
/// the table.
fn sandbox_config(broken: &str, notify: &str) -> String {
    format!("spool = \"{SPOOL}\"\nstop_grace = \"2s\"\nkill_grace = \"1s\"\n{broken}{notify}")
}

const NOTIFY: &str = "[notify]\nkind = \"webhook\"\nurl_file = \"/etc/ai-cmd-executor/webhook\"\ntimeout = \"2s\"\nattempts = 2\n";
const SYNTAX_ERROR: &str = "max_parallel = = 2\n";
const WHERE: &str = "/etc/ai-cmd-executor/config.toml:4:16: extra `=`";

/// Breaks the configuration, restarts the service and waits until systemd
/// gives up on it; returns when it failed (`InactiveEnterTimestamp`).
fn fail_until_the_start_limit(sb: &common::sandbox::Sandbox, notify: &str) -> String {
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &sandbox_config(SYNTAX_ERROR, notify),
    );
    sb.ok(&format!("systemctl restart {SERVICE} || true"));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let state = sb.ok(&format!(
            "systemctl show -p ActiveState,NRestarts,Result {SERVICE}"
        ));
        // Failed, not restarting: systemd gave up ("Start request repeated
        // too quickly"; the starts by hand before count too).
        if state.contains("ActiveState=failed") {
            break;
        }
        if std::time::Instant::now() > deadline {
            let status = sb.sh(&format!(
                "systemctl status --no-pager -n 30 {SERVICE}; journalctl --no-pager -n 40"
            ));
            panic!(
                "the start-rate limit was not reached: {state}\n{}",
                stdout(&status)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    sb.prop(SERVICE, "InactiveEnterTimestamp")
}

/// `health --fix` as the health timer runs it: CRITICAL, the service left
/// failed, the reason said.
fn health_leaves_it_failed(sb: &common::sandbox::Sandbox, failed_at: &str) {
    let out = sb.sh(&format!("{BIN_INSIDE} health --fix"));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}{}", stderr(&out));
    assert!(
        text.contains("hit its start limit at")
            && text.contains("not restarted until the config or binary changes")
            && text.contains("ai-cmd-executor start")
            && text.contains(WHERE),
        "{text}"
    );
    assert!(!stderr(&out).contains("fixed:"), "{}", stderr(&out));
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "failed");
    assert_eq!(
        sb.prop(SERVICE, "InactiveEnterTimestamp"),
        failed_at,
        "not started again"
    );
}

#[test]
fn a_broken_configuration_alerts_once_and_waits_for_a_fix() {
    let Some(sb) = installed("alerts", Some("RestartSec=100ms")) else {
        return;
    };
    let (url, bodies) = webhook_on(sb.listen_inside());
    sb.write("/etc/ai-cmd-executor/webhook", &format!("{url}\n"));
    sb.ok("chmod 600 /etc/ai-cmd-executor/webhook");
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &sandbox_config("", NOTIFY),
    );
    sb.ok(&format!("systemctl restart {SERVICE}"));

    // 1. A syntax error: the worker fails until systemd gives up, and
    //    alert OnFailure= starts, which reads only [notify], says which
    //    unit and why.
    let failed_at = fail_until_the_start_limit(&sb, NOTIFY);
    let failed = |b: &String| b.contains("\"event\":\"failed\"");
    let body = wait_for("the alert on the webhook", DEADLINE, || {
        bodies.lock().unwrap().iter().find(|b| failed(b)).cloned()
    });
    let alert: serde_json::Value = serde_json::from_str(&body).unwrap();
    let message = alert["message"].as_str().unwrap();
    assert_eq!(alert["unit"], SERVICE);
    assert!(
        message.starts_with(&format!("{SERVICE} is failed/failed"))
            && message.contains("start limit")
            && message.contains(&format!("last error: ai-cmd-executor: {WHERE}"))
            && message.contains("the configuration is broken"),
        "{message}"
    );
    let alert_unit = format!("ai-cmd-executor-alert@{SERVICE}.service");
    sb.wait_until(
        "the alert unit to finish",
        DEADLINE,
        &format!("systemctl show -p ActiveState,Result {alert_unit}"),
        |s| s.contains("ActiveState=inactive") && s.contains("Result=success"),
    );

    // 2. The health timer leaves it failed (it would fail as often again)
    //    and does not alert again, by hand or as its own unit.
    health_leaves_it_failed(&sb, &failed_at);
    sb.sh("systemctl start ai-cmd-executor-health.service");
    health_leaves_it_failed(&sb, &failed_at);
    let log = sb.ok("journalctl --no-pager -o cat -u ai-cmd-executor-health.service");
    assert!(
        log.contains("hit its start limit"),
        "the health unit ran: {log}"
    );
    let posted = bodies.lock().unwrap().clone();
    assert_eq!(
        posted.iter().filter(|b| failed(b)).count(),
        1,
        "one alert for one incident: {posted:?}"
    );

    // 3. Mended: the next health run starts it.
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &sandbox_config("", NOTIFY),
    );
    let out = sb.sh(&format!("{BIN_INSIDE} health --fix"));
    assert!(
        stderr(&out).contains("fixed: reset the failed state"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        sb.prop(SERVICE, "ActiveState"),
        "active",
        "{}",
        stdout(&out)
    );

    // 4. With no notifier the alert is a journal entry at priority err,
    //    with its MESSAGE_ID, written once.
    sb.write("/etc/ai-cmd-executor/config.toml", &sandbox_config("", ""));
    let failed_at = fail_until_the_start_limit(&sb, "");
    let entries = |extra: &str| {
        sb.ok(&format!(
            "journalctl --no-pager -o cat -p err MESSAGE_ID={} {extra}",
            message_id::ALERT
        ))
    };
    let entry = wait_for("the alert in the journal", DEADLINE, || {
        let e = entries("");
        (!e.is_empty()).then_some(e)
    });
    assert!(
        entry.contains(SERVICE) && entry.contains(&format!("last error: ai-cmd-executor: {WHERE}")),
        "{entry}"
    );
    sb.wait_until(
        "the alert unit to finish",
        DEADLINE,
        &format!("systemctl show -p ActiveState {alert_unit}"),
        |s| s == "ActiveState=inactive",
    );
    health_leaves_it_failed(&sb, &failed_at);
    assert_eq!(entries("").lines().count(), 1, "{}", entries(""));
    let all_errors = sb.ok("journalctl --no-pager -o cat -p err");
    assert!(all_errors.contains("alert: "), "journalctl -p err shows it");
    let posted = bodies.lock().unwrap().clone();
    assert_eq!(
        posted.iter().filter(|b| failed(b)).count(),
        1,
        "no notifier, no post: {posted:?}"
    );
}

#[test]
fn a_full_spool_disk_alerts_once_per_incident() {
    let Some(sb) = installed("diskfull", None) else {
        return;
    };
    let (url, bodies) = webhook_on(sb.listen_inside());
    sb.write("/etc/ai-cmd-executor/webhook", &format!("{url}\n"));
    sb.ok("chmod 600 /etc/ai-cmd-executor/webhook");
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &sandbox_config("", NOTIFY),
    );
    // The spool on a file system of its own, 300 MiB: room enough to be
    // OK (see `spool.disk`), and little enough to fill.
    sb.ok(&format!(
        "systemctl stop {SERVICE} && mount -t tmpfs -o size=300M tmpfs {SPOOL} && systemctl start {SERVICE}"
    ));
    let full = |b: &String| b.contains("\"event\":\"disk-full\"");
    let alerts = || bodies.lock().unwrap().iter().filter(|b| full(b)).count();
    let health_fix = |want: &str| {
        let out = sb.sh(&format!("{BIN_INSIDE} health --fix --format json"));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
        let disk = doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "spool.disk")
            .unwrap()
            .clone();
        assert_eq!(disk["level"], want, "{disk}");
    };

    // Full: told once, however often the timer runs.
    sb.ok(&format!("fallocate -l 290M {SPOOL}/fill"));
    health_fix("critical");
    health_fix("critical");
    assert_eq!(alerts(), 1, "{:?}", bodies.lock().unwrap().clone());
    let body = bodies
        .lock()
        .unwrap()
        .iter()
        .find(|b| full(b))
        .cloned()
        .unwrap();
    assert!(
        body.contains("the spool's disk is full") && body.contains(SPOOL),
        "{body}"
    );

    // Space again: the next time it fills is another incident.
    sb.ok(&format!("rm {SPOOL}/fill"));
    health_fix("ok");
    assert_eq!(alerts(), 1);
    sb.ok(&format!("fallocate -l 290M {SPOOL}/fill"));
    health_fix("critical");
    health_fix("critical");
    assert_eq!(alerts(), 2, "{:?}", bodies.lock().unwrap().clone());
}

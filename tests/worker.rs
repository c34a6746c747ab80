//! The worker against the contract: result fields, scripts, ordering,
//! parallelism, timeouts, the log cap, repeated ids.

mod common;

use std::fs;

use common::{DEADLINE, Gate, Spool, alive, read_pid, wait_for};
use serde_json::json;

#[test]
fn result_record_has_every_contract_field() {
    let spool = Spool::new();
    let _w = spool.start("");
    let cwd = spool.scratch("");
    spool.submit_json(
        "fields",
        json!({
            "command": "echo out; echo err >&2; echo \"$GREETING from $(pwd) as $AI_CMD_EXECUTOR_JOB_ID\"; exit 7",
            "env": {"GREETING": "hello"},
            "cwd": cwd,
            "timeout_secs": 60,
        }),
    );
    let r = spool.wait_result("fields");
    let obj = r.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "attempt",
            "cpu_system_ms",
            "cpu_user_ms",
            "duration_ms",
            "error",
            "exit_code",
            "finished_at",
            "id",
            "log",
            "max_rss_bytes",
            "output_truncated",
            "signal",
            "started_at",
            "status",
            "submitted_by",
            "submitted_via"
        ]
    );
    assert_eq!(r["id"], "fields");
    assert_eq!(
        r["submitted_via"], "file",
        "a job file that names no client"
    );
    assert_eq!(r["status"], "failed");
    assert_eq!(r["exit_code"], 7);
    assert_eq!(r["signal"], serde_json::Value::Null);
    assert_eq!(r["error"], serde_json::Value::Null);
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["output_truncated"], false);
    assert!(r["duration_ms"].is_u64());
    for k in ["started_at", "finished_at"] {
        let t = r[k].as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == 27, "{k} = {t}");
        humantime::parse_rfc3339(t).unwrap();
    }
    assert!(r["started_at"].as_str() <= r["finished_at"].as_str());
    let log_rel = r["log"].as_str().unwrap();
    assert!(
        log_rel.starts_with(&format!("{}/fields@", spool.log_dir("fields")))
            && log_rel.ends_with(".log"),
        "{log_rel}"
    );
    let log = spool.log_of(&r);
    let cwd_shown = fs::canonicalize(&cwd).unwrap();
    assert_eq!(
        log,
        format!("out\nerr\nhello from {} as fields\n", cwd_shown.display())
    );
    assert!(spool.names("pending").is_empty());
    assert!(spool.names("running").is_empty());
    assert_eq!(
        spool.names("completed"),
        [".held-results", "fields.json"],
        "no temporary files left; the room for held results is kept"
    );
}

#[test]
fn succeeded_failed_and_signalled_statuses() {
    let spool = Spool::new();
    let _w = spool.start("");
    spool.submit("ok", "true");
    spool.submit("no", "false");
    spool.submit("sig", "kill -KILL $$");
    let ok = spool.wait_result("ok");
    assert_eq!(
        (ok["status"].as_str(), ok["exit_code"].as_i64()),
        (Some("succeeded"), Some(0))
    );
    let no = spool.wait_result("no");
    assert_eq!(
        (no["status"].as_str(), no["exit_code"].as_i64()),
        (Some("failed"), Some(1))
    );
    let sig = spool.wait_result("sig");
    assert_eq!(sig["status"], "failed");
    assert_eq!(sig["exit_code"], serde_json::Value::Null);
    assert_eq!(sig["signal"], "SIGKILL");
}

#[test]
fn sh_files_are_whole_scripts() {
    let spool = Spool::new();
    let _w = spool.start("");
    spool.drop_file(
        "script.sh",
        b"#!/bin/bash\nset -e\nfor i in 1 2 3; do echo line $i; done\nexit 0\n",
    );
    let r = spool.wait_result("script");
    assert_eq!(r["status"], "succeeded");
    assert_eq!(spool.log_of(&r), "line 1\nline 2\nline 3\n");
}

#[test]
fn files_written_directly_into_pending_run_once_closed() {
    let spool = Spool::new();
    let _w = spool.start("");
    fs::write(
        spool.path("pending/direct.json"),
        br#"{"command":"echo direct"}"#,
    )
    .unwrap();
    let r = spool.wait_result("direct");
    assert_eq!(spool.log_of(&r), "direct\n");
}

#[test]
fn jobs_run_in_arrival_order() {
    let spool = Spool::new();
    let ledger = spool.scratch("ledger");
    // Queue while no worker runs (initial scan), then more while it runs.
    fs::create_dir_all(spool.path("tmp")).unwrap();
    fs::create_dir_all(spool.path("pending")).unwrap();
    for i in 0..5 {
        spool.submit(
            &format!("early-{i}"),
            &format!("echo early-{i} >> {}", ledger.display()),
        );
    }
    let _w = spool.start("");
    for i in 0..5 {
        spool.submit(
            &format!("late-{i}"),
            &format!("echo late-{i} >> {}", ledger.display()),
        );
    }
    spool.wait_result("late-4");
    let order = fs::read_to_string(&ledger).unwrap();
    let want: Vec<String> = (0..5)
        .map(|i| format!("early-{i}"))
        .chain((0..5).map(|i| format!("late-{i}")))
        .collect();
    assert_eq!(order.lines().collect::<Vec<_>>(), want);
}

#[test]
fn parallelism_is_bounded() {
    let spool = Spool::new();
    let _w = spool.start("max_parallel = 2\n");
    let gate = Gate::new(&spool);
    for i in 0..4 {
        spool.submit(&format!("p{i}"), &gate.command(&format!("p{i}")));
    }
    gate.wait_started(2);
    // Both slots are full: the other two stay queued.
    assert_eq!(spool.names("running").len(), 2);
    assert_eq!(spool.names("pending").len(), 2);
    assert_eq!(gate.started(), 2);
    gate.open();
    for i in 0..4 {
        assert_eq!(spool.wait_result(&format!("p{i}"))["status"], "succeeded");
    }
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let spool = Spool::new();
    let _w = spool.start("kill_grace = \"200ms\"\n");
    let bg = spool.scratch("bg.pid");
    spool.submit_json(
        "slow",
        json!({"command": format!("sleep 300 & echo $! > {}; sleep 300", bg.display()), "timeout_secs": 1}),
    );
    let r = spool.wait_result("slow");
    assert_eq!(r["status"], "timed_out");
    assert_eq!(r["signal"], "SIGTERM");
    assert!(
        r["error"].as_str().unwrap().contains("timed out after 1s"),
        "{r}"
    );
    let pid = read_pid(&bg).expect("background pid written");
    wait_for("the background child to die", DEADLINE, || {
        (!alive(pid)).then_some(())
    });
}

#[test]
fn timeout_escalates_to_sigkill_after_the_grace() {
    let spool = Spool::new();
    let _w = spool.start("kill_grace = \"300ms\"\n");
    spool.submit_json(
        "stubborn",
        json!({"command": "trap '' TERM; sleep 300", "timeout_secs": 1}),
    );
    let r = spool.wait_result("stubborn");
    assert_eq!(r["status"], "timed_out");
    assert_eq!(r["signal"], "SIGKILL");
    assert!(r["error"].as_str().unwrap().contains("SIGKILL"), "{r}");
}

#[test]
fn default_timeout_comes_from_the_config() {
    let spool = Spool::new();
    let _w = spool.start("default_timeout = \"1s\"\nkill_grace = \"100ms\"\n");
    spool.submit("dflt", "sleep 300");
    assert_eq!(spool.wait_result("dflt")["status"], "timed_out");
}

#[test]
fn log_is_capped_and_truncation_flagged() {
    let spool = Spool::new();
    let _w = spool.start("log_max_bytes = 1000\n");
    spool.submit(
        "big",
        "head -c 100000 /dev/zero | tr '\\0' x; echo; echo done >&2",
    );
    let r = spool.wait_result("big");
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["output_truncated"], true);
    let log = spool.log_of(&r);
    assert!(
        log.starts_with(&"x".repeat(1000)),
        "kept the first 1000 bytes"
    );
    assert!(log.contains("output truncated after 1000 bytes"));
    assert!(log.len() < 1100, "log is {} bytes", log.len());

    spool.submit("small", "echo small");
    let r = spool.wait_result("small");
    assert_eq!(r["output_truncated"], false);
}

#[test]
fn repeated_ids_keep_every_log_and_the_latest_result() {
    let spool = Spool::new();
    let _w = spool.start("");
    spool.submit("again", "echo first; exit 1");
    let first = spool.wait_result("again");
    assert_eq!(first["exit_code"], 1);
    spool.submit("again", "echo second");
    let second = spool.wait_result_where("again", "the second run", |r| r["exit_code"] == 0);
    assert_ne!(first["log"], second["log"]);
    assert_eq!(spool.log_of(&first), "first\n");
    assert_eq!(spool.log_of(&second), "second\n");
    assert_eq!(spool.logs_of("again").len(), 2);
    let out = spool.cli(&["log", "again"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "second\n");
}

#[test]
fn same_id_as_json_and_sh_never_runs_concurrently() {
    let spool = Spool::new();
    let _w = spool.start("max_parallel = 4\n");
    let ledger = spool.scratch("ledger");
    let body = format!(
        "echo start >> {l}; sleep 0.2; echo end >> {l}",
        l = ledger.display()
    );
    // Two runs of one id queued at once: the second waits for the first.
    spool.drop_file("twin.sh", body.as_bytes());
    spool.submit("twin", &body);
    wait_for("both runs", DEADLINE, || {
        let text = fs::read_to_string(&ledger).unwrap_or_default();
        (text.lines().count() == 4).then_some(text)
    });
    let text = fs::read_to_string(&ledger).unwrap();
    assert_eq!(text, "start\nend\nstart\nend\n");
    wait_for("both logs", DEADLINE, || {
        (spool.logs_of("twin").len() == 2).then_some(())
    });
    wait_for("the running file to go", DEADLINE, || {
        spool.names("running").is_empty().then_some(())
    });
}

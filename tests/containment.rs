//! Tier 2: what a job used is in its result (`cpu_user_ms`,
//! `cpu_system_ms`, `max_rss_bytes`), in `result`'s output for people, and
//! null for a job that never ran.

mod common;

use common::Spool;
use serde_json::{Value, json};

fn usage(r: &Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count: {r}"))
}

#[test]
fn a_result_says_what_the_job_used() {
    let spool = Spool::new();
    let _worker = spool.start("max_parallel = 2\n");

    // Sleeping costs next to no CPU.
    spool.submit("sleeper", "sleep 1");
    // 100 MiB allocated and touched by a process the shell waits for.
    spool.submit(
        "hog",
        "python3 -c 'b = bytearray(100 << 20); b[::4096] = b\"x\" * len(b[::4096]); print(len(b))'",
    );
    // Half a second of computation, by a command the shell waits for.
    spool.submit(
        "spinner",
        "python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass'",
    );

    let sleeper = spool.wait_result("sleeper");
    assert_eq!(sleeper["status"], "succeeded", "{sleeper}");
    let cpu = usage(&sleeper, "cpu_user_ms") + usage(&sleeper, "cpu_system_ms");
    assert!(cpu < 50, "sleep 1 used {cpu} ms of CPU: {sleeper}");
    assert!(usage(&sleeper, "max_rss_bytes") > 0, "{sleeper}");

    let hog = spool.wait_result("hog");
    assert_eq!(hog["status"], "succeeded", "{hog}");
    assert_eq!(spool.log_of(&hog), format!("{}\n", 100 << 20));
    let peak = usage(&hog, "max_rss_bytes");
    assert!(peak >= 100 << 20, "peak {peak} bytes: {hog}");
    assert!(peak < 400 << 20, "peak {peak} bytes: {hog}");

    let spinner = spool.wait_result("spinner");
    assert_eq!(spinner["status"], "succeeded", "{spinner}");
    let user = usage(&spinner, "cpu_user_ms");
    let total = user + usage(&spinner, "cpu_system_ms");
    assert!(total >= 500, "{total} ms of CPU: {spinner}");
    assert!(
        total <= usage(&spinner, "duration_ms") * 2 + 50,
        "more CPU than one process can use in its run time: {spinner}"
    );

    // For people: the usage line of `result`.
    let out = spool.cli(&["result", "hog"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let line = text
        .lines()
        .find(|l| l.starts_with("usage:"))
        .unwrap_or_else(|| panic!("no usage line: {text}"));
    assert!(
        line.contains(" ms user + ") && line.contains(" ms system, peak memory "),
        "{line}"
    );
    assert!(line.ends_with(" MiB"), "{line}");
}

#[test]
fn a_job_that_never_ran_has_no_usage() {
    let spool = Spool::new();
    let _worker = spool.start("max_parallel = 1\n");
    spool.submit_json("bad", json!({"command": "true", "timeout_secs": "soon"}));
    let bad = spool.wait_result("bad");
    assert_eq!(bad["status"], "rejected", "{bad}");
    for key in ["cpu_user_ms", "cpu_system_ms", "max_rss_bytes"] {
        assert_eq!(bad[key], Value::Null, "{key}: {bad}");
    }
    let out = spool.cli(&["result", "bad"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("usage:"), "{text}");
}

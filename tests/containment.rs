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

/// Run as root (as CI does), the worker and its jobs are `nobody`'s, as on
/// an installed host where they are the service user's: isolation matters
/// between processes of one unprivileged user (root's jobs can do anything).
fn as_nobody(spool: &Spool) -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    spool.open_to_all();
    ai_cmd_executor::spool::Spool::new(spool.root())
        .ensure_layout()
        .expect("layout");
    let scratch = spool.scratch("");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(spool.root())
        .arg(&scratch)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    Some((65534, 65534))
}

/// What a job tries against the worker (its parent) and another running
/// job, one line per attempt: "WHAT: allowed" or "WHAT: denied".
fn probe(other_pid_file: &std::path::Path) -> String {
    format!(
        r#"W=$PPID; O=$(cat {other})
try() {{ if "$@" >/dev/null 2>&1; then echo "$what: allowed"; else echo "$what: denied"; fi; }}
what="signal worker" try kill -0 "$W"
what="kill worker" try kill -9 "$W"
what="read worker environ" try head -c1 /proc/$W/environ
what="read worker memory map" try head -c1 /proc/$W/maps
what="ptrace worker" try python3 -c 'import ctypes, sys; l = ctypes.CDLL(None); sys.exit(l.ptrace(16, int(sys.argv[1]), 0, 0) != 0)' "$W"
what="kill other job" try kill -9 "$O"
sleep 30 & child=$!
what="signal own child" try kill "$child"
"#,
        other = other_pid_file.display()
    )
}

#[test]
fn a_job_cannot_reach_the_worker_or_another_job() {
    let spool = Spool::new();
    let user = as_nobody(&spool);
    let config = "max_parallel = 2\nisolation = \"process\"\n";
    let mut worker = match user {
        Some((u, g)) => spool.start_as(config, u, g),
        None => spool.start(config),
    };
    let pid = worker.pid();
    assert!(
        worker.log().contains("isolation=\"process\""),
        "{}",
        worker.log()
    );
    let gate = common::Gate::new(&spool);
    if user.is_some() {
        as_nobody(&spool);
    }
    let other_pid = spool.scratch("other.pid");
    spool.submit(
        "other",
        &format!(
            "echo $$ > {}; {}; echo survived",
            other_pid.display(),
            gate.command("o")
        ),
    );
    gate.wait_started(1);
    spool.submit("probe", &probe(&other_pid));
    let probe = spool.wait_result("probe");
    let log = spool.log_of(&probe);
    for line in [
        "signal worker: denied",
        "kill worker: denied",
        "read worker environ: denied",
        "read worker memory map: denied",
        "ptrace worker: denied",
        "kill other job: denied",
        "signal own child: allowed",
    ] {
        assert!(log.contains(line), "{line:?} not in:\n{log}");
    }
    // The worker is the same process, and the other job runs on.
    assert!(common::alive(pid));
    assert!(!worker.exited(), "{}", worker.log());
    gate.open();
    let other = spool.wait_result("other");
    assert_eq!(other["status"], "succeeded", "{other}");
    assert!(spool.log_of(&other).contains("survived"));
}

#[test]
fn without_isolation_the_same_probe_reaches_the_worker() {
    // The probe is not blind: at `isolation = "none"` a job can signal
    // its worker (signal 0 only: nothing is harmed).
    let spool = Spool::new();
    let user = as_nobody(&spool);
    let config = "isolation = \"none\"\n";
    let worker = match user {
        Some((u, g)) => spool.start_as(config, u, g),
        None => spool.start(config),
    };
    assert!(
        worker.log().contains("isolation=\"none\""),
        "{}",
        worker.log()
    );
    spool.submit(
        "probe",
        "kill -0 $PPID && echo 'signal worker: allowed'; head -c1 /proc/$PPID/environ >/dev/null && echo 'read worker environ: allowed'",
    );
    let probe = spool.wait_result("probe");
    let log = spool.log_of(&probe);
    assert!(log.contains("signal worker: allowed"), "{log}");
    assert!(log.contains("read worker environ: allowed"), "{log}");
}

//! Tier 3: nothing a job starts outlives a worker killed with SIGKILL
//! under systemd (issue 19, point 1), and the restarted packaged worker
//! (its own unprivileged user) enforces and names each job's limits. The worker cannot clean up after
//! itself then; the unit's `KillMode=mixed` does: when the main process
//! dies, systemd kills what is left in the unit's cgroup at once, and
//! `Restart=` brings the worker back. In a throwaway sandbox (see
//! `common/sandbox.rs`); skipped with a visible notice where none can be
//! booted, except in CI, where that is a failure.

mod common;

use std::time::{Duration, Instant};

use common::installed::{BIN_INSIDE, SERVICE, SPOOL, installed};
use common::sandbox::Sandbox;
use common::token;

const DEADLINE: Duration = Duration::from_secs(60);

/// How long a job's leftovers may outlive the SIGKILLed worker.
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// The processes in the sandbox whose command line matches `pattern`
/// (`pgrep -af`), one per line; empty when there are none.
fn matching(sb: &Sandbox, pattern: &str) -> String {
    let out = sb.sh(&format!("pgrep -af '{pattern}'"));
    let listed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match out.status.code() {
        Some(0) => listed,
        Some(1) => String::new(),
        _ => panic!(
            "pgrep failed in the sandbox ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn a_worker_killed_under_systemd_leaves_nothing_of_its_jobs() {
    let Some(sb) = installed("leftovers", None) else {
        return;
    };
    // The job gets the token in its environment, so its own command line
    // does not carry it; `[.]` keeps the pattern from matching the shell
    // that runs pgrep.
    let token = token();
    let pattern = format!("sleep 1001[.]{token}");
    let pid = sb.prop(SERVICE, "MainPID");
    sb.ok(&format!(
        r#"runuser -u agent -- {BIN_INSIDE} submit --id leaver --env MARK={token} -- '( setsid sh -c "trap \"\" TERM; sleep 1001.$MARK" >/dev/null 2>&1 & ); sleep 300'"#
    ));
    sb.wait_until(
        "the job to run",
        DEADLINE,
        &format!("ls {SPOOL}/running"),
        |s| s.contains("leaver.json"),
    );
    common::wait_for("the job's stubborn setsid child", DEADLINE, || {
        let found = matching(&sb, &pattern);
        (!found.is_empty()).then_some(())
    });

    sb.ok(&format!("kill -KILL {pid}"));
    let killed = Instant::now();
    let left = common::wait_for(
        "the job's leftovers (backup deadline)",
        GONE_WITHIN + DEADLINE,
        || {
            let left = matching(&sb, &pattern);
            (left.is_empty() || killed.elapsed() > GONE_WITHIN).then_some(left)
        },
    );
    assert!(
        left.is_empty(),
        "{:?} after the worker's SIGKILL, still running:\n{left}",
        killed.elapsed()
    );

    sb.wait_until(
        "systemd to restart the killed worker",
        DEADLINE,
        &format!("systemctl show -p MainPID,ActiveState,SubState {SERVICE}"),
        |s| {
            s.contains("ActiveState=active")
                && s.contains("SubState=running")
                && !s.contains(&format!("MainPID={pid}\n"))
                && !s.contains("MainPID=0")
        },
    );
    limits_bind_under_the_packaged_unit(&sb);
}

/// The result of `id`, submitted by `agent` with `args`, as JSON.
fn run_as_agent(sb: &Sandbox, id: &str, args: &str, command: &str) -> serde_json::Value {
    let out = sb.sh(&format!(
        "runuser -u agent -- {BIN_INSIDE} submit --id {id} {args} --wait -- '{command}' >/dev/null; \
         runuser -u agent -- {BIN_INSIDE} result --json {id}"
    ));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "result of {id}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The packaged worker runs as `ai-cmd`, so every rlimit binds its jobs,
/// `tasks_max` included (root would be exempt from it).
fn limits_bind_under_the_packaged_unit(sb: &Sandbox) {
    let spin = run_as_agent(
        sb,
        "spin",
        "--timeout 4 --cpu-max 25%",
        "while :; do :; done",
    );
    assert_eq!(spin["signal"], "SIGXCPU", "{spin}");
    assert_eq!(
        spin["limits"]["enforced_by"]["cpu_max"], "RLIMIT_CPU 1s per process",
        "{spin}"
    );
    assert!(
        spin["error"]
            .as_str()
            .unwrap()
            .starts_with("cpu limit 25% reached"),
        "{spin}"
    );

    let hog = run_as_agent(
        sb,
        "hog",
        "--memory-max 64M",
        "python3 -c \"bytearray(200 << 20)\"",
    );
    assert_eq!(hog["status"], "failed", "{hog}");
    assert_eq!(
        hog["limits"]["enforced_by"]["memory_max"], "RLIMIT_DATA per process",
        "{hog}"
    );

    let bomb = run_as_agent(
        sb,
        "bomb",
        "--tasks-max 16",
        "python3 -c \"import os, time\nn = 0\ntry:\n  while n < 500:\n    if os.fork() == 0: time.sleep(60); os._exit(0)\n    n += 1\nexcept OSError as e: print(n, e.errno); raise SystemExit(1)\"",
    );
    assert_eq!(bomb["status"], "failed", "{bomb}");
    let by = bomb["limits"]["enforced_by"]["tasks_max"].as_str().unwrap();
    assert!(by.starts_with("RLIMIT_NPROC"), "{bomb}");
    let log = sb.ok(&format!("cat {SPOOL}/{}", bomb["log"].as_str().unwrap()));
    let words: Vec<&str> = log.split_whitespace().collect();
    let n: u32 = words[0].parse().unwrap_or_else(|_| panic!("{log}"));
    assert!(
        n < 16 && words[1] == "11",
        "{n} children, errno {}: {log}",
        words[1]
    );
}

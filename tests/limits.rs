//! Tier 2: per-job resource limits (`limits` in the job file, `[limits]`
//! in the configuration), enforced where no cgroup controllers are
//! delegated (this machine) as rlimits of the job's processes, each named
//! in the result.

mod common;

use common::{Spool, as_nobody, as_uid};
use serde_json::{Value, json};

fn start(spool: &Spool, config: &str) -> common::Worker {
    match as_nobody(spool) {
        Some((u, g)) => spool.start_as(config, u, g),
        None => spool.start(config),
    }
}

fn enforced_by<'a>(r: &'a Value, key: &str) -> &'a str {
    r["limits"]["enforced_by"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no enforced_by.{key}: {r}"))
}

#[test]
fn a_memory_hog_fails_at_memory_max_and_a_small_job_runs() {
    let spool = Spool::new();
    let _worker = start(&spool, "max_parallel = 2\n");
    let alloc = |mib: u32| {
        format!(
            "python3 -c 'b = bytearray({mib} << 20); b[::4096] = b\"x\" * len(b[::4096]); print(len(b))'"
        )
    };
    spool.submit_json(
        "hog",
        json!({"command": alloc(200), "limits": {"memory_max": "64M"}}),
    );
    spool.submit_json(
        "small",
        json!({"command": alloc(16), "limits": {"memory_max": "64M"}}),
    );

    let hog = spool.wait_result("hog");
    assert_eq!(hog["status"], "failed", "{hog}");
    assert_eq!(hog["limits"]["memory_max"], 64 << 20, "{hog}");
    assert!(
        enforced_by(&hog, "memory_max").starts_with("RLIMIT_DATA"),
        "{hog}"
    );
    let error = hog["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("limits in force: memory_max 64M (RLIMIT_DATA"),
        "{hog}"
    );
    assert!(spool.log_of(&hog).contains("MemoryError"), "{hog}");
    let peak = hog["max_rss_bytes"].as_u64().unwrap();
    assert!(peak < 64 << 20, "peak {peak} under the limit: {hog}");

    let small = spool.wait_result("small");
    assert_eq!(small["status"], "succeeded", "{small}");
    assert_eq!(spool.log_of(&small), format!("{}\n", 16 << 20));
}

#[test]
fn a_fork_bomb_stops_at_tasks_max_and_leaves_nothing() {
    let spool = Spool::new();
    // RLIMIT_NPROC counts every process of the uid: one of this test's own,
    // not `nobody`, whose processes other tests start meanwhile.
    let user = as_uid(&spool, 64_999);
    let _worker = match user {
        Some((u, g)) => spool.start_as("", u, g),
        None => {
            eprintln!("NOTICE: the worker runs as this (non-root) user; RLIMIT_NPROC binds it");
            spool.start("")
        }
    };
    let pids = spool.scratch("pids");
    std::fs::create_dir_all(&pids).unwrap();
    nix::unistd::chown(&pids, user.map(|u| u.0.into()), user.map(|u| u.1.into())).unwrap();
    // Forks children that sleep until it cannot fork any more, then says
    // how many it made and why it stopped.
    let bomb = format!(
        r#"exec python3 -c '
import os, sys, time
n = 0
try:
    while n < 1000:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        open("{pids}/%d" % pid, "w").close()
        n += 1
except OSError as e:
    print("forked", n, "errno", e.errno)
    sys.exit(1)
print("forked", n)
'"#,
        pids = pids.display()
    );
    spool.submit_json(
        "bomb",
        json!({"command": bomb, "timeout_secs": 60, "limits": {"tasks_max": 20}}),
    );
    let r = spool.wait_result("bomb");
    assert_eq!(r["status"], "failed", "{r}");
    let log = spool.log_of(&r);
    let words: Vec<&str> = log.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"forked"), "{log}");
    let n: u32 = words[1].parse().unwrap();
    assert_eq!(words.get(3), Some(&"11"), "stopped by EAGAIN: {log}");
    // The job itself is one task; what else the user started meanwhile
    // (the worker's threads) counts against it too.
    assert!(
        (10..20).contains(&n),
        "{n} children under tasks_max 20: {log}"
    );
    let by = enforced_by(&r, "tasks_max");
    assert!(by.starts_with("RLIMIT_NPROC"), "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("tasks_max 20 (RLIMIT_NPROC"),
        "{r}"
    );
    // Its sleeping children were ended with it.
    for entry in std::fs::read_dir(&pids).unwrap() {
        let pid: i32 = entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        common::wait_for(
            "the job's children to be gone",
            std::time::Duration::from_secs(15),
            || (!common::alive(nix::unistd::Pid::from_raw(pid))).then_some(()),
        );
    }
}

#[test]
fn a_spinner_is_stopped_at_its_cpu_share_of_the_timeout() {
    let spool = Spool::new();
    let _worker = start(&spool, "");
    spool.submit_json(
        "spin",
        json!({"command": "while :; do :; done", "timeout_secs": 8, "limits": {"cpu_max": "25%"}}),
    );
    let r = spool.wait_result("spin");
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["signal"], "SIGXCPU", "{r}");
    assert_eq!(r["limits"]["cpu_max"], "25%", "{r}");
    assert_eq!(
        enforced_by(&r, "cpu_max"),
        "RLIMIT_CPU 2s per process",
        "{r}"
    );
    let error = r["error"].as_str().unwrap();
    assert!(
        error.starts_with("cpu limit 25% reached: a process used its 2 s of CPU"),
        "{r}"
    );
    let cpu = r["cpu_user_ms"].as_u64().unwrap() + r["cpu_system_ms"].as_u64().unwrap();
    assert!((1500..3100).contains(&cpu), "{cpu} ms of CPU: {r}");
    assert!(
        r["duration_ms"].as_u64().unwrap() < 8000,
        "before the timeout: {r}"
    );
}

#[test]
fn defaults_and_the_ceiling_come_from_the_configuration() {
    let spool = Spool::new();
    let _worker = start(
        &spool,
        "[limits]\ntasks_max = 200\n[limits.ceiling]\nmemory_max = \"512M\"\ntasks_max = 400\n",
    );
    spool.submit("plain", "true");
    spool.submit_json(
        "own",
        json!({"command": "true", "limits": {"memory_max": "256M", "tasks_max": 300}}),
    );
    spool.submit_json(
        "greedy",
        json!({"command": "echo ran", "limits": {"memory_max": "1G"}}),
    );
    spool.submit_json(
        "bad",
        json!({"command": "echo ran", "limits": {"memory_max": "lots"}}),
    );
    spool.submit_json(
        "typo",
        json!({"command": "echo ran", "limits": {"memory": "1G"}}),
    );

    let plain = spool.wait_result("plain");
    assert_eq!(plain["status"], "succeeded", "{plain}");
    assert_eq!(plain["limits"]["tasks_max"], 200, "the default: {plain}");
    assert_eq!(
        plain["limits"]["memory_max"],
        512 << 20,
        "the ceiling: {plain}"
    );

    let own = spool.wait_result("own");
    assert_eq!(own["limits"]["memory_max"], 256 << 20, "{own}");
    assert_eq!(own["limits"]["tasks_max"], 300, "{own}");

    for (id, want) in [
        (
            "greedy",
            "\"limits\".\"memory_max\" 1G is above the most this host allows, 512M",
        ),
        ("bad", "\"memory_max\" must be a number of bytes or a size"),
        ("typo", "unknown field `memory`"),
    ] {
        let r = spool.wait_result(id);
        assert_eq!(r["status"], "rejected", "{r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{id}: {r}");
        assert_eq!(r["log"], Value::Null, "it never ran: {r}");
    }
}

#[test]
fn a_job_without_limits_records_none_and_a_bad_table_stops_the_worker() {
    let spool = Spool::new();
    {
        let _worker = spool.start("");
        spool.submit("plain", "true");
        let r = spool.wait_result("plain");
        assert_eq!(r["status"], "succeeded", "{r}");
        assert!(r.get("limits").is_none(), "{r}");
    }
    let config = spool.config("[limits]\ntasks_max = 500\n[limits.ceiling]\ntasks_max = 100\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ai-cmd-executor"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.tasks_max = 500 is above limits.ceiling.tasks_max = 100"),
        "{err}"
    );
}

//! Tier 2: what a job used is in its result (`cpu_user_ms`,
//! `cpu_system_ms`, `max_rss_bytes`), in `result`'s output for people, and
//! null for a job that never ran.

mod common;

use common::{Spool, as_nobody};
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

/// What a job tries against the spool at `root`, one line per attempt:
/// "WHAT: allowed" or "WHAT: denied".
fn spool_probe(root: &std::path::Path, outside: &std::path::Path) -> String {
    format!(
        r#"S={root}
try() {{ if "$@" >/dev/null 2>&1; then echo "$what: allowed"; else echo "$what: denied"; fi; }}
what="rewrite a result" try sh -c 'echo forged > "$1"' - "$S/completed/first.json"
what="delete a result" try rm -f "$S/completed/first.json"
what="queue a job" try sh -c 'echo "{{\"command\": \"true\"}}" > "$1/tmp/evil" && mv "$1/tmp/evil" "$1/pending/evil.json"' - "$S"
what="rename a directory" try mv "$S/logs" "$S/logs2"
what="plant a link" try ln -s /etc "$S/tmp/etc"
what="truncate a lock" try truncate -s 0 "$S/.serving.lock"
what="append to its own log" try sh -c 'for f in "$1"/logs/*/attack@*.log; do echo forged >> "$f"; done' - "$S"
for d in tmp pending running completed logs archive; do
  what="create in $d" try touch "$S/$d/.planted"
  what="rename $d" try mv "$S/$d" "$S/$d.moved"
done
what="read a result" try cat "$S/completed/first.json"
what="write outside the spool" try sh -c 'echo ok > "$1/note" && mkdir "$1/dir"' - "{outside}"
"#,
        root = root.display(),
        outside = outside.display()
    )
}

/// Every entry under `root` (not following links): relative path →
/// (kind, length, modification time, inode).
fn tree(
    root: &std::path::Path,
) -> std::collections::BTreeMap<String, (bool, u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            // A directory's mtime changes when the worker adds to it.
            let modified = if meta.is_dir() {
                std::time::UNIX_EPOCH
            } else {
                meta.modified().unwrap()
            };
            out.insert(rel, (meta.is_dir(), meta.len(), modified, meta.ino()));
        }
    }
    out
}

#[test]
fn at_full_a_job_can_read_the_spool_but_change_nothing_in_it() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("NOTICE: skipped: needs root to run the worker as nobody under /run");
        return;
    }
    // As the package lays it out: the spool and the worker are an
    // unprivileged user's, under directories only root may write.
    let spool = Spool::new_in(std::path::Path::new("/run"));
    spool.open_to_all();
    ai_cmd_executor::spool::Spool::new(spool.root())
        .ensure_layout()
        .expect("layout");
    let outside = spool.scratch("out");
    std::fs::create_dir(&outside).unwrap();
    for path in [spool.root(), outside.clone()] {
        let out = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let worker = spool.start_as("isolation = \"full\"\n", 65534, 65534);
    assert!(
        worker.log().contains("isolation=\"full\""),
        "{}",
        worker.log()
    );
    spool.submit("first", "echo first");
    let first = spool.wait_result("first");
    assert_eq!(first["status"], "succeeded", "{first}");
    let before = std::fs::read(spool.path("completed/first.json")).unwrap();

    let snapshot = tree(&spool.root());
    spool.submit("attack", &spool_probe(&spool.root(), &outside));
    let attack = spool.wait_result("attack");
    let log = spool.log_of(&attack);
    for d in ["tmp", "pending", "running", "completed", "logs", "archive"] {
        for what in ["create in", "rename"] {
            let line = format!("{what} {d}: denied");
            assert!(log.contains(&line), "{line:?} not in:\n{log}");
        }
    }
    // Nothing that was there changed; what is new is the attack's own
    // record, written by the worker.
    let after = tree(&spool.root());
    for (path, meta) in &snapshot {
        assert_eq!(after.get(path), Some(meta), "{path} changed");
    }
    for path in after.keys().filter(|p| !snapshot.contains_key(*p)) {
        let attacks = |q: &String| q.starts_with(path.as_str()) && q.contains("attack");
        assert!(after.keys().any(attacks), "{path} appeared in the spool");
    }
    for line in [
        "rewrite a result: denied",
        "delete a result: denied",
        "queue a job: denied",
        "rename a directory: denied",
        "plant a link: denied",
        "truncate a lock: denied",
        "append to its own log: denied",
        "read a result: allowed",
        "write outside the spool: allowed",
    ] {
        assert!(log.contains(line), "{line:?} not in:\n{log}");
    }
    assert_eq!(
        std::fs::read(spool.path("completed/first.json")).unwrap(),
        before
    );
    assert!(!spool.path("pending/evil.json").exists());
    assert!(spool.result("evil").is_none());
    assert!(!log.contains("forged"), "{log}");
    assert_eq!(
        std::fs::read_to_string(outside.join("note")).unwrap(),
        "ok\n"
    );
}

#[test]
fn the_spool_is_guarded_only_where_its_parents_allow_it() {
    // A spool in a directory its user can write (a checkout, or a temp
    // dir as here): `auto` settles for `process` and says why ...
    let spool = Spool::new();
    let worker = spool.start("");
    let log = worker.log();
    assert!(log.contains("isolation=\"process\""), "{log}");
    assert!(
        log.contains("jobs can change the spool")
            && log.contains("is writable by the worker's user"),
        "{log}"
    );
    drop(worker);

    // ... and `full` refuses to start, naming the directory.
    let other = Spool::new();
    let cfg = other.config("isolation = \"full\"\n");
    let out = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["run", "--spool"])
        .arg(other.root())
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("isolation = \"full\" cannot be had here: the spool's parent directory"),
        "{err}"
    );
}

/// The `jobs.isolation` finding of `diagnose --json`, and `status --json`'s
/// `isolation`, for the worker started with `config`.
fn measured(config: &str) -> (Value, Value) {
    let spool = Spool::new();
    let _worker = spool.start(config);
    let cfg = spool.config(config);
    let cfg = cfg.to_str().unwrap();
    let out = spool.cli(&["--config", cfg, "diagnose", "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let finding = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "jobs.isolation")
        .unwrap_or_else(|| panic!("no jobs.isolation in {doc}"))
        .clone();
    let out = spool.cli(&["--config", cfg, "status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    (finding, status["isolation"].clone())
}

#[test]
fn diagnose_and_status_say_what_a_job_can_reach() {
    // A temp spool gets `process` under `auto`: the probe job cannot
    // signal the worker but can change the spool, which is a warning.
    let (finding, status) = measured("");
    assert_eq!(finding["level"], "warning", "{finding}");
    assert_eq!(finding["detail"]["worker_guarded"], true, "{finding}");
    assert_eq!(finding["detail"]["spool_guarded"], false, "{finding}");
    assert!(
        finding["summary"]
            .as_str()
            .unwrap()
            .contains("can change the spool"),
        "{finding}"
    );
    assert_eq!(status["worker_guarded"], true, "{status}");
    assert_eq!(status["spool_guarded"], false, "{status}");
    assert!(status["measured_at"].is_string(), "{status}");

    // Asked for none, the probe reaches both, and that is what was asked.
    let (finding, status) = measured("isolation = \"none\"\n");
    assert_eq!(finding["level"], "ok", "{finding}");
    assert_eq!(finding["detail"]["worker_guarded"], false, "{finding}");
    assert_eq!(finding["detail"]["spool_guarded"], false, "{finding}");
    assert_eq!(status["worker_guarded"], false, "{status}");
}

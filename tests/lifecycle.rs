//! Crashes, stops, reloads and shared spools: nothing is lost and nothing
//! runs twice unless it asked to.

mod common;

use std::fs;

use common::{DEADLINE, Gate, Spool, alive, read_pid, wait_for};
use nix::sys::signal::{Signal, killpg};
use serde_json::json;

/// Kills a job's process group left behind by a SIGKILLed worker.
struct GroupGuard(Option<nix::unistd::Pid>);
impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = killpg(p, Signal::SIGKILL);
        }
    }
}

#[test]
fn kill_9_mid_job_then_restart_records_interrupted_and_goes_on() {
    let spool = Spool::new();
    let mut w = spool.start("");
    let pidfile = spool.scratch("job.pid");
    let ledger = spool.scratch("ledger");
    spool.submit(
        "victim",
        &format!(
            "echo $$ > {}; echo ran >> {}; sleep 300",
            pidfile.display(),
            ledger.display()
        ),
    );
    let pid = wait_for("the job to start", DEADLINE, || read_pid(&pidfile));
    let _guard = GroupGuard(Some(pid));
    spool.submit("queued-behind", "echo later");
    w.kill9();
    assert_eq!(spool.names("running"), ["victim.json"]);
    assert_eq!(spool.names("pending"), ["queued-behind.json"]);

    let _w2 = spool.start("");
    let r = spool.wait_result("victim");
    assert_eq!(r["status"], "interrupted");
    assert_eq!(r["exit_code"], serde_json::Value::Null);
    assert!(
        r["error"].as_str().unwrap().contains("not run again"),
        "{r}"
    );
    assert!(
        r["log"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/victim@", spool.log_dir("victim")))
    );
    assert_eq!(spool.wait_result("queued-behind")["status"], "succeeded");
    assert_eq!(
        fs::read_to_string(&ledger).unwrap(),
        "ran\n",
        "never run twice"
    );
    assert!(spool.names("running").is_empty());
    assert!(
        spool
            .names("archive/interrupted")
            .iter()
            .any(|n| n.starts_with("victim.json.")),
        "the interrupted job file is kept"
    );
}

#[test]
fn retry_jobs_are_requeued_after_a_crash() {
    let spool = Spool::new();
    let mut w = spool.start("");
    let pidfile = spool.scratch("job.pid");
    let ledger = spool.scratch("ledger");
    spool.submit_json(
        "again",
        json!({
            "command": format!(
                "echo attempt-$AI_CMD_EXECUTOR_ATTEMPT >> {l}; if [ $AI_CMD_EXECUTOR_ATTEMPT = 1 ]; then echo $$ > {p}; sleep 300; fi",
                l = ledger.display(), p = pidfile.display()
            ),
            "on_interrupt": "retry",
        }),
    );
    let pid = wait_for("the first attempt", DEADLINE, || read_pid(&pidfile));
    let _guard = GroupGuard(Some(pid));
    w.kill9();
    let _w2 = spool.start("");
    let r = spool.wait_result("again");
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["attempt"], 2);
    assert_eq!(
        fs::read_to_string(&ledger).unwrap(),
        "attempt-1\nattempt-2\n"
    );
}

#[test]
fn retries_stop_at_max_attempts() {
    let spool = Spool::new();
    let pidfile = spool.scratch("job.pid");
    let job = json!({
        "command": format!("echo $$ > {}; sleep 300", pidfile.display()),
        "on_interrupt": "retry",
    });
    let mut w = spool.start("max_attempts = 2\n");
    spool.submit_json("doomed", job);
    for attempt in 1..=2 {
        let pid = wait_for(&format!("attempt {attempt}"), DEADLINE, || {
            read_pid(&pidfile)
        });
        let _guard = GroupGuard(Some(pid));
        fs::remove_file(&pidfile).unwrap();
        w.kill9();
        w = spool.start("max_attempts = 2\n");
    }
    let r = spool.wait_result("doomed");
    assert_eq!(r["status"], "interrupted");
    assert_eq!(r["attempt"], 2);
    assert!(spool.names("pending").is_empty());
}

#[test]
fn sigterm_lets_running_jobs_finish_within_the_grace() {
    let spool = Spool::new();
    let mut w = spool.start("stop_grace = \"30s\"\n");
    let gate = Gate::new(&spool);
    spool.submit(
        "finishing",
        &format!("{}; echo finished", gate.command("finishing")),
    );
    spool.submit("left-pending", "echo later");
    gate.wait_started(1);
    w.signal(Signal::SIGTERM);
    w.wait_log("SIGTERM: no new jobs");
    assert!(!w.exited(), "the worker waits for its running job");
    gate.open();
    let st = w.wait_exit();
    assert!(st.success(), "{st}");
    let r = spool.wait_result("finishing");
    assert_eq!(r["status"], "succeeded");
    assert_eq!(spool.log_of(&r), "finished\n");
    assert_eq!(
        spool.names("pending"),
        ["left-pending.json"],
        "not claimed while stopping"
    );
    assert!(spool.result("left-pending").is_none());
}

#[test]
fn sigterm_interrupts_jobs_that_outlive_the_grace() {
    let spool = Spool::new();
    let mut w = spool.start("stop_grace = \"300ms\"\nkill_grace = \"300ms\"\n");
    let pidfile = spool.scratch("job.pid");
    spool.submit(
        "long",
        &format!("echo $$ > {}; trap '' TERM; sleep 300", pidfile.display()),
    );
    let pid = wait_for("the job to start", DEADLINE, || read_pid(&pidfile));
    w.signal(Signal::SIGTERM);
    assert!(w.wait_exit().success());
    let r = spool.wait_result("long");
    assert_eq!(r["status"], "interrupted");
    assert_eq!(r["signal"], "SIGKILL");
    assert!(!alive(pid), "the job was killed");
    assert!(spool.names("running").is_empty());
}

#[test]
fn sigterm_requeues_retry_jobs() {
    let spool = Spool::new();
    let mut w = spool.start("stop_grace = \"200ms\"\nkill_grace = \"200ms\"\n");
    let started = spool.scratch("started");
    spool.submit_json(
        "resumable",
        json!({"command": format!("touch {}; sleep 300", started.display()), "on_interrupt": "retry"}),
    );
    wait_for("the job to start", DEADLINE, || {
        started.exists().then_some(())
    });
    w.signal(Signal::SIGTERM);
    assert!(w.wait_exit().success());
    assert_eq!(spool.names("pending"), ["resumable.json"]);
    let requeued: serde_json::Value =
        serde_json::from_slice(&fs::read(spool.path("pending/resumable.json")).unwrap()).unwrap();
    assert_eq!(requeued["attempt"], 2);
    assert!(spool.result("resumable").is_none());
}

#[test]
fn sighup_reloads_the_config_and_survives_a_bad_one() {
    let spool = Spool::new();
    let mut w = spool.start("max_parallel = 1\n");
    spool.config("max_parallel = 3\n");
    w.signal(Signal::SIGHUP);
    w.wait_log("max_parallel=3");
    // The new parallelism holds: three jobs that wait for each other all
    // start (a slot is a thread; the reload starts the two new ones).
    let gate = Gate::new(&spool);
    for i in 0..3 {
        spool.submit(&format!("wide-{i}"), &gate.command(&format!("wide-{i}")));
    }
    gate.wait_started(3);
    gate.open();
    for i in 0..3 {
        assert_eq!(
            spool.wait_result(&format!("wide-{i}"))["status"],
            "succeeded"
        );
    }
    spool.config("max_parallel = 0\n");
    w.signal(Signal::SIGHUP);
    w.wait_log("reload failed, keeping the running configuration");
    spool.submit("after-reload", "echo ok");
    assert_eq!(spool.wait_result("after-reload")["status"], "succeeded");
}

#[test]
fn a_removed_pending_directory_is_recreated() {
    let spool = Spool::new();
    let _w = spool.start("");
    fs::remove_dir_all(spool.path("pending")).unwrap();
    wait_for("pending/ to come back", DEADLINE, || {
        spool.path("pending").is_dir().then_some(())
    });
    spool.submit("back", "echo back");
    assert_eq!(spool.wait_result("back")["status"], "succeeded");
}

#[test]
fn two_workers_on_one_spool_never_run_a_job_twice() {
    let spool = Spool::new();
    let _a = spool.start("max_parallel = 2\n");
    let _b = spool.start("max_parallel = 2\n");
    let ledger = spool.scratch("ledger");
    for i in 0..60 {
        spool.submit(
            &format!("shared-{i}"),
            &format!("echo shared-{i} >> {}", ledger.display()),
        );
    }
    for i in 0..60 {
        assert_eq!(
            spool.wait_result(&format!("shared-{i}"))["status"],
            "succeeded"
        );
    }
    let text = fs::read_to_string(&ledger).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    let mut want: Vec<String> = (0..60).map(|i| format!("shared-{i}")).collect();
    want.sort();
    assert_eq!(lines, want, "each job ran exactly once");
}

#[test]
fn a_second_worker_leaves_the_first_ones_running_job_alone() {
    let spool = Spool::new();
    let _a = spool.start("");
    let gate = Gate::new(&spool);
    spool.submit("owned", &gate.command("owned"));
    gate.wait_started(1);
    let _b = spool.start("");
    assert!(
        spool.result("owned").is_none(),
        "recovery must not mark a live job interrupted"
    );
    gate.open();
    assert_eq!(spool.wait_result("owned")["status"], "succeeded");
}

/// A second SIGINT (Ctrl-C twice) stops at once, and both the log and the
/// job's result say so, rather than blaming the stop grace.
#[test]
fn a_second_sigint_stops_at_once_and_says_so() {
    let spool = Spool::new();
    let mut worker = spool.start("stop_grace = \"60s\"\nkill_grace = \"1s\"\n");
    let gate = Gate::new(&spool);
    spool.submit("held", &gate.command("held"));
    gate.wait_started(1);
    worker.signal(Signal::SIGINT);
    worker.wait_log("SIGINT: no new jobs");
    worker.signal(Signal::SIGINT);
    worker.wait_log("SIGINT again: stopping now, without waiting for the stop grace");
    let r = spool.wait_result("held");
    assert_eq!(r["status"], "interrupted", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(err.contains("a second SIGINT stopped it at once"), "{err}");
    assert!(!err.contains("stop grace"), "{err}");
    assert!(worker.wait_exit().success(), "{}", worker.log());
}

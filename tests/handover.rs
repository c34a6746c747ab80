//! Tier 2: a worker whose binary is replaced hands over to the new one on
//! SIGHUP (what an upgrade's reload sends), and its running jobs carry on:
//! their output, timeouts and results are the new worker's, and nothing
//! is interrupted.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{BIN, DEADLINE, Gate, Spool, alive, wait_for};
use nix::sys::signal::Signal;
use serde_json::json;

/// A copy of the binary in the test's scratch space, which the test can
/// replace as a package upgrade does (a new file renamed over it).
fn own_binary(spool: &Spool) -> PathBuf {
    let dir = spool.scratch("bin");
    fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("ai-cmd-executor");
    install_over(&bin);
    bin
}

/// Writes a fresh copy of the binary under a temporary name and renames it
/// over `bin` (as dpkg unpacks), so the running one's file is replaced.
/// The copy is written by `install(1)`, not by this process: a worker that
/// another test thread forks while this one holds the file open for writing
/// would inherit that descriptor until its `exec`, and an `exec` of the copy
/// meanwhile fails with "Text file busy".
fn install_over(bin: &Path) {
    let tmp = bin.with_extension("dpkg-new");
    let st = std::process::Command::new("install")
        .args(["-m", "0755", BIN])
        .arg(&tmp)
        .status()
        .unwrap();
    assert!(st.success(), "install {BIN}: {st}");
    fs::rename(&tmp, bin).unwrap();
}

fn exe_of(pid: nix::unistd::Pid) -> String {
    fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn a_replaced_binary_takes_over_running_jobs_on_reload() {
    let spool = Spool::new();
    let bin = own_binary(&spool);
    let mut worker = spool.start_binary(&bin, "max_parallel = 4\nkill_grace = \"5s\"\n");
    let pid = worker.pid();
    let gate = Gate::new(&spool);

    // One job writes before and after the hand-over; one runs into its
    // timeout after it; one is in a kill sequence's grace across it.
    spool.submit(
        "across",
        &format!("echo before; {}; echo after", gate.command("a")),
    );
    spool.submit_json(
        "timeout",
        json!({"command": format!("{}; sleep 60", gate.command("t")), "timeout_secs": 8}),
    );
    spool.submit_json(
        "stubborn",
        json!({
            "command": "trap 'echo got TERM' TERM; touch started-s; while :; do sleep 0.05; done",
            "timeout_secs": 1,
            "cwd": spool.scratch("").display().to_string(),
        }),
    );
    gate.wait_started(2);
    let log_has = |id: &str, text: &str| {
        let logs = spool.logs_of(id);
        let first = logs.first()?;
        fs::read_to_string(spool.path(first))
            .ok()
            .filter(|l| l.contains(text))
            .map(|_| ())
    };
    wait_for("the first job's output", DEADLINE, || {
        log_has("across", "before")
    });
    // The stubborn job is between its TERM and its KILL.
    wait_for("the stubborn job's TERM", DEADLINE, || {
        log_has("stubborn", "got TERM")
    });

    install_over(&bin);
    assert!(exe_of(pid).ends_with("(deleted)"), "{}", exe_of(pid));
    worker.signal(Signal::SIGHUP);
    worker.wait_log("handing 3 running job(s) over to the new binary");
    worker.wait_log("3 running job(s) taken over from the previous worker");
    // The same process, now running the new file.
    assert!(alive(pid));
    assert_eq!(exe_of(pid), bin.display().to_string());
    assert!(!worker.exited());

    assert!(spool.result("timeout").is_none());
    assert!(spool.result("stubborn").is_none());
    gate.open();
    let across = spool.wait_result("across");
    assert_eq!(across["status"], "succeeded", "{across}");
    assert_eq!(spool.log_of(&across), "before\nafter\n");

    let timed = spool.wait_result("timeout");
    assert_eq!(timed["status"], "timed_out", "{timed}");
    let stubborn = spool.wait_result("stubborn");
    assert_eq!(stubborn["status"], "timed_out", "{stubborn}");
    assert_eq!(stubborn["signal"], "SIGKILL", "{stubborn}");

    // Nothing is left in running/, and the new worker takes new jobs.
    assert!(
        spool.names("running").is_empty(),
        "{:?}",
        spool.names("running")
    );
    spool.submit("after", "echo new");
    let after = spool.wait_result("after");
    assert_eq!(after["status"], "succeeded", "{after}");

    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_exit().success(), "{}", worker.log());
    assert!(!worker.log().contains("interrupted"), "{}", worker.log());
}

#[test]
fn a_reload_without_a_new_binary_only_reloads_the_configuration() {
    let spool = Spool::new();
    let bin = own_binary(&spool);
    let mut worker = spool.start_binary(&bin, "max_parallel = 1\n");
    worker.signal(Signal::SIGHUP);
    worker.wait_log("configuration reloaded");
    assert!(!worker.log().contains("handing"), "{}", worker.log());
}

#[test]
fn a_new_binary_that_does_not_run_is_not_taken_up() {
    let spool = Spool::new();
    let bin = own_binary(&spool);
    let mut worker = spool.start_binary(&bin, "max_parallel = 1\n");
    let gate = Gate::new(&spool);
    spool.submit("held", &gate.command("h"));
    gate.wait_started(1);
    // A broken "upgrade": the new file is not a program.
    let tmp = bin.with_extension("dpkg-new");
    fs::write(&tmp, "not a program").unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, &bin).unwrap();
    worker.signal(Signal::SIGHUP);
    worker.wait_log("does not hand over to it");
    gate.open();
    let held = spool.wait_result("held");
    assert_eq!(held["status"], "succeeded", "{held}");
}

#[test]
fn a_stop_during_the_hand_over_is_carried_out_by_the_new_worker() {
    let spool = Spool::new();
    let bin = own_binary(&spool);
    let mut worker = spool.start_binary(&bin, "max_parallel = 1\nstop_grace = \"30s\"\n");
    let gate = Gate::new(&spool);
    spool.submit("job", &format!("{}; echo finished", gate.command("j")));
    gate.wait_started(1);
    install_over(&bin);
    // Both at once: the loop takes them in either order. Reload first:
    // the hand-over carries the stop to the new worker. Stop first: the
    // stopping worker does not hand over. Either way the job finishes in
    // the stop grace and the worker stops.
    worker.signal(Signal::SIGHUP);
    worker.signal(Signal::SIGTERM);
    worker.wait_log("1 running job(s) get");
    wait_for("the reload to be taken either way", DEADLINE, || {
        let log = worker.log();
        (log.contains("1 running job(s) taken over from the previous worker")
            || log.contains("the worker is stopping, so the next start runs it"))
        .then_some(())
    });
    gate.open();
    let job = spool.wait_result("job");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(worker.wait_exit().success(), "{}", worker.log());
}

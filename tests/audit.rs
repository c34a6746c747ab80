//! The audit trail: each result records who submitted the job (the owner
//! of its job file), and the worker's entries for a job's start and end
//! name the job in their message, with the submitter and the command (an
//! excerpt and the SHA-256 of the whole).
//!
//! The worker runs in the foreground here, so its entries are the lines it
//! writes to stderr (`RUST_LOG=debug`), which carry the same fields as the
//! journal entries under systemd.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::chown;
use std::process::Command;

use common::{DEADLINE, Gate, Spool, Worker, wait_for};
use serde_json::{Value, json};

/// The uid that owns a foreign job file.
const NOBODY: u32 = 65534;

/// The user name of `uid`, as the user database has it.
fn name_of(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// The SHA-256 of `bytes` in hex, from coreutils' `sha256sum`: a second
/// implementation, not the one the worker uses.
fn sha256sum(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).expect("hex");
    let hex = text.split_whitespace().next().expect("a hash").to_owned();
    assert_eq!(hex.len(), 64, "{text}");
    hex
}

/// The worker's log line whose message contains `message`, once there is one.
fn line(w: &Worker, message: &str) -> String {
    wait_for(&format!("a log line with {message:?}"), DEADLINE, || {
        w.log()
            .lines()
            .find(|l| l.contains(message))
            .map(str::to_owned)
    })
}

/// The `submitted_by` object a result should hold for `uid`.
fn submitter(uid: u32) -> Value {
    json!({"uid": uid, "name": name_of(uid)})
}

#[test]
fn results_and_log_entries_name_the_submitter_and_the_command() {
    let spool = Spool::new();
    let w = spool.start("");
    let me = nix::unistd::geteuid().as_raw();

    // A JSON job: longer than the excerpt, with a newline and a tab.
    let command = format!("echo audited\n\t: {}", "x".repeat(300));
    spool.submit("audit-json", &command);
    let r = spool.wait_result("audit-json");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["submitted_by"], submitter(me), "{r}");
    assert_eq!(r["submitted_by"]["uid"], me, "{r}");

    let hash = sha256sum(command.as_bytes());
    let started = line(&w, "job audit-json started");
    let finished = line(&w, "job audit-json finished: succeeded");
    for l in [&started, &finished] {
        assert!(l.contains(&hash), "CMD_SHA256 of the whole command: {l}");
        assert!(l.contains(&format!("submitter_uid={me}")), "{l}");
        if let Some(name) = name_of(me) {
            assert!(l.contains(&format!("submitter=\"{name}\"")), "{l}");
        }
        // The excerpt, escaped, cut at 200 bytes of the command.
        assert!(l.contains(r"echo audited\\n\\t: xxx"), "{l}");
        assert!(l.contains(&format!("{}…", "x".repeat(200 - 16))), "{l}");
        assert!(!l.contains(&"x".repeat(200 - 15)), "{l}");
        // The fields that existed before stay as they were.
        assert!(l.contains("cmd_id=audit-json"), "{l}");
        assert!(l.contains("message_id="), "{l}");
    }
    assert!(started.contains("cmd_status=\"running\""), "{started}");
    assert!(finished.contains("cmd_status=succeeded"), "{finished}");
    assert!(finished.contains("exit_code=0"), "{finished}");

    // A script job: the command is the whole file.
    let script = b"#!/bin/bash\necho from a script\nexit 3\n";
    spool.drop_file("audit-sh.sh", script);
    let r = spool.wait_result("audit-sh");
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["submitted_by"], submitter(me), "{r}");
    let hash = sha256sum(script);
    let started = line(&w, "job audit-sh started");
    let finished = line(&w, "job audit-sh finished: failed (exit code 3)");
    for l in [&started, &finished] {
        assert!(l.contains(&hash), "{l}");
        assert!(
            l.contains(r"#!/bin/bash\\necho from a script\\nexit 3\\n"),
            "{l}"
        );
    }

    // Bad input: the id is in the message, and the owner in the entry and
    // the result.
    spool.drop_file("audit-bad.json", b"{\"command\": ");
    let r = spool.wait_result("audit-bad");
    assert_eq!(r["status"], "rejected", "{r}");
    assert_eq!(r["submitted_by"], submitter(me), "{r}");
    let rejected = line(&w, "job audit-bad rejected: invalid job JSON");
    assert!(
        rejected.contains(&format!("submitter_uid={me}")),
        "{rejected}"
    );
}

#[test]
fn a_run_cut_short_by_a_crash_is_recorded_with_its_submitter_and_command() {
    let spool = Spool::new();
    let mut w = spool.start("");
    let gate = Gate::new(&spool);
    let command = gate.command("crashed");
    spool.submit("crashed", &command);
    gate.wait_started(1);
    w.kill9();

    // The next worker records the run interrupted, from its job file.
    let w = spool.start("");
    gate.open();
    let r = spool.wait_result("crashed");
    assert_eq!(r["status"], "interrupted", "{r}");
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(r["submitted_by"], submitter(me), "{r}");
    let l = line(&w, "job crashed finished: the worker stopped unexpectedly");
    assert!(l.contains(&sha256sum(command.as_bytes())), "{l}");
    assert!(l.contains(&format!("submitter_uid={me}")), "{l}");
}

#[test]
fn a_job_file_of_another_owner_is_recorded_as_theirs() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !common::sandbox::required(),
            "the foreign submitter test needs root in CI"
        );
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: foreign submitter test SKIPPED: not root"
        );
        return;
    }
    // Submitted like an agent running as nobody: written into tmp/, handed
    // to nobody, renamed into pending/.
    let submit_as_nobody = |spool: &Spool, id: &str, command: &str| {
        let tmp = spool.path(&format!("tmp/{id}.json"));
        fs::write(&tmp, json!({ "command": command }).to_string()).unwrap();
        chown(&tmp, Some(NOBODY), Some(NOBODY)).unwrap();
        fs::rename(&tmp, spool.path(&format!("pending/{id}.json"))).unwrap();
    };

    // With no submit_group, whoever can write pending/ may submit.
    let spool = Spool::new();
    let w = spool.start("");
    submit_as_nobody(&spool, "theirs", "echo ran for nobody");
    let r = spool.wait_result("theirs");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["submitted_by"], submitter(NOBODY), "{r}");
    let hash = sha256sum(b"echo ran for nobody");
    for message in ["job theirs started", "job theirs finished: succeeded"] {
        let l = line(&w, message);
        assert!(l.contains(&format!("submitter_uid={NOBODY}")), "{l}");
        if let Some(name) = name_of(NOBODY) {
            assert!(l.contains(&format!("submitter=\"{name}\"")), "{l}");
        }
        assert!(l.contains(&hash), "{l}");
    }
    drop(w);

    // Refused by submit_group: the rejection names the owner too.
    let spool = Spool::new();
    let w = spool.start("submit_group = \"root\"\n");
    submit_as_nobody(&spool, "refused", "echo should not run");
    let r = spool.wait_result("refused");
    assert_eq!(r["status"], "rejected", "{r}");
    assert_eq!(r["submitted_by"], submitter(NOBODY), "{r}");
    let l = line(
        &w,
        "job refused rejected: the job file is owned by uid 65534",
    );
    assert!(l.contains(&format!("submitter_uid={NOBODY}")), "{l}");
}

#[test]
fn a_result_written_before_submitted_by_still_reads() {
    let spool = Spool::new();
    let _w = spool.start("");
    // As the worker wrote it before `submitted_by` existed.
    let old = r#"{
  "id": "old",
  "status": "succeeded",
  "exit_code": 0,
  "signal": null,
  "started_at": "2026-11-26T19:33:09.123456Z",
  "finished_at": "2026-11-26T19:33:10.123456Z",
  "duration_ms": 1000,
  "log": null,
  "output_truncated": false,
  "error": null,
  "attempt": 1
}
"#;
    fs::write(spool.path("completed/old.json"), old).unwrap();
    let out = spool.cli(&["result", "old", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("the result as JSON");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["submitted_by"], Value::Null, "{r}");
}

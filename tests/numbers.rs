//! One job file never stops the worker: every numeric job field is bounded,
//! and a value out of range (huge, negative, fractional, not a number) gets
//! a `rejected` result that names the field and its range, while the same
//! worker process goes on running jobs. Configured durations and sizes are
//! bounded too, and the largest allowed values work end to end. A property
//! test feeds arbitrary numeric values through the whole job path, from a
//! file in `pending/` to its result.

mod common;

use std::num::{NonZeroU32, NonZeroU64};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use ai_cmd_executor::spool::job::{JobSpec, MAX_ATTEMPTS, MAX_TIMEOUT_SECS, OnInterrupt};
use common::{BIN, DEADLINE, Spool, Worker, alive, wait_for};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::Value;

/// The numeric fields of a JSON job, with their largest allowed values.
fn fields() -> [(&'static str, u64); 2] {
    [
        ("timeout_secs", MAX_TIMEOUT_SECS),
        ("attempt", u64::from(MAX_ATTEMPTS)),
    ]
}

#[test]
fn fields_lists_every_numeric_job_field() {
    // Written out in full: a new field fails to compile here, and if it is
    // a number it belongs in `fields()`.
    let spec = JobSpec {
        command: "x".into(),
        timeout_secs: NonZeroU64::new(1),
        env: [("A".to_owned(), "1".to_owned())].into(),
        cwd: Some("/".into()),
        on_interrupt: OnInterrupt::Retry,
        attempt: NonZeroU32::new(1),
        limits: None,
        submitted_via: None,
    };
    let value = serde_json::to_value(&spec).unwrap();
    let mut numeric: Vec<&str> = value
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_number())
        .map(|(k, _)| k.as_str())
        .collect();
    numeric.sort_unstable();
    let mut listed: Vec<&str> = fields().iter().map(|(f, _)| *f).collect();
    listed.sort_unstable();
    assert_eq!(numeric, listed);
}

/// Values no numeric field accepts, as JSON text: huge, negative,
/// fractional, zero, and not numbers at all.
fn bad_values(max: u64) -> Vec<String> {
    let mut v: Vec<String> = [
        "18446744073709551615", // u64::MAX: the value that once stopped the worker
        "9223372036854775808",  // 2^63
        "18446744073709551616", // 2^64, beyond every integer type
        "123456789012345678901234567890",
        "1e300",
        "-1e300",
        "-1",
        "-9223372036854775808",
        "0",
        "-0",
        "0.5",
        "1.5",
        "5.0",
        "1e3",
        "\"5\"",
        "\"\"",
        "\"forever\"",
        "true",
        "[5]",
        "{\"secs\":5}",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    v.push((max + 1).to_string());
    v
}

/// The worker is still the same, running process.
fn assert_same_worker(w: &mut Worker, pid: Pid) {
    assert!(!w.exited(), "the worker exited:\n{}", w.log());
    assert_eq!(w.pid(), pid);
    assert!(alive(pid), "the worker process is gone");
}

#[test]
fn out_of_range_numbers_in_every_field_are_rejected_and_the_worker_lives_on() {
    let spool = Spool::new();
    let mut w = spool.start("");
    let pid = w.pid();
    let mut cases = Vec::new();
    for (field, max) in fields() {
        for (i, value) in bad_values(max).into_iter().enumerate() {
            let id = format!("{field}-{i}");
            let text = format!(r#"{{"command":"echo ran","{field}":{value}}}"#);
            spool.drop_file(&format!("{id}.json"), text.as_bytes());
            cases.push((id, field, max, value));
        }
    }
    for (id, field, max, value) in &cases {
        let r = spool.wait_result(id);
        assert_eq!(r["status"], "rejected", "{field} = {value}: {r}");
        let err = r["error"].as_str().unwrap_or_default();
        let want = format!("\"{field}\" must be a whole number from 1 to {max}");
        assert!(
            err.contains(&want),
            "{field} = {value}: {err:?} lacks {want:?}"
        );
        assert_eq!(r["log"], Value::Null, "{field} = {value}: it never ran");
        assert!(
            spool
                .names("archive/rejected")
                .iter()
                .any(|n| n.starts_with(&format!("{id}.json."))),
            "{id}: the file is kept in archive/rejected/"
        );
        assert_same_worker(&mut w, pid);
    }
    assert!(spool.names("pending").is_empty());
    assert!(spool.names("running").is_empty());

    // The largest allowed values run, and so does an ordinary job.
    spool.drop_file(
        "longest.json",
        format!(r#"{{"command":"echo ran","timeout_secs":{MAX_TIMEOUT_SECS}}}"#).as_bytes(),
    );
    spool.drop_file(
        "last-attempt.json",
        format!(r#"{{"command":"echo ran","attempt":{MAX_ATTEMPTS}}}"#).as_bytes(),
    );
    spool.submit("ordinary", "echo ran");
    for id in ["longest", "last-attempt", "ordinary"] {
        let r = spool.wait_result(id);
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        assert_eq!(spool.log_of(&r), "ran\n");
    }
    assert_eq!(
        spool.result("last-attempt").unwrap()["attempt"],
        MAX_ATTEMPTS
    );
    assert_same_worker(&mut w, pid);
}

#[test]
fn configured_durations_at_their_maximum_run_jobs_and_stop_cleanly() {
    let spool = Spool::new();
    let max = format!("\"{MAX_TIMEOUT_SECS}s\"");
    let config = format!(
        "default_timeout = {max}\nkill_grace = {max}\nstop_grace = {max}\n\
         rescan_interval = {max}\nstale_pending_after = {max}\n\
         max_attempts = {MAX_ATTEMPTS}\nmax_job_bytes = 67108864\nlog_max_bytes = 1099511627776\n"
    );
    let mut w = spool.start(&config);
    let pid = w.pid();
    spool.submit("default-timeout", "echo ran");
    spool.submit_json(
        "longest-timeout",
        serde_json::json!({"command": "echo ran", "timeout_secs": MAX_TIMEOUT_SECS}),
    );
    for id in ["default-timeout", "longest-timeout"] {
        let r = spool.wait_result(id);
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
    }
    assert_same_worker(&mut w, pid);
    w.signal(Signal::SIGTERM);
    assert!(w.wait_exit().success(), "{}", w.log());
}

#[test]
fn configured_values_out_of_range_are_refused_with_key_and_range() {
    let spool = Spool::new();
    let cases = [
        (
            "default_timeout = \"200years\"\n",
            "default_timeout must be at most",
        ),
        (
            "stop_grace = \"3153600001s\"\n",
            "stop_grace must be at most",
        ),
        (
            "max_parallel = 100000\n",
            "max_parallel must be from 1 to 1024",
        ),
        (
            "max_job_bytes = 18446744073709551615\n",
            "max_job_bytes must be from 1 to",
        ),
        (
            "max_attempts = 1000\n",
            "max_attempts must be from 1 to 100",
        ),
        (
            "log_retention_days = 4294967295\n",
            "log_retention_days must be from 1 to",
        ),
        ("max_parallel = -1\n", ":1:16: "),
        ("kill_grace = 1.5\n", ":1:14: "),
    ];
    for (i, (text, want)) in cases.into_iter().enumerate() {
        let path = spool.scratch(&format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["--config", path.to_str().unwrap(), "config", "check"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(err.contains(want), "{text}: {err:?} lacks {want:?}");
        // The worker refuses it as well.
        let stderr = spool.scratch(&format!("bad-{i}.stderr"));
        let mut worker = KillOnDrop(
            Command::new(BIN)
                .args(["--config", path.to_str().unwrap(), "run", "--spool"])
                .arg(spool.root())
                .env_remove("NOTIFY_SOCKET")
                .env_remove("AI_CMD_EXECUTOR_SPOOL")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .unwrap(),
        );
        let status = wait_for("the worker to refuse its config", DEADLINE, || {
            worker.0.try_wait().unwrap()
        });
        let err = std::fs::read_to_string(&stderr).unwrap();
        assert!(!status.success(), "{text}: the worker ran");
        assert!(err.contains(want), "{text}: {err:?} lacks {want:?}");
    }
}

/// A process that is killed (and reaped) if the test leaves it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A value for a numeric field, as JSON text, and whether the field accepts
/// it (a JSON integer from 1 to `max`, or `null`).
fn numeric_value(max: u64) -> impl Strategy<Value = (String, bool)> {
    prop_oneof![
        (1..=max.min(30)).prop_map(|n| (n.to_string(), true)),
        (1..=max).prop_map(|n| (n.to_string(), true)),
        any::<u64>().prop_map(move |n| (n.to_string(), (1..=max).contains(&n))),
        any::<i64>().prop_map(move |n| {
            let ok = u64::try_from(n).is_ok_and(|n| (1..=max).contains(&n));
            (n.to_string(), ok)
        }),
        // Debug writes what JSON can read: 1.5, 1e300, -0.0, 5e-324.
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| (format!("{f:?}"), false)),
        "[1-9][0-9]{19,40}".prop_map(|s| (s, false)),
        "-[1-9][0-9]{0,30}".prop_map(|s| (s, false)),
        "[0-9]{1,12}".prop_map(|s| (format!("{s:?}"), false)),
        Just(("null".to_owned(), true)),
        Just(("true".to_owned(), false)),
        Just(("[]".to_owned(), false)),
    ]
}

/// One job file: its text, and whether the worker should run it.
fn job() -> impl Strategy<Value = (String, bool)> {
    let [(timeout, timeout_max), (attempt, attempt_max)] = fields();
    (
        prop::sample::select(vec!["true", "echo hi", "exit 3"]),
        prop::option::of(numeric_value(timeout_max)),
        prop::option::of(numeric_value(attempt_max)),
        any::<bool>(),
    )
        .prop_map(move |(command, t, a, t_first)| {
            let mut parts = vec![format!("\"command\":{command:?}")];
            let mut valid = true;
            let mut fields = vec![];
            if let Some((text, ok)) = t {
                fields.push(format!("\"{timeout}\":{text}"));
                valid &= ok;
            }
            if let Some((text, ok)) = a {
                fields.push(format!("\"{attempt}\":{text}"));
                valid &= ok;
            }
            if !t_first {
                fields.reverse();
            }
            parts.extend(fields);
            (format!("{{{}}}", parts.join(",")), valid)
        })
}

#[test]
fn arbitrary_numbers_through_the_whole_job_path_always_end_in_a_result() {
    let spool = Spool::new();
    let mut w = spool.start("max_parallel = 2\n");
    let pid = w.pid();
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(job(), 1..6), |jobs| {
        let mut ids = Vec::new();
        for (text, valid) in &jobs {
            let id = format!("p{}", SEQ.fetch_add(1, Ordering::Relaxed));
            spool.drop_file(&format!("{id}.json"), text.as_bytes());
            ids.push((id, text, *valid));
        }
        for (id, text, valid) in ids {
            let r = wait_for(&format!("the result of {text}"), DEADLINE, || {
                spool.result(&id)
            });
            let status = r["status"].as_str().unwrap_or_default().to_owned();
            if valid {
                prop_assert!(
                    status == "succeeded" || status == "failed",
                    "{} ran as {}",
                    text,
                    r
                );
            } else {
                prop_assert_eq!(&status, "rejected", "{} gave {}", text, r);
                let err = r["error"].as_str().unwrap_or_default();
                prop_assert!(
                    err.contains("must be a whole number from 1 to"),
                    "{}: {}",
                    text,
                    err
                );
            }
        }
        // A worker that exited is a zombie until the harness reaps it.
        if !alive(pid) {
            return Err(TestCaseError::fail(format!(
                "the worker did not survive {jobs:?}"
            )));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(spool.names("pending").is_empty());
    assert!(spool.names("running").is_empty());
    assert_same_worker(&mut w, pid);
}

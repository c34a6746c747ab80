//! Bad input never stops the worker and never loses data: each case ends as
//! a `rejected` result with a clear error (the file kept in
//! `archive/rejected/`), or, where no id can be derived, is archived with a
//! logged reason. The worker runs a good job after each.

mod common;

use std::fs;
use std::os::unix::fs::symlink;

use common::{DEADLINE, Spool, wait_for};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::mkfifo;

/// Asserts `id` was rejected with an error containing `want`, that its
/// file was kept in the archive, and that the worker still runs jobs.
fn assert_rejected(spool: &Spool, id: &str, want: &str) {
    let r = spool.wait_result(id);
    assert_eq!(r["status"], "rejected", "{id}: {r}");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains(want), "{id}: error {err:?} lacks {want:?}");
    assert_eq!(r["exit_code"], serde_json::Value::Null);
    assert_eq!(r["log"], serde_json::Value::Null);
    assert!(
        spool
            .names("archive/rejected")
            .iter()
            .any(|n| n.starts_with(&format!("{id}."))),
        "{id}: file not kept in archive/rejected: {:?}",
        spool.names("archive/rejected")
    );
}

fn assert_still_working(spool: &Spool, tag: &str) {
    let id = format!("alive-{tag}");
    spool.submit(&id, "echo ok");
    assert_eq!(spool.wait_result(&id)["status"], "succeeded");
}

#[test]
fn each_kind_of_bad_input_is_rejected_and_kept() {
    let spool = Spool::new();
    let _w = spool.start("max_job_bytes = 4096\n");
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "malformed.json",
            b"{\"command\": \"echo",
            "invalid job JSON",
        ),
        (
            "unknown.json",
            br#"{"command":"true","comand":"x"}"#,
            "unknown field `comand`",
        ),
        (
            "missing.json",
            br#"{"timeout_secs":5}"#,
            "missing field `command`",
        ),
        ("wrongtype.json", br#"{"command":["ls"]}"#, "invalid type"),
        ("empty.json", b"", "empty"),
        ("empty-script.sh", b"", "empty"),
        (
            "binary.json",
            b"{\"command\":\"echo \xff\xfe\"}",
            "not valid UTF-8",
        ),
        ("binary-script.sh", b"echo \xc3\x28\n", "not valid UTF-8"),
        (
            "relcwd.json",
            br#"{"command":"true","cwd":"some/dir"}"#,
            "absolute",
        ),
    ];
    for (name, bytes, want) in cases {
        spool.drop_file(name, bytes);
        let id = name.rsplit_once('.').unwrap().0;
        assert_rejected(&spool, id, want);
        let kept = spool
            .names("archive/rejected")
            .into_iter()
            .find(|n| n.starts_with(&format!("{name}.")))
            .unwrap();
        assert_eq!(
            fs::read(spool.path(&format!("archive/rejected/{kept}"))).unwrap(),
            *bytes,
            "{name}: content kept"
        );
    }
    assert_still_working(&spool, "after-content");

    spool.drop_file(
        "huge.json",
        format!(r#"{{"command":"echo {}"}}"#, "x".repeat(5000)).as_bytes(),
    );
    assert_rejected(&spool, "huge", "at most 4096");

    symlink("/etc/hostname", spool.path("pending/link.json")).unwrap();
    assert_rejected(&spool, "link", "symbolic link");
    assert_eq!(
        fs::read_link(
            spool.path("archive/rejected").join(
                spool
                    .names("archive/rejected")
                    .into_iter()
                    .find(|n| n.starts_with("link."))
                    .unwrap()
            )
        )
        .unwrap()
        .to_str(),
        Some("/etc/hostname"),
        "the link itself is kept, its target untouched"
    );

    fs::create_dir(spool.path("pending/dir.json")).unwrap();
    assert_rejected(&spool, "dir", "directory");

    mkfifo(
        &spool.path("pending/fifo.json"),
        Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert_rejected(&spool, "fifo", "not a regular file");
    assert_still_working(&spool, "after-types");
}

#[test]
fn names_without_an_id_are_archived_with_a_reason() {
    let spool = Spool::new();
    let w = spool.start("");
    let long = format!("{}.json", "a".repeat(200));
    for name in [".hidden.json", long.as_str(), "notes.txt", "bad id.json"] {
        spool.drop_file(name, br#"{"command":"true"}"#);
    }
    wait_for("four files archived", DEADLINE, || {
        (spool.names("archive/rejected").len() == 4).then_some(())
    });
    let log = w.log();
    assert!(log.contains("the id starts with a dot"), "{log}");
    assert!(log.contains("200 characters long"), "{log}");
    assert!(log.contains("ends neither in .json nor in .sh"), "{log}");
    assert!(log.contains("contains ' '"), "{log}");
    assert!(spool.names("pending").is_empty());
    assert!(
        spool.names("completed") == [".held-results"],
        "no result without an id"
    );
    assert_still_working(&spool, "after-names");
}

#[test]
fn a_file_that_vanishes_before_it_is_read_gets_a_result() {
    let spool = Spool::new();
    let w = spool.start("");
    // Freeze the worker so the event is queued before the file goes.
    w.signal(Signal::SIGSTOP);
    spool.submit("ghost", "echo boo");
    fs::remove_file(spool.path("pending/ghost.json")).unwrap();
    w.signal(Signal::SIGCONT);
    assert_rejected_vanished(&spool);
    assert_still_working(&spool, "after-ghost");
}

fn assert_rejected_vanished(spool: &Spool) {
    let r = spool.wait_result("ghost");
    assert_eq!(r["status"], "rejected");
    assert!(r["error"].as_str().unwrap().contains("vanished"), "{r}");
}

#[test]
fn a_flood_of_garbage_does_not_stop_good_jobs() {
    let spool = Spool::new();
    let _w = spool.start("");
    for i in 0..200 {
        spool.drop_file(&format!("junk-{i}.json"), b"\x00\x01garbage");
    }
    spool.submit("good", "echo fine");
    assert_eq!(spool.wait_result("good")["status"], "succeeded");
    wait_for("every junk file rejected", DEADLINE, || {
        (spool.names("archive/rejected").len() == 200).then_some(())
    });
    assert!(spool.names("pending").is_empty());
}

/// A job written straight into `pending/` and still open is not bad input:
/// neither the periodic rescan nor the first scan of a starting worker
/// rejects it half-written; it runs once its writer closes it.
#[test]
fn a_direct_drop_still_being_written_waits_for_its_writer() {
    use std::io::Write;
    let spool = Spool::new();
    let config = "rescan_interval = \"1s\"\n";
    let rescans = |log: &str| log.matches("rescanned pending/").count();

    // Written while the worker runs: its creation is seen.
    let w = spool.start(config);
    let mut half = fs::File::create(spool.path("pending/live.json")).unwrap();
    half.write_all(b"{\"command\": \"echo li").unwrap();
    let at = rescans(&w.log());
    wait_for("two rescans", DEADLINE, || {
        (rescans(&w.log()) >= at + 2).then_some(())
    });
    assert!(spool.result("live").is_none(), "rejected half-written");
    half.write_all(b"ve\"}").unwrap();
    drop(half);
    let r = spool.wait_result("live");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(spool.log_of(&r), "live\n");
    drop(w);

    // Being written when the worker starts: the first scan finds it.
    let mut half = fs::File::create(spool.path("pending/early.json")).unwrap();
    half.write_all(b"{\"command\": \"echo ea").unwrap();
    half.flush().unwrap();
    let w = spool.start(config);
    let at = rescans(&w.log());
    wait_for("a rescan", DEADLINE, || {
        (rescans(&w.log()) > at).then_some(())
    });
    assert!(spool.result("early").is_none(), "rejected half-written");
    half.write_all(b"rly\"}").unwrap();
    drop(half);
    let r = spool.wait_result("early");
    assert_eq!(r["status"], "succeeded", "{r}");

    // Bad input that its writer closed is still rejected at once.
    fs::write(spool.path("pending/truncated.json"), "{\"command\": ").unwrap();
    assert_rejected(&spool, "truncated", "invalid job JSON");
    drop(w);
}

/// A finished but bad job file renamed into `pending/` just before the
/// worker began to watch gets no event; its first scan finds it changed
/// moments ago and leaves it as possibly half-written. It is looked at
/// again once settled (5 s), not at the next periodic rescan (5 minutes
/// by default), and rejected.
#[test]
fn a_bad_file_found_by_the_first_scan_is_rejected_once_settled() {
    let spool = Spool::new();
    ai_cmd_executor::spool::Spool::new(spool.root())
        .ensure_layout()
        .unwrap();
    fs::write(
        spool.path("tmp/early-bad"),
        r#"{"command":"true","no_such_key":1}"#,
    )
    .unwrap();
    fs::rename(
        spool.path("tmp/early-bad"),
        spool.path("pending/early-bad.json"),
    )
    .unwrap();
    let _w = spool.start("");
    assert_rejected(&spool, "early-bad", "unknown field `no_such_key`");
}

/// A `cwd` the job cannot run in is rejected with the directory named, not
/// reported as the shell failing to start; `submit --wait` exits 126.
#[test]
fn an_unusable_cwd_is_rejected_naming_the_directory() {
    let spool = Spool::new();
    let _w = spool.start("");
    let missing = spool.scratch("no-such-dir");
    spool.submit_json(
        "cwd-missing",
        serde_json::json!({"command": "true", "cwd": missing}),
    );
    assert_rejected(
        &spool,
        "cwd-missing",
        &format!("\"cwd\" {} does not exist", missing.display()),
    );
    let file = spool.scratch("a-file");
    fs::write(&file, "").unwrap();
    spool.submit_json(
        "cwd-file",
        serde_json::json!({"command": "true", "cwd": file}),
    );
    assert_rejected(
        &spool,
        "cwd-file",
        &format!("\"cwd\" {} is not a directory", file.display()),
    );
    let out = spool.cli(&[
        "submit",
        "--id",
        "cwd-cli",
        "--cwd",
        missing.to_str().unwrap(),
        "--wait",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(126));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("does not exist"), "{said}");
    assert_still_working(&spool, "cwd");
}

//! Trying hard to break it: a crash storm, many writers at once, and an
//! inotify queue overflow. Every job must end with exactly one terminal
//! result, and none may run twice unless it asked to be retried.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Spool, wait_for};
use serde_json::json;

/// Ledger lines (`<id> <attempt>`) per id.
fn ledger(path: &std::path::Path) -> HashMap<String, Vec<u32>> {
    let mut m: HashMap<String, Vec<u32>> = HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let mut it = line.split_whitespace();
        if let (Some(id), Some(a)) = (it.next(), it.next()) {
            m.entry(id.to_owned())
                .or_default()
                .push(a.parse().unwrap_or(0));
        }
    }
    m
}

/// Waits until every id in `ids` has a result; returns them.
fn all_results(
    spool: &Spool,
    ids: &[String],
    deadline: Duration,
) -> HashMap<String, serde_json::Value> {
    let mut got = HashMap::new();
    wait_for(&format!("{} results", ids.len()), deadline, || {
        for id in ids {
            if !got.contains_key(id)
                && let Some(r) = spool.result(id)
            {
                got.insert(id.clone(), r);
            }
        }
        (got.len() == ids.len()).then_some(())
    });
    got
}

#[test]
fn crash_storm_loses_nothing_and_runs_nothing_twice() {
    let spool = Spool::new();
    let config = "max_parallel = 4\nkill_grace = \"100ms\"\nmax_attempts = 3\n";
    let mut w = spool.start(config);
    let ledger_path = spool.scratch("ledger");
    let mut ids = Vec::new();
    let mut retry = HashMap::new();
    for i in 0..2000 {
        let id = format!("storm-{i:04}");
        let note = format!(
            "echo \"$AI_CMD_EXECUTOR_JOB_ID $AI_CMD_EXECUTOR_ATTEMPT\" >> {}",
            ledger_path.display()
        );
        let job = match i % 20 {
            0..=13 => json!({"command": format!("{note}; true")}),
            14 | 15 => json!({"command": format!("{note}; sleep 0.2")}),
            16 | 17 => json!({"command": format!("{note}; exit 3")}),
            18 => json!({"command": format!("{note}; sleep 5"), "timeout_secs": 1}),
            _ => json!({"command": format!("{note}; sleep 0.3"), "on_interrupt": "retry"}),
        };
        retry.insert(id.clone(), i % 20 == 19);
        spool.submit_json(&id, job);
        ids.push(id);
    }
    // Kill -9 at pseudo-random moments (a fixed seed keeps runs comparable),
    // restarting each time; the waits are the fault timing, not
    // synchronisation.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        w.kill9();
        w = spool.start(config);
    }
    let results = all_results(&spool, &ids, Duration::from_secs(600));
    let runs = ledger(&ledger_path);
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let r = &results[id];
        let status = r["status"].as_str().unwrap().to_owned();
        *by_status.entry(status.clone()).or_default() += 1;
        let n = runs.get(id).map_or(0, Vec::len);
        if retry[id] {
            let attempt = r["attempt"].as_u64().unwrap() as usize;
            assert!(
                n <= attempt && attempt <= 3,
                "{id}: ran {n} time(s), result attempt {attempt}: {r}"
            );
        } else {
            assert!(n <= 1, "{id} ran {n} times without asking for a retry: {r}");
            if n == 0 {
                assert_eq!(status, "interrupted", "{id} never ran but is {status}");
            }
        }
        assert_ne!(status, "rejected", "{id}: {r}");
    }
    assert!(
        fs::read_dir(spool.path("pending"))
            .unwrap()
            .next()
            .is_none(),
        "nothing left pending"
    );
    wait_for("running/ to empty", Duration::from_secs(30), || {
        fs::read_dir(spool.path("running"))
            .unwrap()
            .next()
            .is_none()
            .then_some(())
    });
    let mut counts: Vec<_> = by_status.into_iter().collect();
    counts.sort();
    // Past the harness capture: the counts are the point of the test.
    let _ = writeln!(
        std::io::stderr(),
        "crash storm: 2000 jobs, 20 SIGKILLs: {counts:?}"
    );
}

#[test]
fn many_writers_at_once_through_the_cli_and_raw_renames() {
    let spool = Spool::new();
    let _w = spool.start("max_parallel = 2\n");
    let ledger_path = spool.scratch("ledger");
    let root = spool.root();
    let mut children = Vec::new();
    for p in 0..8 {
        let script = if p % 2 == 0 {
            format!(
                "for i in $(seq 0 499); do {BIN} --spool {root} submit --id cli-{p}-$i -- 'echo cli-{p}-'$i' 1 >> {ledger}' >/dev/null || exit 1; done",
                root = root.display(),
                ledger = ledger_path.display()
            )
        } else {
            format!(
                "for i in $(seq 0 499); do t=$(mktemp {root}/tmp/w.XXXXXX) && printf '{{\"command\": \"echo raw-{p}-%s 1 >> {ledger}\"}}' $i > $t && chmod 640 $t && mv $t {root}/pending/raw-{p}-$i.json || exit 1; done",
                root = root.display(),
                ledger = ledger_path.display()
            )
        };
        children.push(Command::new("bash").args(["-c", &script]).spawn().unwrap());
    }
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a writer failed");
    }
    let ids: Vec<String> = (0..8)
        .flat_map(|p| {
            (0..500).map(move |i| format!("{}-{p}-{i}", if p % 2 == 0 { "cli" } else { "raw" }))
        })
        .collect();
    let results = all_results(&spool, &ids, Duration::from_secs(600));
    assert!(results.values().all(|r| r["status"] == "succeeded"));
    let runs = ledger(&ledger_path);
    assert_eq!(runs.len(), 4000);
    assert!(
        runs.values().all(|v| v.len() == 1),
        "every job ran exactly once"
    );
}

#[test]
fn inotify_overflow_is_recovered_by_a_rescan() {
    let knob = "/proc/sys/fs/inotify/max_queued_events";
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !common::sandbox::required(),
            "the overflow test needs root in CI"
        );
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: inotify overflow test SKIPPED: not root"
        );
        return;
    }
    let spool = Spool::new();
    // The limit is taken when the worker creates its inotify instance;
    // it is restored at once, so nothing else on the machine sees it.
    let old = fs::read_to_string(knob).unwrap();
    fs::write(knob, "64").unwrap();
    let started = std::panic::catch_unwind(|| spool.start("max_parallel = 2\n"));
    fs::write(knob, old.trim()).unwrap();
    let mut w = started.unwrap();
    let ids: Vec<String> = (0..5000).map(|i| format!("burst-{i}")).collect();
    // The worker drains events faster than one writer makes them; stopped
    // for the burst, its 64-event queue is sure to overflow.
    w.signal(nix::sys::signal::Signal::SIGSTOP);
    for id in &ids {
        spool.submit(id, "true");
    }
    w.signal(nix::sys::signal::Signal::SIGCONT);
    all_results(&spool, &ids, Duration::from_secs(600));
    w.wait_log("inotify queue overflowed; rescanning pending/");
}

/// Unmounts a test's tmpfs when the test ends, however it ends.
struct Mounted(std::path::PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_loses_no_result_and_is_recovered_from() {
    let Some((spool, _mounted)) = tiny_spool("disk-full") else {
        return;
    };
    let root = spool.root();

    let mut w = spool.start("");
    spool.submit("before", "echo before");
    let before = spool.wait_result("before");
    assert_eq!(before["status"], "succeeded");

    // Queue jobs while the worker is frozen, then fill the disk.
    w.signal(nix::sys::signal::Signal::SIGSTOP);
    let ids: Vec<String> = (0..10).map(|i| format!("during-{i}")).collect();
    for id in &ids {
        spool.submit(id, "echo during");
    }
    let filler = root.join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    w.signal(nix::sys::signal::Signal::SIGCONT);
    wait_for(
        "the worker to report the full disk",
        Duration::from_secs(60),
        || {
            let log = w.log();
            (log.contains("No space left on device")).then_some(())
        },
    );
    assert!(!w.exited(), "a full disk does not stop the worker");
    assert_eq!(
        spool.result("before").unwrap(),
        before,
        "a result written before is intact"
    );

    // Space comes back: everything queued runs, with no help.
    fs::remove_file(&filler).unwrap();
    let results = all_results(&spool, &ids, Duration::from_secs(120));
    for (id, r) in &results {
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        // A job that ran while the disk was full lost its output, and its
        // result says so.
        let log_lost = r["error"]
            .as_str()
            .is_some_and(|e| e.contains("writing its log failed"));
        assert!(log_lost || spool.log_of(r) == "during\n", "{id}: {r}");
    }
    assert!(!w.exited());
}

#[test]
fn unreadable_pending_and_foreign_submitters() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !common::sandbox::required(),
            "the permissions test needs root in CI"
        );
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: permissions test SKIPPED: not root"
        );
        return;
    }
    use std::os::unix::fs::{PermissionsExt, chown};
    const NOBODY: u32 = 65534;

    // pending/ made unreadable under a worker that is not root: it says
    // so, rejects nothing, and runs the job once pending/ is readable again.
    let spool = Spool::new();
    spool.open_to_all();
    fs::create_dir_all(spool.root()).unwrap();
    chown(spool.root(), Some(NOBODY), Some(NOBODY)).unwrap();
    let mut w = spool.start_as("", NOBODY, NOBODY);
    let pending = spool.path("pending");
    fs::set_permissions(&pending, fs::Permissions::from_mode(0o000)).unwrap();
    spool.submit("blocked", "echo through");
    w.wait_log("claiming paused, retrying");
    assert!(
        spool.result("blocked").is_none(),
        "good input is not rejected for the directory's fault"
    );
    fs::set_permissions(&pending, fs::Permissions::from_mode(0o2770)).unwrap();
    let r = spool.wait_result("blocked");
    assert_eq!(r["status"], "succeeded", "{r}");
    drop(w);

    // With submit_group set, a job file owned by someone outside the group
    // is rejected with the reason; root's still runs.
    let spool = Spool::new();
    let _w = spool.start("submit_group = \"root\"\n");
    let tmp = spool.path("tmp/foreign.json");
    fs::write(&tmp, r#"{"command": "echo should not run"}"#).unwrap();
    chown(&tmp, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::rename(&tmp, spool.path("pending/foreign.json")).unwrap();
    let r = spool.wait_result("foreign");
    assert_eq!(r["status"], "rejected");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not in the submit group \"root\""),
        "{r}"
    );
    spool.submit("own", "echo fine");
    assert_eq!(spool.wait_result("own")["status"], "succeeded");
}

/// A small tmpfs as the spool root, for the disk-full tests (root only).
fn tiny_spool(test: &str) -> Option<(Spool, Mounted)> {
    if !nix::unistd::geteuid().is_root() {
        assert!(!common::sandbox::required(), "{test} needs root in CI");
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: {test} SKIPPED: not root (mounts a small tmpfs)"
        );
        return None;
    }
    let spool = Spool::new();
    let root = spool.root();
    fs::create_dir_all(&root).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs");
    let mounted = Mounted(root);
    Some((spool, mounted))
}

/// Fills the file system of `path` with the file `path`.
fn fill(path: &std::path::Path) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    // The last bytes: what a smaller write still finds.
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

/// A job that ran to the end while the disk was full is never recorded
/// `interrupted`, whether its worker stops (SIGTERM) or is killed before
/// space returns: its result is kept in the room reserved for it and
/// written by the next start, before recovery, or when space returns.
#[test]
fn results_held_with_the_disk_full_survive_a_stop_and_a_kill() {
    let Some((spool, _mounted)) = tiny_spool("disk-full-across-a-stop") else {
        return;
    };
    let config = "stop_grace = \"1s\"\nkill_grace = \"1s\"\n";
    let filler = spool.root().join("filler");
    for (round, how) in [("stop", "SIGTERM"), ("kill", "SIGKILL")] {
        let id = format!("ran-{round}");
        let mut w = spool.start(config);
        w.signal(nix::sys::signal::Signal::SIGSTOP);
        spool.submit(&id, "exit 0");
        fill(&filler);
        w.signal(nix::sys::signal::Signal::SIGCONT);
        w.wait_log("recording the result failed");
        assert!(spool.result(&id).is_none());
        if how == "SIGTERM" {
            w.signal(nix::sys::signal::Signal::SIGTERM);
            let status = w.wait_exit();
            assert!(status.success(), "{round}: {status:?}\n{}", w.log());
            // Kept in the reserve; or written, if a retry during the stop
            // or the stop's last try found room (a full tmpfs gives back a
            // page now and then).
            let log = w.log();
            assert!(
                log.contains("kept in completed/.held-results")
                    || log.contains("written before stopping")
                    || spool.result(&id).is_some(),
                "{log}"
            );
        } else {
            w.kill9();
        }
        drop(w);

        // The next start, with the disk still full: the job is not taken
        // for interrupted, and its file in running/ waits for the result.
        fill(&filler);
        let mut w = spool.start(config);
        if spool.result(&id).is_none() {
            w.wait_log("recording the result failed");
            assert!(
                spool.result(&id).is_none(),
                "{round}: {:?}",
                spool.result(&id)
            );
            assert_eq!(spool.names("running"), [format!("{id}.json")], "{round}");
        }

        // Space returns: the job's own result, and running/ settled, with
        // no restart.
        fs::remove_file(&filler).unwrap();
        let r = spool.wait_result(&id);
        assert_eq!(r["status"], "succeeded", "{round}: {r}");
        assert_eq!(r["exit_code"], 0, "{round}: {r}");
        wait_for("running/ to be settled", common::DEADLINE, || {
            spool.names("running").is_empty().then_some(())
        });
        spool.submit(&format!("after-{round}"), "true");
        assert_eq!(
            spool.wait_result(&format!("after-{round}"))["status"],
            "succeeded"
        );
        drop(w);
    }

    // Space back before the next start: the kept result goes in before
    // recovery looks at running/.
    let mut w = spool.start(config);
    w.signal(nix::sys::signal::Signal::SIGSTOP);
    spool.submit("ran-restart", "exit 0");
    fill(&filler);
    w.signal(nix::sys::signal::Signal::SIGCONT);
    w.wait_log("recording the result failed");
    w.kill9();
    drop(w);
    fs::remove_file(&filler).unwrap();
    let w = spool.start(config);
    let r = spool.wait_result("ran-restart");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(
        w.log().contains("wrote the result the last worker kept"),
        "{}",
        w.log()
    );
    assert!(spool.names("running").is_empty());
}

//! Tier 2: cancelling jobs through the spool's `cancel/` directory: a
//! pending job is withdrawn, a running one stopped with everything it
//! started, only by its submitter or root, and a cancel racing a job's
//! own end gives exactly one result.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use ai_cmd_executor::client::{Client, ClientError};
use common::{DEADLINE, Gate, Spool, alive, wait_for};
use nix::unistd::Pid;

fn pids_in(dir: &std::path::Path) -> Vec<Pid> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_pending_job_is_withdrawn_and_a_running_one_stopped_with_all_it_started() {
    let spool = Spool::new();
    let _w = spool.start("max_parallel = 1\nkill_grace = \"1s\"\n");
    let pids = spool.scratch("pids");
    fs::create_dir_all(&pids).unwrap();
    let gate = Gate::new(&spool);
    // It starts what would outlive it: a new session, a nohup'd child, and
    // a child that ignores TERM; each writes its pid.
    let tree = format!(
        "(setsid sh -c 'echo $$ > {p}/$$; exec sleep 1000') & \
         (nohup sh -c 'echo $$ > {p}/$$; exec sleep 1000' >/dev/null 2>&1 &) ; \
         (trap '' TERM; sh -c 'trap \"\" TERM; echo $$ > {p}/$$; while :; do sleep 1; done') & \
         {gated}",
        p = pids.display(),
        gated = gate.command("tree")
    );
    spool.submit("tree", &tree);
    gate.wait_started(1);
    wait_for("its three children", DEADLINE, || {
        (pids_in(&pids).len() == 3).then_some(())
    });
    spool.submit("queued", "echo ran > /dev/null");

    // Pending: withdrawn, never run.
    let out = spool.cli(&["cancel", "queued"]);
    assert!(out.status.success(), "{out:?}");
    let q = spool.wait_result("queued");
    assert_eq!(q["status"], "cancelled", "{q}");
    assert_eq!(q["log"], serde_json::Value::Null, "it never ran: {q}");
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(q["cancelled_by"]["uid"], me, "{q}");
    assert!(
        spool
            .names("archive/cancelled")
            .iter()
            .any(|n| n.starts_with("queued.json.")),
        "{:?}",
        spool.names("archive/cancelled")
    );

    // Running: stopped, and its whole tree with it.
    let out = spool.cli(&["cancel", "tree", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["cancelled_by"]["uid"], me, "{r}");
    assert!(
        r["error"].as_str().unwrap().starts_with("cancelled by "),
        "{r}"
    );
    for pid in pids_in(&pids) {
        wait_for("the job's children to be gone", DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
    // `wait` reports it with the cancelled exit code.
    let out = spool.cli(&["wait", "tree"]);
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    // Nothing left to cancel, or nothing known.
    let out = spool.cli(&["cancel", "tree"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already finished"),
        "{out:?}"
    );
    let out = spool.cli(&["cancel", "no-such-job"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    gate.open();
}

#[test]
fn only_the_submitter_or_root_may_cancel() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("NOTICE: skipped: needs root to act as another user");
        return;
    }
    let spool = Spool::new();
    spool.open_to_all();
    let _w = spool.start("max_parallel = 1\n");
    let gate = Gate::new(&spool);
    spool.submit("mine", &gate.command("mine"));
    gate.wait_started(1);
    let root = spool.root();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["tmp", "cancel"] {
        fs::set_permissions(spool.path(d), fs::Permissions::from_mode(0o1777)).unwrap();
    }
    // As a member of the spool's group sees them.
    for d in ["running", "completed"] {
        fs::set_permissions(spool.path(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The CLI refuses another user at once.
    let out = std::process::Command::new(common::BIN)
        .args(["--spool", root.to_str().unwrap(), "cancel", "mine"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only its submitter or root may cancel it"),
        "{err}"
    );
    // A request planted by hand is refused by the worker: the job runs on.
    // Owned by nobody before the worker can see it: made aside, renamed in.
    let req = spool.path("cancel/mine");
    let staged = spool.path("tmp/cancel-mine");
    fs::write(&staged, "").unwrap();
    nix::unistd::chown(&staged, Some(65534.into()), Some(65534.into())).unwrap();
    fs::rename(&staged, &req).unwrap();
    let mut w = _w;
    w.wait_log("cancel refused");
    assert!(!req.exists(), "the request is consumed");
    assert!(spool.result("mine").is_none(), "it runs on");
    gate.open();
    let r = spool.wait_result("mine");
    assert_eq!(r["status"], "succeeded", "{r}");
}

/// What no `close` follows in `cancel/` (a symbolic link, a FIFO, a
/// directory) is removed as soon as it appears, and a hard link (which
/// would speak as the owner of the file it shares) cancels nothing: the
/// job runs on, and the linked file is untouched.
#[test]
fn links_and_odd_files_in_cancel_are_removed_and_cancel_nothing() {
    let spool = Spool::new();
    let mut w = spool.start("max_parallel = 1\n");
    let gate = Gate::new(&spool);
    spool.submit("kept", &gate.command("kept"));
    gate.wait_started(1);
    let target = spool.scratch("someone-elses-file");
    fs::write(&target, "keep me").unwrap();
    let req = spool.path("cancel/kept");
    std::os::unix::fs::symlink(&target, &req).unwrap();
    wait_for("the link to be removed", DEADLINE, || {
        (fs::symlink_metadata(&req).is_err()).then_some(())
    });
    nix::unistd::mkfifo(&req, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    wait_for("the FIFO to be removed", DEADLINE, || {
        (fs::symlink_metadata(&req).is_err()).then_some(())
    });
    fs::hard_link(&target, &req).unwrap();
    w.wait_log("cancel/kept has other hard links");
    assert!(fs::symlink_metadata(&req).is_err(), "the link is consumed");
    assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
    assert!(spool.result("kept").is_none(), "it runs on");
    gate.open();
    let r = spool.wait_result("kept");
    assert_eq!(r["status"], "succeeded", "{r}");
}

use std::os::unix::process::CommandExt;

/// 200 jobs, each cancelled at a random moment of its life (queued,
/// starting, running, ending): each gets exactly one result, cancelled or
/// its own, and nothing a job started survives.
#[test]
fn cancels_racing_the_jobs_give_one_result_each() {
    let spool = Spool::new();
    let w = spool.start("max_parallel = 2\nkill_grace = \"1s\"\n");
    let pids = spool.scratch("pids");
    fs::create_dir_all(&pids).unwrap();
    let client = Client::new(spool.root());
    let n = 200;
    // A cheap pseudo-random sequence: the test is the same every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("race-{i:03}");
        let ms = next() % 40;
        spool.submit(
            &id,
            &format!(
                "sleep 5 & echo $! > {p}/$!; sleep 0.{ms:03}",
                p = pids.display()
            ),
        );
        ids.push(id);
        if next() % 3 == 0 {
            std::thread::sleep(Duration::from_millis(next() % 15));
        }
        // Cancel an earlier job, at whatever point it has reached.
        let k = (next() as usize) % ids.len();
        match client.cancel(&ids[k].parse().unwrap()) {
            Ok(()) | Err(ClientError::Finished(_)) => {}
            Err(e) => panic!("cancel {}: {e}", ids[k]),
        }
    }
    let t0 = Instant::now();
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let r = spool.wait_result(id);
        let s = r["status"].as_str().unwrap().to_owned();
        assert!(s == "succeeded" || s == "cancelled", "{r}");
        *statuses.entry(s).or_default() += 1;
        assert!(spool.logs_of(id).len() <= 1, "{id} ran twice");
    }
    assert!(t0.elapsed() < Duration::from_secs(120));
    // Exactly one result each: one end of a run or one withdrawal, and no
    // other record (a rejection of a vanished file) for any id.
    let log = w.log();
    for id in &ids {
        let ends = log.matches(&format!("job {id} finished")).count()
            + log
                .matches(&format!("pending: withdrawn cmd_id={id}"))
                .count();
        assert_eq!(ends, 1, "{id}: {ends} results\n{log}");
        assert!(!log.contains(&format!("job {id} rejected")), "{id}\n{log}");
    }
    assert!(
        statuses.get("cancelled").copied().unwrap_or(0) > 20,
        "{statuses:?}"
    );
    // Whatever the jobs left running went with them.
    for pid in pids_in(&pids) {
        wait_for("the jobs' background sleeps to be gone", DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
}

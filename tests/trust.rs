//! Tier 2: root's tools in a spool where a job or a member planted links.
//!
//! The spool belongs to an unprivileged user (here `nobody`, as the service
//! user on an installed host), who can replace anything in it. Run as root,
//! `cleanup`, `ensure-running` and `diagnose` must act as that user, follow
//! no link, leave each link's target exactly as it was, and name the link.
//! These tests need root; elsewhere they say SKIPPED (and fail in CI, which
//! runs as root).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{DEADLINE, Spool, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid};

const NOBODY: u32 = 65534;

fn as_root(test: &str) -> bool {
    if Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root, and CI runs as root"
    );
    eprintln!("SKIPPED {test}: root's tools are tested as root");
    false
}

/// A spool laid out and owned by `nobody`, reachable by it.
fn nobody_spool() -> Spool {
    let spool = Spool::new();
    spool.open_to_all();
    ai_cmd_executor::spool::Spool::new(spool.root())
        .ensure_layout()
        .expect("layout");
    chown_tree(&spool.root(), NOBODY);
    spool
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).expect("chown");
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for e in fs::read_dir(path).unwrap().flatten() {
            chown_tree(&e.path(), id);
        }
    }
}

/// Inode, mode, owner, group, modification and change times, content.
type State = (u64, u32, u32, u32, [i64; 4], Vec<u8>);

/// A root-owned directory outside the spool, with a secret file, both old:
/// what an attacker would point a link at (`/etc` on a real host).
struct Victim {
    dir: PathBuf,
    before: Vec<(PathBuf, State)>,
}

impl Victim {
    fn new(spool: &Spool) -> Victim {
        let dir = spool.scratch("victim");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let secret = dir.join("secret");
        fs::write(&secret, "root's secret\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(400 * 86_400);
        fs::File::options()
            .write(true)
            .open(&secret)
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(old))
            .unwrap();
        let mut v = Victim {
            dir,
            before: Vec::new(),
        };
        v.before = v.state();
        v
    }

    fn secret(&self) -> PathBuf {
        self.dir.join("secret")
    }

    fn state(&self) -> Vec<(PathBuf, State)> {
        let mut paths = vec![self.dir.clone()];
        let mut names: Vec<_> = fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        paths.extend(names);
        paths
            .into_iter()
            .map(|p| {
                let m = fs::symlink_metadata(&p).unwrap();
                let content = if m.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                (
                    p,
                    (
                        m.ino(),
                        m.mode(),
                        m.uid(),
                        m.gid(),
                        [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()],
                        content,
                    ),
                )
            })
            .collect()
    }

    /// Owner, mode, content, times and the list of names: all unchanged.
    fn assert_untouched(&self) {
        assert_eq!(self.state(), self.before, "the link's target changed");
    }
}

/// Replaces the spool's directory `name` with a link to `to`, as a job
/// would (`mv tmp tmp.old && ln -s /etc tmp`).
fn plant_dir_link(spool: &Spool, name: &str, to: &Path) {
    let p = spool.path(name);
    fs::rename(&p, spool.path(&format!("{name}.old"))).unwrap();
    symlink(to, &p).unwrap();
    std::os::unix::fs::lchown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn cleanup_as_root_works_as_the_owner_and_follows_no_link() {
    if !as_root("cleanup_as_root_works_as_the_owner_and_follows_no_link") {
        return;
    }
    let spool = nobody_spool();
    let victim = Victim::new(&spool);
    let cfg = spool.config("stale_pending_after = \"1ms\"\n");
    // A stale pending job that is a link to the secret, an old log that is
    // a link to it, a shard that is a link to the directory, a hard link
    // where the kernel allows one (to a file of the owner's), and
    // archive/ itself a link to the directory.
    symlink(victim.secret(), spool.path("pending/x.json")).unwrap();
    let shard = spool.path("logs/00");
    fs::create_dir(&shard).unwrap();
    symlink(victim.secret(), shard.join("a@20200101T000000.000000Z.log")).unwrap();
    symlink(&victim.dir, spool.path("logs/01")).unwrap();
    let own = spool.path("logs/00/b@20200101T000000.000000Z.log");
    fs::write(&own, "b's output\n").unwrap();
    fs::hard_link(&own, spool.path("completed/b.hard")).unwrap();
    chown_tree(&spool.root(), NOBODY);
    plant_dir_link(&spool, "archive", &victim.dir);

    let out = spool.cli(&["--config", cfg.to_str().unwrap(), "cleanup"]);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "a refused step fails the run: {said}"
    );
    assert!(
        said.contains("working as nobody"),
        "root does the spool work as the owner: {said}"
    );
    assert!(
        said.contains("archive is a symbolic link to") && said.contains("victim"),
        "{said}"
    );
    victim.assert_untouched();
    assert!(fs::symlink_metadata(spool.path("pending/x.json")).is_ok());

    // With archive/ back, the rest is done and each link named.
    fs::remove_file(spool.path("archive")).unwrap();
    fs::rename(spool.path("archive.old"), spool.path("archive")).unwrap();
    let out = spool.cli(&["--config", cfg.to_str().unwrap(), "cleanup"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("refused pending/x.json"), "{said}");
    assert!(said.contains("refused logs/01"), "{said}");
    assert!(said.contains("refused logs/00/a@"), "{said}");
    assert!(said.contains("refused logs/00/b@"), "{said}");
    victim.assert_untouched();
    // Whatever cleanup created belongs to the owner, not to root.
    for e in fs::read_dir(spool.path("archive")).unwrap().flatten() {
        assert_eq!(
            e.metadata().unwrap().uid(),
            NOBODY,
            "{}",
            e.path().display()
        );
    }
}

#[test]
fn ensure_running_as_root_starts_the_worker_as_the_owner() {
    if !as_root("ensure_running_as_root_starts_the_worker_as_the_owner") {
        return;
    }
    let spool = nobody_spool();
    let victim = Victim::new(&spool);
    let cfg = spool.config("");
    // The worker's own output file planted as a link: refused.
    symlink(victim.secret(), spool.path("worker.log")).unwrap();
    let out = spool.cli(&["--config", cfg.to_str().unwrap(), "ensure-running"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("worker.log"), "{}", text(&out));
    victim.assert_untouched();
    fs::remove_file(spool.path("worker.log")).unwrap();

    let out = spool.cli(&["--config", cfg.to_str().unwrap(), "ensure-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let pid: i32 = wait_for("the worker's pid", DEADLINE, || {
        fs::read_to_string(spool.path(".worker.lock"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "real, effective, saved and file-system uid are the owner's"
    );
    assert_eq!(
        fs::metadata(spool.path("worker.log")).unwrap().uid(),
        NOBODY
    );
    wait_for("the worker to stop", DEADLINE, || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
}

#[test]
fn diagnose_as_root_reports_links_and_submits_its_probe_as_the_owner() {
    if !as_root("diagnose_as_root_reports_links_and_submits_its_probe_as_the_owner") {
        return;
    }
    let spool = nobody_spool();
    let victim = Victim::new(&spool);
    let cfg = spool.config("");
    let cfg = cfg.to_str().unwrap();
    let out = spool.cli(&["--config", cfg, "ensure-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let pid: i32 = wait_for("the worker's pid", DEADLINE, || {
        fs::read_to_string(spool.path(".worker.lock"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    // A job makes tmp/ a link to a root-owned directory and running/ a
    // link to the same.
    plant_dir_link(&spool, "tmp", &victim.dir);
    plant_dir_link(&spool, "running", &victim.dir);
    let out = spool.cli(&["--config", cfg, "diagnose", "--json"]);
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let said = text(&out);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {said}"));
    let finding = |id: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {said}"))
            .clone()
    };
    let layout = finding("spool.layout");
    assert_eq!(layout["level"], "critical", "{layout}");
    let summary = layout["summary"].as_str().unwrap();
    assert!(
        summary.contains("tmp is a symbolic link to")
            && summary.contains("running is a symbolic link"),
        "{summary}"
    );
    assert!(
        finding("spool.orphans")["summary"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{said}"
    );
    // The probe, submitted as the owner, could not write into the
    // root-owned target; as root it would have.
    let probe = finding("probe.end_to_end");
    assert_eq!(probe["level"], "critical", "{probe}");
    victim.assert_untouched();
    wait_for("the worker to stop", DEADLINE, || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
}

/// Runs `script` with `sh -c` as uid `uid`, a member of the spool's group.
fn as_member(uid: u32, script: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            &format!("--groups={NOBODY}"),
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("HOME", "/")
        .output()
        .expect("setpriv")
}

#[test]
fn a_member_cannot_read_remove_or_replace_another_members_queued_job() {
    if !as_root("a_member_cannot_read_remove_or_replace_another_members_queued_job") {
        return;
    }
    let spool = nobody_spool();
    let bin = common::BIN;
    let root = spool.root();
    let root = root.display();
    // The worker sets up its queue directories (sticky bit, default ACL)
    // as their owner when it starts; it is stopped again so the job waits.
    drop(spool.start_as("", NOBODY, NOBODY));
    let pending_mode = fs::metadata(spool.path("pending")).unwrap().mode() & 0o7777;
    assert_eq!(pending_mode, 0o3770, "sticky and set-group-id");

    let (alice, mallory) = (60_001, 60_002);
    let out = as_member(
        alice,
        &format!(
            "{bin} --spool {root} submit --id alice-job --env TOKEN=hunter2 -- 'echo ran with $TOKEN'"
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let job = spool.path("pending/alice-job.json");
    let before = fs::read(&job).unwrap();

    // Read, remove, replace (by rename over it, in pending/ and from tmp/),
    // truncate: each refused.
    for attack in [
        format!("cat {root}/pending/alice-job.json"),
        format!("rm -f {root}/pending/alice-job.json && test ! -e {root}/pending/alice-job.json"),
        format!(
            "echo '{{\"command\":\"echo owned\"}}' > {root}/tmp/m.json && mv -f {root}/tmp/m.json {root}/pending/alice-job.json"
        ),
        format!(": > {root}/pending/alice-job.json"),
        format!("mv {root}/pending/alice-job.json {root}/tmp/stolen.json"),
    ] {
        let out = as_member(mallory, &attack);
        assert!(!out.status.success(), "`{attack}` worked: {}", text(&out));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("hunter2"),
            "{attack}"
        );
    }
    assert_eq!(fs::read(&job).unwrap(), before, "alice's job is intact");
    let out = as_member(
        mallory,
        &format!("{bin} --spool {root} submit --id alice-job -- 'echo owned'"),
    );
    assert!(!out.status.success(), "{}", text(&out));

    // The worker still reads and runs it.
    let _w = spool.start_as("", NOBODY, NOBODY);
    let r = spool.wait_result("alice-job");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(spool.log_of(&r), "ran with hunter2\n");
}

#[test]
fn a_directory_the_worker_cannot_move_is_rejected_once_and_frees_its_id() {
    if !as_root("a_directory_the_worker_cannot_move_is_rejected_once_and_frees_its_id") {
        return;
    }
    let spool = nobody_spool();
    let root = spool.root();
    let root = root.display();
    let w = spool.start_as("rescan_interval = \"1s\"\n", NOBODY, NOBODY);
    let alice = 60_001;
    // A member's non-empty directory under a job's name: the worker, though
    // it owns pending/, cannot move it to another directory (that needs
    // write access to the directory itself).
    let out = as_member(
        alice,
        &format!(
            "mkdir -p {root}/tmp/odd/inner && touch {root}/tmp/odd/inner/f && mv {root}/tmp/odd {root}/pending/odd.json"
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let r = spool.wait_result("odd");
    assert_eq!(r["status"], "rejected", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("a directory") && error.contains("renamed to pending/.odd.json.unmovable-"),
        "{error}"
    );
    // Its id is free again.
    let out = as_member(
        alice,
        &format!(
            "{} --spool {root} submit --id odd --wait --wait-timeout 30 -- 'echo again'",
            common::BIN
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    // Reported once: later rescans pass over it.
    let rescans = |log: &str| log.matches("rescanned pending/").count();
    let at = rescans(&w.log());
    wait_for("three more rescans", DEADLINE, || {
        (rescans(&w.log()) >= at + 3).then_some(())
    });
    // (A debug line may note a later try; a report is a warning or error.)
    let reports = w
        .log()
        .lines()
        .filter(|l| l.contains("cannot be moved") && !l.contains(" DEBUG "))
        .count();
    assert_eq!(reports, 1, "{}", w.log());
    drop(w);

    // diagnose names it.
    let out = spool.cli(&["diagnose", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let stuck = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "spool.stuck")
        .unwrap()
        .clone();
    assert_eq!(stuck["level"], "warning", "{stuck}");
    let summary = stuck["summary"].as_str().unwrap();
    assert!(
        summary.contains(".odd.json.unmovable-") && summary.contains("a directory of uid 60001"),
        "{summary}"
    );
}

/// Each directory of the spool, and each directory root's tools create in
/// it, replaced by a link to a root-owned directory holding an old secret:
/// `cleanup`, `health` and `diagnose`, run as root with work to do (a stale
/// job, an old log, an old archive), leave the target exactly as it was.
#[test]
fn no_root_tool_follows_a_link_in_place_of_any_spool_directory() {
    if !as_root("no_root_tool_follows_a_link_in_place_of_any_spool_directory") {
        return;
    }
    for name in [
        "tmp",
        "pending",
        "running",
        "completed",
        "logs",
        "logs/00",
        "archive",
        "archive/stale",
        "archive/logs",
        "archive/rejected",
    ] {
        let spool = nobody_spool();
        let victim = Victim::new(&spool);
        let cfg = spool.config(
            "stale_pending_after = \"1ms\"\nlog_retention_days = 1\narchive_retention_days = 1\n",
        );
        let cfg = cfg.to_str().unwrap();
        // Work for every step: a stale job, an old log, an old archive.
        for dir in [
            "archive/stale",
            "archive/logs",
            "archive/rejected",
            "logs/00",
        ] {
            fs::create_dir_all(spool.path(dir)).unwrap();
        }
        fs::write(spool.path("pending/stale.json"), "{\"command\":\"true\"}").unwrap();
        fs::write(spool.path("logs/00/x@20200101T000000.000000Z.log"), "old\n").unwrap();
        let old = spool.path("archive/rejected/old");
        fs::write(&old, "old").unwrap();
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_times(
                fs::FileTimes::new()
                    .set_modified(SystemTime::now() - Duration::from_secs(400 * 86_400)),
            )
            .unwrap();
        chown_tree(&spool.root(), NOBODY);
        plant_dir_link(&spool, name, &victim.dir);

        for args in [
            vec!["--config", cfg, "cleanup"],
            vec!["--config", cfg, "health", "--format", "json"],
            vec!["--config", cfg, "diagnose", "--json"],
        ] {
            let out = spool.cli(&args);
            victim.assert_untouched();
            let said = text(&out);
            assert!(
                !said.contains("panicked"),
                "{name}: {args:?} panicked: {said}"
            );
        }
        let out = spool.cli(&["--config", cfg, "cleanup"]);
        assert!(
            text(&out).contains("symbolic link") || name == "tmp" || name == "running",
            "{name}: cleanup names the link: {}",
            text(&out)
        );
        let out = spool.cli(&["--config", cfg, "diagnose", "--json"]);
        if !name.contains('/') {
            assert!(
                text(&out).contains(&format!("{name} is a symbolic link")),
                "{name}: diagnose names the link: {}",
                text(&out)
            );
        }
    }
}

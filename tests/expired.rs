//! Tier 2: the executor never discards a job it was given.
//!
//! A job waiting its turn behind a long one, while a live worker holds the
//! spool, is never stale: neither `cleanup` nor `health --fix` archives it,
//! `health` reports the long wait (`spool.queue`), and it runs in its
//! turn. A job that waited while no worker served the spool is archived
//! with an `expired` result, which ends an agent's `wait` (exit 75).
//!
//! Ages are set with `touch -d`, as an operator would: the age of a job is
//! its file's modification time.
//!
//! Run as root (as CI does), the spool, the worker and every command
//! belong to `nobody`, as on an installed host where they are the service
//! user's; that also keeps `health --fix` from changing anything outside
//! the test's spool (it may not write `/etc/cron.d`).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::SystemTime;

use common::{BIN, DEADLINE, Gate, Spool, wait_for};
use serde_json::Value;

const NOBODY: u32 = 65534;
const CONFIG: &str = "max_parallel = 1\nstale_pending_after = \"30m\"\n";

/// Who runs the worker and the commands: `nobody` when the test is root,
/// else the test's own user.
fn who() -> Option<(u32, u32)> {
    nix::unistd::Uid::effective()
        .is_root()
        .then_some((NOBODY, NOBODY))
}

fn uid() -> u32 {
    who().map_or_else(|| nix::unistd::geteuid().as_raw(), |(u, _)| u)
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).expect("chown");
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for e in fs::read_dir(path).unwrap().flatten() {
            chown_tree(&e.path(), id);
        }
    }
}

/// A laid-out spool, its config file, and a gate for held jobs, all
/// usable by [`who`].
fn setup() -> (Spool, PathBuf, Gate) {
    let spool = Spool::new();
    spool.open_to_all();
    ai_cmd_executor::spool::Spool::new(spool.root())
        .ensure_layout()
        .expect("layout");
    let cfg = spool.config(CONFIG);
    let gate = Gate::new(&spool);
    if let Some((u, _)) = who() {
        chown_tree(&spool.root(), u);
        chown_tree(&spool.scratch("started"), u);
    }
    (spool, cfg, gate)
}

/// The CLI as [`who`], on the test's spool and config.
fn command(spool: &Spool, cfg: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    if let Some((u, g)) = who() {
        cmd.uid(u).gid(g);
    }
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "AI_CMD_EXECUTOR_CONFIG",
        "AI_CMD_EXECUTOR_SPOOL",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("--config")
        .arg(cfg)
        .arg("--spool")
        .arg(spool.root())
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn cli(spool: &Spool, cfg: &Path, args: &[&str]) -> Output {
    command(spool, cfg, args).output().expect("run the CLI")
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn submit(spool: &Spool, cfg: &Path, id: &str, cmd: &str) {
    let out = cli(spool, cfg, &["submit", "--id", id, "--", cmd]);
    assert!(out.status.success(), "submit {id}: {}", said(&out));
}

/// `touch -d '2 hours ago'` on a pending job, and a check that it took.
fn two_hours_ago(spool: &Spool, name: &str) {
    let path = spool.path(&format!("pending/{name}"));
    let out = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&path)
        .output()
        .expect("touch");
    assert!(out.status.success(), "touch: {}", said(&out));
    let mtime = fs::metadata(&path).unwrap().mtime();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(now - mtime >= 7200, "{name} is {}s old", now - mtime);
}

/// A worker that holds the spool's lock, as every worker does: stopped
/// (and the gate opened, so no held job lingers) when dropped.
struct LockedWorker {
    child: Child,
    stderr: PathBuf,
    /// The gate of the spool's held jobs ([`Gate`]'s file).
    gate: PathBuf,
}

impl LockedWorker {
    fn start(spool: &Spool, cfg: &Path) -> LockedWorker {
        let stderr = spool.scratch("worker.stderr");
        // As under systemd: no `--lock-file`; every worker holds the
        // spool's serving lock.
        let child = command(spool, cfg, &["run"])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start the worker");
        let mut w = LockedWorker {
            child,
            stderr,
            gate: spool.scratch("gate"),
        };
        wait_for("the worker to be ready", DEADLINE, || {
            if let Some(st) = w.child.try_wait().unwrap() {
                panic!("worker exited ({st}):\n{}", w.log());
            }
            w.log().contains("worker ready").then_some(())
        });
        let root = spool.root();
        let held = ai_cmd_executor::install::ensure::serving_worker(&root).unwrap();
        assert_eq!(held, Some(w.child.id() as i32), "{}", w.log());
        w
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for LockedWorker {
    fn drop(&mut self) {
        let _ = fs::write(&self.gate, "");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The finding `id` of a `health --format json` output.
fn finding(out: &Output, id: &str) -> Value {
    // `--fix` may print what a fix wrote (a line) before the document.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find("\n{").map_or(&text[..], |at| &text[at + 1..]);
    let doc: Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("health --format json: {e}\n{}", said(out)));
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {doc}"))
        .clone()
}

#[test]
fn a_job_waiting_its_turn_is_never_archived_and_runs_in_its_turn() {
    let (spool, cfg, gate) = setup();
    let worker = LockedWorker::start(&spool, &cfg);
    submit(&spool, &cfg, "long", &gate.command("long"));
    gate.wait_started(1);
    submit(&spool, &cfg, "second", "echo second");
    two_hours_ago(&spool, "second.json");

    let out = cli(&spool, &cfg, &["cleanup", "--dry-run"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("would leave pending/second.json (waited 2h"),
        "{}",
        said(&out)
    );
    let out = cli(&spool, &cfg, &["cleanup"]);
    assert!(out.status.success(), "{}", said(&out));
    let pid = worker.child.id();
    assert!(
        said(&out).contains(&format!(
            "left pending/second.json (waited 2h): a worker (pid {pid}) serves the spool"
        )),
        "{}",
        said(&out)
    );
    assert_eq!(spool.names("pending"), ["second.json"]);
    assert_eq!(spool.result("second"), None);
    assert!(spool.names("archive/stale").is_empty());

    let out = cli(&spool, &cfg, &["health", "--fix", "--format", "json"]);
    let text = said(&out);
    assert!(!text.contains("archived"), "{text}");
    let queue = finding(&out, "spool.queue");
    assert_eq!(queue["level"], "warning", "{queue}");
    assert!(queue.get("fix").is_none(), "waiting has no fix: {queue}");
    let summary = queue["summary"].as_str().unwrap();
    assert!(
        summary.contains("job second has waited 2h") && summary.contains(&format!("pid {pid}")),
        "{summary}"
    );
    let detail = queue["detail"].as_object().unwrap();
    let mut keys: Vec<&str> = detail.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "oldest_pending_id",
            "oldest_pending_secs",
            "pending",
            "running"
        ]
    );
    assert_eq!(
        (&detail["pending"], &detail["running"]),
        (&1.into(), &1.into())
    );
    assert_eq!(detail["oldest_pending_id"], "second");
    let secs = detail["oldest_pending_secs"].as_u64().unwrap();
    assert!((7200..7200 + 600).contains(&secs), "{secs}");
    let stale = finding(&out, "spool.stale");
    assert_eq!(stale["level"], "ok", "{stale}");
    assert_eq!(stale["detail"]["stale"], 0, "{stale}");
    assert_eq!(spool.names("pending"), ["second.json"]);
    assert_eq!(spool.result("second"), None);
    assert!(spool.names("archive/stale").is_empty());

    // Its turn comes: it runs, and succeeds.
    gate.open();
    let long = spool.wait_result("long");
    assert_eq!(long["status"], "succeeded", "{long}");
    let second = spool.wait_result("second");
    assert_eq!(second["status"], "succeeded", "{second}\n{}", worker.log());
    assert_eq!(spool.log_of(&second), "second\n");
    assert_eq!(second["submitted_by"]["uid"], uid());

    // An empty queue is well.
    let out = cli(&spool, &cfg, &["health", "--format", "json"]);
    let queue = finding(&out, "spool.queue");
    assert_eq!(queue["level"], "ok", "{queue}");
    assert_eq!(queue["detail"]["oldest_pending_id"], Value::Null);
    assert_eq!(queue["detail"]["oldest_pending_secs"], 0);
    drop(worker);
}

/// Whether process `pid` has an inotify descriptor open: `wait` opens one
/// on `completed/` before it first looks.
fn watching(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("inotify")))
    })
}

#[test]
fn a_job_nobody_served_expires_and_its_wait_ends_with_75() {
    let (spool, cfg, _gate) = setup();
    submit(&spool, &cfg, "late", "echo never");
    two_hours_ago(&spool, "late.json");

    let out = cli(&spool, &cfg, &["health", "--format", "json"]);
    let stale = finding(&out, "spool.stale");
    assert_eq!(stale["level"], "warning", "{stale}");
    assert_eq!(stale["detail"]["stale"], 1, "{stale}");
    assert_eq!(stale["fix"]["action"], "archive_stale", "{stale}");
    let queue = finding(&out, "spool.queue");
    assert_eq!(queue["level"], "ok", "no worker: spool.stale's: {queue}");
    assert_eq!(queue["detail"]["oldest_pending_id"], "late");

    // An agent waits for it, from before the cleanup.
    let mut wait = command(&spool, &cfg, &["wait", "late"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wait");
    let pid = wait.id();
    wait_for("wait to watch completed/", DEADLINE, || {
        watching(pid).then_some(())
    });
    assert!(wait.try_wait().unwrap().is_none(), "wait ended early");

    let out = cli(&spool, &cfg, &["cleanup"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("archived pending/late.json as archive/stale/late.json."),
        "{}",
        said(&out)
    );
    let status = wait_for("wait to end", DEADLINE, || wait.try_wait().unwrap());
    let waited = wait.wait_with_output().unwrap();
    let shown = said(&waited);
    assert_eq!(status.code(), Some(75), "{shown}");
    assert!(shown.contains("status:    expired"), "{shown}");
    assert!(shown.contains("no worker served the spool"), "{shown}");

    let r = spool.result("late").expect("a result");
    assert_eq!(r["status"], "expired", "{r}");
    assert_eq!(r["exit_code"], Value::Null);
    assert_eq!(r["log"], Value::Null);
    assert_eq!(r["duration_ms"], 0);
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["started_at"], r["finished_at"]);
    assert_eq!(r["submitted_by"]["uid"], uid(), "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("waited 2h") && error.contains("archived into archive/stale/ at"),
        "{error}"
    );
    assert!(spool.names("pending").is_empty());
    let archived = spool.names("archive/stale");
    assert_eq!(archived.len(), 2, "{archived:?}");
    assert!(archived[1].ends_with(".reason"), "{archived:?}");

    // Once is all: a second cleanup finds nothing, and the result stands.
    let out = cli(&spool, &cfg, &["cleanup"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(!said(&out).contains("late"), "{}", said(&out));
    assert_eq!(spool.result("late"), Some(r));

    // The health timer's fix does the same.
    submit(&spool, &cfg, "later", "echo never");
    two_hours_ago(&spool, "later.json");
    let out = cli(&spool, &cfg, &["health", "--fix", "--format", "json"]);
    assert!(
        said(&out).contains("archived 1 stale pending job(s) into archive/stale/"),
        "{}",
        said(&out)
    );
    assert_eq!(finding(&out, "spool.stale")["level"], "ok");
    let r = spool.result("later").expect("a result");
    assert_eq!(r["status"], "expired", "{r}");
    let out = cli(&spool, &cfg, &["result", "later"]);
    assert!(said(&out).contains("status:    expired"), "{}", said(&out));
}

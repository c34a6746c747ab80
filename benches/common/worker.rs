//! The worker under test, driven through its public interface only: a
//! foreground `ai-cmd-executor run --spool DIR [--config FILE]` on a fresh
//! spool, jobs dropped into `pending/` (written to `tmp/`, then renamed) or
//! submitted with `ai-cmd-executor submit`, results watched in `completed/`
//! with inotify.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use inotify::{EventMask, Inotify, WatchMask};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::Value;

use super::*;

/// Job file body of every benchmark job.
pub const TRUE_JOB: &[u8] = br#"{"command": "true"}"#;

/// The worker binary to measure: `BENCH_WORKER` (to compare two builds),
/// else the one cargo built for this bench.
pub fn worker_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BENCH_WORKER")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_ai-cmd-executor").to_owned())
    })
}

/// Modification time of the worker binary, to detect a rebuild during the run.
pub fn binary_mtime() -> Option<SystemTime> {
    fs::metadata(worker_bin()).and_then(|m| m.modified()).ok()
}

/// The fields of a result file the benchmarks use.
pub struct JobResult {
    pub status: String,
    pub ok: bool,
    pub raw: Value,
    pub times: Option<(SystemTime, SystemTime)>,
}

/// A worker running on its own fresh spool, warmed up.
///
/// Fields drop in declaration order: the worker is stopped before the spool
/// directory is put aside (see [`RunDir`]).
pub struct Fixture {
    pub worker: Daemon,
    watcher: ResultWatcher,
    pub spool: PathBuf,
    pub root: RunDir,
}

impl Fixture {
    /// Creates a fresh spool under `base` (or the temp dir), starts a worker
    /// on it with environment `env` and `max_parallel` (no config file when
    /// `None`), and waits until it has run a warm-up job.
    pub fn start(
        base: Option<&Path>,
        max_parallel: Option<usize>,
        env: &DaemonEnv,
    ) -> Result<Self> {
        let root = RunDir::new("ai-cmd-bench-", base)?;
        let spool = root.path().join("spool");
        fs::create_dir(&spool)?;
        let mut cmd = Command::new(worker_bin());
        env.apply(&mut cmd).arg("run").arg("--spool").arg(&spool);
        if let Some(p) = max_parallel {
            let config = root.path().join("worker.toml");
            fs::write(&config, format!("max_parallel = {p}\n"))?;
            cmd.arg("--config").arg(config);
        }
        let mut worker = Daemon::spawn("ai-cmd-executor", cmd, &root.path().join("worker.log"))?;
        let what = "the worker to create its spool";
        poll_until(what, READY_TIMEOUT, Duration::from_millis(5), || {
            worker.check_alive()?;
            let ready = ["tmp", "pending", "completed"]
                .iter()
                .all(|d| spool.join(d).is_dir());
            Ok(ready.then_some(()))
        })?;
        let watcher = ResultWatcher::new(&spool.join("completed"))?;
        let mut fx = Self {
            worker,
            watcher,
            spool,
            root,
        };
        fx.submit("warmup", TRUE_JOB)?;
        fx.wait(&mut HashSet::from(["warmup".to_owned()]))
            .context("waiting for the warm-up job")?;
        fx.succeeded("warmup")?;
        Ok(fx)
    }

    /// Submits a job: writes `body` to `tmp/<id>` and renames it to `pending/<id>.json`.
    pub fn submit(&self, id: &str, body: &[u8]) -> Result<()> {
        let tmp = self.spool.join("tmp").join(id);
        fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = self.spool.join("pending").join(format!("{id}.json"));
        fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))
    }

    /// Submits job `id` through `ai-cmd-executor submit --spool DIR --id ID -- true`.
    pub fn cli_submit(&self, id: &str, env: &DaemonEnv) -> Result<()> {
        let mut cmd = Command::new(worker_bin());
        env.apply(&mut cmd)
            .arg("submit")
            .arg("--spool")
            .arg(&self.spool);
        run_ok(cmd.args(["--id", id, "--", "true"])).map(drop)
    }

    /// [`Self::cli_submit`] when `cli`, else [`Self::submit`] of [`TRUE_JOB`].
    pub fn submit_via(&self, id: &str, cli: bool, env: &DaemonEnv) -> Result<()> {
        if cli {
            self.cli_submit(id, env)
        } else {
            self.submit(id, TRUE_JOB)
        }
    }

    /// Waits until every id in `pending` has a result, removing ids as their
    /// results appear; returns the instant the last one was observed.
    pub fn wait(&mut self, pending: &mut HashSet<String>) -> Result<Instant> {
        self.watcher.wait_all(&mut self.worker, pending)
    }

    /// Inotify queue overflows seen so far.
    pub fn overflows(&self) -> usize {
        self.watcher.overflows
    }

    /// Reads and parses the result of job `id`.
    pub fn result(&self, id: &str) -> Result<JobResult> {
        let path = self.spool.join("completed").join(format!("{id}.json"));
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let raw: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let time = |key: &str| {
            raw.get(key)?
                .as_str()
                .and_then(|s| humantime::parse_rfc3339(s).ok())
        };
        let status = raw
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("<missing>");
        Ok(JobResult {
            ok: status == "succeeded" && raw.get("exit_code").and_then(Value::as_i64) == Some(0),
            status: status.to_owned(),
            times: time("started_at").zip(time("finished_at")),
            raw,
        })
    }

    /// `(started_at, finished_at)` of job `id`, which must have succeeded.
    pub fn succeeded(&self, id: &str) -> Result<(SystemTime, SystemTime)> {
        let r = self.result(id)?;
        ensure!(r.ok, "job {id} (`true`) did not succeed: {}", r.raw);
        r.times
            .ok_or_else(|| anyhow!("job {id}: missing or invalid started_at/finished_at"))
    }
}

/// The job id of a result file name (`<id>.json`, not a dot-prefixed temp file).
fn result_id(name: &str) -> Option<&str> {
    name.strip_suffix(".json")
        .filter(|_| !name.starts_with('.'))
}

/// Watches `completed/` for results (IN_MOVED_TO of `<id>.json`).
struct ResultWatcher {
    inotify: Inotify,
    buf: Vec<u8>,
    dir: PathBuf,
    overflows: usize,
}

impl ResultWatcher {
    /// Starts watching `dir`.
    fn new(dir: &Path) -> Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        inotify
            .watches()
            .add(dir, WatchMask::MOVED_TO)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self {
            inotify,
            buf: vec![0; 64 * 1024],
            dir: dir.to_owned(),
            overflows: 0,
        })
    }

    /// Removes from `pending` the ids whose results are in the directory.
    fn rescan(&self, pending: &mut HashSet<String>) -> Result<()> {
        for entry in fs::read_dir(&self.dir)? {
            if let Some(id) = entry?.file_name().to_str().and_then(result_id) {
                pending.remove(id);
            }
        }
        Ok(())
    }

    /// See [`Fixture::wait`]. Fails when the worker exits or no awaited
    /// result appears for [`STALL_TIMEOUT`].
    fn wait_all(&mut self, worker: &mut Daemon, pending: &mut HashSet<String>) -> Result<Instant> {
        let mut done_at = Instant::now();
        let mut last_progress = Instant::now();
        while !pending.is_empty() {
            check_interrupted()?;
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            let ready = match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(n) => n > 0,
                Err(Errno::EINTR) => false,
                Err(e) => return Err(e).context("poll on inotify"),
            };
            let now = Instant::now();
            if !ready {
                worker.check_alive()?;
                if last_progress.elapsed() > STALL_TIMEOUT {
                    let mut missing: Vec<&String> = pending.iter().collect();
                    missing.sort();
                    missing.truncate(5);
                    bail!(
                        "no result for {STALL_TIMEOUT:?}; {} result(s) still missing (e.g. {missing:?}){}",
                        pending.len(),
                        worker.log_tail()
                    );
                }
                continue;
            }
            let before = pending.len();
            let events = match self.inotify.read_events(&mut self.buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading inotify events"),
            };
            let mut overflow = false;
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                } else if let Some(id) = event.name.and_then(|n| n.to_str()).and_then(result_id) {
                    pending.remove(id);
                }
            }
            if overflow {
                // Events were lost: fall back to listing the directory.
                self.overflows += 1;
                self.rescan(pending)?;
            }
            if pending.len() < before {
                done_at = now;
                last_progress = now;
            }
        }
        Ok(done_at)
    }
}

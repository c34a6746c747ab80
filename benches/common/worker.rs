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
pub fn worker_bin() -> String {
    let bench_worker = std::env::var("BENCH_WORKER").ok().filter(|v| !v.is_empty());
    bench_worker.unwrap_or_else(|| env!("CARGO_BIN_EXE_ai-cmd-executor").to_owned())
}

/// The job id of a result file name (`<id>.json`, not a dot-prefixed temp file).
fn result_id(name: &str) -> Option<&str> {
    name.strip_suffix(".json")
        .filter(|_| !name.starts_with('.'))
}

/// A worker running on its own fresh spool, warmed up.
///
/// Fields drop in declaration order: the worker is stopped before the spool
/// directory is put aside (see [`RunDir`]).
pub struct Fixture {
    pub worker: Daemon,
    inotify: Inotify,
    env: DaemonEnv,
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
            let dirs = ["tmp", "pending", "completed"];
            Ok(dirs.iter().all(|d| spool.join(d).is_dir()).then_some(()))
        })?;
        let inotify = Inotify::init().context("inotify_init")?;
        let completed = spool.join("completed");
        let watch = inotify.watches().add(&completed, WatchMask::MOVED_TO);
        watch.with_context(|| format!("watching {}", completed.display()))?;
        let env = env.clone();
        let mut fx = Self {
            worker,
            inotify,
            env,
            spool,
            root,
        };
        fx.submit("warmup", false)?;
        fx.wait(&mut HashSet::from(["warmup".to_owned()]))
            .context("waiting for the warm-up job")?;
        fx.succeeded("warmup")?;
        Ok(fx)
    }

    /// Submits job `id` (`true`): through `ai-cmd-executor submit --spool
    /// DIR --id ID -- true` when `cli`, else by writing [`TRUE_JOB`] to
    /// `tmp/<id>` and renaming it to `pending/<id>.json`.
    pub fn submit(&self, id: &str, cli: bool) -> Result<()> {
        if cli {
            let mut cmd = Command::new(worker_bin());
            let cmd = self.env.apply(&mut cmd).arg("submit").arg("--spool");
            return run_ok(cmd.arg(&self.spool).args(["--id", id, "--", "true"])).map(drop);
        }
        self.drop_file(id, TRUE_JOB)
    }

    /// Writes `body` to `tmp/<id>` and renames it to `pending/<id>.json`.
    pub fn drop_file(&self, id: &str, body: &[u8]) -> Result<()> {
        let tmp = self.spool.join("tmp").join(id);
        fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = self.spool.join("pending").join(format!("{id}.json"));
        fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))
    }

    /// The parsed result of job `id`.
    pub fn result(&self, id: &str) -> Result<Value> {
        let path = self.spool.join("completed").join(format!("{id}.json"));
        let text = fs::read_to_string(&path);
        let text = text.with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// `(started_at, finished_at)` of job `id`, which must have succeeded.
    pub fn succeeded(&self, id: &str) -> Result<(SystemTime, SystemTime)> {
        let r = self.result(id)?;
        let ok = r["status"] == "succeeded" && r["exit_code"] == 0;
        ensure!(ok, "job {id} (`true`) did not succeed: {r}");
        let time = |key: &str| humantime::parse_rfc3339(r[key].as_str()?).ok();
        let times = time("started_at").zip(time("finished_at"));
        times.ok_or_else(|| anyhow!("job {id}: missing or invalid started_at/finished_at"))
    }

    /// Waits until every id in `pending` has a result (IN_MOVED_TO of
    /// `<id>.json` in `completed/`), removing ids as their results appear;
    /// returns the instant the last one was observed. Fails when the worker
    /// exits or no awaited result appears for [`STALL_TIMEOUT`].
    pub fn wait(&mut self, pending: &mut HashSet<String>) -> Result<Instant> {
        let (mut done_at, mut buf) = (Instant::now(), [0u8; 64 * 1024]);
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
                self.worker.check_alive()?;
                if done_at.elapsed() > STALL_TIMEOUT {
                    let mut missing: Vec<&String> = pending.iter().collect();
                    missing.sort();
                    missing.truncate(5);
                    let (n, tail) = (pending.len(), self.worker.log_tail());
                    bail!(
                        "no result for {STALL_TIMEOUT:?}; {n} still missing (e.g. {missing:?}){tail}"
                    );
                }
                continue;
            }
            let before = pending.len();
            let events = match self.inotify.read_events(&mut buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading inotify events"),
            };
            let mut overflow = false;
            for event in events {
                overflow |= event.mask.contains(EventMask::Q_OVERFLOW);
                if let Some(id) = event.name.and_then(|n| n.to_str()).and_then(result_id) {
                    pending.remove(id);
                }
            }
            if overflow {
                // Events were lost: fall back to listing the directory.
                for entry in fs::read_dir(self.spool.join("completed"))? {
                    if let Some(id) = entry?.file_name().to_str().and_then(result_id) {
                        pending.remove(id);
                    }
                }
            }
            if pending.len() < before {
                done_at = now;
            }
        }
        Ok(done_at)
    }
}

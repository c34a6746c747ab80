//! Throughput, latency and idle-cost benchmark for the `ai-cmd-executor` worker.
//!
//! Run with `cargo bench --bench throughput` (or `scripts/bench.sh [--quick]`).
//! The benchmark drives the real worker binary through its public interface
//! only: it starts `ai-cmd-executor run --spool DIR [--config FILE]` on a fresh
//! temporary spool, drops job files into `DIR/pending/` (write to `DIR/tmp/`,
//! then rename), and watches `DIR/completed/` with inotify for the results.
//!
//! Sections, all in one run on one machine:
//!
//! 1. **Throughput** of `N` jobs of `true` at parallelism 1 and 2, compared with
//!    a raw reference (a tight `bash -c true` spawn+wait loop in this process,
//!    measured just before and just after), with the spool in each location
//!    in turn. The CPU time of the worker and of its jobs is printed for
//!    diagnosis, and beside each worker run a "contract loop" (the same loop,
//!    doing inline each job's file work that the spool contract requires) shows
//!    how much of the raw rate that file work leaves on the file system. A
//!    "file-work loop" (that file work alone, batched, no process) is timed
//!    in machine CPU, which gives a CPU ceiling: the most any implementation
//!    of the contract could reach where the CPUs are the limit.
//! 2. **Latency** of single jobs dropped into an idle worker: drop to
//!    `started_at`, drop to result file, and result latency minus a bare
//!    `bash -c true` (timed between the samples, after the same idle gap),
//!    in each location. The result latency is split at the
//!    result's `started_at`/`finished_at`, and the cost of write+fsync of a
//!    small file next to the spool is printed as the durability floor.
//! 3. **Idle** cost after a warm-up: RSS, CPU time and wake-ups (context
//!    switches over all threads) over an idle window, with `RUST_BACKTRACE`
//!    unset and set to `1`.
//!
//! Environment overrides: `BENCH_JOBS` (default 1000), `BENCH_IDLE_SECS`
//! (default 30), `BENCH_LATENCY_SAMPLES` (default 200), `BENCH_SECTIONS`
//! (comma-separated subset of `throughput,latency,idle`), `BENCH_SPOOLS`
//! (`label=dir;label=dir`: where spools are made; default the temp dir and
//! `/dev/shm`; `scripts/bench.sh` adds a journaled ext4 on a loop device) and
//! `BENCH_WORKER` (another build of the worker, to compare two builds),
//! `BENCH_ROUNDS` (default 5: the throughput ratio is the median of the
//! rounds' ratios, each worker run against the raw loops just before and
//! just after it).
//!
//! Every figure is printed with its target and PASS/MISS. The benchmark never
//! fails on a MISS; it exits non-zero only when the worker does not process
//! jobs (dies, or a result does not appear before a deadline). Every worker
//! it starts is stopped on every exit path (see [`Worker`]).

#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use inotify::{EventMask, Inotify, WatchMask};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

mod common;
use common::*;

/// The worker binary under test, built by cargo for this bench.
const BUILT_WORKER: &str = env!("CARGO_BIN_EXE_ai-cmd-executor");

/// The worker binary to measure: `BENCH_WORKER` (to compare two builds),
/// else the one cargo built for this bench.
fn worker_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BENCH_WORKER")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| BUILT_WORKER.to_owned())
    })
}

/// Job file body used for every benchmark job.
const TRUE_JOB: &[u8] = br#"{"command": "true"}"#;

/// Default number of jobs per throughput run (`BENCH_JOBS` overrides).
const DEFAULT_JOBS: usize = 1000;

/// Default idle window in seconds (`BENCH_IDLE_SECS` overrides).
const DEFAULT_IDLE_SECS: f64 = 30.0;

/// Default number of latency samples (`BENCH_LATENCY_SAMPLES` overrides).
const DEFAULT_LATENCY_SAMPLES: usize = 200;

/// Default rounds of throughput runs (`BENCH_ROUNDS` overrides); the ratio
/// checked is the median of the rounds' ratios, since on a shared or
/// virtual machine one round can be off by 15 % either way.
const DEFAULT_ROUNDS: usize = 5;

/// Parallelism levels for the throughput section.
const PARALLELISM: [usize; 2] = [1, 2];

/// Number of write+fsync probes for the durability floor.
const FSYNC_SAMPLES: usize = 100;

/// Size of the write+fsync probe file (about the size of a result file).
const FSYNC_PROBE_BYTES: usize = 300;

/// Size of the result the contract loop writes per job (a `succeeded`
/// result of `true` is about this long).
const RESULT_BYTES: usize = 320;

/// Pause between latency samples, so each job lands on an idle worker that
/// has finished any bookkeeping after writing the previous result.
const LATENCY_GAP: Duration = Duration::from_millis(2);

/// Number of warm-up jobs before the idle window.
const IDLE_WARMUP_JOBS: usize = 100;

/// How long the malformed idle warm-up job may stay in `pending/`/`running/`.
const MALFORMED_TIMEOUT: Duration = Duration::from_secs(10);

/// Target: p50 of drop -> `started_at`, in ms.
const TARGET_START_P50_MS: f64 = 0.5;

/// Target: p50 of result latency minus bare spawn, in ms.
const TARGET_OVERHEAD_P50_MS: f64 = 0.5;

/// Target: idle VmRSS, in KiB (8 MiB).
const TARGET_RSS_KIB: u64 = 8 * 1024;

/// Target: context switches over all worker threads during the idle window.
const TARGET_IDLE_WAKEUPS: u64 = 0;

/// Runs the benchmark; exits non-zero only when the worker failed to process jobs.
fn main() -> ExitCode {
    let outcome = run();
    remove_finished_run_dirs();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = io::stdout().flush();
            eprintln!("\nbenchmark FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs all sections in order and prints the report.
fn run() -> Result<()> {
    install_interrupt_handler("workers")?;
    let settings = Settings::from_env()?;
    let mut report = Report::default();

    println!("ai-cmd-executor benchmark");
    println!("machine: {}", machine_line());
    println!("load:    loadavg 1/5/15 min {} (at start)", load_average());
    println!("worker:  {}", worker_bin());
    let built = binary_mtime();
    println!(
        "settings: BENCH_JOBS={} BENCH_IDLE_SECS={} BENCH_LATENCY_SAMPLES={} BENCH_ROUNDS={}",
        settings.jobs,
        settings.idle.as_secs_f64(),
        settings.latency_samples,
        settings.rounds
    );

    for loc in &settings.locations {
        println!("spool:   {}", loc.label);
    }
    let wants = |x: &str| settings.sections.iter().any(|s| s == x);

    if wants("throughput") {
        report.section(&format!("1. Throughput: {} jobs of `true`", settings.jobs));
        for p in PARALLELISM {
            throughput(
                &mut report,
                &settings.locations,
                settings.jobs,
                p,
                settings.rounds,
            )?;
        }
    }

    if wants("latency") {
        report.section(&format!(
            "2. Latency: {} jobs dropped one at a time into an idle worker (P=1)",
            settings.latency_samples
        ));
        for loc in &settings.locations {
            latency(&mut report, loc, settings.latency_samples)?;
        }
    }

    if wants("idle") {
        report.section(&format!(
            "3. Idle: {:.0} s window after {} jobs + 1 malformed job",
            settings.idle.as_secs_f64(),
            IDLE_WARMUP_JOBS
        ));
        idle(&mut report, Backtrace::Removed, settings.idle)?;
        idle(&mut report, Backtrace::Enabled, settings.idle)?;
    }

    println!("\nload:    loadavg 1/5/15 min {} (at end)", load_average());
    if binary_mtime() != built {
        println!(
            "WARNING: {} was rebuilt during the run; \
             the figures may mix two builds and a build's load",
            worker_bin()
        );
    }
    report.summary();
    Ok(())
}

// ---------------------------------------------------------------------------
// Interruption
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Settings and report
// ---------------------------------------------------------------------------

/// Knobs read from the environment.
struct Settings {
    /// Jobs per throughput run.
    jobs: usize,
    /// Length of the idle window.
    idle: Duration,
    /// Number of latency samples per spool location.
    latency_samples: usize,
    /// Rounds of throughput runs.
    rounds: usize,
    /// Sections to run (`BENCH_SECTIONS`).
    sections: Vec<String>,
    /// Where spools are made (`BENCH_SPOOLS`).
    locations: Vec<Location>,
}

/// A place to put the spool, with a label for the report.
#[derive(Clone)]
struct Location {
    /// Shown in the report.
    label: String,
    /// Parent directory of the temporary spool.
    base: PathBuf,
}

/// The default spool locations: the temp dir (`TMPDIR`, else `/tmp`) and,
/// when it exists, tmpfs at `/dev/shm`.
fn default_locations() -> Vec<Location> {
    let tmp = std::env::temp_dir();
    let mut v = vec![Location {
        label: format!("disk: {} ({})", tmp.display(), fs_type(&tmp)),
        base: tmp,
    }];
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        v.push(Location {
            label: "tmpfs: /dev/shm".into(),
            base: shm,
        });
    }
    v
}

/// Parses `BENCH_SPOOLS`: `label=dir` pairs separated by `;`.
fn parse_locations(spec: &str) -> Result<Vec<Location>> {
    spec.split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (label, dir) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("BENCH_SPOOLS entry {pair:?} is not label=dir"))?;
            let base = PathBuf::from(dir.trim());
            ensure!(
                base.is_dir(),
                "BENCH_SPOOLS: {} is not a directory",
                base.display()
            );
            Ok(Location {
                label: format!("{}: {} ({})", label.trim(), base.display(), fs_type(&base)),
                base,
            })
        })
        .collect()
}

/// The file system type of the mount holding `dir`, from /proc/self/mounts,
/// with "no journal" added for an ext4 mounted without one.
fn fs_type(dir: &Path) -> String {
    let Ok(dir) = dir.canonicalize() else {
        return "?".into();
    };
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return "?".into();
    };
    let best = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mnt)
                .then(|| (mnt.len(), dev.to_owned(), ty.to_owned()))
        })
        .max_by_key(|(len, _, _)| *len);
    match best {
        Some((_, dev, ty)) if ty == "ext4" => {
            let name = dev.rsplit('/').next().unwrap_or_default().to_owned();
            match fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")) {
                Ok(j) if j.trim() == "<none>" => "ext4, no journal".into(),
                Ok(_) => "ext4 with journal".into(),
                Err(_) => "ext4".into(),
            }
        }
        Some((_, _, ty)) => ty,
        None => "?".into(),
    }
}

impl Settings {
    /// Reads `BENCH_JOBS`, `BENCH_IDLE_SECS` and `BENCH_LATENCY_SAMPLES`.
    fn from_env() -> Result<Self> {
        let jobs = env_or("BENCH_JOBS", DEFAULT_JOBS)?;
        let idle_secs = env_or("BENCH_IDLE_SECS", DEFAULT_IDLE_SECS)?;
        let latency_samples = env_or("BENCH_LATENCY_SAMPLES", DEFAULT_LATENCY_SAMPLES)?;
        let rounds = env_or("BENCH_ROUNDS", DEFAULT_ROUNDS)?;
        ensure!(rounds >= 1, "BENCH_ROUNDS must be at least 1");
        ensure!(jobs >= 1, "BENCH_JOBS must be at least 1");
        ensure!(
            idle_secs.is_finite() && idle_secs > 0.0,
            "BENCH_IDLE_SECS must be a positive number"
        );
        ensure!(
            latency_samples >= 1,
            "BENCH_LATENCY_SAMPLES must be at least 1"
        );
        let sections: Vec<String> = std::env::var("BENCH_SECTIONS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "throughput,latency,idle".into())
            .split(',')
            .map(|x| x.trim().to_owned())
            .collect();
        for x in &sections {
            ensure!(
                ["throughput", "latency", "idle"].contains(&x.as_str()),
                "BENCH_SECTIONS: unknown section {x:?} (throughput, latency, idle)"
            );
        }
        let locations = match std::env::var("BENCH_SPOOLS") {
            Ok(v) if !v.trim().is_empty() => parse_locations(&v)?,
            _ => default_locations(),
        };
        ensure!(!locations.is_empty(), "BENCH_SPOOLS names no location");
        Ok(Self {
            jobs,
            idle: Duration::from_secs_f64(idle_secs),
            latency_samples,
            rounds,
            sections,
            locations,
        })
    }
}

/// Prints report rows as they are measured and counts PASS/MISS.
#[derive(Default)]
struct Report {
    /// Figures that met their target.
    pass: usize,
    /// Figures that missed their target.
    miss: usize,
}

impl Report {
    /// Prints a section heading.
    fn section(&self, title: &str) {
        println!("\n== {title}");
    }

    /// Prints a sub-heading inside a section.
    fn group(&self, title: &str) {
        println!("\n  [{title}]");
    }

    /// Prints a figure with its target and PASS/MISS.
    fn check(&mut self, name: &str, value: String, target: String, ok: bool) {
        let verdict = if ok {
            self.pass += 1;
            "PASS"
        } else {
            self.miss += 1;
            "MISS"
        };
        println!("    {name:<46} {value:>18}   target {target:<12} {verdict}");
    }

    /// Prints an informational figure that has no target.
    fn info(&self, name: &str, value: String) {
        println!("    {name:<46} {value:>18}   target -");
    }

    /// Prints a free-form note.
    fn note(&self, text: &str) {
        println!("    note: {text}");
    }

    /// Prints the PASS/MISS totals.
    fn summary(&self) {
        println!(
            "\n== Summary: {} PASS, {} MISS (the benchmark reports; it does not assert)",
            self.pass, self.miss
        );
    }
}

/// Modification time of the worker binary, to detect a rebuild during the run.
fn binary_mtime() -> Option<SystemTime> {
    fs::metadata(worker_bin()).and_then(|m| m.modified()).ok()
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Order statistics of a sample set, in the unit of the samples.
struct Stats {
    /// Median (nearest rank).
    p50: f64,
    /// 99th percentile (nearest rank).
    p99: f64,
    /// Largest sample.
    max: f64,
}

impl Stats {
    /// Computes the statistics of `samples` (must be non-empty).
    fn of(mut samples: Vec<f64>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            max: samples[samples.len() - 1],
        }
    }
}

/// Formats milliseconds with microsecond resolution.
fn ms(v: f64) -> String {
    format!("{v:.3} ms")
}

// ---------------------------------------------------------------------------
// Worker process, spool and result watcher
// ---------------------------------------------------------------------------

/// How the worker's environment treats `RUST_BACKTRACE`.
#[derive(Clone, Copy)]
enum Backtrace {
    /// Inherit whatever the benchmark was started with.
    Inherit,
    /// `RUST_BACKTRACE` removed from the worker's environment.
    Removed,
    /// `RUST_BACKTRACE=1` in the worker's environment.
    Enabled,
}

impl Backtrace {
    /// Label for the report.
    fn label(self) -> &'static str {
        match self {
            Backtrace::Inherit => "RUST_BACKTRACE inherited",
            Backtrace::Removed => "RUST_BACKTRACE unset",
            Backtrace::Enabled => "RUST_BACKTRACE=1",
        }
    }
}

/// Guard around a running worker process.
///
/// Dropping it sends SIGTERM, waits up to [`STOP_GRACE`], then SIGKILLs and
/// reaps the process, so no worker outlives the benchmark on any exit path
/// (error, panic, normal return, or SIGINT/SIGTERM/SIGHUP to the benchmark,
/// which [`install_interrupt_handler`] turns into an error).
struct Worker {
    /// The worker process.
    child: Child,
    /// File that receives the worker's stdout and stderr.
    log: PathBuf,
}

impl Worker {
    /// Starts `ai-cmd-executor run --spool SPOOL [--config CONFIG]`.
    fn start(
        spool: &Path,
        config: Option<&Path>,
        log: &Path,
        backtrace: Backtrace,
    ) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(worker_bin());
        cmd.arg("run").arg("--spool").arg(spool);
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        // Only RUST_BACKTRACE varies between runs; anyhow also reads this one.
        cmd.env_remove("RUST_LIB_BACKTRACE");
        match backtrace {
            Backtrace::Inherit => {}
            Backtrace::Removed => {
                cmd.env_remove("RUST_BACKTRACE");
            }
            Backtrace::Enabled => {
                cmd.env("RUST_BACKTRACE", "1");
            }
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting worker {}", worker_bin()))?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    /// The worker's process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the worker has exited or the benchmark was interrupted.
    fn check_alive(&mut self) -> Result<()> {
        check_interrupted()?;
        if let Some(status) = self.child.try_wait()? {
            bail!("worker exited unexpectedly ({status}){}", self.log_tail());
        }
        Ok(())
    }

    /// The last lines of the worker's output, formatted for an error message.
    fn log_tail(&self) -> String {
        const LINES: usize = 20;
        match fs::read_to_string(&self.log) {
            Ok(s) if !s.trim().is_empty() => {
                let lines: Vec<&str> = s.lines().collect();
                let start = lines.len().saturating_sub(LINES);
                format!(
                    "\n--- last worker output ({}) ---\n{}",
                    self.log.display(),
                    lines[start..].join("\n")
                )
            }
            _ => "\n(worker printed nothing)".to_owned(),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = Pid::from_raw(self.child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(None) => thread::sleep(Duration::from_millis(5)),
                    _ => return,
                }
            }
            eprintln!("worker {pid} ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A spool directory seen from the submitting side.
struct Spool {
    /// The spool root (`--spool DIR`).
    dir: PathBuf,
}

impl Spool {
    /// Path of a sub-directory of the spool.
    fn sub(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether the worker has created the directories the benchmark uses.
    fn is_ready(&self) -> bool {
        ["tmp", "pending", "completed"]
            .iter()
            .all(|d| self.sub(d).is_dir())
    }

    /// Submits a job: writes `body` to `tmp/<id>` and renames it to `pending/<id>.json`.
    fn submit(&self, id: &str, body: &[u8]) -> Result<()> {
        let tmp = self.dir.join("tmp").join(id);
        fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = self.dir.join("pending").join(format!("{id}.json"));
        fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))
    }

    /// Path of the result file of job `id`.
    fn result_path(&self, id: &str) -> PathBuf {
        self.dir.join("completed").join(format!("{id}.json"))
    }

    /// Reads and parses the result of job `id`.
    fn result(&self, id: &str) -> Result<JobResult> {
        let path = self.result_path(id);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let raw: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let time = |key: &str| -> Result<SystemTime> {
            let s = raw
                .get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("result {id}: no string `{key}`: {raw}"))?;
            humantime::parse_rfc3339(s).with_context(|| format!("result {id}: bad `{key}` {s:?}"))
        };
        Ok(JobResult {
            status: raw
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("<missing>")
                .to_owned(),
            exit_code: raw.get("exit_code").and_then(Value::as_i64),
            started_at: time("started_at").ok(),
            finished_at: time("finished_at").ok(),
            raw,
        })
    }

    /// Reads the result of a `true` job and checks that it succeeded with timestamps.
    fn succeeded(&self, id: &str) -> Result<(SystemTime, SystemTime)> {
        let r = self.result(id)?;
        ensure!(
            r.status == "succeeded" && r.exit_code == Some(0),
            "job {id} (`true`) did not succeed: {}",
            r.raw
        );
        match (r.started_at, r.finished_at) {
            (Some(s), Some(f)) => Ok((s, f)),
            _ => bail!(
                "job {id}: missing or invalid started_at/finished_at: {}",
                r.raw
            ),
        }
    }
}

/// The fields of a result file the benchmark uses.
struct JobResult {
    /// `status`, e.g. `"succeeded"`.
    status: String,
    /// `exit_code`, if any.
    exit_code: Option<i64>,
    /// `started_at`, if present and valid.
    started_at: Option<SystemTime>,
    /// `finished_at`, if present and valid.
    finished_at: Option<SystemTime>,
    /// The whole document, for error messages.
    raw: Value,
}

/// Watches `completed/` for results (IN_MOVED_TO of `<id>.json`).
struct ResultWatcher {
    /// Inotify instance with one watch on `completed/`.
    inotify: Inotify,
    /// Event buffer.
    buf: Vec<u8>,
    /// The watched `completed/` directory, rescanned on queue overflow.
    dir: PathBuf,
    /// Number of inotify queue overflows seen.
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

    /// Waits until every id in `pending` has a result, removing ids as their
    /// results appear; returns the instant the last one was observed.
    ///
    /// Fails when the worker exits or no awaited result appears for [`STALL_TIMEOUT`].
    fn wait_all(&mut self, worker: &mut Worker, pending: &mut HashSet<String>) -> Result<Instant> {
        let mut done_at = Instant::now();
        let mut last_progress = Instant::now();
        while !pending.is_empty() {
            check_interrupted()?;
            let ready = {
                let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(100u16)) {
                    Ok(n) => n > 0,
                    Err(Errno::EINTR) => false,
                    Err(e) => return Err(e).context("poll on inotify"),
                }
            };
            let now = Instant::now();
            if !ready {
                worker.check_alive()?;
                if last_progress.elapsed() > STALL_TIMEOUT {
                    let mut missing: Vec<&String> = pending.iter().collect();
                    missing.sort();
                    missing.truncate(5);
                    bail!(
                        "no result for {STALL_TIMEOUT:?}; {} result(s) still missing (e.g. {missing:?}); \
                         files in completed/: {}{}",
                        pending.len(),
                        count_results(&self.dir),
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
                for entry in fs::read_dir(&self.dir)? {
                    if let Some(id) = entry?.file_name().to_str().and_then(result_id) {
                        pending.remove(id);
                    }
                }
            }
            if pending.len() < before {
                done_at = now;
                last_progress = now;
            }
        }
        Ok(done_at)
    }
}

/// Number of result files in `dir` (for error messages).
fn count_results(dir: &Path) -> String {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().and_then(result_id).is_some())
            .count()
            .to_string(),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// A worker running on its own fresh spool, ready to take jobs.
///
/// Fields drop in declaration order: the worker is stopped before the spool
/// directory is put aside (see [`RunDir`]).
struct Fixture {
    /// The running worker.
    worker: Worker,
    /// Watcher on `completed/`.
    watcher: ResultWatcher,
    /// The spool.
    spool: Spool,
    /// Temporary directory holding the spool, config and worker log.
    root: RunDir,
}

impl Fixture {
    /// Creates a fresh spool (under `base`, or the default temp dir), starts a
    /// worker on it with `max_parallel` (no config file when `None`) and waits
    /// until it has created its directories and completed a warm-up job.
    fn start(
        base: Option<&Path>,
        max_parallel: Option<usize>,
        backtrace: Backtrace,
    ) -> Result<Self> {
        let root =
            RunDir::new("ai-cmd-bench-", base).context("creating temporary spool directory")?;
        let spool = Spool {
            dir: root.path().join("spool"),
        };
        fs::create_dir(&spool.dir)?;
        let config = match max_parallel {
            Some(p) => {
                let path = root.path().join("worker.toml");
                fs::write(&path, format!("max_parallel = {p}\n"))?;
                Some(path)
            }
            None => None,
        };
        let log = root.path().join("worker.log");
        let mut worker = Worker::start(&spool.dir, config.as_deref(), &log, backtrace)?;

        let deadline = Instant::now() + READY_TIMEOUT;
        while !spool.is_ready() {
            worker.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "worker did not create tmp/, pending/ and completed/ in {} within {READY_TIMEOUT:?}{}",
                    spool.dir.display(),
                    worker.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
        let mut watcher = ResultWatcher::new(&spool.sub("completed"))?;
        spool.submit("warmup", TRUE_JOB)?;
        let mut pending = HashSet::from(["warmup".to_owned()]);
        watcher
            .wait_all(&mut worker, &mut pending)
            .context("waiting for the warm-up job")?;
        spool.succeeded("warmup")?;
        Ok(Self {
            worker,
            watcher,
            spool,
            root,
        })
    }
}

// ---------------------------------------------------------------------------
// 1. Throughput
// ---------------------------------------------------------------------------

/// One run of the raw loop.
#[derive(Clone, Copy)]
struct RawRun {
    /// Jobs/s.
    rate: f64,
    /// CPU time of the `bash` children per job, in ms.
    child_ms: f64,
    /// Share of the machine's CPU time that went idle meanwhile.
    idle: f64,
    /// The machine's busy CPU time per job (all CPUs, everything), in ms.
    busy_ms: f64,
    /// The machine's CPUs.
    cpus: usize,
}

/// Raw reference: `n` runs of `bash -c true` split over `p` threads, each a
/// tight spawn+wait loop.
fn raw_throughput(n: usize, p: usize) -> Result<RawRun> {
    let cpu_before = CpuTimes::of("self")?;
    let machine_before = MachineCpu::now()?;
    let elapsed = split_loop(n, p, |_, _| bash_true())?;
    let machine = MachineCpu::now()?;
    let (_, child_ms) = CpuTimes::of("self")?.ms_since(cpu_before);
    Ok(RawRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        child_ms: child_ms / n as f64,
        idle: machine.idle_share_since(machine_before),
        busy_ms: machine.busy_ms_since(machine_before) / n as f64,
        cpus: machine.cpus(),
    })
}

/// Most results the file-work loop stages before syncing them: the most
/// the worker's recorder commits together.
const FILE_WORK_BATCH: usize = 32;

/// A fresh directory under `base` with the spool layout the contract
/// loops use.
fn contract_dir(base: &Path) -> Result<RunDir> {
    let root = RunDir::new("ai-cmd-bench-contract-", Some(base))
        .context("creating the contract loop's directory")?;
    for sub in ["tmp", "pending", "running", "completed", "logs"] {
        fs::create_dir(root.path().join(sub))?;
    }
    Ok(root)
}

/// The contract's own file work and nothing else: `n` jobs over `p`
/// threads, each a tight loop that does inline, per job, what the spool
/// contract asks of a submitter and a worker: the job file written to
/// `tmp/` and renamed into `pending/`, read back and renamed into
/// `running/`, a log file created and given to `bash -c true` as its stdout
/// and stderr, a result of a real result's size written to a temporary
/// file, fsynced and renamed into `completed/`, and the `running/` file
/// removed. No daemon, no inotify, no queue: it shows what the file system
/// charges any implementation of the contract, beside the raw loop (which
/// touches no file) and the worker (which overlaps some of this work with
/// the next job). Returns jobs/s and the `bash` children's CPU time per
/// job in ms (beside the raw loop's, it shows what the file work's I/O
/// does to the jobs' own cost).
fn contract_throughput(base: &Path, n: usize, p: usize) -> Result<(f64, f64)> {
    let root = contract_dir(base)?;
    let dir = root.path();
    let cpu_before = CpuTimes::of("self")?;
    let elapsed = split_loop(n, p, |t, i| {
        let id = format!("c{t}-{i:06}");
        let (log, running) = submit_and_claim(dir, &id)?;
        let status = Command::new("bash")
            .args(["-c", "true"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running bash -c true")?;
        ensure!(status.success(), "bash -c true failed: {status}");
        let (result, staged) = write_result(dir, &id)?;
        result.sync_all()?;
        drop(result);
        put_in_place(dir, &id, &staged, &running)
    })?;
    let (_, child_ms) = CpuTimes::of("self")?.ms_since(cpu_before);
    Ok((n as f64 / elapsed.as_secs_f64(), child_ms / n as f64))
}

/// The machine's CPU time per job, in ms, for the contract's file work
/// alone, done as cheaply as this benchmark knows how: the contract loop's
/// file work with no process, over `p` threads, each staging the results
/// of up to [`FILE_WORK_BATCH`] jobs with their write-back started before
/// it syncs and renames them, so that one journal commit covers many (as
/// the worker's recorder does).
fn file_work_cpu(base: &Path, n: usize, p: usize) -> Result<f64> {
    let root = contract_dir(base)?;
    let dir = root.path();
    let machine_before = MachineCpu::now()?;
    // One call per thread: thread `t` does its share of the `n` in batches.
    split_loop(p, p, |t, _| {
        let share = n / p + usize::from(t < n % p);
        let mut staged = Vec::with_capacity(FILE_WORK_BATCH);
        for start in (0..share).step_by(FILE_WORK_BATCH) {
            check_interrupted()?;
            for i in start..share.min(start + FILE_WORK_BATCH) {
                let id = format!("f{t}-{i:06}");
                let (_log, running) = submit_and_claim(dir, &id)?;
                let (result, tmp) = write_result(dir, &id)?;
                // Starts the write-back, as the worker does (see
                // `ai_cmd_executor::spool::Staged`).
                let _ = nix::fcntl::posix_fadvise(
                    &result,
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
                staged.push((id, result, tmp, running));
            }
            for (id, result, tmp, running) in staged.drain(..) {
                result.sync_all()?;
                drop(result);
                put_in_place(dir, &id, &tmp, &running)?;
            }
        }
        Ok(())
    })?;
    Ok(MachineCpu::now()?.busy_ms_since(machine_before) / n as f64)
}

/// The contract's file work for job `id` up to its process: the job file
/// written to `tmp/`, renamed into `pending/`, read back and renamed into
/// `running/`, and its log created. Returns the log and the `running/` path.
fn submit_and_claim(dir: &Path, id: &str) -> Result<(File, PathBuf)> {
    check_interrupted()?;
    let name = format!("{id}.json");
    let tmp = dir.join("tmp").join(&name);
    let pending = dir.join("pending").join(&name);
    let running = dir.join("running").join(&name);
    fs::write(&tmp, TRUE_JOB)?;
    fs::rename(&tmp, &pending)?;
    ensure!(
        fs::read(&pending)? == TRUE_JOB,
        "the job file read back differs"
    );
    fs::rename(&pending, &running)?;
    let log = File::options()
        .write(true)
        .create_new(true)
        .open(dir.join("logs").join(format!("{id}.log")))?;
    Ok((log, running))
}

/// A result of a real result's size written to a temporary file in
/// `completed/`, not yet synced. Returns the file and its path.
fn write_result(dir: &Path, id: &str) -> Result<(File, PathBuf)> {
    let tmp = dir.join("completed").join(format!(".{id}.json.tmp"));
    let mut result = File::create(&tmp)?;
    result.write_all(&[b' '; RESULT_BYTES])?;
    Ok((result, tmp))
}

/// Renames a synced result into place and removes the job's `running/` file.
fn put_in_place(dir: &Path, id: &str, tmp: &Path, running: &Path) -> Result<()> {
    fs::rename(tmp, dir.join("completed").join(format!("{id}.json")))?;
    fs::remove_file(running)?;
    Ok(())
}

/// Measures raw and worker throughput for `n` jobs at parallelism `p`,
/// with the spool in each location in turn (each checked against the
/// target: the file system's cost per file is part of what an operator
/// gets). Each of `rounds` rounds alternates raw loops and runs in each
/// location, raw, the contract loop, the file-work loop and the worker in
/// the first location, raw, the same in the next, ..., raw, so that every
/// worker run is bracketed by a raw loop just before and just after it;
/// its ratio is taken against the mean of those two, which cancels a
/// machine that speeds up or slows down during the round. The ratio checked is the
/// median of the rounds' ratios. The contract loop (see
/// [`contract_throughput`]) is information: how much of the raw rate the
/// contract's file work leaves to any implementation there.
///
/// So is the CPU ceiling: the contract's file work alone (no process,
/// batched: see [`file_work_cpu`]) is timed in machine CPU, and the
/// machine's CPUs divided by what a job then needs at the least (the raw
/// loop's CPU per job plus that file work's) gives the highest rate an
/// implementation of the contract that does its file work that cheaply
/// could reach there, as a ratio to the raw rate. It binds only where the
/// raw loop keeps the CPUs busy (P=2 on two CPUs); above 1 it does not.
fn throughput(
    report: &mut Report,
    locations: &[Location],
    n: usize,
    p: usize,
    rounds: usize,
) -> Result<()> {
    report.group(&format!("P={p}"));
    let raw_runs = rounds * (locations.len() + 1);
    let mut raws: Vec<RawRun> = Vec::with_capacity(raw_runs);
    let per_location = || -> Vec<Vec<f64>> { vec![Vec::with_capacity(rounds); locations.len()] };
    let mut ratios = per_location();
    let mut rates = per_location();
    let mut contract_rates = per_location();
    let mut contract_ratios = per_location();
    let mut contract_bash = per_location();
    let mut file_work = per_location();
    let mut ceilings = per_location();
    let mut last: Vec<Option<WorkerRun>> = (0..locations.len()).map(|_| None).collect();
    for _ in 0..rounds {
        let mut before = raw_throughput(n, p)?;
        raws.push(before);
        for (i, loc) in locations.iter().enumerate() {
            let (contract, contract_bash_ms) = contract_throughput(&loc.base, n, p)?;
            let file_work_ms = file_work_cpu(&loc.base, n, p)?;
            let run = worker_throughput(Some(&loc.base), n, p)?;
            let after = raw_throughput(n, p)?;
            raws.push(after);
            let reference = (before.rate + after.rate) / 2.0;
            let raw_busy_ms = (before.busy_ms + after.busy_ms) / 2.0;
            let capacity = after.cpus as f64 * 1000.0 / (raw_busy_ms + file_work_ms);
            ratios[i].push(run.rate() / reference);
            rates[i].push(run.rate());
            contract_ratios[i].push(contract / reference);
            contract_rates[i].push(contract);
            contract_bash[i].push(contract_bash_ms);
            file_work[i].push(file_work_ms);
            ceilings[i].push(capacity / reference);
            last[i] = Some(run);
            before = after;
        }
    }
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let of_raws = |f: fn(&RawRun) -> f64| raws.iter().map(f).collect::<Vec<_>>();
    report.info(
        &format!("raw bash -c true loop ({p} thread(s)), median"),
        format!("{:.1} jobs/s", median(&of_raws(|r| r.rate))),
    );
    report.info(
        "  raw, each run",
        format!("{} jobs/s", list(&of_raws(|r| r.rate), 0)),
    );
    report.info(
        "  bash CPU per job (raw loop)",
        ms(median(&of_raws(|r| r.child_ms))),
    );
    report.info(
        "  machine CPU per job (raw loop, all CPUs)",
        ms(median(&of_raws(|r| r.busy_ms))),
    );
    report.info(
        "  CPUs idle during the raw loop, each run",
        list(&of_raws(|r| r.idle * 100.0), 1) + " %",
    );

    for (i, loc) in locations.iter().enumerate() {
        report.info(
            &format!("worker, max_parallel={p}, {}", loc.label),
            format!("{:.1} jobs/s", median(&rates[i])),
        );
        let ratio = median(&ratios[i]);
        report.check(
            "ratio worker/raw (median of rounds)",
            format!("{ratio:.3}"),
            format!(">= {TARGET_RATIO}"),
            ratio >= TARGET_RATIO,
        );
        report.info("  ratio, each round", list(&ratios[i], 3));
        report.info(
            "  contract loop (same file work inline, no daemon), median",
            format!(
                "{:.1} jobs/s, {:.3} of raw",
                median(&contract_rates[i]),
                median(&contract_ratios[i])
            ),
        );
        report.info(
            "  ratio contract loop/raw, each round",
            list(&contract_ratios[i], 3),
        );
        report.info(
            "  bash CPU per job in the contract loop (median)",
            ms(median(&contract_bash[i])),
        );
        report.info(
            "  ratio worker/contract loop (median of rounds)",
            format!("{:.3}", median(&quotients(&rates[i], &contract_rates[i]))),
        );
        report.info(
            "  contract file work alone (no process, batched), CPU per job",
            format!(
                "{} (each round: {} ms)",
                ms(median(&file_work[i])),
                list(&file_work[i], 3)
            ),
        );
        report.info(
            "  CPU ceiling: CPUs / (raw + file work CPU), of raw, each round",
            list(&ceilings[i], 3),
        );
        report.info(
            "  CPU ceiling (median); worker/ceiling (median)",
            format!(
                "{:.3}; {:.3}",
                median(&ceilings[i]),
                median(&quotients(&ratios[i], &ceilings[i]))
            ),
        );
        if let Some(run) = &last[i] {
            report.note("details of the last round:");
            run.print_details(report);
        }
    }
    Ok(())
}

/// `a[k] / b[k]` for each round `k`.
fn quotients(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// One timed batch of jobs through a worker.
struct WorkerRun {
    /// Number of jobs.
    jobs: usize,
    /// Parallelism the worker was configured with.
    parallel: usize,
    /// First drop to last result.
    elapsed: Duration,
    /// Time the benchmark took to drop all jobs.
    dropped: Duration,
    /// `(started_at, finished_at)` of every job.
    runs: Vec<(SystemTime, SystemTime)>,
    /// Inotify queue overflows while waiting.
    overflows: usize,
    /// The worker's own CPU time during the batch, in ms.
    worker_cpu_ms: f64,
    /// CPU time of the worker's reaped children (the jobs) during the batch, in ms.
    jobs_cpu_ms: f64,
    /// Share of the machine's CPU time that went idle during the batch.
    idle: f64,
}

impl WorkerRun {
    /// Jobs per second.
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }

    /// Prints timing details derived from the results' own timestamps.
    fn print_details(&self, report: &Report) {
        let detail = |name: &str| format!("  {name}");
        report.info(
            &detail("first drop -> last result"),
            ms(self.elapsed.as_secs_f64() * 1e3),
        );
        report.info(
            &detail(&format!("time to drop all {} jobs", self.jobs)),
            ms(self.dropped.as_secs_f64() * 1e3),
        );
        let busy_ms: f64 = self.runs.iter().map(|&(s, f)| signed_ms(f, s)).sum();
        report.info(
            &detail("mean started_at -> finished_at"),
            ms(busy_ms / self.jobs as f64),
        );
        report.info(
            &detail("mean concurrency (sum of run times / wall)"),
            format!("{:.2}", busy_ms / (self.elapsed.as_secs_f64() * 1e3)),
        );
        report.info(
            &detail("worker's own CPU per job"),
            ms(self.worker_cpu_ms / self.jobs as f64),
        );
        report.info(
            &detail("bash CPU per job (worker's children)"),
            ms(self.jobs_cpu_ms / self.jobs as f64),
        );
        report.info(
            &detail("CPUs idle during the drain"),
            format!("{:.1} %", self.idle * 100.0),
        );
        if self.parallel == 1 && self.runs.len() > 1 {
            let mut runs = self.runs.clone();
            runs.sort_by_key(|&(s, _)| s);
            let gaps: Vec<f64> = runs.windows(2).map(|w| signed_ms(w[1].0, w[0].1)).collect();
            let g = Stats::of(gaps);
            report.info(
                &detail("gap finished_at -> next started_at p50/p99"),
                format!("{:.3}/{:.3} ms", g.p50, g.p99),
            );
        }
        if self.overflows > 0 {
            report.note(&format!(
                "inotify queue overflowed {} time(s); completion times fell back to directory scans",
                self.overflows
            ));
        }
    }
}

/// Drops `n` jobs as fast as possible into a fresh worker with
/// `max_parallel = p` on a spool under `base`, and times them.
fn worker_throughput(base: Option<&Path>, n: usize, p: usize) -> Result<WorkerRun> {
    let mut fx = Fixture::start(base, Some(p), Backtrace::Inherit)?;
    let ids: Vec<String> = (0..n).map(|i| format!("tp{p}-{i:06}")).collect();
    let mut pending: HashSet<String> = ids.iter().cloned().collect();

    let pid = fx.worker.pid().to_string();
    let cpu_before = CpuTimes::of(&pid)?;
    let machine_before = MachineCpu::now()?;
    let start = Instant::now();
    for id in &ids {
        fx.spool.submit(id, TRUE_JOB)?;
    }
    let dropped = start.elapsed();
    let last = fx
        .watcher
        .wait_all(&mut fx.worker, &mut pending)
        .with_context(|| format!("throughput run P={p} in {}", fx.spool.dir.display()))?;
    let idle = MachineCpu::now()?.idle_share_since(machine_before);
    let (worker_cpu_ms, jobs_cpu_ms) = CpuTimes::of(&pid)?.ms_since(cpu_before);

    // Checked after the timed part: every job must have succeeded.
    let runs = ids
        .iter()
        .map(|id| fx.spool.succeeded(id))
        .collect::<Result<Vec<_>>>()?;
    Ok(WorkerRun {
        jobs: n,
        parallel: p,
        elapsed: last - start,
        dropped,
        runs,
        overflows: fx.watcher.overflows,
        worker_cpu_ms,
        jobs_cpu_ms,
        idle,
    })
}

// ---------------------------------------------------------------------------
// 2. Latency
// ---------------------------------------------------------------------------

/// Measures single-job latency on a spool under `base` (default temp dir when `None`).
fn latency(report: &mut Report, loc: &Location, samples: usize) -> Result<()> {
    let label = loc.label.as_str();
    let base = Some(loc.base.as_path());
    report.group(label);

    let mut fx = Fixture::start(base, Some(1), Backtrace::Inherit)?;
    report.info("spool", fx.spool.dir.display().to_string());
    let mut to_start = Vec::with_capacity(samples);
    let mut to_result = Vec::with_capacity(samples);
    let mut run = Vec::with_capacity(samples);
    let mut record = Vec::with_capacity(samples);
    // The bare spawn reference is interleaved with the worker samples, each
    // after the same idle gap: on a VM the cost of a lone spawn drifts by a
    // third from one minute to the next, and a reference taken before the
    // samples would carry that drift into the difference.
    let mut bare = Vec::with_capacity(samples);
    for i in 0..samples {
        let id = format!("lat-{i:05}");
        thread::sleep(LATENCY_GAP);
        let t = Instant::now();
        bash_true()?;
        bare.push(t.elapsed().as_secs_f64() * 1e3);
        thread::sleep(LATENCY_GAP);
        fx.spool.submit(&id, TRUE_JOB)?;
        let dropped_mono = Instant::now();
        let dropped_wall = SystemTime::now();
        let mut pending = HashSet::from([id.clone()]);
        let seen = fx
            .watcher
            .wait_all(&mut fx.worker, &mut pending)
            .with_context(|| format!("latency sample {i} ({label})"))?;
        let (started, finished) = fx.spool.succeeded(&id)?;
        let seen_wall = dropped_wall + (seen - dropped_mono);
        to_start.push(signed_ms(started, dropped_wall));
        to_result.push((seen - dropped_mono).as_secs_f64() * 1e3);
        run.push(signed_ms(finished, started));
        record.push(signed_ms(seen_wall, finished));
    }
    let bare = Stats::of(bare);
    let run = Stats::of(run);
    let record = Stats::of(record);
    let overhead: Vec<f64> = to_result.iter().map(|r| r - bare.p50).collect();
    let to_start = Stats::of(to_start);
    let to_result = Stats::of(to_result);
    let overhead = Stats::of(overhead);

    report.check(
        "(a) drop -> started_at p50",
        ms(to_start.p50),
        format!("< {TARGET_START_P50_MS} ms"),
        to_start.p50 < TARGET_START_P50_MS,
    );
    report.info("(a) drop -> started_at p99", ms(to_start.p99));
    report.info("(b) drop -> result file p50", ms(to_result.p50));
    report.info("(b) drop -> result file p99", ms(to_result.p99));
    report.info("(b) drop -> result file max", ms(to_result.max));
    report.info("bare bash -c true spawn+wait p50", ms(bare.p50));
    report.info("bare bash -c true spawn+wait p99", ms(bare.p99));
    report.check(
        "(c) result latency - bare spawn p50",
        ms(overhead.p50),
        format!("< {TARGET_OVERHEAD_P50_MS} ms"),
        overhead.p50 < TARGET_OVERHEAD_P50_MS,
    );
    report.info("(c) result latency - bare spawn p99", ms(overhead.p99));
    report.info(
        "  breakdown of (b): started_at -> finished_at p50",
        ms(run.p50),
    );
    report.info(
        "  breakdown of (b): finished_at -> result file p50",
        ms(record.p50),
    );

    let (create, fsync) = fsync_cost(fx.root.path())?;
    report.info(
        &format!("write+fsync {FSYNC_PROBE_BYTES} B, same fs p50"),
        ms(fsync.p50),
    );
    report.info(
        &format!("write+fsync {FSYNC_PROBE_BYTES} B, same fs p99"),
        ms(fsync.p99),
    );
    report.info("create (open O_CREAT) of that file p50", ms(create.p50));
    Ok(())
}

/// Costs, in ms, of creating a small file in `dir` (open with O_CREAT) and
/// of writing [`FSYNC_PROBE_BYTES`] to it and fsyncing it.
fn fsync_cost(dir: &Path) -> Result<(Stats, Stats)> {
    let body = vec![b'x'; FSYNC_PROBE_BYTES];
    let mut creates = Vec::with_capacity(FSYNC_SAMPLES);
    let mut syncs = Vec::with_capacity(FSYNC_SAMPLES);
    for i in 0..FSYNC_SAMPLES {
        let path = dir.join(format!("fsync-probe-{i}"));
        let t0 = Instant::now();
        let mut f = File::create(&path)?;
        let t1 = Instant::now();
        f.write_all(&body)?;
        f.sync_all()?;
        let t2 = Instant::now();
        drop(f);
        creates.push((t1 - t0).as_secs_f64() * 1e3);
        syncs.push((t2 - t1).as_secs_f64() * 1e3);
        fs::remove_file(&path)?;
    }
    Ok((Stats::of(creates), Stats::of(syncs)))
}

// ---------------------------------------------------------------------------
// 3. Idle
// ---------------------------------------------------------------------------

/// Context-switch counters of one worker thread over the idle window.
struct ThreadTrack {
    /// Thread name (`comm`).
    name: String,
    /// Switches at the window start (0 for threads created during the window).
    base: u64,
    /// Switches at the last sample that saw the thread.
    last: u64,
    /// Whether the thread still existed at the last sample.
    alive: bool,
    /// Whether the thread was created during the window.
    born: bool,
}

impl ThreadTrack {
    /// Wake-ups attributed to this thread; a thread that exited during the
    /// window woke up at least once to do so.
    fn wakeups(&self) -> u64 {
        let seen = self.last.saturating_sub(self.base);
        if self.alive { seen } else { seen.max(1) }
    }
}

/// CPU time of a process, from `/proc/<pid>/stat`, in clock ticks.
#[derive(Clone, Copy)]
struct CpuTimes {
    /// utime + stime of the process itself (all threads, live and exited).
    own: u64,
    /// cutime + cstime of the children it has waited for.
    children: u64,
}

impl CpuTimes {
    /// Reads the CPU times of `pid` (a number, or `self`).
    fn of(pid: &str) -> Result<Self> {
        let [utime, stime, cutime, cstime] = cpu_ticks(pid)?;
        Ok(Self {
            own: utime + stime,
            children: cutime + cstime,
        })
    }

    /// `(own, children)` CPU time since `earlier`, in ms.
    fn ms_since(self, earlier: Self) -> (f64, f64) {
        let ms = ticks_ms;
        (
            ms(self.own.saturating_sub(earlier.own)),
            ms(self.children.saturating_sub(earlier.children)),
        )
    }
}

/// Measures an idle worker's memory, CPU and wake-ups after a warm-up.
fn idle(report: &mut Report, backtrace: Backtrace, window: Duration) -> Result<()> {
    report.group(backtrace.label());
    let mut fx = Fixture::start(None, None, backtrace)?;

    // Warm-up: a malformed job (error path) followed by regular jobs.
    fx.spool.submit("malformed", b"{not json")?;
    let mut pending: HashSet<String> = (0..IDLE_WARMUP_JOBS)
        .map(|i| format!("idle-{i:04}"))
        .collect();
    for id in &pending {
        fx.spool.submit(id, TRUE_JOB)?;
    }
    fx.watcher
        .wait_all(&mut fx.worker, &mut pending)
        .context("idle warm-up")?;
    let deadline = Instant::now() + MALFORMED_TIMEOUT;
    let malformed_left = |fx: &Fixture| {
        fx.spool.sub("pending").join("malformed.json").exists()
            || fx.spool.sub("running").join("malformed.json").exists()
    };
    while malformed_left(&fx) && Instant::now() < deadline {
        fx.worker.check_alive()?;
        thread::sleep(Duration::from_millis(5));
    }
    let outcome = if malformed_left(&fx) {
        format!("still in pending/ or running/ after {MALFORMED_TIMEOUT:?}")
    } else {
        match fx.spool.result("malformed") {
            Ok(r) => format!("result status {:?}", r.status),
            Err(_) => "no readable result in completed/".to_owned(),
        }
    };
    report.info("malformed job outcome", outcome);
    thread::sleep(IDLE_SETTLE);
    fx.worker.check_alive()?;

    // The window: sample per-thread counters so threads that exit mid-window
    // are still accounted for. Reading /proc does not wake the worker.
    let pid = fx.worker.pid();
    let cpu_before = CpuTimes::of(&pid.to_string())?;
    let mut threads: HashMap<u32, ThreadTrack> = thread_switches(pid)?
        .into_iter()
        .map(|(tid, (name, n))| {
            let track = ThreadTrack {
                name,
                base: n,
                last: n,
                alive: true,
                born: false,
            };
            (tid, track)
        })
        .collect();
    let threads_at_start = threads.len();
    let start = Instant::now();
    let end = start + window;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        thread::sleep(IDLE_SAMPLE_PERIOD.min(end - now));
        fx.worker.check_alive()?;
        let snapshot = thread_switches(pid)?;
        for (tid, track) in threads.iter_mut() {
            track.alive = snapshot.contains_key(tid);
        }
        for (tid, (name, n)) in snapshot {
            threads
                .entry(tid)
                .and_modify(|t| t.last = n)
                .or_insert(ThreadTrack {
                    name,
                    base: 0,
                    last: n,
                    alive: true,
                    born: true,
                });
        }
    }
    let cpu_after = CpuTimes::of(&pid.to_string())?;
    let (rss, hwm) = memory_kib(pid)?;
    let threads_at_end = threads.values().filter(|t| t.alive).count();

    let wakeups: u64 = threads.values().map(ThreadTrack::wakeups).sum();
    let (cpu_ms, _) = cpu_after.ms_since(cpu_before);

    report.check(
        "VmRSS after window",
        format!("{:.2} MiB", rss as f64 / 1024.0),
        format!("< {} MiB", TARGET_RSS_KIB / 1024),
        rss < TARGET_RSS_KIB,
    );
    report.info(
        "VmHWM (peak RSS)",
        format!("{:.2} MiB", hwm as f64 / 1024.0),
    );
    report.info("CPU time (utime+stime) in window", format!("{cpu_ms} ms"));
    report.check(
        "wake-ups (ctx switches, all threads)",
        wakeups.to_string(),
        format!("= {TARGET_IDLE_WAKEUPS}"),
        wakeups == TARGET_IDLE_WAKEUPS,
    );
    report.info(
        "threads at window start / end",
        format!("{threads_at_start} / {threads_at_end}"),
    );
    if wakeups > 0 {
        let mut noisy: Vec<(&u32, &ThreadTrack)> =
            threads.iter().filter(|(_, t)| t.wakeups() > 0).collect();
        noisy.sort_by_key(|(tid, _)| **tid);
        for (tid, t) in noisy {
            let state = match (t.born, t.alive) {
                (true, true) => ", created during window",
                (true, false) => ", created and exited during window",
                (false, false) => ", exited during window",
                (false, true) => "",
            };
            report.note(&format!(
                "thread {tid} ({}) woke {} time(s){state}",
                t.name,
                t.wakeups()
            ));
        }
    }
    Ok(())
}

//! The one harness behind both benchmarks (`throughput.rs`, `peers.rs`):
//! the runner ([`run_bench`]: header, lock, interrupts, clean-up, exit
//! status), the report format, the environment knobs, the raw loop, the
//! `/proc` readers and the statistics. The worker under test and its spool
//! are in [`worker`]; daemons and the idle window in [`daemon`].

#![allow(dead_code)] // each benchmark uses its own part

pub mod daemon;
pub mod worker;

pub use daemon::*;
pub use worker::*;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use tempfile::TempDir;
use tokio::signal::unix::{SignalKind, signal};

/// Pause between the last warm-up job and the idle window.
pub const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// Sampling period of the per-thread counters during the idle window.
pub const IDLE_SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// How long a daemon may take to come up (and run a warm-up job).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Fail when no awaited result has appeared for this long.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Target: ai-cmd-executor throughput / raw throughput, at both parallelisms.
pub const TARGET_RATIO: f64 = 0.85;
/// Parallelism levels of every throughput figure.
pub const PARALLELISM: [usize; 2] = [1, 2];
/// Units of utime/stime in `/proc/<pid>/stat` (`USER_HZ`, 100 by the ABI).
pub const CLOCK_TICKS_PER_SEC: u64 = 100;
/// The lock every measurement on the machine holds.
pub const BENCH_LOCK: &str = "/var/tmp/bench.lock";

// ---------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------

/// Runs a benchmark under [`BENCH_LOCK`] with the header and the PASS/MISS
/// totals; `body` returns `Ok(false)` when it finished but something failed.
pub fn run_bench<S>(
    title: &str,
    settings: impl FnOnce() -> Result<(S, String)>,
    body: impl FnOnce(S) -> Result<bool>,
) -> ExitCode {
    let outcome = (|| -> Result<bool> {
        let (settings, line) = settings()?;
        install_interrupt_handler()?;
        let _lock = bench_lock()?;
        println!("{title}");
        println!("machine: {}", machine_line());
        println!("tmpdir:  {}", tmpdir_line());
        println!("load:    loadavg 1/5/15 min {} (at start)", load_average());
        println!("worker:  {}", worker_bin());
        println!("settings: {line}");
        let built = binary_mtime();
        let started = Instant::now();
        let ok = body(settings)?;
        println!("\nload:    loadavg 1/5/15 min {} (at end)", load_average());
        println!("total time: {:.0} s", started.elapsed().as_secs_f64());
        if binary_mtime() != built {
            println!(
                "WARNING: {} was rebuilt during the run; the figures may mix two builds",
                worker_bin()
            );
        }
        println!(
            "\n== Summary: {} PASS, {} MISS (the benchmark reports; it does not assert)",
            PASSED.load(Ordering::Relaxed),
            MISSED.load(Ordering::Relaxed)
        );
        Ok(ok)
    })();
    remove_finished_run_dirs();
    let _ = io::stdout().flush();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("\nbenchmark finished, but a part of it FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("\nbenchmark FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Takes [`BENCH_LOCK`] if nobody holds it (`scripts/bench.sh` takes it
/// before building); returns the held file, if any.
fn bench_lock() -> Result<Option<File>> {
    let file = match File::open(BENCH_LOCK) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(BENCH_LOCK),
        other => other,
    }
    .with_context(|| format!("opening {BENCH_LOCK}"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => {
            println!("note: {BENCH_LOCK} is held (by scripts/bench.sh, presumably)");
            Ok(None)
        }
        Err(fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {BENCH_LOCK}")),
    }
}

/// `BENCH_JOBS`, `BENCH_IDLE_SECS` and `BENCH_LATENCY_SAMPLES`.
pub struct Knobs {
    pub jobs: usize,
    pub idle: Duration,
    pub latency_samples: usize,
}

impl Knobs {
    /// Reads the knobs; the idle window defaults to `idle_secs`.
    pub fn from_env(idle_secs: f64) -> Result<Self> {
        let jobs = env_or("BENCH_JOBS", 1000)?;
        let idle_secs = env_or("BENCH_IDLE_SECS", idle_secs)?;
        let latency_samples = env_or("BENCH_LATENCY_SAMPLES", 200)?;
        ensure!(jobs >= 1, "BENCH_JOBS must be at least 1");
        let positive = idle_secs.is_finite() && idle_secs > 0.0;
        ensure!(positive, "BENCH_IDLE_SECS must be positive");
        let samples_ok = latency_samples >= 1;
        ensure!(samples_ok, "BENCH_LATENCY_SAMPLES must be at least 1");
        let idle = Duration::from_secs_f64(idle_secs);
        Ok(Self {
            jobs,
            idle,
            latency_samples,
        })
    }

    /// The knobs as the header shows them.
    pub fn line(&self) -> String {
        format!(
            "BENCH_JOBS={} BENCH_IDLE_SECS={} BENCH_LATENCY_SAMPLES={}",
            self.jobs,
            self.idle.as_secs_f64(),
            self.latency_samples
        )
    }
}

/// Parses environment variable `name`, or returns `default` when it is unset or empty.
pub fn env_or<T>(name: &str, default: T) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| anyhow!("invalid {name}={v:?}: {e}")),
        _ => Ok(default),
    }
}

/// The comma-separated list in `name`, each one of `allowed` (all when unset).
pub fn env_list(name: &str, allowed: &[&str]) -> Result<Vec<String>> {
    let v = std::env::var(name).unwrap_or_default();
    let list: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect();
    if let Some(x) = list.iter().find(|x| !allowed.contains(x)) {
        bail!("{name}: unknown {x:?} (one of {})", allowed.join(", "));
    }
    let list = if list.is_empty() { allowed } else { &list };
    Ok(list.iter().map(|x| x.to_string()).collect())
}

// ---------------------------------------------------------------------------
// The report: one format for every figure
// ---------------------------------------------------------------------------

/// Figures that met their target.
static PASSED: AtomicUsize = AtomicUsize::new(0);
/// Figures that missed their target.
static MISSED: AtomicUsize = AtomicUsize::new(0);

/// Prints a section heading.
pub fn section(title: &str) {
    println!("\n== {title}");
}

/// Prints a sub-heading inside a section.
pub fn group(title: &str) {
    println!("\n  [{title}]");
}

/// Prints a figure with its target and PASS/MISS.
pub fn check(name: &str, value: impl std::fmt::Display, target: String, ok: bool) {
    let verdict = if ok { "PASS" } else { "MISS" };
    [&PASSED, &MISSED][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    let value = value.to_string();
    println!("    {name:<52} {value:>18}   target {target:<12} {verdict}");
}

/// Prints an informational figure that has no target.
pub fn info(name: &str, value: impl std::fmt::Display) {
    let value = value.to_string();
    println!("    {name:<52} {value:>18}   target -");
}

/// [`info`] for each `(name, value)`.
pub fn infos(figures: &[(&str, String)]) {
    figures.iter().for_each(|(name, value)| info(name, value));
}

/// Prints a free-form note.
pub fn note(text: &str) {
    println!("    note: {text}");
}

/// Formats milliseconds with microsecond resolution.
pub fn ms(v: f64) -> String {
    format!("{v:.3} ms")
}

/// Numbers joined by spaces, with `digits` decimals.
pub fn list(v: &[f64], digits: usize) -> String {
    let v: Vec<String> = v.iter().map(|x| format!("{x:.digits$}")).collect();
    v.join(" ")
}

// ---------------------------------------------------------------------------
// Interruption and waiting
// ---------------------------------------------------------------------------

/// Set when SIGINT, SIGTERM or SIGHUP arrives; checked by every wait loop.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Sets [`INTERRUPTED`] on SIGINT, SIGTERM or SIGHUP, so that the wait loops
/// fail and every guard is dropped on the way out. tokio's signal streams
/// need no `unsafe` and block no signal, which children would inherit.
fn install_interrupt_handler() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let kinds = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ];
    let [int, term, hup] = {
        let _in_runtime = rt.enter();
        kinds.map(signal)
    };
    let (mut int, mut term, mut hup) = (int?, term?, hup?);
    thread::spawn(move || {
        rt.block_on(async move {
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => "SIGHUP",
                };
                eprintln!("\n{name} received: stopping");
                INTERRUPTED.store(true, Ordering::Relaxed);
            }
        })
    });
    Ok(())
}

/// Fails once the benchmark has been interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `f` until it returns `Some`, with naps growing to `max_nap`;
/// fails after `deadline`, on interruption, or with `f`'s error.
pub fn poll_until<T>(
    what: &str,
    deadline: Duration,
    max_nap: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    loop {
        check_interrupted()?;
        if let Some(v) = f()? {
            return Ok(v);
        }
        let late = start.elapsed() > deadline;
        ensure!(!late, "timed out after {deadline:?} waiting for {what}");
        thread::sleep(nap);
        nap = (nap * 2).min(max_nap);
    }
}

/// [`poll_until`] that panics instead of failing: the sandbox helper
/// (`tests/common/sandbox.rs`) calls this as `super::wait_for`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    poll_until(what, deadline, Duration::from_millis(50), || Ok(f()))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

// ---------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------

/// nproc, CPU model and kernel.
pub fn machine_line() -> String {
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("nproc={nproc} cpu=\"{cpu}\" kernel={kernel}")
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The temp dir (where run directories go by default), its mount and options.
fn tmpdir_line() -> String {
    let dir = std::env::temp_dir();
    let mount = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE,OPTIONS", "-T"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(String::new, |o| {
            format!(" on {}", String::from_utf8_lossy(&o.stdout).trim())
        });
    format!("{}{mount} ({})", dir.display(), fs_type(&dir))
}

/// The file system type holding `dir`, and whether an ext4 has a journal.
pub fn fs_type(dir: &Path) -> String {
    let (Ok(dir), Ok(mounts)) = (dir.canonicalize(), fs::read_to_string("/proc/self/mounts"))
    else {
        return "?".into();
    };
    let best = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mnt).then_some((mnt.len(), dev, ty))
        })
        .max_by_key(|(len, _, _)| *len);
    match best {
        Some((_, dev, "ext4")) => {
            let name = dev.rsplit('/').next().unwrap_or_default();
            match fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")) {
                Ok(j) if j.trim() == "<none>" => "ext4, no journal".into(),
                Ok(_) => "ext4 with journal".into(),
                Err(_) => "ext4".into(),
            }
        }
        Some((_, _, ty)) => ty.to_owned(),
        None => "?".into(),
    }
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Order statistics (nearest rank) of a sample set, in ms.
#[derive(Clone, Copy)]
pub struct Stats {
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    /// Computes the statistics of `samples` (must be non-empty).
    pub fn of(mut samples: Vec<f64>) -> Result<Self> {
        ensure!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p / 100.0 * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        Ok(Self {
            p50: rank(50.0),
            p99: rank(99.0),
            min: samples[0],
            max: samples[samples.len() - 1],
            n: samples.len(),
        })
    }

    /// One line: p50, p99, min, max.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms (min {:.3}, max {:.3}, n={})",
            self.p50, self.p99, self.min, self.max, self.n
        )
    }
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// `a[k] / b[k]` for each `k`.
pub fn quotients(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// `later - earlier` in milliseconds, negative when `later` is earlier.
pub fn signed_ms(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// Voluntary + non-voluntary context switches and name of each thread of `pid`.
pub fn thread_switches(pid: u32) -> Result<HashMap<u32, (String, u64)>> {
    let mut out = HashMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may exit between listing and reading: skip it.
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let switches = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .map(|key| status_field(&status, key).unwrap_or(0))
            .sum();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        out.insert(tid, (name, switches));
    }
    Ok(out)
}

/// First number after `key` in a `/proc/.../status` file.
fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `(VmRSS, VmHWM)` of `pid` in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get =
        |key| status_field(&status, key).ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"));
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}

/// Clock ticks as milliseconds.
pub fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / CLOCK_TICKS_PER_SEC as f64
}

/// CPU time of a process, from `/proc/<pid>/stat`, in clock ticks.
#[derive(Clone, Copy)]
pub struct CpuTimes {
    pub own: u64,      // utime + stime, all threads
    pub children: u64, // cutime + cstime of the reaped children
}

impl CpuTimes {
    /// Reads the CPU times of `pid` (a number, or `self`).
    pub fn of(pid: impl std::fmt::Display) -> Result<Self> {
        let path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the parenthesised command name start at field 3;
        // utime, stime, cutime and cstime are fields 14 to 17.
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace())
            .into_iter()
            .flatten()
            .skip(14 - 3)
            .take(4)
            .map_while(|v| v.parse().ok())
            .collect();
        ensure!(f.len() == 4, "malformed {path}");
        Ok(Self {
            own: f[0] + f[1],
            children: f[2] + f[3],
        })
    }

    /// `(own, children)` CPU time since `earlier`, in ms.
    pub fn ms_since(self, earlier: Self) -> (f64, f64) {
        (
            ticks_ms(self.own.saturating_sub(earlier.own)),
            ticks_ms(self.children.saturating_sub(earlier.children)),
        )
    }
}

/// The whole machine's CPU time so far (all CPUs), in ticks, from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    idle: u64,  // idle + iowait
    total: u64, // every state (guest time is inside user and nice)
    pub cpus: usize,
}

impl MachineCpu {
    /// Reads `/proc/stat`.
    pub fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .ok_or_else(|| anyhow!("/proc/stat does not start with the cpu line"))?
            .split_whitespace()
            .map(|v| v.parse().context("parsing /proc/stat"))
            .collect::<Result<_>>()?;
        ensure!(fields.len() >= 8, "/proc/stat: short cpu line");
        let cpus = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        Ok(MachineCpu {
            idle: fields[3] + fields[4],
            // user nice system idle iowait irq softirq steal
            total: fields[..8].iter().sum(),
            cpus: cpus.max(1),
        })
    }

    /// CPU time spent on all CPUs since `earlier`, by anything, in ms.
    pub fn busy_ms_since(self, earlier: MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        ticks_ms(total.saturating_sub(self.idle.saturating_sub(earlier.idle)))
    }

    /// The share of all CPUs' time since `earlier` that went idle.
    pub fn idle_share_since(self, earlier: MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.idle.saturating_sub(earlier.idle) as f64 / total as f64
    }
}

// ---------------------------------------------------------------------------
// Run directories and loops
// ---------------------------------------------------------------------------

/// The temporary directory of one run, deleted only when the benchmark ends:
/// ext4 without a journal passes over inodes freed in the last minutes when
/// it allocates one (`recently_deleted()`), so deleting a run's files
/// between runs would make later runs measure the benchmark's clean-up.
pub struct RunDir(Option<TempDir>);

/// Run directories dropped so far, deleted by [`remove_finished_run_dirs`].
static FINISHED_RUN_DIRS: Mutex<Vec<TempDir>> = Mutex::new(Vec::new());

impl RunDir {
    /// A new directory named `<prefix>XXXXXX` under `base`, or the temp dir.
    pub fn new(prefix: &str, base: Option<&Path>) -> Result<Self> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_owned);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(&base);
        let dir = dir.with_context(|| format!("creating {prefix}* in {}", base.display()))?;
        Ok(RunDir(Some(dir)))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("in place until dropped").path()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let mut dirs = FINISHED_RUN_DIRS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        dirs.extend(self.0.take());
    }
}

/// Deletes the directories of every finished run (see [`RunDir`]).
fn remove_finished_run_dirs() {
    FINISHED_RUN_DIRS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// Runs `job(thread, index)` `n` times split over `p` threads; returns the wall time.
pub fn split_loop(
    n: usize,
    p: usize,
    job: impl Fn(usize, usize) -> Result<()> + Sync,
) -> Result<Duration> {
    let job = &job;
    let start = Instant::now();
    thread::scope(|s| {
        let handles: Vec<_> = (0..p)
            .map(|t| {
                let share = n / p + usize::from(t < n % p);
                s.spawn(move || (0..share).try_for_each(|i| job(t, i)))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow!("loop thread panicked"))?)
    })?;
    Ok(start.elapsed())
}

/// Runs `bash -c true` once, its output to `out` (/dev/null when `None`).
pub fn bash_true(out: Option<File>) -> Result<()> {
    check_interrupted()?;
    let (stdout, stderr) = match out {
        Some(f) => (Stdio::from(f.try_clone()?), Stdio::from(f)),
        None => (Stdio::null(), Stdio::null()),
    };
    let status = Command::new("bash")
        .args(["-c", "true"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .context("running bash -c true")?;
    ensure!(status.success(), "bash -c true failed: {status}");
    Ok(())
}

/// Runs `cmd` (stdin /dev/null), which must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    check_interrupted()?;
    let out = cmd.stdin(Stdio::null()).output();
    let out = out.with_context(|| format!("running {cmd:?}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        err.trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One run of the raw loop: the limit every ratio is taken against.
#[derive(Clone, Copy)]
pub struct RawRun {
    pub rate: f64,     // jobs/s
    pub child_ms: f64, // CPU of the `bash` children per job
    pub idle: f64,     // share of the machine's CPU time idle meanwhile
    pub busy_ms: f64,  // the machine's busy CPU per job (all CPUs)
    pub cpus: usize,
}

impl RawRun {
    /// `n` runs of `bash -c true` over `p` threads, each a tight spawn+wait loop.
    pub fn measure(n: usize, p: usize) -> Result<Self> {
        let cpu_before = CpuTimes::of("self")?;
        let machine_before = MachineCpu::now()?;
        let elapsed = split_loop(n, p, |_, _| bash_true(None))?;
        let machine = MachineCpu::now()?;
        let (_, child_ms) = CpuTimes::of("self")?.ms_since(cpu_before);
        Ok(Self {
            rate: n as f64 / elapsed.as_secs_f64(),
            child_ms: child_ms / n as f64,
            idle: machine.idle_share_since(machine_before),
            busy_ms: machine.busy_ms_since(machine_before) / n as f64,
            cpus: machine.cpus,
        })
    }
}

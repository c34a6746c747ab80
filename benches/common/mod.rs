//! The one harness behind both benchmarks (`throughput.rs`, `peers.rs`):
//! the runner ([`run_bench`]: header, lock, interrupts, clean-up, exit
//! status), the report format, the environment knobs, the timed loops, the
//! `/proc` readers and the statistics. The worker under test and its spool
//! are in [`worker`]; daemons and the idle window in [`daemon`].

#![allow(dead_code)] // each benchmark uses its own part

pub mod daemon;
pub mod worker;

pub use daemon::*;
pub use worker::*;

use std::collections::HashMap;
use std::fmt::Display;
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

/// How long a daemon may take to come up (and run a warm-up job).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Fail when no awaited result has appeared for this long.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Target: ai-cmd-executor throughput / raw throughput, at both parallelisms.
pub const TARGET_RATIO: f64 = 0.85;
/// Parallelism levels of every throughput figure.
pub const PARALLELISM: [usize; 2] = [1, 2];
/// The lock every measurement on the machine holds.
pub const BENCH_LOCK: &str = "/var/tmp/bench.lock";

// --- The runner and the knobs ---

/// Runs a benchmark under [`BENCH_LOCK`] with the header and the PASS/MISS
/// totals; `body` returns `Ok(false)` when it finished but something failed.
pub fn run_bench(title: &str, body: impl FnOnce() -> Result<bool>) -> ExitCode {
    let outcome = (|| -> Result<bool> {
        install_interrupt_handler()?;
        // scripts/bench.sh holds the lock already (it takes it before building).
        let mut lock = File::options();
        let lock = lock
            .create(true)
            .truncate(false)
            .write(true)
            .open(BENCH_LOCK);
        let lock = lock.context(BENCH_LOCK)?;
        if let Err(fs::TryLockError::WouldBlock) = lock.try_lock() {
            println!("note: {BENCH_LOCK} is held (by scripts/bench.sh, presumably)");
        }
        println!("{title}\nmachine: {}", machine_line());
        println!("tmpdir:  {}", tmpdir_line());
        println!("load:    loadavg 1/5/15 min {} (at start)", load_average());
        println!("worker:  {}", worker_bin());
        let started = Instant::now();
        let ok = body()?;
        println!("\nload:    loadavg 1/5/15 min {} (at end)", load_average());
        println!("total time: {:.0} s", started.elapsed().as_secs_f64());
        let (pass, miss) = (
            PASSED.load(Ordering::Relaxed),
            MISSED.load(Ordering::Relaxed),
        );
        println!(
            "\n== Summary: {pass} PASS, {miss} MISS (the benchmark reports; it does not assert)"
        );
        Ok(ok)
    })();
    FINISHED_RUN_DIRS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    let _ = io::stdout().flush();
    match outcome {
        Ok(true) => return ExitCode::SUCCESS,
        Ok(false) => eprintln!("\nbenchmark finished, but a part of it FAILED (see above)"),
        Err(err) => eprintln!("\nbenchmark FAILED: {err:#}"),
    }
    ExitCode::FAILURE
}

/// `BENCH_JOBS`, `BENCH_IDLE_SECS` and `BENCH_LATENCY_SAMPLES`.
pub struct Knobs {
    pub jobs: usize,
    pub idle: Duration,
    pub latency_samples: usize,
}

impl Knobs {
    /// Reads the knobs (the idle window defaults to `idle_secs`) and prints
    /// them with `more`.
    pub fn from_env(idle_secs: f64, more: &str) -> Result<Self> {
        let idle = env_or("BENCH_IDLE_SECS", idle_secs)?;
        let knobs = Self {
            jobs: env_or("BENCH_JOBS", 1000)?,
            idle: Duration::try_from_secs_f64(idle).context("BENCH_IDLE_SECS")?,
            latency_samples: env_or("BENCH_LATENCY_SAMPLES", 200)?,
        };
        let positive = knobs.jobs > 0 && knobs.latency_samples > 0 && idle > 0.0;
        ensure!(
            positive,
            "BENCH_JOBS, BENCH_IDLE_SECS and BENCH_LATENCY_SAMPLES must be positive"
        );
        println!(
            "settings: BENCH_JOBS={} BENCH_IDLE_SECS={idle} BENCH_LATENCY_SAMPLES={}{more}",
            knobs.jobs, knobs.latency_samples
        );
        Ok(knobs)
    }
}

/// Parses environment variable `name`, or returns `default` when it is unset or empty.
pub fn env_or<T: std::str::FromStr<Err: Display>>(name: &str, default: T) -> Result<T> {
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

// --- The report: one format for every figure ---

static PASSED: AtomicUsize = AtomicUsize::new(0);
static MISSED: AtomicUsize = AtomicUsize::new(0);

pub fn section(title: &str) {
    println!("\n== {title}");
}

pub fn group(title: &str) {
    println!("\n  [{title}]");
}

/// Prints a figure with its target and PASS/MISS.
pub fn check(name: &str, value: impl Display, target: &str, ok: bool) {
    let verdict = if ok { "PASS" } else { "MISS" };
    [&PASSED, &MISSED][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    let value = value.to_string();
    println!("    {name:<52} {value:>18}   target {target:<12} {verdict}");
}

/// Prints an informational figure that has no target.
pub fn info(name: &str, value: impl Display) {
    let value = value.to_string();
    println!("    {name:<52} {value:>18}   target -");
}

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

pub fn mib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

// --- Interruption and waiting ---

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
        ("SIGINT", SignalKind::interrupt()),
        ("SIGTERM", SignalKind::terminate()),
    ];
    for (name, kind) in kinds.into_iter().chain([("SIGHUP", SignalKind::hangup())]) {
        let mut stream = {
            let _in_runtime = rt.enter();
            signal(kind)?
        };
        rt.spawn(async move {
            while stream.recv().await.is_some() {
                eprintln!("\n{name} received: stopping");
                INTERRUPTED.store(true, Ordering::Relaxed);
            }
        });
    }
    thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    Ok(())
}

pub fn check_interrupted() -> Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::Relaxed), "interrupted");
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

// --- The machine ---

/// nproc, CPU model and kernel.
fn machine_line() -> String {
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("nproc={nproc} cpu=\"{cpu}\" kernel={}", kernel.trim())
}

pub fn load_average() -> String {
    let avg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The temp dir (where run directories go by default), its mount and options.
fn tmpdir_line() -> String {
    let dir = std::env::temp_dir();
    let (mount, ty) = fs_of(&dir);
    format!("{} on {mount} ({ty})", dir.display())
}

/// The file system holding `dir`: its source and mount options, and its
/// type, saying whether an ext4 has a journal.
pub fn fs_of(dir: &Path) -> (String, String) {
    let mut findmnt = Command::new("findmnt");
    let out = run_ok(
        findmnt
            .args(["-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T"])
            .arg(dir),
    );
    let out = out.unwrap_or_default();
    let [ty, source, options] = {
        let mut f = out.split_whitespace();
        [(); 3].map(|()| f.next().unwrap_or("?"))
    };
    let dev = source.rsplit('/').next().unwrap_or_default();
    let ty = match fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")) {
        Ok(j) if ty == "ext4" => format!(
            "ext4{}",
            if j.trim() == "<none>" {
                ", no journal"
            } else {
                " with journal"
            }
        ),
        _ => ty.to_owned(),
    };
    (format!("{source} {options}"), ty)
}

// --- Statistics ---

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
    pub fn of(mut samples: Vec<f64>) -> Result<Self> {
        ensure!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p / 100.0 * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        let (min, max, n) = (samples[0], samples[samples.len() - 1], samples.len());
        Ok(Self {
            p50: rank(50.0),
            p99: rank(99.0),
            min,
            max,
            n,
        })
    }

    pub fn line(&self) -> String {
        let Self {
            p50,
            p99,
            min,
            max,
            n,
        } = self;
        format!("p50 {p50:.3} ms, p99 {p99:.3} ms (min {min:.3}, max {max:.3}, n={n})")
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

/// `later - earlier` in milliseconds, negative when `later` is earlier.
pub fn signed_ms(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

// --- /proc ---

/// Voluntary + non-voluntary context switches and name of each thread of `pid`.
pub fn thread_switches(pid: u32) -> Result<HashMap<u32, (String, u64)>> {
    let mut out = HashMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        // A thread may exit between listing and reading: skip it.
        let (Some(tid), Ok(status)) = (
            entry.file_name().to_str().and_then(|s| s.parse().ok()),
            fs::read_to_string(entry.path().join("status")),
        ) else {
            continue;
        };
        let switches = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .map(|key| status_field(&status, key).unwrap_or(0));
        let name = status.lines().find_map(|l| l.strip_prefix("Name:"));
        out.insert(
            tid,
            (name.unwrap_or("?").trim().to_owned(), switches.iter().sum()),
        );
    }
    Ok(out)
}

/// First number after `key` in a `/proc/.../status` file.
fn status_field(status: &str, key: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix(key))?;
    value.split_whitespace().next()?.parse().ok()
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status_field(&status, "VmRSS:").ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Clock ticks (`USER_HZ`, 100 by the ABI) as milliseconds.
pub fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 10.0
}

/// CPU time of a process, from `/proc/<pid>/stat`, in clock ticks.
#[derive(Clone, Copy)]
pub struct CpuTimes {
    pub own: u64,      // utime + stime, all threads
    pub children: u64, // cutime + cstime of the reaped children
}

impl CpuTimes {
    pub fn of(pid: impl Display) -> Result<Self> {
        let path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the parenthesised command name start at field 3;
        // utime, stime, cutime and cstime are fields 14 to 17.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let f = rest.split_whitespace().skip(14 - 3).take(4);
        let f: Vec<u64> = f.map_while(|v| v.parse().ok()).collect();
        ensure!(f.len() == 4, "malformed {path}");
        Ok(Self {
            own: f[0] + f[1],
            children: f[2] + f[3],
        })
    }

    /// `(own, children)` CPU time since `earlier`, in ms.
    pub fn ms_since(self, earlier: Self) -> (f64, f64) {
        let own = self.own.saturating_sub(earlier.own);
        (
            ticks_ms(own),
            ticks_ms(self.children.saturating_sub(earlier.children)),
        )
    }
}

/// The whole machine's CPU time so far (all CPUs), in ticks, from `/proc/stat`.
#[derive(Clone, Copy)]
pub struct MachineCpu {
    idle: u64,  // idle + iowait
    total: u64, // user nice system idle iowait irq softirq steal (guest is in user)
    pub cpus: usize,
}

impl MachineCpu {
    pub fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().and_then(|l| l.strip_prefix("cpu "));
        let f = line.unwrap_or_default().split_whitespace();
        let f: Vec<u64> = f.map_while(|v| v.parse().ok()).collect();
        ensure!(f.len() >= 8, "/proc/stat: no full cpu line");
        let cpu_n = |l: &&str| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(char::is_numeric))
        };
        let cpus = stat.lines().filter(cpu_n).count().max(1);
        Ok(MachineCpu {
            idle: f[3] + f[4],
            total: f[..8].iter().sum(),
            cpus,
        })
    }

    /// `(busy ms on all CPUs, idle share)` since `earlier`.
    pub fn since(self, earlier: MachineCpu) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total);
        let idle = self.idle.saturating_sub(earlier.idle);
        (
            ticks_ms(total.saturating_sub(idle)),
            idle as f64 / total.max(1) as f64,
        )
    }
}

// --- Run directories and loops ---

/// The temporary directory of one run, deleted only when the benchmark ends:
/// ext4 without a journal passes over inodes freed in the last minutes when
/// it allocates one (`recently_deleted()`), so deleting a run's files
/// between runs would make later runs measure the benchmark's clean-up.
pub struct RunDir(Option<TempDir>);

/// Run directories dropped so far, deleted when [`run_bench`] ends.
static FINISHED_RUN_DIRS: Mutex<Vec<TempDir>> = Mutex::new(Vec::new());

impl RunDir {
    /// A new directory named `<prefix>XXXXXX` under `base`, or the temp dir.
    pub fn new(prefix: &str, base: Option<&Path>) -> Result<Self> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_owned);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(&base);
        let dir = dir.with_context(|| format!("creating {prefix}* in {}", base.display()))?;
        Ok(RunDir(Some(dir)))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("in place until dropped").path()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let dirs = FINISHED_RUN_DIRS.lock();
        dirs.unwrap_or_else(PoisonError::into_inner)
            .extend(self.0.take());
    }
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
                s.spawn(move || (0..n / p + usize::from(t < n % p)).try_for_each(|i| job(t, i)))
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
    let mut cmd = Command::new("bash");
    let status = cmd
        .args(["-c", "true"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let status = status.status().context("running bash -c true")?;
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

/// What one timed loop of `n` jobs cost: the raw loop (the limit every
/// ratio is taken against), the contract loops, a worker's drain.
#[derive(Clone, Copy)]
pub struct LoopRun {
    pub rate: f64,     // jobs/s
    pub own_ms: f64,   // CPU per job of the measured process itself
    pub child_ms: f64, // CPU per job of its reaped children (the `bash` jobs)
    pub busy_ms: f64,  // the machine's busy CPU per job (all CPUs)
    pub idle: f64,     // share of the machine's CPU time idle meanwhile
    pub cpus: usize,
}

impl LoopRun {
    /// Times `run` (which returns the wall time of its `n` jobs), with the
    /// CPU time of process `pid` (a number, or `self`) and of the machine.
    pub fn time(
        n: usize,
        pid: impl Display,
        run: impl FnOnce() -> Result<Duration>,
    ) -> Result<Self> {
        let (cpu_before, machine_before) = (CpuTimes::of(&pid)?, MachineCpu::now()?);
        let elapsed = run()?;
        let machine = MachineCpu::now()?;
        let (own_ms, child_ms) = CpuTimes::of(&pid)?.ms_since(cpu_before);
        let (busy_ms, idle) = machine.since(machine_before);
        let per_job = |ms: f64| ms / n as f64;
        Ok(Self {
            rate: n as f64 / elapsed.as_secs_f64(),
            own_ms: per_job(own_ms),
            child_ms: per_job(child_ms),
            busy_ms: per_job(busy_ms),
            idle,
            cpus: machine.cpus,
        })
    }

    /// The raw loop: `n` runs of `bash -c true` over `p` threads, each a
    /// tight spawn+wait loop.
    pub fn raw(n: usize, p: usize) -> Result<Self> {
        Self::time(n, "self", || split_loop(n, p, |_, _| bash_true(None)))
    }
}

//! The one harness behind both benchmarks (`throughput.rs`, `peers.rs`),
//! in the sections marked below, from the runner ([`run_bench`]) to the
//! worker under test ([`Fixture`]).

#![allow(dead_code)] // each benchmark uses its own part

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use inotify::{EventMask, Inotify, WatchMask};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;
use tokio::runtime::Builder;
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
        let lock = File::options().append(true).create(true).open(BENCH_LOCK);
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
        let [pass, miss] = [&PASSED, &MISSED].map(|n| n.load(Ordering::Relaxed));
        let why = "(the benchmark reports; it does not assert)";
        println!("\n== Summary: {pass} PASS, {miss} MISS {why}");
        Ok(ok)
    })();
    let dirs = FINISHED_RUN_DIRS.lock();
    dirs.unwrap_or_else(PoisonError::into_inner).clear();
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
    /// Reads the knobs (the idle window defaults to `idle_secs`), prints them with `more`.
    pub fn from_env(idle_secs: f64, more: &str) -> Result<Self> {
        let idle = env_or("BENCH_IDLE_SECS", idle_secs)?;
        let knobs = Self {
            jobs: env_or("BENCH_JOBS", 1000)?,
            idle: Duration::try_from_secs_f64(idle).context("BENCH_IDLE_SECS")?,
            latency_samples: env_or("BENCH_LATENCY_SAMPLES", 200)?,
        };
        let positive = knobs.jobs > 0 && knobs.latency_samples > 0 && idle > 0.0;
        let names = "BENCH_JOBS, BENCH_IDLE_SECS and BENCH_LATENCY_SAMPLES";
        ensure!(positive, "{names} must be positive");
        println!(
            "settings: BENCH_JOBS={} BENCH_IDLE_SECS={idle} BENCH_LATENCY_SAMPLES={}{more}",
            knobs.jobs, knobs.latency_samples
        );
        Ok(knobs)
    }
}

/// Parses environment variable `name`, or returns `default` when it is unset or empty.
pub fn env_or<T: std::str::FromStr<Err: Display>>(name: &str, default: T) -> Result<T> {
    let v = std::env::var(name).unwrap_or_default();
    match v.trim() {
        "" => Ok(default),
        t => t.parse().map_err(|e| anyhow!("invalid {name}={v:?}: {e}")),
    }
}

/// The comma-separated list in `name`, each one of `allowed` (all when unset).
pub fn env_list(name: &str, allowed: &[&str]) -> Result<Vec<String>> {
    let v = std::env::var(name).unwrap_or_default();
    let mut list: Vec<&str> = v.split(',').map(str::trim).collect();
    list.retain(|x| !x.is_empty());
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
    let rt = Builder::new_current_thread().enable_all().build()?;
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        let mut stream = rt.block_on(async { signal(SignalKind::from_raw(sig as i32)) })?;
        rt.spawn(async move {
            while stream.recv().await.is_some() {
                eprintln!("\n{sig} received: stopping");
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

/// The file system holding `dir`: source and mount options, and type (with an ext4's journal).
pub fn fs_of(dir: &Path) -> (String, String) {
    let args = ["-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T"];
    let out = run_ok(Command::new("findmnt").args(args).arg(dir));
    let out = out.unwrap_or_default();
    let mut fields = out.split_whitespace();
    let [ty, source, options] = [(); 3].map(|()| fields.next().unwrap_or("?"));
    let dev = source.rsplit('/').next().unwrap_or_default();
    let ty = match fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")) {
        Ok(j) if ty == "ext4" && j.trim() == "<none>" => "ext4, no journal".to_owned(),
        Ok(_) if ty == "ext4" => "ext4 with journal".to_owned(),
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
        let n = samples.len();
        let rank = |p: f64| samples[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        let (min, max) = (samples[0], samples[n - 1]);
        Ok(Self {
            p50: rank(50.0),
            p99: rank(99.0),
            min,
            max,
            n,
        })
    }

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
    (s[(s.len() - 1) / 2] + s[s.len() / 2]) / 2.0
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
        let tid = entry.file_name().to_str().and_then(|s| s.parse().ok());
        let (Some(tid), Ok(status)) = (tid, fs::read_to_string(entry.path().join("status"))) else {
            continue;
        };
        let switches = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .map(|key| status_field(&status, key).unwrap_or(0));
        let name = status.lines().find_map(|l| l.strip_prefix("Name:"));
        let name = name.unwrap_or("?").trim().to_owned();
        out.insert(tid, (name, switches.iter().sum()));
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

/// CPU time of a process so far, from `/proc/<pid>/stat`, in clock ticks:
/// `[own, children]` (utime + stime of all threads, cutime + cstime of the
/// reaped children).
pub fn cpu_ticks(pid: impl Display) -> Result<[u64; 2]> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name start at field 3;
    // utime, stime, cutime and cstime are fields 14 to 17.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f = rest.split_whitespace().skip(14 - 3).take(4);
    let f: Vec<u64> = f.map_while(|v| v.parse().ok()).collect();
    ensure!(f.len() == 4, "malformed {path}");
    Ok([f[0] + f[1], f[2] + f[3]])
}

/// `later - earlier` of two pairs of counters, floored at 0.
pub fn ticks_since(later: [u64; 2], earlier: [u64; 2]) -> [u64; 2] {
    [0, 1].map(|i| later[i].saturating_sub(earlier[i]))
}

/// The whole machine's CPU time so far, from `/proc/stat`, in ticks:
/// `[idle + iowait, total]` (user nice system idle iowait irq softirq
/// steal; guest is in user), and the number of CPUs.
fn machine_cpu() -> Result<([u64; 2], usize)> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().and_then(|l| l.strip_prefix("cpu "));
    let f = line.unwrap_or_default().split_whitespace();
    let f: Vec<u64> = f.map_while(|v| v.parse().ok()).collect();
    ensure!(f.len() >= 8, "/proc/stat: no full cpu line");
    let per_cpu = |l: &&str| l.starts_with("cpu") && !l.starts_with("cpu ");
    let cpus = stat.lines().filter(per_cpu).count().max(1);
    Ok(([f[3] + f[4], f[..8].iter().sum()], cpus))
}

// --- Run directories and loops ---

/// The temporary directory of one run, deleted only when the benchmark ends
/// (ext4 without a journal slows down after recent deletions).
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

/// Thread `t`'s share of `n` jobs split over `p` threads.
pub fn share(n: usize, p: usize, t: usize) -> usize {
    n / p + usize::from(t < n % p)
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
            .map(|t| s.spawn(move || (0..share(n, p, t)).try_for_each(|i| job(t, i))))
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
    cmd.args(["-c", "true"]).stdin(Stdio::null());
    let status = cmd.stdout(stdout).stderr(stderr).status();
    let status = status.context("running bash -c true")?;
    ensure!(status.success(), "bash -c true failed: {status}");
    Ok(())
}

/// Runs `cmd` (stdin /dev/null), which must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    check_interrupted()?;
    let out = cmd.stdin(Stdio::null()).output();
    let out = out.with_context(|| format!("running {cmd:?}"))?;
    let (status, err) = (out.status, String::from_utf8_lossy(&out.stderr));
    let err = err.trim();
    ensure!(status.success(), "{cmd:?} failed ({status}): {err}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a timed loop of `n` jobs cost: the raw one (every ratio's limit), a contract loop, a drain.
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
    /// Times `f` (which returns the wall time of its `n` jobs), with the
    /// CPU time of process `pid` (a number, or `self`) and of the machine.
    pub fn time(n: usize, pid: impl Display, f: impl FnOnce() -> Result<Duration>) -> Result<Self> {
        let (cpu_before, (machine_before, _)) = (cpu_ticks(&pid)?, machine_cpu()?);
        let elapsed = f()?;
        let (machine, cpus) = machine_cpu()?;
        let [own, children] = ticks_since(cpu_ticks(&pid)?, cpu_before);
        let [idle, total] = ticks_since(machine, machine_before);
        let per_job = |ticks: u64| ticks_ms(ticks) / n as f64;
        Ok(Self {
            rate: n as f64 / elapsed.as_secs_f64(),
            own_ms: per_job(own),
            child_ms: per_job(children),
            busy_ms: per_job(total.saturating_sub(idle)),
            idle: idle as f64 / total.max(1) as f64,
            cpus,
        })
    }

    /// The raw loop: `n` runs of `bash -c true` over `p` threads, each a tight spawn+wait loop.
    pub fn raw(n: usize, p: usize) -> Result<Self> {
        Self::time(n, "self", || split_loop(n, p, |_, _| bash_true(None)))
    }
}

// --- Daemons: their environment, a guard, the idle window ---

/// The environment a daemon and its clients are started with: the shell's,
/// as inherited through cargo (`.1`), or that one with `RUST_BACKTRACE` set
/// to `.0` or removed (and `RUST_LIB_BACKTRACE` removed).
#[derive(Clone)]
pub struct DaemonEnv(Option<String>, bool);

impl DaemonEnv {
    pub fn shell() -> Self {
        Self(std::env::var("RUST_BACKTRACE").ok(), true)
    }

    pub fn with_backtrace(value: Option<&str>) -> Self {
        Self(value.map(str::to_owned), false)
    }

    /// The other `RUST_BACKTRACE` setting: unset if it is set, `1` if not.
    pub fn other(&self) -> Self {
        Self::with_backtrace(self.0.is_none().then_some("1"))
    }

    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        if !self.1 {
            match &self.0 {
                Some(v) => cmd.env("RUST_BACKTRACE", v),
                None => cmd.env_remove("RUST_BACKTRACE"),
            };
            cmd.env_remove("RUST_LIB_BACKTRACE");
        }
        cmd
    }

    /// `RUST_BACKTRACE=value`, or `RUST_BACKTRACE unset`.
    pub fn backtrace(&self) -> String {
        show("RUST_BACKTRACE", self.0.as_deref())
    }

    /// `RUST_BACKTRACE` and `RUST_LIB_BACKTRACE`, for the header.
    pub fn backtrace_line(&self) -> String {
        let lib = std::env::var("RUST_LIB_BACKTRACE").ok().filter(|_| self.1);
        let lib = show("RUST_LIB_BACKTRACE", lib.as_deref());
        format!("{}, {lib}", self.backtrace())
    }
}

fn show(name: &str, value: Option<&str>) -> String {
    value.map_or_else(|| format!("{name} unset"), |v| format!("{name}={v}"))
}

/// Guard around a daemon the benchmark started, in its own process group (a
/// Ctrl-C at the terminal reaches only the benchmark, which then stops it in
/// order). Dropping it sends SIGTERM, waits up to 5 s, then SIGKILLs and reaps it.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdin from /dev/null and output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let cmd = cmd.stdin(Stdio::null()).stdout(out.try_clone()?);
        let child = cmd.stderr(out).process_group(0).spawn();
        let child = child.with_context(|| format!("starting {name}"))?;
        let (name, log) = (name.to_owned(), log.to_owned());
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the daemon has exited or the benchmark was interrupted.
    pub fn check_alive(&mut self) -> Result<()> {
        check_interrupted()?;
        if let Some(status) = self.child.try_wait()? {
            let (name, tail) = (&self.name, self.log_tail());
            bail!("{name} exited unexpectedly ({status}){tail}");
        }
        Ok(())
    }

    /// Waits a second, then measures the daemon over an idle `window`.
    pub fn idle(&mut self, window: Duration) -> Result<Idle> {
        thread::sleep(Duration::from_secs(1));
        self.check_alive()?;
        idle_window(self.pid(), window, &mut || self.check_alive())
    }

    /// The last lines of the daemon's output, for an error message.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        let (name, log) = (&self.name, self.log.display());
        format!("\n--- last output of {name} ({log}) ---\n{tail}")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(None) => thread::sleep(Duration::from_millis(5)),
                    _ => return,
                }
            }
            eprintln!("{} ignored SIGTERM for 5 s; sending SIGKILL", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Flushes dirty pages to disk (`sync`), so that a phase does not pay for
/// the writeback of the one before it; prints how long that took.
pub fn flush_disk() {
    let start = Instant::now();
    nix::unistd::sync();
    let took = ms(start.elapsed().as_secs_f64() * 1e3);
    info("sync (writeback of the previous phase)", took);
}

/// First line of `cmd --version`-like output, or why there is none.
pub fn version_of(cmd: &mut Command) -> String {
    run_ok(cmd).map_or_else(
        |e| format!("unknown ({e:#})"),
        |out| out.lines().next().unwrap_or("").trim().to_owned(),
    )
}

#[derive(Clone, Copy)]
pub struct Idle {
    pub rss_kib: u64, // VmRSS at the end of the window
    pub cpu_ms: f64,  // utime+stime over the window
    pub wakeups: u64, // voluntary + involuntary context switches, all threads
}

/// Measures `pid` over an idle `window` and prints it: RSS at the end, CPU
/// time and the context switches of all threads, sampled every 100 ms so
/// that threads that come and go count (reading /proc wakes nothing).
pub fn idle_window(
    pid: u32,
    window: Duration,
    check: &mut dyn FnMut() -> Result<()>,
) -> Result<Idle> {
    let cpu_before = cpu_ticks(pid)?;
    let start = thread_switches(pid)?;
    // Each thread's name, count at the last sample that saw it, and whether the last one did.
    let mut seen: HashMap<u32, (String, u64, bool)> = HashMap::new();
    let (end, mut snapshot) = (Instant::now() + window, start.clone());
    loop {
        seen.values_mut().for_each(|t| t.2 = false);
        for (tid, (name, n)) in snapshot {
            seen.insert(tid, (name, n, true));
        }
        if Instant::now() >= end {
            break;
        }
        thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
        check()?;
        snapshot = thread_switches(pid)?;
    }
    let cpu_ms = ticks_ms(ticks_since(cpu_ticks(pid)?, cpu_before)[0]);
    // Threads created during the window count from 0; one that exited woke at least once to do so.
    let woke = |tid: &u32, &(_, last, alive): &(String, u64, bool)| {
        let n = last.saturating_sub(start.get(tid).map_or(0, |(_, first)| *first));
        if alive { n } else { n.max(1) }
    };
    let wakeups = seen.iter().map(|(tid, t)| woke(tid, t)).sum();
    let idle = Idle {
        rss_kib: rss_kib(pid)?,
        cpu_ms,
        wakeups,
    };
    let alive = seen.values().filter(|t| t.2).count();
    let secs = window.as_secs_f64();
    let label = format!("idle CPU time (utime+stime) in {secs:.0} s");
    info(&label, format!("{cpu_ms:.0} ms"));
    let threads = format!("{} / {alive}", start.len());
    info("threads at window start / end", threads);
    let mut noisy: Vec<_> = seen.iter().filter(|(tid, t)| woke(tid, t) > 0).collect();
    noisy.sort_by_key(|(tid, _)| **tid);
    for (tid, t) in noisy {
        let state = match (!start.contains_key(tid), t.2) {
            (true, true) => ", created during window",
            (true, false) => ", created and exited during window",
            (false, false) => ", exited during window",
            (false, true) => "",
        };
        let (name, n) = (&t.0, woke(tid, t));
        note(&format!("thread {tid} ({name}) woke {n} time(s){state}"));
    }
    Ok(idle)
}

// --- The worker under test, driven through its public interface only ---

pub const TRUE_JOB: &[u8] = br#"{"command": "true"}"#;

/// The worker binary to measure: `BENCH_WORKER` (to compare two builds), else cargo's.
pub fn worker_bin() -> String {
    let bench_worker = std::env::var("BENCH_WORKER").ok().filter(|v| !v.is_empty());
    bench_worker.unwrap_or_else(|| env!("CARGO_BIN_EXE_ai-cmd-executor").to_owned())
}

/// The job id of a result file name (`<id>.json`, not a dot-prefixed temp file).
fn result_id(name: &str) -> Option<&str> {
    name.strip_suffix(".json")
        .filter(|_| !name.starts_with('.'))
}

/// A worker running on its own fresh spool, warmed up. Fields drop in order:
/// the worker stops before the spool directory is put aside (see [`RunDir`]).
pub struct Fixture {
    pub worker: Daemon,
    inotify: Inotify,
    env: DaemonEnv,
    pub spool: PathBuf,
    pub root: RunDir,
}

impl Fixture {
    /// Starts a worker (`run`, in the foreground) on a fresh spool under
    /// `base` (or the temp dir) with environment `env` and `max_parallel =
    /// parallel` (no config file when `None`); waits for a warm-up job.
    pub fn start(base: Option<&Path>, parallel: Option<usize>, env: &DaemonEnv) -> Result<Self> {
        let config = parallel.map(|p| format!("max_parallel = {p}\n"));
        Self::start_as(base, config, env, None, None)
    }

    /// [`Fixture::start`] with the configuration file `config`, the worker
    /// run as user and group `user` (who then owns the spool) when given,
    /// in the (delegated) cgroup `cgroup` when given, as systemd would.
    pub fn start_as(
        base: Option<&Path>,
        config: Option<String>,
        env: &DaemonEnv,
        user: Option<u32>,
        cgroup: Option<&Path>,
    ) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let root = RunDir::new("ai-cmd-bench-", base)?;
        let spool = root.path().join("spool");
        fs::create_dir(&spool)?;
        let mut cmd = Command::new(worker_bin());
        if let Some(cg) = cgroup {
            // Into the cgroup as root, then the worker as `user`.
            let enter = r#"echo $$ > "$0/cgroup.procs" && u=$1 && shift && exec setpriv --reuid=$u --regid=$u --clear-groups -- "$@""#;
            cmd = Command::new("/bin/sh");
            let ids = user.unwrap_or(0).to_string();
            cmd.args(["-c", enter]).arg(cg).arg(ids).arg(worker_bin());
        }
        env.apply(&mut cmd).arg("run").arg("--spool").arg(&spool);
        if let Some(text) = config {
            let config = root.path().join("worker.toml");
            fs::write(&config, text)?;
            cmd.arg("--config").arg(config);
        }
        if let Some(id) = user {
            fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
            std::os::unix::fs::chown(&spool, Some(id), Some(id))?;
            if cgroup.is_none() {
                cmd.uid(id).gid(id);
            }
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
        let mut fx = Self {
            worker,
            inotify,
            env: env.clone(),
            spool,
            root,
        };
        fx.submit("warmup", false)?;
        fx.wait(&mut HashSet::from(["warmup".to_owned()]))
            .context("waiting for the warm-up job")?;
        fx.succeeded("warmup")?;
        Ok(fx)
    }

    /// Submits job `id` (`true`): through the `submit` CLI when `cli`, else
    /// as [`TRUE_JOB`] by [`Fixture::drop_file`].
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

    /// Waits until every id in `pending` has a result (IN_MOVED_TO of `<id>.json`
    /// in `completed/`), removing them as they come; returns when the last one
    /// came. Fails when the worker exits or nothing comes for [`STALL_TIMEOUT`].
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

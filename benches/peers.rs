//! Comparison benchmark: `ai-cmd-executor` against its peers, in one run on
//! one machine.
//!
//! Run with `scripts/bench-peers.sh` (it installs pueue under `target/peers`
//! when missing and holds `/var/tmp/bench.lock`), or directly with
//! `flock /var/tmp/bench.lock cargo bench --bench peers`.
//!
//! Tools, each driven through its ordinary interface:
//!
//! - **raw**: a tight loop in this process that spawns `bash -c true` with
//!   `std::process::Command` and waits, split over `P` threads. It is measured
//!   again right before each tool, and each tool's ratio is against the raw
//!   rate measured just before it.
//! - **ai-cmd-executor**: the release binary as a foreground worker
//!   (`run --spool DIR --config FILE`, `max_parallel = P`), spool on the
//!   default temp dir, jobs dropped by rename (`tmp/` then `pending/`);
//!   latency also through `ai-cmd-executor submit` (a CLI process per job,
//!   like the peers); start time = the result's `started_at`.
//! - **pueue**: `pueued -c FILE` in the foreground with its directories in a
//!   temp dir, `pueue parallel P`, one `pueue add -- true` per job; start and
//!   end times from `pueue status --json`. Its shell is set to `bash -c` so
//!   every tool runs the same `bash -c true`.
//! - **systemd-run**: in a throwaway systemd booted with `systemd-nspawn`
//!   (the tier-3 sandbox of `tests/common/sandbox.rs`); this very binary runs
//!   inside as the client (see [`inner`]), `P` threads each running
//!   `systemd-run --wait --quiet --collect -- /bin/bash -c true` in a loop;
//!   start time = the unit's `ExecMainStartTimestampMonotonic` against the
//!   client's `CLOCK_MONOTONIC` before it spawned `systemd-run` (no time
//!   namespace: host and container share the clock). The "daemon" is the
//!   sandbox's PID 1, measured from the host through `/proc`.
//!
//! For every tool: throughput of `N` jobs at P=1 and P=2, submit-to-start
//! latency p50/p99, and, after the daemon has run jobs, VmRSS, CPU time and
//! context switches (all threads) over an idle window.
//!
//! Environment: `BENCH_JOBS` (default 1000), `BENCH_IDLE_SECS` (default 60),
//! `BENCH_LATENCY_SAMPLES` (default 200), `BENCH_PUEUE` (path of the `pueue`
//! client; `pueued` is taken from the same directory; pueue is skipped with a
//! notice when unset), `BENCH_MARKDOWN=1` (or the argument `--markdown`) to
//! print the final table as Markdown too, `BENCH_TOOLS` (comma-separated
//! subset of `ai-cmd-executor,pueue,systemd-run`, for quick runs; the others
//! are reported as skipped).
//!
//! A peer that cannot run here is skipped with the reason printed; a tool
//! that fails is reported as failed and the others still run (exit status
//! non-zero at the end). Every daemon and the sandbox are stopped on every
//! exit path (Drop guards; SIGINT/SIGTERM/SIGHUP turn into an error).

#![warn(missing_docs)]

mod common;
#[path = "../tests/common/sandbox.rs"]
#[allow(dead_code)]
mod sandbox;
use common::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use inotify::{EventMask, Inotify, WatchMask};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use serde_json::Value;

/// The worker binary under test, built by cargo for this bench.
const WORKER_BIN: &str = env!("CARGO_BIN_EXE_ai-cmd-executor");

/// Job file body of every `ai-cmd-executor` job dropped by rename.
const TRUE_JOB: &[u8] = br#"{"command": "true"}"#;

/// Default number of jobs per throughput run (`BENCH_JOBS`).
const DEFAULT_JOBS: usize = 1000;

/// Default idle window in seconds (`BENCH_IDLE_SECS`).
const DEFAULT_IDLE_SECS: f64 = 60.0;

/// Default number of latency samples per tool and path (`BENCH_LATENCY_SAMPLES`).
const DEFAULT_LATENCY_SAMPLES: usize = 200;

/// Parallelism levels of the throughput rows.
const PARALLELISM: [usize; 2] = [1, 2];

/// Jobs a fresh daemon runs (submitted through its CLI) before its idle window.
const IDLE_WARMUP_JOBS: usize = 20;

/// How long the sandbox's PID 1 must use no CPU before measuring in it.
const SANDBOX_QUIET: Duration = Duration::from_secs(2);

/// Environment variable that turns this binary into the in-sandbox client.
const INNER_ENV: &str = "AICE_PEERS_CLIENT";

/// Runs the benchmark, or the in-sandbox client when [`INNER_ENV`] is set.
fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(INNER_ENV) {
        return inner::main(&mode);
    }
    let outcome = run();
    remove_finished_run_dirs();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            let _ = io::stdout().flush();
            eprintln!("\nbenchmark finished, but at least one tool FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(err) => {
            let _ = io::stdout().flush();
            eprintln!("\nbenchmark FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Measures every tool in turn and prints the table; `Ok(false)` when a
/// tool failed (the others are still reported).
fn run() -> Result<bool> {
    install_interrupt_handler("daemons and the sandbox")?;
    let settings = Settings::from_env()?;
    let _lock = bench_lock()?;
    let env = DaemonEnv::capture();

    println!("ai-cmd-executor peer comparison");
    println!("machine: {}", machine_line());
    println!("tmpdir:  {}", tmpdir_line());
    println!("load:    loadavg 1/5/15 min {} (at start)", load_average());
    println!("worker:  {WORKER_BIN}");
    println!(
        "settings: BENCH_JOBS={} BENCH_IDLE_SECS={} BENCH_LATENCY_SAMPLES={}",
        settings.jobs,
        settings.idle.as_secs_f64(),
        settings.latency_samples
    );
    println!(
        "daemon environment (the same for ai-cmd-executor and pueued, inherited from the shell): {}",
        env.backtrace_line()
    );
    let built = binary_mtime();
    let started = Instant::now();

    let mut columns = Vec::new();

    tool_section("ai-cmd-executor");
    columns.push(match settings.unwanted("ai-cmd-executor") {
        Some(column) => column,
        None => measure("ai-cmd-executor", || aice::measure(&settings, &env))?,
    });

    tool_section("pueue");
    columns.push(match (settings.unwanted("pueue"), pueue::locate()) {
        (Some(column), _) => column,
        (None, Err(why)) => {
            println!("  SKIPPED pueue: {why}");
            Column::skipped("pueue", why)
        }
        (None, Ok(bins)) => measure("pueue", || pueue::measure(&settings, &env, &bins))?,
    });

    tool_section("systemd-run (tier-3 sandbox)");
    columns.push(match settings.unwanted("systemd-run") {
        Some(column) => column,
        None => measure("systemd-run", || systemd::measure(&settings))?,
    });

    println!("\nload:    loadavg 1/5/15 min {} (at end)", load_average());
    println!(
        "total time: {:.0} s",
        started.elapsed().as_secs_f64().round()
    );
    if binary_mtime() != built {
        println!(
            "WARNING: {WORKER_BIN} was rebuilt during the run; \
             the figures may mix two builds and a build's load"
        );
    }

    let table = Table::build(&settings, &env, &columns);
    section("Table");
    table.print_text();
    if settings.markdown {
        section("Table (Markdown)");
        table.print_markdown();
    }
    Ok(columns.iter().all(|c| !matches!(c.state, State::Failed(_))))
}

/// Runs one tool's measurement; a failure (error or panic) becomes a failed
/// column, except an interruption, which ends the benchmark.
fn measure(name: &str, f: impl FnOnce() -> Result<Figures>) -> Result<Column> {
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    check_interrupted()?;
    Ok(match outcome {
        Ok(Ok(figures)) => Column {
            name: name.to_owned(),
            state: State::Measured,
            figures,
        },
        Ok(Err(err)) => match err.downcast_ref::<Skip>() {
            Some(Skip(why)) => {
                println!("  SKIPPED {name}: {why}");
                Column::skipped(name, why.clone())
            }
            None => {
                println!("  FAILED {name}: {err:#}");
                Column::failed(name, format!("{err:#}"))
            }
        },
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".to_owned());
            println!("  FAILED {name}: {msg}");
            Column::failed(name, msg)
        }
    })
}

/// The error a tool's measurement returns when the tool cannot run here.
#[derive(Debug)]
struct Skip(String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "skipped: {}", self.0)
    }
}

impl std::error::Error for Skip {}

/// Flushes dirty pages to disk (`sync`), so that a phase does not pay for
/// the writeback of the one before it; prints how long that took.
fn flush_disk() {
    let start = Instant::now();
    nix::unistd::sync();
    info(
        "sync (writeback of the previous phase)",
        format!("{:.0} ms", start.elapsed().as_secs_f64() * 1e3),
    );
}

/// Prints a section heading.
fn section(title: &str) {
    println!("\n== {title}");
}

/// Prints a tool's heading with the load average at its start.
fn tool_section(title: &str) {
    section(title);
    info("loadavg 1/5/15 min at start", load_average());
}

/// Prints an informational figure.
fn info(name: &str, value: impl std::fmt::Display) {
    println!("    {name:<52} {value}");
}

/// Takes `/var/tmp/bench.lock` if nobody holds it (and says so: the wrapper
/// script should have taken it); returns the held file, if any.
fn bench_lock() -> Result<Option<File>> {
    let path = "/var/tmp/bench.lock";
    // Read-only is enough for flock(2), and works for any user once the
    // file exists.
    let file = match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path),
        other => other,
    }
    .with_context(|| format!("opening {path}"))?;
    match file.try_lock() {
        Ok(()) => {
            println!(
                "note: {path} was free; this run holds it now (run through \
                 scripts/bench-peers.sh or `flock {path} cargo bench --bench peers` \
                 so that the build is covered too)"
            );
            Ok(Some(file))
        }
        Err(fs::TryLockError::WouldBlock) => {
            println!("note: {path} is held (by the wrapper, presumably); not taking it again");
            Ok(None)
        }
        Err(fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {path}")),
    }
}

// ---------------------------------------------------------------------------
// Interruption, waiting, settings
// ---------------------------------------------------------------------------

/// Polls `f` until it returns `Some`, or panics naming `what` after
/// `deadline` or when the benchmark is interrupted. The sandbox helper
/// (`tests/common/sandbox.rs`) calls this as `super::wait_for`.
fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            panic!("interrupted while waiting for {what}");
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

/// Polls `f` until it returns `Some`, with a deadline; `f`'s errors end the wait.
fn poll_until<T>(
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
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(nap);
        nap = (nap * 2).min(max_nap);
    }
}

/// Knobs read from the environment and the command line.
struct Settings {
    /// Jobs per throughput run.
    jobs: usize,
    /// Length of each idle window.
    idle: Duration,
    /// Latency samples per tool and submission path.
    latency_samples: usize,
    /// Whether to print the table as Markdown too.
    markdown: bool,
    /// The tools to measure (`BENCH_TOOLS`, comma-separated; all when unset).
    tools: Option<Vec<String>>,
}

impl Settings {
    /// Reads the `BENCH_*` variables and `--markdown`.
    fn from_env() -> Result<Self> {
        let jobs = env_or("BENCH_JOBS", DEFAULT_JOBS)?;
        let idle_secs = env_or("BENCH_IDLE_SECS", DEFAULT_IDLE_SECS)?;
        let latency_samples = env_or("BENCH_LATENCY_SAMPLES", DEFAULT_LATENCY_SAMPLES)?;
        ensure!(jobs >= 2, "BENCH_JOBS must be at least 2");
        ensure!(
            idle_secs.is_finite() && idle_secs > 0.0,
            "BENCH_IDLE_SECS must be a positive number"
        );
        ensure!(
            latency_samples >= 1,
            "BENCH_LATENCY_SAMPLES must be at least 1"
        );
        let markdown = std::env::args().any(|a| a == "--markdown")
            || std::env::var("BENCH_MARKDOWN").is_ok_and(|v| !v.is_empty() && v != "0");
        let tools = std::env::var("BENCH_TOOLS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_owned())
                    .collect::<Vec<_>>()
            });
        if let Some(tools) = &tools {
            for t in tools {
                ensure!(
                    ["ai-cmd-executor", "pueue", "systemd-run"].contains(&t.as_str()),
                    "BENCH_TOOLS: unknown tool {t:?} (ai-cmd-executor, pueue, systemd-run)"
                );
            }
        }
        Ok(Self {
            jobs,
            idle: Duration::from_secs_f64(idle_secs),
            latency_samples,
            markdown,
            tools,
        })
    }

    /// A skipped column (with the notice printed) when `BENCH_TOOLS` leaves `tool` out.
    fn unwanted(&self, tool: &str) -> Option<Column> {
        let tools = self.tools.as_ref()?;
        if tools.iter().any(|t| t == tool) {
            return None;
        }
        let why = format!("not in BENCH_TOOLS={}", tools.join(","));
        println!("  SKIPPED {tool}: {why}");
        Some(Column::skipped(tool, why))
    }
}

/// The one environment every daemon (and every client) is started with:
/// this process's own, as inherited from the shell through cargo.
struct DaemonEnv {
    /// The variables.
    vars: Vec<(OsString, OsString)>,
}

impl DaemonEnv {
    /// Captures this process's environment.
    fn capture() -> Self {
        Self {
            vars: std::env::vars_os().collect(),
        }
    }

    /// Gives `cmd` exactly this environment.
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env_clear().envs(self.vars.iter().map(|(k, v)| (k, v)))
    }

    /// Value of `name` in this environment.
    fn get(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    /// The same environment with the other `RUST_BACKTRACE` setting:
    /// `RUST_BACKTRACE` and `RUST_LIB_BACKTRACE` removed if `RUST_BACKTRACE`
    /// is set, `RUST_BACKTRACE=1` if it is not.
    fn other_backtrace(&self) -> Self {
        let set = self.get("RUST_BACKTRACE").is_some();
        let mut vars: Vec<(OsString, OsString)> = self
            .vars
            .iter()
            .filter(|(k, _)| k != "RUST_BACKTRACE" && k != "RUST_LIB_BACKTRACE")
            .cloned()
            .collect();
        if !set {
            vars.push(("RUST_BACKTRACE".into(), "1".into()));
        }
        Self { vars }
    }

    /// `RUST_BACKTRACE` as it is set for the daemons, for the table.
    fn backtrace(&self) -> String {
        match self.get("RUST_BACKTRACE") {
            Some(v) => format!("RUST_BACKTRACE={v}"),
            None => "RUST_BACKTRACE unset".to_owned(),
        }
    }

    /// `RUST_BACKTRACE` and `RUST_LIB_BACKTRACE` for the header.
    fn backtrace_line(&self) -> String {
        let lib = match self.get("RUST_LIB_BACKTRACE") {
            Some(v) => format!("RUST_LIB_BACKTRACE={v}"),
            None => "RUST_LIB_BACKTRACE unset".to_owned(),
        };
        format!("{}, {lib}", self.backtrace())
    }
}

// ---------------------------------------------------------------------------
// Machine description
// ---------------------------------------------------------------------------

/// The temp dir, the file system it is on and its mount options.
fn tmpdir_line() -> String {
    let dir = std::env::temp_dir();
    let out = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T"])
        .arg(&dir)
        .output();
    let fs = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => "file system unknown (findmnt failed)".to_owned(),
    };
    // ext4 says whether it has a journal: its jbd2 thread, or `<none>`.
    let journal = fs
        .split_whitespace()
        .next()
        .and_then(|src| src.rsplit('/').next())
        .and_then(|dev| fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")).ok())
        .map(|t| match t.trim() {
            "<none>" => ", ext4 journal: none".to_owned(),
            t => format!(", ext4 journal: {t}"),
        })
        .unwrap_or_default();
    format!("{} on {fs}{journal}", dir.display())
}

/// Modification time of the worker binary, to detect a rebuild during the run.
fn binary_mtime() -> Option<SystemTime> {
    fs::metadata(WORKER_BIN).and_then(|m| m.modified()).ok()
}

/// First line of `cmd --version`-like output, or why there is none.
fn version_of(cmd: &mut Command) -> String {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Ok(o) => format!("unknown ({})", o.status),
        Err(e) => format!("unknown ({e})"),
    }
}

// ---------------------------------------------------------------------------
// Statistics and time
// ---------------------------------------------------------------------------

/// Order statistics of a sample set, in ms.
#[derive(Clone, Copy)]
struct Stats {
    /// Median (nearest rank).
    p50: f64,
    /// 99th percentile (nearest rank).
    p99: f64,
    /// Smallest sample.
    min: f64,
    /// Largest sample.
    max: f64,
    /// Number of samples.
    n: usize,
}

impl Stats {
    /// Computes the statistics of `samples` (must be non-empty).
    fn of(mut samples: Vec<f64>) -> Result<Self> {
        ensure!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        Ok(Self {
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            min: samples[0],
            max: samples[samples.len() - 1],
            n: samples.len(),
        })
    }

    /// One line: p50, p99, min, max.
    fn line(&self) -> String {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms (min {:.3}, max {:.3}, n={})",
            self.p50, self.p99, self.min, self.max, self.n
        )
    }
}

/// `CLOCK_MONOTONIC` in microseconds (the clock of systemd's `*Monotonic`
/// timestamps).
fn monotonic_us() -> Result<u64> {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).context("clock_gettime")?;
    let us = ts.tv_sec() as i128 * 1_000_000 + ts.tv_nsec() as i128 / 1000;
    u64::try_from(us).context("negative monotonic clock")
}

/// The pause before latency sample `i`: 2 to 301 ms, each value once per 300
/// samples in a scattered order (193 is prime to 300). A daemon with a
/// periodic tick (pueue's 300 ms) then sees submissions at every phase of it,
/// as from a user at a random time; a fixed pause after the previous result
/// would submit at one phase and bias the figure.
fn sample_gap(i: usize) -> Duration {
    Duration::from_millis(2 + (i as u64 * 193) % 300)
}

/// Parses an RFC 3339 time with any offset (`Z` or `±HH:MM`) and up to
/// nanoseconds, as ai-cmd-executor (`…Z`) and pueue (`…+00:00`) write them.
fn parse_rfc3339(s: &str) -> Result<SystemTime> {
    let bad = || anyhow!("not an RFC 3339 time: {s:?}");
    let num = |a: usize, b: usize| -> Result<i64> {
        s.get(a..b)
            .filter(|v| v.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)
    };
    let sep = |i: usize, ok: &[u8]| s.as_bytes().get(i).is_some_and(|c| ok.contains(c));
    ensure!(
        sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":"),
        "not an RFC 3339 time: {s:?}"
    );
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let mut rest = s.get(19..).ok_or_else(bad)?;
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        ensure!(digits > 0, "not an RFC 3339 time: {s:?}");
        let mut scale = 100_000_000;
        for c in frac.bytes().take(digits.min(9)) {
            nanos += u32::from(c - b'0') * scale;
            scale /= 10;
        }
        rest = &frac[digits..];
    }
    let base = s.len() - rest.len();
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && sep(base + 3, b":") => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => bail!("not an RFC 3339 time: {s:?}"),
            };
            sign * (num(base + 1, base + 3)? * 3600 + num(base + 4, base + 6)? * 60)
        }
        _ => bail!("not an RFC 3339 time: {s:?}"),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days from 1970-01-01 to the given proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------
// Raw reference
// ---------------------------------------------------------------------------

/// Raw reference: `n` runs of `bash -c true` over `p` threads, in jobs/s.
fn raw_rate(n: usize, p: usize) -> Result<f64> {
    let elapsed = split_loop(n, p, |_, _| bash_true())?;
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// Measures the raw rate at every parallelism and prints it (`when`:
/// before or after the tool's throughput runs).
fn raw_reference(n: usize, when: &str) -> Result<[f64; 2]> {
    let mut out = [0.0; 2];
    for (slot, p) in out.iter_mut().zip(PARALLELISM) {
        *slot = raw_rate(n, p)?;
        info(
            &format!("raw bash -c true, P={p}, {when} this tool's runs"),
            format!("{:.1} jobs/s", *slot),
        );
    }
    Ok(out)
}

/// Measures the raw rate again after a tool's throughput runs and makes the
/// mean of `before` and that the tool's reference; prints the ratios.
fn bracket_raw(fig: &mut Figures, n: usize, before: [f64; 2]) -> Result<()> {
    let after = raw_reference(n, "after")?;
    for (i, p) in PARALLELISM.into_iter().enumerate() {
        let reference = (before[i] + after[i]) / 2.0;
        fig.raw_span[i] = Some((before[i], after[i]));
        fig.raw[i] = Some(reference);
        for (what, rate) in [("", fig.rate[i]), (", one CLI per job", fig.rate_cli[i])] {
            if let Some(rate) = rate {
                info(
                    &format!("ratio to raw (mean before/after), P={p}{what}"),
                    format!("{:.3} (reference {reference:.1} jobs/s)", rate / reference),
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Daemon processes and the idle window
// ---------------------------------------------------------------------------

/// Guard around a daemon process started by the benchmark.
///
/// It runs in its own process group (a Ctrl-C at the terminal reaches only
/// the benchmark, which then stops it in order). Dropping the guard sends
/// SIGTERM, waits up to [`STOP_GRACE`], then SIGKILLs and reaps it.
struct Daemon {
    /// Name for messages.
    name: String,
    /// The process.
    child: Child,
    /// File that receives its stdout and stderr.
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdin from /dev/null and output to `log`.
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the daemon has exited or the benchmark was interrupted.
    fn check_alive(&mut self) -> Result<()> {
        check_interrupted()?;
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}){}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last lines of the daemon's output, for an error message.
    fn log_tail(&self) -> String {
        const LINES: usize = 20;
        match fs::read_to_string(&self.log) {
            Ok(s) if !s.trim().is_empty() => {
                let lines: Vec<&str> = s.lines().collect();
                let start = lines.len().saturating_sub(LINES);
                format!(
                    "\n--- last output of {} ({}) ---\n{}",
                    self.name,
                    self.log.display(),
                    lines[start..].join("\n")
                )
            }
            _ => format!("\n({} printed nothing)", self.name),
        }
    }
}

impl Drop for Daemon {
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
            eprintln!(
                "{} ({pid}) ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL",
                self.name
            );
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What an idle window measured.
#[derive(Clone)]
struct Idle {
    /// VmRSS at the end of the window, KiB.
    rss_kib: u64,
    /// VmHWM (peak RSS over the process's life), KiB.
    hwm_kib: u64,
    /// utime+stime over the window, ms.
    cpu_ms: f64,
    /// Voluntary + involuntary context switches over all threads.
    wakeups: u64,
    /// Threads at the end of the window.
    threads: usize,
    /// The window.
    window: Duration,
}

impl Idle {
    /// Prints the figures.
    fn print(&self) {
        let secs = self.window.as_secs_f64();
        info(
            "idle VmRSS (end of window)",
            format!("{:.2} MiB", self.rss_kib as f64 / 1024.0),
        );
        info(
            "idle VmHWM (peak over the life of the process)",
            format!("{:.2} MiB", self.hwm_kib as f64 / 1024.0),
        );
        info(
            &format!("CPU time (utime+stime) in {secs:.0} s idle"),
            format!("{:.0} ms", self.cpu_ms),
        );
        info(
            &format!("wake-ups (ctx switches, all threads) in {secs:.0} s"),
            self.wakeups,
        );
        info("threads", self.threads);
    }
}

/// Context-switch counters of one thread over the idle window.
struct ThreadTrack {
    /// Thread name (`comm`).
    name: String,
    /// Switches at the window start (0 for threads created during the window).
    base: u64,
    /// Switches at the last sample that saw the thread.
    last: u64,
    /// Whether the thread still existed at the last sample.
    alive: bool,
}

impl ThreadTrack {
    /// Wake-ups of this thread; one that exited woke at least once to do so.
    fn wakeups(&self) -> u64 {
        let seen = self.last.saturating_sub(self.base);
        if self.alive { seen } else { seen.max(1) }
    }
}

/// utime + stime of `pid` (all threads), in ms, from `/proc/<pid>/stat`.
fn cpu_ms(pid: u32) -> Result<f64> {
    let [utime, stime, ..] = cpu_ticks(&pid.to_string())?;
    Ok(ticks_ms(utime + stime))
}

/// Measures `pid` over an idle `window`: RSS at the end, CPU time and
/// context switches of all threads (sampled so that threads that come and
/// go are counted). Reading /proc does not wake the process.
fn idle_window(pid: u32, window: Duration, check: &mut dyn FnMut() -> Result<()>) -> Result<Idle> {
    let cpu_before = cpu_ms(pid)?;
    let mut threads: HashMap<u32, ThreadTrack> = thread_switches(pid)?
        .into_iter()
        .map(|(tid, (name, n))| {
            let track = ThreadTrack {
                name,
                base: n,
                last: n,
                alive: true,
            };
            (tid, track)
        })
        .collect();
    let end = Instant::now() + window;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        thread::sleep(IDLE_SAMPLE_PERIOD.min(end - now));
        check()?;
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
                });
        }
    }
    let cpu_after = cpu_ms(pid)?;
    let (rss_kib, hwm_kib) = memory_kib(pid)?;
    let idle = Idle {
        rss_kib,
        hwm_kib,
        cpu_ms: cpu_after - cpu_before,
        wakeups: threads.values().map(ThreadTrack::wakeups).sum(),
        threads: threads.values().filter(|t| t.alive).count(),
        window,
    };
    idle.print();
    let mut noisy: Vec<(&u32, &ThreadTrack)> =
        threads.iter().filter(|(_, t)| t.wakeups() > 0).collect();
    noisy.sort_by_key(|(tid, _)| **tid);
    for (tid, t) in noisy {
        info(
            &format!("  thread {tid} ({})", t.name),
            format!("{} wake-up(s)", t.wakeups()),
        );
    }
    Ok(idle)
}

// ---------------------------------------------------------------------------
// Results of one tool
// ---------------------------------------------------------------------------

/// Whether a tool was measured.
enum State {
    /// Measured.
    Measured,
    /// Not run here, with the reason.
    Skipped(String),
    /// Failed, with the error.
    Failed(String),
}

/// A tool's figures (each `None` when not applicable or not measured).
#[derive(Default)]
struct Figures {
    /// Version string.
    version: String,
    /// How `RUST_BACKTRACE` was for the daemon.
    backtrace: String,
    /// Raw rate measured before and after the tool's throughput runs.
    raw_span: [Option<(f64, f64)>; 2],
    /// The tool's raw reference: the mean of the two, per parallelism.
    raw: [Option<f64>; 2],
    /// Tool rate, per parallelism.
    rate: [Option<f64>; 2],
    /// ai-cmd-executor only: rate with one `submit` CLI process per job.
    rate_cli: [Option<f64>; 2],
    /// Submit-to-start through the tool's CLI.
    latency_cli: Option<Stats>,
    /// ai-cmd-executor only: submit-to-start with a file dropped by rename.
    latency_drop: Option<Stats>,
    /// Idle window: with the shell's environment, then with the other
    /// `RUST_BACKTRACE` setting (unset if the shell sets it, `1` if not).
    idle: [Option<Idle>; 2],
}

/// One tool's column in the table.
struct Column {
    /// Tool name.
    name: String,
    /// Whether it was measured.
    state: State,
    /// Its figures.
    figures: Figures,
}

impl Column {
    /// A column for a tool that was not run.
    fn skipped(name: &str, why: String) -> Self {
        Self {
            name: name.to_owned(),
            state: State::Skipped(why),
            figures: Figures::default(),
        }
    }

    /// A column for a tool that failed.
    fn failed(name: &str, why: String) -> Self {
        Self {
            name: name.to_owned(),
            state: State::Failed(why),
            figures: Figures::default(),
        }
    }
}

// ---------------------------------------------------------------------------
// ai-cmd-executor
// ---------------------------------------------------------------------------

mod aice {
    //! The worker under test, as a foreground worker on a temp spool.

    use super::*;

    /// A worker on its own fresh spool, warmed up.
    ///
    /// Fields drop in order: the worker stops before the spool is deleted.
    struct Fixture {
        /// The running worker.
        worker: Daemon,
        /// Watcher on `completed/`.
        watcher: ResultWatcher,
        /// The spool root.
        spool: PathBuf,
        /// Temp dir holding spool, config and log.
        _root: RunDir,
    }

    impl Fixture {
        /// Starts a worker with `max_parallel = p` and runs a warm-up job.
        fn start(p: usize, env: &DaemonEnv) -> Result<Self> {
            let root = RunDir::new("peers-aice-", None).context("creating the temp spool")?;
            let spool = root.path().join("spool");
            fs::create_dir(&spool)?;
            let config = root.path().join("worker.toml");
            fs::write(&config, format!("max_parallel = {p}\n"))?;
            let mut cmd = Command::new(WORKER_BIN);
            env.apply(&mut cmd)
                .arg("run")
                .arg("--spool")
                .arg(&spool)
                .arg("--config")
                .arg(&config);
            let mut worker =
                Daemon::spawn("ai-cmd-executor", cmd, &root.path().join("worker.log"))?;
            poll_until(
                "the worker to create its spool",
                READY_TIMEOUT,
                Duration::from_millis(5),
                || {
                    worker.check_alive()?;
                    Ok(["tmp", "pending", "completed"]
                        .iter()
                        .all(|d| spool.join(d).is_dir())
                        .then_some(()))
                },
            )?;
            let watcher = ResultWatcher::new(&spool.join("completed"))?;
            let mut fx = Self {
                worker,
                watcher,
                spool,
                _root: root,
            };
            fx.drop_job("warmup")?;
            fx.wait(&mut HashSet::from(["warmup".to_owned()]))
                .context("waiting for the warm-up job")?;
            fx.started_at("warmup")?;
            Ok(fx)
        }

        /// Submits job `id` by writing `tmp/<id>` and renaming it into `pending/`.
        fn drop_job(&self, id: &str) -> Result<()> {
            let tmp = self.spool.join("tmp").join(id);
            fs::write(&tmp, TRUE_JOB).with_context(|| format!("writing {}", tmp.display()))?;
            let dst = self.spool.join("pending").join(format!("{id}.json"));
            fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))
        }

        /// Submits job `id` through `ai-cmd-executor submit --spool DIR --id ID -- true`.
        fn cli_submit(&self, id: &str, env: &DaemonEnv) -> Result<()> {
            check_interrupted()?;
            let mut cmd = Command::new(WORKER_BIN);
            let out = env
                .apply(&mut cmd)
                .arg("submit")
                .arg("--spool")
                .arg(&self.spool)
                .args(["--id", id, "--", "true"])
                .stdin(Stdio::null())
                .output()
                .context("running ai-cmd-executor submit")?;
            ensure!(
                out.status.success(),
                "ai-cmd-executor submit failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        }

        /// Waits until every id in `pending` has a result.
        fn wait(&mut self, pending: &mut HashSet<String>) -> Result<Instant> {
            self.watcher.wait_all(&mut self.worker, pending)
        }

        /// `started_at` of job `id`, which must have succeeded.
        fn started_at(&self, id: &str) -> Result<SystemTime> {
            let path = self.spool.join("completed").join(format!("{id}.json"));
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let raw: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            ensure!(
                raw.get("status").and_then(Value::as_str) == Some("succeeded")
                    && raw.get("exit_code").and_then(Value::as_i64) == Some(0),
                "job {id} (`true`) did not succeed: {raw}"
            );
            let s = raw
                .get("started_at")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("result {id}: no started_at: {raw}"))?;
            parse_rfc3339(s)
        }
    }

    /// Watches `completed/` for results (IN_MOVED_TO of `<id>.json`).
    struct ResultWatcher {
        /// Inotify instance with one watch on `completed/`.
        inotify: Inotify,
        /// Event buffer.
        buf: Vec<u8>,
        /// The watched directory, rescanned on queue overflow.
        dir: PathBuf,
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
            })
        }

        /// Waits until every id in `pending` has a result, removing ids as
        /// they appear; returns when the last one was observed. Fails when
        /// the worker exits or nothing appears for [`STALL_TIMEOUT`].
        fn wait_all(
            &mut self,
            worker: &mut Daemon,
            pending: &mut HashSet<String>,
        ) -> Result<Instant> {
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
                    ensure!(
                        last_progress.elapsed() <= STALL_TIMEOUT,
                        "no result for {STALL_TIMEOUT:?}; {} result(s) still missing{}",
                        pending.len(),
                        worker.log_tail()
                    );
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
                    } else if let Some(id) = event.name.and_then(|n| n.to_str()).and_then(result_id)
                    {
                        pending.remove(id);
                    }
                }
                if overflow {
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

    /// How jobs are submitted in a throughput run.
    #[derive(Clone, Copy)]
    enum Submit {
        /// Write to `tmp/`, rename into `pending/`.
        Drop,
        /// One `ai-cmd-executor submit` process per job.
        Cli,
    }

    /// `n` jobs at `max_parallel = p`: first submission to last result, in jobs/s.
    fn throughput(n: usize, p: usize, how: Submit, env: &DaemonEnv) -> Result<f64> {
        let mut fx = Fixture::start(p, env)?;
        let tag = match how {
            Submit::Drop => "drop",
            Submit::Cli => "cli",
        };
        let ids: Vec<String> = (0..n).map(|i| format!("tp-{tag}{p}-{i:06}")).collect();
        let mut pending: HashSet<String> = ids.iter().cloned().collect();
        let start = Instant::now();
        for id in &ids {
            match how {
                Submit::Drop => fx.drop_job(id)?,
                Submit::Cli => fx.cli_submit(id, env)?,
            }
        }
        let last = fx
            .wait(&mut pending)
            .with_context(|| format!("throughput run P={p} in {}", fx.spool.display()))?;
        for id in &ids {
            fx.started_at(id)?;
        }
        Ok(n as f64 / (last - start).as_secs_f64())
    }

    /// Measures everything for ai-cmd-executor.
    pub(super) fn measure(settings: &Settings, env: &DaemonEnv) -> Result<Figures> {
        let mut fig = Figures {
            version: version_of(Command::new(WORKER_BIN).arg("--version")),
            backtrace: env.backtrace(),
            ..Figures::default()
        };
        info("version", &fig.version);
        let raw = raw_reference(settings.jobs, "before")?;
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let rate = throughput(settings.jobs, p, Submit::Drop, env)?;
            info(
                &format!("throughput P={p}, jobs dropped by rename"),
                format!("{rate:.1} jobs/s"),
            );
            fig.rate[i] = Some(rate);
        }
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let rate = throughput(settings.jobs, p, Submit::Cli, env)?;
            info(
                &format!("throughput P={p}, one `submit` CLI per job"),
                format!("{rate:.1} jobs/s"),
            );
            fig.rate_cli[i] = Some(rate);
        }
        bracket_raw(&mut fig, settings.jobs, raw)?;

        let mut fx = Fixture::start(1, env)?;
        flush_disk();
        let samples = settings.latency_samples;
        let mut drop_ms = Vec::with_capacity(samples);
        let mut cli_ms = Vec::with_capacity(samples);
        for i in 0..samples * 2 {
            // Alternate the two paths so that both see the same conditions.
            let cli = i % 2 == 1;
            let id = format!("lat-{i:05}");
            thread::sleep(sample_gap(i / 2));
            let t0 = SystemTime::now();
            if cli {
                fx.cli_submit(&id, env)?;
            } else {
                fx.drop_job(&id)?;
            }
            fx.wait(&mut HashSet::from([id.clone()]))
                .with_context(|| format!("latency sample {id}"))?;
            let ms = signed_ms(fx.started_at(&id)?, t0);
            if cli {
                cli_ms.push(ms);
            } else {
                drop_ms.push(ms);
            }
        }
        let (drop_stats, cli_stats) = (Stats::of(drop_ms)?, Stats::of(cli_ms)?);
        info("submit -> started_at, file drop", drop_stats.line());
        info("submit -> started_at, `submit` CLI", cli_stats.line());
        fig.latency_drop = Some(drop_stats);
        fig.latency_cli = Some(cli_stats);

        drop(fx);

        for (slot, env) in fig.idle.iter_mut().zip([env, &env.other_backtrace()]) {
            println!("  [idle, {}]", env.backtrace());
            *slot = Some(idle(settings, env)?);
        }
        Ok(fig)
    }

    /// A fresh worker (`max_parallel = 1`) with environment `env`, after
    /// [`IDLE_WARMUP_JOBS`] jobs submitted through the CLI, over the idle window.
    fn idle(settings: &Settings, env: &DaemonEnv) -> Result<Idle> {
        let mut fx = Fixture::start(1, env)?;
        let ids: Vec<String> = (0..IDLE_WARMUP_JOBS).map(|i| format!("idle-{i}")).collect();
        for id in &ids {
            fx.cli_submit(id, env)?;
        }
        fx.wait(&mut ids.iter().cloned().collect())?;
        flush_disk();
        thread::sleep(IDLE_SETTLE);
        fx.worker.check_alive()?;
        let pid = fx.worker.pid();
        let worker = &mut fx.worker;
        idle_window(pid, settings.idle, &mut || worker.check_alive())
    }
}

// ---------------------------------------------------------------------------
// pueue
// ---------------------------------------------------------------------------

mod pueue {
    //! pueue, installed by `scripts/bench-peers.sh` (`cargo install pueue`).

    use super::*;

    /// The pueue binaries.
    pub(super) struct Bins {
        /// The client.
        client: PathBuf,
        /// The daemon.
        daemon: PathBuf,
    }

    /// Finds pueue from `BENCH_PUEUE`, or says why it is skipped.
    pub(super) fn locate() -> std::result::Result<Bins, String> {
        let Some(client) = std::env::var_os("BENCH_PUEUE").filter(|v| !v.is_empty()) else {
            return Err(
                "BENCH_PUEUE is not set (scripts/bench-peers.sh installs pueue and sets it)"
                    .to_owned(),
            );
        };
        let client = PathBuf::from(client);
        let daemon = client.with_file_name("pueued");
        for bin in [&client, &daemon] {
            if !bin.is_file() {
                return Err(format!("{} does not exist", bin.display()));
            }
        }
        Ok(Bins { client, daemon })
    }

    /// One task as `pueue status --json` shows it.
    struct Task {
        /// Whether it is done.
        done: bool,
        /// Whether it is done with result `Success`.
        success: bool,
        /// `start`, once started.
        start: Option<SystemTime>,
        /// `end`, once done.
        end: Option<SystemTime>,
        /// The task's JSON, for error messages.
        raw: Value,
    }

    /// A `pueued` with its own config and directories, warmed up.
    ///
    /// Fields drop in order: the daemon stops before its directory is deleted.
    struct Fixture<'a> {
        /// The daemon.
        daemon: Daemon,
        /// The binaries.
        bins: &'a Bins,
        /// The environment of the daemon and the clients.
        env: &'a DaemonEnv,
        /// Its config file.
        config: PathBuf,
        /// Temp dir holding config, data, socket and log.
        _root: RunDir,
    }

    impl<'a> Fixture<'a> {
        /// Starts `pueued -c FILE` (foreground), sets `parallel p`, runs a warm-up task.
        fn start(bins: &'a Bins, env: &'a DaemonEnv, p: usize) -> Result<Self> {
            let root = RunDir::new("peers-pueue-", None).context("creating the pueue temp dir")?;
            let dir = root.path();
            let config = dir.join("pueue.yml");
            // Every tool runs `bash -c true`: pueue's default shell is `sh -c`.
            let yaml = format!(
                "shared:\n  pueue_directory: {data:?}\n  runtime_directory: {run:?}\n  \
                 use_unix_socket: true\n  unix_socket_path: {sock:?}\n\
                 daemon:\n  shell_command: [\"bash\", \"-c\", \"{{{{ pueue_command_string }}}}\"]\n",
                data = dir.join("data"),
                run = dir.join("run"),
                sock = dir.join("run").join("pueue.socket"),
            );
            fs::create_dir(dir.join("data"))?;
            fs::create_dir(dir.join("run"))?;
            fs::write(&config, yaml)?;
            let mut cmd = Command::new(&bins.daemon);
            env.apply(&mut cmd).arg("-c").arg(&config);
            let daemon = Daemon::spawn("pueued", cmd, &dir.join("pueued.log"))?;
            let mut fx = Self {
                daemon,
                bins,
                env,
                config,
                _root: root,
            };
            poll_until(
                "pueued to answer `pueue status`",
                READY_TIMEOUT,
                Duration::from_millis(20),
                || {
                    fx.daemon.check_alive()?;
                    let out = fx.command(&["status", "--json"]).output()?;
                    Ok(out.status.success().then_some(()))
                },
            )?;
            fx.run(&["parallel", &p.to_string()])?;
            let id = fx.add()?;
            fx.wait_done(&[id], Duration::from_millis(20))?;
            Ok(fx)
        }

        /// `pueue -c CONFIG ARGS…` with the common environment.
        fn command(&self, args: &[&str]) -> Command {
            let mut cmd = Command::new(&self.bins.client);
            self.env
                .apply(&mut cmd)
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .stdin(Stdio::null());
            cmd
        }

        /// Runs a pueue command that must succeed; returns its stdout.
        fn run(&self, args: &[&str]) -> Result<String> {
            check_interrupted()?;
            let out = self
                .command(args)
                .output()
                .with_context(|| format!("running pueue {}", args.join(" ")))?;
            ensure!(
                out.status.success(),
                "pueue {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }

        /// `pueue add --print-task-id -- true`; returns the task id.
        fn add(&self) -> Result<u64> {
            let out = self.run(&["add", "--print-task-id", "--", "true"])?;
            out.trim()
                .parse()
                .with_context(|| format!("pueue add printed {out:?}, not a task id"))
        }

        /// All tasks, from `pueue status --json`.
        fn tasks(&self) -> Result<BTreeMap<u64, Task>> {
            let out = self.run(&["status", "--json"])?;
            let state: Value = serde_json::from_str(&out).context("parsing pueue status --json")?;
            let tasks = state
                .get("tasks")
                .and_then(Value::as_object)
                .ok_or_else(|| anyhow!("pueue status --json has no `tasks` object"))?;
            let time = |v: Option<&Value>| -> Result<Option<SystemTime>> {
                v.and_then(Value::as_str).map(parse_rfc3339).transpose()
            };
            let mut out = BTreeMap::new();
            for (id, task) in tasks {
                let id: u64 = id.parse().with_context(|| format!("task id {id:?}"))?;
                let status = task.get("status");
                let done = status.and_then(|s| s.get("Done"));
                let running = status.and_then(|s| s.get("Running"));
                let started = done.or(running);
                out.insert(
                    id,
                    Task {
                        done: done.is_some(),
                        success: done.and_then(|d| d.get("result")).and_then(Value::as_str)
                            == Some("Success"),
                        start: time(started.and_then(|s| s.get("start")))?,
                        end: time(done.and_then(|d| d.get("end")))?,
                        raw: task.clone(),
                    },
                );
            }
            Ok(out)
        }

        /// Polls `pueue status --json` (pauses growing to `max_nap`) until
        /// every task in `ids` is done and succeeded; returns all tasks.
        fn wait_done(&mut self, ids: &[u64], max_nap: Duration) -> Result<BTreeMap<u64, Task>> {
            let mut last_count = 0;
            let mut last_progress = Instant::now();
            let mut nap = Duration::from_millis(1);
            loop {
                self.daemon.check_alive()?;
                let tasks = self.tasks()?;
                let mut done = 0;
                for id in ids {
                    let task = tasks
                        .get(id)
                        .ok_or_else(|| anyhow!("pueue lost task {id}"))?;
                    if task.done {
                        ensure!(task.success, "pueue task {id} failed: {}", task.raw);
                        done += 1;
                    }
                }
                if done == ids.len() {
                    return Ok(tasks);
                }
                if done > last_count {
                    last_count = done;
                    last_progress = Instant::now();
                }
                ensure!(
                    last_progress.elapsed() <= STALL_TIMEOUT,
                    "no pueue task finished for {STALL_TIMEOUT:?}; {} of {} done{}",
                    done,
                    ids.len(),
                    self.daemon.log_tail()
                );
                thread::sleep(nap);
                nap = (nap * 2).min(max_nap);
            }
        }
    }

    /// `n` tasks at `parallel p`: before the first `add` to the last task's
    /// `end`, in jobs/s.
    fn throughput(bins: &Bins, env: &DaemonEnv, n: usize, p: usize) -> Result<f64> {
        let mut fx = Fixture::start(bins, env, p)?;
        let t0 = SystemTime::now();
        let ids = (0..n).map(|_| fx.add()).collect::<Result<Vec<_>>>()?;
        let tasks = fx.wait_done(&ids, Duration::from_secs(1))?;
        let last = ids
            .iter()
            .filter_map(|id| tasks.get(id).and_then(|t| t.end))
            .max()
            .ok_or_else(|| anyhow!("no task has an end time"))?;
        let secs = signed_ms(last, t0) / 1e3;
        ensure!(secs > 0.0, "last task ended before the first add");
        Ok(n as f64 / secs)
    }

    /// Measures everything for pueue.
    pub(super) fn measure(settings: &Settings, env: &DaemonEnv, bins: &Bins) -> Result<Figures> {
        let mut fig = Figures {
            version: version_of(Command::new(&bins.client).arg("--version")),
            backtrace: env.backtrace(),
            ..Figures::default()
        };
        info("version", &fig.version);
        info("client", bins.client.display());
        let raw = raw_reference(settings.jobs, "before")?;
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let rate = throughput(bins, env, settings.jobs, p)?;
            info(
                &format!("throughput P={p}, one `pueue add` per job"),
                format!("{rate:.1} jobs/s"),
            );
            fig.rate[i] = Some(rate);
        }
        bracket_raw(&mut fig, settings.jobs, raw)?;

        let mut fx = Fixture::start(bins, env, 1)?;
        flush_disk();
        let mut lat = Vec::with_capacity(settings.latency_samples);
        for i in 0..settings.latency_samples {
            thread::sleep(sample_gap(i));
            let t0 = SystemTime::now();
            let id = fx.add()?;
            let tasks = fx.wait_done(&[id], Duration::from_millis(50))?;
            let start = tasks
                .get(&id)
                .and_then(|t| t.start)
                .ok_or_else(|| anyhow!("task {id} has no start time"))?;
            lat.push(signed_ms(start, t0));
        }
        let stats = Stats::of(lat)?;
        info("submit -> start, `pueue add`", stats.line());
        fig.latency_cli = Some(stats);

        drop(fx);

        for (slot, env) in fig.idle.iter_mut().zip([env, &env.other_backtrace()]) {
            println!("  [idle, {}]", env.backtrace());
            *slot = Some(idle(settings, env, bins)?);
        }
        Ok(fig)
    }

    /// A fresh `pueued` (`parallel 1`) with environment `env`, after
    /// [`IDLE_WARMUP_JOBS`] tasks added through the CLI, over the idle window.
    fn idle(settings: &Settings, env: &DaemonEnv, bins: &Bins) -> Result<Idle> {
        let mut fx = Fixture::start(bins, env, 1)?;
        let ids = (0..IDLE_WARMUP_JOBS)
            .map(|_| fx.add())
            .collect::<Result<Vec<_>>>()?;
        fx.wait_done(&ids, Duration::from_millis(100))?;
        flush_disk();
        thread::sleep(IDLE_SETTLE);
        fx.daemon.check_alive()?;
        let pid = fx.daemon.pid();
        let daemon = &mut fx.daemon;
        idle_window(pid, settings.idle, &mut || daemon.check_alive())
    }
}

// ---------------------------------------------------------------------------
// systemd-run in the tier-3 sandbox
// ---------------------------------------------------------------------------

mod systemd {
    //! systemd-run against a throwaway systemd (PID 1 of an nspawn container).

    use super::*;
    use sandbox::Sandbox;

    /// Runs this binary inside the sandbox as the client in `mode`; returns
    /// the JSON it printed.
    fn inner_client(sb: &Sandbox, exe: &Path, mode: &str, n: usize, p: usize) -> Result<Value> {
        check_interrupted()?;
        let script = format!(
            "{INNER_ENV}={mode} AICE_PEERS_N={n} AICE_PEERS_P={p} exec '{}'",
            exe.display()
        );
        let out = sb.sh(&script);
        check_interrupted()?;
        ensure!(
            out.status.success(),
            "in-sandbox client `{mode}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line)
            .with_context(|| format!("in-sandbox client `{mode}` printed {line:?}"))
    }

    /// A number from the inner client's JSON.
    fn number(v: &Value, key: &str) -> Result<f64> {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("no number `{key}` in {v}"))
    }

    /// The host pid of the sandbox's PID 1: the child named `systemd` of our
    /// child `systemd-nspawn`.
    fn sandbox_pid1() -> Result<u32> {
        let me = std::process::id();
        let nspawn = children(me)?
            .into_iter()
            .find(|(_, comm)| comm == "systemd-nspawn")
            .ok_or_else(|| anyhow!("no systemd-nspawn child of pid {me}"))?
            .0;
        children(nspawn)?
            .into_iter()
            .find(|(_, comm)| comm == "systemd")
            .map(|(pid, _)| pid)
            .ok_or_else(|| anyhow!("no systemd child of systemd-nspawn {nspawn}"))
    }

    /// `(pid, comm)` of the children of `parent`.
    fn children(parent: u32) -> Result<Vec<(u32, String)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map_or("", |(_, c)| c);
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            if ppid == Some(parent) {
                out.push((pid, comm.to_owned()));
            }
        }
        Ok(out)
    }

    /// Whether `RUST_BACKTRACE` is in the environment of `pid`.
    fn backtrace_of(pid: u32) -> String {
        match fs::read(format!("/proc/{pid}/environ")) {
            Ok(env) => env
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"RUST_BACKTRACE="))
                .map_or_else(
                    || "RUST_BACKTRACE unset (PID 1: env from nspawn)".to_owned(),
                    |v| format!("RUST_BACKTRACE={}", String::from_utf8_lossy(v)),
                ),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// Measures everything for systemd-run.
    pub(super) fn measure(settings: &Settings) -> Result<Figures> {
        let exe = std::env::current_exe().context("locating this benchmark binary")?;
        let exe_dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent", exe.display()))?;
        // The helper prints its own NOTICE when it cannot boot; the common
        // reasons are named here too, for the table.
        if !nix::unistd::geteuid().is_root() {
            return Err(Skip(
                "not running as root (the tier-3 sandbox needs root: run scripts/bench-peers.sh as root)"
                    .to_owned(),
            )
            .into());
        }
        // The raw reference is taken before the boot, on the same quiet
        // machine as for the other tools.
        let raw = raw_reference(settings.jobs, "before")?;
        let Some(sb) = Sandbox::boot("peers", &[exe_dir]) else {
            return Err(Skip(
                "the tier-3 sandbox cannot boot here (see the NOTICE above: \
                 systemd-nspawn, nsenter or systemd missing)"
                    .to_owned(),
            )
            .into());
        };
        let version = sb.ok("systemctl --version | head -n 1");
        let pid1 = sandbox_pid1()?;
        let mut fig = Figures {
            version: format!("{version} (systemd-run in an nspawn container)"),
            backtrace: backtrace_of(pid1),
            ..Figures::default()
        };
        info("version", &fig.version);
        info("sandbox PID 1 (host pid)", pid1);
        // Let the boot's last jobs finish before measuring.
        poll_until(
            "the sandbox's job queue to empty",
            READY_TIMEOUT,
            Duration::from_millis(100),
            || {
                let out = sb.sh("systemctl list-jobs --no-legend");
                Ok((out.status.success() && out.stdout.trim_ascii().is_empty()).then_some(()))
            },
        )?;
        // ... and PID 1 go quiet (no CPU time for a while): right after the
        // boot it is still busy, and so is the machine.
        let settle_start = Instant::now();
        let mut last = (cpu_ms(pid1)?, Instant::now());
        let settled = poll_until(
            "the sandbox's PID 1 to go quiet",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let now = cpu_ms(pid1)?;
                if now != last.0 {
                    last = (now, Instant::now());
                }
                Ok((last.1.elapsed() >= SANDBOX_QUIET).then_some(()))
            },
        );
        match settled {
            Ok(()) => info(
                "sandbox quiet (PID 1 used no CPU for 2 s) after",
                format!("{:.1} s", settle_start.elapsed().as_secs_f64()),
            ),
            Err(e) => {
                check_interrupted()?;
                println!("  WARNING: measuring anyway: {e:#}");
            }
        }
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let inside = inner_client(&sb, &exe, "raw", settings.jobs, p)?;
            info(
                &format!("raw bash -c true inside the sandbox, P={p} (info)"),
                format!("{:.1} jobs/s", number(&inside, "rate")?),
            );
            let cpu0 = cpu_ms(pid1)?;
            let v = inner_client(&sb, &exe, "systemd-run", settings.jobs, p)?;
            let rate = number(&v, "rate")?;
            info(
                &format!("throughput P={p}, {p} client thread(s) of systemd-run --wait"),
                format!("{rate:.1} jobs/s"),
            );
            info(
                "  PID 1 CPU per job",
                format!("{:.2} ms", (cpu_ms(pid1)? - cpu0) / settings.jobs as f64),
            );
            fig.rate[i] = Some(rate);
        }
        // The "after" reference is taken on the host with the sandbox idle.
        bracket_raw(&mut fig, settings.jobs, raw)?;

        flush_disk();
        let v = inner_client(&sb, &exe, "latency", settings.latency_samples, 1)?;
        let samples: Vec<f64> = v
            .get("ms")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("no `ms` array in {v}"))?
            .iter()
            .map(|x| x.as_f64().ok_or_else(|| anyhow!("bad sample {x}")))
            .collect::<Result<_>>()?;
        let stats = Stats::of(samples)?;
        info(
            "submit -> ExecMainStartTimestamp, `systemd-run`",
            stats.line(),
        );
        fig.latency_cli = Some(stats);

        println!("  [idle: the sandbox's PID 1]");
        inner_client(&sb, &exe, "systemd-run", IDLE_WARMUP_JOBS, 1)?;
        flush_disk();
        thread::sleep(IDLE_SETTLE);
        let idle = idle_window(pid1, settings.idle, &mut || {
            check_interrupted()?;
            ensure!(
                Path::new(&format!("/proc/{pid1}")).exists(),
                "the sandbox's PID 1 exited"
            );
            Ok(())
        })?;
        // PID 1 is not a Rust program and nspawn gives it its own
        // environment: one window stands for both settings.
        fig.idle = [Some(idle.clone()), Some(idle)];
        drop(sb);
        Ok(fig)
    }
}

// ---------------------------------------------------------------------------
// The in-sandbox client
// ---------------------------------------------------------------------------

mod inner {
    //! This binary, run inside the sandbox (`AICE_PEERS_CLIENT=mode`), as the
    //! systemd-run client: one process in the container, so that each job
    //! costs one `systemd-run` spawn, as each pueue job costs one `pueue add`.
    //! Prints one JSON line.

    use super::*;

    /// Overall deadline of one client run.
    const DEADLINE: Duration = Duration::from_secs(1800);

    /// Runs `mode` and prints its JSON; exits 1 with the error on failure.
    pub(super) fn main(mode: &str) -> ExitCode {
        // A deadline for the whole run, so that a hung systemd-run cannot
        // hang the benchmark; the sandbox is torn down behind it.
        thread::spawn(|| {
            thread::sleep(DEADLINE);
            eprintln!("in-sandbox client: deadline of {DEADLINE:?} passed");
            std::process::exit(3);
        });
        match run(mode) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("in-sandbox client `{mode}`: {err:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// Dispatches on the mode.
    fn run(mode: &str) -> Result<Value> {
        let n: usize = env_or("AICE_PEERS_N", 0)?;
        let p: usize = env_or("AICE_PEERS_P", 1)?;
        ensure!(
            n >= 1 && p >= 1,
            "AICE_PEERS_N and AICE_PEERS_P must be set"
        );
        match mode {
            "raw" => Ok(serde_json::json!({ "rate": raw_rate(n, p)? })),
            "systemd-run" => {
                let elapsed = split_loop(n, p, |_, _| systemd_run_wait())?;
                Ok(serde_json::json!({ "rate": n as f64 / elapsed.as_secs_f64() }))
            }
            "latency" => Ok(serde_json::json!({ "ms": latency(n)? })),
            _ => bail!("unknown mode {mode:?}"),
        }
    }

    /// `systemd-run --wait --quiet --collect -- /bin/bash -c true`.
    fn systemd_run_wait() -> Result<()> {
        let out = Command::new("systemd-run")
            .args([
                "--wait",
                "--quiet",
                "--collect",
                "--",
                "/bin/bash",
                "-c",
                "true",
            ])
            .stdin(Stdio::null())
            .output()
            .context("running systemd-run")?;
        ensure!(
            out.status.success(),
            "systemd-run --wait failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// `systemctl show` properties of `unit` as a map.
    fn show(unit: &str, props: &[&str]) -> Result<HashMap<String, String>> {
        let mut cmd = Command::new("systemctl");
        cmd.arg("show").arg(unit);
        for p in props {
            cmd.arg("-p").arg(p);
        }
        let out = cmd.stdin(Stdio::null()).output()?;
        ensure!(
            out.status.success(),
            "systemctl show {unit} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// `n` samples of submit-to-start: `CLOCK_MONOTONIC` before spawning
    /// `systemd-run` to the unit's `ExecMainStartTimestampMonotonic`. The
    /// unit keeps its properties after its process exits
    /// (`RemainAfterExit=yes`) until it is stopped after the sample.
    fn latency(n: usize) -> Result<Vec<f64>> {
        const PROPS: [&str; 3] = [
            "ExecMainStartTimestampMonotonic",
            "ExecMainExitTimestampMonotonic",
            "ExecMainStatus",
        ];
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            thread::sleep(sample_gap(i));
            let unit = format!("aice-peers-lat-{i}.service");
            let t0 = monotonic_us()?;
            let status = Command::new("systemd-run")
                .args(["--quiet", "-p", "RemainAfterExit=yes"])
                .arg(format!("--unit={unit}"))
                .args(["--", "/bin/bash", "-c", "true"])
                .stdin(Stdio::null())
                .status()
                .context("running systemd-run")?;
            ensure!(
                status.success(),
                "systemd-run --unit={unit} failed: {status}"
            );
            let props = poll_until(
                &format!("{unit} to exit"),
                READY_TIMEOUT,
                Duration::from_millis(20),
                || {
                    let p = show(&unit, &PROPS)?;
                    let exited = p
                        .get("ExecMainExitTimestampMonotonic")
                        .is_some_and(|v| v != "0" && !v.is_empty());
                    Ok(exited.then_some(p))
                },
            )?;
            ensure!(
                props.get("ExecMainStatus").map(String::as_str) == Some("0"),
                "{unit} did not exit 0: {props:?}"
            );
            let start: u64 = props
                .get("ExecMainStartTimestampMonotonic")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("{unit}: no start timestamp: {props:?}"))?;
            out.push((start as f64 - t0 as f64) / 1e3);
            let stop = Command::new("systemctl")
                .args(["stop", &unit])
                .stdin(Stdio::null())
                .status()?;
            ensure!(stop.success(), "systemctl stop {unit} failed: {stop}");
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

/// One row: figure, one cell per column (raw first), target, verdict.
struct Row {
    /// What the row shows.
    label: String,
    /// Cells: raw, then each tool.
    cells: Vec<String>,
    /// The target for ai-cmd-executor, if any.
    target: String,
    /// Whether ai-cmd-executor met it.
    verdict: String,
}

/// The comparison table.
struct Table {
    /// Column headings (after the figure column).
    heads: Vec<String>,
    /// Rows.
    rows: Vec<Row>,
    /// Notes printed under the table.
    notes: Vec<String>,
}

/// Which way is better for a figure.
#[derive(Clone, Copy)]
enum Better {
    /// Higher is better.
    Higher,
    /// Lower is better.
    Lower,
}

impl Table {
    /// Builds the table from the columns (ai-cmd-executor first).
    fn build(settings: &Settings, env: &DaemonEnv, cols: &[Column]) -> Self {
        let mut heads = vec!["raw `bash -c true`".to_owned()];
        heads.extend(cols.iter().map(|c| c.name.clone()));
        let mut rows = Vec::new();
        let idle_secs = settings.idle.as_secs_f64();
        let blank = |c: &Column| -> String {
            match &c.state {
                State::Measured => "–".to_owned(),
                State::Skipped(_) => "skipped".to_owned(),
                State::Failed(_) => "failed".to_owned(),
            }
        };
        let cells = |f: &dyn Fn(&Figures) -> Option<String>| -> Vec<String> {
            cols.iter()
                .map(|c| f(&c.figures).unwrap_or_else(|| blank(c)))
                .collect()
        };
        let aice = cols.first().map(|c| &c.figures);
        let peers: Vec<&Column> = cols.iter().skip(1).collect();

        // Whether no measured peer is better than ai-cmd-executor on `get`
        // (a tie counts, and is named: 0 ms of CPU cannot be beaten; `None`
        // when no peer was measured), and the comparison in words.
        let ahead =
            |get: &dyn Fn(&Figures) -> Option<f64>, better: Better| -> (Option<bool>, String) {
                let Some(mine) = aice.and_then(get) else {
                    return (Some(false), "not measured".to_owned());
                };
                let (mut before, mut level, mut behind, mut missing) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for peer in &peers {
                    let name = peer.name.clone();
                    match get(&peer.figures) {
                        Some(theirs) if theirs == mine => level.push(name),
                        Some(theirs) => {
                            let ok = match better {
                                Better::Higher => mine > theirs,
                                Better::Lower => mine < theirs,
                            };
                            if ok {
                                before.push(name)
                            } else {
                                behind.push(name)
                            }
                        }
                        None => missing.push(name),
                    }
                }
                let mut parts = Vec::new();
                for (word, names) in [
                    ("ahead of", &before),
                    ("level with", &level),
                    ("behind", &behind),
                    ("not compared with (not measured)", &missing),
                ] {
                    if !names.is_empty() {
                        parts.push(format!("{word} {}", names.join(", ")));
                    }
                }
                let compared = !(before.is_empty() && level.is_empty() && behind.is_empty());
                (compared.then_some(behind.is_empty()), parts.join("; "))
            };
        let verdict = |ok: Option<bool>, why: String| {
            let word = match ok {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "UNCHECKED (no peer measured)",
            };
            format!("{word}: {why}")
        };
        // `own` (a target of ai-cmd-executor alone) and then the comparison.
        let both = |own: bool, peers: Option<bool>| if own { peers } else { Some(false) };

        let mut env_cells = vec!["–".to_owned()];
        env_cells.extend(cols.iter().map(|c| match &c.state {
            State::Measured => c.figures.backtrace.clone(),
            _ => blank(c),
        }));
        rows.push(Row {
            label: "daemon environment".to_owned(),
            cells: env_cells,
            target: "same for all".to_owned(),
            verdict: String::new(),
        });

        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let span = |f: &Figures| f.raw_span[i].map(|(b, a)| format!("{b:.1} / {a:.1}"));
            let mut raw_cells = vec![aice.and_then(span).unwrap_or_else(|| "–".to_owned())];
            raw_cells.extend(cells(&span));
            rows.push(Row {
                label: format!("raw rate before / after the tool, P={p} (jobs/s)"),
                cells: raw_cells,
                target: String::new(),
                verdict: String::new(),
            });
            let mut rate_cells = vec![
                aice.and_then(|f| f.raw[i])
                    .map_or("–".to_owned(), |r| format!("{r:.1} (1.000)")),
            ];
            rate_cells.extend(cells(&|f| {
                Some(format!("{:.1} ({:.3})", f.rate[i]?, f.rate[i]? / f.raw[i]?))
            }));
            let ratio = aice.and_then(|f| Some(f.rate[i]? / f.raw[i]?));
            let (is_ahead, why) = ahead(&|f| f.rate[i], Better::Higher);
            let ok = both(ratio.is_some_and(|r| r >= TARGET_RATIO), is_ahead);
            rows.push(Row {
                label: format!("throughput P={p}, jobs/s (ratio to raw)"),
                cells: rate_cells,
                target: format!(">= {TARGET_RATIO} of raw, ahead"),
                verdict: verdict(
                    ok,
                    format!(
                        "{} of raw, {why}",
                        ratio.map_or("–".to_owned(), |r| format!("{r:.3}"))
                    ),
                ),
            });
        }
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let mut c = vec!["–".to_owned()];
            c.extend(cells(&|f| {
                Some(format!(
                    "{:.1} ({:.3})",
                    f.rate_cli[i]?,
                    f.rate_cli[i]? / f.raw[i]?
                ))
            }));
            rows.push(Row {
                label: format!("  (info) P={p}, one `submit` CLI process per job"),
                cells: c,
                target: String::new(),
                verdict: String::new(),
            });
        }

        let lat_row = |label: &str, get: &dyn Fn(&Stats) -> f64| {
            let mut c = vec!["–".to_owned()];
            c.extend(cells(&|f| f.latency_cli.map(|s| format!("{:.2}", get(&s)))));
            let (ok, why) = ahead(&|f| f.latency_cli.map(|s| get(&s)), Better::Lower);
            Row {
                label: label.to_owned(),
                cells: c,
                target: "ahead".to_owned(),
                verdict: verdict(ok, why),
            }
        };
        rows.push(lat_row("submit -> start p50, ms (CLI per job)", &|s| s.p50));
        rows.push(lat_row("submit -> start p99, ms (CLI per job)", &|s| s.p99));
        let mut c = vec!["–".to_owned()];
        c.extend(cells(&|f| {
            f.latency_drop
                .map(|s| format!("{:.2} / {:.2}", s.p50, s.p99))
        }));
        rows.push(Row {
            label: "  (info) p50 / p99, ms, file dropped by rename".to_owned(),
            cells: c,
            target: String::new(),
            verdict: String::new(),
        });

        let backtrace_labels = [
            format!("{}, as the shell has it", env.backtrace()),
            env.other_backtrace().backtrace(),
        ];
        for (k, setting) in backtrace_labels.iter().enumerate() {
            let idle = move |f: &Figures| f.idle[k].clone();
            let mut c = vec!["–".to_owned()];
            c.extend(cells(&|f| {
                idle(f).map(|i| format!("{:.2}", i.rss_kib as f64 / 1024.0))
            }));
            let (ok, why) = ahead(&|f| idle(f).map(|i| i.rss_kib as f64), Better::Lower);
            rows.push(Row {
                label: format!("idle RSS of the daemon, MiB [{setting}]"),
                cells: c,
                target: "ahead".to_owned(),
                verdict: verdict(ok, why),
            });
            let mut c = vec!["–".to_owned()];
            c.extend(cells(&|f| idle(f).map(|i| format!("{:.0}", i.cpu_ms))));
            let (ok, why) = ahead(&|f| idle(f).map(|i| i.cpu_ms), Better::Lower);
            rows.push(Row {
                label: format!("idle CPU time in {idle_secs:.0} s, ms [{setting}]"),
                cells: c,
                target: "ahead".to_owned(),
                verdict: verdict(ok, why),
            });
            let mut c = vec!["–".to_owned()];
            c.extend(cells(&|f| idle(f).map(|i| i.wakeups.to_string())));
            let (is_ahead, why) = ahead(&|f| idle(f).map(|i| i.wakeups as f64), Better::Lower);
            let zero = aice.and_then(idle).is_some_and(|i| i.wakeups == 0);
            rows.push(Row {
                label: format!("idle wake-ups in {idle_secs:.0} s (ctx switches) [{setting}]"),
                cells: c,
                target: "0 (no heartbeat outside systemd), ahead".to_owned(),
                verdict: verdict(
                    both(zero, is_ahead),
                    format!("{}; {why}", if zero { "none" } else { "some" }),
                ),
            });
        }

        let mut notes = vec![
            format!(
                "N = {} jobs of `bash -c true` per throughput run; {} latency samples per path; \
                 each idle window ({idle_secs:.0} s) on a fresh daemon after {IDLE_WARMUP_JOBS} jobs \
                 submitted through its CLI (systemd-run: one window of the sandbox's PID 1, shown \
                 for both settings); CPU time has the 10 ms resolution of /proc/<pid>/stat.",
                settings.jobs, settings.latency_samples
            ),
            format!(
                "Each ratio is against that tool's raw reference: the mean of the raw rates measured \
                 right before and right after its throughput runs (row above it); the raw column \
                 shows ai-cmd-executor's. The daemons of \
                 ai-cmd-executor and pueue, and their clients, ran with the shell's environment \
                 ({}) except in the idle rows marked with the other setting.",
                env.backtrace_line()
            ),
        ];
        for c in cols {
            match &c.state {
                State::Measured => notes.push(format!("{}: {}", c.name, c.figures.version)),
                State::Skipped(why) => notes.push(format!("{} skipped: {why}", c.name)),
                State::Failed(why) => notes.push(format!("{} FAILED: {why}", c.name)),
            }
        }
        Self { heads, rows, notes }
    }

    /// Prints the table as aligned text.
    fn print_text(&self) {
        let mut widths = vec![
            self.rows
                .iter()
                .map(|r| r.label.chars().count())
                .max()
                .unwrap_or(0),
        ];
        for (i, h) in self.heads.iter().enumerate() {
            let w = self
                .rows
                .iter()
                .map(|r| r.cells.get(i).map_or(0, |c| c.chars().count()))
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0);
            widths.push(w);
        }
        let line = |label: &str, cells: &[String], tail: &str| {
            let mut s = format!("{label:<w$}", w = widths[0]);
            for (i, c) in cells.iter().enumerate() {
                s.push_str(&format!("  {c:>w$}", w = widths[i + 1]));
            }
            s.push_str("  ");
            s.push_str(tail);
            println!("{}", s.trim_end());
        };
        line("figure", &self.heads, "target / ai-cmd-executor");
        for r in &self.rows {
            let tail = match (r.target.is_empty(), r.verdict.is_empty()) {
                (true, _) => String::new(),
                (false, true) => r.target.clone(),
                (false, false) => format!("{} -> {}", r.target, r.verdict),
            };
            line(&r.label, &r.cells, &tail);
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }

    /// Prints the table as Markdown.
    fn print_markdown(&self) {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut head = "| figure |".to_owned();
        for h in &self.heads {
            head.push_str(&format!(" {} |", esc(h)));
        }
        head.push_str(" target for ai-cmd-executor | met? |");
        println!("{head}");
        println!("|{}", " --- |".repeat(self.heads.len() + 3));
        for r in &self.rows {
            let mut s = format!("| {} |", esc(r.label.trim()));
            for c in &r.cells {
                s.push_str(&format!(" {} |", esc(c)));
            }
            s.push_str(&format!(" {} | {} |", esc(&r.target), esc(&r.verdict)));
            println!("{s}");
        }
        println!();
        for n in &self.notes {
            println!("- {}", esc(n));
        }
    }
}

//! Helpers shared by the benchmarks (`throughput.rs`, `peers.rs`): the
//! interrupt handling, the raw `bash -c true` job, `/proc` readers,
//! statistics and the environment knobs.

#![allow(dead_code)] // each benchmark uses its own part

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Units of utime/stime in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 by
/// the Linux ABI; a sysconf call would need `unsafe`).
pub const CLOCK_TICKS_PER_SEC: u64 = 100;

/// Set when SIGINT, SIGTERM or SIGHUP arrives; checked by every wait loop.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Starts a thread that catches SIGINT, SIGTERM and SIGHUP and sets
/// [`INTERRUPTED`] instead of letting them kill the benchmark.
///
/// The wait loops then fail with "interrupted", and the normal return path
/// drops every [`Worker`] guard and temporary spool. The handlers are
/// installed with tokio's signal support (no `unsafe`, no blocked signal mask,
/// which children would inherit: a worker spawned with SIGTERM blocked could
/// not be stopped). Returns once the handlers are in place.
pub fn install_interrupt_handler(stopping: &'static str) -> Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    thread::Builder::new()
        .name("bench-signals".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let streams = [
                    SignalKind::interrupt(),
                    SignalKind::terminate(),
                    SignalKind::hangup(),
                ]
                .map(signal);
                let [Ok(mut int), Ok(mut term), Ok(mut hup)] = streams else {
                    let err = streams.into_iter().find_map(Result::err);
                    let _ = ready_tx.send(Err(err.unwrap_or_else(|| io::Error::other("signal"))));
                    return;
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    let name = tokio::select! {
                        _ = int.recv() => "SIGINT",
                        _ = term.recv() => "SIGTERM",
                        _ = hup.recv() => "SIGHUP",
                    };
                    eprintln!("\n{name} received: stopping {stopping}");
                    INTERRUPTED.store(true, Ordering::Relaxed);
                }
            });
        })
        .context("starting the signal thread")?;
    ready_rx
        .recv()
        .context("signal thread died")?
        .context("installing signal handlers")
}

/// Fails once the benchmark has been interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
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

/// Describes the machine: nproc, CPU model and kernel.
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

/// The 1, 5 and 15 minute load averages, to show other activity on the machine.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Nearest-rank percentile of sorted, non-empty `sorted`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `later - earlier` in milliseconds, negative when `later` is earlier.
pub fn signed_ms(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

/// Runs `bash -c true` to completion once, with all stdio on /dev/null.
pub fn bash_true() -> Result<()> {
    check_interrupted()?;
    let status = Command::new("bash")
        .args(["-c", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running bash -c true")?;
    ensure!(status.success(), "bash -c true failed: {status}");
    Ok(())
}

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
pub fn status_field(status: &str, key: &str) -> Option<u64> {
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

/// The job id of a result file name (`<id>.json`, not a dot-prefixed temp file).
pub fn result_id(name: &str) -> Option<&str> {
    if name.starts_with('.') {
        return None;
    }
    name.strip_suffix(".json")
}

/// utime, stime, cutime and cstime of `pid` (a number, or `self`), in clock
/// ticks, from `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: &str) -> Result<[u64; 4]> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime, stime, cutime and cstime are fields 14 to 17.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace())
        .into_iter()
        .flatten()
        .skip(14 - 3)
        .take(4)
        .map_while(|v| v.parse().ok())
        .collect();
    fields.try_into().map_err(|_| anyhow!("malformed {path}"))
}

/// Clock ticks as milliseconds.
pub fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / CLOCK_TICKS_PER_SEC as f64
}

/// The whole machine's CPU time so far (all CPUs), in clock ticks, from the
/// first line of `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    /// Idle and iowait.
    idle: u64,
    /// Every state (guest time is already inside user and nice).
    total: u64,
    /// Number of CPUs (the `cpuN` lines).
    cpus: usize,
}

impl MachineCpu {
    /// Reads `/proc/stat`.
    pub fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().unwrap_or_default();
        let fields: Vec<u64> = line
            .strip_prefix("cpu ")
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

    /// Number of CPUs the machine has online.
    pub fn cpus(self) -> usize {
        self.cpus
    }

    /// CPU time spent on all CPUs since `earlier`, by anything (user,
    /// kernel, interrupts, and time the hypervisor took: steal), in ms.
    pub fn busy_ms_since(self, earlier: MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        let idle = self.idle.saturating_sub(earlier.idle);
        ticks_ms(total.saturating_sub(idle))
    }

    /// The share of all CPUs' time since `earlier` that went idle: time
    /// nothing was runnable, which a CPU-bound run at full parallelism
    /// would not have.
    pub fn idle_share_since(self, earlier: MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.idle.saturating_sub(earlier.idle) as f64 / total as f64
    }
}

/// The temporary directory of one run (a spool, a daemon's data), deleted
/// only at the end of the benchmark: dropping it puts it aside until
/// [`remove_finished_run_dirs`].
///
/// Deleting a run's thousands of files between runs would slow the runs
/// after it on the same file system: ext4 without a journal passes over
/// every inode freed in the last minutes when it allocates a new one (the
/// kernel's `recently_deleted()`), so each file a later run created would
/// cost a scan past the earlier runs' deletions, and the later runs would
/// measure the benchmark's own clean-up.
pub struct RunDir(Option<TempDir>);

/// Run directories dropped so far, deleted by [`remove_finished_run_dirs`].
static FINISHED_RUN_DIRS: Mutex<Vec<TempDir>> = Mutex::new(Vec::new());

impl RunDir {
    /// A new directory named `<prefix>XXXXXX` under `base`, or the
    /// default temp dir when `None`.
    pub fn new(prefix: &str, base: Option<&Path>) -> io::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(prefix);
        let dir = match base {
            Some(base) => builder.tempdir_in(base),
            None => builder.tempdir(),
        }?;
        Ok(RunDir(Some(dir)))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map(TempDir::path)
            .expect("a run directory is in place until dropped")
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            FINISHED_RUN_DIRS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(dir);
        }
    }
}

/// Deletes the directories of every finished run (see [`RunDir`]); called
/// once, when the benchmark ends, however it ends.
pub fn remove_finished_run_dirs() {
    let dirs = std::mem::take(
        &mut *FINISHED_RUN_DIRS
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    drop(dirs);
}

/// Runs `job(thread, index)` `n` times split over `p` threads (thread `t`
/// takes its share of the `n`, with indices from 0); returns the wall time.
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

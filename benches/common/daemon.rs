//! Daemons the benchmarks start (the worker, pueued): their environment,
//! a guard that stops them on every exit path, and the idle window.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::*;

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

/// Guard around a daemon process started by the benchmark.
///
/// It runs in its own process group (a Ctrl-C at the terminal reaches only
/// the benchmark, which then stops it in order). Dropping the guard sends
/// SIGTERM, waits up to 5 s, then SIGKILLs and reaps it.
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

/// What an idle window measured.
#[derive(Clone, Copy)]
pub struct Idle {
    pub rss_kib: u64, // VmRSS at the end of the window
    pub cpu_ms: f64,  // utime+stime over the window
    pub wakeups: u64, // voluntary + involuntary context switches, all threads
}

/// Measures `pid` over an idle `window` and prints it: RSS at the end, CPU
/// time and context switches of all threads (sampled every 100 ms, so that
/// threads that come and go are counted; reading /proc does not wake the
/// process).
pub fn idle_window(
    pid: u32,
    window: Duration,
    check: &mut dyn FnMut() -> Result<()>,
) -> Result<Idle> {
    let cpu_before = CpuTimes::of(pid)?;
    let start = thread_switches(pid)?;
    // Each thread's name, count at the last sample that saw it, and whether the last one did.
    let mut seen: HashMap<u32, (String, u64, bool)> = HashMap::new();
    let (end, mut snapshot) = (Instant::now() + window, start.clone());
    loop {
        seen.iter_mut()
            .for_each(|(tid, t)| t.2 = snapshot.contains_key(tid));
        seen.extend(
            snapshot
                .into_iter()
                .map(|(tid, (name, n))| (tid, (name, n, true))),
        );
        if Instant::now() >= end {
            break;
        }
        thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
        check()?;
        snapshot = thread_switches(pid)?;
    }
    let (cpu_ms, _) = CpuTimes::of(pid)?.ms_since(cpu_before);
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
    info(
        &format!("idle CPU time (utime+stime) in {secs:.0} s"),
        format!("{cpu_ms:.0} ms"),
    );
    info(
        "threads at window start / end",
        format!("{} / {alive}", start.len()),
    );
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

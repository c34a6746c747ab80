//! Daemons the benchmarks start (the worker, pueued): their environment,
//! a guard that stops them on every exit path, and the idle window.

use std::collections::HashMap;
use std::ffi::OsString;
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

/// The environment a daemon and its clients are started with.
#[derive(Clone)]
pub struct DaemonEnv {
    vars: Vec<(OsString, OsString)>,
}

impl DaemonEnv {
    /// This process's environment, as inherited from the shell through cargo.
    pub fn capture() -> Self {
        Self {
            vars: std::env::vars_os().collect(),
        }
    }

    /// Gives `cmd` exactly this environment.
    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env_clear().envs(self.vars.iter().map(|(k, v)| (k, v)))
    }

    /// Value of `name` in this environment.
    pub fn get(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    /// The same environment without `RUST_LIB_BACKTRACE` and with
    /// `RUST_BACKTRACE` set to `value`, or removed when `None`.
    pub fn with_backtrace(&self, value: Option<&str>) -> Self {
        let mut vars: Vec<_> = self
            .vars
            .iter()
            .filter(|(k, _)| k != "RUST_BACKTRACE" && k != "RUST_LIB_BACKTRACE")
            .cloned()
            .collect();
        vars.extend(value.map(|v| ("RUST_BACKTRACE".into(), v.into())));
        Self { vars }
    }

    /// The other `RUST_BACKTRACE` setting: unset if it is set, `1` if not.
    pub fn other_backtrace(&self) -> Self {
        let set = self.get("RUST_BACKTRACE").is_some();
        self.with_backtrace((!set).then_some("1"))
    }

    /// `RUST_BACKTRACE` as it is set here.
    pub fn backtrace(&self) -> String {
        self.show("RUST_BACKTRACE")
    }

    /// `RUST_BACKTRACE` and `RUST_LIB_BACKTRACE`, for the header.
    pub fn backtrace_line(&self) -> String {
        format!("{}, {}", self.backtrace(), self.show("RUST_LIB_BACKTRACE"))
    }

    /// `NAME=value`, or `NAME unset`.
    fn show(&self, name: &str) -> String {
        self.get(name)
            .map_or_else(|| format!("{name} unset"), |v| format!("{name}={v}"))
    }
}

/// Guard around a daemon process started by the benchmark.
///
/// It runs in its own process group (a Ctrl-C at the terminal reaches only
/// the benchmark, which then stops it in order). Dropping the guard sends
/// SIGTERM, waits up to [`STOP_GRACE`], then SIGKILLs and reaps it.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdin from /dev/null and output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
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
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the daemon has exited or the benchmark was interrupted.
    pub fn check_alive(&mut self) -> Result<()> {
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

    /// Waits [`IDLE_SETTLE`], then measures the daemon over an idle `window`.
    pub fn idle(&mut self, window: Duration) -> Result<Idle> {
        thread::sleep(IDLE_SETTLE);
        self.check_alive()?;
        let pid = self.pid();
        idle_window(pid, window, &mut || self.check_alive())
    }

    /// The last lines of the daemon's output, for an error message.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return format!("\n({} printed nothing)", self.name);
        }
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!(
            "\n--- last output of {} ({}) ---\n{tail}",
            self.name,
            self.log.display()
        )
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
#[derive(Clone)]
pub struct Idle {
    pub rss_kib: u64, // VmRSS at the end of the window
    pub hwm_kib: u64, // VmHWM, the peak over the process's life
    pub cpu_ms: f64,  // utime+stime over the window
    pub wakeups: u64, // voluntary + involuntary context switches, all threads
}

/// Context-switch counters of one thread over the idle window.
struct ThreadTrack {
    name: String,
    base: u64, // at the window start; 0 for threads created during it
    last: u64, // at the last sample that saw the thread
    alive: bool,
    born: bool,
}

impl ThreadTrack {
    /// Wake-ups of this thread; one that exited woke at least once to do so.
    fn wakeups(&self) -> u64 {
        let seen = self.last.saturating_sub(self.base);
        if self.alive { seen } else { seen.max(1) }
    }
}

/// Measures `pid` over an idle `window` and prints it: RSS at the end, CPU
/// time and context switches of all threads (sampled, so that threads
/// that come and go are counted; reading /proc does not wake the process).
pub fn idle_window(
    pid: u32,
    window: Duration,
    check: &mut dyn FnMut() -> Result<()>,
) -> Result<Idle> {
    let cpu_before = CpuTimes::of(pid)?;
    let track = |name, n, born| ThreadTrack {
        name,
        base: if born { 0 } else { n },
        last: n,
        alive: true,
        born,
    };
    let mut threads: HashMap<u32, ThreadTrack> = thread_switches(pid)?
        .into_iter()
        .map(|(tid, (name, n))| (tid, track(name, n, false)))
        .collect();
    let threads_at_start = threads.len();
    let end = Instant::now() + window;
    while Instant::now() < end {
        thread::sleep(IDLE_SAMPLE_PERIOD.min(end - Instant::now()));
        check()?;
        let snapshot = thread_switches(pid)?;
        for (tid, t) in threads.iter_mut() {
            t.alive = snapshot.contains_key(tid);
        }
        for (tid, (name, n)) in snapshot {
            threads
                .entry(tid)
                .and_modify(|t| t.last = n)
                .or_insert_with(|| track(name, n, true));
        }
    }
    let (cpu_ms, _) = CpuTimes::of(pid)?.ms_since(cpu_before);
    let (rss_kib, hwm_kib) = memory_kib(pid)?;
    let idle = Idle {
        rss_kib,
        hwm_kib,
        cpu_ms,
        wakeups: threads.values().map(ThreadTrack::wakeups).sum(),
    };
    let alive = threads.values().filter(|t| t.alive).count();
    infos(&[
        (
            "idle VmHWM (peak over the life of the process)",
            format!("{:.2} MiB", hwm_kib as f64 / 1024.0),
        ),
        (
            &format!(
                "idle CPU time (utime+stime) in {:.0} s",
                window.as_secs_f64()
            ),
            format!("{cpu_ms:.0} ms"),
        ),
        (
            "threads at window start / end",
            format!("{threads_at_start} / {alive}"),
        ),
    ]);
    let mut noisy: Vec<_> = threads.iter().filter(|(_, t)| t.wakeups() > 0).collect();
    noisy.sort_by_key(|(tid, _)| **tid);
    for (tid, t) in noisy {
        let state = match (t.born, t.alive) {
            (true, true) => ", created during window",
            (true, false) => ", created and exited during window",
            (false, false) => ", exited during window",
            (false, true) => "",
        };
        note(&format!(
            "thread {tid} ({}) woke {} time(s){state}",
            t.name,
            t.wakeups()
        ));
    }
    Ok(idle)
}

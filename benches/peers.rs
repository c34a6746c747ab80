//! The worker against its peers, pueue and `systemd-run` (in the tier-3
//! sandbox, with this binary as the client inside: [`inner`]), beside the
//! raw `bash -c true` loop measured right before and after each tool's
//! runs: throughput at P=1/P=2, submit-to-start p50/p99, and idle RSS, CPU
//! and wake-ups with the shell's `RUST_BACKTRACE` and the other setting.
//! BENCHMARKS.md describes each tool's method and the knobs. A peer that
//! cannot run is skipped with the reason; a failed tool makes the exit
//! status non-zero, the others still run.

#![warn(missing_docs)]

mod common;
#[path = "../tests/common/sandbox.rs"]
#[allow(dead_code)]
mod sandbox;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use common::*;
use serde_json::Value;

/// Jobs a fresh daemon runs (submitted through its CLI) before its idle window.
const IDLE_WARMUP_JOBS: usize = 20;
/// How long the sandbox's PID 1 must use no CPU before measuring in it.
const SANDBOX_QUIET: Duration = Duration::from_secs(2);
/// Environment variable that turns this binary into the in-sandbox client.
const INNER_ENV: &str = "AICE_PEERS_CLIENT";
/// The tools, in the order they are measured.
const TOOLS: [&str; 3] = ["ai-cmd-executor", "pueue", "systemd-run"];

/// Knobs read from the environment.
struct Settings {
    knobs: Knobs,
    tools: Vec<String>, // BENCH_TOOLS
}

/// Runs the comparison, or the in-sandbox client when [`INNER_ENV`] is set.
fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(INNER_ENV) {
        return inner::main(&mode);
    }
    let settings = || {
        let knobs = Knobs::from_env(60.0)?;
        let line = knobs.line();
        let tools = env_list("BENCH_TOOLS", &TOOLS)?;
        Ok((Settings { knobs, tools }, line))
    };
    run_bench("ai-cmd-executor peer comparison", settings, |settings| {
        let env = DaemonEnv::capture();
        println!(
            "daemon environment (ai-cmd-executor, pueued and clients): {}",
            env.backtrace_line()
        );
        let columns: Vec<Column> = TOOLS
            .into_iter()
            .map(|tool| {
                section(tool);
                info("loadavg 1/5/15 min at start", load_average());
                if !settings.tools.iter().any(|t| t == tool) {
                    let why = format!("not in BENCH_TOOLS={}", settings.tools.join(","));
                    return Ok(Column::skipped(tool, why));
                }
                measure(tool, || match tool {
                    "ai-cmd-executor" => aice::measure(&settings, &env),
                    "pueue" => pueue::measure(&settings, &env),
                    _ => systemd::measure(&settings),
                })
            })
            .collect::<Result<_>>()?;
        section("Table");
        print_table(&settings, &env, &columns);
        Ok(columns.iter().all(|c| !matches!(c.state, State::Failed(_))))
    })
}

/// Runs one tool's measurement; a failure (error or panic) becomes a failed
/// column, a [`Skip`] a skipped one, an interruption ends the benchmark.
fn measure(name: &str, f: impl FnOnce() -> Result<Figures>) -> Result<Column> {
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    check_interrupted()?;
    let why = match outcome {
        Ok(Ok(figures)) => return Ok(Column::new(name, State::Measured, figures)),
        Ok(Err(err)) => match err.downcast::<Skip>() {
            Ok(Skip(why)) => return Ok(Column::skipped(name, why)),
            Err(err) => format!("{err:#}"),
        },
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned()),
    };
    println!("  FAILED {name}: {why}");
    Ok(Column::new(name, State::Failed(why), Figures::default()))
}

/// The error a tool's measurement returns when the tool cannot run here.
#[derive(Debug, thiserror::Error)]
#[error("skipped: {0}")]
struct Skip(String);

/// The pause before latency sample `i`: 2 to 301 ms, each value once per 300
/// samples in a scattered order (193 is prime to 300), so that submissions
/// fall at every phase of a periodic tick (pueue's 300 ms).
fn sample_gap(i: usize) -> Duration {
    Duration::from_millis(2 + (i as u64 * 193) % 300)
}

/// Parses an RFC 3339 time with a `Z` (ai-cmd-executor) or `±HH:MM` offset (pueue).
fn parse_time(s: &str) -> Result<SystemTime> {
    let bad = || anyhow!("not an RFC 3339 time: {s:?}");
    let (local, off) = s
        .split_at_checked(s.len().saturating_sub(6))
        .unwrap_or((s, ""));
    let t = match off.as_bytes() {
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let secs = off[1..3].parse::<u64>()? * 3600 + off[4..6].parse::<u64>()? * 60;
            let t = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
            let shift = Duration::from_secs(secs);
            if *sign == b'+' { t - shift } else { t + shift }
        }
        _ => humantime::parse_rfc3339_weak(s).map_err(|_| bad())?,
    };
    Ok(t)
}

// ---------------------------------------------------------------------------
// Figures of one tool, and the raw reference
// ---------------------------------------------------------------------------

/// Whether a tool was measured; why not.
enum State {
    Measured,
    Skipped(String),
    Failed(String),
}

/// A tool's figures (each `None` when not applicable or not measured).
#[derive(Default)]
struct Figures {
    version: String,
    backtrace: String,                 // RUST_BACKTRACE of the daemon
    raw_span: [Option<(f64, f64)>; 2], // raw rate before and after, per P
    raw: [Option<f64>; 2],             // the reference: their mean
    rate: [Option<f64>; 2],
    rate_cli: [Option<f64>; 2],  // ai-cmd-executor: one `submit` per job
    latency_cli: Option<Stats>,  // submit-to-start through the CLI
    latency_drop: Option<Stats>, // ai-cmd-executor: file dropped by rename
    idle: [Option<Idle>; 2],     // the shell's RUST_BACKTRACE, the other
}

impl Figures {
    /// Figures with the version printed.
    fn new(version: String, backtrace: String) -> Self {
        info("version", &version);
        Self {
            version,
            backtrace,
            ..Self::default()
        }
    }

    /// Records and prints a throughput figure (`cli`: one CLI per job, info).
    fn rate(&mut self, i: usize, cli: bool, how: &str, rate: f64) {
        let label = format!("throughput P={}, {how}", PARALLELISM[i]);
        info(&label, format!("{rate:.1} jobs/s"));
        let rates = if cli {
            &mut self.rate_cli
        } else {
            &mut self.rate
        };
        rates[i] = Some(rate);
    }

    /// Measures the raw rate after the tool's throughput runs and makes the
    /// mean of `before` and that the reference; prints the ratios.
    fn bracket_raw(&mut self, n: usize, before: [f64; 2]) -> Result<()> {
        let after = raw_reference(n, "after")?;
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let reference = (before[i] + after[i]) / 2.0;
            self.raw_span[i] = Some((before[i], after[i]));
            self.raw[i] = Some(reference);
            for (what, rate) in [("", self.rate[i]), (", one CLI per job", self.rate_cli[i])] {
                if let Some(rate) = rate {
                    let label = format!("ratio to raw (mean before/after), P={p}{what}");
                    let ratio = rate / reference;
                    info(
                        &label,
                        format!("{ratio:.3} (reference {reference:.1} jobs/s)"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Runs `idle` with the shell's environment and with the other setting.
    fn idle(
        &mut self,
        env: &DaemonEnv,
        mut idle: impl FnMut(&DaemonEnv) -> Result<Idle>,
    ) -> Result<()> {
        for (slot, env) in self.idle.iter_mut().zip([env, &env.other_backtrace()]) {
            group(&format!("idle, {}", env.backtrace()));
            *slot = Some(print_idle(idle(env)?));
        }
        Ok(())
    }
}

/// Prints an idle window's RSS and wake-ups.
fn print_idle(idle: Idle) -> Idle {
    let rss = format!("{:.2} MiB", idle.rss_kib as f64 / 1024.0);
    info("idle VmRSS (end of window)", rss);
    info("idle wake-ups (ctx switches, all threads)", idle.wakeups);
    idle
}

/// The raw rate at every parallelism, printed (`when`: before or after the
/// tool's throughput runs).
fn raw_reference(n: usize, when: &str) -> Result<[f64; 2]> {
    let mut out = [0.0; 2];
    for (slot, p) in out.iter_mut().zip(PARALLELISM) {
        *slot = RawRun::measure(n, p)?.rate;
        let label = format!("raw bash -c true, P={p}, {when} this tool's runs");
        info(&label, format!("{:.1} jobs/s", *slot));
    }
    Ok(out)
}

/// One tool's column in the table.
struct Column {
    name: String,
    state: State,
    figures: Figures,
}

impl Column {
    /// A column.
    fn new(name: &str, state: State, figures: Figures) -> Self {
        let name = name.to_owned();
        Self {
            name,
            state,
            figures,
        }
    }

    /// A column for a tool that was not run, with the notice printed.
    fn skipped(name: &str, why: String) -> Self {
        println!("  SKIPPED {name}: {why}");
        Self::new(name, State::Skipped(why), Figures::default())
    }
}

// ---------------------------------------------------------------------------
// ai-cmd-executor
// ---------------------------------------------------------------------------

mod aice {
    //! The worker under test, on a spool in the temp dir.

    use super::*;

    /// `n` jobs at `max_parallel = p`, by rename or one `submit` each:
    /// first submission to last result, in jobs/s.
    fn throughput(n: usize, p: usize, cli: bool, env: &DaemonEnv) -> Result<f64> {
        let mut fx = Fixture::start(None, Some(p), env)?;
        let tag = if cli { "cli" } else { "drop" };
        let ids: Vec<String> = (0..n).map(|i| format!("tp-{tag}{p}-{i:06}")).collect();
        let start = Instant::now();
        for id in &ids {
            fx.submit_via(id, cli, env)?;
        }
        let last = fx
            .wait(&mut ids.iter().cloned().collect())
            .with_context(|| format!("throughput run P={p} in {}", fx.spool.display()))?;
        for id in &ids {
            fx.succeeded(id)?;
        }
        Ok(n as f64 / (last - start).as_secs_f64())
    }

    /// Measures everything for ai-cmd-executor.
    pub(super) fn measure(settings: &Settings, env: &DaemonEnv) -> Result<Figures> {
        let version = version_of(Command::new(worker_bin()).arg("--version"));
        let mut fig = Figures::new(version, env.backtrace());
        let n = settings.knobs.jobs;
        let raw = raw_reference(n, "before")?;
        for (cli, how) in [
            (false, "jobs dropped by rename"),
            (true, "one `submit` CLI per job"),
        ] {
            for (i, p) in PARALLELISM.into_iter().enumerate() {
                fig.rate(i, cli, how, throughput(n, p, cli, env)?);
            }
        }
        fig.bracket_raw(n, raw)?;

        // Latency: the two paths alternate, so that both see the same conditions.
        let mut fx = Fixture::start(None, Some(1), env)?;
        flush_disk();
        let mut samples = [Vec::new(), Vec::new()];
        for i in 0..settings.knobs.latency_samples * 2 {
            let (cli, id) = (i % 2 == 1, format!("lat-{i:05}"));
            thread::sleep(sample_gap(i / 2));
            let t0 = SystemTime::now();
            fx.submit_via(&id, cli, env)?;
            fx.wait(&mut HashSet::from([id.clone()]))
                .with_context(|| format!("latency sample {id}"))?;
            samples[usize::from(cli)].push(signed_ms(fx.succeeded(&id)?.0, t0));
        }
        let [by_drop, by_cli] = samples.map(Stats::of);
        let (by_drop, by_cli) = (by_drop?, by_cli?);
        info("submit -> started_at, file drop", by_drop.line());
        info("submit -> started_at, `submit` CLI", by_cli.line());
        fig.latency_drop = Some(by_drop);
        fig.latency_cli = Some(by_cli);
        drop(fx);

        fig.idle(env, |env| {
            let mut fx = Fixture::start(None, Some(1), env)?;
            let ids: Vec<String> = (0..IDLE_WARMUP_JOBS).map(|i| format!("idle-{i}")).collect();
            for id in &ids {
                fx.cli_submit(id, env)?;
            }
            fx.wait(&mut ids.iter().cloned().collect())?;
            flush_disk();
            fx.worker.idle(settings.knobs.idle)
        })?;
        Ok(fig)
    }
}

// ---------------------------------------------------------------------------
// pueue
// ---------------------------------------------------------------------------

mod pueue {
    //! pueue, installed by `scripts/bench.sh peers` (`cargo install pueue`).

    use super::*;

    /// One task as `pueue status --json` shows it.
    struct Task {
        done: bool,
        success: bool,
        start: Option<SystemTime>,
        end: Option<SystemTime>,
        raw: Value,
    }

    /// A `pueued` with its own config and directories, warmed up.
    ///
    /// Fields drop in order: the daemon stops before its directory goes.
    struct Fixture<'a> {
        daemon: Daemon,
        client: &'a Path,
        env: &'a DaemonEnv,
        config: PathBuf,
        _root: RunDir,
    }

    impl<'a> Fixture<'a> {
        /// Starts `pueued -c FILE` (foreground), sets `parallel p`, runs a warm-up task.
        fn start(client: &'a Path, env: &'a DaemonEnv, p: usize) -> Result<Self> {
            let root = RunDir::new("peers-pueue-", None)?;
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
            let mut cmd = Command::new(client.with_file_name("pueued"));
            env.apply(&mut cmd).arg("-c").arg(&config);
            let daemon = Daemon::spawn("pueued", cmd, &dir.join("pueued.log"))?;
            let mut fx = Self {
                daemon,
                client,
                env,
                config,
                _root: root,
            };
            let what = "pueued to answer `pueue status`";
            poll_until(what, READY_TIMEOUT, Duration::from_millis(20), || {
                fx.daemon.check_alive()?;
                Ok(fx.run(&["status", "--json"]).is_ok().then_some(()))
            })?;
            fx.run(&["parallel", &p.to_string()])?;
            let id = fx.add()?;
            fx.wait_done(&[id], Duration::from_millis(20))?;
            Ok(fx)
        }

        /// Runs `pueue -c CONFIG ARGS…`, which must succeed; returns its stdout.
        fn run(&self, args: &[&str]) -> Result<String> {
            let mut cmd = Command::new(self.client);
            run_ok(
                self.env
                    .apply(&mut cmd)
                    .arg("-c")
                    .arg(&self.config)
                    .args(args),
            )
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
            let time = |v: Option<&Value>| v.and_then(Value::as_str).map(parse_time).transpose();
            let mut out = BTreeMap::new();
            for (id, task) in tasks {
                let id: u64 = id.parse().with_context(|| format!("task id {id:?}"))?;
                let status = task.get("status");
                let done = status.and_then(|s| s.get("Done"));
                let started = done.or(status.and_then(|s| s.get("Running")));
                let result = done.and_then(|d| d.get("result")).and_then(Value::as_str);
                let task = Task {
                    done: done.is_some(),
                    success: result == Some("Success"),
                    start: time(started.and_then(|s| s.get("start")))?,
                    end: time(done.and_then(|d| d.get("end")))?,
                    raw: task.clone(),
                };
                out.insert(id, task);
            }
            Ok(out)
        }

        /// Polls `pueue status --json` (pauses growing to `max_nap`) until
        /// every task in `ids` is done and succeeded; returns all tasks.
        fn wait_done(&mut self, ids: &[u64], max_nap: Duration) -> Result<BTreeMap<u64, Task>> {
            let (mut last_count, mut last_progress) = (0, Instant::now());
            poll_until("pueue tasks", Duration::MAX, max_nap, || {
                self.daemon.check_alive()?;
                let tasks = self.tasks()?;
                let mut done = 0;
                for id in ids {
                    let task = tasks
                        .get(id)
                        .ok_or_else(|| anyhow!("pueue lost task {id}"))?;
                    ensure!(
                        !task.done || task.success,
                        "pueue task {id} failed: {}",
                        task.raw
                    );
                    done += usize::from(task.done);
                }
                if done > last_count {
                    (last_count, last_progress) = (done, Instant::now());
                }
                ensure!(
                    last_progress.elapsed() <= STALL_TIMEOUT,
                    "no pueue task finished for {STALL_TIMEOUT:?}; {done} of {} done{}",
                    ids.len(),
                    self.daemon.log_tail()
                );
                Ok((done == ids.len()).then_some(tasks))
            })
        }
    }

    /// `n` tasks at `parallel p`: before the first `add` to the last `end`, in jobs/s.
    fn throughput(client: &Path, env: &DaemonEnv, n: usize, p: usize) -> Result<f64> {
        let mut fx = Fixture::start(client, env, p)?;
        let t0 = SystemTime::now();
        let ids = (0..n).map(|_| fx.add()).collect::<Result<Vec<_>>>()?;
        let tasks = fx.wait_done(&ids, Duration::from_secs(1))?;
        let last = ids
            .iter()
            .filter_map(|id| tasks.get(id)?.end)
            .max()
            .ok_or_else(|| anyhow!("no task has an end time"))?;
        let secs = signed_ms(last, t0) / 1e3;
        ensure!(secs > 0.0, "last task ended before the first add");
        Ok(n as f64 / secs)
    }

    /// Measures everything for pueue (`BENCH_PUEUE`: the client; `pueued`
    /// is taken from the same directory).
    pub(super) fn measure(settings: &Settings, env: &DaemonEnv) -> Result<Figures> {
        let Some(client) = std::env::var_os("BENCH_PUEUE").filter(|v| !v.is_empty()) else {
            let why = "BENCH_PUEUE is not set (scripts/bench.sh peers installs pueue and sets it)";
            return Err(Skip(why.to_owned()).into());
        };
        let client = PathBuf::from(client);
        for bin in [client.clone(), client.with_file_name("pueued")] {
            if !bin.is_file() {
                return Err(Skip(format!("{} does not exist", bin.display())).into());
            }
        }
        let mut fig = Figures::new(
            version_of(Command::new(&client).arg("--version")),
            env.backtrace(),
        );
        info("client", client.display());
        let n = settings.knobs.jobs;
        let raw = raw_reference(n, "before")?;
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            fig.rate(
                i,
                false,
                "one `pueue add` per job",
                throughput(&client, env, n, p)?,
            );
        }
        fig.bracket_raw(n, raw)?;

        let mut fx = Fixture::start(&client, env, 1)?;
        flush_disk();
        let mut lat = Vec::new();
        for i in 0..settings.knobs.latency_samples {
            thread::sleep(sample_gap(i));
            let t0 = SystemTime::now();
            let id = fx.add()?;
            let tasks = fx.wait_done(&[id], Duration::from_millis(50))?;
            let start = tasks.get(&id).and_then(|t| t.start);
            lat.push(signed_ms(
                start.ok_or_else(|| anyhow!("task {id} has no start time"))?,
                t0,
            ));
        }
        let stats = Stats::of(lat)?;
        info("submit -> start, `pueue add`", stats.line());
        fig.latency_cli = Some(stats);
        drop(fx);

        fig.idle(env, |env| {
            let mut fx = Fixture::start(&client, env, 1)?;
            let ids = (0..IDLE_WARMUP_JOBS)
                .map(|_| fx.add())
                .collect::<Result<Vec<_>>>()?;
            fx.wait_done(&ids, Duration::from_millis(100))?;
            flush_disk();
            fx.daemon.idle(settings.knobs.idle)
        })?;
        Ok(fig)
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
    /// the number or list it printed under `key`.
    fn inner_client(sb: &Sandbox, exe: &Path, mode: &str, n: usize, p: usize) -> Result<Value> {
        check_interrupted()?;
        let script = format!(
            "{INNER_ENV}={mode} AICE_PEERS_N={n} AICE_PEERS_P={p} exec '{}'",
            exe.display()
        );
        let out = sb.sh(&script);
        check_interrupted()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (status, out_err) = (out.status, format!("{}{}", stdout.trim(), stderr.trim()));
        ensure!(
            status.success(),
            "in-sandbox client `{mode}` failed ({status}): {out_err}"
        );
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line)
            .with_context(|| format!("in-sandbox client `{mode}` printed {line:?}"))
    }

    /// The host pid of the sandbox's PID 1: the child named `systemd` of our
    /// child `systemd-nspawn`.
    fn sandbox_pid1() -> Result<u32> {
        let child = |parent: u32, name: &str| -> Result<u32> {
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
                if ppid == Some(parent) && comm == name {
                    return Ok(pid);
                }
            }
            bail!("no {name} child of pid {parent}")
        };
        child(child(std::process::id(), "systemd-nspawn")?, "systemd")
    }

    /// `RUST_BACKTRACE` in the environment of `pid`.
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

    /// utime + stime of `pid`, in ms.
    fn cpu_ms(pid: u32) -> Result<f64> {
        Ok(ticks_ms(CpuTimes::of(pid)?.own))
    }

    /// Measures everything for systemd-run.
    pub(super) fn measure(settings: &Settings) -> Result<Figures> {
        let exe = std::env::current_exe().context("locating this benchmark binary")?;
        let exe_dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent", exe.display()))?;
        if !nix::unistd::geteuid().is_root() {
            let why = "not running as root (the tier-3 sandbox needs root: run scripts/bench.sh peers as root)";
            return Err(Skip(why.to_owned()).into());
        }
        // The raw reference is taken before the boot, on the same quiet machine.
        let n = settings.knobs.jobs;
        let raw = raw_reference(n, "before")?;
        let Some(sb) = Sandbox::boot("peers", &[exe_dir]) else {
            let why = "the tier-3 sandbox cannot boot here (see the NOTICE above: \
                       systemd-nspawn, nsenter or systemd missing)";
            return Err(Skip(why.to_owned()).into());
        };
        let version = sb.ok("systemctl --version | head -n 1");
        let pid1 = sandbox_pid1()?;
        let version = format!("{version} (systemd-run in an nspawn container)");
        let mut fig = Figures::new(version, backtrace_of(pid1));
        info("sandbox PID 1 (host pid)", pid1);
        // Let the boot's last jobs finish, and PID 1 go quiet, before measuring.
        let what = "the sandbox's job queue to empty";
        poll_until(what, READY_TIMEOUT, Duration::from_millis(100), || {
            let out = sb.sh("systemctl list-jobs --no-legend");
            Ok((out.status.success() && out.stdout.trim_ascii().is_empty()).then_some(()))
        })?;
        let settle_start = Instant::now();
        let mut last = (cpu_ms(pid1)?, Instant::now());
        let quiet = Duration::from_millis(200);
        let what = "the sandbox's PID 1 to go quiet";
        let settled = poll_until(what, Duration::from_secs(60), quiet, || {
            let now = cpu_ms(pid1)?;
            if now != last.0 {
                last = (now, Instant::now());
            }
            Ok((last.1.elapsed() >= SANDBOX_QUIET).then_some(()))
        });
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
        let number = |v: Value| v.as_f64().ok_or_else(|| anyhow!("not a number: {v}"));
        for (i, p) in PARALLELISM.into_iter().enumerate() {
            let inside = number(inner_client(&sb, &exe, "raw", n, p)?)?;
            let label = format!("raw bash -c true inside the sandbox, P={p} (info)");
            info(&label, format!("{inside:.1} jobs/s"));
            let cpu0 = cpu_ms(pid1)?;
            let rate = number(inner_client(&sb, &exe, "systemd-run", n, p)?)?;
            fig.rate(
                i,
                false,
                &format!("{p} client thread(s) of systemd-run --wait"),
                rate,
            );
            let per_job = (cpu_ms(pid1)? - cpu0) / n as f64;
            info("  PID 1 CPU per job", format!("{per_job:.2} ms"));
        }
        // The "after" reference is taken on the host with the sandbox idle.
        fig.bracket_raw(n, raw)?;

        flush_disk();
        let v = inner_client(&sb, &exe, "latency", settings.knobs.latency_samples, 1)?;
        let samples = v.as_array().ok_or_else(|| anyhow!("not a list: {v}"))?;
        let stats = Stats::of(samples.iter().cloned().map(number).collect::<Result<_>>()?)?;
        info(
            "submit -> ExecMainStartTimestamp, `systemd-run`",
            stats.line(),
        );
        fig.latency_cli = Some(stats);

        group("idle: the sandbox's PID 1");
        inner_client(&sb, &exe, "systemd-run", IDLE_WARMUP_JOBS, 1)?;
        flush_disk();
        thread::sleep(IDLE_SETTLE);
        let idle = idle_window(pid1, settings.knobs.idle, &mut || {
            check_interrupted()?;
            let alive = Path::new(&format!("/proc/{pid1}")).exists();
            ensure!(alive, "the sandbox's PID 1 exited");
            Ok(())
        })?;
        // PID 1 is not a Rust program and nspawn gives it its own
        // environment: one window stands for both settings.
        let idle = print_idle(idle);
        fig.idle = [Some(idle.clone()), Some(idle)];
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
    //! Prints one JSON value.

    use super::*;

    /// Overall deadline of one client run.
    const DEADLINE: Duration = Duration::from_secs(1800);

    /// Runs `mode` and prints its JSON; exits 1 with the error on failure.
    pub(super) fn main(mode: &str) -> ExitCode {
        // A hung systemd-run must not hang the benchmark.
        thread::spawn(|| {
            thread::sleep(DEADLINE);
            eprintln!("in-sandbox client: deadline of {DEADLINE:?} passed");
            std::process::exit(3);
        });
        match run(mode) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("in-sandbox client `{mode}`: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        ExitCode::SUCCESS
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
            "raw" => Ok(RawRun::measure(n, p)?.rate.into()),
            "systemd-run" => {
                let args = "--wait --quiet --collect -- /bin/bash -c true".split(' ');
                let elapsed = split_loop(n, p, |_, _| {
                    run_ok(Command::new("systemd-run").args(args.clone())).map(drop)
                })?;
                Ok((n as f64 / elapsed.as_secs_f64()).into())
            }
            "latency" => Ok(latency(n)?.into()),
            _ => bail!("unknown mode {mode:?}"),
        }
    }

    /// `n` samples of submit-to-start: `CLOCK_MONOTONIC` before spawning
    /// `systemd-run` to the unit's `ExecMainStartTimestampMonotonic` (host
    /// and container share the clock). `RemainAfterExit=yes` keeps the
    /// unit's properties until it is stopped after the sample.
    fn latency(n: usize) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            thread::sleep(sample_gap(i));
            let unit = format!("aice-peers-lat-{i}.service");
            let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
            let t0_us = ts.tv_sec() as f64 * 1e6 + ts.tv_nsec() as f64 / 1e3;
            let mut cmd = Command::new("systemd-run");
            cmd.args([
                "--quiet",
                "-p",
                "RemainAfterExit=yes",
                &format!("--unit={unit}"),
            ]);
            run_ok(cmd.args(["--", "/bin/bash", "-c", "true"]))?;
            let what = &format!("{unit} to exit");
            let props = poll_until(what, READY_TIMEOUT, Duration::from_millis(20), || {
                let mut show = Command::new("systemctl");
                show.args(["show", &unit, "-p", "ExecMainStartTimestampMonotonic"]);
                show.args([
                    "-p",
                    "ExecMainExitTimestampMonotonic",
                    "-p",
                    "ExecMainStatus",
                ]);
                let props: HashMap<String, String> = run_ok(&mut show)?
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let exited = props
                    .get("ExecMainExitTimestampMonotonic")
                    .is_some_and(|v| v != "0" && !v.is_empty());
                Ok(exited.then_some(props))
            })?;
            let ok = props.get("ExecMainStatus").is_some_and(|v| v == "0");
            ensure!(ok, "{unit} did not exit 0: {props:?}");
            let start: f64 = props
                .get("ExecMainStartTimestampMonotonic")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("{unit}: no start timestamp: {props:?}"))?;
            out.push((start - t0_us) / 1e3);
            run_ok(Command::new("systemctl").args(["stop", &unit]))?;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

/// Prints the comparison table in Markdown: a row per figure, with the raw
/// cell, a cell per tool (ai-cmd-executor first), the target and the verdict.
fn print_table(settings: &Settings, env: &DaemonEnv, cols: &[Column]) {
    let mut heads = vec!["figure".to_owned(), "raw `bash -c true`".to_owned()];
    heads.extend(cols.iter().map(|c| c.name.clone()));
    heads.extend(["target for ai-cmd-executor".into(), "met?".into()]);
    let idle_secs = settings.knobs.idle.as_secs_f64();
    let blank = |c: &Column| match &c.state {
        State::Measured => "–".to_owned(),
        State::Skipped(_) => "skipped".to_owned(),
        State::Failed(_) => "failed".to_owned(),
    };
    // A row: the raw cell, then `f` of each tool.
    let row = |label: String, raw: String, f: &dyn Fn(&Figures) -> Option<String>| {
        let cells = cols
            .iter()
            .map(|c| f(&c.figures).unwrap_or_else(|| blank(c)));
        let mut r: Vec<String> = [label.trim().to_owned(), raw]
            .into_iter()
            .chain(cells)
            .collect();
        r.extend([String::new(), String::new()]);
        r
    };
    let aice = cols.first().map(|c| &c.figures);

    // Whether no measured peer is better than ai-cmd-executor on `get`
    // (a tie counts, and is named; `None` when no peer was measured),
    // and the comparison in words.
    let ahead = |get: &dyn Fn(&Figures) -> Option<f64>, higher: bool| -> (Option<bool>, String) {
        let Some(mine) = aice.and_then(get) else {
            return (Some(false), "not measured".to_owned());
        };
        let mut groups: [Vec<&str>; 4] = Default::default();
        for peer in cols.iter().skip(1) {
            let k = match get(&peer.figures) {
                Some(theirs) if theirs == mine => 1,
                Some(theirs) if (mine > theirs) == higher => 0,
                Some(_) => 2,
                None => 3,
            };
            groups[k].push(&peer.name);
        }
        let words = [
            "ahead of",
            "level with",
            "behind",
            "not compared with (not measured)",
        ];
        let parts: Vec<String> = words
            .iter()
            .zip(&groups)
            .filter(|(_, names)| !names.is_empty())
            .map(|(word, names)| format!("{word} {}", names.join(", ")))
            .collect();
        let compared = groups[..3].iter().any(|g| !g.is_empty());
        (compared.then_some(groups[2].is_empty()), parts.join("; "))
    };
    let judged = |mut r: Vec<String>, target: &str, ok: Option<bool>, why: String| {
        let word = match ok {
            Some(true) => "MET",
            Some(false) => "MISSED",
            None => "UNCHECKED (no peer measured)",
        };
        let n = r.len();
        (r[n - 2], r[n - 1]) = (target.to_owned(), format!("{word}: {why}"));
        r
    };
    // `own` (a target of ai-cmd-executor alone) and then the comparison.
    let both = |own: bool, peers: Option<bool>| if own { peers } else { Some(false) };

    let mut env_row = row("daemon environment".into(), "–".into(), &|f| {
        Some(f.backtrace.clone())
    });
    for (cell, c) in env_row.iter_mut().skip(2).zip(cols) {
        if !matches!(c.state, State::Measured) {
            *cell = blank(c);
        }
    }
    env_row[cols.len() + 2] = "same for all".to_owned();
    let mut rows = vec![env_row];

    for (i, p) in PARALLELISM.into_iter().enumerate() {
        let span = |f: &Figures| f.raw_span[i].map(|(b, a)| format!("{b:.1} / {a:.1}"));
        let raw = aice.and_then(span).unwrap_or_else(|| "–".to_owned());
        rows.push(row(
            format!("raw rate before / after the tool, P={p} (jobs/s)"),
            raw,
            &span,
        ));
        let raw = aice
            .and_then(|f| f.raw[i])
            .map_or("–".to_owned(), |r| format!("{r:.1} (1.000)"));
        let r = row(
            format!("throughput P={p}, jobs/s (ratio to raw)"),
            raw,
            &|f| Some(format!("{:.1} ({:.3})", f.rate[i]?, f.rate[i]? / f.raw[i]?)),
        );
        let ratio = aice.and_then(|f| Some(f.rate[i]? / f.raw[i]?));
        let (is_ahead, why) = ahead(&|f| f.rate[i], true);
        let ok = both(ratio.is_some_and(|r| r >= TARGET_RATIO), is_ahead);
        let ratio = ratio.map_or("–".to_owned(), |r| format!("{r:.3}"));
        rows.push(judged(
            r,
            &format!(">= {TARGET_RATIO} of raw, ahead"),
            ok,
            format!("{ratio} of raw, {why}"),
        ));
    }
    for (i, p) in PARALLELISM.into_iter().enumerate() {
        rows.push(row(
            format!("  (info) P={p}, one `submit` CLI process per job"),
            "–".into(),
            &|f| {
                Some(format!(
                    "{:.1} ({:.3})",
                    f.rate_cli[i]?,
                    f.rate_cli[i]? / f.raw[i]?
                ))
            },
        ));
    }
    for (label, get) in [
        ("p50", (|s: &Stats| s.p50) as fn(&Stats) -> f64),
        ("p99", |s| s.p99),
    ] {
        let r = row(
            format!("submit -> start {label}, ms (CLI per job)"),
            "–".into(),
            &|f| f.latency_cli.map(|s| format!("{:.2}", get(&s))),
        );
        let (ok, why) = ahead(&|f| f.latency_cli.map(|s| get(&s)), false);
        rows.push(judged(r, "ahead", ok, why));
    }
    rows.push(row(
        "  (info) p50 / p99, ms, file dropped by rename".into(),
        "–".into(),
        &|f| {
            f.latency_drop
                .map(|s| format!("{:.2} / {:.2}", s.p50, s.p99))
        },
    ));

    let settings_labels = [
        format!("{}, as the shell has it", env.backtrace()),
        env.other_backtrace().backtrace(),
    ];
    for (k, setting) in settings_labels.iter().enumerate() {
        let idle = move |f: &Figures| f.idle[k].clone();
        let labels = [
            "idle RSS of the daemon, MiB".to_owned(),
            format!("idle CPU time in {idle_secs:.0} s, ms"),
            format!("idle wake-ups in {idle_secs:.0} s (ctx switches)"),
        ];
        for (j, label) in labels.into_iter().enumerate() {
            let get = move |i: &Idle| [i.rss_kib as f64 / 1024.0, i.cpu_ms, i.wakeups as f64][j];
            let digits = if j == 0 { 2 } else { 0 };
            let r = row(format!("{label} [{setting}]"), "–".into(), &|f| {
                idle(f).map(|i| format!("{:.digits$}", get(&i)))
            });
            let (ok, why) = ahead(&|f| idle(f).map(|i| get(&i)), false);
            if j < 2 {
                rows.push(judged(r, "ahead", ok, why));
                continue;
            }
            let zero = aice.and_then(idle).is_some_and(|i| i.wakeups == 0);
            let why = format!("{}; {why}", if zero { "none" } else { "some" });
            let target = "0 (no heartbeat outside systemd), ahead";
            rows.push(judged(r, target, both(zero, ok), why));
        }
    }

    let mut notes = vec![
        format!(
            "N = {} jobs of `bash -c true` per throughput run; {} latency samples per path; \
             each idle window ({idle_secs:.0} s) on a fresh daemon after {IDLE_WARMUP_JOBS} jobs \
             submitted through its CLI (systemd-run: one window of the sandbox's PID 1, shown \
             for both settings); CPU time has the 10 ms resolution of /proc/<pid>/stat.",
            settings.knobs.jobs, settings.knobs.latency_samples
        ),
        format!(
            "Each ratio is against that tool's raw reference: the mean of the raw rates measured \
             right before and right after its throughput runs (row above it); the raw column \
             shows ai-cmd-executor's. The daemons of ai-cmd-executor and pueue, and their \
             clients, ran with the shell's environment ({}) except in the idle rows marked \
             with the other setting.",
            env.backtrace_line()
        ),
    ];
    notes.extend(cols.iter().map(|c| match &c.state {
        State::Measured => format!("{}: {}", c.name, c.figures.version),
        State::Skipped(why) => format!("{} skipped: {why}", c.name),
        State::Failed(why) => format!("{} FAILED: {why}", c.name),
    }));
    let esc = |s: &str| s.replace('|', "\\|");
    let line = |r: &[String]| {
        r.iter()
            .map(|c| format!(" {} |", esc(c)))
            .collect::<String>()
    };
    println!("|{}", line(&heads));
    println!("|{}", " --- |".repeat(heads.len()));
    rows.iter().for_each(|r| println!("|{}", line(r)));
    println!();
    notes.iter().for_each(|n| println!("- {}", esc(n)));
}

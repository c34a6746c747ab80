//! The worker against its peers, pueue and `systemd-run` (in the tier-3
//! sandbox, with this binary as the client inside: [`inner`]), each beside
//! the raw `bash -c true` loop measured right before and after its runs
//! (BENCHMARKS.md has each tool's method and the knobs). A peer that cannot
//! run is skipped with the reason; a failed tool makes the exit status
//! non-zero, the others still run.

#![warn(missing_docs)]

mod common;
#[path = "../tests/common/sandbox.rs"]
#[allow(dead_code)]
mod sandbox;

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
/// Environment variable that turns this binary into the in-sandbox client.
const INNER_ENV: &str = "AICE_PEERS_CLIENT";
/// The tools, in the order they are measured.
const TOOLS: [&str; 3] = ["ai-cmd-executor", "pueue", "systemd-run"];

/// Runs the comparison, or the in-sandbox client when [`INNER_ENV`] is set.
fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(INNER_ENV) {
        return inner::main(&mode);
    }
    run_bench("ai-cmd-executor peer comparison", || {
        let knobs = Knobs::from_env(60.0, "")?;
        let tools = env_list("BENCH_TOOLS", &TOOLS)?;
        let env = DaemonEnv::shell();
        let line = env.backtrace_line();
        println!("daemon environment (ai-cmd-executor, pueued and clients): {line}");
        let mut columns = Vec::new();
        for tool in TOOLS {
            section(tool);
            info("loadavg 1/5/15 min at start", load_average());
            let outcome = if !tools.iter().any(|t| t == tool) {
                Err(Skip(format!("not in BENCH_TOOLS={}", tools.join(","))).into())
            } else {
                let measure = AssertUnwindSafe(|| match tool {
                    "ai-cmd-executor" => {
                        let version = version_of(Command::new(worker_bin()).arg("--version"));
                        let start = |p, env: &DaemonEnv| Fixture::start(None, Some(p), env);
                        measure_queue(&knobs, &env, version, &AICE_PATHS, start)
                    }
                    "pueue" => pueue::measure(&knobs, &env),
                    _ => systemd::measure(&knobs),
                });
                panic::catch_unwind(measure).unwrap_or_else(|panic| {
                    let text = panic.downcast_ref::<&str>().map(|s| s.to_string());
                    let text = panic.downcast_ref::<String>().cloned().or(text);
                    bail!("{}", text.unwrap_or_default())
                })
            };
            check_interrupted()?;
            columns.push(Column::new(tool, outcome));
        }
        section("Table");
        print_table(&knobs, &env, &columns);
        let failed = |c: &Column| matches!(c.figures, Err(("FAILED", _)));
        Ok(!columns.iter().any(failed))
    })
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

// --- Figures of one tool, and the raw reference ---

/// A tool's column in the table: its figures, or `SKIPPED`/`FAILED` and the reason.
struct Column {
    name: &'static str,
    figures: Result<Figures, (&'static str, String)>,
}

impl Column {
    /// The column of a tool's outcome, with a notice when it has no figures.
    fn new(name: &'static str, outcome: Result<Figures>) -> Self {
        let figures = outcome.map_err(|err| match err.downcast::<Skip>() {
            Ok(Skip(why)) => ("SKIPPED", why),
            Err(err) => ("FAILED", format!("{err:#}")),
        });
        if let Err((word, why)) = &figures {
            println!("  {word} {name}: {why}");
        }
        Self { name, figures }
    }
}

/// A tool's figures (each `None` when not applicable).
#[derive(Default)]
struct Figures {
    version: String,
    backtrace: String,            // RUST_BACKTRACE of the daemon
    raw: [Option<(f64, f64)>; 2], // per P: raw rate before and after; the reference is the mean
    rate: [[Option<f64>; 2]; 2],  // [path][P]: the tool's own path; ai-cmd-executor's CLI
    latency: [Option<Stats>; 2],  // submit-to-start: by rename (ai-cmd-executor); through the CLI
    idle: [Option<Idle>; 2],      // the shell's RUST_BACKTRACE, the other setting
}

impl Figures {
    /// Figures with the version printed.
    fn new(version: String, backtrace: String) -> Self {
        info("version", &version);
        Self {
            version,
            backtrace,
            ..Default::default()
        }
    }

    fn reference(&self, i: usize) -> Option<f64> {
        self.raw[i].map(|(before, after)| (before + after) / 2.0)
    }

    /// `jobs/s (ratio to raw)` of path `k` at `PARALLELISM[i]`.
    fn rate_cell(&self, k: usize, i: usize) -> Option<String> {
        let rate = self.rate[k][i]?;
        Some(format!("{rate:.1} ({:.3})", rate / self.reference(i)?))
    }

    /// Runs `run(cli, p)` (jobs/s) for each path `(cli, how)` and P, then the
    /// raw loop again: the reference is the mean of `before` and that.
    fn throughput(
        &mut self,
        n: usize,
        before: [f64; 2],
        paths: &[(bool, &str)],
        mut run: impl FnMut(bool, usize) -> Result<f64>,
    ) -> Result<()> {
        for (k, &(cli, how)) in paths.iter().enumerate() {
            for (i, p) in PARALLELISM.into_iter().enumerate() {
                let rate = run(cli, p)?;
                let label = format!("throughput P={p}, {how}");
                info(&label, format!("{rate:.1} jobs/s"));
                self.rate[k][i] = Some(rate);
            }
        }
        let after = raw_reference(n, "after")?;
        self.raw = [0, 1].map(|i| Some((before[i], after[i])));
        Ok(())
    }
}

fn print_idle(idle: Idle) -> Idle {
    info("idle VmRSS (end of window)", mib(idle.rss_kib));
    info("idle wake-ups (ctx switches, all threads)", idle.wakeups);
    idle
}

/// The raw rate at every P, printed (`when`: before or after the tool's throughput runs).
fn raw_reference(n: usize, when: &str) -> Result<[f64; 2]> {
    let mut out = [0.0; 2];
    for (slot, p) in out.iter_mut().zip(PARALLELISM) {
        *slot = LoopRun::raw(n, p)?.rate;
        let label = format!("raw bash -c true, P={p}, {when} this tool's runs");
        info(&label, format!("{:.1} jobs/s", *slot));
    }
    Ok(out)
}

// --- ai-cmd-executor and pueue: a daemon with a queue ---

/// A fresh, warmed-up daemon with a queue: ai-cmd-executor's worker, or pueued.
trait Queue {
    type Id;
    /// Submits job number `i` (`bash -c true`), through the tool's CLI when `cli`.
    fn submit(&mut self, i: usize, cli: bool) -> Result<Self::Id>;
    /// Waits until the jobs `ids` have succeeded; returns when the last one
    /// ended, as the tool's throughput counts it, and when each one started.
    fn wait(&mut self, ids: &[Self::Id]) -> Result<(SystemTime, Vec<SystemTime>)>;
    fn daemon(&mut self) -> &mut Daemon;
    fn submit_n(&mut self, n: usize, cli: bool) -> Result<Vec<Self::Id>> {
        (0..n).map(|i| self.submit(i, cli)).collect()
    }
}

/// Measures a queue that `start(p, env)` starts, on each path `(cli, how)`:
/// throughput, latency of single jobs into an idle daemon (the paths
/// alternating), idle windows.
fn measure_queue<Q: Queue>(
    knobs: &Knobs,
    env: &DaemonEnv,
    version: String,
    paths: &[(bool, &str)],
    start: impl Fn(usize, &DaemonEnv) -> Result<Q>,
) -> Result<Figures> {
    let mut fig = Figures::new(version, env.backtrace());
    let n = knobs.jobs;
    let before = raw_reference(n, "before")?;
    fig.throughput(n, before, paths, |cli, p| {
        let mut q = start(p, env)?;
        let t0 = SystemTime::now();
        let ids = q.submit_n(n, cli)?;
        let (end, _) = q.wait(&ids)?;
        Ok(n as f64 * 1e3 / signed_ms(end, t0))
    })?;

    let mut q = start(1, env)?;
    flush_disk();
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..knobs.latency_samples * paths.len() {
        let cli = paths[i % paths.len()].0;
        thread::sleep(sample_gap(i / paths.len()));
        let t0 = SystemTime::now();
        let id = q.submit(i, cli)?;
        let (_, starts) = q.wait(&[id])?;
        samples[usize::from(cli)].push(signed_ms(starts[0], t0));
    }
    for &(cli, how) in paths {
        let stats = Stats::of(std::mem::take(&mut samples[usize::from(cli)]))?;
        info(&format!("submit -> start, {how}"), stats.line());
        fig.latency[usize::from(cli)] = Some(stats);
    }
    drop(q);

    // The idle windows: with the shell's environment and the other setting.
    for (slot, env) in fig.idle.iter_mut().zip([env.clone(), env.other()]) {
        group(&format!("idle, {}", env.backtrace()));
        let mut q = start(1, &env)?;
        let ids = q.submit_n(IDLE_WARMUP_JOBS, true)?;
        q.wait(&ids)?;
        flush_disk();
        *slot = Some(print_idle(q.daemon().idle(knobs.idle)?));
    }
    Ok(fig)
}

/// ai-cmd-executor's two paths: a file dropped by rename, the `submit` CLI.
const AICE_PATHS: [(bool, &str); 2] = [
    (false, "jobs dropped by rename"),
    (true, "one `submit` CLI per job"),
];

impl Queue for Fixture {
    type Id = String;

    fn submit(&mut self, i: usize, cli: bool) -> Result<String> {
        let id = format!("j{i:06}");
        Fixture::submit(self, &id, cli).map(|()| id)
    }

    /// The end is when the last result file was observed (inotify).
    fn wait(&mut self, ids: &[String]) -> Result<(SystemTime, Vec<SystemTime>)> {
        let seen = Fixture::wait(self, &mut ids.iter().cloned().collect())?;
        let started = ids.iter().map(|id| Ok(self.succeeded(id)?.0));
        let started = started.collect::<Result<_>>()?;
        Ok((SystemTime::now() - seen.elapsed(), started))
    }

    fn daemon(&mut self) -> &mut Daemon {
        &mut self.worker
    }
}

mod pueue {
    //! pueue, installed by `scripts/bench.sh peers` (`cargo install pueue`).

    use super::*;

    /// A `pueued` with its own config and directories, warmed up. Fields
    /// drop in order: the daemon stops before its directory goes.
    struct Pueue {
        daemon: Daemon,
        client: PathBuf,
        env: DaemonEnv,
        config: PathBuf,
        _root: RunDir,
    }

    impl Pueue {
        /// Starts `pueued -c FILE` (foreground), sets `parallel p`, runs a warm-up task.
        fn start(client: &Path, env: &DaemonEnv, p: usize) -> Result<Self> {
            let root = RunDir::new("peers-pueue-", None)?;
            let dir = root.path();
            let (data, run) = (dir.join("data"), dir.join("run"));
            // Every tool runs `bash -c true`: pueue's default shell is `sh -c`.
            let yaml = format!(
                "shared:\n  pueue_directory: {data:?}\n  runtime_directory: {run:?}\n  \
                 use_unix_socket: true\n  unix_socket_path: {sock:?}\n\
                 daemon:\n  shell_command: [\"bash\", \"-c\", \"{{{{ pueue_command_string }}}}\"]\n",
                sock = run.join("pueue.socket"),
            );
            fs::create_dir(data)?;
            fs::create_dir(run)?;
            let config = dir.join("pueue.yml");
            fs::write(&config, yaml)?;
            let mut cmd = Command::new(client.with_file_name("pueued"));
            env.apply(&mut cmd).arg("-c").arg(&config);
            let daemon = Daemon::spawn("pueued", cmd, &dir.join("pueued.log"))?;
            let mut q = Self {
                daemon,
                client: client.to_owned(),
                env: env.clone(),
                config,
                _root: root,
            };
            let what = "pueued to answer `pueue status`";
            poll_until(what, READY_TIMEOUT, Duration::from_millis(20), || {
                q.daemon.check_alive()?;
                Ok(q.run(&["status", "--json"]).is_ok().then_some(()))
            })?;
            q.run(&["parallel", &p.to_string()])?;
            let id = q.submit(0, true)?;
            q.wait(&[id])?;
            Ok(q)
        }

        /// Runs `pueue -c CONFIG ARGS…`, which must succeed; returns its stdout.
        fn run(&self, args: &[&str]) -> Result<String> {
            let mut cmd = Command::new(&self.client);
            self.env.apply(&mut cmd).arg("-c").arg(&self.config);
            run_ok(cmd.args(args))
        }
    }

    impl Queue for Pueue {
        type Id = u64;

        /// `pueue add --print-task-id -- true`.
        fn submit(&mut self, _: usize, _: bool) -> Result<u64> {
            let out = self.run(&["add", "--print-task-id", "--", "true"])?;
            let id = out.trim().parse();
            id.with_context(|| format!("pueue add printed {out:?}, not a task id"))
        }

        /// Polls `pueue status --json` (pauses growing to 50 ms for one
        /// task, 1 s for more); the end is the latest `end` among the tasks.
        fn wait(&mut self, ids: &[u64]) -> Result<(SystemTime, Vec<SystemTime>)> {
            let max_nap = Duration::from_millis(if ids.len() == 1 { 50 } else { 1000 });
            let (mut last_count, mut last_progress) = (0, Instant::now());
            poll_until("pueue tasks", Duration::MAX, max_nap, || {
                self.daemon.check_alive()?;
                let out = self.run(&["status", "--json"])?;
                let state: Value = serde_json::from_str(&out).context("pueue status --json")?;
                let mut times = Vec::new();
                for id in ids {
                    let task = &state["tasks"][id.to_string()];
                    let done = &task["status"]["Done"];
                    if !done.is_null() {
                        let ok = done["result"] == "Success";
                        ensure!(ok, "pueue task {id} failed: {task}");
                        times.push((parse_time(&done["start"])?, parse_time(&done["end"])?));
                    }
                }
                if times.len() > last_count {
                    (last_count, last_progress) = (times.len(), Instant::now());
                }
                ensure!(
                    last_progress.elapsed() <= STALL_TIMEOUT,
                    "no pueue task finished for {STALL_TIMEOUT:?}; {last_count} of {} done{}",
                    ids.len(),
                    self.daemon.log_tail()
                );
                let end = times.iter().map(|&(_, end)| end).max();
                let end = end.filter(|_| times.len() == ids.len());
                Ok(end.map(|end| (end, times.iter().map(|&(start, _)| start).collect())))
            })
        }

        fn daemon(&mut self) -> &mut Daemon {
            &mut self.daemon
        }
    }

    /// Parses an RFC 3339 time with a `Z` or `±HH:MM` offset (pueue's).
    fn parse_time(v: &Value) -> Result<SystemTime> {
        let s = v.as_str().ok_or_else(|| anyhow!("not a time: {v}"))?;
        let bad = || anyhow!("not an RFC 3339 time: {s:?}");
        let at = s.len().saturating_sub(6);
        let (local, off) = s.split_at_checked(at).unwrap_or((s, ""));
        let [sign @ (b'+' | b'-'), _, _, b':', _, _] = off.as_bytes() else {
            return humantime::parse_rfc3339_weak(s).map_err(|_| bad());
        };
        let secs = off[1..3].parse::<u64>()? * 3600 + off[4..6].parse::<u64>()? * 60;
        let t = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
        let shift = Duration::from_secs(secs);
        Ok(if *sign == b'+' { t - shift } else { t + shift })
    }

    /// Measures pueue (`BENCH_PUEUE`: the client; `pueued` is taken from beside it).
    pub(super) fn measure(knobs: &Knobs, env: &DaemonEnv) -> Result<Figures> {
        let Some(client) = std::env::var_os("BENCH_PUEUE").filter(|v| !v.is_empty()) else {
            let why = "BENCH_PUEUE is not set (scripts/bench.sh peers installs pueue and sets it)";
            return Err(Skip(why.to_owned()).into());
        };
        let client = PathBuf::from(client);
        let bins = [client.clone(), client.with_file_name("pueued")];
        if let Some(bin) = bins.iter().find(|bin| !bin.is_file()) {
            return Err(Skip(format!("{} does not exist", bin.display())).into());
        }
        let version = version_of(Command::new(&client).arg("--version"));
        info("client", client.display());
        let paths = [(true, "one `pueue add` per job")];
        let start = |p, env: &DaemonEnv| Pueue::start(&client, env, p);
        measure_queue(knobs, env, version, &paths, start)
    }
}

// --- systemd-run in the tier-3 sandbox ---

mod systemd {
    //! systemd-run against a throwaway systemd (PID 1 of an nspawn container).

    use super::*;
    use sandbox::Sandbox;

    /// Runs this binary in the sandbox as the client in `mode`; returns the JSON it printed.
    fn inner_client(sb: &Sandbox, exe: &Path, mode: &str, n: usize, p: usize) -> Result<Value> {
        check_interrupted()?;
        let exe = exe.display();
        let cmd = format!("{INNER_ENV}={mode} AICE_PEERS_N={n} AICE_PEERS_P={p} exec '{exe}'");
        let out = sb.sh(&cmd);
        check_interrupted()?;
        let [stdout, stderr] = [&out.stdout, &out.stderr].map(|o| String::from_utf8_lossy(o));
        let (status, output) = (out.status, format!("{}{}", stdout.trim(), stderr.trim()));
        let ok = status.success();
        ensure!(ok, "in-sandbox client `{mode}` failed ({status}): {output}");
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line).with_context(|| format!("client `{mode}` printed {line:?}"))
    }

    /// The host pid of the sandbox's PID 1: the `systemd` child of our `systemd-nspawn` child.
    fn sandbox_pid1() -> Result<u32> {
        let is_child = |pid: u32, parent: u32, name: &str| -> Option<()> {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && head.split_once('(')?.1 == name).then_some(())
        };
        let pids: Vec<u32> = fs::read_dir("/proc")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let child = |parent: u32, name: &str| {
            let found = pids.iter().find(|&&p| is_child(p, parent, name).is_some());
            let missing = || anyhow!("no {name} child of pid {parent}");
            found.copied().ok_or_else(missing)
        };
        child(child(std::process::id(), "systemd-nspawn")?, "systemd")
    }

    fn cpu_ms(pid: u32) -> Result<f64> {
        Ok(ticks_ms(cpu_ticks(pid)?[0]))
    }

    pub(super) fn measure(knobs: &Knobs) -> Result<Figures> {
        let exe = std::env::current_exe().context("locating this benchmark binary")?;
        let exe_dir = exe.parent().context("the benchmark binary's directory")?;
        if !nix::unistd::geteuid().is_root() {
            let why = "not running as root (the tier-3 sandbox needs root: run scripts/bench.sh peers as root)";
            return Err(Skip(why.to_owned()).into());
        }
        // The raw reference is taken before the boot, on the same quiet machine.
        let n = knobs.jobs;
        let before = raw_reference(n, "before")?;
        let Some(sb) = Sandbox::boot("peers", &[exe_dir]) else {
            let why = "the tier-3 sandbox cannot boot here (see the NOTICE above: \
                       systemd-nspawn, nsenter or systemd missing)";
            return Err(Skip(why.to_owned()).into());
        };
        let version = sb.ok("systemctl --version | head -n 1");
        let pid1 = sandbox_pid1()?;
        let environ = fs::read(format!("/proc/{pid1}/environ")).unwrap_or_default();
        let mut vars = environ.split(|&b| b == 0);
        let backtrace = match vars.find_map(|kv| kv.strip_prefix(b"RUST_BACKTRACE=")) {
            Some(v) => format!("RUST_BACKTRACE={}", String::from_utf8_lossy(v)),
            None => "RUST_BACKTRACE unset (PID 1: env from nspawn)".to_owned(),
        };
        let version = format!("{version} (systemd-run in an nspawn container)");
        let mut fig = Figures::new(version, backtrace);
        info("sandbox PID 1 (host pid)", pid1);
        // Let the boot's last jobs finish, and PID 1 go quiet, before measuring.
        let what = "the sandbox's job queue to empty";
        let list_jobs = "systemctl list-jobs --no-legend";
        sb.wait_until(what, READY_TIMEOUT, list_jobs, str::is_empty);
        let settle_start = Instant::now();
        let mut last = (cpu_ms(pid1)?, Instant::now());
        let what = "the sandbox's PID 1 to go quiet";
        let nap = Duration::from_millis(200);
        let settled = poll_until(what, Duration::from_secs(60), nap, || {
            let now = cpu_ms(pid1)?;
            if now != last.0 {
                last = (now, Instant::now());
            }
            Ok((last.1.elapsed() >= Duration::from_secs(2)).then_some(()))
        });
        if let Err(e) = settled {
            check_interrupted()?;
            println!("  WARNING: measuring anyway: {e:#}");
        } else {
            let after = format!("{:.1} s", settle_start.elapsed().as_secs_f64());
            info("sandbox quiet (PID 1 used no CPU for 2 s) after", after);
        }
        let number = |v: Value| v.as_f64().ok_or_else(|| anyhow!("not a number: {v}"));
        let how = "P client threads of systemd-run --wait";
        fig.throughput(n, before, &[(true, how)], |_, p| {
            let inside = number(inner_client(&sb, &exe, "raw", n, p)?)?;
            let label = format!("raw bash -c true inside the sandbox, P={p} (info)");
            info(&label, format!("{inside:.1} jobs/s"));
            let cpu0 = cpu_ms(pid1)?;
            let rate = number(inner_client(&sb, &exe, "systemd-run", n, p)?)?;
            let per_job = (cpu_ms(pid1)? - cpu0) / n as f64;
            info("  PID 1 CPU per job", format!("{per_job:.2} ms"));
            Ok(rate)
        })?;

        flush_disk();
        let v = inner_client(&sb, &exe, "latency", knobs.latency_samples, 1)?;
        let samples = v.as_array().ok_or_else(|| anyhow!("not a list: {v}"))?;
        let samples = samples.iter().cloned().map(number).collect::<Result<_>>()?;
        let stats = Stats::of(samples)?;
        let label = "submit -> ExecMainStartTimestamp, `systemd-run`";
        info(label, stats.line());
        fig.latency[1] = Some(stats);

        group("idle: the sandbox's PID 1");
        inner_client(&sb, &exe, "systemd-run", IDLE_WARMUP_JOBS, 1)?;
        flush_disk();
        thread::sleep(Duration::from_secs(1));
        let idle = idle_window(pid1, knobs.idle, &mut || {
            check_interrupted()?;
            let alive = Path::new(&format!("/proc/{pid1}")).exists();
            ensure!(alive, "the sandbox's PID 1 exited");
            Ok(())
        })?;
        // PID 1 is not a Rust program and nspawn gives it its own
        // environment: one window stands for both settings.
        fig.idle = [Some(print_idle(idle)); 2];
        Ok(fig)
    }
}

// --- The in-sandbox client ---

mod inner {
    //! This binary in the sandbox (`AICE_PEERS_CLIENT=mode`), as the client
    //! printing one JSON value: one process in the container, so that each job
    //! costs one `systemd-run` spawn, as each pueue job costs one `pueue add`.

    use super::*;

    /// Runs `mode` and prints its JSON; exits 1 with the error on failure.
    pub(super) fn main(mode: &str) -> ExitCode {
        // A hung systemd-run must not hang the benchmark.
        thread::spawn(|| {
            thread::sleep(Duration::from_secs(1800));
            eprintln!("in-sandbox client: deadline of 30 min passed");
            std::process::exit(3);
        });
        let [n, p] = ["AICE_PEERS_N", "AICE_PEERS_P"].map(|v| env_or(v, 1).unwrap_or(1));
        let value: Result<Value> = match mode {
            "raw" => LoopRun::raw(n, p).map(|r| r.rate.into()),
            "systemd-run" => {
                let args = "--wait --quiet --collect -- /bin/bash -c true".split(' ');
                let job = |_, _| run_ok(Command::new("systemd-run").args(args.clone())).map(drop);
                split_loop(n, p, job).map(|t| (n as f64 / t.as_secs_f64()).into())
            }
            "latency" => latency(n).map(Value::from),
            _ => Err(anyhow!("unknown mode")),
        };
        let Err(e) = value.map(|v| println!("{v}")) else {
            return ExitCode::SUCCESS;
        };
        eprintln!("in-sandbox client `{mode}`: {e:#}");
        ExitCode::FAILURE
    }

    /// Property `key` in the output of `systemctl show`.
    fn prop<'a>(show: &'a str, key: &str) -> Option<&'a str> {
        show.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }

    /// `n` samples of submit-to-start: `CLOCK_MONOTONIC` before spawning
    /// `systemd-run` to the unit's `ExecMainStartTimestampMonotonic` (host
    /// and container share the clock). `RemainAfterExit=yes` keeps the
    /// unit's properties until it is stopped after the sample.
    fn latency(n: usize) -> Result<Vec<f64>> {
        let props = "-p ExecMainStartTimestampMonotonic -p ExecMainExitTimestampMonotonic -p ExecMainStatus";
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            thread::sleep(sample_gap(i));
            let unit = format!("aice-peers-lat-{i}.service");
            let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
            let t0_us = ts.tv_sec() as f64 * 1e6 + ts.tv_nsec() as f64 / 1e3;
            let args = format!("--quiet -p RemainAfterExit=yes --unit={unit} -- /bin/bash -c true");
            run_ok(Command::new("systemd-run").args(args.split(' ')))?;
            let what = &format!("{unit} to exit");
            let show = poll_until(what, READY_TIMEOUT, Duration::from_millis(20), || {
                let mut cmd = Command::new("systemctl");
                let show = run_ok(cmd.args(["show", &unit]).args(props.split(' ')))?;
                let exit = prop(&show, "ExecMainExitTimestampMonotonic");
                let exited = exit.is_some_and(|v| v != "0" && !v.is_empty());
                Ok(exited.then_some(show))
            })?;
            let ok = prop(&show, "ExecMainStatus") == Some("0");
            ensure!(ok, "{unit} did not exit 0: {show}");
            let start = prop(&show, "ExecMainStartTimestampMonotonic").and_then(|v| v.parse().ok());
            let start: f64 = start.ok_or_else(|| anyhow!("{unit}: no start timestamp: {show}"))?;
            out.push((start - t0_us) / 1e3);
            run_ok(Command::new("systemctl").args(["stop", &unit]))?;
        }
        Ok(out)
    }
}

// --- The table ---

/// A table cell from a tool's figures.
type Cell<'a> = &'a dyn Fn(&Figures) -> Option<String>;
/// A figure compared across the tools.
type Get<'a> = &'a dyn Fn(&Figures) -> Option<f64>;

/// Prints the comparison table in Markdown: a row per figure, with the raw
/// cell, a cell per tool (ai-cmd-executor first), the target and the verdict.
fn print_table(knobs: &Knobs, env: &DaemonEnv, cols: &[Column]) {
    let idle_secs = knobs.idle.as_secs_f64();
    let aice = cols[0].figures.as_ref().ok();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut add = |label: &str, raw: Option<String>, cell: Cell, tail: [String; 2]| {
        let cells = cols.iter().map(|c| match &c.figures {
            Ok(f) => cell(f).unwrap_or_else(|| "–".into()),
            Err((word, _)) => word.to_lowercase(),
        });
        let mut row = vec![label.to_owned(), raw.unwrap_or_else(|| "–".into())];
        row.extend(cells.chain(tail));
        rows.push(row);
    };
    // The verdict: ai-cmd-executor's own target (`own`: whether it is met, and the
    // words before the comparison), and no measured peer better on `get` (ties named).
    let judge = |get: Get, higher: bool, own: Option<(bool, String)>| {
        let (mut ok, mut why) = (Some(false), "not measured".to_owned());
        if let Some(mine) = aice.and_then(get) {
            let mut groups: [Vec<&str>; 4] = Default::default();
            for peer in &cols[1..] {
                let k = match peer.figures.as_ref().ok().and_then(get) {
                    Some(theirs) if theirs == mine => 1,
                    Some(theirs) if (mine > theirs) == higher => 0,
                    Some(_) => 2,
                    None => 3,
                };
                groups[k].push(peer.name);
            }
            let unmeasured = "not compared with (not measured)";
            let words = ["ahead of", "level with", "behind", unmeasured];
            let parts = words.iter().zip(&groups).filter(|(_, n)| !n.is_empty());
            let parts = parts.map(|(w, n)| format!("{w} {}", n.join(", ")));
            let compared = groups[..3].iter().any(|g| !g.is_empty());
            ok = compared.then_some(groups[2].is_empty());
            why = parts.collect::<Vec<_>>().join("; ");
        }
        if let Some((met, words)) = own {
            ok = if met { ok } else { Some(false) };
            why = format!("{words}{why}");
        }
        let word = match ok {
            Some(true) => "MET",
            Some(false) => "MISSED",
            None => "UNCHECKED (no peer measured)",
        };
        format!("{word}: {why}")
    };

    let tail = ["same for all".to_owned(), String::new()];
    let backtrace = |f: &Figures| Some(f.backtrace.clone());
    add("daemon environment", None, &backtrace, tail);
    for (i, p) in PARALLELISM.into_iter().enumerate() {
        let span = |f: &Figures| f.raw[i].map(|(b, a)| format!("{b:.1} / {a:.1}"));
        let label = format!("raw rate before / after the tool, P={p} (jobs/s)");
        add(&label, aice.and_then(span), &span, Default::default());
        let reference = aice.and_then(|f| f.reference(i));
        let raw = reference.map(|r| format!("{r:.1} (1.000)"));
        let ratio = aice.and_then(|f| Some(f.rate[0][i]? / f.reference(i)?));
        let words = ratio.map_or("–".into(), |r| format!("{r:.3}")) + " of raw, ";
        let own = (ratio.is_some_and(|r| r >= TARGET_RATIO), words);
        let verdict = judge(&|f| f.rate[0][i], true, Some(own));
        let tail = [format!(">= {TARGET_RATIO} of raw, ahead"), verdict];
        let label = format!("throughput P={p}, jobs/s (ratio to raw)");
        add(&label, raw, &|f| f.rate_cell(0, i), tail);
    }
    for (i, p) in PARALLELISM.into_iter().enumerate() {
        let label = format!("(info) P={p}, one `submit` CLI process per job");
        add(&label, None, &|f| f.rate_cell(1, i), Default::default());
    }
    for (q, name) in ["p50", "p99"].into_iter().enumerate() {
        let get = |f: &Figures| f.latency[1].map(|s| [s.p50, s.p99][q]);
        let tail = ["ahead".to_owned(), judge(&get, false, None)];
        let cell = |f: &Figures| get(f).map(|v| format!("{v:.2}"));
        let label = format!("submit -> start {name}, ms (CLI per job)");
        add(&label, None, &cell, tail);
    }
    let label = "(info) p50 / p99, ms, file dropped by rename";
    let by_drop = |f: &Figures| f.latency[0].map(|s| format!("{:.2} / {:.2}", s.p50, s.p99));
    add(label, None, &by_drop, Default::default());
    let shell = format!("{}, as the shell has it", env.backtrace());
    let settings = [shell, env.other().backtrace()];
    for (k, setting) in settings.iter().enumerate() {
        let labels = [
            "idle RSS of the daemon, MiB".to_owned(),
            format!("idle CPU time in {idle_secs:.0} s, ms"),
            format!("idle wake-ups in {idle_secs:.0} s (ctx switches)"),
        ];
        for (j, label) in labels.iter().enumerate() {
            let get = |f: &Figures| {
                f.idle[k].map(|i| [i.rss_kib as f64 / 1024.0, i.cpu_ms, i.wakeups as f64][j])
            };
            let zero = aice.and_then(|f| f.idle[k]).is_some_and(|i| i.wakeups == 0);
            let own = (zero, format!("{}; ", if zero { "none" } else { "some" }));
            let (target, own) = match j {
                2 => ("0 (no heartbeat outside systemd), ahead", Some(own)),
                _ => ("ahead", None),
            };
            let tail = [target.to_owned(), judge(&get, false, own)];
            let digits = if j == 0 { 2 } else { 0 };
            let cell = |f: &Figures| get(f).map(|v| format!("{v:.digits$}"));
            add(&format!("{label} [{setting}]"), None, &cell, tail);
        }
    }

    let mut notes = vec![
        format!(
            "N = {} jobs of `bash -c true` per throughput run; {} latency samples per path; \
             each idle window ({idle_secs:.0} s) on a fresh daemon after {IDLE_WARMUP_JOBS} jobs \
             submitted through its CLI (systemd-run: one window of the sandbox's PID 1, shown \
             for both settings); CPU time has the 10 ms resolution of /proc/<pid>/stat.",
            knobs.jobs, knobs.latency_samples
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
    notes.extend(cols.iter().map(|c| match &c.figures {
        Ok(f) => format!("{}: {}", c.name, f.version),
        Err((word, why)) => format!("{} {word}: {why}", c.name),
    }));
    let esc = |s: &str| s.replace('|', "\\|");
    let line = |r: &[String]| String::from_iter(r.iter().map(|c| format!(" {} |", esc(c))));
    let mut heads = vec!["figure".to_owned(), "raw `bash -c true`".into()];
    heads.extend(cols.iter().map(|c| c.name.into()));
    heads.extend(["target for ai-cmd-executor".into(), "met?".into()]);
    println!("|{}\n|{}", line(&heads), " --- |".repeat(heads.len()));
    rows.iter().for_each(|r| println!("|{}", line(r)));
    println!();
    notes.iter().for_each(|n| println!("- {}", esc(n)));
}

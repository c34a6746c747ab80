//! The worker alone against the raw cost of `bash -c true`, with the spool
//! in each location in turn (BENCHMARKS.md has the method and the knobs):
//! 1. throughput at P=1/P=2, each worker run bracketed by raw loops, beside
//!    the contract loop (the raw loop doing the spool contract's file work
//!    inline) and the file-work loop (that work alone, batched: its machine
//!    CPU gives the CPU ceiling, CPUs / (raw + file-work CPU per job));
//! 2. latency of single jobs dropped into an idle worker, against a bare
//!    `bash -c true` timed between the samples and a write+fsync floor;
//! 3. idle RSS, CPU and wake-ups with `RUST_BACKTRACE` unset and `=1`.
//!
//! It reports MISSes but exits non-zero only when the worker fails.

#![warn(missing_docs)]

mod common;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, ensure};
use common::*;

/// Write+fsync probes for the durability floor, and the probe's size.
const FSYNC_SAMPLES: usize = 100;
/// Size of the write+fsync probe file (about the size of a result file).
const FSYNC_PROBE_BYTES: usize = 300;
/// Size of the result the contract loops write per job.
const RESULT_BYTES: usize = 320;
/// Most results the file-work loop stages before syncing them: the most
/// the worker's recorder commits together.
const FILE_WORK_BATCH: usize = 32;
/// Pause before each latency sample, so each job lands on an idle worker.
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

/// A place to put the spool, with a label for the report.
struct Location {
    label: String,
    base: PathBuf,
}

/// Parses `BENCH_SPOOLS` (`label=dir` pairs separated by `;`); by default
/// the temp dir and, when it exists, `/dev/shm`.
fn locations() -> Result<Vec<Location>> {
    let spec = std::env::var("BENCH_SPOOLS").unwrap_or_default();
    let mut pairs: Vec<(String, PathBuf)> = Vec::new();
    for pair in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let (label, dir) = pair
            .split_once('=')
            .with_context(|| format!("BENCH_SPOOLS entry {pair:?} is not label=dir"))?;
        pairs.push((label.trim().to_owned(), PathBuf::from(dir.trim())));
    }
    if pairs.is_empty() {
        pairs.push(("disk".into(), std::env::temp_dir()));
        pairs.extend(
            Path::new("/dev/shm")
                .is_dir()
                .then(|| ("tmpfs".into(), "/dev/shm".into())),
        );
    }
    pairs
        .into_iter()
        .map(|(label, base)| {
            let shown = base.display();
            ensure!(base.is_dir(), "BENCH_SPOOLS: {shown} is not a directory");
            let label = format!("{label}: {} ({})", base.display(), fs_type(&base));
            Ok(Location { label, base })
        })
        .collect()
}

/// Runs the sections asked for; exits non-zero only when the worker failed.
fn main() -> ExitCode {
    let settings = || {
        let knobs = Knobs::from_env(30.0)?;
        let rounds: usize = env_or("BENCH_ROUNDS", 5)?;
        ensure!(rounds >= 1, "BENCH_ROUNDS must be at least 1");
        let sections = env_list("BENCH_SECTIONS", &["throughput", "latency", "idle"])?;
        let line = format!("{} BENCH_ROUNDS={rounds}", knobs.line());
        Ok(((knobs, rounds, sections, locations()?), line))
    };
    run_bench(
        "ai-cmd-executor benchmark",
        settings,
        |(knobs, rounds, sections, locations)| {
            for loc in &locations {
                println!("spool:   {}", loc.label);
            }
            let env = DaemonEnv::capture();
            let inherited = env.with_backtrace(env.get("RUST_BACKTRACE").as_deref());
            let wants = |x: &str| sections.iter().any(|s| s == x);
            if wants("throughput") {
                section(&format!("1. Throughput: {} jobs of `true`", knobs.jobs));
                for p in PARALLELISM {
                    throughput(&locations, knobs.jobs, p, rounds, &inherited)?;
                }
            }
            if wants("latency") {
                let n = knobs.latency_samples;
                section(&format!(
                    "2. Latency: {n} jobs dropped one at a time into an idle worker (P=1)"
                ));
                for loc in &locations {
                    latency(loc, n, &inherited)?;
                }
            }
            if wants("idle") {
                let secs = knobs.idle.as_secs_f64();
                section(&format!(
                    "3. Idle: {secs:.0} s window after {IDLE_WARMUP_JOBS} jobs + 1 malformed job"
                ));
                for backtrace in [None, Some("1")] {
                    idle(&env.with_backtrace(backtrace), knobs.idle)?;
                }
            }
            Ok(true)
        },
    )
}

// ---------------------------------------------------------------------------
// 1. Throughput
// ---------------------------------------------------------------------------

/// A fresh directory under `base` with the spool layout the contract loops use.
fn contract_dir(base: &Path) -> Result<RunDir> {
    let root = RunDir::new("ai-cmd-bench-contract-", Some(base))?;
    for sub in ["tmp", "pending", "running", "completed", "logs"] {
        fs::create_dir(root.path().join(sub))?;
    }
    Ok(root)
}

/// The contract loop: `n` jobs over `p` threads, each doing inline what the
/// spool contract asks of a submitter and a worker (the job file written
/// and renamed into `pending/`, read back and renamed into `running/`, a
/// log given to `bash -c true` as its output, a result written, fsynced and
/// renamed into `completed/`, the `running/` file removed). No daemon, no
/// queue: what the file system charges any implementation of the contract.
/// Returns jobs/s and the `bash` children's CPU time per job in ms.
fn contract_throughput(base: &Path, n: usize, p: usize) -> Result<(f64, f64)> {
    let root = contract_dir(base)?;
    let dir = root.path();
    let cpu_before = CpuTimes::of("self")?;
    let elapsed = split_loop(n, p, |t, i| {
        let id = format!("c{t}-{i:06}");
        let (log, running) = submit_and_claim(dir, &id)?;
        bash_true(Some(log))?;
        let (result, staged) = write_result(dir, &id)?;
        result.sync_all()?;
        drop(result);
        put_in_place(dir, &id, &staged, &running)
    })?;
    let (_, child_ms) = CpuTimes::of("self")?.ms_since(cpu_before);
    Ok((n as f64 / elapsed.as_secs_f64(), child_ms / n as f64))
}

/// The file-work loop: the machine's CPU time per job, in ms, for the
/// contract loop's file work with no process, over `p` threads, each
/// staging up to [`FILE_WORK_BATCH`] results with their write-back started
/// before it syncs and renames them (as the worker's recorder does).
fn file_work_cpu(base: &Path, n: usize, p: usize) -> Result<f64> {
    let root = contract_dir(base)?;
    let dir = root.path();
    let machine_before = MachineCpu::now()?;
    // One call per thread: thread `t` does its share of the `n` in batches.
    split_loop(p, p, |t, _| {
        let share = n / p + usize::from(t < n % p);
        let mut staged = Vec::with_capacity(FILE_WORK_BATCH);
        for start in (0..share).step_by(FILE_WORK_BATCH) {
            for i in start..share.min(start + FILE_WORK_BATCH) {
                let id = format!("f{t}-{i:06}");
                let (_log, running) = submit_and_claim(dir, &id)?;
                let (result, tmp) = write_result(dir, &id)?;
                // Starts the write-back, as `ai_cmd_executor::spool::Staged` does.
                let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
                let _ = nix::fcntl::posix_fadvise(&result, 0, 0, advice);
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

/// The contract's file work for job `id` up to its process; returns the
/// job's log and its `running/` path.
fn submit_and_claim(dir: &Path, id: &str) -> Result<(File, PathBuf)> {
    check_interrupted()?;
    let name = format!("{id}.json");
    let [tmp, pending, running] = ["tmp", "pending", "running"].map(|d| dir.join(d).join(&name));
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

/// A result of a real result's size in a temporary file in `completed/`,
/// not yet synced.
fn write_result(dir: &Path, id: &str) -> Result<(File, PathBuf)> {
    let tmp = dir.join("completed").join(format!(".{id}.json.tmp"));
    let mut result = File::create(&tmp)?;
    result.write_all(&[b' '; RESULT_BYTES])?;
    Ok((result, tmp))
}

/// Renames a synced result into place and removes the job's `running/` file.
fn put_in_place(dir: &Path, id: &str, tmp: &Path, running: &Path) -> Result<()> {
    fs::rename(tmp, dir.join("completed").join(format!("{id}.json")))?;
    Ok(fs::remove_file(running)?)
}

/// One location's figures over the rounds (one entry per round).
#[derive(Default)]
struct Rounds {
    rates: Vec<f64>,
    ratios: Vec<f64>,
    contract_rates: Vec<f64>,
    contract_ratios: Vec<f64>,
    contract_bash: Vec<f64>,
    file_work: Vec<f64>,
    ceilings: Vec<f64>,
    last: Option<WorkerRun>,
}

/// Throughput at parallelism `p` in every location over `rounds` rounds
/// (see the module documentation), then the report.
fn throughput(
    locations: &[Location],
    n: usize,
    p: usize,
    rounds: usize,
    env: &DaemonEnv,
) -> Result<()> {
    group(&format!("P={p}"));
    let mut raws: Vec<RawRun> = Vec::new();
    let mut per: Vec<Rounds> = locations.iter().map(|_| Rounds::default()).collect();
    for _ in 0..rounds {
        let mut before = RawRun::measure(n, p)?;
        raws.push(before);
        for (loc, r) in locations.iter().zip(&mut per) {
            let (contract, contract_bash_ms) = contract_throughput(&loc.base, n, p)?;
            let file_work_ms = file_work_cpu(&loc.base, n, p)?;
            let run = worker_throughput(&loc.base, n, p, env)?;
            let after = RawRun::measure(n, p)?;
            raws.push(after);
            let reference = (before.rate + after.rate) / 2.0;
            let raw_busy_ms = (before.busy_ms + after.busy_ms) / 2.0;
            let capacity = after.cpus as f64 * 1000.0 / (raw_busy_ms + file_work_ms);
            r.ratios.push(run.rate() / reference);
            r.rates.push(run.rate());
            r.contract_ratios.push(contract / reference);
            r.contract_rates.push(contract);
            r.contract_bash.push(contract_bash_ms);
            r.file_work.push(file_work_ms);
            r.ceilings.push(capacity / reference);
            r.last = Some(run);
            before = after;
        }
    }
    let of_raws = |f: fn(&RawRun) -> f64| raws.iter().map(f).collect::<Vec<_>>();
    infos(&[
        (
            &format!("raw bash -c true loop ({p} thread(s)), median"),
            format!("{:.1} jobs/s", median(&of_raws(|r| r.rate))),
        ),
        (
            "  raw, each run",
            format!("{} jobs/s", list(&of_raws(|r| r.rate), 0)),
        ),
        (
            "  bash CPU per job (raw loop)",
            ms(median(&of_raws(|r| r.child_ms))),
        ),
        (
            "  machine CPU per job (raw loop, all CPUs)",
            ms(median(&of_raws(|r| r.busy_ms))),
        ),
        (
            "  CPUs idle during the raw loop, each run",
            list(&of_raws(|r| r.idle * 100.0), 1) + " %",
        ),
    ]);
    for (loc, r) in locations.iter().zip(&per) {
        let worker = format!("worker, max_parallel={p}, {}", loc.label);
        info(&worker, format!("{:.1} jobs/s", median(&r.rates)));
        let ratio = median(&r.ratios);
        let target = format!(">= {TARGET_RATIO}");
        check(
            "ratio worker/raw (median of rounds)",
            format!("{ratio:.3}"),
            target,
            ratio >= TARGET_RATIO,
        );
        let (contract, contract_ratio) = (median(&r.contract_rates), median(&r.contract_ratios));
        let of_ceiling = median(&quotients(&r.ratios, &r.ceilings));
        infos(&[
            ("  ratio, each round", list(&r.ratios, 3)),
            (
                "  contract loop (same file work inline, no daemon), median",
                format!("{contract:.1} jobs/s, {contract_ratio:.3} of raw"),
            ),
            (
                "  ratio contract loop/raw, each round",
                list(&r.contract_ratios, 3),
            ),
            (
                "  bash CPU per job in the contract loop (median)",
                ms(median(&r.contract_bash)),
            ),
            (
                "  ratio worker/contract loop (median of rounds)",
                format!("{:.3}", median(&quotients(&r.rates, &r.contract_rates))),
            ),
            (
                "  contract file work alone (no process, batched), CPU per job",
                format!(
                    "{} (each round: {} ms)",
                    ms(median(&r.file_work)),
                    list(&r.file_work, 3)
                ),
            ),
            (
                "  CPU ceiling: CPUs / (raw + file work CPU), of raw, each round",
                list(&r.ceilings, 3),
            ),
            (
                "  CPU ceiling (median); worker/ceiling (median)",
                format!("{:.3}; {of_ceiling:.3}", median(&r.ceilings)),
            ),
        ]);
        if let Some(run) = &r.last {
            note("details of the last round:");
            run.print_details();
        }
    }
    Ok(())
}

/// One timed batch of jobs through a worker.
struct WorkerRun {
    jobs: usize,
    parallel: usize,
    elapsed: Duration,                   // first drop to last result
    dropped: Duration,                   // time to drop all jobs
    runs: Vec<(SystemTime, SystemTime)>, // started_at, finished_at
    overflows: usize,                    // inotify queue overflows
    worker_cpu_ms: f64,
    jobs_cpu_ms: f64, // the worker's reaped children
    idle: f64,        // share of the machine's CPU time idle in the drain
}

impl WorkerRun {
    /// Jobs per second.
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }

    /// Prints timing details derived from the results' own timestamps.
    fn print_details(&self) {
        let per_job = |v: f64| ms(v / self.jobs as f64);
        let busy_ms: f64 = self.runs.iter().map(|&(s, f)| signed_ms(f, s)).sum();
        let wall_ms = self.elapsed.as_secs_f64() * 1e3;
        infos(&[
            ("    first drop -> last result", ms(wall_ms)),
            (
                &format!("    time to drop all {} jobs", self.jobs),
                ms(self.dropped.as_secs_f64() * 1e3),
            ),
            ("    mean started_at -> finished_at", per_job(busy_ms)),
            (
                "    mean concurrency (sum of run times / wall)",
                format!("{:.2}", busy_ms / wall_ms),
            ),
            ("    worker's own CPU per job", per_job(self.worker_cpu_ms)),
            (
                "    bash CPU per job (worker's children)",
                per_job(self.jobs_cpu_ms),
            ),
            (
                "    CPUs idle during the drain",
                format!("{:.1} %", self.idle * 100.0),
            ),
        ]);
        if self.parallel == 1 && self.runs.len() > 1 {
            let mut runs = self.runs.clone();
            runs.sort_by_key(|&(s, _)| s);
            let gaps: Vec<f64> = runs.windows(2).map(|w| signed_ms(w[1].0, w[0].1)).collect();
            if let Ok(g) = Stats::of(gaps) {
                let gap = format!("{:.3}/{:.3} ms", g.p50, g.p99);
                info("    gap finished_at -> next started_at p50/p99", gap);
            }
        }
        if self.overflows > 0 {
            note(&format!(
                "inotify queue overflowed {} time(s); completion times fell back to directory scans",
                self.overflows
            ));
        }
    }
}

/// Drops `n` jobs as fast as possible into a fresh worker with
/// `max_parallel = p` on a spool under `base`, and times them.
fn worker_throughput(base: &Path, n: usize, p: usize, env: &DaemonEnv) -> Result<WorkerRun> {
    let mut fx = Fixture::start(Some(base), Some(p), env)?;
    let ids: Vec<String> = (0..n).map(|i| format!("tp{p}-{i:06}")).collect();
    let pid = fx.worker.pid();
    let cpu_before = CpuTimes::of(pid)?;
    let machine_before = MachineCpu::now()?;
    let start = Instant::now();
    for id in &ids {
        fx.submit(id, TRUE_JOB)?;
    }
    let dropped = start.elapsed();
    let last = fx
        .wait(&mut ids.iter().cloned().collect())
        .with_context(|| format!("throughput run P={p} in {}", fx.spool.display()))?;
    let idle = MachineCpu::now()?.idle_share_since(machine_before);
    let (worker_cpu_ms, jobs_cpu_ms) = CpuTimes::of(pid)?.ms_since(cpu_before);
    // Checked after the timed part: every job must have succeeded.
    let runs = ids
        .iter()
        .map(|id| fx.succeeded(id))
        .collect::<Result<_>>()?;
    Ok(WorkerRun {
        jobs: n,
        parallel: p,
        elapsed: last - start,
        dropped,
        runs,
        overflows: fx.overflows(),
        worker_cpu_ms,
        jobs_cpu_ms,
        idle,
    })
}

// ---------------------------------------------------------------------------
// 2. Latency
// ---------------------------------------------------------------------------

/// Single-job latency on a spool in `loc`. The bare spawn reference is
/// interleaved with the worker samples, each after the same idle gap: on a
/// VM a lone spawn's cost drifts from one minute to the next.
fn latency(loc: &Location, samples: usize, env: &DaemonEnv) -> Result<()> {
    group(&loc.label);
    let mut fx = Fixture::start(Some(&loc.base), Some(1), env)?;
    info("spool", fx.spool.display());
    let (mut to_start, mut to_result, mut run, mut record, mut bare) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let id = format!("lat-{i:05}");
        thread::sleep(LATENCY_GAP);
        let t = Instant::now();
        bash_true(None)?;
        bare.push(t.elapsed().as_secs_f64() * 1e3);
        thread::sleep(LATENCY_GAP);
        fx.submit(&id, TRUE_JOB)?;
        let (dropped_mono, dropped_wall) = (Instant::now(), SystemTime::now());
        let seen = fx
            .wait(&mut HashSet::from([id.clone()]))
            .with_context(|| format!("latency sample {i} ({})", loc.label))?;
        let (started, finished) = fx.succeeded(&id)?;
        to_start.push(signed_ms(started, dropped_wall));
        to_result.push((seen - dropped_mono).as_secs_f64() * 1e3);
        run.push(signed_ms(finished, started));
        record.push(signed_ms(dropped_wall + (seen - dropped_mono), finished));
    }
    let bare = Stats::of(bare)?;
    let overhead = Stats::of(to_result.iter().map(|r| r - bare.p50).collect())?;
    let (to_start, to_result) = (Stats::of(to_start)?, Stats::of(to_result)?);
    let target = format!("< {TARGET_START_P50_MS} ms");
    let ok = to_start.p50 < TARGET_START_P50_MS;
    check("(a) drop -> started_at p50", ms(to_start.p50), target, ok);
    infos(&[
        ("(a) drop -> started_at p99", ms(to_start.p99)),
        ("(b) drop -> result file p50", ms(to_result.p50)),
        ("(b) drop -> result file p99", ms(to_result.p99)),
        ("(b) drop -> result file max", ms(to_result.max)),
        ("bare bash -c true spawn+wait p50", ms(bare.p50)),
        ("bare bash -c true spawn+wait p99", ms(bare.p99)),
    ]);
    let target = format!("< {TARGET_OVERHEAD_P50_MS} ms");
    let ok = overhead.p50 < TARGET_OVERHEAD_P50_MS;
    check(
        "(c) result latency - bare spawn p50",
        ms(overhead.p50),
        target,
        ok,
    );
    infos(&[
        ("(c) result latency - bare spawn p99", ms(overhead.p99)),
        (
            "  breakdown of (b): started_at -> finished_at p50",
            ms(Stats::of(run)?.p50),
        ),
        (
            "  breakdown of (b): finished_at -> result file p50",
            ms(Stats::of(record)?.p50),
        ),
    ]);

    // The durability floor: create, then write and fsync, a small file there.
    let (mut creates, mut syncs) = (Vec::new(), Vec::new());
    for i in 0..FSYNC_SAMPLES {
        let path = fx.root.path().join(format!("fsync-probe-{i}"));
        let t0 = Instant::now();
        let mut f = File::create(&path)?;
        let t1 = Instant::now();
        f.write_all(&[b'x'; FSYNC_PROBE_BYTES])?;
        f.sync_all()?;
        syncs.push(t1.elapsed().as_secs_f64() * 1e3);
        creates.push((t1 - t0).as_secs_f64() * 1e3);
        fs::remove_file(&path)?;
    }
    let fsync = Stats::of(syncs)?;
    infos(&[
        (
            &format!("write+fsync {FSYNC_PROBE_BYTES} B, same fs p50"),
            ms(fsync.p50),
        ),
        (
            &format!("write+fsync {FSYNC_PROBE_BYTES} B, same fs p99"),
            ms(fsync.p99),
        ),
        (
            "create (open O_CREAT) of that file p50",
            ms(Stats::of(creates)?.p50),
        ),
    ]);
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Idle
// ---------------------------------------------------------------------------

/// An idle worker's memory, CPU and wake-ups after a warm-up (a malformed
/// job, then [`IDLE_WARMUP_JOBS`] regular ones), with environment `env`.
fn idle(env: &DaemonEnv, window: Duration) -> Result<()> {
    group(&env.backtrace());
    let mut fx = Fixture::start(None, None, env)?;
    fx.submit("malformed", b"{not json")?;
    let ids: HashSet<String> = (0..IDLE_WARMUP_JOBS)
        .map(|i| format!("idle-{i:04}"))
        .collect();
    for id in &ids {
        fx.submit(id, TRUE_JOB)?;
    }
    fx.wait(&mut ids.clone()).context("idle warm-up")?;
    let left = |fx: &Fixture| {
        ["pending", "running"]
            .iter()
            .any(|d| fx.spool.join(d).join("malformed.json").exists())
    };
    let what = "the malformed job";
    let waited = poll_until(what, MALFORMED_TIMEOUT, Duration::from_millis(5), || {
        fx.worker.check_alive()?;
        Ok((!left(&fx)).then_some(()))
    });
    let outcome = match (waited, fx.result("malformed")) {
        (Err(_), _) => format!("still in pending/ or running/ after {MALFORMED_TIMEOUT:?}"),
        (Ok(()), Ok(r)) => format!("result status {:?}", r.status),
        (Ok(()), Err(_)) => "no readable result in completed/".to_owned(),
    };
    check_interrupted()?;
    info("malformed job outcome", outcome);
    let idle = fx.worker.idle(window)?;
    let rss = format!("{:.2} MiB", idle.rss_kib as f64 / 1024.0);
    let target = format!("< {} MiB", TARGET_RSS_KIB / 1024);
    check(
        "VmRSS after window",
        rss,
        target,
        idle.rss_kib < TARGET_RSS_KIB,
    );
    check(
        "wake-ups (ctx switches, all threads)",
        idle.wakeups,
        "= 0".into(),
        idle.wakeups == 0,
    );
    Ok(())
}

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

/// Write+fsync probes for the durability floor.
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
/// Target: p50 of drop -> `started_at`, and of result latency minus bare spawn, in ms.
const TARGET_LATENCY_P50_MS: f64 = 0.5;
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
    let default = format!("disk={};tmpfs=/dev/shm", std::env::temp_dir().display());
    let given = !spec.trim().is_empty();
    let mut out = Vec::new();
    for pair in (if given { &spec } else { &default }).split(';') {
        let (label, dir) = pair.split_once('=').unwrap_or(("", pair));
        let base = PathBuf::from(dir.trim());
        if !base.is_dir() {
            ensure!(!given, "BENCH_SPOOLS: {pair:?} is not label=directory");
            continue;
        }
        let label = format!("{}: {} ({})", label.trim(), base.display(), fs_of(&base).1);
        out.push(Location { label, base });
    }
    Ok(out)
}

/// Runs the sections asked for; exits non-zero only when the worker failed.
fn main() -> ExitCode {
    run_bench("ai-cmd-executor benchmark", || {
        let rounds: usize = env_or("BENCH_ROUNDS", 5)?;
        let knobs = Knobs::from_env(30.0, &format!(" BENCH_ROUNDS={rounds}"))?;
        ensure!(rounds >= 1, "BENCH_ROUNDS must be at least 1");
        let sections = env_list("BENCH_SECTIONS", &["throughput", "latency", "idle"])?;
        let locations = locations()?;
        for loc in &locations {
            println!("spool:   {}", loc.label);
        }
        let env = DaemonEnv::shell();
        let wants = |x: &str| sections.iter().any(|s| s == x);
        if wants("throughput") {
            section(&format!("1. Throughput: {} jobs of `true`", knobs.jobs));
            for p in PARALLELISM {
                throughput(&locations, knobs.jobs, p, rounds, &env)?;
            }
        }
        if wants("latency") {
            let n = knobs.latency_samples;
            section(&format!(
                "2. Latency: {n} jobs dropped one at a time into an idle worker (P=1)"
            ));
            for loc in &locations {
                latency(loc, n, &env)?;
            }
        }
        if wants("idle") {
            let secs = knobs.idle.as_secs_f64();
            section(&format!(
                "3. Idle: {secs:.0} s window after {IDLE_WARMUP_JOBS} jobs + 1 malformed job"
            ));
            for backtrace in [None, Some("1")] {
                idle(&DaemonEnv::with_backtrace(backtrace), knobs.idle)?;
            }
        }
        Ok(true)
    })
}

// --- 1. Throughput ---

/// The contract loop (`spawn`) or the file-work loop: `n` jobs over `p`
/// threads in a fresh directory under `base`, each doing what the spool
/// contract asks of a submitter and a worker: the job file written and
/// renamed into `pending/`, read back and renamed into `running/`, a log
/// created (given to `bash -c true` as its output when `spawn`), a result
/// written, fsynced and renamed into `completed/`, the `running/` file
/// removed. No daemon, no queue: what the file system charges any
/// implementation of the contract. The file-work loop runs no process and
/// stages up to [`FILE_WORK_BATCH`] results per thread with their write-back
/// started before it syncs and renames them, as the worker's recorder does.
fn contract_loop(base: &Path, n: usize, p: usize, spawn: bool) -> Result<LoopRun> {
    let root = RunDir::new("ai-cmd-bench-contract-", Some(base))?;
    let dir = root.path();
    for sub in ["tmp", "pending", "running", "completed", "logs"] {
        fs::create_dir(dir.join(sub))?;
    }
    let batch = if spawn { 1 } else { FILE_WORK_BATCH };
    // One call per thread: thread `t` does its share of the `n` in batches.
    LoopRun::time(n, "self", || {
        split_loop(p, p, |t, _| {
            let share = n / p + usize::from(t < n % p);
            let mut staged = Vec::with_capacity(batch);
            for i in 0..share {
                check_interrupted()?;
                let name = format!("{t}-{i:06}.json");
                let [tmp, pending, running] =
                    ["tmp", "pending", "running"].map(|d| dir.join(d).join(&name));
                fs::write(&tmp, TRUE_JOB)?;
                fs::rename(&tmp, &pending)?;
                ensure!(
                    fs::read(&pending)? == TRUE_JOB,
                    "the job file read back differs"
                );
                fs::rename(&pending, &running)?;
                let log = File::create_new(dir.join("logs").join(format!("{name}.log")))?;
                if spawn {
                    bash_true(Some(log))?;
                }
                let tmp = dir.join("completed").join(format!(".{name}.tmp"));
                let mut result = File::create(&tmp)?;
                result.write_all(&[b' '; RESULT_BYTES])?;
                if !spawn {
                    // Starts the write-back, as `ai_cmd_executor::spool::Staged` does.
                    let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
                    let _ = nix::fcntl::posix_fadvise(&result, 0, 0, advice);
                }
                staged.push((name, result, tmp, running));
                if staged.len() == batch || i + 1 == share {
                    for (name, result, tmp, running) in staged.drain(..) {
                        result.sync_all()?;
                        drop(result);
                        fs::rename(tmp, dir.join("completed").join(name))?;
                        fs::remove_file(running)?;
                    }
                }
            }
            Ok(())
        })
    })
}

/// One round's figures in one location.
struct Round {
    worker: LoopRun,
    contract: LoopRun,
    file_work_ms: f64, // the file-work loop's machine CPU per job
    reference: f64,    // mean of the raw rates just before and after
    ceiling: f64,      // the CPU ceiling, as a ratio to `reference`
}

/// Throughput at parallelism `p` in every location over `rounds` rounds
/// (see the module documentation), then the report.
fn throughput(locs: &[Location], n: usize, p: usize, rounds: usize, env: &DaemonEnv) -> Result<()> {
    group(&format!("P={p}"));
    let mut raws = Vec::new();
    let mut per: Vec<Vec<Round>> = locs.iter().map(|_| Vec::new()).collect();
    let mut last_runs = vec![Vec::new(); locs.len()];
    for _ in 0..rounds {
        raws.push(LoopRun::raw(n, p)?);
        for (k, loc) in locs.iter().enumerate() {
            let contract = contract_loop(&loc.base, n, p, true)?;
            let file_work_ms = contract_loop(&loc.base, n, p, false)?.busy_ms;
            let (worker, runs) = worker_throughput(&loc.base, n, p, env)?;
            let before = raws[raws.len() - 1];
            let after = LoopRun::raw(n, p)?;
            raws.push(after);
            let reference = (before.rate + after.rate) / 2.0;
            let raw_busy_ms = (before.busy_ms + after.busy_ms) / 2.0;
            let ceiling = after.cpus as f64 * 1000.0 / (raw_busy_ms + file_work_ms) / reference;
            let round = Round {
                worker,
                contract,
                file_work_ms,
                reference,
                ceiling,
            };
            per[k].push(round);
            last_runs[k] = runs;
        }
    }
    let raw = |f: fn(&LoopRun) -> f64| raws.iter().map(f).collect::<Vec<_>>();
    let rates = raw(|r| r.rate);
    let label = format!("raw bash -c true loop ({p} thread(s)), median");
    info(&label, format!("{:.1} jobs/s", median(&rates)));
    info("  raw, each run", format!("{} jobs/s", list(&rates, 0)));
    info(
        "  bash CPU per job (raw loop)",
        ms(median(&raw(|r| r.child_ms))),
    );
    info(
        "  machine CPU per job (raw loop, all CPUs)",
        ms(median(&raw(|r| r.busy_ms))),
    );
    let idle = list(&raw(|r| r.idle * 100.0), 1);
    info("  CPUs idle during the raw loop, each run", idle + " %");
    let target = format!(">= {TARGET_RATIO}");
    for ((loc, rounds), runs) in locs.iter().zip(&per).zip(&last_runs) {
        let of = |f: fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
        let med = |f: fn(&Round) -> f64| median(&of(f));
        let rate = format!("{:.1} jobs/s", med(|r| r.worker.rate));
        info(&format!("worker, max_parallel={p}, {}", loc.label), rate);
        let ratio = med(|r| r.worker.rate / r.reference);
        let (value, ok) = (format!("{ratio:.3}"), ratio >= TARGET_RATIO);
        check("ratio worker/raw (median of rounds)", value, &target, ok);
        info(
            "  ratio, each round",
            list(&of(|r| r.worker.rate / r.reference), 3),
        );
        let contract_ratio = med(|r| r.contract.rate / r.reference);
        let contract = format!(
            "{:.1} jobs/s, {contract_ratio:.3} of raw",
            med(|r| r.contract.rate)
        );
        info(
            "  contract loop (same file work inline, no daemon), median",
            contract,
        );
        let contract_ratios = list(&of(|r| r.contract.rate / r.reference), 3);
        info("  ratio contract loop/raw, each round", contract_ratios);
        let worker_per_contract = format!("{:.3}", med(|r| r.worker.rate / r.contract.rate));
        info(
            "  ratio worker/contract loop (median of rounds)",
            worker_per_contract,
        );
        let file_work = of(|r| r.file_work_ms);
        let file_work = format!(
            "{} (each round: {} ms)",
            ms(median(&file_work)),
            list(&file_work, 3)
        );
        info(
            "  contract file work alone (no process, batched), CPU per job",
            file_work,
        );
        let ceilings = list(&of(|r| r.ceiling), 3);
        info(
            "  CPU ceiling: CPUs / (raw + file work CPU), of raw, each round",
            ceilings,
        );
        let of_ceiling = med(|r| r.worker.rate / r.reference / r.ceiling);
        let ceiling = format!("{:.3}; {of_ceiling:.3}", med(|r| r.ceiling));
        info("  CPU ceiling (median); worker/ceiling (median)", ceiling);
        note("details of the last round:");
        let w = rounds.last().expect("at least one round").worker;
        info("    worker's own CPU per job", ms(w.own_ms));
        info("    bash CPU per job (worker's children)", ms(w.child_ms));
        info(
            "    CPUs idle during the drain",
            format!("{:.1} %", w.idle * 100.0),
        );
        if p == 1 && runs.len() > 1 {
            let mut runs = runs.clone();
            runs.sort_by_key(|&(s, _)| s);
            let g = Stats::of(runs.windows(2).map(|w| signed_ms(w[1].0, w[0].1)).collect())?;
            let gap = format!("{:.3}/{:.3} ms", g.p50, g.p99);
            info("    gap finished_at -> next started_at p50/p99", gap);
        }
    }
    Ok(())
}

/// Drops `n` jobs as fast as possible into a fresh worker with
/// `max_parallel = p` on a spool under `base`: the drain (first drop to
/// last result, with the worker's CPU), and each job's run times.
fn worker_throughput(
    base: &Path,
    n: usize,
    p: usize,
    env: &DaemonEnv,
) -> Result<(LoopRun, Vec<(SystemTime, SystemTime)>)> {
    let mut fx = Fixture::start(Some(base), Some(p), env)?;
    let ids: Vec<String> = (0..n).map(|i| format!("tp{p}-{i:06}")).collect();
    let run = LoopRun::time(n, fx.worker.pid(), || {
        let start = Instant::now();
        ids.iter().try_for_each(|id| fx.submit(id, false))?;
        let last = fx.wait(&mut ids.iter().cloned().collect());
        Ok(
            last.with_context(|| format!("throughput run P={p} in {}", fx.spool.display()))?
                - start,
        )
    })?;
    // Checked after the timed part: every job must have succeeded.
    let runs = ids.iter().map(|id| fx.succeeded(id));
    let runs = runs.collect::<Result<_>>()?;
    Ok((run, runs))
}

// --- 2. Latency ---

/// Single-job latency on a spool in `loc`. The bare spawn reference is
/// interleaved with the worker samples, each after the same idle gap: on a
/// VM a lone spawn's cost drifts from one minute to the next.
fn latency(loc: &Location, samples: usize, env: &DaemonEnv) -> Result<()> {
    group(&loc.label);
    let mut fx = Fixture::start(Some(&loc.base), Some(1), env)?;
    info("spool", fx.spool.display());
    // Bare spawn, drop -> started_at, drop -> result file, run, finished_at -> result file.
    let mut v: [Vec<f64>; 5] = Default::default();
    for i in 0..samples {
        let id = format!("lat-{i:05}");
        thread::sleep(LATENCY_GAP);
        let t = Instant::now();
        bash_true(None)?;
        v[0].push(t.elapsed().as_secs_f64() * 1e3);
        thread::sleep(LATENCY_GAP);
        fx.submit(&id, false)?;
        let (dropped_mono, dropped_wall) = (Instant::now(), SystemTime::now());
        let seen = fx.wait(&mut HashSet::from([id.clone()]));
        let seen =
            seen.with_context(|| format!("latency sample {i} ({})", loc.label))? - dropped_mono;
        let (started, finished) = fx.succeeded(&id)?;
        v[1].push(signed_ms(started, dropped_wall));
        v[2].push(seen.as_secs_f64() * 1e3);
        v[3].push(signed_ms(finished, started));
        v[4].push(signed_ms(dropped_wall + seen, finished));
    }
    let bare = Stats::of(v[0].clone())?;
    let overhead = Stats::of(v[2].iter().map(|r| r - bare.p50).collect())?;
    let [_, to_start, to_result, run, record] = v.map(Stats::of);
    let (to_start, to_result) = (to_start?, to_result?);
    let (target, limit) = (
        format!("< {TARGET_LATENCY_P50_MS} ms"),
        TARGET_LATENCY_P50_MS,
    );
    let (p50, ok) = (ms(to_start.p50), to_start.p50 < limit);
    check("(a) drop -> started_at p50", p50, &target, ok);
    info("(a) drop -> started_at p99", ms(to_start.p99));
    info("(b) drop -> result file p50", ms(to_result.p50));
    info("(b) drop -> result file p99", ms(to_result.p99));
    info("(b) drop -> result file max", ms(to_result.max));
    info("bare bash -c true spawn+wait p50", ms(bare.p50));
    info("bare bash -c true spawn+wait p99", ms(bare.p99));
    let (p50, ok) = (ms(overhead.p50), overhead.p50 < limit);
    check("(c) result latency - bare spawn p50", p50, &target, ok);
    info("(c) result latency - bare spawn p99", ms(overhead.p99));
    let label = "  breakdown of (b): started_at -> finished_at p50";
    info(label, ms(run?.p50));
    let label = "  breakdown of (b): finished_at -> result file p50";
    info(label, ms(record?.p50));

    // The durability floor: write and fsync a small file there.
    let mut syncs = Vec::new();
    for i in 0..FSYNC_SAMPLES {
        let path = fx.root.path().join(format!("fsync-probe-{i}"));
        let mut f = File::create(&path)?;
        let t = Instant::now();
        f.write_all(&[b'x'; FSYNC_PROBE_BYTES])?;
        f.sync_all()?;
        syncs.push(t.elapsed().as_secs_f64() * 1e3);
        fs::remove_file(&path)?;
    }
    let fsync = Stats::of(syncs)?;
    let label = format!("write+fsync {FSYNC_PROBE_BYTES} B, same fs");
    info(&format!("{label} p50"), ms(fsync.p50));
    info(&format!("{label} p99"), ms(fsync.p99));
    Ok(())
}

// --- 3. Idle ---

/// An idle worker's memory, CPU and wake-ups after a warm-up (a malformed
/// job, then [`IDLE_WARMUP_JOBS`] regular ones), with environment `env`.
fn idle(env: &DaemonEnv, window: Duration) -> Result<()> {
    group(&env.backtrace());
    let mut fx = Fixture::start(None, None, env)?;
    fx.drop_file("malformed", b"{not json")?;
    let ids = (0..IDLE_WARMUP_JOBS).map(|i| format!("idle-{i:04}"));
    let mut ids: HashSet<String> = ids.collect();
    ids.iter().try_for_each(|id| fx.submit(id, false))?;
    ids.insert("malformed".into());
    fx.wait(&mut ids).context("idle warm-up")?;
    let status = &fx.result("malformed")?["status"];
    info("malformed job outcome", format!("result status {status}"));
    let idle = fx.worker.idle(window)?;
    let (rss, target) = (idle.rss_kib, format!("< {} MiB", TARGET_RSS_KIB / 1024));
    check(
        "VmRSS after window",
        mib(rss),
        &target,
        rss < TARGET_RSS_KIB,
    );
    let wakeups = idle.wakeups;
    check(
        "wake-ups (ctx switches, all threads)",
        wakeups,
        "= 0",
        wakeups == 0,
    );
    Ok(())
}

//! The worker alone against the raw cost of `bash -c true`, with the spool
//! in each location in turn (BENCHMARKS.md has the method and the knobs):
//! 1. throughput at P=1/P=2, each worker run bracketed by raw loops, beside
//!    the contract and file-work loops ([`contract_loop`]) and the CPU
//!    ceiling, CPUs / (raw + file-work CPU per job);
//! 2. latency of single jobs dropped into an idle worker, against a bare
//!    `bash -c true` timed between the samples and a write+fsync floor;
//! 3. idle RSS, CPU and wake-ups with `RUST_BACKTRACE` unset and `=1`;
//! 4. what isolation costs: the drain at P=1 on tmpfs with it off and at
//!    each level, rounds interleaved;
//! 5. `run_command` on `true` through `ai-cmd-executor mcp`: from the job's
//!    `finished_at` to the tool's answer.

#![warn(missing_docs)]

mod common;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

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
/// Target: p50 of drop -> `started_at`, and of result latency minus bare spawn, in ms.
const TARGET_LATENCY_P50_MS: f64 = 0.5;
/// Target: idle VmRSS, in KiB (8 MiB).
const TARGET_RSS_KIB: u64 = 8 * 1024;
/// The user the worker runs as at `isolation = "full"`.
const NOBODY: u32 = 65534;
/// Target: the default isolation's drain rate, as a share of none's.
const TARGET_ISOLATION_RATIO: f64 = 0.95;

/// A place to put the spool, with a label for the report.
struct Location {
    label: String,
    base: PathBuf,
}

/// `BENCH_SPOOLS` (`label=dir` pairs separated by `;`), else the temp dir and
/// `/dev/shm` if it exists.
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
        let all = ["throughput", "latency", "idle", "containment", "mcp"];
        let sections = env_list("BENCH_SECTIONS", &all)?;
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
            let (secs, burst) = (knobs.idle.as_secs_f64(), env_or("BENCH_BURST", 20_000)?);
            section(&format!(
                "3. Idle: {secs:.0} s window after N jobs + 1 malformed job"
            ));
            // After 100 jobs, and after a burst (BENCH_BURST, 20,000).
            for (bt, n) in [(None, 100), (Some("1"), 100), (Some("1"), burst)] {
                idle(&DaemonEnv::with_backtrace(bt), knobs.idle, n)?;
            }
        }
        if wants("containment") {
            section(&format!("4. Isolation: {} jobs of `true`, P=1", knobs.jobs));
            containment(&locations, knobs.jobs, rounds, &env)?;
        }
        if wants("mcp") {
            let n = knobs.latency_samples;
            section(&format!(
                "5. MCP: {n} run_command calls on `true`, one at a time"
            ));
            mcp(&locations, n, &env)?;
        }
        Ok(true)
    })
}

// --- 1. Throughput ---

/// The contract loop (`spawn`) or the file-work loop: `n` jobs over `p`
/// threads under `base`, each doing the contract's file work with no
/// daemon: what the file system charges any implementation. The file-work
/// loop runs no process and batches up to [`FILE_WORK_BATCH`] results per
/// thread before it syncs them, as the worker's recorder does.
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
            let share = share(n, p, t);
            let mut staged = Vec::with_capacity(batch);
            for i in 0..share {
                check_interrupted()?;
                let name = format!("{t}-{i:06}.json");
                let [tmp, pending, running] =
                    ["tmp", "pending", "running"].map(|d| dir.join(d).join(&name));
                fs::write(&tmp, TRUE_JOB)?;
                fs::rename(&tmp, &pending)?;
                let read_back = fs::read(&pending)?;
                ensure!(read_back == TRUE_JOB, "the job file read back differs");
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

/// One round's figures in one location; the ratios are to the reference,
/// the mean of the raw rates just before and after.
struct Round {
    worker: LoopRun,
    contract: LoopRun,
    ratio: f64,          // the worker's rate to the reference
    contract_ratio: f64, // the contract loop's rate to the reference
    file_work_ms: f64,   // the file-work loop's machine CPU per job
    ceiling: f64,        // the CPU ceiling, as a ratio to the reference
    gaps: Vec<f64>,      // ms from each job's end to the next one's start
}

/// Throughput at parallelism `p` in every location over `rounds` rounds, then the report.
fn throughput(locs: &[Location], n: usize, p: usize, rounds: usize, env: &DaemonEnv) -> Result<()> {
    group(&format!("P={p}"));
    let mut raws = Vec::new();
    let mut per: Vec<Vec<Round>> = locs.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        raws.push(LoopRun::raw(n, p)?);
        for (k, loc) in locs.iter().enumerate() {
            let contract = contract_loop(&loc.base, n, p, true)?;
            let file_work_ms = contract_loop(&loc.base, n, p, false)?.busy_ms;
            let fx = Fixture::start(Some(&loc.base), Some(p), env)?;
            let (worker, gaps) = worker_drain(fx, n, p)?;
            let (before, after) = (raws[raws.len() - 1], LoopRun::raw(n, p)?);
            raws.push(after);
            let reference = (before.rate + after.rate) / 2.0;
            let raw_busy_ms = (before.busy_ms + after.busy_ms) / 2.0;
            let ceiling = after.cpus as f64 * 1000.0 / (raw_busy_ms + file_work_ms) / reference;
            per[k].push(Round {
                ratio: worker.rate / reference,
                contract_ratio: contract.rate / reference,
                worker,
                contract,
                file_work_ms,
                ceiling,
                gaps,
            });
        }
    }
    let raw = |f: fn(&LoopRun) -> f64| raws.iter().map(f).collect::<Vec<_>>();
    let rates = raw(|r| r.rate);
    let label = format!("raw bash -c true loop ({p} thread(s)), median");
    info(&label, format!("{:.1} jobs/s", median(&rates)));
    info("  raw, each run", format!("{} jobs/s", list(&rates, 0)));
    let raw_ms = |f: fn(&LoopRun) -> f64| ms(median(&raw(f)));
    info("  bash CPU per job (raw loop)", raw_ms(|r| r.child_ms));
    let v = raw_ms(|r| r.busy_ms);
    info("  machine CPU per job (raw loop, all CPUs)", v);
    let idle = list(&raw(|r| r.idle * 100.0), 1);
    info("  CPUs idle during the raw loop, each run", idle + " %");
    let target = format!(">= {TARGET_RATIO}");
    for (loc, rounds) in locs.iter().zip(&per) {
        let of = |f: fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
        let med = |f: fn(&Round) -> f64| median(&of(f));
        let each = |f: fn(&Round) -> f64| list(&of(f), 3);
        let rate = format!("{:.1} jobs/s", med(|r| r.worker.rate));
        info(&format!("worker, max_parallel={p}, {}", loc.label), rate);
        let ratio = med(|r| r.ratio);
        let (value, ok) = (format!("{ratio:.3}"), ratio >= TARGET_RATIO);
        check("ratio worker/raw (median of rounds)", value, &target, ok);
        info("  ratio, each round", each(|r| r.ratio));
        let (rate, ratio) = (med(|r| r.contract.rate), med(|r| r.contract_ratio));
        let v = format!("{rate:.1} jobs/s, {ratio:.3} of raw");
        let label = "  contract loop (same file work inline, no daemon), median";
        info(label, v);
        let v = each(|r| r.contract_ratio);
        info("  ratio contract loop/raw, each round", v);
        let v = format!("{:.3}", med(|r| r.worker.rate / r.contract.rate));
        info("  ratio worker/contract loop (median of rounds)", v);
        let (file_work, each_file_work) = (med(|r| r.file_work_ms), each(|r| r.file_work_ms));
        let v = format!("{} (each round: {each_file_work} ms)", ms(file_work));
        let label = "  contract file work alone (no process, batched), CPU per job";
        info(label, v);
        let label = "  CPU ceiling: CPUs / (raw + file work CPU), of raw, each round";
        info(label, each(|r| r.ceiling));
        let of_ceiling = med(|r| r.ratio / r.ceiling);
        let v = format!("{:.3}; {of_ceiling:.3}", med(|r| r.ceiling));
        info("  CPU ceiling (median); worker/ceiling (median)", v);
        note("details of the last round:");
        let last = rounds.last().expect("at least one round");
        let w = last.worker;
        info("    worker's own CPU per job", ms(w.own_ms));
        info("    bash CPU per job (worker's children)", ms(w.child_ms));
        let v = format!("{:.1} %", w.idle * 100.0);
        info("    CPUs idle during the drain", v);
        if p == 1 && !last.gaps.is_empty() {
            let g = Stats::of(last.gaps.clone())?;
            let gap = format!("{:.3}/{:.3} ms", g.p50, g.p99);
            info("    gap finished_at -> next started_at p50/p99", gap);
        }
    }
    Ok(())
}

/// Drops `n` jobs at once into `fx`, a fresh worker with `max_parallel = p`:
/// the drain (first drop to last result, with the worker's CPU), and the gaps.
fn worker_drain(mut fx: Fixture, n: usize, p: usize) -> Result<(LoopRun, Vec<f64>)> {
    let ids: Vec<String> = (0..n).map(|i| format!("tp{p}-{i:06}")).collect();
    let run = LoopRun::time(n, fx.worker.pid(), || {
        let start = Instant::now();
        ids.iter().try_for_each(|id| fx.submit(id, false))?;
        let last = fx.wait(&mut ids.iter().cloned().collect());
        let last = last.with_context(|| format!("throughput run P={p} in {}", fx.spool.display()));
        Ok(last? - start)
    })?;
    // Checked after the timed part: every job must have succeeded.
    let runs = ids.iter().map(|id| fx.succeeded(id));
    let mut runs = runs.collect::<Result<Vec<_>>>()?;
    runs.sort_by_key(|&(started, _)| started);
    let gaps = runs.windows(2).map(|w| signed_ms(w[1].0, w[0].1)).collect();
    Ok((run, gaps))
}

// --- 4. Isolation ---

/// The drain at P=1 at each isolation level, rounds interleaved, on tmpfs;
/// `full` as `nobody` under `BENCH_FULL_BASE` (parents only root writes),
/// then also with a cgroup per job in the delegated cgroup `BENCH_CGROUP`.
fn containment(locs: &[Location], n: usize, rounds: usize, env: &DaemonEnv) -> Result<()> {
    let tmpfs = locs.iter().find(|l| l.label.starts_with("tmpfs"));
    let loc = tmpfs.or(locs.first());
    let loc = loc.context("no location for the spool")?;
    let full = std::env::var_os("BENCH_FULL_BASE").map(PathBuf::from);
    let cgroup = std::env::var_os("BENCH_CGROUP").map(PathBuf::from);
    let root = nix::unistd::geteuid().is_root();
    let mut levels = vec![("none", &loc.base, None), ("process", &loc.base, None)];
    if let Some(base) = full.as_ref().filter(|_| root) {
        levels.push(("full", base, Some(NOBODY)));
        if cgroup.is_some() {
            levels.push(("full + cgroups", base, Some(NOBODY)));
        }
    }
    if levels.len() < 4 {
        note(
            "isolation = \"full\" and a cgroup per job need root, BENCH_FULL_BASE (a directory only root may write) and BENCH_CGROUP (a delegated cgroup v2), which scripts/bench.sh makes: skipped",
        );
    }
    let mut runs: Vec<Vec<LoopRun>> = levels.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..levels.len() {
            let k = (k + round) % levels.len();
            let (level, base, user) = levels[k];
            let isolation = level.split(' ').next().unwrap_or(level);
            let config = format!("max_parallel = 1\nisolation = \"{isolation}\"\n");
            let cg = cgroup.as_deref().filter(|_| level.ends_with("cgroups"));
            let fx = Fixture::start_as(Some(base), Some(config), env, user, cg)?;
            runs[k].push(worker_drain(fx, n, 1)?.0);
        }
    }
    let each = |k: usize, f: fn(&LoopRun) -> f64| runs[k].iter().map(f).collect::<Vec<_>>();
    let none_rate = median(&each(0, |r| r.rate));
    // The default is the strongest level: the packaged unit's.
    let default = levels.len() - 1;
    for (k, (level, base, _)) in levels.iter().enumerate() {
        let under = base.display();
        group(&format!("isolation = {level}, spool under {under}"));
        let rate = median(&each(k, |r| r.rate));
        info("drain rate (median of rounds)", format!("{rate:.1} jobs/s"));
        let own = ms(median(&each(k, |r| r.own_ms)));
        info("  worker's own CPU per job (median)", own);
        let rates = list(&each(k, |r| r.rate), 0);
        info("  rate, each round", format!("{rates} jobs/s"));
        let (label, ratio) = (format!("  rate of {level} / none"), rate / none_rate);
        let target = format!(">= {TARGET_ISOLATION_RATIO}");
        let ok = ratio >= TARGET_ISOLATION_RATIO;
        if k == default {
            check(&label, format!("{ratio:.3}"), &target, ok);
        } else if k > 0 {
            info(&label, format!("{ratio:.3}"));
        }
    }
    Ok(())
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
    let limit = TARGET_LATENCY_P50_MS;
    let target = format!("< {limit} ms");
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
/// job, then `n` regular ones), with environment `env`.
fn idle(env: &DaemonEnv, window: Duration, n: usize) -> Result<()> {
    group(&format!("{}, N={n}", env.backtrace()));
    let mut fx = Fixture::start(None, None, env)?;
    fx.drop_file("malformed", b"{not json")?;
    let ids = (0..n).map(|i| format!("idle-{i:05}"));
    let mut ids: HashSet<String> = ids.collect();
    ids.iter().try_for_each(|id| fx.submit(id, false))?;
    ids.insert("malformed".into());
    fx.wait(&mut ids).context("idle warm-up")?;
    let status = &fx.result("malformed")?["status"];
    info("malformed job outcome", format!("result status {status}"));
    let idle = fx.worker.idle(window)?;
    let (rss, target) = (idle.rss_kib, format!("< {} MiB", TARGET_RSS_KIB / 1024));
    let ok = rss < TARGET_RSS_KIB;
    check("VmRSS after window", mib(rss), &target, ok);
    let w = idle.wakeups;
    check("wake-ups (ctx switches, all threads)", w, "= 0", w == 0);
    Ok(())
}

// --- 5. MCP ---

/// `run_command` on `true` through the MCP server, over stdio as a client
/// speaks it: the answer's arrival after the job's `finished_at` (target:
/// 5 ms at p50), and the whole call.
fn mcp(locs: &[Location], samples: usize, env: &DaemonEnv) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let tmpfs = locs.iter().find(|l| l.label.starts_with("tmpfs"));
    let fx = Fixture::start(tmpfs.or(locs.first()).map(|l| &*l.base), Some(1), env)?;
    let mut cmd = std::process::Command::new(worker_bin());
    let (out, pipe) = (cmd.arg("--spool").arg(&fx.spool).arg("mcp"), Stdio::piped);
    let mut server = env.apply(out).stdin(pipe()).stdout(pipe()).spawn()?;
    let mut input = server.stdin.take().context("stdin")?;
    let mut reader = BufReader::new(server.stdout.take().context("stdout")?);
    let mut rpc = |id: Option<usize>, method: &str, params: Value| -> Result<Value> {
        let mut msg = json!({"jsonrpc": "2.0", "method": method, "params": params});
        id.inspect(|&i| msg["id"] = i.into());
        writeln!(input, "{msg}")?;
        let mut line = String::new();
        if id.is_some() && reader.read_line(&mut line)? == 0 {
            anyhow::bail!("the MCP server closed its output");
        }
        Ok(serde_json::from_str(&line).unwrap_or(Value::Null))
    };
    let client = json!({"name": "bench", "version": "0"});
    let init = json!({"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": client});
    rpc(Some(0), "initialize", init)?;
    rpc(None, "notifications/initialized", json!({}))?;
    let (mut after, mut whole) = (Vec::new(), Vec::new());
    for i in 1..=samples {
        thread::sleep(LATENCY_GAP);
        let (t0, args) = (Instant::now(), json!({"command": "true", "wait_secs": 30}));
        let call = json!({"name": "run_command", "arguments": args});
        let r = rpc(Some(i), "tools/call", call)?;
        let (got, sc) = (SystemTime::now(), &r["result"]["structuredContent"]);
        ensure!(sc["status"] == "succeeded", "run_command {i}: {r}");
        let finished = humantime::parse_rfc3339_weak(sc["finished_at"].as_str().unwrap_or(""))?;
        after.push(signed_ms(got, finished));
        whole.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let _ = server.kill();
    let (after, whole) = (Stats::of(after)?, Stats::of(whole)?);
    let p50 = after.p50;
    check("finished_at -> answer p50", ms(p50), "<= 5 ms", p50 <= 5.0);
    info("finished_at -> answer p99", ms(after.p99));
    info("whole call p50", ms(whole.p50));
    Ok(())
}

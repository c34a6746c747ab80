//! Maintenance (`cleanup`, what the daily timer runs): archive stale
//! pending jobs with the reason and an `expired` result, pack old logs into
//! dated `.tar.gz` archives, delete archives past their retention, remove
//! temporary files a crash left in `completed/`.
//!
//! A job is stale only when nobody could pick it up: no live worker holds
//! the spool's lock, and it has waited in `pending/` (by its modification
//! time, which its writer set and the rename into `pending/` kept) longer
//! than `stale_pending_after`. A job merely waiting its turn behind others
//! is never stale. Archiving holds the worker lock itself, so no worker
//! can start and claim a job that is being archived: each job gets one
//! result, never two.
//!
//! Jobs and members can write parts of the spool, so every step goes
//! through [`crate::spool::safe`]: directories are opened without following
//! links, files are read only when they are regular files of their own,
//! new files are created with `O_EXCL`. A planted link is refused and
//! reported as one line of the result, and the rest of the work goes on.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tracing::warn;

use crate::config::Config;
use crate::install::ensure;
use crate::logging::{CommandDigest, message_id};
use crate::spool::id::parse_job_file_name;
use crate::spool::job::{Job, JobBody};
use crate::spool::result::Submitter;
use crate::spool::safe::{Entry, SafeDir, SafeError};
use crate::spool::{JobId, JobKind, JobResult, Spool, Status, Timestamp, create_result};

/// `archive/stale/`: pending jobs that waited too long while no worker
/// served the spool.
pub fn stale_dir(spool: &Spool) -> PathBuf {
    spool.archive().join("stale")
}

/// `archive/logs/`: packed logs.
pub fn log_archive_dir(spool: &Spool) -> PathBuf {
    spool.archive().join("logs")
}

/// How long a temporary file of the result writer may sit in `completed/`
/// before it is taken for a crash's leftover: a live write takes
/// milliseconds.
pub const STALE_TEMP_AFTER: Duration = Duration::from_secs(3600);

fn open(spool: &Spool, sub: &str) -> Result<(SafeDir, SafeDir), SafeError> {
    let root = SafeDir::open(spool.root())?;
    let dir = root.dir(sub)?;
    Ok((root, dir))
}

fn older_than(t: SystemTime, age: Duration) -> bool {
    SystemTime::now().duration_since(t).unwrap_or_default() > age
}

/// How long a job file has waited: since its modification time (set when
/// it was written, kept by the rename into `pending/`), in whole seconds.
/// Zero for a time in the future.
pub fn waited(mtime: SystemTime) -> Duration {
    Duration::from_secs(
        SystemTime::now()
            .duration_since(mtime)
            .unwrap_or_default()
            .as_secs(),
    )
}

/// The id of a job file name, if it is one (`<id>.json`, `<id>.sh`).
fn job_of(e: &Entry) -> Option<(JobId, JobKind)> {
    parse_job_file_name(&e.name).ok()
}

/// The job files of `dir`: regular files with a job file name (what a
/// worker takes; anything else is the `spool.stuck` check's).
fn job_files(dir: &SafeDir) -> Result<Vec<(Entry, JobId)>, SafeError> {
    Ok(dir
        .entries()?
        .into_iter()
        .filter(|e| e.meta.is_file())
        .filter_map(|e| job_of(&e).map(|(id, _)| (e, id)))
        .collect())
}

/// The queue, as `health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Job files in `pending/`.
    pub pending: usize,
    /// Job files in `running/`.
    pub running: usize,
    /// The pending job that has waited longest, and how long.
    pub oldest: Option<(JobId, Duration)>,
}

/// Counts the job files in `pending/` and `running/`, and finds the pending
/// one that has waited longest (by modification time; ties by name).
pub fn queue(spool: &Spool) -> Result<Queue, SafeError> {
    let (root, pending) = open(spool, "pending")?;
    let running = root.dir("running")?;
    let waiting = job_files(&pending)?;
    let oldest = waiting
        .iter()
        .min_by_key(|(e, _)| e.meta.mtime)
        .map(|(e, id)| (id.clone(), waited(e.meta.mtime)));
    Ok(Queue {
        pending: waiting.len(),
        running: job_files(&running)?.len(),
        oldest,
    })
}

/// Pending items that waited longer than `older`: job files, and links
/// under a job file name (refused when archived, and said so).
fn stale_entries(pending: &SafeDir, older: Duration) -> Result<Vec<Entry>, SafeError> {
    Ok(pending
        .entries()?
        .into_iter()
        .filter(|e| (e.meta.is_file() || e.meta.is_symlink()) && job_of(e).is_some())
        .filter(|e| older_than(e.meta.mtime, older))
        .collect())
}

/// Jobs in `pending/` that nobody could pick up: no live worker holds the
/// spool's lock, and they have waited longer than `older_than`. Empty while
/// a worker serves the spool, however long its queue.
pub fn stale_pending(spool: &Spool, older_than: Duration) -> anyhow::Result<Vec<PathBuf>> {
    if ensure::serving_worker(spool.root())?.is_some() {
        return Ok(Vec::new());
    }
    let (_root, pending) = open(spool, "pending").context("opening pending/")?;
    Ok(stale_entries(&pending, older_than)
        .context("listing pending/")?
        .into_iter()
        .map(|e| pending.join(e.name))
        .collect())
}

/// Why root (or anyone) leaves an item alone: a link where a file of its
/// own was expected.
fn planted(e: &Entry) -> Option<String> {
    if e.meta.is_symlink() {
        Some("a symbolic link".into())
    } else if !e.meta.is_dir() && e.meta.nlink > 1 {
        Some(format!("a file with {} hard links", e.meta.nlink))
    } else {
        None
    }
}

/// What [`archive_stale`] did (or would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Archived {
    /// How many jobs were archived (each with its `expired` result).
    pub archived: usize,
    /// One line per job archived, left or refused.
    pub lines: Vec<String>,
}

/// A duration in whole seconds, for people.
fn shown(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

/// Archives the stale pending jobs: each gets an `expired` result in
/// `completed/` (never replacing one there), then moves to `archive/stale/`
/// with a `.reason` file beside it. Nothing is stale, and nothing is
/// archived, while a worker holds the spool's lock; while archiving, this
/// holds that lock, so no worker starts meanwhile.
///
/// A job whose id already has a result (an earlier run of a reused id) is
/// left in `pending/`, and said so: it runs when a worker serves the spool
/// again. Links are refused and said so.
pub fn archive_stale(
    spool: &Spool,
    older_than: Duration,
    dry_run: bool,
) -> anyhow::Result<Archived> {
    let mut done = Archived::default();
    let (root, pending) = open(spool, "pending").context("opening pending/")?;
    let waiting = stale_entries(&pending, older_than).context("listing pending/")?;
    if waiting.is_empty() {
        return Ok(done);
    }
    let name_of = |e: &Entry| e.name.to_string_lossy().into_owned();
    let served = |pid: Option<i32>| match pid {
        Some(pid) if pid > 0 => format!("a worker (pid {pid}) serves the spool"),
        _ => "a worker serves the spool".into(),
    };
    if dry_run {
        let worker = ensure::serving_worker(spool.root())?;
        let completed = root.dir("completed").ok();
        let taken = |id: &JobId| {
            completed
                .as_ref()
                .and_then(|c| c.lstat(format!("{id}.json")).ok().flatten())
                .is_some()
        };
        for e in &waiting {
            let name = name_of(e);
            let age = shown(waited(e.meta.mtime));
            done.lines.push(match (worker, planted(e), job_of(e)) {
                (Some(pid), _, _) => format!(
                    "would leave pending/{name} (waited {age}): {}, so it waits its turn",
                    served(Some(pid))
                ),
                (None, Some(what), _) => {
                    format!("would refuse pending/{name}: it is {what}, left where it is")
                }
                (None, None, Some((id, _))) if taken(&id) => format!(
                    "would leave pending/{name} (waited {age}): completed/{id}.json exists and is never replaced"
                ),
                (None, None, _) => format!(
                    "would archive pending/{name} (waited {age} while no worker served the spool) with an expired result"
                ),
            });
        }
        return Ok(done);
    }
    let Some(_lock) = ensure::hold_idle_spool(spool.root())? else {
        let worker = ensure::serving_worker(spool.root()).ok().flatten();
        for e in &waiting {
            done.lines.push(format!(
                "left pending/{} (waited {}): {}, so it waits its turn",
                name_of(e),
                shown(waited(e.meta.mtime)),
                served(worker)
            ));
        }
        return Ok(done);
    };
    // Listed again under the lock: a worker that held it until now may
    // have taken some.
    let stale = stale_entries(&pending, older_than).context("listing pending/")?;
    if stale.is_empty() {
        return Ok(done);
    }
    let archive = root.dir("archive").context("opening archive/")?;
    let (to, _) = archive
        .ensure_dir("stale", 0o2750)
        .context("opening archive/stale/")?;
    let completed = root.dir("completed").context("opening completed/")?;
    let stamp = Timestamp::now().file_stamp();
    for e in &stale {
        let name = name_of(e);
        if let Some(what) = planted(e) {
            done.lines.push(format!(
                "refused pending/{name}: it is {what}, left where it is"
            ));
            continue;
        }
        let (archived, line) = expire(&pending, e, &to, &completed, older_than, &stamp)
            .with_context(|| format!("archiving pending/{name}"))?;
        done.archived += usize::from(archived);
        done.lines.push(line);
    }
    Ok(done)
}

/// The job file `e` of `pending/` as stale archiving finds it.
struct StaleJob {
    id: JobId,
    submitter: Submitter,
    attempt: u32,
    queued: SystemTime,
    command: Option<CommandDigest>,
}

/// Reads the job file `e` (a regular file of its own, at most
/// [`crate::config::MAX_JOB_BYTES`] of it): its id, owner, attempt and
/// command. `None` when it is gone.
fn read_stale(pending: &SafeDir, e: &Entry) -> Result<Option<StaleJob>, SafeError> {
    let Some((id, kind)) = job_of(e) else {
        return Ok(None);
    };
    let file = match pending.open_file(&e.name) {
        Ok(f) => f,
        Err(err) if err.is_not_found() => return Ok(None),
        Err(err) => return Err(err),
    };
    let io_err = |source| SafeError::Io {
        what: "reading",
        path: pending.join(&e.name),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    let mut bytes = Vec::new();
    (&file)
        .take(crate::config::MAX_JOB_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let job = Job::parse(kind, &bytes).ok();
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid()))
        .ok()
        .flatten()
        .map(|u| u.name);
    Ok(Some(StaleJob {
        id,
        submitter: Submitter {
            uid: meta.uid(),
            name,
        },
        attempt: job.as_ref().map_or(1, |j| j.attempt),
        queued: meta.modified().map_err(io_err)?,
        command: job.map(|j| match &j.body {
            JobBody::Command(c) => CommandDigest::of(c.as_bytes()),
            JobBody::Script => CommandDigest::of(&bytes),
        }),
    }))
}

/// Gives the stale job `e` its `expired` result, then moves it into `to`
/// (`archive/stale/`) with its `.reason`. Returns whether it was archived,
/// and the line for the report.
///
/// The result comes first: should the move fail, the job is still queued
/// and the result is taken back, so a job is never archived without one.
fn expire(
    pending: &SafeDir,
    e: &Entry,
    to: &SafeDir,
    completed: &SafeDir,
    older_than: Duration,
    stamp: &str,
) -> anyhow::Result<(bool, String)> {
    let name = e.name.to_string_lossy();
    let job = match read_stale(pending, e) {
        Ok(Some(job)) => job,
        Ok(None) => return Ok((false, format!("pending/{name} is gone (withdrawn)"))),
        // Replaced since it was listed.
        Err(err @ (SafeError::Planted { .. } | SafeError::WrongKind { .. })) => {
            return Ok((false, format!("refused pending/{name}: {err}")));
        }
        Err(err) => return Err(err.into()),
    };
    let now = Timestamp::now();
    let why = format!(
        "expired, never run: it waited {} in pending/ (since {}) while no worker served the spool, \
         longer than stale_pending_after ({}); archived into archive/stale/ at {now}; submit it again to run it",
        shown(now.since(Timestamp(job.queued))),
        humantime::format_rfc3339_seconds(job.queued),
        humantime::format_duration(older_than),
    );
    let result = JobResult::not_run(
        &job.id,
        Status::Expired,
        why.clone(),
        job.attempt,
        Some(job.submitter.clone()),
    );
    let result_name = format!("{}.json", job.id);
    let Some(ino) = create_result(completed, &result)
        .with_context(|| format!("writing completed/{result_name}"))?
    else {
        return Ok((
            false,
            format!(
                "left pending/{name}: completed/{result_name} exists (an earlier run's result, never replaced), \
                 so it runs when a worker serves the spool again"
            ),
        ));
    };
    let dest = match pending.move_into(&e.name, to, stamp) {
        Ok(dest) => dest,
        Err(err) => {
            // Still queued, or taken by someone else: the result is not
            // its to give. Only the one written here goes.
            let ours = completed
                .open_file(&result_name)
                .and_then(|f| {
                    f.metadata().map_err(|source| SafeError::Io {
                        what: "reading",
                        path: completed.join(&result_name),
                        source,
                    })
                })
                .is_ok_and(|m| m.ino() == ino);
            if ours {
                let _ = completed.remove_file(&result_name);
            }
            if err.is_not_found() {
                return Ok((
                    false,
                    format!("pending/{name} left pending/ while it was being archived (withdrawn)"),
                ));
            }
            return Err(err.into());
        }
    };
    let mut reason_name = dest.clone();
    reason_name.push(".reason");
    let mut f = to
        .create_new(&reason_name, 0o640)
        .context("writing the reason")?;
    f.write_all(format!("{why}\n").as_bytes())
        .context("writing the reason")?;
    let submitter = &job.submitter;
    warn!(
        message_id = message_id::JOB_FINISHED,
        cmd_id = %job.id,
        cmd_status = %Status::Expired,
        exit_code = "-",
        duration_ms = 0,
        submitter_uid = submitter.uid,
        submitter = submitter.name.as_deref(),
        cmd = job.command.as_ref().map(|c| c.excerpt.as_str()),
        cmd_sha256 = job.command.as_ref().map(|c| c.sha256.as_str()),
        "job {} finished: {why}",
        job.id
    );
    Ok((
        true,
        format!(
            "archived pending/{name} as archive/stale/{}; completed/{result_name} says expired",
            dest.to_string_lossy()
        ),
    ))
}

/// Old logs by the day their run started.
type ByDay = BTreeMap<String, Vec<OldLog>>;
/// The open shard directories of `logs/`, by name.
type Shards = BTreeMap<OsString, SafeDir>;
/// A named step of [`cleanup`].
type Step<'a> = (&'a str, &'a dyn Fn() -> anyhow::Result<Vec<String>>);

/// One old log: its shard and its name there.
struct OldLog {
    shard: OsString,
    name: OsString,
}

/// Logs (`logs/<shard>/<id>@<stamp>.log`) whose run started more than
/// `days` ago, grouped by the UTC day they started, with the open shard
/// directories. Links in place of shards are reported in `refused`.
fn old_logs(
    logs: &SafeDir,
    days: u32,
    refused: &mut Vec<String>,
) -> Result<(ByDay, Shards), SafeError> {
    let cutoff = SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
    let mut by_day: BTreeMap<String, Vec<OldLog>> = BTreeMap::new();
    let mut shards = BTreeMap::new();
    for shard in logs.entries()? {
        if shard.meta.is_symlink() {
            refused.push(format!(
                "refused logs/{}: it is a symbolic link, left where it is",
                shard.name.to_string_lossy()
            ));
            continue;
        }
        if !shard.meta.is_dir() {
            continue;
        }
        let dir = match logs.dir(&shard.name) {
            Ok(d) => d,
            Err(e) if e.is_planted() => {
                refused.push(e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        for log in dir.entries()? {
            let name = log.name.to_string_lossy();
            let Some((_, started)) = crate::spool::log_name_parts(&name) else {
                continue;
            };
            if started.0 < cutoff {
                by_day
                    .entry(started.file_stamp()[..8].to_owned())
                    .or_default()
                    .push(OldLog {
                        shard: shard.name.clone(),
                        name: log.name.clone(),
                    });
            }
        }
        shards.insert(shard.name, dir);
    }
    Ok((by_day, shards))
}

/// Packs logs older than `days` into `archive/logs/logs-<YYYYMMDD>.tar.gz`
/// (one archive per day the runs started; members keep their
/// `logs/<shard>/<id>@<stamp>.log` path), then deletes the packed files.
/// A log that is a link is left out and reported.
pub fn pack_old_logs(spool: &Spool, days: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let (root, logs) = open(spool, "logs").context("opening logs/")?;
    let (by_day, shards) = old_logs(&logs, days, &mut done).context("listing logs/")?;
    if by_day.is_empty() {
        return Ok(done);
    }
    let archive = root.dir("archive").context("opening archive/")?;
    let out_dir = if dry_run {
        None
    } else {
        Some(
            archive
                .ensure_dir("logs", 0o2750)
                .context("opening archive/logs/")?
                .0,
        )
    };
    for (day, files) in by_day {
        let taken = |name: &str| match &out_dir {
            Some(d) => d.lstat(name).map(|m| m.is_some()).unwrap_or(true),
            None => archive
                .dir("logs")
                .ok()
                .and_then(|d| d.lstat(name).ok().flatten())
                .is_some(),
        };
        let mut target = format!("logs-{day}.tar.gz");
        let mut n = 1;
        while taken(&target) {
            target = format!("logs-{day}.{n}.tar.gz");
            n += 1;
        }
        let Some(out_dir) = &out_dir else {
            done.push(format!(
                "would pack {} log(s) from {day} into archive/logs/{target}",
                files.len()
            ));
            continue;
        };
        let tmp = format!(".{target}.{}.tmp", std::process::id());
        let _ = out_dir.remove_file(&tmp);
        let out = out_dir
            .create_new(&tmp, 0o640)
            .with_context(|| format!("creating archive/logs/{tmp}"))?;
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut packed = Vec::new();
        for f in &files {
            let shard = &shards[&f.shard];
            let rel = Path::new("logs").join(&f.shard).join(&f.name);
            let mut file = match shard.open_file(&f.name) {
                Ok(file) => file,
                Err(e) if e.is_planted() => {
                    done.push(format!("refused {}: {e}", rel.display()));
                    continue;
                }
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", rel.display()));
                }
            };
            let meta = file
                .metadata()
                .with_context(|| format!("reading {}", rel.display()))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata(&meta);
            tar.append_data(&mut header, &rel, &mut file)
                .with_context(|| format!("adding {}", rel.display()))?;
            packed.push(f);
        }
        let gz = tar.into_inner().context("finishing the tar stream")?;
        let out = gz.finish().context("finishing the gzip stream")?;
        out.sync_all().context("syncing the archive")?;
        drop(out);
        if packed.is_empty() {
            let _ = out_dir.remove_file(&tmp);
            continue;
        }
        if !out_dir
            .rename_noreplace(&tmp, out_dir, &target)
            .with_context(|| format!("renaming into archive/logs/{target}"))?
        {
            let _ = out_dir.remove_file(&tmp);
            anyhow::bail!("archive/logs/{target} appeared while it was being written");
        }
        for f in &packed {
            let shard = &shards[&f.shard];
            let _ = shard.remove_file(&f.name);
        }
        for name in packed.iter().map(|f| &f.shard) {
            // Empty shard directories go too (the worker makes them again
            // when needed); a busy one stays.
            let _ = logs.remove_dir(name);
        }
        done.push(format!(
            "packed {} log(s) from {day} into archive/logs/{target}",
            packed.len()
        ));
    }
    Ok(done)
}

/// Deletes archives (anything under `archive/`) last changed more than
/// `days` ago. Links are left and reported.
pub fn prune_archives(spool: &Spool, days: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let age = Duration::from_secs(u64::from(days) * 86_400);
    let mut done = Vec::new();
    let (_root, archive) = open(spool, "archive").context("opening archive/")?;
    let mut stack = vec![(archive, PathBuf::from("archive"))];
    while let Some((dir, at)) = stack.pop() {
        let entries = dir
            .entries()
            .with_context(|| format!("listing {}", at.display()))?;
        for e in entries {
            let shown = at.join(&e.name);
            if e.meta.is_dir() {
                match dir.dir(&e.name) {
                    Ok(sub) => stack.push((sub, shown)),
                    Err(err) if err.is_planted() => done.push(format!("refused {err}")),
                    Err(_) => {}
                }
                continue;
            }
            if e.meta.is_symlink() {
                // Nothing here is ever a link: whoever made it is told,
                // old or new.
                done.push(format!(
                    "refused {}: it is a symbolic link, left where it is",
                    shown.display()
                ));
                continue;
            }
            if !older_than(e.meta.mtime, age) {
                continue;
            }
            if let Some(what) = planted(&e) {
                done.push(format!(
                    "refused {}: it is {what}, left where it is",
                    shown.display()
                ));
                continue;
            }
            if dry_run {
                done.push(format!(
                    "would delete {} (older than {days} days)",
                    shown.display()
                ));
            } else {
                dir.remove_file(&e.name)
                    .with_context(|| format!("deleting {}", shown.display()))?;
                done.push(format!(
                    "deleted {} (older than {days} days)",
                    shown.display()
                ));
            }
        }
    }
    done.sort();
    Ok(done)
}

/// Removes the result writer's temporary files (`completed/.<id>.json.<pid>.<n>.tmp`)
/// older than [`STALE_TEMP_AFTER`]: a crash between the write and the
/// rename leaves them.
pub fn remove_stale_temps(spool: &Spool, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let (_root, completed) = open(spool, "completed").context("opening completed/")?;
    for e in completed.entries().context("listing completed/")? {
        let name = e.name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp"))
            || e.meta.is_dir()
            || !older_than(e.meta.mtime, STALE_TEMP_AFTER)
        {
            continue;
        }
        if dry_run {
            done.push(format!(
                "would delete completed/{name} (a crash's leftover)"
            ));
        } else {
            // Only the name goes, link or not: nothing is followed.
            completed
                .remove_file(&e.name)
                .with_context(|| format!("deleting completed/{name}"))?;
            done.push(format!("deleted completed/{name} (a crash's leftover)"));
        }
    }
    Ok(done)
}

/// What [`cleanup`] did, and the steps that could not be done.
#[derive(Debug, Default)]
pub struct Done {
    /// One line per action (or refusal of a planted link).
    pub actions: Vec<String>,
    /// One line per step that failed; the other steps still ran.
    pub failed: Vec<String>,
}

/// The whole cleanup. Each step runs even when another failed (a link in
/// place of `archive/` stops the archiving, not the removal of temporary
/// files).
pub fn cleanup(spool: &Spool, config: &Config, dry_run: bool) -> Done {
    let mut done = Done::default();
    let steps: [Step; 4] = [
        ("archiving stale pending jobs", &|| {
            archive_stale(spool, config.stale_pending_after.get(), dry_run).map(|a| a.lines)
        }),
        ("packing old logs", &|| {
            pack_old_logs(spool, config.log_retention_days.get(), dry_run)
        }),
        ("deleting old archives", &|| {
            prune_archives(spool, config.archive_retention_days.get(), dry_run)
        }),
        ("removing stale temporary results", &|| {
            remove_stale_temps(spool, dry_run)
        }),
    ];
    for (what, step) in steps {
        match step() {
            Ok(lines) => done.actions.extend(lines),
            Err(e) => done
                .failed
                .push(format!("{what}: {}", crate::error::chain(e.as_ref()))),
        }
    }
    done
}

/// Lists the members of a `.tar.gz` archive (for checks and tests).
pub fn list_archive(path: &Path) -> anyhow::Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut names = Vec::new();
    for entry in tar.entries()? {
        names.push(entry?.path()?.to_string_lossy().into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn spool() -> (tempfile::TempDir, Spool) {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::new(d.path().join("s"));
        s.ensure_layout().unwrap();
        (d, s)
    }

    #[test]
    fn old_logs_are_packed_by_day_and_list_back() {
        let (_d, s) = spool();
        let old = Timestamp(SystemTime::now() - Duration::from_secs(40 * 86_400));
        let new = Timestamp::now();
        let log = |id: &str, t| s.log_path(&crate::spool::JobId::new(id).unwrap(), t);
        for (id, t) in [("a", old), ("b", old), ("c", new)] {
            fs::create_dir_all(log(id, t).parent().unwrap()).unwrap();
            fs::write(log(id, t), format!("output of {id}\n")).unwrap();
        }
        let dry = pack_old_logs(&s, 30, true).unwrap();
        assert_eq!(dry.len(), 1, "{dry:?}");
        assert!(log("a", old).exists(), "a dry run changes nothing");
        let done = pack_old_logs(&s, 30, false).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        let archives: Vec<_> = fs::read_dir(log_archive_dir(&s))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(archives.len(), 1);
        let mut names = list_archive(&archives[0]).unwrap();
        names.sort();
        let day = &old.file_stamp()[..8];
        assert!(
            archives[0]
                .to_string_lossy()
                .contains(&format!("logs-{day}.tar.gz"))
        );
        let mut want = [s.relative(&log("a", old)), s.relative(&log("b", old))];
        want.sort();
        assert_eq!(names, want);
        assert!(!log("a", old).exists() && log("c", new).exists());
    }

    /// Sets the modification time of `path` (not following a link there)
    /// to `secs` ago; its change time becomes now.
    fn wait_secs(path: &Path, secs: u64) {
        let t = (SystemTime::now() - Duration::from_secs(secs))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let ts = rustix::fs::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: 0,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &rustix::fs::Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    const HALF_HOUR: Duration = Duration::from_secs(1800);
    const TWO_HOURS: u64 = 7200;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn fresh_pending_files_are_not_stale() {
        let (_d, s) = spool();
        fs::write(s.pending().join("x.json"), "{\"command\": \"true\"}").unwrap();
        assert!(stale_pending(&s, HALF_HOUR).unwrap().is_empty());
        let done = archive_stale(&s, HALF_HOUR, false).unwrap();
        assert_eq!(done, Archived::default());
        assert_eq!(names(&s.pending()), ["x.json"]);
        assert!(!worker_lock(&s).exists(), "no lock taken for nothing");
    }

    fn worker_lock(s: &Spool) -> PathBuf {
        crate::spool::serving::serving_lock_path(s.root())
    }

    /// The age is the modification time's, which `touch -d` sets (and a
    /// writer's rename keeps), not the change time's, which nobody can set.
    #[test]
    fn age_is_the_modification_time() {
        let (_d, s) = spool();
        let old = s.pending().join("old.json");
        fs::write(&old, "{\"command\": \"true\"}").unwrap();
        fs::write(s.pending().join("new.sh"), "true\n").unwrap();
        // Junk is the stuck check's: not a job, never stale, not counted.
        fs::create_dir(s.pending().join("dir.json")).unwrap();
        fs::write(s.pending().join(".hidden.json"), "{}").unwrap();
        wait_secs(&s.pending().join(".hidden.json"), TWO_HOURS);
        assert!(stale_pending(&s, HALF_HOUR).unwrap().is_empty());
        wait_secs(&old, TWO_HOURS);
        let meta = fs::metadata(&old).unwrap();
        assert!(
            meta.ctime() as u64 + 60
                > SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            "the change time is now"
        );
        assert_eq!(stale_pending(&s, HALF_HOUR).unwrap(), [old]);
        let q = queue(&s).unwrap();
        assert_eq!((q.pending, q.running), (2, 0), "{q:?}");
        let (id, age) = q.oldest.unwrap();
        assert_eq!(id.as_str(), "old");
        assert!(
            (TWO_HOURS..TWO_HOURS + 60).contains(&age.as_secs()),
            "{age:?}"
        );
        fs::rename(s.pending().join("new.sh"), s.running().join("new.sh")).unwrap();
        assert_eq!(queue(&s).unwrap().running, 1);
    }

    #[test]
    fn a_job_waiting_while_a_worker_holds_the_spool_is_never_archived() {
        let (_d, s) = spool();
        let job = s.pending().join("second.json");
        fs::write(&job, "{\"command\": \"true\"}").unwrap();
        wait_secs(&job, TWO_HOURS);
        let worker = crate::spool::serving::Serving::take(s.root(), Duration::ZERO).unwrap();
        assert!(stale_pending(&s, HALF_HOUR).unwrap().is_empty());
        let dry = archive_stale(&s, HALF_HOUR, true).unwrap();
        let pid = std::process::id();
        assert_eq!(
            dry.lines,
            [format!(
                "would leave pending/second.json (waited 2h): a worker (pid {pid}) serves the spool, so it waits its turn"
            )]
        );
        let done = archive_stale(&s, HALF_HOUR, false).unwrap();
        assert_eq!(done.archived, 0);
        assert_eq!(
            done.lines,
            [format!(
                "left pending/second.json (waited 2h): a worker (pid {pid}) serves the spool, so it waits its turn"
            )]
        );
        let done = cleanup(&s, &Config::default(), false);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        assert_eq!(names(&s.pending()), ["second.json"]);
        assert!(names(&s.completed()).is_empty());
        assert!(names(&stale_dir(&s)).is_empty());
        // Once no worker serves the spool, it is stale.
        drop(worker);
        assert_eq!(stale_pending(&s, HALF_HOUR).unwrap(), [job]);
        assert_eq!(archive_stale(&s, HALF_HOUR, false).unwrap().archived, 1);
    }

    #[test]
    fn an_archived_job_gets_one_expired_result_with_its_submitter_and_reason() {
        let (_d, s) = spool();
        let json = s.pending().join("late.json");
        let script = s.pending().join("script.sh");
        fs::write(&json, "{\"command\": \"echo hi\", \"attempt\": 2}").unwrap();
        fs::write(&script, "echo hi\n").unwrap();
        wait_secs(&json, TWO_HOURS);
        wait_secs(&script, TWO_HOURS);
        let dry = archive_stale(&s, HALF_HOUR, true).unwrap();
        assert_eq!(dry.lines.len(), 2, "{dry:?}");
        assert!(
            dry.lines[0].starts_with("would archive pending/late.json (waited 2h"),
            "{dry:?}"
        );
        assert!(
            names(&s.completed()).is_empty(),
            "a dry run changes nothing"
        );
        assert!(!worker_lock(&s).exists(), "a dry run creates nothing");

        let before = SystemTime::now() - Duration::from_secs(1);
        let done = archive_stale(&s, HALF_HOUR, false).unwrap();
        assert_eq!(done.archived, 2, "{done:?}");
        assert!(names(&s.pending()).is_empty());
        let r = s
            .read_result(&JobId::new("late").unwrap())
            .unwrap()
            .expect("a result");
        assert_eq!(r.status, Status::Expired);
        assert_eq!(r.shell_exit_code(), 75);
        assert_eq!(
            (r.exit_code, r.signal.as_deref(), r.log.as_deref()),
            (None, None, None)
        );
        assert_eq!(
            (r.duration_ms, r.output_truncated, r.attempt),
            (0, false, 2)
        );
        assert_eq!(r.started_at, r.finished_at);
        assert!(r.started_at.0 >= before, "started_at is the archiving time");
        let me = nix::unistd::geteuid();
        let name = nix::unistd::User::from_uid(me).unwrap().map(|u| u.name);
        assert_eq!(
            r.submitted_by,
            Some(Submitter {
                uid: me.as_raw(),
                name
            })
        );
        let error = r.error.clone().unwrap();
        for part in [
            "never run",
            "waited 2h",
            "while no worker served the spool",
            "stale_pending_after (30m)",
            "archived into archive/stale/ at ",
        ] {
            assert!(error.contains(part), "{part:?} in {error}");
        }
        let sh = s
            .read_result(&JobId::new("script").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((sh.status, sh.attempt), (Status::Expired, 1));

        let kept = names(&stale_dir(&s));
        assert_eq!(kept.len(), 4, "each file and its reason: {kept:?}");
        let reason = kept
            .iter()
            .find(|n| n.starts_with("late.json.") && n.ends_with(".reason"))
            .unwrap();
        assert_eq!(
            fs::read_to_string(stale_dir(&s).join(reason)).unwrap(),
            format!("{error}\n")
        );
        // Exactly one result each, no temporary file, and the lock let go.
        assert_eq!(names(&s.completed()), ["late.json", "script.json"]);
        assert_eq!(
            archive_stale(&s, HALF_HOUR, false).unwrap(),
            Archived::default()
        );
        assert_eq!(
            s.read_result(&JobId::new("late").unwrap())
                .unwrap()
                .unwrap(),
            r
        );
        assert!(ensure::hold_idle_spool(s.root()).unwrap().is_some());
    }

    #[test]
    fn an_existing_result_is_never_overwritten_nor_a_link_there_followed() {
        let (d, s) = spool();
        let t = Timestamp(Timestamp::now().0 - Duration::from_secs(86_400));
        let earlier = JobResult {
            id: "again".into(),
            status: Status::Succeeded,
            exit_code: Some(0),
            signal: None,
            started_at: t,
            finished_at: t,
            duration_ms: 5,
            log: None,
            output_truncated: false,
            error: None,
            attempt: 1,
            submitted_by: None,
            usage: crate::spool::Usage::default(),
            limits: None,
            submitted_via: None,
            cancelled_by: None,
        };
        s.write_result(&earlier).unwrap();
        let secret = d.path().join("secret");
        fs::write(&secret, "keep").unwrap();
        symlink(&secret, s.completed().join("linked.json")).unwrap();
        for id in ["again", "linked"] {
            let job = s.pending().join(format!("{id}.json"));
            fs::write(&job, "{\"command\": \"true\"}").unwrap();
            wait_secs(&job, TWO_HOURS);
        }
        let done = archive_stale(&s, HALF_HOUR, false).unwrap();
        assert_eq!(done.archived, 0, "{done:?}");
        assert!(
            done.lines[0].starts_with("left pending/again.json: completed/again.json exists"),
            "{done:?}"
        );
        assert!(
            done.lines[1].starts_with("left pending/linked.json"),
            "{done:?}"
        );
        assert_eq!(
            s.read_result(&JobId::new("again").unwrap())
                .unwrap()
                .unwrap(),
            earlier
        );
        assert_eq!(fs::read_to_string(&secret).unwrap(), "keep");
        assert!(
            fs::symlink_metadata(s.completed().join("linked.json"))
                .unwrap()
                .is_symlink()
        );
        // Never discarded: still queued, and no temporary file left.
        assert_eq!(names(&s.pending()), ["again.json", "linked.json"]);
        assert_eq!(names(&s.completed()), ["again.json", "linked.json"]);
        assert!(names(&stale_dir(&s)).is_empty());
    }

    #[test]
    fn linked_pending_jobs_are_refused_and_get_no_result() {
        let (d, s) = spool();
        let secret = d.path().join("secret");
        fs::write(&secret, "{\"command\": \"true\"}").unwrap();
        symlink(&secret, s.pending().join("soft.json")).unwrap();
        fs::hard_link(&secret, s.pending().join("hard.json")).unwrap();
        wait_secs(&s.pending().join("soft.json"), TWO_HOURS);
        wait_secs(&secret, TWO_HOURS);
        let before = fs::metadata(&secret).unwrap();
        let done = archive_stale(&s, HALF_HOUR, false).unwrap();
        assert_eq!(done.archived, 0, "{done:?}");
        assert_eq!(
            done.lines,
            [
                "refused pending/hard.json: it is a file with 2 hard links, left where it is",
                "refused pending/soft.json: it is a symbolic link, left where it is",
            ]
        );
        assert!(names(&s.completed()).is_empty());
        assert_eq!(names(&s.pending()), ["hard.json", "soft.json"]);
        let after = fs::metadata(&secret).unwrap();
        assert_eq!((before.ino(), before.mtime()), (after.ino(), after.mtime()));
    }

    fn age(path: &Path, days: u64) {
        let t = SystemTime::now() - Duration::from_secs(days * 86_400);
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
    }

    #[test]
    fn linked_directories_are_refused_and_their_targets_untouched() {
        let (d, s) = spool();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let victim = outside.join("victim");
        fs::write(&victim, "precious").unwrap();
        age(&victim, 400);
        let before = fs::metadata(&victim).unwrap();
        // archive/ and pending/ replaced by links to the outside.
        fs::rename(s.archive(), d.path().join("archive.old")).unwrap();
        symlink(&outside, s.archive()).unwrap();
        let err = prune_archives(&s, 1, false).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        fs::rename(s.pending(), d.path().join("pending.old")).unwrap();
        symlink(&outside, s.pending()).unwrap();
        let err = archive_stale(&s, Duration::ZERO, false).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        let after = fs::metadata(&victim).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(
            (before.ino(), before.mode(), before.uid()),
            (after.ino(), after.mode(), after.uid())
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn linked_files_are_reported_and_left() {
        let (d, s) = spool();
        let secret = d.path().join("secret");
        fs::write(&secret, "not for the archive").unwrap();
        // A stale pending link, a planted .reason name, an old linked log,
        // and a hard-linked archive file.
        symlink(&secret, s.pending().join("x.json")).unwrap();
        let old = Timestamp(SystemTime::now() - Duration::from_secs(40 * 86_400));
        let log = s.log_path(&crate::spool::JobId::new("a").unwrap(), old);
        fs::create_dir_all(log.parent().unwrap()).unwrap();
        symlink(&secret, &log).unwrap();
        fs::create_dir_all(s.archive().join("rejected")).unwrap();
        let mine = s.archive().join("rejected").join("old");
        fs::write(&mine, "x").unwrap();
        age(&mine, 400);
        fs::hard_link(&mine, d.path().join("second-name")).unwrap();
        let done = cleanup(&s, &Config::default(), false);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        let text = done.actions.join("\n");
        assert!(text.contains("refused logs/"), "{text}");
        assert!(text.contains("refused archive/rejected/old"), "{text}");
        assert!(fs::symlink_metadata(&log).unwrap().is_symlink(), "left");
        assert!(mine.exists(), "a hard-linked file is left");
        assert_eq!(fs::read_to_string(&secret).unwrap(), "not for the archive");
        assert!(
            !fs::read_dir(s.archive())
                .unwrap()
                .flatten()
                .any(|e| e.file_name() == "logs" && fs::read_dir(e.path()).unwrap().count() > 0),
            "no archive of the link's target"
        );
    }

    #[test]
    fn stale_result_temps_go() {
        let (_d, s) = spool();
        let old = s.completed().join(".x.json.1.0.tmp");
        let fresh = s.completed().join(".y.json.1.1.tmp");
        fs::write(&old, "").unwrap();
        fs::write(&fresh, "").unwrap();
        age(&old, 1);
        let done = remove_stale_temps(&s, false).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(!old.exists() && fresh.exists());
    }
}

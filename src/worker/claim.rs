//! Claiming one job file and starting its process, on a slot thread.
//!
//! A slot takes the next file (FIFO) and claims it here: inspect, lock,
//! read, create the log, rename into `running/`, and spawn (which returns
//! once the child has exec'd). All of it is a handful of system calls, made
//! by the thread that will wait for the job, so no other thread is woken
//! to start it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::exec;
use super::spawn::Spawner;
use crate::config::Config;
use crate::logging::message_id;
use crate::spool::job::{Job, JobError};
use crate::spool::{JobId, JobKind, Spool, Timestamp, move_into, open_job_file, rename_noreplace};

/// What a claim needs from the worker; rebuilt when the configuration is
/// reloaded, and shared by the slots.
pub(super) struct ClaimCtx {
    pub spool: Spool,
    pub shell: PathBuf,
    pub default_timeout: Duration,
    pub kill_grace: Duration,
    pub log_max_bytes: u64,
    pub max_job_bytes: u64,
    pub submitters: Submitters,
    /// Starts job processes (environment and `/dev/null` prepared once).
    pub spawner: Spawner,
}

impl ClaimCtx {
    pub fn new(spool: Spool, config: &Config) -> Self {
        ClaimCtx {
            spool,
            shell: config.shell.clone(),
            default_timeout: config.default_timeout.get(),
            kill_grace: config.kill_grace.get(),
            log_max_bytes: config.log_max_bytes.get(),
            max_job_bytes: config.max_job_bytes.get(),
            submitters: Submitters::new(config.submit_group.as_deref()),
            spawner: Spawner::new(),
        }
    }
}

/// A job whose process was started (or failed to start: `spawned` holds
/// the error, and the run ends as `failed`).
pub(super) struct Started {
    pub run: exec::Run,
    pub spawned: io::Result<exec::Spawned>,
    /// The lock on the job file, held until it has left `running/`.
    pub lock: File,
    /// When the spawn began (for the overdue check).
    pub began: Instant,
}

/// What became of a claim.
pub(super) enum Claim {
    /// Claimed, and its process started.
    Started(Box<Started>),
    /// Bad input, moved to `archive/rejected/`; it needs a `rejected` result.
    /// Where it could not be moved out of `pending/` (a member's directory,
    /// say), `stuck` is where it was left, for the rescans to pass over.
    Rejected {
        id: JobId,
        reason: String,
        stuck: Option<PathBuf>,
    },
    /// Gone from `pending/` before it could be read (queued at `since`).
    Vanished {
        id: JobId,
        name: OsString,
        since: Timestamp,
    },
    /// The spool could not be used (a full disk, an unreadable `pending/`):
    /// the file stays queued, and claiming pauses until a retry.
    Retry {
        id: JobId,
        name: OsString,
        since: Timestamp,
    },
    /// Nothing to do: another worker has it, or the worker is stopping.
    Dropped { id: JobId },
    /// Found by a rescan, not by an event, and not a valid job yet while its
    /// writer may still have it open (changed within [`SETTLE`]): left in
    /// `pending/` until the writer closes it (`IN_CLOSE_WRITE` queues it
    /// again), or a later rescan finds it unchanged.
    NotYet { id: JobId },
}

/// Claims `pending/<name>` and starts it.
///
/// `complete`: the file was queued by an event that says it is whole (its
/// writer closed it, or it was renamed in), not found by a rescan.
pub(super) fn claim(
    ctx: &ClaimCtx,
    name: OsString,
    id: JobId,
    kind: JobKind,
    since: Timestamp,
    complete: bool,
) -> Claim {
    let path = ctx.spool.pending().join(&name);
    // Opened without following a symlink and without blocking on a FIFO;
    // the type is checked on the open file, so nothing can swap it between
    // the check and the read.
    let mut file = match open_job_file(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Claim::Vanished { id, name, since };
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return reject_type(ctx, id, &path, "a symbolic link");
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
            return reject_type(ctx, id, &path, NOT_REGULAR);
        }
        Err(e) => match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Claim::Vanished { id, name, since };
            }
            Err(e) => {
                // The directory, not the file, is at fault (permissions,
                // I/O): keep the job queued and retry with a growing pause
                // rather than reject good input or spin.
                error!(cmd_id = %id, "cannot inspect {}: {e}; claiming paused, retrying", path.display());
                return Claim::Retry { id, name, since };
            }
            Ok(_) => return reject(ctx, id, &path, format!("cannot open the job file: {e}")),
        },
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return reject(ctx, id, &path, format!("cannot inspect the job file: {e}")),
    };
    if meta.is_dir() {
        return reject_type(ctx, id, &path, "a directory");
    }
    if !meta.is_file() {
        return reject_type(ctx, id, &path, NOT_REGULAR);
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            debug!(cmd_id = %id, "another worker holds {}; leaving it", path.display());
            return Claim::Dropped { id };
        }
        Err(TryLockError::Error(e)) => {
            warn!(cmd_id = %id, "cannot lock {}: {e}", path.display());
        }
    }
    let bytes = match read_file(&mut file, &meta, ctx.max_job_bytes) {
        Ok(b) => b,
        Err(ReadError::TooBig(size)) => {
            let e = JobError::TooBig {
                size,
                max: ctx.max_job_bytes,
            };
            return reject(ctx, id, &path, e.to_string());
        }
        Err(ReadError::Io(e)) => {
            return reject(ctx, id, &path, format!("cannot read the job file: {e}"));
        }
    };
    let job = match Job::parse(kind, &bytes) {
        Ok(j) => j,
        Err(_) if !complete && changed_within(&meta, SETTLE) => {
            debug!(cmd_id = %id, "{} does not parse yet and was just written; waiting for its writer", path.display());
            return Claim::NotYet { id };
        }
        Err(e) => return reject(ctx, id, &path, e.to_string()),
    };
    let refused = ctx.submitters.refuse(&meta);
    if let Some(why) = refused {
        return reject(ctx, id, &path, why);
    }
    let (log, log_path) = match create_log(&ctx.spool, &id) {
        Ok(x) => x,
        Err(e) => {
            // Most likely a full disk: keep the job queued and stop
            // claiming until the retry, rather than spin.
            error!(cmd_id = %id, "cannot create a log file: {e}; claiming paused, the job stays in pending/");
            return Claim::Retry { id, name, since };
        }
    };
    let running_path = ctx.spool.running().join(&name);
    match rename_noreplace(&path, &running_path) {
        Ok(true) => {}
        Ok(false) => {
            // Another worker runs a job of this id; the rescan retries.
            let _ = fs::remove_file(&log_path);
            debug!(cmd_id = %id, "a job with this id is running elsewhere; retrying later");
            return Claim::Dropped { id };
        }
        Err(e) => {
            let _ = fs::remove_file(&log_path);
            if e.kind() == io::ErrorKind::NotFound {
                return Claim::Vanished { id, name, since };
            }
            error!(cmd_id = %id, "cannot claim {}: {e}", path.display());
            return Claim::Dropped { id };
        }
    }
    let timeout = job
        .timeout_secs
        .map_or(ctx.default_timeout, |s| Duration::from_secs(s.get()));
    let run = exec::Run {
        id,
        job,
        running_path,
        log,
        log_rel: ctx.spool.relative(&log_path),
        shell: ctx.shell.clone(),
        timeout,
        kill_grace: ctx.kill_grace,
        log_max_bytes: ctx.log_max_bytes,
        started_at: Timestamp::now(),
        t0: Instant::now(),
    };
    let began = run.t0;
    let spawned = exec::spawn(&run, &ctx.spawner);
    // Logged once the job runs: the line costs the slot some CPU, and the
    // job need not wait for it.
    info!(
        message_id = message_id::JOB_STARTED,
        cmd_id = %run.id,
        cmd_status = "running",
        exit_code = "-",
        duration_ms = 0,
        attempt = run.job.attempt,
        kind = kind.extension(),
        "job started"
    );
    Claim::Started(Box::new(Started {
        run,
        spawned,
        lock: file,
        began,
    }))
}

const NOT_REGULAR: &str = "not a regular file (FIFO, socket or device)";

/// Rejects a job file that is not a regular file.
fn reject_type(ctx: &ClaimCtx, id: JobId, path: &Path, what: &str) -> Claim {
    reject(
        ctx,
        id,
        path,
        format!("the job file is {what}; only regular files are accepted"),
    )
}

/// How recently a file a rescan found must have changed for a parse
/// failure to mean "still being written" rather than bad input. Only files
/// whose creation the worker did not see (written while it was starting)
/// depend on it: for the others, inotify says when the writer closed them.
pub(super) const SETTLE: Duration = Duration::from_secs(5);

fn changed_within(meta: &fs::Metadata, age: Duration) -> bool {
    meta.modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|e| e < age)
}

/// Rejects bad input: moves the file to `archive/rejected/`; the caller
/// records a `rejected` result.
///
/// What cannot be moved there (a member's non-empty directory: moving a
/// directory to another parent needs write access to it) is renamed aside
/// within `pending/`, to `.<name>.unmovable-<stamp>`, which frees its id;
/// the rescans pass over it and `diagnose` lists it. Either way the id gets
/// its one `rejected` result.
fn reject(ctx: &ClaimCtx, id: JobId, path: &Path, reason: String) -> Claim {
    let e = match move_into(path, &ctx.spool.archive_rejected()) {
        Ok(dest) => {
            debug!(cmd_id = %id, "rejected job file kept as {}", ctx.spool.relative(&dest));
            return Claim::Rejected {
                id,
                reason,
                stuck: None,
            };
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Claim::Dropped { id },
        Err(e) => e,
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let aside = ctx.spool.pending().join(format!(
        ".{name}.unmovable-{}",
        Timestamp::now().file_stamp()
    ));
    let (left, reason) = match rename_noreplace(path, &aside) {
        Ok(true) => {
            let shown = ctx.spool.relative(&aside);
            (
                aside,
                format!(
                    "{reason}; it cannot be moved to archive/rejected/ ({e}), so it was renamed to {shown}, \
                     where `ai-cmd-executor diagnose` lists it for removal"
                ),
            )
        }
        Ok(false) | Err(_) => (
            path.to_owned(),
            format!(
                "{reason}; it cannot be moved out of pending/ ({e}) and is left there, \
                 where `ai-cmd-executor diagnose` lists it for removal"
            ),
        ),
    };
    // Logged once, with the rejection.
    Claim::Rejected {
        id,
        reason,
        stuck: Some(left),
    }
}

/// Creates `logs/<shard>/<id>@<stamp>.log` for a new run. The shard
/// directory is made the first time it is needed (or again after `cleanup`
/// removed it empty).
fn create_log(spool: &Spool, id: &JobId) -> io::Result<(File, PathBuf)> {
    let mut stamp = Timestamp::now();
    let mut made_dir = false;
    loop {
        let path = spool.log_path(id, stamp);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                stamp = Timestamp(stamp.0 + Duration::from_micros(1));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !made_dir => {
                match fs::create_dir_all(spool.log_dir(id)) {
                    Ok(()) => made_dir = true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => made_dir = true,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) enum ReadError {
    TooBig(u64),
    Io(io::Error),
}

/// Reads a whole job file, refusing one over `max` bytes without reading it.
pub(super) fn read_bounded(file: &mut File, max: u64) -> Result<Vec<u8>, ReadError> {
    let meta = file.metadata().map_err(ReadError::Io)?;
    read_file(file, &meta, max)
}

/// [`read_bounded`] for a file whose metadata is at hand.
fn read_file(file: &mut File, meta: &fs::Metadata, max: u64) -> Result<Vec<u8>, ReadError> {
    if !meta.is_file() {
        return Err(ReadError::Io(io::Error::other("not a regular file")));
    }
    if meta.len() > max {
        return Err(ReadError::TooBig(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooBig(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The `submit_group` rule: job files must be owned by root, by the
/// worker's own user, or by a member of the group. Decisions are cached per
/// owner, so the user database is asked once per uid.
pub(super) struct Submitters {
    group: Option<(String, Option<nix::unistd::Group>)>,
    cache: Mutex<HashMap<u32, bool>>,
}

impl Submitters {
    pub fn new(group: Option<&str>) -> Self {
        let group = group.map(|g| {
            let found = nix::unistd::Group::from_name(g).ok().flatten();
            if found.is_none() {
                error!("submit_group {g:?} does not exist; every job file not owned by root or the worker is refused");
            }
            (g.to_owned(), found)
        });
        Submitters {
            group,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Why a job file with this metadata is refused, if it is.
    fn refuse(&self, meta: &fs::Metadata) -> Option<String> {
        let (name, group) = self.group.as_ref()?;
        let uid = meta.uid();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let allowed = *cache.entry(uid).or_insert_with(|| {
            if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
                return true;
            }
            let Some(g) = group else { return false };
            match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
                Ok(Some(u)) => u.gid == g.gid || g.mem.contains(&u.name),
                _ => false,
            }
        });
        (!allowed).then(|| {
            format!("the job file is owned by uid {uid}, who is not in the submit group {name:?} (submit_group)")
        })
    }
}

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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::exec;
use super::isolation::Confinement;
use super::spawn::Spawner;
use crate::config::Config;
use crate::logging::{CommandDigest, message_id};
use crate::spool::job::{Job, JobBody, JobError};
use crate::spool::limits::LimitsConfig;
use crate::spool::result::Submitter;
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
    /// Defaults and ceiling of the jobs' resource limits.
    pub limits: LimitsConfig,
    /// Starts job processes (environment and `/dev/null` prepared once).
    pub spawner: Spawner,
}

impl ClaimCtx {
    pub fn new(spool: Spool, config: &Config, confinement: Arc<Confinement>) -> Self {
        ClaimCtx {
            spool,
            shell: config.shell.clone(),
            default_timeout: config.default_timeout.get(),
            kill_grace: config.kill_grace.get(),
            log_max_bytes: config.log_max_bytes.get(),
            max_job_bytes: config.max_job_bytes.get(),
            submitters: Submitters::new(config.submit_group.as_deref()),
            limits: config.limits,
            spawner: Spawner::new(confinement),
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
    /// What it runs, for the journal entry of its end.
    pub command: CommandDigest,
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
        /// The owner of the file, if it could be inspected.
        submitter: Option<Submitter>,
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
            return reject_type(ctx, id, &path, "a symbolic link", None);
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
            return reject_type(ctx, id, &path, NOT_REGULAR, None);
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
            Ok(_) => {
                let why = format!("cannot open the job file: {e}");
                return reject(ctx, id, &path, why, None);
            }
        },
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => {
            let why = format!("cannot inspect the job file: {e}");
            return reject(ctx, id, &path, why, None);
        }
    };
    // The submitter is the file's owner, from the fstat just made; the
    // name comes from a cache.
    let (submitter, allowed) = ctx.submitters.owner(meta.uid());
    if meta.is_dir() {
        return reject_type(ctx, id, &path, "a directory", Some(submitter));
    }
    if !meta.is_file() {
        return reject_type(ctx, id, &path, NOT_REGULAR, Some(submitter));
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
            return reject(ctx, id, &path, e.to_string(), Some(submitter));
        }
        Err(ReadError::Io(e)) => {
            let why = format!("cannot read the job file: {e}");
            return reject(ctx, id, &path, why, Some(submitter));
        }
    };
    let job = match Job::parse(kind, &bytes) {
        Ok(j) => j,
        Err(_) if !complete && changed_within(&meta, SETTLE) => {
            debug!(cmd_id = %id, "{} does not parse yet and was just written; waiting for its writer", path.display());
            return Claim::NotYet { id };
        }
        Err(e) => return reject(ctx, id, &path, e.to_string(), Some(submitter)),
    };
    if !allowed {
        let why = ctx.submitters.refusal(submitter.uid);
        return reject(ctx, id, &path, why, Some(submitter));
    }
    if let Some(why) = job.cwd.as_deref().and_then(unusable_cwd) {
        return reject(ctx, id, &path, why, Some(submitter));
    }
    let limits = match ctx.limits.resolve(job.limits.as_ref()) {
        Ok(l) => l,
        Err(why) => return reject(ctx, id, &path, why, Some(submitter)),
    };
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
    let mut run = exec::Run {
        limits,
        applied: None,
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
        submitted_by: Some(submitter),
    };
    let began = run.t0;
    let spawned = exec::spawn(&mut run, &ctx.spawner);
    // Digested and logged once the job runs: it costs the slot some CPU,
    // and the job need not wait for it.
    let command = digest(&run.job, &bytes);
    let submitter = run.submitted_by.as_ref();
    info!(
        message_id = message_id::JOB_STARTED,
        cmd_id = %run.id,
        cmd_status = "running",
        exit_code = "-",
        duration_ms = 0,
        attempt = run.job.attempt,
        kind = kind.extension(),
        submitter_uid = submitter.map(|s| s.uid),
        submitter = submitter.and_then(|s| s.name.as_deref()),
        cmd = command.excerpt.as_str(),
        cmd_sha256 = command.sha256.as_str(),
        "job {} started",
        run.id
    );
    Claim::Started(Box::new(Started {
        run,
        spawned,
        lock: file,
        began,
        command,
    }))
}

/// Why the job's `cwd` cannot be its working directory, if it cannot: it
/// does not exist, is not a directory, or the worker's user may not enter
/// it. Said with the directory's name (the job is rejected), rather than
/// as the shell failing to start.
fn unusable_cwd(cwd: &Path) -> Option<String> {
    match fs::metadata(cwd) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some(format!("\"cwd\" {} does not exist", cwd.display()))
        }
        Err(e) => Some(format!("\"cwd\" {} cannot be used: {e}", cwd.display())),
        Ok(m) if !m.is_dir() => Some(format!("\"cwd\" {} is not a directory", cwd.display())),
        Ok(_) => match nix::unistd::access(cwd, nix::unistd::AccessFlags::X_OK) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "\"cwd\" {} cannot be entered by the worker's user: {}",
                cwd.display(),
                std::io::Error::from(e)
            )),
        },
    }
}

/// The digest of what a job runs: a JSON job's `command`, or a script
/// job's whole file (`file`, the bytes it was parsed from).
pub(super) fn digest(job: &Job, file: &[u8]) -> CommandDigest {
    match &job.body {
        JobBody::Command(command) => CommandDigest::of(command.as_bytes()),
        JobBody::Script => CommandDigest::of(file),
    }
}

const NOT_REGULAR: &str = "not a regular file (FIFO, socket or device)";

/// Rejects a job file that is not a regular file.
fn reject_type(
    ctx: &ClaimCtx,
    id: JobId,
    path: &Path,
    what: &str,
    submitter: Option<Submitter>,
) -> Claim {
    let why = format!("the job file is {what}; only regular files are accepted");
    reject(ctx, id, path, why, submitter)
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
fn reject(
    ctx: &ClaimCtx,
    id: JobId,
    path: &Path,
    reason: String,
    submitter: Option<Submitter>,
) -> Claim {
    let e = match move_into(path, &ctx.spool.archive_rejected()) {
        Ok(dest) => {
            debug!(cmd_id = %id, "rejected job file kept as {}", ctx.spool.relative(&dest));
            return Claim::Rejected {
                id,
                reason,
                stuck: None,
                submitter,
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
        submitter,
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

/// Who submits the jobs: the owners of their files, with their user names,
/// and the `submit_group` rule: when it is set, job files must be owned by
/// root, by the worker's own user, or by a member of the group.
///
/// The user database is asked once per uid, and the answer (the name and
/// the decision) kept for as long as the configuration (a reload starts
/// afresh, so a user added since is named after `systemctl reload`): the
/// worker claims up to thousands of jobs a second, and a lookup may cost
/// a file read or an NSS round trip.
pub(super) struct Submitters {
    group: Option<(String, Option<nix::unistd::Group>)>,
    cache: Mutex<HashMap<u32, Owner>>,
}

/// What is known of one uid.
#[derive(Clone)]
struct Owner {
    name: Option<String>,
    allowed: bool,
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

    fn cache(&self) -> MutexGuard<'_, HashMap<u32, Owner>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The submitter of a job file owned by `uid`, and whether the
    /// `submit_group` rule lets them submit.
    pub fn owner(&self, uid: u32) -> (Submitter, bool) {
        let cached = self.cache().get(&uid).cloned();
        // Looked up without holding the lock, so that a slow user database
        // holds up only the job that needs it.
        let owner = cached.unwrap_or_else(|| {
            let owner = self.look_up(uid);
            self.cache().insert(uid, owner.clone());
            owner
        });
        let submitter = Submitter {
            uid,
            name: owner.name,
        };
        (submitter, owner.allowed)
    }

    fn look_up(&self, uid: u32) -> Owner {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let allowed = match &self.group {
            None => true,
            Some(_) if uid == 0 || uid == nix::unistd::geteuid().as_raw() => true,
            Some((_, None)) => false,
            Some((_, Some(g))) => user
                .as_ref()
                .is_some_and(|u| u.gid == g.gid || g.mem.contains(&u.name)),
        };
        Owner {
            name: user.map(|u| u.name),
            allowed,
        }
    }

    /// Why a job file owned by `uid` is refused, when [`Submitters::owner`]
    /// says it is.
    fn refusal(&self, uid: u32) -> String {
        let group = self.group.as_ref().map_or("", |(name, _)| name.as_str());
        format!(
            "the job file is owned by uid {uid}, who is not in the submit group {group:?} (submit_group)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(uid: u32) -> Option<String> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    #[test]
    fn submitters_are_named_from_the_user_database_and_remembered() {
        let submitters = Submitters::new(None);
        let me = nix::unistd::geteuid().as_raw();
        let (s, allowed) = submitters.owner(me);
        assert_eq!(s.uid, me);
        assert_eq!(s.name, name_of(me));
        assert!(allowed, "with no submit_group anyone may submit");
        // A uid with no user: no name, and still a submitter.
        let nameless = 3_999_999_999;
        assert_eq!(name_of(nameless), None, "uid {nameless} has a user here");
        let (s, allowed) = submitters.owner(nameless);
        assert_eq!((s.uid, s.name, allowed), (nameless, None, true));
        // Asked again, the answer comes from the cache.
        assert_eq!(submitters.cache().len(), 2);
        assert_eq!(submitters.owner(me).0.name, name_of(me));
        assert_eq!(submitters.cache().len(), 2);
    }

    #[test]
    fn the_submit_group_rule_is_kept() {
        let submitters = Submitters::new(Some("root"));
        let me = nix::unistd::geteuid().as_raw();
        assert!(submitters.owner(0).1, "root may always submit");
        assert!(submitters.owner(me).1, "the worker's own user may");
        let nameless = 3_999_999_999;
        assert!(
            !submitters.owner(nameless).1,
            "a uid with no user is not in the group"
        );
        assert!(
            submitters
                .refusal(nameless)
                .contains("owned by uid 3999999999, who is not in the submit group \"root\""),
            "{}",
            submitters.refusal(nameless)
        );
        let missing = Submitters::new(Some("no-such-group-for-this-test"));
        assert!(missing.owner(0).1);
        assert!(!missing.owner(nameless).1);
    }
}

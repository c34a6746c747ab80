//! The client API: submit jobs and read results back over the spool
//! contract. The CLI's `submit`, `result`, `log`, `wait` and `list` are thin
//! layers over this, and a Rust program can use it directly:
//!
//! ```no_run
//! use ai_cmd_executor::client::{Client, Submission};
//! let client = Client::new("/var/lib/ai-cmd-executor");
//! let id = client.submit(&Submission::command("uname -a"))?;
//! let result = client.wait(&id, Some(std::time::Duration::from_secs(60)))?;
//! println!("{} exited {:?}", id, result.exit_code);
//! # Ok::<(), ai_cmd_executor::client::ClientError>(())
//! ```

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use inotify::{Inotify, WatchMask};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::Serialize;

use crate::spool::id::{IdError, job_file_name, parse_job_file_name};
use crate::spool::job::{Job, JobError, JobSpec, OnInterrupt};
use crate::spool::{
    JobId, JobKind, JobResult, QueueState, Spool, SpoolError, Timestamp, rename_noreplace,
};

/// Errors a client call can return.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The spool has no `pending/` directory.
    #[error(
        "{} is not a spool (no pending/ directory); start the worker on it once (`ai-cmd-executor run --spool {}`) or pass the right --spool",
        .0.display(), .0.display()
    )]
    NotASpool(PathBuf),
    /// The spool is there, but this user may not use it.
    #[error(
        "{}: permission denied: this user may not submit to the spool (join its group, ai-cmd for the package's spool, or ask its owner)",
        .0.display()
    )]
    Denied(PathBuf),
    /// A job with this id is queued and not yet claimed.
    #[error("a job with id {0} is already pending; wait for it or choose another id")]
    AlreadyPending(JobId),
    /// The job would be rejected by the worker.
    #[error("invalid job: {0}")]
    InvalidJob(#[from] JobError),
    /// A bad id.
    #[error("invalid id: {0}")]
    InvalidId(#[from] IdError),
    /// `wait` gave up.
    #[error("job {id} has not finished after {waited:?} (it is {state})")]
    Timeout {
        /// The job.
        id: JobId,
        /// How long the client waited.
        waited: Duration,
        /// Where the job was when the client gave up.
        state: &'static str,
    },
    /// The job has finished: there is nothing to cancel.
    #[error("job {0} has already finished; there is nothing to cancel")]
    Finished(JobId),
    /// Only its submitter or root may cancel a job.
    #[error("job {id} was submitted by uid {owner}; only its submitter or root may cancel it")]
    NotYours {
        /// The job.
        id: JobId,
        /// Its submitter (the owner of its job file).
        owner: u32,
    },
    /// Nothing is known of this id: not queued, not running, no result.
    #[error("no job {0} in this spool (not pending, not running, no result)")]
    Unknown(JobId),
    /// The spool's file system has no room (or the user's quota is spent)
    /// for the job file; nothing was queued.
    #[error(
        "the spool's file system is full: {}: {source}; nothing was queued (free space on it; `ai-cmd-executor cleanup`, as the spool owner or root, packs old logs and deletes expired archives)",
        .spool.display()
    )]
    Full {
        /// The spool.
        spool: PathBuf,
        /// ENOSPC or EDQUOT.
        source: io::Error,
    },
    /// A spool file operation failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The length of `bytes` without an incomplete UTF-8 character at its end
/// (at most 3 bytes are dropped: a character's start and what followed).
fn whole_chars(bytes: &[u8]) -> usize {
    let n = bytes.len();
    for back in 1..=3.min(n) {
        let b = bytes[n - back];
        if b & 0xC0 != 0x80 {
            // The last character's first byte: how long it should be.
            let len = match b {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if len > back { n - back } else { n };
        }
    }
    n
}

/// How long after its file went to `archive/rejected/` a job without a
/// result yet is taken as being rejected (its result on the way), not as
/// unknown.
const REJECTING: Duration = Duration::from_secs(10);

/// A piece of a job's latest log, read by offset (see
/// [`Client::read_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The bytes from the offset asked for, ending on a whole UTF-8
    /// character unless the log ends there.
    pub bytes: Vec<u8>,
    /// Where the next read starts: the offset plus `bytes.len()`.
    pub next_offset: u64,
    /// Whether the job had finished when the log was read: then the log
    /// is whole, and a read from `next_offset` returns nothing new
    /// (until the job runs again).
    pub finished: bool,
}

/// A job to submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// The id; one is generated when `None`.
    pub id: Option<JobId>,
    /// What to run.
    pub payload: Payload,
}

/// The two forms of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A JSON job (`pending/<id>.json`).
    Json(JobSpec),
    /// A bash script (`pending/<id>.sh`).
    Script(String),
}

impl Submission {
    /// A JSON job running `command` with every option at its default.
    pub fn command(command: impl Into<String>) -> Self {
        Submission {
            id: None,
            payload: Payload::Json(JobSpec {
                command: command.into(),
                ..JobSpec::default()
            }),
        }
    }

    /// A script job.
    pub fn script(text: impl Into<String>) -> Self {
        Submission {
            id: None,
            payload: Payload::Script(text.into()),
        }
    }

    /// Sets the id.
    pub fn with_id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the timeout (JSON jobs only; scripts use the configured default).
    pub fn with_timeout(mut self, secs: NonZeroU64) -> Self {
        if let Payload::Json(spec) = &mut self.payload {
            spec.timeout_secs = Some(secs);
        }
        self
    }

    /// Names the client in the job file (`submitted_via`; JSON jobs only:
    /// a script job is recorded as `file`).
    pub fn via(mut self, via: crate::spool::job::SubmittedVia) -> Self {
        if let Payload::Json(spec) = &mut self.payload {
            spec.submitted_via = Some(via);
        }
        self
    }

    /// Sets resource limits (JSON jobs only; scripts get the configured
    /// defaults).
    pub fn with_limits(mut self, limits: crate::spool::limits::Limits) -> Self {
        if let Payload::Json(spec) = &mut self.payload
            && !limits.is_empty()
        {
            spec.limits = Some(limits);
        }
        self
    }

    /// Sets environment variables, working directory and interrupt policy
    /// (JSON jobs only).
    pub fn with_options(
        mut self,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
        on_interrupt: OnInterrupt,
    ) -> Self {
        if let Payload::Json(spec) = &mut self.payload {
            spec.env = env;
            spec.cwd = cwd;
            spec.on_interrupt = on_interrupt;
        }
        self
    }
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a value returned to a caller once per poll and matched at once; most polls of \
              a waiting client end in the large variant, so boxing it would only add an \
              allocation"
)]
pub enum JobState {
    /// Queued in `pending/`.
    Pending,
    /// Claimed and running.
    Running,
    /// Done; the latest result.
    Finished(JobResult),
    /// Nothing is known of this id.
    Unknown,
}

impl JobState {
    /// A word for messages.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Finished(_) => "finished",
            JobState::Unknown => "unknown",
        }
    }
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListEntry {
    /// The id (or the raw file name if it holds no valid id).
    pub id: String,
    /// `pending`, `running` or `completed`.
    pub state: &'static str,
    /// When it was queued/claimed (file change time) or finished.
    pub since: Option<Timestamp>,
    /// The result, for completed entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
}

/// A client of one spool.
#[derive(Debug, Clone)]
pub struct Client {
    spool: Spool,
}

impl Client {
    /// A client of the spool at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Client {
            spool: Spool::new(root),
        }
    }

    /// The spool this client talks to.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Queues a job: writes it in `tmp/`, then renames it into `pending/`
    /// without replacing anything. Returns its id.
    pub fn submit(&self, sub: &Submission) -> Result<JobId, ClientError> {
        match std::fs::metadata(self.spool.pending()) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ClientError::Denied(self.spool.pending()));
            }
            _ => return Err(ClientError::NotASpool(self.spool.root().to_owned())),
        }
        if nix::unistd::access(
            &self.spool.pending(),
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        ) == Err(nix::errno::Errno::EACCES)
        {
            return Err(ClientError::Denied(self.spool.pending()));
        }
        let (kind, bytes) = match &sub.payload {
            Payload::Json(spec) => {
                Job::from_spec(spec.clone())?;
                let mut b = serde_json::to_vec(spec).expect("a job always serializes");
                b.push(b'\n');
                (JobKind::Json, b)
            }
            Payload::Script(text) => {
                Job::parse(JobKind::Script, text.as_bytes())?;
                (JobKind::Script, text.clone().into_bytes())
            }
        };
        let id = match &sub.id {
            Some(id) => id.clone(),
            None => generate_id(),
        };
        for k in JobKind::ALL {
            if self.spool.pending().join(job_file_name(&id, k)).exists() {
                return Err(ClientError::AlreadyPending(id));
            }
        }
        let tmp = self.spool.tmp().join(format!(
            "{}.{}.{}",
            job_file_name(&id, kind),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            let full = [nix::libc::ENOSPC, nix::libc::EDQUOT];
            if e.raw_os_error().is_some_and(|n| full.contains(&n)) {
                return Err(ClientError::Full {
                    spool: self.spool.root().to_owned(),
                    source: e,
                });
            }
            return Err(SpoolError::io("writing", &tmp, e).into());
        }
        let dest = self.spool.pending().join(job_file_name(&id, kind));
        match rename_noreplace(&tmp, &dest) {
            Ok(true) => Ok(id),
            Ok(false) => {
                let _ = fs::remove_file(&tmp);
                Err(ClientError::AlreadyPending(id))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(SpoolError::io("renaming into pending/", dest, e).into())
            }
        }
    }

    /// The latest result of `id`, if there is one.
    pub fn result(&self, id: &JobId) -> Result<Option<JobResult>, ClientError> {
        Ok(self.spool.read_result(id)?)
    }

    /// The newest log file of `id`, if any run has started.
    pub fn latest_log(&self, id: &JobId) -> Result<Option<PathBuf>, ClientError> {
        Ok(self.spool.latest_log(id)?)
    }

    /// Asks the worker to cancel `id`: a pending job is withdrawn, a running
    /// one stopped (TERM, then KILL after `kill_grace`, its whole process
    /// tree), and its result says `cancelled`. Writes the request
    /// `cancel/<id>` (through `tmp/` and a rename, as a job file); a request
    /// already there stands. Only the job's submitter or root may cancel it:
    /// anyone else is refused here, and by the worker. Returns once the
    /// request is written; [`Client::wait`] gives the result.
    pub fn cancel(&self, id: &JobId) -> Result<(), ClientError> {
        use std::os::unix::fs::MetadataExt as _;
        let Some((_, path)) = self.spool.find_queued(id) else {
            return match self.state(id)? {
                JobState::Unknown => Err(ClientError::Unknown(id.clone())),
                _ => Err(ClientError::Finished(id.clone())),
            };
        };
        let me = nix::unistd::geteuid().as_raw();
        if let Ok(meta) = fs::symlink_metadata(&path)
            && me != 0
            && meta.uid() != me
        {
            return Err(ClientError::NotYours {
                id: id.clone(),
                owner: meta.uid(),
            });
        }
        let dir = self.spool.cancel();
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(ClientError::NotASpool(self.spool.root().to_owned())),
        }
        let tmp = self.spool.tmp().join(format!(
            ".cancel-{id}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => ClientError::Denied(self.spool.tmp()),
                _ => SpoolError::io("writing", &tmp, e).into(),
            })?;
        let done = rename_noreplace(&tmp, &dir.join(id.as_str()));
        let _ = fs::remove_file(&tmp);
        match done {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(ClientError::Denied(dir)),
            Err(e) => Err(SpoolError::io("requesting a cancel in", dir, e).into()),
        }
    }

    /// Up to `max_bytes` of the latest log of `id` from byte `offset`, while
    /// the job runs or after: a reader that passes each `next_offset` back
    /// gets every byte once. A chunk that would end inside a UTF-8
    /// character ends before it, unless the log is complete and ends
    /// there. A pending job has no log yet: an empty chunk. An id this
    /// spool knows nothing of is [`ClientError::Unknown`].
    pub fn read_log(
        &self,
        id: &JobId,
        offset: u64,
        max_bytes: usize,
    ) -> Result<LogChunk, ClientError> {
        use std::io::{Read, Seek, SeekFrom};
        // Read the state first: a job finished by then has its whole log.
        let finished = match self.state(id)? {
            JobState::Unknown => return Err(ClientError::Unknown(id.clone())),
            JobState::Pending => {
                return Ok(LogChunk {
                    bytes: Vec::new(),
                    next_offset: offset,
                    finished: false,
                });
            }
            JobState::Running => false,
            JobState::Finished(_) => true,
        };
        let mut bytes = Vec::new();
        if let Some(path) = self.latest_log(id)? {
            let mut file =
                fs::File::open(&path).map_err(|e| SpoolError::io("opening", &path, e))?;
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| {
                    file.take(u64::try_from(max_bytes).unwrap_or(u64::MAX))
                        .read_to_end(&mut bytes)
                })
                .map_err(|e| SpoolError::io("reading", &path, e))?;
            let at_end = bytes.len() < max_bytes;
            if !(finished && at_end) {
                bytes.truncate(whole_chars(&bytes));
            }
        }
        let next_offset = offset + bytes.len() as u64;
        Ok(LogChunk {
            bytes,
            next_offset,
            finished,
        })
    }

    /// Where `id` is now. Looks in `pending/`, then `running/`, then
    /// `completed/`: the worker writes the result before it removes the
    /// running file, so this order never misses a job in flight.
    pub fn state(&self, id: &JobId) -> Result<JobState, ClientError> {
        Ok(match self.spool.find_queued(id) {
            Some((QueueState::Pending, _)) => JobState::Pending,
            Some((QueueState::Running, _)) => JobState::Running,
            None => match self.spool.read_result(id)? {
                Some(r) => JobState::Finished(r),
                None if self.being_rejected(id) => JobState::Pending,
                None => JobState::Unknown,
            },
        })
    }

    /// Whether the worker is rejecting `id` right now: its file went to
    /// `archive/rejected/` (as `<id>.<kind>.<stamp>`) within the last
    /// [`REJECTING`], and the result follows it.
    fn being_rejected(&self, id: &JobId) -> bool {
        let Ok(entries) = fs::read_dir(self.spool.archive_rejected()) else {
            return false;
        };
        let now = Timestamp::now();
        entries.flatten().any(|e| {
            let name = e.file_name();
            let Some(rest) = name
                .to_str()
                .and_then(|n| n.strip_prefix(id.as_str()))
                .and_then(|r| r.strip_prefix(".json.").or_else(|| r.strip_prefix(".sh.")))
            else {
                return false;
            };
            Timestamp::from_file_stamp(rest.get(..23).unwrap_or(rest))
                .is_some_and(|t| now.since(t) < REJECTING)
        })
    }

    /// Waits until `id` has finished and returns its result. `None` waits
    /// for ever.
    pub fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobResult, ClientError> {
        self.wait_since(id, None, timeout)
    }

    /// Like [`Client::wait`], but ignores results of runs that started
    /// before `since` (an earlier run of a repeated id).
    pub fn wait_since(
        &self,
        id: &JobId,
        since: Option<Timestamp>,
        timeout: Option<Duration>,
    ) -> Result<JobResult, ClientError> {
        let start = Instant::now();
        // Watch before the first look, so no change falls between the two:
        // the result arriving, and the job file leaving running/ after it
        // (a look between the two sees the job still running).
        let running = self.spool.running();
        let mut watch = DirWatch::new(&[
            (&self.spool.completed(), WatchMask::MOVED_TO),
            (&running, WatchMask::DELETE | WatchMask::MOVED_FROM),
        ])
        .ok();
        loop {
            let state = self.state(id)?;
            if let JobState::Finished(r) = &state
                && since.is_none_or(|s| r.started_at >= s || r.finished_at >= s)
            {
                return Ok(r.clone());
            }
            let left = match timeout {
                Some(t) => match t.checked_sub(start.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => {
                        return Err(ClientError::Timeout {
                            id: id.clone(),
                            waited: start.elapsed(),
                            state: state.name(),
                        });
                    }
                },
                None => Duration::MAX,
            };
            // A re-check each second covers events inotify cannot give
            // (a re-created directory, a job re-queued for retry).
            let nap = left.min(Duration::from_secs(1));
            match &mut watch {
                Some(w) => w
                    .wait(nap)
                    .map_err(|e| SpoolError::io("watching", self.spool.completed(), e))?,
                None => std::thread::sleep(nap.min(Duration::from_millis(50))),
            }
        }
    }

    /// Jobs in the spool, in time order within each state. `state` limits
    /// the listing to `pending`, `running` or `completed`.
    pub fn list(&self, state: Option<&str>) -> Result<Vec<ListEntry>, ClientError> {
        let mut out = Vec::new();
        for (name, dir) in [
            ("pending", self.spool.pending()),
            ("running", self.spool.running()),
            ("completed", self.spool.completed()),
        ] {
            if state.is_some_and(|s| s != name) {
                continue;
            }
            let mut entries = Vec::new();
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SpoolError::io("listing", dir, e).into()),
            };
            for entry in rd {
                let entry = entry.map_err(|e| SpoolError::io("listing", &dir, e))?;
                let file = entry.file_name();
                if file.to_string_lossy().starts_with('.') && name == "completed" {
                    continue;
                }
                let since = entry.metadata().ok().map(|m| change_time(&m));
                let parsed = parse_job_file_name(&file).ok();
                if name == "completed" {
                    let Some((id, JobKind::Json)) = parsed else {
                        continue;
                    };
                    if let Some(r) = self.spool.read_result(&id)? {
                        entries.push(ListEntry {
                            id: r.id.clone(),
                            state: name,
                            since: Some(r.finished_at),
                            result: Some(r),
                        });
                    }
                } else {
                    entries.push(ListEntry {
                        id: parsed.map_or_else(
                            || file.to_string_lossy().into_owned(),
                            |(id, _)| id.to_string(),
                        ),
                        state: name,
                        since,
                        result: None,
                    });
                }
            }
            entries.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.id.cmp(&b.id)));
            out.extend(entries);
        }
        Ok(out)
    }
}

/// The inode change time of a file (set when it is renamed, so for a job
/// file it is the time it arrived in its directory).
pub fn change_time(m: &fs::Metadata) -> Timestamp {
    let t = UNIX_EPOCH
        + Duration::from_secs(m.ctime().max(0) as u64)
        + Duration::from_nanos(m.ctime_nsec().max(0) as u64);
    Timestamp(t)
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh id: `job-<UTC stamp>-<hex>`, unique within the host (time to
/// the nanosecond, process id and a per-process counter).
pub fn generate_id() -> JobId {
    let now = SystemTime::now();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let stamp = Timestamp(now).file_stamp();
    JobId::new(&format!(
        "job-{}-{nanos:08x}{:x}{seq:x}",
        &stamp[..15],
        std::process::id()
    ))
    .expect("generated ids are valid")
}

/// Blocks until something changes in a set of watched paths, or a timeout.
pub struct DirWatch {
    /// Always `Some` until dropped.
    inotify: Option<Inotify>,
    buf: Vec<u8>,
}

/// Closing an inotify descriptor waits for the kernel's SRCU grace period
/// (measured here: up to 12 ms), which a waiter that has its answer should
/// not pay: a long-lived caller (the MCP server) answers, and one thread of
/// the process closes the descriptors behind it.
impl Drop for DirWatch {
    fn drop(&mut self) {
        use std::sync::{OnceLock, mpsc};
        static CLOSER: OnceLock<Option<mpsc::Sender<Inotify>>> = OnceLock::new();
        let Some(inotify) = self.inotify.take() else {
            return;
        };
        let closer = CLOSER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Inotify>();
            std::thread::Builder::new()
                .name("inotify-close".into())
                .spawn(move || rx.into_iter().for_each(drop))
                .ok()
                .map(|_| tx)
        });
        // Without the thread, or should it have gone, it closes here.
        if let Some(tx) = closer {
            let _ = tx.send(inotify);
        }
    }
}

impl DirWatch {
    /// Watches each path for the events in its mask.
    pub fn new(paths: &[(&Path, WatchMask)]) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        for (p, mask) in paths {
            inotify.watches().add(p, *mask)?;
        }
        Ok(DirWatch {
            inotify: Some(inotify),
            buf: vec![0; 4096],
        })
    }

    /// Returns after an event (all pending events are consumed) or after
    /// `timeout`, whichever is first.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let Some(inotify) = &mut self.inotify else {
            return Ok(());
        };
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            match inotify.read_events(&mut self.buf) {
                Ok(events) => {
                    if events.count() == 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_never_ends_inside_a_character() {
        let text = "aé€😀".as_bytes(); // 1, 2, 3 and 4 bytes
        assert_eq!(whole_chars(text), text.len());
        for cut in 0..=text.len() {
            let n = whole_chars(&text[..cut]);
            assert!(std::str::from_utf8(&text[..n]).is_ok(), "cut {cut}: {n}");
            assert!(cut - n < 4, "cut {cut}: {n}");
        }
        // Bytes that are not UTF-8 at all are passed on, to be replaced.
        assert_eq!(whole_chars(b"ab\xff"), 3);
        assert_eq!(whole_chars(b"\x80\x80\x80\x80"), 4);
    }

    #[test]
    fn a_job_being_rejected_is_pending_not_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"));
        spool.ensure_layout().unwrap();
        let client = Client::new(spool.root());
        fs::create_dir_all(spool.archive_rejected()).unwrap();
        let now = Timestamp::now().file_stamp();
        fs::write(
            spool.archive_rejected().join(format!("fresh.json.{now}")),
            "",
        )
        .unwrap();
        fs::write(
            spool
                .archive_rejected()
                .join("stale.sh.20200101T000000.000000Z"),
            "",
        )
        .unwrap();
        let state = |id: &str| client.state(&id.parse().unwrap()).unwrap().name();
        assert_eq!(state("fresh"), "pending");
        assert_eq!(state("stale"), "unknown");
        assert_eq!(state("fres"), "unknown");
    }

    #[test]
    fn logs_read_by_offset_give_every_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"));
        spool.ensure_layout().unwrap();
        let client = Client::new(spool.root());
        let id: JobId = "j1".parse().unwrap();
        let err = client.read_log(&id, 0, 10).unwrap_err();
        assert!(matches!(err, ClientError::Unknown(_)), "{err}");
        // Running: a log being written, cut inside "é".
        fs::write(spool.running().join("j1.json"), "{}").unwrap();
        let log_dir = spool.log_dir(&id);
        fs::create_dir_all(&log_dir).unwrap();
        let log = log_dir.join("j1@20261201T000000.000000Z.log");
        fs::write(&log, "héllo").unwrap();
        let a = client.read_log(&id, 0, 2).unwrap();
        assert_eq!(
            (a.bytes.as_slice(), a.next_offset, a.finished),
            (&b"h"[..], 1, false)
        );
        let b = client.read_log(&id, a.next_offset, 100).unwrap();
        assert_eq!((b.bytes.as_slice(), b.next_offset), ("éllo".as_bytes(), 6));
        // Finished: the rest, then nothing new.
        fs::write(&log, "héllo world\n").unwrap();
        fs::remove_file(spool.running().join("j1.json")).unwrap();
        let r = JobResult::not_run("j1", crate::spool::Status::Failed, "x".into(), 1, None);
        spool.write_result(&r).unwrap();
        let c = client.read_log(&id, b.next_offset, 100).unwrap();
        assert_eq!((c.bytes.as_slice(), c.finished), (&b" world\n"[..], true));
        let d = client.read_log(&id, c.next_offset, 100).unwrap();
        assert_eq!((d.bytes.len(), d.next_offset, d.finished), (0, 13, true));
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generate_id();
        let b = generate_id();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("job-"), "{a}");
    }

    #[test]
    fn submit_writes_pending_atomically_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path());
        assert!(matches!(
            client.submit(&Submission::command("true")),
            Err(ClientError::NotASpool(_))
        ));
        client.spool().ensure_layout().unwrap();
        let id = JobId::new("dup").unwrap();
        let sub = Submission::command("echo hi").with_id(id.clone());
        assert_eq!(client.submit(&sub).unwrap(), id);
        let text = fs::read_to_string(dir.path().join("pending/dup.json")).unwrap();
        assert_eq!(text, "{\"command\":\"echo hi\"}\n");
        assert!(matches!(
            client.submit(&sub),
            Err(ClientError::AlreadyPending(_))
        ));
        let script = Submission::script("echo hi\n").with_id(id);
        assert!(matches!(
            client.submit(&script),
            Err(ClientError::AlreadyPending(_))
        ));
        assert_eq!(fs::read_dir(client.spool().tmp()).unwrap().count(), 0);
        assert_eq!(
            client.state(&JobId::new("dup").unwrap()).unwrap(),
            JobState::Pending
        );
        assert!(matches!(
            client.submit(&Submission::command("  ")),
            Err(ClientError::InvalidJob(_))
        ));
    }

    #[test]
    fn wait_times_out_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path());
        client.spool().ensure_layout().unwrap();
        let id = JobId::new("never").unwrap();
        let err = client
            .wait(&id, Some(Duration::from_millis(30)))
            .unwrap_err();
        assert!(err.to_string().contains("unknown"), "{err}");
    }
}

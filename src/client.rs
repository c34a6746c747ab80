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
    /// A spool file operation failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
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

    /// Where `id` is now. Looks in `pending/`, then `running/`, then
    /// `completed/`: the worker writes the result before it removes the
    /// running file, so this order never misses a job in flight.
    pub fn state(&self, id: &JobId) -> Result<JobState, ClientError> {
        Ok(match self.spool.find_queued(id) {
            Some((QueueState::Pending, _)) => JobState::Pending,
            Some((QueueState::Running, _)) => JobState::Running,
            None => match self.spool.read_result(id)? {
                Some(r) => JobState::Finished(r),
                None => JobState::Unknown,
            },
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
        // Watch before the first look, so no change falls between the two.
        let mut watch = DirWatch::new(&[(&self.spool.completed(), WatchMask::MOVED_TO)]).ok();
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
    inotify: Inotify,
    buf: Vec<u8>,
}

impl DirWatch {
    /// Watches each path for the events in its mask.
    pub fn new(paths: &[(&Path, WatchMask)]) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        for (p, mask) in paths {
            inotify.watches().add(p, *mask)?;
        }
        Ok(DirWatch {
            inotify,
            buf: vec![0; 4096],
        })
    }

    /// Returns after an event (all pending events are consumed) or after
    /// `timeout`, whichever is first.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            match self.inotify.read_events(&mut self.buf) {
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
